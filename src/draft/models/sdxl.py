"""Stable Diffusion XL: a diffusers `StableDiffusionXLPipeline`.

A UNet conditioned on two CLIP text encoders (their hidden states concatenated) and, through
`added_cond_kwargs`, on the second encoder's pooled projection and six "time ids" (SDXL's
micro-conditioning: original size, crop top-left, target size); a VAE that overflows in
fp16, kept in float32 when its config says `force_upcast`. Sampled with DDIM built from the
pipeline's scheduler config (SDXL ships EulerDiscrete, whose config carries the same betas).
"""

from __future__ import annotations

import torch

from draft.models.base import Size, meta
from draft.models.sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    """SD 1.x/2.x's UNet layout, sizes and default LoRA targets (the attention, transformer
    in/out and feed-forward projections and the resnets' convolutions; the SDXL config keeps
    attention only, as diffusers' SDXL LoRA scripts do), with two text encoders, pooled
    embeddings and the added time ids."""

    pipeline_class = "StableDiffusionXLPipeline"
    family_name = "SDXL"
    defaults = {"sampling.guidance_scale": (5.0, "StableDiffusionXLPipeline's default")}
    # The invisible watermark applies to decoded images only, which the adapter makes itself.
    load_kwargs = {"add_watermarker": False}

    @classmethod
    def load_dtype(cls, dtype: torch.dtype):
        # The VAE is read in float32 whatever the training dtype, so that a VAE kept in
        # float32 (below) has its full-precision weights, not half-precision-rounded ones.
        return {"default": dtype, "vae": torch.float32}

    @staticmethod
    def after_load(pipe) -> None:
        # SDXL's VAE overflows in half precision; its config asks for float32. The pipeline
        # upcasts only for fp16 and only around decoding; we keep it in float32 throughout
        # (bf16 included) because rewards backpropagate through the decoder. A VAE that
        # does not ask for it runs in the denoiser's dtype, as in the other families.
        if not getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.to(pipe.unet.dtype)

    def schedule(self, num_steps: int, size: Size = Size()):
        from draft.sampling import Schedule

        config = dict(self.scheduler_config)
        # DDIM clips x̂_0 to ±1 unless told otherwise; the Euler scheduler an SDXL folder
        # usually names never clips, and clipping SDXL latents would damage the images.
        if "DDIM" not in str(config.get("_class_name", "")):
            config.setdefault("clip_sample", False)
        return Schedule.from_scheduler_config(config, num_steps)

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance_scale: float = 5.0, size: Size = Size(),
                     negative_prompt: str = ""):
        """({prompt_embeds, text_embeds}, the same for the negative prompt or None), encoded by
        the pipeline's own `encode_prompt` (both encoders; zeros for an empty negative prompt
        when the pipeline's `force_zeros_for_empty_prompt` says so)."""
        prompts = list(prompts)
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance_scale != 1,
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        )
        cond = {"prompt_embeds": embeds, "text_embeds": pooled}
        uncond = None if guidance_scale == 1 else {"prompt_embeds": neg, "text_embeds": neg_pooled}
        return cond, uncond

    def meta_conditioning(self, batch: int, dtype: torch.dtype):
        cfg = self.denoiser_config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return {"prompt_embeds": super().meta_conditioning(batch, dtype), "text_embeds": meta(batch, pooled, dtype=dtype)}

    def time_ids(self, height: int, width: int, batch: int, dtype=torch.float32) -> torch.Tensor:
        """[batch, 6] micro-conditioning for a height x width image, as the pipeline builds it
        by default: original size = target size = the image's, crop (0, 0)."""
        # The pipeline's rule: the second encoder's projection width (checked against the UNet).
        projection_dim = self.pipe.text_encoder_2.config.projection_dim
        ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                          text_encoder_projection_dim=projection_dim)
        return ids.to(self.device).repeat(batch, 1)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The UNet's raw output at x_t (ε, or v for v-prediction fine-tunes), in the latent's dtype.

        The time ids come from the latent's size, which is the sampling size, so they cannot
        disagree with it.
        """
        dtype = self.weight_dtype
        f = self.vae_scale_factor
        added = {
            "text_embeds": cond["text_embeds"].to(dtype),
            "time_ids": self.time_ids(x.shape[-2] * f, x.shape[-1] * f, x.shape[0], dtype),
        }
        out = self.denoiser(x.to(dtype), t, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                            added_cond_kwargs=added, return_dict=False)[0]
        return out.to(x.dtype)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return super()._decode(latents)
        # VAEs with per-channel latent statistics (the pipeline's denormalisation).
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        z = latents * std / cfg.scaling_factor + mean
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
        return (images / 2 + 0.5).clamp(0, 1)
