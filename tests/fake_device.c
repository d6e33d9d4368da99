#include "tests/fake_device.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

tu_fake_stats tu_fake;

/* Live allocations; a test holds a handful (weights, arena, input). */
#define MAX_LIVE 256
static struct {
    unsigned char *p;
    size_t n;
} live[MAX_LIVE];

static int find_live(const void *q, size_t bytes)
{
    const unsigned char *c = q;
    for (int i = 0; i < MAX_LIVE; i++)
        if (live[i].p && c >= live[i].p && c <= live[i].p + live[i].n && bytes <= (size_t)(live[i].p + live[i].n - c))
            return i;
    return -1;
}

/* Recording state (graphs, below). */
static int recording;

static ts_status recording_error(const char *what)
{
    return ts_error(TS_ERR_INVALID_ARG, "fake-device: %s while a graph is being recorded", what);
}

static ts_status fake_alloc(void **p, size_t bytes)
{
    *p = NULL;
    if (recording) return recording_error("alloc");
    tu_fake.allocs++;
    if (tu_fake.fail_alloc_at > 0 && --tu_fake.fail_alloc_at == 0)
        return ts_error(TS_ERR_NOMEM, "fake-device: alloc of %zu bytes failed on purpose", bytes);
    int slot = -1;
    for (int i = 0; i < MAX_LIVE && slot < 0; i++)
        if (!live[i].p) slot = i;
    if (slot < 0) return ts_error(TS_ERR_NOMEM, "fake-device: more than %d live allocations", MAX_LIVE);
    unsigned char *q = ts_aligned_alloc(bytes ? bytes : 1);
    if (!q) return ts_error(TS_ERR_NOMEM, "fake-device: out of memory for %zu bytes", bytes);
    /* All-ones bytes are a NaN in every float: reading a slot the graph has
     * not written yet poisons the logits instead of reading a harmless 0. */
    memset(q, 0xff, bytes ? bytes : 1);
    live[slot].p = q;
    live[slot].n = bytes;
    tu_fake.live++;
    tu_fake.live_bytes += bytes;
    *p = q;
    return TS_OK;
}

static void fake_free(void *p)
{
    if (!p) return;
    tu_fake.frees++;
    int i = find_live(p, 0);
    if (i < 0 || live[i].p != p) {
        tu_fake.bad_memory++; /* freeing something this backend did not allocate */
        return;
    }
    tu_fake.live--;
    tu_fake.live_bytes -= live[i].n;
    live[i].p = NULL;
    live[i].n = 0;
    ts_aligned_free(p);
}

static ts_status fake_upload(void *dst, const void *src, size_t bytes)
{
    if (recording) return recording_error("upload");
    tu_fake.uploads++;
    if (tu_fake.fail_upload_at > 0 && --tu_fake.fail_upload_at == 0)
        return ts_error(TS_ERR_BACKEND, "fake-device: upload of %zu bytes failed on purpose", bytes);
    if (find_live(dst, bytes) < 0 || find_live(src, 0) >= 0) {
        tu_fake.bad_memory++;
        return ts_error(TS_ERR_INVALID_ARG, "fake-device: upload of %zu bytes: destination is not device memory or "
                                            "source is not host memory", bytes);
    }
    tu_fake.upload_bytes += bytes;
    memcpy(dst, src, bytes);
    return TS_OK;
}

static ts_status fake_download(void *dst, const void *src, size_t bytes)
{
    if (recording) return recording_error("download");
    tu_fake.downloads++;
    if (find_live(src, bytes) < 0 || find_live(dst, 0) >= 0) {
        tu_fake.bad_memory++;
        return ts_error(TS_ERR_INVALID_ARG, "fake-device: download of %zu bytes: source is not device memory or "
                                            "destination is not host memory", bytes);
    }
    tu_fake.download_bytes += bytes;
    memcpy(dst, src, bytes);
    return TS_OK;
}

/* ---- pinned host memory, asynchronous downloads, fences ---- */

#define MAX_PINNED 16
static struct {
    unsigned char *p;
    size_t n;
} pinned[MAX_PINNED];

