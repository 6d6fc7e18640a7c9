"""What SDXL adds to the shared adapter: the micro-conditioning time ids, built from the sampling
size as the pipeline builds them, and a float32 VAE beside a half-precision UNet.

The conformance suite and the whole-run comparison against `StableDiffusionXLPipeline` at the
native size are in tests/test_families.py ("sdxl").
"""

from __future__ import annotations

import json

import pytest
import torch

from draft.models import load_model
from draft.models.base import Size
from draft.models.tiny import PROMPTS, build_tiny
from draft.sampling import SampleNoise, guided, sample_chain


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("sdxl"), "sdxl")


def _record_time_ids(unet, seen: list):
    """Record the time ids of every UNet call."""
    return unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].detach().clone()),
        with_kwargs=True)


def test_time_ids_match_the_pipeline_at_a_non_native_size(sdxl):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    height, width = 48, 24  # native is 32x32
    model = load_model(str(sdxl))
    assert model.resolution == 32
    prompts, steps, guidance = PROMPTS[:2], 3, 5.0
    ours_ids, theirs_ids = [], []
    hook = _record_time_ids(model.denoiser, ours_ids)
    x_T = SampleNoise([5, 6], model.latent_shape(Size(height, width)), "cpu").draw()
    f = model.vae_scale_factor
    assert x_T.shape == (2, 4, height // f, width // f)
    with torch.no_grad():
        ours = sample_chain(guided(model.denoise, guidance), x_T, model.schedule(steps, Size(height, width)),
                      model.conditioning(prompts, guidance))
    hook.remove()

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    hook = _record_time_ids(pipe.unet, theirs_ids)
    theirs = pipe(prompts, height=height, width=width, latents=x_T, num_inference_steps=steps,
                  guidance_scale=guidance, output_type="latent").images
    hook.remove()

    assert len(ours_ids) == len(theirs_ids) == steps
    expected = torch.tensor([[height, width, 0, 0, height, width]] * 4, dtype=torch.float32)  # (uncond, cond) x 2
    for a, b in zip(ours_ids, theirs_ids):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, expected, rtol=0, atol=0)
    assert (ours - theirs).abs().max() <= 1e-5


def _with_force_upcast(folder, value: bool):
    config = folder / "vae" / "config.json"
    data = json.loads(config.read_text())
    data["force_upcast"] = value
    config.write_text(json.dumps(data))


def test_vae_stays_float32_under_bf16_and_decodes(sdxl):
    _with_force_upcast(sdxl, True)
    model = load_model(str(sdxl), dtype=torch.bfloat16)
    assert model.vae.dtype == torch.float32
    assert model.weight_dtype == torch.bfloat16 and next(model.denoiser.parameters()).dtype == torch.bfloat16
    cond, uncond = model.conditioning(PROMPTS[:2], 5.0)
    x = SampleNoise([0, 1], model.latent_shape(), "cpu").draw()
    out = guided(model.denoise, 5.0)(x, torch.tensor(model.schedule(4).timesteps[0]), (cond, uncond))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    latents = x.clone().requires_grad_(True)
    images = model.decode(latents)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
    images.mean().backward()
    assert torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0
    # The decode is the float32 VAE's: the same as the float32 model's.
    reference = load_model(str(sdxl)).decode(x)
    torch.testing.assert_close(images.detach(), reference, rtol=0, atol=1e-5)


def test_vae_follows_the_training_dtype_without_force_upcast(sdxl, tmp_path):
    import shutil

    folder = tmp_path / "pipeline"
    shutil.copytree(sdxl, folder)
    _with_force_upcast(folder, False)
    model = load_model(str(folder), dtype=torch.bfloat16)
    assert model.vae.dtype == torch.bfloat16
    images = model.decode(SampleNoise([0], model.latent_shape(), "cpu").draw())
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_sizes_must_be_multiples_of_the_vae_factor(sdxl):
    from draft.errors import UserError

    model = load_model(str(sdxl))
    f = model.vae_scale_factor  # 4 for the tiny VAE, 8 for SDXL's
    assert model.latent_shape(Size(10 * f, 4 * f)) == (4, 10, 4)
    with pytest.raises(UserError, match=f"multiples of {f} pixels, got {10 * f + 2}x"):
        model.latent_shape(Size(10 * f + 2, 4 * f))
