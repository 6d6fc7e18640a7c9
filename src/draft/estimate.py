"""Expected peak accelerator memory (and relative time) of a training run, before any weight loads.

`draft train ... --dry-run` prints it. Everything comes from the pipeline folder's configs:

- **weights**: every component of `model_index.json` is built on the meta device
  (`draft.models.meta`), so its parameter count is exact; frozen weights are held in the
  run's precision (float32, or bf16/fp16 under mixed precision), the LoRA in float32 with
  its gradient and AdamW's two moments (16 bytes a parameter);
- **activations**: one gradient-carrying denoiser call and one VAE decode are run on meta
  inputs of the run's batch and size, and the bytes autograd keeps for backward are
  counted, with autocast's rules (normalisations in float32) and fused attention;
- **the method** decides which of those are alive at once (below), and the checkpointed
  steps each keep their input latents.

Peak activations by method, U = one denoiser call on the batch (doubled by classifier-free
guidance, times lv_n for DRaFT-LV), D = the decode of the batch (times lv_n), G = the
gradient-carrying steps, s = one batch of latents:

| method | with checkpointing | without |
| --- | --- | --- |
| DRaFT, DRaFT-K, AlignProp (K = k_max), DRaFT-LV | max(U, D) + G·s | G·U + D |
| ReFL (its one step is never checkpointed) | U + D | U + D |
| DDPO (no reward gradient; G trained steps) | U + G·s | G·U |

One factor, `CALIBRATION`, scales the counted activations to what the CUDA allocator
reports; it was fitted on Stable Diffusion 1.5's architecture at 512 px on an H100/H200
(BENCHMARKS.md, "Memory estimate against measurements"), the only architecture measured so
far. Not modelled: the reward model's activations, allocator fragmentation, the sampling
phase's copy of the adapted weights (`sampling.merge_lora`, freed before the gradient
step), sharding (FSDP/DeepSpeed divide the weights, not the activations).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draft.config import TrainConfig

GIB = 2**30
# Measured peak / counted activations on SD 1.5's architecture (BENCHMARKS.md): the
# allocator's rounding and the transient buffers of the backward pass.
CALIBRATION = 1.05
# Common accelerator sizes as sold ("24 GB": RTX 3090/4090, A10, L4; 40: A100-40GB; 48: A6000,
# L40S; 80: A100/H100-80GB). Their memory is about that many GiB (24564 MiB on a 4090, 81559 on
# an H100), of which the CUDA context and allocator slack take about 1 GiB.
CARDS = (24, 40, 48, 80)
RESERVED = 1.0 * GIB
_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Estimate:
    """Peak memory of one process, in bytes, by part."""

    weights: int  # frozen pipeline weights in the run's precision
    lora: int  # LoRA parameters, gradients and AdamW state (float32)
    reward: int  # reward-model weights found on disk (0 if none or unknown)
    activations: int  # the method's peak activations, calibrated
    lora_params: int
    parts: dict[str, int] = field(default_factory=dict)  # weights by component
    time_ratio: float = 0.0  # a training step in units of plain sampling of the batch (denoiser calls)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.weights + self.lora + self.reward + self.activations

    def fits(self) -> tuple[list[int], list[int]]:
        """(card sizes in GB it fits, those it does not)."""
        yes = [c for c in CARDS if self.peak + RESERVED <= c * GIB]
        return yes, [c for c in CARDS if c not in yes]

    def lines(self) -> list[str]:
        g = lambda n: f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.{0 if n >= 10 * 2**20 else 1}f} MiB"  # noqa: E731
        parts = ", ".join(f"{k} {g(v)}" for k, v in self.parts.items())
        yes, no = self.fits()
        fit = (f"fits {', '.join(f'{c} GB' for c in yes)} cards" if yes else "fits none of the common cards")
        fit += f"; too large for {', '.join(f'{c} GB' for c in no)}" if no and yes else ""
        out = [
            f"estimated peak accelerator memory per process: {g(self.peak)} ({fit})",
            f"  weights {g(self.weights)} ({parts}); LoRA {self.lora_params:,} parameters with gradients and "
            f"AdamW state {g(self.lora)}; reward weights {g(self.reward)}; activations {g(self.activations)}",
        ]
        if self.time_ratio:
            out.append(f"  time: a training step costs about {self.time_ratio:.1f}x sampling its batch, counted in "
                       "denoiser calls (the decode and reward come on top)")
        return out + [f"  {n}" for n in self.notes]


def estimate(config: TrainConfig, folder: str | Path, reward_bytes: int = 0) -> Estimate:
    """The estimate for `config` on the pipeline folder `folder` (configs only, no weights)."""
    from draft.models import meta
    from draft.models.base import quiet_diffusers

    quiet_diffusers()
    folder = Path(folder)
    dtype = _DTYPES[config.mixed_precision]
    comps = meta.components(folder)
    parts = {name: meta.module_bytes(m, dtype) for name, m in comps.items()}
    den_name = meta.denoiser_name(comps)
    notes = []
    if den_name is None or "vae" not in comps:
        notes.append("no denoiser or VAE in model_index.json: activations not estimated")
        return Estimate(sum(parts.values()), 0, reward_bytes, 0, 0, parts, notes=notes)
    den, vae = comps[den_name].to(dtype), comps["vae"].to(dtype)
    n_lora = lora_parameters(den, lora_targets(config, folder), config.lora.rank)
    s = config.sampling
    latent = latent_shape(den, vae, s.height, s.width)
    procs = int(os.environ.get("WORLD_SIZE", "1"))
    b = config.batch_size
    cfg = 1 if s.guidance_scale == 1 else 2
    n = config.lv_n if config.method == "draft-lv" else 1
    text = _text_tokens(folder, den)
    u = meta.denoiser_saved_bytes(den, b * cfg * n, latent, dtype, text)
    d = meta.decoder_saved_bytes(vae, b * n, latent, dtype) if config.method != "ddpo" else 0
    if u is None:
        notes.append(f"activations of {type(den).__name__} are not modelled; weights only")
        u = 0
    precision = {"no": "float32"}.get(config.mixed_precision, config.mixed_precision)
    step = b * n * math.prod(latent) * 4  # a checkpointed step keeps its float32 input latents
    g = grad_steps(config)
    acts = peak_activations(config.method, s.checkpointing, u, d, step, g)
    notes.append(f"{config.batch_size} sample(s) per process at {latent[1] * _vae_factor(vae)}x"
                 f"{latent[2] * _vae_factor(vae)} px, {precision} weights, checkpointing "
                 f"{'on' if s.checkpointing else 'off'}; activations calibrated on SD 1.5's architecture only"
                 + (f"; x{procs} processes, each this much" if procs > 1 else ""))
    if config.method != "ddpo" and not reward_bytes:
        notes.append("the reward model's weights and activations are not included")
    est = Estimate(sum(parts.values()), n_lora * 16, reward_bytes, int(acts * CALIBRATION), n_lora, parts, notes=notes)
    est.time_ratio = time_ratio(config)
    return est


def grad_steps(config: TrainConfig) -> int:
    """How many sampling steps carry gradient (the most, for AlignProp's random window)."""
    t = config.sampling.num_steps
    return {
        "draft": t, "draft-k": config.k, "alignprop": config.alignprop_k_max, "draft-lv": 1, "refl": 1,
        "ddpo": max(1, math.ceil(t * config.ddpo_timestep_fraction)),
    }[config.method]


def peak_activations(method: str, checkpointing: bool, u: int, d: int, step: int, g: int) -> int:
    """The table in this module's docstring."""
    if method == "refl":
        return u + d
    if method == "ddpo":
        return u + g * step if checkpointing else g * u
    return max(u, d) + g * step if checkpointing else g * u + d


def time_ratio(config: TrainConfig) -> float:
    """Denoiser-call units of a step over those of sampling the batch (T): a gradient-carrying
    call costs a forward and a backward (about two forwards), plus one forward when
    checkpointed; DRaFT-LV's passes and DDPO's reuse of a rollout multiply those."""
    t, c = config.sampling.num_steps, 3 + (config.sampling.checkpointing and config.method != "refl")
    if config.method == "ddpo":
        return (t + config.ddpo_rollout_reuse * grad_steps(config) * c) / t
    if config.method == "draft-lv":
        return (t + config.lv_n * c) / t
    if config.method == "refl":
        return (sum(config.refl_range) / 2 + c) / t
    g = (config.alignprop_k_min + config.alignprop_k_max) / 2 if config.method == "alignprop" else grad_steps(config)
    return (t - g + g * c) / t


def lora_targets(config: TrainConfig, folder: Path) -> tuple[str, ...]:
    """The config's LoRA targets, or else the family adapter's defaults (as `draft.lora` picks
    them); attention projections for a pipeline no adapter serves yet."""
    if config.lora.target_modules:
        return tuple(config.lora.target_modules)
    from draft.errors import UserError
    from draft.models import ADAPTERS, pipeline_class
    from draft.models.base import load_callable

    try:
        return tuple(load_callable(ADAPTERS[pipeline_class(str(folder))]).default_lora_targets)
    except UserError:
        return ("to_q", "to_k", "to_v", "to_out.0")


def lora_parameters(module: torch.nn.Module, targets, rank: int) -> int:
    """Parameters peft's LoRA adds to the layers whose names end in one of `targets`."""
    n = 0
    for name, m in module.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, torch.nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, torch.nn.Conv2d):  # A: in -> r with the layer's kernel; B: 1x1, r -> out
            n += rank * m.in_channels // m.groups * math.prod(m.kernel_size) + rank * m.out_channels
    return n


def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(den, vae, height: int = 0, width: int = 0) -> tuple[int, int, int]:
    """(C, h, w) of the latent for the requested image size (0: the model's native size)."""
    f = _vae_factor(vae)
    native = getattr(den.config, "sample_size", None) or 128  # FLUX's config has none: 1024 px
    native = native[0] if isinstance(native, (list, tuple)) else native
    h, w = (height // f if height else native), (width // f if width else native)
    return vae.config.latent_channels, h, w


def _text_tokens(folder: Path, den) -> int:
    """Text tokens the denoiser attends to: the CLIP tokenizer's length for a UNet, plus the
    256 T5 positions diffusers' SD3 pipeline appends (zeros without a T5); 512 for FLUX."""
    import json

    if type(den).__name__ == "FluxTransformer2DModel":
        return 512
    try:
        length = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text()).get("model_max_length", 77)
    except (OSError, ValueError):
        length = 77
    length = length if isinstance(length, int) and 0 < length <= 4096 else 77
    return length + 256 if type(den).__name__ == "SD3Transformer2DModel" else length
