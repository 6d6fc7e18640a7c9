"""Tiny, randomly initialised diffusers pipelines of every supported family, built in code,
for tests and benchmarks.

They have the real architecture classes (UNet2DConditionModel, SD3Transformer2DModel,
AutoencoderKL, CLIP and T5 text encoders and tokenizers, DDIM and flow-matching schedulers)
at toy sizes, or at Stable Diffusion 1.5's sizes with random weights, and are saved with
`save_pretrained` so they load through the same code as real checkpoints. Nothing is
downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from draft.models.tokenizer import t5_word_tokenizer, word_tokenizer

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
    """Save a tiny SD pipeline to folder/pipeline and return that path."""
    tiny_pipeline(folder, prediction_type, seed).save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def build_tiny(folder: Path, family: str, **kwargs) -> Path:
    """Save a tiny pipeline of `family` ("sd", "sd3", ...) to folder/pipeline and return that path."""
    TINY[family](folder, **kwargs).save_pretrained(Path(folder) / "pipeline")
    return Path(folder) / "pipeline"


def _clip_with_projection(tokenizer, seed_offset: int = 0):
    """A tiny CLIPTextModelWithProjection (hidden 32, projection 32) for `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, projection_dim=32,
    ))


def tiny_t5(folder: Path, max_length: int = 16, d_model: int = 32):
    """(T5EncoderModel, T5 tokenizer) at toy size over the tiny pipelines' words."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_word_tokenizer(WORDS, max_length=max_length)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2,
                                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return encoder, tokenizer


def _tiny_vae(shift_factor: float | None = None, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    extra = {} if shift_factor is None else {"shift_factor": shift_factor, "scaling_factor": 1.5035}
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32, **extra)


def tiny_sd3_pipeline(folder: Path, seed: int = 0, t5: bool = False, shift: float = 3.0,
                      dynamic_shift: bool = False):
    """A toy-sized StableDiffusion3Pipeline (32 px images, 4x8x8 latents, patch 2).

    Two CLIP encoders with projections; a T5 third encoder only with `t5=True` (SD3 runs
    without one, as in diffusers). `shift`/`dynamic_shift` configure the flow scheduler.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    tok = word_tokenizer(folder / "tokenizer_files", WORDS, max_length=16)
    tok_2 = word_tokenizer(folder / "tokenizer_2_files", WORDS, max_length=16)
    text_encoder_3, tok_3 = tiny_t5(folder, d_model=64) if t5 else (None, None)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    sched = dict(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64) if dynamic_shift else {}
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift, **sched),
        vae=_tiny_vae(shift_factor=0.0609), text_encoder=_clip_with_projection(tok), tokenizer=tok,
        text_encoder_2=_clip_with_projection(tok_2), tokenizer_2=tok_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tok_3,
    )


def tiny_flux_pipeline(folder: Path, seed: int = 0, guidance: bool = True):
    """A toy-sized FluxPipeline (32 px images, 4x4x4 latents, so 2x2 packed tokens).

    FLUX.1's layout at toy size: one joint and one single-stream block, a CLIP text encoder
    for the pooled embedding, a T5 for the sequence, a VAE with FLUX's 8x compression (so
    sizes are multiples of 16 px, as with the real model) and its shift/scaling factors,
    and FLUX.1-dev's dynamic shift rescaled to the toy token counts. `guidance=False`
    builds schnell's layout: no guidance embedding, a plain flow schedule.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    folder = Path(folder)
    tok = word_tokenizer(folder / "tokenizer_files", WORDS, max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16,
    ))
    text_encoder_2, tok_2 = tiny_t5(folder, d_model=32)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 4, 8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                        latent_channels=4, norm_num_groups=8, sample_size=32, shift_factor=0.1159,
                        scaling_factor=0.3611)
    if guidance:  # dev: the shift follows the token count (here 1 to 16 tokens, not 256 to 4096)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=1,
                                                    max_image_seq_len=16, base_shift=0.5, max_shift=1.15)
    else:  # schnell
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=tok_2, transformer=transformer)


# The tiny pipeline of each family, by the name tests use.
TINY = {"sd": tiny_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline,
        "flux-schnell": lambda folder, seed=0: tiny_flux_pipeline(folder, seed, guidance=False)}


def tiny_sdxl_pipeline(folder: Path, seed: int = 0):
    """A toy-sized StableDiffusionXLPipeline (32 px images, 4x8x8 latents).

    SDXL's layout at toy size, after diffusers' own SDXL pipeline tests: a UNet with the
    "text_time" added embedding (pooled text + six size/crop ids), linear attention
    projections and two transformer layers in the deeper block; a CLIPTextModel and a
    CLIPTextModelWithProjection whose hidden states are concatenated (cross-attention
    width 32 + 32); EulerDiscrete with the scheduler config SDXL ships (which also holds
    the DDIM keys our sampler reads).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    folder = Path(folder)
    tok = word_tokenizer(folder / "tokenizer_files", WORDS, max_length=16)
    tok_2 = word_tokenizer(folder / "tokenizer_2_files", WORDS, max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16,
    ))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 32,  # six time ids + the pooled projection
        cross_attention_dim=64, norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
        clip_sample=False, set_alpha_to_one=False, sample_max_value=1.0, skip_prk_steps=True,
    ))
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, text_encoder_2=_clip_with_projection(tok_2), tokenizer=tok,
        tokenizer_2=tok_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )


TINY["sdxl"] = tiny_sdxl_pipeline


def _tiny_wan(folder: Path, seed: int = 0, two_experts: bool = False):
    from draft.models.tiny_wan import tiny_wan_pipeline

    return tiny_wan_pipeline(folder, seed, two_experts=two_experts)


# Wan 2.1 (one transformer) and Wan 2.2 A14B (two experts), at 16 px and 9 frames.
TINY["wan"] = _tiny_wan
TINY["wan22"] = lambda folder, seed=0: _tiny_wan(folder, seed, two_experts=True)


def _tiny_qwen_image(folder: Path, seed: int = 0):
    from draft.models.tiny_qwen import tiny_qwen_image_pipeline

    return tiny_qwen_image_pipeline(folder, seed)


def _tiny_z_image(folder: Path, seed: int = 0):
    from draft.models.tiny_qwen import tiny_z_image_pipeline

    return tiny_z_image_pipeline(folder, seed)


TINY["qwen-image"] = _tiny_qwen_image  # 32 px, 4x4 packed tokens
TINY["z-image"] = _tiny_z_image  # 32 px, 2x2 patch tokens


def _tiny_flux2(folder: Path, seed: int = 0, klein: bool = False, distilled: bool = False):
    from draft.models import tiny_flux2

    if klein:
        return tiny_flux2.tiny_flux2_klein_pipeline(folder, seed, distilled=distilled)
    return tiny_flux2.tiny_flux2_pipeline(folder, seed)


TINY["flux2"] = _tiny_flux2  # FLUX.2 [dev]: 32 px, 16 channels of 4x4 patchified latents
TINY["flux2-klein"] = lambda folder, seed=0, distilled=False: _tiny_flux2(folder, seed, True, distilled)
