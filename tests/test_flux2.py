"""FLUX.2 specifics: the step-count-dependent shift, the 4-D ids and the unpacking against the
pipeline's own, the batch-norm denormalisation before the VAE, klein's guidance (CFG against
the empty prompt; none when step-distilled) and the families' defaults. The shared behaviour
(parity with `Flux2Pipeline` and `Flux2KleinPipeline`, LoRA in plain diffusers, gradient
windows) is in tests/test_families.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from draft.cli import main
from draft.errors import UserError
from draft.models import load_model
from draft.models.base import Size
from draft.models.tiny import PROMPTS, build_tiny
from draft.sampling import SampleNoise, guided, sample_chain

TINY = {"max_sequence_length": 64}  # the tiny tokenizer's prompts fit; the family pads to 512


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("flux2"), "flux2")


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("klein"), "flux2-klein")


@pytest.mark.parametrize("steps, height, width", [(4, 32, 32), (28, 32, 64), (50, 64, 48)])
def test_schedule_is_the_one_the_pipeline_builds(dev, steps, height, width):
    """A linear sigma grid from 1 to 1/T shifted by the empirical mu of the token count and
    the step count, as `Flux2Pipeline.__call__` asks for it; mu moves with the steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

    model = load_model(str(dev), options=TINY)
    tokens = (height // 8) * (width // 8)  # the VAE's 4x, then the 2x2 patchify
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps),
                                      mu=compute_empirical_mu(tokens, steps))
    ours = model.schedule(steps, Size(height, width))
    torch.testing.assert_close(torch.tensor(ours.timesteps), timesteps.float(), rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(ours.s + ours.s_prev[-1:]), scheduler.sigmas.float(), rtol=0, atol=1e-7)
    assert model.mu(tokens, steps) != model.mu(tokens, steps + 10)


def test_tokens_are_numbered_and_unpacked_as_the_pipeline_does(dev):
    """The image's ids are (0, h, w, 0) row by row and the text's (0, 0, 0, l); the reshape that
    unpacks the transformer's tokens is the pipeline's scatter by those ids."""
    model = load_model(str(dev), options=TINY)
    pipe = model.pipe
    x = torch.randn(2, 16, 3, 5)
    ids = pipe._prepare_latent_ids(x)
    assert ids.shape == (2, 15, 4) and ids[0, 7].tolist() == [0, 1, 2, 0]  # token 7: row 1, column 2
    tokens = pipe._pack_latents(x)
    torch.testing.assert_close(pipe._unpack_latents_with_ids(tokens, ids), x, rtol=0, atol=0)
    assert pipe._prepare_text_ids(torch.zeros(2, 6, 24))[1, 4].tolist() == [0, 0, 0, 4]
    # the adapter's call on a non-square latent: finite, its shape, and each token where the ids put it
    cond, _ = model.conditioning(PROMPTS[:2], 4.0)
    with torch.no_grad():
        out = model.denoise(x, torch.tensor(500.0), cond)
        flipped = model.denoise(x.transpose(2, 3).contiguous(), torch.tensor(500.0), cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out - flipped.transpose(2, 3)).abs().max() > 1e-4  # positions matter: the ids reach the model


def test_decode_is_the_pipelines_with_its_batch_norm_denormalisation(dev):
    """From the same final latents, our decode gives the pipeline's images; without the VAE's
    batch-norm statistics (which the tiny VAE has away from the identity) it would not."""
    from diffusers import Flux2Pipeline

    model = load_model(str(dev), options=TINY)
    pipe = Flux2Pipeline.from_pretrained(dev)
    pipe.set_progress_bar_config(disable=True)
    x = SampleNoise([5, 6], model.latent_shape(), "cpu").draw()
    kwargs = dict(prompt=PROMPTS[:2], latents=x, height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                  max_sequence_length=64)
    tokens = pipe(**kwargs, output_type="latent").images
    images = pipe(**kwargs, output_type="pt").images
    latents = tokens.transpose(1, 2).reshape(x.shape)
    with torch.no_grad():
        ours = model.decode(latents)
        plain = model.vae.decode(pipe._unpatchify_latents(latents), return_dict=False)[0]
    torch.testing.assert_close(ours, images, rtol=0, atol=1e-5)
    assert ((plain / 2 + 0.5).clamp(0, 1) - images).abs().max() > 1e-2


def test_dev_takes_the_scale_as_an_input_not_a_second_pass(dev):
    model = load_model(str(dev), options=TINY)
    x = SampleNoise([0, 1], model.latent_shape(), "cpu").draw()
    t = torch.tensor(model.schedule(4).timesteps[1])
    with torch.no_grad():
        low, high = (model.denoise(x, t, model.conditioning(PROMPTS[:2], g)[0]) for g in (1.0, 4.0))
    assert model.guided_passes(4.0) == 1 and (low - high).abs().max() > 1e-4


def test_klein_guides_against_the_empty_prompt_only(klein):
    model = load_model(str(klein), options=TINY)
    cond, uncond = model.conditioning(PROMPTS[:2], 4.0)
    torch.testing.assert_close(uncond, model.conditioning(["", ""], 1.0)[0])
    assert "guidance" not in cond and model.guided_passes(4.0) == 2 and model.guided_passes(1.0) == 1
    with pytest.raises(UserError, match="empty prompt only"):
        model.conditioning(PROMPTS[:2], 4.0, negative_prompt="blurry")
    assert model.conditioning(PROMPTS[:2], 1.0, negative_prompt="blurry")[1] is None  # no guidance, nothing to refuse


