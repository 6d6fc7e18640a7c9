"""The memory estimate: exact weights from configs on the meta device, no weights loaded."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from draft.config import load_config
from draft.estimate import estimate, lora_parameters, peak_activations


def without_weights(folder, tmp_path_factory):
    """A copy of a pipeline folder with every weight file removed: only configs and tokenizers."""
    copy = tmp_path_factory.mktemp("configs") / "pipe"
    shutil.copytree(folder, copy)
    for f in copy.rglob("*.safetensors"):
        f.unlink()
    return copy


@pytest.fixture(scope="module")
def configs_only(tiny_sd, tmp_path_factory):
    return without_weights(tiny_sd, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from draft.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("sd3"), "sd3", t5=True)


@pytest.mark.parametrize("family,precision,dtype", [("sd", "no", torch.float32), ("sd", "bf16", torch.bfloat16),
                                                    ("sd3", "bf16", torch.bfloat16)])
def test_weight_memory_is_the_real_parameter_bytes(family, precision, dtype, tiny_sd, tiny_sd3, tmp_path_factory):
    from draft.lora import add_lora
    from draft.models import load_model

    folder = tiny_sd if family == "sd" else tiny_sd3
    config = load_config(None, []).replace(mixed_precision=precision)
    est = estimate(config, without_weights(folder, tmp_path_factory))  # would fail if it needed a weight file
    model = load_model(str(folder), dtype=dtype)
    expected = {"unet", "vae", "text_encoder"} if family == "sd" else {
        "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert set(est.parts) == expected
    for name in est.parts:
        module = getattr(model.pipe, name)
        real = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        assert est.parts[name] == real, name
    assert est.weights == sum(est.parts.values())
    params = add_lora(model, config.lora)
    assert est.lora_params == sum(p.numel() for p in params)  # convolutions and linear layers alike
    assert est.lora == 16 * est.lora_params  # float32 weights, gradients and two AdamW moments
    assert est.activations > 0 and est.peak == est.weights + est.lora + est.reward + est.activations


def test_activations_follow_the_method_table(configs_only):
    run = lambda *o: estimate(load_config(None, ["batch_size=2", "sampling.num_steps=10", *o]), configs_only)  # noqa: E731
    one, no_ckpt = run("method=draft-k", "k=1"), run("method=draft-k", "k=1", "sampling.checkpointing=false")
    full, full_no_ckpt = run("method=draft"), run("method=draft", "sampling.checkpointing=false")
    assert no_ckpt.activations > one.activations  # the UNet's activations live beside the decode's
    assert full.activations - one.activations < 0.05 * one.activations  # checkpointed: flat in T
    assert full_no_ckpt.activations > 5 * no_ckpt.activations / 2  # unchecked: grows with T
    assert run("method=draft-lv", "lv_n=2").activations > 1.8 * run("method=draft-lv", "lv_n=1").activations
    bigger = estimate(load_config(None, ["batch_size=4", "sampling.num_steps=10", "method=draft-k", "k=1"]),
                      configs_only)
    assert 1.8 < bigger.activations / one.activations < 2.2  # linear in the batch


def test_peak_activations_table():
    u, d, s = 8, 20, 1
    # the second argument: how many of the g gradient steps keep their graphs (0: checkpointed)
    assert peak_activations("draft-k", 0, u, d, s, 10) == 20 + 10
    assert peak_activations("draft-k", 10, u, d, s, 10) == 80 + 20
    assert peak_activations("draft-k", 4, u, d, s, 10) == 4 * 8 + 6 * 1 + 20
    assert peak_activations("refl", 0, u, d, s, 1) == 28  # ReFL's step is never checkpointed
    assert peak_activations("ddpo", 0, u, d, s, 50) == 8 + 50
    assert peak_activations("ddpo", 50, u, d, s, 50) == 400
    assert peak_activations("ddpo", 10, u, d, s, 50) == 80 + 40 + 8


def test_fits_and_printout(configs_only):
    est = estimate(load_config(None, []), configs_only)
    yes, no = est.fits()
    assert yes == [24, 40, 48, 80] and no == []
    text = "\n".join(est.lines())
    assert "estimated peak accelerator memory per process" in text and "fits 24 GB" in text
    est.activations = 70 * 2**30
    assert est.fits() == ([80], [24, 40, 48])
    assert "too large for 24 GB, 40 GB, 48 GB" in est.lines()[0]


def test_lora_parameter_count_matches_peft_on_a_transformer_denoiser(tmp_path):
    """The count also holds for an SD3-style transformer, built on the meta device from its config."""
    from diffusers import SD3Transformer2DModel

    from draft.config import LoraConfig
    from draft.lora import add_lora
    from draft.models import meta

    kwargs = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4)
    real = SD3Transformer2DModel(**kwargs)
    real.save_config(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text('{"_class_name": "X", "transformer": ["diffusers", "SD3Transformer2DModel"]}')
    built = meta.components(tmp_path)["transformer"]
    assert next(built.parameters()).is_meta
    assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in real.parameters())
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "ff.net.2")
    params = add_lora(SimpleNamespace(denoiser=real), LoraConfig(rank=4, target_modules=targets))
    assert lora_parameters(built, targets, 4) == sum(p.numel() for p in params)


def test_meta_count_equals_the_real_saved_bytes(tiny_sd):
    """Counting on the meta device, through the adapter's own calls, finds the same saved
    activations as a real forward, counted independently (each distinct storage once)."""
    from draft.models import meta
    from draft.models.base import meta as empty
    from draft.models.sd import StableDiffusion

    loaded = StableDiffusion.from_pretrained(str(tiny_sd), True, "tiny")
    real = loaded.pipe
    model = StableDiffusion.on_meta(tiny_sd, meta.components(tiny_sd))

    def real_bytes(fn, module):
        weights = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), meta._fused_attention():
            fn()
        return sum(seen.values())

    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    text = torch.randn(3, 16, real.unet.config.cross_attention_dim)  # the tiny tokenizer's 16 tokens
    unet_real = real_bytes(lambda: real.unet(x, torch.tensor(10), encoder_hidden_states=text), real.unet)
    x_meta = empty(3, 4, 8, 8).requires_grad_(True)
    cond = model.meta_conditioning(3, torch.float32)
    assert meta.saved_bytes(lambda: model.denoise(x_meta, empty(), cond), model.denoiser) == unet_real
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    z_meta = empty(2, 4, 8, 8).requires_grad_(True)
    assert meta.saved_bytes(lambda: model.decode(z_meta), model.vae) == real_bytes(lambda: loaded.decode(z), real.vae)


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl", "wan", "wan22", "qwen-image", "z-image", "flux2",
                                    "flux2-klein"])
def test_every_family_has_its_activations_estimated(family, tmp_path_factory):
    """The adapter's own denoiser call and decode, on meta tensors: every family is modelled."""
    from draft.models.tiny import build_tiny

    folder = without_weights(build_tiny(tmp_path_factory.mktemp(family), family), tmp_path_factory)
    size = ["sampling.height=16", "sampling.width=16", "sampling.frames=9"] if "wan" in family else []
    if family == "qwen-image":  # the tiny folder records no size; the family's native one is 1024 px
        size = ["sampling.height=32", "sampling.width=32"]
    est = estimate(load_config(None, [f"model={folder}", "batch_size=2", "sampling.num_steps=4", "method=draft-k",
                                      "k=1", "sampling.checkpointing=false", *size]), folder)
    assert est.activations > 0 and not any("not modelled" in n for n in est.notes)
    if "wan" in family:  # the decode of the frames the reward sees: the first frame only needs one latent frame
        first = estimate(load_config(None, [f"model={folder}", "batch_size=2", "sampling.num_steps=4",
                                            "method=draft-k", "k=1", "sampling.checkpointing=false", "reward_frames=1",
                                            "reward_frame_choice=first", *size]), folder)
        assert first.activations < est.activations