static int find_pinned(const void *q, size_t bytes)
{
    const unsigned char *c = q;
    for (int i = 0; i < MAX_PINNED; i++)
        if (pinned[i].p && c >= pinned[i].p && c <= pinned[i].p + pinned[i].n &&
            bytes <= (size_t)(pinned[i].p + pinned[i].n - c))
            return i;
    return -1;
}

/* Asynchronous copies not yet known to be done, numbered in queue order.
 * A download's data as it was when queued waits in shadow to be published
 * into host; an upload has already put its data on the "device" (the ops
 * after it run at once here), and shadow holds its source as it was then,
 * which must still be there, unchanged, when a fence after it is waited for
 * (a GPU would read it only when its queue got there). */
typedef struct pending_copy {
    unsigned char *host, *shadow;
    size_t n;
    unsigned long seq;
    int upload;
} pending_copy;
static pending_copy *pending;
static int n_pending, cap_pending;
static unsigned long copy_seq; /* the last copy queued */

typedef struct fake_fence {
    unsigned long seq; /* copies up to this one are before the fence; 0: never recorded */
} fake_fence;

/* Settles the pending copies with seq <= upto whose host side lies in
 * [lo, hi) (lo NULL: anywhere), in queue order: publishes a download (or
 * drops it: publish 0), checks an upload's source. Returns how many copies
 * it settled, and in *downloads (if not NULL) how many of them were
 * downloads. */
static int settle(unsigned long upto, const unsigned char *lo, const unsigned char *hi, int publish, int *downloads)
{
    int kept = 0, done = 0, down = 0;
    for (int i = 0; i < n_pending; i++) {
        pending_copy *c = &pending[i];
        if (c->seq <= upto && (!lo || (c->host >= lo && c->host < hi))) {
            if (c->upload && memcmp(c->host, c->shadow, c->n) != 0) tu_fake.async_src_changed++;
            if (publish && !c->upload) memcpy(c->host, c->shadow, c->n);
            free(c->shadow);
            done++;
            down += !c->upload;
        } else {
            pending[kept++] = *c;
        }
    }
    n_pending = kept;
    if (!n_pending) {
        free(pending);
        pending = NULL;
        cap_pending = 0;
    }
    if (downloads) *downloads = down;
    return done;
}

static ts_status fake_sync(void)
{
    if (recording) return recording_error("sync");
    settle(copy_seq, NULL, NULL, 1, NULL); /* everything queued is done */
    return TS_OK;
}

static ts_status fake_host_alloc(void **p, size_t bytes)
{
    *p = NULL;
    if (recording) return recording_error("host_alloc");
    tu_fake.host_allocs++;
    int slot = -1;
    for (int i = 0; i < MAX_PINNED && slot < 0; i++)
        if (!pinned[i].p) slot = i;
    if (slot < 0) return ts_error(TS_ERR_NOMEM, "fake-device: more than %d pinned buffers", MAX_PINNED);
    unsigned char *q = malloc(bytes ? bytes : 1);
    if (!q) return ts_error(TS_ERR_NOMEM, "fake-device: out of memory for %zu pinned bytes", bytes);
    memset(q, 0xff, bytes ? bytes : 1);
    pinned[slot].p = q;
    pinned[slot].n = bytes;
    tu_fake.host_live++;
    *p = q;
    return TS_OK;
}

static void fake_host_free(void *p)
{
    if (!p) return;
    tu_fake.host_frees++;
    int i = find_pinned(p, 0);
    if (i < 0 || pinned[i].p != p) {
        tu_fake.bad_memory++; /* not a host_alloc buffer */
        return;
    }
    /* A copy into it not waited for: its data would land in freed memory. */
    if (settle(copy_seq, pinned[i].p, pinned[i].p + pinned[i].n + 1, 0, NULL)) tu_fake.bad_memory++;
    free(pinned[i].p);
    pinned[i].p = NULL;
    pinned[i].n = 0;
    tu_fake.host_live--;
}

/* A pending copy whose host side is host, with a copy of data. */
static ts_status queue_copy(unsigned char *host, const void *data, size_t bytes, int upload)
{
    if (n_pending == cap_pending) {
        int cap = cap_pending ? 2 * cap_pending : 8;
        pending_copy *q = realloc(pending, (size_t)cap * sizeof *q);
        if (!q) return ts_error(TS_ERR_NOMEM, "fake-device: out of memory queueing a copy");
        pending = q;
        cap_pending = cap;
    }
    unsigned char *shadow = malloc(bytes ? bytes : 1);
    if (!shadow) return ts_error(TS_ERR_NOMEM, "fake-device: out of memory queueing a copy");
    memcpy(shadow, data, bytes);
    pending[n_pending++] = (pending_copy){host, shadow, bytes, ++copy_seq, upload};
    return TS_OK;
}

