"""A pipeline's components on the meta device: sizes and activation footprints, no weights read.

`components(folder)` builds every torch component that `model_index.json` names (UNet or
transformer, VAE, text encoders) from its config on PyTorch's `meta` device: the modules
have their real parameter shapes and dtypes but no storage, so nothing is read or
allocated. `denoiser_saved_bytes` and `decoder_saved_bytes` run one gradient-carrying
denoiser call and one VAE decode on meta inputs and count the bytes autograd keeps for the
backward pass (`saved_bytes`), which is what a training step's activations cost.

This is the one place outside the adapters that knows each denoiser class's call
signature, for the dummy inputs; a class not listed has no activation footprint here.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from draft.errors import UserError

# Libraries whose classes a model_index.json may name for torch components.
_LIBRARIES = ("diffusers", "transformers")


def components(folder: str | Path) -> dict[str, torch.nn.Module]:
    """Every torch component of the pipeline folder, built from its config on the meta device."""
    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {folder / 'model_index.json'}: {e}") from None
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] not in _LIBRARIES:
            continue
        cls = getattr(importlib.import_module(spec[0]), str(spec[1]), None)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue  # tokenizers, schedulers, feature extractors
        sub = folder / name
        try:
            if spec[0] == "diffusers":
                config = cls.load_config(sub)
                with torch.device("meta"):
                    module = cls.from_config(config)
            else:
                config = cls.config_class.from_pretrained(sub)
                with torch.device("meta"):
                    module = cls(config)
        except (OSError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot read the config of {sub} ({spec[1]}): {first}") from None
        out[name] = module.requires_grad_(False).eval()
    return out


def module_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the module's parameters and buffers once loaded in `dtype` (integer buffers keep theirs)."""
    size = torch.tensor([], dtype=dtype).element_size()
    n = sum(p.numel() for p in module.parameters()) * size
    for b in module.buffers():
        n += b.numel() * (size if b.is_floating_point() else b.element_size())
    return n


class _SavedLikeFusedAttention(torch.autograd.Function):
    """SDPA that saves for backward what the fused GPU kernels save (q, k, v, out, logsumexp).

    On the meta device PyTorch may pick the math kernel, which would also keep the full
    attention matrix; training on an accelerator uses the flash or memory-efficient kernels.
    """

    @staticmethod
    def forward(ctx, q, k, v, call):
        out = call(q, k, v)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - meta tensors are never backpropagated
        raise RuntimeError("for counting saved tensors only")


@contextlib.contextmanager
def _fused_attention():
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):  # diffusers passes them by name or by position
        return _SavedLikeFusedAttention.apply(query, key, value, lambda q, k, v: original(q, k, v, *args, **kwargs))

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@contextlib.contextmanager
def _mixed_precision():
    """What CUDA autocast does to these networks' saved tensors: normalisations run (and
    save) in float32, matmuls and convolutions cast their input to the weights' half dtype.
    Autocast itself does nothing to meta tensors, so its rules are applied by hand."""
    F = torch.nn.functional
    group_norm, layer_norm, linear, conv2d = F.group_norm, F.layer_norm, F.linear, F.conv2d

    def f32(t):
        return None if t is None else t.float()

    F.group_norm = lambda x, groups, w=None, b=None, *a: group_norm(x.float(), groups, f32(w), f32(b), *a)
    F.layer_norm = lambda x, shape, w=None, b=None, *a: layer_norm(x.float(), shape, f32(w), f32(b), *a)
    F.linear = lambda x, w, b=None: linear(x.to(w.dtype), w, b)
    F.conv2d = lambda x, w, b=None, *a, **k: conv2d(x.to(w.dtype), w, b, *a, **k)
    try:
        yield
    finally:
        F.group_norm, F.layer_norm, F.linear, F.conv2d = group_norm, layer_norm, linear, conv2d


def saved_bytes(fn: Callable[[], object], module: torch.nn.Module) -> int:
    """Bytes of the tensors autograd saves for the backward of `fn()`, each storage once,
    the module's own weights excluded (they are counted as weights)."""
    weights = {id(t) for t in (*module.parameters(), *module.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in weights:
            seen[id(base)] = max(seen.get(id(base), 0), base.numel() * base.element_size())
        return t

    half = next(module.parameters()).dtype in (torch.float16, torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _fused_attention(), \
            (_mixed_precision() if half else contextlib.nullcontext()):
        fn()
    return sum(seen.values())


def _meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def denoiser_call(module: torch.nn.Module, batch: int, latent: tuple[int, int, int], dtype: torch.dtype,
                  text_tokens: int = 77) -> Callable[[], object] | None:
    """One call of the denoiser on meta inputs (a latent that carries gradient), or None if
    this class's inputs are not known here."""
    c, h, w = latent
    cfg = module.config
    x = _meta(batch, c, h, w, dtype=dtype, grad=True)
    t = _meta(batch, dtype=torch.float32)
    name = type(module).__name__
    if name == "UNet2DConditionModel":
        dim = cfg.cross_attention_dim
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        kwargs = {}
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text and size/crop ids
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": _meta(batch, pooled, dtype=dtype),
                                           "time_ids": _meta(batch, 6, dtype=dtype)}
        text = _meta(batch, text_tokens, dim, dtype=dtype)
        return lambda: module(x, t, encoder_hidden_states=text, return_dict=False, **kwargs)
    if name == "SD3Transformer2DModel":
        text = _meta(batch, text_tokens, cfg.joint_attention_dim, dtype=dtype)
        pooled = _meta(batch, cfg.pooled_projection_dim, dtype=dtype)
        return lambda: module(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                              return_dict=False)
    if name == "FluxTransformer2DModel":
        # FLUX packs 2x2 latent patches into tokens of 4x the channels.
        tokens = _meta(batch, (h // 2) * (w // 2), cfg.in_channels, dtype=dtype, grad=True)
        text = _meta(batch, text_tokens, cfg.joint_attention_dim, dtype=dtype)
        pooled = _meta(batch, cfg.pooled_projection_dim, dtype=dtype)
        extra = {"guidance": _meta(batch, dtype=torch.float32)} if cfg.guidance_embeds else {}
        return lambda: module(hidden_states=tokens, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                              img_ids=_meta((h // 2) * (w // 2), 3), txt_ids=_meta(text_tokens, 3), return_dict=False,
                              **extra)
    return None


def denoiser_saved_bytes(module, batch: int, latent: tuple[int, int, int], dtype, text_tokens: int = 77) -> int | None:
    call = denoiser_call(module, batch, latent, dtype, text_tokens)
    return None if call is None else saved_bytes(call, module)


def decoder_saved_bytes(vae: torch.nn.Module, batch: int, latent: tuple[int, int, int], dtype) -> int:
    """Bytes the VAE decode of `batch` latents keeps for its backward."""
    c, h, w = latent
    z = _meta(batch, vae.config.latent_channels, h, w, dtype=dtype, grad=True)
    return saved_bytes(lambda: vae.decode(z, return_dict=False), vae)


def denoiser_name(comps: dict[str, torch.nn.Module]) -> str | None:
    """The trainable network's component name: 'unet' or 'transformer'."""
    return next((n for n in ("unet", "transformer") if n in comps), None)
