/* The CPU backend's ops: the signatures of struct ts_backend (backend.h),
 * prefixed ts_cpu_. Each op family lives in one file with its forward and
 * backward side by side; the CUDA twins (kernels/cuda/) carry the prefix
 * ts_cuda_ and the same arguments. */
#ifndef TS_CPU_H
#define TS_CPU_H

#include "../backend.h"

/* conv2d.c */
ts_status ts_cpu_conv2d_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const ts_tensor *w, const float *bias,
                                const ts_conv2d_params *p);
ts_status ts_cpu_conv2d_backward_data(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *w,
                                      const ts_conv2d_params *p);
ts_status ts_cpu_conv2d_backward_filter(ts_ctx *ctx, ts_tensor *dw, const ts_tensor *dy, const ts_tensor *x,
                                        const ts_conv2d_params *p);
ts_status ts_cpu_conv2d_backward_bias(ts_ctx *ctx, float *dbias, const ts_tensor *dy);

/* batchnorm.c */
ts_status ts_cpu_batchnorm_forward_train(ts_ctx *ctx, ts_tensor *y, float *save_mean, float *save_invstd,
                                         const ts_tensor *x, const float *gamma, const float *beta,
                                         float *running_mean, float *running_var, const ts_bn_params *p);
ts_status ts_cpu_batchnorm_forward_eval(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const float *gamma,
                                        const float *beta, const float *running_mean, const float *running_var,
                                        const ts_bn_params *p);
ts_status ts_cpu_batchnorm_backward(ts_ctx *ctx, ts_tensor *dx, float *dgamma, float *dbeta, const ts_tensor *dy,
                                    const ts_tensor *x, const float *gamma, const float *save_mean,
                                    const float *save_invstd);

/* elementwise.c: relu, add, concat, zero, sum_squares, scale */
ts_status ts_cpu_relu_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x);
ts_status ts_cpu_relu_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *y);
ts_status ts_cpu_add_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b);
ts_status ts_cpu_add_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy);
ts_status ts_cpu_concat_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b);
ts_status ts_cpu_concat_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy);
ts_status ts_cpu_zero(ts_ctx *ctx, float *p, size_t n);
ts_status ts_cpu_sum_squares(ts_ctx *ctx, double *sumsq, const float *x, size_t n);
ts_status ts_cpu_sum_squares_multi(ts_ctx *ctx, double *sumsq, const float *const *x, const size_t *n, int count);
ts_status ts_cpu_scale(ts_ctx *ctx, float *x, size_t n, float a);

/* pool.c */
ts_status ts_cpu_maxpool2d_forward(ts_ctx *ctx, ts_tensor *y, int32_t *index, const ts_tensor *x,
                                   const ts_pool2d_params *p);
ts_status ts_cpu_maxpool2d_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const int32_t *index,
                                    const ts_pool2d_params *p);

/* upsample.c */
ts_status ts_cpu_upsample_nearest_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x);
ts_status ts_cpu_upsample_nearest_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy);

/* loss.c */
ts_status ts_cpu_cross_entropy_forward(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                                       const ts_ce_params *p);
ts_status ts_cpu_cross_entropy_backward(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits,
                                        const int32_t *target, const ts_ce_params *p, float dloss);
ts_status ts_cpu_dice_forward(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                              const ts_dice_params *p);
ts_status ts_cpu_dice_backward(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits, const int32_t *target,
                               const ts_dice_params *p, float dloss);

/* adamw.c */
ts_status ts_cpu_adamw_update(ts_ctx *ctx, float *param, const float *grad, float *exp_avg, float *exp_avg_sq,
                              size_t n, const ts_adamw_step *s);

/* half.c: convert, and the half-precision paths of the activation ops
 * (each ts_cpu_<op> above hands a call with a half tensor to its
 * ts_cpu_half_<op>: widen, run the float32 op, round back). */
ts_status ts_cpu_convert(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, int accumulate);
ts_status ts_cpu_half_conv2d_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const ts_tensor *w,
                                     const float *bias, const ts_conv2d_params *p);
ts_status ts_cpu_half_conv2d_backward_data(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *w,
                                           const ts_conv2d_params *p);
ts_status ts_cpu_half_conv2d_backward_filter(ts_ctx *ctx, ts_tensor *dw, const ts_tensor *dy, const ts_tensor *x,
                                             const ts_conv2d_params *p);
ts_status ts_cpu_half_conv2d_backward_bias(ts_ctx *ctx, float *dbias, const ts_tensor *dy);
ts_status ts_cpu_half_batchnorm_forward_train(ts_ctx *ctx, ts_tensor *y, float *save_mean, float *save_invstd,
                                              const ts_tensor *x, const float *gamma, const float *beta,
                                              float *running_mean, float *running_var, const ts_bn_params *p);
ts_status ts_cpu_half_batchnorm_forward_eval(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const float *gamma,
                                             const float *beta, const float *running_mean, const float *running_var,
                                             const ts_bn_params *p);
ts_status ts_cpu_half_batchnorm_backward(ts_ctx *ctx, ts_tensor *dx, float *dgamma, float *dbeta, const ts_tensor *dy,
                                         const ts_tensor *x, const float *gamma, const float *save_mean,
                                         const float *save_invstd);
ts_status ts_cpu_half_relu_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x);
ts_status ts_cpu_half_relu_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *y);
ts_status ts_cpu_half_add_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b);
ts_status ts_cpu_half_add_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy);
ts_status ts_cpu_half_concat_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b);
ts_status ts_cpu_half_concat_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy);
ts_status ts_cpu_half_maxpool2d_forward(ts_ctx *ctx, ts_tensor *y, int32_t *index, const ts_tensor *x,
                                        const ts_pool2d_params *p);
ts_status ts_cpu_half_maxpool2d_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const int32_t *index,
                                         const ts_pool2d_params *p);
ts_status ts_cpu_half_upsample_nearest_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x);
ts_status ts_cpu_half_upsample_nearest_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy);

/* A call whose tensor t is half goes to the half path (the other tensors'
 * dtypes are checked there). */
#define TS_CPU_HALF_DISPATCH(t, call) \
    if ((t) && (t)->dtype != TS_F32) return call

#endif
