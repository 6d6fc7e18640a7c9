"""Real-size architectures of the families whose text encoder is a language model
(Qwen-Image: Qwen2.5-VL 7B; Z-Image: Qwen3 4B), as configs only; `draft.models.architectures` registers them
beside the others and documents the scheme (what is written, and why no weight is read).
"""

from __future__ import annotations

from draft.models.architectures import FLUX_VAE, D, T, WAN_VAE, _pipeline
from draft.models.architectures_text import tokenizer


def qwen25_vl_7b() -> dict:
    """Qwen/Qwen-Image text_encoder/config.json: Qwen2.5-VL-7B-Instruct (28 layers of width
    3584, grouped-query attention with 4 key/value heads, multimodal rotary sections
    16/24/24) with its vision tower (32 blocks of width 1280), which text-to-image never runs
    but the class builds and the folder stores."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "text_config": {
            "model_type": "qwen2_5_vl_text", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
            "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
        },
        "vision_config": {
            "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
            "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
        "vocab_size": 152064, "hidden_size": 3584, "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    }


# Qwen/Qwen-Image transformer/config.json: 60 double-stream blocks of 24 heads of 128, 2x2
# patches of 16 latent channels, Qwen2.5-VL's 3584-wide text.
QWEN_IMAGE_TRANSFORMER = {
    "_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 64, "out_channels": 16,
    "num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
    "guidance_embeds": False, "axes_dims_rope": [16, 56, 56],
}
# Qwen/Qwen-Image vae/config.json: Wan 2.1's VAE layout and latent statistics.
QWEN_IMAGE_VAE = {**WAN_VAE, "_class_name": "AutoencoderKLQwenImage"}
# Qwen/Qwen-Image scheduler/scheduler_config.json: FLUX's dynamic shift over 256 to 8192
# tokens (0.5 to 0.9), exponential, with the last sigma stretched to 0.02.
QWEN_IMAGE_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
    "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5,
    "max_shift": 0.9, "shift_terminal": 0.02, "time_shift_type": "exponential",
}
# Qwen/Qwen-Image tokenizer/tokenizer_config.json (Qwen2.5's context length; the pipeline cuts
# prompts to its own max_sequence_length).
QWEN_TOKENIZER = tokenizer("Qwen2Tokenizer", 131072)


def qwen_image() -> dict[str, dict]:
    return _pipeline("QwenImagePipeline", {
        "transformer": (D, "QwenImageTransformer2DModel", QWEN_IMAGE_TRANSFORMER),
        "vae": (D, "AutoencoderKLQwenImage", QWEN_IMAGE_VAE),
        "text_encoder": (T, "Qwen2_5_VLForConditionalGeneration", qwen25_vl_7b()),
        "tokenizer": (T, "Qwen2Tokenizer", QWEN_TOKENIZER),
        "scheduler": (D, "FlowMatchEulerDiscreteScheduler", QWEN_IMAGE_SCHEDULER),
    })


def qwen3_4b() -> dict:
    """Tongyi-MAI/Z-Image-Turbo text_encoder/config.json: Qwen3-4B's language model (36 layers
    of width 2560, 32 query and 8 key/value heads of 128, tied embeddings), loaded as
    `Qwen3Model` (no head)."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560,
        "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
    }


# Tongyi-MAI/Z-Image-Turbo transformer/config.json: 30 single-stream layers of width 3840
# (30 heads of 128) after 2 noise and 2 caption refiner layers, 2x2 patches of 16 channels.
Z_IMAGE_TRANSFORMER = {
    "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16,
    "dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5,
    "qk_norm": True, "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}
# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json: a fixed shift of 3.
Z_IMAGE_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                     "use_dynamic_shifting": False}


def z_image_turbo() -> dict[str, dict]:
    return _pipeline("ZImagePipeline", {
        "transformer": (D, "ZImageTransformer2DModel", Z_IMAGE_TRANSFORMER),
        "vae": (D, "AutoencoderKL", FLUX_VAE),  # FLUX.1's VAE
        "text_encoder": (T, "Qwen3Model", qwen3_4b()),
        "tokenizer": (T, "Qwen2Tokenizer", QWEN_TOKENIZER),
        "scheduler": (D, "FlowMatchEulerDiscreteScheduler", Z_IMAGE_SCHEDULER),
    })


