/* Mixed precision on the CUDA backend against the CPU backend, op by op.
 *
 * The CPU backend's half ops (kernels/cpu/half.c) are the definition of
 * kernels/backend.h taken literally: widen every half tensor to float32,
 * run the float32 op, round each output element once (to nearest, ties to
 * even). Here every half-capable op runs on both backends for bf16 and for
 * fp16, on the same half bit patterns (the host buffer is uploaded as is),
 * and the device results come back and are compared: convert (every pair of
 * float32 / bf16 / fp16, overwrite and accumulate, in place), ReLU, add,
 * concat, max-pool, nearest upsampling, conv2d (forward with and without
 * bias, fused ReLU and fused add, backward data, filter and bias) and batch
 * norm (train, eval, backward). For conv2d forward also: the fusion
 * counters (bias + ReLU calls, with and without the add, ran as cuDNN's
 * fused call) and the half bias rule on both forward paths. Shapes are the model's and odd ones: batch 2,
 * 3/5/17/33/65 channels (either side of the 32-channel chunks of the NHWC
 * kernels), 7x9, 13x11 and 1x1 planes, and one 2x64x32x32.
 *
 * Backward ops accumulate, so their outputs are prefilled with the same
 * nonzero values on both sides; forward outputs are prefilled with NaN on
 * both sides, so a forward that reads its output shows up.
 *
 * Then: determinism (ts_cuda_set_deterministic(1): every backward op twice
 * gives the same bits), and errors (a call mixing dtypes is refused by each
 * op family, the losses refuse half logits: an error status naming the op,
 * not a crash, and the device healthy afterwards).
 *
 * Device memory comes from the backend's own memory interface
 * (gpu->memory), with guard bytes on both sides of every buffer, checked
 * when it is freed. Every check prints one line ("ok" or "FAIL"), the last
 * line is the tally; any failure exits 1.
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
#include "kernels/half.h"
#include "tests/testutil.h"

#define SUITE "test_cuda_half"

/* ---- tolerances ------------------------------------------------------------
 *
 * EXACT (bits, a NaN matching any NaN: CUDA's narrowing makes the canonical
 * NaN while a copy keeps a NaN's payload): ops whose every output is a copy,
 * a select, or one float32 operation on the same widened operands rounded
 * once to nearest-even on both sides. That is convert (widen exactly, add
 * once, round once), ReLU forward and backward, add, concat, max-pool values
 * and indices, upsample forward. Scatter-adds compare exactly on dyadic
 * inputs too (multiples of 1/8: their float32 sums are exact in any order,
 * so both sides round the same number).
 *
 * GATHER_ULPS (1 ulp of the half type, per element): max-pool and upsample
 * backward on random inputs. Several dy values add into one dx element in
 * float32 and the sum is rounded once; the GPU may add them in another
 * order than the CPU, which changes the float32 sum by a few float32 ulps of
 * the terms, and that can move the one rounding to the neighbouring half
 * value, never further (a half ulp is 2^16 or 2^13 float32 ulps). Where
 * the sum cancels to almost zero a half ulp of it can be finer than those
 * float32 differences: a float-level term, 2 float32 epsilons per added
 * value times max |cpu|, covers that (about 1e-6 here).
 *
 * conv_rtol(dtype, K), norm-wise (max |cuda - cpu| <= conv_rtol * max |cpu|):
 * both sides take the same half inputs, whose products are exact in float32
 * (8 + 8 or 11 + 11 significant bits <= 24), and accumulate in float32
 * (cuDNN's PSEUDO_BFLOAT16 / PSEUDO_HALF configurations: half storage, float
 * compute, as kernels/cuda/conv.c sets up). So the float32 results differ
 * only by summation order, test_cuda_ops.c's sum_rtol(K) (K the length of the
 * reduction; the sqrt(K) growth lives there, at float32 level). Each output
 * is then rounded to the half type: one rounding each side, <= 1 ulp apart.
 * Both sides add the bias rounded to the half type (autocast's half bias,
 * kernels/backend.h), so the bias itself adds no difference. The forward
 * with a bias and the ReLU is one cuDNN call (cudnnConvolutionBiasActivation
 * Forward, kernels/cuda/conv.c) that rounds once, as the CPU; a bias without
 * the ReLU (and a shape the fused call does not support) takes two passes
 * and rounds twice (cuDNN's output, then the bias epilogue,
 * kernels/cuda/conv_epilogue.cu): <= 1 more ulp. cuDNN's beta = 1 blend of
 * the backward ops may round its contribution before the add: <= 1 more
 * ulp too. One ulp of a value v is at most 2^-7 |v| for bf16 (8 significant
 * bits) and 2^-10 |v| for fp16 (11), so 2 ulps of the largest output are
 * 2 * 2^-7 (2 * 2^-10) of max |cpu|; the bound takes 4 for margin. A half
 * rounding error does not grow with K as long as the accumulation is float32,
 * so there is no sqrt(K) factor at half level: a kernel that accumulated in
 * half would be ~sqrt(K) ulps off, and should fail. A wrong layout or a
 * missed accumulation is O(max |cpu|) off; a lost bias (|bias| up to 2 on
 * outputs up to ~20) several times the bf16 bound and ~50x the fp16 one.
 *
 * Batch norm: the per-channel float32 statistics (save_mean, save_invstd,
 * running stats, dgamma, dbeta) are reduced in double on both sides from the
 * same widened values, in different orders: sum_rtol(count) of (1 + max),
 * as test_cuda_ops.c. The half outputs (y, dx) are one float32 expression of
 * those statistics, rounded once: 1 ulp per element (the rounding may flip
 * where the statistics differ in their last float32 bit) plus the float32
 * differences themselves, sum_rtol(count) * max |cpu| (where y is near 0 a
 * half ulp is finer than they are). */
#define GATHER_ULPS 1.0
#define CONV_ULPS 4.0
static double sum_rtol(double L) { return 1e-5 + 4.0 * FLT_EPSILON * sqrt(L); }
/* The largest spacing of half values relative to their magnitude. */
static double half_rel_ulp(ts_dtype t) { return t == TS_BF16 ? 0x1p-7 : 0x1p-10; }
static double conv_rtol(ts_dtype t, double K) { return CONV_ULPS * half_rel_ulp(t) + sum_rtol(K); }

static const ts_backend *cpu, *gpu;
static ts_ctx cctx, gctx;
static tu_rng rng;

static const ts_dtype half_types[] = {TS_BF16, TS_F16};
static const ts_dtype all_types[] = {TS_F32, TS_BF16, TS_F16};

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

/* A backend call's status; the CUDA one is followed by a sync, so an
 * asynchronous kernel fault is reported by the op that caused it. */
static int cpu_ok(ts_status st, const char *op)
{
    char what[512];
    snprintf(what, sizeof what, "cpu %s", op);
    return tu_expect_ok(st, what);
}

static int gpu_ok(ts_status st, const char *op)
{
    char what[512];
    snprintf(what, sizeof what, "cuda %s", op);
    if (st == TS_OK) st = gpu->memory->sync();
    return tu_expect_ok(st, what);
}

/* ---- guarded device memory --------------------------------------------------- */

/* Guard bytes on each side of a device buffer (a multiple of 256, so the
 * pointer handed out keeps the allocation's alignment, which cuDNN expects). */
#define DGUARD 256
#define DSENTINEL 0xA5
#define MAX_LIVE 256

typedef struct dev_block {
    unsigned char *user;
    size_t bytes;
} dev_block;
static dev_block live[MAX_LIVE];

static void upload(void *dev, const void *host, size_t bytes)
{
    if (bytes && gpu->memory->upload(dev, host, bytes) != TS_OK) fatal("device upload");
}

static void download(void *host, const void *dev, size_t bytes)
{
    if (bytes && gpu->memory->download(host, dev, bytes) != TS_OK) fatal("device download");
}

/* bytes of zero-filled device memory between two guards. */
static void *dev_alloc(size_t bytes)
{
    size_t total = bytes + 2 * (size_t)DGUARD;
    void *base = NULL;
    if (gpu->memory->alloc(&base, total) != TS_OK || !base) fatal("device alloc");
    unsigned char *pat = malloc(total);
    if (!pat) {
        tu_expect(0, "out of host memory for %zu bytes", total);
        exit(tu_finish(SUITE));
    }
    memset(pat, DSENTINEL, total);
    memset(pat + DGUARD, 0, bytes);
    upload(base, pat, total);
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
        download(g, user - DGUARD, DGUARD);
        download(g + DGUARD, user + live[i].bytes, DGUARD);
        int before = -1, after = -1;
        for (int k = 0; k < DGUARD; k++) {
            if (g[k] != DSENTINEL && before < 0) before = DGUARD - k;
            if (g[DGUARD + k] != DSENTINEL && after < 0) after = k;
        }
        if (before >= 0) tu_expect(0, "%s: device write %d bytes before buffer %s", op, before, name);
        if (after >= 0)
            tu_expect(0, "%s: device write %d bytes past the end of buffer %s (%zu bytes)", op, after, name,
                      live[i].bytes);
        gpu->memory->free(user - DGUARD);
        live[i].user = NULL;
        return;
    }
    tu_expect(0, "%s: buffer %s is not a live device buffer", op, name);
}

/* ---- elements of any dtype ---------------------------------------------------- */

/* Where logical element (n, c, h, w) lives: NCHW for float32, NHWC for half. */
static size_t at(const ts_tensor *t, int n, int c, int h, int w)
{
    if (t->dtype == TS_F32) return (((size_t)n * t->c + c) * t->h + h) * t->w + w;
    return (((size_t)n * t->h + h) * t->w + w) * t->c + c;
}

/* Element i (memory order) of a buffer of dtype dt, as its raw bits. */
static uint32_t raw_get(ts_dtype dt, const void *buf, size_t i)
{
    if (dt != TS_F32) return ((const uint16_t *)buf)[i];
    uint32_t u;
    memcpy(&u, (const float *)buf + i, sizeof u);
    return u;
}

static void raw_set(ts_dtype dt, void *buf, size_t i, uint32_t bits)
{
    if (dt != TS_F32)
        ((uint16_t *)buf)[i] = (uint16_t)bits;
    else
        memcpy((float *)buf + i, &bits, sizeof bits);
}

/* Raw bits to their (exact) float32 value, and a float32 rounded once to dt. */
static float val(ts_dtype dt, uint32_t bits)
{
    return dt == TS_F32 ? ts_bits_f32(bits) : ts_half_to_f32(dt, (uint16_t)bits);
}
static uint32_t bits_of(ts_dtype dt, float v) { return dt == TS_F32 ? ts_f32_bits(v) : ts_f32_to_half(dt, v); }

/* The spacing of dt's values at |v| (the ulp of the binade v is in;
 * subnormal spacing below the normal range). */
static double ulp_of(ts_dtype dt, double v)
{
    const int mant = dt == TS_BF16 ? 7 : dt == TS_F16 ? 10 : 23;
    const int emin = dt == TS_F16 ? -14 : -126;
    int e = emin;
    if (v != 0 && isfinite(v)) {
        frexp(fabs(v), &e); /* |v| = m 2^e, m in [0.5, 1) */
        e -= 1;
        if (e < emin) e = emin;
    }
    return ldexp(1.0, e - mant);
}

