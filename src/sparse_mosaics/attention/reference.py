"""The reference (oracle) backend: every attention method on a materialised score matrix.

    y = reference_attention(q, k, v, spec, shift=1, lengths=None)

Scores s_ij = q_i . k_j (no scaling) are computed for all (i, j) as a (B, H, T, T) matrix in fp32
(fp64 when the inputs are fp64, so that ``torch.autograd.gradcheck`` works), whatever the input
dtype. The admissible keys of query i are

    A_i = { j : j <= i - shift  and  j < lengths[b] }

and every weight function below maps (scores, mask) to weights p with

    p_ij >= 0,   p_ij = 0 exactly for j not in A_i,   sum_j p_ij = 1 when A_i is non-empty,
    p_i. = 0 when A_i is empty.

The output is y_i = sum_j p_ij v_j, computed in fp32 and returned in v's dtype. Solvers are exact
(sort-based sparsemax; bisection + Newton to fp64 precision for the other entmax alphas), so this
module is the oracle that the fused backends are tested against. It costs O(T^2) memory.

No NaN anywhere, also not in the gradients of rows with empty A_i: masked entries are removed with
``masked_fill`` / ``torch.where`` *before* any exp / pow / division, and every division is by a
denominator that has been replaced by 1 where it is 0.
"""

from __future__ import annotations

import torch

from .registry import MethodSpec

__all__ = [
    "admissible_mask",
    "attention_weights",
    "entmax_weights",
    "norm_relu_weights",
    "reference_attention",
    "relumax_weights",
    "softmax_weights",
    "topk_select",
    "topk_softmax_weights",
    "topk_uniform_weights",
]

# Solver iterations for alpha != 2 entmax (done in fp64): bisection brings the bracket (width <= 1)
# to ~2^-16, then Newton from the left end (f is convex and decreasing, so Newton from a point with
# f >= 0 increases monotonically to the root) converges quadratically to fp64 precision.
_BISECT_ITERS = 16
_NEWTON_ITERS = 8


# ------------------------------------------------------------------------------------------------
# the mask