static ts_status fake_download_async(void *dst, const void *src, size_t bytes)
{
    if (recording) return recording_error("download_async");
    tu_fake.async_downloads++;
    if (find_live(src, bytes) < 0 || find_pinned(dst, bytes) < 0) {
        tu_fake.bad_memory++;
        return ts_error(TS_ERR_INVALID_ARG, "fake-device: download_async of %zu bytes: source is not device memory or "
                                            "destination is not host_alloc memory", bytes);
    }
    ts_status st = queue_copy(dst, src, bytes, 0);
    if (st) return st;
    memset(dst, 0xff, bytes); /* until a fence after it is waited for */
    tu_fake.async_download_bytes += bytes;
    return TS_OK;
}

static ts_status fake_upload_async(void *dst, const void *src, size_t bytes)
{
    if (recording) return recording_error("upload_async");
    tu_fake.async_uploads++;
    if (tu_fake.fail_upload_at > 0 && --tu_fake.fail_upload_at == 0)
        return ts_error(TS_ERR_BACKEND, "fake-device: upload_async of %zu bytes failed on purpose", bytes);
    if (find_live(dst, bytes) < 0 || find_pinned(src, bytes) < 0) {
        tu_fake.bad_memory++;
        return ts_error(TS_ERR_INVALID_ARG, "fake-device: upload_async of %zu bytes: destination is not device memory "
                                            "or source is not host_alloc memory", bytes);
    }
    ts_status st = queue_copy((unsigned char *)src, src, bytes, 1);
    if (st) return st;
    memcpy(dst, src, bytes);
    tu_fake.async_upload_bytes += bytes;
    return TS_OK;
}

static ts_status fake_fence_new(void **f)
{
    *f = NULL;
    if (recording) return recording_error("fence_new");
    fake_fence *q = calloc(1, sizeof *q);
    if (!q) return ts_error(TS_ERR_NOMEM, "fake-device: out of memory for a fence");
    tu_fake.fence_news++;
    tu_fake.fences_live++;
    *f = q;
    return TS_OK;
}

static ts_status fake_fence_record(void *f)
{
    if (recording) return recording_error("fence_record");
    if (!f) return ts_error(TS_ERR_INVALID_ARG, "fake-device: fence_record of a NULL fence");
    tu_fake.fence_records++;
    ((fake_fence *)f)->seq = copy_seq;
    return TS_OK;
}

static ts_status fake_fence_wait(void *f)
{
    if (recording) return recording_error("fence_wait");
    if (!f) return ts_error(TS_ERR_INVALID_ARG, "fake-device: fence_wait on a NULL fence");
    tu_fake.fence_waits++;
    if (tu_fake.fail_fence_wait_at > 0 && --tu_fake.fail_fence_wait_at == 0)
        return ts_error(TS_ERR_BACKEND, "fake-device: fence_wait failed on purpose");
    int done = 0;
    settle(((fake_fence *)f)->seq, NULL, NULL, 1, &done);
    if (done == 0) tu_fake.fence_waits_idle++;
    if (done > 1) tu_fake.fence_waits_multi++;
    return TS_OK;
}

static void fake_fence_free(void *f)
{
    if (!f) return;
    tu_fake.fence_frees++;
    tu_fake.fences_live--;
    free(f);
}

static const ts_backend_memory fake_memory = {
    .host = 0,
    .alloc = fake_alloc,
    .free = fake_free,
    .upload = fake_upload,
    .download = fake_download,
    .sync = fake_sync,
    .host_alloc = fake_host_alloc,
    .host_free = fake_host_free,
    .download_async = fake_download_async,
    .upload_async = fake_upload_async,
    .fence_new = fake_fence_new,
    .fence_record = fake_fence_record,
    .fence_wait = fake_fence_wait,
    .fence_free = fake_fence_free,
};

