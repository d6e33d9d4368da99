/* The CUDA backend against the CPU backend, op by op, on the same inputs.
 *
 * The CPU backend is the reference: tests/test_<op>.c check it against
 * double-precision references, finite differences and PyTorch. Here every op
 * of TS_BACKEND_OPS runs on both backends with the same random host inputs
 * (copied to the device with ts_cuda_memcpy_h2d), the device results come
 * back and are compared, on shapes the model uses and odd ones (1x1 planes,
 * prime sizes, 3/7/64 channels, batch 1 and 3). Backward ops accumulate, so
 * their outputs are prefilled with the same nonzero values on both sides.
 * Forward outputs are prefilled with NaN on both sides: a forward that reads
 * its output instead of overwriting it shows up.
 *
 * Convolutions also run in cuDNN's benchmark mode (algorithms timed by
 * cudnnFind*). Then: determinism (ts_cuda_set_deterministic(1): the same ops
 * twice give the same bits), and errors (a shape mismatch is an error status naming the
 * op, not a crash or a kernel fault).
 *
 * Every device buffer has guard bytes on both sides, checked when it is
 * freed, as testutil's host buffers have. Every check prints one line ("ok"
 * or "FAIL"), and the last line is the tally; any failure exits 1.
 *
 * Device: TERRASEG_TEST_DEVICE (cuda, cuda:N or N; cuda:0 by default). The
 * test fails, never skips, when no device is usable: it only runs from
 * tools/test_gpu.sh (CTest label "gpu"), on a machine that has one. */
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_multi.h"
#include "tests/testutil.h"

#define SUITE "test_cuda_ops"

/* ---- tolerances ------------------------------------------------------------
 *
 * EXACT (no tolerance): ops whose every output is a copy, a select, or one
 * IEEE float32 operation on the same operands on both sides: relu forward and
 * backward (dx += dy is one rounded add), add and concat, max-pool values and
 * indices, upsample forward, zero, scale. Scatter-adds (max-pool and upsample
 * backward) add several values into one element in an order each backend
 * picks; they are exact on dyadic inputs (small multiples of 1/8, whose sums
 * are exact in any order) and within SCATTER_RTOL on random floats.
 *
 * ELEM_RTOL: a few float32 operations per element done in different but
 * equally valid forms (nvcc contracts a*b+c into an FMA by default, the C
 * code is compiled without contraction; cuDNN may evaluate BN as
 * (x - mean) * invstd * gamma + beta where the CPU folds it into x * alpha +
 * shift): 16 ulps of the largest reference value.
 *
 * sum_rtol(L): results that are float32 sums of L terms formed in a different
 * order on each side (cuDNN's implicit-GEMM, Winograd and FFT algorithms vs
 * OpenBLAS's blocked sgemm; block/tree reductions on the GPU vs the CPU's
 * double sums). The bound is norm-wise, max |gpu - cpu| <= sum_rtol(L) *
 * (1 + max |cpu|) for O(1) data: rounding errors of sums of random-sign terms
 * grow like sqrt(L) eps times the term size (the worst case, L eps, never
 * happens on random data), and the largest output is itself about sqrt(L)
 * term sizes; 1e-5 is the floor for the transforms of Winograd and FFT. For
 * L = 576 (3x3 over 64 channels) that is 2.1e-5; for L = 6272 (the filter
 * gradient of the 56x56 layer1 case, batch 2), 4.8e-5. A wrong index, a lost pixel or
 * a missed accumulation shows up orders of magnitude above it.
 *
 * Losses: the gradients are O(1/pixels), so the outputs are prefilled at
 * that scale and the bound is relative to max |cpu| without the "1 +". */
#define ELEM_RTOL (16.0 * FLT_EPSILON)
#define SCATTER_RTOL (16.0 * FLT_EPSILON)
static double sum_rtol(double L) { return 1e-5 + 4.0 * FLT_EPSILON * sqrt(L); }

static const ts_backend *cpu, *gpu;
static ts_ctx cctx, gctx;
static tu_rng rng;

/* ---- reporting ------------------------------------------------------------- */

/* One line per check: "ok   ..." here, "FAIL ..." from tu_expect. */
static int check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int check(int ok, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (ok) printf("ok   %s\n", msg);
    return tu_expect(ok, "%s", msg);
}

static void fatal(const char *what)
{
    tu_expect(0, "%s: %s", what, ts_last_error());
    exit(tu_finish(SUITE));
}

/* A backend call's status; the CUDA one is followed by a synchronize, so an
 * asynchronous kernel fault is reported by the op that caused it. */
static int cpu_ok(ts_status st, const char *op)
{
    char what[512]; /* the caller's label (< 300) and a prefix */
    snprintf(what, sizeof what, "cpu %s", op);
    return tu_expect_ok(st, what);
}

static int gpu_ok(ts_status st, const char *op)
{
    char what[512]; /* the caller's label (< 300) and a prefix */
    snprintf(what, sizeof what, "cuda %s", op);
    if (st == TS_OK) st = ts_cuda_synchronize();
    return tu_expect_ok(st, what);
}

/* ---- guarded device memory --------------------------------------------------- */

/* Guard bytes on each side of a device buffer (a multiple of 256, so the
 * pointer handed out keeps cudaMalloc's alignment, which cuDNN expects). */
#define DGUARD 256
#define DSENTINEL 0xA5
#define MAX_LIVE 256

typedef struct dev_block {
    unsigned char *user;
    size_t bytes;
} dev_block;
static dev_block live[MAX_LIVE];

/* bytes of zero-filled device memory between two guards. */
static void *dev_alloc(size_t bytes)
{
    size_t total = bytes + 2 * (size_t)DGUARD;
    void *base = NULL;
    if (ts_cuda_malloc(&base, total) != TS_OK) fatal("ts_cuda_malloc");
    unsigned char *pat = malloc(total);
    if (!pat) {
        tu_expect(0, "out of host memory for %zu bytes", total);
        exit(tu_finish(SUITE));
    }
    memset(pat, DSENTINEL, total);
    memset(pat + DGUARD, 0, bytes);
    if (ts_cuda_memcpy_h2d(base, pat, total) != TS_OK) fatal("ts_cuda_memcpy_h2d (guards)");
    free(pat);
    unsigned char *user = (unsigned char *)base + DGUARD;
    for (int i = 0; i < MAX_LIVE; i++)
        if (!live[i].user) {
            live[i] = (dev_block){user, bytes};
            return user;
        }
    tu_expect(0, "test: more than %d live device buffers", MAX_LIVE);
    exit(tu_finish(SUITE));
}

/* Checks both guards (a kernel that writes out of bounds changes them) and
 * frees the buffer. */
static void dev_free(void *p, const char *op, const char *name)
{
    if (!p) return;
    for (int i = 0; i < MAX_LIVE; i++) {
        if (live[i].user != p) continue;
        unsigned char g[2 * DGUARD];
        unsigned char *user = live[i].user;
        if (ts_cuda_memcpy_d2h(g, user - DGUARD, DGUARD) != TS_OK ||
            ts_cuda_memcpy_d2h(g + DGUARD, user + live[i].bytes, DGUARD) != TS_OK)
            fatal("ts_cuda_memcpy_d2h (guards)");
        int before = -1, after = -1;
        for (int k = 0; k < DGUARD; k++) {
            if (g[k] != DSENTINEL && before < 0) before = DGUARD - k;
            if (g[DGUARD + k] != DSENTINEL && after < 0) after = k;
        }
        if (before >= 0) tu_expect(0, "%s: device write %d bytes before buffer %s", op, before, name);
        if (after >= 0)
            tu_expect(0, "%s: device write %d bytes past the end of buffer %s (%zu bytes)", op, after, name,
                      live[i].bytes);
        ts_cuda_free(user - DGUARD);
        live[i].user = NULL;
        return;
    }
    tu_expect(0, "%s: buffer %s is not a live device buffer", op, name);
}

static void upload(void *dev, const void *host, size_t bytes)
{
    if (bytes && ts_cuda_memcpy_h2d(dev, host, bytes) != TS_OK) fatal("ts_cuda_memcpy_h2d");
}

static void download(void *host, const void *dev, size_t bytes)
{
    if (bytes && ts_cuda_memcpy_d2h(host, dev, bytes) != TS_OK) fatal("ts_cuda_memcpy_d2h");
}

/* ---- host/device pairs ------------------------------------------------------
 * A pair is one tensor twice: .h in guarded host memory for the CPU backend,
 * .d in guarded device memory for the CUDA one, same shape. Vectors (bias, BN
 * statistics, optimizer state) are pairs of shape [n,1,1,1]. */
typedef struct pair {
    ts_tensor h, d;
} pair;

static size_t numel(const pair *p) { return ts_tensor_numel(&p->h); }

static pair pair_new(int n, int c, int h, int w)
{
    pair p;
    p.h = tu_tensor(n, c, h, w);
    p.d = ts_tensor_view(dev_alloc(ts_tensor_numel(&p.h) * sizeof(float)), n, c, h, w);
    return p;
}

/* Copies the host side to the device side. */
static void pair_sync(pair *p) { upload(p->d.data, p->h.data, numel(p) * sizeof(float)); }

/* Uniform in [lo, hi) on both sides. */
static pair pair_rand(int n, int c, int h, int w, double lo, double hi)
{
    pair p = pair_new(n, c, h, w);
    tu_fill(&rng, p.h.data, numel(&p), lo, hi);
    pair_sync(&p);
    return p;
}

static pair vec_new(size_t n) { return pair_new((int)n, 1, 1, 1); }
static pair vec_rand(size_t n, double lo, double hi) { return pair_rand((int)n, 1, 1, 1, lo, hi); }

static void pair_fill_const(pair *p, float v)
{
    for (size_t i = 0; i < numel(p); i++) p->h.data[i] = v;
    pair_sync(p);
}

/* Small multiples of 1/8 in [-2, 2]: sums of a few of them are exact in
 * float in any order, so scatter-adds compare exactly. */
static void pair_dyadic(pair *p)
{
    for (size_t i = 0; i < numel(p); i++) p->h.data[i] = (float)(tu_randint(&rng, 33) - 16) / 8.0f;
    pair_sync(p);
}

/* The device side, downloaded into a guarded host buffer (tu_free it). */
static float *pair_get(const pair *p)
{
    float *g = tu_alloc_f(numel(p));
    download(g, p->d.data, numel(p) * sizeof(float));
    return g;
}

static void pair_free(pair *p, const char *op, const char *name)
{
    tu_tensor_free(&p->h, op, name);
    dev_free(p->d.data, op, name);
    p->d.data = NULL;
}

typedef struct ipair {
    int32_t *h, *d;
    size_t n;
} ipair;

static ipair ipair_new(size_t n)
{
    ipair p = {tu_alloc_i32(n), dev_alloc(n * sizeof(int32_t)), n};
    return p;
}

static void ipair_sync(ipair *p) { upload(p->d, p->h, p->n * sizeof(int32_t)); }

static void ipair_free(ipair *p, const char *op, const char *name)
{
    tu_free(p->h, op, name);
    dev_free(p->d, op, name);
    p->h = p->d = NULL;
}

/* ---- comparisons ----------------------------------------------------------- */

static void where_str(const ts_tensor *shape, size_t i, char *buf, size_t size)
{
    if (!shape || (shape->c == 1 && shape->h == 1 && shape->w == 1)) {
        snprintf(buf, size, "%zu", i);
        return;
    }
    size_t w = i % (size_t)shape->w, h = i / shape->w % (size_t)shape->h;
    size_t c = i / ((size_t)shape->w * shape->h) % (size_t)shape->c, n = i / ((size_t)shape->w * shape->h * shape->c);
    snprintf(buf, size, "%zu (n=%zu,c=%zu,h=%zu,w=%zu)", i, n, c, h, w);
}

/* Equal values everywhere, NaN matching NaN (-0 equals +0: no op's contract
 * tells the two zeros apart). */
static int cmp_exact_raw(const char *op, const char *what, const ts_tensor *shape, const float *got, const float *ref,
                         size_t n)
{
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        int same = got[i] == ref[i] || (isnan(got[i]) && isnan(ref[i]));
        if (!same && bad++ == 0) first = i;
    }
    char where[128] = "";
    if (bad) where_str(shape, first, where, sizeof where);
    if (!bad) return check(1, "%s: %s exact (%zu values)", op, what, n);
    return check(0, "%s: %s exact: %zu of %zu values differ, first at %s: cuda %.9g, cpu %.9g", op, what, bad, n, where,
                 (double)got[first], (double)ref[first]);
}

/* Norm-wise: NaN where the CPU has NaN, and max |got - ref| over the rest
 * <= atol + rtol * max |ref|. */
