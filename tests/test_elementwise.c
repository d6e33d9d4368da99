/* ReLU, add, channel concat and zero (ts_cpu_relu_*, ts_cpu_add_*,
 * ts_cpu_concat_*, ts_cpu_zero) against double references: forward values,
 * in-place forms, backward against central finite differences of the
 * reference with L = sum r * y, accumulation into pre-filled gradients, and
 * shape errors naming the op. The large shape takes the OpenMP paths. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "testutil.h"

static double *dalloc(size_t n) { return tu_alloc(n * sizeof(double)); }

static void to_double(double *d, const float *f, size_t n)
{
    for (size_t i = 0; i < n; i++) d[i] = f[i];
}

#define MAX_FD 64
/* Exact comparison. A tolerance of exactly 0 would make tu_check_close's
 * err / tol ratio 0/0 for matching values and point its report at the wrong
 * element; 1e-30 is below any float difference these values can show. */
#define EXACT 1e-30

/* ---- L = sum r * f(x) for the FD checks -------------------------------- */
typedef struct fd_ctx {
    size_t n;        /* elements of the first operand */
    size_t n2;       /* elements of the second operand (add, concat) */
    const double *r; /* dL/dy */
    /* concat layout: per image na then nb elements */
    size_t na, nb;
    int images;
} fd_ctx;

static double relu_loss(void *vc, const double *x)
{
    const fd_ctx *f = vc;
    double L = 0;
    for (size_t i = 0; i < f->n; i++) L += f->r[i] * (x[i] > 0 ? x[i] : 0);
    return L;
}

/* theta = [a (n), b (n)]. */
static double add_loss(void *vc, const double *t)
{
    const fd_ctx *f = vc;
    double L = 0;
    for (size_t i = 0; i < f->n; i++) L += f->r[i] * (t[i] + t[f->n + i]);
    return L;
}

/* theta = [a (images * na), b (images * nb)]; y = cat per image. */
static double concat_loss(void *vc, const double *t)
{
    const fd_ctx *f = vc;
    const double *a = t, *b = t + (size_t)f->images * f->na;
    double L = 0;
    for (int n = 0; n < f->images; n++) {
        const double *r = f->r + (size_t)n * (f->na + f->nb);
        for (size_t i = 0; i < f->na; i++) L += r[i] * a[(size_t)n * f->na + i];
        for (size_t i = 0; i < f->nb; i++) L += r[f->na + i] * b[(size_t)n * f->nb + i];
    }
    return L;
}

/* Gathers the sampled entries of a float gradient, and adds the pre-fill to
 * the FD values, so one comparison checks value and accumulation. */
static void gather(float *got, double *want, const size_t *idx, size_t k, const float *grad, const double *prefill)
{
    for (size_t j = 0; j < k; j++) {
        got[j] = grad[idx[j]];
        want[j] += prefill[idx[j]];
    }
}

