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


def save_images(images: torch.Tensor, folder: Path, names: Sequence[str], upscale: bool = False) -> list[Path]:
    """One PNG per image, `NAME.png`; with `upscale`, enlarged as `grid` enlarges tiny images."""
    from draft.safeio import atomic_write

    written = []
    for image, name in zip(images, names):
        if upscale:
            image = grid(image[None], 1, pad=0)
        pil = to_pil(image)
        written.append(atomic_write(folder / f"{name}.png", lambda tmp: pil.save(tmp, format="PNG"), "an image"))
    return written


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


def save_grid(samples: torch.Tensor, path: Path, ncol: int) -> Path:
    """The grid of images (one column per prompt, `ncol` of them) as a PNG; of videos, a
    frame strip (one row per sample, evenly spaced frames) and an animated GIF beside it."""
    from draft.safeio import atomic_write

    if samples.ndim == 5:
        from draft import video

        video.save_animation(video.animated_grid(samples.float().cpu(), ncol), path.with_suffix(".gif"), upscale=1)
        return video.save_frame_strip(samples.float().cpu(), path)
    image = to_pil(grid(samples.float().cpu(), ncol))
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


def grid_image(samples: torch.Tensor, ncol: int) -> torch.Tensor:
    """What `save_grid` draws, as one image: the grid of images, or the videos' frame strip."""
    if samples.ndim == 5:
        from draft.video import frame_strip

        return frame_strip(samples.float().cpu())
    return grid(samples.float().cpu(), ncol)


def _stacked(top, bottom):
    """Two PIL images one above the other, labelled "before" and "after"."""
    from PIL import Image, ImageDraw

    label = 14
    canvas = Image.new("RGB", (max(top.width, bottom.width), 2 * label + top.height + bottom.height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 1), "before", fill="black")
    canvas.paste(top, (0, label))
    draw.text((4, label + top.height + 1), "after", fill="black")
    canvas.paste(bottom, (0, 2 * label + top.height))
    return canvas


def save_before_after(before_png: Path, after: torch.Tensor, path: Path, ncol: int) -> None:
    """The "before" grid (step 0) above the "after" grid, same prompts and seeds, labelled;
    for videos also an animated one (`.gif`) from the two animated grids."""
    from PIL import Image, ImageSequence

    from draft.safeio import atomic_write

    canvas = _stacked(Image.open(before_png).convert("RGB"), to_pil(grid_image(after, ncol)))
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"), "the before/after grid")
    before_gif = before_png.with_suffix(".gif")
    if after.ndim != 5 or not before_gif.is_file():
        return
    from draft.video import animated_grid

    first = Image.open(before_gif)
    frames = [f.convert("RGB") for f in ImageSequence.Iterator(first)]
    ms = first.info.get("duration", 62)
    after_frames = animated_grid(after.float().cpu(), ncol)
    both = [_stacked(b, to_pil(a)) for b, a in zip(frames, after_frames)]
    atomic_write(path.with_suffix(".gif"), lambda tmp: both[0].save(tmp, format="GIF", save_all=True,
                 append_images=both[1:], duration=ms, loop=0), "the animated before/after grid")


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
