/* AdamW (kernels/cpu/adamw.c and ts_adamw_prepare) against a double
 * reference of torch.optim.AdamW's update (shared/specs/smp-unet.md 7.1):
 *   p *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
 *   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
 * Covers several steps with weight decay 0 and > 0, both branches of
 * PyTorch's lerp (1 - beta1 below and above 0.5), an eps large enough that
 * where it is added shows, the bias correction at step 1, one step from an
 * arbitrary state at a late step, thread independence, and the argument
 * checks of ts_adamw_prepare and the kernel. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "kernels/threads.h"
#include "tests/testutil.h"

typedef struct ref_state {
    double *p, *m, *v;
} ref_state;

/* One reference step at 1-based step t, in double. */
static void ref_step(ref_state *r, const float *g, size_t n, const ts_adamw_hparams *h, long t)
{
    double bc1 = 1 - pow(h->beta1, (double)t), bc2 = 1 - pow(h->beta2, (double)t);
    for (size_t i = 0; i < n; i++) {
        r->p[i] *= 1 - h->lr * h->weight_decay;
        r->m[i] = h->beta1 * r->m[i] + (1 - h->beta1) * g[i];
        r->v[i] = h->beta2 * r->v[i] + (1 - h->beta2) * (double)g[i] * g[i];
        r->p[i] -= h->lr / bc1 * r->m[i] / (sqrt(r->v[i]) / sqrt(bc2) + h->eps);
    }
}

/* `steps` steps from p in [-0.1, 0.1] and zero moments, fresh gradients each
 * step, compared with the reference after every step. Parameters are small
 * so float rounding of p (~1e-8) stays well under the per-step change. */
static void test_steps(ts_ctx *ctx, tu_rng *rng, const char *name, const ts_adamw_hparams *h, size_t n, int steps,
                       double gscale)
{
    char op[128];
    float *p = tu_alloc_f(n), *g = tu_alloc_f(n), *m = tu_alloc_f(n), *v = tu_alloc_f(n);
    ref_state r = {malloc(n * sizeof(double)), calloc(n, sizeof(double)), calloc(n, sizeof(double))};
    tu_fill(rng, p, n, -0.1, 0.1);
    for (size_t i = 0; i < n; i++) r.p[i] = p[i];
    for (long t = 1; t <= steps; t++) {
        snprintf(op, sizeof op, "adamw[%s] n=%zu step %ld", name, n, t);
        tu_fill(rng, g, n, -gscale, gscale);
        ts_adamw_step s;
        if (!tu_expect_ok(ts_adamw_prepare(&s, h, t), op)) break;
        tu_expect_ok(ts_cpu_adamw_update(ctx, p, g, m, v, n, &s), op);
        ref_step(&r, g, n, h, t);
        tu_check_close(op, "param", NULL, p, r.p, n, 2e-8, 2e-6);
        /* m = b1 m + (1 - b1) g can cancel: its float rounding is relative to the
         * inputs (|g| <= gscale), not to the result. */
        tu_check_close(op, "exp_avg", NULL, m, r.m, n, 2e-7 * gscale, 2e-6);
        tu_check_close(op, "exp_avg_sq", NULL, v, r.v, n, 1e-14 * gscale * gscale, 2e-6);
    }
    tu_free(p, op, "param");
    tu_free(g, op, "grad");
    tu_free(m, op, "exp_avg");
    tu_free(v, op, "exp_avg_sq");
    free(r.p);
    free(r.m);
    free(r.v);
}

/* Step 1 from zero moments: m / bc1 = g and sqrt(v / bc2) = |g|, so
 * p1 = p0 (1 - lr wd) - lr g / (|g| + eps): about lr sign(g) whatever the
 * gradient's size. Without the bias correction the step would be
 * (1 - b1) / sqrt(1 - b2) ~ 3.2 times larger at the defaults. */
