#!/bin/sh
# The GPU machine's half of tools/gpu_kit.sh (copied into the kit as run.sh):
# runs the GPU suite and the GPU benchmarks with the kit's programs and
# libraries, from the repository root. Usage: sh gpukit/run.sh [OUTDIR]
# Every step runs even when one before it failed; summary.txt lists each
# step's exit status (and the benchmarks' result rows and gpu_compare's two
# done-when verdicts), and the script exits non-zero if any step failed.
#
# STEPS picks the parts (default "tests bench demo compare"; "sanitize" on
# request), so that each call stays inside a time limit. On the lent machines a call may run 10
# minutes, so the whole kit takes two calls (docs/gpu.md):
#   STEPS="tests bench demo" sh gpukit/run.sh "$OUT"
#   STEPS="compare" sh gpukit/run.sh "$OUT"
# Each step runs under timeout(1): STEP_TIMEOUT seconds (default 240), the
# compare step GPU_COMPARE_TIMEOUT (default 560) and, inside that,
# gpu_compare.py's own --budget-s GPU_COMPARE_BUDGET (default 470: it starts
# no cell it does not expect to finish by then, and prints its report with
# what it has). None of these times has been measured on a GPU yet: they
# are sized from estimates, to fail soft (a step that runs out says exit 124
# in the summary; gpu_compare's cells say "skipped") rather than to lose the
# call.
#
# GPU_COMPARE_ARGS adds options to gpu_compare.py (they come last and win,
# e.g. "--phases train --modes bf16"); GPU_COMPARE_RESUME=FILE (a
# gpu_compare.csv of an earlier call, carried in the working tree) runs only
# the cells that FILE lacks or skipped, and the new gpu_compare.csv holds both.
set -u
kit=$(cd "$(dirname "$0")" && pwd)
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
sum="$out/summary.txt"
: >"$sum"
failed=0
step_timeout=${STEP_TIMEOUT:-240}
tmo=
command -v timeout >/dev/null 2>&1 && tmo=timeout
step_from=0 # the byte offset in LOGFILE where the last step's output starts
step() {    # step NAME LOGFILE COMMAND...: runs COMMAND (under timeout), appends its output to LOGFILE
    name=$1
    log=$2
    shift 2
    echo "== $name: $*" >>"$log"
    step_from=$(($(wc -c <"$log")))
    t0=$(date +%s)
    if [ -n "$tmo" ]; then
        timeout -k 15 "$step_timeout" "$@" >>"$log" 2>&1
    else
        "$@" >>"$log" 2>&1
    fi
    rc=$?
    note=
    [ -n "$tmo" ] && [ "$rc" -eq 124 ] && note=", timed out after $step_timeout s"
    echo "$name: exit $rc ($(($(date +%s) - t0)) s$note)" | tee -a "$sum"
    [ "$rc" -eq 0 ] || failed=1
}
# bench NAME ARGS...: one `terraseg bench` step into bench.txt; its table rows
# (and their header) go into the summary too.
bench() {
    name=$1
    shift
    step "$name" "$out/bench.txt" "$T" bench "$@"
    tail -c +$((step_from + 1)) "$out/bench.txt" | grep -E '^(batch +tile|[0-9]+ +[0-9]+x[0-9]+ )' |
        sed 's/^/    /' >>"$sum"
}

# The libraries: unpacked once per machine under /tmp (the kit's paths are
# absolute: usr/lib/x86_64-linux-gnu/...).
libroot=/tmp/terraseg-kit
if [ ! -d "$libroot/usr" ]; then
    mkdir -p "$libroot"
    xz -dc "$kit/libs.tar.xz" | tar -xf - -C "$libroot"
fi
libpath="$libroot/usr/lib/x86_64-linux-gnu:$libroot/usr/lib/x86_64-linux-gnu/openblas-openmp"
libpath="$libpath:$libroot/usr/lib/x86_64-linux-gnu/blas:$libroot/usr/lib/x86_64-linux-gnu/lapack"
# cuDNN 9 and cuBLAS 13: the system's if the loader knows them, else the
# ones in PyTorch's nvidia-* wheels.
for mod in cudnn cublas cuda_runtime; do
    d=$(python3 -c "import nvidia.$mod as m, os; print(os.path.join(list(m.__path__)[0], 'lib'))" 2>/dev/null) &&
        [ -d "$d" ] && libpath="$libpath:$d"
done
export LD_LIBRARY_PATH="$libpath:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PROJ_DATA="$libroot/usr/share/proj" PROJ_LIB="$libroot/usr/share/proj" GDAL_DATA="$libroot/usr/share/gdal"
export TERRASEG_FIXTURES="$PWD/tests/fixtures"
T="$kit/bin/terraseg"
steps=" ${STEPS:-tests bench demo compare} "
want() { case "$steps" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); steps:$steps"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    "$T" version 2>&1
    git log -1 --format='commit %h %s' 2>/dev/null
    built=$(cat "$kit/built-from" 2>/dev/null || echo unknown)
    echo "kit built from: $built"
    case "$built" in
    "$(git rev-parse --short=12 HEAD 2>/dev/null)") ;;
    *) echo "WARNING: the kit was not built from this working tree's commit: rebuild it (tools/gpu_kit.sh)" ;;
    esac
} >>"$sum"

# 1. The GPU tests (the same programs tools/test_gpu.sh runs through ctest).
want tests && for t in "$kit"/bin/test_cuda_*; do
    step "$(basename "$t")" "$out/tests.log" "$t"
    tail -c +$((step_from + 1)) "$out/tests.log" | grep -E "^[a-z_]+: [0-9]+ passed, [0-9]+ failed" | tail -n 1 >>"$sum"
