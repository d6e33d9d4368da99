/* Training on the CUDA backend: the U-Net's training copy
 * (ts_unet_device_init_train) and the optimizer's state (ts_optim_init_on)
 * in device memory, TF32 off, deterministic mode on.
 *
 *   (a) SMP parity on the GPU, per fixture of tests/fixtures/smp (real
 *       segmentation_models_pytorch output, tests/make_smp_fixtures.py):
 *       eval and train logits, BN running statistics and num_batches_tracked
 *       after the train forward, CE / Dice losses, the gradient norms of
 *       CE + Dice(smp), and the loss of 3 AdamW steps. The bounds are
 *       test_unet.c's for the CPU against the same fixtures (see "Why the
 *       gradient and AdamW bounds are statistical" there).
 *   (b) The same gradients against the CPU path (the host model on the CPU
 *       backend), with the same bounds.
 *   (c) Determinism and bit-exact resume: 4 steps twice give the same bits;
 *       2 steps, a checkpoint round trip (weights and BN statistics
 *       downloaded, the optimizer saved to a dictionary, a fresh copy and
 *       optimizer made from them) and 2 more give the bits of 4 in a row:
 *       weights, BN statistics, counters, AdamW moments.
 *
 * Device: TERRASEG_TEST_DEVICE (cuda, cuda:N or N; cuda:0 by default). Fails,
 * never skips, without a usable device: it runs only from tools/test_gpu.sh
 * (CTest label "gpu"). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "nn/unet.h"
#include "tests/fixture.h"
#include "tests/smp_fill.h"
#include "tests/testutil.h"
#include "train/loss.h"
#include "train/optim.h"
#include "weights/dict.h"

#define SUITE "cuda_train"

static ts_unet_config make_cfg(int in, int k, int depth, const int *dec, int use_bn)
{
    ts_unet_config c = ts_unet_default_config(in, k);
    c.encoder_depth = depth;
    for (int i = 0; i < TS_UNET_MAX_DEPTH; i++) c.decoder_channels[i] = i < depth ? dec[i] : 0;
    c.decoder_use_batchnorm = use_bn;
    return c;
}

static double rel_max(const float *got, const float *ref, size_t n)
{
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        md = fmax(md, fabs((double)got[i] - ref[i]));
        mr = fmax(mr, fabs((double)ref[i]));
    }
    return mr > 0 ? md / mr : md;
}

static double rel_d(double got, double want) { return fabs(got - want) / fmax(fabs(want), 1e-30); }

/* n device values on the host (NULL on error). */
static void *fetch(const ts_backend *b, const void *p, size_t bytes)
{
    void *h = malloc(bytes ? bytes : 1);
    if (h && !tu_expect_ok(b->memory->download(h, p, bytes), "download")) {
        free(h);
        return NULL;
    }
    return h;
}

static void *put(const ts_backend *b, const void *h, size_t bytes)
{
    void *p = NULL;
    if (!tu_expect_ok(b->memory->alloc(&p, bytes), "device alloc")) return NULL;
    if (!tu_expect_ok(b->memory->upload(p, h, bytes), "upload")) {
        b->memory->free(p);
        return NULL;
    }
    return p;
}

/* dlogits = d(CE + Dice(smp))/dlogits through ctx's backend (target and dl in
 * its memory); *ce and *dsmp the two losses. */
static int loss_grad(ts_ctx *ctx, const ts_tensor *logits, const int32_t *target, ts_tensor *dl, double *ce,
                     double *dsmp)
{
    const ts_backend *B = ctx->backend;
    ts_ce_params cp = {255, NULL};
    ts_dice_params dp = {TS_DICE_SMP, 255, 0.0f, 1e-7f, 0, NULL};
    return tu_expect_ok(B->cross_entropy_forward(ctx, ce, logits, target, &cp), "cross_entropy_forward") &&
           tu_expect_ok(B->dice_forward(ctx, dsmp, logits, target, &dp), "dice_forward(smp)") &&
           tu_expect_ok(B->zero(ctx, dl->data, ts_tensor_numel(dl)), "zero dlogits") &&
           tu_expect_ok(B->cross_entropy_backward(ctx, dl, logits, target, &cp, 1.0f), "cross_entropy_backward") &&
           tu_expect_ok(B->dice_backward(ctx, dl, logits, target, &dp, 1.0f), "dice_backward");
}

