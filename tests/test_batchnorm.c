/* BatchNorm2d (ts_cpu_batchnorm_*) against a double-precision reference of
 * shared/specs/smp-unet.md section 7.3: training forward and saved
 * statistics, the running-stat update (unbiased variance) over two steps,
 * eval mode, the backward against the closed form and against central
 * finite differences, accumulation into pre-filled gradients, and the error
 * cases (n == 1 per channel, mismatched shapes). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "testutil.h"

static const char OPS[] = "batchnorm";

static double *dalloc(size_t n) { return tu_alloc(n * sizeof(double)); }

static void to_double(double *d, const float *f, size_t n)
{
    for (size_t i = 0; i < n; i++) d[i] = f[i];
}

/* Training-mode BN in double: per channel over N*H*W values, biased
 * variance for the normalization. mean/var_b/var_u may be NULL. */
static void ref_bn_train(double *y, double *mean_out, double *var_b_out, double *var_u_out, const double *x, int N,
                         int C, size_t plane, const double *gamma, const double *beta, double eps)
{
    size_t count = (size_t)N * plane;
    for (int c = 0; c < C; c++) {
        double s = 0;
        for (int n = 0; n < N; n++)
            for (size_t i = 0; i < plane; i++) s += x[((size_t)n * C + c) * plane + i];
        double mean = s / (double)count, ss = 0;
        for (int n = 0; n < N; n++)
            for (size_t i = 0; i < plane; i++) {
                double d = x[((size_t)n * C + c) * plane + i] - mean;
                ss += d * d;
            }
        double var = ss / (double)count;
        if (mean_out) mean_out[c] = mean;
        if (var_b_out) var_b_out[c] = var;
        if (var_u_out) var_u_out[c] = ss / (double)(count - 1);
        double invstd = 1.0 / sqrt(var + eps);
        for (int n = 0; n < N; n++)
            for (size_t i = 0; i < plane; i++) {
                size_t k = ((size_t)n * C + c) * plane + i;
                y[k] = (x[k] - mean) * invstd * gamma[c] + beta[c];
            }
    }
}

/* The loss L = sum r * bn(x; gamma, beta) as a function of
 * theta = [x (numel), gamma (C), beta (C)], for tu_fd_grad. */
typedef struct bn_fd {
    int N, C;
    size_t plane, numel;
    double eps;
    const double *r;
    double *y; /* scratch, numel */
} bn_fd;

static double bn_loss(void *vctx, const double *theta)
{
    bn_fd *f = vctx;
    const double *x = theta, *g = theta + f->numel, *b = g + f->C;
    ref_bn_train(f->y, NULL, NULL, NULL, x, f->N, f->C, f->plane, g, b, f->eps);
    double L = 0;
    for (size_t i = 0; i < f->numel; i++) L += f->r[i] * f->y[i];
    return L;
}

/* Per-channel input with its own offset and spread, so channels differ. */
static void fill_bn_input(tu_rng *rng, ts_tensor *x)
{
    size_t plane = (size_t)x->h * x->w;
    for (int c = 0; c < x->c; c++) {
        double off = tu_uniform(rng, -1.5, 1.5), sc = tu_uniform(rng, 0.5, 2.0);
        for (int n = 0; n < x->n; n++)
            for (size_t i = 0; i < plane; i++)
                x->data[((size_t)n * x->c + c) * plane + i] = (float)(off + sc * tu_uniform(rng, -1, 1));
    }
}

