"""Tiny, randomly initialised FLUX.2 [dev] and [klein] pipelines, built in code.

Real `diffusers.Flux2Pipeline` / `Flux2KleinPipeline` at toy size, after diffusers' own
tests/pipelines/flux2 (a `Flux2Transformer2DModel` of one double and one single block of 2
heads of 16 channels, 4-D rotary axes of 4), with three changes so that nothing is
downloaded and the pipelines' defaults are exercised rather than overridden:

- the text encoders are deep enough for the layers the pipelines stack by default (dev's
  10, 20, 30 of a `Mistral3ForConditionalGeneration`; klein's 9, 18, 27 of a
  `Qwen3ForCausalLM`), at width 8, so the prompt embedding is 24 wide;
- the tokenizer is the byte-level BPE written in code (`draft.models.tokenizer`) with the
  chat layouts the real ones render: Mistral's system and instruction markers around
  FLUX.2's system message, and Qwen3's turn with thinking switched off (the empty think
  block klein's pipeline asks for). dev's real tokenizer is a `PixtralProcessor`, whose
  chat template for text-only messages is the tokenizer's;
- the VAE (`AutoencoderKLFlux2`, 3 levels, so 4x, and 4 latent channels patchified to 16)
  has batch-norm statistics that are not the identity, so the denormalisation before the
  decode matters.

32 px images give [16, 4, 4] latents, 16 tokens. Saved with `save_pretrained`, each loads with
its pipeline's `from_pretrained` through the same code as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from draft.models.tiny import WORDS
from draft.models.tokenizer import qwen_word_tokenizer

# Mistral's chat layout as Mistral Small 3.x's template renders a system and a user message
# whose content is a list of text parts (the form Flux2Pipeline's format_input builds).
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% set text = message['content'] if message['content'] is string "
    "else message['content'] | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)
# Qwen3's turn as Flux2KleinPipeline renders it (add_generation_prompt, enable_thinking=False).
QWEN3_NO_THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Prompt tokens the tiny pipelines are run with (the adapter's max_sequence_length): the system
# message and a prompt fit.
TINY_TEXT_LENGTH = 64


def _tokenizer(extra: list[str], markers: tuple[str, ...], template: str, max_length: int = TINY_TEXT_LENGTH):
    from tokenizers import AddedToken

    tokenizer = qwen_word_tokenizer([*WORDS, *extra], max_length=max_length)
    tokenizer.add_tokens([AddedToken(t, special=True) for t in markers])
    tokenizer.chat_template = template
    return tokenizer


def chat_tokenizer(pipeline_class: str, max_length: int = TINY_TEXT_LENGTH):
    """The word tokenizer with the chat layout `pipeline_class` renders its prompts in (one of
    the language-model-prompted families: FLUX.2 dev and klein, Qwen-Image, Z-Image), its
    template's words single tokens as with the real vocabulary. The tiny pipelines' own, and
    the stand-in for the real-size ones benchmarks/speed_memory.py builds (no vocabulary is
    downloaded)."""
    from draft.models.tiny_qwen import QWEN3_CHAT_TEMPLATE, TEMPLATE_WORDS

    if pipeline_class == "Flux2Pipeline":
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        return _tokenizer(SYSTEM_MESSAGE.replace(",", "").split(),
                          ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"), MISTRAL_CHAT_TEMPLATE,
                          max_length)
    if pipeline_class == "Flux2KleinPipeline":
        return _tokenizer(["user", "assistant"], ("<think>", "</think>"), QWEN3_NO_THINKING_TEMPLATE, max_length)
    if pipeline_class == "ZImagePipeline":
        return _tokenizer(["user", "assistant"], (), QWEN3_CHAT_TEMPLATE, max_length)
    if pipeline_class == "QwenImagePipeline":  # the pipeline writes its template itself
        return qwen_word_tokenizer([*WORDS, *TEMPLATE_WORDS], max_length=max_length)
    raise ValueError(f"no chat tokenizer for {pipeline_class}")


def _mistral3(tokenizer):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    special = dict(bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                         max_position_embeddings=512, num_attention_heads=2, num_hidden_layers=30,
                         num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None,
                         **special),
        vision_config=dict(model_type="pixtral", hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, image_size=12, patch_size=6, num_channels=3),
        image_token_index=ids("<|image_pad|>"), image_seq_length=4, vision_feature_layer=-1, **special,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def _qwen3(tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ids = tokenizer.convert_tokens_to_ids
    return Qwen3ForCausalLM(Qwen3Config(
        hidden_size=8, intermediate_size=16, num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1,
        head_dim=4, vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )).eval()


def _transformer_and_vae(guidance: bool):
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance,
    )
    vae = AutoencoderKLFlux2(
        sample_size=32, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    with torch.no_grad():  # statistics of a trained VAE's latents, not the identity
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 16))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    return transformer, vae


def tiny_flux2_pipeline(folder: Path, seed: int = 0):
    """A toy-sized Flux2Pipeline (FLUX.2-dev's layout: Mistral 3, guidance embedding).
    `folder` is unused (the tokenizer is built in memory), kept for the builders' signature."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    del folder
    torch.manual_seed(seed)
    tokenizer = chat_tokenizer("Flux2Pipeline")
    transformer, vae = _transformer_and_vae(guidance=True)
    # FLUX.2-dev's scheduler: dynamic shifting, mu from the pipeline's empirical fit.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=_mistral3(tokenizer), tokenizer=tokenizer,
                         transformer=transformer)


def tiny_flux2_klein_pipeline(folder: Path, seed: int = 0, distilled: bool = False):
    """A toy-sized Flux2KleinPipeline (Qwen3, no guidance embedding); `distilled` marks it as
    the step-distilled checkpoints are (no guidance)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    del folder
    torch.manual_seed(seed)
    tokenizer = chat_tokenizer("Flux2KleinPipeline")
    transformer, vae = _transformer_and_vae(guidance=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=_qwen3(tokenizer), tokenizer=tokenizer,
                              transformer=transformer, is_distilled=distilled)
