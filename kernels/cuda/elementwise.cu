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
 * shared ts_*_check functions (kernels/ops_common.c).
 *
 * Mixed precision: ReLU, add and concat also take bf16 and fp16 tensors (all
 * the tensors of a call of one dtype, which the shared checks enforce). Each
 * of them is one kernel templated on the element type: it widens every value
 * it reads to float32 (exact), does the float32 op's one operation, and
 * rounds the result once to the element type (to nearest even, CUDA's
 * __float2bfloat16_rn / __float2half_rn), an accumulating op once after its
 * add. That is kernels/cpu/half.c's definition (widen, run the float32 op,
 * round each output once), element by element. For float the widening and
 * the rounding are the identity, so the float32 results are the bits they
 * always were. ReLU and add are layout-blind (a flat index); concat's
 * per-image blocks become per-pixel blocks in the half types' NHWC layout.
 * zero, sum_squares and scale are float32 only (gradients, clipping). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_ops.cuh"

/* The grid-stride loop of every kernel here. */
#define EW_LOOP(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

/* ---- element types --------------------------------------------------------- */

/* ---- ReLU ---------------------------------------------------------------- */

/* y may be x: each element is read, then written, by the same thread. The
 * element itself is stored, not a rounded float: the same value for every
 * non-NaN input, and a NaN keeps its bits. */
