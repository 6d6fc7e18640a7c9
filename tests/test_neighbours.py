"""Direct-Align (SRPO) and DRTune: which denoiser calls carry gradient, the recovered x_0 of
both schedule families, the detached inputs, and a training step on SD and a flow model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from draft.config import LoraConfig, SamplingConfig, TrainConfig
from draft.lora import add_lora
from draft.methods import METHODS, Batch, Sampler
from draft.neighbours import drtune_steps, nearest_step
from draft.rewards import FunctionReward
from draft.sampling import Schedule, denoised, recover_x0, renoise
from test_method_behaviour import SD_BETAS, T, Calls, Noise64, Toy, trainer_batch

SCHEDULERS = {"ddim": DDIMScheduler(**SD_BETAS).config, "flow": FlowMatchEulerDiscreteScheduler(shift=3.0).config}


@pytest.fixture
def adapted(tiny_model):
    add_lora(tiny_model, LoraConfig(rank=2, target_modules=("to_q", "to_v")))
    schedule = Schedule.from_scheduler_config(tiny_model.scheduler_config, T)
    reward = FunctionReward(lambda images, prompts: images.mean((1, 2, 3)), "brightness")
    loop = Sampler(tiny_model, reward, schedule, guidance_scale=1.0, use_checkpoint=False)
    return tiny_model, loop, Calls(tiny_model)


def toy_loop(kind: str, checkpointing: bool = False, eta: float = 0.0):
    toy, seen = Toy(), []
    schedule = Schedule.from_scheduler_config(SCHEDULERS[kind], 5)

    def reward(images, prompts):
        seen.append(images.detach().clone())
        return -(images - 0.3).square().mean((1, 2, 3))

    return toy, Sampler(toy, reward, schedule, guidance_scale=1.0, eta=eta, use_checkpoint=checkpointing,
                        merge_lora=False), seen


def toy_batch(step=0, seeds=(11, 12, 13)) -> Batch:
    return Batch(["p"] * len(seeds), Noise64(list(seeds), (1, 2, 2), "cpu"), np.random.default_rng([0, step]), step)


# --- Direct-Align ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_recover_x0_undoes_renoise_on_every_level_a_step_lands_on(kind):
    s, x0, eps = Schedule.from_scheduler_config(SCHEDULERS[kind], 5), torch.randn(2, 4), torch.randn(2, 4)
    for a, sig in zip(s.a_prev, s.s_prev):  # (flow's pure-noise start, a = 0, is no step's landing)
        torch.testing.assert_close(recover_x0(renoise(x0, a, sig, eps), a, sig, eps), x0)


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_direct_align_scores_x0_recovered_with_the_injected_noise(kind):
    """The reward sees x̂_0 + (s'/a')(ε̂ - ε): one sampler step from the noised x_0, the rest of the
    noise taken off with the ε that was put in (written out here from the replayed streams)."""
    toy, loop, seen = toy_loop(kind)
    cfg = TrainConfig(method="direct-align", direct_align_sigmas=(0.3, 0.7))
    out = METHODS["direct-align"](loop, toy_batch(), cfg)
    i, s = out.stats["noise_step"], loop.schedule
    assert 0.2 < s.s[i] / (s.a[i] + s.s[i]) < 0.8  # the nearest level to a σ in range
    replay = toy_batch().noise
    with torch.no_grad():
        x0 = loop.run(replay.draw(), (None, None), replay)
        eps = replay.draw()
        x_t = renoise(x0, s.a[i], s.s[i], eps)
        x0_hat, eps_hat = denoised(toy.denoise(x_t, None, None), x_t, i, s)
    expected = x0_hat + s.s_prev[i] / s.a_prev[i] * (eps_hat - eps)
    torch.testing.assert_close(seen[-1][:, 0], expected[:, 0], rtol=1e-10, atol=1e-12)
    out.loss.backward()
    assert toy.w.grad is not None and toy.w.grad.abs() > 0


def test_direct_align_draws_its_level_once_per_step_with_one_gradient_call(adapted):
    model, loop, calls = adapted
    cfg = TrainConfig(method="direct-align", batch_size=1, grad_accum=2, kl_coeff=0.0,
                      sampling=SamplingConfig(num_steps=T), direct_align_sigmas=(0.0, 1.0))
    steps = []
    for step in range(8):
        seen = set()
        for micro in range(2):
            for process in range(2):
                out = METHODS["direct-align"](loop, trainer_batch(cfg, model, step, micro, process, 2), cfg)
                grad, plain = calls.take()
                i = out.stats["noise_step"]
                assert grad == [loop.schedule.timesteps[i]]  # one gradient call, at the injected level
                assert plain == list(loop.schedule.timesteps)  # x_0 sampled whole without gradient
                seen.add(i)
        assert len(seen) == 1, seen
        steps.append(seen.pop())
    assert len(set(steps)) >= 3, steps
    assert nearest_step(loop.schedule, 1.0) == 0 and nearest_step(loop.schedule, 0.0) == T - 1


# --- DRTune ---------------------------------------------------------------------------------------


def test_drtune_steps_are_evenly_spaced_and_cover_every_step_over_a_run():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        steps = drtune_steps(10, 3, rng)
        assert np.diff(steps).tolist() == [3, 3] and 0 <= steps[0] and steps[-1] <= 9
        seen.update(steps)
    assert seen == set(range(10))
    assert drtune_steps(6, 6, rng) == list(range(6))


class Inputs(Calls):
    """Also records whether each call's input carried gradient."""

    def __call__(self, x, t, cond):
        out = super().__call__(x, t, cond)
        self.inputs.append(x.requires_grad)
        return out


