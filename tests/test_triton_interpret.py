"""Every Triton kernel against the reference on the CPU, through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before Triton kernels are defined, so the checks run in a
fresh subprocess (this file executed as a script) with the variable set; that subprocess is
started once per pytest session and its results are shared by the parametrised tests below. This
keeps the test independent of whatever else the pytest process has imported.

Covered: all attention families (softmax through the fused kernel, entmax alpha = 2, 1.5, 4/3,
1.25 (integer fast paths) and 1.7 (generic pow), top-K softmax / uniform, norm_relu, relumax),
forward and gradients of q, k, v, shift 0 and 1, lengths (with a short and an empty sample),
D = 16 and 32, T <= 100 with blocks of 32 (several blocks, T not a multiple of the block, the
backward's unmasked interior tiles); exact top-K tie handling and exact selection on long random
rows; the top-K threshold from candidates (fused.TOPK_CANDIDATES: with rows that do not fit, with
ties, with CANDIDATE_ROUNDS limiting the rounds per tile, and alone with the search cut to one
pass); the entmax start from the kept tile maxima and the output pass's folded last step
(fused.ENTMAX_TOP, ENTMAX_FOLD_ROUNDS: the plain start, the fold forced for every n, the fold
alone doing the search, the start alone exact for sparsemax, the last two with a control that
must fail); the entmax forward without the mask on interior tiles (fused.FORWARD_MASK_SPLIT, the
default from T = 1024 on); fp16 inputs for entmax (its earlier stop for 16-bit inputs); the
leaky-average scan forward / backward (x and lam), T not a multiple of the chunk; and both under
torch.compile(fullgraph=True) (custom ops: no graph break, same values).
"""

import json
import os
import subprocess
import sys
import zlib

import pytest

ATTN_METHODS = ("softmax", "epanechnikov", "biweight", "triweight", "entmax_1.25", "entmax_1.7",
                "top4_softmax", "top4_uniform", "norm_relu", "relumax")
# (D, T, shift, lengths: None or "short+empty", lengths T - 9 and 0); T = 100 spans 4 blocks of the
# interpreter's 32, so the backward also takes its unmasked interior tiles (and the masked ones around)
ATTN_SHAPES = ((16, 37, 1, None), (32, 48, 0, "short+empty"), (16, 100, 1, "short+empty"))
LEAKY_SHAPES = ((1, 16), (45, 16), (70, 24))
CASES = ([("attn", m, *s) for m in ATTN_METHODS for s in ATTN_SHAPES]
         + [("ties", m, 16, 70, 1, None) for m in ("top4_uniform", "top4_softmax")]
         + [("select", m, 16, 230, 1, None) for m in ("top16_uniform", "top4_softmax")]
         + [("compiled", m, 16, 40, 1, "lens") for m in ("biweight", "relumax", "top4_softmax")]
         + [("fp16", m, 32, 48, 1, "short+empty") for m in ("biweight", "triweight", "entmax_1.7")]
         + [("start-m1", m, 16, 70, 1, None) for m in ("epanechnikov", "biweight", "triweight", "entmax_1.7")]
         + [("start-foldonly", m, 32, 48, 0, "short+empty") for m in ("epanechnikov", "biweight", "triweight", "entmax_1.25")]
         + [("start-top0", "epanechnikov", 16, 100, 1, None)]
         + [("start-fold", m, 16, 100, 1, "short+empty") for m in ("epanechnikov", "biweight", "triweight", "entmax_1.25")]
         + [("cand32-select", m, 16, 230, 1, None) for m in ("top4_softmax", "top16_uniform")]
         + [("cand64-ties", m, 16, 70, 1, None) for m in ("top4_softmax", "top4_uniform")]
         + [("cand64-1pass", m, 32, 48, 0, "short+empty") for m in ("top4_softmax", "top4_uniform")]
         + [("cand64r1", "top4_softmax", 16, 70, 1, None)]
         + [("split", m, 16, 100, 1, "short+empty") for m in ("epanechnikov", "biweight", "entmax_1.7")]
         + [("split", "triweight", 32, 70, 0, None)]
         + [("leaky", "leaky", d, T, 0, None) for T, d in LEAKY_SHAPES])
