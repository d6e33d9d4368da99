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
 *       weights, BN statistics, counters, AdamW moments, the step count
 *       and the loss scaler's state. In float32, in bf16, and in fp16 with
 *       loss scaling (ts_unet_device_set_precision on every copy, the
 *       resumed one included; for fp16 the scaler's state survives the
 *       checkpoint and none of the 4 steps is skipped).
 *   (d) Mixed precision against the CPU reference: a bf16 training copy,
 *       and an fp16 one with loss scaling, on the CUDA backend and on the
 *       CPU backend (kernels/cpu/half.c: widen, compute in float32, round
 *       once) at the same precision, with the float32 host model alongside
 *       for the scale of the type's own error: logits, losses, BN running
 *       statistics and counters, gradients (cosine per parameter, norms)
 *       after one step, the first AdamW step updating (not skipped, the
 *       scale kept), and the losses of 2 more steps. Bounds and their
 *       derivation above half_vs_cpu.
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
    ts_unet_config cfg = tu_unet_config(c[0], c[1], c[2], c + 3, c[8]);
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

/* steps optimizer steps (batch i % 2) on copy d with optimizer o; dloss is
 * the optimizer's (1, or the loss scale). */
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
            !tu_expect_ok(ts_loss_backward(loss, gpu, &dl, &lg, rd->t_dev[s % 2], ts_optim_loss_scale(o)), "dloss") ||
            !tu_expect_ok(ts_unet_device_backward(d, gpu, &dl), "backward") ||
            !tu_expect_ok(ts_optim_step_on(o, gpu, &tr, lr, &gn), "step"))
            return 0;
    }
    return 1;
}

typedef struct snapshot {
    float *w, *b, *ea, *es;
    int64_t *cnt;
    long step, growth, skipped; /* the optimizer's counters and its loss scaler's */
    double scale;
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
    s->step = o->step;
    s->growth = o->growth_tracker;
    s->skipped = o->skipped_steps;
    s->scale = o->loss_scale;
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
    int dc = memcmp(a->cnt, b->cnt, d->n_counters * sizeof(int64_t)) != 0 || a->step != b->step ||
             a->growth != b->growth || a->skipped != b->skipped || a->scale != b->scale;
    tu_expect(dw == 0 && db == 0 && de == 0 && !dc,
              "%s: bit for bit (%zu weights, %zu BN statistics, %zu AdamW moments differ; counters %s: steps %ld / %ld, "
              "loss scale %g / %g, growth %ld / %ld, skipped %ld / %ld)",
              what, dw, db, de, dc ? "differ" : "equal", a->step, b->step, a->scale, b->scale, a->growth, b->growth,
              a->skipped, b->skipped);
}

/* A training copy of m on gpu's backend at precision prec. */
static int train_copy(ts_unet_device *d, const ts_unet *m, ts_ctx *gpu, ts_dtype prec, const char *what)
{
    if (!tu_expect_ok(ts_unet_device_init_train(d, m, gpu->backend), what)) return 0;
    return prec == TS_F32 || tu_expect_ok(ts_unet_device_set_precision(d, gpu, prec), "set_precision");
}

/* (c) at precision prec: float32, bf16, and fp16 with loss scaling. The
 * fp16 runs start from a loss scale of 2^15 (as after one skipped step):
 * a resumed optimizer starts at 2^16, so a scale that did not survive the
 * checkpoint shows in the scaler's state and in the bits (the scale
 * decides which small gradients underflow in fp16). */
