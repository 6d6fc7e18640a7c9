"""The moving-shapes world and its `shapes-motion` reward and metrics, on rendered clips:
prompts and splits, the motion the reward reads against the motion the renderer drew,
where the reward's gradient goes, and the metrics on true and shuffled prompts."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from draft import rewards
from draft.errors import UserError
from draft.models import shapes
from draft.models import shapes_video as sv
from draft.rewards import shapes_motion as sm

PROMPT = "a small red circle moving right on a blue background"


@pytest.fixture(scope="module")
def clips():
    return sv.draw_clips(48, seed=7)


def _varied(motion: str) -> list[sv.ClipAttributes]:
    """Every shape once with `motion`, the sizes alternating and the colours and backgrounds varied."""
    out = []
    for i, shape in enumerate(shapes.SHAPES):
        colour = shapes.COLOUR_NAMES[i]
        background = shapes.COLOUR_NAMES[(3 * i + 5) % len(shapes.COLOUR_NAMES)]
        out.append(sv.ClipAttributes(shape, colour, background, shapes.SIZES[i % 2], motion))
    return out


def test_prompts_round_trip():
    combos = sv.combinations("all")
    assert len(combos) == len(shapes.combinations("all")) * len(sv.MOTIONS)
    for a in combos:
        p = sv.prompt_of(a)
        assert sv.parse_prompt(p) == a and sv.parse_prompt(f"  {p.upper()} ") == a
        assert shapes.parse_prompt(sv.frame_prompt(p)) == a.frame()
    assert sv.prompt_of(sv.parse_prompt(PROMPT)) == PROMPT
    assert sv.prompt_of(sv.ClipAttributes("star", "white", "orange", "large", "still")) == (
        "a large white star staying still on an orange background")


@pytest.mark.parametrize("bad", [
    "a small red circle on a blue background",  # the shapes world's: no motion
    "a small red circle moving still on a blue background",
    "a small red circle moving sideways on a blue background",
    "a small red circle moving right on a blue blue background",
    "a small red circle moving right on a red background",  # shape and background alike
])
def test_foreign_prompts_are_refused(bad):
    with pytest.raises(ValueError):
        sv.parse_prompt(bad)


def test_splits_are_disjoint_and_hold_out_pairings_only():
    train, heldout = sv.combinations("train"), sv.combinations("heldout")
    assert not set(train) & set(heldout) and sorted(train + heldout) == sv.combinations("all")
    # Every shape and every motion is trained on; only the (shape, motion) pairing is new.
    assert {a.shape for a in train} == set(shapes.SHAPES) and {a.motion for a in train} == set(sv.MOTIONS)
    assert {(a.shape, a.motion) for a in heldout} == set(sv.HELDOUT_PAIRS)
    assert not {(a.shape, a.motion) for a in train} & sv.HELDOUT_PAIRS
    assert {s for s, _ in sv.HELDOUT_PAIRS} == set(shapes.SHAPES)
    assert {m for _, m in sv.HELDOUT_PAIRS} == set(sv.MOTIONS)
    assert sv.draw_clips(20, seed=1, split="heldout").attributes[0] in heldout


def test_shipped_prompt_files_match_the_prompt_sets(tmp_path):
    for split in ("train", "heldout"):
        assert sv.prompt_file(split).read_text().splitlines() == sv.prompts(split)
    written = sv.write_prompt_files(tmp_path)
    assert [p.read_text() for p in written] == [sv.prompt_file(s).read_text() for s in ("train", "heldout")]


def test_clips_are_reproducible_and_keep_the_shape_whole_inside(clips):
    again = sv.draw_clips(48, seed=7)
    np.testing.assert_array_equal(again.videos, clips.videos)
    assert clips.videos.shape == (48, sv.DEFAULT_FRAMES, 3, 32, 32)
    v = torch.from_numpy(clips.videos)
    bg = v[:, :, :, 0, 0]  # a corner is background
    border = torch.cat([v[..., 0, :], v[..., -1, :], v[..., 0], v[..., -1]], -1)
    torch.testing.assert_close(border, bg[..., None].expand_as(border), rtol=0, atol=1e-6)
    # The shape's anti-aliased area (the fraction of the shape's colour in each pixel, summed)
    # stays the same from frame to frame: it never leaves the frame.
    dist = (v - bg[..., None, None]).norm(dim=2)
    area = (dist / dist.amax((1, 2, 3), keepdim=True)).sum((2, 3))
    assert ((area.amax(1) - area.amin(1)) <= 0.08 * area.amin(1)).all()  # 4x supersampling: about 5% at worst


@pytest.mark.parametrize("motion", sv.MOTIONS)
def test_the_motion_read_agrees_with_the_renderer(motion):
    attrs = _varied(motion)
    videos = torch.from_numpy(np.stack([sv.render_clip(a, seed) for seed, a in enumerate(attrs)]))
    d = sm.displacement(videos)
    step = torch.tensor(sv.DIRECTIONS[motion], dtype=torch.float32)
    along, across = d @ step, d @ step.flip(0)
    if motion == "still":
        assert d.abs().max() < 1e-4
    else:
        # Every clip moves the prompt's way by more than the 'still' threshold, and not sideways.
        assert (along > 1.5 * sm.STILL).all() and (across.abs() < 0.01).all(), d
    assert sm.motion_logits(videos).argmax(1).tolist() == [sv.MOTIONS.index(motion)] * len(attrs)


def test_the_motion_read_survives_the_corruptions_the_classifier_is_trained_for():
    """Colour gain and offset, blur and pixel noise drawn afresh for every frame (harsher than
    one draw per clip): the direction is still read right, the 'still' clips included."""
    from draft.models.shapes_classifier import augment

    batch = sv.draw_clips(60, seed=3)
    videos = torch.from_numpy(batch.videos)
    corrupted = torch.stack([augment(v, torch.Generator().manual_seed(i)) for i, v in enumerate(videos)])
    read = sm.motion_logits(corrupted).argmax(1)
    truth = torch.tensor([sv.MOTIONS.index(a.motion) for a in batch.attributes])
    assert (read == truth).float().mean() >= 0.95
    assert sum(a.motion == "still" for a in batch.attributes) >= 6  # the hard case is in the sample


def test_the_displacement_is_the_travel_of_a_painted_shape():
    fg, bg = np.array([0.9, 0.2, 0.1]), np.array([0.1, 0.3, 0.8])
    path = [(6.0 + 2.5 * f, 20.0 - 1.0 * f) for f in range(5)]  # 10 px right and 4 px up over 32
    video = torch.from_numpy(np.stack([shapes.paint("square", c, 4.0, fg, bg, 32) for c in path]))[None]
    torch.testing.assert_close(sm.displacement(video), torch.tensor([[10 / 32, -4 / 32]]), rtol=0, atol=2e-3)


def test_the_reward_gradient_reaches_the_frames_it_scores_and_only_those(clips):
    reward = rewards.get("shapes-motion")
    assert reward.video is True
    videos = torch.from_numpy(clips.videos[:4]).mul(0.9).add(0.05).requires_grad_(True)
    picked = [0, 4, 8]
    r = reward(videos[:, picked], clips.prompts[:4])
    assert r.shape == (4,) and torch.isfinite(r).all() and (r <= 0).all()
    r.sum().backward()
    per_frame = videos.grad.abs().sum((2, 3, 4))  # [B, F]
    assert (per_frame[:, picked] > 0).all()
    assert (per_frame[:, [f for f in range(sv.DEFAULT_FRAMES) if f not in picked]] == 0).all()
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())
    with pytest.raises(UserError, match="at least 2 frames"):
        reward(videos[:, :1].detach(), clips.prompts[:4])
    with pytest.raises(UserError, match="moving-shapes prompts"):
        reward(videos.detach(), [sv.frame_prompt(p) for p in clips.prompts[:4]])


def test_the_motion_term_pushes_a_still_clip_the_prompts_way():
    a = sv.ClipAttributes("circle", "red", "blue", "small", "still")
    still = torch.from_numpy(sv.render_clip(a, 0))[None].requires_grad_(True)
    reward = rewards.get("shapes-motion", attributes=["shape"])
    prompt = sv.prompt_of(sv.ClipAttributes("circle", "red", "blue", "small", "right"))
    reward(still, [prompt]).sum().backward()
    # Moving the shape's pixels right (the reward's ascent direction, applied a little) helps.
    moved = (still + 0.02 * still.grad.sign()).clamp(0, 1).detach()
    assert sm.displacement(moved)[0, 0] > sm.displacement(still.detach())[0, 0]
    assert reward(moved, [prompt]) > reward(still.detach(), [prompt])


def test_the_wan_decode_sends_the_reward_gradient_to_the_latent_frames_it_needs(tmp_path):
    """Through a tiny Wan's sampler and causal VAE: frames 0 and 4 need latent frames 0 and 1 of 3."""
    from draft.methods import Sampler
    from draft.models import load_model
    from draft.models.base import Size
    from draft.models.tiny import build_tiny
    from draft.sampling import SampleNoise

    model = load_model(str(build_tiny(tmp_path, "wan")))
    size = Size(16, 16, 9)
    sampler = Sampler(model, rewards.get("shapes-motion"), model.schedule(2, size), size=size)
    x = SampleNoise([0, 1], model.latent_shape(size), "cpu").draw().requires_grad_(True)
    sampler.score(x, [PROMPT, PROMPT], frames=(0, 4)).sum().backward()
    per_latent_frame = x.grad.abs().sum((0, 1, 3, 4))
    assert per_latent_frame[0] > 0 and per_latent_frame[1] > 0 and per_latent_frame[2] == 0


