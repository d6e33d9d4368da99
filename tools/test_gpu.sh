#!/bin/sh
# The GPU test suite, one command on a machine with an NVIDIA GPU, the CUDA
# toolkit and cuDNN (under /usr/local/cuda):
#   build-gpu/   Release, warnings as errors, TERRASEG_CUDA=ON (a missing nvcc
#                or cuDNN is a configure error here, not a silent CPU build)
# then the tests labelled "gpu" (tests/gpu/: every CUDA op against the CPU
# backend). tools/test.sh is the CPU suite; it compiles the same GPU tests
# but never runs them.
# Usage: tools/test_gpu.sh        (from anywhere)
#   CUDA_ARCHS=80 tools/test_gpu.sh    for another GPU than Hopper (default 90)
#   TERRASEG_TEST_DEVICE=cuda:1        to test another device than cuda:0
set -eu
cd "$(dirname "$0")/.."
tools/setup.sh
jobs=$(nproc)

echo "== GPU build (build-gpu/)"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DTERRASEG_WERROR=ON -DTERRASEG_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}"
cmake --build build-gpu -j"$jobs"

echo "== GPU device"
# Without a visible device every GPU test would fail one by one; say why once.
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "test_gpu: FAILED: nvidia-smi not found: no NVIDIA driver on this machine, so the GPU tests cannot run." >&2
    echo "test_gpu: the build above succeeded; run tools/test.sh for the CPU suite." >&2
    exit 1
fi
if ! nvidia-smi -L; then
    echo "test_gpu: FAILED: nvidia-smi cannot talk to the driver (see its message above)." >&2
    exit 1
fi
version=$(build-gpu/terraseg version) || { echo "test_gpu: FAILED: build-gpu/terraseg version did not run" >&2; exit 1; }
echo "$version"
# terraseg asks the CUDA runtime itself, which also sees CUDA_VISIBLE_DEVICES
# and a driver older than the runtime.
if ! echo "$version" | grep -q "cuda backend: built;.* device(s)"; then
    echo "test_gpu: FAILED: the CUDA runtime sees no device (terraseg version above says why;" \
         "CUDA_VISIBLE_DEVICES is '${CUDA_VISIBLE_DEVICES-unset}')." >&2
    exit 1
fi

echo "== GPU tests"
# --no-tests=error: a build that registered no GPU test must not pass as "all passed".
ctest --test-dir build-gpu -L gpu --output-on-failure --no-tests=error
