"""Everything about a training config that can be checked before any weight is loaded.

`draft train ... --dry-run` runs `dry_run`; each failed check raises a `UserError` (exit 2,
one line, nothing written):

- the config's values (`TrainConfig.validate`: names, ranges, finiteness);
- the model: a local folder, or a hub model's configs in the local Hugging Face cache, must
  be a diffusers pipeline of a supported class (model_index.json only is read);
- the reward spec: every weight a finite number, every registered name known and its module
  importable, every `module:attr` plug-in imported and its attribute found, every
  `reward_args` entry used by a reward in the spec and accepted by that reward's signature,
  the arguments a reward cannot do without set, and every local file or folder they name
  present and in safetensors (the header is read, no tensor);
- the prompt sets and files (parsed);
- the trackers (known to Accelerate and installed);
- the run folder (not clobbered, writable).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from draft.config import TrainConfig
from draft.errors import UserError, unknown


@dataclass
class Checked:
    """What the checks found, for the dry run's printout."""

    model_dir: Path | None  # the pipeline folder, or a hub model's configs in the local cache
    prompts: list[str]
    eval_prompts: list[str]
    reward_bytes: int = 0  # tensor bytes of the local reward weights named in reward_args
    notes: list[str] = field(default_factory=list)


def check(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> Checked:
    """Run every check; raise UserError at the first failure."""
    from draft.defaults import resolve as resolve_defaults
    from draft.prompts import load_prompts
    from draft.runs import RunFolder

    config = resolve_defaults(config)
    folder, notes = model_configs(config.model)
    reward_bytes = check_reward(config.reward, config.reward_args)
    prompts = load_prompts(config.prompts, config.model)
    eval_prompts = load_prompts(config.eval_prompts, config.model)
    check_trackers(config.log.trackers)
    if config.name:
        RunFolder(Path(config.output_dir) / config.name).check_usable(resume, overwrite)
    return Checked(folder, prompts, eval_prompts, reward_bytes, notes)


def model_configs(model: str) -> tuple[Path | None, list[str]]:
    """The folder of the model's configs (its own, the Hugging Face cache's, or draft's built-in
    copy of a known architecture), or None; and notes on where they came from."""
    from draft.models import resolve

    source, local = resolve(model)
    if local:
        return Path(source), []
    folder = cached_hub_configs(source)
    if folder is not None:
        from draft.models import pipeline_class

        pipeline_class(str(folder))  # the cached model_index.json names a pipeline we serve
        return folder, [f"model {model!r}: configs from the local Hugging Face cache"]
    from draft.models.architectures import builtin_configs

    notes = [f"model {model!r} comes from the Hugging Face hub: checked when it loads"]
    folder = builtin_configs(source)  # its configs are not cached: draft's own copy, if it has one
    if folder is not None:
        notes.append("the memory estimate comes from draft's built-in copy of the model's architecture "
                     "(draft.models.architectures), not from the hub's files")
    return folder, notes


# --- rewards -----------------------------------------------------------------------------------


def check_reward(spec: str, args: Mapping) -> int:
    """Resolve and import every reward of `spec`, check its arguments and files; return the
    bytes of the local weight files found."""
    from draft import rewards

    weights = rewards._parse(spec)  # weights that are not numbers fail here
    extra = sorted(set(args) - set(weights))
    if extra:
        raise UserError(f"reward_args given for {extra}, which the reward {spec!r} does not use")
    total = 0
    for name in weights:
        kwargs = args.get(name, {})
        if not isinstance(kwargs, Mapping):
            raise UserError(f"reward_args.{name} must be a mapping of argument names to values, got {kwargs!r}")
        obj = _resolve(name)
        _check_arguments(name, obj, dict(kwargs))
        for key, value in kwargs.items():
            if isinstance(value, str):
                total += check_weights_path(value, f"reward_args.{name}.{key}")
    return total


def _resolve(name: str):
    """The class or function a reward name or `module:attr` names (imported, not built)."""
    from draft import rewards

    registry = rewards.available()
    if name in registry:
        info = registry[name]
        try:
            return rewards._import(info.target, f"reward {name!r}")
        except UserError as e:
            raise UserError(f"{e}; reward {name!r} needs: pip install '{info.requires}'" if info.requires else str(e)) \
                from None
    if ":" not in name:
        raise unknown("reward", name, registry)
    return rewards._import(name, f"reward {name!r}")


def _check_arguments(name: str, obj, kwargs: dict) -> None:
    from draft import rewards

    if not callable(obj):
        raise UserError(f"reward {name!r} is not callable")
    if not inspect.isclass(obj):
        if kwargs:
            raise UserError(f"reward {name!r} is a function and takes no arguments, got {sorted(kwargs)}")
        return
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as e:
        raise UserError(f"bad arguments for reward {name!r}: {e}") from None
    except ValueError:  # no signature to read (a C extension): found when it is built
        return
    info = rewards.available().get(name)
    for arg in info.needs if info else ():
        if kwargs.get(arg) in (None, ""):
            raise UserError(f"reward_args.{name}.{arg} is not set; reward {name!r}: {info.description}")


def check_weights_path(value: str, key: str) -> int:
    """Check a reward argument that names a local file or folder; return its tensor bytes.

    A safetensors file must have a readable header; a pickle is refused (as loading would);
    a folder with weights must hold them as safetensors. Values that are no local path (a
    hub id, a class name, a query) pass; a path that looks local and is missing fails.
    """
    from draft.rewards.loading import PICKLE_SUFFIXES, _looks_local

    path = Path(os.path.expanduser(value))
    hint = "convert it once, if you trust it: python -m draft.rewards.convert {} --trust-pickle"
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise UserError(f"{key}={value} is a pickle, which draft does not load; " + hint.format(path))
        return safetensors_bytes(path, key) if path.suffix == ".safetensors" else 0
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not found:
            raise UserError(f"{key}={value}: the folder holds weights only as pickles ({pickles[0].name}), which "
                            "draft does not load; " + hint.format(pickles[0]))
        return sum(safetensors_bytes(p, key) for p in found)
    if _looks_local(value) or value.endswith(PICKLE_SUFFIXES):
        raise UserError(f"{key}={value}: no such file or folder")
    return 0


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_bytes(path: Path, key: str = "") -> int:
    """Tensor bytes of a safetensors file, from its header alone; UserError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            total = 0
            for name in f.keys():
                part = f.get_slice(name)
                total += math.prod(part.get_shape()) * _DTYPE_BYTES.get(part.get_dtype(), 4)
            return total
    except Exception as e:  # the library raises its own error types for every kind of damage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"{key}: " if key else ""
        raise UserError(f"{where}{path} is not a valid safetensors file ({first})") from None


# --- trackers ----------------------------------------------------------------------------------


def check_trackers(trackers) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in trackers:
        if name == "all":
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise unknown("tracker in log.trackers", name, LOGGER_TYPE_TO_CLASS)
        if name not in available:
            raise UserError(f"log.trackers: {name} is not installed (pip install {name}), or drop it from log.trackers")


def cached_hub_configs(repo_id: str, cache_dir: str | None = None) -> Path | None:
    """The folder of a hub model's configs in the local Hugging Face cache (no download), or None."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["model_index.json", "*/config.json"],
                                        local_files_only=True, cache_dir=cache_dir))
    except Exception:  # not cached, or not a valid id: the estimate is skipped, the run will say more
        return None
    return folder if (folder / "model_index.json").is_file() else None


# --- the dry run ---------------------------------------------------------------------------------


def dry_run(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> str:
    """The checks, then the resolved config as YAML and comment lines on what the run will do."""
    import yaml

    from draft.defaults import explain
    from draft.estimate import estimate
    from draft.methods import METHODS

    found = check(config, resume, overwrite)
    procs = int(os.environ.get("WORLD_SIZE", "1"))
    per_sample = METHODS[config.method].queries(config)
    batch = config.batch_size * config.grad_accum * procs
    lines = [
        f"{len(found.prompts)} training prompts, {len(found.eval_prompts)} evaluation prompts; effective batch "
        f"{batch} = {config.batch_size} x {config.grad_accum} accumulation x {procs} process(es); reward queries "
        f"per step {batch * per_sample:g}; reward queries in total {batch * per_sample * config.steps:g}",
        *explain(config),
        *found.notes,
    ]
    if found.model_dir is not None:
        lines += estimate(config, found.model_dir, found.reward_bytes).lines()
    else:
        lines.append("memory estimate: needs the model's configs, which are neither in a local folder nor in the "
                     "Hugging Face cache")
    return yaml.safe_dump(config.to_dict(), sort_keys=False) + "".join(f"# {line}\n" for line in lines)