static void test_first_step(ts_ctx *ctx)
{
    const char *op = "adamw step 1 bias correction";
    enum { N = 7 };
    const float g0[N] = {1e-6f, -3e-4f, 0.5f, -2.0f, 1e3f, 0.0f, 7e-3f};
    float *p = tu_alloc_f(N), *g = tu_alloc_f(N), *m = tu_alloc_f(N), *v = tu_alloc_f(N);
    ts_adamw_hparams h = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
    double want[N];
    for (int i = 0; i < N; i++) {
        p[i] = 0.25f * (float)(i + 1) - 1.0f;
        g[i] = g0[i];
        want[i] = p[i] * (1 - h.lr * h.weight_decay) - h.lr * g0[i] / (fabs(g0[i]) + h.eps);
    }
    ts_adamw_step s;
    tu_expect_ok(ts_adamw_prepare(&s, &h, 1), op);
    /* The step values are the double formulas rounded once to float. */
    tu_expect(s.bc2_sqrt == (float)sqrt(1 - 0.999) && s.neg_step_size == (float)(-1e-3 / (1 - 0.9)) &&
                  s.decay == (float)(1 - 1e-5) && s.beta1_weight == 0.1f && s.one_minus_beta2 == (float)(1 - 0.999) &&
                  s.beta2 == 0.999f && s.eps == 1e-8f,
              "%s: prepare(t=1) gives bc2_sqrt %.9g, neg_step_size %.9g, decay %.9g", op, s.bc2_sqrt, s.neg_step_size,
              s.decay);
    tu_expect_ok(ts_cpu_adamw_update(ctx, p, g, m, v, N, &s), op);
    /* Float rounding of p (|p| <= 1) is ~6e-8; the step is ~1e-3. */
    tu_check_close(op, "param after step 1 = p(1 - lr wd) - lr g/(|g| + eps)", NULL, p, want, N, 2e-7, 0);
    /* A zero gradient moves p by the decay alone. */
    tu_expect(p[5] == (float)(0.25f * 6 - 1.0f) * s.decay, "%s: zero gradient: only the decay, got %.9g", op, p[5]);
    tu_free(p, op, "param");
    tu_free(g, op, "grad");
    tu_free(m, op, "exp_avg");
    tu_free(v, op, "exp_avg_sq");
}

/* One step at t = 9 from an arbitrary state, with an eps (1e-3) of the size
 * of sqrt(v / bc2), so eps added inside the square root or before the bias
 * correction would be visible. */
static void test_state_step(ts_ctx *ctx, tu_rng *rng)
{
    const char *op = "adamw one step from state, t=9, eps 1e-3";
    enum { N = 257 };
    float *p = tu_alloc_f(N), *g = tu_alloc_f(N), *m = tu_alloc_f(N), *v = tu_alloc_f(N);
    tu_fill(rng, p, N, -0.05, 0.05);
    tu_fill(rng, g, N, -3e-3, 3e-3);
    tu_fill(rng, m, N, -2e-3, 2e-3);
    tu_fill(rng, v, N, 0, 4e-6);
    ts_adamw_hparams h = {.lr = 2e-2, .beta1 = 0.8, .beta2 = 0.95, .eps = 1e-3, .weight_decay = 0.1};
    ref_state r = {malloc(N * sizeof(double)), malloc(N * sizeof(double)), malloc(N * sizeof(double))};
    for (int i = 0; i < N; i++) {
        r.p[i] = p[i];
        r.m[i] = m[i];
        r.v[i] = v[i];
    }
    ts_adamw_step s;
    tu_expect_ok(ts_adamw_prepare(&s, &h, 9), op);
    tu_expect_ok(ts_cpu_adamw_update(ctx, p, g, m, v, N, &s), op);
    ref_step(&r, g, N, &h, 9);
    tu_check_close(op, "param", NULL, p, r.p, N, 1e-8, 1e-6);
    tu_check_close(op, "exp_avg", NULL, m, r.m, N, 6e-10, 1e-6);
    tu_check_close(op, "exp_avg_sq", NULL, v, r.v, N, 1e-15, 1e-6);
    tu_free(p, op, "param");
    tu_free(g, op, "grad");
    tu_free(m, op, "exp_avg");
    tu_free(v, op, "exp_avg_sq");
    free(r.p);
    free(r.m);
    free(r.v);
}

/* Elements are independent: 1 and 2 threads give the same bits on a tensor
 * big enough for the parallel loop. */
static void test_threads(ts_ctx *ctx, tu_rng *rng)
{
    const char *op = "adamw threads";
    const size_t n = 100003;
    float *a[2][4];
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < 4; j++) a[k][j] = tu_alloc_f(n);
    tu_fill(rng, a[0][0], n, -1, 1);
    tu_fill(rng, a[0][1], n, -1, 1);
    memcpy(a[1][0], a[0][0], n * sizeof(float));
    memcpy(a[1][1], a[0][1], n * sizeof(float));
    ts_adamw_hparams h = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
    for (int k = 0; k < 2; k++) {
        ts_threads_init(k + 1);
        for (long t = 1; t <= 3; t++) {
            ts_adamw_step s;
            ts_adamw_prepare(&s, &h, t);
            tu_expect_ok(ts_cpu_adamw_update(ctx, a[k][0], a[k][1], a[k][2], a[k][3], n, &s), op);
        }
    }
    ts_threads_init(0);
    tu_expect(memcmp(a[0][0], a[1][0], n * sizeof(float)) == 0 && memcmp(a[0][2], a[1][2], n * sizeof(float)) == 0 &&
                  memcmp(a[0][3], a[1][3], n * sizeof(float)) == 0,
              "%s: 1 and 2 threads give bit-identical param and moments", op);
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < 4; j++) tu_free(a[k][j], op, "buffer");
}

