"""Every kind of bad input: exit code 2, one line naming the problem, no traceback, nothing written."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from draft.cli import main

FAST = ["reward=brightness", "prompts=a small red circle|a green star", "eval_prompts=a green star",
        "method=draft-k", "k=2", "steps=2", "batch_size=1", "sampling.num_steps=3", "log.eval_samples=0",
        "log.trackers=[]", "log.sample_prompts=1", "log.sample_seeds=1", "log.checkpoint_every=1"]


@pytest.fixture(scope="module")
def world(tiny_sd, tmp_path_factory):
    """Files the bad inputs point at: a finished run, a pickled pipeline, broken LoRAs, plug-ins."""
    root = tmp_path_factory.mktemp("bad_input")
    assert main(["train", f"model={tiny_sd}", *FAST, f"output_dir={root}", "name=done", "--no-progress"]) == 0
    corrupt = root / "corrupt"
    shutil.copytree(root / "done", corrupt)
    (corrupt / "checkpoints" / "step-00000002" / "adapter.safetensors").write_bytes(b"not a safetensors file")
    (root / "not_a_pipeline").mkdir()
    (root / "not_a_pipeline" / "notes.txt").write_text("hello")
    pickled = root / "pickled_pipeline"
    shutil.copytree(tiny_sd, pickled)
    for f in pickled.rglob("*.safetensors"):
        torch.save({}, f.with_suffix(".bin"))  # weights only as pickles
        f.unlink()
    (root / "pickled_lora").mkdir()
    torch.save({}, root / "pickled_lora" / "pytorch_lora_weights.bin")
    (root / "other_arch_lora").mkdir()
    save_file({"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.zeros(4, 1280),
               "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.zeros(1280, 4)},
              root / "other_arch_lora" / "pytorch_lora_weights.safetensors")
    (root / "bad.yaml").write_text("steps: [unclosed\n")
    (root / "plugins").mkdir()
    plugins = textwrap.dedent("""
        def wrong_shape(images, prompts):
            return images.mean((2, 3))
        def nan(images, prompts):
            return images.mean((1, 2, 3)) * float("nan")
        def crashes(images, prompts):
            raise RuntimeError("boom")
    """)
    (root / "plugins" / "ok_plugins.py").write_text(plugins)
    (root / "plugins" / "bad_plugins.py").write_text(plugins + "import this_module_does_not_exist_either\n")
    (root / "a_file").write_text("")
    inpaint = root / "inpaint"
    shutil.copytree(tiny_sd, inpaint)
    index = inpaint / "model_index.json"
    index.write_text(index.read_text().replace("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"))
    return root


def T(*extra):
    """`draft train` on the tiny model with extra arguments (MODEL and OUT are filled in)."""
    return ["train", "model=MODEL", *FAST, "output_dir=OUT", "name=x", *extra, "--no-progress"]


CASES = [
    ("unknown key", T("lerning_rate=0.1"), "unknown config key 'lerning_rate'"),
    ("misspelt nested key", T("sampling.num_step=3"), "did you mean 'num_steps'"),
    ("unknown section", T("sampler.steps=3"), "unknown config key 'sampler'"),
    ("wrong type int", T("steps=many"), "steps must be an integer"),
    ("wrong type bool", T("sampling.merge_lora=maybe"), "must be true or false"),
    ("unknown mode", T("sampling.checkpointing=maybe"), "must be true, false or auto"),
    ("wrong type float", T("lr=fast"), "lr must be a number"),
    ("negative steps", T("steps=-1"), "steps must be positive"),
    ("zero steps", T("steps=0"), "steps must be positive"),
    ("zero batch", T("batch_size=0"), "batch_size must be positive"),
    ("zero sampling steps", T("sampling.num_steps=0"), "sampling.num_steps must be positive"),
    ("K larger than steps", T("k=9"), "k=9 is larger than sampling.num_steps=3"),
    ("unknown method", T("method=drft"), "unknown method 'drft' (did you mean 'draft'"),
    ("missing model folder", ["train", "model=/no/such/folder", *FAST, "output_dir=OUT", "name=x"],
     "model folder '/no/such/folder' not found"),
    ("folder that is not a pipeline", ["train", "model=ROOT/not_a_pipeline", *FAST, "output_dir=OUT", "name=x"],
     "is not a diffusers pipeline folder"),
    ("pipeline with pickled weights only", ["train", "model=ROOT/pickled_pipeline", *FAST, "output_dir=OUT", "name=x"],
     "cannot load model"),
    ("unknown reward", T("reward=brightnes"), "did you mean 'brightness'"),
    ("plug-in that does not import", T("reward=bad_plugins:nan"), "cannot import 'bad_plugins'"),
    ("plug-in with no such attribute", T("reward=ok_plugins:missing"), "has no attribute 'missing'"),
    ("plug-in returning the wrong shape", T("reward=ok_plugins:wrong_shape"), "returned shape (1, 3); expected shape (1,)"),
    ("plug-in returning NaN", T("reward=ok_plugins:nan"), "non-finite"),
    ("plug-in that raises", T("reward=ok_plugins:crashes"), "failed on a test batch: boom"),
    ("bad reward weight syntax", T("reward=brightness:2+"), "empty reward name"),
    ("unknown prompt set", T("prompts=no_such_set"), "prompt set or file 'no_such_set' not found"),
    ("unwritable output folder", ["train", "model=MODEL", *FAST, "output_dir=ROOT/a_file/runs", "name=x"],
     "is not a writable folder"),
    ("existing run without --resume", ["train", "model=MODEL", *FAST, "output_dir=ROOT", "name=done"],
     "already exists; pass --resume"),
    ("--resume and --overwrite", ["train", "--resume", "ROOT/done", "--overwrite"], "contradict"),
    ("resume of a folder with no run", ["train", "--resume", "ROOT/not_a_pipeline"], "nothing to resume"),
    ("corrupt checkpoint", ["train", "--resume", "ROOT/corrupt", "steps=3"], "unreadable or incomplete"),
    ("missing config file", ["train", "ROOT/nope.yaml"], "config file"),
    ("invalid YAML", ["train", "ROOT/bad.yaml"], "is not valid YAML"),
    ("override without =", ["train", "ROOT/bad.yaml", "ROOT/bad.yaml"], "unexpected argument"),
    ("LoRA for another architecture", ["sample", "--model", "MODEL", "--lora", "ROOT/other_arch_lora",
                                       "--prompt", "a red circle", "--steps", "2", "--out", "OUT/s"],
     "does not fit this model"),
    ("pickled LoRA", ["sample", "--model", "MODEL", "--lora", "ROOT/pickled_lora", "--prompt", "a", "--steps", "2",
                      "--out", "OUT/s"], "safetensors only"),
    ("missing LoRA", ["sample", "--model", "MODEL", "--lora", "ROOT/none:0.5", "--prompt", "a", "--out", "OUT/s"],
     "not found"),
    ("eval with an unknown reward", ["eval", "--model", "MODEL", "--reward", "brightnes", "--steps", "2"],
     "did you mean 'brightness'"),
    ("sample without a prompt", ["sample", "--model", "MODEL"], "--prompt"),
    ("sample with zero steps", ["sample", "--model", "MODEL", "--prompt", "a", "--steps", "0", "--out", "OUT/s"],
     "num_steps must be positive"),
    ("sample with a negative seed", ["sample", "--model", "MODEL", "--prompt", "a", "--seed", "-5", "--out", "OUT/s"],
     "seed must be >= 0"),
    ("sample with a NaN guidance", ["sample", "--model", "MODEL", "--prompt", "a", "--guidance", "nan",
                                    "--out", "OUT/s"], "guidance_scale must be a finite number"),
    ("frames for an image model", ["sample", "--model", "MODEL", "--prompt", "a", "--frames", "9", "--steps", "2",
                                   "--out", "OUT/s"], "is an image model"),
    ("eval with no seeds", ["eval", "--model", "MODEL", "--seeds", "0", "--steps", "2"], "seeds must be positive"),
    ("an inpainting pipeline", ["train", "model=ROOT/inpaint", *FAST, "output_dir=OUT", "name=x"],
     "cannot train; supported:"),
    ("an adapter setting that does not exist", T("model_options.lora_expert=low"), "has no such setting"),
    ("a format the family has no tool for", ["export", "ROOT/done", "--format", "comfyui", "--out", "OUT/e.safetensors"],
     "not one the Stable Diffusion family's tools read"),
    ("unknown command", ["trian"], "invalid choice"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clear_line(argv, message, world, tiny_sd, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(world / "plugins"))
    done_before = {p: p.read_bytes() for p in (world / "done").rglob("*") if p.is_file()}
    out = tmp_path / "out"
    argv = [a.replace("MODEL", str(tiny_sd)).replace("OUT", str(out)).replace("ROOT", str(world)) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert not (out / "x").exists() and not (out / "s").exists()  # nothing half-written
    assert {p: p.read_bytes() for p in (world / "done").rglob("*") if p.is_file()} == done_before
    for mod in ("bad_plugins", "ok_plugins"):
        sys.modules.pop(mod, None)


def test_pickles_are_never_unpickled(world, monkeypatch):
    """Loading a pickled LoRA or pipeline must fail before torch.load is ever called."""
    import draft.lora as lora

    def forbidden(*a, **k):
        raise AssertionError("torch.load was called on an untrusted file")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(Exception, match="safetensors only"):
        lora.lora_file(world / "pickled_lora")
    from draft.errors import UserError
    from draft.models import load_model

    with pytest.raises(UserError):
        load_model(str(world / "pickled_pipeline"))
    assert not list(Path(world / "done" / "checkpoints").rglob("*.bin"))  # checkpoints hold no pickles


# --- every config value, every kind of bad ------------------------------------------------------

# Keys where an empty value means something (a generated name, no trackers, no arguments,
# the model family's default LoRA targets).
EMPTY_IS_VALID = {"name", "log.trackers", "reward_args", "lora.target_modules", "sampling.negative_prompt",
                  "model_options"}


def _config_keys(cls=None, prefix=""):
    """(dotted key, type hint) of every leaf of TrainConfig, walking the nested dataclasses."""
    import dataclasses
    import typing

    from draft.config import TrainConfig

    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _config_keys(hint, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, hint


def _bad_values(key: str, hint) -> list[str]:
    """Raw `key=value` texts that must be refused: wrong type, out of range, NaN/inf, empty."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # `X | None`: None leaves it to draft.defaults; X's bad values
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if args == [bool, str]:  # a switch with named modes (sampling.checkpointing: true, false, auto)
            return ["[1, 2]", "{a: 1}", "maybe", "2", "nan", ""]
        (hint,) = args
        origin = typing.get_origin(hint)
    wrong = ["[1, 2]", "{a: 1}"]
    if hint is bool:
        return [*wrong, "maybe", "2", "nan", ""]
    if hint is int:
        return [*wrong, "abc", "1.5", "nan", "inf", "-inf", "true", "", "-1000000000"]
    if hint is float:
        return [*wrong, "abc", "nan", ".nan", "inf", "-inf", ".inf", "true", "", "-1e9"]
    if hint is str:
        return [*wrong] + ([] if key in EMPTY_IS_VALID else [""])
    if origin is tuple:
        return ["{a: 1}", "[[1]]", "[a, '']"] + ([] if key in EMPTY_IS_VALID else ["[]"])
    if origin is dict:
        return ["5", "[1]", "abc", "{x: 5}"] if key != "model_options" else ["5", "[1]", "abc", "{no_such_setting: 5}"]
    raise AssertionError(f"no bad values for {key}: {hint}")


