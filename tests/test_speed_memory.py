"""benchmarks/speed_memory.py's real-size presets of the families whose prompts a language
model reads (Qwen-Image, FLUX.2 dev and klein, Z-Image-Turbo): each builds from draft's copy of
its configs with nothing downloaded, at the steps and guidance its family samples with, and
takes a training step, here on the meta device (real shapes, no storage)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from draft.models.tiny import PROMPTS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import real_size  # noqa: E402
import speed_memory  # noqa: E402

# preset -> (its diffusers pipeline, steps and guidance it samples at, denoiser passes a step)
NEW = {
    "qwen-image": ("QwenImagePipeline", 50, 4.0, 2),  # true CFG: two passes
    "flux2-dev": ("Flux2Pipeline", 50, 4.0, 1),  # the guidance embedding
    "flux2-klein-4b": ("Flux2KleinPipeline", 4, 1.0, 1),  # step-distilled: no guidance
    "z-image-turbo": ("ZImagePipeline", 9, 0.0, 1),  # Turbo's card: unguided
}


@pytest.mark.parametrize("pipeline", sorted({v[0] for v in NEW.values()}))
def test_the_tokenizer_stand_in_is_the_tiny_pipelines_at_the_real_length(pipeline, tmp_path):
    """The benchmark's tokenizer renders and splits a prompt as the tiny pipeline's does (whose
    encoding tests/test_families.py checks against the pipeline), at the real config's length."""
    from draft.models.architectures import write_configs
    from draft.models.tiny import TINY

    hub_id = next(speed_memory.REAL[p][0] for p, v in NEW.items() if v[0] == pipeline)
    configs = write_configs(hub_id, tmp_path / "configs")
    stand_in = real_size.random_part(configs / "tokenizer", "tokenizer", ["transformers", "x"], "cpu",
                                     torch.float32, pipeline)
    family = {"QwenImagePipeline": "qwen-image", "Flux2Pipeline": "flux2", "Flux2KleinPipeline": "flux2-klein",
              "ZImagePipeline": "z-image"}[pipeline]
    tiny = TINY[family](tmp_path).tokenizer
    messages = [{"role": "user", "content": PROMPTS[0]}]
    if tiny.chat_template:
        text = tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert stand_in.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    else:  # QwenImagePipeline writes its template itself
        text = f"<|im_start|>system\nDescribe the image<|im_end|>\n<|im_start|>user\n{PROMPTS[0]}<|im_end|>"
    assert stand_in(text).input_ids == tiny(text).input_ids
    assert len(stand_in(text).input_ids) < len(text) / 3  # whole words, not bytes
    assert stand_in.model_max_length > 1024  # the real tokenizer's, not the toy 64


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(NEW))
def test_each_new_preset_builds_and_takes_a_step(preset, tmp_path):
    """The preset's pipeline at its real size on the meta device, checkpointed block by block,
    the benchmark's LoRA, one DRaFT-1 step of two sampling steps: every LoRA parameter gets a
    gradient. The prompts'
    embeddings are meta tensors of the family's shapes (a language model cannot run on meta)."""
    from draft.config import LoraConfig, SamplingConfig, TrainConfig
    from draft.lora import add_lora
    from draft.methods import METHODS, Batch, Sampler, SampleNoise
    from draft.models.base import Size
    from draft.models.memory import checkpoint_blocks

    pipeline, steps, guidance, passes = NEW[preset]
    recipe = speed_memory._recipe(preset)
    assert (recipe.num_steps, recipe.guidance_scale) == (steps, guidance)
    model = speed_memory.load(preset, tmp_path, "meta", torch.bfloat16)
    assert model.pipeline_class == pipeline and model.guided_passes(guidance) == passes
    calls = []
    model.denoiser.register_forward_hook(lambda *_: calls.append(1))

    def conditioning(prompts, scale, size=None, negative_prompt=""):
        uncond = model.meta_conditioning(len(prompts), torch.bfloat16) if passes > 1 else None
        return model.meta_conditioning(len(prompts), torch.bfloat16), uncond

    model.conditioning = conditioning
    checkpoint_blocks(model)  # --block-checkpoint, which the ready commands pass
    params = add_lora(model, LoraConfig(rank=8, target_modules=("to_q", "to_k", "to_v", "to_out.0")))
    size = model.size(Size(*speed_memory.REAL[preset][1]))
    assert (size.height, size.width) == (1024, 1024)
    loop = Sampler(model, lambda images, prompts: images.mean((1, 2, 3)), model.schedule(2, size), guidance,
                   0.0, True, False, 0.0, False, size=size)
    cfg = TrainConfig(method="draft-k", k=1, batch_size=1, lora=LoraConfig(rank=8),
                      sampling=SamplingConfig(num_steps=2, guidance_scale=guidance, height=1024, width=1024))
    noise = SampleNoise([0], model.latent_shape(size), "meta")
    out = METHODS["draft-k"](loop, Batch(PROMPTS[:1], noise, np.random.default_rng(0)), cfg)
    assert len(calls) == 2  # one call a sampling step, a guided one's passes batched into it
    out.loss.backward()
    assert out.loss.shape == () and all(p.grad is not None and p.grad.shape == p.shape for p in params)