static void determinism(ts_ctx *gpu, ts_dtype prec)
{
    const ts_backend *G = gpu->backend;
    const char *pn = ts_dtype_name(prec);
    char what[96];
    static const int dec[5] = {64, 32, 32, 16, 16};
    ts_unet_config cfg = tu_unet_config(4, 5, 5, dec, 1);
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
    oc.loss_scaling = prec == TS_F16;
    const double scale0 = TS_LOSS_SCALE_INIT / 2;
    snapshot s[3];
    memset(s, 0, sizeof s);
    ts_dict ck;
    ts_dict_init(&ck);
    for (int run = 0; run < 3; run++) {
        ts_unet_device d;
        ts_optim o;
        memset(&o, 0, sizeof o);
        memset(&d, 0, sizeof d);
        if (!train_copy(&d, &m, gpu, prec, "copy") || !tu_expect_ok(ts_optim_init_on(&o, &oc, &m, G), "optimizer")) {
            ts_unet_device_free(&d);
            break;
        }
        if (oc.loss_scaling) o.loss_scale = scale0;
        if (run < 2) {
            /* 4 steps in a row, twice */
            if (train_steps(gpu, &d, &o, &loss, &rd, 0, 4)) snap(&d, &o, &s[run]);
        } else if (train_steps(gpu, &d, &o, &loss, &rd, 0, 2)) {
            /* 2 steps, a checkpoint through the host, 2 more on fresh objects */
            ts_unet h;
            if (tu_expect_ok(ts_unet_init(&h, &cfg), "host model") &&
                tu_expect_ok(ts_unet_device_download_params(&d, &h), "download") &&
                tu_expect_ok(ts_optim_save(&o, &h, &ck), "optimizer save")) {
                const double scale = o.loss_scale;
                const long growth = o.growth_tracker;
                ts_unet_device_free(&d);
                ts_optim_free(&o);
                /* A fresh copy at the precision again (it is not in the
                 * checkpoint: a run's setting) and a fresh optimizer. */
                if (train_copy(&d, &h, gpu, prec, "resumed copy") &&
                    tu_expect_ok(ts_optim_init_on(&o, &oc, &h, G), "resumed optimizer") &&
                    tu_expect_ok(ts_optim_load(&o, &h, &ck), "optimizer load")) {
                    if (oc.loss_scaling)
                        tu_expect(ts_dict_find(&ck, "optimizer.loss_scale") && o.loss_scale == scale &&
                                      scale == scale0 && o.growth_tracker == growth && growth == 2,
                                  "%s: the loss scaler survives the checkpoint (scale %g, growth %ld; saved %g, %ld)",
                                  pn, o.loss_scale, o.growth_tracker, scale, growth);
                    if (train_steps(gpu, &d, &o, &loss, &rd, 2, 2)) snap(&d, &o, &s[2]);
                }
            }
            ts_unet_free(&h);
        }
        ts_unet_device_free(&d);
        ts_optim_free(&o);
    }
    ts_unet_device dd;
    if (tu_expect_ok(ts_unet_device_init_train(&dd, &m, G), "copy for sizes")) {
        snprintf(what, sizeof what, "%s deterministic mode: 4 steps twice", pn);
        snap_equal(&s[0], &s[1], &dd, what);
        snprintf(what, sizeof what, "%s resume after 2 of 4 steps", pn);
        snap_equal(&s[0], &s[2], &dd, what);
    }
    if (oc.loss_scaling)
        tu_expect(s[0].w && s[0].step == 4 && s[0].skipped == 0 && s[0].scale == scale0 && s[0].growth == 4,
                  "%s: 4 good steps with loss scaling: none skipped (%ld), scale %g kept, growth %ld", pn, s[0].skipped,
                  s[0].scale, s[0].growth);
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

/* ---- (d) mixed precision: the CUDA training copy against the CPU's ---- */


static double max_abs_diff(const float *a, const float *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= m)) m = d; /* NaN propagates */
    }
    return m;
}

/* One training copy at a precision with its optimizer, labels and dlogits
 * in its backend's memory: the CUDA one, and the CPU one that is its
 * reference (kernels/cpu/half.c). */
