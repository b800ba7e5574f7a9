#!/bin/bash
# A record of the device call behind docs/benchmarks/h200_*.log (session 2, commit 8c606be).
# The device call behind the README's performance section (one H200, about 9 minutes).
# usage (through the device tool, with .whl carried): bash docs/benchmarks/h200_final.sh
source docs/benchmarks/device_env.sh || exit 1
timeout 90 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py tests/test_model.py > $OUT/pytest.log 2>&1; tail -2 $OUT/pytest.log; grep FAILED $OUT/pytest.log; s pytest
timeout 140 $B --sections kernels --shapes 4096x64,1024x64 --out $OUT/kernels > $OUT/kernels.log 2>&1; grep ^kernels $OUT/kernels.log | grep "T  4096"; s kernels
timeout 250 $B --sections train --compile --cells lengthgen --out $OUT/train_lg > $OUT/train_lg.log 2>&1; grep ^train $OUT/train_lg.log; s train_lg
timeout 60 $B --sections train --compile --cells icll948 --methods softmax,biweight --out $OUT/train_icll_c > $OUT/train_icll_c.log 2>&1; grep ^train $OUT/train_icll_c.log; s train_icll_c
timeout 50 $B --sections train --cells icll512,icll948 --out $OUT/train_icll > $OUT/train_icll.log 2>&1; grep ^train $OUT/train_icll.log; s train_icll
