/* BatchNorm2d on the GPU: training forward, eval forward and the training
 * backward, with the arithmetic of the CPU twins in kernels/cpu/batchnorm.c
 * (PyTorch's CPU path, shared/specs/smp-unet.md section 7.3) step by step:
 * the same sums in double, the same roundings to float in the same places,
 * the same float expressions. Every float or double operation whose rounding
 * matters is written with an explicit-rounding intrinsic (__fmul_rn,
 * __fadd_rn, __dmul_rn, ...): nvcc would otherwise fuse a multiply and an add
 * into one FMA, which rounds once where the CPU rounds twice. So the results
 * differ from the CPU only where the order of a double sum does, which after
 * rounding to float is almost never.
 *
 * Reductions (the batch statistics, the backward's two sums) are
 * deterministic: channel c's N * H * W values are cut into S slices of
 * consecutive values, S from the shape alone (never from the device); block
 * (c, s) adds its slice in double, each thread a fixed strided subset and then
 * a fixed shared-memory tree; a finalize kernel adds each channel's S partial
 * sums in slice order. No atomics, so the same input gives the same bits on
 * every run, and slices keep the GPU busy for layers with few channels
 * (decoder block 4 has 16 channels at full resolution).
 *
 * Training forward: sum -> mean (float) -> sum (x - mean)^2 -> finalize
 * (invstd, saved statistics, running statistics, y = x * alpha + shift
 * coefficients) -> apply. Backward: sum dy and (x - mean) dy -> finalize
 * (dgamma, dbeta, the dx coefficients) -> apply. Eval: one apply kernel.
 *
 * Half precision (bf16, fp16; kernels/tensor.h): x, y, dy and dx are NHWC,
 * every per-channel vector and statistic stays float32. Each half element is
 * widened to float32 (exact) and goes through the float path's expressions;
 * an output is rounded once to the half type (round to nearest even), dx
 * after its float add to the widened old value. That is the CPU reference of
 * kernels/cpu/half.c, so the half results too differ from the CPU only where
 * the order of a double sum does. The finalize kernels are the float path's
 * own (they see only per-channel partials); the reductions and the
 * elementwise passes have NHWC twins at the end of the file, where a channel
 * is every C-th element: a block is (cw, rows) threads, threadIdx.x a
 * channel of a chunk of cw channels (all C when C <= 32, else 32) and
 * threadIdx.y a pixel row, so a warp reads consecutive memory instead of one
 * element every C. The N * H * W rows are cut into S slices, S from (rows,
 * C) alone; block (chunk, s) adds, per channel, rows ty, ty + rows, ... of
 * its slice in double and then a fixed tree over the row lanes, into the
 * same [C][S] partials the finalize kernels read in slice order. So the half
 * reductions are as deterministic as the float ones. */

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <limits.h>

#include "cuda_internal.h"
#include "cuda_ops.cuh"

#define RED_THREADS 256
#define RED_MAX_SLICES 64
#define RED_SLICE_TARGET 8192 /* values per slice we aim for before adding slices */

/* ---- checks ------------------------------------------------------------------------- */

/* The argument checks are the CPU's, shared: ts_batchnorm_*_check in
 * kernels/ops_common.c. This one is the GPU's own: an initialized backend,
 * its device current on this thread, and the launch limits (grid x of N*C
 * planes; every index is a size_t). */
static ts_status bn_check_launch(const char *op, const ts_tensor *x)
{
    const ts_cuda_state *s = ts_cuda_state_get();
    if (!s->initialized)
        return ts_error(TS_ERR_INVALID_ARG, "%s: the CUDA backend is not initialized; call ts_cuda_backend first", op);
    /* The current device is per host thread, and an op may run on another
     * thread than the one that chose it. */
    TS_CUDA_USE_DEVICE(s->device);
    if ((size_t)x->n * (size_t)x->c > INT_MAX) {
        char shape[TS_SHAPE_STR];
        return ts_error(TS_ERR_UNSUPPORTED, "%s: x %s has 2^31 or more (n, c) planes; use a smaller batch", op,
                        ts_shape_str(x, shape));
    }
    return TS_OK;
}

/* ---- launch geometry ---------------------------------------------------------------- */

typedef struct bn_geom {
    int N, C;
    size_t plane; /* H * W */
    size_t count; /* N * plane: values per channel */
    int S;        /* slices per channel */
    size_t len;   /* values per slice (the last may have fewer, or none) */
} bn_geom;

static bn_geom bn_geometry(const ts_tensor *x)
{
    bn_geom g;
    g.N = x->n;
    g.C = x->c;
    g.plane = (size_t)x->h * (size_t)x->w;
    g.count = (size_t)g.N * g.plane;
    size_t S = (g.count + RED_SLICE_TARGET - 1) / RED_SLICE_TARGET;
    if (S > RED_MAX_SLICES) S = RED_MAX_SLICES;
    if (S < 1) S = 1;
    g.S = (int)S;
    g.len = (g.count + S - 1) / S;
    return g;
}

