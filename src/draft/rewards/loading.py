"""Finding and loading reward-model weights, safely, with errors that say what to do.

Weights come from where the user points: a local file, a local folder, or a Hugging Face
hub id that `huggingface_hub` resolves through its own cache (so a machine that has the
files offline needs no network). Only safetensors are read. Several public reward heads
are published as pickles (`.pt`/`.pth`), and unpickling runs code from the file, so they
are refused with a message pointing at `convert_checkpoint`, which the user runs once on
a file they chose to trust.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from draft.errors import UserError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")

_CONVERT_HINT = (
    "convert it once to safetensors, if you trust the file: "
    "python -m draft.rewards.convert {path} --trust-pickle"
)


def weights_file(source: str | os.PathLike | None, filenames: Iterable[str], key: str, published: str = "") -> Path:
    """The safetensors file `source` names: itself, one of `filenames` in it, or on the hub.

    `key` is the config key that set `source` (e.g. ``reward_args.aesthetic.model``); the
    error messages name it so the user knows what to change. `published` names the pickle
    the weights are distributed as, if any, so the message can say how to convert it.
    """
    filenames = list(filenames)
    if source is None or str(source) == "":
        hint = f"; it is published as {published}, a pickle: {_CONVERT_HINT.format(path=published)}"
        hint = hint if published else ""
        raise UserError(f"{key} is not set; point it at {' or '.join(filenames)} (a file, a folder or a hub id){hint}")
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        return _check_safetensors(path)
    if path.is_dir():
        for name in filenames:
            if (path / name).is_file():
                return path / name
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f"; found {', '.join(pickles)}: " + _CONVERT_HINT.format(path=path / pickles[0]) if pickles else ""
        raise UserError(f"{key}={source}: the folder has no {' or '.join(filenames)}{hint}")
    if _looks_local(str(source)):
        raise UserError(f"{key}={source}: no such file or folder (needs {' or '.join(filenames)})")
    return _hub_file(str(source), filenames, key)


def _looks_local(source: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else that does not exist is a typo'd path.
    from draft.hub import is_hub_id

    return source.endswith(".safetensors") or not is_hub_id(source, bare=True)


def _check_safetensors(path: Path) -> Path:
    if path.suffix in PICKLE_SUFFIXES:
        raise UserError(f"{path} is a pickle, which draft does not load; " + _CONVERT_HINT.format(path=path))
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: expected a .safetensors file")
    return path


def _hub_file(repo: str, filenames: list[str], key: str) -> Path:
    from huggingface_hub import hf_hub_download

    errors = []
    for name in filenames:
        try:
            return Path(hf_hub_download(repo, name))
        except Exception as e:  # offline, missing file, missing repo: all reported alike
            errors.append(f"{name}: {type(e).__name__}")
    raise UserError(
        f"{key}={repo}: could not get {' or '.join(filenames)} from the Hugging Face hub or its cache "
        f"({'; '.join(errors)}); download it, or set {key} to a local file or folder"
    )


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from draft.safeio import load_safetensors

    return load_safetensors(path, "reward weights")


def from_pretrained(cls, source: str, key: str, what: str = "model.safetensors and config.json", **kwargs):
    """`cls.from_pretrained(source)` for a Hugging Face class, safetensors only, no remote code."""
    if not source:
        raise UserError(f"{key} is not set; point it at a folder or hub id with {what}")
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(os.path.expanduser(str(source)), use_safetensors=True, **kwargs)
    except (OSError, ValueError, EnvironmentError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{key}={source}: cannot load {what} ({first})") from None


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
                       trust_pickle: bool = False) -> Path:
    """Convert a pickled PyTorch checkpoint into a safetensors file of its tensors.

    Unpickling can run code, so this refuses unless `trust_pickle=True`, and even then
    uses `torch.load(weights_only=True)`, which only rebuilds tensors and plain
    containers. A checkpoint that wraps its weights (``{"state_dict": {...}}``) is
    unwrapped; a ``module.`` prefix from DataParallel is dropped. Key names are kept,
    so each reward's loader maps them from the original layout. Returns the new path
    (default: `src` with the suffix ``.safetensors``).
    """
    from safetensors.torch import save_file

    src = Path(src)
    if not trust_pickle:
        raise UserError(
            f"refusing to unpickle {src}: pass trust_pickle=True (or --trust-pickle) only for a file you trust"
        )
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {src} as a weights-only PyTorch checkpoint: {e}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{src} does not hold a flat dict of tensors")
    tensors = {k.removeprefix("module."): v.detach().contiguous() for k, v in obj.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata={"converted_from": src.name})
    return dst


def checkpoint_layers(layers: Iterable[torch.nn.Module]) -> None:
    """Recompute each layer's activations in the backward pass instead of storing them.

    Transformers' own switch (`gradient_checkpointing_enable`) is only active in training
    mode, and reward models stay in eval mode, so each layer's forward is wrapped here.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        forward = layer.forward

        def wrapped(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = wrapped


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'float16' / 'bfloat16' / 'float32' (or a dtype) -> torch.dtype; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    return dtype
