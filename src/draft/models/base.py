"""The model protocol, and the pieces every diffusers-pipeline adapter shares.

`DiffusionModel` is everything the sampler, the methods, the trainer, inference and
evaluation may ask of a model; nothing outside `draft.models` asks which family it is.
`PipelineAdapter` implements the parts that are the same for every diffusers pipeline
(loading, freezing, VAE decoding, switching and merging LoRA adapters, saving a LoRA with
the pipeline's own `save_lora_weights`); a family adds its prompt encoding, its denoiser
call, its latent layout and its schedule.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch.utils.checkpoint import checkpoint

from draft.errors import UserError


@runtime_checkable
class DiffusionModel(Protocol):
    """What reward fine-tuning needs of a model. Conditioning is any batch-first tensor or
    dict of tensors; latents are [B, C, h, w] whatever the model's internal layout."""

    name: str
    # The trainable network (a UNet or a transformer), where LoRA goes. The trainer may
    # replace it with a distributed wrapper (Accelerate's `prepare`), so adapters only call it.
    denoiser: torch.nn.Module
    # The denoiser's key prefix in diffusers LoRA files ("unet" or "transformer").
    lora_prefix: str
    # Modules that get a LoRA adapter unless the config names others.
    default_lora_targets: tuple[str, ...]

    @property
    def resolution(self) -> int: ...  # native image size in pixels

    @property
    def device(self) -> torch.device: ...

    def to(self, device) -> "DiffusionModel": ...

    def latent_shape(self, height: int = 0, width: int = 0) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a height x width image (0: native); UserError if the
        model cannot make that size."""

    def schedule(self, num_steps: int, height: int = 0, width: int = 0):
        """The `draft.sampling.Schedule` the model's own pipeline would sample with."""

    def conditioning(self, prompts: list[str], guidance_scale: float) -> tuple[Any, Any]:
        """(cond, uncond) encodings; uncond is None when no unconditional pass is needed
        (guidance 1, or guidance that is an input of the model)."""

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The raw model output at x_t (ε, v or flow velocity), differentiable in the LoRA."""

    def decode(self, latents: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1], differentiable in the latents; VAE frozen."""

    def adapters_disabled(self) -> contextlib.AbstractContextManager: ...

    def adapters_merged(self) -> contextlib.AbstractContextManager: ...

    def save_lora(self, directory: str | Path, layers: dict[str, torch.Tensor], metadata: dict) -> None:
        """Write a LoRA state dict (peft key names, no prefix) as the family's diffusers LoRA."""

    def metrics(self, images: torch.Tensor, prompts: list[str]) -> dict:
        """Figures the model defines for its own world (empty for most models)."""


