/* Nearest resize (ts_cpu_upsample_nearest_*) against shared/specs/smp-unet.md
 * section 8.1: the source-index tables written out by hand for the decoder's
 * non-divisible sizes (4->7, 7->13, 13->25) and a downsize, the exact 2x and
 * identity shortcuts, forward against a double gather, backward against the
 * scatter reference and central finite differences, accumulation into a
 * pre-filled dx, PyTorch's float summation order for exact 2x, and shape
 * errors. */
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

/* The spec's rule, written independently of the kernel's table code. */
static int src_index(int dst, int in, int out)
{
    if (out == in) return dst;
    if (out == 2 * in) return dst >> 1;
    float s = (float)in / (float)out;
    int i = (int)floorf((float)dst * s);
    return i < in - 1 ? i : in - 1;
}

/* Gathers in double; the FD loss is sum r * up(x). */
static void ref_up(double *y, const double *x, int planes, int IH, int IW, int OH, int OW)
{
    for (int pl = 0; pl < planes; pl++)
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++)
                y[((size_t)pl * OH + oh) * OW + ow] =
                    x[((size_t)pl * IH + src_index(oh, IH, OH)) * IW + src_index(ow, IW, OW)];
}

typedef struct up_fd {
    int planes, IH, IW, OH, OW;
    const double *r;
    double *y;
} up_fd;

static double up_loss(void *vc, const double *x)
{
    up_fd *f = vc;
    ref_up(f->y, x, f->planes, f->IH, f->IW, f->OH, f->OW);
    double L = 0;
    for (size_t i = 0; i < (size_t)f->planes * f->OH * f->OW; i++) L += f->r[i] * f->y[i];
    return L;
}

/* One axis through the kernel: x holds 0, 1, ..., in-1 along rows (then
 * along columns), so y shows the source index of every output row/column. */
static void test_table(ts_ctx *ctx, int in, int out, const int *want)
{
    for (int axis = 0; axis < 2; axis++) {
        char op[96];
        snprintf(op, sizeof op, "upsample_nearest %d->%d along %s", in, out, axis ? "w" : "h");
        ts_tensor x = axis ? tu_tensor(1, 1, 1, in) : tu_tensor(1, 1, in, 1);
        ts_tensor y = axis ? tu_tensor(1, 1, 1, out) : tu_tensor(1, 1, out, 1);
        for (int i = 0; i < in; i++) x.data[i] = (float)i;
        if (tu_expect_ok(ts_cpu_upsample_nearest_forward(ctx, &y, &x), op)) {
            int32_t got[64], w[64];
            for (int i = 0; i < out; i++) {
                got[i] = (int32_t)y.data[i];
                w[i] = want[i];
            }
            tu_check_equal_i32(op, "source indices", got, w, (size_t)out);
        }
        tu_tensor_free(&x, op, "x");
        tu_tensor_free(&y, op, "y");
    }
}

/* The scale is a float32 and so is the product: for 6->74, s = 6/74f and
 * 37 * s rounds to 2.99999976f, so output 37 reads input 2, where exact
 * rational arithmetic (37 * 6 / 74 = 3) would read input 3. */
static void test_float_scale(ts_ctx *ctx)
{
    const char *op = "upsample_nearest 6->74 float32 scale";
    ts_tensor x = tu_tensor(1, 1, 1, 6), y = tu_tensor(1, 1, 1, 74);
    for (int i = 0; i < 6; i++) x.data[i] = (float)i;
    if (tu_expect_ok(ts_cpu_upsample_nearest_forward(ctx, &y, &x), op))
        tu_expect(y.data[36] == 2.0f && y.data[37] == 2.0f && y.data[38] == 3.0f,
                  "%s: outputs 36, 37, 38 read inputs %g, %g, %g; want 2, 2, 3", op, (double)y.data[36],
                  (double)y.data[37], (double)y.data[38]);
    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&y, op, "y");
}

