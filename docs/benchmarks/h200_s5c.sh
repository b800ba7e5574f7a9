#!/bin/bash
# Session 5, third device call (carry .whl): every GPU test at the final commit, then the long
# sequences (T = 16,384 and 65,536, every method) and the long-context evaluation forward.
source docs/benchmarks/device_env.sh || exit 1
timeout 170 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py tests/test_model.py > $OUT/pytest.log 2>&1; tail -1 $OUT/pytest.log; grep -E "FAILED|Error" $OUT/pytest.log | head -20; s pytest
timeout 180 $B --sections long --out $OUT/long > $OUT/long.log 2>&1; grep -E "^long|Error|error" $OUT/long.log | head -30; s long
timeout 100 $B --sections eval --methods softmax,epanechnikov,biweight,triweight,entmax_1.25 --out $OUT/eval > $OUT/eval.log 2>&1; grep -E "^eval|Error|error" $OUT/eval.log | head -30; s eval
