"""The recipe that builds `shapes-flow`, the tiny flow-matching (SD3) pipeline shipped with draft.

`pretrain(out_dir)` runs it end to end, reproducibly from a seed:

1. the VAE of `shapes-sd` (reused: the world and its latents are the same), given the
   `shift_factor` of 0 that SD3's pipeline reads, and its latent scale re-measured on the pool
   exactly as `shapes-sd`'s recipe measures it;
2. two word-level `CLIPTokenizer`s (the same vocabulary as `shapes-sd`'s) and two small
   `CLIPTextModelWithProjection` encoders, SD3's `text_encoder`/`text_encoder_2`; no T5
   (`text_encoder_3=None`, which diffusers supports: the pipeline feeds zeros in its place);
3. an `SD3Transformer2DModel` trained together with both text encoders on the `train` split
   by rectified flow: x_t = (1 - sigma) x_0 + sigma eps, velocity target eps - x_0, sigma
   drawn logit-normal as in SD3 (Esser et al. 2024, sec. 3.1), 10% of prompts dropped to ""
   for classifier-free guidance, half of the rest given the empty prompt's pooled embedding
   (so the attributes are read from the tokens and unseen pairs compose), and an EMA of the
   weights (what ships);
4. everything saved as an ordinary `StableDiffusion3Pipeline` folder (safetensors) with a
   `FlowMatchEulerDiscreteScheduler`, plus the train and held-out prompt sets.

The text conditioning is computed in training by the pipeline's own `encode_prompt`, so
the model is trained on exactly what `StableDiffusion3Pipeline.__call__` gives it. That
includes the zeros standing in for T5: `max_sequence_length` of them, none here (recorded as
`max_sequence_length` in `recipe.json`), so the context is the 16 CLIP tokens alone, which
costs a third less than 16 zeros more. Sample with the same number
(`pipe(..., max_sequence_length=0)`): diffusers' default of 256 zero tokens is a context
the model never saw.

The shared pieces (render pool, latent scaling, EMA set-up, learning-rate schedule,
quiet loading) come from `shapes_pretrain`, the recipe of `shapes-sd`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from draft.models import shapes
from draft.models.shapes_pretrain import Laps, _quiet, build_tokenizer, encode_pool, optimiser, render_pool, update

NAME = "shapes-flow"


@dataclass(frozen=True)
class Recipe:
    """Every knob of the pretraining, with the values that built the shipped model."""

    image_size: int = 32  # pixels per side; the reused VAE maps 32x32x3 to 4x8x8 latents
    pool: int = 30_000  # renders of the train split drawn once and reused (each seen ~6 times)
    text_width: int = 64  # hidden size (= projection size) of each of the two CLIP text encoders
    text_layers: int = 2  # SD3 reads the penultimate hidden state; the last layer feeds the pooled output
    max_tokens: int = 16  # CLIP context; prompts take 10 tokens with BOS/EOS
    t5_tokens: int = 0  # zero tokens standing in for T5 (the pipeline's `max_sequence_length`)
    width: int = 96  # transformer inner dim (= heads x head dim = caption projection dim)
    heads: int = 4
    layers: int = 4  # joint (MM-DiT) transformer blocks
    patch_size: int = 2  # 8x8 latents -> 4x4 image tokens
    qk_norm: str | None = "rms_norm"  # as SD3.5: keeps attention logits bounded at a high learning rate
    steps: int = 7200  # optimiser steps of transformer + text encoders
    batch: int = 48
    lr: float = 2e-3
    warmup: int = 500  # linear learning-rate warm-up steps, then cosine decay to 0
    prompt_dropout: float = 0.1  # fraction of prompts replaced by "" (for classifier-free guidance)
    # Fraction of samples whose pooled embedding is replaced by the empty prompt's, so that
    # the text tokens (joint attention), not one global vector per prompt, carry the
    # attributes: without it the model memorised the train split's shape-colour pairs
    # through the pooled vector (docs/shapes-flow.md, "Why pooled dropout").
    pooled_dropout: float = 0.5
    logit_mean: float = 0.0  # sigma = sigmoid(N(logit_mean, logit_std)), SD3's logit-normal sampling
    logit_std: float = 1.0
    ema_decay: float = 0.999  # exponential moving average of the trained weights; the EMA is shipped
    shift: float = 1.0  # the scheduler's timestep shift written into the shipped folder (sampling only)


def quick_recipe() -> Recipe:
    """A few-step recipe for tests: the same architecture trained for seconds (images are noise)."""
    return replace(Recipe(), pool=256, steps=5, warmup=2)


def build_models(tokenizer, recipe: Recipe):
    """Freshly initialised text encoders and transformer for `recipe`, and the flow scheduler."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def text_encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=recipe.text_width, intermediate_size=2 * recipe.text_width,
            num_hidden_layers=recipe.text_layers, num_attention_heads=4, max_position_embeddings=recipe.max_tokens,
            projection_dim=recipe.text_width, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))

    latent = recipe.image_size // 4  # the reused VAE downsamples 4x
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=recipe.patch_size, in_channels=4, out_channels=4,
        num_layers=recipe.layers, attention_head_dim=recipe.width // recipe.heads, num_attention_heads=recipe.heads,
        # The pipeline concatenates the two encoders' hidden states (2 x text_width) and pads
        # them to the T5 width; with no T5, that width is just theirs.
        joint_attention_dim=2 * recipe.text_width, caption_projection_dim=recipe.width,
        pooled_projection_dim=2 * recipe.text_width, pos_embed_max_size=latent // recipe.patch_size,
        qk_norm=recipe.qk_norm,
    )
    return text_encoder(), text_encoder(), transformer, build_scheduler(recipe.shift)