template <typename T> static __global__ void relu_forward_kernel(T *y, const T *x, size_t n)
{
    EW_LOOP(i, n)
    {
        const T e = x[i];
        const float v = ts_el_ld(e);
        /* torch.relu is clamp_min(x, 0), which propagates NaN. */
        y[i] = (v > 0.0f || isnan(v)) ? e : ts_el_st<T>(0.0f);
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
#define LAUNCH(T) \
    relu_forward_kernel<T><<<ts_ops_grid(cs, n), TS_OPS_THREADS, 0, cs->stream>>>(ts_el_ptr<T>(y), ts_el_ptr<T>(x), n)
    TS_EL_DISPATCH(x->dtype, LAUNCH)
#undef LAUNCH
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* cudaSuccess when this build holds code the current device can run (a
 * cubin of its architecture, or PTX it can compile); otherwise
 * cudaErrorNoKernelImageForDevice or the like, which ts_cuda_backend turns
 * into an error before any op, instead of the first kernel launch failing. */
extern "C" cudaError_t ts_cuda_kernel_image_check(void)
{
    cudaFuncAttributes a;
    return cudaFuncGetAttributes(&a, (const void *)relu_forward_kernel<float>);
}

/* threshold_backward(grad, output, 0): output <= 0 ? 0 : grad, as a select
 * (an infinite dy at y == 0 gives 0, not NaN), added onto dx in float32 and
 * rounded once. An element the select drops keeps its bits. */
template <typename T> static __global__ void relu_backward_kernel(T *dx, const T *dy, const T *y, size_t n)
{
    EW_LOOP(i, n)
    {
        if (!(ts_el_ld(y[i]) <= 0.0f)) dx[i] = ts_el_st<T>(ts_el_ld(dx[i]) + ts_el_ld(dy[i]));
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
#define LAUNCH(T)                                                                                              \
    relu_backward_kernel<T><<<ts_ops_grid(cs, n), TS_OPS_THREADS, 0, cs->stream>>>(ts_el_ptr<T>(dx), ts_el_ptr<T>(dy), \
                                                                                   ts_el_ptr<T>(y), n)
    TS_EL_DISPATCH(y->dtype, LAUNCH)
#undef LAUNCH
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- add ----------------------------------------------------------------- */

/* y may be a or b (the residual adds in place): one thread reads both, then
 * writes. No __restrict__ anywhere here, for exactly that reason. */
template <typename T> static __global__ void add_forward_kernel(T *y, const T *a, const T *b, size_t n)
{
    EW_LOOP(i, n) y[i] = ts_el_st<T>(ts_el_ld(a[i]) + ts_el_ld(b[i]));
}

extern "C" ts_status ts_cuda_add_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    (void)ctx;
    ts_status st = ts_add_forward_check(y, a, b);
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("add_forward", &cs)) != TS_OK) return st;
    const size_t n = ts_tensor_numel(a);
#define LAUNCH(T)                                                                                          \
    add_forward_kernel<T><<<ts_ops_grid(cs, n), TS_OPS_THREADS, 0, cs->stream>>>(ts_el_ptr<T>(y), ts_el_ptr<T>(a), \
                                                                                 ts_el_ptr<T>(b), n)
    TS_EL_DISPATCH(a->dtype, LAUNCH)
#undef LAUNCH
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* da == db (y = a + a) adds dy twice. The CPU's float32 loop adds it twice
 * in order, and its half path does the same on one widened copy before one
 * rounding, so `same` makes it (da + g) + g in float32, stored once. For
 * float that is the bits of two in-place adds, as before. */
template <typename T> static __global__ void add_backward_kernel(T *da, T *db, const T *dy, size_t n, int same)
{
    EW_LOOP(i, n)
    {
        const float g = ts_el_ld(dy[i]);
        if (same) {
            da[i] = ts_el_st<T>((ts_el_ld(da[i]) + g) + g);
        } else {
            da[i] = ts_el_st<T>(ts_el_ld(da[i]) + g);
            db[i] = ts_el_st<T>(ts_el_ld(db[i]) + g);
        }
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
    const int same = da->data == db->data;
#define LAUNCH(T)                                                                                             \
    add_backward_kernel<T><<<ts_ops_grid(cs, n), TS_OPS_THREADS, 0, cs->stream>>>(ts_el_ptr<T>(da), ts_el_ptr<T>(db), \
                                                                                  ts_el_ptr<T>(dy), n, same)
    TS_EL_DISPATCH(dy->dtype, LAUNCH)
#undef LAUNCH
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- concat along channels ------------------------------------------------ */

/* torch.cat([a, b], dim=1) is, in both layouts, y made of blocks of na
 * elements of a then nb of b: per image in float32 NCHW (na = Ca*H*W), per
 * pixel in the half types' NHWC (na = Ca, y[p, 0:Ca] = a[p, :], y[p, Ca:] =
 * b[p, :] for pixel p = (n*H + h)*W + w). One kernel serves both. One thread
 * per element of y, so every write is coalesced (and the reads nearly so).
 * Values are copied, not rounded: a NaN keeps its bits. */
template <typename T>
static __global__ void concat_forward_kernel(T *y, const T *a, const T *b, size_t na, size_t nb, size_t total)
{
    const size_t per = na + nb;
    EW_LOOP(i, total)
    {
        size_t n = i / per, r = i % per;
        y[i] = r < na ? a[n * na + r] : b[n * nb + (r - na)];
    }
}

/* The block sizes of concat for a, b in their layout (see above). */
static void concat_blocks(const ts_tensor *a, const ts_tensor *b, size_t *na, size_t *nb)
{
    if (a->dtype == TS_F32) {
        *na = (size_t)a->c * a->h * a->w;
        *nb = (size_t)b->c * b->h * b->w;
    } else {
        *na = (size_t)a->c;
        *nb = (size_t)b->c;
    }
}

extern "C" ts_status ts_cuda_concat_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    (void)ctx;
    ts_status st = ts_concat_check("concat_forward", "y", y, "a", a, "b", b);
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("concat_forward", &cs)) != TS_OK) return st;
    size_t na, nb;
    concat_blocks(a, b, &na, &nb);
    const size_t total = ts_tensor_numel(y);
#define LAUNCH(T)                                                                                                 \
    concat_forward_kernel<T><<<ts_ops_grid(cs, total), TS_OPS_THREADS, 0, cs->stream>>>(ts_el_ptr<T>(y), ts_el_ptr<T>(a), \
                                                                                        ts_el_ptr<T>(b), na, nb, total)
    TS_EL_DISPATCH(y->dtype, LAUNCH)
#undef LAUNCH
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* The split back: each dy element goes to exactly one of da, db, by the same
 * index arithmetic as forward, added in float32 and rounded once. */
template <typename T>
static __global__ void concat_backward_kernel(T *da, T *db, const T *dy, size_t na, size_t nb, size_t total)
{
    const size_t per = na + nb;
    EW_LOOP(i, total)
    {
        size_t n = i / per, r = i % per;
        const float g = ts_el_ld(dy[i]);
        if (r < na) {
            T *p = da + n * na + r;
            *p = ts_el_st<T>(ts_el_ld(*p) + g);
        } else {
            T *p = db + n * nb + (r - na);
            *p = ts_el_st<T>(ts_el_ld(*p) + g);
        }
    }
}

extern "C" ts_status ts_cuda_concat_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy)
{
    (void)ctx;
    ts_status st = ts_concat_check("concat_backward", "dy", dy, "da", da, "db", db);
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("concat_backward", &cs)) != TS_OK) return st;
    size_t na, nb;
    concat_blocks(da, db, &na, &nb);
    const size_t total = ts_tensor_numel(dy);
