"""The fused forward kernel: one program per (query block, batch*head), every family's passes.

See ``fused`` for the per-family algorithms (the passes over the keys) and the saved statistics.
"""

import triton
import triton.language as tl

from .fused_threshold import _entmax_passes, _entmax_start, _topk_threshold
from .fused_tiles import _entmax_step, _load_rows, _pow_n, _pow_n1, _pow_n2, _scores


@triton.jit
def _entmax_out_tile(q, k_base, v_base, start_n, last, tau, acc, acc1, acc0, f, f1, f2, dmin, a_scale, n_exp, T,
                     D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                     NINT: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                     MASKED: tl.constexpr, FOLD: tl.constexpr):
    """The entmax output pass over one key tile, d = [a s - tau]_+ (MASKED=False: every key
    admissible): acc += d^n v, f += sum d^n; for the last step's fold (integer n) or the backward
    also acc1 += d^(n-1) v, f1 += sum d^(n-1); for the fold with n >= 2 acc0 += d^(n-2) v,
    f2 += sum d^(n-2); for n = 1 dmin = the smallest positive d (the fold is exact below it)."""
    s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
    d = tl.maximum(s * a_scale - tau[:, None], 0.0)
    if MASKED:
        d = tl.where(adm, d, 0.0)
    v = _load_rows(v_base, offs_n, T, DV, BDV)
    p = _pow_n(d, n_exp, NINT)
    acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    f += tl.sum(p, 1)
    if SAVE or (FOLD and NINT >= 1):
        p1 = _pow_n1(d, n_exp, NINT)
        acc1 += tl.dot(p1.to(v.dtype), v, input_precision=PREC)
        f1 += tl.sum(p1, 1)
    if FOLD and NINT >= 2:
        p0 = _pow_n2(d, NINT)
        acc0 += tl.dot(p0.to(v.dtype), v, input_precision=PREC)
        f2 += tl.sum(p0, 1)
    if FOLD and NINT == 1:
        dmin = tl.minimum(dmin, tl.min(tl.where(d > 0, d, float("inf")), 1))
    return acc, acc1, acc0, f, f1, f2, dmin


