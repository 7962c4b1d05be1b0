#!/usr/bin/env bash
# GPU validation, sized for a lease of 15 minutes of device time in all (the machine's start, a
# minute or two, included): one call of `all` does everything in priority order, each part cut to
# what is left of its time, so a slow part costs the parts after it, never the results before it.
#
#   bash scripts/gpu_check.sh prebuild          # HERE, on the CPU machine: Python 3.12 modules for sm_90
#   bash scripts/gpu_check.sh all [SECONDS]     # on the GPU: every part below within SECONDS (default 500)
#   bash scripts/gpu_check.sh PART [ARGS...]    # one part: env | build | kernels [FILES...] | sanitize |
#                                               #   bench [OPS...] | rest | loss [STEPS], within
#                                               #   GPU_CHECK_SECONDS (default 560)
#
# A first GPU session: `prebuild` here, then one device call with timeout_s 570, carrying the
# prebuilt files, of the command prebuild prints (`LLMKERN_COMMIT=... bash scripts/gpu_check.sh all
# 500`). Then fix what it found, and spend what is left on a second call of the parts that need it.
#
# The parts of `all`, in order:
#   env       the GPU, the driver, versions, which tools are there
#   build     the modules `prebuild` made, when they match csrc/ and import; else the build there
#   kernels   every test marked `cuda` (all files), then the other tests of the kernels, the model and
#             the trainer (those use the GPU where there is one; both backends; not the CPU
#             emulator), in parallel workers when pytest-xdist is there
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck over scripts/sanitize_kernels.py
#             (every CUDA kernel on small odd shapes, in one process per tool)
#   bench     the benchmarks at the issues' target shapes (`bench OPS...` runs full ones instead)
#   rest      the rest of the suite, not marked `cuda` (CPU code: data, training, fine-tuning), the data pipeline's
#             own packages installed from .whl/ when carried there (see `wheels`)
# Not in `all` (minutes of its own): `loss [STEPS]` trains GPT-2 124M for STEPS (default 1000) on
# the GPU machine's own Python sources with each backend and compares the loss curves (issue 5).
#
# Results, at most the 8 files the device tool returns, each rewritten after every step (a call
# killed at its limit still returns what was done): $OUT/summary.txt (each step's verdict, the
# tests that failed, the sanitizers' counts; printed last, so the call's reply ends with it),
# $OUT/figures.txt (every benchmark row with ratios, the tuned tiles; llmkern's forward+backward
# and single-mode rows are printed before the summary), $OUT/logs.tar.gz (every log, junit XML), $OUT/results.tar.gz
# (benchmarks/results: the CSV rows and PNG charts to commit).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
OUT="${OUT:-$ROOT/out}"
LOGS="$ROOT/build/gpu_check/logs"  # outside $OUT: the device tool returns 8 files at most
SUMMARY="$OUT/summary.txt"
FIGURES="$OUT/figures.txt"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=python3
PREBUILT_HASH=llmkern/_prebuilt.sha256
# A part called alone ends its steps within GPU_CHECK_SECONDS (default 560), so that it ends, packing
# what it did, inside one device call of timeout_s 600 (the longest there is) rather than being killed
# mid-step with that step's rows unsaved; `all SECONDS` sets its own.
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-560}))
RESERVE=15  # seconds kept for packing the results

# The tests of the kernels and of what runs them on a GPU; `rest` is the other files. The tests
# marked `cuda` run first, from every file (test_large_offsets, test_loader too).
KERNEL_TESTS=(test_rms_norm test_layer_norm test_attention test_adamw test_rope test_swiglu test_fused_linear_cross_entropy
              test_custom_op test_model test_generate test_train test_backend test_build test_cuda_launchers
              test_large_offsets test_triton_math)

# pytest on the GPU machine (each step adds its -m: never the emulator's `simt` tests, which CI
# runs); a line per test (-v), so a part cut short still tells what passed; parallel workers and a
# per-test limit when the plugins are there (a hung kernel must not eat the lease). The limit's
# thread method ends a worker stuck in a CUDA call (a signal waits for the call to return); xdist
# then reports that test and starts a new worker. Without xdist the signal method keeps pytest alive.
PYTEST=("$PY" -m pytest -v -p no:cacheprovider --durations=25)
timeout_method=signal
$PY -c "import xdist" 2> /dev/null && PYTEST+=(-n 8) && timeout_method=thread
$PY -c "import pytest_timeout" 2> /dev/null && PYTEST+=(--timeout 150 "--timeout-method=$timeout_method")

