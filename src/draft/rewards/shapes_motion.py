"""The moving-shapes world's reward and metrics (`draft.models.shapes_video`).

`shapes-motion` scores a clip against its prompt in two parts, both log-probabilities:

- what the frames show: the shapes classifier's log-probability of the prompt's shape,
  colour, background and size, averaged over the frames it is given (`shapes-alignment`
  on each frame; every frame of the world is an image of the shapes world);
- how it moves: the log-probability of the prompt's motion under a softmax over the five
  motions, whose logits come from the displacement d of a soft foreground centroid
  (`draft.rewards.motion.centroid_track`, blind to faint differences from the background:
  `FLOOR`) over the frames. A direction's logit is d along it, that of 'still' is
  3 `STILL` - 2 |d| (the two meet at |d| = `STILL`, and a still clip reads as still with
  probability 0.99), all over `TEMPERATURE`. A clip that moves the wrong way, or not at
  all, is pushed along the prompt's direction; one that already moves that way is left as
  it is (the softmax saturates), so the term does not reward flinging shapes out of frame.

The displacement is the least-squares slope of the track over the frames it is given,
times their number less one, so a reward that sees evenly spaced frames (`reward_frames`
with the 'even' choice) measures the clip's whole travel; with the 'first' frames it sees
the start of the travel only, and asks for faster motion.

The metrics (`motion_metrics`, the model's `metrics` in `draft eval`) read each clip as a
whole: an attribute is the class with the highest log-probability summed over frames, the
motion the most likely of the five, and 'joint' is shape, colour and motion all right.
`travel` is the mean displacement (in image sides) and `consistency` the fraction of
consecutive frame pairs in which the classifier reads the same shape and colour. Diversity
between seeds and the frame-difference motion figure are the evaluation's own
(`draft.evaluation`), for every model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from draft.errors import UserError
from draft.models import shapes, shapes_video
from draft.rewards import Reward
from draft.rewards.motion import centroid_track
from draft.rewards.shapes import ATTRIBUTES, ShapesAlignment, logits_of

MOTIONS = shapes_video.MOTIONS
# Unit vectors of the motions in image coordinates (x right, y down); 'still' has none.
_UNITS = torch.tensor([shapes_video.DIRECTIONS[m] for m in MOTIONS], dtype=torch.float32)
# A displacement shorter than this (in image sides) reads as 'still'. The world's shortest
# travel, a large star's with the least room, is twice it: 0.6 of (1 - 2 * (1.2 * 0.31 *
# 1.08 + 1 / 32)) of the side (`draft.models.shapes_video.path_of`).
STILL = 0.04
# Displacement, in image sides, that moves a motion's logit by one.
TEMPERATURE = 0.02
# Colour distance to the background below which a pixel hardly counts towards the centroid:
# half that of the world's closest colours (orange and yellow, 0.33 apart in [0, 1] RGB),
# so pixel noise and colour drift of a generated background do not move it.
FLOOR = 0.15
# Keeps the length of a zero displacement differentiable, in image sides.
_EPS = 0.005
JOINT = ("shape", "colour", "motion")  # what 'joint' accuracy asks to be right


def displacement(videos: torch.Tensor) -> torch.Tensor:
    """[B, 2]: how far the foreground's centroid travels over the frames, (x, y) in image sides.

    The least-squares slope of `centroid_track` (with `FLOOR`) over the frame index, times frames - 1:
    steady motion gives the first-to-last travel exactly, and a flickering frame moves it
    less than it would move the end points. Differentiable in the videos.
    """
    if videos.ndim != 5 or videos.shape[1] < 2:
        raise UserError(f"shapes-motion needs at least 2 frames of each video to see motion, got videos of "
                        f"shape {tuple(videos.shape)}; set reward_frames to 0 (all) or at least 2")
    track = centroid_track(videos, floor=FLOOR)  # [B, F, 2]
    f = track.shape[1]
    t = torch.arange(f, dtype=track.dtype, device=track.device) - (f - 1) / 2
    slope = (t[:, None] * (track - track.mean(1, keepdim=True))).sum(1) / t.square().sum()
    return slope * (f - 1)


def motion_logits(videos: torch.Tensor) -> torch.Tensor:
    """[B, 5]: the logits of `MOTIONS` (left, right, up, down, still) for each clip."""
    d = displacement(videos)
    along = d @ _UNITS[:4].to(d).T  # [B, 4]
    length = (d.square().sum(1, keepdim=True) + _EPS**2).sqrt()
    # 'still' beats a direction the clip moves along exactly when the length is under STILL.
    return torch.cat([along, 3 * STILL - 2 * length], 1) / TEMPERATURE


def _motion_targets(prompts: list[str], device) -> tuple[list[str], torch.Tensor]:
    """(the prompts of the frames, the motion's class index [B]) of moving-shapes prompts."""
    try:
        attrs = [shapes_video.parse_prompt(p) for p in prompts]
    except ValueError as e:
        raise UserError(f"shapes-motion scores moving-shapes prompts only: {e}") from None
    motion = torch.tensor([MOTIONS.index(a.motion) for a in attrs], device=device)
    return [shapes.prompt_of(a.frame()) for a in attrs], motion


class ShapesMotion(Reward):
    """Per-frame attribute log-probability (mean over frames) plus `motion_weight` times the
    log-probability of the prompt's motion; at most 0. Scores videos [B, F >= 2, 3, H, W].

    `attributes` are the classifier's attributes summed per frame (default all four);
    `motion_weight` scales the motion term (0 leaves the frames' attributes alone);
    `classifier` is a folder with another trained shapes classifier.
    """

    video = True  # the motion term needs the frames together

    def __init__(self, attributes: list[str] | tuple[str, ...] = ATTRIBUTES, motion_weight: float = 1.0,
                 classifier: str | None = None):
        super().__init__()
        self.frames = ShapesAlignment(attributes, classifier)
        self.motion_weight = float(motion_weight)
        self.freeze()

    def score(self, videos, prompts):
        frame_prompts, motion = _motion_targets(prompts, videos.device)
        looks = self.frames(videos, frame_prompts)  # an image reward on videos: the mean over frames
        moves = motion_logits(videos).log_softmax(1).gather(1, motion[:, None])[:, 0]
        return looks + self.motion_weight * moves

    def extra_repr(self) -> str:
        return f"motion_weight={self.motion_weight}"


def read_clips(videos: torch.Tensor, classifier: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The reading of each clip as class indices [B] per attribute and 'motion', with the
    per-frame readings [B, F] under 'frame_<attribute>'. No gradient."""
    b, f = videos.shape[:2]
    logits = logits_of(videos.flatten(0, 1), classifier)
    out = {}
    for name in ATTRIBUTES:
        logp = logits[name].log_softmax(1).view(b, f, -1)
        out[name] = logp.sum(1).argmax(1)
        out[f"frame_{name}"] = logp.argmax(2)
    with torch.no_grad():
        out["motion"] = motion_logits(videos.float()).argmax(1)
    return out


def _parse(prompts: list[str]) -> list[shapes_video.ClipAttributes]:
    try:
        return [shapes_video.parse_prompt(p) for p in prompts]
    except ValueError as e:
        raise UserError(f"the shapes-motion metrics read moving-shapes prompts only: {e}") from None


def _hits(read: dict[str, torch.Tensor], attrs: list[shapes_video.ClipAttributes]) -> dict[str, torch.Tensor]:
    hits = {}
    for name in (*ATTRIBUTES, "motion"):
        target = torch.tensor([a.index()[name] for a in attrs], device=read[name].device)
        hits[name] = (read[name] == target).cpu()
    hits["joint"] = torch.stack([hits[k] for k in JOINT]).all(0)
    return hits


def _consistency(read: dict[str, torch.Tensor]) -> torch.Tensor:
    same = [read[f"frame_{k}"][:, 1:] == read[f"frame_{k}"][:, :-1] for k in ("shape", "colour")]
    return (same[0] & same[1]).float().mean(1).cpu()


def motion_correct(videos: torch.Tensor, prompts: list[str], classifier: str | Path | None = None
                   ) -> dict[str, torch.Tensor]:
    """Per clip, whether each attribute and the motion are read right, plus 'joint' (`JOINT`
    all right): bool tensors [B] on the CPU, to concatenate over batches."""
    return _hits(read_clips(videos, classifier), _parse(prompts))


def consistency(videos: torch.Tensor, classifier: str | Path | None = None) -> torch.Tensor:
    """[B]: the fraction of consecutive frame pairs in which the classifier reads the same
    shape and colour (1 for a clip whose subject never changes)."""
    return _consistency(read_clips(videos, classifier))


def motion_metrics(videos: torch.Tensor, prompts: list[str], classifier: str | Path | None = None
                   ) -> dict[str, float]:
    """The model's figures for a batch of clips, means over the batch: 'accuracy_<attribute>'
    for shape, colour, background, size and motion ('accuracy_direction'), 'accuracy_joint',
    'travel' and 'consistency'."""
    attrs = _parse(prompts)
    read = read_clips(videos, classifier)
    hits = _hits(read, attrs)
    out = {f"accuracy_{'direction' if k == 'motion' else k}": v.float().mean().item() for k, v in hits.items()}
    with torch.no_grad():
        out["travel"] = displacement(videos.float()).norm(dim=1).mean().item()
    out["consistency"] = _consistency(read).mean().item()
    return out
