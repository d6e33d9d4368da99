/* Mixed precision on the CPU backend: the host conversions of
 * kernels/half.h, the convert op, every half-capable activation op on bf16
 * and fp16 tensors (channels-last), and the dtype refusals.
 *
 * The references are independent of the code under test: half values are
 * decoded and rounded here from their bit fields in double arithmetic
 * (ref_widen, ref_narrow: round to nearest, ties to even), element (n,c,h,w)
 * of a half tensor is read at ((n*H + h)*W + w)*C + c by hand, and each op's
 * result is computed naively in double on the widened inputs and rounded
 * once (a conv's bias rounded to the half type first, as autocast casts
 * it). Ops whose float32 arithmetic is exact on the inputs used here (relu,
 * add, concat, pooling, upsampling, convert) must match bit for bit; conv and
 * batch norm accumulate in float32, so their half result must be the correct
 * rounding of some value within a small multiple of float32 epsilon (times
 * the sum of the absolute terms) of the double reference: at most one half
 * ulp off, and only where the exact result sits next to a rounding boundary.
 * Accumulating ops start from non-zero gradients. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "kernels/half.h"
#include "testutil.h"

static const ts_dtype HALF_TYPES[2] = {TS_BF16, TS_F16};

/* ---- independent reference conversions ------------------------------------ */

typedef struct hfmt {
    int m;       /* stored mantissa bits */
    int bias;    /* exponent bias */
    int emin;    /* exponent of the smallest normal */
    int emax;    /* exponent of the largest finite */
    int expmask; /* all-ones exponent field */
} hfmt;

static hfmt fmt_of(ts_dtype d)
{
    if (d == TS_BF16) return (hfmt){7, 127, -126, 127, 0xff};
    return (hfmt){10, 15, -14, 15, 0x1f};
}

/* The value of a bf16 / fp16 bit pattern, from its fields. */
static double ref_widen(ts_dtype d, uint16_t h)
{
    hfmt f = fmt_of(d);
    int e = (h >> f.m) & f.expmask, mant = h & ((1 << f.m) - 1);
    double v;
    if (e == f.expmask)
        v = mant ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp(mant, f.emin - f.m);
    else
        v = ldexp((1 << f.m) + mant, e - f.bias - f.m);
    return (h & 0x8000u) ? -v : v;
}

/* v rounded to nearest, ties to even, in one step from double; overflow
 * gives infinity, NaN the canonical 0x7fff. */
static uint16_t ref_narrow(ts_dtype d, double v)
{
    if (isnan(v)) return 0x7fffu;
    hfmt f = fmt_of(d);
    uint16_t sign = signbit(v) ? 0x8000u : 0;
    uint16_t inf = (uint16_t)(sign | (f.expmask << f.m));
    double a = fabs(v);
    if (a == 0) return sign;
    if (isinf(a)) return inf;
    int k;
    frexp(a, &k);
    int E = k - 1; /* a in [2^E, 2^(E+1)) */
    if (E < f.emin) E = f.emin; /* subnormal: the quantum of the smallest normal */
    if (E > f.emax + 1) return inf;
    double q = ldexp(1.0, E - f.m);
    double n = nearbyint(a / q); /* a / q is exact; the default mode rounds half to even */
    if (n >= ldexp(1.0, f.m + 1)) {
        n = ldexp(1.0, f.m);
        E++;
    }
    if (E > f.emax) return inf;
    if (n >= ldexp(1.0, f.m)) return (uint16_t)(sign | ((E + f.bias) << f.m) | (int)(n - ldexp(1.0, f.m)));
    return (uint16_t)(sign | (int)n);
}

static float fbits(uint32_t u) { return ts_bits_f32(u); }

/* ---- half tensors in guarded buffers ---------------------------------------- */

static size_t nchw(const ts_tensor *t, int n, int c, int h, int w)
{
    return (((size_t)n * t->c + c) * t->h + h) * t->w + w;
}

/* By hand, not through the code under test: channels-last. */
static size_t nhwc(const ts_tensor *t, int n, int c, int h, int w)
{
    return (((size_t)n * t->h + h) * t->w + w) * t->c + c;
}

/* The dimensions through functions: the loop variables may be named n, c, h, w. */
static int dim_n(const ts_tensor *t) { return t->n; }
static int dim_c(const ts_tensor *t) { return t->c; }
static int dim_h(const ts_tensor *t) { return t->h; }
static int dim_w(const ts_tensor *t) { return t->w; }

#define FOR_NCHW(t, n, c, h, w)                  \
    for (int n = 0; n < dim_n(t); n++)           \
        for (int c = 0; c < dim_c(t); c++)       \
            for (int h = 0; h < dim_h(t); h++)   \
                for (int w = 0; w < dim_w(t); w++)

static ts_tensor half_tensor(ts_dtype d, int n, int c, int h, int w)
{
    size_t count = (size_t)n * c * h * w;
    return ts_tensor_view_as(tu_alloc(count * 2), d, n, c, h, w);
}

static void half_free(ts_tensor *t, const char *op, const char *name)
{
    tu_free(t->half, op, name);
    memset(t, 0, sizeof *t);
}

static double *dalloc(size_t n) { return tu_alloc(n * sizeof(double)); }

/* A random half value: 10% zeros, else sign times a log-uniform magnitude in
 * [scale 2^-6, scale 4], rounded to the type. With scale 1 every value is a
 * multiple of 2^-16 (fp16) or 2^-13 (bf16) below 2^3, so float32 sums of a
 * few of them are exact. */
static uint16_t rand_half(tu_rng *r, ts_dtype d, double scale)
{
    if (tu_randint(r, 10) == 0) return 0;
    double mag = scale * exp2(tu_uniform(r, -6.0, 2.0));
    return ref_narrow(d, tu_randint(r, 2) ? mag : -mag);
}

static void fill_half(tu_rng *r, ts_tensor *t, double scale)
{
    size_t count = ts_tensor_numel(t);
    for (size_t i = 0; i < count; i++) t->half[i] = rand_half(r, t->dtype, scale);
}

/* Values from {-1, -0.5, 0, 0.5, 1}: many ties for max pooling. */
static void fill_half_ties(tu_rng *r, ts_tensor *t)
{
    size_t count = ts_tensor_numel(t);
    for (size_t i = 0; i < count; i++) t->half[i] = ref_narrow(t->dtype, 0.5 * (tu_randint(r, 5) - 2));
}

/* The widened values of a half tensor in logical NCHW order. */
static double *widen_all(const ts_tensor *t)
{
    double *d = dalloc(ts_tensor_numel(t));
    FOR_NCHW(t, n, c, h, w) d[nchw(t, n, c, h, w)] = ref_widen(t->dtype, t->half[nhwc(t, n, c, h, w)]);
    return d;
}

/* ---- comparisons --------------------------------------------------------------- */

/* Every element of half tensor t is want (logical NCHW order) rounded once. */
static int check_exact(const char *op, const char *what, const ts_tensor *t, const double *want)
{
    size_t bad = 0;
    int fn = 0, fc = 0, fh = 0, fw = 0;
    uint16_t fg = 0, fe = 0;
    double fv = 0;
    FOR_NCHW(t, n, c, h, w)
    {
        uint16_t g = t->half[nhwc(t, n, c, h, w)], e = ref_narrow(t->dtype, want[nchw(t, n, c, h, w)]);
        if (g != e && bad++ == 0) {
            fn = n, fc = c, fh = h, fw = w, fg = g, fe = e, fv = want[nchw(t, n, c, h, w)];
        }
    }
    char sh[TS_SHAPE_STR];
    return tu_expect(bad == 0,
                     "%s %s %s: %zu of %zu elements differ; first at (n=%d,c=%d,h=%d,w=%d): got 0x%04x (%.9g), "
                     "want 0x%04x (%.9g) = round(%.17g)",
                     op, what, ts_shape_str(t, sh), bad, ts_tensor_numel(t), fn, fc, fh, fw, fg,
                     ref_widen(t->dtype, fg), fe, ref_widen(t->dtype, fe), fv);
}

/* Every element of half tensor t lies between lo and hi rounded (rounding is
 * monotonic, so t is a correct rounding of some value in [lo, hi]). */
static int check_range(const char *op, const char *what, const ts_tensor *t, const double *lo, const double *hi)
{
    size_t bad = 0, exact = 0;
    int fn = 0, fc = 0, fh = 0, fw = 0;
    uint16_t fg = 0;
    double flo = 0, fhi = 0;
    FOR_NCHW(t, n, c, h, w)
    {
        size_t i = nchw(t, n, c, h, w);
        uint16_t g = t->half[nhwc(t, n, c, h, w)];
        double gv = ref_widen(t->dtype, g);
        double a = ref_widen(t->dtype, ref_narrow(t->dtype, lo[i]));
        double b = ref_widen(t->dtype, ref_narrow(t->dtype, hi[i]));
        if (!(gv >= a && gv <= b)) {
            if (bad++ == 0) fn = n, fc = c, fh = h, fw = w, fg = g, flo = lo[i], fhi = hi[i];
        } else if (g == ref_narrow(t->dtype, 0.5 * (lo[i] + hi[i]))) {
            exact++;
        }
    }
    char sh[TS_SHAPE_STR];
    int ok = tu_expect(bad == 0,
                       "%s %s %s: %zu of %zu elements are not a rounding of the reference; first at "
                       "(n=%d,c=%d,h=%d,w=%d): got 0x%04x (%.9g), reference in [%.12g, %.12g]",
                       op, what, ts_shape_str(t, sh), bad, ts_tensor_numel(t), fn, fc, fh, fw, fg,
                       ref_widen(t->dtype, fg), flo, fhi);
    /* The float32-vs-double slack may move a few results by one ulp, not many. */
    ok &= tu_expect(exact * 10 >= ts_tensor_numel(t) * 9, "%s %s: only %zu of %zu elements equal the rounded reference",
                    op, what, exact, ts_tensor_numel(t));
    return ok;
}

/* lo, hi = want -+ rel * mag (the float32 accumulation slack). */
static void bounds(double *lo, double *hi, const double *want, const double *mag, size_t n, double rel)
{
    for (size_t i = 0; i < n; i++) {
        lo[i] = want[i] - rel * mag[i];
        hi[i] = want[i] + rel * mag[i];
    }
}

/* The slack factor of conv and batch norm: 64 float32 epsilons of the sum of
 * absolute terms, far above float32's rounding there and far below a half
 * ulp (2^-9 relative for bf16, 2^-12 for fp16). */
#define SLACK (64.0 * 5.9604644775390625e-08)

/* ---- 1. conversions ------------------------------------------------------------------ */

static void expect_bits(const char *what, ts_dtype d, float f, uint16_t want)
{
    uint16_t got = ts_f32_to_half(d, f);
    uint16_t direct = d == TS_BF16 ? ts_f32_to_bf16(f) : ts_f32_to_f16(f);
    tu_expect(got == want && direct == want, "%s %s(%.9g = 0x%08x): got 0x%04x (direct 0x%04x), want 0x%04x",
              ts_dtype_name(d), what, (double)f, ts_f32_bits(f), got, direct, want);
}

