#!/bin/bash
# A record of session 4's third device call (commit c5f1066).
# Session 4, third device call (about 10 minutes on one H200; carry .whl): the README's numbers, in
# one run, after top-K's 64 candidate slots became the default for rows of 1024+ keys and the
# backward's blocks (64, 64, 4, 3). The GPU tests of the changed paths, the kernels at the anchor
# shape side by side with SDPA and adasplash, then the training steps of every cell with CUDA graphs.
source docs/benchmarks/device_env.sh || exit 1
timeout 60 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py -k "top16 or ties" > $OUT/pytest.log 2>&1; tail -1 $OUT/pytest.log; grep FAILED $OUT/pytest.log; s pytest
timeout 150 $B --sections kernels --shapes 4096x64 --out $OUT/kernels > $OUT/kernels.log 2>&1; grep -E "^kernels|Error|error" $OUT/kernels.log | head -30; s kernels
timeout 170 $B --sections train --compile reduce-overhead --no-eager --cells lengthgen --out $OUT/train_lg > $OUT/train_lg.log 2>&1; grep ^train $OUT/train_lg.log; s train_lg
timeout 95 $B --sections train --compile reduce-overhead --no-eager --cells icll512 --out $OUT/train_icll512 > $OUT/train_icll512.log 2>&1; grep ^train $OUT/train_icll512.log; s icll512
timeout 100 $B --sections train --compile reduce-overhead --no-eager --cells icll948 --out $OUT/train_icll948 > $OUT/train_icll948.log 2>&1; grep ^train $OUT/train_icll948.log; s icll948
