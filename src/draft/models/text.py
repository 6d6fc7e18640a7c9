"""Where a run's text encoders live (`TrainConfig.text_encoders`), for every family alike.

- `device`: on the accelerator, encoding every micro-batch (what the pipelines do);
- `offload`: in host memory, moved to the accelerator only while they encode (accelerate's
  `cpu_offload_with_hook`, chained so that one encoder is there at a time);
- `cache`: every prompt the run uses encoded once at the start (`PromptCache.warm`), the
  embeddings kept in host memory, the encoders' weights dropped; a batch's conditioning is
  its prompts' rows stacked and moved to the accelerator: the values of encoding the batch
  (bit for bit where the kernels round alike at the two batch sizes, `place_text_encoders`).

The cache replaces the model's `conditioning` and cuts what it returns into one row per
prompt. Conditionings are batch-first tensors, or dicts, tuples or lists of them (every
family's today). An adapter whose conditioning needs more defines
`split_conditioning(cond, n)` (a list of n rows) and `join_conditioning(rows)` (their
batch), which the cache then uses: Qwen-Image and Z-Image, whose text is a masked sequence
of each batch's own length, join with `join_padded`.
"""

from __future__ import annotations

from typing import Any

import torch

def is_text_encoder(component: str) -> bool:
    """Whether a pipeline component is a text encoder (diffusers names them text_encoder, text_encoder_2, ...)."""
    return component.startswith("text_encoder")


