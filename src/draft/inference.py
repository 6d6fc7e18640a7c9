"""Fixed-seed generation with the training sampler, and `draft sample`.

Sample k of a call draws all its noise from its own stream, seeded with `seeds[k]`
(`draft.sampling.SampleNoise`, the rule training uses too): x_T is exactly
`torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))`, so the same
(prompt, seed) gives the same image or video before and after training, here and in a
diffusers pipeline given those latents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from draft.config import SamplingConfig
from draft.models.base import Size
from draft.sampling import SampleNoise, guided, sample_chain


BATCH = 16  # samples generated (and prompts encoded) at once


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device) -> torch.Tensor:
    """x_T for each seed: the first draw of its stream, on the CPU so it is identical on every device."""
    return SampleNoise(seeds, shape, device).draw()


def sample_size(sampling: SamplingConfig) -> Size:
    """The size a sampling config asks for (zeros: the model's native)."""
    return Size(sampling.height, sampling.width, sampling.frames or 0)


@torch.no_grad()
def generate(model, prompts: Sequence[str], seeds: Sequence[int], sampling: SamplingConfig | None = None,
             batch_size: int = BATCH) -> torch.Tensor:
    """Samples for N (prompt, seed) pairs, on the CPU: images [N, 3, H, W] or videos
    [N, F, 3, H, W] in [0, 1]."""
    return torch.cat(list(generate_batches(model, prompts, seeds, sampling, batch_size)))


@torch.no_grad()
def generate_batches(model, prompts: Sequence[str], seeds: Sequence[int], sampling: SamplingConfig | None = None,
                     batch_size: int = BATCH) -> Iterator[torch.Tensor]:
    """`generate`, one batch at a time, so that a caller can keep only what it needs of each."""
    from draft.defaults import resolve_sampling

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    sampling = resolve_sampling(model.name, sampling)
    size = model.size(sample_size(sampling))
    schedule = model.schedule(sampling.num_steps, size)
    shape = model.latent_shape(size)
    denoise = guided(model.denoise, model.guidance(sampling.guidance_scale, sampling.guidance_scale_2), model.guide)
    merged = model.adapters_merged() if sampling.merge_lora else contextlib.nullcontext()
    with merged:
        for lo in range(0, len(prompts), batch_size):
            batch = list(prompts[lo : lo + batch_size])
            cond = model.conditioning(batch, sampling.guidance_scale, size, sampling.negative_prompt)
            noise = SampleNoise(seeds[lo : lo + batch_size], shape, model.device)
            x0 = sample_chain(denoise, noise.draw(), schedule, cond, eta=sampling.eta, step_noise=lambda i: noise.draw())
            yield model.decode(x0).float().cpu()


def sample(
    model: str = "shapes-sd",
    prompts: Sequence[str] = ("a small red circle on a blue background",),
    loras: Sequence[tuple[str, float]] = (),
    seed: int = 0,
    num_images: int = 1,
    sampling: SamplingConfig | None = None,
    out: str | Path | None = None,
    device=None,
    fps: int = 0,
) -> torch.Tensor:
    """Generate `num_images` samples per prompt (seeds seed, seed+1, ...) with LoRAs mixed in.

    `loras` is a list of (folder, scale); `sampling` fields left None are the model's own
    (`draft.defaults.resolve_sampling`). Returns the samples; with `out`, also writes them
    (`save_samples`).
    """
    from draft.config import SEED_RANGE, check_number
    from draft.lora import load_loras
    from draft.models import load_model
    from draft.safeio import ensure_folder

    check_number("seed", seed, *SEED_RANGE)
    check_number("num_images", num_images, 1, None)
    check_number("fps", fps, 0, None)
    if sampling is not None:
        sampling.validate()
    if out is not None:  # a folder that cannot be written fails now, not after sampling
        ensure_folder(out, "the images")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = load_model(model, device=device)
    load_loras(m, list(loras))
    all_prompts = [p for p in prompts for _ in range(num_images)]
    seeds = [seed + j for _ in prompts for j in range(num_images)]
    samples = generate(m, all_prompts, seeds, sampling)
    if out is not None:
        save_samples(samples, Path(out), [f"{k:03d}-{s}" for k, s in enumerate(seeds)], num_images, fps or m.fps)
    return samples


def save_samples(samples: torch.Tensor, out: Path, names: Sequence[str], ncol: int, fps: int = 16) -> list[Path]:
    """Images as PNGs (and a nearest-neighbour enlargement of tiny ones, `NAME.preview.png`)
    and `grid.png`; videos as mp4s with an animated GIF preview each, a frame strip
    `grid.png` and an animated `grid.gif`. Returns the files written."""
    from draft.report import save_grid, save_images

    if samples.ndim == 5:
        from draft import video

        written = []
        for clip, name in zip(samples, names):
            written += [video.save_video(clip, out / f"{name}.mp4", fps), video.save_animation(clip, out / f"{name}.gif", fps)]
        return written + [save_grid(samples, out / "grid.png", ncol), out / "grid.gif"]
    written = save_images(samples, out, names)
    if max(samples.shape[-2:]) < 128:  # 32 px samples are too small to look at
        written += save_images(samples, out, [f"{n}.preview" for n in names], upscale=True)
    return written + [save_grid(samples, out / "grid.png", ncol=ncol)]
