#!/usr/bin/env bash
# GPU validation in parts that each fit one device call (10 minutes). Logs go to $OUT (or ./out).
#
#   bash scripts/gpu_check.sh build             # install in place, llmkern info
#   bash scripts/gpu_check.sh tests [FILES...]  # the cuda-marked tests first, then the rest
#   bash scripts/gpu_check.sh sanitize          # compute-sanitizer memcheck + racecheck (+ synccheck) on the CUDA tests
#   bash scripts/gpu_check.sh bench [OPS...]    # benchmarks/bench_<op>.py (default: rms_norm); e.g.
#                                               # bench rms_norm attention adamw rope swiglu
#
# Each step's exit status is appended to $OUT/status.txt; a failing step does not stop the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record the status
  local name=$1
  shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/status.txt"
}

# The CUDA kernels under compute-sanitizer: small selections, the sanitizers slow kernels 10-100x.
sanitize() {  # sanitize TOOL TESTFILE FILTER
  step "sanitizer_$1_$(basename "$2" .py)" compute-sanitizer --tool "$1" --error-exitcode 9 \
    python3 -m pytest -q -m cuda "$2" -k "$3"
}

part=${1:-build}
shift || true
case "$part" in
  build)
    step build python3 -m pip install --no-build-isolation --no-deps -e .
    step info python3 -m llmkern info
    ;;
  tests)
    files=("${@:-python_tests}")
    step tests_cuda python3 -m pytest -q -m cuda --durations=15 "${files[@]}"
    step tests_rest python3 -m pytest -q -m "not cuda" --durations=15 "${files[@]}"
    ;;
  sanitize)
    for tool in memcheck racecheck; do
      sanitize "$tool" python_tests/test_rms_norm.py "cuda and not compile"
      sanitize "$tool" python_tests/test_attention.py "cuda and 128 and not compile"
      sanitize "$tool" python_tests/test_adamw.py "cuda and not graph"
      sanitize "$tool" python_tests/test_fused_linear_cross_entropy.py "cuda and not simt and not compile and not peak"
    done
    # Barriers in divergent code: the attention kernels skip tiles per warp.
    sanitize synccheck python_tests/test_attention.py "cuda and 128 and not compile"
    # No shared memory in these two: memcheck alone.
    sanitize memcheck python_tests/test_rope.py "cuda and not compile and not llama"
    sanitize memcheck python_tests/test_swiglu.py "cuda and not compile and not llama and not beyond"
    ;;
  bench)
    for op in "${@:-rms_norm}"; do
      step "bench_$op" python3 "benchmarks/bench_$op.py"
    done
    cp -r benchmarks/results "$OUT/results" 2>/dev/null
    ;;
  *)
    echo "unknown part: $part (build | tests | sanitize | bench)" >&2
    exit 2
    ;;
esac
cat "$OUT/status.txt"
