"""Videos people can watch: mp4 files, animated previews, frame strips and animated grids.

A video is a float tensor [F, 3, H, W] in [0, 1] (F frames); a batch of them is
[N, F, 3, H, W]. Images elsewhere in the project are [B, 3, H, W].

- `save_video` writes an H.264 mp4 (yuv420p, the one pixel format every player and
  browser decodes) through PyAV, an optional extra: `pip install 'draft-diffusion[video]'`.
  It is imported only here, so `import draft` never needs it.
- `save_animation` writes a looping GIF or WebP with Pillow alone, for a preview that
  shows inline in a README, a notebook or an image viewer.
- `frame_strip` and `animated_grid` lay a batch out with `report.grid`, so samples look
  the same whether a run makes images or videos.
- `read_video` and `video_info` read an mp4 back, for tests and for users checking a file.

Every file is written under a temporary name and renamed into place (`safeio`), so an
interrupted write leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from draft.errors import UserError
from draft.report import grid, to_pil
from draft.safeio import atomic_write

INSTALL_AV = "pip install 'draft-diffusion[video]'"
AUTO_SHORT_SIDE = 128  # upscale=0 enlarges small videos until their short side is at least this many pixels
CRF = 18  # x264's constant rate factor: 0 is lossless, 23 its default; 18 is close to visually lossless

# Animated formats by suffix: the Pillow format and the unit its frame delays are stored in (ms).
ANIMATION_FORMATS = {".gif": ("GIF", 10), ".webp": ("WEBP", 1)}


class VideoInfo(NamedTuple):
    frames: int
    fps: float
    width: int
    height: int


# --- helpers ------------------------------------------------------------------------------------


def _import_av():
    try:
        import av
    except ImportError:
        raise UserError(f"mp4 video needs PyAV, which is not installed: {INSTALL_AV}") from None
    return av


def _check(video: torch.Tensor, ndim: int, what: str) -> None:
    if video.ndim != ndim or video.shape[-3] != 3:
        shape = "[N, F, 3, H, W]" if ndim == 5 else "[F, 3, H, W]"
        raise ValueError(f"{what} must be a float tensor {shape} in [0, 1], not one of shape {tuple(video.shape)}")


def auto_upscale(height: int, width: int, upscale: int = 0) -> int:
    """`upscale` if it is given (> 0), else the smallest integer factor that brings the short side to 128 px."""
    if upscale < 0:
        raise ValueError(f"upscale must be 0 (automatic) or a positive integer factor, not {upscale}")
    return upscale or max(1, math.ceil(AUTO_SHORT_SIDE / min(height, width)))


def _to_uint8(video: torch.Tensor, upscale: int) -> np.ndarray:
    """[F, 3, H, W] floats in [0, 1] -> [F, H', W', 3] uint8, enlarged by nearest neighbour."""
    factor = auto_upscale(video.shape[-2], video.shape[-1], upscale)
    video = video.detach().float().cpu().clamp(0, 1)
    if factor > 1:
        video = video.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row and/or column so height and width are even (yuv420p halves both for colour)."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


# --- mp4 ----------------------------------------------------------------------------------------


def _yuv_frame(av, array: np.ndarray):
    """One [H, W, 3] uint8 RGB frame as a yuv420p VideoFrame in BT.709 limited range, the
    colour space the stream is tagged with, so players show the colours that were written."""
    frame = av.VideoFrame.from_ndarray(array, format="rgb24")
    return frame.reformat(format="yuv420p", dst_colorspace="itu709", dst_color_range="MPEG")


def _h264_stream(av, container, width: int, height: int, fps: float, crf: int):
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": str(crf)}
    cc = stream.codec_context
    cc.colorspace = cc.color_primaries = cc.color_trc = 1  # 1 = BT.709 in all three of FFmpeg's tables
    cc.color_range = 1  # MPEG (limited, 16-235), what players assume
    return stream


def save_video(video: torch.Tensor, path: str | Path, fps: float = 16, upscale: int = 0,
               crf: int = CRF) -> Path:
    """Write a [F, 3, H, W] video in [0, 1] as an H.264 mp4 (yuv420p); return its path.

    upscale: integer nearest-neighbour factor; 0 enlarges a small video until its short
    side is at least 128 px (a 32 px clip is unwatchable at its own size), 1 keeps it.
    An odd height or width is padded by one repeated row or column, since yuv420p stores
    colour at half resolution and needs even sizes. crf: x264 quality (lower is better).
    The moov atom is written first ("faststart"), so a browser plays it while loading.
    """
    av = _import_av()
    if "libx264" not in av.codecs_available:  # PyPI's wheels have it; some other builds do not
        raise UserError("this PyAV build has no H.264 encoder (libx264); install PyAV's own wheel: "
                        "pip install --force-reinstall 'av>=12'")
    _check(video, 4, "video")
    if fps <= 0:
        raise ValueError(f"fps must be positive, not {fps}")
    frames = _pad_even(_to_uint8(video, upscale))

    def write(tmp: Path) -> None:
        # The temporary name does not end in .mp4, so the container format is named.
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "faststart"}) as container:
            stream = _h264_stream(av, container, frames.shape[2], frames.shape[1], fps, crf)
            container.start_encoding()  # open the file now, not at the first packet x264 lets out
            for array in frames:
                container.mux(stream.encode(_yuv_frame(av, array)))
            container.mux(stream.encode())  # flush the frames the encoder holds back

    return atomic_write(path, write, "a video")


@contextlib.contextmanager
def _reading(path: str | Path):
    """The open container of a video file; UserError naming the file if it is not one."""
    av = _import_av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise UserError(f"{path} is not a readable video: {e}") from None
    with container:
        if not container.streams.video:
            raise UserError(f"{path} has no video stream")
        yield container


def read_video(path: str | Path) -> torch.Tensor:
    """Decode a video file's first video stream into a float [F, 3, H, W] tensor in [0, 1]."""
    with _reading(path) as container:
        arrays = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not arrays:
        raise UserError(f"{path} has no frames")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def video_info(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size of a video file's first video stream."""
    with _reading(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        frames = stream.frames or sum(1 for _ in container.decode(stream))  # 0 when the header does not say
        return VideoInfo(frames, float(rate), stream.codec_context.width, stream.codec_context.height)


# --- previews and layouts -----------------------------------------------------------------------


def _delays(n: int, fps: float, unit: int) -> list[int]:
    """Per-frame delays in ms, multiples of `unit`, that add up to n / fps seconds as closely as
    they can: at 16 fps a GIF (10 ms units) alternates 60 and 70 ms rather than drifting at 60."""
    ticks = [round(k * 1000 / fps / unit) for k in range(n + 1)]
    return [max(1, b - a) * unit for a, b in zip(ticks, ticks[1:])]


def save_animation(video: torch.Tensor, path: str | Path, fps: float = 16, upscale: int = 0) -> Path:
    """Write a [F, 3, H, W] video as an animated GIF or WebP (by the suffix) that loops forever.

    Pillow only, so it works without PyAV. Both formats merge a frame identical to the one
    before it into a longer frame, so a clip with still stretches has fewer stored frames
    but the same duration. GIF has 256 colours per frame; WebP is lossy at quality 90.
    """
    _check(video, 4, "video")
    path = Path(path)
    if path.suffix.lower() not in ANIMATION_FORMATS:
        raise UserError(f"an animated preview is a .gif or .webp file, not {path.name!r}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, not {fps}")
    kind, unit = ANIMATION_FORMATS[path.suffix.lower()]
    from PIL import Image

    images = [Image.fromarray(array) for array in _to_uint8(video, upscale)]
    options = {"quality": 90} if kind == "WEBP" else {}

    def write(tmp: Path) -> None:
        images[0].save(tmp, format=kind, save_all=True, append_images=images[1:],
                       duration=_delays(len(images), fps, unit), loop=0, **options)

    return atomic_write(path, write, "an animated preview")


def strip_frames(num_frames: int, columns: int = 8) -> list[int]:
    """Indices of `columns` evenly spaced frames, first and last included (all of them if there are fewer)."""
    if columns < 1:
        raise ValueError(f"columns must be at least 1, not {columns}")
    if num_frames <= columns:
        return list(range(num_frames))
    if columns == 1:
        return [0]
    return [round(k * (num_frames - 1) / (columns - 1)) for k in range(columns)]


def frame_strip(videos: torch.Tensor, columns: int = 8, pad: int = 2, upscale: int = 0) -> torch.Tensor:
    """A [3, H', W'] image of [N, F, 3, H, W] videos: one row per sample, one column per frame
    of `strip_frames(F, columns)`, with `report.grid`'s white border."""
    _check(videos, 5, "videos")
    n, _, c, h, w = videos.shape
    picked = strip_frames(videos.shape[1], columns)
    images = videos[:, picked].reshape(n * len(picked), c, h, w)
    return grid(images.detach().float().cpu(), len(picked), pad, auto_upscale(h, w, upscale))


def save_frame_strip(videos: torch.Tensor, path: str | Path, columns: int = 8) -> Path:
    """`frame_strip` written as a PNG."""
    image = to_pil(frame_strip(videos, columns))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), "a frame strip")


def animated_grid(videos: torch.Tensor, ncol: int, pad: int = 2, upscale: int = 0) -> torch.Tensor:
    """[N, F, 3, H, W] videos -> one [F, 3, H', W'] video whose frame k tiles every sample's
    frame k as `report.grid` tiles images; save it with `save_video` or `save_animation`."""
    _check(videos, 5, "videos")
    _, f, _, h, w = videos.shape
    factor = auto_upscale(h, w, upscale)
    videos = videos.detach().float().cpu()
    return torch.stack([grid(videos[:, k], ncol, pad, factor) for k in range(f)])
