#!/bin/bash
# The device call behind the README's performance section (one H200, about 9 minutes).
# usage (through the device tool, with .whl carried): bash docs/benchmarks/h200_final.sh
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
B="python3 -m sparse_mosaics.cli bench"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
t0=$(date +%s); s() { echo "== $1 after $(( $(date +%s) - t0 )) s"; }
timeout 80 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py tests/test_model.py > $OUT/pytest.log 2>&1; tail -2 $OUT/pytest.log; grep FAILED $OUT/pytest.log; s pytest
timeout 80 $B --sections kernels --methods softmax,top16_softmax,top16_uniform --out $OUT/kernels > $OUT/kernels.log 2>&1; s kernels
timeout 200 $B --sections train --compile --cells lengthgen --out $OUT/train_lg > $OUT/train_lg.log 2>&1; grep ^train $OUT/train_lg.log; s train_lg
timeout 80 $B --sections train --compile --cells icll948 --methods softmax,biweight,top16_softmax --out $OUT/train_icll_c > $OUT/train_icll_c.log 2>&1; grep ^train $OUT/train_icll_c.log; s train_icll_c
timeout 60 $B --sections train --cells icll512,icll948 --out $OUT/train_icll > $OUT/train_icll.log 2>&1; grep ^train $OUT/train_icll.log; s train_icll
timeout 55 $B --sections eval --methods biweight,top16_softmax,relumax,norm_relu,triweight,top16_uniform,entmax_1.25 --out $OUT/eval > $OUT/eval.log 2>&1; grep ^eval $OUT/eval.log; s eval
