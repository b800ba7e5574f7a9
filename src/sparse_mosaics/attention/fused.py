"""Fused Triton kernels for every attention family: O(T) memory, forward and backward.

    y = triton_attention(q, k, v, spec, shift=1, lengths=None)

Same function as ``reference.reference_attention`` (CONTRACTS.md "Attention semantics"):
s_ij = q_i . k_j (unscaled), admissible keys A_i = {j : j <= i - shift, j < lengths[b]}, rows with
empty A_i give 0, y_i = sum_{j in A_i} p_ij v_j. Scores, weights and accumulators are fp32 (bf16 /
fp16 inputs go through the tensor cores with fp32 accumulation; fp32 inputs use exact "ieee" dots).
No T x T tensor exists anywhere: a program owns BLOCK_M query rows and streams the admissible key
blocks one or more times ("passes"); per-row statistics (a handful of floats) are the only thing
kept between passes and saved for the backward.

Families (``spec.family``) and their passes over the keys of a query block:

* softmax     -- SDPA (flash / cuDNN) when it can express the mask (no ``lengths``): queries
                 q[:, :, shift:] against keys k[:, :, :T-shift] with is_causal, the first ``shift``
                 rows 0. With ``lengths``: the Triton online-softmax kernel (one pass).
* entmax      -- p_ij = [(a s_ij - tau_i)]_+^n / Z_i with a = alpha - 1, n = 1/a.  Pass 1: row max
                 m of z = a s (tau is in [m - 1, m)).  Newton passes on the n-th root
                 g(tau) = (sum_j [z_j - tau]_+^n)^(1/n) - 1, which is convex and decreasing, so
                 Newton from tau_0 = m - 1 increases monotonically to the root (quadratically;
                 about 4-6 passes to fp32 accuracy, exact in finitely many steps for n = 1, where
                 it is Michelot's algorithm). For n in {2, 3, 4} the passes also sum d^(n-2) and
                 take Halley steps (cubic; one or two passes fewer; a step that lands right of the
                 root is followed by Newton steps, which land left of it); a block stops as soon as every row's step is below
                 max(1e-3, 1e-6 |m|) (the support of z has unit width, so this is scale-free;
                 quadratic convergence leaves an error ~ step^2 ~ 1e-6).  Last
                 pass: output, normalised by Z = sum p (= 1 up to the tolerance) so weights sum to 1.
                 Integer n in {1, 2, 3, 4} use multiplications; other n exp2/log2.
                 Backward (entmax Jacobian): with u = p^(2-alpha) = d^(n-1) / Z^(2-alpha),
                 ds_ij = u_ij (dp_ij - c_i), c_i = sum_j u_ij dp_ij / sum_j u_ij = dO_i . o2_i,
                 o2_i = sum_j u_ij v_j / sum_j u_ij saved by the forward.
* norm_relu   -- p ∝ relu(1 - |q_i|^2 - |k_j|^2 + 2 s_ij), one pass (+ a pass over the rare query
                 blocks where some row has every weight 0: uniform over A_i).
* relumax     -- p ∝ relu(1 + s_ij - m_i), m_i = max_{A_i} s: a max (+argmax) pass, then the output
                 pass.  The gradient flows through m_i to the argmax key (as torch.max does).
* topk_*      -- exact K-th largest admissible score per row: a min/max pass, then counting passes
                 with 7 pivots each (#{s > p} at 7 evenly spaced values of the interval that holds
                 the K-th score; a pivot with exactly K scores above it ends the row), then, for
                 rows still open (ties at the K-th score, intervals at float resolution), bisection
                 snapped to actual scores (#{s >= t}, min{s >= t}, max{s < t}), which terminates
                 exactly; the output pass also finds the K-th and (K+1)-th largest scores, and the
                 saved threshold is their midpoint (robust to recomputation in the backward).
                 Tie rule: if several scores equal the K-th largest value, all strictly larger ones
                 are kept plus the lowest-index tied ones, so exactly min(K, |A_i|) keys are kept
                 (found by a bisection on the index cut, only in blocks that have a tie).
                 topk_softmax: softmax over the selected keys; topk_uniform: 1/min(K, |A_i|) each,
                 no gradient to q, k (piecewise constant in the scores).

Backward: two kernels, as in FlashAttention-2: one program per key block accumulates dK, dV over
the query blocks; one program per query block accumulates dQ over the key blocks.  Both recompute
the scores in the same (query-major) orientation as the forward, from the saved row statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .registry import MethodSpec, get_method

# family codes (constexpr inside the kernels)
SOFTMAX, ENTMAX, TOPK_SOFTMAX, TOPK_UNIFORM, NORM_RELU, RELUMAX = 0, 1, 2, 3, 4, 5
FAMILY_CODE = {
    "softmax": SOFTMAX,
    "entmax": ENTMAX,
    "topk_softmax": TOPK_SOFTMAX,
    "topk_uniform": TOPK_UNIFORM,
    "norm_relu": NORM_RELU,
    "relumax": RELUMAX,
}

LOG2E = 1.4426950408889634
MAX_NEWTON = 30  # entmax Newton passes at most (typically 3-6)
MAX_SELECT = 80  # top-K counting passes per phase at most (both phases end exactly long before)

# Dot precision for fp32 inputs: "tf32x3" (three tf32 tensor-core products, ~fp32 accurate) or
# "ieee" (exact fp32 FMAs, several times slower). bf16 / fp16 inputs always use the tensor cores.
FP32_PRECISION = "tf32x3"

# Block sizes, overridable (the bench sweeps them): {"fwd": (BM, BN, warps, stages), "bwd": (...)}
CONFIG_OVERRIDE: dict = {}


def _config(kind: str, head_dim: int, interpret: bool, fam: int = -1):
    if kind in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE[kind]
    if interpret:
        return (32, 32, 1, 1)
    one_pass = fam in (NORM_RELU, RELUMAX)
    # H200 sweeps (docs/benchmarks/tune_configs.py, B*H=256, T=4096, D=64, bf16; h200_tune.log)
    if kind == "fwd":
        if head_dim <= 64:
            # biweight 10.2 ms at (128, 32, 4, 3) vs 11.0 at (64, 64, 4, 3); norm_relu 2.63 at
            # (64, 32, 4, 3) vs 2.86 at (128, 32, 4, 3); relumax 3.94 vs 4.52
            return (64, 32, 4, 3) if one_pass else (128, 32, 4, 3)
        return (128, 32, 8, 2)
    if head_dim <= 64:
        # fwd+bwd norm_relu 12.40 ms with (64, 64, 4, 3) vs 12.61 with (64, 64, 4, 2); relumax 12.11 vs 12.37
        return (64, 64, 4, 3) if one_pass else (64, 64, 4, 2)
    return (64, 32, 4, 2)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# small jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scores(q, k_base, start_n, last, T, D: tl.constexpr, BD: tl.constexpr, BLOCK_N: tl.constexpr,
            PREC: tl.constexpr):
    """s = q @ k[start_n : start_n + BLOCK_N]^T (fp32), the admissibility mask and the key tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BD)
    k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :],
                mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0)      # (BN, BD)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)                                # (BM, BN)
    adm = offs_n[None, :] <= last[:, None]
    return s, adm, k, offs_n


