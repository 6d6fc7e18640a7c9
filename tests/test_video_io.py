"""Videos people can watch: mp4 round trips, animated previews, frame strips, animated grids.

The clips are synthetic so every check can say what should be where: a soft blob moving
across a gradient (smooth, so a lossy codec keeps it close) and clips whose colour
encodes (sample, frame), so a layout can be read back pixel by pixel.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from draft import video as V
from draft.errors import UserError
from draft.report import grid
from draft.safeio import WriteFailed


def blob_clip(frames: int = 16, height: int = 48, width: int = 64, sigma: float = 4.0) -> torch.Tensor:
    """[F, 3, H, W]: a red, soft-edged blob moving left to right over a vertical green gradient."""
    y = torch.arange(height).float()[:, None]
    x = torch.arange(width).float()[None, :]
    clip = []
    for k in range(frames):
        blob = torch.exp(-((x - blob_x(k, frames, width)) ** 2 + (y - height / 2) ** 2) / (2 * sigma**2))
        clip.append(torch.stack([0.2 + 0.6 * blob, 0.3 + 0.4 * y / height + 0 * x, 0.7 - 0.5 * blob]))
    return torch.stack(clip)


def blob_x(k: int, frames: int, width: int) -> float:
    return width * 0.25 + k * width * 0.5 / (frames - 1)


def gradient_clip(frames: int, height: int, width: int) -> torch.Tensor:
    """[F, 3, H, W]: gradients of 1% a pixel, getting bluer frame by frame: smooth at any size
    (yuv420p shares colour within 2x2 blocks, so a clip that jumps from one pixel to the next
    comes back blurred at any size; the blob clip is smooth only at its own scale)."""
    y = 0.01 * torch.arange(height).float()[:, None].expand(height, width)
    x = 0.01 * torch.arange(width).float()[None, :].expand(height, width)
    return torch.stack([torch.stack([0.3 + x, 0.3 + y, torch.full_like(x, 0.2 + 0.6 * k / (frames - 1))])
                        for k in range(frames)])


def coded_clips(n: int, frames: int, size: int = 8) -> torch.Tensor:
    """[N, F, 3, H, W] of flat frames whose colour is (sample, frame, 0.5): frame k of sample n
    is red (n + 1) / (n_max + 1) and green k / (F - 1)."""
    red = (torch.arange(n).float() + 1) / (n + 1)
    green = torch.arange(frames).float() / max(frames - 1, 1)
    clips = torch.full((n, frames, 3, size, size), 0.5)
    clips[:, :, 0] = red[:, None, None, None]
    clips[:, :, 1] = green[None, :, None, None]
    return clips


def cell_centre(row: int, col: int, cell: int, pad: int = 2) -> tuple[int, int]:
    """Pixel (y, x) at the centre of a `report.grid` cell of side `cell`."""
    return pad + row * (cell + pad) + cell // 2, pad + col * (cell + pad) + cell // 2


@pytest.fixture
def av():
    return pytest.importorskip("av")


# --- mp4 ----------------------------------------------------------------------------------------


def test_mp4_round_trip_keeps_frames_rate_size_and_pixels(av, tmp_path):
    clip = blob_clip(frames=16, height=48, width=64, sigma=6)
    path = V.save_video(clip, tmp_path / "clip.mp4", fps=12, upscale=1)

    assert V.video_info(path) == V.VideoInfo(frames=16, fps=12.0, width=64, height=48)
    back = V.read_video(path)
    assert back.shape == clip.shape and back.dtype == torch.float32
    # H.264 is lossy. Each pixel goes RGB -> BT.709 limited-range 8-bit YUV (about one
    # level of rounding), colour is shared by each 2x2 block (yuv420p), and x264 at crf 18
    # quantises what is left. On this clip that costs about 0.008 on average and 0.08 at
    # the worst pixel, at the blob's peak where the colour curves most (the 2x2 colour
    # sharing alone costs 0.05 there). The bounds leave room for other x264 builds; they
    # do not see a frame shifted by one (0.011 mean), so the centroid below checks order.
    error = (back - clip).abs()
    assert error.mean() < 0.015
    assert error.max() < 0.15
    # Frames come back in order: the blob's centroid is where it was drawn in every frame.
    weight = (back[:, 0] - 0.3).clamp(min=0)  # above the background and its codec noise
    xs = torch.arange(64).float()
    centroid = (weight * xs).sum((1, 2)) / weight.sum((1, 2))
    expected = torch.tensor([blob_x(k, 16, 64) for k in range(16)])
    assert (centroid - expected).abs().max() < 0.5


@pytest.mark.parametrize("size, written", [((33, 45), (34, 46)), ((1, 1), (2, 2)), ((2, 7), (2, 8))])
def test_mp4_odd_sizes_are_padded_to_even(av, tmp_path, size, written):
    h, w = size
    clip = gradient_clip(frames=4, height=h, width=w)
    path = V.save_video(clip, tmp_path / "odd.mp4", upscale=1)

    info = V.video_info(path)
    assert (info.frames, info.height, info.width) == (4, *written)
    back = V.read_video(path)
    assert (back[:, :, :h, :w] - clip).abs().mean() < 0.03  # the original pixels are where they were
    # The padding repeats the last row / column, so no dark line appears at the edge.
    assert (back[:, :, -1, :w] - clip[:, :, -1]).abs().mean() < 0.03
    assert (back[:, :, :h, -1] - clip[:, :, :, -1]).abs().mean() < 0.03


def test_mp4_small_videos_are_enlarged_to_a_watchable_size(av, tmp_path):
    # 20 x 30: the short side reaches 128 px with factor 7 (140 x 210); 256 px stays as it is.
    path = V.save_video(blob_clip(frames=3, height=20, width=30), tmp_path / "small.mp4")
    assert V.video_info(path)[2:] == (210, 140)
    back = V.read_video(path)
    # Nearest neighbour: a 7x7 block inside the picture is one colour (up to codec noise).
    block = back[:, :, 70:77, 105:112]
    assert (block - block.mean((2, 3), keepdim=True)).abs().max() < 0.04
    assert V.auto_upscale(256, 300) == 1 and V.auto_upscale(32, 32) == 4 and V.auto_upscale(32, 32, 2) == 2


def test_saving_an_animated_grid_as_mp4(av, tmp_path):
    clips = coded_clips(n=3, frames=5, size=8)
    movie = V.animated_grid(clips, ncol=3)
    path = V.save_video(movie, tmp_path / "grid.mp4", fps=16)
    assert V.video_info(path) == V.VideoInfo(5, 16.0, movie.shape[3], movie.shape[2])
    back = V.read_video(path)
    y, x = cell_centre(0, 2, 128)
    assert (back[:, :, y, x] - clips[2, :, :, 0, 0]).abs().max() < 0.03


def test_reading_something_that_is_not_a_video_names_the_file(av, tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video")
    with pytest.raises(UserError, match="notes.mp4 is not a readable video"):
        V.read_video(path)
    with pytest.raises(UserError, match="missing.mp4 is not a readable video"):
        V.video_info(tmp_path / "missing.mp4")


def test_missing_pyav_is_a_one_line_user_error_and_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)  # what `import av` sees when PyAV is not installed
    target = tmp_path / "out" / "clip.mp4"
    with pytest.raises(UserError) as info:
        V.save_video(blob_clip(frames=2), target)
    message = str(info.value)
    assert "\n" not in message
    assert "PyAV" in message and "pip install 'draft-diffusion[video]'" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="PyAV"):
        V.read_video(tmp_path / "clip.mp4")
    # The previews need Pillow only, so they still work.
    assert V.save_animation(blob_clip(frames=2), tmp_path / "clip.gif").is_file()


# --- interrupted writes -------------------------------------------------------------------------


@pytest.mark.parametrize("error, raised", [(RuntimeError("encoder broke"), RuntimeError),
                                           (OSError(28, "No space left on device"), WriteFailed)])
def test_an_interrupted_mp4_write_leaves_the_old_file_and_no_temporary(av, tmp_path, monkeypatch, error, raised):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"the previous video")
    real, calls, seen = V._yuv_frame, [], []

    def failing(av_module, array):
        calls.append(1)
        if len(calls) == 3:  # midway: the temporary file is open and two frames are in the encoder
            seen.extend(p.name for p in tmp_path.iterdir() if p != target)
            raise error
        return real(av_module, array)

    monkeypatch.setattr(V, "_yuv_frame", failing)
    with pytest.raises(raised):
        V.save_video(blob_clip(frames=6), target)
    assert seen and seen[0].startswith(".clip.mp4.tmp-")  # a partial file existed ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # ... and is gone
    assert target.read_bytes() == b"the previous video"


def test_an_interrupted_preview_write_leaves_no_file(tmp_path, monkeypatch):
    def half_then_fail(self, fp, *args, **kwargs):
        open(fp, "wb").write(b"GIF89a half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        V.save_animation(blob_clip(frames=3), tmp_path / "clip.gif")
    assert list(tmp_path.iterdir()) == []


# --- animated previews --------------------------------------------------------------------------


def read_animation(path) -> tuple[list[np.ndarray], list[int], int | None]:
    with Image.open(path) as image:
        frames, delays = [], []
        for k in range(image.n_frames):
            image.seek(k)
            image.load()
            frames.append(np.asarray(image.convert("RGB")).astype(np.float32) / 255)
            delays.append(image.info["duration"])
        return frames, delays, image.info.get("loop")


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animated_preview_has_every_frame_in_order_and_loops(tmp_path, suffix):
    clip = coded_clips(n=1, frames=10, size=8)[0]
    path = V.save_animation(clip, tmp_path / f"clip{suffix}", fps=16)

    frames, delays, loop = read_animation(path)
    assert len(frames) == 10
    assert loop == 0  # 0 = loop forever
    assert frames[0].shape == (128, 128, 3)  # 8 px enlarged so the short side is 128
    assert abs(sum(delays) - 10 * 1000 / 16) <= 10  # 625 ms, to GIF's 10 ms resolution
    for k, frame in enumerate(frames):
        assert np.abs(frame - clip[k, :, 0, 0].numpy()).max() < 0.03  # flat colours survive GIF and WebP


def test_animated_preview_suffix_must_be_gif_or_webp(tmp_path):
    with pytest.raises(UserError, match=r"\.gif or \.webp"):
        V.save_animation(blob_clip(frames=2), tmp_path / "clip.png")
    assert list(tmp_path.iterdir()) == []


def test_gif_delays_add_up_to_the_clip_length():
    assert V._delays(4, 16, 10) == [60, 60, 70, 60]  # 250 ms in GIF's 10 ms steps, never drifting
    assert sum(V._delays(48, 16, 10)) == 3000
    assert V._delays(3, 16, 1) == [62, 63, 63]


# --- frame strips and animated grids ------------------------------------------------------------


def test_strip_frames_are_evenly_spaced_with_first_and_last():
    assert V.strip_frames(20, 5) == [0, 5, 10, 14, 19]
    assert V.strip_frames(81, 8) == [0, 11, 23, 34, 46, 57, 69, 80]
    assert V.strip_frames(6, 8) == [0, 1, 2, 3, 4, 5]
    assert V.strip_frames(9, 1) == [0]


def test_frame_strip_puts_frame_k_of_sample_n_where_it_says(tmp_path):
    clips = coded_clips(n=3, frames=20, size=8)
    strip = V.frame_strip(clips, columns=5)
    picked = V.strip_frames(20, 5)
    cell = 128  # 8 px frames enlarged 16x
    assert strip.shape == (3, 2 + 3 * (cell + 2), 2 + 5 * (cell + 2))
    for n in range(3):
        for j, k in enumerate(picked):
            y, x = cell_centre(n, j, cell)
            assert torch.allclose(strip[:, y, x], clips[n, k, :, 0, 0]), (n, j, k)
    assert (strip[:, 0] == 1).all() and (strip[:, :, 0] == 1).all()  # white border

    path = V.save_frame_strip(clips, tmp_path / "strip.png", columns=5)
    png = np.asarray(Image.open(path)).astype(np.float32) / 255
    y, x = cell_centre(2, 4, cell)
    assert png.shape == (strip.shape[1], strip.shape[2], 3)
    assert np.abs(png[y, x] - clips[2, 19, :, 0, 0].numpy()).max() <= 0.5 / 255 + 1e-6


def test_frame_strip_shows_every_frame_of_a_short_clip():
    clips = coded_clips(n=2, frames=3, size=8)
    strip = V.frame_strip(clips, columns=8, upscale=1)
    assert strip.shape == (3, 2 + 2 * 10, 2 + 3 * 10)
    assert torch.allclose(strip[:, cell_centre(1, 2, 8)[0], cell_centre(1, 2, 8)[1]], clips[1, 2, :, 0, 0])


def test_animated_grid_frame_k_holds_every_samples_frame_k():
    clips = coded_clips(n=5, frames=4, size=8)
    movie = V.animated_grid(clips, ncol=3)
    assert movie.shape == (4, *grid(clips[:, 0], 3).shape)
    for k in range(4):
        assert torch.equal(movie[k], grid(clips[:, k], 3))
        for n in range(5):
            y, x = cell_centre(*divmod(n, 3), 128)
            assert torch.allclose(movie[k, :, y, x], clips[n, k, :, 0, 0]), (n, k)
    # The sixth cell of the 2 x 3 grid is empty: white in every frame.
    y, x = cell_centre(1, 2, 128)
    assert (movie[:, :, y, x] == 1).all()


def test_wrong_shapes_are_refused_with_the_expected_layout():
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        V.save_animation(torch.zeros(2, 2, 3, 8, 8), "x.gif")
    with pytest.raises(ValueError, match=r"\[N, F, 3, H, W\]"):
        V.frame_strip(torch.zeros(4, 3, 8, 8))
