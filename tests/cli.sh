#!/bin/sh
# The terraseg command as a user runs it: help, version, option errors, and a
# small bench run. Usage: tests/cli.sh path/to/terraseg
T="$1"
passed=0
failed=0
out=$(mktemp)
tmpd=$(mktemp -d)
trap 'rm -rf "$out" "$out.doc" "$out.gen" "$tmpd"' EXIT

# expect <exit code> <regex the output must match> <args...>
expect() {
    want_rc=$1
    pattern=$2
    shift 2
    "$T" "$@" >"$out" 2>&1
    rc=$?
    if [ "$rc" -eq "$want_rc" ] && grep -Eq -- "$pattern" "$out"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "FAIL terraseg $*: exit $rc (want $want_rc), output must match /$pattern/; output was:"
        sed 's/^/    /' "$out"
    fi
}

expect 0 "commands:" --help
expect 0 "commands:" help
expect 0 "usage: terraseg predict \[options\] MODEL SCENE OUT.tif" help predict
expect 0 "^## terraseg predict" help --markdown predict
expect 0 "\| \`--blend MODE\` \| \`gaussian\` \|" help --markdown
expect 2 "help: unknown command or option \"frobnicate\"" help frobnicate
expect 2 "help: one command at a time" help predict eval

# docs/commands.md: the part between its markers is exactly `terraseg help --markdown`.
doc="$(dirname "$0")/../docs/commands.md"
sed -n '/^<!-- BEGIN GENERATED COMMAND REFERENCE/,/^<!-- END GENERATED COMMAND REFERENCE/p' "$doc" | sed '1d;$d' >"$out.doc"
"$T" help --markdown >"$out.gen" 2>&1
if [ -s "$out.doc" ] && cmp -s "$out.doc" "$out.gen"; then
    passed=$((passed + 1))
else
    failed=$((failed + 1))
    echo "FAIL docs/commands.md: its generated command reference differs from 'terraseg help --markdown';"
    echo "     regenerate it with: tools/update-docs.sh $T   (< the file, > the binary)"
    diff "$out.doc" "$out.gen" | head -n 20 | sed 's/^/    /'
fi
demo_dir=$(mktemp -d)
expect 0 "held-out mIoU [0-9.]+" demo --out "$demo_dir" --size 512 --epochs 1 --tile 64 --block 128
expect 1 "already exists; use --overwrite" demo --out "$demo_dir" --size 512 --epochs 1 --tile 64 --block 128
rm -rf "$demo_dir"
expect 2 "takes no arguments" demo extra
expect 0 "--blend MODE" predict --help
expect 2 "expects MODEL SCENE OUT.tif" predict model.safetensors
expect 2 "--blend must be gaussian, cosine or mean, got \"box\"" predict --blend box a b c
expect 2 "--tta: unknown transform \"spin\"" predict --tta hflip,spin a b c
expect 2 "--overlap 64 must be less than --tile 64" predict --tile 64 --overlap 64 a b c
expect 1 "no-such-model" predict no-such-model.safetensors a.tif b.tif
expect 2 "--device bogus: unknown device \(cpu, cuda or cuda:N\)" predict --device bogus a b c
expect 2 "--device cuda:x: .*cuda:N" predict --device cuda:x a b c
# --device cuda: without a usable GPU (or in a CPU-only build) a refusal that names the device and the way out,
# before the model is read; with one, predict gets as far as the missing model.
if "$T" version 2>/dev/null | grep -Eq "cuda backend: built; .*[0-9]+ device\(s\)"; then
    expect 1 "no-such-model" predict --device cuda no-such-model.safetensors a.tif b.tif
else
    expect 1 "--device cuda: .*--device cpu" predict --device cuda no-such-model.safetensors a.tif b.tif
    expect 1 "--device cuda:1: .*--device cpu" predict --device cuda:1 no-such-model.safetensors a.tif b.tif
