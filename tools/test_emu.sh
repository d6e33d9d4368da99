#!/bin/sh
# The CUDA backend's tests without a GPU: the GPU tests (tests/gpu/) on
# tests/cuda_emu, a CPU emulation of the CUDA runtime, cuDNN and cuBLAS
# (tests/cuda_emu/README.md says what it checks and what only a GPU can).
#   build-emu/   Release, warnings as errors, TERRASEG_CUDA_EMU=ON (no nvcc
#                needed: the CUDA and cuDNN headers under /usr/local/cuda)
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
cmake --build build-emu -j"$jobs" --target terraseg test_cuda_ops test_cuda_half test_cuda_unet test_cuda_train
# -L gpu: the CPU tests ran in build/ already, and some of them (cli) check
# what a build without a usable GPU says.
ctest --test-dir build-emu --output-on-failure -L gpu
