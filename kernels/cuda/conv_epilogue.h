/* The small kernels conv.c needs beside cuDNN (conv_epilogue.cu), with C
 * linkage so the plain-C conv.c can call them. All run on the backend's
 * stream; pointers are device memory; shapes were checked by the caller. */
#ifndef TS_CUDA_CONV_EPILOGUE_H
#define TS_CUDA_CONV_EPILOGUE_H

#include <stddef.h>
#include <stdint.h>

#include "../status.h"
#include "../tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* y[n, c, :] = y + bias[c] + add[n, c, :], or max(that, 0) when relu, for
 * y [n, c, plane]; bias and add may each be NULL (nothing added), so with
 * neither it is a plain ReLU. The CPU forward's epilogue in its order
 * ((y + bias) + add, then the ReLU), the second pass of a forward that does
 * not run as cuDNN's fused call. add has y's shape and is not y. */
ts_status ts_cuda_conv_epilogue(float *y, const float *bias, const float *add, int n, int c, size_t plane, int relu);

/* dbias[c] += sum over n and the plane of dy[n, c, :], summed in double in a
 * fixed order (the same bits on every run), as the CPU does. */
ts_status ts_cuda_conv_bias_grad(float *dbias, const float *dy, int n, int c, size_t plane);

/* The same two for a half tensor (dtype TS_BF16 or TS_F16, NHWC: `pixels` =
 * n * h * w rows of c channels; bias and dbias stay float32, add is of y's
 * half type and layout, or NULL). The epilogue widens each element, adds
 * the bias rounded to the half type (and widened: autocast's half bias),
 * then the widened add, applies the ReLU in float32, and rounds once to the
 * half type; the bias gradient sums the widened values in double in a
 * fixed order that depends only on (pixels, c). */
ts_status ts_cuda_conv_epilogue_half(uint16_t *y, ts_dtype dtype, const float *bias, const uint16_t *add,
                                     size_t pixels, int c, int relu);
ts_status ts_cuda_conv_bias_grad_half(float *dbias, const uint16_t *dy, ts_dtype dtype, size_t pixels, int c);

/* out[0..c) = bias[0..c) rounded once to dtype (TS_BF16 or TS_F16, to
 * nearest even): the bias of cuDNN's fused half forward, which takes it in
 * y's type. out is device memory of at least 2 c bytes. */
ts_status ts_cuda_conv_bias_to_half(uint16_t *out, ts_dtype dtype, const float *bias, int c);

#ifdef __cplusplus
}
#endif

#endif
