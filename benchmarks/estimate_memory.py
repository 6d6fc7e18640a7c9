"""The memory estimate (`draft.estimate`) against the GPU peaks recorded in BENCHMARKS.md.

Builds a config-only folder of Stable Diffusion 1.5's architecture (the one
`benchmarks/speed_memory.py --preset sd15` measured: `draft.models.tiny.sd15_pipeline`, on the
meta device, so no weight is made or read), estimates each measured setting, and prints the
error of each. The recorded peaks are the allocator's peak during a training step above what
the model held before it, so they are compared with the estimate's activations plus the
LoRA's gradients and AdamW state.

    python benchmarks/estimate_memory.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

# (label, overrides, measured MB, where, measured step/sampling time ratios): SD 1.5 architecture, 512 px, batch 4, bf16, rank-8
# LoRA on the attention projections, brightness reward, 50 steps unless set.
MEASURED = [
    ("DRaFT-1", {"method": "draft-k", "k": 1}, 19931, "H100 run 2; H200", "1.12, 1.21"),
    ("DRaFT-1, no checkpointing", {"method": "draft-k", "k": 1, "sampling.checkpointing": False}, 28644, "H100 run 1", "0.95"),
    ("DRaFT-1, no checkpointing", {"method": "draft-k", "k": 1, "sampling.checkpointing": False}, 28645, "H200", "0.95"),
    ("DRaFT-LV n=2", {"method": "draft-lv", "lv_n": 2}, 39861, "H100 run 2; H200", "1.19, 1.26-1.52"),
    ("DRaFT-LV n=2, no checkpointing", {"method": "draft-lv", "lv_n": 2, "sampling.checkpointing": False}, 57262,
     "H100 run 1", "1.13"),
    ("DRaFT-LV n=2, no checkpointing", {"method": "draft-lv", "lv_n": 2, "sampling.checkpointing": False}, 57261,
     "H200", "1.16"),
    ("DRaFT-K K=10", {"method": "draft-k", "k": 10}, 19933, "H100 run 1", "1.63"),
    ("ReFL", {"method": "refl"}, 28645, "H100 run 1", "1.19"),
    ("AlignProp K~U[1,10]", {"method": "alignprop"}, 19932, "H100 run 1", "1.60"),
    ("DRaFT full, T=10", {"method": "draft", "sampling.num_steps": 10}, 19933, "H100 runs 1, 2", "3.63, 3.92"),
    ("DRaFT full, T=25", {"method": "draft", "sampling.num_steps": 25}, 19937, "H100 run 1", "2.99"),
    ("DRaFT full, T=50", {"method": "draft"}, 19943, "H100 runs 1, 2; H200", "3.89, 3.98, 4.88, 5.38"),
    ("DRaFT full, T=100", {"method": "draft", "sampling.num_steps": 100}, 19956, "H100 run 2", "3.57"),
]
COMMON = {"batch_size": 4, "mixed_precision": "bf16", "lora.rank": 8,
          "lora.target_modules": "to_q,to_k,to_v,to_out.0", "sampling.guidance_scale": 7.5}


def sd15_config_folder(root: Path) -> Path:
    """model_index.json and every component's config of SD 1.5's architecture, no weights."""
    import torch

    from draft.models.tiny import sd15_pipeline

    with torch.device("meta"):
        pipe = sd15_pipeline(root)
    folder = root / "sd15-configs"
    pipe.save_config(folder)
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_config(folder / "scheduler")
    return folder


def write_folder(folder: Path, pipeline: str, comps: dict) -> Path:
    """A config-only pipeline folder: model_index.json and each component's config."""
    import json

    folder.mkdir(parents=True)
    index = {"_class_name": pipeline}
    for name, (library, cls, config) in comps.items():
        index[name] = [library, cls]
        if library == "diffusers":
            (folder / name).mkdir()
            (folder / name / "config.json").write_text(json.dumps({"_class_name": cls, **config}))
        else:
            config.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def family_folders(root: Path) -> dict[str, tuple[Path, str]]:
    """SDXL, SD3 (medium) and FLUX.1 (dev) as their published configs describe them, with the
    published parameter counts of their denoisers to compare with."""
    from transformers import CLIPTextConfig, T5Config

    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               layers_per_block=2, sample_size=1024)
    vae16 = {**vae, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                            projection_dim=768, hidden_act="quick_gelu")
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                            projection_dim=1280, hidden_act="gelu")
    t5 = T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
                  feed_forward_proj="gated-gelu")
    unet_xl = dict(sample_size=128, block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                   down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=2048,
                   attention_head_dim=[5, 10, 20], use_linear_projection=True, addition_embed_type="text_time",
                   addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    sd3 = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
               num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    flux = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
    d, t = "diffusers", "transformers"
    return {
        "SDXL": (write_folder(root / "sdxl", "StableDiffusionXLPipeline", {
            "unet": (d, "UNet2DConditionModel", unet_xl), "vae": (d, "AutoencoderKL", vae),
            "text_encoder": (t, "CLIPTextModel", clip_l), "text_encoder_2": (t, "CLIPTextModelWithProjection", clip_g),
        }), "UNet 2.6 B"),
        "SD3 medium": (write_folder(root / "sd3", "StableDiffusion3Pipeline", {
            "transformer": (d, "SD3Transformer2DModel", sd3), "vae": (d, "AutoencoderKL", vae16),
            "text_encoder": (t, "CLIPTextModelWithProjection", clip_l),
            "text_encoder_2": (t, "CLIPTextModelWithProjection", clip_g), "text_encoder_3": (t, "T5EncoderModel", t5),
        }), "MMDiT 2 B, T5-XXL encoder 4.7 B"),
        "FLUX.1-dev": (write_folder(root / "flux", "FluxPipeline", {
            "transformer": (d, "FluxTransformer2DModel", flux), "vae": (d, "AutoencoderKL", vae16),
            "text_encoder": (t, "CLIPTextModel", clip_l), "text_encoder_2": (t, "T5EncoderModel", t5),
        }), "transformer 12 B"),
    }


def families(root: Path) -> None:
    """The estimate on the other families' configs: parameter counts and (uncalibrated) peaks."""
    from draft.config import load_config
    from draft.estimate import estimate

    print("\n| model | published | counted parameters (bf16 GiB) | DRaFT-LV n=2, batch 1, native size, peak GiB |")
    print("| --- | --- | --- | ---: |")
    for name, (folder, published) in family_folders(root).items():
        est = estimate(load_config(None, ["mixed_precision=bf16", "batch_size=1", "method=draft-lv"]), folder)
        counted = ", ".join(f"{k} {v / 2 / 1e9:.2f} B ({v / 2**30:.1f})" for k, v in est.parts.items())
        print(f"| {name} | {published} | {counted} | {est.peak / 2**30:.1f} |")


def main() -> None:
    from draft.config import load_config
    from draft.estimate import estimate

    folder = sd15_config_folder(Path(tempfile.mkdtemp(prefix="draft-est-")))
    print("| setting | measured MB | estimated MB | error | where measured | time ratio measured | estimated |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    worst = 0.0
    for label, overrides, measured, where, ratio in MEASURED:
        items = [f"{k}={v}" for k, v in {**COMMON, **overrides}.items()]
        est = estimate(load_config(None, items), folder)
        # The recorded peak is above the weights and LoRA parameters already in memory.
        step_mb = (est.activations + est.lora_params * 12) / 2**20
        err = step_mb / measured - 1
        worst = max(worst, abs(err))
        print(f"| {label} | {measured} | {step_mb:.0f} | {err:+.1%} | {where} | {ratio} | {est.time_ratio:.2f} |")
    full = estimate(load_config(None, [f"{k}={v}" for k, v in COMMON.items()] +
                                ["method=draft", "sampling.checkpointing=false"]), folder)
    print(f"\nlargest error {worst:.1%}; full DRaFT T=50 without checkpointing (out of memory on 80 GB): "
          f"estimated {full.peak / 2**30:.0f} GiB in all")
    print("weights:", {k: f"{v / 2**20:.0f} MB" for k, v in full.parts.items()})
    families(folder.parent)


if __name__ == "__main__":
    main()
