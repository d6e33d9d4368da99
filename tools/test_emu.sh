#!/bin/sh
# The CUDA backend's tests without a GPU: the GPU tests (tests/gpu/) on
# tests/cuda_emu, a CPU emulation of the CUDA runtime, cuDNN and cuBLAS
# (tests/cuda_emu/README.md says what it checks and what only a GPU can).
#   build-emu/       Release, warnings as errors, TERRASEG_CUDA_EMU=ON (no nvcc
#                    needed: the CUDA and cuDNN headers under /usr/local/cuda)
#   build-emu-asan/  the same in Debug with ASan+UBSan, for the op and model tests
# The GPU tests, the whole model again with cuDNN's fused call refused, and a
# short demo (train, predict, evaluate) on `--device cuda`, which runs
# predict's pipeline (page-locked buffers, events, reader threads) on it.
# tools/test.sh runs this as its third stage; tools/test_gpu.sh is the same
# tests on a real GPU.
# Usage: tools/test_emu.sh        (from anywhere; --no-setup skips tools/setup.sh, as tools/test.sh ran it)
set -eu
cd "$(dirname "$0")/.."
[ "${1:-}" = "--no-setup" ] || tools/setup.sh --no-fuzz
jobs=$(nproc)

echo "== CUDA emulator build (build-emu/)"
cmake -S . -B build-emu -DCMAKE_BUILD_TYPE=Release -DTERRASEG_WERROR=ON -DTERRASEG_CUDA_EMU=ON
# Only what the GPU tests need (the CPU tests ran in build/).
cmake --build build-emu -j"$jobs" --target terraseg test_cuda_ops test_cuda_half test_cuda_unet test_cuda_train test_cuda_trainer
# -L gpu: the CPU tests ran in build/ already, and some of them (cli) check
# what a build without a usable GPU says.
ctest --test-dir build-emu --output-on-failure -L gpu

echo "== CUDA emulator build with ASan+UBSan (build-emu-asan/)"
# The op tests and the model test again with AddressSanitizer and UBSan:
# emulated device memory is heap memory, so a kernel that reads or writes
# outside its allocation (beyond the op tests' own guard bands: the model's
# arena, the scratch buffers), a host buffer freed while a queued copy still
# uses it, or a leak, is reported where it happens. Not test_cuda_train: at
# -O0 it would take most of an hour.
cmake -S . -B build-emu-asan -DCMAKE_BUILD_TYPE=Debug -DTERRASEG_SANITIZE=ON -DTERRASEG_WERROR=ON \
    -DTERRASEG_CUDA_EMU=ON
cmake --build build-emu-asan -j"$jobs" --target test_cuda_ops test_cuda_half test_cuda_unet
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-emu-asan --output-on-failure -R "^test_cuda_(ops|half|unet)$"
