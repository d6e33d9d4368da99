#!/bin/sh
# Builds the Debian package of terraseg (CPU backend) with CPack:
#   tools/package.sh [BUILD_DIR]      -> BUILD_DIR/terraseg_<version>_<arch>.deb
# The package declares its Debian dependencies (dpkg-shlibdeps on the binary),
# so `apt install ./terraseg_*.deb` (or dpkg -i with the dependencies present,
# e.g. from a local mirror) installs it on a machine without network.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-"$root/build-deb"}
sh "$root/tools/setup.sh"
# CUDA off: the CUDA runtime under /usr/local/cuda is not a Debian package a
# .deb can depend on.
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DTERRASEG_CUDA=OFF \
    -DCMAKE_SKIP_INSTALL_ALL_DEPENDENCY=ON >/dev/null
cmake --build "$build" -j"$(nproc)" --target terraseg
(cd "$build" && cpack -G DEB >/dev/null)
ls "$build"/terraseg_*.deb
