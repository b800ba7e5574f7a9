"""Sparse attention is Nadaraya–Watson regression with compact kernels: property tests.

Every test draws fresh random inputs from a generator with a fixed seed per test, over many sizes,
in float64, and compares the library's reference backend (``kernel_attention(...,
backend="reference")``, which computes in fp64 for fp64 inputs) with the Nadaraya–Watson (NW)
estimators of :mod:`sparse_mosaics.attention.kernels`. Attention weights are read off the library
by passing one-hot values v = I (then y = p).

Notation: unit vectors q_hat_i, k_hat_j; q_i = beta_i q_hat_i, k_j = gamma k_hat_j; scores
s_ij = q_i . k_j = B_i cos_ij with B_i = beta_i gamma; unit-sphere distances
d_ij^2 = ||q_hat_i - k_hat_j||^2 = 2 - 2 cos_ij; u_ij = d_ij / h_i.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparse_mosaics.attention import PAPER_METHODS, get_method, kernel_attention
from sparse_mosaics.attention import kernels as K
from sparse_mosaics.attention.registry import MethodSpec

DT = torch.float64
ATOL = 1e-10  # float64 identities (the reference solves entmax to fp64 precision)

# (B, H, T, D, with_lengths): tiny to moderate, odd sizes, with and without right padding
SIZES = [
    (1, 1, 2, 2, False),
    (2, 3, 7, 3, True),
    (3, 2, 16, 8, False),
    (1, 2, 33, 4, True),
    (2, 1, 64, 16, True),
]
SIZE_IDS = [f"B{b}H{h}T{t}D{d}{'-len' if l else ''}" for b, h, t, d, l in SIZES]

ENTMAX_BY_N = {1: "epanechnikov", 2: "biweight", 3: "triweight", 4: "entmax_1.25"}


# ------------------------------------------------------------------------------------------------
# helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(g, *shape) -> torch.Tensor:
    x = torch.randn(*shape, generator=g, dtype=DT)
    return x / x.norm(dim=-1, keepdim=True)


def lengths_for(g, B, T, with_lengths):
    if not with_lengths:
        return None
    return torch.randint(1, T + 1, (B,), generator=g)


def lib_weights(q, k, method, shift=1, lengths=None):
    """(B, H, T, T) weights of the library: kernel_attention with one-hot values v = I gives y = p."""
    B, H, T, _ = q.shape
    eye = torch.eye(T, dtype=q.dtype).expand(B, H, T, T)
    return kernel_attention(q, k, eye, method, shift=shift, lengths=lengths, backend="reference")


def scaled_inputs(g, B, H, T, D, per_query=True):
    """Unit q_hat, k_hat; per-query query scales beta (B, H, T) and a key scale gamma."""
    q_hat, k_hat = unit(g, B, H, T, D), unit(g, B, H, T, D)
    beta = 0.6 + 1.6 * torch.rand(B, H, T, generator=g, dtype=DT) if per_query else torch.full((B, H, T), 1.7, dtype=DT)
    gamma = 1.3
    return q_hat, k_hat, beta, gamma


def nonempty(mask, shape):
    return mask.expand(shape).any(-1)  # (B, H, T) rows with A_i non-empty


# ------------------------------------------------------------------------------------------------
# the kernels themselves


@pytest.mark.parametrize("name,const", [("epanechnikov", 3 / 4), ("biweight", 15 / 16), ("triweight", 35 / 32)])
def test_compact_constants(name, const):
    """c_n = Gamma(n+3/2)/(sqrt(pi) Gamma(n+1)): c_1 = 3/4, c_2 = 15/16, c_3 = 35/32, c_4 = 315/256."""
    _, n = K.parse_kernel(name)
    assert K.compact_constant(n) == pytest.approx(const, rel=1e-14)
    assert K.compact_constant(4) == pytest.approx(315 / 256, rel=1e-14)
    assert float(K.kernel_profile(name, torch.tensor(0.0, dtype=DT))) == pytest.approx(const, rel=1e-14)


@pytest.mark.parametrize(
    "name",
    ["gaussian", "epanechnikov", "biweight", "triweight", "compact_n4", "compact_n2.5", "gaussian_knn", "uniform_knn"],
)
def test_profiles_integrate_to_one(name):
    """int K(u) du = 1 over the support, K >= 0, K even, and compact kernels vanish for |u| >= 1."""
    u = torch.linspace(-6, 6, 60001, dtype=DT)
    ku = K.kernel_profile(name, u)
    assert torch.all(ku >= 0)
    assert torch.allclose(ku, K.kernel_profile(name, -u), atol=0, rtol=1e-15)
    assert float(torch.trapezoid(ku, u)) == pytest.approx(1.0, abs=4e-4 if "knn" in name else 5e-8)
    if name != "gaussian":
        assert torch.all(ku[u.abs() > 1.0] == 0)


# ------------------------------------------------------------------------------------------------
# softmax = Gaussian NW


@pytest.mark.parametrize("B,H,T,D,with_len", SIZES, ids=SIZE_IDS)
def test_softmax_is_gaussian_nw(B, H, T, D, with_len):
    """softmax(s)_ij = K_G(d_ij/h_i) / sum_l K_G(d_il/h_i), K_G(u) = exp(-u^2/2), h_i = 1/sqrt(B_i).

    exp(s_ij) = exp(B_i cos_ij) = exp(B_i) exp(-B_i d_ij^2/2): with beta_i = gamma = beta this is
    the Gaussian kernel of bandwidth 1/beta on the unit keys. Checked with a per-query bandwidth
    tensor, and with the common-scale case h = 1/beta (a scalar bandwidth).
    """
    g = gen(101 + T)
    q_hat, k_hat, beta, gamma = scaled_inputs(g, B, H, T, D)
    lengths = lengths_for(g, B, T, with_len)
    mask = K.admissible_mask(T, 1, lengths)
    p_lib = lib_weights(beta[..., None] * q_hat, gamma * k_hat, "softmax", lengths=lengths)
    p_nw = K.nadaraya_watson_weights(q_hat, k_hat, "gaussian", 1.0 / torch.sqrt(beta * gamma), mask=mask)
    torch.testing.assert_close(p_lib, p_nw, atol=ATOL, rtol=0)

    b = 2.1  # q = b q_hat, k = b k_hat: h = 1/b
    p_lib = lib_weights(b * q_hat, b * k_hat, "softmax", lengths=lengths)
    p_nw = K.nadaraya_watson(q_hat, k_hat, torch.eye(T, dtype=DT), "gaussian", 1.0 / b, mask=mask)
    torch.testing.assert_close(p_lib, p_nw, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# norm_relu = Epanechnikov NW, fixed bandwidth


@pytest.mark.parametrize("B,H,T,D,with_len", SIZES, ids=SIZE_IDS)
def test_norm_relu_is_fixed_bandwidth_epanechnikov(B, H, T, D, with_len):
    """norm_relu p_ij = (1 - ||q_i - k_j||^2/h^2)_+ / sum_l (1 - ||q_i - k_l||^2/h^2)_+ with h = 1.

    Fixed normalisation (the bandwidth does not depend on the query), on arbitrary vectors in the
    scaled space; on unit keys with q = beta q_hat, k = beta k_hat it is Epanechnikov at h = 1/beta.
    Rows with no key inside the support are uniform over A_i.
    """
    g = gen(202 + T)
    lengths = lengths_for(g, B, T, with_len)
    mask = K.admissible_mask(T, 1, lengths)
    q = 0.45 * torch.randn(B, H, T, D, generator=g, dtype=DT)
    k = 0.45 * torch.randn(B, H, T, D, generator=g, dtype=DT)
    p_lib = lib_weights(q, k, "norm_relu", lengths=lengths)
    p_nw = K.nadaraya_watson_weights(q, k, "epanechnikov", 1.0, mask=mask, fallback="uniform")
    torch.testing.assert_close(p_lib, p_nw, atol=ATOL, rtol=0)

    q_hat, k_hat = unit(g, B, H, T, D), unit(g, B, H, T, D)
    b = 1.1
    p_lib = lib_weights(b * q_hat, b * k_hat, "norm_relu", lengths=lengths)
    p_nw = K.nadaraya_watson_weights(q_hat, k_hat, "epanechnikov", 1.0 / b, mask=mask, fallback="uniform")
    torch.testing.assert_close(p_lib, p_nw, atol=ATOL, rtol=0)


def test_norm_relu_uniform_fallback():
    """A row whose admissible keys all lie outside the support (||q_i - k_j|| >= h) gets p_ij = 1/|A_i|.

    Keys on a sphere of radius beta = 3 (support: unit distance < 1/3) are mostly far from each
    query; one query per batch duplicates a past key so some rows keep a proper kernel row.
    """
    g = gen(303)
    B, H, T, D = 3, 2, 24, 6
    q_hat, k_hat = unit(g, B, H, T, D), unit(g, B, H, T, D)
    q_hat[:, :, 10] = k_hat[:, :, 4]  # query 10 sits on key 4: inside the support
    b = 3.0
    mask = K.admissible_mask(T, 1)
    p_lib = lib_weights(b * q_hat, b * k_hat, "norm_relu")
    inside = (K.squared_distances(b * q_hat, b * k_hat) < 1.0) & mask  # (B, H, T, T)
    fallback_rows = ~inside.any(-1) & nonempty(mask, inside.shape)  # (B, H, T)
    assert fallback_rows.sum() > B * H * (T - 3) and (~fallback_rows[:, :, 10]).all()
    uniform = mask.expand_as(p_lib).to(DT) / mask.expand_as(p_lib).sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(p_lib[fallback_rows], uniform[fallback_rows], atol=ATOL, rtol=0)
    torch.testing.assert_close(p_lib[:, :, 10, 4], torch.ones(B, H, dtype=DT), atol=1e-12, rtol=0)
    p_nw = K.nadaraya_watson_weights(q_hat, k_hat, "epanechnikov", 1.0 / b, mask=mask, fallback="uniform")
    torch.testing.assert_close(p_lib, p_nw, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# alpha-entmax = (1 - u^2)^n_+ NW, adaptive bandwidth


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("B,H,T,D,with_len", SIZES, ids=SIZE_IDS)
def test_entmax_is_compact_kernel_nw(n, B, H, T, D, with_len):
    """alpha-entmax with alpha = 1 + 1/n is NW with K_n(u) = (1 - u^2)^n_+ at an adaptive bandwidth.

    entmax_alpha(s)_ij = [(alpha-1) s_ij - tau_i]_+^n and s_ij = B_i (1 - d_ij^2/2), so
        (alpha-1) s_ij - tau_i = c_i (1 - d_ij^2 / h_i^2),
        c_i = (alpha-1) B_i - tau_i > 0,   h_i^2 = 2 (1 - tau_i / ((alpha-1) B_i)).
    Checked: (a) p_ij = c_i^n (1 - u_ij^2)_+^n elementwise (weights), (b) p_ij > 0 exactly where
    u_ij < 1 (support), (c) sum_j (1 - u_ij^2)_+^n = c_i^{-n} (the adaptive normalisation), and
    (d) p equals the NW weights K_n(u_ij)/sum_l K_n(u_il). tau_i is this module's own fp64 solve of
    sum_j [(alpha-1) s_ij - tau_i]_+^n = 1 with alpha = 1 + 1/n (not the registry's alpha).
    Sparsemax (method "epanechnikov") is n = 1.
    """
    alpha = 1.0 + 1.0 / n
    g = gen(404 + 10 * n + T)
    q_hat, k_hat, beta, gamma = scaled_inputs(g, B, H, T, D)
    lengths = lengths_for(g, B, T, with_len)
    mask = K.admissible_mask(T, 1, lengths)
    rows = nonempty(mask, (B, H, T, T))
    scale = beta * gamma  # (B, H, T) = B_i
    p_lib = lib_weights(beta[..., None] * q_hat, gamma * k_hat, ENTMAX_BY_N[n], lengths=lengths)

    tau = K.entmax_threshold(scale[..., None] * (q_hat @ k_hat.transpose(-1, -2)), alpha, mask)  # (B, H, T)
    c = (alpha - 1.0) * scale - tau
    assert torch.all(c[rows] > 0)
    h = K.entmax_bandwidth(tau, alpha, scale)  # (B, H, T)
    u2 = K.squared_distances(q_hat, k_hat) / h[..., None] ** 2  # (B, H, T, T)
    kern = torch.where(mask, torch.clamp(1.0 - u2, min=0.0) ** n, torch.zeros_like(u2))

    torch.testing.assert_close(p_lib, c[..., None] ** n * kern, atol=ATOL, rtol=0)  # (a)
    clear = (u2 - 1.0).abs() > 1e-6  # keys not on the support boundary
    assert torch.equal((p_lib > 0)[clear], ((u2 < 1.0) & mask.expand_as(u2))[clear])  # (b)
    torch.testing.assert_close(kern.sum(-1)[rows], c[rows] ** (-n), atol=0, rtol=1e-9)  # (c)
    p_nw = K.nadaraya_watson_weights(q_hat, k_hat, get_method(ENTMAX_BY_N[n]).kernel, h, mask=mask)
    torch.testing.assert_close(p_lib, p_nw, atol=ATOL, rtol=0)  # (d)
    assert get_method(ENTMAX_BY_N[n]).kernel == ("epanechnikov", "biweight", "triweight", "compact_n4")[n - 1]


def test_entmax_converges_to_softmax():
    """max_ij |entmax_alpha(s)_ij - softmax(s)_ij| decreases monotonically to 0 as alpha -> 1.

    [(alpha-1)(s_j - tau')]^{1/(alpha-1)} -> exp(s_j - tau'') as alpha -> 1. Sequence
    alpha = 1 + 1/n, n = 1, 2, 3, 4, 8, 16, 32, 64, 128, on several score scales; the error at
    n = 128 must be below 2% of the sparsemax error (it is O(alpha - 1)).
    """
    g = gen(505)
    ns = [1, 2, 3, 4, 8, 16, 32, 64, 128]
    for B, H, T, D, with_len in SIZES[1:]:
        for b in (0.7, 1.5, 2.5):
            q_hat, k_hat = unit(g, B, H, T, D), unit(g, B, H, T, D)
            lengths = lengths_for(g, B, T, with_len)
            q, k = b * q_hat, b * k_hat
            soft = lib_weights(q, k, "softmax", lengths=lengths)
            errs = [
                (lib_weights(q, k, f"entmax_{1.0 + 1.0 / n!r}", lengths=lengths) - soft).abs().max().item() for n in ns
            ]
            assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), (B, H, T, D, b, errs)
            assert errs[-1] < 0.02 * errs[0], errs


# ------------------------------------------------------------------------------------------------
# top-K = kNN estimators


@pytest.mark.parametrize("kk", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("B,H,T,D,with_len", SIZES, ids=SIZE_IDS)
def test_topk_softmax_is_gaussian_knn(kk, B, H, T, D, with_len):
    """topK_softmax p_ij = exp(-u_ij^2/2) 1[j in N_K(i)] / sum_{l in N_K(i)} exp(-u_il^2/2), h_i = 1/sqrt(B_i).

    N_K(i) = the K nearest admissible keys of q_hat_i (largest cos = largest score), all of A_i
    when |A_i| <= K: a Gaussian kernel truncated at the K-th neighbour's distance (Gaussian kNN).
    """
    g = gen(606 + kk + T)
    q_hat, k_hat, beta, gamma = scaled_inputs(g, B, H, T, D)
    lengths = lengths_for(g, B, T, with_len)
    mask = K.admissible_mask(T, 1, lengths)
    p_lib = lib_weights(beta[..., None] * q_hat, gamma * k_hat, f"top{kk}_softmax", lengths=lengths)
    h = 1.0 / torch.sqrt(beta * gamma)
    p_nw = K.nadaraya_watson_weights(q_hat, k_hat, "gaussian_knn", h, k=kk, mask=mask)
    torch.testing.assert_close(p_lib, p_nw, atol=ATOL, rtol=0)
    support = (p_lib > 0).sum(-1)
    torch.testing.assert_close(support, mask.expand_as(p_lib).sum(-1).clamp(max=kk))
    if kk >= T:  # K >= |A_i| for every row: top-K softmax is softmax
        p_soft = K.nadaraya_watson_weights(q_hat, k_hat, "gaussian", h, mask=mask)
        torch.testing.assert_close(p_lib, p_soft, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kk", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("B,H,T,D,with_len", SIZES, ids=SIZE_IDS)
def test_topk_uniform_is_uniform_knn(kk, B, H, T, D, with_len):
    """topK_uniform p_ij = 1[j in N_K(i)] / min(K, |A_i|): the uniform kNN estimator."""
    g = gen(707 + kk + T)
    q_hat, k_hat, beta, gamma = scaled_inputs(g, B, H, T, D)
    lengths = lengths_for(g, B, T, with_len)
    mask = K.admissible_mask(T, 1, lengths)
    p_lib = lib_weights(beta[..., None] * q_hat, gamma * k_hat, f"top{kk}_uniform", lengths=lengths)
    p_nw = K.nadaraya_watson_weights(q_hat, k_hat, "uniform_knn", 1.0, k=kk, mask=mask)
    torch.testing.assert_close(p_lib, p_nw, atol=ATOL, rtol=0)
    m = mask.expand_as(p_lib).sum(-1, keepdim=True).clamp(max=kk).to(DT)
    assert torch.all((p_lib == 0) | ((p_lib - 1.0 / m).abs() < 1e-15))


# ------------------------------------------------------------------------------------------------
# relumax = Epanechnikov anchored at the best key


@pytest.mark.parametrize("B,H,T,D,with_len", SIZES, ids=SIZE_IDS)
def test_relumax_is_max_anchored_epanechnikov(B, H, T, D, with_len):
    """relumax relu(1 + s_ij - max_l s_il) = c_i (1 - d_ij^2/h_i^2)_+: Epanechnikov with h_i^2 = d_i*^2 + 2/B_i.

    s = B_i (1 - d^2/2) gives 1 + s_ij - s_i* = 1 - B_i (d_ij^2 - d_i*^2)/2, with d_i* the
    distance to the best key; c_i = 1 + B_i d_i*^2 / 2. The support is anchored at the best key:
    u_i* = d_i*/h_i < 1 always, so the best key has the largest weight and no row falls back.
    """
    g = gen(808 + T)
    q_hat, k_hat, beta, gamma = scaled_inputs(g, B, H, T, D)
    beta = beta * 2.0  # narrower supports: more keys outside
    lengths = lengths_for(g, B, T, with_len)
    mask = K.admissible_mask(T, 1, lengths)
    rows = nonempty(mask, (B, H, T, T))
    scale = beta * gamma
    p_lib = lib_weights(beta[..., None] * q_hat, gamma * k_hat, "relumax", lengths=lengths)

    d2 = K.squared_distances(q_hat, k_hat)  # (B, H, T, T)
    d2_best = torch.where(mask, d2, torch.full_like(d2, math.inf)).amin(-1)
    d2_best = torch.where(rows, d2_best, torch.zeros_like(d2_best))
    h = K.max_anchored_bandwidth(d2_best, scale)
    assert torch.all((d2_best / h**2)[rows] < 1.0)
    c = 1.0 + scale * d2_best / 2.0
    s = scale[..., None] * (q_hat @ k_hat.transpose(-1, -2))
    s_best = torch.where(mask, s, torch.full_like(s, -math.inf)).amax(-1, keepdim=True)
    unnorm = torch.where(mask, torch.relu(1.0 + s - s_best), torch.zeros_like(s))
    kern = torch.where(mask, torch.clamp(1.0 - d2 / h[..., None] ** 2, min=0.0), torch.zeros_like(d2))
    torch.testing.assert_close(unnorm, c[..., None] * kern, atol=1e-12, rtol=0)
    p_nw = K.nadaraya_watson_weights(q_hat, k_hat, "epanechnikov", h, mask=mask)
    torch.testing.assert_close(p_lib, p_nw, atol=ATOL, rtol=0)
    best = torch.where(mask, d2, torch.full_like(d2, math.inf)).argmin(-1, keepdim=True)
    assert torch.equal(p_lib.gather(-1, best)[rows], p_lib.amax(-1, keepdim=True)[rows])
    if T > 8:  # non-trivial rows exist: keys strictly inside and outside the support
        assert ((p_lib > 0) & (p_lib < p_lib.amax(-1, keepdim=True))).any()
        assert ((p_lib == 0) & mask).any()


# ------------------------------------------------------------------------------------------------
# probability distributions over A_i; nested entmax supports

ALL_METHODS = list(PAPER_METHODS) + ["top2_softmax", "top2_uniform", "entmax_1.25", "top1_softmax"]


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("shift", [0, 1])
def test_weights_are_distributions_over_admissible_keys(method, shift):
    """p_ij >= 0, p_ij = 0 exactly for j not in A_i, sum_j p_ij = 1 if A_i != {} else every p_ij = 0.

    A_i = {j : j <= i - shift, j < lengths[b]}; general (not unit) q and k at several scales.
    """
    g = gen(909 + shift + 31 * ALL_METHODS.index(method))
    for B, H, T, D, _ in SIZES:
        for scale in (0.4, 2.5):
            q = scale * torch.randn(B, H, T, D, generator=g, dtype=DT)
            k = scale * torch.randn(B, H, T, D, generator=g, dtype=DT)
            lengths = torch.randint(0, T + 1, (B,), generator=g)
            mask = K.admissible_mask(T, shift, lengths).expand(B, H, T, T)
            p = lib_weights(q, k, method, shift=shift, lengths=lengths)
            assert torch.all(p >= 0)
            assert torch.all(p[~mask] == 0)
            rows = mask.any(-1)
            torch.testing.assert_close(p.sum(-1)[rows], torch.ones(int(rows.sum()), dtype=DT), atol=1e-12, rtol=0)
            assert torch.all(p[~rows] == 0)


def test_entmax_support_nested_in_alpha():
    """supp entmax_2(s) ⊆ supp entmax_1.5(s) ⊆ supp entmax_4/3(s) ⊆ supp entmax_1.25(s) on the same scores.

    Proof: with F_a(t) = sum_j [a (s_j - t)]_+^{1/a} (a = alpha - 1), key j is in the support iff
    F_a(s_j) < 1. Each term f(a) = (a x)^{1/a}, x = s_l - s_j > 0, has d log f/da = (1 - log(a x))/a^2,
    positive while a x < e; and F_a(s_j) < 1 forces a x < 1 for every term. So F_a(s_j) is
    increasing in a there: F_big(s_j) < 1 implies F_small(s_j) < 1. Checked on the library and on
    this module's fp64 entmax, on random and adversarial scores (a leader far above a crowd, near-ties).
    """
    g = gen(1010)
    alphas = ["epanechnikov", "biweight", "triweight", "entmax_1.25"]
    checked = 0
    for B, H, T, D, with_len in SIZES:
        for b in (0.5, 1.0, 2.0, 4.0, 8.0):
            q = b * torch.randn(B, H, T, D, generator=g, dtype=DT)
            k = b * torch.randn(B, H, T, D, generator=g, dtype=DT)
            if T > 4:
                k[:, :, 0] *= 4.0  # a leader key
                k[:, :, 1:3] = k[:, :, 3:4] + 1e-7 * torch.randn(B, H, 2, D, generator=g, dtype=DT)  # near-ties
            lengths = lengths_for(g, B, T, with_len)
            sup = [lib_weights(q, k, a, lengths=lengths) > 0 for a in alphas]
            for big, small in zip(sup, sup[1:]):
                assert not (big & ~small).any(), "entmax support not nested in alpha"
            mask = K.admissible_mask(T, 1, lengths)
            s = q @ k.transpose(-1, -2)
            own = [K.entmax(s, get_method(a).alpha, mask) > 0 for a in alphas]
            for big, small in zip(own, own[1:]):
                assert not (big & ~small).any()
            assert torch.equal(own[0], sup[0])
            checked += int(sup[0].sum())
    # the inclusions are strict somewhere (the test is not vacuous)
    assert checked > 0


# ------------------------------------------------------------------------------------------------
# gradients


GRAD_METHODS = list(PAPER_METHODS) + ["top2_softmax", "top2_uniform", "entmax_1.25"]


@pytest.mark.parametrize("method", GRAD_METHODS)
def test_gradcheck_reference_backend(method):
    """torch.autograd.gradcheck (float64) of kernel_attention(backend="reference") in q, k, v.

    Top-K uniform's weights are piecewise constant in the scores: its q/k gradients must be exactly
    zero and only v is gradchecked.
    """
    g = gen(1111 + GRAD_METHODS.index(method))
    B, H, T, D = 1, 2, 6, 3
    spec = get_method(method)
    q = (0.8 * torch.randn(B, H, T, D, generator=g, dtype=DT)).requires_grad_()
    k = (0.8 * torch.randn(B, H, T, D, generator=g, dtype=DT)).requires_grad_()
    v = torch.randn(B, H, T, 2, generator=g, dtype=DT).requires_grad_()
    lengths = torch.tensor([5])

    def f(q, k, v):
        return kernel_attention(q, k, v, method, shift=1, lengths=lengths, backend="reference")

    if spec.differentiable_scores:
        assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)
    else:
        assert torch.autograd.gradcheck(lambda v: f(q.detach(), k.detach(), v), (v,), eps=1e-6, atol=1e-7)
        gq, gk = torch.autograd.grad(f(q, k, v).sum(), (q, k))
        assert torch.all(gq == 0) and torch.all(gk == 0)


@pytest.mark.parametrize("kernel,kk", [("gaussian", None), ("epanechnikov", None), ("biweight", None),
                                       ("triweight", None), ("compact_n4", None), ("gaussian_knn", 3)])
def test_gradcheck_nadaraya_watson(kernel, kk):
    """gradcheck (float64) of nadaraya_watson in the query, keys, values and a per-query bandwidth."""
    g = gen(1212)
    M, N, D = 5, 7, 3
    q = torch.randn(M, D, generator=g, dtype=DT).requires_grad_()
    k = torch.randn(N, D, generator=g, dtype=DT).requires_grad_()
    v = torch.randn(N, 2, generator=g, dtype=DT).requires_grad_()
    h = (2.0 + torch.rand(M, generator=g, dtype=DT)).requires_grad_()
    mask = torch.rand(M, N, generator=g) < 0.8
    mask[:, 0] = True

    def f(q, k, v, h):
        return K.nadaraya_watson(q, k, v, kernel, h, k=kk, mask=mask)

    assert torch.autograd.gradcheck(f, (q, k, v, h), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", GRAD_METHODS)
def test_reference_gradients_match_nw_autograd(method):
    """d/d(q_hat, k_hat, v) of the library equals float64 autograd of the NW form (attention_as_regression).

    q = beta_i q_hat, k = gamma k_hat. The entmax NW form differentiates through the adaptive
    bandwidth h_i(tau_i(s)) (tau by a final Newton step: implicit-function gradient), relumax
    through h_i(d_i*). In float64 to 1e-8, and in float32 (the library's training dtype) to 2e-4.
    """
    g = gen(1313 + GRAD_METHODS.index(method))
    B, H, T, D = 2, 2, 9, 4
    q_hat, k_hat, beta, gamma = scaled_inputs(g, B, H, T, D)
    v = torch.randn(B, H, T, 3, generator=g, dtype=DT)
    w = torch.randn(B, H, T, 3, generator=g, dtype=DT)  # a random linear loss sum(w * y)
    mask = K.admissible_mask(T, 1)

    def grads(fn, dtype):
        # differentiate in unnormalised xq, xk with q_hat = xq/|xq|: gradients stay on the sphere's
        # tangent space, where d^2 = 2 - 2 cos holds to first order
        xs = [x.to(dtype).requires_grad_() for x in (q_hat, k_hat, v)]
        qh, kh = (x / x.norm(dim=-1, keepdim=True) for x in xs[:2])
        y = fn(qh, kh, xs[2])
        gs = torch.autograd.grad((y * w.to(dtype)).sum(), xs, allow_unused=True)  # uniform kNN: no q/k path
        return [torch.zeros_like(x) if gx is None else gx for x, gx in zip(xs, gs)]

    def lib(qh, kh, vv):
        bq = beta.to(qh.dtype)[..., None]
        return kernel_attention(bq * qh, gamma * kh, vv, method, shift=1, backend="reference")

    def nw(qh, kh, vv):
        return K.attention_as_regression(method, qh, kh, vv, beta.to(qh.dtype), gamma, mask=mask)

    g_nw = grads(nw, DT)
    for dtype, tol in ((DT, 1e-8), (torch.float32, 2e-4)):
        g_lib = grads(lib, dtype)
        for a, b in zip(g_lib, g_nw):
            torch.testing.assert_close(a.to(DT), b, atol=tol, rtol=tol)


def test_nw_entmax_view_is_gradcheckable():
    """gradcheck (float64) of the entmax NW form in q_hat, k_hat, v: the adaptive bandwidth is differentiable."""
    g = gen(1414)
    B, H, T, D = 1, 1, 6, 3
    q_hat, k_hat = unit(g, B, H, T, D), unit(g, B, H, T, D)
    v = torch.randn(B, H, T, 2, generator=g, dtype=DT)
    mask = K.admissible_mask(T, 1)
    spec = MethodSpec("biweight", "entmax", 1.5, None, "biweight", "adaptive")
    def f(a, b, c):
        a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
        return K.attention_as_regression(spec, a, b, c, 1.8, 1.8, mask=mask)

    assert torch.autograd.gradcheck(f, tuple(x.requires_grad_() for x in (q_hat, k_hat, v)), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Figure 1


def test_figure1_profiles_match_paper_peaks():
    """Grid step 0.01 on [-2, 2], each profile normalised to sum 1: peaks 0.0042, 0.0109, 0.0094,
    0.0075, 0.0058, 0.0050 (Gaussian, triweight, biweight, Epanechnikov, Gaussian kNN, uniform kNN)."""
    from sparse_mosaics.figures.kernels import kernel_profiles

    u, prof = kernel_profiles()
    assert len(u) == 401 and u[0] == -2.0 and u[-1] == 2.0
    expected = {"Gaussian": 0.0042, "Triweight": 0.0109, "Biweight": 0.0094, "Epanechnikov": 0.0075,
                "Gaussian kNN": 0.0058, "Uniform kNN": 0.0050}
    for label, peak in expected.items():
        assert prof[label].sum() == pytest.approx(1.0, abs=1e-12)
        assert prof[label].max() == pytest.approx(peak, abs=6e-5), label


def test_figure1_fixed_entry_weights():
    """p_0([0, u1, u2]) from the reference backend equals the closed forms:
    softmax 1/(1 + e^u1 + e^u2); top-2 uniform 1/2 when 0 is not the smallest score, else 0;
    top-2 softmax 1/(1 + e^max(u1, u2)) when 0 is not the smallest score, else 0;
    NormReLU (h^2 = 6 on the radius-sqrt 2 sphere) 1/(1 + relu(1+u1) + relu(1+u2));
    ReLUmax relu(1 - m)/(relu(1 - m) + relu(1 + u1 - m) + relu(1 + u2 - m)), m = max(0, u1, u2);
    sparsemax 1 when u1, u2 <= -1; every entmax 1/3 at u1 = u2 = 0."""
    import numpy as np

    from sparse_mosaics.figures.kernels import fixed_entry_weight

    g = np.random.default_rng(1515)
    u1, u2 = g.uniform(-2, 2, 400), g.uniform(-2, 2, 400)
    np.testing.assert_allclose(fixed_entry_weight("softmax", u1, u2), 1 / (1 + np.exp(u1) + np.exp(u2)), atol=1e-12)
    in_top2 = (u1 < 0) | (u2 < 0)  # 0 is not the smallest of the three scores
    np.testing.assert_allclose(fixed_entry_weight("top2_uniform", u1, u2), np.where(in_top2, 0.5, 0.0), atol=1e-12)
    top2_soft = np.where(in_top2, 1 / (1 + np.exp(np.maximum(u1, u2))), 0.0)
    np.testing.assert_allclose(fixed_entry_weight("top2_softmax", u1, u2), top2_soft, atol=1e-12)
    relu = lambda x: np.maximum(x, 0.0)  # noqa: E731
    norm_relu = 1 / (1 + relu(1 + u1) + relu(1 + u2))
    np.testing.assert_allclose(fixed_entry_weight("norm_relu", u1, u2), norm_relu, atol=1e-12)
    m = np.maximum(0, np.maximum(u1, u2))
    w = [relu(1 - m), relu(1 + u1 - m), relu(1 + u2 - m)]
    np.testing.assert_allclose(fixed_entry_weight("relumax", u1, u2), w[0] / sum(w), atol=1e-12)
    low = (u1 <= -1) & (u2 <= -1)
    assert low.any() and np.allclose(fixed_entry_weight("epanechnikov", u1[low], u2[low]), 1.0)
    for method in ("triweight", "biweight", "epanechnikov"):
        assert fixed_entry_weight(method, np.zeros(1), np.zeros(1))[0] == pytest.approx(1 / 3, abs=1e-12)


def test_plot_kernels_writes_pdf_and_png(tmp_path):
    """plot_kernels(pdf, png) writes both files (atomically, via save_figure)."""
    import matplotlib.pyplot as plt

    from sparse_mosaics.figures.kernels import plot_kernels

    fig = plot_kernels(tmp_path / "fig1.pdf", tmp_path / "fig1.png", grid_points=21)
    plt.close(fig)
    assert (tmp_path / "fig1.pdf").stat().st_size > 10_000
    assert (tmp_path / "fig1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig1.pdf", "fig1.png"]
