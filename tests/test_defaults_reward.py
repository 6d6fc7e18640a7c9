"""The reward is a resolvable setting: a model's recipe may name the one it trains on, the
user's `reward=` wins, and with neither it is shapes-alignment; `draft train`, its dry run,
a resumed run's config and `draft eval` all see the same choice (`draft.defaults`)."""

from __future__ import annotations

import json

import pytest

from draft.config import SamplingConfig, TrainConfig, load_config
from draft.defaults import explain, resolve, resolve_reward
from draft.errors import UserError

WHY = "the tiny model's recipe trains on brightness"


@pytest.fixture
def recipe_model(monkeypatch, tiny_sd):
    """An embedded model (the tiny SD pipeline) whose recipe names its reward."""
    from draft import models

    monkeypatch.setitem(models.EMBEDDED, "tiny-recipe", models.Embedded(tiny_sd, defaults={"reward": ("brightness", WHY)}))
    return "tiny-recipe"


def test_a_recipes_reward_fills_the_config_and_explain_says_whose(recipe_model):
    config = load_config(None, [f"model={recipe_model}"])
    assert config.reward == "brightness"
    assert f"reward=brightness: {recipe_model}'s default ({WHY}); set reward to change it" in explain(config)
    # The Python door resolves the same way as the command line.
    assert resolve(TrainConfig(model=recipe_model)).reward == "brightness"


def test_the_users_reward_wins_over_the_recipe(recipe_model):
    config = load_config(None, [f"model={recipe_model}", "reward=saturation"])
    assert config.reward == "saturation"
    assert not any(line.startswith("reward=") for line in explain(config))
    assert resolve_reward(recipe_model, "saturation") == "saturation"


def test_without_a_recipe_value_the_reward_is_shapes_alignment(tiny_sd):
    assert load_config(None, []).reward == "shapes-alignment"  # shapes-sd's recipe names none
    assert load_config(None, [f"model={tiny_sd}"]).reward == "shapes-alignment"
    assert resolve_reward(str(tiny_sd)) == "shapes-alignment"


def test_unset_is_accepted_before_resolution_and_blank_never(recipe_model):
    assert TrainConfig(model=recipe_model).validate().reward is None
    for blank in ("", "  "):
        with pytest.raises(UserError, match="reward must be a non-empty string"):
            load_config(None, [f"model={recipe_model}", f"reward={blank}"])


def test_the_resolved_reward_is_what_a_resumed_run_keeps(recipe_model, monkeypatch):
    from draft import models

    saved = load_config(None, [f"model={recipe_model}"]).to_dict()  # what config.yaml holds
    assert saved["reward"] == "brightness"
    # A later recipe that trains on another reward does not change the run being resumed.
    monkeypatch.setitem(models.EMBEDDED[recipe_model].defaults, "reward", ("saturation", "changed"))
    assert load_config(None, ["steps=3"], base=saved).reward == "brightness"
    assert load_config(None, [f"model={recipe_model}"]).reward == "saturation"


def test_dry_run_shows_the_recipes_reward_and_why(recipe_model, tmp_path, capsys):
    from draft.cli import main

    assert main(["train", f"model={recipe_model}", f"output_dir={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "reward: brightness" in out
    assert f"reward=brightness: {recipe_model}'s default ({WHY})" in out


def test_eval_without_reward_scores_with_the_recipes(recipe_model, tiny_sd, tmp_path, capsys):
    from draft.cli import main
    from draft.evaluation import evaluate

    out = tmp_path / "e.json"
    code = main(["eval", "--model", recipe_model, "--prompts", "a red circle|a blue star", "--seeds", "1",
                 "--steps", "2", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["reward"] == "brightness"
    # The same model, seeds and steps scored with brightness named explicitly give the same figure.
    named = evaluate(str(tiny_sd), "brightness", "a red circle|a blue star", 1,
                     sampling=SamplingConfig(num_steps=2), device="cpu")
    assert result["reward_mean"] == pytest.approx(named["reward_mean"])
