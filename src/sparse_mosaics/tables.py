"""Experiment tables: every cell's ``metrics.parquet`` -> one tidy, checked Parquet table.

    sparse-mosaics aggregate --experiment lengthgen --out results/<name>/tables/lengthgen.parquet \\
        [--summary results/<name>/tables/lengthgen_summary.html] \\
        [--test-lengths copy=8,16,32,64 --test-lengths sort=8,16,32,64 ...] CELL_DIR/metrics.parquet ...

The table is tidy long (DESIGN.md §6): one row per

    (experiment, task, method, kernel, alpha, k, seed, size, split, test_length, metric)

with ``value``, plus provenance columns (code version and fingerprint, config digest, torch and
triton versions, device, training seconds, parameter count). ``alpha`` and ``k`` are nullable by
design (top-K uniform has no alpha; only top-K methods have a k); every other column must be set.

:func:`aggregate` refuses an incomplete table: each input must hold exactly one cell
(experiment, task, method, size, seed), no cell may appear twice, and every cell must have every
expected test length x metric. The expected metrics of a task are the required ones
(:data:`REQUIRED_METRICS`) plus any metric some cell of that task reports (``greedy_exact_match``
is optional, but then it must be there for all cells and lengths). Errors name the cell and its file.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

KEY_COLUMNS = (
    "experiment", "task", "method", "kernel", "alpha", "k", "seed", "size", "split", "test_length", "metric",
)
PROVENANCE_COLUMNS = (
    "code_version", "code_fingerprint", "config_digest", "torch_version", "triton_version", "device",
    "train_seconds", "n_params",
)
COLUMNS = KEY_COLUMNS + ("value",) + PROVENANCE_COLUMNS
NULLABLE_COLUMNS = ("alpha", "k")

# One training run = one cell.
CELL_COLUMNS = ("experiment", "task", "method", "size", "seed")

# Metrics every evaluated cell must report, per experiment and task (sparse_mosaics.evaluate).
REQUIRED_METRICS = {
    "lengthgen": {
        "copy": ("exact_match", "token_accuracy", "loss"),
        "reverse": ("exact_match", "token_accuracy", "loss"),
        "sort": ("exact_match", "token_accuracy", "loss"),
        "mqmtar": ("assoc_recall", "exact_match", "loss"),
    },
}

# The accuracy a figure or summary shows first, per task.
HEADLINE_METRIC = {"copy": "exact_match", "reverse": "exact_match", "sort": "exact_match", "mqmtar": "exact_match"}


class TableError(ValueError):
    """An input file or the aggregated table breaks the table contract (message names the cell)."""


def cell_name(row) -> str:
    """``lengthgen/copy/softmax/n2000/s0``: how a cell is named in paths and messages."""
    return f"{row['experiment']}/{row['task']}/{row['method']}/n{int(row['size'])}/s{int(row['seed'])}"


def _nan_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in NULLABLE_COLUMNS and df[c].isna().any()]


def read_cell_metrics(path) -> pd.DataFrame:
    """Read one cell's metrics.parquet and check it: the columns, one cell, no missing values."""
    path = Path(path)
    try:
        df = pd.read_parquet(path)
    except FileNotFoundError:
        raise TableError(f"{path}: no such metrics file") from None
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise TableError(f"{path}: cannot read Parquet ({e})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise TableError(f"{path}: missing columns {', '.join(missing)}")
    if df.empty:
        raise TableError(f"{path}: no rows")
    cells = df[list(CELL_COLUMNS)].drop_duplicates()
    if len(cells) != 1:
        names = ", ".join(cell_name(r) for _, r in cells.iterrows())
        raise TableError(f"{path}: holds {len(cells)} cells ({names}); expected exactly one")
    bad = _nan_columns(df)
    if bad:
        raise TableError(f"{path} (cell {cell_name(df.iloc[0])}): missing values (NaN) in {', '.join(bad)}")
    return df


def parse_test_lengths(specs) -> dict[str, list[int]]:
    """``["copy=8,16,32", "sort=8,16"]`` -> {"copy": [8, 16, 32], "sort": [8, 16]}."""
    out = {}
    for spec in specs or ():
        task, sep, values = spec.partition("=")
        if not sep or not task:
            raise TableError(f"--test-lengths {spec!r}: expected TASK=L1,L2,...")
        try:
            out[task] = sorted(int(v) for v in values.split(",") if v)
        except ValueError:
            raise TableError(f"--test-lengths {spec!r}: lengths must be integers") from None
        if not out[task]:
            raise TableError(f"--test-lengths {spec!r}: no lengths")
    return out


def check_table(df: pd.DataFrame, experiment: str, test_lengths: dict | None = None, sources: dict | None = None) -> None:
    """Check an experiment table: columns, no NaN, unique keys, and completeness.

    Args:
        df: the concatenated table.
        experiment: every row must belong to it.
        test_lengths: task -> the test lengths every cell of that task must have; tasks not
            given (or None) expect the union of the lengths that task's cells report.
        sources: cell name -> file, for error messages.

    Raises:
        TableError naming the first incomplete cell (and its file when known).
    """
    sources = sources or {}
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise TableError(f"table: missing columns {', '.join(missing)}")
    if df.empty:
        raise TableError("table: no rows")
    other = sorted(set(df["experiment"]) - {experiment})
    if other:
        raise TableError(f"table: rows of experiment(s) {', '.join(other)} in the {experiment!r} table")
    bad = _nan_columns(df)
    if bad:
        raise TableError(f"table: missing values (NaN) in {', '.join(bad)}")
    key = list(CELL_COLUMNS) + ["split", "test_length", "metric"]
    dup = df[df.duplicated(key, keep=False)]
    if not dup.empty:
        r = dup.iloc[0]
        raise TableError(
            f"cell {cell_name(r)}: duplicate rows for test_length {r['test_length']} metric {r['metric']}"
            " (the same cell given twice?)"
        )
    required = REQUIRED_METRICS.get(experiment, {})
    for task, tdf in df.groupby("task", sort=True):
        metrics = sorted(set(required.get(task, ())) | set(tdf["metric"]))
        lengths = sorted((test_lengths or {}).get(task) or set(tdf["test_length"]))
        want = {(int(L), m) for L in lengths for m in metrics}
        for _, cdf in tdf.groupby(list(CELL_COLUMNS), sort=True):
            name = cell_name(cdf.iloc[0])
            have = {(int(L), m) for L, m in zip(cdf["test_length"], cdf["metric"])}
            lack = sorted(want - have)
            if lack:
                where = f" ({sources[name]})" if name in sources else ""
                shown = ", ".join(f"L={L} {m}" for L, m in lack[:6]) + (" ..." if len(lack) > 6 else "")
                raise TableError(f"cell {name}{where}: missing {len(lack)} test length x metric rows: {shown}")
    if test_lengths:
        absent = sorted(set(test_lengths) - set(df["task"]))
        if absent:
            raise TableError(f"table: no cell of task(s) {', '.join(absent)} (expected by --test-lengths)")


def aggregate(paths, experiment: str, test_lengths: dict | None = None) -> pd.DataFrame:
    """Concatenate and check the cells' metrics files; rows sorted by cell, length, metric."""
    paths = list(paths)
    if not paths:
        raise TableError("no metrics files given")
    frames, sources = [], {}
    for path in paths:
        df = read_cell_metrics(path)
        name = cell_name(df.iloc[0])
        if name in sources:
            raise TableError(f"cell {name} appears in two files: {sources[name]} and {path}")
        sources[name] = str(path)
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    check_table(table, experiment, test_lengths, sources)
    extra = [c for c in table.columns if c not in COLUMNS]
    table = table[list(COLUMNS) + extra]
    return table.sort_values(["task", "method", "size", "seed", "test_length", "metric"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Summary over seeds (for the report)
# ---------------------------------------------------------------------------------------------


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation, min and max over seeds of every (task, method, size, test_length, metric)."""
    group = ["experiment", "task", "method", "size", "split", "test_length", "metric"]
    s = df.groupby(group, sort=True)["value"].agg(["mean", "std", "min", "max", "count"]).reset_index()
    s["std"] = s["std"].fillna(0.0)  # one seed: no spread
    return s.rename(columns={"count": "n_seeds"})


def summary_html(df: pd.DataFrame) -> str:
    """A self-contained HTML page: for each metric, method x test length tables of mean ± sd."""
    from .attention.registry import PAPER_METHODS

    def method_order(names):
        names = list(names)
        return [m for m in PAPER_METHODS if m in names] + sorted(m for m in names if m not in PAPER_METHODS)

    s = summarise(df)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>summary</title>",
        "<style>body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse;margin-bottom:1.5em}"
        " td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} th{background:#f3f3f3}</style>",
        "</head><body>",
        f"<h1>{', '.join(sorted(set(df['experiment'])))}: mean ± sd over seeds</h1>",
    ]
    for (task, size, metric), g in s.groupby(["task", "size", "metric"], sort=True):
        cell = g["mean"].map("{:.3f}".format) + " ± " + g["std"].map("{:.3f}".format)
        wide = g.assign(cell=cell).pivot(index="method", columns="test_length", values="cell")
        wide = wide.reindex(method_order(wide.index))
        wide.columns = [f"L={c}" for c in wide.columns]
        n = int(g["n_seeds"].min())
        parts.append(f"<h2>{task}, n={size}: {metric} ({n} seed{'s' if n != 1 else ''})</h2>")
        parts.append(wide.to_html(escape=True))
    parts.append("</body></html>")
    return "\n".join(parts)


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of each task's headline accuracy (:data:`HEADLINE_METRIC`)."""
    want = df["task"].map(HEADLINE_METRIC)
    return df[df["metric"] == want]


__all__ = [
    "CELL_COLUMNS", "COLUMNS", "HEADLINE_METRIC", "KEY_COLUMNS", "NULLABLE_COLUMNS", "PROVENANCE_COLUMNS",
    "REQUIRED_METRICS", "TableError", "aggregate", "cell_name", "check_table", "headline", "parse_test_lengths",
    "read_cell_metrics", "summarise", "summary_html",
]
