"""Model adapters: one small protocol between the sampler/methods and a diffusers pipeline.

An adapter exposes exactly what reward fine-tuning needs:

- `conditioning(prompts)` -> (cond, uncond) prompt encodings for classifier-free guidance;
- `denoise(x_t, t, cond)` -> the raw model output (ε, v or x_0), differentiable in the LoRA;
- `decode(latents)` -> images in [0, 1], differentiable, with frozen weights;
- `latent_shape`, `resolution`, `scheduler_config` (for `Schedule.from_scheduler_config`);
- `denoiser` (the trainable network, where LoRA goes) and `adapters_disabled()` (the base
  model's prediction without a second copy in memory, for DRaFT+);
- `adapters_merged()` (the LoRA folded into the weights for gradient-free sampling, the
  base weights restored exactly afterwards).

`StableDiffusion` serves every diffusers Stable Diffusion 1.x/2.x pipeline, `shapes-sd`
included; SDXL and flow-matching families get their own adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

from draft.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Models that ship inside the package, by name.
EMBEDDED = {"shapes-sd": ASSETS / "shapes-sd"}
# Pipeline classes whose components the StableDiffusion adapter understands.
SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}


def resolve(path_or_id: str) -> tuple[str, bool]:
    """(where to load from, whether it is local). Checks local folders without loading."""
    if path_or_id in EMBEDDED:
        path = EMBEDDED[path_or_id]
        if not (path / "model_index.json").is_file():
            raise UserError(f"the embedded model {path_or_id!r} is missing from this install ({path})")
        return str(path), True
    path = Path(path_or_id).expanduser()
    looks_like_hub_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if path.exists() or not looks_like_hub_id:
        if not path.is_dir():
            names = ", ".join(sorted(EMBEDDED))
            raise UserError(f"model folder {path_or_id!r} not found (give a pipeline folder, a hub id, or one of: {names})")
        index = path / "model_index.json"
        if not index.is_file():
            raise UserError(f"{path_or_id!r} is not a diffusers pipeline folder (no model_index.json)")
        try:
            cls = json.loads(index.read_text()).get("_class_name", "")
        except json.JSONDecodeError:
            raise UserError(f"{index} is not valid JSON") from None
        if cls not in SD_PIPELINES:
            raise UserError(f"{path_or_id!r} holds a {cls or 'unknown'} pipeline; supported: {', '.join(sorted(SD_PIPELINES))}")
        return str(path), True
    return path_or_id, False


def load_model(path_or_id: str = "shapes-sd", device=None, dtype=None):
    """Load a Stable Diffusion pipeline folder, hub id or embedded model as an adapter.

    Weights are read from safetensors only. `dtype` is the dtype of the frozen weights
    (default float32); trainable LoRA parameters are always float32.
    """
    from draft.models.sd import StableDiffusion

    return StableDiffusion.from_pretrained(path_or_id, device=device, dtype=dtype)
