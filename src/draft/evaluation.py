"""Fixed-seed evaluation: score held-out prompts with fixed seeds, before and after training.

Every evaluation reports the reward's mean and spread, the real JPEG size of the images
(Pillow, quality 95; of a video, its frames' mean), a diversity figure (the mean pairwise
RMS pixel distance between samples of the same prompt across seeds, so reward hacking and
mode collapse show up as a falling number) and, for videos, a motion figure (the mean
absolute change between consecutive frames, which falls when an image reward makes videos
static). A model may add figures of its own (`model.metrics`: the shapes models report
the attribute classifier's accuracy).

Samples are scored as each batch is generated and then dropped (`Tally`): 360 videos at
480p kept whole would take about 140 GB of host memory. Diversity needs the samples of a
prompt side by side, so only small copies are kept for it: images of at most 128 px a
side (the shapes models' 32 px images unchanged), videos as 4 frames of at most 64 px.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from draft.config import SamplingConfig
from draft.rewards.jpeg import jpeg_bytes

IMAGE_THUMB, VIDEO_THUMB, VIDEO_THUMB_FRAMES = 128, 64, 4


def diversity(images: torch.Tensor, groups: Sequence[int]) -> float | None:
    """Mean over groups of the mean pairwise RMS distance between the group's images
    (None when no group has two images)."""
    return _diversity({g: [image for image, h in zip(images.float(), groups) if h == g] for g in set(groups)})


def _diversity(by_group: dict[int, list[torch.Tensor]]) -> float | None:
    values = [
        float((a - b).square().mean().sqrt())
        for members in by_group.values()
        for a, b in itertools.combinations(members, 2)
    ]
    return float(np.mean(values)) if values else None


def thumbnail(samples: torch.Tensor) -> torch.Tensor:
    """Small float16 copies for the diversity figure: images area-averaged to at most 128 px a
    side, videos to 4 evenly spaced frames of at most 64 px."""
    if samples.ndim == 5:
        from draft.video import strip_frames

        samples = samples[:, strip_frames(samples.shape[1], VIDEO_THUMB_FRAMES)]
        side = VIDEO_THUMB
    else:
        side = IMAGE_THUMB
    h, w = samples.shape[-2:]
    factor = -(-max(h, w) // side)  # ceil
    if factor > 1:
        flat = samples.reshape(-1, *samples.shape[-3:]).float()
        flat = torch.nn.functional.avg_pool2d(flat, factor, ceil_mode=True)
        samples = flat.reshape(*samples.shape[:-2], *flat.shape[-2:])
    return samples.to(torch.float16)


class Tally:
    """The running figures of an evaluation; `add` a batch at a time, then `result`."""

    def __init__(self, reward, model_metrics: Callable | None = None, device="cpu", frames=None):
        self.reward, self.model_metrics, self.device, self.frames = reward, model_metrics, device, frames
        self.rewards: list[torch.Tensor] = []
        self.jpeg: list[torch.Tensor] = []
        self.motion: list[torch.Tensor] = []
        self.metric_sums: dict[str, float] = {}
        self.thumbs: dict[int, list[torch.Tensor]] = {}
        self.n = 0

    @torch.no_grad()
    def add(self, samples: torch.Tensor, prompts: list[str], groups: Sequence[int]) -> None:
        scored = samples if self.frames is None or samples.ndim == 4 else samples[:, list(self.frames)]
        self.rewards.append(self.reward(scored.to(self.device), list(prompts)).float().cpu())
        # quality 95, the setting of the compressibility experiments (DDPO, DRaFT)
        flat = samples.flatten(0, 1) if samples.ndim == 5 else samples
        self.jpeg.append(jpeg_bytes(flat, quality=95).view(len(prompts), -1).mean(1))
        if samples.ndim == 5:
            from draft.rewards.motion import frame_difference

            self.motion.append(frame_difference(samples.float()).cpu())
        if self.model_metrics is not None:
            for key, value in self.model_metrics(samples, list(prompts)).items():
                self.metric_sums[key] = self.metric_sums.get(key, 0.0) + float(value) * len(prompts)
        for thumb, g in zip(thumbnail(samples), groups):
            self.thumbs.setdefault(g, []).append(thumb)
        self.n += len(prompts)

    def result(self) -> dict:
        r = torch.cat(self.rewards)
        out = {
            "n": self.n,
            "reward_mean": float(r.mean()),
            "reward_std": float(r.std(unbiased=False)),
            "jpeg_kb": float(torch.cat(self.jpeg).mean()) / 1024,
            "diversity": _diversity({g: [t.float() for t in ts] for g, ts in self.thumbs.items()}),
        }
        if self.motion:
            out["motion"] = float(torch.cat(self.motion).mean())
        out.update({k: v / self.n for k, v in self.metric_sums.items()})
        return out


def score_batches(batches: Iterable[tuple[torch.Tensor, list[str], Sequence[int]]], reward,
                  model_metrics: Callable | None = None, device="cpu", frames=None) -> dict:
    """The evaluation figures of (samples, prompts, groups) batches, each dropped once scored."""
    tally = Tally(reward, model_metrics, device, frames)
    for samples, prompts, groups in batches:
        tally.add(samples, prompts, groups)
    return tally.result()


def evaluate_model(model, prompts: list[str], seeds: list[int], groups: list[int], reward, sampling: SamplingConfig,
                   device, frames=None, batch_size: int = 16) -> dict:
    """Generate (prompt, seed) pairs with `model` as it is and score them, a batch at a time."""
    from draft.inference import generate_batches

    chunks = range(0, len(prompts), batch_size)
    batches = zip(generate_batches(model, prompts, seeds, sampling, batch_size),
                  (prompts[i : i + batch_size] for i in chunks), (groups[i : i + batch_size] for i in chunks))
    return score_batches(batches, reward, model.metrics, device, frames)


# The sampling settings that change what an evaluation draws (0 for a size: the model's own).
SAMPLED_WITH = ("num_steps", "guidance_scale", "guidance_scale_2", "negative_prompt", "eta", "height", "width",
                "frames")


def evaluate(
    model: str = "shapes-sd",
    reward: str | Callable | None = None,
    prompts: str = "heldout",
    seeds: int = 4,
    loras: Sequence[tuple[str, float]] = (),
    sampling: SamplingConfig | None = None,
    reward_args: dict | None = None,
    out: str | Path | None = None,
    device=None,
    max_prompts: int = 0,
) -> dict:
    """Generate every prompt with seeds 0..seeds-1 and score the samples; `sampling` fields
    left None are the model's own (`draft.defaults.resolve_sampling`), and so is the reward
    when it is None (`draft.defaults.resolve_reward`: the model's recipe's, else shapes-alignment).

    Returns (and with `out`, writes as JSON) the figures of `Tally`, with the sampling
    settings they were drawn with (`SAMPLED_WITH`), so results of different defaults tell
    themselves apart.
    """
    from draft import rewards
    from draft.config import check_number
    from draft.defaults import resolve_reward, resolve_sampling
    from draft.lora import load_loras
    from draft.models import load_model
    from draft.prompts import load_prompts
    from draft.safeio import ensure_folder, write_text

    check_number("seeds", seeds, 1, None)
    check_number("max_prompts", max_prompts, 0, None)
    if sampling is not None:
        sampling.validate()
    if out is not None:  # a folder that cannot be written fails now, not after sampling
        ensure_folder(Path(out).parent, "the evaluation results")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reward = resolve_reward(model, reward)
    sampling = resolve_sampling(model, sampling)
    r = rewards.from_config(reward, reward_args).to(device)
    prompt_list = load_prompts(prompts, model)
    if max_prompts:
        prompt_list = prompt_list[:max_prompts]
    m = load_model(model, device=device)
    load_loras(m, list(loras))
    all_prompts = [p for p in prompt_list for _ in range(seeds)]
    all_seeds = [s for _ in prompt_list for s in range(seeds)]
    groups = [g for g in range(len(prompt_list)) for _ in range(seeds)]
    sampled_with = {k: getattr(sampling, k) for k in SAMPLED_WITH}
    result = {"model": model, "loras": [list(x) for x in loras], "reward": str(reward), "prompts": prompts,
              "seeds": seeds, "sampling": sampled_with,
              **evaluate_model(m, all_prompts, all_seeds, groups, r, sampling, device)}
    if out is not None:
        write_text(out, json.dumps(result, indent=2) + "\n", "the evaluation results")
    return result
