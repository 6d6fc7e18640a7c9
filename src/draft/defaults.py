"""How the values a user leaves unset are chosen: one resolution for every door.

A config field whose default is `None` (and an empty `lora.target_modules`) is filled from
the first of these that has a value for it:

1. the method (`draft.methods.METHODS[name].defaults`: DDPO samples with eta 1);
2. the model's own recipe (an embedded model's `draft.models.Embedded.defaults`:
   shapes-flow trains with full DRaFT over 20 steps; a recipe may name its reward too);
3. the model's family (the adapter's `defaults`, what its diffusers pipeline samples with:
   FLUX.1 28 steps at guidance 3.5; and its LoRA targets), or the checkpoint's where the
   adapter recognises a distilled variant from its configs (Z-Image-Turbo: 9 steps, no
   guidance; `draft.models.family_defaults`);
4. draft's own (`GENERIC`).

The user's value always wins. `draft.train`, `draft.sample`, `draft.evaluate` and the CLI
all call `resolve`, `resolve_sampling` or `resolve_reward`, so `config.yaml` and the start-up lines show the
same values whichever door was used; `explain` says where each chosen value came from.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from draft.config import SamplingConfig, TrainConfig

# The values when neither the method, the model nor its family has one.
GENERIC: dict[str, Any] = {
    "method": "draft-lv",
    "reward": "shapes-alignment",
    "steps": 500,
    "lr": 1e-3,
    "kl_coeff": 0.0,
    "sampling.num_steps": 50,
    "sampling.guidance_scale": 7.5,
    "sampling.eta": 0.0,
    "sampling.checkpointing": True,
    "sampling.frames": 0,
    "log.eval_samples": 32,
}
TARGETS = "lora.target_modules"  # empty means "the family's", as None does elsewhere


@functools.cache
def resolvable() -> tuple[str, ...]:
    """Every dotted key that `resolve` may fill: the fields whose default is None."""
    keys = []

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif f.default is None:
                keys.append(prefix + f.name)

    walk(TrainConfig(), "")
    return (*keys, TARGETS)


def sources(model: str, method: str | None) -> list[tuple[str, dict[str, tuple[Any, str]]]]:
    """(whose, {dotted key: (value, why)}) in the order they are consulted."""
    from draft.methods import METHODS
    from draft.models import family, family_defaults, model_defaults

    adapter = family(model)
    out = []
    if method in METHODS:
        out.append((f"method {method}", METHODS[method].defaults))
    out.append((model, model_defaults(model)))
    if adapter is not None:
        fam = family_defaults(model, adapter)
        fam.setdefault(TARGETS, (tuple(adapter.default_lora_targets), "the layers diffusers' own LoRA scripts "
                                                                           "adapt, or wider where it paid"))
        out.append((f"the {adapter.family_name} family", fam))
    return out


def _pick(key: str, found: list[tuple[str, dict]]) -> Any:
    for _, table in found:
        if key in table:
            return table[key][0]
    return GENERIC.get(key)


def _unset(key: str, value) -> bool:
    return value is None or (key == TARGETS and not value)


def resolve(config: TrainConfig) -> TrainConfig:
    """`config` with every unset value chosen (see the module docstring), validated."""
    from draft.models import family

    config.validate()
    adapter = family(config.model)
    if adapter is not None:  # the family's settings are known before anything loads
        unknown = sorted(set(config.model_options) - set(adapter.settings()))
        if unknown:
            from draft.errors import UserError

            known = ", ".join(sorted(adapter.settings())) or "none"
            raise UserError(f"model_options.{unknown[0]}: the {adapter.family_name} adapter has no such setting "
                            f"(its settings: {known})")
        if config.sampling.frames and not adapter.fps:
            from draft.errors import UserError

            raise UserError(f"{config.model} is an image model: it makes no video frames "
                            f"(got sampling.frames={config.sampling.frames})")
    method = config.method
    if method is None:
        method = _pick("method", sources(config.model, None))
    found = sources(config.model, method)
    values = {"method": method}
    for key in resolvable():
        if key != "method" and _unset(key, get(config, key)):
            value = _pick(key, found)
            if value is not None:
                values[key] = tuple(value) if key == TARGETS else value
    return replace(config, values).validate()


def resolve_sampling(model: str, sampling: SamplingConfig | None = None) -> SamplingConfig:
    """The sampling settings `draft sample` and `draft eval` use for `model`: the user's,
    else the model's recipe, its family's, or draft's (no method applies when sampling)."""
    sampling = sampling or SamplingConfig()
    found = [s for s in sources(model, None)]
    changes = {}
    for f in dataclasses.fields(SamplingConfig):
        if getattr(sampling, f.name) is None:
            changes[f.name] = _pick(f"sampling.{f.name}", found)
    return dataclasses.replace(sampling, **changes).validate()


def resolve_reward(model: str, reward=None):
    """The reward `draft eval` scores `model` with: the user's (a spec or a callable), else the
    one the model's recipe trains on, else draft's (no method applies when evaluating)."""
    return reward if reward is not None else _pick("reward", sources(model, None))


def explain(config: TrainConfig) -> list[str]:
    """One line for each value the config holds because the method, the model or its
    family chose it: what, whose, and why."""
    found = sources(config.model, config.method)
    notes = []
    for key in resolvable():
        for owner, table in found:
            if key in table:
                value, why = table[key]
                if get(config, key) == (tuple(value) if isinstance(value, list) else value) and key != TARGETS:
                    notes.append(f"{key}={value}: {owner}'s default ({why}); set {key} to change it")
                elif key == TARGETS and owner == config.model and get(config, key) == tuple(value):
                    notes.append(f"{key}={','.join(value)}: {owner}'s default ({why}); set {key} to change it")
                break
    return notes


def get(config, key: str):
    """The value of dotted `key` in a (nested) config."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


def replace(config, values: dict[str, Any]):
    """A copy of the (nested, frozen) config with dotted keys set."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        if dot:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, sub in nested.items():
        top[head] = replace(getattr(config, head), sub)
    return dataclasses.replace(config, **top)