static void test_case(ts_ctx *ctx, tu_rng *rng, int N, int C, int IH, int IW, int OH, int OW)
{
    char op[128], sx[TS_SHAPE_STR], sy[TS_SHAPE_STR];
    ts_tensor x = tu_tensor(N, C, IH, IW), y = tu_tensor(N, C, OH, OW), dy = tu_tensor(N, C, OH, OW);
    ts_tensor dx = tu_tensor(N, C, IH, IW);
    snprintf(op, sizeof op, "upsample_nearest %s -> %s", ts_shape_str(&x, sx), ts_shape_str(&y, sy));
    const int planes = N * C;
    const size_t nin = ts_tensor_numel(&x), nout = ts_tensor_numel(&y);
    double *xd = dalloc(nin), *yref = dalloc(nout), *rd = dalloc(nout), *dx0 = dalloc(nin), *want = dalloc(nin);

    tu_fill(rng, x.data, nin, -2, 2);
    for (size_t i = 0; i < nin; i++) xd[i] = x.data[i];
    ref_up(yref, xd, planes, IH, IW, OH, OW);
    if (tu_expect_ok(ts_cpu_upsample_nearest_forward(ctx, &y, &x), op))
        tu_check_close(op, "forward", &y, y.data, yref, nout, EXACT, 0);

    /* Backward onto a pre-filled dx. */
    tu_fill(rng, dy.data, nout, -1, 1);
    tu_fill(rng, dx.data, nin, -1, 1);
    for (size_t i = 0; i < nout; i++) rd[i] = dy.data[i];
    for (size_t i = 0; i < nin; i++) dx0[i] = want[i] = dx.data[i];
    if (tu_expect_ok(ts_cpu_upsample_nearest_backward(ctx, &dx, &dy), op)) {
        for (int pl = 0; pl < planes; pl++)
            for (int oh = 0; oh < OH; oh++)
                for (int ow = 0; ow < OW; ow++)
                    want[((size_t)pl * IH + src_index(oh, IH, OH)) * IW + src_index(ow, IW, OW)] +=
                        rd[((size_t)pl * OH + oh) * OW + ow];
        tu_check_close(op, "backward (accumulated)", &x, dx.data, want, nin, 1e-5, 1e-5);

        size_t idx[MAX_FD], k = tu_sample_indices(rng, nin, MAX_FD, idx);
        double fd[MAX_FD];
        float got[MAX_FD];
        up_fd f = {.planes = planes, .IH = IH, .IW = IW, .OH = OH, .OW = OW, .r = rd, .y = yref};
        tu_fd_grad(up_loss, &f, xd, idx, k, 1e-3, fd);
        for (size_t j = 0; j < k; j++) {
            got[j] = dx.data[idx[j]];
            fd[j] += dx0[idx[j]];
        }
        tu_check_close(op, "backward vs finite differences", NULL, got, fd, k, 1e-5, 1e-5);
    }

    /* From a zeroed dx the exact-2x backward must equal PyTorch's float sum
     * in (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1) order, bit for bit. */
    if (OH == 2 * IH && OW == 2 * IW) {
        memset(dx.data, 0, nin * sizeof(float));
        if (tu_expect_ok(ts_cpu_upsample_nearest_backward(ctx, &dx, &dy), op)) {
            size_t bad = 0;
            for (int pl = 0; pl < planes; pl++)
                for (int i = 0; i < IH; i++)
                    for (int j = 0; j < IW; j++) {
                        const float *g = dy.data + (size_t)pl * OH * OW;
                        float s = 0.0f;
                        s += g[(2 * i) * OW + 2 * j];
                        s += g[(2 * i) * OW + 2 * j + 1];
                        s += g[(2 * i + 1) * OW + 2 * j];
                        s += g[(2 * i + 1) * OW + 2 * j + 1];
                        bad += memcmp(&s, &dx.data[((size_t)pl * IH + i) * IW + j], sizeof s) != 0;
                    }
            tu_expect(bad == 0, "%s: %zu exact-2x gradients differ from PyTorch's float summation order", op, bad);
        }
    }

    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&dy, op, "dy");
    tu_tensor_free(&dx, op, "dx");
    tu_free(xd, op, "xd");
    tu_free(yref, op, "yref");
    tu_free(rd, op, "rd");
    tu_free(dx0, op, "dx0");
    tu_free(want, op, "want");
}