/* Per-entry gradient norms of the used trainable entries of a gradient
 * block against reference norms: median and worst relative error. */
static void norm_errors(const ts_unet *m, const float *grads, const double *ref_norms, int ref_per_weight,
                        const float *ref_grads, double *median, double *worst, const char **worst_name)
{
    double *e = calloc((size_t)m->n_params, sizeof *e);
    int n = 0, j = 0;
    *worst = 0;
    *worst_name = "";
    for (int i = 0; e && i < m->n_params; i++) {
        const ts_param *p = &m->params[i];
        if (p->kind != TS_PARAM_WEIGHT) continue;
        int jj = j++;
        if (!p->used) continue;
        double g = 0, r = 0;
        for (size_t k = 0; k < p->numel; k++) g += (double)grads[p->offset + k] * grads[p->offset + k];
        if (ref_per_weight)
            for (size_t k = 0; k < p->numel; k++) r += (double)ref_grads[p->offset + k] * ref_grads[p->offset + k];
        double want = ref_per_weight ? sqrt(r) : ref_norms[jj];
        e[n] = want > 0 ? rel_d(sqrt(g), want) : sqrt(g);
        if (e[n] > *worst) {
            *worst = e[n];
            *worst_name = p->name;
        }
        n++;
    }
    *median = e && n ? tu_quantile(e, n, 0.5) : INFINITY;
    free(e);
}