def test_true_prompts_score_above_wrong_ones(clips):
    reward = rewards.get("shapes-motion")
    videos = torch.from_numpy(clips.videos)
    right = reward(videos, clips.prompts)
    assert (right > -1.0).all()
    for change in ("shape", "colour", "motion"):
        wrong = []
        for a in clips.attributes:
            classes = sv.ATTRIBUTES[change]
            other = classes[(classes.index(getattr(a, change)) + 1) % len(classes)]
            if change == "colour" and other == a.background:
                other = classes[(classes.index(other) + 1) % len(classes)]
            wrong.append(sv.prompt_of(sv.ClipAttributes(**{**a.__dict__, change: other})))
        assert (right > reward(videos, wrong) + 1.0).all(), change


def test_the_metrics_on_true_and_shuffled_prompts(clips):
    videos = torch.from_numpy(clips.videos)
    true = sm.motion_metrics(videos, clips.prompts)
    assert set(true) == {*(f"accuracy_{k}" for k in (*shapes.ATTRIBUTES, "direction", "joint")), "travel",
                         "consistency"}
    assert all(true[k] == 1.0 for k in true if k.startswith("accuracy_")) and true["consistency"] == 1.0
    moving = [a.motion != "still" for a in clips.attributes]
    assert true["travel"] * len(moving) > 0.15 * sum(moving)  # a moving shape crosses a good part of the frame
    shuffled = clips.prompts[:]
    random.Random(0).shuffle(shuffled)
    wrong = sm.motion_metrics(videos, shuffled)
    # Near chance: 1/6 shapes, about 1/9 colours, 1/5 motions.
    assert wrong["accuracy_shape"] < 0.45 and wrong["accuracy_colour"] < 0.35
    assert wrong["accuracy_direction"] < 0.45 and wrong["accuracy_joint"] < 0.1
    assert wrong["travel"] == true["travel"] and wrong["consistency"] == 1.0


