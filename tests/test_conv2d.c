/* conv2d on the CPU against a naive double-precision reference.
 *
 * For every case:
 *  - forward (y pre-filled with NaN, so it must be overwritten) vs the
 *    reference y, all elements;
 *  - with loss L = sum(r * y) for random r (so dy = r), backward data,
 *    filter and bias vs the reference's analytic gradients, all elements,
 *    and on sampled elements vs central finite differences of L computed in
 *    double, which checks the reference gradients too;
 *  - dx, dw and dbias are pre-filled with random values, so every check also
 *    checks that the backward ops accumulate (+=) instead of overwriting;
 *  - guard regions around every buffer catch out-of-bounds writes.
 * The cases cover every kernel/stride/pad combination of the U-Net
 * ResNet-34, 1x1 stride 1 (the no-im2col path), odd sizes and channel counts,
 * asymmetric kernels/strides/pads, and shapes whose column buffer exceeds
 * conv2d.c's 16 MiB cap so the pixel chunking really splits (mid-row). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "testutil.h"

typedef struct conv_case {
    const char *name;
    int n, cin, h, w;
    int cout, kh, kw;
    int sh, sw, ph, pw;
    int bias;
} conv_case;

/* conv2d.c bounds its im2col chunk to this many bytes; the "chunked" cases
 * below are checked to exceed it so they exercise the split. */
#define CONV_COL_CAP_BYTES ((size_t)16 << 20)

static const conv_case cases[] = {
    /* name                         n  cin  h   w  cout kh kw sh sw ph pw bias */
    {"enc.conv1 7x7/2 p3",          2, 3, 13, 11, 4, 7, 7, 2, 2, 3, 3, 0},
    {"7x7/2 p3 cin=1 tiny",         1, 1, 5, 4, 5, 7, 7, 2, 2, 3, 3, 0},
    {"3x3/1 p1",                    2, 5, 7, 9, 3, 3, 3, 1, 1, 1, 1, 0},
    {"3x3/1 p1 bias",               3, 3, 13, 11, 5, 3, 3, 1, 1, 1, 1, 1},
    {"3x3/2 p1",                    3, 5, 13, 11, 5, 3, 3, 2, 2, 1, 1, 0},
    {"3x3/2 p1 even",               2, 3, 8, 6, 3, 3, 3, 2, 2, 1, 1, 0},
    {"1x1/2 p0 downsample",         2, 5, 7, 9, 3, 1, 1, 2, 2, 0, 0, 0},
    {"1x1/1 p0 pointwise",          2, 5, 7, 9, 4, 1, 1, 1, 1, 0, 0, 1},
    {"1x1/1 p0 pointwise 1x1 img",  3, 3, 1, 1, 2, 1, 1, 1, 1, 0, 0, 0},
    {"head 16->6 3x3 p1 bias",      1, 16, 9, 12, 6, 3, 3, 1, 1, 1, 1, 1},
    {"3x5 s(2,1) p(0,2)",           2, 3, 10, 8, 2, 3, 5, 2, 1, 0, 2, 1},
    {"2x3 s(1,3) p(1,0)",           2, 2, 6, 11, 3, 2, 3, 1, 3, 1, 0, 0},
    {"3x3/1 p2 (pad > k/2)",        1, 2, 5, 7, 3, 3, 3, 1, 1, 2, 2, 0},
    {"1x1/3 p1 stride > kernel",    2, 3, 8, 7, 2, 1, 1, 3, 3, 1, 1, 0},
    {"chunked 3x3/1 p1",            2, 160, 57, 59, 3, 3, 3, 1, 1, 1, 1, 1},
    {"chunked 3x3/2 p1",            1, 160, 115, 117, 2, 3, 3, 2, 2, 1, 1, 0},
};

/* ---- double reference -------------------------------------------------------- */

typedef struct ref_problem {
    const conv_case *cc;
    int ho, wo;
    double *x, *w, *b; /* b may be NULL */
    const double *r;   /* dL/dy */
    int var;           /* for fd_loss: 0 perturbs x, 1 w, 2 b */
} ref_problem;

