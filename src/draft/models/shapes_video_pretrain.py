"""The recipe that builds `shapes-video`, a tiny Wan text-to-video pipeline of the moving-shapes world.

`pretrain(out_dir)` runs it end to end, reproducibly from a seed:

1. a T5 tokenizer in which every word of the world is one token (`t5_word_tokenizer`, the
   kind the tiny Wan test pipelines use) and a small `UMT5EncoderModel`, the class of Wan's
   text encoder;
2. an `AutoencoderKLWan` (Wan 2.1's causal video VAE, here with two downsamplings: 4x in
   time as Wan, 4x in space where Wan has 8x, so a clip's shapes keep 8x8 latents) trained
   to reconstruct clips of the world (`draft.models.shapes_video`), the pixels the shape
   covers weighted above the background's, whose per-channel
   `latents_mean` and `latents_std` are then measured on the pool and written into its
   config, where `WanPipeline` reads them (the real Wan's are measured the same way);
3. a `WanTransformer3DModel` trained together with the text encoder on the `train` split
   by rectified flow: x_t = (1 - sigma) x_0 + sigma eps, velocity target eps - x_0 (what
   Wan predicts), sigma drawn logit-normal (Esser et al. 2024, sec. 3.1), 10% of prompts
   dropped to "" for classifier-free guidance, and an EMA of the weights (what ships);
4. everything saved as an ordinary `WanPipeline` folder (safetensors) with the UniPC
   flow scheduler the real Wan folders ship (`flow_shift` from the recipe), plus the
   train and held-out prompt sets and `recipe.json`.

The text conditioning is the pipeline's own `encode_prompt` (UMT5 states of the real
tokens, zero-padded to `max_sequence_length`), run with gradient so the encoder trains.
The context is `max_tokens` long (recorded as `max_sequence_length` in `recipe.json`):
sample with that number, not WanPipeline's default of 512 zero-padded tokens, a context
the model never saw.

The shared pieces (learning-rate schedule, optimiser step, stage timer, quiet loading)
come from `shapes_pretrain`, the recipe of `shapes-sd`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from draft.models import shapes_video
from draft.models.shapes_flow_pretrain import flow_batch
from draft.models.shapes_pretrain import Laps, _quiet, optimiser, update

NAME = "shapes-video"


@dataclass(frozen=True)
class Recipe:
    """Every knob of the pretraining. The values are a starting point at CPU scale; the
    shipped model's `recipe.json` records the ones that built it."""

    image_size: int = 32  # pixels per side; 4x spatial compression -> 8x8 latents
    frames: int = 9  # 1 + 4k frames; 4x temporal compression -> 3 latent frames
    pool: int = 8000  # clips of the train split drawn once and reused (uint8: ~28 KB each)
    vae_width: int = 8  # AutoencoderKLWan base_dim (half of it costs half the time per step: docs/shapes-video.md)
    # One level per halving of the side: two -> 4x, 8x8 latents. Wan's three (8x, 4x4 latents)
    # left the world's shapes at chance after 3000 steps (docs/shapes-video.md).
    vae_mult: tuple[int, ...] = (1, 2, 2)
    # Which downsamplings also halve time: both -> 4x, Wan's own. Halving once (5 latent frames)
    # reconstructed about as well after 1000 steps at 1.25x the VAE's and 1.7x the transformer's tokens.
    vae_temporal: tuple[bool, ...] = (True, True)
    vae_foreground: float = 4.0  # extra weight of the pixels the shape covers in the VAE's loss
    z_dim: int = 16  # latent channels (Wan's 16; the transformer's in/out channels)
    vae_steps: int = 3000  # many small steps: this VAE learns in updates more than in samples per update
    vae_batch: int = 4
    vae_frames: int = 9  # frames of a clip per VAE example (1 + 4k, `_window`); fewer left the last chunk unlearnt
    vae_lr: float = 4e-3  # after 1000 steps: shapes 64% right where 2e-3 drew 46% (docs/shapes-video.md)
    vae_kl_weight: float = 1e-5  # small, as in SD and Wan: the latents need only be roughly Gaussian
    text_width: int = 64  # UMT5 d_model = the transformer's text_dim
    text_layers: int = 2
    max_tokens: int = 16  # the text context (`max_sequence_length`); prompts take 11 tokens with </s>
    width: int = 96  # transformer inner dim (= heads x head dim)
    patch: int = 2  # latents per token side: 2 -> 4x4 tokens a latent frame (4 times fewer than 1)
    heads: int = 4
    layers: int = 4
    steps: int = 6000  # optimiser steps of transformer + text encoder
    batch: int = 48  # shapes-flow's; 32 at lr 1e-3 left the base model at chance on shape and motion
    lr: float = 2e-3
    warmup: int = 500  # linear learning-rate warm-up steps, then cosine decay to 0
    prompt_dropout: float = 0.1  # fraction of prompts replaced by "" (for classifier-free guidance)
    logit_mean: float = 0.0  # sigma = sigmoid(N(logit_mean, logit_std)), SD3's logit-normal sampling
    logit_std: float = 1.0
    # Extra weight of the latents a shape touches in the transformer's loss, as the VAE's
    # `vae_foreground` (unweighted, the loss is mostly the background's). 0 built the shipped
    # model; 4 drew colour and motion better and shapes no better (docs/shapes-video.md).
    foreground: float = 0.0
    ema_decay: float = 0.999  # exponential moving average of the trained weights; the EMA is shipped
    shift: float = 1.0  # the scheduler's flow_shift written into the folder (sampling only)


