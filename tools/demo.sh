#!/bin/sh
# Sets up, builds and runs the main job on the built-in demo. For now the
# main job is the kernel benchmark on a synthetic 256x256 tile; the
# end-to-end demo (train, predict, polygonize) replaces it as it lands.
# Usage: tools/demo.sh
set -eu
cd "$(dirname "$0")/.."
tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"
build/terraseg version
build/terraseg bench conv --size 256 --batch 1 --iters 3
