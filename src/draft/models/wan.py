"""Wan 2.1 / 2.2 text-to-video: a diffusers `WanPipeline` (`Wan`, the adapter, at the end).

A 3-D transformer over [B, 16, f, h, w] latents (1x2x2 patches), a UMT5 text encoder, the
causal video VAE `AutoencoderKLWan`, classifier-free guidance with a negative prompt, and
rectified flow. Wan 2.2 A14B has two experts: `transformer` for the high-noise steps and
`transformer_2` for the low-noise ones, switched at `boundary_ratio`, each with its own
guidance scale. The pieces:

- the latent normalisation and the decode, exactly as `WanPipeline.__call__` ends;
- partial decoding: only the output frames a reward looks at, and only the latent frames
  those need (Wan's VAE is causal in time);
- which expert of a Wan 2.2 A14B pipeline runs a step;
- the original (Wan / ComfyUI) names of the transformer's layers, and a LoRA file in the
  keys ComfyUI reads for Wan that diffusers reads too.

The folders ship a UniPC multistep scheduler configured for flow matching; draft samples
with first-order Euler steps on that scheduler's own sigmas (`draft.sampling.Schedule`),
so its samples differ from the pipeline's by the solver's order, not by the schedule.

Facts from diffusers 0.42 that the code below relies on (pipelines/wan/pipeline_wan.py,
models/autoencoders/autoencoder_kl_wan.py):

- latents are [B, 16, (F - 1) // 4 + 1, H // 8, W // 8] (`vae_scale_factor_temporal`,
  `vae_scale_factor_spatial` from the VAE config); F = 4k + 1 frames.
- `AutoencoderKLWan._decode` runs the decoder one latent frame at a time with a cache of
  each causal convolution's last inputs: latent frame 0 gives output frame 0, latent
  frame j > 0 gives output frames 4j - 3 .. 4j, and nothing reads a later latent frame.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from draft.errors import UserError
from draft.models import meta
from draft.models.base import PipelineAdapter, Size
from draft.models.base import meta as empty

# --- normalisation and decoding ------------------------------------------------------------


def _stats(vae, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latents_mean and latents_std, shaped [1, C, 1, 1, 1]."""
    cfg = vae.config
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean).view(shape).to(latents.device, latents.dtype)
    std = torch.tensor(cfg.latents_std).view(shape).to(latents.device, latents.dtype)
    return mean, std


