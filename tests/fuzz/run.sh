#!/bin/sh
# Builds every tests/fuzz/fuzz_*.c with clang's libFuzzer, AddressSanitizer
# and UndefinedBehaviorSanitizer, and runs each for a bounded time, starting
# from its committed seed corpus tests/fuzz/corpus/<name>/ (copied, so the
# run never grows the repository). Any crash, leak or sanitizer report fails.
#
# A target names the library sources it needs on a line of its own:
#   // fuzz-sources: weights/safetensors.c weights/dict.c kernels/status.c
#
# Usage: tests/fuzz/run.sh SOURCE_DIR OUT_DIR [SECONDS_PER_TARGET]
set -u
src=$1
out=$2
secs=${3:-15}
mkdir -p "$out"
passed=0
failed=0
for target in "$src"/tests/fuzz/fuzz_*.c; do
    [ -e "$target" ] || continue
    name=$(basename "$target" .c)
    sources=$(sed -n 's|^// fuzz-sources:||p' "$target")
    srcs=""
    for s in $sources; do srcs="$srcs $src/$s"; done
    echo "== $name: building"
    # shellcheck disable=SC2086
    if ! clang -g -O1 -std=c17 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
        -I"$src" -I/usr/include/cjson "$target" $srcs -lcjson -lm -o "$out/$name"; then
        echo "FAIL $name: does not build"
        failed=$((failed + 1))
        continue
    fi
    corpus="$out/corpus-$name"
    rm -rf "$corpus"
    mkdir -p "$corpus"
    if [ -d "$src/tests/fuzz/corpus/$name" ]; then cp "$src/tests/fuzz/corpus/$name"/* "$corpus"/ 2>/dev/null; fi
    echo "== $name: fuzzing for ${secs}s"
    if "$out/$name" -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -timeout=10 \
        -artifact_prefix="$out/$name-" "$corpus" >"$out/$name.log" 2>&1; then
        tail -n 2 "$out/$name.log"
        passed=$((passed + 1))
    else
        echo "FAIL $name: see the crash input and log below"
        tail -n 40 "$out/$name.log"
        failed=$((failed + 1))
    fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
