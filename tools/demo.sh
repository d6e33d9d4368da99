#!/bin/sh
# Sets up, builds and runs the main job on the built-in demo: terraseg demo
# generates a synthetic scene, trains the U-Net on part of it, predicts the
# whole scene, polygonizes it and evaluates on held-out blocks (outputs in
# demo-output/). Usage: tools/demo.sh [terraseg demo options]
set -eu
cd "$(dirname "$0")/.."
tools/setup.sh --no-fuzz
# The CUDA backend only where a GPU answers: compiling it costs minutes of the
# demo's budget on a machine that cannot run it (tools/test.sh still builds it).
cuda=OFF
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then cuda=AUTO; fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DTERRASEG_CUDA=$cuda
# Only the command: the tests are tools/test.sh's business.
cmake --build build --target terraseg -j"$(nproc)"
build/terraseg version
build/terraseg demo --out demo-output --overwrite "$@"