typedef struct half_side {
    ts_ctx *ctx;
    ts_unet_device d;
    ts_optim o;
    int32_t *y;
    float *dl;
    float *logits, *grads, *stats; /* host copies after the last step */
    ts_loss_value lv;
} half_side;

static int side_init(half_side *s, ts_ctx *ctx, const ts_unet *m, ts_dtype prec, const ts_optim_config *oc,
                     const int32_t *y, size_t npix, size_t nl)
{
    const ts_backend *B = ctx->backend;
    memset(s, 0, sizeof *s);
    s->ctx = ctx;
    float *zeros = calloc(nl, sizeof(float));
    int ok = zeros && tu_expect_ok(ts_unet_device_init_train(&s->d, m, B), "training copy") &&
             tu_expect_ok(ts_unet_device_set_precision(&s->d, ctx, prec), "set_precision") &&
             tu_expect_ok(ts_optim_init_on(&s->o, oc, m, B), "optimizer") &&
             (s->y = put(B, y, npix * sizeof(int32_t))) && (s->dl = put(B, zeros, nl * sizeof(float)));
    free(zeros);
    return ok;
}

static void side_free(half_side *s)
{
    if (!s->ctx) return;
    const ts_backend *B = s->ctx->backend;
    free(s->logits);
    free(s->grads);
    free(s->stats);
    B->memory->free(s->y);
    B->memory->free(s->dl);
    ts_optim_free(&s->o);
    ts_unet_device_free(&s->d);
}

/* zero_grad, train forward, loss, dloss = the optimizer's loss scale (2^16
 * with loss scaling), backward; the logits, gradients and BN statistics
 * downloaded. */
static int side_step(half_side *s, const ts_loss *loss, const ts_tensor *x)
{
    ts_ctx *c = s->ctx;
    const ts_backend *B = c->backend;
    ts_tensor lg, dl = ts_tensor_view(s->dl, x->n, loss->classes, x->h, x->w);
    free(s->logits);
    free(s->grads);
    free(s->stats);
    s->logits = s->grads = s->stats = NULL;
    if (!tu_expect_ok(ts_unet_device_zero_grad(&s->d, c), "zero_grad") ||
        !tu_expect_ok(ts_unet_device_run(&s->d, c, x, 1, &lg), "train run") ||
        !tu_expect_ok(ts_loss_forward(loss, c, &lg, s->y, &s->lv), "loss") ||
        !tu_expect_ok(B->zero(c, dl.data, ts_tensor_numel(&dl)), "zero dl") ||
        !tu_expect_ok(ts_loss_backward(loss, c, &dl, &lg, s->y, ts_optim_loss_scale(&s->o)), "dloss") ||
        !tu_expect_ok(ts_unet_device_backward(&s->d, c, &dl), "backward"))
        return 0;
    s->logits = fetch(B, lg.data, ts_tensor_numel(&lg) * sizeof(float));
    s->grads = fetch(B, s->d.grads, s->d.n_weights * sizeof(float));
    s->stats = fetch(B, s->d.buffers, s->d.n_buffers * sizeof(float));
    return s->logits && s->grads && s->stats;
}

