"""Tiny, randomly initialised Wan 2.1 / 2.2 text-to-video pipelines, built in code.

A real `diffusers.WanPipeline` at toy size: a `WanTransformer3DModel` (two of them for a
Wan 2.2 A14B-style pipeline), the causal video VAE `AutoencoderKLWan` with Wan's 4x
temporal and 8x spatial compression, a `UMT5EncoderModel` built from a `UMT5Config` (the
class Wan's text encoder is; diffusers' own Wan tests fetch a tiny T5 from the Hub, which
we may not), a T5 tokenizer written in code, and the scheduler the real folders ship.
Saved with `save_pretrained`, it loads with `WanPipeline.from_pretrained(folder)` through
the same code as a real checkpoint. Nothing is downloaded.

Sizes follow diffusers' tests/pipelines/wan/test_wan.py: 16 px frames, 9 frames
(3 latent frames of 2x2, one token each after the 1x2x2 patch), which sample in well
under a second on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from draft.models.tiny import WORDS
from draft.models.tokenizer import t5_word_tokenizer

# The scheduler config of the Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers folders,
# key for key (diffusers' scripts/convert_wan_to_diffusers.py builds it as
# UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
# num_train_timesteps=1000, flow_shift=3.0) for every T2V model, Wan 2.2 A14B included;
# 5.0 for TI2V-5B, 16.0 for FLF2V). Everything but the flow keys is UniPC's default.
WAN_SCHEDULER_CONFIG = {
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

# Wan 2.2 A14B's model_index.json: `transformer` (the high-noise expert) runs the steps with
# t >= boundary_ratio * num_train_timesteps, `transformer_2` (low noise) the rest.
A14B_BOUNDARY_RATIO = 0.875

# The toy transformer of diffusers' Wan tests: 2 heads of 12 channels (rotary dims 4/4/4
# for frames/height/width), text width 32, Wan's 16 latent channels and 1x2x2 patches.
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)

# Wan 2.1's VAE layout (z_dim 16 with its real latents_mean/std defaults, temporal
# downsampling in the two deeper levels: 4x in time, 8x in space) at base width 3.
VAE_CONFIG = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, True, True], scale_factor_temporal=4, scale_factor_spatial=8)


def tiny_umt5(d_model: int = 32, max_length: int = 512):
    """(UMT5EncoderModel, T5 tokenizer) at toy size over the tiny pipelines' words.

    `max_length` is the tokenizer's model_max_length; 512 is WanPipeline's default
    `max_sequence_length` (and Wan's text length), so an adapter that reads it gets the
    pipeline's value.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_word_tokenizer(WORDS, max_length=max_length)
    encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))
    return encoder, tokenizer


def tiny_wan_pipeline(folder: Path, seed: int = 0, two_experts: bool = False):
    """A toy-sized WanPipeline: 16 px and 9 frames as in diffusers' tests (any multiple of 16 px
    and 4k + 1 frames work, up to 512 px and 125 frames: rope_max_seq_len is 32 positions).

    `two_experts=True` builds Wan 2.2 A14B's layout: a high-noise `transformer` and a
    low-noise `transformer_2` of the same architecture (independently initialised) and
    `boundary_ratio` 0.875. `folder` is unused (the tokenizer is built in memory) and kept
    for the signature every tiny-pipeline builder shares.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    del folder
    torch.manual_seed(seed)
    text_encoder, tokenizer = tiny_umt5(d_model=TRANSFORMER_CONFIG["text_dim"])
    transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    transformer_2 = WanTransformer3DModel(**TRANSFORMER_CONFIG) if two_experts else None
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=AutoencoderKLWan(**VAE_CONFIG),
        scheduler=UniPCMultistepScheduler.from_config(WAN_SCHEDULER_CONFIG),
        transformer=transformer, transformer_2=transformer_2,
        boundary_ratio=A14B_BOUNDARY_RATIO if two_experts else None,
    )


def build_tiny_wan(folder: Path, seed: int = 0, two_experts: bool = False) -> Path:
    """Save a tiny Wan pipeline to folder/pipeline and return that path."""
    path = Path(folder) / "pipeline"
    tiny_wan_pipeline(folder, seed=seed, two_experts=two_experts).save_pretrained(path)
    return path
