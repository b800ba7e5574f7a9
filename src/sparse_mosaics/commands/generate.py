"""``sparse-mosaics generate``: write one seeded length-generalisation dataset folder.

    sparse-mosaics generate --task copy --split train --size 20000000 --seed 42 --out-root results/x/data
        -> results/x/data/lengthgen/copy/n20000000/{train,validation_<i>_<L>}.{src,trg}{,.idx} + manifest.json
    sparse-mosaics generate --task copy --split test --test-lengths 64 128 256 --seed 42 --out-root ...
        -> results/x/data/lengthgen/copy/test/test_<i>_<L>.* + manifest.json

The folder is written to a temporary sibling and renamed when complete. An existing folder with
the same manifest parameters is left alone ("up to date"); one with different parameters is
only replaced with --force.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CommandError

HELP = "generate a seeded synthetic dataset folder (length generalisation tasks)"


def add_arguments(p) -> None:
    from ..data.lengthgen import DEFAULTS, TASKS

    p.add_argument("--task", required=True, choices=TASKS, help="which task to generate")
    p.add_argument("--split", required=True, choices=("train", "test"),
                   help="train: the n<size>/ folder (train + validation shards); test: the test/ folder")
    p.add_argument("--seed", required=True, type=int, help="generator seed (every random draw derives from it)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out-root", metavar="DIR",
                       help="data root: writes DIR/lengthgen/<task>/n<size>/ or DIR/lengthgen/<task>/test/")
    where.add_argument("--out", metavar="DIR", help="write exactly this folder instead")
    g = p.add_argument_group("training folder (--split train)")
    g.add_argument("--size", type=int, help="number of training examples (required for --split train)")
    g.add_argument("--min-len", type=int, default=32, help="shortest training source length (default 32)")
    g.add_argument("--max-len", type=int, default=64, help="longest training source length (default 64)")
    g.add_argument("--val-lengths", type=int, nargs="*", default=[64, 128, 256], metavar="L",
                   help="one validation shard per length (default 64 128 256; none with an empty list)")
    g.add_argument("--val-size", type=int, default=1000, help="examples per validation shard (default 1000)")
    g = p.add_argument_group("test folder (--split test)")
    g.add_argument("--test-lengths", type=int, nargs="+", default=[64, 128, 256, 512], metavar="L",
                   help="one test shard per length (default 64 128 256 512)")
    g.add_argument("--test-size", type=int, default=1000, help="examples per test shard (default 1000)")
    g = p.add_argument_group("task parameters")
    g.add_argument("--vocab", type=int, default=DEFAULTS["vocab"],
                   help="copy/reverse/sort: data tokens 0..V-1 (default 32)")
    g.add_argument("--abc-size", type=int, default=DEFAULTS["abc_size"],
                   help="mqmtar: key/value symbols 3..abc+2 (default 256)")
    g.add_argument("--kv-vocab", type=int, default=DEFAULTS["kv_vocab"],
                   help="mqmtar: distinct keys and values per file, capped by abc^2 (default 10000)")
    g.add_argument("--k-len", type=int, default=DEFAULTS["k_len"], help="mqmtar: tokens per key (default 2)")
    g.add_argument("--v-len", type=int, default=DEFAULTS["v_len"], help="mqmtar: tokens per value (default 2)")
    g.add_argument("--num-q", type=int, default=DEFAULTS["num_q"], help="mqmtar: queries per example (default 4)")
    g.add_argument("--num-kv-frac", type=float, default=DEFAULTS["num_kv_frac"],
                   help="mqmtar: num_kv = floor(frac * L / (k_len + v_len + 2)) (default 0.8)")
    p.add_argument("--force", action="store_true", help="replace a folder generated with other parameters")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def main(args) -> int:
    from ..data import formats, lengthgen as lg

    try:
        params = lg.task_params(
            args.task, vocab=args.vocab, abc_size=args.abc_size, kv_vocab=args.kv_vocab,
            k_len=args.k_len, v_len=args.v_len, num_q=args.num_q, num_kv_frac=args.num_kv_frac,
        )
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        if args.split == "train":
            if args.size is None:
                raise ValueError("--split train needs --size")
            plan = lg.folder_plan("train", size=args.size, min_len=args.min_len, max_len=args.max_len,
                                  val_lengths=args.val_lengths, val_size=args.val_size)
        else:
            plan = lg.folder_plan("test", test_lengths=args.test_lengths, test_size=args.test_size)
        for _, kind, _, a, b in plan:
            lg.check_lengths(args.task, a, b, params)
    except ValueError as e:
        raise CommandError(str(e)) from None

    if args.out_root:
        dest = lg.dataset_dir(args.out_root, args.task, args.size if args.split == "train" else None)
    else:
        dest = Path(args.out)
    want = lg.folder_manifest(args.task, params, args.seed, args.split, plan)
    try:
        have = formats.read_manifest(dest) if dest.exists() else None
    except ValueError:
        have = {}
    if dest.is_dir() and not any(dest.iterdir()):
        pass                                    # an empty folder (e.g. made by Snakemake) is free
    elif dest.exists():
        same = have is not None and {k: v for k, v in have.items() if k != "files"} == want
        if same and not args.force:
            print(f"generate: {dest} is up to date", file=sys.stderr)
            return 0
        if not args.force:
            why = "has no manifest.json" if have is None else "was generated with different parameters"
            raise CommandError(f"{dest} exists and {why}; pass --force to replace it")

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    man = lg.write_folder(dest, args.task, params, args.seed, args.split, plan, log=log)
    n = sum(s["count"] for s in man["splits"].values())
    print(f"generate: wrote {dest} ({len(plan)} splits, {n} examples, {man['seconds']:.1f} s)", file=sys.stderr)
    return 0
