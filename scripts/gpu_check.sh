#!/usr/bin/env bash
# One call on a GPU machine: build, run the whole test suite, run the CUDA tests under
# compute-sanitizer (memcheck, racecheck), and the benchmarks. Logs go to $OUT (or ./out).
#
#   bash scripts/gpu_check.sh [bench ...]     e.g. bash scripts/gpu_check.sh rms_norm attention
#
# Each step's exit status is recorded in $OUT/status.txt; a failing step does not stop the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
: > "$OUT/status.txt"

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record the status
  local name=$1
  shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/status.txt"
}

step build python3 -m pip install --no-build-isolation --no-deps -e .
step info python3 -m llmkern info
step tests python3 -m pytest -q -x --durations=15
# The CUDA kernels under compute-sanitizer: memcheck everywhere, racecheck where kernels use
# shared memory. Small selections: the sanitizers slow kernels down 10-100x.
sanitize() {  # sanitize TOOL TESTFILE FILTER
  step "sanitizer_$1_$(basename "$2" .py)" compute-sanitizer --tool "$1" --error-exitcode 9 \
    python3 -m pytest -q -x -m cuda "$2" -k "$3"
}
for tool in memcheck racecheck; do
  sanitize "$tool" python_tests/test_rms_norm.py "cuda and not compile"
  sanitize "$tool" python_tests/test_attention.py "cuda and 128 and not compile"
  sanitize "$tool" python_tests/test_adamw.py "cuda and not graph"
done
for bench in "${@:-rms_norm}"; do
  step "bench_$bench" python3 "benchmarks/bench_$bench.py"
done
cp -r benchmarks/results "$OUT/results" 2>/dev/null
cat "$OUT/status.txt"
