"""Every model family behind one protocol: the conformance suite every adapter passes, and each
family's sampler checked against its own diffusers pipeline.

Families are tiny random pipelines of the real architectures built in code
(`draft.models.tiny`), saved and loaded through the real loading code. Adding a family means
adding it to `FAMILIES` here and to `draft.models.tiny.TINY`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from draft.config import LogConfig, LoraConfig, SamplingConfig, TrainConfig
from draft.errors import UserError
from draft.lora import add_lora, load_loras, save_lora
from draft.methods import METHODS, Batch, Sampler, truncated
from draft.models import load_model
from draft.models.base import DiffusionModel, Size
from draft.models.tiny import PROMPTS, build_tiny
from draft.rewards import FunctionReward
from draft.sampling import SampleNoise, Schedule, guided, predict_x0_eps, renoise, sample_chain, sampler_step

# name -> (tiny builder kwargs, or None for a model shipped in the package; the diffusers
# pipeline class that loads it)
FAMILIES = {
    "sd": ({}, "StableDiffusionPipeline"),
    "sd3": ({}, "StableDiffusion3Pipeline"),
    "sd3-t5": ({"family": "sd3", "t5": True}, "StableDiffusion3Pipeline"),
    "flux": ({}, "FluxPipeline"),
    "flux-schnell": ({}, "FluxPipeline"),
    "sdxl": ({}, "StableDiffusionXLPipeline"),
    "wan": ({}, "WanPipeline"),
    "wan22": ({}, "WanPipeline"),
    "qwen-image": ({}, "QwenImagePipeline"),
    "z-image": ({}, "ZImagePipeline"),
    "flux2": ({}, "Flux2Pipeline"),
    "flux2-klein": ({}, "Flux2KleinPipeline"),
    "shapes-sd": (None, "StableDiffusionPipeline"),
    "shapes-flow": (None, "StableDiffusion3Pipeline"),
}
# Families sampled without an unconditional pass: guidance is an input of the model
# (FLUX.1-dev's and FLUX.2-dev's guidance embedding) or absent (schnell).
NO_CFG = {"flux", "flux-schnell", "flux2"}
# The guidance scale that turns guidance off: 1 but where the pipeline counts from 0 (Z-Image's
# pos + g·(pos - neg)).
OFF = {"z-image": 0.0}
# Families whose pipeline guides against the empty prompt only (FLUX.2 [klein]): they refuse another.
EMPTY_NEGATIVE = {"flux2-klein"}
# The tiny video pipelines' native size (their folders record none; Wan's own is 480p, 81 frames).
TINY_VIDEO = {"height": 16, "width": 16, "frames": 9}
# The tiny image pipelines whose folders record no native size (Qwen-Image's own is 1024 px).
OPTIONS = {"wan": TINY_VIDEO, "wan22": TINY_VIDEO, "qwen-image": {"resolution": 32}}
# FLUX.2 pads every prompt to max_sequence_length (512 by default): the tiny ones fit in 64 tokens.
OPTIONS.update({name: {"max_sequence_length": 64} for name in ("flux2", "flux2-klein")})


def _load(name, path):
    return load_model(str(path), options=OPTIONS.get(name))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, path of its pipeline folder, diffusers pipeline class name)."""
    from draft.models import EMBEDDED

    name = request.param
    kwargs, pipeline = FAMILIES[name]
    if kwargs is None:
        return name, EMBEDDED[name].path, pipeline
    kwargs = {"family": name, **kwargs}
    path = build_tiny(tmp_path_factory.mktemp(name), kwargs.pop("family"), **kwargs)
    return name, path, pipeline


def brightness(images, prompts):
    return images.mean((1, 2, 3))


def _batch(model, n=2, step=0):
    seeds = [100 * step + j for j in range(n)]
    return Batch(list(PROMPTS[:n]), SampleNoise(seeds, model.latent_shape(), "cpu"),
                 np.random.default_rng([0, step, 1]), step, 0)


