"""One look for every figure: method colours, markers, labels and figure sizes.

A method keeps its colour in every figure of the paper (Figure 1, length generalisation, ICLL,
language modelling). Methods outside the paper's eight (``entmax_1.25``, ``top4_softmax``, ...)
get a stable colour derived from their family.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window

from ..attention.registry import PAPER_METHODS, get_method  # noqa: E402

# Two-column paper: full text width and one column width, in inches.
TEXT_WIDTH = 7.0
COLUMN_WIDTH = 3.4

# Colour-blind friendly (Okabe–Ito / seaborn 'colorblind'), ordered Gaussian -> compact kernels.
METHOD_COLORS = {
    "softmax": "#0072B2",
    "triweight": "#009E73",
    "biweight": "#D55E00",
    "epanechnikov": "#CC79A7",
    "top16_softmax": "#56B4E9",
    "top16_uniform": "#E69F00",
    "norm_relu": "#000000",
    "relumax": "#999999",
}
METHOD_MARKERS = {
    "softmax": "o",
    "triweight": "^",
    "biweight": "s",
    "epanechnikov": "D",
    "top16_softmax": "v",
    "top16_uniform": "P",
    "norm_relu": "X",
    "relumax": "*",
}
METHOD_LABELS = {
    "softmax": "softmax (Gaussian)",
    "triweight": "4/3-entmax (triweight)",
    "biweight": "1.5-entmax (biweight)",
    "epanechnikov": "sparsemax (Epanechnikov)",
    "top16_softmax": "top-16 softmax (Gaussian kNN)",
    "top16_uniform": "top-16 uniform (uniform kNN)",
    "norm_relu": "NormReLU (Epan., fixed)",
    "relumax": "ReLUmax (Epan., max-anchored)",
}

_FAMILY_FALLBACK = {
    "softmax": "softmax",
    "entmax": "biweight",
    "topk_softmax": "top16_softmax",
    "topk_uniform": "top16_uniform",
    "norm_relu": "norm_relu",
    "relumax": "relumax",
}


def method_color(name: str) -> str:
    """The colour of a method in every figure."""
    if name in METHOD_COLORS:
        return METHOD_COLORS[name]
    return METHOD_COLORS[_FAMILY_FALLBACK[get_method(name).family]]


def method_marker(name: str) -> str:
    if name in METHOD_MARKERS:
        return METHOD_MARKERS[name]
    return METHOD_MARKERS[_FAMILY_FALLBACK[get_method(name).family]]


def method_label(name: str) -> str:
    if name in METHOD_LABELS:
        return METHOD_LABELS[name]
    spec = get_method(name)
    if spec.family == "entmax":
        return f"{spec.alpha:g}-entmax ({spec.kernel})"
    if spec.family == "topk_softmax":
        return f"top-{spec.k} softmax (Gaussian kNN)"
    if spec.family == "topk_uniform":
        return f"top-{spec.k} uniform (uniform kNN)"
    return name


def method_order(names) -> list[str]:
    """Paper order first, then any other method in name order."""
    names = list(dict.fromkeys(names))
    paper = [m for m in PAPER_METHODS if m in names]
    return paper + sorted(m for m in names if m not in PAPER_METHODS)


def apply_style() -> None:
    """Matplotlib settings for print: small serif-free fonts, thin lines, no top/right spines."""
    import seaborn as sns

    sns.set_theme(context="paper", style="ticks")
    matplotlib.rcParams.update(
        {
            "font.size": 8,
            "axes.titlesize": 8,
            "axes.labelsize": 8,
            "legend.fontsize": 7,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "lines.linewidth": 1.2,
            "lines.markersize": 3.5,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
            "pdf.fonttype": 42,
        }
    )


def save_figure(fig, pdf_path, png_path=None) -> None:
    """Write the figure as PDF (and PNG), each through a temporary name then a rename."""
    import os
    from pathlib import Path

    for path in [pdf_path] + ([png_path] if png_path else []):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        fig.savefig(tmp)
        os.replace(tmp, path)
