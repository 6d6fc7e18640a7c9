"""Human Preference Score v2 / v2.1 (Wu et al., 2023, "Human Preference Score v2").

HPSv2 is an open_clip ViT-H-14 (laion2B-s32B-b79K) fine-tuned on human preference pairs.
Its score is the cosine similarity of the normalised image and text embeddings, with no
logit scale (tgxs002/HPSv2, `hpsv2/img_score.py`: ``diag(image_features @
text_features.T)``); generated images score about 0.2-0.35.

Why not open_clip: it imports torchvision at import time, and a torchvision build must
match the installed torch exactly (on a mismatched pair it fails with "operator
torchvision::nms does not exist"). The checkpoint is therefore mapped onto transformers'
`CLIPModel`, which is the same network (pre-LN transformer, class-token pooling,
arg-max/EOT text pooling, GELU for ViT-H-14); the `parity` test checks it against
open_clip itself.

The published checkpoints (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`) are pickles;
convert the one you use once with `python -m draft.rewards.convert FILE.pt --trust-pickle`.
"""

from __future__ import annotations

import re

from draft.errors import UserError
from draft.rewards import Reward
from draft.rewards.clip import ClipEmbedder, freeze_model, load_tokenizer
from draft.rewards.loading import load_state_dict, weights_file
from draft.rewards.preprocess import ImageTransform

HPS_FILES = (
    "HPS_v2.1_compressed.safetensors",
    "HPS_v2_compressed.safetensors",
    "HPS_v2.1.safetensors",
    "HPS_v2.safetensors",
)
# open_clip's ViT-H-14 uses the OpenAI BPE tokenizer; this repo publishes it in HF format.
TOKENIZER_DEFAULT = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# open_clip residual-block names -> transformers CLIPEncoderLayer names.
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _blocks(state: dict, prefix: str, out: str) -> dict:
    """Map one tower's `{prefix}transformer.resblocks.N.*` onto `{out}encoder.layers.N.*`."""
    mapped = {}
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)")
    for key, value in state.items():
        m = pattern.fullmatch(key)
        if not m:
            continue
        i, rest = m.groups()
        layer = f"{out}encoder.layers.{i}."
        if rest.startswith("attn.in_proj_"):
            # open_clip fuses q, k, v into one projection; transformers keeps three.
            kind = rest.removeprefix("attn.in_proj_")
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                mapped[f"{layer}self_attn.{name}_proj.{kind}"] = part
            continue
        name, kind = rest.rsplit(".", 1)
        if name not in _BLOCK:
            raise UserError(f"unsupported open_clip block parameter {key!r} (layer scale or another variant)")
        mapped[layer + _BLOCK[name] + "." + kind] = value
    return mapped


def _layer_count(state: dict, prefix: str) -> int:
    found = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def openclip_to_hf(state: dict, vision_heads: int = 16, text_heads: int = 16, eos_token_id: int = 49407):
    """(CLIPConfig, state dict) for transformers' CLIPModel from an open_clip CLIP state dict.

    Sizes are read from the tensors; head counts are not recoverable from shapes and are
    given (ViT-H-14: 16 and 16). Activation is exact GELU, which is what open_clip uses
    for every model but the OpenAI "quick_gelu" ones.
    """
    from transformers import CLIPConfig

    try:
        conv = state["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        text_width = state["token_embedding.weight"].shape[1]
        config = CLIPConfig(
            projection_dim=state["visual.proj"].shape[1],
            vision_config=dict(
                hidden_size=width, patch_size=patch, image_size=grid * patch,
                intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_layer_count(state, "visual.transformer.resblocks."),
                num_attention_heads=vision_heads, hidden_act="gelu", layer_norm_eps=1e-5,
            ),
            text_config=dict(
                vocab_size=state["token_embedding.weight"].shape[0], hidden_size=text_width,
                max_position_embeddings=state["positional_embedding"].shape[0],
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_layer_count(state, "transformer.resblocks."),
                num_attention_heads=text_heads, hidden_act="gelu", layer_norm_eps=1e-5,
                eos_token_id=eos_token_id, bos_token_id=eos_token_id - 1, pad_token_id=0,
                projection_dim=state["text_projection"].shape[1],
            ),
        )
        hf = {
            "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
            "vision_model.embeddings.patch_embedding.weight": conv,
            "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
            "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
            "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
            "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
            "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
            "visual_projection.weight": state["visual.proj"].T,
            "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
            "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
            "text_model.final_layer_norm.weight": state["ln_final.weight"],
            "text_model.final_layer_norm.bias": state["ln_final.bias"],
            "text_projection.weight": state["text_projection"].T,
            "logit_scale": state["logit_scale"].reshape(()),
        }
    except KeyError as e:
        raise UserError(f"not an open_clip CLIP checkpoint: missing {e}") from None
    hf.update(_blocks(state, "visual.", "vision_model."))
    hf.update(_blocks(state, "", "text_model."))
    return config, {k: v.contiguous() for k, v in hf.items()}


class HPSv2(Reward):
    """HPS v2 / v2.1: cos(image, prompt) under the preference-tuned ViT-H-14 (about 0.2-0.35).

    Args:
        model: the converted checkpoint: a .safetensors file, a folder holding one of
            `HPS_FILES`, or a hub repo holding one. v2 and v2.1 differ only in weights.
        tokenizer: folder or hub id of the OpenAI CLIP BPE tokenizer in HF format.
        vision_heads, text_heads: attention heads per tower (16 and 16 for ViT-H-14).
        gradient_checkpointing: recompute activations in backward to save memory.
        dtype: "float16"/"bfloat16" to run the model in half precision.
    """

    def __init__(self, model: str | None = None, tokenizer: str = TOKENIZER_DEFAULT, vision_heads: int = 16,
                 text_heads: int = 16, gradient_checkpointing: bool = False, dtype: str | None = None):
        super().__init__()
        from transformers import CLIPModel

        state = load_state_dict(weights_file(model, HPS_FILES, "reward_args.hpsv2.model", "HPS_v2.1_compressed.pt"))
        tok = load_tokenizer(tokenizer, "reward_args.hpsv2.tokenizer")
        config, hf_state = openclip_to_hf(state, vision_heads, text_heads, tok.eos_token_id)
        clip = CLIPModel.from_pretrained(None, config=config, state_dict=hf_state)
        missing = set(clip.state_dict()) - set(hf_state)
        if missing:
            raise UserError(f"reward_args.hpsv2.model={model}: checkpoint lacks {sorted(missing)[:3]}")
        side = config.vision_config.image_size
        # HPSv2 scores with `light_augmentation=True`, i.e. ToTensor then ResizeMaxSize
        # (float bicubic resize of the long side, black letterbox), then the OpenAI mean/std.
        transform = ImageTransform("letterbox", (side, side), None, "bicubic", fill=0.0)
        self.clip = ClipEmbedder(freeze_model(clip, dtype), tok, transform, gradient_checkpointing)
        self.freeze()

    def score(self, images, prompts):
        return (self.clip.image(images) * self.clip.text(prompts, images.device)).sum(-1)
