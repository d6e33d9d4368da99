#!/bin/sh
# Packs what a bare GPU machine needs to run terraseg's GPU suite and GPU
# benchmarks, for machines that have the NVIDIA driver, the CUDA 13 runtime,
# cuDNN 9 and PyTorch but none of terraseg's Debian libraries and no network
# (the lent H100/H200 machines of this project: docs/gpu.md).
#
# Here (a machine with the CUDA toolkit and cuDNN, like CI's):
#   tools/gpu_kit.sh            builds build-gpu/ (Release, -DTERRASEG_CUDA=ON,
#                               CUDA_ARCHS default 90) and writes gpukit/:
#     bin/         terraseg and the GPU test programs, stripped
#     libs.tar.xz  every shared library they load that is not glibc, the C++
#                  runtime, CUDA or cuDNN (GDAL, OpenBLAS, GEOS, ...), plus PROJ's
#                  and GDAL's data files
#     wheels/      segmentation-models-pytorch (pure Python; its dependencies
#                  torch, timm, huggingface_hub, safetensors are on those machines)
#     run.sh       what runs there (below)
# There, from the repository root (the working tree with gpukit/ beside it):
#   sh gpukit/run.sh [OUTDIR]   (OUTDIR: $OUT, else gpu-results/)
#     unpacks the libraries to /tmp, finds cuDNN (the system's, else the one
#     in PyTorch's nvidia-cudnn wheel), runs the GPU tests, `terraseg bench
#     conv|model|train --device cuda` with TF32 off and on and model|train
#     with --precision bf16 (and fp16), a CUDA demo (train + predict +
#     evaluate on a synthetic scene) and tools/bench/gpu_compare.py against
#     that machine's PyTorch, and writes at most 8 files to OUTDIR:
#     summary.txt (versions, each step's exit status, the tests' tallies, the
#     benchmark rows, the done-when verdicts), tests.log, bench.txt, demo.log,
#     gpu_compare.md, gpu_compare.csv, gpu_compare.log (and sanitize.log
#     for STEPS=sanitize: the tests under compute-sanitizer). In 10-minute
#     calls: STEPS="tests bench demo", then STEPS=compare (docs/gpu.md).
# gpukit/ is ignored by git (.gitignore): it is made for one session, not
# committed. About 54 MiB; with the repository (6 MiB) it stays under the
# 64 MiB a device call carries (checked at the end).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
kit=gpukit
build=${BUILD_DIR:-build-gpu}

tools/setup.sh --no-fuzz
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DTERRASEG_WERROR=ON -DTERRASEG_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" >/dev/null
cmake --build "$build" -j"$(nproc)"

rm -rf "$kit"
mkdir -p "$kit/bin" "$kit/wheels"
progs="terraseg $(cd "$build" && ls test_cuda_* 2>/dev/null | tr '\n' ' ')"
for p in $progs; do
    cp "$build/$p" "$kit/bin/$p"
    strip "$kit/bin/$p"
done

# Every library the programs load, minus what such a machine has itself.
libs=$(mktemp)
for p in $progs; do
    ldd "$build/$p" | awk '$2 == "=>" && $3 ~ /^\// {print $3}'
done | sort -u | while read -r l; do
    case "$l" in
    */libc.so* | */libm.so* | */libpthread.so* | */libdl.so* | */librt.so* | */ld-linux* | \
        */libstdc++.so* | */libgcc_s.so* | */cuda* | */libcudnn* | */libcublas* | */libcudart*) ;;
    *) echo "$l" ;;
    esac
done >"$libs"
# ldd lists the names programs ask for (symlinks); the files they point to come along as well.
extra=$(mktemp)
while read -r l; do readlink -f "$l"; done <"$libs" >"$extra"
# PROJ's database (not its grids: the demo and the tests need no datum shift) and GDAL's data.
for f in /usr/share/proj/proj.db /usr/share/proj/proj.ini /usr/share/gdal; do [ -e "$f" ] && echo "$f"; done >>"$extra"
# -9e: a few MB smaller than -6 (2 minutes more here), which the size check below needs.
cat "$libs" "$extra" | sort -u | tar -cf - -T - 2>/dev/null | xz -T0 -9e >"$kit/libs.tar.xz"
rm -f "$libs" "$extra"

# segmentation-models-pytorch for the PyTorch side of gpu_compare.py: a
# pure-Python wheel, so one file serves any Python 3 there.
if ! python3 -m pip download -q --no-deps --only-binary=:all: -d "$kit/wheels" \
    "segmentation-models-pytorch==${SMP_VERSION:-0.6.0}"; then
    echo "gpu_kit: could not download the segmentation-models-pytorch wheel: gpu_compare will say so there" >&2
fi
cp tools/gpu_kit_run.sh "$kit/run.sh"
# The commit the programs were built from (with -dirty for uncommitted
# changes): run.sh puts it in the summary beside the working tree's.
{
    c=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    git diff --quiet HEAD 2>/dev/null || c="$c-dirty"
    echo "$c"
} >"$kit/built-from"
du -sh "$kit"
# A device call carries the tracked files and the kit, 64 MiB in all.
tracked=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s + 0}')
kitb=$(find "$kit" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
total=$((tracked + kitb))
echo "gpu_kit: repository $((tracked / 1048576)) MiB + kit $((kitb / 1048576)) MiB = $((total / 1048576)) MiB of the 64 MiB a device call carries"
if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "gpu_kit: too large to carry: leave the wheels out or strip more" >&2
    exit 1
fi
echo "gpu_kit: wrote $kit/; on the GPU machine run: sh $kit/run.sh"
