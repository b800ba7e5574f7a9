#!/bin/bash
# Session 5, first device call (about 9 minutes on one H200; carry .whl): the new entmax forward
# (start from each row's 16 largest tile maxima, output pass with the folded last step).
#   1. every GPU test (test_gpu.py, test_model.py);
#   2. the kernels at the anchor shape (T = 4096, D = 64) side by side with SDPA and adasplash;
#   3. the threshold-pass costs of the new forward (pass_costs.py);
#   4. the start's settings (ENTMAX_TOP) and the forward mask split, forward only.
source docs/benchmarks/device_env.sh || exit 1
timeout 170 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py tests/test_model.py > $OUT/pytest.log 2>&1; tail -1 $OUT/pytest.log; grep -E "FAILED|Error" $OUT/pytest.log | head -20; s pytest
timeout 150 $B --sections kernels --shapes 4096x64 --out $OUT/kernels > $OUT/kernels.log 2>&1; grep -E "^kernels|Error|error" $OUT/kernels.log | head -30; s kernels
timeout 60 python3 docs/benchmarks/pass_costs.py epanechnikov,biweight,entmax_1.25 2>&1 | grep ^passes | tee $OUT/passes.log; s passes
for t in 16,2 8,2 16,4 16,1 8,1; do timeout 25 python3 docs/benchmarks/tune_configs.py epanechnikov,biweight --fwd-only --top=$t --fwd=64,32,4,3 2>&1 | grep ^tune; done | tee $OUT/tune_top.log; s top
for sp in "" --split; do timeout 30 python3 docs/benchmarks/tune_configs.py epanechnikov,biweight,entmax_1.25 --fwd-only $sp --fwd=64,32,4,3/64,64,4,3 2>&1 | grep ^tune; done | tee $OUT/tune_split.log; s split
