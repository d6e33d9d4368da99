/* weights/pth.c: reading the torch.save fixtures of
 * tests/fixtures/make_pth_fixtures.py with exact values, write -> read round
 * trips, and refusal of damaged and hostile files (every truncation, bad
 * CRCs, compressed entries, forbidden globals and opcodes, inconsistent
 * sizes, broken pickles) with a message that names the file and the problem.
 *
 * That torch.load(weights_only=True) accepts what ts_pth_write produces is
 * checked during development with tests/fixtures/check_pth_written.py:
 *   TERRASEG_PTH_KEEP=/tmp/keep ./test_pth
 *   python3 tests/fixtures/check_pth_written.py /tmp/keep/plain.pth tests/fixtures/pth/plain.pth ...
 * (CI has no torch.) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/fixture.h"
#include "tests/testutil.h"
#include "weights/pth.h"

static char tmpdir[256];

static const char *fixture(const char *name)
{
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/pth/%s", fx_dir(), name);
    return buf[k];
}

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(n > 0 ? (size_t)n : 1);
    *len = fread(b, 1, (size_t)n, f);
    fclose(f);
    return b;
}

/* ---- checking tensors against the formulas of make_pth_fixtures.py ---- */
static const ts_named_tensor *get(const ts_dict *d, const char *name, ts_dtype dt, int ndim, const int64_t *shape,
                                  const char *file)
{
    const ts_named_tensor *t = ts_dict_find(d, name);
    if (!tu_expect(t != NULL, "%s: tensor %s missing", file, name)) return NULL;
    int ok = t->dtype == dt && t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (!tu_expect(ok, "%s: tensor %s has dtype %s ndim %d, expected %s ndim %d (or other shape)", file, name,
                   ts_dtype_safetensors_name(t->dtype), t->ndim, ts_dtype_safetensors_name(dt), ndim))
        return NULL;
    return t;
}

typedef double (*formula)(size_t i);
static double f_w32(size_t i) { return 0.5 * (double)i - 3; }
static double f_h16(size_t i) { return 0.25 * (double)i - 1; }
static double f_b16(size_t i) { return 0.5 * ((double)i - 4); }
static double f_f64(size_t i) { return (double)i / 8; }
static double f_i32(size_t i) { return (double)i - 2; }
static double f_u8(size_t i) { return 25.0 * (double)i; }
static double f_id(size_t i) { return (double)i; }
static double f_off(size_t i) { return 5.0 + (double)i; }
static double f_tr(size_t i) { return 4.0 * (double)(i % 3) + (double)(i / 3); } /* (4,3): [r][c] = 4c + r */
static double f_exp(size_t i) { return 7.0 + (double)(i % 2); }
static double f_conv(size_t i) { return (float)i * 0.01f; } /* torch multiplies in float32 */
static double f_half(size_t i) { return 0.5 * (double)i; }
static double f_1pi(size_t i) { return 1.0 + (double)i; }
static double f_neg(size_t i) { return -(double)i; }
static double f_mean(size_t i) { return (float)i * 0.1f; }
static double f_var(size_t i) { return 2.0 + (double)i; }
static double f_lw(size_t i) { return (float)i * 0.1f; }
static double f_lb(size_t i) { return -0.5 * (double)i; }

/* Exact comparison after conversion to float (every expected value is
 * representable in the tensor's dtype, and float32 values are computed the
 * way torch did: in float32). */
static void expect_values(const ts_named_tensor *t, formula f, const char *file)
{
    if (!t) return;
    size_t n = ts_named_numel(t);
    float *v = malloc((n ? n : 1) * sizeof *v);
    int ok = tu_expect_ok(ts_named_to_f32(t, v), t->name);
    for (size_t i = 0; ok && i < n; i++) {
        float want = (float)f(i);
        if (v[i] != want) ok = tu_expect(0, "%s: %s[%zu] = %.9g, expected %.9g", file, t->name, i, v[i], want);
    }
    if (ok) tu_expect(1, "%s: %s values", file, t->name);
    free(v);
}

static void check_i64(const ts_named_tensor *t, const int64_t *want, size_t n, const char *file)
{
    if (!t) return;
    int ok = ts_named_numel(t) == n;
    for (size_t i = 0; ok && i < n; i++) {
        int64_t v;
        memcpy(&v, (const char *)t->data + 8 * i, 8);
        ok = v == want[i];
    }
    tu_expect(ok, "%s: int64 tensor %s values", file, t->name);
}

