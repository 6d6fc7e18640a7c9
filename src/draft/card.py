"""The model card of a run's LoRA: `runs/NAME/lora/README.md`, in the Hugging Face Hub's form.

YAML front matter (base_model, library_name, license where known, tags) and a body with the
base model, reward(s), method, steps and key settings, the before/after grid, the held-out
evaluation before and after, and how to load the LoRA in diffusers, ComfyUI, AUTOMATIC1111
and Forge. Everything comes from the run folder's own files (config.yaml, metrics.jsonl,
report/), so the card can be written again for any finished run. The grid is copied into
lora/ so the card's image link works when that folder is uploaded on its own.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import yaml

from draft.runs import BEST_LORA, RunFolder

from draft.errors import UserError
from draft.hub import is_hub_id
from draft.models import EMBEDDED, family

GRID = "before_after.png"


def write_card(run_root: str | Path, folder: str | Path | None = None) -> Path:
    """Write the card of the run's last LoRA, lora/README.md (and copy the before/after grid next to
    it), or with `folder` the run's lora-best/, of the held-out guard's best LoRA; return its path."""
    from draft.guard import BEST_FILE

    run = RunFolder(Path(run_root))
    folder = run.lora if folder is None else Path(folder)
    config = yaml.safe_load(run.config.read_text()) or {}
    best = _read_json(folder / BEST_FILE)  # only the best LoRA's folder has one
    # The before/after grid and evaluation are the last LoRA's: the best's card shows the guard's figures.
    evaluation = {} if best else _read_json(run.report / "eval.json") or {}
    last = _last_metrics(run.metrics) if best is None else {"reward_queries": 0, "time": 0.0,
                                                             **_metrics_at(run.metrics, best["step"])}
    grid = run.report / GRID
    has_grid = grid.is_file() and best is None
    if has_grid:
        shutil.copyfile(grid, folder / GRID)
        if grid.with_suffix(".gif").is_file():  # videos: the animated before/after
            shutil.copyfile(grid.with_suffix(".gif"), (folder / GRID).with_suffix(".gif"))
    targets = _lora_file_info(folder)
    if not (config.get("lora") or {}).get("target_modules"):  # the family's default: the file says which
        config.setdefault("lora", {})["target_modules"] = targets
    which = best_lines(config, best, _last_metrics(run.metrics)) if best else last_lines(
        _read_json(run.lora_best / BEST_FILE), last)
    text = "---\n" + yaml.safe_dump(front_matter(config), sort_keys=False) + "---\n\n" + body(
        run.root.name, config, evaluation.get("before"), evaluation.get("after"), last, has_grid, which, folder.name)
    path = folder / "README.md"
    path.write_text(text)
    return path


def last_lines(kept: dict | None, last: dict) -> list[str]:
    """Which LoRA the last one's card describes, where the held-out guard kept another."""
    if kept is None:
        return []
    return [f"**This is the last LoRA**, from the end of training (step {last.get('step', '?')}). The held-out "
            f"guard kept the LoRA with the best held-out `{kept['metric']}` ({kept['value']:.4g}, step "
            f"{kept['step']}) in `{BEST_LORA}/` beside this folder.", ""]


def best_lines(config: dict, best: dict, last: dict) -> list[str]:
    """Which LoRA the best one's card describes, and the guard's held-out figures of it and of the base."""
    guard, base = config.get("guard") or {}, best.get("base") or {}
    lines = [f"**This is the held-out guard's best LoRA**, from step {best['step']} of {last.get('step', '?')}: the "
             f"highest held-out `{best['metric']}` ({best['value']:.4g}) of the guard's evaluations of "
             f"{best['samples']} held-out samples every {guard.get('every', '?')} step"
             f"{'' if guard.get('every') == 1 else 's'}. The LoRA at the end of "
             "training is in `lora/` beside this folder.", "",
             "| held-out figure | base model (step 0) | this LoRA |", "| --- | ---: | ---: |"]
    for key, value in (best.get("figures") or {}).items():
        if key != "n" and isinstance(value, (int, float)):
            old = base.get(key)
            lines.append(f"| {key} | {f'{old:.4g}' if isinstance(old, (int, float)) else '–'} | {value:.4g} |")
    return lines + [""]


