#!/bin/bash
# The open measurements of issue 4 after session 4, in one device call (about 9 minutes; carry .whl), then the long section in a second:
#   1. every GPU test (last full run: call 2 of session 4, before top-K's candidates became the default);
#   2. what the candidate pass costs (pass_costs.py at 0 threshold passes, candidates off / on), and
#      whether its nested extraction loop stops Triton from pipelining the key loop (stages 1 vs 3:
#      equal times mean no pipelining; then compact without a nested loop);
#   3. (a second call: `$B --sections long`, the README's long rows are from session 3);
#   4. the peak memory of CUDA-graph training steps, now counted from before the warm-up;
#   5. unrolled candidate extraction (fused.CANDIDATE_ROUNDS = 3, 4): if it wins, sparsemax may
#      finally gain from candidates (3 passes instead of 8) and top-K more;
#   6. the entmax forward without the mask on interior tiles (fused.FORWARD_MASK_SPLIT), off / on.
source docs/benchmarks/device_env.sh || exit 1
timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py tests/test_model.py > $OUT/pytest.log 2>&1; tail -1 $OUT/pytest.log; grep FAILED $OUT/pytest.log; s pytest
for c in 0 64; do timeout 40 python3 docs/benchmarks/pass_costs.py epanechnikov,top16_softmax --candidates=$c 2>&1 | grep ^passes; done | tee $OUT/passes.log; s passes
timeout 40 python3 docs/benchmarks/tune_configs.py top16_softmax,epanechnikov --fwd-only --candidates=64 --fwd=64,32,4,1/64,32,4,2/64,32,4,3 2>&1 | grep ^tune | tee $OUT/tune_stages.log; s stages
for r in 3 4; do for c in 64 128; do  # unrolled extraction rounds (fused.CANDIDATE_ROUNDS): no nested loop
  timeout 30 python3 docs/benchmarks/tune_configs.py top16_softmax,epanechnikov --fwd-only --candidates=$c --rounds=$r --fwd=64,32,4,3/64,64,4,3 2>&1 | grep ^tune
done; done | tee $OUT/tune_rounds.log; s rounds
for sp in "" --split; do timeout 30 python3 docs/benchmarks/tune_configs.py epanechnikov,biweight,entmax_1.25 --fwd-only $sp --fwd=64,32,4,3/128,32,4,3 2>&1 | grep ^tune; done | tee $OUT/tune_split.log; s split
timeout 60 $B --sections train --compile reduce-overhead --cells icll512 --methods softmax,biweight 2>&1 | grep ^train | tee $OUT/train_peak.log; s train_peak
