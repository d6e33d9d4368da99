/* The U-Net's device copy for inference (ts_unet_device, nn/unet.h), on a
 * "separate-memory CPU" backend (tests/fake_device.h): the CPU ops with a
 * memory interface whose buffers are distinct from the model's, whose copies
 * are counted and checked, and whose ops refuse nothing but count every
 * pointer that is not in that memory. So without a GPU:
 *   - the device forward equals ts_unet_forward_folded bit for bit (odd
 *     H/W, batch 2; with decoder BN and without, where the head and the
 *     decoder convs keep their own biases; a second shape after the first);
 *   - every pointer an op receives lies in the backend's memory (no host
 *     weight or activation slips through), and no slot is read before it is
 *     written (fresh allocations hold NaNs);
 *   - every residual block's shortcut add and ReLU run in its conv2 (the
 *     conv's fused add): one per block, no separate add op;
 *   - the weights are uploaded once per init, the input once per batch, the
 *     logits downloaded once per batch, and a batch of a known shape
 *     allocates nothing;
 *   - the host model refuses to run on a backend whose memory is not host
 *     memory, and the copy refuses another backend's context;
 *   - errors (wrong channels, wrong logits shape, an allocation or an upload
 *     failing in init, in planning, in the input buffer) return a status,
 *     leave nothing allocated that should not be, and leave the copy usable;
 *   - the copy outlives the host model it came from;
 *   - ts_unet_device_forward_start: the input is uploaded asynchronously
 *     from pinned memory (and must stay unchanged until the fence: the
 *     fake sees a change), the logits land in pinned memory only
 *     once the fence is waited for (before, the fake's poison), equal the
 *     host forward bit for bit, with a second batch started before the first
 *     is waited for and through graph replays; a backend without
 *     asynchronous downloads and fences, a NULL fence, and an input or
 *     logits outside pinned memory are refused; the asynchronous calls are refused while a
 *     graph is recorded.
 * And the training copy (ts_unet_device_init_train) with the optimizer's
 * state in the same memory (ts_optim_init_on):
 *   - two optimizer steps (CE + Dice, gradient accumulation over 2
 *     micro-batches, clipping, no-decay group) give the same weights,
 *     gradients, BN statistics, counters, AdamW moments and losses as the host
 *     model bit for bit, and an eval run the same logits as ts_unet_forward;
 *   - every op pointer lies in the backend's memory, labels and dlogits too;
 *   - a checkpoint round trip (download + ts_optim_save, then a fresh copy
 *     and optimizer loaded from it) continues bit-identically;
 *   - misuse (an inference copy run for training and back, backward before a
 *     train run, a mismatched host model, an optimizer in other memory,
 *     allocation failures at every step of init) is an error and leaks
 *     nothing. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nn/unet.h"
#include "tests/fake_device.h"
#include "tests/testutil.h"
#include "train/loss.h"
#include "train/optim.h"

/* Random weights and running statistics, so folding matters. */
static int make_model(ts_unet *m, const ts_unet_config *cfg, uint64_t seed)
{
    if (!tu_expect_ok(ts_unet_init(m, cfg), "ts_unet_init")) return 0;
    ts_unet_init_random(m, seed);
    tu_rng rng;
    tu_rng_seed(&rng, seed + 1);
    for (int i = 0; i < m->n_params; i++) {
        const ts_param *p = &m->params[i];
        float *d = ts_unet_param_f32(m, p);
        if (p->kind == TS_PARAM_BUFFER) {
            int var = strstr(p->name, "running_var") != NULL;
            for (size_t k = 0; k < p->numel; k++)
                d[k] = (float)(var ? tu_uniform(&rng, 0.5, 2) : tu_uniform(&rng, -.3, .3));
        } else if (p->ndim == 1) {
            /* BN gamma/beta and conv biases away from their 1/0 defaults */
            for (size_t k = 0; k < p->numel; k++) d[k] += (float)tu_uniform(&rng, -.2, .2);
        }
    }
    return 1;
}

/* Host reference: the folded forward of the host model on the CPU backend. */
static float *host_logits(ts_unet *m, ts_ctx *cpu, const ts_tensor *x)
{
    ts_tensor l;
    if (!tu_expect_ok(ts_unet_forward_folded(m, cpu, x, &l), "host forward_folded")) return NULL;
    size_t n = ts_tensor_numel(&l);
    float *r = malloc(n * sizeof *r);
    if (r) memcpy(r, l.data, n * sizeof *r);
    return r;
}

static int bits_equal(const float *a, const float *b, size_t n, const char *what)
{
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0 && bad++ == 0) first = i;
    return tu_expect(bad == 0, "%s: device logits equal the host folded forward bit for bit (%zu of %zu differ, first "
                               "at %zu: %.9g vs %.9g)",
                     what, bad, n, first, bad ? a[first] : 0.0, bad ? b[first] : 0.0);
}

