"""Stable Diffusion 3 / 3.5: a diffusers `StableDiffusion3Pipeline` (`shapes-flow` included).

An MMDiT transformer over patchified latents, two CLIP text encoders (pooled embeddings)
and an optional T5 (a pipeline saved without `text_encoder_3` works, as in diffusers),
rectified flow with `FlowMatchEulerDiscreteScheduler`, classifier-free guidance.
"""

from __future__ import annotations

import torch

from draft.models.base import Size, meta
from draft.models.flow import FlowMatching


class StableDiffusion3(FlowMatching):
    pipeline_class = "StableDiffusion3Pipeline"
    family_name = "SD3"
    lora_prefix = "transformer"
    # The attention projections of the joint blocks, the image stream's and the text
    # (context) stream's `add_*` ones, as diffusers' SD3 LoRA scripts adapt them.
    default_lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    defaults = {
        "sampling.num_steps": (28, "StableDiffusion3Pipeline's default"),
        "sampling.guidance_scale": (7.0, "StableDiffusion3Pipeline's default"),
    }
    max_shift = 1.16  # the SD3 pipeline's fallback
    # Prompts longer than this many T5 tokens are cut (the pipeline's default).
    max_sequence_length = 256
    call_options = ("max_sequence_length",)

    @property
    def resolution(self) -> int:
        return self.denoiser_config.sample_size * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.denoiser_config.patch_size

    def image_tokens(self, size: Size) -> int:
        _, h, w = self.latent_shape(size)
        p = self.denoiser_config.patch_size
        return (h // p) * (w // p)

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance_scale: float = 7.0, size: Size = Size(),
                     negative_prompt: str = ""):
        """({prompt_embeds, pooled}, same for the negative prompt or None), as the pipeline encodes them."""
        prompts = list(prompts)
        negative = [negative_prompt] * len(prompts) if negative_prompt else None
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, prompts, prompts, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance_scale != 1, negative_prompt=negative, negative_prompt_2=negative,
            negative_prompt_3=negative, max_sequence_length=self.max_sequence_length,
        )
        cond = {"prompt_embeds": embeds, "pooled": pooled}
        uncond = None if guidance_scale == 1 else {"prompt_embeds": neg, "pooled": neg_pooled}
        return cond, uncond

    def meta_conditioning(self, batch: int, dtype: torch.dtype):
        # CLIP's tokens and the T5 positions the pipeline appends (zeros without a T5).
        cfg = self.denoiser_config
        tokens = self.text_tokens() + self.max_sequence_length
        return {"prompt_embeds": meta(batch, tokens, cfg.joint_attention_dim, dtype=dtype),
                "pooled": meta(batch, cfg.pooled_projection_dim, dtype=dtype)}

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The transformer's velocity prediction at x_t, in the latent's dtype."""
        dtype = self.weight_dtype
        out = self.denoiser(
            hidden_states=x.to(dtype),
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled"].to(dtype),
            return_dict=False,
        )[0]
        return out.to(x.dtype)
