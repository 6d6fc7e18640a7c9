"""The run folder: where a training run writes, and the rules for reusing one.

    runs/<name>/
      config.yaml        the resolved configuration
      metrics.jsonl      one JSON object per logged step
      lora/              the final adapter in diffusers format
      checkpoints/       resumable training state (draft.checkpoint)
      samples/           fixed-seed image grids
      report/            plots, before/after grid, eval.json
      logs/              TensorBoard event files
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from draft.errors import UserError


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def check_usable(self, resume: bool, overwrite: bool) -> None:
        """Refuse to clobber a run or to resume one that does not exist; check writability."""
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other; choose one")
        if resume:
            if not self.config.is_file():
                raise UserError(f"nothing to resume: {self.root} holds no run (no config.yaml)")
        elif self.root.exists() and any(self.root.iterdir()) and not overwrite:
            raise UserError(f"run folder {self.root} already exists; pass --resume to continue it or --overwrite to replace it")
        parent = self.root
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot write the run folder {self.root}: {parent} is not a writable folder")

    def create(self, overwrite: bool) -> None:
        if overwrite and self.root.exists():
            shutil.rmtree(self.root)
        for folder in (self.root, self.samples, self.report):
            folder.mkdir(parents=True, exist_ok=True)

    def append_metrics(self, row: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, last_step: int) -> None:
        """Drop metric lines after `last_step` (a resume restarts from that step's checkpoint)."""
        if not self.metrics.is_file():
            return
        keep = []
        for line in self.metrics.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by a crash mid-write
        tmp = self.metrics.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics)
