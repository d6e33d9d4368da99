#!/bin/sh
# The whole U-Net in terraseg, PyTorch (SMP) and ONNX Runtime, in one run:
#   tools/bench/model_compare.sh [--size PX] [--threads N] [--iters N] [--in-channels N] [--classes K]
# Uses the venv of tools/bench/conv_compare.sh (BENCH_VENV, default
# build/bench-venv), adding segmentation-models-pytorch if missing. A
# benchmark, not a test; results go to docs/benchmarks.md by hand.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
venv=${BENCH_VENV:-build/bench-venv}
build=${BUILD_DIR:-build}
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
py="$venv/bin/python"
for mod in torch:torch onnx:onnx onnxruntime:onnxruntime segmentation_models_pytorch:segmentation-models-pytorch; do
    if ! "$py" -c "import ${mod%%:*}" 2>/dev/null; then
        "$py" -m pip install -q ${BENCH_TORCH_INDEX:+--extra-index-url "$BENCH_TORCH_INDEX"} "${mod#*:}"
    fi
done
[ -f "$build/CMakeCache.txt" ] || cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j"$(nproc)" --target terraseg >/dev/null
exec "$py" tools/bench/model_compare.py "$build/terraseg" "$@"