/* Elementwise kernels: blockIdx.x is the (n, c) plane, blockIdx.y strides
 * the plane; small planes get a block just wide enough. */
static void apply_launch(const bn_geom *g, dim3 *grid, unsigned *threads)
{
    *threads = g->plane >= 256 ? 256u : (unsigned)((g->plane + 31) / 32 * 32);
    size_t gy = (g->plane + (size_t)*threads * 4 - 1) / ((size_t)*threads * 4);
    if (gy > 65535) gy = 65535;
    *grid = dim3((unsigned)((size_t)g->N * g->C), (unsigned)gy);
}

/* Device scratch for partial sums and per-channel coefficients: the ops'
 * grow-only buffer (cuda_ops.cuh), reused by every call (ops run in stream
 * order, so one buffer suffices). */
static ts_ops_scratch g_scratch;

/* part: 2 * C * S doubles; coef: 2 * C floats after them. */
static ts_status bn_scratch(int C, int S, double **part, float **coef)
{
    const size_t part_bytes = 2 * (size_t)C * (size_t)S * sizeof(double);
    void *p = NULL;
    ts_status st = ts_ops_scratch_get(&g_scratch, part_bytes + 2 * (size_t)C * sizeof(float), &p);
    if (st != TS_OK) return ts_error(st, "batch norm scratch: %s", ts_last_error());
    *part = (double *)p;
    *coef = (float *)((char *)p + part_bytes);
    return TS_OK;
}

/* The half-precision (NHWC) twins of the three ops, after the argument
 * checks and bn_check_launch (at the end of the file). */
static ts_status bn_forward_train_half(ts_tensor *y, float *save_mean, float *save_invstd, const ts_tensor *x,
                                       const float *gamma, const float *beta, float *running_mean,
                                       float *running_var, const ts_bn_params *p);
static ts_status bn_forward_eval_half(ts_tensor *y, const ts_tensor *x, const float *gamma, const float *beta,
                                      const float *running_mean, const float *running_var, const ts_bn_params *p);
static ts_status bn_backward_half(ts_tensor *dx, float *dgamma, float *dbeta, const ts_tensor *dy,
                                  const ts_tensor *x, const float *gamma, const float *save_mean,
                                  const float *save_invstd);

/* ---- device helpers ------------------------------------------------------------------- */

/* Fixed-order sums of two doubles per thread of a RED_THREADS block; every
 * thread gets both totals. */
__device__ static void block_sum2(double *a, double *b)
{
    __shared__ double sa[RED_THREADS], sb[RED_THREADS];
    const int t = threadIdx.x;
    sa[t] = *a;
    sb[t] = *b;
    __syncthreads();
    for (int s = RED_THREADS / 2; s > 0; s >>= 1) {
        if (t < s) {
            sa[t] += sa[t + s];
            sb[t] += sb[t + s];
        }
        __syncthreads();
    }
    *a = sa[0];
    *b = sb[0];
    __syncthreads(); /* the arrays may be reused by a later call */
}

/* Walks slice s of channel c: calls f(index) for values j0 + t, j0 + t +
 * RED_THREADS, ... (t = threadIdx.x) in that order, index being the value's
 * offset in the NCHW tensor. (n, i) follow j without a division per value. */
template <typename F>
__device__ static void for_slice(int C, size_t plane, size_t count, size_t len, F f)
{
    const size_t c = blockIdx.x, j0 = (size_t)blockIdx.y * len;
    const size_t j1 = j0 + len < count ? j0 + len : count;
    size_t j = j0 + threadIdx.x;
    if (j >= j1) return;
    size_t n = j / plane, i = j - n * plane;
    for (; j < j1; j += RED_THREADS) {
        f((n * (size_t)C + c) * plane + i);
        i += RED_THREADS;
        if (i >= plane) {
            n += i / plane;
            i %= plane;
        }
    }
}

/* The channel's sum of the S partials part[c * S .. c * S + S), in order. */
__device__ static double sum_partials(const double *part, int c, int S)
{
    double sum = 0.0;
    for (int s = 0; s < S; s++) sum += part[(size_t)c * S + s];
    return sum;
}

/* mean = (float)(sum / count): the CPU's rounding, in one place so the two
 * kernels that need it compute the same float. */
__device__ static float mean_of(double sum, size_t count) { return (float)__ddiv_rn(sum, (double)count); }

/* ---- training forward ---------------------------------------------------------------- */