def test_drtune_trains_k_steps_each_with_its_input_detached(adapted):
    model, loop, _ = adapted
    calls = Inputs(model)
    calls.inner, calls.inputs = calls.inner.inner, []  # unwrap the fixture's recorder
    cfg = TrainConfig(method="drtune", drtune_k=3, batch_size=2, kl_coeff=0.0, sampling=SamplingConfig(num_steps=T))
    out = METHODS["drtune"](loop, trainer_batch(cfg, model, 0, 0, 0, 1), cfg)
    grad, plain = calls.take()
    first = out.stats["first_trained_step"]
    assert grad == list(loop.schedule.timesteps[first::2])  # stride T // K, from the drawn phase
    assert len(grad) + len(plain) == T
    assert not any(calls.inputs)  # no denoiser call sees a latent that carries gradient
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_drtune_gradient_is_the_same_with_checkpointing_and_differs_from_full_backprop(kind):
    def grads(method, checkpointing, **extra):
        toy, loop, _ = toy_loop(kind, checkpointing, eta=0.5)
        METHODS[method](loop, toy_batch(), TrainConfig(method=method, **extra)).loss.backward()
        return torch.stack([toy.w.grad, toy.b.grad])

    plain = grads("drtune", False, drtune_k=5)
    torch.testing.assert_close(grads("drtune", True, drtune_k=5), plain, rtol=1e-12, atol=1e-14)
    # Every step trained: the same steps as DRaFT, but the chain through later calls is cut.
    assert not torch.allclose(grads("draft", False), plain)


# --- a training step on a DDIM and a flow model ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from draft.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("sd3"), "sd3")


@pytest.mark.parametrize("method", ["direct-align", "drtune"])
@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_training_step_changes_the_lora(method, family, tiny_sd, tiny_sd3):
    from draft.models import load_model
    from draft.plan import micro_batch

    model = load_model(str(tiny_sd if family == "sd" else tiny_sd3))
    params = add_lora(model, LoraConfig(rank=4))
    with torch.no_grad():  # off B = 0, so both LoRA factors get a gradient
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    cfg = TrainConfig(method=method, drtune_k=2, batch_size=2, sampling=SamplingConfig(num_steps=4))
    loop = Sampler(model, FunctionReward(lambda images, prompts: images.mean((1, 2, 3)), "brightness"),
                   model.schedule(4), guidance_scale=3.0, use_checkpoint=True, guidance_gradient="cond")
    batch = micro_batch(0, 0, 0, 0, 1, 2, 1, ["a red circle", "a blue star"], model.latent_shape(), "cpu")
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    METHODS[method](loop, batch, cfg).loss.backward()
    assert sum(bool(p.grad is not None and p.grad.abs().sum() > 0) for p in params) >= 0.5 * len(params)
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
