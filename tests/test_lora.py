"""LoRA scaling and mixing at inference, the diffusers format, and the DRaFT+ penalty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from draft import rewards
from draft.config import LoraConfig, SamplingConfig, TrainConfig
from draft.inference import sample
from draft.lora import add_lora, save_lora
from draft.methods import METHODS, Batch, Sampler, SampleNoise
from draft.plan import sample_seed
from draft.models import load_model
from draft.sampling import Schedule

CFG = SamplingConfig(num_steps=4, guidance_scale=3.0)


@pytest.fixture(scope="module")
def two_loras(tiny_sd, tmp_path_factory):
    """Two different random LoRAs for the tiny pipeline, saved in diffusers format."""
    out = []
    for seed in (1, 2):
        model = load_model(str(tiny_sd))
        params = add_lora(model, LoraConfig(rank=4, alpha=8.0), seed=seed)  # alpha != rank on purpose
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in params:
                # Small: the scale test needs the UNet's first-order regime, which on this
                # random tiny UNet (LoRA on convolutions too) ends near 0.01.
                p.add_(0.003 * torch.randn(p.shape, generator=g))
        folder = tmp_path_factory.mktemp(f"lora{seed}")
        save_lora(model, folder)
        out.append(str(folder))
    return out


def images(tiny_sd, loras):
    return sample(str(tiny_sd), ["a small red circle", "a green star"], loras, seed=3, sampling=CFG, device="cpu")


def test_scale_zero_is_the_base_model_exactly(tiny_sd, two_loras):
    a, _ = two_loras
    base = images(tiny_sd, [])
    assert torch.equal(images(tiny_sd, [(a, 0.0)]), base)
    assert (images(tiny_sd, [(a, 1.0)]) - base).abs().max() > 1e-3


def test_mixing_with_one_adapter_at_zero_is_the_other_alone(tiny_sd, two_loras):
    a, b = two_loras
    torch.testing.assert_close(images(tiny_sd, [(a, 1.0), (b, 0.0)]), images(tiny_sd, [(a, 1.0)]), rtol=0, atol=1e-6)
    both = images(tiny_sd, [(a, 1.0), (b, 1.0)])
    assert (both - images(tiny_sd, [(a, 1.0)])).abs().max() > 1e-3


def test_scales_interpolate_and_extrapolate_along_the_adapter(tiny_sd, two_loras):
    """The UNet's LoRA contribution is linear in the scale: output(s) = base + s * delta."""
    a, _ = two_loras
    from draft.lora import load_loras

    model = load_model(str(tiny_sd))
    names = load_loras(model, [(a, 1.0)])
    x = torch.randn(2, *model.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond, _ = model.conditioning(["a red circle", "a blue star"])
    t = torch.tensor(500)
    outs = {}
    for s in (0.0, 0.5, 1.0, 1.5):
        model.unet.set_adapters(names, [s])
        with torch.no_grad():
            outs[s] = model.denoise(x, t, cond)
    delta = outs[1.0] - outs[0.0]
    assert delta.abs().max() > 1e-4
    # Attention is not linear in its projections, so this holds to first order: the change
    # at scale s is about s times the change at scale 1, in and beyond [0, 1].
    for s in (0.5, 1.5):
        ratio = float((outs[s] - outs[0.0]).norm() / delta.norm())
        assert abs(ratio - s) < 0.15 * s, (s, ratio)


def test_draft_plus_penalty_is_zero_at_init_and_pulls_back_once_the_lora_moved(tiny_model, prompts):
    params = add_lora(tiny_model, LoraConfig(rank=4))
    schedule = Schedule.from_scheduler_config(tiny_model.scheduler_config, 4)
    flat = rewards.FunctionReward(lambda im, p: 0.0 * im.mean((1, 2, 3)), "zero")  # isolates the penalty
    loop = Sampler(tiny_model, flat, schedule, guidance_scale=3.0, kl_coeff=1.0)
    cfg = TrainConfig(method="draft-k", k=2)

    def run():
        for p in params:
            p.grad = None
        noise = SampleNoise([sample_seed(0, 0, j) for j in range(2)], tiny_model.latent_shape(), "cpu")
        out = METHODS["draft-k"](loop, Batch(prompts[:2], noise, np.random.default_rng(0)), cfg)
        out.loss.backward()
        return out, torch.cat([p.grad.flatten() for p in params])

    out, grad = run()
    assert out.stats["kl_penalty"] == 0.0 and grad.abs().max() == 0.0
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    out, grad = run()
    assert out.stats["kl_penalty"] > 0 and grad.abs().max() > 0
    # A small step against the gradient lowers the penalty: it pulls towards the base model.
    with torch.no_grad():
        offset = 0
        for p in params:
            p.sub_(1e-2 * grad[offset : offset + p.numel()].view_as(p) / grad.norm())
            offset += p.numel()
    assert run()[0].stats["kl_penalty"] < out.stats["kl_penalty"]


CONV_AND_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "ff.net.2")


