"""The methods: each turns (sampler, prompts, noise) into a loss on one sampling loop.

They differ only in which sampling steps carry gradient (DRaFT, Clark et al. 2024, §4):

| method    | gradient window                                                        |
| --------- | ---------------------------------------------------------------------- |
| draft     | all T steps (checkpointed, so memory stays flat in T)                  |
| draft-k   | the last K steps; the first T-K run under no_grad                      |
| draft-lv  | x_0 sampled under no_grad, re-noised n times to the last step's level, |
|           | one gradient step each (alg. 3; or from an earlier step's level, the   |
|           | steps from there with gradient); the n passes run as one batch         |
| alignprop | the last K steps, K drawn once per optimizer step (Prabhudesai et al.) |
| refl      | stop at a random late step, predict x̂_0 in one gradient step (Xu et   |
|           | al. 2023, ImageReward §4)                                              |

and, in `draft.neighbours`, Direct-Align (SRPO) and DRTune.
The loss is -reward.mean(), plus the DRaFT+ penalty when `kl_coeff` > 0. DDPO, the
reinforcement-learning baseline that needs no reward gradient, is in `draft.ddpo`.
`METHODS` at the end describes each method once (its window, costs, defaults and checks)
for the config, the estimate, the model card and the docs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from draft.errors import UserError
from draft.models.base import Size
from draft.sampling import SampleNoise, Schedule, guided, model_step, renoise, sample_chain


@dataclass
class Batch:
    """One micro-batch of an optimizer step: what a method needs besides the sampler."""

    prompts: list[str]
    noise: SampleNoise  # x_T is its first draw; methods draw more (DRaFT-LV, η > 0)
    step_rng: np.random.Generator  # choices made once per optimizer step (AlignProp's K)
    step: int = 0  # the optimizer step this batch is for
    micro: int = 0  # which micro-batch of the step (gradient accumulation)
    frames: tuple[int, ...] | None = None  # videos: the frames the reward scores (None: all)


@dataclass
class Sampler:
    """The model, the reward and the sampling settings every method samples and scores with."""

    model: object  # a draft.models adapter
    reward: Callable
    schedule: Schedule
    guidance_scale: float = 7.5
    eta: float = 0.0
    use_checkpoint: bool = True  # checkpoint the gradient-carrying denoiser calls (but `keep_graphs`)
    decode_checkpoint: bool = False
    kl_coeff: float = 0.0
    merge_lora: bool = True  # fold the LoRA into the weights for steps without gradient
    merged_recompute: bool = True  # see SamplingConfig.merged_recompute
    size: Size = Size()  # what to generate (zeros: the model's native size)
    negative_prompt: str = ""
    guidance_scale_2: float | None = None  # Wan 2.2's second expert (None: guidance_scale)
    # With use_checkpoint: how many of a window's gradient steps (its last ones) keep their
    # graphs instead, as many as the memory budget holds (`draft.estimate.checkpoint_split`).
    keep_graphs: int = 0
    # What the step is doing (sampling, text encoding, decode, reward; the trainer adds
    # backward and the optimizer step), for the answer to running out of memory (`draft.oom`).
    phase: str = "sampling"
    guidance_gradient: str = "both"  # see SamplingConfig.guidance_gradient

    def denoiser(self):
        scale = self.model.guidance(self.guidance_scale, self.guidance_scale_2)
        return guided(self.model.denoise, scale, self.model.guide, self.guidance_gradient)

    def conditioning(self, prompts: list[str]):
        """(cond, uncond) for the prompts, as the model encodes them for this sampler."""
        self.phase = "text encoding"
        return self.model.conditioning(list(prompts), self.guidance_scale, self.size, self.negative_prompt)

    def run(self, x, cond, noise: SampleNoise, steps: range | None = None, grad_steps: range = range(0),
            penalty: list | None = None):
        """Sample from x over `steps`; collect the DRaFT+ penalty of gradient steps into `penalty`.

        With η > 0 each step's noise is drawn from the samples' own streams (x may hold
        several copies of the batch, as in DRaFT-LV).
        """
        denoise, self.phase = self.denoiser(), "sampling"
        steps = range(len(self.schedule)) if steps is None else steps
        checkpointed = self.checkpointed(grad_steps)
        base, on_step = None, None  # base: the base model's weights while the LoRA is merged (below)
        if self.kl_coeff > 0 and penalty is not None:

            def on_step(i, x_t, out, _):
                if i in grad_steps:
                    penalty.append(self._drift(denoise, x_t, i, cond, out, base))

        copies = x.shape[0] // len(noise.generators)
        step_noise = lambda i: torch.cat([noise.draw() for _ in range(copies)])  # noqa: E731
        chain = dict(grad_steps=grad_steps, eta=self.eta, step_noise=step_noise, on_step=on_step)
        # A checkpointed gradient step needs no graph on its first pass (the backward
        # recomputes each call, `sampling._Recomputed`), so that pass runs with the LoRA
        # merged, as the gradient-free steps do; the weights are restored before the
        # backward, and `base` runs the DRaFT+ base model without unmerging. The steps that
        # keep their graphs (the window's last `keep_graphs`) need the LoRA unmerged, so the
        # chain runs in two parts: merged up to the last checkpointed step, unmerged after.
        if self.merged_recompute and self.merge_lora and len(checkpointed) and torch.is_grad_enabled():
            split = checkpointed.stop
            with contextlib.ExitStack() as merged:
                with torch.no_grad():
                    base = merged.enter_context(self.model.adapters_merged())
                params = [p for p in self.model.denoiser.parameters() if p.requires_grad] if base is not None else None
                x = sample_chain(denoise, x, self.schedule, cond, steps=range(steps.start, split),
                                 use_checkpoint=True, params=params, **chain)
            base = None
            return sample_chain(denoise, x, self.schedule, cond, steps=range(split, steps.stop),
                                use_checkpoint=False, **chain)
        return sample_chain(denoise, x, self.schedule, cond, steps=steps, use_checkpoint=checkpointed, **chain)

    def checkpointed(self, grad_steps: range) -> range:
        """The steps of a gradient window that are checkpointed: all but the last `keep_graphs`."""
        if not self.use_checkpoint:
            return range(0)
        return grad_steps[:max(0, len(grad_steps) - self.keep_graphs)]

    def run_no_grad(self, x, cond, noise: SampleNoise, steps: range | None = None):
        """Sample over `steps` without gradient, the LoRA merged into the weights (same
        result as `run`, faster: see `draft.models.merging`)."""
        merged = self.model.adapters_merged() if self.merge_lora else contextlib.nullcontext()
        with torch.no_grad(), merged:
            return self.run(x, cond, noise, steps=steps)

    def _drift(self, denoise, x_t, i, cond, out, base_weights=None) -> torch.Tensor:
        """DRaFT+: ||f_adapted(x_t) - f_base(x_t)||² for one step, the base with LoRA off
        (`base_weights`: inside `adapters_merged`, the swap that runs the base model)."""
        with torch.no_grad(), (base_weights or self.model.adapters_disabled)():
            base, _, _ = model_step(denoise, x_t.detach(), i, self.schedule, cond)
        return (out - base).square().mean()

    def score(self, latents: torch.Tensor, prompts: list[str], frames=None) -> torch.Tensor:
        """The reward of each sample; of a video, on the `frames` it is scored on (only the
        latent frames those need are decoded, so the gradient reaches no others)."""
        self.phase = "decode"
        samples = self.model.decode(latents, frames=frames, use_checkpoint=self.decode_checkpoint)
        self.phase = "reward"
        return self.reward(samples, prompts)


@dataclass
class MethodOutput:
    loss: torch.Tensor
    rewards: torch.Tensor  # every reward the step computed, detached
    queries: int  # reward evaluations (samples scored)
    stats: dict = field(default_factory=dict)


def _finish(sampler: Sampler, r: torch.Tensor, penalty: list, stats: dict) -> MethodOutput:
    loss = -r.mean()
    if penalty:
        drift = torch.stack(penalty).mean()
        loss = loss + sampler.kl_coeff * drift
        stats["kl_penalty"] = float(drift.detach())
    return MethodOutput(loss, r.detach(), r.shape[0], stats)


def truncated(sampler: Sampler, batch: Batch, k: int) -> MethodOutput:
    """Gradient through the last k sampling steps (k = T is full DRaFT)."""
    T = len(sampler.schedule)
    cond = sampler.conditioning(batch.prompts)
    penalty: list = []
    x = batch.noise.draw()
    if k < T:
        x = sampler.run_no_grad(x, cond, batch.noise, steps=range(0, T - k))
    window = range(T - k, T)
    x0 = sampler.run(x, cond, batch.noise, steps=window, grad_steps=window, penalty=penalty)
    return _finish(sampler, sampler.score(x0, batch.prompts, batch.frames), penalty, {"k": k})


def draft(sampler: Sampler, batch: Batch, cfg) -> MethodOutput:
    return truncated(sampler, batch, len(sampler.schedule))


def draft_k(sampler: Sampler, batch: Batch, cfg) -> MethodOutput:
    return truncated(sampler, batch, cfg.k)


def alignprop(sampler: Sampler, batch: Batch, cfg) -> MethodOutput:
    # Drawn once per optimizer step from the step's own generator, never inside the
    # sampling sampler (the bug of AlignProp issue #15, kept by TRL's port).
    k = int(batch.step_rng.integers(cfg.alignprop_k_min, cfg.alignprop_k_max + 1))
    return truncated(sampler, batch, k)


def draft_lv(sampler: Sampler, batch: Batch, cfg) -> MethodOutput:
    """DRaFT-LV (alg. 3): re-noise x_0 n times to the level of step `lv_step` (default the
    last) and denoise from there with gradient.

    The n passes use independent fresh noise and run as one batch of n·B; the loss is the
    mean over all n·B rewards, i.e. the average of the n per-pass losses. At an earlier
    level every remaining step carries gradient: the reward is a function of the whole path
    from the re-noised latent to x_0, and cutting the gradient after the path's first step
    would drop the part of it that DRaFT-K keeps (alg. 3 is the one-step path, unchanged).
    """
    T, n = len(sampler.schedule), cfg.lv_n
    i = lv_step(cfg, T)
    cond = sampler.conditioning(batch.prompts)
    x0 = sampler.run_no_grad(batch.noise.draw(), cond, batch.noise)
    eps = torch.cat([batch.noise.draw() for _ in range(n)])  # [n·B], pass-major
    x_t = renoise(_repeat(x0, n), sampler.schedule.a[i], sampler.schedule.s[i], eps)
    cond_n = tuple(_repeat(c, n) for c in cond)
    penalty: list = []
    x0_lv = sampler.run(x_t, cond_n, batch.noise, steps=range(i, T), grad_steps=range(i, T), penalty=penalty)
    return _finish(sampler, sampler.score(x0_lv, batch.prompts * n, batch.frames), penalty, {})


def lv_step(cfg, T: int) -> int:
    """DRaFT-LV's re-noising step of T with -1 resolved (the last step)."""
    return cfg.lv_step if cfg.lv_step >= 0 else T - 1


