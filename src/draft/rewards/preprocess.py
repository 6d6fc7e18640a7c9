"""Differentiable image preprocessing that reproduces reward models' own processors.

Reward models were trained on images that went through a specific pipeline (PIL resize,
torchvision crop, a scikit-image style zoom, ...). Scoring a generated image through a
different pipeline shifts the score; the peers' scorers drift by up to ±0.1 on PickScore
from that alone. The functions here do the same arithmetic on float tensors, so gradients
reach the pixels, and each reward's tests hold them to the reference processor.

Facts the code relies on:

- PIL's bicubic/bilinear resize always scales its filter support with the downscale
  factor (antialiasing) and uses a = -0.5 for bicubic; `F.interpolate(..., antialias=True)`
  implements exactly that filter, so it matches PIL up to PIL's uint8 rounding.
- torchvision's `CenterCrop` rounds the offset (`int(round((h - th) / 2))`), Hugging Face
  image processors floor it (`(h - th) // 2`); they differ by one pixel when the margin
  is odd, so each transform says which one its model used.
- OWLv2 (and its Hugging Face port) resizes like scikit-image: a Gaussian blur with
  sigma = (factor - 1) / 2, then linear interpolation, both with "mirror" boundaries.
  Both steps are linear and separable, so they are applied as two small matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resampling codes as stored in Hugging Face preprocessor_config.json files.
_PIL_CODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def resize(images: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """Resize [B,C,H,W] to `size` = (h, w) like PIL does (antialiased filters)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if interpolation == "nearest":
        # PIL's NEAREST samples the pixel under each output pixel's centre.
        return F.interpolate(images, size=size, mode="nearest-exact")
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"unsupported interpolation {interpolation!r}; use bicubic, bilinear or nearest")
    return F.interpolate(images, size=size, mode=interpolation, align_corners=False, antialias=True)


def shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """Output (h, w) when the shorter side becomes `edge` (torchvision and HF agree: truncate)."""
    if height <= width:
        return edge, int(edge * width / height)
    return int(edge * height / width), edge


def center_crop(images: torch.Tensor, size: tuple[int, int], rounding: str = "floor") -> torch.Tensor:
    """Crop the centre `size` = (h, w); pad with zeros first where the image is smaller.

    `rounding` picks where an odd margin goes: "floor" as Hugging Face processors do,
    "round" as torchvision's CenterCrop does (Python's round, so halves go to even).
    """
    th, tw = size
    h, w = images.shape[-2:]
    if th > h or tw > w:
        # Both libraries pad symmetrically, the extra pixel going bottom/right.
        ph, pw = max(th - h, 0), max(tw - w, 0)
        images = F.pad(images, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
        h, w = images.shape[-2:]
    if rounding == "floor":
        top, left = (h - th) // 2, (w - tw) // 2
    elif rounding == "round":
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    else:
        raise ValueError(f"rounding must be 'floor' or 'round', got {rounding!r}")
    return images[..., top : top + th, left : left + tw]


def letterbox(images: torch.Tensor, size: int, interpolation: str = "bicubic", fill: float = 0.0) -> torch.Tensor:
    """Fit the longer side to `size` and pad the rest evenly with `fill` (square output).

    This is HPSv2's `ResizeMaxSize` (HPSv2 repo, hpsv2/src/open_clip/transform.py), which
    its scorer applies to float tensors: new sides are `round(side * scale)`, and an image
    whose longer side already equals `size` is returned untouched, as there.
    """
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    if scale == 1.0:
        return images
    nh, nw = round(h * scale), round(w * scale)
    images = resize(images, (nh, nw), interpolation)
    ph, pw = size - nh, size - nw
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def pad_square(images: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Pad bottom and right to a square, as OWLv2's processor does."""
    h, w = images.shape[-2:]
    side = max(h, w)
    return F.pad(images, (0, side - w, 0, side - h), value=fill)


def _mirror(index: torch.Tensor, n: int) -> torch.Tensor:
    """Fold indices into [0, n) by reflecting about the edge pixels (scipy's "mirror")."""
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index.remainder(period)
    return torch.where(index >= n, period - index, index)


def _zoom_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] matrix of scipy.ndimage.zoom(order=1, mode="mirror", grid_mode=True)
    preceded by scikit-image's antialiasing Gaussian (sigma = max(0, (factor - 1) / 2))."""
    factor = n_in / n_out
    eye = torch.eye(n_in, dtype=torch.float64)
    sigma = max(0.0, (factor - 1) / 2)
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)  # scipy's gaussian_filter truncates at 4 sigma
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        blur = torch.zeros(n_in, n_in, dtype=torch.float64)
        rows = torch.arange(n_in).unsqueeze(1).expand(-1, len(offsets))
        cols = _mirror(rows + offsets.long(), n_in)
        blur.index_put_((rows, cols), kernel.expand(n_in, -1), accumulate=True)
    else:
        blur = eye
    x = (torch.arange(n_out, dtype=torch.float64) + 0.5) * factor - 0.5
    i0 = torch.floor(x)
    frac = x - i0
    i0 = i0.long()
    interp = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    interp.index_put_((rows, _mirror(i0, n_in)), 1 - frac, accumulate=True)
    interp.index_put_((rows, _mirror(i0 + 1, n_in)), frac, accumulate=True)
    return interp @ blur


