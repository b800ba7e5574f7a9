"""Nadaraya–Watson kernel regression: the kernels behind every attention method of the paper.

An attention row is a Nadaraya–Watson (NW) estimate over the stored pairs (k_j, v_j), j in A_i:

    y(q) = sum_j K(||q - k_j|| / h) v_j / sum_j K(||q - k_j|| / h)

with a 1-D kernel profile K(u) and a bandwidth h (a scalar, or one per query). This module gives
the profiles (each normalised to integrate to 1 over its support), an NW estimator that works on
distances, and the bandwidths under which each attention method *is* an NW estimator:

=================  ==========================================  =====================================
kernel name        profile K(u)                                attention method
=================  ==========================================  =====================================
gaussian           exp(-u^2/2) / sqrt(2 pi)                    softmax, h = 1/beta
epanechnikov       3/4 (1-u^2)_+                               sparsemax (adaptive h), norm_relu
                                                               (fixed h), relumax (max-anchored h)
biweight           15/16 (1-u^2)^2_+                           1.5-entmax (adaptive h)
triweight          35/32 (1-u^2)^3_+                           4/3-entmax (adaptive h)
compact_n<n>       c_n (1-u^2)^n_+                             (1+1/n)-entmax (adaptive h)
gaussian_knn       Gaussian restricted to the K nearest keys   top-K softmax
uniform_knn        1/K on the K nearest keys                   top-K uniform
=================  ==========================================  =====================================

with c_n = 1 / int_{-1}^{1} (1-u^2)^n du = Gamma(n + 3/2) / (sqrt(pi) Gamma(n + 1)).

Bandwidths (unit keys q = beta_q q_hat, k_j = beta_k k_hat_j, scores s_ij = B_i cos_ij with
B_i = beta_q,i beta_k, unit-sphere distances d_ij = ||q_hat_i - k_hat_j||, d^2 = 2 - 2 cos):

- softmax: exp(s_ij) = exp(B_i) exp(-B_i d_ij^2 / 2), so h_i^2 = 1 / B_i (h = 1/beta).
- alpha-entmax, n = 1/(alpha-1): (alpha-1) s_ij - tau_i = c_i (1 - d_ij^2 / h_i^2) with
  c_i = (alpha-1) B_i - tau_i > 0 and h_i^2 = 2 (1 - tau_i / ((alpha-1) B_i))
  (:func:`entmax_bandwidth`). The weights are [c_i (1 - u^2)]_+^n: c_i^n cancels, and the entmax
  normalisation sum_j p_ij = 1 says sum_j (1 - u_ij^2)_+^n = c_i^{-n} (adaptive normalisation).
- norm_relu: relu(1 - ||q - k_j||^2) is Epanechnikov at h = 1 in the scaled space (h = 1/beta on
  the unit sphere when beta_q = beta_k = beta), normalised by its sum (fixed normalisation), uniform
  over A_i when no key lies inside the support.
- relumax: relu(1 + s_ij - max_l s_il) = c_i (1 - d_ij^2 / h_i^2) with c_i = 1 + B_i d_i*^2 / 2 and
  h_i^2 = d_i*^2 + 2 / B_i, d_i* the distance to the best (nearest) key (:func:`max_anchored_bandwidth`):
  the support always reaches past the best key.
- top-K softmax / uniform: the Gaussian (h^2 = 1/B) or uniform kernel truncated at the distance of
  the K-th nearest admissible key.

Everything here is plain differentiable PyTorch; the tests run it in float64.
"""

from __future__ import annotations

import math
import re

import torch

from .reference import admissible_mask  # noqa: F401  (A_i; re-exported for the NW views)

KERNEL_NAMES = ("gaussian", "epanechnikov", "biweight", "triweight", "compact_n<n>", "gaussian_knn", "uniform_knn")
_NAMED_COMPACT = {"epanechnikov": 1.0, "biweight": 2.0, "triweight": 3.0}
_COMPACT_RE = re.compile(r"^compact_n(\d+(?:\.\d+)?)$")


# ------------------------------------------------------------------------------------------------
# 1-D kernel profiles (densities in u)


def _as_tensor(u) -> torch.Tensor:
    return u if torch.is_tensor(u) else torch.as_tensor(u, dtype=torch.float64)


