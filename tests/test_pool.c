/* Max pooling (ts_cpu_maxpool2d_*) against a double-precision reference of
 * shared/specs/smp-unet.md section 8.2: values and arg-max indices for the
 * model's (3, 2, 1) and other kernel/stride/pad choices, PyTorch's tie rule
 * (first valid element of the clipped window, first in row-major scan order),
 * NaN winning (the last NaN in scan order), all -inf windows, the scatter
 * backward with accumulation, central finite differences on inputs without
 * near-ties, and the parameter and shape errors. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "testutil.h"

static double *dalloc(size_t n) { return tu_alloc(n * sizeof(double)); }

#define MAX_FD 64
/* Exact comparison. A tolerance of exactly 0 would make tu_check_close's
 * err / tol ratio 0/0 for matching values and point its report at the wrong
 * element; 1e-30 is below any float difference these values can show. */
#define EXACT 1e-30

typedef struct pool_case {
    ts_pool2d_params p;
    const char *name;
} pool_case;

/* Reference forward in double, written from the spec: window clipped to the
 * input, arg-max starts at its first valid element, update on
 * val > max || isnan(val) scanning rows then columns. */
static void ref_pool(double *y, int32_t *index, const double *x, int planes, int H, int W, int OH, int OW,
                     const ts_pool2d_params *p)
{
    for (int pl = 0; pl < planes; pl++)
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                int h0 = oh * p->stride_h - p->pad_h, w0 = ow * p->stride_w - p->pad_w;
                int h1 = h0 + p->kernel_h, w1 = w0 + p->kernel_w;
                if (h0 < 0) h0 = 0;
                if (w0 < 0) w0 = 0;
                if (h1 > H) h1 = H;
                if (w1 > W) w1 = W;
                double best = -INFINITY;
                int arg = h0 * W + w0;
                for (int ih = h0; ih < h1; ih++)
                    for (int iw = w0; iw < w1; iw++) {
                        double v = x[(size_t)pl * H * W + (size_t)ih * W + iw];
                        if (v > best || isnan(v)) {
                            best = v;
                            arg = ih * W + iw;
                        }
                    }
                size_t o = (size_t)pl * OH * OW + (size_t)oh * OW + ow;
                y[o] = best;
                index[o] = arg;
            }
}

/* L = sum r * maxpool(x), for tu_fd_grad. */
typedef struct pool_fd {
    int planes, H, W, OH, OW;
    const ts_pool2d_params *p;
    const double *r;
    double *y;
    int32_t *idx;
} pool_fd;

static double pool_loss(void *vc, const double *x)
{
    pool_fd *f = vc;
    ref_pool(f->y, f->idx, x, f->planes, f->H, f->W, f->OH, f->OW, f->p);
    double L = 0;
    for (size_t i = 0; i < (size_t)f->planes * f->OH * f->OW; i++) L += f->r[i] * f->y[i];
    return L;
}

enum fill_kind { FILL_DISTINCT, FILL_TIES, FILL_NAN };

/* DISTINCT: a random permutation of k * 0.01, so neighbours differ by at
 * least 0.01, far above the FD step. TIES: values from {0, 1, 2} (a ReLU
 * output pooled: many zeros and exact positive ties). NAN: TIES plus a few
 * NaNs. */
static void fill_input(tu_rng *rng, float *x, size_t n, enum fill_kind kind)
{
    if (kind == FILL_DISTINCT) {
        for (size_t i = 0; i < n; i++) x[i] = (float)(((double)i - (double)n / 2) * 0.01);
        for (size_t i = n; i > 1; i--) { /* Fisher-Yates */
            size_t j = (size_t)(tu_next(rng) % i);
            float t = x[i - 1];
            x[i - 1] = x[j];
            x[j] = t;
        }
        return;
    }
    for (size_t i = 0; i < n; i++) x[i] = (float)tu_randint(rng, 3);
    if (kind == FILL_NAN)
        for (size_t k = 0; k < 1 + n / 20; k++) x[tu_randint(rng, (int)n)] = NAN;
}

