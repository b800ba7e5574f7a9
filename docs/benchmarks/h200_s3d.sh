#!/bin/bash
# A record of the device call behind docs/benchmarks/h200_*.log (commit 6028c2e).
# Session 3, fourth device call (about 5 minutes on one H200; carry .whl): after fp32 softmax moved
# from SDPA's memory-efficient kernel to the fused kernel and entmax got (64, 32) blocks for short
# rows: the GPU tests of those paths, then the training steps they change, eager and with CUDA graphs.
source docs/benchmarks/device_env.sh || exit 1
timeout 70 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py -k "fp32 or softmax or epanechnikov or biweight" > $OUT/pytest.log 2>&1; tail -2 $OUT/pytest.log; grep -E "FAILED" $OUT/pytest.log | head -5; s pytest
timeout 60 $B --sections train --compile reduce-overhead --cells icll512 --methods softmax,top16_softmax --out $OUT/train_icll512 > $OUT/train_icll512.log 2>&1; grep ^train $OUT/train_icll512.log; s train_icll512
timeout 120 $B --sections train --compile reduce-overhead --cells lengthgen --methods softmax,epanechnikov,biweight,top16_softmax --out $OUT/train_lg > $OUT/train_lg.log 2>&1; grep ^train $OUT/train_lg.log; s train_lg
