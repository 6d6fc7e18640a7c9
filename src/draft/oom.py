"""Out of accelerator memory in a training step: an answer, not a crash.

The step that ran out is abandoned (its gradients and any half-done update never reach a
checkpoint), and the run stops with one line (a `UserError`: exit 2) that names the phase
that ran out, the memory estimate's peak against what the accelerator has, and the options
that would lower it, each with its estimated peak, as the `--resume` command that continues
from the last checkpoint with them.
"""

from __future__ import annotations

from draft.config import TrainConfig
from draft.errors import UserError


def _candidates(config: TrainConfig) -> list[list[str]]:
    """Changes that lower the peak (key=value overrides) that the config does not make
    already; a smaller batch keeps the effective batch through accumulation."""
    s, out = config.sampling, []
    if s.checkpointing is not True:
        out.append(["sampling.checkpointing=true"])
    if not s.block_checkpointing:
        out.append(["sampling.block_checkpointing=true"])
    if not s.decode_checkpointing:
        out.append(["sampling.decode_checkpointing=true"])
    if config.text_encoders != "cache":
        out.append(["text_encoders=cache"])
    if config.quantize == "none":
        out.append(["quantize=int8"])
    if config.batch_size > 1:
        out.append([f"batch_size={config.batch_size // 2}", f"grad_accum={config.grad_accum * 2}"])
    if config.mixed_precision == "no":
        out.append(["mixed_precision=bf16"])
    return out


def _peaks(config: TrainConfig, candidates: list[list[str]]):
    """(the config's estimated peak, the budget, each candidate's peak) in bytes, or None
    where the model's configs are not at hand."""
    from draft.configio import load_config
    from draft.estimate import estimate, memory_budget
    from draft.preflight import check_reward, model_configs

    folder, _ = model_configs(config.model)
    if folder is None:
        return None
    reward = check_reward(config.reward, config.reward_args)
    base = config.to_dict()
    peak = lambda overrides: estimate(load_config(None, overrides, base=base), folder, reward).peak  # noqa: E731
    return peak([]), memory_budget(config.sampling.memory_budget_gb), [peak(c) for c in candidates]


def out_of_memory(config: TrainConfig, phase: str, step: int, run) -> UserError:
    """The one-line answer to running out of memory in the `phase` of optimizer step `step`
    (1-based) of the run folder `run`."""
    candidates = _candidates(config)
    try:
        peaks = _peaks(config, candidates)
    except Exception:  # noqa: BLE001 - the answer to running out of memory must not fail on its estimate
        peaks = None
    from draft.estimate import human_bytes as gib
    resume = f"draft train --resume {run.root}"
    if peaks is None:
        options = "; ".join(" ".join(c) for c in candidates) or "a smaller model or size"
        return UserError(f"out of accelerator memory in the {phase} of step {step}; the last checkpoint in "
                         f"{run.checkpoints} is intact; try: {options}, e.g. {resume} {' '.join(sum(candidates, []))}")
    peak, budget, theirs = peaks
    fits = [(c, p) for c, p in zip(candidates, theirs) if p <= budget]
    if fits:
        best = min(fits, key=lambda cp: cp[1])[0]
        options = ", ".join(f"{' '.join(c)} ({gib(p)})" for c, p in fits)
        advice = f"estimated to fit: {options}; e.g. {resume} {' '.join(best)}"
    else:
        options = ", ".join(f"{' '.join(c)} ({gib(p)})" for c, p in zip(candidates, theirs)) or "none left"
        advice = (f"none is estimated to fit alone: {options}; combine them, or a smaller size, e.g. {resume} "
                  f"{' '.join(sum(candidates, []))}")
    return UserError(f"out of accelerator memory in the {phase} of step {step} (estimated peak {gib(peak)} of "
                     f"{gib(budget)}); the last checkpoint in {run.checkpoints} is intact; {advice}")