TOL = 2e-4  # fp32 everywhere (the interpreter's dots are exact fp32 numpy products)
# 16-bit inputs (entmax stops its threshold search earlier, fused._threshold_tols) against the fp32
# reference on the same rounded inputs: outputs and gradients are rounded to 16 bits. fp16, since
# the interpreter's bf16 dots are wrong (numpy has no bf16: outputs come back as zeros)
HALF_TOL = 5e-3


def _case_id(c):
    return f"{c[0]}-{c[1]}-D{c[2]}-T{c[3]}-s{c[4]}-{c[5] or 'nolen'}"


# ------------------------------------------------------------------------------------------------
# what runs inside the subprocess


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / (b.norm() + 1e-3))


def _run_attention(method, D, T, shift, lens, dtype="float32"):
    import torch

    from sparse_mosaics.attention.fused import fused_attention
    from sparse_mosaics.attention.reference import reference_attention
    from sparse_mosaics.attention.registry import get_method

    spec = get_method(method)
    # a stable seed per case (hash() of a str changes from one process to the next)
    g = torch.Generator().manual_seed(zlib.crc32(repr((method, D, T)).encode()) % 10_000)
    B, H = 2, 2
    if spec.family == "norm_relu":  # |q - k|^2 around 1: some weights 0, some rows all 0 (uniform)
        scale = 1.0 / (2 * D) ** 0.5
    elif spec.family in ("entmax", "topk_softmax", "relumax"):
        scale = 2.0 / D ** 0.25  # scores ~ N(0, 4): sparse but not one-hot
    else:
        scale = 1.0 / D ** 0.25
    q = (torch.randn(B, H, T, D, generator=g) * scale).requires_grad_()
    k = (torch.randn(B, H, T, D, generator=g) * scale).requires_grad_()
    v = torch.randn(B, H, T, D, generator=g).requires_grad_()
    if dtype != "float32":  # the reference computes in fp32 on the same rounded inputs
        q, k, v = (x.detach().to(getattr(torch, dtype)).float().requires_grad_() for x in (q, k, v))
    lengths = None if lens is None else torch.tensor([T - 9, 0])  # crosses a block; empty sample
    low = [x.to(getattr(torch, dtype)) for x in (q, k, v)]
    y = fused_attention(*low, spec, shift, lengths)
    go = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, (q, k, v), go.to(y.dtype))
    yr = reference_attention(q, k, v, spec, shift, lengths)
    grads_r = torch.autograd.grad(yr, (q, k, v), go, allow_unused=True)
    out = {"out": _rel(y, yr)}
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_r):
        out[name] = _rel(a, torch.zeros_like(a) if b is None else b)
    if lens is not None:  # the empty sample must give exact zeros (outputs and gradients)
        out["empty_max"] = float(max(y[1].abs().max(), grads[0][1].abs().max(), grads[1][1].abs().max()))
    return out


def _run_candidates(method, D, T, shift, lens, slots, mode, rounds=0):
    """The top-K threshold from candidates (fused.TOPK_CANDIDATES = slots): at T = 230 with 32 slots
    the Gaussian guess of t0 fits some rows and misses others. mode "select" / "ties": exact
    selection (``_run_ties``); "1pass": the search cut to one pass (MAX_SELECT = 1), so only rows
    solved from their candidates are exact; the same run without candidates must be wrong
    ("control": more than 10 x TOL off). rounds: fused.CANDIDATE_ROUNDS (1: most rows keep too few
    candidates and take the search)."""
    from sparse_mosaics.attention import fused

    flag, cap = "TOPK_CANDIDATES", "MAX_SELECT"
    old = getattr(fused, flag), getattr(fused, cap), fused.CANDIDATE_ROUNDS

    def run():
        if mode in ("select", "ties"):
            return _run_ties(method, D, T, shift, ties=mode == "ties")
        return _run_attention(method, D, T, shift, lens)

    try:
        setattr(fused, flag, slots)
        fused.CANDIDATE_ROUNDS = rounds
        if mode == "1pass":
            setattr(fused, cap, 1)
        r = run()
        if mode == "1pass":
            setattr(fused, flag, 0)
            control = run()
            r["control_ok"] = float(max(v for k, v in control.items() if k != "empty_max") > 10 * TOL)
    finally:
        setattr(fused, flag, old[0])
        setattr(fused, cap, old[1])
        fused.CANDIDATE_ROUNDS = old[2]
    return r