/* part_sum[c * S + s] = sum of slice s of x[:, c] in double. */
__global__ static void bn_sum_kernel(const float *x, int C, size_t plane, size_t count, size_t len, double *part_sum)
{
    double acc = 0.0, unused = 0.0;
    for_slice(C, plane, count, len, [&](size_t k) { acc += (double)x[k]; });
    block_sum2(&acc, &unused);
    if (threadIdx.x == 0) part_sum[(size_t)blockIdx.x * gridDim.y + blockIdx.y] = acc;
}

/* part_var[c * S + s] = sum over slice s of d * d with d = x - mean, the
 * difference and the square in float, added in double (the CPU's
 * var_acc += d * d). */
__global__ static void bn_var_kernel(const float *x, int C, size_t plane, size_t count, size_t len,
                                     const double *part_sum, double *part_var)
{
    __shared__ float mean_s;
    if (threadIdx.x == 0) mean_s = mean_of(sum_partials(part_sum, blockIdx.x, gridDim.y), count);
    __syncthreads();
    const float mean = mean_s;
    double acc = 0.0, unused = 0.0;
    for_slice(C, plane, count, len, [&](size_t k) {
        const float d = __fsub_rn(x[k], mean);
        acc += (double)__fmul_rn(d, d);
    });
    block_sum2(&acc, &unused);
    if (threadIdx.x == 0) part_var[(size_t)blockIdx.x * gridDim.y + blockIdx.y] = acc;
}

/* One thread per channel: the statistics, the running update and the
 * coefficients of y = x * alpha + shift (coef[c] = alpha, coef[C + c] =
 * shift). Each line is the CPU's expression with its roundings. */
__global__ static void bn_train_finalize_kernel(int C, int S, size_t count, const double *part_sum,
                                                const double *part_var, const float *gamma, const float *beta,
                                                float eps, float m, float *save_mean, float *save_invstd,
                                                float *running_mean, float *running_var, float *coef)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const float mean = mean_of(sum_partials(part_sum, c, S), count);
    const float var_sum = (float)sum_partials(part_var, c, S);
    /* (float)(1.0 / sqrt((double)(var_sum / (float)count) + (double)eps)) */
    const float var_b = __fdiv_rn(var_sum, (float)count);
    const float invstd = (float)__ddiv_rn(1.0, __dsqrt_rn(__dadd_rn((double)var_b, (double)eps)));
    save_mean[c] = mean;
    save_invstd[c] = invstd;
    if (running_mean) {
        /* m * mean + (1 - m) * running_mean, in float. */
        const float one_m = __fsub_rn(1.0f, m);
        running_mean[c] = __fadd_rn(__fmul_rn(m, mean), __fmul_rn(one_m, running_mean[c]));
        /* The unbiased variance var_sum / (n - 1) is a float division held
         * in double; the update is a double expression rounded once. */
        const double unbiased = (double)__fdiv_rn(var_sum, (float)(count - 1));
        running_var[c] = (float)__dadd_rn(__dmul_rn((double)m, unbiased), (double)__fmul_rn(one_m, running_var[c]));
    }
    const float alpha = __fmul_rn(invstd, gamma[c]);
    coef[c] = alpha;
    coef[C + c] = __fsub_rn(beta[c], __fmul_rn(mean, alpha));
}

/* y = x * alpha + shift, the two roundings of the CPU's float expression. */
__global__ static void bn_train_apply_kernel(float *y, const float *x, int C, size_t plane, const float *coef)
{
    const size_t p = blockIdx.x;
    const int c = (int)(p % (size_t)C);
    const float alpha = coef[c], shift = coef[C + c];
    const float *xp = x + p * plane;
    float *yp = y + p * plane;
    const size_t step = (size_t)gridDim.y * blockDim.x;
    for (size_t i = (size_t)blockIdx.y * blockDim.x + threadIdx.x; i < plane; i += step)
        yp[i] = __fadd_rn(__fmul_rn(xp[i], alpha), shift);
}

