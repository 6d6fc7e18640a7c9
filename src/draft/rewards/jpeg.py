"""JPEG compressibility rewards: a differentiable estimate of an image's JPEG size.

The DRaFT paper (Clark et al. 2024, sec. 5) fine-tunes for JPEG compressibility and
incompressibility, scored by the real file size, which is not differentiable. Here the
baseline JPEG codec is followed step by step on tensors, so every step but the entropy
coder is exact and differentiable:

1. RGB -> YCbCr (JFIF), level shift by 128, chroma averaged over 2x2 (4:2:0, Pillow's
   default), edges replicated to whole blocks;
2. 8x8 orthonormal DCT-II of every block (JPEG's FDCT is this transform);
3. division by the standard quantisation tables (ITU T.81 Annex K) scaled to the quality
   level as libjpeg scales them;
4. the entropy coder replaced by a smooth bit count: a coefficient costs
   `h + log2(1 + |u|)` bits (Huffman code of its run/size symbol, then its magnitude
   bits) times a soft "is it non-zero after rounding" gate `sigmoid((|u| - 1/2) / tau)`;
   the DC coefficient costs `2 + 2 log2(1 + |delta|)` bits for its difference to the
   previous block's; each block ends with a 4-bit end-of-block code.

The estimate (in bits per pixel, header excluded) ranks images as the real codec does:
`benchmarks/jpeg_proxy_calibration.py` measures the Spearman correlation with Pillow's
byte size (see docs/shapes-sd.md). The smooth rate term follows the usual practice of
learned-compression rate proxies; the soft non-zero gate is our own simplification.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from draft.rewards import Reward

# ITU T.81 Annex K.1, tables K.1 (luminance) and K.2 (chrominance), row-major.
_LUMA_TABLE = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip
_CHROMA_TABLE = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
] + [99] * 32  # fmt: skip


def quantisation_tables(quality: int = 75) -> tuple[torch.Tensor, torch.Tensor]:
    """Luma and chroma 8x8 tables at a quality level, scaled as libjpeg's jpeg_quality_scaling."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    tables = []
    for base in (_LUMA_TABLE, _CHROMA_TABLE):
        t = [min(max((q * scale + 50) // 100, 1), 255) for q in base]
        tables.append(torch.tensor(t, dtype=torch.float32).view(8, 8))
    return tables[0], tables[1]


def _dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix D, so that D @ X @ D.T is the 2-D transform of a block X."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


def _ycbcr(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] RGB in [0, 1] -> JFIF YCbCr in 0..255 units, level-shifted by -128."""
    m = images.new_tensor(
        [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
    )
    ycc = torch.einsum("ij,bjhw->bihw", m, images * 255)
    return ycc - images.new_tensor([128.0, 0.0, 0.0]).view(1, 3, 1, 1)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate the right and bottom edges up to a multiple of `multiple`, as libjpeg does."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def _block_dct(plane: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] (H, W multiples of 8) -> DCT coefficients [B, N_blocks, 8, 8], blocks row-major."""
    b, _, h, w = plane.shape
    blocks = plane.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(b, -1, 8, 8)
    d = _dct_matrix().to(plane)
    return d @ blocks @ d.T


def _bits(coef: torch.Tensor, table: torch.Tensor, tau: float, ac_code_bits: float) -> torch.Tensor:
    """Smooth bit count of the quantised coefficients [B, N, 8, 8] -> [B]."""
    u = coef / table.to(coef)
    mag = (u.square() + 1e-6).sqrt()  # |u|, smooth at 0
    nonzero = torch.sigmoid((mag - 0.5) / tau)
    cost = nonzero * (ac_code_bits + torch.log2(1 + mag))
    ac = cost.flatten(2)[..., 1:].sum((1, 2))
    dc = u[..., 0, 0]
    delta = torch.diff(dc, dim=1, prepend=torch.zeros_like(dc[:, :1]))  # DC is coded as a difference
    dc_bits = (2 + 2 * torch.log2(1 + (delta.square() + 1e-6).sqrt())).sum(1)
    eob = 4.0 * coef.shape[1]
    return ac + dc_bits + eob


def jpeg_bits(
    images: torch.Tensor, quality: int = 75, tau: float = 0.15, ac_code_bits: float = 4.0
) -> torch.Tensor:
    """Differentiable estimate of the entropy-coded bits of each image's JPEG, header excluded.

    `images` is [B,3,H,W] in [0, 1], any H and W. `tau` is the softness of the rounding
    gate (smaller is closer to the codec but gives gradient to fewer coefficients);
    `ac_code_bits` the mean Huffman code length of a non-zero coefficient's symbol.
    """
    luma_q, chroma_q = quantisation_tables(quality)
    ycc = _pad_to(_ycbcr(images), 16)  # a 4:2:0 MCU is 16x16 pixels
    y, cbcr = ycc[:, :1], F.avg_pool2d(ycc[:, 1:], 2)
    total = _bits(_block_dct(y), luma_q, tau, ac_code_bits)
    for c in (0, 1):
        total = total + _bits(_block_dct(cbcr[:, c : c + 1]), chroma_q, tau, ac_code_bits)
    return total


def jpeg_bytes(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """The real JPEG file size of each image in bytes (Pillow, 4:2:0), as a float tensor [B].

    Not differentiable: the images are rounded to 8 bits and saved with Pillow, the way
    an evaluation (or the paper's reward) measures them.
    """
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell())
    return torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility(Reward):
    """Minus the estimated JPEG size in bits per pixel: higher for images that compress well.

    About -0.35 for a flat colour, -1.3 for a shapes-world render and -5.5 for uniform
    noise at quality 75 (-0.35, -2.8 and -9.4 at 95); comparable across resolutions
    because it is per pixel.
    """

    sign = -1.0

    def __init__(self, quality: int = 75, tau: float = 0.15):
        super().__init__()
        quantisation_tables(quality)  # validates the quality now, not at the first call
        self.quality, self.tau = quality, tau

    def score(self, images, prompts):
        bpp = jpeg_bits(images, self.quality, self.tau) / (images.shape[-1] * images.shape[-2])
        return self.sign * bpp

    def extra_repr(self) -> str:
        return f"quality={self.quality}"


class JpegIncompressibility(JpegCompressibility):
    """The estimated JPEG size in bits per pixel: higher for images that compress badly."""

    sign = 1.0


class JpegSize(Reward):
    """Minus the real JPEG file size in kilobytes (Pillow): DDPO's compressibility reward.

    Not differentiable (the codec rounds and entropy-codes), so only `method=ddpo` can
    train on it; the gradient methods refuse it at start. Quality 95, as in DDPO.
    """

    def __init__(self, quality: int = 95):
        super().__init__()
        quantisation_tables(quality)
        self.quality = quality

    def score(self, images, prompts):
        return -jpeg_bytes(images, self.quality).to(images.device) / 1024

    def extra_repr(self) -> str:
        return f"quality={self.quality}"


def spearman(a, b) -> float:
    """Spearman rank correlation of two 1-D sequences (tied values share their mean rank)."""

    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        return (np.bincount(inverse, weights=r) / counts)[inverse]

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])