/* The same without the asynchronous members. */
static const ts_backend_memory fake_memory_sync = {
    .host = 0,
    .alloc = fake_alloc,
    .free = fake_free,
    .upload = fake_upload,
    .download = fake_download,
    .sync = fake_sync,
};

/* ---- every op, checked then run by the CPU backend ---- */

static const ts_backend *cpu;

/* p must point at `bytes` bytes inside one live allocation. */
static void need(const void *p, size_t bytes)
{
    if (find_live(p, bytes) < 0) tu_fake.foreign_ptrs++;
}

/* p must be host memory: NULL, or outside every live allocation. */
static void need_host(const void *p)
{
    if (p && find_live(p, 1) >= 0) tu_fake.foreign_ptrs++;
}

/* Sizes from a tensor the op may yet reject: 0 for a NULL tensor or a
 * dimension < 1 (the CPU op reports those), so a check never dereferences
 * NULL or turns a negative dimension into a huge size. */
static int dims_ok(const ts_tensor *t) { return t && t->n > 0 && t->c > 0 && t->h > 0 && t->w > 0; }
static size_t numel(const ts_tensor *t) { return dims_ok(t) ? ts_tensor_numel(t) : 0; }
static size_t chan_bytes(const ts_tensor *t) { return dims_ok(t) ? (size_t)t->c * sizeof(float) : 0; }
/* Labels: int32 [n, h, w] of the logits. */
static size_t label_bytes(const ts_tensor *t)
{
    return dims_ok(t) ? (size_t)t->n * t->h * t->w * sizeof(int32_t) : 0;
}

static void need_t(const ts_tensor *t) { need(t ? t->data : NULL, numel(t) * (t ? ts_dtype_size(t->dtype) : 0)); }

/* ---- graphs: one recorded op, by value ---- */

typedef enum rec_kind { R_CONV, R_BN_EVAL, R_RELU, R_ADD, R_MAXPOOL, R_UPSAMPLE, R_CONCAT, R_CONVERT } rec_kind;

typedef struct rec_op {
    rec_kind kind;
    ts_ctx *ctx;          /* the caller's: replays use its scratch */
    ts_tensor y, a, b;    /* output and inputs (w is b for a conv) */
    const float *v[4];    /* bias, or gamma, beta, running mean, running var */
    int32_t *index;       /* max-pool */
    ts_conv2d_params cp; /* cp.add is NULL here: the tensor it points to is z */
    ts_tensor z;         /* a conv's fused add (kept by value: the caller's struct is gone by a replay) */
    int has_z;
    ts_pool2d_params pp;
    ts_bn_params bp;
    int accumulate;       /* convert */
} rec_op;

typedef struct fake_graph {
    rec_op *ops;
    int n;
    unsigned long generation;
} fake_graph;

static rec_op *rec_ops;
static int rec_n, rec_cap, replaying;

static ts_status record(const rec_op *op)
{
    /* An op that fails while recording (on CUDA: its argument checks, or a
     * workspace that would have to grow). */
    if (tu_fake.fail_op_at > 0 && --tu_fake.fail_op_at == 0)
        return ts_error(TS_ERR_BACKEND, "fake-device: recording an op failed on purpose");
    if (rec_n == rec_cap) {
        int cap = rec_cap ? 2 * rec_cap : 64;
        rec_op *q = realloc(rec_ops, (size_t)cap * sizeof *q);
        if (!q) return ts_error(TS_ERR_NOMEM, "fake-device: out of memory recording an op");
        rec_ops = q;
        rec_cap = cap;
    }
    rec_ops[rec_n++] = *op;
    tu_fake.ops_recorded++;
    return TS_OK;
}

/* Before a forward op runs (not while recording): the injected failure,
 * and the count of direct calls. */
static ts_status direct(const char *op)
{
    if (tu_fake.fail_op_at > 0 && --tu_fake.fail_op_at == 0)
        return ts_error(TS_ERR_BACKEND, "fake-device: %s failed on purpose", op);
    if (!replaying) tu_fake.ops_direct++;
    return TS_OK;
}

#define RECORDING_REFUSES(name) \
    if (recording) return recording_error(name " (it cannot be recorded)")

