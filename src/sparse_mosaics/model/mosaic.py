"""Memory Mosaics (Zhang et al., 2025) with the sparse kernel attention of Santos et al. (2026).

A Memory Mosaic is a transformer without positional embeddings in which every attention head is a
Nadaraya–Watson kernel regressor over (key, value) pairs it has stored in context:

    y_i = sum_{j <= i-1} p_ij v_j,   p_i. = kernel weights of the method on s_ij = <k_i, k_j>

  - keys k_t    = beta_h * unit(leaky average of W_k x)_t          (queries are the keys)
  - values v_t  = sigma_h * unit((1 - c_h) W_v x_{t+1} + c_h W_v x_t) (one-token look-ahead)
  - persistent memory (the MLP's role): softmax attention of beta_h^2 * unit key over P learned
    (key, value) slots.

Data flow (SPEC.md §2.1): Emb -> n_layer x [x += CtxMem(LN1 x); x += PMem(LN2 x)] -> LN_out ->
logits = Head(x) / sqrt(C), Head tied to Emb. This file follows the eft reference model
(`memory_mosaics_eft.py`, used by the length-generalisation and LM experiments), with an exact
O(T)-memory leaky average (no length limit) and the method's attention from
:func:`sparse_mosaics.attention.kernel_attention` (strictly causal masks for every method,
DESIGN.md §3).

Shapes: B batch, T time, C = n_embd, H = n_head, d = C / H, P = pmem_size, V = vocab_size.

Decisions and deviations from the eft reference (SPEC.md §2.9, §5.2, §6):
  - unit vectors: context keys and values k / (|k| + 1e-6) (eft); persistent-memory keys k / |k|
    with no eps (a 1e-30 floor only turns an exactly-zero vector into 0 instead of NaN);
  - leaky average: exact gradient in lam (the WKV kernel's lam-scaled gradient is a bug), no
    T_MAX; computed on fp32 features, with the unnormalised sum (the running-sum denominator of
    the WKV kernel cancels in the unit normalisation, up to the 1e-6 eps);
  - precision: leaky average, unit normalisation and the whole context memory (scores, weights,
    p @ v) run in fp32 with autocast disabled; Linear layers, the head and the persistent-memory
    SDPA follow autocast (bf16 under torch.autocast, as in the reference);
  - no attention dropout in the context memory (eft defines ic_dropout but never applies it
    there); ic_dropout is the dropout inside the persistent-memory softmax;
  - masks: every method uses the strict look-ahead mask j <= i - v_shift of kernel_attention (the
    eft top-K-uniform / norm_relu / relumax off-by-one of SPEC.md §5.2 item 23 is not reproduced);
    padding enters only through ``lengths`` (right padding) and never changes real positions;
  - loss: the caller passes the loss mask (the data code builds the reference's
    "position >= first <sep> and not <pad>" rule); negative targets are ignored; an all-False mask
    gives loss 0 instead of NaN.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from sparse_mosaics.attention import BACKENDS as ATTENTION_BACKENDS
from sparse_mosaics.attention import get_method, kernel_attention

from .leaky_average import BACKENDS as LEAKY_BACKENDS
from .leaky_average import leaky_average

EXP_SCALE = 10.0     # every beta-type parameter enters as exp(10 * theta) (SPEC.md App. B)
BETA_MAX_EXP = 5.0   # clamp of the exponent (kernel beta, ctx value scale) / of the pmem value scale
EPS_CTX = 1e-6       # eft: unit(k) = k / (|k| + 1e-6) in the context block and for the values


# -----------------------------------------------------------------------------------------------
# config


@dataclass
class MemoryMosaicConfig:
    """Hyper-parameters of :class:`MemoryMosaic` (defaults = the reference constructor's)."""

    vocab_size: int
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    pmem_size: int = 2688           # P, persistent memory slots per head
    pmem_count: int = 1             # number of (M_k, M_v) pairs, outputs averaged
    method: str = "softmax"         # context-memory attention method (attention.get_method)
    ic_dropout: float = 0.05        # dropout inside the persistent-memory softmax (eft: not in ctx)
    hd_dropout: float = 0.05        # residual dropout after each c_proj
    bias: bool = False              # bias in Linear and LayerNorm
    weight_tying: bool = True       # Emb.weight is Head.weight
    pre_ln: bool = True
    v_shift: int = 1                # value look-ahead; the context mask is j <= i - v_shift
    skip_tokens: int = 0            # LM loss ignores the first skip_tokens positions
    attn_only: bool = False         # drop the persistent-memory half of every block
    attention_backend: str = "auto"
    leaky_backend: str = "auto"

    def __post_init__(self):
        # ints / floats are normalised to Python types (numpy scalars from data code are accepted)
        for name, low in (("vocab_size", 1), ("n_layer", 1), ("n_head", 1), ("n_embd", 1), ("pmem_size", 1),
                          ("pmem_count", 1), ("v_shift", 0), ("skip_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                kind = "a positive int" if low == 1 else "a non-negative int"
                raise ValueError(f"MemoryMosaicConfig.{name} must be {kind}, got {value!r}")
            setattr(self, name, int(value))
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"MemoryMosaicConfig.n_embd ({self.n_embd}) must be divisible by "
                             f"n_head ({self.n_head})")
        for name in ("ic_dropout", "hd_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
                raise ValueError(f"MemoryMosaicConfig.{name} must be a float in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        for name in ("bias", "weight_tying", "pre_ln", "attn_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MemoryMosaicConfig.{name} must be a bool, got {getattr(self, name)!r}")
        try:
            get_method(self.method)
        except ValueError as e:
            raise ValueError(f"MemoryMosaicConfig.method: {e}") from None
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"MemoryMosaicConfig.attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention_backend!r}")
        if self.leaky_backend not in LEAKY_BACKENDS:
            raise ValueError(f"MemoryMosaicConfig.leaky_backend must be one of {LEAKY_BACKENDS}, "
                             f"got {self.leaky_backend!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


# -----------------------------------------------------------------------------------------------
# building blocks


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: weight 1, optional bias, eps 1e-5."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (fp64 stays fp64, so the model can be checked in double precision)."""
    return x if x.dtype == torch.float64 else x.float()


def _unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / (|x| + eps) over the last dim. eps=0 means plain x/|x| (a 1e-30 floor avoids 0/0 only)."""
    norm = x.norm(dim=-1, keepdim=True)
    return x / (norm + eps) if eps > 0 else x / norm.clamp_min(1e-30)


def _exp_beta(theta: torch.Tensor) -> torch.Tensor:
    """beta = exp(min(10 theta, 5)), elementwise (H,) -> (1, H, 1, 1)."""
    return torch.exp(torch.clamp(theta * EXP_SCALE, max=BETA_MAX_EXP)).view(1, -1, 1, 1)


class KeyFeaturizer(nn.Module):
    """Unit keys k̂_t = unit( sum_{i<=t} e^{-lam_h (t-i)} W_k x_i ), lam_h = 10 |theta_h|.

    theta ("leaky beta") is initialised to linspace(0.5, 5, H) / 10, i.e. lam in [0.5, 5]: head 0
    averages over the longest past, the last head almost only the current token. The leaky average
    runs in fp32.
    eps is 1e-6 in the context block and 0 in the persistent block (eft, SPEC.md §2.2).
    """

    def __init__(self, config: MemoryMosaicConfig, eps: float):
        super().__init__()
        self.n_head = config.n_head
        self.eps = eps
        self.backend = config.leaky_backend
        self.linear = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.leaky_beta = nn.Parameter(torch.linspace(0.5, 5.0, config.n_head) / EXP_SCALE)

    def forward(self, x):
        B, T, C = x.size()
        k = self.linear(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, d)
        lam = self.leaky_beta.abs() * EXP_SCALE                                          # (H,)
        k = leaky_average(_f32(k), _f32(lam), backend=self.backend)                     # (B, H, T, d) fp32
        return _unit(k, self.eps)


class ValueFeaturizer(nn.Module):
    """Look-ahead values ("lowrlinearconv"), s = v_shift:

        u = W_v x;   v_t = sigma_h * unit((1 - c_h) u_{t+s} + c_h u_t),   u_{t >= T} := 0
        sigma_h = exp(min(10 value_beta_h, 5))

    c_h ~ U(0, 1) at construction (not clamped, not re-initialised); value_beta = -0.05
    (sigma = e^{-0.5}). v_j contains token j+s, hence the context mask j <= i - s.
    """

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        self.n_head = config.n_head
        self.shift = config.v_shift
        self.linear = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.coef = nn.Parameter(torch.empty(config.n_head).uniform_(0.0, 1.0))
        self.value_beta = nn.Parameter(torch.full((config.n_head,), -0.5 / EXP_SCALE))

    def forward(self, x):
        B, T, C = x.size()
        s = self.shift
        u = _f32(self.linear(x)).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, d)
        u_next = torch.cat([u[:, :, s:], u.new_zeros(B, self.n_head, min(s, T), u.size(-1))], dim=2)
        c = _f32(self.coef).view(1, -1, 1, 1)
        v = _unit((1.0 - c) * u_next + c * u, EPS_CTX)                                      # (B, H, T, d)
        return v * _exp_beta(_f32(self.value_beta))


class ContextMemory(nn.Module):
    """In-context associative memory (CtxMem, SPEC.md §2.4).

        k = beta_h k̂,  beta_h = exp(min(10 kernel_beta_h, 5)),  q = k
        y_i = sum_{j <= i - v_shift, j < length} p_ij(method; s_i. = <k_i, k_.>) v_j   (row 0: y = 0)
        out = dropout(c_proj(concat_h y))

    No dropout on the attention weights (eft behaviour).
    """

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        self.method = config.method
        self.spec = get_method(config.method)  # resolved once (a cached lookup per call trips dynamo)
        self.backend = config.attention_backend
        self.shift = config.v_shift
        self.key = KeyFeaturizer(config, eps=EPS_CTX)
        self.value = ValueFeaturizer(config)
        self.kernel_beta = nn.Parameter(torch.full((config.n_head,), 1.0 / EXP_SCALE))
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.hd_dropout)

    def forward(self, x, lengths=None):
        B, T, C = x.size()
        k = self.key(x) * _exp_beta(_f32(self.kernel_beta))              # (B, H, T, d) fp32
        v = self.value(x)                                                 # (B, H, T, d) fp32
        with torch.autocast(device_type=x.device.type, enabled=False):   # kernel regression in fp32
            y = kernel_attention(k, k, v, self.spec, shift=self.shift, lengths=lengths,
                                 backend=self.backend)                    # (B, H, T, d)
        y = y.transpose(1, 2).reshape(B, T, C).to(x.dtype)                # heads side by side
        return self.resid_dropout(self.c_proj(y))


def _fold_factor(B: int, H: int, min_pairs: int = 256) -> int:
    """The largest divisor g of B with (B / g) * H >= min_pairs (1 when B * H is below it)."""
    for g in range(B, 0, -1):
        if B % g == 0 and (B // g) * H >= min_pairs:
            return g
    return 1


class PersistentMemory(nn.Module):
    """Persistent associative memory (PMem, SPEC.md §2.5), the MLP's counterpart.

        q = beta_h^2 k̂ (own key featuriser, no eps; beta_h = exp(min(10 kernel_beta_h, 5)))
        y = mean_m softmax(q M_k^(m)T) M_v^(m)          (dense softmax over P slots, scale 1,
                                                         dropout ic_dropout on the weights)
        out = dropout(c_proj(concat_h min(exp(10 value_beta_h), 5) y))

    M_k, M_v in R^{1 x H x P x d} ~ N(0, 1/sqrt(d)), kept by the model init.
    Every position (including 0) gets an output; the method does not apply here.
    """

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        H, P, d = config.n_head, config.pmem_size, config.head_size
        self.n_head = H
        self.ic_dropout = config.ic_dropout
        self.key = KeyFeaturizer(config, eps=0.0)
        self.kernel_beta = nn.Parameter(torch.full((H,), 1.0 / EXP_SCALE))
        self.value_beta = nn.Parameter(torch.full((H,), -0.5 / EXP_SCALE))
        self.M_k = nn.ParameterList()
        self.M_v = nn.ParameterList()
        for _ in range(config.pmem_count):
            self.M_k.append(nn.Parameter(torch.randn(1, H, P, d) / math.sqrt(d)))
            self.M_v.append(nn.Parameter(torch.randn(1, H, P, d) / math.sqrt(d)))
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.hd_dropout)

    def forward(self, x):
        B, T, C = x.size()
        q = self.key(x) * _exp_beta(_f32(self.kernel_beta)) ** 2         # (B, H, T, d) fp32
        # The slots are shared by every position, so g samples fold into the query axis: a
        # (B/g, H, g*T, d) x (B/g, H, P, d) attention (same function). Folding shrinks the
        # expanded dM_k, dM_v that SDPA's backward writes before summing over the batch, by g;
        # g stops at B*H/g >= 256 (batch, head) pairs, which the backward kernels parallelise over.
        H, d = self.n_head, q.size(-1)
        g = _fold_factor(B, H)
        q = q.to(x.dtype).reshape(B // g, g, H, T, d).transpose(1, 2).reshape(B // g, H, g * T, d)
        p = self.ic_dropout if self.training else 0.0
        y = 0
        for M_k, M_v in zip(self.M_k, self.M_v):
            y = y + F.scaled_dot_product_attention(
                q, M_k.to(q.dtype).expand(B // g, -1, -1, -1), M_v.to(q.dtype).expand(B // g, -1, -1, -1),
                dropout_p=p, scale=1.0)                                   # (B/g, H, g*T, d)
        y = (y / len(self.M_k)).view(B // g, H, g, T, d).transpose(1, 2).reshape(B, H, T, d)
        scale = torch.clamp(torch.exp(self.value_beta * EXP_SCALE), max=BETA_MAX_EXP).view(1, -1, 1, 1)
        y = (y * scale.to(y.dtype)).transpose(1, 2).reshape(B, T, C).to(x.dtype)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    """pre-LN: x += CtxMem(LN1 x); x += PMem(LN2 x).  post-LN: x = LN1 x; x += CtxMem(x); x = LN2 x;
    x += PMem(x). attn_only drops the PMem half."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        self.pre_ln = config.pre_ln
        self.ln1 = LayerNorm(config.n_embd, bias=config.bias)
        self.ctx = ContextMemory(config)
        self.attn_only = config.attn_only
        if not self.attn_only:
            self.ln2 = LayerNorm(config.n_embd, bias=config.bias)
            self.pmem = PersistentMemory(config)

    def forward(self, x, lengths=None):
        if self.pre_ln:
            x = x + self.ctx(self.ln1(x), lengths=lengths)
            if not self.attn_only:
                x = x + self.pmem(self.ln2(x))
        else:
            x = self.ln1(x)
            x = x + self.ctx(x, lengths=lengths)
            if not self.attn_only:
                x = self.ln2(x)
                x = x + self.pmem(x)
        return x


# -----------------------------------------------------------------------------------------------
# the model


class MemoryMosaic(nn.Module):
    """Token embedding (no positional embedding) -> blocks -> LN -> tied head, logits / sqrt(C)."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        self.config = config
        # registration order = init order (SPEC.md §2.7): emb, blocks, ln_out, head
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_out = LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.weight_tying:
            self.emb.weight = self.head.weight
        self._init_parameters()

    # --- init and optimizer ------------------------------------------------------------------

    @staticmethod
    def _init_weights(module):
        """Linear: N(0, 1/sqrt(fan_in)), bias 0; Embedding: N(0, 1). Other parameters keep theirs."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(module.weight.shape[1]))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)

    def _init_parameters(self):
        """SPEC.md §2.7. ``apply`` visits emb before head, so the tied matrix ends N(0, 1/sqrt(C));
        then every c_proj is re-drawn N(0, 1/sqrt(fan_in)/sqrt(n_layer))."""
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                std = 1.0 / math.sqrt(p.shape[1]) / math.sqrt(self.config.n_layer)
                nn.init.normal_(p, mean=0.0, std=std)

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied matrix counted once)."""
        return sum(p.numel() for p in self.parameters())

    def optimizer_groups(self):
        """(decay names, no-decay names): decay iff p.dim() >= 2 (SPEC.md §2.8)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 else no_decay).append(name)
        return decay, no_decay

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on every >= 2-D parameter (embedding/head, Linear weights,
        c_proj, persistent memories) and none on LayerNorm, biases and the per-head scalars."""
        params = dict(self.named_parameters())
        decay, no_decay = self.optimizer_groups()
        groups = [
            {"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), **extra)

    # --- forward -----------------------------------------------------------------------------

    def forward(self, idx, targets=None, loss_mask=None, lengths=None):
        """
        Args:
            idx: (B, T) token ids.
            targets: optional (B, T) next-token ids; negative ids are ignored.
            loss_mask: optional (B, T) bool; the loss is the mean CE over its True positions.
                Without it, over positions >= skip_tokens.
            lengths: optional (B,) unpadded lengths (right padding): keys j >= lengths[b] are not
                admissible in the context memory. Causality already keeps real positions
                independent of the padding; this only changes pad-position outputs.

        Returns:
            logits (B, T, V), and the loss (scalar fp32) or None.
        """
        if idx.dim() != 2:
            raise ValueError(f"MemoryMosaic.forward expects idx of shape (B, T), got {tuple(idx.shape)}")
        x = self.emb(idx)                                          # (B, T, C)
        for block in self.blocks:
            x = block(x, lengths=lengths)
        x = self.ln_out(x)
        logits = self.head(x) / math.sqrt(self.config.n_embd)      # (B, T, V)
        if targets is None:
            return logits, None
        return logits, self.loss(logits, targets, loss_mask)

    def loss(self, logits, targets, loss_mask=None):
        """sum_t CE_t * m_t / sum_t m_t, m = loss_mask (or position >= skip_tokens) and target >= 0.
        An all-zero mask gives loss 0 (no NaN)."""
        B, T, V = logits.shape
        ce = F.cross_entropy(_f32(logits).reshape(B * T, V), targets.clamp_min(0).reshape(B * T),
                             reduction="none").view(B, T)          # (B, T)
        if loss_mask is not None:
            if loss_mask.shape != (B, T):
                raise ValueError(f"loss_mask must have shape {(B, T)}, got {tuple(loss_mask.shape)}")
            mask = loss_mask.bool()
        else:
            mask = torch.arange(T, device=logits.device)[None, :] >= self.config.skip_tokens
        mask = (mask & (targets >= 0)).to(ce.dtype)
        return (ce * mask).sum() / mask.sum().clamp_min(1.0)