static void expect_widen(const char *what, ts_dtype d, uint16_t h, float want)
{
    float got = ts_half_to_f32(d, h);
    float direct = d == TS_BF16 ? ts_bf16_to_f32(h) : ts_f16_to_f32(h);
    tu_expect(ts_f32_bits(got) == ts_f32_bits(want) && ts_f32_bits(direct) == ts_f32_bits(want),
              "%s widen %s 0x%04x: got %.9g (0x%08x), want %.9g (0x%08x)", ts_dtype_name(d), what, h, (double)got,
              ts_f32_bits(got), (double)want, ts_f32_bits(want));
}

static void test_known_bits(void)
{
    /* bfloat16 */
    expect_bits("1.0", TS_BF16, 1.0f, 0x3f80);
    expect_bits("-2.5", TS_BF16, -2.5f, 0xc020);
    expect_bits("smallest normal 2^-126", TS_BF16, ldexpf(1.0f, -126), 0x0080);
    expect_bits("largest finite", TS_BF16, fbits(0x7f7f0000u), 0x7f7f);
    expect_bits("float max rounds to inf", TS_BF16, fbits(0x7f7fffffu), 0x7f80);
    expect_bits("just below the overflow tie", TS_BF16, fbits(0x7f7f7fffu), 0x7f7f);
    expect_bits("the overflow tie (to even: inf)", TS_BF16, fbits(0x7f7f8000u), 0x7f80);
    expect_bits("inf", TS_BF16, INFINITY, 0x7f80);
    expect_bits("-inf", TS_BF16, -INFINITY, 0xff80);
    expect_bits("1 + 2^-8 (tie, down to even)", TS_BF16, 1.0f + 0x1p-8f, 0x3f80);
    expect_bits("1 + 2^-8 + 2^-20 (above the tie)", TS_BF16, 1.0f + 0x1p-8f + 0x1p-20f, 0x3f81);
    expect_bits("1 + 2^-8 - 2^-20 (below the tie)", TS_BF16, 1.0f + 0x1p-8f - 0x1p-20f, 0x3f80);
    expect_bits("1 + 3 2^-8 (tie, up to even)", TS_BF16, 1.0f + 3 * 0x1p-8f, 0x3f82);
    expect_bits("-(1 + 3 2^-8) (tie, up to even)", TS_BF16, -(1.0f + 3 * 0x1p-8f), 0xbf82);
    expect_bits("subnormal 2^-130", TS_BF16, ldexpf(1.0f, -130), 0x0008);
    expect_bits("smallest bf16 subnormal 2^-133", TS_BF16, ldexpf(1.0f, -133), 0x0001);
    expect_bits("2^-134 (tie to even: 0)", TS_BF16, ldexpf(1.0f, -134), 0x0000);
    expect_bits("smallest float subnormal", TS_BF16, fbits(1u), 0x0000);
    expect_bits("-0.0", TS_BF16, -0.0f, 0x8000);
    expect_bits("+0.0", TS_BF16, 0.0f, 0x0000);
    expect_bits("quiet NaN", TS_BF16, NAN, 0x7fff);
    expect_bits("negative NaN", TS_BF16, -NAN, 0x7fff);
    expect_bits("signalling NaN 0x7f800001", TS_BF16, fbits(0x7f800001u), 0x7fff);
    expect_bits("NaN 0xffffffff", TS_BF16, fbits(0xffffffffu), 0x7fff);

    /* IEEE float16 */
    expect_bits("1.0", TS_F16, 1.0f, 0x3c00);
    expect_bits("-2.5", TS_F16, -2.5f, 0xc100);
    expect_bits("smallest normal 2^-14", TS_F16, 0x1p-14f, 0x0400);
    expect_bits("largest finite 65504", TS_F16, 65504.0f, 0x7bff);
    expect_bits("65519 -> 65504", TS_F16, 65519.0f, 0x7bff);
    expect_bits("65520 -> inf (tie, to even)", TS_F16, 65520.0f, 0x7c00);
    expect_bits("-65520 -> -inf", TS_F16, -65520.0f, 0xfc00);
    expect_bits("1e6 -> inf", TS_F16, 1e6f, 0x7c00);
    expect_bits("float max -> inf", TS_F16, fbits(0x7f7fffffu), 0x7c00);
    expect_bits("inf", TS_F16, INFINITY, 0x7c00);
    expect_bits("1 + 2^-11 (tie, down to even)", TS_F16, 1.0f + 0x1p-11f, 0x3c00);
    expect_bits("1 + 2^-11 + 2^-22 (above the tie)", TS_F16, 1.0f + 0x1p-11f + 0x1p-22f, 0x3c01);
    expect_bits("1 + 3 2^-11 (tie, up to even)", TS_F16, 1.0f + 3 * 0x1p-11f, 0x3c02);
    expect_bits("smallest subnormal 2^-24", TS_F16, 0x1p-24f, 0x0001);
    expect_bits("largest subnormal 1023 2^-24", TS_F16, 1023 * 0x1p-24f, 0x03ff);
    expect_bits("2^-25 (tie to even: 0)", TS_F16, 0x1p-25f, 0x0000);
    expect_bits("-2^-25 (tie to even: -0)", TS_F16, -0x1p-25f, 0x8000);
    expect_bits("2^-25 + 2^-40 (above the tie)", TS_F16, 0x1p-25f + 0x1p-40f, 0x0001);
    expect_bits("3 2^-25 (tie, up to 2 2^-24)", TS_F16, 3 * 0x1p-25f, 0x0002);
    expect_bits("5 2^-25 (tie, down to 2 2^-24)", TS_F16, 5 * 0x1p-25f, 0x0002);
    expect_bits("subnormal rounding up into the normals", TS_F16, 0x1p-14f - 0x1p-26f, 0x0400);
    expect_bits("-0.0", TS_F16, -0.0f, 0x8000);
    expect_bits("quiet NaN", TS_F16, NAN, 0x7fff);
    expect_bits("signalling NaN 0x7f800001", TS_F16, fbits(0x7f800001u), 0x7fff);

    /* Widening of known patterns. */
    expect_widen("1.0", TS_BF16, 0x3f80, 1.0f);
    expect_widen("-2.5", TS_BF16, 0xc020, -2.5f);
    expect_widen("inf", TS_BF16, 0x7f80, INFINITY);
    expect_widen("-0", TS_BF16, 0x8000, -0.0f);
    expect_widen("subnormal", TS_BF16, 0x0001, ldexpf(1.0f, -133));
    expect_widen("1.0", TS_F16, 0x3c00, 1.0f);
    expect_widen("-2.5", TS_F16, 0xc100, -2.5f);
    expect_widen("65504", TS_F16, 0x7bff, 65504.0f);
    expect_widen("inf", TS_F16, 0x7c00, INFINITY);
    expect_widen("-inf", TS_F16, 0xfc00, -INFINITY);
    expect_widen("smallest subnormal", TS_F16, 0x0001, 0x1p-24f);
    expect_widen("-0", TS_F16, 0x8000, -0.0f);
    tu_expect(isnan(ts_f16_to_f32(0x7e00)) && isnan(ts_f16_to_f32(0xfc01)) && isnan(ts_bf16_to_f32(0x7fff)) &&
                  isnan(ts_bf16_to_f32(0xff81)),
              "NaN patterns widen to NaN");
}

/* All 65536 patterns of each type: widening agrees with the bit-field
 * decoding, and narrowing the widened value gives the pattern back (NaNs
 * widen to NaN and narrow to 0x7fff). Then every halfway point between two
 * neighbours rounds to the even one, and a float just either side of it to
 * the nearer one; and 200000 random float patterns round as ref_narrow. */
static void test_all_patterns(tu_rng *r)
{
    for (int k = 0; k < 2; k++) {
        ts_dtype d = HALF_TYPES[k];
        const char *dn = ts_dtype_name(d);
        long bad_widen = 0, bad_trip = 0, bad_nan = 0, first = -1;
        for (uint32_t h = 0; h < 65536; h++) {
            float f = ts_half_to_f32(d, (uint16_t)h);
            double ref = ref_widen(d, (uint16_t)h);
            if (isnan(ref)) {
                if (!isnan(f) || ts_f32_to_half(d, f) != 0x7fff) {
                    if (first < 0) first = (long)h;
                    bad_nan++;
                }
                continue;
            }
            if (ts_f32_bits(f) != ts_f32_bits((float)ref)) {
                if (first < 0) first = (long)h;
                bad_widen++;
            }
            if (ts_f32_to_half(d, f) != h) {
                if (first < 0) first = (long)h;
                bad_trip++;
            }
        }
        tu_expect(bad_widen == 0 && bad_trip == 0 && bad_nan == 0,
                  "%s all 65536 patterns: %ld widen wrongly, %ld do not round-trip, %ld NaNs mishandled (first 0x%04lx)",
                  dn, bad_widen, bad_trip, bad_nan, first);

        long bad_tie = 0, bad_near = 0;
        first = -1;
        for (uint32_t h = 0; h < 65536; h++) {
            uint16_t a = (uint16_t)h, b = (uint16_t)(h + 1); /* the next larger magnitude */
            if ((a & 0x7fff) == 0x7fff) continue;
            double va = ref_widen(d, a), vb = ref_widen(d, b);
            if (!isfinite(va) || !isfinite(vb)) continue;
            double mid = 0.5 * (va + vb);
            float fm = (float)mid; /* exact: a half midpoint needs a few more bits only */
            if ((double)fm != mid) continue;
            uint16_t even = (a & 1) ? b : a;
            if (ts_f32_to_half(d, fm) != even) {
                if (first < 0) first = (long)h;
                bad_tie++;
            }
            float below = nextafterf(fm, 0.0f), above = nextafterf(fm, fm > 0 ? INFINITY : -INFINITY);
            if (fm != 0 && (ts_f32_to_half(d, below) != a || ts_f32_to_half(d, above) != b)) {
                if (first < 0) first = (long)h;
                bad_near++;
            }
        }
        tu_expect(bad_tie == 0 && bad_near == 0,
                  "%s halfway points: %ld ties not rounded to even, %ld neighbours of a tie rounded wrongly (first "
                  "pattern 0x%04lx)",
                  dn, bad_tie, bad_near, first);

        long bad_rand = 0;
        uint32_t fb = 0;
        for (int i = 0; i < 200000; i++) {
            uint32_t u = (uint32_t)tu_next(r);
            if (i & 1) u = (u & 0x83ffffffu) | ((uint32_t)(100 + tu_randint(r, 60)) << 23); /* near the half range */
            float f = fbits(u);
            if (ts_f32_to_half(d, f) != ref_narrow(d, f)) {
                if (!bad_rand) fb = u;
                bad_rand++;
            }
        }
        tu_expect(bad_rand == 0, "%s 2e5 random floats: %ld round differently from the reference (first 0x%08x)", dn,
                  bad_rand, fb);
    }
}

