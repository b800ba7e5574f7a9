"""Fused Triton kernels for every attention family: O(T) memory, forward and backward.

    y = triton_attention(q, k, v, spec, shift=1, lengths=None)

Same function as ``reference.reference_attention`` (CONTRACTS.md "Attention semantics"):
s_ij = q_i . k_j (unscaled), admissible keys A_i = {j : j <= i - shift, j < lengths[b]}, rows with
empty A_i give 0, y_i = sum_{j in A_i} p_ij v_j. Scores, weights and accumulators are fp32 (bf16 /
fp16 inputs go through the tensor cores with fp32 accumulation; fp32 inputs use "tf32x3" dots,
FP32_PRECISION).
No T x T tensor exists anywhere: a program owns BLOCK_M query rows and streams the admissible key
blocks one or more times ("passes"); per-row statistics (a handful of floats) are the only thing
kept between passes and saved for the backward.

Families (``spec.family``) and their passes over the keys of a query block:

* softmax     -- SDPA (flash / cuDNN) for 16-bit inputs when it can express the mask (no
                 ``lengths``): queries q[:, :, shift:] against keys k[:, :, :T-shift] with
                 is_causal, the first ``shift`` rows 0. With ``lengths`` or fp32 inputs: the Triton
                 online-softmax kernel (one pass).
* entmax      -- p_ij = [(a s_ij - tau_i)]_+^n / Z_i with a = alpha - 1, n = 1/a.
                 Pass 1 (the start): each row keeps its R = 8 largest tile maxima of z = a s
                 (2 per key tile for sparsemax, 1 otherwise) and solves tau on them alone; they are
                 a subset of the row, so tau_0 <= tau* (left of the root, far closer than m - 1).
                 Then Newton / Halley passes on the n-th root g(tau) = (sum_j [z_j - tau]_+^n)^(1/n)
                 - 1, convex and decreasing, so Newton from the left rises monotonically to the root
                 (exact in finitely many steps for n = 1: Michelot's algorithm); for n in {2, 3, 4}
                 the passes also sum d^(n-2) and take Halley steps (cubic; a step that lands right
                 of the root is followed by Newton steps, which land left of it). A block stops
                 once every row's step is at most max(h, 1e-6 |m|) (scale-free: the support of z has
                 unit width), h = 1e-3 for fp32 inputs and sparsemax, 1e-2 (Halley) / 3e-3 (Newton)
                 for 16-bit inputs (tau to ~1e-4, below their rounding; ``_threshold_tols``). On
                 random scores alpha < 2 then takes 2 Halley passes (3 from m - 1).
                 Sparsemax from T = 1024 on (ENTMAX_FOLD_ROUNDS): no threshold pass at first, since
                 the start is usually the root; the output pass also sums [d > 0] v and computes
                 the Newton step delta, which it takes inside the weights, (d - delta) on the same
                 support, exactly wherever delta is at most the row's smallest positive d (checked);
                 other rows take passes and another output pass. So its forward is 2 passes (8 from
                 m - 1). The fold for n in {2, 3, 4} (forced with ENTMAX_FOLD_ROUNDS > 0: weights
                 (d - delta)^n to second order in delta, o2's to first, delta <= 5e-3 16-bit / 1e-3
                 fp32) saves a pass but its third output dot costs more (h200_s5.log).
                 From T = 1024 on, tiles that every row of the query block sees whole skip the
                 mask (FORWARD_MASK_SPLIT), as in the backward.
                 Z = sum p (= 1 up to the tolerance) normalises the weights.
                 Integer n in {1, 2, 3, 4} use multiplications; other n exp2/log2.
                 Backward (entmax Jacobian): with u = p^(2-alpha) = d^(n-1) / Z^(2-alpha),
                 ds_ij = u_ij (dp_ij - c_i), c_i = sum_j u_ij dp_ij / sum_j u_ij = dO_i . o2_i,
                 o2_i = sum_j u_ij v_j / sum_j u_ij saved by the forward.
* norm_relu   -- p ∝ relu(1 - |q_i|^2 - |k_j|^2 + 2 s_ij), one pass (+ a pass over the rare query
                 blocks where some row has every weight 0: uniform over A_i).
* relumax     -- p ∝ relu(1 + s_ij - m_i), m_i = max_{A_i} s: a max (+argmax) pass, then the output
                 pass.  The gradient flows through m_i to the argmax key (as torch.max does).
* topk_*      -- exact K-th largest admissible score per row: a min/max/moments pass, then counting
                 passes with 5 pivots each (#{s > p} at 5 values inside the interval that holds the
                 K-th score, placed where it is expected: a Gaussian quantile first, then linear
                 interpolation of the counts; a pivot with exactly K scores above it ends the row,
                 and so does an interval holding just the K-th and (K+1)-th scores), then, for
                 rows still open (ties at the K-th score, intervals at float resolution), bisection
                 snapped to actual scores (#{s >= t}, min{s >= t}, max{s < t}), which terminates
                 exactly; the output pass also finds the K-th and (K+1)-th largest scores, and the
                 saved threshold is their midpoint (robust to recomputation in the backward).
                 Tie rule: if several scores equal the K-th largest value, all strictly larger ones
                 are kept plus the lowest-index tied ones, so exactly min(K, |A_i|) keys are kept
                 (found by a bisection on the index cut, only in blocks that have a tie).
                 Sequences of T >= 1024 first try the candidates (TOPK_CANDIDATES, 64 slots):
                 after the min/max pass, one pass stores the scores above a guess t0 in 64 slots
                 per row; rows with K + 1 to 64 of them find theta in registers, the others search.
                 topk_softmax: softmax over the selected keys; topk_uniform: 1/min(K, |A_i|) each,
                 no gradient to q, k (piecewise constant in the scores).

Files: this module is the host side (block sizes, launches, autograd, custom ops);
``fused_forward`` holds the forward kernel, ``fused_threshold`` its threshold searches,
``fused_backward`` the two backward kernels, ``fused_tiles`` the tile helpers they share.

Backward: two kernels, as in FlashAttention-2: one program per key block accumulates dK, dV over
the query blocks; one program per query block accumulates dQ over the key blocks.  Both recompute
the scores in the same (query-major) orientation as the forward, from the saved row statistics.
Tiles that every row of the block sees whole (below the diagonal, before the length cut) take a
mask-free tile body; the diagonal, length-cut and last partial blocks keep the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from .fused_backward import _bwd_dkdv_kernel, _bwd_dq_kernel
from .fused_forward import _fwd_kernel
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

MAX_NEWTON = 30  # entmax Newton passes at most (typically 3-6)
MAX_SELECT = 80  # top-K counting passes per phase at most (both phases end exactly long before)

# Dot precision for fp32 inputs: "tf32x3" (three tf32 tensor-core products, ~fp32 accurate) or
# "ieee" (exact fp32 FMAs, several times slower). bf16 / fp16 inputs always use the tensor cores.
FP32_PRECISION = "tf32x3"

# entmax start: the first pass keeps each row's R largest tile maxima, PER per key tile, and solves
# tau on them (a subset of the row's z, so a start left of the root). None = (8, 2) for sparsemax,
# whose support is then mostly among them (the start is the root), (8, 1) for alpha < 2 (2 Halley
# passes from there on random scores, 3 from m - 1); R is cut to the tiles' values at short T.
# (1, 1) is the plain start m - 1. Forward at T = 4096: sparsemax 5.52 ms at (8, 2) vs 5.68 at (16, 2),
# 7.51 at (16, 4); biweight 6.06 at (8, 1) vs 6.38 at (16, 1), 6.84 at (8, 2) (h200_s5.log).
ENTMAX_TOP: tuple | None = None
# output passes of the entmax forward at most: rows whose folded last step is too large (or, for
# sparsemax, would move the support) take more passes and another output pass; 1 = accept the fold;
# 0 = no fold (the passes run to the full tolerance, the output pass sums d^n v and, for the
# backward, d^(n-1) v only). None (default) = 3 for sparsemax from T = 1024 on, else 0: the fold
# took sparsemax's forward at T = 4096 from 5.72 to 4.91 ms, but at T = 130 it costs more than the
# pass it saves (0.317 vs 0.233 ms), and for biweight at both (5.28 vs 5.06 ms at T = 4096, 0.358
# vs 0.234 at T = 130: its extra output dot and registers cost more than one Halley pass; h200_s5.log)
ENTMAX_FOLD_ROUNDS: int | None = None
ENTMAX_FOLD_MIN_T = 1024
# top-K threshold from candidates: 0 = the counting search; a power of two C >= 16 (and > K) = after
# the min/max pass, one pass stores the scores above a Gaussian-fit guess t0 (aiming at (K + 1 + C) / 2
# of them) in C slots per row; rows with K + 1 to C candidates find the K-th and (K+1)-th largest
# among them in registers, the others search. None (default) = 64 slots when T >=
# TOPK_CANDIDATES_MIN_T, none for shorter sequences: top16 forward at T = 4096 12.3 ms vs 16.2
# without; at T = 130 0.96 vs 0.44 ms (h200_s4.log, call 2).
TOPK_CANDIDATES: int | None = None
TOPK_CANDIDATES_MIN_T = 1024
# extraction rounds of the candidate pass per key tile: 0 = as many as the tile's busiest row needs
# (a nested loop whose trip count is a reduction over the block); R > 0 = R unrolled rounds, rows with
# more than R candidates in one tile take the search (not yet timed on a GPU: whether the nested loop
# keeps Triton from pipelining the key loop is open; tune_configs.py --rounds=R measures it)
CANDIDATE_ROUNDS = 0
# entmax forward: the start, Newton / Halley and output passes take the key tiles that every row of
# the query block sees whole without a mask (as the backward does). None (default) = from T >=
# FORWARD_MASK_SPLIT_MIN_T on: at T = 4096 epanechnikov forward 5.63 -> 4.84 ms, biweight 6.40 ->
# 5.44, entmax_1.25 6.45 -> 5.21 (with (64, 64) blocks); at T = 130 the split loops cost more than
# the mask (epanechnikov 0.317 ms without, 0.331 with; biweight 0.357, 0.374; h200_s5.log).
# True / False: always / never.
FORWARD_MASK_SPLIT: bool | None = None
FORWARD_MASK_SPLIT_MIN_T = 1024

# Block sizes, overridable (the bench sweeps them): {"fwd": (BM, BN, warps, stages), "bwd": (...)}
CONFIG_OVERRIDE: dict = {}

def _config(kind: str, head_dim: int, interpret: bool, fam: int = -1, cand: int = 0, T: int = 0):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a kernel ("fwd" or "bwd"); cand: the forward's
    candidate slots (``_candidate_slots``); T: the sequence length."""
    if kind in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE[kind]
    if interpret:
        return (32, 32, 1, 1)
    # H200 sweeps (docs/benchmarks/tune_configs.py, B*H=256, T=4096, D=64, bf16; h200_tune.log,
    # h200_s3.log, h200_s4.log)
    if kind == "fwd":
        if head_dim <= 64:
            # top-K searching (no candidates) 16.2 ms at (64, 64, 4, 3) vs 18.7 at (128, 64, 8, 3),
            # 24.3 at (64, 32, 4, 3); with 64 candidate slots 12.3 at (64, 32, 4, 3) vs 14.9 at
            # (64, 64, 4, 3). Every other family is fastest at (64, 32, 4, 3): epanechnikov 11.1 ms
            # vs 13.1 at (128, 32, 4, 3), biweight 7.17 vs 7.91, entmax_1.25 7.43 vs 7.81,
            # norm_relu 2.63 vs 2.86, relumax 3.94 vs 4.52; at T = 130 (the length-generalisation
            # cell) a 128-row block spends as long on its last 2 rows as on the first 128
            # (epanechnikov 0.28 ms vs 0.46)
            if fam in (TOPK_SOFTMAX, TOPK_UNIFORM) and not cand:
                return (64, 64, 4, 3)
            if fam == ENTMAX and _mask_split(T) and T >= 1024:
                # entmax with the mask split, T = 4096: epanechnikov 4.84 ms at (64, 64, 4, 3) vs
                # 5.05 at (64, 32, 4, 3), biweight 5.44 vs 5.81, entmax_1.25 5.21 vs 6.00 (h200_s5.log)
                return (64, 64, 4, 3)
            return (64, 32, 4, 3)
        return (128, 32, 8, 2)
    if head_dim <= 64:
        # fwd+bwd (interior tiles unmasked) biweight 12.33 ms with (64, 64, 4, 3) vs 12.71 with
        # (64, 64, 4, 2), 13.71 with (128, 128, 8, 1); norm_relu 11.31 vs 11.65 (h200_s4.log, call 2)
        return (64, 64, 4, 3)
    return (64, 32, 4, 2)


