/* AdamW on the GPU, twin of kernels/cpu/adamw.c (PyTorch's single-tensor path
 * with decoupled weight decay, shared/specs/smp-unet.md 7.1), plus the fused
 * multi-tensor update of cuda_multi.h.
 *
 * The per-step scalars come from ts_adamw_prepare() on the host, exactly as
 * for the CPU. Per element, the CPU makes these float32 operations, each
 * rounded once, in this order (its comment says why each is what PyTorch's
 * ATen kernels do):
 *   p = p * decay
 *   m = fma(coeff, g - m, small ? m : g)      lerp(m, g, 1 - beta1)
 *   v = v * beta2
 *   v = fma((1 - beta2) * g, g, v)            mul_ then addcmul_
 *   d = sqrt(v) / bc2_sqrt + eps
 *   p = p + (-step_size * m) / d              addcdiv_
 * The CPU file is ISO C (-std=c17), where GCC never contracts a * b + c, so
 * only its two explicit fmaf() calls fuse. nvcc, by default (--fmad=true),
 * WOULD fuse p * decay ... and sqrt(v) / bc2_sqrt + eps where it can, and its
 * plain '/' and sqrtf are IEEE only under the default -prec-div/-prec-sqrt.
 * So every operation below is a round-to-nearest intrinsic (__fmul_rn,
 * __fadd_rn, __fsub_rn, __fdiv_rn, __fsqrt_rn, __fmaf_rn), which nvcc never
 * contracts or approximates whatever the flags: each is the one correctly
 * rounded IEEE operation the CPU performs, so param, exp_avg and exp_avg_sq
 * match the CPU bit for bit (NaN payloads aside), and so do the single-tensor
 * and the multi-tensor kernels. Denormals are kept (nvcc's default -ftz=false,
 * and the intrinsics follow it), as on the CPU. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda_ops.cuh"
#include "cuda_multi.h"

/* The step's scalars as the kernels use them. */
typedef struct adamw_k {
    float decay, coeff, beta2, omb2, bc2_sqrt, eps, nss;
    int small;
} adamw_k;

static adamw_k adamw_k_of(const ts_adamw_step *s)
{
    adamw_k k;
    k.decay = s->decay;
    k.beta2 = s->beta2;
    k.omb2 = s->one_minus_beta2;
    k.bc2_sqrt = s->bc2_sqrt;
    k.eps = s->eps;
    k.nss = s->neg_step_size;
    /* PyTorch's is_lerp_weight_small: |w| < 0.5 picks the form anchored at m.
     * The same float compare and subtraction as the CPU, on the host. */
    const float w = s->beta1_weight;
    k.small = fabsf(w) < 0.5f;
    k.coeff = k.small ? w : w - 1.0f;
    return k;
}

/* One element, the CPU's loop body operation for operation. */
static __device__ __forceinline__ void adamw_element(float *param, const float *grad, float *exp_avg,
                                                     float *exp_avg_sq, size_t i, const adamw_k &k)
{
    float g = grad[i];
    float p = __fmul_rn(param[i], k.decay);
    float m = exp_avg[i];
    m = __fmaf_rn(k.coeff, __fsub_rn(g, m), k.small ? m : g);
    float v = __fmul_rn(exp_avg_sq[i], k.beta2);
    v = __fmaf_rn(__fmul_rn(k.omb2, g), g, v);
    float d = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), k.bc2_sqrt), k.eps);
    p = __fadd_rn(p, __fdiv_rn(__fmul_rn(k.nss, m), d));
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = p;
}

/* ---- one tensor (the backend table's adamw_update) ------------------------ */

static __global__ void adamw_kernel(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, size_t n,
                                    adamw_k k)
{
    /* Elements are independent, so any grid gives the same bits. */
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        adamw_element(param, grad, exp_avg, exp_avg_sq, i, k);
}

extern "C" ts_status ts_cuda_adamw_update(ts_ctx *ctx, float *param, const float *grad, float *exp_avg,
                                          float *exp_avg_sq, size_t n, const ts_adamw_step *s)
{
    (void)ctx;
    /* The CPU's checks, shared. */
    ts_status st = ts_adamw_update_check(param, grad, exp_avg, exp_avg_sq, n, s);
    if (st != TS_OK || n == 0) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("adamw_update", &cs)) != TS_OK) return st;
    adamw_kernel<<<ts_ops_grid(cs, n), TS_OPS_THREADS, 0, cs->stream>>>(param, grad, exp_avg, exp_avg_sq, n,
                                                                         adamw_k_of(s));
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- many tensors in one launch ------------------------------------------ */

