"""Run a reference implementation in the reference environment (tests/rewards/reference).

The parity tests (marker `parity`) compare each learned reward with its original
implementation: open_clip, the `image-reward` package, OpenAI's `clip`, transformers'
own processors and post-processing, torchmetrics. Those need torchvision and older
transformers, so they run in a second Python, built by
`tests/rewards/reference/setup_env.sh` and named by DRAFT_REFERENCE_PYTHON. Each
reference script builds its model in code at toy sizes, saves it as the original is
published, and writes its scores; the test loads the saved model with our loader.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REFERENCE_ENV = "DRAFT_REFERENCE_PYTHON"
SCRIPTS = Path(__file__).parent / "reference"


def reference_python() -> str:
    """The reference interpreter; skip without one, fail if the one named is missing."""
    python = os.environ.get(REFERENCE_ENV)
    if not python:
        pytest.skip(f"set {REFERENCE_ENV} (build it with tests/rewards/reference/setup_env.sh; docs/rewards.md)")
    if not os.access(python, os.X_OK):
        pytest.fail(f"{REFERENCE_ENV}={python} is not an executable Python", pytrace=False)
    return python


def run_reference(script: str, out: Path, batches: dict[str, torch.Tensor], prompts: list[str], *args) -> dict:
    """Run reference/`script` on named batches of images (a batch of B images takes the
    first B prompts), writing into `out`; return its result.json, keyed by batch name.
    A failing script fails the test, showing its stderr."""
    python = reference_python()
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "images.npz", **{name: images.numpy() for name, images in batches.items()})
    (out / "prompts.json").write_text(json.dumps(prompts))
    cmd = [python, str(SCRIPTS / script), str(out), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"reference script failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                    f"--- stderr ---\n{proc.stderr[-6000:]}\n--- stdout ---\n{proc.stdout[-2000:]}", pytrace=False)
    return json.loads((out / "result.json").read_text())


def reference_pixels(out: Path, name: str) -> torch.Tensor:
    """The reference's preprocessed pixels for batch `name`."""
    return torch.from_numpy(np.load(out / f"pixels_{name}.npy"))


def split_difference(reward, holder, images: torch.Tensor, prompts: list[str], ref: torch.Tensor,
                     ref_pixels: torch.Tensor, std) -> dict[str, float]:
    """Separate preprocessing from model in |reward(images) - ref|.

    `holder.transform` is the reward's preprocessing and `ref_pixels` the reference's
    (normalised by `std`). Returns the worst end-to-end difference (`e2e`), the model's
    given the reference's pixels (`model`), the pixel difference in 8-bit levels
    (`levels_mean`, `levels_max`), and what is left of the end-to-end difference after
    the first-order effect of the pixel difference, grad . (ours - reference)
    (`residual`): near zero when the pixel difference explains the whole gap.
    """
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    own = holder.transform
    ours_pixels = own(images).detach()
    try:
        holder.transform = lambda pixels: pixels  # score already-preprocessed pixels
        with torch.no_grad():
            on_ref_pixels = reward.score(ref_pixels, prompts)
        x = ours_pixels.clone().requires_grad_(True)
        reward.score(x, prompts).sum().backward()
    finally:
        holder.transform = own
    with torch.no_grad():
        ours = reward(images, prompts)
        predicted = (x.grad * (ours_pixels - ref_pixels)).flatten(1).sum(1)
    levels = ((ours_pixels - ref_pixels) * std * 255).abs()
    return dict(e2e=(ours - ref).abs().max().item(), model=(on_ref_pixels - ref).abs().max().item(),
                levels_mean=levels.mean().item(), levels_max=levels.max().item(),
                residual=(ours - ref - predicted).abs().max().item())


def check_split(name: str, d: dict[str, float], exact: float) -> None:
    """Hold a split_difference from a reference that resizes 8-bit images (torchvision's
    Resize on a PIL image, or a PIL-based processor, runs PIL's resize on the 8-bit image,
    which clips and rounds to 8 bits after each of its two passes; we keep floats):

    - the model agrees to `exact` given the reference's own pixels;
    - where nothing is resized (`native`), the pixels are identical;
    - elsewhere our pixels are within that rounding: 0.35 levels on average, 3 at most
      (at the sharpest edges, where PIL clips a pass's overshoot);
    - and the rounding's first-order effect accounts for at least 95% of the end-to-end
      difference.
    """
    assert d["model"] <= exact, (name, d)
    if name == "native":
        assert d["levels_max"] == 0 and d["e2e"] <= exact, (name, d)
    else:
        assert d["levels_mean"] <= 0.35 and d["levels_max"] <= 3, (name, d)
        assert d["residual"] <= exact + 0.05 * d["e2e"], (name, d)


def record(name: str, numbers: dict[str, float]) -> None:
    """Print a parity result (shown with pytest -s, and in CI's log)."""
    print(f"parity {name}: " + ", ".join(f"{k} {v:.2g}" for k, v in numbers.items()))
