/* Elementwise ops on the CPU: ReLU, add, channel concat and zero, each
 * forward next to its backward, and the two vector ops of gradient clipping
 * (sum of squares, scale).
 *
 * These loops are memory-bound, so they only go parallel above a size where
 * waking the OpenMP team costs less than it saves; small tensors (the deep
 * decoder stages, the tests) stay on the calling thread. Every element is
 * written by exactly one iteration, so the split never changes a result. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

/* About 256 KiB of floats: below this one core streams the data faster than
 * a parallel region starts. */
#define EW_PARALLEL_MIN ((ptrdiff_t)1 << 16)

/* The argument checks are the backends' shared ts_*_check functions
 * (kernels/ops_common.c). */

/* ---- ReLU ---------------------------------------------------------------- */

ts_status ts_cpu_relu_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    TS_CPU_HALF_DISPATCH(x, ts_cpu_half_relu_forward(ctx, y, x));
    (void)ctx;
    ts_status st = ts_same_shape_check("relu_forward", "y", y, "x", x);
    if (st != TS_OK) return st;
    const ptrdiff_t n = (ptrdiff_t)ts_tensor_numel(x);
    const float *xd = x->data;
    float *yd = y->data; /* may equal xd: each element reads then writes itself */
#pragma omp parallel for schedule(static) if (n >= EW_PARALLEL_MIN)
    for (ptrdiff_t i = 0; i < n; i++) {
        float v = xd[i];
        /* torch.relu is clamp_min(x, 0), which propagates NaN. */
        yd[i] = (v > 0.0f || isnan(v)) ? v : 0.0f;
    }
    return TS_OK;
}

ts_status ts_cpu_relu_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *y)
{
    TS_CPU_HALF_DISPATCH(dy, ts_cpu_half_relu_backward(ctx, dx, dy, y));
    (void)ctx;
    ts_status st = ts_relu_backward_check(dx, dy, y);
    if (st != TS_OK) return st;
    const ptrdiff_t n = (ptrdiff_t)ts_tensor_numel(y);
    const float *gd = dy->data, *yd = y->data;
    float *dd = dx->data;
#pragma omp parallel for schedule(static) if (n >= EW_PARALLEL_MIN)
    for (ptrdiff_t i = 0; i < n; i++) {
        /* threshold_backward(grad, output, 0): output <= 0 ? 0 : grad. A
         * select, not dy * (y > 0), so an infinite dy at y == 0 gives 0. */
        if (!(yd[i] <= 0.0f)) dd[i] += gd[i];
    }
    return TS_OK;
}

/* ---- add ----------------------------------------------------------------- */

ts_status ts_cpu_add_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    TS_CPU_HALF_DISPATCH(a, ts_cpu_half_add_forward(ctx, y, a, b));
    (void)ctx;
    ts_status st = ts_add_forward_check(y, a, b);
    if (st != TS_OK) return st;
    const ptrdiff_t n = (ptrdiff_t)ts_tensor_numel(a);
    const float *ad = a->data, *bd = b->data;
    float *yd = y->data; /* may equal ad or bd (the residual adds in place) */
#pragma omp parallel for schedule(static) if (n >= EW_PARALLEL_MIN)
    for (ptrdiff_t i = 0; i < n; i++) yd[i] = ad[i] + bd[i];
    return TS_OK;
}

ts_status ts_cpu_add_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy)
{
    TS_CPU_HALF_DISPATCH(dy, ts_cpu_half_add_backward(ctx, da, db, dy));
    (void)ctx;
    ts_status st = ts_add_backward_check(da, db, dy);
    if (st != TS_OK) return st;
    const ptrdiff_t n = (ptrdiff_t)ts_tensor_numel(dy);
    const float *gd = dy->data;
    float *pa = da->data, *pb = db->data;
    /* da == db (y = a + a) is fine: the same iteration adds dy twice. */
#pragma omp parallel for schedule(static) if (n >= EW_PARALLEL_MIN)
    for (ptrdiff_t i = 0; i < n; i++) {
        float g = gd[i];
        pa[i] += g;
        pb[i] += g;
    }
    return TS_OK;
}

/* ---- concat along channels ------------------------------------------------ */

ts_status ts_cpu_concat_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    TS_CPU_HALF_DISPATCH(a, ts_cpu_half_concat_forward(ctx, y, a, b));
    (void)ctx;
    ts_status st = ts_concat_check("concat_forward", "y", y, "a", a, "b", b);
    if (st != TS_OK) return st;
    const size_t na = (size_t)a->c * a->h * a->w, nb = (size_t)b->c * b->h * b->w;
    const int N = y->n;
    /* torch.cat([a, b], dim=1): per image, a's channels then b's. */
