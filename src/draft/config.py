"""Training configuration: frozen dataclasses, YAML files and dotted `key=value` overrides.

Every field says what it means, its unit and what it interacts with. Unknown keys and
values of the wrong type are errors (`UserError`), with the closest valid key suggested.
Validation lives in one place, `TrainConfig.validate`.

    cfg = load_config("my.yaml", ["method=draft-k", "k=5", "sampling.num_steps=25"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from draft.errors import UserError, did_you_mean, unknown

METHODS = ("draft", "draft-k", "draft-lv", "refl", "alignprop", "ddpo")
PRECISIONS = ("no", "bf16", "fp16")
# Defaults that belong to a method: {method: {dotted key: (value, why)}}. `from_dict` applies
# them where the config (file, overrides, or a resumed run's config.yaml) does not set the
# key, so the resolved config.yaml records the value; `method_defaults` says why, for the
# start-up lines and `--dry-run`. A user's own value always wins.
METHOD_DEFAULTS: dict[str, dict[str, tuple[Any, str]]] = {
    "ddpo": {
        "sampling.eta": (1.0, "DDPO's policy gradient needs stochastic sampling steps; "
                              "eta 1 (DDPM-like) as in DDPO's own runs"),
    },
}


@dataclass(frozen=True)
class SamplingConfig:
    # Number of DDIM steps T per sample. Cost of a training step grows linearly with T
    # (plus the backward over the gradient window).
    num_steps: int = 50
    # Classifier-free guidance scale s; 1 disables guidance (and halves the UNet cost).
    # FLUX.1-dev is guidance-distilled: there the value feeds its guidance embedding (one
    # pass per step whatever the value); FLUX.1-schnell ignores it.
    guidance_scale: float = 7.5
    # DDIM stochasticity η: 0 is deterministic DDIM, 1 is DDPM-like. method=ddpo makes 1 its
    # default (METHOD_DEFAULTS).
    eta: float = 0.0
    # Wrap every gradient-carrying UNet call in torch.utils.checkpoint: memory stays flat
    # in the gradient window at the cost of one extra forward per step in it. Even with a
    # one-step window (DRaFT-1, DRaFT-LV) it keeps the UNet's activations from sitting in
    # memory beside the VAE decoder's and the reward's (28.6 -> 19.9 GB for SD 1.5 at
    # batch 4, see BENCHMARKS.md); turn it off when memory is plentiful and time is not.
    checkpointing: bool = True
    # Also checkpoint the VAE decode (saves its activations; worth it at high resolution).
    decode_checkpointing: bool = False
    # Fold the LoRA into the UNet's weights for the sampling steps that carry no gradient
    # (all but the window; every step when generating images), restoring the exact base
    # weights afterwards. Same images, less time per step; costs one copy of the adapted
    # layers' weights. Skipped automatically for FSDP/DeepSpeed-sharded or compiled UNets.
    merge_lora: bool = True
    # With checkpointing and merge_lora: run the first pass of each gradient-carrying step
    # without any graph and with the LoRA merged, and recompute it unmerged in the backward
    # (`sampling._Recomputed`): the gradients of checkpointing at less cost (BENCHMARKS.md,
    # against TRL). Values differ from `false` only by the rounding of merged weights.
    # Sharded or compiled denoisers, which cannot be merged, use torch.utils.checkpoint.
    merged_recompute: bool = True
    # Image size in pixels; 0 means the model's native size.
    height: int = 0
    width: int = 0


@dataclass(frozen=True)
class LoraConfig:
    # LoRA rank r (paper: 8 for small runs). Parameter count grows linearly in r.
    rank: int = 8
    # LoRA alpha: the update is scaled by alpha / rank. Keep alpha = rank for scale 1.
    alpha: float = 8.0
    # Dropout on the LoRA input (0 keeps training deterministic).
    dropout: float = 0.0
    # Modules of the denoiser that get an adapter; empty means the model family's default
    # (recorded in the run's config.yaml): for Stable Diffusion 1.x/2.x/SDXL the attention
    # projections, the transformer blocks' input/output and feed-forward projections and the
    # resnets' convolutions (on shapes-sd this wider adapter lifts held-out accuracy about 4
    # points more than attention alone, BENCHMARKS.md); for SD3 and FLUX the attention
    # projections of both streams, `add_*` context projections included. The SD 1.5 configs
    # name attention only, as the paper did.
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    # Write a line to metrics.jsonl (and the trackers) every this many optimizer steps.
    every: int = 1
    # Save a fixed-seed sample grid every this many steps (step 0 and the last always).
    sample_every: int = 50
    # Prompts in the sample grid (spread over the evaluation prompts; one column each) and
    # seeds per prompt (one row each).
    sample_prompts: int = 8
    sample_seeds: int = 2
    # Save a resumable checkpoint every this many steps (0: only at the end).
    checkpoint_every: int = 50
    # How many checkpoints to keep on disk (the newest ones).
    keep_checkpoints: int = 2
    # Accelerate trackers to log to ("tensorboard", "wandb", ...); empty for none.
    trackers: tuple[str, ...] = ("tensorboard",)
    # Evaluate the reward on this many held-out images before and after training (0 to
    # skip): `eval_prompts` in turn, each with its own fixed seed. The default covers
    # shapes-sd's 180 held-out prompts twice, so diversity across seeds is measured; on a
    # large model, 32 or so keeps evaluation short.
    eval_samples: int = 360
    # Also evaluate every this many steps, into metrics.jsonl as eval_* (0: only before and
    # after). Evaluation time is not counted in the logged training `time`.
    eval_every: int = 0


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train ---
    # A diffusers pipeline (Stable Diffusion 1.x/2.x, SDXL, SD3/3.5, FLUX.1): a local folder,
    # a hub id, or an embedded tiny model ("shapes-sd", "shapes-flow").
    model: str = "shapes-sd"
    # The reward to maximise: a registered name (`draft rewards`), "module:attr", or a
    # weighted sum such as "aesthetic:1.0+hpsv2:0.5".
    reward: str = "shapes-alignment"
    # Keyword arguments for each reward, by reward name, e.g.
    # reward_args.aesthetic.model=/path/to/weights
    reward_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Training prompts: a prompt set the model ships ("train", "heldout" on shapes-sd; a model
    # that ships none gets the general animal prompts under these names), a text file with
    # one prompt per line, FILE.csv:COLUMN or FILE.jsonl:FIELD, or prompts separated by "|"
    # (see `draft.prompts`).
    prompts: str = "train"
    # Prompts for sample grids and the before/after evaluation (same forms as `prompts`).
    eval_prompts: str = "heldout"

    # --- the method (see `draft.methods`) ---
    # draft: gradient through all steps; draft-k: the last k steps; draft-lv: k=1 with
    # lv_n re-noised passes; refl, alignprop: the neighbours on the same loop; ddpo: the
    # reinforcement-learning baseline (no reward gradient; samples with sampling.eta=1 unless
    # set, see METHOD_DEFAULTS).
    method: str = "draft-lv"
    # DRaFT-K: how many final sampling steps carry gradient (1 <= k <= num_steps).
    k: int = 1
    # DRaFT-LV: how many times the final latent is re-noised and denoised with gradient.
    # Each pass costs one UNet step, one decode and one reward call.
    lv_n: int = 2
    # AlignProp: the gradient window K is drawn uniformly from [k_min, k_max] once per
    # optimizer step (not per sampling step).
    alignprop_k_min: int = 1
    alignprop_k_max: int = 10
    # ReFL: stop at a step index drawn uniformly from [refl_min_step, refl_max_step] (0 is
    # the first sampling step) and predict x̂_0 from there with one gradient step. -1
    # means "num_steps - 10" and "num_steps - 1", ImageReward's late-step range.
    refl_min_step: int = -1
    refl_max_step: int = -1
    # DRaFT+: weight of the mean squared difference between the adapted and the base
    # model's predictions over the gradient-carrying steps (0 disables it). The default
    # recipe's 0.03 keeps shapes-sd's diversity at 81-87% of the base's where 0 left
    # 71-74% (one run: 57%), at no cost in held-out accuracy over three seeds
    # (BENCHMARKS.md); the SD 1.5 configs set 0, as the paper's runs did.
    kl_coeff: float = 0.03
    # DDPO: PPO's clip range on the importance ratio (ddpo-pytorch uses 1e-4), the clip on
    # normalised advantages, how many optimizer steps reuse one rollout (the ratio leaves 1
    # from the second on), and the fraction of sampling steps trained on per update.
    ddpo_clip: float = 1e-4
    ddpo_adv_clip: float = 5.0
    ddpo_rollout_reuse: int = 2
    ddpo_timestep_fraction: float = 1.0
    # DDPO: advantages are normalised with a prompt's own reward mean and std over the
    # optimizer step's whole batch (all processes and micro-batches) once the prompt
    # appears at least this many times in it; rarer prompts use the batch's mean and std.
    ddpo_min_prompt_count: int = 2

    # --- optimisation ---
    # Optimizer steps to train for (500: the embedded default recipe, under 10 minutes on a
    # laptop CPU; the README shows what it achieves).
    steps: int = 500
    # Samples per process per micro-batch. The effective batch of one optimizer step is
    # batch_size x grad_accum x number of processes.
    batch_size: int = 4
    # Micro-batches accumulated before each optimizer step.
    grad_accum: int = 1
    # AdamW learning rate, betas, weight decay. The paper used 4e-4 with a rank-8 LoRA on
    # SD 1.4 (as configs/sd15-*.yaml do); the tiny shapes-sd needs a larger step to move
    # within the default recipe's budget.
    lr: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    # Linear warm-up of the learning rate over this many steps, then constant.
    warmup_steps: int = 0
    # Clip the global gradient norm to this (0 disables clipping).
    max_grad_norm: float = 1.0
    # Mixed precision for the frozen weights and autocast: no, bf16 or fp16. LoRA
    # parameters and optimizer state stay float32.
    mixed_precision: str = "no"
    # Stop after this many consecutive steps with a non-finite reward, loss or gradient
    # (those steps never touch the weights).
    max_bad_steps: int = 5
    # Seed for prompts, noise and LoRA initialisation. Sample j of optimizer step n always
    # gets the same noise, whatever the batch layout or number of processes.
    seed: int = 0

    # --- where things go ---
    # Runs are written to output_dir/name; an empty name means <method>-<date>-<time>.
    output_dir: str = "runs"
    name: str = ""
    # Force the CPU even when an accelerator is present.
    cpu: bool = False

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "TrainConfig":
        """Raise UserError for values that cannot work together; return self."""
        s = self.sampling
        if self.method not in METHODS:
            raise unknown("method", self.method, METHODS)
        if self.mixed_precision not in PRECISIONS:
            raise unknown("mixed_precision", self.mixed_precision, PRECISIONS)
        for key, value, lo, hi in self._numeric_ranges():
            _check_number(key, value, lo, hi)
        for key in ("model", "reward", "prompts", "eval_prompts", "output_dir"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{key} must be a non-empty string, got {value!r}")
        if self.name in (".", "..") or "/" in self.name or "\\" in self.name:
            raise UserError(f"name must be a folder name (no '/'), got {self.name!r}; put the path in output_dir")
        # Empty means the model family's default; a blank name is a mistake.
        if not all(m.strip() for m in self.lora.target_modules):
            raise UserError(f"lora.target_modules has an empty module name: {list(self.lora.target_modules)}")
        if not all(t.strip() for t in self.log.trackers):
            raise UserError(f"log.trackers has an empty name: {list(self.log.trackers)}")
        for name, args in self.reward_args.items():
            if not isinstance(args, dict):
                raise UserError(f"reward_args.{name} must be a mapping of argument names to values, got {args!r}")
        # Method-specific knobs are checked only for the method that uses them, so that
        # e.g. a short sampling.num_steps does not trip over AlignProp's default range.
        if self.method == "draft-k" and self.k > s.num_steps:
            raise UserError(f"k={self.k} is larger than sampling.num_steps={s.num_steps}")
        if self.method == "alignprop" and not 1 <= self.alignprop_k_min <= self.alignprop_k_max <= s.num_steps:
            raise UserError(
                f"need 1 <= alignprop_k_min <= alignprop_k_max <= sampling.num_steps, got "
                f"{self.alignprop_k_min}, {self.alignprop_k_max}, {s.num_steps}"
            )
        lo, hi = self.refl_range
        if self.method == "refl" and not 0 <= lo <= hi < s.num_steps:
            raise UserError(f"need 0 <= refl_min_step <= refl_max_step < sampling.num_steps, got {lo}, {hi}")
        if self.method == "ddpo" and s.eta <= 0:
            raise UserError("method=ddpo samples stochastically: set sampling.eta > 0 (e.g. sampling.eta=1.0)")
        if s.height % 8 or s.width % 8:
            raise UserError(f"sampling.height and sampling.width must be multiples of 8, got {s.height}x{s.width}")
        return self

    def _numeric_ranges(self):
        """(key, value, lowest, highest) of every number in the config; an open bound is a
        tuple (bound,). Each is checked for finiteness and range, whatever the method."""
        s, lora, lg = self.sampling, self.lora, self.log
        big = None  # no upper bound
        return [
            ("k", self.k, 1, big), ("lv_n", self.lv_n, 1, big),
            ("alignprop_k_min", self.alignprop_k_min, 1, big), ("alignprop_k_max", self.alignprop_k_max, 1, big),
            ("refl_min_step", self.refl_min_step, -1, big), ("refl_max_step", self.refl_max_step, -1, big),
            ("kl_coeff", self.kl_coeff, 0, big), ("ddpo_clip", self.ddpo_clip, (0,), big),
            ("ddpo_adv_clip", self.ddpo_adv_clip, (0,), big), ("ddpo_rollout_reuse", self.ddpo_rollout_reuse, 1, big),
            ("ddpo_timestep_fraction", self.ddpo_timestep_fraction, (0,), 1),
            ("ddpo_min_prompt_count", self.ddpo_min_prompt_count, 1, big),
            ("steps", self.steps, 1, big), ("batch_size", self.batch_size, 1, big),
            ("grad_accum", self.grad_accum, 1, big), ("lr", self.lr, 0, big),
            ("adam_beta1", self.adam_beta1, 0, (1,)), ("adam_beta2", self.adam_beta2, 0, (1,)),
            ("weight_decay", self.weight_decay, 0, big), ("warmup_steps", self.warmup_steps, 0, big),
            ("max_grad_norm", self.max_grad_norm, 0, big), ("max_bad_steps", self.max_bad_steps, 1, big),
            # numpy's SeedSequence takes no negative seeds; torch's generators take 64 bits.
            ("seed", self.seed, 0, 2**63 - 1),
            ("sampling.num_steps", s.num_steps, 1, big), ("sampling.guidance_scale", s.guidance_scale, 0, big),
            # Above 1 the DDIM step's noise outgrows the step and the update takes a square
            # root of a negative number.
            ("sampling.eta", s.eta, 0, 1), ("sampling.height", s.height, 0, big), ("sampling.width", s.width, 0, big),
            ("lora.rank", lora.rank, 1, big), ("lora.alpha", lora.alpha, (0,), big),
            ("lora.dropout", lora.dropout, 0, (1,)),
            ("log.every", lg.every, 1, big), ("log.sample_every", lg.sample_every, 1, big),
            ("log.sample_prompts", lg.sample_prompts, 1, big), ("log.sample_seeds", lg.sample_seeds, 1, big),
            ("log.checkpoint_every", lg.checkpoint_every, 0, big),
            ("log.keep_checkpoints", lg.keep_checkpoints, 1, big),
            ("log.eval_samples", lg.eval_samples, 0, big), ("log.eval_every", lg.eval_every, 0, big),
        ]

    @property
    def refl_range(self) -> tuple[int, int]:
        """ReFL's stop-step range with the -1 defaults resolved."""
        t = self.sampling.num_steps
        lo = self.refl_min_step if self.refl_min_step >= 0 else max(t - 10, 0)
        hi = self.refl_max_step if self.refl_max_step >= 0 else t - 1
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _check_number(key: str, value, lo, hi) -> None:
    """UserError unless `value` is a finite number within [lo, hi]; a bound in a 1-tuple is open."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value}")
    (low,), low_open = (lo if isinstance(lo, tuple) else (lo,)), isinstance(lo, tuple)
    if low is not None and (value <= low if low_open else value < low):
        need = "positive" if (low, low_open) == (1, False) else f"{'>' if low_open else '>='} {low}"
        raise UserError(f"{key} must be {need}, got {value}")
    if hi is not None:
        (high,), high_open = (hi if isinstance(hi, tuple) else (hi,)), isinstance(hi, tuple)
        if value >= high if high_open else value > high:
            raise UserError(f"{key} must be {'<' if high_open else '<='} {high}, got {value}")


def _plain(value):
    """Tuples to lists, recursively, so the dict is plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- building a config from YAML and overrides ----------------------------------------------


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> TrainConfig:
    """A validated TrainConfig: `base` (a dict, e.g. a run's config.yaml), then the YAML file
    at `path`, then `key=value` overrides, each on top of the one before."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _merge(data, read_yaml(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value")
        _set_dotted(data, key.strip(), parse_value(raw))
    return from_dict(data).validate()


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
    """Build dataclass `cls` from a nested dict, checking keys and types.

    For a whole TrainConfig, the chosen method's and model's defaults fill the keys that
    `data` does not set.
    """
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    if cls is TrainConfig and not prefix:
        data = _with_method_defaults(data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"unknown config key {prefix + key!r}{did_you_mean(key, fields)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _given(data: dict, key: str) -> bool:
    """Whether the nested dict `data` sets the dotted `key` (a section object sets all its keys)."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict):
            return True
        if part not in node:
            return False
        node = node[part]
    return True


