"""A differentiable sampler (DDIM, and Euler for rectified flow) with an explicit gradient window.

Every off-the-shelf sampler (the diffusers pipelines included) runs under `no_grad`, so
reward fine-tuning needs its own loop. This one keeps the scheduler math in small pure
functions and takes the gradient window as an argument: steps outside it run under
`no_grad` and keep no graph; steps inside it carry gradient, each wrapped in
`torch.utils.checkpoint` when checkpointing is on, so memory stays flat in the number of
steps. Noise is always passed in, so a run can be repeated and DRaFT-LV can redo the last
step with fresh noise.

Notation (DDIM, Song et al. 2021, eq. 12; DRaFT, Clark et al. 2024, alg. 1):

    i         step index, 0 .. T-1 (T = number of sampling steps)
    t_i       diffusion time of step i, descending (DDIM: ~1000 towards 0; flow: 1000·σ)
    a_t, s_t  signal and noise levels: x_t = a_t·x_0 + s_t·ε
    x_t       latent at time t;  x_T ~ N(0, I) is the initial noise
    ε̂, x̂_0    predicted noise and predicted clean latent at the current step
    σ         the step's own noise; η = 0 makes sampling deterministic
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

# A denoiser maps (x_t, t, conditioning) to the raw model output (ε, v or x_0, as the
# model's prediction type says). Guidance and adapters are thin wrappers around it.
Denoiser = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


# --- scheduler math: pure functions ------------------------------------------------------
#
# Both families write the noisy latent as x_t = a_t·x_0 + s_t·ε:
#   variance-preserving DDPM/DDIM (SD 1.x/2.x, SDXL):  a_t = sqrt(ᾱ_t),  s_t = sqrt(1 - ᾱ_t)
#   rectified flow (SD3, FLUX):                       a_t = 1 - σ_t,    s_t = σ_t
# so one deterministic step, x_prev = a_prev·x̂_0 + s_prev·ε̂, is DDIM for the first and the
# Euler step x + (σ_prev - σ)·v for the second.


def predict_x0_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, a: float, s: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from the model output at x_t = a·x_0 + s·ε, for each prediction type."""
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - s * eps) / a
    elif prediction_type == "v_prediction":  # v = a·ε - s·x_0 (Salimans & Ho 2022), a² + s² = 1
        x0 = a * x_t - s * model_output
        eps = a * model_output + s * x_t
    elif prediction_type == "flow":  # velocity v = ε - x_0 (rectified flow), a + s = 1
        x0 = x_t - s * model_output
        eps = x_t + a * model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - a * x0) / s
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    return x0, eps


def step_sigma(a: float, s: float, a_prev: float, s_prev: float, eta: float) -> float:
    """σ(η) = η · s_prev · sqrt(1 - (a·s_prev / (a_prev·s))²): DDIM's step noise (eq. 16).

    For a² + s² = 1 this is DDIM's η·sqrt((1-ᾱ_prev)/(1-ᾱ_t))·sqrt(1-ᾱ_t/ᾱ_prev). DDIM's
    derivation needs only Gaussian marginals x_t = a·x_0 + s·ε, so the same family of
    samplers (η = 0 deterministic, η > 0 stochastic with the same marginals) serves
    rectified flow too, which is what lets DDPO run on a flow model.
    """
    if eta == 0 or s_prev == 0:
        return 0.0
    ratio = (a * s_prev) / (a_prev * s)
    return eta * s_prev * math.sqrt(max(1 - ratio**2, 0.0))


def step_mean(x0: torch.Tensor, eps: torch.Tensor, a_prev: float, s_prev: float, sigma: float = 0.0) -> torch.Tensor:
    """μ = a_prev·x̂_0 + sqrt(s_prev² - σ²)·ε̂: the mean of the step (DDIM eq. 12)."""
    return a_prev * x0 + math.sqrt(max(s_prev**2 - sigma**2, 0.0)) * eps


def sampler_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    a_prev: float,
    s_prev: float,
    sigma: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_prev = μ + σ·z   (DDIM eq. 12)."""
    x_prev = step_mean(x0, eps, a_prev, s_prev, sigma)
    if sigma > 0:
        if noise is None:
            raise ValueError("a stochastic step (eta > 0) needs its noise passed in")
        x_prev = x_prev + sigma * noise
    return x_prev


def gaussian_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x_prev; μ, σ²I) per sample, averaged over the latent's elements (as DDPO does)."""
    log_density = -((x_prev - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, x_prev.ndim)))


