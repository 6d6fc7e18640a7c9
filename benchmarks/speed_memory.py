"""Time and peak memory of one training step of each method, against plain sampling.

For each case a fresh subprocess builds the model, then alternates "sample the batch under
no_grad" (the cost floor: T guided UNet calls and a VAE decode) with "one training step of
the method" (forward, backward and an AdamW step on the LoRA), and reports the ratio of
their median times, measured in that same process. Peak memory is the CUDA allocator's
peak on a GPU, or the growth of the process's peak RSS over its RSS before the step on
the CPU.

    python benchmarks/speed_memory.py --preset shapes-sd                 # CPU
    python benchmarks/speed_memory.py --preset shapes-flow               # CPU, the flow family
    python benchmarks/speed_memory.py --preset sd15 --device cuda         # GPU, SD 1.5-sized
    python benchmarks/speed_memory.py --preset tiny --repeats 2           # quick check
    python benchmarks/speed_memory.py --preset flux-dev --device cuda --cases 0,2 --t-sweep ""
    python benchmarks/speed_memory.py --preset wan21-1.3b --device cuda --cases 13,14,16 --t-sweep ""
    python benchmarks/speed_memory.py --preset z-image-turbo --device cuda --cases 13,14 --t-sweep ""
    python benchmarks/speed_memory.py --preset sdxl --allow-cpu --size 128 --steps 2 --repeats 1 --cases 0 --t-sweep ""

Presets: `tiny` (the test suite's random pipeline), `shapes-sd` and `shapes-flow` (the
shipped models, sampled with their own recipe's steps and guidance unless `--steps` says),
`sd15` (random weights in Stable Diffusion 1.5's exact architecture at 512 px), and at
their real sizes with random weights, built on the GPU from draft's own copies of the
configs (`draft.models.architectures`, nothing downloaded): `sdxl`, `sd35-medium` and
`flux-dev` at 1024 px, `wan21-1.3b` at 480x832 and 33 frames (its reward on 3 evenly
spaced frames, as configs/wan21-1.3b-pickscore.yaml), and `qwen-image`, `flux2-dev`,
`flux2-klein-4b` and `z-image-turbo` at 1024 px, sampled at the steps and guidance their
family or checkpoint samples with (`draft.defaults`: Turbo 9 steps unguided, klein 4 steps),
their language-model tokenizers stood in for by word tokenizers with the pipelines' chat
layouts (`draft.models.tiny_flux2.chat_tokenizer`); `--text-encoders cache` encodes the
prompts once and releases the encoders, as `text_encoders=cache` does (FLUX.2-dev's 24B and
Qwen-Image's 8B encoder do not fit beside the denoiser). Those run in bf16, one sample a batch
by default, and only with `--device cuda` (`--allow-cpu` forces them onto the CPU, which
needs tens of GB). `--size` samples any preset at N or HxW pixels instead (a video keeps its
frames): at 128 px a real-size preset takes its step on the CPU in minutes, which exercises
draft's key names, LoRA targets and dtypes on the real architecture (BENCHMARKS.md, "Real size
on the CPU"). Each case also reports the memory estimate's activations + LoRA for the same
settings (`draft.estimate`), for comparison with the measured peak, and the step's losses and
the LoRA's largest change, to show the step trains. The reward is `brightness`, so the reward
model's cost does not blur the comparison.
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
from dataclasses import replace
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
    ("DRaFT-K K=4, decoder checkpointed", "draft-k", {"k": 4, "decode_checkpointing": True}),
    # The estimate's split under a memory budget (the embedded presets; on the CPU the budget
    # is a fraction of RAM), the conditional-only gradient through guidance, and the newer windows.
    ("DRaFT full, checkpointing auto", "draft", {"checkpointing": "auto"}),
    ("DRaFT full, guidance gradient cond", "draft", {"guidance_gradient": "cond"}),
    ("Direct-Align", "direct-align", {}),
    ("DRTune K=5", "drtune", {"drtune_k": 5}),
]


# Real-size presets: hub id of the architecture, and (height, width, frames) to sample at.
REAL = {
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", (1024, 1024, 0)),
    "sd35-medium": ("stabilityai/stable-diffusion-3.5-medium", (1024, 1024, 0)),
    "flux-dev": ("black-forest-labs/FLUX.1-dev", (1024, 1024, 0)),
    "wan21-1.3b": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", (480, 832, 33)),
    "qwen-image": ("Qwen/Qwen-Image", (1024, 1024, 0)),
    "flux2-dev": ("black-forest-labs/FLUX.2-dev", (1024, 1024, 0)),
    "flux2-klein-4b": ("black-forest-labs/FLUX.2-klein-4B", (1024, 1024, 0)),
    "z-image-turbo": ("Tongyi-MAI/Z-Image-Turbo", (1024, 1024, 0)),
}
# The presets added with their families sample at the steps and guidance the family (or the
# checkpoint: Turbo's 9 steps unguided, klein's 4) samples with (`draft.defaults`), since 7.5
# means something else to each (FLUX.2-dev's guidance embedding, Z-Image's g + 1, ignored by
# the distilled klein); the earlier presets keep 7.5 and 50 steps, as their recorded commands.
FAMILY_SAMPLING = ("qwen-image", "flux2-dev", "flux2-klein-4b", "z-image-turbo")
EMBEDDED = ("shapes-sd", "shapes-flow")
VIDEO_REWARD_FRAMES = 3  # frames of a video the reward scores, evenly spaced (the Wan preset's)


def load(preset: str, folder: Path, device: str, dtype):
    """The model adapter for a preset (random weights except the embedded models)."""
    from draft.models import load_model
    from draft.models.base import quiet_diffusers
    from draft.models.sd import StableDiffusion
    from draft.models.tiny import sd15_pipeline, tiny_pipeline

    quiet_diffusers()
    if preset in EMBEDDED:
        return load_model(preset, device=device, dtype=dtype)
    if preset in REAL:
        from real_size import random_model

        return random_model(REAL[preset][0], folder, device, dtype, preset)
    pipe = (tiny_pipeline if preset == "tiny" else sd15_pipeline)(folder)
    return StableDiffusion(pipe.to(device, dtype), name=preset)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start the process's peak RSS afresh (Linux's clear_refs "5"), so the step's peak is not the
    build's: with `--text-encoders cache` the released encoders were the lifetime high."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """The peak RSS since the last reset (VmHWM; getrusage's ru_maxrss is never reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class Bench:
    """A model with a LoRA and its optimizer, timing methods against sampling on it."""

    def __init__(self, args, folder: Path):
        import torch

        from draft import rewards
        from draft.config import LoraConfig
        from draft.lora import add_lora
        from draft.plan import choose_frames

        torch.manual_seed(0)
        self.args, self.cuda = args, args.device.startswith("cuda")
        self.dtype = torch.bfloat16 if args.bf16 else torch.float32
        start = time.perf_counter()
        self.model = load(args.preset, folder, args.device, self.dtype)
        if args.block_checkpoint:  # before the LoRA, as the trainer applies it
            from draft.models.memory import checkpoint_blocks

            checkpoint_blocks(self.model)
        self.lora = LoraConfig(rank=8, target_modules=tuple(args.targets.split(",")))
        self.params = add_lora(self.model, self.lora)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.build_s = time.perf_counter() - start
        self.reward = rewards.get("brightness").to(args.device)
        self.prompts = ["a small red circle on a blue background"] * args.batch
        # The embedded models sample at their recipe's guidance (shapes-flow: 4), the newer
        # families at their own (FAMILY_SAMPLING); others at 7.5.
        self.guidance = _recipe(args.preset).guidance_scale if args.preset in (*EMBEDDED, *FAMILY_SAMPLING) else 7.5
        self.size = self.model.size(requested_size(args.preset, args.size))
        # A video's reward scores a few frames; only the latent frames they need are decoded.
        self.frames = choose_frames(0, 0, self.size.frames, VIDEO_REWARD_FRAMES, "even")
        if args.text_encoders == "cache":  # the benchmark's prompts encoded once, the encoders released
            from draft.models.text import place_text_encoders

            place_text_encoders(self.model, "cache", (self.guidance, self.size, ""),
                                [(self.prompts, self.autocast, args.batch)])

    def autocast(self):
        import torch

        return torch.autocast("cuda", dtype=self.dtype, enabled=self.cuda and self.args.bf16)

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
        from draft.methods import METHODS, Batch, Sampler, SampleNoise
        from draft.plan import sample_seed

        args, model, size = self.args, self.model, self.size
        overrides = dict(overrides)
        checkpointing = overrides.pop("checkpointing", True)
        # Folding the LoRA into the weights applies to the sampling floor too, so the ratio
        # compares like with like either way.
        merge = overrides.pop("merge_lora", True)
        kl = overrides.pop("kl_coeff", 0.0)
        decode_checkpoint = overrides.pop("decode_checkpointing", args.decode_checkpoint)
        gradient = overrides.pop("guidance_gradient", "both")
        sampling_cfg = SamplingConfig(num_steps=steps, guidance_scale=self.guidance, checkpointing=checkpointing,
                                      merge_lora=merge, decode_checkpointing=decode_checkpoint,
                                      block_checkpointing=args.block_checkpoint, guidance_gradient=gradient,
                                      height=size.height, width=size.width, frames=size.frames)
        cfg = TrainConfig(method=method, sampling=sampling_cfg, alignprop_k_max=min(10, steps), kl_coeff=kl,
                          batch_size=args.batch, mixed_precision="bf16" if args.bf16 else "no", lora=self.lora,
                          reward_frames=VIDEO_REWARD_FRAMES if size.frames else 0,
                          text_encoders=args.text_encoders, **overrides)
        # The family's own schedule (FLUX.1's resolution-dependent shift; DDIM for SD).
        schedule = model.schedule(steps, size)
        keep = 0
        if checkpointing == "auto":  # the trainer's own split (`draft.startup.kept_graphs`)
            from draft.startup import kept_graphs

            keep = kept_graphs(replace(cfg, model=args.preset), lambda line: print("#", line, file=sys.stderr))
        loop = Sampler(model, self.reward, schedule, self.guidance, 0.0, bool(checkpointing), decode_checkpoint, kl,
                       merge, size=size, keep_graphs=keep, guidance_gradient=cfg.sampling.guidance_gradient)
        shape = model.latent_shape(size)
        autocast = self.autocast()
        losses = []

        def sampling(rep):
            with autocast:
                generate(model, self.prompts, [rep * 100 + j for j in range(args.batch)], sampling_cfg, args.batch)

        def train_step(rep):
            noise = SampleNoise([sample_seed(0, rep, j) for j in range(args.batch)], shape, args.device)
            with autocast:
                batch = Batch(self.prompts, noise, np.random.default_rng([0, rep, 1]), frames=self.frames)
                out = METHODS[method](loop, batch, cfg)
            out.loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())

        def timed(fn, rep):
            self.sync()
            t0 = time.perf_counter()
            fn(rep)
            self.sync()
            return time.perf_counter() - t0

        sampling(999)  # warm-up
        # The LoRA before the first step, to show the step trains it (a few MB at rank 8).
        before = [p.detach().clone() for p in self.params]
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            base = rss_bytes()
        train_step(999)
        self.sync()
        peak = torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()
        change = max((p.detach().float() - b.float()).abs().max().item() for p, b in zip(self.params, before))
        del before
        t_sample, t_step = [], []
        for rep in range(args.repeats):
            t_sample.append(timed(sampling, rep))
            t_step.append(timed(train_step, rep))
        return {"sample_s": statistics.median(t_sample), "step_s": statistics.median(t_step),
                "peak_mb": (peak - base) / 2**20, "estimate_mb": self.estimate_mb(cfg),
                "height": sampling_cfg.height, "width": sampling_cfg.width, "frames": sampling_cfg.frames,
                "build_s": self.build_s, "loss": losses, "lora_max_change": change,
                "lora_params": sum(p.numel() for p in self.params)}

    def estimate_mb(self, cfg) -> float | None:
        """What `draft.estimate` expects on top of the weights for these settings: activations
        and the LoRA with its AdamW state (the measured peak is over the same baseline). Only
        for the presets with a configs folder (the real-size ones)."""
        from draft.estimate import estimate

        configs = getattr(self.model, "configs", None)
        if configs is None:
            return None
        est = estimate(cfg.replace(model=str(configs)), configs)
        return (est.activations + est.lora) / 2**20


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
           "--repeats", str(args.repeats), "--targets", args.targets, "--text-encoders", args.text_encoders,
           "--size", args.size] + (
        ["--bf16"] if args.bf16 else []) + (
        ["--decode-checkpoint"] if args.decode_checkpoint else []) + (
        ["--block-checkpoint"] if args.block_checkpoint else []) + (["--allow-cpu"] if args.allow_cpu else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", *EMBEDDED, "sd15", *REAL], default="shapes-sd")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default 4; 1 at real size)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the embedded model's recipe or the family's, else 50)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="frozen weights in bfloat16 (GPU)")
    p.add_argument("--t-sweep", default="10,25,50,100", help="sampling steps for the full-DRaFT memory sweep")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--targets", default="to_q,to_k,to_v,to_out.0",
                   help="UNet modules the LoRA adapts (default: attention only, as every recorded run)")
    p.add_argument("--decode-checkpoint", action="store_true",
                   help="checkpoint the VAE decode in every case (sampling.decode_checkpointing)")
    p.add_argument("--block-checkpoint", action="store_true",
                   help="checkpoint the denoiser block by block in every case (sampling.block_checkpointing)")
    p.add_argument("--text-encoders", choices=["device", "cache"], default="device",
                   help="cache: encode the prompts once and release the text encoders (text_encoders=cache), "
                        "for the families whose encoders do not fit beside the denoiser")
    p.add_argument("--size", default="",
                   help="sample at N or HxW pixels instead of the preset's size (a video keeps its frames), "
                        "e.g. 128 to take a real-size architecture through a step on the CPU")
    p.add_argument("--cases", default="", help="comma-separated case numbers to run (default: all), e.g. 0,2,7")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run a real-size preset without CUDA (tens of GB of memory, hours of time)")
    # used by the per-case subprocesses
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    real = args.preset in REAL
    if real and not args.device.startswith("cuda") and not args.allow_cpu:
        p.error(f"--preset {args.preset} builds the real architecture (billions of parameters): run it with "
                "--device cuda, or pass --allow-cpu to force the CPU")
    args.batch = args.batch or (1 if real else 4)
    args.steps = args.steps or (_recipe(args.preset).num_steps if args.preset in (*EMBEDDED, *FAMILY_SAMPLING) else 50)
    args.bf16 = args.bf16 or real  # real sizes are trained in bf16; float32 would double the weights
    requested_size(args.preset, args.size)  # a malformed --size fails here, not in every case's subprocess
    folder = Path(tempfile.mkdtemp(prefix="draft-bench-"))
    if args.child:
        print(json.dumps(Bench(args, folder).case(args.method, json.loads(args.overrides), args.steps)))
        return
    bench = Bench(args, folder) if args.device.startswith("cuda") else None
    results = {"preset": args.preset, "device": args.device, "batch": args.batch, "steps": args.steps,
               "size": args.size or None, "bf16": args.bf16, "lora_targets": args.targets, "cases": [], "t_sweep": []}
    print(f"# preset {args.preset}, device {args.device}, batch {args.batch}, {args.steps} sampling steps, "
          f"median of {args.repeats}; ratio = step time / no-grad sampling time in the same process")
    print("| method | step s | sampling s | ratio | peak MB | peak / DRaFT-1 | estimate MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
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
            print(f"| {label} | error: {r['error']} | | | | | |", flush=True)
            continue
        ref_peak = ref_peak or r["peak_mb"]
        print(f"| {label} | {r['step_s']:.3f} | {r['sample_s']:.3f} | {r['step_s'] / r['sample_s']:.2f}x | "
              f"{r['peak_mb']:.0f} | {r['peak_mb'] / ref_peak:.2f} | {_mb(r.get('estimate_mb'))} |", flush=True)
        print(f"#   {r['height']}x{r['width']} px, built in {r['build_s']:.0f} s, {r['lora_params']:,} LoRA "
              f"parameters, losses {r['loss']}, largest LoRA change {r['lora_max_change']:.2e}", flush=True)
    print("\n| full DRaFT (checkpointing), T | step s | sampling s | ratio | peak MB | estimate MB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in [int(x) for x in args.t_sweep.split(",") if x]:
        r = run_case(args, bench, "draft", {}, t)
        results["t_sweep"].append({"T": t, **r})
        save()
        if "error" in r:
            print(f"| {t} | error: {r['error']} | | | | |", flush=True)
            continue
        print(f"| {t} | {r['step_s']:.3f} | {r['sample_s']:.3f} | {r['step_s'] / r['sample_s']:.2f}x | "
              f"{r['peak_mb']:.0f} | {_mb(r.get('estimate_mb'))} |", flush=True)


def requested_size(preset: str, size: str = ""):
    """The size a preset samples at: `--size` ("N" or "HxW") where given, a video preset keeping
    its frames, else a real-size preset's own (REAL) or the model's native size."""
    from draft.models.base import Size

    own = Size(*REAL[preset][1]) if preset in REAL else Size()
    if not size:
        return own
    try:
        h, w = (int(v) for v in (size.split("x") if "x" in size else (size, size)))
    except ValueError:
        raise SystemExit(f"--size takes N or HxW pixels, e.g. 128 or 128x192; got {size!r}") from None
    return Size(h, w, own.frames)


def _recipe(preset: str):
    """The sampling settings an embedded model trains with, or a real-size preset's family samples
    with (`draft.defaults`, as `draft train`)."""
    from draft.defaults import resolve_sampling

    return resolve_sampling(REAL[preset][0] if preset in REAL else preset)


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"

if __name__ == "__main__":
    main()
