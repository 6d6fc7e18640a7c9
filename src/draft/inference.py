"""Fixed-seed image generation with the training sampler, and `draft sample`.

Image k of a call draws all its noise from its own stream, seeded with `seeds[k]`
(`draft.sampling.SampleNoise`, the rule training uses too): x_T is exactly
`torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))`, so the same
(prompt, seed) gives the same image before and after training, here and in a diffusers
pipeline given those latents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch

from draft.config import SamplingConfig
from draft.sampling import SampleNoise, guided, sample as run_sampler


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device) -> torch.Tensor:
    """x_T for each seed: the first draw of its stream, on the CPU so it is identical on every device."""
    return SampleNoise(seeds, shape, device).draw()


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampling: SamplingConfig = SamplingConfig(),
    batch_size: int = 16,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for N (prompt, seed) pairs, batched."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    schedule = model.schedule(sampling.num_steps, sampling.height, sampling.width)
    shape = model.latent_shape(sampling.height, sampling.width)
    denoise = guided(model.denoise, sampling.guidance_scale)
    merged = model.adapters_merged() if sampling.merge_lora else contextlib.nullcontext()
    out = []
    with merged:
        for lo in range(0, len(prompts), batch_size):
            out.append(_generate_batch(model, denoise, schedule, shape, prompts[lo : lo + batch_size],
                                       seeds[lo : lo + batch_size], sampling))
    return torch.cat(out)


def _generate_batch(model, denoise, schedule, shape, prompts, seeds, sampling) -> torch.Tensor:
    cond = model.conditioning(list(prompts), sampling.guidance_scale)
    noise = SampleNoise(seeds, shape, model.device)
    x0 = run_sampler(denoise, noise.draw(), schedule, cond, eta=sampling.eta, step_noise=lambda i: noise.draw())
    return model.decode(x0).float().cpu()


def sample(
    model: str = "shapes-sd",
    prompts: Sequence[str] = ("a small red circle on a blue background",),
    loras: Sequence[tuple[str, float]] = (),
    seed: int = 0,
    num_images: int = 1,
    sampling: SamplingConfig = SamplingConfig(),
    out: str | Path | None = None,
    device=None,
) -> torch.Tensor:
    """Generate `num_images` images per prompt (seeds seed, seed+1, ...) with LoRAs mixed in.

    `loras` is a list of (folder, scale). Returns the images; with `out`, also writes one
    PNG per image named `<index>-<seed>.png` and a `grid.png`.
    """
    from draft.lora import load_loras
    from draft.models import load_model
    from draft.report import save_grid, save_images
    from draft.safeio import ensure_folder

    if out is not None:  # a folder that cannot be written fails now, not after sampling
        ensure_folder(out, "the images")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = load_model(model, device=device)
    load_loras(m, list(loras))
    all_prompts = [p for p in prompts for _ in range(num_images)]
    seeds = [seed + j for _ in prompts for j in range(num_images)]
    images = generate(m, all_prompts, seeds, sampling)
    if out is not None:
        out = Path(out)
        save_images(images, out, [f"{k:03d}-{s}" for k, s in enumerate(seeds)])
        save_grid(images, out / "grid.png", ncol=num_images)
    return images