extern "C" ts_status ts_cuda_batchnorm_forward_train(ts_ctx *ctx, ts_tensor *y, float *save_mean, float *save_invstd,
                                                     const ts_tensor *x, const float *gamma, const float *beta,
                                                     float *running_mean, float *running_var, const ts_bn_params *p)
{
    static const char op[] = "batchnorm_forward_train";
    (void)ctx;
    ts_status st = ts_batchnorm_forward_train_check(y, save_mean, save_invstd, x, gamma, beta, running_mean,
                                                    running_var, p);
    if (st != TS_OK) return st;
    const bn_geom g = bn_geometry(x);
    if ((st = bn_check_launch(op, x)) != TS_OK) return st;
    if (ts_dtype_is_half(x->dtype))
        return bn_forward_train_half(y, save_mean, save_invstd, x, gamma, beta, running_mean, running_var, p);
    double *part = NULL;
    float *coef = NULL;
    if ((st = bn_scratch(g.C, g.S, &part, &coef)) != TS_OK) return st;
    double *part_sum = part, *part_var = part + (size_t)g.C * g.S;

    cudaStream_t stream = ts_cuda_state_get()->stream;
    const dim3 red_grid((unsigned)g.C, (unsigned)g.S);
    bn_sum_kernel<<<red_grid, RED_THREADS, 0, stream>>>(x->data, g.C, g.plane, g.count, g.len, part_sum);
    TS_CUDA_LAUNCH_CHECK();
    bn_var_kernel<<<red_grid, RED_THREADS, 0, stream>>>(x->data, g.C, g.plane, g.count, g.len, part_sum, part_var);
    TS_CUDA_LAUNCH_CHECK();
    /* Normalization.cpp casts momentum to float before the running update. */
    bn_train_finalize_kernel<<<(unsigned)((g.C + 127) / 128), 128, 0, stream>>>(
        g.C, g.S, g.count, part_sum, part_var, gamma, beta, p->eps, p->momentum, save_mean, save_invstd,
        running_mean, running_var, coef);
    TS_CUDA_LAUNCH_CHECK();
    dim3 grid;
    unsigned threads;
    apply_launch(&g, &grid, &threads);
    bn_train_apply_kernel<<<grid, threads, 0, stream>>>(y->data, x->data, g.C, g.plane, coef);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- eval forward ------------------------------------------------------------------------ */

/* Each thread derives its plane's coefficients from the running statistics
 * (four cached loads; cheaper than a kernel of its own): invstd =
 * 1 / sqrt(running_var + eps) in float, then the training folding. */
__global__ static void bn_eval_apply_kernel(float *y, const float *x, int C, size_t plane, const float *gamma,
                                            const float *beta, const float *running_mean, const float *running_var,
                                            float eps)
{
    const size_t p = blockIdx.x;
    const int c = (int)(p % (size_t)C);
    const float invstd = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(running_var[c], eps)));
    const float alpha = __fmul_rn(invstd, gamma[c]);
    const float shift = __fsub_rn(beta[c], __fmul_rn(running_mean[c], alpha));
    const float *xp = x + p * plane;
    float *yp = y + p * plane;
    const size_t step = (size_t)gridDim.y * blockDim.x;
    for (size_t i = (size_t)blockIdx.y * blockDim.x + threadIdx.x; i < plane; i += step)
        yp[i] = __fadd_rn(__fmul_rn(xp[i], alpha), shift);
}

extern "C" ts_status ts_cuda_batchnorm_forward_eval(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const float *gamma,
                                                    const float *beta, const float *running_mean,
                                                    const float *running_var, const ts_bn_params *p)
{
    static const char op[] = "batchnorm_forward_eval";
    (void)ctx;
    ts_status st = ts_batchnorm_forward_eval_check(y, x, gamma, beta, running_mean, running_var, p);
    if (st != TS_OK) return st;
    if ((st = bn_check_launch(op, x)) != TS_OK) return st;
    if (ts_dtype_is_half(x->dtype)) return bn_forward_eval_half(y, x, gamma, beta, running_mean, running_var, p);
    const bn_geom g = bn_geometry(x);
    dim3 grid;
    unsigned threads;
    apply_launch(&g, &grid, &threads);
    bn_eval_apply_kernel<<<grid, threads, 0, ts_cuda_state_get()->stream>>>(
        y->data, x->data, g.C, g.plane, gamma, beta, running_mean, running_var, p->eps);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- backward ---------------------------------------------------------------------------- */

/* part[c * S + s] = sum of dy, part[C * S + c * S + s] = sum of (x - mean) dy
 * over slice s: the difference in float, the product and the sum in double
 * (a product of two floats is exact in double, so a fused multiply-add here
 * gives the CPU's bits too). */
__global__ static void bn_bwd_reduce_kernel(const float *dy, const float *x, int C, size_t plane, size_t count,
                                            size_t len, const float *save_mean, double *part)
{
    const float mean = save_mean[blockIdx.x];
    double sum = 0.0, dotp = 0.0;
    for_slice(C, plane, count, len, [&](size_t k) {
        const float gk = dy[k];
        sum += (double)gk;
        dotp += (double)__fsub_rn(x[k], mean) * (double)gk;
    });
    block_sum2(&sum, &dotp);
    if (threadIdx.x == 0) {
        const size_t at = (size_t)blockIdx.x * gridDim.y + blockIdx.y;
        part[at] = sum;
        part[(size_t)C * gridDim.y + at] = dotp;
    }
}

/* One thread per channel: dgamma += (float)(dotp * invstd), dbeta +=
 * (float)sum, and the dx coefficients k = (float)(dotp * invstd^2 / n)
 * (coef[c]) and grad_mean = (float)(sum / n) (coef[C + c]). */
__global__ static void bn_bwd_finalize_kernel(int C, int S, size_t count, const double *part, const float *save_invstd,
                                              float *dgamma, float *dbeta, float *coef)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double sum = sum_partials(part, c, S);
    const double dotp = sum_partials(part + (size_t)C * S, c, S);
    const double invstd = (double)save_invstd[c];
    coef[c] = (float)__ddiv_rn(__dmul_rn(__dmul_rn(dotp, invstd), invstd), (double)count);
    coef[C + c] = (float)__ddiv_rn(sum, (double)count);
    dgamma[c] = __fadd_rn(dgamma[c], (float)__dmul_rn(dotp, invstd));
    dbeta[c] = __fadd_rn(dbeta[c], (float)sum);
}

