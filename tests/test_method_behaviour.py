"""What AlignProp, ReFL and stochastic sampling (η > 0) do, step by step, not just their shapes.

AlignProp's released code drew its truncation inside the sampling loop (AlignProp issue
#15) and TRL's port kept the bug because its test only checked shapes. These tests count
which denoiser calls carry gradient, through the trainer's own batch construction for
several steps, micro-batches and processes.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from draft.config import LoraConfig, SamplingConfig, TrainConfig
from draft.lora import add_lora
from draft.methods import METHODS, Batch, Sampler, SampleNoise
from draft.rewards import FunctionReward
from draft.plan import micro_batch
from draft.sampling import Schedule, denoised, guided, model_step, renoise, sampler_step

T = 6


class Calls:
    """Wraps the model's denoise: the timestep of each call and whether its output carries gradient."""

    def __init__(self, model):
        self.inner, self.log, self.sizes = model.denoise, [], []
        model.denoise = self

    def __call__(self, x, t, cond):
        out = self.inner(x, t, cond)
        self.log.append((int(t), out.requires_grad))
        self.sizes.append((x.shape[0], out.requires_grad))
        return out

    def take(self) -> tuple[list[int], list[int]]:
        """(timesteps of the calls with gradient, timesteps of those without), then forget them."""
        grad = [t for t, g in self.log if g]
        plain = [t for t, g in self.log if not g]
        self.log = []
        return grad, plain


@pytest.fixture
def adapted(tiny_model):
    add_lora(tiny_model, LoraConfig(rank=2, target_modules=("to_q", "to_v")))
    schedule = Schedule.from_scheduler_config(tiny_model.scheduler_config, T)
    reward = FunctionReward(lambda images, prompts: images.mean((1, 2, 3)), "brightness")
    # Guidance 1: one denoiser call per sampling step, so calls count steps.
    loop = Sampler(tiny_model, reward, schedule, guidance_scale=1.0, use_checkpoint=False)
    return tiny_model, loop, Calls(tiny_model)


def trainer_batch(cfg: TrainConfig, model, step: int, micro: int, process: int, processes: int) -> Batch:
    """The batch the trainer gives process `process` of `processes` for (step, micro) (`draft.plan`)."""
    return micro_batch(cfg.seed, step, micro, process, processes, cfg.batch_size, cfg.grad_accum,
                       ["a red circle", "a blue star"], model.latent_shape(), "cpu")


@pytest.mark.parametrize("method, extra", [("draft", {}), ("draft-k", {"k": 2}), ("draft-lv", {"lv_n": 3}),
                                           ("draft-lv", {"lv_n": 2, "lv_step": 3}),
                                           ("alignprop", {"alignprop_k_min": 3, "alignprop_k_max": 3}),
                                           ("refl", {"refl_min_step": 2, "refl_max_step": 2}),
                                           ("direct-align", {}), ("drtune", {"drtune_k": 2}),
                                           ("drtune", {"drtune_k": T})])
def test_each_method_costs_what_its_description_says(adapted, method, extra):
    """`draft.methods.METHODS` describes each method once; the estimate, the card and the
    start-up lines read it. Here its denoiser calls are counted against a real step."""
    model, loop, calls = adapted
    cfg = TrainConfig(method=method, batch_size=2, sampling=SamplingConfig(num_steps=T, eta=0.0), kl_coeff=0.0,
                      **extra)
    info = METHODS[method]
    out = info(loop, trainer_batch(cfg, model, 0, 0, 0, 1), cfg)
    free = sum(n for n, g in calls.sizes if not g) / cfg.batch_size
    grad = sum(n for n, g in calls.sizes if g) / cfg.batch_size
    assert (free, grad) == info.calls(cfg)
    assert sum(1 for _, g in calls.sizes if g) == info.grad_steps(cfg)  # steps carrying gradient, batched
    assert out.queries == cfg.batch_size * info.passes(cfg) == out.rewards.numel()


