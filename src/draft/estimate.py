"""Expected peak accelerator memory (and relative time) of a training run, before any weight loads.

`draft train ... --dry-run` prints it. Everything comes from the pipeline folder's configs:

- **weights**: every component of `model_index.json` is built on the meta device
  (`draft.models.meta`), so its parameter count is exact; frozen weights are held in the
  run's precision (float32, or bf16/fp16 under mixed precision), the LoRA in float32 with
  its gradient and AdamW's two moments (16 bytes a parameter);
- **activations**: one gradient-carrying denoiser call and one VAE decode are run on meta
  inputs of the run's batch and size, and the bytes autograd keeps for backward are
  counted, with autocast's rules (normalisations in float32) and fused attention; a
  checkpointed decode (`sampling.decode_checkpointing`) counts its inputs and the largest
  region it recomputes at once (a video's latent frame, an image's whole decode);
- **the method** decides which of those are alive at once (below), and the checkpointed
  steps each keep their input latents.
- **the text encoders** (`text_encoders`) count with the weights on `device`; with
  `offload` only the largest, while it encodes, outside the step; with `cache` not at all,
  but a micro-batch's cached embeddings do (all of them are in host memory, reported apart).

Peak activations by method, U = one denoiser call on the batch (doubled by classifier-free
guidance, times lv_n for DRaFT-LV), D = the decode of the batch (times lv_n), G = the
gradient-carrying steps, s = one batch of latents:

| method | with checkpointing | without |
| --- | --- | --- |
| DRaFT, DRaFT-K, AlignProp (K = k_max), DRaFT-LV | max(U, D) + G·s | G·U + D |
| ReFL (its one step is never checkpointed) | U + D | U + D |
| DDPO (no reward gradient; G trained steps) | U + G·s | G·U |

With `sampling.checkpointing=auto`, m of the G steps keep their graphs and the rest are
checkpointed: m·U + (G - m)·s + max(D, U) (no U in the max when m = G), the largest m whose
peak stays within the budget (`checkpoint_split`); m = 0 and m = G are the two columns.

One factor, `CALIBRATION`, scales the counted activations to what the CUDA allocator
reports; it was fitted on Stable Diffusion 1.5's architecture at 512 px on an H100/H200
(BENCHMARKS.md, "Memory estimate against measurements"), the only architecture measured so
far. Not modelled: the reward model's activations, allocator fragmentation, the sampling
phase's copy of the adapted weights (`sampling.merge_lora`, freed before the gradient
step). Under an FSDP2 launch (`draft.sharding`) the denoiser's weights and the LoRA's
state are divided by the processes; the activations are not.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draft.config import TrainConfig
from draft.errors import UserError
from draft.sharding import launched_fsdp2

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
    # text_encoders (`draft.models.text`): offload: the encoder weights on the accelerator while
    # encoding (not during the step); cache: a micro-batch's embeddings there, and all of them
    # in host memory.
    encoding: int = 0
    embeddings: int = 0
    host: int = 0
    time_ratio: float = 0.0  # a training step in units of plain sampling of the batch (denoiser calls)
    kept_graphs: int = 0  # gradient steps whose graphs are kept (not checkpointed)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        fixed = self.weights + self.lora + self.reward
        return max(fixed + self.activations + self.embeddings, fixed + self.encoding)

    def fits(self) -> tuple[list[int], list[int]]:
        """(card sizes in GB it fits, those it does not)."""
        yes = [c for c in CARDS if self.peak + RESERVED <= c * GIB]
        return yes, [c for c in CARDS if c not in yes]

    def lines(self) -> list[str]:
        g = human_bytes
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


def human_bytes(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.{0 if n >= 10 * 2**20 else 1}f} MiB"


def estimate(config: TrainConfig, folder: str | Path, reward_bytes: int = 0) -> Estimate:
    """The estimate for `config` on the pipeline folder `folder` (configs only, no weights).

    The family's own adapter, built over the components on the meta device
    (`PipelineAdapter.on_meta`), answers every question about the model: the sample and
    latent sizes, the denoiser call and the decode of the frames the reward needs, so
    nothing here asks which family it is.
    """
    from draft.models import meta
    from draft.models.base import quiet_diffusers

    quiet_diffusers()
    folder = Path(folder)
    dtype = _DTYPES[config.mixed_precision]
    comps = meta.components(folder)
    model = _on_meta(config, folder, comps, dtype)
    dtypes = _dtypes(model, dtype)
    parts = {name: meta.module_bytes(m, dtypes.get(name, dtype)) for name, m in comps.items()}
    if model is None:
        notes = ["no denoiser or VAE this draft can model in model_index.json: activations not estimated"]
        return Estimate(sum(parts.values()), 0, reward_bytes, 0, 0, parts, notes=notes)
    notes = _quantized(config, model, comps, parts, dtype)
    n_lora = lora_parameters(model.denoiser, config.lora.target_modules or model.default_lora_targets,
                             config.lora.rank)
    u, d, size, latent, more = _activations(config, model, dtype)
    notes += more
    b, n = config.batch_size, _method(config).passes(config)
    precision = {"no": "float32"}.get(config.mixed_precision, config.mixed_precision)
    step = b * n * math.prod(latent) * 4  # a checkpointed step keeps its float32 input latents
    g = grad_steps(config)
    ck = config.sampling.checkpointing
    encoders, enc = _text_encoders(config, model, parts, dtype)
    weights = sum(parts.values()) - (sum(encoders.values()) if config.text_encoders != "device" else 0)
    procs = int(os.environ.get("WORLD_SIZE", "1"))
    lora = n_lora * 16
    if procs > 1 and launched_fsdp2():  # FSDP2 shards the denoiser (base and LoRA), not the other components
        shard = sum(b for name, b in parts.items() if comps[name] is model.denoiser)
        weights -= shard - shard // procs
        lora //= procs
        notes.append(f"FSDP2: the denoiser's weights and the LoRA's state split over {procs} processes (the blocks "
                     "gathered while they run are not counted)")
    if ck == "auto":
        fixed = weights + lora + reward_bytes + enc.embeddings
        budget = memory_budget(config.sampling.memory_budget_gb)
        kept = checkpoint_split(config.method, u, d, step, g, budget - fixed)
        notes.append(f"checkpointing auto: the graphs of {kept} of the {g} gradient-carrying step(s) kept, "
                     f"{g - kept} checkpointed, to stay within a budget of {budget / GIB:.1f} GiB")
    else:
        kept = 0 if ck else g
    acts = peak_activations(config.method, kept, u, d, step, g)
    how = {True: "on", False: "off"}.get(ck, f"{g - kept} of {g} steps")
    notes.append(f"{config.batch_size} sample(s) per process at {size}, {precision} weights, checkpointing "
                 f"{how}; activations calibrated on SD 1.5's "
                 f"architecture only" + (f"; x{procs} processes, each this much" if procs > 1 else ""))
    if config.method != "ddpo" and not reward_bytes:
        notes.append("the reward model's weights and activations are not included")
    est = Estimate(weights, lora, reward_bytes, int(acts * CALIBRATION), n_lora, parts, notes=notes + enc.notes,
                   encoding=enc.encoding, embeddings=enc.embeddings, host=enc.host)
    est.kept_graphs = kept
    est.time_ratio = time_ratio(config, kept, model.guided_passes(config.sampling.guidance_scale))
    return est


def _quantized(config: TrainConfig, model, comps: dict, parts: dict[str, int], dtype) -> list[str]:
    """Count the denoisers' weights as `config.quantize` holds them (`draft.models.memory`)."""
    from draft.models.memory import QUANT_BITS, denoisers, quantized_bytes

    if config.quantize == "none":
        return []
    nets = denoisers(model)
    for name, module in comps.items():
        if any(module is net for net in nets):
            parts[name] = quantized_bytes(module, dtype, config.quantize)
    return [f"quantize={config.quantize}: the denoiser's Linear weights at {QUANT_BITS[config.quantize]} bits with "
            "their scales, the rest of it in the run's precision; not counted: the gradient-free steps' float copy of the "
            "adapted layers (`sampling.merge_lora`)"]