def compact_constant(n: float) -> float:
    """c_n such that c_n (1-u^2)^n_+ integrates to 1: c_n = Gamma(n+3/2) / (sqrt(pi) Gamma(n+1)).

    (int_{-1}^{1} (1-u^2)^n du = B(1/2, n+1).) c_1 = 3/4, c_2 = 15/16, c_3 = 35/32.
    """
    if n <= 0:
        raise ValueError(f"compact kernel exponent n must be > 0, got {n!r}")
    return math.exp(math.lgamma(n + 1.5) - math.lgamma(n + 1.0)) / math.sqrt(math.pi)


def gaussian(u):
    """Gaussian kernel K(u) = exp(-u^2/2) / sqrt(2 pi) on the real line."""
    u = _as_tensor(u)
    return torch.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)


def compact(u, n: float):
    """Compact polynomial kernel K_n(u) = c_n (1 - u^2)^n_+ on [-1, 1] (see :func:`compact_constant`)."""
    u = _as_tensor(u)
    return compact_constant(n) * torch.clamp(1.0 - u * u, min=0.0) ** n


def epanechnikov(u):
    """Epanechnikov kernel K(u) = 3/4 (1 - u^2)_+ (n = 1; sparsemax, norm_relu, relumax)."""
    return compact(u, 1.0)


def biweight(u):
    """Biweight kernel K(u) = 15/16 (1 - u^2)^2_+ (n = 2; 1.5-entmax)."""
    return compact(u, 2.0)


def triweight(u):
    """Triweight kernel K(u) = 35/32 (1 - u^2)^3_+ (n = 3; 4/3-entmax)."""
    return compact(u, 3.0)


def truncated_gaussian(u, radius: float = 1.0):
    """Gaussian truncated to |u| <= r: K(u) = exp(-u^2/2) 1[|u| <= r] / (sqrt(2 pi) (2 Phi(r) - 1)).

    The 1-D picture of Gaussian kNN (top-K softmax) when the K-th neighbour sits at u = r.
    2 Phi(r) - 1 = erf(r / sqrt 2).
    """
    u = _as_tensor(u)
    mass = math.erf(radius / math.sqrt(2.0))
    return torch.where(u.abs() <= radius, gaussian(u) / mass, torch.zeros_like(u))


def uniform(u, radius: float = 1.0):
    """Uniform kernel K(u) = 1[|u| <= r] / (2r): the 1-D picture of uniform kNN (top-K uniform)."""
    u = _as_tensor(u)
    return (u.abs() <= radius).to(u.dtype) / (2.0 * radius)


def parse_kernel(name: str) -> tuple[str, float | None]:
    """Kernel name -> (base, n): base in {"gaussian", "compact", "gaussian_knn", "uniform_knn"}.

    Accepts the registry's names ("gaussian", "epanechnikov", "biweight", "triweight",
    "compact_n4", "gaussian_knn", "uniform_knn").
    """
    if name in ("gaussian", "gaussian_knn", "uniform_knn"):
        return name, None
    if name in _NAMED_COMPACT:
        return "compact", _NAMED_COMPACT[name]
    m = _COMPACT_RE.match(name) if isinstance(name, str) else None
    if m:
        return "compact", float(m.group(1))
    raise ValueError(f"unknown kernel {name!r}; valid: {', '.join(KERNEL_NAMES)}")


def kernel_profile(name: str, u, n: float | None = None):
    """The normalised 1-D profile K(u) of a kernel by name (kNN kernels: truncated at |u| = 1).

    ``n`` overrides the exponent of ``"compact"`` (``kernel_profile("compact", u, n=4)``).
    """
    if name == "compact":
        if n is None:
            raise ValueError("kernel 'compact' needs n")
        return compact(u, n)
    base, n_ = parse_kernel(name)
    if base == "gaussian":
        return gaussian(u)
    if base == "compact":
        return compact(u, n_)
    if base == "gaussian_knn":
        return truncated_gaussian(u, 1.0)
    return uniform(u, 1.0)


# ------------------------------------------------------------------------------------------------
# Nadaraya–Watson on distances