/* ---- ReLU ---------------------------------------------------------------- */
static void test_relu(ts_ctx *ctx, tu_rng *rng, int N, int C, int H, int W)
{
    char op[96], sh[TS_SHAPE_STR];
    ts_tensor x = tu_tensor(N, C, H, W), y = tu_tensor(N, C, H, W), dy = tu_tensor(N, C, H, W);
    ts_tensor dx = tu_tensor(N, C, H, W);
    snprintf(op, sizeof op, "relu %s", ts_shape_str(&x, sh));
    size_t n = ts_tensor_numel(&x);
    double *want = dalloc(n), *xd = dalloc(n), *rd = dalloc(n), *dx0 = dalloc(n);

    /* Values at least 0.05 away from the kink at 0, so FD never straddles it;
     * a few exact zeros check that y == 0 passes no gradient. */
    for (size_t i = 0; i < n; i++) {
        double v = tu_uniform(rng, 0.05, 2.0);
        x.data[i] = (float)(tu_randint(rng, 2) ? v : -v);
        if (tu_randint(rng, 17) == 0) x.data[i] = 0.0f;
    }
    to_double(xd, x.data, n);
    for (size_t i = 0; i < n; i++) want[i] = xd[i] > 0 ? xd[i] : 0;
    if (tu_expect_ok(ts_cpu_relu_forward(ctx, &y, &x), op))
        tu_check_close(op, "forward", &y, y.data, want, n, EXACT, 0);

    /* Backward: dx += dy * (y > 0). */
    tu_fill(rng, dy.data, n, -1, 1);
    tu_fill(rng, dx.data, n, -1, 1);
    to_double(rd, dy.data, n);
    to_double(dx0, dx.data, n);
    if (tu_expect_ok(ts_cpu_relu_backward(ctx, &dx, &dy, &y), op)) {
        for (size_t i = 0; i < n; i++) want[i] = dx0[i] + (xd[i] > 0 ? rd[i] : 0);
        tu_check_close(op, "backward (accumulated)", &x, dx.data, want, n, 1e-6, 1e-6);
        size_t idx[MAX_FD], k = tu_sample_indices(rng, n, MAX_FD, idx), kept = 0;
        for (size_t j = 0; j < k; j++) /* relu is not differentiable at the exact zeros */
            if (xd[idx[j]] != 0) idx[kept++] = idx[j];
        k = kept;
        double fd[MAX_FD];
        float got[MAX_FD];
        fd_ctx f = {.n = n, .r = rd};
        tu_fd_grad(relu_loss, &f, xd, idx, k, 1e-3, fd);
        gather(got, fd, idx, k, dx.data, dx0);
        tu_check_close(op, "backward vs finite differences", NULL, got, fd, k, 1e-6, 1e-6);
    }

    /* In place: y is x. */
    if (tu_expect_ok(ts_cpu_relu_forward(ctx, &x, &x), op)) {
        for (size_t i = 0; i < n; i++) want[i] = xd[i] > 0 ? xd[i] : 0;
        tu_check_close(op, "forward in place", &x, x.data, want, n, EXACT, 0);
    }

    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&dy, op, "dy");
    tu_tensor_free(&dx, op, "dx");
    tu_free(want, op, "want");
    tu_free(xd, op, "xd");
    tu_free(rd, op, "rd");
    tu_free(dx0, op, "dx0");
}

/* NaN passes through ReLU as in torch.relu; its gradient rule is
 * threshold_backward's (y <= 0 ? 0 : dy). */
static void test_relu_special(ts_ctx *ctx)
{
    const char *op = "relu special values";
    ts_tensor x = tu_tensor(1, 1, 1, 4), y = tu_tensor(1, 1, 1, 4), dy = tu_tensor(1, 1, 1, 4);
    ts_tensor dx = tu_tensor(1, 1, 1, 4);
    x.data[0] = NAN;
    x.data[1] = -INFINITY;
    x.data[2] = INFINITY;
    x.data[3] = -0.0f;
    if (tu_expect_ok(ts_cpu_relu_forward(ctx, &y, &x), op)) {
        tu_expect(isnan(y.data[0]), "%s: relu(NaN) = %g, want NaN", op, (double)y.data[0]);
        tu_expect(y.data[1] == 0.0f && y.data[2] == INFINITY && y.data[3] == 0.0f,
                  "%s: relu(-inf, inf, -0) = (%g, %g, %g)", op, (double)y.data[1], (double)y.data[2],
                  (double)y.data[3]);
    }
    for (int i = 0; i < 4; i++) dy.data[i] = 1.0f;
    if (tu_expect_ok(ts_cpu_relu_backward(ctx, &dx, &dy, &y), op))
        tu_expect(dx.data[0] == 1.0f && dx.data[1] == 0.0f && dx.data[2] == 1.0f && dx.data[3] == 0.0f,
                  "%s: backward gives (%g, %g, %g, %g), want (1, 0, 1, 0)", op, (double)dx.data[0], (double)dx.data[1],
                  (double)dx.data[2], (double)dx.data[3]);
    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&dy, op, "dy");
    tu_tensor_free(&dx, op, "dx");
}