/* One pass over every (output, kernel tap) pair: y = conv(x, w) + b, and,
 * when r is given, L = sum r*y with its gradients dx, dw (scatter form, the
 * plain definition rather than a transposed conv). Any output may be NULL. */
static double ref_conv(const ref_problem *rp, const double *x, const double *w, const double *b, double *y,
                       double *dx, double *dw)
{
    const conv_case *c = rp->cc;
    double loss = 0.0;
    for (int n = 0; n < c->n; n++)
        for (int co = 0; co < c->cout; co++)
            for (int oh = 0; oh < rp->ho; oh++)
                for (int ow = 0; ow < rp->wo; ow++) {
                    size_t yi = (((size_t)n * c->cout + co) * rp->ho + oh) * rp->wo + ow;
                    double s = b ? b[co] : 0.0;
                    double rr = rp->r ? rp->r[yi] : 0.0;
                    for (int ci = 0; ci < c->cin; ci++)
                        for (int i = 0; i < c->kh; i++) {
                            int ih = oh * c->sh - c->ph + i;
                            if (ih < 0 || ih >= c->h) continue;
                            for (int j = 0; j < c->kw; j++) {
                                int iw = ow * c->sw - c->pw + j;
                                if (iw < 0 || iw >= c->w) continue;
                                size_t xi = (((size_t)n * c->cin + ci) * c->h + ih) * c->w + iw;
                                size_t wi = (((size_t)co * c->cin + ci) * c->kh + i) * c->kw + j;
                                s += x[xi] * w[wi];
                                if (dx) dx[xi] += rr * w[wi];
                                if (dw) dw[wi] += rr * x[xi];
                            }
                        }
                    if (y) y[yi] = s;
                    loss += rr * s;
                }
    return loss;
}

/* L as a function of one of x, w, b (rp->var), for tu_fd_grad. */
static double fd_loss(void *ctx, const double *v)
{
    const ref_problem *rp = ctx;
    return ref_conv(rp, rp->var == 0 ? v : rp->x, rp->var == 1 ? v : rp->w, rp->var == 2 ? v : rp->b, NULL, NULL,
                    NULL);
}

/* ---- helpers ----------------------------------------------------------------- */

static double *to_double(const float *p, size_t n)
{
    double *d = malloc((n ? n : 1) * sizeof *d);
    if (!d) {
        fprintf(stderr, "test_conv2d: out of memory\n");
        exit(2);
    }
    for (size_t i = 0; i < n; i++) d[i] = p[i];
    return d;
}

static double *zeros_d(size_t n)
{
    double *d = calloc(n ? n : 1, sizeof *d);
    if (!d) {
        fprintf(stderr, "test_conv2d: out of memory\n");
        exit(2);
    }
    return d;
}

/* FD of L w.r.t. sampled elements of v (rp->var), compared with got[i],
 * which must equal prefill[i] + dL/dv_i. */
static void fd_check(const char *op, const char *what, ref_problem *rp, double *v, size_t nv, const float *got,
                     const float *prefill, size_t max_samples, double atol, tu_rng *rng)
{
    size_t *idx = malloc(max_samples * sizeof *idx);
    double *fd = malloc(max_samples * sizeof *fd), *gd = malloc(max_samples * sizeof *gd);
    if (!idx || !fd || !gd) {
        fprintf(stderr, "test_conv2d: out of memory\n");
        exit(2);
    }
    size_t ns = tu_sample_indices(rng, nv, max_samples, idx);
    /* L is linear in each of x, w, b, so the central difference has no
     * truncation error; h only trades against rounding in L. */
    tu_fd_grad(fd_loss, rp, v, idx, ns, 1e-3, fd);
    for (size_t k = 0; k < ns; k++) {
        gd[k] = got[idx[k]];
        fd[k] += prefill[idx[k]];
    }
    tu_check_close_d(op, what, gd, fd, ns, atol, 1e-3);
    free(idx);
    free(fd);
    free(gd);
}