/* The bounds of (d), on tests/test_mixed.c's configuration (depth 3,
 * decoder {16,8,8}, 2 x 3 x 67 x 64, its seeds): deeper on a small tile a
 * BN over a handful of values makes the gradients of a random network
 * ill-conditioned (see there), so the gradient comparisons need this depth.
 *
 * Both copies cast the same float32 master weights and input to the same
 * half values; every op takes the same half inputs, accumulates in float32
 * and rounds. The GPU differs from the CPU reference where it rounds
 * differently (test_cuda_half.c's per-op accounting): float32 summation
 * order, which moves a rounding to the neighbouring half value now and then
 * (<= 1 ulp), a second rounding where a conv has a bias (cuDNN's output,
 * then the epilogue) and in cuDNN's beta = 1 blend of backward data /
 * filter (<= 1 ulp more). A random network in train mode amplifies even
 * such sparse one-ulp flips (max-pool ties, BN channels of small variance)
 * to about the size of the half type's own error against float32: a model
 * of these differences on the host (the CPU backend with the second
 * roundings and 2 eps sqrt(K) rms noise under every conv's rounding; an
 * estimate, not a GPU) gave 0.7 to 0.9 times the CPU half copy's error
 * against float32 for the logits and BN statistics, and gradient cosines as close
 * to the CPU's as the CPU's are to float32. So the reference scale is the
 * CPU half copy's distance from float32, measured in the same run (the
 * float32 model is the host model on the CPU, trained alongside):
 *
 *   - logits and BN running statistics (step 1): within REF_RATIO = 3
 *     times that error, plus 1/4 ulp of the largest value against a small
 *     one by chance. Two copies whose roundings were as large as the type's
 *     and independent would be sqrt(2) times it apart; 3 leaves a factor 2
 *     for the GPU's extra roundings. A wrong layout, a lost bias or cast,
 *     running statistics not updated are O(1) off. A conv that loses a
 *     little precision (sums in a few half-rounded chunks) is not caught
 *     at this level: test_cuda_half.c holds each op to a few ulps.
 *   - losses (every step): with m = max |logits_cuda - logits_cpu|, CE =
 *     logsumexp(z) - z_y moves by <= 2m; the softmax moves each p by a
 *     factor within exp(+-2m), so each Dice ratio 2I / (P + T) <= 1 by a
 *     factor within exp(+-4m), by <= expm1(4m); 0.5 CE + 0.5 Dice by <= m +
 *     0.5 expm1(4m) (3m to first order), + 1e-6 |loss| for the reductions'
 *     float order: float32 loss kernels on float32 logits.
 *   - gradients (step 1): per parameter (every used trainable tensor) and
 *     the whole vector, test_mixed.c's cosine bounds for the half type
 *     against float32 (0.75 / 0.9 bf16, 0.95 / 0.98 fp16; it measured
 *     0.862 / 0.937 and 0.983 / 0.993, this run prints the same cosines):
 *     the GPU is as far from the CPU as the type is from float32 (model:
 *     0.930 / 0.961 bf16, 0.984 / 0.992 fp16), while a missed gradient add,
 *     a wrong layout or offset gives cosines near 0. The per-parameter
 *     gradient norms: median and worst relative error within NORM_RATIO =
 *     5 times the CPU half copy's against float32, plus 1e-3: many of
 *     these tensors are small (biases, BN parameters: 8 to 64 values),
 *     where the GPU's extra roundings weigh more (the model: up to 2.2
 *     times for fp16, whose finer ulp lets float32 summation noise move
 *     more of its roundings).
 *   - AdamW steps 2 and 3 (the float32 model stepped alongside): AdamW's
 *     first steps move every weight by about lr * sign(grad), so models
 *     whose gradients differ in small components drift apart by 2 lr where
 *     a sign differs: after a step the logits of the half copy are 0.1-0.4
 *     of their scale from float32's (printed), too far for the bound above
 *     to mean anything. The loss, an average, drifts by 1-10 % of what the
 *     step changed it (half against float32 here, printed). So the two
 *     copies' losses agree to 1/4 of the step's change; a skipped or
 *     misapplied update is off by about the whole change. */
#define REF_RATIO 3.0
#define NORM_RATIO 5.0

static double ulp_rel(ts_dtype t) { return t == TS_BF16 ? 0x1p-8 : 0x1p-11; }

/* Worst per-parameter cosine (and its name) over the used trainable tensors. */
static double worst_cosine(const ts_unet *m, const float *a, const float *b, const char **name, int *count)
{
    double worst = 1;
    *name = "";
    *count = 0;
    for (int i = 0; i < m->n_params; i++) {
        const ts_param *p = &m->params[i];
        if (p->kind != TS_PARAM_WEIGHT || !p->used) continue;
        double c = tu_cosine(a + p->offset, b + p->offset, p->numel);
        ++*count;
        if (!(c >= worst)) {
            worst = c;
            *name = p->name;
        }
    }
    return worst;
}

