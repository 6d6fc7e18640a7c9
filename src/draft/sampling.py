"""A differentiable DDIM sampler with an explicit gradient window.

Every off-the-shelf sampler (the diffusers pipelines included) runs under `no_grad`, so
reward fine-tuning needs its own loop. This one keeps the scheduler math in small pure
functions and takes the gradient window as an argument: steps outside it run under
`no_grad` and keep no graph; steps inside it carry gradient, each wrapped in
`torch.utils.checkpoint` when checkpointing is on, so memory stays flat in the number of
steps. Noise is always passed in, so a run can be repeated and DRaFT-LV can redo the last
step with fresh noise.

Notation (DDIM, Song et al. 2021, eq. 12; DRaFT, Clark et al. 2024, alg. 1):

    i         step index, 0 .. T-1 (T = number of sampling steps)
    t_i       diffusion time of step i, descending from ~1000 towards 0
    ᾱ_t       cumulative signal level (`alphas_cumprod`) at time t
    x_t       latent at time t;  x_T ~ N(0, I) is the initial noise
    ε̂, x̂_0    predicted noise and predicted clean latent at the current step
    σ_t       DDIM step noise; η = 0 makes sampling deterministic
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

# A denoiser maps (x_t, t, conditioning) to the raw model output (ε, v or x_0, as the
# model's prediction type says). Guidance and adapters are thin wrappers around it.
Denoiser = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


# --- scheduler math: pure functions ------------------------------------------------------


def predict_x0_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from the model output at x_t, for each prediction type diffusers knows."""
    a, s = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - s * eps) / a
    elif prediction_type == "v_prediction":  # v = a·ε - s·x_0 (Salimans & Ho 2022)
        x0 = a * x_t - s * model_output
        eps = a * model_output + s * x_t
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - a * x0) / s
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    return x0, eps


def ddim_sigma(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """σ_t(η) = η · sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) · sqrt(1 - ᾱ_t / ᾱ_prev)   (DDIM eq. 16)."""
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    return eta * math.sqrt(max(variance, 0.0))


def ddim_mean(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_prev: float, sigma: float = 0.0) -> torch.Tensor:
    """μ = sqrt(ᾱ_prev)·x̂_0 + sqrt(1 - ᾱ_prev - σ²)·ε̂: the mean of the DDIM step (eq. 12)."""
    return math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev - sigma**2) * eps


def ddim_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_prev: float,
    sigma: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_prev = μ + σ·z   (DDIM eq. 12)."""
    x_prev = ddim_mean(x0, eps, alpha_bar_prev, sigma)
    if sigma > 0:
        if noise is None:
            raise ValueError("a stochastic DDIM step (eta > 0) needs its noise passed in")
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x_prev; μ, σ²I) per sample, averaged over the latent's elements (as DDPO does)."""
    log_density = -((x_prev - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, x_prev.ndim)))


