"""Running the denoiser's gradient-free calls through `torch.compile` (`sampling.compile`).

Most of a training step's denoiser calls carry no gradient (the steps outside the gradient
window, and the first pass of a recomputed step), and those are plain inference, which
`torch.compile` speeds up (BENCHMARKS.md: floor_levers). The gradient-carrying calls stay
eager: compiling them means compiling their backward too, which is another question.

`CompiledSampling` puts a dispatch in place of the `forward` of the bare denoiser
(`whole`) or of each of its repeated blocks (`blocks`, diffusers' regional compilation):
inside `active()` and under no_grad the compiled forward runs, otherwise the eager one.
diffusers' `ModelMixin.compile_repeated_blocks` compiles the blocks for every call, the
gradient-carrying ones included, so the blocks are found by the same `_repeated_blocks`
attribute but compiled here, behind the same dispatch.

The parameters are inputs of the compiled graphs, not constants, so an optimizer's
in-place update and a merged LoRA (`draft.models.merging`) are seen by the next call
without recompiling; peft's merged/unmerged state is a Python flag the graph is guarded on,
so each state compiles once. Shapes are static (`dynamic=False`): a new batch shape, such
as a smaller last batch, compiles once more rather than making every graph dynamic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from draft.errors import UserError, unknown
from draft.sampling_config import COMPILE_CHOICES


class _Dispatch:
    """A module's forward: the compiled one for gradient-free calls while active, else eager."""

    def __init__(self, eager, owner: "CompiledSampling"):
        self.eager, self.owner = eager, owner
        self.compiled = torch.compile(eager, dynamic=False)

    def __call__(self, *args, **kwargs):
        if self.owner.on and not torch.is_grad_enabled():
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)


class CompiledSampling:
    """The gradient-free calls of `net` (the bare denoiser, no DDP wrapper) compiled by `mode`."""

    def __init__(self, net: torch.nn.Module, mode: str):
        if mode not in COMPILE_CHOICES[1:]:
            raise unknown("sampling.compile", mode, COMPILE_CHOICES[1:])
        self.net, self.mode, self.on = net, mode, False
        for module in [net] if mode == "whole" else repeated_blocks(net):
            # An instance attribute shadows the class's forward for `nn.Module.__call__`
            # (as accelerate's hooks do); the parameters stay the module's own.
            module.forward = _Dispatch(module.forward, self)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Gradient-free calls inside this block run compiled (the training step's chain)."""
        self.on = True
        try:
            yield
        finally:
            self.on = False


def repeated_blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules diffusers' regional compilation would compile (`_repeated_blocks`)."""
    names = getattr(net, "_repeated_blocks", None) or ()
    blocks = [m for m in net.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(f"sampling.compile=blocks: {type(net).__name__} names no repeated blocks "
                        "(diffusers' `_repeated_blocks`) to compile one by one; use sampling.compile=whole")
    return blocks