BAD_VALUES = [(key, value) for key, hint in _config_keys() for value in _bad_values(key, hint)]
# Values that only make sense for some keys: each key's own bounds, above and below.
BAD_VALUES += [("sampling.eta", "1.5"), ("adam_beta1", "1"), ("adam_beta2", "1.0"), ("lora.dropout", "1"),
               ("ddpo_timestep_fraction", "1.5"), ("ddpo_timestep_fraction", "0"), ("ddpo_clip", "0"),
               ("lora.alpha", "0"), ("seed", str(2**64)), ("refl_min_step", "-2"), ("sampling.height", "12"),
               ("name", "a/b"), ("name", ".."), ("method", "nope"), ("mixed_precision", "fp8"),
               ("reward_frame_choice", "middle"), ("sampling.frames", "9")]  # shapes-sd makes images


def test_every_config_key_has_bad_values():
    keys = {key for key, _ in _config_keys()}
    assert len(keys) >= 45 and keys == {key for key, _ in BAD_VALUES}


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_every_bad_config_value_exits_2_before_anything_is_written(key, value, tmp_path, capsys):
    out = tmp_path / "out"
    # The value's key last, so `output_dir` and `name` themselves are tested too.
    args = ["model=shapes-sd", f"output_dir={out}", "name=x", "log.trackers=[]", f"{key}={value}"]
    for argv in (["train", *args, "--dry-run"], ["train", *args, "--no-progress"]):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        assert not out.exists() and not any(tmp_path.iterdir())


