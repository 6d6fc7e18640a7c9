"""Z-Image (and Z-Image-Turbo): a diffusers `ZImagePipeline`.

A single-stream transformer (`ZImageTransformer2DModel`) over 2x2 patches of the latents
and the prompt's tokens in one sequence, Qwen3 as the text encoder, FLUX.1's VAE, and
rectified flow. Facts from diffusers 0.42 (pipelines/z_image/pipeline_z_image.py) the code
relies on:

- a prompt is wrapped in Qwen3's chat template and the second-to-last hidden states of
  its real tokens are kept: one tensor of its own length per prompt; the transformer
  takes lists (latents [C, 1, h, w] and captions [L, D] per sample). `conditioning` pads
  them into a batch with a mask, and `denoise` cuts them back;
- the transformer is given (1000 - t) / 1000 and predicts the negative of the velocity
  the scheduler steps with;
- guidance is `pos + g·(pos - neg)`, on when g > 0 (Turbo samples with g = 0): classifier-
  free guidance at scale g + 1. `sampling.guidance_scale` is the pipeline's g; `guidance`
  hands the sampler g + 1. `cfg_truncation` turns guidance off for the late steps and
  `cfg_normalization` caps the guided prediction's norm, as the pipeline's options do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from draft.models.base import Size, meta
from draft.models.flow import FlowMatching
from draft.models.text import join_padded


# Z-Image-Turbo's scheduler shift: what tells its folder from the base model's (whose is 6).
TURBO_SHIFT = 3.0


class ZImage(FlowMatching):
    # text of each batch's own length, masked: the prompt cache pads its rows alike
    join_conditioning = staticmethod(join_padded)

    pipeline_class = "ZImagePipeline"
    family_name = "Z-Image"
    lora_prefix = "transformer"
    # The attention projections of every block, the noise and caption refiners' included
    # (the image and text share each block's attention), as for the other transformer families.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    defaults = {
        "sampling.num_steps": (50, "ZImagePipeline's default (Z-Image-Turbo samples with 9)"),
        "sampling.guidance_scale": (5.0, "ZImagePipeline's default (Z-Image-Turbo samples with 0: no guidance)"),
    }
    # What Z-Image-Turbo's model card samples with, over the pipeline's defaults.
    turbo_defaults = {
        "sampling.num_steps": (9, "Z-Image-Turbo's model card: 9 steps, 8 transformer calls that move the image"),
        "sampling.guidance_scale": (0.0, "Z-Image-Turbo's model card: the distilled model samples without guidance"),
    }
    call_options = ("max_sequence_length", "cfg_normalization", "cfg_truncation")
    # Prompt tokens the tokenizer pads and cuts to (the pipeline's default); only the real
    # tokens reach the transformer.
    max_sequence_length = 512
    # The pipeline's options: no guidance once (1000 - t) / 1000 exceeds this (1: never), and
    # the guided prediction's norm capped at this multiple of the conditional one's (0: off).
    cfg_truncation = 1.0
    cfg_normalization = 0.0

    @classmethod
    def checkpoint_defaults(cls, folder: Path) -> dict:
        """Turbo's settings for a Turbo checkpoint. Turbo and the base Z-Image share every
        component's config but the scheduler's: Turbo's shift is 3, the base's 6
        (scheduler/scheduler_config.json of Tongyi-MAI/Z-Image-Turbo and Tongyi-MAI/Z-Image),
        so a folder whose scheduler shifts by 3 is taken for Turbo or a fine-tune of it."""
        try:
            shift = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text()).get("shift")
        except (OSError, ValueError, AttributeError):
            return {}
        return dict(cls.turbo_defaults) if shift == TURBO_SHIFT else {}

    @property
    def resolution(self) -> int:
        """The VAE's native size (1024 px for Z-Image's, FLUX.1's VAE)."""

        size = self.vae.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def size_multiple(self) -> int:
        return 2 * self.vae_scale_factor  # the VAE's factor times the 2x2 patches

    def sigmas(self, num_steps: int):
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        return get_default_z_image_sigmas(num_steps)

    def guidance(self, scale: float, scale_2: float | None):
        """Classifier-free guidance at g + 1 (the pipeline's pos + g·(pos - neg)), off where
        `cfg_truncation` turns it off."""
        if scale <= 0 or self.cfg_truncation >= 1:  # (1000 - t) / 1000 never exceeds 1
            return scale + 1
        return lambda t: scale + 1 if (1000 - float(t)) / 1000 <= self.cfg_truncation else 1.0

    def guided_passes(self, scale: float) -> int:
        return 2 if scale > 0 else 1

    def guide(self, uncond_out: torch.Tensor, cond_out: torch.Tensor, scale: float) -> torch.Tensor:
        from draft.sampling import cfg

        pred = cfg(uncond_out, cond_out, scale)
        if self.cfg_normalization > 0:  # per sample, as the pipeline caps it
            cap = cond_out.flatten(1).norm(dim=1) * self.cfg_normalization
            norm = pred.flatten(1).norm(dim=1)
            pred = pred * torch.where(norm > cap, cap / norm, torch.ones_like(norm)).view(-1, 1, 1, 1)
        return pred

    # --- text ---

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance_scale: float = 5.0, size: Size = Size(),
                     negative_prompt: str = ""):
        """({prompt_embeds, prompt_embeds_mask}, the negative prompt's or None): the pipeline's
        per-prompt embeddings, padded with zeros to one length (cond and uncond together)."""
        prompts = list(prompts)
        pos, neg = self.pipe.encode_prompt(prompts, device=self.device, do_classifier_free_guidance=guidance_scale > 0,
                                           negative_prompt=[negative_prompt] * len(prompts),
                                           max_sequence_length=self.max_sequence_length)
        length = max(len(e) for e in [*pos, *neg])
        return _batch(pos, length), (_batch(neg, length) if guidance_scale > 0 else None)

    def meta_conditioning(self, batch: int, dtype: torch.dtype):
        # Prompts of the longest length the tokenizer keeps: the estimate is an upper bound.
        n = self.max_sequence_length
        return {"prompt_embeds": meta(batch, n, self.denoiser_config.cap_feat_dim, dtype=dtype),
                "prompt_embeds_mask": meta(batch, n, dtype=torch.long)}

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The velocity at x_t ([B, C, h, w] in and out), from the transformer called on lists as
        the pipeline calls it."""
        dtype, b = self.weight_dtype, x.shape[0]
        embeds, mask = cond["prompt_embeds"].to(dtype), cond["prompt_embeds_mask"]
        lengths = [embeds.shape[1]] * b if mask.is_meta else mask.sum(1).tolist()
        out = self.denoiser(list(x.to(dtype).unsqueeze(2).unbind(0)), (1000 - t.expand(b)) / 1000,
                            [e[:n] for e, n in zip(embeds, lengths)], return_dict=False)[0]
        return -torch.stack(out).squeeze(2).to(x.dtype)


def _batch(embeds: list[torch.Tensor], length: int) -> dict:
    """Per-prompt embeddings [L_i, D] as one zero-padded [B, length, D] and its mask."""
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.long, device=out.device)
    for j, e in enumerate(embeds):
        out[j, :len(e)], mask[j, :len(e)] = e, 1
    return {"prompt_embeds": out, "prompt_embeds_mask": mask}