def test_alignprop_draws_k_once_per_step_alike_everywhere_and_exactly_k_calls_carry_gradient(adapted):
    model, loop, calls = adapted
    cfg = TrainConfig(method="alignprop", alignprop_k_min=1, alignprop_k_max=T - 1, batch_size=1, grad_accum=2,
                      sampling=SamplingConfig(num_steps=T), kl_coeff=0.0)
    ks = []
    for step in range(8):
        seen = set()
        for micro in range(2):
            for process in range(2):
                out = METHODS["alignprop"](loop, trainer_batch(cfg, model, step, micro, process, 2), cfg)
                k = out.stats["k"]
                grad, plain = calls.take()
                # exactly the last k steps carry gradient, the first T - k run without
                assert grad == list(loop.schedule.timesteps[T - k :]), (step, k, grad)
                assert plain == list(loop.schedule.timesteps[: T - k])
                assert out.loss.requires_grad
                seen.add(k)
        assert len(seen) == 1, f"step {step}: K differs between micro-batches or processes: {seen}"
        ks.append(seen.pop())
    assert all(1 <= k <= T - 1 for k in ks)
    assert len(set(ks)) >= 3, ks  # drawn afresh each optimizer step


def test_refl_stops_inside_its_range_with_one_gradient_call(adapted):
    model, loop, calls = adapted
    cfg = TrainConfig(method="refl", refl_min_step=2, refl_max_step=4, batch_size=1, kl_coeff=0.0,
                      sampling=SamplingConfig(num_steps=T))
    stops = []
    for step in range(10):
        out = METHODS["refl"](loop, trainer_batch(cfg, model, step, 0, 0, 1), cfg)
        s = out.stats["stop_step"]
        grad, plain = calls.take()
        assert 2 <= s <= 4
        assert grad == [loop.schedule.timesteps[s]]  # one gradient call, at the stop step
        assert plain == list(loop.schedule.timesteps[:s])  # sampled there without gradient, no further
        stops.append(s)
        out.loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters() if p.requires_grad)
        model.unet.zero_grad(set_to_none=True)
    assert set(stops) == {2, 3, 4}, stops


def test_refl_with_the_draft_plus_term_still_has_one_gradient_call(adapted):
    model, loop, calls = adapted
    loop.kl_coeff = 0.1
    cfg = TrainConfig(method="refl", refl_min_step=3, refl_max_step=3, batch_size=1,
                      sampling=SamplingConfig(num_steps=T))
    out = METHODS["refl"](loop, trainer_batch(cfg, model, 0, 0, 0, 1), cfg)
    grad, plain = calls.take()
    # the base model's prediction for the penalty runs without gradient
    assert grad == [loop.schedule.timesteps[3]] and len(plain) == 4
    assert "kl_penalty" in out.stats


def test_draft_lv_by_default_is_algorithm_3_bit_for_bit(adapted):
    """lv_step left at -1 is the paper's method: one gradient step from the last level, the
    same numbers as alg. 3 written out."""
    model, loop, calls = adapted
    cfg = TrainConfig(method="draft-lv", lv_n=2, batch_size=2, kl_coeff=0.0, sampling=SamplingConfig(num_steps=T))
    params = [p for p in model.unet.parameters() if p.requires_grad]
    out = METHODS["draft-lv"](loop, trainer_batch(cfg, model, 0, 0, 0, 1), cfg)
    grads = torch.autograd.grad(out.loss, params)
    batch, s = trainer_batch(cfg, model, 0, 0, 0, 1), loop.schedule
    cond = loop.conditioning(batch.prompts)
    x0 = loop.run_no_grad(batch.noise.draw(), cond, batch.noise)
    eps = torch.cat([batch.noise.draw(), batch.noise.draw()])
    x_t = renoise(torch.cat([x0, x0]), s.a[T - 1], s.s[T - 1], eps)
    _, x0_hat, eps_hat = model_step(loop.denoiser(), x_t, T - 1, s, tuple(None if c is None else torch.cat([c, c]) for c in cond))
    r = loop.score(sampler_step(x0_hat, eps_hat, s.a_prev[T - 1], s.s_prev[T - 1]), batch.prompts * 2)
    assert torch.equal(out.loss, -r.mean())
    for g, want in zip(grads, torch.autograd.grad(-r.mean(), params)):
        assert torch.equal(g, want)