/* (a) and (b) for one fixture. */
static void parity(ts_ctx *cpu, ts_ctx *gpu, const char *cs)
{
    const ts_backend *G = gpu->backend;
    char path[128];
    snprintf(path, sizeof path, "smp/%s.tsfx", cs);
    fx_file f;
    if (!tu_expect(fx_load(&f, path) == 0, "%s: fixture %s/%s loads", cs, fx_dir(), path)) return;
    const fx_record *rc = fx_get(&f, "config", FX_I32);
    if (!tu_expect(rc && rc->count == 12, "%s: config record", cs)) {
        fx_free(&f);
        return;
    }
    const int32_t *c = rc->data;
    ts_unet_config cfg = make_cfg(c[0], c[1], c[2], c + 3, c[8]);
    const int N = c[9], H = c[10], W = c[11], K = c[1];
    const size_t npix = (size_t)N * H * W, nl = npix * (size_t)K;
    ts_unet m, back;
    memset(&back, 0, sizeof back);
    if (!tu_expect_ok(ts_unet_init(&m, &cfg), "unet init") || !tu_expect_ok(ts_unet_init(&back, &cfg), "unet init")) {
        fx_free(&f);
        return;
    }
    smp_fill_model(&m);
    ts_tensor x = tu_tensor(N, c[0], H, W), dl_host = tu_tensor(N, K, H, W);
    smp_fill_input(x.data, ts_tensor_numel(&x));
    int32_t *target = tu_alloc_i32(npix);
    smp_fill_target(target, npix, K);
    int32_t *t_dev = put(G, target, npix * sizeof(int32_t));
    float *dl_dev = put(G, dl_host.data, nl * sizeof(float));
    ts_unet_device d;
    memset(&d, 0, sizeof d);
    ts_optim o;
    memset(&o, 0, sizeof o);
    float *lh = NULL, *gg = NULL;
    if (!t_dev || !dl_dev || !tu_expect_ok(ts_unet_device_init_train(&d, &m, G), "training copy")) goto out;

    /* eval and train logits */
    ts_tensor lg;
    const fx_record *re = fx_get(&f, "logits_eval", FX_F32), *rt = fx_get(&f, "logits_train", FX_F32);
    if (tu_expect_ok(ts_unet_device_run(&d, gpu, &x, 0, &lg), "eval run") && re &&
        (lh = fetch(G, lg.data, nl * sizeof(float)))) {
        double e = rel_max(lh, re->data, nl);
        printf("  %s logits_eval: rel %.3e\n", cs, e);
        tu_expect(e <= 1e-4, "%s: cuda logits_eval vs SMP rel %.3e <= 1e-4", cs, e);
    }
    free(lh);
    lh = NULL;
    if (!tu_expect_ok(ts_unet_device_run(&d, gpu, &x, 1, &lg), "train run")) goto out;
    if (rt && (lh = fetch(G, lg.data, nl * sizeof(float)))) {
        double e = rel_max(lh, rt->data, nl);
        printf("  %s logits_train: rel %.3e\n", cs, e);
        tu_expect(e <= 1e-4, "%s: cuda logits_train vs SMP rel %.3e <= 1e-4", cs, e);
    }
    if (tu_expect_ok(ts_unet_device_download_params(&d, &back), "download")) {
        const fx_record *rr = fx_get(&f, "bn_running_after_train", FX_F32);
        const fx_record *rb = fx_get(&f, "nbt_after_train", FX_I64);
        if (rr && rr->count == back.n_buffers) {
            double e = rel_max(back.buffers, rr->data, back.n_buffers);
            tu_expect(e <= 1e-5, "%s: cuda running stats vs SMP rel %.3e <= 1e-5", cs, e);
        }
        tu_expect(rb && rb->count == back.n_counters &&
                      memcmp(rb->data, back.counters, back.n_counters * sizeof(int64_t)) == 0,
                  "%s: num_batches_tracked after the train forward", cs);
    }
    /* losses and gradients */
    double ce = 0, dsmp = 0;
    ts_tensor dl = ts_tensor_view(dl_dev, N, K, H, W);
    if (!loss_grad(gpu, &lg, t_dev, &dl, &ce, &dsmp)) goto out;
    const fx_record *rce = fx_get(&f, "loss_ce", FX_F64), *rds = fx_get(&f, "loss_dice_smp", FX_F64);
    if (rce) tu_expect(rel_d(ce, *(const double *)rce->data) <= 1e-5, "%s: cuda CE %.9g vs SMP", cs, ce);
    if (rds) tu_expect(rel_d(dsmp, *(const double *)rds->data) <= 1e-5, "%s: cuda Dice %.9g vs SMP", cs, dsmp);
    if (!tu_expect_ok(ts_unet_device_zero_grad(&d, gpu), "zero_grad") ||
        !tu_expect_ok(ts_unet_device_backward(&d, gpu, &dl), "backward"))
        goto out;
    gg = fetch(G, d.grads, d.n_weights * sizeof(float));
    const fx_record *rgn = fx_get(&f, "grad_norm", FX_F64);
    double med, worst;
    const char *wname;
    if (gg && rgn) {
        norm_errors(&m, gg, rgn->data, 0, NULL, &med, &worst, &wname);
        printf("  %s cuda grads vs SMP: norm rel median %.2e worst %.2e (%s)\n", cs, med, worst, wname);
        tu_expect(med <= 1e-3 && worst <= 1e-2, "%s: cuda gradient norms vs SMP: median %.2e <= 1e-3, worst %.2e <= 1e-2",
                  cs, med, worst);
    }
    /* (b) the CPU path on the same model and batch */
    {
        ts_tensor lc;
        double ce_c = 0, ds_c = 0;
        if (gg && tu_expect_ok(ts_unet_forward(&m, cpu, &x, 1, &lc), "cpu train forward") &&
            loss_grad(cpu, &lc, target, &dl_host, &ce_c, &ds_c) && tu_expect_ok(ts_unet_zero_grad(&m, cpu), "cpu zero") &&
            tu_expect_ok(ts_unet_backward(&m, cpu, &dl_host), "cpu backward")) {
            tu_expect(rel_d(ce, ce_c) <= 1e-5 && rel_d(dsmp, ds_c) <= 1e-5, "%s: losses cuda vs cpu (%.9g %.9g / %.9g %.9g)",
                      cs, ce, dsmp, ce_c, ds_c);
            norm_errors(&m, gg, NULL, 1, m.grads, &med, &worst, &wname);
            printf("  %s cuda grads vs cpu: norm rel median %.2e worst %.2e (%s)\n", cs, med, worst, wname);
            tu_expect(med <= 1e-3 && worst <= 1e-2,
                      "%s: cuda gradient norms vs cpu: median %.2e <= 1e-3, worst %.2e <= 1e-2", cs, med, worst);
        }
    }
    /* AdamW: 3 steps from a fresh fill (lr 1e-3, weight decay 1e-2, no clipping) */
    smp_fill_model(&m);
    ts_optim_config oc = ts_optim_default_config();
    const fx_record *ral = fx_get(&f, "adamw_loss", FX_F64);
    if (tu_expect_ok(ts_unet_device_upload_params(&d, &m), "upload the fresh fill") &&
        tu_expect_ok(ts_optim_init_on(&o, &oc, &m, G), "device optimizer") && ral && ral->count == 3) {
        ts_unet_trainable tr = ts_unet_device_trainable(&d);
        for (int t = 1; t <= 3; t++) {
            if (!tu_expect_ok(ts_unet_device_run(&d, gpu, &x, 1, &lg), "adamw train run") ||
                !loss_grad(gpu, &lg, t_dev, &dl, &ce, &dsmp) || !tu_expect_ok(ts_unet_device_zero_grad(&d, gpu), "zero") ||
                !tu_expect_ok(ts_unet_device_backward(&d, gpu, &dl), "backward") ||
                !tu_expect_ok(ts_optim_step_on(&o, gpu, &tr, 1e-3, NULL), "adamw step"))
                break;
            double e = rel_d(ce + dsmp, ((const double *)ral->data)[t - 1]);
            tu_expect(e <= (t == 1 ? 1e-5 : 1e-3), "%s: cuda adamw loss of step %d %.9g vs SMP (rel %.2e)", cs, t,
                      ce + dsmp, e);
        }
    }
out:
    free(lh);
    free(gg);
    ts_optim_free(&o);
    ts_unet_device_free(&d);
    G->memory->free(t_dev);
    G->memory->free(dl_dev);
    tu_free(target, SUITE, "target");
    tu_tensor_free(&x, SUITE, "x");
    tu_tensor_free(&dl_host, SUITE, "dl");
    ts_unet_free(&m);
    ts_unet_free(&back);
    fx_free(&f);
}

