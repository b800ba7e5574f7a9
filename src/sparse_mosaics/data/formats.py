"""On-disk formats: the authors' text format, ``.idx`` line indexes, manifests, and packed splits.

Text format (the authors', SPEC.md §3c), one folder per dataset::

    <split>.src, <split>.trg     one example per line, space-separated integers, '\\n' endings
    <split>.src.idx, .trg.idx    little-endian uint64 byte offset of every line start (n = size // 8)
    manifest.json                generator, version, parameters, counts, SHA-256 of every file

Packed format (``pack``), one folder ``<dataset>/packed/``::

    <split>.tokens.npy   concatenation of seq = [bos] + src + [sep] + trg + [eos] over examples
                         (uint16 if vocab_size <= 65535 else int32)
    <split>.offsets.npy  int64 (n + 1,): example i is tokens[offsets[i]:offsets[i+1]]
    packed.json          vocab, splits, counts, digest of the source manifest

Any folder of ``.src``/``.trg`` files can be read (the authors' released data drops in): missing
``.idx`` files are built, and malformed data raises ValueError naming the file and line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..io import atomic_path, sha256_file, write_json_atomic

PACK_VERSION = 1
READ_BLOCK = 1 << 23          # bytes of text parsed at a time
_SHARD_RE = re.compile(r"^(?P<prefix>[A-Za-z]+)_(?P<index>\d+)_(?P<length>\d+)$")


# ----------------------------------------------------------------------------- writing text

def token_table(n_values: int):
    """(table, widths): table[v] = ASCII decimal of v then a space, zero-padded to 4 or 8 bytes.

    widths[v] = number of meaningful bytes of table[v]. The padded width is a machine word so a
    token's text is gathered with one 1-D lookup (see :func:`format_lines`).
    """
    width = len(str(max(0, n_values - 1))) + 1
    word = 4 if width <= 4 else 8 if width <= 8 else width
    table = np.zeros((n_values, word), dtype=np.uint8)
    widths = np.zeros(n_values, dtype=np.int64)
    for v in range(n_values):
        b = f"{v} ".encode()
        table[v, : len(b)] = np.frombuffer(b, dtype=np.uint8)
        widths[v] = len(b)
    return table, widths


def format_lines(flat: np.ndarray, lengths: np.ndarray, table: np.ndarray, widths: np.ndarray):
    """Text of len(lengths) lines of space-separated tokens, vectorised.

    flat: (N,) tokens (row-major), lengths: (n,) tokens per line (all >= 1).
    Returns (bytes as a uint8 array, (n,) int64 bytes per line including '\\n').
    Each token's padded text is gathered as one word, the padding is dropped with a boolean
    mask gathered the same way, and the last space of every line becomes '\\n'.
    """
    flat = np.asarray(flat)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.min() < 1:
        raise ValueError("format_lines: every line needs at least one token")
    word = table.shape[1]
    keep = (np.arange(word)[None, :] < widths[:, None]).astype(np.uint8)   # (V, word)
    if word in (4, 8):
        wt = np.uint32 if word == 4 else np.uint64
        text = table.view(wt).ravel()[flat].view(np.uint8)              # (N * word,)
        mask = keep.view(wt).ravel()[flat].view(np.bool_)
    else:
        text, mask = table[flat].ravel(), keep[flat].ravel().view(np.bool_)
    out = text[mask]                                                # (bytes,)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    line_bytes = np.add.reduceat(widths[flat], starts) if len(flat) else np.zeros(0, np.int64)
    out[np.cumsum(line_bytes) - 1] = ord("\n")                      # last space of a line -> '\n'
    return out, line_bytes


class SplitWriter:
    """Streams one split to ``<folder>/<name>.{src,trg}`` plus their ``.idx`` files.

    Use as a context manager; ``write(src, src_len, trg, trg_len)`` appends a chunk.
    """

    def __init__(self, folder, name: str, n_values: int):
        self.folder, self.name = Path(folder), name
        self.table, self.widths = token_table(n_values)
        self.n_values = n_values
        self.count = 0
        self.nbytes = 0

    def __enter__(self):
        self.files = {}
        self.pos = {}
        for side in ("src", "trg"):
            self.files[side] = open(self.folder / f"{self.name}.{side}", "wb")
            self.files[side + ".idx"] = open(self.folder / f"{self.name}.{side}.idx", "wb")
            self.pos[side] = 0
        return self

    def write(self, src, src_len, trg, trg_len):
        for side, flat, lengths in (("src", src, src_len), ("trg", trg, trg_len)):
            if len(flat) and int(np.max(flat)) >= self.n_values:
                raise ValueError(f"{self.name}.{side}: token {int(np.max(flat))} >= {self.n_values}")
            text, line_bytes = format_lines(flat, lengths, self.table, self.widths)
            starts = self.pos[side] + np.concatenate([[0], np.cumsum(line_bytes)[:-1]])
            self.files[side].write(memoryview(text))
            self.files[side + ".idx"].write(memoryview(starts.astype("<u8")))
            self.pos[side] += int(line_bytes.sum())
        self.count += len(src_len)
        self.nbytes = self.pos["src"] + self.pos["trg"]

    def __exit__(self, *exc):
        for f in self.files.values():
            f.close()
        return False


# ----------------------------------------------------------------------------- line indexes

def index_path(path) -> Path:
    return Path(str(path) + ".idx")


def build_index(path) -> np.ndarray:
    """Byte offset of every line start of a text file (a last line without '\\n' counts)."""
    path = Path(path)
    size = path.stat().st_size
    starts = [np.zeros(1, dtype=np.int64)] if size else []
    with open(path, "rb") as f:
        pos = 0
        while True:
            buf = f.read(READ_BLOCK)
            if not buf:
                break
            nl = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10) + pos + 1
            starts.append(nl[nl < size])
            pos += len(buf)
    return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)


def _check_index(path: Path, offsets: np.ndarray, size: int) -> None:
    """Cheap consistency checks of an existing .idx against its text file."""
    ip = index_path(path)
    if len(offsets) == 0:
        if size:
            raise ValueError(f"{ip}: empty index for a non-empty file {path}")
        return
    if offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] >= size:
        raise ValueError(f"{ip}: offsets are not increasing line starts inside {path} (size {size}); "
                         f"delete the .idx to rebuild it")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if len(offsets) > 1 and not np.all(data[offsets[1:] - 1] == 10):
        raise ValueError(f"{ip}: some offsets are not line starts of {path}; delete the .idx to rebuild it")
    tail = np.asarray(data[offsets[-1]:])
    if np.count_nonzero(tail[:-1] == 10):
        raise ValueError(f"{ip}: indexes {len(offsets)} lines but {path} has more; delete the .idx to rebuild it")


def load_index(path, build: bool = True, write: bool = True) -> np.ndarray:
    """Line offsets (int64) of a .src/.trg file from its .idx; build (and save) it if missing."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    ip = index_path(path)
    size = path.stat().st_size
    if ip.exists():
        if ip.stat().st_size % 8:
            raise ValueError(f"{ip}: size {ip.stat().st_size} is not a multiple of 8 (uint64 offsets)")
        offsets = np.fromfile(ip, dtype="<u8").astype(np.int64)
        _check_index(path, offsets, size)
        return offsets
    if not build:
        raise ValueError(f"{ip}: missing line index")
    offsets = build_index(path)
    if write:
        try:
            with atomic_path(ip) as tmp:
                offsets.astype("<u8").tofile(tmp)
        except OSError:
            pass                        # read-only folder: keep the index in memory
    return offsets