def quick_recipe() -> Recipe:
    """A few-step recipe for tests: a narrower architecture trained for seconds."""
    return replace(Recipe(), pool=24, vae_steps=3, vae_frames=5, text_width=32, width=32, heads=2, layers=1, steps=3,
                   batch=4, warmup=1)


def build_models(recipe: Recipe):
    """(tokenizer, text encoder, VAE, transformer, scheduler), freshly initialised."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from draft.models.tiny_wan import WAN_SCHEDULER_CONFIG
    from draft.models.tokenizer import t5_word_tokenizer

    tokenizer = t5_word_tokenizer(shapes_video.VOCAB, max_length=recipe.max_tokens)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=recipe.text_width, d_kv=recipe.text_width // 4, d_ff=2 * recipe.text_width,
        num_layers=recipe.text_layers, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKLWan(
        base_dim=recipe.vae_width, z_dim=recipe.z_dim, dim_mult=list(recipe.vae_mult), num_res_blocks=1,
        temperal_downsample=list(recipe.vae_temporal), latents_mean=[0.0] * recipe.z_dim,
        latents_std=[1.0] * recipe.z_dim,
        # What WanPipeline and draft read the latent shape from (its defaults are Wan's 4 and 8).
        scale_factor_temporal=2 ** sum(recipe.vae_temporal), scale_factor_spatial=2 ** len(recipe.vae_temporal),
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, recipe.patch, recipe.patch), num_attention_heads=recipe.heads,
        attention_head_dim=recipe.width // recipe.heads,
        in_channels=recipe.z_dim, out_channels=recipe.z_dim, text_dim=recipe.text_width, freq_dim=256,
        ffn_dim=2 * recipe.width, num_layers=recipe.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    scheduler = UniPCMultistepScheduler.from_config({**WAN_SCHEDULER_CONFIG, "flow_shift": recipe.shift})
    return tokenizer, text_encoder, vae, transformer, scheduler


def render_pool(n: int, seed: int, recipe: Recipe, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """`n` clips of a split as uint8 [n, F, 3, H, W] (to save memory) and their prompts."""
    chunks, texts = [], []
    for i, start in enumerate(range(0, n, 1000)):
        batch = shapes_video.draw_clips(min(1000, n - start), seed=seed * 1000 + i, split=split,
                                        frames=recipe.frames, size=recipe.image_size)
        chunks.append(torch.from_numpy(np.round(batch.videos * 255).astype(np.uint8)))
        texts += batch.prompts
    return torch.cat(chunks), texts


def _pixels(clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips [B, F, 3, H, W] as the VAE's input: float [B, 3, F, H, W] in [-1, 1]."""
    return (clips.float() / 127.5 - 1).permute(0, 2, 1, 3, 4)


