#!/usr/bin/env bash
# The GPU check: ONE call of at most 8 minutes on a lent GPU machine (torch preinstalled, no
# network), everything it measures brought back in two files: $OUT/gpu_check.tgz (logs, JSON lines,
# junit XML) and $OUT/summary.txt. The archive and the summary are rewritten after every stage, so a
# run cut at any point still returns what it had; every figure is a JSON line written when measured.
#
# Stages, in this order, each with its own limit inside BUDGET_S (default 470 s):
#   build 140 | copy 10 + W2 40 + W3 35 (the fused steps: the headline) | host syncs per training
#   step 20 | CUDA tests 110 (the riskiest cases first, then one pytest per file, newest first,
#   --maxfail; failures rerun with CUDA_LAUNCH_BLOCKING=1) | W1 35 | compute-sanitizer memcheck 30 +
#   synccheck 20 on the risky subset with the caching allocator off  = 440 s of limits, plus ~10 s
#   of env, packing and summary: 450 s, 20 s under the budget (run it with timeout_s 490-600). A
#   stage that ends early leaves its time to the next; none starts with under 15 s left.
# Usage, from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run                # the same stages on the CPU, small sizes
# The dry run uses $PYTHON (default: .venv/bin/python or python3), $OUT (default: a new temp dir),
# checks the in-place build instead of building, and takes about 2 minutes on an idle 2-core machine
# (its limits are 3x the real run's, so that a busy machine still runs every stage). Exit status: 0
# when every stage ran to its end without a failure or an error in the figures.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 1 ]; then
  OUT=${OUT:-$(mktemp -d -t gpu_check_dry.XXXXXX)}
  if [ -z "${PYTHON:-}" ]; then [ -x .venv/bin/python ] && PYTHON=.venv/bin/python || PYTHON=python3; fi
  # Stage limits x3 and a 600 s budget: a busy CI machine still runs every stage (~2 minutes idle).
  DEVICE=cpu SIZE="--small --rounds 3" BUDGET_S=${BUDGET_S:-600} LIMIT_SCALE=3
else
  OUT=${OUT:?set OUT to the folder that comes back}
  PYTHON=${PYTHON:-python3}
  DEVICE=cuda SIZE= BUDGET_S=${BUDGET_S:-470} LIMIT_SCALE=1
fi
PY=$PYTHON
mkdir -p "$OUT"
WORK=$(mktemp -d -t gpu_check.XXXXXX)/gpu_check  # packed into $OUT/gpu_check.tgz; $OUT holds 2 files
mkdir -p "$WORK/tests"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
# Build against the toolkit's own headers: setup.py adds pip's nvidia/cu13 headers only where the
# toolkit lacks them (they would shadow its CCCL with another version's otherwise).
export DEEPFM_FAST_CUDA_WHEEL_HEADERS=${DEEPFM_FAST_CUDA_WHEEL_HEADERS:-auto}
status=0

note() { echo "$*" | tee -a "$SUMMARY"; }
pack() {  # the archive as it stands (cheap: logs and JSON lines)
  tar -czf "$OUT/gpu_check.tgz.tmp" -C "$(dirname "$WORK")" gpu_check 2>/dev/null && mv "$OUT/gpu_check.tgz.tmp" "$OUT/gpu_check.tgz"
}
left() { echo $((BUDGET_S - SECONDS)); }
# step NAME LIMIT_S COMMAND...: one stage, logged to $WORK/NAME.log, cut at min(LIMIT_S, budget left).
step() {
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 15 ]; then
    note "$name: skipped, budget spent ($SECONDS s used of $BUDGET_S)"
    status=1
    return 99
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  local start=$SECONDS
  # bash -c: the command may be one of the functions below (exported); timeout signals its whole group.
  timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" >>"$WORK/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -eq 5 ] && rc=0 && verdict="ok (no test selected)"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="CUT at its limit (what it wrote is kept)"
  elif [ $rc -ne 0 ]; then verdict=FAILED; fi
  note "$name: exit $rc after $((SECONDS - start)) s (limit $limit s): $verdict"
  [ $rc -eq 0 ] || { status=1; tail -n 15 "$WORK/$name.log"; }
  pack
  return $rc
}

