#include "threads.h"

#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int thread_count = 0;

int ts_threads_init(int n)
{
    if (n <= 0) {
        const char *env = getenv("TERRASEG_THREADS");
        if (env && atoi(env) > 0)
            n = atoi(env);
        else {
            long cores = sysconf(_SC_NPROCESSORS_ONLN);
            n = cores > 0 ? (int)cores : 1;
        }
    }
    thread_count = n;
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
    return n;
}

int ts_threads_count(void)
{
    if (thread_count == 0) ts_threads_init(0);
    return thread_count;
}

int ts_blas_threading(void) { return openblas_get_parallel(); }

void ts_blas_describe(char *buf, size_t size)
{
    static const char *const models[] = {"sequential", "pthreads", "OpenMP"};
    int par = openblas_get_parallel();
    const char *model = (par >= 0 && par <= 2) ? models[par] : "unknown";
    snprintf(buf, size, "OpenBLAS %s; threading: %s, %d threads (core: %s)", openblas_get_config(), model,
             openblas_get_num_threads(), openblas_get_corename());
}