static int cmp_near_raw(const char *op, const char *what, const ts_tensor *shape, const float *got, const float *ref,
                        size_t n, double atol, double rtol)
{
    double maxref = 0, maxd = 0;
    size_t worst = 0, nan_bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(ref[i]) || isnan(got[i])) {
            nan_bad += !(isnan(ref[i]) && isnan(got[i]));
            continue;
        }
        double r = fabs((double)ref[i]), d = fabs((double)got[i] - (double)ref[i]);
        if (r > maxref) maxref = r;
        if (!(d <= maxd)) {
            maxd = d;
            worst = i;
        }
    }
    double bound = atol + rtol * maxref;
    char where[128];
    where_str(shape, worst, where, sizeof where);
    return check(nan_bad == 0 && maxd <= bound,
                 "%s: %s max|cuda - cpu| %.3e <= %.3e (atol %.1e + rtol %.1e * max|cpu| %.3e); worst at %s: cuda %.9g, "
                 "cpu %.9g; %zu NaN mismatches",
                 op, what, maxd, bound, atol, rtol, maxref, where, n ? (double)got[worst] : 0.0,
                 n ? (double)ref[worst] : 0.0, nan_bad);
}

static int cmp_exact(const char *op, const char *what, const pair *p)
{
    float *g = pair_get(p);
    int ok = cmp_exact_raw(op, what, &p->h, g, p->h.data, numel(p));
    tu_free(g, op, "download");
    return ok;
}

/* rtol relative to (1 + max |ref|): atol = rtol. */
static int cmp_near(const char *op, const char *what, const pair *p, double rtol)
{
    float *g = pair_get(p);
    int ok = cmp_near_raw(op, what, &p->h, g, p->h.data, numel(p), rtol, rtol);
    tu_free(g, op, "download");
    return ok;
}

/* rtol relative to max |ref| alone (the losses' O(1/pixels) gradients). */
static int cmp_rel(const char *op, const char *what, const pair *p, double rtol)
{
    float *g = pair_get(p);
    int ok = cmp_near_raw(op, what, &p->h, g, p->h.data, numel(p), 1e-30, rtol);
    tu_free(g, op, "download");
    return ok;
}

static int cmp_index(const char *op, const char *what, const ipair *p)
{
    int32_t *g = tu_alloc_i32(p->n);
    download(g, p->d, p->n * sizeof(int32_t));
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < p->n; i++)
        if (g[i] != p->h[i] && bad++ == 0) first = i;
    int ok = bad ? check(0, "%s: %s: %zu of %zu indices differ, first at %zu: cuda %d, cpu %d", op, what, bad, p->n,
                         first, g[first], p->h[first])
                 : check(1, "%s: %s exact (%zu indices)", op, what, p->n);
    tu_free(g, op, "index download");
    return ok;
}

static int cmp_double(const char *op, const char *what, double got, double ref, double atol, double rtol)
{
    double d = fabs(got - ref), bound = atol + rtol * fabs(ref);
    return check(d <= bound, "%s: %s cuda %.12g, cpu %.12g, |d| %.3e <= %.3e (atol %.1e + rtol %.1e * |cpu|)", op, what,
                 got, ref, d, bound, atol, rtol);
}

/* Bit-identical device sides (two runs of one op, or two ops by contract the same). */
static int same_bits(const char *op, const char *what, const pair *a, const pair *b)
{
    float *x = pair_get(a), *y = pair_get(b);
    size_t n = numel(a), diff = 0;
    for (size_t i = 0; i < n; i++) diff += memcmp(&x[i], &y[i], sizeof(float)) != 0;
    int ok = check(diff == 0, "%s: %s: identical bits (%zu of %zu differ)", op, what, diff, n);
    tu_free(x, op, "run 1");
    tu_free(y, op, "run 2");
    return ok;
}

static void shape_label(char *buf, size_t size, const char *op, const ts_tensor *t, const char *extra)
{
    char sh[TS_SHAPE_STR];
    snprintf(buf, size, "%s %s%s%s", op, ts_shape_str(t, sh), extra && *extra ? " " : "", extra ? extra : "");
}

/* ---- conv2d ---------------------------------------------------------------- */

typedef struct conv_case {
    int n, cin, h, w, cout, kh, kw, sh, sw, ph, pw;
    const char *name;
} conv_case;

static void test_conv(const conv_case *cc)
{
    const ts_conv2d_params p = {cc->sh, cc->sw, cc->ph, cc->pw, 0, NULL};
    const int ho = ts_conv_out_size(cc->h, cc->kh, cc->sh, cc->ph),
              wo = ts_conv_out_size(cc->w, cc->kw, cc->sw, cc->pw);
    char op[256];
    pair x = pair_rand(cc->n, cc->cin, cc->h, cc->w, -1, 1);
    shape_label(op, sizeof op, "conv2d", &x.h, cc->name);
    pair w = pair_rand(cc->cout, cc->cin, cc->kh, cc->kw, -0.5, 0.5);
    pair bias = vec_rand((size_t)cc->cout, -0.5, 0.5);
    pair y = pair_new(cc->n, cc->cout, ho, wo), dy = pair_rand(cc->n, cc->cout, ho, wo, -1, 1);
    pair dx = pair_rand(cc->n, cc->cin, cc->h, cc->w, -1, 1); /* backward accumulates onto these */
    pair dw = pair_rand(cc->cout, cc->cin, cc->kh, cc->kw, -1, 1);
    pair db = vec_rand((size_t)cc->cout, -1, 1);
    const double l_fwd = (double)cc->cin * cc->kh * cc->kw;
    const double l_bwd_data = (double)cc->cout * cc->kh * cc->kw, l_bwd_filter = (double)cc->n * ho * wo;
    char lab[300];

    /* Forward: with bias, without bias, and with bias + ReLU (one fused
     * cuDNN call, kernels/cuda/conv.c; the others take two passes). */
    for (int variant = 0; variant < 3; variant++) {
        ts_conv2d_params pv = p;
        pv.relu = variant == 2;
        const float *bh = variant == 1 ? NULL : bias.h.data, *bd = variant == 1 ? NULL : bias.d.data;
        snprintf(lab, sizeof lab, "%s forward%s", op,
                 variant == 0   ? " +bias"
                 : variant == 1 ? " no bias"
                                : " +bias +relu");
        pair_fill_const(&y, NAN);
        if (cpu_ok(cpu->conv2d_forward(&cctx, &y.h, &x.h, &w.h, bh, &pv), lab) &&
            gpu_ok(gpu->conv2d_forward(&gctx, &y.d, &x.d, &w.d, bd, &pv), lab))
            cmp_near(lab, "y", &y, sum_rtol(l_fwd));
    }

    snprintf(lab, sizeof lab, "%s backward_data", op);
    if (cpu_ok(cpu->conv2d_backward_data(&cctx, &dx.h, &dy.h, &w.h, &p), lab) &&
        gpu_ok(gpu->conv2d_backward_data(&gctx, &dx.d, &dy.d, &w.d, &p), lab))
        cmp_near(lab, "dx (accumulated)", &dx, sum_rtol(l_bwd_data));

    snprintf(lab, sizeof lab, "%s backward_filter", op);
    if (cpu_ok(cpu->conv2d_backward_filter(&cctx, &dw.h, &dy.h, &x.h, &p), lab) &&
        gpu_ok(gpu->conv2d_backward_filter(&gctx, &dw.d, &dy.d, &x.d, &p), lab))
        cmp_near(lab, "dw (accumulated)", &dw, sum_rtol(l_bwd_filter));

    snprintf(lab, sizeof lab, "%s backward_bias", op);
    if (cpu_ok(cpu->conv2d_backward_bias(&cctx, db.h.data, &dy.h), lab) &&
        gpu_ok(gpu->conv2d_backward_bias(&gctx, db.d.data, &dy.d), lab))
        cmp_near(lab, "dbias (accumulated)", &db, sum_rtol(l_bwd_filter));

    pair_free(&x, op, "x");
    pair_free(&w, op, "w");
    pair_free(&bias, op, "bias");
    pair_free(&y, op, "y");
    pair_free(&dy, op, "dy");
    pair_free(&dx, op, "dx");
    pair_free(&dw, op, "dw");
    pair_free(&db, op, "dbias");
}

static const conv_case conv_cases[] = {
    /* n, cin, h, w, cout, kh, kw, sh, sw, ph, pw */
    {3, 64, 13, 11, 7, 1, 1, 1, 1, 0, 0, "1x1 s1 p0 (pointwise)"},
    {2, 64, 13, 11, 32, 1, 1, 2, 2, 0, 0, "1x1 s2 p0 (downsample)"},
    {1, 3, 17, 19, 7, 3, 3, 1, 1, 1, 1, "3x3 s1 p1"},
    {3, 7, 13, 11, 64, 3, 3, 2, 2, 1, 1, "3x3 s2 p1"},
    {3, 64, 8, 8, 64, 3, 3, 1, 1, 1, 1, "3x3 s1 p1 64->64"},
    {1, 16, 23, 29, 16, 3, 3, 1, 1, 0, 0, "3x3 s1 p0"},
    {1, 3, 37, 41, 64, 7, 7, 2, 2, 3, 3, "7x7 s2 p3 (stem)"},
    {3, 3, 32, 32, 64, 7, 7, 2, 2, 3, 3, "7x7 s2 p3 (stem)"},
    {3, 7, 1, 1, 3, 3, 3, 1, 1, 1, 1, "3x3 s1 p1 on 1x1"},
    {1, 7, 1, 1, 64, 3, 3, 2, 2, 1, 1, "3x3 s2 p1 on 1x1"},
    {1, 64, 1, 1, 7, 1, 1, 1, 1, 0, 0, "1x1 on 1x1"},
    {3, 3, 2, 3, 7, 7, 7, 2, 2, 3, 3, "7x7 s2 p3 on 2x3"},
    {2, 5, 13, 7, 3, 3, 1, 2, 1, 1, 0, "3x1 s2x1 p1x0"},
    {2, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, "3x3 s1 p1 (ResNet layer1)"},
};

/* The forward with the fused add (p.add, cuDNN's z): y = conv + bias + add,
 * then the ReLU, in four variants: bias + ReLU (cuDNN's fused call with
 * alpha2 = 1, or two passes where cuDNN does not support z for the plan),
 * bias without ReLU, ReLU without bias, and neither (the epilogue adds only
 * add; all three two passes). The add is about as large as the convolution
 * (a ResNet shortcut), so a lost or doubled add is far outside the bound.
 * The tolerance is the conv forward's, with the bias and the add counted as
 * two more terms of the sum. y is prefilled with NaN (the add must go in z,
 * never through y's old contents), and the add must come out bit for bit
 * as it went in. */
static void test_conv_add(const conv_case *cc)
{
    const int ho = ts_conv_out_size(cc->h, cc->kh, cc->sh, cc->ph),
              wo = ts_conv_out_size(cc->w, cc->kw, cc->sw, cc->pw);
    char op[256], lab[300];
    pair x = pair_rand(cc->n, cc->cin, cc->h, cc->w, -1, 1);
    shape_label(op, sizeof op, "conv2d +add", &x.h, cc->name);
    pair w = pair_rand(cc->cout, cc->cin, cc->kh, cc->kw, -0.5, 0.5);
    pair bias = vec_rand((size_t)cc->cout, -0.5, 0.5);
    pair add = pair_rand(cc->n, cc->cout, ho, wo, -2, 2);
    pair y = pair_new(cc->n, cc->cout, ho, wo);
    const size_t n = numel(&add);
    float *add0 = tu_alloc_f(n);
    memcpy(add0, add.h.data, n * sizeof(float));
    const double l_fwd = (double)cc->cin * cc->kh * cc->kw + 2;

    static const struct {
        int bias, relu;
        const char *name;
    } variants[] = {{1, 1, "+bias +add +relu"}, {1, 0, "+bias +add"}, {0, 1, "+add +relu"}, {0, 0, "+add"}};
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        ts_conv2d_params pv = {cc->sh, cc->sw, cc->ph, cc->pw, variants[v].relu, NULL};
        const float *bh = variants[v].bias ? bias.h.data : NULL, *bd = variants[v].bias ? bias.d.data : NULL;
        snprintf(lab, sizeof lab, "%s forward %s", op, variants[v].name);
        pair_fill_const(&y, NAN);
        pv.add = &add.h;
        const int ok_cpu = cpu_ok(cpu->conv2d_forward(&cctx, &y.h, &x.h, &w.h, bh, &pv), lab);
        pv.add = &add.d;
        if (ok_cpu && gpu_ok(gpu->conv2d_forward(&gctx, &y.d, &x.d, &w.d, bd, &pv), lab))
            cmp_near(lab, "y", &y, sum_rtol(l_fwd));
        /* The add is an input on both sides: untouched, bits included. */
        float *g = pair_get(&add);
        size_t dev_diff = 0, host_diff = 0;
        for (size_t i = 0; i < n; i++) {
            dev_diff += memcmp(&g[i], &add0[i], sizeof(float)) != 0;
            host_diff += memcmp(&add.h.data[i], &add0[i], sizeof(float)) != 0;
        }
        check(dev_diff == 0 && host_diff == 0, "%s: add unchanged (%zu cuda, %zu cpu of %zu values differ)", lab,
              dev_diff, host_diff, n);
        tu_free(g, lab, "add download");
    }

    tu_free(add0, op, "add copy");
    pair_free(&x, op, "x");
    pair_free(&w, op, "w");
    pair_free(&bias, op, "bias");
    pair_free(&add, op, "add");
    pair_free(&y, op, "y");
}

