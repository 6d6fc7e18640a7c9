"""DDPO: log-probabilities, advantages, the clipped objective and that it learns a toy reward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from draft.config import TrainConfig
from draft.ddpo import DDPO, advantages, rollout
from draft.methods import Batch, Sampler, SampleNoise
from draft.plan import sample_seed
from draft.rewards import FunctionReward
from draft.sampling import Schedule, denoised, gaussian_log_prob, step_mean

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)


def test_log_prob_is_the_gaussian_density_of_the_step():
    mean, x = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma = 0.37
    expected = torch.distributions.Normal(mean, sigma).log_prob(x).mean((1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, sigma), expected)


class ToyModel(torch.nn.Module):
    """A one-parameter 'diffusion model': ε̂ = x - b, so b shifts every sample; decode is a sigmoid."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(1))

    def conditioning(self, prompts, guidance_scale=1.0, size=None, negative_prompt=""):
        c = torch.zeros(len(prompts), 1)
        return c, c

    def denoise(self, x, t, cond):
        return x - self.b

    def guidance(self, scale, scale_2=None):
        return scale

    def guide(self, out_u, out_c, scale):
        return out_u + scale * (out_c - out_u)

    def decode(self, latents, frames=None, use_checkpoint=False):
        return torch.sigmoid(latents.mean((1, 2, 3))).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)


def toy_setup(eta=1.0, steps=5):
    model = ToyModel()
    schedule = Schedule.from_scheduler_config(DDIMScheduler(**SD_BETAS).config, steps)
    reward = FunctionReward(lambda images, prompts: images.mean((1, 2, 3)), "brightness")
    return model, Sampler(model, reward, schedule, guidance_scale=1.0, eta=eta, use_checkpoint=False)


def toy_batch(step, n=64, prompts=None):
    prompts = prompts or ["p"] * n
    noise = SampleNoise([sample_seed(0, step, j) for j in range(len(prompts))], (1, 2, 2), "cpu")
    return Batch(prompts, noise, np.random.default_rng([0, step, 1]), step, 0)


def test_rollout_log_probs_are_those_of_the_recorded_transitions():
    model, loop = toy_setup()
    ro = rollout(loop, toy_batch(0, 4), rollout_id=0)
    for i in range(len(loop.schedule)):
        x0, eps = denoised(model.denoise(ro.latents[i], None, None), ro.latents[i], i, loop.schedule)
        sigma = loop.schedule.sigma(i, loop.eta)
        mean = step_mean(x0, eps, loop.schedule.a_prev[i], loop.schedule.s_prev[i], sigma)
        expected = torch.distributions.Normal(mean, sigma).log_prob(ro.next_latents[i]).mean((1, 2, 3))
        torch.testing.assert_close(ro.log_probs[i], expected)
        if i + 1 < len(loop.schedule):
            torch.testing.assert_close(ro.latents[i + 1], ro.next_latents[i])


def test_advantages_are_normalised_per_prompt():
    r = torch.tensor([1.0, 3.0, 10.0, 30.0, 5.0])
    adv = advantages(r, ["a", "a", "b", "b", "c"])
    torch.testing.assert_close(adv[:4], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv[4], (r[4] - r.mean()) / r.std(unbiased=False))


def test_advantages_use_a_prompts_own_statistics_only_from_min_count_on():
    r = torch.tensor([1.0, 3.0, 5.0, 10.0, 30.0])
    prompts = ["a", "a", "a", "b", "b"]
    batch = (r - r.mean()) / r.std(unbiased=False)
    adv = advantages(r, prompts, min_count=3)
    torch.testing.assert_close(adv[:3], (r[:3] - 3.0) / r[:3].std(unbiased=False))  # "a": 3 samples, its own
    torch.testing.assert_close(adv[3:], batch[3:])  # "b": 2 < 3 samples, the batch's
    torch.testing.assert_close(advantages(r, prompts, min_count=10), batch)


def test_ddpo_update_raises_a_toy_reward_without_its_gradient():
    model, loop = toy_setup()
    cfg = TrainConfig(method="ddpo", ddpo_rollout_reuse=1, ddpo_clip=0.2).replace(
        sampling=TrainConfig().sampling.__class__(eta=1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    method = DDPO()
    start = float(rollout(loop, toy_batch(1000, 256), 0).rewards.mean())
    for step in range(8):
        opt.zero_grad()
        out = method(loop, toy_batch(step), cfg)
        out.loss.backward()
        assert model.b.grad is not None and model.b.grad.abs() > 0
        opt.step()
    end = float(rollout(loop, toy_batch(1000, 256), 0).rewards.mean())
    assert model.b.item() > 0.05  # pushed towards brighter samples
    assert end > start + 0.01


def test_ppo_clip_and_rollout_reuse():
    model, loop = toy_setup()
    cfg = TrainConfig(method="ddpo", ddpo_rollout_reuse=2, ddpo_clip=1e-4)
    method = DDPO()
    first = method(loop, toy_batch(0), cfg)
    assert first.queries == 64 and first.stats["clipfrac"] == 0.0  # ratio is exactly 1
    with torch.no_grad():
        model.b += 0.5  # the policy moved
    second = method(loop, toy_batch(1), cfg)
    assert second.queries == 0  # the rollout is reused, no new reward queries
    torch.testing.assert_close(second.rewards, first.rewards)
    assert second.stats["clipfrac"] > 0.9 and second.stats["approx_kl"] > 0
    second.loss.backward()
    g_clipped = model.b.grad.clone()
    # The same rollout without clipping: PPO's clip removes the samples whose ratio moved in
    # their advantage's favour, so the update differs.
    free = DDPO()
    free._rollouts = dict(method._rollouts)
    model.b.grad = None
    free(loop, toy_batch(1), cfg.replace(ddpo_clip=1e9)).loss.backward()
    assert (model.b.grad - g_clipped).abs().item() > 1e-3
    third = method(loop, toy_batch(2), cfg)
    assert third.queries == 64  # a new rollout


def test_ddpo_needs_stochastic_sampling():
    from draft.config import load_config
    from draft.errors import UserError

    # η = 1 is DDPO's own default (config.METHOD_DEFAULTS); only an explicit 0 is refused.
    with pytest.raises(UserError, match="sampling.eta"):
        load_config(None, ["method=ddpo", "sampling.eta=0"])
    assert load_config(None, ["method=ddpo"]).sampling.eta == 1.0


def test_ddpo_trains_on_a_reward_without_gradient_through_the_cli(tiny_sd, tmp_path, capsys):
    from draft.cli import main

    common = [f"model={tiny_sd}", "prompts=a red circle|a blue star", "eval_prompts=a red circle",
              "steps=2", "batch_size=2", "sampling.num_steps=3", "log.eval_samples=0", "log.trackers=[]",
              "log.sample_prompts=1", "log.sample_seeds=1", f"output_dir={tmp_path}", "--no-progress"]
    no_grad = "reward=tests_nograd_reward:score"
    (tmp_path / "tests_nograd_reward.py").write_text(
        "import torch\ndef score(images, prompts):\n    return images.detach().mean((1, 2, 3))\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["train", *common, no_grad, "name=rl", "method=ddpo", "sampling.eta=1.0"]) == 0
        assert main(["train", *common, no_grad, "name=grad", "method=draft-k", "k=1"]) == 2
        assert "passes no gradient" in capsys.readouterr().err
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tests_nograd_reward", None)
