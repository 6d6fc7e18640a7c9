"""LoRA through peft: add, save and load in diffusers format, scale and mix.

The saved adapter is what the model family's diffusers `save_lora_weights` writes
(`pytorch_lora_weights.safetensors`, peft keys prefixed with "unet." or "transformer.", the
LoRA config as metadata), so `pipe.load_lora_weights(run_dir / "lora")` works in plain
diffusers and the file loads in other tools that read diffusers LoRAs.

Every function here takes a model adapter (`draft.models`) and works on its `denoiser`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from draft.config import LoraConfig
from draft.errors import UserError
from draft.safeio import check_safetensors

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRAIN_ADAPTER = "default"  # peft's default name, which diffusers' save helpers expect


def lora_targets(model, cfg: LoraConfig) -> tuple[str, ...]:
    """The modules that get an adapter: the config's, or else the model family's default."""
    return tuple(cfg.target_modules) or tuple(model.default_lora_targets)


def add_lora(model, cfg: LoraConfig, seed: int = 0) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA to the model's denoiser (B = 0, so the model is unchanged at
    first); return its parameters.

    Base weights are frozen; LoRA parameters are float32 whatever the base dtype, so the
    optimizer works in full precision under mixed-precision training.
    """
    from peft import LoraConfig as PeftLoraConfig

    net = model.denoiser
    targets = lora_targets(model, cfg)
    net.requires_grad_(False)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)  # the A matrices' init, identical on every process
        # On a torchao-quantized base (`quantize`) peft warns that it cannot merge: draft never asks it to.
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
        try:
            net.add_adapter(
                PeftLoraConfig(
                    r=cfg.rank,
                    lora_alpha=cfg.alpha,
                    lora_dropout=cfg.dropout,
                    init_lora_weights="gaussian",
                    target_modules=list(targets),
                ),
                adapter_name=TRAIN_ADAPTER,
            )
        except ValueError as e:
            raise UserError(f"cannot add LoRA with lora.target_modules={list(targets)}: {e}") from None
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def adapter_state_dict(net: torch.nn.Module, adapter: str = TRAIN_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's key names (for checkpoints), whole when the denoiser is
    sharded (FSDP2: a collective, so every process calls it)."""
    from peft.utils import get_peft_model_state_dict

    from draft.sharding import full

    return {k: full(v.detach()).contiguous() for k, v in get_peft_model_state_dict(net, adapter_name=adapter).items()}


def load_adapter_state_dict(net: torch.nn.Module, state: dict[str, torch.Tensor], adapter: str = TRAIN_ADAPTER) -> None:
    """Copy checkpointed weights into the existing adapter, in place (optimizer state stays valid)."""
    from draft.sharding import like

    # The live parameters under peft's state-dict names (the adapter's name dropped, as
    # `get_peft_model_state_dict` drops it). Not that function's values: with peft 0.22 and
    # the denoiser sharded by FSDP2, a run resumed through them no longer took the steps of
    # the uninterrupted run (tests/test_sharding.py); the parameters themselves always do.
    tag = f".{adapter}."
    current = {name.replace(tag, "."): p for name, p in net.named_parameters() if tag in name}
    if set(current) != set(state) or any(current[k].shape != state[k].shape for k in state):
        raise UserError("the checkpoint's adapter does not match this model and lora config")
    with torch.no_grad():
        for k, v in state.items():
            current[k].copy_(like(v, current[k]))  # cut as the parameter is sharded, if it is


def save_lora(model, directory: str | Path, adapter: str = TRAIN_ADAPTER, layers: dict | None = None) -> Path:
    """Write the adapter (or `layers`: its `adapter_state_dict` already gathered, or kept from an
    earlier step) in diffusers format to directory/pytorch_lora_weights.safetensors."""
    from draft.models.merging import unwrap

    net = unwrap(model.denoiser)
    # peft's key names ("lora_A"/"lora_B"), which diffusers' loaders read natively. Not
    # through diffusers' convert_state_dict_to_diffusers: it renames only the attention
    # projections to the old "lora.down"/"lora.up" form, and a file mixing both forms (an
    # adapter on convolutions or feed-forward layers too) loads with its attention layers
    # silently dropped.
    layers = adapter_state_dict(net, adapter) if layers is None else layers
    model.save_lora(directory, layers, net.peft_config[adapter].to_dict())
    return Path(directory) / WEIGHT_NAME


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """'DIR' or 'DIR:SCALE' -> (DIR, SCALE); a run folder stands for its lora/ subfolder."""
    path, scale = arg, 1.0
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass  # a ':' that is part of the path
    return path, scale


def lora_file(path: str | Path) -> Path:
    """The safetensors file of a LoRA given as a file, a LoRA folder or a run folder."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "lora" / WEIGHT_NAME).is_file():
        p = p / "lora"
    if p.is_dir():
        if (p / WEIGHT_NAME).is_file():
            return check_safetensors(p / WEIGHT_NAME, "LoRA")
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return check_safetensors(found[0], "LoRA")
        pickled = sorted(p.glob("*.bin")) + sorted(p.glob("*.pt")) + sorted(p.glob("*.pth"))
        if pickled:
            raise UserError(f"{p} holds only pickled weights ({pickled[0].name}); draft loads safetensors only")
        raise UserError(f"no LoRA weights in {p} (expected {WEIGHT_NAME})")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UserError(f"{p} is not a safetensors file; draft loads safetensors only")
        return check_safetensors(p, "LoRA")
    raise UserError(f"LoRA {str(path)!r} not found")


def load_loras(model, loras: list[tuple[str, float]]) -> list[str]:
    """Load several LoRAs into the model's denoiser as named adapters and activate them with
    their scales.

    Scale 0 reproduces the base model exactly, 1 the trained adapter, and scales above 1
    extrapolate along it. Returns the adapter names.
    """
    net, prefix = model.denoiser, model.lora_prefix
    names = []
    for i, (path, _) in enumerate(loras):
        file = lora_file(path)
        name = f"lora{i}"
        layers = _check_lora_matches(net, file, prefix)
        try:
            with warnings.catch_warnings():
                # peft warns that a second adapter joins the first: here that is the point.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                net.load_lora_adapter(str(file.parent), weight_name=file.name, prefix=prefix, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            raise UserError(f"LoRA {path!r} does not fit this model: {str(e).splitlines()[0]}") from None
        _check_all_loaded(net, file, layers, name)
        names.append(name)
    if names:
        net.set_adapters(names, [float(scale) for _, scale in loras])
    return names


def _check_all_loaded(net: torch.nn.Module, file: Path, layers: set[str], adapter: str) -> None:
    """Refuse a load that left some of the file's layers out.

    diffusers picks one key format per file; a file that mixes the old ("lora.down") and
    peft ("lora_A") forms, as `convert_state_dict_to_diffusers` writes for adapters beyond
    the attention projections, loads with the other form's layers silently dropped.
    """
    from peft.tuners.lora import LoraLayer

    modules = dict(net.named_modules())
    missing = sorted(n for n in layers if not (isinstance(modules[n], LoraLayer) and adapter in modules[n].lora_A))
    if missing:
        raise UserError(f"LoRA {file}: diffusers loaded only {len(layers) - len(missing)} of its {len(layers)} layers "
                        f"(not e.g. {missing[0]!r}); the file probably mixes 'lora.down' and 'lora_A' key names")


def _check_lora_matches(net: torch.nn.Module, file: Path, prefix: str) -> set[str]:
    """Refuse a LoRA whose layers are absent from this denoiser or have other shapes; return its layers.

    diffusers only warns about unexpected keys and would otherwise load nothing silently.
    """
    from safetensors import safe_open

    modules = dict(net.named_modules())
    layers = set()
    with safe_open(str(file), framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(prefix + ".")]
        if not keys:
            raise UserError(f"{file} holds no LoRA weights for this model (keys must start with '{prefix}.')")
        for key in keys:
            name = key[len(prefix) + 1 :]
            for marker in (".lora.down.weight", ".lora.up.weight", ".lora_A.weight", ".lora_B.weight"):
                if name.endswith(marker):
                    base_name = name[: -len(marker)]
                    break
            else:
                continue  # alphas and other extras
            base = modules.get(base_name)
            base = getattr(base, "base_layer", base)
            if base is None or not hasattr(base, "weight"):
                raise UserError(f"LoRA {file} does not fit this model: it has no layer {base_name!r}")
            shape = f.get_slice(key).get_shape()
            need = base.weight.shape[1] if ("down" in marker or "_A" in marker) else base.weight.shape[0]
            got = shape[1] if ("down" in marker or "_A" in marker) else shape[0]
            if got != need:
                raise UserError(f"LoRA {file} does not fit this model: layer {base_name!r} has other dimensions")
            layers.add(base_name)
    return layers