#pragma omp parallel for schedule(static) if ((ptrdiff_t)(N * (na + nb)) >= EW_PARALLEL_MIN)
    for (int n = 0; n < N; n++) {
        float *yp = y->data + (size_t)n * (na + nb);
        memcpy(yp, a->data + (size_t)n * na, na * sizeof(float));
        memcpy(yp + na, b->data + (size_t)n * nb, nb * sizeof(float));
    }
    return TS_OK;
}

ts_status ts_cpu_concat_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy)
{
    TS_CPU_HALF_DISPATCH(dy, ts_cpu_half_concat_backward(ctx, da, db, dy));
    (void)ctx;
    ts_status st = ts_concat_check("concat_backward", "dy", dy, "da", da, "db", db);
    if (st != TS_OK) return st;
    const size_t na = (size_t)da->c * da->h * da->w, nb = (size_t)db->c * db->h * db->w;
    const size_t per = na + nb;
    const int N = dy->n;
    const float *gd = dy->data;
    float *pa = da->data, *pb = db->data;
    /* Every thread walks the images; the work-sharing loops inside split each
     * image's two halves, so N == 1 still uses all threads. Each dy element
     * goes to exactly one of da, db, so nowait is safe. */
#pragma omp parallel if ((ptrdiff_t)((size_t)N * per) >= EW_PARALLEL_MIN)
    for (int n = 0; n < N; n++) {
        const float *g = gd + (size_t)n * per;
        float *a = pa + (size_t)n * na, *b = pb + (size_t)n * nb;
#pragma omp for schedule(static) nowait
        for (ptrdiff_t r = 0; r < (ptrdiff_t)na; r++) a[r] += g[r];
#pragma omp for schedule(static) nowait
        for (ptrdiff_t r = 0; r < (ptrdiff_t)nb; r++) b[r] += g[na + r];
    }
    return TS_OK;
}

/* ---- zero ---------------------------------------------------------------- */

ts_status ts_cpu_zero(ts_ctx *ctx, float *p, size_t n)
{
    (void)ctx;
    ts_status st = ts_float_buffer_check("zero", p, n);
    if (st != TS_OK || n == 0) return st;
    /* All-zero bytes are +0.0f in IEEE 754. */
    memset(p, 0, n * sizeof(float));
    return TS_OK;
}

/* ---- sum of squares and scale (gradient clipping) ------------------------- */

/* Floats per block of the sum of squares: each block's partial sum is formed
 * serially, then the partials are added in block order, so the result does
 * not depend on the thread count. */
#define SUMSQ_BLOCK ((size_t)1 << 14)

static double sumsq_block(const float *x, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

ts_status ts_cpu_sum_squares(ts_ctx *ctx, double *sumsq, const float *x, size_t n)
{
    (void)ctx;
    ts_status st = ts_sum_squares_check(sumsq, x, n); /* sets *sumsq = 0 */
    if (st != TS_OK || n == 0) return st;
    const size_t nb = (n + SUMSQ_BLOCK - 1) / SUMSQ_BLOCK;
    if (nb == 1 || (ptrdiff_t)n < EW_PARALLEL_MIN) {
        double s = 0;
        for (size_t b = 0; b < nb; b++) {
            size_t i0 = b * SUMSQ_BLOCK, len = n - i0 < SUMSQ_BLOCK ? n - i0 : SUMSQ_BLOCK;
            s += sumsq_block(x + i0, len);
        }
        *sumsq = s;
        return TS_OK;
    }
    double *part = malloc(nb * sizeof(double));
    if (!part) return ts_error(TS_ERR_NOMEM, "sum_squares: no memory for %zu partial sums", nb);
#pragma omp parallel for schedule(static)
    for (size_t b = 0; b < nb; b++) {
        size_t i0 = b * SUMSQ_BLOCK, len = n - i0 < SUMSQ_BLOCK ? n - i0 : SUMSQ_BLOCK;
        part[b] = sumsq_block(x + i0, len);
    }
    double s = 0;
    for (size_t b = 0; b < nb; b++) s += part[b];
    free(part);
    *sumsq = s;
    return TS_OK;
}

ts_status ts_cpu_sum_squares_multi(ts_ctx *ctx, double *sumsq, const float *const *x, const size_t *n, int count)
{
    ts_status st = ts_sum_squares_multi_check(sumsq, x, n, count);
    for (int i = 0; i < count && st == TS_OK; i++) st = ts_cpu_sum_squares(ctx, &sumsq[i], x[i], n[i]);
    return st;
}

ts_status ts_cpu_scale(ts_ctx *ctx, float *x, size_t n, float a)
{
    (void)ctx;
    ts_status st = ts_float_buffer_check("scale", x, n);
    if (st != TS_OK || n == 0) return st;
#pragma omp parallel for schedule(static) if ((ptrdiff_t)n >= EW_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) x[i] *= a;
    return TS_OK;
}