def front_matter(config: dict) -> dict:
    model = str(config.get("model", ""))
    meta: dict = {}
    if is_hub_id(model):
        meta["base_model"] = model  # local folders and embedded models have no hub id to point to
    meta["library_name"] = "diffusers"
    if model in EMBEDDED:
        meta["license"] = EMBEDDED[model].license
    adapter = family(model)
    task = "text-to-video" if adapter is not None and adapter.fps else "text-to-image"
    tags = [task, "diffusers", "lora", "template:sd-lora", "draft", "reward-fine-tuning"]
    tags.append(str(config.get("method", "")))
    tags += [f"reward-{_slug(name)}" for name in rewards(config)]
    meta["tags"] = [t for t in dict.fromkeys(tags) if t]
    meta["pipeline_tag"] = task
    return meta


def rewards(config: dict) -> dict[str, float]:
    """The run's reward terms and their weights ("a:1.0+b:0.5" -> {"a": 1.0, "b": 0.5})."""
    from draft.rewards import _parse

    spec = str(config.get("reward", ""))
    try:
        return _parse(spec)
    except UserError:  # a card is a summary: an odd spec is shown as written
        return {spec: 1.0}


def body(name: str, config: dict, before: dict | None, after: dict | None, last: dict, has_grid: bool,
         which: list[str] = (), folder: str = "lora") -> str:
    model = config.get("model", "?")
    terms = rewards(config)
    reward_text = " + ".join(f"{w:g} × `{r}`" if len(terms) > 1 else f"`{r}`" for r, w in terms.items())
    lines = [
        f"# {name}",
        "",
        f"A LoRA for `{model}`{' (the tiny model embedded in draft)' if model in EMBEDDED else ''}, "
        f"fine-tuned with draft (`pip install draft-diffusion`) to raise the reward {reward_text} by backpropagating "
        "the reward's gradient through the sampler (DRaFT: Clark et al., [*Directly Fine-Tuning Diffusion Models on "
        "Differentiable Rewards*](https://arxiv.org/abs/2309.17400), ICLR 2024).",
        "",
        *which,
    ]
    if has_grid:
        shown = Path(GRID).with_suffix(".gif") if config.get("sampling", {}).get("frames") else GRID
        lines += [f"![Before and after: the base model (top) and with this LoRA (bottom), same prompts and seeds]({shown})",
                  "", "*Top: the base model; bottom: with this LoRA. Same prompts and seeds.*", ""]
    lines += ["## Training", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in settings(config, last).items()]
    lines += [""]
    if after:
        lines += evaluation_table(config, before, after)
    run = str(Path(str(config.get("output_dir", "runs"))) / name)
    lines += usage(run, str(model), config, folder)
    return "\n".join(lines) + "\n"


