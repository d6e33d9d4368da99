#!/bin/sh
# Real imagery for the integration tests, from Debian packages (no R needed):
#   r-cran-stars  tif/L7_ETMs.tif        Landsat 7 ETM+ crop, 6 bands, 349x352, 28.5 m,
#                                        SIRGAS 2000 / UTM zone 25S (Olinda, Brazil)
#   r-cran-sf     shape/olinda1.{shp,shx,dbf,prj}
#                                        470 census tracts over the same city, with
#                                        TIPO = URBANO / RURAL; its CRS is geographic
#                                        SIRGAS 2000 (EPSG:4674); older copies lack the .prj
# Usage: tests/data/fetch.sh DEST
# Idempotent: when DEST already holds the files it does nothing. Needs apt's
# package lists (apt-get update) and the network to Debian's mirrors.
set -eu
dest=$1
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
if [ -f "$dest/L7_ETMs.tif" ] && [ -f "$dest/olinda1.shp" ] && [ -f "$dest/olinda1.dbf" ] && [ -f "$dest/olinda1.shx" ]; then
    echo "test data: present in $dest"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download r-cran-stars r-cran-sf >/dev/null 2>&1; then
    # The package lists may be missing on a fresh machine.
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq >/dev/null 2>&1 || true; fi
    apt-get download r-cran-stars r-cran-sf >/dev/null 2>&1 || {
        echo "test data: apt-get download r-cran-stars r-cran-sf failed (no network, or no apt lists: run apt-get update)" >&2
        exit 1
    }
fi
for deb in ./*.deb; do dpkg -x "$deb" x; done
tif=$(find x -path '*stars/tif/L7_ETMs.tif' | head -n 1)
shp=$(find x -path '*sf/shape/olinda1.shp' | head -n 1)
if [ -z "$tif" ] || [ -z "$shp" ]; then
    echo "test data: L7_ETMs.tif or olinda1.shp not found in the packages" >&2
    exit 1
fi
cp "$tif" "$dest/L7_ETMs.tif.tmp" && mv "$dest/L7_ETMs.tif.tmp" "$dest/L7_ETMs.tif"
base=${shp%.shp}
for ext in dbf shx prj shp; do
    if [ -f "$base.$ext" ]; then cp "$base.$ext" "$dest/olinda1.$ext.tmp" && mv "$dest/olinda1.$ext.tmp" "$dest/olinda1.$ext"; fi
done
echo "test data: fetched into $dest"