def _with_random_lora(model, seed=0):
    """A LoRA whose B matrices are non-zero, so the adapter changes the outputs."""
    params = add_lora(model, LoraConfig(rank=4, alpha=8.0), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return params


# --- the flow step against diffusers -----------------------------------------------------------


@pytest.mark.parametrize("case", ["plain", "shift", "dynamic"])
def test_each_flow_step_matches_flow_match_euler(case):
    from diffusers import FlowMatchEulerDiscreteScheduler

    num_steps = 10
    if case == "plain":
        config, kwargs = {}, {}
    elif case == "shift":
        config, kwargs = {"shift": 3.0}, {}
    else:  # FLUX: dynamic shift from the token count, a linear sigma grid passed in
        config = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096}
        kwargs = {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": 0.83}
    flow = FlowMatchEulerDiscreteScheduler(**config)
    flow.set_timesteps(num_steps, **{k: (list(v) if k == "sigmas" else v) for k, v in kwargs.items()})
    schedule = Schedule.from_scheduler_config(flow.config, num_steps, **kwargs)
    assert schedule.prediction_type == "flow" and len(schedule) == num_steps
    torch.testing.assert_close(torch.tensor(schedule.timesteps), flow.timesteps.float())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(flow.timesteps):
        out = torch.randn(x.shape, generator=g)  # a stand-in velocity
        expected = flow.step(out, t, x).prev_sample
        x0, eps = predict_x0_eps(out, x, schedule.a[i], schedule.s[i], "flow")
        ours = sampler_step(x0, eps, schedule.a_prev[i], schedule.s_prev[i])
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        x = expected


def test_flow_renoise_is_the_interpolation():
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = 0.3
    torch.testing.assert_close(renoise(x0, 1 - sigma, sigma, eps), (1 - sigma) * x0 + sigma * eps)


# --- the conformance suite -----------------------------------------------------------------------


def test_adapter_conforms_to_the_protocol(family):
    name, path, _ = family
    model = _load(name, path)
    assert isinstance(model, DiffusionModel)
    native = model.native_size
    assert model.size() == native and native.height > 0 and native.width > 0
    shape = model.latent_shape()
    assert len(shape) == (4 if native.video else 3) and all(n > 0 for n in shape)
    cond, uncond = model.conditioning(PROMPTS[:2], 5.0)
    assert (uncond is None) == (name in NO_CFG)
    assert model.conditioning(PROMPTS[:2], OFF.get(name, 1.0))[1] is None
    # the memory estimate's count of passes is what conditioning does
    assert model.guided_passes(5.0) == (1 if uncond is None else 2) and model.guided_passes(OFF.get(name, 1.0)) == 1
    x = SampleNoise([0, 1], shape, "cpu").draw()
    schedule = model.schedule(4)
    assert len(schedule) == 4
    t = torch.tensor(schedule.timesteps[0])
    out = model.denoise(x, t, cond)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    # decode: samples in [0, 1], differentiable in the latents
    latents = x.clone().requires_grad_(True)
    samples = model.decode(latents)
    expected = (2, native.frames, 3, native.height, native.width) if native.video else (2, 3, native.height,
                                                                                          native.width)
    assert samples.shape == expected
    assert 0 <= samples.min() and samples.max() <= 1
    samples.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.denoiser.parameters())
    assert isinstance(model.metrics(samples.detach(), PROMPTS[:2]), dict)
    m = model.size_multiple
    with pytest.raises(UserError):
        model.latent_shape(Size(native.height + m // 2 or 1, native.width, native.frames))
    if native.video:
        with pytest.raises(UserError, match="4k \\+ 1"):
            model.size(Size(frames=native.frames + 1))
    else:
        with pytest.raises(UserError, match="image model"):
            model.size(Size(frames=9))


def test_a_partial_decode_is_the_same_frames_of_a_full_decode(family):
    """Videos: `decode(frames=...)` decodes only the latent frames those need, and gives what
    the full decode gives for them; the gradient reaches no later latent frame."""
    name, path, _ = family
    model = _load(name, path)
    if not model.native_size.video:
        pytest.skip("an image model has no frames")
    x = SampleNoise([0, 1], model.latent_shape(), "cpu").draw().requires_grad_(True)
    with torch.no_grad():
        full = model.decode(x)
    part = model.decode(x, frames=[0, 2, 4])
    torch.testing.assert_close(part.detach(), full[:, [0, 2, 4]], rtol=0, atol=1e-5)
    part.mean().backward()
    per_latent_frame = x.grad.abs().sum((0, 1, 3, 4))
    assert per_latent_frame[:2].min() > 0 and per_latent_frame[2:].abs().sum() == 0  # frames 0-4 need latent 0-1


def test_a_checkpointed_decode_gives_the_plain_decodes_samples_and_gradients(family):
    """`sampling.decode_checkpointing`: the same samples and latent gradients, whatever region
    the family checkpoints (an image VAE's blocks one sample at a time, a video's latent
    frames one by one), to float32 rounding: a sample decoded alone rounds as a batch of one
    (we see 1.6e-6)."""
    name, path, _ = family
    model = _load(name, path)
    z = SampleNoise([0, 1], model.latent_shape(), "cpu").draw()
    outs, grads = [], []
    for use_checkpoint in (False, True):
        x = z.clone().requires_grad_(True)
        out = model.decode(x, use_checkpoint=use_checkpoint)
        (out * torch.linspace(0, 1, out.numel()).view(out.shape)).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    # by norm: where rounding moves a pixel across the clamp at 0 or 1, its gradient switches
    assert (grads[1] - grads[0]).norm() <= 1e-4 * grads[0].norm()


def test_lora_disable_and_merge_keep_the_base_exact(family):
    name, path, _ = family
    model = _load(name, path)
    cond = model.conditioning(PROMPTS[:2], 1.0)[0]
    x = SampleNoise([0, 1], model.latent_shape(), "cpu").draw()
    # The last step: Wan 2.2's LoRA is on its low-noise expert, which runs only the late steps.
    t = torch.tensor(model.schedule(4).timesteps[-1])
    with torch.no_grad():
        base = model.denoise(x, t, cond)
        _with_random_lora(model)
        adapted = model.denoise(x, t, cond)
        assert (adapted - base).abs().max() > 1e-4  # the LoRA does something
        with model.adapters_disabled():
            torch.testing.assert_close(model.denoise(x, t, cond), base, rtol=0, atol=1e-6)
        weights = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
        with model.adapters_merged():
            torch.testing.assert_close(model.denoise(x, t, cond), adapted, rtol=1e-4, atol=1e-5)
        after = model.denoiser.state_dict()
        assert all(torch.equal(weights[k], after[k]) for k in weights)  # bit for bit


@pytest.mark.parametrize("merged_recompute", [True, False], ids=["merged-first-pass", "torch-checkpoint"])
def test_exactly_the_last_k_denoiser_calls_carry_gradient(family, merged_recompute):
    name, path, _ = family
    model = _load(name, path)
    params = _with_random_lora(model)
    loop = Sampler(model, FunctionReward(brightness, "brightness"), model.schedule(6), guidance_scale=3.0,
                use_checkpoint=True, merged_recompute=merged_recompute)
    carried = []
    inner = model.denoise

    def counting(x, t, cond):
        # Recorded on entry: torch.utils.checkpoint stops its recompute early, inside the call.
        carried.append((t.flatten()[0].item(), torch.is_grad_enabled()))
        return inner(x, t, cond)

    model.denoise = counting
    k = 2
    out = truncated(loop, _batch(model), k)
    out.loss.backward()
    forward, backward = carried[: len(loop.schedule)], carried[len(loop.schedule):]
    # The merged first pass builds no graph at all; torch.utils.checkpoint's first pass
    # builds one for the window. Either way the backward recomputes exactly the window's
    # calls, with gradient.
    window = [False] * 6 if merged_recompute else [False] * (6 - k) + [True] * k
    assert [g for _, g in forward] == window
    assert sorted(t for t, _ in backward) == sorted(t for t, _ in forward[-k:])
    assert all(g for _, g in backward)
    # Every adapted layer gets a gradient; almost all a non-zero one (SD3's last joint block
    # discards its context stream, so that block's context query cannot affect the image).
    assert all(p.grad is not None for p in params)
    assert sum(bool(p.grad.abs().sum() > 0) for p in params) >= 0.9 * len(params)


def test_draft_lv_renoises_as_replayed(family):
    name, path, _ = family
    model = _load(name, path)
    _with_random_lora(model)
    T, n, off = 5, 2, OFF.get(name, 1.0)
    loop = Sampler(model, FunctionReward(brightness, "brightness"), model.schedule(T), guidance_scale=off,
                use_checkpoint=False, merge_lora=False)
    calls = []
    inner = model.denoise
    model.denoise = lambda x, t, c: (calls.append(x.detach().clone()), inner(x, t, c))[1]

    class Cfg:
        lv_n = n
        lv_step = -1

    METHODS["draft-lv"](loop, _batch(model), Cfg)
    replay = _batch(model).noise
    x_T = replay.draw()
    model.denoise = inner
    with torch.no_grad():
        x0 = loop.run(x_T, model.conditioning(PROMPTS[:2], off), replay)
    eps = torch.cat([replay.draw() for _ in range(n)])
    expected = renoise(x0.repeat(n, *[1] * (x0.ndim - 1)), loop.schedule.a[T - 1], loop.schedule.s[T - 1], eps)
    torch.testing.assert_close(calls[T], expected, rtol=1e-5, atol=1e-5)


# --- each family against its own diffusers pipeline -------------------------------------------------


def _pipeline(path, cls_name):
    """The folder loaded as a diffusers user would: components saved as None passed as None
    (SD3 without its T5), no safety checker."""
    import json

    import diffusers

    index = json.loads((path / "model_index.json").read_text())
    kwargs = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    if cls_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = getattr(diffusers, cls_name).from_pretrained(path, **kwargs)
    if cls_name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):  # we sample the DDPM family with DDIM
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_latents(pipe, model, prompts, x_T, steps, guidance):
    """The pipeline's final latents [B, C, *spatial] from x_T, at the model's native size and
    T5 length, guided as the model card's snippet asks the pipeline to guide (Qwen-Image:
    true_cfg_scale and a negative prompt). FLUX's and Qwen-Image's pipelines take and
    return latents packed into 2x2 patch tokens (Qwen-Image's unpack to one video frame);
    FLUX.2's take the patchified latents and return them packed (dev) or decoder-ready (klein)."""
    if hasattr(pipe, "_patchify_latents"):
        return _flux2_latents(pipe, model, prompts, x_T, steps, guidance)
    size, packed = model.native_size, hasattr(pipe, "_pack_latents")
    latents = pipe._pack_latents(x_T, *x_T.shape) if packed else x_T
    extra = {"guidance_scale": guidance, **model.pipeline_kwargs({"guidance_scale": guidance}, {})}
    if hasattr(model, "max_sequence_length"):
        extra["max_sequence_length"] = model.max_sequence_length
    if size.video:
        extra["num_frames"] = size.frames
    out = pipe(prompts, latents=latents, height=size.height, width=size.width, num_inference_steps=steps,
               output_type="latent", **extra)
    out = out.frames if size.video else out.images
    if not packed:
        return out
    out = pipe._unpack_latents(out, size.height, size.width, pipe.vae_scale_factor)
    return out[:, :, 0] if out.ndim == 5 else out


def _flux2_latents(pipe, model, prompts, x_T, steps, guidance):
    """FLUX.2's pipelines from the patchified x_T: dev returns the tokens, which are the
    latents row by row; klein returns them denormalised and unpatchified for the VAE, which
    is undone here with the VAE's batch-norm statistics."""
    size = model.native_size
    out = pipe(prompt=prompts, latents=x_T, height=size.height, width=size.width, num_inference_steps=steps,
               guidance_scale=guidance, max_sequence_length=model.max_sequence_length, output_type="latent").images
    if out.ndim == 3:
        return out.transpose(1, 2).reshape(x_T.shape)
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var + pipe.vae.config.batch_norm_eps).view(1, -1, 1, 1)
    return (pipe._patchify_latents(out) - bn.running_mean.view(1, -1, 1, 1)) / std


