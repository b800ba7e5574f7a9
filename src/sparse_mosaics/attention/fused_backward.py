"""The fused backward kernels (FlashAttention-2 layout): dK, dV per key block; dQ per query block.

Both recompute the score tiles in the forward's (query-major) orientation and rebuild the weights
and the score gradient of every family from the row statistics the forward saved (see ``fused``).
"""

import triton
import triton.language as tl

from .fused_tiles import _load_rows, _pow_n, _pow_n1, _scores


@triton.jit
def _admissible(adm, x, MASKED: tl.constexpr):
    """x where the key is admissible, 0 elsewhere (x itself for an unmasked tile)."""
    if MASKED:
        x = tl.where(adm, x, 0.0)
    return x


@triton.jit
def _bwd_tile(s, adm, offs_n, dp, st0, st1, st2, ist, rowc, qq, kk, a_scale, n_exp, two_m_alpha,
              FAMILY: tl.constexpr, NINT: tl.constexpr, MASKED: tl.constexpr):
    """Weights p and score gradient ds of one (BM, BN) tile from the saved row statistics.

    rowc: per-row constant of the Jacobian (delta = dO.o, or c = dO.o2 for entmax).
    Row normalisers enter as per-row reciprocals: one division per row instead of an IEEE division
    per weight (the tile's most expensive instruction otherwise).
    For norm_relu ds is the gradient wrt x = 1 - |q|^2 - |k|^2 + 2 s (the kernels apply the chain
    rule), for relumax it includes the path through the row max (to the argmax key).
    MASKED=False: every weight of the tile is admissible (adm is not used).
    """
    if FAMILY == 0:
        p = _admissible(adm, tl.exp2(s * 1.4426950408889634 - st0[:, None]), MASKED)
        ds = p * (dp - rowc[:, None])
    elif FAMILY == 1:
        d = _admissible(adm, tl.maximum(s * a_scale - st0[:, None], 0.0), MASKED)
        p = _pow_n(d, n_exp, NINT) * (1.0 / st1)[:, None]
        uf = tl.exp2(-two_m_alpha * tl.log2(st1))       # Z^-(2 - alpha)
        u = _pow_n1(d, n_exp, NINT) * uf[:, None]
        ds = u * (dp - rowc[:, None])
    elif FAMILY == 2:
        sel = (s > st1[:, None]) | ((s == st1[:, None]) & (offs_n[None, :] < ist[:, None]))
        p = _admissible(adm, tl.where(sel, tl.exp2(s * 1.4426950408889634 - st0[:, None]), 0.0), MASKED)
        ds = p * (dp - rowc[:, None])
    elif FAMILY == 3:
        sel = (s > st1[:, None]) | ((s == st1[:, None]) & (offs_n[None, :] < ist[:, None]))
        p = _admissible(adm, tl.where(sel, (1.0 / st0)[:, None], 0.0), MASKED)
        ds = p * 0.0
    elif FAMILY == 4:
        x = _admissible(adm, 1.0 - qq[:, None] - kk[None, :] + 2.0 * s, MASKED)
        pos = x > 0
        unif = st0 == 0                                   # every weight 0: uniform, st2 = |A_i|
        inv = 1.0 / tl.where(unif, 1.0, st0)
        pu = _admissible(adm, (1.0 / st2)[:, None] + 0.0 * s, MASKED)
        p = tl.where(unif[:, None], pu, tl.where(pos, x * inv[:, None], 0.0))
        ds = tl.where(pos & (~unif[:, None]), (dp - rowc[:, None]) * inv[:, None], 0.0)
    else:
        w = _admissible(adm, 1.0 + s - st0[:, None], MASKED)
        pos = w > 0
        inv = 1.0 / st1
        p = tl.where(pos, w * inv[:, None], 0.0)
        g = tl.where(pos, (dp - rowc[:, None]) * inv[:, None], 0.0)
        ds = g - tl.where(offs_n[None, :] == ist[:, None], st2[:, None], 0.0)
    return p, ds


@triton.jit
def _row_stats(ST, IS, RC, bh, offs_m, row_ok, T, BH):
    """The forward's saved statistics of a block of query rows (st[0..2], the index statistic) and
    the row constant of the Jacobian; rows past T get harmless fillers."""
    st_row = bh.to(tl.int64) * T + offs_m
    st0 = tl.load(ST + st_row, mask=row_ok, other=1.0)
    st1 = tl.load(ST + BH * T + st_row, mask=row_ok, other=1.0)
    st2 = tl.load(ST + 2 * BH * T + st_row, mask=row_ok, other=1.0)
    ist = tl.load(IS + st_row, mask=row_ok, other=0)
    rowc = tl.load(RC + st_row, mask=row_ok, other=0.0)
    return st0, st1, st2, ist, rowc


