"""The training loop, on Accelerate. Read it top to bottom:

1. resolve and check the config and the run folder, lock the folder (one run at a time),
   set up Accelerate (`draft.startup`);
2. load the model, the reward and the prompts; add LoRA; build the optimizer (`Trainer`);
3. try the reward on the first sample grid (bad rewards fail here, before any file is written);
4. create the run folder, evaluate the base model, and loop: each optimizer step takes its
   prompts, noise and choices from (seed, step) (`draft.plan`), accumulates the method's loss
   over micro-batches, clips, skips the update if anything is non-finite, steps, logs; a
   SIGTERM, SIGINT or SIGUSR1 ends it after the step, with a checkpoint (`draft.stopping`);
5. save the LoRA, the last checkpoint, the after-grid, the evaluation, the plots and the
   model card (`draft.runs.RunFolder.write_results`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from draft import checkpoint as ckpt
from draft import sharding, startup
from draft.config import TrainConfig
from draft.configio import flat_scalars
from draft.errors import Interrupted, TrainingStopped, UserError
from draft.lora import adapter_state_dict
from draft.report import summary
from draft.runs import RunFolder


def train(
    config: TrainConfig | None = None,
    *,
    reward: Callable | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Fine-tune `config.model` on `config.reward` (or the `reward` callable); return the run
    folder. Values the config leaves unset are the method's, the model's or its family's
    (`draft.defaults`), exactly as on the command line."""
    from accelerate import PartialState

    from draft.defaults import resolve

    config = resolve(config or TrainConfig())
    if reward is not None:
        config = config.replace(reward=f"python:{getattr(reward, '__qualname__', type(reward).__name__)}")
    # Processes launched without GPUs (accelerate launch / torchrun on a CPU machine) train
    # together on the CPU through gloo; Accelerate only does that when told "cpu".
    cpu = config.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    run, lock, name = startup.open_run(config, PartialState(cpu=cpu), resume, overwrite)  # one run per folder
    try:
        _train_locked(config, reward, resume, overwrite, progress, run, cpu, name)
    finally:
        if lock is not None:
            lock.release()
    return run.root


def _train_locked(config: TrainConfig, reward, resume: bool, overwrite: bool, progress: bool, run: RunFolder,
                  cpu: bool, name: str) -> None:
    from draft.configio import dump_yaml

    accelerator = startup.accelerator(config, run, cpu)
    config = sharding.setup(config, accelerator)  # FSDP2: nothing folds into sharded weights
    main = accelerator.is_main_process
    t = Trainer(config, accelerator, run, reward)
    latest = ckpt.latest(run.checkpoints) if resume else None
    if latest is not None:
        t.restore(latest)
    first_grid = t.first_grid()  # also checks the reward on real samples
    if main:
        run.create(overwrite and not resume, lambda: dump_yaml(config, run.config))
    accelerator.wait_for_everyone()
    accelerator.init_trackers(name, config=flat_scalars(config.to_dict()))
    # A run killed before its first checkpoint resumes from the start.
    t.start(first_grid, fresh=latest is None)
    try:
        t.loop(progress and main)
        t.finish()
        # The main process writes the results after the last collective; the others wait
        # for it, so no process tears the group down while another still holds it (gloo
        # could abort a process that destroyed it early).
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()  # closes (and so flushes) the trackers and the process group