/* ---- host/device pairs ------------------------------------------------------
 * A pair is one tensor twice, same dtype and shape: .h in guarded host
 * memory for the CPU backend, .d in guarded device memory for the CUDA one.
 * Per-channel vectors are float32 pairs [n,1,1,1]. */
typedef struct pair {
    ts_tensor h, d;
} pair;

static size_t numel(const pair *p) { return ts_tensor_numel(&p->h); }
static size_t nbytes(const pair *p) { return ts_tensor_bytes(&p->h); }
static ts_dtype dtype(const pair *p) { return p->h.dtype; }

static pair pair_new(ts_dtype dt, int n, int c, int h, int w)
{
    const size_t bytes = (size_t)n * c * h * w * ts_dtype_size(dt);
    pair p;
    p.h = ts_tensor_view_as(tu_alloc(bytes), dt, n, c, h, w);
    p.d = ts_tensor_view_as(dev_alloc(bytes), dt, n, c, h, w);
    return p;
}

static pair vec_new(size_t n) { return pair_new(TS_F32, (int)n, 1, 1, 1); }

/* Copies the host side to the device side: the same bits on both. */
static void pair_sync(pair *p) { upload(p->d.data, p->h.data, nbytes(p)); }

static void pair_free(pair *p, const char *op, const char *name)
{
    tu_free(p->h.data, op, name);
    dev_free(p->d.data, op, name);
    p->h.data = p->d.data = NULL;
}

/* raw[k], in logical NCHW order k, into p's layout on both sides. */
static void pair_load_raw(pair *p, const uint32_t *raw)
{
    const ts_tensor *t = &p->h;
    size_t k = 0;
    for (int n = 0; n < t->n; n++)
        for (int c = 0; c < t->c; c++)
            for (int h = 0; h < t->h; h++)
                for (int w = 0; w < t->w; w++) raw_set(t->dtype, p->h.data, at(t, n, c, h, w), raw[k++]);
    pair_sync(p);
}

/* Float values in logical NCHW order, each rounded once to p's dtype. */
static void pair_load(pair *p, const float *v)
{
    uint32_t *raw = tu_alloc(numel(p) * sizeof *raw);
    for (size_t k = 0; k < numel(p); k++) raw[k] = bits_of(dtype(p), v[k]);
    pair_load_raw(p, raw);
    tu_free(raw, "pair_load", "raw");
}

/* Uniform in [lo, hi), rounded to the dtype, on both sides. */
static pair pair_rand(ts_dtype dt, int n, int c, int h, int w, double lo, double hi)
{
    pair p = pair_new(dt, n, c, h, w);
    float *v = tu_alloc_f(numel(&p));
    tu_fill(&rng, v, numel(&p), lo, hi);
    pair_load(&p, v);
    tu_free(v, "pair_rand", "values");
    return p;
}

static pair vec_rand(size_t n, double lo, double hi) { return pair_rand(TS_F32, (int)n, 1, 1, 1, lo, hi); }

static void pair_fill_const(pair *p, float v)
{
    for (size_t i = 0; i < numel(p); i++) raw_set(dtype(p), p->h.data, i, bits_of(dtype(p), v));
    pair_sync(p);
}

/* Multiples of 1/8 in [-2, 2] (exact in both half types): the sums of a
 * few of them are exact in float32 in any order, so scatter-adds compare
 * exactly. */
static void pair_dyadic(pair *p)
{
    for (size_t i = 0; i < numel(p); i++)
        raw_set(dtype(p), p->h.data, i, bits_of(dtype(p), (float)(tu_randint(&rng, 33) - 16) / 8.0f));
    pair_sync(p);
}

/* Uniform in [-1, 1) with, at every 5th element, an IEEE special or an
 * edge of the half ranges: NaN, infinities, both zeros, values that are
 * subnormal (or zero) in fp16 or bf16, and one past fp16's largest. */
static void pair_specials(pair *p)
{
    static const float specials[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 3e-6f, -3e-6f, 1e-39f, 70000.0f};
    const size_t ns = sizeof specials / sizeof specials[0];
    float *v = tu_alloc_f(numel(p));
    tu_fill(&rng, v, numel(p), -1, 1);
    for (size_t i = 0; i < numel(p); i += 5) v[i] = specials[tu_randint(&rng, (int)ns)];
    pair_load(p, v);
    tu_free(v, "pair_specials", "values");
}

/* Two pairs with the same contents (the prefilled outputs of two runs). */
static void twin(pair *a, pair *b, ts_dtype dt, int n, int c, int h, int w)
{
    *a = pair_rand(dt, n, c, h, w, -1, 1);
    *b = pair_new(dt, n, c, h, w);
    memcpy(b->h.data, a->h.data, nbytes(a));
    pair_sync(b);
}

/* The device side, downloaded into a guarded host buffer (tu_free it). */
static void *pair_get(const pair *p)
{
    void *g = tu_alloc(nbytes(p));
    download(g, p->d.data, nbytes(p));
    return g;
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

/* ---- comparisons ------------------------------------------------------------- */

/* "i (n=..,c=..,h=..,w=..)" for memory index i of t's layout. */
static void where_str(const ts_tensor *t, size_t i, char *buf, size_t size)
{
    size_t n, c, h, w;
    if (t->dtype == TS_F32) {
        w = i % (size_t)t->w, h = i / t->w % (size_t)t->h;
        c = i / ((size_t)t->w * t->h) % (size_t)t->c, n = i / ((size_t)t->w * t->h * t->c);
    } else {
        c = i % (size_t)t->c, w = i / t->c % (size_t)t->w;
        h = i / ((size_t)t->c * t->w) % (size_t)t->h, n = i / ((size_t)t->c * t->w * t->h);
    }
    snprintf(buf, size, "%zu (n=%zu,c=%zu,h=%zu,w=%zu)", i, n, c, h, w);
}

/* "value (0xbits)". */
static const char *value_str(ts_dtype dt, uint32_t bits, char *buf, size_t size)
{
    snprintf(buf, size, dt == TS_F32 ? "%.9g (0x%08x)" : "%.9g (0x%04x)", (double)val(dt, bits), (unsigned)bits);
    return buf;
}

/* The same bits, or NaN on both sides. */
static int same_elem(ts_dtype dt, uint32_t a, uint32_t b) { return a == b || (isnan(val(dt, a)) && isnan(val(dt, b))); }

static int cmp_exact(const char *op, const char *what, const pair *p)
{
    void *g = pair_get(p);
    const ts_dtype dt = dtype(p);
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < numel(p); i++)
        if (!same_elem(dt, raw_get(dt, g, i), raw_get(dt, p->h.data, i)) && bad++ == 0) first = i;
    int ok;
    if (!bad) {
        ok = check(1, "%s: %s bit-exact (%zu values)", op, what, numel(p));
    } else {
        char where[128], gs[64], rs[64];
        where_str(&p->h, first, where, sizeof where);
        ok = check(0, "%s: %s bit-exact: %zu of %zu values differ, first at %s: cuda %s, cpu %s", op, what, bad,
                   numel(p), where, value_str(dt, raw_get(dt, g, first), gs, sizeof gs),
                   value_str(dt, raw_get(dt, p->h.data, first), rs, sizeof rs));
    }
    tu_free(g, op, "download");
    return ok;
}

/* Per element |cuda - cpu| <= ulps * ulp(cpu) + atol + arel * max |cpu|,
 * NaN where the CPU has NaN. */
static int cmp_ulps(const char *op, const char *what, const pair *p, double ulps, double atol, double arel)
{
    void *g = pair_get(p);
    const ts_dtype dt = dtype(p);
    double maxref = 0;
    for (size_t i = 0; i < numel(p); i++) {
        double r = fabs((double)val(dt, raw_get(dt, p->h.data, i)));
        if (isfinite(r) && r > maxref) maxref = r;
    }
    const double abs_tol = atol + arel * maxref;
    size_t bad = 0, nan_bad = 0, worst = 0;
    double wratio = 0;
    for (size_t i = 0; i < numel(p); i++) {
        uint32_t gb = raw_get(dt, g, i), rb = raw_get(dt, p->h.data, i);
        if (same_elem(dt, gb, rb)) continue;
        double gv = val(dt, gb), rv = val(dt, rb);
        if (isnan(gv) || isnan(rv)) {
            nan_bad++;
            continue;
        }
        double d = fabs(gv - rv), bound = ulps * ulp_of(dt, rv) + abs_tol, ratio = d / bound;
        if (!(d <= bound)) bad++;
        if (!(ratio <= wratio)) {
            wratio = ratio;
            worst = i;
        }
    }
    char where[128], gs[64], rs[64];
    where_str(&p->h, worst, where, sizeof where);
    int ok = check(bad == 0 && nan_bad == 0,
                   "%s: %s per element |cuda - cpu| <= %g ulp + %.2e: %zu of %zu off, %zu NaN mismatches; worst %.2f "
                   "of its bound at %s: cuda %s, cpu %s",
                   op, what, ulps, abs_tol, bad, numel(p), nan_bad, wratio, where,
                   value_str(dt, raw_get(dt, g, worst), gs, sizeof gs),
                   value_str(dt, raw_get(dt, p->h.data, worst), rs, sizeof rs));
    tu_free(g, op, "download");
    return ok;
}

/* Norm-wise: NaN where the CPU has NaN, and max |cuda - cpu| over the rest
 * <= atol + rtol * max |cpu|. */
static int cmp_norm(const char *op, const char *what, const pair *p, double atol, double rtol)
{
    void *g = pair_get(p);
    const ts_dtype dt = dtype(p);
    double maxref = 0, maxd = 0;
    size_t worst = 0, nan_bad = 0;
    for (size_t i = 0; i < numel(p); i++) {
        double gv = val(dt, raw_get(dt, g, i)), rv = val(dt, raw_get(dt, p->h.data, i));
        if (isnan(gv) || isnan(rv)) {
            nan_bad += !(isnan(gv) && isnan(rv));
            continue;
        }
        double d = fabs(gv - rv);
        if (fabs(rv) > maxref) maxref = fabs(rv);
        if (!(d <= maxd)) {
            maxd = d;
            worst = i;
        }
    }
    const double bound = atol + rtol * maxref;
    char where[128], gs[64], rs[64];
    where_str(&p->h, worst, where, sizeof where);
    int ok =
        check(nan_bad == 0 && maxd <= bound,
              "%s: %s max|cuda - cpu| %.3e <= %.3e (atol %.1e + rtol %.2e * max|cpu| %.3e); worst at %s: cuda "
              "%s, cpu %s; %zu NaN mismatches",
              op, what, maxd, bound, atol, rtol, maxref, where, value_str(dt, raw_get(dt, g, worst), gs, sizeof gs),
              value_str(dt, raw_get(dt, p->h.data, worst), rs, sizeof rs), nan_bad);
    tu_free(g, op, "download");
    return ok;
}

