"""``sparse-mosaics evaluate --cell cell.json --model CELL_DIR/model.pt --data PACKED_TEST_DIR
--out CELL_DIR/metrics.parquet [--train-summary CELL_DIR/train_summary.json]``.

One deterministic pass over every test shard; tidy metrics with provenance columns. See
:mod:`sparse_mosaics.evaluate`.
"""

from __future__ import annotations

HELP = "evaluate a trained cell on every test shard, writing tidy metrics"


def add_arguments(parser) -> None:
    parser.add_argument("--cell", required=True, help="cell config (cell.json)")
    parser.add_argument("--model", required=True, help="trained model (CELL_DIR/model.pt)")
    parser.add_argument("--data", required=True, help="packed test data folder (test_<i>_<L> shards)")
    parser.add_argument("--out", required=True, help="output metrics.parquet")
    parser.add_argument("--train-summary", default=None,
                        help="train_summary.json for train_seconds / n_params (default: beside --model)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda'")
    parser.add_argument("--quiet", action="store_true", help="no per-shard log lines")


def main(args) -> int:
    from ..evaluate import evaluate_cell
    from ..cell import load_cell

    cell = load_cell(args.cell)
    evaluate_cell(cell, args.model, args.data, args.out, train_summary=args.train_summary,
                  device=args.device, quiet=args.quiet)
    return 0
