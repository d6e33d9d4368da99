#!/bin/sh
# terraseg and PyTorch on the same U-Net ResNet-34 on a CUDA GPU, one command:
#
#   tools/bench/gpu_compare.sh [--sizes 256,512] [--batches 1,2,4,8,16,32]
#       [--modes fp32,tf32,bf16,compile] [--ts-modes fp32,tf32,bf16[,fp16]]
#       [--phases infer,train] [--iters N] [--warmup N] [--device cuda[:N]]
#       [--compile-mode M] [--save-csv FILE] [--resume FILE] [--budget-s S] ...
#   tools/bench/gpu_compare.sh --from-csv FILE [FILE ...]   (the report of saved
#       runs: no venv, no build, no GPU)
#   tools/bench/gpu_compare.sh --help        (all options; needs no venv)
#
# Steps:
#  1. A Python venv for the comparison only (terraseg itself never needs
#     Python): BENCH_VENV if set, else $BUILD_DIR/bench-gpu-venv. It is not
#     the venv of conv_compare.sh/model_compare.sh, which may hold a CPU-only
#     torch. torch and segmentation-models-pytorch are pip-installed there if
#     missing; BENCH_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cu128)
#     picks the index of a CUDA torch wheel that matches the driver.
#  2. Builds terraseg with CUDA (BUILD_DIR, default build-gpu/ as in
#     tools/test_gpu.sh: Release, -DTERRASEG_CUDA=ON, CUDA_ARCHS default 90),
#     configured if it has no CMakeCache.txt yet.
#  3. tools/bench/gpu_compare.py: terraseg (`bench model` / `bench train
#     --device cuda` in fp32, with --tf32, and with --precision bf16; fp16 on
#     request) and PyTorch (eager fp32 with TF32 off and on, channels_last +
#     bf16 autocast, torch.compile of the latter), inference and training
#     steps, and one Markdown table of tiles/s per phase with the ratios, the
#     device, driver, versions and this command at the top, then the two
#     done-when verdicts (PASS / FAIL / INCOMPLETE): terraseg's best inference
#     / PyTorch's best inference, and terraseg bf16 / PyTorch bf16-autocast
#     training steps, each >= 1 in every row. Progress goes to stderr, the
#     report to stdout:
#       tools/bench/gpu_compare.sh --save-csv gpu-compare.csv > gpu-compare.md
#
# The defaults (2 sizes x 6 batches x (4 PyTorch + 3 terraseg modes) x 2
# phases) take a while: every torch.compile cell compiles afresh (tens of
# seconds each); narrow with --sizes, --batches, --modes, --ts-modes,
# --phases, or bound the wall time with --budget-s (cells that would not fit
# say "skipped"; the cells the verdicts need run first). Needs the network
# on the first run. A benchmark, not a test: results go to
# docs/benchmarks.md by hand.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

for arg in "$@"; do
    case "$arg" in
    --help | -h) exec python3 tools/bench/gpu_compare.py --help ;;
    # a report of saved measurements: runs nothing, needs no torch
    --from-csv) exec python3 tools/bench/gpu_compare.py "$@" ;;
    esac
done

build=${BUILD_DIR:-build-gpu}
venv=${BENCH_VENV:-$build/bench-gpu-venv}

# ---- 1. the Python venv --------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
    echo "gpu_compare: creating the venv $venv" >&2
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
fi
py=$venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "gpu_compare: pip-installing torch into $venv${BENCH_TORCH_INDEX:+ from $BENCH_TORCH_INDEX}" >&2
    "$py" -m pip install --quiet ${BENCH_TORCH_INDEX:+--index-url "$BENCH_TORCH_INDEX"} torch
fi
if ! "$py" -c "import segmentation_models_pytorch" 2>/dev/null; then
    echo "gpu_compare: pip-installing segmentation-models-pytorch into $venv" >&2
    "$py" -m pip install --quiet segmentation-models-pytorch
fi
if [ "$("$py" -c 'import torch; print(torch.version.cuda is not None)')" != True ]; then
    echo "gpu_compare: the torch in $venv is a CPU-only build; remove $venv and run again with" \
        "BENCH_TORCH_INDEX set to a CUDA wheel index (e.g. https://download.pytorch.org/whl/cu128)" >&2
    exit 1
fi

# ---- 2. terraseg with CUDA ---------------------------------------------------------------
if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DTERRASEG_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" >&2
fi
cmake --build "$build" --target terraseg -j"$(nproc)" >/dev/null
if ! "$build/terraseg" version | grep -q "cuda backend: built"; then
    echo "gpu_compare: warning: $build/terraseg was built without CUDA (reconfigure $build with" \
        "-DTERRASEG_CUDA=ON); its column will say why it cannot run" >&2
fi

# ---- 3. the comparison ---------------------------------------------------------------------
BENCH_COMMAND="tools/bench/gpu_compare.sh${*:+ $*}" exec "$py" tools/bench/gpu_compare.py "$build/terraseg" "$@"