def renoise(x0: torch.Tensor, a: float, s: float, noise: torch.Tensor) -> torch.Tensor:
    """x_t = a·x_0 + s·ε: the forward process in one jump (DRaFT-LV)."""
    return a * x0 + s * noise


def recover_x0(x_t: torch.Tensor, a: float, s: float, noise: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - s·ε)/a: the forward process undone with its known noise ε (Direct-Align)."""
    return (x_t - s * noise) / a


# --- the schedule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """The T steps of one sampling run: step i goes from time t_i (levels a, s) to (a_prev, s_prev).

    Built from a diffusers scheduler config through that scheduler's own `set_timesteps`
    (`DDIMScheduler` for the DDPM family, `FlowMatchEulerDiscreteScheduler` for rectified
    flow), so the spacing, offsets, shifts and beta schedule are exactly the pipeline's.
    """

    timesteps: tuple[float, ...]  # t_i as the model takes it, descending (ints for DDIM)
    a: tuple[float, ...]  # signal level a_{t_i}
    s: tuple[float, ...]  # noise level s_{t_i}
    a_prev: tuple[float, ...]  # the levels step i lands on
    s_prev: tuple[float, ...]
    prediction_type: str = "epsilon"
    clip_sample: float | None = None  # clamp x̂_0 to ±this, as DDIM's `clip_sample` does

    def __len__(self) -> int:
        return len(self.timesteps)

    def sigma(self, i: int, eta: float) -> float:
        """The step noise of step i at stochasticity η."""
        return step_sigma(self.a[i], self.s[i], self.a_prev[i], self.s_prev[i], eta)

    @classmethod
    def from_scheduler_config(cls, config, num_steps: int, *, sigmas=None, mu: float | None = None) -> "Schedule":
        """The schedule a pipeline with this scheduler would sample with.

        `sigmas` and `mu` are passed to a flow scheduler's `set_timesteps` as the flow
        pipelines pass them (FLUX: a linear sigma grid and the resolution-dependent shift).
        """
        name = str(config.get("_class_name", ""))
        if config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas", False):
            return cls._flow_multistep(config, num_steps)
        # A config built in code has no _class_name; a flow scheduler's is known by its shift.
        if "FlowMatch" in name or (not name and "shift" in config and "beta_start" not in config):
            return cls._flow(config, num_steps, sigmas, mu)
        if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction type {config.get('prediction_type')!r} of {name or 'the scheduler'} is not "
                             "one the sampler implements (epsilon, v_prediction, sample, flow)")
        if "beta_start" not in config and "trained_betas" not in config:
            raise ValueError(f"{name or 'the scheduler'} has no beta schedule or flow shift the sampler can use")
        return cls._ddim(config, num_steps)

    @classmethod
    def _ddim(cls, config, num_steps: int) -> "Schedule":
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(config)
        if ddim.config.thresholding:
            raise ValueError("dynamic thresholding is not supported by the differentiable sampler")
        ddim.set_timesteps(num_steps)
        ac = ddim.alphas_cumprod.double()
        ts = [int(t) for t in ddim.timesteps]
        # The level a step lands on, computed exactly as DDIMScheduler.step does.
        stride = ddim.config.num_train_timesteps // num_steps
        bar = [float(ac[t]) for t in ts]
        prev = [float(ac[t - stride]) if t - stride >= 0 else float(ddim.final_alpha_cumprod) for t in ts]
        clip = ddim.config.clip_sample_range if ddim.config.clip_sample else None
        a, s = [math.sqrt(b) for b in bar], [math.sqrt(1 - b) for b in bar]
        a_prev, s_prev = [math.sqrt(b) for b in prev], [math.sqrt(1 - b) for b in prev]
        return cls(tuple(ts), tuple(a), tuple(s), tuple(a_prev), tuple(s_prev), ddim.config.prediction_type, clip)

    @classmethod
    def _flow_multistep(cls, config, num_steps: int) -> "Schedule":
        """A multistep solver configured for flow matching (Wan ships UniPC so), sampled here
        with first-order Euler steps on its own sigmas and timesteps: its `set_timesteps`
        builds them (a linear grid shifted by `flow_shift`; timesteps int(1000 σ), as the
        pipeline passes them to the model). The samples differ from the pipeline's by the
        solver's order only."""
        import diffusers

        name = str(config.get("_class_name") or "UniPCMultistepScheduler")
        if not hasattr(diffusers, name):
            raise ValueError(f"unknown scheduler {name}")
        scheduler = getattr(diffusers, name).from_config(config)
        if config.get("prediction_type") != "flow_prediction" or not scheduler.config.get("use_flow_sigmas", False):
            raise ValueError(f"{name} with prediction type {config.get('prediction_type')!r} and use_flow_sigmas="
                             f"{config.get('use_flow_sigmas')} is not a flow-matching schedule the sampler implements")
        scheduler.set_timesteps(num_steps)
        sig = [float(x) for x in scheduler.sigmas]  # T + 1 values, the last the terminal 0
        a = tuple(1 - x for x in sig)
        return cls(tuple(int(t) for t in scheduler.timesteps), a[:-1], tuple(sig[:-1]), a[1:], tuple(sig[1:]), "flow")

    @classmethod
    def _flow(cls, config, num_steps: int, sigmas, mu) -> "Schedule":
        from diffusers import FlowMatchEulerDiscreteScheduler

        flow = FlowMatchEulerDiscreteScheduler.from_config(config)
        if flow.config.stochastic_sampling:
            raise ValueError("stochastic_sampling flow schedulers are not supported; use sampling.eta instead")
        kwargs = {"mu": mu} if flow.config.use_dynamic_shifting else {}
        if flow.config.use_dynamic_shifting and mu is None:
            raise ValueError("this flow scheduler shifts by resolution: pass mu")
        flow.set_timesteps(num_steps, sigmas=None if sigmas is None else list(sigmas), **kwargs)
        sig = [float(x) for x in flow.sigmas]  # T + 1 values, the last one the terminal level
        ts = tuple(float(t) for t in flow.timesteps)
        a = tuple(1 - x for x in sig)
        return cls(ts, a[:-1], tuple(sig[:-1]), a[1:], tuple(sig[1:]), "flow", None)


