#!/bin/bash
# Session 5, fourth device call (about 2 minutes; carry .whl): does the output pass's fold pay at
# T = 130 (the length-generalisation cell), where call 3 found the new entmax forward slower than
# session 4's? Forward with the fold (default) and without (fused.ENTMAX_FOLD_ROUNDS = 0), at T = 130
# and, for the record of what the fold gives there, T = 4096.
source docs/benchmarks/device_env.sh || exit 1
for o in "" --fold-rounds=0; do timeout 25 python3 docs/benchmarks/tune_configs.py epanechnikov,biweight,triweight --fwd-only $o --shape=256,8,130,64 --fwd=64,32,4,3 2>&1 | grep ^tune; done | tee $OUT/tune_short.log; s short
for o in "" --fold-rounds=0; do timeout 25 python3 docs/benchmarks/tune_configs.py epanechnikov,biweight --fwd-only $o --fwd=64,64,4,3 2>&1 | grep ^tune; done | tee $OUT/tune_long.log; s long
