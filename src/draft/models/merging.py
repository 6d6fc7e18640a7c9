"""Switching a denoiser's LoRA adapters off, and folding them into its weights for sampling.

`PipelineAdapter.adapters_disabled` and `adapters_merged` are these functions over the
adapter's denoiser; `unwrap` sees through the wrappers a trainer puts around it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def disabled(denoiser) -> Iterator[None]:
    """Run the base model: every LoRA adapter of the denoiser switched off, then back on."""
    net = unwrap(denoiser)
    net.disable_adapters()
    try:
        yield
    finally:
        net.enable_adapters()


@contextlib.contextmanager
def merged(denoiser) -> Iterator[None]:
    """Fold the active LoRA adapters into the denoiser's weights for gradient-free sampling.

    peft runs an adapted layer as the base layer plus two small LoRA products; in the
    T - 1 steps that carry no gradient, that is pure overhead (BENCHMARKS.md, "folding the LoRA
    into the weights for gradient-free steps"). Inside this block the adapted layers run as
    plain layers with W + ΔW. On exit the saved base weights are copied back, so they
    come out bit for bit as they went in (subtracting ΔW again would not, and in bf16
    would drift visibly). Costs one copy of the adapted layers' weights while inside.

    A quantized base layer (`quantize`) has no float weights to fold into: inside the block
    it runs as a plain layer holding a float copy of its dequantized weight plus ΔW
    (`_dequantized_layers`), which costs those layers' float weights, the memory quantizing
    saved, for the block's duration. On the CPU that was faster than running the LoRA
    unmerged over the quantized weights for int8, float8 and nf4, and the copy is made once
    per block, not per step (BENCHMARKS.md, "merging into a dequantized copy").

    Only under no_grad; a no-op when the denoiser is sharded (FSDP, DeepSpeed) or
    compiled, whose weights cannot be edited in place, or when adapters are off.
    Yields None when it merged nothing, else a context manager that runs the base model
    inside the block (the saved weights swapped in, no copies; for DRaFT+).
    """
    from peft.tuners.lora import LoraLayer

    from draft.models.memory import is_quantized

    if torch.is_grad_enabled():
        raise RuntimeError("adapters_merged() is for sampling under no_grad")
    net = bare(denoiser)
    active = [] if net is None else [
        m for m in net.modules() if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged
        and m.active_adapters
    ]
    quantized = [m for m in active if is_quantized(m.get_base_layer().weight)]
    layers = [m for m in active if not is_quantized(m.get_base_layer().weight)]
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    try:
        for m in layers:
            m.merge()
        with _dequantized_layers(quantized) as base_of_quantized:
            base = functools.partial(_base_weights, layers, saved, base_of_quantized)
            yield base if layers or quantized else None
    finally:
        for m, weight in zip(layers, saved):
            m.merged_adapters.clear()  # peft's own record; the weights are restored below
            m.get_base_layer().weight.data.copy_(weight)


@contextlib.contextmanager
def _dequantized_layers(layers) -> Iterator:
    """Inside: each quantized layer's weight parameter swapped for a plain float one holding
    dequantize(W) + ΔW, and the layer marked merged so peft runs only its base layer; on exit
    the quantized parameter itself goes back, untouched. Yields a context manager that swaps
    the quantized weights back in (the base model, for DRaFT+).

    Written here rather than by peft's `merge`, which would quantize W + ΔW again (the base
    would not come back bit for bit) and which draft's torchao layers cannot call (no
    requantization recipe)."""
    from draft.models.memory import dequantized

    quantized = [m.get_base_layer().weight for m in layers]
    try:
        for m, weight in zip(layers, quantized):
            w = dequantized(weight).to(weight.dtype)
            for name in m.active_adapters:
                w += m.get_delta_weight(name).to(w.dtype)
            m.get_base_layer().weight = torch.nn.Parameter(w, requires_grad=False)
            m.merged_adapters.extend(m.active_adapters)
        yield functools.partial(_swapped, layers, quantized)
    finally:
        for m, weight in zip(layers, quantized):
            m.merged_adapters.clear()
            m.get_base_layer().weight = weight


@contextlib.contextmanager
def _swapped(layers, weights) -> Iterator[None]:
    """Point each layer's base weight parameter at another one for the block, and back."""
    before = [m.get_base_layer().weight for m in layers]
    for m, weight in zip(layers, weights):
        m.get_base_layer().weight = weight
    try:
        yield
    finally:
        for m, weight in zip(layers, before):
            m.get_base_layer().weight = weight


@contextlib.contextmanager
def _base_weights(layers, saved, base_of_quantized) -> Iterator[None]:
    """Inside `merged`: point the merged layers at the saved base weights, and back.

    A merged peft layer runs only its base layer, so this runs the base model at the cost
    of two pointer swaps per layer (instead of unmerging and merging again)."""
    merged_weights = [m.get_base_layer().weight.data for m in layers]
    for m, weight in zip(layers, saved):
        m.get_base_layer().weight.data = weight
    try:
        with base_of_quantized():
            yield
    finally:
        for m, weight in zip(layers, merged_weights):
            m.get_base_layer().weight.data = weight


def bare(module):
    """The bare denoiser if its weights are ordinary tensors (bare or under DDP), else None."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        module = module.module
    if hasattr(module, "module") or hasattr(module, "_orig_mod"):
        return None  # FSDP, DeepSpeed or torch.compile wrappers
    return module


def unwrap(module):
    """The module inside a DistributedDataParallel/compile wrapper."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module
