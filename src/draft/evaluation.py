"""Fixed-seed evaluation: score held-out prompts with fixed seeds, before and after training.

Every evaluation reports the reward's mean and spread, the real JPEG size of the images
(Pillow, quality 95), and a diversity figure: the mean pairwise RMS pixel distance between
images of the same prompt across seeds, so reward hacking and mode collapse show up as a
falling number. A model may add figures of its own (`model.metrics`: the shapes models
report the attribute classifier's accuracy).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from draft.config import SamplingConfig
from draft.rewards.jpeg import jpeg_bytes


def diversity(images: torch.Tensor, groups: Sequence[int]) -> float | None:
    """Mean over groups of the mean pairwise RMS distance between the group's images
    (None when no group has two images)."""
    by_group: dict[int, list[torch.Tensor]] = {}
    for image, g in zip(images.float(), groups):
        by_group.setdefault(g, []).append(image)
    values = [
        float((a - b).square().mean().sqrt())
        for members in by_group.values()
        for a, b in itertools.combinations(members, 2)
    ]
    return float(np.mean(values)) if values else None


@torch.no_grad()
def score(images: torch.Tensor, prompts: list[str], groups: Sequence[int], reward,
          model_metrics: Callable[[torch.Tensor, list[str]], dict] | None = None, device="cpu",
          batch_size: int = 16) -> dict:
    """The evaluation figures for already generated images (the reward runs on `device`),
    with the model's own metrics (`model.metrics`) where it has any."""
    chunks = range(0, len(prompts), batch_size)
    r = torch.cat([reward(images[i : i + batch_size].to(device), prompts[i : i + batch_size]).float().cpu() for i in chunks])
    out = {
        "n": len(prompts),
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std(unbiased=False)),
        # quality 95, the setting of the compressibility experiments (DDPO, DRaFT)
        "jpeg_kb": float(jpeg_bytes(images, quality=95).mean()) / 1024,
        "diversity": diversity(images, groups),
    }
    if model_metrics is not None:
        out.update(model_metrics(images, prompts))
    return out


def evaluate(
    model: str = "shapes-sd",
    reward: str | Callable = "shapes-alignment",
    prompts: str = "heldout",
    seeds: int = 4,
    loras: Sequence[tuple[str, float]] = (),
    sampling: SamplingConfig = SamplingConfig(),
    reward_args: dict | None = None,
    out: str | Path | None = None,
    device=None,
    max_prompts: int = 0,
) -> dict:
    """Generate every prompt with seeds 0..seeds-1 and score the images.

    Returns (and with `out`, writes as JSON) the figures of `score`.
    """
    from draft import rewards
    from draft.inference import generate
    from draft.lora import load_loras
    from draft.models import load_model
    from draft.prompts import load_prompts
    from draft.safeio import ensure_folder, write_text

    if out is not None:  # a folder that cannot be written fails now, not after sampling
        ensure_folder(Path(out).parent, "the evaluation results")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    r = rewards.from_config(reward, reward_args).to(device)
    prompt_list = load_prompts(prompts, model)
    if max_prompts:
        prompt_list = prompt_list[:max_prompts]
    m = load_model(model, device=device)
    load_loras(m, list(loras))
    all_prompts = [p for p in prompt_list for _ in range(seeds)]
    all_seeds = [s for _ in prompt_list for s in range(seeds)]
    groups = [g for g in range(len(prompt_list)) for _ in range(seeds)]
    images = generate(m, all_prompts, all_seeds, sampling)
    result = {"model": model, "loras": [list(x) for x in loras], "reward": str(reward), "prompts": prompts,
              "seeds": seeds, **score(images, all_prompts, groups, r, m.metrics, device)}
    if out is not None:
        write_text(out, json.dumps(result, indent=2) + "\n", "the evaluation results")
    return result