def build_scheduler(shift: float = 1.0):
    """The flow-matching Euler scheduler as SD3 configures it, with `shift`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def load_vae(path: str | Path | None = None):
    """`shapes-sd`'s VAE with SD3's `shift_factor` (0: the latents are only scaled)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path or shapes.PIPELINE_DIR / "vae")
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def flow_batch(mean: torch.Tensor, std: torch.Tensor, texts: list[str], recipe, gen: torch.Generator,
               idx: torch.Tensor | None = None):
    """A rectified-flow training batch drawn from the pool: (x_0, prompts, sigma, eps, x_t).

    x_0 is a posterior sample of `recipe.batch` pooled items (`mean`, `std`; the items `idx`
    where the caller drew them itself, as the first draw from `gen`), each prompt is
    dropped to "" with probability `recipe.prompt_dropout` (for CFG), sigma is logit-normal
    (`recipe.logit_mean`, `recipe.logit_std`), and x_t lies on the straight path from the
    data (sigma 0) to the noise eps (sigma 1). Latents of any rank.
    """
    if idx is None:
        idx = torch.randint(len(mean), (recipe.batch,), generator=gen)
    x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
    drop = torch.rand(recipe.batch, generator=gen) < recipe.prompt_dropout
    prompts = ["" if d else texts[i] for d, i in zip(drop.tolist(), idx.tolist())]
    sigma = torch.sigmoid(recipe.logit_mean + recipe.logit_std * torch.randn(recipe.batch, generator=gen))
    eps = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    return x0, prompts, sigma, eps, (1 - s) * x0 + s * eps