def _threshold_tols(nint: int, dtype: torch.dtype, fold: bool = True) -> tuple[float, float]:
    """(stop, fold) of the entmax threshold search (each with max(., 1e-6 |m|): scale-free, the
    support of z = a s has unit width).

    A row leaves the Newton / Halley passes once its step is at most ``stop``. Without the fold
    (the default except sparsemax from T = 1024 on) that is where the error left is below the
    inputs' rounding: 1e-3 for fp32 and sparsemax, 1e-2 for Halley on 16-bit inputs (~h^3 left;
    measured at most 7e-5 on tau for alpha = 1.5), 3e-3 for generic-n Newton on 16-bit inputs.
    With the fold, the output pass computes the next step delta and takes it inside the weights
    (``fused_forward``) if |delta| <= ``fold``: Halley (n in {2, 3, 4}) stops at 0.2, after which
    the next step is below 1e-2 (simulated on N(0, 1) scores, T <= 4096), and folds up to 5e-3
    (16-bit; the expansion's errors <= ~1e-4, below their 4e-3 rounding) or 1e-3 (fp32; tau to
    ~1e-9, weights to ~1e-6). Sparsemax's steps are exact support updates: stop 1e-3, and its
    fold is exact (checked against the smallest positive d, not a tolerance).
    """
    if nint >= 2 and not fold:
        return (1e-3 if dtype == torch.float32 else 1e-2), 0.0
    if nint >= 2:
        return 0.2, (1e-3 if dtype == torch.float32 else 5e-3)
    if nint == 1 or dtype == torch.float32:
        return 1e-3, 0.0
    return 3e-3, 0.0


