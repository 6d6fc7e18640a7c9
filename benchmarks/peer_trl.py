"""draft against TRL's AlignProp, side by side, on the same pipeline and settings.

TRL 0.23.1 is the last TRL release with `AlignPropTrainer`; it needs its own environment
(it pins nothing that draft needs, but it must not share draft's process). Build it once:

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0 trl==0.23.1 transformers==5.24.0 \
        diffusers==0.42.1 peft==0.21.2 accelerate==1.15.0

then, from the repository root with draft's own environment active:

    python benchmarks/peer_trl.py --trl-python /work/trl-venv/bin/python

What is compared (issue 13): `shapes-sd` (the folder shipped in the package), batch 4,
50 DDIM steps (eta 0), CFG 7.5, a rank-4 LoRA (alpha 4, gaussian init) on
to_q/to_k/to_v/to_out.0, AdamW at lr 1e-3 (weight decay 1e-4, TRL's default), gradient
clipping at norm 1, fp32, the `shapes-alignment` reward on both sides, `kl_coeff=0`.
TRL truncates at a fixed step (`truncated_backprop_rand=False`,
`truncated_backprop_timestep = T - K`) and checkpoints every UNet call, its default; draft
runs `method=draft-k k=K` (`method=draft` for K = T) with its defaults (checkpointing on).

Each side runs in its own process (TRL's in the `--trl-python` interpreter), both started
before timing, and the parent alternates one optimizer step on each, swapping which goes
first every round, so that load from other jobs falls on both. After `--warmup` steps each,
it takes the median of `--steps` steps. A step is the trainer's own unit: TRL's
`AlignPropTrainer.step` and draft's `Trainer.optimizer_step` (prompts, sampling, decode,
reward, backward, clipping, AdamW). Memory is the peak growth of the process's resident
set over the step (VmHWM reset through /proc/self/clear_refs before it), so it counts
what the C allocator keeps as well as live tensors; on a GPU it would be the allocator's
peak (`--device cuda`, run on a lent machine).

`--draft key=value` passes extra config overrides to draft's side (the speed levers, e.g.
`--draft sampling.checkpointing=false`); `--profile DIR` writes a torch.profiler table
and a cProfile listing of a few steps per side instead of timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES_SD = ROOT / "src" / "draft" / "assets" / "shapes-sd"
TAG = "@@peer "  # marks the child's protocol lines among whatever the libraries print


# --- measuring one step (both sides) -------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(step, device: str) -> dict:
    """Seconds and peak memory growth (MB) of one call of `step`."""
    import gc

    import torch

    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _status_kb("VmRSS") * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    # CPU seconds of the process as well: on a shared machine they move much less with
    # other jobs' load than wall time does (with one thread they are the work done).
    return {"s": seconds, "cpu_s": cpu, "peak_mb": (peak - base) / 2**20}


# --- the two sides (run inside the child processes) ----------------------------------------


def shapes_prompts() -> list[str]:
    from draft.prompts import load_prompts

    return load_prompts("train", "shapes-sd")


def shapes_reward(device: str):
    from draft import rewards

    return rewards.get("shapes-alignment").to(device)


def trl_side(args):
    """TRL's AlignPropTrainer on shapes-sd; returns a callable that runs one optimizer step."""
    import random

    import torch
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    prompts, reward = shapes_prompts(), shapes_reward(args.device)
    rng = random.Random(0)

    def prompt_fn():
        return rng.choice(prompts), {}

    def reward_fn(images, batch_prompts, metadata):
        return reward(images, list(batch_prompts)), {}

    project = tempfile.mkdtemp(prefix="peer-trl-")
    config = AlignPropConfig(
        num_epochs=1,
        sample_num_steps=args.num_steps,
        sample_guidance_scale=7.5,
        sample_eta=0.0,
        train_batch_size=args.batch,
        train_learning_rate=1e-3,
        train_gradient_accumulation_steps=1,
        train_max_grad_norm=1.0,
        truncated_backprop_rand=False,
        truncated_backprop_timestep=args.num_steps - args.k,
        mixed_precision="no",
        log_with=None,
        log_image_freq=10**9,
        save_freq=10**9,
        seed=0,
        project_kwargs={"project_dir": project, "logging_dir": project},
    )
    from accelerate import PartialState

    PartialState()  # TRL's pipeline logs through accelerate's logger, which needs the state first
    pipeline = DefaultDDPOStableDiffusionPipeline(str(SHAPES_SD), use_lora=True)
    pipeline.set_progress_bar_config(disable=True)
    trainer = AlignPropTrainer(config, reward_fn, prompt_fn, pipeline)
    pipeline.set_progress_bar_config(disable=True)
    counter = {"n": 0}

    def step():
        counter["n"] = trainer.step(0, counter["n"])

    torch.manual_seed(0)
    return step


