"""ImageReward (Xu et al., NeurIPS 2023, "ImageReward: Learning and Evaluating Human
Preferences for Text-to-Image Generation").

A BLIP model (ViT-L/16 image encoder; BERT-base text encoder with cross-attention to
the image tokens) reads the prompt while attending to the image; the [CLS] feature goes
through a linear MLP head, and the result is standardised with the training set's mean
and std (THUDM/ImageReward, `ImageReward/ImageReward.py`, `ImageReward.score`). Scores are
roughly standard normal: about -2 (poor) to +2 (preferred).

Why our own loader: the `image-reward` package imports helpers that transformers removed
(`apply_chunking_to_forward` and friends from `transformers.modeling_utils`), and pins
timm 0.6 and fairscale. Its network is BLIP's, which transformers ships as
`BlipVisionModel` and `BlipTextModel`, so the checkpoint's keys are mapped onto those; the
`parity` test checks the result against the package itself.

The published `ImageReward.pt` is a pickle; convert it once with
`python -m draft.rewards.convert ImageReward.pt --trust-pickle`.
"""

from __future__ import annotations

import re

import torch

from draft.errors import UserError
from draft.rewards import Reward
from draft.rewards.aesthetic import MLPHead
from draft.rewards.clip import freeze_model, load_tokenizer, model_dtype, tokenize
from draft.rewards.loading import checkpoint_layers, load_state_dict, weights_file
from draft.rewards.preprocess import ImageTransform

IMAGEREWARD_FILES = ("ImageReward.safetensors", "model.safetensors")
TOKENIZER_DEFAULT = "bert-base-uncased"
# Standardisation constants of ImageReward v1.0 (ImageReward.py, ImageReward.__init__).
MEAN, STD = 0.16717362830052426, 1.0333394966054072

# BLIP/timm ViT block names -> transformers BlipEncoderLayer names.
_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _vision_state(state: dict) -> dict:
    p = "blip.visual_encoder."
    out = {
        "embeddings.class_embedding": state[p + "cls_token"],
        "embeddings.position_embedding": state[p + "pos_embed"],
        "embeddings.patch_embedding.weight": state[p + "patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": state[p + "patch_embed.proj.bias"],
        "post_layernorm.weight": state[p + "norm.weight"],
        "post_layernorm.bias": state[p + "norm.bias"],
    }
    for key, value in state.items():
        if m := re.fullmatch(re.escape(p) + r"blocks\.(\d+)\.(.+)\.(weight|bias)", key):
            i, name, kind = m.groups()
            if name not in _VIT_BLOCK:
                raise UserError(f"unsupported BLIP vision parameter {key!r}")
            out[f"encoder.layers.{i}.{_VIT_BLOCK[name]}.{kind}"] = value
    return out


def _count(state: dict, pattern: str) -> int:
    return 1 + max(int(m.group(1)) for k in state if (m := re.match(pattern, k)))


def blip_to_hf(state: dict, vision_heads: int = 16, text_heads: int = 12):
    """(BlipVisionConfig, vision state, BlipTextConfig, text state) from ImageReward's keys.

    Sizes are read from the tensors; head counts are not recoverable from shapes and are
    given (ImageReward v1.0: ViT-L/16 with 16 heads, BERT-base with 12). LayerNorm eps
    follow BLIP: 1e-6 in the ViT, 1e-12 in BERT.
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    try:
        vision = _vision_state(state)
        patch = vision["embeddings.patch_embedding.weight"]
        grid = int(round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
        vision_config = BlipVisionConfig(
            hidden_size=patch.shape[0], patch_size=patch.shape[-1], image_size=grid * patch.shape[-1],
            intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=_count(state, r"blip\.visual_encoder\.blocks\.(\d+)\."),
            num_attention_heads=vision_heads, layer_norm_eps=1e-6, hidden_act="gelu",
        )
        p = "blip.text_encoder."
        text = {k.removeprefix(p): v for k, v in state.items() if k.startswith(p)}
        words = text["embeddings.word_embeddings.weight"]
        text_config = BlipTextConfig(
            vocab_size=words.shape[0], hidden_size=words.shape[1],
            encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
            intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
            num_hidden_layers=_count(text, r"encoder\.layer\.(\d+)\."), num_attention_heads=text_heads,
            max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
            layer_norm_eps=1e-12, hidden_act="gelu",
        )
    except (KeyError, ValueError) as e:
        raise UserError(f"not an ImageReward (BLIP) checkpoint: missing {e}") from None
    return vision_config, vision, text_config, text


class ImageReward(Reward):
    """ImageReward v1.0 score, standardised (about -2 to +2).

    Args:
        model: the converted checkpoint: a .safetensors file, a folder holding one of
            `IMAGEREWARD_FILES`, or a hub repo holding one.
        tokenizer: folder or hub id of the bert-base-uncased tokenizer BLIP uses.
        vision_heads, text_heads: attention heads (16 and 12 for ImageReward v1.0).
        max_length: prompt length in tokens (35, as ImageReward truncates).
        gradient_checkpointing: recompute activations in backward to save memory.
        dtype: "float16"/"bfloat16" to run BLIP in half precision (the head stays float32).
    """

    def __init__(self, model: str | None = None, tokenizer: str = TOKENIZER_DEFAULT, vision_heads: int = 16,
                 text_heads: int = 12, max_length: int = 35, gradient_checkpointing: bool = False,
                 dtype: str | None = None):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        key = "reward_args.imagereward.model"
        state = load_state_dict(weights_file(model, IMAGEREWARD_FILES, key, "ImageReward.pt"))
        vision_config, vision, text_config, text = blip_to_hf(state, vision_heads, text_heads)
        self.vision = freeze_model(_load(BlipVisionModel, vision_config, vision, key), dtype)
        self.text = freeze_model(_load(BlipTextModel, text_config, text, key, add_pooling_layer=False), dtype)
        self.head = MLPHead({k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")})
        self.tokenizer = load_tokenizer(tokenizer, "reward_args.imagereward.tokenizer")
        self.max_length = int(max_length)
        side = vision_config.image_size
        # ImageReward's `_transform`: PIL bicubic resize of the short side, torchvision
        # CenterCrop (rounded offset), OpenAI CLIP mean/std.
        self.transform = ImageTransform("shortest", (side, side), (side, side), "bicubic", "round", clamp=True)
        if gradient_checkpointing:
            checkpoint_layers(self.vision.encoder.layers)
            checkpoint_layers(self.text.encoder.layer)
        self.freeze()

    def score(self, images, prompts):
        pixels = self.transform(images).to(model_dtype(self.vision))
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        batch = tokenize(self.tokenizer, prompts, images.device, self.max_length, padding="max_length")
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=images.device)
        out = self.text(**batch, encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask)
        reward = self.head(out.last_hidden_state[:, 0].float()).squeeze(-1)
        return (reward - MEAN) / STD


def _load(cls, config, state: dict, key: str, **kwargs):
    model = cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise UserError(f"{key}: checkpoint lacks {sorted(missing)[:3]}")
    return model
