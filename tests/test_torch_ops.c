/* Golden check of the loss and optimizer ops against real PyTorch and SMP:
 * tests/fixtures/ops_torch.txt, written by tests/fixtures/make_op_fixtures.py
 * (its header line names the torch and SMP versions), holds the inputs, the
 * losses and full logit gradients of nn.CrossEntropyLoss and
 * smp.losses.DiceLoss("multiclass"), and the parameter and moments after
 * each of 5 torch.optim.AdamW steps. The losses are compared with
 * tolerances (PyTorch sums in float32 where we use double); AdamW to a few
 * ulp and then bit for bit, since adamw.c follows PyTorch's float32 rounding.
 *
 * The fixture is found through, in order: the TERRASEG_FIXTURES environment
 * variable (a folder), the TS_FIXTURE_DIR compile definition, the folder
 * ../tests/fixtures next to this executable (a build dir inside the source
 * tree), and tests/fixtures under the current directory. A missing fixture is
 * a failure, not a skip. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/cpu/cpu.h"
#include "tests/testutil.h"

#define FIXTURE "ops_torch.txt"

static FILE *open_fixture(char *path, size_t size)
{
    const char *env = getenv("TERRASEG_FIXTURES");
    if (env && *env) {
        snprintf(path, size, "%s/%s", env, FIXTURE);
        return fopen(path, "r");
    }
#ifdef TS_FIXTURE_DIR
    snprintf(path, size, "%s/%s", TS_FIXTURE_DIR, FIXTURE);
    FILE *fd = fopen(path, "r");
    if (fd) return fd;
#endif
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) *slash = '\0';
        snprintf(path, size, "%s/../tests/fixtures/%s", exe, FIXTURE);
        FILE *f = fopen(path, "r");
        if (f) return f;
    }
    snprintf(path, size, "tests/fixtures/%s", FIXTURE);
    return fopen(path, "r");
}

/* ---- a tiny line reader -------------------------------------------------- */

typedef struct reader {
    FILE *f;
    char *line;
    size_t cap;
    char *pos; /* parse position in line */
    int lineno;
    int bad;
} reader;

/* Next non-comment line; its first word must be `key`. */
static int next_line(reader *r, const char *key)
{
    for (;;) {
        if (getline(&r->line, &r->cap, r->f) < 0) return 0;
        r->lineno++;
        if (r->line[0] == '#' || r->line[0] == '\n') continue;
        size_t k = strlen(key);
        if (strncmp(r->line, key, k) != 0 || (r->line[k] != ' ' && r->line[k] != '\n')) {
            tu_expect(0, "torch fixture line %d: expected \"%s\", got \"%.40s\"", r->lineno, key, r->line);
            r->bad = 1;
            return 0;
        }
        r->pos = r->line + k;
        return 1;
    }
}

/* Doubles (the hyper-parameters) with strtod; float32 data with strtof, which
 * reads the fixture's shortest round-trip decimals back exactly. */
static double parse(reader *r, int as_float)
{
    char *end;
    double v = as_float ? (double)strtof(r->pos, &end) : strtod(r->pos, &end);
    if (end == r->pos) {
        if (!r->bad) tu_expect(0, "torch fixture line %d: expected a number at \"%.20s\"", r->lineno, r->pos);
        r->bad = 1;
        return 0;
    }
    r->pos = end;
    return v;
}

static double num(reader *r) { return parse(r, 0); }

static char *word(reader *r, char *buf, size_t size)
{
    while (*r->pos == ' ') r->pos++;
    size_t k = strcspn(r->pos, " \n");
    snprintf(buf, size, "%.*s", (int)k, r->pos);
    r->pos += k;
    return buf;
}