class Trainer:
    """The state of one run; `train` above is the order things happen in."""

    def __init__(self, config: TrainConfig, accelerator, run: RunFolder, reward_fn: Callable | None):
        from draft import rewards
        from draft.guard import Guard
        from draft.inference import BATCH, sample_size
        from draft.lora import add_lora
        from draft.methods import METHODS, Sampler
        from draft.models import load_model
        from draft.models.memory import memory_options
        from draft.models.text import place_text_encoders
        from draft.prompts import load_prompts
        from draft.watch import Watch

        self.config, self.acc, self.run = config, accelerator, run
        self.samples_here = accelerator.is_main_process or sharding.is_sharded(accelerator)  # (draft.sharding)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
        self.model = load_model(config.model, device=accelerator.device, dtype=dtype, options=config.model_options)
        self.reward = rewards.from_config(reward_fn or config.reward, config.reward_args).to(accelerator.device)
        self.prompts = load_prompts(config.prompts, config.model)
        for line in memory_options(self.model, config.sampling.block_checkpointing, config.quantize):  # before LoRA
            accelerator.print(line)
        self.params = add_lora(self.model, config.lora, seed=config.seed)
        self.raw_denoiser = self.model.denoiser
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay
        )
        warmup = config.warmup_steps
        # Not prepared by Accelerate, which would step it once per process per step.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.model.denoiser, self.optimizer = accelerator.prepare(self.model.denoiser, self.optimizer)
        self.params = [p for p in self.model.denoiser.parameters() if p.requires_grad]  # FSDP2 made them shards
        s = config.sampling
        self.size = self.model.size(sample_size(s))
        self.sampler = Sampler(self.model, self.reward, self.model.schedule(s.num_steps, self.size), s.guidance_scale,
                               s.eta, bool(s.checkpointing), s.decode_checkpointing, config.kl_coeff, s.merge_lora,
                               s.merged_recompute, self.size, s.negative_prompt, s.guidance_scale_2,
                               keep_graphs=startup.kept_graphs(config, accelerator.print),
                               guidance_gradient=s.guidance_gradient)
        self.info = METHODS[config.method]
        self.method = self.info.make()
        self.latent_shape = self.model.latent_shape(self.size)
        self.progress = ckpt.Progress()
        self.watch = Watch(self.model, self.reward, load_prompts(config.eval_prompts, config.model), config,
                           accelerator.device, self._bare)
        self.guard = Guard(config.guard, self.watch, run, accelerator, self.model, self.raw_denoiser)
        # The training prompts are encoded as a step encodes them (its autocast and batch); the grids' as `generate`.
        place_text_encoders(self.model, config.text_encoders, (s.guidance_scale, self.size, s.negative_prompt),
                            [(self.prompts, accelerator.autocast, config.batch_size),
                             (self.watch.prompts(), contextlib.nullcontext, BATCH)])

    # --- the first things a run does ---

    def restore(self, folder: Path) -> None:
        from draft.lora import load_adapter_state_dict

        state = ckpt.load(folder)
        load_adapter_state_dict(self.raw_denoiser, state["adapter"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"checkpoint {folder} does not match this config's optimizer: {e}") from None
        sharding.shard_optimizer_state(self.optimizer.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        tr = state["trainer"]
        self.progress = ckpt.Progress(state["step"], tr["queries"], tr["train_time"], tr["bad_total"], 0,
                                 tr.get("eval_before"))
        self.guard.restore(tr.get("guard"), state["adapter_best"])

    def first_grid(self) -> torch.Tensor | None:
        """The grid of the current step (main process), on which the reward is tried."""
        if not self.samples_here:
            return None
        samples = self.watch.grid()
        self.watch.check_reward(samples[:2], self.watch.grid_layout()[0][:2], self.info.reward_gradient)
        self.guard.check(samples[:2])
        return samples

    def start(self, first_grid: torch.Tensor | None, fresh: bool) -> None:
        if self.acc.is_main_process:
            print(startup.describe(self.config, self.size, self.latent_shape, sum(p.numel() for p in self.params),
                                   self.acc.num_processes, self.acc.device, self.info), flush=True)
            if fresh:
                self.run.truncate_metrics(0)
                self.run.save_grid(0, first_grid, len(self.watch.grid_prompts()))
                self._log_grid(first_grid, 0)
                self.progress.eval_before = self.watch.evaluate()
                if self.progress.eval_before:
                    print(f"before: {summary(self.progress.eval_before)}", flush=True)
            else:
                print(f"resuming {self.run.root} at step {self.progress.step}", flush=True)
                self.run.truncate_metrics(self.progress.step)
            self.guard.start(fresh, self.log)
        elif fresh and self.samples_here:
            self.watch.evaluate()  # the main process's evaluation, sharded
        self.acc.wait_for_everyone()

    # --- the loop ---

    def loop(self, show_progress: bool) -> None:
        from tqdm.auto import tqdm

        from draft.oom import out_of_memory
        from draft.stopping import GracefulStop

        c, p = self.config, self.progress
        bar = tqdm(total=c.steps, initial=p.step, disable=not show_progress, desc="train", dynamic_ncols=True)
        # SIGTERM, SIGINT and SIGUSR1 end the run after the current step, with a checkpoint.
        with GracefulStop() as stop:
            while p.step < c.steps and not self.guard.stopped:  # the guard stops a run that hacks its reward
                try:
                    row = self.optimizer_step()
                except torch.OutOfMemoryError:  # the step is abandoned; the last checkpoint stands
                    raise out_of_memory(c, self.sampler.phase, p.step + 1, self.run) from None
                p.step += 1
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.4g}", loss=f"{row['loss']:.4g}")
                if c.log.eval_every and p.step % c.log.eval_every == 0:
                    # Held-out figures during training (not counted in `time`), for learning curves.
                    row.update({f"eval_{k}": v for k, v in (self._evaluate() or {}).items() if k != "n"})
                self.guard.after_step(p.step, row, p.step == c.steps)  # guard_* figures at its steps
                if p.step % c.log.every == 0 or p.step == c.steps or {"eval_reward_mean", "guard_best_step"} & row.keys():
                    self.log(row)
                if p.bad_run >= c.max_bad_steps:
                    raise TrainingStopped(
                        f"stopped at step {p.step}: {p.bad_run} consecutive steps with a non-finite "
                        f"{row['skipped']}; the weights were not updated by them and the last good checkpoint "
                        f"is in {self.run.checkpoints}"
                    )
                signum = stop.agreed(self.acc)  # every process stops at the same step
                if p.step % c.log.sample_every == 0 and p.step < c.steps:
                    self.save_grid()
                self.checkpoint_if_due(force=bool(signum))
                if signum:
                    bar.close()
                    raise Interrupted(f"{signal.Signals(signum).name} at step {p.step} of {c.steps}: "
                                      f"checkpoint written; continue with: draft train --resume {self.run.root}",
                                      signum)
        bar.close()

    def batches(self) -> list:
        """This process's micro-batches of the current optimizer step (`draft.plan`)."""
        from draft.plan import choose_frames, micro_batch

        c, acc, step = self.config, self.acc, self.progress.step
        frames = choose_frames(c.seed, step, self.size.frames, c.reward_frames, c.reward_frame_choice)
        return [micro_batch(c.seed, step, micro, acc.process_index, acc.num_processes, c.batch_size, c.grad_accum,
                            self.prompts, self.latent_shape, acc.device, frames) for micro in range(c.grad_accum)]

    def optimizer_step(self) -> dict:
        """One optimizer step: grad_accum micro-batches, clip, guard, update."""
        c, acc, p = self.config, self.acc, self.progress
        t0 = time.perf_counter()
        outs, self.sampler.phase = [], "sampling"
        batches = self.batches()
        with self.model.compile_sampling(c.sampling.compile):  # the gradient-free denoiser calls, compiled
            if hasattr(self.method, "prepare"):  # DDPO: sample the whole step first, advantages over all of it
                with acc.autocast():
                    self.method.prepare(self.sampler, batches, c, acc)
            for batch in batches:
                with acc.accumulate(self.model.denoiser):
                    with acc.autocast():
                        out = self.method(self.sampler, batch, c)
                    self.sampler.phase = "backward"
                    acc.backward(out.loss)
                outs.append(out)
        rewards = acc.gather(torch.cat([o.rewards.float() for o in outs]))
        loss = acc.gather(torch.stack([o.loss.detach().float() for o in outs]).mean().reshape(1)).mean()
        self.sampler.phase = "optimizer step"
        grad_norm = acc.clip_grad_norm_(self.params, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
        bad = _non_finite(rewards, loss, grad_norm)
        if bad is None or (bad == "gradient" and acc.scaler is not None):
            # With fp16 an overflowing gradient is the loss scaler's business: its step
            # skips the update and lowers the scale.
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        p.bad_run = p.bad_run + 1 if bad else 0
        p.bad_total += bool(bad)
        p.queries += int(sum(o.queries for o in outs)) * acc.num_processes
        p.train_time += time.perf_counter() - t0
        stats = {k: float(np.mean([o.stats[k] for o in outs])) for k in outs[0].stats}
        return {
            "step": p.step + 1, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
            "loss": float(loss), "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
            "time": round(p.train_time, 3), "reward_queries": p.queries, "skipped_steps": p.bad_total,
            "skipped": bad, **stats,
        }

    # --- outputs ---

    def log(self, row: dict) -> None:
        if self.acc.is_main_process:
            self.run.append_metrics(row)
        self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])

    def save_grid(self) -> torch.Tensor | None:
        samples = self.watch.grid() if self.samples_here else None
        if self.acc.is_main_process:
            self.run.save_grid(self.progress.step, samples, len(self.watch.grid_prompts()))
            self._log_grid(samples, self.progress.step)
        self.acc.wait_for_everyone()
        return samples

    def _log_grid(self, samples: torch.Tensor, step: int) -> None:
        """The grid (of videos: the frame strip) to the trackers that take images (TensorBoard, W&B)."""
        from draft.report import grid_image

        image = grid_image(samples, len(self.watch.grid_prompts()))[None].numpy()  # [1, 3, H, W]
        for tracker in self.acc.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({"samples": image}, step=step)

    def checkpoint_if_due(self, force: bool) -> None:
        every, p = self.config.log.checkpoint_every, self.progress
        if not (force or (every and p.step % every == 0)):
            return
        adapter, optimizer = adapter_state_dict(self.raw_denoiser), sharding.optimizer_state(self.optimizer)
        if self.acc.is_main_process:
            ckpt.save(self.run.checkpoints, p.step, adapter, optimizer, self.scheduler, self.acc.scaler,
                      {**p.saved(), "guard": self.guard.saved()}, self.config.log.keep_checkpoints,
                      self.guard.best_adapter)
        self.acc.wait_for_everyone()

    def _evaluate(self) -> dict | None:
        return self.watch.evaluate() if self.samples_here else None

    def finish(self) -> None:
        every = self.config.log.checkpoint_every
        if not (every and self.progress.step % every == 0):  # decided alike on every process
            self.checkpoint_if_due(force=True)
        after = self.save_grid()
        adapter = adapter_state_dict(self.raw_denoiser)  # gathered whole on every process when sharded
        if self.acc.is_main_process:
            self.run.write_results(self.model, after, len(self.watch.grid_prompts()), self.progress.eval_before,
                                   self._evaluate, adapter)
        elif self.samples_here:
            self._evaluate()  # the main process's evaluation after training, sharded

    @contextlib.contextmanager
    def _bare(self):
        """Sample with the bare denoiser (no distributed wrapper, so no collectives) on one process."""
        wrapped, self.model.denoiser = self.model.denoiser, self.raw_denoiser
        try:
            yield
        finally:
            self.model.denoiser = wrapped


def _non_finite(rewards, loss, grad_norm) -> str | None:
    """What was non-finite this step, if anything (the same answer on every process)."""
    if not torch.isfinite(rewards).all():
        return "reward"
    if not torch.isfinite(loss):
        return "loss"
    if not torch.isfinite(torch.as_tensor(grad_norm)):
        return "gradient"
    return None