/* float32 statistics: rtol relative to (1 + max |cpu|). */
static int cmp_stat(const char *op, const char *what, const pair *p, double rtol)
{
    return cmp_norm(op, what, p, rtol, rtol);
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

/* Bit-identical device sides (two runs of one op). */
static int same_bits(const char *op, const char *what, const pair *a, const pair *b)
{
    unsigned char *x = pair_get(a), *y = pair_get(b);
    const size_t n = numel(a), es = ts_dtype_size(dtype(a));
    size_t diff = 0;
    for (size_t i = 0; i < n; i++) diff += memcmp(x + i * es, y + i * es, es) != 0;
    int ok = check(diff == 0, "%s: %s: identical bits over two runs (%zu of %zu differ)", op, what, diff, n);
    tu_free(x, op, "run 1");
    tu_free(y, op, "run 2");
    return ok;
}

static void shape_label(char *buf, size_t size, const char *op, const ts_tensor *t, const char *extra)
{
    char sh[TS_SHAPE_STR];
    snprintf(buf, size, "%s %s%s%s", op, ts_shape_str(t, sh), extra && *extra ? " " : "", extra ? extra : "");
}

/* ---- convert ------------------------------------------------------------------ */

/* Edges of the three types: specials, fp16's overflow (65504 is its largest,
 * 65520 the tie that rounds to infinity), bf16's (FLT_MAX rounds up to
 * infinity), fp16's subnormals and its underflow tie 2^-25, float32
 * subnormals (bf16 subnormals). */
static const float edges[] = {NAN,      INFINITY,  -INFINITY,   0.0f,        -0.0f,      65504.0f,  65519.0f,
                              65520.0f, -65520.0f, 70000.0f,    1e30f,       FLT_MAX,    -FLT_MAX,  0x1p-24f,
                              0x1p-25f, -0x1p-25f, 0x3p-26f,    6.0e-5f,     -1.0e-6f,   1e-40f,    -1e-45f,
                              3.0e38f,  0x1.01p0f, 0x1.0180p0f, 0x1.0080p0f, 0x1.002p0f, 0x1.003p0f};

/* A random value of dt in about [2^-30, 2^17) in magnitude, rounded to dt:
 * fp16's subnormals and overflow, bf16's whole usual range. */
static float wide_value(ts_dtype dt)
{
    double m = tu_uniform(&rng, 1, 2) * (tu_randint(&rng, 2) ? 1 : -1);
    return val(dt, bits_of(dt, (float)ldexp(m, tu_randint(&rng, 48) - 30)));
}

/* Random raw bits of dt: every NaN payload, subnormal and infinity. */
static uint32_t random_bits(ts_dtype dt)
{
    uint64_t r = tu_next(&rng);
    return dt == TS_F32 ? (uint32_t)r : (uint32_t)(r & 0xffffu);
}

/* Inputs of convert y (+)= x, element by element in logical order: a mix of
 * plain values, raw bit patterns, the edges above, and values at (or one
 * 64th of an ulp off) a rounding tie of y's type: for an overwrite, x is
 * the midpoint between two neighbours of y's type; for an accumulation, y
 * is a value of its type and x half its ulp, so y + x is the midpoint. */
static void convert_inputs(ts_dtype ydt, ts_dtype xdt, int accumulate, uint32_t *yr, uint32_t *xr, size_t n)
{
    const size_t ne = sizeof edges / sizeof edges[0];
    for (size_t k = 0; k < n; k++) {
        float x = (float)tu_uniform(&rng, -4, 4), y = (float)tu_uniform(&rng, -4, 4);
        int raw = 0; /* x's bits are set already */
        switch (tu_randint(&rng, 5)) {
        case 0: break; /* plain */
        case 1:
            xr[k] = random_bits(xdt);
            raw = 1;
            break;
        case 2:
            x = edges[tu_randint(&rng, (int)ne)];
            if (tu_randint(&rng, 2)) y = edges[tu_randint(&rng, (int)ne)]; /* inf + -inf, overflowing sums */
            break;
        case 3:
            x = wide_value(xdt);
            y = wide_value(ydt);
            break;
        default: {
            if (ydt == TS_F32) break; /* float32 sums round in float32 on both sides alike */
            const float v = wide_value(ydt);
            if (!isfinite(v)) break;                                     /* fp16 overflowed */
            const double off = 1.0 + (tu_randint(&rng, 3) - 1) * 0x1p-6; /* the tie, or 1/64 ulp either side */
            const double half_ulp = (tu_randint(&rng, 2) ? 0.5 : -0.5) * ulp_of(ydt, v) * off;
            if (accumulate) {
                y = v;
                x = (float)half_ulp;
            } else {
                x = (float)((double)v + half_ulp);
            }
        } break;
        }
        if (!raw) xr[k] = bits_of(xdt, x);
        /* An overwrite's y is garbage to be overwritten: NaN. */
        yr[k] = bits_of(ydt, accumulate ? y : NAN);
    }
}

static void test_convert(ts_dtype ydt, ts_dtype xdt, int accumulate, int N, int C, int H, int W)
{
    char op[256];
    pair x = pair_new(xdt, N, C, H, W), y = pair_new(ydt, N, C, H, W);
    snprintf(op, sizeof op, "convert [%d,%d,%d,%d] %s -> %s%s", N, C, H, W, ts_dtype_name(xdt), ts_dtype_name(ydt),
             accumulate ? " accumulate" : "");
    const size_t n = numel(&x);
    uint32_t *xr = tu_alloc(n * sizeof *xr), *yr = tu_alloc(n * sizeof *yr);
    convert_inputs(ydt, xdt, accumulate, yr, xr, n);
    pair_load_raw(&x, xr);
    pair_load_raw(&y, yr);
    if (cpu_ok(cpu->convert(&cctx, &y.h, &x.h, accumulate), op) &&
        gpu_ok(gpu->convert(&gctx, &y.d, &x.d, accumulate), op))
        cmp_exact(op, "y", &y);
    tu_free(xr, op, "x values");
    tu_free(yr, op, "y values");
    pair_free(&x, op, "x");
    pair_free(&y, op, "y");
}

/* y == x: accumulate doubles in place (fp16 overflows past 32752, bf16 past
 * about 1.7e38), overwrite leaves x as it was. */
static void test_convert_in_place(ts_dtype dt, int N, int C, int H, int W)
{
    char op[256];
    pair x = pair_new(dt, N, C, H, W);
    shape_label(op, sizeof op, "convert in place (y == x)", &x.h, NULL);
    const size_t n = numel(&x), ne = sizeof edges / sizeof edges[0];
    uint32_t *xr = tu_alloc(n * sizeof *xr);
    for (size_t k = 0; k < n; k++) {
        int kind = tu_randint(&rng, 3);
        float v = kind == 0   ? (float)tu_uniform(&rng, -4, 4)
                  : kind == 1 ? edges[tu_randint(&rng, (int)ne)]
                              : wide_value(dt);
        xr[k] = bits_of(dt, v);
    }
    pair_load_raw(&x, xr);
    for (int acc = 1; acc >= 0; acc--) {
        char lab[300];
        snprintf(lab, sizeof lab, "%s %s", op, acc ? "accumulate (doubling)" : "overwrite (no-op)");
        if (cpu_ok(cpu->convert(&cctx, &x.h, &x.h, acc), lab) && gpu_ok(gpu->convert(&gctx, &x.d, &x.d, acc), lab))
            cmp_exact(lab, "x", &x);
    }
    tu_free(xr, op, "x values");
    pair_free(&x, op, "x");
}

/* The layout itself, independently of the CPU backend: float32 NCHW ->
 * half NHWC on the GPU must put round(x[n,c,h,w]) (kernels/half.h's
 * rounding) at ((n*H + h)*W + w)*C + c, and back to float32 NCHW must give
 * its exact widening. */
static void test_convert_layout(ts_dtype dt, int N, int C, int H, int W)
{
    char op[256];
    pair x = pair_rand(TS_F32, N, C, H, W, -4, 4), y = pair_new(dt, N, C, H, W), z = pair_new(TS_F32, N, C, H, W);
    shape_label(op, sizeof op, "convert layout", &y.h, "from/to float32 NCHW");
    for (size_t i = 0; i < numel(&x); i += 7) x.h.data[i] = edges[i / 7 % (sizeof edges / sizeof edges[0])];
    pair_sync(&x);
    /* The expectations, in the host sides (the CPU backend is not called). */
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (int h = 0; h < H; h++)
                for (int w = 0; w < W; w++) {
                    uint16_t b = ts_f32_to_half(dt, x.h.data[at(&x.h, n, c, h, w)]);
                    y.h.half[at(&y.h, n, c, h, w)] = b;
                    z.h.data[at(&z.h, n, c, h, w)] = ts_half_to_f32(dt, b);
                }
    if (gpu_ok(gpu->convert(&gctx, &y.d, &x.d, 0), op))
        cmp_exact(op, "y = round(x) at its NHWC place (\"cpu\" below: the expected value)", &y);
    if (gpu_ok(gpu->convert(&gctx, &z.d, &y.d, 0), op))
        cmp_exact(op, "z = widen(y) back at its NCHW place (\"cpu\" below: the expected value)", &z);
    pair_free(&x, op, "x");
    pair_free(&y, op, "y");
    pair_free(&z, op, "z");
}

/* ---- relu, add, concat ----------------------------------------------------------- */

static void test_relu(ts_dtype dt, int N, int C, int H, int W)
{
    char op[256], lab[300];
    pair x = pair_new(dt, N, C, H, W), y = pair_new(dt, N, C, H, W), xi = pair_new(dt, N, C, H, W);
    shape_label(op, sizeof op, "relu", &x.h, NULL);
    pair_specials(&x);

    snprintf(lab, sizeof lab, "%s forward", op);
    pair_fill_const(&y, NAN);
    if (cpu_ok(cpu->relu_forward(&cctx, &y.h, &x.h), lab) && gpu_ok(gpu->relu_forward(&gctx, &y.d, &x.d), lab))
        cmp_exact(lab, "y (NaN, inf, zeros, subnormals)", &y);

    snprintf(lab, sizeof lab, "%s forward in place (y == x)", op);
    memcpy(xi.h.data, x.h.data, nbytes(&x));
    pair_sync(&xi);
    if (cpu_ok(cpu->relu_forward(&cctx, &xi.h, &xi.h), lab) && gpu_ok(gpu->relu_forward(&gctx, &xi.d, &xi.d), lab))
        cmp_exact(lab, "y", &xi);

    /* Backward against the CPU's forward output; dx += dy rounds once. */
    pair_sync(&y);
    pair dy = pair_rand(dt, N, C, H, W, -1, 1), dx = pair_rand(dt, N, C, H, W, -1, 1);
    snprintf(lab, sizeof lab, "%s backward", op);
    if (cpu_ok(cpu->relu_backward(&cctx, &dx.h, &dy.h, &y.h), lab) &&
        gpu_ok(gpu->relu_backward(&gctx, &dx.d, &dy.d, &y.d), lab))
        cmp_exact(lab, "dx (accumulated)", &dx);

    pair *all[] = {&x, &y, &xi, &dy, &dx};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "relu buffer");
}