def test_a_distilled_klein_ignores_guidance_as_its_pipeline_does(tmp_path):
    """`is_distilled` in model_index.json: one pass a step at any scale, the pipeline's latents."""
    from diffusers import Flux2KleinPipeline

    path = build_tiny(tmp_path, "flux2-klein", distilled=True)
    model = load_model(str(path), options=TINY)
    assert model.distilled and model.guided_passes(4.0) == 1 and model.conditioning(PROMPTS[:2], 4.0)[1] is None
    pipe = Flux2KleinPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    x = SampleNoise([3, 4], model.latent_shape(), "cpu").draw()
    with torch.no_grad():
        ours = sample_chain(guided(model.denoise, model.guidance(4.0, None), model.guide), x, model.schedule(4),
                            model.conditioning(PROMPTS[:2], 4.0))
    out = pipe(prompt=PROMPTS[:2], latents=x, height=32, width=32, num_inference_steps=4, guidance_scale=4.0,
               max_sequence_length=64, output_type="latent").images  # denormalised and unpatchified
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var + pipe.vae.config.batch_norm_eps).view(1, -1, 1, 1)
    theirs = (pipe._patchify_latents(out) - bn.running_mean.view(1, -1, 1, 1)) / std
    assert (ours - theirs).abs().max() <= 2e-5


@pytest.mark.parametrize("family, name", [("flux2", "FLUX.2"), ("flux2-klein", "FLUX.2 [klein]")])
def test_train_needs_only_the_folder_and_a_reward(dev, klein, family, name, capsys):
    """The family's defaults fill the rest (the pipeline's 50 steps and scale 4) and the dry
    run estimates the folder at its native size through the adapter."""
    folder = dev if family == "flux2" else klein
    assert main(["train", f"model={folder}", "reward=brightness", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"sampling.num_steps=50: the {name} family's default" in out
    assert f"sampling.guidance_scale=4.0: the {name} family's default" in out
    assert "at 32x32" in out and "estimated peak accelerator memory" in out


@pytest.mark.parametrize("distilled", [True, False])
def test_a_distilled_klein_folder_defaults_to_its_four_steps(klein, tmp_path, distilled):
    """`is_distilled` in model_index.json (as the pipeline reads it) picks the distilled model
    cards' 4 steps; the base klein keeps the pipeline's 50 at scale 4."""
    import json
    import shutil

    from draft.defaults import resolve_sampling

    folder = tmp_path / "klein"
    shutil.copytree(klein, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": distilled}))
    sampling = resolve_sampling(str(folder))
    assert (sampling.num_steps, sampling.guidance_scale) == ((4, 1.0) if distilled else (50, 4.0))
    # Offline, a hub id draft knows reads draft's copy of its configs: klein 4B is the distilled one.
    assert resolve_sampling("black-forest-labs/FLUX.2-klein-4B").num_steps == 4


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux2", "flux2-klein"])
def test_the_cards_snippet_and_the_diffusers_export(dev, klein, family, tmp_path, monkeypatch):
    """A run's model card samples in plain diffusers with the run's prompt length (klein at a
    scale that guides); the exported diffusers file loads there and samples what the run's own
    LoRA samples."""
    import diffusers

    from draft.config import LogConfig, SamplingConfig, TrainConfig
    from draft.export import export
    from draft.trainer import train

    from test_card import run_card_snippet

    folder = dev if family == "flux2" else klein
    run = train(TrainConfig(model=str(folder), reward="brightness", prompts=PROMPTS[0], eval_prompts=PROMPTS[1],
                            steps=1, batch_size=1, lr=0.05, output_dir=str(tmp_path / "runs"), name="f",
                            model_options=TINY, sampling=SamplingConfig(num_steps=3, guidance_scale=3.0),
                            log=LogConfig(sample_prompts=1, sample_seeds=1, checkpoint_every=0, eval_samples=0,
                                          trackers=())), progress=False)
    code = run_card_snippet(run, tmp_path, monkeypatch)
    cls = "Flux2Pipeline" if family == "flux2" else "Flux2KleinPipeline"
    assert f"{cls}.from_pretrained" in code and "max_sequence_length=64" in code and "guidance_scale=3.0" in code
    assert (tmp_path / "sample.png").is_file()
    out = export(run, "diffusers", tmp_path / "exported.safetensors")
    images = []
    for lora in (run / "lora", out):
        pipe = getattr(diffusers, cls).from_pretrained(folder)
        pipe.load_lora_weights(lora.parent if lora.suffix else lora, weight_name=lora.name if lora.suffix else None)
        images.append(pipe(prompt=PROMPTS[0], guidance_scale=3.0, height=32, width=32, num_inference_steps=3,
                           max_sequence_length=64, generator=torch.Generator().manual_seed(0),
                           output_type="pt").images)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-5)
    assert main(["export", str(run), "--format", "kohya"]) == 2  # a UNet format: refused in one line
