"""The training loop, on Accelerate. Read it top to bottom:

1. check the config and the run folder, lock the folder (one run at a time), set up Accelerate;
2. load the model, the reward and the prompts; add LoRA; build the optimizer;
3. try the reward on the first sample grid (bad rewards fail here, before any file is written);
4. create the run folder, evaluate the base model, and loop: each optimizer step draws
   prompts and per-sample noise from (seed, step), accumulates the method's loss over
   micro-batches, clips, skips the update if anything is non-finite, steps, logs; a
   SIGTERM, SIGINT or SIGUSR1 ends it after the step, with a checkpoint (`draft.stopping`);
5. save the LoRA, the last checkpoint, the after-grid, the evaluation and the plots.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from draft import checkpoint as ckpt
from draft.config import TrainConfig, dump_yaml, method_defaults
from draft.errors import Interrupted, TrainingStopped, UserError
from draft.report import comparison, summary
from draft.runs import RunFolder


def train(
    config: TrainConfig | None = None,
    *,
    reward: Callable | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Fine-tune `config.model` on `config.reward` (or the `reward` callable); return the run folder."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    config = (config or TrainConfig()).validate()
    if reward is not None:
        config = config.replace(reward=f"python:{getattr(reward, '__qualname__', type(reward).__name__)}")
    # Processes launched without GPUs (accelerate launch / torchrun on a CPU machine) train
    # together on the CPU through gloo; Accelerate only does that when told "cpu".
    cpu = config.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    state = PartialState(cpu=cpu)
    name = [config.name or f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"]
    broadcast_object_list(name)  # every process writes to the same folder name
    run = RunFolder(Path(config.output_dir) / name[0])
    run.check_usable(resume, overwrite)
    lock, busy = None, [None]
    if state.is_main_process:  # one run per folder: a second `draft train` on it is refused
        try:
            lock = run.lock()
        except UserError as e:
            busy = [str(e)]
    broadcast_object_list(busy)
    if busy[0]:
        raise UserError(busy[0])
    try:
        _train_locked(config, reward, resume, overwrite, progress, run, cpu, name[0])
    finally:
        if lock is not None:
            lock.release()
    return run.root


def _train_locked(config: TrainConfig, reward, resume: bool, overwrite: bool, progress: bool, run: RunFolder,
                  cpu: bool, name: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=cpu,
        log_with=list(config.log.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run.root), logging_dir=str(run.logs)),
    )
    main = accelerator.is_main_process
    t = Trainer(config, accelerator, run, reward)
    config = t.config  # with the model's defaults filled in
    latest = ckpt.latest(run.checkpoints) if resume else None
    if latest is not None:
        t.restore(latest)
    first_grid = t.sample_grid()  # also checks the reward on real images
    if main:
        run.create(overwrite and not resume, lambda: dump_yaml(config, run.config))
    accelerator.wait_for_everyone()
    accelerator.init_trackers(name, config=_flat_hparams(config.to_dict()))
    # A run killed before its first checkpoint resumes from the start.
    t.start(first_grid, fresh=latest is None)
    try:
        t.loop(progress and main)
        t.finish()
    finally:
        accelerator.end_training()  # closes (and so flushes) the trackers and the process group


class Trainer:
    """The state of one run; `train` above is the order things happen in."""

    def __init__(self, config: TrainConfig, accelerator, run: RunFolder, reward_fn: Callable | None):
        from draft import rewards
        from draft.lora import add_lora, lora_targets
        from draft.methods import Loop, make
        from draft.models import load_model
        from draft.prompts import load_prompts

        self.config, self.acc, self.run = config, accelerator, run
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
        self.model = load_model(config.model, device=accelerator.device, dtype=dtype)
        self.reward = rewards.from_config(reward_fn or config.reward, config.reward_args).to(accelerator.device)
        self.prompts = load_prompts(config.prompts, config.model)
        self.eval_prompts = load_prompts(config.eval_prompts, config.model)
        # The model family's default LoRA targets, written into the run's config.yaml.
        self.config = config = config.replace(lora=replace(config.lora, target_modules=lora_targets(self.model, config.lora)))
        self.params = add_lora(self.model, config.lora, seed=config.seed)
        self.raw_denoiser = self.model.denoiser
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay
        )
        warmup = config.warmup_steps
        # Not prepared by Accelerate, which would step it once per process per step.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.model.denoiser, self.optimizer = accelerator.prepare(self.model.denoiser, self.optimizer)
        s = config.sampling
        self.schedule = self.model.schedule(s.num_steps, s.height, s.width)
        self.loop_ = Loop(self.model, self.reward, self.schedule, s.guidance_scale, s.eta, s.checkpointing,
                          s.decode_checkpointing, config.kl_coeff, s.merge_lora, s.merged_recompute)
        self.method = make(config.method)
        self.latent_shape = self.model.latent_shape(s.height, s.width)
        self.step, self.queries, self.train_time, self.bad_total, self.bad_run = 0, 0, 0.0, 0, 0
        self.eval_before: dict | None = None

    # --- derived numbers ---

    @property
    def samples_per_step(self) -> int:
        c = self.config
        return c.batch_size * c.grad_accum * self.acc.num_processes

    def describe(self) -> str:
        c, n = self.config, sum(p.numel() for p in self.params)
        per_sample = c.lv_n if c.method == "draft-lv" else 1
        lines = [
            f"model {c.model} ({self.model.resolution}px, latent {self.latent_shape}), reward {c.reward}, method {c.method}",
            f"effective batch {self.samples_per_step} = {c.batch_size} x {c.grad_accum} accumulation x "
            f"{self.acc.num_processes} process(es); reward queries per step {self.samples_per_step * per_sample}",
            f"{c.steps} steps, {c.sampling.num_steps} sampling steps, guidance {c.sampling.guidance_scale}, "
            f"LoRA rank {c.lora.rank} ({n:,} trainable parameters), lr {c.lr}, device {self.acc.device}, "
            f"precision {c.mixed_precision}",
            *method_defaults(c),  # what the method chose for the user, and why
        ]
        return "\n".join(lines)

    # --- the first things a run does ---

    def restore(self, folder: Path) -> None:
        from draft.lora import load_adapter_state_dict

        state = ckpt.load(folder)
        load_adapter_state_dict(self.raw_denoiser, state["adapter"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"checkpoint {folder} does not match this config's optimizer: {e}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        tr = state["trainer"]
        self.step, self.queries, self.train_time = state["step"], tr["queries"], tr["train_time"]
        self.bad_total, self.eval_before = tr["bad_total"], tr.get("eval_before")

    def sample_grid(self) -> torch.Tensor | None:
        """The fixed-seed grid at the current step (main process), checking the reward on it."""
        from draft.inference import generate

        if not self.acc.is_main_process:
            return None
        lg = self.config.log
        chosen = self.grid_prompts()
        # One column per prompt, one row per seed.
        prompts = [p for _ in range(lg.sample_seeds) for p in chosen]
        seeds = [s for s in range(lg.sample_seeds) for _ in chosen]
        with self._unwrapped():
            images = generate(self.model, prompts, seeds, self.config.sampling)
        self._check_reward(images[:2], prompts[:2])
        return images

    def grid_prompts(self) -> list[str]:
        """`log.sample_prompts` of the evaluation prompts, spread over the list."""
        m = len(self.eval_prompts)
        return [self.eval_prompts[i] for i in spread(m, min(self.config.log.sample_prompts, m))]

    def _check_reward(self, images: torch.Tensor, prompts: list[str]) -> None:
        name = self.config.reward
        images = images.to(self.acc.device).requires_grad_(True)
        try:
            r = self.reward(images, prompts)
        except (ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"reward {name!r} failed on a test batch: {str(e).splitlines()[0]}") from None
        if not torch.isfinite(r).all():
            raise UserError(f"reward {name!r} returned non-finite values on a test batch: {r.tolist()}")
        if self.config.method != "ddpo" and not r.requires_grad:
            raise UserError(f"reward {name!r} passes no gradient to the images; "
                            f"method={self.config.method} needs one (method=ddpo works without)")

    def start(self, first_grid: torch.Tensor | None, fresh: bool) -> None:
        from draft.report import save_grid

        if self.acc.is_main_process:
            print(self.describe(), flush=True)
            if fresh:
                self.run.truncate_metrics(0)
                save_grid(first_grid, self.run.samples / f"step-{0:08d}.png", len(self.grid_prompts()))
                self.eval_before = self.evaluate()
                if self.eval_before:
                    print(f"before: {summary(self.eval_before)}", flush=True)
            else:
                print(f"resuming {self.run.root} at step {self.step}", flush=True)
                self.run.truncate_metrics(self.step)
        self.acc.wait_for_everyone()

    # --- the loop ---

    def loop(self, show_progress: bool) -> None:
        from tqdm.auto import tqdm

        from draft.stopping import GracefulStop

        c = self.config
        bar = tqdm(total=c.steps, initial=self.step, disable=not show_progress, desc="train", dynamic_ncols=True)
        # SIGTERM, SIGINT and SIGUSR1 end the run after the current step, with a checkpoint.
        with GracefulStop() as stop:
            while self.step < c.steps:
                row = self.optimizer_step()
                self.step += 1
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.4g}", loss=f"{row['loss']:.4g}")
                if c.log.eval_every and self.step % c.log.eval_every == 0:
                    # Held-out figures during training (not counted in `time`), for learning curves.
                    row.update({f"eval_{k}": v for k, v in (self.evaluate() or {}).items() if k != "n"})
                if self.step % c.log.every == 0 or self.step == c.steps or "eval_reward_mean" in row:
                    self.log(row)
                if self.bad_run >= c.max_bad_steps:
                    raise TrainingStopped(
                        f"stopped at step {self.step}: {self.bad_run} consecutive steps with a non-finite "
                        f"{row['skipped']}; the weights were not updated by them and the last good checkpoint "
                        f"is in {self.run.checkpoints}"
                    )
                signum = stop.agreed(self.acc)  # every process stops at the same step
                if self.step % c.log.sample_every == 0 and self.step < c.steps:
                    self.save_grid()
                self.checkpoint_if_due(force=bool(signum))
                if signum:
                    bar.close()
                    raise Interrupted(f"{signal.Signals(signum).name} at step {self.step} of {c.steps}: "
                                      f"checkpoint written; continue with: draft train --resume {self.run.root}",
                                      signum)
        bar.close()

    def optimizer_step(self) -> dict:
        """One optimizer step: grad_accum micro-batches, clip, guard, update."""
        c, acc = self.config, self.acc
        t0 = time.perf_counter()
        outs = []
        batches = [self.make_batch(micro) for micro in range(c.grad_accum)]
        if hasattr(self.method, "prepare"):  # DDPO: sample the whole step first, advantages over all of it
            with acc.autocast():
                self.method.prepare(self.loop_, batches, c, acc)
        for batch in batches:
            with acc.accumulate(self.model.denoiser):
                with acc.autocast():
                    out = self.method(self.loop_, batch, c)
                acc.backward(out.loss)
            outs.append(out)
        rewards = acc.gather(torch.cat([o.rewards.float() for o in outs]))
        loss = acc.gather(torch.stack([o.loss.detach().float() for o in outs]).mean().reshape(1)).mean()
        grad_norm = acc.clip_grad_norm_(self.params, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
        bad = self._non_finite(rewards, loss, grad_norm)
        if bad is None or (bad == "gradient" and acc.scaler is not None):
            # With fp16 an overflowing gradient is the loss scaler's business: its step
            # skips the update and lowers the scale.
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.bad_run = self.bad_run + 1 if bad else 0
        self.bad_total += bool(bad)
        self.queries += int(sum(o.queries for o in outs)) * acc.num_processes
        self.train_time += time.perf_counter() - t0
        stats = {k: float(np.mean([o.stats[k] for o in outs])) for k in outs[0].stats}
        return {
            "step": self.step + 1, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
            "loss": float(loss), "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
            "time": round(self.train_time, 3), "reward_queries": self.queries, "skipped_steps": self.bad_total,
            "skipped": bad, **stats,
        }

    @staticmethod
    def _non_finite(rewards, loss, grad_norm) -> str | None:
        """What was non-finite this step, if anything (the same answer on every process)."""
        if not torch.isfinite(rewards).all():
            return "reward"
        if not torch.isfinite(loss):
            return "loss"
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            return "gradient"
        return None

    def make_batch(self, micro: int):
        """Prompts and noise for this process's micro-batch of the current optimizer step.

        Global sample j of step n gets prompt and noise from (seed, n, j) alone, so any split
        into micro-batches and processes trains on the same samples.
        """
        from draft.methods import Batch, sample_seed
        from draft.sampling import SampleNoise

        c, acc = self.config, self.acc
        rng = np.random.default_rng([c.seed, self.step])
        picks = rng.integers(0, len(self.prompts), size=self.samples_per_step)
        first = (micro * acc.num_processes + acc.process_index) * c.batch_size
        idx = range(first, first + c.batch_size)
        noise = SampleNoise([sample_seed(c.seed, self.step, j) for j in idx], self.latent_shape, acc.device)
        return Batch([self.prompts[picks[j]] for j in idx], noise, np.random.default_rng([c.seed, self.step, 1]),
                     self.step, micro)

    # --- outputs ---

    def log(self, row: dict) -> None:
        if self.acc.is_main_process:
            self.run.append_metrics(row)
        self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])

    def save_grid(self) -> torch.Tensor | None:
        from draft.report import save_grid

        images = self.sample_grid()
        if images is not None:
            save_grid(images, self.run.samples / f"step-{self.step:08d}.png", len(self.grid_prompts()))
        self.acc.wait_for_everyone()
        return images

    def checkpoint_if_due(self, force: bool) -> None:
        every = self.config.log.checkpoint_every
        if not (force or (every and self.step % every == 0)):
            return
        if self.acc.is_main_process:
            from draft.lora import adapter_state_dict

            trainer = {"queries": self.queries, "train_time": self.train_time, "bad_total": self.bad_total,
                       "eval_before": self.eval_before}
            ckpt.save(self.run.checkpoints, self.step, adapter_state_dict(self.raw_denoiser), self.optimizer,
                      self.scheduler, self.acc.scaler, trainer, self.config.log.keep_checkpoints)
        self.acc.wait_for_everyone()

    def evaluate(self) -> dict | None:
        """Reward (and model metrics) on `log.eval_samples` held-out prompts, one fixed seed each."""
        from draft.evaluation import score
        from draft.inference import generate

        n = self.config.log.eval_samples
        if n == 0 or not self.acc.is_main_process:
            return None
        groups = spread(len(self.eval_prompts), n)
        prompts = [self.eval_prompts[g] for g in groups]
        seeds = [10_000 + k for k in range(n)]
        with self._unwrapped():
            images = generate(self.model, prompts, seeds, self.config.sampling)
        return score(images, prompts, groups, self.reward, self.model.metrics, self.acc.device)

    def finish(self) -> None:
        import json

        from draft import safeio
        from draft.card import write_card
        from draft.lora import save_lora
        from draft.report import plot_metrics, save_before_after

        every = self.config.log.checkpoint_every
        if not (every and self.step % every == 0):  # decided alike on every process
            self.checkpoint_if_due(force=True)
        after = self.save_grid()
        if not self.acc.is_main_process:
            return
        # Written whole into a folder beside lora/, then renamed: never a half-written adapter.
        safeio.write_dir(self.run.lora, lambda tmp: save_lora(self.model, tmp), "the LoRA")
        eval_after = self.evaluate()
        before = self.run.samples / f"step-{0:08d}.png"
        if before.is_file() and after is not None:
            save_before_after(before, after, self.run.report / "before_after.png", len(self.grid_prompts()))
        safeio.write_text(self.run.report / "eval.json", json.dumps({"before": self.eval_before, "after": eval_after},
                                                                   indent=2), "the evaluation")
        with safeio.writing("the plots", self.run.report):
            plot_metrics(self.run.metrics, self.run.report)
        with safeio.writing("the model card", self.run.lora):
            write_card(self.run.root)  # lora/README.md, from the files written above
        if eval_after:
            print(comparison(self.eval_before, eval_after, f"held-out, {eval_after['n']} images"))
        print(f"run folder: {self.run.root}  (LoRA: {self.run.lora})", flush=True)

    def _unwrapped(self):
        """Sample with the bare denoiser (no distributed wrapper, so no collectives) on one process."""
        import contextlib

        @contextlib.contextmanager
        def swap():
            wrapped, self.model.denoiser = self.model.denoiser, self.raw_denoiser
            try:
                yield
            finally:
                self.model.denoiser = wrapped

        return swap()


def spread(m: int, n: int) -> list[int]:
    """n indices into a list of m: evenly spaced when n <= m (prompt files are often
    sorted, so the first few would all be alike), else cycling through it, so each item
    appears with several seeds (which the diversity figure needs)."""
    return [k * m // n if n <= m else k % m for k in range(n)]


def _flat_hparams(d: dict, prefix: str = "") -> dict:
    """Config as flat scalars for the trackers' hyper-parameter tables."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_hparams(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[prefix + k] = v
        else:
            out[prefix + k] = str(v)
    return out