/* Odd planes and channel counts, 1x1 and 3x3, stride 1 and 2, the BasicBlock
 * conv2 shape (64 -> 64, 3x3 s1), and a 1x1 plane. */
static const conv_case conv_add_cases[] = {
    /* n, cin, h, w, cout, kh, kw, sh, sw, ph, pw */
    {3, 64, 13, 11, 7, 1, 1, 1, 1, 0, 0, "1x1 s1 p0"},
    {2, 64, 13, 11, 32, 1, 1, 2, 2, 0, 0, "1x1 s2 p0 (downsample)"},
    {1, 3, 17, 19, 7, 3, 3, 1, 1, 1, 1, "3x3 s1 p1"},
    {3, 7, 13, 11, 65, 3, 3, 2, 2, 1, 1, "3x3 s2 p1"},
    {3, 64, 9, 7, 64, 3, 3, 1, 1, 1, 1, "3x3 s1 p1 64->64 (BasicBlock conv2)"},
    {2, 5, 23, 29, 17, 3, 3, 2, 2, 0, 0, "3x3 s2 p0"},
    {3, 7, 1, 1, 3, 3, 3, 1, 1, 1, 1, "3x3 s1 p1 on 1x1"},
    {2, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, "3x3 s1 p1 (ResNet layer1)"},
};

/* ---- batchnorm ------------------------------------------------------------- */

static void test_batchnorm(int N, int C, int H, int W)
{
    const ts_bn_params p = {1e-5f, 0.1f};
    char op[256], lab[300];
    pair x = pair_new(N, C, H, W);
    shape_label(op, sizeof op, "batchnorm", &x.h, NULL);
    /* Per-channel offsets and scales: a one-pass E[x^2] - E[x]^2 variance in
     * float would lose digits here, as it would on real activations. */
    const size_t plane = (size_t)H * W, count = (size_t)N * plane;
    for (int c = 0; c < C; c++) {
        double off = tu_uniform(&rng, -2, 2), sc = tu_uniform(&rng, 0.5, 2);
        for (int n = 0; n < N; n++)
            for (size_t i = 0; i < plane; i++)
                x.h.data[((size_t)n * C + c) * plane + i] = (float)(off + sc * tu_uniform(&rng, -1, 1));
    }
    pair_sync(&x);
    pair gamma = vec_rand((size_t)C, 0.5, 1.5), beta = vec_rand((size_t)C, -0.5, 0.5);
    pair rmean = vec_rand((size_t)C, -1, 1), rvar = vec_rand((size_t)C, 0.5, 2);
    pair y = pair_new(N, C, H, W), smean = vec_new((size_t)C), sinv = vec_new((size_t)C);
    const double rt = sum_rtol((double)count);

    snprintf(lab, sizeof lab, "%s forward_train", op);
    pair_fill_const(&y, NAN);
    pair_fill_const(&smean, NAN);
    pair_fill_const(&sinv, NAN);
    if (cpu_ok(cpu->batchnorm_forward_train(&cctx, &y.h, smean.h.data, sinv.h.data, &x.h, gamma.h.data, beta.h.data,
                                            rmean.h.data, rvar.h.data, &p),
               lab) &&
        gpu_ok(gpu->batchnorm_forward_train(&gctx, &y.d, smean.d.data, sinv.d.data, &x.d, gamma.d.data, beta.d.data,
                                            rmean.d.data, rvar.d.data, &p),
               lab)) {
        cmp_near(lab, "y", &y, rt);
        cmp_near(lab, "save_mean", &smean, rt);
        cmp_near(lab, "save_invstd", &sinv, rt);
        cmp_near(lab, "running_mean", &rmean, rt);
        cmp_near(lab, "running_var (unbiased)", &rvar, rt);
    }

    snprintf(lab, sizeof lab, "%s forward_train (no running stats)", op);
    pair y2 = pair_new(N, C, H, W), sm2 = vec_new((size_t)C), si2 = vec_new((size_t)C);
    pair_fill_const(&y2, NAN);
    if (cpu_ok(cpu->batchnorm_forward_train(&cctx, &y2.h, sm2.h.data, si2.h.data, &x.h, gamma.h.data, beta.h.data, NULL,
                                            NULL, &p),
               lab) &&
        gpu_ok(gpu->batchnorm_forward_train(&gctx, &y2.d, sm2.d.data, si2.d.data, &x.d, gamma.d.data, beta.d.data, NULL,
                                            NULL, &p),
               lab)) {
        cmp_near(lab, "y", &y2, rt);
        cmp_near(lab, "save_invstd", &si2, rt);
    }

    /* Eval: the running statistics (as updated above on the CPU) on both sides. */
    pair_sync(&rmean);
    pair_sync(&rvar);
    snprintf(lab, sizeof lab, "%s forward_eval", op);
    pair_fill_const(&y2, NAN);
    if (cpu_ok(
            cpu->batchnorm_forward_eval(&cctx, &y2.h, &x.h, gamma.h.data, beta.h.data, rmean.h.data, rvar.h.data, &p),
            lab) &&
        gpu_ok(
            gpu->batchnorm_forward_eval(&gctx, &y2.d, &x.d, gamma.d.data, beta.d.data, rmean.d.data, rvar.d.data, &p),
            lab))
        cmp_near(lab, "y", &y2, ELEM_RTOL);

    /* Backward from the CPU's saved statistics on both sides, so it is
     * compared on its own. */
    pair_sync(&smean);
    pair_sync(&sinv);
    pair dy = pair_rand(N, C, H, W, -1, 1), dx = pair_rand(N, C, H, W, -1, 1);
    pair dgamma = vec_rand((size_t)C, -1, 1), dbeta = vec_rand((size_t)C, -1, 1);
    snprintf(lab, sizeof lab, "%s backward", op);
    if (cpu_ok(cpu->batchnorm_backward(&cctx, &dx.h, dgamma.h.data, dbeta.h.data, &dy.h, &x.h, gamma.h.data,
                                       smean.h.data, sinv.h.data),
               lab) &&
        gpu_ok(gpu->batchnorm_backward(&gctx, &dx.d, dgamma.d.data, dbeta.d.data, &dy.d, &x.d, gamma.d.data,
                                       smean.d.data, sinv.d.data),
               lab)) {
        cmp_near(lab, "dx (accumulated)", &dx, rt);
        cmp_near(lab, "dgamma (accumulated)", &dgamma, rt);
        cmp_near(lab, "dbeta (accumulated)", &dbeta, rt);
    }

    pair *all[] = {&x, &gamma, &beta, &rmean, &rvar, &y, &smean, &sinv, &y2, &sm2, &si2, &dy, &dx, &dgamma, &dbeta};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "bn buffer");
}

/* ---- relu ------------------------------------------------------------------ */

/* Random values with the IEEE specials the CPU defines: NaN propagates
 * (torch.relu is clamp_min), infinities, both zeros. */
static void fill_specials(pair *p)
{
    static const float specials[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1e-38f, -1e-38f};
    tu_fill(&rng, p->h.data, numel(p), -1, 1);
    for (size_t i = 0; i < numel(p); i += 5) p->h.data[i] = specials[tu_randint(&rng, 7)];
    pair_sync(p);
}

static void test_relu(int N, int C, int H, int W)
{
    char op[256], lab[300];
    pair x = pair_new(N, C, H, W), y = pair_new(N, C, H, W);
    shape_label(op, sizeof op, "relu", &x.h, NULL);
    fill_specials(&x);

    snprintf(lab, sizeof lab, "%s forward", op);
    pair_fill_const(&y, NAN);
    if (cpu_ok(cpu->relu_forward(&cctx, &y.h, &x.h), lab) && gpu_ok(gpu->relu_forward(&gctx, &y.d, &x.d), lab))
        cmp_exact(lab, "y (NaN, inf, zeros)", &y);

    snprintf(lab, sizeof lab, "%s forward in place (y == x)", op);
    pair xi = pair_new(N, C, H, W);
    memcpy(xi.h.data, x.h.data, numel(&x) * sizeof(float));
    pair_sync(&xi);
    if (cpu_ok(cpu->relu_forward(&cctx, &xi.h, &xi.h), lab) && gpu_ok(gpu->relu_forward(&gctx, &xi.d, &xi.d), lab))
        cmp_exact(lab, "y", &xi);

    /* Backward against the CPU's forward output (zeros, NaN, infinities). */
    pair_sync(&y);
    pair dy = pair_rand(N, C, H, W, -1, 1), dx = pair_rand(N, C, H, W, -1, 1);
    snprintf(lab, sizeof lab, "%s backward", op);
    if (cpu_ok(cpu->relu_backward(&cctx, &dx.h, &dy.h, &y.h), lab) &&
        gpu_ok(gpu->relu_backward(&gctx, &dx.d, &dy.d, &y.d), lab))
        cmp_exact(lab, "dx (accumulated)", &dx);

    pair_free(&x, op, "x");
    pair_free(&y, op, "y");
    pair_free(&xi, op, "x in place");
    pair_free(&dy, op, "dy");
    pair_free(&dx, op, "dx");
}

/* ---- max-pool -------------------------------------------------------------- */

enum pool_fill { POOL_DISTINCT, POOL_TIES, POOL_NAN, POOL_NEG_INF, POOL_INF_NAN };
static const char *const pool_fill_name[] = {"random", "ties", "ties+NaN", "all -inf", "-inf+NaN"};

static void fill_pool(pair *x, enum pool_fill kind)
{
    size_t n = numel(x);
    float *d = x->h.data;
    switch (kind) {
    case POOL_DISTINCT: tu_fill(&rng, d, n, -1, 1); break;
    /* Small integers: a ReLU output pooled has many exact ties (zeros and
     * equal positives); the first in scan order must win on both sides. */
    case POOL_TIES:
        for (size_t i = 0; i < n; i++) d[i] = (float)tu_randint(&rng, 3);
        break;
    case POOL_NAN:
        for (size_t i = 0; i < n; i++) d[i] = (float)tu_randint(&rng, 3);
        for (size_t k = 0; k < 1 + n / 20; k++) d[tu_randint(&rng, (int)n)] = NAN;
        break;
    case POOL_NEG_INF:
        for (size_t i = 0; i < n; i++) d[i] = -INFINITY;
        break;
    case POOL_INF_NAN:
        for (size_t i = 0; i < n; i++) d[i] = tu_randint(&rng, 4) ? -INFINITY : (float)tu_randint(&rng, 2);
        for (size_t k = 0; k < 1 + n / 30; k++) d[tu_randint(&rng, (int)n)] = NAN;
        break;
    }
    pair_sync(x);
}

static void test_maxpool(const ts_pool2d_params *p, const char *pname, int N, int C, int H, int W, enum pool_fill kind)
{
    int OH = ts_conv_out_size(H, p->kernel_h, p->stride_h, p->pad_h);
    int OW = ts_conv_out_size(W, p->kernel_w, p->stride_w, p->pad_w);
    if (OH < 1 || OW < 1) return;
    char op[256], lab[300], extra[96];
    pair x = pair_new(N, C, H, W), y = pair_new(N, C, OH, OW);
    snprintf(extra, sizeof extra, "%s %s", pname, pool_fill_name[kind]);
    shape_label(op, sizeof op, "maxpool2d", &x.h, extra);
    fill_pool(&x, kind);
    ipair idx = ipair_new(ts_tensor_numel(&y.h));
    for (size_t i = 0; i < idx.n; i++) idx.h[i] = -7; /* overwritten on both sides */
    ipair_sync(&idx);

    snprintf(lab, sizeof lab, "%s forward", op);
    pair_fill_const(&y, 12345.0f);
    if (cpu_ok(cpu->maxpool2d_forward(&cctx, &y.h, idx.h, &x.h, p), lab) &&
        gpu_ok(gpu->maxpool2d_forward(&gctx, &y.d, idx.d, &x.d, p), lab)) {
        cmp_exact(lab, "y", &y);
        cmp_index(lab, "arg-max index", &idx);
    }

    /* Backward from the CPU's indices: exact on dyadic values (sums of
     * overlapping windows are exact in any order), close on random floats. */
    ipair_sync(&idx);
    pair dy = pair_new(N, C, OH, OW), dx = pair_new(N, C, H, W);
    pair_dyadic(&dy);
    pair_dyadic(&dx);
    snprintf(lab, sizeof lab, "%s backward dyadic", op);
    if (cpu_ok(cpu->maxpool2d_backward(&cctx, &dx.h, &dy.h, idx.h, p), lab) &&
        gpu_ok(gpu->maxpool2d_backward(&gctx, &dx.d, &dy.d, idx.d, p), lab))
        cmp_exact(lab, "dx (accumulated)", &dx);
    if (kind == POOL_DISTINCT || kind == POOL_TIES) {
        tu_fill(&rng, dy.h.data, numel(&dy), -1, 1);
        tu_fill(&rng, dx.h.data, numel(&dx), -1, 1);
        pair_sync(&dy);
        pair_sync(&dx);
        snprintf(lab, sizeof lab, "%s backward random", op);
        if (cpu_ok(cpu->maxpool2d_backward(&cctx, &dx.h, &dy.h, idx.h, p), lab) &&
            gpu_ok(gpu->maxpool2d_backward(&gctx, &dx.d, &dy.d, idx.d, p), lab))
            cmp_near(lab, "dx (accumulated)", &dx, SCATTER_RTOL);
    }

    pair_free(&x, op, "x");
    pair_free(&y, op, "y");
    pair_free(&dy, op, "dy");
    pair_free(&dx, op, "dx");
    ipair_free(&idx, op, "index");
}

