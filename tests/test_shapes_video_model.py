"""The shipped shapes-video pipeline (a tiny Wan 2.1 text-to-video model of the moving-shapes
world): it loads and samples in plain diffusers, its recipe file is the code's recipe, it is
registered with the settings it was trained with, and `draft train` and `draft sample` run
on it end to end."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from draft.cli import main
from draft.models import EMBEDDED, shapes
from draft.models import shapes_video as sv
from draft.models import shapes_video_pretrain as svp

VIDEO_DIR = sv.PIPELINE_DIR
PROMPT = "a small red circle moving right on a blue background"


def _recipe() -> dict:
    return json.loads((VIDEO_DIR / "recipe.json").read_text())


def test_the_shipped_folder_is_the_code_recipe_and_registered_as_trained():
    info = _recipe()
    assert info["seed"] == 0 and not info["quick"]
    # The code's recipe is the one that built the shipped folder.
    assert info["recipe"] == json.loads(json.dumps(asdict(svp.Recipe())))
    entry = EMBEDDED["shapes-video"]
    assert entry.path == VIDEO_DIR and entry.pretrain == "draft.models.shapes_video_pretrain:pretrain"
    # Sampled with the context, size and length it was trained on.
    assert entry.options["max_sequence_length"] == info["max_sequence_length"] == svp.Recipe().max_tokens
    assert (entry.options["height"], entry.options["width"]) == (svp.Recipe().image_size,) * 2
    assert entry.options["frames"] == entry.defaults["sampling.frames"][0] == svp.Recipe().frames
    for split in ("train", "heldout"):
        assert (VIDEO_DIR / "prompts" / f"{split}.txt").read_text().splitlines() == sv.prompts(split)


def test_draft_train_fills_the_models_own_recipe():
    from draft.config import load_config
    from draft.models import WAN_WIDE_TARGETS

    config = load_config(None, ["model=shapes-video"])
    assert config.reward == "shapes-motion"  # the model's own reward, named by its recipe
    assert (config.method, config.steps, config.sampling.num_steps, config.sampling.frames) == ("draft", 800, 10, 9)
    assert config.sampling.checkpointing is False
    assert config.lora.target_modules == WAN_WIDE_TARGETS and config.log.eval_samples == 64
    assert load_config(None, ["model=shapes-video", "method=draft-lv"]).method == "draft-lv"  # the user's value wins


@pytest.mark.slow
def test_the_shipped_folder_samples_in_plain_diffusers():
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    pipe = WanPipeline.from_pretrained(VIDEO_DIR)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vae, AutoencoderKLWan) and isinstance(pipe.transformer, WanTransformer3DModel)

    def clip(seed):
        return pipe(PROMPT, height=32, width=32, num_frames=9, num_inference_steps=2, output_type="pt",
                    max_sequence_length=_recipe()["max_sequence_length"],
                    generator=torch.Generator().manual_seed(seed)).frames

    a = clip(0)
    assert a.shape == (1, 9, 3, 32, 32) and torch.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, clip(0))
    assert not torch.equal(a, clip(1))


def test_shipped_assets_are_within_budget_and_safetensors_only():
    files = [p for p in shapes.ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    weights = [p for p in VIDEO_DIR.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`draft train model=shapes-video` (its recipe names the reward) for 2 steps of a short chain."""
    out = tmp_path_factory.mktemp("video_runs")
    assert main(["train", "model=shapes-video", "steps=2", "batch_size=2",
                 "sampling.num_steps=3", "method=draft-k", "k=1", "log.eval_samples=2", "log.sample_prompts=2",
                 "log.sample_seeds=1", "log.trackers=[]", "--no-progress", f"output_dir={out}", "name=run"]) == 0
    return out / "run"


@pytest.mark.slow
def test_a_short_run_writes_a_lora_that_changes_the_clip_and_frame_strips(run):
    from diffusers import WanPipeline

    for name in ("samples/step-00000000.png", "samples/step-00000000.gif", "report/before_after.png",
                 "report/before_after.gif", "lora/pytorch_lora_weights.safetensors"):
        assert (run / name).is_file(), name
    evaluation = json.loads((run / "report" / "eval.json").read_text())
    assert 0 <= evaluation["after"]["accuracy_joint"] <= 1  # the model's own metrics (shapes-motion)

    def clip(lora):
        pipe = WanPipeline.from_pretrained(VIDEO_DIR)
        pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora_weights(run / "lora")
        return pipe(PROMPT, height=32, width=32, num_frames=9, num_inference_steps=3, output_type="pt",
                    max_sequence_length=_recipe()["max_sequence_length"],
                    generator=torch.Generator().manual_seed(0)).frames

    assert (clip(True) - clip(False)).abs().max() > 1e-4


@pytest.mark.slow
def test_the_cards_snippet_samples_the_embedded_model_as_trained(run):
    import re

    code = re.search(r"```python\n(.*?)```", (run / "lora" / "README.md").read_text(), re.S).group(1)
    assert 'EMBEDDED["shapes-video"].path' in code and "max_sequence_length=16" in code
    # Run up to the clip: diffusers' export_to_video needs imageio or OpenCV, optional here.
    code = code.replace("path/to/this/folder", str(run / "lora")).split("export_to_video(frames")[0]
    namespace: dict = {}
    exec(compile(code, "card", "exec"), namespace)
    assert len(namespace["frames"]) == 9 and namespace["frames"][0].shape[:2] == (32, 32)


@pytest.mark.slow
def test_draft_sample_writes_an_mp4_of_the_trained_model(run, tmp_path):
    from draft.video import read_video, video_info

    out = tmp_path / "samples"
    assert main(["sample", "--model", "shapes-video", "--lora", str(run), "--prompt", PROMPT, "--steps", "3",
                 "--out", str(out)]) == 0
    clip = out / "000-0.mp4"
    assert video_info(clip).frames == 9 and read_video(clip).shape[0] == 9


def test_draft_eval_scores_it_with_its_own_reward_and_metrics(tmp_path):
    from draft.config import load_config

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "shapes-video", "--prompts", PROMPT, "--seeds", "1", "--steps", "2",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["reward"] == "shapes-motion" and result["n"] == 1
    assert {"accuracy_direction", "accuracy_joint", "travel", "motion"} <= result.keys()
    # What the clips were drawn with: the user's step count, the model's own guidance and frames.
    sampled = result["sampling"]
    assert (sampled["num_steps"], sampled["frames"]) == (2, 9)
    assert sampled["guidance_scale"] == load_config(None, ["model=shapes-video"]).sampling.guidance_scale == 5.0
