"""One rule for telling a Hugging Face hub id from a local path."""

from __future__ import annotations

import re
from pathlib import Path

_ID = re.compile(r"[\w.-]+/[\w.-]+")
_BARE = re.compile(r"[\w.-]+")


def is_hub_id(name: str, bare: bool = False) -> bool:
    """Whether `name` is a hub id ("owner/name"; with `bare`, also a plain "name", as older
    model repositories are named) and not a local path: nothing by that name exists here,
    it does not start with ".", "/" or "~", and it uses only the characters the hub allows."""
    if not isinstance(name, str) or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return False
    return bool(_ID.fullmatch(name) or (bare and _BARE.fullmatch(name)))
