"""The merged fast path on a quantized base: one gradient-free denoiser call with the LoRA
(a) merged into an unquantized model (the fast path), (b) unmerged over the quantized weights
(what `sampling.merge_lora` fell back to under `quantize` before this benchmark), (c) merged into a dequantized
float copy of the adapted quantized layers (what `merging.merged` does on a quantized base).

The denoiser is FLUX.1's transformer at its real width (24 heads of 128, 3072 wide; one joint
and one single-stream block, random weights) behind the tiny FLUX pipeline's text encoders,
so the call is the adapted block matmuls at FLUX.1's shapes. The LoRA goes on through
`draft.lora.add_lora` (FLUX's default targets), its B drawn off zero. The variants alternate
call by call in one process after a warm-up, so all see the same machine load; the table gives
each one's median against (a), the cost of entering and leaving (c)'s block (paid once per
sampling chain), the bytes of (c)'s float copies, and the largest difference between (b) and (c).

    OMP_NUM_THREADS=1 python benchmarks/quantized_merge.py [--size 256] [--calls 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time

import torch


def wide_flux(folder: str, how: str, rank: int):
    """The tiny FLUX pipeline with a FLUX.1-width transformer, quantized `how`, with a LoRA."""
    from diffusers import FluxTransformer2DModel

    from draft.config import LoraConfig
    from draft.lora import add_lora
    from draft.models import ADAPTERS
    from draft.models.base import load_callable
    from draft.models.memory import quantize
    from draft.models.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(folder)
    torch.manual_seed(0)  # the same base weights in every variant
    pipe.transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                              attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                                              pooled_projection_dim=32, guidance_embeds=True,
                                              axes_dims_rope=(16, 56, 56)).eval()
    model = load_callable(ADAPTERS["FluxPipeline"])(pipe, name=f"flux-width-{how}")
    quantize(model, how)
    params = add_lora(model, LoraConfig(rank=rank))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # off B = 0, the same in every variant
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    return model


def float_copy_bytes(model) -> int:
    """Bytes of the plain float weights (c) holds inside its block: one per adapted quantized layer."""
    from peft.tuners.lora import LoraLayer

    from draft.models.memory import is_quantized

    return sum(m.get_base_layer().weight.numel() * m.get_base_layer().weight.dtype.itemsize
               for m in model.denoiser.modules()
               if isinstance(m, LoraLayer) and is_quantized(m.get_base_layer().weight))


def main() -> None:
    from draft.models import merging

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (256: 256 image tokens)")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--hows", default="int8,nf4,float8")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from diffusers.utils import logging

    from draft.models.protocol import Size

    logging.set_verbosity_error()
    hows = args.hows.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        models = {how: wide_flux(tmp, how, args.rank) for how in ["none", *hows]}
    ref = models["none"]
    size = Size(args.size, args.size)
    x = torch.randn(1, *ref.latent_shape(size), generator=torch.Generator().manual_seed(0))
    cond, _ = ref.conditioning(["a small red circle on a blue background"], 3.5, size)
    t = torch.tensor(500.0)
    table = {"(a) unquantized, merged": (ref, True)}  # name -> (model, whether to call it inside `merged`)
    for how in hows:
        table[f"(b) {how}, unmerged"] = (models[how], False)
        table[f"(c) {how}, merged into a dequantized copy"] = (models[how], True)

    def call(name):
        """(output, seconds of the call, seconds entering and leaving the merged block)."""
        model, merge = table[name]
        block = merging.merged(model.denoiser) if merge else contextlib.nullcontext()
        with torch.no_grad():
            t0 = time.perf_counter()
            with block:
                t1 = time.perf_counter()
                y = model.denoise(x, t, cond)
                t2 = time.perf_counter()
            return y, t2 - t1, t1 - t0 + time.perf_counter() - t2

    outputs = {name: call(name)[0] for name in table}  # the warm-up
    times, merge = {n: [] for n in table}, {n: [] for n in table}
    for _ in range(args.calls):
        for name in table:
            _, seconds, entering = call(name)
            times[name].append(seconds)
            merge[name].append(entering)
    a = statistics.median(times["(a) unquantized, merged"])
    rows = {n: {"ms": round(1000 * statistics.median(v), 1), "ratio": round(statistics.median(v) / a, 3),
                "enter_and_leave_ms": round(1000 * statistics.median(merge[n]), 1)} for n, v in times.items()}
    for how in hows:
        b, c = outputs[f"(b) {how}, unmerged"], outputs[f"(c) {how}, merged into a dequantized copy"]
        rows[f"(c) {how}, merged into a dequantized copy"].update(
            max_abs_diff_to_b=float((b - c).abs().max()), output_scale=float(b.abs().max()),
            float_copy_bytes=float_copy_bytes(models[how]))
    result = {"denoiser": "FLUX.1 transformer at 3072 wide, 1 joint + 1 single block", "size_px": args.size,
              "threads": torch.get_num_threads(), "calls": args.calls, "lora_rank": args.rank,
              "torch": torch.__version__, "variants": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