static void run_case(ts_ctx *ctx, const conv_case *c, tu_rng *rng)
{
    const ts_conv2d_params p = {.stride_h = c->sh, .stride_w = c->sw, .pad_h = c->ph, .pad_w = c->pw};
    const int ho = ts_conv_out_size(c->h, c->kh, c->sh, c->ph), wo = ts_conv_out_size(c->w, c->kw, c->sw, c->pw);
    char op[160];
    snprintf(op, sizeof op, "conv2d [%s] x[%d,%d,%d,%d] w[%d,%d,%d,%d] s(%d,%d) p(%d,%d)", c->name, c->n, c->cin, c->h,
             c->w, c->cout, c->cin, c->kh, c->kw, c->sh, c->sw, c->ph, c->pw);
    if (!tu_expect(ho >= 1 && wo >= 1, "%s: test case has no output", op)) return;

    ts_tensor x = tu_tensor(c->n, c->cin, c->h, c->w), w = tu_tensor(c->cout, c->cin, c->kh, c->kw);
    ts_tensor y = tu_tensor(c->n, c->cout, ho, wo), dy = tu_tensor(c->n, c->cout, ho, wo);
    ts_tensor dx = tu_tensor(c->n, c->cin, c->h, c->w), dw = tu_tensor(c->cout, c->cin, c->kh, c->kw);
    float *b = tu_alloc_f((size_t)c->cout), *db = tu_alloc_f((size_t)c->cout);
    const size_t nx = ts_tensor_numel(&x), nw = ts_tensor_numel(&w), ny = ts_tensor_numel(&y);
    const size_t nb = (size_t)c->cout;

    tu_fill(rng, x.data, nx, -1, 1);
    tu_fill(rng, w.data, nw, -1, 1);
    tu_fill(rng, b, nb, -1, 1);
    tu_fill(rng, dy.data, ny, -1, 1);
    /* Pre-filled gradients: the ops must add to them. */
    tu_fill(rng, dx.data, nx, -1, 1);
    tu_fill(rng, dw.data, nw, -1, 1);
    tu_fill(rng, db, nb, -1, 1);
    float *dx0 = malloc(nx * sizeof *dx0), *dw0 = malloc(nw * sizeof *dw0), *db0 = malloc(nb * sizeof *db0);
    if (!dx0 || !dw0 || !db0) {
        fprintf(stderr, "test_conv2d: out of memory\n");
        exit(2);
    }
    memcpy(dx0, dx.data, nx * sizeof *dx0);
    memcpy(dw0, dw.data, nw * sizeof *dw0);
    memcpy(db0, db, nb * sizeof *db0);
    for (size_t i = 0; i < ny; i++) y.data[i] = NAN; /* the forward must overwrite y */

    /* Reference in double. */
    double *xd = to_double(x.data, nx), *wd = to_double(w.data, nw), *bd = c->bias ? to_double(b, nb) : NULL;
    double *rd = to_double(dy.data, ny);
    double *y_ref = zeros_d(ny), *dx_ref = zeros_d(nx), *dw_ref = zeros_d(nw), *db_ref = zeros_d(nb);
    ref_problem rp = {.cc = c, .ho = ho, .wo = wo, .x = xd, .w = wd, .b = bd, .r = rd};
    ref_conv(&rp, xd, wd, bd, y_ref, dx_ref, dw_ref);
    for (size_t i = 0; i < ny; i++) db_ref[i / ((size_t)ho * wo) % nb] += rd[i];

    const double k_terms = (double)c->cin * c->kh * c->kw;
    const double dx_terms = (double)c->cout * c->kh * c->kw, dw_terms = (double)c->n * ho * wo;

    /* Forward. */
    if (tu_expect_ok(ts_cpu_conv2d_forward(ctx, &y, &x, &w, c->bias ? b : NULL, &p), op))
        tu_check_close(op, "forward y", &y, y.data, y_ref, ny, 1e-5 * sqrt(k_terms), 1e-4);

    /* Backward: want = prefill + analytic reference gradient. */
    for (size_t i = 0; i < nx; i++) dx_ref[i] += dx0[i];
    for (size_t i = 0; i < nw; i++) dw_ref[i] += dw0[i];
    for (size_t i = 0; i < nb; i++) db_ref[i] += db0[i];
    if (tu_expect_ok(ts_cpu_conv2d_backward_data(ctx, &dx, &dy, &w, &p), op))
        tu_check_close(op, "backward_data dx (+= prefill)", &dx, dx.data, dx_ref, nx, 1e-5 * sqrt(dx_terms), 1e-4);
    if (tu_expect_ok(ts_cpu_conv2d_backward_filter(ctx, &dw, &dy, &x, &p), op))
        tu_check_close(op, "backward_filter dw (+= prefill)", &dw, dw.data, dw_ref, nw, 1e-5 * sqrt(dw_terms),
                       1e-4);
    if (c->bias && tu_expect_ok(ts_cpu_conv2d_backward_bias(ctx, db, &dy), op))
        tu_check_close(op, "backward_bias db (+= prefill)", NULL, db, db_ref, nb, 1e-5 * sqrt(dw_terms), 1e-4);

    /* Finite differences of the double loss on sampled elements. Each sample
     * costs two full reference forwards, so big cases take fewer. */
    const size_t samples = k_terms * ny > 2e6 ? 3 : 24;
    rp.var = 0;
    fd_check(op, "backward_data dx vs finite differences", &rp, xd, nx, dx.data, dx0, samples,
             1e-5 * sqrt(dx_terms), rng);
    rp.var = 1;
    fd_check(op, "backward_filter dw vs finite differences", &rp, wd, nw, dw.data, dw0, samples,
             1e-5 * sqrt(dw_terms), rng);
    if (c->bias) {
        rp.var = 2;
        fd_check(op, "backward_bias db vs finite differences", &rp, bd, nb, db, db0, samples, 1e-5 * sqrt(dw_terms),
                 rng);
    }

    /* Same inputs, same bits: the chunking and threading fix the sum order. */
    ts_tensor y2 = tu_tensor(c->n, c->cout, ho, wo);
    if (tu_expect_ok(ts_cpu_conv2d_forward(ctx, &y2, &x, &w, c->bias ? b : NULL, &p), op))
        tu_expect(memcmp(y.data, y2.data, ny * sizeof(float)) == 0, "%s: forward is not deterministic", op);
    tu_tensor_free(&y2, op, "y2");

    free(xd);
    free(wd);
    free(bd);
    free(rd);
    free(y_ref);
    free(dx_ref);
    free(dw_ref);
    free(db_ref);
    free(dx0);
    free(dw0);
    free(db0);
    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&w, op, "w");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&dy, op, "dy");
    tu_tensor_free(&dx, op, "dx");
    tu_tensor_free(&dw, op, "dw");
    tu_free(b, op, "bias");
    tu_free(db, op, "dbias");
}