static ts_status f_conv(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const ts_tensor *w, const float *bias,
                        const ts_conv2d_params *p)
{
    need_t(y);
    need_t(x);
    need_t(w);
    if (bias) need(bias, dims_ok(w) ? (size_t)w->n * sizeof(float) : 0);
    if (p && p->add) need_t(p->add);
    if (recording) {
        rec_op o = {.kind = R_CONV, .ctx = ctx, .y = *y, .a = *x, .b = *w, .v = {bias}, .cp = *p};
        if (p->add) {
            o.z = *p->add;
            o.has_z = 1;
            o.cp.add = NULL;
        }
        return record(&o);
    }
    ts_status st = direct("conv2d_forward");
    if (st) return st;
    tu_fake.convs_run++;
    if (p && p->add) tu_fake.convs_add++;
    return cpu->conv2d_forward(ctx, y, x, w, bias, p);
}

static ts_status f_conv_bwd_data(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *w,
                                 const ts_conv2d_params *p)
{
    RECORDING_REFUSES("conv2d_backward_data");
    need_t(dx);
    need_t(dy);
    need_t(w);
    return cpu->conv2d_backward_data(ctx, dx, dy, w, p);
}

static ts_status f_conv_bwd_filter(ts_ctx *ctx, ts_tensor *dw, const ts_tensor *dy, const ts_tensor *x,
                                   const ts_conv2d_params *p)
{
    RECORDING_REFUSES("conv2d_backward_filter");
    need_t(dw);
    need_t(dy);
    need_t(x);
    return cpu->conv2d_backward_filter(ctx, dw, dy, x, p);
}

static ts_status f_conv_bwd_bias(ts_ctx *ctx, float *dbias, const ts_tensor *dy)
{
    RECORDING_REFUSES("conv2d_backward_bias");
    need(dbias, chan_bytes(dy));
    need_t(dy);
    return cpu->conv2d_backward_bias(ctx, dbias, dy);
}

static ts_status f_bn_train(ts_ctx *ctx, ts_tensor *y, float *save_mean, float *save_invstd, const ts_tensor *x,
                            const float *gamma, const float *beta, float *rm, float *rv, const ts_bn_params *p)
{
    RECORDING_REFUSES("batchnorm_forward_train");
    size_t c = chan_bytes(x);
    need_t(y);
    need(save_mean, c);
    need(save_invstd, c);
    need_t(x);
    need(gamma, c);
    need(beta, c);
    if (rm) need(rm, c);
    if (rv) need(rv, c);
    return cpu->batchnorm_forward_train(ctx, y, save_mean, save_invstd, x, gamma, beta, rm, rv, p);
}

static ts_status f_bn_eval(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const float *gamma, const float *beta,
                           const float *rm, const float *rv, const ts_bn_params *p)
{
    size_t c = chan_bytes(x);
    need_t(y);
    need_t(x);
    need(gamma, c);
    need(beta, c);
    need(rm, c);
    need(rv, c);
    if (recording)
        return record(&(rec_op){.kind = R_BN_EVAL, .ctx = ctx, .y = *y, .a = *x, .v = {gamma, beta, rm, rv}, .bp = *p});
    ts_status st = direct("batchnorm_forward_eval");
    return st ? st : cpu->batchnorm_forward_eval(ctx, y, x, gamma, beta, rm, rv, p);
}

static ts_status f_bn_bwd(ts_ctx *ctx, ts_tensor *dx, float *dgamma, float *dbeta, const ts_tensor *dy,
                          const ts_tensor *x, const float *gamma, const float *save_mean, const float *save_invstd)
{
    RECORDING_REFUSES("batchnorm_backward");
    size_t c = chan_bytes(x);
    need_t(dx);
    need(dgamma, c);
    need(dbeta, c);
    need_t(dy);
    need_t(x);
    need(gamma, c);
    need(save_mean, c);
    need(save_invstd, c);
    return cpu->batchnorm_backward(ctx, dx, dgamma, dbeta, dy, x, gamma, save_mean, save_invstd);
}

static ts_status f_relu(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    need_t(y);
    need_t(x);
    if (recording) return record(&(rec_op){.kind = R_RELU, .ctx = ctx, .y = *y, .a = *x});
    ts_status st = direct("relu_forward");
    return st ? st : cpu->relu_forward(ctx, y, x);
}