static void test_add(ts_dtype dt, int N, int C, int H, int W)
{
    char op[256], lab[300];
    pair a = pair_new(dt, N, C, H, W), b = pair_new(dt, N, C, H, W), y = pair_new(dt, N, C, H, W);
    shape_label(op, sizeof op, "add", &a.h, NULL);
    pair_specials(&a);
    pair_specials(&b);

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

    pair dy = pair_rand(dt, N, C, H, W, -1, 1), da = pair_rand(dt, N, C, H, W, -1, 1);
    pair db = pair_rand(dt, N, C, H, W, -1, 1);
    snprintf(lab, sizeof lab, "%s backward", op);
    if (cpu_ok(cpu->add_backward(&cctx, &da.h, &db.h, &dy.h), lab) &&
        gpu_ok(gpu->add_backward(&gctx, &da.d, &db.d, &dy.d), lab)) {
        cmp_exact(lab, "da (accumulated)", &da);
        cmp_exact(lab, "db (accumulated)", &db);
    }
    /* y = a + a: da == db collects dy twice, (da + dy) + dy in float32,
     * rounded once. */
    snprintf(lab, sizeof lab, "%s backward da == db", op);
    if (cpu_ok(cpu->add_backward(&cctx, &da.h, &da.h, &dy.h), lab) &&
        gpu_ok(gpu->add_backward(&gctx, &da.d, &da.d, &dy.d), lab))
        cmp_exact(lab, "da (twice dy)", &da);

    pair *all[] = {&a, &b, &y, &dy, &da, &db};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "add buffer");
}

static void test_concat(ts_dtype dt, int N, int Ca, int Cb, int H, int W)
{
    char op[256], lab[300], extra[32];
    pair a = pair_new(dt, N, Ca, H, W), b = pair_new(dt, N, Cb, H, W), y = pair_new(dt, N, Ca + Cb, H, W);
    snprintf(extra, sizeof extra, "+ %d channels", Cb);
    shape_label(op, sizeof op, "concat", &a.h, extra);
    pair_specials(&a);
    pair_specials(&b);

    snprintf(lab, sizeof lab, "%s forward", op);
    pair_fill_const(&y, NAN);
    if (cpu_ok(cpu->concat_forward(&cctx, &y.h, &a.h, &b.h), lab) &&
        gpu_ok(gpu->concat_forward(&gctx, &y.d, &a.d, &b.d), lab))
        cmp_exact(lab, "y", &y);

    pair dy = pair_rand(dt, N, Ca + Cb, H, W, -1, 1), da = pair_rand(dt, N, Ca, H, W, -1, 1);
    pair db = pair_rand(dt, N, Cb, H, W, -1, 1);
    snprintf(lab, sizeof lab, "%s backward", op);
    if (cpu_ok(cpu->concat_backward(&cctx, &da.h, &db.h, &dy.h), lab) &&
        gpu_ok(gpu->concat_backward(&gctx, &da.d, &db.d, &dy.d), lab)) {
        cmp_exact(lab, "da (accumulated)", &da);
        cmp_exact(lab, "db (accumulated)", &db);
    }
    pair *all[] = {&a, &b, &y, &dy, &da, &db};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "concat buffer");
}

/* ---- max-pool and upsample -------------------------------------------------------- */

enum pool_fill { POOL_RANDOM, POOL_TIES, POOL_NAN, POOL_INF_NAN };
static const char *const pool_fill_name[] = {"random", "ties", "ties+NaN", "-inf+NaN"};

static void fill_pool(pair *x, enum pool_fill kind)
{
    const size_t n = numel(x);
    float *v = tu_alloc_f(n);
    switch (kind) {
    case POOL_RANDOM: tu_fill(&rng, v, n, -1, 1); break;
    /* Small integers: a pooled ReLU output has many exact ties, and the
     * first in scan order must win on both sides. */
    case POOL_TIES:
        for (size_t i = 0; i < n; i++) v[i] = (float)tu_randint(&rng, 3);
        break;
    case POOL_NAN:
        for (size_t i = 0; i < n; i++) v[i] = (float)tu_randint(&rng, 3);
        for (size_t k = 0; k < 1 + n / 20; k++) v[tu_randint(&rng, (int)n)] = NAN;
        break;
    case POOL_INF_NAN:
        for (size_t i = 0; i < n; i++) v[i] = tu_randint(&rng, 4) ? -INFINITY : (float)tu_randint(&rng, 2);
        for (size_t k = 0; k < 1 + n / 30; k++) v[tu_randint(&rng, (int)n)] = NAN;
        break;
    }
    pair_load(x, v);
    tu_free(v, "fill_pool", "values");
}

static void test_maxpool(ts_dtype dt, const ts_pool2d_params *p, const char *pname, int N, int C, int H, int W,
                         enum pool_fill kind)
{
    const int OH = ts_conv_out_size(H, p->kernel_h, p->stride_h, p->pad_h);
    const int OW = ts_conv_out_size(W, p->kernel_w, p->stride_w, p->pad_w);
    if (OH < 1 || OW < 1) return;
    char op[256], lab[300], extra[96];
    pair x = pair_new(dt, N, C, H, W), y = pair_new(dt, N, C, OH, OW);
    snprintf(extra, sizeof extra, "%s %s", pname, pool_fill_name[kind]);
    shape_label(op, sizeof op, "maxpool2d", &x.h, extra);
    fill_pool(&x, kind);
    ipair idx = ipair_new((size_t)N * C * OH * OW);
    for (size_t i = 0; i < idx.n; i++) idx.h[i] = -7; /* overwritten on both sides */
    ipair_sync(&idx);

    snprintf(lab, sizeof lab, "%s forward", op);
    pair_fill_const(&y, 12345.0f);
    if (cpu_ok(cpu->maxpool2d_forward(&cctx, &y.h, idx.h, &x.h, p), lab) &&
        gpu_ok(gpu->maxpool2d_forward(&gctx, &y.d, idx.d, &x.d, p), lab)) {
        cmp_exact(lab, "y", &y);
        cmp_index(lab, "arg-max index (NCHW order)", &idx);
    }

    /* Backward from the CPU's indices: exact on dyadic values, within one
     * half ulp on random ones (see GATHER_ULPS). */
    ipair_sync(&idx);
    pair dy = pair_new(dt, N, C, OH, OW), dx = pair_new(dt, N, C, H, W);
    pair_dyadic(&dy);
    pair_dyadic(&dx);
    snprintf(lab, sizeof lab, "%s backward dyadic", op);
    if (cpu_ok(cpu->maxpool2d_backward(&cctx, &dx.h, &dy.h, idx.h, p), lab) &&
        gpu_ok(gpu->maxpool2d_backward(&gctx, &dx.d, &dy.d, idx.d, p), lab))
        cmp_exact(lab, "dx (accumulated)", &dx);
    if (kind == POOL_RANDOM || kind == POOL_TIES) {
        pair_free(&dy, op, "dy");
        pair_free(&dx, op, "dx");
        dy = pair_rand(dt, N, C, OH, OW, -1, 1);
        dx = pair_rand(dt, N, C, H, W, -1, 1);
        const double fan = (double)p->kernel_h * p->kernel_w + 1;
        snprintf(lab, sizeof lab, "%s backward random", op);
        if (cpu_ok(cpu->maxpool2d_backward(&cctx, &dx.h, &dy.h, idx.h, p), lab) &&
            gpu_ok(gpu->maxpool2d_backward(&gctx, &dx.d, &dy.d, idx.d, p), lab))
            cmp_ulps(lab, "dx (accumulated)", &dx, GATHER_ULPS, 0, fan * 2 * FLT_EPSILON);
    }
    pair *all[] = {&x, &y, &dy, &dx};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "maxpool buffer");
    ipair_free(&idx, op, "index");
}

static void test_upsample(ts_dtype dt, int N, int C, int H, int W, int OH, int OW)
{
    char op[256], lab[300], extra[64];
    pair x = pair_new(dt, N, C, H, W), y = pair_new(dt, N, C, OH, OW);
    snprintf(extra, sizeof extra, "-> %dx%d", OH, OW);
    shape_label(op, sizeof op, "upsample_nearest", &x.h, extra);
    pair_specials(&x);

    snprintf(lab, sizeof lab, "%s forward", op);
    pair_fill_const(&y, NAN);
    if (cpu_ok(cpu->upsample_nearest_forward(&cctx, &y.h, &x.h), lab) &&
        gpu_ok(gpu->upsample_nearest_forward(&gctx, &y.d, &x.d), lab))
        cmp_exact(lab, "y", &y);

    pair dy = pair_new(dt, N, C, OH, OW), dx = pair_new(dt, N, C, H, W);
    pair_dyadic(&dy);
    pair_dyadic(&dx);
    snprintf(lab, sizeof lab, "%s backward dyadic", op);
    if (cpu_ok(cpu->upsample_nearest_backward(&cctx, &dx.h, &dy.h), lab) &&
        gpu_ok(gpu->upsample_nearest_backward(&gctx, &dx.d, &dy.d), lab))
        cmp_exact(lab, "dx (accumulated)", &dx);

    pair_free(&dy, op, "dy");
    pair_free(&dx, op, "dx");
    dy = pair_rand(dt, N, C, OH, OW, -1, 1);
    dx = pair_rand(dt, N, C, H, W, -1, 1);
    /* Up to ceil(OH/H) * ceil(OW/W) values add into one input element. */
    const double fan = ceil((double)OH / H) * ceil((double)OW / W) + 1;
    snprintf(lab, sizeof lab, "%s backward random", op);
    if (cpu_ok(cpu->upsample_nearest_backward(&cctx, &dx.h, &dy.h), lab) &&
        gpu_ok(gpu->upsample_nearest_backward(&gctx, &dx.d, &dy.d), lab))
        cmp_ulps(lab, "dx (accumulated)", &dx, GATHER_ULPS, 0, fan * 2 * FLT_EPSILON);

    pair *all[] = {&x, &y, &dy, &dx};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "upsample buffer");
}

/* ---- conv2d ---------------------------------------------------------------------- */

typedef struct conv_case {
    int n, cin, h, w, cout, k, s, pad;
    const char *name;
} conv_case;

static const conv_case conv_cases[] = {
    /* n, cin, h, w, cout, k, stride, pad */
    {2, 33, 7, 9, 17, 3, 1, 1, "3x3 s1 p1"},
    {2, 17, 13, 11, 33, 3, 2, 1, "3x3 s2 p1"},
    {2, 65, 13, 11, 33, 1, 2, 0, "1x1 s2 p0 (downsample)"},
    {2, 5, 7, 9, 3, 1, 1, 0, "1x1 s1 p0"},
    {2, 3, 7, 9, 5, 7, 2, 3, "7x7 s2 p3 (stem, C_in 3)"},
    {2, 3, 32, 32, 64, 7, 2, 3, "7x7 s2 p3 (stem, C_in 3)"},
    {2, 5, 1, 1, 17, 3, 1, 1, "3x3 s1 p1 on 1x1"},
    {2, 64, 32, 32, 64, 3, 1, 1, "3x3 s1 p1 64->64 (layer1)"},
};