/* ---- 2. the convert op ---------------------------------------------------------------- */

static void test_convert(ts_ctx *ctx, tu_rng *r)
{
    const ts_backend *B = ts_backend_cpu();
    const char *op = "convert";
    const int N = 2, C = 5, H = 3, W = 7;
    const size_t count = (size_t)N * C * H * W;
    /* Random floats plus the special values of each type. */
    ts_tensor x = tu_tensor(N, C, H, W);
    tu_fill(r, x.data, count, -3.0, 3.0);
    for (size_t i = 0; i < count; i += 5) x.data[i] *= (float)exp2(tu_uniform(r, -30.0, 20.0));
    const float special[] = {NAN, INFINITY, -INFINITY, -0.0f, 70000.0f, -1e-8f, 65519.0f, 65520.0f,
                             fbits(0x7f7fffffu), 1.0f + 0x1p-8f, 1.0f + 0x1p-11f, 3 * 0x1p-25f};
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++) x.data[7 + 13 * i] = special[i];

    for (int k = 0; k < 2; k++) {
        ts_dtype d = HALF_TYPES[k];
        char what[64];
        snprintf(what, sizeof what, "f32 -> %s", ts_dtype_name(d));
        ts_tensor y = half_tensor(d, N, C, H, W);
        tu_expect_ok(B->convert(ctx, &y, &x, 0), what);
        /* The naive index loop: element (n,c,h,w) at ((n*H+h)*W+w)*C+c. */
        long bad = 0;
        for (int n = 0; n < N; n++)
            for (int c = 0; c < C; c++)
                for (int h = 0; h < H; h++)
                    for (int w = 0; w < W; w++) {
                        float v = x.data[((n * C + c) * H + h) * W + w];
                        if (y.half[((n * H + h) * W + w) * C + c] != ref_narrow(d, v)) bad++;
                    }
        tu_expect(bad == 0, "%s %s: %ld of %zu elements misplaced or misrounded", op, what, bad, count);

        /* Back to float32 NCHW: exact widening. */
        snprintf(what, sizeof what, "%s -> f32", ts_dtype_name(d));
        ts_tensor back = tu_tensor(N, C, H, W);
        tu_expect_ok(B->convert(ctx, &back, &y, 0), what);
        bad = 0;
        FOR_NCHW(&x, n, c, h, w)
        {
            double want = ref_widen(d, y.half[nhwc(&y, n, c, h, w)]);
            float got = back.data[nchw(&x, n, c, h, w)];
            if (!(isnan(want) ? isnan(got) : ts_f32_bits(got) == ts_f32_bits((float)want))) bad++;
        }
        tu_expect(bad == 0, "%s %s: %ld of %zu elements wrong", op, what, bad, count);

        /* f32 -> half accumulate: y += x in float32, one rounding. */
        snprintf(what, sizeof what, "f32 -> %s accumulate", ts_dtype_name(d));
        ts_tensor acc = half_tensor(d, N, C, H, W);
        fill_half(r, &acc, 1.0);
        double *want = dalloc(count);
        FOR_NCHW(&x, n, c, h, w)
        {
            float s = (float)ref_widen(d, acc.half[nhwc(&acc, n, c, h, w)]) + x.data[nchw(&x, n, c, h, w)];
            want[nchw(&x, n, c, h, w)] = s;
        }
        tu_expect_ok(B->convert(ctx, &acc, &x, 1), what);
        check_exact(op, what, &acc, want);

        /* One rounding, not two: y = 1, x = u + u 2^-8 with u the ulp... */
        ts_tensor y1 = half_tensor(d, 1, 1, 1, 1), x1 = tu_tensor(1, 1, 1, 1);
        float u = d == TS_BF16 ? 0x1p-7f : 0x1p-10f; /* the ulp of 1 */
        /* x is half an ulp plus a bit: rounded alone it is a tie of its own
         * and goes to the even half ulp, and 1 + u/2 is then a tie that goes
         * back to 1; the float sum rounds once, up to 1 + u. */
        x1.data[0] = 0.5f * u + 0.5f * u * (d == TS_BF16 ? 0x1p-8f : 0x1p-11f);
        tu_expect(ts_f32_to_half(d, (float)ref_widen(d, ts_f32_to_half(d, x1.data[0])) + 1.0f) ==
                      ts_f32_to_half(d, 1.0f),
                  "%s accumulate case: two roundings would give 1", ts_dtype_name(d));
        y1.half[0] = ts_f32_to_half(d, 1.0f);
        tu_expect_ok(B->convert(ctx, &y1, &x1, 1), "accumulate one rounding");
        tu_expect(y1.half[0] == ts_f32_to_half(d, 1.0f + u), "%s accumulate 1 + (u/2 + tiny): got 0x%04x, want 0x%04x",
                  ts_dtype_name(d), y1.half[0], ts_f32_to_half(d, 1.0f + u));

        /* half -> f32 accumulate (half weight gradients into the float32 ones). */
        snprintf(what, sizeof what, "%s -> f32 accumulate", ts_dtype_name(d));
        ts_tensor fa = tu_tensor(N, C, H, W);
        tu_fill(r, fa.data, count, -1.0, 1.0);
        fill_half(r, &acc, 1.0);
        double *wantf = dalloc(count);
        FOR_NCHW(&x, n, c, h, w)
        wantf[nchw(&x, n, c, h, w)] =
            (float)(fa.data[nchw(&x, n, c, h, w)] + (float)ref_widen(d, acc.half[nhwc(&acc, n, c, h, w)]));
        tu_expect_ok(B->convert(ctx, &fa, &acc, 1), what);
        tu_check_close(op, what, &fa, fa.data, wantf, count, 1e-30, 0.0);

        /* In place: y == x, one dtype, accumulate 1 doubles every element
         * (40000 overflows fp16 to inf); accumulate 0 leaves it as it is. */
        snprintf(what, sizeof what, "%s in-place doubling", ts_dtype_name(d));
        fill_half(r, &acc, 1.0);
        acc.half[3] = ref_narrow(d, 40000.0);
        double *orig = widen_all(&acc);
        for (size_t i = 0; i < count; i++) want[i] = 2.0 * orig[i];
        tu_expect_ok(B->convert(ctx, &acc, &acc, 1), what);
        check_exact(op, what, &acc, want);
        tu_expect(d != TS_F16 || acc.half[3] == 0x7c00, "fp16 doubling of 40000 gives inf, got 0x%04x", acc.half[3]);
        snprintf(what, sizeof what, "%s in-place copy", ts_dtype_name(d));
        tu_expect_ok(B->convert(ctx, &acc, &acc, 0), what);
        check_exact(op, what, &acc, want);

        tu_free(want, op, "want");
        tu_free(wantf, op, "wantf");
        tu_free(orig, op, "orig");
        half_free(&y, op, "y");
        half_free(&acc, op, "acc");
        half_free(&y1, op, "y1");
        tu_tensor_free(&x1, op, "x1");
        tu_tensor_free(&back, op, "back");
        tu_tensor_free(&fa, op, "fa");
    }

    /* half <-> half: bf16 -> fp16 (out of fp16's range gives inf, tiny values
     * fp16 subnormals or 0) and fp16 -> bf16; widen, round once. */
    for (int k = 0; k < 2; k++) {
        ts_dtype from = HALF_TYPES[k], to = HALF_TYPES[1 - k];
        char what[64];
        snprintf(what, sizeof what, "%s -> %s", ts_dtype_name(from), ts_dtype_name(to));
        ts_tensor hx = half_tensor(from, N, C, H, W), hy = half_tensor(to, N, C, H, W);
        for (size_t i = 0; i < count; i++) {
            double v = tu_uniform(r, -1, 1) * exp2(tu_uniform(r, from == TS_BF16 ? -30.0 : -24.0, 18.0));
            hx.half[i] = ref_narrow(from, v);
        }
        hx.half[0] = ref_narrow(from, NAN);
        hx.half[1] = from == TS_BF16 ? 0x4780 /* 65536 */ : 0x7bff;
        double *want = widen_all(&hx);
        tu_expect_ok(B->convert(ctx, &hy, &hx, 0), what);
        check_exact(op, what, &hy, want);
        /* Accumulating across half types: float sum, one rounding. */
        snprintf(what, sizeof what, "%s -> %s accumulate", ts_dtype_name(from), ts_dtype_name(to));
        fill_half(r, &hy, 1.0);
        fill_half(r, &hx, 1.0);
        double *wx = widen_all(&hx), *wy = widen_all(&hy);
        for (size_t i = 0; i < count; i++) want[i] = (float)wy[i] + (float)wx[i];
        tu_expect_ok(B->convert(ctx, &hy, &hx, 1), what);
        check_exact(op, what, &hy, want);
        tu_free(want, op, "want");
        tu_free(wx, op, "wx");
        tu_free(wy, op, "wy");
        half_free(&hx, op, "hx");
        half_free(&hy, op, "hy");
    }

    /* f32 -> f32: a copy (bits, NaN payloads included), and y += x. */
    {
        ts_tensor y = tu_tensor(N, C, H, W);
        tu_expect_ok(B->convert(ctx, &y, &x, 0), "f32 -> f32 copy");
        tu_expect(memcmp(y.data, x.data, count * sizeof(float)) == 0, "convert f32 -> f32 copies the bits");
        ts_tensor a = tu_tensor(N, C, H, W), b = tu_tensor(N, C, H, W);
        tu_fill(r, a.data, count, -1, 1);
        tu_fill(r, b.data, count, -1, 1);
        double *want = dalloc(count);
        for (size_t i = 0; i < count; i++) want[i] = a.data[i] + b.data[i];
        tu_expect_ok(B->convert(ctx, &a, &b, 1), "f32 -> f32 accumulate");
        tu_check_close(op, "f32 += f32", &a, a.data, want, count, 1e-30, 0.0);
        tu_free(want, op, "want");
        tu_tensor_free(&y, op, "y");
        tu_tensor_free(&a, op, "a");
        tu_tensor_free(&b, op, "b");
    }

    /* Errors. */
    {
        ts_tensor hb = half_tensor(TS_BF16, N, C, H, W), bad = half_tensor(TS_BF16, N, C, H, W + 1);
        tu_expect_error(B->convert(ctx, &bad, &x, 0), TS_ERR_INVALID_ARG, "convert shape mismatch", "convert",
                        "[2,5,3,8] bf16 NHWC", "[2,5,3,7]", "does not match", (char *)NULL);
        /* A bf16 view of x's own memory: different layouts, so overlap is refused. */
        ts_tensor alias = ts_tensor_view_as(x.data, TS_BF16, N, C, H, W);
        tu_expect_error(B->convert(ctx, &alias, &x, 0), TS_ERR_INVALID_ARG, "convert f32 -> bf16 over itself",
                        "convert", "overlap", (char *)NULL);
        ts_tensor shifted = ts_tensor_view(x.data + 3, 1, 1, 2, 5), head = ts_tensor_view(x.data, 1, 1, 2, 5);
        tu_expect_error(B->convert(ctx, &shifted, &head, 0), TS_ERR_INVALID_ARG, "convert f32 partial overlap",
                        "convert", "overlap", (char *)NULL);
        ts_tensor hshift = ts_tensor_view_as(hb.half + 1, TS_BF16, 1, 1, 2, 5),
                  hhead = ts_tensor_view_as(hb.half, TS_BF16, 1, 1, 2, 5);
        tu_expect_error(B->convert(ctx, &hshift, &hhead, 1), TS_ERR_INVALID_ARG, "convert bf16 partial overlap",
                        "convert", "overlap", (char *)NULL);
        tu_expect_error(B->convert(ctx, NULL, &x, 0), TS_ERR_INVALID_ARG, "convert NULL y", "convert", "non-NULL",
                        (char *)NULL);
        tu_expect_error(B->convert(ctx, &hb, NULL, 0), TS_ERR_INVALID_ARG, "convert NULL x", "convert", "non-NULL",
                        (char *)NULL);
        ts_tensor nodata = ts_tensor_view_as(NULL, TS_BF16, N, C, H, W);
        tu_expect_error(B->convert(ctx, &nodata, &x, 0), TS_ERR_INVALID_ARG, "convert y without data", "convert",
                        (char *)NULL);
        ts_tensor i64 = ts_tensor_view_as(hb.half, TS_I64, 1, 1, 1, 4);
        ts_tensor small = tu_tensor(1, 1, 1, 4);
        tu_expect_error(B->convert(ctx, &i64, &small, 0), TS_ERR_INVALID_ARG, "convert to i64", "convert",
                        "unknown dtype", (char *)NULL);
        tu_expect_error(B->convert(ctx, &small, &i64, 0), TS_ERR_INVALID_ARG, "convert from i64", "convert",
                        "unknown dtype", (char *)NULL);
        ts_tensor bogus = ts_tensor_view_as(hb.half, (ts_dtype)99, 1, 1, 1, 4);
        tu_expect_error(B->convert(ctx, &small, &bogus, 0), TS_ERR_INVALID_ARG, "convert from dtype 99", "convert",
                        "unknown dtype", (char *)NULL);
        tu_tensor_free(&small, op, "small");
        half_free(&hb, op, "hb");
        half_free(&bad, op, "bad");
    }
    tu_tensor_free(&x, op, "x");
}

