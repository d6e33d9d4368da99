/* Softmax cross-entropy and the two Dice losses (kernels/cpu/loss.c) against
 * double-precision references written here straight from
 * shared/specs/smp-unet.md section 6:
 *  - forward: the loss vs the reference on the same (float) logits;
 *  - backward: dlogits (pre-filled, so accumulation is checked) vs
 *    prefill + dloss * central finite differences of the reference loss;
 *  - odd shapes, C = 1, 3, 5, batch 1 and > 1, ignore_index, class weights,
 *    log_loss, smooth, a class absent from the target, more than one
 *    reduction block per image, thread-count independence, and the errors. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "kernels/threads.h"
#include "tests/testutil.h"

/* ---- references ---------------------------------------------------------- */

typedef enum { REF_CE, REF_DICE_SMP, REF_DICE_IMG } ref_kind;

typedef struct ref_case {
    ref_kind kind;
    int N, C, H, W;
    const int32_t *y;
    int ignore;
    const float *weights; /* CE: weight[C]; SMP dice: class_weights[C] */
    double smooth, eps;
    int log_loss;
} ref_case;

/* log_softmax over the C channels of pixel (n, i), written into lp[C]. */
static void ref_log_softmax(const ref_case *rc, const double *z, int n, int i, double *lp)
{
    int C = rc->C, hw = rc->H * rc->W;
    double mx = -INFINITY, s = 0;
    for (int c = 0; c < C; c++) mx = fmax(mx, z[((size_t)n * C + c) * hw + i]);
    for (int c = 0; c < C; c++) s += exp(z[((size_t)n * C + c) * hw + i] - mx);
    for (int c = 0; c < C; c++) lp[c] = z[((size_t)n * C + c) * hw + i] - mx - log(s);
}

/* nn.CrossEntropyLoss(weight, ignore_index, reduction="mean"); 0 where
 * PyTorch gives NaN (no valid weight), as the kernel documents. */
static double ref_ce(const ref_case *rc, const double *z)
{
    int hw = rc->H * rc->W;
    double lp[16], num = 0, den = 0;
    for (int n = 0; n < rc->N; n++)
        for (int i = 0; i < hw; i++) {
            int y = rc->y[n * hw + i];
            if (y == rc->ignore) continue;
            ref_log_softmax(rc, z, n, i, lp);
            double w = rc->weights ? rc->weights[y] : 1.0;
            num += -w * lp[y];
            den += w;
        }
    return den == 0 ? 0.0 : num / den;
}

/* smp DiceLoss("multiclass"), >= 0.4: the L1-norm form of the spec, which is
 * deliberately not the kernel's sum p t. */
static double ref_dice_smp(const ref_case *rc, const double *z)
{
    int C = rc->C, hw = rc->H * rc->W;
    double Sp[16] = {0}, St[16] = {0}, D[16] = {0}, lp[16];
    for (int n = 0; n < rc->N; n++)
        for (int i = 0; i < hw; i++) {
            int y = rc->y[n * hw + i];
            int m = y != rc->ignore;
            ref_log_softmax(rc, z, n, i, lp);
            for (int c = 0; c < C; c++) {
                double p = exp(lp[c]) * m;
                double t = (m && c == y) ? 1.0 : 0.0;
                Sp[c] += p;
                St[c] += t;
                D[c] += fabs(p - t);
            }
        }
    double sum = 0, wsum = 0;
    for (int c = 0; c < C; c++) {
        double I = (Sp[c] + St[c] - D[c]) / 2, fp = Sp[c] - I, fn = St[c] - I;
        double dice = (I + rc->smooth) / fmax(I + 0.5 * fp + 0.5 * fn + rc->smooth, rc->eps);
        double l = rc->log_loss ? -log(fmax(dice, rc->eps)) : 1 - dice;
        l *= St[c] > 0;
        double w = rc->weights ? rc->weights[c] : 1.0;
        sum += w * l;
        wsum += w;
    }
    return sum / wsum;
}

/* The tutorial's per-image dice, ignored pixels left out of both sums. */
static double ref_dice_img(const ref_case *rc, const double *z)
{
    int C = rc->C, hw = rc->H * rc->W;
    double lp[16], mean = 0;
    for (int n = 0; n < rc->N; n++) {
        double inter[16] = {0}, card[16] = {0};
        for (int i = 0; i < hw; i++) {
            int y = rc->y[n * hw + i];
            if (y == rc->ignore) continue;
            ref_log_softmax(rc, z, n, i, lp);
            for (int c = 0; c < C; c++) {
                double p = exp(lp[c]), t = c == y;
                inter[c] += p * t;
                card[c] += p + t;
            }
        }
        for (int c = 0; c < C; c++) mean += (2 * inter[c] + rc->eps) / (card[c] + rc->eps);
    }
    return 1 - mean / (rc->N * C);
}

