"""``sparse-mosaics bench [--quick] [--out DIR]``: check and time every attention implementation.

Needs a CUDA GPU. Sections (``--sections``, default all): check (every implementation against the
reference backend on fresh random inputs), kernels (GPU.md's anchor shapes, side by side with SDPA
and adasplash), long (T up to 65,536), train (training step of the length-generalisation and ICLL
cells per method; with ``--compile`` each step eager and torch.compile-d side by side), eval
(long-context evaluation forward per method). Prints the results as
markdown tables; with ``--out DIR`` writes DIR/bench.csv, DIR/bench.parquet and DIR/bench.md.
See :mod:`sparse_mosaics.bench`.
"""

from __future__ import annotations

HELP = "check and time every attention implementation on the GPU it finds"

SECTIONS = ("check", "kernels", "long", "train", "eval")


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small subset of shapes and methods")
    parser.add_argument("--out", default=None, help="folder for bench.csv, bench.parquet and bench.md")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--budget", type=float, default=1e9,
                        help="stop starting new measurements after this many seconds (rows so far are kept)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="train section: time each training step twice, eager and with torch.compile "
                             "(Inductor in MODE: default, or reduce-overhead = CUDA graphs; compiling adds "
                             "tens of seconds per method)")
    parser.add_argument("--no-eager", action="store_true",
                        help="train section with --compile: time only the compiled step (half the time)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods to measure (default: every method of the section)")
    parser.add_argument("--shapes", default=None,
                        help="kernels section: comma-separated TxD pairs at B*H=256, e.g. 4096x64,1024x64 "
                             "(default: T in 256, 1024, 4096 x D in 16, 64)")
    parser.add_argument("--cells", default=None,
                        help="train section: comma-separated subset of lengthgen,icll512,icll948 (default: all)")
    parser.add_argument("--reference-model", action="store_true",
                        help="also time the training step with attention_backend='reference' (materialised)")


def main(args) -> int:
    from ..errors import CommandError

    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise CommandError(f"unknown --sections value(s) {bad}; valid: {', '.join(SECTIONS)}")
    methods = cells = None
    if args.methods:
        from ..attention import get_method

        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        for m in methods:
            try:
                get_method(m)
            except ValueError as e:
                raise CommandError(f"--methods: {e}") from None
    if args.cells:
        from ..bench import TRAIN_CELLS

        cells = tuple(c.strip() for c in args.cells.split(",") if c.strip())
        bad = [c for c in cells if c not in TRAIN_CELLS]
        if bad:
            raise CommandError(f"unknown --cells value(s) {bad}; valid: {', '.join(TRAIN_CELLS)}")
    if args.compile is not None:
        from ..cell import compile_modes

        if args.compile not in compile_modes():
            raise CommandError(f"--compile: unknown Inductor mode {args.compile!r} (valid: {', '.join(compile_modes())})")
    if args.no_eager and args.compile is None:
        raise CommandError("--no-eager needs --compile [MODE]: without it the eager step is the only one timed")
    shapes = None
    if args.shapes:
        try:
            shapes = tuple(tuple(int(x) for x in p.lower().split("x")) for p in args.shapes.split(",") if p.strip())
            if not shapes or any(len(p) != 2 or min(p) < 1 for p in shapes):
                raise ValueError
        except ValueError:
            raise CommandError(f"--shapes must be comma-separated TxD pairs of positive ints (e.g. 4096x64), "
                               f"got {args.shapes!r}") from None
    import torch

    if not torch.cuda.is_available():
        raise CommandError("bench needs a CUDA GPU and none is visible (torch.cuda.is_available() is False)")
    from ..bench import markdown_tables, run_bench

    rows = run_bench(quick=args.quick, sections=sections, budget_s=args.budget,
                     log=lambda s: print(s, flush=True), compile_model=args.compile or False,
                     reference_model=args.reference_model, methods=methods, cells=cells, shapes=shapes,
                     eager=not args.no_eager)
    table = markdown_tables(rows)
    print(table)
    if args.out:
        from pathlib import Path

        import pandas as pd

        from ..io import atomic_path, write_parquet_atomic, write_text_atomic

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        df = pd.DataFrame(rows)
        with atomic_path(out / "bench.csv") as tmp:
            df.to_csv(tmp, index=False)
        write_parquet_atomic(df, out / "bench.parquet")
        write_text_atomic(out / "bench.md", table + "\n")
    n_fail = sum(1 for r in rows if r.get("section") == "check" and not r.get("ok"))
    return 1 if n_fail else 0
