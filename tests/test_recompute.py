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