def squared_distances(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """||q_i - k_j||^2 for query (..., M, D) and keys (..., N, D) -> (..., M, N) (exact differences)."""
    diff = query.unsqueeze(-2) - keys.unsqueeze(-3)  # (..., M, N, D)
    return (diff * diff).sum(-1)


def knn_mask(d2: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """The K nearest admissible keys of each query: (..., M, N) bool, min(K, |A_i|) True per row.

    Ties are broken by ``torch.topk`` (measure zero for continuous inputs).
    """
    if k is None or int(k) < 1:
        raise ValueError(f"kNN kernels need k >= 1, got k={k!r}")
    kk = min(int(k), d2.shape[-1])
    far = torch.where(mask, d2.detach(), torch.full_like(d2, math.inf))
    idx = torch.topk(far, kk, dim=-1, largest=False).indices  # (..., M, kk)
    sel = torch.zeros_like(mask).scatter(-1, idx, True)
    return sel & mask


def nadaraya_watson_weights(
    query: torch.Tensor,
    keys: torch.Tensor,
    kernel: str,
    bandwidth,
    *,
    k: int | None = None,
    mask: torch.Tensor | None = None,
    fallback: str = "zero",
) -> torch.Tensor:
    """NW weights p_ij = K(u_ij) / sum_{l in S_i} K(u_il), u_ij = ||q_i - k_j|| / h_i, for j in S_i.

    Args:
        query: (..., M, D); keys: (..., N, D).
        kernel: a kernel name (:data:`KERNEL_NAMES`; the registry's ``MethodSpec.kernel`` works).
            Normalising constants cancel, so the unnormalised profiles are used:
            gaussian exp(-u^2/2), compact (1-u^2)^n_+, uniform 1.
        bandwidth: h > 0, a float or a tensor broadcastable to (..., M) (one per query).
        k: K for "gaussian_knn" / "uniform_knn": S_i is the K nearest admissible keys of q_i
            (all of A_i when |A_i| <= K); otherwise S_i = A_i. For uniform_knn the bandwidth is unused.
        mask: (..., M, N) bool admissible keys A_i (None: all keys).
        fallback: what a row with admissible keys but sum_j K(u_ij) = 0 (no key inside a compact
            support) returns: "zero" or "uniform" (1/|A_i| on A_i, norm_relu's rule).

    Returns:
        (..., M, N) weights in the query dtype; rows with empty A_i are 0.
    """
    if fallback not in ("zero", "uniform"):
        raise ValueError(f"fallback must be 'zero' or 'uniform', got {fallback!r}")
    base, n = parse_kernel(kernel)
    d2 = squared_distances(query, keys)  # (..., M, N)
    if mask is None:
        mask = torch.ones(d2.shape, dtype=torch.bool, device=d2.device)
    mask = mask.expand(d2.shape)
    h = torch.as_tensor(bandwidth, dtype=d2.dtype, device=d2.device)
    if h.dim() > 0:
        h = h.unsqueeze(-1)  # (..., M, 1): one bandwidth per query
    u2 = d2 / (h * h)  # (..., M, N)

    sel = mask
    if base in ("gaussian_knn", "uniform_knn"):
        sel = knn_mask(d2, mask, k)
    elif k is not None:
        raise ValueError(f"k is only meaningful for the kNN kernels, not {kernel!r}")

    if base in ("gaussian", "gaussian_knn"):
        logits = torch.where(sel, -0.5 * u2, torch.full_like(u2, -math.inf))
        top = logits.amax(-1, keepdim=True).detach()
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = torch.exp(logits - top)  # largest weight 1: stable for any bandwidth
    elif base == "compact":
        u2 = torch.where(sel, u2, torch.ones_like(u2))  # off-support entries: finite, zero weight
        w = torch.where(sel, torch.clamp(1.0 - u2, min=0.0) ** n, torch.zeros_like(u2))
    else:  # uniform_knn
        w = sel.to(d2.dtype)

    denom = w.sum(-1, keepdim=True)  # (..., M, 1)
    p = w / torch.where(denom > 0, denom, torch.ones_like(denom))
    if fallback == "uniform":
        count = mask.sum(-1, keepdim=True)
        uniform_w = mask.to(d2.dtype) / count.clamp(min=1).to(d2.dtype)
        p = torch.where(denom > 0, p, uniform_w)
    return p


def nadaraya_watson(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    kernel: str,
    bandwidth,
    *,
    k: int | None = None,
    mask: torch.Tensor | None = None,
    fallback: str = "zero",
) -> torch.Tensor:
    """NW estimate y_i = sum_j K(||q_i-k_j||/h_i) v_j / sum_j K(||q_i-k_j||/h_i).

    query (..., M, D), keys (..., N, D), values (..., N, Dv) -> (..., M, Dv). The arguments are those
    of :func:`nadaraya_watson_weights` (kNN estimators: ``kernel="gaussian_knn", k=K``).
    """
    p = nadaraya_watson_weights(query, keys, kernel, bandwidth, k=k, mask=mask, fallback=fallback)
    return p @ values


# ------------------------------------------------------------------------------------------------
# Bandwidths under which attention methods are NW estimators


def entmax_threshold(scores: torch.Tensor, alpha: float, mask: torch.Tensor | None = None, n_iter: int = 80):
    """tau_i with sum_j [(alpha-1) s_ij - tau_i]_+^{1/(alpha-1)} = 1 over admissible j. (..., M, N) -> (..., M).

    Bisection on [m - 1, m - |A_i|^{1-alpha}] (m = max_j (alpha-1) s_ij) to machine precision, then
    one Newton step taken with autograd on: at the root it carries the implicit-function gradient
    d tau / d s = -(df/ds) / (df/dtau), so tau is differentiable. Rows with empty A_i give 0.
    """
    if not alpha > 1.0:
        raise ValueError(f"entmax needs alpha > 1, got {alpha!r}")
    a = alpha - 1.0
    if mask is None:
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    mask = mask.expand(scores.shape)
    z = a * scores  # (..., M, N)
    count = mask.sum(-1).clamp(min=1).to(scores.dtype)
    neg = torch.full_like(z, -math.inf)

    def f(tau, zz):  # sum of weights - 1 and its tau-derivative
        g = torch.clamp(torch.where(mask, zz, neg) - tau.unsqueeze(-1), min=0.0)
        return (g ** (1.0 / a)).sum(-1) - 1.0, -(g ** (1.0 / a - 1.0) * (g > 0)).sum(-1) / a

    with torch.no_grad():
        zd = z.detach()
        m = torch.where(mask, zd, neg).amax(-1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        lo, hi = m - 1.0, m - count ** (-a)
        for _ in range(n_iter):
            mid = 0.5 * (lo + hi)
            over = f(mid, zd)[0] > 0  # too much mass: raise tau
            lo = torch.where(over, mid, lo)
            hi = torch.where(over, hi, mid)
        tau0 = 0.5 * (lo + hi)
    val, der = f(tau0, z)
    der = torch.where(der != 0, der, -torch.ones_like(der))
    tau = tau0 - val / der
    return torch.where(mask.any(-1), tau, torch.zeros_like(tau))


def entmax(scores: torch.Tensor, alpha: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """alpha-entmax p_ij = [(alpha-1) s_ij - tau_i]_+^{1/(alpha-1)} on admissible j (differentiable).

    Rows with empty A_i are 0. alpha = 2 is sparsemax; alpha -> 1 tends to softmax.
    """
    if mask is None:
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    mask = mask.expand(scores.shape)
    tau = entmax_threshold(scores, alpha, mask)
    g = torch.clamp((alpha - 1.0) * scores - tau.unsqueeze(-1), min=0.0)
    return torch.where(mask, g ** (1.0 / (alpha - 1.0)), torch.zeros_like(g))


def entmax_bandwidth(tau, alpha: float, scale):
    """Unit-sphere bandwidth of alpha-entmax as an NW estimator with the kernel (1-u^2)^n_+, n = 1/(alpha-1).

    With s_ij = B_i cos_ij = B_i (1 - d_ij^2/2) (B_i = ``scale``: beta^2 for q = beta q_hat,
    k = beta k_hat, the score a key at distance 0 would get):

        (alpha-1) s_ij - tau_i = c_i (1 - d_ij^2 / h_i^2),   c_i = (alpha-1) B_i - tau_i,
        h_i^2 = 2 c_i / ((alpha-1) B_i) = 2 (1 - tau_i / ((alpha-1) B_i)).

    c_i > 0 always: the best key has (alpha-1) s - tau > 0 and s <= B_i. In the scaled space
    (distances ||q - k_j|| = beta d_ij) the bandwidth is beta h_i, H_i^2 = 2 (beta^2 - tau_i/(alpha-1)).
    """
    tau = torch.as_tensor(tau)
    scale = torch.as_tensor(scale, dtype=tau.dtype, device=tau.device)
    return torch.sqrt(2.0 * (1.0 - tau / ((alpha - 1.0) * scale)))


def max_anchored_bandwidth(d2_best, scale):
    """Unit-sphere bandwidth of relumax as an Epanechnikov NW estimator: h_i^2 = d_i*^2 + 2 / B_i.

    relu(1 + s_ij - max_l s_il) with s = B cos = B (1 - d^2/2) is relu(1 - B (d_ij^2 - d_i*^2)/2)
    = c_i (1 - d_ij^2/h_i^2)_+ with c_i = 1 + B_i d_i*^2 / 2: an Epanechnikov kernel whose support
    is anchored at the best key (d_i* = distance to the nearest admissible key, always inside).
    """
    d2_best = torch.as_tensor(d2_best)
    scale = torch.as_tensor(scale, dtype=d2_best.dtype, device=d2_best.device)
    return torch.sqrt(d2_best + 2.0 / scale)


def attention_as_regression(
    method,
    q_hat: torch.Tensor,
    k_hat: torch.Tensor,
    values: torch.Tensor,
    q_scale,
    k_scale: float,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The NW estimate that attention ``method`` computes on q = q_scale q_hat, k = k_scale k_hat.

    q_hat (..., M, D) and k_hat (..., N, D) are unit vectors; ``q_scale`` a float or (..., M) tensor,
    ``k_scale`` a float; B_i = q_scale_i k_scale. Each method becomes an NW estimator on the unit
    sphere (see the module docstring) except norm_relu, which is Epanechnikov at h = 1 on the scaled
    vectors. ``method``: a name or a registry ``MethodSpec``. Returns (..., M, Dv).
    """
    from .registry import MethodSpec, get_method

    spec = method if isinstance(method, MethodSpec) else get_method(method)
    if mask is None:
        mask = torch.ones(q_hat.shape[:-1] + k_hat.shape[-2:-1], dtype=torch.bool, device=q_hat.device)
    qs = torch.as_tensor(q_scale, dtype=q_hat.dtype, device=q_hat.device)
    scale = qs * k_scale  # B_i: scalar or (..., M)
    if spec.family == "norm_relu":
        q = q_hat * (qs.unsqueeze(-1) if qs.dim() > 0 else qs)
        return nadaraya_watson(q, k_hat * k_scale, values, "epanechnikov", 1.0, mask=mask, fallback="uniform")
    if spec.family in ("softmax", "topk_softmax"):
        h = torch.rsqrt(scale)
        kernel = "gaussian" if spec.family == "softmax" else "gaussian_knn"
        return nadaraya_watson(q_hat, k_hat, values, kernel, h, k=spec.k, mask=mask)
    if spec.family == "topk_uniform":
        return nadaraya_watson(q_hat, k_hat, values, "uniform_knn", 1.0, k=spec.k, mask=mask)
    if spec.family == "entmax":
        cos = q_hat @ k_hat.transpose(-1, -2)  # (..., M, N)
        b = scale.unsqueeze(-1) if scale.dim() > 0 else scale
        tau = entmax_threshold(b * cos, spec.alpha, mask)
        h = entmax_bandwidth(tau, spec.alpha, scale)
        kernel = f"compact_n{spec.kernel_exponent:.12g}"
        return nadaraya_watson(q_hat, k_hat, values, kernel, h, mask=mask)
    if spec.family == "relumax":
        d2 = squared_distances(q_hat, k_hat)
        d2_best = torch.where(mask, d2, torch.full_like(d2, math.inf)).amin(-1)
        d2_best = torch.where(torch.isfinite(d2_best), d2_best, torch.zeros_like(d2_best))
        h = max_anchored_bandwidth(d2_best, scale)
        return nadaraya_watson(q_hat, k_hat, values, "epanechnikov", h, mask=mask)
    raise ValueError(f"no kernel-regression view for method family {spec.family!r}")
