/* Shared helpers for the C tests: a seeded RNG, guarded buffers that catch
 * out-of-bounds writes, tolerance comparison against double references,
 * central finite differences, and the pass/fail tally CTest reads.
 *
 * A failing check prints the op, the shape, the worst error and where, and
 * tu_finish() then returns a non-zero exit code. */
#ifndef TS_TESTUTIL_H
#define TS_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"
#include "kernels/tensor.h"
#include "nn/unet.h"

/* ---- random numbers (splitmix64; the same sequence on every machine) ---- */
typedef struct tu_rng {
    uint64_t state;
} tu_rng;
void tu_rng_seed(tu_rng *r, uint64_t seed);
uint64_t tu_next(tu_rng *r);
double tu_uniform(tu_rng *r, double lo, double hi);
int tu_randint(tu_rng *r, int n); /* in [0, n) */
void tu_fill(tu_rng *r, float *p, size_t n, double lo, double hi);

/* ---- guarded buffers -----------------------------------------------------
 * Each buffer has TU_GUARD_BYTES of a sentinel pattern on both sides.
 * tu_guard_check() reports any byte that changed, naming op and buffer.
 * tu_free() checks the guards too (and counts a failure if they changed). */
#define TU_GUARD_BYTES 4096
void *tu_alloc(size_t bytes);                  /* zero-filled interior */
float *tu_alloc_f(size_t n);
int32_t *tu_alloc_i32(size_t n);
int tu_guard_check(const void *p, const char *op, const char *buffer);
void tu_free(void *p, const char *op, const char *buffer);
/* A tensor whose data is a guarded buffer (zero-filled). */
ts_tensor tu_tensor(int n, int c, int h, int w);
void tu_tensor_free(ts_tensor *t, const char *op, const char *name);

/* A small U-Net for the model tests: SMP's defaults for in bands and k
 * classes, with encoder_depth and the first `depth` decoder channels of dec,
 * and the decoder's BN on or off. */
ts_unet_config tu_unet_config(int in, int k, int depth, const int *dec, int use_bn);

/* ---- comparisons --------------------------------------------------------- */
/* Cosine similarity of two vectors (1 when both are zero): the direction
 * of a gradient, which is what mixed precision must keep. */
double tu_cosine(const float *a, const float *b, size_t n);
/* got[i] vs want[i] with |got - want| <= atol + rtol |want|. On failure prints
 * op, what, shape (if given: indices are decoded as n,c,h,w), the worst error,
 * its index and both values, and counts a failure. Returns 1 when close. */
int tu_check_close(const char *op, const char *what, const ts_tensor *shape, const float *got, const double *want,
                   size_t n, double atol, double rtol);
/* Same for double values (losses, finite differences). */
int tu_check_close_d(const char *op, const char *what, const double *got, const double *want, size_t n, double atol,
                     double rtol);
/* Exact equality of int32 arrays (arg-max indices). */
int tu_check_equal_i32(const char *op, const char *what, const int32_t *got, const int32_t *want, size_t n);

/* ---- finite differences --------------------------------------------------
 * f(ctx, x) is a scalar function of x[0..n) in double. Fills grad[k] with
 * (f(x + h e_i) - f(x - h e_i)) / 2h for i = idx[k], restoring x. */
typedef double (*tu_scalar_fn)(void *ctx, const double *x);
void tu_fd_grad(tu_scalar_fn f, void *ctx, double *x, const size_t *idx, size_t nidx, double h, double *grad);
/* Picks min(n, max) distinct indices of [0, n): all of them when n <= max,
 * otherwise a random sample. Returns the count written to idx. */
size_t tu_sample_indices(tu_rng *r, size_t n, size_t max, size_t *idx);

/* The q-quantile (0..1, nearest rank) of v[0..n); sorts v in place. 0 if n == 0. */
double tu_quantile(double *v, int n, double q);

/* ---- a scratch folder ------------------------------------------------------
 * One per test process: tu_tmpdir("test_x") makes /tmp/test_x_XXXXXX (NULL
 * and a message on failure), tu_path("a.tif") names a file in it (a ring of
 * 8 static buffers: copy a name that must outlive 8 later calls), and
 * tu_tmpdir_remove() deletes the folder and everything in it. */
const char *tu_tmpdir(const char *name);
const char *tu_path(const char *file);
void tu_tmpdir_remove(void);

/* ---- status checks and the tally ----------------------------------------- */
/* Records one check: prints "FAIL <message>" when !ok. Returns ok. */
int tu_expect(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Expects st == TS_OK; otherwise prints the call and ts_last_error(). */
int tu_expect_ok(ts_status st, const char *what);
/* Expects a failure with this status whose message contains every
 * NULL-terminated substring given (e.g. the op name and a shape). */
int tu_expect_error(ts_status st, ts_status want, const char *what, ...);
/* Prints "<suite>: N passed, N failed" and returns the process exit code. */
int tu_finish(const char *suite);

/* Sets up threads from TERRASEG_THREADS and initializes a context for direct ts_cpu_ calls. */
void tu_init(ts_ctx *ctx);

/* The GPU tests' device: TERRASEG_TEST_DEVICE ("cuda", "cuda:N" or just N;
 * default "cuda") as a backend name in name[cap]. */
void tu_gpu_device_name(char *name, size_t cap);
/* That device's backend, checked to implement every op: 1, or 0 after a
 * failed check that says why (not a CUDA name, no visible device, an op
 * missing: calling through a NULL op would crash). */
int tu_gpu_backend(const char *name, const ts_backend **out);

#endif
