"""DDPO, the reinforcement-learning baseline, on the same sampling loop.

Denoising Diffusion Policy Optimization (Black, Janner, Du, Kostrikov & Levine 2023,
"Training Diffusion Models with Reinforcement Learning", §4.3, DDPO_IS): each stochastic
DDIM step (η > 0) is an action with a Gaussian log-probability, and the LoRA is updated
with PPO's clipped importance-sampling objective on per-prompt normalised rewards. The
reward is never differentiated, so any score works, including the real JPEG file size.

    per step i:  x_prev ~ N(μ_θ(x_t, t_i), σ_i² I),   log π_θ(x_prev | x_t)
    A = (r - mean_prompt(r)) / (std_prompt(r) + 1e-8), clipped to ±adv_clip
        (over the optimizer step's whole batch: every micro-batch of every process)
    ratio = exp(log π_θ - log π_old)
    loss = mean_i mean_b max(-A·ratio, -A·clip(ratio, 1 - ε, 1 + ε))

A rollout (the sampled trajectories, their old log-probabilities and advantages) is reused
for `ddpo_rollout_reuse` optimizer steps; from the second of them on the ratio moves away
from 1 and the clip matters. The structure follows kvablack/ddpo-pytorch
(`scripts/train.py`, `ddpo_pytorch/diffusers_patch/ddim_with_logprob.py`).

As there, all samples of a step are drawn before any is trained on, and the rewards are
gathered from every process before the advantages are computed: a prompt's own mean
and std are used once it appears `ddpo_min_prompt_count` times, the batch's below that
(ddpo-pytorch's `PerPromptStatTracker`, `ddpo_pytorch/stat_tracking.py`, which also keeps
a buffer across steps; here the statistics are the step's own, so a resumed run needs no
tracker state). So 2 processes at batch B/2, or 2 micro-batches of B/2, train exactly as
1 process at batch B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from draft.methods import Batch, Sampler, MethodOutput
from draft.sampling import denoised, gaussian_log_prob, model_step, sample_chain, step_mean


@dataclass
class Rollout:
    rollout_id: int
    prompts: list[str]
    cond: tuple
    latents: torch.Tensor  # [T, B, ...] x_t entering step i
    next_latents: torch.Tensor  # [T, B, ...] x_prev the step sampled
    log_probs: torch.Tensor  # [T, B] under the policy that sampled them
    rewards: torch.Tensor  # [B]
    advantages: torch.Tensor  # [B]


def advantages(rewards: torch.Tensor, prompts: list[str], min_count: int = 2, eps: float = 1e-8) -> torch.Tensor:
    """Rewards normalised per prompt; prompts seen fewer than `min_count` times use the batch's statistics."""
    r = rewards.float()
    adv = (r - r.mean()) / (r.std(unbiased=False) + eps)
    for p in set(prompts):
        idx = torch.tensor([j for j, q in enumerate(prompts) if q == p])
        if len(idx) >= max(min_count, 2):  # one sample has no spread of its own
            group = r[idx]
            adv[idx] = (group - group.mean()) / (group.std(unbiased=False) + eps)
    return adv


@torch.no_grad()
def rollout(sampler: Sampler, batch: Batch, rollout_id: int) -> Rollout:
    """Sample with η > 0 under no_grad, recording each step's transition and log-probability."""
    schedule, eta = sampler.schedule, sampler.eta
    cond = sampler.conditioning(batch.prompts)
    xs, xps, logps = [], [], []

    def record(i, x_t, out, x_prev):
        x0, eps = denoised(out, x_t, i, schedule)
        sigma = schedule.sigma(i, eta)
        if sigma == 0:  # a deterministic step (a flow's last): no action, no log-probability
            logps.append(torch.zeros(x_t.shape[0], device=x_t.device))
            xs.append(x_t)
            xps.append(x_prev)
            return
        logps.append(gaussian_log_prob(x_prev, step_mean(x0, eps, schedule.a_prev[i], schedule.s_prev[i], sigma), sigma))
        xs.append(x_t)
        xps.append(x_prev)

    x0 = sample_chain(sampler.denoiser(), batch.noise.draw(), schedule, cond, eta=eta,
                step_noise=lambda i: batch.noise.draw(), on_step=record)
    r = sampler.score(x0, batch.prompts, batch.frames).detach().float()
    # The rollout's own advantages; DDPO.prepare replaces them with those of the whole step.
    return Rollout(rollout_id, list(batch.prompts), cond, torch.stack(xs), torch.stack(xps), torch.stack(logps), r,
                   advantages(r, batch.prompts))