/* ---- 3. the activation ops on half tensors ------------------------------------------- */

static void test_relu_add(ts_ctx *ctx, tu_rng *r, ts_dtype d, int N, int C, int H, int W)
{
    const ts_backend *B = ts_backend_cpu();
    char op[64];
    snprintf(op, sizeof op, "%s relu/add", ts_dtype_name(d));
    const size_t count = (size_t)N * C * H * W;
    ts_tensor x = half_tensor(d, N, C, H, W), y = half_tensor(d, N, C, H, W);
    fill_half(r, &x, 1.0);
    /* NaN propagates (as the canonical NaN), infinities are kept or zeroed. */
    x.half[1] = d == TS_BF16 ? 0x7fc1 : 0x7e01;
    x.half[2] = ref_narrow(d, INFINITY);
    x.half[3] = ref_narrow(d, -INFINITY);
    double *wx = widen_all(&x), *want = dalloc(count);
    for (size_t i = 0; i < count; i++) want[i] = (wx[i] > 0 || isnan(wx[i])) ? wx[i] : 0.0;
    tu_expect_ok(B->relu_forward(ctx, &y, &x), "half relu_forward");
    check_exact(op, "relu_forward", &y, want);
    tu_expect_ok(B->relu_forward(ctx, &x, &x), "half relu_forward in place");
    check_exact(op, "relu_forward in place", &x, want);

    /* relu_backward: dx (non-zero) += dy where y > 0, one rounding. */
    fill_half(r, &x, 1.0);
    tu_free(wx, op, "wx");
    wx = widen_all(&x);
    for (size_t i = 0; i < count; i++) want[i] = wx[i] > 0 ? wx[i] : 0.0;
    tu_expect_ok(B->relu_forward(ctx, &y, &x), "half relu_forward");
    ts_tensor dy = half_tensor(d, N, C, H, W), dx = half_tensor(d, N, C, H, W);
    fill_half(r, &dy, 1.0);
    fill_half(r, &dx, 1.0);
    double *wdy = widen_all(&dy), *wdx = widen_all(&dx), *wy = widen_all(&y);
    for (size_t i = 0; i < count; i++) want[i] = wdx[i] + (wy[i] > 0 ? wdy[i] : 0.0);
    tu_expect_ok(B->relu_backward(ctx, &dx, &dy, &y), "half relu_backward");
    check_exact(op, "relu_backward", &dx, want);

    /* add_forward, then with y aliasing a. */
    ts_tensor a = half_tensor(d, N, C, H, W), b = half_tensor(d, N, C, H, W);
    fill_half(r, &a, 1.0);
    fill_half(r, &b, 1.0);
    double *wa = widen_all(&a), *wb = widen_all(&b);
    for (size_t i = 0; i < count; i++) want[i] = wa[i] + wb[i];
    tu_expect_ok(B->add_forward(ctx, &y, &a, &b), "half add_forward");
    check_exact(op, "add_forward", &y, want);
    tu_expect_ok(B->add_forward(ctx, &a, &a, &b), "half add_forward y == a");
    check_exact(op, "add_forward y == a", &a, want);

    /* add_backward into two tensors, then into one (da == db: 2 dy, one rounding). */
    fill_half(r, &a, 1.0);
    fill_half(r, &b, 1.0);
    tu_free(wa, op, "wa");
    tu_free(wb, op, "wb");
    wa = widen_all(&a);
    wb = widen_all(&b);
    double *want2 = dalloc(count);
    for (size_t i = 0; i < count; i++) {
        want[i] = wa[i] + wdy[i];
        want2[i] = wb[i] + wdy[i];
    }
    tu_expect_ok(B->add_backward(ctx, &a, &b, &dy), "half add_backward");
    check_exact(op, "add_backward da", &a, want);
    check_exact(op, "add_backward db", &b, want2);
    fill_half(r, &a, 1.0);
    tu_free(wa, op, "wa");
    wa = widen_all(&a);
    for (size_t i = 0; i < count; i++) want[i] = wa[i] + 2.0 * wdy[i];
    tu_expect_ok(B->add_backward(ctx, &a, &a, &dy), "half add_backward da == db");
    check_exact(op, "add_backward da == db", &a, want);

    /* The aliasing refusals hold on half tensors too. */
    tu_expect_error(B->relu_backward(ctx, &dy, &dy, &y), TS_ERR_INVALID_ARG, "half relu_backward dx == dy",
                    "relu_backward", "alias", (char *)NULL);
    tu_expect_error(B->add_backward(ctx, &dy, &a, &dy), TS_ERR_INVALID_ARG, "half add_backward da == dy",
                    "add_backward", "alias", (char *)NULL);

    tu_free(wx, op, "wx");
    tu_free(want, op, "want");
    tu_free(want2, op, "want2");
    tu_free(wdy, op, "wdy");
    tu_free(wdx, op, "wdx");
    tu_free(wy, op, "wy");
    tu_free(wa, op, "wa");
    tu_free(wb, op, "wb");
    half_free(&x, op, "x");
    half_free(&y, op, "y");
    half_free(&dy, op, "dy");
    half_free(&dx, op, "dx");
    half_free(&a, op, "a");
    half_free(&b, op, "b");
}

static void test_concat(ts_ctx *ctx, tu_rng *r, ts_dtype d, int N, int Ca, int Cb, int H, int W)
{
    const ts_backend *B = ts_backend_cpu();
    char op[64];
    snprintf(op, sizeof op, "%s concat", ts_dtype_name(d));
    const int Cy = Ca + Cb;
    ts_tensor a = half_tensor(d, N, Ca, H, W), b = half_tensor(d, N, Cb, H, W), y = half_tensor(d, N, Cy, H, W);
    fill_half(r, &a, 1.0);
    fill_half(r, &b, 1.0);
    tu_expect_ok(B->concat_forward(ctx, &y, &a, &b), "half concat_forward");
    /* The channels-last interleave by hand: per pixel, a's Ca values then b's Cb. */
    uint16_t *ref = tu_alloc((size_t)N * Cy * H * W * 2);
    for (int n = 0; n < N; n++)
        for (int h = 0; h < H; h++)
            for (int w = 0; w < W; w++) {
                size_t pix = ((size_t)n * H + h) * W + w;
                for (int c = 0; c < Ca; c++) ref[pix * Cy + c] = a.half[pix * Ca + c];
                for (int c = 0; c < Cb; c++) ref[pix * Cy + Ca + c] = b.half[pix * Cb + c];
            }
    tu_expect(memcmp(ref, y.half, (size_t)N * Cy * H * W * 2) == 0, "%s forward: y is not a's and b's channels "
              "interleaved per pixel", op);
    tu_free(ref, op, "ref");

    /* Backward: da += dy[:, :Ca], db += dy[:, Ca:], from non-zero gradients. */
    ts_tensor dy = half_tensor(d, N, Cy, H, W);
    fill_half(r, &dy, 1.0);
    fill_half(r, &a, 1.0);
    fill_half(r, &b, 1.0);
    double *wa = widen_all(&a), *wb = widen_all(&b), *wdy = widen_all(&dy);
    FOR_NCHW(&a, n, c, h, w) wa[nchw(&a, n, c, h, w)] += wdy[nchw(&dy, n, c, h, w)];
    FOR_NCHW(&b, n, c, h, w) wb[nchw(&b, n, c, h, w)] += wdy[nchw(&dy, n, Ca + c, h, w)];
    tu_expect_ok(B->concat_backward(ctx, &a, &b, &dy), "half concat_backward");
    check_exact(op, "backward da", &a, wa);
    check_exact(op, "backward db", &b, wb);
    tu_free(wa, op, "wa");
    tu_free(wb, op, "wb");
    tu_free(wdy, op, "wdy");
    half_free(&a, op, "a");
    half_free(&b, op, "b");
    half_free(&y, op, "y");
    half_free(&dy, op, "dy");
}