/* ---- error cases -------------------------------------------------------------- */

static void error_cases(ts_ctx *ctx)
{
    const char *op = "conv2d errors";
    const ts_conv2d_params p1 = {.stride_h = 1, .stride_w = 1, .pad_h = 1, .pad_w = 1};
    ts_tensor x = tu_tensor(2, 3, 8, 8), w = tu_tensor(4, 3, 3, 3), y = tu_tensor(2, 4, 8, 8);
    ts_tensor w_bad_c = tu_tensor(4, 5, 3, 3), y_bad_h = tu_tensor(2, 4, 7, 8), y_bad_c = tu_tensor(2, 5, 8, 8);
    ts_tensor y_bad_n = tu_tensor(1, 4, 8, 8), w_big = tu_tensor(4, 3, 11, 11), dw_bad = tu_tensor(4, 3, 5, 5);
    ts_tensor dx_bad = tu_tensor(2, 2, 8, 8);
    float *db = tu_alloc_f(4);
    for (size_t i = 0; i < ts_tensor_numel(&y); i++) y.data[i] = 7.0f;

    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y, &x, &w_bad_c, NULL, &p1), TS_ERR_INVALID_ARG,
                    "forward: x channels != w channels", "conv2d_forward", "[2,3,8,8]", "[4,5,3,3]", NULL);
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y_bad_h, &x, &w, NULL, &p1), TS_ERR_INVALID_ARG,
                    "forward: y has the wrong height", "conv2d_forward", "[2,4,7,8]", "8x8", NULL);
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y_bad_c, &x, &w, NULL, &p1), TS_ERR_INVALID_ARG,
                    "forward: y channels != w.n", "conv2d_forward", "[2,5,8,8]", NULL);
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y_bad_n, &x, &w, NULL, &p1), TS_ERR_INVALID_ARG,
                    "forward: batch mismatch", "conv2d_forward", "batch", NULL);
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y, &x, &w, NULL, &(ts_conv2d_params){.stride_h = 0, .stride_w = 1, .pad_h = 1, .pad_w = 1}),
                    TS_ERR_INVALID_ARG, "forward: stride 0", "conv2d_forward", "stride", NULL);
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y, &x, &w, NULL, &(ts_conv2d_params){.stride_h = 1, .stride_w = 1, .pad_h = -1, .pad_w = 1}),
                    TS_ERR_INVALID_ARG, "forward: negative pad", "conv2d_forward", "pad", NULL);
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y, &x, &w_big, NULL, &(ts_conv2d_params){.stride_h = 1, .stride_w = 1, .pad_h = 1, .pad_w = 1}),
                    TS_ERR_INVALID_ARG, "forward: kernel larger than padded input", "conv2d_forward", "11x11",
                    "does not fit", NULL);
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y, &x, &w, NULL, NULL), TS_ERR_INVALID_ARG,
                    "forward: NULL params", "conv2d_forward", NULL);
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y, NULL, &w, NULL, &p1), TS_ERR_INVALID_ARG, "forward: NULL x",
                    "conv2d_forward", NULL);
    /* A rejected call leaves its output alone. */
    int untouched = 1;
    for (size_t i = 0; i < ts_tensor_numel(&y); i++) untouched &= y.data[i] == 7.0f;
    tu_expect(untouched, "%s: a failed forward wrote into y", op);

    tu_expect_error(ts_cpu_conv2d_backward_data(ctx, &dx_bad, &y, &w, &p1), TS_ERR_INVALID_ARG,
                    "backward_data: dx channels != w channels", "conv2d_backward_data", "dx [2,2,8,8]", NULL);
    tu_expect_error(ts_cpu_conv2d_backward_data(ctx, &x, &y_bad_h, &w, &p1), TS_ERR_INVALID_ARG,
                    "backward_data: dy wrong size", "conv2d_backward_data", "dy [2,4,7,8]", NULL);
    tu_expect_error(ts_cpu_conv2d_backward_filter(ctx, &dw_bad, &y, &x, &p1), TS_ERR_INVALID_ARG,
                    "backward_filter: dw kernel does not match dy", "conv2d_backward_filter", "dw [4,3,5,5]", NULL);
    tu_expect_error(ts_cpu_conv2d_backward_filter(ctx, &w_bad_c, &y, &x, &p1), TS_ERR_INVALID_ARG,
                    "backward_filter: dw channels != x channels", "conv2d_backward_filter", NULL);
    tu_expect_error(ts_cpu_conv2d_backward_bias(ctx, NULL, &y), TS_ERR_INVALID_ARG, "backward_bias: NULL dbias",
                    "conv2d_backward_bias", NULL);
    tu_expect_error(ts_cpu_conv2d_backward_bias(ctx, db, NULL), TS_ERR_INVALID_ARG, "backward_bias: NULL dy",
                    "conv2d_backward_bias", NULL);

    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&w, op, "w");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&w_bad_c, op, "w_bad_c");
    tu_tensor_free(&y_bad_h, op, "y_bad_h");
    tu_tensor_free(&y_bad_c, op, "y_bad_c");
    tu_tensor_free(&y_bad_n, op, "y_bad_n");
    tu_tensor_free(&w_big, op, "w_big");
    tu_tensor_free(&dw_bad, op, "dw_bad");
    tu_tensor_free(&dx_bad, op, "dx_bad");
    tu_free(db, op, "db");
}

