"""kohya's LoRA names for the Stable Diffusion UNets (SD 1.x, 2.x, SDXL): `draft export --format kohya`.

``lora_unet_<module path with "_">.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
the format ComfyUI, AUTOMATIC1111, Forge and kohya's scripts read. Module paths follow
kohya's own files: the diffusers UNet's paths for SD 1.x/2.x
(``lora_unet_down_blocks_0_attentions_0_…``; ComfyUI maps them through its
diffusers-to-LDM table, A1111/Forge through ``convert_diffusers_name_to_compvis``,
diffusers through its kohya converter), and the original LDM/SGM paths for SDXL
(``lora_unet_input_blocks_4_1_…``, ``middle_block``, ``output_blocks``; kohya trains SDXL on
that UNet, and ComfyUI, A1111/Forge and diffusers' SGM remapping all read it).

Readers compute up @ down * alpha / rank (rank = rows of down), so alpha is written as
(trained scale) * rank; an export's `scale` multiplies the up matrices. The LoRA is any
object with `down`, `up` and `scales` by module path (`draft.export.Lora`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from draft.errors import UserError


def export_kohya(lora, base: str, scale: float, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of the LoRA in kohya names for the UNet of pipeline `base`."""
    config = unet_config(base)
    return kohya_state_dict(lora, config, scale), kohya_metadata(lora, config, name)


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


def kohya_state_dict(lora, unet_config: dict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The LoRA in kohya keys; applied at strength 1 it adds scale times the trained update."""
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


def kohya_metadata(lora, unet_config: dict, name: str) -> dict[str, str]:
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