/* ---- (c) determinism and resume ---- */

typedef struct run_data {
    ts_tensor x[2];
    int32_t *t_dev[2];
    float *dl_dev;
    int n, k, h, w;
} run_data;

/* steps optimizer steps (batch i % 2) on copy d with optimizer o. */
static int train_steps(ts_ctx *gpu, ts_unet_device *d, ts_optim *o, const ts_loss *loss, run_data *rd, int first,
                       int steps)
{
    ts_unet_trainable tr = ts_unet_device_trainable(d);
    for (int s = first; s < first + steps; s++) {
        ts_tensor lg, dl = ts_tensor_view(rd->dl_dev, rd->n, rd->k, rd->h, rd->w);
        ts_loss_value lv;
        double lr = 1e-3 * (1.0 + 0.25 * s), gn;
        if (!tu_expect_ok(ts_unet_device_zero_grad(d, gpu), "zero_grad") ||
            !tu_expect_ok(ts_unet_device_run(d, gpu, &rd->x[s % 2], 1, &lg), "run") ||
            !tu_expect_ok(ts_loss_forward(loss, gpu, &lg, rd->t_dev[s % 2], &lv), "loss") ||
            !tu_expect_ok(gpu->backend->zero(gpu, dl.data, ts_tensor_numel(&dl)), "zero dl") ||
            !tu_expect_ok(ts_loss_backward(loss, gpu, &dl, &lg, rd->t_dev[s % 2], 1.0f), "dloss") ||
            !tu_expect_ok(ts_unet_device_backward(d, gpu, &dl), "backward") ||
            !tu_expect_ok(ts_optim_step_on(o, gpu, &tr, lr, &gn), "step"))
            return 0;
    }
    return 1;
}

