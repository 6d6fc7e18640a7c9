"""`draft export`: write a LoRA in the format another tool reads, or fold it into the base pipeline.

Formats:

- ``kohya``: ``lora_unet_<module path with "_">.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, the format ComfyUI, AUTOMATIC1111, Forge and kohya's scripts read for
  Stable Diffusion 1.x, 2.x and SDXL UNets. Module paths follow kohya's own files:
  the diffusers UNet's paths for SD 1.x/2.x (``lora_unet_down_blocks_0_attentions_0_…``;
  ComfyUI maps them through its diffusers-to-LDM table, A1111/Forge through
  ``convert_diffusers_name_to_compvis``, diffusers through its kohya converter), and the
  original LDM/SGM paths for SDXL (``lora_unet_input_blocks_4_1_…``, ``middle_block``,
  ``output_blocks``; kohya trains SDXL on that UNet, and ComfyUI, A1111/Forge and
  diffusers' SGM remapping all read it).
- ``diffusers``: the run folder's file (peft key names, ``unet.``/``transformer.``
  prefixed, adapter config as metadata), with the LoRA's alpha/rank folded into the up
  matrices so every reader applies the trained update: diffusers through the metadata,
  and readers that ignore it (ComfyUI applies peft-named layers at alpha/rank = 1 when a
  file has no ``.alpha`` keys) because the factor is then 1.

Either way the file applies exactly the trained update times ``scale``. Readers of both
formats compute up @ down * alpha / rank (rank = rows of down), so the kohya alpha is
written as (trained scale) * rank; the ``scale`` of an export multiplies the up matrices.

``merge`` loads the base pipeline, fuses the LoRA at a scale with diffusers' ``fuse_lora``
and saves the whole pipeline with ``save_pretrained`` in safetensors.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draft.errors import UserError

FORMATS = ("kohya", "diffusers")
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
    from draft.config import read_yaml

    run_config = path.parent.parent / "config.yaml"
    if path.parent.name != "lora" or not run_config.is_file():
        return None
    return read_yaml(run_config).get("model")


# --- kohya -----------------------------------------------------------------------------------

# diffusers' names of a ResNet block's layers -> the LDM/SGM names (ResBlock).
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# Top-level layers, diffusers -> LDM/SGM.
_LDM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def uses_ldm_names(unet_config: dict) -> bool:
    """Whether kohya's files name this UNet's layers by the LDM/SGM paths.

    kohya trains SDXL (the UNet with "text_time" added conditioning) on the SGM UNet and
    writes its paths; it trains SD 1.x/2.x on a UNet with the diffusers paths.
    """
    return unet_config.get("addition_embed_type") == "text_time"


def ldm_block_map(unet_config: dict) -> dict[str, str]:
    """diffusers block paths ("down_blocks.1.attentions.0") -> LDM/SGM paths ("input_blocks.4.1").

    Built from the config's block types and layers per block, the way the LDM UNet numbers
    its input/middle/output blocks: input block 0 is conv_in; then per level, each layer is
    one block (resnet at .0, attention at .1) and the downsampler one more; the output
    blocks take layers+1 per level, the upsampler inside the level's last block, after
    the attention if the level has one.
    """
    down_types, up_types = unet_config["down_block_types"], unet_config["up_block_types"]
    levels = len(down_types)
    per = unet_config["layers_per_block"]
    per = list(per) if isinstance(per, (list, tuple)) else [per] * levels
    out: dict[str, str] = {}
    n = 1
    for b, kind in enumerate(down_types):
        for i in range(per[b]):
            out[f"down_blocks.{b}.resnets.{i}"] = f"input_blocks.{n}.0"
            if "CrossAttn" in kind:
                out[f"down_blocks.{b}.attentions.{i}"] = f"input_blocks.{n}.1"
            n += 1
        if b < levels - 1:  # diffusers' down blocks all but the last downsample
            out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    mid = unet_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid != "UNetMidBlock2DCrossAttn":
        raise UserError(f"kohya names are known for UNets with a cross-attention mid block, not {mid}")
    out.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                "mid_block.resnets.1": "middle_block.2"})
    n = 0
    for b, kind in enumerate(up_types):
        layers = list(reversed(per))[b] + 1
        for i in range(layers):
            out[f"up_blocks.{b}.resnets.{i}"] = f"output_blocks.{n}.0"
            if "CrossAttn" in kind:
                out[f"up_blocks.{b}.attentions.{i}"] = f"output_blocks.{n}.1"
            n += 1
        if b < levels - 1:
            out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{n - 1}.{2 if 'CrossAttn' in kind else 1}.conv"
    return out


def ldm_path(module: str, blocks: dict[str, str]) -> str:
    """A diffusers UNet module path in LDM/SGM naming (see `ldm_block_map`)."""
    if module in _LDM_TOP:
        return _LDM_TOP[module]
    m = re.match(r"((?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions)\.\d+|"
                 r"mid_block\.(?:resnets|attentions)\.\d+|(?:down|up)_blocks\.\d+\.(?:down|up)samplers\.0\.conv)"
                 r"(?:\.(.+))?$", module)
    if not m or m.group(1) not in blocks:
        raise UserError(f"no LDM name is known for the UNet layer {module!r}")
    block, rest = blocks[m.group(1)], m.group(2)
    if rest is None:
        return block
    if ".resnets." in m.group(1):
        if rest not in _LDM_RESNET:
            raise UserError(f"no LDM name is known for the UNet layer {module!r}")
        rest = _LDM_RESNET[rest]
    # attention blocks (proj_in, transformer_blocks.N.attn1.to_q, ff.net.2, ...) keep their names
    return f"{block}.{rest}"


def kohya_name(module: str, blocks: dict[str, str] | None) -> str:
    """The kohya layer name of a diffusers UNet module path; `blocks` selects LDM naming."""
    path = ldm_path(module, blocks) if blocks is not None else module
    return "lora_unet_" + path.replace(".", "_")


def kohya_state_dict(lora: Lora, unet_config: dict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The LoRA in kohya keys; applied at strength 1 it adds scale times the trained update."""
    _check_kohya(lora)
    blocks = ldm_block_map(unet_config) if uses_ldm_names(unet_config) else None
    out: dict[str, torch.Tensor] = {}
    for module in sorted(lora.down):
        name = kohya_name(module, blocks)
        down, up = lora.down[module], lora.up[module]
        rank = down.shape[0]
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = (up * scale).contiguous()
        # Readers multiply up @ down by alpha / rank.
        out[f"{name}.alpha"] = torch.tensor(lora.scales[module] * rank, dtype=torch.float32)
    return out


