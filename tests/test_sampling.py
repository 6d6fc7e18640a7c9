"""The sampler against diffusers' own DDIMScheduler and StableDiffusionPipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from draft.inference import generate, initial_noise
from draft.config import SamplingConfig
from draft.sampling import Schedule, guided, model_step, predict_x0_eps, renoise, sample_chain, sampler_step

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_each_ddim_step_matches_diffusers(prediction_type, spacing, eta):
    ddim = DDIMScheduler(**SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing)
    num_steps = 10
    ddim.set_timesteps(num_steps)
    schedule = Schedule.from_scheduler_config(ddim.config, num_steps)
    assert list(schedule.timesteps) == [int(t) for t in ddim.timesteps]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(ddim.timesteps):
        out = torch.randn(x.shape, generator=g)  # a stand-in model output
        z = torch.randn(x.shape, generator=g)
        expected = ddim.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        x0, eps = predict_x0_eps(out, x, schedule.a[i], schedule.s[i], prediction_type)
        sigma = schedule.sigma(i, eta)
        ours = sampler_step(x0, eps, schedule.a_prev[i], schedule.s_prev[i], sigma, z)
        # float64 noise levels against diffusers' float32: agreement to ~1e-5 relative.
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
        x = expected


def test_clip_sample_is_applied_like_ddim():
    ddim = DDIMScheduler(**{**SD_BETAS, "clip_sample": True}, clip_sample_range=1.0)
    ddim.set_timesteps(5)
    schedule = Schedule.from_scheduler_config(ddim.config, 5)
    x = torch.randn(1, 4, 8, 8) * 3
    out = torch.randn_like(x) * 3
    denoise = lambda x_, t_, c_: out  # noqa: E731
    _, x0, eps = model_step(denoise, x, 0, schedule, None)
    expected = ddim.step(out, ddim.timesteps[0], x, eta=0.0)
    torch.testing.assert_close(x0, expected.pred_original_sample, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sampler_step(x0, eps, schedule.a_prev[0], schedule.s_prev[0]), expected.prev_sample, rtol=1e-4, atol=1e-5)


def test_renoise_is_the_forward_process():
    ddim = DDIMScheduler(**SD_BETAS)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([21])
    expected = ddim.add_noise(x0, noise, t)
    bar = float(ddim.alphas_cumprod[21])
    torch.testing.assert_close(renoise(x0, bar**0.5, (1 - bar) ** 0.5, noise), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_v"])
def test_guided_loop_matches_the_diffusers_pipeline(fixture, request, prompts):
    """Same latents, same prompts: our sampler and StableDiffusionPipeline give the same images."""
    from draft.models import load_model

    path = request.getfixturevalue(fixture)
    model = load_model(str(path))
    cfg = SamplingConfig(num_steps=12, guidance_scale=5.0)
    seeds = [3, 4, 5, 6]
    ours = generate(model, prompts, seeds, cfg)

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = initial_noise(seeds, model.latent_shape(), "cpu")
    theirs = pipe(prompts, latents=latents, num_inference_steps=12, guidance_scale=5.0, output_type="pt").images
    # Tolerance: float32 arithmetic in a different order over 12 steps and a VAE decode.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)
    # and a single image with a seeded generator, the way users call the pipeline
    one = pipe(prompts[0], generator=torch.Generator().manual_seed(3), num_inference_steps=12,
               guidance_scale=5.0, output_type="pt").images
    torch.testing.assert_close(ours[:1], one, rtol=0, atol=2e-4)


class CountingDenoiser:
    """Records, for every call, whether its output is part of an autograd graph."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.carried_grad: list[bool] = []

    def __call__(self, x, t, cond):
        out = x * self.weight + 0.01 * cond
        self.carried_grad.append(out.requires_grad)
        return out


def _toy(num_steps=8):
    schedule = Schedule.from_scheduler_config(DDIMScheduler(**SD_BETAS).config, num_steps)
    return schedule, torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_exactly_the_last_k_calls_carry_gradient(k, use_checkpoint):
    schedule, x, cond = _toy(8)
    weight = torch.tensor(0.9, requires_grad=True)
    den = CountingDenoiser(weight)
    out = sample_chain(den, x, schedule, cond, grad_steps=range(8 - k, 8), use_checkpoint=use_checkpoint)
    out.sum().backward()
    forward_calls = den.carried_grad[:8]  # checkpointing adds recomputation calls after these
    assert forward_calls == [False] * (8 - k) + [True] * k
    assert weight.grad is not None and weight.grad != 0


def test_checkpointing_does_not_change_gradients(tiny_model, prompts):
    from draft.config import LoraConfig
    from draft.lora import add_lora

    params = add_lora(tiny_model, LoraConfig(rank=4))
    with torch.no_grad():  # move B off zero so every LoRA parameter gets a gradient
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    schedule = Schedule.from_scheduler_config(tiny_model.scheduler_config, 6)
    cond = tiny_model.conditioning(prompts[:2])
    x = initial_noise([0, 1], tiny_model.latent_shape(), "cpu")
    grads = []
    for use_checkpoint in (False, True):
        for p in params:
            p.grad = None
        x0 = sample_chain(guided(tiny_model.denoise, 3.0), x, schedule, cond, grad_steps=range(2, 6),
                    use_checkpoint=use_checkpoint)
        tiny_model.decode(x0).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_stochastic_sampling_needs_noise_passed_in():
    schedule, x, cond = _toy(4)
    with pytest.raises(ValueError, match="step_noise"):
        sample_chain(lambda x_, t, c: x_, x, schedule, cond, eta=1.0)
