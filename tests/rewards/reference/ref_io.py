"""Inputs and outputs shared by the reference scripts (see tests/rewards/reference_env.py).

Each script is run as `python SCRIPT.py OUT_DIR [ARGS...]`. It reads OUT_DIR/images.npz
(named batches of float [B, 3, H, W] images on the 8-bit grid) and OUT_DIR/prompts.json
(the prompts; a batch of B images takes the first B), builds its model once and saves it
into OUT_DIR, and writes, for each batch, its scores to OUT_DIR/result.json under the
batch's name and its preprocessed pixels to OUT_DIR/pixels_NAME.npy.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def inputs():
    """(output folder, {batch name: PIL images}, prompts, remaining command-line arguments)."""
    out = Path(sys.argv[1])
    with np.load(out / "images.npz") as data:
        batches = {name: [Image.fromarray((im.transpose(1, 2, 0) * 255).round().astype(np.uint8)) for im in data[name]]
                   for name in data.files}
    return out, batches, json.loads((out / "prompts.json").read_text()), sys.argv[2:]


def save_pixels(out, name, pixels):
    np.save(Path(out) / f"pixels_{name}.npy", np.asarray(pixels, dtype=np.float32))


def write_result(out, result):
    (Path(out) / "result.json").write_text(json.dumps(result))
