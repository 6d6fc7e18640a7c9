"""Fixtures for the reward tests: tiny random models saved as the real checkpoints are.

The builders live in reward_models.py so test modules can import them by a unique name.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from reward_models import SIDE, seeded, tiny_clip_config, write_clip_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "parity: compares a reward with its original implementation in the "
                                       "reference environment (DRAFT_REFERENCE_PYTHON; tests/rewards/reference_env.py)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With a reference environment given, a parity test that skips has failed: the
    comparison it exists for did not run (CI relies on this)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("parity") and os.environ.get("DRAFT_REFERENCE_PYTHON"):
        report.outcome = "failed"
        report.longrepr = f"parity test skipped although DRAFT_REFERENCE_PYTHON is set: {report.longrepr}"


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP checkpoint folder: model.safetensors, tokenizer, preprocessor_config.json."""
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("clip")
    tok = write_clip_tokenizer(folder)
    model = seeded(lambda: CLIPModel(tiny_clip_config(len(tok))))
    with torch.no_grad():  # a visible logit scale, as trained models have
        model.logit_scale.fill_(4.0)
    model.save_pretrained(folder)
    square = {"height": SIDE, "width": SIDE}
    CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size=square).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def aesthetic_head(tmp_path_factory) -> Path:
    """An MLP head with the LAION predictor's layout (layers.0/2/4/6/7), as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    sizes = [16, 64, 32, 16, 8, 1]  # real: 768, 1024, 128, 64, 16, 1
    state = {}
    for index, (i, o) in zip([0, 2, 4, 6, 7], zip(sizes, sizes[1:])):
        layer = torch.nn.Linear(i, o)
        # Gains above the default init, so scores spread across images as a trained head's do.
        state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = layer.weight.data * 4, layer.bias.data
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.safetensors"
    save_file(state, str(path))
    return path


