"""The memory estimate (`draft.estimate`) against the GPU peaks recorded in BENCHMARKS.md.

Builds a config-only folder of Stable Diffusion 1.5's architecture (the one
`benchmarks/speed_memory.py --preset sd15` measured: `draft.models.tiny.sd15_pipeline`, on the
meta device, so no weight is made or read), estimates each measured setting, and prints the
error of each. The recorded peaks are the allocator's peak during a training step above what
the model held before it, so they are compared with the estimate's activations plus the
LoRA's gradients and AdamW state.

    python benchmarks/estimate_memory.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

# (label, overrides, measured MB, where): SD 1.5 architecture, 512 px, batch 4, bf16, rank-8
# LoRA on the attention projections, brightness reward, 50 steps unless set.
MEASURED = [
    ("DRaFT-1", {"method": "draft-k", "k": 1}, 19931, "H100 run 2; H200"),
    ("DRaFT-1, no checkpointing", {"method": "draft-k", "k": 1, "sampling.checkpointing": False}, 28644, "H100 run 1"),
    ("DRaFT-1, no checkpointing", {"method": "draft-k", "k": 1, "sampling.checkpointing": False}, 28645, "H200"),
    ("DRaFT-LV n=2", {"method": "draft-lv", "lv_n": 2}, 39861, "H100 run 2; H200"),
    ("DRaFT-LV n=2, no checkpointing", {"method": "draft-lv", "lv_n": 2, "sampling.checkpointing": False}, 57262,
     "H100 run 1"),
    ("DRaFT-LV n=2, no checkpointing", {"method": "draft-lv", "lv_n": 2, "sampling.checkpointing": False}, 57261,
     "H200"),
    ("DRaFT-K K=10", {"method": "draft-k", "k": 10}, 19933, "H100 run 1"),
    ("ReFL", {"method": "refl"}, 28645, "H100 run 1"),
    ("AlignProp K~U[1,10]", {"method": "alignprop"}, 19932, "H100 run 1"),
    ("DRaFT full, T=10", {"method": "draft", "sampling.num_steps": 10}, 19933, "H100 runs 1, 2"),
    ("DRaFT full, T=25", {"method": "draft", "sampling.num_steps": 25}, 19937, "H100 run 1"),
    ("DRaFT full, T=50", {"method": "draft"}, 19943, "H100 runs 1, 2; H200"),
    ("DRaFT full, T=100", {"method": "draft", "sampling.num_steps": 100}, 19956, "H100 run 2"),
]
COMMON = {"batch_size": 4, "mixed_precision": "bf16", "lora.rank": 8,
          "lora.target_modules": "to_q,to_k,to_v,to_out.0", "sampling.guidance_scale": 7.5}


def sd15_config_folder(root: Path) -> Path:
    """model_index.json and every component's config of SD 1.5's architecture, no weights."""
    import torch

    from draft.models.tiny import sd15_pipeline

    with torch.device("meta"):
        pipe = sd15_pipeline(root)
    folder = root / "sd15-configs"
    pipe.save_config(folder)
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_config(folder / "scheduler")
    return folder


def main() -> None:
    from draft.config import load_config
    from draft.estimate import estimate

    folder = sd15_config_folder(Path(tempfile.mkdtemp(prefix="draft-est-")))
    print("| setting | measured MB | estimated MB | error | where measured |")
    print("| --- | ---: | ---: | ---: | --- |")
    worst = 0.0
    for label, overrides, measured, where in MEASURED:
        items = [f"{k}={v}" for k, v in {**COMMON, **overrides}.items()]
        est = estimate(load_config(None, items), folder)
        # The recorded peak is above the weights and LoRA parameters already in memory.
        step_mb = (est.activations + est.lora_params * 12) / 2**20
        err = step_mb / measured - 1
        worst = max(worst, abs(err))
        print(f"| {label} | {measured} | {step_mb:.0f} | {err:+.1%} | {where} |")
    full = estimate(load_config(None, [f"{k}={v}" for k, v in COMMON.items()] +
                                ["method=draft", "sampling.checkpointing=false"]), folder)
    print(f"\nlargest error {worst:.1%}; full DRaFT T=50 without checkpointing (out of memory on 80 GB): "
          f"estimated {full.peak / 2**30:.0f} GiB in all")
    print("weights:", {k: f"{v / 2**20:.0f} MB" for k, v in full.parts.items()})


if __name__ == "__main__":
    main()
