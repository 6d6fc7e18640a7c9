"""`draft export`: write a LoRA in the format another tool reads, or fold it into the base pipeline.

Formats:

- ``kohya``: the names ComfyUI, AUTOMATIC1111, Forge and kohya's scripts read for Stable
  Diffusion 1.x, 2.x and SDXL UNets (`draft.models.kohya`);
- ``comfyui``: for families whose ComfyUI loader reads only the original model's names
  (Wan: ``diffusion_model.blocks.N.self_attn.q``, `draft.models.wan`);
- ``diffusers``: the run folder's file (peft key names, ``unet.``/``transformer.``
  prefixed, adapter config as metadata), with the LoRA's alpha/rank folded into the up
  matrices so every reader applies the trained update: diffusers through the metadata,
  and readers that ignore it (ComfyUI applies peft-named layers at alpha/rank = 1 when a
  file has no ``.alpha`` keys) because the factor is then 1.

Every format applies exactly the trained update times ``scale``; which of them a model
offers is its family's (`export_formats` on the adapter), so nothing here asks which
family it is.

``merge`` loads the base pipeline, fuses the LoRA at a scale with diffusers' ``fuse_lora``
and saves the whole pipeline with ``save_pretrained`` in safetensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draft.errors import UserError
from draft.runs import BEST_LORA

FORMATS = ("kohya", "comfyui", "diffusers")
# A run's LoRA folders (`draft.runs`) and what an exported file's name adds to the run's name.
RUN_LORAS = {"lora": "", BEST_LORA: "-best"}
_DOWN = (".lora_A.weight", ".lora.down.weight")
_UP = (".lora_B.weight", ".lora.up.weight")


@dataclass
class Lora:
    """A LoRA file read into memory: per adapted module, its down (A) and up (B) matrices."""

    path: Path
    prefix: str  # the pipeline component it adapts: "unet" or "transformer"
    down: dict[str, torch.Tensor]  # module path (no prefix) -> A, [r, in] or [r, in, kh, kw]
    up: dict[str, torch.Tensor]  # module path -> B, [out, r] or [out, r, 1, 1]
    scales: dict[str, float]  # module path -> the factor training applied: alpha / r
    config: dict = field(default_factory=dict)  # the peft LoRA config from the metadata
    base_model: str | None = None  # the run's model, when the LoRA sits in a run folder


def read_lora(source: str | Path) -> Lora:
    """Read a LoRA given as a run folder, a LoRA folder or a safetensors file in diffusers format."""
    from safetensors import SafetensorError, safe_open

    from draft.lora import lora_file

    path = lora_file(source)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    prefixes = {k.split(".", 1)[0] for k in tensors}
    if len(prefixes) != 1 or not prefixes <= {"unet", "transformer"}:
        raise UserError(f"{path} is not a diffusers LoRA of one denoiser (its keys start with "
                        f"{', '.join(sorted(prefixes)) or 'nothing'}; expected 'unet.' or 'transformer.')")
    prefix = prefixes.pop()
    down, up = {}, {}
    for key, value in tensors.items():
        name = key[len(prefix) + 1 :]
        for marker in _DOWN:
            if name.endswith(marker):
                down[name[: -len(marker)]] = value
        for marker in _UP:
            if name.endswith(marker):
                up[name[: -len(marker)]] = value
        if not name.endswith(_DOWN + _UP):
            raise UserError(f"{path}: key {key!r} is not a LoRA matrix (DoRA, biases and extra keys are not exported)")
    if set(down) != set(up):
        raise UserError(f"{path}: layer {sorted(set(down) ^ set(up))[0]!r} lacks its down or up matrix")
    config = _adapter_config(metadata, prefix)
    scales = {name: _trained_scale(config, name, down[name].shape[0]) for name in down}
    return Lora(path, prefix, down, up, scales, config, _run_model(path))


def _adapter_config(metadata: dict, prefix: str) -> dict:
    """The peft config diffusers stored in the metadata, without the component prefix."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}  # no metadata: diffusers then loads with alpha = rank, and so do we
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError("the LoRA's adapter metadata is not valid JSON") from None
    config = {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(prefix + ".")}
    if config.get("use_dora") or config.get("lora_bias"):
        raise UserError("DoRA and LoRA biases cannot be exported; only plain LoRA layers can")
    return config


