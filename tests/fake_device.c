#include "tests/fake_device.h"

#include <stdint.h>
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

static ts_status fake_alloc(void **p, size_t bytes)
{
    *p = NULL;
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

static ts_status fake_sync(void) { return TS_OK; }

static const ts_backend_memory fake_memory = {
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

static ts_status f_conv(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const ts_tensor *w, const float *bias,
                        const ts_conv2d_params *p)
{
    need_t(y);
    need_t(x);
    need_t(w);
    if (bias) need(bias, dims_ok(w) ? (size_t)w->n * sizeof(float) : 0);
    return cpu->conv2d_forward(ctx, y, x, w, bias, p);
}

static ts_status f_conv_bwd_data(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *w,
                                 const ts_conv2d_params *p)
{
    need_t(dx);
    need_t(dy);
    need_t(w);
    return cpu->conv2d_backward_data(ctx, dx, dy, w, p);
}

static ts_status f_conv_bwd_filter(ts_ctx *ctx, ts_tensor *dw, const ts_tensor *dy, const ts_tensor *x,
                                   const ts_conv2d_params *p)
{
    need_t(dw);
    need_t(dy);
    need_t(x);
    return cpu->conv2d_backward_filter(ctx, dw, dy, x, p);
}

static ts_status f_conv_bwd_bias(ts_ctx *ctx, float *dbias, const ts_tensor *dy)
{
    need(dbias, chan_bytes(dy));
    need_t(dy);
    return cpu->conv2d_backward_bias(ctx, dbias, dy);
}

static ts_status f_bn_train(ts_ctx *ctx, ts_tensor *y, float *save_mean, float *save_invstd, const ts_tensor *x,
                            const float *gamma, const float *beta, float *rm, float *rv, const ts_bn_params *p)
{
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
    return cpu->batchnorm_forward_eval(ctx, y, x, gamma, beta, rm, rv, p);
}

static ts_status f_bn_bwd(ts_ctx *ctx, ts_tensor *dx, float *dgamma, float *dbeta, const ts_tensor *dy,
                          const ts_tensor *x, const float *gamma, const float *save_mean, const float *save_invstd)
{
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
    return cpu->relu_forward(ctx, y, x);
}

static ts_status f_relu_bwd(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *y)
{
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
    return cpu->maxpool2d_forward(ctx, y, index, x, p);
}

static ts_status f_maxpool_bwd(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const int32_t *index,
                               const ts_pool2d_params *p)
{
    need_t(dx);
    need_t(dy);
    need(index, numel(dy) * sizeof(int32_t));
    return cpu->maxpool2d_backward(ctx, dx, dy, index, p);
}

static ts_status f_upsample(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    need_t(y);
    need_t(x);
    return cpu->upsample_nearest_forward(ctx, y, x);
}

static ts_status f_upsample_bwd(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy)
{
    need_t(dx);
    need_t(dy);
    return cpu->upsample_nearest_backward(ctx, dx, dy);
}

static ts_status f_concat(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    need_t(y);
    need_t(a);
    need_t(b);
    return cpu->concat_forward(ctx, y, a, b);
}

static ts_status f_concat_bwd(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy)
{
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
    return cpu->add_forward(ctx, y, a, b);
}

static ts_status f_add_bwd(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy)
{
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
    need_host(loss);
    need_t(logits);
    need(target, label_bytes(logits));
    if (p) need_host(p->class_weights);
    return cpu->cross_entropy_forward(ctx, loss, logits, target, p);
}

static ts_status f_ce_bwd(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits, const int32_t *target,
                          const ts_ce_params *p, float dloss)
{
    need_t(dlogits);
    need_t(logits);
    need(target, label_bytes(logits));
    if (p) need_host(p->class_weights);
    return cpu->cross_entropy_backward(ctx, dlogits, logits, target, p, dloss);
}

static ts_status f_dice(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                        const ts_dice_params *p)
{
    need_host(loss);
    need_t(logits);
    need(target, label_bytes(logits));
    if (p) need_host(p->class_weights);
    return cpu->dice_forward(ctx, loss, logits, target, p);
}

static ts_status f_dice_bwd(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits, const int32_t *target,
                            const ts_dice_params *p, float dloss)
{
    need_t(dlogits);
    need_t(logits);
    need(target, label_bytes(logits));
    if (p) need_host(p->class_weights);
    return cpu->dice_backward(ctx, dlogits, logits, target, p, dloss);
}

static ts_status f_adamw(ts_ctx *ctx, float *param, const float *grad, float *exp_avg, float *exp_avg_sq, size_t n,
                         const ts_adamw_step *s)
{
    size_t bytes = n * sizeof(float);
    need(param, bytes);
    need(grad, bytes);
    need(exp_avg, bytes);
    need(exp_avg_sq, bytes);
    return cpu->adamw_update(ctx, param, grad, exp_avg, exp_avg_sq, n, s);
}

static ts_status f_zero(ts_ctx *ctx, float *p, size_t n)
{
    need(p, n * sizeof(float));
    return cpu->zero(ctx, p, n);
}

static ts_status f_sum_squares(ts_ctx *ctx, double *sumsq, const float *x, size_t n)
{
    need_host(sumsq);
    need(x, n * sizeof(float));
    return cpu->sum_squares(ctx, sumsq, x, n);
}

static ts_status f_sum_squares_multi(ts_ctx *ctx, double *sumsq, const float *const *x, const size_t *n, int count)
{
    need_host(sumsq);
    need_host(x);
    need_host(n);
    for (int i = 0; x && n && i < count; i++) need(x[i], n[i] * sizeof(float));
    return cpu->sum_squares_multi(ctx, sumsq, x, n, count);
}

static ts_status f_scale(ts_ctx *ctx, float *x, size_t n, float a)
{
    need(x, n * sizeof(float));
    return cpu->scale(ctx, x, n, a);
}

static ts_status f_convert(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, int accumulate)
{
    need_t(y);
    need_t(x);
    return cpu->convert(ctx, y, x, accumulate);
}

static ts_backend fake_backend;

const ts_backend *tu_fake_device_backend(void)
{
    if (!cpu) {
        cpu = ts_backend_cpu();
        fake_backend = *cpu;
        fake_backend.name = "fake-device";
        fake_backend.memory = &fake_memory;
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

void tu_fake_reset_counts(void)
{
    long l = tu_fake.live;
    size_t lb = tu_fake.live_bytes;
    memset(&tu_fake, 0, sizeof tu_fake);
    tu_fake.live = l;
    tu_fake.live_bytes = lb;
}
