"""The shapes-world rewards: gradients reach the images, weights stay frozen, scores make sense."""

import pytest
import torch

from draft import rewards
from draft.errors import UserError
from draft.models import shapes
from draft.rewards import jpeg
from draft.rewards import shapes as shapes_rewards

NAMES = ["shapes-alignment", "jpeg-compressibility", "jpeg-incompressibility"]


def _batch(n=4, seed=0, size=32):
    b = shapes.draw_examples(n, seed=seed, size=size)
    return torch.from_numpy(b.images), b.prompts


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_images_and_weights_stay_frozen(name):
    reward = rewards.get(name)
    before = {k: v.clone() for k, v in reward.state_dict().items()}
    images, prompts = _batch()
    # A little noise so no coefficient sits exactly on a flat region of the proxy.
    images = (images * 0.9 + 0.05 + 0.02 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0)))
    images = images.clamp(0, 1).requires_grad_(True)
    r = reward(images, prompts)
    assert r.shape == (4,) and torch.isfinite(r).all()
    r.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())
    for k, v in reward.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_any_resolution_is_accepted(name):
    images, prompts = _batch(2, size=48)
    assert rewards.get(name)(images, prompts).shape == (2,)


def test_alignment_prefers_the_matching_prompt():
    reward = rewards.get("shapes-alignment")
    batch = shapes.draw_examples(32, seed=1)
    images = torch.from_numpy(batch.images)
    # Change one attribute of each prompt: the right prompt must score higher, every time.
    wrong = []
    for a in batch.attributes:
        shape = shapes.SHAPES[(shapes.SHAPES.index(a.shape) + 1) % len(shapes.SHAPES)]
        wrong.append(shapes.prompt_of(shapes.Attributes(shape, a.colour, a.background, a.size)))
    right, bad = reward(images, batch.prompts), reward(images, wrong)
    assert (right > bad + 1.0).all()
    assert (right > -0.5).all() and (right <= 0).all()


def test_alignment_rejects_foreign_prompts_and_unknown_attributes():
    images, _ = _batch(1)
    with pytest.raises(UserError, match="shapes-world prompts"):
        rewards.get("shapes-alignment")(images, ["a photo of a cat"])
    with pytest.raises(UserError, match="unknown attribute"):
        rewards.get("shapes-alignment", attributes=["texture"])


def test_attribute_accuracy_helpers():
    batch = shapes.draw_examples(16, seed=2)
    images = torch.from_numpy(batch.images)
    acc = shapes_rewards.attribute_accuracy(images, batch.prompts)
    assert set(acc) == {"shape", "colour", "background", "size", "joint"}
    assert acc["joint"] == 1.0
    hits = shapes_rewards.attribute_correct(images, ["a large black cross on a white background"] * 16)
    assert hits["joint"].dtype == torch.bool and hits["joint"].shape == (16,)
    assert hits["joint"].float().mean() < 0.5
    pred = shapes_rewards.predict(images)
    assert pred["shape"] == [a.shape for a in batch.attributes]


def _varied_images():
    """24 images from flat renders to noise, seeded: the JPEG size spans a wide range."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.from_numpy(shapes.draw_examples(24, seed=3).images)
    sigma = torch.linspace(0, 0.25, 24).view(-1, 1, 1, 1)
    return (clean + sigma * torch.randn(clean.shape, generator=gen)).clamp(0, 1)


def test_jpeg_proxy_ranks_like_pillow():
    images = _varied_images()
    rho = jpeg.spearman(jpeg.jpeg_bits(images), jpeg.jpeg_bytes(images))
    assert rho > 0.9
    # Compressibility is minus incompressibility, in bits per pixel.
    c, i = rewards.get("jpeg-compressibility"), rewards.get("jpeg-incompressibility")
    torch.testing.assert_close(c(images, [""] * 24), -i(images, [""] * 24))


def test_jpeg_bytes_and_quality():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sizes = jpeg.jpeg_bytes(torch.cat([flat, noise]))
    assert sizes.dtype == torch.float32 and sizes[1] > sizes[0] > 100
    assert jpeg.jpeg_bits(noise, quality=95) > jpeg.jpeg_bits(noise, quality=50)
    with pytest.raises(ValueError, match="quality"):
        jpeg.quantisation_tables(0)


def test_spearman():
    assert jpeg.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert jpeg.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert jpeg.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)


def test_jpeg_size_is_the_real_codec_and_carries_no_gradient():
    images = _varied_images()[:6].requires_grad_(True)
    r = rewards.get("jpeg-size")(images, [""] * 6)
    torch.testing.assert_close(r, -jpeg.jpeg_bytes(images, quality=95) / 1024)
    assert not r.requires_grad
    assert float(rewards.get("jpeg-size", quality=50)(images, [""] * 6).mean()) > float(r.mean())
