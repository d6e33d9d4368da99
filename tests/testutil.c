#include "testutil.h"

#include <ftw.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/threads.h"

static int n_passed, n_failed;

/* ---- rng ---- */
void tu_rng_seed(tu_rng *r, uint64_t seed) { r->state = seed; }

uint64_t tu_next(tu_rng *r)
{
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double tu_uniform(tu_rng *r, double lo, double hi)
{
    return lo + (hi - lo) * ((double)(tu_next(r) >> 11) * (1.0 / 9007199254740992.0));
}

int tu_randint(tu_rng *r, int n) { return (int)(tu_next(r) % (uint64_t)n); }

void tu_fill(tu_rng *r, float *p, size_t n, double lo, double hi)
{
    for (size_t i = 0; i < n; i++) p[i] = (float)tu_uniform(r, lo, hi);
}

/* ---- guarded buffers ----
 * Layout: [size_t bytes][pad to TU_GUARD_BYTES][guard][interior][guard]. */
#define TU_SENTINEL 0xA5

void *tu_alloc(size_t bytes)
{
    unsigned char *base = malloc(2 * TU_GUARD_BYTES + bytes + TU_GUARD_BYTES);
    if (!base) {
        fprintf(stderr, "testutil: out of memory allocating %zu bytes\n", bytes);
        exit(2); /* tests may exit; the library never does */
    }
    memcpy(base, &bytes, sizeof bytes);
    unsigned char *p = base + 2 * TU_GUARD_BYTES;
    memset(p - TU_GUARD_BYTES, TU_SENTINEL, TU_GUARD_BYTES);
    memset(p, 0, bytes);
    memset(p + bytes, TU_SENTINEL, TU_GUARD_BYTES);
    return p;
}

float *tu_alloc_f(size_t n) { return tu_alloc(n * sizeof(float)); }
int32_t *tu_alloc_i32(size_t n) { return tu_alloc(n * sizeof(int32_t)); }

int tu_guard_check(const void *ptr, const char *op, const char *buffer)
{
    const unsigned char *p = ptr;
    size_t bytes;
    memcpy(&bytes, p - 2 * TU_GUARD_BYTES, sizeof bytes);
    for (long i = -TU_GUARD_BYTES; i < 0; i++)
        if (p[i] != TU_SENTINEL)
            return tu_expect(0, "%s: write %ld bytes before buffer %s (%zu bytes)", op, -i, buffer, bytes);
    for (size_t i = 0; i < TU_GUARD_BYTES; i++)
        if (p[bytes + i] != TU_SENTINEL)
            return tu_expect(0, "%s: write %zu bytes past the end of buffer %s (%zu bytes)", op, i, buffer, bytes);
    return 1;
}

void tu_free(void *p, const char *op, const char *buffer)
{
    if (!p) return;
    tu_guard_check(p, op, buffer);
    free((unsigned char *)p - 2 * TU_GUARD_BYTES);
}

ts_tensor tu_tensor(int n, int c, int h, int w)
{
    return ts_tensor_view(tu_alloc_f((size_t)n * c * h * w), n, c, h, w);
}

void tu_tensor_free(ts_tensor *t, const char *op, const char *name)
{
    tu_free(t->data, op, name);
    t->data = NULL;
}

/* ---- comparisons ---- */
static void decode_index(const ts_tensor *s, size_t i, char *buf, size_t size)
{
    if (!s) {
        snprintf(buf, size, "%zu", i);
        return;
    }
    size_t w = i % (size_t)s->w, h = i / s->w % (size_t)s->h, c = i / ((size_t)s->w * s->h) % (size_t)s->c;
    size_t n = i / ((size_t)s->w * s->h * s->c);
    snprintf(buf, size, "%zu (n=%zu,c=%zu,h=%zu,w=%zu)", i, n, c, h, w);
}

static int close_report(const char *op, const char *what, const ts_tensor *shape, size_t n, size_t worst, double werr,
                        double got, double want, size_t bad, double atol, double rtol)
{
    char where[128], sh[TS_SHAPE_STR] = "-";
    if (shape) ts_shape_str(shape, sh);
    decode_index(shape, worst, where, sizeof where);
    return tu_expect(bad == 0,
                     "%s %s shape %s: %zu of %zu values off (atol %.1e, rtol %.1e); worst |err| %.3e at %s: got %.9g, "
                     "want %.9g",
                     op, what, sh, bad, n, atol, rtol, werr, where, got, want);
}

int tu_check_close(const char *op, const char *what, const ts_tensor *shape, const float *got, const double *want,
                   size_t n, double atol, double rtol)
{
    size_t bad = 0, worst = 0;
    double worst_ratio = -1, werr = 0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]);
        double tol = atol + rtol * fabs(want[i]);
        double ratio = err == 0 ? 0 : err / tol; /* exact matches rank best, also when tol is 0 */
        if (!(err <= tol)) bad++; /* NaN counts as bad */
        if (!(ratio <= worst_ratio)) {
            worst_ratio = isnan(ratio) ? INFINITY : ratio;
            worst = i;
            werr = err;
        }
    }
    return close_report(op, what, shape, n, worst, werr, n ? got[worst] : 0, n ? want[worst] : 0, bad, atol, rtol);
}