/* One configuration: equality, counts, two shapes. */
static void test_equal(ts_ctx *cpu, ts_ctx *dev, const ts_unet_config *cfg, const char *name)
{
    ts_unet m;
    if (!make_model(&m, cfg, 11)) return;
    tu_expect_ok(ts_unet_fold_bn(&m), "fold_bn");
    const int N = 2, C = cfg->in_channels, K = cfg->classes, H = 45, W = 37;
    tu_rng rng;
    tu_rng_seed(&rng, 17);
    ts_tensor x = tu_tensor(N, C, H, W), x2 = tu_tensor(1, C, 33, 65);
    tu_fill(&rng, x.data, ts_tensor_numel(&x), -1, 1);
    tu_fill(&rng, x2.data, ts_tensor_numel(&x2), -1, 1);
    float *ref = host_logits(&m, cpu, &x), *ref2 = host_logits(&m, cpu, &x2);
    ts_tensor l = tu_tensor(N, K, H, W), l2 = tu_tensor(1, K, 33, 65);

    tu_fake_reset_counts();
    ts_unet_device d;
    if (!tu_expect_ok(ts_unet_device_init(&d, &m, dev->backend), name)) goto out;
    const size_t wbytes = d.n_weights * sizeof(float);
    tu_expect(tu_fake.uploads == 1 && tu_fake.upload_bytes == wbytes && tu_fake.downloads == 0,
              "%s: init uploads the folded weights in one copy (%ld uploads, %zu bytes, want %zu)", name,
              tu_fake.uploads, tu_fake.upload_bytes, wbytes);
    tu_expect(tu_fake.live == 1 && tu_fake.live_bytes == wbytes, "%s: init holds one allocation (%ld)", name,
              tu_fake.live);

    const size_t in_bytes = ts_tensor_numel(&x) * sizeof(float), out_bytes = ts_tensor_numel(&l) * sizeof(float);
    for (int rep = 0; rep < 2; rep++) {
        tu_fake_reset_counts();
        if (!tu_expect_ok(ts_unet_device_forward(&d, dev, &x, &l), "device forward")) break;
        if (ref) bits_equal(l.data, ref, ts_tensor_numel(&l), name);
        tu_expect(tu_fake.uploads == 1 && tu_fake.upload_bytes == in_bytes && tu_fake.downloads == 1 &&
                      tu_fake.download_bytes == out_bytes,
                  "%s: batch %d: one input upload (%ld, %zu bytes) and one logits download (%ld, %zu bytes)", name,
                  rep, tu_fake.uploads, tu_fake.upload_bytes, tu_fake.downloads, tu_fake.download_bytes);
        /* The first batch allocates the arena and the input buffer; the second nothing. */
        tu_expect(tu_fake.allocs == (rep == 0 ? 2 : 0) && tu_fake.frees == 0, "%s: batch %d: %ld allocs, %ld frees",
                  name, rep, tu_fake.allocs, tu_fake.frees);
        tu_expect(tu_fake.foreign_ptrs == 0 && tu_fake.bad_memory == 0,
                  "%s: every op pointer and copy in backend memory (%ld foreign pointers, %ld bad copies)", name,
                  tu_fake.foreign_ptrs, tu_fake.bad_memory);
        /* Every residual block's shortcut add (and its ReLU) runs in its
         * conv2: ResNet-34 has 3, 4, 6 and 3 blocks in layers 1 to 4, and
         * depth d uses layers 1 to d - 1. */
        static const int blocks[4] = {3, 4, 6, 3};
        long want_blocks = 0;
        for (int li = 0; li < cfg->encoder_depth - 1; li++) want_blocks += blocks[li];
        tu_expect(tu_fake.convs_add == want_blocks && tu_fake.adds_run == 0,
                  "%s: batch %d: %ld convs with the shortcut fused, want %ld, and %ld separate adds", name, rep,
                  tu_fake.convs_add, want_blocks, tu_fake.adds_run);
    }
    size_t eval_bytes = 0;
    ts_unet_activation_bytes(cfg, N, H, W, 0, &eval_bytes);
    tu_expect(d.arena.planned == eval_bytes, "%s: the device arena is the eval plan (%zu, want %zu)", name,
              d.arena.planned, eval_bytes);
    /* A smaller shape: a new plan, the input buffer reused. */
    tu_fake_reset_counts();
    if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x2, &l2), "device forward, 33x65") && ref2)
        bits_equal(l2.data, ref2, ts_tensor_numel(&l2), "33x65");
    tu_expect(tu_fake.allocs == 1 && tu_fake.frees == 1 && tu_fake.uploads == 1 && tu_fake.foreign_ptrs == 0,
              "%s: a new shape replans the arena only (%ld allocs, %ld frees)", name, tu_fake.allocs, tu_fake.frees);
    /* The resident forward: the same bits from a batch already in the
     * backend's memory, no copy either way. */
    {
        void *xd = NULL;
        ts_tensor ld;
        if (tu_expect_ok(dev->backend->memory->alloc(&xd, in_bytes), "resident input") &&
            tu_expect_ok(dev->backend->memory->upload(xd, x.data, in_bytes), "resident upload")) {
            tu_fake_reset_counts();
            ts_tensor xv = ts_tensor_view(xd, N, C, H, W);
            if (tu_expect_ok(ts_unet_device_forward_resident(&d, dev, &xv, &ld), "resident forward")) {
                tu_expect(tu_fake.uploads == 0 && tu_fake.downloads == 0 && tu_fake.foreign_ptrs == 0 &&
                              ld.n == N && ld.c == K && ld.h == H && ld.w == W,
                          "%s: the resident forward copies nothing and its logits are [N,K,H,W] (%ld uploads, %ld "
                          "downloads, %ld foreign)",
                          name, tu_fake.uploads, tu_fake.downloads, tu_fake.foreign_ptrs);
                float *got = malloc(out_bytes);
                if (got && tu_expect_ok(dev->backend->memory->download(got, ld.data, out_bytes), "download") && ref)
                    bits_equal(got, ref, ts_tensor_numel(&l), "resident forward");
                free(got);
            }
            ts_tensor bad = xv;
            bad.dtype = TS_BF16;
            tu_expect_error(ts_unet_device_forward_resident(&d, dev, &bad, &ld), TS_ERR_INVALID_ARG,
                            "resident forward of a bf16 input", "must be float32", NULL);
            tu_expect_error(ts_unet_device_forward_resident(&d, cpu, &xv, &ld), TS_ERR_INVALID_ARG,
                            "resident forward with the CPU's context", "is not the one", NULL);
        }
        dev->backend->memory->free(xd);
    }
    ts_unet_device_free(&d);
    tu_expect(tu_fake.live == 0 && tu_fake.live_bytes == 0, "%s: free releases everything (%ld live)", name,
              tu_fake.live);
out:
    free(ref);
    free(ref2);
    tu_tensor_free(&l, "unet_device", "logits");
    tu_tensor_free(&l2, "unet_device", "logits2");
    tu_tensor_free(&x, "unet_device", "x");
    tu_tensor_free(&x2, "unet_device", "x2");
    ts_unet_free(&m);
}

