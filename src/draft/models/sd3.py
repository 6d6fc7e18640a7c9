"""Stable Diffusion 3 / 3.5: a diffusers `StableDiffusion3Pipeline` (`shapes-flow` included).

An MMDiT transformer over patchified latents, two CLIP text encoders (pooled embeddings)
and an optional T5 (a pipeline saved without `text_encoder_3` works, as in diffusers),
rectified flow with `FlowMatchEulerDiscreteScheduler`, classifier-free guidance.
"""

from __future__ import annotations

import torch

from draft.models.base import PipelineAdapter


class StableDiffusion3(PipelineAdapter):
    pipeline_class = "StableDiffusion3Pipeline"
    lora_prefix = "transformer"
    # The attention projections of the joint blocks, the image stream's and the text
    # (context) stream's `add_*` ones, as diffusers' SD3 LoRA scripts adapt them.
    default_lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    # Prompts longer than this many T5 tokens are cut (the pipeline's default).
    max_sequence_length = 256

    @property
    def resolution(self) -> int:
        return self.denoiser_config.sample_size * self.vae_scale_factor

    @property
    def denoiser_config(self):
        return self.pipe.transformer.config

    def latent_shape(self, height: int = 0, width: int = 0) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        h, w = self.check_size(height, width, f * self.denoiser_config.patch_size)
        return (self.denoiser_config.in_channels, h // f, w // f)

    def schedule(self, num_steps: int, height: int = 0, width: int = 0):
        """The pipeline's schedule: its shift, and with dynamic shifting mu from the token count."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        from draft.sampling import Schedule

        cfg = self.scheduler_config
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            _, h, w = self.latent_shape(height, width)
            p = self.denoiser_config.patch_size
            mu = calculate_shift((h // p) * (w // p), cfg.get("base_image_seq_len", 256),
                                 cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                 cfg.get("max_shift", 1.16))
        return Schedule.from_scheduler_config(cfg, num_steps, mu=mu)

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance_scale: float = 7.0):
        """({prompt_embeds, pooled}, same for the empty prompt or None), as the pipeline encodes them."""
        prompts = list(prompts)
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, prompts, prompts, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance_scale != 1, max_sequence_length=self.max_sequence_length,
        )
        cond = {"prompt_embeds": embeds, "pooled": pooled}
        uncond = None if guidance_scale == 1 else {"prompt_embeds": neg, "pooled": neg_pooled}
        return cond, uncond

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
