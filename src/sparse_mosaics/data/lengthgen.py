"""Length-generalisation tasks: copy, reverse, sort and MQMTAR (SPEC.md §3c).

Every example is a pair (src, trg) of integer token lists:

- **copy / reverse / sort**: src = L iid uniform tokens in 0..V-1 (V = ``vocab``, default 32);
  trg = src, src[::-1] or sorted(src).
- **mqmtar** (multi-query multi-token associative recall): tokens 0 (space), 1 (kv-separator),
  2 (query-separator), key/value symbols 3..abc+2. Per *file* a vocabulary of K distinct k_len-token
  keys and K distinct v_len-token values is drawn (K = min(kv_vocab, abc^k_len, abc^v_len)). Per
  example of length L::

      m = max(1, min(floor(num_kv_frac * L / (k_len + v_len + 2)), K))   # pairs
      w = floor(L / m)                                                    # row width
      row_j = [space]*o_j + [k_j  1  v_j  0] + [space]*(w - 6 - o_j),  o_j ~ U{0..w-6}
      src   = row_1 ... row_m  + [2 k_q1] ... [2 k_q4]                    # q ~ U{1..m}, with repl.
      trg   = [2 v_q1] ... [2 v_q4]

  The keys (and values) of one example are distinct. The authors' generator places each pair in
  spaces and deletes random spaces with an *unseeded* RNG until the row has w tokens; here the
  (equivalent in structure) leading-space count o_j is drawn from the seeded generator.

Randomness: every draw comes from ``np.random.Generator(PCG64(SeedSequence(entropy)))`` with
entropy derived from (seed, task, split kind, [length], purpose, [chunk]) — see :func:`seed_sequence`.
Test and validation shards are seeded by their *length*, not by their index or by the training
size, so a test folder is identical whatever training set it accompanies.

Generation is vectorised over a chunk of examples (:func:`chunk_examples`); the chunk size is a
fixed function of the lengths, so the output is a deterministic function of the parameters.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np

from .formats import SplitWriter, replace_dir, temp_dir_for, write_manifest

TASKS = ("copy", "reverse", "sort", "mqmtar")
COPY_LIKE = ("copy", "reverse", "sort")

GENERATOR = "sparse_mosaics.data.lengthgen"
GENERATOR_VERSION = 1

# MQMTAR internal specials
SPACE, KV_SEP, Q_SEP = 0, 1, 2
MQMTAR_FIRST_SYMBOL = 3

# A chunk holds at most this many examples and about this many source tokens.
CHUNK_EXAMPLES = 100_000
CHUNK_TOKENS = 1 << 23

DEFAULTS = {
    "vocab": 32,
    "abc_size": 256,
    "kv_vocab": 10_000,
    "k_len": 2,
    "v_len": 2,
    "num_q": 4,
    "num_kv_frac": 0.8,
}


# ----------------------------------------------------------------------------- vocabulary

def task_vocab(task: str, vocab: int = 32, abc_size: int = 256) -> dict:
    """Token layout of the model's input for ``task`` (SPEC.md §3c, "Token layout").

    Data tokens are 0..n_data-1 with n_data = vocab (copy/reverse/sort) or abc_size + 3 (mqmtar:
    space, kv-sep, q-sep, then the symbols). Then bos = n_data, sep = n_data+1, eos = n_data+2,
    pad = n_data+3 and vocab_size = n_data+4 (defaults: 32..36 and 259..263, as the reference).
    """
    if task in COPY_LIKE:
        if vocab < 1:
            raise ValueError(f"vocab must be >= 1, got {vocab}")
        n = int(vocab)
    elif task == "mqmtar":
        if abc_size < 1:
            raise ValueError(f"abc_size must be >= 1, got {abc_size}")
        n = int(abc_size) + 3
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return {"bos": n, "sep": n + 1, "eos": n + 2, "pad": n + 3, "vocab_size": n + 4, "n_data": n}


def task_params(task: str, **overrides) -> dict:
    """The generator parameters that matter for ``task`` (defaults filled in, others dropped).

    copy/reverse/sort: {vocab}; mqmtar: {abc_size, kv_vocab, k_len, v_len, num_q, num_kv_frac}.
    ``None`` values in ``overrides`` mean "default".
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    keys = ["vocab"] if task in COPY_LIKE else ["abc_size", "kv_vocab", "k_len", "v_len", "num_q", "num_kv_frac"]
    p = {}
    for k in keys:
        v = overrides.get(k)
        p[k] = DEFAULTS[k] if v is None else v
    for k in keys:
        if k == "num_kv_frac":
            p[k] = float(p[k])
            if not 0 < p[k] <= 1:
                raise ValueError(f"num_kv_frac must be in (0, 1], got {p[k]}")
        else:
            p[k] = int(p[k])
            if p[k] < 1:
                raise ValueError(f"{k} must be >= 1, got {p[k]}")
    return p


