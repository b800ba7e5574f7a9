"""The per-row threshold searches of the fused forward kernel (see ``fused`` for the algorithms).

* ``_entmax_start``, ``_entmax_passes``: tau of alpha-entmax, p = [z - tau]_+^n / Z, z = (alpha - 1) s:
  a first pass that keeps each row's largest tile maxima and solves tau on them (a start left of
  the root), then Newton / Halley passes over the keys; the forward kernel's output pass takes the
  last step (``fused_forward``).
* ``_topk_threshold``: the exact K-th largest admissible score: a min / max / moments pass, the
  optional candidate pass (fused.TOPK_CANDIDATES), counting passes at 5 placed pivots, the snapped
  bisection for what remains, the index cut for ties.

Both stream the key blocks of one block of BLOCK_M query rows (``_scores``) and keep only per-row
vectors between passes; the forward kernel then runs its output pass with what they return.
"""

import triton
import triton.language as tl

from .fused_tiles import _entmax_step, _pow_n, _pow_n1, _pow_n2, _root_excess, _scores, _upper_normal_quantile


@triton.jit
def _extract_largest(ZC, st_row, x, cm, n_kept, CAND: tl.constexpr):
    """One extraction round: write each row's largest marked x to its next slot, unmark its copies."""
    mx = tl.max(tl.where(cm, x, float("-inf")), 1)
    has = mx > float("-inf")
    tl.store(ZC + st_row * CAND + n_kept, mx, mask=has & (n_kept < CAND))
    return cm & (x < mx[:, None]), n_kept + has.to(tl.int32)


@triton.jit
def _store_candidates(ZC, st_row, x, cm, n_cand, n_kept, CAND: tl.constexpr, ROUNDS: tl.constexpr):
    """Append the marked values x[cm] of one (BLOCK_M, BLOCK_N) tile to each row's CAND slots of ZC.

    n_cand counts the marked values, n_kept the slots written (a value is written while n_kept <
    CAND). Rows are compacted by repeated extraction of their largest marked value (candidates are
    rare, so mostly 1-3 rounds: cheaper than a prefix sum over the tile). ROUNDS = 0: as many rounds
    as the tile's busiest row has marks (a loop whose length is a reduction over the block);
    ROUNDS = R > 0: R rounds, unrolled (no nested loop, no block-wide reduction), and a row with more
    than R marks in one tile keeps only R. A round takes every copy of its max but writes it once.
    So a row with a tie inside a tile, or more than R marks, ends with n_kept < n_cand; the callers
    treat that row as not fitting.
    """
    cnt = tl.sum(cm.to(tl.int32), 1)
    n_cand += cnt
    if ROUNDS == 0:
        for _ in range(0, tl.max(cnt, 0)):
            cm, n_kept = _extract_largest(ZC, st_row, x, cm, n_kept, CAND)
    else:
        for _ in tl.static_range(ROUNDS):
            cm, n_kept = _extract_largest(ZC, st_row, x, cm, n_kept, CAND)
    return n_cand, n_kept


@triton.jit
def _insert_sorted(top, x, R: tl.constexpr):
    """x (BLOCK_M,) inserted into each row's R largest values so far, top = (t_0 >= ... >= t_R-1)
    (a tuple of R vectors): one compare-exchange per slot, the smallest falls off the end."""
    out = ()
    for r in tl.static_range(R):
        out = out + (tl.maximum(top[r], x),)
        x = tl.minimum(top[r], x)
    return out


@triton.jit
def _entmax_top_tile(q, k_base, start_n, last, top, a_scale, T, D: tl.constexpr, BD: tl.constexpr,
                     BLOCK_N: tl.constexpr, PREC: tl.constexpr, R: tl.constexpr, PER: tl.constexpr,
                     MASKED: tl.constexpr):
    """The first pass over one key tile: the PER largest distinct z = a s of each row in the tile
    go into the row's R largest so far (top; top[0] is the row max). MASKED=False: every key of the
    tile is admissible."""
    s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
    z = s * a_scale
    if MASKED:
        z = tl.where(adm, z, float("-inf"))
    t = tl.max(z, 1)
    top = _insert_sorted(top, t, R)
    for _ in tl.static_range(PER - 1):
        z = tl.where(z < t[:, None], z, float("-inf"))
        t = tl.max(z, 1)
        top = _insert_sorted(top, t, R)
    return top