static void test_errors(ts_ctx *cpu, ts_ctx *dev)
{
    static const int dec[3] = {16, 8, 8};
    ts_unet_config cfg = tu_unet_config(3, 2, 3, dec, 1);
    ts_unet m;
    if (!make_model(&m, &cfg, 5)) return;
    const int N = 2, H = 21, W = 19;
    tu_rng rng;
    tu_rng_seed(&rng, 3);
    ts_tensor x = tu_tensor(N, 3, H, W), l = tu_tensor(N, 2, H, W);
    tu_fill(&rng, x.data, ts_tensor_numel(&x), -1, 1);
    ts_tensor lh;

    /* The host model runs only on host memory. */
    tu_expect_ok(ts_unet_fold_bn(&m), "fold_bn");
    tu_expect_error(ts_unet_forward_folded(&m, dev, &x, &lh), TS_ERR_INVALID_ARG, "host model on a device backend",
                    "fake-device", "ts_unet_device_init", NULL);
    tu_expect_error(ts_unet_forward(&m, dev, &x, 0, &lh), TS_ERR_INVALID_ARG, "host eval on a device backend",
                    "fake-device", NULL);
    tu_expect_error(ts_unet_forward(&m, dev, &x, 1, &lh), TS_ERR_INVALID_ARG, "host train on a device backend",
                    "fake-device", NULL);
    tu_expect(tu_fake.live == 0, "nothing allocated on the fake by the refused host calls");
    float *ref = host_logits(&m, cpu, &x);

    /* Init failures leave nothing behind. */
    ts_unet_device d;
    tu_fake_reset_counts();
    tu_fake.fail_alloc_at = 1;
    tu_expect_error(ts_unet_device_init(&d, &m, dev->backend), TS_ERR_NOMEM, "init, weights alloc fails",
                    "folded weights", "on purpose", NULL);
    tu_expect(tu_fake.live == 0 && d.weights == NULL && d.layers == NULL, "failed init leaves nothing (%ld live)",
              tu_fake.live);
    tu_fake_reset_counts();
    tu_fake.fail_upload_at = 1;
    tu_expect_error(ts_unet_device_init(&d, &m, dev->backend), TS_ERR_BACKEND, "init, upload fails", "on purpose",
                    NULL);
    tu_expect(tu_fake.live == 0, "failed upload frees the weights (%ld live)", tu_fake.live);
    tu_expect_error(ts_unet_device_init(&d, NULL, dev->backend), TS_ERR_INVALID_ARG, "init without model",
                    "not initialised", NULL);
    ts_backend incomplete = *dev->backend;
    incomplete.memory = NULL;
    tu_expect_error(ts_unet_device_init(&d, &m, &incomplete), TS_ERR_UNSUPPORTED, "init on a backend without memory",
                    "memory", NULL);
    tu_expect_error(ts_unet_device_forward(&d, dev, &x, &l), TS_ERR_INVALID_ARG, "forward after failed init",
                    "ts_unet_device_init", NULL);

    if (!tu_expect_ok(ts_unet_device_init(&d, &m, dev->backend), "init")) goto out;
    const long base_live = tu_fake.live; /* the weights */

    /* Inputs the model refuses: nothing uploaded, nothing allocated. */
    tu_fake_reset_counts();
    ts_tensor x4 = ts_tensor_view(x.data, 1, 4, H, W); /* reuses x's storage: 1*4*H*W < 2*3*H*W */
    tu_expect_error(ts_unet_device_forward(&d, dev, &x4, &l), TS_ERR_INVALID_ARG, "4-channel input", "4 channels",
                    "in_channels 3", NULL);
    ts_tensor lbad = ts_tensor_view(l.data, N, 2, H, W - 1);
    tu_expect_error(ts_unet_device_forward(&d, dev, &x, &lbad), TS_ERR_INVALID_ARG, "logits shape",
                    "[2,2,21,19]", NULL);
    ts_tensor lnull = ts_tensor_view(NULL, N, 2, H, W);
    tu_expect_error(ts_unet_device_forward(&d, dev, &x, &lnull), TS_ERR_INVALID_ARG, "logits without data",
                    "host tensor", NULL);
    tu_expect_error(ts_unet_device_forward(&d, dev, &x, NULL), TS_ERR_INVALID_ARG, "NULL logits", "logits", NULL);
    tu_expect_error(ts_unet_device_forward(&d, cpu, &x, &l), TS_ERR_INVALID_ARG, "another backend's context",
                    "cpu", "fake-device", NULL);
    tu_expect(tu_fake.uploads == 0 && tu_fake.allocs == 0, "refused inputs touch no memory (%ld uploads, %ld allocs)",
              tu_fake.uploads, tu_fake.allocs);

    /* The arena allocation fails, then the input buffer's, then the upload:
     * each a status, nothing leaked, and the next call works. */
    tu_fake.fail_alloc_at = 1;
    tu_expect_error(ts_unet_device_forward(&d, dev, &x, &l), TS_ERR_NOMEM, "arena alloc fails", "arena",
                    "on purpose", NULL);
    tu_expect(tu_fake.live == base_live && d.arena.base == NULL, "failed plan leaves only the weights (%ld live)",
              tu_fake.live);
    tu_fake.fail_alloc_at = 2;
    tu_expect_error(ts_unet_device_forward(&d, dev, &x, &l), TS_ERR_NOMEM, "input alloc fails", "on purpose", NULL);
    tu_expect(tu_fake.live == base_live + 1 && d.x == NULL, "failed input buffer: weights and arena (%ld live)",
              tu_fake.live);
    tu_fake.fail_upload_at = 1;
    tu_expect_error(ts_unet_device_forward(&d, dev, &x, &l), TS_ERR_BACKEND, "input upload fails", "on purpose",
                    NULL);
    tu_fake.fail_alloc_at = tu_fake.fail_upload_at = 0;
    if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x, &l), "forward after the failures") && ref)
        bits_equal(l.data, ref, ts_tensor_numel(&l), "after failures");
    tu_expect(tu_fake.live == base_live + 2, "weights, arena, input (%ld live)", tu_fake.live);

    /* The copy does not need the host model. */
    ts_unet_free(&m);
    memset(l.data, 0, ts_tensor_numel(&l) * sizeof(float));
    if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x, &l), "forward after the host model is freed") && ref)
        bits_equal(l.data, ref, ts_tensor_numel(&l), "without the host model");
    ts_unet_device_free(&d);
    ts_unet_device_free(&d); /* idempotent */
    tu_expect(tu_fake.live == 0 && tu_fake.bad_memory == 0 && tu_fake.foreign_ptrs == 0,
              "all released (%ld live, %ld bad, %ld foreign)", tu_fake.live, tu_fake.bad_memory, tu_fake.foreign_ptrs);
out:
    free(ref);
    ts_unet_free(&m);
    tu_tensor_free(&x, "unet_device", "x");
    tu_tensor_free(&l, "unet_device", "l");
}

/* The CPU backend's own memory interface: the device copy on it also equals the host forward. */
static void test_cpu_memory(ts_ctx *cpu)
{
    const ts_backend *b = ts_backend_cpu();
    tu_expect(ts_backend_is_host(b) && b->memory && b->memory->host == 1, "the CPU backend's memory is host memory");
    tu_expect(!ts_backend_is_host(tu_fake_device_backend()), "the fake backend's memory is not");
    tu_expect_ok(ts_backend_check(tu_fake_device_backend()), "the fake backend is complete");
    static const int dec[4] = {16, 16, 8, 8};
    ts_unet_config cfg = tu_unet_config(2, 3, 4, dec, 1);
    ts_unet m;
    if (!make_model(&m, &cfg, 8)) return;
    tu_expect_ok(ts_unet_fold_bn(&m), "fold_bn");
    tu_rng rng;
    tu_rng_seed(&rng, 4);
    ts_tensor x = tu_tensor(2, 2, 31, 27), l = tu_tensor(2, 3, 31, 27);
    tu_fill(&rng, x.data, ts_tensor_numel(&x), -1, 1);
    float *ref = host_logits(&m, cpu, &x);
    ts_unet_device d;
    if (tu_expect_ok(ts_unet_device_init(&d, &m, b), "device copy on the CPU backend") &&
        tu_expect_ok(ts_unet_device_forward(&d, cpu, &x, &l), "device forward on the CPU backend") && ref)
        bits_equal(l.data, ref, ts_tensor_numel(&l), "cpu memory");
    ts_unet_device_free(&d);
    free(ref);
    tu_tensor_free(&x, "unet_device", "x");
    tu_tensor_free(&l, "unet_device", "l");
    ts_unet_free(&m);
}

/* ---- training ---- */

/* A copy of n backend floats on the host (NULL on error). */
static float *fetch(const ts_backend *b, const float *p, size_t n)
{
    float *h = malloc((n ? n : 1) * sizeof *h);
    if (h && b->memory->download(h, p, n * sizeof *h) != TS_OK) {
        free(h);
        return NULL;
    }
    return h;
}

static int same_bits(const float *a, const float *b, size_t n, const char *what)
{
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0 && bad++ == 0) first = i;
    return tu_expect(bad == 0, "%s: bit for bit (%zu of %zu differ, first at %zu: %.9g vs %.9g)", what, bad, n, first,
                     bad ? a[first] : 0.0, bad ? b[first] : 0.0);
}

typedef struct train_io {
    ts_tensor x[2];         /* host batches */
    int32_t *y[2];          /* host labels */
    int32_t *y_dev[2];      /* labels in the device's memory */
    float *dl_dev;          /* dlogits in the device's memory */
    ts_tensor dl;           /* host dlogits */
} train_io;

/* One optimizer step of 2 micro-batches on the host model... */
static int host_step(ts_unet *m, ts_optim *o, ts_ctx *cpu, const ts_loss *loss, train_io *io, double lr,
                     double *losses)
{
    if (!tu_expect_ok(ts_unet_zero_grad(m, cpu), "host zero_grad")) return 0;
    for (int k = 0; k < 2; k++) {
        ts_tensor lg;
        ts_loss_value lv;
        memset(io->dl.data, 0, ts_tensor_numel(&io->dl) * sizeof(float));
        if (!tu_expect_ok(ts_unet_forward(m, cpu, &io->x[k], 1, &lg), "host train forward") ||
            !tu_expect_ok(ts_loss_forward(loss, cpu, &lg, io->y[k], &lv), "host loss") ||
            !tu_expect_ok(ts_loss_backward(loss, cpu, &io->dl, &lg, io->y[k], ts_optim_loss_scale(o)), "host dloss") ||
            !tu_expect_ok(ts_unet_backward(m, cpu, &io->dl), "host backward"))
            return 0;
        losses[k] = lv.total;
    }
    return tu_expect_ok(ts_optim_step(o, cpu, m, lr, NULL), "host optimizer step");
}

