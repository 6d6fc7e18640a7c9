"""Real-size diffusers pipelines with random weights, built from draft's own copies of their
configs (`draft.models.architectures`, nothing downloaded): the models of
benchmarks/speed_memory.py's real-size presets."""

from __future__ import annotations

import json
from pathlib import Path


def random_model(hub_id: str, folder: Path, device: str, dtype, name: str):
    """The family's adapter over the real architecture of `hub_id` with random weights.

    Every torch component is initialised on `device` in the dtype the family loads it in
    (SDXL keeps its VAE in float32); the tokenizers are the tiny pipelines' word tokenizers
    at the real text lengths, with the pipeline's chat layout where a language model reads the
    prompt (no vocabulary is downloaded, and the benchmark's prompt uses only their words)."""
    import inspect

    import diffusers

    from draft.models import ADAPTERS, pipeline_class
    from draft.models.architectures import write_configs
    from draft.models.base import load_callable

    configs = write_configs(hub_id, folder / "configs")
    adapter = load_callable(ADAPTERS[pipeline_class(str(configs))])
    index = json.loads((configs / "model_index.json").read_text())
    dtypes = adapter.load_dtype(dtype)
    parts = {}
    for part, spec in index.items():
        if part.startswith("_") or not isinstance(spec, list):
            continue
        part_dtype = dtypes.get(part, dtypes["default"]) if isinstance(dtypes, dict) else dtypes
        parts[part] = random_part(configs / part, part, spec, device, part_dtype, index["_class_name"])
    cls = getattr(diffusers, index["_class_name"])
    accepted = inspect.signature(cls.__init__).parameters
    extra = {k: v for k, v in {**index, **adapter.load_kwargs}.items()
             if k in accepted and k not in parts and not k.startswith("_")}  # e.g. Wan 2.2's boundary_ratio
    pipe = cls(**{k: v for k, v in parts.items() if k in accepted}, **extra)
    adapter.after_load(pipe)
    model = adapter(pipe, name=name)
    model.configs = configs  # for the estimate of the same settings
    return model


def random_part(sub: Path, part: str, spec: list, device: str, dtype, pipeline: str = ""):
    """One component of model_index.json: a scheduler from its config, a word tokenizer at the
    config's length (with the pipeline's chat layout where a language model reads the prompt),
    a torch module with random weights, or None for an absent one."""
    import importlib

    import torch

    from draft.models.tiny import WORDS
    from draft.models.tiny_flux2 import chat_tokenizer
    from draft.models.tokenizer import t5_word_tokenizer, word_tokenizer

    library, cls_name = spec
    if library is None or not ((sub / "config.json").is_file() or part == "scheduler" or "tokenizer" in part):
        return None  # a safety checker, or a feature extractor draft never loads
    if part == "scheduler":
        return getattr(importlib.import_module(library), cls_name).from_config(
            json.loads((sub / "scheduler_config.json").read_text()))
    if "tokenizer" in part:
        length = json.loads((sub / "tokenizer_config.json").read_text())["model_max_length"]
        if "CLIP" in cls_name:
            return word_tokenizer(sub / "files", WORDS, max_length=length)
        return t5_word_tokenizer(WORDS, max_length=length) if "T5" in cls_name else chat_tokenizer(pipeline, length)
    cls = getattr(importlib.import_module(library), cls_name)
    # Initialised in the dtype it runs in: random values either way, and a 32B transformer
    # initialised in float32 would need twice its bf16 size on the device.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else default)
    try:
        with torch.device(device):
            module = cls.from_config(cls.load_config(sub)) if library == "diffusers" else cls(
                cls.config_class.from_pretrained(sub))
    finally:
        torch.set_default_dtype(default)
    module.to(dtype)
    # As from_pretrained: the modules a class keeps in float32 at any dtype (Wan's norms,
    # rotary table and time embedding) stay there.
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    for name, sub_module in module.named_modules():
        if dtype != torch.float32 and any(k in name.split(".") for k in keep):
            sub_module.float()
    return module
