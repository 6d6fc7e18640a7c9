"""A quantized frozen base (`quantize`, `draft.models.memory`): the LoRA trains in float32 on
top of torchao's int8, float8 or nf4 weights, its gradients those of the dequantized model
within the quantization's rounding; the merged fast path folds the LoRA into a dequantized
float copy of the adapted layers; the estimate counts the quantized bytes. The tests that
quantize need torchao (the [quant] extra)."""

from __future__ import annotations

import sys

import pytest
import torch

from draft.config import LoraConfig, SamplingConfig, TrainConfig
from draft.errors import UserError
from draft.lora import add_lora
from draft.methods import METHODS, Sampler
from draft.models import load_model
from draft.models.memory import dequantized, is_quantized, quantize, quantized_bytes
from draft.plan import micro_batch
from draft.rewards import FunctionReward

T = 4
HOWS = ["int8", "float8", "nf4"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from draft.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("flux"), "flux")


def _lora(model):
    params = add_lora(model, LoraConfig(rank=4))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # off B = 0, the same on every model
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    return params


def _gradients(model, params, merge: bool = True):
    reward = FunctionReward(lambda images, prompts: images.mean((1, 2, 3)), "brightness")
    sampler = Sampler(model, reward, model.schedule(T), guidance_scale=3.0, merge_lora=merge, merged_recompute=merge)
    batch = micro_batch(0, 0, 0, 0, 1, 2, 1, ["a red circle", "a blue star"], model.latent_shape(), "cpu")
    METHODS["draft-k"](sampler, batch, TrainConfig(k=2)).loss.backward()
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("how", HOWS)
def test_lora_gradients_on_a_quantized_base_are_those_of_the_dequantized_model(how, tiny_flux, one_thread):
    """The same LoRA on the quantized base and on a plain copy holding its dequantized weights:
    gradients equal within the kernels' rounding, far closer than to the unquantized model's."""
    pytest.importorskip("torchao")
    quantized, plain_copy, original = (load_model(str(tiny_flux)) for _ in range(3))
    quantize(quantized, how)
    layers = dict(plain_copy.denoiser.named_modules())
    n = 0
    for name, layer in quantized.denoiser.named_modules():
        if isinstance(layer, torch.nn.Linear) and is_quantized(layer.weight):
            layers[name].weight.data = dequantized(layer.weight).to(layers[name].weight.dtype)
            n += 1
    assert n > 0
    g_q, g_d, g_o = (_gradients(m, _lora(m)) for m in (quantized, plain_copy, original))
    assert g_q.abs().sum() > 0
    torch.testing.assert_close(g_q, g_d, rtol=1e-4, atol=1e-6)
    assert (g_q - g_d).norm() < 0.1 * (g_q - g_o).norm()  # the quantization is really there


def test_the_merged_fast_path_on_a_quantized_base_gives_the_unmerged_gradients(tiny_flux, one_thread):
    """DRaFT-K with its gradient-free steps and its window's first pass merged into the
    dequantized copy, against the LoRA unmerged throughout."""
    pytest.importorskip("torchao")
    model = load_model(str(tiny_flux))
    quantize(model, "int8")
    params = _lora(model)
    with torch.no_grad(), model.adapters_merged() as base:
        assert base is not None  # something was folded
    merged = _gradients(model, params, merge=True)
    for p in params:
        p.grad = None
    unmerged = _gradients(model, params, merge=False)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("how", HOWS)
