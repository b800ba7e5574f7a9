"""Check and time every attention implementation (and the model's training step) on the GPU found.

    rows = run_bench(quick=False, sections=("check", "kernels", "long", "train", "eval"))

Sections (each row of the result is a dict; ``sparse-mosaics bench --out DIR`` writes them as
bench.csv / bench.parquet):

* check   -- every implementation against ``reference_attention`` on fresh random inputs at
             shapes where the reference can materialise T x T: relative L2 error of the output
             and of dq, dk, dv, with a pass/fail column (bf16 tolerance 2e-2 out / 5e-2 grads;
             fp32 1e-3 / 3e-3).  Two input distributions: "normal" (q, k ~ N(0, d^-1/2), scores
             ~ N(0, 1), adasplash's default scaling) and "mosaic" (q = k = beta * unit key, as the
             model calls it).
* kernels -- forward and forward+backward time (median of triton.testing.do_bench, warm-up
             excluded) and peak memory of forward+backward, bf16, B*H = 256 (B=32, H=8),
             D in {16, 64}, T in {256, 1024, 4096} (GPU.md's anchor table): SDPA cuDNN and flash,
             adasplash_v2 (alpha 1.5), adasplash_no_block_mask (niter 5), and ours per method.
* long    -- the same at T in {16384, 65536}, B=1, H=8, D=64 (ours and SDPA).
* train   -- one AdamW training step of the length-generalisation cell (GPU.md table B) and of
             the ICLL cell (table A, T = 512 and 948) per method, with the project's MemoryMosaic;
             with ``compile_model`` (an Inductor mode: "default", "reduce-overhead", ...) each step
             is timed eager (impl ``model_auto``) and compiled (impl ``model_auto_compile``, or
             ``model_auto_compile-<mode>`` for other modes) side by side (``eager=False``: compiled
             only).
* eval    -- long-context evaluation forward of the length-generalisation model, batch 8,
             T in {1026, 2050, 4096, 8192, 16384}, per method.

A time budget (``budget_s``) stops the run early (the rows so far are kept).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .attention import get_method
from .attention.reference import reference_attention

METHODS = ("softmax", "epanechnikov", "biweight", "triweight", "entmax_1.25", "top16_softmax",
           "top16_uniform", "norm_relu", "relumax")
TOL = {torch.bfloat16: (2e-2, 5e-2), torch.float16: (1e-2, 3e-2), torch.float32: (1e-3, 3e-3)}


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.time()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)

    def out(self) -> bool:
        return self.left() <= 0


# ------------------------------------------------------------------------------------------------
# implementations: name -> fn(q, k, v, shift, lengths) -> y


def _adasplash_v2(q, k, v, shift, lengths):
    """adasplash_v2 (causal, alpha 1.5 only, its default niter) on its own scaling (1/sqrt(d))."""
    from adasplash import adasplash_v2

    return adasplash_v2(q, k, v)


def _adasplash_nbm(alpha):
    def fn(q, k, v, shift, lengths):
        from adasplash import adasplash_no_block_mask

        return adasplash_no_block_mask(q, k, v, alpha=alpha, is_causal=True, niter=5)

    return fn


def _sdpa(backend_name):
    def fn(q, k, v, shift, lengths):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        b = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend_name]
        with sdpa_kernel(b):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return fn


def _ours(method, backend="triton"):
    from .attention import kernel_attention

    def fn(q, k, v, shift, lengths):
        return kernel_attention(q, k, v, method, shift=shift, lengths=lengths, backend=backend)

    return fn


def _fused(method):
    """The Triton kernels themselves (softmax too, instead of SDPA)."""
    from .attention.fused import fused_attention

    spec = get_method(method)

    def fn(q, k, v, shift, lengths):
        return fused_attention(q, k, v, spec, shift, lengths)

    return fn


# ------------------------------------------------------------------------------------------------
# inputs


def make_inputs(B, H, T, D, dtype, dist="normal", beta2=7.39, seed=0, device="cuda", grad=True):
    g = torch.Generator(device=device).manual_seed(seed)
    if dist == "normal":
        q = torch.randn(B, H, T, D, device=device, generator=g) / D ** 0.25
        k = torch.randn(B, H, T, D, device=device, generator=g) / D ** 0.25
    else:  # Memory Mosaics: q = k = beta * unit key
        u = F.normalize(torch.randn(B, H, T, D, device=device, generator=g), dim=-1)
        q = k = u * math.sqrt(beta2)
        q = q.clone()
        k = k.clone()
    v = torch.randn(B, H, T, D, device=device, generator=g)
    q, k, v = (t.to(dtype).requires_grad_(grad) for t in (q, k, v))
    return q, k, v


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


# ------------------------------------------------------------------------------------------------
# check


def check_impl(name, fn, method, B, H, T, D, dtype, shift, lengths, dist, seed, tol=None):
    """Errors of ``fn`` against the reference on fresh inputs (output and dq, dk, dv)."""
    spec = get_method(method)
    # norm_relu: |q - k|^2 = 2 beta^2 (1 - cos) < 1 needs cos > 1 - 1 / (2 beta^2); beta^2 = 0.6 puts
    # that at cos > 0.17, so rows have a few keys in the support and some fall back to uniform
    q, k, v = make_inputs(B, H, T, D, dtype, dist=dist, seed=seed,
                          beta2=0.6 if spec.family == "norm_relu" else 7.39)
    if spec.family == "norm_relu" and dist == "normal":
        with torch.no_grad():
            q.mul_(0.7)
            k.mul_(0.7)
    y = fn(q, k, v, shift, lengths)
    go = torch.randn_like(y)
    gr = torch.autograd.grad(y, (q, k, v), go, allow_unused=True)
    yr = reference_attention(q, k, v, spec, shift, lengths)
    grr = torch.autograd.grad(yr, (q, k, v), go, allow_unused=True)
    errs = [_rel(y, yr)]
    # dq, dk relative to max(|ref|, 1e-2 |dv_ref|): where (almost) every row of norm_relu falls back
    # to uniform weights the reference's dq, dk are pure rounding noise (~1e-6 |dv|), and a
    # relative error of noise against noise means nothing
    floor = 1e-2 * float(grr[2].float().norm()) if grr[2] is not None else 1e-6
    for a, b in zip(gr, grr):
        b = torch.zeros_like(a) if b is None else b
        a = torch.zeros_like(b) if a is None else a
        errs.append(float((a.float() - b.float()).norm()) / max(float(b.float().norm()), floor, 1e-6))
    t_out, t_grad = tol or TOL[dtype]
    ok = errs[0] <= t_out and max(errs[1:]) <= t_grad and all(math.isfinite(e) for e in errs)
    return dict(section="check", impl=name, method=method, B=B, H=H, T=T, D=D, dtype=str(dtype).split(".")[-1],
                shift=shift, lengths=lengths is not None, dist=dist, err_out=errs[0], err_dq=errs[1],
                err_dk=errs[2], err_dv=errs[3], ok=bool(ok))


def run_checks(quick=False, budget=None, log=print, methods=None):
    rows = []
    B, H = 2, 4
    cases = []
    for method in methods or METHODS:
        cases.append((method, 64, torch.bfloat16, 1, True, "mosaic", 600))
        cases.append((method, 64, torch.bfloat16, 0, False, "normal", 1024))
        if not quick:
            cases.append((method, 16, torch.float32, 1, False, "mosaic", 333))
            cases.append((method, 128, torch.bfloat16, 1, False, "normal", 256))
    seed = 0
    for method, D, dtype, shift, use_len, dist, T in cases:
        if budget is not None and budget.out():
            break
        seed += 1
        lengths = torch.tensor([T, T // 2 + 7], device="cuda") if use_len else None
        impls = [("triton", _ours(method, "triton"))]
        if method == "softmax":
            impls.append(("fused", _fused(method)))
        try:
            for name, fn in impls:
                r = check_impl(name, fn, method, B, H, T, D, dtype, shift, lengths, dist, seed)
                rows.append(r)
                log(f"check {name:7s} {method:14s} D{D} {r['dtype']} shift{shift} len{int(use_len)} {dist:6s} "
                    f"T{T}: out {r['err_out']:.1e} dq {r['err_dq']:.1e} dk {r['err_dk']:.1e} "
                    f"dv {r['err_dv']:.1e} {'ok' if r['ok'] else 'FAIL'}")
        except Exception as e:  # keep going: a failing implementation is a row, not a crash
            rows.append(dict(section="check", impl="triton", method=method, T=T, D=D, ok=False, error=repr(e)[:300]))
            log(f"check {method} D{D}: ERROR {e!r}")
    return rows


# ------------------------------------------------------------------------------------------------
# timing


def _bench_ms(fn, rep_ms=100):
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def time_impl(name, fn, method, B, H, T, D, dtype=torch.bfloat16, rep_ms=100, dist="normal", section="kernels"):
    row = dict(section=section, impl=name, method=method, B=B, H=H, T=T, D=D, dtype=str(dtype).split(".")[-1])
    try:
        q, k, v = make_inputs(B, H, T, D, dtype, dist=dist, seed=1)
        with torch.no_grad():
            row["fwd_ms"] = _bench_ms(lambda: fn(q, k, v, 1, None), rep_ms)
        go = torch.randn(B, H, T, D, device="cuda", dtype=dtype)

        def step():
            y = fn(q, k, v, 1, None)
            y.backward(go)

        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        row["fwdbwd_ms"] = _bench_ms(step, rep_ms)
    except Exception as e:
        row["error"] = repr(e)[:300]
    finally:
        torch.cuda.empty_cache()
    return row


def kernel_impls(methods, adasplash=True):
    impls = [("sdpa_cudnn", "softmax", _sdpa("cudnn")), ("sdpa_flash", "softmax", _sdpa("flash"))]
    if adasplash:
        impls += [("adasplash_v2", "biweight", _adasplash_v2),
                  ("adasplash_nbm", "biweight", _adasplash_nbm(1.5)),
                  ("adasplash_nbm", "epanechnikov", _adasplash_nbm(2.0))]
    for m in methods:
        impls.append(("ours", m, _ours(m, "auto")))
        if m == "softmax":
            impls.append(("ours_fused", m, _fused(m)))
    return impls


def run_kernels(quick=False, budget=None, log=print, adasplash=True, methods=None, shapes=None):
    """Kernel timings at B*H = 256 (B=32, H=8); ``shapes``: (T, D) pairs (default: GPU.md's anchors)."""
    rows = []
    if shapes is not None:
        shapes = [(32, 8, T, D) for T, D in shapes]
    else:
        shapes = [(32, 8, 1024, 64), (32, 8, 4096, 64), (32, 8, 4096, 16)]
        if not quick:
            shapes = [(32, 8, 256, 16), (32, 8, 256, 64), (32, 8, 1024, 16)] + shapes
    if methods is None:
        methods = METHODS if not quick else ("softmax", "biweight", "epanechnikov", "top16_softmax", "relumax")
    for B, H, T, D in shapes:
        for name, method, fn in kernel_impls(methods, adasplash):
            if budget is not None and budget.out():
                return rows
            r = time_impl(name, fn, method, B, H, T, D)
            rows.append(r)
            log(_fmt_time(r))
    return rows


def run_long(quick=False, budget=None, log=print, methods=None):
    rows = []
    Ts = (16384, 65536) if not quick else (65536,)
    for T in Ts:
        impls = [("sdpa_flash", "softmax", _sdpa("flash"))] + [("ours", m, _ours(m, "auto"))
                                                                for m in methods or METHODS]
        for name, method, fn in impls:
            if budget is not None and budget.out():
                return rows
            r = time_impl(name, fn, method, 1, 8, T, 64, rep_ms=50, section="long")
            rows.append(r)
            log(_fmt_time(r))
    return rows


def _fmt_time(r):
    if "error" in r:
        return f"{r['section']} {r['impl']:13s} {r['method']:14s} T{r['T']} D{r['D']}: ERROR {r['error'][:120]}"
    return (f"{r['section']} {r['impl']:13s} {r['method']:14s} T{r['T']:6d} D{r['D']:3d}: fwd {r['fwd_ms']:8.3f} ms  "
            f"fwd+bwd {r['fwdbwd_ms']:8.3f} ms  peak {r['peak_gib']:.3f} GiB")


# ------------------------------------------------------------------------------------------------
# model: training step and long-context evaluation


def _model(cfg_kw, method, backend="auto"):
    from .model import MemoryMosaic, MemoryMosaicConfig

    cfg = MemoryMosaicConfig(method=method, attention_backend=backend, **cfg_kw)
    return MemoryMosaic(cfg).cuda()


LENGTHGEN = dict(vocab_size=36, n_layer=2, n_embd=512, n_head=8, pmem_size=2688)
ICLL = dict(vocab_size=20, n_layer=2, n_embd=128, n_head=8, pmem_size=448)


def train_step_fn(model, fwd, opt, batch, T, amp):
    """One AdamW step on random tokens: ``fwd`` (the model or its compiled form) under bf16 autocast
    when ``amp``, backward, step, zero_grad."""
    V = model.config.vocab_size
    idx = torch.randint(0, V, (batch, T), device="cuda")
    tgt = torch.randint(0, V, (batch, T), device="cuda")
    graphs = fwd is not model

    def step():
        if graphs:  # a new iteration for CUDA-graph modes (a no-op otherwise)
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            _, loss = fwd(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_train_step(cell, method, batch, T, amp, steps=15, backend="auto", compile_model=False):
    """compile_model: False (eager) or an Inductor mode ("default", "reduce-overhead", ...)."""
    if compile_model is True:
        compile_model = "default"
    tag = "" if not compile_model else "_compile" + ("" if compile_model == "default" else f"-{compile_model}")
    row = dict(section="train", impl=f"model_{backend}{tag}", method=method,
               cell=cell, B=batch, T=T, dtype="bf16-autocast" if amp else "fp32-tf32")
    try:
        torch.manual_seed(0)
        model = _model(LENGTHGEN if cell == "lengthgen" else ICLL, method, backend)
        model.train()
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")
        if compile_model:
            # a fresh dynamo cache per model: otherwise the recompile limit (8 per code object) is
            # reached after a few methods and later "compiled" rows silently run eagerly
            torch._dynamo.reset()
        fwd = torch.compile(model, mode=compile_model) if compile_model else model
        step = train_step_fn(model, fwd, opt, batch, T, amp)
        # the peak counts the warm-up: CUDA graphs (reduce-overhead) take their activation memory
        # from a private pool while recording, and replays allocate nothing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        times.sort()
        row["step_ms"] = times[len(times) // 2]
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        row["n_params"] = model.num_parameters() if hasattr(model, "num_parameters") else None
    except Exception as e:
        row["error"] = repr(e)[:300]
    finally:
        torch.cuda.empty_cache()
    return row


def run_train(quick=False, budget=None, log=print, compile_model=False, reference_model=False, methods=None,
              cells=None, eager=True):
    """Training-step rows per cell x method x backend; ``compile_model``: eager and compiled rows both
    (only the compiled ones with ``eager=False``)."""
    rows = []
    compiled = ((False,) if eager or not compile_model else ()) + ((compile_model,) if compile_model else ())
    tf32 = torch.backends.cuda.matmul.allow_tf32
    all_cells = [("lengthgen", 256, 130, True), ("icll", 32, 512, False), ("icll", 32, 948, False)]
    if cells is not None:
        chosen = [c for c in all_cells if f"{c[0]}{c[2] if c[0] == 'icll' else ''}" in cells]
    else:
        chosen = all_cells[:1] if quick else all_cells
    methods = methods or METHODS
    for cell, batch, T, amp in chosen:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        for method in methods:
            for backend in ("auto",) + (("reference",) if reference_model else ()):
                for comp in compiled:
                    if budget is not None and budget.out():
                        torch.backends.cuda.matmul.allow_tf32 = tf32
                        return rows
                    r = time_train_step(cell, method, batch, T, amp, backend=backend, compile_model=comp)
                    rows.append(r)
                    log(f"train {cell:9s} T{T} {r['impl']:22s} {method:14s}: "
                        + (f"{r['step_ms']:8.2f} ms/step  peak {r['peak_gib']:.2f} GiB" if "step_ms" in r
                           else f"ERROR {r.get('error', '')[:150]}"))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return rows


def run_eval(quick=False, budget=None, log=print, methods=None):
    """Eval forward per method; T = 4096 first for every method (the anchor), then the others."""
    rows = []
    Ts = (4096, 1026, 2050, 8192, 16384) if not quick else (4096, 16384)
    models = {}
    for T in Ts:
        for method in methods or METHODS:
            if budget is not None and budget.out():
                return rows
            row = dict(section="eval", impl="model_auto", method=method, cell="lengthgen", B=8, T=T,
                       dtype="bf16-autocast")
            try:
                if method not in models:
                    torch.manual_seed(0)
                    models[method] = _model(LENGTHGEN, method).eval()
                model = models[method]
                idx = torch.randint(0, 36, (8, T), device="cuda")

                def fwd():
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                        model(idx)

                fwd()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                row["fwd_ms"] = _bench_ms(fwd, 100)
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            except Exception as e:
                row["error"] = repr(e)[:300]
            rows.append(row)
            log(f"eval {method:14s} T{T:6d}: " + (f"{row['fwd_ms']:8.2f} ms  peak {row['peak_gib']:.2f} GiB"
                                                  if "fwd_ms" in row else f"ERROR {row.get('error', '')[:150]}"))
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# the whole run


def environment_columns():
    import triton

    try:
        import adasplash
        from importlib.metadata import version

        ada = version("adasplash")
    except Exception:
        ada = None
    return dict(gpu=torch.cuda.get_device_name(0), torch_version=torch.__version__,
                triton_version=triton.__version__, adasplash_version=ada,
                cuda_version=torch.version.cuda)


TRAIN_CELLS = ("lengthgen", "icll512", "icll948")


def run_bench(quick=False, sections=("check", "kernels", "long", "train", "eval"), budget_s=1e9, log=print,
              compile_model=False, reference_model=False, methods=None, cells=None, shapes=None, eager=True):
    """All sections in order; returns the list of row dicts (environment columns added)."""
    if not torch.cuda.is_available():
        raise RuntimeError("sparse-mosaics bench needs a CUDA GPU (none found)")
    budget = Budget(budget_s)
    try:
        import adasplash  # noqa: F401

        have_ada = True
    except Exception:
        have_ada = False
        log("adasplash not importable: its rows are skipped")
    rows = []
    for sec in sections:
        if budget.out():
            log(f"time budget spent: section {sec} skipped")
            continue
        t0 = time.time()
        if sec == "check":
            rows += run_checks(quick, budget, log, methods=methods)
        elif sec == "kernels":
            rows += run_kernels(quick, budget, log, adasplash=have_ada, methods=methods, shapes=shapes)
        elif sec == "long":
            rows += run_long(quick, budget, log, methods=methods)
        elif sec == "train":
            rows += run_train(quick, budget, log, compile_model=compile_model, reference_model=reference_model,
                              methods=methods, cells=cells, eager=eager)
        elif sec == "eval":
            rows += run_eval(quick, budget, log, methods=methods)
        else:
            raise ValueError(f"unknown bench section {sec!r}")
        log(f"-- section {sec}: {time.time() - t0:.0f} s")
    env = environment_columns()
    for r in rows:
        r.update(env)
    return rows


def markdown_tables(rows) -> str:
    """Markdown tables of the timing sections (kernels, long, train, eval)."""
    out = []
    kr = [r for r in rows if r.get("section") in ("kernels", "long") and "fwd_ms" in r]
    if kr:
        out.append("| section | implementation | method | T | D | fwd ms | fwd+bwd ms | peak GiB |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in kr:
            out.append(f"| {r['section']} | {r['impl']} | {r['method']} | {r['T']} | {r['D']} | {r['fwd_ms']:.3f} | "
                       f"{r['fwdbwd_ms']:.3f} | {r['peak_gib']:.3f} |")
        out.append("")
    tr = [r for r in rows if r.get("section") == "train" and "step_ms" in r]
    if tr:
        out.append("| cell | T | batch | implementation | method | ms/step | peak GiB |")
        out.append("|---|---|---|---|---|---|---|")
        for r in tr:
            out.append(f"| {r['cell']} | {r['T']} | {r['B']} | {r['impl']} | {r['method']} | {r['step_ms']:.2f} | "
                       f"{r['peak_gib']:.2f} |")
        out.append("")
    ev = [r for r in rows if r.get("section") == "eval" and "fwd_ms" in r]
    if ev:
        Ts = sorted({r["T"] for r in ev})
        out.append("| method | " + " | ".join(f"T={t} ms" for t in Ts) + " |")
        out.append("|---|" + "---|" * len(Ts))
        for m in dict.fromkeys(r["method"] for r in ev):
            cells = {r["T"]: f"{r['fwd_ms']:.2f}" for r in ev if r["method"] == m}
            out.append(f"| {m} | " + " | ".join(cells.get(t, "–") for t in Ts) + " |")
        out.append("")
    ck = [r for r in rows if r.get("section") == "check"]
    if ck:
        n_ok = sum(bool(r.get("ok")) for r in ck)
        out.append(f"Correctness checks against the reference: {n_ok}/{len(ck)} passed.")
        worst = [r for r in ck if not r.get("ok")]
        for r in worst:
            out.append(f"- FAIL {r.get('impl')} {r.get('method')} D{r.get('D')} {r.get('dtype')} T{r.get('T')}: "
                       f"{ {k: r.get(k) for k in ('err_out', 'err_dq', 'err_dk', 'err_dv', 'error') if k in r} }")
    return "\n".join(out)