def _our_latents(model, prompts, seeds, steps, guidance):
    x = SampleNoise(seeds, model.latent_shape(), "cpu").draw()
    cond = model.conditioning(prompts, guidance)
    denoise = guided(model.denoise, model.guidance(guidance, None), model.guide)
    with torch.no_grad():
        return x, sample_chain(denoise, x, model.schedule(steps), cond)


def _euler_for_multistep(model, pipe):
    """Wan folders ship UniPC, a second-order solver; draft takes its sigmas and steps with
    Euler (`Schedule`, tested against UniPC in test_wan_parts). For a whole-run comparison
    both sides use `FlowMatchEulerDiscreteScheduler` with the folder's shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if "flow_shift" in model.scheduler_config:
        euler = FlowMatchEulerDiscreteScheduler(shift=model.scheduler_config["flow_shift"])
        model.scheduler_config, pipe.scheduler = euler.config, euler
    return pipe


def test_sampler_matches_the_family_pipeline(family):
    """Same initial latents, same prompts: our loop and the family's pipeline agree (float32)."""
    name, path, cls_name = family
    model = _load(name, path)
    pipe = _euler_for_multistep(model, _pipeline(path, cls_name))
    prompts, steps, guidance = PROMPTS[:2], 8, 4.0
    x_T, ours = _our_latents(model, prompts, [3, 4], steps, guidance)
    theirs = _pipeline_latents(pipe, model, prompts, x_T, steps, guidance)
    # float32 in another order: the pipeline steps x + (σ' - σ)·v, we a'·x̂_0 + s'·ε̂. The
    # trained embedded models' larger activations leave ~1e-5 of round-off after 8 steps.
    tolerance = 5e-5 if FAMILIES[family[0]][0] is None else 2e-5
    assert (ours - theirs).abs().max() <= tolerance