def _window(clips: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    """`recipe.vae_frames` consecutive frames of the clips, from one random start.

    The causal VAE codes frame 0 alone and then chunks of 4 frames, each chunk seeing the
    one before through its cache, so a 1 + 4k-frame window trains the same weights as a
    whole clip at a fraction of the cost; a random start shows every stage of the motion.
    """
    start = int(torch.randint(clips.shape[1] - recipe.vae_frames + 1, (1,), generator=gen))
    return clips[:, start : start + recipe.vae_frames]


def _foreground(x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel of clips [B, 3, F, H, W] in [-1, 1] differs from its frame's background
    (the border's median: every shape keeps a pixel of background around it), else 0.

    The shape covers a few percent of a frame; unweighted, the loss is the background's, and
    a VAE that draws a blob of the right colour scores almost as well as one that draws the shape.
    """
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], -1)
    background = border.median(-1).values[..., None, None]
    # Any two world colours differ by at least 0.47 in some channel, jitter included.
    return ((x - background).abs().amax(1, keepdim=True) > 0.1).to(x.dtype)


def train_vae(vae, pool: torch.Tensor, recipe: Recipe, gen: torch.Generator, progress: bool = True) -> list[float]:
    """Fit the VAE to reconstruct the pool's clips: L1 + MSE on pixels plus a small KL term,
    the pixels of the shape weighted 1 + `vae_foreground` (`_foreground`). Returns the loss
    of every step."""
    from tqdm.auto import tqdm

    params, opt, sched, _ = optimiser([vae], recipe.vae_lr, max(1, recipe.warmup // 5), recipe.vae_steps)
    device = next(vae.parameters()).device
    losses = []
    bar = tqdm(range(recipe.vae_steps), desc="vae", disable=not progress)
    for _ in bar:
        clips = pool[torch.randint(len(pool), (recipe.vae_batch,), generator=gen)]
        x = _pixels(_window(clips, recipe, gen)).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        err = ((rec - x).abs() + (rec - x).square()) * (1 + recipe.vae_foreground * _foreground(x))
        loss = err.mean() + recipe.vae_kl_weight * post.kl().mean()
        update(loss, params, opt, sched)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_pool(vae, pool: torch.Tensor, batch: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pooled clip, normalised as the pipeline normalises them,
    after writing the VAE's per-channel `latents_mean` and `latents_std` into its config.

    The statistics are those of the posterior samples the transformer trains on (the spread
    of the means plus the posterior variance), so its targets have unit variance per channel.
    """
    from draft.models.wan import normalise

    device = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, len(pool), batch):
        d = vae.encode(_pixels(pool[i : i + batch]).to(device)).latent_dist
        means.append(d.mean.cpu())
        stds.append(d.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    per_channel = mean.transpose(0, 1).flatten(1)  # [C, N * F * H * W]
    spread = (per_channel.var(1) + std.transpose(0, 1).flatten(1).square().mean(1)).sqrt()
    vae.register_to_config(latents_mean=per_channel.mean(1).tolist(), latents_std=spread.tolist())
    scale = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return normalise(vae, mean), std / scale


def latent_foreground(pool: torch.Tensor, vae, batch: int = 500) -> torch.Tensor:
    """Which latents of each pooled clip the shape touches: [N, 1, F', H', W'] of 0 and 1.

    The causal VAE codes frame 0 alone and then each run of `scale_factor_temporal` frames
    into one latent frame, and each `scale_factor_spatial` square of pixels into one latent.
    """
    t, s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    masks = []
    for i in range(0, len(pool), batch):
        fg = _foreground(_pixels(pool[i : i + batch]))  # [B, 1, F, H, W]
        fg = torch.cat([fg[:, :, :1], fg[:, :, 1:].unflatten(2, (-1, t)).amax(3)], 2)
        masks.append(torch.nn.functional.max_pool3d(fg, (1, s, s)))
    return torch.cat(masks)


def train_transformer(pipe, latents, texts: list[str], recipe: Recipe, gen: torch.Generator,
                      progress: bool = True, foreground: torch.Tensor | None = None) -> list[float]:
    """Train the transformer and the text encoder of `pipe` by rectified flow; leaves the EMA
    weights in them and returns the loss of every step.

    `latents` is the (mean, std) pair of the normalised VAE posterior of each pooled clip,
    `texts` its prompt, `foreground` its `latent_foreground` (weighted by `recipe.foreground`).
    """
    from tqdm.auto import tqdm

    mean, std = latents
    if foreground is None:
        foreground = torch.zeros(len(mean), 1, *mean.shape[2:])
    nets = (pipe.transformer, pipe.text_encoder)
    params, opt, sched, ema = optimiser(nets, recipe.lr, recipe.warmup, recipe.steps, weight_decay=1e-2,
                                        ema_decay=recipe.ema_decay)
    device = next(pipe.transformer.parameters()).device
    losses = []
    bar = tqdm(range(recipe.steps), desc="transformer", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(mean), (recipe.batch,), generator=gen)
        x0, prompts, sigma, eps, xt = flow_batch(mean, std, texts, recipe, gen, idx)
        weight = (1 + recipe.foreground * foreground[idx]).to(device)
        # The pipeline's own prompt encoding (with gradient: the encoder trains too).
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                       max_sequence_length=recipe.max_tokens, device=device)
        pred = pipe.transformer(hidden_states=xt.to(device), timestep=(sigma * 1000).to(device),
                                encoder_hidden_states=embeds, return_dict=False)[0]
        loss = ((pred - (eps - x0).to(device)).square() * weight).mean()  # velocity dx_t/dsigma = eps - x_0
        update(loss, params, opt, sched, ema)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    for m in nets:
        m.eval().requires_grad_(False)
    return losses


def pretrain(out_dir: str | Path, seed: int = 0, device: str = "cpu", quick: bool = False,
             recipe: Recipe | None = None, overwrite: bool = False, progress: bool = True,
             vae_from: str | Path | None = None) -> Path:
    """Build `shapes-video` from scratch; returns the pipeline folder.

    Writes `out_dir/shapes-video/`: a WanPipeline folder, `recipe.json` (the recipe, seed,
    stage times, final losses and the `max_sequence_length` to sample with) and
    `prompts/train.txt`, `prompts/heldout.txt`. `quick=True` runs a few steps of a narrower
    model (for tests). An existing, non-empty output folder is an error unless `overwrite`.
    `vae_from`, a pipeline folder this recipe and seed built, reuses its VAE in place of the
    VAE stage (most of the time): each later stage draws from its own seeded generators, so
    the transformer comes out as a whole build would make it.
    """
    recipe = recipe or (quick_recipe() if quick else Recipe())
    out = Path(out_dir) / NAME
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out)
    with _quiet():
        times, losses = _build(out, recipe, seed, device, progress, vae_from)
    info = {"seed": seed, "device": device, "quick": quick, "seconds": times, "final_loss": losses,
            "vae_from": None if vae_from is None else str(vae_from),
            "max_sequence_length": recipe.max_tokens, "recipe": asdict(recipe)}
    (out / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    shapes_video.write_prompt_files(out / "prompts")  # the model's own `train` and `heldout` sets
    return out


def _build(out: Path, recipe: Recipe, seed: int, device: str, progress: bool,
           vae_from: str | Path | None = None) -> tuple[dict, dict]:
    """Run every stage and save the pipeline; returns the seconds each stage took and the
    last losses (means over the last tenth of each stage's steps)."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    lap = Laps()
    tokenizer, text_encoder, vae, transformer, scheduler = build_models(recipe)
    pool, texts = render_pool(recipe.pool, seed, recipe)
    lap("render")
    if vae_from is None:
        vae_losses = train_vae(vae.to(device), pool, recipe, torch.Generator().manual_seed(seed), progress)
    else:
        from diffusers import AutoencoderKLWan

        vae, vae_losses = AutoencoderKLWan.from_pretrained(Path(vae_from) / "vae").to(device), []
    latents = encode_pool(vae, pool)
    foreground = latent_foreground(pool, vae)
    del pool
    lap("vae")
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.to(device), vae=vae, scheduler=scheduler,
                       transformer=transformer.to(device))
    # Its own seeds: the stage draws the same numbers whether the VAE was trained or reused.
    torch.manual_seed(seed + 1)
    flow_losses = train_transformer(pipe, latents, texts, recipe, torch.Generator().manual_seed(seed + 1), progress,
                                    foreground)
    lap("transformer")
    pipe.to("cpu").save_pretrained(out, safe_serialization=True)

    def tail(losses):
        return round(float(np.mean(losses[-max(1, len(losses) // 10):])), 5)

    return lap.times, {"vae": tail(vae_losses) if vae_losses else None, "transformer": tail(flow_losses)}
