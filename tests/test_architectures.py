"""Every preset at its model's real size, built on the meta device from draft's own copies of
the configs (`draft.models.architectures`): no weight is read, nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from draft.config import load_config
from draft.estimate import estimate
from draft.models import ADAPTERS, meta, pipeline_class
from draft.models.architectures import ARCHITECTURES, PUBLISHED, builtin_configs, write_configs

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def stored(module: torch.nn.Module) -> int:
    """Parameters plus floating-point buffers: what a checkpoint stores (SD3's positional
    embedding is a buffer, and the published 2.5B of SD 3.5 Medium counts it)."""
    return sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for b in module.buffers() if b.is_floating_point())


def held_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """What the module's tensors take once loaded in `dtype` (integer buffers keep theirs)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
               for t in (*module.parameters(), *module.buffers()))


@pytest.fixture(scope="module")
def built():
    """hub id -> (its configs folder, its components on the meta device), each built once."""
    cache = {}

    def get(hub_id):
        if hub_id not in cache:
            folder = builtin_configs(hub_id)
            cache[hub_id] = folder, meta.components(folder)
        return cache[hub_id]

    return get


def test_there_are_presets_and_each_names_a_built_in_architecture():
    assert PRESETS
    for path in PRESETS:
        assert load_config(path).model in ARCHITECTURES, path.name


@pytest.mark.parametrize("hub_id", sorted(ARCHITECTURES))
def test_the_real_size_matches_the_published_parameter_counts(hub_id, built):
    folder, components = built(hub_id)
    assert pipeline_class(str(folder)) in ADAPTERS
    index = json.loads((folder / "model_index.json").read_text())
    with_config = {name for name in index if (folder / name / "config.json").is_file()}
    assert set(components) == with_config  # every component with a config is built
    assert all(t.is_meta for m in components.values() for t in (*m.parameters(), *m.buffers()))
    for name, (count, tolerance, source) in PUBLISHED[hub_id].items():
        assert abs(stored(components[name]) / count - 1) <= tolerance, (name, stored(components[name]), source)


@pytest.mark.parametrize("hub_id", sorted(ARCHITECTURES))
def test_the_tokenizers_say_the_real_text_lengths(hub_id, tmp_path):
    folder = write_configs(hub_id, tmp_path)
    assert folder == tmp_path
    for config in folder.glob("tokenizer*/tokenizer_config.json"):
        data = json.loads(config.read_text())
        # CLIP's 77 positions, T5's 512, Qwen2.5's and Mistral Small 3's contexts (Qwen-Image's and
        # FLUX.2's pipelines cut prompts to their own length)
        expected = {"CLIPTokenizer": 77, "Qwen2Tokenizer": 131072, "LlamaTokenizerFast": 131072}.get(
            data["tokenizer_class"], 512)
        assert data["model_max_length"] == expected, config


def test_an_unknown_hub_id_is_refused_with_the_closest_one(tmp_path):
    from draft.errors import UserError

    with pytest.raises(UserError, match="did you mean 'black-forest-labs/FLUX.1-dev'"):
        write_configs("black-forest-labs/FLUX.1-dv", tmp_path)
    assert builtin_configs("someone/else") is None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """preset name -> (its overrides, config and estimate), each estimated once. The learned
    rewards' weight files are a placeholder: the dry run only reads their headers."""
    from safetensors.torch import save_file

    from draft import rewards

    weights = tmp_path_factory.mktemp("reward") / "head.safetensors"
    save_file({"w": torch.zeros(4)}, str(weights))
    out = {}
    for path in PRESETS:
        spec = load_config(path).reward
        overrides = [f"reward_args.{name}.model={weights}" for name in rewards._parse(spec)
                     if "model" in getattr(rewards.available().get(name), "needs", ())]
        config = load_config(path, overrides)
        out[path.name] = overrides, config, estimate(config, builtin_configs(config.model))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p.name for p in PRESETS])