class DDPO:
    """The `ddpo` method: keeps the current rollout of each micro-batch between steps."""

    def __init__(self):
        self._rollouts: dict[int, Rollout] = {}
        self._new: set[int] = set()  # micro-batches whose rollout was sampled this step (reward queries)

    def prepare(self, sampler: Sampler, batches: list[Batch], cfg, accelerator=None) -> None:
        """Before a step's first micro-batch: if the rollout is due, sample every micro-batch of
        this process and set the advantages from the rewards of all processes."""
        rid = batches[0].step // cfg.ddpo_rollout_reuse
        if not any(self._fresh(b, rid) for b in batches):
            return
        # Resuming in the middle of a reused rollout samples a new one here.
        rollouts = [rollout(sampler, b, rid) for b in batches]
        rewards = torch.cat([ro.rewards for ro in rollouts])
        prompts = [p for ro in rollouts for p in ro.prompts]
        first = 0
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            first = accelerator.process_index * len(prompts)  # gathered in process order
            prompts = gather_object(prompts)
            rewards = accelerator.gather(rewards)
        mine = sum(len(b.prompts) for b in batches)
        adv = advantages(rewards, prompts, cfg.ddpo_min_prompt_count)[first : first + mine]
        for b, ro in zip(batches, rollouts):
            ro.advantages, adv = adv[: len(ro.prompts)].to(ro.rewards.device), adv[len(ro.prompts) :]
            self._rollouts[b.micro] = ro
        self._new = {b.micro for b in batches}

    def _fresh(self, batch: Batch, rid: int) -> bool:
        ro = self._rollouts.get(batch.micro)
        return ro is None or ro.rollout_id != rid

    def __call__(self, sampler: Sampler, batch: Batch, cfg) -> MethodOutput:
        rid = batch.step // cfg.ddpo_rollout_reuse
        if self._fresh(batch, rid):  # called without `prepare` (one micro-batch, one process)
            self.prepare(sampler, [batch], cfg)
        ro = self._rollouts[batch.micro]
        fresh = batch.micro in self._new
        self._new.discard(batch.micro)
        # Only stochastic steps are actions with a log-probability.
        actions = [i for i in range(len(sampler.schedule)) if sampler.schedule.sigma(i, sampler.eta) > 0]
        n = max(1, round(cfg.ddpo_timestep_fraction * len(actions)))
        picked = batch.step_rng.choice(len(actions), size=n, replace=False) if n < len(actions) else range(n)
        steps = sorted(actions[j] for j in picked)
        adv = ro.advantages.clamp(-cfg.ddpo_adv_clip, cfg.ddpo_adv_clip)
        denoise = sampler.denoiser()
        losses, kls, clipped = [], [], []
        checkpointed = sampler.checkpointed(range(len(steps)))
        for j, i in enumerate(steps):
            out, x0, eps = model_step(denoise, ro.latents[i], i, sampler.schedule, ro.cond, j in checkpointed)
            s = sampler.schedule
            sigma = s.sigma(i, sampler.eta)
            logp = gaussian_log_prob(ro.next_latents[i], step_mean(x0, eps, s.a_prev[i], s.s_prev[i], sigma), sigma)
            ratio = torch.exp(logp - ro.log_probs[i])
            surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.ddpo_clip, 1 + cfg.ddpo_clip))
            losses.append(surrogate.mean())
            kls.append(float(0.5 * (logp - ro.log_probs[i]).detach().square().mean()))
            clipped.append(float(((ratio.detach() - 1).abs() > cfg.ddpo_clip).float().mean()))
        stats = {"approx_kl": float(np.mean(kls)), "clipfrac": float(np.mean(clipped))}
        return MethodOutput(torch.stack(losses).mean(), ro.rewards, len(ro.prompts) if fresh else 0, stats)