def _entmax_top(nint: int, T: int, block_n: int) -> tuple[int, int]:
    """(R, PER) of the entmax start (ENTMAX_TOP, checked; None: the default), R cut to the number
    of tile maxima a row can have (a short sequence keeps few, and the register solve costs R)."""
    top = ENTMAX_TOP if ENTMAX_TOP is not None else (8, 2 if nint == 1 else 1)
    if (not isinstance(top, tuple) or len(top) != 2 or not all(isinstance(x, int) for x in top)
            or not 1 <= top[1] <= top[0] <= 32):
        raise ValueError(f"fused.ENTMAX_TOP must be None or (R, PER) with 1 <= PER <= R <= 32, got {top!r}")
    R, per = top
    return min(R, triton.next_power_of_2(triton.cdiv(T, block_n) * per)), per


def _mask_split(T: int) -> bool:
    """Whether the entmax forward skips the mask on interior tiles (FORWARD_MASK_SPLIT, checked)."""
    if FORWARD_MASK_SPLIT is None:
        return T >= FORWARD_MASK_SPLIT_MIN_T
    if not isinstance(FORWARD_MASK_SPLIT, bool):
        raise ValueError(f"fused.FORWARD_MASK_SPLIT must be None, True or False, got {FORWARD_MASK_SPLIT!r}")
    return FORWARD_MASK_SPLIT


