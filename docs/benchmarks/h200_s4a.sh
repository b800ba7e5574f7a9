#!/bin/bash
# A record of session 4's first device call (commit a38d253; output in h200_s4.log; run as h200_next.sh).
# The open measurements of issue 4 after session 3, in one device call (about 10 minutes; carry .whl):
#   1. the GPU tests, among them the opt-in thresholds from candidates (fused.ENTMAX_CANDIDATES and
#      fused.TOPK_CANDIDATES),
#      the CUDA-graph training test at its padding multiple of 16, and fp32 softmax through the fused kernel;
#   2. candidates on / off: entmax and top-K forwards at T = 4096 and at the lengthgen shape (T = 130);
#   3. the ICLL T = 948 step with CUDA graphs for every method (only softmax and biweight so far).
# If the candidates win, make them the default (per alpha, if alpha = 1.5 overflows; top-K needs C > K),
# then re-run the kernels section and the lengthgen train section.
source docs/benchmarks/device_env.sh || exit 1
timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py tests/test_model.py > $OUT/pytest.log 2>&1; tail -2 $OUT/pytest.log; grep FAILED $OUT/pytest.log; s pytest
for c in 0 32 64 128; do
  timeout 50 python3 docs/benchmarks/tune_configs.py epanechnikov,biweight,entmax_1.25,top16_softmax --fwd-only --candidates=$c > $OUT/tune_cand$c.log 2>&1; grep ^tune $OUT/tune_cand$c.log
  timeout 25 python3 docs/benchmarks/tune_configs.py epanechnikov,biweight,top16_softmax --fwd-only --candidates=$c --shape=256,8,130,64 > $OUT/tune_short_cand$c.log 2>&1; grep ^tune $OUT/tune_short_cand$c.log
done; s candidates
timeout 140 python3 -m sparse_mosaics.cli bench --sections train --compile reduce-overhead --cells icll948 --out $OUT/icll948 > $OUT/icll948.log 2>&1; grep ^train $OUT/icll948.log; s icll948