static ts_status f_relu_bwd(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *y)
{
    RECORDING_REFUSES("relu_backward");
    need_t(dx);
    need_t(dy);
    need_t(y);
    return cpu->relu_backward(ctx, dx, dy, y);
}

static ts_status f_maxpool(ts_ctx *ctx, ts_tensor *y, int32_t *index, const ts_tensor *x, const ts_pool2d_params *p)
{
    need_t(y);
    need(index, numel(y) * sizeof(int32_t));
    need_t(x);
    if (recording) return record(&(rec_op){.kind = R_MAXPOOL, .ctx = ctx, .y = *y, .a = *x, .index = index, .pp = *p});
    ts_status st = direct("maxpool2d_forward");
    return st ? st : cpu->maxpool2d_forward(ctx, y, index, x, p);
}

static ts_status f_maxpool_bwd(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const int32_t *index,
                               const ts_pool2d_params *p)
{
    RECORDING_REFUSES("maxpool2d_backward");
    need_t(dx);
    need_t(dy);
    need(index, numel(dy) * sizeof(int32_t));
    return cpu->maxpool2d_backward(ctx, dx, dy, index, p);
}

static ts_status f_upsample(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    need_t(y);
    need_t(x);
    if (recording) return record(&(rec_op){.kind = R_UPSAMPLE, .ctx = ctx, .y = *y, .a = *x});
    ts_status st = direct("upsample_nearest_forward");
    return st ? st : cpu->upsample_nearest_forward(ctx, y, x);
}

static ts_status f_upsample_bwd(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy)
{
    RECORDING_REFUSES("upsample_nearest_backward");
    need_t(dx);
    need_t(dy);
    return cpu->upsample_nearest_backward(ctx, dx, dy);
}

static ts_status f_concat(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    need_t(y);
    need_t(a);
    need_t(b);
    if (recording) return record(&(rec_op){.kind = R_CONCAT, .ctx = ctx, .y = *y, .a = *a, .b = *b});
    ts_status st = direct("concat_forward");
    return st ? st : cpu->concat_forward(ctx, y, a, b);
}

static ts_status f_concat_bwd(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy)
{
    RECORDING_REFUSES("concat_backward");
    need_t(da);
    need_t(db);
    need_t(dy);
    return cpu->concat_backward(ctx, da, db, dy);
}

static ts_status f_add(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    need_t(y);
    need_t(a);
    need_t(b);
    if (recording) return record(&(rec_op){.kind = R_ADD, .ctx = ctx, .y = *y, .a = *a, .b = *b});
    ts_status st = direct("add_forward");
    if (st) return st;
    tu_fake.adds_run++;
    return cpu->add_forward(ctx, y, a, b);
}

static ts_status f_add_bwd(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy)
{
    RECORDING_REFUSES("add_backward");
    need_t(da);
    need_t(db);
    need_t(dy);
    return cpu->add_backward(ctx, da, db, dy);
}

/* The losses: logits and labels on the device; the loss result and the class
 * weights (in the params) on the host. */
static ts_status f_ce(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                      const ts_ce_params *p)
{
    RECORDING_REFUSES("cross_entropy_forward");
    need_host(loss);
    need_t(logits);
    need(target, label_bytes(logits));
    if (p) need_host(p->class_weights);
    return cpu->cross_entropy_forward(ctx, loss, logits, target, p);
}

static ts_status f_ce_bwd(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits, const int32_t *target,
                          const ts_ce_params *p, float dloss)
{
    RECORDING_REFUSES("cross_entropy_backward");
    need_t(dlogits);
    need_t(logits);
    need(target, label_bytes(logits));
    if (p) need_host(p->class_weights);
    return cpu->cross_entropy_backward(ctx, dlogits, logits, target, p, dloss);
}

static ts_status f_dice(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                        const ts_dice_params *p)
{
    RECORDING_REFUSES("dice_forward");
    need_host(loss);
    need_t(logits);
    need(target, label_bytes(logits));
    if (p) need_host(p->class_weights);
    return cpu->dice_forward(ctx, loss, logits, target, p);
}