static void test_conv(ts_dtype dt, const conv_case *cc)
{
    const ts_conv2d_params p = {cc->s, cc->s, cc->pad, cc->pad, 0, NULL};
    const int ho = ts_conv_out_size(cc->h, cc->k, cc->s, cc->pad), wo = ts_conv_out_size(cc->w, cc->k, cc->s, cc->pad);
    char op[256], lab[300];
    pair x = pair_rand(dt, cc->n, cc->cin, cc->h, cc->w, -1, 1);
    shape_label(op, sizeof op, "conv2d", &x.h, cc->name);
    pair w = pair_rand(dt, cc->cout, cc->cin, cc->k, cc->k, -0.5, 0.5), bias = vec_rand((size_t)cc->cout, -2, 2);
    pair y = pair_new(dt, cc->n, cc->cout, ho, wo), dy = pair_rand(dt, cc->n, cc->cout, ho, wo, -1, 1);
    /* Backward accumulates onto these. */
    pair dx = pair_rand(dt, cc->n, cc->cin, cc->h, cc->w, -1, 1);
    pair dw = pair_rand(dt, cc->cout, cc->cin, cc->k, cc->k, -1, 1), db = vec_rand((size_t)cc->cout, -1, 1);
    const double k_fwd = (double)cc->cin * cc->k * cc->k, k_data = (double)cc->cout * cc->k * cc->k;
    const double k_filter = (double)cc->n * ho * wo;

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
            cmp_norm(lab, "y", &y, 0, conv_rtol(dt, k_fwd));
    }

    snprintf(lab, sizeof lab, "%s backward_data", op);
    if (cpu_ok(cpu->conv2d_backward_data(&cctx, &dx.h, &dy.h, &w.h, &p), lab) &&
        gpu_ok(gpu->conv2d_backward_data(&gctx, &dx.d, &dy.d, &w.d, &p), lab))
        cmp_norm(lab, "dx (accumulated)", &dx, 0, conv_rtol(dt, k_data));

    snprintf(lab, sizeof lab, "%s backward_filter", op);
    if (cpu_ok(cpu->conv2d_backward_filter(&cctx, &dw.h, &dy.h, &x.h, &p), lab) &&
        gpu_ok(gpu->conv2d_backward_filter(&gctx, &dw.d, &dy.d, &x.d, &p), lab))
        cmp_norm(lab, "dw (accumulated)", &dw, 0, conv_rtol(dt, k_filter));

    /* dbias is float32, a double sum of the same widened dy on both sides. */
    snprintf(lab, sizeof lab, "%s backward_bias", op);
    if (cpu_ok(cpu->conv2d_backward_bias(&cctx, db.h.data, &dy.h), lab) &&
        gpu_ok(gpu->conv2d_backward_bias(&gctx, db.d.data, &dy.d), lab))
        cmp_stat(lab, "dbias (accumulated, float32)", &db, sum_rtol(k_filter));

    pair *all[] = {&x, &w, &bias, &y, &dy, &dx, &dw, &db};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "conv buffer");
}

/* The forward with the fused add (p.add, cuDNN's z), the add of y's half
 * type: y = conv + bias + widened add, then the ReLU, rounded once on the
 * CPU. Four variants: bias + ReLU (cuDNN's fused call with alpha2 = 1, or
 * two passes where cuDNN does not support z for the plan), bias without
 * ReLU, ReLU without bias, and neither (two passes each). The tolerance is
 * the conv forward's: the fused call rounds once, the two passes twice
 * (cuDNN's output, then the epilogue), which conv_rtol allows; the add
 * (up to 2, as large as a ResNet shortcut) is far outside it if lost. y is
 * prefilled with NaN, and the add must come out bit for bit as it went in. */
static void test_conv_add(ts_dtype dt, const conv_case *cc)
{
    const int ho = ts_conv_out_size(cc->h, cc->k, cc->s, cc->pad), wo = ts_conv_out_size(cc->w, cc->k, cc->s, cc->pad);
    char op[256], lab[300];
    pair x = pair_rand(dt, cc->n, cc->cin, cc->h, cc->w, -1, 1);
    shape_label(op, sizeof op, "conv2d +add", &x.h, cc->name);
    pair w = pair_rand(dt, cc->cout, cc->cin, cc->k, cc->k, -0.5, 0.5), bias = vec_rand((size_t)cc->cout, -2, 2);
    pair add = pair_rand(dt, cc->n, cc->cout, ho, wo, -2, 2), y = pair_new(dt, cc->n, cc->cout, ho, wo);
    const size_t bytes = nbytes(&add);
    void *add0 = tu_alloc(bytes);
    memcpy(add0, add.h.data, bytes);
    const double k_fwd = (double)cc->cin * cc->k * cc->k + 2; /* the bias and the add: two more terms */

    static const struct {
        int bias, relu;
        const char *name;
    } variants[] = {{1, 1, "+bias +add +relu"}, {1, 0, "+bias +add"}, {0, 1, "+add +relu"}, {0, 0, "+add"}};
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        ts_conv2d_params pv = {cc->s, cc->s, cc->pad, cc->pad, variants[v].relu, NULL};
        const float *bh = variants[v].bias ? bias.h.data : NULL, *bd = variants[v].bias ? bias.d.data : NULL;
        snprintf(lab, sizeof lab, "%s forward %s", op, variants[v].name);
        pair_fill_const(&y, NAN);
        pv.add = &add.h;
        const int ok_cpu = cpu_ok(cpu->conv2d_forward(&cctx, &y.h, &x.h, &w.h, bh, &pv), lab);
        pv.add = &add.d;
        if (ok_cpu && gpu_ok(gpu->conv2d_forward(&gctx, &y.d, &x.d, &w.d, bd, &pv), lab))
            cmp_norm(lab, "y", &y, 0, conv_rtol(dt, k_fwd));
        /* The add is an input on both sides: untouched, bits included. */
        const size_t es = ts_dtype_size(dt), n = numel(&add);
        unsigned char *g = pair_get(&add);
        size_t dev_diff = 0, host_diff = 0;
        for (size_t i = 0; i < n; i++) {
            dev_diff += memcmp(g + i * es, (unsigned char *)add0 + i * es, es) != 0;
            host_diff += memcmp((unsigned char *)add.h.data + i * es, (unsigned char *)add0 + i * es, es) != 0;
        }
        check(dev_diff == 0 && host_diff == 0, "%s: add unchanged (%zu cuda, %zu cpu of %zu values differ)", lab,
              dev_diff, host_diff, n);
        tu_free(g, lab, "add download");
    }

    tu_free(add0, op, "add copy");
    pair *all[] = {&x, &w, &bias, &add, &y};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "conv +add buffer");
}

/* The half bias rule on the GPU, on both forward paths: a bias of 1 + 0.4
 * ulp (ulp = the half type's spacing at 1) rounds to 1, the conv adds 0.25
 * ulp (x = 1, w = ulp / 4, exact). With the bias rounded first, as the CPU
 * and cuDNN's fused call take it, y = round(1 + 0.25 ulp) = 1 on either
 * path (the two-pass path's first rounding leaves 0.25 ulp exact); the
 * float32 bias would give round(1 + 0.65 ulp) = 1 + ulp. Eight channels of
 * the same, so the shape is not a degenerate 1-channel one. */
static void test_conv_half_bias(ts_dtype dt)
{
    const int C = 8;
    const double ulp = dt == TS_BF16 ? 0x1p-7 : 0x1p-10;
    char op[96];
    snprintf(op, sizeof op, "conv2d %s half bias [1,%d,3,3] 1x1", ts_dtype_name(dt), C);
    pair x = pair_new(dt, 1, C, 3, 3), w = pair_new(dt, C, C, 1, 1), bias = vec_new((size_t)C);
    pair y = pair_new(dt, 1, C, 3, 3);
    float *xv = tu_alloc_f(numel(&x)), *wv = tu_alloc_f(numel(&w));
    /* Channel 0 of x is 1, the rest 0; every output channel takes ulp / 4 of it. */
    for (size_t i = 0; i < numel(&x); i++) xv[i] = i < 9 ? 1.0f : 0.0f;
    for (int o = 0; o < C; o++)
        for (int c = 0; c < C; c++) wv[o * C + c] = c == 0 ? (float)(0.25 * ulp) : 0.0f;
    pair_load(&x, xv);
    pair_load(&w, wv);
    for (int o = 0; o < C; o++) bias.h.data[o] = (float)(1.0 + 0.4 * ulp);
    pair_sync(&bias);
    const uint16_t one = ts_f32_to_half(dt, 1.0f);
    for (int relu = 0; relu <= 1; relu++) {
        char lab[256];
        snprintf(lab, sizeof lab, "%s forward +bias%s (%s path)", op, relu ? " +relu" : "",
                 relu ? "fused unless cuDNN does not support it" : "two passes");
        const ts_conv2d_params p = {1, 1, 0, 0, relu, NULL};
        pair_fill_const(&y, NAN);
        if (cpu_ok(cpu->conv2d_forward(&cctx, &y.h, &x.h, &w.h, bias.h.data, &p), lab) &&
            gpu_ok(gpu->conv2d_forward(&gctx, &y.d, &x.d, &w.d, bias.d.data, &p), lab)) {
            uint16_t *g = pair_get(&y);
            size_t bad_cpu = 0, bad_gpu = 0;
            for (size_t i = 0; i < numel(&y); i++) {
                bad_cpu += y.h.half[i] != one;
                bad_gpu += g[i] != one;
            }
            check(bad_cpu == 0 && bad_gpu == 0,
                  "%s: y = 1 (0x%04x) everywhere, the bias rounded to %s before the add: %zu cpu and %zu cuda values "
                  "differ (cuda y[0] = 0x%04x, cpu 0x%04x)",
                  lab, one, ts_dtype_name(dt), bad_cpu, bad_gpu, g[0], y.h.half[0]);
            tu_free(g, lab, "download");
        }
    }
    tu_free(xv, op, "x values");
    tu_free(wv, op, "w values");
    pair *all[] = {&x, &w, &bias, &y};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "buffer");
}

/* ---- batch norm ----------------------------------------------------------------- */

/* Per-channel offsets and scales, as real activations have them. */
static void fill_bn_input(pair *x)
{
    const ts_tensor *t = &x->h;
    const size_t plane = (size_t)t->h * t->w;
    float *v = tu_alloc_f(numel(x));
    for (int c = 0; c < t->c; c++) {
        double off = tu_uniform(&rng, -2, 2), sc = tu_uniform(&rng, 0.5, 2);
        for (int n = 0; n < t->n; n++)
            for (size_t i = 0; i < plane; i++)
                v[((size_t)n * t->c + c) * plane + i] = (float)(off + sc * tu_uniform(&rng, -1, 1));
    }
    pair_load(x, v);
    tu_free(v, "fill_bn_input", "values");
}