note() { echo "$*" | tee -a "$SUMMARY"; }

digest() {  # digest LOG: pytest's closing line (or the count so far, when it was cut) and what failed
  [[ -f $1 ]] || return 0
  local closing
  closing=$(grep -E "^=+ ([0-9]+ [a-z]+|no tests ran).* in [0-9.]+s" "$1" | tail -1)
  [[ -z $closing ]] && closing="cut short: $(grep -c " PASSED " "$1") passed, $(grep -c " FAILED " "$1") failed so far"
  note "  $closing"
  grep -oE "(FAILED|ERROR) python_tests/[^ ]+" "$1" | sort -u | head -25 | sed "s/^/  /" >> "$SUMMARY"
}

snapshot() {  # the logs and the benchmark results as they are now, in $OUT
  tar czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs 2> /dev/null
  [[ -d benchmarks/results ]] && tar czf "$OUT/results.tar.gz" benchmarks/results 2> /dev/null
  return 0
}

step() {  # step NAME MAX_SECONDS COMMAND...: run within min(MAX_SECONDS, time left); log; record
  local name=$1 max=$2
  shift 2
  local left=$((DEADLINE - SECONDS - RESERVE))
  if ((left < 20)); then
    note "$name: skipped, no time left"
    return 0
  fi
  ((max > left)) && max=$left
  local start=$SECONDS
  timeout -k 10 "$max" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local verdict="rc=$rc"
  ((rc == 124 || rc == 137)) && verdict="CUT at ${max}s"
  note "$name: $verdict, $((SECONDS - start))s"
  snapshot
  return $rc
}

sources_hash() {  # what the modules are built from, the same on both machines
  find csrc CMakeLists.txt -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64
}

part_env() {
  {
    nvidia-smi
    nvcc --version | tail -2
    $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__); gpu = torch.cuda.is_available()
print(torch.cuda.get_device_name() if gpu else 'no GPU', torch.cuda.get_device_capability() if gpu else '')"
    command -v compute-sanitizer
    $PY -m pip list 2> /dev/null | grep -i -E "^(pytest|pytest-xdist|pytest-timeout|pybind11|cmake|ninja|liger|flash)"
  } > "$LOGS/env.log" 2>&1
  note "env: $(grep -m1 -A1 '^torch ' "$LOGS/env.log" | tr '\n' ' ')"
}

part_build() {
  if [[ -f $PREBUILT_HASH && "$(cat $PREBUILT_HASH)" == "$(sources_hash)" ]] \
      && $PY -c "import llmkern._cuda, llmkern._cpu" > "$LOGS/prebuilt.log" 2>&1; then
    note "build: the prebuilt modules match csrc/ and import; not rebuilt"
  else
    step build 300 $PY -m pip install --no-build-isolation --no-deps -e .
  fi
  step info 60 $PY -m llmkern info
}