def test_merged_sampling_gives_the_same_images_and_restores_the_weights_bit_for_bit(tiny_sd, two_loras):
    """Folding the LoRA into the weights for gradient-free steps changes speed only."""
    from dataclasses import replace

    from draft.inference import generate
    from draft.lora import load_loras

    model = load_model(str(tiny_sd))
    load_loras(model, [(two_loras[0], 0.7), (two_loras[1], 1.3)])
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    prompts, seeds = ["a small red circle", "a green star"], [3, 4]
    plain = generate(model, prompts, seeds, replace(CFG, merge_lora=False))
    merged = generate(model, prompts, seeds, CFG)
    assert (plain - images(tiny_sd, [])).abs().max() > 1e-3  # the adapters do change the images
    torch.testing.assert_close(merged, plain, rtol=0, atol=1e-5)
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in model.unet.modules())
    with pytest.raises(RuntimeError, match="no_grad"):
        with model.adapters_merged():
            pass


@pytest.mark.parametrize("method,k", [("draft-k", 2), ("draft-lv", 1), ("refl", 1)])
def test_merging_the_gradient_free_steps_leaves_loss_and_gradient_unchanged(tiny_sd, prompts, method, k):
    model = load_model(str(tiny_sd))
    params = add_lora(model, LoraConfig(rank=4, target_modules=CONV_AND_ATTENTION), seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    schedule = Schedule.from_scheduler_config(model.scheduler_config, 4)
    cfg = TrainConfig(method=method, k=k, refl_min_step=1, refl_max_step=2)
    results = []
    for merge in (False, True):
        loop = Sampler(model, rewards.get("brightness"), schedule, guidance_scale=3.0, merge_lora=merge)
        for p in params:
            p.grad = None
        noise = SampleNoise([sample_seed(0, 0, j) for j in range(2)], model.latent_shape(), "cpu")
        out = METHODS[method](loop, Batch(prompts[:2], noise, np.random.default_rng(0)), cfg)
        out.loss.backward()
        results.append((out.loss.detach(), torch.cat([p.grad.flatten() for p in params])))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert grad_a.abs().max() > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)


def test_a_file_mixing_key_forms_is_refused_not_loaded_in_part(tiny_sd, two_loras, tmp_path):
    """diffusers' convert_state_dict_to_diffusers writes such files; diffusers then drops half."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from draft.errors import UserError
    from draft.lora import WEIGHT_NAME, load_loras

    src = f"{two_loras[0]}/{WEIGHT_NAME}"
    with safe_open(src, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old_form = {".lora_A.weight": ".lora.down.weight", ".lora_B.weight": ".lora.up.weight"}
    mixed = {}
    for k, v in tensors.items():
        for new, old in old_form.items():
            if ".to_q" in k and k.endswith(new):
                k = k[: -len(new)] + old
        mixed[k] = v
    assert mixed.keys() != tensors.keys()
    save_file(mixed, tmp_path / WEIGHT_NAME, metadata=meta)
    with pytest.raises(UserError, match="mixes"):
        load_loras(load_model(str(tiny_sd)), [(str(tmp_path), 1.0)])
