"""``sparse-mosaics plot <figure>``: draw a paper figure (writes OUT.pdf and OUT.png).

    sparse-mosaics plot lengthgen --table results/<name>/tables/lengthgen.parquet \\
        --out results/<name>/figures/lengthgen_accuracy.pdf [--metric exact_match] \\
        [--train-lengths 32 64] [--spread minmax|sd] [--size N]
    sparse-mosaics plot kernels --out results/<name>/figures/kernels.pdf

Figures are drawn from tables (or, for Figure 1, from the formulas) only: seconds, no training.
The PNG goes beside the PDF (same name, ``.png``) unless --png names another file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CommandError

HELP = "draw a paper figure from a table (or from formulas: the kernels figure)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="figure", metavar="<figure>")
    sub.required = True

    p = sub.add_parser("lengthgen", help="accuracy vs test length, one panel per task, one line per method")
    p.add_argument("--table", required=True, help="lengthgen table (.parquet) from `sparse-mosaics aggregate`")
    p.add_argument("--out", required=True, help="output PDF")
    p.add_argument("--png", default=None, help="output PNG (default: --out with .png)")
    p.add_argument("--metric", default="exact_match",
                   help="metric to plot (exact_match, token_accuracy, assoc_recall, greedy_exact_match, loss)")
    p.add_argument("--train-lengths", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="training source lengths to shade")
    p.add_argument("--spread", choices=("minmax", "sd"), default="minmax", help="band over seeds")
    p.add_argument("--size", type=int, default=None, help="training-set size to draw (default: largest per task)")

    p = sub.add_parser("kernels", help="Figure 1: the kernels and each method's weight surface")
    p.add_argument("--out", required=True, help="output PDF")
    p.add_argument("--png", default=None, help="output PNG (default: --out with .png)")


def _png(args) -> str:
    if args.png:
        return args.png
    out = Path(args.out)
    if out.suffix.lower() != ".pdf":
        raise CommandError(f"--out {args.out}: expected a .pdf file name")
    return str(out.with_suffix(".png"))


def main(args) -> int:
    png = _png(args)
    if args.figure == "lengthgen":
        import pandas as pd

        from ..figures.lengthgen import plot_lengthgen

        table = Path(args.table)
        if not table.is_file():
            raise CommandError(f"--table {table}: no such file")
        try:
            df = pd.read_parquet(table)
        except Exception as e:
            raise CommandError(f"--table {table}: cannot read Parquet ({e})") from None
        try:
            plot_lengthgen(df, args.out, png, metric=args.metric, train_lengths=args.train_lengths,
                           spread=args.spread, size=args.size)
        except ValueError as e:
            raise CommandError(f"--table {table}: {e}") from None
    elif args.figure == "kernels":
        from ..figures.kernels import plot_kernels

        plot_kernels(args.out, png)
    else:  # argparse restricts the choices
        raise CommandError(f"unknown figure {args.figure!r}")
    print(f"wrote {args.out} and {png}")
    return 0