static ts_status f_dice_bwd(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits, const int32_t *target,
                            const ts_dice_params *p, float dloss)
{
    RECORDING_REFUSES("dice_backward");
    need_t(dlogits);
    need_t(logits);
    need(target, label_bytes(logits));
    if (p) need_host(p->class_weights);
    return cpu->dice_backward(ctx, dlogits, logits, target, p, dloss);
}

static ts_status f_adamw(ts_ctx *ctx, float *param, const float *grad, float *exp_avg, float *exp_avg_sq, size_t n,
                         const ts_adamw_step *s)
{
    RECORDING_REFUSES("adamw_update");
    size_t bytes = n * sizeof(float);
    need(param, bytes);
    need(grad, bytes);
    need(exp_avg, bytes);
    need(exp_avg_sq, bytes);
    return cpu->adamw_update(ctx, param, grad, exp_avg, exp_avg_sq, n, s);
}

static ts_status f_zero(ts_ctx *ctx, float *p, size_t n)
{
    RECORDING_REFUSES("zero");
    need(p, n * sizeof(float));
    return cpu->zero(ctx, p, n);
}

static ts_status f_sum_squares(ts_ctx *ctx, double *sumsq, const float *x, size_t n)
{
    RECORDING_REFUSES("sum_squares");
    need_host(sumsq);
    need(x, n * sizeof(float));
    return cpu->sum_squares(ctx, sumsq, x, n);
}

static ts_status f_sum_squares_multi(ts_ctx *ctx, double *sumsq, const float *const *x, const size_t *n, int count)
{
    RECORDING_REFUSES("sum_squares_multi");
    need_host(sumsq);
    need_host(x);
    need_host(n);
    for (int i = 0; x && n && i < count; i++) need(x[i], n[i] * sizeof(float));
    return cpu->sum_squares_multi(ctx, sumsq, x, n, count);
}

static ts_status f_scale(ts_ctx *ctx, float *x, size_t n, float a)
{
    RECORDING_REFUSES("scale");
    need(x, n * sizeof(float));
    return cpu->scale(ctx, x, n, a);
}

static ts_status f_convert(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, int accumulate)
{
    need_t(y);
    need_t(x);
    if (recording) return record(&(rec_op){.kind = R_CONVERT, .ctx = ctx, .y = *y, .a = *x, .accumulate = accumulate});
    ts_status st = direct("convert");
    return st ? st : cpu->convert(ctx, y, x, accumulate);
}

/* ---- graphs ---- */

static ts_status g_begin(void)
{
    if (recording) return recording_error("begin");
    recording = 1;
    rec_n = 0;
    tu_fake.graph_begins++;
    return TS_OK;
}

static ts_status g_end(void **out)
{
    *out = NULL;
    if (!recording) return ts_error(TS_ERR_INVALID_ARG, "fake-device: end without begin");
    recording = 0;
    /* As CUDA's end of a capture that a library invalidated: recording
     * stops, nothing is kept. */
    if (tu_fake.fail_graph_end_at > 0 && --tu_fake.fail_graph_end_at == 0) {
        rec_n = 0;
        return ts_error(TS_ERR_BACKEND, "fake-device: ending the recording failed on purpose");
    }
    fake_graph *g = calloc(1, sizeof *g);
    if (!g) return ts_error(TS_ERR_NOMEM, "fake-device: out of memory ending a recording");
    g->n = rec_n;
    g->generation = tu_fake.graph_generation;
    if (rec_n) {
        g->ops = malloc((size_t)rec_n * sizeof *g->ops);
        if (!g->ops) {
            free(g);
            return ts_error(TS_ERR_NOMEM, "fake-device: out of memory ending a recording");
        }
        memcpy(g->ops, rec_ops, (size_t)rec_n * sizeof *g->ops);
    }
    rec_n = 0;
    free(rec_ops); /* one recording at a time: nothing to keep between them */
    rec_ops = NULL;
    rec_cap = 0;
    tu_fake.graph_records++;
    tu_fake.graph_live++;
    *out = g;
    return TS_OK;
}

