"""The paper's comparisons, reproduced on shapes-sd: every method on one loop, several seeds.

    python benchmarks/compare_methods.py --out benchmarks/results/methods           # all parts
    python benchmarks/compare_methods.py --parts curves --steps 40 --seeds 0,1      # a quicker look

Parts (each writes JSON and a PNG into --out, and prints a markdown table):

- curves:    held-out reward against reward queries and against training time, for each
             method, mean and spread over seeds; queries and time to reach a threshold;
- gradnorm:  the LoRA gradient norm against the truncation depth K (DRaFT-K), at the base;
- scale:     held-out reward against the LoRA scale, 0 to 1.5, for the DRaFT-LV LoRA;
- mix:       an alignment LoRA and a JPEG-compressibility LoRA mixed over a grid of scales:
             alignment accuracy against real JPEG size, the trade-off front;
- overopt:   diversity and held-out reward against steps, with and without DRaFT+.

Runs go to --runs (reused if present, so an interrupted benchmark picks up where it
stopped). Everything runs on the CPU in the shapes world; see BENCHMARKS.md for results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METHODS = {  # label: (run-name slug, overrides)
    "draft (full)": ("draft", {"method": "draft"}),
    "draft-k K=1": ("draft-k1", {"method": "draft-k", "k": 1}),
    "draft-k K=5": ("draft-k5", {"method": "draft-k", "k": 5}),
    "draft-lv n=2": ("draft-lv", {"method": "draft-lv", "lv_n": 2}),
    "refl": ("refl", {"method": "refl"}),
    "alignprop K~U[1,10]": ("alignprop", {"method": "alignprop"}),
    "ddpo": ("ddpo", {"method": "ddpo", "sampling.eta": 1.0, "lr": 1e-4}),
}


def method_run(args, label: str, seed: int, **extra) -> Path:
    slug, overrides = METHODS[label]
    return run(args, f"{slug}-s{seed}", {**overrides, "seed": seed, **extra})


def overrides_list(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def run(args, name: str, overrides: dict) -> Path:
    """One training run (skipped if its folder already holds a finished run)."""
    from draft.config import TrainConfig, load_config
    from draft.trainer import train

    folder = Path(args.runs) / name
    if (folder / "report" / "eval.json").is_file():
        return folder
    from draft.prompts import load_prompts

    # Every `eval_stride`-th held-out prompt, each with `eval_samples / len` seeds (diversity needs two).
    eval_prompts = "|".join(load_prompts("heldout", args.model)[:: args.eval_stride])
    # The methods compared on one footing whatever the model: an embedded model's own recipe
    # (shapes-flow's wider LoRA, no penalty, no checkpointing) is not applied here.
    base = {"model": args.model, "steps": args.steps, "batch_size": args.batch, "sampling.num_steps": args.sampling_steps,
            "kl_coeff": 0.03, "lr": 1e-3, "lora.target_modules": "[]", "sampling.checkpointing": True,
            "eval_prompts": eval_prompts,
            "log.eval_every": args.eval_every, "log.eval_samples": args.eval_samples, "log.sample_every": 10**6,
            "log.checkpoint_every": 0, "log.trackers": "[]", "output_dir": args.runs, "name": name}
    config = load_config(None, overrides_list({**base, **overrides}))
    return train(config, overwrite=True, progress=False)


def guidance(args) -> float:
    """The model's recommended guidance (shapes-flow: 4), as its training runs use it."""
    from draft.defaults import resolve_sampling

    return resolve_sampling(args.model).guidance_scale


