"""The methods: each turns (model, reward, prompts, noise) into a loss on one sampling loop.

They differ only in which sampling steps carry gradient (DRaFT, Clark et al. 2024, §4):

| method    | gradient window                                                        |
| --------- | ---------------------------------------------------------------------- |
| draft     | all T steps (checkpointed, so memory stays flat in T)                  |
| draft-k   | the last K steps; the first T-K run under no_grad                      |
| draft-lv  | x_0 sampled under no_grad, re-noised n times to the last step's level, |
|           | one gradient step each (alg. 3); the n passes run as one batch         |
| alignprop | the last K steps, K drawn once per optimizer step (Prabhudesai et al.) |
| refl      | stop at a random late step, predict x̂_0 in one gradient step (Xu et   |
|           | al. 2023, ImageReward §4)                                              |

The loss is -reward.mean(), plus the DRaFT+ penalty when `kl_coeff` > 0. DDPO, the
reinforcement-learning baseline that needs no reward gradient, is in `draft.ddpo`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from draft.sampling import SampleNoise, Schedule, guided, model_step, renoise, sample


def sample_seed(seed: int, step: int, index: int) -> int:
    """The seed of global sample `index` at optimizer step `step`."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


@dataclass
class Batch:
    prompts: list[str]
    noise: SampleNoise  # x_T is its first draw; methods draw more (DRaFT-LV, η > 0)
    step_rng: np.random.Generator  # choices made once per optimizer step (AlignProp's K)
    step: int = 0  # the optimizer step this batch is for
    micro: int = 0  # which micro-batch of the step (gradient accumulation)