static void test_maxpool(ts_ctx *ctx, tu_rng *r, ts_dtype d, int N, int C, int H, int W, int k, int s, int pad)
{
    const ts_backend *B = ts_backend_cpu();
    char op[96];
    snprintf(op, sizeof op, "%s maxpool k%d s%d p%d [%d,%d,%d,%d]", ts_dtype_name(d), k, s, pad, N, C, H, W);
    ts_pool2d_params p = {k, k, s, s, pad, pad};
    const int OH = ts_conv_out_size(H, k, s, pad), OW = ts_conv_out_size(W, k, s, pad);
    ts_tensor x = half_tensor(d, N, C, H, W), y = half_tensor(d, N, C, OH, OW);
    fill_half_ties(r, &x);
    const size_t ny = (size_t)N * C * OH * OW;
    int32_t *idx = tu_alloc_i32(ny), *idx_f = tu_alloc_i32(ny), *idx_ref = tu_alloc_i32(ny);
    tu_expect_ok(B->maxpool2d_forward(ctx, &y, idx, &x, &p), op);

    /* The float32 op on the widened input, and a naive first-max scan. */
    double *wx = widen_all(&x);
    ts_tensor fx = tu_tensor(N, C, H, W), fy = tu_tensor(N, C, OH, OW);
    for (size_t i = 0; i < ts_tensor_numel(&fx); i++) fx.data[i] = (float)wx[i];
    tu_expect_ok(B->maxpool2d_forward(ctx, &fy, idx_f, &fx, &p), "f32 maxpool on the widened input");
    double *want = dalloc(ny);
    FOR_NCHW(&y, n, c, oh, ow)
    {
        double best = -INFINITY;
        int bi = -1;
        for (int i = 0; i < k; i++)
            for (int j = 0; j < k; j++) {
                int ih = oh * s - pad + i, iw = ow * s - pad + j;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                double v = wx[nchw(&x, n, c, ih, iw)];
                if (bi < 0 || v > best) best = v, bi = ih * W + iw;
            }
        want[nchw(&y, n, c, oh, ow)] = best;
        idx_ref[nchw(&y, n, c, oh, ow)] = bi;
    }
    check_exact(op, "forward y", &y, want);
    tu_check_equal_i32(op, "indices vs the f32 op", idx, idx_f, ny);
    tu_check_equal_i32(op, "indices vs the naive first max", idx, idx_ref, ny);

    /* Backward: dx (non-zero) += dy at the arg-max, overlapping windows add up. */
    ts_tensor dy = half_tensor(d, N, C, OH, OW), dx = half_tensor(d, N, C, H, W);
    fill_half(r, &dy, 1.0);
    fill_half(r, &dx, 1.0);
    double *wdx = widen_all(&dx), *wdy = widen_all(&dy);
    FOR_NCHW(&y, n, c, oh, ow)
    {
        int q = idx_ref[nchw(&y, n, c, oh, ow)];
        wdx[nchw(&dx, n, c, q / W, q % W)] += wdy[nchw(&dy, n, c, oh, ow)];
    }
    tu_expect_ok(B->maxpool2d_backward(ctx, &dx, &dy, idx, &p), op);
    check_exact(op, "backward dx", &dx, wdx);

    tu_free(idx, op, "idx");
    tu_free(idx_f, op, "idx_f");
    tu_free(idx_ref, op, "idx_ref");
    tu_free(wx, op, "wx");
    tu_free(want, op, "want");
    tu_free(wdx, op, "wdx");
    tu_free(wdy, op, "wdy");
    tu_tensor_free(&fx, op, "fx");
    tu_tensor_free(&fy, op, "fy");
    half_free(&x, op, "x");
    half_free(&y, op, "y");
    half_free(&dy, op, "dy");
    half_free(&dx, op, "dx");
}

/* PyTorch's nearest index, written from its documented rule. */
static int nearest_src(int dst, int in, int out)
{
    if (out == in) return dst;
    if (out == 2 * in) return dst >> 1;
    float s = (float)in / (float)out;
    int v = (int)floorf((float)dst * s);
    return v < in - 1 ? v : in - 1;
}

static void test_upsample(ts_ctx *ctx, tu_rng *r, ts_dtype d, int N, int C, int H, int W, int OH, int OW)
{
    const ts_backend *B = ts_backend_cpu();
    char op[96];
    snprintf(op, sizeof op, "%s upsample %dx%d -> %dx%d", ts_dtype_name(d), H, W, OH, OW);
    ts_tensor x = half_tensor(d, N, C, H, W), y = half_tensor(d, N, C, OH, OW);
    fill_half(r, &x, 1.0);
    double *wx = widen_all(&x), *want = dalloc(ts_tensor_numel(&y));
    FOR_NCHW(&y, n, c, h, w) want[nchw(&y, n, c, h, w)] = wx[nchw(&x, n, c, nearest_src(h, H, OH), nearest_src(w, W, OW))];
    tu_expect_ok(B->upsample_nearest_forward(ctx, &y, &x), op);
    check_exact(op, "forward", &y, want);

    ts_tensor dy = half_tensor(d, N, C, OH, OW), dx = half_tensor(d, N, C, H, W);
    fill_half(r, &dy, 1.0);
    fill_half(r, &dx, 1.0);
    double *wdx = widen_all(&dx), *wdy = widen_all(&dy);
    FOR_NCHW(&y, n, c, h, w) wdx[nchw(&x, n, c, nearest_src(h, H, OH), nearest_src(w, W, OW))] += wdy[nchw(&y, n, c, h, w)];
    tu_expect_ok(B->upsample_nearest_backward(ctx, &dx, &dy), op);
    check_exact(op, "backward", &dx, wdx);
    tu_free(wx, op, "wx");
    tu_free(want, op, "want");
    tu_free(wdx, op, "wdx");
    tu_free(wdy, op, "wdy");
    half_free(&x, op, "x");
    half_free(&y, op, "y");
    half_free(&dy, op, "dy");
    half_free(&dx, op, "dx");
}

typedef struct conv_case {
    int N, Cin, H, W, Cout, KH, KW, sh, sw, ph, pw, relu, add; /* add: the fused add (forward only) */
} conv_case;

/* The half bias rule, targeted: a bias b = 1 + 0.4 ulp (ulp = the spacing
 * of the half type at 1) rounds to 1, and the conv adds 0.25 ulp (x = 1,
 * w = ulp / 4, both exact). With the bias rounded first the sum is
 * 1 + 0.25 ulp, which rounds to 1; with the float32 bias it would be
 * 1 + 0.65 ulp, which rounds to 1 + ulp. With and without the ReLU, and a
 * negative twin without it (-1 - 0.4 ulp and -0.25 ulp: -1). */
static void test_conv_half_bias(ts_ctx *ctx, ts_dtype d)
{
    const ts_backend *B = ts_backend_cpu();
    char op[96];
    snprintf(op, sizeof op, "%s conv half bias", ts_dtype_name(d));
    const double ulp = d == TS_BF16 ? 0x1p-7 : 0x1p-10;
    for (int k = 0; k < 3; k++) {
        const int relu = k == 1, neg = k == 2;
        const double sign = neg ? -1.0 : 1.0;
        ts_tensor x = half_tensor(d, 1, 1, 1, 1), w = half_tensor(d, 1, 1, 1, 1), y = half_tensor(d, 1, 1, 1, 1);
        x.half[0] = ref_narrow(d, 1.0);
        w.half[0] = ref_narrow(d, sign * 0.25 * ulp);
        float *bias = tu_alloc_f(1);
        bias[0] = (float)(sign * (1.0 + 0.4 * ulp));
        tu_expect(ref_narrow(d, bias[0]) == ref_narrow(d, sign) && ref_widen(d, w.half[0]) == sign * 0.25 * ulp,
                  "%s: the inputs are what the test means (bias rounds to %g, w exact)", op, sign);
        ts_conv2d_params p = {.stride_h = 1, .stride_w = 1, .relu = relu};
        tu_expect_ok(B->conv2d_forward(ctx, &y, &x, &w, bias, &p), op);
        const uint16_t want = ref_narrow(d, sign), unrounded = ref_narrow(d, sign * (1.0 + ulp));
        tu_expect(y.half[0] == want,
                  "%s%s%s: y = 0x%04x (%.9g), want 0x%04x (%.9g: the bias rounded to %s first); 0x%04x would be "
                  "the float32 bias",
                  op, relu ? " relu" : "", neg ? " negative" : "", y.half[0], ref_widen(d, y.half[0]), want,
                  ref_widen(d, want), ts_dtype_name(d), unrounded);
        tu_free(bias, op, "bias");
        half_free(&x, op, "x");
        half_free(&w, op, "w");
        half_free(&y, op, "y");
    }
}

/* The fused add, targeted: y is rounded once, after the add. The conv
 * gives 1 + a with a = ~0.3 ulp (x = [1, 1], w = [1, a], exact in float32)
 * and the add is ~0.3 ulp more: rounded once, 1 + ~0.6 ulp is 1 + ulp;
 * rounding the conv first (1) and then the sum (1 + 0.3 ulp) gives 1. With
 * and without the ReLU. */
static void test_conv_half_add(ts_ctx *ctx, ts_dtype d)
{
    const ts_backend *B = ts_backend_cpu();
    char op[96];
    snprintf(op, sizeof op, "%s conv fused add", ts_dtype_name(d));
    const double ulp = d == TS_BF16 ? 0x1p-7 : 0x1p-10;
    for (int relu = 0; relu <= 1; relu++) {
        ts_tensor x = half_tensor(d, 1, 2, 1, 1), w = half_tensor(d, 1, 2, 1, 1), y = half_tensor(d, 1, 1, 1, 1),
                  z = half_tensor(d, 1, 1, 1, 1);
        x.half[0] = x.half[1] = ref_narrow(d, 1.0);
        w.half[0] = ref_narrow(d, 1.0);
        w.half[1] = ref_narrow(d, 0.3 * ulp);
        z.half[0] = ref_narrow(d, 0.3 * ulp);
        const double a = ref_widen(d, w.half[1]), b = ref_widen(d, z.half[0]);
        tu_expect(a > 0.25 * ulp && a < 0.5 * ulp && a + b > 0.5 * ulp && a + b < ulp,
                  "%s: the inputs are what the test means (%g and %g ulp)", op, a / ulp, b / ulp);
        ts_conv2d_params p = {.stride_h = 1, .stride_w = 1, .relu = relu, .add = &z};
        tu_expect_ok(B->conv2d_forward(ctx, &y, &x, &w, NULL, &p), op);
        const uint16_t want = ref_narrow(d, 1.0 + ulp);
        tu_expect(y.half[0] == want, "%s%s: y = 0x%04x (%.9g), want 0x%04x (%.9g: rounded once, after the add)", op,
                  relu ? " relu" : "", y.half[0], ref_widen(d, y.half[0]), want, ref_widen(d, want));
        half_free(&x, op, "x");
        half_free(&w, op, "w");
        half_free(&y, op, "y");
        half_free(&z, op, "z");
    }
}