def settings(config: dict, last: dict) -> dict[str, str]:
    """The key hyper-parameters, as table rows."""
    from draft.methods import METHODS

    method = str(config.get("method", "?"))
    sampling, lora = config.get("sampling", {}), config.get("lora", {})
    steps = config.get("steps", "?")
    done = last.get("step", steps)
    rows = {
        "base model": f"`{config.get('model', '?')}`",
        "reward": ", ".join(f"`{r}` (weight {w:g})" for r, w in rewards(config).items()),
        "method": f"`{method}`: " + (METHODS[method].summary if method in METHODS else "").format_map(_Default(config)),
        "optimizer steps": f"{done}" + (f" of {steps}" if done != steps else ""),
        "reward queries": str(last.get("reward_queries", "?")),
        "training time": f"{last['time']:.0f} s" if isinstance(last.get("time"), (int, float)) else "?",
        "batch": f"{config.get('batch_size', '?')} per process × {config.get('grad_accum', 1)} accumulation",
        "learning rate": f"{config.get('lr', '?')} (AdamW, weight decay {config.get('weight_decay', 0)}, "
                         f"{config.get('warmup_steps', 0)} warm-up steps, gradient norm clipped to {config.get('max_grad_norm', '?')})",
        "LoRA": f"rank {lora.get('rank', '?')}, alpha {lora.get('alpha', '?')}, on "
                + (", ".join(f"`{t}`" for t in lora.get("target_modules") or []) or "the model family's default layers"),
        "sampling": f"{sampling.get('num_steps', '?')} steps, guidance {sampling.get('guidance_scale', '?')}, "
                    f"eta {sampling.get('eta', '?')}",
        "DRaFT+ regulariser (kl_coeff)": str(config.get("kl_coeff", 0)),
        "precision": str(config.get("mixed_precision", "no")) + (  # a LoRA fitted to a quantized base says so
            f", the frozen denoiser's Linear weights {config['quantize']} (torchao)"
            if config.get("quantize", "none") != "none" else ""),
        "training prompts": f"`{config.get('prompts', '?')}`",
        "seed": str(config.get("seed", "?")),
    }
    return rows


def evaluation_table(config: dict, before: dict | None, after: dict) -> list[str]:
    """The held-out figures before and after training, as a Markdown table."""
    before = before or {}
    lines = ["## Held-out evaluation", "",
             f"{after.get('n', '?')} images of the held-out prompts `{config.get('eval_prompts', '?')}`, one fixed seed "
             "each, the same for both columns.", "", "| metric | before | after |", "| --- | ---: | ---: |"]
    for key, value in after.items():
        if key == "n" or not isinstance(value, (int, float)):
            continue
        old = before.get(key)
        lines.append(f"| {key} | {f'{old:.4g}' if isinstance(old, (int, float)) else '–'} | {value:.4g} |")
    return lines + [""]


def snippet(model: str, config: dict, lora: str = "path/to/this/folder") -> str:
    """Python that loads the base pipeline and this LoRA in plain diffusers and samples once,
    with the run's sampling settings (a test runs it for every family)."""
    adapter = family(model)
    cls = adapter.pipeline_class if adapter is not None else "DiffusionPipeline"
    sampling = config.get("sampling", {})
    embedded = EMBEDDED.get(model)
    kwargs = {"num_inference_steps": sampling.get("num_steps", 50), "guidance_scale": sampling.get("guidance_scale", 7.5)}
    if adapter is not None:
        # The adapter's settings as the run loaded the model: the embedded model's, then the config's.
        options = {**(embedded.options if embedded else {}), **config.get("model_options", {})}
        kwargs.update(adapter.pipeline_kwargs(sampling, options))
    call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    video = adapter is not None and adapter.fps > 0
    lines = [f"from diffusers import {cls}"] + (["from diffusers.utils import export_to_video"] if video else [])
    absent = "".join(f", {name}=None" for name in _absent(adapter, model))  # e.g. SD3 saved without its T5
    if embedded is not None:  # shipped inside draft: its folder comes from the package
        lines += ["from draft.models import EMBEDDED", "", f'pipe = {cls}.from_pretrained(EMBEDDED["{model}"].path{absent})']
    else:
        lines += ["", f"pipe = {cls}.from_pretrained({model!r}{absent})"]
    lines.append(f"pipe.load_lora_weights({lora!r})  # or the Hub repository it was uploaded to")
    if video:
        lines += [f'frames = pipe(prompt="your prompt", {call}).frames[0]',
                  f'export_to_video(frames, "sample.mp4", fps={adapter.fps})']
    else:
        lines += [f'image = pipe(prompt="your prompt", {call}).images[0]', 'image.save("sample.png")']
    return "\n".join(lines)


