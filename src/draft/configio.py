"""Configs from YAML files and dotted `key=value` overrides, and back to YAML.

Unknown keys and values of the wrong type are errors (`UserError`), with the closest valid
key suggested; conversions happen only where they are lossless.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from draft.config import TrainConfig
from draft.errors import UserError, did_you_mean


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> TrainConfig:
    """A resolved, validated TrainConfig: `base` (a dict, e.g. a run's config.yaml), then the
    YAML file at `path`, then `key=value` overrides, each on top of the one before; what none
    of them sets is chosen by `draft.defaults.resolve`."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _merge(data, read_yaml(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value")
        _set_dotted(data, key.strip(), parse_value(raw))
    from draft.defaults import resolve

    return resolve(from_dict(data))


def _merge(a: dict, b: dict) -> dict:
    """b over a, recursively for sections."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def parse_value(raw: str):
    import yaml

    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _set_dotted(data: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"cannot set {key!r}: {p!r} is not a section")
    node[last] = value


def from_dict(data: dict[str, Any], cls=TrainConfig, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, checking keys and types; keys it does not
    set keep their defaults (None where `draft.defaults` chooses)."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"unknown config key {prefix + key!r}{did_you_mean(key, fields)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _coerce(value, hint, key: str):
    """Check `value` against the type hint; convert only where it is lossless."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(value, hint, key + ".")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key)
            except UserError as e:
                errors.append(e)
        raise errors[0] if errors else UserError(f"{key} has the wrong type: {value!r}")
    if hint is type(None):  # `None` in a config: leave the value to draft.defaults
        if value is None:
            return None
        raise UserError(f"{key} has the wrong type: {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string, a classic trap in learning rates.
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. name=2024 on the command line
        if value is False and key == "mixed_precision":
            return "no"  # YAML 1.1 reads mixed_precision=no, Accelerate's own word, as false
        raise UserError(f"{key} must be a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug, not user input


def dump_yaml(config: TrainConfig, path: Path) -> None:
    import yaml

    from draft.safeio import write_text

    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False), "the configuration")


def flat_scalars(d: dict, prefix: str = "") -> dict:
    """A config dict as flat dotted scalars (the trackers' hyper-parameter tables)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[prefix + k] = v
        else:
            out[prefix + k] = str(v)
    return out