/* ---- upsample -------------------------------------------------------------- */

static void test_upsample(int N, int C, int H, int W, int OH, int OW)
{
    char op[256], lab[300], extra[64];
    pair x = pair_rand(N, C, H, W, -1, 1), y = pair_new(N, C, OH, OW);
    snprintf(extra, sizeof extra, "-> %dx%d", OH, OW);
    shape_label(op, sizeof op, "upsample_nearest", &x.h, extra);

    snprintf(lab, sizeof lab, "%s forward", op);
    pair_fill_const(&y, NAN);
    if (cpu_ok(cpu->upsample_nearest_forward(&cctx, &y.h, &x.h), lab) &&
        gpu_ok(gpu->upsample_nearest_forward(&gctx, &y.d, &x.d), lab))
        cmp_exact(lab, "y", &y);

    pair dy = pair_new(N, C, OH, OW), dx = pair_new(N, C, H, W);
    pair_dyadic(&dy);
    pair_dyadic(&dx);
    snprintf(lab, sizeof lab, "%s backward dyadic", op);
    if (cpu_ok(cpu->upsample_nearest_backward(&cctx, &dx.h, &dy.h), lab) &&
        gpu_ok(gpu->upsample_nearest_backward(&gctx, &dx.d, &dy.d), lab))
        cmp_exact(lab, "dx (accumulated)", &dx);

    tu_fill(&rng, dy.h.data, numel(&dy), -1, 1);
    tu_fill(&rng, dx.h.data, numel(&dx), -1, 1);
    pair_sync(&dy);
    pair_sync(&dx);
    /* Up to ceil(OH/H) * ceil(OW/W) values add into one input element. */
    double fan = ceil((double)OH / H) * ceil((double)OW / W);
    snprintf(lab, sizeof lab, "%s backward random", op);
    if (cpu_ok(cpu->upsample_nearest_backward(&cctx, &dx.h, &dy.h), lab) &&
        gpu_ok(gpu->upsample_nearest_backward(&gctx, &dx.d, &dy.d), lab))
        cmp_near(lab, "dx (accumulated)", &dx, SCATTER_RTOL * (fan > 1 ? fan : 1));

    pair_free(&x, op, "x");
    pair_free(&y, op, "y");
    pair_free(&dy, op, "dy");
    pair_free(&dx, op, "dx");
}

/* ---- concat and add ---------------------------------------------------------- */

static void test_concat(int N, int Ca, int Cb, int H, int W)
{
    char op[256], lab[300], extra[32];
    pair a = pair_rand(N, Ca, H, W, -1, 1), b = pair_rand(N, Cb, H, W, -1, 1), y = pair_new(N, Ca + Cb, H, W);
    snprintf(extra, sizeof extra, "+ %d channels", Cb);
    shape_label(op, sizeof op, "concat", &a.h, extra);

    snprintf(lab, sizeof lab, "%s forward", op);
    pair_fill_const(&y, NAN);
    if (cpu_ok(cpu->concat_forward(&cctx, &y.h, &a.h, &b.h), lab) &&
        gpu_ok(gpu->concat_forward(&gctx, &y.d, &a.d, &b.d), lab))
        cmp_exact(lab, "y", &y);

    pair dy = pair_rand(N, Ca + Cb, H, W, -1, 1);
    snprintf(lab, sizeof lab, "%s backward", op);
    if (cpu_ok(cpu->concat_backward(&cctx, &a.h, &b.h, &dy.h), lab) &&
        gpu_ok(gpu->concat_backward(&gctx, &a.d, &b.d, &dy.d), lab)) {
        cmp_exact(lab, "da (accumulated)", &a);
        cmp_exact(lab, "db (accumulated)", &b);
    }
    pair_free(&a, op, "a");
    pair_free(&b, op, "b");
    pair_free(&y, op, "y");
    pair_free(&dy, op, "dy");
}

static void test_add(int N, int C, int H, int W)
{
    char op[256], lab[300];
    pair a = pair_rand(N, C, H, W, -1, 1), b = pair_rand(N, C, H, W, -1, 1), y = pair_new(N, C, H, W);
    shape_label(op, sizeof op, "add", &a.h, NULL);

    snprintf(lab, sizeof lab, "%s forward", op);
    pair_fill_const(&y, NAN);
    if (cpu_ok(cpu->add_forward(&cctx, &y.h, &a.h, &b.h), lab) &&
        gpu_ok(gpu->add_forward(&gctx, &y.d, &a.d, &b.d), lab))
        cmp_exact(lab, "y", &y);

    /* The residual adds in place: y == a, then y == b, then y == a == b. */
    snprintf(lab, sizeof lab, "%s forward y == a", op);
    if (cpu_ok(cpu->add_forward(&cctx, &a.h, &a.h, &b.h), lab) &&
        gpu_ok(gpu->add_forward(&gctx, &a.d, &a.d, &b.d), lab))
        cmp_exact(lab, "y", &a);
    snprintf(lab, sizeof lab, "%s forward y == b", op);
    if (cpu_ok(cpu->add_forward(&cctx, &b.h, &a.h, &b.h), lab) &&
        gpu_ok(gpu->add_forward(&gctx, &b.d, &a.d, &b.d), lab))
        cmp_exact(lab, "y", &b);
    snprintf(lab, sizeof lab, "%s forward y == a == b", op);
    if (cpu_ok(cpu->add_forward(&cctx, &a.h, &a.h, &a.h), lab) &&
        gpu_ok(gpu->add_forward(&gctx, &a.d, &a.d, &a.d), lab))
        cmp_exact(lab, "y", &a);

    pair dy = pair_rand(N, C, H, W, -1, 1), da = pair_rand(N, C, H, W, -1, 1), db = pair_rand(N, C, H, W, -1, 1);
    snprintf(lab, sizeof lab, "%s backward", op);
    if (cpu_ok(cpu->add_backward(&cctx, &da.h, &db.h, &dy.h), lab) &&
        gpu_ok(gpu->add_backward(&gctx, &da.d, &db.d, &dy.d), lab)) {
        cmp_exact(lab, "da (accumulated)", &da);
        cmp_exact(lab, "db (accumulated)", &db);
    }
    /* y = a + a: da == db collects dy twice. */
    snprintf(lab, sizeof lab, "%s backward da == db", op);
    if (cpu_ok(cpu->add_backward(&cctx, &da.h, &da.h, &dy.h), lab) &&
        gpu_ok(gpu->add_backward(&gctx, &da.d, &da.d, &dy.d), lab))
        cmp_exact(lab, "da (twice dy)", &da);

    pair_free(&a, op, "a");
    pair_free(&b, op, "b");
    pair_free(&y, op, "y");
    pair_free(&dy, op, "dy");
    pair_free(&da, op, "da");
    pair_free(&db, op, "db");
}

/* ---- losses ---------------------------------------------------------------- */

typedef enum { LOSS_CE, LOSS_DICE_SMP, LOSS_DICE_IMG } loss_kind;
static const char *const loss_name[] = {"cross_entropy", "dice SMP", "dice per-image"};

typedef struct loss_case {
    int N, C, H, W;
    int ignore; /* ignore_index (negative: none) */
    double ignore_frac;
    int absent;      /* a class never in the target, or -1 */
    int empty_image; /* image 0 entirely ignore_index (needs ignore >= 0) */
    int weights;
    int log_loss; /* SMP dice */
    float smooth; /* SMP dice */
    const char *name;
} loss_case;

static void make_labels(ipair *y, const loss_case *lc)
{
    size_t hw = (size_t)lc->H * lc->W;
    for (size_t i = 0; i < y->n; i++) {
        int v;
        do v = tu_randint(&rng, lc->C);
        while (v == lc->absent && lc->C > 1);
        if (lc->ignore >= 0 && tu_uniform(&rng, 0, 1) < lc->ignore_frac) v = lc->ignore;
        if (lc->empty_image && i < hw) v = lc->ignore;
        y->h[i] = v;
    }
    ipair_sync(y);
}

static void test_loss(loss_kind kind, const loss_case *lc)
{
    char op[256], lab[300];
    pair z = pair_rand(lc->N, lc->C, lc->H, lc->W, -4, 4);
    shape_label(op, sizeof op, loss_name[kind], &z.h, lc->name);
    const size_t npix = (size_t)lc->N * lc->H * lc->W;
    ipair y = ipair_new(npix);
    make_labels(&y, lc);
    float weights[64];
    for (int c = 0; c < lc->C && c < 64; c++) weights[c] = (float)tu_uniform(&rng, 0.2, 2.0);
    /* Parameters and class weights stay on the host for both backends. */
    ts_ce_params ce = {.ignore_index = lc->ignore, .class_weights = lc->weights ? weights : NULL};
    ts_dice_params dp = {.mode = kind == LOSS_DICE_IMG ? TS_DICE_PER_IMAGE : TS_DICE_SMP,
                         .ignore_index = lc->ignore,
                         .smooth = lc->smooth,
                         .eps = 1e-7f,
                         .log_loss = lc->log_loss,
                         .class_weights = lc->weights ? weights : NULL};
    const double rt = sum_rtol((double)npix * lc->C);

    snprintf(lab, sizeof lab, "%s forward", op);
    double lcpu = NAN, lgpu = NAN;
    ts_status sc = kind == LOSS_CE ? cpu->cross_entropy_forward(&cctx, &lcpu, &z.h, y.h, &ce)
                                   : cpu->dice_forward(&cctx, &lcpu, &z.h, y.h, &dp);
    if (cpu_ok(sc, lab)) {
        ts_status sg = kind == LOSS_CE ? gpu->cross_entropy_forward(&gctx, &lgpu, &z.d, y.d, &ce)
                                       : gpu->dice_forward(&gctx, &lgpu, &z.d, y.d, &dp);
        if (gpu_ok(sg, lab)) cmp_double(lab, "loss", lgpu, lcpu, 1e-7, rt);
    }

    /* Backward onto a prefill of the gradients' own scale (dloss / pixels),
     * so the comparison is not swamped by it. */
    const float dloss = 0.7f;
    pair dz = pair_rand(lc->N, lc->C, lc->H, lc->W, -(double)dloss / (double)npix, (double)dloss / (double)npix);
    snprintf(lab, sizeof lab, "%s backward", op);
    sc = kind == LOSS_CE ? cpu->cross_entropy_backward(&cctx, &dz.h, &z.h, y.h, &ce, dloss)
                         : cpu->dice_backward(&cctx, &dz.h, &z.h, y.h, &dp, dloss);
    if (cpu_ok(sc, lab)) {
        ts_status sg = kind == LOSS_CE ? gpu->cross_entropy_backward(&gctx, &dz.d, &z.d, y.d, &ce, dloss)
                                       : gpu->dice_backward(&gctx, &dz.d, &z.d, y.d, &dp, dloss);
        if (gpu_ok(sg, lab)) cmp_rel(lab, "dlogits (accumulated)", &dz, rt);
    }

    pair_free(&z, op, "logits");
    pair_free(&dz, op, "dlogits");
    ipair_free(&y, op, "labels");
}

static const loss_case loss_cases[] = {
    /* N, C, H, W, ignore, frac, absent, empty_image, weights, log_loss, smooth */
    {1, 3, 5, 7, -100, 0, -1, 0, 0, 0, 0, "plain"},
    {3, 7, 13, 11, 255, 0.1, -1, 0, 1, 0, 0, "ignore 255, weights"},
    {3, 7, 13, 11, 255, 0.1, 4, 0, 0, 1, 0, "ignore 255, class 4 absent, log_loss"},
    {2, 6, 67, 71, 3, 0.05, 5, 0, 1, 0, 1.0f, "ignore 3 (a class id), class 5 absent, weights, smooth 1"},
    {2, 1, 3, 5, -100, 0, -1, 0, 0, 0, 0, "one class"},
    {1, 64, 3, 5, -100, 0, 7, 0, 1, 1, 0, "64 classes, class 7 absent, weights, log_loss"},
    {3, 5, 1, 1, 255, 0.3, -1, 0, 0, 0, 0, "1x1"},
    {3, 3, 9, 4, 255, 0.2, -1, 1, 1, 0, 0, "image 0 all ignored, weights"},
    {2, 3, 4, 4, 255, 1.0, -1, 0, 0, 0, 0, "every pixel ignored"},
};

/* ---- adamw, zero, sum_squares, scale ------------------------------------------ */

/* Per element: |cuda - cpu| <= 8 eps (|cpu| + scale[i]), scale[i] the size of
 * the terms the value was formed from: a few float operations each, rounded
 * in different but valid orders (FMA contraction, lerp's two forms). */