class PipelineAdapter:
    """Shared implementation over one diffusers pipeline; subclasses name the pipeline class
    and fill in the family-specific calls."""

    pipeline_class: ClassVar[str]
    lora_prefix: ClassVar[str]
    default_lora_targets: ClassVar[tuple[str, ...]]
    # Keyword arguments for `from_pretrained` beyond the shared ones.
    load_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(self, pipe, name: str = "", metrics: Callable | None = None, **options):
        for key, value in options.items():  # e.g. SD3's max_sequence_length for a model trained without T5
            if not hasattr(type(self), key):
                raise TypeError(f"{type(self).__name__} has no option {key!r}")
            setattr(self, key, value)
        self.pipe = pipe
        self.name = name
        self.denoiser = getattr(pipe, self.lora_prefix)
        self.vae = pipe.vae
        self.scheduler_config = pipe.scheduler.config
        self._metrics = metrics
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        # The denoiser runs in its own dtype: a pipeline may keep its VAE in float32 (SDXL's
        # overflows in fp16) while the denoiser is in half precision.
        self.weight_dtype = next(self.denoiser.parameters()).dtype

    @classmethod
    def from_pretrained(cls, source: str, local: bool, name: str, device=None, dtype=None, metrics=None, **options):
        import diffusers
        from safetensors import SafetensorError

        from draft.safeio import corrupt_in

        quiet_diffusers()
        pipeline = getattr(diffusers, cls.pipeline_class)
        try:
            # Optional components the folder does not have (SD3 saved without its T5, no
            # image encoder) must be passed as None, or diffusers refuses the folder.
            index = pipeline.load_config(source, local_files_only=local)
            expected, _ = pipeline._get_signature_keys(pipeline)
            absent = {name: None for name in expected
                      if (name in index or name in pipeline._optional_components)
                      and (not isinstance(index.get(name), (list, tuple)) or index[name][0] is None)}
            pipe = pipeline.from_pretrained(
                source,
                dtype=cls.load_dtype(dtype or torch.float32),
                use_safetensors=True,  # never unpickle downloaded weights
                local_files_only=local,
                **{**absent, **cls.load_kwargs},
            )
        except (OSError, ValueError, EnvironmentError, SafetensorError) as e:
            corrupt = corrupt_in(source, f"model {name!r}:") if local else None  # name the bad file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise corrupt or UserError(f"cannot load model {name!r}: {first}") from None
        cls.after_load(pipe)
        model = cls(pipe, name=name, metrics=metrics, **options)
        if device is not None:
            model.to(device)
        return model

    @classmethod
    def load_dtype(cls, dtype: torch.dtype):
        """`from_pretrained`'s dtype: one for all components, or a dict by component name."""
        return dtype

    @staticmethod
    def after_load(pipe) -> None:
        """Family fix-ups after loading (e.g. SDXL's float32 VAE)."""

    # --- shapes and sizes ---

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def to(self, device):
        self.pipe.to(device)
        return self

    def check_size(self, height: int, width: int, multiple: int) -> tuple[int, int]:
        """(height, width) with 0 meaning native; UserError unless both are multiples of `multiple`."""
        h, w = height or self.resolution, width or self.resolution
        if h % multiple or w % multiple:
            raise UserError(f"{self.name}: image sizes must be multiples of {multiple} pixels, got {h}x{w}")
        return h, w

    def schedule(self, num_steps: int, height: int = 0, width: int = 0):
        from draft.sampling import Schedule

        return Schedule.from_scheduler_config(self.scheduler_config, num_steps)

    # --- decoding ---

    def decode(self, latents: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        if use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._decode, latents, use_reentrant=False)
        return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
        # The pipelines' postprocessing: [-1, 1] -> [0, 1], clamped.
        return (images / 2 + 0.5).clamp(0, 1)

    def metrics(self, images: torch.Tensor, prompts: list[str]) -> dict:
        return self._metrics(images, prompts) if self._metrics is not None else {}

    # --- LoRA ---

    def save_lora(self, directory: str | Path, layers: dict[str, torch.Tensor], metadata: dict) -> None:
        import diffusers

        getattr(diffusers, self.pipeline_class).save_lora_weights(
            directory,
            **{f"{self.lora_prefix}_lora_layers": layers, f"{self.lora_prefix}_lora_adapter_metadata": metadata},
            safe_serialization=True,
        )

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model: every LoRA adapter of the denoiser switched off, then back on."""
        net = unwrap(self.denoiser)
        net.disable_adapters()
        try:
            yield
        finally:
            net.enable_adapters()

    @contextlib.contextmanager
    def adapters_merged(self) -> Iterator[None]:
        """Fold the active LoRA adapters into the denoiser's weights for gradient-free sampling.

        peft runs an adapted layer as the base layer plus two small LoRA products; in the
        T - 1 steps that carry no gradient, that is pure overhead (about 45% of a shapes-sd
        step with LoRA on the convolutions too). Inside this block the adapted layers run as
        plain layers with W + ΔW. On exit the saved base weights are copied back, so they
        come out bit for bit as they went in (subtracting ΔW again would not, and in bf16
        would drift visibly). Costs one copy of the adapted layers' weights while inside.

        Only under no_grad; a no-op when the denoiser is sharded (FSDP, DeepSpeed) or
        compiled, whose weights cannot be edited in place, or when adapters are off.
        Yields None when it merged nothing, else a context manager that runs the base model
        inside the block (the saved weights swapped in, no copies; for DRaFT+).
        """
        from peft.tuners.lora import LoraLayer

        if torch.is_grad_enabled():
            raise RuntimeError("adapters_merged() is for sampling under no_grad")
        net = _mergeable(self.denoiser)
        layers = [] if net is None else [
            m for m in net.modules()
            if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged and m.active_adapters
        ]
        saved = [m.get_base_layer().weight.detach().clone() for m in layers]
        try:
            for m in layers:
                m.merge()
            yield functools.partial(_base_weights, layers, saved) if layers else None
        finally:
            for m, weight in zip(layers, saved):
                m.merged_adapters.clear()  # peft's own record; the weights are restored below
                m.get_base_layer().weight.data.copy_(weight)


@contextlib.contextmanager
def _base_weights(layers, saved) -> Iterator[None]:
    """Inside `adapters_merged`: point the merged layers at the saved base weights, and back.

    A merged peft layer runs only its base layer, so this runs the base model at the cost
    of two pointer swaps per layer (instead of unmerging and merging again)."""
    merged = [m.get_base_layer().weight.data for m in layers]
    for m, weight in zip(layers, saved):
        m.get_base_layer().weight.data = weight
    try:
        yield
    finally:
        for m, weight in zip(layers, merged):
            m.get_base_layer().weight.data = weight


def load_callable(spec: str) -> Callable:
    """'module:attr' -> the attribute (for the metrics of models that ship with the package)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def quiet_diffusers() -> None:
    """Silence diffusers/transformers progress bars and info logs; ours are the ones that matter."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _mergeable(module):
    """The bare denoiser if its weights are ordinary tensors (bare or under DDP), else None."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        module = module.module
    if hasattr(module, "module") or hasattr(module, "_orig_mod"):
        return None  # FSDP, DeepSpeed or torch.compile wrappers
    return module


def unwrap(module):
    """The module inside a DistributedDataParallel/compile wrapper."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module
