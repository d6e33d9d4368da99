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

ts_tensor ts_tensor_batch_slice(const ts_tensor *t, int i0, int count)
{
    size_t per_image = (size_t)t->c * t->h * t->w;
    return ts_tensor_view(t->data + (size_t)i0 * per_image, count, t->c, t->h, t->w);
}

void ts_tensor_free(ts_tensor *t)
{
    if (t->owned) ts_aligned_free(t->data);
    memset(t, 0, sizeof *t);
}

size_t ts_tensor_numel(const ts_tensor *t) { return (size_t)t->n * t->c * t->h * t->w; }

int ts_tensor_same_shape(const ts_tensor *a, const ts_tensor *b)
{
    return a->n == b->n && a->c == b->c && a->h == b->h && a->w == b->w;
}

const char *ts_shape_str(const ts_tensor *t, char *buf)
{
    snprintf(buf, TS_SHAPE_STR, "[%d,%d,%d,%d]", t->n, t->c, t->h, t->w);
    return buf;
}
