/* libFuzzer target for the safetensors reader (weights/safetensors.c).
 *
 * Any input must be either refused with a message or accepted; an accepted
 * one must survive a round trip: serialize -> parse gives the same tensors
 * and metadata, and serializing again gives the same bytes (the writer's
 * output is a fixed point). Sanitizers catch the memory errors. */
// fuzz-sources: weights/safetensors.c weights/dict.c kernels/status.c kernels/tensor.c kernels/outfile.c
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "weights/safetensors.h"

static void check(int ok)
{
    if (!ok) __builtin_trap();
}

static void same_dicts(const ts_dict *a, const ts_dict *b)
{
    check(a->count == b->count && a->meta_count == b->meta_count);
    for (size_t i = 0; i < a->count; i++) {
        const ts_named_tensor *x = &a->items[i], *y = ts_dict_find(b, x->name);
        check(y != NULL);
        check(x->dtype == y->dtype && x->ndim == y->ndim && x->nbytes == y->nbytes);
        check(memcmp(x->shape, y->shape, sizeof(int64_t) * (size_t)x->ndim) == 0);
        check(x->nbytes == 0 || memcmp(x->data, y->data, x->nbytes) == 0);
        check(x->nbytes == ts_named_numel(x) * ts_dtype_size(x->dtype));
    }
    for (size_t i = 0; i < a->meta_count; i++)
        check(strcmp(a->meta[i].key, b->meta[i].key) == 0 && strcmp(a->meta[i].value, b->meta[i].value) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ts_dict d;
    ts_clear_error();
    if (ts_safetensors_parse(data, size, "fuzz", &d) != TS_OK) {
        check(d.count == 0 && d.items == NULL && d.meta_count == 0 && ts_last_error()[0] != '\0');
        return 0;
    }
    unsigned char *buf = NULL, *buf2 = NULL;
    size_t len = 0, len2 = 0;
    check(ts_safetensors_serialize(&d, &buf, &len) == TS_OK);
    ts_dict e;
    check(ts_safetensors_parse(buf, len, "fuzz-roundtrip", &e) == TS_OK);
    same_dicts(&d, &e);
    check(ts_safetensors_serialize(&e, &buf2, &len2) == TS_OK);
    check(len == len2 && memcmp(buf, buf2, len) == 0);
    free(buf);
    free(buf2);
    ts_dict_free(&e);
    ts_dict_free(&d);
    return 0;
}