def admissible_mask(
    T: int, shift: int = 1, lengths: torch.Tensor | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean mask of admissible keys, m[b, 0, i, j] = (j <= i - shift) and (j < lengths[b]).

    Args:
        T: sequence length (queries and keys).
        shift: 1 for Memory Mosaics' look-ahead mask (strictly past keys), 0 for causal attention.
        lengths: optional (B,) int tensor of unpadded lengths (right padding).
        device: device of the mask.

    Returns:
        (1, 1, T, T) bool tensor without ``lengths``, else (B, 1, T, T); it broadcasts over heads.
    """
    i = torch.arange(T, device=device)[:, None]  # (T, 1) query index
    j = torch.arange(T, device=device)[None, :]  # (1, T) key index
    mask = (j <= i - shift)[None, None]  # (1, 1, T, T)
    if lengths is not None:
        lengths = lengths.to(device=device, dtype=torch.long)
        mask = mask & (j[None, None] < lengths[:, None, None, None])  # (B, 1, T, T)
    return mask


def _safe_denominator(x: torch.Tensor) -> torch.Tensor:
    """x where x > 0, else 1 (so empty rows divide 0 by 1 and their gradients stay finite)."""
    return torch.where(x > 0, x, torch.ones_like(x))


def _masked_row_max(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max_{j in A_i} s_ij as (..., T, 1); 0 on rows with empty A_i (never -inf)."""
    m = scores.masked_fill(~mask, float("-inf")).amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


# ------------------------------------------------------------------------------------------------
# softmax (Gaussian kernel)


def softmax_weights(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the admissible keys: p_ij = exp(s_ij) / sum_{j' in A_i} exp(s_ij').

    Args:
        scores: (B, H, T, T) float scores s_ij.
        mask: bool, broadcastable to scores; True on admissible (i, j).

    Returns:
        (B, H, T, T) weights; 0 outside the mask, rows with an empty mask are 0.
    """
    m = _masked_row_max(scores, mask).detach()  # (B, H, T, 1); softmax is shift invariant
    e = torch.exp(scores.masked_fill(~mask, float("-inf")) - m)  # exp(-inf) = 0 off the mask
    return e / _safe_denominator(e.sum(dim=-1, keepdim=True))


# ------------------------------------------------------------------------------------------------
# alpha-entmax (compact kernels (1 - u^2)^n_+ with n = 1 / (alpha - 1))


def _sparsemax_solve(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact sort-based sparsemax of the admissible entries: p = [z - tau]_+ with sum p = 1.

    Sort the admissible z_(1) >= z_(2) >= ...; the support size is the largest r with
    1 + r z_(r) > sum_{l <= r} z_(l), and tau = (sum_{l <= r} z_(l) - 1) / r.
    """
    T = z.shape[-1]
    zs = z.masked_fill(~mask, float("-inf"))  # (..., T)
    srt, _ = zs.sort(dim=-1, descending=True)
    csum = srt.cumsum(dim=-1)  # -inf after the admissible entries; never -inf - (-inf)
    r = torch.arange(1, T + 1, device=z.device, dtype=z.dtype)
    in_support = torch.isfinite(srt) & (1 + r * srt > csum)  # a prefix of the sorted row
    size = in_support.sum(dim=-1, keepdim=True)  # (..., 1); 0 on empty rows
    tau = (csum.gather(-1, (size - 1).clamp_min(0)) - 1) / size.clamp_min(1).to(z.dtype)
    tau = torch.where(size > 0, tau, torch.zeros_like(tau))
    p = (zs - tau).clamp_min(0)  # masked: (-inf - tau) -> 0
    return p / _safe_denominator(p.sum(dim=-1, keepdim=True))


def _entmax_bisect_solve(z: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exact alpha-entmax of the admissible entries by bisection then Newton on the threshold.

    p_j = [(alpha - 1) z_j - tau]_+^n with n = 1 / (alpha - 1), and tau the root of the convex,
    decreasing f(tau) = sum_{j in A} p_j(tau) - 1. With m = max (alpha - 1) z_j the root lies in
    [m - 1, m - |A|^(1 - alpha)]. Bisection narrows the bracket, Newton from its left end
    (where f >= 0) converges monotonically; the result is renormalised to sum exactly to 1.
    Use fp64 z for an fp64-exact result.
    """
    n = 1.0 / (alpha - 1.0)
    za = ((alpha - 1.0) * z).masked_fill(~mask, float("-inf"))  # (..., T)
    m = _masked_row_max(za, mask)  # (..., 1)
    count = mask.expand_as(za).sum(dim=-1, keepdim=True).clamp_min(1).to(z.dtype)
    lo, hi = m - 1.0, m - count ** (1.0 - alpha)  # f(lo) >= 0 >= f(hi)

    def excess(tau):  # f(tau) = sum_j [za_j - tau]_+^n - 1
        return (za - tau).clamp_min(0).pow(n).sum(dim=-1, keepdim=True) - 1.0

    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        right = excess(mid) >= 0  # root is at or right of mid
        lo = torch.where(right, mid, lo)
        hi = torch.where(right, hi, mid)
    tau = lo
    for _ in range(_NEWTON_ITERS):
        d = (za - tau).clamp_min(0)  # (..., T)
        f = d.pow(n).sum(dim=-1, keepdim=True) - 1.0
        df = n * torch.where(d > 0, d.pow(n - 1.0), torch.zeros_like(d)).sum(dim=-1, keepdim=True)
        tau = tau + f / _safe_denominator(df)  # tau - f / f'(tau), f' = -df
    p = (za - tau).clamp_min(0).pow(n)
    return p / _safe_denominator(p.sum(dim=-1, keepdim=True))


class _EntmaxFunction(torch.autograd.Function):
    """alpha-entmax over admissible entries with the standard entmax Jacobian in backward.

    With gppr_j = p_j^(2 - alpha) on the support (0 elsewhere, including every masked entry):
        dS = gppr * (dP - sum(gppr * dP) / sum(gppr)).
    """

    @staticmethod
    def forward(ctx, scores, mask, alpha):
        z = scores.double()  # solve in fp64, return the scores' dtype
        mask = mask.expand_as(z)
        p = _sparsemax_solve(z, mask) if alpha == 2.0 else _entmax_bisect_solve(z, mask, alpha)
        p = p.to(scores.dtype)
        ctx.alpha = alpha
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, dp):
        (p,) = ctx.saved_tensors
        gppr = torch.where(p > 0, p.pow(2.0 - ctx.alpha), torch.zeros_like(p))  # (B, H, T, T)
        ds = gppr * dp
        ds = ds - gppr * ds.sum(dim=-1, keepdim=True) / _safe_denominator(gppr.sum(dim=-1, keepdim=True))
        return ds, None, None


def entmax_weights(scores: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha-entmax over the admissible keys, solved exactly.

        p_ij = [(alpha - 1) s_ij - tau_i]_+^(1 / (alpha - 1)),  tau_i such that sum_{j in A_i} p_ij = 1.

    alpha = 2 is sparsemax, p = [s - tau]_+ (exact, sort-based); 1 < alpha < 2 is solved by
    bisection + Newton in fp64 and renormalised. The gradient is the entmax Jacobian (see
    :class:`_EntmaxFunction`); masked entries are never in the support and get zero gradient.

    Args:
        scores: (B, H, T, T) float scores.
        mask: bool, broadcastable to scores.
        alpha: 1 < alpha <= 2.

    Returns:
        (B, H, T, T) weights in the scores' dtype; rows with an empty mask are 0.
    """
    alpha = float(alpha)
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"entmax alpha must satisfy 1 < alpha <= 2, got {alpha}")
    return _EntmaxFunction.apply(scores, mask, alpha)


# ------------------------------------------------------------------------------------------------
# top-K (Gaussian kNN and uniform kNN)


def topk_select(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (B, H, T, T): the min(K, |A_i|) admissible keys with the largest s_ij.

    K is clamped to T; masked keys are never selected. Ties are broken by ``torch.topk``.
    """
    k = min(int(k), scores.shape[-1])
    if k < 1:
        raise ValueError(f"top-K needs K >= 1, got {k}")
    mask = mask.expand_as(scores)
    idx = scores.detach().masked_fill(~mask, float("-inf")).topk(k, dim=-1).indices  # (B, H, T, K)
    chosen = torch.zeros_like(mask).scatter(-1, idx, True)
    return chosen & mask  # drops masked keys picked when |A_i| < K


def topk_softmax_weights(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax over the K largest admissible scores (all of A_i when |A_i| <= K).

        p_ij = exp(s_ij) / sum_{j' in top_K(A_i)} exp(s_ij')  for j in top_K(A_i), else 0.

    The gradient flows through the selected scores only (the selection is piecewise constant).
    """
    return softmax_weights(scores, topk_select(scores, mask, k))


def topk_uniform_weights(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Uniform weights on the K largest admissible scores: p_ij = 1 / min(K, |A_i|) there, else 0.

    The weights are piecewise constant in the scores: the scores get an (exactly) zero gradient.
    """
    chosen = topk_select(scores, mask, k).to(scores.dtype)  # (B, H, T, T)
    p = chosen / _safe_denominator(chosen.sum(dim=-1, keepdim=True))
    # keep the scores in the graph with a zero derivative, so q and k get zero (not None) gradients
    return p + 0.0 * scores.masked_fill(~mask.expand_as(scores), 0.0)


# ------------------------------------------------------------------------------------------------
# Epanechnikov with fixed normalisation, and with max-anchored support


def norm_relu_weights(
    scores: torch.Tensor, mask: torch.Tensor, q_sqnorm: torch.Tensor, k_sqnorm: torch.Tensor
) -> torch.Tensor:
    """Epanechnikov kernel at unit bandwidth, normalised by its sum (fixed normalisation).

        w_ij = relu(1 - |q_i - k_j|^2) = relu(1 - |q_i|^2 - |k_j|^2 + 2 s_ij),   p_ij = w_ij / sum_j' w_ij'

    on j in A_i; when every w_ij of a non-empty row is 0 the row is uniform over A_i.

    Args:
        scores: (B, H, T, T) scores s_ij = q_i . k_j.
        mask: bool, broadcastable to scores.
        q_sqnorm: (B, H, T) |q_i|^2.
        k_sqnorm: (B, H, T) |k_j|^2.
    """
    mask = mask.expand_as(scores)
    w = torch.relu(1.0 - q_sqnorm[..., :, None] - k_sqnorm[..., None, :] + 2.0 * scores)  # (B, H, T, T)
    w = torch.where(mask, w, torch.zeros_like(w))
    total = w.sum(dim=-1, keepdim=True)  # (B, H, T, 1)
    uniform = mask.to(scores.dtype) / mask.sum(dim=-1, keepdim=True).clamp_min(1).to(scores.dtype)
    return torch.where(total > 0, w / _safe_denominator(total), uniform)


def relumax_weights(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Epanechnikov with support anchored at the best admissible key.

        w_ij = relu(1 + s_ij - max_{j' in A_i} s_ij'),   p_ij = w_ij / sum_j' w_ij'   on j in A_i.

    The best key has w = 1, so every non-empty row sums to >= 1 before normalisation.
    """
    mask = mask.expand_as(scores)
    m = _masked_row_max(scores, mask)  # (B, H, T, 1), gradient flows to the arg max
    w = torch.relu(1.0 + scores - m)
    w = torch.where(mask, w, torch.zeros_like(w))
    return w / _safe_denominator(w.sum(dim=-1, keepdim=True))


# ------------------------------------------------------------------------------------------------
# the backend


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64 (for gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, spec: MethodSpec, shift: int = 1, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The (B, H, T, T) weights p_ij of ``spec`` for queries q and keys k, both (B, H, T, D).

    Computed in fp32 (fp64 for fp64 inputs) whatever the input dtype; differentiable in q and k.
    """
    dtype = _compute_dtype(q, k)
    q, k = q.to(dtype), k.to(dtype)
    scores = q @ k.transpose(-2, -1)  # (B, H, T, T)
    mask = admissible_mask(q.shape[-2], shift, lengths, q.device)  # (B or 1, 1, T, T)
    family = spec.family
    if family == "softmax":
        return softmax_weights(scores, mask)
    if family == "entmax":
        return entmax_weights(scores, mask, spec.alpha)
    if family == "topk_softmax":
        return topk_softmax_weights(scores, mask, spec.k)
    if family == "topk_uniform":
        return topk_uniform_weights(scores, mask, spec.k)
    if family == "norm_relu":
        return norm_relu_weights(scores, mask, q.pow(2).sum(-1), k.pow(2).sum(-1))
    if family == "relumax":
        return relumax_weights(scores, mask)
    raise ValueError(f"unknown attention family {family!r} in method {spec.name!r}")


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MethodSpec,
    shift: int = 1,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """y_i = sum_{j in A_i} p_ij v_j on the materialised weights (the oracle).

    Args:
        q, k: (B, H, T, D); v: (B, H, T, Dv).
        spec: the method (see :func:`sparse_mosaics.attention.get_method`).
        shift, lengths: define A_i (see :func:`admissible_mask`).

    Returns:
        (B, H, T, Dv) in v's dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    p = attention_weights(q, k, spec, shift=shift, lengths=lengths)  # (B, H, T, T)
    y = p @ v.to(p.dtype)  # (B, H, T, Dv)
    return y.to(v.dtype)
