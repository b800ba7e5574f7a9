"""Figure 1: the kernels of the paper, in 1-D and as attention weight surfaces.

    plot_kernels("results/figures/kernels.pdf", "results/figures/kernels.png")

Left: the normalised 1-D kernel profiles on u in [-2, 2] (Gaussian, triweight, biweight,
Epanechnikov, Gaussian kNN, uniform kNN), evaluated on a grid of step 0.01 and normalised to sum 1
over the grid, as in the paper (peaks 0.0042, 0.0109, 0.0094, 0.0075, 0.0058, 0.0050). The kNN
profiles are drawn with the K-th neighbour at |u| = 1.

Right: for each of the eight methods, the weight p_0 of the fixed entry of the score vector
s = [0, u1, u2] over u1, u2 in [-2, 2], computed with the library's reference backend
(top-K methods with K = 2, as in the paper's figure).

The score vector is realised geometrically, as in Memory Mosaics: a query x and three keys y_j on
the sphere of radius sqrt(2) (beta^2 = 2, so cos_j = s_j / 2 covers [-1, 1]) with x . y_j = s_j,

    x = sqrt(2) e_0,   y_j = (s_j / sqrt 2) e_0 + sqrt(2 - s_j^2 / 2) e_{j+1}.

Every method except norm_relu only sees the scores s_j. norm_relu sees distances,
||x - y_j||^2 = 4 - 2 s_j; the paper's bandwidth for this figure is unknown, and we choose
h^2 = 6 (pass x/h, y_j/h), which gives p_j ∝ relu(1 - (4 - 2 s_j)/6) ∝ relu(1 + s_j): the same unit
margin as ReLUmax, relu(1 + s_j - max_l s_l), but measured from the fixed score 0 instead of the
row maximum (fixed versus max-anchored normalisation). The fixed entry s_0 = 0 is then always
inside the NormReLU support, so the uniform fallback never triggers on this surface.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..attention import get_method, kernel_attention
from ..attention.kernels import kernel_profile
from .style import TEXT_WIDTH, apply_style, method_color, save_figure

# Figure 1's method panels, in the paper's order; top-K with K = 2 as in the paper's figure.
FIGURE_METHODS = (
    "softmax",
    "triweight",
    "biweight",
    "epanechnikov",
    "top2_softmax",
    "top2_uniform",
    "norm_relu",
    "relumax",
)
PANEL_TITLES = {
    "softmax": "1-entmax (softmax)",
    "triweight": "4/3-entmax",
    "biweight": "1.5-entmax",
    "epanechnikov": "2-entmax (sparsemax)",
    "top2_softmax": "top-2 softmax",
    "top2_uniform": "top-2 uniform",
    "norm_relu": "NormReLU",
    "relumax": "ReLUmax",
}
# 1-D profiles: (label, kernel name, the method whose colour the curve takes)
PROFILES = (
    ("Gaussian", "gaussian", "softmax"),
    ("Triweight", "triweight", "triweight"),
    ("Biweight", "biweight", "biweight"),
    ("Epanechnikov", "epanechnikov", "epanechnikov"),
    ("Gaussian kNN", "gaussian_knn", "top2_softmax"),
    ("Uniform kNN", "uniform_knn", "top2_uniform"),
)
NORM_RELU_BANDWIDTH2 = 6.0  # h^2 for NormReLU on the radius-sqrt(2) sphere (see the module docstring)


def kernel_profiles(step: float = 0.01, half_width: float = 2.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """u grid on [-half_width, half_width] and each profile K(u_g) / sum_g K(u_g) (sums to 1 on the grid)."""
    n = int(round(2 * half_width / step)) + 1
    u = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    out = {}
    for label, name, _ in PROFILES:
        k = kernel_profile(name, u)
        out[label] = (k / k.sum()).numpy()
    return u.numpy(), out


def _score_geometry(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query x (G, 4) and keys y (G, 3, 4) on the radius-sqrt(2) sphere with x . y_j = scores[:, j]."""
    G = scores.shape[0]
    x = torch.zeros(G, 4, dtype=torch.float64)
    x[:, 0] = math.sqrt(2.0)
    y = torch.zeros(G, 3, 4, dtype=torch.float64)
    y[:, :, 0] = scores / math.sqrt(2.0)
    for j in range(3):
        y[:, j, j + 1] = torch.sqrt(torch.clamp(2.0 - scores[:, j] ** 2 / 2.0, min=0.0))
    return x, y