def skimage_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize [B,C,H,W] as OWLv2's processor does (scikit-image `resize` with antialiasing).

    Written as out = Zy @ image @ Zx^T with the separable blur-then-interpolate matrices;
    the reference clips the result to the input's range, which is a no-op here because
    both steps have non-negative weights.
    """
    h, w = images.shape[-2:]
    if (h, w) == tuple(size):
        return images
    zy = _zoom_matrix(h, size[0]).to(images)
    zx = _zoom_matrix(w, size[1]).to(images)
    return zy @ images @ zx.T


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(images - mean) / std per channel."""
    m = images.new_tensor(mean).view(1, -1, 1, 1)
    s = images.new_tensor(std).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class ImageTransform:
    """A model's preprocessing: resize, optional centre crop, normalisation.

    Images come in as float [B,3,H,W] in [0, 1] and go out normalised, ready for the model.
    """

    resize: str = "shortest"  # "shortest" (keep aspect), "squash", "letterbox", "pad_square_skimage", "none"
    size: tuple[int, int] = (224, 224)  # target (h, w); "shortest" and "letterbox" use size[0]
    crop: tuple[int, int] | None = (224, 224)  # centre crop (h, w) after resizing, or None
    interpolation: str = "bicubic"
    crop_rounding: str = "floor"  # "floor" (Hugging Face) or "round" (torchvision)
    fill: float = 0.0  # padding value in [0, 1] for "letterbox" and "pad_square_skimage"
    # Clamp the resized image to [0, 1], as references that resize 8-bit images (PIL, HF
    # processors) do; bicubic overshoot at sharp edges is otherwise kept.
    clamp: bool = False
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.resize == "shortest":
            images = resize(images, shortest_edge_size(*images.shape[-2:], self.size[0]), self.interpolation)
        elif self.resize == "squash":
            images = resize(images, self.size, self.interpolation)
        elif self.resize == "letterbox":
            images = letterbox(images, self.size[0], self.interpolation, self.fill)
        elif self.resize == "pad_square_skimage":
            images = skimage_resize(pad_square(images, self.fill), self.size)
        elif self.resize != "none":
            raise ValueError(f"unknown resize mode {self.resize!r}")
        if self.clamp:
            images = images.clamp(0.0, 1.0)
        if self.crop is not None:
            images = center_crop(images, self.crop, self.crop_rounding)
        return normalize(images, self.mean, self.std)

    @classmethod
    def from_hf(cls, config: Mapping | object) -> "ImageTransform":
        """The transform a Hugging Face image processor (or its config dict) describes.

        Raises ValueError for options this module does not reproduce, rather than
        silently scoring through a different pipeline.
        """
        cfg = config if isinstance(config, Mapping) else config.to_dict()
        kind = str(cfg.get("image_processor_type", ""))
        if kind.startswith("Owlv2"):
            size = _hw(cfg.get("size") or {"height": 960, "width": 960})
            mean, std = _mean_std(cfg)
            return cls(resize="pad_square_skimage", size=size, crop=None, interpolation="bilinear", mean=mean, std=std)
        for key in ("do_pad", "crop_pct", "do_reduce_labels"):
            if cfg.get(key):
                raise ValueError(f"image processor option {key}={cfg[key]!r} is not supported")
        if cfg.get("do_rescale", True) and not math.isclose(cfg.get("rescale_factor", 1 / 255), 1 / 255):
            raise ValueError(f"unsupported rescale_factor {cfg['rescale_factor']!r} (expected 1/255)")
        interpolation = _PIL_CODES.get(int(cfg.get("resample", 2)))
        if interpolation is None:
            raise ValueError(f"unsupported resample code {cfg.get('resample')!r}")
        size = cfg.get("size")
        if not cfg.get("do_resize", True):
            mode, hw = "none", (0, 0)
        elif isinstance(size, Mapping) and "shortest_edge" in size and "longest_edge" not in size:
            mode, hw = "shortest", (int(size["shortest_edge"]),) * 2
        elif isinstance(size, Mapping) and "height" in size:
            mode, hw = "squash", _hw(size)
        elif isinstance(size, int):
            square = cfg.get("default_to_square", True)
            mode, hw = ("squash" if square else "shortest"), (size, size)
        else:
            raise ValueError(f"unsupported image processor size {size!r}")
        crop = _hw(cfg.get("crop_size") or size) if cfg.get("do_center_crop") else None
        # HF processors resize 8-bit images (PIL, or torchvision on uint8 tensors): clamp.
        mean, std = _mean_std(cfg)
        return cls(mode, hw, crop, interpolation, "floor", clamp=True, mean=mean, std=std)


def _hw(size: Mapping | int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, Mapping):
        if "height" in size:
            return int(size["height"]), int(size["width"])
        return (int(size["shortest_edge"]),) * 2
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _mean_std(cfg: Mapping) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if not cfg.get("do_normalize", True):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean, std = cfg.get("image_mean", OPENAI_CLIP_MEAN), cfg.get("image_std", OPENAI_CLIP_STD)
    mean = (mean,) * 3 if isinstance(mean, (int, float)) else tuple(mean)
    std = (std,) * 3 if isinstance(std, (int, float)) else tuple(std)
    return tuple(map(float, mean)), tuple(map(float, std))
