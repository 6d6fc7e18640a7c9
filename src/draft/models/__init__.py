"""Model adapters: one protocol (`draft.models.protocol.DiffusionModel`) between the sampler,
the methods and the trainer on one side and a diffusers pipeline on the other.

A registry keyed on the pipeline folder's `_class_name` (its `model_index.json`) picks the
adapter; every other module works through the protocol and never asks which family runs.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from draft.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class Embedded:
    """A model that ships inside the package."""

    path: Path
    metrics: str | None = None  # "module:attr" of the model's own evaluation metrics
    # Config values this model is meant to be run with, by dotted key: (value, why). They
    # fill keys the user does not set (`draft.defaults`), for `draft train`, `draft sample`
    # and `draft eval` alike.
    defaults: dict = field(default_factory=dict)
    # Settings of the adapter that the model was trained with (class attributes it overrides).
    options: dict = field(default_factory=dict)
    pretrain: str = ""  # "module:attr" of the recipe that rebuilds it (`draft pretrain-shapes`)
    license: str = "apache-2.0"  # the project's own


# The joint blocks' attention, feed-forward and adaptive-norm projections of an SD3 transformer.
SD3_WIDE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                    "norm1.linear", "norm1_context.linear")
# A Wan block's self- and cross-attention projections and its feed-forward.
WAN_WIDE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
SHAPES_METRICS = "draft.rewards.shapes:attribute_metrics"  # the shapes world's attribute accuracy
# Models that ship inside the package, by name.
EMBEDDED = {
    # The main job's recipe (README; BENCHMARKS.md, "shapes-sd, the embedded default").
    "shapes-sd": Embedded(ASSETS / "shapes-sd", SHAPES_METRICS, {
        "method": ("draft-lv", "the paper's low-variance one-step estimator, cheap and effective on this model"),
        "sampling.num_steps": (20, "20 DDIM steps sample it as well as 50 (held-out joint accuracy 67.6% and 67.1%) "
                                   "at 40% of the cost, and train as well (BENCHMARKS.md)"),
        "steps": (500, "the main job's length, within its time on a 2-core CPU"),
        "lr": (1.5e-3, "at 20 sampling steps it gains 13.1 held-out points over three seeds where 1e-3 gains 11.5 "
                       "(BENCHMARKS.md)"),
        "kl_coeff": (0.03, "keeps the samples varied at no cost in held-out accuracy (BENCHMARKS.md)"),
        "log.eval_samples": (360, "every held-out prompt twice, so diversity across seeds is measured"),
    }, pretrain="draft.models.shapes_pretrain:pretrain"),
    # Its own recipe (BENCHMARKS.md, "The main job on shapes-flow"): the flow chain settles the
    # shape between sigma 0.9 and 0.2, so the tail windows of shapes-sd's recipe (DRaFT-LV's last
    # step sits at sigma 0.001) barely move it; full DRaFT over a 10-step chain does.
    "shapes-flow": Embedded(ASSETS / "shapes-flow", SHAPES_METRICS, {
        "sampling.guidance_scale": (4.0, "its held-out accuracy is highest there (docs/shapes-flow.md)"),
        "sampling.num_steps": (10, "10 Euler steps sample it as well as 20 or 50, and full DRaFT through them "
                                   "trains as well at half the cost of 20 (docs/shapes-flow.md, BENCHMARKS.md)"),
        "sampling.checkpointing": (False, "its whole chain's activations are small, and a step is faster without "
                                          "the recompute (BENCHMARKS.md)"),
        "method": ("draft", "the flow chain decides shapes far from its last steps, where truncated windows sit"),
        "kl_coeff": (0.0, "the recipe was tuned without it; diversity stays above 70% of the base's (BENCHMARKS.md)"),
        "steps": (800, "the main job's length, within its time on a 2-core CPU"),
        "lora.target_modules": (SD3_WIDE_TARGETS, "attention alone gained less (BENCHMARKS.md)"),
        "log.eval_samples": (360, "every held-out prompt twice, so diversity across seeds is measured"),
    }, {"max_sequence_length": 0},  # trained without T5's zero tokens (docs/shapes-flow.md)
        pretrain="draft.models.shapes_flow_pretrain:pretrain"),
    # A tiny Wan 2.1 of the moving-shapes world (docs/shapes-video.md). As on shapes-flow, its
    # chain settles what it draws and where it moves early, so the window is the whole chain.
    "shapes-video": Embedded(ASSETS / "shapes-video", "draft.rewards.shapes_motion:motion_metrics", {
        "reward": ("shapes-motion", "its own world's reward: the prompt's shape and colour, moving its way"),
        "sampling.frames": (9, "the clips it was trained on (3 latent frames)"),
        "sampling.num_steps": (10, "10 Euler steps sample it as well as 20 (held-out joint accuracy 2.9% and "
                                   "2.7%) at half the cost of a step, so 800 steps fit the main job's time "
                                   "(docs/shapes-video.md)"),
        "sampling.checkpointing": (False, "its whole chain's activations are small, and a step takes 0.82x the "
                                          "time without the recompute (docs/shapes-video.md)"),
        "method": ("draft", "a flow chain settles what it draws far from its last steps (docs/shapes-flow.md)"),
        "steps": (800, "the main job's length: +10.6 held-out points over three seeds, where 500 steps of a "
                       "20-step chain gained +8.6, in 5 minutes on a 2-core CPU (docs/shapes-video.md)"),
        "lora.target_modules": (WAN_WIDE_TARGETS, "attention alone gained less on shapes-flow (BENCHMARKS.md)"),
        "log.eval_samples": (64, "enough held-out clips to see the trend at a video model's cost"),
    }, {"max_sequence_length": 16, "height": 32, "width": 32, "frames": 9},  # as trained (its recipe.json)
        pretrain="draft.models.shapes_video_pretrain:pretrain"),
}


def model_defaults(name: str) -> dict:
    """The config values a model is meant to be run with ({} for any but the embedded ones)."""
    embedded = EMBEDDED.get(name) if isinstance(name, str) else None
    return dict(embedded.defaults) if embedded else {}

def family_defaults(model: str, adapter) -> dict:
    """What `adapter`'s family samples `model` with: the family's defaults, with those of the
    checkpoint where the adapter recognises it from its configs (`checkpoint_defaults`: a
    distilled variant that samples in a few steps without guidance)."""
    own = getattr(adapter, "checkpoint_defaults", None)  # optional: most families have one setting
    folder = _config_folder(model) if own is not None else None
    return {**adapter.defaults, **(own(folder) if folder is not None else {})}


def _config_folder(model: str) -> Path | None:
    """The folder holding `model`'s model_index.json and configs, found without loading or
    downloading anything: the model's own folder, its Hugging Face cache, or draft's copy of a
    known architecture (`draft.models.architectures`); None otherwise."""
    try:
        source, local = resolve(model)
    except UserError:
        return None
    if local:
        return Path(source)
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(source, "model_index.json")
    if isinstance(index, str):  # the cached snapshot (a scheduler config not cached reads as absent)
        return Path(index).parent
    from draft.models.architectures import builtin_configs

    return builtin_configs(source)


# Pipeline class -> "module:adapter class".
ADAPTERS = {
    "StableDiffusionPipeline": "draft.models.sd:StableDiffusion",
    # Same components as text-to-image; draft samples them from noise.
    "StableDiffusionImg2ImgPipeline": "draft.models.sd:StableDiffusion",
    "StableDiffusion3Pipeline": "draft.models.sd3:StableDiffusion3",
    "StableDiffusionXLPipeline": "draft.models.sdxl:StableDiffusionXL",
    "FluxPipeline": "draft.models.flux:Flux",
    "WanPipeline": "draft.models.wan:Wan",
    "QwenImagePipeline": "draft.models.qwen_image:QwenImage",
    "ZImagePipeline": "draft.models.z_image:ZImage",
    "Flux2Pipeline": "draft.models.flux2:Flux2",
    "Flux2KleinPipeline": "draft.models.flux2:Flux2Klein",
}


def resolve(path_or_id: str) -> tuple[str, bool]:
    """(where to load from, whether it is local). Checks local folders without loading."""
    if path_or_id in EMBEDDED:
        path = EMBEDDED[path_or_id].path
        if not (path / "model_index.json").is_file():
            raise UserError(f"the embedded model {path_or_id!r} is missing from this install ({path})")
        return str(path), True
    from draft.hub import is_hub_id

    path = Path(path_or_id).expanduser()
    if not is_hub_id(path_or_id):
        if not path.is_dir():
            names = ", ".join(sorted(EMBEDDED))
            raise UserError(f"model folder {path_or_id!r} not found (give a pipeline folder, a hub id, or one of: {names})")
        pipeline_class(str(path))  # refuses folders no adapter serves
        return str(path), True
    return path_or_id, False


def pipeline_class(folder: str) -> str:
    """The `_class_name` of a local pipeline folder, checked against the adapters."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise UserError(f"{folder!r} is not a diffusers pipeline folder (no model_index.json)")
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{index} is not valid JSON") from None
    if cls not in ADAPTERS:
        raise UserError(f"{folder!r} holds a {cls or 'unknown'} pipeline, which draft cannot train; "
                        f"supported: {', '.join(sorted(ADAPTERS))}")
    return cls


