"""Tile-level Triton helpers shared by the fused attention kernels (see ``fused`` for the design).

A tile is the (BLOCK_M, BLOCK_N) block of scores of BLOCK_M query rows against BLOCK_N keys; the
helpers load rows, compute a score tile and evaluate the entmax powers d^n, d^(n-1), d^(n-2) with
multiplications when n = 1/(alpha - 1) is a small integer.
"""

import triton
import triton.language as tl


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


@triton.jit
def _entmax_step(f, f1, f2, n_exp, inv_n, NINT: tl.constexpr):
    """The threshold step from f = sum d^n, f1 = sum d^(n-1), f2 = sum d^(n-2), d = [z - tau]_+.

    Newton on the convex, decreasing g(tau) = f^(1/n) - 1: step = (f - f^(1 - 1/n)) / f1. For
    n in {2, 3, 4} Halley's correction step / (1 - r), r = g g'' / (2 g'^2)
    = (n - 1)(u - 1)(f f2 - f1^2) / (2 u f1^2) with u = f^(1/n), taken left of the root (u > 1)
    where r < 0.9. Rows with f1 = 0 get a meaningless step: the caller masks them.
    """
    f_safe = tl.where(f > 0, f, 1.0)
    f1_safe = tl.where(f1 > 0, f1, 1.0)
    step = _root_excess(f_safe, inv_n, NINT) / f1_safe
    if NINT >= 2:
        u = _root_n(f_safe, NINT)
        r = (n_exp - 1.0) * (u - 1.0) * (f_safe * f2 - f1_safe * f1_safe) / (2.0 * u * f1_safe * f1_safe)
        step = tl.where((u > 1.0) & (r < 0.9), step / (1.0 - r), step)
    return step


@triton.jit
def _upper_normal_quantile(p):
    """z with P(Z > z) = p for a standard normal Z, 0 < p <= 1/2 (Abramowitz & Stegun 26.2.23,
    |error| < 4.5e-4): t = sqrt(-2 ln p), z = t - (c0 + c1 t + c2 t^2) / (1 + d1 t + d2 t^2 + d3 t^3)."""
    t = tl.sqrt(-2.0 * tl.log(p))
    return t - (2.515517 + t * (0.802853 + t * 0.010328)) / (1.0 + t * (1.432788 + t * (0.189269 + t * 0.001308)))
