"""Sampling cost of shapes-flow against shapes-sd, measured in one run.

Median seconds of one diffusers pipeline call sampling a batch of 4 with 50 steps and
classifier-free guidance (shapes-sd: DDIM at guidance 7.5; shapes-flow: flow Euler at
guidance 4, `max_sequence_length` as trained), the two models alternating `--rounds` times
so both see the same machine load.

    OMP_NUM_THREADS=1 python benchmarks/shapes_flow_speed.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

GUIDANCE = {"shapes-sd": 7.5, "shapes-flow": 4.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from diffusers.utils import logging

    logging.set_verbosity_error()
    from shapes_base_quality import load, sampling_speed

    pipes = {m: load(m) for m in GUIDANCE}
    for pipe, _ in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    out: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for m, (pipe, kw) in pipes.items():
            out.setdefault(m, []).append(round(sampling_speed(pipe, 4, 50, GUIDANCE[m], repeats=3, **kw), 3))
    print(json.dumps({"seconds_batch4": out, "threads": torch.get_num_threads(), "guidance": GUIDANCE}))


if __name__ == "__main__":
    main()
