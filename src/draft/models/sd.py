"""Stable Diffusion 1.x/2.x: any diffusers `StableDiffusionPipeline` (`shapes-sd` included)."""

from __future__ import annotations

import torch

from draft.errors import UserError
from draft.models.base import PipelineAdapter, Size, meta


class StableDiffusion(PipelineAdapter):
    """UNet (+ LoRA) denoiser, one CLIP text encoder, VAE; DDIM with ε or v prediction."""

    pipeline_class = "StableDiffusionPipeline"
    family_name = "Stable Diffusion"
    lora_prefix = "unet"
    # Attention projections (what the paper and diffusers' scripts adapt), the transformer
    # blocks' input/output and feed-forward projections, and the resnets' convolutions: on
    # shapes-sd this wider adapter lifts held-out accuracy more in the same steps
    # (BENCHMARKS.md, "LoRA targets"), and with `sampling.merge_lora` it costs no time in
    # the gradient-free steps. The SD 1.5 configs keep attention only, as the paper did.
    default_lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    )
    load_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    export_formats = {"kohya": "draft.models.kohya:export_kohya"}

    def check(self) -> None:
        # An inpainting UNet also reads the masked image and the mask (9 input channels);
        # draft generates from noise alone.
        if self.denoiser_config.in_channels != self.vae.config.latent_channels:
            raise UserError(f"{self.name}: its UNet takes {self.denoiser_config.in_channels} input channels, not the "
                            f"VAE's {self.vae.config.latent_channels} (an inpainting or image-conditioned UNet); draft "
                            "trains text-to-image models")
        super().check()

    @property
    def unet(self):
        return self.denoiser

    @property
    def denoiser_config(self):
        return self.pipe.unet.config

    @property
    def resolution(self) -> int:
        return self.denoiser_config.sample_size * self.vae_scale_factor

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance_scale: float = 7.5, size: Size = Size(),
                     negative_prompt: str = ""):
        """(cond, uncond) text encodings, uncond being the negative (by default empty) prompt,
        as the pipeline encodes them."""
        prompts = list(prompts)
        return self.pipe.encode_prompt(
            prompts, self.device, num_images_per_prompt=1, do_classifier_free_guidance=guidance_scale != 1,
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        )

    def meta_conditioning(self, batch: int, dtype: torch.dtype):
        dim = self.denoiser_config.cross_attention_dim
        return meta(batch, self.text_tokens(), dim[0] if isinstance(dim, (list, tuple)) else dim, dtype=dtype)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output at x_t (ε for SD 1.x, v for SD 2.x-v), in the latent's dtype."""
        dtype = self.weight_dtype
        out = self.denoiser(x.to(dtype), t, encoder_hidden_states=cond.to(dtype), return_dict=False)[0]
        return out.to(x.dtype)