# --- noise ---------------------------------------------------------------------------------


class SampleNoise:
    """Per-sample random streams: every image's noise comes from its own seed, and only there.

    Sample j's stream is a CPU generator seeded with seeds[j]; its first draw is x_T, the
    next ones the noise of stochastic steps (η > 0) and DRaFT-LV's re-noising. Training
    seeds it from (seed, step, j) and `draft sample`/`draft eval` from the image's seed, so
    a batch of B, two micro-batches of B/2 and two processes see the same noise for the
    same sample, on any device.
    """

    def __init__(self, seeds, shape: tuple[int, ...], device):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape = tuple(shape)
        self.device = device

    def draw(self) -> torch.Tensor:
        """The next [B, *shape] standard normal draw, one row per sample's stream."""
        rows = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)


# --- the loop -------------------------------------------------------------------------------


def cfg(out_u: torch.Tensor, out_c: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ε̃ = ε_u + s·(ε_c - ε_u)."""
    return out_u + scale * (out_c - out_u)


def guided(denoise: Denoiser, scale: float | Callable[[torch.Tensor], float], combine: Callable = cfg,
           gradient: str = "both") -> Denoiser:
    """Guidance around a denoiser: both passes in one batched call, combined by `combine`
    (classifier-free guidance unless the model has its own rule, `DiffusionModel.guide`).

    The conditioning is a pair (cond, uncond) of batched prompt encodings; with s = 1, or
    when the model takes guidance as an input rather than by two passes (FLUX.1-dev's
    guidance embedding: its adapter returns uncond = None), the unconditional pass is skipped.
    `scale` may be a function of t (Wan 2.2: each expert has its own). `gradient="cond"`
    runs the unconditional pass under no_grad, as UniRL's ReFL does, so the gradient flows
    through the conditional branch only and that pass keeps no graph; the two passes are
    then two calls, since one batched call cannot carry gradient for half its batch.
    """

    def denoise_guided(x, t, cond):
        c, u = cond
        s = scale(t) if callable(scale) else scale
        if s == 1.0 or u is None:
            return denoise(x, t, c)
        if gradient == "cond" and torch.is_grad_enabled():
            with torch.no_grad():
                out_u = denoise(x, t, u)
            return combine(out_u, denoise(x, t, c), s)
        out_u, out_c = denoise(torch.cat([x, x]), t, _cat(u, c)).chunk(2)
        return combine(out_u, out_c, s)

    return denoise_guided


def _cat(a, b):
    """Concatenate two conditionings (tensors, or dicts of tensors) along the batch."""
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


class _Recomputed(torch.autograd.Function):
    """A checkpointed denoiser call whose first pass builds no graph at all.

    `torch.utils.checkpoint` runs the forward with autograd on (it only drops the saved
    activations), which costs about a third more than a gradient-free call on shapes-sd
    and keeps the LoRA's extra products in it. Here the forward runs under no_grad, so the
    caller may fold the LoRA into the weights for it (`Loop.run`), and the backward
    recomputes the call with gradient w.r.t. x and `params` (the trainable tensors the
    denoiser closes over; the conditioning gets none). Same values and gradients as
    checkpointing, up to the rounding of merged weights.
    """

    @staticmethod
    def forward(ctx, denoise, t, cond, x, *params):
        ctx.denoise, ctx.t, ctx.cond = denoise, t, cond
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x, *params)
        return denoise(x, t, cond)

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        need_x, need_p = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        dev, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            x = x.detach().requires_grad_(need_x)
            out = ctx.denoise(x, ctx.t, ctx.cond)
        wanted = ([x] if need_x else []) + [p for p, need in zip(params, need_p) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        return None, None, None, next(grads) if need_x else None, *(next(grads) if n else None for n in need_p)


def model_step(
    denoise: Denoiser, x: torch.Tensor, i: int, schedule: Schedule, cond, use_checkpoint: bool = False,
    params: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One model evaluation at step i: (raw model output, x̂_0, ε̂).

    With `use_checkpoint` and `params` (the trainable tensors), the forward runs without
    gradient and the backward recomputes it (`_Recomputed`); with `use_checkpoint` alone,
    through `torch.utils.checkpoint`.
    """
    t = torch.tensor(schedule.timesteps[i], device=x.device)  # long for DDIM, float32 for flow
    if use_checkpoint and params is not None and torch.is_grad_enabled():
        out = _Recomputed.apply(denoise, t, cond, x, *params)
    elif use_checkpoint:
        # Keep only x for the backward pass and recompute the denoiser's activations there.
        out = checkpoint(denoise, x, t, cond, use_reentrant=False)
    else:
        out = denoise(x, t, cond)
    out = out.to(x.dtype)
    return (out, *denoised(out, x, i, schedule))


def denoised(out: torch.Tensor, x: torch.Tensor, i: int, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) at step i from the model output, with DDIM's optional clipping of x̂_0."""
    x0, eps = predict_x0_eps(out, x, schedule.a[i], schedule.s[i], schedule.prediction_type)
    if schedule.clip_sample is not None:
        x0 = x0.clamp(-schedule.clip_sample, schedule.clip_sample)
        # DDIM re-derives ε̂ from the clipped x̂_0 only with use_clipped_model_output; the
        # pipelines do not, and neither do we.
    return x0, eps


def sample_chain(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    cond,
    *,
    steps: range | None = None,
    grad_steps: range = range(0),
    use_checkpoint: bool | Container[int] = False,
    eta: float = 0.0,
    step_noise: Callable[[int], torch.Tensor] | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    params: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run DDIM steps `steps` (default: all T) from x and return the final latent.

    Steps in `grad_steps` carry gradient, each under checkpointing if `use_checkpoint` is
    True or, given a set of steps, if it is among them (the others keep their graphs);
    the others run under `no_grad`, so the latent entering the window is a constant. With
    eta > 0, `step_noise(i)` returns the noise z (shaped like x) added at step i.
    `on_step(i, x_t, model_output, x_prev)` is called after each step outside any
    checkpoint (for logging, log-probabilities, or regularisers). `params`, with
    `use_checkpoint`, selects the cheaper checkpointing of `model_step`.
    """
    steps = range(len(schedule)) if steps is None else steps
    if eta > 0 and step_noise is None:
        raise ValueError("sampling with eta > 0 needs step_noise passed in")
    checkpointed = grad_steps if use_checkpoint is True else (use_checkpoint or ())
    for i in steps:
        with torch.set_grad_enabled(i in grad_steps and torch.is_grad_enabled()):
            out, x0, eps = model_step(denoise, x, i, schedule, cond, i in grad_steps and i in checkpointed, params)
            sigma = schedule.sigma(i, eta)
            noise = step_noise(i) if sigma > 0 else None
            x_prev = sampler_step(x0, eps, schedule.a_prev[i], schedule.s_prev[i], sigma, noise)
        if on_step is not None:
            on_step(i, x, out, x_prev)
        x = x_prev
    return x
