"""The Stable Diffusion adapter: any diffusers `StableDiffusionPipeline` (SD 1.x, 2.x, shapes-sd)."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from draft.errors import UserError
from draft.models import EMBEDDED, resolve


def quiet_diffusers() -> None:
    """Silence diffusers/transformers progress bars and info logs; ours are the ones that matter."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class StableDiffusion:
    """UNet (+ LoRA) denoiser, CLIP text encoder and VAE of one SD pipeline.

    All weights are frozen here; `draft.lora.add_lora(model.unet, ...)` adds the trainable
    part. `unet` may be replaced by a distributed wrapper (Accelerate's `prepare`), so the
    adapter only ever calls it.
    """

    def __init__(self, pipe, name: str = ""):
        self.pipe = pipe
        self.name = name
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.scheduler_config = pipe.scheduler.config
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, path_or_id: str, device=None, dtype=None) -> "StableDiffusion":
        from diffusers import StableDiffusionPipeline
        from safetensors import SafetensorError

        from draft.safeio import corrupt_in

        quiet_diffusers()
        source, local = resolve(path_or_id)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                source,
                dtype=dtype or torch.float32,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                use_safetensors=True,  # never unpickle downloaded weights
                local_files_only=local,
            )
        except (OSError, ValueError, EnvironmentError, SafetensorError) as e:
            corrupt = corrupt_in(source, f"model {path_or_id!r}:") if local else None  # name the bad file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise corrupt or UserError(f"cannot load model {path_or_id!r}: {first}") from None
        model = cls(pipe, name=path_or_id)
        if device is not None:
            model.to(device)
        return model

    # --- shapes and sizes ---

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The native image size in pixels."""
        return self.pipe.unet.config.sample_size * self.vae_scale_factor

    def latent_shape(self, height: int = 0, width: int = 0) -> tuple[int, int, int]:
        """(C, h, w) of the latent for an image of height x width (0: native)."""
        f = self.vae_scale_factor
        h, w = (height or self.resolution) // f, (width or self.resolution) // f
        return (self.pipe.unet.config.in_channels, h, w)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def to(self, device) -> "StableDiffusion":
        self.pipe.to(device)
        return self

    @property
    def is_embedded(self) -> bool:
        return self.name in EMBEDDED

    # --- the three calls the sampler makes ---

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance: bool = True):
        """(cond, uncond) text encodings, uncond being the empty prompt, as the pipeline does."""
        cond, uncond = self.pipe.encode_prompt(
            list(prompts), self.device, num_images_per_prompt=1, do_classifier_free_guidance=guidance
        )
        return cond, uncond

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output at x_t (ε for SD 1.x, v for SD 2.x-v), in the latent's dtype."""
        weight_dtype = self.vae.dtype
        out = self.unet(x.to(weight_dtype), t, encoder_hidden_states=cond.to(weight_dtype), return_dict=False)[0]
        return out.to(x.dtype)

    def decode(self, latents: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        """Images in [0, 1] from latents; differentiable, VAE frozen."""
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

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Run the base model: every LoRA adapter of the UNet switched off, then back on."""
        unet = _unwrap(self.unet)
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()

    @contextlib.contextmanager
    def adapters_merged(self):
        """Fold the active LoRA adapters into the UNet's weights for gradient-free sampling.

        peft runs an adapted layer as the base layer plus two small LoRA products; in the
        T - 1 steps that carry no gradient, that is pure overhead (about 45% of a shapes-sd
        step with LoRA on the convolutions too). Inside this block the adapted layers run as
        plain layers with W + ΔW. On exit the saved base weights are copied back, so they
        come out bit for bit as they went in (subtracting ΔW again would not, and in bf16
        would drift visibly). Costs one copy of the adapted layers' weights while inside.

        Only under no_grad; a no-op when the UNet is sharded (FSDP, DeepSpeed) or compiled,
        whose weights cannot be edited in place, or when adapters are off.
        """
        from peft.tuners.lora import LoraLayer

        if torch.is_grad_enabled():
            raise RuntimeError("adapters_merged() is for sampling under no_grad")
        unet = _mergeable(self.unet)
        layers = [] if unet is None else [
            m for m in unet.modules()
            if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged and m.active_adapters
        ]
        saved = [m.get_base_layer().weight.detach().clone() for m in layers]
        try:
            for m in layers:
                m.merge()
            yield
        finally:
            for m, weight in zip(layers, saved):
                m.merged_adapters.clear()  # peft's own record; the weights are restored below
                m.get_base_layer().weight.data.copy_(weight)


def _mergeable(module):
    """The bare UNet if its weights are ordinary tensors (bare or under DDP), else None."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        module = module.module
    if hasattr(module, "module") or hasattr(module, "_orig_mod"):
        return None  # FSDP, DeepSpeed or torch.compile wrappers
    return module


def _unwrap(module):
    """The module inside a DistributedDataParallel/compile wrapper."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module
