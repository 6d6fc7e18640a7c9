"""The cost floor's levers: one gradient-free denoiser call of an embedded model, eager
against channels-last, another attention backend and torch.compile (whole or per block).

Every method's step is mostly gradient-free denoiser calls (the floor), so a lever that
speeds one call speeds every method. Each variant is a fresh copy of the denoiser; the
variants alternate call by call in one process, so all see the same machine load, and
the table gives each one's median against eager's. Compilation is timed on its own (the
first call), since a run pays it once per shape and grad mode it meets.

    python benchmarks/floor_levers.py --model shapes-sd [--calls 20] [--out FILE]
    python benchmarks/floor_levers.py --model shapes-flow
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import torch


def _inputs(model, batch: int):
    """A classifier-free-guidance batch (2 x `batch`) of latents, a mid-chain timestep and
    the conditioning (unconditional half first, as `draft.sampling` batches it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, *model.latent_shape(model.size()), generator=g)
    cond, uncond = model.conditioning(["a small red circle on a blue background"] * batch, 4.0)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond} if isinstance(cond, dict) else torch.cat([uncond, cond])
    t = torch.tensor(model.schedule(20).timesteps[10])
    return x, t, both


def variants(denoiser, family: str) -> dict:
    """name -> (module, context manager factory to call it under)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {"eager": (denoiser, contextlib.nullcontext)}
    if family == "unet":
        out["channels-last"] = (copy.deepcopy(denoiser).to(memory_format=torch.channels_last), contextlib.nullcontext)
    out["sdpa-math"] = (denoiser, lambda: sdpa_kernel([SDPBackend.MATH]))
    out["compiled"] = (torch.compile(copy.deepcopy(denoiser), dynamic=False), contextlib.nullcontext)
    regional = copy.deepcopy(denoiser)
    blocks = [m for name, m in regional.named_children() if isinstance(m, torch.nn.ModuleList)]
    for block_list in blocks:  # each block compiled in place: repeated blocks share one graph
        for block in block_list:
            block.compile(dynamic=False)
    out["compiled per block"] = (regional, contextlib.nullcontext)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes-sd")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from diffusers.utils import logging

    from draft.models import load_model

    logging.set_verbosity_error()
    model = load_model(args.model)
    denoiser = model.denoiser.eval().requires_grad_(False)
    family = "unet" if "UNet" in type(denoiser).__name__ else "transformer"
    x, t, cond = _inputs(model, args.batch)
    table = variants(denoiser, family)

    def call(name):
        module, ctx = table[name]
        model.denoiser = module
        with torch.no_grad(), ctx():
            return model.denoise(x, t, cond)

    reference = call("eager")
    prepare, errors = {}, {}
    for name in table:
        t0 = time.perf_counter()
        y = call(name)
        prepare[name] = round(time.perf_counter() - t0, 2)
        errors[name] = float((y - reference).abs().max())
    times = {name: [] for name in table}
    for _ in range(args.calls):
        for name in table:
            t0 = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - t0)
    eager = statistics.median(times["eager"])
    rows = {name: {"ms": round(1000 * statistics.median(t), 2), "ratio": round(statistics.median(t) / eager, 3),
                   "first_call_s": prepare[name], "max_abs_diff": errors[name]} for name, t in times.items()}
    result = {"model": args.model, "batch_with_cfg": 2 * args.batch, "threads": torch.get_num_threads(),
              "calls": args.calls, "torch": torch.__version__, "variants": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
