"""The recipe that builds `shapes-sd`, the tiny Stable Diffusion pipeline shipped with draft.

`pretrain(out_dir)` runs it end to end, reproducibly from a seed:

1. a word-level `CLIPTokenizer` over the shapes world's vocabulary (one BPE token per word);
2. the attribute classifier that the `shapes-alignment` reward uses (its own module);
3. an `AutoencoderKL` trained to reconstruct renders of the world (32x32 px -> 4x8x8);
4. a `UNet2DConditionModel` and a small `CLIPTextModel`, trained together on the `train`
   split with the usual epsilon-prediction loss under SD's noise schedule, with 10% of
   prompts dropped to "" so classifier-free guidance works;
5. everything saved as an ordinary `StableDiffusionPipeline` folder (safetensors) with a
   DDIM scheduler configured like Stable Diffusion's.

Unlike real SD, the text encoder is trained with the UNet rather than taken from CLIP:
nothing pretrained exists for this vocabulary, and a jointly trained encoder learns what
the UNet needs. The sizes are chosen so that 50-step sampling with guidance of a batch of
4 runs in about half a second on a laptop CPU.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from draft.models import shapes

@dataclass(frozen=True)
class Recipe:
    """Every knob of the pretraining, with the values that built the shipped model."""

    image_size: int = 32  # pixels per side of the world's renders and the model's images
    pool: int = 60_000  # renders of the train split drawn once and reused (VAE and UNet)
    classifier_steps: int = 1500  # optimiser steps of the attribute classifier (batch 128)
    vae_channels: tuple[int, ...] = (16, 32, 32)  # one block each; 3 blocks -> 4x downsampling
    vae_steps: int = 5000  # optimiser steps of the VAE
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5  # small, as in SD: the latents need only be roughly Gaussian
    text_width: int = 64  # CLIPTextModel hidden size = UNet cross-attention width
    text_layers: int = 2
    max_tokens: int = 16  # tokenizer/text-encoder context; prompts take 10 tokens with BOS/EOS
    unet_channels: tuple[int, ...] = (32, 64)  # one cross-attention block per resolution (8x8, 4x4)
    unet_steps: int = 4000  # optimiser steps of UNet + text encoder (see the docs on why not more)
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 500  # linear learning-rate warm-up steps, then cosine decay to 0
    prompt_dropout: float = 0.1  # fraction of prompts replaced by "" (for classifier-free guidance)
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0 turns it off
    ema_decay: float = 0.999  # exponential moving average of UNet/text weights; the EMA is shipped


def quick_recipe() -> Recipe:
    """A few-step recipe for tests: the same architecture trained for seconds (images are noise)."""
    return replace(Recipe(), pool=256, classifier_steps=5, vae_steps=5, unet_steps=5, warmup=2)


@contextlib.contextmanager
def _quiet():
    """Silence diffusers/transformers warnings and save/load progress bars, then restore them."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def build_tokenizer(directory: str | Path, max_tokens: int = 16):
    """A CLIPTokenizer whose vocabulary is the world's words, each a single BPE token."""
    from draft.models.tokenizer import word_tokenizer

    return word_tokenizer(directory, shapes.VOCAB, max_length=max_tokens, specials_first=True)


def build_models(tokenizer, recipe: Recipe):
    """Freshly initialised text encoder, VAE and UNet for `recipe`, and the DDIM scheduler."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_width, intermediate_size=2 * recipe.text_width,
        num_hidden_layers=recipe.text_layers, num_attention_heads=4, max_position_embeddings=recipe.max_tokens,
        projection_dim=recipe.text_width, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    n = len(recipe.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=recipe.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=16, sample_size=recipe.image_size,
    )
    m = len(recipe.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=recipe.image_size // 2 ** (n - 1), in_channels=4, out_channels=4,
        block_out_channels=recipe.unet_channels, layers_per_block=1, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * m, up_block_types=("CrossAttnUpBlock2D",) * m,
        cross_attention_dim=recipe.text_width, attention_head_dim=8,
    )
    return text_encoder, vae, unet, build_scheduler()


def build_scheduler():
    """DDIM with Stable Diffusion 1.x's settings (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))

    return f