def test_draft_lv_from_an_earlier_level_carries_gradient_through_the_steps_from_there(adapted):
    model, loop, calls = adapted
    cfg = TrainConfig(method="draft-lv", lv_n=2, lv_step=2, batch_size=1, kl_coeff=0.0,
                      sampling=SamplingConfig(num_steps=T))
    out = METHODS["draft-lv"](loop, trainer_batch(cfg, model, 0, 0, 0, 1), cfg)
    grad, plain = calls.take()
    assert grad == list(loop.schedule.timesteps[2:])  # from lv_step to the end, n copies per call
    assert plain == list(loop.schedule.timesteps)  # x_0 itself sampled without gradient
    assert [n for n, g in calls.sizes if g] == [2] * (T - 2)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters() if p.requires_grad)


# --- which guidance branches carry gradient (sampling.guidance_gradient) ---------------------------


def test_guidance_gradient_cond_flows_through_the_conditional_branch_only():
    w = torch.tensor([0.7, -0.4], dtype=torch.float64, requires_grad=True)
    seen = []

    def denoise(x, t, c):  # not linear in w, so the two branches' gradients differ
        out = torch.tanh(x * w[0] + c * w[1]) * w[1]
        seen.append(out)
        return out

    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(3, 2)
    c, u = torch.full((3, 2), 0.5, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    g_cond, = torch.autograd.grad(guided(denoise, 4.0, gradient="cond")(x, None, (c, u)).square().sum(), w)
    out_u, out_c = seen[0], seen[1]
    assert out_u.grad_fn is None and out_c.grad_fn is not None  # the unconditional pass keeps no graph
    # The same as guidance with the unconditional output held constant.
    held = out_u.detach() + 4.0 * (denoise(x, None, c) - out_u.detach())
    torch.testing.assert_close(g_cond, torch.autograd.grad(held.square().sum(), w)[0], rtol=0, atol=0)
    # `both` (the default) is guidance as before: one batched call, the gradient through both.
    both = guided(denoise, 4.0)(x, None, (c, u))
    assert torch.equal(both, guided(denoise, 4.0, gradient="both")(x, None, (c, u)))
    out_u, out_c = denoise(torch.cat([x, x]), None, torch.cat([u, c])).chunk(2)
    assert torch.equal(both, out_u + 4.0 * (out_c - out_u))
    g_both, = torch.autograd.grad(both.square().sum(), w)
    assert not torch.allclose(g_both, g_cond)


def test_guidance_gradient_cond_in_a_training_step(adapted):
    """With guidance on, `cond` gives the window's step one call with gradient for the
    conditional half and one without for the unconditional; the loss is the same."""
    model, loop, calls = adapted
    loop.guidance_scale = 3.0
    cfg = TrainConfig(method="draft-k", k=1, batch_size=2, kl_coeff=0.0, sampling=SamplingConfig(num_steps=T))
    params = [p for p in model.unet.parameters() if p.requires_grad]
    losses, grads = [], []
    for policy in ("both", "cond"):
        loop.guidance_gradient = policy
        calls.sizes = []
        out = METHODS["draft-k"](loop, trainer_batch(cfg, model, 0, 0, 0, 1), cfg)
        window = calls.sizes[T - 1:]
        assert window == ([(4, True)] if policy == "both" else [(2, False), (2, True)]), (policy, window)
        losses.append(out.loss.detach())
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(out.loss, params)]))
    torch.testing.assert_close(losses[0], losses[1])
    assert not torch.allclose(grads[0], grads[1])


# --- η > 0 inside the gradient window ------------------------------------------------------------

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)