static void test_case(ts_ctx *ctx, tu_rng *rng, const pool_case *pc, int N, int C, int H, int W, enum fill_kind kind)
{
    static const char *const kinds[] = {"distinct", "ties", "nan"};
    const ts_pool2d_params *p = &pc->p;
    int OH = ts_conv_out_size(H, p->kernel_h, p->stride_h, p->pad_h);
    int OW = ts_conv_out_size(W, p->kernel_w, p->stride_w, p->pad_w);
    if (OH < 1 || OW < 1) return; /* the kernel does not fit; test_errors covers that */
    char op[128], sh[TS_SHAPE_STR];
    ts_tensor x = tu_tensor(N, C, H, W), y = tu_tensor(N, C, OH, OW), dy = tu_tensor(N, C, OH, OW);
    ts_tensor dx = tu_tensor(N, C, H, W);
    snprintf(op, sizeof op, "maxpool2d %s %s %s", pc->name, ts_shape_str(&x, sh), kinds[kind]);
    const int planes = N * C;
    const size_t nin = ts_tensor_numel(&x), nout = ts_tensor_numel(&y);
    int32_t *index = tu_alloc_i32(nout), *ref_index = tu_alloc_i32(nout);
    double *xd = dalloc(nin), *yref = dalloc(nout), *rd = dalloc(nout), *dx0 = dalloc(nin), *want = dalloc(nin);

    fill_input(rng, x.data, nin, kind);
    for (size_t i = 0; i < nin; i++) xd[i] = x.data[i];
    ref_pool(yref, ref_index, xd, planes, H, W, OH, OW, p);
    if (!tu_expect_ok(ts_cpu_maxpool2d_forward(ctx, &y, index, &x, p), op)) goto done;
    tu_check_equal_i32(op, "arg-max index", index, ref_index, nout);
    if (kind == FILL_NAN) {
        /* NaN must come out exactly where the reference has one. */
        size_t bad = 0, nans = 0;
        for (size_t i = 0; i < nout; i++) {
            int rn = isnan(yref[i]) != 0;
            nans += (size_t)rn;
            if (rn != (isnan(y.data[i]) != 0) || (!rn && (double)y.data[i] != yref[i])) bad++;
        }
        tu_expect(bad == 0 && nans > 0, "%s: %zu outputs differ from the NaN-propagating reference (%zu NaN)", op, bad,
                  nans);
    } else {
        tu_check_close(op, "forward", &y, y.data, yref, nout, EXACT, 0);
    }

    /* Backward: dx[index] += dy, onto a pre-filled dx. */
    tu_fill(rng, dy.data, nout, -1, 1);
    tu_fill(rng, dx.data, nin, -1, 1);
    for (size_t i = 0; i < nout; i++) rd[i] = dy.data[i];
    for (size_t i = 0; i < nin; i++) dx0[i] = want[i] = dx.data[i];
    if (!tu_expect_ok(ts_cpu_maxpool2d_backward(ctx, &dx, &dy, index, p), op)) goto done;
    for (int pl = 0; pl < planes; pl++)
        for (size_t o = 0; o < (size_t)OH * OW; o++)
            want[(size_t)pl * H * W + ref_index[(size_t)pl * OH * OW + o]] += rd[(size_t)pl * OH * OW + o];
    tu_check_close(op, "backward (accumulated)", &x, dx.data, want, nin, 1e-6, 1e-6);

    if (kind == FILL_DISTINCT) {
        size_t idx[MAX_FD], k = tu_sample_indices(rng, nin, MAX_FD, idx);
        double fd[MAX_FD];
        float got[MAX_FD];
        int32_t *scratch_i = tu_alloc_i32(nout);
        pool_fd f = {
            .planes = planes, .H = H, .W = W, .OH = OH, .OW = OW, .p = p, .r = rd, .y = yref, .idx = scratch_i};
        tu_fd_grad(pool_loss, &f, xd, idx, k, 1e-3, fd);
        for (size_t j = 0; j < k; j++) {
            got[j] = dx.data[idx[j]];
            fd[j] += dx0[idx[j]];
        }
        tu_check_close(op, "backward vs finite differences", NULL, got, fd, k, 1e-5, 1e-5);
        tu_free(scratch_i, op, "scratch index");
    }

done:
    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&dy, op, "dy");
    tu_tensor_free(&dx, op, "dx");
    tu_free(index, op, "index");
    tu_free(ref_index, op, "ref_index");
    tu_free(xd, op, "xd");
    tu_free(yref, op, "yref");
    tu_free(rd, op, "rd");
    tu_free(dx0, op, "dx0");
    tu_free(want, op, "want");
}

/* A constant input ties everywhere: the index must be the first valid
 * element of each clipped window, written out here from the rule rather
 * than taken from the reference. Done for 1.0 and for -inf (where no value
 * beats the initial -inf, so the initial index stays). */
