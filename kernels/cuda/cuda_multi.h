/* The fused multi-tensor AdamW of the CUDA backend: one launch updates every
 * parameter tensor, where the table's adamw_update takes one tensor per call
 * (a launch each, some 200 for the U-Net). Same per-element arithmetic as
 * ts_cuda_adamw_update (and so as the CPU's ts_cpu_adamw_update), same bits. */
#ifndef TS_CUDA_MULTI_H
#define TS_CUDA_MULTI_H

#include <stddef.h>

#include "../backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One parameter tensor's AdamW state: four DEVICE buffers of n floats each,
 * distinct from one another (param, grad, exp_avg, exp_avg_sq as in
 * adamw_update). n == 0 is allowed and skipped. */
typedef struct ts_cuda_adamw_tensor {
    float *param;
    const float *grad;
    float *exp_avg;
    float *exp_avg_sq;
    size_t n;
} ts_cuda_adamw_tensor;

/* Checks a HOST copy of the descriptor array with adamw_update's rules (no
 * NULL buffer where n > 0, four distinct buffers per tensor), naming the
 * first bad entry. The update itself cannot look into device memory from the
 * host, so call this once when building the array, before copying it to the
 * device (ts_cuda_memcpy_h2d). */
ts_status ts_cuda_adamw_check_tensors(const ts_cuda_adamw_tensor *host_tensors, int count);

/* One AdamW step over count tensors in one launch. tensors is a DEVICE array
 * of count descriptors, built once by the caller (and checked with
 * ts_cuda_adamw_check_tensors); s is on the host, from ts_adamw_prepare. Every
 * element gets exactly ts_cuda_adamw_update's float operations, so the result
 * is bit-identical to updating each tensor on its own, on the GPU or the CPU. */
ts_status ts_cuda_adamw_update_multi(ts_ctx *ctx, const ts_cuda_adamw_tensor *tensors, int count,
                                     const ts_adamw_step *s);

#ifdef __cplusplus
}
#endif

#endif
