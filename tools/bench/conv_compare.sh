#!/bin/sh
# Times every distinct conv shape of the U-Net ResNet-34 in terraseg, PyTorch
# and ONNX Runtime in one run and prints the ratios (>1: terraseg faster).
#
#   tools/bench/conv_compare.sh [--batch N] [--size PX] [--threads N] [--iters N]
#                               [--rounds R] [--in-channels N] [--classes K] [--out DIR]
#
# Steps:
#  1. A Python venv for the comparison only (terraseg itself never needs
#     Python): BENCH_VENV if set (reuse an existing one), else build/bench-venv.
#     torch, onnx and onnxruntime are pip-installed there if missing. A
#     CPU-only torch is fine (only CPU kernels are timed); plain PyPI torch on
#     Linux pulls several GB of CUDA wheels, so to avoid them set
#     BENCH_TORCH_INDEX=https://download.pytorch.org/whl/cpu before the first run.
#  2. Builds terraseg (BUILD_DIR, default build/; configured if needed).
#  3. R rounds (default 3), each: `terraseg bench conv --csv` with the same
#     batch/size/threads/iters, then `conv_compare.py measure`, which times the
#     same shapes from that CSV in PyTorch (forward, backward data, backward
#     filter) and ONNX Runtime (forward). Alternating the frameworks keeps a
#     slow spell of a shared machine from landing on one of them only.
#  4. `conv_compare.py report`: one table of per-shape medians over the
#     rounds, ratios, count-weighted totals and their spread over the rounds.
#
# Threads: every framework gets the same count (--threads, default: all
# cores). OPENBLAS_CORETYPE is not set here: terraseg re-executes itself with
# the right OpenBLAS core when OpenBLAS does not recognise the CPU
# (tools/terraseg.c, fix_blas_coretype); PyTorch uses its own oneDNN/MKL and
# ONNX Runtime its own MLAS kernels, neither of which reads it.
#
# This is a benchmark, not a test: it needs the network on the first run and
# its numbers depend on the machine and its load. Results go to
# docs/benchmarks.md by hand, with the command and the machine.
set -eu

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

batch=1
size=256
threads=$(nproc)
iters=5
rounds=3
in_channels=3
classes=2
out=""

usage() {
    echo "usage: tools/bench/conv_compare.sh [--batch N] [--size PX] [--threads N] [--iters N]"
    echo "           [--rounds R] [--in-channels N] [--classes K] [--out DIR]"
    echo "env: BENCH_VENV (default build/bench-venv), BENCH_TORCH_INDEX, BUILD_DIR (default build)"
}

while [ $# -gt 0 ]; do
    case "$1" in
    --batch | -b) batch=$2; shift 2 ;;
    --size | -s) size=$2; shift 2 ;;
    --threads | -t) threads=$2; shift 2 ;;
    --iters | -n) iters=$2; shift 2 ;;
    --rounds | -r) rounds=$2; shift 2 ;;
    --in-channels) in_channels=$2; shift 2 ;;
    --classes) classes=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --help | -h) usage; exit 0 ;;
    *) echo "conv_compare: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

build=${BUILD_DIR:-build}
venv=${BENCH_VENV:-$build/bench-venv}
[ -n "$out" ] || out=$build/bench-conv-compare
mkdir -p "$out"
tag=b${batch}-s${size}-t${threads}

# ---- 1. the Python venv --------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
    echo "conv_compare: creating the venv $venv"
    python3 -m venv "$venv"
fi
py=$venv/bin/python
missing=""
for m in numpy torch onnx onnxruntime; do
    "$py" -c "import $m" 2>/dev/null || missing="$missing $m"
done
if [ -n "$missing" ]; then
    echo "conv_compare: pip-installing into $venv:$missing"
    for m in $missing; do
        if [ "$m" = torch ] && [ -n "${BENCH_TORCH_INDEX:-}" ]; then
            "$py" -m pip install --quiet --index-url "$BENCH_TORCH_INDEX" torch
        else
            "$py" -m pip install --quiet "$m"
        fi
    done
fi

# ---- 2. terraseg -----------------------------------------------------------------
if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release
fi
cmake --build "$build" --target terraseg -j"$(nproc)" >/dev/null

echo "conv_compare: machine: $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $(nproc) cores," \
    "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---- 3. rounds: terraseg, then PyTorch and ONNX Runtime on the same shapes ---------
# OMP_NUM_THREADS/MKL_NUM_THREADS for Python too, so the pools the libraries
# start on import match before torch.set_num_threads and ORT's options apply.
csvs=""
times=""
r=1
while [ "$r" -le "$rounds" ]; do
    csv=$out/terraseg-$tag-r$r.csv
    log=$out/terraseg-$tag-r$r.txt
    echo "conv_compare: round $r/$rounds: terraseg bench conv (log: $log)"
    "$build/terraseg" bench conv --batch "$batch" --size "$size" --threads "$threads" --iters "$iters" \
        --in-channels "$in_channels" --classes "$classes" --csv "$csv" >"$log"
    [ "$r" -gt 1 ] || cat "$log"
    echo "conv_compare: round $r/$rounds: PyTorch and ONNX Runtime"
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$py" tools/bench/conv_compare.py measure \
        --csv "$csv" --threads "$threads" --iters "$iters" --out "$out/others-$tag-r$r.csv"
    csvs="$csvs $csv"
    times="$times $out/others-$tag-r$r.csv"
    r=$((r + 1))
done
echo

# ---- 4. one table ----------------------------------------------------------------------
# $csvs and $times are unquoted on purpose: one word per round (paths
# under --out must not contain spaces).
OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$py" tools/bench/conv_compare.py report \
    --csv $csvs --times $times --terraseg-log "$out/terraseg-$tag-r1.txt" \
    --threads "$threads" --iters "$iters" --out-csv "$out/compare-$tag.csv"
echo "conv_compare: load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
