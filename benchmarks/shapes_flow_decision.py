"""Where along a flow chain does shapes-flow settle the shape?

Samples held-out prompts with diffusers' `StableDiffusion3Pipeline` (flow Euler) and, at
every few steps, reads the model's current prediction of the clean image,
x̂_0 = x_t - sigma_t * v_t (v the guided velocity of that step, recovered from two
consecutive latents: x_{t+1} = x_t + (sigma_{t+1} - sigma_t) v_t). The shapes classifier
reads each x̂_0; the script prints, per step, how often its shape already equals the final
image's and how often it is the prompt's. A gradient window placed after the shape is
settled (the last steps of DRaFT-K, DRaFT-LV's re-noised last step) can barely change it.

    python benchmarks/shapes_flow_decision.py [--n 90] [--steps 50] [--guidance 4] [--shift S] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_base_quality import load  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-flow")
    p.add_argument("--n", type=int, default=90, help="held-out prompts, one image each")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--every", type=int, default=3, help="read x̂_0 every this many steps")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)

    from draft.models import shapes
    from draft.rewards.shapes import attribute_correct, predict

    pipe, kw = load(args.model, shift=args.shift)
    pipe.set_progress_bar_config(disable=True)
    heldout = sorted(shapes.prompts("heldout"))
    prompts = [heldout[i * len(heldout) // args.n] for i in range(args.n)]
    latents = []

    def keep(pipe_, i, t, state):
        latents.append(state["latents"].clone())  # x after step i
        return state

    gens = [torch.Generator().manual_seed(i) for i in range(args.n)]
    with torch.no_grad():
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
             output_type="latent", callback_on_step_end=keep, **kw)
        sigmas = pipe.scheduler.sigmas
        vae = pipe.vae

        def decode(z):
            z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0)
            return (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)

        final = decode(latents[-1])
        final_shape = predict(final)["shape"]
        rows = []
        for i in range(1, args.steps - 1, args.every):
            v = (latents[i] - latents[i - 1]) / (sigmas[i + 1] - sigmas[i])
            x0 = decode(latents[i - 1] - sigmas[i] * v)
            shape = predict(x0)["shape"]
            rows.append({
                "step": i, "sigma": round(float(sigmas[i]), 4),
                "same_shape_as_final": sum(a == b for a, b in zip(shape, final_shape)) / args.n,
                "shape_accuracy": attribute_correct(x0, prompts)["shape"].float().mean().item(),
            })
            print(f"step {i:3d}  sigma {rows[-1]['sigma']:.3f}  x̂_0 shape = final's {rows[-1]['same_shape_as_final']:.2f}"
                  f"  x̂_0 shape right {rows[-1]['shape_accuracy']:.2f}", flush=True)
        accuracy = attribute_correct(final, prompts)["shape"].float().mean().item()
    print(f"final image: shape right {accuracy:.2f}")
    result = {"model": args.model, "n": args.n, "steps": args.steps, "guidance": args.guidance,
              "shift": float(pipe.scheduler.config.shift), "rows": rows, "final_shape_accuracy": accuracy}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
