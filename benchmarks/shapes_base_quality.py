"""Quality of a shapes-sd pipeline: how often the classifier finds each prompt attribute.

Samples `--n` images (default 256) of a prompt split with one fixed seed per image
(image i: seed i and prompt i * len(prompts) // n of the sorted set, so the samples
cover every shape and colour), 50 DDIM steps at guidance 7.5 by default, and prints
per-attribute and joint accuracy, the mean `shapes-alignment` reward, the time to sample
them all, and the median time of one call sampling a batch of 4 (`seconds_batch4`, the
size the training loop uses) with torch's thread count.
Writes a grid of the first 64 images with `--grid`.

`--model` is a pipeline folder or the name of a shipped one (`shapes-sd`, `shapes-flow`).
A `StableDiffusion3Pipeline` folder (shapes-flow) is sampled by diffusers' own SD3
pipeline: 50 flow Euler steps, the scheduler's shift as shipped unless `--shift`, and the
number of T5 tokens the model was trained with (`max_sequence_length` in its recipe.json).

    python benchmarks/shapes_base_quality.py [--model DIR|NAME] [--split heldout] [--n 256]
        [--guidance 7.5] [--steps 50] [--shift S] [--grid out.png] [--classifier DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def load(model=None, shift=None):
    """The diffusers pipeline of a folder or shipped model name, and extra keyword arguments for its calls."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    from draft.models import shapes

    path = Path(model) if model and Path(model).is_dir() else shapes.ASSETS / (model or "shapes-sd")
    index = json.loads((path / "model_index.json").read_text())
    if index["_class_name"] != "StableDiffusion3Pipeline":
        return StableDiffusionPipeline.from_pretrained(path, local_files_only=True), {}
    # Saved without T5, as diffusers allows: it must be told so, and fed the trained number of zero tokens.
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    if shift is not None:  # the scheduler reads its shift at construction, so build a new one
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=shift)
    recipe = path / "recipe.json"
    length = json.loads(recipe.read_text()).get("max_sequence_length", 256) if recipe.exists() else 256
    return pipe, {"max_sequence_length": length}


def sample(pipe, prompts: list[str], seeds: list[int], guidance: float, steps: int, batch: int = 32, **kw):
    """Images [N,3,H,W] in [0,1], one per (prompt, seed), independent of the batch size."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        out.append(pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance,
                        generator=gens, output_type="pt", **kw).images)
    return torch.cat(out).clamp(0, 1)


def sampling_speed(pipe, batch: int = 4, steps: int = 50, guidance: float = 7.5, repeats: int = 5, **kw) -> float:
    """Median seconds for one pipeline call: `batch` images, `steps` steps, with guidance."""
    prompts = ["a small red circle on a blue background"] * batch
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="pt", **kw)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]  # the first call warms up


def measure(model=None, split="heldout", n=256, guidance=7.5, steps=50, grid=None, classifier=None,
            shift=None) -> dict:
    from diffusers.utils import logging
    from transformers.utils import logging as tlogging

    for log in (logging, tlogging):  # before the pipeline import, which warns about torchvision
        log.set_verbosity_error()
        log.disable_progress_bar()
    from draft import rewards
    from draft.models import shapes
    from draft.report import save_grid
    from draft.rewards.shapes import attribute_correct

    pipe, kw = load(model, shift)
    pipe.set_progress_bar_config(disable=True)
    pool = shapes.prompts(split)
    # Spread over the whole (sorted) set, so every shape and colour gets its share.
    prompts = [pool[i * len(pool) // n] for i in range(n)]
    start = time.perf_counter()
    images = sample(pipe, prompts, list(range(n)), guidance, steps, **kw)
    seconds = time.perf_counter() - start
    hits = attribute_correct(images, prompts, classifier)
    with torch.no_grad():
        reward = rewards.get("shapes-alignment", classifier=classifier)(images, prompts)
    if grid:
        save_grid(images[:64], Path(grid), ncol=8)
    result = {k: round(v.float().mean().item(), 4) for k, v in hits.items()}
    # Shape accuracy per prompted shape: where the model's errors are.
    named = [shapes.parse_prompt(p).shape for p in prompts]
    result["shape_by_shape"] = {
        s: round(hits["shape"][[i for i, t in enumerate(named) if t == s]].float().mean().item(), 3)
        for s in shapes.SHAPES if s in named
    }
    result.update(reward=round(reward.mean().item(), 4), split=split, n=n, guidance=guidance, steps=steps,
                  seconds=round(seconds, 1), seconds_batch4=round(sampling_speed(pipe, 4, steps, guidance, **kw), 3),
                  threads=torch.get_num_threads())
    if "max_sequence_length" in kw:
        result.update(shift=pipe.scheduler.config.shift, max_sequence_length=kw["max_sequence_length"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a pipeline folder or shipped model name (default: shapes-sd)")
    ap.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--shift", type=float, default=None, help="flow models: the scheduler's shift (default: as shipped)")
    ap.add_argument("--grid", default=None, help="write a PNG grid of the first 64 samples here")
    ap.add_argument("--classifier", default=None, help="an attribute classifier folder (default: the shipped one)")
    args = ap.parse_args()
    result = measure(args.model, args.split, args.n, args.guidance, args.steps, args.grid, args.classifier, args.shift)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