static int cmp_adamw(const char *op, const char *what, const pair *p, const float *scale)
{
    float *g = pair_get(p);
    size_t n = numel(p), bad = 0, worst = 0;
    double wratio = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)g[i] - p->h.data[i]);
        double bound = 8.0 * FLT_EPSILON * (fabs((double)p->h.data[i]) + fabs((double)scale[i])) + 1e-37;
        double ratio = d / bound;
        if (!(d <= bound)) bad++;
        if (!(ratio <= wratio)) {
            wratio = ratio;
            worst = i;
        }
    }
    int ok = check(bad == 0,
                   "%s: %s per element |cuda - cpu| <= 8 eps (|cpu| + term size): %zu of %zu off; worst %.2f of its "
                   "bound at %zu: cuda %.9g, cpu %.9g",
                   op, what, bad, n, wratio, worst, n ? (double)g[worst] : 0.0, n ? (double)p->h.data[worst] : 0.0);
    tu_free(g, op, "download");
    return ok;
}

static void test_adamw(size_t n, long step, double lr, double beta1, double wd)
{
    char op[256], lab[300];
    snprintf(op, sizeof op, "adamw_update n=%zu step %ld lr %g beta1 %g wd %g", n, step, lr, beta1, wd);
    const ts_adamw_hparams h = {lr, beta1, 0.999, 1e-8, wd};
    ts_adamw_step s;
    if (!tu_expect_ok(ts_adamw_prepare(&s, &h, step), op)) return;
    pair param = vec_rand(n, -1, 1), grad = vec_rand(n, -0.01, 0.01), m = vec_new(n), v = vec_new(n);
    if (step > 1) {
        tu_fill(&rng, m.h.data, n, -0.01, 0.01);
        tu_fill(&rng, v.h.data, n, 0, 1e-4);
    }
    /* A few zero gradients (and, at step 1, zero second moments: d = eps). */
    for (size_t i = 0; i < n; i += 97) grad.h.data[i] = 0.0f;
    pair_sync(&grad);
    pair_sync(&m);
    pair_sync(&v);
    float *p0 = tu_alloc_f(n), *m0 = tu_alloc_f(n), *v0 = tu_alloc_f(n), *sc = tu_alloc_f(n);
    memcpy(p0, param.h.data, n * sizeof(float));
    memcpy(m0, m.h.data, n * sizeof(float));
    memcpy(v0, v.h.data, n * sizeof(float));

    snprintf(lab, sizeof lab, "%s", op);
    if (cpu_ok(cpu->adamw_update(&cctx, param.h.data, grad.h.data, m.h.data, v.h.data, n, &s), lab) &&
        gpu_ok(gpu->adamw_update(&gctx, param.d.data, grad.d.data, m.d.data, v.d.data, n, &s), lab)) {
        for (size_t i = 0; i < n; i++) sc[i] = fabsf(m0[i]) + fabsf(grad.h.data[i]);
        cmp_adamw(lab, "exp_avg", &m, sc);
        for (size_t i = 0; i < n; i++) sc[i] = v0[i] + grad.h.data[i] * grad.h.data[i];
        cmp_adamw(lab, "exp_avg_sq", &v, sc);
        /* The parameter's terms: p * decay and step_size * m / d, with m's
         * error bounded by its own terms (|m0| + |g|, which may cancel). */
        for (size_t i = 0; i < n; i++) {
            float d = sqrtf(v.h.data[i]) / s.bc2_sqrt + s.eps;
            sc[i] = fabsf(p0[i]) + fabsf(s.neg_step_size) * (fabsf(m0[i]) + fabsf(grad.h.data[i])) / d;
        }
        cmp_adamw(lab, "param", &param, sc);
    }
    tu_free(p0, op, "p0");
    tu_free(m0, op, "m0");
    tu_free(v0, op, "v0");
    tu_free(sc, op, "scale");
    pair_free(&param, op, "param");
    pair_free(&grad, op, "grad");
    pair_free(&m, op, "exp_avg");
    pair_free(&v, op, "exp_avg_sq");
}

/* The fused multi-tensor AdamW (cuda_multi.h, not a table op): against the
 * CPU's adamw_update per tensor, and bit for bit against the CUDA backend's
 * own adamw_update per tensor (the same per-element code by contract). Sizes
 * around its chunk of 2048 floats, an empty tensor, and more descriptors than
 * one shared-memory batch of 128; tensors sit 5 floats apart in one buffer,
 * and the gaps must stay untouched. */
static void test_adamw_multi(void)
{
    const char *op = "adamw_update_multi";
    enum { COUNT = 140, GAP = 5 };
    static const size_t sizes[] = {1, 16, 2047, 2048, 2049, 0, 300007, 64, 3 * 3 * 64, 4096};
    size_t off[COUNT], len[COUNT], total = 0;
    for (int t = 0; t < COUNT; t++) {
        len[t] = t < 10 ? sizes[t] : (size_t)(1 + tu_randint(&rng, 700));
        off[t] = total;
        total += len[t] + GAP;
    }
    const ts_adamw_hparams h = {1e-3, 0.9, 0.999, 1e-8, 1e-2};
    ts_adamw_step s;
    if (!tu_expect_ok(ts_adamw_prepare(&s, &h, 1000), op)) return;
    pair param = vec_rand(total, -1, 1), grad = vec_rand(total, -0.01, 0.01), m = vec_rand(total, -0.01, 0.01);
    pair v = vec_rand(total, 0, 1e-4);
    /* The same state again for the per-tensor CUDA run. */
    pair p2 = vec_new(total), m2 = vec_new(total), v2 = vec_new(total);
    memcpy(p2.h.data, param.h.data, total * sizeof(float));
    memcpy(m2.h.data, m.h.data, total * sizeof(float));
    memcpy(v2.h.data, v.h.data, total * sizeof(float));
    pair_sync(&p2);
    pair_sync(&m2);
    pair_sync(&v2);
    float *m0 = tu_alloc_f(total), *v0 = tu_alloc_f(total), *p0 = tu_alloc_f(total), *sc = tu_alloc_f(total);
    memcpy(m0, m.h.data, total * sizeof(float));
    memcpy(v0, v.h.data, total * sizeof(float));
    memcpy(p0, param.h.data, total * sizeof(float));

    ts_cuda_adamw_tensor desc[COUNT];
    for (int t = 0; t < COUNT; t++)
        desc[t] = (ts_cuda_adamw_tensor){param.d.data + off[t], grad.d.data + off[t], m.d.data + off[t],
                                         v.d.data + off[t], len[t]};
    ts_cuda_adamw_tensor *ddesc = dev_alloc(sizeof desc);
    upload(ddesc, desc, sizeof desc);
    int ok = tu_expect_ok(ts_cuda_adamw_check_tensors(desc, COUNT), "ts_cuda_adamw_check_tensors") &&
             gpu_ok(ts_cuda_adamw_update_multi(&gctx, ddesc, COUNT, &s), op);
    for (int t = 0; ok && t < COUNT; t++) {
        size_t o = off[t];
        ok = cpu_ok(cpu->adamw_update(&cctx, param.h.data + o, grad.h.data + o, m.h.data + o, v.h.data + o, len[t], &s),
                    op) &&
             gpu_ok(gpu->adamw_update(&gctx, p2.d.data + o, grad.d.data + o, m2.d.data + o, v2.d.data + o, len[t], &s),
                    op);
    }
    if (ok) {
        for (size_t i = 0; i < total; i++) sc[i] = fabsf(m0[i]) + fabsf(grad.h.data[i]);
        cmp_adamw(op, "exp_avg vs cpu", &m, sc);
        for (size_t i = 0; i < total; i++) sc[i] = v0[i] + grad.h.data[i] * grad.h.data[i];
        cmp_adamw(op, "exp_avg_sq vs cpu", &v, sc);
        for (size_t i = 0; i < total; i++)
            sc[i] = fabsf(p0[i]) + fabsf(s.neg_step_size) * (fabsf(m0[i]) + fabsf(grad.h.data[i])) /
                                       (sqrtf(v.h.data[i]) / s.bc2_sqrt + s.eps);
        cmp_adamw(op, "param vs cpu", &param, sc);
        same_bits(op, "param vs cuda adamw_update per tensor", &param, &p2);
        same_bits(op, "exp_avg vs cuda adamw_update per tensor", &m, &m2);
        same_bits(op, "exp_avg_sq vs cuda adamw_update per tensor", &v, &v2);
    }

    /* The host-side check names a bad descriptor. */
    desc[7].exp_avg = desc[7].param;
    ts_status st = ts_cuda_adamw_check_tensors(desc, COUNT);
    check(st == TS_ERR_INVALID_ARG && strstr(ts_last_error(), "tensor 7") != NULL,
          "%s: check_tensors refuses tensor 7 with param == exp_avg (%s: \"%s\")", op, ts_status_name(st),
          ts_last_error());
    st = ts_cuda_adamw_update_multi(&gctx, ddesc, COUNT, NULL);
    check(st == TS_ERR_INVALID_ARG, "%s: NULL step values are refused (%s)", op, ts_status_name(st));

    dev_free(ddesc, op, "descriptors");
    tu_free(m0, op, "m0");
    tu_free(v0, op, "v0");
    tu_free(p0, op, "p0");
    tu_free(sc, op, "scale");
    pair *all[] = {&param, &grad, &m, &v, &p2, &m2, &v2};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "buffer");
}

static void test_zero(size_t n)
{
    char op[128];
    snprintf(op, sizeof op, "zero n=%zu", n);
    pair b = vec_rand(n, -1, 1);
    if (cpu_ok(cpu->zero(&cctx, b.h.data, n), op) && gpu_ok(gpu->zero(&gctx, b.d.data, n), op)) {
        cmp_exact(op, "zeros", &b);
        size_t nz = 0;
        for (size_t i = 0; i < n; i++) nz += b.h.data[i] != 0.0f;
        check(nz == 0, "%s: cpu wrote %zu nonzero values", op, nz);
    }
    pair_free(&b, op, "buffer");
}

/* The GPU's reduction order, as kernels/cuda/elementwise.cu fixes it from n
 * alone: B = min(ceil(n / 256), 1024) blocks of 256 threads, thread t adding
 * x[t], x[t + 256 B], ... in order, a tree within each block (s = 128, 64,
 * ..., 1: red[t] += red[t + s]), then one block of 256 threads adding the B
 * partials strided the same way and the same tree. Its sum must match the
 * GPU's bit for bit: that is the determinism the backend promises on any
 * GPU, whichever batch of a multi-tensor call a tensor lands in. */
static double tree256(double *red)
{
    for (int s = 128; s > 0; s >>= 1)
        for (int t = 0; t < s; t++) red[t] += red[t + s];
    return red[0];
}

static double sumsq_gpu_order(const float *x, size_t n)
{
    if (n == 0) return 0;
    size_t B = (n + 255) / 256;
    if (B > 1024) B = 1024;
    const size_t G = B * 256;
    double *part = malloc(B * sizeof *part), red[256];
    if (!part) return NAN;
    for (size_t b = 0; b < B; b++) {
        for (size_t t = 0; t < 256; t++) {
            double acc = 0;
            for (size_t i = b * 256 + t; i < n; i += G) acc += (double)x[i] * (double)x[i];
            red[t] = acc;
        }
        part[b] = tree256(red);
    }
    for (size_t t = 0; t < 256; t++) {
        double acc = 0;
        for (size_t b = t; b < B; b += 256) acc += part[b];
        red[t] = acc;
    }
    free(part);
    return tree256(red);
}

/* Every x^2 is exact in double and both sides sum in double, so the results
 * agree to double rounding over n terms; 1e-7 also admits squares rounded to
 * float (2^-24 relative each) but not a float accumulator over a long vector. */
static void test_sum_squares(size_t n)
{
    char op[128];
    snprintf(op, sizeof op, "sum_squares n=%zu", n);
    pair b = vec_rand(n, -1, 1);
    for (size_t i = 0; i < n; i += 1009) b.h.data[i] = (float)tu_uniform(&rng, -300, 300); /* a few large ones */
    pair_sync(&b);
    double sc = NAN, sg = NAN;
    if (cpu_ok(cpu->sum_squares(&cctx, &sc, b.h.data, n), op) && gpu_ok(gpu->sum_squares(&gctx, &sg, b.d.data, n), op)) {
        cmp_double(op, "sum", sg, sc, 0, 1e-7);
        const double want = sumsq_gpu_order(b.h.data, n);
        check(memcmp(&sg, &want, sizeof sg) == 0, "%s: the bits of the documented GPU order (cuda %.17g, model %.17g)",
              op, sg, want);
    }
    pair_free(&b, op, "x");
}

/* sum_squares_multi on the GPU: the bits of the GPU's own sum_squares per
 * tensor, and of the documented order, close to the CPU's. 300 tensors (back
 * to back in one buffer, as a model's gradients are): the kernels take 128
 * per launch, so three batches, with empty tensors inside a batch, at a
 * batch's start, at the end and in a run across the second boundary, and
 * sizes on both sides of the 1024-block cap (262144 floats). */
