"""Evaluation: metric functions on hand-made predictions, greedy decoding, the evaluate CLI."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sparse_mosaics import cli
from sparse_mosaics.data import make_batch, task_vocab
from sparse_mosaics.errors import CommandError
from sparse_mosaics.evaluate import (
    batch_slices,
    greedy_exact,
    load_trained_model,
    scored_target_offsets,
    teacher_forced_scores,
)
from sparse_mosaics.cell import validate_cell
from sparse_mosaics.train import train_cell

from test_train import make_cell, write_data

COPY = task_vocab("copy", vocab=8)        # bos 8, sep 9, eos 10, pad 11
MQ = task_vocab("mqmtar", abc_size=4)      # symbols 3..6, bos 7, sep 8, eos 9, pad 10

PROVENANCE = ("code_version", "code_fingerprint", "config_digest", "torch_version", "triton_version",
              "device", "train_seconds", "n_params")
KEYS = ("experiment", "task", "method", "kernel", "alpha", "k", "seed", "size", "split", "test_length", "metric", "value")


def seq(src, trg, v):
    return [v["bos"], *src, v["sep"], *trg, v["eos"]]


# ------------------------------------------------------------------------------ metrics


def test_copy_scores_on_handmade_predictions():
    seqs = [seq([1, 2, 3], [1, 2, 3], COPY), seq([4, 5], [4, 5], COPY)]   # T = 8, second padded
    b = make_batch(seqs, COPY)
    pred = b["y"].clone()
    ok, right, total = teacher_forced_scores(pred, b, "copy", COPY)
    assert ok.shape == (2, 1) and ok.all() and (right, total) == (5, 5)

    pred[0, 0] = 7            # a source position (predicting src[1]): not scored
    pred[0, 7] = 0            # the <eos> prediction of row 0 (position len(x) - 1 = 7): not scored
    ok, right, total = teacher_forced_scores(pred, b, "copy", COPY)
    assert ok.all() and (right, total) == (5, 5)

    pred[1, 3] = 0            # row 1: x = [bos 4 5 sep 4 | 5 ...]; position 3 (sep) predicts trg[0]
    ok, right, total = teacher_forced_scores(pred, b, "copy", COPY)
    assert ok[:, 0].tolist() == [True, False] and (right, total) == (4, 5)
    # exact match 0.5, token accuracy 0.8
    assert ok.all(1).float().mean().item() == 0.5 and right / total == pytest.approx(0.8)


def test_mqmtar_scores_on_handmade_predictions():
    trg = [2, 3, 4, 2, 5, 6, 2, 3, 3, 2, 6, 6]                            # 4 queries [2 v1 v2]
    s = seq([0, 3, 4, 1, 3, 4, 0, 2, 3, 3], trg, MQ)
    b = make_batch([s, s], MQ)
    p = int((b["x"][0] == MQ["sep"]).nonzero()[0])                        # y[p:p+12] = trg
    assert b["y"][0, p : p + 12].tolist() == trg
    pred = b["y"].clone()
    pred[:, p] = 0            # q-sep predictions are not scored
    pred[:, p + 9] = 0
    pred[1, p + 4] = 3        # row 1: query 1's first value wrong
    pred[1, p + 11] = 3       # row 1: query 3's second value wrong
    ok, right, total = teacher_forced_scores(pred, b, "mqmtar", MQ)
    assert ok.tolist() == [[True] * 4, [True, False, True, False]]
    assoc = ok.float().mean().item()
    exact = ok.all(1).float().mean().item()
    assert assoc == pytest.approx(6 / 8) and exact == 0.5
    assert (right, total) == (14, 16)
    assert scored_target_offsets("mqmtar", 12) == [1, 2, 4, 5, 7, 8, 10, 11]
    assert scored_target_offsets("copy", 3) == [0, 1, 2]


def test_batch_slices_respect_token_budget():
    assert list(batch_slices([10] * 5, 2, 1000)) == [(0, 2), (2, 4), (4, 5)]
    assert list(batch_slices([10] * 5, 8, 30)) == [(0, 3), (3, 5)]
    assert list(batch_slices([100, 100], 8, 30)) == [(0, 1), (1, 2)]     # always >= 1 example
    assert list(batch_slices([5, 50, 5], 8, 60)) == [(0, 1), (1, 2), (2, 3)]


# ------------------------------------------------------------------------------ greedy


class OracleModel(torch.nn.Module):
    """Knows the sequences: at every position, a one-hot logit on the true next token."""

    def __init__(self, seqs, vocab_size):
        super().__init__()
        self.seqs = [list(map(int, s)) for s in seqs]
        self.V = vocab_size

    def forward(self, idx, targets=None, loss_mask=None, lengths=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.V)
        for b in range(B):
            n = int(lengths[b]) if lengths is not None else T
            row = idx[b, :n].tolist()
            # the stored sequence this row is a prefix of (greedy feeds back only right tokens)
            s = next(s for s in self.seqs if s[:n] == row)
            for p in range(n):
                logits[b, p, s[p + 1]] = 1.0
        return logits, None


class PeekingModel(torch.nn.Module):
    """Cheats: predicts x[p+1] from the input itself — perfect teacher-forced, useless greedy."""

    def __init__(self, vocab_size):
        super().__init__()
        self.V = vocab_size

    def forward(self, idx, targets=None, loss_mask=None, lengths=None):
        nxt = torch.roll(idx, -1, dims=1)
        nxt[:, -1] = 0
        return torch.nn.functional.one_hot(nxt, self.V).float(), None


def test_greedy_oracle_is_perfect_and_peeking_is_caught():
    seqs = [seq([1, 2, 3, 4], [1, 2, 3, 4], COPY), seq([5, 6], [5, 6], COPY), seq([7], [7], COPY)]
    null = contextlib.nullcontext()
    ok = greedy_exact(OracleModel(seqs, COPY["vocab_size"]), seqs, COPY, "copy", {}, torch.device("cpu"), null)
    assert ok.tolist() == [True, True, True]

    peek = PeekingModel(COPY["vocab_size"])
    b = make_batch(seqs, COPY)
    tf_ok, _, _ = teacher_forced_scores(peek(b["x"])[0].argmax(-1), b, "copy", COPY)
    assert tf_ok.all()                                                  # teacher forcing is fooled
    ok = greedy_exact(peek, seqs, COPY, "copy", {}, torch.device("cpu"), null)
    assert not ok.any()                                                 # greedy is not


def test_greedy_mqmtar_oracle():
    trg = [2, 3, 4, 2, 5, 6, 2, 3, 3, 2, 6, 6]
    seqs = [seq([0, 3, 4, 1, 3, 4, 0, 2, 3, 3], trg, MQ)]
    ok = greedy_exact(OracleModel(seqs, MQ["vocab_size"]), seqs, MQ, "mqmtar", {"num_q": 4, "v_len": 2},
                      torch.device("cpu"), contextlib.nullcontext())
    assert ok.tolist() == [True]


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained copy cell + a test folder with two lengths."""
    root = tmp_path_factory.mktemp("eval")
    train_dir = write_data(root, size=64)
    test_dir = write_data(root, test_lengths=(4, 12), test_size=10, seed=1)
    cell = make_cell(max_iters=6, log_interval=3)
    cell["eval"] = {"batch_size": 4, "token_budget": 64}
    (root / "cell.json").write_text(json.dumps(cell))
    cell_dir = root / "cell"
    train_cell(validate_cell(cell), train_dir, cell_dir, quiet=True)
    return root, test_dir, cell_dir