static void check_plain(const ts_dict *d, const char *file, int full)
{
    const int64_t s234[] = {2, 3, 4}, s32[] = {3, 2}, s8[] = {8}, s22[] = {2, 2}, s5[] = {5}, s4[] = {4}, s10[] = {10},
                  s20[] = {20}, s43[] = {4, 3}, s03[] = {0, 3};
    expect_values(get(d, "w32", TS_F32, 3, s234, file), f_w32, file);
    const int64_t i64[] = {-3, 1000000004, 2000000011, 3000000018, 4000000025};
    check_i64(get(d, "i64", TS_I64, 1, s5, file), i64, 5, file);
    const int64_t nbt = 42;
    check_i64(get(d, "nbt", TS_I64, 0, NULL, file), &nbt, 1, file);
    if (!full) return;
    tu_expect(d->count == 13, "%s: 13 tensors, got %zu", file, d->count);
    expect_values(get(d, "h16", TS_F16, 2, s32, file), f_h16, file);
    expect_values(get(d, "b16", TS_BF16, 1, s8, file), f_b16, file);
    expect_values(get(d, "f64", TS_F64, 2, s22, file), f_f64, file);
    expect_values(get(d, "i32", TS_I32, 1, s4, file), f_i32, file);
    expect_values(get(d, "u8", TS_U8, 1, s10, file), f_u8, file);
    expect_values(get(d, "base", TS_F32, 1, s20, file), f_id, file);
    expect_values(get(d, "off", TS_F32, 1, s4, file), f_off, file);
    expect_values(get(d, "tr", TS_F32, 2, s43, file), f_tr, file);
    expect_values(get(d, "exp", TS_F32, 2, s32, file), f_exp, file);
    const ts_named_tensor *e = get(d, "empty", TS_F32, 2, s03, file);
    if (e) tu_expect(e->nbytes == 0, "%s: empty tensor has no bytes", file);
    /* file order is kept */
    tu_expect(d->count > 0 && strcmp(d->items[0].name, "w32") == 0 && strcmp(d->items[12].name, "empty") == 0,
              "%s: tensors in file order", file);
}

/* ordered.pth's Conv2d(1,2,3) + BatchNorm2d(2), under an optional prefix. */
static void check_ordered(const ts_dict *d, const char *file, const char *prefix)
{
    char n[64];
    const int64_t sw[] = {2, 1, 3, 3}, s2[] = {2};
    tu_expect(d->count == 7, "%s: 7 tensors, got %zu", file, d->count);
#define NAME(x) (snprintf(n, sizeof n, "%s%s", prefix, x), n)
    expect_values(get(d, NAME("0.weight"), TS_F32, 4, sw, file), f_conv, file);
    expect_values(get(d, NAME("0.bias"), TS_F32, 1, s2, file), f_half, file);
    expect_values(get(d, NAME("1.weight"), TS_F32, 1, s2, file), f_1pi, file);
    expect_values(get(d, NAME("1.bias"), TS_F32, 1, s2, file), f_neg, file);
    expect_values(get(d, NAME("1.running_mean"), TS_F32, 1, s2, file), f_mean, file);
    expect_values(get(d, NAME("1.running_var"), TS_F32, 1, s2, file), f_var, file);
    const int64_t seven = 7;
    check_i64(get(d, NAME("1.num_batches_tracked"), TS_I64, 0, NULL, file), &seven, 1, file);
#undef NAME
}

static int read_ok(const char *name, ts_dict *d, ts_pth_info *info)
{
    ts_dict_init(d);
    return tu_expect_ok(ts_pth_read_ex(fixture(name), d, info), name);
}

