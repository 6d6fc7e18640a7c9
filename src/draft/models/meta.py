"""A pipeline's components on the meta device: sizes and activation footprints, no weights read.

`components(folder)` builds every torch component that `model_index.json` names (UNet or
transformer, VAE, text encoders) from its config on PyTorch's `meta` device: the modules
have their real parameter shapes and dtypes but no storage, so nothing is read or
allocated. `saved_bytes` runs a call on meta inputs (the family adapter's own denoiser
call and decode, `PipelineAdapter.on_meta`) and counts the bytes autograd keeps for the
backward pass, which is what a training step's activations cost.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from draft.errors import UserError

# Libraries whose classes a model_index.json may name for torch components.
_LIBRARIES = ("diffusers", "transformers")


def components(folder: str | Path) -> dict[str, torch.nn.Module]:
    """Every torch component of the pipeline folder, built from its config on the meta device."""
    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {folder / 'model_index.json'}: {e}") from None
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] not in _LIBRARIES:
            continue
        cls = getattr(importlib.import_module(spec[0]), str(spec[1]), None)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue  # tokenizers, schedulers, feature extractors
        sub = folder / name
        try:
            if spec[0] == "diffusers":
                config = cls.load_config(sub)
                with torch.device("meta"):
                    module = cls.from_config(config)
            else:
                config = cls.config_class.from_pretrained(sub)
                with torch.device("meta"):
                    module = cls(config)
        except (OSError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot read the config of {sub} ({spec[1]}): {first}") from None
        out[name] = module.requires_grad_(False).eval()
    return out


def module_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the module's parameters and buffers once loaded in `dtype` (integer buffers keep theirs)."""
    size = torch.tensor([], dtype=dtype).element_size()
    n = sum(p.numel() for p in module.parameters()) * size
    for b in module.buffers():
        n += b.numel() * (size if b.is_floating_point() else b.element_size())
    return n


class _SavedLikeFusedAttention(torch.autograd.Function):
    """SDPA that saves for backward what the fused GPU kernels save (q, k, v, out, logsumexp).

    On the meta device PyTorch may pick the math kernel, which would also keep the full
    attention matrix; training on an accelerator uses the flash or memory-efficient kernels.
    """

    @staticmethod
    def forward(ctx, q, k, v, call):
        out = call(q, k, v)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - meta tensors are never backpropagated
        raise RuntimeError("for counting saved tensors only")


@contextlib.contextmanager
def _fused_attention():
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):  # diffusers passes them by name or by position
        return _SavedLikeFusedAttention.apply(query, key, value, lambda q, k, v: original(q, k, v, *args, **kwargs))

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@contextlib.contextmanager
def _mixed_precision():
    """What CUDA autocast does to these networks' saved tensors: normalisations run (and
    save) in float32, matmuls and convolutions cast their input to the weights' half dtype.
    Autocast itself does nothing to meta tensors, so its rules are applied by hand."""
    F = torch.nn.functional
    group_norm, layer_norm, linear, conv2d, conv3d = F.group_norm, F.layer_norm, F.linear, F.conv2d, F.conv3d

    def f32(t):
        return None if t is None else t.float()

    F.group_norm = lambda x, groups, w=None, b=None, *a: group_norm(x.float(), groups, f32(w), f32(b), *a)
    F.layer_norm = lambda x, shape, w=None, b=None, *a: layer_norm(x.float(), shape, f32(w), f32(b), *a)
    F.linear = lambda x, w, b=None: linear(x.to(w.dtype), w, b)
    F.conv2d = lambda x, w, b=None, *a, **k: conv2d(x.to(w.dtype), w, b, *a, **k)
    F.conv3d = lambda x, w, b=None, *a, **k: conv3d(x.to(w.dtype), w, b, *a, **k)
    try:
        yield
    finally:
        F.group_norm, F.layer_norm, F.linear, F.conv2d, F.conv3d = group_norm, layer_norm, linear, conv2d, conv3d


class _Saved:
    """The storages autograd saves, each once, weights excluded; `region` counts a
    checkpointed call apart (see `checkpointed`)."""

    def __init__(self, module: torch.nn.Module):
        self.weights = {id(t) for t in (*module.parameters(), *module.buffers())}
        self.seen: dict[int, int] = {}
        self.regions: list[int] = []
        self.alive: list[torch.Tensor] = []  # so no id is reused while counting

    def pack(self, t):
        base = t._base if t._base is not None else t
        if id(base) not in self.weights:
            self.seen[id(base)] = max(self.seen.get(id(base), 0), base.numel() * base.element_size())
            self.alive.append(base)
        return t

    def region(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` as a checkpointed region: its tensor inputs are kept; its own
        graph, plus the gradients entering and leaving it (twice its largest input), is what
        the backward holds while recomputing it."""
        from torch.utils._pytree import tree_leaves

        inner = _Saved.__new__(_Saved)
        inner.weights, inner.seen, inner.regions, inner.alive = self.weights, {}, self.regions, self.alive
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, lambda t: t):
            out = fn(*args, **kwargs)
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        widest = max((t.numel() * t.element_size() for t in tensors), default=0)
        self.regions.append(sum(inner.seen.values()) + 2 * widest)
        for t in tensors:  # what torch's checkpoint keeps: the region's tensor inputs
            self.pack(t)
        return out


_counting: list[_Saved] = []


def checkpointed(fn: Callable, *args, **kwargs):
    """`fn(*args)` under torch's non-reentrant checkpoint when gradients are on: only the
    tensor inputs are kept, and the backward recomputes `fn`'s graph. While `saved_bytes`
    counts, the region is run plainly and its graph counted apart, since the backward holds
    one recomputed region at a time."""
    if _counting:
        return _counting[-1].region(fn, *args, **kwargs)
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def saved_bytes(fn: Callable[[], object], module: torch.nn.Module) -> int:
    """Bytes of the tensors autograd saves for the backward of `fn()`, each storage once,
    the module's own weights excluded (they are counted as weights). Regions run through
    `checkpointed` count their inputs, plus the largest region's graph: what the backward
    holds while it recomputes that region."""
    saved = _Saved(module)
    half = next(module.parameters()).dtype in (torch.float16, torch.bfloat16)
    _counting.append(saved)
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), _fused_attention(), \
                (_mixed_precision() if half else contextlib.nullcontext()):
            fn()
    finally:
        _counting.pop()
    return sum(saved.seen.values()) + max(saved.regions, default=0)


def block_checkpointed_bytes(fn: Callable[[], object], module: torch.nn.Module) -> int:
    """`saved_bytes` with `module`'s blocks checkpointed by diffusers
    (`draft.models.memory.checkpoint_blocks`): diffusers' hook for a checkpointing function
    runs each block as a `checkpointed` region, so the blocks counted are exactly the ones
    it checkpoints."""
    module.enable_gradient_checkpointing(checkpointed)
    try:
        return saved_bytes(fn, module)
    finally:
        module.disable_gradient_checkpointing()