def _defaults_for(method, model) -> dict[str, tuple[Any, str]]:
    """The defaults that belong to this method and this model, by dotted key: (value, why).

    A model's come from `draft.models.model_defaults` (an embedded model's recommended
    sampling settings and recipe); a method's from METHOD_DEFAULTS, and win over the model's.
    """
    from draft.models import model_defaults

    out = model_defaults(model)
    out.update(METHOD_DEFAULTS.get(method, {}) if isinstance(method, str) else {})
    return out


def _with_method_defaults(data: dict) -> dict:
    """`data` with its method's and model's defaults added where it does not set the key (a new dict)."""
    from draft.models import model_default

    model = data.get("model", TrainConfig.model)
    # A config without `method` runs the model's recommended one, whose defaults then apply.
    defaults = _defaults_for(data.get("method", model_default(model, "method", TrainConfig.method)), model)
    for key, (value, _) in defaults.items():
        if not _given(data, key):
            *parents, last = key.split(".")
            patch: dict = {last: value}
            for p in reversed(parents):
                patch = {p: patch}
            data = _merge(data, patch)
    return data


def method_defaults(config: TrainConfig) -> list[str]:
    """One line for each of the method's and the model's defaults that the config holds: what and why."""
    notes = []
    for key, (value, why) in _defaults_for(config.method, config.model).items():
        current: Any = config
        for part in key.split("."):
            current = getattr(current, part)
        if current == value:
            owner = f"method {config.method}" if key in METHOD_DEFAULTS.get(config.method, {}) else config.model
            notes.append(f"{key}={value}: {owner}'s default ({why}); set {key} to change it")
    return notes


def _coerce(value, hint, key: str):
    """Check `value` against the type hint; convert only where it is lossless."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(value, hint, key + ".")
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key)
            except UserError:
                pass
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
