"""Memory options inside the denoiser: per-block gradient checkpointing and a quantized frozen base.

`sampling.checkpointing` checkpoints a gradient-carrying denoiser call as a whole: the
step keeps only its input latent, but the backward recomputes the call and holds every
block's activations at once, which is most of the peak for a large transformer at high
resolution (FLUX.1-dev at 1024 px: `--dry-run`). `sampling.block_checkpointing` turns on
diffusers' own per-block checkpointing (`ModelMixin.enable_gradient_checkpointing`), so a
call keeps the inputs of its blocks and the backward holds one block's activations at a
time. diffusers applies it only where autograd is on, so gradient-free steps (and the
graph-free first pass of `sampling._Recomputed`) run as before; under whole-call
checkpointing the two nest: the backward recomputes the call keeping block inputs only,
then each block, one forward more than either alone.
"""

from __future__ import annotations

import math

import torch

from draft.errors import UserError


def denoisers(model) -> list[torch.nn.Module]:
    """The model's denoising networks, bare: the LoRA's, and Wan 2.2's other expert, through
    which the gradient flows on the steps it runs."""
    from draft.models.merging import unwrap

    return [unwrap(n) for n in (model.denoiser, getattr(model, "other", None)) if n is not None]


def memory_options(model, block_checkpointing: bool = False, quantization: str = "none") -> list[str]:
    """Apply the run's memory options to a loaded model, before its LoRA is added; the lines
    to print at start-up."""
    if block_checkpointing:
        checkpoint_blocks(model)
    return quantize(model, quantization)


def checkpoint_blocks(model) -> None:
    """Per-block gradient checkpointing in every denoiser (diffusers' own, non-reentrant)."""
    for net in denoisers(model):
        if not getattr(net, "_supports_gradient_checkpointing", False):
            raise UserError(f"sampling.block_checkpointing: {type(net).__name__} has no per-block gradient "
                            "checkpointing in diffusers; use sampling.checkpointing alone")
        net.enable_gradient_checkpointing()


# --- a quantized frozen base ------------------------------------------------------------------
#
# torchao (the [quant] extra) holds each frozen Linear weight of the denoiser as a tensor
# subclass that dequantizes inside its own matmul, so the gradient flows through the
# dequantized weights to the input and on to the LoRA, which peft adds in float32 on top
# (`draft.lora.add_lora`) as it does on a plain layer. int8 and float8 are weight-only with
# one scale per output row (torchao's `quantize_`); nf4 is QLoRA's 4-bit NormalFloat with
# double-quantized block scales (torchao's `to_nf4`, as torchtune's QLoRA uses it).
QUANT_BITS = {"int8": 8, "float8": 8, "nf4": 4}
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # QLoRA's: 64 weights per scale, 256 scales per second-level scale
# FSDP2 cuts an NF4 weight's second-level scales evenly across the processes (torchao's
# `nf4_split`): a layer keeps at least this many of them where it has the scales to.
NF4_SHARDS = 8


def quantize(model, how: str) -> list[str]:
    """Quantize the frozen Linear weights of every denoiser in place (before the LoRA goes
    on); the lines to print at start-up."""
    if how == "none":
        return []
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)  # its GPU kernels, unloadable on a CPU-only torch
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise UserError(f"quantize={how} needs torchao: pip install 'draft-diffusion[quant]'") from None
    for net in denoisers(model):
        if how == "nf4":
            _to_nf4(net)
        else:
            quantize_(net, {"int8": Int8WeightOnlyConfig, "float8": Float8WeightOnlyConfig}[how]())
    return [f"quantize={how}: the denoiser's frozen Linear weights are {how} (torchao), the LoRA float32 on top; "
            "sampling.merge_lora folds the LoRA into a float copy of the adapted layers' dequantized weights for "
            "the gradient-free steps (faster than running it unmerged, but that copy is the adapted layers at full size)"]


def _to_nf4(net: torch.nn.Module) -> None:
    """Every Linear weight whose size NF4's blocks divide, as an NF4 tensor (others stay as they are)."""
    from torchao.quantization import to_nf4

    for layer in net.modules():
        if not isinstance(layer, torch.nn.Linear) or layer.weight.numel() % NF4_BLOCK:
            continue
        scaler_block = nf4_scaler_block(layer.weight.numel())
        layer.weight = torch.nn.Parameter(to_nf4(layer.weight.detach(), NF4_BLOCK, scaler_block), requires_grad=False)


def nf4_scaler_block(n: int) -> int:
    """Scales per second-level block of an NF4 weight of `n` values. A small layer has fewer
    scales than QLoRA's 256: a finer block, so that it still has NF4_SHARDS of them to shard
    (a model's real layers keep 256)."""
    scales = n // NF4_BLOCK
    return math.gcd(scales, NF4_SCALER_BLOCK, max(1, scales // NF4_SHARDS))


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether a weight is held by a quantization library (a tensor subclass) rather than as plain values."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A quantized weight's values as a plain tensor (NF4's through its own accessor)."""
    return weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()


def quantized_bytes(net: torch.nn.Module, dtype: torch.dtype, how: str) -> int:
    """Bytes of a denoiser's weights with its Linear weights quantized `how` (the estimate):
    the quantized values and a float32 scale per row (int8, float8) or a byte per 64-weight
    block and a float32 per second-level block (nf4's double-quantized scales); everything
    else in `dtype`."""
    from draft.models.meta import module_bytes

    total = module_bytes(net, dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    for layer in net.modules():
        if isinstance(layer, torch.nn.Linear):
            n = layer.weight.numel()
            if how == "nf4" and n % NF4_BLOCK == 0:
                total += n // 2 + n // NF4_BLOCK + 4 * (n // NF4_BLOCK // nf4_scaler_block(n)) - n * size
            elif how in ("int8", "float8"):
                total += n + 4 * layer.out_features - n * size
    return total
