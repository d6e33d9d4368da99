/* BatchNorm2d on the CPU: training forward (batch statistics, running-stat
 * update), eval forward (running statistics) and the training backward.
 *
 * The arithmetic follows PyTorch's contiguous fp32 CPU path step by step
 * (aten/src/ATen/native/cpu/batch_norm_kernel.cpp and
 * batch_norm_cpu_update_stats_template in aten/src/ATen/native/Normalization.cpp;
 * shared/specs/smp-unet.md section 7.3), including where it rounds to float,
 * so the results agree with torch to the last bits where the summation order
 * allows. Every loop runs per channel, and channels are independent, so the
 * OpenMP split is over channels and each channel's sums keep one fixed order
 * whatever the thread count. */
#include <math.h>
#include <stddef.h>

#include "cpu.h"

/* The argument checks (shapes, NULL pointers, eps, aliasing, PyTorch's
 * one-value-per-channel rule) are ts_batchnorm_*_check in kernels/ops_common.c,
 * shared with the CUDA twins. */

ts_status ts_cpu_batchnorm_forward_train(ts_ctx *ctx, ts_tensor *y, float *save_mean, float *save_invstd,
                                         const ts_tensor *x, const float *gamma, const float *beta, float *running_mean,
                                         float *running_var, const ts_bn_params *p)
{
    TS_CPU_HALF_DISPATCH(x, ts_cpu_half_batchnorm_forward_train(ctx, y, save_mean, save_invstd, x, gamma, beta, running_mean, running_var, p));
    (void)ctx;
    ts_status st = ts_batchnorm_forward_train_check(y, save_mean, save_invstd, x, gamma, beta, running_mean,
                                                    running_var, p);
    if (st != TS_OK) return st;

    const int N = x->n, C = x->c;
    const size_t plane = (size_t)x->h * x->w;
    const size_t count = (size_t)N * plane; /* values per channel, > 1 */
    const size_t cstride = (size_t)C * plane;
    const float eps = p->eps;
    /* Normalization.cpp casts momentum to the parameter type (float) before
     * the running update: momentum_ = static_cast<param_t>(momentum). */
    const float m = p->momentum;
    const float *xd = x->data;
    float *yd = y->data;

#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        /* batch_norm_cpu_collect_stats_contiguous_impl: the sum in double
         * (acc_type<float, CPU> is double), the mean rounded to float, then
         * sum (x - mean)^2 with the difference and square in float, added up
         * in double, and the sum stored as float. */
        double sum = 0.0;
        for (int n = 0; n < N; n++) {
            const float *xp = xd + (size_t)n * cstride + (size_t)c * plane;
            for (size_t i = 0; i < plane; i++) sum += xp[i];
        }
        const float mean = (float)(sum / (double)count);
        double var_acc = 0.0;
        for (int n = 0; n < N; n++) {
            const float *xp = xd + (size_t)n * cstride + (size_t)c * plane;
            for (size_t i = 0; i < plane; i++) {
                float d = xp[i] - mean;
                var_acc += d * d;
            }
        }
        const float var_sum = (float)var_acc;

        /* batch_norm_cpu_update_stats_template: _var_sum / n is float / int64
         * (so a float division), VarTransform then takes 1 / sqrt(var + eps)
         * in double, stored as float. */
        const float invstd = (float)(1.0 / sqrt((double)(var_sum / (float)count) + (double)eps));
        save_mean[c] = mean;
        save_invstd[c] = invstd;
        if (running_mean) {
            /* running_mean = momentum * mean + (1 - momentum) * running_mean,
             * all float; the unbiased variance var_sum / (n - 1) is a float
             * division held in double (accscalar_t), so the running_var
             * update is a double expression rounded once to float. */
            running_mean[c] = m * mean + (1.0f - m) * running_mean[c];
            double unbiased = (double)(var_sum / (float)(count - 1));
            running_var[c] = (float)((double)m * unbiased + (double)((1.0f - m) * running_var[c]));
        }

        /* batch_norm_cpu_collect_linear_and_constant_terms: fold into
         * y = x * alpha + beta' with alpha = invstd * gamma and
         * beta' = beta - mean * alpha, all float (batch_norm_cpu_contiguous_impl). */
        const float alpha = invstd * gamma[c];
        const float shift = beta[c] - mean * alpha;
        for (int n = 0; n < N; n++) {
            const float *xp = xd + (size_t)n * cstride + (size_t)c * plane;
            float *yp = yd + (size_t)n * cstride + (size_t)c * plane;
            for (size_t i = 0; i < plane; i++) yp[i] = xp[i] * alpha + shift;
        }
    }
    return TS_OK;
}