static void test_sum_squares_multi(void)
{
    const char *op = "sum_squares_multi";
    enum { M = 300 };
    static size_t n[M];
    static const float *xd[M], *xh[M];
    static double sg[M], sc[M], one[M];
    for (int i = 0; i < M; i++) n[i] = 1 + (size_t)tu_uniform(&rng, 0, 3000);
    const size_t big[] = {262143, 262144, 262145, 300007, 700001};
    for (int i = 0; i < 5; i++) n[10 + 50 * i] = big[i];
    n[0] = n[1] = n[7] = n[128] = 0; /* at a batch's start and inside one */
    for (int i = 250; i < 262; i++) n[i] = 0; /* across the boundary at 256 */
    n[M - 1] = 0;                             /* at the end */
    n[M - 2] = 1;                             /* (n[127], a batch's last, is not empty) */
    size_t total = 0;
    for (int i = 0; i < M; i++) total += n[i];
    pair b = vec_rand(total, -2, 2);
    pair_sync(&b);
    for (int i = 0, off = 0; i < M; off += (int)n[i], i++) {
        xd[i] = n[i] ? b.d.data + off : NULL;
        xh[i] = n[i] ? b.h.data + off : NULL;
        one[i] = -1;
        gpu_ok(gpu->sum_squares(&gctx, &one[i], xd[i], n[i]), op);
    }
    if (gpu_ok(gpu->sum_squares_multi(&gctx, sg, xd, n, M), op) && cpu_ok(cpu->sum_squares_multi(&cctx, sc, xh, n, M), op)) {
        check(memcmp(sg, one, sizeof sg) == 0, "%s: equals %d single sum_squares on the GPU bit for bit", op, M);
        int off = 0, first = -1;
        for (int i = 0; i < M; i++) {
            const double want = sumsq_gpu_order(xh[i], n[i]);
            if (memcmp(&sg[i], &want, sizeof want) != 0 && first < 0) first = i;
            off += memcmp(&sg[i], &want, sizeof want) != 0;
            cmp_double(op, "sum", sg[i], sc[i], 0, 1e-7);
        }
        check(off == 0, "%s: every tensor has the bits of the documented GPU order (%d of %d off, first %d)", op, off,
              M, first);
    }
    pair_free(&b, op, "x");
}

static void test_scale(size_t n, float a)
{
    char op[128];
    snprintf(op, sizeof op, "scale n=%zu a=%g", n, (double)a);
    pair b = vec_rand(n, -10, 10);
    if (cpu_ok(cpu->scale(&cctx, b.h.data, n, a), op) && gpu_ok(gpu->scale(&gctx, b.d.data, n, a), op))
        cmp_exact(op, "x * a", &b);
    pair_free(&b, op, "x");
}

/* n == 0 is a no-op on both sides, even with no buffer. */
static void test_empty_vectors(void)
{
    const char *op = "vector ops n=0";
    double sc = -1, sg = -1;
    check(cpu->zero(&cctx, NULL, 0) == TS_OK && gpu->zero(&gctx, NULL, 0) == TS_OK, "%s: zero(NULL, 0) is OK", op);
    check(cpu->scale(&cctx, NULL, 0, 2.0f) == TS_OK && gpu->scale(&gctx, NULL, 0, 2.0f) == TS_OK,
          "%s: scale(NULL, 0) is OK", op);
    check(cpu->sum_squares(&cctx, &sc, NULL, 0) == TS_OK && gpu->sum_squares(&gctx, &sg, NULL, 0) == TS_OK && sc == 0 &&
              sg == 0,
          "%s: sum_squares(NULL, 0) is 0 (cpu %g, cuda %g)", op, sc, sg);
}

/* ---- determinism ----------------------------------------------------------- */

/* Two prefilled copies of one random device tensor. */
static void twin(pair *a, pair *b, int n, int c, int h, int w)
{
    *a = pair_rand(n, c, h, w, -1, 1);
    *b = pair_new(n, c, h, w);
    memcpy(b->h.data, a->h.data, numel(a) * sizeof(float));
    pair_sync(b);
}

static void determinism_conv(int N, int Cin, int H, int W, int Cout, int k, int s, int pad)
{
    char op[160];
    snprintf(op, sizeof op, "deterministic conv2d [%d,%d,%d,%d] k%d s%d p%d", N, Cin, H, W, k, s, pad);
    const ts_conv2d_params p = {s, s, pad, pad, 0, NULL};
    int Ho = ts_conv_out_size(H, k, s, pad), Wo = ts_conv_out_size(W, k, s, pad);
    pair x = pair_rand(N, Cin, H, W, -1, 1), w = pair_rand(Cout, Cin, k, k, -0.5, 0.5);
    pair dy = pair_rand(N, Cout, Ho, Wo, -1, 1), y1 = pair_new(N, Cout, Ho, Wo), y2 = pair_new(N, Cout, Ho, Wo);
    pair dx1, dx2, dw1, dw2, db1, db2;
    twin(&dx1, &dx2, N, Cin, H, W);
    twin(&dw1, &dw2, Cout, Cin, k, k);
    twin(&db1, &db2, Cout, 1, 1, 1);
    int ok = gpu_ok(gpu->conv2d_forward(&gctx, &y1.d, &x.d, &w.d, NULL, &p), op) &&
             gpu_ok(gpu->conv2d_forward(&gctx, &y2.d, &x.d, &w.d, NULL, &p), op) &&
             gpu_ok(gpu->conv2d_backward_data(&gctx, &dx1.d, &dy.d, &w.d, &p), op) &&
             gpu_ok(gpu->conv2d_backward_data(&gctx, &dx2.d, &dy.d, &w.d, &p), op) &&
             gpu_ok(gpu->conv2d_backward_filter(&gctx, &dw1.d, &dy.d, &x.d, &p), op) &&
             gpu_ok(gpu->conv2d_backward_filter(&gctx, &dw2.d, &dy.d, &x.d, &p), op) &&
             gpu_ok(gpu->conv2d_backward_bias(&gctx, db1.d.data, &dy.d), op) &&
             gpu_ok(gpu->conv2d_backward_bias(&gctx, db2.d.data, &dy.d), op);
    if (ok) {
        same_bits(op, "forward y", &y1, &y2);
        same_bits(op, "backward_data dx", &dx1, &dx2);
        same_bits(op, "backward_filter dw", &dw1, &dw2);
        same_bits(op, "backward_bias dbias", &db1, &db2);
    }
    pair *all[] = {&x, &w, &dy, &y1, &y2, &dx1, &dx2, &dw1, &dw2, &db1, &db2};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "buffer");
}

static void determinism_bn(int N, int C, int H, int W)
{
    char op[160];
    snprintf(op, sizeof op, "deterministic batchnorm [%d,%d,%d,%d]", N, C, H, W);
    const ts_bn_params p = {1e-5f, 0.1f};
    pair x = pair_rand(N, C, H, W, -1, 3), gamma = vec_rand((size_t)C, 0.5, 1.5), beta = vec_rand((size_t)C, -1, 1);
    pair dy = pair_rand(N, C, H, W, -1, 1);
    pair y1 = pair_new(N, C, H, W), y2 = pair_new(N, C, H, W), sm1 = vec_new((size_t)C), sm2 = vec_new((size_t)C);
    pair si1 = vec_new((size_t)C), si2 = vec_new((size_t)C);
    pair rm1, rm2, rv1, rv2, dx1, dx2, dg1, dg2, db1, db2;
    twin(&rm1, &rm2, C, 1, 1, 1);
    twin(&rv1, &rv2, C, 1, 1, 1);
    twin(&dx1, &dx2, N, C, H, W);
    twin(&dg1, &dg2, C, 1, 1, 1);
    twin(&db1, &db2, C, 1, 1, 1);
    int ok = gpu_ok(gpu->batchnorm_forward_train(&gctx, &y1.d, sm1.d.data, si1.d.data, &x.d, gamma.d.data, beta.d.data,
                                                 rm1.d.data, rv1.d.data, &p),
                    op) &&
             gpu_ok(gpu->batchnorm_forward_train(&gctx, &y2.d, sm2.d.data, si2.d.data, &x.d, gamma.d.data, beta.d.data,
                                                 rm2.d.data, rv2.d.data, &p),
                    op) &&
             gpu_ok(gpu->batchnorm_backward(&gctx, &dx1.d, dg1.d.data, db1.d.data, &dy.d, &x.d, gamma.d.data,
                                            sm1.d.data, si1.d.data),
                    op) &&
             gpu_ok(gpu->batchnorm_backward(&gctx, &dx2.d, dg2.d.data, db2.d.data, &dy.d, &x.d, gamma.d.data,
                                            sm1.d.data, si1.d.data),
                    op);
    if (ok) {
        same_bits(op, "forward_train y", &y1, &y2);
        same_bits(op, "save_mean", &sm1, &sm2);
        same_bits(op, "save_invstd", &si1, &si2);
        same_bits(op, "running_mean", &rm1, &rm2);
        same_bits(op, "running_var", &rv1, &rv2);
        same_bits(op, "backward dx", &dx1, &dx2);
        same_bits(op, "backward dgamma", &dg1, &dg2);
        same_bits(op, "backward dbeta", &db1, &db2);
    }
    pair *all[] = {&x,   &gamma, &beta, &dy,  &y1,  &y2,  &sm1, &sm2, &si1, &si2,
                   &rm1, &rm2,   &rv1,  &rv2, &dx1, &dx2, &dg1, &dg2, &db1, &db2};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "buffer");
}

/* The scatter-adds: several outputs add into one input element, so the order
 * is the GPU kernel's to fix. */
static void determinism_scatter(void)
{
    const char *op = "deterministic maxpool2d/upsample backward";
    const ts_pool2d_params p = {3, 3, 2, 2, 1, 1};
    const int N = 2, C = 64, H = 57, W = 55;
    const int OH = ts_conv_out_size(H, 3, 2, 1), OW = ts_conv_out_size(W, 3, 2, 1);
    pair x = pair_new(N, C, H, W), y = pair_new(N, C, OH, OW), dy = pair_rand(N, C, OH, OW, -1, 1);
    fill_pool(&x, POOL_TIES);
    ipair idx = ipair_new(ts_tensor_numel(&y.h));
    pair dx1, dx2;
    twin(&dx1, &dx2, N, C, H, W);
    if (gpu_ok(gpu->maxpool2d_forward(&gctx, &y.d, idx.d, &x.d, &p), op) &&
        gpu_ok(gpu->maxpool2d_backward(&gctx, &dx1.d, &dy.d, idx.d, &p), op) &&
        gpu_ok(gpu->maxpool2d_backward(&gctx, &dx2.d, &dy.d, idx.d, &p), op))
        same_bits(op, "maxpool2d dx", &dx1, &dx2);

    /* 2x and a non-2x size, where the fan-in varies from element to element. */
    static const int sizes[][4] = {{28, 28, 56, 56}, {13, 11, 29, 23}};
    for (int s = 0; s < 2; s++) {
        pair g = pair_rand(N, C, sizes[s][2], sizes[s][3], -1, 1), u1, u2;
        twin(&u1, &u2, N, C, sizes[s][0], sizes[s][1]);
        if (gpu_ok(gpu->upsample_nearest_backward(&gctx, &u1.d, &g.d), op) &&
            gpu_ok(gpu->upsample_nearest_backward(&gctx, &u2.d, &g.d), op))
            same_bits(op, s == 0 ? "upsample 2x dx" : "upsample 13x11 -> 29x23 dx", &u1, &u2);
        pair_free(&g, op, "dy");
        pair_free(&u1, op, "dx1");
        pair_free(&u2, op, "dx2");
    }
    pair_free(&x, op, "x");
    pair_free(&y, op, "y");
    pair_free(&dy, op, "dy");
    pair_free(&dx1, op, "dx1");
    pair_free(&dx2, op, "dx2");
    ipair_free(&idx, op, "index");
}

