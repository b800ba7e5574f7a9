#!/bin/bash
# Session 5, fifth device call (about 4 minutes; carry .whl), after the fold became sparsemax's
# alone, from T = 1024 on (call 4): the entmax GPU tests, then the kernels at the anchor shape.
source docs/benchmarks/device_env.sh || exit 1
timeout 100 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py -k "epanechnikov or biweight or triweight or entmax" > $OUT/pytest.log 2>&1; tail -1 $OUT/pytest.log; grep -E "FAILED|Error" $OUT/pytest.log | head -20; s pytest
timeout 130 $B --sections kernels --shapes 4096x64 --methods epanechnikov,biweight,triweight,entmax_1.25 --out $OUT/kernels > $OUT/kernels.log 2>&1; grep -E "^kernels|Error|error" $OUT/kernels.log | head -30; s kernels