def refl(sampler: Sampler, batch: Batch, cfg) -> MethodOutput:
    """ReFL: sample to a random late step s under no_grad, then x̂_0 from one gradient step."""
    lo, hi = refl_range(cfg)
    s = int(batch.step_rng.integers(lo, hi + 1))
    cond = sampler.conditioning(batch.prompts)
    x_s = sampler.run_no_grad(batch.noise.draw(), cond, batch.noise, steps=range(0, s))
    out, x0_hat, _ = model_step(sampler.denoiser(), x_s, s, sampler.schedule, cond)
    penalty = [sampler._drift(sampler.denoiser(), x_s, s, cond, out)] if sampler.kl_coeff > 0 else []
    return _finish(sampler, sampler.score(x0_hat, batch.prompts, batch.frames), penalty, {"stop_step": s})


def refl_range(cfg) -> tuple[int, int]:
    """ReFL's stop-step range, its -1 defaults resolved: the last 10 steps."""
    t = cfg.sampling.num_steps
    lo = cfg.refl_min_step if cfg.refl_min_step >= 0 else max(t - 10, 0)
    hi = cfg.refl_max_step if cfg.refl_max_step >= 0 else t - 1
    return lo, hi


def _repeat(c, n: int):
    """n copies of a conditioning along the batch (None, a tensor, or a dict of tensors)."""
    if c is None:
        return None
    if isinstance(c, dict):
        return {k: _repeat(v, n) for k, v in c.items()}
    return c.repeat(n, *([1] * (c.ndim - 1)))