# maxit (the pass cap) is a runtime argument: a constant 0 folds the search loops' conditions
# away, and Triton 3.6 fails to compile what is left
@triton.jit(do_not_specialize=["maxit"])
def _fwd_kernel(
    Q, K, V, O, O2, OF, ST, IS, LENS, ZC,
    T, H, BH, shift, a_scale, n_exp, inv_n, topk, tol_step, tol_fold, maxit,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    FAMILY: tl.constexpr, NINT: tl.constexpr, HAS_LENS: tl.constexpr, SAVE: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAND: tl.constexpr, CROUNDS: tl.constexpr, SPLIT: tl.constexpr, TOPR: tl.constexpr,
    TOPPER: tl.constexpr, ROUNDS: tl.constexpr, FOLD: tl.constexpr,
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
        # keys below n_full are admissible for every row of the block: no mask there
        if SPLIT:
            n_full = tl.minimum((tl.maximum(tl.minimum(start_m - shift + 1, Lb), 0) // BLOCK_N) * BLOCK_N, n_hi)
        else:
            n_full = 0
        tau, mz = _entmax_start(q, k_base, last, nonempty, n_full, n_hi, T, a_scale, n_exp, inv_n,
                                D, BD, NINT, PREC, BLOCK_M, BLOCK_N, TOPR, TOPPER)
        tol = tl.maximum(tol_step, tl.abs(mz) * 1e-6)   # scale-free: the support of z has unit width
        # folding sparsemax: the start is the root wherever the support is among the kept maxima,
        # and the output pass checks that exactly; otherwise the passes come first
        active = nonempty & ((NINT != 1) | (not FOLD))
        it = 0
        again = True
        acc1 = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
        acc0 = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
        f = tl.zeros([BLOCK_M], tl.float32)
        f1 = tl.zeros([BLOCK_M], tl.float32)
        f2 = tl.zeros([BLOCK_M], tl.float32)
        delta = tl.zeros([BLOCK_M], tl.float32)
        # a for loop, not `while again` (Triton 3.6 fails to compile that while around these
        # loops); rounds after the last needed one run no pass (no active row, no keys)
        for rnd in range(0, ROUNDS):
            tau, it = _entmax_passes(q, k_base, last, tau, active, it, tol, n_full, n_hi, T, a_scale, n_exp,
                                     inv_n, maxit, D, BD, NINT, PREC, BLOCK_M, BLOCK_N)
            n_out = tl.where(again, n_hi, 0)
            n_out_full = tl.minimum(n_full, n_out)
            acc = tl.where(again, 0.0, acc)
            acc1 = tl.where(again, 0.0, acc1)
            acc0 = tl.where(again, 0.0, acc0)
            f = tl.where(again, 0.0, f)
            f1 = tl.where(again, 0.0, f1)
            f2 = tl.where(again, 0.0, f2)
            dmin = tl.full([BLOCK_M], float("inf"), tl.float32)
            for start_n in range(0, n_out_full, BLOCK_N):
                acc, acc1, acc0, f, f1, f2, dmin = _entmax_out_tile(
                    q, k_base, v_base, start_n, last, tau, acc, acc1, acc0, f, f1, f2, dmin, a_scale, n_exp, T,
                    D, DV, BD, BDV, NINT, SAVE, PREC, BLOCK_N, False, FOLD)
            for start_n in range(n_out_full, n_out, BLOCK_N):
                acc, acc1, acc0, f, f1, f2, dmin = _entmax_out_tile(
                    q, k_base, v_base, start_n, last, tau, acc, acc1, acc0, f, f1, f2, dmin, a_scale, n_exp, T,
                    D, DV, BD, BDV, NINT, SAVE, PREC, BLOCK_N, True, FOLD)
            # the fold: the pass's sums give the next Newton / Halley step delta, and the weights at
            # tau + delta follow from the binomial expansion of (d - delta)^n on the same support
            # (see ``fused``); a row whose delta is too large for that (or, for n = 1, would move
            # the support) takes more passes and another output pass
            if FOLD and NINT >= 1:
                step = tl.where(nonempty & (f1 > 0), _entmax_step(f, f1, f2, n_exp, inv_n, NINT), 0.0)
                delta = tl.where(again, step, delta)
            if FOLD and NINT == 1:
                bad = nonempty & (delta > dmin)
            elif FOLD and NINT >= 2:
                bad = nonempty & (tl.abs(delta) > tol_fold)
            else:
                bad = tl.zeros([BLOCK_M], tl.int32) > 0   # no fold (generic n): the passes ran to tol
            again = again & (tl.max(bad.to(tl.int32), 0) > 0) & (rnd + 1 < ROUNDS)
            tau = tau + delta * again.to(tl.float32)
            active = bad & again
        # weights (d - delta)^n ~ d^n - n delta d^(n-1) + C(n, 2) delta^2 d^(n-2) (exact for n <= 2),
        # (d - delta)^(n-1) ~ d^(n-1) - (n - 1) delta d^(n-2) (exact for n <= 2); delta = 0 for
        # generic n, whose acc0, f2 stay 0
        c1 = n_exp * delta
        c2 = 0.5 * n_exp * (n_exp - 1.0) * delta * delta
        zsum = f - c1 * f1 + c2 * f2
        z_safe = tl.where(zsum > 0, zsum, 1.0)
        out = (acc - c1[:, None] * acc1 + c2[:, None] * acc0) / z_safe[:, None]
        tl.store(ST + st_row, tau + delta, mask=row_ok)
        tl.store(ST + BH * T + st_row, z_safe, mask=row_ok)
        if SAVE:
            e1 = (n_exp - 1.0) * delta
            usum = f1 - e1 * f2
            u_safe = tl.where(usum > 0, usum, 1.0)
            o2 = (acc1 - e1[:, None] * acc0) / u_safe[:, None]
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
        m, thr, jcut, need, tie = _topk_threshold(q, k_base, ZC, st_row, last, n_hi, T, topk, D, BD, PREC,
                                                  maxit, BLOCK_M, BLOCK_N, CAND, CROUNDS)
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
        resave = need & (~tie) & (k1th > ninf) & (kth < float("inf"))
        thr = tl.where(resave, half, thr)
        jcut = tl.where(resave & (half == k1th), 0, jcut)  # adjacent floats: thr = k1th, not kept
        tl.store(ST + BH * T + st_row, thr, mask=row_ok)
        tl.store(IS + st_row, jcut, mask=row_ok)

    out = tl.where(nonempty[:, None], out, 0.0)
    tl.store(O + st_row[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    if SAVE:
        if FAMILY >= 4:  # fp32 copy of the output: delta = dO . o must not see its bf16 rounding
            tl.store(OF + st_row[:, None] * DV + offs_dv[None, :], out,
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV))
