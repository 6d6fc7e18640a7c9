"""The Wan-specific pieces: the tiny Wan pipelines, the VAE's normalisation and partial
decoding, the folder's schedule and expert switch, and Wan LoRAs in ComfyUI's names.

Each test checks a fact against diffusers' own code: the pipeline's sampling and decode,
its UniPC scheduler, its original-to-diffusers weight renames and its loader for
non-diffusers Wan LoRAs.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from draft.models import wan
from draft.models.tiny_wan import A14B_BOUNDARY_RATIO, WAN_SCHEDULER_CONFIG, build_tiny_wan, tiny_wan_pipeline

SIZE = dict(height=16, width=16, num_frames=9)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"))


@pytest.fixture(scope="module")
def a14b_folder(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan_a14b"), seed=1, two_experts=True)


def _load(folder):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def vae():
    return tiny_wan_pipeline(None).vae.requires_grad_(False)


# --- the tiny pipelines ----------------------------------------------------------------------


def test_tiny_wan_saves_loads_and_samples(wan_folder):
    import json

    pipe = _load(wan_folder)
    assert pipe.transformer_2 is None and pipe.config.boundary_ratio is None
    params = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    assert params < 200_000
    saved = json.loads((wan_folder / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "UniPCMultistepScheduler"
    assert {k: saved[k] for k in WAN_SCHEDULER_CONFIG} == WAN_SCHEDULER_CONFIG
    video = pipe("a small red circle", **SIZE, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 9, 3, 16, 16)
    assert video.min() >= 0 and video.max() <= 1 and video.std() > 0


def _record_timesteps(pipe):
    calls = {"transformer": [], "transformer_2": []}
    for name in calls:
        getattr(pipe, name).register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: calls[name].append(int(kwargs["timestep"][0])), with_kwargs=True)
    return calls


def test_two_experts_switch_at_the_boundary(a14b_folder):
    """transformer runs t >= 0.875 · 1000, transformer_2 the rest, each twice a step under CFG."""
    pipe = _load(a14b_folder)
    assert pipe.config.boundary_ratio == A14B_BOUNDARY_RATIO
    calls = _record_timesteps(pipe)
    pipe("a small red circle", **SIZE, num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=3.0,
         output_type="latent", generator=torch.Generator().manual_seed(0))
    # flow_shift 3 on linspace(1, 1/1000, 5)[:-1]: σ = 1, 0.900, 0.750, 0.501 -> t = 999, 900, 750, 500
    assert calls == {"transformer": [999, 999, 900, 900], "transformer_2": [750, 750, 500, 500]}
    for t in (999, 900, 750, 500):
        assert wan.expert(t, A14B_BOUNDARY_RATIO) == (0 if t in calls["transformer"] else 1)
    assert wan.expert(100, None) == 0


def test_guidance_is_switched_by_the_first_scale_alone(a14b_folder):
    """WanPipeline.do_classifier_free_guidance reads guidance_scale only: at 1 no expert gets
    an unconditional pass, whatever guidance_scale_2 says."""
    pipe = _load(a14b_folder)
    calls = _record_timesteps(pipe)
    pipe("a small red circle", **SIZE, num_inference_steps=4, guidance_scale=1.0, guidance_scale_2=5.0,
         output_type="latent", generator=torch.Generator().manual_seed(0))
    assert calls == {"transformer": [999, 900], "transformer_2": [750, 500]}


# --- normalisation and decoding ----------------------------------------------------------------


def test_decode_video_is_the_pipelines_decode(wan_folder):
    pipe = _load(wan_folder)
    noise = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    run = dict(prompt="a large green square", **SIZE, num_inference_steps=2, latents=noise)
    latents = pipe(**run, output_type="latent").frames
    video = pipe(**run, output_type="pt").frames
    with torch.no_grad():
        ours = wan.decode_video(pipe.vae, latents)
    assert ours.shape == video.shape == (1, 9, 3, 16, 16)
    torch.testing.assert_close(ours, video, rtol=0, atol=1e-6)
    torch.testing.assert_close(wan.normalise(pipe.vae, wan.denormalise(pipe.vae, latents)), latents)


def test_partial_decode_is_a_prefix_of_the_full_decode(vae):
    """Decoding z[:, :, :n] gives the first 1 + 4(n - 1) frames of the full decode: equal up
    to float32 rounding (the 1x1x1 post-quant convolution runs over all frames at once, and
    its rounding depends on their number; we see 2.4e-7), exactly in float64."""
    z = torch.randn(2, 16, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = wan.decode_frames(vae, z)
        assert full.shape == (2, 13, 3, 16, 16)
        for n in range(1, 4):
            part = wan.decode_frames(vae, z[:, :, :n])
            assert part.shape[1] == wan.output_frames(vae, n) == 1 + 4 * (n - 1)
            torch.testing.assert_close(part, full[:, : part.shape[1]], rtol=0, atol=1e-6)
        picked = wan.decode_frames(vae, z, frames=[4, 0, 2])  # needs latent frames 0 and 1 only
        torch.testing.assert_close(picked, full[:, [4, 0, 2]], rtol=0, atol=1e-6)
        vae64, z64 = tiny_wan_pipeline(None).vae.double(), z.double()
        full64 = wan.decode_frames(vae64, z64)
        torch.testing.assert_close(wan.decode_frames(vae64, z64[:, :, :2]), full64[:, :5], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        wan.decode_frames(vae, z, frames=[13])


def test_partial_decode_sends_no_gradient_past_the_prefix(vae):
    z = torch.randn(1, 16, 4, 2, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    wan.decode_frames(vae, z, frames=[1, 3]).square().sum().backward()  # frames 1..4 come from latent frame 1
    per_frame = z.grad.abs().sum((0, 1, 3, 4))
    assert per_frame[0] > 0 and per_frame[1] > 0
    assert (per_frame[2:] == 0).all()
    assert [wan.latent_frame(vae, k) for k in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_the_decoder_is_causal_and_late_frames_need_the_early_ones(vae):
    """In the full decode, output frame 5 (latent frame 2) has no gradient to latent frames 3
    and later but does depend on latent frame 0; decoding z[:, :, 2:] on its own (no cache of
    the frames before) gives other frames."""
    z = torch.randn(1, 16, 4, 2, 2, generator=torch.Generator().manual_seed(2), requires_grad=True)
    full = wan.decode_frames(vae, z)
    full[:, 5].square().sum().backward()
    per_frame = z.grad.abs().sum((0, 1, 3, 4))
    assert per_frame[0] > 0 and per_frame[2] > 0 and (per_frame[3:] == 0).all()
    with torch.no_grad():
        alone = wan.decode_frames(vae, z[:, :, 2:])
    assert (alone[:, 1:5] - full[:, 5:9]).abs().max() > 1e-2


@pytest.mark.parametrize("frames", [None, [0, 6], [4]])
def test_the_frame_by_frame_checkpointed_decode_is_the_plain_decode(vae, frames):
    """Checkpointing one latent frame at a time, the causal cache passed between the passes,
    gives the plain decode's frames and gradients, and keeps only each pass's inputs."""
    z = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    outs, grads = [], []
    for by_frame in (False, True):
        x = z.clone().requires_grad_(True)
        out = wan.decode_frames(vae, x, frames=frames, by_frame=by_frame)
        (out * torch.linspace(0, 1, out.numel()).view(out.shape)).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_the_estimate_counts_one_latent_frame_of_a_checkpointed_decode(wan_folder):
    """On the meta device the plain decode keeps every frame's activations; checkpointed by
    frame it keeps the passes' inputs and, for the backward, one pass's graph: several times
    less at 9 latent frames."""
    from draft.models import meta
    from draft.models.wan import Wan

    comps = meta.components(wan_folder)
    model = Wan.on_meta(wan_folder, comps)
    z = torch.empty(1, 16, 9, 8, 8, device="meta", requires_grad=True)
    plain = meta.saved_bytes(lambda: model.decode(z), model.vae)
    by_frame = meta.saved_bytes(lambda: model.decode(z, use_checkpoint=True), model.vae)
    one = meta.saved_bytes(lambda: model.decode(z[:, :, :2]), model.vae)
    assert by_frame < plain / 2
    assert by_frame > one - meta.saved_bytes(lambda: model.decode(z[:, :, :1]), model.vae)


# --- the schedule --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [4, 50])
def test_schedule_is_the_folders_unipc_schedule(num_steps):
    from draft.sampling import Schedule
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler.from_config(WAN_SCHEDULER_CONFIG)
    unipc.set_timesteps(num_steps)
    ours = Schedule.from_scheduler_config(WAN_SCHEDULER_CONFIG, num_steps)
    assert ours.prediction_type == "flow"
    assert list(ours.timesteps) == unipc.timesteps.tolist()  # int(1000 σ), truncated
    np.testing.assert_array_equal(np.array(ours.s + ours.s_prev[-1:]), unipc.sigmas.numpy())
    np.testing.assert_allclose(np.array(ours.a) + np.array(ours.s), 1.0)
    # FlowMatchEuler with shift = flow_shift and UniPC's unshifted grid as `sigmas` gives the
    # same levels (up to UniPC's 1e-6 off σ_0 and float32).
    euler = FlowMatchEulerDiscreteScheduler(shift=WAN_SCHEDULER_CONFIG["flow_shift"])
    euler.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / 1000, num_steps + 1)[:-1])
    np.testing.assert_allclose(euler.sigmas.numpy(), unipc.sigmas.numpy(), atol=2e-6)
    # ... but FlowMatchEuler built from the folder's config ignores flow_shift (its key is `shift`).
    assert FlowMatchEulerDiscreteScheduler.from_config(WAN_SCHEDULER_CONFIG).config.shift == 1.0


# --- original names and ComfyUI LoRAs -------------------------------------------------------------


def _i2v_transformer():
    """A tiny transformer with Wan 2.1 I2V's extra layers (image embedder, k_img/v_img)."""
    from diffusers import WanTransformer3DModel

    from draft.models.tiny_wan import TRANSFORMER_CONFIG

    return WanTransformer3DModel(**{**TRANSFORMER_CONFIG, "image_dim": 8, "added_kv_proj_dim": 24})


