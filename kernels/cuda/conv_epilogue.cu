/* The pieces of the conv ops that cuDNN does not do the CPU's way:
 *
 * - The forward epilogue of the two-pass path, y = y + bias + add (then
 *   max(., 0) with the fused ReLU; add is the fused residual of
 *   ts_conv2d_params, or NULL), as a pass after cudnnConvolutionForward. A
 *   forward with a bias AND the ReLU (inference's conv + folded BN + ReLU,
 *   with or without the block's shortcut add) runs as one
 *   cudnnConvolutionBiasActivationForward instead (kernels/cuda/conv.c);
 *   this pass serves the rest: a bias without ReLU (cuDNN's fused call takes
 *   its IDENTITY activation with one algorithm only), a ReLU without bias
 *   (the fused call always adds one), and plans the fused call does not
 *   support. It computes exactly the CPU's float expression, in the CPU's
 *   order: (y + bias) + add, then the ReLU.
 * - For the fused half call, the float32 bias rounded to y's half type
 *   (cuDNN's half configurations take the bias in y's type).
 * - The bias gradient, summed in double in a fixed order as the CPU does
 *   (cudnnConvolutionBackwardBias accumulates in float and promises no order).
 *
 * They come in two layouts: float32 NCHW and half (bf16, fp16) NHWC, the
 * layouts of kernels/tensor.h. A half element is widened to float32 (exact),
 * the arithmetic is the float path's, and an output is rounded once to the
 * half type (round to nearest even, __float2bfloat16_rn / __float2half_rn).
 * A half forward adds the bias rounded to the half type and widened (as
 * autocast casts a conv's bias; the CPU reference and the fused call do the
 * same). One caveat of the two-pass half forward: cuDNN has already rounded
 * the convolution to the half type, so with a bias or an add y is rounded
 * twice where the CPU reference (float conv + half bias + widened add, one
 * rounding) and the fused call round once; convolutions are compared with a
 * tolerance anyway. Without a bias or an add the ReLU is exact.
 *
 * Reduction layout, NCHW. The sum for channel c runs over N planes of
 * `plane` contiguous floats, count = N * plane values. It is cut into S
 * slices of consecutive values (S from the shape alone, never from the
 * device, so a given shape sums in the same order on any GPU); block (c, s)
 * adds its slice in double, each thread a fixed strided subset and then a
 * fixed tree, and a second tiny kernel adds the S partial sums of each
 * channel in order. The slices keep the GPU busy when there are few channels
 * (the segmentation head's bias has one per class over full-resolution
 * planes).
 *
 * Reduction layout, NHWC. Channel c is every C-th element, so a block per
 * channel would read with a stride of C; instead a block is (cw, rows)
 * threads, threadIdx.x a channel of a chunk of cw channels and threadIdx.y a
 * pixel row, so a warp reads consecutive memory: cw = C when C <= 32 (a warp
 * spans whole consecutive rows), else 32 (64 contiguous bytes of one row).
 * The P = N * H * W rows are cut into S slices (S from (P, C) alone, again);
 * block (chunk, s) adds, per channel, rows ty, ty + rows, ... of its slice
 * in double, then a fixed tree over the row lanes, and the same finalize
 * kernel adds the S partials of each channel in order. */

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <limits.h>

#include "conv_epilogue.h"
#include "cuda_internal.h"
#include "cuda_ops.cuh"

#define RED_THREADS 256
#define RED_MAX_SLICES 64
#define RED_SLICE_TARGET 8192 /* values per slice we aim for before adding slices */

/* A fixed-order sum of one double per thread of a RED_THREADS block; every
 * thread gets the total. */
__device__ static double block_sum(double v)
{
    __shared__ double buf[RED_THREADS];
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = RED_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    const double total = buf[0];
    __syncthreads(); /* buf may be reused by a later call */
    return total;
}

/* How many slices a reduction over `count` values is cut into: about
 * `per_slice` values each, between 1 and max. A function of the shape only,
 * so a shape sums in the same order on any GPU. */
static size_t slice_count(size_t count, size_t per_slice, size_t max)
{
    size_t S = (count + per_slice - 1) / per_slice;
    if (S > max) S = max;
    return S < 1 ? 1 : S;
}

/* ---- forward epilogue ---------------------------------------------------------- */