@triton.jit
def _dkdv_step(Q, DO, ST, IS, RC, off_qk, off_v, bh, start_m, k, v, kk, offs_n, dk, dv, csum,
               T, BH, shift, Lb, a_scale, n_exp, two_m_alpha,
               D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
               FAMILY: tl.constexpr, NINT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
               MASKED: tl.constexpr):
    """One query block's contribution to a key block's dK, dV (and norm_relu's column sums).
    MASKED=False: the caller knows every row admits every key of the block (no mask per weight)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q = _load_rows(Q + off_qk, offs_m, T, D, BD)
    do = _load_rows(DO + off_v, offs_m, T, DV, BDV)
    st0, st1, st2, ist, rowc = _row_stats(ST, IS, RC, bh, offs_m, row_ok, T, BH)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)     # (BM, BN), same orientation as fwd
    if MASKED:
        last = tl.minimum(offs_m - shift, Lb - 1)
        last = tl.where(row_ok, last, -1)
        adm = offs_n[None, :] <= last[:, None]
    else:
        adm = None
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)   # (BM, BN)
    qf = q.to(tl.float32)
    qq = tl.sum(qf * qf, 1)
    p, ds = _bwd_tile(s, adm, offs_n, dp, st0, st1, st2, ist, rowc, qq, kk, a_scale, n_exp,
                      two_m_alpha, FAMILY, NINT, MASKED)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    if FAMILY != 3:
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        if FAMILY == 4:
            csum += tl.sum(ds, 0)
    return dk, dv, csum


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
    # query blocks that see the whole key block (below its diagonal, no row past T, every key
    # before the length) skip the mask: the diagonal blocks, then those, then the last partial one
    m_full = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1 + shift, BLOCK_M) * BLOCK_M, T)
    m_full = tl.maximum(m_full, m_lo)
    m_end = tl.where(start_n + BLOCK_N <= Lb, (T // BLOCK_M) * BLOCK_M, m_full)
    m_end = tl.maximum(m_end, m_full)
    for start_m in range(m_lo, m_full, BLOCK_M):
        dk, dv, csum = _dkdv_step(Q, DO, ST, IS, RC, off_qk, off_v, bh, start_m, k, v, kk, offs_n, dk, dv, csum,
                                  T, BH, shift, Lb, a_scale, n_exp, two_m_alpha, D, DV, BD, BDV, FAMILY, NINT,
                                  PREC, BLOCK_M, True)
    for start_m in range(m_full, m_end, BLOCK_M):
        dk, dv, csum = _dkdv_step(Q, DO, ST, IS, RC, off_qk, off_v, bh, start_m, k, v, kk, offs_n, dk, dv, csum,
                                  T, BH, shift, Lb, a_scale, n_exp, two_m_alpha, D, DV, BD, BDV, FAMILY, NINT,
                                  PREC, BLOCK_M, False)
    for start_m in range(m_end, T, BLOCK_M):
        dk, dv, csum = _dkdv_step(Q, DO, ST, IS, RC, off_qk, off_v, bh, start_m, k, v, kk, offs_n, dk, dv, csum,
                                  T, BH, shift, Lb, a_scale, n_exp, two_m_alpha, D, DV, BD, BDV, FAMILY, NINT,
                                  PREC, BLOCK_M, True)
    if FAMILY == 4:  # x = 1 - |q|^2 - |k|^2 + 2 q.k:  dk = 2 sum_i ds q_i - 2 k sum_i ds
        dk = 2.0 * dk - 2.0 * kf * csum[:, None]
    n_ok = offs_n < T
    tl.store(DK + off_qk + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + off_v + offs_n[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_step(K, V, off_qk, off_v, start_n, q, do, last, st0, st1, st2, ist, rowc, qq, dq, rsum,
             T, a_scale, n_exp, two_m_alpha,
             D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
             FAMILY: tl.constexpr, NINT: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
             MASKED: tl.constexpr):
    """One key block's contribution to a query block's dQ (and norm_relu's row sums).
    MASKED=False: the caller knows every row admits every key of the block (no mask per weight)."""
    s, adm, k, offs_n = _scores(q, K + off_qk, start_n, last, T, D, BD, BLOCK_N, PREC)
    v = _load_rows(V + off_v, offs_n, T, DV, BDV)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    kf = k.to(tl.float32)
    kk = tl.sum(kf * kf, 1)
    p, ds = _bwd_tile(s, adm, offs_n, dp, st0, st1, st2, ist, rowc, qq, kk, a_scale, n_exp,
                      two_m_alpha, FAMILY, NINT, MASKED)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    if FAMILY == 4:
        rsum += tl.sum(ds, 1)
    return dq, rsum


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
    st0, st1, st2, ist, rowc = _row_stats(ST, IS, RC, bh, offs_m, row_ok, T, BH)
    qf = q.to(tl.float32)
    qq = tl.sum(qf * qf, 1)
    dq = tl.zeros([BLOCK_M, BD], tl.float32)
    rsum = tl.zeros([BLOCK_M], tl.float32)
    # key blocks that every row of the block sees whole skip the mask; then the diagonal ones
    n_full = (tl.maximum(tl.minimum(start_m - shift + 1, Lb), 0) // BLOCK_N) * BLOCK_N
    n_full = tl.minimum(n_full, n_hi)
    for start_n in range(0, n_full, BLOCK_N):
        dq, rsum = _dq_step(K, V, off_qk, off_v, start_n, q, do, last, st0, st1, st2, ist, rowc, qq, dq, rsum,
                            T, a_scale, n_exp, two_m_alpha, D, DV, BD, BDV, FAMILY, NINT, PREC, BLOCK_N, False)
    for start_n in range(n_full, n_hi, BLOCK_N):
        dq, rsum = _dq_step(K, V, off_qk, off_v, start_n, q, do, last, st0, st1, st2, ist, rowc, qq, dq, rsum,
                            T, a_scale, n_exp, two_m_alpha, D, DV, BD, BDV, FAMILY, NINT, PREC, BLOCK_N, True)
    if FAMILY == 4:
        dq = 2.0 * dq - 2.0 * qf * rsum[:, None]
    tl.store(DQ + off_qk + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))
