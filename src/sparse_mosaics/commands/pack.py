"""``sparse-mosaics pack FOLDER``: text dataset folder -> memory-mapped packed folder.

Every ``<split>.src``/``<split>.trg`` pair of FOLDER becomes ``<split>.tokens.npy`` (the
concatenated [bos] + src + [sep] + trg + [eos]) and ``<split>.offsets.npy`` in FOLDER/packed (or
--out), with ``packed.json``. Works on generated folders (token layout from manifest.json) and on
the authors' released folders (task from --task or from the path, e.g. ``.../copy/20M_.../``);
missing ``.idx`` files are built. The packed folder is written to a temporary name, then renamed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CommandError

HELP = "pack a .src/.trg dataset folder into the memory-mapped training format"


def add_arguments(p) -> None:
    from ..data.lengthgen import TASKS

    p.add_argument("folder", metavar="FOLDER", help="dataset folder with <split>.src/.trg files")
    p.add_argument("--out", metavar="DIR", help="packed folder to write (default FOLDER/packed)")
    p.add_argument("--task", choices=TASKS,
                   help="token layout for folders without manifest.json (default: from the path)")
    p.add_argument("--vocab", type=int, help="copy/reverse/sort data vocabulary for such folders (default 32)")
    p.add_argument("--abc-size", type=int, help="mqmtar symbol count for such folders (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def main(args) -> int:
    from ..data import formats

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CommandError(f"{folder}: not a directory")
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        out = formats.pack(folder, args.out, task=args.task, vocab=args.vocab, abc_size=args.abc_size, log=log)
    except ValueError as e:
        raise CommandError(str(e)) from None
    meta = formats.read_packed_meta(out)
    n = sum(s["count"] for s in meta["splits"].values())
    print(f"pack: wrote {out} ({len(meta['splits'])} splits, {n} examples)", file=sys.stderr)
    return 0
