"""``sparse-mosaics <command>``: the command line every Snakemake rule calls.

Each subcommand lives in its own module under :mod:`sparse_mosaics.commands` and defines
``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``. Modules are imported
only when their command runs, so ``--help`` and the Snakefile stay fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import CommandError

# command name -> module under sparse_mosaics.commands
COMMANDS = {
    "generate": "generate",
    "pack": "pack",
    "train": "train",
    "evaluate": "evaluate",
    "aggregate": "aggregate",
    "plot": "plot",
    "bench": "bench",
}

_SUMMARIES = {
    "generate": "generate a seeded synthetic dataset folder (length generalisation tasks)",
    "pack": "pack a .src/.trg dataset folder into the memory-mapped training format",
    "train": "train one Memory Mosaics cell (resumable)",
    "evaluate": "evaluate a trained cell on every test shard, writing tidy metrics",
    "aggregate": "concatenate per-cell metrics into one experiment table (Parquet)",
    "plot": "draw a paper figure from a table (or from formulas: the kernels figure)",
    "bench": "check and time every attention implementation on the GPU it finds",
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-mosaics",
        description="Reproduce 'Sparse Attention as Compact Kernel Regression' (Santos et al., 2026).",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=_SUMMARIES[name], description=_SUMMARIES[name])
        if load in (None, name):
            mod = importlib.import_module(f"sparse_mosaics.commands.{module}")
            mod.add_arguments(p)
            p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the command being run (help for all commands imports them all).
    load = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(load)
    args = parser.parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except CommandError as e:
        print(f"sparse-mosaics {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
