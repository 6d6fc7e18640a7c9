"""Memory options inside the denoiser (`draft.models.memory`): per-block gradient
checkpointing gives the gradients of the run without it, and the estimate counts it."""

from __future__ import annotations

import pytest
import torch

from draft.config import LoraConfig, SamplingConfig, TrainConfig
from draft.lora import add_lora
from draft.methods import METHODS, Sampler
from draft.models import load_model
from draft.models.memory import checkpoint_blocks
from draft.plan import micro_batch
from draft.rewards import FunctionReward

T = 4


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from draft.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("flux"), "flux")


def _with_lora(path: str):
    """The model with a rank-4 LoRA moved off B = 0 (the same on every call)."""
    model = load_model(path)
    params = add_lora(model, LoraConfig(rank=4))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    return model, params


def _brightness():
    return FunctionReward(lambda images, prompts: images.mean((1, 2, 3)), "brightness")


@pytest.mark.parametrize("family", ["shapes-sd", "flux"])
@pytest.mark.parametrize("whole_call,merge", [(False, False), (True, False), (True, True)],
                         ids=["blocks-alone", "inside-torch-checkpoint", "inside-merged-recompute"])
def test_block_checkpointing_gives_the_gradients_of_the_run_without_it(family, whole_call, merge, tiny_flux,
                                                                        one_thread):
    """DRaFT-K over 2 steps, with whole-call checkpointing off, through torch.utils.checkpoint,
    or through the merged first pass (`sampling._Recomputed`): the same loss and LoRA
    gradients, and the backward really runs the blocks again."""
    results = []
    for blocks in (False, True):
        model, params = _with_lora(str(tiny_flux) if family == "flux" else family)
        if blocks:
            checkpoint_blocks(model)
        runs = [0]
        for name, module in model.denoiser.named_modules():
            if name.endswith("to_q"):  # an attention projection: inside a block in every family
                module.register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
        sampler = Sampler(model, _brightness(), model.schedule(T), guidance_scale=3.0, use_checkpoint=whole_call,
                          merge_lora=merge, merged_recompute=merge)
        batch = micro_batch(0, 0, 0, 0, 1, 2, 1, ["a red circle", "a blue star"], model.latent_shape(), "cpu")
        out = METHODS["draft-k"](sampler, batch, TrainConfig(k=2))
        before = runs[0]
        out.loss.backward()
        results.append((out.loss.detach(), torch.cat([p.grad.flatten() for p in params]), runs[0] - before))
    (loss, grad, reruns), (loss_b, grad_b, reruns_b) = results
    assert grad.abs().sum() > 0
    assert reruns_b > reruns  # the blocks' forwards again in the backward
    torch.testing.assert_close(loss_b, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_b, grad, rtol=1e-5, atol=1e-8)


def test_gradient_free_sampling_is_unaffected(tiny_flux, one_thread):
    """No graph, no recompute: a gradient-free chain runs each block once per step, as before."""
    model, _ = _with_lora(str(tiny_flux))
    checkpoint_blocks(model)
    runs = [0]
    first = next(m for n, m in model.denoiser.named_modules() if n.endswith("to_q"))
    first.register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    sampler = Sampler(model, _brightness(), model.schedule(T), guidance_scale=3.0)
    batch = micro_batch(0, 0, 0, 0, 1, 1, 1, ["a red circle"], model.latent_shape(), "cpu")
    sampler.run_no_grad(batch.noise.draw(), sampler.conditioning(batch.prompts), batch.noise)
    assert runs[0] == T


def test_the_estimate_counts_one_block_for_the_backward(tiny_flux):
    """With block checkpointing the counted activations of a gradient call fall (the decode
    is unchanged), and the step costs one forward more."""
    from draft.estimate import _activations, _on_meta, estimate
    from draft.models import meta

    out = {}
    for blocks in (False, True):
        cfg = TrainConfig(model=str(tiny_flux), method="draft-lv", lv_n=2, batch_size=2,
                          sampling=SamplingConfig(num_steps=T, guidance_scale=3.5, height=256, width=256,
                                                  checkpointing=True, block_checkpointing=blocks)).validate()
        model = _on_meta(cfg, tiny_flux, meta.components(tiny_flux), torch.float32)
        u, d, *_ = _activations(cfg, model, torch.float32)
        out[blocks] = (u, d, estimate(cfg, tiny_flux))
    (u, d, est), (u_b, d_b, est_b) = out[False], out[True]
    assert 0 < u_b < u and d_b == d
    assert est_b.time_ratio > est.time_ratio
    assert any("block_checkpointing" in n for n in est_b.notes)