static void test_shape(ts_ctx *ctx, tu_rng *rng, int N, int C, int H, int W)
{
    char op[96], sh[TS_SHAPE_STR];
    const ts_bn_params prm = {.eps = 1e-5f, .momentum = 0.1f};
    const double eps = prm.eps, m = prm.momentum;
    ts_tensor x = tu_tensor(N, C, H, W), y = tu_tensor(N, C, H, W), y2 = tu_tensor(N, C, H, W);
    ts_tensor dy = tu_tensor(N, C, H, W), dx = tu_tensor(N, C, H, W);
    snprintf(op, sizeof op, "%s %s", OPS, ts_shape_str(&x, sh));
    const size_t numel = ts_tensor_numel(&x), plane = (size_t)H * W;
    float *gamma = tu_alloc_f(C), *beta = tu_alloc_f(C), *smean = tu_alloc_f(C), *sinv = tu_alloc_f(C);
    float *rmean = tu_alloc_f(C), *rvar = tu_alloc_f(C), *dgamma = tu_alloc_f(C), *dbeta = tu_alloc_f(C);
    double *xd = dalloc(numel + 2 * (size_t)C), *yref = dalloc(numel), *rd = dalloc(numel);
    double *mean = dalloc(C), *varb = dalloc(C), *varu = dalloc(C), *want_c = dalloc(C), *want = dalloc(numel);
    double *rm_ref = dalloc(C), *rv_ref = dalloc(C);
    double *gd = xd + numel, *bd = gd + C;

    for (int c = 0; c < C; c++) {
        gamma[c] = (float)(tu_uniform(rng, 0.5, 1.5) * (tu_randint(rng, 2) ? 1 : -1));
        beta[c] = (float)tu_uniform(rng, -0.5, 0.5);
        rmean[c] = (float)tu_uniform(rng, -0.3, 0.3);
        rvar[c] = (float)tu_uniform(rng, 0.5, 2.0);
        rm_ref[c] = rmean[c];
        rv_ref[c] = rvar[c];
    }
    to_double(gd, gamma, C);
    to_double(bd, beta, C);

    /* ---- two training steps: output, saved stats, running stats ---- */
    for (int step = 0; step < 2; step++) {
        fill_bn_input(rng, &x);
        to_double(xd, x.data, numel);
        if (!tu_expect_ok(ts_cpu_batchnorm_forward_train(ctx, &y, smean, sinv, &x, gamma, beta, rmean, rvar, &prm), op))
            break;
        ref_bn_train(yref, mean, varb, varu, xd, N, C, plane, gd, bd, eps);
        for (int c = 0; c < C; c++) {
            rm_ref[c] = (1 - m) * rm_ref[c] + m * mean[c];
            rv_ref[c] = (1 - m) * rv_ref[c] + m * varu[c]; /* unbiased: var_sum / (n - 1) */
            want_c[c] = 1.0 / sqrt(varb[c] + eps);
        }
        tu_check_close(op, "train y", &x, y.data, yref, numel, 2e-5, 2e-5);
        tu_check_close(op, "save_mean", NULL, smean, mean, C, 1e-6, 1e-6);
        tu_check_close(op, "save_invstd", NULL, sinv, want_c, C, 0, 2e-6);
        tu_check_close(op, "running_mean after step", NULL, rmean, rm_ref, C, 1e-6, 1e-6);
        tu_check_close(op, "running_var after step (unbiased)", NULL, rvar, rv_ref, C, 1e-6, 2e-6);
    }

    /* Without running stats: same output, nothing else touched. */
    if (tu_expect_ok(ts_cpu_batchnorm_forward_train(ctx, &y2, smean, sinv, &x, gamma, beta, NULL, NULL, &prm), op))
        tu_expect(memcmp(y.data, y2.data, numel * sizeof(float)) == 0, "%s: output differs when running stats are NULL",
                  op);

    /* ---- eval mode with the running statistics ---- */
    if (tu_expect_ok(ts_cpu_batchnorm_forward_eval(ctx, &y2, &x, gamma, beta, rmean, rvar, &prm), op)) {
        for (int c = 0; c < C; c++)
            for (int n = 0; n < N; n++)
                for (size_t i = 0; i < plane; i++) {
                    size_t k = ((size_t)n * C + c) * plane + i;
                    want[k] = ((double)x.data[k] - rmean[c]) / sqrt((double)rvar[c] + eps) * gamma[c] + beta[c];
                }
        tu_check_close(op, "eval y", &x, y2.data, want, numel, 2e-5, 2e-5);
    }

    /* ---- backward: dy = r, pre-filled gradients must keep their values ---- */
    tu_fill(rng, dy.data, numel, -1, 1);
    to_double(rd, dy.data, numel);
    tu_fill(rng, dx.data, numel, -1, 1);
    tu_fill(rng, dgamma, C, -1, 1);
    tu_fill(rng, dbeta, C, -1, 1);
    double *dx0 = dalloc(numel), *dg0 = dalloc(C), *db0 = dalloc(C), *want_b = dalloc(C);
    to_double(dx0, dx.data, numel);
    to_double(dg0, dgamma, C);
    to_double(db0, dbeta, C);
    /* smean/sinv hold the last training step's statistics of x. */
    if (tu_expect_ok(ts_cpu_batchnorm_backward(ctx, &dx, dgamma, dbeta, &dy, &x, gamma, smean, sinv), op)) {
        /* Closed form: dx = gamma invstd (dy - mean(dy) - xhat mean(dy xhat)). */
        size_t count = (size_t)N * plane;
        for (int c = 0; c < C; c++) {
            double invstd = 1.0 / sqrt(varb[c] + eps), s = 0, sx = 0;
            for (int n = 0; n < N; n++)
                for (size_t i = 0; i < plane; i++) {
                    size_t k = ((size_t)n * C + c) * plane + i;
                    s += rd[k];
                    sx += rd[k] * (xd[k] - mean[c]) * invstd;
                }
            for (int n = 0; n < N; n++)
                for (size_t i = 0; i < plane; i++) {
                    size_t k = ((size_t)n * C + c) * plane + i;
                    double xh = (xd[k] - mean[c]) * invstd;
                    want[k] = dx0[k] + gd[c] * invstd * (rd[k] - s / count - xh * sx / count);
                }
            want_c[c] = dg0[c] + sx;
            want_b[c] = db0[c] + s;
        }
        tu_check_close(op, "dx (closed form, accumulated)", &x, dx.data, want, numel, 5e-5, 1e-4);
        tu_check_close(op, "dgamma (closed form, accumulated)", NULL, dgamma, want_c, C, 5e-5, 1e-4);
        tu_check_close(op, "dbeta (closed form, accumulated)", NULL, dbeta, want_b, C, 5e-5, 1e-5);

        /* Central differences of the double reference in x, gamma and beta. */
        size_t idx[64 + 2 * 5];
        size_t nx = tu_sample_indices(rng, numel, 48, idx), nidx = nx;
        for (int c = 0; c < 2 * C; c++) idx[nidx++] = numel + (size_t)c;
        double fd[64 + 2 * 5];
        float gotf[64 + 2 * 5];
        bn_fd f = {.N = N, .C = C, .plane = plane, .numel = numel, .eps = eps, .r = rd, .y = yref};
        tu_fd_grad(bn_loss, &f, xd, idx, nidx, 1e-5, fd);
        for (size_t k = 0; k < nidx; k++) {
            size_t i = idx[k];
            if (i < numel) {
                gotf[k] = dx.data[i];
                fd[k] += dx0[i];
            } else if (i < numel + (size_t)C) {
                gotf[k] = dgamma[i - numel];
                fd[k] += dg0[i - numel];
            } else {
                gotf[k] = dbeta[i - numel - C];
                fd[k] += db0[i - numel - C];
            }
        }
        tu_check_close(op, "dx, dgamma, dbeta vs finite differences (accumulated)", NULL, gotf, fd, nidx, 1e-4, 1e-4);
    }

    tu_free(dx0, op, "dx0");
    tu_free(dg0, op, "dg0");
    tu_free(db0, op, "db0");
    tu_free(want_b, op, "want_b");
    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&y2, op, "y2");
    tu_tensor_free(&dy, op, "dy");
    tu_tensor_free(&dx, op, "dx");
    tu_free(gamma, op, "gamma");
    tu_free(beta, op, "beta");
    tu_free(smean, op, "save_mean");
    tu_free(sinv, op, "save_invstd");
    tu_free(rmean, op, "running_mean");
    tu_free(rvar, op, "running_var");
    tu_free(dgamma, op, "dgamma");
    tu_free(dbeta, op, "dbeta");
    tu_free(xd, op, "xd");
    tu_free(yref, op, "yref");
    tu_free(rd, op, "rd");
    tu_free(mean, op, "mean");
    tu_free(varb, op, "varb");
    tu_free(varu, op, "varu");
    tu_free(want_c, op, "want_c");
    tu_free(want, op, "want");
    tu_free(rm_ref, op, "rm_ref");
    tu_free(rv_ref, op, "rv_ref");
}

