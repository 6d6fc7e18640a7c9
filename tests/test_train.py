"""The training loop: what a step changes, accumulation, and the saved LoRA in plain diffusers."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from draft.config import LoraConfig, LogConfig, SamplingConfig, TrainConfig
from draft.runs import RunFolder


def tiny_config(tiny_sd, tmp_path, **changes) -> TrainConfig:
    base = TrainConfig(
        model=str(tiny_sd), reward="brightness", prompts="a small red circle|a large blue square|a green star",
        eval_prompts="a small red circle|a green star", method="draft-k", k=2, steps=2, batch_size=2, lr=1e-2,
        output_dir=str(tmp_path), name="run", seed=3,
        sampling=SamplingConfig(num_steps=4, guidance_scale=3.0),
        lora=LoraConfig(rank=4, alpha=4.0),
        log=LogConfig(sample_every=10, sample_prompts=1, sample_seeds=2, checkpoint_every=0, eval_samples=0, trackers=()),
    )
    return base.replace(**changes)


@pytest.fixture
def make_trainer():
    """Trainer objects in this process, each with a fresh Accelerate state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from draft.defaults import resolve
    from draft.trainer import Trainer

    def make(config: TrainConfig):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        acc = Accelerator(cpu=True, gradient_accumulation_steps=config.grad_accum)
        return Trainer(resolve(config), acc, RunFolder(config.output_dir), None)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_steps_change_every_lora_parameter_and_nothing_else(tiny_sd, tmp_path, make_trainer):
    t = make_trainer(tiny_config(tiny_sd, tmp_path, weight_decay=0.0))
    before = {name: snapshot(m) for name, m in
              [("unet", t.raw_denoiser), ("vae", t.model.vae), ("text_encoder", t.model.pipe.text_encoder)]}
    lora_names = {k for k, p in t.raw_denoiser.named_parameters() if p.requires_grad}
    assert lora_names and all("lora" in k for k in lora_names)
    for _ in range(2):  # B starts at zero, so A first gets a gradient on the second step
        t.optimizer_step()
        t.progress.step += 1
    after = {name: snapshot(m) for name, m in
             [("unet", t.raw_denoiser), ("vae", t.model.vae), ("text_encoder", t.model.pipe.text_encoder)]}
    for part in before:
        for key, value in before[part].items():
            trainable = part == "unet" and key.replace(".default", "") in {n.replace(".default", "") for n in lora_names}
            if trainable:
                changed = (after[part][key] != value)
                assert changed.all(), f"{key}: {int((~changed).sum())} entries did not change"
            else:
                assert torch.equal(after[part][key], value), f"frozen {part}.{key} changed"


def test_batch_of_b_equals_two_accumulated_batches_of_b_over_2(tiny_sd, tmp_path, make_trainer):
    grads = []
    for batch_size, accum in ((4, 1), (2, 2)):
        t = make_trainer(tiny_config(tiny_sd, tmp_path, batch_size=batch_size, grad_accum=accum, method="draft-lv"))
        # Let the LoRA move first so every parameter has a gradient, identically for both.
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for p in t.params:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        captured = []
        step = t.optimizer.step
        t.optimizer.step = lambda *a, **k: (captured.append(torch.cat([p.grad.flatten() for p in t.params])), step(*a, **k))
        row = t.optimizer_step()
        grads.append((captured[0], row, torch.cat([p.detach().flatten() for p in t.params])))
    (g1, row1, p1), (g2, row2, p2) = grads
    assert g1.abs().sum() > 0
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-10)
    # Adam divides by sqrt(v): entries whose gradient is ~0 amplify round-off, so the
    # parameters agree to a small fraction of one step (lr = 1e-2) rather than to 1e-7.
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-5)
    assert row1["reward_mean"] == pytest.approx(row2["reward_mean"], rel=1e-6)
    assert row1["reward_queries"] == row2["reward_queries"] == 8  # 4 samples x lv_n=2


@pytest.fixture(scope="module")
def trained_run(tiny_sd, tmp_path_factory):
    """A short run through the Python API."""
    from draft import train

    out = tmp_path_factory.mktemp("api_run")
    config = tiny_config(tiny_sd, out, steps=3, log=LogConfig(
        sample_every=2, sample_prompts=1, sample_seeds=2, checkpoint_every=2, eval_samples=4, eval_every=2,
        trackers=()))
    return train(config, progress=False)


def test_run_folder_holds_what_design_promises(trained_run):
    root = trained_run
    assert (root / "config.yaml").is_file()
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "loss", "grad_norm", "lr", "time", "reward_queries"):
        assert key in rows[0]
    assert rows[-1]["reward_queries"] == 6
    assert [("eval_reward_mean" in r) for r in rows] == [False, True, False]
    assert 0 <= rows[1]["eval_reward_mean"] <= 1 and rows[1]["eval_diversity"] >= 0
    assert (root / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in (root / "samples").iterdir()) == [
        "step-00000000.png", "step-00000002.png", "step-00000003.png"]
    for name in ("reward.png", "training.png", "before_after.png", "eval.json"):
        assert (root / "report" / name).is_file()


def test_saved_lora_loads_in_diffusers_and_matches_draft_sample(trained_run, tiny_sd):
    from draft.inference import sample

    prompt, seed, steps, guidance = "a small red circle", 7, 4, 3.0
    cfg = SamplingConfig(num_steps=steps, guidance_scale=guidance)
    ours = sample(str(tiny_sd), [prompt], [(str(trained_run), 1.0)], seed=seed, sampling=cfg, device="cpu")
    base = sample(str(tiny_sd), [prompt], [], seed=seed, sampling=cfg, device="cpu")

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(trained_run / "lora")
    theirs = pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                  guidance_scale=guidance, output_type="pt").images
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the images...
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)  # ...identically in both


def test_saved_lora_is_the_trained_adapter_layer_for_layer(trained_run, tiny_sd):
    """Every adapted layer (attention, feed-forward, convolutions) survives save and load."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from draft.inference import generate
    from draft.lora import add_lora, load_adapter_state_dict, load_loras
    from draft.models import load_model

    trained = load_model(str(tiny_sd))
    add_lora(trained, LoraConfig(rank=4, alpha=4.0))
    load_adapter_state_dict(trained.unet, load_file(trained_run / "checkpoints" / "step-00000003" / "adapter.safetensors"))
    loaded = load_model(str(tiny_sd))
    load_loras(loaded, [(str(trained_run), 1.0)])

    def adapted(model):
        return {n.rsplit(".", 1)[-1] for n, m in model.unet.named_modules() if isinstance(m, LoraLayer)}

    assert {"to_q", "conv1", "conv2", "2"} <= adapted(trained) == adapted(loaded)  # "2": ff.net.2
    cfg = SamplingConfig(num_steps=4, guidance_scale=3.0)
    prompts, seeds = ["a small red circle", "a green star"], [5, 6]
    torch.testing.assert_close(generate(loaded, prompts, seeds, cfg), generate(trained, prompts, seeds, cfg),
                               rtol=0, atol=1e-6)


def test_evaluation_and_grid_prompts_spread_over_the_list():
    from draft.plan import spread

    assert spread(180, 8) == [0, 22, 45, 67, 90, 112, 135, 157]
    assert spread(3, 7) == [0, 1, 2, 0, 1, 2, 0]  # cycling: every prompt with several seeds
    assert spread(5, 5) == [0, 1, 2, 3, 4]
