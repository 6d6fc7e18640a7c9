"""CLIP-based rewards: CLIPScore with any Hugging Face CLIP checkpoint, and PickScore.

Both score cosine similarity between the image and prompt embeddings of a CLIP model:

- ``clipscore``: CLIP-S of Hessel et al. (2021), "CLIPScore: A Reference-free Evaluation
  Metric for Image Captioning": w * max(cos, 0) with w = 2.5.
- ``pickscore``: PickScore v1 of Kirstain et al. (2023), "Pick-a-Pic", a CLIP ViT-H/14
  fine-tuned on human preferences: logit_scale.exp() * cos, as in the reference scorer
  (github.com/yuvalkirstain/PickScore, README "Inference").

The helpers below are shared with the other CLIP-shaped rewards (aesthetic, hpsv2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from draft.errors import UserError
from draft.rewards import Reward
from draft.rewards.loading import checkpoint_layers, from_pretrained, torch_dtype
from draft.rewards.preprocess import ImageTransform

CLIP_DEFAULT = "openai/clip-vit-large-patch14"
PICKSCORE_DEFAULT = "yuvalkirstain/PickScore_v1"
# PickScore's repo holds only the model; its processor is the base model's (PickScore README).
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def processor_config(source: str, key: str) -> dict | None:
    """The preprocessor_config.json of a local folder or hub repo, or None if it has none."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        file = path / "preprocessor_config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(str(source), "preprocessor_config.json")).read_text())
    except LocalEntryNotFoundError:  # offline and not cached: an error, not "no config"
        pass
    except EntryNotFoundError:  # the repo exists but has no processor config
        return None
    except Exception:  # no such repo, no network, ...
        pass
    raise UserError(f"{key}={source}: cannot get preprocessor_config.json from that folder or hub repo (or its cache)")


def load_tokenizer(source: str, key: str):
    """A Hugging Face tokenizer from a folder or hub id, with a UserError if it is missing."""
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, source, key, what="tokenizer files")


def freeze_model(model: torch.nn.Module, dtype: str | None) -> torch.nn.Module:
    dtype = torch_dtype(dtype)
    if dtype is not None:
        model = model.to(dtype)
    return model.requires_grad_(False).eval()


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def tokenize(tokenizer, prompts: list[str], device: torch.device, max_length: int, padding="longest") -> dict:
    batch = tokenizer(prompts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


class ClipEmbedder(torch.nn.Module):
    """Unit-norm image and text embeddings from a transformers CLIPModel.

    The vision and text towers are called directly (not `get_image_features`) because that
    method changed its return type between transformers 4 and 5.
    """

    def __init__(self, model, tokenizer, transform: ImageTransform, gradient_checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        if gradient_checkpointing:
            checkpoint_layers(model.vision_model.encoder.layers)
            if hasattr(model, "text_model"):
                checkpoint_layers(model.text_model.encoder.layers)

    def image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.transform(images).to(model_dtype(self.model))
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        limit = self.model.config.text_config.max_position_embeddings
        batch = tokenize(self.tokenizer, prompts, device, limit)
        pooled = self.model.text_model(**batch).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)


def load_clip_embedder(model: str, processor: str | None, key: str, dtype, gradient_checkpointing) -> ClipEmbedder:
    """A frozen ClipEmbedder for a Hugging Face CLIP folder or hub id."""
    from transformers import CLIPModel

    processor = processor or model
    clip = freeze_model(from_pretrained(CLIPModel, model, f"{key}.model"), dtype)
    tokenizer = load_tokenizer(processor, f"{key}.processor")
    config = processor_config(processor, f"{key}.processor")
    if config is None:
        # Every CLIP processor uses the OpenAI recipe; only the size follows the model.
        side = clip.config.vision_config.image_size
        config = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side},
                  "do_center_crop": True, "resample": 3}
    return ClipEmbedder(clip, tokenizer, ImageTransform.from_hf(config), gradient_checkpointing)


class ClipScore(Reward):
    """CLIP-S = scale * max(cos(image, prompt), 0) for any Hugging Face CLIP checkpoint.

    Args:
        model: folder or hub id of a transformers CLIPModel (safetensors).
        processor: folder or hub id with its tokenizer and preprocessor_config.json
            (default: `model`).
        scale: w in CLIP-S; 2.5 as in the paper.
        clamp: apply max(., 0) as in the paper; with False the raw scaled cosine is
            returned, which keeps a gradient even for images scored below zero.
        gradient_checkpointing: recompute encoder activations in backward to save memory.
        dtype: "float16"/"bfloat16" to run the model in half precision.
    """

    def __init__(self, model: str = CLIP_DEFAULT, processor: str | None = None, scale: float = 2.5,
                 clamp: bool = True, gradient_checkpointing: bool = False, dtype: str | None = None):
        super().__init__()
        self.clip = load_clip_embedder(model, processor, "reward_args.clipscore", dtype, gradient_checkpointing)
        self.scale, self.clamp = float(scale), bool(clamp)
        self.freeze()

    def score(self, images, prompts):
        cos = (self.clip.image(images) * self.clip.text(prompts, images.device)).sum(-1)
        return self.scale * (cos.clamp(min=0) if self.clamp else cos)


class PickScore(Reward):
    """PickScore v1: logit_scale.exp() * cos(image, prompt); about 18-24 on real images.

    Args:
        model: folder or hub id of the PickScore CLIPModel (default the published v1).
        processor: folder or hub id with the tokenizer and preprocessor_config.json
            (default the CLIP-ViT-H-14 repo PickScore was trained from).
        gradient_checkpointing, dtype: as for `clipscore`.
    """

    def __init__(self, model: str = PICKSCORE_DEFAULT, processor: str = PICKSCORE_PROCESSOR,
                 gradient_checkpointing: bool = False, dtype: str | None = None):
        super().__init__()
        self.clip = load_clip_embedder(model, processor, "reward_args.pickscore", dtype, gradient_checkpointing)
        self.freeze()

    def score(self, images, prompts):
        cos = (self.clip.image(images) * self.clip.text(prompts, images.device)).sum(-1)
        return self.clip.model.logit_scale.float().exp() * cos
