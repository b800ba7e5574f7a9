"""Block-size sweep of the fused attention kernels on the GPU (developer tool, not part of the CLI).

    PYTHONPATH=src python docs/benchmarks/tune_configs.py [methods] [--fwd-only] [--shape=B,H,T,D]
        [--fwd=BM,BN,W,S/BM,BN,W,S...] [the knobs of knobs.py: --candidates=C --rounds=R --top=R,PER ...]

Times forward and forward+backward at B=32, H=8, T=4096, D=64 (or --shape), bf16 for a few (BLOCK_M, BLOCK_N,
num_warps, num_stages) of the forward and backward kernels; prints one line per configuration.
"""

import sys

import torch

from sparse_mosaics.attention import fused, get_method
from sparse_mosaics.bench import _bench_ms, make_inputs

from knobs import apply_knobs

FWD = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3)]
BWD = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 1)]
# short rows (T ~ 130, the length-generalisation cell): small query blocks waste less of the last one
FWD_SHORT = [(128, 32, 4, 3), (64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 2, 2), (64, 64, 4, 2)]
BWD_SHORT = [(64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 2, 2), (64, 32, 4, 2)]


def main(methods, fwd_only=False, shape=(32, 8, 4096, 64), fwd=None):
    B, H, T, D = shape
    fwd_cfgs, bwd_cfgs = (FWD, BWD) if T > 512 else (FWD_SHORT, BWD_SHORT)
    fwd_cfgs = fwd or fwd_cfgs
    q, k, v = make_inputs(B, H, T, D, torch.bfloat16, seed=1)
    go = torch.randn_like(q)
    for m in methods:
        spec = get_method(m)
        for cfg in fwd_cfgs:
            fused.CONFIG_OVERRIDE.clear()
            fused.CONFIG_OVERRIDE["fwd"] = cfg
            try:
                with torch.no_grad():
                    t = _bench_ms(lambda: fused.fused_attention(q, k, v, spec, 1, None))
                print(f"tune {m:14s} fwd {cfg}: {t:.3f} ms", flush=True)
            except Exception as e:
                print(f"tune {m:14s} fwd {cfg}: ERROR {e!r}"[:300], flush=True)
        fused.CONFIG_OVERRIDE.clear()
        for cfg in [] if fwd_only else bwd_cfgs:
            fused.CONFIG_OVERRIDE["bwd"] = cfg

            def step():
                fused.fused_attention(q, k, v, spec, 1, None).backward(go)

            try:
                t = _bench_ms(step)
                print(f"tune {m:14s} fwd+bwd with bwd {cfg}: {t:.3f} ms", flush=True)
            except Exception as e:
                print(f"tune {m:14s} bwd {cfg}: ERROR {e!r}"[:300], flush=True)
        fused.CONFIG_OVERRIDE.clear()


if __name__ == "__main__":
    args = apply_knobs(sys.argv[1:], "tune")
    fwd_only = "--fwd-only" in args
    args = [a for a in args if a != "--fwd-only"]
    shape = (32, 8, 4096, 64)
    for a in [a for a in args if a.startswith("--shape=")]:
        args.remove(a)
        shape = tuple(int(x) for x in a.split("=", 1)[1].split(","))
    fwd = None
    for a in [a for a in args if a.startswith("--fwd=")]:  # forward configs to sweep instead of FWD
        args.remove(a)
        fwd = [tuple(int(x) for x in c.split(",")) for c in a.split("=", 1)[1].split("/")]
    main(args[0].split(",") if args else ["biweight", "norm_relu"], fwd_only, shape, fwd)