def test_every_linear_layer_has_its_original_name():
    """One-to-one, and diffusers' own original-to-diffusers renames map each name back."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    net = _i2v_transformer()
    layers = [name for name, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))]
    assert "blocks.1.attn2.add_k_proj" in layers and "condition_embedder.image_embedder.ff.net.2" in layers
    names = {layer: wan.original_name(layer) for layer in layers}
    assert len(set(names.values())) == len(layers)
    for layer, name in names.items():
        assert list(convert_wan_transformer_to_diffusers({f"{name}.weight": torch.zeros(1)})) == [f"{layer}.weight"]
    assert names["blocks.0.attn1.to_q"] == "blocks.0.self_attn.q"
    assert names["blocks.0.attn2.to_out.0"] == "blocks.0.cross_attn.o"
    assert names["blocks.0.ffn.net.0.proj"] == "blocks.0.ffn.0"
    assert names["proj_out"] == "head.head"
    from draft.errors import UserError

    with pytest.raises(UserError, match="no original Wan name"):
        wan.original_name("blocks.0.norm2")


# Every Linear a LoRA might adapt: attention, feed-forward, the time/text embedders and the head.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "linear_1", "linear_2", "time_proj", "proj_out"]


def _random_lora(net, adapter: str):
    """A peft LoRA with random A and B and layer-dependent scales; (down, up, scales) by layer."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(5)
    net.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS,
                               rank_pattern={"ffn.net.2": 2}, alpha_pattern={"proj_out": 2}), adapter_name=adapter)
    layers = {n: m for n, m in net.named_modules() if isinstance(m, LoraLayer)}
    down = {n: m.lora_A[adapter].weight.detach().clone() for n, m in layers.items()}
    up = {n: m.lora_B[adapter].weight.detach().clone() for n, m in layers.items()}
    scales = {n: float(m.scaling[adapter]) for n, m in layers.items()}
    return down, up, scales