# --- the table: one description per method -------------------------------------------------


@dataclass(frozen=True)
class Method:
    """What a method is and costs, in one place: config validation, the start-up lines, the
    memory and time estimate, the model card and the docs all read it."""

    name: str
    # The loss function, or "module:attr" of one defined elsewhere (a class: a method that keeps state).
    run: Callable | str
    summary: str  # one line for the model card; {field} is the config's value
    window: str  # which sampling steps carry gradient
    # Per sample and optimizer step: (denoiser calls without gradient, with gradient).
    calls: Callable[[Any], tuple[float, float]]
    grad_steps: Callable[[Any], int]  # the most sampling steps that carry gradient at once
    passes: Callable[[Any], int] = lambda c: 1  # decodes and reward queries per sample
    reward_gradient: bool = True  # whether the reward must pass a gradient to the images
    # How its activations add up (`draft.estimate`): "window" keeps the gradient steps'
    # graphs (or their inputs, checkpointed), "one-step" one uncheckpointed step and the
    # decode, "policy" the trained steps and no decode.
    memory: str = "window"
    # Config keys it sets when the user does not: dotted key -> (value, why).
    defaults: dict = field(default_factory=dict)
    check: Callable[[Any], None] = lambda c: None  # the method's own constraints (UserError)

    def __call__(self, sampler: Sampler, batch: Batch, cfg) -> MethodOutput:
        return (self.run if callable(self.run) else self.make())(sampler, batch, cfg)

    def make(self) -> Callable[[Sampler, Batch, object], MethodOutput]:
        """The method, ready for one run (a fresh instance of a method that keeps state)."""
        if isinstance(self.run, str):
            import importlib

            module, _, name = self.run.partition(":")
            run = getattr(importlib.import_module(module), name)
            return run() if isinstance(run, type) else run
        return self.run

    def queries(self, cfg) -> float:
        """Reward queries per sample and optimizer step (DDPO scores a rollout once per reuse)."""
        return self.passes(cfg) / (cfg.ddpo_rollout_reuse if self.name == "ddpo" else 1)


