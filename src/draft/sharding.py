"""FSDP2 through Accelerate: the frozen denoiser sharded across processes, the LoRA trained.

`accelerate launch` with an FSDP2 config (`accelerate config`, or `--use_fsdp --fsdp_version 2`)
makes `Accelerator.prepare` call `fully_shard` on each block its auto-wrap policy picks (by
default the classes in the denoiser's `_no_split_modules`) and then on the whole denoiser;
every parameter, the frozen base's and the LoRA's, becomes a DTensor holding this process's
shard, gathered block by block for each forward and backward. What that changes for draft:

- the LoRA's weights and Adam's moments are shards: checkpoints and the saved LoRA gather
  them whole (`full`; a collective, so every process calls it) and `--resume` cuts them
  back (`like`), so a checkpoint reads the same sharded or not;
- the sharded denoiser runs only with every process taking part, so the grids and the
  evaluation are sampled on every process (the main one writes them);
- `sampling.merge_lora` and `sampling.merged_recompute` fold the LoRA into the base weights,
  which are shards here: they are turned off, with a line saying so.

Accelerate engages FSDP only on accelerators; CPU processes launched with an FSDP2 config get
Accelerate's FSDP2 path anyway (`engage_on_cpu`), over gloo, which is how it is tested.
"""

from __future__ import annotations

import dataclasses
import os

import torch


def engage_on_cpu(accelerator) -> None:
    """Switch Accelerate's state to FSDP2 for CPU processes launched with an FSDP2 config.

    Accelerate's state sets FSDP only for accelerator types (accelerate/state.py); the rest
    of its FSDP2 path (`prepare`, `clip_grad_norm_`, `get_state_dict`) runs on the CPU as is."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    if not launched_fsdp2():
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` sets
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def launched_fsdp2() -> bool:
    """Whether `accelerate launch` was given an FSDP2 config (the variables it sets)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION") == "2"


def is_sharded(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def setup(config, accelerator):
    """Engage FSDP2 on CPU processes if configured (`engage_on_cpu`); return the config with the
    options that fold the LoRA into the (sharded) weights turned off."""
    from accelerate.utils import DistributedType

    from draft.errors import UserError

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserError("DeepSpeed is not supported: shard the denoiser with an FSDP2 accelerate config "
                        "(README, Several GPUs)")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION") != "2":
        # FSDP1 flattens the parameters, which the LoRA's saving and loading here do not read.
        raise UserError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                        "(README, Several GPUs)")
    engage_on_cpu(accelerator)
    s = config.sampling
    if not is_sharded(accelerator):
        return config
    if config.guard.every:
        # The guard evaluates and keeps the best LoRA on the main process alone, which a sharded
        # denoiser cannot do: every process must join each forward and each gather.
        raise UserError("guard.every is not supported under FSDP2 yet: set guard.every=0, or train unsharded")
    if config.quantize not in ("none", "nf4"):
        # torchao's int8 and float8 weights implement no split, so fully_shard cannot cut them.
        raise UserError(f"quantize={config.quantize} is not supported under FSDP2: torchao's {config.quantize} "
                        "weights cannot be sharded; use quantize=nf4 (it shards), or train unsharded")
    accelerator.print(f"FSDP2: the denoiser is sharded across {accelerator.num_processes} processes; the grids "
                      "and the evaluation are sampled on every process")
    if s.compile != "none":
        # A compiled bare module would run the shards without FSDP2's all-gathers.
        accelerator.print(f"FSDP2: sampling.compile={s.compile} is off: the steps without gradient run the sharded "
                          "denoiser eagerly")
        s = dataclasses.replace(s, compile="none")
    if s.merge_lora or s.merged_recompute:
        accelerator.print("FSDP2: sampling.merge_lora and sampling.merged_recompute are off: they fold the LoRA "
                          "into the base weights, which are shards under sharding; steps without gradient run the "
                          "LoRA unmerged")
        s = dataclasses.replace(s, merge_lora=False, merged_recompute=False)
    return config.replace(sampling=s)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process calls it); a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`value` (whole) cut as `target` is sharded, so it can be copied into it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return value
    return distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)


def optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with every shard whole. Not torch's `get_optimizer_state_dict`:
    it keys the state by parameter name, the checkpoint (`draft.checkpoint`) by position, so a
    checkpoint written sharded resumes unsharded and back."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: full(v) if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    return sd


def shard_optimizer_state(optimizer) -> None:
    """After `load_state_dict` of whole tensors: cut each moment as its parameter is sharded."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0:
                    state[k] = like(v, p)
