/* Mixed precision at the model and optimizer level (nn/unet.h
 * ts_unet_device_set_precision, train/optim.h loss_scaling), without a GPU:
 * the device copies run on the fake device (tests/fake_device.h), whose ops
 * are the CPU backend's, half paths included (kernels/cpu/half.c), so every
 * cast the graph makes is a real rounding and every pointer is checked.
 *
 *   - A bf16 / fp16 training copy's train and eval logits, gradients, BN
 *     statistics and losses are close to the float32 host model's (bounds
 *     measured and derived below) and not equal to them (the half path ran),
 *     and the weights, gradients and statistics stay float32 (the master
 *     copy). A second forward after an optimizer step sees the new weights
 *     (the half cast is refreshed).
 *   - A bf16 / fp16 inference copy is close to the host's folded forward.
 *   - Loss scaling (GradScaler): dloss is scaled; a non-finite gradient skips
 *     the step (weights, moments and the step count untouched) and halves
 *     the scale; a good step unscales exactly, so it updates the weights bit
 *     for bit as an unscaled optimizer does; 2000 good steps double the
 *     scale; the state survives a checkpoint, and is optional in one.
 *   - Misuse: a precision that is not f32/bf16/f16, another backend's
 *     context. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nn/unet.h"
#include "tests/fake_device.h"
#include "tests/testutil.h"
#include "train/loss.h"
#include "train/optim.h"

static ts_unet_config small_cfg(int depth)
{
    static const int dec[5] = {32, 16, 16, 8, 8};
    ts_unet_config c = ts_unet_default_config(3, 4);
    c.encoder_depth = depth;
    for (int i = 0; i < TS_UNET_MAX_DEPTH; i++) c.decoder_channels[i] = i < depth ? dec[i + 5 - depth] : 0;
    return c;
}

static float *fetch(const ts_backend *b, const void *p, size_t n)
{
    float *h = malloc((n ? n : 1) * sizeof *h);
    if (h && b->memory->download(h, p, n * sizeof *h) != TS_OK) {
        free(h);
        return NULL;
    }
    return h;
}

/* max |a - b| / max |b|: the error relative to the tensor's scale, which is
 * how a half type's rounding shows (a relative precision of 2^-8 for bf16,
 * 2^-11 for fp16, per rounding, compounding over the layers). */
static double rel_err(const float *a, const float *b, size_t n, int *differ)
{
    double dmax = 0, rmax = 0;
    *differ = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= dmax)) dmax = d; /* NaN propagates */
        if (fabs((double)b[i]) > rmax) rmax = fabs((double)b[i]);
        if (a[i] != b[i]) *differ = 1;
    }
    return rmax > 0 ? dmax / rmax : dmax;
}


/* The bounds, against what a wrong layout, offset or missing cast gives
 * (errors of order 1, cosines near 0). Measured with these seeds, relative
 * to float32: train logits 0.0047 (fp16) and 0.041 (bf16), eval logits
 * 0.0031 and 0.028, inference copy 0.0018 and 0.014, BN statistics 3e-4
 * and 2.3e-3; the worst parameter's gradient cosine 0.983 (fp16) and 0.862
 * (bf16), the float32 run with a perturbed input 0.989; the whole gradient
 * vector's 0.993 (fp16) and 0.937 (bf16). */
typedef struct bounds {
    double logits, stats, cos_grad, cos_all;
} bounds;

static bounds bounds_for(ts_dtype t)
{
    bounds b = {8e-2, 1e-2, 0.75, 0.9};
    if (t == TS_F16) b = (bounds){1.2e-2, 1.5e-3, 0.95, 0.98};
    return b;
}

