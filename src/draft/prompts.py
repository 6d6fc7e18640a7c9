"""Prompt sets: named sets that ship with the package, text files, or inline lists."""

from __future__ import annotations

from pathlib import Path

from draft.errors import UserError, did_you_mean

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
# Sets that belong to one embedded model: "train" on shapes-sd is shapes-train.txt.
MODEL_SETS = {"shapes-sd": "shapes"}


def named_sets(model: str = "") -> dict[str, Path]:
    """Prompt sets available for `model`, by name."""
    sets = {p.stem: p for p in sorted(PROMPT_DIR.glob("*.txt"))}
    prefix = MODEL_SETS.get(model)
    if prefix:
        sets.update({k[len(prefix) + 1 :]: v for k, v in sets.items() if k.startswith(prefix + "-")})
    return sets


def load_prompts(spec: str, model: str = "") -> list[str]:
    """The prompts `spec` names.

    In order: 'a|b|c' (inline prompts), a prompt set name, a text file (one prompt per
    line, '#' comments), or else, if it has a space and no path separator, one prompt.
    """
    sets = named_sets(model)
    path = sets.get(spec) or Path(spec).expanduser()
    if "|" in spec:
        prompts = [p.strip() for p in spec.split("|") if p.strip()]
    elif not path.is_file() and " " in spec.strip() and "/" not in spec and not spec.endswith(".txt"):
        prompts = [spec.strip()]
    else:
        if not path.is_file():
            hint = did_you_mean(spec, sets)
            raise UserError(
                f"prompt set or file {spec!r} not found{hint}; known sets for this model: {', '.join(sorted(sets))}"
            )
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise UserError(f"prompts {spec!r} holds no prompts")
    return prompts