static void test_fixtures(void)
{
    ts_dict d;
    ts_pth_info info;
    if (read_ok("plain.pth", &d, &info)) {
        check_plain(&d, "plain.pth", 1);
        tu_expect(info.version == 3 && !info.big_endian && info.source[0] == 0 && info.tensors == 13,
                  "plain.pth: info (version %d, source '%s')", info.version, info.source);
    }
    ts_dict_free(&d);
    if (read_ok("fileobj.pth", &d, &info)) check_plain(&d, "fileobj.pth", 1); /* archive/ prefix */
    ts_dict_free(&d);
    if (read_ok("ordered.pth", &d, &info)) check_ordered(&d, "ordered.pth", "");
    ts_dict_free(&d);
    if (read_ok("checkpoint.pth", &d, &info)) {
        check_ordered(&d, "checkpoint.pth", "");
        tu_expect(strcmp(info.source, "model_state_dict") == 0, "checkpoint.pth: source '%s'", info.source);
    }
    ts_dict_free(&d);
    if (read_ok("lightning.ckpt", &d, &info)) {
        check_ordered(&d, "lightning.ckpt", "");
        tu_expect(strcmp(info.source, "state_dict") == 0 && strcmp(info.stripped_prefix, "model.") == 0,
                  "lightning.ckpt: source '%s', stripped '%s'", info.source, info.stripped_prefix);
    }
    ts_dict_free(&d);
    if (read_ok("mixed.ckpt", &d, &info)) {
        /* only some keys have "model.": nothing is renamed */
        tu_expect(d.count == 2 && ts_dict_find(&d, "model.a") && ts_dict_find(&d, "b") && !info.stripped_prefix[0],
                  "mixed.ckpt: names kept as they are");
    }
    ts_dict_free(&d);
    if (read_ok("params.pth", &d, &info)) {
        const int64_t sw[] = {3, 2}, sb[] = {3};
        expect_values(get(&d, "weight", TS_F32, 2, sw, "params.pth"), f_lw, "params.pth");
        expect_values(get(&d, "bias", TS_F32, 1, sb, "params.pth"), f_lb, "params.pth");
    }
    ts_dict_free(&d);
    if (read_ok("bigendian.pth", &d, &info)) {
        check_plain(&d, "bigendian.pth", 0);
        tu_expect(info.big_endian == 1 && d.count == 3, "bigendian.pth: byteorder big noticed");
    }
    ts_dict_free(&d);
    /* w32 only: CRCs switched off (all zero), and pickle protocol 4 */
    const char *w32_only[] = {"nocrc.pth", "proto4.pth"};
    for (int i = 0; i < 2; i++) {
        if (read_ok(w32_only[i], &d, &info)) {
            const int64_t s234[] = {2, 3, 4};
            expect_values(get(&d, "w32", TS_F32, 3, s234, w32_only[i]), f_w32, w32_only[i]);
        }
        ts_dict_free(&d);
    }

    /* refused files: a clear message, nothing added */
    struct {
        const char *file;
        ts_status st;
        const char *a, *b;
    } bad[] = {
        {"legacy.pth", TS_ERR_UNSUPPORTED, "legacy", "torch.save(torch.load("},
        {"malicious.pth", TS_ERR_UNSUPPORTED, "'os.system'", "nothing in it was executed"},
        {"evalreduce.pth", TS_ERR_UNSUPPORTED, "'builtins.eval'", "state_dict()"},
        {"module.pth", TS_ERR_UNSUPPORTED, "whole pickled model", "torch.nn.modules.linear.Linear"},
        {"optim_only.pth", TS_ERR_INVALID_ARG, "no state dict found", "'epoch' (int)"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ts_dict_init(&d);
        tu_expect_error(ts_pth_read(fixture(bad[i].file), &d), bad[i].st, bad[i].file, bad[i].file, bad[i].a, bad[i].b,
                        NULL);
        tu_expect(d.count == 0, "%s: nothing added", bad[i].file);
        ts_dict_free(&d);
    }
    /* every truncation of a real torch file (ZIP64 end records, FB padding) is refused */
    size_t len = 0, fails = 0;
    unsigned char *whole = slurp(fixture("plain.pth"), &len);
    for (size_t n = 0; whole && n < len; n++) {
        unsigned char *cut = malloc(n ? n : 1);
        memcpy(cut, whole, n);
        ts_dict_init(&d);
        if (ts_pth_parse(cut, n, "plain.pth cut", &d) == TS_OK || !strstr(ts_last_error(), "plain.pth cut") || d.count)
            fails++;
        ts_dict_free(&d);
        free(cut);
    }
    tu_expect(whole && fails == 0, "all %zu truncations of plain.pth refused (%zu not)", len, fails);
    free(whole);

    ts_dict_init(&d);
    tu_expect_error(ts_pth_read("/nonexistent/x.pth", &d), TS_ERR_IO, "missing file", "/nonexistent/x.pth", NULL);
    ts_dict_free(&d);

    /* appending into a non-empty dictionary; a clash leaves it unchanged */
    ts_dict_init(&d);
    const int64_t one = 1;
    float x = 1;
    tu_expect_ok(ts_dict_add(&d, "zzz", TS_F32, 1, &one, &x), "add");
    tu_expect_ok(ts_pth_read(fixture("ordered.pth"), &d), "append ordered.pth");
    tu_expect(d.count == 8 && strcmp(d.items[0].name, "zzz") == 0, "appended after the existing entry");
    tu_expect_error(ts_pth_read(fixture("checkpoint.pth"), &d), TS_ERR_INVALID_ARG, "duplicate names on append",
                    "checkpoint.pth", "appears twice", NULL);
    tu_expect(d.count == 8, "dictionary unchanged after a failed append (%zu)", d.count);
    ts_dict_free(&d);
}

/* ---- round trips -------------------------------------------------------- */
static int dicts_equal(const ts_dict *a, const ts_dict *b, const char *what)
{
    if (!tu_expect(a->count == b->count, "%s: %zu vs %zu tensors", what, a->count, b->count)) return 0;
    for (size_t i = 0; i < a->count; i++) {
        const ts_named_tensor *x = &a->items[i], *y = &b->items[i];
        int ok = strcmp(x->name, y->name) == 0 && x->dtype == y->dtype && x->ndim == y->ndim &&
                 x->nbytes == y->nbytes && memcmp(x->shape, y->shape, sizeof x->shape[0] * (size_t)x->ndim) == 0 &&
                 (x->nbytes == 0 || memcmp(x->data, y->data, x->nbytes) == 0);
        if (!tu_expect(ok, "%s: tensor %zu (%s) differs after the round trip", what, i, x->name)) return 0;
    }
    return 1;
}

/* Walks the local headers of a file we wrote: every record's data must start
 * on a 64-byte boundary, as torch writes them. */
static void check_alignment(const char *path)
{
    size_t len = 0;
    unsigned char *b = slurp(path, &len);
    size_t p = 0, records = 0;
    int ok = b != NULL;
    while (ok && p + 30 <= len && b[p] == 'P' && b[p + 1] == 'K' && b[p + 2] == 3 && b[p + 3] == 4) {
        size_t nl = (size_t)(b[p + 26] | b[p + 27] << 8), xl = (size_t)(b[p + 28] | b[p + 29] << 8);
        size_t size = (size_t)b[p + 18] | (size_t)b[p + 19] << 8 | (size_t)b[p + 20] << 16 | (size_t)b[p + 21] << 24;
        if (size == 0xFFFFFFFFu) size = (size_t)b[p + 30 + nl + 4] | (size_t)b[p + 30 + nl + 5] << 8; /* ZIP64: small */
        size_t data = p + 30 + nl + xl;
        if (data % 64) ok = 0;
        p = data + size;
        records++;
    }
    tu_expect(ok && records >= 3, "%s: %zu records, each 64-byte aligned", path, records);
    free(b);
}

static void round_trip(const char *fixture_name, const char *out_name, int force64)
{
    ts_dict a, b;
    ts_dict_init(&a);
    ts_dict_init(&b);
    char out[512];
    snprintf(out, sizeof out, "%s/%s", tmpdir, out_name);
    ts_pth_write_opts o = {.force_zip64 = force64};
    if (tu_expect_ok(ts_pth_read(fixture(fixture_name), &a), fixture_name) &&
        tu_expect_ok(ts_pth_write_ex(out, &a, &o), out) && tu_expect_ok(ts_pth_read(out, &b), out)) {
        dicts_equal(&a, &b, out);
        check_alignment(out);
        char tmp[600];
        snprintf(tmp, sizeof tmp, "%s.tmp", out);
        tu_expect(access(tmp, F_OK) != 0, "%s: no temporary left behind", out);
    }
    ts_dict_free(&a);
    ts_dict_free(&b);
}

static void test_round_trips(void)
{
    round_trip("plain.pth", "plain.pth", 0);
    round_trip("checkpoint.pth", "checkpoint.pth", 0);
    round_trip("lightning.ckpt", "lightning.pth", 0);
    round_trip("bigendian.pth", "bigendian.pth", 0);
    round_trip("plain.pth", "plain_zip64.pth", 1);

    /* an empty dictionary, and a tensor whose numel needs BININT */
    ts_dict a, b;
    ts_dict_init(&a);
    ts_dict_init(&b);
    char out[512];
    snprintf(out, sizeof out, "%s/empty.pth", tmpdir);
    if (tu_expect_ok(ts_pth_write(out, &a), "write empty") && tu_expect_ok(ts_pth_read(out, &b), "read empty"))
        tu_expect(b.count == 0, "empty dictionary round trip");
    ts_dict_free(&b);
    const int64_t big[] = {70001};
    unsigned char *v = calloc(70001, 1);
    for (size_t i = 0; i < 70001; i++) v[i] = (unsigned char)(i * 7);
    tu_expect_ok(ts_dict_add_owned(&a, "bytes", TS_U8, 1, big, v), "add");
    snprintf(out, sizeof out, "%s/big.pth", tmpdir);
    ts_dict_init(&b);
    if (tu_expect_ok(ts_pth_write(out, &a), "write big") && tu_expect_ok(ts_pth_read(out, &b), "read big"))
        dicts_equal(&a, &b, "big.pth");
    ts_dict_free(&a);
    ts_dict_free(&b);

    /* writer errors name the path */
    ts_dict_init(&a);
    tu_expect_error(ts_pth_write("/nonexistent/dir/x.pth", &a), TS_ERR_IO, "write into a missing folder",
                    "/nonexistent/dir/x.pth", NULL);
    const int64_t s1[] = {1};
    float f = 1;
    tu_expect_ok(ts_dict_add(&a, "bad\xff", TS_F32, 1, s1, &f), "add");
    tu_expect_error(ts_pth_write(out, &a), TS_ERR_INVALID_ARG, "non-UTF-8 name", "UTF-8", NULL);
    ts_dict_free(&a);
}

/* ---- hand-built archives ------------------------------------------------ */
typedef struct buf {
    unsigned char *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *s, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}
static void put_s(buf *b, const char *s) { put(b, s, strlen(s)); }
static void put8(buf *b, unsigned v)
{
    unsigned char c = (unsigned char)v;
    put(b, &c, 1);
}
static void put16(buf *b, unsigned v)
{
    put8(b, v & 0xFF);
    put8(b, (v >> 8) & 0xFF);
}
static void put32(buf *b, uint32_t v)
{
    put16(b, v & 0xFFFF);
    put16(b, v >> 16);
}
/* BINUNICODE */
static void pk_str(buf *b, const char *s)
{
    put8(b, 'X');
    put32(b, (uint32_t)strlen(s));
    put_s(b, s);
}

/* A minimal stored ZIP (no alignment, classic end record only) of named records. */
typedef struct rec {
    const char *name;
    const void *data;
    size_t len;
} rec;

static buf make_zip(const rec *r, int n)
{
    buf z = {0}, cd = {0};
    for (int i = 0; i < n; i++) {
        uint32_t crc = (uint32_t)ts_crc32(0, r[i].data, r[i].len), off = (uint32_t)z.n;
        size_t nl = strlen(r[i].name);
        put32(&z, 0x04034b50);
        put16(&z, 20), put16(&z, 0), put16(&z, 0), put16(&z, 0), put16(&z, 0);
        put32(&z, crc), put32(&z, (uint32_t)r[i].len), put32(&z, (uint32_t)r[i].len);
        put16(&z, (unsigned)nl), put16(&z, 0);
        put_s(&z, r[i].name);
        if (r[i].len) put(&z, r[i].data, r[i].len);
        put32(&cd, 0x02014b50);
        put16(&cd, 20), put16(&cd, 20), put16(&cd, 0), put16(&cd, 0), put16(&cd, 0), put16(&cd, 0);
        put32(&cd, crc), put32(&cd, (uint32_t)r[i].len), put32(&cd, (uint32_t)r[i].len);
        put16(&cd, (unsigned)nl), put16(&cd, 0), put16(&cd, 0), put16(&cd, 0), put16(&cd, 0), put32(&cd, 0);
        put32(&cd, off);
        put_s(&cd, r[i].name);
    }
    uint32_t cd_off = (uint32_t)z.n;
    put(&z, cd.p, cd.n);
    put32(&z, 0x06054b50);
    put16(&z, 0), put16(&z, 0), put16(&z, (unsigned)n), put16(&z, (unsigned)n);
    put32(&z, (uint32_t)cd.n), put32(&z, cd_off), put16(&z, 0);
    free(cd.p);
    return z;
}

/* The pickle of {key: tensor} with one storage-backed tensor:
 * ('storage', torch.<stype>, skey, 'cpu', numel), offset, (size,), (1,). */
static buf tensor_pickle(const char *key, const char *stype, const char *skey, unsigned numel, unsigned offset,
                         unsigned size)
{
    buf p = {0};
    put_s(&p, "\x80\x02}(");
    pk_str(&p, key);
    put_s(&p, "ctorch._utils\n_rebuild_tensor_v2\n((");
    pk_str(&p, "storage");
    put_s(&p, "ctorch\n");
    put_s(&p, stype);
    put_s(&p, "\n");
    pk_str(&p, skey);
    pk_str(&p, "cpu");
    put8(&p, 'K'), put8(&p, numel);
    put_s(&p, "tQ");
    put8(&p, 'K'), put8(&p, offset);
    put8(&p, 'K'), put8(&p, size), put8(&p, 0x85);
    put8(&p, 'K'), put8(&p, 1), put8(&p, 0x85);
    put8(&p, 0x89);
    put_s(&p, "ccollections\nOrderedDict\n)RtRu.");
    return p;
}

static const float six[6] = {1, 2, 3, 4, 5, 6};

/* Parses an archive holding data.pkl = pkl (plus version and data/0 = six
 * floats unless told otherwise) and expects an error mentioning a and b. */
static void expect_pickle_error(const char *what, const void *pkl, size_t len, ts_status want, const char *a,
                                const char *b)
{
    rec r[] = {{"t/data.pkl", pkl, len}, {"t/version", "3\n", 2}, {"t/data/0", six, sizeof six}};
    buf z = make_zip(r, 3);
    ts_dict d;
    ts_dict_init(&d);
    tu_expect_error(ts_pth_parse(z.p, z.n, what, &d), want, what, what, a, b, NULL);
    tu_expect(d.count == 0, "%s: nothing added", what);
    ts_dict_free(&d);
    free(z.p);
}

static void test_hand_built(void)
{
    /* the builder itself produces a readable file */
    buf p = tensor_pickle("w", "FloatStorage", "0", 6, 0, 6);
    rec r[] = {{"t/data.pkl", p.p, p.n}, {"t/version", "3\n", 2}, {"t/data/0", six, sizeof six}};
    buf z = make_zip(r, 3);
    ts_dict d;
    ts_dict_init(&d);
    if (tu_expect_ok(ts_pth_parse(z.p, z.n, "handmade", &d), "hand-built archive")) {
        const int64_t s6[] = {6};
        const ts_named_tensor *t = get(&d, "w", TS_F32, 1, s6, "handmade");
        tu_expect(t && memcmp(t->data, six, sizeof six) == 0, "hand-built values");
    }
    ts_dict_free(&d);

    /* every truncation of a valid file is refused cleanly */
    size_t fails = 0;
    for (size_t n = 0; n < z.n; n++) {
        unsigned char *cut = malloc(n ? n : 1);
        memcpy(cut, z.p, n);
        ts_dict_init(&d);
        ts_status st = ts_pth_parse(cut, n, "cut", &d);
        if (st == TS_OK || !strstr(ts_last_error(), "cut") || d.count) fails++;
        ts_dict_free(&d);
        free(cut);
    }
    tu_expect(fails == 0, "all %zu truncations of a hand-built archive refused (%zu not)", z.n, fails);
    free(z.p);

    /* storage key referenced but missing; numel x size mismatch; view past the end */
    buf q = tensor_pickle("w", "FloatStorage", "7", 6, 0, 6);
    expect_pickle_error("missing storage key", q.p, q.n, TS_ERR_INVALID_ARG, "storage '7'", "has no record 't/data/7'");
    free(q.p);
    q = tensor_pickle("w", "FloatStorage", "0", 7, 0, 6);
    expect_pickle_error("numel mismatch", q.p, q.n, TS_ERR_INVALID_ARG, "holds 24 bytes", "declares 7 elements");
    free(q.p);
    q = tensor_pickle("w", "DoubleStorage", "0", 6, 0, 6);
    expect_pickle_error("element size mismatch", q.p, q.n, TS_ERR_INVALID_ARG, "holds 24 bytes", "DoubleStorage");
    free(q.p);
    q = tensor_pickle("w", "FloatStorage", "0", 6, 3, 4);
    expect_pickle_error("view past the end", q.p, q.n, TS_ERR_INVALID_ARG, "reaches past the end", "t/data/0");
    free(q.p);
    q = tensor_pickle("w", "BoolStorage", "0", 24, 0, 6);
    expect_pickle_error("bool tensor", q.p, q.n, TS_ERR_UNSUPPORTED, "tensor 'w'", "bool");
    free(q.p);
    q = tensor_pickle("w", "Evil", "0", 6, 0, 6);
    expect_pickle_error("forbidden storage global", q.p, q.n, TS_ERR_UNSUPPORTED, "'torch.Evil'", "was refused");
    free(q.p);
    free(p.p);

    /* forbidden opcodes and globals, broken pickles */
#define PK(s) s, sizeof s - 1
    expect_pickle_error("INST opcode", PK("\x80\x02(ios\nsystem\nX\x02\x00\x00\x00ls."), TS_ERR_UNSUPPORTED,
                        "opcode 0x69 (INST)", "nothing in it was executed");
    expect_pickle_error("POP opcode", PK("\x80\x02}0."), TS_ERR_UNSUPPORTED, "(POP)", "weights-only");
    expect_pickle_error("EXT1 opcode", PK("\x80\x02\x82\x01."), TS_ERR_UNSUPPORTED, "(EXT1)", "refused");
    expect_pickle_error("subprocess global", PK("\x80\x02" "csubprocess\nPopen\n."), TS_ERR_UNSUPPORTED,
                        "'subprocess.Popen'", "allowlist");
    expect_pickle_error("memo out of range", PK("\x80\x02}q\x00h\x09."), TS_ERR_INVALID_ARG, "memo index 9",
                        "never stored");
    expect_pickle_error("long memo out of range", PK("\x80\x02j\xff\xff\xff\xff."), TS_ERR_INVALID_ARG,
                        "memo index 4294967295", "never stored");
    expect_pickle_error("memo put too large", PK("\x80\x02}r\xff\xff\xff\xff."), TS_ERR_INVALID_ARG, "memo index",
                        "too large");
    expect_pickle_error("stack underflow REDUCE", PK("\x80\x02)R."), TS_ERR_INVALID_ARG, "stack underflow", "0x52");
    expect_pickle_error("stack underflow STOP", PK("\x80\x02."), TS_ERR_INVALID_ARG, "stack underflow", "0x2e");
    expect_pickle_error("pop across a MARK", PK("\x80\x02})(s."), TS_ERR_INVALID_ARG, "stack underflow", "0x73");
    expect_pickle_error("TUPLE without MARK", PK("\x80\x02t."), TS_ERR_INVALID_ARG, "without a MARK", "0x74");
    expect_pickle_error("SETITEM on a list", PK("\x80\x02]X\x01\x00\x00\x00" "aK\x01s."), TS_ERR_INVALID_ARG,
                        "SETITEM on a list", "data.pkl");
    expect_pickle_error("APPEND to a dict", PK("\x80\x02}K\x01" "a."), TS_ERR_INVALID_ARG, "APPEND to a dict", "data.pkl");
    expect_pickle_error("BUILD on an int", PK("\x80\x02K\x01}b."), TS_ERR_UNSUPPORTED, "BUILD on a int", "not allowed");
    expect_pickle_error("REDUCE on a storage type", PK("\x80\x02" "ctorch\nFloatStorage\n)R."), TS_ERR_UNSUPPORTED,
                        "'torch.FloatStorage'", "not allowed");
    expect_pickle_error("REDUCE on a string", PK("\x80\x02X\x01\x00\x00\x00" "a)R."), TS_ERR_UNSUPPORTED,
                        "REDUCE on a str", "allowlisted");
    expect_pickle_error("huge BINUNICODE", PK("\x80\x02X\xff\xff\xff\x7f"), TS_ERR_INVALID_ARG, "truncated", "data.pkl");
    expect_pickle_error("no STOP", PK("\x80\x02}"), TS_ERR_INVALID_ARG, "without a STOP", "data.pkl");
    expect_pickle_error("persistent id not storage", PK("\x80\x02X\x01\x00\x00\x00x\x85Q."), TS_ERR_UNSUPPORTED,
                        "persistent id", "'storage'");
    expect_pickle_error("list at the top", PK("\x80\x02]."), TS_ERR_INVALID_ARG, "holds a list", "state dict");
    expect_pickle_error("deep MARK nesting", "\x80\x02", 2, TS_ERR_INVALID_ARG, "without a STOP", NULL);
#undef PK
    {
        /* 70000 nested MARKs: refused by the nesting limit, no recursion */
        size_t n = 70000;
        unsigned char *deep = malloc(n + 3);
        deep[0] = 0x80, deep[1] = 2;
        memset(deep + 2, '(', n);
        deep[n + 2] = '.';
        expect_pickle_error("deep MARKs", deep, n + 3, TS_ERR_INVALID_ARG, "nested MARKs", "data.pkl");
        free(deep);
    }

    /* archive-level problems */
    buf ok = tensor_pickle("w", "FloatStorage", "0", 6, 0, 6);
    struct {
        const char *what;
        rec r[4];
        int n;
        ts_status st;
        const char *a;
    } arch[] = {
        {"no version", {{"t/data.pkl", ok.p, ok.n}, {"t/data/0", six, sizeof six}}, 2, TS_ERR_INVALID_ARG,
         "no 'version' record"},
        {"bad version", {{"t/data.pkl", ok.p, ok.n}, {"t/version", "99\n", 3}, {"t/data/0", six, sizeof six}}, 3,
         TS_ERR_UNSUPPORTED, "version record"},
        {"no data.pkl", {{"t/version", "3\n", 2}, {"t/data/0", six, sizeof six}}, 2, TS_ERR_INVALID_ARG,
         "no 'data.pkl'"},
        {"bad byteorder",
         {{"t/data.pkl", ok.p, ok.n}, {"t/version", "3\n", 2}, {"t/byteorder", "middle", 6}, {"t/data/0", six, 24}},
         4, TS_ERR_INVALID_ARG, "byteorder"},
        {"duplicate record",
         {{"t/data.pkl", ok.p, ok.n}, {"t/version", "3\n", 2}, {"t/data/0", six, 24}, {"t/data/0", six, 24}}, 4,
         TS_ERR_INVALID_ARG, "appears twice"},
        {"outside the archive folder", {{"t/data.pkl", ok.p, ok.n}, {"t/version", "3\n", 2}, {"u/data/0", six, 24}}, 3,
         TS_ERR_INVALID_ARG, "outside the archive folder"},
        {"no archive folder", {{"data.pkl", ok.p, ok.n}}, 1, TS_ERR_INVALID_ARG, "archive folder"},
        {"TorchScript", {{"t/data.pkl", ok.p, ok.n}, {"t/version", "3\n", 2}, {"t/constants.pkl", "x", 1}}, 3,
         TS_ERR_UNSUPPORTED, "TorchScript"},
    };
    for (size_t i = 0; i < sizeof arch / sizeof arch[0]; i++) {
        buf a = make_zip(arch[i].r, arch[i].n);
        ts_dict_init(&d);
        tu_expect_error(ts_pth_parse(a.p, a.n, arch[i].what, &d), arch[i].st, arch[i].what, arch[i].what, arch[i].a,
                        NULL);
        ts_dict_free(&d);
        free(a.p);
    }

    /* byte-level damage of a valid archive */
    rec r2[] = {{"t/data.pkl", ok.p, ok.n}, {"t/version", "3\n", 2}, {"t/data/0", six, sizeof six}};
    z = make_zip(r2, 3);
    size_t cd = z.n - 22 - (46 + 10) - (46 + 9) - (46 + 8); /* start of the central directory */
    struct {
        const char *what;
        size_t at;
        unsigned char v;
        ts_status st;
        const char *a;
    } dmg[] = {
        {"corrupt CRC", z.n - 22 - 200, 0, TS_ERR_INVALID_ARG, "CRC-32 mismatch"}, /* a byte of the data */
        {"deflated entry", cd + 10, 8, TS_ERR_UNSUPPORTED, "compressed (ZIP method 8)"},
        {"huge size", cd + 24 + 3, 0x7f, TS_ERR_INVALID_ARG, "runs past the end"},
        {"huge packed size", cd + 20 + 3, 0x7f, TS_ERR_INVALID_ARG, "different packed"},
        {"local header offset out of range", cd + 42 + 3, 0xff, TS_ERR_INVALID_ARG, "local header missing"},
        {"ZIP64 value missing", cd + 20, 0xff, TS_ERR_INVALID_ARG, "ZIP64 size or offset missing"},
        {"huge entry count", z.n - 22 + 10 + 1, 0xff, TS_ERR_INVALID_ARG, "do not fit"},
        {"directory past the end", z.n - 22 + 16 + 3, 0x10, TS_ERR_INVALID_ARG, "outside"},
        {"no end record", z.n - 22, 'X', TS_ERR_INVALID_ARG, "end-of-central-directory"},
        {"not a zip", 2, 'X', TS_ERR_INVALID_ARG, "not a torch.save file"},
    };
    for (size_t i = 0; i < sizeof dmg / sizeof dmg[0]; i++) {
        unsigned char *c = malloc(z.n);
        memcpy(c, z.p, z.n);
        if (strcmp(dmg[i].what, "huge size") == 0) c[cd + 20 + 3] = 0x7f; /* packed size too */
        if (strcmp(dmg[i].what, "ZIP64 value missing") == 0) memset(c + cd + 20, 0xff, 8); /* both sizes */
        if (strcmp(dmg[i].what, "corrupt CRC") == 0) {
            /* flip a byte inside data/0's data: it is the last record before the directory */
            c[cd - 5] ^= 0x55;
        } else {
            c[dmg[i].at] = dmg[i].v;
        }
        ts_dict_init(&d);
        tu_expect_error(ts_pth_parse(c, z.n, dmg[i].what, &d), dmg[i].st, dmg[i].what, dmg[i].what, dmg[i].a, NULL);
        ts_dict_free(&d);
        free(c);
    }
    free(z.p);
    free(ok.p);
}

int main(void)
{
    const char *keep = getenv("TERRASEG_PTH_KEEP");
    if (keep && keep[0]) {
        snprintf(tmpdir, sizeof tmpdir, "%s", keep);
    } else {
        snprintf(tmpdir, sizeof tmpdir, "/tmp/terraseg_test_pth_XXXXXX");
        if (!mkdtemp(tmpdir)) {
            perror("mkdtemp");
            return 1;
        }
    }
    test_fixtures();
    test_round_trips();
    test_hand_built();
    if (!(keep && keep[0])) {
        const char *names[] = {"plain.pth", "checkpoint.pth", "lightning.pth", "bigendian.pth", "plain_zip64.pth",
                               "empty.pth", "big.pth"};
        char path[600];
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
            snprintf(path, sizeof path, "%s/%s", tmpdir, names[i]);
            remove(path);
        }
        rmdir(tmpdir);
    }
    return tu_finish("test_pth");
}