def _run_entmax_start(method, D, T, shift, lens, mode):
    """The entmax start and the output pass's fold (fused.ENTMAX_TOP, ENTMAX_FOLD_ROUNDS, MAX_NEWTON).
    "m1": the plain start m - 1 (ENTMAX_TOP = (1, 1)): more passes, and sparsemax, which takes none
    before its output pass, folds wrongly at first and must fall back to passes and a second output
    pass. "foldonly": no threshold passes (MAX_NEWTON = 0), 8 output passes: each one's folded step
    is taken and the next pass checks it, so they alone must reach the root (sparsemax from m - 1);
    the control, a single output pass, must be wrong. "top0": sparsemax with no threshold pass and
    one output pass is exact only through the kept tile maxima (4 per tile here: its support is
    among them); the control from m - 1 must be wrong."""
    from sparse_mosaics.attention import fused

    sparsemax = method == "epanechnikov"
    old = fused.ENTMAX_TOP, fused.ENTMAX_FOLD_ROUNDS, fused.MAX_NEWTON
    try:
        if mode == "m1":
            fused.ENTMAX_TOP = (1, 1)
            return _run_attention(method, D, T, shift, lens)
        if mode == "fold":
            fused.ENTMAX_FOLD_ROUNDS = 3
            return _run_attention(method, D, T, shift, lens)
        fused.MAX_NEWTON = 0
        if mode == "foldonly":
            fused.ENTMAX_TOP = (1, 1) if sparsemax else None
            fused.ENTMAX_FOLD_ROUNDS = 8
            r = _run_attention(method, D, T, shift, lens)
            fused.ENTMAX_FOLD_ROUNDS = 1
        else:
            fused.ENTMAX_TOP, fused.ENTMAX_FOLD_ROUNDS = (16, 4), 1
            r = _run_attention(method, D, T, shift, lens)
            fused.ENTMAX_TOP = (1, 1)
        control = _run_attention(method, D, T, shift, lens)
        r["control_ok"] = float(max(v for k, v in control.items() if k != "empty_max") > 10 * TOL)
        return r
    finally:
        fused.ENTMAX_TOP, fused.ENTMAX_FOLD_ROUNDS, fused.MAX_NEWTON = old


def _run_mask_split(method, D, T, shift, lens):
    """fused.FORWARD_MASK_SPLIT on (the default from T = 1024 on, so never at these lengths): the
    entmax forward's passes take the key tiles every row of the query block sees whole without a
    mask (T = 100: 4 blocks of 32)."""
    from sparse_mosaics.attention import fused

    old = fused.FORWARD_MASK_SPLIT
    try:
        fused.FORWARD_MASK_SPLIT = True
        return _run_attention(method, D, T, shift, lens)
    finally:
        fused.FORWARD_MASK_SPLIT = old


def _run_ties(method, D, T, shift, ties=True):
    """Keys drawn from 5 distinct vectors: exact ties at the K-th score. Exactly min(K, |A_i|)
    keys are kept: every strictly larger score, then the lowest-index tied keys. ties=False:
    distinct random keys, long rows (the search's pivot placement and its two-score ending)."""
    import torch

    from sparse_mosaics.attention.fused import fused_attention
    from sparse_mosaics.attention.registry import get_method

    spec = get_method(method)
    g = torch.Generator().manual_seed(11)
    base = torch.randn(1, 1, 5, D, generator=g)
    k = base[:, :, torch.randint(0, 5, (T,), generator=g)].contiguous() if ties else \
        torch.randn(1, 1, T, D, generator=g)
    q = torch.randn(1, 1, T, D, generator=g)
    v = torch.eye(T).view(1, 1, T, T).contiguous()                  # y[i, j] = p_ij
    p = fused_attention(q, k, v, spec, shift, None)[0, 0]
    s = (q @ k.transpose(-1, -2))[0, 0]
    bad = 0
    for i in range(T):
        n = i - shift + 1
        if n <= 0:
            bad += int(p[i].abs().sum() > 0)
            continue
        row = s[i, :n]
        kth = row.sort(descending=True).values[min(spec.k, n) - 1]
        want = (row > kth) | ((row == kth) & (torch.cumsum((row == kth).int(), 0)
                                                <= min(spec.k, n) - int((row > kth).sum())))
        got = p[i, :n] > 0
        bad += int(not torch.equal(got, want)) + int((p[i, n:] != 0).any())
    return {"bad_rows": float(bad)}


