"""The shapes world: seeded images of one coloured shape on a plain background, with prompts.

Every image shows one shape (circle, square, triangle, cross, diamond or star) of one
colour, small or large, at a random position, on a background of another colour, and
comes with the prompt that describes it::

    "a small red circle on a blue background"

The world is small enough to learn on a CPU in minutes, yet has the structure a text-to-
image reward needs: four attributes a classifier can check, and held-out attribute
combinations to measure generalisation. `shapes-sd` (the embedded default model) is
trained on it, and the `shapes-alignment` reward scores images against its prompts.

Held-out prompts are the unseen combinations: the (shape, colour) pairs in
`HELDOUT_PAIRS` never appear in the `train` split, though every shape and every colour
does. Rendering is anti-aliased by drawing at `SUPERSAMPLE` times the resolution and
averaging, in numpy, with no external assets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")
# Colours far apart in RGB, so they stay distinct after a small VAE and colour jitter.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 50),
    "green": (40, 160, 65),
    "cyan": (40, 200, 215),
    "blue": (40, 85, 215),
    "purple": (140, 60, 185),
    "pink": (245, 130, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
# Half-extent of a shape as a fraction of the image side, before a +-8% jitter.
SIZE_RADIUS = {"small": 0.17, "large": 0.31}
# Each colour is held out with one shape and each shape with one or two colours, so every
# word is still seen in training and only the pairing is new.
HELDOUT_PAIRS = frozenset(
    {
        ("circle", "green"),
        ("circle", "pink"),
        ("square", "yellow"),
        ("square", "black"),
        ("triangle", "blue"),
        ("triangle", "white"),
        ("cross", "red"),
        ("diamond", "orange"),
        ("diamond", "cyan"),
        ("star", "purple"),
    }
)
SPLITS = ("train", "heldout", "all")
# Shipped with the package: the pipeline, the attribute classifier and the prompt sets.
ASSETS = Path(__file__).resolve().parents[1] / "assets"
PIPELINE_DIR = ASSETS / "shapes-sd"
CLASSIFIER_DIR = ASSETS / "shapes-classifier"
PROMPTS_DIR = PIPELINE_DIR / "prompts"  # the model's own prompt sets (draft.prompts)
SUPERSAMPLE = 4
COLOUR_JITTER = 10  # max per-channel offset of a drawn colour, in 0..255 units
DEFAULT_SIZE = 32

# The words prompts are made of, in a fixed order (the tokenizer is built from this).
TEMPLATE_WORDS = ("a", "an", "on", "background")
VOCAB = TEMPLATE_WORDS + SIZES + COLOUR_NAMES + SHAPES

# The attributes a classifier predicts, with their classes in a fixed order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "background": COLOUR_NAMES,
    "size": SIZES,
}


@dataclass(frozen=True, order=True)
class Attributes:
    """What one image shows: the shape, its colour and size, and the background colour."""

    shape: str
    colour: str
    background: str
    size: str

    def __post_init__(self):
        for name, classes in ATTRIBUTES.items():
            if getattr(self, name) not in classes:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(classes)}")
        if self.colour == self.background:
            raise ValueError(f"the shape and the background are both {self.colour}; they must differ")

    def index(self) -> dict[str, int]:
        """Class index of each attribute, as the classifier numbers them."""
        return {name: classes.index(getattr(self, name)) for name, classes in ATTRIBUTES.items()}


class Examples(NamedTuple):
    """Rendered scenes of the world: images, their prompts and their attributes."""

    images: np.ndarray  # float32 [N, 3, H, W] in [0, 1]
    prompts: list[str]
    attributes: list[Attributes]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def prompt_of(attrs: Attributes) -> str:
    """The prompt that describes `attrs`: 'a {size} {colour} {shape} on a(n) {background} background'."""
    return f"a {attrs.size} {attrs.colour} {attrs.shape} on {_article(attrs.background)} {attrs.background} background"


def parse_prompt(prompt: str) -> Attributes:
    """The attributes a prompt names; the inverse of `prompt_of`.

    Case and surrounding white space are ignored. Raises ValueError naming the unknown
    words, or the expected form, when the prompt is not one of this world's.
    """
    words = prompt.lower().split()
    strange = [w for w in words if w not in VOCAB]
    if strange:
        raise ValueError(
            f"not a shapes prompt: unknown word(s) {', '.join(map(repr, strange))} in {prompt!r}; "
            f"prompts look like {prompt_of(Attributes('circle', 'red', 'blue', 'small'))!r}"
        )
    # Either article is accepted in either place; `prompt_of` writes the grammatical one.
    articles = ("a", "an")
    if (
        len(words) != 8
        or words[0] not in articles
        or words[4] != "on"
        or words[5] not in articles
        or words[7] != "background"
    ):
        raise ValueError(
            f"not a shapes prompt: {prompt!r}; expected 'a <size> <colour> <shape> on a <colour> background'"
        )
    size, colour, shape, background = words[1], words[2], words[3], words[6]
    if size not in SIZES or colour not in COLOURS or shape not in SHAPES or background not in COLOURS:
        raise ValueError(
            f"not a shapes prompt: {prompt!r}; expected 'a <size> <colour> <shape> on a <colour> background' "
            f"with size in {SIZES}, shape in {SHAPES}"
        )
    return Attributes(shape=shape, colour=colour, background=background, size=size)


def split_of(attrs: Attributes) -> str:
    """'heldout' if the (shape, colour) pair is held out of training, else 'train'."""
    return "heldout" if (attrs.shape, attrs.colour) in HELDOUT_PAIRS else "train"


def combinations(split: str = "all") -> list[Attributes]:
    """Every attribute combination of a split, in a fixed (sorted) order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    every = (
        Attributes(shape, colour, background, size)
        for shape, colour, background, size in itertools.product(SHAPES, COLOUR_NAMES, COLOUR_NAMES, SIZES)
        if colour != background
    )
    return sorted(a for a in every if split == "all" or split_of(a) == split)


