"""Does a shapes-video transformer keep a clip's shape when it denoises it from sigma s?

80 held-out clips (seed 5, the reconstruction table's in docs/shapes-video.md) are encoded
(posterior mean), noised to each sigma, taken to x_0 in one conditional velocity step
(x_0 = x_t - sigma v), decoded and read by the `shapes-motion` metrics. At sigma 0 this is
the VAE's reconstruction, the ceiling; a one-step x_0 is the mean of what the model thinks
possible, so its shapes blur as sigma rises even in a model that draws them.

    python benchmarks/shapes_video_denoise.py [FOLDER] [--sigmas 0.25,0.5,0.75,1]
"""

from __future__ import annotations

import argparse

import torch


@torch.no_grad()
def main() -> None:
    from diffusers import WanPipeline

    from draft.models import EMBEDDED, shapes_video
    from draft.models.wan import denormalise, normalise
    from draft.rewards.shapes_motion import motion_metrics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default=str(EMBEDDED["shapes-video"].path))
    p.add_argument("--sigmas", default="0.25,0.5,0.75,1")
    p.add_argument("--tokens", type=int, default=16, help="max_sequence_length the model was trained with")
    args = p.parse_args()
    pipe = WanPipeline.from_pretrained(args.folder)
    vae, transformer = pipe.vae, pipe.transformer
    clips = shapes_video.draw_clips(80, seed=5, split="heldout")
    x = torch.from_numpy(clips.videos).float().permute(0, 2, 1, 3, 4) * 2 - 1  # [B, 3, F, H, W]
    z0 = normalise(vae, torch.cat([vae.encode(x[i : i + 20]).latent_dist.mean for i in range(0, 80, 20)]))
    embeds, _ = pipe.encode_prompt(clips.prompts, do_classifier_free_guidance=False,
                                   max_sequence_length=args.tokens)
    gen = torch.Generator().manual_seed(0)
    print("| sigma | shape | colour | size | direction | joint |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    for sigma in [float(s) for s in args.sigmas.split(",")]:
        xt = (1 - sigma) * z0 + sigma * torch.randn(z0.shape, generator=gen)
        videos = []
        for i in range(0, 80, 20):
            v = transformer(hidden_states=xt[i : i + 20], timestep=torch.full((20,), sigma * 1000),
                            encoder_hidden_states=embeds[i : i + 20], return_dict=False)[0]
            decoded = vae.decode(denormalise(vae, xt[i : i + 20] - sigma * v)).sample
            videos.append(((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4))
        m = motion_metrics(torch.cat(videos), clips.prompts)
        print(f"| {sigma} | " + " | ".join(f"{float(m['accuracy_' + k]):.1%}"
                                          for k in ("shape", "colour", "size", "direction", "joint")) + " |")


if __name__ == "__main__":
    main()
