"""Every snippet the README and the docs show a user: the Python runs (at a small size where
it would train for minutes, offline where it names a hub model), and every `draft` command
parses and, for `draft train`, resolves to a valid config."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Blocks that need what a test machine has not: reward weights a user downloads.
NEEDS_DOWNLOADS = {("rewards.md", 0)}


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def commands(text: str) -> list[list[str]]:
    """The `draft ...` command lines of a shell block, continuation lines joined, comments dropped."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if "draft.cli" in words:  # accelerate launch ... -m draft.cli train ...
            words = ["draft", *words[words.index("draft.cli") + 1 :]]
        if words[:1] == ["draft"] and "..." not in line:
            out.append(words[1:])
    return out


DOCUMENTED = [(path.name, argv) for path in DOCS for block in blocks(path, "bash") for argv in commands(block)]


def test_the_docs_show_commands_of_every_subcommand():
    used = {argv[0] for _, argv in DOCUMENTED}
    assert {"train", "sample", "eval", "rewards", "export", "pretrain-shapes"} <= used


@pytest.mark.parametrize("doc, argv", DOCUMENTED, ids=[f"{d}: draft {' '.join(a)}"[:80] for d, a in DOCUMENTED])
def test_every_documented_command_parses_and_resolves(doc, argv, monkeypatch):
    """The options exist; a `draft train` line's file and keys make a valid config (hub models
    are not fetched: their family's defaults are then draft's own)."""
    from draft.cli import build_parser
    from draft.config import load_config

    monkeypatch.chdir(ROOT)
    args, rest = build_parser().parse_known_args(argv)
    if args.command != "train":
        assert not rest, rest
        return
    items = [*args.items, *rest]
    if args.resume is not None:
        return  # continues a run that is not here
    files = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    assert len(files) <= 1
    load_config(files[0] if files else None, overrides)


@pytest.fixture
def small_runs(monkeypatch, tmp_path):
    """`draft.TrainConfig` as the README calls it, but 2 steps of 4 sampling steps with no
    evaluation, so its examples run in seconds; runs go under tmp_path."""
    import draft
    from draft.config import LogConfig, SamplingConfig, TrainConfig

    def small(**kwargs):
        return TrainConfig(**{**kwargs, "steps": 2, "sampling": SamplingConfig(num_steps=4), "batch_size": 2,
                              "log": LogConfig(eval_samples=0, sample_prompts=1, sample_seeds=1, trackers=())})

    monkeypatch.setattr(draft, "TrainConfig", small, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_the_readmes_python_runs(small_runs):
    """The README's Python: training, a reward of one's own, a registered reward, sampling with
    the LoRA, and the LoRA in plain diffusers (the hub model replaced by the embedded one)."""
    from draft.models import EMBEDDED

    first, diffusers_block = blocks(ROOT / "README.md", "python")
    namespace: dict = {}
    # PickScore downloads its CLIP model; any registered name shows the same call.
    exec(compile(first.replace('"pickscore"', '"brightness"'), "README", "exec"), namespace)
    assert namespace["run_dir"].is_dir() and namespace["images"].shape[-3:] == (3, 32, 32)
    code = diffusers_block.replace('"stable-diffusion-v1-5/stable-diffusion-v1-5"', repr(str(EMBEDDED["shapes-sd"].path)))
    exec(compile(code.replace("runs/NAME/lora", str(namespace["run_dir"] / "lora")), "README", "exec"), {})


@pytest.mark.parametrize("doc", ["shapes-sd.md", "shapes-flow.md", "shapes-video.md"])
def test_the_docs_python_runs(doc):
    (code,) = blocks(ROOT / "docs" / doc, "python")
    exec(compile(code, doc, "exec"), {})


def test_every_python_block_is_run_or_says_why_not():
    run = {("README.md", 0), ("README.md", 1), ("shapes-sd.md", 0), ("shapes-flow.md", 0), ("shapes-video.md", 0)}
    found = {(path.name, k) for path in DOCS for k, _ in enumerate(blocks(path, "python"))}
    assert found == run | NEEDS_DOWNLOADS


def test_the_readmes_method_table_is_the_methods_own_description():
    """One description per method (`draft.methods.METHODS`): the README's table says the same."""
    from draft.methods import METHODS

    text = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([\w-]+)` \| (.+) \|$", text, re.M))
    for name, method in METHODS.items():
        assert rows.get(name) == method.window, name
