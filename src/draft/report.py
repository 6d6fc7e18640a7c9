"""Pictures of a run: image grids and metric plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def save_images(images: torch.Tensor, folder: Path, names: Sequence[str]) -> None:
    from draft.safeio import atomic_write

    for image, name in zip(images, names):
        pil = to_pil(image)
        atomic_write(folder / f"{name}.png", lambda tmp: pil.save(tmp, format="PNG"), "an image")


def grid(images: torch.Tensor, ncol: int, pad: int = 2, upscale: int = 0) -> torch.Tensor:
    """Tile [N,3,H,W] images into one [3, H', W'] image, row-major, with a white border.

    Tiny images are enlarged by an integer factor (nearest neighbour) so they can be seen.
    """
    n, c, h, w = images.shape
    if upscale == 0:
        upscale = max(1, 128 // max(h, w))
    if upscale > 1:
        images = images.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
        h, w = h * upscale, w * upscale
    nrow = math.ceil(n / ncol)
    out = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for k, image in enumerate(images):
        r, col = divmod(k, ncol)
        out[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = image
    return out


def save_grid(images: torch.Tensor, path: Path, ncol: int) -> Path:
    from draft.safeio import atomic_write

    image = to_pil(grid(images.float().cpu(), ncol))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), "a sample grid")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_file: Path, out_dir: Path) -> list[Path]:
    """reward.png (mean ± std against steps) and training.png (loss, grad norm, lr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_file) if "reward_mean" in r]
    if not rows:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    step = np.array([r["step"] for r in rows])
    mean = np.array([r["reward_mean"] for r in rows])
    std = np.array([r["reward_std"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(step, mean, label="reward (batch mean)")
    ax.fill_between(step, mean - std, mean + std, alpha=0.2, label="± batch std")
    if len(mean) >= 10:
        k = max(len(mean) // 20, 2)
        smooth = np.convolve(mean, np.ones(k) / k, mode="valid")
        ax.plot(step[k - 1 :], smooth, label=f"running mean ({k} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = [out_dir / "reward.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key in zip(axes, ("loss", "grad_norm", "lr")):
        ax.plot(step, [r.get(key, np.nan) for r in rows])
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "training.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def save_before_after(before_png: Path, after: torch.Tensor, path: Path, ncol: int) -> None:
    """The "before" grid (step 0) above the "after" grid, same prompts and seeds, labelled."""
    from PIL import Image, ImageDraw

    top = Image.open(before_png).convert("RGB")
    bottom = to_pil(grid(after.float(), ncol))
    label = 14
    width = max(top.width, bottom.width)
    canvas = Image.new("RGB", (width, 2 * label + top.height + bottom.height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 1), "before", fill="black")
    canvas.paste(top, (0, label))
    draw.text((4, label + top.height + 1), "after", fill="black")
    canvas.paste(bottom, (0, 2 * label + top.height))
    from draft.safeio import atomic_write

    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"), "the before/after grid")


def summary(result: dict) -> str:
    """'key value, ...' for an evaluation's figures, for one printed line."""
    keys = [k for k in result if k != "n" and result[k] is not None]
    return ", ".join(f"{k} {result[k]:.4g}" if isinstance(result[k], float) else f"{k} {result[k]}" for k in keys)


def comparison(before: dict | None, after: dict, title: str) -> str:
    """A two-column table of the figures evaluations share, before and after training."""
    before = before or {}
    rows = [f"{title:<28}{'before':>10}{'after':>10}"]
    for key, value in after.items():
        if key == "n" or not isinstance(value, float):
            continue
        old = before.get(key)
        old_s = f"{old:>10.4g}" if isinstance(old, float) else f"{'-':>10}"
        rows.append(f"{key:<28}{old_s}{value:>10.4g}")
    return "\n".join(rows)