static void test_errors(ts_ctx *ctx)
{
    const char *op = "upsample errors";
    ts_tensor x = tu_tensor(2, 3, 4, 7), y = tu_tensor(2, 3, 7, 13), yc = tu_tensor(2, 4, 7, 13);
    ts_tensor yn = tu_tensor(1, 3, 7, 13);
    tu_expect_error(ts_cpu_upsample_nearest_forward(ctx, &yc, &x), TS_ERR_INVALID_ARG, "upsample forward channels",
                    "upsample_nearest_forward", "[2,4,7,13]", "[2,3,4,7]", (char *)NULL);
    tu_expect_error(ts_cpu_upsample_nearest_forward(ctx, &yn, &x), TS_ERR_INVALID_ARG, "upsample forward batch",
                    "upsample_nearest_forward", "[1,3,7,13]", (char *)NULL);
    tu_expect_error(ts_cpu_upsample_nearest_backward(ctx, &x, &yc), TS_ERR_INVALID_ARG, "upsample backward channels",
                    "upsample_nearest_backward", "[2,4,7,13]", "[2,3,4,7]", (char *)NULL);
    tu_expect_error(ts_cpu_upsample_nearest_forward(ctx, &y, NULL), TS_ERR_INVALID_ARG, "upsample forward NULL x",
                    "upsample_nearest_forward", (char *)NULL);
    tu_tensor_free(&x, op, "x");
    tu_tensor_free(&y, op, "y");
    tu_tensor_free(&yc, op, "yc");
    tu_tensor_free(&yn, op, "yn");
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    tu_rng rng;
    tu_rng_seed(&rng, 0x0951u);

    /* The decoder's sizes for H = 100 (spec 8.1): rows 0..6 of 4->7 read
     * 0,0,1,1,2,2,3 (s = 4/7f); 7->13 and 13->25 by the float-scale rule. */
    static const int t4_7[] = {0, 0, 1, 1, 2, 2, 3};
    static const int t7_13[] = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6};
    static const int t13_25[] = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12};
    /* Exact 2x, identity, and shrinking (s = 7/4 = 1.75f, s = 5/3f). */
    static const int t25_50[] = {0,  0,  1,  1,  2,  2,  3,  3,  4,  4,  5,  5,  6,  6,  7,  7,  8,
                                 8,  9,  9,  10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15, 16, 16,
                                 17, 17, 18, 18, 19, 19, 20, 20, 21, 21, 22, 22, 23, 23, 24, 24};
    static const int t5_5[] = {0, 1, 2, 3, 4};
    static const int t7_4[] = {0, 1, 3, 5};
    static const int t5_3[] = {0, 1, 3};
    /* 3->8: s = 0.375f: 0, .375, .75, 1.125, 1.5, 1.875, 2.25, 2.625. */
    static const int t3_8[] = {0, 0, 0, 1, 1, 1, 2, 2};
    test_table(&ctx, 4, 7, t4_7);
    test_table(&ctx, 7, 13, t7_13);
    test_table(&ctx, 13, 25, t13_25);
    test_table(&ctx, 25, 50, t25_50);
    test_table(&ctx, 5, 5, t5_5);
    test_table(&ctx, 7, 4, t7_4);
    test_table(&ctx, 5, 3, t5_3);
    test_table(&ctx, 3, 8, t3_8);
    test_float_scale(&ctx);

    /* N, C, IH, IW, OH, OW */
    static const int cases[][6] = {
        {2, 3, 4, 7, 7, 13},    /* both axes non-divisible */
        {1, 5, 13, 5, 25, 10},  /* 13->25 and exact 2x */
        {3, 1, 5, 3, 5, 3},     /* identity */
        {1, 3, 7, 9, 14, 18},   /* exact 2x both axes */
        {2, 3, 7, 9, 14, 9},    /* 2x and identity */
        {1, 1, 7, 5, 4, 3},     /* shrinking */
        {1, 1, 1, 1, 3, 2},     /* one pixel everywhere */
        {2, 5, 25, 25, 50, 50}, /* decoder-like, both threads */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int *c = cases[i];
        test_case(&ctx, &rng, c[0], c[1], c[2], c[3], c[4], c[5]);
    }
    test_errors(&ctx);

    ts_ctx_free(&ctx);
    return tu_finish("test_upsample");
}