def family(model: str):
    """The adapter class that serves `model`, from its model_index.json alone (None when
    that cannot be read now: a missing folder, or a hub id with no network)."""
    from draft.models.base import load_callable

    try:
        source, local = resolve(model)
        cls_name = pipeline_class(source) if local else _hub_pipeline_class(source)
    except UserError:
        from draft.models.architectures import ARCHITECTURES, architecture

        if model not in ARCHITECTURES:
            return None
        # No hub now: the models draft knows the architecture of (`draft.models.architectures`).
        cls_name = architecture(model)["model_index.json"]["_class_name"]
    return load_callable(ADAPTERS[cls_name])


@functools.lru_cache(maxsize=16)
def _hub_pipeline_class(repo_id: str) -> str:
    """The pipeline class of a hub model, from its model_index.json alone."""
    from diffusers import DiffusionPipeline

    try:
        cls = DiffusionPipeline.load_config(repo_id).get("_class_name", "")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {repo_id!r}: {str(e).strip().splitlines()[0]}") from None
    if cls not in ADAPTERS:
        raise UserError(f"{repo_id!r} holds a {cls or 'unknown'} pipeline, which draft cannot train; "
                        f"supported: {', '.join(sorted(ADAPTERS))}")
    return cls


def load_model(path_or_id: str = "shapes-sd", device=None, dtype=None, options: dict | None = None):
    """Load a pipeline folder, hub id or embedded model as its family's adapter.

    Weights are read from safetensors only. `dtype` is the dtype of the frozen weights
    (default float32); trainable LoRA parameters are always float32. `options` are settings
    of the adapter (`TrainConfig.model_options`), over an embedded model's own.
    """
    from draft.models.base import load_callable

    source, local = resolve(path_or_id)
    cls_name = pipeline_class(source) if local else _hub_pipeline_class(source)
    adapter = load_callable(ADAPTERS[cls_name])
    embedded = EMBEDDED.get(path_or_id)
    metrics = load_callable(embedded.metrics) if embedded and embedded.metrics else None
    options = {**(embedded.options if embedded else {}), **(options or {})}
    return adapter.from_pretrained(source, local, path_or_id, device=device, dtype=dtype, metrics=metrics, **options)