class Toy(torch.nn.Module):
    """ε̂ = x·w - b in float64; decode shows the latent itself, so the reward sees x_0 exactly."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.9, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))

    def conditioning(self, prompts, guidance_scale=1.0, size=None, negative_prompt=""):
        c = torch.zeros(len(prompts), 1)
        return c, c

    def denoise(self, x, t, cond):
        return x.double() * self.w - self.b

    def guidance(self, scale, scale_2=None):
        return scale

    def guide(self, out_u, out_c, scale):
        return out_u + scale * (out_c - out_u)

    def decode(self, latents, frames=None, use_checkpoint=False):
        return latents.expand(-1, 3, -1, -1)


def toy_loop(eta: float, checkpointing: bool):
    toy = Toy()
    schedule = Schedule.from_scheduler_config(DDIMScheduler(**SD_BETAS).config, 5)
    seen = []

    def reward(images, prompts):
        seen.append(images.detach().clone())
        return -(images - 0.3).square().mean((1, 2, 3))  # not linear, so the gradient depends on the path

    # A bare callable: the toy's "images" are raw latents, outside the [0, 1] rewards check.
    loop = Sampler(toy, reward, schedule, guidance_scale=1.0, eta=eta,
                use_checkpoint=checkpointing, merge_lora=False)
    return toy, loop, seen


SEEDS = [11, 12, 13]


class Noise64(SampleNoise):
    """The samples' streams in float64, so finite differences are exact enough to compare."""

    def draw(self) -> torch.Tensor:
        return super().draw().double()


def toy_batch(seeds=SEEDS) -> Batch:
    import numpy as np

    return Batch(["p"] * len(seeds), Noise64(seeds, (1, 2, 2), "cpu"), np.random.default_rng(0))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_eta_inside_the_window_gives_the_true_gradient(checkpointing):
    """Autograd through stochastic steps equals central finite differences with the same noise.

    Full DRaFT (every step in the window), so the finite difference and the gradient see
    the same dependence on the parameters.
    """
    toy, loop, _ = toy_loop(eta=1.0, checkpointing=checkpointing)
    cfg = TrainConfig()
    out = METHODS["draft"](loop, toy_batch(), cfg)
    out.loss.backward()
    h = 1e-5
    for p in (toy.w, toy.b):
        with torch.no_grad():
            p += h
            up = float(METHODS["draft"](loop, toy_batch(), cfg).loss)  # the same noise streams again
            p -= 2 * h
            down = float(METHODS["draft"](loop, toy_batch(), cfg).loss)
            p += h
        assert p.grad is not None and abs(float(p.grad)) > 1e-4
        torch.testing.assert_close(p.grad, torch.tensor((up - down) / (2 * h), dtype=p.dtype), rtol=1e-5, atol=1e-9)


def test_eta_step_noise_comes_from_each_samples_own_stream():
    """With η > 0 every step's noise is the next draw of that sample's generator, whatever the batch."""
    toy, loop, seen = toy_loop(eta=0.8, checkpointing=True)
    cfg = TrainConfig(k=2)
    METHODS["draft-k"](loop, toy_batch(), cfg)
    whole = seen.pop()[:, 0]
    for j, seed in enumerate(SEEDS):  # each sample alone gives its row of the batch
        METHODS["draft-k"](loop, toy_batch([seed]), cfg)
        torch.testing.assert_close(seen.pop()[0, 0], whole[j], rtol=0, atol=1e-12)
    # The same trajectory written out: x_T is the first draw, step i adds the (i+2)-th.
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    draw = lambda: torch.stack([torch.randn((1, 2, 2), generator=g) for g in gens]).double()  # noqa: E731
    x, s = draw(), loop.schedule
    with torch.no_grad():
        for i in range(len(s)):
            x0, eps = denoised(toy.denoise(x, None, None), x, i, s)
            x = sampler_step(x0, eps, s.a_prev[i], s.s_prev[i], s.sigma(i, 0.8), draw())
    torch.testing.assert_close(whole, x[:, 0], rtol=0, atol=1e-12)
    # and η = 0 gives another result: the noise was really used
    _, deterministic, seen0 = toy_loop(eta=0.0, checkpointing=True)
    METHODS["draft-k"](deterministic, toy_batch(), cfg)
    assert (seen0.pop()[:, 0] - whole).abs().max() > 1e-3
