"""Full-size GPU checks of the Triton kernels (attention and leaky average) against the references.

Run on a CUDA machine: ``python -m pytest -q tests/test_gpu.py``. Skipped without CUDA.
"""

import zlib

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

METHODS = ("softmax", "epanechnikov", "biweight", "triweight", "entmax_1.25", "entmax_1.7",
           "top16_softmax", "top16_uniform", "norm_relu", "relumax")


def _check(method, D, dtype, shift, use_len, dist, T, impl="triton"):
    from sparse_mosaics.bench import _fused, _ours, check_impl

    lengths = torch.tensor([T, T // 2 + 7], device="cuda") if use_len else None
    fn = _fused(method) if impl == "fused" else _ours(method, impl)
    seed = zlib.crc32(repr((method, D, T)).encode()) % 1000  # stable across processes, unlike hash()
    r = check_impl(impl, fn, method, 2, 4, T, D, dtype, shift, lengths, dist, seed=seed)
    assert r["ok"], r


@pytest.mark.parametrize("method", METHODS)
def test_bf16_d64_lengths(method):
    _check(method, 64, torch.bfloat16, 1, True, "mosaic", 600)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_d64_causal(method):
    _check(method, 64, torch.bfloat16, 0, False, "normal", 1024)


@pytest.mark.parametrize("method", METHODS)
def test_fp32_d16(method):
    _check(method, 16, torch.float32, 1, False, "mosaic", 333)


@pytest.mark.parametrize("method", ("softmax", "biweight", "top16_softmax", "norm_relu", "relumax"))
def test_bf16_d128(method):
    _check(method, 128, torch.bfloat16, 1, False, "normal", 256)


@pytest.mark.parametrize("method", ("top16_softmax", "top16_uniform"))
def test_threshold_from_candidates(method):
    """fused.TOPK_CANDIDATES at every length (the default takes them from T = 1024 on): thresholds
    solved on the candidates give the reference's outputs and gradients (bf16 and fp32; rows that
    do not fit take the search)."""
    from sparse_mosaics.attention import fused

    old = fused.TOPK_CANDIDATES
    fused.TOPK_CANDIDATES = 64
    try:
        _check(method, 64, torch.bfloat16, 1, True, "mosaic", 600)
        _check(method, 16, torch.float32, 1, False, "mosaic", 333)
    finally:
        fused.TOPK_CANDIDATES = old


@pytest.mark.parametrize("method,setting", [(m, "m1") for m in ("epanechnikov", "biweight", "triweight",
                                                                   "entmax_1.25", "entmax_1.7")]
                         + [(m, s) for m in ("epanechnikov", "biweight", "triweight", "entmax_1.25")
                            for s in ("foldonly", "fold")])
def test_entmax_start_and_fold(method, setting):
    """The entmax start and the output pass's folded last step at full size: the plain start m - 1
    (ENTMAX_TOP = (1, 1)), the fold at every length and n (ENTMAX_FOLD_ROUNDS = 3; by default only
    sparsemax from T = 1024 on folds), and no threshold passes at all (MAX_NEWTON = 0, 8 output
    passes whose folded steps do the search), still give the reference's outputs and gradients.
    (Generic n has no fold: without passes it cannot be right, so it only takes the plain start.)"""
    from sparse_mosaics.attention import fused

    old = fused.ENTMAX_TOP, fused.ENTMAX_FOLD_ROUNDS, fused.MAX_NEWTON
    if setting == "m1":
        fused.ENTMAX_TOP = (1, 1)
    elif setting == "fold":
        fused.ENTMAX_FOLD_ROUNDS = 3
    else:
        fused.MAX_NEWTON, fused.ENTMAX_FOLD_ROUNDS = 0, 8
        if method == "epanechnikov":
            fused.ENTMAX_TOP = (1, 1)
    try:
        _check(method, 64, torch.bfloat16, 1, True, "mosaic", 600)
        _check(method, 64, torch.bfloat16, 0, False, "normal", 1024)
    finally:
        fused.ENTMAX_TOP, fused.ENTMAX_FOLD_ROUNDS, fused.MAX_NEWTON = old


def test_fused_softmax_with_lengths():
    _check("softmax", 64, torch.bfloat16, 1, True, "normal", 700, impl="fused")


def test_topk_ties_keep_exactly_k():
    """Duplicated keys create exact ties at the K-th score: still exactly min(K, |A_i|) keys kept."""
    from sparse_mosaics.attention import get_method, kernel_attention

    g = torch.Generator(device="cuda").manual_seed(3)
    B, H, T, D, K = 2, 2, 128, 32, 16
    base = torch.randn(B, H, 10, D, device="cuda", generator=g) / D ** 0.25
    k = base[:, :, torch.randint(0, 10, (T,), device="cuda", generator=g)].contiguous()  # many equal keys
    q = torch.randn(B, H, T, D, device="cuda", generator=g) / D ** 0.25
    v = torch.eye(T, device="cuda").expand(B, H, T, T).contiguous()  # y[i, j] = p_ij
    for fam in ("uniform", "softmax"):
        p = kernel_attention(q, k, v, get_method(f"top{K}_{fam}"), shift=1, backend="triton")
        counts = (p > 1e-6).sum(-1)                                   # (B, H, T) selected keys
        want = torch.clamp(torch.arange(T, device="cuda"), max=K)     # |A_i| = i
        assert torch.equal(counts, want.expand_as(counts)), fam
        assert not torch.triu(p[0, 0] > 0).any()                     # never a key j >= i


@pytest.mark.parametrize("method", METHODS)
def test_long_sequence_linear_memory(method):
    """T = 65,536 runs forward + backward with memory linear in T (no T x T tensor)."""
    from sparse_mosaics.attention import get_method, kernel_attention

    T, D = 65536, 64
    q, k, v = (torch.randn(1, 1, T, D, device="cuda", dtype=torch.bfloat16).div(D ** 0.25).requires_grad_()
               for _ in range(3))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = kernel_attention(q, k, v, get_method(method), shift=1, backend="triton")
    y.float().sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(y).all() and torch.isfinite(q.grad).all()
    assert peak < 64 * T * D * 4  # a T x T fp32 matrix would be 16 GiB


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("T,d", ((5000, 64), (130, 24), (1, 16)))
def test_leaky_average_triton(dtype, T, d):
    from sparse_mosaics.model.leaky_average import leaky_average_reference
    from sparse_mosaics.model.leaky_average_triton import leaky_average_triton

    x = torch.randn(3, 4, T, d, device="cuda").to(dtype).requires_grad_()
    lam = (torch.rand(4, device="cuda") * 3 + 0.02).requires_grad_()
    y = leaky_average_triton(x, lam)
    g = torch.randn_like(y)
    gx, gl = torch.autograd.grad(y, (x, lam), g)
    yr = leaky_average_reference(x.float(), lam)
    gxr, glr = torch.autograd.grad(yr, (x, lam), g.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()  # noqa: E731
    assert y.dtype == dtype
    assert rel(y, yr) < tol and rel(gx, gxr) < tol and rel(gl, glr) < max(tol, 1e-4)


def test_auto_backend_is_triton_on_cuda():
    from sparse_mosaics.attention import get_method, resolve_backend

    for m in METHODS:
        assert resolve_backend(get_method(m), torch.device("cuda"), "auto") == "triton"


@pytest.mark.parametrize("method", ("biweight", "top16_softmax", "relumax"))
def test_compiled_model_matches_eager(method):
    """torch.compile (Inductor, fullgraph: the kernels are custom ops, no graph break) gives the
    eager loss and gradients of a Memory Mosaic with the Triton attention and leaky scan."""
    from sparse_mosaics.model import MemoryMosaic, MemoryMosaicConfig

    torch.manual_seed(0)
    cfg = MemoryMosaicConfig(vocab_size=17, n_layer=2, n_head=4, n_embd=64, pmem_size=32, method=method,
                             ic_dropout=0.0, hd_dropout=0.0)
    model = MemoryMosaic(cfg).cuda()
    idx = torch.randint(0, 17, (8, 200), device="cuda")
    tgt = torch.randint(0, 17, (8, 200), device="cuda")
    lengths = torch.tensor([200, 150, 200, 7, 200, 200, 99, 200], device="cuda")
    params = list(model.parameters())
    _, loss = model(idx, tgt, lengths=lengths)
    grads = torch.autograd.grad(loss, params)
    _, loss_c = torch.compile(model, fullgraph=True)(idx, tgt, lengths=lengths)
    grads_c = torch.autograd.grad(loss_c, params)
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
    if method.startswith("top"):
        # the selection is piecewise constant in the scores, and Inductor rounds the keys' features
        # differently: on the H200 one per-head scalar gradient (sum over B*T*d terms) differed by
        # 1.1% (5e-5 absolute); compare these gradients as a whole
        for a, b in zip(grads_c, grads):
            assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < 2e-2
        return
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-5)


def test_training_with_cuda_graphs_matches_eager(tmp_path):
    """train.compile: reduce-overhead (CUDA graphs; batches padded to multiples of 16 tokens) trains
    the same model on the GPU as eager training: same curve and weights up to bf16 rounding."""
    import pandas as pd
    from test_train import _state, make_cell, write_data

    from sparse_mosaics.cell import validate_cell
    from sparse_mosaics.train import train_cell

    data = write_data(tmp_path / "data")
    out = {}
    for compile_value in (False, "reduce-overhead"):
        cell = make_cell(compile=compile_value, max_iters=12, checkpoint_interval=5, log_interval=2)
        cell["method"] = "biweight"
        cell["model"].update(ic_dropout=0.0, hd_dropout=0.0)
        dest = tmp_path / str(compile_value)
        summary = train_cell(validate_cell(cell), data, dest, quiet=True)
        assert summary["steps"] == 12
        out[compile_value] = dest
    assert "mode reduce-overhead" in (out["reduce-overhead"] / "train.log").read_text()
    ca, cb = (pd.read_parquet(out[c] / "curve.parquet") for c in (False, "reduce-overhead"))
    assert cb["step"].tolist() == ca["step"].tolist()
    assert ((cb["loss"] - ca["loss"]).abs() / ca["loss"]).max() < 2e-2
    a, b = _state(out[False] / "model.pt"), _state(out["reduce-overhead"] / "model.pt")
    for k in a:
        assert ((b[k].float() - a[k].float()).norm() / a[k].float().norm().clamp_min(1e-6)) < 5e-2, k