def fixed_entry_weight(method: str, u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """p_0 of ``method`` for the score vector [0, u1, u2] (arrays of equal shape), by the reference backend.

    Queries and keys are laid out as one sequence per grid point: T = 4, shift = 1, the query at
    position 3 attends keys 0, 1, 2 with scores 0, u1, u2; values are one-hot, so y = p.
    """
    shape = np.shape(u1)
    s = torch.stack(
        [torch.zeros(u1.size, dtype=torch.float64), torch.as_tensor(u1, dtype=torch.float64).reshape(-1),
         torch.as_tensor(u2, dtype=torch.float64).reshape(-1)],
        dim=-1,
    )  # (G, 3)
    if s.abs().max() > 2.0 + 1e-12:
        raise ValueError("fixed_entry_weight: scores must lie in [-2, 2] (radius-sqrt(2) sphere)")
    x, y = _score_geometry(s)
    G = s.shape[0]
    q = torch.zeros(G, 1, 4, 4, dtype=torch.float64)  # (B=G, H=1, T=4, D=4)
    k = torch.zeros(G, 1, 4, 4, dtype=torch.float64)
    q[:, 0, 3] = x
    k[:, 0, :3] = y
    if get_method(method).family == "norm_relu":
        h = math.sqrt(NORM_RELU_BANDWIDTH2)
        q, k = q / h, k / h
    v = torch.zeros(G, 1, 4, 1, dtype=torch.float64)
    v[:, 0, 0, 0] = 1.0  # one-hot on the fixed entry
    y_out = kernel_attention(q, k, v, method, shift=1, backend="reference")  # (G, 1, 4, 1)
    return y_out[:, 0, 3, 0].numpy().reshape(shape)


def _surface_cmap(color: str):
    from matplotlib.colors import LinearSegmentedColormap, to_rgb

    c = np.array(to_rgb(color))
    light = 0.85 + 0.15 * c  # a pale tint of the method colour
    return LinearSegmentedColormap.from_list("m", [light, 0.5 * light + 0.5 * c, c])


def plot_kernels(pdf_path, png_path=None, grid_points: int = 61):
    """Draw Figure 1 (1-D kernel profiles; 2x4 weight surfaces) to ``pdf_path`` (and ``png_path``).

    Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    apply_style()
    fig = plt.figure(figsize=(TEXT_WIDTH, 0.44 * TEXT_WIDTH))
    gs = GridSpec(2, 5, figure=fig, width_ratios=[1.5, 1, 1, 1, 1], wspace=0.0, hspace=0.12,
                  left=0.07, right=1.0, bottom=0.1, top=0.93)

    # left: 1-D profiles
    ax = fig.add_subplot(gs[:, 0])
    u, profiles = kernel_profiles()
    for label, _, method in PROFILES:
        ls = "--" if "kNN" in label else "-"
        ax.plot(u, profiles[label], ls, color=method_color(method), label=label)
    ax.set_xlim(-2, 2)
    ax.set_ylim(0, 0.0145)
    ax.set_xticks([-2, -1, 0, 1, 2])
    ax.set_xlabel("$u$")
    ax.set_ylabel("normalised kernel $K(u)$")
    ax.legend(frameon=False, loc="upper center", ncol=2, handlelength=1.6, fontsize=6, columnspacing=0.8)
    ax.set_title("1-D kernels", pad=3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.yaxis.get_offset_text().set_fontsize(6)

    # right: p_0 for scores [0, u1, u2]
    g = np.linspace(-2.0, 2.0, grid_points)
    U1, U2 = np.meshgrid(g, g)
    for idx, method in enumerate(FIGURE_METHODS):
        r, c = divmod(idx, 4)
        ax3 = fig.add_subplot(gs[r, c + 1], projection="3d")
        P = fixed_entry_weight(method, U1, U2)
        ax3.plot_surface(U1, U2, P, cmap=_surface_cmap(method_color(method)), vmin=0, vmax=1,
                         linewidth=0.15, edgecolor=(0.2, 0.2, 0.2, 0.25), antialiased=True, rstride=3, cstride=3)
        ax3.set_zlim(0, 1)
        ax3.set_xticks([-2, 0, 2])
        ax3.set_yticks([-2, 0, 2])
        ax3.set_zticks([0, 0.5, 1])
        ax3.tick_params(axis="both", labelsize=5, pad=-3)
        ax3.tick_params(axis="z", labelsize=5, pad=-1)
        ax3.zaxis.set_ticks_position("lower")  # z ticks and labels on the left edge
        ax3.zaxis.set_label_position("lower")
        if c > 0:
            ax3.set_zticklabels([])
        ax3.set_xlabel("$u_1$", fontsize=6, labelpad=-9)
        ax3.set_ylabel("$u_2$", fontsize=6, labelpad=-9)
        ax3.view_init(elev=25, azim=40)
        ax3.set_box_aspect((1, 1, 0.75), zoom=0.95)
        ax3.set_title(PANEL_TITLES[method], fontsize=7, color=method_color(method), pad=0, y=0.97)
        for axis in (ax3.xaxis, ax3.yaxis, ax3.zaxis):
            axis.pane.set_alpha(0.0)
            axis._axinfo["grid"]["linewidth"] = 0.3
            axis.line.set_linewidth(0.5)
    fig.text(0.66, 1.0, "weight of the fixed entry in $\\pi([0, u_1, u_2])$", ha="center", va="top", fontsize=7)
    save_figure(fig, pdf_path, png_path)
    return fig