static void test_train_copy(ts_ctx *cpu, ts_ctx *dev, ts_dtype prec)
{
    const char *pn = ts_dtype_name(prec);
    const ts_backend *b = dev->backend;
    const bounds bd = bounds_for(prec);
    /* Depth 3 on 67x64 keeps 128 values per channel in the deepest BN:
     * deeper, on a small tile, a BN over a handful of values turns the
     * gradients of a random network into noise that no precision keeps (a
     * float32 run with the input perturbed by 1e-3 drops to cosine 0.82
     * there). Here that float32 run keeps every parameter's gradient above
     * cosine 0.989. */
    const ts_unet_config cfg = small_cfg(3);
    const int N = 2, K = cfg.classes, H = 67, W = 64;
    ts_unet m;
    if (!tu_expect_ok(ts_unet_init(&m, &cfg), "init")) return;
    ts_unet_init_random(&m, 5);
    tu_rng rng;
    tu_rng_seed(&rng, 7);
    ts_tensor x = tu_tensor(N, 3, H, W);
    tu_fill(&rng, x.data, ts_tensor_numel(&x), -1, 1);
    int32_t *y = malloc((size_t)N * H * W * sizeof *y);
    for (int i = 0; y && i < N * H * W; i++) y[i] = tu_randint(&rng, K);
    ts_loss_config lc = ts_loss_default_config();
    ts_loss loss;
    ts_unet_device d;
    memset(&d, 0, sizeof d);
    ts_tensor dl = tu_tensor(N, K, H, W);
    void *yd = NULL, *dld = NULL;
    float *ref_logits = NULL, *ref_grads = NULL, *ref_buf = NULL, *got = NULL, *gg = NULL, *gb = NULL;
    tu_fake_reset_counts();
    if (!tu_expect_ok(ts_loss_init(&loss, &lc, K), "loss") || !y) goto out;

    /* The float32 reference on the host. Its BN statistics move, so the
     * training copy is made from the model as it was before. */
    if (!tu_expect_ok(ts_unet_device_init_train(&d, &m, b), "init_train") ||
        !tu_expect_ok(ts_unet_device_set_precision(&d, dev, prec), "set_precision"))
        goto out;
    tu_expect(ts_unet_device_precision(&d) == prec, "%s: the copy reports its precision", pn);
    ts_tensor lg;
    ts_loss_value lv_ref, lv;
    if (!tu_expect_ok(ts_unet_zero_grad(&m, cpu), "zero") || !tu_expect_ok(ts_unet_forward(&m, cpu, &x, 1, &lg), "fwd") ||
        !tu_expect_ok(ts_loss_forward(&loss, cpu, &lg, y, &lv_ref), "loss") ||
        !tu_expect_ok(ts_loss_backward(&loss, cpu, &dl, &lg, y, 1.0f), "dloss") ||
        !tu_expect_ok(ts_unet_backward(&m, cpu, &dl), "bwd"))
        goto out;
    ref_logits = malloc(ts_tensor_numel(&lg) * sizeof(float));
    ref_grads = malloc(m.n_weights * sizeof(float));
    ref_buf = malloc(m.n_buffers * sizeof(float));
    if (!ref_logits || !ref_grads || !ref_buf) goto out;
    memcpy(ref_logits, lg.data, ts_tensor_numel(&lg) * sizeof(float));
    memcpy(ref_grads, m.grads, m.n_weights * sizeof(float));
    memcpy(ref_buf, m.buffers, m.n_buffers * sizeof(float));

    /* The same step on the half copy: labels and dlogits in its memory. */
    const size_t npix = (size_t)N * H * W;
    if (!tu_expect_ok(b->memory->alloc(&yd, npix * sizeof(int32_t)), "alloc") ||
        !tu_expect_ok(b->memory->alloc(&dld, ts_tensor_numel(&dl) * sizeof(float)), "alloc") ||
        !tu_expect_ok(b->memory->upload(yd, y, npix * sizeof(int32_t)), "upload"))
        goto out;
    ts_tensor dv = ts_tensor_view(dld, N, K, H, W);
    ts_tensor lgd;
    if (!tu_expect_ok(ts_unet_device_zero_grad(&d, dev), "dev zero") ||
        !tu_expect_ok(ts_unet_device_run(&d, dev, &x, 1, &lgd), "dev train run"))
        goto out;
    tu_expect(lgd.dtype == TS_F32 && lgd.n == N && lgd.c == K && lgd.h == H && lgd.w == W,
              "%s: the copy hands back float32 logits [N,K,H,W]", pn);
    if (!tu_expect_ok(ts_loss_forward(&loss, dev, &lgd, yd, &lv), "dev loss") ||
        !tu_expect_ok(b->zero(dev, dv.data, ts_tensor_numel(&dv)), "dev zero dl") ||
        !tu_expect_ok(ts_loss_backward(&loss, dev, &dv, &lgd, yd, 1.0f), "dev dloss") ||
        !tu_expect_ok(ts_unet_device_backward(&d, dev, &dv), "dev backward"))
        goto out;
    got = fetch(b, lgd.data, ts_tensor_numel(&lgd));
    gg = fetch(b, d.grads, d.n_weights);
    gb = fetch(b, d.buffers, d.n_buffers);
    if (!tu_expect(got && gg && gb, "%s: download", pn)) goto out;
    int differ;
    double e = rel_err(got, ref_logits, ts_tensor_numel(&lgd), &differ);
    tu_expect(e < bd.logits && differ, "%s: train logits within %g of float32 and not equal to them (error %.3g)", pn,
              bd.logits, e);
    tu_expect(fabs(lv.total - lv_ref.total) < bd.logits * fabs(lv_ref.total),
              "%s: loss %.6f close to float32's %.6f", pn, lv.total, lv_ref.total);
    e = rel_err(gb, ref_buf, m.n_buffers, &differ);
    tu_expect(e < bd.stats, "%s: BN running statistics within %g of float32 (error %.3g)", pn, bd.stats, e);
    /* Per parameter tensor: the gradient's direction. */
    int bad = 0, checked = 0;
    double worst = 1;
    const char *worst_name = "";
    for (int i = 0; i < m.n_params; i++) {
        const ts_param *p = &m.params[i];
        if (p->kind != TS_PARAM_WEIGHT || !p->used) continue;
        double c = tu_cosine(gg + p->offset, ref_grads + p->offset, p->numel);
        checked++;
        if (!(c >= bd.cos_grad)) bad++;
        if (!(c >= worst)) {
            worst = c;
            worst_name = p->name;
        }
    }
    double call = tu_cosine(gg, ref_grads, m.n_weights);
    tu_expect(call >= bd.cos_all, "%s: the whole gradient within cosine %g of float32 (%.6f)", pn, bd.cos_all, call);
    tu_expect(bad == 0 && checked > 50,
              "%s: every parameter's gradient within cosine %g of float32 (%d of %d below; worst %.6f at %s)", pn,
              bd.cos_grad, bad, checked, worst, worst_name);
    tu_expect(tu_fake.foreign_ptrs == 0 && tu_fake.bad_memory == 0,
              "%s: every op pointer in the backend's memory (%ld foreign)", pn, tu_fake.foreign_ptrs);

    /* The eval run, against the host's eval forward (now both with the
     * statistics this step updated). */
    if (tu_expect_ok(ts_unet_forward(&m, cpu, &x, 0, &lg), "host eval") &&
        tu_expect_ok(ts_unet_device_run(&d, dev, &x, 0, &lgd), "dev eval")) {
        free(got);
        got = fetch(b, lgd.data, ts_tensor_numel(&lgd));
        e = got ? rel_err(got, lg.data, ts_tensor_numel(&lg), &differ) : 1;
        tu_expect(e < bd.logits, "%s: eval logits within %g of float32 (error %.3g)", pn, bd.logits, e);
    }

    /* New weights reach the next forward: scale every weight of the copy by
     * 0 (the logits then depend on the biases only, which float32 sees the
     * same way), and compare with the host model given the same. */
    if (tu_expect_ok(b->scale(dev, d.weights, d.n_weights, 0.0f), "zero weights") &&
        tu_expect_ok(ts_unet_device_download_params(&d, &m), "download") &&
        tu_expect_ok(ts_unet_forward(&m, cpu, &x, 0, &lg), "host eval 2") &&
        tu_expect_ok(ts_unet_device_run(&d, dev, &x, 0, &lgd), "dev eval 2")) {
        free(got);
        got = fetch(b, lgd.data, ts_tensor_numel(&lgd));
        e = got ? rel_err(got, lg.data, ts_tensor_numel(&lg), &differ) : 1;
        tu_expect(e == 0, "%s: a forward after the weights change uses the new weights (error %.3g)", pn, e);
    }
out:
    free(ref_logits);
    free(ref_grads);
    free(ref_buf);
    free(got);
    free(gg);
    free(gb);
    b->memory->free(yd);
    b->memory->free(dld);
    ts_unet_device_free(&d);
    tu_expect(tu_fake.live == 0, "%s: nothing left allocated on the device (%ld live)", pn, tu_fake.live);
    ts_loss_free(&loss);
    free(y);
    tu_tensor_free(&x, "mixed", "x");
    tu_tensor_free(&dl, "mixed", "dl");
    ts_unet_free(&m);
}

