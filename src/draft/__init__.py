"""draft: reward fine-tuning of diffusion models by backpropagating through sampling.

DRaFT, DRaFT-K and DRaFT-LV (Clark, Vicol, Swersky & Fleet, ICLR 2024, arXiv 2309.17400)
and their neighbours on one sampling loop. The heavy imports (torch, diffusers) happen
when a name below is first used, so `import draft` and `draft --help` stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "TrainConfig": "draft.config",
    "load_config": "draft.config",
    "load_model": "draft.models",
    "train": "draft.trainer",
    "sample": "draft.inference",
    "evaluate": "draft.evaluation",
    "rewards": "draft.rewards",
    "UserError": "draft.errors",
    "Size": "draft.models.protocol",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'draft' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if name == "rewards" else getattr(module, name)
