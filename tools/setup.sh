#!/bin/sh
# Installs the Debian packages terraseg builds against. Idempotent: packages
# already present are not touched, and apt is only called when one is missing.
# Runs as root, or through sudo when it is available.
set -eu

# libopenblas-openmp-dev: the OpenMP build of OpenBLAS, chosen on purpose.
# terraseg's own loops use OpenMP too, so both share one libgomp thread pool:
# an sgemm called inside one of our parallel regions runs on the calling
# thread instead of waking a second pool (see docs/architecture.md).
# libopenblas0: the small metapackage dpkg-shlibdeps names for libopenblas.so.0,
# so the .deb's declared dependencies are all installed here (tests/package.sh).
# libcjson-dev: JSON for safetensors headers and SMP config.json (cJSON keeps
# duplicate keys visible, so strict readers can reject them).
# clang + libclang-rt-14-dev: libFuzzer for the fuzz targets in tests/fuzz/.
# libgdal-dev, libgeos-dev: rasters, vectors and geometry (io/).
# libyaml-dev: the training configuration (train/config.c).
# Usage: tools/setup.sh [--no-fuzz]   (--no-fuzz: without clang, which only the
# fuzz test needs; tools/demo.sh uses it to spend less of its time in apt)
PACKAGES="build-essential cmake pkg-config libopenblas-openmp-dev libopenblas0 libcjson-dev libgdal-dev libgeos-dev libyaml-dev"
FUZZ_PACKAGES="clang libclang-rt-14-dev"
case "${1:-}" in
    --no-fuzz) ;;
    "") PACKAGES="$PACKAGES $FUZZ_PACKAGES" ;;
    *) echo "setup: unknown option '$1' (usage: tools/setup.sh [--no-fuzz])" >&2; exit 2 ;;
esac

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    echo "setup: all Debian packages present ($PACKAGES)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "setup: missing packages:$missing" >&2
    echo "setup: run this script as root, or install sudo, to install them" >&2
    exit 1
fi

echo "setup: installing$missing"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
