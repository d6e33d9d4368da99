#!/bin/sh
# Sets up, builds and runs every test, in two configurations:
#   build/       Release, warnings as errors, CUDA when nvcc and cuDNN are found (the CUDA code and the
#                GPU tests are compiled and linked; the GPU tests run only in tools/test_gpu.sh)
#   build-asan/  Debug with AddressSanitizer + UndefinedBehaviorSanitizer (CPU only)
#   build-emu/   the CUDA backend on tests/cuda_emu, a CPU emulation of CUDA, cuDNN and cuBLAS: the GPU
#                tests without a GPU (tools/test_emu.sh)
# Usage: tools/test.sh            (from anywhere; .ci/run calls it)
set -eu
cd "$(dirname "$0")/.."
tools/setup.sh
jobs=$(nproc)

echo "== Release build and tests"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DTERRASEG_WERROR=ON -DTERRASEG_CUDA=AUTO
cmake --build build -j"$jobs"
# -LE gpu: the tests labelled "gpu" (tests/gpu/) need a device; tools/test_gpu.sh runs them.
ctest --test-dir build --output-on-failure -LE gpu

echo "== ASan+UBSan build and tests"
# CUDA is off here: the CUDA runtime and ASan's shadow memory do not mix, and
# the CPU code is what the sanitizers check.
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DTERRASEG_SANITIZE=ON -DTERRASEG_WERROR=ON -DTERRASEG_CUDA=OFF
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-asan --output-on-failure

echo "== CUDA backend on the emulator (tests/cuda_emu)"
# It needs the CUDA and cuDNN headers (not a GPU, not nvcc), as the Release build's CUDA code does.
if [ -f /usr/local/cuda/include/cuda_runtime_api.h ] && [ -f /usr/local/cuda/include/cudnn.h ]; then
    tools/test_emu.sh --no-setup
else
    echo "test: the CUDA emulator stage did not run: no CUDA and cuDNN headers under /usr/local/cuda/include" >&2
fi