def _check_kohya(lora: Lora) -> None:
    if lora.prefix != "unet":
        raise UserError(f"the kohya format is for UNet LoRAs (SD 1.x, 2.x, SDXL); this one adapts the "
                        f"{lora.prefix}: use --format diffusers, which ComfyUI reads for that model")


def kohya_metadata(lora: Lora, unet_config: dict, name: str) -> dict[str, str]:
    """The few `ss_*` fields kohya's files carry that the UIs show or filter LoRAs by."""
    from collections import Counter

    # The most common rank and alpha, as kohya's trainer records its network_dim and network_alpha.
    dim = Counter(int(t.shape[0]) for t in lora.down.values()).most_common(1)[0][0]
    alpha = Counter(lora.scales[m] * lora.down[m].shape[0] for m in lora.down).most_common(1)[0][0]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": f"{alpha:g}",
            "ss_output_name": name}
    if uses_ldm_names(unet_config):
        meta["ss_base_model_version"] = "sdxl_base_v1-0"
    elif unet_config.get("cross_attention_dim") in (768, 1024):  # SD 1.x's CLIP-L, SD 2.x's OpenCLIP-H
        meta["ss_base_model_version"] = "sd_v1" if unet_config["cross_attention_dim"] == 768 else "sd_v2"
    return meta


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


def unet_config(model: str) -> dict:
    """The base pipeline's UNet config (config.json only; no weights are read)."""
    from diffusers import UNet2DConditionModel

    from draft.models import resolve

    path, local = resolve(model)
    if local and not (Path(path) / "unet" / "config.json").is_file():
        raise UserError(f"{model!r} has no unet/config.json; the kohya format is for UNet pipelines")
    try:
        return dict(UNet2DConditionModel.load_config(path, subfolder="unet"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the UNet config of {model!r}: {str(e).splitlines()[0]}") from None


def default_out(lora: Lora, fmt: str) -> Path:
    """Next to the source file, named after the run (or the file) and the format."""
    stem = lora.path.parent.parent.name if lora.path.parent.name == "lora" else lora.path.stem
    return lora.path.parent / f"{stem}-{fmt}.safetensors"


def export(source: str | Path, fmt: str, out: str | Path | None = None, scale: float = 1.0,
           model: str | None = None) -> Path:
    """Write the LoRA at `source` in format `fmt` ("kohya" or "diffusers"); return the file written."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        from draft.errors import unknown

        raise unknown("format", fmt, FORMATS)
    if not math.isfinite(scale):
        raise UserError(f"--scale must be a finite number, got {scale}")
    lora = read_lora(source)
    path = Path(out) if out is not None else default_out(lora, fmt)
    if fmt == "kohya":
        _check_kohya(lora)
        base = model or lora.base_model
        if base is None:
            raise UserError(f"which base model is {lora.path} for? pass --model (its pipeline folder or hub id)")
        config = unet_config(base)
        state, metadata = kohya_state_dict(lora, config, scale), kohya_metadata(lora, config, path.stem)
    else:
        state, metadata = diffusers_state_dict(lora, scale)
    if path.suffix != ".safetensors":
        raise UserError(f"--out must name a .safetensors file, got {str(path)!r}")
    if path.resolve() == lora.path.resolve():
        raise UserError(f"--out {str(path)!r} is the LoRA being exported; choose another file")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


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
