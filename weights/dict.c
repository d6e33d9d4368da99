#include "dict.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const struct {
    const char *name;
} dtypes[TS_DTYPE_COUNT] = {
    [TS_F32] = {"F32"}, [TS_F16] = {"F16"}, [TS_BF16] = {"BF16"}, [TS_F64] = {"F64"},
    [TS_I64] = {"I64"}, [TS_I32] = {"I32"}, [TS_U8] = {"U8"},
};

const char *ts_dtype_safetensors_name(ts_dtype t)
{
    return (int)t >= 0 && t < TS_DTYPE_COUNT ? dtypes[t].name : "?";
}

int ts_dtype_from_safetensors(const char *s)
{
    for (int i = 0; i < TS_DTYPE_COUNT; i++)
        if (strcmp(s, dtypes[i].name) == 0) return i;
    return -1;
}

void ts_dict_init(ts_dict *d) { memset(d, 0, sizeof *d); }

void ts_dict_free(ts_dict *d)
{
    for (size_t i = 0; i < d->count; i++) {
        free(d->items[i].name);
        free(d->items[i].data);
    }
    for (size_t i = 0; i < d->meta_count; i++) {
        free(d->meta[i].key);
        free(d->meta[i].value);
    }
    free(d->items);
    free(d->meta);
    memset(d, 0, sizeof *d);
}

size_t ts_named_numel(const ts_named_tensor *t)
{
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

const ts_named_tensor *ts_dict_find(const ts_dict *d, const char *name)
{
    for (size_t i = 0; i < d->count; i++)
        if (strcmp(d->items[i].name, name) == 0) return &d->items[i];
    return NULL;
}

static ts_status add_owned(ts_dict *d, const char *name, ts_dtype dtype, int ndim, const int64_t *shape, void *data,
                           int check_duplicate)
{
    if ((int)dtype < 0 || dtype >= TS_DTYPE_COUNT)
        return ts_error(TS_ERR_INVALID_ARG, "tensor \"%s\": unknown dtype %d", name, (int)dtype);
    if (ndim < 0 || ndim > TS_MAX_DIMS)
        return ts_error(TS_ERR_INVALID_ARG, "tensor \"%s\": %d dimensions (at most %d supported)", name, ndim,
                        TS_MAX_DIMS);
    if (check_duplicate && ts_dict_find(d, name))
        return ts_error(TS_ERR_INVALID_ARG, "tensor \"%s\" appears twice", name);
    ts_named_tensor t = {.dtype = dtype, .ndim = ndim, .data = data};
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) return ts_error(TS_ERR_INVALID_ARG, "tensor \"%s\": negative dimension %lld", name,
                                          (long long)shape[i]);
        t.shape[i] = shape[i];
        if (shape[i] && numel > SIZE_MAX / (size_t)shape[i] / 8)
            return ts_error(TS_ERR_INVALID_ARG, "tensor \"%s\": shape overflows", name);
        numel *= (size_t)shape[i];
    }
    t.nbytes = numel * ts_dtype_size(dtype);
    if (d->count == d->cap) {
        size_t cap = d->cap ? 2 * d->cap : 64;
        ts_named_tensor *items = realloc(d->items, cap * sizeof *items);
        if (!items) return ts_error(TS_ERR_NOMEM, "tensor dictionary: out of memory");
        d->items = items;
        d->cap = cap;
    }
    t.name = strdup(name);
    if (!t.name) return ts_error(TS_ERR_NOMEM, "tensor dictionary: out of memory");
    d->items[d->count++] = t;
    return TS_OK;
}

ts_status ts_dict_add_owned(ts_dict *d, const char *name, ts_dtype dtype, int ndim, const int64_t *shape, void *data)
{
    return add_owned(d, name, dtype, ndim, shape, data, 1);
}

ts_status ts_dict_add_owned_unique(ts_dict *d, const char *name, ts_dtype dtype, int ndim, const int64_t *shape,
                                   void *data)
{
    return add_owned(d, name, dtype, ndim, shape, data, 0);
}

