"""Length generalisation figure: accuracy against test length, one panel per task.

    sparse-mosaics plot lengthgen --table results/<name>/tables/lengthgen.parquet \\
        --out results/<name>/figures/lengthgen_accuracy.pdf [--train-lengths 32 64]

For each task (copy, reverse, sort, mqmtar: a 1 x 4 row of panels) and each method, the line is
the mean over seeds of the metric (default ``exact_match``) at every test length L, with the
spread over seeds as a band (``spread="minmax"``: min to max; ``"sd"``: mean ± one standard
deviation, clipped to [0, 1]). The x axis is log2(L); the training lengths are shaded. Colours,
markers and labels come from :mod:`.style`, so a method looks the same in every figure; the
legend sits below the panels.

When a task has several training-set sizes, the largest one is drawn (pass ``size`` to choose).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import style

TASK_ORDER = ("copy", "reverse", "sort", "mqmtar")
TASK_TITLES = {"copy": "Copy", "reverse": "Reverse", "sort": "Sort", "mqmtar": "MQMTAR"}
METRIC_LABELS = {
    "exact_match": "exact-match accuracy",
    "token_accuracy": "token accuracy",
    "assoc_recall": "associative-recall accuracy",
    "greedy_exact_match": "greedy exact-match accuracy",
    "loss": "test loss (nats / token)",
}
SPREADS = ("minmax", "sd")


def seed_statistics(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (task, method, size, test_length): mean, sd, min, max and count of ``metric`` over seeds."""
    d = df[df["metric"] == metric]
    if d.empty:
        have = ", ".join(sorted(set(df["metric"])))
        raise ValueError(f"table has no rows of metric {metric!r} (metrics present: {have})")
    g = d.groupby(["task", "method", "size", "test_length"], sort=True)["value"]
    s = g.agg(["mean", "std", "min", "max", "count"]).reset_index()
    s["std"] = s["std"].fillna(0.0)  # a single seed has no spread
    return s


def _band(s: pd.DataFrame, spread: str, bounded: bool):
    if spread == "minmax":
        lo, hi = s["min"].to_numpy(), s["max"].to_numpy()
    elif spread == "sd":
        lo, hi = (s["mean"] - s["std"]).to_numpy(), (s["mean"] + s["std"]).to_numpy()
    else:
        raise ValueError(f"spread must be one of {', '.join(SPREADS)}, got {spread!r}")
    if bounded:
        lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
    return lo, hi


def _length_ticks(ax, lengths) -> None:
    """Ticks at the test lengths, labelled 64, 1k, 64k (the axis itself is log2)."""
    def label(L):
        L = int(L)
        return f"{L // 1024}k" if L >= 1024 and L % 1024 == 0 else str(L)

    lengths = sorted(set(int(L) for L in lengths))
    if len(lengths) > 8:  # keep every other tick on long axes, always the first and the last
        keep = set(lengths[::2]) | {lengths[-1]}
        lengths = [L for L in lengths if L in keep]
    ax.set_xticks(lengths)
    ax.set_xticklabels([label(L) for L in lengths])
    ax.minorticks_off()


def plot_lengthgen(
    table,
    pdf_path,
    png_path=None,
    *,
    metric: str = "exact_match",
    train_lengths=None,
    spread: str = "minmax",
    size: int | None = None,
):
    """Draw the length-generalisation figure and save it (PDF, and PNG when ``png_path``).

    Args:
        table: the experiment table (DataFrame, or a path to the Parquet file).
        pdf_path, png_path: output files (written atomically).
        metric: which metric to plot (``exact_match``, ``token_accuracy``, ``assoc_recall``, ...).
        train_lengths: (min, max) training source lengths to shade, or None.
        spread: band over seeds: "minmax" or "sd".
        size: training-set size to draw (default: the largest per task).

    Returns:
        the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    df = pd.read_parquet(table) if isinstance(table, (str, Path)) else table
    if df.empty:
        raise ValueError("table is empty")
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {', '.join(SPREADS)}, got {spread!r}")
    stats = seed_statistics(df, metric)
    tasks = [t for t in TASK_ORDER if t in set(stats["task"])] + sorted(set(stats["task"]) - set(TASK_ORDER))
    methods = style.method_order(stats["method"])
    bounded = metric != "loss"

    style.apply_style()
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(style.TEXT_WIDTH, 2.1), sharey=bounded, squeeze=False, constrained_layout=True,
    )
    axes = axes[0]
    for ax, task in zip(axes, tasks):
        t = stats[stats["task"] == task]
        n = size if size is not None else int(t["size"].max())
        t = t[t["size"] == n]
        if t.empty:
            raise ValueError(f"task {task}: no rows with size {n} (sizes: {sorted(set(stats[stats['task'] == task]['size']))})")
        if train_lengths is not None:
            lo, hi = train_lengths
            ax.axvspan(lo, hi, color="0.88", zorder=0, lw=0, label="training lengths")
        for m in methods:
            s = t[t["method"] == m].sort_values("test_length")
            if s.empty:
                continue
            x = s["test_length"].to_numpy()
            c = style.method_color(m)
            ax.plot(x, s["mean"], color=c, marker=style.method_marker(m), label=style.method_label(m), zorder=3)
            if int(s["count"].max()) > 1:
                band_lo, band_hi = _band(s, spread, bounded)
                ax.fill_between(x, band_lo, band_hi, color=c, alpha=0.15, lw=0, zorder=2)
        ax.set_xscale("log", base=2)
        _length_ticks(ax, t["test_length"])
        n_seeds = int(t["count"].max())
        ax.set_title(f"{TASK_TITLES.get(task, task)} (n={_short(n)}, {n_seeds} seed{'s' if n_seeds != 1 else ''})")
        ax.set_xlabel("test length")
        if bounded:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(True, which="major", lw=0.3, color="0.85")
    axes[0].set_ylabel(METRIC_LABELS.get(metric, metric))

    # One legend for the whole figure, below the panels (methods in paper order, then the shading).
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if "training lengths" in labels:  # the shading goes last
        i = labels.index("training lengths")
        handles.append(handles.pop(i))
        labels.append(labels.pop(i))
    spread_note = "band: min-max over seeds" if spread == "minmax" else "band: mean ± sd over seeds"
    fig.legend(
        handles, labels, loc="outside lower center", ncol=min(4, len(labels)), frameon=False,
        title=spread_note, title_fontsize=6,
    )
    style.save_figure(fig, pdf_path, png_path)
    return fig


def _short(n: int) -> str:
    """2000 -> 2k, 20000000 -> 20M."""
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)
