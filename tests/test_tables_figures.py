"""Aggregation into the experiment table (sparse_mosaics.tables, `sparse-mosaics aggregate`) and the
length-generalisation figure (sparse_mosaics.figures.lengthgen, `sparse-mosaics plot lengthgen`),
on synthetic per-cell metrics tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sparse_mosaics import cli
from sparse_mosaics.attention.registry import get_method
from sparse_mosaics.tables import (
    COLUMNS,
    REQUIRED_METRICS,
    TableError,
    aggregate,
    parse_test_lengths,
    summarise,
    summary_html,
)

LENGTHS = (8, 16, 32, 64)


def cell_metrics(task="copy", method="softmax", seed=0, size=2000, lengths=LENGTHS, metrics=None, value=None):
    """One cell's metrics table as `sparse-mosaics evaluate` writes it."""
    metrics = metrics or REQUIRED_METRICS["lengthgen"][task]
    spec = get_method(method)
    rows = []
    for L in lengths:
        for m in metrics:
            v = value if value is not None else max(0.0, 1.0 - 0.2 * math.log2(L / lengths[0])) - 0.01 * seed
            rows.append({
                "experiment": "lengthgen", "task": task, "method": method, "kernel": spec.kernel,
                "alpha": spec.alpha, "k": spec.k, "seed": seed, "size": size, "split": "test",
                "test_length": L, "metric": m, "value": float(v), "n_examples": 64,
                "code_version": "0.1.0+gabc", "code_fingerprint": "f" * 16, "config_digest": "d" * 16,
                "torch_version": "2.13.0", "triton_version": "3.9.0", "device": "cpu",
                "train_seconds": 1.5, "n_params": 1234,
            })
    df = pd.DataFrame(rows)
    df["alpha"] = pd.array(df["alpha"].tolist(), dtype="Float64")
    df["k"] = pd.array(df["k"].tolist(), dtype="Int64")
    return df


def write_cells(root, cells):
    paths = []
    for i, df in enumerate(cells):
        p = root / f"cell{i}" / "metrics.parquet"
        p.parent.mkdir(parents=True)
        df.to_parquet(p, index=False)
        paths.append(p)
    return paths


GRID = [
    dict(task=t, method=m, seed=s)
    for t in ("copy", "mqmtar")
    for m in ("softmax", "biweight", "top16_uniform")
    for s in (0, 1)
]


@pytest.fixture
def grid_files(tmp_path):
    return write_cells(tmp_path, [cell_metrics(**c) for c in GRID])