# --- FLUX.2 ---------------------------------------------------------------------------------------
# The published configs of black-forest-labs/FLUX.2-dev and FLUX.2-klein-4B: the transformer's are
# diffusers' `Flux2Transformer2DModel` defaults (dev) and klein-4B's smaller stack; the counts
# the meta builds give were checked against the published ones (`architectures.PUBLISHED`).


def mistral_small_3() -> dict:
    """FLUX.2-dev text_encoder/config.json: Mistral Small 3.x 24B (40 layers of width 5120, 32
    query and 8 key/value heads of 128, untied 131k-token embeddings) with its Pixtral vision
    tower (24 layers of width 1024), which text-to-image never runs but the class builds."""
    return {
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
        "text_config": {
            "model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768,
            "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1e9,
            "sliding_window": None, "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "head_dim": 64, "image_size": 1540, "patch_size": 14, "num_channels": 3,
            "rope_theta": 10000.0,
        },
        "multimodal_projector_bias": False, "projector_hidden_act": "gelu", "spatial_merge_size": 2,
        "vision_feature_layer": -1, "image_token_index": 10, "tie_word_embeddings": False,
    }


# FLUX.2-dev transformer/config.json: 8 double- and 48 single-stream blocks of 48 heads of 128,
# 128 patchified latent channels, the three stacked Mistral layers (3 x 5120) as text, 4-D rotary
# axes, the guidance embedding.
FLUX2_DEV_TRANSFORMER = {
    "_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128, "num_layers": 8,
    "num_single_layers": 48, "attention_head_dim": 128, "num_attention_heads": 48, "joint_attention_dim": 15360,
    "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000,
    "eps": 1e-6, "guidance_embeds": True,
}
# FLUX.2-klein-4B transformer/config.json: 5 double and 20 single blocks of 24 heads of 128, the
# three stacked Qwen3-4B layers (3 x 2560) as text, no guidance embedding.
FLUX2_KLEIN_4B_TRANSFORMER = {**FLUX2_DEV_TRANSFORMER, "num_layers": 5, "num_single_layers": 20,
                              "num_attention_heads": 24, "joint_attention_dim": 7680, "guidance_embeds": False}
# The FLUX.2 VAE (vae/config.json of both): FLUX.1's 4 levels at 32 latent channels, whose 2x2
# patches the batch norm's 128 running statistics normalise.
FLUX2_VAE = {
    "_class_name": "AutoencoderKLFlux2", "in_channels": 3, "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2,
    "latent_channels": 32, "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": True,
    "use_post_quant_conv": True, "batch_norm_eps": 1e-4, "patch_size": [2, 2],
}
# FLUX.2 scheduler/scheduler_config.json: dynamic shifting on (the pipeline passes its own mu).
FLUX2_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                   "use_dynamic_shifting": True, "time_shift_type": "exponential"}
# Mistral Small 3.x's tokenizer (read through its PixtralProcessor): its context; the pipeline
# pads and cuts prompts to its own max_sequence_length.
MISTRAL_TOKENIZER = tokenizer("LlamaTokenizerFast", 131072)


def flux2_dev() -> dict[str, dict]:
    return _pipeline("Flux2Pipeline", {
        "transformer": (D, "Flux2Transformer2DModel", FLUX2_DEV_TRANSFORMER),
        "vae": (D, "AutoencoderKLFlux2", FLUX2_VAE),
        "text_encoder": (T, "Mistral3ForConditionalGeneration", mistral_small_3()),
        "tokenizer": (T, "PixtralProcessor", MISTRAL_TOKENIZER),
        "scheduler": (D, "FlowMatchEulerDiscreteScheduler", FLUX2_SCHEDULER),
    })


def flux2_klein_4b() -> dict[str, dict]:
    """The step-distilled klein 4B (is_distilled: 4 steps, no guidance), Qwen3-4B with its head."""
    return _pipeline("Flux2KleinPipeline", {
        "transformer": (D, "Flux2Transformer2DModel", FLUX2_KLEIN_4B_TRANSFORMER),
        "vae": (D, "AutoencoderKLFlux2", FLUX2_VAE),
        "text_encoder": (T, "Qwen3ForCausalLM", qwen3_4b()),
        "tokenizer": (T, "Qwen2TokenizerFast", QWEN_TOKENIZER),
        "scheduler": (D, "FlowMatchEulerDiscreteScheduler", FLUX2_SCHEDULER),
    }, is_distilled=True)