static void test_conv(ts_ctx *ctx, tu_rng *r, ts_dtype d, const conv_case *cc)
{
    const ts_backend *B = ts_backend_cpu();
    char op[128];
    snprintf(op, sizeof op, "%s conv x[%d,%d,%d,%d] w[%d,%d,%d,%d] s(%d,%d) p(%d,%d)%s%s", ts_dtype_name(d), cc->N,
             cc->Cin, cc->H, cc->W, cc->Cout, cc->Cin, cc->KH, cc->KW, cc->sh, cc->sw, cc->ph, cc->pw,
             cc->add ? " add" : "", cc->relu ? " relu" : "");
    ts_conv2d_params p = {.stride_h = cc->sh, .stride_w = cc->sw, .pad_h = cc->ph, .pad_w = cc->pw, .relu = cc->relu};
    const int OH = ts_conv_out_size(cc->H, cc->KH, cc->sh, cc->ph), OW = ts_conv_out_size(cc->W, cc->KW, cc->sw, cc->pw);
    ts_tensor x = half_tensor(d, cc->N, cc->Cin, cc->H, cc->W), w = half_tensor(d, cc->Cout, cc->Cin, cc->KH, cc->KW);
    ts_tensor y = half_tensor(d, cc->N, cc->Cout, OH, OW);
    fill_half(r, &x, 1.0);
    fill_half(r, &w, 0.25);
    float *bias = tu_alloc_f((size_t)cc->Cout);
    tu_fill(r, bias, (size_t)cc->Cout, -1.0, 1.0);
    double *wx = widen_all(&x), *ww = widen_all(&w);
    const size_t ny = ts_tensor_numel(&y), nx = ts_tensor_numel(&x), nw = ts_tensor_numel(&w);
    /* The fused add: a tensor of y's shape and type, in the same sum. */
    ts_tensor z = half_tensor(d, cc->add ? cc->N : 1, cc->add ? cc->Cout : 1, cc->add ? OH : 1, cc->add ? OW : 1);
    fill_half(r, &z, 1.0);
    double *wz = widen_all(&z);
    if (cc->add) p.add = &z;

    /* Forward: the sum in double, its absolute terms for the slack. The
     * bias enters rounded to the half type (autocast's half bias). */
    double *s = dalloc(ny), *mag = dalloc(ny), *lo = dalloc(ny), *hi = dalloc(ny);
    FOR_NCHW(&y, n, o, oh, ow)
    {
        const double hb = ref_widen(d, ref_narrow(d, bias[o]));
        const double zv = cc->add ? wz[nchw(&y, n, o, oh, ow)] : 0.0;
        double acc = hb + zv, m = fabs(hb) + fabs(zv);
        for (int c = 0; c < cc->Cin; c++)
            for (int i = 0; i < cc->KH; i++)
                for (int j = 0; j < cc->KW; j++) {
                    int ih = oh * cc->sh - cc->ph + i, iw = ow * cc->sw - cc->pw + j;
                    if (ih < 0 || ih >= cc->H || iw < 0 || iw >= cc->W) continue;
                    double t = wx[nchw(&x, n, c, ih, iw)] * ww[nchw(&w, o, c, i, j)];
                    acc += t;
                    m += fabs(t);
                }
        s[nchw(&y, n, o, oh, ow)] = acc;
        mag[nchw(&y, n, o, oh, ow)] = m;
    }
    bounds(lo, hi, s, mag, ny, SLACK);
    if (cc->relu)
        for (size_t i = 0; i < ny; i++) lo[i] = fmax(lo[i], 0.0), hi[i] = fmax(hi[i], 0.0);
    tu_expect_ok(B->conv2d_forward(ctx, &y, &x, &w, bias, &p), op);
    check_range(op, "forward", &y, lo, hi);

    if (!cc->relu && !cc->add) {
        /* Backward data: dx (non-zero) += sum dy w. */
        ts_tensor dy = half_tensor(d, cc->N, cc->Cout, OH, OW), dx = half_tensor(d, cc->N, cc->Cin, cc->H, cc->W);
        fill_half(r, &dy, 1.0);
        fill_half(r, &dx, 1.0);
        double *wdy = widen_all(&dy), *rdx = widen_all(&dx), *mdx = dalloc(nx);
        for (size_t i = 0; i < nx; i++) mdx[i] = fabs(rdx[i]);
        FOR_NCHW(&y, n, o, oh, ow)
        for (int c = 0; c < cc->Cin; c++)
            for (int i = 0; i < cc->KH; i++)
                for (int j = 0; j < cc->KW; j++) {
                    int ih = oh * cc->sh - cc->ph + i, iw = ow * cc->sw - cc->pw + j;
                    if (ih < 0 || ih >= cc->H || iw < 0 || iw >= cc->W) continue;
                    double t = wdy[nchw(&y, n, o, oh, ow)] * ww[nchw(&w, o, c, i, j)];
                    rdx[nchw(&x, n, c, ih, iw)] += t;
                    mdx[nchw(&x, n, c, ih, iw)] += fabs(t);
                }
        double *lx = dalloc(nx), *hx = dalloc(nx);
        bounds(lx, hx, rdx, mdx, nx, SLACK);
        tu_expect_ok(B->conv2d_backward_data(ctx, &dx, &dy, &w, &p), op);
        check_range(op, "backward data", &dx, lx, hx);

        /* Backward filter: dw (non-zero) += sum dy x. */
        ts_tensor dw = half_tensor(d, cc->Cout, cc->Cin, cc->KH, cc->KW);
        fill_half(r, &dw, 1.0);
        double *rdw = widen_all(&dw), *mdw = dalloc(nw), *lw = dalloc(nw), *hw = dalloc(nw);
        for (size_t i = 0; i < nw; i++) mdw[i] = fabs(rdw[i]);
        FOR_NCHW(&y, n, o, oh, ow)
        for (int c = 0; c < cc->Cin; c++)
            for (int i = 0; i < cc->KH; i++)
                for (int j = 0; j < cc->KW; j++) {
                    int ih = oh * cc->sh - cc->ph + i, iw = ow * cc->sw - cc->pw + j;
                    if (ih < 0 || ih >= cc->H || iw < 0 || iw >= cc->W) continue;
                    double t = wdy[nchw(&y, n, o, oh, ow)] * wx[nchw(&x, n, c, ih, iw)];
                    rdw[nchw(&w, o, c, i, j)] += t;
                    mdw[nchw(&w, o, c, i, j)] += fabs(t);
                }
        bounds(lw, hw, rdw, mdw, nw, SLACK);
        tu_expect_ok(B->conv2d_backward_filter(ctx, &dw, &dy, &x, &p), op);
        check_range(op, "backward filter", &dw, lw, hw);

        /* Backward bias: float32 dbias (non-zero) += sum of dy per channel. */
        float *db = tu_alloc_f((size_t)cc->Cout);
        tu_fill(r, db, (size_t)cc->Cout, -1.0, 1.0);
        double *rdb = dalloc((size_t)cc->Cout);
        for (int o = 0; o < cc->Cout; o++) rdb[o] = db[o];
        FOR_NCHW(&y, n, o, oh, ow) rdb[o] += wdy[nchw(&y, n, o, oh, ow)];
        tu_expect_ok(B->conv2d_backward_bias(ctx, db, &dy), op);
        tu_check_close(op, "backward bias", NULL, db, rdb, (size_t)cc->Cout, 1e-5, 1e-6);

        tu_free(db, op, "db");
        tu_free(rdb, op, "rdb");
        tu_free(wdy, op, "wdy");
        tu_free(rdx, op, "rdx");
        tu_free(mdx, op, "mdx");
        tu_free(lx, op, "lx");
        tu_free(hx, op, "hx");
        tu_free(rdw, op, "rdw");
        tu_free(mdw, op, "mdw");
        tu_free(lw, op, "lw");
        tu_free(hw, op, "hw");
        half_free(&dy, op, "dy");
        half_free(&dx, op, "dx");
        half_free(&dw, op, "dw");
    }
    tu_free(bias, op, "bias");
    tu_free(wx, op, "wx");
    tu_free(ww, op, "ww");
    tu_free(wz, op, "wz");
    half_free(&z, op, "z");
    tu_free(s, op, "s");
    tu_free(mag, op, "mag");
    tu_free(lo, op, "lo");
    tu_free(hi, op, "hi");
    half_free(&x, op, "x");
    half_free(&w, op, "w");
    half_free(&y, op, "y");
}

