/* `terraseg bench --device cpu|cuda[:N]` and `--tf32`: which benchmark can
 * run where. Checked before a benchmark prints or allocates anything, and
 * without touching a GPU (the CUDA backend itself is created by the
 * benchmark that uses it, bench conv). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
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
    /* Only the op-level benchmark runs on the CUDA backend today: nn/unet.c
     * and the trainer keep every tensor in host memory, and running them with
     * the CUDA table (which expects device pointers) is never an option. */
    if (strcmp(what, "conv") != 0) {
        fprintf(stderr,
                "bench %s: --device %s: the U-Net's CUDA path is not implemented yet; the CUDA ops can be "
                "benchmarked with terraseg bench conv --device cuda\n",
                what, d);
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