def vocab_for_params(task: str, params: dict) -> dict:
    return task_vocab(task, vocab=params.get("vocab", 32), abc_size=params.get("abc_size", 256))


# ----------------------------------------------------------------------------- seeding

def _word(part) -> int:
    """A SeedSequence entropy word: ints as they are, strings as 64 bits of their SHA-256."""
    if isinstance(part, (int, np.integer)):
        if part < 0:
            raise ValueError(f"seed parts must be non-negative, got {part}")
        return int(part)
    return int.from_bytes(hashlib.sha256(str(part).encode()).digest()[:8], "little")


def seed_sequence(seed: int, *parts) -> np.random.SeedSequence:
    """SeedSequence([seed, word(p) for p in parts]): one independent stream per purpose."""
    return np.random.SeedSequence([_word(seed)] + [_word(p) for p in parts])


def make_rng(seed: int, *parts) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, *parts)))


def _token_dtype(n_values: int):
    return np.uint16 if n_values <= np.iinfo(np.uint16).max else np.int32


# ----------------------------------------------------------------------------- copy / reverse / sort

def sample_copy_like(task: str, lengths: np.ndarray, rng: np.random.Generator, vocab: int = 32):
    """One chunk of copy/reverse/sort examples.

    lengths: (n,) source lengths. Returns (src, src_len, trg, trg_len): src/trg are the flat
    concatenations (row-major) of the n examples, src_len = trg_len = lengths.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n, lmax = len(lengths), int(lengths.max())
    dt = _token_dtype(vocab + 1)
    a = rng.integers(0, vocab, size=(n, lmax), dtype=dt)           # (n, Lmax)
    col = np.arange(lmax)
    mask = col[None, :] < lengths[:, None]                          # (n, Lmax) True on real tokens
    src = a[mask]
    if task == "copy":
        trg = src
    elif task == "reverse":
        idx = np.clip(lengths[:, None] - 1 - col[None, :], 0, None)   # b[i, j] = a[i, L_i - 1 - j]
        trg = np.take_along_axis(a, idx, axis=1)[mask]
    elif task == "sort":
        trg = np.sort(np.where(mask, a, dt(vocab)), axis=1)[mask]   # padding sorts last
    else:
        raise ValueError(f"sample_copy_like: task {task!r} is not copy, reverse or sort")
    return src, lengths, trg, lengths


# ----------------------------------------------------------------------------- mqmtar

def mqmtar_kv_size(params: dict) -> int:
    """K = min(kv_vocab, abc^k_len, abc^v_len): distinct keys (and values) per file."""
    abc = params["abc_size"]
    return int(min(params["kv_vocab"], abc ** params["k_len"], abc ** params["v_len"]))


def mqmtar_num_kv(length: int, params: dict) -> int:
    """num_kv = max(1, min(floor(num_kv_frac * L / (k_len + v_len + 2)), K)) (reference formula)."""
    row = params["k_len"] + params["v_len"] + 2
    m = int(params["num_kv_frac"] * length / row)
    return max(1, min(m, mqmtar_kv_size(params)))


def mqmtar_src_len(length: int, params: dict) -> int:
    """|src| = num_kv * floor(L / num_kv) + num_q * (1 + k_len)."""
    m = mqmtar_num_kv(length, params)
    return m * (length // m) + params["num_q"] * (1 + params["k_len"])


def mqmtar_trg_len(params: dict) -> int:
    return params["num_q"] * (1 + params["v_len"])


def check_mqmtar_length(length: int, params: dict) -> None:
    row = params["k_len"] + params["v_len"] + 2
    m = mqmtar_num_kv(length, params)
    if length // m < row:
        raise ValueError(
            f"mqmtar length {length} is too short: a row needs {row} tokens "
            f"(k_len + v_len + 2) but L // num_kv = {length // m}"
        )


def mqmtar_file_vocab(rng: np.random.Generator, params: dict):
    """Per-file key and value vocabularies: (K, k_len) and (K, v_len) arrays of symbols 3..abc+2."""
    abc, K = params["abc_size"], mqmtar_kv_size(params)

    def draw(tlen):
        codes = rng.choice(abc ** tlen, size=K, replace=False).astype(np.int64)   # (K,)
        digits = (codes[:, None] // abc ** np.arange(tlen - 1, -1, -1)[None, :]) % abc
        return (digits + MQMTAR_FIRST_SYMBOL).astype(np.int32)                   # (K, tlen)

    return draw(params["k_len"]), draw(params["v_len"])


def distinct_rows(rng: np.random.Generator, n: int, m: int, K: int) -> np.ndarray:
    """(n, m) int64: each row m distinct values of 0..K-1, uniform over ordered m-tuples.

    Few pairs (m^2 <= 4K, so P(no repeat) ~ exp(-m^2 / 2K) >= e^-2): draw iid and redraw the
    rows with a repeat (rejection). Otherwise: row-wise random permutations of 0..K-1,
    truncated to m (in sub-chunks of ~2^24 entries).
    """
    if m > K:
        raise ValueError(f"cannot draw {m} distinct values out of {K}")
    if m * m <= 4 * K:
        out = rng.integers(0, K, size=(n, m))
        bad = np.arange(n)
        while True:
            s = np.sort(out[bad], axis=1)
            bad = bad[(s[:, 1:] == s[:, :-1]).any(axis=1)]
            if len(bad) == 0:
                return out
            out[bad] = rng.integers(0, K, size=(len(bad), m))
    out = np.empty((n, m), dtype=np.int64)
    step = max(1, (1 << 24) // K)
    base = np.arange(K, dtype=np.int32)
    for a in range(0, n, step):
        b = min(n, a + step)
        out[a:b] = rng.permuted(np.broadcast_to(base, (b - a, K)), axis=1)[:, :m]
    return out


def _mqmtar_group(rng, n: int, length: int, keys: np.ndarray, values: np.ndarray, params: dict):
    """n MQMTAR examples of one length: src (n, |src|), trg (n, |trg|)."""
    k_len, v_len, num_q = params["k_len"], params["v_len"], params["num_q"]
    row = k_len + v_len + 2
    K = len(keys)
    m = mqmtar_num_kv(length, params)
    w = length // m
    check_mqmtar_length(length, params)

    ki = distinct_rows(rng, n, m, K)                               # (n, m) key ids
    vi = distinct_rows(rng, n, m, K)                               # (n, m) value ids
    off = rng.integers(0, w - row + 1, size=(n, m))                # (n, m) leading spaces per row
    q = rng.integers(0, m, size=(n, num_q))                        # (n, num_q) queried pairs

    block = np.concatenate(                                       # (n, m, row) = [k 1 v 0]
        [keys[ki], np.full((n, m, 1), KV_SEP, np.int32), values[vi], np.full((n, m, 1), SPACE, np.int32)],
        axis=2,
    )
    rows = np.full((n, m, w), SPACE, dtype=np.int32)              # (n, m, w)
    np.put_along_axis(rows, off[:, :, None] + np.arange(row)[None, None, :], block, axis=2)

    qsep = np.full((n, num_q, 1), Q_SEP, np.int32)
    qk = keys[np.take_along_axis(ki, q, axis=1)]                  # (n, num_q, k_len)
    qv = values[np.take_along_axis(vi, q, axis=1)]                # (n, num_q, v_len)
    src = np.concatenate([rows.reshape(n, m * w), np.concatenate([qsep, qk], 2).reshape(n, -1)], axis=1)
    trg = np.concatenate([qsep, qv], 2).reshape(n, -1)
    return src, trg


def sample_mqmtar(lengths: np.ndarray, rng: np.random.Generator, keys, values, params: dict):
    """One chunk of MQMTAR examples (grouped by length internally, returned in input order).

    Returns (src, src_len, trg, trg_len) like :func:`sample_copy_like`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    src_len = np.array([mqmtar_src_len(int(L), params) for L in np.unique(lengths)])
    src_len = src_len[np.searchsorted(np.unique(lengths), lengths)]   # (n,)
    tl = mqmtar_trg_len(params)
    dt = _token_dtype(params["abc_size"] + MQMTAR_FIRST_SYMBOL)
    src_pad = np.zeros((n, int(src_len.max())), dtype=dt)
    trg = np.zeros((n, tl), dtype=dt)
    for L in np.unique(lengths):                                  # ascending: a fixed draw order
        idx = np.flatnonzero(lengths == L)
        s, t = _mqmtar_group(rng, len(idx), int(L), keys, values, params)
        src_pad[idx, : s.shape[1]] = s
        trg[idx] = t
    mask = np.arange(src_pad.shape[1])[None, :] < src_len[:, None]
    return src_pad[mask], src_len, trg.reshape(-1), np.full(n, tl, dtype=np.int64)