static void test_batchnorm(ts_dtype dt, int N, int C, int H, int W)
{
    const ts_bn_params p = {1e-5f, 0.1f};
    char op[256], lab[300];
    pair x = pair_new(dt, N, C, H, W);
    shape_label(op, sizeof op, "batchnorm", &x.h, NULL);
    fill_bn_input(&x);
    pair gamma = vec_rand((size_t)C, 0.5, 1.5), beta = vec_rand((size_t)C, -0.5, 0.5);
    pair rmean = vec_rand((size_t)C, -1, 1), rvar = vec_rand((size_t)C, 0.5, 2);
    pair y = pair_new(dt, N, C, H, W), smean = vec_new((size_t)C), sinv = vec_new((size_t)C);
    const double rt = sum_rtol((double)N * H * W);

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
        cmp_ulps(lab, "y", &y, 1, 0, rt);
        cmp_stat(lab, "save_mean", &smean, rt);
        cmp_stat(lab, "save_invstd", &sinv, rt);
        cmp_stat(lab, "running_mean", &rmean, rt);
        cmp_stat(lab, "running_var (unbiased)", &rvar, rt);
    }

    /* Eval from the CPU's updated running statistics, on both sides. */
    pair_sync(&rmean);
    pair_sync(&rvar);
    snprintf(lab, sizeof lab, "%s forward_eval", op);
    pair_fill_const(&y, NAN);
    if (cpu_ok(cpu->batchnorm_forward_eval(&cctx, &y.h, &x.h, gamma.h.data, beta.h.data, rmean.h.data, rvar.h.data, &p),
               lab) &&
        gpu_ok(gpu->batchnorm_forward_eval(&gctx, &y.d, &x.d, gamma.d.data, beta.d.data, rmean.d.data, rvar.d.data, &p),
               lab))
        cmp_ulps(lab, "y", &y, 1, 0, 16 * FLT_EPSILON);

    /* Backward from the CPU's saved statistics on both sides, so it is
     * compared on its own. */
    pair_sync(&smean);
    pair_sync(&sinv);
    pair dy = pair_rand(dt, N, C, H, W, -1, 1), dx = pair_rand(dt, N, C, H, W, -1, 1);
    pair dgamma = vec_rand((size_t)C, -1, 1), dbeta = vec_rand((size_t)C, -1, 1);
    snprintf(lab, sizeof lab, "%s backward", op);
    if (cpu_ok(cpu->batchnorm_backward(&cctx, &dx.h, dgamma.h.data, dbeta.h.data, &dy.h, &x.h, gamma.h.data,
                                       smean.h.data, sinv.h.data),
               lab) &&
        gpu_ok(gpu->batchnorm_backward(&gctx, &dx.d, dgamma.d.data, dbeta.d.data, &dy.d, &x.d, gamma.d.data,
                                       smean.d.data, sinv.d.data),
               lab)) {
        cmp_ulps(lab, "dx (accumulated)", &dx, 1, 0, rt);
        cmp_stat(lab, "dgamma (accumulated, float32)", &dgamma, rt);
        cmp_stat(lab, "dbeta (accumulated, float32)", &dbeta, rt);
    }

    pair *all[] = {&x, &gamma, &beta, &rmean, &rvar, &y, &smean, &sinv, &dy, &dx, &dgamma, &dbeta};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) pair_free(all[i], op, "bn buffer");
}

/* ---- determinism ------------------------------------------------------------------ */

/* Every backward op twice onto equal prefills, with the deterministic
 * setting on: the same bits. The reductions (conv filter and bias, batch
 * norm) and the gathers are where an order could vary. */
static void test_determinism(ts_dtype dt)
{
    char op[160];
    snprintf(op, sizeof op, "deterministic %s", ts_dtype_name(dt));
    ts_cuda_set_deterministic(1);
    const int N = 2, C = 64, H = 32, W = 32;

    static const struct {
        int cin, cout, k, s, pad;
    } convs[] = {{64, 64, 3, 1, 1}, {3, 64, 7, 2, 3}, {65, 33, 1, 2, 0}};
    for (size_t i = 0; i < sizeof convs / sizeof convs[0]; i++) {
        char lab[200];
        snprintf(lab, sizeof lab, "%s conv2d [%d,%d,%d,%d] -> %d k%d s%d p%d", op, N, convs[i].cin, H, W, convs[i].cout,
                 convs[i].k, convs[i].s, convs[i].pad);
        const ts_conv2d_params p = {convs[i].s, convs[i].s, convs[i].pad, convs[i].pad, 0, NULL};
        const int ho = ts_conv_out_size(H, convs[i].k, convs[i].s, convs[i].pad);
        const int wo = ts_conv_out_size(W, convs[i].k, convs[i].s, convs[i].pad);
        pair x = pair_rand(dt, N, convs[i].cin, H, W, -1, 1);
        pair w = pair_rand(dt, convs[i].cout, convs[i].cin, convs[i].k, convs[i].k, -0.5, 0.5);
        pair dy = pair_rand(dt, N, convs[i].cout, ho, wo, -1, 1);
        pair dx1, dx2, dw1, dw2, db1, db2;
        twin(&dx1, &dx2, dt, N, convs[i].cin, H, W);
        twin(&dw1, &dw2, dt, convs[i].cout, convs[i].cin, convs[i].k, convs[i].k);
        twin(&db1, &db2, TS_F32, convs[i].cout, 1, 1, 1);
        if (gpu_ok(gpu->conv2d_backward_data(&gctx, &dx1.d, &dy.d, &w.d, &p), lab) &&
            gpu_ok(gpu->conv2d_backward_data(&gctx, &dx2.d, &dy.d, &w.d, &p), lab))
            same_bits(lab, "backward_data dx", &dx1, &dx2);
        if (gpu_ok(gpu->conv2d_backward_filter(&gctx, &dw1.d, &dy.d, &x.d, &p), lab) &&
            gpu_ok(gpu->conv2d_backward_filter(&gctx, &dw2.d, &dy.d, &x.d, &p), lab))
            same_bits(lab, "backward_filter dw", &dw1, &dw2);
        if (gpu_ok(gpu->conv2d_backward_bias(&gctx, db1.d.data, &dy.d), lab) &&
            gpu_ok(gpu->conv2d_backward_bias(&gctx, db2.d.data, &dy.d), lab))
            same_bits(lab, "backward_bias dbias", &db1, &db2);
        pair *all[] = {&x, &w, &dy, &dx1, &dx2, &dw1, &dw2, &db1, &db2};
        for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) pair_free(all[k], lab, "buffer");
    }

    /* Batch norm backward, from the GPU's own forward statistics. */
    {
        char lab[200];
        snprintf(lab, sizeof lab, "%s batchnorm [%d,%d,%d,%d]", op, N, C, H, W);
        const ts_bn_params p = {1e-5f, 0.1f};
        pair x = pair_new(dt, N, C, H, W), y = pair_new(dt, N, C, H, W), dy = pair_rand(dt, N, C, H, W, -1, 1);
        fill_bn_input(&x);
        pair gamma = vec_rand((size_t)C, 0.5, 1.5), beta = vec_rand((size_t)C, -0.5, 0.5);
        pair sm = vec_new((size_t)C), si = vec_new((size_t)C);
        pair dx1, dx2, dg1, dg2, db1, db2;
        twin(&dx1, &dx2, dt, N, C, H, W);
        twin(&dg1, &dg2, TS_F32, C, 1, 1, 1);
        twin(&db1, &db2, TS_F32, C, 1, 1, 1);
        if (gpu_ok(gpu->batchnorm_forward_train(&gctx, &y.d, sm.d.data, si.d.data, &x.d, gamma.d.data, beta.d.data,
                                                NULL, NULL, &p),
                   lab) &&
            gpu_ok(gpu->batchnorm_backward(&gctx, &dx1.d, dg1.d.data, db1.d.data, &dy.d, &x.d, gamma.d.data, sm.d.data,
                                           si.d.data),
                   lab) &&
            gpu_ok(gpu->batchnorm_backward(&gctx, &dx2.d, dg2.d.data, db2.d.data, &dy.d, &x.d, gamma.d.data, sm.d.data,
                                           si.d.data),
                   lab)) {
            same_bits(lab, "backward dx", &dx1, &dx2);
            same_bits(lab, "backward dgamma", &dg1, &dg2);
            same_bits(lab, "backward dbeta", &db1, &db2);
        }
        pair *all[] = {&x, &y, &dy, &gamma, &beta, &sm, &si, &dx1, &dx2, &dg1, &dg2, &db1, &db2};
        for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) pair_free(all[k], lab, "buffer");
    }

    /* The gathers: max-pool (ties) and upsample (2x and 7 -> 13). */
    {
        char lab[200];
        snprintf(lab, sizeof lab, "%s maxpool2d/upsample backward", op);
        const ts_pool2d_params pp = {3, 3, 2, 2, 1, 1};
        const int OH = ts_conv_out_size(33, 3, 2, 1), OW = ts_conv_out_size(31, 3, 2, 1);
        pair x = pair_new(dt, N, C, 33, 31), y = pair_new(dt, N, C, OH, OW), dy = pair_rand(dt, N, C, OH, OW, -1, 1);
        fill_pool(&x, POOL_TIES);
        ipair idx = ipair_new((size_t)N * C * OH * OW);
        pair dx1, dx2;
        twin(&dx1, &dx2, dt, N, C, 33, 31);
        if (gpu_ok(gpu->maxpool2d_forward(&gctx, &y.d, idx.d, &x.d, &pp), lab) &&
            gpu_ok(gpu->maxpool2d_backward(&gctx, &dx1.d, &dy.d, idx.d, &pp), lab) &&
            gpu_ok(gpu->maxpool2d_backward(&gctx, &dx2.d, &dy.d, idx.d, &pp), lab))
            same_bits(lab, "maxpool2d dx", &dx1, &dx2);
        static const int sizes[][4] = {{16, 16, 32, 32}, {7, 7, 13, 13}};
        for (int s = 0; s < 2; s++) {
            pair g = pair_rand(dt, N, C, sizes[s][2], sizes[s][3], -1, 1), u1, u2;
            twin(&u1, &u2, dt, N, C, sizes[s][0], sizes[s][1]);
            if (gpu_ok(gpu->upsample_nearest_backward(&gctx, &u1.d, &g.d), lab) &&
                gpu_ok(gpu->upsample_nearest_backward(&gctx, &u2.d, &g.d), lab))
                same_bits(lab, s == 0 ? "upsample 16x16 -> 32x32 dx" : "upsample 7x7 -> 13x13 dx", &u1, &u2);
            pair_free(&g, lab, "dy");
            pair_free(&u1, lab, "dx1");
            pair_free(&u2, lab, "dx2");
        }
        pair *all[] = {&x, &y, &dy, &dx1, &dx2};
        for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) pair_free(all[k], lab, "buffer");
        ipair_free(&idx, lab, "index");
    }

    /* The elementwise backward ops. */
    {
        char lab[200];
        snprintf(lab, sizeof lab, "%s relu/add/concat backward [%d,%d,%d,%d]", op, N, C, H, W);
        pair y = pair_rand(dt, N, C, H, W, -1, 1), dy = pair_rand(dt, N, C, H, W, -1, 1);
        pair dyc = pair_rand(dt, N, 2 * C, H, W, -1, 1);
        pair a1, a2, b1, b2;
        twin(&a1, &a2, dt, N, C, H, W);
        twin(&b1, &b2, dt, N, C, H, W);
        if (gpu_ok(gpu->relu_backward(&gctx, &a1.d, &dy.d, &y.d), lab) &&
            gpu_ok(gpu->relu_backward(&gctx, &a2.d, &dy.d, &y.d), lab))
            same_bits(lab, "relu dx", &a1, &a2);
        if (gpu_ok(gpu->add_backward(&gctx, &a1.d, &b1.d, &dy.d), lab) &&
            gpu_ok(gpu->add_backward(&gctx, &a2.d, &b2.d, &dy.d), lab)) {
            same_bits(lab, "add da", &a1, &a2);
            same_bits(lab, "add db", &b1, &b2);
        }
        if (gpu_ok(gpu->concat_backward(&gctx, &a1.d, &b1.d, &dyc.d), lab) &&
            gpu_ok(gpu->concat_backward(&gctx, &a2.d, &b2.d, &dyc.d), lab)) {
            same_bits(lab, "concat da", &a1, &a2);
            same_bits(lab, "concat db", &b1, &b2);
        }
        pair *all[] = {&y, &dy, &dyc, &a1, &a2, &b1, &b2};
        for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) pair_free(all[k], lab, "buffer");
    }
    ts_cuda_set_deterministic(0);
}

