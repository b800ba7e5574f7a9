"""Compile every fused attention kernel for an sm_90 target without a GPU (developer tool).

    PYTHONPATH=src python docs/benchmarks/compile_check.py [family names, comma-separated] [head dims, e.g. 16,64]
        [kernels, e.g. dkdv,dq: names starting so]

Runs Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for each family, forward
(with and without the backward statistics) and both backward kernels, at the default block sizes.
Point PYTHONPATH at another Triton to catch compiler crashes of the GPU machine's version (the
interpreter used by the CPU tests does not run these passes).
"""

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparse_mosaics.attention import fused

PTRS_F32 = {"O2", "OF", "ST", "RC", "ZC"}
PTRS_I32 = {"IS", "LENS"}
INTS = {"T", "H", "BH", "shift", "topk", "maxit"}


def signature(fn, dtype, consts):
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in PTRS_F32:
            sig[n] = "*fp32"
        elif n in PTRS_I32:
            sig[n] = "*i32"
        elif n in INTS:
            sig[n] = "i32"
        elif n in ("a_scale", "n_exp", "inv_n", "two_m_alpha", "tol_step", "tol_fold"):
            sig[n] = "fp32"
        else:
            sig[n] = "*" + dtype
    return sig


def compile_one(fn, dtype, consts, cfg):
    _, _, warps, stages = cfg
    src = ASTSource(fn=fn, signature=signature(fn, dtype, consts), constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def main():
    fails = 0
    fams = {"softmax": (0, 1), "entmax2": (1, 1), "entmax1.5": (1, 2), "entmax4/3": (1, 3), "entmax1.25": (1, 4),
            "entmax1.7": (1, 0), "topk_softmax": (2, 1), "topk_uniform": (3, 1), "norm_relu": (4, 1),
            "relumax": (5, 1)}
    if len(sys.argv) > 1:  # a comma-separated subset of the names above
        fams = {k: fams[k] for k in sys.argv[1].split(",")}
    dims = tuple(int(d) for d in sys.argv[2].split(",")) if len(sys.argv) > 2 else (16, 64, 128)
    for (name, (fam, nint)), D, dtype, lens in itertools.product(fams.items(), dims, ("bf16", "fp32"),
                                                                (False, True)):
        prec = "tf32" if dtype == "bf16" else fused.FP32_PRECISION
        jobs = []
        bcfg = fused._config("bwd", D, False, fam)
        # (top-K candidate slots, extraction rounds, entmax forward mask split)
        variants = ((0, 0, False), (64, 0, False), (64, 4, False)) if fam in (2, 3) else ((0, 0, False),)
        variants += ((0, 0, True),) if fam == 1 else ()
        for save, (cand, rounds, split) in itertools.product((False, True), variants):
            fcfg = fused._config("fwd", D, False, fam, cand, 4096)
            topr, topper = fused._entmax_top(nint, 4096, fcfg[1]) if fam == 1 else (1, 1)
            c = dict(D=D, DV=D, BD=D, BDV=D, FAMILY=fam, NINT=nint, HAS_LENS=lens, SAVE=save, PREC=prec,
                     BLOCK_M=fcfg[0], BLOCK_N=fcfg[1], CAND=cand, CROUNDS=rounds, SPLIT=split,
                     TOPR=topr, TOPPER=topper, ROUNDS=3, FOLD=nint >= 1)
            name = "fwd" + ("+save" if save else "") + (f"+cand{cand}" if cand else "")
            name += (f"r{rounds}" if rounds else "") + ("+split" if split else "")
            jobs.append((name, fused._fwd_kernel, c, fcfg))
        c = dict(D=D, DV=D, BD=D, BDV=D, FAMILY=fam, NINT=nint, HAS_LENS=lens, PREC=prec, BLOCK_M=bcfg[0],
                 BLOCK_N=bcfg[1])
        jobs += [("dkdv", fused._bwd_dkdv_kernel, c, bcfg), ("dq", fused._bwd_dq_kernel, c, bcfg)]
        if len(sys.argv) > 3:  # kernels whose names start with one of these (fwd, dkdv, dq, fwd+cand...)
            jobs = [j for j in jobs if j[0].startswith(tuple(sys.argv[3].split(",")))]
        for kind, fn, c, cfg in jobs:
            try:
                compile_one(fn, dtype, c, cfg)
            except Exception as e:  # noqa: BLE001
                fails += 1
                print(f"FAIL {name} {kind} D={D} {dtype} lens={lens}: {str(e).splitlines()[0][:200]}", flush=True)
    print(f"triton {triton.__version__}: {fails} failures", flush=True)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