/* One block row per (n, c) plane (blockIdx.x), blockIdx.y strides the plane. */
__global__ static void epilogue_kernel(float *y, const float *bias, const float *add, int C, size_t plane, int relu)
{
    const size_t p = blockIdx.x;
    const float b = bias ? bias[p % (size_t)C] : 0.0f;
    float *yp = y + p * plane;
    const float *zp = add ? add + p * plane : NULL;
    const size_t step = (size_t)gridDim.y * blockDim.x;
    for (size_t i = (size_t)blockIdx.y * blockDim.x + threadIdx.x; i < plane; i += step) {
        /* __fadd_rn: exactly the CPU's v = y + b, then v += z, whatever nvcc
         * would fuse. */
        float v = __fadd_rn(yp[i], b);
        if (zp) v = __fadd_rn(v, zp[i]);
        yp[i] = relu ? (v > 0.0f ? v : 0.0f) : v;
    }
}

extern "C" ts_status ts_cuda_conv_epilogue(float *y, const float *bias, const float *add, int n, int c, size_t plane,
                                           int relu)
{
    if (!bias && !relu && !add) return TS_OK;
    const size_t planes = (size_t)n * (size_t)c;
    if (n < 1 || c < 1 || plane < 1 || planes > INT_MAX)
        return ts_error(TS_ERR_INVALID_ARG, "conv2d_forward epilogue: bad shape n %d, c %d, plane %zu", n, c, plane);
    /* Small planes (deep layers at low resolution) get a block just wide
     * enough, so most threads are not idle. */
    const unsigned threads = plane >= 256 ? 256u : (unsigned)((plane + 31) / 32 * 32);
    size_t gy = (plane + (size_t)threads * 4 - 1) / ((size_t)threads * 4);
    if (gy > 65535) gy = 65535;
    dim3 grid((unsigned)planes, (unsigned)gy);
    epilogue_kernel<<<grid, threads, 0, ts_cuda_state_get()->stream>>>(y, bias, add, c, plane, relu);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- bias gradient ---------------------------------------------------------------- */

/* Device scratch for the partial sums: the ops' grow-only buffer
 * (cuda_ops.cuh), which refuses to grow while a graph is recorded and marks
 * recordings made before stale when it does. */
static ts_status part_buffer(size_t bytes, double **out)
{
    static ts_ops_scratch scratch;
    void *p = NULL;
    ts_status st = ts_ops_scratch_get(&scratch, bytes, &p);
    *out = (double *)p;
    return st;
}

/* Block (c, s): the double sum of slice s of channel c. Thread t adds values
 * j0 + t, j0 + t + RED_THREADS, ... in that order; (n, i) follow j without a
 * division per value. */
__global__ static void bias_grad_partial(const float *dy, int C, size_t plane, size_t count, size_t len, double *part)
{
    const int c = blockIdx.x, s = blockIdx.y, S = gridDim.y;
    const size_t j0 = (size_t)s * len;
    const size_t j1 = j0 + len < count ? j0 + len : count;
    double acc = 0.0;
    size_t j = j0 + threadIdx.x;
    if (j < j1) {
        size_t n = j / plane, i = j - n * plane;
        for (; j < j1; j += RED_THREADS) {
            acc += (double)dy[(n * (size_t)C + (size_t)c) * plane + i];
            i += RED_THREADS;
            if (i >= plane) {
                n += i / plane;
                i %= plane;
            }
        }
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) part[(size_t)c * S + s] = acc;
}

/* One thread per channel: the S partials in slice order, then one float add
 * into the caller's gradient (the CPU's dbias[c] += (float)s). */
__global__ static void bias_grad_finalize(float *dbias, int C, int S, const double *part)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double sum = 0.0;
    for (int s = 0; s < S; s++) sum += part[(size_t)c * S + s];
    dbias[c] = __fadd_rn(dbias[c], (float)sum);
}

