"""``sparse-mosaics aggregate --experiment lengthgen --out TABLE [--summary HTML]
[--test-lengths TASK=L1,L2,...]... CELL_METRICS...``: one checked experiment table.

See :mod:`sparse_mosaics.tables` for the table contract and the checks.
"""

from __future__ import annotations

from ..errors import CommandError

HELP = "concatenate per-cell metrics into one experiment table (Parquet)"


def add_arguments(parser) -> None:
    parser.add_argument("--experiment", required=True, choices=["lengthgen"], help="experiment of the table")
    parser.add_argument("--out", required=True, help="output table (.parquet)")
    parser.add_argument("--summary", default=None, help="also write an HTML summary (mean ± sd over seeds)")
    parser.add_argument(
        "--test-lengths", action="append", default=None, metavar="TASK=L1,L2,...",
        help="test lengths every cell of TASK must have; repeat per task "
             "(default: the union of the lengths that task's cells report)",
    )
    parser.add_argument("metrics", nargs="+", help="per-cell metrics.parquet files")


def main(args) -> int:
    from ..io import write_parquet_atomic, write_text_atomic
    from ..tables import TableError, aggregate, parse_test_lengths, summary_html

    try:
        lengths = parse_test_lengths(args.test_lengths)
        table = aggregate(args.metrics, args.experiment, lengths)
    except TableError as e:
        raise CommandError(str(e)) from None
    write_parquet_atomic(table, args.out)
    n_cells = len(table.groupby(["task", "method", "size", "seed"]))
    print(f"wrote {args.out}: {len(table)} rows, {n_cells} cells")
    if args.summary:
        write_text_atomic(args.summary, summary_html(table))
        print(f"wrote {args.summary}")
    return 0