def denormalise(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's input for latents as the transformer sees them: z = x · std + mean, per channel.

    Written as the pipeline writes it (divide by the reciprocal of std), so the result is
    the pipeline's to the last bit, not only to rounding.
    """
    mean, std = _stats(vae, latents)
    return latents / (1.0 / std) + mean


def normalise(vae, z: torch.Tensor) -> torch.Tensor:
    """The inverse of `denormalise`: (z - mean) / std, as the Wan image/video-to-video
    pipelines normalise encoded latents."""
    mean, std = _stats(vae, z)
    return (z - mean) * (1.0 / std)


def output_frames(vae, latent_frames: int) -> int:
    """Number of video frames `latent_frames` latent frames decode to: 1 + 4 (n - 1)."""
    return 1 + vae.config.scale_factor_temporal * (latent_frames - 1)


def latent_frame(vae, frame: int) -> int:
    """The latent frame output frame `frame` is decoded from: ceil(frame / 4)."""
    t = vae.config.scale_factor_temporal
    return (frame + t - 1) // t


def _decoder_chunk(vae, x: torch.Tensor, first: bool, *cache):
    """One latent frame through the causal decoder: (its frames, the causal cache after it)."""
    cache = list(cache)
    out = vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first)
    return (out, *cache)


def _decode_by_frame(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z)` (untiled, clamped to [-1, 1]) with each latent frame's decoder pass
    checkpointed apart.

    Written out because `AutoencoderKLWan._decode` keeps its causal cache in the module
    (`_feat_map`), which a checkpoint cannot replay; here the cache goes in and out of each
    frame's pass, so the backward recomputes one latent frame at a time: the decode's
    activations shrink by about the number of latent frames, and the values and gradients
    are those of the plain decode (tests/test_wan_parts.py).
    """
    x = vae.post_quant_conv(z)
    cache = [None] * vae._cached_conv_counts["decoder"]
    outs = []
    for i in range(x.shape[2]):
        out, *cache = meta.checkpointed(_decoder_chunk, vae, x[:, :, i:i + 1], i == 0, *cache)
        outs.append(out)
    out = torch.cat(outs, 2)
    if vae.config.patch_size is not None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out.clamp(-1.0, 1.0)


def decode_frames(vae, z: torch.Tensor, frames: Sequence[int] | None = None,
                  by_frame: bool = False) -> torch.Tensor:
    """Video frames [B, F', 3, H, W] in [0, 1] from VAE-space latents z [B, C, f, h, w].

    `z` is already denormalised (see `denormalise`). `frames` picks output frames (indices
    into the 1 + 4 (f - 1) frames of the full decode, any order); None decodes them all.
    Only the latent prefix the last wanted frame needs is decoded: because the decoder is
    causal, decoding z[:, :, :n] gives the first 1 + 4 (n - 1) frames of the full decode
    (bit for bit in float64; in float32 to the rounding of the 1x1x1 post-quant convolution,
    which runs over all frames at once), and latent frames after the prefix get no gradient
    (tests/test_wan_parts.py). A late frame cannot be decoded on its own: through the
    causal cache it depends on the latent frames before it, and decoding them from the
    middle restarts the cache as at a first frame, so asking for the last frame costs a
    full decode.

    Differentiable in z; the VAE's clamp to [-1, 1] and the pipelines' postprocessing
    ((x + 1) / 2, clamped) are applied as `WanPipeline` applies them. `by_frame` checkpoints
    each latent frame's decoder pass (`_decode_by_frame`).
    """
    f = z.shape[2]
    total = output_frames(vae, f)
    if frames is None:
        wanted, n = list(range(total)), f
    else:
        wanted = [int(i) for i in frames]
        if not wanted:
            raise ValueError("frames is empty; pass None for all frames")
        bad = [i for i in wanted if not 0 <= i < total]
        if bad:
            raise ValueError(f"frame {bad[0]} is out of range: {f} latent frames decode to {total} frames")
        n = latent_frame(vae, max(wanted)) + 1
    z = z[:, :, :n].to(vae.dtype)
    video = _decode_by_frame(vae, z) if by_frame else vae.decode(z, return_dict=False)[0]  # [B, 3, F_n, H, W] in [-1, 1]
    if frames is not None:
        video = video[:, :, wanted]
    return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)


def decode_video(vae, latents: torch.Tensor, frames: Sequence[int] | None = None,
                 by_frame: bool = False) -> torch.Tensor:
    """What `WanPipeline(..., output_type="pt")` returns for final latents, [B, F, 3, H, W] in
    [0, 1] (optionally only `frames`): denormalise, decode, postprocess."""
    return decode_frames(vae, denormalise(vae, latents.to(vae.dtype)), frames, by_frame)


# --- the schedule ---------------------------------------------------------------------------


def expert(timestep: float, boundary_ratio: float | None, num_train_timesteps: int = 1000) -> int:
    """Which transformer `WanPipeline` runs at `timestep`: 0 (`transformer`, the high-noise expert)
    when there is no boundary or t >= boundary_ratio · num_train_timesteps, else 1 (`transformer_2`)."""
    if boundary_ratio is None or timestep >= boundary_ratio * num_train_timesteps:
        return 0
    return 1


# --- original (Wan / ComfyUI) layer names -----------------------------------------------------

# diffusers' WanTransformer3DModel path -> the original Wan module path (wan/modules/model.py,
# which ComfyUI's comfy/ldm/wan/model.py keeps). The inverse of the renames in diffusers'
# loaders/single_file_utils.py `convert_wan_transformer_to_diffusers`.
_BLOCK_LAYERS = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",  # image-to-video
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_TOP_LAYERS = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",  # image-to-video
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def original_name(module: str) -> str:
    """The original Wan name of a WanTransformer3DModel layer ("blocks.0.attn1.to_q" ->
    "blocks.0.self_attn.q"); UserError for a layer that has none here."""
    m = _BLOCK.fullmatch(module)
    if m and m.group(2) in _BLOCK_LAYERS:
        return f"blocks.{m.group(1)}.{_BLOCK_LAYERS[m.group(2)]}"
    name = _TOP_LAYERS.get(module)
    if name is None:
        raise UserError(f"no original Wan name is known for the transformer layer {module!r}")
    return name