def prompts(split: str = "train") -> list[str]:
    """The prompt set of a split ('train', 'heldout' or 'all'), one per combination, sorted."""
    return [prompt_of(a) for a in combinations(split)]


def split_file(directory: str | Path, split: str) -> Path:
    """The text file of a split's prompts ('train' or 'heldout') in `directory`, one per line."""
    if split not in ("train", "heldout"):
        raise ValueError(f"no prompt file for split {split!r}; choose 'train' or 'heldout'")
    return Path(directory) / f"{split}.txt"


def write_split_files(directory: str | Path, prompts_of) -> list[Path]:
    """Write `train.txt` and `heldout.txt` of `prompts_of(split)` into `directory`; returns their paths."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    paths = [split_file(directory, split) for split in ("train", "heldout")]
    for path in paths:
        path.write_text("\n".join(prompts_of(path.stem)) + "\n")
    return paths


def prompt_file(split: str) -> Path:
    """The shipped text file of a split's prompts ('train' or 'heldout')."""
    return split_file(PROMPTS_DIR, split)


def write_prompt_files(directory: str | Path = PROMPTS_DIR) -> list[Path]:
    """Write the world's `train.txt` and `heldout.txt` into `directory`; returns their paths."""
    return write_split_files(directory, prompts)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates in units of output pixels."""
    n = size * SUPERSAMPLE
    c = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    return np.meshgrid(c, c)  # x varies along columns, y along rows


def _polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Inside test for a simple polygon by the even-odd crossing rule (a ray towards +x)."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        spans = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            cross_x = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= spans & (x < cross_x)
    return inside


def _star(r: float, points: int = 5) -> np.ndarray:
    """Vertices of a star pointing up (y down), outer radius r, inner radius r / 2.2."""
    angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, r, r / 2.2)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


# How far each shape reaches from its centre, in units of its half-extent r (the largest
# factor on r in `_mask`), so a moving shape can be kept inside the frame shape by shape.
REACH = {"circle": 1.0, "square": 0.85, "triangle": 1.15, "cross": 1.0, "diamond": 1.12, "star": 1.2}


def _mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Boolean coverage of a shape of half-extent r centred at the origin (y points down).

    The factors on r bring the shapes' areas close enough that every small shape covers
    less than every large one (radius jitter included), so size stays unambiguous.
    """
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if shape == "triangle":
        # Upright equilateral triangle with circumradius 1.15 r, centroid at the origin.
        R = 1.15 * r
        return (y <= R / 2) & (y >= np.sqrt(3.0) * ax - R)
    if shape == "cross":
        w = 0.36 * r
        return ((ax <= r) & (ay <= w)) | ((ax <= w) & (ay <= r))
    if shape == "diamond":
        return ax + ay <= 1.12 * r
    if shape == "star":
        return _polygon(x, y, _star(1.2 * r))
    raise ValueError(f"unknown shape {shape!r}")


def jittered(colour: str, rng: np.random.Generator) -> np.ndarray:
    """The RGB colour in [0, 1], each channel offset by up to `COLOUR_JITTER`."""
    rgb = np.asarray(COLOURS[colour], dtype=np.float32)
    return np.clip(rgb + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255) / 255.0


def render(attrs: Attributes, rng: np.random.Generator | int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """One anti-aliased image of `attrs`, float32 [3, size, size] in [0, 1].

    The position, the exact radius (+-8%) and a small colour jitter come from `rng` (a
    numpy Generator or an int seed), so the same seed always gives the same image.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    fg, bg = jittered(attrs.colour, rng), jittered(attrs.background, rng)
    r = SIZE_RADIUS[attrs.size] * size * rng.uniform(0.92, 1.08)
    # Keep the whole shape (star and triangle points included) one pixel inside.
    margin = 1.2 * r + 1.0
    cx, cy = rng.uniform(margin, size - margin, 2)
    return paint(attrs.shape, (cx, cy), r, fg, bg, size)


def paint(shape: str, centre: tuple[float, float], r: float, fg: np.ndarray, bg: np.ndarray, size: int) -> np.ndarray:
    """`shape` of half-extent `r` pixels centred at `centre` (x, y in pixels, y down), colour
    `fg` on `bg` (RGB in [0, 1]), anti-aliased: float32 [3, size, size]."""
    x, y = _grid(size)
    cover = _mask(shape, x - centre[0], y - centre[1], r).astype(np.float32)
    cover = cover.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3))
    image = bg[:, None, None] * (1 - cover) + fg[:, None, None] * cover
    return image.astype(np.float32)


def _split_seed(split: str) -> int:
    # A different stream per split, so 'train' and 'heldout' samples of one seed are unrelated.
    return SPLITS.index(split)


def draw_examples(n: int, seed: int = 0, split: str = "all", size: int = DEFAULT_SIZE) -> Examples:
    """`n` random images of a split with their prompts and attributes, reproducible from `seed`."""
    combos = combinations(split)
    rng = np.random.default_rng([seed, _split_seed(split)])
    picks = rng.integers(len(combos), size=n)
    attrs = [combos[i] for i in picks]
    images = np.stack([render(a, rng, size) for a in attrs]) if n else np.zeros((0, 3, size, size), np.float32)
    return Examples(images, [prompt_of(a) for a in attrs], attrs)
