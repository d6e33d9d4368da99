/* An arena planned once per input shape, then allocated in one block.
 *
 * Use: ts_arena_plan() every buffer a step needs (activations, saved
 * statistics, gradients) and keep the offsets it returns; ts_arena_commit()
 * makes one aligned allocation of the planned size; ts_arena_at() turns an
 * offset into a pointer. When the input shape changes, ts_arena_reset() and
 * plan again. There is no per-step malloc and no fragmentation, and the total
 * is known (and can be reported) before the first step runs. */
#ifndef TS_ARENA_H
#define TS_ARENA_H

#include <stddef.h>

#include "status.h"
#include "tensor.h"

struct ts_backend_memory; /* kernels/backend.h */

typedef struct ts_arena {
    unsigned char *base; /* NULL until committed */
    size_t planned;      /* bytes planned so far (each slot rounded to TS_ALIGN) */
    size_t slots;        /* number of planned slots, for reporting */
    const struct ts_backend_memory *mem; /* where base lives: NULL for host memory */
} ts_arena;

void ts_arena_init(ts_arena *a);
/* Reserves an aligned slot of `bytes` and stores its offset in *offset.
 * Fails once the arena is committed: plans are fixed per shape. */
ts_status ts_arena_plan(ts_arena *a, size_t bytes, size_t *offset);
/* Same for a float tensor of the given shape. */
ts_status ts_arena_plan_tensor(ts_arena *a, int n, int c, int h, int w, size_t *offset);
/* Allocates the planned bytes at once, zero-filled. */
ts_status ts_arena_commit(ts_arena *a);
/* Allocates the planned bytes in a backend's memory (mem->alloc, freed by
 * ts_arena_reset through mem->free). Not zero-filled: that memory may not be
 * host-writable, so every slot must be written before it is read. Offsets,
 * ts_arena_at and ts_arena_tensor work as for a host arena, but the pointers
 * they give are the backend's: only its ops may dereference them. */
ts_status ts_arena_commit_on(ts_arena *a, const struct ts_backend_memory *mem);
/* Pointer to a planned slot (committed arenas only). */
void *ts_arena_at(const ts_arena *a, size_t offset);
/* A tensor view of a planned slot. */
ts_tensor ts_arena_tensor(const ts_arena *a, size_t offset, int n, int c, int h, int w);
/* The same with an element type (kernels/tensor.h). */
ts_tensor ts_arena_tensor_as(const ts_arena *a, size_t offset, ts_dtype dtype, int n, int c, int h, int w);
/* Frees the block and forgets the plan. */
void ts_arena_reset(ts_arena *a);

#endif