def test_checkpointing_auto_keeps_what_the_budget_holds(configs_only):
    """checkpointing=auto: the split the estimate chooses never puts the peak over the budget,
    keeps every graph when the budget is large and none when it is tight, and costs in time
    between the two fixed settings."""
    from draft.estimate import GIB

    base = ["method=draft", "batch_size=2", "sampling.num_steps=10"]
    run = lambda *o: estimate(load_config(None, [*base, *o]), configs_only)  # noqa: E731
    on, off = run(), run("sampling.checkpointing=false")
    for budget in (on.peak / GIB * 0.5, on.peak / GIB, (on.peak + off.peak) / 2 / GIB, off.peak / GIB * 2):
        auto = run("sampling.checkpointing=auto", f"sampling.memory_budget_gb={budget}")
        if auto.kept_graphs:
            assert auto.peak <= budget * GIB
        assert on.time_ratio >= auto.time_ratio >= off.time_ratio
        assert any(n.startswith("checkpointing auto") for n in auto.notes)
    assert run("sampling.checkpointing=auto", f"sampling.memory_budget_gb={on.peak / GIB * 0.5}").kept_graphs == 0
    assert run("sampling.checkpointing=auto", f"sampling.memory_budget_gb={off.peak / GIB * 2}").kept_graphs == 10
    middle = run("sampling.checkpointing=auto", f"sampling.memory_budget_gb={(on.peak + off.peak) / 2 / GIB}")
    assert 0 < middle.kept_graphs < 10 and on.peak < middle.peak <= (on.peak + off.peak) / 2