static ts_status g_launch(void *graph, int *stale)
{
    *stale = 0;
    if (recording) return recording_error("launch");
    const fake_graph *g = graph;
    if (g->generation != tu_fake.graph_generation) {
        *stale = 1;
        return TS_OK;
    }
    tu_fake.graph_launches++;
    replaying = 1;
    ts_status st = TS_OK;
    for (int i = 0; i < g->n && st == TS_OK; i++) {
        rec_op o = g->ops[i]; /* the wrappers take non-const tensors */
        switch (o.kind) {
        case R_CONV:
            if (o.has_z) o.cp.add = &o.z;
            st = f_conv(o.ctx, &o.y, &o.a, &o.b, o.v[0], &o.cp);
            break;
        case R_BN_EVAL: st = f_bn_eval(o.ctx, &o.y, &o.a, o.v[0], o.v[1], o.v[2], o.v[3], &o.bp); break;
        case R_RELU: st = f_relu(o.ctx, &o.y, &o.a); break;
        case R_ADD: st = f_add(o.ctx, &o.y, &o.a, &o.b); break;
        case R_MAXPOOL: st = f_maxpool(o.ctx, &o.y, o.index, &o.a, &o.pp); break;
        case R_UPSAMPLE: st = f_upsample(o.ctx, &o.y, &o.a); break;
        case R_CONCAT: st = f_concat(o.ctx, &o.y, &o.a, &o.b); break;
        case R_CONVERT: st = f_convert(o.ctx, &o.y, &o.a, o.accumulate); break;
        }
    }
    replaying = 0;
    return st;
}

static void g_free(void *graph)
{
    if (!graph) return;
    fake_graph *g = graph;
    free(g->ops);
    free(g);
    tu_fake.graph_frees++;
    tu_fake.graph_live--;
}

static const ts_backend_graphs fake_graphs = {g_begin, g_end, g_launch, g_free};

static ts_backend fake_backend;

const ts_backend *tu_fake_device_backend(void)
{
    if (!cpu) {
        cpu = ts_backend_cpu();
        fake_backend = *cpu;
        fake_backend.name = "fake-device";
        fake_backend.memory = &fake_memory;
        fake_backend.graphs = &fake_graphs;
        fake_backend.conv2d_forward = f_conv;
        fake_backend.conv2d_backward_data = f_conv_bwd_data;
        fake_backend.conv2d_backward_filter = f_conv_bwd_filter;
        fake_backend.conv2d_backward_bias = f_conv_bwd_bias;
        fake_backend.batchnorm_forward_train = f_bn_train;
        fake_backend.batchnorm_forward_eval = f_bn_eval;
        fake_backend.batchnorm_backward = f_bn_bwd;
        fake_backend.relu_forward = f_relu;
        fake_backend.relu_backward = f_relu_bwd;
        fake_backend.maxpool2d_forward = f_maxpool;
        fake_backend.maxpool2d_backward = f_maxpool_bwd;
        fake_backend.upsample_nearest_forward = f_upsample;
        fake_backend.upsample_nearest_backward = f_upsample_bwd;
        fake_backend.concat_forward = f_concat;
        fake_backend.concat_backward = f_concat_bwd;
        fake_backend.add_forward = f_add;
        fake_backend.add_backward = f_add_bwd;
        fake_backend.cross_entropy_forward = f_ce;
        fake_backend.cross_entropy_backward = f_ce_bwd;
        fake_backend.dice_forward = f_dice;
        fake_backend.dice_backward = f_dice_bwd;
        fake_backend.adamw_update = f_adamw;
        fake_backend.zero = f_zero;
        fake_backend.sum_squares = f_sum_squares;
        fake_backend.sum_squares_multi = f_sum_squares_multi;
        fake_backend.scale = f_scale;
        fake_backend.convert = f_convert;
    }
    return &fake_backend;
}

void tu_fake_device_set_async(int on)
{
    tu_fake_device_backend();
    fake_backend.memory = on ? &fake_memory : &fake_memory_sync;
}

void tu_fake_reset_counts(void)
{
    long l = tu_fake.live, gl = tu_fake.graph_live, hl = tu_fake.host_live, fl = tu_fake.fences_live;
    size_t lb = tu_fake.live_bytes;
    unsigned long gen = tu_fake.graph_generation;
    memset(&tu_fake, 0, sizeof tu_fake);
    tu_fake.live = l;
    tu_fake.live_bytes = lb;
    tu_fake.graph_live = gl;
    tu_fake.graph_generation = gen;
    tu_fake.host_live = hl;
    tu_fake.fences_live = fl;
}
