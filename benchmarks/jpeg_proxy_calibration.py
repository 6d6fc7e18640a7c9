"""How well the differentiable JPEG proxy ranks images like the real codec.

Builds a varied, seeded set of 32x32 images and prints the Spearman correlation between
`draft.rewards.jpeg.jpeg_bits` (the estimate behind the jpeg-compressibility rewards) and
Pillow's JPEG byte size, over all of them and per group:

- render:  clean renders of the shapes world;
- sample:  samples of shapes-sd (50 DDIM steps, guidance 7.5) on train and held-out prompts;
- noise:   renders and samples with Gaussian noise of random strength (up to 0.25);
- blur:    noisy renders and samples blurred by a random amount (what smoothing does);
- colour:  samples with random contrast, gain and posterised (flattened) colours;
- tuned:   with `--lora DIR` (repeatable), samples of shapes-sd fine-tuned with each LoRA,
           e.g. on jpeg-compressibility and jpeg-incompressibility (the images the reward
           sees once training has moved the model).

    python benchmarks/jpeg_proxy_calibration.py [--model DIR] [--lora RUN/lora ...] [--per-group 64] [--quality 75]
"""

from __future__ import annotations

import argparse

import torch


def shapes_sd_samples(model: str | None, n: int, seed: int) -> torch.Tensor:
    from diffusers.utils import logging
    from transformers.utils import logging as tlogging

    for log in (logging, tlogging):  # before the pipeline import, which warns about torchvision
        log.set_verbosity_error()
        log.disable_progress_bar()
    from diffusers import StableDiffusionPipeline

    from draft.models import shapes
    pipe = StableDiffusionPipeline.from_pretrained(model or shapes.PIPELINE_DIR)
    pipe.set_progress_bar_config(disable=True)
    prompts = (shapes.prompts("train") + shapes.prompts("heldout"))[::7][:n]
    prompts += prompts[: n - len(prompts)]
    gen = torch.Generator().manual_seed(seed)
    out = [pipe(prompts[i : i + 16], num_inference_steps=50, guidance_scale=7.5, generator=gen,
                output_type="pt").images for i in range(0, n, 16)]
    return torch.cat(out).clamp(0, 1)


def tuned_samples(loras: list[str], n: int, seed: int) -> torch.Tensor:
    """n samples split evenly over the LoRAs, each on shapes-sd at scale 1."""
    from draft.config import SamplingConfig
    from draft.inference import generate
    from draft.lora import load_loras
    from draft.models import load_model, shapes

    prompts = (shapes.prompts("heldout") + shapes.prompts("train"))[::5]
    out = []
    for i, lora in enumerate(loras):
        m = len(range(i, n, len(loras)))
        model = load_model("shapes-sd", device="cpu")
        load_loras(model, [(lora, 1.0)])
        seeds = [seed * 1000 + i * 100 + j for j in range(m)]
        out.append(generate(model, prompts[:m], seeds, SamplingConfig()))
    return torch.cat(out).clamp(0, 1)


def calibration_set(model: str | None, per_group: int = 64, seed: int = 0, loras: list[str] = ()) -> dict[str, torch.Tensor]:
    """The seeded image groups described in the module docstring, [per_group, 3, 32, 32] each."""
    from draft.models import shapes
    from draft.models.shapes_classifier import blur

    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    renders = torch.from_numpy(shapes.draw_examples(per_group, seed=seed).images)
    samples = shapes_sd_samples(model, per_group, seed)
    mixed = torch.cat([renders[: per_group // 2], samples[: per_group - per_group // 2]])
    noisy = (mixed + 0.25 * rand(per_group, 1, 1, 1) * torch.randn(mixed.shape, generator=g)).clamp(0, 1)
    noisy_again = (mixed + 0.15 * rand(per_group, 1, 1, 1) * torch.randn(mixed.shape, generator=g)).clamp(0, 1)
    levels = (2 + 14 * rand(per_group, 1, 1, 1)).round()
    contrast = 0.5 + rand(per_group, 1, 1, 1)
    recoloured = ((samples - 0.5) * contrast + 0.5) * (0.8 + 0.4 * rand(per_group, 3, 1, 1))
    recoloured = (recoloured.clamp(0, 1) * levels).round() / levels
    groups = {
        "render": renders,
        "sample": samples,
        "noise": noisy,
        "blur": blur(noisy_again, 0.3 + 1.2 * rand(per_group)).clamp(0, 1),
        "colour": recoloured.clamp(0, 1),
    }
    if loras:
        groups["tuned"] = tuned_samples(list(loras), per_group, seed)
    return groups


def main() -> None:
    from draft.rewards.jpeg import jpeg_bits, jpeg_bytes, spearman

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a shapes-sd pipeline folder (default: the shipped one)")
    ap.add_argument("--lora", action="append", default=[], help="a trained LoRA folder; adds a 'tuned' group")
    ap.add_argument("--per-group", type=int, default=64)
    ap.add_argument("--quality", type=int, default=75)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    groups = calibration_set(args.model, args.per_group, args.seed, args.lora)
    with torch.no_grad():
        est = {k: jpeg_bits(v, args.quality) for k, v in groups.items()}
    real = {k: jpeg_bytes(v, args.quality) for k, v in groups.items()}
    n = sum(len(v) for v in groups.values())
    rho = spearman(torch.cat(list(est.values())), torch.cat(list(real.values())))
    print(f"Spearman rho (proxy vs Pillow JPEG bytes, quality {args.quality}) over {n} images: {rho:.3f}")
    for k in groups:
        print(f"  {k:7s} rho {spearman(est[k], real[k]):6.3f}   Pillow bytes {real[k].mean():7.1f} "
              f"(min {real[k].min():.0f}, max {real[k].max():.0f})")


if __name__ == "__main__":
    main()