static void test_batchnorm(ts_ctx *ctx, tu_rng *r, ts_dtype d, int N, int C, int H, int W)
{
    const ts_backend *B = ts_backend_cpu();
    char op[96];
    snprintf(op, sizeof op, "%s batchnorm [%d,%d,%d,%d]", ts_dtype_name(d), N, C, H, W);
    const ts_bn_params p = {1e-5f, 0.1f};
    const size_t count = (size_t)N * C * H * W, per = (size_t)N * H * W;
    ts_tensor x = half_tensor(d, N, C, H, W), y = half_tensor(d, N, C, H, W);
    fill_half(r, &x, 1.0);
    /* A per-channel offset, so the mean is not ~0. */
    FOR_NCHW(&x, n, c, h, w)
    {
        size_t i = nhwc(&x, n, c, h, w);
        x.half[i] = ref_narrow(d, ref_widen(d, x.half[i]) + 0.5 * c);
    }
    float *gamma = tu_alloc_f(C), *beta = tu_alloc_f(C), *rm = tu_alloc_f(C), *rv = tu_alloc_f(C);
    float *smean = tu_alloc_f(C), *sinv = tu_alloc_f(C);
    tu_fill(r, gamma, C, 0.5, 2.0);
    tu_fill(r, beta, C, -1.0, 1.0);
    tu_fill(r, rm, C, -0.5, 0.5);
    tu_fill(r, rv, C, 0.5, 2.0);
    double *rm0 = dalloc(C), *rv0 = dalloc(C);
    for (int c = 0; c < C; c++) rm0[c] = rm[c], rv0[c] = rv[c];

    double *wx = widen_all(&x), *want = dalloc(count), *mag = dalloc(count), *lo = dalloc(count),
           *hi = dalloc(count);
    double *mu = dalloc(C), *istd = dalloc(C), *wrm = dalloc(C), *wrv = dalloc(C);
    for (int c = 0; c < C; c++) {
        double sum = 0, sq = 0;
        for (int n = 0; n < N; n++)
            for (int h = 0; h < H; h++)
                for (int w = 0; w < W; w++) sum += wx[nchw(&x, n, c, h, w)];
        mu[c] = sum / per;
        for (int n = 0; n < N; n++)
            for (int h = 0; h < H; h++)
                for (int w = 0; w < W; w++) sq += (wx[nchw(&x, n, c, h, w)] - mu[c]) * (wx[nchw(&x, n, c, h, w)] - mu[c]);
        istd[c] = 1.0 / sqrt(sq / per + p.eps);
        wrm[c] = 0.9 * rm0[c] + 0.1 * mu[c];
        wrv[c] = 0.9 * rv0[c] + 0.1 * sq / (per - 1);
    }
    FOR_NCHW(&x, n, c, h, w)
    {
        size_t i = nchw(&x, n, c, h, w);
        want[i] = (wx[i] - mu[c]) * istd[c] * gamma[c] + beta[c];
        mag[i] = (fabs(wx[i]) + fabs(mu[c])) * istd[c] * fabs(gamma[c]) + fabs(beta[c]);
    }
    bounds(lo, hi, want, mag, count, SLACK);
    tu_expect_ok(B->batchnorm_forward_train(ctx, &y, smean, sinv, &x, gamma, beta, rm, rv, &p), op);
    check_range(op, "train y", &y, lo, hi);
    tu_check_close(op, "train save_mean", NULL, smean, mu, C, 1e-6, 1e-6);
    tu_check_close(op, "train save_invstd", NULL, sinv, istd, C, 0, 1e-5);
    tu_check_close(op, "train running_mean", NULL, rm, wrm, C, 1e-6, 1e-5);
    tu_check_close(op, "train running_var", NULL, rv, wrv, C, 1e-6, 1e-5);

    /* Eval: the running statistics. */
    FOR_NCHW(&x, n, c, h, w)
    {
        size_t i = nchw(&x, n, c, h, w);
        double is = 1.0 / sqrt((double)rv[c] + p.eps);
        want[i] = (wx[i] - rm[c]) * is * gamma[c] + beta[c];
        mag[i] = (fabs(wx[i]) + fabs(rm[c])) * is * fabs(gamma[c]) + fabs(beta[c]);
    }
    bounds(lo, hi, want, mag, count, SLACK);
    tu_expect_ok(B->batchnorm_forward_eval(ctx, &y, &x, gamma, beta, rm, rv, &p), op);
    check_range(op, "eval y", &y, lo, hi);

    /* Backward with the saved statistics; dx, dgamma, dbeta start non-zero. */
    ts_tensor dy = half_tensor(d, N, C, H, W), dx = half_tensor(d, N, C, H, W);
    fill_half(r, &dy, 1.0);
    fill_half(r, &dx, 1.0);
    float *dg = tu_alloc_f(C), *dbt = tu_alloc_f(C);
    tu_fill(r, dg, C, -1.0, 1.0);
    tu_fill(r, dbt, C, -1.0, 1.0);
    double *wdy = widen_all(&dy), *wdx = widen_all(&dx), *rdg = dalloc(C), *rdb = dalloc(C);
    for (int c = 0; c < C; c++) {
        double m = smean[c], is = sinv[c], sdy = 0, dot = 0;
        for (int n = 0; n < N; n++)
            for (int h = 0; h < H; h++)
                for (int w = 0; w < W; w++) {
                    size_t i = nchw(&x, n, c, h, w);
                    sdy += wdy[i];
                    dot += (wx[i] - m) * wdy[i];
                }
        double k = dot * is * is / per, gm = sdy / per;
        for (int n = 0; n < N; n++)
            for (int h = 0; h < H; h++)
                for (int w = 0; w < W; w++) {
                    size_t i = nchw(&x, n, c, h, w);
                    want[i] = wdx[i] + (wdy[i] - gm - (wx[i] - m) * k) * is * gamma[c];
                    mag[i] = fabs(wdx[i]) + (fabs(wdy[i]) + fabs(gm) + fabs((wx[i] - m) * k)) * is * fabs(gamma[c]);
                }
        rdg[c] = dg[c] + dot * is;
        rdb[c] = dbt[c] + sdy;
    }
    bounds(lo, hi, want, mag, count, SLACK);
    tu_expect_ok(B->batchnorm_backward(ctx, &dx, dg, dbt, &dy, &x, gamma, smean, sinv), op);
    check_range(op, "backward dx", &dx, lo, hi);
    tu_check_close(op, "backward dgamma", NULL, dg, rdg, C, 1e-5, 1e-5);
    tu_check_close(op, "backward dbeta", NULL, dbt, rdb, C, 1e-5, 1e-5);

    tu_free(gamma, op, "gamma");
    tu_free(beta, op, "beta");
    tu_free(rm, op, "rm");
    tu_free(rv, op, "rv");
    tu_free(smean, op, "smean");
    tu_free(sinv, op, "sinv");
    tu_free(rm0, op, "rm0");
    tu_free(rv0, op, "rv0");
    tu_free(wx, op, "wx");
    tu_free(want, op, "want");
    tu_free(mag, op, "mag");
    tu_free(lo, op, "lo");
    tu_free(hi, op, "hi");
    tu_free(mu, op, "mu");
    tu_free(istd, op, "istd");
    tu_free(wrm, op, "wrm");
    tu_free(wrv, op, "wrv");
    tu_free(dg, op, "dg");
    tu_free(dbt, op, "dbt");
    tu_free(wdy, op, "wdy");
    tu_free(wdx, op, "wdx");
    tu_free(rdg, op, "rdg");
    tu_free(rdb, op, "rdb");
    half_free(&x, op, "x");
    half_free(&y, op, "y");
    half_free(&dy, op, "dy");
    half_free(&dx, op, "dx");
}

/* ---- 4. dtype refusals ------------------------------------------------------------------ */

#define SHARE "share a dtype"

static void test_dtype_refusals(ts_ctx *ctx)
{
    const ts_backend *B = ts_backend_cpu();
    const char *op = "dtype refusals";
    const int N = 2, C = 3, H = 4, W = 6;
    ts_tensor f = tu_tensor(N, C, H, W), f2 = tu_tensor(N, C, H, W), h = half_tensor(TS_BF16, N, C, H, W),
              h2 = half_tensor(TS_BF16, N, C, H, W);
    ts_tensor f6 = tu_tensor(N, 2 * C, H, W), h6 = half_tensor(TS_BF16, N, 2 * C, H, W);
    ts_tensor fp = tu_tensor(N, C, H / 2, W / 2), hp = half_tensor(TS_BF16, N, C, H / 2, W / 2);
    ts_tensor fu = tu_tensor(N, C, 2 * H, 2 * W), hu = half_tensor(TS_BF16, N, C, 2 * H, 2 * W);
    int32_t *idx = tu_alloc_i32((size_t)N * C * (H / 2) * (W / 2));
    float *vec = tu_alloc_f(16), *vec2 = tu_alloc_f(16), *vec3 = tu_alloc_f(16), *vec4 = tu_alloc_f(16);
    for (int i = 0; i < 16; i++) vec2[i] = vec4[i] = 1.0f;
    ts_pool2d_params pp = {2, 2, 2, 2, 0, 0};
    ts_bn_params bp = {1e-5f, 0.1f};
    ts_conv2d_params cp = {.stride_h = 1, .stride_w = 1, .pad_h = 1, .pad_w = 1};
    ts_tensor fw = tu_tensor(C, C, 3, 3), hw = half_tensor(TS_BF16, C, C, 3, 3);

    tu_expect_error(B->relu_forward(ctx, &f, &h), TS_ERR_INVALID_ARG, "relu_forward f32 y, bf16 x", "relu_forward",
                    SHARE, "bf16", (char *)NULL);
    tu_expect_error(B->relu_forward(ctx, &h, &f), TS_ERR_INVALID_ARG, "relu_forward bf16 y, f32 x", "relu_forward",
                    SHARE, (char *)NULL);
    tu_expect_error(B->relu_backward(ctx, &f, &h, &h2), TS_ERR_INVALID_ARG, "relu_backward f32 dx", "relu_backward",
                    SHARE, (char *)NULL);
    tu_expect_error(B->relu_backward(ctx, &h, &h2, &f), TS_ERR_INVALID_ARG, "relu_backward f32 y", "relu_backward",
                    SHARE, (char *)NULL);
    tu_expect_error(B->add_forward(ctx, &h, &h2, &f), TS_ERR_INVALID_ARG, "add_forward f32 b", "add_forward", SHARE,
                    (char *)NULL);
    tu_expect_error(B->add_forward(ctx, &f, &f2, &h), TS_ERR_INVALID_ARG, "add_forward bf16 b", "add_forward", SHARE,
                    (char *)NULL);
    tu_expect_error(B->add_backward(ctx, &f, &h2, &h), TS_ERR_INVALID_ARG, "add_backward f32 da", "add_backward",
                    SHARE, (char *)NULL);
    tu_expect_error(B->concat_forward(ctx, &h6, &f, &h), TS_ERR_INVALID_ARG, "concat_forward f32 a", "concat_forward",
                    SHARE, (char *)NULL);
    tu_expect_error(B->concat_forward(ctx, &f6, &f, &h), TS_ERR_INVALID_ARG, "concat_forward bf16 b",
                    "concat_forward", SHARE, (char *)NULL);
    tu_expect_error(B->concat_backward(ctx, &h, &f, &h6), TS_ERR_INVALID_ARG, "concat_backward f32 db",
                    "concat_backward", SHARE, (char *)NULL);
    tu_expect_error(B->maxpool2d_forward(ctx, &fp, idx, &h, &pp), TS_ERR_INVALID_ARG, "maxpool2d_forward f32 y",
                    "maxpool2d_forward", SHARE, (char *)NULL);
    tu_expect_error(B->maxpool2d_backward(ctx, &h, &fp, idx, &pp), TS_ERR_INVALID_ARG, "maxpool2d_backward f32 dy",
                    "maxpool2d_backward", SHARE, (char *)NULL);
    tu_expect_error(B->maxpool2d_backward(ctx, &f, &hp, idx, &pp), TS_ERR_INVALID_ARG, "maxpool2d_backward f32 dx",
                    "maxpool2d_backward", SHARE, (char *)NULL);
    tu_expect_error(B->upsample_nearest_forward(ctx, &fu, &h), TS_ERR_INVALID_ARG, "upsample forward f32 y",
                    "upsample_nearest_forward", SHARE, (char *)NULL);
    tu_expect_error(B->upsample_nearest_backward(ctx, &h, &fu), TS_ERR_INVALID_ARG, "upsample backward f32 dy",
                    "upsample_nearest_backward", SHARE, (char *)NULL);
    tu_expect_error(B->upsample_nearest_backward(ctx, &f, &hu), TS_ERR_INVALID_ARG, "upsample backward bf16 dy",
                    "upsample_nearest_backward", SHARE, (char *)NULL);
    tu_expect_error(B->batchnorm_forward_train(ctx, &f, vec, vec2, &h, vec3, vec, NULL, NULL, &bp),
                    TS_ERR_INVALID_ARG, "batchnorm train f32 y", "batchnorm_forward_train", SHARE, (char *)NULL);
    tu_expect_error(B->batchnorm_forward_eval(ctx, &h, &f, vec2, vec3, vec, vec4, &bp), TS_ERR_INVALID_ARG,
                    "batchnorm eval bf16 y", "batchnorm_forward_eval", SHARE, (char *)NULL);
    tu_expect_error(B->batchnorm_backward(ctx, &h, vec, vec3, &h2, &f, vec2, vec, vec4), TS_ERR_INVALID_ARG,
                    "batchnorm backward f32 x", "batchnorm_backward", SHARE, (char *)NULL);
    tu_expect_error(B->batchnorm_backward(ctx, &f, vec, vec3, &h2, &h, vec2, vec, vec4), TS_ERR_INVALID_ARG,
                    "batchnorm backward f32 dx", "batchnorm_backward", SHARE, (char *)NULL);
    tu_expect_error(B->conv2d_forward(ctx, &h2, &h, &fw, NULL, &cp), TS_ERR_INVALID_ARG, "conv forward f32 weight",
                    "conv2d_forward", SHARE, "cast the weight with convert", (char *)NULL);
    tu_expect_error(B->conv2d_forward(ctx, &h2, &f, &hw, NULL, &cp), TS_ERR_INVALID_ARG, "conv forward f32 x",
                    "conv2d_forward", SHARE, (char *)NULL);
    tu_expect_error(B->conv2d_backward_data(ctx, &f, &h, &hw, &cp), TS_ERR_INVALID_ARG, "conv backward data f32 dx",
                    "conv2d_backward_data", SHARE, (char *)NULL);
    tu_expect_error(B->conv2d_backward_filter(ctx, &hw, &f, &h, &cp), TS_ERR_INVALID_ARG,
                    "conv backward filter f32 dy", "conv2d_backward_filter", SHARE, (char *)NULL);
    tu_expect_error(B->conv2d_backward_filter(ctx, &fw, &h2, &h, &cp), TS_ERR_INVALID_ARG,
                    "conv backward filter f32 dw", "conv2d_backward_filter", SHARE, (char *)NULL);

    /* A dtype no op takes (a weight file's element type). */
    ts_tensor i64 = ts_tensor_view_as(h.half, TS_I64, 1, 1, 2, 3), i64b = ts_tensor_view_as(h2.half, TS_I64, 1, 1, 2, 3);
    tu_expect_error(B->relu_forward(ctx, &i64b, &i64), TS_ERR_INVALID_ARG, "relu_forward i64", "relu_forward",
                    "unknown dtype", (char *)NULL);
    tu_expect_error(B->add_forward(ctx, &i64b, &i64, &i64), TS_ERR_INVALID_ARG, "add_forward i64", "add_forward",
                    "unknown dtype", (char *)NULL);
    vec[0] = 123.0f;
    ts_status st = B->conv2d_backward_bias(ctx, vec, &i64);
    tu_expect(st == TS_ERR_INVALID_ARG && vec[0] == 123.0f,
              "conv2d_backward_bias refuses an i64 dy and leaves dbias alone: got status %s (%s), dbias[0] %g",
              ts_status_name(st), st ? ts_last_error() : "", (double)vec[0]);

    /* The losses stay float32: half logits are refused. */
    int32_t *target = tu_alloc_i32((size_t)N * H * W);
    ts_ce_params ce = {-100, NULL};
    ts_dice_params dp = {TS_DICE_SMP, -100, 0.0f, 1e-7f, 0, NULL};
    double loss = 0;
    tu_expect_error(B->cross_entropy_forward(ctx, &loss, &h, target, &ce), TS_ERR_INVALID_ARG,
                    "cross_entropy_forward bf16 logits", "cross_entropy", "must be float32", (char *)NULL);
    tu_expect_error(B->cross_entropy_backward(ctx, &f, &h, target, &ce, 1.0f), TS_ERR_INVALID_ARG,
                    "cross_entropy_backward bf16 logits", "cross_entropy", "must be float32", (char *)NULL);
    tu_expect_error(B->cross_entropy_backward(ctx, &h, &f, target, &ce, 1.0f), TS_ERR_INVALID_ARG,
                    "cross_entropy_backward bf16 dlogits", "cross_entropy", SHARE, (char *)NULL);
    tu_expect_error(B->dice_forward(ctx, &loss, &h, target, &dp), TS_ERR_INVALID_ARG, "dice_forward bf16 logits",
                    "dice", "must be float32", (char *)NULL);
    tu_expect_error(B->dice_backward(ctx, &f, &h, target, &dp, 1.0f), TS_ERR_INVALID_ARG,
                    "dice_backward bf16 logits", "dice", "must be float32", (char *)NULL);
    ts_tensor f16l = ts_tensor_view_as(h.half, TS_F16, N, C, H, W);
    tu_expect_error(B->cross_entropy_forward(ctx, &loss, &f16l, target, &ce), TS_ERR_INVALID_ARG,
                    "cross_entropy_forward f16 logits", "must be float32", "f16 NHWC", (char *)NULL);

    tu_free(target, op, "target");
    tu_free(idx, op, "idx");
    tu_free(vec, op, "vec");
    tu_free(vec2, op, "vec2");
    tu_free(vec3, op, "vec3");
    tu_free(vec4, op, "vec4");
    tu_tensor_free(&f, op, "f");
    tu_tensor_free(&f2, op, "f2");
    tu_tensor_free(&f6, op, "f6");
    tu_tensor_free(&fp, op, "fp");
    tu_tensor_free(&fu, op, "fu");
    tu_tensor_free(&fw, op, "fw");
    half_free(&h, op, "h");
    half_free(&h2, op, "h2");
    half_free(&h6, op, "h6");
    half_free(&hp, op, "hp");
    half_free(&hu, op, "hu");
    half_free(&hw, op, "hw");
}

