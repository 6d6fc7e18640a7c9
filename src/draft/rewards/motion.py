"""Motion in videos: how much a clip moves, and where its foreground goes.

Differentiable functions of videos `[B, F, 3, H, W]` in [0, 1], for rewards and for
metrics of video models:

- `frame_difference`: the mean absolute change between consecutive frames, 'does it move
  at all'. A text-to-video model fine-tuned on an image reward applied per frame drifts
  towards still clips; this measures (and, as `MotionMagnitude`, rewards) the opposite.
- `centroid_track`: a soft foreground centroid per frame. Each pixel weighs by its colour
  distance to the frame's background (the median colour of its border), so the track
  moves with whatever differs from the background and has a gradient everywhere.
"""

from __future__ import annotations

import torch

from draft.rewards import Reward

# Keeps the colour distance differentiable where a pixel equals the background (the
# gradient of a plain Euclidean norm is undefined at 0); in units of [0, 1] colour.
_EPS = 1e-3
# How gradually a `floor` on the colour distance sets in, in the same units.
_SOFTNESS = 0.02


def frame_difference(videos: torch.Tensor) -> torch.Tensor:
    """[B]: mean over pixels, channels and frame pairs of |x_{f+1} - x_f|; 0 for a still clip.

    Plain absolute values, so a nearly still clip still gets a full-size gradient (a smoothed
    |.| would vanish exactly where the reward is needed most); a perfectly still clip has
    none, by symmetry.
    """
    if videos.ndim != 5 or videos.shape[1] < 2:
        raise ValueError(f"frame_difference needs videos [B, F >= 2, 3, H, W], got {tuple(videos.shape)}")
    return (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4))


def border_colour(videos: torch.Tensor) -> torch.Tensor:
    """[B, F, 3]: the per-channel median of each frame's one-pixel border, a background estimate."""
    border = torch.cat([videos[..., 0, :], videos[..., -1, :], videos[..., 1:-1, 0], videos[..., 1:-1, -1]], dim=-1)
    return border.median(dim=-1).values


def centroid_track(videos: torch.Tensor, background: torch.Tensor | None = None, floor: float = 0.0
                   ) -> torch.Tensor:
    """[B, F, 2]: each frame's soft foreground centroid (x, y), in [0, 1] of the width and height.

    x grows to the right and y downwards (pixel centres at (j + 0.5) / W, (i + 0.5) / H).
    A pixel's weight is its colour distance to the background, d = sqrt(|c - b|² + ε²) - ε:
    0 on the background, smooth everywhere. A `floor` > 0 counts only the distance beyond
    it, softly (0.02 · softplus((d - floor) / 0.02)), so that noise and drift on a large
    background do not outweigh a small foreground. `background` is a colour, [3], [B, 3] or
    [B, F, 3]; by default each frame's border median (`border_colour`), taken as a fixed
    reference (no gradient flows into it). A frame with no foreground has its centre as
    its centroid.
    """
    b, f, _, h, w = videos.shape
    if background is None:
        background = border_colour(videos.detach())
    bg = torch.as_tensor(background, dtype=videos.dtype, device=videos.device)
    if bg.ndim == 2:  # one colour per video
        bg = bg[:, None]
    bg = bg.expand(b, f, 3)
    dist2 = (videos - bg[..., None, None]).square().sum(2)  # [B, F, H, W]
    weight = (dist2 + _EPS**2).sqrt() - _EPS
    if floor > 0:
        weight = _SOFTNESS * torch.nn.functional.softplus((weight - floor) / _SOFTNESS)
    xs = (torch.arange(w, device=videos.device, dtype=videos.dtype) + 0.5) / w
    ys = (torch.arange(h, device=videos.device, dtype=videos.dtype) + 0.5) / h
    # The centre's weight: a tiny prior that only decides where an empty frame's centroid is.
    prior = 1e-6 * h * w
    total = weight.sum((2, 3)) + prior
    x = ((weight * xs).sum((2, 3)) + 0.5 * prior) / total
    y = ((weight * ys[:, None]).sum((2, 3)) + 0.5 * prior) / total
    return torch.stack([x, y], dim=-1)


class MotionMagnitude(Reward):
    """Mean absolute change between consecutive frames (`frame_difference`), in [0, 1]; 0 for a
    still clip. Scores videos [B, F, 3, H, W], not images."""

    video = True  # takes whole videos, not frames (`draft.rewards.Reward` checks the layout)

    def score(self, videos, prompts):
        return frame_difference(videos)