/* ...and on the training copy, everything in the device's memory. */
static int dev_step(ts_unet_device *d, ts_optim *o, ts_ctx *dev, const ts_loss *loss, train_io *io, double lr,
                    double *losses)
{
    ts_unet_trainable t = ts_unet_device_trainable(d);
    if (!tu_expect_ok(ts_unet_device_zero_grad(d, dev), "device zero_grad")) return 0;
    for (int k = 0; k < 2; k++) {
        ts_tensor lg;
        ts_loss_value lv;
        ts_tensor dl = ts_tensor_view(io->dl_dev, io->dl.n, io->dl.c, io->dl.h, io->dl.w);
        if (!tu_expect_ok(dev->backend->zero(dev, dl.data, ts_tensor_numel(&dl)), "device zero dlogits") ||
            !tu_expect_ok(ts_unet_device_run(d, dev, &io->x[k], 1, &lg), "device train run") ||
            !tu_expect_ok(ts_loss_forward(loss, dev, &lg, io->y_dev[k], &lv), "device loss") ||
            !tu_expect_ok(ts_loss_backward(loss, dev, &dl, &lg, io->y_dev[k], ts_optim_loss_scale(o)), "device dloss") ||
            !tu_expect_ok(ts_unet_device_backward(d, dev, &dl), "device backward"))
            return 0;
        losses[k] = lv.total;
    }
    return tu_expect_ok(ts_optim_step_on(o, dev, &t, lr, NULL), "device optimizer step");
}

/* The copy's weights, gradients, statistics and counters against m's, and
 * the two optimizers' moments. */
static void compare_state(const ts_unet_device *d, const ts_unet *m, const ts_optim *od, const ts_optim *om,
                          const char *what)
{
    const ts_backend *b = d->backend;
    char w[160];
    float *hw = fetch(b, d->weights, d->n_weights), *hg = fetch(b, d->grads, d->n_weights);
    float *hb = fetch(b, d->buffers, d->n_buffers);
    float *ha = fetch(b, od->exp_avg, od->n), *hq = fetch(b, od->exp_avg_sq, od->n);
    if (tu_expect(hw && hg && hb && ha && hq, "%s: download the state", what)) {
        snprintf(w, sizeof w, "%s: weights", what);
        same_bits(hw, m->weights, m->n_weights, w);
        snprintf(w, sizeof w, "%s: gradients", what);
        same_bits(hg, m->grads, m->n_weights, w);
        snprintf(w, sizeof w, "%s: BN running statistics", what);
        same_bits(hb, m->buffers, m->n_buffers, w);
        snprintf(w, sizeof w, "%s: exp_avg", what);
        same_bits(ha, om->exp_avg, om->n, w);
        snprintf(w, sizeof w, "%s: exp_avg_sq", what);
        same_bits(hq, om->exp_avg_sq, om->n, w);
        tu_expect(memcmp(d->counters, m->counters, m->n_counters * sizeof(int64_t)) == 0 && od->step == om->step,
                  "%s: counters and step equal", what);
    }
    free(hw);
    free(hg);
    free(hb);
    free(ha);
    free(hq);
}

