/* Shared by the CUDA backend's files (C and .cu alike): the process-wide
 * state, the return-code checks, and the ts_cuda_<op> declarations, which
 * have exactly the signatures of the CPU twins in kernels/cpu/cpu.h.
 *
 * Every CUDA runtime, cuDNN and cuBLAS call is checked; a failure becomes a
 * ts_status whose message names the call, its error string and file:line. */
#ifndef TS_CUDA_INTERNAL_H
#define TS_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>

#include "../backend.h"
#include "../status.h"
#include "cuda_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One device, one stream, one handle of each library, one workspace. */
typedef struct ts_cuda_state {
    int initialized;
    int device;
    cudaStream_t stream;
    cudnnHandle_t cudnn;
    cublasHandle_t cublas;
    void *workspace; /* cuDNN workspace, grown up to workspace_limit */
    size_t workspace_bytes;
    size_t workspace_limit;
    int deterministic;
    int tf32;
    int benchmark; /* cudnnFind* instead of the heuristic ranking (conv.c) */
    int sm_count; /* multiprocessors: sizes grid-stride launches */
    int capturing; /* between graphs->begin and ->end: ops are recorded, not run */
    /* Bumped whenever the workspace or an op's scratch buffer is replaced:
     * a graph recorded under an older generation points into freed memory. */
    unsigned long workspace_generation;
} ts_cuda_state;

/* The state (initialized by ts_cuda_backend). */
ts_cuda_state *ts_cuda_state_get(void);
/* A device workspace of at least `bytes` (<= the limit), valid until the next call. */
ts_status ts_cuda_workspace(size_t bytes, void **out);

ts_status ts_cuda_error(cudaError_t e, const char *call, const char *file, int line);
ts_status ts_cudnn_error(cudnnStatus_t e, const char *call, const char *file, int line);
ts_status ts_cublas_error(cublasStatus_t e, const char *call, const char *file, int line);

/* Use inside a function returning ts_status. */
#define TS_CUDA_CHECK(call)                                                           \
    do {                                                                              \
        cudaError_t ts_e_ = (call);                                                   \
        if (ts_e_ != cudaSuccess) return ts_cuda_error(ts_e_, #call, __FILE__, __LINE__); \
    } while (0)
#define TS_CUDNN_CHECK(call)                                                                      \
    do {                                                                                          \
        cudnnStatus_t ts_e_ = (call);                                                             \
        if (ts_e_ != CUDNN_STATUS_SUCCESS) return ts_cudnn_error(ts_e_, #call, __FILE__, __LINE__); \
    } while (0)
#define TS_CUBLAS_CHECK(call)                                                                       \
    do {                                                                                            \
        cublasStatus_t ts_e_ = (call);                                                              \
        if (ts_e_ != CUBLAS_STATUS_SUCCESS) return ts_cublas_error(ts_e_, #call, __FILE__, __LINE__); \
    } while (0)
/* Makes `device` current on the calling thread (the current device is per
 * host thread, and an op may run on another thread than the one that chose
 * it), calling cudaSetDevice only when another device is current: cheaper,
 * and nothing but stream work happens while a CUDA graph is recorded. */
static inline ts_status ts_cuda_use_device(int device)
{
    int current = -1;
    TS_CUDA_CHECK(cudaGetDevice(&current));
    if (current != device) TS_CUDA_CHECK(cudaSetDevice(device));
    return TS_OK;
}
/* The same inside a function returning ts_status. */
#define TS_CUDA_USE_DEVICE(device)                         \
    do {                                                   \
        ts_status ts_ud_ = ts_cuda_use_device(device);     \
        if (ts_ud_ != TS_OK) return ts_ud_;                \
    } while (0)

/* After a kernel launch: reports a bad launch configuration at once. */
#define TS_CUDA_LAUNCH_CHECK() TS_CUDA_CHECK(cudaGetLastError())

/* ---- ops: same signatures as kernels/cpu/cpu.h ------------------------- */

/* conv.c (cuDNN) */
ts_status ts_cuda_conv2d_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const ts_tensor *w, const float *bias,
                                 const ts_conv2d_params *p);
ts_status ts_cuda_conv2d_backward_data(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *w,
                                       const ts_conv2d_params *p);
ts_status ts_cuda_conv2d_backward_filter(ts_ctx *ctx, ts_tensor *dw, const ts_tensor *dy, const ts_tensor *x,
                                         const ts_conv2d_params *p);
ts_status ts_cuda_conv2d_backward_bias(ts_ctx *ctx, float *dbias, const ts_tensor *dy);

/* batchnorm.cu */
ts_status ts_cuda_batchnorm_forward_train(ts_ctx *ctx, ts_tensor *y, float *save_mean, float *save_invstd,
                                          const ts_tensor *x, const float *gamma, const float *beta,
                                          float *running_mean, float *running_var, const ts_bn_params *p);
ts_status ts_cuda_batchnorm_forward_eval(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const float *gamma,
                                         const float *beta, const float *running_mean, const float *running_var,
                                         const ts_bn_params *p);
ts_status ts_cuda_batchnorm_backward(ts_ctx *ctx, ts_tensor *dx, float *dgamma, float *dbeta, const ts_tensor *dy,
                                     const ts_tensor *x, const float *gamma, const float *save_mean,
                                     const float *save_invstd);

/* elementwise.cu: relu, add, concat, zero, sum_squares, scale */
/* Whether the build's kernels run on the current device (elementwise.cu). */
cudaError_t ts_cuda_kernel_image_check(void);
ts_status ts_cuda_relu_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x);
ts_status ts_cuda_relu_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *y);
ts_status ts_cuda_add_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b);
ts_status ts_cuda_add_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy);
ts_status ts_cuda_concat_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b);
ts_status ts_cuda_concat_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy);
ts_status ts_cuda_zero(ts_ctx *ctx, float *p, size_t n);
ts_status ts_cuda_sum_squares(ts_ctx *ctx, double *sumsq, const float *x, size_t n);
ts_status ts_cuda_sum_squares_multi(ts_ctx *ctx, double *sumsq, const float *const *x, const size_t *n, int count);
ts_status ts_cuda_scale(ts_ctx *ctx, float *x, size_t n, float a);

/* pool.cu */
ts_status ts_cuda_maxpool2d_forward(ts_ctx *ctx, ts_tensor *y, int32_t *index, const ts_tensor *x,
                                    const ts_pool2d_params *p);
ts_status ts_cuda_maxpool2d_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const int32_t *index,
                                     const ts_pool2d_params *p);

/* upsample.cu */
ts_status ts_cuda_upsample_nearest_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x);
ts_status ts_cuda_upsample_nearest_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy);

/* loss.cu */
ts_status ts_cuda_cross_entropy_forward(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                                        const ts_ce_params *p);
ts_status ts_cuda_cross_entropy_backward(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits,
                                         const int32_t *target, const ts_ce_params *p, float dloss);
ts_status ts_cuda_dice_forward(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                               const ts_dice_params *p);
ts_status ts_cuda_dice_backward(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits, const int32_t *target,
                                const ts_dice_params *p, float dloss);

/* convert.cu: dtype and layout casts (float32 NCHW <-> bf16/fp16 NHWC) */
ts_status ts_cuda_convert(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, int accumulate);

/* adamw.cu */
ts_status ts_cuda_adamw_update(ts_ctx *ctx, float *param, const float *grad, float *exp_avg, float *exp_avg_sq,
                               size_t n, const ts_adamw_step *s);

#ifdef __cplusplus
}
#endif

#endif