def renoise(x0: torch.Tensor, alpha_bar_t: float, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 - ᾱ_t)·ε: the forward process in one jump (DRaFT-LV)."""
    return math.sqrt(alpha_bar_t) * x0 + math.sqrt(1 - alpha_bar_t) * noise


# --- the schedule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """The T steps of one sampling run: step i goes from time t_i (level ᾱ_t) to ᾱ_prev.

    Built from a diffusers scheduler config through `DDIMScheduler.set_timesteps`, so the
    timestep spacing, offsets and beta schedule are exactly the pipeline's.
    """

    timesteps: tuple[int, ...]  # t_i for i = 0 .. T-1, descending
    alpha_bar: tuple[float, ...]  # ᾱ_{t_i}
    alpha_bar_prev: tuple[float, ...]  # the level step i lands on
    prediction_type: str = "epsilon"
    clip_sample: float | None = None  # clamp x̂_0 to ±this, as DDIM's `clip_sample` does

    def __len__(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_scheduler_config(cls, config, num_steps: int) -> "Schedule":
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(config)
        if ddim.config.thresholding:
            raise ValueError("dynamic thresholding is not supported by the differentiable sampler")
        ddim.set_timesteps(num_steps)
        ac = ddim.alphas_cumprod.double()
        ts = [int(t) for t in ddim.timesteps]
        # The level a step lands on, computed exactly as DDIMScheduler.step does.
        stride = ddim.config.num_train_timesteps // num_steps
        prev = [float(ac[t - stride]) if t - stride >= 0 else float(ddim.final_alpha_cumprod) for t in ts]
        clip = ddim.config.clip_sample_range if ddim.config.clip_sample else None
        return cls(tuple(ts), tuple(float(ac[t]) for t in ts), tuple(prev), ddim.config.prediction_type, clip)


# --- the loop -------------------------------------------------------------------------------


def guided(denoise: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance: ε̃ = ε_u + s·(ε_c - ε_u), one batched call for both.

    The conditioning is a pair (cond, uncond) of batched prompt encodings; with s = 1 the
    unconditional pass is skipped.
    """

    def denoise_cfg(x, t, cond):
        c, u = cond
        if scale == 1.0:
            return denoise(x, t, c)
        out_u, out_c = denoise(torch.cat([x, x]), t, _cat(u, c)).chunk(2)
        return out_u + scale * (out_c - out_u)

    return denoise_cfg


def _cat(a, b):
    """Concatenate two conditionings (tensors, or dicts of tensors) along the batch."""
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


def model_step(
    denoise: Denoiser, x: torch.Tensor, i: int, schedule: Schedule, cond, use_checkpoint: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One model evaluation at step i: (raw model output, x̂_0, ε̂)."""
    t = torch.tensor(schedule.timesteps[i], device=x.device)
    if use_checkpoint:
        # Keep only x for the backward pass and recompute the denoiser's activations there.
        out = checkpoint(denoise, x, t, cond, use_reentrant=False)
    else:
        out = denoise(x, t, cond)
    out = out.to(x.dtype)
    return (out, *denoised(out, x, i, schedule))


def denoised(out: torch.Tensor, x: torch.Tensor, i: int, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) at step i from the model output, with DDIM's optional clipping of x̂_0."""
    x0, eps = predict_x0_eps(out, x, schedule.alpha_bar[i], schedule.prediction_type)
    if schedule.clip_sample is not None:
        x0 = x0.clamp(-schedule.clip_sample, schedule.clip_sample)
        # DDIM re-derives ε̂ from the clipped x̂_0 only with use_clipped_model_output; the
        # pipelines do not, and neither do we.
    return x0, eps


def sample(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    cond,
    *,
    steps: range | None = None,
    grad_steps: range = range(0),
    use_checkpoint: bool = False,
    eta: float = 0.0,
    step_noise: Callable[[int], torch.Tensor] | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run DDIM steps `steps` (default: all T) from x and return the final latent.

    Steps in `grad_steps` carry gradient (each under checkpointing if `use_checkpoint`);
    the others run under `no_grad`, so the latent entering the window is a constant. With
    eta > 0, `step_noise(i)` returns the noise z (shaped like x) added at step i.
    `on_step(i, x_t, model_output, x_prev)` is called after each step outside any
    checkpoint (for logging, log-probabilities, or regularisers).
    """
    steps = range(len(schedule)) if steps is None else steps
    if eta > 0 and step_noise is None:
        raise ValueError("sampling with eta > 0 needs step_noise passed in")
    for i in steps:
        with torch.set_grad_enabled(i in grad_steps and torch.is_grad_enabled()):
            out, x0, eps = model_step(denoise, x, i, schedule, cond, use_checkpoint and i in grad_steps)
            sigma = ddim_sigma(schedule.alpha_bar[i], schedule.alpha_bar_prev[i], eta)
            x_prev = ddim_step(x0, eps, schedule.alpha_bar_prev[i], sigma, step_noise(i) if sigma > 0 else None)
        if on_step is not None:
            on_step(i, x, out, x_prev)
        x = x_prev
    return x