static void test_train_copy(ts_ctx *cpu, ts_ctx *dev, const ts_unet_config *cfg, const char *name)
{
    const ts_backend *b = dev->backend;
    const int N = 2, C = cfg->in_channels, K = cfg->classes, H = 35, W = 29;
    ts_unet m;
    if (!make_model(&m, cfg, 23)) return;
    ts_loss_config lc = ts_loss_default_config();
    lc.ce.ignore_index = lc.dice.ignore_index = 255;
    ts_loss loss;
    tu_expect_ok(ts_loss_init(&loss, &lc, K), "loss");
    ts_optim_config oc = ts_optim_default_config();
    oc.lr = 1e-2;
    oc.no_decay_1d = 1;     /* two groups: many runs in the block */
    oc.clip_grad_norm = 0.5; /* clipped: sum_squares and scale on the device */
    oc.accum_steps = 2;
    train_io io;
    memset(&io, 0, sizeof io);
    tu_rng rng;
    tu_rng_seed(&rng, 29);
    for (int k = 0; k < 2; k++) {
        io.x[k] = tu_tensor(N, C, H, W);
        tu_fill(&rng, io.x[k].data, ts_tensor_numel(&io.x[k]), -1, 1);
        io.y[k] = malloc((size_t)N * H * W * sizeof(int32_t));
        for (int i = 0; io.y[k] && i < N * H * W; i++) io.y[k][i] = tu_randint(&rng, 9) == 0 ? 255 : tu_randint(&rng, K);
    }
    io.dl = tu_tensor(N, K, H, W);

    ts_unet_device d, d2;
    memset(&d, 0, sizeof d);
    memset(&d2, 0, sizeof d2);
    ts_optim om, od, od2;
    memset(&om, 0, sizeof om);
    memset(&od, 0, sizeof od);
    memset(&od2, 0, sizeof od2);
    ts_dict ck;
    ts_dict_init(&ck);
    tu_fake_reset_counts();
    const long live0 = tu_fake.live;
    if (!tu_expect_ok(ts_unet_device_init_train(&d, &m, b), name) ||
        !tu_expect_ok(ts_optim_init(&om, &oc, &m), "host optimizer") ||
        !tu_expect_ok(ts_optim_init_on(&od, &oc, &m, b), "device optimizer"))
        goto out;
    tu_expect(od.mem == b->memory, "%s: the optimizer state lives in the backend's memory", name);
    void *p = NULL;
    for (int k = 0; k < 2; k++) {
        tu_expect_ok(b->memory->alloc(&p, (size_t)N * H * W * sizeof(int32_t)), "labels alloc");
        io.y_dev[k] = p;
        tu_expect_ok(b->memory->upload(io.y_dev[k], io.y[k], (size_t)N * H * W * sizeof(int32_t)), "labels upload");
    }
    tu_expect_ok(b->memory->alloc(&p, ts_tensor_numel(&io.dl) * sizeof(float)), "dlogits alloc");
    io.dl_dev = p;

    double lh[2], ld[2];
    for (int step = 0; step < 2; step++) {
        double lr = step ? 5e-3 : 1e-2;
        if (!host_step(&m, &om, cpu, &loss, &io, lr, lh) || !dev_step(&d, &od, dev, &loss, &io, lr, ld)) goto out;
        tu_expect(lh[0] == ld[0] && lh[1] == ld[1], "%s: step %d: the same losses (%.17g %.17g vs %.17g %.17g)", name,
                  step + 1, lh[0], lh[1], ld[0], ld[1]);
    }
    compare_state(&d, &m, &od, &om, name);
    tu_expect(tu_fake.foreign_ptrs == 0 && tu_fake.bad_memory == 0,
              "%s: every op pointer in the backend's memory (%ld foreign, %ld bad copies)", name, tu_fake.foreign_ptrs,
              tu_fake.bad_memory);
    /* Eval mode of the copy = ts_unet_forward(train = 0). */
    {
        ts_tensor lg, lgd;
        float *ref = NULL, *got = NULL;
        if (tu_expect_ok(ts_unet_forward(&m, cpu, &io.x[1], 0, &lg), "host eval forward")) {
            ref = malloc(ts_tensor_numel(&lg) * sizeof(float));
            if (ref) memcpy(ref, lg.data, ts_tensor_numel(&lg) * sizeof(float));
        }
        if (tu_expect_ok(ts_unet_device_run(&d, dev, &io.x[1], 0, &lgd), "device eval run"))
            got = fetch(b, lgd.data, ts_tensor_numel(&lgd));
        if (ref && got) same_bits(got, ref, ts_tensor_numel(&lg), "eval run vs ts_unet_forward(train = 0)");
        free(ref);
        free(got);
        /* An eval run discards the train activations, as on the host. */
        tu_expect_error(ts_unet_device_backward(&d, dev, &io.dl), TS_ERR_INVALID_ARG, "backward after an eval run", "no train-mode forward", NULL);
    }
    /* Checkpoint round trip: the host model m2 and optimizer state from the
     * copy, a fresh copy made from them, one more step on each side. */
    {
        ts_unet m2;
        if (!make_model(&m2, cfg, 99)) goto out;
        tu_expect_ok(ts_unet_device_download_params(&d, &m2), "download params");
        tu_expect_ok(ts_optim_save(&od, &m2, &ck), "save the device optimizer");
        if (tu_expect_ok(ts_unet_device_init_train(&d2, &m2, b), "second copy") &&
            tu_expect_ok(ts_optim_init_on(&od2, &oc, &m2, b), "second optimizer") &&
            tu_expect_ok(ts_optim_load(&od2, &m2, &ck), "load into the device optimizer") &&
            host_step(&m, &om, cpu, &loss, &io, 2e-3, lh) && dev_step(&d2, &od2, dev, &loss, &io, 2e-3, ld)) {
            compare_state(&d2, &m, &od2, &om, "after a checkpoint round trip");
        }
        ts_unet_free(&m2);
    }
    /* Misuse. */
    {
        ts_unet other;
        static const int d3[3] = {8, 8, 8};
        ts_unet_config oc3 = tu_unet_config(C, K, 3, d3, 1);
        ts_tensor lg;
        if (make_model(&other, &oc3, 5)) {
            tu_expect_error(ts_unet_device_download_params(&d, &other), TS_ERR_INVALID_ARG, "download into another model", "not the one", NULL);
            tu_expect_error(ts_unet_device_upload_params(&d, &other), TS_ERR_INVALID_ARG, "upload from another model", "not the one", NULL);
            ts_unet_free(&other);
        }
        ts_tensor l = tu_tensor(N, K, H, W);
        tu_expect_error(ts_unet_device_forward(&d, dev, &io.x[0], &l), TS_ERR_INVALID_ARG,
                        "inference forward on a training copy", "training copy", NULL);
        tu_tensor_free(&l, "unet_device", "l");
        tu_expect_error(ts_unet_device_run(&d, cpu, &io.x[0], 1, &lg), TS_ERR_INVALID_ARG, "run with another backend", "context's backend", NULL);
        ts_unet_trainable ht = ts_unet_host_trainable(&m);
        tu_expect_error(ts_optim_step_on(&od, dev, &ht, 1e-3, NULL), TS_ERR_INVALID_ARG,
                        "device optimizer on host weights", "different", NULL);
        ts_unet_trainable dt = ts_unet_device_trainable(&d);
        tu_expect_error(ts_optim_step_on(&om, cpu, &dt, 1e-3, NULL), TS_ERR_INVALID_ARG,
                        "host optimizer on device weights", "different", NULL);
        ts_unet_device inf;
        if (tu_expect_ok(ts_unet_device_init(&inf, &m, b), "inference copy")) {
            tu_expect_error(ts_unet_device_run(&inf, dev, &io.x[0], 1, &lg), TS_ERR_INVALID_ARG,
                            "train run on an inference copy", "inference copy", NULL);
            ts_unet_trainable it = ts_unet_device_trainable(&inf);
            tu_expect(it.weights == NULL, "an inference copy has no trainable block");
        }
        ts_unet_device_free(&inf);
    }
out:
    ts_unet_device_free(&d);
    ts_unet_device_free(&d2);
    ts_optim_free(&od);
    ts_optim_free(&od2);
    ts_optim_free(&om);
    ts_dict_free(&ck);
    for (int k = 0; k < 2; k++) {
        b->memory->free(io.y_dev[k]);
        free(io.y[k]);
        tu_tensor_free(&io.x[k], "unet_device", "x");
    }
    b->memory->free(io.dl_dev);
    tu_tensor_free(&io.dl, "unet_device", "dl");
    tu_expect(tu_fake.live == live0, "%s: everything freed (%ld live, %ld before)", name, tu_fake.live, live0);
    ts_loss_free(&loss);
    ts_unet_free(&m);
}

/* Every allocation and upload of a training copy's init failing in turn:
 * an error, nothing left allocated. */
static void test_train_init_failures(ts_ctx *dev)
{
    static const int d3[3] = {8, 8, 8};
    ts_unet_config cfg = tu_unet_config(2, 3, 3, d3, 1);
    ts_unet m;
    if (!make_model(&m, &cfg, 3)) return;
    const long live0 = tu_fake.live;
    int failures = 0;
    for (int which = 0; which < 2; which++) {
        for (long at = 1; at < 40; at++) {
            tu_fake_reset_counts();
            if (which == 0) tu_fake.fail_alloc_at = at;
            else tu_fake.fail_upload_at = at;
            ts_unet_device d;
            ts_status st = ts_unet_device_init_train(&d, &m, dev->backend);
            long left = which == 0 ? tu_fake.fail_alloc_at : tu_fake.fail_upload_at;
            tu_fake.fail_alloc_at = tu_fake.fail_upload_at = 0;
            if (st == TS_OK) {
                ts_unet_device_free(&d);
                tu_expect(left > 0, "init_train succeeded although %s %ld failed", which ? "upload" : "alloc", at);
                break;
            }
            failures++;
            tu_expect(tu_fake.live == live0 && d.weights == NULL, "failed %s %ld: nothing left allocated (%ld live)",
                      which ? "upload" : "alloc", at, tu_fake.live);
        }
    }
    tu_expect(failures >= 5, "init_train failed at %d injected points", failures);
    ts_optim o;
    ts_optim_config oc = ts_optim_default_config();
    for (long at = 1; at <= 2; at++) {
        tu_fake_reset_counts();
        tu_fake.fail_alloc_at = at;
        tu_expect_error(ts_optim_init_on(&o, &oc, &m, dev->backend), TS_ERR_NOMEM, "optimizer alloc fails", "AdamW state", "fake-device", NULL);
        tu_fake.fail_alloc_at = 0;
        tu_expect(tu_fake.live == live0 && o.exp_avg == NULL, "optimizer alloc %ld: nothing left", at);
    }
    ts_unet_free(&m);
}

/* ---- graphs ---- */

/* Logits of a direct or replayed forward, fetched and compared with the host
 * folded forward. */
static void check_logits(const ts_backend *b, const ts_tensor *ld, const float *ref, const char *what)
{
    float *got = fetch(b, ld->data, ts_tensor_numel(ld));
    if (tu_expect(got != NULL, "%s: logits fetched", what) && ref) bits_equal(got, ref, ts_tensor_numel(ld), what);
    free(got);
}

