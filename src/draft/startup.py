"""What a run settles before its first step (`draft.trainer`): its folder and the lock on it,
its Accelerator, how many gradient steps keep their graphs under checkpointing=auto, and the
lines it prints at start-up.
"""

from __future__ import annotations

import time
from pathlib import Path

from draft.config import TrainConfig
from draft.errors import UserError
from draft.runs import RunFolder


def open_run(config: TrainConfig, state, resume: bool, overwrite: bool):
    """(run folder, lock or None, run name): the same folder on every process, checked for
    `resume`/`overwrite`, and locked by the main process (a second `draft train` on it is
    refused on every process)."""
    from accelerate.utils import broadcast_object_list

    name = [config.name or f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"]
    broadcast_object_list(name)  # every process writes to the same folder name
    run = RunFolder(Path(config.output_dir) / name[0])
    run.check_usable(resume, overwrite)
    lock, busy = None, [None]
    if state.is_main_process:
        try:
            lock = run.lock()
        except UserError as e:
            busy = [str(e)]
    broadcast_object_list(busy)
    if busy[0]:
        raise UserError(busy[0])
    return run, lock, name[0]


def accelerator(config: TrainConfig, run: RunFolder, cpu: bool):
    """The run's Accelerator: its precision, accumulation and trackers, logging into the run folder."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=cpu,
        log_with=list(config.log.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run.root), logging_dir=str(run.logs)),
    )


def kept_graphs(config: TrainConfig, say) -> int:
    """checkpointing=auto: how many gradient steps keep their graphs (the estimate's split);
    `say` prints the estimate's reason."""
    if config.sampling.checkpointing != "auto":
        return 0
    from draft.estimate import estimate
    from draft.preflight import check_reward, model_configs

    folder, _ = model_configs(config.model)
    if folder is None:
        say("checkpointing auto: the model's configs are not found, so every gradient step is checkpointed")
        return 0
    est = estimate(config, folder, check_reward(config.reward, config.reward_args))
    say(next(n for n in est.notes if n.startswith("checkpointing auto")))
    return est.kept_graphs


def describe(config: TrainConfig, size, latent_shape, trainable: int, processes: int, device, info) -> str:
    """The lines printed at start: what trains on what, the effective batch, the reward
    queries per step (`info`: the method's `METHODS` entry) and the settings chosen for the user."""
    from draft.defaults import explain

    c, samples = config, config.batch_size * config.grad_accum * processes
    lines = [
        f"model {c.model} ({size}, latent {latent_shape}), reward {c.reward}, method {c.method}",
        f"effective batch {samples} = {c.batch_size} x {c.grad_accum} accumulation x "
        f"{processes} process(es); reward queries per step {samples * info.queries(c):g}",
        f"{c.steps} steps, {c.sampling.num_steps} sampling steps, guidance {c.sampling.guidance_scale}, "
        f"LoRA rank {c.lora.rank} ({trainable:,} trainable parameters), lr {c.lr}, device {device}, "
        f"precision {c.mixed_precision}",
        *explain(c),  # what the method, the model or its family chose for the user, and why
    ]
    return "\n".join(lines)