#define LAUNCH(T)                                                                         \
    concat_backward_kernel<T><<<ts_ops_grid(cs, total), TS_OPS_THREADS, 0, cs->stream>>>( \
        ts_el_ptr<T>(da), ts_el_ptr<T>(db), ts_el_ptr<T>(dy), na, nb, total)
    TS_EL_DISPATCH(dy->dtype, LAUNCH)
#undef LAUNCH
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
 * bits, from one device to another): a tensor of n floats gets
 * B = min(ceil(n / threads), SUMSQ_BLOCKS) blocks, thread t of those B x
 * threads adding x[t], x[t + G], x[t + 2G], ... (G = B x threads) in that
 * order, then each block's fixed tree, then one fixed tree over the tensor's
 * B block partials. No atomics. 1024 x 256 threads keep an H100 busy.
 *
 * Gradient clipping asks for one sum per parameter tensor (140 for the U-Net),
 * so the kernels take a batch of tensors per launch, as PyTorch's
 * multi_tensor_apply does: the tensors' pointers, sizes and first blocks
 * travel in the launch's parameters, tensor j owning blocks
 * [first[j], first[j + 1]) of the grid. Each block runs exactly what it would
 * run in a launch of that one tensor, so batching does not change a bit, and
 * sum_squares is the batch of one. */
#define SUMSQ_BLOCKS 1024
#define SUMSQ_BATCH 128 /* tensors per launch: the arguments fit the classic 4 KB of kernel parameters */

struct sumsq_batch {
    const float *x[SUMSQ_BATCH];
    size_t n[SUMSQ_BATCH];
    unsigned first[SUMSQ_BATCH + 1]; /* first[count]: the launch's grid */
    int count;
};
static_assert(sizeof(sumsq_batch) <= 4096, "sumsq_batch must fit the 4 KB kernel parameter space");

static size_t sumsq_blocks(size_t n)
{
    size_t b = (n + TS_OPS_THREADS - 1) / TS_OPS_THREADS;
    return b > SUMSQ_BLOCKS ? SUMSQ_BLOCKS : b;
}

/* part[b] = the sum of block b of the grid (b - first[j] of tensor j's). */
static __global__ void sumsq_kernel(double *part, const sumsq_batch a)
{
    __shared__ double red[TS_OPS_THREADS];
    /* The tensor owning this block: the last j with first[j] <= blockIdx.x
     * (the empty tensors own no block and are never found). */
    int lo = 0, hi = a.count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (a.first[mid] <= blockIdx.x) lo = mid;
        else hi = mid - 1;
    }
    const float *x = a.x[lo];
    const size_t n = a.n[lo], nb = a.first[lo + 1] - a.first[lo], G = nb * TS_OPS_THREADS;
    double s = 0;
    /* (double)x * x is exact (24-bit mantissas, 48-bit product), so whether
     * nvcc fuses the multiply into the add does not change a bit. */
    for (size_t i = (size_t)(blockIdx.x - a.first[lo]) * TS_OPS_THREADS + threadIdx.x; i < n; i += G)
        s += (double)x[i] * (double)x[i];
    s = ts_block_sum(s, red);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