done

# 2. terraseg's own benchmarks: float32 with TF32 off and on, then mixed
# precision. bench model and bench train also time batch 4 besides --batch.
# Trimmed to fit the 10-minute call with the tests and the demo: batch 16,
# 10 timed iterations (the default elsewhere is 20), bf16 once per size
# without --tf32 (TF32 is a float32 setting: with --precision bf16/fp16 every
# conv is a half tensor-op conv either way), fp16 only for training and only
# at 512 (its path differs from bf16 by the loss scaling).
want bench && {
    for tf in "" "--tf32"; do
        bench "bench conv${tf:+ $tf}" conv --device cuda --batch 8 --size 512 --iters 10 $tf
        for s in 256 512; do
            bench "bench model $s${tf:+ $tf}" model --device cuda --batch 16 --size $s --iters 10 $tf
            bench "bench train $s${tf:+ $tf}" train --device cuda --batch 16 --size $s --iters 10 $tf
        done
    done
    for s in 256 512; do
        bench "bench model $s --precision bf16" model --device cuda --batch 16 --size $s --iters 10 --precision bf16
        bench "bench train $s --precision bf16" train --device cuda --batch 16 --size $s --iters 10 --precision bf16
    done
    bench "bench train 512 --precision fp16" train --device cuda --batch 16 --size 512 --iters 10 --precision fp16
    # cuDNN's heuristic ranking (the default) against its timed search
    # (--cudnn-benchmark, what PyTorch's cudnn.benchmark does), bf16 at 512.
    for b in model train; do
        bench "bench $b 512 --precision bf16 --cudnn-benchmark" $b --device cuda --batch 16 --size 512 --iters 10 \
            --precision bf16 --cudnn-benchmark
    done
    # What the CUDA graphs buy where launches dominate: batch 1 (and 4),
    # replayed against every op called directly.
    bench "bench model 256 --batch 1 --precision bf16" model --device cuda --batch 1 --size 256 --iters 20 \
        --precision bf16
    bench "bench model 256 --batch 1 --precision bf16 --no-graphs" model --device cuda --batch 1 --size 256 \
        --iters 20 --precision bf16 --no-graphs
}

# 3. The whole pipeline on the GPU: train, predict, polygonize, evaluate.
want demo && step "demo --device cuda" "$out/demo.log" "$T" demo --device cuda --out /tmp/terraseg-demo --overwrite \
    --size 1024 --epochs 3

# 4. terraseg vs PyTorch (the machine's torch; segmentation-models-pytorch from
# the kit): terraseg fp32, --tf32 and --precision bf16 against PyTorch fp32,
# tf32, bf16 autocast and torch.compile, inference and training, 256² and 512²,
# batch 1, 8 and 32 (not all of 1..32: one call's time), 10 timed steps after
# 3 warm-up steps. The cells the verdicts need run first; torch.compile (which
# compiles afresh for every cell) and training's fp32/tf32 cells last, so
# that the budget, if anything, cuts those. gpu_compare.csv is written cell
# by cell and survives a kill; gpu_compare.md is the report.
site=/tmp/terraseg-kit-site
if want compare && ls "$kit"/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$kit"/wheels/*.whl >>"$out/gpu_compare.log" 2>&1
fi
export PYTHONPATH="$site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
resume=
[ -n "${GPU_COMPARE_RESUME:-}" ] && resume="--resume '$GPU_COMPARE_RESUME'"
if want compare; then
    step_timeout=${GPU_COMPARE_TIMEOUT:-560}
    step "gpu_compare" "$out/gpu_compare.log" sh -c "python3 tools/bench/gpu_compare.py '$T' \
        --sizes 256,512 --batches 1,8,32 --iters 10 --warmup 3 --ts-modes fp32,tf32,bf16 \
        --budget-s ${GPU_COMPARE_BUDGET:-470} --save-csv '$out/gpu_compare.csv' $resume ${GPU_COMPARE_ARGS:-} \
        > '$out/gpu_compare.md'"
    step_timeout=${STEP_TIMEOUT:-240}
    grep -E '^DONE-WHEN|^  ratio' "$out/gpu_compare.md" >>"$sum" 2>/dev/null
    n=$(grep -c ',skipped,' "$out/gpu_compare.csv" 2>/dev/null)
    [ "${n:-0}" -gt 0 ] && echo "gpu_compare: $n cells skipped (time budget or interrupted): another call with" \
        "GPU_COMPARE_RESUME=<this gpu_compare.csv> runs them" >>"$sum"
fi

# 5. On request (STEPS=sanitize, not in the default: 10-100x slower): the
# GPU tests under compute-sanitizer, memcheck (out-of-bounds and misaligned
# device accesses, device memory leaked) for each, racecheck (shared-memory
# races of the block reductions) for the op tests. Seen working on the lent
# H100 (Firecracker), refused on gVisor machines ("Device not supported").
san=$(command -v compute-sanitizer 2>/dev/null || echo /usr/local/cuda/bin/compute-sanitizer)
if want sanitize; then
    for t in "$kit"/bin/test_cuda_*; do
        step "memcheck $(basename "$t")" "$out/sanitize.log" "$san" --tool memcheck --leak-check full \
            --error-exitcode 99 "$t"
    done
    for t in test_cuda_ops test_cuda_half; do
        step "racecheck $t" "$out/sanitize.log" "$san" --tool racecheck --error-exitcode 99 "$kit/bin/$t"
    done
fi

echo "done: $( [ "$failed" -eq 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED' ) (details in $out)" | tee -a "$sum"
exit "$failed"