def test_evaluate_cli_writes_tidy_rows(trained, capsys):
    root, test_dir, cell_dir = trained
    out = cell_dir / "metrics.parquet"
    rc = cli.main(["evaluate", "--cell", str(root / "cell.json"), "--model", str(cell_dir / "model.pt"),
                   "--data", str(test_dir), "--out", str(out), "--train-summary", str(cell_dir / "train_summary.json")])
    assert rc == 0, capsys.readouterr().err
    df = pd.read_parquet(out)
    for col in KEYS + PROVENANCE:
        assert col in df.columns, col
    assert len(df) == 2 * 4
    assert set(df["test_length"]) == {4, 12}
    for L in (4, 12):
        assert sorted(df.loc[df.test_length == L, "metric"]) == sorted(
            ["exact_match", "token_accuracy", "loss", "greedy_exact_match"])
    assert df.duplicated(list(KEYS[:-1])).sum() == 0
    assert df["value"].notna().all() and np.isfinite(df["value"]).all()
    for col in PROVENANCE:
        assert df[col].notna().all(), col
    summary = json.loads((cell_dir / "train_summary.json").read_text())
    assert (df["n_params"] == summary["n_params"]).all()
    assert (df["train_seconds"] == summary["train_seconds"]).all()
    assert (df["split"] == "test").all() and (df["kernel"] == "gaussian").all() and (df["alpha"] == 1.0).all()
    assert df["k"].isna().all() and (df["n_examples"] == 10).all()
    acc = df[df.metric.isin(["exact_match", "token_accuracy", "greedy_exact_match"])]["value"]
    assert ((acc >= 0) & (acc <= 1)).all()
    loss = df[df.metric == "loss"]["value"]
    assert (loss > 0).all() and (loss < 10).all()