# --- corrupt and truncated safetensors, wherever they are read ----------------------------------


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


@pytest.fixture(scope="module")
def broken(world, tiny_sd):
    """Copies of good files, cut short or overwritten."""
    root = world / "broken"
    root.mkdir()
    lora = world / "done" / "lora" / "pytorch_lora_weights.safetensors"
    (root / "lora_truncated").mkdir()
    shutil.copy(lora, root / "lora_truncated" / lora.name)
    _truncate(root / "lora_truncated" / lora.name)
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (root / "empty.safetensors").write_bytes(b"")
    shutil.copytree(world / "done", root / "ckpt_truncated")
    _truncate(root / "ckpt_truncated" / "checkpoints" / "step-00000002" / "optimizer.safetensors")
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        pipe = root / f"pipe_{part.split('/')[0]}"
        shutil.copytree(tiny_sd, pipe)
        _truncate(next(pipe.rglob(part)), keep=30)
    from draft.models import shapes

    shutil.copytree(shapes.CLASSIFIER_DIR, root / "classifier")
    _truncate(root / "classifier" / "model.safetensors")
    return root


S = ["--prompt", "a red circle", "--steps", "2", "--out", "OUT/s"]
CORRUPT = [
    ("truncated LoRA (sample)", ["sample", "--model", "MODEL", "--lora", "BROKEN/lora_truncated", *S],
     "lora_truncated/pytorch_lora_weights.safetensors is not a readable safetensors file"),
    ("garbage LoRA file (sample)", ["sample", "--model", "MODEL", "--lora", "BROKEN/garbage.safetensors:0.5", *S],
     "garbage.safetensors is not a readable safetensors file"),
    ("empty LoRA file (eval)", ["eval", "--model", "MODEL", "--lora", "BROKEN/empty.safetensors", "--reward",
                                "brightness", "--steps", "2", "--seeds", "1", "--prompts", "a|b"],
     "empty.safetensors is not a readable safetensors file"),
    ("truncated checkpoint", ["train", "--resume", "BROKEN/ckpt_truncated", "steps=3", "--no-progress"],
     "optimizer.safetensors is not a readable safetensors file"),
    ("truncated UNet weights", ["sample", "--model", "BROKEN/pipe_unet", *S],
     "diffusion_pytorch_model.safetensors is not a readable safetensors file"),
    ("truncated text encoder weights", ["sample", "--model", "BROKEN/pipe_text_encoder", *S],
     "model.safetensors is not a readable safetensors file"),
    ("truncated VAE weights (train)", ["train", "model=BROKEN/pipe_vae", *FAST, "output_dir=OUT", "name=x"],
     "diffusion_pytorch_model.safetensors is not a readable safetensors file"),
    ("truncated reward classifier", T("reward=shapes-alignment", "prompts=a small red circle on a blue background",
                                      "reward_args.shapes-alignment.classifier=BROKEN/classifier"),
     "classifier/model.safetensors is not a readable safetensors file"),
    ("garbage reward head", T("reward=aesthetic", "reward_args.aesthetic.model=BROKEN/garbage.safetensors"),
     "garbage.safetensors is not a readable safetensors file"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_a_corrupt_safetensors_file_exits_2_naming_it(argv, message, broken, tiny_sd, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("MODEL", str(tiny_sd)).replace("OUT", str(out)).replace("BROKEN", str(broken)) for a in argv]
    before = {p: p.read_bytes() for p in broken.rglob("*") if p.is_file()}
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err and "corrupt or truncated" in err, err
    assert not (out / "x").exists() and not (out / "s").exists()
    assert {p: p.read_bytes() for p in broken.rglob("*") if p.is_file()} == before
