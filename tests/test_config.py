"""Configs: YAML, dotted overrides, type checks, validation."""

from __future__ import annotations

import pytest
import yaml

from draft.config import TrainConfig, dump_yaml, load_config
from draft.errors import UserError


def test_defaults_are_the_documented_recipe():
    c = load_config()
    assert (c.model, c.reward, c.method, c.prompts) == ("shapes-sd", "shapes-alignment", "draft-lv", "train")
    assert (c.lora.rank, c.lr, c.batch_size, c.lv_n, c.steps) == (8, 1.5e-3, 4, 2, 500)  # shapes-sd's recipe
    assert c.log.eval_samples == 2 * 180  # every held-out shapes prompt twice: diversity is measured
    assert c.sampling.num_steps == 20 and c.sampling.eta == 0.0
    other = load_config(None, ["model=shapes-flow"])  # draft's own learning rate where a recipe sets none
    assert other.lr == 1e-3


def test_yaml_and_overrides_compose(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: draft-k\nk: 3\nsampling:\n  num_steps: 20\nlora:\n  target_modules: [to_q, to_v]\n")
    c = load_config(f, ["k=5", "sampling.guidance_scale=4", "lr=1e-3", "reward_args.aesthetic.model=/x",
                        "lora.target_modules=to_k,to_out.0"])
    assert (c.method, c.k, c.sampling.num_steps, c.sampling.guidance_scale, c.lr) == ("draft-k", 5, 20, 4.0, 1e-3)
    assert c.reward_args == {"aesthetic": {"model": "/x"}}
    assert c.lora.target_modules == ("to_k", "to_out.0")


def test_resolved_config_round_trips(tmp_path):
    c = load_config(None, ["method=alignprop", "alignprop_k_max=7", "log.trackers=[]"])
    dump_yaml(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c
    assert isinstance(yaml.safe_load((tmp_path / "config.yaml").read_text()), dict)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lerning_rate=1"], "unknown config key 'lerning_rate'"),
        (["sampling.num_step=3"], "did you mean 'num_steps'"),
        (["steps=abc"], "steps must be an integer"),
        (["lr=fast"], "lr must be a number"),
        (["sampling.checkpointing=maybe"], "must be true, false or auto"),
        (["steps=0"], "steps must be positive"),
        (["sampling.num_steps=-5"], "must be positive"),
        (["method=draft-k", "k=80"], "k=80 is larger than sampling.num_steps=20"),
        (["method=drft-lv"], "did you mean 'draft-lv'"),
        (["mixed_precision=fp8"], "unknown mixed_precision"),
        (["steps"], "not of the form key=value"),
        (["sampling=3"], "sampling must be a mapping"),
        (["method=alignprop", "alignprop_k_min=9", "alignprop_k_max=3"], "alignprop_k_min"),
        (["sampling.height=100"], "multiples of 8"),
        (["sampling.guidance_gradient=uncond"], "unknown sampling.guidance_gradient"),
        (["method=draft-lv", "lv_step=50"], "lv_step < sampling.num_steps"),
    ],
)
def test_bad_values_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_method_knobs_are_checked_only_for_their_method():
    # AlignProp's default k_max (10) exceeds a 5-step sampler, but draft-lv does not use it.
    assert load_config(None, ["sampling.num_steps=5"]).method == "draft-lv"
    with pytest.raises(UserError):
        load_config(None, ["sampling.num_steps=5", "method=alignprop"])


def test_config_is_frozen():
    with pytest.raises(Exception):
        TrainConfig().steps = 3  # type: ignore[misc]


def test_shipped_configs_validate():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_an_embedded_model_brings_its_own_defaults_and_the_user_wins():
    from draft.defaults import explain

    flow = load_config(None, ["model=shapes-flow"])
    assert flow.sampling.guidance_scale == 4.0
    assert any("sampling.guidance_scale=4.0: shapes-flow's default" in line for line in explain(flow))
    assert load_config(None, ["model=shapes-flow", "sampling.guidance_scale=6"]).sampling.guidance_scale == 6.0
    assert load_config(None, []).sampling.guidance_scale == 7.5  # shapes-sd has none


def test_shapes_flow_brings_its_own_recipe_and_a_users_method_keeps_its_own_defaults():
    from draft.models import SD3_WIDE_TARGETS

    flow = load_config(None, ["model=shapes-flow"])
    assert (flow.method, flow.sampling.num_steps, flow.steps, flow.kl_coeff) == ("draft", 10, 800, 0.0)
    assert flow.lora.target_modules == SD3_WIDE_TARGETS
    # A method the user names replaces the model's; the model's other values stay, and the
    # named method's own defaults still apply over them.
    lv = load_config(None, ["model=shapes-flow", "method=draft-lv"])
    assert (lv.method, lv.sampling.num_steps) == ("draft-lv", 10)
    assert load_config(None, ["model=shapes-flow", "method=ddpo"]).sampling.eta == 1.0
    # shapes-sd's recipe is untouched; its LoRA targets are its family's, resolved.
    from draft.models.sd import StableDiffusion

    sd = load_config(None, [])
    assert (sd.method, sd.sampling.num_steps, sd.steps, sd.kl_coeff, sd.lr, sd.lora.target_modules) == (
        "draft-lv", 20, 500, 0.03, 1.5e-3, StableDiffusion.default_lora_targets)


def test_mixed_precision_no_is_read_as_the_word_not_a_boolean(tmp_path):
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("mixed_precision: no\n")
    assert load_config(f).mixed_precision == "no"


def test_checkpointing_takes_true_false_or_auto():
    from draft.errors import UserError

    assert load_config(None, ["sampling.checkpointing=auto"]).sampling.checkpointing == "auto"
    assert load_config(None, ["sampling.checkpointing=false"]).sampling.checkpointing is False
    with pytest.raises(UserError, match="memory_budget_gb"):
        load_config(None, ["sampling.memory_budget_gb=-1"])