def test_every_preset_is_estimated_at_real_size(preset, runs, built):
    _, config, est = runs[preset]
    _, components = built(config.model)
    dtype = DTYPES[config.mixed_precision]
    # SDXL's VAE asks for float32 (force_upcast) and is loaded and kept so, whatever the run's precision.
    from draft.models import family

    sdxl = family(config.model).__name__ == "StableDiffusionXL"
    kept = {"vae": torch.float32} if sdxl and components["vae"].config.get("force_upcast") else {}
    assert est.parts == {name: held_bytes(m, kept.get(name, dtype)) for name, m in components.items()}
    # text_encoders=cache (FLUX.2-dev's preset) releases the encoders once the prompts are encoded
    resident = {n: b for n, b in est.parts.items() if config.text_encoders == "device" or "text_encoder" not in n}
    assert est.weights == sum(resident.values())
    assert est.lora_params > 0 and est.activations > 0
    assert est.peak > est.weights > 2**30  # every preset's model holds more than 1 GiB of weights


@pytest.fixture
def estimated_once(runs, monkeypatch):
    """`draft.estimate.estimate` answered from `runs` for the same config (the reward's
    arguments aside: they change no estimate) on draft's copy of the model's configs, so the
    commands below cost no second estimate; an estimate of anything else fails the test."""
    import draft.estimate

    known = [(config.replace(reward_args={}), builtin_configs(config.model), est) for _, config, est in runs.values()]

    def estimated(config, folder, reward_bytes=0):
        return next(est for c, f, est in known if (c, f) == (config.replace(reward_args={}), folder))

    monkeypatch.setattr(draft.estimate, "estimate", estimated)


@pytest.mark.slow
def test_the_dry_run_prints_an_estimate_for_every_preset(runs, estimated_once, tmp_path, monkeypatch, capsys):
    """`draft train configs/X.yaml --dry-run` with no network and nothing in the Hugging Face
    cache prints the estimate of the preset's model at its real size."""
    from draft import cli

    monkeypatch.chdir(tmp_path)  # the run folder checks look here
    monkeypatch.setattr("draft.preflight.cached_hub_configs", lambda *args, **kwargs: None)
    for path in PRESETS:
        overrides, _, est = runs[path.name]
        assert cli.main(["train", str(path), "--dry-run", *overrides]) == 0, path.name
        out = capsys.readouterr().out
        assert "built-in copy of the model's architecture" in out, path.name
        assert f"# {est.lines()[0]}\n" in out, path.name


def test_the_fits_table_has_a_cell_per_preset_and_option(monkeypatch, capsys):
    """`python -m draft.fits`: a row per preset, a cell per memory option, each option added to
    those before it, each cell the estimate's peak and the smallest card it fits."""
    import draft.estimate
    from draft import fits
    from draft.estimate import GIB, Estimate

    seen = []

    def estimated(config, folder, reward_bytes=0):
        seen.append((config.model, config.text_encoders, config.sampling.block_checkpointing, config.quantize))
        gib = {"device": 90, "cache": 60}[config.text_encoders] - 20 * config.sampling.block_checkpointing
        return Estimate((gib - {"none": 0, "int8": 10, "nf4": 30}[config.quantize]) * GIB, 0, 0, 0, 1)

    monkeypatch.setattr(draft.estimate, "estimate", estimated)
    monkeypatch.setattr(fits, "run_size", lambda config: "SIZE")
    assert fits.main(["--configs", str(PRESETS[0].parent)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [p.name for p in PRESETS]
    added = [("cache", False, "none"), ("cache", True, "none"), ("cache", True, "int8"), ("cache", True, "nf4")]
    expected = []
    for path in PRESETS:
        c = load_config(path)
        expected += [(c.model, c.text_encoders, c.sampling.block_checkpointing, c.quantize)]
        expected += [(c.model, *step) for step in added]
    assert seen == expected
    for row, path in zip(rows, PRESETS):
        cells = [c.strip() for c in row.strip("|").split("|")][-5:]
        shipped = estimated(load_config(path), None)
        assert cells == [fits.cell(shipped), "60.0 GiB: 80 GB", "40.0 GiB: 48 GB", "30.0 GiB: 40 GB", "10.0 GiB: 24 GB"]


@pytest.mark.slow
def test_the_readmes_fits_table_is_the_estimates():
    """The README's "What fits where" is `python -m draft.fits` as the code estimates today."""
    from draft import fits

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- fits: python -m draft.fits -->\n", "\n<!-- /fits -->"
    shown = readme[readme.index(start) + len(start):readme.index(end)]
    assert shown == fits.table(PRESETS[0].parent) + "\n\n" + fits.NOTE
