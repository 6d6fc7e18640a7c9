"""Registration, lazy imports, mixtures, plug-ins, config wiring and checkpoint conversion."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from reward_contract import check_contract
from reward_models import PROMPTS, smooth_images

import draft.rewards as rewards
from draft.errors import UserError
from draft.rewards.loading import convert_checkpoint

LEARNED = ["aesthetic", "hpsv2", "pickscore", "imagereward", "clipscore", "detection", "classifier"]


def test_every_learned_reward_is_registered_with_a_one_line_description():
    table = rewards.available()
    for name in LEARNED:
        info = table[name]
        assert "\n" not in info.description and len(info.description) <= 100
        module, _, attr = info.target.partition(":")
        assert hasattr(__import__(module, fromlist=[attr]), attr)


def test_reward_modules_import_no_model_library():
    """Listing and importing rewards stays light: transformers loads when a reward is built."""
    code = ("import sys, draft.rewards, draft.rewards.clip, draft.rewards.aesthetic, draft.rewards.hps, "
            "draft.rewards.imagereward, draft.rewards.detection, draft.rewards.classifier, "
            "draft.rewards.preprocess, draft.rewards.loading, draft.rewards.convert; "
            "print(sorted(m for m in ('transformers', 'huggingface_hub', 'safetensors', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_mixture_of_learned_rewards(clip_dir, aesthetic_head):
    args = {"aesthetic": {"model": str(aesthetic_head), "clip": str(clip_dir)},
            "pickscore": {"model": str(clip_dir), "processor": str(clip_dir)}}
    mix = rewards.from_config("aesthetic:1.0+pickscore:0.5", args)
    images = smooth_images(3, 40, 40, seed=1)
    a = rewards.get("aesthetic", **args["aesthetic"])(images, PROMPTS[:3])
    p = rewards.get("pickscore", **args["pickscore"])(images, PROMPTS[:3])
    torch.testing.assert_close(mix(images, PROMPTS[:3]), a + 0.5 * p)
    check_contract(mix, images, PROMPTS[:3])


def test_plugins_by_module_attr_mix_with_registered_rewards(clip_dir):
    images = smooth_images(2, 32, 32, seed=2)
    fn = rewards.from_config("reward_plugins:redness")
    torch.testing.assert_close(fn(images, PROMPTS[:2]), images[:, 0].mean((1, 2)))
    spec = "reward_plugins:Target:2+clipscore:0.5"
    mix = rewards.from_config(spec, {"reward_plugins:Target": {"rgb": [0.0, 0.0, 1.0]},
                                     "clipscore": {"model": str(clip_dir), "clamp": False}})
    target = rewards.get("reward_plugins:Target", rgb=[0.0, 0.0, 1.0])(images, PROMPTS[:2])
    clip = rewards.get("clipscore", model=str(clip_dir), clamp=False)(images, PROMPTS[:2])
    torch.testing.assert_close(mix(images, PROMPTS[:2]), 2 * target + 0.5 * clip)
    with pytest.raises(UserError, match="bad arguments for reward 'clipscore'"):
        rewards.get("clipscore", model=str(clip_dir), colour="red")


def test_config_overrides_reach_the_reward(clip_dir, aesthetic_head):
    """`draft train reward=... reward_args.NAME.KEY=VALUE` -> the same reward as the Python API."""
    config = pytest.importorskip("draft.config")
    cfg = config.load_config(None, [
        "reward=aesthetic+clipscore:0.5",
        f"reward_args.aesthetic.model={aesthetic_head}",
        f"reward_args.aesthetic.clip={clip_dir}",
        f"reward_args.clipscore.model={clip_dir}",
        "reward_args.clipscore.scale=1.0",
        "reward_args.clipscore.clamp=false",
    ])
    built = rewards.from_config(cfg.reward, cfg.reward_args)
    images = smooth_images(2, 32, 32, seed=4)
    a = rewards.get("aesthetic", model=str(aesthetic_head), clip=str(clip_dir))(images, PROMPTS[:2])
    c = rewards.get("clipscore", model=str(clip_dir), scale=1.0, clamp=False)(images, PROMPTS[:2])
    torch.testing.assert_close(built(images, PROMPTS[:2]), a + 0.5 * c)


def test_convert_checkpoint_needs_consent_and_keeps_tensors(tmp_path):
    from safetensors.torch import load_file

    state = {"layers.0.weight": torch.randn(3, 4), "layers.0.bias": torch.randn(3)}
    src = tmp_path / "head.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, src)
    with pytest.raises(UserError, match="trust_pickle=True"):
        convert_checkpoint(src)
    out = convert_checkpoint(src, trust_pickle=True)
    assert out == tmp_path / "head.safetensors"
    loaded = load_file(str(out))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())


class _Exploit:
    def __reduce__(self):
        return (print, ("this ran during unpickling",))


def test_convert_checkpoint_will_not_run_code_from_the_file(tmp_path, capsys):
    src = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit()}, src)
    with pytest.raises(UserError, match="weights-only"):
        convert_checkpoint(src, trust_pickle=True)
    assert "this ran" not in capsys.readouterr().out


def test_convert_command_line(tmp_path):
    from draft.rewards.convert import main

    src = tmp_path / "ImageReward.pt"
    torch.save({"w": torch.ones(2)}, src)
    assert main([str(src)]) == 2
    assert main([str(src), "--trust-pickle", "-o", str(tmp_path / "out" / "ImageReward.safetensors")]) == 0
    assert (tmp_path / "out" / "ImageReward.safetensors").is_file()