/* ---- errors ---------------------------------------------------------------------- */

/* The CUDA op must refuse what the CPU op refuses, with TS_ERR_INVALID_ARG
 * and a message naming the op and the reason (`why`: "dtype", "float32",
 * "overlap"), before touching device memory; and the device must still be
 * healthy afterwards. */
static void expect_refused(const char *what, const char *opname, const char *why, ts_status sc, ts_status sg,
                           const char *gmsg)
{
    check(sc == TS_ERR_INVALID_ARG, "errors: %s: cpu refuses it (%s)", what, ts_status_name(sc));
    check(sg == TS_ERR_INVALID_ARG && strstr(gmsg, opname) != NULL && strstr(gmsg, why) != NULL,
          "errors: %s: cuda returns \"%s\" (want \"%s\") with a message naming %s and \"%s\": \"%s\"", what,
          ts_status_name(sg), ts_status_name(TS_ERR_INVALID_ARG), opname, why, gmsg);
    ts_status ss = gpu->memory->sync();
    check(ss == TS_OK, "errors: %s: the device is healthy afterwards%s%s", what, ss == TS_OK ? "" : ": ",
          ss == TS_OK ? "" : ts_last_error());
}

#define REFUSED(what, opname, why, cpu_call, gpu_call)                                                                 \
    do {                                                                                                               \
        ts_status sc_ = (cpu_call);                                                                                    \
        ts_clear_error();                                                                                              \
        ts_status sg_ = (gpu_call);                                                                                    \
        char gmsg_[600];                                                                                               \
        snprintf(gmsg_, sizeof gmsg_, "%s", ts_last_error());                                                          \
        expect_refused(what, opname, why, sc_, sg_, gmsg_);                                                            \
    } while (0)

static void test_errors(void)
{
    const char *op = "errors";
    /* Six separate buffers, each big enough for any view below, so that no
     * call is refused for aliasing instead of for its dtypes, and a backend
     * that skipped the check would run on valid memory (and fail the status
     * check) rather than crash. */
    enum { NBUF = 6 };
    pair buf[NBUF];
    for (int i = 0; i < NBUF; i++) buf[i] = pair_new(TS_F32, 2, 64, 16, 16);
    pair v = vec_rand(64, 0.5, 1.5);
    ipair idx = ipair_new(2 * 64 * 16 * 16), lbl = ipair_new(2 * 7 * 9);
    for (size_t i = 0; i < lbl.n; i++) lbl.h[i] = (int32_t)(i % 3);
    ipair_sync(&idx);
    ipair_sync(&lbl);
/* Views of buffer i's host (T) or device (D) side as dtype dt. */
#define T(i, dt, d0, d1, d2, d3) ts_tensor_view_as(buf[i].h.data, dt, d0, d1, d2, d3)
#define D(i, dt, d0, d1, d2, d3) ts_tensor_view_as(buf[i].d.data, dt, d0, d1, d2, d3)
    const ts_dtype B = TS_BF16, H = TS_F16, F = TS_F32;
    float *hv = v.h.data, *dv = v.d.data;

    /* conv2d: a float32 weight with bf16 activations (the cast forgotten);
     * backward with fp16 dx against bf16 dy and w; a float32 dw. */
    const ts_conv2d_params cp = {1, 1, 1, 1, 0, NULL};
    {
        ts_tensor hx = T(0, B, 2, 3, 7, 9), dx = D(0, B, 2, 3, 7, 9), hw = T(1, F, 4, 3, 3, 3),
                  dw = D(1, F, 4, 3, 3, 3);
        ts_tensor hy = T(2, B, 2, 4, 7, 9), dy = D(2, B, 2, 4, 7, 9);
        REFUSED("conv2d_forward bf16 x and y, float32 w", "conv2d_forward", "dtype",
                cpu->conv2d_forward(&cctx, &hy, &hx, &hw, NULL, &cp),
                gpu->conv2d_forward(&gctx, &dy, &dx, &dw, NULL, &cp));
        ts_tensor hdx = T(3, H, 2, 3, 7, 9), ddx = D(3, H, 2, 3, 7, 9), hwb = T(1, B, 4, 3, 3, 3),
                  dwb = D(1, B, 4, 3, 3, 3);
        REFUSED("conv2d_backward_data fp16 dx, bf16 dy and w", "conv2d_backward_data", "dtype",
                cpu->conv2d_backward_data(&cctx, &hdx, &hy, &hwb, &cp),
                gpu->conv2d_backward_data(&gctx, &ddx, &dy, &dwb, &cp));
        REFUSED("conv2d_backward_filter float32 dw, bf16 dy and x", "conv2d_backward_filter", "dtype",
                cpu->conv2d_backward_filter(&cctx, &hw, &hy, &hx, &cp),
                gpu->conv2d_backward_filter(&gctx, &dw, &dy, &dx, &cp));
        /* The fused add of another half type than y (all else bf16). */
        ts_tensor hz = T(4, H, 2, 4, 7, 9), dz = D(4, H, 2, 4, 7, 9);
        ts_conv2d_params ch = cp, cd = cp;
        ch.add = &hz;
        cd.add = &dz;
        REFUSED("conv2d_forward bf16 y, fp16 add", "conv2d_forward", "add",
                cpu->conv2d_forward(&cctx, &hy, &hx, &hwb, NULL, &ch),
                gpu->conv2d_forward(&gctx, &dy, &dx, &dwb, NULL, &cd));
    }

    /* batchnorm: y and x, dx and dy of different dtypes. */
    const ts_bn_params bp = {1e-5f, 0.1f};
    {
        ts_tensor hx = T(0, B, 2, 3, 7, 9), dx = D(0, B, 2, 3, 7, 9), hy = T(1, H, 2, 3, 7, 9),
                  dy = D(1, H, 2, 3, 7, 9);
        ts_tensor hyf = T(2, F, 2, 3, 7, 9), dyf = D(2, F, 2, 3, 7, 9);
        REFUSED("batchnorm_forward_train fp16 y, bf16 x", "batchnorm_forward_train", "dtype",
                cpu->batchnorm_forward_train(&cctx, &hy, hv, hv + 8, &hx, hv + 16, hv + 24, NULL, NULL, &bp),
                gpu->batchnorm_forward_train(&gctx, &dy, dv, dv + 8, &dx, dv + 16, dv + 24, NULL, NULL, &bp));
        REFUSED("batchnorm_forward_eval float32 y, bf16 x", "batchnorm_forward_eval", "dtype",
                cpu->batchnorm_forward_eval(&cctx, &hyf, &hx, hv, hv + 8, hv + 16, hv + 24, &bp),
                gpu->batchnorm_forward_eval(&gctx, &dyf, &dx, dv, dv + 8, dv + 16, dv + 24, &bp));
        ts_tensor hdx = T(3, B, 2, 3, 7, 9), ddx = D(3, B, 2, 3, 7, 9);
        REFUSED("batchnorm_backward bf16 dx and x, fp16 dy", "batchnorm_backward", "dtype",
                cpu->batchnorm_backward(&cctx, &hdx, hv, hv + 8, &hy, &hx, hv + 16, hv + 24, hv + 32),
                gpu->batchnorm_backward(&gctx, &ddx, dv, dv + 8, &dy, &dx, dv + 16, dv + 24, dv + 32));
    }

    /* relu, add, concat. */
    {
        ts_tensor hb = T(0, B, 2, 3, 7, 9), db = D(0, B, 2, 3, 7, 9), hh = T(1, H, 2, 3, 7, 9),
                  dh = D(1, H, 2, 3, 7, 9);
        ts_tensor hf = T(2, F, 2, 3, 7, 9), df = D(2, F, 2, 3, 7, 9), hb2 = T(3, B, 2, 3, 7, 9),
                  db2 = D(3, B, 2, 3, 7, 9);
        REFUSED("relu_forward float32 y, bf16 x", "relu_forward", "dtype", cpu->relu_forward(&cctx, &hf, &hb),
                gpu->relu_forward(&gctx, &df, &db));
        REFUSED("relu_backward bf16 dx and dy, fp16 y", "relu_backward", "dtype",
                cpu->relu_backward(&cctx, &hb, &hb2, &hh), gpu->relu_backward(&gctx, &db, &db2, &dh));
        ts_tensor hy = T(4, B, 2, 3, 7, 9), dy = D(4, B, 2, 3, 7, 9);
        REFUSED("add_forward bf16 a and y, fp16 b", "add_forward", "dtype", cpu->add_forward(&cctx, &hy, &hb, &hh),
                gpu->add_forward(&gctx, &dy, &db, &dh));
        REFUSED("add_backward float32 da, bf16 db and dy", "add_backward", "dtype",
                cpu->add_backward(&cctx, &hf, &hb, &hb2), gpu->add_backward(&gctx, &df, &db, &db2));
        ts_tensor hc = T(5, B, 2, 6, 7, 9), dc = D(5, B, 2, 6, 7, 9);
        REFUSED("concat_forward bf16 y and a, fp16 b", "concat_forward", "dtype",
                cpu->concat_forward(&cctx, &hc, &hb, &hh), gpu->concat_forward(&gctx, &dc, &db, &dh));
        ts_tensor hch = T(5, H, 2, 6, 7, 9), dch = D(5, H, 2, 6, 7, 9);
        REFUSED("concat_backward fp16 dy and da, bf16 db", "concat_backward", "dtype",
                cpu->concat_backward(&cctx, &hh, &hb, &hch), gpu->concat_backward(&gctx, &dh, &db, &dch));
    }

    /* maxpool and upsample. */
    {
        const ts_pool2d_params pp = {3, 3, 2, 2, 1, 1};
        ts_tensor hx = T(0, B, 2, 3, 7, 9), dx = D(0, B, 2, 3, 7, 9), hy = T(1, H, 2, 3, 4, 5),
                  dy = D(1, H, 2, 3, 4, 5);
        ts_tensor hyf = T(2, F, 2, 3, 4, 5), dyf = D(2, F, 2, 3, 4, 5);
        REFUSED("maxpool2d_forward fp16 y, bf16 x", "maxpool2d_forward", "dtype",
                cpu->maxpool2d_forward(&cctx, &hy, idx.h, &hx, &pp),
                gpu->maxpool2d_forward(&gctx, &dy, idx.d, &dx, &pp));
        REFUSED("maxpool2d_backward bf16 dx, float32 dy", "maxpool2d_backward", "dtype",
                cpu->maxpool2d_backward(&cctx, &hx, &hyf, idx.h, &pp),
                gpu->maxpool2d_backward(&gctx, &dx, &dyf, idx.d, &pp));
        ts_tensor hu = T(3, B, 2, 3, 14, 18), du = D(3, B, 2, 3, 14, 18), hxh = T(4, H, 2, 3, 7, 9),
                  dxh = D(4, H, 2, 3, 7, 9);
        REFUSED("upsample_nearest_forward bf16 y, fp16 x", "upsample_nearest_forward", "dtype",
                cpu->upsample_nearest_forward(&cctx, &hu, &hxh), gpu->upsample_nearest_forward(&gctx, &du, &dxh));
        ts_tensor hxf = T(5, F, 2, 3, 7, 9), dxf = D(5, F, 2, 3, 7, 9);
        REFUSED("upsample_nearest_backward float32 dx, bf16 dy", "upsample_nearest_backward", "dtype",
                cpu->upsample_nearest_backward(&cctx, &hxf, &hu), gpu->upsample_nearest_backward(&gctx, &dxf, &du));
    }

    /* The losses take float32 logits only (autocast runs them in float32;
     * the graph casts its half logits with convert), and dlogits of the
     * logits' dtype. */
    {
        ts_tensor hz = T(0, B, 2, 3, 7, 9), dz = D(0, B, 2, 3, 7, 9), hzh = T(1, H, 2, 3, 7, 9),
                  dzh = D(1, H, 2, 3, 7, 9);
        ts_tensor hg = T(2, B, 2, 3, 7, 9), dg = D(2, B, 2, 3, 7, 9), hzf = T(3, F, 2, 3, 7, 9),
                  dzf = D(3, F, 2, 3, 7, 9);
        ts_tensor hgf = T(4, F, 2, 3, 7, 9), dgf = D(4, F, 2, 3, 7, 9);
        ts_ce_params ce = {.ignore_index = -100};
        ts_dice_params dp = {.mode = TS_DICE_SMP, .ignore_index = -100, .eps = 1e-7f};
        double loss = 0;
        REFUSED("cross_entropy_forward bf16 logits", "cross_entropy_forward", "float32",
                cpu->cross_entropy_forward(&cctx, &loss, &hz, lbl.h, &ce),
                gpu->cross_entropy_forward(&gctx, &loss, &dz, lbl.d, &ce));
        REFUSED("cross_entropy_backward bf16 dlogits and logits", "cross_entropy_backward", "float32",
                cpu->cross_entropy_backward(&cctx, &hg, &hz, lbl.h, &ce, 1.0f),
                gpu->cross_entropy_backward(&gctx, &dg, &dz, lbl.d, &ce, 1.0f));
        REFUSED("cross_entropy_backward bf16 dlogits, float32 logits", "cross_entropy_backward", "dtype",
                cpu->cross_entropy_backward(&cctx, &hg, &hzf, lbl.h, &ce, 1.0f),
                gpu->cross_entropy_backward(&gctx, &dg, &dzf, lbl.d, &ce, 1.0f));
        REFUSED("dice_forward fp16 logits", "dice_forward", "float32",
                cpu->dice_forward(&cctx, &loss, &hzh, lbl.h, &dp), gpu->dice_forward(&gctx, &loss, &dzh, lbl.d, &dp));
        REFUSED("dice_backward float32 dlogits, fp16 logits", "dice_backward", "float32",
                cpu->dice_backward(&cctx, &hgf, &hzh, lbl.h, &dp, 1.0f),
                gpu->dice_backward(&gctx, &dgf, &dzh, lbl.d, &dp, 1.0f));
    }

    /* convert takes any two dtypes, but not overlapping tensors of two
     * layouts (element i lives at different places in them), nor two shapes. */
    {
        ts_tensor hf = T(0, F, 2, 3, 7, 9), df = D(0, F, 2, 3, 7, 9), hb = T(0, B, 2, 3, 7, 9),
                  db = D(0, B, 2, 3, 7, 9);
        REFUSED("convert bf16 y over its own float32 x", "convert", "overlap", cpu->convert(&cctx, &hb, &hf, 0),
                gpu->convert(&gctx, &db, &df, 0));
        ts_tensor hh = T(1, H, 2, 3, 9, 7), dh = D(1, H, 2, 3, 9, 7);
        REFUSED("convert fp16 y [2,3,9,7] from x [2,3,7,9]", "convert", "shape", cpu->convert(&cctx, &hh, &hf, 1),
                gpu->convert(&gctx, &dh, &df, 1));
    }
#undef T
#undef D
    for (int i = 0; i < NBUF; i++) pair_free(&buf[i], op, "buffer");
    pair_free(&v, op, "v");
    ipair_free(&idx, op, "index");
    ipair_free(&lbl, op, "labels");
}

