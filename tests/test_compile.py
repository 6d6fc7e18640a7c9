"""sampling.compile: the gradient-free denoiser calls run through torch.compile, with the
same results as eager, the LoRA's current weights on every call, and one compilation."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_train import make_trainer, tiny_config  # noqa: F401 (a fixture)

from draft.config import SamplingConfig
from draft.errors import UserError


def two_steps(tiny_sd, tmp_path, make, compile: str, **sampling):
    """(each step's gradient, each step's loss, the LoRA after both) of a short DRaFT-K run."""
    # With DRaFT+ (kl_coeff): its base-model passes swap the base weights in under the merged LoRA.
    t = make(tiny_config(tiny_sd, tmp_path / compile, kl_coeff=0.03, sampling=SamplingConfig(
        num_steps=4, guidance_scale=3.0, compile=compile, **sampling)))
    grads, step = [], t.optimizer.step
    t.optimizer.step = lambda *a, **k: (grads.append(torch.cat([p.grad.flatten() for p in t.params])), step(*a, **k))
    losses = []
    for _ in range(2):
        losses.append(t.optimizer_step()["loss"])
        t.progress.step += 1
    return grads, losses, torch.cat([p.detach().flatten() for p in t.params])


@pytest.mark.parametrize("merge_lora", [True, pytest.param(False, marks=pytest.mark.slow)])  # unmerged: ~35 s cold
def test_training_with_compiled_sampling_trains_as_eager(tiny_sd, tmp_path, make_trainer, merge_lora):
    grads, losses, lora = two_steps(tiny_sd, tmp_path, make_trainer, "none", merge_lora=merge_lora)
    grads_c, losses_c, lora_c = two_steps(tiny_sd, tmp_path, make_trainer, "whole", merge_lora=merge_lora)
    scale = float(grads[0].abs().max())
    assert scale > 0
    # The first step starts from the same weights: the compiled chain's rounding only.
    torch.testing.assert_close(grads_c[0], grads[0], rtol=0, atol=1e-5 * scale)
    assert losses_c == pytest.approx(losses, rel=1e-5)
    # The second starts from LoRAs one Adam step apart by that rounding, which Adam's
    # division by sqrt(v) enlarges where a gradient is ~0; its gradient agrees to 1e-3.
    torch.testing.assert_close(grads_c[1], grads[1], rtol=0, atol=1e-3 * scale)
    assert (lora_c - lora).abs().median() < 1e-6


@pytest.mark.parametrize("merged", [True, pytest.param(False, marks=pytest.mark.slow)])  # unmerged: ~35 s cold
def test_compiled_calls_see_the_lora_as_it_is_now(tiny_lora, merged):
    """After an in-place update of the LoRA (an optimizer step), a compiled call gives what
    an eager one gives, the LoRA folded into the weights (`merge_lora`) or not."""
    from torch._dynamo.utils import counters

    model, params = tiny_lora
    frames = counters["frames"]["ok"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.latent_shape(), generator=g)
    t = torch.tensor(500)
    cond, _ = model.conditioning(["a red circle", "a blue square"], 1.0)
    folded = model.adapters_merged if merged else contextlib.nullcontext
    outputs = []
    for _ in range(2):
        with torch.no_grad(), folded():
            eager = model.denoise(x, t, cond)
        with model.compile_sampling("whole"), torch.no_grad(), folded():
            compiled = model.denoise(x, t, cond)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        outputs.append(compiled)
        with torch.no_grad():  # an optimizer's in-place update
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3  # the update moved the output
    assert counters["frames"]["ok"] > frames  # and the compiled forward is what ran


def test_three_training_steps_compile_once(tiny_sd, tmp_path, make_trainer):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    t = make_trainer(tiny_config(tiny_sd, tmp_path, sampling=SamplingConfig(num_steps=4, guidance_scale=3.0,
                                                                           compile="whole")))
    graphs = []
    for _ in range(3):
        t.optimizer_step()
        t.progress.step += 1
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[0] == graphs[1] == graphs[2], graphs


def test_unknown_compile_mode_is_a_user_error_listing_the_choices():
    from draft.config import load_config

    with pytest.raises(UserError, match="unknown sampling.compile 'fast'; choose from: blocks, none, whole"):
        load_config(None, ["sampling.compile=fast"])
    assert load_config(None, ["sampling.compile=blocks"]).sampling.compile == "blocks"


def test_blocks_of_a_denoiser_that_names_none_are_refused_by_class():
    from draft.models.compiled import CompiledSampling

    with pytest.raises(UserError, match="Sequential names no repeated blocks"):
        CompiledSampling(torch.nn.Sequential(torch.nn.Linear(2, 2)), "blocks")


def test_blocks_compile_the_unets_transformer_blocks_and_match_eager(tiny_lora):
    model, _ = tiny_lora
    x = torch.randn(2, *model.latent_shape(), generator=torch.Generator().manual_seed(1))
    t = torch.tensor(300)
    cond, _ = model.conditioning(["a red circle", "a blue square"], 1.0)
    with torch.no_grad(), model.adapters_merged():
        eager = model.denoise(x, t, cond)
        with model.compile_sampling("blocks"):
            compiled = model.denoise(x, t, cond)
    blocks = [m for m in model.denoiser.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(type(m.forward).__name__ == "_Dispatch" for m in blocks)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_under_ddp_a_gradient_free_call_skips_the_wrapper(tiny_lora, tmp_path):
    """A no-grad forward needs none of DDP's collectives: inside the block it gets the bare
    denoiser (compiled); a gradient-carrying call still goes through the wrapper."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, _ = tiny_lora
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        bare = model.denoiser
        model.denoiser = DistributedDataParallel(bare)
        x = torch.randn(2, *model.latent_shape(), generator=torch.Generator().manual_seed(2))
        t = torch.tensor(700)
        cond, _ = model.conditioning(["a red circle", "a blue square"], 1.0)
        with torch.no_grad():
            eager = model.denoise(x, t, cond)
        with model.compile_sampling("whole"):
            assert isinstance(model.denoiser, DistributedDataParallel)  # gradient on
            with torch.no_grad():
                assert model.denoiser is bare
                compiled = model.denoise(x, t, cond)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()
