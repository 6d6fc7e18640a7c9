"""Qwen-Image: a diffusers `QwenImagePipeline`.

An MMDiT transformer (`QwenImageTransformer2DModel`) over latents packed into 2x2 patch
tokens, Qwen2.5-VL as the text encoder, the 3-D VAE `AutoencoderKLQwenImage` (Wan's
layout) used with one frame, rectified flow with FLUX's resolution-dependent shift, and
"true" classifier-free guidance: two passes, then the guided prediction rescaled to the
norm of the conditional one, token by token.

Facts from diffusers 0.42 (pipelines/qwenimage/pipeline_qwenimage.py) the code relies on:

- a prompt is wrapped in a chat template, encoded by the language model, and the
  template's 34 system tokens are dropped; prompts of a batch are padded to the longest
  with zeros and an attention mask (`encode_prompt`, reused here);
- the transformer takes the mask (`encoder_hidden_states_mask`) and the packed image's
  shape (`img_shapes`) and numbers text positions after the image's, so padding at the
  end of the text changes nothing but the round-off;
- the pipeline guides only with a negative prompt and `true_cfg_scale > 1`;
  `guidance_scale` is for guidance-distilled variants and ignored by Qwen-Image itself;
- latents are [B, 1, C, h, w] for the VAE, denormalised per channel with the VAE
  config's `latents_mean`/`latents_std` as Wan's are.
"""

from __future__ import annotations

import numpy as np
import torch

from draft.models.base import Size, meta
from draft.models.flow import FlowMatching
from draft.models.text import join_padded


class QwenImage(FlowMatching):
    # text of each batch's own length, masked: the prompt cache pads its rows alike
    join_conditioning = staticmethod(join_padded)

    pipeline_class = "QwenImagePipeline"
    family_name = "Qwen-Image"
    lora_prefix = "transformer"
    # The image stream's attention projections, the default of diffusers' Qwen-Image LoRA
    # script (examples/dreambooth/train_dreambooth_lora_qwen_image.py, --lora_layers).
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    defaults = {
        "sampling.num_steps": (50, "QwenImagePipeline's default"),
        "sampling.guidance_scale": (4.0, "QwenImagePipeline's default true_cfg_scale"),
    }
    call_options = ("max_sequence_length",)
    max_shift = 0.9  # Qwen-Image's scheduler config names its own; the pipeline falls back to 1.15
    # The native size: the pipeline's default (its default_sample_size 128 times the VAE's 8x).
    resolution = 1024
    # Prompts longer than this many tokens after the template are cut (the pipeline's default).
    max_sequence_length = 512

    @classmethod
    def pipeline_kwargs(cls, sampling: dict, options: dict) -> dict:
        """The pipeline guides with `true_cfg_scale`, and only when given a negative prompt
        (an empty one counts); its `guidance_scale` is for distilled variants."""
        kwargs = super().pipeline_kwargs(sampling, options)
        if options.get("resolution") and not (sampling.get("height") or sampling.get("width")):
            kwargs.update(height=options["resolution"], width=options["resolution"])  # a native size set by option
        scale = sampling.get("guidance_scale")
        kwargs["guidance_scale"] = None
        if scale is not None and scale > 1:
            kwargs.update(true_cfg_scale=scale, negative_prompt=sampling.get("negative_prompt", ""))
        return kwargs

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)  # as the pipeline computes it

    @property
    def size_multiple(self) -> int:
        return 2 * self.vae_scale_factor  # the VAE's factor times the 2x2 packing

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    def sigmas(self, num_steps: int):
        """The grid `QwenImagePipeline.__call__` passes: linear from 1 to 1/T."""
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def guided_passes(self, scale: float) -> int:
        return 2 if scale > 1 else 1

    # --- text ---

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance_scale: float = 4.0, size: Size = Size(),
                     negative_prompt: str = ""):
        """({prompt_embeds, prompt_embeds_mask}, the negative prompt's or None), as the pipeline
        encodes them, the two padded to one length so one batched call runs both."""
        prompts = list(prompts)
        cond = self._encode(prompts)
        if guidance_scale <= 1:
            return cond, None
        uncond = self._encode([negative_prompt] * len(prompts))
        length = max(cond["prompt_embeds"].shape[1], uncond["prompt_embeds"].shape[1])
        return _pad(cond, length), _pad(uncond, length)

    def _encode(self, prompts: list[str]) -> dict:
        embeds, mask = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length)
        if mask is None:  # the pipeline drops a mask of all ones; a batch of several keeps one
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def meta_conditioning(self, batch: int, dtype: torch.dtype):
        # Prompts of the longest length the adapter keeps: the estimate is an upper bound.
        n, width = self.max_sequence_length, self.denoiser_config.joint_attention_dim
        return {"prompt_embeds": meta(batch, n, width, dtype=dtype),
                "prompt_embeds_mask": meta(batch, n, dtype=torch.long)}

    # --- the transformer and guidance ---

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, h/2 · w/2, 4C], the pipeline's packing."""
        return self.pipe._pack_latents(x, *x.shape)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The inverse of `pack` (the pipeline's unpacking, without its frame axis)."""
        f = self.vae_scale_factor
        return self.pipe._unpack_latents(tokens, h * f, w * f, f)[:, :, 0]

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The transformer's velocity at x_t ([B, C, h, w] in and out), called as the pipeline calls it."""
        dtype = self.weight_dtype
        b, _, h, w = x.shape
        out = self.denoiser(
            hidden_states=self.pack(x.to(dtype)),
            timestep=t.expand(b).to(dtype) / 1000,  # the pipeline's scaling
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_hidden_states_mask=cond["prompt_embeds_mask"],
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return self.unpack(out, h, w).to(x.dtype)

    def guide(self, uncond_out: torch.Tensor, cond_out: torch.Tensor, scale: float) -> torch.Tensor:
        """Qwen-Image's true CFG: the guided prediction, rescaled so that each packed token
        keeps the norm of its conditional prediction (QwenImagePipeline.__call__)."""
        from draft.sampling import cfg

        h, w = cond_out.shape[-2:]
        cond, comb = self.pack(cond_out), self.pack(cfg(uncond_out, cond_out, scale))
        rescaled = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return self.unpack(rescaled, h, w)

    # --- decoding ---

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1]: denormalise, decode one frame, postprocess, as the pipeline ends."""
        from draft.models.wan import denormalise

        z = denormalise(self.vae, latents.to(self.vae.dtype).unsqueeze(2))
        images = self.vae.decode(z, return_dict=False)[0][:, :, 0].float()
        return (images / 2 + 0.5).clamp(0, 1)


def _pad(cond: dict, length: int) -> dict:
    """Text embeddings and mask padded with zeros (masked out) to `length` tokens."""
    n = length - cond["prompt_embeds"].shape[1]
    return {"prompt_embeds": torch.nn.functional.pad(cond["prompt_embeds"], (0, 0, 0, n)),
            "prompt_embeds_mask": torch.nn.functional.pad(cond["prompt_embeds_mask"], (0, n))}
