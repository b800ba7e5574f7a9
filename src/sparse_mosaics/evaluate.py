"""Evaluate a trained cell on every test shard, writing tidy metrics (SPEC.md §3c "Test script").

    sparse-mosaics evaluate --cell cell.json --model CELL_DIR/model.pt --data PACKED_TEST_DIR \\
        --out CELL_DIR/metrics.parquet [--train-summary CELL_DIR/train_summary.json]

For each test shard ``test_<i>_<L>`` (one length L), one deterministic pass over its examples (the
first ``eval.max_examples_per_length`` if set; DESIGN.md §6 decision 8: no sampling with
replacement), in batches of at most ``eval.batch_size`` examples and ``eval.token_budget`` input
tokens, model in eval mode (dropout 0), ``torch.no_grad``, bf16 autocast on CUDA.

With x = seq[:-1], y = seq[1:], s = the first ``<sep>`` in x and n = len(x), the *target
positions* are s <= p < n - 1: y there is the target sequence, ``<eos>`` (at p = n - 1) excluded.
Predictions are teacher-forced: pred_p = argmax_v logits_p,v.

- copy / reverse / sort: ``exact_match`` = mean over examples of [pred_p = y_p at every target
  position]; ``token_accuracy`` = (correct target tokens) / (target tokens).
- mqmtar: the target is num_q groups [q-sep v_1 .. v_vlen]; a query is right when all its value
  tokens are (the q-sep predictions are not scored). ``assoc_recall`` = right queries / queries;
  ``exact_match`` = mean over examples of [all queries right].
- ``loss``: the masked teacher-forced cross-entropy (target tokens and ``<eos>``, SPEC.md §2.13),
  summed over the shard's tokens and divided by their number.
- ``greedy_exact_match``: autoregressive greedy decoding of the target after ``<sep>``, feeding back
  the model's own tokens (the whole forward is recomputed each step: no KV cache); an example counts
  when every scored target token (all of them; mqmtar: the value tokens) is right. For a strictly
  causal model this equals the teacher-forced ``exact_match`` up to floating-point noise (by
  induction on the first wrong token), so a gap between the two flags a causality leak or
  numerical instability. Decoding of an example stops at its first wrong scored token. At most
  ``eval.greedy_max_examples_per_length`` examples per shard (default 256; null: all; 0: skip
  this metric); the ``n_examples`` column gives the count each row used.

Output: one row per (experiment, task, method, kernel, alpha, k, seed, size, split, test_length,
metric) with ``value`` and ``n_examples``, plus provenance columns (CONTRACTS.md "Results").
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .errors import CommandError
from .io import write_parquet_atomic

COPY_METRICS = ("exact_match", "token_accuracy", "loss", "greedy_exact_match")
MQMTAR_METRICS = ("assoc_recall", "exact_match", "loss", "greedy_exact_match")


# ---------------------------------------------------------------------------------------------
# Metric functions on given predictions
# ---------------------------------------------------------------------------------------------


def teacher_forced_scores(pred, batch: dict, task: str, vocab: dict, num_q: int = 4, v_len: int = 2):
    """Scores of teacher-forced predictions on one batch.

    Args:
        pred: (B, T) predicted next tokens (argmax of the logits); batch: from ``make_batch``.

    Returns:
        group_ok: (B, G) bool — copy/reverse/sort: G = 1, all target tokens right (<eos> excluded);
            mqmtar: G = num_q, query q right iff all its v_len value tokens are.
        n_correct, n_tokens: ints, scored tokens right / scored tokens (for token accuracy).
    """
    from .data.batching import score_groups, target_positions

    pos = target_positions(batch, task, vocab, num_q=num_q, v_len=v_len)    # (B, G, g)
    ok, n_correct, n_tokens = score_groups(pred.cpu(), batch["y"].cpu(), pos)
    return ok, int(n_correct.sum()), int(n_tokens.sum())


def scored_target_offsets(task: str, trg_len: int, num_q: int = 4, v_len: int = 2) -> list[int]:
    """Offsets within the target that count for exact match (mqmtar: the value tokens only)."""
    if task != "mqmtar":
        return list(range(trg_len))
    group = 1 + v_len
    return [q * group + j for q in range(num_q) for j in range(1, group)]


# ---------------------------------------------------------------------------------------------
# Greedy decoding
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_exact(model, seqs, vocab: dict, task: str, params: dict, device, ctx) -> np.ndarray:
    """Autoregressive greedy exact match of each full sequence in ``seqs`` (bos src sep trg eos).

    The prefix [bos src sep] is given; then T_trg tokens are generated one at a time by re-running
    the model on everything so far and taking the argmax at the last position. Returns (B,) bool.
    """
    sep, pad = vocab["sep"], vocab["pad"]
    B = len(seqs)
    prefixes, targets = [], []
    for s in seqs:
        s = np.asarray(s)
        where = np.flatnonzero(s == sep)
        if where.size == 0:
            raise ValueError("an example has no <sep> token")
        cut = int(where[0]) + 1
        prefixes.append(torch.as_tensor(s[:cut], dtype=torch.long))
        targets.append(torch.as_tensor(s[cut:-1], dtype=torch.long))    # drop <eos>
    n_new = [len(t) for t in targets]
    width = max(len(p) + n - 1 for p, n in zip(prefixes, n_new))         # last token never fed
    buf = torch.full((B, max(width, 1)), pad, dtype=torch.long)
    for b, p in enumerate(prefixes):
        buf[b, : len(p)] = p
    buf = buf.to(device)
    cur = torch.tensor([len(p) for p in prefixes])                       # (B,) tokens so far
    ok = np.ones(B, dtype=bool)
    active = np.array([n > 0 for n in n_new])
    scored = [set(scored_target_offsets(task, n, params.get("num_q", 4), params.get("v_len", 2))) for n in n_new]
    t = 0
    while active.any():
        rows = torch.as_tensor(np.flatnonzero(active))
        lens = cur[rows]
        x = buf[rows.to(device), : int(lens.max())]                       # (b, T_cur)
        with ctx:
            logits, _ = model(x, lengths=lens.to(device))
        last = logits[torch.arange(len(rows), device=device), (lens - 1).to(device)]  # (b, V)
        nxt = last.float().argmax(dim=-1).cpu()                           # (b,)
        for j, b in enumerate(rows.tolist()):
            tok = int(nxt[j])
            if t in scored[b] and tok != int(targets[b][t]):
                ok[b], active[b] = False, False
                continue
            if t + 1 >= n_new[b]:
                active[b] = False
                continue
            buf[b, int(cur[b])] = tok
            cur[b] += 1
        t += 1
    return ok


# ---------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------


def load_trained_model(path, device, cell: dict | None = None):
    """Rebuild the model of ``model.pt`` (dropout 0, eval mode) on ``device``.

    Raises CommandError naming the file if it is missing, corrupt, not a model.pt, does not fit
    its own config, or was trained for another cell (task / method / seed / size) than ``cell``.
    """
    from .model import MemoryMosaic, MemoryMosaicConfig

    path = Path(path)
    if not path.is_file():
        raise CommandError(f"--model {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CommandError(f"{path}: cannot load model ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or not all(k in payload for k in ("model", "model_config")):
        raise CommandError(f"{path}: not a sparse-mosaics model.pt (expected keys 'model' and 'model_config')")
    mc = dict(payload["model_config"])
    mc["ic_dropout"] = 0.0
    mc["hd_dropout"] = 0.0
    try:
        config = MemoryMosaicConfig(**mc)
    except (TypeError, ValueError) as e:
        raise CommandError(f"{path}: bad model_config ({e})") from None
    if cell is not None:
        trained = payload.get("cell") or {}
        for key in ("experiment", "task", "method", "seed", "size"):
            if key in trained and trained[key] != cell[key]:
                raise CommandError(f"{path}: trained for {key}={trained[key]!r}, but the cell config says {key}={cell[key]!r}")
        if config.method != cell["method"]:
            raise CommandError(f"{path}: model method {config.method!r} != cell method {cell['method']!r}")
    model = MemoryMosaic(config)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise CommandError(f"{path}: weights do not match its model_config ({e})") from None
    model.to(device).eval()
    return model, payload


def read_train_summary(path) -> dict:
    import json

    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CommandError(f"--train-summary {path}: cannot read ({e})") from None
    for key in ("train_seconds", "n_params"):
        if key not in summary:
            raise CommandError(f"{path}: key '{key}' missing")
    return summary


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------


def batch_slices(lengths: list[int], batch_size: int, token_budget: int):
    """Consecutive index ranges [start, stop): at most batch_size examples and (count · max length)
    <= token_budget tokens each (always at least one example)."""
    start = 0
    n = len(lengths)
    while start < n:
        stop, longest = start, 0
        while stop < n and stop - start < batch_size:
            longest2 = max(longest, lengths[stop])
            if stop > start and (stop - start + 1) * longest2 > token_budget:
                break
            longest = longest2
            stop += 1
        yield start, stop
        start = stop


def evaluate_shard(model, split, n: int, vocab: dict, cell: dict, params: dict, device, ctx):
    """Metrics of one shard (its first n examples) -> ({metric: value}, {metric: examples used})."""
    from .data import make_batch

    ev = cell["eval"]
    task = cell["task"]
    seq_lens = (np.asarray(split.lengths[:n]) - 1).tolist()              # len(x) of each example
    n_greedy = n if ev["greedy_max_examples_per_length"] is None else min(n, ev["greedy_max_examples_per_length"])
    num_q, v_len = params.get("num_q", 4), params.get("v_len", 2)
    exact, q_right = [], []
    tok_right = tok_total = 0
    loss_sum, loss_count = 0.0, 0
    greedy = []
    vsize = vocab["vocab_size"]
    for start, stop in batch_slices(seq_lens, ev["batch_size"], ev["token_budget"]):
        seqs = [split[i] for i in range(start, stop)]
        batch = make_batch(seqs, vocab)
        if int(batch["x"].max()) >= vsize or int(batch["x"].min()) < 0:
            raise CommandError(f"test data has token ids outside 0..{vsize - 1} (model vocab_size {vsize})")
        x, y, lengths = (batch[k].to(device) for k in ("x", "y", "lengths"))
        lmask = batch["loss_mask"].to(device)
        with ctx:
            logits, _ = model(x, lengths=lengths)                          # (B, T, V)
        logits = logits.float()
        ce = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
        loss_sum += float((ce * lmask).sum())
        loss_count += int(lmask.sum())
        pred = logits.argmax(dim=-1)                                       # (B, T)
        ok, r, c = teacher_forced_scores(pred, batch, task, vocab, num_q=num_q, v_len=v_len)
        q_right.append(ok)                                                 # (B, G)
        exact.append(ok.all(dim=1))                                        # (B,)
        tok_right += r
        tok_total += c
        g_stop = min(stop, n_greedy)
        if g_stop > start:
            greedy.append(greedy_exact(model, seqs[: g_stop - start], vocab, task, params, device, ctx))
        del logits, ce, pred
    out = {"exact_match": float(torch.cat(exact).float().mean()), "loss": loss_sum / max(loss_count, 1)}
    if task == "mqmtar":
        out["assoc_recall"] = float(torch.cat(q_right).float().mean())
    else:
        out["token_accuracy"] = tok_right / max(tok_total, 1)
    if greedy:
        out["greedy_exact_match"] = float(np.concatenate(greedy).mean())
    counts = {k: n for k in out}
    if greedy:
        counts["greedy_exact_match"] = n_greedy
    return out, counts


def list_test_shards(folder):
    """[(split_name, length)] of the packed test folder, sorted by length."""
    from . import data

    folder = Path(folder)
    if not folder.is_dir():
        raise CommandError(f"--data {folder}: not a directory")
    try:
        found = data.shards(folder, "test")
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CommandError(f"--data {folder}: cannot list test shards: {e}") from None
    if not found:
        raise CommandError(f"--data {folder}: no test_<i>_<L> shards found")
    return [(name, int(length)) for name, _index, length in found]


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def evaluate_cell(cell: dict, model_path, data_dir, out_path, *, train_summary=None, device=None, quiet=False):
    """Evaluate ``model_path`` on every test shard of ``data_dir``; write tidy ``out_path``. Returns the frame."""
    import pandas as pd

    from .attention import get_method
    from .provenance import code_version, config_digest, environment, scope_fingerprint
    from .train import autocast_context, data_params, open_split, pick_device, task_vocab

    def log(msg):
        if not quiet:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} evaluate: {msg}", file=sys.stderr, flush=True)

    dev = pick_device(device)
    torch.set_num_threads(int(cell["train"]["threads"]))
    model, payload = load_trained_model(model_path, dev, cell)
    vocab = task_vocab(cell)
    if model.config.vocab_size != vocab["vocab_size"]:
        raise CommandError(f"{model_path}: vocab_size {model.config.vocab_size} != the task's {vocab['vocab_size']} (cell 'data' section)")
    params = data_params(cell)
    if train_summary is None and (Path(model_path).parent / "train_summary.json").is_file():
        train_summary = Path(model_path).parent / "train_summary.json"
    if train_summary is not None:
        summary = read_train_summary(train_summary)
        train_seconds, n_params = float(summary["train_seconds"]), int(summary["n_params"])
    else:
        log("no train_summary.json: train_seconds is NaN")
        train_seconds, n_params = float("nan"), int(model.num_parameters())

    ctx = autocast_context(dev, cell["train"]["dtype"])
    spec = get_method(cell["method"])
    env = environment()
    prov = {
        "code_version": code_version(),
        "code_fingerprint": cell.get("code_fingerprint") or scope_fingerprint("evaluate"),
        "config_digest": config_digest(cell),
        "torch_version": env["torch_version"],
        "triton_version": env["triton_version"],
        "device": env["device"],
        "train_seconds": train_seconds,
        "n_params": n_params,
    }
    rows = []
    max_n = cell["eval"]["max_examples_per_length"]
    for name, length in list_test_shards(data_dir):
        split = open_split(data_dir, name, cell, vocab)
        n = len(split) if max_n is None else min(len(split), max_n)
        if n == 0:
            raise CommandError(f"--data {data_dir}: shard {name} is empty")
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                metrics, counts = evaluate_shard(model, split, n, vocab, cell, params, dev, ctx)
        except ValueError as e:
            raise CommandError(f"--data {data_dir}: shard {name}: {e}") from None
        except CommandError as e:
            raise CommandError(f"--data {data_dir}: shard {name}: {e}") from None
        log(f"{name} (L={length}, {n} examples, {time.perf_counter() - t0:.1f}s): "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        for metric, value in metrics.items():
            if not math.isfinite(value):
                raise CommandError(f"shard {name}: metric {metric} is {value} (non-finite)")
            rows.append({
                "experiment": cell["experiment"], "task": cell["task"], "method": cell["method"],
                "kernel": spec.kernel, "alpha": spec.alpha, "k": spec.k,
                "seed": int(cell["seed"]), "size": int(cell["size"]), "split": "test",
                "test_length": int(length), "metric": metric, "value": float(value), "n_examples": int(counts[metric]),
                **prov,
            })
    df = pd.DataFrame(rows)
    df["alpha"] = pd.array(df["alpha"].tolist(), dtype="Float64")
    df["k"] = pd.array(df["k"].tolist(), dtype="Int64")
    write_parquet_atomic(df, out_path)
    log(f"wrote {len(df)} rows to {out_path}")
    return df
