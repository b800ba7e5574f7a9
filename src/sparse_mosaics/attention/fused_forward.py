"""The fused forward kernel: one program per (query block, batch*head), every family's passes.

See ``fused`` for the per-family algorithms (the passes over the keys) and the saved statistics.
"""

import triton
import triton.language as tl

from .fused_tiles import _entmax_step, _load_rows, _pow_n, _pow_n1, _pow_n2, _scores


@triton.jit
def _fwd_kernel(
    Q, K, V, O, O2, OF, ST, IS, LENS, ZC,
    T, H, BH, shift, a_scale, n_exp, inv_n, topk, tol_step,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    FAMILY: tl.constexpr, NINT: tl.constexpr, HAS_LENS: tl.constexpr, SAVE: tl.constexpr,
    PREC: tl.constexpr, MAXIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAND: tl.constexpr,
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
        tol = tl.maximum(tol_step, tl.abs(mz) * 1e-6)  # next error ~ step^2 (Newton), ~ step^3 (Halley)
        active = nonempty
        if CAND > 0:
            # candidate pass: tau* >= m - 1, so every z > m - 1 (the support and then some) goes to
            # the row's CAND slots of ZC (position = running count + prefix sum within the tile);
            # rows with at most CAND candidates solve tau on them in registers, the others
            # (overflow) take the passes below
            cnt = tl.zeros([BLOCK_M], tl.int32)
            for start_n in range(0, n_hi, BLOCK_N):
                s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
                zs = s * a_scale
                c = adm & (zs > tau[:, None])
                ci = c.to(tl.int32)
                pos = cnt[:, None] + tl.cumsum(ci, 1) - 1
                tl.store(ZC + st_row[:, None] * CAND + pos, zs, mask=c & (pos < CAND))
                cnt += tl.sum(ci, 1)
            solve = nonempty & (cnt <= CAND)
            offs_c = tl.arange(0, CAND)
            zt = tl.load(ZC + st_row[:, None] * CAND + offs_c[None, :],
                         mask=solve[:, None] & (offs_c[None, :] < cnt[:, None]), other=ninf)
            sact = solve
            sit = 0
            sgo = tl.max(sact.to(tl.int32), 0) > 0
            while sgo:
                d = tl.maximum(zt - tau[:, None], 0.0)
                f = tl.sum(_pow_n(d, n_exp, NINT), 1)
                f1 = tl.sum(_pow_n1(d, n_exp, NINT), 1)
                f2 = f1
                if NINT >= 2:
                    f2 = tl.sum(_pow_n2(d, NINT), 1)
                step = tl.where(sact & (f1 > 0), _entmax_step(f, f1, f2, n_exp, inv_n, NINT), 0.0)
                tau = tau + step
                sact = sact & (tl.abs(step) > tol)
                sit += 1
                sgo = (tl.max(sact.to(tl.int32), 0) > 0) & (sit < 64)  # in registers: cheap
            active = nonempty & (~solve)
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
            step = tl.where(active & (f1 > 0), _entmax_step(f, f1, f2, n_exp, inv_n, NINT), 0.0)
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
        # pass 1: max, min and the first two moments of the admissible scores
        m = tl.full([BLOCK_M], ninf, tl.float32)
        mn = tl.full([BLOCK_M], float("inf"), tl.float32)
        ssum = tl.zeros([BLOCK_M], tl.float32)
        ssq = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, n_hi, BLOCK_N):
            s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
            m = tl.maximum(m, tl.max(tl.where(adm, s, ninf), 1))
            mn = tl.minimum(mn, tl.min(tl.where(adm, s, float("inf")), 1))
            sa = tl.where(adm, s, 0.0)
            ssum += tl.sum(sa, 1)
            ssq += tl.sum(sa * sa, 1)
        n_adm = tl.maximum(last + 1, 0)
        need = n_adm > topk                       # rows that really select
        thr = tl.full([BLOCK_M], ninf, tl.float32)  # final selection threshold (select s > thr ...)
        jcut = tl.full([BLOCK_M], 2147483647, tl.int32)  # ... or s == thr and j < jcut
        # phase 1, counting at 5 pivots per pass: theta (the K-th largest score) is in (lo, up],
        # with c(t) = #{s > t}, c_lo = c(lo) >= K > c(up) = c_up. The pivots sit where theta is
        # expected (only the speed depends on the guess; the bracket logic is exact): first at the
        # Gaussian quantile mu + sd z(K / |A_i|) of the row's scores, then by linear interpolation
        # of the counts inside the bracket, spread over ~2 / sqrt(c_lo - c_up) of its width. A
        # pivot with exactly K scores above it ends the row; so does a bracket holding exactly two
        # scores (c_lo = K + 1, c_up = K - 1) if they differ: the smaller is the (K+1)-th, exactly K
        # lie above it. Rows whose bracket reaches float resolution (ties at theta) go on to the
        # snapped bisection of phase 2. Counters are fp32 (exact below 2^24; float adds run at
        # twice the int32 rate on Hopper: 1.6x faster than int32 counters on the H200).
        lo = tl.where(need, mn - (tl.abs(mn) * 2.4e-7 + 1e-30), 0.0)
        up = tl.where(need, m + (tl.abs(m) * 2.4e-7 + 1e-30), 0.0)
        if tl.max(need.to(tl.int32), 0) > 0:
            c_lo = n_adm.to(tl.float32)
            c_up = tl.zeros([BLOCK_M], tl.float32)
            kf = topk * 1.0
            nf = tl.maximum(c_lo, 1.0)
            mu = ssum / nf
            sd = tl.sqrt(tl.maximum(ssq / nf - mu * mu, 0.0))
            # upper-tail normal quantile of (K - 1/2) / n (Abramowitz & Stegun 26.2.23, p <= 1/2)
            tq = tl.sqrt(-2.0 * tl.log(tl.minimum((kf - 0.5) / nf, 0.5)))
            zq = tq - (2.515517 + tq * (0.802853 + tq * 0.010328)) / \
                (1.0 + tq * (1.432788 + tq * (0.189269 + tq * 0.001308)))
            cen = mu + sd * zq
            spread = 0.3 * sd
            active = need
            it = 0
            go = tl.max(active.to(tl.int32), 0) > 0
            while go:
                r = tl.maximum(c_lo - c_up, 1.0)
                cen_i = lo + (c_lo - kf + 0.5) / r * (up - lo)
                spread_i = (up - lo) * tl.minimum(2.0 / tl.sqrt(r), 0.5)
                cen = tl.where(it > 0, cen_i, cen)
                spread = tl.where(it > 0, spread_i, spread)
                p1 = tl.minimum(tl.maximum(cen - spread * 0.6666667, lo), up)
                p2 = tl.minimum(tl.maximum(cen - spread * 0.3333333, lo), up)
                p3 = tl.minimum(tl.maximum(cen, lo), up)
                p4 = tl.minimum(tl.maximum(cen + spread * 0.3333333, lo), up)
                p5 = tl.minimum(tl.maximum(cen + spread * 0.6666667, lo), up)
                c1 = tl.zeros([BLOCK_M], tl.float32)
                c2 = tl.zeros([BLOCK_M], tl.float32)
                c3 = tl.zeros([BLOCK_M], tl.float32)
                c4 = tl.zeros([BLOCK_M], tl.float32)
                c5 = tl.zeros([BLOCK_M], tl.float32)
                amin = tl.full([BLOCK_M], float("inf"), tl.float32)   # min, max of s in (lo, up]
                bmax = tl.full([BLOCK_M], ninf, tl.float32)
                for start_n in range(0, n_hi, BLOCK_N):
                    s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
                    s = tl.where(adm, s, ninf)
                    c1 += tl.sum(tl.where(s > p1[:, None], 1.0, 0.0), 1)
                    c2 += tl.sum(tl.where(s > p2[:, None], 1.0, 0.0), 1)
                    c3 += tl.sum(tl.where(s > p3[:, None], 1.0, 0.0), 1)
                    c4 += tl.sum(tl.where(s > p4[:, None], 1.0, 0.0), 1)
                    c5 += tl.sum(tl.where(s > p5[:, None], 1.0, 0.0), 1)
                    inb = (s > lo[:, None]) & (s <= up[:, None])
                    amin = tl.minimum(amin, tl.min(tl.where(inb, s, float("inf")), 1))
                    bmax = tl.maximum(bmax, tl.max(tl.where(inb, s, ninf), 1))
                # two scores in the bracket: the threshold halfway between them (strictly, so that
                # it is no score and s > thr keeps exactly the K above it)
                mid2 = amin * 0.5 + bmax * 0.5
                hit = tl.where((c_lo - c_up == 2.0) & (amin < mid2) & (mid2 < bmax), mid2, ninf)
                hit = tl.where(c1 == kf, p1, hit)
                hit = tl.where(c2 == kf, p2, hit)
                hit = tl.where(c3 == kf, p3, hit)
                hit = tl.where(c4 == kf, p4, hit)
                hit = tl.where(c5 == kf, p5, hit)
                # counts fall with the pivot: the last pivot with c >= K and the first with c < K
                nlo = tl.where(c1 >= kf, p1, lo)
                nclo = tl.where(c1 >= kf, c1, c_lo)
                nlo = tl.where(c2 >= kf, p2, nlo)
                nclo = tl.where(c2 >= kf, c2, nclo)
                nlo = tl.where(c3 >= kf, p3, nlo)
                nclo = tl.where(c3 >= kf, c3, nclo)
                nlo = tl.where(c4 >= kf, p4, nlo)
                nclo = tl.where(c4 >= kf, c4, nclo)
                nlo = tl.where(c5 >= kf, p5, nlo)
                nclo = tl.where(c5 >= kf, c5, nclo)
                nup = tl.where(c5 < kf, p5, up)
                ncup = tl.where(c5 < kf, c5, c_up)
                nup = tl.where(c4 < kf, p4, nup)
                ncup = tl.where(c4 < kf, c4, ncup)
                nup = tl.where(c3 < kf, p3, nup)
                ncup = tl.where(c3 < kf, c3, ncup)
                nup = tl.where(c2 < kf, p2, nup)
                ncup = tl.where(c2 < kf, c2, ncup)
                nup = tl.where(c1 < kf, p1, nup)
                ncup = tl.where(c1 < kf, c1, ncup)
                done = active & (hit > ninf)
                thr = tl.where(done, hit, thr)
                lo = tl.where(active, nlo, lo)
                up = tl.where(active, nup, up)
                c_lo = tl.where(active, nclo, c_lo)
                c_up = tl.where(active, ncup, c_up)
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
            jcut = tl.where(exact & (half == bsafe), 0, jcut)  # thr is a score: no tied key kept
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