def _text_encoders(config: TrainConfig, model, parts: dict[str, int], dtype):
    """({text encoder: bytes}, an Estimate holding what `config.text_encoders` puts where):
    offload: the largest encoder, alone on the accelerator while it encodes (the hooks move
    one at a time); cache: a micro-batch's embeddings, and all the run's in host memory."""
    from draft.models.text import conditioning_bytes, is_text_encoder

    encoders = {k: v for k, v in parts.items() if is_text_encoder(k)}
    out, mode = Estimate(0, 0, 0, 0, 0), config.text_encoders
    if mode == "offload":
        out.encoding = max(encoders.values(), default=0)
        out.notes.append(f"text_encoders=offload: text encoder weights on the accelerator only while encoding "
                         f"({human_bytes(out.encoding)} at most, outside the step)")
    row = model.meta_conditioning(1, dtype) if mode == "cache" else None
    if row is not None:
        row = conditioning_bytes(row) * model.guided_passes(config.sampling.guidance_scale)  # with the negative's
        n = _prompt_count(config)
        out.embeddings, out.host = config.batch_size * row, n * row
        held = (f"{n} prompts' embeddings {human_bytes(out.host)} in host memory, a micro-batch's "
                f"{human_bytes(out.embeddings)} on the accelerator") if n else \
            "the prompt sets are not found here: the embeddings' host memory is not counted"
        out.notes.append(f"text_encoders=cache: text encoder weights released after encoding; {held}")
    elif mode == "cache":
        out.notes.append("text_encoders=cache: text encoder weights released after encoding; the embeddings of "
                         "this family are not modelled")
    return encoders, out


