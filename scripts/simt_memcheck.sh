#!/usr/bin/env bash
# A memcheck without a GPU: every simt-marked test (the CUDA kernels run in the CPU emulator,
# python_tests/simt) with the emulated kernels built under AddressSanitizer, so a kernel that
# reads or writes outside its tensors stops with ASan's report. Slow (minutes); not part of CI.
#   bash scripts/simt_memcheck.sh [pytest args, e.g. python_tests/test_attention.py]
set -euo pipefail
cd "$(dirname "$0")/.."
export LLMKERN_SIMT_ASAN=1
export ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
# libstdc++ preloaded too: ASan must find the real __cxa_throw when it starts (python does not link
# libstdc++), or the first C++ exception (a binding's argument check) aborts the process.
CXX="${CXX:-g++}"
LD_PRELOAD="$("$CXX" -print-file-name=libasan.so):$("$CXX" -print-file-name=libstdc++.so)" exec python -m pytest -q -m simt -p no:cacheprovider --capture=sys "${@:-python_tests}"
