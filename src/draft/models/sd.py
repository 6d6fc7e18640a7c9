"""Stable Diffusion 1.x/2.x: any diffusers `StableDiffusionPipeline` (`shapes-sd` included)."""

from __future__ import annotations

import torch

from draft.models.base import PipelineAdapter, quiet_diffusers  # noqa: F401  (re-exported)


class StableDiffusion(PipelineAdapter):
    """UNet (+ LoRA) denoiser, one CLIP text encoder, VAE; DDIM with ε or v prediction."""

    pipeline_class = "StableDiffusionPipeline"
    lora_prefix = "unet"
    # Attention projections (what the paper and diffusers' scripts adapt), the transformer
    # blocks' input/output and feed-forward projections, and the resnets' convolutions: on
    # shapes-sd this wider adapter lifts held-out accuracy about 4 points more in the same
    # steps (BENCHMARKS.md), and with `sampling.merge_lora` it costs no time in the
    # gradient-free steps. The SD 1.5 configs keep attention only, as the paper did.
    default_lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    )
    load_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @property
    def unet(self):
        return self.denoiser

    @property
    def resolution(self) -> int:
        return self.pipe.unet.config.sample_size * self.vae_scale_factor

    def latent_shape(self, height: int = 0, width: int = 0) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        h, w = self.check_size(height, width, f)
        return (self.pipe.unet.config.in_channels, h // f, w // f)

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance_scale: float = 7.5):
        """(cond, uncond) text encodings, uncond being the empty prompt, as the pipeline does."""
        return self.pipe.encode_prompt(
            list(prompts), self.device, num_images_per_prompt=1, do_classifier_free_guidance=guidance_scale != 1
        )

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output at x_t (ε for SD 1.x, v for SD 2.x-v), in the latent's dtype."""
        dtype = self.weight_dtype
        out = self.denoiser(x.to(dtype), t, encoder_hidden_states=cond.to(dtype), return_dict=False)[0]
        return out.to(x.dtype)
