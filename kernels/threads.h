/* Thread count for our OpenMP loops and for OpenBLAS, set in one place.
 *
 * terraseg links the OpenMP build of OpenBLAS, so our parallel loops and
 * sgemm share one libgomp pool: an sgemm called from inside one of our
 * parallel regions runs on the calling thread instead of spawning more, and
 * the machine's cores are never oversubscribed (docs/architecture.md). */
#ifndef TS_THREADS_H
#define TS_THREADS_H

#include <stddef.h>

/* Sets the thread count: n > 0 is used as given; n <= 0 takes the
 * TERRASEG_THREADS environment variable if set, else the number of online
 * cores. Returns the count in effect. */
int ts_threads_init(int n);
int ts_threads_count(void);

/* "OpenBLAS <config>, <threading model>, <n> threads" for `terraseg version`. */
void ts_blas_describe(char *buf, size_t size);
/* 0 sequential, 1 pthreads, 2 OpenMP, as OpenBLAS reports it. */
int ts_blas_threading(void);

/* OpenBLAS picks its kernels when it loads, from the CPU model. Debian's
 * 0.3.21 does not know newer Xeons (e.g. family 6 model 207) and falls back
 * to its generic "Prescott" kernels, about 5x slower than the AVX-512 ones
 * on the same machine (docs/benchmarks.md). This returns the OPENBLAS_CORETYPE
 * the CPU's own feature flags support ("SkylakeX" with AVX-512, "Haswell"
 * with AVX2+FMA) when OpenBLAS fell back to a generic core, else NULL. The
 * choice only takes effect in a new process (the command re-executes itself). */
const char *ts_blas_better_coretype(void);

#endif