def text_encoders(model) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by component name."""
    return {name: m for name, m in model.pipe.components.items()
            if is_text_encoder(name) and isinstance(m, torch.nn.Module)}


def split_rows(cond: Any, n: int) -> list:
    """A batch-first conditioning as n one-sample conditionings of the same structure."""
    if cond is None:
        return [None] * n
    if isinstance(cond, torch.Tensor):
        return [cond[i : i + 1] for i in range(n)]
    if isinstance(cond, dict):
        parts = {k: split_rows(v, n) for k, v in cond.items()}
        return [{k: parts[k][i] for k in cond} for i in range(n)]
    if isinstance(cond, (tuple, list)):
        parts = [split_rows(v, n) for v in cond]
        return [type(cond)(p[i] for p in parts) for i in range(n)]
    return [cond] * n  # a value shared by the batch


def join_rows(rows: list) -> Any:
    """The batch of one-sample conditionings (`split_rows`'s inverse)."""
    first = rows[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        shapes = {tuple(r.shape[1:]) for r in rows}
        if len(shapes) > 1:  # variable-length sequences would need the family's padding and mask
            raise ValueError(f"cached conditionings of different shapes {sorted(shapes)}: the adapter must define "
                             "join_conditioning")
        return torch.cat(rows)
    if isinstance(first, dict):
        return {k: join_rows([r[k] for r in rows]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(join_rows([r[i] for r in rows]) for i in range(len(first)))
    return first


def join_padded(rows: list) -> Any:
    """`join_rows` for families whose text is a variable-length sequence with a mask (Qwen-Image,
    Z-Image): every sequence tensor padded with zeros after its end (masked out) to the longest."""
    first = rows[0]
    if isinstance(first, dict):
        return {k: join_padded([r[k] for r in rows]) for k in first}
    if isinstance(first, torch.Tensor) and first.dim() >= 2:
        length = max(r.shape[1] for r in rows)
        pad = [(0, 0) * (r.dim() - 2) + (0, length - r.shape[1]) for r in rows]
        return torch.cat([torch.nn.functional.pad(r, p) for r, p in zip(rows, pad)])
    return join_rows(rows)


def halves(cond: Any, n: int) -> tuple[Any, Any]:
    """A batch-first conditioning of 2n rows as its first n and its last n."""
    if isinstance(cond, torch.Tensor):
        return cond[:n], cond[n:]
    if isinstance(cond, dict):
        parts = {k: halves(v, n) for k, v in cond.items()}
        return {k: v[0] for k, v in parts.items()}, {k: v[1] for k, v in parts.items()}
    if isinstance(cond, (tuple, list)):
        parts = [halves(v, n) for v in cond]
        return type(cond)(p[0] for p in parts), type(cond)(p[1] for p in parts)
    return cond, cond


def to_device(cond: Any, device) -> Any:
    """Every tensor of a conditioning moved to `device` (dtype unchanged, so values are exact)."""
    if isinstance(cond, torch.Tensor):
        return cond.to(device)
    if isinstance(cond, dict):
        return {k: to_device(v, device) for k, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(to_device(v, device) for v in cond)
    return cond


def _autocast_state() -> tuple:
    """Which autocast is on: under mixed precision the training step encodes inside it and
    the sample grids outside, and the two encodings differ in rounding, so each is cached apart."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))


class PromptCache:
    """`model.conditioning`, answered from the embeddings of prompts encoded once."""

    def __init__(self, model):
        self.model, self.encode = model, model.conditioning
        self.split = getattr(model, "split_conditioning", split_rows)
        self.join = getattr(model, "join_conditioning", join_rows)
        self.rows: dict[tuple, dict[str, tuple]] = {}  # settings -> prompt -> (cond row, uncond row), on the host
        self.released = False
        model.conditioning = self

    def warm(self, prompts, guidance_scale: float, size, negative_prompt: str = "", batch: int = 16) -> None:
        """Encode the prompts not cached yet for these settings, `batch` at a time."""
        table = self.rows.setdefault((guidance_scale, size, negative_prompt, _autocast_state()), {})
        todo = [p for p in dict.fromkeys(prompts) if p not in table]
        if todo and self.released:
            raise RuntimeError(f"text_encoders=cache: prompt {todo[0]!r} was not encoded before the text encoders "
                               "were released")
        for lo in range(0, len(todo), batch):
            chunk = todo[lo : lo + batch]
            cond, uncond = self.encode(chunk, guidance_scale, size, negative_prompt)
            rows = zip(self.split(to_device(cond, "cpu"), len(chunk)), self.split(to_device(uncond, "cpu"), len(chunk)))
            table.update(zip(chunk, rows))

    def __call__(self, prompts, guidance_scale: float = 7.5, size=None, negative_prompt: str = ""):
        from draft.models.base import Size

        prompts, size = list(prompts), size if size is not None else Size()
        self.warm(prompts, guidance_scale, size, negative_prompt)
        table = self.rows[(guidance_scale, size, negative_prompt, _autocast_state())]
        cond, uncond = zip(*(table[p] for p in prompts))
        device = self.model.device
        if uncond[0] is None:
            return to_device(self.join(list(cond)), device), None
        # One join, so that a family padding variable-length text pads cond and uncond to one
        # length, as its own `conditioning` does (the two run as one batch).
        both = self.join([*cond, *uncond])
        return tuple(to_device(half, device) for half in halves(both, len(prompts)))

    def release(self) -> None:
        """Drop the text encoders' weights (to the meta device: no memory on either side)."""
        for m in text_encoders(self.model).values():
            m.to("meta")
        self.released = True

    def nbytes(self) -> int:
        """Bytes of the cached embeddings (host memory)."""
        return sum(conditioning_bytes(row) for table in self.rows.values() for row in table.values())


def conditioning_bytes(cond: Any) -> int:
    """Bytes of the tensors of a conditioning (meta tensors included)."""
    if isinstance(cond, torch.Tensor):
        return cond.numel() * cond.element_size()
    if isinstance(cond, dict):
        cond = list(cond.values())
    return sum(conditioning_bytes(c) for c in cond) if isinstance(cond, (tuple, list)) else 0


def offload(model) -> list:
    """Keep the text encoders in host memory; each moves to the accelerator for its forward
    and back when the next one runs or the encoding ends. Returns accelerate's hooks."""
    from accelerate import cpu_offload_with_hook

    device, hooks, prev = model.device, [], None
    for m in text_encoders(model).values():
        _, prev = cpu_offload_with_hook(m, device, prev_module_hook=prev)
        hooks.append(prev)
    encode = model.conditioning

    def conditioning(*args, **kwargs):
        try:
            return encode(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.offload()

    model.conditioning = conditioning
    return hooks


def place_text_encoders(model, mode: str, settings: tuple, warm: list[tuple]) -> PromptCache | None:
    """Apply `mode` to the model's text encoders. For `cache`, `warm` lists (prompts, context
    manager factory, batch size) triples: each set is encoded inside its context (the
    training prompts under the step's autocast) with `settings` = (guidance_scale, size,
    negative_prompt), in batches of the size its users encode (matrix kernels round by batch
    size, so the rows then equal the step's own encoding); then the encoders are released."""
    if mode == "offload":
        offload(model)
    if mode != "cache":
        return None
    cache = PromptCache(model)
    for prompts, context, batch in warm:
        with context():
            cache.warm(prompts, *settings, batch=batch)
    cache.release()
    return cache
