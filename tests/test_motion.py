"""The motion metrics and reward on procedurally drawn clips: a square moving right, left,
up or down over a coloured background, and a still one."""

from __future__ import annotations

import pytest
import torch

from draft.rewards.motion import MotionMagnitude, border_colour, centroid_track, frame_difference

BACKGROUND = (0.2, 0.4, 0.6)
SQUARE = (0.9, 0.1, 0.1)
# (dx, dy) in pixels per frame; y grows downwards, as in the frames.
MOTIONS = {"right": (2, 0), "left": (-2, 0), "up": (0, -2), "down": (0, 2), "still": (0, 0)}


def draw(dx: int, dy: int, frames: int = 8, size: int = 32, side: int = 6) -> torch.Tensor:
    """[F, 3, H, W]: a `side`-pixel square moving (dx, dy) pixels per frame, its path centred in the frame."""
    video = torch.tensor(BACKGROUND).view(1, 3, 1, 1).repeat(frames, 1, size, size)
    centre = (size - side) // 2
    for f in range(frames):
        x, y = (centre + (2 * f - (frames - 1)) * d // 2 for d in (dx, dy))
        video[f, :, y : y + side, x : x + side] = torch.tensor(SQUARE).view(3, 1, 1)
    return video


@pytest.fixture
def clips():
    return torch.stack([draw(*MOTIONS[name]) for name in MOTIONS])  # [5, F, 3, H, W]


def test_the_drawn_square_stays_inside_the_frame(clips):
    # Every frame shows the whole square (6x6 pixels) and a border of background.
    square = (clips - torch.tensor(SQUARE).view(1, 1, 3, 1, 1)).abs().sum(2) < 1e-6
    assert (square.sum((2, 3)) == 36).all()
    torch.testing.assert_close(border_colour(clips), torch.tensor(BACKGROUND).expand(5, 8, 3))


def test_the_centroid_follows_the_square(clips):
    track = centroid_track(clips)
    assert track.shape == (5, 8, 2)
    step = track[:, 1:] - track[:, :-1]  # per-frame displacement, in frame widths/heights
    for i, (dx, dy) in enumerate(MOTIONS.values()):
        expected = torch.tensor([dx / 32, dy / 32]).expand(7, 2)
        torch.testing.assert_close(step[i], expected, rtol=0, atol=1e-4)
    # The still square sits at the frame's centre.
    torch.testing.assert_close(track[4], torch.full((8, 2), 0.5), rtol=0, atol=1e-4)
    # An explicit background colour gives the same track as the border median.
    torch.testing.assert_close(centroid_track(clips, torch.tensor(BACKGROUND)), track)


def test_an_empty_frame_has_its_centre_as_centroid():
    blank = torch.full((1, 2, 3, 16, 16), 0.3)
    torch.testing.assert_close(centroid_track(blank), torch.full((1, 2, 2), 0.5))


def test_frame_difference_separates_still_from_moving(clips):
    d = frame_difference(clips)
    assert d[4] < 1e-7
    # A 6-pixel square moving 2 pixels changes 2 * 2 * 6 pixels of 32 * 32 per frame.
    changed = 2 * 2 * 6 / (32 * 32) * sum(abs(a - b) for a, b in zip(SQUARE, BACKGROUND)) / 3
    torch.testing.assert_close(d[:4], torch.full((4,), changed), rtol=1e-5, atol=0)


def test_gradients_reach_the_videos(clips):
    videos = clips.clone().requires_grad_(True)
    frame_difference(videos).sum().backward()
    assert torch.isfinite(videos.grad).all() and videos.grad[:4].abs().sum() > 0
    videos.grad = None
    track = centroid_track(videos)
    (track[:, -1, 0] - track[:, 0, 0]).sum().backward()  # "move right"
    assert torch.isfinite(videos.grad).all()
    assert (videos.grad.flatten(1).abs().sum(1) > 0).all()  # every clip, the still one included


def test_motion_magnitude_reward(clips):
    reward = MotionMagnitude()
    assert MotionMagnitude.video is True
    prompts = ["a square"] * 5
    torch.testing.assert_close(reward(clips, prompts), frame_difference(clips))
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        reward(clips[:, 0], prompts)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        reward(clips * 2, prompts)
    with pytest.raises(ValueError, match="5 videos but 1 prompts"):
        reward(clips, prompts[:1])
    with pytest.raises(ValueError, match="F >= 2"):
        frame_difference(clips[:, :1])


def test_a_floor_keeps_background_noise_from_pulling_the_centroid(clips):
    noisy = (clips + 0.05 * torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    exact = centroid_track(clips)
    # Without a floor, the noise on the large background drags the centroid towards the centre.
    plain = (centroid_track(noisy) - exact).abs().max()
    floored = (centroid_track(noisy, floor=0.15) - exact).abs().max()
    assert plain > 0.05 and floored < 0.02 and floored < plain / 4, (plain, floored)
    videos = noisy.clone().requires_grad_(True)
    centroid_track(videos, floor=0.15)[:, :, 0].sum().backward()
    assert torch.isfinite(videos.grad).all() and (videos.grad.flatten(1).abs().sum(1) > 0).all()