static void determinism_losses(void)
{
    const char *op = "deterministic losses [2,6,67,71]";
    const loss_case lc = {2, 6, 67, 71, 255, 0.05, -1, 0, 1, 0, 0, ""};
    pair z = pair_rand(lc.N, lc.C, lc.H, lc.W, -4, 4);
    ipair y = ipair_new((size_t)lc.N * lc.H * lc.W);
    make_labels(&y, &lc);
    const float weights[6] = {0.5f, 2.0f, 1.0f, 0.25f, 3.0f, 1.5f};
    ts_ce_params ce = {.ignore_index = 255, .class_weights = weights};
    for (int kind = 0; kind < 3; kind++) {
        char lab[200];
        snprintf(lab, sizeof lab, "%s %s", op, loss_name[kind]);
        ts_dice_params dp = {.mode = kind == LOSS_DICE_IMG ? TS_DICE_PER_IMAGE : TS_DICE_SMP,
                             .ignore_index = 255,
                             .eps = 1e-7f,
                             .class_weights = kind == LOSS_DICE_SMP ? weights : NULL};
        double l1 = NAN, l2 = NAN;
        pair d1, d2;
        twin(&d1, &d2, lc.N, lc.C, lc.H, lc.W);
        int ok;
        if (kind == LOSS_CE)
            ok = gpu_ok(gpu->cross_entropy_forward(&gctx, &l1, &z.d, y.d, &ce), lab) &&
                 gpu_ok(gpu->cross_entropy_forward(&gctx, &l2, &z.d, y.d, &ce), lab) &&
                 gpu_ok(gpu->cross_entropy_backward(&gctx, &d1.d, &z.d, y.d, &ce, 0.5f), lab) &&
                 gpu_ok(gpu->cross_entropy_backward(&gctx, &d2.d, &z.d, y.d, &ce, 0.5f), lab);
        else
            ok = gpu_ok(gpu->dice_forward(&gctx, &l1, &z.d, y.d, &dp), lab) &&
                 gpu_ok(gpu->dice_forward(&gctx, &l2, &z.d, y.d, &dp), lab) &&
                 gpu_ok(gpu->dice_backward(&gctx, &d1.d, &z.d, y.d, &dp, 0.5f), lab) &&
                 gpu_ok(gpu->dice_backward(&gctx, &d2.d, &z.d, y.d, &dp, 0.5f), lab);
        if (ok) {
            check(memcmp(&l1, &l2, sizeof l1) == 0, "%s: loss identical bits over two runs (%.17g, %.17g)", lab, l1,
                  l2);
            same_bits(lab, "dlogits", &d1, &d2);
        }
        pair_free(&d1, op, "d1");
        pair_free(&d2, op, "d2");
    }
    pair_free(&z, op, "logits");
    ipair_free(&y, op, "labels");
}

static void determinism_sum_squares(size_t n)
{
    char op[128];
    snprintf(op, sizeof op, "deterministic sum_squares n=%zu", n);
    pair b = vec_rand(n, -1, 1);
    double s1 = NAN, s2 = NAN;
    if (gpu_ok(gpu->sum_squares(&gctx, &s1, b.d.data, n), op) && gpu_ok(gpu->sum_squares(&gctx, &s2, b.d.data, n), op))
        check(memcmp(&s1, &s2, sizeof s1) == 0, "%s: identical bits over two runs (%.17g, %.17g)", op, s1, s2);
    pair_free(&b, op, "x");
}

static void test_determinism(void)
{
    ts_cuda_set_deterministic(1);
    determinism_conv(2, 64, 28, 28, 64, 3, 1, 1);
    determinism_conv(2, 3, 64, 64, 64, 7, 2, 3);
    determinism_conv(3, 64, 29, 31, 128, 1, 2, 0);
    determinism_bn(2, 64, 28, 28);
    determinism_bn(3, 7, 67, 71);
    determinism_scatter();
    determinism_losses();
    determinism_sum_squares(1000003);
    determinism_sum_squares((1u << 22) + 3);
    ts_cuda_set_deterministic(0);
}

/* ---- errors ---------------------------------------------------------------- */

/* The CUDA op must refuse what the CPU op refuses, with TS_ERR_INVALID_ARG
 * and a message naming the op, before touching device memory; and the
 * device must still be healthy afterwards. */
static void expect_refused(const char *what, const char *opname, ts_status sc, ts_status sg, const char *gmsg)
{
    check(sc == TS_ERR_INVALID_ARG, "errors: %s: cpu refuses it (%s)", what, ts_status_name(sc));
    check(sg == TS_ERR_INVALID_ARG && strstr(gmsg, opname) != NULL,
          "errors: %s: cuda returns \"%s\" (want \"%s\") with a message naming %s: \"%s\"", what, ts_status_name(sg),
          ts_status_name(TS_ERR_INVALID_ARG), opname, gmsg);
    ts_status ss = ts_cuda_synchronize();
    check(ss == TS_OK, "errors: %s: the device is healthy afterwards%s%s", what, ss == TS_OK ? "" : ": ",
          ss == TS_OK ? "" : ts_last_error());
}

#define REFUSED(what, opname, cpu_call, gpu_call)                                                                      \
    do {                                                                                                               \
        ts_status sc_ = (cpu_call);                                                                                    \
        ts_clear_error();                                                                                              \
        ts_status sg_ = (gpu_call);                                                                                    \
        char gmsg_[600];                                                                                               \
        snprintf(gmsg_, sizeof gmsg_, "%s", ts_last_error());                                                          \
        expect_refused(what, opname, sc_, sg_, gmsg_);                                                                 \
    } while (0)

static void test_errors(void)
{
    const char *op = "errors";
    /* Buffers big enough for every call below, so a backend that skipped a
     * check would run on valid memory and fail the status check, not crash. */
    pair a = pair_rand(2, 3, 7, 9, -1, 1), b = pair_rand(2, 3, 7, 9, -1, 1), big = pair_rand(2, 64, 16, 16, -1, 1);
    pair v = vec_rand(64, 0.5, 1.5);
    ipair idx = ipair_new(2 * 64 * 16 * 16), lbl = ipair_new(2 * 7 * 9);
    ipair_sync(&idx);
    ipair_sync(&lbl);
/* Views of a pair's host (T) or device (D) buffer in another shape. */
#define T(pr, d0, d1, d2, d3) ts_tensor_view((pr).h.data, d0, d1, d2, d3)
#define D(pr, d0, d1, d2, d3) ts_tensor_view((pr).d.data, d0, d1, d2, d3)
    ts_tensor hx = T(a, 2, 3, 7, 9), dxx = D(a, 2, 3, 7, 9);
    ts_tensor hb = T(b, 2, 3, 7, 9), db = D(b, 2, 3, 7, 9);

    /* conv2d: y of the wrong size; x and w disagree on channels; the fused
     * ReLU on a backward op. */
    const ts_conv2d_params cp = {1, 1, 1, 1, 0, NULL}, cp_relu = {1, 1, 1, 1, 1, NULL};
    ts_tensor hw = T(big, 4, 3, 3, 3), dw = D(big, 4, 3, 3, 3), hw5 = T(big, 4, 5, 3, 3), dw5 = D(big, 4, 5, 3, 3);
    ts_tensor hy = T(big, 2, 4, 7, 9), dy = D(big, 2, 4, 7, 9), hyb = T(big, 2, 4, 6, 9), dyb = D(big, 2, 4, 6, 9);
    REFUSED("conv2d_forward y [2,4,6,9] for a 7x9 output", "conv2d_forward",
            cpu->conv2d_forward(&cctx, &hyb, &hx, &hw, NULL, &cp),
            gpu->conv2d_forward(&gctx, &dyb, &dxx, &dw, NULL, &cp));
    REFUSED("conv2d_forward x 3 channels, w 5", "conv2d_forward", cpu->conv2d_forward(&cctx, &hy, &hx, &hw5, NULL, &cp),
            gpu->conv2d_forward(&gctx, &dy, &dxx, &dw5, NULL, &cp));
    REFUSED("conv2d_backward_data with relu", "conv2d_backward_data",
            cpu->conv2d_backward_data(&cctx, &hx, &hy, &hw, &cp_relu),
            gpu->conv2d_backward_data(&gctx, &dxx, &dy, &dw, &cp_relu));
    REFUSED("conv2d_backward_filter dy [2,4,6,9]", "conv2d_backward_filter",
            cpu->conv2d_backward_filter(&cctx, &hw, &hyb, &hx, &cp),
            gpu->conv2d_backward_filter(&gctx, &dw, &dyb, &dxx, &cp));
    /* The fused add: y itself; of another shape; on a backward op. The
     * views lie past y's 504 floats in big, so only the checks can fail. */
    {
        ts_conv2d_params ch = cp, cd = cp;
        ts_tensor hz = ts_tensor_view(big.h.data + 1024, 2, 4, 7, 9);
        ts_tensor dz = ts_tensor_view(big.d.data + 1024, 2, 4, 7, 9);
        ts_tensor hzb = ts_tensor_view(big.h.data + 1024, 2, 4, 9, 7);
        ts_tensor dzb = ts_tensor_view(big.d.data + 1024, 2, 4, 9, 7);
        ch.add = &hy;
        cd.add = &dy;
        REFUSED("conv2d_forward add is y", "conv2d_forward", cpu->conv2d_forward(&cctx, &hy, &hx, &hw, NULL, &ch),
                gpu->conv2d_forward(&gctx, &dy, &dxx, &dw, NULL, &cd));
        ch.add = &hzb;
        cd.add = &dzb;
        REFUSED("conv2d_forward add [2,4,9,7] for y [2,4,7,9]", "conv2d_forward",
                cpu->conv2d_forward(&cctx, &hy, &hx, &hw, NULL, &ch),
                gpu->conv2d_forward(&gctx, &dy, &dxx, &dw, NULL, &cd));
        ch.add = &hz;
        cd.add = &dz;
        REFUSED("conv2d_backward_data with add", "conv2d_backward_data",
                cpu->conv2d_backward_data(&cctx, &hx, &hy, &hw, &ch),
                gpu->conv2d_backward_data(&gctx, &dxx, &dy, &dw, &cd));
    }

    /* batchnorm: y and x differ; one value per channel in training. */
    const ts_bn_params bp = {1e-5f, 0.1f};
    ts_tensor hx1 = T(a, 1, 3, 1, 1), dx1 = D(a, 1, 3, 1, 1), hy1 = T(b, 1, 3, 1, 1), dy1 = D(b, 1, 3, 1, 1);
    ts_tensor hbs = T(b, 2, 3, 9, 7), dbs = D(b, 2, 3, 9, 7);
    float *hv = v.h.data, *dv = v.d.data;
    REFUSED("batchnorm_forward_train y [2,3,9,7] vs x [2,3,7,9]", "batchnorm_forward_train",
            cpu->batchnorm_forward_train(&cctx, &hbs, hv, hv + 8, &hx, hv + 16, hv + 24, NULL, NULL, &bp),
            gpu->batchnorm_forward_train(&gctx, &dbs, dv, dv + 8, &dxx, dv + 16, dv + 24, NULL, NULL, &bp));
    REFUSED("batchnorm_forward_train one value per channel", "batchnorm_forward_train",
            cpu->batchnorm_forward_train(&cctx, &hy1, hv, hv + 8, &hx1, hv + 16, hv + 24, NULL, NULL, &bp),
            gpu->batchnorm_forward_train(&gctx, &dy1, dv, dv + 8, &dx1, dv + 16, dv + 24, NULL, NULL, &bp));
    REFUSED("batchnorm_forward_eval y [2,3,9,7] vs x [2,3,7,9]", "batchnorm_forward_eval",
            cpu->batchnorm_forward_eval(&cctx, &hbs, &hx, hv, hv + 8, hv + 16, hv + 24, &bp),
            gpu->batchnorm_forward_eval(&gctx, &dbs, &dxx, dv, dv + 8, dv + 16, dv + 24, &bp));
    REFUSED("batchnorm_backward dy [2,3,9,7] vs x [2,3,7,9]", "batchnorm_backward",
            cpu->batchnorm_backward(&cctx, &hb, hv, hv + 8, &hbs, &hx, hv + 16, hv + 24, hv + 32),
            gpu->batchnorm_backward(&gctx, &db, dv, dv + 8, &dbs, &dxx, dv + 16, dv + 24, dv + 32));

    /* relu, add, concat. */
    REFUSED("relu_forward y [2,3,9,7] vs x [2,3,7,9]", "relu_forward", cpu->relu_forward(&cctx, &hbs, &hx),
            gpu->relu_forward(&gctx, &dbs, &dxx));
    REFUSED("relu_backward dx aliasing dy", "relu_backward", cpu->relu_backward(&cctx, &hb, &hb, &hx),
            gpu->relu_backward(&gctx, &db, &db, &dxx));
    REFUSED("add_forward b [2,3,9,7] vs a [2,3,7,9]", "add_forward", cpu->add_forward(&cctx, &hx, &hx, &hbs),
            gpu->add_forward(&gctx, &dxx, &dxx, &dbs));
    REFUSED("add_backward db [2,3,9,7] vs dy [2,3,7,9]", "add_backward", cpu->add_backward(&cctx, &hx, &hbs, &hx),
            gpu->add_backward(&gctx, &dxx, &dbs, &dxx));
    ts_tensor hcat = T(big, 2, 7, 7, 9), dcat = D(big, 2, 7, 7, 9);
    REFUSED("concat_forward y 7 channels from 3 + 3", "concat_forward", cpu->concat_forward(&cctx, &hcat, &hx, &hb),
            gpu->concat_forward(&gctx, &dcat, &dxx, &db));
    REFUSED("concat_backward dy 7 channels into 3 + 3", "concat_backward", cpu->concat_backward(&cctx, &hx, &hb, &hcat),
            gpu->concat_backward(&gctx, &dxx, &db, &dcat));

    /* maxpool and upsample. */
    const ts_pool2d_params pp = {3, 3, 2, 2, 1, 1};
    ts_tensor hpy = T(big, 2, 3, 4, 4), dpy = D(big, 2, 3, 4, 4);
    REFUSED("maxpool2d_forward y [2,3,4,4] for [2,3,4,5]", "maxpool2d_forward",
            cpu->maxpool2d_forward(&cctx, &hpy, idx.h, &hx, &pp),
            gpu->maxpool2d_forward(&gctx, &dpy, idx.d, &dxx, &pp));
    REFUSED("maxpool2d_backward dy [2,3,4,4] for [2,3,4,5]", "maxpool2d_backward",
            cpu->maxpool2d_backward(&cctx, &hx, &hpy, idx.h, &pp),
            gpu->maxpool2d_backward(&gctx, &dxx, &dpy, idx.d, &pp));
    ts_tensor hup = T(big, 2, 4, 14, 18), dup = D(big, 2, 4, 14, 18);
    REFUSED("upsample_nearest_forward y 4 channels, x 3", "upsample_nearest_forward",
            cpu->upsample_nearest_forward(&cctx, &hup, &hx), gpu->upsample_nearest_forward(&gctx, &dup, &dxx));
    REFUSED("upsample_nearest_backward dy 4 channels, dx 3", "upsample_nearest_backward",
            cpu->upsample_nearest_backward(&cctx, &hx, &hup), gpu->upsample_nearest_backward(&gctx, &dxx, &dup));

    /* losses: dlogits of another shape; an unknown dice mode. */
    for (size_t i = 0; i < lbl.n; i++) lbl.h[i] = (int32_t)(i % 3);
    ipair_sync(&lbl);
    ts_ce_params ce = {.ignore_index = -100};
    ts_dice_params dp = {.mode = TS_DICE_SMP, .ignore_index = -100, .eps = 1e-7f};
    ts_dice_params dbad = dp;
    dbad.mode = (ts_dice_mode)7;
    double loss = 0;
    REFUSED("cross_entropy_backward dlogits [2,3,9,7] vs logits [2,3,7,9]", "cross_entropy_backward",
            cpu->cross_entropy_backward(&cctx, &hbs, &hx, lbl.h, &ce, 1.0f),
            gpu->cross_entropy_backward(&gctx, &dbs, &dxx, lbl.d, &ce, 1.0f));
    REFUSED("dice_backward dlogits [2,3,9,7] vs logits [2,3,7,9]", "dice_backward",
            cpu->dice_backward(&cctx, &hbs, &hx, lbl.h, &dp, 1.0f),
            gpu->dice_backward(&gctx, &dbs, &dxx, lbl.d, &dp, 1.0f));
    REFUSED("dice_forward unknown mode 7", "dice_forward", cpu->dice_forward(&cctx, &loss, &hx, lbl.h, &dbad),
            gpu->dice_forward(&gctx, &loss, &dxx, lbl.d, &dbad));
    /* A label outside [0, C) that is not ignore_index: both name the first
     * such pixel (the labels live on the device, so the GPU has to look). */
    lbl.h[1 * 63 + 2 * 9 + 3] = 3;
    lbl.h[1 * 63 + 5 * 9 + 0] = -1;
    ipair_sync(&lbl);
    REFUSED("cross_entropy_forward label 3 of 3 classes", "cross_entropy_forward",
            cpu->cross_entropy_forward(&cctx, &loss, &hx, lbl.h, &ce),
            gpu->cross_entropy_forward(&gctx, &loss, &dxx, lbl.d, &ce));
    check(strstr(ts_last_error(), "pixel (n=1,h=2,w=3)") != NULL,
          "errors: cross_entropy_forward names the first bad pixel (n=1,h=2,w=3): \"%s\"", ts_last_error());
    REFUSED("dice_backward labels 3 and -1 of 3 classes", "dice_backward",
            cpu->dice_backward(&cctx, &hb, &hx, lbl.h, &dp, 1.0f),
            gpu->dice_backward(&gctx, &db, &dxx, lbl.d, &dp, 1.0f));

    /* adamw: no step values; one buffer passed twice. */
    ts_adamw_step st;
    const ts_adamw_hparams hp = {1e-3, 0.9, 0.999, 1e-8, 1e-2};
    ts_adamw_prepare(&st, &hp, 1);
    REFUSED("adamw_update NULL step values", "adamw_update",
            cpu->adamw_update(&cctx, hv, hv + 16, hv + 32, hv + 48, 16, NULL),
            gpu->adamw_update(&gctx, dv, dv + 16, dv + 32, dv + 48, 16, NULL));
    REFUSED("adamw_update param == grad", "adamw_update", cpu->adamw_update(&cctx, hv, hv, hv + 32, hv + 48, 16, &st),
            gpu->adamw_update(&gctx, dv, dv, dv + 32, dv + 48, 16, &st));
#undef T
#undef D

    pair_free(&a, op, "a");
    pair_free(&b, op, "b");
    pair_free(&big, op, "big");
    pair_free(&v, op, "v");
    ipair_free(&idx, op, "index");
    ipair_free(&lbl, op, "labels");
}