@triton.jit
def _subset_threshold(top, n_exp, inv_n, NINT: tl.constexpr, R: tl.constexpr):
    """The threshold tau_S of the values S = top alone: sum_{z in S} [z - tau_S]_+^n = 1.

    S is a subset of the row's z, so sum over all z of [z - tau_S]_+^n >= 1 and tau_S <= tau*: a
    start left of the root, far closer than m - 1 (tau_S for S = {m}). Sparsemax (n = 1): tau_S =
    max_k (t_0 + ... + t_k-1 - 1) / k (as in sparsemax itself, Martins & Astudillo 2016). Other n:
    Newton on
    g(tau) = (sum_S [z - tau]_+^n)^(1/n) - 1 from m - 1, which is convex and decreasing, so the
    iterates rise to tau_S and never pass it; three of them (an unconverged one is still a start
    left of the root, and the Halley pass that follows corrects far more).
    """
    m = top[0]
    m = tl.where(m > float("-inf"), m, 0.0)
    tau = m - 1.0
    if NINT == 1:
        cs = tl.zeros_like(m)
        for r in tl.static_range(R):
            ok = top[r] > float("-inf")
            cs += tl.where(ok, top[r], 0.0)
            tau = tl.where(ok, tl.maximum(tau, (cs - 1.0) / (r + 1.0)), tau)
    else:
        for _ in tl.static_range(3):  # from m - 1, 3 steps leave ~3e-7 (random scores)
            f = tl.zeros_like(m)
            f1 = tl.zeros_like(m)
            for r in tl.static_range(R):
                d = tl.maximum(top[r] - tau, 0.0)
                f += _pow_n(d, n_exp, NINT)
                f1 += _pow_n1(d, n_exp, NINT)
            step = _root_excess(tl.where(f > 0, f, 1.0), inv_n, NINT) / tl.where(f1 > 0, f1, 1.0)
            tau += tl.where(f1 > 0, step, 0.0)
    return tau


@triton.jit
def _entmax_sums_tile(q, k_base, start_n, last, tau, f, f1, f2, a_scale, n_exp, T, D: tl.constexpr,
                      BD: tl.constexpr, NINT: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                      MASKED: tl.constexpr):
    """f, f1, f2 += sum_j d^n, d^(n-1), d^(n-2) over one key tile, d = [z - tau]_+ (the Newton /
    Halley sums; MASKED=False: every key admissible)."""
    s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
    d = tl.maximum(s * a_scale - tau[:, None], 0.0)
    if MASKED:
        d = tl.where(adm, d, 0.0)
    f += tl.sum(_pow_n(d, n_exp, NINT), 1)
    f1 += tl.sum(_pow_n1(d, n_exp, NINT), 1)
    if NINT >= 2:
        f2 += tl.sum(_pow_n2(d, NINT), 1)
    return f, f1, f2


@triton.jit
def _entmax_start(q, k_base, last, nonempty, n_full, n_hi, T, a_scale, n_exp, inv_n,
                  D: tl.constexpr, BD: tl.constexpr, NINT: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr, PER: tl.constexpr):
    """(tau_0, m): the first pass over the keys keeps each row's R largest tile maxima (PER per
    tile), and tau_0 = their subset threshold (``_subset_threshold``), left of the root; m = max z.
    Rows with no admissible key: tau_0 = -1, m = 0. Keys below n_full are admissible for every row
    of the block: no mask there."""
    top = ()
    for _ in tl.static_range(R):
        top = top + (tl.full([BLOCK_M], float("-inf"), tl.float32),)
    for start_n in range(0, n_full, BLOCK_N):
        top = _entmax_top_tile(q, k_base, start_n, last, top, a_scale, T, D, BD, BLOCK_N, PREC, R, PER, False)
    for start_n in range(n_full, n_hi, BLOCK_N):
        top = _entmax_top_tile(q, k_base, start_n, last, top, a_scale, T, D, BD, BLOCK_N, PREC, R, PER, True)
    tau = _subset_threshold(top, n_exp, inv_n, NINT, R)
    return tl.where(nonempty, tau, -1.0), tl.where(nonempty, top[0], 0.0)