def _trained_lora_loads_in_plain_diffusers(path, cls_name, tmp_path, lora=LoraConfig(), options=None):
    from draft.trainer import train

    options = options or {}
    size = {k: options[k] for k in ("height", "width", "frames") if k in options}
    cfg = TrainConfig(model=str(path), reward="brightness", prompts="|".join(PROMPTS), eval_prompts="|".join(PROMPTS),
                      method="draft-k", k=2, steps=3, batch_size=2, lr=0.05, output_dir=str(tmp_path), name="run",
                      sampling=SamplingConfig(num_steps=4, guidance_scale=3.0, **size), lora=lora,
                      model_options=options, reward_frames=2,
                      log=LogConfig(eval_samples=0, sample_prompts=2, sample_seeds=1, trackers=()))
    run = train(cfg, progress=False)
    model = load_model(str(path), options=options)
    load_loras(model, [(str(run), 1.0)])
    prompts, steps, guidance = PROMPTS[:2], 4, 3.0
    base = load_model(str(path), options=options)
    pipe = _pipeline(path, cls_name)
    into_2 = getattr(model, "boundary", None) is not None and model.lora_expert == "low"
    pipe.load_lora_weights(run / "lora", **({"load_into_transformer_2": True} if into_2 else {}))
    for m in (model, base):
        _euler_for_multistep(m, pipe)
    x_T, ours = _our_latents(model, prompts, [7, 8], steps, guidance)
    _, plain = _our_latents(base, prompts, [7, 8], steps, guidance)
    assert (ours - plain).abs().max() > 1e-4  # training moved the model
    theirs = _pipeline_latents(pipe, model, prompts, x_T, steps, guidance)
    # float32 round-off of the same sums in another order (peft's layers against ours), so
    # the bound grows with the latents' size
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_trained_lora_loads_in_plain_diffusers(family, tmp_path):
    """`draft train` on the family leaves a LoRA that `load_lora_weights` reads into the plain
    pipeline, which then samples what our sampler samples with the adapter."""
    name, path, cls_name = family
    _trained_lora_loads_in_plain_diffusers(path, cls_name, tmp_path, options=OPTIONS.get(name))