/* ---- add ----------------------------------------------------------------- */
static void test_add(ts_ctx *ctx, tu_rng *rng, int N, int C, int H, int W)
{
    char op[96], sh[TS_SHAPE_STR];
    ts_tensor a = tu_tensor(N, C, H, W), b = tu_tensor(N, C, H, W), y = tu_tensor(N, C, H, W);
    ts_tensor dy = tu_tensor(N, C, H, W), da = tu_tensor(N, C, H, W), db = tu_tensor(N, C, H, W);
    snprintf(op, sizeof op, "add %s", ts_shape_str(&a, sh));
    size_t n = ts_tensor_numel(&a);
    double *want = dalloc(n), *t = dalloc(2 * n), *rd = dalloc(n), *da0 = dalloc(n), *db0 = dalloc(n);

    tu_fill(rng, a.data, n, -2, 2);
    tu_fill(rng, b.data, n, -2, 2);
    to_double(t, a.data, n);
    to_double(t + n, b.data, n);
    /* Forward: float a + b is the correctly rounded double sum. */
    for (size_t i = 0; i < n; i++) want[i] = (float)(t[i] + t[n + i]);
    if (tu_expect_ok(ts_cpu_add_forward(ctx, &y, &a, &b), op))
        tu_check_close(op, "forward", &y, y.data, want, n, EXACT, 0);

    /* Backward: da += dy, db += dy. */
    tu_fill(rng, dy.data, n, -1, 1);
    tu_fill(rng, da.data, n, -1, 1);
    tu_fill(rng, db.data, n, -1, 1);
    to_double(rd, dy.data, n);
    to_double(da0, da.data, n);
    to_double(db0, db.data, n);
    if (tu_expect_ok(ts_cpu_add_backward(ctx, &da, &db, &dy), op)) {
        double *w2 = dalloc(n);
        for (size_t i = 0; i < n; i++) {
            want[i] = da0[i] + rd[i];
            w2[i] = db0[i] + rd[i];
        }
        tu_check_close(op, "backward da (accumulated)", &a, da.data, want, n, 1e-6, 1e-6);
        tu_check_close(op, "backward db (accumulated)", &b, db.data, w2, n, 1e-6, 1e-6);
        tu_free(w2, op, "w2");

        /* FD over theta = [a, b]: half the samples from each. */
        size_t idx[MAX_FD], ka = tu_sample_indices(rng, n, MAX_FD / 2, idx);
        size_t kb = tu_sample_indices(rng, n, MAX_FD / 2, idx + ka);
        for (size_t j = 0; j < kb; j++) idx[ka + j] += n;
        double fd[MAX_FD];
        float got[MAX_FD];
        fd_ctx f = {.n = n, .r = rd};
        tu_fd_grad(add_loss, &f, t, idx, ka + kb, 1e-3, fd);
        for (size_t j = 0; j < ka + kb; j++) {
            size_t i = idx[j];
            got[j] = i < n ? da.data[i] : db.data[i - n];
            fd[j] += i < n ? da0[i] : db0[i - n];
        }
        tu_check_close(op, "backward vs finite differences", NULL, got, fd, ka + kb, 1e-6, 1e-6);
    }

    /* In place: y is a, then y is b (the residual add writes into one input). */
    for (size_t i = 0; i < n; i++) want[i] = (float)(t[i] + t[n + i]);
    if (tu_expect_ok(ts_cpu_add_forward(ctx, &a, &a, &b), op))
        tu_check_close(op, "forward in place (y = a)", &a, a.data, want, n, EXACT, 0);
    to_double(t, a.data, n);
    for (size_t i = 0; i < n; i++) want[i] = (float)(t[i] + t[n + i]);
    if (tu_expect_ok(ts_cpu_add_forward(ctx, &b, &a, &b), op))
        tu_check_close(op, "forward in place (y = b)", &b, b.data, want, n, EXACT, 0);

    tu_tensor_free(&a, op, "a");
    tu_tensor_free(&b, op, "b");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&dy, op, "dy");
    tu_tensor_free(&da, op, "da");
    tu_tensor_free(&db, op, "db");
    tu_free(want, op, "want");
    tu_free(t, op, "t");
    tu_free(rd, op, "rd");
    tu_free(da0, op, "da0");
    tu_free(db0, op, "db0");
}

