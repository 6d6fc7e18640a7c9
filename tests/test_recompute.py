"""The cheaper checkpointing of a gradient window: a gradient-free first pass with the LoRA
merged, recomputed with gradient in the backward (`sampling._Recomputed`, `Sampler.run`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from draft import rewards
from draft.methods import METHODS, Batch, Sampler, SampleNoise
from draft.plan import sample_seed
from draft.sampling import Schedule, guided, model_step

T = 4


@pytest.fixture
def setup(tiny_lora):
    model, params = tiny_lora
    return model, params, Schedule.from_scheduler_config(model.scheduler_config, T)


def _batch(model, prompts):
    seeds = [sample_seed(0, 0, j) for j in range(len(prompts))]
    return Batch(list(prompts), SampleNoise(seeds, model.latent_shape(), "cpu"), np.random.default_rng([0, 0, 1]))


@pytest.mark.parametrize("method,kl", [("draft", 0.0), ("draft-k", 0.5), ("draft-lv", 0.5)])
def test_merged_first_pass_gives_the_gradients_of_plain_backpropagation(setup, prompts, method, kl):
    from draft.config import TrainConfig

    model, params, schedule = setup
    base = {n: p.detach().clone() for n, p in model.denoiser.named_parameters() if not p.requires_grad}
    results = []
    # (checkpointing, merging): plain backpropagation, torch.utils.checkpoint, the merged first pass
    for use_checkpoint, merge in [(False, False), (True, False), (True, True)]:
        loop = Sampler(model, rewards.get("brightness"), schedule, guidance_scale=3.0, use_checkpoint=use_checkpoint,
                    kl_coeff=kl, merge_lora=merge, merged_recompute=merge)
        for p in params:
            p.grad = None
        out = METHODS[method](loop, _batch(model, prompts[:2]), TrainConfig(k=2))
        out.loss.backward()
        results.append((out.loss.detach(), torch.cat([p.grad.flatten() for p in params])))
    plain, checkpointed, merged = results
    assert plain[1].abs().sum() > 0
    for loss, grad in (checkpointed, merged):
        torch.testing.assert_close(loss, plain[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, plain[1], rtol=1e-4, atol=1e-7)
    # The base weights come back bit for bit.
    for n, p in model.denoiser.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_the_first_pass_builds_no_graph_and_x_gets_its_gradient(setup, prompts):
    """Only the output's grad_fn is the recompute node; the input's gradient matches autograd's."""
    model, params, schedule = setup
    cond = model.conditioning(prompts[:2], 3.0)
    denoise = guided(model.denoise, 3.0)
    x = torch.randn(2, *model.latent_shape(), requires_grad=True)
    grads = []
    for p_list in (None, params):
        for p in params:
            p.grad = None
        x.grad = None
        out, _, _ = model_step(denoise, x, 2, schedule, cond, use_checkpoint=True, params=p_list)
        out.square().mean().backward()
        grads.append(torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in params]))
    assert type(out.grad_fn).__name__ == "_RecomputedBackward"
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method,keep,merge,kl", [("draft", 2, False, 0.0), ("draft", 3, False, 0.0),
                                                   ("draft-k", 1, False, 0.0), ("draft", 2, True, 0.0),
                                                   ("draft-k", 1, True, 0.1), ("draft", 3, True, 0.1)])
def test_a_budget_split_gives_the_gradients_of_full_checkpointing(setup, prompts, method, keep, merge, kl):
    """checkpointing=auto keeps the graphs of the window's last `keep` steps and checkpoints the
    rest: the same loss and gradients as checkpointing every step (with the LoRA merged for
    the checkpointed steps' first pass or not, with the DRaFT+ penalty or not), and the
    checkpointed steps are exactly the window's first ones."""
    from draft.config import TrainConfig

    model, params, schedule = setup
    results = []
    for kept in (0, keep):
        loop = Sampler(model, rewards.get("brightness"), schedule, guidance_scale=3.0, merge_lora=merge,
                       keep_graphs=kept, kl_coeff=kl)
        for p in params:
            p.grad = None
        out = METHODS[method](loop, _batch(model, prompts[:2]), TrainConfig(k=2, kl_coeff=kl))
        out.loss.backward()
        results.append((out.loss.detach(), torch.cat([p.grad.flatten() for p in params])))
    (loss, grad), (split_loss, split_grad) = results
    assert grad.abs().sum() > 0
    # Unmerged, the two runs do the same arithmetic; merged, the kept steps' first pass adds
    # the LoRA in another order than the folded weights do (float32 rounding).
    torch.testing.assert_close(split_loss, loss, rtol=1e-5 if merge else 0, atol=0)
    torch.testing.assert_close(split_grad, grad, rtol=1e-4 if merge else 1e-6, atol=1e-7 if merge else 1e-9)
    loop = Sampler(model, rewards.get("brightness"), schedule, keep_graphs=keep)
    assert loop.checkpointed(range(1, T)) == range(1, max(1, T - keep))
    assert Sampler(model, rewards.get("brightness"), schedule, use_checkpoint=False).checkpointed(range(T)) == range(0)


def test_only_the_checkpointed_steps_are_recomputed(setup, prompts):
    """Each checkpointed step runs its denoiser twice (forward, then again in the backward);
    a step that keeps its graph runs once."""
    from draft.config import TrainConfig

    model, params, schedule = setup
    calls = []
    denoise = model.denoise

    def counting(x, t, cond):
        calls.append(int(t.flatten()[0]))
        return denoise(x, t, cond)

    model.denoise = counting
    try:
        loop = Sampler(model, rewards.get("brightness"), schedule, guidance_scale=1.0, merge_lora=False, keep_graphs=1)
        out = METHODS["draft"](loop, _batch(model, prompts[:2]), TrainConfig())
        forward = list(calls)
        out.loss.backward()
    finally:
        del model.denoise
    assert len(forward) == T
    # the backward recomputes the first T - 1 steps, not the last one
    assert sorted(calls[T:]) == sorted(forward[:T - 1])
