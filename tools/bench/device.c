/* `terraseg bench --device cpu|cuda[:N]` and `--tf32`: checked before a
 * benchmark prints or allocates anything, without touching a GPU; then the
 * backend itself (ts_bench_backend). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/threads.h"
#ifdef TERRASEG_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif
#include "tools/bench/bench.h"

/* "cuda" or "cuda:N" with N a device index, as ts_backend_get accepts it. */
static int valid_cuda_name(const char *d)
{
    if (strncmp(d, "cuda", 4) != 0) return 0;
    if (d[4] == 0) return 1;
    if (d[4] != ':') return 0;
    char *end = NULL;
    long n = strtol(d + 5, &end, 10);
    return end != d + 5 && *end == 0 && n >= 0 && n <= 1023 && d[5] >= '0' && d[5] <= '9';
}

int ts_bench_is_cuda(const ts_bench_opts *o) { return o->device && valid_cuda_name(o->device); }

int ts_bench_check_device(const ts_bench_opts *o, const char *what)
{
    const char *d = o->device ? o->device : "cpu";
    if (strcmp(d, "cpu") == 0) {
        if (o->tf32) {
            fprintf(stderr, "bench %s: --tf32 applies to --device cuda only (a tensor-core mode of the GPU)\n", what);
            return 2;
        }
        if (o->cudnn_benchmark) {
            fprintf(stderr, "bench %s: --cudnn-benchmark applies to --device cuda only (cuDNN's algorithm search)\n",
                    what);
            return 2;
        }
        return 0;
    }
    if (!valid_cuda_name(d)) {
        /* ts_backend_get says what it accepts; a malformed or unknown name is
         * refused before any device is touched. */
        const ts_backend *b = NULL;
        if (ts_backend_get(d, &b) != TS_OK) {
            fprintf(stderr, "bench %s: --device %s: %s\n", what, d, ts_last_error());
        } else {
            fprintf(stderr, "bench %s: --device %s: not a device this benchmark knows (cpu, cuda, cuda:N)\n", what, d);
        }
        return 2;
    }
#ifndef TERRASEG_HAVE_CUDA
    /* Without CUDA, ts_backend_get explains the build and touches nothing. */
    const ts_backend *b = NULL;
    if (ts_backend_get(d, &b) != TS_OK) {
        fprintf(stderr, "bench %s: %s\n", what, ts_last_error());
        return 2;
    }
#endif
    return 0;
}

int ts_bench_backend(const ts_bench_opts *o, const char *what, const ts_backend **b)
{
    *b = NULL;
    int rc = ts_bench_check_device(o, what);
    if (rc) return rc;
    if (!ts_bench_is_cuda(o)) {
        *b = ts_backend_cpu();
        return 0;
    }
#ifdef TERRASEG_HAVE_CUDA
    ts_cuda_set_tf32(o->tf32); /* before the backend exists: its first plans already see it */
    ts_cuda_set_benchmark(o->cudnn_benchmark);
#endif
    if (ts_backend_get(o->device, b) != TS_OK) {
        fprintf(stderr, "bench %s: %s\n", what, ts_last_error());
        return 1;
    }
    return 0;
}

void ts_bench_describe(const ts_bench_opts *o, const ts_backend *b, char *buf, size_t size)
{
    if (ts_backend_is_host(b)) {
        (void)o;
        ts_blas_describe(buf, size);
        return;
    }
#ifdef TERRASEG_HAVE_CUDA
    char d[448];
    ts_cuda_describe(d, sizeof d);
    snprintf(buf, size, "device %s; %s; fp32 convs through cuDNN, TF32 %s; conv algorithms %s", o->device, d,
             o->tf32 ? "on" : "off",
             o->cudnn_benchmark ? "timed by cuDNN on first use (--cudnn-benchmark)" : "by cuDNN's heuristics");
#else
    snprintf(buf, size, "backend %s", b->name);
#endif
}
