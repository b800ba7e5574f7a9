"""Leaky average as a chunked Triton scan (forward and exact backward), any length T.

    y_t = sum_{i <= t} exp(-lam_h (t - i)) x_i        x: (B, H, T, d), lam: (H,) > 0

Same function as ``leaky_average.leaky_average_reference`` (SPEC.md §2.11, without the reference
CUDA kernel's T_MAX limit and without its lam-gradient quirk: the gradient here is exact).

One program owns one (b, h) and BLOCK_D channels and walks over T in chunks of BLOCK_T positions,
carrying the state S = y at the end of the previous chunk (fp32):

    y[c + tau] = sum_{i <= tau} L[tau, i] x[c + i] + exp(-lam (tau + 1)) S,   L[tau, i] = exp(-lam (tau - i))

(the in-chunk part is one BLOCK_T x BLOCK_T decay-matrix product, exact "ieee" fp32).

Backward, with g = dL/dy:
    dL/dx_i = sum_{t >= i} exp(-lam (t - i)) g_t             (the same scan run backwards in time)
    dL/dlam = - sum_t g_t . z_t,  z_t = sum_{i <= t} (t - i) exp(-lam (t - i)) x_i
z is scanned forward with the pair (y, z) as state: for t = c + tau past the previous chunk end,
    z_t = [in-chunk part with weights (tau - i) L[tau, i]] + exp(-lam (tau + 1)) (z_{c-1} + (tau + 1) y_{c-1}).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_T = 32


@triton.jit
def _leaky_fwd_kernel(X, Y, LAM, T, H, d, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    pid_d = tl.program_id(1)
    h = bh % H
    lam = tl.load(LAM + h).to(tl.float32)
    base = bh.to(tl.int64) * T * d
    t = tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dist = (t[:, None] - t[None, :]).to(tl.float32)                       # (BT, BT): tau - i
    L = tl.where(dist >= 0, tl.exp(-lam * tl.maximum(dist, 0.0)), 0.0)
    carry = tl.exp(-lam * (t + 1).to(tl.float32))                         # (BT,)
    state = tl.zeros([BLOCK_D], tl.float32)
    for c in range(0, T, BLOCK_T):
        rows = c + t
        msk = (rows[:, None] < T) & (offs_d[None, :] < d)
        ptr = base + rows[:, None] * d + offs_d[None, :]
        x = tl.load(X + ptr, mask=msk, other=0.0).to(tl.float32)           # (BT, BD)
        y = tl.dot(L, x, input_precision="ieee") + carry[:, None] * state[None, :]
        tl.store(Y + ptr, y.to(Y.dtype.element_ty), mask=msk)
        state = tl.sum(tl.where(t[:, None] == BLOCK_T - 1, y, 0.0), 0)


@triton.jit
def _leaky_bwd_kernel(X, G, GX, GLAM, LAM, T, H, d, n_dblocks,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    pid_d = tl.program_id(1)
    h = bh % H
    lam = tl.load(LAM + h).to(tl.float32)
    base = bh.to(tl.int64) * T * d
    t = tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dist = (t[:, None] - t[None, :]).to(tl.float32)
    L = tl.where(dist >= 0, tl.exp(-lam * tl.maximum(dist, 0.0)), 0.0)   # L[tau, i]
    LD = L * dist                                                         # (tau - i) L[tau, i]
    tp1 = (t + 1).to(tl.float32)
    carry = tl.exp(-lam * tp1)
    # forward in time: (y, z) states, dL/dlam = -sum g . z
    sy = tl.zeros([BLOCK_D], tl.float32)
    sz = tl.zeros([BLOCK_D], tl.float32)
    glam = tl.zeros([BLOCK_D], tl.float32)
    for c in range(0, T, BLOCK_T):
        rows = c + t
        msk = (rows[:, None] < T) & (offs_d[None, :] < d)
        ptr = base + rows[:, None] * d + offs_d[None, :]
        x = tl.load(X + ptr, mask=msk, other=0.0).to(tl.float32)
        g = tl.load(G + ptr, mask=msk, other=0.0).to(tl.float32)
        y = tl.dot(L, x, input_precision="ieee") + carry[:, None] * sy[None, :]
        z = tl.dot(LD, x, input_precision="ieee") + carry[:, None] * (sz[None, :] + tp1[:, None] * sy[None, :])
        glam += tl.sum(g * z, 0)
        last = t[:, None] == BLOCK_T - 1
        sy = tl.sum(tl.where(last, y, 0.0), 0)
        sz = tl.sum(tl.where(last, z, 0.0), 0)
    tl.store(GLAM + bh * n_dblocks + pid_d, -tl.sum(glam, 0))
    # backward in time: gx_i = sum_{t >= i} e^{-lam (t - i)} g_t
    LT = tl.trans(L)                                                      # LT[i, tau] = L[tau, i]
    rcarry = tl.exp(-lam * (BLOCK_T - t).to(tl.float32))                  # distance to next chunk start
    sg = tl.zeros([BLOCK_D], tl.float32)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for cc in range(0, n_chunks):
        c = (n_chunks - 1 - cc) * BLOCK_T
        rows = c + t
        msk = (rows[:, None] < T) & (offs_d[None, :] < d)
        ptr = base + rows[:, None] * d + offs_d[None, :]
        g = tl.load(G + ptr, mask=msk, other=0.0).to(tl.float32)
        gx = tl.dot(LT, g, input_precision="ieee") + rcarry[:, None] * sg[None, :]
        tl.store(GX + ptr, gx.to(GX.dtype.element_ty), mask=msk)
        sg = tl.sum(tl.where(t[:, None] == 0, gx, 0.0), 0)


def _block_d(d: int) -> int:
    return max(16, min(32, triton.next_power_of_2(d)))


def _warps() -> int:
    return 1 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 4


class _LeakyAverage(torch.autograd.Function):
    """Eager autograd wrapper (a custom op's dispatch costs CPU time on every call)."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.save_for_backward(x, lam)
        return _leaky_fwd_impl(x, lam)

    @staticmethod
    def backward(ctx, g):
        x, lam = ctx.saved_tensors
        return _leaky_bwd_impl(x, lam, g)


def _leaky_fwd_impl(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    B, H, T, d = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    bd = _block_d(d)
    if T > 0:
        _leaky_fwd_kernel[(B * H, triton.cdiv(d, bd))](x, y, lam.contiguous(), T, H, d, BLOCK_T=BLOCK_T,
                                                      BLOCK_D=bd, num_warps=_warps())
    return y


# Under torch.compile the kernels are torch.library custom ops instead: opaque nodes of one graph
# (no graph break, CUDA-graph capturable), the backward op reached through register_autograd.
@torch.library.custom_op("sparse_mosaics::leaky_average_fwd", mutates_args=())
def _leaky_fwd(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return _leaky_fwd_impl(x, lam)


@_leaky_fwd.register_fake
def _(x, lam):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous, as the kernel writes it


def _leaky_bwd_impl(x: torch.Tensor, lam: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, d = x.shape
    x, g = x.contiguous(), g.contiguous()
    bd = _block_d(d)
    nd = triton.cdiv(d, bd)
    gx = torch.empty_like(x)
    glam = torch.zeros((B * H, nd), device=x.device, dtype=torch.float32)
    if T > 0:
        _leaky_bwd_kernel[(B * H, nd)](x, g, gx, glam, lam.contiguous(), T, H, d, nd, BLOCK_T=BLOCK_T,
                                      BLOCK_D=bd, num_warps=_warps())
    else:
        gx.zero_()
    return gx, glam.view(B, H, nd).sum(dim=(0, 2))


@torch.library.custom_op("sparse_mosaics::leaky_average_bwd", mutates_args=())
def _leaky_bwd(x: torch.Tensor, lam: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _leaky_bwd_impl(x, lam, g)


@_leaky_bwd.register_fake
def _(x, lam, g):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype), lam.new_empty(lam.shape, dtype=torch.float32)


def _leaky_setup(ctx, inputs, output):
    x, lam = inputs
    ctx.save_for_backward(x, lam)


def _leaky_backward(ctx, g):
    x, lam = ctx.saved_tensors
    gx, glam = torch.ops.sparse_mosaics.leaky_average_bwd(x, lam, g)
    return gx, glam


torch.library.register_autograd("sparse_mosaics::leaky_average_fwd", _leaky_backward, setup_context=_leaky_setup)


def leaky_average_triton(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{i <= t} exp(-lam_h (t - i)) x_i per head (Triton scan, fp32 inside).

    Args:
        x: (B, H, T, d) bf16 / fp16 / fp32 features.
        lam: (H,) positive decay (gradients flow to it, exactly).

    Returns:
        (B, H, T, d) in x.dtype.
    """
    if x.dim() != 4 or lam.dim() != 1 or lam.shape[0] != x.shape[1]:
        raise ValueError(f"leaky_average_triton expects x (B, H, T, d) and lam (H,), got "
                         f"{tuple(x.shape)} and {tuple(lam.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        lam_f = lam.float()  # fp32 decay inside; its gradient comes back in lam's dtype
        if not torch.compiler.is_compiling():
            return _LeakyAverage.apply(x, lam_f)
        return torch.ops.sparse_mosaics.leaky_average_fwd(x, lam_f)


__all__ = ["leaky_average_triton"]