# ---- env -------------------------------------------------------------------------------------------
{
  date -u
  echo "mode: $([ $DRY = 1 ] && echo 'dry run (CPU, small sizes)' || echo 'GPU run')  budget ${BUDGET_S}s  commit $(git rev-parse --short HEAD 2>/dev/null)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  [ -f "$CUDA_HOME/include/cublas_v2.h" ] && echo "toolkit headers complete: pip nvidia/cu13 headers stay off the include path"
  uname -r; nproc
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt" >>"$SUMMARY"

# ---- build -----------------------------------------------------------------------------------------
if [ $DRY = 1 ]; then  # the CPU build the tests use (CI built it; its CUDA build check compiles for sm_90)
  step build 60 "$PY" -c "import deepfm_fast; b = deepfm_fast.backend(); print(deepfm_fast.__file__, b); assert b == 'compiled'"
else  # in place, so that the tests and benchmarks import this build
  step build 140 env FORCE_CUDA=1 "$PY" setup.py build_ext --inplace
fi
if [ $? -ne 0 ]; then note "build failed: nothing else can run"; pack; exit 1; fi
"$PY" -c "import deepfm_fast; assert deepfm_fast.cuda_kernels() or '$DEVICE' == 'cpu', 'built without CUDA kernels'" \
  >>"$WORK/build.log" 2>&1 || { note "build: the module has no CUDA kernels"; pack; exit 1; }

# ---- the headline: W2 and W3 fused training steps, then syncs per step ------------------------------
bench() { "$PY" benchmarks/gpu_bench.py "$1" --device "$DEVICE" --out "$WORK" $SIZE "${@:2}"; }
export -f bench
export PY DEVICE WORK SIZE
step copy 10 bench copy
step w2 40 bench w2
step w3 35 bench w3
step syncs 20 bench syncs

# ---- CUDA tests --------------------------------------------------------------------------------------
# The review's riskiest cases: chunked segments (~1,500 occurrences per row, K = 70), 70 fields /
# K = 130 / int32 ids with int64 offsets, B = 0 and K = 1, 7, 33, fused Adam against torch.optim.Adam
# over 1,050 steps, the clamp/off bounds modes, and the findings' own tests.
RISKY_FILES="tests/test_gpu_findings.py tests/test_embedding_fm.py tests/test_bad_input.py tests/test_optim.py"
RISKY_K="bitwise_deterministic or many_fields_wide or batch_and_dim_edge or bounds_check or gpu_findings or adam_equals_torch_adam"
RISKY_K="$DEVICE and ($RISKY_K)"
# One process per file, newest and riskiest first: an illegal address poisons its process only. The
# files whose tests are parametrised over devices (tests/testing.py): their "cuda" cases. The dry
# run selects the same "cuda" cases, which skip with their reason on the CPU (CI runs the CPU ones).
TEST_FILES="tests/test_optim.py tests/test_packed_rows.py tests/test_gpu_findings.py tests/test_embedding_fm.py
  tests/test_bad_input.py tests/test_fm_interaction.py"
pytest_file() {  # pytest_file NAME -k EXPR FILES...: junit XML per run; a failure is rerun with CUDA_LAUNCH_BLOCKING=1
  local name=$1
  shift
  local cache
  cache="$(dirname "$WORK")/pytest_cache_$name"  # outside the archive
  "$PY" -m pytest -q -rs --maxfail=3 -o cache_dir="$cache" --junitxml="$WORK/tests/$name.xml" "$@"
  local rc=$?
  if [ $rc -eq 1 ]; then  # failures: once more, synchronous launches, so the error names its kernel
    echo "== rerun of the failures with CUDA_LAUNCH_BLOCKING=1"
    CUDA_LAUNCH_BLOCKING=1 "$PY" -m pytest -q -rs --maxfail=3 -o cache_dir="$cache" --lf \
      --junitxml="$WORK/tests/${name}_blocking.xml" "$@"
  fi
  return $rc
}
export -f pytest_file
# The dry run leaves out the 1,050 Adam steps (30 s on a CPU; CI's CPU stage runs them).
step tests_risky 45 pytest_file risky -k "$RISKY_K$([ $DRY = 1 ] && echo ' and not adam_equals_torch_adam')" $RISKY_FILES
tests_start=$SECONDS
tests_s=$((65 * LIMIT_SCALE))  # all the files together
for file in $TEST_FILES; do
  used=$((SECONDS - tests_start))
  [ $used -ge $tests_s ] && { note "tests: the rest skipped (their $tests_s s spent): from $file on"; break; }
  name=$(basename "$file" .py)
  step "$name" $(((tests_s - used) / LIMIT_SCALE)) pytest_file "$name" -k cuda "$file"
done

# ---- W1 ----------------------------------------------------------------------------------------------
# One torch.compile per dtype (the headline shape); the dry run compiles float32 only (~25 s on a CPU).
step w1 35 bench w1 $([ $DRY = 1 ] && echo --compile-dtypes=float32)

# ---- compute-sanitizer on the risky subset, the caching allocator off ---------------------------------
SANITIZER=$(command -v compute-sanitizer || { [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && echo "$CUDA_HOME/bin/compute-sanitizer"; })
if [ -z "$SANITIZER" ]; then
  note "sanitizer: compute-sanitizer not found on this machine$([ $DRY = 1 ] && echo ' (dry run: expected)'); moving on"
else
  for tool in memcheck synccheck; do
    limit=30
    [ $tool = synccheck ] && limit=20
    # Adam's 1,050 steps last: the quick cases are sanitized first if the stage is cut.
    step "$tool" $limit env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool $tool --error-exitcode 1 \
      --target-processes all "$PY" -m pytest -q -p no:cacheprovider -x -k "$RISKY_K" $RISKY_FILES
    if grep -qiE "device not supported|not supported on this|unable to (run|initialize)|error 999" "$WORK/$tool.log"; then
      note "$tool: compute-sanitizer refused this machine (gVisor?): $(grep -iE -m1 'not supported|999|unable' "$WORK/$tool.log")"
      break
    fi
  done
fi

# ---- summary -----------------------------------------------------------------------------------------
"$PY" benchmarks/gpu_bench.py summary --out "$WORK" >"$WORK/summary_figures.txt" 2>&1
cat "$WORK/summary_figures.txt" >>"$SUMMARY"
grep -q "^ERROR" "$WORK/summary_figures.txt" && { note "errors in the figures (above)"; status=1; }
grep -qE "tests .*: [0-9]+ run, [1-9]|[1-9][0-9]* errors," "$WORK/summary_figures.txt" && { note "test failures (above)"; status=1; }
note "total: $SECONDS s of $BUDGET_S; status $status; archive $OUT/gpu_check.tgz"
pack
exit $status