static double ref_loss(void *ctx, const double *z)
{
    const ref_case *rc = ctx;
    switch (rc->kind) {
    case REF_CE: return ref_ce(rc, z);
    case REF_DICE_SMP: return ref_dice_smp(rc, z);
    default: return ref_dice_img(rc, z);
    }
}

/* ---- one case: forward, backward, thread independence ---------------------- */

static const char *kind_name(ref_kind k)
{
    return k == REF_CE ? "cross_entropy" : k == REF_DICE_SMP ? "dice_smp" : "dice_per_image";
}

static ts_status run_forward(ts_ctx *ctx, const ref_case *rc, double *loss, const ts_tensor *z)
{
    if (rc->kind == REF_CE) {
        ts_ce_params p = {.ignore_index = rc->ignore, .class_weights = rc->weights};
        return ts_cpu_cross_entropy_forward(ctx, loss, z, rc->y, &p);
    }
    ts_dice_params p = {.mode = rc->kind == REF_DICE_SMP ? TS_DICE_SMP : TS_DICE_PER_IMAGE,
                        .ignore_index = rc->ignore,
                        .smooth = (float)rc->smooth,
                        .eps = (float)rc->eps,
                        .log_loss = rc->log_loss,
                        .class_weights = rc->weights};
    return ts_cpu_dice_forward(ctx, loss, z, rc->y, &p);
}

static ts_status run_backward(ts_ctx *ctx, const ref_case *rc, ts_tensor *dz, const ts_tensor *z, float dloss)
{
    if (rc->kind == REF_CE) {
        ts_ce_params p = {.ignore_index = rc->ignore, .class_weights = rc->weights};
        return ts_cpu_cross_entropy_backward(ctx, dz, z, rc->y, &p, dloss);
    }
    ts_dice_params p = {.mode = rc->kind == REF_DICE_SMP ? TS_DICE_SMP : TS_DICE_PER_IMAGE,
                        .ignore_index = rc->ignore,
                        .smooth = (float)rc->smooth,
                        .eps = (float)rc->eps,
                        .log_loss = rc->log_loss,
                        .class_weights = rc->weights};
    return ts_cpu_dice_backward(ctx, dz, z, rc->y, &p, dloss);
}

/* Checks one case with logits from rng in [-lo, lo] and the given labels.
 * want_loss, if not NAN, is an extra exact expectation (e.g. 0). */
