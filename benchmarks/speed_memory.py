"""Time and peak memory of one training step of each method, against plain sampling.

For each case a fresh subprocess builds the model, then alternates "sample the batch under
no_grad" (the cost floor: T guided UNet calls and a VAE decode) with "one training step of
the method" (forward, backward and an AdamW step on the LoRA), and reports the ratio of
their median times, measured in that same process. Peak memory is the CUDA allocator's
peak on a GPU, or the growth of the process's peak RSS over its RSS before the step on
the CPU.

    python benchmarks/speed_memory.py --preset shapes-sd                 # CPU
    python benchmarks/speed_memory.py --preset sd15 --device cuda         # GPU, SD 1.5-sized
    python benchmarks/speed_memory.py --preset tiny --repeats 2           # quick check

Presets: `tiny` (the test suite's random pipeline), `shapes-sd` (the shipped model),
`sd15` (random weights in Stable Diffusion 1.5's exact architecture at 512 px). The
reward is `brightness`, so the reward model's cost does not blur the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [  # (label, method, overrides)
    ("DRaFT-1", "draft-k", {"k": 1}),
    ("DRaFT-1, no checkpointing", "draft-k", {"k": 1, "checkpointing": False}),
    ("DRaFT-LV n=2", "draft-lv", {"lv_n": 2}),
    ("DRaFT-LV n=2, no checkpointing", "draft-lv", {"lv_n": 2, "checkpointing": False}),
    ("DRaFT-K K=10", "draft-k", {"k": 10}),
    ("ReFL", "refl", {}),
    ("AlignProp K~U[1,10]", "alignprop", {}),
    ("DRaFT full, checkpointing", "draft", {}),
    ("DRaFT full, no checkpointing", "draft", {"checkpointing": False}),
    # Appended, so earlier case numbers in BENCHMARKS.md still mean the same cases.
    ("DRaFT-LV n=2, LoRA not merged", "draft-lv", {"lv_n": 2, "merge_lora": False}),
    # The DRaFT+ regulariser's base prediction (one more gradient-free call per gradient step).
    ("DRaFT-1, DRaFT+ kl 0.03", "draft-k", {"k": 1, "kl_coeff": 0.03}),
    ("DRaFT-LV n=2, DRaFT+ kl 0.03", "draft-lv", {"lv_n": 2, "kl_coeff": 0.03}),
    ("DRaFT full, DRaFT+ kl 0.03", "draft", {"kl_coeff": 0.03}),
    # The VAE decoder checkpointed (its activations dominate a one-step window at 512 px).
    ("DRaFT-1, decoder checkpointed", "draft-k", {"k": 1, "decode_checkpointing": True}),
    ("DRaFT-LV n=2, decoder checkpointed", "draft-lv", {"lv_n": 2, "decode_checkpointing": True}),
    ("DRaFT full, decoder checkpointed", "draft", {"decode_checkpointing": True}),
]


def load(preset: str, folder: Path, device: str, dtype):
    """The model adapter for a preset (random weights except shapes-sd)."""
    from draft.models import load_model
    from draft.models.sd import StableDiffusion, quiet_diffusers
    from draft.models.tiny import sd15_pipeline, tiny_pipeline

    quiet_diffusers()
    if preset == "shapes-sd":
        return load_model("shapes-sd", device=device, dtype=dtype)
    pipe = (tiny_pipeline if preset == "tiny" else sd15_pipeline)(folder)
    return StableDiffusion(pipe.to(device, dtype), name=preset)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Bench:
    """A model with a LoRA and its optimizer, timing methods against sampling on it."""

    def __init__(self, args, folder: Path):
        import torch

        from draft import rewards
        from draft.config import LoraConfig
        from draft.lora import add_lora

        torch.manual_seed(0)
        self.args, self.cuda = args, args.device.startswith("cuda")
        self.dtype = torch.bfloat16 if args.bf16 else torch.float32
        self.model = load(args.preset, folder, args.device, self.dtype)
        self.params = add_lora(self.model, LoraConfig(rank=8, target_modules=tuple(args.targets.split(","))))
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.reward = rewards.get("brightness").to(args.device)
        self.prompts = ["a small red circle on a blue background"] * args.batch

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def case(self, method: str, overrides: dict, steps: int) -> dict:
        """Median seconds of sampling and of one training step, and the step's peak memory."""
        import numpy as np
        import torch

        from draft.config import SamplingConfig, TrainConfig
        from draft.inference import generate
        from draft.methods import METHODS, Batch, Loop, SampleNoise, sample_seed
        from draft.sampling import Schedule

        args, model = self.args, self.model
        overrides = dict(overrides)
        checkpointing = overrides.pop("checkpointing", True)
        # Folding the LoRA into the weights applies to the sampling floor too, so the ratio
        # compares like with like either way.
        merge = overrides.pop("merge_lora", True)
        kl = overrides.pop("kl_coeff", 0.0)
        decode_checkpoint = overrides.pop("decode_checkpointing", args.decode_checkpoint)
        sampling_cfg = SamplingConfig(num_steps=steps, guidance_scale=7.5, checkpointing=checkpointing,
                                      merge_lora=merge)
        cfg = TrainConfig(method=method, sampling=sampling_cfg, alignprop_k_max=min(10, steps), **overrides)
        schedule = Schedule.from_scheduler_config(model.scheduler_config, steps)
        loop = Loop(model, self.reward, schedule, 7.5, 0.0, checkpointing, decode_checkpoint, kl, merge)
        shape = model.latent_shape()
        autocast = torch.autocast("cuda", dtype=self.dtype, enabled=self.cuda and args.bf16)

        def sampling(rep):
            with autocast:
                generate(model, self.prompts, [rep * 100 + j for j in range(args.batch)], sampling_cfg, args.batch)

        def train_step(rep):
            noise = SampleNoise([sample_seed(0, rep, j) for j in range(args.batch)], shape, args.device)
            with autocast:
                out = METHODS[method](loop, Batch(self.prompts, noise, np.random.default_rng([0, rep, 1])), cfg)
            out.loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        def timed(fn, rep):
            self.sync()
            t0 = time.perf_counter()
            fn(rep)
            self.sync()
            return time.perf_counter() - t0

        sampling(999)  # warm-up
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = rss_bytes()
        train_step(999)
        self.sync()
        peak = torch.cuda.max_memory_allocated() if self.cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t_sample, t_step = [], []
        for rep in range(args.repeats):
            t_sample.append(timed(sampling, rep))
            t_step.append(timed(train_step, rep))
        return {"sample_s": statistics.median(t_sample), "step_s": statistics.median(t_step),
                "peak_mb": (peak - base) / 2**20}