def _fold_rounds(nint: int, T: int) -> int:
    """ENTMAX_FOLD_ROUNDS, checked: an int in 0..8 (0: no fold); None: the measured default."""
    r = ENTMAX_FOLD_ROUNDS
    if r is None:
        return 3 if nint == 1 and T >= ENTMAX_FOLD_MIN_T else 0
    if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= 8:
        raise ValueError(f"fused.ENTMAX_FOLD_ROUNDS must be an int in 0..8, got {r!r}")
    return r


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def _candidate_slots(fam: int, topk: int, T: int) -> int:
    """The top-K candidate slots per row (TOPK_CANDIDATES; None: the measured default), checked: 0
    or a power of two >= 16 (a tl.arange length); 0 for other families, and when no row could fit
    K + 1 candidates."""
    if fam not in (TOPK_SOFTMAX, TOPK_UNIFORM):
        return 0
    c = TOPK_CANDIDATES
    if c is None:
        c = 64 if T >= TOPK_CANDIDATES_MIN_T else 0
    if not isinstance(c, int) or (c != 0 and (c < 16 or c & (c - 1))):
        raise ValueError(f"fused.TOPK_CANDIDATES must be 0 or a power of two >= 16, got {c!r}")
    return 0 if c < topk + 1 else c


def _candidate_rounds() -> int:
    """CANDIDATE_ROUNDS, checked: an int in 0..16."""
    r = CANDIDATE_ROUNDS
    if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= 16:
        raise ValueError(f"fused.CANDIDATE_ROUNDS must be an int in 0..16, got {r!r}")
    return r


