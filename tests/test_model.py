"""Tests for sparse_mosaics.model: leaky average, Memory Mosaic structure, init, losses, causality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_mosaics.attention import PAPER_METHODS, get_method
from sparse_mosaics.model import MemoryMosaic, MemoryMosaicConfig, leaky_average, leaky_average_dense
from sparse_mosaics.model.leaky_average import leaky_average_reference, resolve_leaky_backend

V = 36


def tiny(method="softmax", **kw):
    cfg = dict(vocab_size=V, n_layer=2, n_embd=32, n_head=4, pmem_size=16, method=method,
               attention_backend="reference", leaky_backend="reference")
    cfg.update(kw)
    return MemoryMosaicConfig(**cfg)


def build(method="softmax", seed=0, **kw):
    torch.manual_seed(seed)
    return MemoryMosaic(tiny(method, **kw))


# ----------------------------------------------------------------------------------------------
# leaky average


@pytest.mark.parametrize("T, chunk", [(1, 64), (2, 64), (17, 64), (63, 64), (64, 64), (65, 64), (128, 64),
                                      (200, 64), (70, 4), (64, 4), (17, 4)])
def test_leaky_average_matches_dense_oracle(T, chunk):
    """chunk=4 exercises the recursion over chunk states (several levels) at small T."""
    torch.manual_seed(T)
    x = torch.randn(2, 3, T, 5, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.02, 0.7, 5.0], dtype=torch.float64, requires_grad=True)
    y = leaky_average_reference(x, lam, chunk=chunk)
    y_dense = leaky_average_dense(x, lam)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_dense, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    gx, glam = torch.autograd.grad((y * g).sum(), (x, lam))
    gx_d, glam_d = torch.autograd.grad((y_dense * g).sum(), (x, lam))
    torch.testing.assert_close(gx, gx_d, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(glam, glam_d, rtol=1e-9, atol=1e-8)


def test_leaky_average_fp32_and_formula():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 150, 3)
    lam = torch.tensor([0.5, 2.0])
    y = leaky_average(x, lam)
    # explicit formula at a few positions
    for t in (0, 1, 64, 149):
        w = torch.exp(-lam[:, None] * (t - torch.arange(t + 1.0))[None])     # (H, t+1)
        expect = (w[None, :, :, None] * x[:, :, : t + 1]).sum(2)
        torch.testing.assert_close(y[:, :, t], expect, rtol=1e-5, atol=1e-5)
    # bf16 input: computed in fp32, returned in bf16
    yb = leaky_average(x.bfloat16(), lam)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), leaky_average(x.bfloat16().float(), lam), rtol=1e-2, atol=1e-2)


def test_leaky_average_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 21, 2, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.3, 1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: leaky_average_reference(a, b, chunk=4), (x, lam))
    assert torch.equal(leaky_average(x, lam), leaky_average_reference(x, lam))


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any op."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_leaky_average_long_sequence_linear_memory():
    T, H, d = 10_000, 2, 4
    torch.manual_seed(2)
    x = torch.randn(1, H, T, d, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.001, 0.3], dtype=torch.float64, requires_grad=True)
    with _MaxNumel() as probe:
        y = leaky_average(x, lam)
        y.square().sum().backward()
    assert probe.max_numel <= 4 * x.numel()   # O(T d): no T x T (1e8) or T x chunk tensor anywhere
    assert torch.isfinite(x.grad).all() and torch.isfinite(lam.grad).all()
    # against the first-order recurrence h_t = e^{-lam} h_{t-1} + x_t
    decay = torch.exp(-lam.detach())[None, :, None]
    h = torch.zeros(1, H, d, dtype=torch.float64)
    xs = x.detach()
    for t in range(T):
        h = decay * h + xs[:, :, t]
        if t in (0, 63, 64, 4095, 4096, T - 1):
            torch.testing.assert_close(y[:, :, t].detach(), h, rtol=1e-9, atol=1e-9)


def test_leaky_average_backend_selection():
    assert resolve_leaky_backend(torch.device("cpu"), "auto") == "reference"
    with pytest.raises(ValueError, match="leaky-average backend"):
        leaky_average(torch.zeros(1, 1, 2, 2), torch.ones(1), backend="nope")
    with pytest.raises(ValueError, match="shape"):
        leaky_average(torch.zeros(1, 2, 3, 2), torch.ones(3))


# ----------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(method="top16"), "method"),
        (dict(n_layer=0), "n_layer"),
        (dict(pmem_size=-1), "pmem_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(ic_dropout=1.5), "ic_dropout"),
        (dict(attention_backend="cuda"), "attention_backend"),
        (dict(leaky_backend="x"), "leaky_backend"),
        (dict(v_shift=-1), "v_shift"),
    ],
)
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kw)


# ----------------------------------------------------------------------------------------------
# parameter counts (SPEC.md §2.14), on the meta device


@pytest.mark.parametrize(
    "V_, L, C, H, P, expected",
    [
        (36, 2, 512, 8, 2688, 8_147_568),
        (263, 2, 512, 8, 2688, 8_263_792),
        (20, 2, 128, 8, 448, 396_528),
        (50304, 12, 768, 12, 2688, 123_588_336),
    ],
)
def test_parameter_count(V_, L, C, H, P, expected):
    cfg = MemoryMosaicConfig(vocab_size=V_, n_layer=L, n_embd=C, n_head=H, pmem_size=P)
    with torch.device("meta"):
        model = MemoryMosaic(cfg)
    assert model.num_parameters() == expected
    # closed form (pmem_count=1, no bias): V C + L (5 C^2 + 2 H P d + 2 C + 7 H) + C, where 5 C^2 are the
    # ctx key/value/c_proj and pmem key/c_proj weights, 2 C the two LayerNorms, 7 H the per-head scalars
    d = C // H
    per_block = 5 * C * C + 2 * H * P * d + 2 * C + 7 * H
    assert expected == V_ * C + L * per_block + C


def test_attn_only_and_untied_structure():
    m = build(attn_only=True)
    names = [n for n, _ in m.named_parameters()]
    assert not any(".pmem." in n for n in names)
    m2 = build(weight_tying=False)
    assert m2.emb.weight is not m2.head.weight
    assert m2.num_parameters() == build().num_parameters() + V * 32


# ----------------------------------------------------------------------------------------------
# init (SPEC.md §2.7)


def test_init_statistics():
    torch.manual_seed(0)
    C, H, L = 256, 8, 4
    m = MemoryMosaic(MemoryMosaicConfig(vocab_size=512, n_layer=L, n_embd=C, n_head=H, pmem_size=64))
    assert m.emb.weight is m.head.weight
    assert abs(m.head.weight.std().item() * math.sqrt(C) - 1) < 0.02
    assert abs(m.head.weight.mean().item()) < 0.01 / math.sqrt(C) * 10
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() * math.sqrt(C) * math.sqrt(L) - 1) < 0.03, name
        elif name.endswith("linear.weight"):
            assert abs(p.std().item() * math.sqrt(C) - 1) < 0.03, name
    b = m.blocks[1]
    d = C // H
    for M in (*b.pmem.M_k, *b.pmem.M_v):
        assert M.shape == (1, H, 64, d)
        assert abs(M.std().item() * math.sqrt(d) - 1) < 0.05
    torch.testing.assert_close(b.ctx.key.leaky_beta.data, torch.linspace(0.5, 5, H) / 10)
    torch.testing.assert_close(b.pmem.key.leaky_beta.data, torch.linspace(0.5, 5, H) / 10)
    for beta in (b.ctx.kernel_beta, b.pmem.kernel_beta):
        torch.testing.assert_close(beta.data, torch.full((H,), 0.1))
    for beta in (b.ctx.value.value_beta, b.pmem.value_beta):
        torch.testing.assert_close(beta.data, torch.full((H,), -0.05))
    coef = b.ctx.value.coef.data
    assert ((coef >= 0) & (coef <= 1)).all() and coef.std() > 0
    assert (b.ln1.weight == 1).all() and b.ln1.bias is None


def test_untied_init_and_seed_determinism():
    torch.manual_seed(0)
    m = MemoryMosaic(MemoryMosaicConfig(vocab_size=400, n_layer=1, n_embd=128, n_head=4, pmem_size=8,
                                        weight_tying=False))
    assert abs(m.emb.weight.std().item() - 1) < 0.02
    assert abs(m.head.weight.std().item() * math.sqrt(128) - 1) < 0.02
    a, b = build(seed=3), build(seed=3)
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


# ----------------------------------------------------------------------------------------------
# optimizer


def test_optimizer_groups():
    m = build()
    decay, no_decay = m.optimizer_groups()
    params = dict(m.named_parameters())
    assert all(params[n].dim() >= 2 for n in decay) and all(params[n].dim() < 2 for n in no_decay)
    assert "emb.weight" in decay
    assert {n for n in decay if "M_k" in n or "M_v" in n} == {f"blocks.{i}.pmem.{k}.0" for i in range(2) for k in ("M_k", "M_v")}
    assert any(n.endswith("ctx.c_proj.weight") for n in decay)
    for n in no_decay:
        assert n.endswith(("ln1.weight", "ln2.weight", "ln_out.weight", "kernel_beta", "value_beta",
                           "leaky_beta", "coef")), n
    opt = m.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    g_decay, g_no = opt.param_groups
    assert g_decay["weight_decay"] == 0.1 and g_no["weight_decay"] == 0.0
    assert g_decay["betas"] == (0.9, 0.95) and g_decay["lr"] == 1e-3
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == m.num_parameters()
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # tied weight once


# ----------------------------------------------------------------------------------------------
# the two memories against a from-scratch computation (loops over heads and positions)


def _unit_np(v, eps):
    return v / (v.norm() + eps)


def test_context_and_persistent_memory_formulas():
    torch.manual_seed(13)
    cfg = tiny("softmax", n_embd=12, n_head=3, pmem_size=5)
    block = MemoryMosaic(cfg).blocks[0].eval()
    ctx, pmem = block.ctx, block.pmem
    with torch.no_grad():   # non-trivial per-head parameters
        for p_ in (ctx.kernel_beta, ctx.value.value_beta, pmem.kernel_beta, pmem.value_beta):
            p_.uniform_(-0.2, 0.2)
    B, T, C, H, d = 2, 9, 12, 3, 4
    x = torch.randn(B, T, C, dtype=torch.float64)
    ctx.double(), pmem.double()
    with torch.no_grad():
        y_ctx = ctx(x)
        y_pmem = pmem(x)
        Wk, Wv = ctx.key.linear.weight, ctx.value.linear.weight
        heads_ctx = torch.zeros(B, T, C, dtype=torch.float64)
        heads_pmem = torch.zeros(B, T, C, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                sl = slice(h * d, (h + 1) * d)
                lam = 10 * ctx.key.leaky_beta[h].abs()
                beta = torch.exp(torch.clamp(10 * ctx.kernel_beta[h], max=5))
                sigma = torch.exp(torch.clamp(10 * ctx.value.value_beta[h], max=5))
                c = ctx.value.coef[h]
                kx = x[b] @ Wk[sl].T                                           # (T, d)
                u = x[b] @ Wv[sl].T
                keys = [beta * _unit_np(sum(torch.exp(-lam * (t - i)) * kx[i] for i in range(t + 1)), 1e-6)
                        for t in range(T)]
                vals = [sigma * _unit_np((1 - c) * (u[t + 1] if t + 1 < T else 0 * u[t]) + c * u[t], 1e-6)
                        for t in range(T)]
                for i in range(1, T):
                    s_ = torch.stack([keys[i] @ keys[j] for j in range(i)])
                    p_ = torch.softmax(s_, 0)
                    heads_ctx[b, i, sl] = sum(p_[j] * vals[j] for j in range(i))
                # persistent memory
                lam2 = 10 * pmem.key.leaky_beta[h].abs()
                beta2 = torch.exp(torch.clamp(10 * pmem.kernel_beta[h], max=5)) ** 2
                sig2 = torch.clamp(torch.exp(10 * pmem.value_beta[h]), max=5)
                kx2 = x[b] @ pmem.key.linear.weight[sl].T
                Mk, Mv = pmem.M_k[0][0, h], pmem.M_v[0][0, h]                  # (P, d)
                for t in range(T):
                    q = beta2 * _unit_np(sum(torch.exp(-lam2 * (t - i)) * kx2[i] for i in range(t + 1)), 0.0)
                    heads_pmem[b, t, sl] = sig2 * (torch.softmax(Mk @ q, 0) @ Mv)
        torch.testing.assert_close(y_ctx, heads_ctx @ ctx.c_proj.weight.T, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(y_pmem, heads_pmem @ pmem.c_proj.weight.T, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# forward, loss, masking


def test_forward_shapes_and_lm_loss():
    m = build(skip_tokens=0).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, V, (3, 20))
    tgt = torch.randint(0, V, (3, 20))
    logits, loss = m(idx, tgt)
    assert logits.shape == (3, 20, V)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1)))
    logits_only, none = m(idx)
    assert none is None and torch.equal(logits_only, logits)
    # initial loss ~ log V (logits scaled by 1/sqrt(C), tied embedding)
    assert abs(loss.item() - math.log(V)) < 1.0


def test_loss_mask_and_skip_tokens():
    m = build(skip_tokens=3).eval()
    torch.manual_seed(2)
    idx = torch.randint(0, V, (2, 12))
    tgt = torch.randint(0, V, (2, 12))
    mask = torch.rand(2, 12) > 0.4
    logits, loss = m(idx, tgt, loss_mask=mask)
    ce = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="none").view(2, 12)
    torch.testing.assert_close(loss, ce[mask].mean())
    _, loss_skip = m(idx, tgt)
    torch.testing.assert_close(loss_skip, ce[:, 3:].mean())
    tgt_ign = tgt.clone()
    tgt_ign[:, 5] = -1
    _, loss_ign = m(idx, tgt_ign, loss_mask=mask)
    mask_ign = mask.clone()
    mask_ign[:, 5] = False
    torch.testing.assert_close(loss_ign, ce[mask_ign].mean())
    _, loss_empty = m(idx, tgt, loss_mask=torch.zeros(2, 12, dtype=torch.bool))
    assert loss_empty.item() == 0.0
    with pytest.raises(ValueError, match="loss_mask"):
        m(idx, tgt, loss_mask=mask[:, :5])


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_strict_causality(method):
    """Value j holds tokens j and j+1 and query i reads values j <= i-1, so logits at t depend
    on tokens <= t only."""
    m = build(method, seed=4).eval()
    torch.manual_seed(5)
    T = 24
    idx = torch.randint(0, V, (2, T))
    with torch.no_grad():
        base, _ = m(idx)
        for t in (0, 1, 7, 16, 22):
            idx2 = idx.clone()
            idx2[:, t + 1:] = torch.randint(0, V, (2, T - t - 1))
            idx2[:, t + 1] = (idx[:, t + 1] + 1) % V   # certainly different
            out, _ = m(idx2)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_padding_does_not_change_real_positions(method):
    m = build(method, seed=6).eval()
    torch.manual_seed(7)
    pad = V - 1
    a = torch.randint(0, V - 1, (1, 20))
    b = torch.randint(0, V - 1, (1, 13))
    batch = torch.full((2, 20), pad)
    batch[0] = a[0]
    batch[1, :13] = b[0]
    lengths = torch.tensor([20, 13])
    with torch.no_grad():
        la, _ = m(a)
        lb, _ = m(b)
        for lens in (None, lengths):
            out, _ = m(batch, lengths=lens)
            torch.testing.assert_close(out[0], la[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[1, :13], lb[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_backward_finite_grads(method):
    m = build(method, seed=8).train()
    torch.manual_seed(9)
    idx = torch.randint(0, V, (2, 20))
    _, loss = m(idx, torch.roll(idx, -1, 1))
    assert torch.isfinite(loss)
    loss.backward()
    spec = get_method(method)
    for name, p in m.named_parameters():
        if p.grad is None:
            # top-K uniform weights do not depend on the scores: no gradient reaches the ctx keys
            assert not spec.differentiable_scores and (".ctx.key." in name or "ctx.kernel_beta" in name), name
            continue
        assert torch.isfinite(p.grad).all(), name
    assert m.blocks[0].pmem.key.leaky_beta.grad.abs().sum() > 0
    if spec.differentiable_scores:
        assert m.blocks[0].ctx.key.leaky_beta.grad.abs().sum() > 0


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_very_short_sequences(method):
    """T = 1 (no admissible key anywhere), T = 2, 3 (fewer keys than K = 16)."""
    m = build(method, seed=12)
    for T in (1, 2, 3):
        idx = torch.randint(0, V, (2, T))
        logits, loss = m(idx, idx)
        loss.backward()
        assert logits.shape == (2, T, V) and torch.isfinite(logits).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("kw", [dict(pre_ln=False), dict(attn_only=True), dict(pmem_count=2, bias=True),
                                dict(v_shift=2)])
def test_variants_run(kw):
    m = build(**kw)
    idx = torch.randint(0, V, (2, 10))
    logits, loss = m(idx, idx)
    loss.backward()
    assert logits.shape == (2, 10, V) and torch.isfinite(loss)


def test_cpu_bf16_autocast():
    m = build().eval()
    idx = torch.randint(0, V, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = m(idx, idx)
    assert logits.shape == (2, 16, V)
    assert torch.isfinite(logits.float()).all() and torch.isfinite(loss)
    ref, _ = m(idx)
    assert (logits.float() - ref).abs().max() < 0.1


@pytest.mark.parametrize("method", ["softmax", "epanechnikov"])
def test_long_sequence_forward(method):
    m = build(method, seed=10, n_layer=1, n_embd=16, n_head=2, pmem_size=8).eval()
    idx = torch.randint(0, V, (1, 3000))
    with torch.no_grad():
        logits, loss = m(idx, idx)
    assert logits.shape == (1, 3000, V)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", PAPER_METHODS)
def test_cuda_bf16_matches_fp32(method):
    """auto backends under bf16 autocast vs the fp32 reference backends, same weights (head dim 16
    so that adasplash applies); then one training step."""
    torch.manual_seed(11)
    cfg = tiny(method, n_embd=64, n_head=4, attention_backend="auto", leaky_backend="auto")
    m = MemoryMosaic(cfg).cuda().eval()
    ref_model = MemoryMosaic(tiny(method, n_embd=64, n_head=4)).cuda().eval()
    ref_model.load_state_dict(m.state_dict())
    idx = torch.randint(0, V, (2, 100), device="cuda")
    lengths = torch.tensor([100, 77], device="cuda")
    with torch.no_grad():
        ref, _ = ref_model(idx, lengths=lengths)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, loss = m(idx, idx, lengths=lengths)
    assert out.shape == (2, 100, V)
    assert torch.isfinite(out.float()).all() and torch.isfinite(loss)
    err = torch.cat([(out - ref)[0].flatten(), (out - ref)[1, :77].flatten()]).float().abs().max()
    assert err < 0.1
    m.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = m(idx, idx, lengths=lengths)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_persistent_memory_batch_fold_is_the_same_function():
    """g samples folded into SDPA's query axis (B*H >= 512 here, so g = 2) give the per-sample
    attention over the P slots, values and gradients (no dropout in eval)."""
    from sparse_mosaics.model.mosaic import _fold_factor

    torch.manual_seed(3)
    B, T, H = 64, 5, 8
    assert _fold_factor(B, H) == 2 and _fold_factor(32, H) == 1 and _fold_factor(5, 1) == 1
    cfg = tiny("softmax", n_embd=16, n_head=H, pmem_size=6)
    pmem = MemoryMosaic(cfg).blocks[0].pmem.eval().double()
    x = torch.randn(B, T, 16, dtype=torch.float64, requires_grad=True)
    y = pmem(x)
    # per-sample reference: every sample alone (B = 1, so no fold)
    y_ref = torch.cat([pmem(x[b:b + 1]) for b in range(B)])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    gx, gM = torch.autograd.grad(y, (x, pmem.M_k[0]), g)
    gx_ref, gM_ref = torch.autograd.grad(y_ref, (x, pmem.M_k[0]), g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gM, gM_ref, rtol=1e-10, atol=1e-12)
