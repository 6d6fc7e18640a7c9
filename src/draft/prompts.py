"""Prompts: the sets a model ships, the general set, and files in the forms people keep them in.

A prompt spec (the `prompts` and `eval_prompts` config keys, `draft eval --prompts`) is one of:

- ``a red cat|a blue dog``: prompts separated by ``|``;
- a prompt set's name: the sets the model's pipeline folder ships as ``prompts/<name>.txt``
  (``train`` and ``heldout`` on shapes-sd), and the general sets below;
- a text file, one prompt per line (blank lines and ``#`` comments skipped);
- ``FILE.csv[:COLUMN]`` or ``FILE.tsv[:COLUMN]``: a column of a table with a header row
  (default: the ``prompt`` column, or the only one);
- ``FILE.jsonl[:FIELD]``: a field of one JSON object per line (default: ``prompt``);
- otherwise, if it has a space and no path separator, the single prompt itself.

A model that ships no prompt sets (any pipeline folder but the embedded models, any hub id)
trains on the general animal prompts: ``train`` is the simple-animals list of DDPO's
aesthetic experiment, ``heldout`` fifteen more common animals, and ``animals`` both
(`src/draft/prompts/animals.txt`, where the split is marked).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from draft.errors import UserError, did_you_mean

GENERAL_DIR = Path(__file__).resolve().parent / "prompts"
# The general set, and the line in it that starts its held-out part.
GENERAL = "animals"
HELDOUT_MARK = "# heldout"
# `FILE.csv:column`, `FILE.jsonl:field`: a table or JSON-lines file and what to read from it.
_TABLE = re.compile(r"^(?P<path>.+\.(?P<ext>csv|tsv|jsonl))(?::(?P<column>[^/\\]*))?$", re.IGNORECASE)


@dataclass(frozen=True)
class PromptSet:
    """A shipped prompt set: a text file, or one part of it ('train' or 'heldout')."""

    path: Path
    part: str = ""  # "": the whole file
    own: bool = False  # shipped by the model itself (else a general set)

    def read(self) -> list[str]:
        lines = [line.strip() for line in self.path.read_text(encoding="utf-8").splitlines()]
        if self.part:
            cut = lines.index(HELDOUT_MARK) if HELDOUT_MARK in lines else len(lines)
            lines = lines[:cut] if self.part == "train" else lines[cut + 1 :]
        return [line for line in lines if line and not line.startswith("#")]


def model_folder(model: str) -> Path | None:
    """The pipeline folder of `model` (an embedded name or a local folder); None for a hub id."""
    if not model:
        return None
    from draft.models import resolve

    source, local = resolve(model)  # checks the folder without loading any weights
    return Path(source) if local else None


def named_sets(model: str = "") -> dict[str, PromptSet]:
    """The prompt sets that apply to `model`, by name: its own, else the general train/heldout split."""
    general = {p.stem: PromptSet(p) for p in sorted(GENERAL_DIR.glob("*.txt"))}
    folder = model_folder(model)
    own = {p.stem: PromptSet(p, own=True) for p in sorted((folder / "prompts").glob("*.txt"))} if folder else {}
    if not own:
        path = GENERAL_DIR / f"{GENERAL}.txt"
        own = {"train": PromptSet(path, "train"), "heldout": PromptSet(path, "heldout")}
    return {**general, **own}


def describe_sets(sets: dict[str, PromptSet], model: str = "") -> str:
    """The sets for a message: 'heldout, train (shapes-sd's own); animals (general)'."""
    who = model or "the model"
    own = sorted(n for n, s in sets.items() if s.own)
    parts = sorted(n for n, s in sets.items() if s.part)
    general = sorted(n for n, s in sets.items() if not s.own and not s.part)
    if own:
        return f"{', '.join(own)} ({who}'s own); {', '.join(general)} (general)"
    return f"{', '.join(parts)} (parts of the general {GENERAL!r}; {who} ships no sets of its own); {', '.join(general)}"


def load_prompts(spec: str, model: str = "") -> list[str]:
    """The prompts `spec` names (the forms are listed in this module's docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("prompts must name a prompt set, a file, or 'a|b|c'")
    spec = spec.strip()
    if "|" in spec:
        prompts = [p.strip() for p in spec.split("|") if p.strip()]
    else:
        sets = named_sets(model)
        table = _TABLE.match(spec)
        path = Path(spec).expanduser()
        if spec in sets:
            prompts = sets[spec].read()
        elif table and Path(table["path"]).expanduser().is_file():
            prompts = _read_table(Path(table["path"]).expanduser(), table["ext"].lower(), table["column"])
        elif path.is_file():
            prompts = _read_text(path)
        elif " " in spec and "/" not in spec and "\\" not in spec and not table and not spec.endswith(".txt"):
            prompts = [spec]
        else:
            hint = did_you_mean(spec, sets)
            raise UserError(
                f"prompt set or file {spec!r} not found{hint}; sets for {model or 'this model'}: "
                f"{describe_sets(sets, model)}; or give a .txt/.csv/.jsonl file or 'a|b|c'"
            )
    if not prompts:
        raise UserError(f"prompts {spec!r} holds no prompts")
    return prompts


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a BOM from a spreadsheet export is not a prompt
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _read_text(path: Path) -> list[str]:
    lines = (line.strip() for line in _text(path).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _read_table(path: Path, ext: str, column: str | None) -> list[str]:
    """The `column` of a CSV/TSV file, or the `column` field of a JSON-lines file."""
    if ext == "jsonl":
        rows = []
        for n, line in enumerate(_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {n} is not a JSON object; each line must be one, e.g. {{\"prompt\": ...}}")
            rows.append((n, row))
        names = list(rows[0][1]) if rows else []
        kind = "field"
    else:
        # StringIO keeps quoted fields that span lines whole, as the csv module expects.
        reader = csv.DictReader(io.StringIO(_text(path), newline=""), delimiter="\t" if ext == "tsv" else ",")
        try:
            names = [n for n in reader.fieldnames or [] if n]
            rows = [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            raise UserError(f"{path} is not a valid {ext.upper()} file ({e})") from None
        kind = "column"
    if not column:
        if "prompt" in names or ext == "jsonl":
            column = "prompt"
        elif len(names) == 1:
            column = names[0]
        else:
            raise UserError(f"{path} has no {kind} 'prompt'; name the one to read, e.g. prompts={path}:"
                            f"{names[0] if names else kind} ({kind}s: {', '.join(names) or 'none'})")
    if ext != "jsonl" and column not in names:
        raise UserError(f"{path} has no {kind} {column!r}{did_you_mean(column, names)}; {kind}s: {', '.join(names) or 'none'}")
    prompts = []
    for n, row in rows:
        value = row.get(column)
        if ext == "jsonl" and column not in row:
            raise UserError(f"{path} line {n} has no field {column!r}{did_you_mean(column, row)}; fields: {', '.join(row)}")
        if value is None:  # a CSV row shorter than the header
            continue
        if not isinstance(value, str):
            raise UserError(f"{path} line {n}: {kind} {column!r} is not text: {value!r}")
        if value.strip():
            prompts.append(value.strip())
    return prompts