/* ---- concat -------------------------------------------------------------- */
static void test_concat(ts_ctx *ctx, tu_rng *rng, int N, int Ca, int Cb, int H, int W)
{
    char op[128], sa[TS_SHAPE_STR], sb[TS_SHAPE_STR];
    ts_tensor a = tu_tensor(N, Ca, H, W), b = tu_tensor(N, Cb, H, W), y = tu_tensor(N, Ca + Cb, H, W);
    ts_tensor dy = tu_tensor(N, Ca + Cb, H, W), da = tu_tensor(N, Ca, H, W), db = tu_tensor(N, Cb, H, W);
    snprintf(op, sizeof op, "concat %s + %s", ts_shape_str(&a, sa), ts_shape_str(&b, sb));
    const size_t na = (size_t)Ca * H * W, nb = (size_t)Cb * H * W, per = na + nb;
    const size_t ta = (size_t)N * na, tb = (size_t)N * nb, ny = (size_t)N * per;
    double *want = dalloc(ny), *t = dalloc(ta + tb), *rd = dalloc(ny), *da0 = dalloc(ta), *db0 = dalloc(tb);

    tu_fill(rng, a.data, ta, -2, 2);
    tu_fill(rng, b.data, tb, -2, 2);
    to_double(t, a.data, ta);
    to_double(t + ta, b.data, tb);
    for (int n = 0; n < N; n++) {
        for (size_t i = 0; i < na; i++) want[n * per + i] = t[n * na + i];
        for (size_t i = 0; i < nb; i++) want[n * per + na + i] = t[ta + n * nb + i];
    }
    if (tu_expect_ok(ts_cpu_concat_forward(ctx, &y, &a, &b), op))
        tu_check_close(op, "forward", &y, y.data, want, ny, EXACT, 0);

    tu_fill(rng, dy.data, ny, -1, 1);
    tu_fill(rng, da.data, ta, -1, 1);
    tu_fill(rng, db.data, tb, -1, 1);
    to_double(rd, dy.data, ny);
    to_double(da0, da.data, ta);
    to_double(db0, db.data, tb);
    if (tu_expect_ok(ts_cpu_concat_backward(ctx, &da, &db, &dy), op)) {
        double *wa = dalloc(ta), *wb = dalloc(tb);
        for (int n = 0; n < N; n++) {
            for (size_t i = 0; i < na; i++) wa[n * na + i] = da0[n * na + i] + rd[n * per + i];
            for (size_t i = 0; i < nb; i++) wb[n * nb + i] = db0[n * nb + i] + rd[n * per + na + i];
        }
        tu_check_close(op, "backward da (accumulated)", &da, da.data, wa, ta, 1e-6, 1e-6);
        tu_check_close(op, "backward db (accumulated)", &db, db.data, wb, tb, 1e-6, 1e-6);
        tu_free(wa, op, "wa");
        tu_free(wb, op, "wb");

        size_t idx[MAX_FD], k = tu_sample_indices(rng, ta + tb, MAX_FD, idx);
        double fd[MAX_FD];
        float got[MAX_FD];
        fd_ctx f = {.r = rd, .na = na, .nb = nb, .images = N};
        tu_fd_grad(concat_loss, &f, t, idx, k, 1e-3, fd);
        for (size_t j = 0; j < k; j++) {
            size_t i = idx[j];
            got[j] = i < ta ? da.data[i] : db.data[i - ta];
            fd[j] += i < ta ? da0[i] : db0[i - ta];
        }
        tu_check_close(op, "backward vs finite differences", NULL, got, fd, k, 1e-6, 1e-6);
    }

    tu_tensor_free(&a, op, "a");
    tu_tensor_free(&b, op, "b");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&dy, op, "dy");
    tu_tensor_free(&da, op, "da");
    tu_tensor_free(&db, op, "db");
    tu_free(want, op, "want");
    tu_free(t, op, "t");
    tu_free(rd, op, "rd");
    tu_free(da0, op, "da0");
    tu_free(db0, op, "db0");
}

/* ---- zero ---------------------------------------------------------------- */
static void test_zero(ts_ctx *ctx, tu_rng *rng, size_t n)
{
    char op[64];
    snprintf(op, sizeof op, "zero n=%zu", n);
    float *p = tu_alloc_f(n);
    tu_fill(rng, p, n, 1, 2); /* never zero */
    float first = p[0], last = p[n - 1];
    /* The interior only: both ends must keep their values. */
    if (tu_expect_ok(ts_cpu_zero(ctx, p + 1, n - 2), op)) {
        size_t nonzero = 0;
        for (size_t i = 1; i + 1 < n; i++) nonzero += p[i] != 0.0f || signbit(p[i]);
        tu_expect(nonzero == 0, "%s: %zu interior values not +0", op, nonzero);
        tu_expect(p[0] == first && p[n - 1] == last, "%s: zero wrote outside [p+1, p+n-1)", op);
    }
    /* The whole buffer: the guards catch a write past the end. */
    if (tu_expect_ok(ts_cpu_zero(ctx, p, n), op)) {
        size_t nonzero = 0;
        for (size_t i = 0; i < n; i++) nonzero += p[i] != 0.0f;
        tu_expect(nonzero == 0, "%s: %zu values not zero", op, nonzero);
    }
    tu_free(p, op, "p");
}