def _prompt_count(config: TrainConfig) -> int:
    """How many distinct prompts a run encodes (training, grids, held-out), 0 when unknown."""
    from draft.prompts import load_prompts
    from draft.watch import Watch

    try:
        train, held_out = load_prompts(config.prompts, config.model), load_prompts(config.eval_prompts, config.model)
    except UserError:
        return 0
    return len(set(train) | set(Watch(None, None, held_out, config, None).prompts()))


def memory_budget(gb: float = 0.0) -> int:
    """The peak memory per process that checkpointing=auto plans for, in bytes: `gb` GiB,
    or the accelerator's memory less the CUDA context, or half the machine's memory (not its
    free memory, which the run's own loaded weights would shrink: `--dry-run` and the run
    choose the same split)."""
    if gb > 0:
        return int(gb * GIB)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory - int(RESERVED)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def checkpoint_split(method: str, u: int, d: int, step: int, g: int, budget: int) -> int:
    """How many of the g gradient-carrying steps keep their graphs so that the calibrated
    activations stay within `budget` bytes (0 when even full checkpointing does not)."""
    fits = [m for m in range(g + 1) if peak_activations(method, m, u, d, step, g) * CALIBRATION <= budget]
    return max(fits, default=0)


def _method(config: TrainConfig):
    from draft.methods import METHODS

    return METHODS[config.method]


def _on_meta(config: TrainConfig, folder: Path, comps: dict, dtype):
    """The model's adapter over its meta components in the run's precision, or None."""
    from draft.models import ADAPTERS, EMBEDDED, pipeline_class
    from draft.models.base import load_callable

    try:
        adapter = load_callable(ADAPTERS[pipeline_class(str(folder))])
    except UserError:
        return None
    if adapter.lora_prefix not in comps or "vae" not in comps:
        return None
    load = adapter.load_dtype(dtype)  # as the model loads: SDXL reads its VAE in float32
    for name in (adapter.lora_prefix, "transformer_2", "vae"):
        if name in comps:
            comps[name] = comps[name].to(load.get(name, load["default"]) if isinstance(load, dict) else load)
    embedded = EMBEDDED.get(config.model)
    options = {**(embedded.options if embedded else {}), **config.model_options}
    model = adapter.on_meta(folder, comps, **options)
    adapter.after_load(model.pipe)  # and keeps it so only where its config asks (force_upcast)
    return model


def _dtypes(model, dtype) -> dict[str, torch.dtype]:
    """The dtype each loaded component holds its weights in (the run's, but the VAE's own where kept)."""
    if model is None:
        return {}
    return {"vae": next(model.vae.parameters()).dtype}


