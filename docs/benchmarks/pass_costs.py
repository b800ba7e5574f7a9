"""What one pass over the keys costs: the fused forward timed with the iteration caps lowered
(developer tool; the outputs at low caps are wrong, only the times are of interest).

    PYTHONPATH=src python docs/benchmarks/pass_costs.py [methods] [the knobs of knobs.py]

B=32, H=8, T=4096, D=64, bf16. Entmax: fused.MAX_NEWTON in 0..4 (0 = the start pass and the
output pass only, a single output pass: ENTMAX_FOLD_ROUNDS at most 1); top-K: fused.MAX_SELECT in 0..4
(0 = the min/max pass and the output pass). The differences between consecutive caps are the cost
of one threshold pass of the slowest blocks.
"""

import sys

import torch

from sparse_mosaics.attention import fused, get_method
from sparse_mosaics.bench import _bench_ms, make_inputs

from knobs import apply_knobs


def main(methods):
    q, k, v = make_inputs(32, 8, 4096, 64, torch.bfloat16, seed=1, grad=False)
    for m in methods:
        spec = get_method(m)
        attr = "MAX_SELECT" if spec.family.startswith("topk") else "MAX_NEWTON"
        full, rounds = getattr(fused, attr), fused.ENTMAX_FOLD_ROUNDS
        # below the full cap, a single output pass, folding only where the setting folds
        low = min(fused._fold_rounds(fused._params(spec)["nint"], 4096), 1)
        for cap in (0, 1, 2, 3, 4, full):
            setattr(fused, attr, cap)
            fused.ENTMAX_FOLD_ROUNDS = rounds if cap == full else low
            with torch.no_grad():
                t = _bench_ms(lambda: fused.fused_attention(q, k, v, spec, 1, None))
            print(f"passes {m:14s} {attr}={cap:3d}: fwd {t:.3f} ms", flush=True)
        setattr(fused, attr, full)
        fused.ENTMAX_FOLD_ROUNDS = rounds


if __name__ == "__main__":
    args = apply_knobs(sys.argv[1:], "passes")
    main(args[0].split(",") if args else ["epanechnikov", "biweight", "entmax_1.25", "top16_softmax"])
