/* AdamW on the CPU: PyTorch's single-tensor path (torch/optim/adam.py with
 * decoupled_weight_decay, the CPU default), shared/specs/smp-unet.md 7.1.
 *
 * The per-step scalars come from ts_adamw_prepare() (double on the host,
 * rounded to float as PyTorch's kernels round Python scalars); here every
 * element follows the float32 operations of PyTorch's ATen CPU kernels, one
 * rounding each, in the same order:
 *   param.mul_(decay)                       p = p * decay
 *   exp_avg.lerp_(grad, 1 - beta1)          LerpKernel.cpp, vectorized form:
 *                                           w < 0.5: fma(w, g - m, m)
 *                                           else:    fma(w - 1, g - m, g)
 *   exp_avg_sq.mul_(beta2)                  v = v * beta2
 *             .addcmul_(g, g, 1 - beta2)    v = fma((1 - beta2) * g, g, v)
 *   denom = (v.sqrt() / bc2_sqrt).add_(eps) d = sqrt(v) / bc2_sqrt + eps
 *   param.addcdiv_(m, denom, -step_size)    p = p + (-step_size * m) / d
 * addcmul's source reads self + value * t1 * t2, but the compiler contracts
 * the last multiply-add into an FMA: against torch 2.15 (CPU capability
 * AVX512) every exp_avg_sq value matches bit for bit with the fma form and
 * about 1 in 10 differs by an ulp without it (tests/test_torch_ops.c counts
 * this). This file is compiled as ISO C (-std=c17), where GCC does not
 * contract a*b+c on its own, so only the explicit fmaf() calls fuse. */
#include <math.h>
#include <stdint.h>

#include "cpu.h"

ts_status ts_cpu_adamw_update(ts_ctx *ctx, float *param, const float *grad, float *exp_avg, float *exp_avg_sq,
                              size_t n, const ts_adamw_step *s)
{
    (void)ctx;
    /* s non-NULL; for n > 0, four non-NULL distinct buffers (shared with the
     * CUDA twin). */
    ts_status st = ts_adamw_update_check(param, grad, exp_avg, exp_avg_sq, n, s);
    if (st != TS_OK || n == 0) return st;

    const float decay = s->decay, w = s->beta1_weight, beta2 = s->beta2, omb2 = s->one_minus_beta2;
    const float bc2_sqrt = s->bc2_sqrt, eps = s->eps, nss = s->neg_step_size;
    /* PyTorch's is_lerp_weight_small: |w| < 0.5 picks the form anchored at m. */
    const int small = fabsf(w) < 0.5f;
    const float coeff = small ? w : w - 1.0f;

    /* Elements are independent, so any split gives the same bits. */
#pragma omp parallel for schedule(static) if (n >= 32768)
    for (size_t i = 0; i < n; i++) {
        float g = grad[i];
        float p = param[i] * decay;
        float m = exp_avg[i];
        m = fmaf(coeff, g - m, small ? m : g);
        float v = exp_avg_sq[i] * beta2;
        v = fmaf(omb2 * g, g, v);
        float d = sqrtf(v) / bc2_sqrt + eps;
        p = p + (nss * m) / d;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        param[i] = p;
    }
    return TS_OK;
}