def test_text_encoders_cache_encodes_the_benchmark_prompts_once_and_releases_them():
    """`--text-encoders cache` (for the families whose encoders do not fit beside the denoiser):
    the step reads the prompts' embeddings from the cache, equal to a fresh encoding, and the
    encoders hold no memory."""
    import argparse
    import tempfile

    args = argparse.Namespace(preset="tiny", device="cpu", bf16=False, batch=2, targets="to_q,to_k,to_v,to_out.0",
                              text_encoders="cache", block_checkpoint=False, size="")
    bench = speed_memory.Bench(args, Path(tempfile.mkdtemp()))
    fresh = speed_memory.load("tiny", Path(tempfile.mkdtemp()), "cpu", torch.float32)
    cond, uncond = bench.model.conditioning(bench.prompts, bench.guidance, bench.size, "")
    want, want_uncond = fresh.conditioning(bench.prompts, bench.guidance, bench.size, "")
    assert torch.equal(cond, want) and torch.equal(uncond, want_uncond)
    assert all(p.is_meta for p in bench.model.pipe.text_encoder.parameters())


def test_size_reaches_the_case_and_its_step_trains_the_lora(tmp_path):
    """`--size` (how a real-size preset runs on the CPU): the case samples and trains at that size,
    records a finite loss a step, and the step moves the LoRA."""
    import argparse

    args = argparse.Namespace(preset="tiny", device="cpu", bf16=False, batch=1, targets="to_q,to_k,to_v,to_out.0",
                              text_encoders="device", block_checkpoint=False, size="48x64",
                              decode_checkpoint=False, repeats=1)
    bench = speed_memory.Bench(args, tmp_path)
    native = bench.model.size()
    assert (bench.size.height, bench.size.width) == (48, 64) != (native.height, native.width)
    seen = []
    bench.model.denoiser.register_forward_pre_hook(
        lambda _m, a, kw: seen.append(tuple((a[0] if a else kw["sample"]).shape[-2:])), with_kwargs=True)
    r = bench.case("draft-k", {"k": 1}, 2)
    f = bench.model.vae_scale_factor
    assert set(seen) == {(48 // f, 64 // f)}  # every denoiser call, sampling and training, at that size
    assert (r["height"], r["width"], r["frames"]) == (48, 64, 0)
    assert len(r["loss"]) == 2 and all(np.isfinite(r["loss"])) and r["lora_max_change"] > 0


def test_size_keeps_a_video_presets_frames_and_rejects_a_bad_value():
    own = speed_memory.requested_size("wan21-1.3b")
    assert (own.height, own.width) == speed_memory.REAL["wan21-1.3b"][1][:2]
    small = speed_memory.requested_size("wan21-1.3b", "128")
    assert (small.height, small.width, small.frames) == (128, 128, own.frames)
    wide = speed_memory.requested_size("sdxl", "128x192")
    assert (wide.height, wide.width) == (128, 192)
    with pytest.raises(SystemExit, match="N or HxW"):
        speed_memory.requested_size("sdxl", "big")


def test_the_cpu_peak_is_the_steps_not_an_earlier_high():
    """A buffer freed before the reset (as the released text encoders) is not in the peak; one
    allocated after it is."""
    big = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    before = speed_memory.peak_rss_bytes()
    del big
    speed_memory.reset_peak_rss()
    assert speed_memory.peak_rss_bytes() < before - 32 * 2**20
    # Above glibc's largest mmap threshold (32 MiB on 64-bit) the buffer is always fresh pages; a
    # smaller one can be served from heap pages an earlier test freed and that are still resident.
    base = speed_memory.rss_bytes()
    after = torch.ones(48 * 2**20, dtype=torch.uint8)
    assert speed_memory.peak_rss_bytes() - base >= 40 * 2**20
    del after
