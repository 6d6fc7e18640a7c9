"""The sampling settings (`TrainConfig.sampling`, and what `draft sample` and `draft eval`
sample with): a frozen dataclass with a comment on every field, re-exported by
`draft.config`, whose conventions it follows (None: resolved by `draft.defaults`).
"""

from __future__ import annotations

from dataclasses import dataclass

from draft.errors import UserError, unknown

COMPILE_CHOICES = ("none", "whole", "blocks")  # sampling.compile (`draft.models.compiled`)


@dataclass(frozen=True)
class SamplingConfig:
    # Number of sampling steps T per sample (None: the model's recommended number, e.g. 20
    # for shapes-flow, 28 for SD3 and FLUX.1, else 50). A training step's cost grows
    # linearly with T, plus the backward over the gradient window.
    num_steps: int | None = None
    # Classifier-free guidance scale s; 1 disables guidance (and halves the denoiser's cost).
    # None: the model family's pipeline default (7.5 SD, 5 SDXL and Wan, 7 SD3, 3.5 FLUX.1).
    # FLUX.1-dev is guidance-distilled: there the value feeds its guidance embedding (one
    # pass per step whatever the value); FLUX.1-schnell ignores it.
    guidance_scale: float | None = None
    # Wan 2.2 A14B: the guidance of its low-noise expert (transformer_2); None: the same as
    # guidance_scale, as WanPipeline does. Other models have one scale and ignore it.
    guidance_scale_2: float | None = None
    # The prompt of the unconditional half of classifier-free guidance ("" as the pipelines
    # use by default); unused where guidance is off or an input of the model (FLUX.1).
    negative_prompt: str = ""
    # Which CFG branches the reward's gradient flows through: both, or cond (uncond under no_grad, as UniRL).
    guidance_gradient: str = "both"
    # DDIM stochasticity η: 0 is deterministic, 1 is DDPM-like. None: 0, or the method's
    # own default (method=ddpo: 1).
    eta: float | None = None
    # Wrap every gradient-carrying denoiser call in a checkpoint: memory stays flat in the
    # gradient window at the cost of one extra forward per step in it. Even with a
    # one-step window (DRaFT-1, DRaFT-LV) it keeps the denoiser's activations from sitting
    # in memory beside the VAE decoder's and the reward's (BENCHMARKS.md, SD 1.5); turn it
    # off when memory is plentiful and time is not. `auto`: keep the graphs of as many of
    # the window's steps as fit in `memory_budget_gb` and checkpoint the rest (the split
    # comes from the memory estimate; `--dry-run` prints it). None: on, unless the model
    # says otherwise (shapes-flow: off).
    checkpointing: bool | str | None = None
    # The peak memory per process that checkpointing=auto plans for, in GB (GiB). 0: the
    # accelerator's memory less 1 GiB for the CUDA context; on the CPU half of the machine's
    # memory.
    memory_budget_gb: float = 0.0
    # Also checkpoint the VAE decode, block by block and one sample at a time (a video's latent
    # frames one by one): its backward holds a fraction of the decode; worth it at high resolution.
    decode_checkpointing: bool = False
    # Fold the LoRA into the denoiser's weights for the sampling steps that carry no
    # gradient (all but the window; every step when generating), restoring the exact base
    # weights afterwards. Same images, less time per step; costs one copy of the adapted
    # layers' weights. Skipped automatically for FSDP/DeepSpeed-sharded or compiled models.
    merge_lora: bool = True
    # With checkpointing and merge_lora: run the first pass of each gradient-carrying step
    # without any graph and with the LoRA merged, and recompute it unmerged in the backward
    # (`sampling._Recomputed`): the gradients of checkpointing at less cost (BENCHMARKS.md,
    # against TRL). Values differ from `false` only by the rounding of merged weights.
    # Sharded or compiled denoisers, which cannot be merged, use torch.utils.checkpoint.
    merged_recompute: bool = True
    # Training: run the gradient-free denoiser calls through torch.compile (README): none, whole
    # (the denoiser), blocks (its repeated blocks; UserError for a model that names none).
    compile: str = "none"
    # Also checkpoint each block of a gradient-carrying call (diffusers' own): its backward holds one block's activations.
    block_checkpointing: bool = False
    # Image size in pixels; 0 means the model's native size.
    height: int = 0
    width: int = 0
    # Video frames per sample (video models only; 0 for image models). None: the model
    # family's default (Wan: 81, what its pipeline samples).
    frames: int | None = None

    def numeric_ranges(self, prefix: str = "") -> list[tuple]:
        """The section's numbers as (key, value, lowest, highest); see `TrainConfig._numeric_ranges`."""
        return [
            (prefix + "num_steps", self.num_steps, 1, None), (prefix + "guidance_scale", self.guidance_scale, 0, None),
            (prefix + "guidance_scale_2", self.guidance_scale_2, 0, None),
            # Above 1 the DDIM step's noise outgrows the step and the update takes a square
            # root of a negative number.
            (prefix + "eta", self.eta, 0, 1), (prefix + "height", self.height, 0, None),
            (prefix + "width", self.width, 0, None), (prefix + "frames", self.frames, 0, None),
            (prefix + "memory_budget_gb", self.memory_budget_gb, 0, None),
        ]

    def validate(self) -> "SamplingConfig":
        """Raise UserError for a value out of range (`draft sample` and `draft eval` too); return self."""
        from draft.config import check_number  # (config imports this module)

        for key, value, lo, hi in self.numeric_ranges():
            if value is not None:
                check_number(key, value, lo, hi)
        if self.guidance_gradient not in ("both", "cond"):
            raise unknown("sampling.guidance_gradient", self.guidance_gradient, ("both", "cond"))
        if self.compile not in COMPILE_CHOICES:
            raise unknown("sampling.compile", self.compile, COMPILE_CHOICES)
        if not isinstance(self.negative_prompt, str):
            raise UserError(f"negative_prompt must be a string, got {self.negative_prompt!r}")
        return self