extern "C" ts_status ts_cuda_conv_bias_grad(float *dbias, const float *dy, int n, int c, size_t plane)
{
    if (n < 1 || c < 1 || plane < 1)
        return ts_error(TS_ERR_INVALID_ARG, "conv2d_backward_bias: bad shape n %d, c %d, plane %zu", n, c, plane);
    const size_t count = (size_t)n * plane;
    const size_t S = slice_count(count, RED_SLICE_TARGET, RED_MAX_SLICES);
    const size_t len = (count + S - 1) / S;
    double *part = NULL;
    ts_status st = part_buffer((size_t)c * S * sizeof(double), &part);
    if (st != TS_OK) return st;
    cudaStream_t stream = ts_cuda_state_get()->stream;
    bias_grad_partial<<<dim3((unsigned)c, (unsigned)S), RED_THREADS, 0, stream>>>(dy, c, plane, count, len, part);
    TS_CUDA_LAUNCH_CHECK();
    bias_grad_finalize<<<(unsigned)((c + 127) / 128), 128, 0, stream>>>(dbias, c, (int)S, part);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- half precision, NHWC ------------------------------------------------------------ */

/* Widening and the one rounding of each half type, on the raw 16-bit
 * patterns the tensors hold. */
struct bf16_io {
    __device__ static float load(uint16_t v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
    __device__ static uint16_t store(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};
struct f16_io {
    __device__ static float load(uint16_t v) { return __half2float(__ushort_as_half(v)); }
    __device__ static uint16_t store(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

#define NHWC_LANES 32        /* channels per chunk once C > 32 */
#define NHWC_MAX_SLICES 256 /* partials per channel the serial finalize adds */

/* The block shape for C channels (see the top of the file): cw channel lanes
 * times `rows` row lanes, at most RED_THREADS threads; chunks of cw channels
 * cover C. */
typedef struct nhwc_block {
    unsigned cw, rows, chunks;
} nhwc_block;

static nhwc_block nhwc_block_of(int C)
{
    nhwc_block b;
    b.cw = C < NHWC_LANES ? (unsigned)C : NHWC_LANES;
    b.rows = RED_THREADS / b.cw;
    b.chunks = (unsigned)((C + (int)b.cw - 1) / (int)b.cw);
    return b;
}

/* A fixed-order sum over the row lanes (threadIdx.y) of one double per
 * thread, per channel lane; every thread of the block must call it, and the
 * total of lane threadIdx.x is returned to every thread. The tree pairs row
 * ty with ty + s for s = the powers of two below blockDim.y, so it handles
 * any row count (256 / cw need not be a power of two). */
__device__ static double column_sum(double v)
{
    __shared__ double buf[RED_THREADS];
    const unsigned cw = blockDim.x, rows = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
    buf[ty * cw + tx] = v;
    __syncthreads();
    unsigned span = 1;
    while (span < rows) span <<= 1;
    for (unsigned s = span / 2; s > 0; s >>= 1) {
        if (ty < s && ty + s < rows) buf[ty * cw + tx] += buf[(ty + s) * cw + tx];
        __syncthreads();
    }
    const double total = buf[tx];
    __syncthreads(); /* buf may be reused by a later call */
    return total;
}

/* Block (chunk, y-stride) of (cw, rows) threads: each thread owns one
 * channel and strides the rows, so the bias is loaded once per thread and no
 * element needs a division to find its channel. */
template <typename H>
__global__ static void epilogue_nhwc_kernel(uint16_t *y, const float *bias, const uint16_t *add, int C, size_t pixels,
                                            int relu)
{
    const int c = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (c >= C) return;
    /* The bias in the half type, widened: what the fused call and the CPU add. */
    const float b = bias ? H::load(H::store(bias[c])) : 0.0f;
    const size_t step = (size_t)gridDim.y * blockDim.y;
    for (size_t r = (size_t)blockIdx.y * blockDim.y + threadIdx.y; r < pixels; r += step) {
        const size_t k = r * (size_t)C + (size_t)c;
        /* The float path's expression on the widened values, rounded once. */
        float v = __fadd_rn(H::load(y[k]), b);
        if (add) v = __fadd_rn(v, H::load(add[k]));
        y[k] = H::store(relu ? (v > 0.0f ? v : 0.0f) : v);
    }
}

extern "C" ts_status ts_cuda_conv_epilogue_half(uint16_t *y, ts_dtype dtype, const float *bias, const uint16_t *add,
                                                size_t pixels, int c, int relu)
{
    if (!bias && !relu && !add) return TS_OK;
    if (pixels < 1 || c < 1 || (dtype != TS_BF16 && dtype != TS_F16))
        return ts_error(TS_ERR_INVALID_ARG, "conv2d_forward epilogue: bad half tensor: %zu pixels, c %d, dtype %s",
                        pixels, c, ts_dtype_name(dtype));
    const nhwc_block b = nhwc_block_of(c);
    size_t gy = (pixels + (size_t)b.rows * 4 - 1) / ((size_t)b.rows * 4);
    if (gy > 65535) gy = 65535;
    const dim3 grid(b.chunks, (unsigned)gy), block(b.cw, b.rows);
    cudaStream_t stream = ts_cuda_state_get()->stream;
    if (dtype == TS_BF16)
        epilogue_nhwc_kernel<bf16_io><<<grid, block, 0, stream>>>(y, bias, add, c, pixels, relu);
    else
        epilogue_nhwc_kernel<f16_io><<<grid, block, 0, stream>>>(y, bias, add, c, pixels, relu);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* out[c] = bias[c] rounded once to the half type. */
template <typename H>
__global__ static void bias_to_half_kernel(uint16_t *out, const float *bias, int C)
{
    const int c = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (c < C) out[c] = H::store(bias[c]);
}

extern "C" ts_status ts_cuda_conv_bias_to_half(uint16_t *out, ts_dtype dtype, const float *bias, int c)
{
    if (!out || !bias || c < 1 || (dtype != TS_BF16 && dtype != TS_F16))
        return ts_error(TS_ERR_INVALID_ARG, "conv2d_forward: bad half bias: %d channels, dtype %s, out %p, bias %p", c,
                        ts_dtype_name(dtype), (void *)out, (const void *)bias);
    const unsigned threads = 256;
    const unsigned blocks = (unsigned)((c + (int)threads - 1) / (int)threads);
    cudaStream_t stream = ts_cuda_state_get()->stream;
    if (dtype == TS_BF16)
        bias_to_half_kernel<bf16_io><<<blocks, threads, 0, stream>>>(out, bias, c);
    else
        bias_to_half_kernel<f16_io><<<blocks, threads, 0, stream>>>(out, bias, c);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* Block (chunk, s): per channel lane, the double sum of rows [s * len,
 * (s + 1) * len) of dy, thread (tx, ty) adding rows ty, ty + rows, ... of
 * the slice in that order, then column_sum. part is [C][S] as the NCHW
 * kernel's, so bias_grad_finalize serves both. */
template <typename H>
__global__ static void bias_grad_partial_nhwc(const uint16_t *dy, int C, size_t pixels, size_t len, double *part)
{
    const int c = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    const int s = blockIdx.y, S = gridDim.y;
    const size_t r0 = (size_t)s * len;
    const size_t r1 = r0 + len < pixels ? r0 + len : pixels;
    double acc = 0.0;
    if (c < C) {
        TS_RED_UNROLL
        for (size_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) acc += (double)H::load(dy[r * (size_t)C + c]);
    }
    acc = column_sum(acc); /* every thread, the idle lanes too: it synchronizes */
    if (threadIdx.y == 0 && c < C) part[(size_t)c * S + s] = acc;
}

extern "C" ts_status ts_cuda_conv_bias_grad_half(float *dbias, const uint16_t *dy, ts_dtype dtype, size_t pixels, int c)
{
    if (pixels < 1 || c < 1 || (dtype != TS_BF16 && dtype != TS_F16))
        return ts_error(TS_ERR_INVALID_ARG, "conv2d_backward_bias: bad half tensor: %zu pixels, c %d, dtype %s",
                        pixels, c, ts_dtype_name(dtype));
    const nhwc_block b = nhwc_block_of(c);
    /* Slices of about RED_SLICE_TARGET values per block (cw channels times
     * rows), at most NHWC_MAX_SLICES: a function of (pixels, c) only. */
    const size_t rows_target = RED_SLICE_TARGET / b.cw;
    const size_t S = slice_count(pixels, rows_target, NHWC_MAX_SLICES);
    const size_t len = (pixels + S - 1) / S;
    double *part = NULL;
    ts_status st = part_buffer((size_t)c * S * sizeof(double), &part);
    if (st != TS_OK) return st;
    cudaStream_t stream = ts_cuda_state_get()->stream;
    const dim3 grid(b.chunks, (unsigned)S), block(b.cw, b.rows);
    if (dtype == TS_BF16)
        bias_grad_partial_nhwc<bf16_io><<<grid, block, 0, stream>>>(dy, c, pixels, len, part);
    else
        bias_grad_partial_nhwc<f16_io><<<grid, block, 0, stream>>>(dy, c, pixels, len, part);
    TS_CUDA_LAUNCH_CHECK();
    bias_grad_finalize<<<(unsigned)((c + 127) / 128), 128, 0, stream>>>(dbias, c, (int)S, part);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}
