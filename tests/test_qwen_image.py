"""Qwen-Image specifics: the pipeline's schedule, prompts of different lengths in one batch
(the text encoder's mask), true classifier-free guidance with its norm rescale, the family's
defaults, the model card's snippet and the diffusers export. The shared behaviour (parity
with `QwenImagePipeline`, LoRA round trips, gradient windows) is in tests/test_families.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from draft.cli import main
from draft.models import load_model
from draft.models.base import Size
from draft.models.tiny import PROMPTS, build_tiny
from draft.sampling import SampleNoise, cfg

TINY = {"resolution": 32}  # the tiny folder's native size (the family's own is 1024 px)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("qwen"), "qwen-image")


@pytest.mark.parametrize("steps, height, width", [(4, 32, 32), (7, 32, 64), (50, 64, 48)])
def test_schedule_is_the_one_qwen_image_pipeline_builds(qwen, steps, height, width):
    """A linear sigma grid from 1 to 1/T, shifted exponentially by mu from the packed token
    count and stretched to the terminal sigma, as `QwenImagePipeline.__call__` asks for it."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

    model = load_model(str(qwen), options=TINY)
    cfg_ = model.scheduler_config
    tokens = (height // 8) * (width // 8)  # the VAE's 4x, then 2x2 patches
    mu = calculate_shift(tokens, cfg_["base_image_seq_len"], cfg_["max_image_seq_len"], cfg_["base_shift"],
                         cfg_["max_shift"])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg_)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = model.schedule(steps, Size(height, width))
    torch.testing.assert_close(torch.tensor(ours.timesteps), timesteps.float(), rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(ours.s + ours.s_prev[-1:]), scheduler.sigmas.double().float(),
                               rtol=0, atol=1e-7)
    assert ours.s_prev[-1] == 0 and ours.s[-1] == pytest.approx(0.02, abs=1e-6)  # shift_terminal


def test_prompts_of_different_lengths_batch_as_each_alone(qwen):
    """The pipeline pads a batch's prompts to the longest and masks the padding; cond and the
    negative prompt's are padded to one length so one call runs both. Either way every
    sample's prediction is the one it gets alone, unpadded."""
    model = load_model(str(qwen), options=TINY)
    prompts = ["a star", PROMPTS[0], "a small red circle"]
    cond, uncond = model.conditioning(prompts, 4.0)
    lengths = cond["prompt_embeds_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and cond["prompt_embeds"].shape[1] == uncond["prompt_embeds"].shape[1]
    assert uncond["prompt_embeds_mask"].sum(1).tolist() == [5] * 3  # "" is the template's 5 closing tokens
    x = SampleNoise([0, 1, 2], model.latent_shape(), "cpu").draw()
    t = torch.tensor(model.schedule(4).timesteps[1])
    with torch.no_grad():
        both = model.denoise(torch.cat([x, x]), t, {k: torch.cat([uncond[k], cond[k]]) for k in cond})
        for j, prompt in enumerate(prompts):
            alone, _ = model.conditioning([prompt], 1.0)
            assert alone["prompt_embeds"].shape[1] == lengths[j]  # unpadded
            torch.testing.assert_close(both[3 + j], model.denoise(x[j:j + 1], t, alone)[0], rtol=0, atol=1e-5)


def test_true_cfg_rescales_to_the_conditional_norm(qwen):
    """Each packed token of the guided prediction has the norm of its conditional one: not
    plain CFG, which overshoots it."""
    model = load_model(str(qwen), options=TINY)
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    guided = model.guide(u, c, 4.0)
    torch.testing.assert_close(model.pack(guided).norm(dim=-1), model.pack(c).norm(dim=-1))
    plain = cfg(u, c, 4.0)
    assert (model.pack(plain).norm(dim=-1) > 1.5 * model.pack(c).norm(dim=-1)).all()
    # the direction is plain CFG's, token by token
    cos = torch.nn.functional.cosine_similarity(model.pack(guided), model.pack(plain), dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_train_needs_only_the_folder_and_a_reward(qwen, capsys):
    """The family's defaults fill the rest: the pipeline's 1024 px, 50 steps, true CFG 4; the
    dry run's memory estimate reads the 3-D VAE's config through the adapter."""
    assert main(["train", f"model={qwen}", "reward=brightness", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sampling.num_steps=50: the Qwen-Image family's default" in out
    assert "sampling.guidance_scale=4.0: the Qwen-Image family's default" in out
    assert "at 1024x1024" in out and "estimated peak accelerator memory" in out


@pytest.mark.slow
def test_the_cards_snippet_and_the_diffusers_export(qwen, tmp_path, monkeypatch):
    """A run's model card samples with the pipeline's own guidance (true_cfg_scale and a
    negative prompt) at the run's size; the exported diffusers file loads in plain diffusers
    and samples what the run's own LoRA samples."""
    from diffusers import QwenImagePipeline

    from draft.config import LogConfig, SamplingConfig, TrainConfig
    from draft.export import export
    from draft.trainer import train

    from test_card import run_card_snippet

    run = train(TrainConfig(model=str(qwen), reward="brightness", prompts=PROMPTS[0], eval_prompts=PROMPTS[1],
                            steps=1, batch_size=1, lr=0.05, output_dir=str(tmp_path / "runs"), name="q",
                            model_options=TINY, sampling=SamplingConfig(num_steps=3, guidance_scale=3.0),
                            log=LogConfig(sample_prompts=1, sample_seeds=1, checkpoint_every=0, eval_samples=0,
                                          trackers=())), progress=False)
    code = run_card_snippet(run, tmp_path, monkeypatch)
    assert "true_cfg_scale=3.0" in code and "negative_prompt=''" in code and "height=32" in code
    assert (tmp_path / "sample.png").is_file()
    out = export(run, "diffusers", tmp_path / "exported.safetensors")
    images = []
    for lora in (run / "lora", out):
        pipe = QwenImagePipeline.from_pretrained(qwen)
        pipe.load_lora_weights(lora.parent if lora.suffix else lora, weight_name=lora.name if lora.suffix else None)
        images.append(pipe(PROMPTS[0], negative_prompt="", true_cfg_scale=3.0, height=32, width=32,
                           num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                           output_type="pt").images)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-5)
    assert main(["export", str(run), "--format", "kohya"]) == 2  # a UNet format: refused in one line