@dataclass
class Loop:
    """The model, reward and sampling settings every method runs on."""

    model: object  # a draft.models adapter
    reward: Callable
    schedule: Schedule
    guidance_scale: float = 7.5
    eta: float = 0.0
    use_checkpoint: bool = True  # checkpoint every gradient-carrying UNet call
    decode_checkpoint: bool = False
    kl_coeff: float = 0.0
    merge_lora: bool = True  # fold the LoRA into the weights for steps without gradient
    merged_recompute: bool = True  # see SamplingConfig.merged_recompute

    def denoiser(self):
        return guided(self.model.denoise, self.guidance_scale)

    def run(self, x, cond, noise: SampleNoise, steps: range | None = None, grad_steps: range = range(0),
            penalty: list | None = None):
        """Sample from x over `steps`; collect the DRaFT+ penalty of gradient steps into `penalty`.

        With η > 0 each step's noise is drawn from the samples' own streams (x may hold
        several copies of the batch, as in DRaFT-LV).
        """
        denoise = self.denoiser()
        with contextlib.ExitStack() as merged:
            # A checkpointed gradient window needs no graph on its first pass (the backward
            # recomputes each call, `sampling._Recomputed`), so that pass runs with the LoRA
            # merged, as the gradient-free steps do; the weights are restored before the
            # backward. `base` then runs the DRaFT+ base model without unmerging.
            base, params = None, None
            if (self.merged_recompute and self.use_checkpoint and self.merge_lora and len(grad_steps)
                    and torch.is_grad_enabled()):
                with torch.no_grad():
                    base = merged.enter_context(self.model.adapters_merged())
                if base is not None:
                    params = [p for p in self.model.denoiser.parameters() if p.requires_grad]
            on_step = None
            if self.kl_coeff > 0 and penalty is not None:

                def on_step(i, x_t, out, _):
                    if i in grad_steps:
                        penalty.append(self._drift(denoise, x_t, i, cond, out, base))

            copies = x.shape[0] // len(noise.generators)
            step_noise = lambda i: torch.cat([noise.draw() for _ in range(copies)])  # noqa: E731
            return sample(denoise, x, self.schedule, cond, steps=steps, grad_steps=grad_steps,
                          use_checkpoint=self.use_checkpoint, eta=self.eta, step_noise=step_noise,
                          on_step=on_step, params=params)

    def run_no_grad(self, x, cond, noise: SampleNoise, steps: range | None = None):
        """Sample over `steps` without gradient, the LoRA merged into the weights (same
        result as `run`, faster: see `StableDiffusion.adapters_merged`)."""
        merged = self.model.adapters_merged() if self.merge_lora else contextlib.nullcontext()
        with torch.no_grad(), merged:
            return self.run(x, cond, noise, steps=steps)

    def _drift(self, denoise, x_t, i, cond, out, base_weights=None) -> torch.Tensor:
        """DRaFT+: ||f_adapted(x_t) - f_base(x_t)||² for one step, the base with LoRA off
        (`base_weights`: inside `adapters_merged`, the swap that runs the base model)."""
        with torch.no_grad(), (base_weights or self.model.adapters_disabled)():
            base, _, _ = model_step(denoise, x_t.detach(), i, self.schedule, cond)
        return (out - base).square().mean()

    def score(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = self.model.decode(latents, use_checkpoint=self.decode_checkpoint)
        return self.reward(images, prompts)


@dataclass
class MethodOutput:
    loss: torch.Tensor
    rewards: torch.Tensor  # every reward the step computed, detached
    queries: int  # reward evaluations (images scored)
    stats: dict = field(default_factory=dict)


def _finish(loop: Loop, r: torch.Tensor, penalty: list, stats: dict) -> MethodOutput:
    loss = -r.mean()
    if penalty:
        drift = torch.stack(penalty).mean()
        loss = loss + loop.kl_coeff * drift
        stats["kl_penalty"] = float(drift.detach())
    return MethodOutput(loss, r.detach(), r.shape[0], stats)


def truncated(loop: Loop, batch: Batch, k: int) -> MethodOutput:
    """Gradient through the last k sampling steps (k = T is full DRaFT)."""
    T = len(loop.schedule)
    cond = loop.model.conditioning(batch.prompts, loop.guidance_scale)
    penalty: list = []
    x = batch.noise.draw()
    if k < T:
        x = loop.run_no_grad(x, cond, batch.noise, steps=range(0, T - k))
    window = range(T - k, T)
    x0 = loop.run(x, cond, batch.noise, steps=window, grad_steps=window, penalty=penalty)
    return _finish(loop, loop.score(x0, batch.prompts), penalty, {"k": k})


def draft(loop: Loop, batch: Batch, cfg) -> MethodOutput:
    return truncated(loop, batch, len(loop.schedule))


def draft_k(loop: Loop, batch: Batch, cfg) -> MethodOutput:
    return truncated(loop, batch, cfg.k)


def alignprop(loop: Loop, batch: Batch, cfg) -> MethodOutput:
    # Drawn once per optimizer step from the step's own generator, never inside the
    # sampling loop (the bug of AlignProp issue #15, kept by TRL's port).
    k = int(batch.step_rng.integers(cfg.alignprop_k_min, cfg.alignprop_k_max + 1))
    return truncated(loop, batch, k)


def draft_lv(loop: Loop, batch: Batch, cfg) -> MethodOutput:
    """DRaFT-LV (alg. 3): re-noise x_0 to the last step's level n times; one gradient step each.

    The n passes use independent fresh noise and run as one batch of n·B; the loss is the
    mean over all n·B rewards, i.e. the average of the n per-pass losses.
    """
    T, n = len(loop.schedule), cfg.lv_n
    cond = loop.model.conditioning(batch.prompts, loop.guidance_scale)
    x0 = loop.run_no_grad(batch.noise.draw(), cond, batch.noise)
    eps = torch.cat([batch.noise.draw() for _ in range(n)])  # [n·B], pass-major
    x_t = renoise(_repeat(x0, n), loop.schedule.a[T - 1], loop.schedule.s[T - 1], eps)
    cond_n = tuple(_repeat(c, n) for c in cond)
    penalty: list = []
    x0_lv = loop.run(x_t, cond_n, batch.noise, steps=range(T - 1, T), grad_steps=range(T - 1, T), penalty=penalty)
    return _finish(loop, loop.score(x0_lv, batch.prompts * n), penalty, {})


def refl(loop: Loop, batch: Batch, cfg) -> MethodOutput:
    """ReFL: sample to a random late step s under no_grad, then x̂_0 from one gradient step."""
    lo, hi = cfg.refl_range
    s = int(batch.step_rng.integers(lo, hi + 1))
    cond = loop.model.conditioning(batch.prompts, loop.guidance_scale)
    x_s = loop.run_no_grad(batch.noise.draw(), cond, batch.noise, steps=range(0, s))
    out, x0_hat, _ = model_step(loop.denoiser(), x_s, s, loop.schedule, cond)
    penalty = [loop._drift(loop.denoiser(), x_s, s, cond, out)] if loop.kl_coeff > 0 else []
    return _finish(loop, loop.score(x0_hat, batch.prompts), penalty, {"stop_step": s})


def _repeat(c, n: int):
    """n copies of a conditioning along the batch (None, a tensor, or a dict of tensors)."""
    if c is None:
        return None
    if isinstance(c, dict):
        return {k: _repeat(v, n) for k, v in c.items()}
    return c.repeat(n, *([1] * (c.ndim - 1)))


METHODS: dict[str, Callable[[Loop, Batch, object], MethodOutput]] = {
    "draft": draft,
    "draft-k": draft_k,
    "draft-lv": draft_lv,
    "alignprop": alignprop,
    "refl": refl,
}
# Methods that keep state between steps, built fresh for each run.
STATEFUL = {"ddpo": "draft.ddpo:DDPO"}
NAMES = (*METHODS, *STATEFUL)


def make(name: str) -> Callable[[Loop, Batch, object], MethodOutput]:
    """The method called `name`, ready for one run."""
    if name in STATEFUL:
        import importlib

        module, _, cls = STATEFUL[name].partition(":")
        return getattr(importlib.import_module(module), cls)()
    return METHODS[name]
