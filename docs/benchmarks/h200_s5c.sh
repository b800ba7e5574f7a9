#!/bin/bash
# Session 5, third device call (carry .whl): every GPU test at the final commit; the entmax forward
# at T = 130 (the length-generalisation cell) with its start and the mask split off; the kernels at
# the anchor shape again (the start's register solve now takes 3 Newton steps, not 8); the long
# sequences (T = 16,384 and 65,536, every method).
source docs/benchmarks/device_env.sh || exit 1
timeout 170 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py tests/test_model.py > $OUT/pytest.log 2>&1; tail -1 $OUT/pytest.log; grep -E "FAILED|Error" $OUT/pytest.log | head -20; s pytest
for o in "" --top=1,1 --no-split; do timeout 20 python3 docs/benchmarks/tune_configs.py epanechnikov,biweight --fwd-only $o --shape=256,8,130,64 --fwd=64,32,4,3 2>&1 | grep ^tune; done | tee $OUT/tune_short.log; s short
timeout 140 $B --sections kernels --shapes 4096x64 --out $OUT/kernels > $OUT/kernels.log 2>&1; grep -E "^kernels|Error|error" $OUT/kernels.log | head -30; s kernels
timeout 170 $B --sections long --out $OUT/long > $OUT/long.log 2>&1; grep -E "^long|Error|error" $OUT/long.log | head -30; s long
