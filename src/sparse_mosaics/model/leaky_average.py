"""Leaky (exponential) averaging of key features along time, per head.

    y_t = sum_{i <= t} exp(-lam_h (t - i)) x_i                     (unnormalised)

This is the only place where Memory Mosaics see token order (there is no positional embedding).
The reference code normalises by the running sum of the weights (eft, WKV kernel) or multiplies by
(1 - e^{-lam}) (non-eft); both are per-(t, head) scalars and the callers L2-normalise each head's
vector right after, so the factor cancels and we return the plain weighted sum (SPEC.md §2.2).

Backends:
  - "reference": exact, any length, O(T) memory, pure PyTorch, gradients by autograd (exact in x
    and lam; the reference CUDA kernel's lam-gradient scaling is a bug we do not reproduce,
    SPEC.md §2.11 and §6.6). Chunked: inside a chunk of C positions a C x C decay matrix per head,
    across chunks the chunk-end states are themselves leaky-averaged with decay lam * C (the same
    function, called recursively on a C times shorter sequence).
  - "triton": ``leaky_average_triton.leaky_average_triton`` (CUDA; written separately).
  - "auto": "triton" on CUDA when it imports, else "reference".

``leaky_average_dense`` materialises the T x T matrix: a test oracle only.
"""

from __future__ import annotations


import torch

BACKENDS = ("auto", "reference", "triton")
CHUNK = 64


def _check(x: torch.Tensor, lam: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"leaky_average expects x of shape (B, H, T, d), got {tuple(x.shape)}")
    if lam.dim() != 1 or lam.shape[0] != x.shape[1]:
        raise ValueError(f"leaky_average expects lam of shape (H,) = ({x.shape[1]},), got {tuple(lam.shape)}")


def _decay_matrix(lam: torch.Tensor, n: int) -> torch.Tensor:
    """L[h, t, i] = exp(-lam_h (t - i)) for i <= t, else 0.  Shape (H, n, n), dtype of lam."""
    pos = torch.arange(n, device=lam.device, dtype=lam.dtype)
    dist = pos[:, None] - pos[None, :]                                   # (n, n), t - i
    causal = dist >= 0
    # exponent is clamped to <= 0 before exp, so nothing overflows and the masked half has grad 0
    w = torch.exp(-lam[:, None, None] * dist.clamp_min(0)[None])         # (H, n, n)
    return w * causal


def _apply_per_head(L: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    """y[b, h, n] = L[h] @ xc[b, h, n] for L (H, C, C), xc (B, H, N, C, d).

    One (H)-batched matmul on (H, C, B*N*d), so that autograd's gradient for L is (H, C, C) and
    never a broadcast (B, H, N, C, C) tensor: memory stays O(T d).
    """
    B, H, N, C, d = xc.shape
    X = xc.permute(1, 3, 0, 2, 4).reshape(H, C, B * N * d)              # (H, C, B*N*d)
    Y = torch.bmm(L, X)                                                  # (H, C, B*N*d)
    return Y.view(H, C, B, N, d).permute(2, 0, 3, 1, 4)                  # (B, H, N, C, d)


def _leaky_average_chunked(x: torch.Tensor, lam: torch.Tensor, chunk: int) -> torch.Tensor:
    """Exact chunked scan. x (B, H, T, d) fp32, lam (H,) fp32 -> (B, H, T, d)."""
    B, H, T, d = x.shape
    if T <= chunk:
        return _apply_per_head(_decay_matrix(lam, T), x[:, :, None])[:, :, 0]
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    if pad:  # zeros at the end: causal, so earlier outputs are unchanged
        x = torch.cat([x, x.new_zeros(B, H, pad, d)], dim=2)
    xc = x.view(B, H, n_chunks, chunk, d)                                # (B, H, N, C, d)
    L = _decay_matrix(lam, chunk)                                        # (H, C, C)
    y = _apply_per_head(L, xc)                                           # (B, H, N, C, d) within-chunk sums
    # state at the end of chunk n: S_n = sum_{m <= n} e^{-lam C (n - m)} s_m, s_m = y[:, :, m, C-1]
    s = y[:, :, :, -1, :]                                                # (B, H, N, d)
    S = _leaky_average_chunked(s, lam * chunk, chunk)                    # (B, H, N, d)
    S_prev = torch.cat([S.new_zeros(B, H, 1, d), S[:, :, :-1]], dim=2)   # state entering chunk n
    t = torch.arange(1, chunk + 1, device=x.device, dtype=x.dtype)
    carry = torch.exp(-lam[:, None] * t[None])                           # (H, C): e^{-lam (t+1)}
    y = y + carry[None, :, None, :, None] * S_prev[:, :, :, None, :]     # (B, H, N, C, d)
    return y.reshape(B, H, n_chunks * chunk, d)[:, :, :T]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when the input is fp64 (so gradcheck-style tests are exact)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def leaky_average_reference(x: torch.Tensor, lam: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Exact leaky average in PyTorch (fp32 inside, any T, O(T) memory). Returns x.dtype."""
    _check(x, lam)
    dt = _compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        y = _leaky_average_chunked(x.to(dt), lam.to(dt), chunk)
    return y.to(x.dtype)


def leaky_average_dense(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """T x T oracle (tests only): y = L @ x with L[h, t, i] = exp(-lam_h (t - i)) [i <= t]."""
    _check(x, lam)
    with torch.autocast(device_type=x.device.type, enabled=False):
        dt = _compute_dtype(x)
        y = _decay_matrix(lam.to(dt), x.shape[2])[None] @ x.to(dt)
    return y.to(x.dtype)


_TRITON_FN: list = []  # [the Triton scan or None], filled on first use


def _triton_fn():
    """The Triton scan, or None when it cannot be imported (looked up once per process; a plain
    memo rather than lru_cache, which torch.compile warns about)."""
    if not _TRITON_FN:
        try:
            from .leaky_average_triton import leaky_average_triton
        except Exception:  # ImportError, or a Triton/driver error while importing
            leaky_average_triton = None
        _TRITON_FN.append(leaky_average_triton)
    return _TRITON_FN[0]


def resolve_leaky_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend :func:`leaky_average` uses on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown leaky-average backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and _triton_fn() is not None:
        return "triton"
    return "reference"


def leaky_average(x: torch.Tensor, lam: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y_t = sum_{i <= t} exp(-lam_h (t - i)) x_i per head.

    Args:
        x: (B, H, T, d) features.
        lam: (H,) positive decay per head (a parameter-derived tensor; gradients flow to it).
        backend: "auto", "reference" or "triton".

    Returns:
        (B, H, T, d), unnormalised, in x.dtype (computed in fp32).
    """
    chosen = resolve_leaky_backend(x.device, backend)
    if chosen == "triton":
        fn = _triton_fn()
        if fn is None:
            raise ValueError("leaky_average backend 'triton' requested but model/leaky_average_triton.py "
                             "could not be imported")
        _check(x, lam)
        return fn(x, lam)
    return leaky_average_reference(x, lam)
