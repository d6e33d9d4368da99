#!/bin/sh
# The terraseg command as a user runs it: help, version, option errors, and a
# small bench run. Usage: tests/cli.sh path/to/terraseg
T="$1"
passed=0
failed=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT

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
expect 2 "unknown benchmark \"nope\"; available: conv, model" bench nope
expect 0 "sgemm" bench conv --size 64 --iters 1 --threads 2
expect 0 "decoder" bench --size 33 --iters 1 --batch 2

echo "cli: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
