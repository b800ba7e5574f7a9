#!/bin/bash
# A record of the device call behind docs/benchmarks/h200_*.log (commit 083db4f).
# Session 3, third device call (about 8 minutes on one H200; carry .whl): the GPU tests the second
# call's time limit cut (CUDA-graph training, compiled model), block sizes at the length-
# generalisation shape (B=256, H=8, T=130, D=64), the ICLL training steps eager and with CUDA
# graphs (train.compile: reduce-overhead), and where the ICLL softmax step's GPU time goes.
source docs/benchmarks/device_env.sh || exit 1
timeout 100 python3 -m pytest -q -n 4 -p no:cacheprovider tests/test_gpu.py -k "cuda_graphs or compiled_model" > $OUT/pytest.log 2>&1; tail -2 $OUT/pytest.log; grep -E "FAILED|Error" $OUT/pytest.log | head -5; s pytest
timeout 90 python3 docs/benchmarks/tune_configs.py epanechnikov,top16_softmax --shape=256,8,130,64 > $OUT/tune_short.log 2>&1; grep ^tune $OUT/tune_short.log; s tune_short
timeout 190 $B --sections train --compile reduce-overhead --cells icll512 --out $OUT/train_icll512 > $OUT/train_icll512.log 2>&1; grep ^train $OUT/train_icll512.log; s train_icll512
timeout 70 $B --sections train --compile reduce-overhead --cells icll948 --methods softmax,biweight --out $OUT/train_icll948 > $OUT/train_icll948.log 2>&1; grep ^train $OUT/train_icll948.log; s train_icll948
timeout 45 python3 docs/benchmarks/profile_step.py --cells=icll512 --variants=compile-ro softmax > $OUT/profile_icll.log 2>&1; grep -E "^icll" $OUT/profile_icll.log; grep -A22 "Name" $OUT/profile_icll.log | cut -c1-150 | head -26; s profile