def run_case(args, bench: Bench | None, method: str, overrides: dict, steps: int) -> dict:
    """On a GPU, in this process (the allocator's peak resets per case); on the CPU in a fresh
    subprocess, whose peak RSS belongs to the case alone."""
    if bench is not None:
        import torch

        try:
            return bench.case(method, overrides, steps)
        except torch.OutOfMemoryError:
            bench.opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return {"error": "out of memory"}
    cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--method", method, "--steps", str(steps),
           "--overrides", json.dumps(overrides), "--device", args.device, "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--targets", args.targets] + (["--bf16"] if args.bf16 else []) + (
        ["--decode-checkpoint"] if args.decode_checkpoint else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "shapes-sd", "sd15"], default="shapes-sd")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="frozen weights in bfloat16 (GPU)")
    p.add_argument("--t-sweep", default="10,25,50,100", help="sampling steps for the full-DRaFT memory sweep")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--targets", default="to_q,to_k,to_v,to_out.0",
                   help="UNet modules the LoRA adapts (default: attention only, as every recorded run)")
    p.add_argument("--decode-checkpoint", action="store_true",
                   help="checkpoint the VAE decode in every case (sampling.decode_checkpointing)")
    p.add_argument("--cases", default="", help="comma-separated case numbers to run (default: all), e.g. 0,2,7")
    # used by the per-case subprocesses
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="draft-bench-"))
    if args.child:
        print(json.dumps(Bench(args, folder).case(args.method, json.loads(args.overrides), args.steps)))
        return
    bench = Bench(args, folder) if args.device.startswith("cuda") else None
    results = {"preset": args.preset, "device": args.device, "batch": args.batch, "steps": args.steps,
               "bf16": args.bf16, "lora_targets": args.targets, "cases": [], "t_sweep": []}
    print(f"# preset {args.preset}, device {args.device}, batch {args.batch}, {args.steps} DDIM steps, "
          f"median of {args.repeats}; ratio = step time / no-grad sampling time in the same process")
    print("| method | step s | sampling s | ratio | peak MB | peak / DRaFT-1 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    ref_peak = None

    def save():  # after every case, so a run cut off by a time limit keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))

    chosen = [int(c) for c in args.cases.split(",") if c.strip()] or range(len(CASES))
    for label, method, overrides in [CASES[c] for c in chosen]:
        r = run_case(args, bench, method, overrides, args.steps)
        results["cases"].append({"label": label, **r})
        save()
        if "error" in r:
            print(f"| {label} | error: {r['error']} | | | | |", flush=True)
            continue
        ref_peak = ref_peak or r["peak_mb"]
        print(f"| {label} | {r['step_s']:.3f} | {r['sample_s']:.3f} | {r['step_s'] / r['sample_s']:.2f}x | "
              f"{r['peak_mb']:.0f} | {r['peak_mb'] / ref_peak:.2f} |", flush=True)
    print("\n| full DRaFT (checkpointing), T | step s | sampling s | ratio | peak MB |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for t in [int(x) for x in args.t_sweep.split(",") if x]:
        r = run_case(args, bench, "draft", {}, t)
        results["t_sweep"].append({"T": t, **r})
        save()
        if "error" in r:
            print(f"| {t} | error: {r['error']} | | | |", flush=True)
            continue
        print(f"| {t} | {r['step_s']:.3f} | {r['sample_s']:.3f} | {r['step_s'] / r['sample_s']:.2f}x | "
              f"{r['peak_mb']:.0f} |", flush=True)

if __name__ == "__main__":
    main()
