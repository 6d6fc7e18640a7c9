"""Each method's gradient structure on the tiny pipeline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from draft import rewards
from draft.config import TrainConfig
from draft.methods import METHODS, Batch, Sampler, SampleNoise
from draft.plan import sample_seed
from draft.sampling import Schedule, renoise

T = 6


@pytest.fixture
def setup(tiny_lora):
    model, params = tiny_lora
    schedule = Schedule.from_scheduler_config(model.scheduler_config, T)
    loop = Sampler(model, rewards.get("brightness"), schedule, guidance_scale=3.0)
    return model, params, loop


def make_batch(model, prompts, step=0, seed=0):
    seeds = [sample_seed(seed, step, j) for j in range(len(prompts))]
    return Batch(list(prompts), SampleNoise(seeds, model.latent_shape(), "cpu"), np.random.default_rng([seed, step, 1]))


def grad_of(method, loop, params, batch, cfg):
    for p in params:
        p.grad = None
    out = METHODS[method](loop, batch, cfg)
    out.loss.backward()
    return torch.cat([p.grad.flatten() for p in params]), out


def test_draft_k_with_k_equal_t_is_full_draft_and_smaller_k_differs(setup, prompts):
    model, params, loop = setup
    cfg = TrainConfig(k=T)
    g_full, _ = grad_of("draft", loop, params, make_batch(model, prompts[:2]), cfg)
    g_k, _ = grad_of("draft-k", loop, params, make_batch(model, prompts[:2]), cfg)
    torch.testing.assert_close(g_full, g_k)
    g_1, _ = grad_of("draft-k", loop, params, make_batch(model, prompts[:2]), cfg.replace(k=1))
    assert not torch.allclose(g_full, g_1)


class Recorder:
    """Wraps the UNet call to record its inputs and whether each call carried gradient."""

    def __init__(self, model):
        self.model, self.inner, self.calls = model, model.denoise, []
        model.denoise = self

    def __call__(self, x, t, cond):
        out = self.inner(x, t, cond)
        self.calls.append((x.detach().clone(), int(t), out.requires_grad))
        return out


def test_draft_lv_renoises_the_final_latent_with_fresh_independent_noise(setup, prompts):
    model, params, loop = setup
    # Plain checkpointing, whose first pass carries the graph the recorder looks for (the
    # merged first pass builds none; tests/test_families.py checks the window for both).
    loop = dataclasses.replace(loop, merged_recompute=False)
    n = 3
    rec = Recorder(model)
    batch = make_batch(model, prompts[:2])
    out = METHODS["draft-lv"](loop, batch, TrainConfig(lv_n=n))
    # T no-grad sampling calls, then one batched gradient call for the n passes
    assert [c[2] for c in rec.calls] == [False] * T + [True]
    assert out.queries == 2 * n and out.rewards.shape == (2 * n,)

    # Replay the same noise streams: x_T, then n fresh draws.
    replay = make_batch(model, prompts[:2]).noise
    x_T = replay.draw()
    eps = [replay.draw() for _ in range(n)]
    torch.testing.assert_close(rec.calls[0][0], torch.cat([x_T, x_T]))  # CFG doubles the batch
    x0 = loop.run(x_T, model.conditioning(prompts[:2]), replay)
    x_in = rec.calls[T][0][: 2 * n]  # the conditional half of the CFG batch
    expected = renoise(x0.repeat(n, 1, 1, 1), loop.schedule.a[T - 1], loop.schedule.s[T - 1], torch.cat(eps))
    # The method samples x_0 with the LoRA folded into the weights, the replay without it.
    torch.testing.assert_close(x_in, expected, rtol=1e-5, atol=3e-5)
    assert rec.calls[T][1] == loop.schedule.timesteps[T - 1]
    for a in range(n):  # independent noise for each pass
        for b in range(a + 1, n):
            assert (eps[a] - eps[b]).abs().mean() > 0.5


def test_draft_lv_gradient_differs_from_draft_1(setup, prompts):
    model, params, loop = setup
    g_lv, _ = grad_of("draft-lv", loop, params, make_batch(model, prompts[:2]), TrainConfig(lv_n=2))
    g_1, _ = grad_of("draft-k", loop, params, make_batch(model, prompts[:2]), TrainConfig(k=1))
    assert g_lv.abs().sum() > 0 and g_1.abs().sum() > 0
    # At the last step's noise level (1 - ᾱ ≈ 2e-3) re-noising moves the latent only a little,
    # so the gradients are close, but three orders above float32 round-off (~1e-6).
    assert (g_lv - g_1).norm() > 1e-3 * g_1.norm()


def test_noise_is_per_sample_and_independent_of_batch_layout(tiny_model):
    shape = tiny_model.latent_shape()
    whole = SampleNoise([sample_seed(0, 5, j) for j in range(4)], shape, "cpu")
    halves = [SampleNoise([sample_seed(0, 5, j) for j in js], shape, "cpu") for js in ([0, 1], [2, 3])]
    for _ in range(2):  # the first draw (x_T) and a later one (DRaFT-LV's fresh noise)
        torch.testing.assert_close(whole.draw(), torch.cat([h.draw() for h in halves]), rtol=0, atol=0)
