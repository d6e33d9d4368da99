#!/bin/sh
# docs/user-guide.md as a test, so the guide cannot rot: every ```sh block of
# the guide runs, in the guide's order, in one scratch folder (blocks share
# its files, not shell variables or the current folder), with the terraseg
# under test first on PATH, under bash -e -u -o pipefail. The first block
# that fails fails the test: its line in the guide, its text and its output
# are printed.
#   ```sh no-test     not run (needs root, Python, the network or real data)
#   ```sh needs=PROG  run only where PROG is installed (e.g. gdalbuildvrt from
#                     GDAL's command-line tools, which terraseg does not need)
# Other fences (```python, ```yaml, ```text, ...) are never run.
# Usage: tests/guide.sh path/to/terraseg [DIR]
#   DIR: run there and keep it (default: a temporary folder, removed after)
set -eu
T=$1
here=$(cd "$(dirname "$0")" && pwd)
guide="$here/../docs/user-guide.md"
case "$T" in /*) ;; *) T="$(pwd)/$T" ;; esac
[ -x "$T" ] || { echo "guide: no terraseg binary at $T" >&2; exit 1; }
if [ $# -ge 2 ]; then
    top=$2
    mkdir -p "$top"
    top=$(cd "$top" && pwd)
    keep=1
else
    top=$(mktemp -d)
    keep=0
fi
cleanup() { [ "$keep" -eq 1 ] || rm -rf "$top"; }
trap cleanup EXIT
mkdir -p "$top/bin" "$top/blocks" "$top/work"
ln -sf "$T" "$top/bin/terraseg"

# Split the guide into blocks/NNN.sh (first line: "# LINE INFO"); fences at
# the start of a line only.
awk -v dir="$top/blocks" '
    !inblock && /^```sh([ \t]|$)/ {
        n++; f = sprintf("%s/%03d.sh", dir, n); info = $0; sub(/^```sh[ \t]*/, "", info)
        printf "# %d %s\n", NR, info > f; inblock = 1; next
    }
    inblock && /^```[ \t]*$/ { close(f); inblock = 0; next }
    inblock { print > f }
    END { if (inblock) { print "guide: unterminated ```sh block" > "/dev/stderr"; exit 1 } }
' "$guide"

start=$(date +%s)
ran=0
skipped=0
for b in "$top"/blocks/*.sh; do
    [ -e "$b" ] || { echo "guide: no \`\`\`sh blocks in $guide" >&2; exit 1; }
    head=$(head -n 1 "$b")
    line=$(echo "$head" | cut -d' ' -f2)
    info=$(echo "$head" | cut -d' ' -f3-)
    case " $info " in
    *" no-test "*)
        skipped=$((skipped + 1))
        continue
        ;;
    esac
    need=$(echo " $info " | sed -n 's/.* needs=\([^ ]*\) .*/\1/p')
    if [ -n "$need" ] && ! command -v "$need" >/dev/null 2>&1; then
        echo "guide: line $line: skipped, $need is not installed"
        skipped=$((skipped + 1))
        continue
    fi
    t0=$(date +%s)
    if (cd "$top/work" && PATH="$top/bin:$PATH" bash -e -u -o pipefail "$b") >"$top/log" 2>&1; then
        ran=$((ran + 1))
        echo "guide: line $line: ok ($(($(date +%s) - t0)) s)"
    else
        rc=$?
        echo "FAIL docs/user-guide.md, the sh block at line $line: exit $rc. The block:"
        tail -n +2 "$b" | sed 's/^/    /'
        echo "its output (last 40 lines):"
        tail -n 40 "$top/log" | sed 's/^/    /'
        [ "$keep" -eq 1 ] && echo "(its files are in $top/work)"
        exit 1
    fi
done
echo "guide: $ran blocks ran, $skipped skipped, in $(($(date +%s) - start)) s"