/* dx += (dy - grad_mean - (x - mean) * k) * invstd * gamma, in float, with
 * the CPU's order of operations. */
__global__ static void bn_bwd_apply_kernel(float *dx, const float *dy, const float *x, int C, size_t plane,
                                           const float *gamma, const float *save_mean, const float *save_invstd,
                                           const float *coef)
{
    const size_t p = blockIdx.x;
    const int c = (int)(p % (size_t)C);
    const float mean = save_mean[c], invstd = save_invstd[c], w = gamma[c];
    const float k = coef[c], grad_mean = coef[C + c];
    const float *xp = x + p * plane, *gp = dy + p * plane;
    float *dp = dx + p * plane;
    const size_t step = (size_t)gridDim.y * blockDim.x;
    for (size_t i = (size_t)blockIdx.y * blockDim.x + threadIdx.x; i < plane; i += step) {
        const float proj = __fmul_rn(__fsub_rn(xp[i], mean), k);
        const float v = __fmul_rn(__fmul_rn(__fsub_rn(__fsub_rn(gp[i], grad_mean), proj), invstd), w);
        dp[i] = __fadd_rn(dp[i], v);
    }
}

extern "C" ts_status ts_cuda_batchnorm_backward(ts_ctx *ctx, ts_tensor *dx, float *dgamma, float *dbeta,
                                                const ts_tensor *dy, const ts_tensor *x, const float *gamma,
                                                const float *save_mean, const float *save_invstd)
{
    static const char op[] = "batchnorm_backward";
    (void)ctx;
    ts_status st = ts_batchnorm_backward_check(dx, dgamma, dbeta, dy, x, gamma, save_mean, save_invstd);
    if (st != TS_OK) return st;
    if ((st = bn_check_launch(op, x)) != TS_OK) return st;
    if (ts_dtype_is_half(x->dtype))
        return bn_backward_half(dx, dgamma, dbeta, dy, x, gamma, save_mean, save_invstd);
    const bn_geom g = bn_geometry(x);
    double *part = NULL;
    float *coef = NULL;
    if ((st = bn_scratch(g.C, g.S, &part, &coef)) != TS_OK) return st;

    cudaStream_t stream = ts_cuda_state_get()->stream;
    bn_bwd_reduce_kernel<<<dim3((unsigned)g.C, (unsigned)g.S), RED_THREADS, 0, stream>>>(
        dy->data, x->data, g.C, g.plane, g.count, g.len, save_mean, part);
    TS_CUDA_LAUNCH_CHECK();
    bn_bwd_finalize_kernel<<<(unsigned)((g.C + 127) / 128), 128, 0, stream>>>(g.C, g.S, g.count, part, save_invstd,
                                                                              dgamma, dbeta, coef);
    TS_CUDA_LAUNCH_CHECK();
    dim3 grid;
    unsigned threads;
    apply_launch(&g, &grid, &threads);
    bn_bwd_apply_kernel<<<grid, threads, 0, stream>>>(dx->data, dy->data, x->data, g.C, g.plane, gamma, save_mean,
                                                     save_invstd, coef);
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

/* The NHWC launch shape (see the top of the file): rows = N * H * W pixel
 * rows of C channels; blocks of (cw, lanes) threads, `chunks` of them across
 * the channels; S slices of len rows for the reductions. Everything follows
 * from (rows, C), never from the device. */
typedef struct bn_nhwc {
    int C;
    size_t rows;     /* N * H * W: values per channel */
    unsigned cw;     /* channel lanes (threadIdx.x) */
    unsigned lanes;  /* row lanes (threadIdx.y), cw * lanes <= RED_THREADS */
    unsigned chunks; /* blocks across the channels */
    int S;           /* slices of the rows */
    size_t len;      /* rows per slice (the last may have fewer, or none) */
} bn_nhwc;

static bn_nhwc bn_nhwc_geometry(const ts_tensor *x)
{
    bn_nhwc g;
    g.C = x->c;
    g.rows = (size_t)x->n * (size_t)x->h * (size_t)x->w;
    g.cw = g.C < NHWC_LANES ? (unsigned)g.C : NHWC_LANES;
    g.lanes = RED_THREADS / g.cw;
    g.chunks = (unsigned)((g.C + (int)g.cw - 1) / (int)g.cw);
    /* About RED_SLICE_TARGET values per block, as the NCHW slices. */
    const size_t rows_target = RED_SLICE_TARGET / g.cw;
    size_t S = (g.rows + rows_target - 1) / rows_target;
    if (S > NHWC_MAX_SLICES) S = NHWC_MAX_SLICES;
    if (S < 1) S = 1;
    g.S = (int)S;
    g.len = (g.rows + S - 1) / S;
    return g;
}

/* Elementwise passes: each thread owns one channel (its coefficients loaded
 * once, no division per element to find it) and strides the rows. */
static void nhwc_apply_launch(const bn_nhwc *g, dim3 *grid, dim3 *block)
{
    size_t gy = (g->rows + (size_t)g->lanes * 4 - 1) / ((size_t)g->lanes * 4);
    if (gy > 65535) gy = 65535;
    *grid = dim3(g->chunks, (unsigned)gy);
    *block = dim3(g->cw, g->lanes);
}

/* Fixed-order sums over the row lanes (threadIdx.y) of two doubles per
 * thread, per channel lane; every thread of the block must call it and gets
 * the totals of its lane. The tree pairs lane ty with ty + s for s = the
 * powers of two below blockDim.y, so any lane count works (256 / cw need
 * not be a power of two). */
__device__ static void column_sum2(double *a, double *b)
{
    __shared__ double sa[RED_THREADS], sb[RED_THREADS];
    const unsigned cw = blockDim.x, lanes = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
    sa[ty * cw + tx] = *a;
    sb[ty * cw + tx] = *b;
    __syncthreads();
    unsigned span = 1;
    while (span < lanes) span <<= 1;
    for (unsigned s = span / 2; s > 0; s >>= 1) {
        if (ty < s && ty + s < lanes) {
            sa[ty * cw + tx] += sa[(ty + s) * cw + tx];
            sb[ty * cw + tx] += sb[(ty + s) * cw + tx];
        }
        __syncthreads();
    }
    *a = sa[tx];
    *b = sb[tx];
    __syncthreads(); /* the arrays may be reused by a later call */
}

/* Walks slice blockIdx.y of this thread's channel c: calls f(index) for
 * rows r0 + ty, r0 + ty + lanes, ... in that order, index being the value's
 * offset in the NHWC tensor. Does nothing for a lane past C. */
template <typename F>
__device__ static void for_slice_nhwc(int c, int C, size_t rows, size_t len, F f)
{
    if (c >= C) return;
    const size_t r0 = (size_t)blockIdx.y * len;
    const size_t r1 = r0 + len < rows ? r0 + len : rows;
    TS_RED_UNROLL
    for (size_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) f(r * (size_t)C + (size_t)c);
}

/* The channel of this thread: chunk blockIdx.x, lane threadIdx.x. */
__device__ static int nhwc_channel() { return (int)(blockIdx.x * blockDim.x + threadIdx.x); }

/* part_sum[c * S + s] = sum of slice s of x[..., c] in double. */
template <typename H>
__global__ static void bn_sum_nhwc_kernel(const uint16_t *x, int C, size_t rows, size_t len, double *part_sum)
{
    const int c = nhwc_channel();
    double acc = 0.0, unused = 0.0;
    for_slice_nhwc(c, C, rows, len, [&](size_t k) { acc += (double)H::load(x[k]); });
    column_sum2(&acc, &unused); /* every thread, the idle lanes too: it synchronizes */
    if (threadIdx.y == 0 && c < C) part_sum[(size_t)c * gridDim.y + blockIdx.y] = acc;
}

/* part_var[c * S + s] = sum over slice s of d * d, d = x - mean in float,
 * added in double: bn_var_kernel's arithmetic on the widened values. */
template <typename H>
__global__ static void bn_var_nhwc_kernel(const uint16_t *x, int C, size_t rows, size_t len, const double *part_sum,
                                          double *part_var)
{
    __shared__ float mean_s[NHWC_LANES];
    const int c = nhwc_channel();
    if (threadIdx.y == 0 && c < C) mean_s[threadIdx.x] = mean_of(sum_partials(part_sum, c, gridDim.y), rows);
    __syncthreads();
    double acc = 0.0, unused = 0.0;
    for_slice_nhwc(c, C, rows, len, [&](size_t k) {
        const float d = __fsub_rn(H::load(x[k]), mean_s[threadIdx.x]);
        acc += (double)__fmul_rn(d, d);
    });
    column_sum2(&acc, &unused);
    if (threadIdx.y == 0 && c < C) part_var[(size_t)c * gridDim.y + blockIdx.y] = acc;
}

/* y = x * alpha + shift in float (bn_train_apply_kernel's two roundings),
 * then one rounding to the half type. */
template <typename H>
__global__ static void bn_train_apply_nhwc_kernel(uint16_t *y, const uint16_t *x, int C, size_t rows,
                                                  const float *coef)
{
    const int c = nhwc_channel();
    if (c >= C) return;
    const float alpha = coef[c], shift = coef[C + c];
    const size_t step = (size_t)gridDim.y * blockDim.y;
    for (size_t r = (size_t)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += step) {
        const size_t k = r * (size_t)C + (size_t)c;
        y[k] = H::store(__fadd_rn(__fmul_rn(H::load(x[k]), alpha), shift));
    }
}

template <typename H>
static ts_status bn_forward_train_nhwc(const bn_nhwc *g, uint16_t *y, float *save_mean, float *save_invstd,
                                       const uint16_t *x, const float *gamma, const float *beta,
                                       float *running_mean, float *running_var, const ts_bn_params *p)
{
    double *part = NULL;
    float *coef = NULL;
    ts_status st = bn_scratch(g->C, g->S, &part, &coef);
    if (st != TS_OK) return st;
    double *part_sum = part, *part_var = part + (size_t)g->C * g->S;
    cudaStream_t stream = ts_cuda_state_get()->stream;
    const dim3 red_grid(g->chunks, (unsigned)g->S), red_block(g->cw, g->lanes);
    bn_sum_nhwc_kernel<H><<<red_grid, red_block, 0, stream>>>(x, g->C, g->rows, g->len, part_sum);
    TS_CUDA_LAUNCH_CHECK();
    bn_var_nhwc_kernel<H><<<red_grid, red_block, 0, stream>>>(x, g->C, g->rows, g->len, part_sum, part_var);
    TS_CUDA_LAUNCH_CHECK();
    /* The float path's finalize: it reads only the [C][S] partials. */
    bn_train_finalize_kernel<<<(unsigned)((g->C + 127) / 128), 128, 0, stream>>>(
        g->C, g->S, g->rows, part_sum, part_var, gamma, beta, p->eps, p->momentum, save_mean, save_invstd,
        running_mean, running_var, coef);
    TS_CUDA_LAUNCH_CHECK();
    dim3 grid, block;
    nhwc_apply_launch(g, &grid, &block);
    bn_train_apply_nhwc_kernel<H><<<grid, block, 0, stream>>>(y, x, g->C, g->rows, coef);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

static ts_status bn_forward_train_half(ts_tensor *y, float *save_mean, float *save_invstd, const ts_tensor *x,
                                       const float *gamma, const float *beta, float *running_mean,
                                       float *running_var, const ts_bn_params *p)
{
    const bn_nhwc g = bn_nhwc_geometry(x);
    if (x->dtype == TS_BF16)
        return bn_forward_train_nhwc<bf16_io>(&g, y->half, save_mean, save_invstd, x->half, gamma, beta,
                                              running_mean, running_var, p);
    return bn_forward_train_nhwc<f16_io>(&g, y->half, save_mean, save_invstd, x->half, gamma, beta, running_mean,
                                         running_var, p);
}

/* bn_eval_apply_kernel's coefficients, once per thread for its channel, and
 * its float expression on the widened x, rounded once. */
template <typename H>
__global__ static void bn_eval_apply_nhwc_kernel(uint16_t *y, const uint16_t *x, int C, size_t rows,
                                                 const float *gamma, const float *beta, const float *running_mean,
                                                 const float *running_var, float eps)
{
    const int c = nhwc_channel();
    if (c >= C) return;
    const float invstd = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(running_var[c], eps)));
    const float alpha = __fmul_rn(invstd, gamma[c]);
    const float shift = __fsub_rn(beta[c], __fmul_rn(running_mean[c], alpha));
    const size_t step = (size_t)gridDim.y * blockDim.y;
    for (size_t r = (size_t)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += step) {
        const size_t k = r * (size_t)C + (size_t)c;
        y[k] = H::store(__fadd_rn(__fmul_rn(H::load(x[k]), alpha), shift));
    }
}