def _check_k(c) -> None:
    if c.k > c.sampling.num_steps:
        raise UserError(f"k={c.k} is larger than sampling.num_steps={c.sampling.num_steps}")


def _check_alignprop(c) -> None:
    if not 1 <= c.alignprop_k_min <= c.alignprop_k_max <= c.sampling.num_steps:
        raise UserError(f"need 1 <= alignprop_k_min <= alignprop_k_max <= sampling.num_steps, got "
                        f"{c.alignprop_k_min}, {c.alignprop_k_max}, {c.sampling.num_steps}")


def _check_refl(c) -> None:
    lo, hi = refl_range(c)
    if not 0 <= lo <= hi < c.sampling.num_steps:
        raise UserError(f"need 0 <= refl_min_step <= refl_max_step < sampling.num_steps, got {lo}, {hi}")


def _check_lv(c) -> None:
    if not -1 <= c.lv_step < c.sampling.num_steps:
        raise UserError(f"need -1 <= lv_step < sampling.num_steps (-1: the last step), got {c.lv_step}")


def _lv_window(c) -> int:
    return c.sampling.num_steps - lv_step(c, c.sampling.num_steps)


def _check_direct_align(c) -> None:
    sig = c.direct_align_sigmas
    if len(sig) != 2 or not 0 <= sig[0] <= sig[1] <= 1:
        raise UserError(f"need direct_align_sigmas = [low, high] with 0 <= low <= high <= 1, got {list(sig)}")