/* "COUNT V..." into a new double array of exactly `want` values. */
static double *values(reader *r, size_t want)
{
    size_t n = (size_t)num(r);
    if (n != want) {
        if (!r->bad) tu_expect(0, "torch fixture line %d: %zu values, expected %zu", r->lineno, n, want);
        r->bad = 1;
        return NULL;
    }
    double *v = malloc((want ? want : 1) * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = parse(r, 1);
    return v;
}

/* ---- losses -------------------------------------------------------------- */

static void loss_case(ts_ctx *ctx, reader *r)
{
    char name[64], kind[16];
    word(r, name, sizeof name);
    word(r, kind, sizeof kind);
    int N = (int)num(r), C = (int)num(r), H = (int)num(r), W = (int)num(r), ignore = (int)num(r);
    double smooth = num(r), eps = num(r);
    int log_loss = (int)num(r), nw = (int)num(r);
    float weights[64];
    if (nw > 64) r->bad = 1;
    for (int c = 0; c < nw && c < 64; c++) weights[c] = (float)parse(r, 1);
    if (r->bad) return;
    char op[96];
    snprintf(op, sizeof op, "torch %s %s", kind, name);
    size_t numel = (size_t)N * C * H * W, npix = (size_t)N * H * W;

    double *zv = next_line(r, "logits") ? values(r, numel) : NULL;
    double *yv = next_line(r, "target") ? values(r, npix) : NULL;
    double want_loss = next_line(r, "loss") ? parse(r, 1) : NAN;
    double *gv = next_line(r, "grad") ? values(r, numel) : NULL;
    if (!r->bad) {
        ts_tensor z = tu_tensor(N, C, H, W), dz = tu_tensor(N, C, H, W);
        int32_t *y = tu_alloc_i32(npix);
        for (size_t i = 0; i < numel; i++) z.data[i] = (float)zv[i];
        for (size_t i = 0; i < npix; i++) y[i] = (int32_t)yv[i];
        double loss = NAN;
        ts_status st, st2;
        if (strcmp(kind, "ce") == 0) {
            ts_ce_params p = {.ignore_index = ignore, .class_weights = nw ? weights : NULL};
            st = ts_cpu_cross_entropy_forward(ctx, &loss, &z, y, &p);
            st2 = ts_cpu_cross_entropy_backward(ctx, &dz, &z, y, &p, 1.0f);
        } else {
            ts_dice_params p = {.mode = TS_DICE_SMP, .ignore_index = ignore, .smooth = (float)smooth,
                                .eps = (float)eps, .log_loss = log_loss, .class_weights = nw ? weights : NULL};
            st = ts_cpu_dice_forward(ctx, &loss, &z, y, &p);
            st2 = ts_cpu_dice_backward(ctx, &dz, &z, y, &p, 1.0f);
        }
        if (tu_expect_ok(st, op) && tu_expect_ok(st2, op)) {
            /* PyTorch's float32 sums against our double ones. */
            tu_check_close_d(op, "loss vs PyTorch", &loss, &want_loss, 1, 1e-7, 2e-6);
            tu_check_close(op, "dlogits vs PyTorch autograd", &z, dz.data, gv, numel, 1e-8, 2e-5);
        }
        tu_free(y, op, "target");
        tu_tensor_free(&dz, op, "dlogits");
        tu_tensor_free(&z, op, "logits");
    }
    free(zv);
    free(yv);
    free(gv);
}

/* ---- AdamW --------------------------------------------------------------- */

static void adamw_case(ts_ctx *ctx, reader *r)
{
    char name[64];
    word(r, name, sizeof name);
    size_t n = (size_t)num(r);
    ts_adamw_hparams h;
    h.lr = num(r);
    h.beta1 = num(r);
    h.beta2 = num(r);
    h.eps = num(r);
    h.weight_decay = num(r);
    int steps = (int)num(r);
    if (r->bad || n == 0 || n > 1000000) return;
    char op[128];
    float *p = tu_alloc_f(n), *g = tu_alloc_f(n), *m = tu_alloc_f(n), *v = tu_alloc_f(n);
    double *p0 = next_line(r, "param0") ? values(r, n) : NULL;
    for (size_t i = 0; p0 && i < n; i++) p[i] = (float)p0[i];
    free(p0);
    size_t exact = 0, total = 0;
    for (int t = 1; t <= steps && !r->bad; t++) {
        snprintf(op, sizeof op, "torch adamw %s step %d", name, t);
        double *gv = NULL, *pv = NULL, *mv = NULL, *vv = NULL;
        if (next_line(r, "grad") && (int)num(r) == t) gv = values(r, n);
        if (next_line(r, "param") && (int)num(r) == t) pv = values(r, n);
        if (next_line(r, "exp_avg") && (int)num(r) == t) mv = values(r, n);
        if (next_line(r, "exp_avg_sq") && (int)num(r) == t) vv = values(r, n);
        if (gv && pv && mv && vv) {
            for (size_t i = 0; i < n; i++) g[i] = (float)gv[i];
            ts_adamw_step s;
            tu_expect_ok(ts_adamw_prepare(&s, &h, t), op);
            tu_expect_ok(ts_cpu_adamw_update(ctx, p, g, m, v, n, &s), op);
            /* A few float32 ulp. */
            tu_check_close(op, "param vs PyTorch", NULL, p, pv, n, 1e-10, 5e-7);
            tu_check_close(op, "exp_avg vs PyTorch", NULL, m, mv, n, 1e-12, 5e-7);
            tu_check_close(op, "exp_avg_sq vs PyTorch", NULL, v, vv, n, 1e-15, 5e-7);
            for (size_t i = 0; i < n; i++) {
                exact += (p[i] == (float)pv[i]) + (m[i] == (float)mv[i]) + (v[i] == (float)vv[i]);
                total += 3;
            }
        } else if (!r->bad) {
            tu_expect(0, "torch fixture line %d: step %d records missing or out of order", r->lineno, t);
            r->bad = 1;
        }
        free(gv);
        free(pv);
        free(mv);
        free(vv);
    }
    /* Our kernel's rounding does not depend on the machine (explicit fmaf, no
     * contraction), so once it matches the fixture it matches everywhere. A
     * fixture regenerated on a CPU where PyTorch rounds differently (another
     * vector width or compiler) may break this check but not the ulp ones. */
    tu_expect(exact == total, "torch adamw %s: %zu of %zu param/exp_avg/exp_avg_sq values bit-identical to PyTorch",
              name, exact, total);
    printf("torch adamw %s: %zu of %zu param/exp_avg/exp_avg_sq values bit-identical to PyTorch\n", name, exact,
           total);
    tu_free(p, "torch adamw", "param");
    tu_free(g, "torch adamw", "grad");
    tu_free(m, "torch adamw", "exp_avg");
    tu_free(v, "torch adamw", "exp_avg_sq");
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    char path[PATH_MAX + 64];
    reader r = {.f = open_fixture(path, sizeof path)};
    if (!r.f) {
        tu_expect(0, "cannot open the PyTorch fixture %s (%s): set TERRASEG_FIXTURES to the tests/fixtures folder",
                  path, strerror(errno));
        return tu_finish("test_torch_ops");
    }
    int cases = 0, adams = 0;
    while (!r.bad && getline(&r.line, &r.cap, r.f) >= 0) {
        r.lineno++;
        if (r.lineno == 1 && r.line[0] == '#') printf("%s", r.line); /* the versions */
        if (strncmp(r.line, "case ", 5) == 0) {
            r.pos = r.line + 4;
            loss_case(&ctx, &r);
            cases++;
        } else if (strncmp(r.line, "adamw ", 6) == 0) {
            r.pos = r.line + 5;
            adamw_case(&ctx, &r);
            adams++;
        } else if (r.line[0] != '#' && r.line[0] != '\n') {
            tu_expect(0, "torch fixture %s line %d: unexpected record \"%.40s\"", path, r.lineno, r.line);
            break;
        }
    }
    tu_expect(cases >= 6 && adams >= 2, "torch fixture %s: %d loss cases and %d AdamW runs (want >= 6 and 2)", path,
              cases, adams);
    free(r.line);
    fclose(r.f);
    ts_ctx_free(&ctx);
    return tu_finish("test_torch_ops");
}