static void test_constant(ts_ctx *ctx, const pool_case *pc, int H, int W, float value)
{
    const ts_pool2d_params *p = &pc->p;
    int OH = ts_conv_out_size(H, p->kernel_h, p->stride_h, p->pad_h);
    int OW = ts_conv_out_size(W, p->kernel_w, p->stride_w, p->pad_w);
    if (OH < 1 || OW < 1) return;
    char op[128];
    snprintf(op, sizeof op, "maxpool2d %s constant %g on %dx%d", pc->name, (double)value, H, W);
    ts_tensor x = tu_tensor(2, 3, H, W), y = tu_tensor(2, 3, OH, OW);
    size_t nout = ts_tensor_numel(&y);
    int32_t *index = tu_alloc_i32(nout), *want = tu_alloc_i32(nout);
    for (size_t i = 0; i < ts_tensor_numel(&x); i++) x.data[i] = value;
    for (size_t pl = 0; pl < 6; pl++)
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                int h0 = oh * p->stride_h - p->pad_h, w0 = ow * p->stride_w - p->pad_w;
                want[pl * OH * OW + (size_t)oh * OW + ow] = (h0 > 0 ? h0 : 0) * W + (w0 > 0 ? w0 : 0);
            }
    if (tu_expect_ok(ts_cpu_maxpool2d_forward(ctx, &y, index, &x, p), op)) {
        tu_check_equal_i32(op, "first-valid tie index", index, want, nout);
        size_t bad = 0;
        for (size_t i = 0; i < nout; i++) bad += y.data[i] != value;
        tu_expect(bad == 0, "%s: %zu outputs differ from %g", op, bad, (double)value);
    }
    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&y, op, "y");
    tu_free(index, op, "index");
    tu_free(want, op, "want");
}

/* Hand-made windows of the model's (3, 2, 1) pool on one 5x5 plane. */
static void test_hand_cases(ts_ctx *ctx)
{
    const char *op = "maxpool2d 3/2/1 hand cases";
    const ts_pool2d_params p = {3, 3, 2, 2, 1, 1};
    ts_tensor x = tu_tensor(1, 1, 5, 5), y = tu_tensor(1, 1, 3, 3);
    int32_t *index = tu_alloc_i32(9);

    /* Positive ties: 2 at (0,1), (1,0), (1,1), (2,2). Window (0,0) is rows
     * 0-1, cols 0-1: first 2 in scan order is (0,1) = 1. Window (1,1) is
     * rows 1-3, cols 1-3: (1,1) = 6 comes before (2,2) = 12. */
    memset(x.data, 0, 25 * sizeof(float));
    x.data[1] = x.data[5] = x.data[6] = x.data[12] = 2.0f;
    if (tu_expect_ok(ts_cpu_maxpool2d_forward(ctx, &y, index, &x, &p), op)) {
        tu_expect(index[0] == 1, "%s: positive tie at window (0,0): index %d, want 1", op, index[0]);
        tu_expect(index[4] == 6, "%s: positive tie at window (1,1): index %d, want 6", op, index[4]);
        /* Window (0,2) is rows 0-1, cols 3-4, all zero: first valid is (0,3). */
        tu_expect(index[2] == 3 && y.data[2] == 0.0f, "%s: zero window (0,2): index %d, want 3", op, index[2]);
    }

    /* NaN wins over a larger value, and of two NaNs the later one wins:
     * 100 at (0,1), NaN at (1,1) = 6 and (1,2) = 7. Window (0,0) (cols 0-1)
     * holds the NaN at 6; window (0,1) (cols 1-3) and (1,1) hold both. */
    memset(x.data, 0, 25 * sizeof(float));
    x.data[1] = 100.0f;
    x.data[6] = x.data[7] = NAN;
    if (tu_expect_ok(ts_cpu_maxpool2d_forward(ctx, &y, index, &x, &p), op)) {
        tu_expect(index[0] == 6 && isnan(y.data[0]), "%s: NaN window (0,0): index %d (%g), want 6 (NaN)", op, index[0],
                  (double)y.data[0]);
        tu_expect(index[1] == 7 && isnan(y.data[1]), "%s: two-NaN window (0,1): index %d, want 7", op, index[1]);
        tu_expect(index[4] == 7 && isnan(y.data[4]), "%s: two-NaN window (1,1): index %d, want 7", op, index[4]);
        tu_expect(index[8] == 18 && y.data[8] == 0.0f, "%s: clean window (2,2): index %d, want 18", op, index[8]);
    }
    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&y, op, "y");
    tu_free(index, op, "index");
}