def test_the_conditional_gradient_policy_costs_less_time_only_under_guidance(configs_only):
    """guidance_gradient=cond runs the unconditional half of each gradient call without a
    graph: the step's time ratio falls by half the gradient calls' extra cost under CFG,
    and not at all without guidance (one pass, nothing to leave out)."""
    base = ["method=draft", "sampling.num_steps=10", "sampling.checkpointing=false"]
    run = lambda *o: estimate(load_config(None, [*base, *o]), configs_only).time_ratio  # noqa: E731
    both, cond = run(), run("sampling.guidance_gradient=cond")
    assert both == pytest.approx(3.0) and cond == pytest.approx(2.0)  # 10 x 3 units, against 10 x (0.5 + 1.5)
    assert run("sampling.guidance_scale=1") == run("sampling.guidance_scale=1", "sampling.guidance_gradient=cond")


def test_text_encoders_count_on_the_device_transiently_when_offloaded_and_not_when_cached(tiny_sd, configs_only):
    """device: the encoders' weights are resident; offload: only the largest, while it encodes
    (outside the step's backward); cache: none, but a micro-batch's embeddings are, and the
    host holds exactly what the cache keeps of the run's prompts."""
    from draft.models import load_model
    from draft.models.text import PromptCache
    from draft.watch import Watch

    prompts = ["a small red circle", "a large blue square", "a green star"]
    options = [f"prompts={'|'.join(prompts)}", "eval_prompts=a green star|a yellow ring", "batch_size=2",
               "log.eval_samples=2", "sampling.guidance_scale=3", "method=draft-k", "k=1"]
    run = lambda mode: estimate(load_config(None, [*options, f"text_encoders={mode}"]), configs_only)  # noqa: E731
    device, offload, cache = run("device"), run("offload"), run("cache")
    encoder = device.parts["text_encoder"]
    assert encoder > 0 and device.encoding == device.embeddings == device.host == 0
    assert offload.weights == cache.weights == device.weights - encoder
    assert offload.encoding == encoder and offload.peak == device.peak - encoder  # the step's peak is the larger
    small = run("offload")
    small.activations = 0  # with nothing else on the device, the encoding is the peak
    assert small.peak == small.weights + small.lora + small.reward + encoder
    assert cache.peak == device.peak - encoder + cache.embeddings and cache.encoding == 0

    model = load_model(str(tiny_sd))
    config = load_config(None, [*options, "text_encoders=cache"])
    used = prompts + Watch(None, None, ["a green star", "a yellow ring"], config, None).prompts()
    held = PromptCache(model)
    held.warm(used, 3.0, model.size(), "")
    assert cache.host == held.nbytes() > 0
    assert cache.embeddings == held.nbytes() // len(set(used)) * 2  # a micro-batch of two prompts
    assert any("text_encoders=cache" in line and "4 prompts" in line for line in cache.lines())
    assert any("text_encoders=offload" in line for line in offload.lines())


def test_an_fsdp2_launch_splits_the_denoisers_weights_and_the_loras_state(configs_only, monkeypatch):
    one = estimate(load_config(None, []), configs_only)
    monkeypatch.setenv("WORLD_SIZE", "2")
    ddp = estimate(load_config(None, []), configs_only)  # DDP: every process holds everything
    assert (ddp.weights, ddp.lora) == (one.weights, one.lora)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    two = estimate(load_config(None, []), configs_only)
    assert two.weights == one.weights - one.parts["unet"] + one.parts["unet"] // 2
    assert two.lora == one.lora // 2 and two.activations == one.activations
    assert any(n.startswith("FSDP2: the denoiser's weights") for n in two.notes)
