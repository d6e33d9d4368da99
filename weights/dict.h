/* A named-tensor dictionary: what every weight file reader produces and
 * every writer consumes, in file order. The readers (safetensors.c, pth.c)
 * know nothing about the model; weights/smp.c maps a dictionary onto the
 * model's parameter table and back.
 *
 * Tensors keep the dtype and shape the file had; conversion to float32 for
 * the model happens in one place (ts_dict_to_f32). The dictionary owns every
 * name and data buffer. */
#ifndef TS_DICT_H
#define TS_DICT_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/status.h"
#include "kernels/tensor.h" /* ts_dtype, ts_dtype_size */

/* safetensors' dtype string ("F32", "F16", "BF16", "F64", "I64", "I32",
 * "U8"). ts_dtype_from_safetensors returns -1 if unknown. */
const char *ts_dtype_safetensors_name(ts_dtype t);
int ts_dtype_from_safetensors(const char *s);

#define TS_MAX_DIMS 8

typedef struct ts_named_tensor {
    char *name;
    ts_dtype dtype;
    int ndim;                      /* 0 for a scalar such as num_batches_tracked */
    int64_t shape[TS_MAX_DIMS];
    void *data;                    /* little-endian, contiguous, row-major */
    size_t nbytes;                 /* numel * ts_dtype_size(dtype) */
} ts_named_tensor;

typedef struct ts_kv {
    char *key, *value;
} ts_kv;

typedef struct ts_dict {
    ts_named_tensor *items;
    size_t count, cap;
    ts_kv *meta; /* string metadata (safetensors __metadata__, the model card) */
    size_t meta_count, meta_cap;
} ts_dict;

void ts_dict_init(ts_dict *d);
void ts_dict_free(ts_dict *d);
/* Copies name, shape and nbytes of data. A duplicate name is an error. */
ts_status ts_dict_add(ts_dict *d, const char *name, ts_dtype dtype, int ndim, const int64_t *shape, const void *data);
/* Takes ownership of data (allocated with malloc) instead of copying. */
ts_status ts_dict_add_owned(ts_dict *d, const char *name, ts_dtype dtype, int ndim, const int64_t *shape, void *data);
/* ts_dict_add_owned for a caller that has already made sure that name is not
 * in d (a file reader that checked all its names at once): skips the linear
 * duplicate search, so filling a dictionary of N tensors stays O(N). */
ts_status ts_dict_add_owned_unique(ts_dict *d, const char *name, ts_dtype dtype, int ndim, const int64_t *shape,
                                   void *data);
const ts_named_tensor *ts_dict_find(const ts_dict *d, const char *name);
/* Sets (or replaces) a metadata entry. */
ts_status ts_dict_set_meta(ts_dict *d, const char *key, const char *value);
const char *ts_dict_get_meta(const ts_dict *d, const char *key);
size_t ts_named_numel(const ts_named_tensor *t);
/* Converts t's values to float32 into out[numel] (F16/BF16/F64/I64/I32/U8 ->
 * F32). Integer values beyond 2^24 are an error, not a silent rounding. */
ts_status ts_named_to_f32(const ts_named_tensor *t, float *out);

#endif