fi
expect 0 "bench" --help
expect 2 "usage: terraseg <command>"
expect 2 "unknown command \"frobnicate\"" frobnicate
expect 0 "^terraseg [0-9]+\.[0-9]+\.[0-9]+" version
expect 0 "cpu backend: OpenBLAS .*threading: OpenMP" version
expect 0 "cuda backend: (not built|built; CUDA runtime [0-9]+\.[0-9]+.*cuDNN [0-9]+\.[0-9]+)" version
expect 0 "geospatial: GDAL [0-9]+\.[0-9]+.*GEOS [0-9]+\.[0-9]+" version
expect 2 "takes no arguments" version extra
expect 0 "--batch N +images per batch \(default: 1\)" bench --help
expect 0 "--size PX" bench --help
expect 2 "unknown option --no-such-option" bench --no-such-option
expect 2 "--batch must be between 1 and 1024, got 0" bench --batch 0
expect 2 "--size expects a number, got \"abc\"" bench --size abc
expect 2 "--iters expects a whole number" bench --iters 1.5
expect 2 "option --batch needs a value" bench --batch
expect 2 "unknown benchmark \"nope\"; available: conv, model, train" bench nope
expect 2 "bench model: --csv applies to bench conv" bench model --csv /tmp/never.csv
expect 2 "bench train: --csv applies to bench conv" bench train --csv /tmp/never.csv
expect 2 "bench conv: --no-graphs applies to bench model" bench conv --no-graphs
expect 2 "bench train: --no-graphs applies to bench model" bench train --no-graphs
expect 0 "sgemm" bench conv --size 64 --iters 1 --threads 2
expect 0 "decoder" bench --size 33 --iters 1 --batch 2
expect 0 "tiles/s" bench train --size 64 --iters 1 --batch 1
# BatchNorm in training needs more than one value per channel: a 32-px tile leaves 1x1 at layer4.
expect 1 "Expected more than 1 value per channel" bench train --size 32 --iters 1 --batch 1
# --device: bad names and --tf32 on the CPU are refused before anything runs, in every build; cuda without a
# usable GPU (or in a CPU-only build) is refused naming the device and the way out. On a GPU machine these
# run (tools/test_gpu.sh covers them there).
if ! "$T" version 2>/dev/null | grep -Eq "cuda backend: built; .*[0-9]+ device\(s\)"; then
    if "$T" version 2>/dev/null | grep -q "cuda backend: built"; then nogpu=1; else nogpu=2; fi
    expect $nogpu "bench model: .*--device cpu" bench model --device cuda
    expect $nogpu "bench train: .*--device cpu" bench train --device cuda:1
    printf 'output: %s/train-out\nclasses: [a, b]\ndata:\n  images: none.tif\nlabels:\n  path: none.tif\n' \
        "$tmpd" >"$tmpd/train.yaml"
    expect 1 "train: device cuda:1: .*--device cpu" train "$tmpd/train.yaml" --device cuda:1 --quiet
    expect 1 "train: device cuda:0: .*--device cpu" train "$tmpd/train.yaml" --set device=cuda --quiet
fi
expect 2 "--device gpu: unknown backend \"gpu\": choose cpu, cuda or cuda:N" train x.yaml --device gpu
expect 2 "--device cuda:x: .*cuda:N with N a device index" demo --device cuda:x
expect 2 "--device gpu: unknown backend \"gpu\"" bench conv --device gpu
expect 2 "write cuda or cuda:N" bench conv --device cuda:x
expect 2 "--tf32 applies to --device cuda only" bench conv --tf32
expect 2 "--cudnn-benchmark applies to --device cuda only" bench model --cudnn-benchmark
expect 2 "--cudnn-benchmark applies to --device cuda only" bench conv --cudnn-benchmark --device cpu
expect 2 "predict: --tf32 is for --device cuda" predict m.safetensors s.tif o.tif --tf32
expect 2 "predict: --cudnn-benchmark is for --device cuda" predict m.safetensors s.tif o.tif --cudnn-benchmark --device cpu
# windows filters and tile: option checks that fire before any file is read.
expect 0 "--drop-background +filter: drop windows" windows --help
expect 0 "--max-nodata FRACTION" windows --help
expect 0 "--labels-layer NAME" windows --help
expect 2 "--drop-background needs --labels" windows no.tif -o no.csv --drop-background
expect 2 "--labels is used by --drop-background only" windows no.tif -o no.csv --labels no.gpkg
expect 2 "--attribute is a label option, but no --labels" windows no.tif -o no.csv --max-nodata 0.5 --attribute cls
expect 2 "--max-nodata must be between 0 and 1, got 1.5" windows no.tif -o no.csv --max-nodata 1.5
expect 2 "--bands expects band numbers" windows no.tif -o no.csv --max-nodata 0.5 --bands 1,x
expect 2 "--bands and --nodata only matter with" windows no.tif -o no.csv --bands 1
expect 2 "give --attribute or --burn, not both" windows no.tif -o no.csv --drop-background --labels l.gpkg --attribute a --burn 1
expect 0 "--skip-empty" tile --help
expect 0 "--windows CSV" tile --help
expect 2 "expected one IMAGE" tile --windows w.csv --out d
expect 2 "--windows CSV and --out DIR are required" tile no.tif --out d
expect 2 "--windows CSV and --out DIR are required" tile no.tif --windows w.csv
expect 2 "--bands expects band numbers" tile no.tif --windows w.csv --out d --bands 0
expect 2 "--split expects train, val or test" tile no.tif --windows w.csv --out d --split buffer
expect 2 "--class-map needs --attribute" tile no.tif --windows w.csv --out d --labels l.gpkg --class-map a=1
expect 2 "--nodata only matters with --skip-empty" tile no.tif --windows w.csv --out d --nodata 0
expect 1 "cannot open" tile no_such_image.tif --windows w.csv --out d
expect 0 "--mmu PX" polygonize --help
expect 2 "expected CLASSES.tif and OUT" polygonize only_one.tif
expect 2 "--connectivity must be 4 or 8, got 6" polygonize no.tif no.gpkg --connectivity 6
expect 1 "class raster 'no_such_classes.tif': cannot open" polygonize no_such_classes.tif no_such_out.gpkg

echo "cli: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
