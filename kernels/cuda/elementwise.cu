/* Elementwise ops on the GPU, twins of kernels/cpu/elementwise.c: ReLU, add,
 * channel concat and zero, each forward next to its backward, and the two
 * vector ops of gradient clipping (sum of squares, scale).
 *
 * Every op but sum_squares writes each element from exactly one thread with
 * the CPU's one float operation (a compare, an add, a multiply: nothing that
 * nvcc could contract into an FMA), so results equal the CPU's bit for bit
 * and do not depend on the grid. sum_squares reduces in double over a grid
 * fixed by n alone, so it is deterministic on any GPU, but its order is not
 * the CPU's (see there). The argument checks are the CPU's: the backends'
 * shared ts_*_check functions (kernels/ops_common.c). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define TS_OPS_WANT_REDUCE
#include "cuda_ops.cuh"

/* The grid-stride loop of every kernel here. */
#define EW_LOOP(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

/* ---- ReLU ---------------------------------------------------------------- */

/* y may be x: each element is read, then written, by the same thread. */
static __global__ void relu_forward_kernel(float *y, const float *x, size_t n)
{
    EW_LOOP(i, n)
    {
        float v = x[i];
        /* torch.relu is clamp_min(x, 0), which propagates NaN. */
        y[i] = (v > 0.0f || isnan(v)) ? v : 0.0f;
    }
}

extern "C" ts_status ts_cuda_relu_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    (void)ctx;
    ts_status st = ts_same_shape_check("relu_forward", "y", y, "x", x);
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("relu_forward", &cs)) != TS_OK) return st;
    const size_t n = ts_tensor_numel(x);
    relu_forward_kernel<<<ts_ops_grid(cs, n), TS_OPS_THREADS, 0, cs->stream>>>(y->data, x->data, n);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* threshold_backward(grad, output, 0): output <= 0 ? 0 : grad, as a select
 * (an infinite dy at y == 0 gives 0, not NaN), added onto dx. */
static __global__ void relu_backward_kernel(float *dx, const float *dy, const float *y, size_t n)
{
    EW_LOOP(i, n)
    {
        if (!(y[i] <= 0.0f)) dx[i] += dy[i];
    }
}

extern "C" ts_status ts_cuda_relu_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *y)
{
    (void)ctx;
    ts_status st = ts_relu_backward_check(dx, dy, y);
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("relu_backward", &cs)) != TS_OK) return st;
    const size_t n = ts_tensor_numel(y);
    relu_backward_kernel<<<ts_ops_grid(cs, n), TS_OPS_THREADS, 0, cs->stream>>>(dx->data, dy->data, y->data, n);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- add ----------------------------------------------------------------- */

/* y may be a or b (the residual adds in place): one thread reads both, then
 * writes. No __restrict__ anywhere here, for exactly that reason. */
static __global__ void add_forward_kernel(float *y, const float *a, const float *b, size_t n)
{
    EW_LOOP(i, n) y[i] = a[i] + b[i];
}

extern "C" ts_status ts_cuda_add_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    (void)ctx;
    ts_status st = ts_add_forward_check(y, a, b);
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("add_forward", &cs)) != TS_OK) return st;
    const size_t n = ts_tensor_numel(a);
    add_forward_kernel<<<ts_ops_grid(cs, n), TS_OPS_THREADS, 0, cs->stream>>>(y->data, a->data, b->data, n);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* da == db (y = a + a) is fine: the same thread adds dy twice, in order, as
 * the CPU's one iteration does. */
static __global__ void add_backward_kernel(float *da, float *db, const float *dy, size_t n)
{
    EW_LOOP(i, n)
    {
        float g = dy[i];
        da[i] += g;
        db[i] += g;
    }
}

extern "C" ts_status ts_cuda_add_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy)
{
    (void)ctx;
    ts_status st = ts_add_backward_check(da, db, dy);
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("add_backward", &cs)) != TS_OK) return st;
    const size_t n = ts_tensor_numel(dy);
    add_backward_kernel<<<ts_ops_grid(cs, n), TS_OPS_THREADS, 0, cs->stream>>>(da->data, db->data, dy->data, n);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- concat along channels ------------------------------------------------ */

/* torch.cat([a, b], dim=1): per image, a's na floats then b's nb floats. One
 * thread per element of y, so every read and write is coalesced. */
static __global__ void concat_forward_kernel(float *y, const float *a, const float *b, size_t na, size_t nb,
                                             size_t total)
{
    const size_t per = na + nb;
    EW_LOOP(i, total)
    {
        size_t n = i / per, r = i % per;
        y[i] = r < na ? a[n * na + r] : b[n * nb + (r - na)];
    }
}

extern "C" ts_status ts_cuda_concat_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    (void)ctx;
    ts_status st = ts_concat_check("concat_forward", "y", y, "a", a, "b", b);
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("concat_forward", &cs)) != TS_OK) return st;
    const size_t na = (size_t)a->c * a->h * a->w, nb = (size_t)b->c * b->h * b->w;
    const size_t total = (size_t)y->n * (na + nb);
    concat_forward_kernel<<<ts_ops_grid(cs, total), TS_OPS_THREADS, 0, cs->stream>>>(y->data, a->data, b->data, na,
                                                                                      nb, total);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* The split back: each dy element goes to exactly one of da, db, by the same
 * index arithmetic as forward. */
