"""Kernel attention: every method of the paper as one function.

    y = kernel_attention(q, k, v, method="biweight", shift=1, lengths=None, backend="auto")

q, k, v: (B, H, T, D). Scores s_ij = q_i . k_j (no extra scaling: callers apply beta).
Admissible keys A_i = { j : j <= i - shift and j < lengths[b] }; weights p_ij are zero outside A_i,
rows with empty A_i return 0, and y_i = sum_j p_ij v_j. See :mod:`.registry` for the methods and
``reference`` for the exact weight formulas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import FAMILIES, PAPER_METHODS, VALID_FORMS, MethodSpec, get_method, is_valid_method

if TYPE_CHECKING:  # torch is imported by the backends; the registry alone stays torch-free
    import torch

BACKENDS = ("auto", "reference", "triton", "adasplash")

__all__ = [
    "BACKENDS",
    "FAMILIES",
    "PAPER_METHODS",
    "VALID_FORMS",
    "MethodSpec",
    "get_method",
    "is_valid_method",
    "kernel_attention",
    "resolve_backend",
]


def _check_inputs(q, k, v, shift, lengths):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"kernel_attention expects q, k of shape (B, H, T, D) and v of shape (B, H, T, Dv); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if shift not in (0, 1) and not (isinstance(shift, int) and shift >= 0):
        raise ValueError(f"shift must be a non-negative int, got {shift!r}")
    if lengths is not None:
        if lengths.dim() != 1 or lengths.shape[0] != q.shape[0]:
            raise ValueError(f"lengths must have shape (B,) = ({q.shape[0]},), got {tuple(lengths.shape)}")


def resolve_backend(spec: MethodSpec, device: torch.device, backend: str = "auto") -> str:
    """The backend that ``kernel_attention`` will use for ``spec`` on ``device``.

    "auto" is "reference" on CPU and the fastest correct fused path on CUDA (the Triton kernels
    when they are importable, else adasplash for the entmax family, else the reference).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "reference"
    try:
        from . import fused  # noqa: F401  (Triton kernels; CUDA only)

        return "triton"
    except ImportError:
        pass
    if spec.family == "entmax":
        return "adasplash"
    return "reference"


def kernel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str | MethodSpec = "softmax",
    *,
    shift: int = 1,
    lengths: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Nadaraya–Watson attention y_i = sum_{j in A_i} p_ij v_j with the method's kernel weights.

    Args:
        q, k: (B, H, T, D) queries and keys; scores are s_ij = q_i . k_j.
        v: (B, H, T, Dv) values.
        method: a method name (see :func:`get_method`) or a :class:`MethodSpec`.
        shift: keys j <= i - shift are admissible (1: Memory Mosaics' look-ahead mask; 0: causal).
        lengths: optional (B,) int tensor of unpadded lengths (right padding); keys j >= lengths[b]
            are not admissible.
        backend: "auto", "reference", "triton" or "adasplash".

    Returns:
        (B, H, T, Dv) tensor in the dtype of v; rows with no admissible key are 0.
    """
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    _check_inputs(q, k, v, shift, lengths)
    chosen = resolve_backend(spec, q.device, backend)
    if chosen == "reference":
        from .reference import reference_attention

        return reference_attention(q, k, v, spec, shift=shift, lengths=lengths)
    if chosen == "triton":
        from .fused import triton_attention

        return triton_attention(q, k, v, spec, shift=shift, lengths=lengths)
    if chosen == "adasplash":
        from .adasplash_backend import adasplash_attention

        return adasplash_attention(q, k, v, spec, shift=shift, lengths=lengths)
    raise AssertionError(chosen)