def count_lines(path) -> int:
    return len(load_index(path))


# ----------------------------------------------------------------------------- parsing text

_BYTE_OK = np.zeros(256, dtype=bool)
_BYTE_OK[[9, 10, 13, 32]] = True
_BYTE_OK[48:58] = True
_BYTE_DIGIT = np.zeros(256, dtype=bool)
_BYTE_DIGIT[48:58] = True


def parse_block(buf: bytes, path, first_line: int, n_lines: int):
    """Parse the text of ``n_lines`` whole lines: (tokens int64 (N,), tokens per line (n_lines,)).

    Tokens are runs of ASCII digits separated by spaces, tabs or '\\r'; lines end with '\\n'
    (the last one may not). Raises ValueError naming ``path`` and the 1-based line number of
    the first bad token or empty line. ``first_line`` is the 0-based index of the block's first
    line in the file.
    """
    b = np.frombuffer(buf, dtype=np.uint8)
    if not _BYTE_OK[b].all():
        i = int(np.argmin(_BYTE_OK[b]))
        ls = buf.rfind(b"\n", 0, i) + 1
        le = buf.find(b"\n", i)
        line = first_line + buf.count(b"\n", 0, i) + 1
        word = [w for w in buf[ls:le if le >= 0 else len(buf)].split() if not w.isdigit()]
        raise ValueError(f"{path}: line {line}: non-integer token {word[0].decode(errors='replace')!r}")
    isdig = _BYTE_DIGIT[b]
    edge = np.diff(isdig.view(np.int8), prepend=np.int8(0), append=np.int8(0))   # +1 start, -1 end
    starts = np.flatnonzero(edge == 1)
    ndig = np.flatnonzero(edge == -1) - starts                       # (N,) digits per token
    maxd = int(ndig.max()) if len(ndig) else 0
    if maxd > 9:
        i = int(starts[np.argmax(ndig > 9)])
        line = first_line + buf.count(b"\n", 0, i) + 1
        raise ValueError(f"{path}: line {line}: token {buf[i:i + 20].split()[0].decode()!r} is too large")
    vals = b[starts].astype(np.int64) - 48
    for k in range(1, maxd):                                         # Horner over the digits
        more = ndig > k
        nxt = b[np.minimum(starts + k, len(b) - 1)].astype(np.int64) - 48
        vals = np.where(more, vals * 10 + nxt, vals)
    # tokens per line: token starts counted up to each line end
    line_end = np.flatnonzero(b == 10)
    if len(line_end) < n_lines:                                      # last line without '\n'
        line_end = np.append(line_end, len(b) - 1)
    if len(line_end) != n_lines:
        raise ValueError(f"{path}: block at line {first_line + 1} has {len(line_end)} lines, "
                         f"the index says {n_lines}")
    counts = np.diff(np.searchsorted(starts, line_end, side="right"), prepend=0)   # (n_lines,)
    if np.any(counts == 0):
        line = first_line + int(np.flatnonzero(counts == 0)[0]) + 1
        raise ValueError(f"{path}: line {line} is empty (no tokens)")
    return vals, counts


