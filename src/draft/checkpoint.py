"""Resumable training state, written atomically, in safetensors and JSON only.

A checkpoint folder `checkpoints/step-N/` holds:

- `adapter.safetensors`   the LoRA weights (peft key names)
- `optimizer.safetensors` every tensor of the optimizer state, plus its non-tensor part
  and the LR schedule, gradient scaler and trainer counters in `state.json`
- `rng.safetensors`       the torch RNG states (CPU and every CUDA device)
- `adapter-best.safetensors` the held-out guard's best LoRA so far, when the guard is on

It is written under a temporary name and renamed into place once complete, so a crash at
any moment leaves either the previous checkpoints or the new one, never a torn one. A
write that fails (no space, no permission, an I/O error) removes its temporary folder,
keeps every earlier checkpoint and raises `draft.safeio.WriteFailed`. No pickle is
involved anywhere, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from draft import safeio
from draft.errors import UserError

PREFIX = "step-"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    for p in root.glob(f"{PREFIX}*"):
        if p.is_dir() and (p / "state.json").is_file():
            try:
                found.append((int(p.name[len(PREFIX) :]), p))
            except ValueError:
                continue
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                rest.setdefault(str(idx), {})[name] = value
    return tensors, {"scalars": rest, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, slots in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(slots)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    safeio.fsync_dir(folder)


def save(root: Path, step: int, adapter: dict, optimizer: dict, scheduler, scaler, trainer: dict, keep: int,
         best: dict | None = None) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep` checkpoints.

    Raises WriteFailed, with every earlier checkpoint intact, if any write fails.
    """
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        # Only one process writes checkpoints, so any other temporary folder is a crash's leftover.
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        if best is not None:
            save_file({k: v.contiguous().cpu() for k, v in best.items()}, tmp / "adapter-best.safetensors")
        _write(tmp, adapter, optimizer, scheduler, scaler, trainer, step)
        if final.exists():  # the same step written again (a resumed run): set the old one aside first
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        safeio.fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise safeio.write_failed(f"checkpoint step {step}", final, e) from None
    for _, old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(tmp: Path, adapter: dict, optimizer: dict, scheduler, scaler, trainer: dict, step: int) -> None:
    save_file({k: v.contiguous().cpu() for k, v in adapter.items()}, tmp / "adapter.safetensors")
    opt_tensors, opt_meta = _split_optimizer(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, tmp / "rng.safetensors")
    state = {
        "step": step,
        "trainer": trainer,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    # state.json is written last: its presence marks the folder as complete.
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    _fsync_tree(tmp)


def load(folder: Path) -> dict:
    """Read a checkpoint folder; a torn or foreign one is a UserError naming the file."""

    def tensors(name: str) -> dict:
        return safeio.load_safetensors(folder / name, "checkpoint file")

    try:
        state = json.loads((folder / "state.json").read_text())
        state["adapter"] = tensors("adapter.safetensors")
        state["optimizer"] = _join_optimizer(tensors("optimizer.safetensors"), state["optimizer"])
        state["rng"] = tensors("rng.safetensors")
        best = folder / "adapter-best.safetensors"
        state["adapter_best"] = tensors(best.name) if best.exists() else None
    except UserError as e:
        raise UserError(f"checkpoint {folder} is unreadable or incomplete ({e}); "
                        f"delete it to resume from an earlier one") from None
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint {folder} is unreadable or incomplete ({type(e).__name__}: {e}); "
                        f"delete it to resume from an earlier one") from None
    return state


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class Progress:
    """The counters of a run; all but `bad_run` are checkpointed."""

    step: int = 0  # optimizer steps done
    queries: int = 0  # reward queries so far, every process counted
    train_time: float = 0.0  # seconds in optimizer steps (evaluations and writes excluded)
    bad_total: int = 0  # steps skipped for a non-finite reward, loss or gradient
    bad_run: int = 0  # consecutive ones, up to now
    eval_before: dict | None = None  # the base model's held-out figures

    def saved(self) -> dict:
        """What a checkpoint keeps of them besides the step."""
        return {k: v for k, v in asdict(self).items() if k not in ("step", "bad_run")}
