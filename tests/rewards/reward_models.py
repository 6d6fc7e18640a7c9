"""Tiny random reward models and test images, built in code and saved in each real checkpoint's format.

Nothing is downloaded: every architecture is the real transformers class at toy sizes,
tokenizers come from a word-level vocabulary written here, and checkpoints that are
published in another layout (open_clip for HPSv2, BLIP for ImageReward, the aesthetic
MLP) are written in that layout, so the tests go through the same loaders as users.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("a an the photo of cat dog red blue green small large circle square on background "
         "painting sunset over mountains").split()
PROMPTS = ["a photo of a cat", "a red circle on a blue background", "a painting of a sunset over mountains",
           "a small green square"]
SIDE = 32  # input side of every tiny vision model


def write_clip_tokenizer(folder: Path, max_length: int = 77):
    """A CLIP BPE tokenizer in which each word of WORDS is one token (others fall to characters)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    merges: list[str] = []
    add = lambda token: vocab.setdefault(token, len(vocab))  # noqa: E731
    for ch in sorted(set("".join(WORDS)) | set("!.,'")):
        add(ch)
        add(ch + "</w>")
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            add(parts[0])
    add("<|startoftext|>")
    add("<|endoftext|>")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                        model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


def write_bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz")
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    tok = BertTokenizer(vocab=str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    return tok


def tiny_clip_config(vocab_size: int, act: str = "quick_gelu", projection_dim: int = 16):
    from transformers import CLIPConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act=act)
    return CLIPConfig(
        projection_dim=projection_dim,
        text_config=dict(common, vocab_size=vocab_size, max_position_embeddings=77,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(common, image_size=SIDE, patch_size=8),
    )


def seeded(fn):
    torch.manual_seed(0)
    return fn()


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Images like decoded samples: smooth colour fields with texture, on the 8-bit grid.

    Values are multiples of 1/255, so the PIL images the reference pipelines see hold
    exactly the same pixels as the tensors.
    """
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    x = (base + 0.15 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)
    return (x * 255).round() / 255


def to_pil(images: torch.Tensor):
    from PIL import Image

    return [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]


def torchvision_style_pixels(images: torch.Tensor, side: int, mean, std) -> torch.Tensor:
    """The `Resize(side, BICUBIC) -> CenterCrop(side) -> ToTensor -> Normalize` pipeline of
    OpenAI CLIP, the LAION predictor and ImageReward, done with PIL as torchvision does."""
    import numpy as np
    from PIL import Image

    out = []
    for im in to_pil(images):
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        size = (side, int(side * long / short)) if w <= h else (int(side * long / short), side)
        im = im.resize(size, Image.BICUBIC)
        w, h = im.size
        top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
        im = im.crop((left, top, left + side, top + side))
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