def render_pool(n: int, seed: int, size: int, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """`n` renders of a split as uint8 [n, 3, H, W] (to save memory) and their prompts."""
    chunks, texts = [], []
    for i, start in enumerate(range(0, n, 5000)):
        batch = shapes.draw_examples(min(5000, n - start), seed=seed * 1000 + i, split=split, size=size)
        chunks.append(torch.from_numpy(np.round(batch.images * 255).astype(np.uint8)))
        texts += batch.prompts
    return torch.cat(chunks), texts


def train_vae(vae, pool: torch.Tensor, recipe: Recipe, gen: torch.Generator, progress: bool = True):
    """Fit the VAE to reconstruct the pool: L1 + MSE on pixels in [-1, 1] plus a small KL term."""
    from tqdm.auto import tqdm

    params, opt, sched, _ = optimiser([vae], recipe.vae_lr, recipe.warmup // 5, recipe.vae_steps)
    bar = tqdm(range(recipe.vae_steps), desc="vae", disable=not progress)
    for _ in bar:
        x = pool[torch.randint(len(pool), (recipe.vae_batch,), generator=gen)].float() / 127.5 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + recipe.vae_kl_weight * post.kl().mean()
        update(loss, params, opt, sched)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(vae, pool: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pooled image, and set the VAE's latent scaling factor.

    SD scales latents to unit variance (its 0.18215); we measure ours the same way, as
    1 / std of the latents, and store it in the VAE config where the pipeline reads it.
    """
    means, stds = [], []
    for i in range(0, len(pool), batch):
        d = vae.encode(pool[i : i + batch].float() / 127.5 - 1).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    mean, std = torch.cat(means), torch.cat(stds)
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    return mean, std


def optimiser(nets, lr: float, warmup: int, steps: int, weight_decay: float = 0.0, ema_decay: float | None = None):
    """What a pretraining stage trains `nets` with, the nets set to training: (their parameters,
    AdamW, a linear warm-up then cosine schedule, and with `ema_decay` an EMA of the parameters)."""
    from diffusers.training_utils import EMAModel

    params = [p for m in nets for p in m.parameters()]
    for m in nets:
        m.train().requires_grad_(True)
    ema = None if ema_decay is None else EMAModel(params, decay=ema_decay, use_ema_warmup=True, power=3 / 4)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps)), ema


def update(loss: torch.Tensor, params: list, opt, sched, ema=None) -> None:
    """One optimiser step of a pretraining loop: backward, clip to norm 1, step, schedule, EMA (if any)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    if ema is not None:
        ema.step(params)


def train_unet(unet, text_encoder, latents, ids, empty_ids, scheduler, recipe: Recipe, gen, progress=True):
    """Train UNet and text encoder together on (latent, prompt) pairs; leaves the EMA weights in them.

    `latents` is the (mean, std) pair of the VAE posterior of each pooled image, already
    in the UNet's scale; `ids` the token ids of its prompt. The loss is the epsilon-
    prediction MSE, weighted by min(SNR, gamma) / SNR (Min-SNR, Hang et al. 2023, eq. 10),
    which stops the nearly noise-free timesteps from dominating the early training.
    """
    from tqdm.auto import tqdm

    mean, std = latents
    params, opt, sched, ema = optimiser([unet, text_encoder], recipe.unet_lr, recipe.warmup, recipe.unet_steps,
                                        weight_decay=1e-2, ema_decay=recipe.ema_decay)
    abar = scheduler.alphas_cumprod.float()
    device = next(unet.parameters()).device
    bar = tqdm(range(recipe.unet_steps), desc="unet", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(mean), (recipe.unet_batch,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        drop = torch.rand(recipe.unet_batch, generator=gen) < recipe.prompt_dropout
        tokens = torch.where(drop[:, None], empty_ids, ids[idx])
        t = torch.randint(len(abar), (recipe.unet_batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps  # forward process q(z_t | z_0)
        cond = text_encoder(tokens.to(device))[0]  # last hidden state, as the pipeline uses it
        pred = unet(zt.to(device), t.to(device), cond).sample
        snr = a / (1 - a)
        w = (snr.clamp(max=recipe.min_snr_gamma) / snr if recipe.min_snr_gamma > 0 else torch.ones_like(snr)).flatten()
        loss = (w.to(device) * (pred - eps.to(device)).square().mean((1, 2, 3))).mean()
        update(loss, params, opt, sched, ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


def pretrain(
    out_dir: str | Path, seed: int = 0, device: str = "cpu", quick: bool = False,
    recipe: Recipe | None = None, overwrite: bool = False, progress: bool = True,
) -> Path:
    """Build `shapes-sd` and its attribute classifier from scratch; returns the pipeline folder.

    Writes `out_dir/shapes-sd/` (a StableDiffusionPipeline folder, with `recipe.json`
    recording the recipe, seed and stage times) and `out_dir/shapes-classifier/`.
    `quick=True` runs a few steps of each stage (for tests). An existing output folder is
    an error unless `overwrite`, which replaces those two sub-folders only.
    """
    import shutil

    recipe = recipe or (quick_recipe() if quick else Recipe())
    out = Path(out_dir)
    sd_dir, clf_dir = out / "shapes-sd", out / "shapes-classifier"
    for d in (sd_dir, clf_dir):
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{d} exists and is not empty; pass overwrite=True to replace it")
            shutil.rmtree(d)
    with _quiet():
        times = _build(sd_dir, clf_dir, recipe, seed, device, progress)
    info = {"seed": seed, "device": device, "quick": quick, "seconds": times, "recipe": asdict(recipe)}
    (sd_dir / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    return sd_dir


class Laps:
    """Seconds each stage of a pretraining run took, by name (`recipe.json`'s "seconds")."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self._start, 1)
        self._start = now


def _build(sd_dir: Path, clf_dir: Path, recipe: Recipe, seed: int, device: str, progress: bool) -> dict:
    """Run every stage and save the results; returns the seconds each stage took."""
    from diffusers import StableDiffusionPipeline

    from draft.models.shapes_classifier import train_classifier

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    lap = Laps()

    clf = train_classifier(recipe.classifier_steps, seed=seed, pool=min(30_000, recipe.pool), device=device,
                           progress=progress)
    clf.save(clf_dir)
    lap("classifier")
    tokenizer = build_tokenizer(sd_dir / "tokenizer", recipe.max_tokens)
    text_encoder, vae, unet, scheduler = build_models(tokenizer, recipe)
    text_encoder, vae, unet = text_encoder.to(device), vae.to(device), unet.to(device)
    pool, texts = render_pool(recipe.pool, seed, recipe.image_size)
    lap("render")
    train_vae(vae, pool.to(device), recipe, gen, progress)
    mean, std = encode_pool(vae, pool.to(device))
    lap("vae")
    k = vae.config.scaling_factor
    encode = lambda p: tokenizer(p, padding="max_length", max_length=recipe.max_tokens, return_tensors="pt").input_ids
    train_unet(unet, text_encoder, (mean.cpu() * k, std.cpu() * k), encode(texts), encode([""]), scheduler, recipe,
               gen, progress)
    lap("unet")
    pipe = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(sd_dir, safe_serialization=True)
    shapes.write_prompt_files(sd_dir / "prompts")  # the model's own `train` and `heldout` sets
    return lap.times
