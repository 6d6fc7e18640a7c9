"""Stopping a training run cleanly on SIGTERM, SIGINT (Ctrl-C) or SIGUSR1.

A cluster scheduler sends SIGTERM (or the signal the job asks for) some time before it
kills a preempted or timed-out job. The first signal sets a flag: the loop finishes the
optimizer step in progress, writes a checkpoint and the metrics, and exits with
128 + the signal's number (`draft.errors.Interrupted`), ready for `--resume`. A second
signal exits at once, as the signal's default action would; the atomic checkpoint
writes (`draft.checkpoint`) make that safe too, only the steps since the last
checkpoint are lost.

With several processes a signal may reach only some of them, so after every step the
processes agree (one all-gather of one number) and all stop at the same step.
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class GracefulStop:
    """Context manager: while active, the first of SIGNALS only sets `signum`."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        # Python delivers signals to the main thread only; elsewhere (a notebook's
        # worker thread) the default handling stays.
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum:
            # The second signal: die of it now, as if no handler were installed.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another write to stderr.
        os.write(2, f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                    f"(send it again to stop at once)\n".encode())

    def agreed(self, accelerator) -> int:
        """The signal to stop for, the same on every process (0: keep going)."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch

        flags = accelerator.gather(torch.tensor([self.signum], device=accelerator.device))
        return int(flags.max())