def test_aggregate_concatenates_every_cell(grid_files):
    table = aggregate(grid_files, "lengthgen", {"copy": list(LENGTHS), "mqmtar": list(LENGTHS)})
    assert list(table.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert "n_examples" in table.columns                      # extra columns are kept, after the contract's
    assert len(table) == len(GRID) * len(LENGTHS) * 3
    cells = table.groupby(["task", "method", "seed"]).size()
    assert len(cells) == len(GRID) and set(cells) == {len(LENGTHS) * 3}
    assert set(table[table.task == "mqmtar"].metric) == {"assoc_recall", "exact_match", "loss"}
    # alpha / k stay nullable: top-K uniform has no alpha, softmax no k
    tu = table[table.method == "top16_uniform"].iloc[0]
    assert pd.isna(tu["alpha"]) and tu["k"] == 16
    assert table[table.method == "biweight"]["alpha"].iloc[0] == pytest.approx(1.5)
    # sorted by cell, length, metric
    assert table.equals(table.sort_values(["task", "method", "size", "seed", "test_length", "metric"]).reset_index(drop=True))


def test_missing_test_length_names_the_cell_and_file(tmp_path):
    cells = [cell_metrics(method="softmax"), cell_metrics(method="biweight", lengths=(8, 16, 32))]
    paths = write_cells(tmp_path, cells)
    with pytest.raises(TableError, match=r"lengthgen/copy/biweight/n2000/s0 .*cell1.*L=64"):
        aggregate(paths, "lengthgen")  # expected lengths = the union over the task's cells


def test_expected_test_lengths_are_enforced(grid_files):
    with pytest.raises(TableError, match=r"L=128"):
        aggregate(grid_files, "lengthgen", {"copy": [8, 16, 32, 64, 128], "mqmtar": list(LENGTHS)})
    with pytest.raises(TableError, match=r"no cell of task\(s\) sort"):
        aggregate(grid_files, "lengthgen", {"copy": list(LENGTHS), "mqmtar": list(LENGTHS), "sort": [8]})


def test_missing_required_metric(tmp_path):
    paths = write_cells(tmp_path, [cell_metrics(task="mqmtar", metrics=("exact_match", "loss"))])
    with pytest.raises(TableError, match=r"mqmtar/softmax/n2000/s0.*assoc_recall"):
        aggregate(paths, "lengthgen")


def test_optional_metric_must_be_in_every_cell(tmp_path):
    full = ("exact_match", "token_accuracy", "loss", "greedy_exact_match")
    paths = write_cells(tmp_path, [cell_metrics(seed=0, metrics=full), cell_metrics(seed=1)])
    with pytest.raises(TableError, match=r"s1 .*greedy_exact_match"):
        aggregate(paths, "lengthgen")
    ok = write_cells(tmp_path / "ok", [cell_metrics(seed=0, metrics=full), cell_metrics(seed=1, metrics=full)])
    assert len(aggregate(ok, "lengthgen")) == 2 * len(LENGTHS) * 4


def test_nan_value_is_refused(tmp_path):
    df = cell_metrics()
    df.loc[3, "value"] = np.nan
    paths = write_cells(tmp_path, [df])
    with pytest.raises(TableError, match=r"cell0/metrics.parquet .*NaN.*value"):
        aggregate(paths, "lengthgen")


def test_duplicate_and_mixed_cells_are_refused(tmp_path):
    paths = write_cells(tmp_path, [cell_metrics(), cell_metrics()])
    with pytest.raises(TableError, match=r"appears in two files"):
        aggregate(paths, "lengthgen")
    mixed = pd.concat([cell_metrics(seed=0), cell_metrics(seed=1)], ignore_index=True)
    paths = write_cells(tmp_path / "m", [mixed])
    with pytest.raises(TableError, match=r"holds 2 cells"):
        aggregate(paths, "lengthgen")


def test_missing_column_and_unreadable_file(tmp_path):
    paths = write_cells(tmp_path, [cell_metrics().drop(columns=["config_digest"])])
    with pytest.raises(TableError, match=r"missing columns config_digest"):
        aggregate(paths, "lengthgen")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(TableError, match=r"bad.parquet: cannot read Parquet"):
        aggregate([bad], "lengthgen")
    with pytest.raises(TableError, match=r"no such metrics file"):
        aggregate([tmp_path / "absent.parquet"], "lengthgen")


def test_parse_test_lengths():
    assert parse_test_lengths(["copy=16,8", "mqmtar=64"]) == {"copy": [8, 16], "mqmtar": [64]}
    for bad in (["copy"], ["copy=a,b"], ["=8"], ["copy="]):
        with pytest.raises(TableError):
            parse_test_lengths(bad)


def test_summary_over_seeds(grid_files):
    table = aggregate(grid_files, "lengthgen")
    s = summarise(table)
    row = s[(s.task == "copy") & (s.method == "softmax") & (s.test_length == 8) & (s.metric == "exact_match")].iloc[0]
    assert row["n_seeds"] == 2
    assert row["mean"] == pytest.approx(0.995) and row["min"] == pytest.approx(0.99) and row["max"] == pytest.approx(1.0)
    html = summary_html(table)
    assert "<table" in html and "copy, n=2000: exact_match (2 seeds)" in html
    # methods in the paper's order
    assert html.index(">softmax<") < html.index(">biweight<") < html.index(">top16_uniform<")


def test_aggregate_cli(grid_files, tmp_path, capsys):
    out, summary = tmp_path / "t" / "lengthgen.parquet", tmp_path / "t" / "summary.html"
    rc = cli.main(["aggregate", "--experiment", "lengthgen", "--out", str(out), "--summary", str(summary),
                   "--test-lengths", "copy=8,16,32,64", "--test-lengths", "mqmtar=8,16,32,64", *map(str, grid_files)])
    assert rc == 0
    assert len(pd.read_parquet(out)) == len(GRID) * len(LENGTHS) * 3
    assert summary.read_text().startswith("<!DOCTYPE html>")
    rc = cli.main(["aggregate", "--experiment", "lengthgen", "--out", str(tmp_path / "x.parquet"),
                   "--test-lengths", "copy=8,16,32,64,128", *map(str, grid_files)])
    assert rc == 2
    assert "L=128" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()              # nothing written on error


# ---------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------


def test_lengthgen_figure(grid_files, tmp_path):
    import matplotlib.pyplot as plt

    from sparse_mosaics.figures.lengthgen import plot_lengthgen
    from sparse_mosaics.figures.style import method_color

    table = aggregate(grid_files, "lengthgen")
    pdf, png = tmp_path / "f" / "lengthgen.pdf", tmp_path / "f" / "lengthgen.png"
    fig = plot_lengthgen(table, pdf, png, train_lengths=(8, 16))
    assert pdf.stat().st_size > 1000 and png.stat().st_size > 1000
    assert pdf.read_bytes()[:4] == b"%PDF" and png.read_bytes()[:4] == b"\x89PNG"
    axes = fig.axes
    assert [a.get_title().split(" ")[0] for a in axes] == ["Copy", "MQMTAR"]  # one panel per task, paper order
    for ax in axes:
        assert ax.get_xscale() == "log"
        lines = [line for line in ax.get_lines() if line.get_label() and not line.get_label().startswith("_")]
        assert len(lines) == 3                                  # one line per method
        assert {line.get_color() for line in lines} == {method_color(m) for m in ("softmax", "biweight", "top16_uniform")}
        # the line is the mean over the two seeds
        sm = next(line for line in lines if line.get_color() == method_color("softmax"))
        assert list(sm.get_xdata()) == list(LENGTHS)
        assert sm.get_ydata()[0] == pytest.approx(0.995)
        assert len(ax.patches) == 1                             # the shaded training range
    assert "exact-match" in axes[0].get_ylabel()
    assert fig.legends, "legend outside the panels"
    plt.close(fig)


def test_lengthgen_figure_sd_band_and_errors(grid_files, tmp_path):
    import matplotlib.pyplot as plt

    from sparse_mosaics.figures.lengthgen import plot_lengthgen

    table = aggregate(grid_files, "lengthgen")
    fig = plot_lengthgen(table, tmp_path / "a.pdf", metric="loss", spread="sd")
    assert (tmp_path / "a.pdf").exists() and not (tmp_path / "a.png").exists()
    plt.close(fig)
    with pytest.raises(ValueError, match="metric 'bleu'"):
        plot_lengthgen(table, tmp_path / "b.pdf", metric="bleu")
    with pytest.raises(ValueError, match="spread"):
        plot_lengthgen(table, tmp_path / "b.pdf", spread="iqr")


def test_plot_cli(grid_files, tmp_path, capsys):
    table = tmp_path / "lengthgen.parquet"
    aggregate(grid_files, "lengthgen").to_parquet(table, index=False)
    out = tmp_path / "figs" / "lengthgen_accuracy.pdf"
    assert cli.main(["plot", "lengthgen", "--table", str(table), "--out", str(out), "--train-lengths", "8", "16"]) == 0
    assert out.stat().st_size > 0 and out.with_suffix(".png").stat().st_size > 0
    assert cli.main(["plot", "lengthgen", "--table", str(tmp_path / "none.parquet"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["plot", "lengthgen", "--table", str(table), "--out", str(tmp_path / "x.svg")]) == 2
