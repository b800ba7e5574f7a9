"""The adasplash backend: alpha-entmax attention with adasplash's fused Triton kernel (CUDA only).

    y = adasplash_attention(q, k, v, spec, shift=1, lengths=None)

adasplash 0.2.2's ``adasplash_no_block_mask(q, k, v, alpha, is_causal, varlen, niter)`` computes,
for query row r and keys j <= r (causal includes the diagonal) and j < varlen[b],

    p_rj = [(alpha - 1) sm_scale q_r . k_j - tau_r]_+^(1 / (alpha - 1)),   sm_scale = 1 / sqrt(d),

with tau_r found by ``niter`` Halley/bisection steps (not renormalised). To get our scores
s_ij = q_i . k_j and admissible keys j <= i - shift (SPEC §1.5):

- q is multiplied by sqrt(d), cancelling sm_scale;
- the queries are q[:, :, shift:] followed by ``shift`` dummy zero rows, so kernel row r is
  position i = r + shift and its causal keys j <= r are exactly j <= i - shift; the dummy output
  rows are dropped and ``shift`` zero rows (whose A_i is empty) are put in front;
- ``lengths`` becomes ``varlen`` (a CUDA int32 tensor). Without ``lengths`` and with T not a power
  of two (adasplash requires one then) varlen = T for every sample.

Difference from the reference: adasplash skips kernel rows r >= varlen[b], so query positions
i >= lengths[b] + shift (pure padding queries, outside every loss) are 0 here, while the reference
gives them the (non-empty) A_i = {j < lengths[b]}. All other rows agree to the solver tolerance.

Constraints: CUDA tensors, D in {16, 32, 64, 128, 256} and v of the same head dim as q.
adasplash is imported lazily, so importing this module works on CPU.
"""

from __future__ import annotations

import math

import torch

from .registry import MethodSpec

HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MethodSpec, shift: int) -> None:
    if spec.family != "entmax":
        raise ValueError(
            f"the adasplash backend computes only the entmax family; method {spec.name!r} is "
            f"family {spec.family!r} (use backend 'reference' or 'triton')"
        )
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        raise ValueError(f"the adasplash backend needs CUDA tensors, got q on {q.device}")
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"the adasplash backend supports head dims {HEAD_DIMS}, got q/k head dim {d}")
    if v.shape[-1] != d:
        raise ValueError(f"the adasplash backend needs v's head dim equal to q's ({d}), got {v.shape[-1]}")
    if not (isinstance(shift, int) and 0 <= shift):
        raise ValueError(f"shift must be a non-negative int, got {shift!r}")


def adasplash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MethodSpec,
    shift: int = 1,
    lengths: torch.Tensor | None = None,
    *,
    niter: int = 10,
) -> torch.Tensor:
    """alpha-entmax attention y_i = sum_{j in A_i} p_ij v_j with adasplash (see the module docstring).

    Args:
        q, k, v: (B, H, T, D) CUDA tensors, D in {16, 32, 64, 128, 256}.
        spec: an entmax-family method (epanechnikov, biweight, triweight, entmax_<alpha>).
        shift, lengths: admissible keys j <= i - shift and j < lengths[b].
        niter: threshold solver iterations inside adasplash.

    Returns:
        (B, H, T, D) in v's dtype.
    """
    _check(q, k, v, spec, shift)
    from adasplash import adasplash_no_block_mask  # lazy: Triton/CUDA only

    B, H, T, d = q.shape
    dtype = v.dtype if v.dtype in _DTYPES else torch.float32
    shift = min(shift, T)
    # kernel row r = position r + shift; shift dummy zero rows keep the query count at T
    qs = torch.cat([q[:, :, shift:], q.new_zeros(B, H, shift, d)], dim=2)  # (B, H, T, d)
    qs = (qs.to(dtype) * math.sqrt(d)).contiguous()  # cancels adasplash's sm_scale = 1/sqrt(d)
    ks = k.to(dtype).contiguous()
    vs = v.to(dtype).contiguous()
    if torch.is_grad_enabled() and not qs.requires_grad and (ks.requires_grad or vs.requires_grad):
        qs.requires_grad_()  # adasplash saves what backward needs only when q requires grad

    varlen = None
    if lengths is not None:
        varlen = lengths.to(device=q.device, dtype=torch.int32).clamp(0, T).contiguous()
        if int(varlen.max()) == 0:  # nothing admissible anywhere (adasplash cannot launch a 0 grid)
            return (0.0 * v).to(v.dtype)
    elif T & (T - 1) != 0:  # adasplash needs a power-of-two T without varlen
        varlen = torch.full((B,), T, device=q.device, dtype=torch.int32)

    out = adasplash_no_block_mask(qs, ks, vs, alpha=float(spec.alpha), is_causal=True, varlen=varlen, niter=niter)
    y = torch.cat([out.new_zeros(B, H, shift, d), out[:, :, : T - shift]], dim=2)  # (B, H, T, d)
    return y.to(v.dtype)
