/* A "separate-memory CPU" backend for tests: the CPU ops with a memory
 * interface that claims to be device memory (host = 0), so that code written
 * for a GPU backend (ts_unet_device, predict's device path) runs, and can
 * fail, on a machine without one.
 *
 * Its allocations are distinct host buffers filled with a NaN pattern (a read
 * before a write shows up in the results); uploads and downloads count calls
 * and bytes and check that the backend side of each copy lies inside a live
 * allocation and the host side does not; every op checks that every device
 * pointer it gets (tensors, per-channel vectors, pool indices, labels,
 * optimizer buffers) lies inside a live allocation, and that the pointers the
 * table keeps on the host (a loss or sum-of-squares result, the class
 * weights) do not: either mistake is counted in foreign_ptrs. Allocations and
 * uploads can be made to fail on purpose. The state is process-wide, as
 * the memory interface has no context argument. */
#ifndef TS_TEST_FAKE_DEVICE_H
#define TS_TEST_FAKE_DEVICE_H

#include <stddef.h>

#include "kernels/backend.h"

typedef struct tu_fake_stats {
    long allocs, frees, live;      /* calls, and allocations not yet freed */
    size_t live_bytes;
    long uploads, downloads;       /* calls */
    size_t upload_bytes, download_bytes;
    long bad_memory;               /* a copy with a side in the wrong memory, or a free of a foreign pointer */
    long foreign_ptrs;             /* an op given a device pointer outside every live allocation, or a host one inside */
    long fail_alloc_at;            /* > 0: the fail_alloc_at-th alloc from now fails (1: the next) */
    long fail_upload_at;           /* same for uploads */
    /* Graphs (kernels/backend.h): the forward ops (conv, eval BN, ReLU,
     * add, max-pool, upsample, concat, convert) are recorded between begin
     * and end instead of run, and a launch replays them through the same
     * checked wrappers; any other op, and the memory interface, fail while
     * recording, as on CUDA. */
    long graph_begins, graph_records, graph_launches, graph_frees, graph_live;
    long ops_recorded;             /* op calls recorded instead of run */
    long ops_direct;               /* forward op calls run directly (not by a launch) */
    long fail_op_at;               /* > 0: the fail_op_at-th forward op call from now fails */
    unsigned long graph_generation; /* bump it: recordings made before are stale */
} tu_fake_stats;

extern tu_fake_stats tu_fake;

/* The table ("fake-device"). */
const ts_backend *tu_fake_device_backend(void);
/* Zeroes the counters and the failure triggers (not the live allocations). */
void tu_fake_reset_counts(void);

#endif