def _forward(net):
    g = torch.Generator().manual_seed(6)
    x, text = torch.randn(1, 16, 3, 2, 2, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return net(x, torch.tensor([500]), text, return_dict=False)[0]


@pytest.fixture(scope="module")
def lora_files(wan_folder, tmp_path_factory):
    """(diffusers LoRA folder, ComfyUI file, output of the peft-adapted transformer, the ComfyUI
    state dict, each layer's trained update scale · B @ A by original name)."""
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("wan_lora")
    net = _load(wan_folder).transformer
    down, up, scales = _random_lora(net, "trained")
    assert len({round(s, 6) for s in scales.values()}) == 3  # 2, 4 (rank 2 at alpha 8) and 0.5
    layers = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(net, adapter_name="trained").items()}
    WanPipeline.save_lora_weights(out / "diffusers", transformer_lora_layers=layers,
                                  transformer_lora_adapter_metadata=net.peft_config["trained"].to_dict())
    state = wan.comfyui_state_dict(down, up, scales)
    save_file(state, str(out / "comfyui.safetensors"))
    updates = {wan.original_name(m): scales[m] * up[m] @ down[m] for m in down}
    return out / "diffusers", out / "comfyui.safetensors", _forward(net), state, updates


def test_comfyui_keys(lora_files):
    *_, state, updates = lora_files
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in state
    assert "diffusion_model.blocks.1.ffn.2.alpha" in state and "diffusion_model.head.head.lora_B.weight" in state
    # ComfyUI's LoRA loader reads <layer>.lora_A.weight, <layer>.lora_B.weight and <layer>.alpha
    keys = [re.fullmatch(r"diffusion_model\.(.+)\.(lora_A\.weight|lora_B\.weight|alpha)", k) for k in state]
    assert all(keys), [k for k, m in zip(state, keys) if not m]
    layers = {m.group(1) for m in keys}
    assert all(f"diffusion_model.{x}.lora_A.weight" in state and f"diffusion_model.{x}.lora_B.weight" in state
               for x in layers)
    # alpha only in the blocks, where diffusers' converter reads it
    assert all(k.startswith("diffusion_model.blocks.") for k in state if k.endswith(".alpha"))
    # ComfyUI's update: up @ down · alpha / rank, or · 1 without an alpha (comfy/weight_adapter/lora.py)
    assert set(updates) == layers
    for x, expected in updates.items():
        key = f"diffusion_model.{x}"
        down, up = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
        factor = state[f"{key}.alpha"].item() / down.shape[0] if f"{key}.alpha" in state else 1.0
        torch.testing.assert_close(up @ down * factor, expected, rtol=1e-6, atol=1e-7)


