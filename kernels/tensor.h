/* The tensor type: float32 NCHW, or a half type (bf16, fp16) channels-last,
 * row-major and contiguous.
 *
 * A tensor either owns its data (ts_tensor_alloc, freed by ts_tensor_free) or
 * is a view of memory owned by someone else (ts_tensor_view: an arena slot, a
 * batch slice of another tensor, a user buffer); freeing a view does nothing.
 * Parameters use the same type: a conv weight [out, in, kh, kw] is n=out,
 * c=in, h=kh, w=kw. Per-channel vectors (bias, BN gamma/beta/stats) are plain
 * float arrays whose length is the channel count of the tensor they go with. */
#ifndef TS_TENSOR_H
#define TS_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* C linkage for the CUDA backend's .cu files, which nvcc compiles as C++. */
#ifdef __cplusplus
extern "C" {
#endif

/* Every allocation is aligned to a cache line, which is also enough for AVX-512. */
#define TS_ALIGN 64

/* Element types. float32 is the type of every parameter, gradient the
 * optimizer reads, loss input and file. The half types are for activations
 * in mixed precision (the GPU's tensor cores): they are stored channels-last,
 * NHWC, as PyTorch's channels_last memory format, because that is the layout
 * cuDNN's tensor-core convolutions run on without transposing. n, c, h, w
 * still name the logical dimensions, so shapes and checks read the same. A
 * conv weight [out, in, kh, kw] in a half type is thus [out, kh, kw, in]
 * in memory (cuDNN's KRSC). */
typedef enum ts_dtype {
    TS_F32 = 0, /* float32, NCHW (the zero value: every tensor made before dtypes existed) */
    TS_F16,     /* IEEE float16, NHWC */
    TS_BF16,    /* bfloat16, NHWC */
    /* The rest are element types of weight files only (weights/dict.h);
     * no op takes a tensor of them. */
    TS_F64,
    TS_I64,
    TS_I32,
    TS_U8,
    TS_DTYPE_COUNT
} ts_dtype;

typedef struct ts_tensor {
    union {
        float *data;    /* TS_F32 */
        uint16_t *half; /* TS_BF16, TS_F16: the raw 16-bit patterns */
    };
    int n, c, h, w;
    int owned; /* 1: data came from ts_tensor_alloc and ts_tensor_free releases it */
    ts_dtype dtype;
} ts_tensor;

/* Bytes per element (0 for an unknown value), and "f32", "bf16", "f16", ...
 * ("?" for an unknown value). */
size_t ts_dtype_size(ts_dtype t);
const char *ts_dtype_name(ts_dtype t);
/* 1 for the half types (bf16, fp16). */
int ts_dtype_is_half(ts_dtype t);

/* Aligned allocation; size is rounded up to TS_ALIGN. NULL on failure. */
void *ts_aligned_alloc(size_t bytes);
void ts_aligned_free(void *p);

/* Allocates an owned, zero-filled tensor. Dimensions must be >= 1. */
ts_status ts_tensor_alloc(ts_tensor *t, int n, int c, int h, int w);
/* A non-owning view of data laid out as [n, c, h, w]. */
ts_tensor ts_tensor_view(float *data, int n, int c, int h, int w);
/* The same for any dtype: data holds n*c*h*w elements of `dtype` in its
 * layout (NHWC for the half types). */
ts_tensor ts_tensor_view_as(void *data, ts_dtype dtype, int n, int c, int h, int w);
/* Images [i0, i0+count) of a batch, as a view. */
ts_tensor ts_tensor_batch_slice(const ts_tensor *t, int i0, int count);
/* Frees an owned tensor and clears the struct; does nothing to a view's data. */
void ts_tensor_free(ts_tensor *t);

size_t ts_tensor_numel(const ts_tensor *t);
/* numel * ts_dtype_size(dtype). */
size_t ts_tensor_bytes(const ts_tensor *t);
int ts_tensor_same_shape(const ts_tensor *a, const ts_tensor *b);
/* Writes "[n,c,h,w]" into buf (at least TS_SHAPE_STR bytes) and returns buf;
 * a half tensor gets its type after it, "[n,c,h,w] bf16 NHWC". */
#define TS_SHAPE_STR 64
const char *ts_shape_str(const ts_tensor *t, char *buf);

#ifdef __cplusplus
}
#endif

#endif
