#!/bin/bash
# Session 5, second device call (about 9 minutes on one H200; carry .whl), after the first's
# findings became defaults (the pass cap a runtime argument, FORWARD_MASK_SPLIT on, entmax forward
# blocks (64, 64) from T = 1024, ENTMAX_TOP (8, 2) / (8, 1)):
#   1. the entmax GPU tests (among them the start and fold cases that failed to compile in call 1);
#   2. the kernels at the anchor shape side by side with SDPA and adasplash;
#   3. the start's settings again, now with the mask split and (64, 64) blocks, and the blocks at
#      T = 130 (the length-generalisation cell);
#   4. the length-generalisation training step with CUDA graphs, softmax and the entmax family.
source docs/benchmarks/device_env.sh || exit 1
timeout 100 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py -k "epanechnikov or biweight or triweight or entmax" > $OUT/pytest.log 2>&1; tail -1 $OUT/pytest.log; grep -E "FAILED|Error" $OUT/pytest.log | head -20; s pytest
timeout 140 $B --sections kernels --shapes 4096x64 --out $OUT/kernels > $OUT/kernels.log 2>&1; grep -E "^kernels|Error|error" $OUT/kernels.log | head -30; s kernels
for t in 8,2 16,2 8,1 16,1; do timeout 20 python3 docs/benchmarks/tune_configs.py epanechnikov,biweight,entmax_1.25 --fwd-only --top=$t --fwd=64,64,4,3 2>&1 | grep ^tune; done | tee $OUT/tune_top.log; s top
timeout 30 python3 docs/benchmarks/tune_configs.py epanechnikov,biweight --fwd-only --shape=256,8,130,64 --fwd=64,32,4,3/64,64,4,3/32,32,4,2 2>&1 | grep ^tune | tee $OUT/tune_short.log; s short
timeout 230 $B --sections train --compile reduce-overhead --no-eager --cells lengthgen --methods softmax,epanechnikov,biweight,triweight,entmax_1.25 --out $OUT/train_lg > $OUT/train_lg.log 2>&1; grep -E "^train|Error|error" $OUT/train_lg.log; s train_lg