static void test_errors(ts_ctx *ctx)
{
    const char *op = "maxpool2d errors";
    const ts_pool2d_params p = {3, 3, 2, 2, 1, 1};
    ts_tensor x = tu_tensor(2, 3, 7, 9), y = tu_tensor(2, 3, 4, 5), ybad = tu_tensor(2, 3, 4, 4);
    ts_tensor yc = tu_tensor(2, 4, 4, 5), tiny = tu_tensor(1, 1, 1, 2), t1 = tu_tensor(1, 1, 1, 1);
    ts_tensor ypad = tu_tensor(2, 3, 5, 5);
    int32_t *index = tu_alloc_i32(2 * 4 * 5 * 5);

    tu_expect_error(ts_cpu_maxpool2d_forward(ctx, &ybad, index, &x, &p), TS_ERR_INVALID_ARG, "maxpool y shape",
                    "maxpool2d_forward", "[2,3,4,4]", "[2,3,7,9]", "[2,3,4,5]", (char *)NULL);
    tu_expect_error(ts_cpu_maxpool2d_forward(ctx, &yc, index, &x, &p), TS_ERR_INVALID_ARG, "maxpool y channels",
                    "maxpool2d_forward", "[2,4,4,5]", (char *)NULL);
    tu_expect_error(ts_cpu_maxpool2d_backward(ctx, &x, &ybad, index, &p), TS_ERR_INVALID_ARG, "maxpool dy shape",
                    "maxpool2d_backward", "[2,3,4,4]", "[2,3,7,9]", (char *)NULL);
    /* pad 2 with kernel 3: y has the size that pad would give, so only
     * PyTorch's pad <= kernel / 2 rule can refuse it. */
    const ts_pool2d_params bigpad = {3, 3, 2, 2, 2, 1};
    tu_expect_error(ts_cpu_maxpool2d_forward(ctx, &ypad, index, &x, &bigpad), TS_ERR_INVALID_ARG, "maxpool pad > k/2",
                    "maxpool2d_forward", "at most half of kernel size", (char *)NULL);
    const ts_pool2d_params nostride = {3, 3, 0, 2, 1, 1};
    tu_expect_error(ts_cpu_maxpool2d_forward(ctx, &y, index, &x, &nostride), TS_ERR_INVALID_ARG, "maxpool stride 0",
                    "maxpool2d_forward", "stride", (char *)NULL);
    const ts_pool2d_params nopad = {3, 3, 1, 1, 0, 0};
    tu_expect_error(ts_cpu_maxpool2d_forward(ctx, &t1, index, &tiny, &nopad), TS_ERR_INVALID_ARG,
                    "maxpool input smaller than kernel", "maxpool2d_forward", "[1,1,1,2]", "too small", (char *)NULL);
    tu_expect_error(ts_cpu_maxpool2d_forward(ctx, &y, NULL, &x, &p), TS_ERR_INVALID_ARG, "maxpool NULL index",
                    "maxpool2d_forward", "index", (char *)NULL);
    /* An index outside the plane is refused, not written through. */
    for (int i = 0; i < 2 * 3 * 4 * 5; i++) index[i] = 0;
    index[7] = 7 * 9;
    tu_expect_error(ts_cpu_maxpool2d_backward(ctx, &x, &y, index, &p), TS_ERR_INVALID_ARG,
                    "maxpool backward index out of range", "maxpool2d_backward", "index", (char *)NULL);

    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&ybad, op, "ybad");
    tu_tensor_free(&yc, op, "yc");
    tu_tensor_free(&tiny, op, "tiny");
    tu_tensor_free(&t1, op, "t1");
    tu_tensor_free(&ypad, op, "ypad");
    tu_free(index, op, "index");
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    tu_rng rng;
    tu_rng_seed(&rng, 0x9001u);

    /* kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w */
    static const pool_case cases[] = {
        {{3, 3, 2, 2, 1, 1}, "k3 s2 p1 (ResNet stem)"},
        {{2, 2, 2, 2, 0, 0}, "k2 s2 p0"},
        {{3, 3, 1, 1, 1, 1}, "k3 s1 p1"},
        {{3, 2, 2, 1, 1, 0}, "k3x2 s2x1 p1x0"},
        {{2, 3, 3, 2, 1, 1}, "k2x3 s3x2 p1x1"},
    };
    static const int shapes[][4] = {{1, 1, 7, 9}, {2, 3, 13, 11}, {3, 5, 5, 3}, {1, 3, 1, 1}, {2, 5, 31, 29}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            for (int kind = FILL_DISTINCT; kind <= FILL_NAN; kind++)
                test_case(&ctx, &rng, &cases[c], shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3],
                          (enum fill_kind)kind);
        test_constant(&ctx, &cases[c], 7, 9, 1.0f);
        test_constant(&ctx, &cases[c], 5, 3, -INFINITY);
        test_constant(&ctx, &cases[c], 13, 11, 0.0f);
    }
    test_hand_cases(&ctx);
    test_errors(&ctx);

    ts_ctx_free(&ctx);
    return tu_finish("test_pool");
}