/* Graphs on the fake device, which records the forward ops between begin
 * and end without running them and replays them through its checked
 * wrappers (tests/fake_device.h):
 *   - the first forward of a key runs the ops directly, the second records
 *     exactly the ops a direct forward calls (none run while recording) and
 *     launches the recording, later ones only launch; every result equals
 *     the host folded forward bit for bit, on new data in the same buffer
 *     too (a replay reads memory at launch time);
 *   - a resident input buffer, a new batch shape, a shape coming back after
 *     another, a stale recording, graphs turned off and on, and a
 *     precision change each take the direct path first and give the same
 *     bits; every pointer a replayed op gets is live;
 *   - a failure while recording runs that forward and every later one
 *     directly, with the same bits, and the copy says why, until
 *     set_graphs turns graphs on again;
 *   - free releases the recording. */
static void test_graphs(ts_ctx *cpu, ts_ctx *dev)
{
    static const char *name = "graphs";
    static const int d3[3] = {16, 8, 8};
    const ts_unet_config cfg = tu_unet_config(3, 2, 3, d3, 1);
    const ts_backend *B = dev->backend;
    ts_unet m;
    if (!make_model(&m, &cfg, 23)) return;
    tu_expect_ok(ts_unet_fold_bn(&m), "fold_bn");
    const int N = 2, C = 3, K = 2, H = 35, W = 29;
    tu_rng rng;
    tu_rng_seed(&rng, 29);
    ts_tensor x1 = tu_tensor(N, C, H, W), x2 = tu_tensor(N, C, H, W), x3 = tu_tensor(1, C, 24, 40);
    tu_fill(&rng, x1.data, ts_tensor_numel(&x1), -1, 1);
    tu_fill(&rng, x2.data, ts_tensor_numel(&x2), -1, 1);
    tu_fill(&rng, x3.data, ts_tensor_numel(&x3), -1, 1);
    float *r1 = host_logits(&m, cpu, &x1), *r2 = host_logits(&m, cpu, &x2), *r3 = host_logits(&m, cpu, &x3);
    ts_tensor l = tu_tensor(N, K, H, W), l3 = tu_tensor(1, K, 24, 40);
    const size_t nl = ts_tensor_numel(&l);
    ts_unet_device d;
    void *xd = NULL;
    if (!tu_expect_ok(ts_unet_device_init(&d, &m, B), "init")) goto out;
    tu_fake_reset_counts();

    /* 1: direct; 2: recorded, then launched; 3: launched on other data. */
    if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x1, &l), "forward 1")) bits_equal(l.data, r1, nl, "forward 1");
    const long direct = tu_fake.ops_direct, allocs = tu_fake.allocs;
    tu_expect(direct > 0 && tu_fake.graph_begins == 0 && tu_fake.graph_launches == 0,
              "%s: the first forward of a shape calls the ops directly (%ld ops, %ld recordings, %ld launches)", name,
              direct, tu_fake.graph_begins, tu_fake.graph_launches);
    if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x2, &l), "forward 2")) bits_equal(l.data, r2, nl, "forward 2");
    tu_expect(tu_fake.graph_records == 1 && tu_fake.graph_launches == 1 && tu_fake.ops_recorded == direct &&
                  tu_fake.ops_direct == direct && d.graph_records == 1 && d.graph_launches == 1,
              "%s: the second records the %ld ops of a direct forward without running any, and launches them (%ld "
              "recorded, %ld more run directly, %ld recordings, %ld launches)",
              name, direct, tu_fake.ops_recorded, tu_fake.ops_direct - direct, tu_fake.graph_records,
              tu_fake.graph_launches);
    if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x1, &l), "forward 3")) bits_equal(l.data, r1, nl, "replay 3");
    tu_expect(tu_fake.graph_records == 1 && tu_fake.graph_launches == 2 && tu_fake.ops_direct == direct &&
                  tu_fake.uploads == 3 && tu_fake.downloads == 3 && tu_fake.allocs == allocs,
              "%s: the third only launches (%ld recordings, %ld launches, %ld direct ops; %ld uploads, %ld downloads, "
              "%ld allocations after the first forward)",
              name, tu_fake.graph_records, tu_fake.graph_launches, tu_fake.ops_direct - direct, tu_fake.uploads,
              tu_fake.downloads, tu_fake.allocs - allocs);

    /* A resident input: another buffer is another key. */
    const size_t in_bytes = ts_tensor_numel(&x1) * sizeof(float);
    if (tu_expect_ok(B->memory->alloc(&xd, in_bytes), "resident input") &&
        tu_expect_ok(B->memory->upload(xd, x1.data, in_bytes), "resident upload")) {
        ts_tensor xv = ts_tensor_view(xd, N, C, H, W), ld;
        tu_fake_reset_counts();
        if (tu_expect_ok(ts_unet_device_forward_resident(&d, dev, &xv, &ld), "resident 1"))
            check_logits(B, &ld, r1, "resident 1 (direct)");
        tu_expect(tu_fake.graph_begins == 0 && tu_fake.ops_direct > 0,
                  "%s: a new input buffer runs directly first (%ld recordings)", name, tu_fake.graph_begins);
        if (tu_expect_ok(ts_unet_device_forward_resident(&d, dev, &xv, &ld), "resident 2"))
            check_logits(B, &ld, r1, "resident 2 (recorded)");
        tu_expect_ok(B->memory->upload(xd, x2.data, in_bytes), "resident upload 2");
        if (tu_expect_ok(ts_unet_device_forward_resident(&d, dev, &xv, &ld), "resident 3"))
            check_logits(B, &ld, r2, "resident 3 (replayed on new data)");
        tu_expect(tu_fake.graph_records == 1 && tu_fake.graph_launches == 2 && tu_fake.graph_live == 1,
                  "%s: resident: one recording, two launches, one recording kept (%ld, %ld, %ld)", name,
                  tu_fake.graph_records, tu_fake.graph_launches, tu_fake.graph_live);
    }

    /* Another shape, then the first one back: direct, then recorded. */
    tu_fake_reset_counts();
    if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x3, &l3), "shape 2"))
        bits_equal(l3.data, r3, ts_tensor_numel(&l3), "another shape");
    for (int i = 0; i < 3; i++)
        if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x2, &l), "shape 1 again"))
            bits_equal(l.data, r2, nl, "the first shape again");
    tu_expect(tu_fake.graph_records == 1 && tu_fake.graph_launches == 2,
              "%s: after another shape: direct once, then recorded and replayed (%ld recordings, %ld launches)", name,
              tu_fake.graph_records, tu_fake.graph_launches);

    /* Stale: the backend replaced a buffer of its own. */
    tu_fake_reset_counts();
    tu_fake.graph_generation++;
    if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x1, &l), "stale")) bits_equal(l.data, r1, nl, "stale");
    tu_expect(tu_fake.graph_launches == 0 && tu_fake.ops_direct > 0 && tu_fake.graph_live == 0,
              "%s: a stale recording is dropped and the ops run directly (%ld launches, %ld live)", name,
              tu_fake.graph_launches, tu_fake.graph_live);

    /* A failure while recording: nothing of that forward ran, so it runs
     * directly (the same bits), the recording is freed, the copy keeps why
     * and runs every later forward directly, until set_graphs clears it. */
    tu_expect(ts_unet_device_graph_error(&d) == NULL, "%s: no graph error while recordings work", name);
    tu_fake.fail_op_at = 3;
    const long direct_before = tu_fake.ops_direct;
    if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x1, &l), "an op fails while recording"))
        bits_equal(l.data, r1, nl, "a failed recording, run directly");
    const char *why = ts_unet_device_graph_error(&d);
    tu_expect(why && strstr(why, "on purpose") && strstr(why, "while recording"),
              "%s: the copy says why recording failed (%s)", name, why ? why : "NULL");
    tu_expect(tu_fake.graph_live == 0 && d.graph == NULL && tu_fake.ops_direct > direct_before,
              "%s: a failed recording is freed and the forward runs directly (%ld live, %ld direct ops)", name,
              tu_fake.graph_live, tu_fake.ops_direct - direct_before);
    tu_fake_reset_counts();
    for (int i = 0; i < 3; i++)
        if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x2, &l), "after a failed recording"))
            bits_equal(l.data, r2, nl, "after a failed recording");
    tu_expect(tu_fake.graph_begins == 0 && tu_fake.graph_launches == 0 && tu_fake.ops_direct > 0,
              "%s: after a failed recording every forward runs directly (%ld recordings, %ld launches)", name,
              tu_fake.graph_begins, tu_fake.graph_launches);
    ts_unet_device_set_graphs(&d, 1);
    tu_expect(ts_unet_device_graph_error(&d) == NULL, "%s: set_graphs clears the graph error", name);
    tu_fake_reset_counts();
    for (int i = 0; i < 2; i++)
        if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x2, &l), "graphs on again"))
            bits_equal(l.data, r2, nl, "graphs on again");
    tu_expect(tu_fake.graph_live == 1 && tu_fake.graph_records == 1,
              "%s: turned on again, the copy records again (%ld live)", name, tu_fake.graph_live);

    /* Off, then on again. */
    ts_unet_device_set_graphs(&d, 0);
    tu_fake_reset_counts();
    for (int i = 0; i < 2; i++)
        if (tu_expect_ok(ts_unet_device_forward(&d, dev, &x1, &l), "graphs off")) bits_equal(l.data, r1, nl, "off");
    tu_expect(tu_fake.graph_begins == 0 && tu_fake.graph_launches == 0 && tu_fake.graph_live == 0,
              "%s: off: nothing recorded or launched, the recording freed (%ld, %ld, %ld live)", name,
              tu_fake.graph_begins, tu_fake.graph_launches, tu_fake.graph_live);
    ts_unet_device_set_graphs(&d, 1);

    /* bf16: the recording of float32 is dropped; direct and replayed
     * forwards give the same bits. */
    if (tu_expect_ok(ts_unet_device_set_precision(&d, dev, TS_BF16), "bf16")) {
        tu_expect(tu_fake.graph_live == 0, "%s: a precision change drops the recording", name);
        float *first = malloc(nl * sizeof *first);
        tu_fake_reset_counts();
        for (int i = 0; first && i < 3; i++) {
            if (!tu_expect_ok(ts_unet_device_forward(&d, dev, &x1, &l), "bf16 forward")) break;
            if (i == 0)
                memcpy(first, l.data, nl * sizeof *first);
            else
                same_bits(l.data, first, nl, i == 1 ? "bf16: recorded = direct" : "bf16: replayed = direct");
        }
        tu_expect(tu_fake.graph_records == 1 && tu_fake.graph_launches == 2, "%s: bf16: 1 recording, 2 launches",
                  name);
        free(first);
    }
    tu_expect(tu_fake.foreign_ptrs == 0 && tu_fake.bad_memory == 0,
              "%s: every pointer a recorded or direct op got was live device memory (%ld foreign, %ld bad)", name,
              tu_fake.foreign_ptrs, tu_fake.bad_memory);
    ts_unet_device_free(&d);
    tu_expect(tu_fake.graph_live == 0, "%s: free releases the recording (%ld live)", name, tu_fake.graph_live);
