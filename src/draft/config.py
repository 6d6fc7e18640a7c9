"""Training configuration: frozen dataclasses with a comment on every field.

Every field says what it means, its unit and what it interacts with. A field whose
default is `None` is chosen for the run when the user leaves it unset: by the method, the
model, the model's family, or draft's own default, in that order (`draft.defaults`, the
one place that resolves them, for `draft.train`, `draft.sample`, `draft.evaluate` and the
CLI alike). Validation lives in one place, `TrainConfig.validate`; YAML files and dotted
`key=value` overrides are read by `draft.configio`:

    cfg = load_config("my.yaml", ["method=draft-k", "k=5", "sampling.num_steps=25"])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from draft.errors import UserError, unknown
from draft.guard import GuardConfig
from draft.sampling_config import SamplingConfig

PRECISIONS = ("no", "bf16", "fp16")
FRAME_CHOICES = ("even", "random", "first")
TEXT_ENCODERS = ("device", "offload", "cache")  # `draft.models.text`
QUANTIZE = ("none", "int8", "float8", "nf4")  # `draft.models.memory`


@dataclass(frozen=True)
class LoraConfig:
    # LoRA rank r (paper: 8 for small runs). Parameter count grows linearly in r.
    rank: int = 8
    # LoRA alpha: the update is scaled by alpha / rank. Keep alpha = rank for scale 1.
    alpha: float = 8.0
    # Dropout on the LoRA input (0 keeps training deterministic).
    dropout: float = 0.0
    # Modules of the denoiser that get an adapter; empty means the model family's default
    # (resolved into the run's config.yaml): for Stable Diffusion 1.x/2.x/SDXL the attention
    # projections, the transformer blocks' input/output and feed-forward projections and the
    # resnets' convolutions (on shapes-sd this wider adapter lifts held-out accuracy about 4
    # points more than attention alone, BENCHMARKS.md); for the flow transformers the
    # attention projections of both streams. The SD 1.5 configs name attention only, as the
    # paper did.
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
    # Evaluate the reward on this many held-out samples before and after training (0 to
    # skip): `eval_prompts` in turn, each with its own fixed seed. None: the model's own
    # number (the shapes models: 360, every held-out prompt twice, so diversity across
    # seeds is measured), else 32 for images and 8 for videos, which keeps evaluation short
    # on a large model.
    eval_samples: int | None = None
    # Also evaluate every this many steps, into metrics.jsonl as eval_* (0: only before and
    # after). Evaluation time is not counted in the logged training `time`.
    eval_every: int = 0


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train ---
    # A diffusers pipeline (Stable Diffusion 1.x/2.x, SDXL, SD3/3.5, FLUX.1, Wan): a local
    # folder, a hub id, or an embedded tiny model ("shapes-sd", "shapes-flow", "shapes-video").
    model: str = "shapes-sd"
    # The reward to maximise: a registered name (`draft rewards`), "module:attr", or a
    # weighted sum such as "aesthetic:1.0+hpsv2:0.5". None: the one the model's recipe
    # trains on, else "shapes-alignment" (the shapes world's prompt-attribute classifier).
    reward: str | None = None
    # Settings of the model family's adapter, by name (the embedded models bring their own):
    # Wan 2.2 A14B's lora_expert ("low", the default, or "high": which expert gets the
    # LoRA), a video model's native height/width/frames, SD3's and Wan's
    # max_sequence_length. An unknown name is an error naming the adapter's settings.
    model_options: dict[str, Any] = field(default_factory=dict)
    # Keyword arguments for each reward, by reward name, e.g.
    # reward_args.aesthetic.model=/path/to/weights
    reward_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Videos: how many frames an image reward scores per video (0: all), averaged over
    # them, and which: evenly spaced (first and last included), drawn at random, or the
    # first ones. Chosen once per optimizer step, the same on every micro-batch and
    # process; only the latent frames those frames need are decoded, so "first" saves
    # most (the video VAE is causal: frame k needs every latent frame up to its own).
    reward_frames: int = 0
    reward_frame_choice: str = "even"
    # Training prompts: a prompt set the model ships ("train", "heldout" on shapes-sd; a model
    # that ships none gets the general animal prompts under these names), a text file with
    # one prompt per line, FILE.csv:COLUMN or FILE.jsonl:FIELD, or prompts separated by "|"
    # (see `draft.prompts`).
    prompts: str = "train"
    # Prompts for sample grids and the before/after evaluation (same forms as `prompts`).
    eval_prompts: str = "heldout"

    # --- the method (see `draft.methods`, where each method's costs and defaults live) ---
    # draft: gradient through all steps; draft-k: the last k steps; draft-lv: k=1 with
    # lv_n re-noised passes; refl, alignprop, direct-align, drtune: the neighbours on the
    # same loop; ddpo: the reinforcement-learning baseline (no reward gradient). None: the
    # model's recommended method (shapes-flow: draft), else draft-lv.
    method: str | None = None
    # DRaFT-K: how many final sampling steps carry gradient (1 <= k <= num_steps).
    k: int = 1
    # DRaFT-LV: how many times the final latent is re-noised and denoised with gradient.
    # Each pass costs one denoiser step, one decode and one reward call.
    lv_n: int = 2
    # DRaFT-LV: the step whose noise level x_0 is re-noised to; all steps from it carry gradient (-1: the last).
    lv_step: int = -1
    # AlignProp: the gradient window K is drawn uniformly from [k_min, k_max] once per
    # optimizer step (not per sampling step).
    alignprop_k_min: int = 1
    alignprop_k_max: int = 10
    # ReFL: stop at a step index drawn uniformly from [refl_min_step, refl_max_step] (0 is
    # the first sampling step) and predict x̂_0 from there with one gradient step. -1
    # means "num_steps - 10" and "num_steps - 1", ImageReward's late-step range.
    refl_min_step: int = -1
    refl_max_step: int = -1
    # Direct-Align: the noise level σ (flow's σ; s/(a+s) for DDIM) is drawn from [low, high] per step.
    direct_align_sigmas: tuple[float, ...] = (0.2, 0.9)
    # DRTune: how many evenly spaced sampling steps run the denoiser with gradient.
    drtune_k: int = 5
    # DRaFT+: weight of the mean squared difference between the adapted and the base
    # model's predictions over the gradient-carrying steps (0 disables it). None: the
    # model's own value (shapes-sd: 0.03, which keeps its samples varied at no cost in
    # held-out accuracy, BENCHMARKS.md "shapes-sd"), else 0, as in the paper's runs.
    kl_coeff: float | None = None
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
    # Optimizer steps to train for. None: the model's own recipe (shapes-sd 500, shapes-flow
    # 800, each under 10 minutes on a laptop CPU), else 500.
    steps: int | None = None
    # Samples per process per micro-batch. The effective batch of one optimizer step is
    # batch_size x grad_accum x number of processes.
    batch_size: int = 4
    # Micro-batches accumulated before each optimizer step.
    grad_accum: int = 1
    # AdamW learning rate, betas, weight decay. The paper used 4e-4 with a rank-8 LoRA on
    # SD 1.4 (as configs/sd15-*.yaml do). None: the model's own recipe (shapes-sd 1.5e-3),
    # else 1e-3; the tiny shapes models need a larger step to move within their budget.
    lr: float | None = None
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
    # Text encoders: device (encode every micro-batch), offload (host memory but while encoding) or cache (the run's
    # prompts encoded once, encoders dropped); a training run's memory plan, so not in `sampling` (`draft.models.text`).
    text_encoders: str = "device"
    # The denoiser's frozen Linear weights: none, int8, float8 (weight-only) or nf4, by torchao ([quant] extra).
    quantize: str = "none"

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # The held-out guard: keep the best held-out LoRA in lora-best/, stop on reward hacking (`draft.guard`).
    guard: GuardConfig = field(default_factory=GuardConfig)

    def validate(self) -> "TrainConfig":
        """Raise UserError for values that cannot work together; return self.

        Values left to `draft.defaults` (None) are checked once they are resolved.
        """
        s = self.sampling
        if self.method is not None:
            from draft.methods import METHODS

            if self.method not in METHODS:
                raise unknown("method", self.method, METHODS)
        for key, choices in (("mixed_precision", PRECISIONS), ("text_encoders", TEXT_ENCODERS),
                             ("quantize", QUANTIZE), ("reward_frame_choice", FRAME_CHOICES)):
            if getattr(self, key) not in choices:
                raise unknown(key, getattr(self, key), choices)
        if len(self.direct_align_sigmas) != 2:  # its order is Direct-Align's own check
            raise UserError(f"direct_align_sigmas must be [low, high], got {list(self.direct_align_sigmas)}")
        for key, value, lo, hi in self._numeric_ranges():
            if value is not None:
                check_number(key, value, lo, hi)
        s.validate()
        self.guard.validate()
        if isinstance(s.checkpointing, str) and s.checkpointing != "auto":
            raise UserError(f"sampling.checkpointing must be true, false or auto, got {s.checkpointing!r}")
        for key in ("model", "reward", "prompts", "eval_prompts", "output_dir"):
            value = getattr(self, key)
            if value is None and key == "reward":  # left to `draft.defaults`, which never leaves it None
                continue
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
        if s.height % 8 or s.width % 8:
            raise UserError(f"sampling.height and sampling.width must be multiples of 8, got {s.height}x{s.width}")
        if self.method is not None and s.num_steps is not None and s.eta is not None:
            # Method-specific knobs are checked only for the method that uses them, so that
            # e.g. a short sampling.num_steps does not trip over AlignProp's default range.
            from draft.methods import METHODS

            METHODS[self.method].check(self)
        return self

    def _numeric_ranges(self):
        """(key, value, lowest, highest) of every number in the config; an open bound is a
        tuple (bound,). Each is checked for finiteness and range, whatever the method."""
        s, lora, lg = self.sampling, self.lora, self.log
        big = None  # no upper bound
        return [
            ("k", self.k, 1, big), ("lv_n", self.lv_n, 1, big), ("lv_step", self.lv_step, -1, big),
            ("alignprop_k_min", self.alignprop_k_min, 1, big), ("alignprop_k_max", self.alignprop_k_max, 1, big),
            ("refl_min_step", self.refl_min_step, -1, big), ("refl_max_step", self.refl_max_step, -1, big),
            ("drtune_k", self.drtune_k, 1, big), *(("direct_align_sigmas", v, 0, 1) for v in self.direct_align_sigmas),
            ("kl_coeff", self.kl_coeff, 0, big), ("ddpo_clip", self.ddpo_clip, (0,), big),
            ("ddpo_adv_clip", self.ddpo_adv_clip, (0,), big), ("ddpo_rollout_reuse", self.ddpo_rollout_reuse, 1, big),
            ("ddpo_timestep_fraction", self.ddpo_timestep_fraction, (0,), 1),
            ("ddpo_min_prompt_count", self.ddpo_min_prompt_count, 1, big),
            ("reward_frames", self.reward_frames, 0, big),
            ("steps", self.steps, 1, big), ("batch_size", self.batch_size, 1, big),
            ("grad_accum", self.grad_accum, 1, big), ("lr", self.lr, 0, big),
            ("adam_beta1", self.adam_beta1, 0, (1,)), ("adam_beta2", self.adam_beta2, 0, (1,)),
            ("weight_decay", self.weight_decay, 0, big), ("warmup_steps", self.warmup_steps, 0, big),
            ("max_grad_norm", self.max_grad_norm, 0, big), ("max_bad_steps", self.max_bad_steps, 1, big),
            ("seed", self.seed, *SEED_RANGE),
            *s.numeric_ranges("sampling."),
            ("lora.rank", lora.rank, 1, big), ("lora.alpha", lora.alpha, (0,), big),
            ("lora.dropout", lora.dropout, 0, (1,)),
            ("log.every", lg.every, 1, big), ("log.sample_every", lg.sample_every, 1, big),
            ("log.sample_prompts", lg.sample_prompts, 1, big), ("log.sample_seeds", lg.sample_seeds, 1, big),
            ("log.checkpoint_every", lg.checkpoint_every, 0, big),
            ("log.keep_checkpoints", lg.keep_checkpoints, 1, big),
            ("log.eval_samples", lg.eval_samples, 0, big), ("log.eval_every", lg.eval_every, 0, big),
        ]

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# numpy's SeedSequence takes no negative seeds; torch's generators take 64 bits.
SEED_RANGE = (0, 2**63 - 1)


def check_number(key: str, value, lo, hi) -> None:
    """UserError unless `value` is a finite number within [lo, hi]; a bound in a 1-tuple is open."""
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


def load_config(path=None, overrides=(), base: dict | None = None) -> TrainConfig:
    """A resolved, validated TrainConfig from a YAML file and overrides (`draft.configio`)."""
    from draft.configio import load_config as load

    return load(path, overrides, base)


def dump_yaml(config: TrainConfig, path) -> None:
    from draft.configio import dump_yaml as dump

    dump(config, path)