typedef struct snapshot {
    float *w, *b, *ea, *es;
    int64_t *cnt;
} snapshot;

static void snap(const ts_unet_device *d, const ts_optim *o, snapshot *s)
{
    const ts_backend *G = d->backend;
    s->w = fetch(G, d->weights, d->n_weights * sizeof(float));
    s->b = fetch(G, d->buffers, d->n_buffers * sizeof(float));
    s->ea = fetch(G, o->exp_avg, o->n * sizeof(float));
    s->es = fetch(G, o->exp_avg_sq, o->n * sizeof(float));
    s->cnt = malloc(d->n_counters * sizeof(int64_t));
    if (s->cnt) memcpy(s->cnt, d->counters, d->n_counters * sizeof(int64_t));
}

static void snap_free(snapshot *s)
{
    free(s->w);
    free(s->b);
    free(s->ea);
    free(s->es);
    free(s->cnt);
    memset(s, 0, sizeof *s);
}

static void snap_equal(const snapshot *a, const snapshot *b, const ts_unet_device *d, const char *what)
{
    int ok = a->w && b->w && a->b && b->b && a->ea && b->ea && a->es && b->es && a->cnt && b->cnt;
    if (!tu_expect(ok, "%s: snapshots", what)) return;
    size_t dw = 0, db = 0, de = 0;
    for (size_t i = 0; i < d->n_weights; i++) {
        dw += memcmp(&a->w[i], &b->w[i], 4) != 0;
        de += memcmp(&a->ea[i], &b->ea[i], 4) != 0 || memcmp(&a->es[i], &b->es[i], 4) != 0;
    }
    for (size_t i = 0; i < d->n_buffers; i++) db += memcmp(&a->b[i], &b->b[i], 4) != 0;
    int dc = memcmp(a->cnt, b->cnt, d->n_counters * sizeof(int64_t)) != 0;
    tu_expect(dw == 0 && db == 0 && de == 0 && !dc,
              "%s: bit for bit (%zu weights, %zu BN statistics, %zu AdamW moments differ; counters %s)", what, dw, db,
              de, dc ? "differ" : "equal");
}