def draft_side(args):
    """draft's Trainer on the same settings; returns a callable that runs one optimizer step."""
    from accelerate import Accelerator

    from draft.config import load_config
    from draft.runs import RunFolder
    from draft.trainer import Trainer

    method = "draft" if args.k == args.num_steps else "draft-k"
    overrides = [
        f"method={method}", f"k={args.k}", "kl_coeff=0", "lr=1e-3", "weight_decay=1e-4", "max_grad_norm=1.0",
        f"batch_size={args.batch}", "grad_accum=1", "reward=shapes-alignment",
        f"sampling.num_steps={args.num_steps}", "sampling.guidance_scale=7.5", "sampling.eta=0.0",
        "lora.rank=4", "lora.alpha=4", "lora.target_modules=[to_q,to_k,to_v,to_out.0]",
        f"cpu={str(not args.device.startswith('cuda')).lower()}",
        *args.draft,
    ]
    config = load_config(None, overrides)
    accelerator = Accelerator(cpu=config.cpu, mixed_precision="no")
    trainer = Trainer(config, accelerator, RunFolder(Path(tempfile.mkdtemp(prefix="peer-draft-"))), None)

    def step():
        trainer.optimizer_step()
        trainer.progress.step += 1  # the plan draws each step's prompts and noise from it

    return step