def _run_compiled(method, D, T, shift):
    """torch.compile(fullgraph=True) of a function around the kernels and the leaky scan: the
    custom ops trace without graph breaks and give the eager values and gradients."""
    import torch

    from sparse_mosaics.attention.fused import fused_attention
    from sparse_mosaics.attention.registry import get_method
    from sparse_mosaics.model.leaky_average_triton import leaky_average_triton

    spec = get_method(method)
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(2, 2, T, D, generator=g) * 0.8).requires_grad_()
    v = torch.randn(2, 2, T, D, generator=g).requires_grad_()
    lam = torch.tensor([0.3, 2.0], requires_grad=True)
    lengths = torch.tensor([T, T - 11])

    def f(q, v, lam):
        k = leaky_average_triton(q, lam)
        return (fused_attention(k, k, v, spec, shift, lengths) * torch.tanh(v)).sum()

    # the custom ops' fake (meta) functions and autograd registration agree with the real ones,
    # on non-contiguous inputs as the model passes them
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    torch.library.opcheck(torch.ops.sparse_mosaics.leaky_average_fwd.default, (qt, lam.detach()))
    torch.library.opcheck(torch.ops.sparse_mosaics.attention_fwd.default,
                          (q, q.detach().clone().requires_grad_(), v, spec.name, shift, lengths, True))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y, yc = f(q, v, lam), compiled(q, v, lam)
    grads = torch.autograd.grad(y, (q, v, lam))
    grads_c = torch.autograd.grad(yc, (q, v, lam))
    out = {"out": _rel(yc, y)}
    for name, a, b in zip(("dq", "dv", "dlam"), grads_c, grads):
        out[name] = _rel(a, b)
    return out


def _run_leaky(d, T):
    import torch

    from sparse_mosaics.model.leaky_average import leaky_average_dense
    from sparse_mosaics.model.leaky_average_triton import leaky_average_triton

    g = torch.Generator().manual_seed(T * 100 + d)
    x = torch.randn(2, 3, T, d, generator=g).requires_grad_()
    lam = (torch.rand(3, generator=g) * 3 + 0.05).requires_grad_()
    y = leaky_average_triton(x, lam)
    go = torch.randn(y.shape, generator=g)
    gx, gl = torch.autograd.grad(y, (x, lam), go)
    yr = leaky_average_dense(x, lam)
    gxr, glr = torch.autograd.grad(yr, (x, lam), go)
    return {"out": _rel(y, yr), "dx": _rel(gx, gxr), "dlam": _rel(gl, glr)}


def _main(path):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for c in CASES:
        kind, method, D, T, shift, lens = c
        try:
            if kind == "leaky":
                r = _run_leaky(D, T)
            elif kind in ("ties", "select"):
                r = _run_ties(method, D, T, shift, ties=kind == "ties")
            elif kind == "compiled":
                r = _run_compiled(method, D, T, shift)
            elif kind == "fp16":
                r = _run_attention(method, D, T, shift, lens, dtype="float16")
            elif kind == "split":  # fused.FORWARD_MASK_SPLIT: entmax forward passes without the mask
                r = _run_mask_split(method, D, T, shift, lens)
            elif kind.startswith("start-"):  # the entmax start and fold
                r = _run_entmax_start(method, D, T, shift, lens, kind[6:])
            elif kind.startswith("cand"):  # the thresholds from candidates (ENTMAX_ / TOPK_CANDIDATES)
                slots, _, mode = kind[4:].partition("-")
                slots, _, rounds = slots.partition("r")       # cand64r2: CANDIDATE_ROUNDS = 2
                r = _run_candidates(method, D, T, shift, lens, int(slots), mode, int(rounds or 0))
            else:
                r = _run_attention(method, D, T, shift, lens)
        except Exception as e:  # reported per case by the tests
            r = {"error": repr(e)}
        results[_case_id(c)] = r
    with open(path, "w") as f:
        json.dump(results, f)