@triton.jit
def _entmax_passes(q, k_base, last, tau, active, it, tol, n_full, n_hi, T, a_scale, n_exp, inv_n, maxit,
                   D: tl.constexpr, BD: tl.constexpr, NINT: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Newton / Halley passes over the keys (``_entmax_step``) for the active rows until each one's
    step is at most tol (a row drops out then), or maxit passes in all (it counts them)."""
    go = (tl.max(active.to(tl.int32), 0) > 0) & (it < maxit)
    while go:
        f = tl.zeros([BLOCK_M], tl.float32)
        f1 = tl.zeros([BLOCK_M], tl.float32)
        f2 = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, n_full, BLOCK_N):
            f, f1, f2 = _entmax_sums_tile(q, k_base, start_n, last, tau, f, f1, f2, a_scale, n_exp, T, D, BD,
                                          NINT, BLOCK_N, PREC, False)
        for start_n in range(n_full, n_hi, BLOCK_N):
            f, f1, f2 = _entmax_sums_tile(q, k_base, start_n, last, tau, f, f1, f2, a_scale, n_exp, T, D, BD,
                                          NINT, BLOCK_N, PREC, True)
        step = tl.where(active & (f1 > 0), _entmax_step(f, f1, f2, n_exp, inv_n, NINT), 0.0)
        tau = tau + step
        active = active & (tl.abs(step) > tol)
        it += 1
        go = (tl.max(active.to(tl.int32), 0) > 0) & (it < maxit)
    return tau, it


@triton.jit
def _topk_threshold(q, k_base, ZC, st_row, last, n_hi, T, topk, D: tl.constexpr, BD: tl.constexpr,
                    PREC: tl.constexpr, maxit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAND: tl.constexpr, CROUNDS: tl.constexpr):
    """(m, thr, jcut, need, tie), all (BLOCK_M,): the row max m; keys with s > thr, or s == thr and
    index < jcut, are exactly the min(K, |A_i|) selected ones (need: |A_i| > K, the rows that
    select; tie: rows whose K-th score is tied, resolved by the index cut jcut)."""
    ninf = float("-inf")
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
    kf = topk * 1.0
    nf = tl.maximum(n_adm.to(tl.float32), 1.0)
    mu = ssum / nf
    sd = tl.sqrt(tl.maximum(ssq / nf - mu * mu, 0.0))
    pending = need
    if CAND > 0:
        # candidate pass (fused.TOPK_CANDIDATES): every s > t0 goes to the row's CAND slots of ZC,
        # t0 placed (Gaussian fit of the row; below the minimum when |A_i| <= CAND) so that about
        # (K + 1 + CAND) / 2 scores lie above it. A row with K + 1 <= count <= CAND holds its K + 1
        # largest scores there, theta_K and theta_K+1 among them; if no tie straddles the K-th
        # place, the threshold is their midpoint. Rows with count = K take t0 itself. Every other
        # row (t0 guessed wrong, ties at theta) takes the search below.
        t0 = mu + sd * _upper_normal_quantile(tl.minimum((kf + 1.0 + CAND) * 0.5 / nf, 0.5))
        t0 = tl.where(n_adm <= CAND, lo, t0)
        n_cand = tl.zeros([BLOCK_M], tl.int32)
        n_kept = tl.zeros([BLOCK_M], tl.int32)
        for start_n in range(0, n_hi, BLOCK_N):
            s, adm, k, offs_n = _scores(q, k_base, start_n, last, T, D, BD, BLOCK_N, PREC)
            n_cand, n_kept = _store_candidates(ZC, st_row, s, adm & (s > t0[:, None]), n_cand, n_kept,
                                               CAND, CROUNDS)
        fit = need & (n_cand >= topk + 1) & (n_cand <= CAND)
        offs_c = tl.arange(0, CAND)
        zt = tl.load(ZC + st_row[:, None] * CAND + offs_c[None, :],
                     mask=fit[:, None] & (offs_c[None, :] < n_kept[:, None]), other=ninf)
        # the K + 1 largest candidates by repeated extraction of the row max (K + 1 rounds on the
        # (BLOCK_M, CAND) registers; each round takes every copy of the max, so a value tied across
        # the K-th place shows as a round that carries the count past K: such rows search below)
        th_k = tl.full([BLOCK_M], float("inf"), tl.float32)
        th_k1 = tl.full([BLOCK_M], float("inf"), tl.float32)
        n_above = tl.zeros([BLOCK_M], tl.int32)              # candidates extracted so far
        fit = fit & (n_kept == n_cand)                       # a tie inside one tile kept one copy
        for _ in range(0, topk + 1):
            mx = tl.max(zt, 1)
            is_mx = zt == mx[:, None]
            c = tl.sum(is_mx.to(tl.int32), 1)
            th_k = tl.where((n_above < topk) & (n_above + c >= topk), mx, th_k)
            fit = fit & ~((n_above < topk) & (n_above + c > topk))
            th_k1 = tl.where(n_above == topk, mx, th_k1)
            n_above += c
            zt = tl.where(is_mx, ninf, zt)
        mid_c = th_k * 0.5 + th_k1 * 0.5
        good = fit & (th_k1 < mid_c) & (mid_c < th_k)
        at_t0 = need & (n_cand == topk)
        thr = tl.where(good, mid_c, tl.where(at_t0, t0, thr))
        jcut = tl.where(good | at_t0, 0, jcut)                       # thr is no kept score
        pending = need & (~good) & (~at_t0)
    if tl.max(pending.to(tl.int32), 0) > 0:
        c_lo = n_adm.to(tl.float32)
        c_up = tl.zeros([BLOCK_M], tl.float32)
        cen = mu + sd * _upper_normal_quantile(tl.minimum((kf - 0.5) / nf, 0.5))
        spread = 0.3 * sd
        active = pending
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
            go = (tl.max(active.to(tl.int32), 0) > 0) & (it < maxit)
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
        go = (tl.max(active.to(tl.int32), 0) > 0) & (it < maxit)
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
    return m, thr, jcut, need, tie