def _trained_scale(config: dict, module: str, rank: int) -> float:
    """The factor peft multiplied B @ A by for this module in training (its own rule, patterns included)."""
    alphas = config.get("alpha_pattern") or {}
    alpha = config.get("lora_alpha", rank)
    if alphas:
        from peft.utils.other import get_pattern_key  # peft's own matching of pattern keys to modules

        alpha = alphas.get(get_pattern_key(list(alphas), module), alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _run_model(path: Path) -> str | None:
    """The `model` of the run whose lora/ folder holds `path`, if it is one."""
    from draft.configio import read_yaml

    run_config = path.parent.parent / "config.yaml"
    if path.parent.name not in RUN_LORAS or not run_config.is_file():
        return None
    return read_yaml(run_config).get("model")


# --- diffusers ------------------------------------------------------------------------------


def diffusers_state_dict(lora: Lora, scale: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """peft-named weights with alpha/rank (and `scale`) folded into B, and metadata saying alpha = rank."""
    out = {}
    for module in sorted(lora.down):
        out[f"{lora.prefix}.{module}.lora_A.weight"] = lora.down[module].contiguous()
        out[f"{lora.prefix}.{module}.lora_B.weight"] = (lora.up[module] * (lora.scales[module] * scale)).contiguous()
    ranks = {int(t.shape[0]) for t in lora.down.values()}
    config = dict(lora.config)
    config.setdefault("r", max(ranks))
    config.setdefault("target_modules", sorted({m.rsplit(".", 1)[-1] for m in lora.down}))
    config["lora_alpha"] = config["r"]
    # Every layer's factor is now 1: alpha equal to rank wherever a rank pattern differs.
    config["alpha_pattern"] = dict(config.get("rank_pattern") or {})
    config["use_rslora"] = False
    flat = {f"{lora.prefix}.{k}": v for k, v in config.items()}
    return out, {"format": "pt", "lora_adapter_metadata": json.dumps(flat, indent=2, sort_keys=True)}


# --- the command ----------------------------------------------------------------------------


def default_out(lora: Lora, fmt: str) -> Path:
    """Next to the source file, named after the run (or the file) and the format."""
    folder = lora.path.parent.name
    stem = lora.path.parent.parent.name + RUN_LORAS[folder] if folder in RUN_LORAS else lora.path.stem
    return lora.path.parent / f"{stem}-{fmt}.safetensors"


def export(source: str | Path, fmt: str, out: str | Path | None = None, scale: float = 1.0,
           model: str | None = None) -> Path:
    """Write the LoRA at `source` in format `fmt`; return the file written.

    "diffusers" serves every family; the others are the names a family's other tools read
    (the adapter's `export_formats`: kohya for the UNet families, ComfyUI's for Wan).
    """
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        from draft.errors import unknown

        raise unknown("format", fmt, FORMATS)
    if not math.isfinite(scale):
        raise UserError(f"--scale must be a finite number, got {scale}")
    lora = read_lora(source)
    path = Path(out) if out is not None else default_out(lora, fmt)
    if path.suffix != ".safetensors":
        raise UserError(f"--out must name a .safetensors file, got {str(path)!r}")
    if path.resolve() == lora.path.resolve():
        raise UserError(f"--out {str(path)!r} is the LoRA being exported; choose another file")
    if fmt == "diffusers":
        state, metadata = diffusers_state_dict(lora, scale)
    else:
        state, metadata = _family_format(lora, fmt, model, path.stem, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def _family_format(lora: Lora, fmt: str, model: str | None, name: str, scale: float):
    """The LoRA in a format the base model's family defines (kohya, comfyui)."""
    from draft.models import family
    from draft.models.base import load_callable

    base = model or lora.base_model
    if base is None:
        raise UserError(f"which base model is {lora.path} for? pass --model (its pipeline folder or hub id)")
    adapter = family(base)
    if adapter is None:
        raise UserError(f"cannot read the pipeline class of {base!r} (a folder with model_index.json, or a hub id)")
    if fmt not in adapter.export_formats:
        known = ", ".join([*adapter.export_formats, "diffusers"])
        raise UserError(f"the {fmt} format is not one the {adapter.family_name} family's tools read; use one of: "
                        f"{known} (ComfyUI reads the diffusers names for this family)"
                        if not adapter.export_formats else
                        f"the {fmt} format is not one the {adapter.family_name} family's tools read; use one of: {known}")
    if lora.prefix != adapter.lora_prefix:
        raise UserError(f"the LoRA adapts a {lora.prefix}, which the pipeline {base!r} does not have")
    return load_callable(adapter.export_formats[fmt])(lora, base, scale, name)


def merge(source: str | Path, out_dir: str | Path, scale: float = 1.0, model: str | None = None,
          device: str | None = None) -> Path:
    """Save the base pipeline with the LoRA folded into its weights at `scale` (safetensors).

    The pipeline is loaded as draft loads it (so an SD pipeline comes without its safety
    checker) and saved with diffusers' `save_pretrained`.
    """
    from draft.lora import load_loras
    from draft.models import load_model

    if not math.isfinite(scale):
        raise UserError(f"--scale must be a finite number, got {scale}")
    lora = read_lora(source)
    base = model or lora.base_model
    if base is None:
        raise UserError(f"which base model is {lora.path} for? pass --model (its pipeline folder or hub id)")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not an empty folder; choose a new folder for the merged pipeline")
    pipeline = load_model(base, device=device)
    if pipeline.lora_prefix != lora.prefix:
        raise UserError(f"the LoRA adapts a {lora.prefix}, which the pipeline {base!r} does not have")
    names = load_loras(pipeline, [(str(lora.path), 1.0)])  # refuses a LoRA that does not load whole
    pipeline.denoiser.fuse_lora(lora_scale=scale, adapter_names=names)
    pipeline.denoiser.unload_lora()  # keeps the fused weights, removes the LoRA layers
    pipeline.pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