static void test_errors(ts_ctx *ctx)
{
    const ts_bn_params prm = {.eps = 1e-5f, .momentum = 0.1f};
    float *v = tu_alloc_f(8), *s1 = tu_alloc_f(8), *s2 = tu_alloc_f(8), *rm = tu_alloc_f(8), *rv = tu_alloc_f(8);
    float *dg = tu_alloc_f(8), *db = tu_alloc_f(8);
    for (int i = 0; i < 8; i++) v[i] = rv[i] = 1.0f;

    /* One value per channel: PyTorch's training-mode error. */
    ts_tensor x1 = tu_tensor(1, 3, 1, 1), y1 = tu_tensor(1, 3, 1, 1);
    tu_expect_error(ts_cpu_batchnorm_forward_train(ctx, &y1, s1, s2, &x1, v, v, rm, rv, &prm), TS_ERR_INVALID_ARG,
                    "batchnorm train with one value per channel", "batchnorm_forward_train",
                    "Expected more than 1 value per channel when training", "[1,3,1,1]", (char *)NULL);
    /* ... which eval mode accepts. */
    tu_expect_ok(ts_cpu_batchnorm_forward_eval(ctx, &y1, &x1, v, v, rm, rv, &prm), "batchnorm eval on [1,3,1,1]");

    ts_tensor x = tu_tensor(2, 3, 5, 3), ybad = tu_tensor(2, 3, 5, 4), dy = tu_tensor(2, 3, 5, 3);
    ts_tensor dx = tu_tensor(2, 3, 5, 3), xc = tu_tensor(2, 2, 5, 3);
    tu_expect_error(ts_cpu_batchnorm_forward_train(ctx, &ybad, s1, s2, &x, v, v, rm, rv, &prm), TS_ERR_INVALID_ARG,
                    "batchnorm train y shape mismatch", "batchnorm_forward_train", "[2,3,5,4]", "[2,3,5,3]",
                    (char *)NULL);
    tu_expect_error(ts_cpu_batchnorm_forward_eval(ctx, &ybad, &x, v, v, rm, rv, &prm), TS_ERR_INVALID_ARG,
                    "batchnorm eval y shape mismatch", "batchnorm_forward_eval", "[2,3,5,4]", "[2,3,5,3]",
                    (char *)NULL);
    tu_expect_error(ts_cpu_batchnorm_backward(ctx, &dx, dg, db, &ybad, &x, v, s1, s2), TS_ERR_INVALID_ARG,
                    "batchnorm backward dy shape mismatch", "batchnorm_backward", "[2,3,5,4]", "[2,3,5,3]",
                    (char *)NULL);
    tu_expect_error(ts_cpu_batchnorm_backward(ctx, &xc, dg, db, &dy, &x, v, s1, s2), TS_ERR_INVALID_ARG,
                    "batchnorm backward dx shape mismatch", "batchnorm_backward", "[2,2,5,3]", "[2,3,5,3]",
                    (char *)NULL);
    tu_expect_error(ts_cpu_batchnorm_forward_train(ctx, &dx, s1, s2, &x, v, v, rm, NULL, &prm), TS_ERR_INVALID_ARG,
                    "batchnorm train with only running_mean", "batchnorm_forward_train", "running_var", (char *)NULL);

    tu_tensor_free(&x1, "batchnorm errors", "x1");
    tu_tensor_free(&y1, "batchnorm errors", "y1");
    tu_tensor_free(&x, "batchnorm errors", "x");
    tu_tensor_free(&ybad, "batchnorm errors", "ybad");
    tu_tensor_free(&dy, "batchnorm errors", "dy");
    tu_tensor_free(&dx, "batchnorm errors", "dx");
    tu_tensor_free(&xc, "batchnorm errors", "xc");
    tu_free(v, "batchnorm errors", "v");
    tu_free(s1, "batchnorm errors", "s1");
    tu_free(s2, "batchnorm errors", "s2");
    tu_free(rm, "batchnorm errors", "rm");
    tu_free(rv, "batchnorm errors", "rv");
    tu_free(dg, "batchnorm errors", "dg");
    tu_free(db, "batchnorm errors", "db");
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    tu_rng rng;
    tu_rng_seed(&rng, 0xB47C4u);

    static const int shapes[][4] = {
        {1, 1, 7, 9},                               /* batch 1, one channel */
        {2, 3, 13, 11}, {3, 5, 5, 3}, {2, 3, 1, 2}, /* n = 4 per channel: the unbiased factor 4/3 is large */
        {1, 5, 1, 2},                               /* n = 2, the smallest allowed */
        {4, 5, 37, 41}                              /* enough work for both threads */
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        test_shape(&ctx, &rng, shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3]);
    test_errors(&ctx);

    ts_ctx_free(&ctx);
    return tu_finish("test_batchnorm");
}
