"""The shipped shapes-flow pipeline (a tiny Stable Diffusion 3) and the recipe that builds it."""

import json

import pytest
import torch

from draft.models import shapes

FLOW_DIR = shapes.ASSETS / "shapes-flow"


def _load(path):
    from diffusers import StableDiffusion3Pipeline

    # Saved without T5, as diffusers allows; it is told so when loading.
    p = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def _images(pipe, prompts, seed=0, steps=20, guidance=4.0):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="pt",
                max_sequence_length=0).images


@pytest.fixture(scope="module")
def pipe():
    return _load(FLOW_DIR)


def test_shipped_folder_is_an_sd3_pipeline_without_t5(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    index = json.loads((FLOW_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.vae.config.latent_channels == 4
    recipe = json.loads((FLOW_DIR / "recipe.json").read_text())
    assert recipe["seed"] == 0 and not recipe["quick"]
    assert recipe["max_sequence_length"] == recipe["recipe"]["t5_tokens"] == 0
    # The code's recipe is the one that built the shipped folder (pooled dropout included).
    from dataclasses import asdict

    from draft.models.shapes_flow_pretrain import Recipe

    assert recipe["recipe"] == asdict(Recipe())


def test_shipped_pipeline_samples_reproducibly(pipe):
    prompts = shapes.prompts("heldout")[:2]
    a, b = _images(pipe, prompts), _images(pipe, prompts)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, _images(pipe, prompts, seed=1))


def test_shipped_model_draws_what_the_prompt_says(pipe):
    """A smoke test of quality (the full measurement is benchmarks/shapes_base_quality.py)."""
    from draft.rewards.shapes import attribute_accuracy

    prompts = shapes.prompts("train")[::21][:16]
    acc = attribute_accuracy(_images(pipe, prompts, steps=25), prompts)
    assert acc["background"] >= 0.75 and acc["colour"] >= 0.6 and acc["joint"] >= 0.25, acc


def test_shipped_prompt_sets_are_the_worlds_splits():
    for split in ("train", "heldout"):
        lines = (FLOW_DIR / "prompts" / f"{split}.txt").read_text().splitlines()
        assert lines == shapes.prompts(split), split
    assert len(shapes.prompts("heldout")) == 180


def test_shipped_assets_are_within_budget_and_safetensors_only():
    files = [p for p in shapes.ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    flow = [p for p in FLOW_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in flow) < 10e6
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]


def test_quick_pretrain_builds_a_loadable_sd3_pipeline(tmp_path):
    from draft.models.shapes_flow_pretrain import pretrain

    out = pretrain(tmp_path, seed=1, quick=True, progress=False)
    assert out == tmp_path / "shapes-flow"
    p = _load(out)
    assert p.text_encoder_3 is None and p.tokenizer_3 is None
    assert p.vae.config.shift_factor == 0.0
    # The latent scale is re-measured on the pool (1 / std of the latents), as for shapes-sd.
    assert 0.2 < p.vae.config.scaling_factor < 5
    images = _images(p, ["a small red circle on a blue background"] * 2, steps=2)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    info = json.loads((out / "recipe.json").read_text())
    assert info["seed"] == 1 and info["quick"] and set(info["seconds"]) == {"render", "encode", "transformer"}
    assert (out / "prompts" / "heldout.txt").read_text().splitlines() == shapes.prompts("heldout")
    with pytest.raises(FileExistsError):
        pretrain(tmp_path, quick=True, progress=False)


def test_flow_training_step_follows_the_pipelines_conditioning(tmp_path):
    """One training step changes the transformer and both text encoders (trained jointly)."""
    from dataclasses import replace

    from draft.models.shapes_flow_pretrain import build_models, build_tokenizer, load_vae, quick_recipe, train_flow
    from diffusers import StableDiffusion3Pipeline

    recipe = replace(quick_recipe(), steps=1, warmup=1, ema_decay=0.0)
    tok = build_tokenizer(tmp_path / "tok", recipe.max_tokens)
    te1, te2, transformer, scheduler = build_models(tok, recipe)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=load_vae(), text_encoder=te1, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None,
    )
    before = [m.state_dict()[k].clone() for m, k in ((transformer, "proj_out.weight"),
                                                     (te1, "text_model.embeddings.token_embedding.weight"),
                                                     (te2, "text_model.embeddings.token_embedding.weight"))]
    mean = torch.randn(8, 4, 8, 8)
    train_flow(pipe, (mean, torch.zeros_like(mean)), shapes.prompts("train")[:8], recipe, torch.Generator().manual_seed(0),
               progress=False)
    after = [transformer.proj_out.weight, te1.text_model.embeddings.token_embedding.weight,
             te2.text_model.embeddings.token_embedding.weight]
    for b, a in zip(before, after):
        assert not torch.equal(b, a)
    assert not transformer.training and not any(p.requires_grad for p in transformer.parameters())


def test_cli_pretrain_shapes_selects_the_family():
    from draft.cli import build_parser

    args = build_parser().parse_args(["pretrain-shapes", "--model", "shapes-flow"])
    assert args.model == "shapes-flow" and args.out is None
    assert build_parser().parse_args(["pretrain-shapes"]).model == "shapes-sd"
    from draft.errors import UserError

    with pytest.raises(UserError, match="shapes-flow"):
        build_parser().parse_args(["pretrain-shapes", "--model", "flux"])
