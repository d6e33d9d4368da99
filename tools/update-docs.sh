#!/bin/sh
# Rewrites the generated parts of the docs from the terraseg binary:
#   docs/commands.md         between its GENERATED COMMAND REFERENCE markers:
#                            `terraseg help --markdown` (the option tables)
#   docs/training-config.md  between its GENERATED KEY REFERENCE markers:
#                            `terraseg train --print-schema` (the schema table;
#                            the same text `tests/test_config --write-docs` writes)
# Usage: tools/update-docs.sh [path/to/terraseg]     (default: build/terraseg)
# tests/cli.sh fails while docs/commands.md is stale, test_config while
# docs/training-config.md is; run this after changing an option or a key.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
T=${1:-"$root/build/terraseg"}
if [ ! -x "$T" ]; then
    echo "update-docs: no terraseg binary at $T (build it, or give its path)" >&2
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# replace FILE BEGIN END: the lines between the line starting with BEGIN and
# the line starting with END become the contents of $tmp/gen.
replace() {
    file=$1
    awk -v b="$2" -v e="$3" -v gen="$tmp/gen" '
        index($0, b) == 1 && !state { print; while ((getline l < gen) > 0) print l; state = 1; next }
        index($0, e) == 1 && state == 1 { state = 2 }
        state != 1 { print }
        END { if (state != 2) exit 3 }' "$file" >"$tmp/new" || {
        echo "update-docs: $file lacks the markers $2 ... $3" >&2
        exit 1
    }
    if cmp -s "$tmp/new" "$file"; then
        echo "update-docs: $file is up to date"
    else
        cat "$tmp/new" >"$file"
        echo "update-docs: rewrote the generated part of $file"
    fi
}

"$T" help --markdown >"$tmp/gen"
replace "$root/docs/commands.md" "<!-- BEGIN GENERATED COMMAND REFERENCE" "<!-- END GENERATED COMMAND REFERENCE"
"$T" train --print-schema >"$tmp/gen"
replace "$root/docs/training-config.md" "<!-- BEGIN GENERATED KEY REFERENCE" "<!-- END GENERATED KEY REFERENCE"
