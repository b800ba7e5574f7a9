# Sourced by the h200_*.sh device-call scripts: install the carried wheels (.whl: adasplash, entmax)
# next to the GPU machine's torch/triton, point Python at them and at src, record the GPU, and
# define s NAME, which prints the seconds since the start ("== NAME after N s").
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
B="python3 -m sparse_mosaics.cli bench"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
t0=$(date +%s); s() { echo "== $1 after $(( $(date +%s) - t0 )) s"; }
