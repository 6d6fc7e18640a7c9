"""The moving-shapes world: short clips of one shape of the shapes world, moving or still.

Every clip shows one shape of `draft.models.shapes` (its shapes, colours, sizes and
backgrounds) moving in a straight line at a steady speed, or staying where it is, and comes
with the prompt that says what moves and how::

    "a small red circle moving right on a blue background"
    "a large white star staying still on a black background"

Every frame of a clip is an image of the shapes world, so the shapes classifier reads each
frame, and the motion is what a video model must add. `shapes-video` is meant to be trained
on it, and the `shapes-motion` reward (`draft.rewards.shapes_motion`) scores clips against
its prompts.

Held-out prompts are the unseen combinations of what moves and how: the (shape, motion)
pairs in `HELDOUT_PAIRS` never appear in the `train` split, though every shape and every
motion does. Clips default to 9 frames of 32 px: the Wan VAE keeps 1 + 4k frames (9 frames
are 3 latent frames) and shapes-video's divides the side by 4, so one clip is a 3x8x8
latent, small enough to train on a CPU.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from draft.models import shapes

MOTIONS = ("left", "right", "up", "down", "still")
# The two words each motion takes in a prompt, after the shape.
PHRASES = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
           "still": "staying still"}
# The unit step of each motion, (x, y) with y pointing down as in the frames.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
# Each shape is held out with one motion and each motion with one or two shapes, so every
# word is still seen in training and only the pairing is new.
HELDOUT_PAIRS = frozenset(
    {
        ("circle", "up"),
        ("square", "left"),
        ("triangle", "down"),
        ("cross", "right"),
        ("diamond", "still"),
        ("star", "down"),
    }
)
SPLITS = shapes.SPLITS
PIPELINE_DIR = shapes.ASSETS / "shapes-video"
PROMPTS_DIR = PIPELINE_DIR / "prompts"  # the model's own prompt sets (draft.prompts)
DEFAULT_FRAMES = 9
DEFAULT_SIZE = shapes.DEFAULT_SIZE
# A moving shape travels this fraction of the room it has along its axis (drawn per clip):
# at least enough that a large shape, which has little room at 32 px, visibly moves.
TRAVEL = (0.6, 1.0)

MOTION_WORDS = tuple(dict.fromkeys(w for phrase in PHRASES.values() for w in phrase.split()))
VOCAB = shapes.VOCAB + MOTION_WORDS  # the words prompts are made of (a tokenizer is built from it)
# The attributes of a clip: the shapes world's, and the motion.
ATTRIBUTES: dict[str, tuple[str, ...]] = {**shapes.ATTRIBUTES, "motion": MOTIONS}


@dataclass(frozen=True, order=True)
class ClipAttributes(shapes.Attributes):
    """What one clip shows: the shapes world's attributes of every frame, and the motion."""

    motion: str = "still"

    def __post_init__(self):
        super().__post_init__()
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}; choose from {', '.join(MOTIONS)}")

    def frame(self) -> shapes.Attributes:
        """The attributes every frame shows, as an image of the shapes world."""
        return shapes.Attributes(self.shape, self.colour, self.background, self.size)

    def index(self) -> dict[str, int]:
        return {**super().index(), "motion": MOTIONS.index(self.motion)}


class Clips(NamedTuple):
    """Rendered clips of the world: videos, their prompts and their attributes."""

    videos: np.ndarray  # float32 [N, F, 3, H, W] in [0, 1]
    prompts: list[str]
    attributes: list[ClipAttributes]


def prompt_of(attrs: ClipAttributes) -> str:
    """'a {size} {colour} {shape} {moving <direction> | staying still} on a(n) {background} background'."""
    image = shapes.prompt_of(attrs.frame()).split()
    return " ".join(image[:4] + PHRASES[attrs.motion].split() + image[4:])


def _split_words(prompt: str) -> tuple[str, str]:
    """(the shapes-world prompt of the frames, the motion) of a prompt of this world."""
    words = prompt.lower().split()
    example = prompt_of(ClipAttributes("circle", "red", "blue", "small", "right"))
    strange = [w for w in words if w not in VOCAB]
    if strange:
        raise ValueError(f"not a moving-shapes prompt: unknown word(s) {', '.join(map(repr, strange))} in "
                         f"{prompt!r}; prompts look like {example!r}")
    motion = {v: k for k, v in PHRASES.items()}.get(" ".join(words[4:6]))
    if len(words) != 10 or motion is None:
        raise ValueError(f"not a moving-shapes prompt: {prompt!r}; expected 'a <size> <colour> <shape> "
                         f"<moving left|right|up|down, or staying still> on a <colour> background'")
    return " ".join(words[:4] + words[6:]), motion


