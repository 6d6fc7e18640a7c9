"""What reward fine-tuning asks of a model: the `DiffusionModel` protocol and the `Size` it
makes. Everything the sampler, the methods, the trainer, inference and evaluation may ask of
a model is here; `draft.models.base.PipelineAdapter` implements it over a diffusers pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Size:
    """What to generate: height and width in pixels, and video frames (0: an image).

    In a requested size a zero means the model's native value (`DiffusionModel.size`).
    """

    height: int = 0
    width: int = 0
    frames: int = 0

    @property
    def video(self) -> bool:
        return self.frames > 0

    def __str__(self) -> str:
        return f"{self.frames} frames of {self.width}x{self.height}" if self.video else f"{self.width}x{self.height}"


@runtime_checkable
class DiffusionModel(Protocol):
    """What reward fine-tuning needs of a model. Conditioning is any batch-first tensor or
    dict of tensors; latents are [B, C, *spatial] (h, w for images, f, h, w for videos)
    whatever the model's internal layout; samples are images [B, 3, H, W] or videos
    [B, F, 3, H, W] in [0, 1]."""

    name: str
    # The trainable network (a UNet or a transformer), where LoRA goes. The trainer may
    # replace it with a distributed wrapper (Accelerate's `prepare`), so adapters only call it.
    denoiser: torch.nn.Module
    # The denoiser's key prefix in diffusers LoRA files ("unet" or "transformer").
    lora_prefix: str
    # Modules that get a LoRA adapter unless the config names others.
    default_lora_targets: tuple[str, ...]
    # Config values this family samples with by default: dotted key -> (value, why) (`draft.defaults`).
    defaults: dict
    fps: int  # frames per second of the family's videos (0 for image models)

    @property
    def native_size(self) -> Size: ...

    @property
    def device(self) -> torch.device: ...

    def to(self, device) -> "DiffusionModel": ...

    def size(self, requested: Size = Size()) -> Size:
        """The concrete size for a request (zeros: native); UserError if the model cannot make it."""

    def latent_shape(self, size: Size = Size()) -> tuple[int, ...]:
        """(C, *spatial) of the latent of a sample of that size."""

    def schedule(self, num_steps: int, size: Size = Size()):
        """The `draft.sampling.Schedule` the model's own pipeline would sample with."""

    def conditioning(self, prompts: list[str], guidance_scale: float, size: Size = Size(),
                     negative_prompt: str = "") -> tuple[Any, Any]:
        """(cond, uncond) encodings; uncond is None when no unconditional pass is needed
        (guidance 1, or guidance that is an input of the model)."""

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The raw model output at x_t (ε, v or flow velocity), differentiable in the LoRA."""

    def guide(self, uncond_out: torch.Tensor, cond_out: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided prediction from the two passes (classifier-free guidance by default)."""

    def guided_passes(self, scale: float) -> int:
        """Denoiser passes per sample and step at this guidance scale: 2 with an unconditional
        half, else 1 (for the memory estimate)."""

    def guidance(self, scale: float, scale_2: float | None):
        """The guidance scale, or a function of t where it changes along the chain (Wan 2.2's
        second expert has its own, `sampling.guidance_scale_2`)."""

    def decode(self, latents: torch.Tensor, frames: Sequence[int] | None = None,
               use_checkpoint: bool = False) -> torch.Tensor:
        """Samples in [0, 1], differentiable in the latents; VAE frozen. For videos, `frames`
        picks the output frames (all when None) and only the latent frames they need are
        decoded; images take no `frames`."""

    def adapters_disabled(self) -> contextlib.AbstractContextManager: ...

    def adapters_merged(self) -> contextlib.AbstractContextManager: ...

    def compile_sampling(self, mode: str) -> contextlib.AbstractContextManager:
        """A block inside which the denoiser's gradient-free calls run through torch.compile
        (`sampling.compile`: none, whole or blocks); compiled on first use, then reused."""

    def save_lora(self, directory: str | Path, layers: dict[str, torch.Tensor], metadata: dict) -> None:
        """Write a LoRA state dict (peft key names, no prefix) as the family's diffusers LoRA."""

    def metrics(self, samples: torch.Tensor, prompts: list[str]) -> dict:
        """Figures the model defines for its own world (empty for most models): means over
        the samples, so that batches can be averaged."""