static void test_inference_copy(ts_ctx *cpu, ts_ctx *dev, ts_dtype prec)
{
    const char *pn = ts_dtype_name(prec);
    const ts_unet_config cfg = small_cfg(5);
    ts_unet m;
    if (!tu_expect_ok(ts_unet_init(&m, &cfg), "init")) return;
    ts_unet_init_random(&m, 11);
    tu_rng rng;
    tu_rng_seed(&rng, 13);
    ts_tensor x = tu_tensor(3, 3, 33, 41), l = tu_tensor(3, cfg.classes, 33, 41), lg;
    tu_fill(&rng, x.data, ts_tensor_numel(&x), -1, 1);
    ts_unet_device d;
    memset(&d, 0, sizeof d);
    if (tu_expect_ok(ts_unet_fold_bn(&m), "fold") && tu_expect_ok(ts_unet_forward_folded(&m, cpu, &x, &lg), "host") &&
        tu_expect_ok(ts_unet_device_init(&d, &m, dev->backend), "device init") &&
        tu_expect_ok(ts_unet_device_set_precision(&d, dev, prec), "set_precision") &&
        tu_expect_ok(ts_unet_device_forward(&d, dev, &x, &l), "device forward")) {
        int differ;
        double e = rel_err(l.data, lg.data, ts_tensor_numel(&l), &differ);
        double tol = bounds_for(prec).logits;
        tu_expect(e < tol && differ, "%s inference copy: logits within %g of the float32 folded forward, not equal "
                                     "(error %.3g)", pn, tol, e);
        /* Back to float32: bit-identical to the host again. */
        if (tu_expect_ok(ts_unet_device_set_precision(&d, dev, TS_F32), "back to f32") &&
            tu_expect_ok(ts_unet_device_forward(&d, dev, &x, &l), "f32 forward"))
            tu_expect(memcmp(l.data, lg.data, ts_tensor_numel(&l) * sizeof(float)) == 0,
                      "%s inference copy set back to f32 equals the host bit for bit", pn);
    }
    ts_unet_device_free(&d);
    tu_tensor_free(&x, "mixed", "x");
    tu_tensor_free(&l, "mixed", "logits");
    ts_unet_free(&m);
}