/* The tensors are cut into chunks of MULTI_CHUNK elements, numbered across
 * all tensors in order (tensor 0's chunks, then tensor 1's, ...), and chunk q
 * goes to block q mod G: every block gets an even share of the work however
 * the sizes are spread (the U-Net has 16-float BN vectors and a 2.4M-float
 * 3x3 conv), and the host never needs the sizes, which live on the device.
 * Each block walks the descriptors itself, reading them MULTI_DESC_BATCH at a
 * time into shared memory with one load per thread. Which block or thread
 * updates an element never changes its bits: elements are independent. */
#define MULTI_CHUNK (TS_OPS_THREADS * 8)
#define MULTI_DESC_BATCH 128 /* <= TS_OPS_THREADS: one descriptor per loading thread */

static __global__ void adamw_multi_kernel(const ts_cuda_adamw_tensor *tensors, int count, adamw_k k)
{
    __shared__ ts_cuda_adamw_tensor sd[MULTI_DESC_BATCH];
    const size_t G = gridDim.x;
    size_t base = 0; /* global number of the current tensor's first chunk */
    for (int t0 = 0; t0 < count; t0 += MULTI_DESC_BATCH) {
        const int nb = count - t0 < MULTI_DESC_BATCH ? count - t0 : MULTI_DESC_BATCH;
        __syncthreads(); /* the previous batch is no longer read */
        if ((int)threadIdx.x < nb) sd[threadIdx.x] = tensors[t0 + threadIdx.x];
        __syncthreads();
        for (int j = 0; j < nb; j++) {
            const ts_cuda_adamw_tensor t = sd[j];
            const size_t nch = (t.n + MULTI_CHUNK - 1) / MULTI_CHUNK;
            /* This block's first chunk c of the tensor: (base + c) mod G == blockIdx.x. */
            for (size_t c = (blockIdx.x + G - base % G) % G; c < nch; c += G) {
                const size_t i0 = c * MULTI_CHUNK, i1 = i0 + MULTI_CHUNK < t.n ? i0 + MULTI_CHUNK : t.n;
                for (size_t i = i0 + threadIdx.x; i < i1; i += blockDim.x)
                    adamw_element(t.param, t.grad, t.exp_avg, t.exp_avg_sq, i, k);
            }
            base += nch;
        }
    }
}

extern "C" ts_status ts_cuda_adamw_check_tensors(const ts_cuda_adamw_tensor *host_tensors, int count)
{
    if (count < 0) return ts_error(TS_ERR_INVALID_ARG, "adamw_update_multi: tensor count %d is negative", count);
    if (count > 0 && !host_tensors)
        return ts_error(TS_ERR_INVALID_ARG, "adamw_update_multi: NULL descriptor array for %d tensors", count);
    for (int t = 0; t < count; t++) {
        const ts_cuda_adamw_tensor *d = &host_tensors[t];
        if (d->n == 0) continue;
        if (!d->param || !d->grad || !d->exp_avg || !d->exp_avg_sq)
            return ts_error(TS_ERR_INVALID_ARG,
                            "adamw_update_multi: tensor %d has a NULL buffer among param %p, grad %p, exp_avg %p, "
                            "exp_avg_sq %p (n = %zu)",
                            t, (void *)d->param, (const void *)d->grad, (void *)d->exp_avg, (void *)d->exp_avg_sq,
                            d->n);
        const void *b[4] = {d->param, d->grad, d->exp_avg, d->exp_avg_sq};
        for (int i = 0; i < 4; i++)
            for (int j = i + 1; j < 4; j++)
                if (b[i] == b[j])
                    return ts_error(TS_ERR_INVALID_ARG,
                                    "adamw_update_multi: tensor %d: param, grad, exp_avg and exp_avg_sq must be "
                                    "distinct buffers (fields %d and %d are the same)",
                                    t, i + 1, j + 1);
    }
    return TS_OK;
}

extern "C" ts_status ts_cuda_adamw_update_multi(ts_ctx *ctx, const ts_cuda_adamw_tensor *tensors, int count,
                                                const ts_adamw_step *s)
{
    (void)ctx;
    if (!s)
        return ts_error(TS_ERR_INVALID_ARG, "adamw_update_multi: step values are NULL (call ts_adamw_prepare first)");
    if (count < 0) return ts_error(TS_ERR_INVALID_ARG, "adamw_update_multi: tensor count %d is negative", count);
    if (count == 0) return TS_OK;
    if (!tensors)
        return ts_error(TS_ERR_INVALID_ARG, "adamw_update_multi: NULL descriptor array for %d tensors", count);
    ts_cuda_state *cs;
    ts_status st = ts_ops_state("adamw_update_multi", &cs);
    if (st != TS_OK) return st;
    /* A full device's worth of resident blocks; extra blocks on a small
     * parameter set just walk the descriptors and find no chunk. */
    const unsigned grid = (unsigned)(cs->sm_count > 0 ? cs->sm_count : 1) * TS_OPS_BLOCKS_PER_SM;
    adamw_multi_kernel<<<grid, TS_OPS_THREADS, 0, cs->stream>>>(tensors, count, adamw_k_of(s));
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}
