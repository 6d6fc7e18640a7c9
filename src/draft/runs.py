"""The run folder: where a training run writes, and the rules for reusing one.

    runs/<name>/
      config.yaml        the resolved configuration
      metrics.jsonl      one JSON object per logged step
      lora/              the final adapter in diffusers format
      lora-best/         the held-out guard's best adapter, with best.json (`draft.guard`)
      checkpoints/       resumable training state (draft.checkpoint)
      samples/           fixed-seed image grids
      report/            plots, before/after grid, eval.json
      logs/              TensorBoard event files

A run in progress holds a lock (`lock`) on `.<name>.lock` beside its folder, so a second
`draft train` (or `--resume`, or `--overwrite`) on the same folder is refused while the
first goes on. The lock is an `fcntl.flock`, which the operating system releases when
the process ends however it ends, so a crashed or killed run never leaves it behind.
Every file is written whole or not at all (`draft.safeio`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from draft import safeio
from draft.errors import UserError

BEST_LORA = "lora-best"  # the held-out guard's best LoRA, beside lora/ (`draft.guard`)


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
    def lora_best(self) -> Path:
        return self.root / BEST_LORA

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

    def create(self, overwrite: bool, write_config: Callable[[], None] = lambda: None) -> None:
        """Make the folder and write its config; a folder made here is removed again if that fails."""
        fresh = overwrite or not self.root.exists()
        try:
            with safeio.writing("the run folder", self.root):
                if overwrite and self.root.exists():
                    shutil.rmtree(self.root)
                for folder in (self.root, self.samples, self.report):
                    folder.mkdir(parents=True, exist_ok=True)
            write_config()
        except safeio.WriteFailed:
            if fresh:  # a folder with no config.yaml could be neither resumed nor reused
                shutil.rmtree(self.root, ignore_errors=True)
            raise

    def save_grid(self, step: int, samples, ncol: int) -> Path:
        """The fixed-seed grid of step `step` (`samples/step-N.png`; videos: a frame strip and a GIF)."""
        from draft.report import save_grid

        return save_grid(samples, self.samples / f"step-{step:08d}.png", ncol)

    def write_results(self, model, after, ncol: int, eval_before: dict | None, evaluate: Callable[[], dict | None],
                      adapter: dict | None = None):
        """The end of a run, in the order that keeps the most if something fails: the LoRA, the
        evaluation after training, the before/after grid, eval.json, the plots, the model card.
        `adapter`: the LoRA's weights when gathered beforehand (sharded, on every process)."""
        from draft.card import write_card
        from draft.lora import save_lora
        from draft.report import comparison, plot_metrics, save_before_after

        # Written whole into a folder beside lora/, then renamed: never a half-written adapter.
        safeio.write_dir(self.lora, lambda tmp: save_lora(model, tmp, layers=adapter), "the LoRA")
        eval_after = evaluate()
        before = self.samples / f"step-{0:08d}.png"
        if before.is_file() and after is not None:
            save_before_after(before, after, self.report / "before_after.png", ncol)
        safeio.write_text(self.report / "eval.json", json.dumps({"before": eval_before, "after": eval_after},
                                                                indent=2), "the evaluation")
        with safeio.writing("the plots", self.report):
            plot_metrics(self.metrics, self.report)
        with safeio.writing("the model card", self.lora):
            write_card(self.root)  # lora/README.md, from the files written above
        if self.lora_best.is_dir():
            with safeio.writing("the model card", self.lora_best):
                write_card(self.root, self.lora_best)
        if eval_after:
            kind = "videos" if after is not None and after.ndim == 5 else "images"
            print(comparison(eval_before, eval_after, f"held-out, {eval_after['n']} {kind}"))
        print(f"run folder: {self.root}  (LoRA: {self.lora})", flush=True)

    def append_metrics(self, row: dict) -> None:
        safeio.append_line(self.metrics, json.dumps(row), "a metrics line")

    @property
    def lock_file(self) -> Path:
        return self.root.parent / f".{self.root.name}.lock"

    def lock(self) -> "RunLock":
        """Hold the run folder for this process; UserError if another process holds it."""
        return RunLock.acquire(self.lock_file, self.root)

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
        safeio.write_text(self.metrics, "".join(line + "\n" for line in keep), "the metrics")


class RunLock:
    """An exclusive `flock` on a lock file; the file holds the owner's pid for the message."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, path: Path, run: Path) -> "RunLock":
        import fcntl

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the output folder {path.parent}: {e.strerror or e}") from None
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot create the lock file {path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(f"run folder {run} is in use by another draft train (process {owner}); "
                                f"wait for it to end, or stop it (it checkpoints on SIGTERM)") from None
            # The previous holder may have removed the file between our open and our lock:
            # then we hold a lock on a file nobody else can see, so start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return cls(fd, path)
            os.close(fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it, so nobody locks the old file afterwards
        os.close(self.fd)
        self.fd = -1
