#include "threads.h"

#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
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
    snprintf(buf, size, "%s; threading: %s, %d threads (core: %s)", openblas_get_config(), model,
             openblas_get_num_threads(), openblas_get_corename());
}

const char *ts_blas_better_coretype(void)
{
    /* Only override a fallback: a core OpenBLAS recognised is left alone. */
    static const char *const generic[] = {"Prescott", "Core2", "Nehalem", "Katmai", "Banias", "Atom"};
    const char *core = openblas_get_corename();
    int fell_back = 0;
    for (size_t i = 0; i < sizeof generic / sizeof generic[0]; i++)
        if (core && strcasecmp(core, generic[i]) == 0) fell_back = 1;
    if (!fell_back) return NULL;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    /* The SkylakeX kernels use AVX-512 F, CD, BW, DQ and VL. */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl"))
        return "SkylakeX";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
    return NULL;
}