def test_evaluate_is_deterministic_and_max_examples(trained, tmp_path):
    from sparse_mosaics.evaluate import evaluate_cell

    root, test_dir, cell_dir = trained
    cell = validate_cell(json.loads((root / "cell.json").read_text()))
    a = evaluate_cell(cell, cell_dir / "model.pt", test_dir, tmp_path / "a.parquet", quiet=True)
    b = evaluate_cell(cell, cell_dir / "model.pt", test_dir, tmp_path / "b.parquet", quiet=True)
    pd.testing.assert_series_equal(a["value"], b["value"])
    cell["eval"]["max_examples_per_length"] = 3
    cell["eval"]["greedy_max_examples_per_length"] = 0
    c = evaluate_cell(cell, cell_dir / "model.pt", test_dir, tmp_path / "c.parquet", quiet=True)
    assert (c["n_examples"] == 3).all() and "greedy_exact_match" not in set(c["metric"])
    cell["eval"]["greedy_max_examples_per_length"] = 2
    g = evaluate_cell(cell, cell_dir / "model.pt", test_dir, tmp_path / "g.parquet", quiet=True)
    assert g.groupby("metric")["n_examples"].first().to_dict() == {
        "exact_match": 3, "token_accuracy": 3, "loss": 3, "greedy_exact_match": 2}


def test_bad_model_files_name_the_file(trained, tmp_path):
    root, test_dir, cell_dir = trained
    cell = validate_cell(json.loads((root / "cell.json").read_text()))
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CommandError, match="model.pt"):
        load_trained_model(bad, torch.device("cpu"), cell)
    with pytest.raises(CommandError, match="no such file"):
        load_trained_model(tmp_path / "missing.pt", torch.device("cpu"), cell)
    torch.save({"weights": {}}, bad)
    with pytest.raises(CommandError, match="not a sparse-mosaics model.pt"):
        load_trained_model(bad, torch.device("cpu"), cell)
    payload = torch.load(cell_dir / "model.pt", weights_only=True)
    payload["model"].pop(next(iter(payload["model"])))
    torch.save(payload, bad)
    with pytest.raises(CommandError, match="do not match"):
        load_trained_model(bad, torch.device("cpu"), cell)
    other = dict(cell, method="biweight")
    with pytest.raises(CommandError, match="method"):
        load_trained_model(cell_dir / "model.pt", torch.device("cpu"), other)


def test_evaluate_mqmtar_cell(tmp_path):
    params = {"abc_size": 4, "kv_vocab": 8}
    train_dir = write_data(tmp_path, task="mqmtar", size=32, params=params, min_len=8, max_len=12)
    test_dir = write_data(tmp_path, task="mqmtar", params=params, test_lengths=(8, 16), test_size=6, seed=1)
    cell = make_cell(max_iters=3)
    cell.update(task="mqmtar", method="top2_uniform", size=32, data=params)
    cell = validate_cell(cell)
    train_cell(cell, train_dir, tmp_path / "cell", quiet=True)
    from sparse_mosaics.evaluate import evaluate_cell

    df = evaluate_cell(cell, tmp_path / "cell" / "model.pt", test_dir, tmp_path / "m.parquet", quiet=True)
    assert sorted(set(df["metric"])) == ["assoc_recall", "exact_match", "greedy_exact_match", "loss"]
    assert set(df["test_length"]) == {8, 16} and len(df) == 8
    assert (df["k"] == 2).all() and df["alpha"].isna().all() and (df["kernel"] == "uniform_knn").all()
    assert np.isfinite(df["value"]).all() and not math.isnan(df["train_seconds"].iloc[0])