/* ---- 5. tensor helpers ------------------------------------------------------------------- */

static void test_tensor_helpers(void)
{
    char buf[TS_SHAPE_STR];
    uint16_t store[2 * 3 * 4 * 5];
    ts_tensor b = ts_tensor_view_as(store, TS_BF16, 2, 3, 4, 5);
    tu_expect(strcmp(ts_shape_str(&b, buf), "[2,3,4,5] bf16 NHWC") == 0, "ts_shape_str bf16: \"%s\"", buf);
    ts_tensor f16 = ts_tensor_view_as(store, TS_F16, 2, 3, 4, 5);
    tu_expect(strcmp(ts_shape_str(&f16, buf), "[2,3,4,5] f16 NHWC") == 0, "ts_shape_str f16: \"%s\"", buf);
    ts_tensor f = ts_tensor_view((float *)(void *)store, 2, 3, 4, 5);
    tu_expect(strcmp(ts_shape_str(&f, buf), "[2,3,4,5]") == 0 && f.dtype == TS_F32,
              "ts_shape_str f32 (the view's default dtype): \"%s\"", buf);
    tu_expect(ts_tensor_bytes(&b) == 240 && ts_tensor_bytes(&f16) == 240 && ts_tensor_bytes(&f) == 480,
              "ts_tensor_bytes: bf16 %zu, f16 %zu, f32 %zu (want 240, 240, 480)", ts_tensor_bytes(&b),
              ts_tensor_bytes(&f16), ts_tensor_bytes(&f));
    tu_expect(ts_dtype_size(TS_BF16) == 2 && ts_dtype_size(TS_F16) == 2 && ts_dtype_size(TS_F32) == 4 &&
                  ts_dtype_size((ts_dtype)99) == 0,
              "ts_dtype_size");
    tu_expect(ts_dtype_is_half(TS_BF16) && ts_dtype_is_half(TS_F16) && !ts_dtype_is_half(TS_F32) &&
                  !ts_dtype_is_half(TS_I64),
              "ts_dtype_is_half");
    tu_expect(strcmp(ts_dtype_name(TS_BF16), "bf16") == 0 && strcmp(ts_dtype_name(TS_F16), "f16") == 0 &&
                  strcmp(ts_dtype_name((ts_dtype)99), "?") == 0,
              "ts_dtype_name");
    /* A batch slice of a half tensor: image 1 starts C*H*W half elements on. */
    ts_tensor s = ts_tensor_batch_slice(&b, 1, 1);
    tu_expect(s.half == store + 60 && s.dtype == TS_BF16 && s.n == 1 && s.c == 3 && s.h == 4 && s.w == 5 && !s.owned,
              "ts_tensor_batch_slice of bf16: offset %td elements, dtype %s", s.half - store, ts_dtype_name(s.dtype));
    /* ts_tensor_alloc makes float32 tensors. */
    ts_tensor a;
    tu_expect(ts_tensor_alloc(&a, 1, 2, 3, 4) == TS_OK && a.dtype == TS_F32 && ts_tensor_bytes(&a) == 96,
              "ts_tensor_alloc is float32");
    ts_tensor_free(&a);
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    ctx.backend = ts_backend_cpu();
    tu_rng rng;
    tu_rng_seed(&rng, 0x4A1Fu);

    test_known_bits();
    test_all_patterns(&rng);
    test_convert(&ctx, &rng);

    static const conv_case convs[] = {
        /* N Cin H W Cout KH KW sh sw ph pw relu add */
        {2, 3, 5, 7, 5, 3, 3, 1, 1, 1, 1, 0, 0},
        {2, 5, 5, 7, 4, 3, 3, 2, 1, 1, 0, 0, 0},
        {2, 5, 5, 7, 3, 3, 3, 2, 2, 1, 1, 1, 0}, /* the fused bias + ReLU */
        {2, 3, 5, 7, 5, 1, 1, 1, 1, 0, 0, 0, 0}, /* pointwise (the GEMM path) */
        {1, 3, 6, 5, 2, 2, 3, 2, 1, 0, 1, 0, 0},
        {2, 5, 5, 7, 3, 3, 3, 1, 1, 1, 1, 1, 1}, /* bias + shortcut + ReLU (a ResNet block's conv2) */
        {2, 3, 5, 7, 5, 3, 3, 2, 2, 1, 1, 0, 1}, /* bias + add without the ReLU */
        {2, 3, 5, 7, 5, 1, 1, 1, 1, 0, 0, 1, 1}, /* pointwise with add and ReLU */
    };
    for (int k = 0; k < 2; k++) {
        ts_dtype d = HALF_TYPES[k];
        test_relu_add(&ctx, &rng, d, 2, 3, 5, 7);
        test_relu_add(&ctx, &rng, d, 1, 5, 1, 1);
        test_concat(&ctx, &rng, d, 2, 3, 5, 5, 7);
        test_concat(&ctx, &rng, d, 1, 1, 2, 3, 1);
        test_maxpool(&ctx, &rng, d, 2, 3, 5, 7, 3, 2, 1);
        test_maxpool(&ctx, &rng, d, 2, 5, 5, 7, 2, 2, 0);
        test_maxpool(&ctx, &rng, d, 1, 3, 5, 7, 3, 1, 1);
        test_upsample(&ctx, &rng, d, 2, 3, 5, 7, 10, 14);
        test_upsample(&ctx, &rng, d, 2, 5, 5, 7, 8, 11);
        test_upsample(&ctx, &rng, d, 1, 3, 5, 7, 5, 7);
        for (size_t i = 0; i < sizeof convs / sizeof convs[0]; i++) test_conv(&ctx, &rng, d, &convs[i]);
        test_conv_half_bias(&ctx, d);
        test_conv_half_add(&ctx, d);
        test_batchnorm(&ctx, &rng, d, 2, 5, 5, 7);
        test_batchnorm(&ctx, &rng, d, 3, 3, 1, 1);
    }
    test_dtype_refusals(&ctx);
    test_tensor_helpers();

    ts_ctx_free(&ctx);
    return tu_finish("test_half");
}
