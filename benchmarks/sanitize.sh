#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: builds deepfm_fast._C with
# DEEPFM_FAST_SANITIZE=1 in a COPY of the tree (the checkout's own in-place module is left alone),
# runs the tests against it with gcc's ASan runtime preloaded, and fails on a test failure or on
# any sanitizer report. Only our extension is instrumented; Python, torch and libgomp are not.
# Usage, from the repository root:
#   bash benchmarks/sanitize.sh [pytest args...]      (default: the whole suite)
# Environment:
#   SANITIZE_WORK  work folder (default /tmp/deepfm_fast-sanitize): the copy, the venv, the logs.
#   SANITIZE_VENV  an existing venv with torch and the test dependencies, used as it is: nothing is
#                  installed into it. Default: a fresh venv in SANITIZE_WORK with torch 2.13.0 and
#                  the package's [test,anchors] extras.
#   DEEPFM_FAST_DEBUG=1  an -O0 build: 2 minutes to compile here instead of 9 at -O3, and no sanitizer
#                  check is optimised away (CI uses it); the default builds as shipped, -O3.
#   MAX_JOBS       parallel compile jobs (default 1: the machines are shared).
# The whole run is logged to $SANITIZE_WORK/sanitize.log; ASan's reports also go to files in
# $SANITIZE_WORK/reports/ (a subprocess's stderr may be swallowed by the test that started it).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${SANITIZE_WORK:-/tmp/deepfm_fast-sanitize}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
export OMP_WAIT_POLICY=PASSIVE  # libgomp's spin-wait slows 2-thread ops 5x on a busy machine
export PIP_DISABLE_PIP_VERSION_CHECK=1 MAX_JOBS=${MAX_JOBS:-1} PYTHONUNBUFFERED=1
rm -rf "$WORK/src" "$WORK/reports" "$WORK/sanitize.log" "$WORK/tests.log"
mkdir -p "$WORK/reports"
LOG=$WORK/sanitize.log
exec > >(tee "$LOG") 2>&1
start=$SECONDS
# This machine's pip config names local package folders that may not exist; drop those warnings.
pip_install() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }

# The tracked files as they are in the work tree; the tests find the real data in ../shared.
git ls-files -z | tar --null -T - -cf - | (mkdir -p "$WORK/src" && tar -xf - -C "$WORK/src")
[ -d "$REPO/../shared" ] && ln -sfn "$(cd "$REPO/../shared" && pwd)" "$WORK/shared"

echo "== build with DEEPFM_FAST_SANITIZE=1 in $WORK/src"
if [ -n "${SANITIZE_VENV:-}" ]; then
  PY=$SANITIZE_VENV/bin/python
  (cd "$WORK/src" && env DEEPFM_FAST_SANITIZE=1 USE_CUDA=0 "$PY" setup.py -q build_ext --inplace)
else
  rm -rf "$WORK/venv"
  python3 -m venv "$WORK/venv"
  PY=$WORK/venv/bin/python
  pip_install "$PY" -m pip install -q torch==2.13.0 setuptools wheel ninja pybind11
  (cd "$WORK/src" && pip_install env DEEPFM_FAST_SANITIZE=1 USE_CUDA=0 \
    "$PY" -m pip install -q --no-build-isolation -e ".[test,anchors]")
fi
echo "build took $((SECONDS - start)) s"
module=$(ls "$WORK"/src/deepfm_fast/_C*.so)
# (grep reads all of ldd's output: with -q, ldd can die of SIGPIPE and fail the pipeline)
ldd "$module" | grep -E "libasan|libubsan" || { echo "$module is not linked against libasan"; exit 1; }

# Python is not instrumented, so the ASan runtime must be loaded before everything else; libstdc++
# too, or ASan finds no __cxa_throw to forward to and aborts at the first C++ exception (a
# TORCH_CHECK). The UBSan runtime is a plain dependency of the module.
CXX=${CXX:-c++}
export LD_PRELOAD="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libstdc++.so)"
# detect_leaks=0: CPython and torch never free their interned objects, caches and op registries, so
# LeakSanitizer's check at exit would report them by the thousand, none of them ours. Nothing else
# is needed for torch's CPU build (no CUDA driver: protect_shadow_gap stays on).
export ASAN_OPTIONS=detect_leaks=0:log_path=$WORK/reports/asan
# UBSan reports go to stderr whatever log_path says (gcc 12, with ASan), so pytest runs with
# --capture=sys: a test's native stderr reaches the log, which is searched for reports below.
# halt_on_error=1 repeats what -fno-sanitize-recover=undefined already builds in.
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# DEEPFM_FAST_DEBUG=1 (an -O0 build, quicker to compile) is for the build only: at run time it turns
# the CLI's clean errors into tracebacks, which tests/test_cli.py checks do not happen.
unset DEEPFM_FAST_DEBUG
cd "$WORK/src"
"$PY" -c "
import deepfm_fast
assert deepfm_fast.backend() == 'compiled', deepfm_fast.backend()
assert deepfm_fast.__file__.startswith('$WORK/src/'), deepfm_fast.__file__
print('sanitized module:', deepfm_fast._C.__file__)
"
echo "== tests under ASan and UBSan: pytest ${*:-}"
test_start=$SECONDS
rc=0
"$PY" -m pytest -q -p no:cacheprovider --capture=sys "$@" 2>&1 | tee "$WORK/tests.log" || rc=${PIPESTATUS[0]}
echo "tests took $((SECONDS - test_start)) s (exit $rc)"
unset LD_PRELOAD
found=0
for f in $(find "$WORK/reports" -type f | sort); do
  echo "== sanitizer report $f"
  cat "$f"
  found=$((found + 1))
done
if grep -E "runtime error:|AddressSanitizer|UndefinedBehaviorSanitizer" "$WORK/tests.log" >/dev/null; then
  echo "== sanitizer output in the test log:"
  grep -n -E -A3 "runtime error:|AddressSanitizer|UndefinedBehaviorSanitizer" "$WORK/tests.log" | head -n 100
  found=$((found + 1))
fi
if [ $found -gt 0 ]; then
  echo "SANITIZER FINDINGS (see above); total $((SECONDS - start)) s"
  exit 1
fi
echo "no sanitizer report; total $((SECONDS - start)) s"
exit $rc
