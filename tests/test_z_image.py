"""Z-Image specifics: the pipeline's schedule, its guidance scale counted from 0 (Turbo's 0 is
one pass a step), its cfg_truncation and cfg_normalization options against the pipeline, and
the family's defaults. The shared behaviour (parity with `ZImagePipeline`, LoRA round trips,
gradient windows) is in tests/test_families.py."""

from __future__ import annotations

import pytest
import torch

from draft.cli import main
from draft.models import load_model
from draft.models.base import Size
from draft.models.tiny import PROMPTS, build_tiny
from draft.sampling import SampleNoise, guided, sample_chain


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("zimage"), "z-image")


@pytest.mark.parametrize("steps", [4, 9])
def test_schedule_is_the_one_z_image_pipeline_builds(zimage, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas, retrieve_timesteps

    model = load_model(str(zimage))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=get_default_z_image_sigmas(steps))
    ours = model.schedule(steps, Size(32, 64))
    torch.testing.assert_close(torch.tensor(ours.timesteps), timesteps.float(), rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(ours.s + ours.s_prev[-1:]), scheduler.sigmas.float(), rtol=0, atol=1e-7)


def _calls(model):
    calls = []
    model.denoiser.register_forward_pre_hook(lambda module, args, kwargs: calls.append(len(args[0])),
                                             with_kwargs=True)
    return calls


def test_guidance_zero_is_one_pass_and_g_is_cfg_at_g_plus_one(zimage):
    """The pipeline's g = 0 (Turbo) runs no unconditional pass; g > 0 guides as
    pos + g·(pos - neg)."""
    model = load_model(str(zimage))
    calls = _calls(model)
    x = SampleNoise([0, 1], model.latent_shape(), "cpu").draw()
    t = torch.tensor(model.schedule(4).timesteps[1])
    with torch.no_grad():
        cond, uncond = model.conditioning(PROMPTS[:2], 0.0)
        assert uncond is None
        guided(model.denoise, model.guidance(0.0, None), model.guide)(x, t, (cond, uncond))
        assert calls == [2]  # the batch itself
        cond, uncond = model.conditioning(PROMPTS[:2], 3.0)
        out = guided(model.denoise, model.guidance(3.0, None), model.guide)(x, t, (cond, uncond))
        pos, neg = model.denoise(x, t, cond), model.denoise(x, t, uncond)
    torch.testing.assert_close(out, pos + 3.0 * (pos - neg), rtol=0, atol=1e-5)


@pytest.mark.parametrize("options", [{"cfg_truncation": 0.5}, {"cfg_normalization": 1.0}])
def test_the_pipelines_guidance_options_sample_as_the_pipeline(zimage, options):
    """cfg_truncation (no guidance once (1000 - t) / 1000 passes it) and cfg_normalization (the
    guided norm capped at a multiple of the conditional one's): the same latents as
    `ZImagePipeline` called with the option."""
    from diffusers import ZImagePipeline

    model = load_model(str(zimage), options=options)
    pipe = ZImagePipeline.from_pretrained(zimage)
    pipe.set_progress_bar_config(disable=True)
    x = SampleNoise([3, 4], model.latent_shape(), "cpu").draw()
    with torch.no_grad():
        ours = sample_chain(guided(model.denoise, model.guidance(4.0, None), model.guide), x, model.schedule(6),
                            model.conditioning(PROMPTS[:2], 4.0))
    theirs = pipe(PROMPTS[:2], latents=x, height=32, width=32, num_inference_steps=6, guidance_scale=4.0,
                  output_type="latent", **model.pipeline_kwargs({}, options)).images
    plain = load_model(str(zimage))
    with torch.no_grad():
        unchanged = sample_chain(guided(plain.denoise, plain.guidance(4.0, None), plain.guide), x,
                                 plain.schedule(6), plain.conditioning(PROMPTS[:2], 4.0))
    assert (ours - theirs).abs().max() <= 2e-5
    assert (ours - unchanged).abs().max() > 1e-3  # the option does something here


def test_train_needs_only_the_folder_and_a_reward(zimage, capsys):
    """The tiny pipeline carries Turbo's scheduler (shift 3), so a bare folder trains at what
    Turbo samples with: 9 steps, one pass a step."""
    assert main(["train", f"model={zimage}", "reward=brightness", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sampling.num_steps=9: the Z-Image family's default (Z-Image-Turbo's model card" in out
    assert "sampling.guidance_scale=0.0: the Z-Image family's default (Z-Image-Turbo's model card" in out
    assert "at 32x32" in out and "estimated peak accelerator memory" in out


def _configs_only(folder, shift):
    """A Z-Image folder of configs alone (all the defaults read), its scheduler shifted by `shift`."""
    import json

    (folder / "scheduler").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": shift}))
    return str(folder)


@pytest.mark.parametrize("model, steps, guidance", [
    ("Tongyi-MAI/Z-Image-Turbo", 9, 0.0),  # offline: draft's copy of its configs (shift 3)
    ("shift 3", 9, 0.0),  # Turbo's scheduler, or a fine-tune of Turbo saved with it
    ("shift 6", 50, 5.0),  # the base Z-Image's: the pipeline's defaults
])
def test_turbo_is_told_from_the_base_model_by_its_scheduler(tmp_path, model, steps, guidance):
    from draft.config import SamplingConfig
    from draft.defaults import resolve_sampling

    if model.startswith("shift"):
        model = _configs_only(tmp_path / "pipeline", float(model.split()[1]))
    sampling = resolve_sampling(model)
    assert (sampling.num_steps, sampling.guidance_scale) == (steps, guidance)
    mine = resolve_sampling(model, SamplingConfig(num_steps=20, guidance_scale=4.0))  # the user's values win
    assert (mine.num_steps, mine.guidance_scale) == (20, 4.0)