def profile(step, path: Path, steps: int) -> None:
    """A torch.profiler table (self CPU time by op) and a cProfile listing of `steps` steps."""
    import cProfile
    import io
    import pstats

    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    total = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(steps):
        step()
    pr.disable()
    wall = time.perf_counter() - t0
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("cumulative").print_stats(60)
    path.write_text(
        f"# {steps} steps, cProfile wall {wall:.2f} s ({wall / steps:.3f} s/step)\n\n"
        f"## torch.profiler, by self CPU time\n{table}\n\n## torch.profiler, by total CPU time\n{total}\n\n"
        f"## cProfile, by cumulative time\n{out.getvalue()}"
    )


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step = (trl_side if args.child == "trl" else draft_side)(args)
    print(TAG + json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            result = measure(step, args.device)
        elif cmd.startswith("profile "):
            _, path, n = cmd.split()
            profile(step, Path(path), int(n))
            result = {"profiled": path}
        elif cmd == "versions":
            from importlib.metadata import version

            names = ["torch", "diffusers", "transformers", "peft", "accelerate"] + (["trl"] if args.child == "trl" else [])
            result = {n: version(n) for n in names}
        else:
            break
        print(TAG + json.dumps(result), flush=True)


# --- the parent ------------------------------------------------------------------------------


class Side:
    """A child process running one side, answering one command at a time."""

    def __init__(self, name: str, python: str, args, k: int, tmp: str, src: Path = ROOT / "src",
                 overrides: list[str] = ()):
        env = dict(os.environ)
        env.update({
            "TMPDIR": tmp,  # the trainers' scratch folders, removed with it
            "PYTHONPATH": str(src),
            "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore",
        })
        cmd = [python, __file__, "--child", "trl" if name == "trl" else "draft", "--k", str(k), "--num-steps", str(args.num_steps),
               "--batch", str(args.batch), "--threads", str(args.threads), "--device", args.device]
        cmd += [f"--draft={o}" for o in overrides]
        self.name = name
        self.log = open(Path(tmp) / f"{name}.log", "w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, cwd=ROOT)

    def ask(self, command: str = "") -> dict:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        code = self.proc.wait()
        self.log.seek(0)
        tail = "\n".join(self.log.read().strip().splitlines()[-15:])
        raise RuntimeError(f"the {self.name} side exited (code {code}):\n{tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=300)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()  # never leave a child behind
                self.proc.wait()
        self.log.close()


def window(args, k: int, versions: dict) -> dict:
    """Both sides at gradient window k: medians of alternated steps."""
    tmp = tempfile.TemporaryDirectory(prefix="peer-trl-")
    sides = {"trl": Side("trl", args.trl_python, args, k, tmp.name),
             "draft": Side("draft", sys.executable, args, k, tmp.name, overrides=args.draft)}
    if args.baseline_src or args.baseline_draft:
        sides["draft-baseline"] = Side("draft-baseline", sys.executable, args, k, tmp.name,
                                       Path(args.baseline_src or ROOT / "src"), args.baseline_draft or args.draft)
    try:
        for s in sides.values():
            s.ask()  # ready
        for name, s in sides.items():
            versions.setdefault(name, s.ask("versions"))
        if args.profile:
            out = Path(args.profile)
            out.mkdir(parents=True, exist_ok=True)
            for name, s in sides.items():
                s.ask("step")  # warm-up
                s.ask(f"profile {out.resolve() / f'{name}-K{k}.txt'} {args.profile_steps}")
            return {"k": k, "profiled": str(out)}
        runs = {name: [] for name in sides}
        for rnd in range(args.warmup + args.steps):
            order = list(sides)[rnd % len(sides):] + list(sides)[:rnd % len(sides)]  # each goes first in turn
            for name in order:
                r = sides[name].ask("step")
                if rnd >= args.warmup:
                    runs[name].append(r)
    finally:
        for s in sides.values():
            s.close()
        tmp.cleanup()
    row = {"k": k, "steps": args.steps}
    for name, rs in runs.items():
        row[name] = {"s": statistics.median(r["s"] for r in rs), "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                     "peak_mb": statistics.median(r["peak_mb"] for r in rs),
                     "s_all": [round(r["s"], 4) for r in rs], "cpu_s_all": [round(r["cpu_s"], 4) for r in rs],
                     "peak_mb_all": [round(r["peak_mb"], 1) for r in rs]}
    for name in [n for n in sides if n != "trl"]:
        suffix = "" if name == "draft" else "_baseline"
        row["time_ratio" + suffix] = row[name]["s"] / row["trl"]["s"]
        row["cpu_ratio" + suffix] = row[name]["cpu_s"] / row["trl"]["cpu_s"]
        row["peak_ratio" + suffix] = row[name]["peak_mb"] / row["trl"]["peak_mb"] if row["trl"]["peak_mb"] > 0 else None
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl-python", default="/work/trl-venv/bin/python", help="Python of the environment with trl==0.23.1")
    p.add_argument("--windows", default="1,10,50", help="gradient windows K (K = num steps is full DRaFT)")
    p.add_argument("--num-steps", type=int, default=50, help="DDIM sampling steps T")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads per side")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps per side first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--draft", action="append", default=[], metavar="KEY=VALUE",
                   help="extra draft config override (repeatable), e.g. a speed lever")
    p.add_argument("--baseline-src", default="", metavar="DIR",
                   help="also run draft from this source folder (e.g. an export of an older commit's src/) as a third side")
    p.add_argument("--baseline-draft", action="append", default=[], metavar="KEY=VALUE",
                   help="the third side's overrides in place of --draft's (its source: --baseline-src, else this "
                        "tree's), e.g. the default beside a speed lever")
    p.add_argument("--label", default="", help="a name for this run in the output")
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/peer_trl[-LABEL].json)")
    p.add_argument("--profile", default="", metavar="DIR", help="profile each side instead of timing; write to DIR")
    p.add_argument("--profile-steps", type=int, default=3)
    # used by the child processes
    p.add_argument("--child", choices=["trl", "draft"], help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    windows = [int(k) for k in args.windows.split(",") if k.strip()]
    bad = [k for k in windows if not 1 <= k <= args.num_steps]
    if bad:
        p.error(f"windows must lie in 1..{args.num_steps}: {bad}")
    versions: dict = {}
    results = {"label": args.label, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": f"{os.cpu_count()} CPU cores" if args.device == "cpu" else args.device,
               "settings": {"model": "shapes-sd", "batch": args.batch, "num_steps": args.num_steps, "cfg": 7.5,
                            "lora": "rank 4, alpha 4, to_q/to_k/to_v/to_out.0", "lr": 1e-3,
                            "reward": "shapes-alignment", "kl_coeff": 0, "threads": args.threads,
                            "steps": args.steps, "warmup": args.warmup, "draft_overrides": args.draft},
               "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
               "versions": versions, "windows": []}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "peer_trl" + (f"-{args.label}" if args.label else "") + ".json")
    if not args.profile:
        print(f"# shapes-sd, batch {args.batch}, {args.num_steps} DDIM steps, CFG 7.5, {args.threads} threads per side, "
              f"median of {args.steps} alternated steps after {args.warmup}; peak = growth over the step"
              + (f"; draft overrides: {' '.join(args.draft)}" if args.draft else ""))
        print("| gradient window | TRL s/step | draft s/step | draft / TRL | CPU s: draft / TRL | TRL peak MB | "
              "draft peak MB | draft / TRL |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in windows:
        row = window(args, k, versions)
        results["windows"].append(row)
        if args.profile:
            print(f"profiled K={k} into {row['profiled']}", flush=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        name = "full (K=T)" if k == args.num_steps else f"K={k}"
        pr = f"{row['peak_ratio']:.2f}" if row["peak_ratio"] is not None else "-"
        print(f"| {name} | {row['trl']['s']:.3f} | {row['draft']['s']:.3f} | {row['time_ratio']:.2f} | {row['cpu_ratio']:.2f} | "
              f"{row['trl']['peak_mb']:.1f} | {row['draft']['peak_mb']:.1f} | {pr} |", flush=True)
        if "draft-baseline" in row:
            b = row["draft-baseline"]
            pb = f"{row['peak_ratio_baseline']:.2f}" if row["peak_ratio_baseline"] is not None else "-"
            print(f"| {name}, baseline | {row['trl']['s']:.3f} | {b['s']:.3f} | {row['time_ratio_baseline']:.2f} | "
                  f"{row['cpu_ratio_baseline']:.2f} | {row['trl']['peak_mb']:.1f} | {b['peak_mb']:.1f} | {pb} |", flush=True)
    if not args.profile:
        print(f"versions: {json.dumps(versions)}\nwritten to {out}")


if __name__ == "__main__":
    main()