def test_comfyui_lora_loads_in_diffusers_as_the_diffusers_lora(wan_folder, lora_files):
    diffusers_dir, comfyui_file, adapted, *_ = lora_files
    outputs = []
    for source in (diffusers_dir, comfyui_file):
        pipe = _load(wan_folder)
        pipe.load_lora_weights(str(source), adapter_name="loaded")
        outputs.append(_forward(pipe.transformer))
    base = _forward(_load(wan_folder).transformer)
    assert (adapted - base).abs().max() > 1e-2  # the LoRA changes the output
    torch.testing.assert_close(outputs[0], adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs[1], adapted, rtol=0, atol=1e-5)


def test_load_into_transformer_2(a14b_folder, lora_files):
    """`load_into_transformer_2=True` loads the same "transformer."-keyed file into the
    low-noise expert instead of the high-noise one; a two-expert LoRA is two files, two calls."""
    diffusers_dir, comfyui_file, *_ = lora_files
    pipe = _load(a14b_folder)
    high, low = _forward(pipe.transformer), _forward(pipe.transformer_2)
    pipe.load_lora_weights(str(comfyui_file), adapter_name="low", load_into_transformer_2=True)
    assert not getattr(pipe.transformer, "_hf_peft_config_loaded", False)
    torch.testing.assert_close(_forward(pipe.transformer), high, rtol=0, atol=0)
    assert (_forward(pipe.transformer_2) - low).abs().max() > 1e-2
    pipe.load_lora_weights(str(diffusers_dir), adapter_name="high")
    assert (_forward(pipe.transformer) - high).abs().max() > 1e-2


def test_comfyui_refuses_what_diffusers_cannot_read():
    from draft.errors import UserError

    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    with pytest.raises(UserError, match="no transformer block"):
        wan.comfyui_state_dict({"proj_out": a}, {"proj_out": b}, {"proj_out": 1.0})
    layers = {"blocks.0.attn1.to_q": a, "patch_embedding": a}
    with pytest.raises(UserError, match="patch_embedding"):
        wan.comfyui_state_dict(layers, {k: b for k in layers}, {k: 1.0 for k in layers})
