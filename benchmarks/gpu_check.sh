#!/usr/bin/env bash
# The GPU check, in one script for a machine with an NVIDIA GPU (torch preinstalled, no network):
# build for sm_90, run the CUDA tests, run the GPU benchmarks, and leave logs and JSON in $OUT.
# Everything fits in BUDGET_S seconds (default 470, under 8 minutes): each stage gets at most its
# own limit and what is left of the budget, and a stage that fails does not stop the later ones.
# Usage, from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-470}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
status=0
step() {  # step NAME LIMIT_S COMMAND...: one stage, logged to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped, budget spent" | tee -a "$OUT/summary.txt"
    status=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || { status=1; tail -n 30 "$OUT/$name.log"; }
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 2
} >"$OUT/env.txt" 2>&1

bench() {  # bench NAME LIMIT_S FILE [pytest args...]: a benchmark file on the GPU, JSON into $OUT
  local name=$1 limit=$2 file=$3
  shift 3
  step "$name" "$limit" env DEEPFM_FAST_BENCH_DEVICE=cuda "$PY" -m pytest "benchmarks/$file" --benchmark-only -q \
    -p no:cacheprovider --benchmark-json "$OUT/$name.json" "$@"
}

# In place, so that the tests and benchmarks import this build.
step build 240 env FORCE_CUDA=1 "$PY" setup.py build_ext --inplace || exit 1
step tests_cuda 150 "$PY" -m pytest tests -q -p no:cacheprovider -k cuda -rs -x
# Every kernel once more under compute-sanitizer's memcheck (out-of-bounds and misaligned accesses),
# on a short subset: memcheck slows kernels 10-100x.
if command -v compute-sanitizer >/dev/null || [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
  SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  step memcheck_cuda 90 "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -p no:cacheprovider -x \
    tests/test_embedding_fm.py tests/test_optim.py -k "cuda and (reference or adam_rows or two_tables)"
fi
# W1: the FM layer, float32 and bfloat16, B in {4096, 65536}.
bench w1_cuda_float32 60 bench_fm_interaction.py
DEEPFM_FAST_BENCH_DTYPE=bfloat16 bench w1_cuda_bfloat16 60 bench_fm_interaction.py
# W2: embedding_fm forward vs the reference, sparse-SGD step vs nn.EmbeddingBag(sparse=True).
bench w2_cuda 60 bench_embedding_fm.py -k w2
# W2/W3 steps with the fused optimizers (10.4 M-row tables) vs plain PyTorch.
bench fused_optim_cuda 90 bench_fused_optim.py
exit $status