static void check_case(ts_ctx *ctx, tu_rng *rng, ref_case *rc, const char *label, double scale, float dloss,
                       size_t max_fd, double want_loss, const float *z_init)
{
    char op[160];
    snprintf(op, sizeof op, "%s[%s]", kind_name(rc->kind), label);
    size_t numel = (size_t)rc->N * rc->C * rc->H * rc->W;
    ts_tensor z = tu_tensor(rc->N, rc->C, rc->H, rc->W);
    ts_tensor dz = tu_tensor(rc->N, rc->C, rc->H, rc->W);
    tu_fill(rng, z.data, numel, -scale, scale);
    if (z_init) memcpy(z.data, z_init, numel * sizeof(float));
    tu_fill(rng, dz.data, numel, -0.05, 0.05); /* backward must add to this */
    double *x = malloc(numel * sizeof *x), *fd = malloc(numel * sizeof *fd), *want = malloc(numel * sizeof *want);
    float *prefill = malloc(numel * sizeof *prefill);
    size_t *idx = malloc(numel * sizeof *idx);
    for (size_t i = 0; i < numel; i++) x[i] = z.data[i];
    memcpy(prefill, dz.data, numel * sizeof *prefill);

    double loss = NAN, ref = ref_loss(rc, x);
    if (tu_expect_ok(run_forward(ctx, rc, &loss, &z), op))
        tu_check_close_d(op, "forward loss", &loss, &ref, 1, 1e-10, 1e-9);
    if (!isnan(want_loss)) tu_check_close_d(op, "forward loss (exact)", &loss, &want_loss, 1, 1e-12, 0);

    if (tu_expect_ok(run_backward(ctx, rc, &dz, &z, dloss), op)) {
        size_t k = tu_sample_indices(rng, numel, max_fd, idx);
        tu_fd_grad(ref_loss, rc, x, idx, k, 1e-4, fd);
        float *got = malloc(k * sizeof *got);
        for (size_t j = 0; j < k; j++) {
            got[j] = dz.data[idx[j]];
            want[j] = prefill[idx[j]] + (double)dloss * fd[j];
        }
        tu_check_close(op, "backward dlogits (prefill + dloss * finite differences)", NULL, got, want, k, 2e-7, 1e-4);
        free(got);
    }

    /* The reductions use fixed blocks, so one thread and two give the same bits. */
    ts_threads_init(1);
    double loss1 = NAN;
    ts_tensor dz1 = tu_tensor(rc->N, rc->C, rc->H, rc->W);
    run_forward(ctx, rc, &loss1, &z);
    run_backward(ctx, rc, &dz1, &z, dloss);
    ts_threads_init(2);
    double loss2 = NAN;
    ts_tensor dz2 = tu_tensor(rc->N, rc->C, rc->H, rc->W);
    run_forward(ctx, rc, &loss2, &z);
    run_backward(ctx, rc, &dz2, &z, dloss);
    ts_threads_init(0);
    tu_expect(memcmp(&loss1, &loss2, sizeof loss1) == 0 && memcmp(dz1.data, dz2.data, numel * sizeof(float)) == 0,
              "%s: 1 and 2 threads give bit-identical loss and gradient (%.17g vs %.17g)", op, loss1, loss2);

    tu_tensor_free(&dz2, op, "dlogits (2 threads)");
    tu_tensor_free(&dz1, op, "dlogits (1 thread)");
    tu_tensor_free(&dz, op, "dlogits");
    tu_tensor_free(&z, op, "logits");
    free(x);
    free(fd);
    free(want);
    free(prefill);
    free(idx);
}

/* Labels in [0, C) with about `ignore_frac` of them set to ignore (if >= 0),
 * and never the class `absent` (if >= 0). */
static int32_t *make_labels(tu_rng *rng, int N, int C, int H, int W, int ignore, double ignore_frac, int absent)
{
    size_t np = (size_t)N * H * W;
    int32_t *y = tu_alloc_i32(np);
    for (size_t i = 0; i < np; i++) {
        int v;
        do v = tu_randint(rng, C);
        while (v == absent && C > 1);
        if (ignore >= 0 && tu_uniform(rng, 0, 1) < ignore_frac) v = ignore;
        y[i] = v;
    }
    return y;
}

/* ---- the cases ------------------------------------------------------------ */

static void test_cross_entropy(ts_ctx *ctx, tu_rng *rng)
{
    static const int shapes[][4] = {{1, 3, 5, 7}, {2, 5, 3, 9}, {3, 3, 7, 1}, {1, 1, 3, 5}, {2, 3, 67, 71}};
    const float w5[5] = {0.5f, 2.0f, 1.0f, 0.25f, 3.0f}, w3[3] = {1.5f, 0.2f, 1.0f}, w1[1] = {2.0f};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], C = shapes[s][1], H = shapes[s][2], W = shapes[s][3];
        const float *w = C == 5 ? w5 : C == 3 ? w3 : w1;
        char label[96];
        for (int variant = 0; variant < 3; variant++) {
            /* 0: plain (ignore_index -100 ignores nothing); 1: ignore 255 present;
             * 2: ignore 255 and class weights. */
            int ignore = variant ? 255 : -100;
            int32_t *y = make_labels(rng, N, C, H, W, ignore, variant ? 0.2 : 0, -1);
            ref_case rc = {.kind = REF_CE, .N = N, .C = C, .H = H, .W = W, .y = y, .ignore = ignore,
                           .weights = variant == 2 ? w : NULL};
            snprintf(label, sizeof label, "[%d,%d,%d,%d] variant %d", N, C, H, W, variant);
            /* C = 1: log_softmax is 0, so the loss is exactly 0 and so is the gradient. */
            check_case(ctx, rng, &rc, label, 3.0, variant == 1 ? 2.5f : 0.7f, H * W > 1000 ? 48 : 400,
                       C == 1 ? 0.0 : NAN, NULL);
            tu_free(y, "cross_entropy", "labels");
        }
    }

    /* Every pixel ignored, or every valid pixel weighted 0: PyTorch's NaN
     * becomes loss 0 with no gradient. */
    int32_t *y = make_labels(rng, 2, 3, 3, 4, 7, 1.0, -1);
    ref_case rc = {.kind = REF_CE, .N = 2, .C = 3, .H = 3, .W = 4, .y = y, .ignore = 7};
    check_case(ctx, rng, &rc, "all ignored", 2.0, 1.0f, 100, 0.0, NULL);
    tu_free(y, "cross_entropy", "labels");
    const float wz[3] = {0.0f, 1.0f, 1.0f};
    y = make_labels(rng, 1, 3, 2, 5, -1, 0, -1);
    for (int i = 0; i < 10; i++) y[i] = 0;
    rc = (ref_case){.kind = REF_CE, .N = 1, .C = 3, .H = 2, .W = 5, .y = y, .ignore = -1, .weights = wz};
    check_case(ctx, rng, &rc, "zero weight sum", 2.0, 1.0f, 100, 0.0, NULL);
    tu_free(y, "cross_entropy", "labels");
}