def parse_prompt(prompt: str) -> ClipAttributes:
    """The attributes a prompt names; the inverse of `prompt_of`.

    Case and surrounding white space are ignored. Raises ValueError naming the unknown
    words, or the expected form, when the prompt is not one of this world's.
    """
    image, motion = _split_words(prompt)
    a = shapes.parse_prompt(image)
    return ClipAttributes(a.shape, a.colour, a.background, a.size, motion)


def frame_prompt(prompt: str) -> str:
    """The shapes-world prompt of a clip's frames: its prompt without the motion."""
    return _split_words(prompt)[0]


def split_of(attrs: ClipAttributes) -> str:
    """'heldout' if the (shape, motion) pair is held out of training, else 'train'."""
    return "heldout" if (attrs.shape, attrs.motion) in HELDOUT_PAIRS else "train"


def combinations(split: str = "all") -> list[ClipAttributes]:
    """Every attribute combination of a split, in a fixed (sorted) order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    every = (
        ClipAttributes(a.shape, a.colour, a.background, a.size, motion)
        for a, motion in itertools.product(shapes.combinations("all"), MOTIONS)
    )
    return sorted(a for a in every if split == "all" or split_of(a) == split)


def prompts(split: str = "train") -> list[str]:
    """The prompt set of a split ('train', 'heldout' or 'all'), one per combination, sorted."""
    return [prompt_of(a) for a in combinations(split)]


def prompt_file(split: str) -> Path:
    """The shipped text file of a split's prompts ('train' or 'heldout')."""
    return shapes.split_file(PROMPTS_DIR, split)


def write_prompt_files(directory: str | Path = PROMPTS_DIR) -> list[Path]:
    """Write the moving world's `train.txt` and `heldout.txt` into `directory`; returns their paths."""
    return shapes.write_split_files(directory, prompts)


def path_of(attrs: ClipAttributes, rng: np.random.Generator, r: float, frames: int, size: int) -> np.ndarray:
    """[F, 2]: the shape's centre (x, y) in pixels in each frame, the whole shape inside them all.

    A moving shape crosses `TRAVEL` of the room its reach leaves along its axis, at a
    steady speed, from a random start; the other coordinate stays put.
    """
    margin = shapes.REACH[attrs.shape] * r + 1.0  # one pixel of background beyond its farthest point
    room = size - 2 * margin
    start = rng.uniform(margin, size - margin, 2)
    step = np.asarray(DIRECTIONS[attrs.motion], dtype=np.float64)
    if attrs.motion != "still":
        travel = room * rng.uniform(*TRAVEL)
        axis = int(step[1] != 0)
        lo = margin + rng.uniform(0, room - travel)
        start[axis] = lo if step[axis] > 0 else lo + travel
        step = step * travel
    t = np.linspace(0.0, 1.0, frames)[:, None]
    return start + t * step


def render_clip(attrs: ClipAttributes, rng: np.random.Generator | int, frames: int = DEFAULT_FRAMES,
                size: int = DEFAULT_SIZE) -> np.ndarray:
    """One clip of `attrs`, float32 [frames, 3, size, size] in [0, 1].

    The radius (+-8%), the colour jitter and the path come from `rng` (a numpy Generator or
    an int seed) and hold for the whole clip, so only the position changes between frames.
    """
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {frames}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    fg, bg = shapes.jittered(attrs.colour, rng), shapes.jittered(attrs.background, rng)
    r = shapes.SIZE_RADIUS[attrs.size] * size * rng.uniform(0.92, 1.08)
    centres = path_of(attrs, rng, r, frames, size)
    return np.stack([shapes.paint(attrs.shape, tuple(c), r, fg, bg, size) for c in centres])


def draw_clips(n: int, seed: int = 0, split: str = "all", frames: int = DEFAULT_FRAMES,
               size: int = DEFAULT_SIZE) -> Clips:
    """`n` random clips of a split with their prompts and attributes, reproducible from `seed`."""
    combos = combinations(split)
    # A different stream per split, so 'train' and 'heldout' clips of one seed are unrelated.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    attrs = [combos[i] for i in rng.integers(len(combos), size=n)]
    empty = np.zeros((0, frames, 3, size, size), np.float32)
    videos = np.stack([render_clip(a, rng, frames, size) for a in attrs]) if n else empty
    return Clips(videos, [prompt_of(a) for a in attrs], attrs)
