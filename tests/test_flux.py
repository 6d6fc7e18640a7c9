"""FLUX.1 specifics: sizes in 16-pixel steps, the pipeline's own schedule, guidance as an input
of the model on dev (one transformer call per step, no unconditional pass), none on schnell,
and DDPO's stochastic sampler on a flow model. The shared behaviour (parity with
`FluxPipeline`, LoRA round trips, gradient windows) is in tests/test_families.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from draft.cli import main
from draft.config import LoraConfig
from draft.errors import UserError
from draft.lora import add_lora
from draft.methods import Batch, Sampler, truncated
from draft.models import load_model
from draft.models.base import Size
from draft.models.tiny import PROMPTS, build_tiny
from draft.rewards import FunctionReward
from draft.sampling import SampleNoise, guided, sample_chain

FAST = ["reward=brightness", "prompts=a small red circle|a green star", "eval_prompts=a green star", "steps=2",
        "batch_size=2", "sampling.num_steps=3", "log.eval_samples=0", "log.trackers=[]", "log.sample_prompts=1",
        "log.sample_seeds=1", "--no-progress"]


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("flux"), "flux")


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("flux_schnell"), "flux-schnell")


def _calls(model):
    """Record the keyword arguments of every transformer call."""
    calls = []
    model.denoiser.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


def test_sizes_must_be_multiples_of_16(dev, tmp_path, capsys):
    model = load_model(str(dev))
    assert model.vae_scale_factor == 8  # FLUX.1's compression, so the rule is the real model's
    assert model.latent_shape(Size(48, 64)) == (4, 6, 8)
    for h, w in [(40, 32), (32, 24), (33, 32)]:
        with pytest.raises(UserError, match=r"multiples of 16 pixels, got \d+x\d+"):
            model.latent_shape(Size(h, w))
    # through the CLI: 40 passes the config's multiple-of-8 check, the adapter refuses it
    code = main(["train", f"model={dev}", *FAST, "sampling.height=40", f"output_dir={tmp_path}", "name=x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "multiples of 16" in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("steps, height, width", [(4, 32, 32), (7, 32, 64), (28, 64, 48)])
def test_schedule_is_the_one_flux_pipeline_builds(dev, steps, height, width):
    """A linear sigma grid from 1 to 1/T, shifted by mu from the packed token count, exactly as
    `FluxPipeline.__call__` asks the scheduler for it."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    model = load_model(str(dev))
    cfg = model.scheduler_config
    tokens = (height // 16) * (width // 16)
    mu = calculate_shift(tokens, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"],
                         cfg["max_shift"])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = model.schedule(steps, Size(height, width))
    torch.testing.assert_close(torch.tensor(ours.timesteps), timesteps.float(), rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(ours.s + ours.s_prev[-1:]), scheduler.sigmas.double().float(),
                               rtol=0, atol=1e-7)
    assert ours.prediction_type == "flow"
    # the shift depends on the size: a larger image is noisier at the same step
    if (height, width) != (32, 32):
        assert ours.s[1] > model.schedule(steps, Size(32, 32)).s[1]


def test_guidance_reaches_the_transformer_on_dev(dev):
    model = load_model(str(dev))
    calls = _calls(model)
    x = SampleNoise([0, 1], model.latent_shape(), "cpu").draw()
    t = torch.tensor(model.schedule(4).timesteps[1])
    outs = {}
    with torch.no_grad():
        for scale in (1.0, 3.5):
            cond, uncond = model.conditioning(PROMPTS[:2], scale)
            assert uncond is None
            outs[scale] = model.denoise(x, t, cond)
            assert calls[-1]["guidance"].tolist() == [scale, scale]
            assert calls[-1]["hidden_states"].shape == (2, 4, 16)  # 2x2 tokens of 4 channels x 2x2 patches
    assert (outs[1.0] - outs[3.5]).abs().max() > 1e-4  # the embedding changes the prediction


def test_schnell_has_no_guidance_input_and_ignores_the_scale(schnell):
    model = load_model(str(schnell))
    calls = _calls(model)
    x = SampleNoise([0, 1], model.latent_shape(), "cpu").draw()
    t = torch.tensor(model.schedule(4).timesteps[1])
    with torch.no_grad():
        outs = [model.denoise(x, t, model.conditioning(PROMPTS[:2], scale)[0]) for scale in (1.0, 7.5)]
    assert model.conditioning(PROMPTS[:2], 7.5)[1] is None
    assert [c["guidance"] for c in calls] == [None, None]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_no_unconditional_pass(dev, use_checkpoint):
    """Sampling and a training step at guidance 3.5: one transformer call per step, each on the
    batch itself (classifier-free guidance would double the batch)."""
    model = load_model(str(dev))
    add_lora(model, LoraConfig(rank=2))
    calls = _calls(model)
    n, T, k = 2, 5, 2
    cond = model.conditioning(PROMPTS[:n], 3.5)
    with torch.no_grad():
        sample_chain(guided(model.denoise, 3.5), SampleNoise([0, 1], model.latent_shape(), "cpu").draw(),
               model.schedule(T), cond)
    assert [c["hidden_states"].shape[0] for c in calls] == [n] * T
    calls.clear()
    loop = Sampler(model, FunctionReward(lambda images, prompts: images.mean((1, 2, 3)), "brightness"),
                model.schedule(T), guidance_scale=3.5, use_checkpoint=use_checkpoint)
    batch = Batch(list(PROMPTS[:n]), SampleNoise([5, 6], model.latent_shape(), "cpu"),
                  np.random.default_rng(0), 0, 0)
    truncated(loop, batch, k).loss.backward()
    # checkpointing recomputes the k gradient steps in the backward pass
    assert [c["hidden_states"].shape[0] for c in calls] == [n] * (T + (k if use_checkpoint else 0))
    assert all(c["guidance"].tolist() == [3.5] * n for c in calls)


def test_ddpo_runs_on_flux(dev, tmp_path):
    """DDPO's stochastic steps (η > 0) are DDIM's family on x_t = (1-σ)·x_0 + σ·ε: they run on
    a flow model, with log-probabilities that carry gradient into the LoRA."""
    code = main(["train", f"model={dev}", *FAST, "method=ddpo", "sampling.eta=1", f"output_dir={tmp_path}",
                 "name=ddpo"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "ddpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "grad_norm" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in steps)
    assert (tmp_path / "ddpo" / "lora" / "pytorch_lora_weights.safetensors").is_file()
