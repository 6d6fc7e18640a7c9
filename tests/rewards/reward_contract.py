"""Checks every reward must pass, whatever its model."""

from __future__ import annotations

import pytest
import torch

from draft.rewards import Reward


def check_contract(reward: Reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Shape, finite non-zero gradient to the images, frozen weights, clear input errors."""
    assert isinstance(reward, Reward)
    # Every layer with weights is in eval mode (dropout off). The Mixture wrapper itself is
    # constructed in training mode, but holds no weights of its own.
    assert not any(m.training for m in reward.modules() if any(True for _ in m.parameters(recurse=False)))
    assert all(not p.requires_grad for p in reward.parameters())
    before = {k: v.clone() for k, v in reward.state_dict().items()}

    x = images.clone().requires_grad_(True)
    r = reward(x, prompts)
    assert r.shape == (len(prompts),) and r.dtype == torch.float32
    assert torch.isfinite(r).all()
    r.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0, "no gradient reached the images"
    for k, v in reward.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"

    reward.train()  # a trainer calling .train() on everything must not enable dropout
    assert not reward.training
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(images[:, :1], prompts)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        reward(images * 2 + 0.5, prompts)
    with pytest.raises(ValueError, match="prompts"):
        reward(images, prompts[:-1])
    return r.detach()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float, what: str) -> float:
    """Assert |ours - ref| <= atol elementwise; return the worst difference for the record."""
    diff = (ours.detach().float() - ref.detach().float()).abs().max().item()
    assert diff <= atol, f"{what}: max |ours - reference| = {diff:.3g} > {atol:g}"
    return diff
