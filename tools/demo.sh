#!/bin/sh
# Sets up, builds and runs the main job on the built-in demo: terraseg demo
# generates a synthetic scene, trains the U-Net on part of it, predicts the
# whole scene, polygonizes it and evaluates on held-out blocks (outputs in
# demo-output/). Usage: tools/demo.sh [terraseg demo options]
set -eu
cd "$(dirname "$0")/.."
tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"
build/terraseg version
build/terraseg demo --out demo-output --overwrite "$@"
