"""The `shapes-video` pretraining recipe at toy size: a few optimisation steps of each stage
build a WanPipeline folder that plain diffusers and draft's Wan adapter load and sample."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch

from draft.models import shapes_video as sv
from draft.models import shapes_video_pretrain as svp

PROMPT = "a small red circle moving right on a blue background"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the Wan VAE's 3D convolutions run slower on oversubscribed threads
    try:
        yield svp.pretrain(tmp_path_factory.mktemp("pretrain"), seed=1, quick=True, progress=False)
    finally:
        torch.set_num_threads(n)


@pytest.mark.slow
def test_quick_pretrain_builds_a_wan_pipeline_that_diffusers_samples(built):
    from diffusers import WanPipeline

    assert built.name == "shapes-video"
    info = json.loads((built / "recipe.json").read_text())
    assert info["recipe"] == json.loads(json.dumps(asdict(svp.quick_recipe())))
    assert all(math.isfinite(v) for v in info["final_loss"].values())
    for split in ("train", "heldout"):
        assert (built / "prompts" / f"{split}.txt").read_text().splitlines() == sv.prompts(split)
    pipe = WanPipeline.from_pretrained(built)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(PROMPT, height=32, width=32, num_frames=9, num_inference_steps=2, output_type="pt",
                  max_sequence_length=info["max_sequence_length"], generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 9, 3, 32, 32) and torch.isfinite(frames).all()


@pytest.mark.slow
def test_the_steps_train_every_network_and_the_latents_are_normalised(built):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    recipe = svp.quick_recipe()
    torch.manual_seed(1)  # the initialisation the recipe starts from
    _, text_encoder, vae, transformer, _ = svp.build_models(recipe)
    trained = {"vae": AutoencoderKLWan.from_pretrained(built / "vae"),
               "transformer": WanTransformer3DModel.from_pretrained(built / "transformer"),
               "text_encoder": UMT5EncoderModel.from_pretrained(built / "text_encoder")}
    for name, fresh in (("vae", vae), ("transformer", transformer), ("text_encoder", text_encoder)):
        after = trained[name].state_dict()
        changed = [k for k, v in fresh.state_dict().items() if not torch.equal(v, after[k])]
        assert changed, f"{name} was not trained"
    # The VAE's latent statistics are measured on the pool: normalised posterior samples of
    # the pool's clips have zero mean and unit variance in every channel.
    vae = trained["vae"]
    saved = torch.tensor([vae.config.latents_mean, vae.config.latents_std])
    pool, _ = svp.render_pool(recipe.pool, 1, recipe)
    mean, std = svp.encode_pool(vae, pool)  # measures them again on the same pool
    torch.testing.assert_close(torch.tensor([vae.config.latents_mean, vae.config.latents_std]), saved)
    samples = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))).transpose(0, 1)
    torch.testing.assert_close(samples.flatten(1).mean(1), torch.zeros(recipe.z_dim), rtol=0, atol=0.15)
    torch.testing.assert_close(samples.flatten(1).std(1), torch.ones(recipe.z_dim), rtol=0, atol=0.15)


@pytest.mark.slow
def test_draft_loads_it_as_a_wan_model(built):
    from draft.models import load_model
    from draft.models.base import Size

    info = json.loads((built / "recipe.json").read_text())
    model = load_model(str(built), options={"max_sequence_length": info["max_sequence_length"]})
    size = Size(32, 32, 9)
    assert model.latent_shape(size) == (svp.quick_recipe().z_dim, 3, 8, 8)  # 4x in time and in space
    cond, uncond = model.conditioning([PROMPT], guidance_scale=4.0, size=size)
    assert cond["embeds"].shape[1] == info["max_sequence_length"] and uncond is not None
    video = model.decode(torch.zeros(1, *model.latent_shape(size)))
    assert video.shape == (1, 9, 3, 32, 32) and 0 <= video.min() and video.max() <= 1


@pytest.mark.slow
def test_reusing_a_builds_vae_gives_the_transformer_a_whole_build_gives(built, tmp_path):
    from safetensors.torch import load_file

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the whole build ran
    try:
        again = svp.pretrain(tmp_path, seed=1, quick=True, progress=False, vae_from=built)
    finally:
        torch.set_num_threads(n)
    for part in ("vae/diffusion_pytorch_model", "transformer/diffusion_pytorch_model", "text_encoder/model"):
        whole, reused = load_file(built / f"{part}.safetensors"), load_file(again / f"{part}.safetensors")
        assert whole.keys() == reused.keys() and all(torch.equal(whole[k], reused[k]) for k in whole), part
    assert json.loads((again / "recipe.json").read_text())["vae_from"] == str(built)


def test_the_vae_loss_weights_exactly_the_shapes_pixels():
    clips = sv.draw_clips(3, seed=2, frames=5, size=32)
    x = torch.from_numpy(clips.videos).float().permute(0, 2, 1, 3, 4) * 2 - 1  # [B, 3, F, H, W] in [-1, 1]
    mask = svp._foreground(x)
    assert mask.shape == (3, 1, 5, 32, 32)
    background = x[..., :1, :1]  # the corner: every shape keeps a pixel of background around it
    differs = (x - background).abs().amax(1, keepdim=True) > 0.1
    assert torch.equal(mask.bool(), differs)
    covered = mask.mean((1, 3, 4))  # per clip and frame: a shape, a small part of the frame
    assert (covered > 0).all() and (covered < 0.5).all()


def test_the_transformer_loss_weights_the_latents_a_shape_touches():
    """Frame 0 is its own latent frame, frames 1-4 and 5-8 the next two, 4x4 pixels one latent."""
    vae = svp.build_models(svp.quick_recipe())[2]
    pool = torch.full((2, 9, 3, 32, 32), 40, dtype=torch.uint8)  # one background colour
    pool[0, 0, :, 9:11, 13:15] = 250  # frame 0, latent row 2, columns 3
    pool[0, 6, :, 20:22, 4:6] = 250  # frame 6 -> latent frame 2, row 5, column 1
    mask = svp.latent_foreground(pool, vae)
    assert mask.shape == (2, 1, 3, 8, 8)
    expected = torch.zeros(2, 1, 3, 8, 8)
    expected[0, 0, 0, 2, 3] = expected[0, 0, 2, 5, 1] = 1
    assert torch.equal(mask, expected)  # and clip 1, background only, has none
