"""The held-out guard: a small fixed-seed evaluation every few steps that keeps the LoRA with
the best held-out figure and can end a run that is hacking its reward.

Reward fine-tuning over-optimises: past some point the training reward goes on rising while
held-out samples stop matching their prompts (the DRaFT paper's reward hacking; SRPO, UniRL
and flow_grpo users report it too). The guard samples `guard.samples` held-out prompts, each
with its own fixed seed, so every evaluation sees the same prompts and noise and two
evaluations differ by the LoRA alone. It runs at step 0 and every `guard.every` steps,
through the run's own evaluation (`Watch.evaluate`, no sampler of its own), and logs its
figures as guard_* (metrics.jsonl and the trackers). The LoRA with the highest
`guard.metric` so far is kept in `runs/NAME/lora-best/` beside the last one in `lora/`,
written whole or not at all (`draft.safeio`), with `best.json` (its step and figures) and,
at the end of the run, a card of its own. With `guard.patience` M > 0 the run ends early,
as a finished run (LoRA, checkpoint, evaluation, card), at the evaluation where the metric
has fallen (or stayed level below its best) M times in a row while the mean training reward
since the previous evaluation rose each time: the training reward going up while held-out
samples get worse, or stay worse (a figure that hit its floor, such as accuracy 0, falls no
further).

Off by default: each evaluation samples the held-out prompts (on a large model a minute or
more each time), the reward that should judge held-out samples is often not the one being
trained (`guard.metric`), and a run that keeps a second LoRA or stops before its `steps`
should be one the user asked for. The shapes-sd main job's time is therefore unchanged.

A checkpoint keeps the guard's state (the best so far, the falling count, the training
rewards since the last evaluation) and the best LoRA's weights, so `--resume` decides
exactly as an unbroken run would and puts the right LoRA back in lora-best/.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from draft.errors import UserError, unknown

if TYPE_CHECKING:  # torch is imported where it is used, so `import draft.config` stays light
    import torch

BEST_FILE = "best.json"  # in lora-best/: the kept LoRA's step and held-out figures


@dataclass(frozen=True)
class GuardConfig:
    # Evaluate the held-out guard at step 0 and every this many optimizer steps (0: off).
    every: int = 0
    # Held-out samples per evaluation: the evaluation prompts spread over the list, one fixed seed each.
    samples: int = 16
    # The held-out figure that picks lora-best/ (higher is better): reward_mean or one the model adds (the
    # shapes models' accuracy_joint); judge by another figure than the reward where the reward can be hacked.
    metric: str = "reward_mean"
    # Stop once `metric` has fallen, or stayed below its best, at this many evaluations in a row while the
    # training reward rose (0: never).
    patience: int = 0

    def validate(self) -> "GuardConfig":
        """Raise UserError for a value out of range; return self (the metric's name is checked on samples)."""
        from draft.config import check_number

        for key, value, lowest in (("every", self.every, 0), ("samples", self.samples, 1),
                                   ("patience", self.patience, 0)):
            check_number(f"guard.{key}", value, lowest, None)
        if not isinstance(self.metric, str) or not self.metric.strip():
            raise UserError(f"guard.metric must name a held-out figure such as reward_mean, got {self.metric!r}")
        return self


@dataclass
class GuardState:
    """What the guard remembers between evaluations (checkpointed as JSON)."""

    metric: str
    samples: int
    best_step: int | None = None  # the step of the best evaluation so far
    best: float | None = None  # its metric
    best_figures: dict | None = None  # its held-out figures
    base: dict | None = None  # the held-out figures at step 0
    previous: float | None = None  # the metric at the previous evaluation
    previous_train: float | None = None  # the mean training reward of the steps before that evaluation
    falling: int = 0  # evaluations in a row with the metric down and the training reward up
    train_sum: float = 0.0  # the training reward means of the steps since the previous evaluation
    train_steps: int = 0


class Guard:
    """The guard of one run: `watch` evaluates, `model` and its `denoiser` give the LoRA to keep."""

    def __init__(self, config: GuardConfig, watch, run, accelerator, model, denoiser):
        self.config, self.watch, self.run, self.acc = config, watch, run, accelerator
        self.model, self.denoiser = model, denoiser
        self.state = GuardState(config.metric, config.samples)
        self.best_adapter: dict[str, torch.Tensor] | None = None
        self.stopped = False  # set when the rule fires: the run ends after this step, as a finished one

    @property
    def on(self) -> bool:
        return self.config.every > 0

    def check(self, samples: torch.Tensor) -> None:
        """UserError, before anything is written, unless `metric` is a figure the evaluation reports
        (`samples`: the first of the sample grid)."""
        if self.on:
            prompts = self.watch.grid_layout()[0][: len(samples)]
            names = [k for k in self.watch.score(samples, prompts) if k != "n"]
            if self.config.metric not in names:
                raise unknown("guard.metric", self.config.metric, names)

    # --- checkpoints ---

    def saved(self) -> dict | None:
        return asdict(self.state) if self.on else None

    def restore(self, saved: dict | None, best_adapter: dict[str, torch.Tensor] | None) -> None:
        """Take up the state of a checkpoint (`saved`) and the best LoRA's weights kept with it."""
        if not self.on or saved is None:
            return
        if (saved["metric"], saved["samples"]) != (self.config.metric, self.config.samples):
            raise UserError(f"this run's held-out guard judged guard.metric={saved['metric']} on "
                            f"guard.samples={saved['samples']}; resume with the same, or guard.every=0")
        self.state, self.best_adapter = GuardState(**saved), best_adapter

    # --- the run ---

    def start(self, fresh: bool, log) -> None:
        """Main process: evaluate the base model (a fresh run), or put the checkpoint's best LoRA back
        in lora-best/ where the run had written a later one before it stopped (a resumed run)."""
        if not self.on:
            return
        if fresh:
            row = {"step": 0}
            self._evaluate(0, row)
            log(row)
        elif self.best_adapter is not None and self._written_step() != self.state.best_step:
            self._write_best()

    def after_step(self, step: int, row: dict, last: bool) -> None:
        """Count the step's training reward; at an evaluation step add guard_* to `row`, keep the LoRA
        if it is the best so far, and decide (the same on every process) whether the run stops here."""
        if not self.on:
            return
        s = self.state
        s.train_sum, s.train_steps = s.train_sum + row["reward_mean"], s.train_steps + 1
        if step % self.config.every:  # not at the last step too: a run resumed with more steps would then differ
            return
        stop = [self._evaluate(step, row) if self.acc.is_main_process else None]
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(stop)
        if stop[0] and not last:
            self.acc.print(stop[0], flush=True)
            self.stopped = True

    def _evaluate(self, step: int, row: dict) -> str | None:
        """Evaluate, log into `row`, keep the best; the message to stop with, if the rule says so."""
        s, name = self.state, self.config.metric
        figures = self.watch.evaluate(self.config.samples)
        row.update({f"guard_{k}": v for k, v in figures.items() if k != "n"})
        value = figures[name]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            value = None  # a figure it could not measure (NaN, or diversity with one seed a prompt) decides nothing
        train = s.train_sum / s.train_steps if s.train_steps else None
        s.train_sum, s.train_steps = 0.0, 0
        if step == 0:
            s.base = figures
        if value is not None and (s.best is None or value > s.best):
            s.best, s.best_step, s.best_figures = value, step, figures
            # A copy: the live weights go on training.
            self.best_adapter = {k: v.detach().cpu().clone() for k, v in self._adapter().items()}
            self._write_best()
        # Down from the previous evaluation, or level with it below the best: stuck worse counts as falling.
        fell = None not in (value, s.previous) and (value < s.previous or (value == s.previous and value < s.best))
        rose = train is not None and s.previous_train is not None and train > s.previous_train
        s.falling = s.falling + 1 if fell and rose else 0
        s.previous, s.previous_train = value, train
        row["guard_best_step"] = s.best_step
        if self.config.patience and s.falling >= self.config.patience:
            return (f"stopping early at step {step}: held-out {name} fell or stayed below its best at {s.falling} evaluation"
                    f"{'s' * (s.falling > 1)} in a row while "
                    f"the training reward rose (the sign of reward hacking); the best LoRA, step {s.best_step} "
                    f"({name} {s.best:.4g}), is in {self.run.lora_best}")
        return None

    def _adapter(self) -> dict[str, torch.Tensor]:
        from draft.lora import adapter_state_dict

        return adapter_state_dict(self.denoiser)

    def _written_step(self) -> int | None:
        try:
            return json.loads((self.run.lora_best / BEST_FILE).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_best(self) -> None:
        from draft import safeio
        from draft.lora import save_lora

        s = self.state
        record = {"step": s.best_step, "metric": s.metric, "value": s.best, "samples": s.samples,
                  "figures": s.best_figures, "base": s.base}

        def fill(tmp):
            save_lora(self.model, tmp, layers=self.best_adapter)
            (tmp / BEST_FILE).write_text(json.dumps(record, indent=2) + "\n")

        safeio.write_dir(self.run.lora_best, fill, "the best LoRA")
