"""Tiny, randomly initialised Qwen-Image and Z-Image pipelines, built in code (both prompt a
Qwen language model through its chat template).

A real `diffusers.QwenImagePipeline` at toy size, after diffusers' own
tests/pipelines/qwenimage/test_qwenimage.py: a `QwenImageTransformer2DModel` (2 blocks of
2 heads of 16 channels, text width 16), the 3-D `AutoencoderKLQwenImage` with 4 latent
channels and 4x spatial compression, a `Qwen2_5_VLForConditionalGeneration` built from a
`Qwen2_5_VLConfig` (the class the pipeline loads; diffusers' tests fetch a tokenizer from
the Hub, which we may not), a byte-level BPE `Qwen2Tokenizer` written in code in which
the chat template's words are single tokens, so its system prefix is the 34 tokens the
pipeline drops, as with Qwen's own tokenizer, and Qwen-Image's scheduler (dynamic shift,
exponential time shift, terminal sigma 0.02) rescaled to the toy token counts. Saved with
`save_pretrained`, it loads with `QwenImagePipeline.from_pretrained(folder)` through the
same code as a real checkpoint. Nothing is downloaded.

The Z-Image one follows diffusers' tests/pipelines/z_image/test_z_image.py the same way: a
`ZImageTransformer2DModel` (2 layers of width 32, one refiner layer), FLUX.1's VAE layout
with 16 latent channels, a `Qwen3Model` and the byte-level tokenizer with Qwen3's chat
template (the user turn and the assistant's opening, as Qwen3 writes it with thinking on).
"""

from __future__ import annotations

from pathlib import Path

import torch

from draft.models.tiny import WORDS
from draft.models.tokenizer import qwen_word_tokenizer

# The words of QwenImagePipeline's prompt template (its `prompt_template_encode`).
TEMPLATE_WORDS = ("system Describe the image by detailing color shape size texture quantity text spatial "
                  "relationships of objects and background user assistant").split()

# Qwen/Qwen-Image scheduler/scheduler_config.json, with the token counts the shift runs
# between (256 to 8192 tokens, 256 px to 1448 px) scaled to the toy sizes (1 to 64 tokens).
QWEN_IMAGE_SCHEDULER = dict(base_image_seq_len=1, max_image_seq_len=64, base_shift=0.5, max_shift=0.9,
                            shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
                            use_dynamic_shifting=True)


def tiny_qwen_text_encoder(tokenizer, hidden: int = 16):
    """A Qwen2_5_VLForConditionalGeneration at toy size for `tokenizer` (its vision tower too:
    the class has one; text-to-image never runs it)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), bos_token_id=ids("<|endoftext|>"),
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"), rope_theta=1000000.0,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden),
        vocab_size=len(tokenizer), hidden_size=hidden, bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"), image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_pipeline(folder: Path, seed: int = 0):
    """A toy-sized QwenImagePipeline: 32 px images, 4x8x8 latents, so 4x4 packed tokens.

    The VAE's latents_mean/std are not the identity, so the denormalisation before the
    decode matters. `folder` is unused (the tokenizer is built in memory) and kept for the
    signature every tiny-pipeline builder shares.
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    del folder
    torch.manual_seed(seed)
    tokenizer = qwen_word_tokenizer([*WORDS, *TEMPLATE_WORDS])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, -0.1],
                                 latents_std=[1.5, 0.8, 1.2, 2.0])
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
                             text_encoder=tiny_qwen_text_encoder(tokenizer), tokenizer=tokenizer,
                             transformer=transformer)


# Qwen3's chat template as ZImagePipeline renders it (one user message, add_generation_prompt,
# enable_thinking=True, which adds nothing): the turn, then the assistant's opening.
QWEN3_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json: a fixed shift of 3, no dynamic shift.
Z_IMAGE_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=False)


def tiny_z_image_pipeline(folder: Path, seed: int = 0):
    """A toy-sized ZImagePipeline: 32 px images, 16x4x4 latents (the VAE's 8x), so 2x2 patch tokens.

    `folder` is unused (the tokenizer is built in memory) and kept for the signature every
    tiny-pipeline builder shares.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    del folder
    torch.manual_seed(seed)
    tokenizer = qwen_word_tokenizer([*WORDS, "user", "assistant"], max_length=64)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    ))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # allocated with torch.empty (the real ones are trained): give them values
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                        latent_channels=16, norm_num_groups=8, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER), vae=vae,
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