/* out[j] = the fixed tree over tensor j's block partials: block j, thread t
 * adding partials t, t + threads, ... in order (ts_reduce_partials_kernel's
 * order, per tensor). */
static __global__ void sumsq_reduce_kernel(const double *part, double *out, const sumsq_batch a)
{
    __shared__ double red[TS_OPS_THREADS];
    const unsigned j = blockIdx.x, b0 = a.first[j], nb = a.first[j + 1] - b0;
    double acc = 0;
    for (unsigned b = threadIdx.x; b < nb; b += TS_OPS_THREADS) acc += part[b0 + b];
    acc = ts_block_sum(acc, red);
    if (threadIdx.x == 0) out[j] = acc;
}

/* sumsq[i] for the count tensors, SUMSQ_BATCH consecutive ones per launch
 * pair (the empty ones own no block but keep their slot): all the launches
 * queued, then one copy and one synchronization. The results sit in [0,
 * count) of the scratch, cleared to 0 first (the result of an empty tensor
 * and of an all-empty batch, which launches nothing); the block partials
 * after them, one region that every batch reuses, since the stream runs a
 * batch's reduction before the next batch's partial sums. */
static ts_status sum_squares_batched(const char *op, double *sumsq, const float *const *x, const size_t *n, int count)
{
    static ts_ops_scratch scratch;
    ts_cuda_state *cs;
    ts_status st = ts_ops_state_host(op, &cs);
    if (st != TS_OK) return st;
    size_t most = 0; /* the largest batch's blocks */
    for (int i0 = 0; i0 < count; i0 += SUMSQ_BATCH) {
        size_t blocks = 0;
        for (int i = i0; i < count && i < i0 + SUMSQ_BATCH; i++) blocks += sumsq_blocks(n[i]);
        if (blocks > most) most = blocks;
    }
    void *buf = NULL;
    if ((st = ts_ops_scratch_get(&scratch, ((size_t)count + most) * sizeof(double), &buf)) != TS_OK) return st;
    double *out = (double *)buf, *part = out + count;
    TS_CUDA_CHECK(cudaMemsetAsync(out, 0, (size_t)count * sizeof(double), cs->stream));
    for (int i0 = 0; i0 < count; i0 += SUMSQ_BATCH) {
        sumsq_batch a = {};
        unsigned blocks = 0;
        for (int i = i0; i < count && a.count < SUMSQ_BATCH; i++, a.count++) {
            a.x[a.count] = x[i];
            a.n[a.count] = n[i];
            a.first[a.count] = blocks;
            blocks += (unsigned)sumsq_blocks(n[i]);
        }
        a.first[a.count] = blocks;
        if (blocks == 0) continue;
        sumsq_kernel<<<blocks, TS_OPS_THREADS, 0, cs->stream>>>(part, a);
        TS_CUDA_LAUNCH_CHECK();
        sumsq_reduce_kernel<<<(unsigned)a.count, TS_OPS_THREADS, 0, cs->stream>>>(part, out + i0, a);
        TS_CUDA_LAUNCH_CHECK();
    }
    TS_CUDA_CHECK(cudaMemcpyAsync(sumsq, out, (size_t)count * sizeof(double), cudaMemcpyDeviceToHost, cs->stream));
    TS_CUDA_CHECK(cudaStreamSynchronize(cs->stream));
    return TS_OK;
}

extern "C" ts_status ts_cuda_sum_squares(ts_ctx *ctx, double *sumsq, const float *x, size_t n)
{
    (void)ctx;
    ts_status st = ts_sum_squares_check(sumsq, x, n); /* sets *sumsq = 0 */
    if (st != TS_OK || n == 0) return st;
    return sum_squares_batched("sum_squares", sumsq, &x, &n, 1);
}

extern "C" ts_status ts_cuda_sum_squares_multi(ts_ctx *ctx, double *sumsq, const float *const *x, const size_t *n,
                                               int count)
{
    (void)ctx;
    ts_status st = ts_sum_squares_multi_check(sumsq, x, n, count); /* sets every sumsq[i] = 0 */
    if (st != TS_OK || count == 0) return st;
    return sum_squares_batched("sum_squares_multi", sumsq, x, n, count);
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
