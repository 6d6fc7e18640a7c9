"""Tiny, randomly initialised Stable Diffusion pipelines, built in code, for tests and benchmarks.

They have the real architecture classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, DDIMScheduler) at toy sizes, or at Stable Diffusion 1.5's sizes with random
weights, and are saved with `save_pretrained` so they load through the same code as real
checkpoints. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from draft.models.tokenizer import word_tokenizer

WORDS = "a small large red green blue yellow purple orange white black circle square triangle star on background".split()
PROMPTS = ["a small red circle on a blue background", "a large green square on a white background",
           "a small yellow triangle on a black background", "a large purple star on a orange background"]


def _pipeline(tokenizer, text_config: dict, unet_config: dict, vae_config: dict, prediction_type: str):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **text_config,
    ))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionPipeline(unet=UNet2DConditionModel(**unet_config), vae=AutoencoderKL(**vae_config),
                                   text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_pipeline(folder: Path, prediction_type: str = "epsilon", seed: int = 0):
    """A toy-sized SD pipeline (32 px images, 4x8x8 latents); `folder` receives the tokenizer files."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(Path(folder) / "tokenizer_files", WORDS, max_length=16)
    return _pipeline(
        tokenizer,
        dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_hidden_layers=2, max_position_embeddings=16),
        dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
             norm_num_groups=8, sample_size=32),
        prediction_type,
    )


def sd15_pipeline(folder: Path, seed: int = 0):
    """Stable Diffusion 1.5's exact UNet, VAE and text-encoder architectures with random weights.

    For speed and memory benchmarks at real scale without a download; the images are noise.
    """
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(Path(folder) / "tokenizer_files", WORDS, max_length=77)
    return _pipeline(
        tokenizer,
        dict(vocab_size=max(len(tokenizer), 1000), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
             num_hidden_layers=12, max_position_embeddings=77),
        dict(sample_size=64, cross_attention_dim=768),  # the other defaults are SD 1.x's
        dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512),
        "epsilon",
    )


def build_tiny_pipeline(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny pipeline to folder/pipeline and return that path."""
    tiny_pipeline(folder, prediction_type, seed).save_pretrained(folder / "pipeline")
    return folder / "pipeline"
