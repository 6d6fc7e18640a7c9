"""FLUX.1 [dev] and [schnell]: a diffusers `FluxPipeline`.

A transformer of joint (two-stream) and single-stream blocks over latents packed into 2x2
patch tokens, a CLIP text encoder (only its pooled embedding is used) and a T5, rectified
flow with `FlowMatchEulerDiscreteScheduler` and FLUX's resolution-dependent shift.

dev is guidance-distilled: the guidance scale is an input of the transformer (an embedding
next to the timestep's), not a second, unconditional pass. `sampling.guidance_scale` feeds
that embedding, so `conditioning` returns no unconditional half and every step is one
transformer call. schnell has no guidance embedding and ignores the scale.

Packing and the position ids stay inside this adapter: everywhere else the latents are
[B, C, h, w] like every other family's. The pipeline's own static helpers pack, unpack and
number the patches, so the layout is exactly diffusers'.
"""

from __future__ import annotations

import numpy as np
import torch

from draft.models.base import Size, meta
from draft.models.flow import FlowMatching


class Flux(FlowMatching):
    pipeline_class = "FluxPipeline"
    family_name = "FLUX.1"
    lora_prefix = "transformer"
    # The attention projections diffusers' FLUX LoRA script (train_dreambooth_lora_flux.py)
    # adapts, without its feed-forward layers: in the joint blocks the image stream's
    # to_q/k/v/out and the text (context) stream's add_q/k/v_proj and to_add_out; in the
    # single blocks to_q/k/v (their output projection, proj_out, mixes attention and MLP).
    default_lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    defaults = {
        "sampling.num_steps": (28, "FluxPipeline's default"),
        "sampling.guidance_scale": (3.5, "FluxPipeline's default, fed to FLUX.1-dev's guidance embedding"),
    }

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt: the T5 tokenizer's limit, at most 512 (the pipeline's default
        and maximum; FLUX.1's tokenizer says 512). FLUX pads the T5 sequence to this length
        without an attention mask, so the length changes the result: a pipeline run that
        should match ours must be given the same `max_sequence_length`."""
        return min(512, int(self.pipe.tokenizer_2.model_max_length))

    @property
    def guidance_embedded(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (dev) or not (schnell)."""
        return bool(self.denoiser_config.guidance_embeds)

    @property
    def resolution(self) -> int:
        """The VAE's native size (1024 px for FLUX.1, the pipeline's default size)."""
        size = self.vae.config.sample_size
        if isinstance(size, (list, tuple)):
            size = size[0]
        return int(size) if size else self.pipe.default_sample_size * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """The VAE factor times the 2x2 patch (16 px for FLUX.1)."""
        return 2 * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.denoiser_config.in_channels // 4  # the transformer reads packed 2x2 patches

    def sigmas(self, num_steps: int):
        """The grid `FluxPipeline.__call__` passes: linear from 1 to 1/T (unless the scheduler
        builds its own flow sigmas)."""
        if self.scheduler_config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def guided_passes(self, scale: float) -> int:
        return 1  # guidance is an input of the model (dev) or absent (schnell)

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance_scale: float = 3.5, size: Size = Size(),
                     negative_prompt: str = ""):
        """({prompt_embeds, pooled[, guidance]}, None): the pipeline's encoding; on dev the
        guidance scale as one value per sample, fed to the guidance embedding. Never an
        unconditional half: FLUX.1 is not sampled with classifier-free guidance."""
        prompts = list(prompts)
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompts, prompts, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        cond = {"prompt_embeds": embeds, "pooled": pooled}
        if self.guidance_embedded:
            # float32, as the pipeline builds it; the transformer casts it to its own dtype.
            cond["guidance"] = torch.full((len(prompts),), float(guidance_scale), device=self.device)
        return cond, None

    def meta_conditioning(self, batch: int, dtype: torch.dtype):
        cfg = self.denoiser_config
        cond = {"prompt_embeds": meta(batch, min(512, self.text_tokens("tokenizer_2", 512)), cfg.joint_attention_dim,
                                      dtype=dtype),
                "pooled": meta(batch, cfg.pooled_projection_dim, dtype=dtype)}
        if self.guidance_embedded:
            cond["guidance"] = meta(batch)
        return cond

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The transformer's velocity at x_t ([B, C, h, w] in and out), called as the pipeline calls it."""
        pipe, dtype = self.pipe, self.weight_dtype
        b, c, h, w = x.shape
        tokens = pipe._pack_latents(x.to(dtype), b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x.device, dtype=dtype)
        out = self.denoiser(
            hidden_states=tokens,
            timestep=t.expand(b).to(dtype) / 1000,  # the pipeline's scaling; the model multiplies back
            guidance=cond.get("guidance"),
            pooled_projections=cond["pooled"].to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        f = self.vae_scale_factor
        return pipe._unpack_latents(out, h * f, w * f, f).to(x.dtype)
