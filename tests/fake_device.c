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

/* ---- the inference ops, checked then run by the CPU backend ---- */

static const ts_backend *cpu;

static void need(const void *p, size_t bytes)
{
    if (find_live(p, bytes) < 0) tu_fake.foreign_ptrs++;
}

static void need_t(const ts_tensor *t) { need(t->data, ts_tensor_numel(t) * sizeof(float)); }

static ts_status f_conv(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const ts_tensor *w, const float *bias,
                        const ts_conv2d_params *p)
{
    need_t(y);
    need_t(x);
    need_t(w);
    if (bias) need(bias, (size_t)w->n * sizeof(float));
    return cpu->conv2d_forward(ctx, y, x, w, bias, p);
}

static ts_status f_bn_eval(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const float *gamma, const float *beta,
                           const float *rm, const float *rv, const ts_bn_params *p)
{
    size_t c = (size_t)x->c * sizeof(float);
    need_t(y);
    need_t(x);
    need(gamma, c);
    need(beta, c);
    need(rm, c);
    need(rv, c);
    return cpu->batchnorm_forward_eval(ctx, y, x, gamma, beta, rm, rv, p);
}

static ts_status f_relu(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    need_t(y);
    need_t(x);
    return cpu->relu_forward(ctx, y, x);
}

static ts_status f_add(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    need_t(y);
    need_t(a);
    need_t(b);
    return cpu->add_forward(ctx, y, a, b);
}

static ts_status f_maxpool(ts_ctx *ctx, ts_tensor *y, int32_t *index, const ts_tensor *x, const ts_pool2d_params *p)
{
    need_t(y);
    need_t(x);
    need(index, ts_tensor_numel(y) * sizeof(int32_t));
    return cpu->maxpool2d_forward(ctx, y, index, x, p);
}

static ts_status f_upsample(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    need_t(y);
    need_t(x);
    return cpu->upsample_nearest_forward(ctx, y, x);
}

static ts_status f_concat(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    need_t(y);
    need_t(a);
    need_t(b);
    return cpu->concat_forward(ctx, y, a, b);
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
        fake_backend.batchnorm_forward_eval = f_bn_eval;
        fake_backend.relu_forward = f_relu;
        fake_backend.add_forward = f_add;
        fake_backend.maxpool2d_forward = f_maxpool;
        fake_backend.upsample_nearest_forward = f_upsample;
        fake_backend.concat_forward = f_concat;
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