ts_status ts_cpu_batchnorm_forward_eval(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const float *gamma,
                                        const float *beta, const float *running_mean, const float *running_var,
                                        const ts_bn_params *p)
{
    TS_CPU_HALF_DISPATCH(x, ts_cpu_half_batchnorm_forward_eval(ctx, y, x, gamma, beta, running_mean, running_var, p));
    (void)ctx;
    ts_status st = ts_batchnorm_forward_eval_check(y, x, gamma, beta, running_mean, running_var, p);
    if (st != TS_OK) return st;

    const int N = x->n, C = x->c;
    const size_t plane = (size_t)x->h * x->w;
    const size_t cstride = (size_t)C * plane;
    const float eps = p->eps;
    const float *xd = x->data;
    float *yd = y->data;

#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        /* Eval branch of batch_norm_cpu_collect_linear_and_constant_terms:
         * invstd = 1 / sqrt(running_var + eps) in float (opmath_t), then the
         * same folding as training: (x - rm) * invstd * gamma + beta. */
        const float invstd = 1.0f / sqrtf(running_var[c] + eps);
        const float alpha = invstd * gamma[c];
        const float shift = beta[c] - running_mean[c] * alpha;
        for (int n = 0; n < N; n++) {
            const float *xp = xd + (size_t)n * cstride + (size_t)c * plane;
            float *yp = yd + (size_t)n * cstride + (size_t)c * plane;
            for (size_t i = 0; i < plane; i++) yp[i] = xp[i] * alpha + shift;
        }
    }
    return TS_OK;
}

ts_status ts_cpu_batchnorm_backward(ts_ctx *ctx, ts_tensor *dx, float *dgamma, float *dbeta, const ts_tensor *dy,
                                    const ts_tensor *x, const float *gamma, const float *save_mean,
                                    const float *save_invstd)
{
    TS_CPU_HALF_DISPATCH(dy, ts_cpu_half_batchnorm_backward(ctx, dx, dgamma, dbeta, dy, x, gamma, save_mean, save_invstd));
    (void)ctx;
    ts_status st = ts_batchnorm_backward_check(dx, dgamma, dbeta, dy, x, gamma, save_mean, save_invstd);
    if (st != TS_OK) return st;

    const int N = x->n, C = x->c;
    const size_t plane = (size_t)x->h * x->w;
    const size_t count = (size_t)N * plane;
    const size_t cstride = (size_t)C * plane;
    const float *xd = x->data, *dyd = dy->data;
    float *dxd = dx->data;

#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        /* batch_norm_cpu_backward_contiguous_impl, train branch:
         * sum = sum(dy), dotp = sum((x - mean) dy) in double,
         * k = dotp * invstd^2 / n and grad_mean = sum / n rounded to float,
         * dx = (dy - grad_mean - (x - mean) k) * invstd * gamma in float,
         * dgamma = dotp * invstd, dbeta = sum. Our convention adds all three
         * into the caller's buffers instead of overwriting them. */
        const float mean = save_mean[c], invstd = save_invstd[c], w = gamma[c];
        double sum = 0.0, dotp = 0.0;
        for (int n = 0; n < N; n++) {
            const float *xp = xd + (size_t)n * cstride + (size_t)c * plane;
            const float *gp = dyd + (size_t)n * cstride + (size_t)c * plane;
            for (size_t i = 0; i < plane; i++) {
                sum += gp[i];
                dotp += (double)(xp[i] - mean) * gp[i];
            }
        }
        const float k = (float)(dotp * invstd * invstd / (double)count);
        const float grad_mean = (float)(sum / (double)count);
        for (int n = 0; n < N; n++) {
            const float *xp = xd + (size_t)n * cstride + (size_t)c * plane;
            const float *gp = dyd + (size_t)n * cstride + (size_t)c * plane;
            float *dp = dxd + (size_t)n * cstride + (size_t)c * plane;
            for (size_t i = 0; i < plane; i++) {
                float proj = (xp[i] - mean) * k;
                dp[i] += (gp[i] - grad_mean - proj) * invstd * w;
            }
        }
        dgamma[c] += (float)(dotp * invstd);
        dbeta[c] += (float)sum;
    }
    return TS_OK;
}