static ts_status bn_forward_eval_half(ts_tensor *y, const ts_tensor *x, const float *gamma, const float *beta,
                                      const float *running_mean, const float *running_var, const ts_bn_params *p)
{
    const bn_nhwc g = bn_nhwc_geometry(x);
    dim3 grid, block;
    nhwc_apply_launch(&g, &grid, &block);
    cudaStream_t stream = ts_cuda_state_get()->stream;
    if (x->dtype == TS_BF16)
        bn_eval_apply_nhwc_kernel<bf16_io><<<grid, block, 0, stream>>>(y->half, x->half, g.C, g.rows, gamma, beta,
                                                                       running_mean, running_var, p->eps);
    else
        bn_eval_apply_nhwc_kernel<f16_io><<<grid, block, 0, stream>>>(y->half, x->half, g.C, g.rows, gamma, beta,
                                                                      running_mean, running_var, p->eps);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* bn_bwd_reduce_kernel's two sums over slice s of the widened dy and x:
 * part[c * S + s] = sum of dy, part[C * S + c * S + s] = sum of
 * (x - mean) dy. */
template <typename H>
__global__ static void bn_bwd_reduce_nhwc_kernel(const uint16_t *dy, const uint16_t *x, int C, size_t rows,
                                                 size_t len, const float *save_mean, double *part)
{
    const int c = nhwc_channel();
    const float mean = c < C ? save_mean[c] : 0.0f;
    double sum = 0.0, dotp = 0.0;
    for_slice_nhwc(c, C, rows, len, [&](size_t k) {
        const float gk = H::load(dy[k]);
        sum += (double)gk;
        dotp += (double)__fsub_rn(H::load(x[k]), mean) * (double)gk;
    });
    column_sum2(&sum, &dotp);
    if (threadIdx.y == 0 && c < C) {
        const size_t at = (size_t)c * gridDim.y + blockIdx.y;
        part[at] = sum;
        part[(size_t)C * gridDim.y + at] = dotp;
    }
}

/* dx += (dy - grad_mean - (x - mean) * k) * invstd * gamma: the float path's
 * expression, its add to the widened old dx, then one rounding. */
template <typename H>
__global__ static void bn_bwd_apply_nhwc_kernel(uint16_t *dx, const uint16_t *dy, const uint16_t *x, int C,
                                                size_t rows, const float *gamma, const float *save_mean,
                                                const float *save_invstd, const float *coef)
{
    const int c = nhwc_channel();
    if (c >= C) return;
    const float mean = save_mean[c], invstd = save_invstd[c], w = gamma[c];
    const float k = coef[c], grad_mean = coef[C + c];
    const size_t step = (size_t)gridDim.y * blockDim.y;
    for (size_t r = (size_t)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += step) {
        const size_t i = r * (size_t)C + (size_t)c;
        const float proj = __fmul_rn(__fsub_rn(H::load(x[i]), mean), k);
        const float v = __fmul_rn(__fmul_rn(__fsub_rn(__fsub_rn(H::load(dy[i]), grad_mean), proj), invstd), w);
        dx[i] = H::store(__fadd_rn(H::load(dx[i]), v));
    }
}

template <typename H>
static ts_status bn_backward_nhwc(const bn_nhwc *g, uint16_t *dx, float *dgamma, float *dbeta, const uint16_t *dy,
                                  const uint16_t *x, const float *gamma, const float *save_mean,
                                  const float *save_invstd)
{
    double *part = NULL;
    float *coef = NULL;
    ts_status st = bn_scratch(g->C, g->S, &part, &coef);
    if (st != TS_OK) return st;
    cudaStream_t stream = ts_cuda_state_get()->stream;
    bn_bwd_reduce_nhwc_kernel<H><<<dim3(g->chunks, (unsigned)g->S), dim3(g->cw, g->lanes), 0, stream>>>(
        dy, x, g->C, g->rows, g->len, save_mean, part);
    TS_CUDA_LAUNCH_CHECK();
    /* The float path's finalize: it reads only the [C][S] partials. */
    bn_bwd_finalize_kernel<<<(unsigned)((g->C + 127) / 128), 128, 0, stream>>>(g->C, g->S, g->rows, part,
                                                                               save_invstd, dgamma, dbeta, coef);
    TS_CUDA_LAUNCH_CHECK();
    dim3 grid, block;
    nhwc_apply_launch(g, &grid, &block);
    bn_bwd_apply_nhwc_kernel<H><<<grid, block, 0, stream>>>(dx, dy, x, g->C, g->rows, gamma, save_mean, save_invstd,
                                                            coef);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

static ts_status bn_backward_half(ts_tensor *dx, float *dgamma, float *dbeta, const ts_tensor *dy,
                                  const ts_tensor *x, const float *gamma, const float *save_mean,
                                  const float *save_invstd)
{
    const bn_nhwc g = bn_nhwc_geometry(x);
    if (x->dtype == TS_BF16)
        return bn_backward_nhwc<bf16_io>(&g, dx->half, dgamma, dbeta, dy->half, x->half, gamma, save_mean,
                                         save_invstd);
    return bn_backward_nhwc<f16_io>(&g, dx->half, dgamma, dbeta, dy->half, x->half, gamma, save_mean, save_invstd);
}