part_kernels() {  # [FILES...]: only these test files
  local files=("$@")
  step kernels_gpu 210 "${PYTEST[@]}" -m "cuda and not simt" --junitxml="$LOGS/kernels_gpu.xml" "${files[@]:-python_tests}"
  digest "$LOGS/kernels_gpu.log"
  if ((${#files[@]} == 0)); then
    for name in "${KERNEL_TESTS[@]}"; do files+=("python_tests/$name.py"); done
  fi
  step kernels 120 "${PYTEST[@]}" -m "not cuda and not simt" --junitxml="$LOGS/kernels.xml" "${files[@]}"
  digest "$LOGS/kernels.log"
}

part_sanitize() {  # PyTorch's caching allocator off: a tensor's own cudaMalloc, so memcheck sees a
  # kernel step past its end (inside a pooled segment it would land in valid memory, unseen)
  for tool in memcheck racecheck synccheck; do
    step "sanitize_$tool" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
      --error-exitcode 9 $PY scripts/sanitize_kernels.py
    grep -sE "ERROR SUMMARY|RACECHECK SUMMARY|cases wrong" "$LOGS/sanitize_$tool.log" | sed "s/^/  /" \
      >> "$SUMMARY"
  done
}

bench() {  # bench NAME MAX_SECONDS COMMAND...: a step, then its rows with ratios, the trainer's
  # lines, Triton's tuned tiles and any skip or exception to $FIGURES, there at once
  step "$@"
  [[ -f $LOGS/$1.log ]] || return 0
  echo "-- $1" >> "$FIGURES"
  grep -sE " x[0-9.]+ vs | tokens/s  MFU |^tuned tile: |^skipped |: failed: |^[A-Za-z_.]*(Error|Exception)\b" "$LOGS/$1.log" \
    | sed "s/^/  /" >> "$FIGURES"
  return 0
}

part_bench() {
  if (($# > 0)); then  # full benchmarks of the ops named
    for op in "$@"; do bench "bench_$op" 600 $PY "benchmarks/bench_$op.py"; done
  else  # the issues' target shapes
    bench bench_rms_norm 90 $PY benchmarks/bench_rms_norm.py
    bench bench_adamw 60 $PY benchmarks/bench_adamw.py --models 124M
    # not the eager math reference (no target is about it, and at 8k it is the slowest by far). A
    # benchmark writes its rows only at its end, so the providers that autotune (Triton's: some 190
    # compiles at these shapes, atomic-dq's retuning included) run in a call of their own, with SDPA
    # flash again for their ratios: a cut there keeps the other providers' rows
    bench bench_attention 120 $PY benchmarks/bench_attention.py --head-dims 128 64 --causal true \
      --seqlens 1024 4096 8192 --providers "SDPA flash" "SDPA cuDNN" "llmkern cuda" "llmkern cuda rows128" \
      "flash-attn"
    bench bench_attention_triton 240 $PY benchmarks/bench_attention.py --head-dims 128 64 --causal true \
      --seqlens 1024 4096 8192 --providers "SDPA flash" "llmkern triton" "llmkern triton atomic-dq"
    bench bench_fused_linear_cross_entropy 60 $PY benchmarks/bench_fused_linear_cross_entropy.py --rows 16384 \
      --hidden 768 2048
    # Gemma 2 2B's capped head (final cap 30, hidden 2304, vocabulary 256000): not torch.compile (a compile a shape)
    bench bench_fused_linear_cross_entropy_softcap 90 $PY benchmarks/bench_fused_linear_cross_entropy.py --softcap 30 \
      --rows 8192 --hidden 2304 --vocab 256000 --providers "torch eager" "llmkern triton" "llmkern cuda"
    bench bench_rope 45 $PY benchmarks/bench_rope.py
    bench bench_swiglu 45 $PY benchmarks/bench_swiglu.py
    bench bench_geglu 45 $PY benchmarks/bench_swiglu.py --activation gelu_tanh
    # Mixtral's and Qwen3-MoE's layers at 16k tokens, grouped_mm against the loops; not the compiled provider (a
    # compile a shape: `gpu_check.sh bench moe` runs every provider at both token counts)
    bench bench_moe 60 $PY benchmarks/bench_moe.py --tokens 16384 --providers "torch eager" "llmkern loop" \
      "llmkern grouped"
    # the compiled providers last (each compiles for a minute or more); each provider's line is
    # printed as it ends, so a cut still leaves those before it in the figures
    bench bench_train 240 $PY benchmarks/bench_train.py --device cuda --steps 10 --warmup 3 \
      --providers "plain pytorch,llmkern cuda,llmkern triton,plain torch.compile,llmkern compile"
    bench bench_rms_norm_autocast 45 $PY benchmarks/bench_rms_norm.py --autocast --rows 16384 --hidden 2048 4096
    bench bench_layer_norm 45 $PY benchmarks/bench_layer_norm.py --rows 16384 --hidden 768 4096
    bench bench_layer_norm_autocast 45 $PY benchmarks/bench_layer_norm.py --autocast --rows 16384 --hidden 768
    # FlexAttention compiles, Triton tunes the documents' kernels
    bench bench_attention_documents 120 $PY benchmarks/bench_attention.py --doc-len 1024 --seqlens 8192 \
      --head-dims 128
    # Gemma 2's capped attention (cap 50; 16 heads of D=256, as its 9B): not the eager reference (no target)
    bench bench_attention_softcap 90 $PY benchmarks/bench_attention.py --softcap 50 --seqlens 4096 8192 \
      --head-dims 256 --hidden 4096 --providers "FlexAttention" "llmkern triton" "flash-attn"
  fi
}

part_rest() {
  if compgen -G ".whl/*.whl" > /dev/null; then  # the data pipeline's packages the GPU image lacks
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$LOGS/wheels.log" 2>&1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  local skip=()
  for name in "${KERNEL_TESTS[@]}"; do skip+=("--ignore=python_tests/$name.py"); done
  step rest 600 "${PYTEST[@]}" -m "not cuda and not simt" --junitxml="$LOGS/rest.xml" "${skip[@]}" python_tests
  digest "$LOGS/rest.log"
}

part_loss() {  # [STEPS]: the torch, cuda and triton backends' loss curves, side by side
  step loss_shards 120 $PY -c "from llmkern.train.corpus import prepare_corpus_shards as p
p('/tmp/llmkern_shards', 'bpe:8192', 64_000_000)"
  step loss_curves 600 $PY benchmarks/bench_train.py --loss-steps "${1:-1000}" --data /tmp/llmkern_shards
  grep -s "loss curve" "$LOGS/loss_curves.log" | sed "s/^/  /" >> "$SUMMARY"
}

fresh_run() {  # a fresh $OUT and logs for a run
  rm -rf "$LOGS"
  mkdir -p "$LOGS" "$OUT"
  rm -f "$SUMMARY" "$FIGURES"
}

pack() {  # the reply keeps the output's last 12,000 characters: llmkern's figures, then the summary
  snapshot
  if [[ -s $FIGURES ]]; then
    echo "==== llmkern's rows, forward+backward and single-mode (every row: figures.txt) ===="
    grep -E "^-- |llmkern" "$FIGURES" | grep -vE "^ +(forward|backward) " | tr -s " " | cut -c1-220
  fi
  echo "==== summary ($((SECONDS))s) ===="
  cat "$SUMMARY" 2> /dev/null
}

part=${1:-all}
shift || true
case "$part" in
  prebuild)  # on the CPU machine, not the GPU one
    py312=${LLMKERN_PREBUILD_PYTHON:-}  # a Python 3.12, the GPU machine's version: the first that runs
    for candidate in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
      [[ -z $py312 ]] && "$candidate" -c "" 2> /dev/null && py312=$candidate
    done
    [[ -n $py312 ]] || { echo "prebuild needs Python 3.12 (LLMKERN_PREBUILD_PYTHON=...)" >&2; exit 1; }
    venv=build/prebuild-venv
    [[ -x $venv/bin/python ]] || { "$py312" -m venv "$venv" && "$venv/bin/pip" install -q pybind11 ninja; } || exit 1
    export PATH="$ROOT/$venv/bin:$PATH"
    cmake -S . -B build/prebuild -GNinja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$venv/bin/python" \
      -Dpybind11_DIR="$("$venv/bin/python" -m pybind11 --cmakedir)" -DLLMKERN_CUDA_ARCHS=90 \
      -DLLMKERN_OUTPUT_DIR="$ROOT/build/prebuild/modules" > /dev/null || exit 1
    cmake --build build/prebuild --parallel "${MAX_JOBS:-2}" || exit 1
    cp build/prebuild/modules/_cuda.cpython-312-*.so build/prebuild/modules/_cpu.cpython-312-*.so llmkern/
    sources_hash > "$PREBUILT_HASH"
    ls -l llmkern/_c*.cpython-312-*.so "$PREBUILT_HASH"
    echo "the device call's carry (with \".whl\" too where \`wheels\` made it):"
    printf '["%s", "%s", "%s"]\n' llmkern/_cuda.cpython-312-*.so llmkern/_cpu.cpython-312-*.so "$PREBUILT_HASH"
    # The device machine's copy has no .git: the benchmarks' rows learn their commit from this variable.
    commit=$(git rev-parse --short HEAD 2> /dev/null || echo unknown)
    [[ -n $(git status --porcelain --untracked-files=no 2> /dev/null) ]] && commit+="-dirty"
    echo "the device call's command: LLMKERN_COMMIT=$commit bash scripts/gpu_check.sh all 500"
    exit 0
    ;;
  wheels)  # on the CPU machine: the data pipeline's packages for the GPU machine's Python 3.12
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl py3langid zstandard && ls .whl
    exit $?
    ;;
  all)
    DEADLINE=$((SECONDS + ${1:-500}))
    fresh_run
    part_env
    part_build
    part_kernels
    part_sanitize
    part_bench
    part_rest
    ;;
  env | build | kernels | sanitize | bench | rest | loss)
    fresh_run
    "part_$part" "$@"
    ;;
  *)
    echo "unknown part: $part (prebuild | wheels | all | env | build | kernels | sanitize | bench | rest | loss)" >&2
    exit 2
    ;;
esac
pack
