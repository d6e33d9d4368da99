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
 * the memory interface has no context argument.
 *
 * The asynchronous members (host_alloc, download_async, fences) behave as a
 * GPU's would as far as the host can tell: host_alloc memory is tracked as
 * pinned HOST memory (a valid host side of any copy, never a device
 * pointer); download_async must go from device memory into it, takes the
 * data at once (the ops here have all run by then, as they would have in
 * stream order) into a private shadow and fills the destination with
 * all-ones bytes (NaN), and only a fence_wait on a fence recorded after it
 * (or sync) puts the data there. Reading before waiting, or waiting on the
 * wrong fence, reads NaNs. upload_async must go from host_alloc memory into
 * device memory; it copies at once (later ops need the data), and the
 * fence_wait (or sync) that settles it checks that its source still holds
 * what it held when queued: a change in between, which on a GPU would be
 * uploaded instead, counts in async_src_changed. host_free of a buffer
 * with a copy not yet waited for counts in bad_memory. */
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
    long fail_upload_at;           /* same for uploads (upload and upload_async) */
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
    /* Forward convs and adds run (directly or by a launch), and the convs
     * among them with a fused add (a ResNet block's shortcut). */
    long convs_run, convs_add, adds_run;
    /* Asynchronous members: calls, and pinned buffers / fences not yet freed. */
    long host_allocs, host_frees, host_live;
    long async_downloads, async_uploads;
    size_t async_download_bytes, async_upload_bytes;
    long async_src_changed; /* upload_async sources changed before their fence was waited for */
    long fence_news, fence_records, fence_waits, fence_frees, fences_live;
    /* Waits that put no download in place (the copy they were for was
     * already there, or is not before the fence), and waits that put
     * several (waiting on a later fence than needed: correct, but on a GPU
     * the host then waits for the next batch's compute too). */
    long fence_waits_idle, fence_waits_multi;
    long fail_fence_wait_at;       /* > 0: the fail_fence_wait_at-th fence_wait from now fails */
    long fail_graph_end_at;        /* > 0: the fail_graph_end_at-th graph end from now fails (recording stops) */
} tu_fake_stats;

extern tu_fake_stats tu_fake;

/* The table ("fake-device"). */
const ts_backend *tu_fake_device_backend(void);
/* Zeroes the counters and the failure triggers (not the live allocations). */
void tu_fake_reset_counts(void);
/* 1 (the default, as CUDA): the memory offers the asynchronous members;
 * 0: it leaves them NULL, as a backend without them would. */
void tu_fake_device_set_async(int on);

#endif