out:
    B->memory->free(xd);
    free(r1);
    free(r2);
    free(r3);
    tu_tensor_free(&l, "unet_device", "l");
    tu_tensor_free(&l3, "unet_device", "l3");
    tu_tensor_free(&x1, "unet_device", "x1");
    tu_tensor_free(&x2, "unet_device", "x2");
    tu_tensor_free(&x3, "unet_device", "x3");
    ts_unet_free(&m);
}

static int all_poison(const float *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &p[i], sizeof u);
        if (u != 0xffffffffu) return 0;
    }
    return 1;
}

static void test_forward_start(ts_ctx *cpu, ts_ctx *dev)
{
    static const char *name = "forward_start";
    static const int d3[3] = {16, 8, 8};
    const ts_unet_config cfg = tu_unet_config(3, 2, 3, d3, 1);
    const ts_backend *B = dev->backend;
    const ts_backend_memory *M = B->memory;
    ts_unet m;
    if (!make_model(&m, &cfg, 31)) return;
    tu_expect_ok(ts_unet_fold_bn(&m), "fold_bn");
    const int N = 2, C = 3, K = 2, H = 27, W = 33;
    tu_rng rng;
    tu_rng_seed(&rng, 37);
    ts_tensor x[2] = {tu_tensor(N, C, H, W), tu_tensor(N, C, H, W)}, host = tu_tensor(N, K, H, W);
    for (int i = 0; i < 2; i++) tu_fill(&rng, x[i].data, ts_tensor_numel(&x[i]), -1, 1);
    float *ref[2] = {host_logits(&m, cpu, &x[0]), host_logits(&m, cpu, &x[1])};
    const size_t nl = (size_t)N * K * H * W;
    void *pin[2] = {NULL, NULL}, *fence[2] = {NULL, NULL}, *pin_x[2] = {NULL, NULL};
    ts_tensor xp[2]; /* x[i] in pinned memory, as forward_start asks */
    ts_unet_device d, dc;
    memset(&dc, 0, sizeof dc);
    tu_expect(ts_backend_memory_async(M) && !ts_backend_memory_async(cpu->backend->memory),
              "%s: the fake device offers asynchronous downloads and fences, the CPU does not", name);
    if (!tu_expect_ok(ts_unet_device_init(&d, &m, B), "init")) goto out;
    for (int i = 0; i < 2; i++) {
        tu_expect_ok(M->host_alloc(&pin[i], nl * sizeof(float)), "host_alloc");
        tu_expect_ok(M->fence_new(&fence[i]), "fence_new");
        tu_expect_ok(M->host_alloc(&pin_x[i], ts_tensor_numel(&x[i]) * sizeof(float)), "host_alloc");
        if (pin_x[i]) memcpy(pin_x[i], x[i].data, ts_tensor_numel(&x[i]) * sizeof(float));
        xp[i] = ts_tensor_view(pin_x[i], N, C, H, W);
    }
    if (!pin[0] || !pin[1] || !fence[0] || !fence[1] || !pin_x[0] || !pin_x[1]) goto out;
    tu_fake_reset_counts();
    /* Three rounds of two batches in flight: direct, recorded, replayed. */
    for (int round = 0; round < 3; round++) {
        ts_tensor l[2];
        for (int i = 0; i < 2; i++) {
            l[i] = ts_tensor_view(pin[i], N, K, H, W);
            tu_expect_ok(ts_unet_device_forward_start(&d, dev, &xp[i], &l[i], fence[i]), "forward_start");
        }
        char what[64];
        snprintf(what, sizeof what, "%s round %d", name, round);
        tu_expect(all_poison(pin[0], nl) && all_poison(pin[1], nl),
                  "%s: the logits are not there before the fences are waited for", what);
        tu_expect_ok(M->fence_wait(fence[0]), "fence_wait 0");
        bits_equal(pin[0], ref[0], nl, what);
        tu_expect(all_poison(pin[1], nl), "%s: the second batch's logits wait for its own fence", what);
        tu_expect_ok(M->fence_wait(fence[1]), "fence_wait 1");
        bits_equal(pin[1], ref[1], nl, what);
    }
    tu_expect(tu_fake.async_uploads == 6 && tu_fake.uploads == 0 && tu_fake.async_src_changed == 0,
              "%s: 6 asynchronous uploads, no synchronous one, sources unchanged until their fences (%ld, %ld, %ld)",
              name, tu_fake.async_uploads, tu_fake.uploads, tu_fake.async_src_changed);
    tu_expect(tu_fake.async_downloads == 6 && tu_fake.downloads == 0 && tu_fake.fence_records == 6 &&
                  tu_fake.graph_launches >= 4 && tu_fake.foreign_ptrs == 0 && tu_fake.bad_memory == 0,
              "%s: 6 asynchronous downloads, no synchronous one, 6 fences, replays (%ld, %ld, %ld, %ld launches; %ld "
              "foreign, %ld bad)",
              name, tu_fake.async_downloads, tu_fake.downloads, tu_fake.fence_records, tu_fake.graph_launches,
              tu_fake.foreign_ptrs, tu_fake.bad_memory);

    /* The fake's own check: an input changed after its start and before its
     * fence is waited for (a GPU could upload the new values) is counted. */
    ts_tensor lp = ts_tensor_view(pin[0], N, K, H, W);
    tu_fake_reset_counts();
    if (tu_expect_ok(ts_unet_device_forward_start(&d, dev, &xp[0], &lp, fence[0]), "forward_start")) {
        xp[0].data[5] += 1;
        tu_expect_ok(M->fence_wait(fence[0]), "fence_wait");
        xp[0].data[5] -= 1;
        tu_expect(tu_fake.async_src_changed == 1, "%s: an input changed before its fence is seen (%ld)", name,
                  tu_fake.async_src_changed);
    }

    /* Refusals. */
    tu_expect_error(ts_unet_device_forward_start(&d, dev, &xp[0], &lp, NULL), TS_ERR_INVALID_ARG, "NULL fence",
                    "forward_start", "fence", NULL);
    tu_fake_reset_counts();
    tu_expect_error(ts_unet_device_forward_start(&d, dev, &xp[0], &host, fence[0]), TS_ERR_INVALID_ARG,
                    "logits outside pinned memory", "host_alloc", NULL);
    tu_expect(tu_fake.bad_memory == 1, "%s: the copy into pageable memory is counted (%ld)", name, tu_fake.bad_memory);
    /* After an error, what was queued (the upload) is waited for before its buffer may go. */
    tu_expect_ok(M->sync(), "sync after an error");
    tu_fake_reset_counts();
    tu_expect_error(ts_unet_device_forward_start(&d, dev, &x[0], &lp, fence[0]), TS_ERR_INVALID_ARG,
                    "input outside pinned memory", "upload_async", "host_alloc", NULL);
    tu_expect(tu_fake.bad_memory == 1 && tu_fake.async_downloads == 0,
              "%s: the copy from pageable memory is counted and nothing follows it (%ld, %ld downloads)", name,
              tu_fake.bad_memory, tu_fake.async_downloads);
    tu_fake_reset_counts();
    if (tu_expect_ok(ts_unet_device_init(&dc, &m, cpu->backend), "init on the cpu"))
        tu_expect_error(ts_unet_device_forward_start(&dc, cpu, &x[0], &host, fence[0]), TS_ERR_UNSUPPORTED,
                        "forward_start on the CPU backend", "forward_start", "cpu", "download_async",
                        "ts_unet_device_forward", NULL);
    tu_fake_device_set_async(0);
    tu_expect_error(ts_unet_device_forward_start(&d, dev, &xp[0], &lp, fence[0]), TS_ERR_UNSUPPORTED,
                    "forward_start without asynchronous members", "fake-device", "download_async", NULL);
    tu_fake_device_set_async(1);
    /* Nothing of it can be recorded in a graph. */
    if (tu_expect_ok(B->graphs->begin(), "graph begin")) {
        void *q = NULL, *f = NULL, *g = NULL;
        tu_expect_error(M->host_alloc(&q, 64), TS_ERR_INVALID_ARG, "host_alloc while recording", "recorded", NULL);
        tu_expect_error(M->download_async(pin[0], d.weights, 64), TS_ERR_INVALID_ARG, "download_async while recording",
                        "recorded", NULL);
        tu_expect_error(M->upload_async(d.weights, pin[0], 64), TS_ERR_INVALID_ARG, "upload_async while recording",
                        "recorded", NULL);
        tu_expect_error(M->fence_new(&f), TS_ERR_INVALID_ARG, "fence_new while recording", "recorded", NULL);
        tu_expect_error(M->fence_record(fence[0]), TS_ERR_INVALID_ARG, "fence_record while recording", "recorded",
                        NULL);
        tu_expect_error(M->fence_wait(fence[0]), TS_ERR_INVALID_ARG, "fence_wait while recording", "recorded", NULL);
        tu_expect_ok(B->graphs->end(&g), "graph end");
        B->graphs->free(g);
        tu_expect(q == NULL && f == NULL, "%s: nothing allocated while recording", name);
    }
out:
    for (int i = 0; i < 2; i++) {
        M->host_free(pin[i]);
        M->host_free(pin_x[i]);
        M->fence_free(fence[i]);
    }
    ts_unet_device_free(&dc);
    ts_unet_device_free(&d);
    tu_expect(tu_fake.host_live == 0 && tu_fake.fences_live == 0 && tu_fake.bad_memory == 0,
              "%s: pinned buffers and fences freed (%ld, %ld left; %ld bad)", name, tu_fake.host_live,
              tu_fake.fences_live, tu_fake.bad_memory);
    for (int i = 0; i < 2; i++) {
        tu_tensor_free(&x[i], name, "x");
        free(ref[i]);
    }
    tu_tensor_free(&host, name, "host logits");
    ts_unet_free(&m);
}

int main(void)
{
    ts_ctx cpu, dev;
    tu_init(&cpu);
    cpu.backend = ts_backend_cpu();
    tu_expect_ok(ts_ctx_init(&dev, tu_fake_device_backend()), "fake device context");
    static const int d5[5] = {32, 16, 16, 8, 8}, d3[3] = {16, 16, 8};
    ts_unet_config bn = tu_unet_config(3, 4, 5, d5, 1), nobn = tu_unet_config(4, 1, 3, d3, 0);
    test_equal(&cpu, &dev, &bn, "depth 5, decoder BN");
    test_equal(&cpu, &dev, &nobn, "depth 3, no decoder BN, 1 class");
    test_errors(&cpu, &dev);
    test_cpu_memory(&cpu);
    test_train_copy(&cpu, &dev, &bn, "training copy, depth 5, decoder BN");
    test_train_copy(&cpu, &dev, &nobn, "training copy, depth 3, no decoder BN");
    test_train_init_failures(&dev);
    test_graphs(&cpu, &dev);
    test_forward_start(&cpu, &dev);
    ts_ctx_free(&dev);
    ts_ctx_free(&cpu);
    return tu_finish("unet_device");
}
