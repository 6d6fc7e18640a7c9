"""The shipped shapes-sd pipeline and the recipe that builds it."""

import json

import pytest
import torch

from draft.models import shapes


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(shapes.PIPELINE_DIR)
    p.set_progress_bar_config(disable=True)
    return p


def _images(pipe, prompts, seed=0, steps=20):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, generator=gen, output_type="pt").images


def test_shipped_pipeline_loads_and_samples_reproducibly(pipe):
    from diffusers import DDIMScheduler

    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.steps_offset) == ("scaled_linear", 0.00085, 0.012, 1)
    assert pipe.safety_checker is None
    prompts = shapes.prompts("heldout")[:2]
    a, b = _images(pipe, prompts), _images(pipe, prompts)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, _images(pipe, prompts, seed=1))


def test_tokenizer_has_one_token_per_word(pipe):
    for word in shapes.VOCAB:
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings


def test_shipped_model_draws_what_the_prompt_says(pipe):
    """A smoke test of quality (the full measurement is benchmarks/shapes_base_quality.py)."""
    from draft.rewards.shapes import attribute_accuracy

    prompts = shapes.prompts("train")[::21][:16]
    acc = attribute_accuracy(_images(pipe, prompts, steps=25), prompts)
    assert acc["background"] >= 0.75 and acc["colour"] >= 0.6 and acc["joint"] >= 0.25, acc


def test_shipped_assets_are_small_and_safetensors_only():
    files = [p for p in shapes.ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25e6
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]


@pytest.mark.slow
def test_quick_pretrain_builds_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from draft.models.shapes_classifier import load_classifier
    from draft.models.shapes_pretrain import pretrain

    out = pretrain(tmp_path, seed=1, quick=True, progress=False)
    assert out == tmp_path / "shapes-sd"
    p = StableDiffusionPipeline.from_pretrained(out)
    p.set_progress_bar_config(disable=True)
    assert _images(p, ["a small red circle on a blue background"], steps=2).shape == (1, 3, 32, 32)
    clf = load_classifier(tmp_path / "shapes-classifier")
    assert set(clf(torch.rand(1, 3, 32, 32))) == set(shapes.ATTRIBUTES)
    assert json.loads((out / "recipe.json").read_text())["seed"] == 1
    with pytest.raises(FileExistsError):
        pretrain(tmp_path, quick=True, progress=False)


def test_draft_load_model_gives_the_pipelines_images(pipe):
    """`draft.load_model("shapes-sd")` is the same model as the diffusers folder, same seed, same images."""
    import draft
    from draft.config import SamplingConfig
    from draft.inference import generate

    prompts = shapes.prompts("heldout")[:3]
    ours = generate(draft.load_model("shapes-sd"), prompts, [5, 5, 5], SamplingConfig(num_steps=20))
    theirs = torch.cat([pipe(p, num_inference_steps=20, guidance_scale=7.5, generator=torch.Generator().manual_seed(5),
                             output_type="pt").images for p in prompts])
    # float32 arithmetic in a different order over 20 guided steps and a VAE decode
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)


@pytest.mark.slow
def test_a_short_training_run_raises_shapes_alignment(tmp_path):
    """A few DRaFT-LV steps on four prompts the base model gets wrong raise their reward.

    The margin (a third of the gap to a perfect score) is several times the seed-to-seed
    spread of this run; a zero or sign-flipped gradient leaves the reward where it was or
    lowers it.
    """
    import draft
    from draft.config import LogConfig, SamplingConfig

    prompts = "|".join(["a small black star on a white background", "a small blue cross on a yellow background",
                        "a small red diamond on a green background", "a large white square on a black background"])
    config = draft.TrainConfig(
        prompts=prompts, eval_prompts=prompts, steps=30, batch_size=4, lr=3e-3, seed=0,
        output_dir=str(tmp_path), name="run", sampling=SamplingConfig(num_steps=10),
        log=LogConfig(sample_every=100, sample_prompts=2, sample_seeds=1, eval_samples=16, trackers=()),
    )
    run = draft.train(config, progress=False)
    result = json.loads((run / "report" / "eval.json").read_text())
    before, after = result["before"]["reward_mean"], result["after"]["reward_mean"]
    assert after > before + abs(before) / 3, (before, after)
