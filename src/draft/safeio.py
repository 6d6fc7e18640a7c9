"""Files that are either whole or absent, and safetensors that are checked before use.

Writing: every file of a run folder is written under a temporary name beside its final
one, flushed to disk and renamed into place (`os.replace` is atomic on POSIX), so a
crash, a full disk or an I/O error leaves the old file or the new one, never half of
one. A write that fails raises `WriteFailed` (a `TrainingStopped`: the CLI prints one
line and exits 1) naming what was being written and where, after removing its
temporary file.

Reading: a corrupt or truncated safetensors file (a copy cut short, a download that
stopped) is a `UserError` naming the file, not a `SafetensorError` traceback.
`safe_open` reads the header and checks that its tensors cover the file exactly, which
catches truncation without reading the tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from draft.errors import TrainingStopped, UserError


class WriteFailed(TrainingStopped):
    """A run-folder write failed (no space, no permission, I/O error); the message says which and where."""


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def write_failed(what: str, path: Path, e: OSError) -> WriteFailed:
    return WriteFailed(f"could not write {what} to {path}: {_reason(e)}")


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], what: str) -> Path:
    """Call `write(tmp)` to write the file, then rename tmp to `path`; WriteFailed if any of it fails."""
    path = Path(path)
    tmp = _temp(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        # Any failure (an I/O error, a writer's own error, Ctrl-C) leaves no temporary file.
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise write_failed(what, path, e) from None
        raise
    return path


def write_text(path: str | os.PathLike, text: str, what: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), what)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing what is there (OSError if that fails).

    A crash between the two renames leaves `final` missing and both versions beside it,
    never a mixture of the two.
    """
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def write_dir(final: Path, write: Callable[[Path], None], what: str) -> Path:
    """Call `write(tmp)` to fill a temporary folder beside `final`, then put it in place."""
    import shutil

    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        replace_dir(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(what, final, e) from None
    return final


def ensure_folder(folder: str | os.PathLike, what: str) -> Path:
    """Check, without creating anything, that `folder` could be created and written; WriteFailed if not.

    (Creating it here would leave an empty folder behind when a later check fails.)
    """
    import errno

    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    code = None
    if not existing.is_dir():
        code = errno.ENOTDIR
    elif not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EACCES
    if code is not None:
        raise write_failed(what, folder, OSError(code, os.strerror(code)))
    return folder


@contextlib.contextmanager
def writing(what: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError in the block into WriteFailed (for writers that manage their own files)."""
    try:
        yield
    except OSError as e:
        raise write_failed(what, Path(path), e) from None


def append_line(path: Path, line: str, what: str) -> None:
    """Append one line; if that fails, cut the file back to where it was (no torn last line)."""
    try:
        with open(path, "ab") as f:
            start = f.tell()
            try:
                f.write(line.encode() + b"\n")
                f.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(start)
                raise
    except OSError as e:
        raise write_failed(what, path, e) from None


# --- reading safetensors ------------------------------------------------------------------------


def check_safetensors(path: str | os.PathLike, what: str = "") -> Path:
    """Check that `path` is a whole safetensors file; UserError naming it if not."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what + ' ' if what else ''}{path} is not a readable safetensors file "
                        f"(corrupt or truncated: {first})") from None
    return path


def load_safetensors(path: str | os.PathLike, what: str = "") -> dict:
    """`safetensors.torch.load_file`, with a corrupt or truncated file a UserError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:  # e.g. the file changed between the check and the read
        raise UserError(f"{what + ' ' if what else ''}{path} cannot be read: {e}") from None


def corrupt_in(folder: str | os.PathLike, what: str) -> UserError | None:
    """The error for the first corrupt safetensors file under `folder`, or None if all are whole."""
    root = Path(folder)
    for file in sorted(root.rglob("*.safetensors")) if root.is_dir() else []:
        try:
            check_safetensors(file, what)
        except UserError as e:
            return e
    return None