@triton.jit
def _load_rows(base, offs_m, T, D: tl.constexpr, BD: tl.constexpr):
    offs_d = tl.arange(0, BD)
    return tl.load(base + offs_m[:, None] * D + offs_d[None, :],
                   mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _pow_n(d, n_exp, NINT: tl.constexpr):
    """d ** n for d >= 0 (multiplications when n is a small integer)."""
    if NINT == 1:
        r = d
    elif NINT == 2:
        r = d * d
    elif NINT == 3:
        r = d * d * d
    elif NINT == 4:
        d2 = d * d
        r = d2 * d2
    else:
        r = tl.exp2(n_exp * tl.log2(d))
    return r


@triton.jit
def _pow_n1(d, n_exp, NINT: tl.constexpr):
    """d ** (n - 1) for d >= 0, and the support indicator [d > 0] when n = 1."""
    if NINT == 1:
        r = tl.where(d > 0, 1.0, 0.0)
    elif NINT == 2:
        r = d
    elif NINT == 3:
        r = d * d
    elif NINT == 4:
        r = d * d * d
    else:
        r = tl.exp2((n_exp - 1.0) * tl.log2(d))
    return r


@triton.jit
def _pow_n2(d, NINT: tl.constexpr):
    """d ** (n - 2) for d >= 0, n in {2, 3, 4} (the support indicator for n = 2)."""
    if NINT == 2:
        r = tl.where(d > 0, 1.0, 0.0)
    elif NINT == 3:
        r = d
    else:
        r = d * d
    return r


@triton.jit
def _root_n(f, NINT: tl.constexpr):
    """f ** (1/n) for n in {2, 3, 4}."""
    if NINT == 2:
        r = tl.sqrt(f)
    elif NINT == 3:
        r = tl.exp2(tl.log2(f) * (1.0 / 3.0))
    else:
        r = tl.sqrt(tl.sqrt(f))
    return r


@triton.jit
def _root_excess(f, inv_n, NINT: tl.constexpr):
    """f - f^(1 - 1/n): the numerator of the Newton step on g = f^(1/n) - 1 (times f1)."""
    if NINT == 1:
        r = f - 1.0
    elif NINT == 2:
        r = f - tl.sqrt(f)
    else:
        r = f - tl.exp2((1.0 - inv_n) * tl.log2(f))
    return r


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, O, O2, OF, ST, IS, LENS,
    T, H, BH, shift, a_scale, n_exp, inv_n, topk,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    FAMILY: tl.constexpr, NINT: tl.constexpr, HAS_LENS: tl.constexpr, SAVE: tl.constexpr,
    PREC: tl.constexpr, MAXIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n_mblocks = tl.cdiv(T, BLOCK_M)
    pid_m = n_mblocks - 1 - tl.program_id(0)  # heaviest (last) query blocks first
    bh = tl.program_id(1)
    b = bh // H
    q_base = Q + bh.to(tl.int64) * T * D
    k_base = K + bh.to(tl.int64) * T * D
    v_base = V + bh.to(tl.int64) * T * DV
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BDV)
    row_ok = offs_m < T
    if HAS_LENS:
        Lb = tl.minimum(tl.load(LENS + b).to(tl.int32), T)
    else:
        Lb = T
    last = tl.minimum(offs_m - shift, Lb - 1)                 # (BM,) last admissible key
    last = tl.where(row_ok, last, -1)
    nonempty = last >= 0
    n_hi = tl.maximum(tl.minimum(start_m + BLOCK_M - shift, Lb), 0)   # keys any row needs
    q = _load_rows(q_base, offs_m, T, D, BD)                   # (BM, BD)
    st_row = bh.to(tl.int64) * T + offs_m
    acc = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
    ninf = float("-inf")

    if FAMILY == 0:  # ------------------------------------------------ softmax (online)
        m = tl.full([BLOCK_M], ninf, tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, n_hi, BLOCK_N):
            s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
            s = tl.where(adm, s * 1.4426950408889634, ninf)
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == ninf, 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(tl.where(m == ninf, ninf, m - m_safe))
            v = _load_rows(v_base, offs_n, T, DV, BDV)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
        l_safe = tl.where(l > 0, l, 1.0)
        out = acc / l_safe[:, None]
        lse2 = tl.where(l > 0, m + tl.log2(l_safe), 0.0)
        tl.store(ST + st_row, lse2, mask=row_ok)

    elif FAMILY == 1:  # ---------------------------------------------- alpha-entmax
        mz = tl.full([BLOCK_M], ninf, tl.float32)
        for start_n in range(0, n_hi, BLOCK_N):
            s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
            mz = tl.maximum(mz, tl.max(tl.where(adm, s * a_scale, ninf), 1))
        mz = tl.where(nonempty, mz, 0.0)
        tau = mz - 1.0
        tol = tl.maximum(1e-3, tl.abs(mz) * 1e-6)  # quadratic convergence: next error ~ step^2
        active = nonempty
        it = 0
        go = tl.max(active.to(tl.int32), 0) > 0
        while go:
            f = tl.zeros([BLOCK_M], tl.float32)
            f1 = tl.zeros([BLOCK_M], tl.float32)
            f2 = tl.zeros([BLOCK_M], tl.float32)
            for start_n in range(0, n_hi, BLOCK_N):
                s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
                d = tl.where(adm, tl.maximum(s * a_scale - tau[:, None], 0.0), 0.0)
                f += tl.sum(_pow_n(d, n_exp, NINT), 1)
                f1 += tl.sum(_pow_n1(d, n_exp, NINT), 1)
                if NINT >= 2:
                    f2 += tl.sum(_pow_n2(d, NINT), 1)
            f_safe = tl.where(f > 0, f, 1.0)
            f1_safe = tl.where(f1 > 0, f1, 1.0)
            step = _root_excess(f_safe, inv_n, NINT) / f1_safe
            if NINT >= 2:
                # Halley on g: step = newton / (1 - r), r = g g'' / (2 g'^2)
                #   = (n - 1)(u - 1)(f f2 - f1^2) / (2 u f1^2),  u = f^(1/n)  (r >= 0 left of the root)
                u = _root_n(f_safe, NINT)
                r = (n_exp - 1.0) * (u - 1.0) * (f_safe * f2 - f1_safe * f1_safe) / (2.0 * u * f1_safe * f1_safe)
                step = tl.where((u > 1.0) & (r < 0.9), step / (1.0 - r), step)
            step = tl.where(active & (f1 > 0), step, 0.0)
            tau = tau + step
            active = active & (tl.abs(step) > tol)
            it += 1
            go = (tl.max(active.to(tl.int32), 0) > 0) & (it < MAXIT)
        z = tl.zeros([BLOCK_M], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
        u = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, n_hi, BLOCK_N):
            s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
            d = tl.where(adm, tl.maximum(s * a_scale - tau[:, None], 0.0), 0.0)
            p = _pow_n(d, n_exp, NINT)
            v = _load_rows(v_base, offs_n, T, DV, BDV)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
            z += tl.sum(p, 1)
            if SAVE:
                pu = _pow_n1(d, n_exp, NINT)
                acc2 += tl.dot(pu.to(v.dtype), v, input_precision=PREC)
                u += tl.sum(pu, 1)
        z_safe = tl.where(z > 0, z, 1.0)
        out = acc / z_safe[:, None]
        tl.store(ST + st_row, tau, mask=row_ok)
        tl.store(ST + BH * T + st_row, z_safe, mask=row_ok)
        if SAVE:
            u_safe = tl.where(u > 0, u, 1.0)
            o2 = acc2 / u_safe[:, None]
            tl.store(O2 + st_row[:, None] * DV + offs_dv[None, :], o2,
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV))

    elif FAMILY == 4:  # ---------------------------------------------- norm_relu
        qf = q.to(tl.float32)
        qq = tl.sum(qf * qf, 1)
        l = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, n_hi, BLOCK_N):
            s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
            kf = k.to(tl.float32)
            kk = tl.sum(kf * kf, 1)
            x = 1.0 - qq[:, None] - kk[None, :] + 2.0 * s
            w = tl.where(adm & (x > 0), x, 0.0)
            v = _load_rows(v_base, offs_n, T, DV, BDV)
            acc += tl.dot(w.to(v.dtype), v, input_precision=PREC)
            l += tl.sum(w, 1)
        fallback = nonempty & (l == 0)
        cnt = (last + 1).to(tl.float32)
        if tl.max(fallback.to(tl.int32), 0) > 0:  # uniform over A_i where every weight is 0
            for start_n in range(0, n_hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                w = tl.where((offs_n[None, :] <= last[:, None]) & fallback[:, None], 1.0, 0.0)
                v = _load_rows(v_base, offs_n, T, DV, BDV)
                acc += tl.dot(w.to(v.dtype), v, input_precision=PREC)
        norm = tl.where(fallback, cnt, tl.where(l > 0, l, 1.0))
        out = acc / norm[:, None]
        tl.store(ST + st_row, l, mask=row_ok)

    elif FAMILY == 5:  # ---------------------------------------------- relumax
        m = tl.full([BLOCK_M], ninf, tl.float32)
        am = tl.zeros([BLOCK_M], tl.int32)
        for start_n in range(0, n_hi, BLOCK_N):
            s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
            s = tl.where(adm, s, ninf)
            tmax = tl.max(s, 1)
            targ = tl.argmax(s, 1).to(tl.int32) + start_n
            better = tmax > m
            am = tl.where(better, targ, am)
            m = tl.where(better, tmax, m)
        m = tl.where(nonempty, m, 0.0)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
        c = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, n_hi, BLOCK_N):
            s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
            w = tl.where(adm, tl.maximum(1.0 + s - m[:, None], 0.0), 0.0)
            v = _load_rows(v_base, offs_n, T, DV, BDV)
            acc += tl.dot(w.to(v.dtype), v, input_precision=PREC)
            l += tl.sum(w, 1)
            if SAVE:
                ind = tl.where(w > 0, 1.0, 0.0)
                acc2 += tl.dot(ind.to(v.dtype), v, input_precision=PREC)
                c += tl.sum(ind, 1)
        l_safe = tl.where(l > 0, l, 1.0)
        out = acc / l_safe[:, None]
        tl.store(ST + st_row, m, mask=row_ok)
        tl.store(ST + BH * T + st_row, l_safe, mask=row_ok)
        tl.store(IS + st_row, am, mask=row_ok)
        if SAVE:
            tl.store(ST + 2 * BH * T + st_row, c, mask=row_ok)
            tl.store(O2 + st_row[:, None] * DV + offs_dv[None, :], acc2,
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV))

    else:  # ----------------------------------------------------------- top-K (2: softmax, 3: uniform)
        # pass 1: max and min of the admissible scores
        m = tl.full([BLOCK_M], ninf, tl.float32)
        mn = tl.full([BLOCK_M], float("inf"), tl.float32)
        for start_n in range(0, n_hi, BLOCK_N):
            s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
            m = tl.maximum(m, tl.max(tl.where(adm, s, ninf), 1))
            mn = tl.minimum(mn, tl.min(tl.where(adm, s, float("inf")), 1))
        n_adm = tl.maximum(last + 1, 0)
        need = n_adm > topk                       # rows that really select
        thr = tl.full([BLOCK_M], ninf, tl.float32)  # final selection threshold (select s > thr ...)
        jcut = tl.full([BLOCK_M], 2147483647, tl.int32)  # ... or s == thr and j < jcut
        # phase 1, multi-pivot counting: theta (K-th largest) in (lo, up] with c(t) = #{s > t},
        # c(lo) >= K > c(up). Each pass counts at 7 interior pivots and keeps the sub-interval
        # that holds theta (8x narrower). A pivot with exactly K scores above it is a valid
        # threshold (the row is done); rows whose interval reaches float resolution (ties at
        # theta) go on to the snapped bisection of phase 2.
        lo = tl.where(need, mn - (tl.abs(mn) * 2.4e-7 + 1e-30), 0.0)
        up = tl.where(need, m + (tl.abs(m) * 2.4e-7 + 1e-30), 0.0)
        if tl.max(need.to(tl.int32), 0) > 0:
            active = need
            it = 0
            go = tl.max(active.to(tl.int32), 0) > 0
            while go:
                w = (up - lo) * 0.125
                p1 = lo + w
                p2 = lo + 2.0 * w
                p3 = lo + 3.0 * w
                p4 = lo + 4.0 * w
                p5 = lo + 5.0 * w
                p6 = lo + 6.0 * w
                p7 = lo + 7.0 * w
                c1 = tl.zeros([BLOCK_M], tl.int32)
                c2 = tl.zeros([BLOCK_M], tl.int32)
                c3 = tl.zeros([BLOCK_M], tl.int32)
                c4 = tl.zeros([BLOCK_M], tl.int32)
                c5 = tl.zeros([BLOCK_M], tl.int32)
                c6 = tl.zeros([BLOCK_M], tl.int32)
                c7 = tl.zeros([BLOCK_M], tl.int32)
                for start_n in range(0, n_hi, BLOCK_N):
                    s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
                    s = tl.where(adm, s, ninf)
                    c1 += tl.sum((s > p1[:, None]).to(tl.int32), 1)
                    c2 += tl.sum((s > p2[:, None]).to(tl.int32), 1)
                    c3 += tl.sum((s > p3[:, None]).to(tl.int32), 1)
                    c4 += tl.sum((s > p4[:, None]).to(tl.int32), 1)
                    c5 += tl.sum((s > p5[:, None]).to(tl.int32), 1)
                    c6 += tl.sum((s > p6[:, None]).to(tl.int32), 1)
                    c7 += tl.sum((s > p7[:, None]).to(tl.int32), 1)
                hit = tl.full([BLOCK_M], ninf, tl.float32)
                hit = tl.where(c1 == topk, p1, hit)
                hit = tl.where(c2 == topk, p2, hit)
                hit = tl.where(c3 == topk, p3, hit)
                hit = tl.where(c4 == topk, p4, hit)
                hit = tl.where(c5 == topk, p5, hit)
                hit = tl.where(c6 == topk, p6, hit)
                hit = tl.where(c7 == topk, p7, hit)
                # counts fall with the pivot: the last pivot with c >= K and the first with c < K
                nlo = tl.where(c1 >= topk, p1, lo)
                nlo = tl.where(c2 >= topk, p2, nlo)
                nlo = tl.where(c3 >= topk, p3, nlo)
                nlo = tl.where(c4 >= topk, p4, nlo)
                nlo = tl.where(c5 >= topk, p5, nlo)
                nlo = tl.where(c6 >= topk, p6, nlo)
                nlo = tl.where(c7 >= topk, p7, nlo)
                nup = tl.where(c7 < topk, p7, up)
                nup = tl.where(c6 < topk, p6, nup)
                nup = tl.where(c5 < topk, p5, nup)
                nup = tl.where(c4 < topk, p4, nup)
                nup = tl.where(c3 < topk, p3, nup)
                nup = tl.where(c2 < topk, p2, nup)
                nup = tl.where(c1 < topk, p1, nup)
                done = active & (hit > ninf)
                thr = tl.where(done, hit, thr)
                lo = tl.where(active, nlo, lo)
                up = tl.where(active, nup, up)
                fine = (up - lo) <= (tl.abs(lo) + tl.abs(up)) * 1e-6 + 1e-30
                active = active & (~done) & (~fine)
                it += 1
                go = (tl.max(active.to(tl.int32), 0) > 0) & (it < MAXIT)
        # phase 2 (rare: ties at theta, or a bracket too narrow for pivots): bisection snapped
        # to actual scores, invariant theta in [lo, up], clo = #{s >= lo} >= K
        clo = n_adm
        active = need & (thr == ninf)
        it = 0
        go = tl.max(active.to(tl.int32), 0) > 0
        while go:
            mid = lo * 0.5 + up * 0.5
            mid = tl.where(mid > lo, mid, up)
            cnt = tl.zeros([BLOCK_M], tl.int32)
            amin = tl.full([BLOCK_M], float("inf"), tl.float32)
            bmax = tl.full([BLOCK_M], ninf, tl.float32)
            for start_n in range(0, n_hi, BLOCK_N):
                s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
                ge = adm & (s >= mid[:, None])
                cnt += tl.sum(ge.to(tl.int32), 1)
                amin = tl.minimum(amin, tl.min(tl.where(ge, s, float("inf")), 1))
                bmax = tl.maximum(bmax, tl.max(tl.where(adm & (s < mid[:, None]), s, ninf), 1))
            ok = cnt >= topk
            exact = active & (cnt == topk)
            # exactly K scores >= mid: threshold halfway between the K-th (amin) and (K+1)-th (bmax)
            bsafe = tl.where(bmax > ninf, bmax, amin)
            asafe = tl.where(amin < float("inf"), amin, bsafe)
            half = asafe * 0.5 + bsafe * 0.5
            half = tl.where(half < asafe, half, bsafe)  # s > half keeps asafe, drops bsafe
            thr = tl.where(exact, half, thr)
            lo_new = tl.where(ok, amin, lo)
            clo = tl.where(active & ok, cnt, clo)
            up = tl.where(active & (~ok), bmax, up)
            lo = tl.where(active, lo_new, lo)
            active = active & (~exact) & (up > lo)
            it += 1
            go = (tl.max(active.to(tl.int32), 0) > 0) & (it < MAXIT)
        # rows that collapsed onto a tied value theta = lo with #{s >= theta} > K
        tie = need & (clo > topk) & (thr == ninf)
        thr = tl.where(tie, lo, thr)
        if tl.max(tie.to(tl.int32), 0) > 0:
            cgt = tl.zeros([BLOCK_M], tl.int32)
            for start_n in range(0, n_hi, BLOCK_N):
                s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
                cgt += tl.sum((adm & (s > thr[:, None])).to(tl.int32), 1)
            want = topk - cgt                     # tied keys to keep, lowest index first
            jlo = tl.zeros([BLOCK_M], tl.int32)   # #{tied, j < jlo} < want
            jhi = last + 1                        # #{tied, j < jhi} >= want
            tact = tie
            tgo = tl.max(tact.to(tl.int32), 0) > 0
            while tgo:
                jm = (jlo + jhi) // 2
                ceq = tl.zeros([BLOCK_M], tl.int32)
                for start_n in range(0, n_hi, BLOCK_N):
                    s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
                    eq = adm & (s == thr[:, None]) & (offs_n[None, :] < jm[:, None])
                    ceq += tl.sum(eq.to(tl.int32), 1)
                enough = ceq >= want
                jhi = tl.where(tact & enough, jm, jhi)
                jlo = tl.where(tact & (~enough), jm, jlo)
                tact = tact & (jhi - jlo > 1)
                tgo = tl.max(tact.to(tl.int32), 0) > 0
            jcut = tl.where(tie, jhi, jcut)
        # output pass over the selected keys; it also finds the K-th and (K+1)-th largest scores
        # around thr, so the saved threshold is their midpoint (robust to recomputation)
        l = tl.zeros([BLOCK_M], tl.float32)
        kth = tl.full([BLOCK_M], float("inf"), tl.float32)
        k1th = tl.full([BLOCK_M], ninf, tl.float32)
        for start_n in range(0, n_hi, BLOCK_N):
            s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
            above = adm & (s > thr[:, None])
            kth = tl.minimum(kth, tl.min(tl.where(above, s, float("inf")), 1))
            k1th = tl.maximum(k1th, tl.max(tl.where(adm & (~above), s, ninf), 1))
            sel = above | (adm & (s == thr[:, None]) & (offs_n[None, :] < jcut[:, None]))
            if FAMILY == 2:
                p = tl.where(sel, tl.exp2((s - m[:, None]) * 1.4426950408889634), 0.0)
            else:
                p = tl.where(sel, 1.0, 0.0)
            v = _load_rows(v_base, offs_n, T, DV, BDV)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
            l += tl.sum(p, 1)
        l_safe = tl.where(l > 0, l, 1.0)
        out = acc / l_safe[:, None]
        if FAMILY == 2:
            stat0 = tl.where(l > 0, m * 1.4426950408889634 + tl.log2(l_safe), 0.0)
        else:
            stat0 = l_safe
        tl.store(ST + st_row, stat0, mask=row_ok)
        half = kth * 0.5 + k1th * 0.5
        half = tl.where(half < kth, half, k1th)   # s > half keeps kth, drops k1th
        thr = tl.where(need & (~tie) & (k1th > ninf) & (kth < float("inf")), half, thr)
        tl.store(ST + BH * T + st_row, thr, mask=row_ok)
        tl.store(IS + st_row, jcut, mask=row_ok)

    out = tl.where(nonempty[:, None], out, 0.0)
    tl.store(O + st_row[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    if SAVE:
        if FAMILY >= 4:  # fp32 copy of the output: delta = dO . o must not see its bf16 rounding
            tl.store(OF + st_row[:, None] * DV + offs_dv[None, :], out,
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV))


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bwd_tile(s, adm, offs_n, dp, st0, st1, st2, ist, rowc, qq, kk, a_scale, n_exp, two_m_alpha,
              FAMILY: tl.constexpr, NINT: tl.constexpr):
    """Weights p and score gradient ds of one (BM, BN) tile from the saved row statistics.

    rowc: per-row constant of the Jacobian (delta = dO.o, or c = dO.o2 for entmax).
    For norm_relu ds is the gradient wrt x = 1 - |q|^2 - |k|^2 + 2 s (the kernels apply the chain
    rule), for relumax it includes the path through the row max (to the argmax key).
    """
    if FAMILY == 0:
        p = tl.where(adm, tl.exp2(s * 1.4426950408889634 - st0[:, None]), 0.0)
        ds = p * (dp - rowc[:, None])
    elif FAMILY == 1:
        d = tl.where(adm, tl.maximum(s * a_scale - st0[:, None], 0.0), 0.0)
        p = _pow_n(d, n_exp, NINT) / st1[:, None]
        uf = tl.exp2(-two_m_alpha * tl.log2(st1))       # Z^-(2 - alpha)
        u = _pow_n1(d, n_exp, NINT) * uf[:, None]
        ds = u * (dp - rowc[:, None])
    elif FAMILY == 2:
        sel = adm & ((s > st1[:, None]) | ((s == st1[:, None]) & (offs_n[None, :] < ist[:, None])))
        p = tl.where(sel, tl.exp2(s * 1.4426950408889634 - st0[:, None]), 0.0)
        ds = p * (dp - rowc[:, None])
    elif FAMILY == 3:
        sel = adm & ((s > st1[:, None]) | ((s == st1[:, None]) & (offs_n[None, :] < ist[:, None])))
        p = tl.where(sel, 1.0 / st0[:, None], 0.0)
        ds = p * 0.0
    elif FAMILY == 4:
        x = 1.0 - qq[:, None] - kk[None, :] + 2.0 * s
        pos = adm & (x > 0)
        unif = st0 == 0                                   # every weight 0: uniform, st2 = |A_i|
        lsafe = tl.where(unif, 1.0, st0)
        p = tl.where(unif[:, None], tl.where(adm, 1.0 / st2[:, None], 0.0),
                     tl.where(pos, x / lsafe[:, None], 0.0))
        ds = tl.where(pos & (~unif[:, None]), (dp - rowc[:, None]) / lsafe[:, None], 0.0)
    else:
        w = 1.0 + s - st0[:, None]
        pos = adm & (w > 0)
        p = tl.where(pos, w / st1[:, None], 0.0)
        g = tl.where(pos, (dp - rowc[:, None]) / st1[:, None], 0.0)
        ds = g - tl.where(offs_n[None, :] == ist[:, None], st2[:, None], 0.0)
    return p, ds


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_, ST, IS, RC, LENS,
    T, H, BH, shift, a_scale, n_exp, two_m_alpha,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    FAMILY: tl.constexpr, NINT: tl.constexpr, HAS_LENS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    off_qk = bh.to(tl.int64) * T * D
    off_v = bh.to(tl.int64) * T * DV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    if HAS_LENS:
        Lb = tl.minimum(tl.load(LENS + b).to(tl.int32), T)
    else:
        Lb = T
    k = _load_rows(K + off_qk, offs_n, T, D, BD)              # (BN, BD)
    v = _load_rows(V + off_v, offs_n, T, DV, BDV)             # (BN, BDV)
    kf = k.to(tl.float32)
    kk = tl.sum(kf * kf, 1)
    dk = tl.zeros([BLOCK_N, BD], tl.float32)
    dv = tl.zeros([BLOCK_N, BDV], tl.float32)
    csum = tl.zeros([BLOCK_N], tl.float32)
    m_lo = ((start_n + shift) // BLOCK_M) * BLOCK_M
    m_lo = tl.where(start_n >= Lb, T, m_lo)  # keys past the length: no query sees them
    for start_m in range(m_lo, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        last = tl.minimum(offs_m - shift, Lb - 1)
        last = tl.where(row_ok, last, -1)
        q = _load_rows(Q + off_qk, offs_m, T, D, BD)
        do = _load_rows(DO + off_v, offs_m, T, DV, BDV)
        st_row = bh.to(tl.int64) * T + offs_m
        st0 = tl.load(ST + st_row, mask=row_ok, other=1.0)
        st1 = tl.load(ST + BH * T + st_row, mask=row_ok, other=1.0)
        st2 = tl.load(ST + 2 * BH * T + st_row, mask=row_ok, other=1.0)
        ist = tl.load(IS + st_row, mask=row_ok, other=0)
        rowc = tl.load(RC + st_row, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)     # (BM, BN), same orientation as fwd
        adm = offs_n[None, :] <= last[:, None]
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)   # (BM, BN)
        qf = q.to(tl.float32)
        qq = tl.sum(qf * qf, 1)
        p, ds = _bwd_tile(s, adm, offs_n, dp, st0, st1, st2, ist, rowc, qq, kk, a_scale, n_exp,
                          two_m_alpha, FAMILY, NINT)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        if FAMILY != 3:
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            if FAMILY == 4:
                csum += tl.sum(ds, 0)
    if FAMILY == 4:  # x = 1 - |q|^2 - |k|^2 + 2 q.k:  dk = 2 sum_i ds q_i - 2 k sum_i ds
        dk = 2.0 * dk - 2.0 * kf * csum[:, None]
    n_ok = offs_n < T
    tl.store(DK + off_qk + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + off_v + offs_n[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, ST, IS, RC, LENS,
    T, H, BH, shift, a_scale, n_exp, two_m_alpha,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    FAMILY: tl.constexpr, NINT: tl.constexpr, HAS_LENS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n_mblocks = tl.cdiv(T, BLOCK_M)
    pid_m = n_mblocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    off_qk = bh.to(tl.int64) * T * D
    off_v = bh.to(tl.int64) * T * DV
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BD)
    row_ok = offs_m < T
    if HAS_LENS:
        Lb = tl.minimum(tl.load(LENS + b).to(tl.int32), T)
    else:
        Lb = T
    last = tl.minimum(offs_m - shift, Lb - 1)
    last = tl.where(row_ok, last, -1)
    n_hi = tl.maximum(tl.minimum(start_m + BLOCK_M - shift, Lb), 0)
    q = _load_rows(Q + off_qk, offs_m, T, D, BD)
    do = _load_rows(DO + off_v, offs_m, T, DV, BDV)
    st_row = bh.to(tl.int64) * T + offs_m
    st0 = tl.load(ST + st_row, mask=row_ok, other=1.0)
    st1 = tl.load(ST + BH * T + st_row, mask=row_ok, other=1.0)
    st2 = tl.load(ST + 2 * BH * T + st_row, mask=row_ok, other=1.0)
    ist = tl.load(IS + st_row, mask=row_ok, other=0)
    rowc = tl.load(RC + st_row, mask=row_ok, other=0.0)
    qf = q.to(tl.float32)
    qq = tl.sum(qf * qf, 1)
    dq = tl.zeros([BLOCK_M, BD], tl.float32)
    rsum = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, n_hi, BLOCK_N):
        s, adm, k, offs_n = _scores(q, K + off_qk, start_n, last, T, D, BD, BLOCK_N, PREC)
        v = _load_rows(V + off_v, offs_n, T, DV, BDV)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        kf = k.to(tl.float32)
        kk = tl.sum(kf * kf, 1)
        p, ds = _bwd_tile(s, adm, offs_n, dp, st0, st1, st2, ist, rowc, qq, kk, a_scale, n_exp,
                          two_m_alpha, FAMILY, NINT)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if FAMILY == 4:
            rsum += tl.sum(ds, 1)
    if FAMILY == 4:
        dq = 2.0 * dq - 2.0 * qf * rsum[:, None]
    tl.store(DQ + off_qk + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------


def _integer_exponent(alpha: float) -> int:
    """n = 1/(alpha - 1) when it is an integer in 1..4 (fast paths), else 0 (generic pow)."""
    n = 1.0 / (alpha - 1.0)
    r = round(n)
    return int(r) if abs(n - r) < 1e-9 and 1 <= r <= 4 else 0


def _params(spec: MethodSpec):
    fam = FAMILY_CODE[spec.family]
    alpha = spec.alpha if fam == ENTMAX else 2.0
    a = alpha - 1.0
    n = 1.0 / a
    return dict(fam=fam, a_scale=a, n_exp=n, inv_n=a, two_m_alpha=2.0 - alpha,
                nint=_integer_exponent(alpha) if fam == ENTMAX else 1,
                topk=int(spec.k) if spec.k is not None else 0)


def _launch_forward(q, k, v, prm, shift, lengths, save):
    B, H, T, D = q.shape
    DV = v.shape[-1]
    BH = B * H
    interp = _interpreting()
    BM, BN, warps, stages = _config("fwd", D, interp, prm["fam"])
    o = torch.empty((B, H, T, DV), device=q.device, dtype=v.dtype)
    st = torch.ones((3, BH, T), device=q.device, dtype=torch.float32)
    ist = torch.zeros((BH, T), device=q.device, dtype=torch.int32)
    fam = prm["fam"]
    need_o2 = save and fam in (ENTMAX, RELUMAX, NORM_RELU)
    o2 = torch.empty((BH, T, DV), device=q.device, dtype=torch.float32) if need_o2 else st
    need_of = save and fam == RELUMAX  # norm_relu keeps its fp32 output in o2, relumax needs both
    of = torch.empty((BH, T, DV), device=q.device, dtype=torch.float32) if need_of else o2
    lens = lengths if lengths is not None else st
    prec = FP32_PRECISION if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(T, BM), BH)
    _fwd_kernel[grid](
        q, k, v, o, o2, of, st, ist, lens,
        T, H, BH, shift, prm["a_scale"], prm["n_exp"], prm["inv_n"], prm["topk"],
        D=D, DV=DV, BD=max(16, triton.next_power_of_2(D)), BDV=max(16, triton.next_power_of_2(DV)),
        FAMILY=fam, NINT=prm["nint"], HAS_LENS=lengths is not None, SAVE=need_o2, PREC=prec,
        MAXIT=MAX_SELECT if fam in (TOPK_SOFTMAX, TOPK_UNIFORM) else MAX_NEWTON,
        BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages,
    )
    return o, o2 if need_o2 else None, of if need_of else None, st, ist


def _launch_backward(q, k, v, o, o2, of, st, ist, do, prm, shift, lengths):
    B, H, T, D = q.shape
    DV = v.shape[-1]
    BH = B * H
    fam = prm["fam"]
    do = do.contiguous()
    dof = do.float()
    # per-row constant of the Jacobian and (norm_relu / relumax) extra statistics in st[2]
    if fam == ENTMAX:
        rowc = (dof.view(BH, T, DV) * o2).sum(-1)                     # c = dO . o2
    elif fam == NORM_RELU:
        # delta = dO . o from the fp32 output: ds = (dp - delta) / L amplifies any rounding of o
        # by 1/L, and L = sum_j w_ij can be tiny
        rowc = (dof.view(BH, T, DV) * o2).sum(-1)
    elif fam == RELUMAX:
        rowc = (dof.view(BH, T, DV) * of).sum(-1)                     # G = ... - |supp| delta
    else:
        rowc = (dof * o.float()).sum(-1).view(BH, T)                  # delta = dO . o
    st = st.clone()
    if fam == NORM_RELU:  # st[2] = |A_i| for the uniform fallback
        pos = torch.arange(T, device=q.device)
        cnt = (pos - shift + 1).view(1, T).expand(B, T)
        if lengths is not None:
            cnt = torch.minimum(cnt, lengths.view(B, 1).long())
        st[2] = cnt.clamp_min(1).float().repeat_interleave(H, dim=0)
    elif fam == RELUMAX:  # st[2] = G_i = sum_j g_ij = (dO . sum_{supp} v - |supp| delta) / L
        sv = (dof.view(BH, T, DV) * o2).sum(-1)
        st[2] = (sv - st[2] * rowc) / st[1]
    interp = _interpreting()
    BM, BN, warps, stages = _config("bwd", D, interp, fam)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    lens = lengths if lengths is not None else st
    prec = FP32_PRECISION if q.dtype == torch.float32 else "tf32"
    common = dict(D=D, DV=DV, BD=max(16, triton.next_power_of_2(D)),
                  BDV=max(16, triton.next_power_of_2(DV)), FAMILY=fam, NINT=prm["nint"],
                  HAS_LENS=lengths is not None, PREC=prec, BLOCK_M=BM, BLOCK_N=BN,
                  num_warps=warps, num_stages=stages)
    scal = (T, H, BH, shift, prm["a_scale"], prm["n_exp"], prm["two_m_alpha"])
    _bwd_dkdv_kernel[(triton.cdiv(T, BN), BH)](q, k, v, do, dk, dv, st, ist, rowc, lens, *scal, **common)
    if fam == TOPK_UNIFORM:
        dq.zero_()
    else:
        _bwd_dq_kernel[(triton.cdiv(T, BM), BH)](q, k, v, do, dq, st, ist, rowc, lens, *scal, **common)
    return dq, dk, dv


class _FusedAttention(torch.autograd.Function):
    """Eager autograd wrapper (a custom op's dispatch costs ~0.3 ms of CPU time per call)."""

    @staticmethod
    def forward(ctx, q, k, v, method, shift, lengths):
        save = any(ctx.needs_input_grad[:3])
        o, o2, of, st, ist = _launch_forward(q, k, v, _params(get_method(method)), shift, lengths, save)
        ctx.method, ctx.shift = method, shift
        ctx.save_for_backward(q, k, v, o, o2, of, st, ist, lengths)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, o2, of, st, ist, lengths = ctx.saved_tensors
        dq, dk, dv = _launch_backward(q, k, v, o, o2, of, st, ist, do, _params(get_method(ctx.method)),
                                      ctx.shift, lengths)
        return dq, dk, dv, None, None, None


# Under torch.compile the launches are torch.library custom ops instead: opaque nodes of one graph
# (no graph break, CUDA-graph capturable), with the backward op reached through register_autograd.
# Outputs a family does not need are empty tensors (custom ops return no None).
def _needs(method: str, save: bool):
    fam = FAMILY_CODE[get_method(method).family]
    need_o2 = save and fam in (ENTMAX, RELUMAX, NORM_RELU)
    return need_o2, save and fam == RELUMAX


@torch.library.custom_op("sparse_mosaics::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str, shift: int,
                   lengths: torch.Tensor | None, save: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    o, o2, of, st, ist = _launch_forward(q, k, v, _params(get_method(method)), shift, lengths, save)
    return o, st.new_empty(0) if o2 is None else o2, st.new_empty(0) if of is None else of, st, ist


@_attention_fwd.register_fake
def _(q, k, v, method, shift, lengths, save):
    B, H, T, _ = q.shape
    DV = v.shape[-1]
    need_o2, need_of = _needs(method, save)
    f32 = dict(device=q.device, dtype=torch.float32)
    return (q.new_empty((B, H, T, DV), dtype=v.dtype),
            torch.empty((B * H, T, DV) if need_o2 else (0,), **f32),
            torch.empty((B * H, T, DV) if need_of else (0,), **f32),
            torch.empty((3, B * H, T), **f32), torch.empty((B * H, T), device=q.device, dtype=torch.int32))


@torch.library.custom_op("sparse_mosaics::attention_bwd", mutates_args=())
def _attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, o2: torch.Tensor,
                   of: torch.Tensor, st: torch.Tensor, ist: torch.Tensor, do: torch.Tensor, method: str,
                   shift: int, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(q, k, v, o, o2, of, st, ist, do, _params(get_method(method)), shift, lengths)


@_attention_bwd.register_fake
def _(q, k, v, o, o2, of, st, ist, do, method, shift, lengths):
    return tuple(torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))


def _attention_setup(ctx, inputs, output):
    q, k, v, method, shift, lengths, save = inputs
    o, o2, of, st, ist = output
    ctx.method, ctx.shift = method, shift
    ctx.save_for_backward(q, k, v, o, o2, of, st, ist, lengths)


def _attention_backward(ctx, do, *unused):
    q, k, v, o, o2, of, st, ist, lengths = ctx.saved_tensors
    dq, dk, dv = torch.ops.sparse_mosaics.attention_bwd(q, k, v, o, o2, of, st, ist, do, ctx.method,
                                                        ctx.shift, lengths)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("sparse_mosaics::attention_fwd", _attention_backward,
                                setup_context=_attention_setup)


def sdpa_softmax(q, k, v, shift: int = 1) -> torch.Tensor:
    """Softmax attention with the shifted causal mask through SDPA (flash / cuDNN / efficient).

    Query i (i >= shift) sees keys j <= i - shift: SDPA(q[shift:], k[:T-shift], v[:T-shift],
    is_causal=True) aligns query i with key i - shift on the diagonal. Rows i < shift are 0.
    """
    T = q.shape[2]
    if shift >= T:
        return v.new_zeros(q.shape[:3] + (v.shape[-1],))
    if shift == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    y = F.scaled_dot_product_attention(q[:, :, shift:], k[:, :, : T - shift], v[:, :, : T - shift],
                                       is_causal=True, scale=1.0)
    return F.pad(y, (0, 0, shift, 0))


def fused_attention(q, k, v, spec: MethodSpec, shift: int = 1, lengths=None) -> torch.Tensor:
    """The Triton kernels for any family (softmax included: the lengths-capable online kernel)."""
    B, H, T, D = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton attention supports fp16/bf16/fp32 inputs, got {q.dtype}")
    if not (k.dtype == q.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if D > 256 or v.shape[-1] > 256:
        raise ValueError(f"triton attention supports head dims <= 256, got {D} / {v.shape[-1]}")
    if lengths is not None:
        lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if not torch.compiler.is_compiling():
        return _FusedAttention.apply(q, k, v, spec.name, int(shift), lengths)
    save = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return torch.ops.sparse_mosaics.attention_fwd(q, k, v, spec.name, int(shift), lengths, save)[0]


def triton_attention(q, k, v, spec: MethodSpec, shift: int = 1, lengths=None) -> torch.Tensor:
    """``backend="triton"``: SDPA for softmax without lengths, the fused kernels otherwise.

    Args:
        q, k: (B, H, T, D); v: (B, H, T, Dv); same dtype (fp16, bf16 or fp32).
        spec: the method (``registry.get_method``).
        shift: keys j <= i - shift are admissible.
        lengths: optional (B,) int tensor; keys j >= lengths[b] are not admissible.

    Returns:
        (B, H, T, Dv) in v.dtype (autograd-capable; O(T) memory in forward and backward).
    """
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    elif not (q.dtype == k.dtype == v.dtype):
        dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if spec.family == "softmax" and lengths is None:
        return sdpa_softmax(q, k, v, shift)
    with torch.autocast(device_type=q.device.type, enabled=False):
        return fused_attention(q, k, v, spec, shift, lengths)


__all__ = ["triton_attention", "fused_attention", "sdpa_softmax", "CONFIG_OVERRIDE", "FAMILY_CODE"]