# ------------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("interp") / "results.json"
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([src] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(interpreted, case):
    r = interpreted[_case_id(case)]
    assert "error" not in r, r.get("error")
    if case[0] in ("ties", "select") or case[0].endswith(("-ties", "-select")):
        assert r["bad_rows"] == 0, r
        return
    if "control_ok" in r:  # the check below can fail: without candidates one pass is not enough
        assert r.pop("control_ok") == 1.0, r
    errs = {k: v for k, v in r.items() if k != "empty_max"}
    assert max(errs.values()) < (HALF_TOL if case[0] == "fp16" else TOL), r
    if "empty_max" in r:
        assert r["empty_max"] == 0.0, r


if __name__ == "__main__":
    _main(sys.argv[1])


def test_candidate_slots_are_checked(monkeypatch):
    """A bad TOPK_CANDIDATES value names the flag; top-K skips slots that cannot hold K + 1;
    the top-K default (None) takes 64 slots from TOPK_CANDIDATES_MIN_T keys on, none below."""
    pytest.importorskip("triton")
    from sparse_mosaics.attention import fused

    monkeypatch.setattr(fused, "TOPK_CANDIDATES", 24)
    with pytest.raises(ValueError, match=r"fused.TOPK_CANDIDATES must be 0 or a power of two >= 16, got 24"):
        fused._candidate_slots(fused.TOPK_SOFTMAX, 4, 100)
    monkeypatch.setattr(fused, "TOPK_CANDIDATES", 16)
    assert fused._candidate_slots(fused.TOPK_UNIFORM, 4, 100) == 16
    assert fused._candidate_slots(fused.TOPK_UNIFORM, 16, 100) == 0
    monkeypatch.setattr(fused, "TOPK_CANDIDATES", None)
    t = fused.TOPK_CANDIDATES_MIN_T
    assert fused._candidate_slots(fused.TOPK_SOFTMAX, 16, t) == 64
    assert fused._candidate_slots(fused.TOPK_SOFTMAX, 16, t - 1) == 0
    assert fused._candidate_slots(fused.TOPK_SOFTMAX, 64, t) == 0  # 64 slots cannot hold K + 1 = 65
    assert fused._candidate_slots(fused.ENTMAX, 0, t) == 0 and fused._candidate_slots(fused.NORM_RELU, 0, t) == 0
    monkeypatch.setattr(fused, "CANDIDATE_ROUNDS", 3)
    assert fused._candidate_rounds() == 3
    monkeypatch.setattr(fused, "CANDIDATE_ROUNDS", -1)
    with pytest.raises(ValueError, match=r"fused.CANDIDATE_ROUNDS must be an int in 0..16, got -1"):
        fused._candidate_rounds()


def test_entmax_start_is_checked(monkeypatch):
    """ENTMAX_TOP: the default keeps 8 tile maxima (2 per tile for sparsemax, 1 otherwise), cut to
    what a short row can have; the mask split is on from FORWARD_MASK_SPLIT_MIN_T, the fold for
    sparsemax from ENTMAX_FOLD_MIN_T; a bad value of any of these flags names the flag."""
    pytest.importorskip("triton")
    from sparse_mosaics.attention import fused

    assert fused._entmax_top(1, 4096, 32) == (8, 2) and fused._entmax_top(2, 4096, 32) == (8, 1)
    assert fused._entmax_top(2, 100, 32) == (4, 1) and fused._entmax_top(1, 40, 32) == (4, 2)
    assert not fused._mask_split(fused.FORWARD_MASK_SPLIT_MIN_T - 1) and fused._mask_split(fused.FORWARD_MASK_SPLIT_MIN_T)
    monkeypatch.setattr(fused, "FORWARD_MASK_SPLIT", 1)
    with pytest.raises(ValueError, match="fused.FORWARD_MASK_SPLIT must be None, True or False, got 1"):
        fused._mask_split(4096)
    monkeypatch.setattr(fused, "FORWARD_MASK_SPLIT", None)
    monkeypatch.setattr(fused, "ENTMAX_TOP", (4, 8))
    with pytest.raises(ValueError, match=r"fused.ENTMAX_TOP must be None or \(R, PER\) with 1 <= PER <= R <= 32, got \(4, 8\)"):
        fused._entmax_top(2, 4096, 32)
    t = fused.ENTMAX_FOLD_MIN_T
    assert fused._fold_rounds(1, t) == 3 and fused._fold_rounds(1, t - 1) == 0 and fused._fold_rounds(2, t) == 0
    monkeypatch.setattr(fused, "ENTMAX_FOLD_ROUNDS", 9)
    with pytest.raises(ValueError, match="fused.ENTMAX_FOLD_ROUNDS must be an int in 0..8, got 9"):
        fused._fold_rounds(2, t)
