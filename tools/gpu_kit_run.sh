#!/bin/sh
# The GPU machine's half of tools/gpu_kit.sh (copied into the kit as run.sh):
# runs the GPU suite and the GPU benchmarks with the kit's programs and
# libraries, from the repository root. Usage: sh gpukit/run.sh [OUTDIR]
# Every step runs even when one before it failed; summary.txt lists each
# step's exit status, and the script exits non-zero if any step failed.
# STEPS picks the parts (default "tests bench demo compare"), so that each
# call stays inside a time limit; GPU_COMPARE_ARGS adds options to
# gpu_compare.py (e.g. "--modes fp32,bf16 --phases train").
set -u
kit=$(cd "$(dirname "$0")" && pwd)
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
sum="$out/summary.txt"
: >"$sum"
failed=0
step() { # step NAME LOGFILE COMMAND...: runs COMMAND, appends its output to LOGFILE
    name=$1
    log=$2
    shift 2
    echo "== $name: $*" >>"$log"
    t0=$(date +%s)
    "$@" >>"$log" 2>&1
    rc=$?
    echo "$name: exit $rc ($(($(date +%s) - t0)) s)" | tee -a "$sum"
    [ "$rc" -eq 0 ] || failed=1
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
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    "$T" version 2>&1
    git log -1 --format='commit %h %s' 2>/dev/null
} >>"$sum"

# 1. The GPU tests (the same programs tools/test_gpu.sh runs through ctest).
want tests && for t in "$kit"/bin/test_cuda_*; do
    step "$(basename "$t")" "$out/tests.log" "$t"
    grep -E "^[a-z_]+: [0-9]+ passed, [0-9]+ failed" "$out/tests.log" | tail -n 1 >>"$sum"
done

# 2. terraseg's own benchmarks, TF32 off and on.
want bench && for tf in "" "--tf32"; do
    step "bench conv $tf" "$out/bench.txt" "$T" bench conv --device cuda --batch 8 --size 512 --iters 10 $tf
    for s in 256 512; do
        step "bench model $s $tf" "$out/bench.txt" "$T" bench model --device cuda --batch 16 --size $s --iters 10 $tf
        step "bench train $s $tf" "$out/bench.txt" "$T" bench train --device cuda --batch 16 --size $s --iters 10 $tf
    done
done

# 3. The whole pipeline on the GPU: train, predict, polygonize, evaluate.
want demo && step "demo --device cuda" "$out/demo.log" "$T" demo --device cuda --out /tmp/terraseg-demo --overwrite \
    --size 1024 --epochs 3

# 4. terraseg vs PyTorch (the machine's torch; segmentation-models-pytorch from the kit).
site=/tmp/terraseg-kit-site
if want compare && ls "$kit"/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$kit"/wheels/*.whl >>"$out/gpu_compare.log" 2>&1
fi
export PYTHONPATH="$site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
want compare && step "gpu_compare" "$out/gpu_compare.log" sh -c "python3 tools/bench/gpu_compare.py '$T' \
    --sizes 256,512 --batches 1,8,16,32 ${GPU_COMPARE_ARGS:-} > '$out/gpu_compare.md'"

echo "done: $( [ "$failed" -eq 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED' ) (details in $out)" | tee -a "$sum"
exit "$failed"