def curve(folder: Path) -> dict:
    """Held-out reward points of a run: (queries, time, reward), with the base as the first point."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    before = json.loads((folder / "report" / "eval.json").read_text())["before"]
    pts = [(0, 0.0, before["reward_mean"], before.get("accuracy_joint"), before["diversity"])]
    pts += [(r["reward_queries"], r["time"], r["eval_reward_mean"], r.get("eval_accuracy_joint"), r["eval_diversity"])
            for r in rows if "eval_reward_mean" in r]
    q, t, rew, acc, div = map(np.array, zip(*pts))
    return {"queries": q.tolist(), "time": t.tolist(), "reward": rew.tolist(),
            "accuracy_joint": [a for a in acc.tolist()], "diversity": div.tolist(),
            "grad_norm": [r["grad_norm"] for r in rows]}


def part_curves(args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {}
    for label in METHODS:
        for seed in args.seeds:
            results.setdefault(label, []).append(curve(method_run(args, label, seed)))
    (out / "curves.json").write_text(json.dumps(results, indent=1))
    threshold = args.threshold
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    rows = []
    for label, runs in results.items():
        q = np.mean([r["queries"] for r in runs], 0)
        t = np.mean([r["time"] for r in runs], 0)
        rew = np.array([r["reward"] for r in runs])
        for ax, x in zip(axes, (q, t)):
            ax.plot(x, rew.mean(0), label=label)
            ax.fill_between(x, rew.min(0), rew.max(0), alpha=0.15)
        reach_q, reach_t = [], []
        for r in runs:
            hit = [i for i, v in enumerate(r["reward"]) if v >= threshold]
            reach_q.append(r["queries"][hit[0]] if hit else np.nan)
            reach_t.append(r["time"][hit[0]] if hit else np.nan)
        final = rew[:, -1]
        acc = [r["accuracy_joint"][-1] for r in runs]
        rows.append((label, final.mean(), final.std(), np.nanmean(acc) if None not in acc else float("nan"),
                     reach_q, reach_t, np.mean([r["diversity"][-1] for r in runs])))
    for ax, xl in zip(axes, ("reward queries (images scored)", "training time (s, this CPU)")):
        ax.axhline(threshold, color="grey", ls=":", lw=1)
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out shapes-alignment")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print(f"\n| method | final held-out reward (mean ± std, {len(args.seeds)} seeds) | joint accuracy | "
          f"diversity | queries to reach {threshold} | time to reach (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, m, s, acc, rq, rt, div in rows:
        n_hit = sum(1 for v in rq if not np.isnan(v))
        rq_s = f"{np.nanmean(rq):.0f} ({n_hit}/{len(rq)} seeds)" if n_hit else "not reached"
        rt_s = f"{np.nanmean(rt):.0f}" if n_hit else "-"
        print(f"| {label} | {m:.3f} ± {s:.3f} | {acc:.3f} | {div:.3f} | {rq_s} | {rt_s} |")


def part_gradnorm(args, out: Path) -> None:
    """Unclipped LoRA gradient norm of DRaFT-K at the base model, averaged over batches."""
    import torch

    from draft import rewards
    from draft.config import LoraConfig, TrainConfig
    from draft.lora import add_lora
    from draft.methods import METHODS as FNS
    from draft.methods import Batch, Sampler, SampleNoise, sample_seed
    from draft.models import load_model
    from draft.prompts import load_prompts

    model = load_model(args.model)
    params = add_lora(model, LoraConfig())
    with torch.no_grad():  # a LoRA that has moved a little, so A receives gradient too
        g = torch.Generator().manual_seed(0)
        for p in params:
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    reward = rewards.get("shapes-alignment")
    schedule = model.schedule(args.sampling_steps)
    loop = Sampler(model, reward, schedule, guidance(args))
    prompts = load_prompts("train", args.model)
    table = {}
    for k in [k for k in (1, 2, 5, 10, 20, 35, 50) if k <= args.sampling_steps]:
        norms = []
        for b in range(args.grad_batches):
            for p in params:
                p.grad = None
            idx = [(b * args.batch + j) % len(prompts) for j in range(args.batch)]
            noise = SampleNoise([sample_seed(0, b, j) for j in range(args.batch)], model.latent_shape(), "cpu")
            batch = Batch([prompts[i] for i in idx], noise, np.random.default_rng(b))
            FNS["draft-k"](loop, batch, TrainConfig(k=k)).loss.backward()
            norms.append(float(torch.cat([p.grad.flatten() for p in params]).norm()))
        table[k] = (float(np.mean(norms)), float(np.std(norms)))
        print(f"K={k}: grad norm {table[k][0]:.4g} ± {table[k][1]:.3g}", flush=True)
    (out / "gradnorm.json").write_text(json.dumps(table, indent=1))
    print("\n| K | LoRA grad norm (mean ± std over batches) |\n| ---: | ---: |")
    for k, (m, s) in table.items():
        print(f"| {k} | {m:.4g} ± {s:.3g} |")


def _eval(args, loras, reward="shapes-alignment") -> dict:
    from draft.config import SamplingConfig
    from draft.evaluation import evaluate

    return evaluate(args.model, reward, "heldout", seeds=args.eval_seeds, loras=loras,
                    sampling=SamplingConfig(num_steps=args.sampling_steps, guidance_scale=guidance(args)), device="cpu")


def part_scale(args, out: Path) -> None:
    folder = args.align_lora or method_run(args, "draft-lv n=2", args.seeds[0])
    table = {}
    for s in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5):
        r = _eval(args, [(str(folder), s)])
        table[s] = {k: r[k] for k in ("reward_mean", "accuracy_joint", "diversity", "jpeg_kb")}
        print(f"scale {s}: {table[s]}", flush=True)
    (out / "scale.json").write_text(json.dumps(table, indent=1))
    print("\n| LoRA scale | held-out reward | joint accuracy | diversity |\n| ---: | ---: | ---: | ---: |")
    for s, r in table.items():
        print(f"| {s} | {r['reward_mean']:.3f} | {r['accuracy_joint']:.3f} | {r['diversity']:.3f} |")


def part_mix(args, out: Path) -> None:
    align = args.align_lora or method_run(args, "draft-lv n=2", args.seeds[0])
    jpeg = args.jpeg_lora or run(args, f"jpeg-s{args.seeds[0]}", {"method": "draft-lv", "seed": args.seeds[0],
                                                                  "reward": "jpeg-compressibility"})
    grid = {}
    for a in args.align_scales:
        for j in args.jpeg_scales:
            r = _eval(args, [(str(align), a), (str(jpeg), j)])
            grid[f"{a},{j}"] = {k: r[k] for k in ("reward_mean", "accuracy_joint", "jpeg_kb", "diversity")}
            print(f"alignment {a}, jpeg {j}: {grid[f'{a},{j}']}", flush=True)
    (out / "mix.json").write_text(json.dumps(grid, indent=1))
    print("\n| alignment LoRA scale | JPEG LoRA scale | joint accuracy | real JPEG size (KB) |\n| ---: | ---: | ---: | ---: |")
    for key, r in grid.items():
        a, j = key.split(",")
        print(f"| {a} | {j} | {r['accuracy_joint']:.3f} | {r['jpeg_kb']:.3f} |")


def part_overopt(args, out: Path) -> None:
    table = {}
    for kl in (0.0, args.kl):
        folder = run(args, f"overopt-kl{kl}", {"method": "draft-lv", "steps": args.steps * 3, "kl_coeff": kl,
                                               "lr": args.overopt_lr})
        table[kl] = curve(folder)
    (out / "overopt.json").write_text(json.dumps(table, indent=1))
    print("\n| kl_coeff | step | held-out reward | joint accuracy | diversity |\n| ---: | ---: | ---: | ---: | ---: |")
    for kl, c in table.items():
        for i in range(0, len(c["reward"]), max(1, len(c["reward"]) // 6)):
            acc = c["accuracy_joint"][i]
            print(f"| {kl} | {i * args.eval_every} | {c['reward'][i]:.3f} | {acc if acc is None else f'{acc:.3f}'} | "
                  f"{c['diversity'][i]:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-sd")
    p.add_argument("--parts", default="curves,gradnorm,scale,mix,overopt")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=72, help="held-out images per evaluation during training")
    p.add_argument("--eval-stride", type=int, default=5, help="use every Nth held-out prompt during training")
    p.add_argument("--eval-seeds", type=int, default=4)
    p.add_argument("--grad-batches", type=int, default=4)
    p.add_argument("--threshold", type=float, default=-1.0, help="held-out reward to reach")
    p.add_argument("--kl", type=float, default=1.0, help="DRaFT+ kl_coeff in the over-optimisation part")
    p.add_argument("--overopt-lr", type=float, default=1e-3)
    p.add_argument("--align-lora", default=None,
                   help="scale/mix: a shapes-alignment run folder to use (default: the DRaFT-LV curve run, seed 0)")
    p.add_argument("--jpeg-lora", default=None,
                   help="mix: a jpeg-compressibility run folder to use (default: train one for --steps)")
    p.add_argument("--align-scales", default="0,0.5,1", help="mix: scales of the alignment LoRA")
    p.add_argument("--jpeg-scales", default="0,0.5,1", help="mix: scales of the JPEG LoRA")
    p.add_argument("--runs", default="runs/benchmark")
    p.add_argument("--out", default="benchmarks/results/methods")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.align_scales = [float(s) for s in args.align_scales.split(",")]
    args.jpeg_scales = [float(s) for s in args.jpeg_scales.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"curves": part_curves, "gradnorm": part_gradnorm, "scale": part_scale, "mix": part_mix,
             "overopt": part_overopt}
    for name in args.parts.split(","):
        print(f"\n## {name}", flush=True)
        parts[name](args, out)


if __name__ == "__main__":
    main()
