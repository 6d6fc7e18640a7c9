"""Real-size architectures of the hub models draft's presets name, as configs only.

For each hub id in `ARCHITECTURES`, `write_configs(hub_id, folder)` writes the configs-only
pipeline folder the hub repository itself holds: `model_index.json` (its pipeline class and
components), each torch component's `config.json` with the real architecture, the
scheduler's config, and each tokenizer's `tokenizer_config.json` (only its
`model_max_length`, which is all the memory estimate reads; no vocabulary files). Built on
the meta device (`draft.models.meta.components`), the folder gives every component at its
real size with no weight read and nothing downloaded, so `draft train ... --dry-run`
estimates a preset's memory on a machine that has never fetched the model (`draft.preflight`)
and `benchmarks/speed_memory.py` builds real-size pipelines with random weights.

Only what decides sizes and the estimate's calls is written (layer widths and counts,
vocabularies, latent channels, VAE factors, scheduler kind, text lengths); bookkeeping keys
(`_diffusers_version`, `torch_dtype`, dropout rates) are left to the libraries' defaults.
Where each value comes from is said next to it. `PUBLISHED` holds the parameter counts the
model cards and papers give, which `tests/test_architectures.py` checks the meta builds
against.
The text encoders' and tokenizers' configs are in `draft.models.architectures_text`, the
families whose text encoder is a language model in `draft.models.architectures_llm`.

    python -m draft.models.architectures --write HUB_ID FOLDER   # the configs-only folder
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from draft.errors import unknown
from draft.models.architectures_text import (CLIP_TOKENIZER, T5_TOKENIZER, UMT5_TOKENIZER, clip_bigg, clip_l,
                                             t5_xxl, umt5_xxl)
from draft.models.tiny_wan import A14B_BOUNDARY_RATIO, WAN_SCHEDULER_CONFIG

# --- VAEs ----------------------------------------------------------------------------------------


def kl_vae(**changes) -> dict:
    """AutoencoderKL as in stable-diffusion-v1-5 vae/config.json (4 levels 128-512, 8x, 4 latent
    channels); SDXL, SD3 and FLUX.1 change the keys named in `changes`."""
    return {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32,
        "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215, **changes,
    }


# SD3 / SD3.5 and FLUX.1: 16 latent channels, no quant convolutions, their own scale and shift
# (the repos' vae/config.json; FLUX.1's also in black-forest-labs/flux's ae_params).
SD3_VAE = kl_vae(latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True)
FLUX_VAE = kl_vae(latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                  use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)


# Wan 2.1's causal video VAE (also Wan 2.2 A14B's), as Wan-AI/Wan2.1-T2V-*-Diffusers
# vae/config.json has it and diffusers' convert_wan_to_diffusers.py builds it (`AutoencoderKLWan()`):
# base width 96, multipliers 1-2-4-4, time downsampled in the two deeper levels (4x in time,
# 8x in space), z_dim 16 with its per-channel latent statistics (Wan's wan/modules/vae.py).
WAN_VAE = {
    "_class_name": "AutoencoderKLWan", "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
    "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
}


# --- denoisers -----------------------------------------------------------------------------------

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json.
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
    "cross_attention_dim": 768, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: three levels, 1/2/10 transformer
# layers, cross-attention over both encoders (768 + 1280), the "text_time" embedding of the
# pooled bigG projection (1280) and six size ids of 256 each (1280 + 6 * 256 = 2816).
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
}

# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: 24 blocks of 24
# heads of 64, the first 13 with the second, image-only attention; RMS q/k norms).
SD35_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
    "out_channels": 16, "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
}

# black-forest-labs/FLUX.1-dev transformer/config.json (19 joint and 38 single-stream blocks of
# 24 heads of 128, the guidance embedding of the distilled dev model).
FLUX_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
    "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}


def wan_transformer(heads: int, layers: int, ffn: int) -> dict:
    """A Wan text-to-video WanTransformer3DModel (diffusers' convert_wan_to_diffusers.py
    get_transformer_config, as the Wan-AI/*-Diffusers transformer/config.json hold it): heads of
    128, 1x2x2 patches, UMT5's 4096-wide text, 16 latent channels in and out."""
    return {
        "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": heads,
        "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
        "ffn_dim": ffn, "num_layers": layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
    }


# Wan 2.1 (wan/configs/wan_t2v_1_3B.py, wan_t2v_14B.py: dim 1536 / 5120 = heads x 128).
WAN_1_3B = wan_transformer(heads=12, layers=30, ffn=8960)
WAN_14B = wan_transformer(heads=40, layers=40, ffn=13824)  # also each expert of Wan 2.2 A14B

# --- schedulers ----------------------------------------------------------------------------------

# stable-diffusion-v1-5 scheduler/scheduler_config.json.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None,
}
# stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "interpolation_type": "linear",
    "use_karras_sigmas": False, "timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False,
    "set_alpha_to_one": False, "skip_prk_steps": True, "sample_max_value": 1.0, "trained_betas": None,
}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# FLUX.1-dev: the shift grows with the image's token count (256 to 4096 tokens: 0.5 to 1.15).
FLUX_DEV_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
    "max_shift": 1.15,
}
WAN_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", **WAN_SCHEDULER_CONFIG}

# --- pipelines -----------------------------------------------------------------------------------


def _pipeline(cls: str, components: dict[str, tuple[str, str, dict]], **extra) -> dict[str, dict]:
    """A pipeline folder's files (path -> JSON): model_index.json from (library, class, config)
    per component, and each component's config: scheduler_config.json for the scheduler,
    tokenizer_config.json for tokenizers, config.json for the rest."""
    index = {"_class_name": cls, **extra}
    files = {}
    for name, (library, class_name, config) in components.items():
        index[name] = [library, class_name]
        if config is None:
            continue
        kind = "scheduler_config" if name == "scheduler" else "tokenizer_config" if "tokenizer" in name else "config"
        files[f"{name}/{kind}.json"] = config
    return {"model_index.json": index, **files}


D, T = "diffusers", "transformers"


def _sd15() -> dict[str, dict]:
    # The folder also names a safety checker and feature extractor, which draft never loads
    # (and the meta build skips: no torch class of diffusers or transformers).
    return _pipeline("StableDiffusionPipeline", {
        "unet": (D, "UNet2DConditionModel", SD15_UNET), "vae": (D, "AutoencoderKL", kl_vae()),
        "text_encoder": (T, "CLIPTextModel", clip_l()), "tokenizer": (T, "CLIPTokenizer", CLIP_TOKENIZER),
        "scheduler": (D, "PNDMScheduler", SD15_SCHEDULER),
        "safety_checker": ("stable_diffusion", "StableDiffusionSafetyChecker", None),
        "feature_extractor": (T, "CLIPImageProcessor", None),
    })


def _sdxl() -> dict[str, dict]:
    vae = kl_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # overflows in fp16
    return _pipeline("StableDiffusionXLPipeline", {
        "unet": (D, "UNet2DConditionModel", SDXL_UNET), "vae": (D, "AutoencoderKL", vae),
        "text_encoder": (T, "CLIPTextModel", clip_l()), "tokenizer": (T, "CLIPTokenizer", CLIP_TOKENIZER),
        "text_encoder_2": (T, "CLIPTextModelWithProjection", clip_bigg()),
        "tokenizer_2": (T, "CLIPTokenizer", CLIP_TOKENIZER),
        "scheduler": (D, "EulerDiscreteScheduler", SDXL_SCHEDULER),
    }, force_zeros_for_empty_prompt=True)


def _sd35_medium() -> dict[str, dict]:
    return _pipeline("StableDiffusion3Pipeline", {
        "transformer": (D, "SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER), "vae": (D, "AutoencoderKL", SD3_VAE),
        "text_encoder": (T, "CLIPTextModelWithProjection", clip_l(projection=True)),
        "tokenizer": (T, "CLIPTokenizer", CLIP_TOKENIZER),
        "text_encoder_2": (T, "CLIPTextModelWithProjection", clip_bigg()),
        "tokenizer_2": (T, "CLIPTokenizer", CLIP_TOKENIZER),
        "text_encoder_3": (T, "T5EncoderModel", t5_xxl()), "tokenizer_3": (T, "T5TokenizerFast", T5_TOKENIZER),
        "scheduler": (D, "FlowMatchEulerDiscreteScheduler", SD3_SCHEDULER),
    })


def _flux_dev() -> dict[str, dict]:
    return _pipeline("FluxPipeline", {
        "transformer": (D, "FluxTransformer2DModel", FLUX_DEV_TRANSFORMER), "vae": (D, "AutoencoderKL", FLUX_VAE),
        "text_encoder": (T, "CLIPTextModel", clip_l()), "tokenizer": (T, "CLIPTokenizer", CLIP_TOKENIZER),
        "text_encoder_2": (T, "T5EncoderModel", t5_xxl()), "tokenizer_2": (T, "T5TokenizerFast", T5_TOKENIZER),
        "scheduler": (D, "FlowMatchEulerDiscreteScheduler", FLUX_DEV_SCHEDULER),
    })


def _wan(transformer: dict, two_experts: bool = False) -> dict[str, dict]:
    """Wan 2.1 T2V (one transformer) or Wan 2.2 T2V A14B (a high-noise `transformer` and a
    low-noise `transformer_2` of the same architecture, switched at boundary_ratio)."""
    second = (D, "WanTransformer3DModel", transformer) if two_experts else (None, None, None)
    return _pipeline("WanPipeline", {
        "transformer": (D, "WanTransformer3DModel", transformer), "transformer_2": second,
        "vae": (D, "AutoencoderKLWan", WAN_VAE),
        "text_encoder": (T, "UMT5EncoderModel", umt5_xxl()), "tokenizer": (T, "T5TokenizerFast", UMT5_TOKENIZER),
        "scheduler": (D, "UniPCMultistepScheduler", WAN_SCHEDULER),
    }, boundary_ratio=A14B_BOUNDARY_RATIO if two_experts else None)


def _llm_family(name: str) -> dict[str, dict]:
    """A family whose text encoder is a language model (`draft.models.architectures_llm`)."""
    from draft.models import architectures_llm

    return getattr(architectures_llm, name)()


# Hub id -> its configs, built when asked for (so importing this module builds nothing).
ARCHITECTURES: dict[str, Callable[[], dict[str, dict]]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _sd15,
    "stabilityai/stable-diffusion-xl-base-1.0": _sdxl,
    "stabilityai/stable-diffusion-3.5-medium": _sd35_medium,
    "black-forest-labs/FLUX.1-dev": _flux_dev,
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": lambda: _wan(WAN_1_3B),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": lambda: _wan(WAN_14B),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": lambda: _wan(WAN_14B, two_experts=True),
    "Qwen/Qwen-Image": lambda: _llm_family("qwen_image"),
    "Tongyi-MAI/Z-Image-Turbo": lambda: _llm_family("z_image_turbo"),
    "black-forest-labs/FLUX.2-dev": lambda: _llm_family("flux2_dev"),
    "black-forest-labs/FLUX.2-klein-4B": lambda: _llm_family("flux2_klein_4b"),
}

# Published parameter counts, by hub id and component: (count, relative tolerance, source). The
# tolerance is the rounding of the published figure.
PUBLISHED = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {
        "unet": (860e6, 0.01, "SD 1.5 model card: an 860M UNet"),
        "text_encoder": (123e6, 0.01, "SD 1.5 model card: a 123M text encoder"),
    },
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "unet": (2.567e9, 0.005, "SDXL paper (Podell et al. 2023), tab. 1: a 2.6B UNet; diffusers counts 2.567B"),
        "text_encoder": (123e6, 0.01, "CLIP ViT-L's text encoder, 123M"),
        "text_encoder_2": (694e6, 0.01, "SDXL paper, sec. 2.1: OpenCLIP ViT-bigG's text encoder, 694M"),
    },
    "stabilityai/stable-diffusion-3.5-medium": {
        "transformer": (2.5e9, 0.02, "SD 3.5 Medium model card: MMDiT-X, 2.5 billion parameters"),
        "text_encoder_3": (4.76e9, 0.01, "T5 v1.1 XXL's encoder, 4.76B"),
    },
    "black-forest-labs/FLUX.1-dev": {
        "transformer": (11.9e9, 0.01, "FLUX.1 [dev] model card: a 12 billion parameter transformer (11.9B)"),
        "text_encoder_2": (4.76e9, 0.01, "T5 v1.1 XXL's encoder, 4.76B"),
    },
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": {
        "transformer": (1.3e9, 0.1, "Wan 2.1 report (arXiv 2503.20314): the 1.3B model"),
        "text_encoder": (5.7e9, 0.01, "umT5-XXL's encoder, 5.7B"),
        "vae": (127e6, 0.01, "Wan 2.1 report, sec. 3.1: Wan-VAE, 127M parameters"),
    },
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": {
        "transformer": (14e9, 0.05, "Wan 2.1 report: the 14B model"),
    },
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": {
        "transformer": (14e9, 0.05, "Wan 2.2 model card: two 14B experts, 27B in all, 14B active a step"),
        "transformer_2": (14e9, 0.05, "Wan 2.2 model card: two 14B experts"),
    },
    "Qwen/Qwen-Image": {
        "transformer": (20e9, 0.03, "Qwen-Image technical report (arXiv 2508.02324): a 20B MMDiT"),
        "text_encoder": (8.29e9, 0.01, "Qwen2.5-VL-7B-Instruct's model page: 8.29B parameters (vision tower included)"),
        "vae": (127e6, 0.01, "Wan 2.1's VAE, which Qwen-Image's shares (Wan 2.1 report: 127M)"),
    },
    "Tongyi-MAI/Z-Image-Turbo": {
        "transformer": (6e9, 0.03, "Z-Image technical report (arXiv 2511.22699): a 6B single-stream DiT"),
        "text_encoder": (4.0e9, 0.01, "Qwen3-4B's model card: 4.0B parameters"),
    },
    "black-forest-labs/FLUX.2-dev": {
        "transformer": (32e9, 0.01, "FLUX.2 [dev] model card: a 32 billion parameter flow transformer"),
        "text_encoder": (24e9, 0.01, "Mistral Small 3.1's model card: 24 billion parameters, vision included"),
    },
    "black-forest-labs/FLUX.2-klein-4B": {
        "transformer": (4e9, 0.05, "FLUX.2 [klein] 4B model card: a 4 billion parameter flow transformer"),
        "text_encoder": (4.0e9, 0.01, "Qwen3-4B's model card: 4.0B parameters"),
    },
}


def architecture(hub_id: str) -> dict[str, dict]:
    """The configs of a known hub model (path in its folder -> JSON); UserError naming the
    known ones otherwise."""
    if hub_id not in ARCHITECTURES:
        raise unknown("built-in architecture", hub_id, ARCHITECTURES)
    return ARCHITECTURES[hub_id]()


def write_configs(hub_id: str, folder: str | Path) -> Path:
    """Write the configs-only pipeline folder of `hub_id` into `folder`; return `folder`."""
    folder = Path(folder)
    for relative, content in architecture(hub_id).items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    return folder


_written: dict[str, Path] = {}


def builtin_configs(hub_id: str) -> Path | None:
    """A folder with `hub_id`'s configs for this process (removed at exit), or None for a hub
    id draft has no copy of. The dry run's fallback when the configs are not cached."""
    if hub_id not in ARCHITECTURES:
        return None
    if hub_id not in _written:
        root = Path(tempfile.mkdtemp(prefix="draft-architecture-"))
        atexit.register(shutil.rmtree, root, True)
        _written[hub_id] = write_configs(hub_id, root / "pipeline")
    return _written[hub_id]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the configs come from the copies here, never the hub
    p = argparse.ArgumentParser(prog="python -m draft.models.architectures", description=__doc__.splitlines()[0])
    p.add_argument("--write", nargs=2, metavar=("HUB_ID", "FOLDER"), help="write a hub model's configs to FOLDER")
    args = p.parse_args(argv)
    if args.write:
        print(write_configs(*args.write))
    else:
        p.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
