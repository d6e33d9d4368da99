#!/bin/sh
# The offline install: builds the .deb (tools/package.sh's way), checks that
# every dependency it declares is an installed Debian package (so apt or
# dpkg can satisfy it from a local mirror without network), installs it
# with dpkg into an empty root, and runs the installed binary there: version,
# a one-epoch training on real imagery, predict, polygonize and eval.
# Usage: tests/package.sh SOURCE_DIR WORK_DIR TESTDATA_DIR
set -eu
src=$1
work=$2
data=$3
rm -rf "$work"
mkdir -p "$work"
fail() {
    echo "FAIL $*"
    exit 1
}

cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DTERRASEG_CUDA=OFF \
    -DCMAKE_SKIP_INSTALL_ALL_DEPENDENCY=ON >/dev/null
cmake --build "$work/build" -j2 --target terraseg >/dev/null
(cd "$work/build" && cpack -G DEB >/dev/null) || fail "cpack"
deb=$(ls "$work"/build/terraseg_*.deb)
echo "package: $deb"
dpkg-deb -f "$deb" Depends

# Every declared dependency must be a Debian package that is installed here.
for d in $(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/(.*//; s/ //g'); do
    dpkg-query -W -f='${Status}\n' "$d" 2>/dev/null | grep -q "install ok installed" ||
        fail "the package depends on $d, which is not an installed Debian package"
done

# An empty root: only the package's own files end up there.
root="$work/root"
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
touch "$root/var/lib/dpkg/status" "$root/var/lib/dpkg/available"
dpkg --root="$root" --force-depends --force-not-root --force-script-chrootless --log=/dev/null -i "$deb" >/dev/null ||
    fail "dpkg -i into $root"
dpkg --root="$root" -L terraseg | grep -q "^/usr/bin/terraseg$" || fail "dpkg does not list /usr/bin/terraseg"
T="$root/usr/bin/terraseg"
[ -x "$T" ] || fail "$T not installed"
[ -f "$root/usr/share/doc/terraseg/README.md" ] || fail "docs not installed"

"$T" version | grep -q "^terraseg " || fail "terraseg version"

# A tiny end-to-end run with the installed binary.
cat >"$work/tiny.yaml" <<YAML
output: $work/run
classes: [background, urban, rural]
data:
  images: $data/L7_ETMs.tif
labels:
  path: $data/olinda1.shp
  attribute: TIPO
  class_map: {URBANO: 1, RURAL: 2}
  assume_crs: "EPSG:4674"
windows:
  tile: 64
split:
  block: 64
train:
  epochs: 1
model:
  decoder_channels: [32, 16, 16, 8, 8]
YAML
"$T" train "$work/tiny.yaml" >"$work/train.log" 2>&1 || { cat "$work/train.log"; fail "train"; }
"$T" predict "$work/run/model.safetensors" "$data/L7_ETMs.tif" "$work/classes.tif" --confidence "$work/conf.tif" -q ||
    fail "predict"
"$T" polygonize "$work/classes.tif" "$work/polygons.gpkg" --confidence "$work/conf.tif" >/dev/null || fail "polygonize"
"$T" eval "$work/classes.tif" "$data/olinda1.shp" --attribute TIPO --class-map URBANO=1,RURAL=2 \
    --assume-crs EPSG:4674 --json "$work/metrics.json" | grep -q "^mIoU" || fail "eval"
[ -s "$work/metrics.json" ] || fail "no metrics.json"
echo "package: installed into an empty root; version, train, predict, polygonize and eval ran"
rm -rf "$work"