static void test_dice(ts_ctx *ctx, tu_rng *rng)
{
    const float w3[3] = {1.0f, 3.0f, 0.5f}, w5[5] = {0.2f, 1.0f, 2.0f, 0.7f, 1.3f};
    struct {
        ref_kind kind;
        int N, C, H, W;
        int ignore;
        double ignore_frac;
        int absent;
        const float *weights;
        double smooth;
        int log_loss;
        double scale;
        float dloss;
        const char *label;
    } cases[] = {
        {REF_DICE_SMP, 2, 3, 5, 7, 255, 0.2, -1, NULL, 0.0, 0, 2.0, 1.0f, "ignore, defaults"},
        {REF_DICE_SMP, 1, 5, 3, 9, -100, 0, 4, NULL, 1.0, 1, 2.0, 0.7f, "absent class 4, smooth 1, log_loss"},
        {REF_DICE_SMP, 3, 3, 7, 5, 255, 0.1, 1, w3, 0.5, 0, 3.0, 1.3f, "absent class 1, weights, smooth 0.5"},
        {REF_DICE_SMP, 2, 5, 4, 3, 0, 0.0, -1, w5, 0.0, 1, 2.0, 0.5f, "ignore_index 0 (a real class), weights"},
        {REF_DICE_SMP, 2, 1, 3, 5, -100, 0, -1, NULL, 0.0, 0, 2.0, 1.0f, "C=1"},
        {REF_DICE_SMP, 2, 3, 67, 71, 255, 0.1, -1, NULL, 0.0, 1, 2.0, 0.9f, "two blocks per image"},
        {REF_DICE_IMG, 2, 3, 5, 7, 255, 0.2, -1, NULL, 0.0, 0, 2.0, 1.0f, "ignore"},
        {REF_DICE_IMG, 3, 5, 4, 6, -100, 0, 2, NULL, 0.0, 0, 3.0, 0.6f, "absent class 2"},
        {REF_DICE_IMG, 1, 3, 9, 1, 255, 0.3, -1, NULL, 0.0, 0, 2.0, 2.0f, "batch 1, W=1"},
        {REF_DICE_IMG, 2, 1, 3, 3, -100, 0, -1, NULL, 0.0, 0, 2.0, 1.0f, "C=1"},
        {REF_DICE_IMG, 2, 3, 67, 71, 255, 0.1, -1, NULL, 0.0, 0, 2.0, 0.9f, "two blocks per image"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int32_t *y = make_labels(rng, cases[k].N, cases[k].C, cases[k].H, cases[k].W, cases[k].ignore,
                                 cases[k].ignore_frac, cases[k].absent);
        ref_case rc = {.kind = cases[k].kind, .N = cases[k].N, .C = cases[k].C, .H = cases[k].H, .W = cases[k].W,
                       .y = y, .ignore = cases[k].ignore, .weights = cases[k].weights, .smooth = cases[k].smooth,
                       .eps = 1e-7f, .log_loss = cases[k].log_loss};
        int big = cases[k].H * cases[k].W > 1000;
        check_case(ctx, rng, &rc, cases[k].label, cases[k].scale, cases[k].dloss, big ? 48 : 400,
                   cases[k].C == 1 ? 0.0 : NAN, NULL);
        tu_free(y, "dice", "labels");
    }

    /* Per-image: an image whose pixels are all ignored has dice 1 for every
     * class, so it adds 0 to the loss (before the 1 - mean) and no gradient. */
    int32_t *y = make_labels(rng, 2, 3, 4, 5, 255, 0.0, -1);
    for (int i = 0; i < 20; i++) y[20 + i] = 255;
    ref_case rc = {.kind = REF_DICE_IMG, .N = 2, .C = 3, .H = 4, .W = 5, .y = y, .ignore = 255, .eps = 1e-7f};
    check_case(ctx, rng, &rc, "second image all ignored", 2.0, 1.0f, 400, NAN, NULL);
    tu_free(y, "dice", "labels");

    /* The clamps. clamp_min(den, eps) can only bite with St > 0 when eps is
     * large (den >= 1/2 otherwise), so eps = 1: class 2 has one true pixel and
     * small p, den = (Sp + 1)/2 < 1 is clamped and only I carries gradient.
     * log_loss clamps dice at eps: class 1's one true pixel is predicted at
     * p ~ e^-40, dice << 1e-7, so that class gives a constant and no gradient. */
    y = tu_alloc_i32(9);
    float zc[27];
    for (int i = 0; i < 9; i++) {
        y[i] = i == 4 ? 2 : i == 7 ? 1 : 0;
        zc[i] = (float)(2.0 + 0.3 * sin(i));  /* class 0 */
        zc[9 + i] = (float)(0.5 * cos(3 * i)); /* class 1 */
        zc[18 + i] = (float)(-1.0 + 0.4 * sin(2 * i)); /* class 2 */
    }
    rc = (ref_case){.kind = REF_DICE_SMP, .N = 1, .C = 3, .H = 3, .W = 3, .y = y, .ignore = -100, .eps = 1.0};
    check_case(ctx, rng, &rc, "eps 1: clamped denominator", 1.0, 1.0f, 27, NAN, zc);
    zc[0 * 9 + 7] = 30.0f;
    zc[1 * 9 + 7] = -10.0f;
    rc = (ref_case){.kind = REF_DICE_SMP, .N = 1, .C = 3, .H = 3, .W = 3, .y = y, .ignore = -100, .eps = 1e-7f,
                    .log_loss = 1};
    check_case(ctx, rng, &rc, "log_loss: dice clamped at eps", 1.0, 1.0f, 27, NAN, zc);
    tu_free(y, "dice", "labels");

    /* SMP: a class absent from the target contributes 0 however strongly it is
     * predicted, but still counts in the mean over C. With confident correct
     * logits on the present classes the loss tends to 0. */
    ts_tensor z = tu_tensor(1, 3, 2, 2);
    y = tu_alloc_i32(4);
    for (int i = 0; i < 4; i++) {
        y[i] = i % 2; /* classes 0 and 1 only */
        z.data[0 * 4 + i] = y[i] == 0 ? 30.0f : 0.0f;
        z.data[1 * 4 + i] = y[i] == 1 ? 30.0f : 0.0f;
        z.data[2 * 4 + i] = 0.0f; /* class 2 predicted with p ~ e^-30 */
    }
    ts_dice_params dp = {.mode = TS_DICE_SMP, .ignore_index = -100, .eps = 1e-7f};
    double loss = -1;
    tu_expect_ok(ts_cpu_dice_forward(ctx, &loss, &z, y, &dp), "dice_forward (confident)");
    tu_expect(fabs(loss) < 1e-9, "dice_smp: confident correct prediction, absent class masked: loss %.3g ~ 0", loss);
    for (int i = 0; i < 4; i++) z.data[2 * 4 + i] = 60.0f; /* now predict the absent class everywhere */
    tu_expect_ok(ts_cpu_dice_forward(ctx, &loss, &z, y, &dp), "dice_forward (absent class predicted)");
    /* classes 0 and 1 get dice ~ 2*0/(2+2) ~ 0 (loss 1 each); class 2 is masked: mean 2/3. */
    tu_expect(fabs(loss - 2.0 / 3.0) < 1e-9, "dice_smp: absent class masked but counted in the mean: loss %.12g, want 2/3",
              loss);
    tu_tensor_free(&z, "dice", "logits");
    tu_free(y, "dice", "labels");
}

static void test_errors(ts_ctx *ctx)
{
    ts_tensor z = tu_tensor(2, 3, 4, 5), dz = tu_tensor(2, 3, 4, 5), bad = tu_tensor(2, 3, 5, 4);
    int32_t *y = tu_alloc_i32(40);
    y[1 * 20 + 2 * 5 + 3] = 7; /* pixel (n=1,h=2,w=3) */
    ts_ce_params cp = {.ignore_index = 255};
    ts_dice_params dp = {.mode = TS_DICE_SMP, .ignore_index = 255, .eps = 1e-7f};
    double loss;
    tu_expect_error(ts_cpu_cross_entropy_forward(ctx, &loss, &z, y, &cp), TS_ERR_INVALID_ARG,
                    "cross_entropy_forward with label 7 of 3 classes", "cross_entropy_forward", "n=1,h=2,w=3", "7",
                    (char *)NULL);
    tu_expect_error(ts_cpu_cross_entropy_backward(ctx, &dz, &z, y, &cp, 1.0f), TS_ERR_INVALID_ARG,
                    "cross_entropy_backward with label 7", "cross_entropy_backward", "n=1,h=2,w=3", (char *)NULL);
    tu_expect_error(ts_cpu_dice_forward(ctx, &loss, &z, y, &dp), TS_ERR_INVALID_ARG, "dice_forward with label 7",
                    "dice_forward", "n=1,h=2,w=3", "7", (char *)NULL);
    tu_expect_error(ts_cpu_dice_backward(ctx, &dz, &z, y, &dp, 1.0f), TS_ERR_INVALID_ARG,
                    "dice_backward with label 7", "dice_backward", "n=1,h=2,w=3", (char *)NULL);
    y[1 * 20 + 2 * 5 + 3] = -1; /* negative and not the ignore_index */
    tu_expect_error(ts_cpu_cross_entropy_forward(ctx, &loss, &z, y, &cp), TS_ERR_INVALID_ARG,
                    "cross_entropy_forward with label -1", "cross_entropy_forward", "-1", (char *)NULL);
    y[1 * 20 + 2 * 5 + 3] = 255; /* the ignore_index itself is fine */
    tu_expect_ok(ts_cpu_cross_entropy_forward(ctx, &loss, &z, y, &cp), "cross_entropy_forward with label 255 ignored");
    /* The error leaves dlogits untouched (no partial accumulation). */
    int untouched = 1;
    y[0] = 3;
    ts_cpu_dice_backward(ctx, &dz, &z, y, &dp, 1.0f);
    for (int i = 0; i < 120; i++) untouched &= dz.data[i] == 0.0f;
    tu_expect(untouched, "dice_backward: a bad label leaves dlogits untouched");
    y[0] = 0;

    tu_expect_error(ts_cpu_cross_entropy_backward(ctx, &bad, &z, y, &cp, 1.0f), TS_ERR_INVALID_ARG,
                    "cross_entropy_backward with mismatched dlogits", "cross_entropy_backward", "[2,3,5,4]",
                    "[2,3,4,5]", (char *)NULL);
    tu_expect_error(ts_cpu_dice_backward(ctx, &bad, &z, y, &dp, 1.0f), TS_ERR_INVALID_ARG,
                    "dice_backward with mismatched dlogits", "dice_backward", "[2,3,5,4]", (char *)NULL);
    tu_expect_error(ts_cpu_cross_entropy_forward(ctx, &loss, &z, NULL, &cp), TS_ERR_INVALID_ARG,
                    "cross_entropy_forward with NULL target", "cross_entropy_forward", (char *)NULL);
    ts_dice_params bm = dp;
    bm.mode = (ts_dice_mode)7;
    tu_expect_error(ts_cpu_dice_forward(ctx, &loss, &z, y, &bm), TS_ERR_INVALID_ARG, "dice_forward with mode 7",
                    "dice_forward", "mode 7", (char *)NULL);
    const float wz[3] = {0, 0, 0};
    bm = dp;
    bm.class_weights = wz;
    tu_expect_error(ts_cpu_dice_forward(ctx, &loss, &z, y, &bm), TS_ERR_INVALID_ARG,
                    "dice_forward with all-zero class weights", "dice_forward", "class_weights", (char *)NULL);
    bm = dp;
    bm.eps = -1.0f;
    tu_expect_error(ts_cpu_dice_backward(ctx, &dz, &z, y, &bm, 1.0f), TS_ERR_INVALID_ARG,
                    "dice_backward with eps -1", "dice_backward", "eps", (char *)NULL);

    tu_free(y, "loss errors", "labels");
    tu_tensor_free(&bad, "loss errors", "bad");
    tu_tensor_free(&dz, "loss errors", "dlogits");
    tu_tensor_free(&z, "loss errors", "logits");
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    tu_rng rng;
    tu_rng_seed(&rng, 20240611);
    test_cross_entropy(&ctx, &rng);
    test_dice(&ctx, &rng);
    test_errors(&ctx);
    ts_ctx_free(&ctx);
    return tu_finish("test_loss");
}
