#!/bin/bash
# A record of the device call behind docs/benchmarks/h200_*.log (commit 504878e; its tune_configs --counters option is gone since).
# Session 3, first device call (about 9.5 minutes on one H200; carry .whl):
#   1. the GPU tests (new: the earlier entmax stop for 16-bit inputs, the relaxed compiled top-K test);
#   2. top-K counter variants (fused.TOPK_COUNTERS = tile / element / float) x forward block sizes,
#      and the cost of one threshold pass (pass_costs.py);
#   3. kernels at T = 4096, D = 64 with the new entmax stop, side by side with SDPA and adasplash;
#   4. CUDA graphs (torch.compile mode="reduce-overhead") for the host-bound ICLL step and lengthgen;
#   5. the bench's `long` section (T = 16,384 and 65,536), never run so far.
source docs/benchmarks/device_env.sh || exit 1
timeout 110 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py tests/test_model.py > $OUT/pytest.log 2>&1; tail -2 $OUT/pytest.log; grep FAILED $OUT/pytest.log; s pytest
for c in tile element float; do
  timeout 40 python3 docs/benchmarks/tune_configs.py top16_softmax --fwd-only --counters=$c > $OUT/tune_$c.log 2>&1; grep ^tune $OUT/tune_$c.log
done; s tune_topk
timeout 45 python3 docs/benchmarks/pass_costs.py > $OUT/passes.log 2>&1; grep ^passes $OUT/passes.log; s passes
timeout 100 python3 -m sparse_mosaics.cli bench --sections kernels --shapes 4096x64 --out $OUT/kernels > $OUT/kernels.log 2>&1; grep ^kernels $OUT/kernels.log; s kernels
timeout 130 python3 docs/benchmarks/profile_step.py --cells=icll512,lengthgen --variants=eager,compile-ro --no-profile softmax biweight > $OUT/profile.log 2>&1; grep -E "^(icll|lengthgen)" $OUT/profile.log | cut -c1-200; grep -iE "error|warn" $OUT/profile.log | sort | uniq -c | head -5; s profile
timeout 80 python3 -m sparse_mosaics.cli bench --sections long --out $OUT/long > $OUT/long.log 2>&1; grep ^long $OUT/long.log; tail -3 $OUT/long.log; s long
