#include "tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *ts_aligned_alloc(size_t bytes)
{
    size_t rounded = (bytes + TS_ALIGN - 1) / TS_ALIGN * TS_ALIGN;
    if (rounded == 0) rounded = TS_ALIGN;
    return aligned_alloc(TS_ALIGN, rounded);
}

void ts_aligned_free(void *p) { free(p); }

ts_status ts_tensor_alloc(ts_tensor *t, int n, int c, int h, int w)
{
    memset(t, 0, sizeof *t);
    if (n < 1 || c < 1 || h < 1 || w < 1)
        return ts_error(TS_ERR_INVALID_ARG, "tensor: cannot allocate shape [%d,%d,%d,%d]: every dimension must be >= 1",
                        n, c, h, w);
    size_t count = (size_t)n * c * h * w;
    float *data = ts_aligned_alloc(count * sizeof(float));
    if (!data)
        return ts_error(TS_ERR_NOMEM, "tensor: out of memory allocating [%d,%d,%d,%d] (%.1f MiB)", n, c, h, w,
                        (double)count * sizeof(float) / (1 << 20));
    memset(data, 0, count * sizeof(float));
    *t = (ts_tensor){.data = data, .n = n, .c = c, .h = h, .w = w, .owned = 1};
    return TS_OK;
}

ts_tensor ts_tensor_view(float *data, int n, int c, int h, int w)
{
    return (ts_tensor){.data = data, .n = n, .c = c, .h = h, .w = w, .owned = 0};
}

ts_tensor ts_tensor_view_as(void *data, ts_dtype dtype, int n, int c, int h, int w)
{
    ts_tensor t = ts_tensor_view(data, n, c, h, w);
    t.dtype = dtype;
    return t;
}

size_t ts_dtype_size(ts_dtype t)
{
    switch (t) {
    case TS_F32: return 4;
    case TS_F16: return 2;
    case TS_BF16: return 2;
    case TS_F64: return 8;
    case TS_I64: return 8;
    case TS_I32: return 4;
    case TS_U8: return 1;
    case TS_DTYPE_COUNT: break;
    }
    return 0;
}

const char *ts_dtype_name(ts_dtype t)
{
    switch (t) {
    case TS_F32: return "f32";
    case TS_F16: return "f16";
    case TS_BF16: return "bf16";
    case TS_F64: return "f64";
    case TS_I64: return "i64";
    case TS_I32: return "i32";
    case TS_U8: return "u8";
    case TS_DTYPE_COUNT: break;
    }
    return "?";
}

int ts_dtype_is_half(ts_dtype t) { return t == TS_BF16 || t == TS_F16; }

ts_tensor ts_tensor_batch_slice(const ts_tensor *t, int i0, int count)
{
    /* An image is contiguous in NCHW and in NHWC alike. */
    size_t per_image = (size_t)t->c * t->h * t->w * ts_dtype_size(t->dtype);
    return ts_tensor_view_as((unsigned char *)t->data + (size_t)i0 * per_image, t->dtype, count, t->c, t->h, t->w);
}

void ts_tensor_free(ts_tensor *t)
{
    if (t->owned) ts_aligned_free(t->data);
    memset(t, 0, sizeof *t);
}

size_t ts_tensor_numel(const ts_tensor *t) { return (size_t)t->n * t->c * t->h * t->w; }

size_t ts_tensor_bytes(const ts_tensor *t) { return ts_tensor_numel(t) * ts_dtype_size(t->dtype); }

int ts_tensor_same_shape(const ts_tensor *a, const ts_tensor *b)
{
    return a->n == b->n && a->c == b->c && a->h == b->h && a->w == b->w;
}

const char *ts_shape_str(const ts_tensor *t, char *buf)
{
    if (t->dtype == TS_F32)
        snprintf(buf, TS_SHAPE_STR, "[%d,%d,%d,%d]", t->n, t->c, t->h, t->w);
    else
        snprintf(buf, TS_SHAPE_STR, "[%d,%d,%d,%d] %s NHWC", t->n, t->c, t->h, t->w, ts_dtype_name(t->dtype));
    return buf;
}
