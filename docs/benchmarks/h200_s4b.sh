#!/bin/bash
# A record of session 4's second device call (commit 7b47512).
# Session 4, second device call (about 7 minutes on one H200; carry .whl), after
#   - the candidate passes compact by repeated row-max extraction (no prefix sum over the tile), and
#     top-K picks its K + 1 largest candidates by extraction (no C x C count);
#   - the backward kernels skip the mask on interior tiles (every row sees every key);
#   - entmax forwards at (64, 32, 4, 3) for every T.
# The GPU tests, candidates off / on (32, 64, 128 slots) for the sparsemax and top-K forwards at
# T = 4096 and at the lengthgen shape (T = 130), and the backward block sizes after the split.
source docs/benchmarks/device_env.sh || exit 1
timeout 110 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py > $OUT/pytest.log 2>&1; tail -2 $OUT/pytest.log; grep FAILED $OUT/pytest.log; s pytest
for c in 0 32 64 128; do
  timeout 40 python3 docs/benchmarks/tune_configs.py epanechnikov,top16_softmax,top16_uniform --fwd-only --candidates=$c --fwd=64,64,4,3/64,32,4,3/128,64,8,3 2>&1 | grep ^tune
  timeout 25 python3 docs/benchmarks/tune_configs.py epanechnikov,top16_softmax --fwd-only --candidates=$c --shape=256,8,130,64 --fwd=64,32,4,3/64,64,4,3/32,32,4,2 2>&1 | grep ^tune
done > $OUT/tune.log; cat $OUT/tune.log; s candidates
timeout 60 python3 docs/benchmarks/tune_configs.py biweight,norm_relu --fwd=64,32,4,3 2>&1 | grep ^tune | tee $OUT/tune_bwd.log; s bwd
