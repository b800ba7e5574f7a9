"""``sparse-mosaics train --cell cell.json --data PACKED_TRAIN_DIR --out CELL_DIR``: train one cell.

Re-running the same command after an interruption resumes from ``CELL_DIR/checkpoint.pt``.
See :mod:`sparse_mosaics.train` for the loop and the files written.
"""

from __future__ import annotations

HELP = "train one Memory Mosaics cell (resumable)"


def add_arguments(parser) -> None:
    parser.add_argument("--cell", required=True, help="cell config (cell.json)")
    parser.add_argument("--data", required=True, help="packed training data folder (holds train.tokens.npy, ...)")
    parser.add_argument("--out", required=True, help="cell directory for model.pt, checkpoint.pt, curve.parquet, ...")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument("--quiet", action="store_true", help="write log lines to train.log only")


def main(args) -> int:
    from ..cell import load_cell
    from ..train import train_cell

    cell = load_cell(args.cell)
    train_cell(cell, args.data, args.out, device=args.device, quiet=args.quiet)
    return 0