static __global__ void concat_backward_kernel(float *da, float *db, const float *dy, size_t na, size_t nb, size_t total)
{
    const size_t per = na + nb;
    EW_LOOP(i, total)
    {
        size_t n = i / per, r = i % per;
        float g = dy[i];
        if (r < na)
            da[n * na + r] += g;
        else
            db[n * nb + (r - na)] += g;
    }
}

extern "C" ts_status ts_cuda_concat_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy)
{
    (void)ctx;
    ts_status st = ts_concat_check("concat_backward", "dy", dy, "da", da, "db", db);
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("concat_backward", &cs)) != TS_OK) return st;
    const size_t na = (size_t)da->c * da->h * da->w, nb = (size_t)db->c * db->h * db->w;
    const size_t total = (size_t)dy->n * (na + nb);
    concat_backward_kernel<<<ts_ops_grid(cs, total), TS_OPS_THREADS, 0, cs->stream>>>(da->data, db->data, dy->data,
                                                                                       na, nb, total);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- zero ---------------------------------------------------------------- */

extern "C" ts_status ts_cuda_zero(ts_ctx *ctx, float *p, size_t n)
{
    (void)ctx;
    ts_status st = ts_float_buffer_check("zero", p, n);
    if (st != TS_OK || n == 0) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("zero", &cs)) != TS_OK) return st;
    /* All-zero bytes are +0.0f in IEEE 754. */
    TS_CUDA_CHECK(cudaMemsetAsync(p, 0, n * sizeof(float), cs->stream));
    return TS_OK;
}

/* ---- sum of squares and scale (gradient clipping) ------------------------- */

/* The reduction's grid is a function of n alone, never of the GPU (the
 * sm_count sizing of the other ops would change the partition, and so the
 * bits, from one device to another): at most SUMSQ_BLOCKS blocks, thread t of
 * the grid adding x[t], x[t + G], x[t + 2G], ... (G = blocks x threads) in
 * that order, then each block's fixed tree, then one fixed tree over the
 * block partials. No atomics. 1024 x 256 threads keep an H100 busy. */
#define SUMSQ_BLOCKS 1024

static __global__ void sumsq_kernel(double *part, const float *x, size_t n)
{
    __shared__ double red[TS_OPS_THREADS];
    double s = 0;
    /* (double)x * x is exact (24-bit mantissas, 48-bit product), so whether
     * nvcc fuses the multiply into the add does not change a bit. */
    EW_LOOP(i, n) s += (double)x[i] * (double)x[i];
    s = ts_block_sum(s, red);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

extern "C" ts_status ts_cuda_sum_squares(ts_ctx *ctx, double *sumsq, const float *x, size_t n)
{
    static ts_ops_scratch scratch; /* [0]: the result; [1, 1 + blocks): block partials */
    (void)ctx;
    ts_status st = ts_sum_squares_check(sumsq, x, n); /* sets *sumsq = 0 */
    if (st != TS_OK || n == 0) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("sum_squares", &cs)) != TS_OK) return st;
    size_t blocks = (n + TS_OPS_THREADS - 1) / TS_OPS_THREADS;
    if (blocks > SUMSQ_BLOCKS) blocks = SUMSQ_BLOCKS;
    void *buf = NULL;
    if ((st = ts_ops_scratch_get(&scratch, (1 + blocks) * sizeof(double), &buf)) != TS_OK) return st;
    double *out = (double *)buf, *part = out + 1;
    sumsq_kernel<<<(unsigned)blocks, TS_OPS_THREADS, 0, cs->stream>>>(part, x, n);
    TS_CUDA_LAUNCH_CHECK();
    ts_reduce_partials_kernel<<<1, TS_OPS_THREADS, 0, cs->stream>>>(part, out, blocks, 1);
    TS_CUDA_LAUNCH_CHECK();
    double host = 0;
    TS_CUDA_CHECK(cudaMemcpyAsync(&host, out, sizeof host, cudaMemcpyDeviceToHost, cs->stream));
    TS_CUDA_CHECK(cudaStreamSynchronize(cs->stream));
    *sumsq = host;
    return TS_OK;
}

/* x *= a in float32 (torch's Tensor.mul_ with a float scalar): one rounded
 * multiply, as the CPU. */
static __global__ void scale_kernel(float *x, size_t n, float a)
{
    EW_LOOP(i, n) x[i] *= a;
}

extern "C" ts_status ts_cuda_scale(ts_ctx *ctx, float *x, size_t n, float a)
{
    (void)ctx;
    ts_status st = ts_float_buffer_check("scale", x, n);
    if (st != TS_OK || n == 0) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("scale", &cs)) != TS_OK) return st;
    scale_kernel<<<ts_ops_grid(cs, n), TS_OPS_THREADS, 0, cs->stream>>>(x, n, a);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}
