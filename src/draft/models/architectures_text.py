"""Real-size text encoders and tokenizers of the hub models draft's presets name, as configs
only (CLIP L and bigG, T5 v1.1 XXL, umT5 XXL); `draft.models.architectures` puts them in
its pipelines and documents the scheme. transformers reads these with the component's
config class (`CLIPTextConfig`, `T5Config`, `UMT5Config`); the keys are those of the hub
repositories' text_encoder*/config.json.
"""

from __future__ import annotations


def clip_l(projection: bool = False) -> dict:
    """OpenAI CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14's text_config), the
    text_encoder of SD 1.5, SDXL, SD3 and FLUX.1; SD3 loads it with its projection."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": 49408, "max_position_embeddings": 77,
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
        # The ids the SD 1.5 and SDXL files carry (copied from the OpenAI config).
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }


def clip_bigg() -> dict:
    """OpenCLIP ViT-bigG/14's text tower with its projection, SDXL's and SD3's text_encoder_2
    (stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json)."""
    return {
        "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
        "vocab_size": 49408, "max_position_embeddings": 77, "hidden_size": 1280, "intermediate_size": 5120,
        "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "projection_dim": 1280, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
    }


def _t5_xxl_layers() -> dict:
    """The encoder of T5 v1.1 XXL, shared by google/t5-v1_1-xxl and google/umt5-xxl: 24 gated-GELU
    layers of width 4096 (64 heads of 64), feed-forward 10240."""
    return {
        "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_decoder_layers": 24, "num_heads": 64,
        "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": False, "is_encoder_decoder": True, "decoder_start_token_id": 0,
        "pad_token_id": 0, "eos_token_id": 1,
    }


def t5_xxl() -> dict:
    """SD3's text_encoder_3 and FLUX.1's text_encoder_2: T5EncoderModel over google/t5-v1_1-xxl
    (its config.json; vocabulary 32128)."""
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 32128, **_t5_xxl_layers()}


def umt5_xxl() -> dict:
    """Wan's text_encoder: UMT5EncoderModel over google/umt5-xxl (Wan-AI/*-Diffusers
    text_encoder/config.json; ComfyUI's umt5_config_xxl.json agrees): T5-XXL's layers with a
    256384-token vocabulary and a relative-position bias in every layer."""
    return {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "vocab_size": 256384,
            "scalable_attention": True, **_t5_xxl_layers()}


def tokenizer(cls: str, length: int) -> dict:
    """A tokenizer_config.json: the class and the length prompts are padded or cut to."""
    return {"tokenizer_class": cls, "model_max_length": length}


CLIP_TOKENIZER = tokenizer("CLIPTokenizer", 77)  # CLIP's 77 positions
# google/t5-v1_1-xxl's limit, which SD3's and FLUX.1's tokenizer_*/tokenizer_config.json keep.
T5_TOKENIZER = tokenizer("T5Tokenizer", 512)
# Wan's text length (Wan2.1 wan/configs/shared_config.py text_len = 512, WanPipeline's default
# max_sequence_length); the Wan adapter pads to its own `max_sequence_length` whatever this says.
UMT5_TOKENIZER = tokenizer("T5Tokenizer", 512)