/* ---- errors -------------------------------------------------------------- */
static void test_errors(ts_ctx *ctx)
{
    const char *op = "elementwise errors";
    ts_tensor a = tu_tensor(2, 3, 5, 3), b = tu_tensor(2, 3, 5, 4), c = tu_tensor(2, 3, 5, 3);
    ts_tensor y6 = tu_tensor(2, 6, 5, 3), y7 = tu_tensor(2, 7, 5, 3), n1 = tu_tensor(1, 3, 5, 3);
    tu_expect_error(ts_cpu_relu_forward(ctx, &b, &a), TS_ERR_INVALID_ARG, "relu_forward shape mismatch", "relu_forward",
                    "[2,3,5,4]", "[2,3,5,3]", (char *)NULL);
    tu_expect_error(ts_cpu_relu_backward(ctx, &c, &b, &a), TS_ERR_INVALID_ARG, "relu_backward dy mismatch",
                    "relu_backward", "[2,3,5,4]", "[2,3,5,3]", (char *)NULL);
    tu_expect_error(ts_cpu_relu_backward(ctx, &a, &a, &c), TS_ERR_INVALID_ARG, "relu_backward dx aliasing dy",
                    "relu_backward", "alias", (char *)NULL);
    tu_expect_error(ts_cpu_add_forward(ctx, &c, &a, &b), TS_ERR_INVALID_ARG, "add_forward a/b mismatch", "add_forward",
                    "[2,3,5,3]", "[2,3,5,4]", (char *)NULL);
    tu_expect_error(ts_cpu_add_forward(ctx, &b, &a, &c), TS_ERR_INVALID_ARG, "add_forward y mismatch", "add_forward",
                    "[2,3,5,4]", (char *)NULL);
    tu_expect_error(ts_cpu_add_backward(ctx, &a, &b, &c), TS_ERR_INVALID_ARG, "add_backward db mismatch",
                    "add_backward", "[2,3,5,4]", (char *)NULL);
    tu_expect_error(ts_cpu_concat_forward(ctx, &y7, &a, &c), TS_ERR_INVALID_ARG, "concat_forward channel sum",
                    "concat_forward", "[2,7,5,3]", "[2,3,5,3]", (char *)NULL);
    tu_expect_error(ts_cpu_concat_forward(ctx, &y6, &a, &b), TS_ERR_INVALID_ARG, "concat_forward w mismatch",
                    "concat_forward", "[2,3,5,4]", (char *)NULL);
    tu_expect_error(ts_cpu_concat_forward(ctx, &y6, &n1, &c), TS_ERR_INVALID_ARG, "concat_forward batch mismatch",
                    "concat_forward", "[1,3,5,3]", (char *)NULL);
    tu_expect_error(ts_cpu_concat_backward(ctx, &a, &c, &y7), TS_ERR_INVALID_ARG, "concat_backward channel sum",
                    "concat_backward", "[2,7,5,3]", (char *)NULL);
    tu_expect_error(ts_cpu_zero(ctx, NULL, 5), TS_ERR_INVALID_ARG, "zero NULL buffer", "zero", (char *)NULL);
    tu_expect_ok(ts_cpu_zero(ctx, NULL, 0), "zero of nothing");
    tu_tensor_free(&a, op, "a");
    tu_tensor_free(&b, op, "b");
    tu_tensor_free(&c, op, "c");
    tu_tensor_free(&y6, op, "y6");
    tu_tensor_free(&y7, op, "y7");
    tu_tensor_free(&n1, op, "n1");
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    tu_rng rng;
    tu_rng_seed(&rng, 0xE1E3u);

    static const int shapes[][4] = {
        {1, 1, 7, 9}, {2, 3, 13, 11},   {3, 5, 5, 3},
        {1, 3, 1, 1}, {2, 5, 101, 103}, /* > 2^16 elements: the OpenMP paths */
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const int *s = shapes[i];
        test_relu(&ctx, &rng, s[0], s[1], s[2], s[3]);
        test_add(&ctx, &rng, s[0], s[1], s[2], s[3]);
    }
    test_relu_special(&ctx);

    static const int cshapes[][5] = {
        /* N, Ca, Cb, H, W */
        {1, 1, 3, 7, 9},   {2, 3, 5, 13, 11},   {3, 5, 1, 5, 3},
        {2, 1, 1, 1, 1},   {1, 5, 3, 101, 103}, /* batch 1 above the parallel threshold */
        {2, 3, 5, 61, 67},
    };
    for (size_t i = 0; i < sizeof cshapes / sizeof cshapes[0]; i++) {
        const int *s = cshapes[i];
        test_concat(&ctx, &rng, s[0], s[1], s[2], s[3], s[4]);
    }

    test_zero(&ctx, &rng, 3);
    test_zero(&ctx, &rng, 1001);
    test_zero(&ctx, &rng, 300007);
    test_errors(&ctx);

    ts_ctx_free(&ctx);
    return tu_finish("test_elementwise");
}
