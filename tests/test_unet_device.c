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
 *   - the weights are uploaded once per init, the input once per batch, the
 *     logits downloaded once per batch, and a batch of a known shape
 *     allocates nothing;
 *   - the host model refuses to run on a backend whose memory is not host
 *     memory, and the copy refuses another backend's context;
 *   - errors (wrong channels, wrong logits shape, an allocation or an upload
 *     failing in init, in planning, in the input buffer) return a status,
 *     leave nothing allocated that should not be, and leave the copy usable;
 *   - the copy outlives the host model it came from. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nn/unet.h"
#include "tests/fake_device.h"
#include "tests/testutil.h"

static ts_unet_config make_cfg(int in, int k, int depth, const int *dec, int use_bn)
{
    ts_unet_config c = ts_unet_default_config(in, k);
    c.encoder_depth = depth;
    for (int i = 0; i < TS_UNET_MAX_DEPTH; i++) c.decoder_channels[i] = i < depth ? dec[i] : 0;
    c.decoder_use_batchnorm = use_bn;
    return c;
}

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
    ts_unet_config cfg = make_cfg(3, 2, 3, dec, 1);
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
    ts_unet_config cfg = make_cfg(2, 3, 4, dec, 1);
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

int main(void)
{
    ts_ctx cpu, dev;
    tu_init(&cpu);
    cpu.backend = ts_backend_cpu();
    tu_expect_ok(ts_ctx_init(&dev, tu_fake_device_backend()), "fake device context");
    static const int d5[5] = {32, 16, 16, 8, 8}, d3[3] = {16, 16, 8};
    ts_unet_config bn = make_cfg(3, 4, 5, d5, 1), nobn = make_cfg(4, 1, 3, d3, 0);
    test_equal(&cpu, &dev, &bn, "depth 5, decoder BN");
    test_equal(&cpu, &dev, &nobn, "depth 3, no decoder BN, 1 class");
    test_errors(&cpu, &dev);
    test_cpu_memory(&cpu);
    ts_ctx_free(&dev);
    ts_ctx_free(&cpu);
    return tu_finish("unet_device");
}