def iter_blocks(path, offsets: np.ndarray, block_bytes: int = READ_BLOCK, bounds=None):
    """Yield (first_line, n_lines, text) over whole lines of a file, about block_bytes at a time.

    bounds: optional sorted line numbers to split at (so two parallel files can be read in step).
    """
    path = Path(path)
    size = path.stat().st_size
    n = len(offsets)
    ends = np.concatenate([offsets, [size]])
    with open(path, "rb") as f:
        a = 0
        while a < n:
            b = int(np.searchsorted(ends, ends[a] + block_bytes, side="right")) - 1
            b = min(n, max(a + 1, b))
            if bounds is not None:
                b = int(bounds[np.searchsorted(bounds, a, side="right")])
            f.seek(int(ends[a]))
            yield a, b - a, f.read(int(ends[b] - ends[a]))
            a = b


def read_lines(path) -> list[list[int]]:
    """Every line of a .src/.trg file as a list of ints (small files; uses/builds the .idx)."""
    offsets = load_index(path)
    out = []
    for a, k, text in iter_blocks(path, offsets):
        vals, counts = parse_block(text, path, a, k)
        out += [x.tolist() for x in np.split(vals, np.cumsum(counts)[:-1])]
    return out


def read_example(path, i: int) -> list[int]:
    """Line i (0-based) of a .src/.trg file, read by seeking its .idx offset."""
    offsets = load_index(path)
    if not 0 <= i < len(offsets):
        raise IndexError(f"{path}: line {i} out of range (file has {len(offsets)} lines)")
    end = offsets[i + 1] if i + 1 < len(offsets) else Path(path).stat().st_size
    with open(path, "rb") as f:
        f.seek(int(offsets[i]))
        text = f.read(int(end - offsets[i]))
    vals, _ = parse_block(text, path, i, 1)
    return vals.tolist()


