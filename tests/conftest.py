"""Shared fixtures: a tiny, randomly initialised Stable Diffusion pipeline built in code.

Nothing is downloaded. The pipeline has the real architecture classes (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler) at toy sizes, is saved with
`save_pretrained` and loaded back through the same code users go through.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = "a small large red green blue yellow purple orange white black circle square triangle star on background".split()
PROMPTS = ["a small red circle on a blue background", "a large green square on a white background",
           "a small yellow triangle on a black background", "a large purple star on a orange background"]


def write_word_tokenizer(folder: Path, words: list[str], max_length: int = 16):
    """A CLIP BPE tokenizer in which every word of `words` is a single token."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    merges: list[str] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in sorted(set("".join(words))):
        add(ch)
        add(ch + "</w>")
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right until the word is one token
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
            add(parts[0])
    add("<|startoftext|>")
    add("<|endoftext|>")
    raw = folder / "raw_tokenizer"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=max_length)


def build_tiny_pipeline(folder: Path, prediction_type: str = "epsilon", seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_word_tokenizer(folder, WORDS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
        norm_num_groups=8, sample_size=32,
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """Path of a tiny random SD pipeline folder (epsilon prediction)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """Path of a tiny random SD pipeline folder with v-prediction (SD 2.x style)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction", seed=1)


@pytest.fixture
def tiny_model(tiny_sd):
    from draft.models import load_model

    return load_model(str(tiny_sd))


@pytest.fixture
def prompts():
    return list(PROMPTS)
