"""Rewards: one contract, a registry by name, mixtures and plug-ins.

The contract::

    reward(images, prompts) -> Tensor[B]

`images` is a float tensor `[B, 3, H, W]` with values in [0, 1], `prompts` a list of B
strings. The result is one score per image, higher is better, differentiable in the
images. Learned rewards keep their weights frozen (`requires_grad=False`, eval mode) but
never run under `no_grad`, so the gradient reaches the images. Shaping (scales, offsets,
clipping) belongs to the reward; the training loss stays `-reward.mean()`.

Videos are `[B, F, 3, H, W]`. An image reward scores each frame it is given and the
video's score is their mean (the frames are chosen by the caller: `reward_frames`). A
reward that looks at motion takes the video whole: a `Reward` with `video = True`, or a
plug-in function with a `video = True` attribute, gets `[B, F, 3, H, W]`.

A reward is named by a *spec*:

- a registered name, e.g. ``brightness`` (``draft rewards`` lists them);
- ``module:attr``, a user's callable, or a class that is instantiated with the reward's
  arguments;
- a weighted sum, e.g. ``aesthetic:1.0+hpsv2:0.5`` (weights default to 1).

The table below maps names to where their code lives, so listing rewards imports
nothing heavy and a reward's optional package is needed only by its users.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from draft.errors import UserError, unknown

__all__ = ["Reward", "RewardInfo", "available", "get", "from_config", "check_images", "check_videos"]


@dataclass(frozen=True)
class RewardInfo:
    name: str
    target: str  # "package.module:Class", imported only when the reward is built
    description: str  # one line, shown by `draft rewards`
    requires: str = ""  # what to install beyond the core package, if anything
    needs: tuple[str, ...] = ()  # arguments with no usable default (checked by `draft train --dry-run`)


_REGISTRY: dict[str, RewardInfo] = {
    info.name: info
    for info in [
        RewardInfo("brightness", "draft.rewards.basic:Brightness", "mean pixel luminance (Rec. 601), in [0, 1]"),
        RewardInfo("saturation", "draft.rewards.basic:Saturation", "mean HSV colour saturation, in [0, 1]"),
        RewardInfo(
            "colorfulness",
            "draft.rewards.basic:Colorfulness",
            "Hasler-Suesstrunk colourfulness of the opponent colour channels, about [0, 1]",
        ),
        # --- further rewards are registered below this line ---
        RewardInfo(
            "shapes-alignment",
            "draft.rewards.shapes:ShapesAlignment",
            "shapes-sd: classifier log-probability of the prompt's shape, colour, background and size, <= 0",
        ),
        RewardInfo(
            "jpeg-compressibility",
            "draft.rewards.jpeg:JpegCompressibility",
            "minus a differentiable estimate of the JPEG size, in bits per pixel (higher compresses better)",
        ),
        RewardInfo(
            "jpeg-incompressibility",
            "draft.rewards.jpeg:JpegIncompressibility",
            "a differentiable estimate of the JPEG size, in bits per pixel (higher compresses worse)",
        ),
        RewardInfo(
            "jpeg-size",
            "draft.rewards.jpeg:JpegSize",
            "minus the real JPEG file size in KB (Pillow, quality 95); no gradient: for method=ddpo",
        ),
        # Learned reward models (docs/rewards.md); each needs weights the user points at.
        RewardInfo("aesthetic", "draft.rewards.aesthetic:Aesthetic",
                   "LAION aesthetic predictor (CLIP ViT-L/14 + MLP head), about 1-10; needs model=HEAD.safetensors",
                   needs=("model",)),
        RewardInfo("hpsv2", "draft.rewards.hps:HPSv2",
                   "Human Preference Score v2/v2.1 (ViT-H-14), cosine about 0.2-0.35; needs model=HPS.safetensors",
                   needs=("model",)),
        RewardInfo("pickscore", "draft.rewards.clip:PickScore",
                   "PickScore v1 human-preference CLIP, logit_scale * cosine, about 18-24"),
        RewardInfo("imagereward", "draft.rewards.imagereward:ImageReward",
                   "ImageReward v1.0 (BLIP) preference score, about -2..2; needs model=ImageReward.safetensors",
                   needs=("model",)),
        RewardInfo("clipscore", "draft.rewards.clip:ClipScore",
                   "CLIP-S = 2.5 * max(cos(image, prompt), 0) with any Hugging Face CLIP model"),
        RewardInfo("detection", "draft.rewards.detection:Detection",
                   "OWL-ViT/OWLv2 max detection confidence of a text query, in [0, 1]; mode=remove negates"),
        RewardInfo("classifier", "draft.rewards.classifier:Classifier",
                   "log-probability of target=CLASS under a Hugging Face image classifier, <= 0",
                   needs=("model",)),
        # Videos only.
        RewardInfo("motion", "draft.rewards.motion:MotionMagnitude",
                   "videos: mean absolute change between consecutive frames, in [0, 1] (counters static videos)"),
        RewardInfo("shapes-motion", "draft.rewards.shapes_motion:ShapesMotion",
                   "videos of moving shapes: per-frame attribute log-probability plus that of the prompt's motion, <= 0"),
    ]
}


def available() -> dict[str, RewardInfo]:
    """The registered rewards by name."""
    return dict(_REGISTRY)


def check_images(images: torch.Tensor, prompts: list[str] | tuple[str, ...]) -> None:
    """Raise ValueError unless images is a float [B,3,H,W] batch in [0,1] with B prompts."""
    _check(images, prompts, "images", 4, "[B, 3, H, W]")


def check_videos(videos: torch.Tensor, prompts: list[str] | tuple[str, ...]) -> None:
    """Raise ValueError unless videos is a float [B,F,3,H,W] batch in [0,1] with B prompts."""
    _check(videos, prompts, "videos", 5, "[B, F, 3, H, W]")


def _check(samples, prompts, what: str, ndim: int, layout: str) -> None:
    if not torch.is_tensor(samples) or samples.ndim != ndim or samples.shape[-3] != 3:
        shape = tuple(samples.shape) if torch.is_tensor(samples) else type(samples).__name__
        raise ValueError(f"reward expects {what} of shape {layout}, got {shape}")
    if not samples.is_floating_point():
        raise ValueError(f"reward expects float {what} in [0, 1], got dtype {samples.dtype}")
    if len(prompts) != samples.shape[0]:
        raise ValueError(f"reward got {samples.shape[0]} {what} but {len(prompts)} prompts")
    lo, hi = samples.detach().aminmax()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"reward expects {what} in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")


class Reward(torch.nn.Module):
    """Base class: subclasses implement `score(images, prompts) -> Tensor[B]`.

    Calling the reward checks the input, scores, and checks that one score per sample came
    back; an image reward given videos scores their frames and averages. Call
    `self.freeze()` at the end of `__init__` in learned rewards.
    """

    video = False  # True: `score` takes videos [B, F, 3, H, W] whole

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, samples: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        is_video = torch.is_tensor(samples) and samples.ndim == 5
        if is_video and not self.video:  # an image reward: every frame it is given, averaged
            b, f = samples.shape[:2]
            per_frame = self(samples.flatten(0, 1), [p for p in prompts for _ in range(f)])
            return per_frame.view(b, f).mean(1)
        if self.video and not is_video:
            raise ValueError(f"reward {self._name} scores videos [B, F, 3, H, W], not images")
        (check_videos if is_video else check_images)(samples, prompts)
        return self._checked(self.score(samples, list(prompts)), samples)

    @property
    def _name(self) -> str:
        return getattr(self, "name", type(self).__name__)

    def _checked(self, r, samples: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(r) or r.shape != (samples.shape[0],):
            shape = tuple(r.shape) if torch.is_tensor(r) else type(r).__name__
            raise ValueError(f"reward {self._name} returned shape {shape}; expected shape ({samples.shape[0]},)")
        return r

    def freeze(self) -> "Reward":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Reward":
        # Reward models stay in eval mode (dropout and batch-norm statistics off) even when
        # the caller puts everything it holds into training mode.
        return super().train(False)


class FunctionReward(Reward):
    """A plain function `f(images, prompts) -> Tensor[B]` behind the Reward interface."""

    def __init__(self, fn: Callable, name: str | None = None):
        super().__init__()
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.video = bool(getattr(fn, "video", False))

    def score(self, images, prompts):
        return self.fn(images, prompts)

    def extra_repr(self) -> str:
        return self.name


class Mixture(Reward):
    """A weighted sum of rewards: sum_j w_j r_j(samples, prompts); videos go to each part
    whole, and each scores them its own way (frame by frame, or as a video)."""

    def __init__(self, rewards: Mapping[str, torch.nn.Module], weights: Mapping[str, float]):
        super().__init__()
        self.parts = torch.nn.ModuleDict({k.replace(".", "_"): v for k, v in rewards.items()})
        self.names = list(rewards)
        self.weights = [float(weights[k]) for k in rewards]

    def forward(self, samples, prompts):
        (check_videos if torch.is_tensor(samples) and samples.ndim == 5 else check_images)(samples, prompts)
        return self._checked(self.score(samples, list(prompts)), samples)

    def score(self, images, prompts):
        parts = [w * r(images, prompts) for w, r in zip(self.weights, self.parts.values())]
        return torch.stack(parts).sum(0)


def _import(target: str, what: str):
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import {module_name!r} for {what}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"module {module_name!r} has no attribute {attr!r} (for {what})") from None


def _build(name: str, kwargs: Mapping) -> Reward:
    """One reward from a registered name or a `module:attr` path."""
    if name in _REGISTRY:
        info = _REGISTRY[name]
        try:
            obj = _import(info.target, f"reward {name!r}")
        except UserError as e:
            if info.requires:
                raise UserError(f"{e}; reward {name!r} needs: pip install '{info.requires}'") from None
            raise
    elif ":" in name:
        obj = _import(name, f"reward {name!r}")
    else:
        raise unknown("reward", name, _REGISTRY)
    if inspect.isclass(obj):
        try:
            obj = obj(**kwargs)
        except TypeError as e:
            raise UserError(f"bad arguments for reward {name!r}: {e}") from None
    elif kwargs:
        raise UserError(f"reward {name!r} is a function and takes no arguments, got {sorted(kwargs)}")
    if isinstance(obj, Reward):
        return obj
    if callable(obj):
        return FunctionReward(obj, name)
    raise UserError(f"reward {name!r} is not callable")


def _parse(spec: str) -> dict[str, float]:
    """'a:1.0+pkg.mod:fn:0.5' -> {'a': 1.0, 'pkg.mod:fn': 0.5}."""
    weights: dict[str, float] = {}
    for term in spec.split("+"):
        term = term.strip()
        name, weight = term, 1.0
        head, sep, tail = term.rpartition(":")
        if sep:
            try:
                value = float(tail)
            except ValueError:
                value = math.nan
            if math.isfinite(value):  # else 'module:attr' with no weight ('nan' is a name)
                name, weight = head, value
            elif head in _REGISTRY or not all(part.isidentifier() for part in head.split(".")):
                # 'brightness:abc', 'pkg.mod:fn:abc': a weight after a name, and not a number.
                raise UserError(f"reward weight {tail!r} in {term!r} is not a finite number")
        if not name:
            raise UserError(f"empty reward name in {spec!r}")
        if name in weights:
            raise UserError(f"reward {name!r} appears twice in {spec!r}")
        weights[name] = weight
    return weights


def from_config(spec: str | Callable, args: Mapping[str, Mapping] | None = None) -> Reward:
    """Build the reward a config names; `args` maps each reward name to its keyword arguments."""
    args = dict(args or {})
    if callable(spec):
        return spec if isinstance(spec, Reward) else FunctionReward(spec)
    weights = _parse(spec)
    extra = set(args) - set(weights)
    if extra:
        raise UserError(f"reward_args given for {sorted(extra)}, which the reward {spec!r} does not use")
    rewards = {name: _build(name, args.get(name, {})) for name in weights}
    if len(rewards) == 1 and next(iter(weights.values())) == 1.0:
        return next(iter(rewards.values()))
    return Mixture(rewards, weights)


def get(spec: str | Callable, **kwargs) -> Reward:
    """The reward named by `spec`, built with `kwargs` (for a single reward).

    >>> r = get("brightness")
    >>> r(torch.ones(2, 3, 8, 8), ["a", "b"])
    tensor([1., 1.])
    """
    if kwargs:
        if callable(spec) or len(_parse(spec)) != 1:
            raise UserError("keyword arguments go with a single reward; use from_config for mixtures")
        return from_config(spec, {next(iter(_parse(spec))): kwargs})
    return from_config(spec)
