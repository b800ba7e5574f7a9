#!/bin/bash
# The open measurements of issue 4, in one device call (about 9 minutes on one H200; carry .whl):
#   1. top-K: block sizes, and the per-element-counter search (fused.TOPK_COUNT2D) against the default;
#   2. CUDA graphs (torch.compile mode="reduce-overhead") for the host-bound ICLL step, and lengthgen;
#   3. the bench's `long` section (T = 16,384 and 65,536 kernel timings), never run so far.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
t0=$(date +%s); s() { echo "== $1 after $(( $(date +%s) - t0 )) s"; }
timeout 120 python3 docs/benchmarks/tune_configs.py top16_softmax > $OUT/tune_topk.log 2>&1; grep ^tune $OUT/tune_topk.log; s tune_topk
timeout 120 python3 docs/benchmarks/tune_configs.py top16_softmax --count2d > $OUT/tune_topk2d.log 2>&1; grep ^tune $OUT/tune_topk2d.log; s tune_topk2d
timeout 200 python3 docs/benchmarks/profile_step.py --cells=icll512,lengthgen --variants=eager,compile,compile-ro --no-profile softmax biweight > $OUT/profile.log 2>&1; grep -E "^(icll|lengthgen)" $OUT/profile.log | cut -c1-200; s profile
timeout 120 python3 -m sparse_mosaics.cli bench --sections long --out $OUT/long > $OUT/long.log 2>&1; grep ^long $OUT/long.log; s long