/* The fused inference epilogue: y = max(conv + bias (+ add), 0) in the
 * conv's own pass, against the naive reference with the add and the max
 * applied to it; four forms: bias + ReLU, bias + add + ReLU (a ResNet
 * block's conv2 + bn2 + shortcut), bias + add, add + ReLU without a bias.
 * The backward ops refuse both the ReLU and the add. */
static void fused_cases(ts_ctx *ctx, tu_rng *rng)
{
    static const char op[] = "conv2d_forward (fused epilogue)";
    static const char *const forms[4] = {"bias relu", "bias add relu", "bias add", "add relu"};
    const int picks[] = {3, 7, 9, 10, 14}; /* bias cases: generic, pointwise, head, asymmetric, chunked */
    for (size_t k = 0; k < sizeof picks / sizeof picks[0]; k++)
        for (int form = 0; form < 4; form++) {
            const int relu = form != 2, add = form != 0, has_bias = form != 3;
            const conv_case *c = &cases[picks[k]];
            ref_problem rp = {.cc = c};
            rp.ho = ts_conv_out_size(c->h, c->kh, c->sh, c->ph);
            rp.wo = ts_conv_out_size(c->w, c->kw, c->sw, c->pw);
            ts_tensor x = tu_tensor(c->n, c->cin, c->h, c->w), w = tu_tensor(c->cout, c->cin, c->kh, c->kw);
            ts_tensor y = tu_tensor(c->n, c->cout, rp.ho, rp.wo), z = tu_tensor(c->n, c->cout, rp.ho, rp.wo);
            const size_t ny = ts_tensor_numel(&y);
            float *b = tu_alloc_f((size_t)c->cout);
            tu_fill(rng, x.data, ts_tensor_numel(&x), -1, 1);
            tu_fill(rng, w.data, ts_tensor_numel(&w), -1, 1);
            tu_fill(rng, b, (size_t)c->cout, -1, 1);
            tu_fill(rng, z.data, ny, -2, 2);
            for (size_t i = 0; i < ny; i++) y.data[i] = NAN;
            float *z0 = tu_alloc_f(ny);
            memcpy(z0, z.data, ny * sizeof(float));
            rp.x = to_double(x.data, ts_tensor_numel(&x));
            rp.w = to_double(w.data, ts_tensor_numel(&w));
            rp.b = to_double(b, (size_t)c->cout);
            double *want = zeros_d(ny);
            ref_conv(&rp, rp.x, rp.w, has_bias ? rp.b : NULL, want, NULL, NULL);
            size_t pos = 0;
            for (size_t i = 0; i < ny; i++) {
                if (add) want[i] += z.data[i];
                pos += want[i] > 0;
                if (relu) want[i] = want[i] > 0 ? want[i] : 0.0;
            }
            ts_conv2d_params p = {.stride_h = c->sh, .stride_w = c->sw, .pad_h = c->ph, .pad_w = c->pw, .relu = relu};
            if (add) p.add = &z;
            char what[160];
            snprintf(what, sizeof what, "%s %s: forward", c->name, forms[form]);
            if (tu_expect_ok(ts_cpu_conv2d_forward(ctx, &y, &x, &w, has_bias ? b : NULL, &p), what)) {
                double atol = 1e-5 * sqrt((double)c->cin * c->kh * c->kw);
                tu_check_close(op, what, &y, y.data, want, ny, atol, 1e-4);
                tu_expect(pos > 0 && pos < ny, "%s: the case has positive and negative sums", what);
                tu_expect(memcmp(z.data, z0, ny * sizeof(float)) == 0, "%s: the added tensor is unchanged", what);
            }
            snprintf(what, sizeof what, "%s %s: backward refuses the fused epilogue", c->name, forms[form]);
            tu_expect_error(ts_cpu_conv2d_backward_data(ctx, &x, &y, &w, &p), TS_ERR_INVALID_ARG, what,
                            "forward-only", NULL);
            tu_expect_error(ts_cpu_conv2d_backward_filter(ctx, &w, &y, &x, &p), TS_ERR_INVALID_ARG, what,
                            "forward-only", NULL);
            free(rp.x);
            free(rp.w);
            free(rp.b);
            free(want);
            tu_free(b, op, "bias");
            tu_free(z0, op, "z0");
            tu_tensor_free(&x, op, "x");
            tu_tensor_free(&w, op, "w");
            tu_tensor_free(&y, op, "y");
            tu_tensor_free(&z, op, "z");
        }

    /* A tensor to add that cannot be: another shape, another dtype, y itself
     * or part of y. */
    ts_tensor x = tu_tensor(2, 3, 7, 6), w = tu_tensor(4, 3, 3, 3), y = tu_tensor(2, 4, 7, 6);
    ts_tensor zc = tu_tensor(2, 3, 7, 6), zh = tu_tensor(2, 4, 7, 5), zb = ts_tensor_view_as(x.data, TS_BF16, 2, 4, 7, 6);
    ts_conv2d_params p = {.stride_h = 1, .stride_w = 1, .pad_h = 1, .pad_w = 1, .relu = 1};
    p.add = &zc;
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y, &x, &w, NULL, &p), TS_ERR_INVALID_ARG, "add with 3 channels",
                    "conv2d_forward", "[2,3,7,6]", "shape and dtype", NULL);
    p.add = &zh;
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y, &x, &w, NULL, &p), TS_ERR_INVALID_ARG, "add 5 wide",
                    "conv2d_forward", "[2,4,7,5]", NULL);
    p.add = &zb;
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y, &x, &w, NULL, &p), TS_ERR_INVALID_ARG, "add in bf16",
                    "conv2d_forward", "bf16", NULL);
    p.add = &y;
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &y, &x, &w, NULL, &p), TS_ERR_INVALID_ARG, "add is y",
                    "conv2d_forward", "overlaps y", NULL);
    /* The first image of y, and an add one float further on (inside y's second image). */
    ts_tensor zs = ts_tensor_view(y.data + 1, 1, 4, 7, 6);
    ts_tensor yy = ts_tensor_view(y.data, 1, 4, 7, 6), xx = ts_tensor_view(x.data, 1, 3, 7, 6);
    p.add = &zs;
    tu_expect_error(ts_cpu_conv2d_forward(ctx, &yy, &xx, &w, NULL, &p), TS_ERR_INVALID_ARG, "add one float into y",
                    "conv2d_forward", "overlaps y", NULL);
    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&w, op, "w");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&zc, op, "zc");
    tu_tensor_free(&zh, op, "zh");
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    tu_rng rng;
    tu_rng_seed(&rng, 20240611);

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const conv_case *c = &cases[i];
        if (strncmp(c->name, "chunked", 7) == 0) {
            /* Keep these cases meaningful if the cap in conv2d.c changes. */
            size_t k = (size_t)c->cin * c->kh * c->kw;
            size_t pix = (size_t)ts_conv_out_size(c->h, c->kh, c->sh, c->ph) *
                         (size_t)ts_conv_out_size(c->w, c->kw, c->sw, c->pw);
            tu_expect(k * pix * sizeof(float) > CONV_COL_CAP_BYTES,
                      "case %s: column buffer %zu bytes does not exceed the %zu-byte cap, so it would not split",
                      c->name, k * pix * sizeof(float), CONV_COL_CAP_BYTES);
        }
        run_case(&ctx, c, &rng);
    }
    error_cases(&ctx);
    fused_cases(&ctx, &rng);

    ts_ctx_free(&ctx);
    return tu_finish("test_conv2d");
}
