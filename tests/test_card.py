"""The model card a run leaves in lora/README.md: Hub front matter, the parts it promises, working links."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from draft.card import front_matter
from draft.config import LogConfig, LoraConfig, SamplingConfig, TrainConfig


@pytest.fixture(scope="module")
def card_run(tiny_sd, tmp_path_factory):
    from draft.trainer import train

    config = TrainConfig(
        model=str(tiny_sd), reward="brightness", prompts="a small red circle|a large blue square|a green star",
        eval_prompts="a small red circle|a green star", method="draft-k", k=2, steps=2, batch_size=2, lr=1e-2,
        output_dir=str(tmp_path_factory.mktemp("card")), name="bright", seed=3,
        sampling=SamplingConfig(num_steps=4, guidance_scale=3.0), lora=LoraConfig(rank=4, alpha=8.0),
        log=LogConfig(sample_every=10, sample_prompts=2, sample_seeds=1, checkpoint_every=0, eval_samples=2, trackers=()),
    )
    return train(config, progress=False)


def split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, sep, body = card[4:].partition("\n---\n")
    assert sep, "front matter is not closed"
    return yaml.safe_load(head), body


def test_run_leaves_a_hub_lora_card(card_run, tiny_sd):
    lora = card_run / "lora"
    meta, body = split((lora / "README.md").read_text())
    assert meta["library_name"] == "diffusers"
    assert {"lora", "text-to-image", "draft", "reward-brightness", "draft-k"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder is no hub id
    # The parts a card promises.
    assert f"`{tiny_sd}`" in body  # base model
    assert "`brightness`" in body and "`draft-k`" in body and "last 2 sampling steps" in body
    assert re.search(r"\| optimizer steps \| 2 \|", body)
    assert "rank 4, alpha 8.0, on " in body and "`to_q`" in body and "| learning rate | 0.01" in body
    assert r"| training prompts | `a small red circle\|a large blue square\|a green star` |" in body  # '|' escaped
    assert "4 steps, guidance 3.0" in body
    # The held-out table: the evaluation's figures before and after, from report/eval.json.
    import json

    evaluation = json.loads((card_run / "report" / "eval.json").read_text())
    assert "## Held-out evaluation" in body and "| metric | before | after |" in body
    row = re.search(r"\| reward_mean \| (\S+) \| (\S+) \|", body)
    assert row and float(row[1]) == pytest.approx(evaluation["before"]["reward_mean"], rel=1e-3)
    assert float(row[2]) == pytest.approx(evaluation["after"]["reward_mean"], rel=1e-3)
    # How to load it.
    assert "load_lora_weights" in body and "--format kohya" in body and "ComfyUI" in body and "AUTOMATIC1111" in body

    # Every relative link (the before/after grid) resolves to a file in lora/, so the folder can be uploaded alone.
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", body) if not t.startswith(("http://", "https://"))]
    assert "before_after.png" in links
    for target in links:
        assert (lora / target).is_file(), target
        assert (lora / target).resolve().parent == lora.resolve()


def test_card_export_command_works(card_run):
    """The card's ComfyUI/A1111 command, run as written, writes the file it names."""
    from draft.cli import main

    body = (card_run / "lora" / "README.md").read_text()
    line = next(line for line in body.splitlines() if line.startswith("draft export") and "kohya" in line)
    command, _, comment = line.partition("#")
    assert main(shlex.split(command)[1:]) == 0
    written = comment.split("writes", 1)[1].strip()
    assert written == str(card_run / "lora" / "bright-kohya.safetensors") and Path(written).is_file()


def test_front_matter_for_hub_and_embedded_models():
    hub = front_matter({"model": "stabilityai/stable-diffusion-xl-base-1.0", "reward": "aesthetic:1.0+hpsv2:0.5",
                        "method": "draft-lv"})
    assert hub["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert {"reward-aesthetic", "reward-hpsv2"} <= set(hub["tags"]) and "license" not in hub
    embedded = front_matter({"model": "shapes-sd", "reward": "shapes-alignment", "method": "draft-lv"})
    assert embedded["license"] == "apache-2.0" and "base_model" not in embedded
    assert yaml.safe_load(yaml.safe_dump(hub)) == hub


def _quick_run(model: str, out, **changes):
    from draft.trainer import train

    config = TrainConfig(model=model, reward="brightness", prompts="a small red circle on a blue background",
                         eval_prompts="a large green square on a white background", steps=1, batch_size=1,
                         output_dir=str(out), name="quick", sampling=SamplingConfig(num_steps=3),
                         log=LogConfig(sample_prompts=1, sample_seeds=1, checkpoint_every=0, eval_samples=0,
                                       trackers=()), **changes)
    return train(config, progress=False)


def run_card_snippet(run: Path, tmp_path: Path, monkeypatch) -> str:
    """The card's diffusers snippet, run as written (the LoRA path filled in); returns it."""
    body = (run / "lora" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    assert "'path/to/this/folder'" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("path/to/this/folder", str(run / "lora")), "card", "exec"), {})
    return code


def test_the_cards_snippet_runs_for_a_users_own_folder(card_run, tmp_path, monkeypatch):
    code = run_card_snippet(card_run, tmp_path, monkeypatch)
    assert "StableDiffusionPipeline.from_pretrained" in code and (tmp_path / "sample.png").is_file()


@pytest.mark.parametrize("model", ["shapes-sd", "shapes-flow"])
def test_the_cards_snippet_runs_for_the_embedded_models(model, tmp_path, monkeypatch):
    run = _quick_run(model, tmp_path / "runs")
    code = run_card_snippet(run, tmp_path, monkeypatch)
    assert f'EMBEDDED["{model}"].path' in code and (tmp_path / "sample.png").is_file()
    if model == "shapes-flow":  # trained without T5's zero tokens, and sampled so by the snippet
        assert "max_sequence_length=0" in code
