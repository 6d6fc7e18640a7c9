"""The reward contract, the registry, mixtures and plug-ins, on the model-free rewards."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from draft import rewards
from draft.errors import UserError

BASIC = ["brightness", "saturation", "colorfulness"]


def images(n=3, seed=0, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", BASIC)
def test_basic_rewards_pass_a_gradient_and_have_the_right_shape(name):
    x = images().requires_grad_(True)
    r = rewards.get(name)(x, ["a", "b", "c"])
    assert r.shape == (3,) and torch.isfinite(r).all()
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_basic_rewards_measure_what_they_say():
    grey = torch.full((1, 3, 8, 8), 0.5)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    assert rewards.get("brightness")(torch.ones(1, 3, 4, 4), ["x"]).item() == pytest.approx(1.0)
    assert rewards.get("brightness")(grey, ["x"]).item() == pytest.approx(0.5)
    assert rewards.get("saturation")(grey, ["x"]).item() == pytest.approx(0.0, abs=1e-6)
    assert rewards.get("saturation")(red, ["x"]).item() == pytest.approx(1 / 1.01)
    assert rewards.get("colorfulness")(red, ["x"]) > rewards.get("colorfulness")(grey, ["x"]) + 0.3


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(2, 4, 8, 8), "shape"),
        (torch.rand(2, 3, 8), "shape"),
        (torch.randint(0, 255, (2, 3, 8, 8)), "float"),
        (torch.rand(2, 3, 8, 8) * 255, r"\[0, 1\]"),
    ],
)
def test_bad_images_are_refused_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        rewards.get("brightness")(bad, ["a", "b"])


def test_prompt_count_must_match():
    with pytest.raises(ValueError, match="prompts"):
        rewards.get("brightness")(images(2), ["a"])


def test_unknown_reward_suggests_the_closest_name():
    with pytest.raises(UserError, match="did you mean 'brightness'"):
        rewards.get("brightnes")


def test_mixture_is_the_weighted_sum():
    x = images()
    mix = rewards.get("brightness:1.0+saturation:0.5")
    expected = rewards.get("brightness")(x, ["a"] * 3) + 0.5 * rewards.get("saturation")(x, ["a"] * 3)
    torch.testing.assert_close(mix(x, ["a"] * 3), expected)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import torch
        def redness(images, prompts):
            return images[:, 0].mean((1, 2))
        class Target:
            def __init__(self, level=0.5):
                self.level = level
            def __call__(self, images, prompts):
                return -(images.mean((1, 2, 3)) - self.level).abs()
        def wrong_shape(images, prompts):
            return images.mean()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_rewards", None)


def test_plugins_by_module_and_attribute(plugin):
    x = images()
    torch.testing.assert_close(rewards.get("my_rewards:redness")(x, ["a"] * 3), x[:, 0].mean((1, 2)))
    target = rewards.get("my_rewards:Target", level=0.2)
    assert target.fn.level == 0.2
    mix = rewards.from_config("my_rewards:redness:2+brightness", {})
    torch.testing.assert_close(mix(x, ["a"] * 3), 2 * x[:, 0].mean((1, 2)) + rewards.get("brightness")(x, ["a"] * 3))


def test_plugin_errors_are_user_errors(plugin):
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        rewards.get("no_such_module:fn")
    with pytest.raises(UserError, match="no attribute 'nope'"):
        rewards.get("my_rewards:nope")
    with pytest.raises(ValueError, match=r"expected shape \(3,\)"):
        rewards.get("my_rewards:wrong_shape")(images(), ["a"] * 3)


def test_a_plain_callable_is_accepted():
    r = rewards.from_config(lambda x, p: x.mean((1, 2, 3)))
    assert r(images(2), ["a", "b"]).shape == (2,)


def test_listing_is_light_and_complete():
    infos = rewards.available()
    assert set(BASIC) <= set(infos)
    assert all(info.description and "\n" not in info.description for info in infos.values())