static void test_errors(ts_ctx *ctx)
{
    ts_adamw_step s;
    const ts_adamw_hparams good = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
    ts_adamw_hparams h = good;
    tu_expect_error(ts_adamw_prepare(&s, &h, 0), TS_ERR_INVALID_ARG, "adamw_prepare t=0", "adamw", "step",
                    (char *)NULL);
    h.lr = -1e-3;
    tu_expect_error(ts_adamw_prepare(&s, &h, 1), TS_ERR_INVALID_ARG, "adamw_prepare lr<0", "adamw", "lr", (char *)NULL);
    h = good;
    h.lr = NAN;
    tu_expect_error(ts_adamw_prepare(&s, &h, 1), TS_ERR_INVALID_ARG, "adamw_prepare lr NaN", "adamw", (char *)NULL);
    h = good;
    h.eps = -1;
    tu_expect_error(ts_adamw_prepare(&s, &h, 1), TS_ERR_INVALID_ARG, "adamw_prepare eps<0", "adamw", "eps",
                    (char *)NULL);
    h = good;
    h.weight_decay = -0.1;
    tu_expect_error(ts_adamw_prepare(&s, &h, 1), TS_ERR_INVALID_ARG, "adamw_prepare weight_decay<0", "adamw",
                    "weight_decay", (char *)NULL);
    h = good;
    h.beta1 = 1.0;
    tu_expect_error(ts_adamw_prepare(&s, &h, 1), TS_ERR_INVALID_ARG, "adamw_prepare beta1=1", "adamw", "betas",
                    (char *)NULL);
    h = good;
    h.beta2 = -0.5;
    tu_expect_error(ts_adamw_prepare(&s, &h, 1), TS_ERR_INVALID_ARG, "adamw_prepare beta2<0", "adamw", "betas",
                    (char *)NULL);

    float *p = tu_alloc_f(4), *g = tu_alloc_f(4), *m = tu_alloc_f(4), *v = tu_alloc_f(4);
    tu_expect_ok(ts_adamw_prepare(&s, &good, 1), "adamw_prepare defaults");
    tu_expect_error(ts_cpu_adamw_update(ctx, p, NULL, m, v, 4, &s), TS_ERR_INVALID_ARG, "adamw_update NULL grad",
                    "adamw_update", (char *)NULL);
    tu_expect_error(ts_cpu_adamw_update(ctx, p, g, m, v, 4, NULL), TS_ERR_INVALID_ARG, "adamw_update NULL step",
                    "adamw_update", (char *)NULL);
    tu_expect_error(ts_cpu_adamw_update(ctx, p, g, m, m, 4, &s), TS_ERR_INVALID_ARG,
                    "adamw_update exp_avg == exp_avg_sq", "adamw_update", "distinct", (char *)NULL);
    tu_expect_ok(ts_cpu_adamw_update(ctx, NULL, NULL, NULL, NULL, 0, &s), "adamw_update n=0 is a no-op");
    tu_free(p, "adamw errors", "param");
    tu_free(g, "adamw errors", "grad");
    tu_free(m, "adamw errors", "exp_avg");
    tu_free(v, "adamw errors", "exp_avg_sq");
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    tu_rng rng;
    tu_rng_seed(&rng, 7);
    const ts_adamw_hparams defaults = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
    const ts_adamw_hparams no_wd = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0};
    /* beta1 0.3: lerp weight 0.7 takes PyTorch's other branch. */
    const ts_adamw_hparams low_beta1 = {.lr = 5e-3, .beta1 = 0.3, .beta2 = 0.99, .eps = 1e-6, .weight_decay = 0.5};
    test_steps(&ctx, &rng, "defaults", &defaults, 37, 6, 1.0);
    test_steps(&ctx, &rng, "weight_decay 0", &no_wd, 1000, 6, 1e-2);
    test_steps(&ctx, &rng, "beta1 0.3, wd 0.5", &low_beta1, 129, 6, 1e-1);
    test_steps(&ctx, &rng, "defaults, large n", &defaults, 65537, 3, 1e-3);
    test_first_step(&ctx);
    test_state_step(&ctx, &rng);
    test_threads(&ctx, &rng);
    test_errors(&ctx);
    ts_ctx_free(&ctx);
    return tu_finish("test_adamw");
}
