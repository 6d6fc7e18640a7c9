"""Tensor preprocessing against the processors it reproduces, pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reward_models import smooth_images, to_pil

from draft.rewards.preprocess import ImageTransform, center_crop, letterbox, resize


@pytest.mark.parametrize("src,dst", [((64, 64), (24, 24)), ((30, 45), (40, 60)), ((50, 20), (21, 9))])
def test_resize_is_pils_filter(src, dst):
    """Against PIL on float ("F") images, where PIL does not round: the same filter."""
    from PIL import Image

    x = smooth_images(1, *src)
    for mode, code in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
        ref = torch.stack([torch.from_numpy(np.array(Image.fromarray(c.numpy(), mode="F").resize(dst[::-1], code)))
                           for c in x[0]])
        assert (resize(x, dst, mode)[0] - ref).abs().max() < 2e-5


@pytest.mark.parametrize("size", [(512, 512), (300, 451), (100, 64)])
def test_clip_transform_is_within_8bit_rounding_of_the_clip_processor(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil()  # 224, shortest edge, bicubic, centre crop
    x = smooth_images(2, *size)
    ref = processor(images=to_pil(x), return_tensors="pt")["pixel_values"]
    ours = ImageTransform.from_hf(processor.to_dict())(x)
    levels = (ours - ref).abs() * torch.tensor(processor.image_std).view(1, 3, 1, 1) * 255
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    assert levels.mean() < 0.4 and levels.max() < 4


@pytest.mark.parametrize("size", [(512, 512), (300, 451), (64, 100)])
def test_owlv2_transform_matches_its_processor_exactly(size):
    pytest.importorskip("scipy")
    from transformers.models.owlv2.image_processing_pil_owlv2 import (
        Owlv2ImageProcessorPil,
    )

    processor = Owlv2ImageProcessorPil(size={"height": 96, "width": 96})
    x = smooth_images(2, *size)
    ref = processor(images=to_pil(x), return_tensors="pt")["pixel_values"]
    assert (ImageTransform.from_hf(processor.to_dict())(x) - ref).abs().max() < 1e-5


def test_crop_rounding_follows_each_library():
    x = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 3, 7, 7)
    # margin 3: HF floors to 1, torchvision's round(1.5) gives 2
    assert center_crop(x, (4, 4), "floor")[0, 0, 0, 0] == 1
    assert center_crop(x, (4, 4), "round")[0, 0, 0, 0] == 2
    assert center_crop(x, (9, 9)).shape[-2:] == (9, 9)  # smaller images are zero-padded


def test_letterbox_keeps_aspect_and_pads_evenly():
    out = letterbox(torch.ones(1, 3, 40, 80), 32, fill=0.0)
    assert out.shape[-2:] == (32, 32)
    rows = out[0, 0, :, 16]
    assert rows[:8].eq(0).all() and rows[8:24].gt(0.99).all() and rows[24:].eq(0).all()


def test_unsupported_processor_options_are_refused():
    with pytest.raises(ValueError, match="crop_pct"):
        ImageTransform.from_hf({"size": {"shortest_edge": 224}, "crop_pct": 0.875})
    with pytest.raises(ValueError, match="resample"):
        ImageTransform.from_hf({"size": {"height": 224, "width": 224}, "resample": 1})
