/* The tensor type: float32, NCHW, row-major and contiguous.
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

#include "status.h"

/* C linkage for the CUDA backend's .cu files, which nvcc compiles as C++. */
#ifdef __cplusplus
extern "C" {
#endif

/* Every allocation is aligned to a cache line, which is also enough for AVX-512. */
#define TS_ALIGN 64

typedef struct ts_tensor {
    float *data;
    int n, c, h, w;
    int owned; /* 1: data came from ts_tensor_alloc and ts_tensor_free releases it */
} ts_tensor;

/* Aligned allocation; size is rounded up to TS_ALIGN. NULL on failure. */
void *ts_aligned_alloc(size_t bytes);
void ts_aligned_free(void *p);

/* Allocates an owned, zero-filled tensor. Dimensions must be >= 1. */
ts_status ts_tensor_alloc(ts_tensor *t, int n, int c, int h, int w);
/* A non-owning view of data laid out as [n, c, h, w]. */
ts_tensor ts_tensor_view(float *data, int n, int c, int h, int w);
/* Images [i0, i0+count) of a batch, as a view. */
ts_tensor ts_tensor_batch_slice(const ts_tensor *t, int i0, int count);
/* Frees an owned tensor and clears the struct; does nothing to a view's data. */
void ts_tensor_free(ts_tensor *t);

size_t ts_tensor_numel(const ts_tensor *t);
int ts_tensor_same_shape(const ts_tensor *a, const ts_tensor *b);
/* Writes "[n,c,h,w]" into buf (at least TS_SHAPE_STR bytes) and returns buf. */
#define TS_SHAPE_STR 64
const char *ts_shape_str(const ts_tensor *t, char *buf);

#ifdef __cplusplus
}
#endif

#endif