static void test_misuse(ts_ctx *cpu, ts_ctx *dev)
{
    const ts_unet_config cfg = small_cfg(5);
    ts_unet m;
    if (!tu_expect_ok(ts_unet_init(&m, &cfg), "init")) return;
    ts_unet_device d;
    memset(&d, 0, sizeof d);
    tu_expect_error(ts_unet_device_set_precision(&d, dev, TS_BF16), TS_ERR_INVALID_ARG, "not initialised",
                    "not initialised", NULL);
    if (tu_expect_ok(ts_unet_device_init_train(&d, &m, dev->backend), "init_train")) {
        tu_expect_error(ts_unet_device_set_precision(&d, dev, TS_I64), TS_ERR_INVALID_ARG, "i64 activations",
                        "f32, bf16 or f16", NULL);
        tu_expect_error(ts_unet_device_set_precision(&d, cpu, TS_BF16), TS_ERR_INVALID_ARG, "another backend",
                        "is not the device copy's", NULL);
        tu_expect(ts_unet_device_precision(&d) == TS_F32, "a refused precision leaves the copy at f32");
        /* An allocation failure leaves the copy at f32 and usable. */
        tu_fake.fail_alloc_at = 1;
        tu_expect_error(ts_unet_device_set_precision(&d, dev, TS_BF16), TS_ERR_NOMEM, "alloc failure", "half weights",
                        NULL);
        tu_fake.fail_alloc_at = 0;
        tu_expect(ts_unet_device_precision(&d) == TS_F32 && !d.wh && !d.gh,
                  "an allocation failure leaves the copy at f32 with nothing allocated");
    }
    ts_unet_device_free(&d);
    ts_unet_free(&m);
}

