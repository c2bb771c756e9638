"""The ``layershap`` console script: one subcommand per module, imported only when it runs.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``.

Example:
    $ layershap run                      # the main job on the embedded default model
    $ layershap info runs/default/dataset.zarr
"""

from __future__ import annotations

import argparse
import importlib
import sys

from layershap.oracle.errors import LayershapError

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("layershap.surrogate.cli_run", "main job: oracle on stratified masks -> surrogate -> layer scores"),
    "oracle": ("layershap.oracle.cli_oracle", "measure log-perplexity of layer masks into a zarr store"),
    "info": ("layershap.oracle.cli_info", "describe a dataset store: attributes, rows, best and worst masks"),
    "train": ("layershap.surrogate.cli_train", "train the MLP surrogate on a dataset store"),
    "shapley": ("layershap.surrogate.cli_shapley", "layer Shapley values / semivalues from a trained surrogate"),
    "prune": ("layershap.surrogate.cli_prune", "write a depth-pruned Hugging Face model"),
    "evaluate": ("layershap.oracle.cli_evaluate", "perplexity of a model on held-out text"),
    "compare": ("layershap.surrogate.cli_compare", "layershap vs peer pruning methods on held-out text"),
    "export": ("layershap.surrogate.cli_export", "per-layer sparsity ratios for Wanda/SparseGPT-style pruners"),
}


def build_parser() -> argparse.ArgumentParser:
    """Parser with every installed subcommand."""
    parser = argparse.ArgumentParser(
        prog="layershap",
        description="Which decoder layers of an LLM can you remove? Layer Shapley values via a learned surrogate.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input prints ``error: ...`` and exits with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except LayershapError as exc:
        print(f"layershap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rows already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