def comfyui_state_dict(down: dict[str, torch.Tensor], up: dict[str, torch.Tensor],
                       scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """A Wan LoRA in original names, ``diffusion_model.<name>.lora_A.weight`` / ``.lora_B.weight``
    (+ ``.alpha``), which ComfyUI reads for Wan models and diffusers'
    `WanPipeline.load_lora_weights` reads through `_convert_non_diffusers_wan_lora_to_diffusers`.

    `down`/`up`/`scales` are by diffusers module path (as `draft.export.read_lora` gives
    them); applied at strength 1 the file adds scales[m] · up @ down to each layer.

    ComfyUI (comfy/lora.py) maps ``diffusion_model.<key of its Wan state dict>`` to the
    layer and applies up @ down · alpha / rank, or 1 without an alpha. diffusers' converter
    reads ``.alpha`` only in the blocks; for the embeddings and the head it would leave
    the alpha key unread and refuse the file. So block layers carry alpha = scale · rank
    (the trained alpha, as kohya files do), the others have the scale folded into up.
    """
    if set(down) != set(up) or set(down) != set(scales):
        raise ValueError("down, up and scales must name the same layers")
    if not any(_BLOCK.fullmatch(m) for m in down):
        # The converter numbers the blocks from the file's keys and fails with none.
        raise UserError("diffusers cannot read a Wan LoRA that adapts no transformer block")
    out: dict[str, torch.Tensor] = {}
    for module in sorted(down):
        if module == "patch_embedding":
            raise UserError("diffusers' Wan LoRA converter has no rule for patch_embedding; "
                            "the ComfyUI format cannot carry that layer")
        key = "diffusion_model." + original_name(module)
        a, b, scale = down[module], up[module], float(scales[module])
        out[f"{key}.lora_A.weight"] = a.contiguous()
        if _BLOCK.fullmatch(module):
            out[f"{key}.lora_B.weight"] = b.contiguous()
            out[f"{key}.alpha"] = torch.tensor(scale * a.shape[0], dtype=torch.float32)
        else:
            out[f"{key}.lora_B.weight"] = (b * scale).contiguous()
    return out


def export_comfyui(lora, base: str, scale: float, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`draft export --format comfyui` for a Wan LoRA (`comfyui_state_dict`)."""
    scales = {m: lora.scales[m] * scale for m in lora.down}
    return comfyui_state_dict(lora.down, lora.up, scales), {"format": "pt"}


# --- the adapter ----------------------------------------------------------------------------------


class Wan(PipelineAdapter):
    """Wan 2.1 T2V (1.3B, 14B) and Wan 2.2 A14B (two experts) behind the draft protocol."""

    pipeline_class = "WanPipeline"
    family_name = "Wan"
    lora_prefix = "transformer"
    # The attention projections of every block's self- and cross-attention (attn1, attn2),
    # what diffusers' and VideoX-Fun's Wan LoRA scripts adapt.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    defaults = {
        "sampling.num_steps": (50, "WanPipeline's default"),
        "sampling.guidance_scale": (5.0, "WanPipeline's default"),
        "sampling.frames": (81, "WanPipeline's default (5 s at 16 fps)"),
        "log.eval_samples": (8, "a video evaluation is costly; 8 fixed seeds show the trend"),
    }
    fps = 16  # Wan's own frame rate (its pipelines' export_to_video examples)
    export_formats = {"comfyui": "draft.models.wan:export_comfyui"}
    call_options = ("max_sequence_length",)
    # The native size: WanPipeline's defaults (480p); the folders do not record one.
    height, width, frames = 480, 832, 81
    # UMT5 tokens per prompt; the transformer attends to the zero padding too, so the
    # length changes the result (WanPipeline.__call__'s default).
    max_sequence_length = 512
    # Wan 2.2 A14B: which expert carries the LoRA. "low" (transformer_2, the low-noise
    # steps) by default: the DRaFT-K, DRaFT-LV and ReFL windows fall there.
    lora_expert = "low"

    def setup(self, pipe, name: str, metrics, options: dict) -> None:
        super().setup(pipe, name, metrics, options)
        if self.lora_expert not in ("low", "high"):
            raise UserError(f"{name}: lora_expert must be 'low' or 'high', got {self.lora_expert!r}")
        self.boundary = pipe.config.get("boundary_ratio") if pipe.transformer_2 is not None else None
        if self.boundary is not None and self.lora_expert == "low":
            self.denoiser, self.other = pipe.transformer_2, pipe.transformer
            self.weight_dtype = next(self.denoiser.parameters()).dtype
        else:
            self.other = pipe.transformer_2

    @classmethod
    def pipeline_kwargs(cls, sampling: dict, options: dict) -> dict:
        kwargs = super().pipeline_kwargs(sampling, options)
        if sampling.get("frames"):
            kwargs["num_frames"] = sampling["frames"]
        if sampling.get("guidance_scale_2") is not None:
            kwargs["guidance_scale_2"] = sampling["guidance_scale_2"]
        return kwargs

    @property
    def denoiser_config(self):
        return self.pipe.transformer.config

    @property
    def native_size(self) -> Size:
        return Size(self.height, self.width, self.frames)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.scale_factor_spatial

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.denoiser_config.patch_size[-1]

    def check_frames(self, frames: int) -> None:
        t = self.vae.config.scale_factor_temporal
        if frames % t != 1:
            raise UserError(f"{self.name}: videos have {t}k + 1 frames (the VAE's {t}x compression in time), "
                            f"got {frames}; e.g. {frames // t * t + 1}")

    def latent_shape(self, size: Size = Size()) -> tuple[int, ...]:
        size, f = self.size(size), self.vae_scale_factor
        return (self.vae.config.z_dim, (size.frames - 1) // self.vae.config.scale_factor_temporal + 1,
                size.height // f, size.width // f)

    def guidance(self, scale: float, scale_2: float | None):
        """The guidance scale of each step: Wan 2.2's low-noise expert has its own
        (`guidance_scale_2`, the first scale where not given, as in WanPipeline), and
        guidance is on or off for both by the first alone."""
        if self.boundary is None or scale_2 is None or scale == 1:
            return scale
        boundary = self.boundary * self.scheduler_config.get("num_train_timesteps", 1000)
        return lambda t: scale if float(t) >= boundary else scale_2

    def guided_passes(self, scale: float) -> int:
        return 2 if scale > 1 else 1  # as `conditioning` decides

    @torch.no_grad()
    def conditioning(self, prompts: list[str], guidance_scale: float = 5.0, size: Size = Size(),
                     negative_prompt: str = ""):
        """({embeds}, the negative prompt's or None): UMT5 states of the real tokens, padded with
        zeros to `max_sequence_length`, as the pipeline encodes them."""
        prompts = list(prompts)
        embeds, negative = self.pipe.encode_prompt(
            prompts, [negative_prompt] * len(prompts), do_classifier_free_guidance=guidance_scale > 1,
            num_videos_per_prompt=1, max_sequence_length=self.max_sequence_length, device=self.device,
        )
        return {"embeds": embeds}, (None if guidance_scale <= 1 else {"embeds": negative})

    def meta_conditioning(self, batch: int, dtype: torch.dtype):
        return {"embeds": empty(batch, self.max_sequence_length, self.denoiser_config.text_dim, dtype=dtype)}

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The velocity at x_t from the expert that runs at t (the LoRA's, or the frozen other;
        the memory estimate's meta t counts the LoRA's)."""
        net = self.denoiser
        if (self.boundary is not None and not t.is_meta
                and (expert(float(t), self.boundary) == 1) != (self.lora_expert == "low")):
            net = self.other
        dtype = next(net.parameters()).dtype
        out = net(hidden_states=x.to(dtype), timestep=t.expand(x.shape[0]), encoder_hidden_states=cond["embeds"].to(dtype),
                  return_dict=False)[0]
        return out.to(x.dtype)

    def decode(self, latents: torch.Tensor, frames: Sequence[int] | None = None,
               use_checkpoint: bool = False) -> torch.Tensor:
        """Videos [B, F', 3, H, W] in [0, 1]: the chosen frames (all when None), decoding only
        the latent prefix they need (`decode_frames`); `use_checkpoint` checkpoints the decode
        one latent frame at a time."""
        return decode_video(self.vae, latents, frames, by_frame=use_checkpoint and torch.is_grad_enabled())

    def save_lora(self, directory, layers: dict[str, torch.Tensor], metadata: dict) -> None:
        """`WanPipeline.save_lora_weights`; a LoRA of Wan 2.2's low-noise expert loads with
        `pipe.load_lora_weights(folder, load_into_transformer_2=True)`."""
        super().save_lora(directory, layers, metadata)
