"""The pieces every diffusers-pipeline adapter shares.

`PipelineAdapter` implements the parts of the model protocol (`draft.models.protocol`)
that are the same for every diffusers pipeline (loading, freezing, VAE decoding, switching
and merging LoRA adapters, saving a LoRA with the pipeline's own `save_lora_weights`); a
family adds its prompt encoding, its denoiser call, its latent layout and its schedule.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from draft.errors import UserError
from draft.models import merging
from draft.models.meta import checkpointed
# Re-exported: the families and the tests import the protocol's names (and `unwrap`) from here.
from draft.models.merging import unwrap  # noqa: F401
from draft.models.protocol import DiffusionModel, Size  # noqa: F401


class PipelineAdapter:
    """Shared implementation over one diffusers pipeline; subclasses name the pipeline class
    and fill in the family-specific calls."""

    pipeline_class: ClassVar[str]
    family_name: ClassVar[str]  # how messages and notes name the family ("Stable Diffusion")
    lora_prefix: ClassVar[str]
    default_lora_targets: ClassVar[tuple[str, ...]]
    # What the family's pipeline samples with where draft's own defaults differ (`draft.defaults`).
    defaults: ClassVar[dict[str, tuple[Any, str]]] = {}
    fps: ClassVar[int] = 0  # video families: the frame rate their videos are played at
    # LoRA formats other tools read for this family: name -> "module:function" (`draft.export`).
    export_formats: ClassVar[dict[str, str]] = {}
    # Adapter options that are also arguments of the pipeline's __call__ (the card's snippet
    # passes them, e.g. SD3's max_sequence_length for a model trained without T5).
    call_options: ClassVar[tuple[str, ...]] = ()
    # Keyword arguments for `from_pretrained` beyond the shared ones.
    load_kwargs: ClassVar[dict[str, Any]] = {}
    _compiled = None  # the compiled gradient-free calls (`compile_sampling`), if any

    def __init__(self, pipe, name: str = "", metrics: Callable | None = None, **options):
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        self.setup(pipe, name, metrics, options)
        self.check()

    def setup(self, pipe, name: str, metrics: Callable | None, options: dict) -> None:
        """Take the pipeline's parts and the settings (`model_options`); families add theirs."""
        for key, value in options.items():  # e.g. SD3's max_sequence_length for a model trained without T5
            if key not in self.settings():
                known = ", ".join(sorted(self.settings())) or "none"
                raise UserError(f"model_options.{key}: the {self.family_name} adapter has no such setting "
                                f"(its settings: {known})")
            setattr(self, key, value)
        self.pipe = pipe
        self.name = name
        self.denoiser = getattr(pipe, self.lora_prefix)
        self.vae = pipe.vae
        self.scheduler_config = pipe.scheduler.config
        self._metrics = metrics
        # The denoiser runs in its own dtype: a pipeline may keep its VAE in float32 (SDXL's
        # overflows in fp16) while the denoiser is in half precision.
        self.weight_dtype = next(self.denoiser.parameters()).dtype

    @classmethod
    def on_meta(cls, folder: str | Path, components: dict[str, torch.nn.Module], **options) -> "PipelineAdapter":
        """The adapter over a pipeline folder's components built on the meta device
        (`draft.models.meta`), for the memory estimate: its sizes and its denoiser and decoder
        calls are the real ones, on tensors without storage; nothing is loaded or checked."""
        import json
        from types import SimpleNamespace

        import diffusers
        from diffusers.configuration_utils import FrozenDict

        folder = Path(folder)
        index = json.loads((folder / "model_index.json").read_text())
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
        pipeline = getattr(diffusers, cls.pipeline_class)
        # The pipeline class without its __init__: its static helpers (FLUX's packing) work,
        # and its components are the meta modules.
        pipe = pipeline.__new__(pipeline)
        pipe.__dict__.update({name: None for name in index if not name.startswith("_")})
        pipe.__dict__.update(components, scheduler=SimpleNamespace(config=scheduler),
                             _internal_dict=FrozenDict(index))
        model = cls.__new__(cls)
        model.setup(pipe, str(folder), None, options)
        model.folder = folder
        return model

    def meta_conditioning(self, batch: int, dtype: torch.dtype):
        """Conditioning of the shapes `conditioning` returns, on the meta device (for the
        estimate); None where the family's is not modelled."""
        return None

    def text_tokens(self, tokenizer: str = "tokenizer", default: int = 77) -> int:
        """A tokenizer's length, read from the folder (77 for CLIP)."""
        import json

        try:
            length = json.loads((Path(self.folder) / tokenizer / "tokenizer_config.json").read_text()).get(
                "model_max_length", default)
        except (OSError, ValueError, AttributeError):
            length = default
        return length if isinstance(length, int) and 0 < length <= 4096 else default

    def check(self) -> None:
        """Refuse, at load time, a pipeline the sampler cannot run (an unknown scheduler or
        prediction type), rather than fail with a traceback at the first step."""
        try:
            self.schedule(2)
        except ValueError as e:
            raise UserError(f"{self.name}: {e}") from None

    @classmethod
    def from_pretrained(cls, source: str, local: bool, name: str, device=None, dtype=None, metrics=None, **options):
        import diffusers
        from safetensors import SafetensorError

        from draft.safeio import corrupt_in

        quiet_diffusers()
        pipeline = getattr(diffusers, cls.pipeline_class)
        try:
            absent = dict.fromkeys(cls.absent_components(source, local))
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
    def settings(cls) -> dict[str, Any]:
        """The adapter's settings a config may change (`model_options`): its plain class
        attributes that are not part of the protocol, with their defaults."""
        fixed = set(vars(PipelineAdapter)) | {"pipeline_class", "family_name", "lora_prefix", "default_lora_targets",
                                               "max_shift"}
        out = {}
        for klass in reversed(cls.__mro__):
            for key, value in vars(klass).items():
                if (not key.startswith("_") and key not in fixed and isinstance(value, (int, float, str, bool))
                        and not callable(value)):
                    out[key] = getattr(cls, key)
        return out

    @classmethod
    def pipeline_kwargs(cls, sampling: dict, options: dict) -> dict[str, Any]:
        """Arguments of the pipeline's own __call__ that reproduce draft's sampling settings,
        beyond the prompt, the steps and the guidance (for the model card's snippet)."""
        kwargs = {k: v for k, v in options.items() if k in cls.call_options}
        for key in ("height", "width"):  # the run's size, else the native one the model was loaded with
            if sampling.get(key) or options.get(key):
                kwargs[key] = sampling.get(key) or options[key]
        if sampling.get("negative_prompt"):
            kwargs["negative_prompt"] = sampling["negative_prompt"]
        return kwargs

    @classmethod
    def absent_components(cls, source: str, local: bool = True) -> list[str]:
        """Optional components the folder does not have (SD3 saved without its T5, no image
        encoder): diffusers refuses such a folder unless each is passed as None."""
        import diffusers

        pipeline = getattr(diffusers, cls.pipeline_class)
        index = pipeline.load_config(source, local_files_only=local)
        expected, _ = pipeline._get_signature_keys(pipeline)
        return [name for name in expected if (name in index or name in pipeline._optional_components)
                and (not isinstance(index.get(name), (list, tuple)) or index[name][0] is None)]

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
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this many pixels."""
        return self.vae_scale_factor

    @property
    def native_size(self) -> Size:
        return Size(self.resolution, self.resolution)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def to(self, device):
        self.pipe.to(device)
        return self

    def size(self, requested: Size = Size()) -> Size:
        native, m = self.native_size, self.size_multiple
        if requested.frames and not native.video:
            raise UserError(f"{self.name} is an image model: it makes no video frames (got frames={requested.frames})")
        h, w = requested.height or native.height, requested.width or native.width
        if h % m or w % m:
            raise UserError(f"{self.name}: image sizes must be multiples of {m} pixels, got {h}x{w}")
        size = Size(h, w, requested.frames or native.frames)
        self.check_frames(size.frames)
        return size

    def check_frames(self, frames: int) -> None:
        """UserError unless the model can make that many frames (video families override)."""

    def latent_shape(self, size: Size = Size()) -> tuple[int, ...]:
        size = self.size(size)
        f = self.vae_scale_factor
        return (self.latent_channels, size.height // f, size.width // f)

    @property
    def latent_channels(self) -> int:
        return self.denoiser_config.in_channels

    def schedule(self, num_steps: int, size: Size = Size()):
        from draft.sampling import Schedule

        return Schedule.from_scheduler_config(self.scheduler_config, num_steps)

    def guide(self, uncond_out: torch.Tensor, cond_out: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance: ε̃ = ε_u + s·(ε_c - ε_u)."""
        from draft.sampling import cfg

        return cfg(uncond_out, cond_out, scale)

    def guidance(self, scale: float, scale_2: float | None):
        return scale  # one scale for the whole chain

    def guided_passes(self, scale: float) -> int:
        return 1 if scale == 1 else 2  # as `conditioning` returns an unconditional half

    # --- decoding ---

    def decode(self, latents: torch.Tensor, frames: Sequence[int] | None = None,
               use_checkpoint: bool = False) -> torch.Tensor:
        if frames is not None:
            raise ValueError(f"{self.name} makes images, which have no frames to choose")
        if not use_checkpoint:
            return self._decode(latents)
        if not getattr(self.vae, "_supports_gradient_checkpointing", False):
            return checkpointed(self._decode, latents)
        # diffusers' own per-block checkpointing of the decoder (its mid and up blocks), run
        # through `checkpointed` so the estimate sees the blocks, and its slicing (one sample
        # at a time): the backward holds one block of one sample at a time, where a
        # checkpointed whole decode recomputes everything at once.
        slicing = getattr(self.vae, "use_slicing", False)
        self.vae.enable_gradient_checkpointing(checkpointed)
        self.vae.use_slicing = True
        try:
            return self._decode(latents)
        finally:
            self.vae.disable_gradient_checkpointing()
            self.vae.use_slicing = slicing

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
        # The pipelines' postprocessing: [-1, 1] -> [0, 1], clamped.
        return (images / 2 + 0.5).clamp(0, 1)

    def metrics(self, samples: torch.Tensor, prompts: list[str]) -> dict:
        return self._metrics(samples, prompts) if self._metrics is not None else {}

    # --- LoRA ---

    def save_lora(self, directory: str | Path, layers: dict[str, torch.Tensor], metadata: dict) -> None:
        import diffusers

        getattr(diffusers, self.pipeline_class).save_lora_weights(
            directory,
            **{f"{self.lora_prefix}_lora_layers": layers, f"{self.lora_prefix}_lora_adapter_metadata": metadata},
            safe_serialization=True,
        )

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trainable network; a gradient-free call inside `compile_sampling`'s block gets
        the bare one, compiled: a no-grad forward needs none of a DDP wrapper's collectives."""
        if self._compiled is not None and self._compiled.on and not torch.is_grad_enabled():
            return self._compiled.net
        return self._denoiser

    @denoiser.setter
    def denoiser(self, net: torch.nn.Module) -> None:
        self._denoiser = net

    def compile_sampling(self, mode: str) -> contextlib.AbstractContextManager:
        """Compile the denoiser's gradient-free calls (`draft.models.compiled`, `sampling.compile`)
        once; the block returned runs them compiled. Wrapped (FSDP1, DeepSpeed) and already
        compiled denoisers stay eager; under FSDP2 `draft.sharding.setup` turns the option off."""
        from draft.models.compiled import CompiledSampling

        if mode == "none":
            return contextlib.nullcontext()
        if self._compiled is None:
            net = merging.bare(self._denoiser)
            if net is None:
                return contextlib.nullcontext()
            self._compiled = CompiledSampling(net, mode)
        return self._compiled.active()

    def adapters_disabled(self) -> contextlib.AbstractContextManager:
        """Run the base model: every LoRA adapter of the denoiser switched off, then back on."""
        return merging.disabled(self.denoiser)

    def adapters_merged(self) -> contextlib.AbstractContextManager:
        """Fold the active LoRA adapters into the denoiser's weights for gradient-free
        sampling (`draft.models.merging.merged`): yields None when it merged nothing, else a
        context manager that runs the base model inside the block (for DRaFT+)."""
        return merging.merged(self.denoiser)


def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    """A tensor without storage (the memory estimate's inputs)."""
    return torch.empty(tuple(shape), device="meta", dtype=dtype)


def load_callable(spec: str) -> Callable:
    """'module:attr' -> the attribute (for the metrics of models that ship with the package)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def quiet_diffusers() -> None:
    """Silence diffusers/transformers progress bars and info logs; ours are the ones that matter."""
    import logging

    import diffusers
    import transformers

    # diffusers imports torchao where installed (the [quant] extra), which on a CPU-only torch
    # logs its GPU kernels it cannot load, and torch its pytree deprecations: not the user's concern.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
