#!/bin/bash
# One device call: install carried wheels, GPU tests, optional tuning, the bench. Logs under $OUT.
# usage: bash docs/benchmarks/h200_call.sh "<pytest args or 'skip'>" "<tune methods or 'skip'>" "<bench args>"
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache
if [ -f .tcache/tcache.tgz ]; then mkdir -p /tmp && tar xzf .tcache/tcache.tgz -C /tmp; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))"
t0=$(date +%s)
if [ "$1" != "skip" ]; then
  timeout ${PYTEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider $1 2>&1 | tee $OUT/pytest.log | tail -40
fi
echo "== pytest done after $(( $(date +%s) - t0 )) s"
if [ "$2" != "skip" ]; then
  timeout ${TUNE_TIMEOUT:-120} python3 docs/benchmarks/tune_configs.py $2 2>&1 | tee $OUT/tune.log
fi
echo "== tune done after $(( $(date +%s) - t0 )) s"
timeout ${BENCH_TIMEOUT:-300} python3 -m sparse_mosaics.cli bench $3 --out $OUT/bench 2>&1 | tee $OUT/bench.log
echo "== bench done after $(( $(date +%s) - t0 )) s"
tar czf $OUT/tcache.tgz -C /tmp tcache 2>/dev/null; ls -la $OUT