ts_status ts_dict_add(ts_dict *d, const char *name, ts_dtype dtype, int ndim, const int64_t *shape, const void *data)
{
    size_t numel = 1;
    for (int i = 0; i < ndim && i < TS_MAX_DIMS; i++) numel *= shape[i] > 0 ? (size_t)shape[i] : 0;
    size_t nbytes = numel * ts_dtype_size(dtype);
    void *copy = malloc(nbytes ? nbytes : 1);
    if (!copy) return ts_error(TS_ERR_NOMEM, "tensor \"%s\": out of memory copying %zu bytes", name, nbytes);
    if (nbytes) memcpy(copy, data, nbytes);
    ts_status st = ts_dict_add_owned(d, name, dtype, ndim, shape, copy);
    if (st != TS_OK) free(copy);
    return st;
}

ts_status ts_dict_set_meta(ts_dict *d, const char *key, const char *value)
{
    for (size_t i = 0; i < d->meta_count; i++) {
        if (strcmp(d->meta[i].key, key) == 0) {
            char *v = strdup(value);
            if (!v) return ts_error(TS_ERR_NOMEM, "metadata: out of memory");
            free(d->meta[i].value);
            d->meta[i].value = v;
            return TS_OK;
        }
    }
    if (d->meta_count == d->meta_cap) {
        size_t cap = d->meta_cap ? 2 * d->meta_cap : 8;
        ts_kv *meta = realloc(d->meta, cap * sizeof *meta);
        if (!meta) return ts_error(TS_ERR_NOMEM, "metadata: out of memory");
        d->meta = meta;
        d->meta_cap = cap;
    }
    char *k = strdup(key), *v = strdup(value);
    if (!k || !v) {
        free(k);
        free(v);
        return ts_error(TS_ERR_NOMEM, "metadata: out of memory");
    }
    d->meta[d->meta_count++] = (ts_kv){k, v};
    return TS_OK;
}

const char *ts_dict_get_meta(const ts_dict *d, const char *key)
{
    for (size_t i = 0; i < d->meta_count; i++)
        if (strcmp(d->meta[i].key, key) == 0) return d->meta[i].value;
    return NULL;
}

/* IEEE half to float, exact (every half is a float). */
static float half_to_float(uint16_t h)
{
    int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    float v;
    if (exp == 0)
        v = ldexpf((float)mant, -24); /* subnormal */
    else if (exp == 31)
        v = mant ? NAN : INFINITY;
    else
        v = ldexpf((float)(mant | 0x400), exp - 25);
    return sign ? -v : v;
}

ts_status ts_named_to_f32(const ts_named_tensor *t, float *out)
{
    size_t n = ts_named_numel(t);
    const unsigned char *p = t->data;
    for (size_t i = 0; i < n; i++) {
        switch (t->dtype) {
        case TS_F32: memcpy(&out[i], p + 4 * i, 4); break;
        case TS_F16: {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            out[i] = half_to_float(h);
            break;
        }
        case TS_BF16: {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            uint32_t bits = (uint32_t)h << 16; /* bf16 is the top half of a float */
            memcpy(&out[i], &bits, 4);
            break;
        }
        case TS_F64: {
            double v;
            memcpy(&v, p + 8 * i, 8);
            out[i] = (float)v;
            break;
        }
        case TS_I64:
        case TS_I32: {
            int64_t v;
            if (t->dtype == TS_I64) {
                memcpy(&v, p + 8 * i, 8);
            } else {
                int32_t v32;
                memcpy(&v32, p + 4 * i, 4);
                v = v32;
            }
            if (v > (1 << 24) || v < -(1 << 24))
                return ts_error(TS_ERR_INVALID_ARG, "tensor \"%s\": integer %lld at %zu is not exact in float32",
                                t->name, (long long)v, i);
            out[i] = (float)v;
            break;
        }
        case TS_U8: out[i] = p[i]; break;
        default: return ts_error(TS_ERR_INVALID_ARG, "tensor \"%s\": unknown dtype", t->name);
        }
    }
    return TS_OK;
}