@pytest.mark.slow
def test_shapes_flow_recipe_lora_loads_in_plain_diffusers(tmp_path):
    """shapes-flow's own recipe adapts the feed-forward and adaptive-norm layers too
    (`draft.models.SD3_WIDE_TARGETS`); diffusers' SD3 loader must read those as well."""
    from draft.models import EMBEDDED, SD3_WIDE_TARGETS

    _trained_lora_loads_in_plain_diffusers(EMBEDDED["shapes-flow"].path, "StableDiffusion3Pipeline", tmp_path,
                                           LoraConfig(target_modules=SD3_WIDE_TARGETS))


def test_lora_save_load_round_trip(family, tmp_path):
    name, path, _ = family
    model = _load(name, path)
    _with_random_lora(model)
    save_lora(model, tmp_path / "lora")
    again = _load(name, path)
    load_loras(again, [(str(tmp_path / "lora"), 1.0)])
    prompts = PROMPTS[:2]
    _, a = _our_latents(model, prompts, [1, 2], 3, 2.0)
    _, b = _our_latents(again, prompts, [1, 2], 3, 2.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_unsupported_pipeline_class_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(UserError, match="supported: .*StableDiffusion3Pipeline"):
        load_model(str(tmp_path))



@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "flux2-klein"])
def test_two_processes_equal_one_on_a_flow_model(name, tmp_path_factory, tmp_path, one_thread, launch_two_processes):
    """Under `accelerate launch` on the CPU, 2 processes at batch 1 train the LoRA that 1 process
    at batch 2 trains, on SD3 (rectified flow, transformer, dict conditioning) as on SD, and on
    FLUX.2 [klein] (patchified latents, a language model's stacked layers, CFG)."""
    import subprocess

    from safetensors.torch import load_file

    from draft.cli import main

    path = build_tiny(tmp_path_factory.mktemp(f"{name}-ddp"), name)
    options = [f"model_options.{k}={v}" for k, v in OPTIONS.get(name, {}).items()]
    common = [f"model={path}", *options, "reward=brightness", f"prompts={'|'.join(PROMPTS)}",
              f"eval_prompts={PROMPTS[0]}",
              "method=draft-lv", "batch_size=1", "lr=1e-2", "kl_coeff=0", "steps=2", "sampling.num_steps=3",
              "sampling.guidance_scale=3", "log.sample_prompts=1", "log.sample_seeds=1", "log.eval_samples=0",
              "log.trackers=[]", f"output_dir={tmp_path}", "--no-progress"]
    launch, env = launch_two_processes
    two = subprocess.run([*launch, "train", *common, "name=two"], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert main(["train", *common, "name=one", "batch_size=2"]) == 0
    one, both = (load_file(tmp_path / n / "lora" / "pytorch_lora_weights.safetensors") for n in ("one", "two"))
    assert one.keys() == both.keys() and all(k.startswith("transformer.") for k in one)
    # Round-off (batch 1 against batch 2 kernels, the gradient all-reduce) that Adam
    # amplifies: up to 2.5e-5 seen, in 1 weight of 256, against updates of ~1e-2; another
    # sample or noise would move every weight by a whole update. (SD's own test allows 2e-4.)
    for k in one:
        torch.testing.assert_close(one[k], both[k], rtol=0, atol=1e-4)


def test_the_prompt_cache_returns_each_familys_own_conditioning(family):
    """text_encoders=cache cuts any family's conditioning into rows and stacks them back: a
    batch of cached prompts gets what encoding it gives, with its unconditional half."""
    from draft.models.text import PromptCache, conditioning_bytes

    name, path, _ = family
    model = _load(name, path)
    prompts, size = ["a red circle", "a blue square", "a green star"], model.size()
    # Qwen-Image and Z-Image pad text to each batch's longest prompt: rows warmed beside a
    # longer one keep its padding, and must still denoise as the short batch's own encoding.
    long = "a small red circle and a large blue square and a green star on a yellow background"
    blurry, ugly = ("", "") if name in EMPTY_NEGATIVE else ("blurry", "ugly")
    cond, uncond = model.conditioning(prompts[::-1], 3.0, size, blurry)
    short = model.conditioning(prompts[:2], 3.0, size, ugly)
    cache = PromptCache(model)
    cache.warm(prompts, 3.0, size, blurry, batch=3)
    table_bytes = cache.nbytes()
    cache.warm([long], 3.0, size, blurry)
    cache.warm([long, *prompts[:2]], 3.0, size, ugly, batch=3)  # the short ones padded as the long
    cache.release()
    cached, cached_uncond = model.conditioning(prompts[::-1], 3.0, size, blurry)
    assert (uncond is None) == (cached_uncond is None) == (name in NO_CFG)
    assert conditioning_bytes(cached) == conditioning_bytes(cond) > 0
    torch.testing.assert_close(cached, cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached_uncond, uncond, rtol=1e-5, atol=1e-6)
    assert table_bytes == conditioning_bytes(cond) + conditioning_bytes(uncond)
    mixed = model.conditioning([long, prompts[0]], 3.0, size, blurry)  # rows of two warm batches
    assert conditioning_bytes(mixed[0]) > 0
    x = SampleNoise([0, 1], model.latent_shape(size), "cpu").draw()
    t = torch.tensor(model.schedule(4, size).timesteps[0])
    with torch.no_grad():
        for c, d in zip(model.conditioning(prompts[:2], 3.0, size, ugly), short):
            if d is not None:
                torch.testing.assert_close(model.denoise(x, t, c), model.denoise(x, t, d), rtol=1e-5, atol=1e-5)