def _absent(adapter, model: str) -> list[str]:
    """The components diffusers must be told are absent, as draft tells it when loading."""
    from draft.models import resolve

    if adapter is None:
        return []
    try:
        source, local = resolve(model)
        return adapter.absent_components(source, local)
    except (UserError, OSError, ValueError):  # the card is a summary: no index, no extra arguments
        return []


def usage(run: str, model: str, config: dict, folder: str = "lora") -> list[str]:
    """How to load the LoRA: diffusers, and the other tools through `draft export` (run: the run folder;
    folder: the LoRA's folder in it, lora/ or lora-best/)."""
    from draft.export import RUN_LORAS

    name = Path(run).name + RUN_LORAS.get(folder, "")
    source = shlex.quote(run if folder == "lora" else f"{run}/{folder}")
    adapter = family(model)
    formats = adapter.export_formats if adapter is not None else {}
    lines = ["## Use it", "", "### diffusers", "", "```python", snippet(model, config), "```", ""]
    if model in EMBEDDED:
        lines += [f"(`{model}` is embedded in draft: `draft sample --model {model} --lora path/to/this/folder "
                  '--prompt "..."` samples with it.)', ""]
    lines += ["### ComfyUI, AUTOMATIC1111, Forge", ""]
    if "kohya" in formats:
        lines += ["These tools read LoRAs with kohya's key names. Convert this one with draft:", "", "```bash",
                  f"draft export {source} --format kohya   # writes {run}/{folder}/{name}-kohya.safetensors", "```", "",
                  "and copy the file into `ComfyUI/models/loras/` (load it with a LoraLoader node) or into "
                  f"`models/Lora/` of AUTOMATIC1111 or Forge (prompt with `<lora:{name}-kohya:1>`).", ""]
    elif "comfyui" in formats:
        lines += ["ComfyUI reads this family's LoRAs by the original model's layer names. Convert this one with "
                  "draft:", "", "```bash", f"draft export {source} --format comfyui", "```", "",
                  "and copy the file into `ComfyUI/models/loras/` (load it with a LoraLoaderModelOnly node).", ""]
    else:
        lines += ["ComfyUI reads this model family's LoRAs with diffusers' key names; write a file with the "
                  "LoRA's alpha/rank folded into its weights, so ComfyUI applies it at the trained strength:", "",
                  "```bash", f"draft export {source} --format diffusers", "```", "",
                  "and copy the file into `ComfyUI/models/loras/`.", ""]
    lines += [f"`draft export {source} --merge OUT_DIR` saves the base pipeline with the LoRA fused into its "
              "weights.", ""]
    return lines


# --- helpers ---------------------------------------------------------------------------------


class _Default(dict):
    def __missing__(self, key):
        return "?"


def _cell(text: str) -> str:
    """A Markdown table cell: '|' (prompt lists use it) would end the cell."""
    return text.replace("|", "\\|")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _last_metrics(path: Path) -> dict:
    """The last complete line of metrics.jsonl ({} if none)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def _metrics_at(path: Path, step: int) -> dict:
    """The metrics.jsonl line of `step` ({"step": step} if none)."""
    from draft.report import read_metrics

    try:
        return next((r for r in read_metrics(path) if r.get("step") == step), {"step": step})
    except OSError:
        return {"step": step}


def _lora_file_info(folder: Path) -> list[str]:
    """The target modules the saved LoRA's adapter config lists."""
    from safetensors import SafetensorError, safe_open

    from draft.lora import WEIGHT_NAME

    try:
        with safe_open(str(folder / WEIGHT_NAME), framework="pt") as f:
            prefix = next(iter(f.keys()), "unet").split(".", 1)[0]
            config = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError):  # no readable file: nothing to list
        return []
    return sorted(config.get(f"{prefix}.target_modules") or [])
