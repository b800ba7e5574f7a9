"""Training one cell: config validation, schedule, data order, resume equality, NaN stop, outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sparse_mosaics import cli
from sparse_mosaics.errors import CommandError
from sparse_mosaics.cell import load_cell, validate_cell
from sparse_mosaics.train import (
    CURVE_COLUMNS,
    DataOrder,
    NonFiniteLoss,
    get_lr,
    num_steps,
    train_cell,
)


def make_cell(**train):
    cell = {
        "name": "test", "experiment": "lengthgen", "task": "copy", "method": "softmax", "seed": 3, "size": 64,
        "data": {"vocab": 8},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "pmem_size": 8},
        "train": {"batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 2, "epochs": 1,
                  "checkpoint_interval": 100, "log_interval": 2, "threads": 1, **train},
        "eval": {"batch_size": 8},
    }
    return cell


def write_data(root, task="copy", size=64, params=None, min_len=3, max_len=6, test_lengths=None, test_size=10, seed=0):
    """A tiny generated + packed training (or test) folder; returns the packed folder."""
    from sparse_mosaics.data import pack, task_params
    from sparse_mosaics.data.lengthgen import folder_plan, write_folder

    params = task_params(task, **(params or {"vocab": 8}))
    if test_lengths is None:
        plan = folder_plan("train", size=size, min_len=min_len, max_len=max_len)
        kind = "train"
    else:
        plan = folder_plan("test", test_lengths=test_lengths, test_size=test_size)
        kind = "test"
    dest = root / f"{task}_{kind}"
    write_folder(dest, task, params, seed, kind, plan)
    return pack(dest)


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


# ------------------------------------------------------------------------------ config


def test_validate_fills_defaults():
    cell = validate_cell(make_cell())
    assert cell["train"]["grad_clip"] == 1.0 and cell["train"]["max_iters"] is None
    assert cell["eval"]["max_examples_per_length"] is None


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c.pop("task"), "task"),
        (lambda c: c.update(tas="copy"), "tas"),
        (lambda c: c.update(method="top0_softmax"), "method"),
        (lambda c: c.update(task="addition"), "task"),
        (lambda c: c["train"].update(lr="fast"), "train.lr"),
        (lambda c: c["train"].update(batch_size=0), "train.batch_size"),
        (lambda c: c["train"].update(batchsize=8), "train.batchsize"),
        (lambda c: c["train"].update(beta2=1.0), "train.beta2"),
        (lambda c: c["train"].update(dtype="float16"), "train.dtype"),
        (lambda c: c["train"].update(compile=3), "train.compile"),
        (lambda c: c["train"].update(compile=""), "train.compile"),
        (lambda c: c["train"].update(compile="no_such_backend"), "train.compile"),
        (lambda c: c["train"].update(max_iters=2.5), "train.max_iters"),
        (lambda c: c["model"].update(n_layers=2), "model.n_layers"),
        (lambda c: c["model"].update(vocab_size=10), "model.vocab_size"),
        (lambda c: c["eval"].update(max_examples_per_length=-1), "eval.max_examples_per_length"),
        (lambda c: c.update(seed=True), "seed"),
        (lambda c: c["model"].update(n_embd=15), "model"),
        (lambda c: c["data"].update(vocab=0), "data"),
    ],
)
def test_bad_cell_names_the_key(tmp_path, mutate, key):
    cell = make_cell()
    mutate(cell)
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(cell))
    with pytest.raises(CommandError) as e:
        load_cell(path)
    assert f"'{key}'" in str(e.value) and str(path) in str(e.value)


def test_bad_cell_via_cli_exits_2(tmp_path, capsys):
    cell = make_cell(lr=-1)
    (tmp_path / "cell.json").write_text(json.dumps(cell))
    rc = cli.main(["train", "--cell", str(tmp_path / "cell.json"), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "train.lr" in capsys.readouterr().err


def test_not_json(tmp_path):
    (tmp_path / "cell.json").write_text("{nope")
    with pytest.raises(CommandError, match="not valid JSON"):
        load_cell(tmp_path / "cell.json")


# ------------------------------------------------------------------------------ schedule


def test_schedule_key_steps():
    lr, mn, w, d = 1e-3, 1e-4, 10, 110
    assert get_lr(0, lr, mn, w, d) == 0.0
    assert get_lr(5, lr, mn, w, d) == pytest.approx(5e-4)
    assert get_lr(10, lr, mn, w, d) == pytest.approx(lr)              # end of warm-up: peak
    assert get_lr(60, lr, mn, w, d) == pytest.approx(mn + 0.5 * (lr - mn))  # half-way: midpoint
    assert get_lr(110, lr, mn, w, d) == pytest.approx(mn)
    assert get_lr(500, lr, mn, w, d) == mn
    # monotone decay after warm-up
    vals = [get_lr(i, lr, mn, w, d) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    # no warm-up
    assert get_lr(0, lr, mn, 0, 100) == pytest.approx(lr)
    # degenerate decay <= warmup
    assert get_lr(20, lr, mn, 20, 20) == mn


def test_num_steps():
    t = {"max_iters": None, "epochs": 1, "batch_size": 256}
    assert num_steps(t, 20_000_000) == 78_125
    assert num_steps(t, 30_000_000) == 117_188
    assert num_steps({**t, "epochs": 2}, 1000) == 8
    assert num_steps({**t, "max_iters": 5}, 1000) == 5


def test_data_order_is_deterministic_permutation():
    a = DataOrder(10, 4, seed=1, total_items=20)
    b = DataOrder(10, 4, seed=1, total_items=20)
    batches = [a.batch(i) for i in range(5)]
    assert [len(x) for x in batches] == [4, 4, 4, 4, 4]
    assert all((x == b.batch(i)).all() for i, x in enumerate(batches))
    flat = np.concatenate(batches)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not (flat[:10] == flat[10:]).all()  # a fresh permutation each epoch
    other = np.concatenate([DataOrder(10, 4, seed=2, total_items=20).batch(i) for i in range(5)])
    assert not (other == flat).all()  # another seed, another order
    short = DataOrder(10, 4, seed=1, total_items=10)
    assert len(short.batch(2)) == 2
    with pytest.raises(IndexError):
        short.batch(3)


# ------------------------------------------------------------------------------ training


def _state(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_is_bit_identical(tmp_path, copy_data):
    cell = validate_cell(make_cell(max_iters=9, checkpoint_interval=4, log_interval=2))
    full = tmp_path / "full"
    train_cell(cell, copy_data, full, quiet=True)

    cut = tmp_path / "cut"
    out = train_cell(cell, copy_data, cut, stop_after=6, quiet=True)  # "killed" after step 6: ckpt at 4
    assert out == {"stopped_at": 6}
    assert not (cut / "model.pt").exists()
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["step"] == 4
    train_cell(cell, copy_data, cut, quiet=True)                      # same command again: resumes
    assert "resumed from" in (cut / "train.log").read_text()

    a, b = _state(full / "model.pt"), _state(cut / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, cb = pd.read_parquet(full / "curve.parquet"), pd.read_parquet(cut / "curve.parquet")
    pd.testing.assert_frame_equal(ca[["step", "loss", "lr"]], cb[["step", "loss", "lr"]])
    ka = torch.load(full / "checkpoint.pt", weights_only=True)
    kb = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert ka["step"] == kb["step"] == 9
    assert torch.equal(ka["rng"]["torch_cpu"], kb["rng"]["torch_cpu"])


def test_outputs_and_curve(tmp_path, copy_data):
    cell = validate_cell(make_cell(max_iters=5, log_interval=2))
    (tmp_path / "cell.json").write_text(json.dumps(make_cell(max_iters=5, log_interval=2)))
    out = tmp_path / "cell"
    rc = cli.main(["train", "--cell", str(tmp_path / "cell.json"), "--data", str(copy_data), "--out", str(out), "--quiet"])
    assert rc == 0
    for f in ("model.pt", "checkpoint.pt", "curve.parquet", "train.log", "train_summary.json"):
        assert (out / f).is_file(), f
    curve = pd.read_parquet(out / "curve.parquet")
    assert tuple(curve.columns) == CURVE_COLUMNS
    assert curve["step"].tolist() == [2, 4, 5]
    assert curve["lr"].tolist() == pytest.approx([get_lr(i, 3e-3, 3e-4, 2, 5) for i in (1, 3, 4)])
    assert np.isfinite(curve.to_numpy()).all() and (curve["tokens_per_s"] > 0).all()
    assert curve["elapsed_s"].is_monotonic_increasing
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["cell"] == cell
    assert payload["model_config"]["method"] == "softmax" and payload["model_config"]["vocab_size"] == 12
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 5 and summary["n_params"] > 0 and summary["train_seconds"] > 0
    assert summary["final_loss"] == pytest.approx(curve["loss"].iloc[-1])
    assert summary["versions"]["torch"] == torch.__version__
    assert "step 4/5" in (out / "train.log").read_text()


def test_epochs_give_ceil_steps(tmp_path, copy_data):
    cell = validate_cell(make_cell(batch_size=24, epochs=1, log_interval=100))  # 64 examples -> 3 steps
    summary = train_cell(cell, copy_data, tmp_path / "c", quiet=True)
    assert summary["steps"] == 3 and summary["tokens"] > 0


def test_nan_loss_stops_with_step(tmp_path, copy_data, monkeypatch):
    from sparse_mosaics import train as train_mod

    real = train_mod.model_forward
    calls = {"n": 0}

    def poisoned(model, batch):
        logits, loss = real(model, batch)
        calls["n"] += 1
        if calls["n"] == 3:
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(train_mod, "model_forward", poisoned)
    cell = validate_cell(make_cell(max_iters=6, checkpoint_interval=2, log_interval=1))
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match="step 3"):
        train_cell(cell, copy_data, out, quiet=True)
    assert not (out / "model.pt").exists()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)   # the last good checkpoint
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert "step 3" in (out / "train.log").read_text()


def test_nan_via_cli_exits_nonzero(tmp_path, copy_data, capsys):
    cell = make_cell(max_iters=4, lr=1e30, min_lr=1e30, warmup_iters=0, grad_clip=0.0)
    (tmp_path / "cell.json").write_text(json.dumps(cell))
    rc = cli.main(["train", "--cell", str(tmp_path / "cell.json"), "--data", str(copy_data), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "non-finite" in err and "step" in err
    assert not (tmp_path / "o" / "model.pt").exists()


def test_corrupt_checkpoint_names_file(tmp_path, copy_data):
    out = tmp_path / "c"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CommandError, match="checkpoint.pt"):
        train_cell(validate_cell(make_cell(max_iters=2)), copy_data, out, quiet=True)


def test_changed_config_restarts(tmp_path, copy_data):
    out = tmp_path / "c"
    train_cell(validate_cell(make_cell(max_iters=2)), copy_data, out, quiet=True)
    train_cell(validate_cell(make_cell(max_iters=3, lr=1e-3)), copy_data, out, quiet=True)
    assert "different cell config" in (out / "train.log").read_text()
    assert torch.load(out / "model.pt", weights_only=True)["step"] == 3


def test_wrong_task_data(tmp_path, copy_data):
    cell = make_cell(max_iters=2)
    cell["task"] = "reverse"
    with pytest.raises(CommandError, match="task"):
        train_cell(validate_cell(cell), copy_data, tmp_path / "c", quiet=True)


def test_loss_decreases(tmp_path_factory):
    # copy with a 4-token alphabet and short sequences: learnable in a few dozen steps.
    data = write_data(tmp_path_factory.mktemp("easy"), size=512, params={"vocab": 4}, min_len=2, max_len=4)
    cell = make_cell(max_iters=60, lr=1e-2, min_lr=1e-3, warmup_iters=5, log_interval=10, batch_size=16)
    cell["data"] = {"vocab": 4}
    cell["size"] = 512
    cell["model"] = {"n_layer": 2, "n_head": 2, "n_embd": 32, "pmem_size": 8}
    run = tmp_path_factory.mktemp("run")
    summary = train_cell(validate_cell(cell), data, run, quiet=True)
    curve = pd.read_parquet(run / "curve.parquet")
    assert curve["loss"].iloc[-1] < 0.75 * curve["loss"].iloc[0]
    assert summary["final_loss"] < math.log(4)


# ------------------------------------------------------------------------------ torch.compile


def test_compile_values():
    from sparse_mosaics.cell import compile_backend, compile_kwargs, uses_cuda_graphs

    assert validate_cell(make_cell())["train"]["compile"] is False
    for value in (True, False, "aot_eager", "inductor", "reduce-overhead", "max-autotune-no-cudagraphs"):
        assert validate_cell(make_cell(compile=value))["train"]["compile"] == value
    assert compile_kwargs(False) is None and compile_kwargs(True) == {}
    assert compile_kwargs("reduce-overhead") == {"mode": "reduce-overhead"}
    assert compile_kwargs("aot_eager") == {"backend": "aot_eager"}
    assert compile_backend("reduce-overhead") == "inductor" and compile_backend("aot_eager") == "aot_eager"
    assert uses_cuda_graphs("reduce-overhead") and uses_cuda_graphs("max-autotune") and uses_cuda_graphs("cudagraphs")
    assert not any(uses_cuda_graphs(v) for v in (False, True, "aot_eager", "max-autotune-no-cudagraphs"))
    with pytest.raises(CommandError, match=r"'train.compile': unknown torch.compile backend or mode 'inductr' "
                                           r"\(backends: .*aot_eager.*; modes: .*reduce-overhead"):
        validate_cell(make_cell(compile="inductr"))
    with pytest.raises(CommandError, match=r"'train.compile': must be false, true .* got 1"):
        validate_cell(make_cell(compile=1))


def test_compiled_training_matches_eager_and_resumes(tmp_path, copy_data):
    """compile: "aot_eager" (a real torch.compile backend that needs no C compiler) trains the same
    model, writes the same outputs with plain state-dict keys, and resumes (from a compiled or an
    eager checkpoint)."""
    from sparse_mosaics.evaluate import load_trained_model

    kw = dict(max_iters=9, checkpoint_interval=4, log_interval=2)
    eager, comp = tmp_path / "eager", tmp_path / "comp"
    train_cell(validate_cell(make_cell(**kw)), copy_data, eager, quiet=True)
    cell = validate_cell(make_cell(compile="aot_eager", **kw))
    summary = train_cell(cell, copy_data, comp, quiet=True)
    assert summary["compile"] == "aot_eager" and summary["steps"] == 9
    assert "torch.compile on (backend aot_eager)" in (comp / "train.log").read_text()
    assert sorted(p.name for p in comp.iterdir()) == sorted(p.name for p in eager.iterdir())

    a, b = _state(eager / "model.pt"), _state(comp / "model.pt")
    assert list(a) == list(b) and not any("_orig_mod" in k for k in b)
    assert not any("_orig_mod" in k for k in _state(comp / "checkpoint.pt"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    ca, cb = pd.read_parquet(eager / "curve.parquet"), pd.read_parquet(comp / "curve.parquet")
    assert cb["step"].tolist() == ca["step"].tolist()
    np.testing.assert_allclose(cb["loss"], ca["loss"], rtol=1e-4)
    model, _ = load_trained_model(comp / "model.pt", torch.device("cpu"), cell)   # evaluation loads it
    assert sum(p.numel() for p in model.parameters()) == summary["n_params"]

    for first in (cell, validate_cell(make_cell(**kw))):  # killed at step 6 (checkpoint at 4), compiled or eager
        cut = tmp_path / f"cut_{first['train']['compile']}"
        assert train_cell(first, copy_data, cut, stop_after=6, quiet=True) == {"stopped_at": 6}
        train_cell(cell, copy_data, cut, quiet=True)                                # resumed compiled
        assert "resumed from" in (cut / "train.log").read_text()
        c = _state(cut / "model.pt")
        assert list(c) == list(b)
        for k in b:
            torch.testing.assert_close(c[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_failing_compile_backend_names_the_key(tmp_path, copy_data):
    import torch._dynamo

    def failing(gm, example_inputs):
        raise RuntimeError("this backend always fails")

    if "sparse_mosaics_test_failing_backend" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(failing, name="sparse_mosaics_test_failing_backend")
    cell = validate_cell(make_cell(max_iters=2, compile="sparse_mosaics_test_failing_backend"))
    with pytest.raises(CommandError, match=r"train.compile: .*sparse_mosaics_test_failing_backend.*always fails"):
        train_cell(cell, copy_data, tmp_path / "c", quiet=True)
    assert not (tmp_path / "c" / "model.pt").exists()


def test_bench_train_times_eager_and_compiled(monkeypatch):
    """bench --compile: the train section has an eager and a compiled row per method (no GPU needed
    for the bookkeeping: the timed step is stubbed)."""
    from sparse_mosaics import bench

    calls = []

    def fake_step(cell, method, batch, T, amp, steps=15, backend="auto", compile_model=False):
        calls.append((cell, method, backend, compile_model))
        return dict(section="train", impl=f"model_{backend}" + ("_compile" if compile_model else ""),
                    method=method, cell=cell, B=batch, T=T, step_ms=1.0, peak_gib=0.0)

    monkeypatch.setattr(bench, "time_train_step", fake_step)
    rows = bench.run_train(quick=True, log=lambda s: None, compile_model=True)
    assert [(c[1], c[3]) for c in calls] == [(m, comp) for m in bench.METHODS for comp in (False, True)]
    assert {r["impl"] for r in rows} == {"model_auto", "model_auto_compile"}
    calls.clear()
    bench.run_train(quick=True, log=lambda s: None)
    assert [c[3] for c in calls] == [False] * len(bench.METHODS)


@pytest.mark.parametrize("method", ("softmax", "biweight"))
def test_padding_to_a_multiple_keeps_the_loss_and_gradients(method):
    """Under CUDA-graph compile modes batches are padded (train.GRAPH_PAD_MULTIPLE): the model is
    causal and pads are masked out, so the loss and its gradients are those of the tight batch."""
    from sparse_mosaics.data import make_batch, task_vocab
    from sparse_mosaics.model import MemoryMosaic, MemoryMosaicConfig
    from sparse_mosaics.train import model_forward

    v = task_vocab("copy")
    rng = np.random.default_rng(0)
    seqs = []
    for n in (5, 9, 3):
        src = rng.integers(0, 10, n).tolist()
        seqs.append([v["bos"]] + src + [v["sep"]] + src + [v["eos"]])
    torch.manual_seed(0)
    model = MemoryMosaic(MemoryMosaicConfig(vocab_size=v["vocab_size"], n_layer=2, n_embd=32, n_head=2, pmem_size=16,
                                            method=method, ic_dropout=0.0, hd_dropout=0.0))
    out = []
    for pm in (1, 64):
        b = make_batch(seqs, v, pad_multiple=pm)
        assert b["x"].shape[1] == (20 if pm == 1 else 64)
        _, loss = model_forward(model, b)
        out.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
