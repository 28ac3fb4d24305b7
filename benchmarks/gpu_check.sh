#!/usr/bin/env bash
# The GPU check, in one script for a machine with an NVIDIA GPU (torch preinstalled, no network):
# build for sm_90, run the CUDA tests, run the GPU benchmarks, and leave logs and JSON in $OUT.
# Budget: under 8 minutes on an H200. Usage, from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: runs one stage, logs it, records a failure, goes on
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || { status=1; tail -n 30 "$OUT/$name.log"; }
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 2
} >"$OUT/env.txt" 2>&1

# In place, so that the tests and benchmarks import this build.
step build 300 env FORCE_CUDA=1 "$PY" setup.py build_ext --inplace || exit 1
step tests_cuda 240 "$PY" -m pytest tests -q -p no:cacheprovider -k cuda -rs
for dtype in float32 bfloat16; do
  step "bench_w1_cuda_$dtype" 150 env DEEPFM_FAST_BENCH_DEVICE=cuda DEEPFM_FAST_BENCH_DTYPE=$dtype \
    "$PY" -m pytest benchmarks/bench_fm_interaction.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/w1_cuda_$dtype.json"
done
# W2 (B=4096, 26 fields, K=16; 10K and 400K rows per field): embedding_fm forward vs the reference,
# and the sparse-SGD step vs nn.EmbeddingBag(sparse=True), on the GPU, float32.
step bench_w2_cuda 150 env DEEPFM_FAST_BENCH_DEVICE=cuda \
  "$PY" -m pytest benchmarks/bench_embedding_fm.py -k w2 --benchmark-only -q -p no:cacheprovider \
  --benchmark-json "$OUT/w2_cuda.json"
exit $status
