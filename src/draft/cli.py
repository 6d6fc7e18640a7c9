"""The `draft` command: argument parsing and friendly errors only; the work is in the library.

Exit codes:

- 0   success;
- 1   a run stopped itself: too many non-finite steps, or a write that failed (no space,
      no permission, an I/O error), with one line on stderr saying what and where; the
      last complete checkpoint is intact and `draft train --resume RUN` continues;
- 2   bad input, with a one-line message on stderr and no traceback (including a run
      folder that another `draft train` is using, and a training step that ran out of
      accelerator memory: the line names the phase and the options estimated to fit, and
      `--resume` with them continues from the last checkpoint, `draft.oom`);
- 128 + N   `draft train` stopped on signal N (143 SIGTERM, 130 SIGINT/Ctrl-C, 138
      SIGUSR1) after finishing its step and writing a checkpoint: resumable with
      `--resume`. A second signal ends it at once, by the signal itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from draft.errors import Interrupted, TrainingStopped, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _lora_args(values: list[str] | None) -> list[tuple[str, float]]:
    from draft.lora import parse_lora_arg

    return [parse_lora_arg(v) for v in values or []]


def _sampling(args):
    """The sampling options given; those not given stay None, for the library to resolve as
    `draft train` does (the model's recommended steps and guidance: shapes-flow 20 and 4),
    so that `draft eval` and `draft sample` see what `draft train` trained with."""
    from draft.config import SamplingConfig

    return SamplingConfig(num_steps=args.steps, guidance_scale=args.guidance, eta=args.eta, height=args.height or 0,
                          width=args.width or 0, frames=args.frames, negative_prompt=args.negative_prompt).validate()


def _reward_args(items: list[str] | None) -> dict:
    """--reward-arg aesthetic.model=/path -> {"aesthetic": {"model": "/path"}}."""
    from draft.configio import parse_value

    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        name, dot, field = key.rpartition(".")
        if not sep or not dot or not name or not field:
            raise UserError(f"--reward-arg {item!r} is not of the form REWARD.KEY=VALUE")
        out.setdefault(name, {})[field] = parse_value(value)
    return out


# --- subcommands -----------------------------------------------------------------------------


def cmd_train(args) -> int:
    from draft.configio import load_config, read_yaml

    config_file, overrides = None, []
    for item in args.items:
        if "=" in item:
            overrides.append(item)
        elif config_file is None:
            config_file = item
        else:
            raise UserError(f"unexpected argument {item!r}: give one CONFIG.yaml and key=value overrides")
    if args.resume and "=" in args.resume:  # `--resume steps=10`: an override, not a run folder
        overrides.append(args.resume)
        args.resume = ""
    resume = args.resume is not None
    if resume and args.resume != "":
        # `--resume RUN_DIR`: the run's own config, then any file and overrides on top.
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"nothing to resume: {run_dir} holds no run (no config.yaml)")
        overrides = [*overrides, f"output_dir={run_dir.parent}", f"name={run_dir.name}"]
        config = load_config(config_file, overrides, base=read_yaml(run_dir / "config.yaml"))
    else:
        config = load_config(config_file, overrides)
        if resume and not config.name:
            raise UserError("--resume needs the run: pass --resume RUN_DIR, or name=... of the run")
    if args.dry_run:
        return _dry_run(config, resume, args.overwrite)
    from draft.trainer import train

    train(config, resume=resume, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def _dry_run(config, resume: bool = False, overwrite: bool = False) -> int:
    """Check everything that can be checked without loading weights (draft.preflight), and print it."""
    from draft.preflight import dry_run

    print(dry_run(config, resume=resume, overwrite=overwrite), end="")
    return 0


def cmd_sample(args) -> int:
    from draft.inference import sample

    out = Path(args.out)
    samples = sample(args.model, args.prompt, _lora_args(args.lora), seed=args.seed, num_images=args.num_images,
                     sampling=_sampling(args), out=out, device=args.device, fps=args.fps)
    kind = "video(s) as mp4 and GIF" if samples.ndim == 5 else "image(s)"
    print(f"wrote {len(args.prompt) * args.num_images} {kind} and grid.png to {out}")
    return 0


def cmd_eval(args) -> int:
    import json

    from draft.evaluation import evaluate

    result = evaluate(args.model, args.reward, args.prompts, args.seeds, _lora_args(args.lora), _sampling(args),
                      _reward_args(args.reward_arg), out=args.out, device=args.device, max_prompts=args.max_prompts)
    print(json.dumps(result, indent=2))
    return 0


def cmd_rewards(args) -> int:
    from draft.rewards import available

    infos = available()
    width = max(len(n) for n in infos)
    for name, info in sorted(infos.items()):
        needs = f"  [needs: pip install '{info.requires}']" if info.requires else ""
        print(f"{name:<{width}}  {info.description}{needs}")
    print("\nAlso: 'module:attr' for your own reward, and sums such as 'brightness:1.0+saturation:0.5'.")
    return 0


def cmd_pretrain_shapes(args) -> int:
    from draft.models import EMBEDDED
    from draft.models.base import load_callable

    pretrain = load_callable(EMBEDDED[args.model].pretrain)
    path = pretrain(Path(args.out or args.model), seed=args.seed, device=args.device)
    print(f"wrote the {args.model} pipeline to {path}")
    return 0


def cmd_export(args) -> int:
    from draft.export import export, merge

    if args.format is None and args.merge is None:
        raise UserError("say what to write: --format kohya|comfyui|diffusers (a LoRA file) and/or --merge OUT_DIR "
                        "(a pipeline)")
    if args.format is not None:
        path = export(args.lora, args.format, out=args.out, scale=args.scale, model=args.model)
        print(f"wrote {path}")
    elif args.out is not None:
        raise UserError("--out names the exported LoRA file; with --merge alone, give the folder to --merge")
    if args.merge is not None:
        folder = merge(args.lora, args.merge, scale=args.scale, model=args.model, device=args.device)
        print(f"wrote the merged pipeline to {folder}")
    return 0


# --- the parser ------------------------------------------------------------------------------


def _add_sampling(p) -> None:
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the model's recommended number, else 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the model's recommended one)")
    p.add_argument("--negative-prompt", default="", help="the prompt of guidance's unconditional pass (default: empty)")
    p.add_argument("--height", type=int, default=None, help="height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="width in pixels (default: the model's native size)")
    p.add_argument("--frames", type=int, default=None, help="video models: frames per video (default: the model's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--lora", action="append", metavar="DIR[:SCALE]",
                   help="a LoRA folder (or run folder) and its scale; repeat to mix several")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="draft", description="Fine-tune diffusion models on differentiable rewards (DRaFT).")
    parser.add_argument("--version", action="version", version=f"draft {__import__('draft').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="fine-tune a LoRA (no arguments: the default recipe on shapes-sd)")
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue a run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, do not train")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate images, optionally with LoRAs mixed in")
    p.add_argument("--model", default="shapes-sd", help="pipeline folder, hub id, or an embedded model (shapes-sd, shapes-flow, shapes-video)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed+k")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--fps", type=int, default=0, help="video models: frames per second of the mp4s (default: the model's)")
    _add_sampling(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="score held-out prompts with fixed seeds; prints and writes JSON")
    p.add_argument("--model", default="shapes-sd")
    p.add_argument("--reward", help="reward spec (see `draft rewards`); default: the one the model's recipe "
                                    "trains on, else shapes-alignment")
    p.add_argument("--reward-arg", action="append", metavar="REWARD.KEY=VALUE", help="an argument for a reward")
    p.add_argument("--prompts", default="heldout", help="prompt set name, text file, or 'a|b|c'")
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt: 0 .. N-1")
    p.add_argument("--out", default=None, help="write the JSON here too")
    _add_sampling(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("rewards", help="list the registered rewards")
    p.set_defaults(func=cmd_rewards)

    p = sub.add_parser("export", help="write a LoRA for ComfyUI/A1111/Forge (kohya) or diffusers, or merge it into the model")
    p.add_argument("lora", metavar="RUN_OR_LORA", help="a run folder, its lora/ folder, or a LoRA .safetensors file")
    p.add_argument("--format", choices=("kohya", "comfyui", "diffusers"),
                   help="kohya: lora_unet_* keys for ComfyUI, AUTOMATIC1111, Forge (SD 1.x/2.x/SDXL); comfyui: the "
                        "original layer names ComfyUI reads for Wan; diffusers: peft keys")
    p.add_argument("--out", metavar="FILE", help="the .safetensors file to write (default: next to the LoRA)")
    p.add_argument("--scale", type=float, default=1.0, help="strength folded into the export (default 1: the trained update)")
    p.add_argument("--merge", metavar="OUT_DIR", help="also save the base pipeline with the LoRA fused in, to this folder")
    p.add_argument("--model", default=None, help="the base pipeline (default: the run's model)")
    p.add_argument("--device", default=None, help="where to fuse the weights for --merge (default cpu)")
    p.set_defaults(func=cmd_export)

    from draft.models import EMBEDDED

    shipped = [name for name, e in EMBEDDED.items() if e.pretrain]
    p = sub.add_parser("pretrain-shapes", help=f"rebuild a shipped shapes pipeline ({', '.join(shipped)}) from scratch")
    p.add_argument("--model", default="shapes-sd", choices=shipped,
                   help="which one: shapes-sd (Stable Diffusion, DDIM) or shapes-flow (SD3, flow matching)")
    p.add_argument("--out", default=None, help="output folder (default: the model's name); the pipeline goes into OUT/MODEL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_pretrain_shapes)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Library chatter (e.g. transformers' notes about optional backends) is not for CLI users.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        # `draft train --resume RUN steps=10`: overrides may follow the options too.
        if rest and args.command == "train" and not any(r.startswith("-") for r in rest):
            args.items += rest
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
