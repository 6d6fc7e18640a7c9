"""`draft train --dry-run`: every cheap check before any weight loads (draft.preflight), the
method defaults it reports, and the memory estimate it prints."""

from __future__ import annotations

import pickle
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from draft.cli import main
from draft.config import load_config
from draft.defaults import explain
from draft.errors import UserError

FAST = ["reward=brightness", "prompts=a red cat|a blue dog", "eval_prompts=a green frog", "log.trackers=[]"]


def dry(capsys, *args):
    code = main(["train", *args, "--dry-run"])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def score(images, prompts):
            return images.mean((1, 2, 3))

        class Scaled:
            def __init__(self, scale=1.0):
                self.scale = scale

            def __call__(self, images, prompts):
                return self.scale * images.mean((1, 2, 3))

        not_callable = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_rewards", None)  # other tests write a my_rewards.py of their own


@pytest.fixture
def files(tmp_path):
    save_file({"w": torch.zeros(10, 3)}, str(tmp_path / "head.safetensors"))
    (tmp_path / "head.pth").write_bytes(pickle.dumps({"w": [0.0]}))
    good = (tmp_path / "head.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) - 40])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 7)
    (tmp_path / "pickled_folder").mkdir()
    (tmp_path / "pickled_folder" / "pytorch_model.bin").write_bytes(b"x")
    return tmp_path


CASES = [  # (label, overrides, message)
    ("plug-in module missing", ["reward=nosuchmodule:fn"], "cannot import 'nosuchmodule'"),
    ("plug-in attribute missing", ["reward=my_rewards:nothing"], "has no attribute 'nothing'"),
    ("plug-in not callable", ["reward=my_rewards:not_callable"], "is not callable"),
    ("weight not a number", ["reward=shapes-alignment:abc"], "reward weight 'abc' in 'shapes-alignment:abc' is not a finite number"),
    ("weight nan", ["reward=brightness:nan+saturation"], "reward weight 'nan'"),
    ("unknown reward", ["reward=brightnes"], "did you mean 'brightness'"),
    ("arguments for an unused reward", ["reward_args.saturation.eps=1"], "reward_args given for ['saturation']"),
    ("a function takes no arguments", ["reward=my_rewards:score", "reward_args.my_rewards:score.x=1"],
     "is a function and takes no arguments"),
    ("unknown argument", ["reward=my_rewards:Scaled", "reward_args.my_rewards:Scaled.scal=2"],
     "bad arguments for reward 'my_rewards:Scaled'"),
    ("required weights not set", ["reward=aesthetic"], "reward_args.aesthetic.model is not set"),
    ("weights file missing", ["reward=aesthetic", "reward_args.aesthetic.model=FILES/none.safetensors"],
     "no such file or folder"),
    ("pickled weights", ["reward=aesthetic", "reward_args.aesthetic.model=FILES/head.pth"], "is a pickle"),
    ("folder of pickles", ["reward=aesthetic", "reward_args.aesthetic.model=FILES/pickled_folder"],
     "holds weights only as pickles"),
    ("truncated safetensors", ["reward=aesthetic", "reward_args.aesthetic.model=FILES/truncated.safetensors"],
     "is not a valid safetensors file"),
    ("garbage safetensors", ["reward=aesthetic", "reward_args.aesthetic.model=FILES/garbage.safetensors"],
     "is not a valid safetensors file"),
    ("prompt file missing", ["prompts=FILES/none.txt"], "prompt set or file"),
    ("prompt column missing", ["prompts=FILES/p.csv:caption"], "has no column 'caption'"),
    ("unknown tracker", ["log.trackers=[tensorbord]"], "did you mean 'tensorboard'"),
    ("negative value", ["lr=-1"], "lr must be >= 0"),
    ("model folder missing", ["model=/no/such/folder"], "model folder '/no/such/folder' not found"),
    ("ddpo with eta 0 set", ["method=ddpo", "sampling.eta=0"], "sampling.eta > 0"),
]


@pytest.mark.parametrize("label,overrides,message", CASES, ids=[c[0] for c in CASES])
def test_dry_run_catches_it_with_exit_2_one_line_nothing_written(label, overrides, message, tiny_sd, tmp_path,
                                                                 plugins, files, capsys):
    (files / "p.csv").write_text("prompt\na red cat\n")
    out = tmp_path / "runs"
    overrides = [o.replace("FILES", str(files)) for o in overrides]
    code, stdout, err = dry(capsys, f"model={tiny_sd}", *FAST, f"output_dir={out}", "name=x", *overrides)
    assert code == 2, (stdout, err)
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_dry_run_refuses_an_existing_run_folder_unless_told(tiny_sd, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.yaml").write_text("steps: 1\n")
    common = [f"model={tiny_sd}", *FAST, f"output_dir={tmp_path}", "name=x"]
    code, _, err = dry(capsys, *common)
    assert code == 2 and "already exists" in err
    assert dry(capsys, *common, "--overwrite")[0] == 0
    assert (tmp_path / "x" / "config.yaml").read_text() == "steps: 1\n"  # a dry run writes nothing


def test_a_good_dry_run_passes_plugins_and_weight_files(tiny_sd, tmp_path, plugins, files, capsys):
    code, out, err = dry(capsys, f"model={tiny_sd}", *FAST, f"output_dir={tmp_path / 'runs'}",
                         "reward=my_rewards:Scaled:0.5+brightness:2", "reward_args.my_rewards:Scaled.scale=3")
    assert code == 0, err
    assert "reward: my_rewards:Scaled:0.5+brightness:2" in out
    assert "estimated peak accelerator memory per process" in out
    assert not (tmp_path / "runs").exists()
    # The weights of a reward's safetensors file are read from its header and counted.
    from draft.preflight import check_reward

    assert check_reward("aesthetic", {"aesthetic": {"model": str(files / "head.safetensors")}}) == 10 * 3 * 4


def test_method_defaults_are_applied_recorded_and_explained(tiny_sd, tmp_path, capsys):
    config = load_config(None, ["method=ddpo"])
    assert config.sampling.eta == 1.0 and config.to_dict()["sampling"]["eta"] == 1.0
    (note,) = [n for n in explain(config) if n.startswith("sampling.eta")]
    assert note.startswith("sampling.eta=1.0: method ddpo's default") and "set sampling.eta to change it" in note
    # The user's value wins, in an override, a file, or a resumed run's config.
    assert load_config(None, ["method=ddpo", "sampling.eta=0.5"]).sampling.eta == 0.5
    (tmp_path / "c.yaml").write_text("method: ddpo\nsampling:\n  eta: 0.3\n")
    assert load_config(tmp_path / "c.yaml").sampling.eta == 0.3
    assert load_config(None, ["method=ddpo"], base={"sampling": {"eta": 0.7}}).sampling.eta == 0.7
    assert not [n for n in explain(load_config(None, ["method=ddpo", "sampling.eta=0.5"])) if "eta" in n]
    assert load_config(None, ["method=draft-k"]).sampling.eta == 0.0  # other methods keep the field's default
    code, out, err = dry(capsys, f"model={tiny_sd}", *FAST, "method=ddpo", f"output_dir={tmp_path}")
    assert code == 0, err
    assert "  eta: 1.0" in out and "# sampling.eta=1.0: method ddpo's default" in out


def test_a_python_config_resolves_as_the_command_line_does(tiny_sd):
    """`draft.train(TrainConfig(...))` and `draft train key=value` resolve the same values:
    shapes-flow's recipe, DDPO's eta, a user folder's family defaults."""
    from draft.config import SamplingConfig, TrainConfig
    from draft.defaults import resolve

    for overrides, config in [
        (["model=shapes-flow"], TrainConfig(model="shapes-flow")),
        (["method=ddpo"], TrainConfig(method="ddpo")),
        ([f"model={tiny_sd}", "sampling.num_steps=7"], TrainConfig(model=str(tiny_sd),
                                                                   sampling=SamplingConfig(num_steps=7))),
    ]:
        assert resolve(config) == load_config(None, overrides)
    flow = resolve(TrainConfig(model="shapes-flow"))
    assert (flow.method, flow.steps, flow.sampling.num_steps, flow.sampling.guidance_scale) == ("draft", 800, 10, 4.0)
    assert resolve(TrainConfig(method="ddpo")).sampling.eta == 1.0


def test_check_raises_user_errors_in_the_api_too(tiny_sd):
    from draft.preflight import check

    with pytest.raises(UserError, match="nosuchmodule"):
        check(load_config(None, [f"model={tiny_sd}", "reward=nosuchmodule:fn"]))


def test_a_hub_model_in_the_local_cache_is_estimated_without_download(tiny_sd, tmp_path):
    """The dry run reads a hub model's configs from the Hugging Face cache, never the network."""
    import shutil

    from draft.preflight import cached_hub_configs

    snapshot = tmp_path / "models--someone--tiny" / "snapshots" / "0123abc"
    shutil.copytree(tiny_sd, snapshot, ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "models--someone--tiny" / "refs" / "main").write_text("0123abc")
    assert cached_hub_configs("someone/tiny", cache_dir=str(tmp_path)) == snapshot
    assert cached_hub_configs("someone/not-cached", cache_dir=str(tmp_path)) is None
