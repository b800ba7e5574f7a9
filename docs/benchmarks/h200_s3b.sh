#!/bin/bash
# A record of the device call behind docs/benchmarks/h200_*.log (commit 4c3a976).
# Session 3, second device call (about 9.5 minutes on one H200; carry .whl): the GPU tests, the
# top-K search with interpolated pivots (block sizes), every kernel at T = 4096, D = 64 side by
# side with SDPA and adasplash, and the length-generalisation training step per method, eager and
# compiled with CUDA graphs (train.compile: reduce-overhead).
source docs/benchmarks/device_env.sh || exit 1
timeout 100 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py tests/test_model.py > $OUT/pytest.log 2>&1; tail -2 $OUT/pytest.log; grep FAILED $OUT/pytest.log; s pytest
timeout 35 python3 docs/benchmarks/tune_configs.py top16_softmax --fwd-only > $OUT/tune_topk.log 2>&1; grep ^tune $OUT/tune_topk.log; s tune_topk
timeout 150 $B --sections kernels --shapes 4096x64 --out $OUT/kernels > $OUT/kernels.log 2>&1; grep ^kernels $OUT/kernels.log; s kernels
timeout 280 $B --sections train --compile reduce-overhead --cells lengthgen --out $OUT/train_lg > $OUT/train_lg.log 2>&1; grep ^train $OUT/train_lg.log; s train_lg