int tu_check_close_d(const char *op, const char *what, const double *got, const double *want, size_t n, double atol,
                     double rtol)
{
    size_t bad = 0, worst = 0;
    double worst_ratio = -1, werr = 0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs(got[i] - want[i]);
        double tol = atol + rtol * fabs(want[i]);
        double ratio = err == 0 ? 0 : err / tol; /* exact matches rank best, also when tol is 0 */
        if (!(err <= tol)) bad++;
        if (!(ratio <= worst_ratio)) {
            worst_ratio = isnan(ratio) ? INFINITY : ratio;
            worst = i;
            werr = err;
        }
    }
    return close_report(op, what, NULL, n, worst, werr, n ? got[worst] : 0, n ? want[worst] : 0, bad, atol, rtol);
}

int tu_check_equal_i32(const char *op, const char *what, const int32_t *got, const int32_t *want, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i])
            return tu_expect(0, "%s %s: first mismatch at %zu: got %d, want %d", op, what, i, got[i], want[i]);
    return tu_expect(1, "%s %s", op, what);
}

/* ---- finite differences ---- */
void tu_fd_grad(tu_scalar_fn f, void *ctx, double *x, const size_t *idx, size_t nidx, double h, double *grad)
{
    for (size_t k = 0; k < nidx; k++) {
        size_t i = idx[k];
        double saved = x[i];
        x[i] = saved + h;
        double fp = f(ctx, x);
        x[i] = saved - h;
        double fm = f(ctx, x);
        x[i] = saved;
        grad[k] = (fp - fm) / (2 * h);
    }
}

size_t tu_sample_indices(tu_rng *r, size_t n, size_t max, size_t *idx)
{
    if (n <= max) {
        for (size_t i = 0; i < n; i++) idx[i] = i;
        return n;
    }
    /* Partial Fisher-Yates over a temporary permutation: distinct indices. */
    size_t *perm = malloc(n * sizeof *perm);
    if (!perm) {
        fprintf(stderr, "testutil: out of memory\n");
        exit(2);
    }
    for (size_t i = 0; i < n; i++) perm[i] = i;
    for (size_t k = 0; k < max; k++) {
        size_t j = k + (size_t)(tu_next(r) % (n - k));
        size_t t = perm[k];
        perm[k] = perm[j];
        perm[j] = t;
        idx[k] = perm[k];
    }
    free(perm);
    return max;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double tu_quantile(double *v, int n, double q)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n ? v[(int)(q * (n - 1) + 0.5)] : 0;
}