# ----------------------------------------------------------------------------- splits

def chunk_examples(max_len: int) -> int:
    """Examples per chunk: min(CHUNK_EXAMPLES, CHUNK_TOKENS // max_len), at least 1."""
    return max(1, min(CHUNK_EXAMPLES, CHUNK_TOKENS // max(1, int(max_len))))


def check_lengths(task: str, min_len: int, max_len: int, params: dict) -> None:
    if min_len < 1 or max_len < min_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if task == "mqmtar":
        for L in range(min_len, min(max_len, min_len + 64) + 1):  # short lengths are the risky ones
            check_mqmtar_length(L, params)
        check_mqmtar_length(max_len, params)


def split_chunks(task: str, params: dict, seed: int, kind: str, n: int, min_len: int, max_len: int):
    """Yield (src, src_len, trg, trg_len) chunks of one split.

    kind: "train" (lengths ~ U{min_len..max_len}) or "validation"/"test" (min_len == max_len).
    The split's streams are seeded by (seed, task, kind) for train and (seed, task, kind, L) for
    evaluation shards; chunk c uses the stream (..., "chunk", c).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    check_lengths(task, min_len, max_len, params)
    key = (task, kind) if kind == "train" else (task, kind, int(min_len))
    if task == "mqmtar":
        keys, values = mqmtar_file_vocab(make_rng(seed, *key, "vocab"), params)
    per = chunk_examples(max_len)
    for c, a in enumerate(range(0, n, per)):
        b = min(n, a + per)
        rng = make_rng(seed, *key, "chunk", c)
        if min_len == max_len:
            lengths = np.full(b - a, min_len, dtype=np.int64)
        else:
            lengths = rng.integers(min_len, max_len + 1, size=b - a)
        if task == "mqmtar":
            yield sample_mqmtar(lengths, rng, keys, values, params)
        else:
            yield sample_copy_like(task, lengths, rng, params["vocab"])


def generate_split(task: str, params: dict, seed: int, kind: str, n: int, min_len: int, max_len: int):
    """A whole split in memory: (list of src lists, list of trg lists). For tests and small data."""
    srcs, trgs = [], []
    for s, sl, t, tl in split_chunks(task, params, seed, kind, n, min_len, max_len):
        srcs += [x.tolist() for x in np.split(s.astype(np.int64), np.cumsum(sl)[:-1])]
        trgs += [x.tolist() for x in np.split(t.astype(np.int64), np.cumsum(tl)[:-1])]
    return srcs, trgs


# ----------------------------------------------------------------------------- dataset folders

def dataset_dir(root, task: str, size: int | None = None):
    """``<root>/lengthgen/<task>/n<size>/`` (training folder) or ``.../test/`` (size None)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return Path(root) / "lengthgen" / task / ("test" if size is None else f"n{int(size)}")


def folder_plan(kind: str, *, size=None, min_len=32, max_len=64, val_lengths=(), val_size=1000,
                test_lengths=(), test_size=1000) -> list[tuple[str, str, int, int, int]]:
    """The splits of a folder as (name, kind, count, min_len, max_len), in generation order.

    kind "train": ``train`` (size examples, L ~ U{min_len..max_len}) and ``validation_<i>_<L>``;
    kind "test": ``test_<i>_<L>``. Shard index i follows increasing length.
    """
    def shards(prefix, lengths, n):
        ls = sorted(set(int(L) for L in lengths))
        if len(ls) != len(list(lengths)):
            raise ValueError(f"{prefix} lengths contain duplicates: {list(lengths)}")
        if n < 1 and ls:
            raise ValueError(f"{prefix} size must be >= 1, got {n}")
        return [(f"{prefix}_{i}_{L}", prefix, int(n), L, L) for i, L in enumerate(ls)]

    if kind == "train":
        if size is None or int(size) < 1:
            raise ValueError(f"training size must be >= 1, got {size}")
        return shards("validation", val_lengths, val_size) + [("train", "train", int(size), int(min_len), int(max_len))]
    if kind == "test":
        if not list(test_lengths):
            raise ValueError("a test folder needs at least one test length")
        return shards("test", test_lengths, test_size)
    raise ValueError(f"folder kind must be 'train' or 'test', got {kind!r}")


def folder_manifest(task: str, params: dict, seed: int, kind: str, plan) -> dict:
    """The manifest of a folder, before file hashes: everything the bytes depend on (no timestamps)."""
    m = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "task": task,
        "kind": kind,
        "seed": int(seed),
        "parameters": dict(params),
        "chunking": {"examples": CHUNK_EXAMPLES, "tokens": CHUNK_TOKENS},
        "vocab": vocab_for_params(task, params),
        "splits": {name: {"count": n, "min_len": a, "max_len": b} for name, _, n, a, b in plan},
    }
    return m


def write_folder(dest, task: str, params: dict, seed: int, kind: str, plan, log=None) -> dict:
    """Generate every split of ``plan`` into ``dest`` atomically (temp folder, then rename).

    Returns the manifest as written (with file hashes) plus ``seconds`` (not written).
    """
    manifest = folder_manifest(task, params, seed, kind, plan)
    n_values = manifest["vocab"]["n_data"]
    tmp = temp_dir_for(dest)
    t0 = time.perf_counter()
    try:
        for name, skind, n, a, b in plan:
            t1 = time.perf_counter()
            n_chunks = -(-n // chunk_examples(b))
            with SplitWriter(tmp, name, n_values) as w:
                for c, chunk in enumerate(split_chunks(task, params, seed, skind, n, a, b)):
                    w.write(*chunk)
                    if log:
                        dt = max(time.perf_counter() - t1, 1e-9)
                        log(f"generate {task} {name}: chunk {c + 1}/{n_chunks}, {w.count}/{n} examples, "
                            f"{w.nbytes / 1e6:.1f} MB, {w.count / dt:,.0f} ex/s, {w.nbytes / 1e6 / dt:.1f} MB/s")
        manifest = write_manifest(tmp, manifest)
        replace_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dict(manifest, seconds=time.perf_counter() - t0)