def _activations(config: TrainConfig, model, dtype):
    """(U, D, size, latent shape, notes): the bytes one gradient-carrying denoiser call and
    one decode of the reward's frames keep for the backward (see the module docstring)."""
    from draft.inference import sample_size
    from draft.models import meta
    from draft.models.base import meta as empty
    from draft.plan import choose_frames

    s, b, notes = config.sampling, config.batch_size, []
    n = _method(config).passes(config)
    size = model.size(sample_size(s))
    latent = model.latent_shape(size)
    # passes that keep a graph: the family's guided passes, one when the unconditional one runs under no_grad
    calls = b * n * (min(1, model.guided_passes(s.guidance_scale)) if s.guidance_gradient == "cond"
                     else model.guided_passes(s.guidance_scale))
    cond = model.meta_conditioning(calls, dtype)
    u = 0
    if cond is None:
        notes.append(f"activations of {type(model.denoiser).__name__} are not modelled; weights only")
    else:
        x = empty(calls, *latent, dtype=dtype).requires_grad_(True)
        blocks = s.block_checkpointing and getattr(model.denoiser, "_supports_gradient_checkpointing", False)
        count = meta.block_checkpointed_bytes if blocks else meta.saved_bytes
        u = count(lambda: model.denoise(x, empty(), cond), model.denoiser)
        if blocks:
            notes.append("sampling.block_checkpointing: a gradient-carrying call keeps its blocks' inputs and its "
                         "backward one block's activations (and the gradients in and out of it) at a time")
    d = 0
    if config.method != "ddpo":
        # The frames the reward sees; a random choice may include the last, which needs them all.
        how = "first" if config.reward_frame_choice == "first" else "even"
        frames = choose_frames(0, 0, size.frames, config.reward_frames, how)
        z = empty(b * n, *latent, dtype=dtype).requires_grad_(True)
        d = meta.saved_bytes(lambda: model.decode(z, frames=frames, use_checkpoint=s.decode_checkpointing),
                             model.vae)
    return u, d, size, latent, notes


def grad_steps(config: TrainConfig) -> int:
    """How many sampling steps carry gradient (the most, for AlignProp's random window)."""
    return _method(config).grad_steps(config)


def peak_activations(method: str, kept: int, u: int, d: int, step: int, g: int) -> int:
    """The table in this module's docstring, by how the method's activations add up, with
    `kept` of the g gradient steps holding their graphs (0: all checkpointed; g: none)."""
    from draft.methods import METHODS

    memory = METHODS[method].memory
    if memory == "one-step":
        return u + d
    kept = min(kept, g)
    recompute = u if kept < g else 0  # a checkpointed step's recomputed graph in the backward
    if memory == "policy":
        return kept * u + (g - kept) * step + recompute
    return kept * u + (g - kept) * step + max(d, recompute)


def time_ratio(config: TrainConfig, kept: int, passes: int = 1) -> float:
    """Denoiser-call units of a step over those of sampling the batch (T): a gradient-carrying
    call costs a forward and a backward (about two forwards), plus one forward when
    checkpointed and one more with block checkpointing (`draft.methods.Method.calls` counts
    the calls); `kept` of the window's gradient steps are not checkpointed. With guidance's
    two passes (`passes` 2) and `sampling.guidance_gradient=cond`, only the conditional half
    of a gradient call carries the gradient; the unconditional half is a gradient-free
    forward of half the batch."""
    method = _method(config)
    free, grad = method.calls(config)
    g = grad_steps(config)
    checkpointed = 0.0 if method.memory == "one-step" or not g else (g - min(kept, g)) / g
    blocks = 1.0 if config.sampling.block_checkpointing else 0.0  # each block's forward once more in the backward
    per_call = 3 + checkpointed + blocks
    if passes == 2 and config.sampling.guidance_gradient == "cond":
        per_call = 0.5 + per_call / 2
    return (free + grad * per_call) / config.sampling.num_steps


def lora_parameters(module: torch.nn.Module, targets, rank: int) -> int:
    """Parameters peft's LoRA adds to the layers whose names end in one of `targets`."""
    n = 0
    for name, m in module.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, torch.nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):  # A: in -> r with the layer's kernel; B: 1x1, r -> out
            n += rank * m.in_channels // m.groups * math.prod(m.kernel_size) + rank * m.out_channels
    return n


