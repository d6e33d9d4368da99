#include "arena.h"

#include <stdio.h>
#include <string.h>

#include "backend.h"

void ts_arena_init(ts_arena *a) { memset(a, 0, sizeof *a); }

ts_status ts_arena_plan(ts_arena *a, size_t bytes, size_t *offset)
{
    if (a->base)
        return ts_error(TS_ERR_INVALID_ARG,
                        "arena: cannot plan %zu more bytes after commit; reset the arena and plan again for the new shape",
                        bytes);
    size_t rounded = (bytes + TS_ALIGN - 1) / TS_ALIGN * TS_ALIGN;
    if (rounded < bytes || a->planned + rounded < a->planned)
        return ts_error(TS_ERR_INVALID_ARG, "arena: plan of %zu bytes overflows size_t", bytes);
    *offset = a->planned;
    a->planned += rounded;
    a->slots++;
    return TS_OK;
}

ts_status ts_arena_plan_tensor(ts_arena *a, int n, int c, int h, int w, size_t *offset)
{
    if (n < 1 || c < 1 || h < 1 || w < 1)
        return ts_error(TS_ERR_INVALID_ARG, "arena: cannot plan tensor [%d,%d,%d,%d]: every dimension must be >= 1", n,
                        c, h, w);
    return ts_arena_plan(a, (size_t)n * c * h * w * sizeof(float), offset);
}

ts_status ts_arena_commit(ts_arena *a)
{
    if (a->base) return ts_error(TS_ERR_INVALID_ARG, "arena: already committed");
    a->base = ts_aligned_alloc(a->planned);
    if (!a->base)
        return ts_error(TS_ERR_NOMEM, "arena: out of memory allocating %.1f MiB for %zu buffers",
                        (double)a->planned / (1 << 20), a->slots);
    memset(a->base, 0, a->planned);
    return TS_OK;
}

ts_status ts_arena_commit_on(ts_arena *a, const ts_backend_memory *mem)
{
    if (!mem) return ts_error(TS_ERR_INVALID_ARG, "arena: commit_on needs a backend memory interface");
    if (a->base) return ts_error(TS_ERR_INVALID_ARG, "arena: already committed");
    void *p = NULL;
    ts_status st = mem->alloc(&p, a->planned);
    if (st == TS_OK && !p && a->planned)
        st = ts_error(TS_ERR_NOMEM, "arena: the backend returned no memory for %zu bytes", a->planned);
    if (st != TS_OK) {
        if (p) mem->free(p);
        char why[512]; /* the message buffer cannot be both format argument and destination */
        snprintf(why, sizeof why, "%s", ts_last_error());
        return ts_error(st, "arena: allocating %.1f MiB for %zu buffers on the backend: %s",
                        (double)a->planned / (1 << 20), a->slots, why);
    }
    a->base = p;
    a->mem = mem;
    return TS_OK;
}

void *ts_arena_at(const ts_arena *a, size_t offset) { return a->base + offset; }

ts_tensor ts_arena_tensor(const ts_arena *a, size_t offset, int n, int c, int h, int w)
{
    return ts_tensor_view((float *)(void *)(a->base + offset), n, c, h, w);
}

ts_tensor ts_arena_tensor_as(const ts_arena *a, size_t offset, ts_dtype dtype, int n, int c, int h, int w)
{
    return ts_tensor_view_as(a->base + offset, dtype, n, c, h, w);
}

void ts_arena_reset(ts_arena *a)
{
    if (a->mem)
        a->mem->free(a->base);
    else
        ts_aligned_free(a->base);
    memset(a, 0, sizeof *a);
}
