"""Two newer gradient windows on the same loop: Direct-Align (SRPO) and DRTune.

| method       | gradient window                                                          |
| ------------ | ------------------------------------------------------------------------ |
| direct-align | x_0 sampled under no_grad, noised with known ε to a level drawn from a   |
|              | range; one gradient step, then x_0 recovered with that ε (Shen et al.)   |
| drtune       | K evenly spaced steps carry gradient, each with its input detached, so   |
|              | the gradient reaches every one of them without chaining through the      |
|              | others' denoiser calls (Wu et al. 2024)                                  |

Their descriptions (window, costs, checks) are in `draft.methods.METHODS` with the others'.
"""

from __future__ import annotations

import torch

from draft.methods import Batch, MethodOutput, Sampler, _finish
from draft.sampling import Schedule, denoised, model_step, recover_x0, renoise, sampler_step


def direct_align(sampler: Sampler, batch: Batch, cfg) -> MethodOutput:
    """Direct-Align (SRPO, Shen et al. 2025, arXiv 2509.06942): the noise is known, so
    most of the way back to x_0 needs no model.

    x_0 is sampled under no_grad and noised, x_t = a_t·x_0 + s_t·ε, at the sampling step
    whose noise level is nearest a σ drawn from `direct_align_sigmas` once per optimizer
    step (the same on every micro-batch and process, as ReFL's stop step). One deterministic
    sampler step with gradient takes x_t to x_t' = a_t'·x̂_0 + s_t'·ε̂, and
    x_0 ≈ (x_t' - s_t'·ε)/a_t' undoes the rest of the noise with the injected ε itself,
    = x̂_0 + (s_t'/a_t')·(ε̂ - ε). SRPO's released script steps a stretch of its σ grid
    before recovering; here the step is the sampler's own, so the model is only asked at
    the timesteps it samples with. SRPO's inversion branch (a negative reward on a noised,
    not denoised, step) is not implemented. The default range, [0.2, 0.9], is that of SRPO's
    released Qwen-Image script (`--train_timestep 5 40` on its 50-step σ grid, shift 1).
    """
    lo, hi = cfg.direct_align_sigmas
    sch, cond = sampler.schedule, sampler.conditioning(batch.prompts)
    i = nearest_step(sch, float(batch.step_rng.uniform(lo, hi)))
    x0 = sampler.run_no_grad(batch.noise.draw(), cond, batch.noise)
    eps = batch.noise.draw()
    x_t = renoise(x0, sch.a[i], sch.s[i], eps)
    denoise = sampler.denoiser()
    out, x0_hat, eps_hat = model_step(denoise, x_t, i, sch, cond)
    x_next = sampler_step(x0_hat, eps_hat, sch.a_prev[i], sch.s_prev[i])
    x0_da = recover_x0(x_next, sch.a_prev[i], sch.s_prev[i], eps)
    penalty = [sampler._drift(denoise, x_t, i, cond, out)] if sampler.kl_coeff > 0 else []
    return _finish(sampler, sampler.score(x0_da, batch.prompts, batch.frames), penalty, {"noise_step": i})


def nearest_step(schedule: Schedule, sigma: float) -> int:
    """The step whose noise level s/(a + s) is nearest σ. That ratio is rectified flow's σ
    itself, and for DDIM the σ of the same latent rescaled by 1/(a + s), so one range means
    the same noise on both."""
    levels = [s / (a + s) for a, s in zip(schedule.a, schedule.s)]
    return min(range(len(levels)), key=lambda i: abs(levels[i] - sigma))


def drtune_steps(T: int, k: int, rng) -> list[int]:
    """K of the T steps, evenly spaced (stride T // K) at a phase drawn once per optimizer step."""
    stride = T // k
    start = int(rng.integers(0, T - stride * (k - 1)))
    return [start + j * stride for j in range(k)]


def drtune(sampler: Sampler, batch: Batch, cfg) -> MethodOutput:
    """DRTune (Wu et al., ECCV 2024, "Deep Reward Supervision for Fine-tuning Diffusion
    Models"): the denoiser's input is detached at every step, so the reward's gradient
    reaches each trained step's output along the sampler's own update (x_{i+1} is linear in
    x_i and the model output) but never back through a later denoiser call, the deep chain
    through which the paper finds full backpropagation's gradient for early steps degrades. Only `drtune_k` evenly spaced steps run the denoiser with gradient; the
    rest run it under no_grad while their update still carries the gradient of x_i.
    """
    sch = sampler.schedule
    T = len(sch)
    train = drtune_steps(T, cfg.drtune_k, batch.step_rng)
    cond = sampler.conditioning(batch.prompts)
    x = sampler.run_no_grad(batch.noise.draw(), cond, batch.noise, steps=range(0, train[0]))
    denoise = sampler.denoiser()
    # The last `keep_graphs` trained steps keep their graphs (checkpointing=auto), the rest are checkpointed.
    checkpointed = set(train[: max(0, len(train) - sampler.keep_graphs)]) if sampler.use_checkpoint else set()
    penalty: list = []
    for i in range(train[0], T):
        with torch.set_grad_enabled(i in train and torch.is_grad_enabled()):
            out, _, _ = model_step(denoise, x.detach(), i, sch, cond, use_checkpoint=i in checkpointed)
        if i in train and sampler.kl_coeff > 0:
            penalty.append(sampler._drift(denoise, x, i, cond, out))
        x0, eps = denoised(out, x, i, sch)  # x, not its detached copy: the update's own path
        sigma = sch.sigma(i, sampler.eta)
        x = sampler_step(x0, eps, sch.a_prev[i], sch.s_prev[i], sigma, batch.noise.draw() if sigma > 0 else None)
    return _finish(sampler, sampler.score(x, batch.prompts, batch.frames), penalty, {"first_trained_step": train[0]})