/* Step 1's BN statistics, counters and gradients: cuda (g) and cpu (c) at
 * the half type, ref the float32 host model after the same step. */
static void check_step1(const ts_unet *ref, const half_side *g, const half_side *c, ts_dtype prec)
{
    const char *pn = ts_dtype_name(prec);
    double e = rel_max(g->stats, c->stats, ref->n_buffers), e_ref = rel_max(c->stats, ref->buffers, ref->n_buffers);
    double bnd = REF_RATIO * e_ref + 0.25 * ulp_rel(prec);
    printf("  %s BN running statistics: cuda vs cpu %.3e, cpu vs f32 %.3e\n", pn, e, e_ref);
    tu_expect(e <= bnd, "%s: BN running statistics cuda vs cpu %.3e <= %.3e (%.0f x cpu vs f32 + 1/4 ulp)", pn, e, bnd,
              REF_RATIO);
    tu_expect(memcmp(g->d.counters, c->d.counters, ref->n_counters * sizeof(int64_t)) == 0 && g->d.counters[0] == 1,
              "%s: num_batches_tracked after one train forward", pn);
    /* Scaled by 2^16 on all three with loss scaling: cosines and relative
     * norms do not see the scale. */
    const char *wn, *wn_ref;
    int cnt, cnt_ref;
    const double cw = worst_cosine(ref, g->grads, c->grads, &wn, &cnt);
    const double cw_ref = worst_cosine(ref, c->grads, ref->grads, &wn_ref, &cnt_ref);
    const double ca = tu_cosine(g->grads, c->grads, ref->n_weights), ca_ref = tu_cosine(c->grads, ref->grads, ref->n_weights);
    const double bw = prec == TS_BF16 ? 0.75 : 0.95, ba = prec == TS_BF16 ? 0.9 : 0.98;
    printf("  %s gradient cosines: cuda vs cpu worst %.6f (%s) whole %.6f; cpu vs f32 worst %.6f (%s) whole %.6f\n",
           pn, cw, wn, ca, cw_ref, wn_ref, ca_ref);
    tu_expect(cw >= bw && cnt > 50, "%s: every parameter's gradient (%d) cuda vs cpu within cosine %g (worst %.6f at %s)",
              pn, cnt, bw, cw, wn);
    tu_expect(ca >= ba, "%s: the whole gradient cuda vs cpu within cosine %g (%.6f)", pn, ba, ca);
    double med, worst, med_ref, worst_ref;
    const char *nn, *nn_ref;
    norm_errors(ref, g->grads, NULL, 1, c->grads, &med, &worst, &nn);
    norm_errors(ref, c->grads, NULL, 1, ref->grads, &med_ref, &worst_ref, &nn_ref);
    const double bmed = NORM_RATIO * med_ref + 1e-3, bworst = NORM_RATIO * worst_ref + 1e-3;
    printf("  %s gradient norms: cuda vs cpu rel median %.2e worst %.2e (%s); cpu vs f32 median %.2e worst %.2e (%s)\n",
           pn, med, worst, nn, med_ref, worst_ref, nn_ref);
    tu_expect(med <= bmed && worst <= bworst, "%s: gradient norms cuda vs cpu: median %.2e <= %.2e, worst %.2e <= %.2e",
              pn, med, bmed, worst, bworst);
}