# ----------------------------------------------------------------------------- folders and manifests

def list_splits(folder) -> list[str]:
    """Split names of a text folder (every ``<split>.src``), checking each has a ``.trg``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory")
    names = sorted(p.name[: -len(".src")] for p in folder.glob("*.src") if p.is_file())
    if not names:
        raise ValueError(f"{folder}: no .src files (expected <split>.src and <split>.trg)")
    for name in names:
        if not (folder / f"{name}.trg").exists():
            raise ValueError(f"{folder / (name + '.src')}: missing target file {name}.trg")
    for p in folder.glob("*.trg"):
        if not (folder / (p.name[: -len(".trg")] + ".src")).exists():
            raise ValueError(f"{p}: missing source file {p.name[:-4]}.src")
    return names


def split_count(folder, split: str) -> int:
    """Number of examples of a split, checking .src and .trg agree."""
    folder = Path(folder)
    ns = count_lines(folder / f"{split}.src")
    nt = count_lines(folder / f"{split}.trg")
    if ns != nt:
        raise ValueError(f"{folder}: {split}.src has {ns} lines but {split}.trg has {nt}")
    return ns


def parse_shard(name: str):
    """'test_3_512' -> ('test', 3, 512); None for names that are not shards (e.g. 'train')."""
    m = _SHARD_RE.match(name)
    return (m["prefix"], int(m["index"]), int(m["length"])) if m else None


def list_shards(folder, prefix: str) -> list[tuple[str, int, int]]:
    """(split_name, index, length) of every ``<prefix>_<i>_<L>`` split, sorted by (length, index).

    ``folder`` is a text folder, a packed folder, or a text folder with a ``packed/`` inside.
    """
    folder = Path(folder)
    if (folder / "packed.json").exists():
        names = list(json.loads((folder / "packed.json").read_text())["splits"])
    elif (folder / "manifest.json").exists() or any(folder.glob("*.src")):
        names = list_splits(folder)
    elif (folder / "packed" / "packed.json").exists():
        return list_shards(folder / "packed", prefix)
    else:
        raise ValueError(f"{folder}: neither a dataset folder (.src/.trg) nor a packed folder")
    out = []
    for name in names:
        s = parse_shard(name)
        if s and s[0] == prefix:
            out.append((name, s[1], s[2]))
    return sorted(out, key=lambda t: (t[2], t[1]))


shards = list_shards   # the name CONTRACTS.md uses


def write_manifest(folder, manifest: dict) -> dict:
    """Add ``files`` (SHA-256 of every data/index file) and write ``manifest.json`` atomically."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and p.name != "manifest.json" and not p.name.startswith("."))
    manifest = dict(manifest)
    manifest["files"] = {name: sha256_file(folder / name) for name in files}
    write_json_atomic(folder / "manifest.json", manifest)
    return manifest


