/* The two small kernels conv.c needs beside cuDNN (conv_epilogue.cu), with C
 * linkage so the plain-C conv.c can call them. Both run on the backend's
 * stream; pointers are device memory; shapes were checked by the caller. */
#ifndef TS_CUDA_CONV_EPILOGUE_H
#define TS_CUDA_CONV_EPILOGUE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "../status.h"

/* y[n, c, :] = y + bias[c], or max(y + bias[c], 0) when relu (bias may then
 * be NULL: plain ReLU), for y [n, c, plane]: the CPU forward's epilogue. */
ts_status ts_cuda_conv_epilogue(float *y, const float *bias, int n, int c, size_t plane, int relu);

/* dbias[c] += sum over n and the plane of dy[n, c, :], summed in double in a
 * fixed order (the same bits on every run), as the CPU does. */
ts_status ts_cuda_conv_bias_grad(float *dbias, const float *dy, int n, int c, size_t plane);

#ifdef __cplusplus
}
#endif

#endif
