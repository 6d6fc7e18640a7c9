"""Wan video end to end on a tiny `WanPipeline` built in code: `draft train` with an image
reward on chosen frames, the LoRA in plain diffusers, `draft sample` writing playable mp4s,
the ComfyUI export, and the frame choice that is the same everywhere."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from draft.cli import main
from draft.models.tiny import PROMPTS, build_tiny

SIZE = ["sampling.height=16", "sampling.width=16", "sampling.frames=9"]
FAST = ["reward=brightness", f"prompts={'|'.join(PROMPTS)}", f"eval_prompts={'|'.join(PROMPTS[:2])}",
        "sampling.num_steps=3", "batch_size=2", "lr=5e-2", "log.sample_prompts=2", "log.sample_seeds=1",
        "log.trackers=[]", "--no-progress", *SIZE]


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("wan"), "wan")


@pytest.fixture(scope="module")
def wan_run(wan, tmp_path_factory):
    """`draft train model=WAN reward=brightness` (sizes small for the tiny model), scored on 3
    evenly spaced frames."""
    out = tmp_path_factory.mktemp("wan_runs")
    assert main(["train", f"model={wan}", *FAST, "method=draft-k", "k=2", "steps=2", "reward_frames=3",
                 "log.eval_samples=2", f"output_dir={out}", "name=run"]) == 0
    return out / "run"


def test_a_wan_run_leaves_strips_animations_a_card_and_a_motion_figure(wan_run):
    for name in ("samples/step-00000000.png", "samples/step-00000000.gif", "samples/step-00000002.png",
                 "report/before_after.png", "report/before_after.gif", "lora/before_after.gif",
                 "lora/pytorch_lora_weights.safetensors"):
        assert (wan_run / name).is_file(), name
    evaluation = json.loads((wan_run / "report" / "eval.json").read_text())
    assert evaluation["after"]["n"] == 2 and evaluation["before"]["motion"] > 0  # every video run reports motion
    card = (wan_run / "lora" / "README.md").read_text()
    assert "text-to-video" in card and "export_to_video" in card and "num_frames=9" in card
    assert "--format comfyui" in card and "before_after.gif" in card


def test_the_lora_loads_in_wan_pipeline_and_changes_the_video(wan_run, wan):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    def video(lora):
        pipe = WanPipeline.from_pretrained(wan)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora_weights(wan_run / "lora")
        return pipe(PROMPTS[0], height=16, width=16, num_frames=9, num_inference_steps=3, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).frames

    assert (video(True) - video(False)).abs().max() > 1e-3


def test_draft_sample_writes_playable_videos(wan_run, wan, tmp_path):
    from draft.video import read_video, video_info

    out = tmp_path / "samples"
    assert main(["sample", "--model", str(wan), "--lora", str(wan_run), "--prompt", PROMPTS[0], "--num-images", "2",
                 "--steps", "3", "--height", "16", "--width", "16", "--frames", "9", "--out", str(out)]) == 0
    for k in range(2):
        clip = out / f"{k:03d}-{k}.mp4"
        info = video_info(clip)
        assert (info.frames, info.fps) == (9, 16)  # Wan's own frame rate
        assert read_video(clip).shape[0] == 9 and (out / f"{k:03d}-{k}.gif").is_file()
    assert (out / "grid.png").is_file() and (out / "grid.gif").is_file()


def test_the_comfyui_export_names_every_adapted_layer_the_wan_way(wan_run, tmp_path):
    from safetensors.torch import load_file

    from draft.export import read_lora
    from draft.models.wan import original_name

    out = tmp_path / "comfy.safetensors"
    assert main(["export", str(wan_run), "--format", "comfyui", "--out", str(out)]) == 0
    keys = load_file(out).keys()
    lora = read_lora(wan_run)
    assert {k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k} == {
        f"diffusion_model.{original_name(m)}" for m in lora.down}
    assert any(".self_attn.q." in k for k in keys) and any(".cross_attn.o." in k for k in keys)
    # kohya names are for UNets: a one-line refusal that says which formats Wan has
    assert main(["export", str(wan_run), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2


def test_exactly_the_chosen_frames_carry_gradient(wan):
    """The reward sees the chosen frames only, and the gradient reaches only the latent
    frames those need (frame 4 needs latent frames 0 and 1 of 3)."""
    from draft.methods import Sampler
    from draft.models import load_model
    from draft.models.base import Size
    from draft.rewards import FunctionReward
    from draft.sampling import SampleNoise

    model = load_model(str(wan))
    seen = []
    reward = FunctionReward(lambda images, prompts: (seen.append(images.shape), images.mean((1, 2, 3)))[1], "b")
    size = Size(16, 16, 9)
    sampler = Sampler(model, reward, model.schedule(3, size), size=size)
    x = SampleNoise([0, 1], model.latent_shape(size), "cpu").draw().requires_grad_(True)
    sampler.score(x, PROMPTS[:2], frames=(0, 4)).sum().backward()
    assert seen == [(4, 3, 16, 16)]  # an image reward: 2 videos x 2 frames
    per_latent_frame = x.grad.abs().sum((0, 1, 3, 4))
    assert per_latent_frame[0] > 0 and per_latent_frame[1] > 0 and per_latent_frame[2] == 0


def test_the_frame_choice_is_made_once_per_step_alike_everywhere():
    """Every micro-batch and process of a step gets the same frames (a pure function of
    (seed, step)); steps differ for a random choice."""
    from draft.plan import choose_frames

    assert choose_frames(0, 3, 9, 3, "even") == (0, 4, 8)
    assert choose_frames(0, 3, 9, 2, "first") == (0, 1)
    assert choose_frames(0, 3, 9, 0, "random") is None and choose_frames(0, 3, 0, 3, "even") is None
    picks = {choose_frames(0, step, 33, 4, "random") for step in range(20)}
    assert len(picks) > 10 and all(len(p) == 4 and list(p) == sorted(p) for p in picks)
    assert choose_frames(0, 5, 33, 4, "random") == choose_frames(0, 5, 33, 4, "random")


def test_a_video_reward_sees_whole_videos_and_an_image_reward_their_frames():
    from draft.rewards import FunctionReward, from_config

    videos = torch.rand(2, 5, 3, 8, 8)
    per_frame = FunctionReward(lambda images, prompts: images.mean((1, 2, 3)), "mean")
    torch.testing.assert_close(per_frame(videos, ["a", "b"]), videos.mean((1, 2, 3, 4)))

    def motion(videos, prompts):
        return (videos[:, 1:] - videos[:, :-1]).abs().mean((1, 2, 3, 4))

    motion.video = True
    torch.testing.assert_close(FunctionReward(motion)(videos, ["a", "b"]), motion(videos, None))
    both = from_config("brightness:1.0+motion:2.0")  # an image and a video reward, summed
    assert both(videos, ["a", "b"]).shape == (2,)
    with pytest.raises(ValueError, match="scores videos"):
        from_config("motion")(torch.rand(2, 3, 8, 8), ["a", "b"])


def test_a_wan_folder_trains_with_nothing_but_model_and_reward(wan, tmp_path):
    """`draft train model=FOLDER reward=R`: the family's defaults fill the rest (Wan's 50
    steps, guidance 5, 81 frames, 8 evaluation videos), as the dry run shows."""
    from draft.config import load_config

    config = load_config(None, [f"model={wan}", "reward=brightness"])
    assert (config.sampling.num_steps, config.sampling.guidance_scale, config.sampling.frames) == (50, 5.0, 81)
    assert config.log.eval_samples == 8 and config.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    # The dry run's estimate at Wan's native 480p (the tiny model's rotary table is too short
    # for that, so its native size is told here).
    assert main(["train", f"model={wan}", "reward=brightness", "--dry-run", f"output_dir={tmp_path}",
                 "model_options.height=16", "model_options.width=16", "model_options.frames=9"]) == 0


@pytest.mark.slow
def test_two_processes_equal_one_on_tiny_wan(wan, tmp_path, one_thread, launch_two_processes):
    from safetensors.torch import load_file

    common = [f"model={wan}", *FAST, "method=draft-lv", "batch_size=1", "steps=2", "log.eval_samples=0",
              "reward_frames=2", "reward_frame_choice=random", f"output_dir={tmp_path}"]
    launch, env = launch_two_processes
    two = subprocess.run([*launch, "train", *common, "name=two"], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert main(["train", *common, "name=one", "batch_size=2"]) == 0
    one, both = (load_file(tmp_path / n / "lora" / "pytorch_lora_weights.safetensors") for n in ("one", "two"))
    assert one.keys() == both.keys()
    # The round-off of batch 1 against batch 2 kernels and the all-reduce, amplified by Adam
    # (whose first steps move a weight by about lr·sign(g) however small g is), can move a
    # single weight by a visible amount; the update as a whole (lora_B starts at zero, so it
    # is the update) must agree to 1% of its norm, where a wrong reduction differs by O(1).
    diff = sum(float(((one[k] - both[k]) ** 2).sum()) for k in one) ** 0.5
    update = sum(float((one[k] ** 2).sum()) for k in one if ".lora_B." in k) ** 0.5
    assert update > 0 and diff / update < 1e-2, (diff, update)