def test_flickering_and_still_clips_show_in_the_metrics(clips):
    videos = torch.from_numpy(clips.videos[:8])
    # Every other frame taken from the next clip: the subject changes between frames.
    mixed = videos.clone()
    mixed[:, 1::2] = videos.roll(1, 0)[:, 1::2]
    same = [(a.shape, a.colour) == (b.shape, b.colour)
            for a, b in itertools.pairwise(clips.attributes[7:8] + clips.attributes[:8])]
    expected = sum(1.0 if s else 0.0 for s in same) / 8
    torch.testing.assert_close(sm.consistency(mixed).mean(), torch.tensor(expected))
    frozen = videos[:, :1].expand_as(videos)  # the first frame held: no motion at all
    read = sm.motion_metrics(frozen, clips.prompts[:8])
    assert read["travel"] < 1e-4
    moving = sum(a.motion != "still" for a in clips.attributes[:8])
    assert read["accuracy_direction"] == pytest.approx(1 - moving / 8)


def test_an_evaluation_reports_the_world_figures_and_the_diversity_between_seeds():
    """The metrics as `draft eval` wires a model's own (`Embedded.metrics`): two seeds of each
    prompt, scored batch by batch beside the reward, the motion figure and the diversity."""
    from draft.evaluation import score_batches

    attrs = sv.combinations("heldout")[::180]
    prompts = [sv.prompt_of(a) for a in attrs for _ in range(2)]
    groups = [i for i in range(len(attrs)) for _ in range(2)]
    videos = torch.from_numpy(np.stack([sv.render_clip(a, seed) for a in attrs for seed in (0, 1)]))

    def evaluate(videos):
        batches = [(videos[i : i + 4], prompts[i : i + 4], groups[i : i + 4]) for i in range(0, len(prompts), 4)]
        return score_batches(batches, rewards.get("shapes-motion"), sm.motion_metrics)

    out = evaluate(videos)
    assert out["n"] == len(prompts) and out["accuracy_joint"] == 1.0 and out["consistency"] == 1.0
    assert out["reward_mean"] > -0.5 and out["motion"] > 0 and out["travel"] > 0.1
    assert out["diversity"] > 0.05  # two seeds draw each prompt in two places and shades
    assert evaluate(videos[::2].repeat_interleave(2, 0))["diversity"] == 0  # one seed's clip twice
