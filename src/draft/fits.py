"""Which common accelerator cards each preset fits, and with which memory options.

Every preset in `configs/` whose model draft has a built-in architecture of
(`draft.models.architectures`) is estimated at its real size, built on the meta device (no
weight read, nothing downloaded), as shipped and then with each memory option of `OPTIONS`
added in turn. The README's "What fits where" table is this module's output, and a test
keeps it so:

    python -m draft.fits            # the table (Markdown)
"""

from __future__ import annotations

from pathlib import Path

# Memory options in the order a user would reach for them: each column adds its overrides to
# those of the columns before (command-line syntax, applied over the preset).
OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("as shipped", ()),
    ("+ `text_encoders=cache`", ("text_encoders=cache",)),
    ("+ `sampling.block_checkpointing=true`", ("sampling.block_checkpointing=true",)),
    ("+ `quantize=int8`", ("quantize=int8",)),
    ("`quantize=nf4` instead", ("quantize=nf4",)),
)

NOTE = ("Peak accelerator memory per process estimated by `draft train CONFIG --dry-run` (`python -m draft.fits`), "
        "and the smallest of the common cards (24, 40, 48, 80 GB) it fits; each column adds its option to those "
        "before it. The reward model's weights and activations are not included, and the activations are "
        "calibrated on SD 1.5 only.")


def presets(configs_dir: str | Path = "configs") -> list[Path]:
    """The preset files whose model draft has a built-in architecture of."""
    from draft.config import load_config
    from draft.models.architectures import builtin_configs

    return [p for p in sorted(Path(configs_dir).glob("*.yaml")) if builtin_configs(load_config(p).model) is not None]


def estimates(path: Path) -> list[tuple[object, object]]:
    """(config, estimate) of the preset with each column's options, in `OPTIONS`' order."""
    from draft.config import load_config
    from draft.estimate import estimate
    from draft.models.architectures import builtin_configs

    out, overrides = [], []
    for _, more in OPTIONS:
        overrides += more
        config = load_config(path, overrides)
        out.append((config, estimate(config, builtin_configs(config.model))))
    return out


def cell(est) -> str:
    """'74.4 GiB: 80 GB', the peak and the smallest common card it fits ('none' if no card)."""
    from draft.estimate import GIB

    yes, _ = est.fits()
    return f"{est.peak / GIB:.1f} GiB: " + (f"{yes[0]} GB" if yes else "none")


def table(configs_dir: str | Path = "configs") -> str:
    """The Markdown table: a row per preset, its run's size, batch and method, and a cell per
    column of `OPTIONS`."""
    head = ["preset", "model", "size", "batch", "method", *[label for label, _ in OPTIONS]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * 5 + " ---: |" * len(OPTIONS)]
    for path in presets(configs_dir):
        rows = estimates(path)
        config = rows[0][0]
        cells = [f"`{path.name}`", config.model.split("/")[-1], str(run_size(config)), str(config.batch_size),
                 config.method, *[cell(est) for _, est in rows]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_size(config):
    """The size the run samples at (the model's native one where the config leaves it 0),
    from the family's adapter over the meta components."""
    from draft.inference import sample_size as requested
    from draft.models import ADAPTERS, meta, pipeline_class
    from draft.models.architectures import builtin_configs
    from draft.models.base import load_callable

    folder = builtin_configs(config.model)
    adapter = load_callable(ADAPTERS[pipeline_class(str(folder))])
    return adapter.on_meta(folder, meta.components(folder), **config.model_options).size(requested(config.sampling))


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the table is built from draft's copies, never the hub
    p = argparse.ArgumentParser(prog="python -m draft.fits", description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="configs", help="the presets' folder (default: configs)")
    args = p.parse_args(argv)
    print(table(args.configs) + "\n\n" + NOTE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