def read_manifest(folder) -> dict | None:
    p = Path(folder) / "manifest.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def verify_manifest(folder) -> None:
    """Re-hash every file listed in manifest.json; ValueError naming the first that differs."""
    folder = Path(folder)
    man = read_manifest(folder)
    if man is None:
        raise ValueError(f"{folder}: no manifest.json")
    for name, digest in man.get("files", {}).items():
        p = folder / name
        if not p.exists():
            raise ValueError(f"{p}: listed in manifest.json but missing")
        if sha256_file(p) != digest:
            raise ValueError(f"{p}: SHA-256 differs from manifest.json")


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished temporary folder onto ``dest`` (replacing it), as atomically as a folder can."""
    dest = Path(dest)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def temp_dir_for(dest) -> Path:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


# ----------------------------------------------------------------------------- packing

def infer_task(folder) -> str | None:
    """Task name from manifest.json, else from the nearest path component named like a task."""
    from .lengthgen import TASKS

    man = read_manifest(folder)
    if man and man.get("task") in TASKS:
        return man["task"]
    for part in reversed(Path(folder).resolve().parts):
        if part in TASKS:
            return part
    return None


def folder_vocab(folder, task=None, vocab=None, abc_size=None) -> tuple[str, dict]:
    """(task, token layout) of a text folder: from its manifest, else from the arguments/path."""
    from .lengthgen import task_vocab

    man = read_manifest(folder)
    if man is not None and "vocab" in man:
        if task is not None and task != man.get("task"):
            raise ValueError(f"{folder}/manifest.json is for task {man.get('task')!r}, not {task!r}")
        if task is None and vocab is None and abc_size is None:
            return man["task"], man["vocab"]
    task = task or infer_task(folder)
    if task is None:
        raise ValueError(f"{folder}: no manifest.json and no task in the path; pass the task explicitly")
    params = (man or {}).get("parameters", {})
    v = vocab if vocab is not None else params.get("vocab", 32)
    a = abc_size if abc_size is not None else params.get("abc_size", 256)
    return task, task_vocab(task, vocab=v, abc_size=a)


def _write_npy_stream(path: Path, dtype, chunks) -> int:
    """Write a 1-D .npy from an iterator of arrays without knowing the length in advance."""
    import io

    def header(n):
        f = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)})
        return f.getvalue()

    hlen = len(header(10 ** 15))
    n = 0
    with open(path, "wb") as f:
        f.write(b"\0" * hlen)
        for c in chunks:
            c = np.ascontiguousarray(c, dtype=dtype)
            f.write(c.tobytes())
            n += len(c)
        h = header(n)
        if len(h) != hlen:      # header sizes are padded to 64 bytes; this never happens in practice
            raise RuntimeError(f"{path}: npy header length changed")
        f.seek(0)
        f.write(h)
    return n


def _pack_split(folder: Path, split: str, vocab: dict, out: Path) -> dict:
    src_p, trg_p = folder / f"{split}.src", folder / f"{split}.trg"
    so, to = load_index(src_p), load_index(trg_p)
    if len(so) != len(to):
        raise ValueError(f"{folder}: {split}.src has {len(so)} lines but {split}.trg has {len(to)}")
    n = len(so)
    # Read both files in step: block boundaries from the .src offsets.
    bounds = np.array([a + k for a, k, _ in _boundaries(src_p, so)] or [0], dtype=np.int64)
    n_data = vocab["n_data"]
    dtype = np.uint16 if vocab["vocab_size"] <= 65535 else np.int32
    lengths = np.zeros(n, dtype=np.int64)
    stats = {"src_min": None, "src_max": None}

    def chunks():
        for (a, k, st), (_, _, tt) in zip(iter_blocks(src_p, so, bounds=bounds), iter_blocks(trg_p, to, bounds=bounds)):
            s, sc = parse_block(st, src_p, a, k)
            t, tc = parse_block(tt, trg_p, a, k)
            for p, v, c in ((src_p, s, sc), (trg_p, t, tc)):
                if len(v) and v.max() >= n_data:
                    j = int(np.argmax(v >= n_data))
                    line = a + int(np.searchsorted(np.cumsum(c), j, side="right")) + 1
                    raise ValueError(f"{p}: line {line}: token {int(v[j])} outside the data vocabulary "
                                     f"0..{n_data - 1}")
            # seq = [bos] + src + [sep] + trg + [eos]: scatter into one flat array per block
            seq_len = sc + tc + 3                                    # (k,)
            ends = np.cumsum(seq_len)
            begins = ends - seq_len
            flat = np.empty(int(ends[-1]), dtype=dtype)
            flat[begins] = vocab["bos"]
            flat[begins + 1 + sc] = vocab["sep"]
            flat[ends - 1] = vocab["eos"]
            # token j of the block's src (line r) goes to begins[r] + 1 + (j - first src token of r)
            s_first = np.cumsum(sc) - sc
            t_first = np.cumsum(tc) - tc
            flat[np.arange(len(s)) + np.repeat(begins + 1 - s_first, sc)] = s
            flat[np.arange(len(t)) + np.repeat(begins + 2 + sc - t_first, tc)] = t
            lengths[a:a + k] = seq_len
            smin, smax = int(sc.min()), int(sc.max())
            stats["src_min"] = smin if stats["src_min"] is None else min(stats["src_min"], smin)
            stats["src_max"] = smax if stats["src_max"] is None else max(stats["src_max"], smax)
            yield flat

    total = _write_npy_stream(out / f"{split}.tokens.npy", dtype, chunks())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    assert offsets[-1] == total
    np.save(out / f"{split}.offsets.npy", offsets)
    return {"count": n, "tokens": total, "src_len_min": stats["src_min"], "src_len_max": stats["src_max"]}


def _boundaries(path, offsets):
    """Block boundaries (first_line, n_lines, None) of a file without reading it."""
    size = Path(path).stat().st_size
    ends = np.concatenate([offsets, [size]])
    a, n = 0, len(offsets)
    while a < n:
        b = min(n, max(a + 1, int(np.searchsorted(ends, ends[a] + READ_BLOCK, side="right")) - 1))
        yield a, b - a, None
        a = b


def pack(folder, out=None, *, task=None, vocab=None, abc_size=None, log=None) -> Path:
    """Pack every split of a text folder into ``out`` (default ``folder/packed``), atomically.

    The token layout comes from manifest.json, or from ``task`` (+ ``vocab``/``abc_size``), or
    from a path component named after a task (authors' folders: ``copy/20M_.../``).
    Returns the packed folder.
    """
    folder = Path(folder)
    out = Path(out) if out is not None else folder / "packed"
    splits = list_splits(folder)
    task, voc = folder_vocab(folder, task, vocab, abc_size)
    man_path = folder / "manifest.json"
    tmp = temp_dir_for(out)
    try:
        info = {}
        for split in splits:
            if log:
                log(f"pack: {folder.name}/{split}")
            info[split] = _pack_split(folder, split, voc, tmp)
        meta = {
            "format": "sparse_mosaics.packed",
            "version": PACK_VERSION,
            "task": task,
            "vocab": voc,
            "dtype": "uint16" if voc["vocab_size"] <= 65535 else "int32",
            "splits": info,
            "source_manifest_sha256": sha256_file(man_path) if man_path.exists() else None,
        }
        write_json_atomic(tmp / "packed.json", meta)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _packed_dir(folder) -> Path:
    folder = Path(folder)
    if (folder / "packed.json").exists():
        return folder
    if (folder / "packed" / "packed.json").exists():
        return folder / "packed"
    raise ValueError(f"{folder}: no packed.json (run `sparse-mosaics pack` on the dataset folder first)")


class PackedSplit:
    """A memory-mapped packed split: ``ps[i]`` is the int64 array [bos] + src + [sep] + trg + [eos].

    ``folder`` is the packed folder or the dataset folder holding ``packed/``.
    Attributes: ``vocab`` (token layout), ``task``, ``lengths`` ((n,) len(seq) of every example),
    ``tokens`` (memmap), ``offsets`` ((n+1,) int64).
    """

    def __init__(self, folder, split: str):
        self.dir = _packed_dir(folder)
        self.meta = json.loads((self.dir / "packed.json").read_text())
        if split not in self.meta["splits"]:
            raise ValueError(f"{self.dir}: no split {split!r} (have: {', '.join(sorted(self.meta['splits']))})")
        self.split = split
        self.vocab = self.meta["vocab"]
        self.task = self.meta.get("task")
        self.tokens = np.load(self.dir / f"{split}.tokens.npy", mmap_mode="r")
        self.offsets = np.load(self.dir / f"{split}.offsets.npy", mmap_mode="r")
        if len(self.offsets) != self.meta["splits"][split]["count"] + 1 or self.offsets[-1] != len(self.tokens):
            raise ValueError(f"{self.dir}: {split}.offsets.npy does not match {split}.tokens.npy")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))

    def __getitem__(self, i) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.dir}/{self.split}: index {i} out of range ({n} examples)")
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int64)

    def __repr__(self) -> str:
        return f"PackedSplit({str(self.dir)!r}, {self.split!r}, n={len(self)})"


def read_packed_meta(folder) -> dict:
    """packed.json of a packed folder (or of ``folder/packed``)."""
    return json.loads((_packed_dir(folder) / "packed.json").read_text())
