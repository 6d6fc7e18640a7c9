"""The main job's training step, this tree against another commit's, alternated on one machine.

Runs `draft train` (the embedded default's recipe, unless `--args` says otherwise) for a
few steps from each source tree in turn, `--rounds` times, and reports the seconds per
training step each run logged (`metrics.jsonl`'s `time`, which counts training only, not
loading or evaluation), after the first `--warmup` steps. Alternating puts both trees on
the same machine load, which is what makes the ratio mean something on a shared CPU.

    git archive COMMIT src | tar -x -C /tmp/before
    python benchmarks/step_against_commit.py --baseline-src /tmp/before/src [--steps 15 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "src"


def seconds_per_step(src: Path, steps: int, warmup: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "draft.cli", "train", f"steps={steps}", "log.eval_samples=0",
               f"output_dir={out}", "name=bench", *extra, "--no-progress"]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        rows = [json.loads(line) for line in (Path(out) / "bench" / "metrics.jsonl").read_text().splitlines()]
        times = {r["step"]: r["time"] for r in rows if "time" in r}
        return (times[steps] - times[warmup]) / (steps - warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-src", required=True, help="the other commit's src folder")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--args", default="", help="extra `draft train` overrides, space-separated")
    a = ap.parse_args()
    trees = {"baseline": Path(a.baseline_src).resolve(), "this tree": HERE}
    out: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(a.rounds):
        for name, src in trees.items():
            out[name].append(round(seconds_per_step(src, a.steps, a.warmup, a.args.split()), 3))
            print(name, out[name][-1], flush=True)
    med = {name: statistics.median(v) for name, v in out.items()}
    print(json.dumps({"seconds_per_step": out, "median": med, "ratio": round(med["this tree"] / med["baseline"], 3),
                      "args": a.args}, indent=1))


if __name__ == "__main__":
    main()
