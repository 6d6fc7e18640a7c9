"""User-facing errors.

A `UserError` is a problem with what the user asked for (a config key, a path, a reward
name), not a bug. The CLI prints its message on one line and exits with code 2, without a
traceback; the Python API lets it propagate like any other exception.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: the message names the problem and, where possible, the fix."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """The error for a name that is not among `choices`, listing them."""
    choices = sorted(choices)
    return UserError(
        f"unknown {kind} {name!r}{did_you_mean(name, choices)}; choose from: {', '.join(choices)}"
    )


class TrainingStopped(Exception):
    """A run stopped itself (e.g. too many non-finite steps); the message says why and what is kept."""


class Interrupted(Exception):
    """A run stopped on a signal after checkpointing its last step; `--resume` continues it.

    The CLI exits with 128 + the signal's number, the shell's convention for a process
    ended by that signal: 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
