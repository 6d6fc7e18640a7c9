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
    assert peak_activations("draft-k", True, u, d, s, 10) == 20 + 10
    assert peak_activations("draft-k", False, u, d, s, 10) == 80 + 20
    assert peak_activations("refl", True, u, d, s, 1) == 28  # ReFL's step is never checkpointed
    assert peak_activations("ddpo", True, u, d, s, 50) == 8 + 50
    assert peak_activations("ddpo", False, u, d, s, 50) == 400


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
    saved = meta.denoiser_saved_bytes(built.to(torch.bfloat16), 2, (4, 8, 8), torch.bfloat16, text_tokens=5)
    assert saved and saved > 0


def test_meta_count_equals_the_real_saved_bytes(tiny_sd):
    """Counting on the meta device finds the same saved activations as a real forward, counted
    independently (each distinct storage once)."""
    from draft.models import meta
    from draft.models.sd import StableDiffusion

    real = StableDiffusion.from_pretrained(str(tiny_sd), True, "tiny").pipe
    built = meta.components(tiny_sd)

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
    text = torch.randn(3, 16, real.unet.config.cross_attention_dim)
    unet_real = real_bytes(lambda: real.unet(x, torch.full((3,), 10), encoder_hidden_states=text), real.unet)
    assert meta.denoiser_saved_bytes(built["unet"], 3, (4, 8, 8), torch.float32, text_tokens=16) == unet_real
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert meta.decoder_saved_bytes(built["vae"], 2, (4, 8, 8), torch.float32) == real_bytes(
        lambda: real.vae.decode(z), real.vae)


def test_meta_denoiser_calls_for_sdxl_and_flux_layouts(tmp_path):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from draft.models import meta

    sdxl = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32)
    flux = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))
    with torch.device("meta"):
        unet, transformer = UNet2DConditionModel(**sdxl), FluxTransformer2DModel(**flux)
    for module, latent in ((unet, (4, 8, 8)), (transformer, (4, 8, 8))):
        module.requires_grad_(False)
        assert meta.denoiser_saved_bytes(module.to(torch.bfloat16), 2, latent, torch.bfloat16, text_tokens=7) > 0