static void half_vs_cpu(ts_ctx *cpu, ts_ctx *gpu, ts_dtype prec)
{
    const char *pn = ts_dtype_name(prec);
    static const int dec[3] = {16, 8, 8};
    const ts_unet_config cfg = tu_unet_config(3, 4, 3, dec, 1);
    const int N = 2, K = cfg.classes, H = 67, W = 64;
    const size_t npix = (size_t)N * H * W, nl = npix * (size_t)K;
    ts_unet m;
    if (!tu_expect_ok(ts_unet_init(&m, &cfg), "unet init")) return;
    ts_unet_init_random(&m, 5);
    tu_rng rng;
    tu_rng_seed(&rng, 7);
    ts_tensor x = tu_tensor(N, 3, H, W), dl = tu_tensor(N, K, H, W);
    tu_fill(&rng, x.data, ts_tensor_numel(&x), -1, 1);
    int32_t *y = tu_alloc_i32(npix);
    for (size_t i = 0; i < npix; i++) y[i] = tu_randint(&rng, K);
    ts_loss_config lc = ts_loss_default_config();
    ts_loss loss;
    ts_optim_config oc = ts_optim_default_config();
    oc.loss_scaling = prec == TS_F16; /* GradScaler: fp16's narrow range needs it, bf16's does not */
    half_side g, c;
    memset(&g, 0, sizeof g);
    memset(&c, 0, sizeof c);
    ts_optim oh; /* the float32 host model's, the same configuration */
    memset(&oh, 0, sizeof oh);
    float *w0 = malloc(m.n_weights * sizeof(float)), *wg = NULL;
    tu_expect_ok(ts_loss_init(&loss, &lc, K), "loss");
    if (!w0 || !side_init(&g, gpu, &m, prec, &oc, y, npix, nl) || !side_init(&c, cpu, &m, prec, &oc, y, npix, nl) ||
        !tu_expect_ok(ts_optim_init(&oh, &oc, &m), "host optimizer"))
        goto out;
    memcpy(w0, m.weights, m.n_weights * sizeof(float));
    ts_unet_trainable tg = ts_unet_device_trainable(&g.d), tc = ts_unet_device_trainable(&c.d);
    double prev_loss = 0;
    for (int t = 1; t <= 3; t++) {
        /* The same batch through the three models. */
        ts_tensor lg;
        ts_loss_value lv32;
        if (!side_step(&g, &loss, &x) || !side_step(&c, &loss, &x) ||
            !tu_expect_ok(ts_unet_zero_grad(&m, cpu), "host zero") ||
            !tu_expect_ok(ts_unet_forward(&m, cpu, &x, 1, &lg), "host forward") ||
            !tu_expect_ok(ts_loss_forward(&loss, cpu, &lg, y, &lv32), "host loss") ||
            !tu_expect_ok(ts_loss_backward(&loss, cpu, &dl, &lg, y, ts_optim_loss_scale(&oh)), "host dloss") ||
            !tu_expect_ok(ts_unet_backward(&m, cpu, &dl), "host backward"))
            goto out;
        const double e = rel_max(g.logits, c.logits, nl), e_ref = rel_max(c.logits, lg.data, nl);
        const double bnd = REF_RATIO * e_ref + 0.25 * ulp_rel(prec);
        const double dz = max_abs_diff(g.logits, c.logits, nl), dloss = fabs(g.lv.total - c.lv.total);
        const double bl = dz + 0.5 * expm1(4 * dz) + 1e-6 * fabs(c.lv.total);
        printf("  %s step %d: logits cuda vs cpu %.3e, cpu vs f32 %.3e; loss cuda %.9g cpu %.9g f32 %.9g\n", pn, t, e,
               e_ref, g.lv.total, c.lv.total, lv32.total);
        if (t == 1)
            tu_expect(e <= bnd, "%s: train logits cuda vs cpu %.3e <= %.3e (%.0f x cpu vs f32 %.3e + 1/4 ulp)", pn, e, bnd,
                      REF_RATIO, e_ref);
        tu_expect(dloss <= bl, "%s step %d: loss cuda %.9g vs cpu %.9g: |diff| %.3e <= the logits' bound %.3e", pn, t,
                  g.lv.total, c.lv.total, dloss, bl);
        if (t > 1)
            tu_expect(dloss <= 0.25 * fabs(c.lv.total - prev_loss),
                      "%s AdamW step %d: loss cuda %.9g vs cpu %.9g: |diff| %.3e <= 1/4 of the step's change %.3e", pn,
                      t, g.lv.total, c.lv.total, dloss, fabs(c.lv.total - prev_loss));
        prev_loss = c.lv.total;
        if (t == 1) check_step1(&m, &g, &c, prec);
        if (!tu_expect_ok(ts_optim_step_on(&g.o, gpu, &tg, 1e-3, NULL), "cuda step") ||
            !tu_expect_ok(ts_optim_step_on(&c.o, cpu, &tc, 1e-3, NULL), "cpu step") ||
            !tu_expect_ok(ts_optim_step(&oh, cpu, &m, 1e-3, NULL), "host step"))
            goto out;
        tu_expect(!g.o.last_skipped && !c.o.last_skipped && !oh.last_skipped && g.o.step == t,
                  "%s step %d: not skipped (cuda %d, cpu %d, f32 %d), step count %ld", pn, t, g.o.last_skipped,
                  c.o.last_skipped, oh.last_skipped, g.o.step);
        if (t > 1) continue;
        /* The first step updates; with loss scaling the scale is kept (it
         * doubles after 2000 good steps). */
        wg = fetch(gpu->backend, g.d.weights, m.n_weights * sizeof(float));
        size_t moved = 0, used = 0; /* of the used trainable values (depth 3 leaves most of ResNet-34 out) */
        for (int i = 0; wg && i < m.n_params; i++) {
            const ts_param *p = &m.params[i];
            if (p->kind != TS_PARAM_WEIGHT || !p->used) continue;
            used += p->numel;
            for (size_t k = p->offset; k < p->offset + p->numel; k++) moved += wg[k] != w0[k];
        }
        tu_expect(moved > used / 2, "%s: the first step updates the weights (%zu of %zu used values moved)", pn, moved,
                  used);
        if (oc.loss_scaling)
            tu_expect(g.o.loss_scale == TS_LOSS_SCALE_INIT && g.o.growth_tracker == 1 && g.o.skipped_steps == 0,
                      "%s: loss scale %g after a good step (growth %ld, skipped %ld)", pn, g.o.loss_scale,
                      g.o.growth_tracker, g.o.skipped_steps);
    }
out:
    free(w0);
    free(wg);
    side_free(&g);
    side_free(&c);
    ts_optim_free(&oh);
    ts_loss_free(&loss);
    tu_free(y, SUITE, "labels");
    tu_tensor_free(&x, SUITE, "x");
    tu_tensor_free(&dl, SUITE, "dl");
    ts_unet_free(&m);
}

int main(void)
{
    char name[64];
    tu_gpu_device_name(name, sizeof name);
    ts_ctx cpu, gpu;
    tu_init(&cpu);
    cpu.backend = ts_backend_cpu();
    const ts_backend *b = NULL;
    if (!tu_gpu_backend(name, &b)) return tu_finish(SUITE);
    ts_cuda_set_tf32(0);
    ts_cuda_set_deterministic(1);
    ts_ctx_init(&gpu, b);
    const char *cases[] = {"in4_k6_d5_100x76", "in4_k6_d3_64x64", "in3_k6_d4_nobn_64x48", "in3_k1_d5_64x64"};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) parity(&cpu, &gpu, cases[i]);
    determinism(&gpu, TS_F32);
    determinism(&gpu, TS_BF16);
    determinism(&gpu, TS_F16);
    half_vs_cpu(&cpu, &gpu, TS_BF16);
    half_vs_cpu(&cpu, &gpu, TS_F16);
    ts_ctx_free(&gpu);
    ts_ctx_free(&cpu);
    return tu_finish(SUITE);
}
