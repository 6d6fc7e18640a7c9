"""FLUX.2 [dev] and [klein]: a diffusers `Flux2Pipeline` or `Flux2KleinPipeline`.

A transformer of double-stream and single-stream blocks over latents patchified 2x2 into
128 channels (32 latent channels times 4) and packed one token per patch, a language
model as the text encoder (dev: Mistral Small 3.x, `Mistral3ForConditionalGeneration`;
klein: Qwen3), the VAE `AutoencoderKLFlux2`, and rectified flow with an empirical
resolution- and step-count-dependent shift. Facts from diffusers 0.42
(pipelines/flux2/pipeline_flux2.py and pipeline_flux2_klein.py) the code relies on:

- a prompt goes through the encoder's chat template (dev: a fixed system message), padded
  to `max_sequence_length` tokens; the hidden states of three layers (dev: 10, 20, 30;
  klein: 9, 18, 27) are stacked along the width, padding included, so the text always has
  that many tokens and no mask (`encode_prompt`, reused here);
- the latents the pipeline draws and steps are the patchified [B, 128, H/16, W/16]; draft
  keeps that layout, so its noise is the pipeline's. Tokens are numbered by 4-D ids
  (t, h, w, l): the image's (0, h, w, 0), the text's (0, 0, 0, l);
- the shift mu is `compute_empirical_mu(tokens, steps)`, not FLUX.1's linear rule;
- before the VAE the latents are denormalised with the VAE's batch-norm running statistics,
  then unpatchified to [B, 32, H/8, W/8];
- dev is guidance-distilled: the scale is an input of the transformer (its guidance
  embedding), one pass a step, as FLUX.1-dev. klein has no guidance embedding and guides
  with classifier-free guidance against the empty prompt when the scale is above 1, except
  the step-distilled checkpoints (`is_distilled` in model_index.json), which ignore it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from draft.errors import UserError
from draft.models.base import Size, meta
from draft.models.flow import FlowMatching


class Flux2(FlowMatching):
    pipeline_class = "Flux2Pipeline"
    family_name = "FLUX.2"
    lora_prefix = "transformer"
    # The attention projections of both streams in the double blocks (diffusers' FLUX.2 LoRA
    # script, train_dreambooth_lora_flux2.py, adapts the image stream's to_q/k/v/out by default)
    # and the single blocks' fused input projection, to_qkv_mlp_proj: the single blocks have no
    # separate to_q/k/v, so attention-only targets would leave 48 of dev's 56 blocks untouched
    # (the targets diffusers' own FLUX.2 LoRA tests use).
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out", "to_qkv_mlp_proj")
    defaults = {
        "sampling.num_steps": (50, "Flux2Pipeline's default"),
        "sampling.guidance_scale": (4.0, "Flux2Pipeline's default, fed to FLUX.2-dev's guidance embedding"),
    }
    call_options = ("max_sequence_length",)
    # Text tokens per prompt, the chat template's included (the pipeline's default): prompts are
    # padded to it and the padding reaches the transformer, so a pipeline run that should match
    # ours must be given the same length.
    max_sequence_length = 512
    # The encoder layers whose hidden states are stacked (the pipeline's text_encoder_out_layers).
    text_layers = (10, 20, 30)

    @property
    def guidance_embedded(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (dev) or not (klein)."""
        return bool(self.denoiser_config.guidance_embeds)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)  # as the pipeline computes it

    @property
    def resolution(self) -> int:
        """The VAE's native size (1024 px, the pipeline's default size, for FLUX.2's)."""
        size = self.vae.config.sample_size
        if isinstance(size, (list, tuple)):
            size = size[0]
        return int(size) if size else 128 * self.vae_scale_factor  # the pipeline's default_sample_size

    @property
    def size_multiple(self) -> int:
        return 2 * self.vae_scale_factor  # the VAE's factor times the 2x2 patchify

    def latent_shape(self, size: Size = Size()) -> tuple[int, ...]:
        """(128, H/16, W/16): the patchified latents, as the pipeline draws them."""
        size, f = self.size(size), self.size_multiple
        return (self.latent_channels, size.height // f, size.width // f)

    def image_tokens(self, size: Size) -> int:
        _, h, w = self.latent_shape(size)
        return h * w  # one token per patchified latent pixel

    def mu(self, tokens: int, num_steps: int) -> float:
        """FLUX.2's empirical shift, fitted in both the token count and the number of steps."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(tokens, num_steps)

    def sigmas(self, num_steps: int):
        """The grid the pipeline passes: linear from 1 to 1/T (unless the scheduler builds its own)."""
        if self.scheduler_config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def guided_passes(self, scale: float) -> int:
        return 1  # guidance is an input of the model

    # --- text ---

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance_scale: float = 4.0, size: Size = Size(),
                     negative_prompt: str = ""):
        """({prompt_embeds[, guidance]}, None): the pipeline's encoding and, on dev, the scale as
        one value per sample for the guidance embedding. Never an unconditional half."""
        cond = self._encode(list(prompts))
        if self.guidance_embedded:
            # float32, as the pipeline builds it; the transformer casts it to its own dtype.
            cond["guidance"] = torch.full((len(prompts),), float(guidance_scale), device=self.device)
        return cond, None

    def _encode(self, prompts: list[str]) -> dict:
        embeds, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                            max_sequence_length=self.max_sequence_length,
                                            text_encoder_out_layers=self.text_layers)
        return {"prompt_embeds": embeds}

    def meta_conditioning(self, batch: int, dtype: torch.dtype):
        cond = {"prompt_embeds": meta(batch, self.max_sequence_length, self.denoiser_config.joint_attention_dim,
                                      dtype=dtype)}
        if self.guidance_embedded:
            cond["guidance"] = meta(batch)
        return cond

    # --- the transformer ---

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The transformer's velocity at x_t ([B, 128, h, w] in and out), called as the pipeline calls it."""
        pipe, dtype = self.pipe, self.weight_dtype
        b, c, h, w = x.shape
        embeds = cond["prompt_embeds"].to(dtype)
        out = self.denoiser(
            hidden_states=pipe._pack_latents(x.to(dtype)),  # [B, h·w, 128], row by row
            timestep=t.expand(b).to(dtype) / 1000,  # the pipeline's scaling; the model multiplies back
            guidance=cond.get("guidance"),
            encoder_hidden_states=embeds,
            txt_ids=pipe._prepare_text_ids(embeds).to(x.device),  # (0, 0, 0, l)
            img_ids=pipe._prepare_latent_ids(x).to(x.device),  # (0, h, w, 0)
            return_dict=False,
        )[0]
        # The inverse of the packing. The pipeline's _unpack_latents_with_ids scatters by the ids,
        # which number the tokens row by row as the packing lays them out, so this reshape is the
        # same map (tests/test_flux2.py) without the scatter's host sync, and it runs on meta tensors.
        return out.transpose(1, 2).reshape(b, c, h, w).to(x.dtype)

    # --- decoding ---

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1]: the batch-norm denormalisation, the unpatchify and the
        decode the pipeline ends with."""
        vae = self.vae
        z = latents.to(vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.dtype)
        z = self.pipe._unpatchify_latents(z * std + mean)
        images = vae.decode(z, return_dict=False)[0].float()
        return (images / 2 + 0.5).clamp(0, 1)


class Flux2Klein(Flux2):
    """FLUX.2 [klein]: Qwen3 as the text encoder, no guidance embedding, classifier-free
    guidance against the empty prompt (none in the step-distilled checkpoints)."""

    pipeline_class = "Flux2KleinPipeline"
    family_name = "FLUX.2 [klein]"
    defaults = {
        "sampling.num_steps": (50, "Flux2KleinPipeline's default (the distilled klein checkpoints sample with 4)"),
        "sampling.guidance_scale": (4.0, "Flux2KleinPipeline's default (the distilled checkpoints ignore it)"),
    }
    text_layers = (9, 18, 27)
    # What the step-distilled klein checkpoints' model cards sample with.
    distilled_defaults = {
        "sampling.num_steps": (4, "the step-distilled klein checkpoints' model cards: 4 steps"),
        "sampling.guidance_scale": (1.0, "the step-distilled klein checkpoints ignore guidance (one pass a step)"),
    }

    @classmethod
    def checkpoint_defaults(cls, folder) -> dict:
        """The distilled settings where model_index.json says `is_distilled`, as the pipeline reads it."""
        try:
            distilled = json.loads((Path(folder) / "model_index.json").read_text()).get("is_distilled", False)
        except (OSError, ValueError, AttributeError):
            return {}
        return dict(cls.distilled_defaults) if distilled else {}

    @property
    def distilled(self) -> bool:
        """A step-distilled checkpoint (model_index.json's is_distilled): no guidance at all."""
        return bool(self.pipe.config.get("is_distilled", False))

    def guided_passes(self, scale: float) -> int:
        return 2 if scale > 1 and not self.distilled else 1

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance_scale: float = 4.0, size: Size = Size(),
                     negative_prompt: str = ""):
        """({prompt_embeds}, the empty prompt's or None): the pipeline guides against the empty
        prompt only, so another negative prompt is refused rather than sampled differently."""
        prompts = list(prompts)
        if self.guided_passes(guidance_scale) == 1:
            return self._encode(prompts), None
        if negative_prompt:
            raise UserError(f"{self.name}: Flux2KleinPipeline guides against the empty prompt only; "
                            "leave the negative prompt (sampling.negative_prompt, --negative-prompt) empty")
        return self._encode(prompts), self._encode([""] * len(prompts))