static void determinism(ts_ctx *gpu)
{
    const ts_backend *G = gpu->backend;
    static const int dec[5] = {64, 32, 32, 16, 16};
    ts_unet_config cfg = make_cfg(4, 5, 5, dec, 1);
    run_data rd = {.n = 3, .k = 5, .h = 96, .w = 80};
    ts_unet m;
    if (!tu_expect_ok(ts_unet_init(&m, &cfg), "unet init")) return;
    ts_unet_init_random(&m, 5);
    tu_rng rng;
    tu_rng_seed(&rng, 6);
    size_t npix = (size_t)rd.n * rd.h * rd.w;
    int32_t *t = tu_alloc_i32(npix);
    for (int i = 0; i < 2; i++) {
        rd.x[i] = tu_tensor(rd.n, 4, rd.h, rd.w);
        tu_fill(&rng, rd.x[i].data, ts_tensor_numel(&rd.x[i]), -1, 1);
        for (size_t p = 0; p < npix; p++) t[p] = tu_randint(&rng, 10) == 0 ? 255 : tu_randint(&rng, rd.k);
        rd.t_dev[i] = put(G, t, npix * sizeof(int32_t));
    }
    tu_free(t, SUITE, "labels");
    float *zeros = calloc(npix * (size_t)rd.k, sizeof(float));
    rd.dl_dev = zeros ? put(G, zeros, npix * (size_t)rd.k * sizeof(float)) : NULL;
    free(zeros);
    ts_loss_config lc = ts_loss_default_config();
    ts_loss loss;
    tu_expect_ok(ts_loss_init(&loss, &lc, rd.k), "loss");
    ts_optim_config oc = ts_optim_default_config();
    oc.no_decay_1d = 1;
    oc.clip_grad_norm = 1.0;
    snapshot s[3];
    memset(s, 0, sizeof s);
    ts_dict ck;
    ts_dict_init(&ck);
    for (int run = 0; run < 3; run++) {
        ts_unet_device d;
        ts_optim o;
        memset(&o, 0, sizeof o);
        if (!tu_expect_ok(ts_unet_device_init_train(&d, &m, G), "copy") ||
            !tu_expect_ok(ts_optim_init_on(&o, &oc, &m, G), "optimizer")) {
            ts_unet_device_free(&d);
            break;
        }
        if (run < 2) {
            /* 4 steps in a row, twice */
            if (train_steps(gpu, &d, &o, &loss, &rd, 0, 4)) snap(&d, &o, &s[run]);
        } else if (train_steps(gpu, &d, &o, &loss, &rd, 0, 2)) {
            /* 2 steps, a checkpoint through the host, 2 more on fresh objects */
            ts_unet h;
            if (tu_expect_ok(ts_unet_init(&h, &cfg), "host model") &&
                tu_expect_ok(ts_unet_device_download_params(&d, &h), "download") &&
                tu_expect_ok(ts_optim_save(&o, &h, &ck), "optimizer save")) {
                ts_unet_device_free(&d);
                ts_optim_free(&o);
                if (tu_expect_ok(ts_unet_device_init_train(&d, &h, G), "resumed copy") &&
                    tu_expect_ok(ts_optim_init_on(&o, &oc, &h, G), "resumed optimizer") &&
                    tu_expect_ok(ts_optim_load(&o, &h, &ck), "optimizer load") && train_steps(gpu, &d, &o, &loss, &rd, 2, 2))
                    snap(&d, &o, &s[2]);
            }
            ts_unet_free(&h);
        }
        ts_unet_device_free(&d);
        ts_optim_free(&o);
    }
    ts_unet_device dd;
    if (tu_expect_ok(ts_unet_device_init_train(&dd, &m, G), "copy for sizes")) {
        snap_equal(&s[0], &s[1], &dd, "deterministic mode: 4 steps twice");
        snap_equal(&s[0], &s[2], &dd, "resume after 2 of 4 steps");
    }
    ts_unet_device_free(&dd);
    for (int i = 0; i < 3; i++) snap_free(&s[i]);
    for (int i = 0; i < 2; i++) {
        G->memory->free(rd.t_dev[i]);
        tu_tensor_free(&rd.x[i], SUITE, "x");
    }
    G->memory->free(rd.dl_dev);
    ts_dict_free(&ck);
    ts_loss_free(&loss);
    ts_unet_free(&m);
}

int main(void)
{
    const char *env = getenv("TERRASEG_TEST_DEVICE");
    char name[64] = "cuda";
    if (env && *env) snprintf(name, sizeof name, "%s%s", env[0] >= '0' && env[0] <= '9' ? "cuda:" : "", env);
    ts_ctx cpu, gpu;
    tu_init(&cpu);
    cpu.backend = ts_backend_cpu();
    const ts_backend *b = NULL;
    if (strncmp(name, "cuda", 4) != 0 || ts_backend_get(name, &b) != TS_OK || !b) {
        tu_expect(0, "ts_backend_get(\"%s\"): %s (the GPU suite needs a visible CUDA device)", name, ts_last_error());
        return tu_finish(SUITE);
    }
    ts_cuda_set_tf32(0);
    ts_cuda_set_deterministic(1);
    ts_ctx_init(&gpu, b);
    const char *cases[] = {"in4_k6_d5_100x76", "in4_k6_d3_64x64", "in3_k6_d4_nobn_64x48", "in3_k1_d5_64x64"};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) parity(&cpu, &gpu, cases[i]);
    determinism(&gpu);
    ts_ctx_free(&gpu);
    ts_ctx_free(&cpu);
    return tu_finish(SUITE);
}
