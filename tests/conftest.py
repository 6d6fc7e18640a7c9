"""Shared fixtures: a tiny, randomly initialised Stable Diffusion pipeline built in code.

Nothing is downloaded. The pipeline has the real architecture classes (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler) at toy sizes, is saved with
`save_pretrained` and loaded back through the same code users go through.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from draft.models.tiny import PROMPTS, build_tiny_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """Path of a tiny random SD pipeline folder (epsilon prediction)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """Path of a tiny random SD pipeline folder with v-prediction (SD 2.x style)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction", seed=1)


@pytest.fixture
def tiny_model(tiny_sd):
    from draft.models import load_model

    return load_model(str(tiny_sd))


@pytest.fixture
def tiny_lora(tiny_model):
    """(tiny_model, its rank-4 LoRA parameters), the LoRA moved off its zero init: with B = 0
    A would get no gradient."""
    import torch

    from draft.config import LoraConfig
    from draft.lora import add_lora

    params = add_lora(tiny_model, LoraConfig(rank=4))
    with torch.no_grad():
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    return tiny_model, params


@pytest.fixture
def launch_two_processes():
    """(command prefix, env) that runs `draft` as 2 CPU processes under `accelerate launch`,
    one thread each; append the subcommand and its arguments."""
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "draft.cli"]
    return launch, env


@pytest.fixture
def prompts():
    return list(PROMPTS)


@pytest.fixture
def one_thread():
    """Run the test's in-process training on one thread, like the subprocesses it is compared
    with (OMP_NUM_THREADS=1): kernels on other thread counts round differently, and training
    amplifies that past the tolerance of a bit-for-bit comparison."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