/* ---- main ------------------------------------------------------------------ */

/* For the fusion checks' messages: why cuDNN first refused the fused call. */
static const char *refusal(void)
{
    const char *r = ts_cuda_conv_fusion_refusal();
    return r ? r : "none";
}

int main(void)
{
    char name[64];
    tu_gpu_device_name(name, sizeof name);
    tu_init(&cctx);
    char info[1024];
    ts_cuda_describe(info, sizeof info);
    printf("%s: backend %s; %s\n", SUITE, name, info);
    cpu = ts_backend_cpu();
    cctx.backend = cpu;
    if (!tu_gpu_backend(name, &gpu)) return tu_finish(SUITE);
    /* The reference is plain fp32: no TF32 on the GPU side. */
    ts_cuda_set_tf32(0);
    ts_cuda_set_deterministic(0);
    ts_ctx_init(&gctx, gpu);
    tu_rng_seed(&rng, 0xC0DA2024u);

    long fused0, unfused0, fused1, unfused1;
    ts_cuda_conv_fusion_stats(&fused0, &unfused0);
    for (size_t i = 0; i < sizeof conv_cases / sizeof conv_cases[0]; i++) test_conv(&conv_cases[i]);
    ts_cuda_conv_fusion_stats(&fused1, &unfused1);
    /* Each case runs one forward with a bias alone (two passes) and one with
     * bias + ReLU (cuDNN's fused call, or two passes where cuDNN does not
     * support it for the shape). */
    const long ncases = (long)(sizeof conv_cases / sizeof conv_cases[0]);
    check(fused1 - fused0 > 0 && (fused1 - fused0) + (unfused1 - unfused0) == 2 * ncases,
          "conv2d forward float32: %ld of %ld bias + ReLU calls ran as cuDNN's fused conv + bias + ReLU, %ld calls "
          "ran two passes (%ld with a bias alone); process totals: %ld fused, %ld two-pass; first refusal: %s",
          fused1 - fused0, ncases, unfused1 - unfused0, ncases, fused1, unfused1, refusal());

    ts_cuda_conv_fusion_stats(&fused0, &unfused0);
    for (size_t i = 0; i < sizeof conv_add_cases / sizeof conv_add_cases[0]; i++) test_conv_add(&conv_add_cases[i]);
    ts_cuda_conv_fusion_stats(&fused1, &unfused1);
    /* Each case runs four forwards with the add: bias + ReLU (fused with z,
     * or two passes where cuDNN does not support z for the plan) and three
     * that always take two passes. */
    const long nadd = (long)(sizeof conv_add_cases / sizeof conv_add_cases[0]);
    check(fused1 - fused0 > 0 && fused1 - fused0 <= nadd && (fused1 - fused0) + (unfused1 - unfused0) == 4 * nadd,
          "conv2d forward float32 +add: %ld of %ld bias + add + ReLU calls ran as cuDNN's fused call with z, %ld "
          "calls ran two passes (%ld lacking the bias, the ReLU or both); process totals: %ld fused, %ld two-pass; "
          "first refusal: %s",
          fused1 - fused0, nadd, unfused1 - unfused0, 3 * nadd, fused1, unfused1, refusal());

    /* Benchmark mode (ts_cuda_set_benchmark: cudnnFind* times the candidates
     * on buffers cuDNN allocates): new plans with the measured algorithms,
     * the same results. The backward ops' outputs are prefilled, so a search
     * that wrote into the caller's buffers would show. */
    ts_cuda_set_benchmark(1);
    static const size_t bench_cases[] = {1, 4, 6, 12, 13};
    for (size_t i = 0; i < sizeof bench_cases / sizeof bench_cases[0]; i++) {
        conv_case cc = conv_cases[bench_cases[i]];
        char name[96];
        snprintf(name, sizeof name, "%s, cuDNN benchmark mode", cc.name);
        cc.name = name;
        test_conv(&cc);
    }
    ts_cuda_set_benchmark(0);

    static const int bn_shapes[][4] = {{3, 7, 13, 11}, {3, 64, 1, 1}, {2, 3, 67, 71}, {1, 7, 5, 3}, {2, 64, 16, 16}};
    for (size_t i = 0; i < sizeof bn_shapes / sizeof bn_shapes[0]; i++)
        test_batchnorm(bn_shapes[i][0], bn_shapes[i][1], bn_shapes[i][2], bn_shapes[i][3]);

    static const int ew_shapes[][4] = {{3, 7, 13, 11}, {1, 1, 1, 1}, {2, 64, 31, 29}, {1, 3, 1, 1}};
    for (size_t i = 0; i < sizeof ew_shapes / sizeof ew_shapes[0]; i++) {
        test_relu(ew_shapes[i][0], ew_shapes[i][1], ew_shapes[i][2], ew_shapes[i][3]);
        test_add(ew_shapes[i][0], ew_shapes[i][1], ew_shapes[i][2], ew_shapes[i][3]);
    }
    test_concat(3, 7, 3, 13, 11);
    test_concat(1, 64, 1, 1, 1);
    test_concat(2, 1, 64, 5, 7);
    test_concat(3, 64, 64, 16, 16);

    /* kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w */
    static const struct {
        ts_pool2d_params p;
        const char *name;
    } pools[] = {
        {{3, 3, 2, 2, 1, 1}, "k3 s2 p1 (ResNet stem)"},
        {{2, 2, 2, 2, 0, 0}, "k2 s2 p0"},
        {{3, 3, 1, 1, 1, 1}, "k3 s1 p1"},
        {{3, 2, 2, 1, 1, 0}, "k3x2 s2x1 p1x0"},
    };
    static const int pool_shapes[][4] = {{1, 1, 7, 9}, {3, 7, 13, 11}, {2, 64, 31, 29}, {1, 3, 1, 1}, {3, 5, 2, 2}};
    for (size_t k = 0; k < sizeof pools / sizeof pools[0]; k++)
        for (size_t s = 0; s < sizeof pool_shapes / sizeof pool_shapes[0]; s++)
            for (int f = POOL_DISTINCT; f <= POOL_INF_NAN; f++)
                test_maxpool(&pools[k].p, pools[k].name, pool_shapes[s][0], pool_shapes[s][1], pool_shapes[s][2],
                             pool_shapes[s][3], (enum pool_fill)f);

    /* N, C, H, W -> OH, OW: 2x, identity, non-2x up, from 1x1, mixed, down. */
    static const int up[][6] = {{1, 3, 7, 9, 14, 18}, {3, 7, 6, 6, 6, 6},      {2, 3, 5, 3, 13, 11},
                                {3, 7, 1, 1, 7, 5},   {2, 64, 16, 16, 32, 32}, {1, 7, 7, 5, 14, 11},
                                {3, 3, 9, 7, 4, 5},   {3, 64, 13, 11, 26, 22}};
    for (size_t i = 0; i < sizeof up / sizeof up[0]; i++)
        test_upsample(up[i][0], up[i][1], up[i][2], up[i][3], up[i][4], up[i][5]);

    for (size_t i = 0; i < sizeof loss_cases / sizeof loss_cases[0]; i++)
        for (int k = LOSS_CE; k <= LOSS_DICE_IMG; k++) test_loss((loss_kind)k, &loss_cases[i]);

    test_adamw(1, 1, 1e-3, 0.9, 1e-2);
    test_adamw(7, 1, 1e-3, 0.9, 1e-2);
    test_adamw(1000003, 1, 1e-3, 0.9, 1e-2);
    test_adamw(1000, 1000, 1e-3, 0.9, 1e-2);
    test_adamw(1000003, 1000, 1e-3, 0.9, 1e-2);
    /* beta1 0.5: lerp's other form (weight >= 0.5); a large lr, no decay. */
    test_adamw(4099, 1000, 0.1, 0.5, 0);
    test_adamw_multi();

    static const size_t vec_sizes[] = {1, 7, 255, 257, 1023, 1025, 16383, 16385, 65537, 1000003, (1u << 22) + 3};
    for (size_t i = 0; i < sizeof vec_sizes / sizeof vec_sizes[0]; i++) {
        test_zero(vec_sizes[i]);
        test_sum_squares(vec_sizes[i]);
    }
    test_sum_squares_multi();
    test_scale(1, 0.5f);
    test_scale(7, -3.1f);
    test_scale(1000003, 0.37f);
    test_scale(65537, 0.0f);
    test_empty_vectors();

    test_determinism();
    test_errors();

    ts_ctx_free(&gctx);
    ts_ctx_free(&cctx);
    return tu_finish(SUITE);
}