/* ---- loss scaling ---- */

static void fill_grads(ts_unet *m, float scale, uint64_t seed)
{
    tu_rng rng;
    tu_rng_seed(&rng, seed);
    for (size_t i = 0; i < m->n_weights; i++) m->grads[i] = (float)tu_uniform(&rng, -1e-3, 1e-3) * scale;
}

static void test_loss_scaling(ts_ctx *cpu)
{
    const ts_unet_config cfg = small_cfg(5);
    ts_unet a, s;
    if (!tu_expect_ok(ts_unet_init(&a, &cfg), "init") || !tu_expect_ok(ts_unet_init(&s, &cfg), "init")) return;
    ts_unet_init_random(&a, 3);
    memcpy(s.weights, a.weights, a.n_weights * sizeof(float));
    ts_optim_config oc = ts_optim_default_config();
    oc.clip_grad_norm = 1e-3; /* clipping sees the unscaled gradients */
    ts_optim_config os = oc;
    os.loss_scaling = 1;
    ts_optim oa, o;
    memset(&oa, 0, sizeof oa);
    memset(&o, 0, sizeof o);
    ts_dict dct;
    ts_dict_init(&dct);
    if (!tu_expect_ok(ts_optim_init(&oa, &oc, &a), "optim") || !tu_expect_ok(ts_optim_init(&o, &os, &s), "optim"))
        goto out;
    tu_expect(o.loss_scale == 65536.0 && ts_optim_loss_scale(&o) == 65536.0f && ts_optim_loss_scale(&oa) == 1.0f,
              "the scale starts at 2^16 and is dloss (1 without scaling)");
    /* A good step: the scaled gradients give the unscaled optimizer's bits. */
    fill_grads(&a, 1, 17);
    fill_grads(&s, 65536.0f, 17);
    double na, ns;
    if (tu_expect_ok(ts_optim_step(&oa, cpu, &a, 1e-3, &na), "unscaled step") &&
        tu_expect_ok(ts_optim_step(&o, cpu, &s, 1e-3, &ns), "scaled step"))
        tu_expect(!o.last_skipped && o.step == 1 && na == ns &&
                      memcmp(a.weights, s.weights, a.n_weights * sizeof(float)) == 0 &&
                      memcmp(oa.exp_avg, o.exp_avg, o.n * sizeof(float)) == 0,
                  "a good scaled step updates bit for bit as the unscaled one (norms %g %g)", na, ns);
    /* An overflow: skipped, nothing written, the scale halves. */
    float *w0 = malloc(s.n_weights * sizeof(float)), *m0 = malloc(s.n_weights * sizeof(float));
    if (w0 && m0) {
        memcpy(w0, s.weights, s.n_weights * sizeof(float));
        memcpy(m0, o.exp_avg, s.n_weights * sizeof(float));
        fill_grads(&s, 65536.0f, 19);
        s.grads[s.n_weights / 2] = INFINITY;
        double n = 0;
        if (tu_expect_ok(ts_optim_step(&o, cpu, &s, 1e-3, &n), "overflowing step is not an error"))
            tu_expect(o.last_skipped && o.skipped_steps == 1 && o.step == 1 && o.loss_scale == 32768.0 &&
                          isnan(n) && memcmp(w0, s.weights, s.n_weights * sizeof(float)) == 0 &&
                          memcmp(m0, o.exp_avg, s.n_weights * sizeof(float)) == 0,
                      "an inf gradient skips the step (weights, moments, step kept) and halves the scale (%g)",
                      o.loss_scale);
        s.grads[0] = NAN;
        if (tu_expect_ok(ts_optim_step(&o, cpu, &s, 1e-3, NULL), "NaN step"))
            tu_expect(o.last_skipped && o.loss_scale == 16384.0, "a NaN gradient too (scale %g)", o.loss_scale);
    }
    free(w0);
    free(m0);
    /* Without scaling a non-finite norm stays an error. */
    a.grads[3] = NAN;
    tu_expect_error(ts_optim_step(&oa, cpu, &a, 1e-3, NULL), TS_ERR_INVALID_ARG, "NaN without scaling", "nan", NULL);
    /* Growth: the 2000th good step in a row doubles the scale. */
    o.growth_tracker = 1998;
    fill_grads(&s, 16384.0f, 23);
    if (tu_expect_ok(ts_optim_step(&o, cpu, &s, 1e-3, NULL), "step 1999"))
        tu_expect(o.loss_scale == 16384.0 && o.growth_tracker == 1999, "1999 good steps keep the scale");
    fill_grads(&s, 16384.0f, 29);
    if (tu_expect_ok(ts_optim_step(&o, cpu, &s, 1e-3, NULL), "step 2000"))
        tu_expect(o.loss_scale == 32768.0 && o.growth_tracker == 0, "2000 good steps double it (%g)", o.loss_scale);
    o.growth_tracker = 77;
    /* Checkpoints: saved, restored; optional both ways. */
    if (tu_expect_ok(ts_optim_save(&o, &s, &dct), "save")) {
        tu_expect(ts_dict_find(&dct, "optimizer.loss_scale") && ts_dict_find(&dct, "optimizer.loss_scale_growth"),
                  "the checkpoint holds the scaler's state");
        ts_optim o2, o3;
        memset(&o2, 0, sizeof o2);
        memset(&o3, 0, sizeof o3);
        if (tu_expect_ok(ts_optim_init(&o2, &os, &s), "o2") && tu_expect_ok(ts_optim_load(&o2, &s, &dct), "load"))
            tu_expect(o2.loss_scale == 32768.0 && o2.growth_tracker == 77 && o2.step == o.step,
                      "the scaler's state round-trips");
        if (tu_expect_ok(ts_optim_init(&o3, &oc, &s), "o3"))
            tu_expect_ok(ts_optim_load(&o3, &s, &dct), "a run without scaling ignores the scaler's entries");
        ts_optim_free(&o2);
        ts_optim_free(&o3);
    }
    ts_dict_free(&dct);
    ts_dict_init(&dct);
    if (tu_expect_ok(ts_optim_save(&oa, &a, &dct), "save unscaled")) {
        ts_optim o4;
        memset(&o4, 0, sizeof o4);
        if (tu_expect_ok(ts_optim_init(&o4, &os, &a), "o4") &&
            tu_expect_ok(ts_optim_load(&o4, &a, &dct), "an fp32 checkpoint resumes with loss scaling"))
            tu_expect(o4.loss_scale == 65536.0 && o4.growth_tracker == 0, "... at the initial scale");
        ts_optim_free(&o4);
    }
out:
    ts_dict_free(&dct);
    ts_optim_free(&oa);
    ts_optim_free(&o);
    ts_unet_free(&a);
    ts_unet_free(&s);
}

int main(void)
{
    ts_ctx cpu, dev;
    tu_init(&cpu);
    cpu.backend = ts_backend_cpu();
    tu_expect_ok(ts_ctx_init(&dev, tu_fake_device_backend()), "fake device context");
    test_train_copy(&cpu, &dev, TS_BF16);
    test_train_copy(&cpu, &dev, TS_F16);
    test_inference_copy(&cpu, &dev, TS_BF16);
    test_inference_copy(&cpu, &dev, TS_F16);
    test_misuse(&cpu, &dev);
    test_loss_scaling(&cpu);
    ts_ctx_free(&dev);
    ts_ctx_free(&cpu);
    return tu_finish("mixed");
}