def _saved_outputs(fam: int, save: bool):
    """(o2, of) needed for the backward: o2 = the entmax / relumax second moment, norm_relu's fp32
    output; of = relumax's fp32 output (relumax needs both)."""
    return save and fam in (ENTMAX, RELUMAX, NORM_RELU), save and fam == RELUMAX


def _launch_forward(q, k, v, prm, shift, lengths, save):
    B, H, T, D = q.shape
    DV = v.shape[-1]
    BH = B * H
    interp = _interpreting()
    cand = _candidate_slots(prm["fam"], prm["topk"], T)
    BM, BN, warps, stages = _config("fwd", D, interp, prm["fam"], cand, T)
    o = torch.empty((B, H, T, DV), device=q.device, dtype=v.dtype)
    st = torch.ones((3, BH, T), device=q.device, dtype=torch.float32)
    ist = torch.zeros((BH, T), device=q.device, dtype=torch.int32)
    fam = prm["fam"]
    need_o2, need_of = _saved_outputs(fam, save)
    o2 = torch.empty((BH, T, DV), device=q.device, dtype=torch.float32) if need_o2 else st
    of = torch.empty((BH, T, DV), device=q.device, dtype=torch.float32) if need_of else o2
    lens = lengths if lengths is not None else st
    zc = torch.empty((BH * T, cand), device=q.device, dtype=torch.float32) if cand else st
    prec = FP32_PRECISION if q.dtype == torch.float32 else "tf32"
    topr, topper = _entmax_top(prm["nint"], T, BN) if fam == ENTMAX else (1, 1)
    fold_rounds = _fold_rounds(prm["nint"], T) if fam == ENTMAX else 1
    grid = (triton.cdiv(T, BM), BH)
    _fwd_kernel[grid](
        q, k, v, o, o2, of, st, ist, lens, zc,
        T, H, BH, shift, prm["a_scale"], prm["n_exp"], prm["inv_n"], prm["topk"],
        *_threshold_tols(prm["nint"], q.dtype, fold_rounds > 0),
        MAX_SELECT if fam in (TOPK_SOFTMAX, TOPK_UNIFORM) else MAX_NEWTON,
        D=D, DV=DV, BD=max(16, triton.next_power_of_2(D)), BDV=max(16, triton.next_power_of_2(DV)),
        FAMILY=fam, NINT=prm["nint"], HAS_LENS=lengths is not None, SAVE=need_o2, PREC=prec,
        BLOCK_M=BM, BLOCK_N=BN, CAND=cand, CROUNDS=_candidate_rounds(),
        SPLIT=_mask_split(T), TOPR=topr, TOPPER=topper,
        ROUNDS=max(fold_rounds, 1), FOLD=fold_rounds > 0,
        num_warps=warps, num_stages=stages,
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
    need_o2, need_of = _saved_outputs(FAMILY_CODE[get_method(method).family], save)
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
    """``backend="triton"``: SDPA for 16-bit softmax without lengths, the fused kernels otherwise.

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
    if spec.family == "softmax" and lengths is None and q.dtype != torch.float32:
        # fp32 has no flash / cuDNN SDPA: its memory-efficient kernel (sm80 cutlass) made the fp32
        # ICLL softmax step slower than every sparse method's (h200_s3c.log); the fused online
        # softmax (tf32x3 dots) takes fp32 inputs instead
        return sdpa_softmax(q, k, v, shift)
    with torch.autocast(device_type=q.device.type, enabled=False):
        return fused_attention(q, k, v, spec, shift, lengths)


__all__ = ["triton_attention", "fused_attention", "sdpa_softmax", "CONFIG_OVERRIDE", "FAMILY_CODE"]