def test_merging_into_a_dequantized_copy_matches_the_unmerged_lora(how, tiny_flux, one_thread):
    """`adapters_merged` on a quantized base: inside the block the adapted quantized layers run
    dequantize(W) + ΔW as plain weights, giving the unmerged LoRA's output to round-off; its
    base-model switch gives the base's; on exit the very same quantized weights are back."""
    pytest.importorskip("torchao")
    model = load_model(str(tiny_flux))
    quantize(model, how)
    _lora(model)
    net = model.denoiser
    before = {n: (p, dequantized(p).clone()) for n, p in net.named_parameters() if is_quantized(p)}
    x = torch.randn(2, *model.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond, _ = model.conditioning(["a red circle", "a blue star"], 3.5)
    t = torch.tensor(500.0)
    with torch.no_grad():
        unmerged = model.denoise(x, t, cond)
        with model.adapters_disabled():
            base = model.denoise(x, t, cond)
        with model.adapters_merged() as base_model:
            plain = [n for n, p in net.named_parameters() if n in before and not is_quantized(p)]
            folded = model.denoise(x, t, cond)
            with base_model():
                folded_base = model.denoise(x, t, cond)
    assert plain and all("base_layer" in n for n in plain)  # the adapted layers ran as plain ones
    assert (unmerged - base).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(folded, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded_base, base, rtol=1e-5, atol=1e-5)
    after = dict(net.named_parameters())
    for n, (p, values) in before.items():
        assert after[n] is p and is_quantized(p) and torch.equal(dequantized(p), values)
    with torch.no_grad():
        torch.testing.assert_close(model.denoise(x, t, cond), unmerged, rtol=0, atol=0)


@pytest.mark.slow
def test_a_short_training_run_on_an_int8_base(tiny_flux, tmp_path, capsys):
    """`draft train quantize=int8`: says so at start-up, the LoRA changes, the base stays int8."""
    pytest.importorskip("torchao")
    from draft.cli import main
    from draft.lora import WEIGHT_NAME
    from safetensors.torch import load_file

    args = [f"model={tiny_flux}", "quantize=int8", "reward=brightness", "prompts=a small red circle|a green star",
            "eval_prompts=a green star", "steps=2", "batch_size=1", "sampling.num_steps=3", "log.eval_samples=0",
            "log.trackers=[]", "log.sample_prompts=1", "log.sample_seeds=1", f"output_dir={tmp_path}", "name=q"]
    assert main(["train", *args, "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "quantize=int8" in out.out and "merge_lora" in out.out
    assert "Failed to load" not in out.err and "TorchaoLoraLinear" not in out.err
    assert "Linear weights int8 (torchao)" in (tmp_path / "q" / "lora" / "README.md").read_text()  # the card
    lora = load_file(tmp_path / "q" / "lora" / WEIGHT_NAME)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())


@pytest.mark.parametrize("how", HOWS)
def test_the_estimate_counts_the_quantized_bytes(how, tiny_flux):
    """The estimate's count for a quantized denoiser is the bytes torchao's tensors hold."""
    pytest.importorskip("torchao")
    model = load_model(str(tiny_flux))
    net = model.denoiser
    counted = quantized_bytes(net, torch.float32, how)
    quantize(model, how)
    held = 0
    for t in (*net.parameters(), *net.buffers()):
        if is_quantized(t):
            names = t.tensor_data_names if hasattr(t, "tensor_data_names") else \
                ("quantized_data", "quantized_scalers", "quantization_factor")
            held += sum(getattr(t, k).numel() * getattr(t, k).element_size() for k in names)
        else:
            held += t.numel() * t.element_size()
    assert counted < quantized_bytes(net, torch.float32, "none") == sum(
        t.numel() * t.element_size() for t in (*load_model(str(tiny_flux)).denoiser.parameters(),
                                                *load_model(str(tiny_flux)).denoiser.buffers()))
    assert abs(counted - held) <= 0.02 * held, (counted, held)


def test_the_estimate_shrinks_the_weights_by_the_bits(tiny_flux):
    """No torchao needed: the dry run counts 8- and 4-bit weights below the run's precision."""
    from draft.estimate import estimate

    weights = {}
    for how in ("none", *HOWS):
        cfg = TrainConfig(model=str(tiny_flux), method="draft-k", k=1, quantize=how,
                          sampling=SamplingConfig(num_steps=T, guidance_scale=3.5)).validate()
        est = estimate(cfg, tiny_flux)
        weights[how] = est.parts["transformer"]
        assert how == "none" or any(n.startswith(f"quantize={how}") for n in est.notes)
    assert weights["nf4"] < weights["int8"] == weights["float8"] < weights["none"]


def test_without_torchao_the_error_names_the_extra(tiny_flux, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(UserError, match=r"draft-diffusion\[quant\]"):
        quantize(load_model(str(tiny_flux)), "int8")


def test_an_unknown_quantization_is_a_user_error():
    with pytest.raises(UserError, match="quantize"):
        TrainConfig(quantize="int3").validate()


def test_nf4_keeps_enough_second_level_scales_for_fsdp2_to_cut():
    """FSDP2 cuts each of an NF4 weight's inner tensors into equal parts (torchao's `nf4_split`):
    a small layer gets finer second-level blocks so it still has NF4_SHARDS of them; a layer of
    a real model's width keeps QLoRA's 256 scales to a block."""
    pytest.importorskip("torchao")
    from draft.models.memory import NF4_SHARDS, _to_nf4

    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(3072, 3072, bias=False))
    _to_nf4(net)
    small, real = net[0].weight, net[1].weight
    assert small.quantization_factor.numel() == NF4_SHARDS and small.scaler_block_size == 2
    assert real.scaler_block_size == 256 and real.quantization_factor.numel() % NF4_SHARDS == 0
    # Split as FSDP2 does for 2 processes: two halves that dequantize to the whole's rows.
    halves = torch.split(small, 16)
    torch.testing.assert_close(torch.cat([dequantized(h) for h in halves]), dequantized(small))