/* ---- tally ---- */
int tu_expect(int ok, const char *fmt, ...)
{
    if (ok) {
        n_passed++;
        return 1;
    }
    n_failed++;
    va_list ap;
    va_start(ap, fmt);
    fputs("FAIL ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    va_end(ap);
    fflush(stdout);
    return 0;
}

int tu_expect_ok(ts_status st, const char *what)
{
    return tu_expect(st == TS_OK, "%s returned %s: %s", what, ts_status_name(st), ts_last_error());
}

int tu_expect_error(ts_status st, ts_status want, const char *what, ...)
{
    if (st != want)
        return tu_expect(0, "%s: expected status \"%s\", got \"%s\" (%s)", what, ts_status_name(want),
                         ts_status_name(st), ts_last_error());
    va_list ap;
    va_start(ap, what);
    const char *sub;
    int ok = 1;
    while ((sub = va_arg(ap, const char *)) != NULL) {
        if (!strstr(ts_last_error(), sub)) {
            ok = tu_expect(0, "%s: error message \"%s\" does not mention \"%s\"", what, ts_last_error(), sub);
            break;
        }
    }
    va_end(ap);
    return ok ? tu_expect(1, "%s", what) : 0;
}

int tu_finish(const char *suite)
{
    printf("%s: %d passed, %d failed\n", suite, n_passed, n_failed);
    return n_failed ? 1 : 0;
}

void tu_init(ts_ctx *ctx)
{
    ts_threads_init(0);
    ts_ctx_init(ctx, NULL); /* tests call the ts_cpu_ ops directly */
}

void tu_gpu_device_name(char *name, size_t cap)
{
    const char *env = getenv("TERRASEG_TEST_DEVICE");
    snprintf(name, cap, "cuda");
    if (env && *env) snprintf(name, cap, "%s%s", env[0] >= '0' && env[0] <= '9' ? "cuda:" : "", env);
}

int tu_gpu_backend(const char *name, const ts_backend **out)
{
    *out = NULL;
    if (strncmp(name, "cuda", 4) != 0)
        return tu_expect(0, "TERRASEG_TEST_DEVICE=%s: write cuda, cuda:N or N (the ops here get device pointers)",
                         name);
    if (ts_backend_get(name, out) != TS_OK || !*out)
        return tu_expect(0,
                         "ts_backend_get(\"%s\"): %s (the GPU suite needs a visible CUDA device; set "
                         "TERRASEG_TEST_DEVICE to pick another)",
                         name, ts_last_error());
    ts_status st = ts_backend_check(*out);
    return tu_expect(st == TS_OK, "backend \"%s\" implements every op%s%s", (*out)->name, st == TS_OK ? "" : ": ",
                     st == TS_OK ? "" : ts_last_error());
}

/* ---- a scratch folder ---- */

static char tu_dir[256];

const char *tu_tmpdir(const char *name)
{
    snprintf(tu_dir, sizeof tu_dir, "/tmp/%s_XXXXXX", name);
    if (!mkdtemp(tu_dir)) {
        perror("mkdtemp");
        tu_dir[0] = 0;
        return NULL;
    }
    return tu_dir;
}

const char *tu_path(const char *file)
{
    static char buf[8][768];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tu_dir, file);
    return buf[k];
}

static int tu_unlink_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

void tu_tmpdir_remove(void)
{
    if (tu_dir[0]) nftw(tu_dir, tu_unlink_cb, 16, FTW_DEPTH | FTW_PHYS);
    tu_dir[0] = 0;
}

double tu_cosine(const float *a, const float *b, size_t n)
{
    double ab = 0, aa = 0, bb = 0;
    for (size_t i = 0; i < n; i++) {
        ab += (double)a[i] * b[i];
        aa += (double)a[i] * a[i];
        bb += (double)b[i] * b[i];
    }
    return aa > 0 && bb > 0 ? ab / sqrt(aa * bb) : (aa == bb ? 1 : 0);
}

ts_unet_config tu_unet_config(int in, int k, int depth, const int *dec, int use_bn)
{
    ts_unet_config c = ts_unet_default_config(in, k);
    c.encoder_depth = depth;
    for (int i = 0; i < TS_UNET_MAX_DEPTH; i++) c.decoder_channels[i] = i < depth ? dec[i] : 0;
    c.decoder_use_batchnorm = use_bn;
    return c;
}