/* ---- main ------------------------------------------------------------------------ */

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
    ts_cuda_set_tf32(0);         /* the float32 converts compare bit for bit */
    ts_cuda_set_deterministic(0);
    ts_ctx_init(&gctx, gpu);
    tu_rng_seed(&rng, 0x4A1F2025u);

    /* 1x1 planes and a single channel take convert's flat path, the rest
     * its tiled transpose (32x32 tiles: 33 and 65 channels, 63 and 143
     * pixels straddle them). */
    static const int shapes[][4] = {{2, 3, 7, 9},    {2, 5, 13, 11}, {2, 17, 1, 1}, {2, 33, 7, 9},
                                    {2, 65, 13, 11}, {2, 1, 7, 9},   {1, 1, 1, 1},  {2, 64, 32, 32}};
    const size_t nall = sizeof all_types / sizeof all_types[0], nhalf = sizeof half_types / sizeof half_types[0];
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int *d = shapes[s];
        for (size_t yi = 0; yi < nall; yi++)
            for (size_t xi = 0; xi < nall; xi++)
                for (int acc = 0; acc <= 1; acc++)
                    test_convert(all_types[yi], all_types[xi], acc, d[0], d[1], d[2], d[3]);
        for (size_t t = 0; t < nall; t++) test_convert_in_place(all_types[t], d[0], d[1], d[2], d[3]);
        for (size_t t = 0; t < nhalf; t++) test_convert_layout(half_types[t], d[0], d[1], d[2], d[3]);
    }

    static const int ew_shapes[][4] = {{2, 3, 7, 9}, {2, 17, 13, 11}, {2, 65, 1, 1}, {2, 33, 7, 9}, {2, 64, 32, 32}};
    /* Ca, Cb: both under a 32-channel chunk, straddling it, and the decoder's 64 + 64. */
    static const int cat[][2] = {{3, 5}, {17, 33}, {65, 1}, {64, 64}};
    static const struct {
        ts_pool2d_params p;
        const char *name;
    } pools[] = {{{3, 3, 2, 2, 1, 1}, "k3 s2 p1 (ResNet stem)"}, {{2, 2, 2, 2, 0, 0}, "k2 s2 p0"}};
    static const int pool_shapes[][4] = {{2, 3, 7, 9}, {2, 5, 13, 11}, {2, 33, 7, 9}, {2, 17, 1, 1}, {2, 64, 32, 32}};
    /* N, C, H, W -> OH, OW: 2x, 7 -> 13 (not an integer ratio), from 1x1, and 2x at the large size. */
    static const int up[][6] = {{2, 5, 7, 9, 14, 18}, {2, 33, 7, 7, 13, 13}, {2, 17, 13, 11, 26, 22},
                                {2, 3, 1, 1, 7, 5},   {2, 65, 7, 9, 13, 17}, {2, 64, 16, 16, 32, 32}};
    static const int bn_shapes[][4] = {{2, 3, 7, 9}, {2, 17, 13, 11}, {2, 33, 1, 1}, {2, 65, 7, 9}, {2, 64, 32, 32}};

    for (size_t t = 0; t < nhalf; t++) {
        const ts_dtype dt = half_types[t];
        for (size_t i = 0; i < sizeof ew_shapes / sizeof ew_shapes[0]; i++) {
            const int *d = ew_shapes[i];
            test_relu(dt, d[0], d[1], d[2], d[3]);
            test_add(dt, d[0], d[1], d[2], d[3]);
        }
        for (size_t i = 0; i < sizeof cat / sizeof cat[0]; i++) {
            test_concat(dt, 2, cat[i][0], cat[i][1], 7, 9);
            test_concat(dt, 2, cat[i][0], cat[i][1], 1, 1);
        }
        test_concat(dt, 2, 64, 64, 32, 32);
        for (size_t k = 0; k < sizeof pools / sizeof pools[0]; k++)
            for (size_t s = 0; s < sizeof pool_shapes / sizeof pool_shapes[0]; s++)
                for (int f = POOL_RANDOM; f <= POOL_INF_NAN; f++)
                    test_maxpool(dt, &pools[k].p, pools[k].name, pool_shapes[s][0], pool_shapes[s][1],
                                 pool_shapes[s][2], pool_shapes[s][3], (enum pool_fill)f);
        for (size_t i = 0; i < sizeof up / sizeof up[0]; i++)
            test_upsample(dt, up[i][0], up[i][1], up[i][2], up[i][3], up[i][4], up[i][5]);
        long fused0, unfused0, fused1, unfused1;
        ts_cuda_conv_fusion_stats(&fused0, &unfused0);
        for (size_t i = 0; i < sizeof conv_cases / sizeof conv_cases[0]; i++) test_conv(dt, &conv_cases[i]);
        ts_cuda_conv_fusion_stats(&fused1, &unfused1);
        /* Each case runs one forward with a bias alone (two passes) and one
         * with bias + ReLU (fused, or two passes where cuDNN does not
         * support the fused call for the shape). */
        const long ncases = (long)(sizeof conv_cases / sizeof conv_cases[0]);
        check(fused1 - fused0 > 0 && (fused1 - fused0) + (unfused1 - unfused0) == 2 * ncases,
              "%s conv2d forward: %ld of %ld bias + ReLU calls ran as cuDNN's fused conv + bias + ReLU, %ld calls ran "
              "two passes (%ld with a bias alone); process totals: %ld fused, %ld two-pass; first refusal: %s",
              ts_dtype_name(dt), fused1 - fused0, ncases, unfused1 - unfused0, ncases, fused1, unfused1, refusal());
        ts_cuda_conv_fusion_stats(&fused0, &unfused0);
        for (size_t i = 0; i < sizeof conv_cases / sizeof conv_cases[0]; i++) test_conv_add(dt, &conv_cases[i]);
        ts_cuda_conv_fusion_stats(&fused1, &unfused1);
        /* Four forwards with the add per case: bias + ReLU (fused with z, or
         * two passes where cuDNN does not support z for the plan) and three
         * that always take two passes. */
        check(fused1 - fused0 > 0 && fused1 - fused0 <= ncases &&
                  (fused1 - fused0) + (unfused1 - unfused0) == 4 * ncases,
              "%s conv2d forward +add: %ld of %ld bias + add + ReLU calls ran as cuDNN's fused call with z, %ld calls "
              "ran two passes (%ld lacking the bias, the ReLU or both); process totals: %ld fused, %ld two-pass; "
              "first refusal: %s",
              ts_dtype_name(dt), fused1 - fused0, ncases, unfused1 - unfused0, 3 * ncases, fused1, unfused1, refusal());
        test_conv_half_bias(dt);
        for (size_t i = 0; i < sizeof bn_shapes / sizeof bn_shapes[0]; i++)
            test_batchnorm(dt, bn_shapes[i][0], bn_shapes[i][1], bn_shapes[i][2], bn_shapes[i][3]);
        test_determinism(dt);
    }
    test_errors();

    ts_ctx_free(&gctx);
    ts_ctx_free(&cctx);
    return tu_finish(SUITE);
}