def _check_drtune(c) -> None:
    if c.drtune_k > c.sampling.num_steps:
        raise UserError(f"drtune_k={c.drtune_k} is larger than sampling.num_steps={c.sampling.num_steps}")


def _check_ddpo(c) -> None:
    if c.sampling.eta <= 0:
        raise UserError("method=ddpo samples stochastically: set sampling.eta > 0 (e.g. sampling.eta=1.0)")


def _alignprop_mean(c) -> float:
    return (c.alignprop_k_min + c.alignprop_k_max) / 2


def _ddpo_steps(c) -> int:
    return max(1, math.ceil(c.sampling.num_steps * c.ddpo_timestep_fraction))


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("draft", draft, "DRaFT: the reward's gradient through every sampling step",
           "all T steps", lambda c: (0, c.sampling.num_steps), lambda c: c.sampling.num_steps),
    Method("draft-k", draft_k, "DRaFT-K: the reward's gradient through the last {k} sampling steps",
           "the last `k` steps", lambda c: (c.sampling.num_steps - c.k, c.k), lambda c: c.k, check=_check_k),
    Method("draft-lv", draft_lv,
           "DRaFT-LV: {lv_n} re-noised copies of the final sample, denoised with gradient from step {lv_step} "
           "(-1: the last step only)",
           "x_0 sampled under no_grad, re-noised `lv_n` times to the level of step `lv_step` (default the last), "
           "the steps from there with gradient",
           lambda c: (c.sampling.num_steps, c.lv_n * _lv_window(c)), _lv_window, passes=lambda c: c.lv_n,
           check=_check_lv),
    Method("alignprop", alignprop,
           "AlignProp: the gradient through a random number ({alignprop_k_min} to {alignprop_k_max}) of final steps",
           "the last K steps, K ~ U[`alignprop_k_min`, `alignprop_k_max`] drawn once per step",
           lambda c: (c.sampling.num_steps - _alignprop_mean(c), _alignprop_mean(c)), lambda c: c.alignprop_k_max,
           check=_check_alignprop),
    Method("refl", refl, "ReFL: one gradient step to the predicted image from a random late step",
           "stop at a random late step, predict x̂_0 in one gradient step",
           lambda c: (sum(refl_range(c)) / 2, 1), lambda c: 1, memory="one-step", check=_check_refl),
    Method("direct-align", "draft.neighbours:direct_align",
           "Direct-Align (SRPO): one gradient step from a noise level in {direct_align_sigmas}, x_0 recovered "
           "with the injected noise",
           "x_0 sampled under no_grad, noised with known ε to a level σ ~ U[`direct_align_sigmas`]; one gradient "
           "step, then x_0 recovered with that ε",
           lambda c: (c.sampling.num_steps, 1), lambda c: 1, memory="one-step", check=_check_direct_align),
    Method("drtune", "draft.neighbours:drtune",
           "DRTune: the gradient through {drtune_k} evenly spaced steps, each denoiser's input detached",
           "`drtune_k` evenly spaced steps with gradient, each denoiser's input detached (the gradient reaches "
           "them through the sampler's updates only)",
           lambda c: (c.sampling.num_steps - c.drtune_k, c.drtune_k), lambda c: c.drtune_k, check=_check_drtune),
    Method("ddpo", "draft.ddpo:DDPO", "DDPO: policy gradient on the sampler's log-probabilities (no reward gradient)",
           "none: the RL baseline (PPO on the log-probabilities of stochastic steps), for rewards without a gradient",
           lambda c: (c.sampling.num_steps / c.ddpo_rollout_reuse, _ddpo_steps(c)), _ddpo_steps,
           reward_gradient=False, memory="policy", check=_check_ddpo,
           defaults={"sampling.eta": (1.0, "DDPO's policy gradient needs stochastic sampling steps; "
                                           "eta 1 (DDPM-like) as in DDPO's own runs")}),
]}


def make(name: str) -> Callable[[Sampler, Batch, object], MethodOutput]:
    """The method called `name`, ready for one run."""
    return METHODS[name].make()