def train_flow(pipe, latents, texts: list[str], recipe: Recipe, gen: torch.Generator, progress: bool = True):
    """Train the transformer and both text encoders of `pipe`; leaves the EMA weights in them.

    `latents` is the (mean, std) pair of the VAE posterior of each pooled image, already
    scaled as the pipeline scales them; `texts` its prompt.
    """
    from tqdm.auto import tqdm

    mean, std = latents
    nets = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
    params, opt, sched, ema = optimiser(nets, recipe.lr, recipe.warmup, recipe.steps, weight_decay=1e-2,
                                        ema_decay=recipe.ema_decay)
    device = next(pipe.transformer.parameters()).device
    bar = tqdm(range(recipe.steps), desc="transformer", disable=not progress)
    for _ in bar:
        x0, prompts, sigma, eps, xt = flow_batch(mean, std, texts, recipe, gen)
        # The pipeline's own prompt encoding (with gradient: the encoders train too).
        cond, _, pooled, _ = pipe.encode_prompt(
            prompts, prompts, None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=recipe.t5_tokens,
        )
        if recipe.pooled_dropout > 0:
            keep = torch.rand(recipe.batch, generator=gen) >= recipe.pooled_dropout
            _, _, empty, _ = pipe.encode_prompt([""], [""], None, device=device, do_classifier_free_guidance=False,
                                                max_sequence_length=recipe.t5_tokens)
            pooled = torch.where(keep.to(device)[:, None], pooled, empty)
        pred = pipe.transformer(
            hidden_states=xt.to(device), timestep=(sigma * 1000).to(device), encoder_hidden_states=cond,
            pooled_projections=pooled,
        ).sample
        loss = (pred - (eps - x0).to(device)).square().mean()  # velocity dx_t/dsigma = eps - x_0
        update(loss, params, opt, sched, ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    for m in nets:
        m.eval().requires_grad_(False)


def pretrain(
    out_dir: str | Path, seed: int = 0, device: str = "cpu", quick: bool = False,
    recipe: Recipe | None = None, overwrite: bool = False, progress: bool = True, vae: str | Path | None = None,
) -> Path:
    """Build `shapes-flow` from scratch (reusing `shapes-sd`'s VAE); returns the pipeline folder.

    Writes `out_dir/shapes-flow/`: a StableDiffusion3Pipeline folder, `recipe.json` (the
    recipe, seed, stage times and the `max_sequence_length` to sample with) and
    `prompts/train.txt`, `prompts/heldout.txt`. `vae` is the VAE folder to reuse (default:
    the shipped shapes-sd's). An existing, non-empty output folder is an error unless `overwrite`.
    """
    recipe = recipe or (quick_recipe() if quick else Recipe())
    out = Path(out_dir) / NAME
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out)
    with _quiet():
        times = _build(out, recipe, seed, device, progress, vae)
    info = {"seed": seed, "device": device, "quick": quick, "seconds": times,
            "max_sequence_length": recipe.t5_tokens, "recipe": asdict(recipe)}
    (out / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    write_prompt_sets(out)
    return out


def write_prompt_sets(folder: Path) -> None:
    """The world's train and held-out prompts, one a line, in `folder/prompts/`."""
    (folder / "prompts").mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout"):
        (folder / "prompts" / f"{split}.txt").write_text("\n".join(shapes.prompts(split)) + "\n")


def _build(out: Path, recipe: Recipe, seed: int, device: str, progress: bool, vae_dir) -> dict:
    """Run every stage and save the pipeline; returns the seconds each stage took."""
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    lap = Laps()

    tokenizer = build_tokenizer(out / "tokenizer", recipe.max_tokens)
    tokenizer_2 = build_tokenizer(out / "tokenizer_2", recipe.max_tokens)
    text_encoder, text_encoder_2, transformer, scheduler = build_models(tokenizer, recipe)
    vae = load_vae(vae_dir).to(device)
    pool, texts = render_pool(recipe.pool, seed, recipe.image_size)
    lap("render")
    mean, std = encode_pool(vae, pool.to(device))  # sets the VAE's scaling factor, as for shapes-sd
    del pool
    lap("encode")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.to(device), scheduler=scheduler, vae=vae,
        text_encoder=text_encoder.to(device), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.to(device), tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None,
    )
    k = vae.config.scaling_factor
    train_flow(pipe, (mean.cpu() * k, std.cpu() * k), texts, recipe, gen, progress)
    lap("transformer")
    pipe.to("cpu").save_pretrained(out, safe_serialization=True)
    return lap.times
