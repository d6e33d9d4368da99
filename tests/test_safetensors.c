/* The safetensors reader and writer (weights/safetensors.c):
 *  - files written by Python's safetensors.torch.save_file
 *    (tests/fixtures/make_safetensors_fixtures.py): every supported dtype
 *    with exact values, a 0-dim scalar, an empty tensor, IEEE specials, 8
 *    dimensions, metadata, JSON escapes in names, a file without tensors;
 *  - the writer reproduces those files byte for byte (also when the
 *    dictionary is filled in another order), through memory and a file;
 *  - every truncation of a valid file, and each kind of malformed header,
 *    is refused with a message that names the problem;
 *  - file errors and the atomic write (no partial file is left behind). */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/fixture.h"
#include "tests/testutil.h"
#include "weights/safetensors.h"

/* ---- helpers ------------------------------------------------------------- */

static unsigned char *slurp(const char *path, size_t *len)
{
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = malloc(n > 0 ? (size_t)n : 1);
    if (p && n > 0 && fread(p, 1, (size_t)n, f) != (size_t)n) {
        free(p);
        p = NULL;
    }
    fclose(f);
    if (p) *len = (size_t)n;
    return p;
}

static void fixture_path(char *buf, size_t size, const char *name)
{
    snprintf(buf, size, "%s/safetensors/%s", fx_dir(), name);
}

static int file_exists(const char *path)
{
    struct stat sb;
    return lstat(path, &sb) == 0;
}

/* Same tensors (any order) and the same metadata (in order). */
static int dicts_equal(const ts_dict *a, const ts_dict *b, const char *what)
{
    if (!tu_expect(a->count == b->count, "%s: %zu vs %zu tensors", what, a->count, b->count)) return 0;
    for (size_t i = 0; i < a->count; i++) {
        const ts_named_tensor *x = &a->items[i], *y = ts_dict_find(b, x->name);
        if (!tu_expect(y != NULL, "%s: tensor \"%s\" missing", what, x->name)) return 0;
        int same = x->dtype == y->dtype && x->ndim == y->ndim && x->nbytes == y->nbytes &&
                   memcmp(x->shape, y->shape, sizeof(int64_t) * (size_t)x->ndim) == 0 &&
                   (x->nbytes == 0 || memcmp(x->data, y->data, x->nbytes) == 0);
        if (!tu_expect(same, "%s: tensor \"%s\" differs", what, x->name)) return 0;
    }
    if (!tu_expect(a->meta_count == b->meta_count, "%s: %zu vs %zu metadata entries", what, a->meta_count,
                   b->meta_count))
        return 0;
    for (size_t i = 0; i < a->meta_count; i++)
        if (!tu_expect(strcmp(a->meta[i].key, b->meta[i].key) == 0 && strcmp(a->meta[i].value, b->meta[i].value) == 0,
                       "%s: metadata entry %zu differs", what, i))
            return 0;
    return 1;
}

static const ts_named_tensor *expect_tensor(const ts_dict *d, const char *name, ts_dtype dtype, int ndim,
                                            const int64_t *shape)
{
    const ts_named_tensor *t = ts_dict_find(d, name);
    if (!tu_expect(t != NULL, "all_dtypes: tensor %s present", name)) return NULL;
    int ok = t->dtype == dtype && t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (!tu_expect(ok, "all_dtypes: %s has dtype %s, %d dims (want %s, %d)", name, ts_dtype_safetensors_name(t->dtype),
                   t->ndim, ts_dtype_safetensors_name(dtype), ndim))
        return NULL;
    tu_expect(t->nbytes == ts_named_numel(t) * ts_dtype_size(dtype), "all_dtypes: %s byte count", name);
    return t;
}

/* A safetensors file from a header text and data_len data bytes (0, 1, 2, ...). */
static unsigned char *make_file(const char *json, size_t data_len, size_t *len)
{
    size_t n = strlen(json);
    *len = 8 + n + data_len;
    unsigned char *p = malloc(*len);
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(p + 8, json, n);
    for (size_t i = 0; i < data_len; i++) p[8 + n + i] = (unsigned char)i;
    return p;
}

/* Parses json + data and expects status `want` with every substring given. */
static void expect_bad(const char *what, const char *json, size_t data_len, ts_status want, ...)
{
    size_t len;
    unsigned char *buf = make_file(json, data_len, &len);
    ts_dict d;
    ts_status st = ts_safetensors_parse(buf, len, "bad.safetensors", &d);
    free(buf);
    char label[160];
    snprintf(label, sizeof label, "bad input: %s", what);
    if (st != want) {
        tu_expect(0, "%s: expected \"%s\", got \"%s\" (%s)", label, ts_status_name(want), ts_status_name(st),
                  ts_last_error());
        if (st == TS_OK) ts_dict_free(&d);
        return;
    }
    int ok = strstr(ts_last_error(), "bad.safetensors") != NULL;
    va_list ap;
    va_start(ap, want);
    const char *sub;
    while (ok && (sub = va_arg(ap, const char *)) != NULL) ok = strstr(ts_last_error(), sub) != NULL;
    va_end(ap);
    tu_expect(ok, "%s: message \"%s\" lacks the file name or an expected word", label, ts_last_error());
    if (getenv("TS_SHOW_ERRORS")) printf("%s\n    -> %s\n", label, ts_last_error());
    tu_expect(d.count == 0 && d.items == NULL && d.meta_count == 0, "%s: dictionary left empty", label);
}

static void expect_good(const char *what, const char *json, size_t data_len, ts_dict *d)
{
    size_t len;
    unsigned char *buf = make_file(json, data_len, &len);
    ts_status st = ts_safetensors_parse(buf, len, "good.safetensors", d);
    free(buf);
    tu_expect_ok(st, what);
    if (st != TS_OK) ts_dict_init(d);
}

#define T_A "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"

/* ---- real files from Python ---------------------------------------------- */

static void test_all_dtypes(void)
{
    char path[1024];
    fixture_path(path, sizeof path, "all_dtypes.safetensors");
    ts_dict d;
    if (!tu_expect_ok(ts_safetensors_read(path, &d), "read all_dtypes.safetensors")) return;

    /* data order: what save_file wrote (I64, F64, F32, I32, BF16, F16, U8; then by name) */
    static const char *const order[] = {"e.i64", "h.num_batches_tracked", "d.f64", "a.f32", "i.empty", "j.special",
                                        "k.matrix", "f.i32", "c.bf16", "b.f16", "g.u8"};
    int in_order = d.count == 11;
    for (size_t i = 0; in_order && i < 11; i++) in_order = strcmp(d.items[i].name, order[i]) == 0;
    tu_expect(in_order, "all_dtypes: 11 tensors in data order");
    tu_expect(d.meta_count == 1 && ts_dict_get_meta(&d, "format") && strcmp(ts_dict_get_meta(&d, "format"), "pt") == 0,
              "all_dtypes: metadata {\"format\": \"pt\"}");

    const ts_named_tensor *t;
    float f[32];
    if ((t = expect_tensor(&d, "a.f32", TS_F32, 3, (int64_t[]){2, 3, 4}))) {
        int ok = 1;
        for (int i = 0; i < 24; i++) {
            float v;
            memcpy(&v, (char *)t->data + 4 * i, 4);
            ok &= v == (float)(i * 0.25 - 1.5);
        }
        tu_expect(ok, "all_dtypes: a.f32 values");
    }
    if ((t = expect_tensor(&d, "b.f16", TS_F16, 2, (int64_t[]){3, 5}))) {
        int ok = ts_named_to_f32(t, f) == TS_OK;
        for (int i = 0; ok && i < 15; i++) ok = f[i] == (float)(i * 0.5 - 2);
        uint16_t h0;
        memcpy(&h0, t->data, 2);
        tu_expect(ok && h0 == 0xC000, "all_dtypes: b.f16 values (first half 0x%04x, want 0xc000 = -2)", h0);
    }
    if ((t = expect_tensor(&d, "c.bf16", TS_BF16, 3, (int64_t[]){2, 2, 2}))) {
        int ok = ts_named_to_f32(t, f) == TS_OK;
        for (int i = 0; ok && i < 8; i++) ok = f[i] == (float)(i * 2 - 7);
        uint16_t h0;
        memcpy(&h0, t->data, 2);
        tu_expect(ok && h0 == 0xC0E0, "all_dtypes: c.bf16 values (first 0x%04x, want 0xc0e0 = -7)", h0);
    }
    if ((t = expect_tensor(&d, "d.f64", TS_F64, 1, (int64_t[]){7}))) {
        int ok = 1;
        for (int i = 0; i < 7; i++) {
            double v, want = (double)i / 3.0;
            memcpy(&v, (char *)t->data + 8 * i, 8);
            ok &= memcmp(&v, &want, 8) == 0;
        }
        tu_expect(ok, "all_dtypes: d.f64 values bit-exact");
    }
    if ((t = expect_tensor(&d, "e.i64", TS_I64, 2, (int64_t[]){2, 3}))) {
        int ok = 1;
        for (int i = 0; i < 6; i++) {
            int64_t v;
            memcpy(&v, (char *)t->data + 8 * i, 8);
            ok &= v == (int64_t)i * 1000000000007LL - 5;
        }
        tu_expect(ok, "all_dtypes: e.i64 values");
    }
    if ((t = expect_tensor(&d, "f.i32", TS_I32, 1, (int64_t[]){5}))) {
        int ok = 1;
        for (int i = 0; i < 5; i++) {
            int32_t v;
            memcpy(&v, (char *)t->data + 4 * i, 4);
            ok &= v == i * 100003 - 7;
        }
        tu_expect(ok, "all_dtypes: f.i32 values");
    }
    if ((t = expect_tensor(&d, "g.u8", TS_U8, 1, (int64_t[]){17}))) {
        int ok = 1;
        for (int i = 0; i < 17; i++) ok &= ((unsigned char *)t->data)[i] == (i * 37) % 256;
        tu_expect(ok, "all_dtypes: g.u8 values");
    }
    if ((t = expect_tensor(&d, "h.num_batches_tracked", TS_I64, 0, NULL))) {
        int64_t v;
        memcpy(&v, t->data, 8);
        tu_expect(t->nbytes == 8 && v == 123456789012LL, "all_dtypes: 0-dim I64 scalar = %lld", (long long)v);
    }
    if ((t = expect_tensor(&d, "i.empty", TS_F32, 1, (int64_t[]){0})))
        tu_expect(t->nbytes == 0 && t->data != NULL, "all_dtypes: empty tensor has 0 bytes");
    if ((t = expect_tensor(&d, "j.special", TS_F32, 1, (int64_t[]){5}))) {
        static const uint32_t want[5] = {0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0x00000001u};
        tu_expect(memcmp(t->data, want, 20) == 0, "all_dtypes: j.special bits (-0, inf, -inf, nan, subnormal)");
    }
    if ((t = expect_tensor(&d, "k.matrix", TS_F32, 8, (int64_t[]){1, 1, 1, 1, 1, 1, 1, 3}))) {
        int ok = ts_named_to_f32(t, f) == TS_OK && f[0] == 1 && f[1] == 2 && f[2] == 3;
        tu_expect(ok, "all_dtypes: 8-dim tensor values");
    }

    /* the memory parser gives the same dictionary */
    size_t len;
    unsigned char *bytes = slurp(path, &len);
    ts_dict m;
    if (tu_expect(bytes != NULL, "slurp %s", path) &&
        tu_expect_ok(ts_safetensors_parse(bytes, len, path, &m), "parse all_dtypes from memory")) {
        dicts_equal(&d, &m, "all_dtypes: read vs parse");
        int same_order = 1;
        for (size_t i = 0; i < d.count && i < m.count; i++) same_order &= strcmp(d.items[i].name, m.items[i].name) == 0;
        tu_expect(same_order, "all_dtypes: read and parse return the same order");
        ts_dict_free(&m);
    }
    free(bytes);
    ts_dict_free(&d);
}

static void test_other_fixtures(void)
{
    char path[1024];
    ts_dict d;
    fixture_path(path, sizeof path, "no_metadata.safetensors");
    if (tu_expect_ok(ts_safetensors_read(path, &d), "read no_metadata.safetensors")) {
        static const char *const order[] = {"bias", "Layer.1.w", "layer.10.w", "layer.2", "layer.2.w"};
        int ok = d.count == 5 && d.meta_count == 0;
        for (size_t i = 0; ok && i < 5; i++) ok = strcmp(d.items[i].name, order[i]) == 0;
        tu_expect(ok, "no_metadata: 5 tensors, no metadata, byte-order names");
        const ts_named_tensor *t = ts_dict_find(&d, "layer.10.w");
        float v[2] = {0};
        if (t && t->nbytes == 8) memcpy(v, t->data, 8);
        tu_expect(v[0] == 10 && v[1] == 10, "no_metadata: layer.10.w = [10, 10]");
        ts_dict_free(&d);
    }
    fixture_path(path, sizeof path, "escapes.safetensors");
    if (tu_expect_ok(ts_safetensors_read(path, &d), "read escapes.safetensors")) {
        const ts_named_tensor *q = ts_dict_find(&d, "quote\"back\\slash");
        const ts_named_tensor *c = ts_dict_find(&d, "tab\tnewline\nctl\x01\x1f del\x7f");
        const ts_named_tensor *u = ts_dict_find(&d, "unicode.\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80/slash");
        tu_expect(q && c && u, "escapes: names with quotes, backslashes, control characters and UTF-8 decoded");
        const char *note = ts_dict_get_meta(&d, "note");
        tu_expect(note && strcmp(note, "a \"b\" \\ c\n\xc3\xa9") == 0, "escapes: metadata value decoded");
        ts_dict_free(&d);
    }
    fixture_path(path, sizeof path, "empty.safetensors");
    if (tu_expect_ok(ts_safetensors_read(path, &d), "read empty.safetensors")) {
        tu_expect(d.count == 0 && d.meta_count == 0, "empty: no tensors");
        ts_dict_free(&d);
    }
}

/* ---- writer: byte-identical to save_file --------------------------------- */

static char tmpdir[512];

static void test_round_trip(void)
{
    static const char *const files[] = {"all_dtypes.safetensors", "no_metadata.safetensors", "escapes.safetensors",
                                        "empty.safetensors"};
    for (size_t k = 0; k < sizeof files / sizeof *files; k++) {
        char path[1024], out[1024];
        fixture_path(path, sizeof path, files[k]);
        snprintf(out, sizeof out, "%s/%s", tmpdir, files[k]);
        size_t len;
        unsigned char *orig = slurp(path, &len);
        ts_dict d;
        if (!tu_expect(orig != NULL, "slurp %s", path) || !tu_expect_ok(ts_safetensors_read(path, &d), files[k])) {
            free(orig);
            continue;
        }
        unsigned char *buf;
        size_t blen;
        if (tu_expect_ok(ts_safetensors_serialize(&d, &buf, &blen), "serialize")) {
            tu_expect(blen == len && memcmp(buf, orig, len) == 0, "%s: serialize gives the bytes save_file wrote",
                      files[k]);
            free(buf);
        }
        if (tu_expect_ok(ts_safetensors_write(out, &d), "write")) {
            size_t wlen;
            unsigned char *written = slurp(out, &wlen);
            tu_expect(written && wlen == len && memcmp(written, orig, len) == 0,
                      "%s: written file is byte-identical to save_file's", files[k]);
            free(written);
            char tmp[1100];
            snprintf(tmp, sizeof tmp, "%s.tmp", out);
            tu_expect(!file_exists(tmp), "%s: no temporary file left", files[k]);
            ts_dict back;
            if (tu_expect_ok(ts_safetensors_read(out, &back), "read back")) {
                dicts_equal(&d, &back, files[k]);
                ts_dict_free(&back);
            }
            unlink(out);
        }

        /* filled in reverse order: the writer's sort still gives save_file's bytes */
        ts_dict r;
        ts_dict_init(&r);
        int ok = 1;
        for (size_t i = d.count; ok && i-- > 0;) {
            const ts_named_tensor *t = &d.items[i];
            ok = ts_dict_add(&r, t->name, t->dtype, t->ndim, t->shape, t->data) == TS_OK;
        }
        for (size_t i = 0; ok && i < d.meta_count; i++)
            ok = ts_dict_set_meta(&r, d.meta[i].key, d.meta[i].value) == TS_OK;
        if (tu_expect(ok, "%s: rebuild dictionary in reverse", files[k]) &&
            tu_expect_ok(ts_safetensors_serialize(&r, &buf, &blen), "serialize reversed")) {
            tu_expect(blen == len && memcmp(buf, orig, len) == 0, "%s: reversed insertion order gives the same bytes",
                      files[k]);
            free(buf);
        }
        ts_dict_free(&r);
        ts_dict_free(&d);
        free(orig);
    }
}

/* Random dictionaries: parse(serialize(d)) == d, and the file is sorted by
 * dtype (descending alignment), then name, with no gaps. */
static void test_random_round_trip(void)
{
    tu_rng rng;
    tu_rng_seed(&rng, 20261121);
    static const ts_dtype dts[] = {TS_F32, TS_F16, TS_BF16, TS_F64, TS_I64, TS_I32, TS_U8};
    for (int round = 0; round < 20; round++) {
        ts_dict d;
        ts_dict_init(&d);
        int n = tu_randint(&rng, 40);
        for (int i = 0; i < n; i++) {
            char name[32];
            snprintf(name, sizeof name, "t%d.%c%d", tu_randint(&rng, 1000), 'a' + tu_randint(&rng, 26), i);
            int ndim = tu_randint(&rng, 5);
            int64_t shape[TS_MAX_DIMS];
            size_t numel = 1;
            for (int k = 0; k < ndim; k++) {
                shape[k] = tu_randint(&rng, 4);
                numel *= (size_t)shape[k];
            }
            ts_dtype dt = dts[tu_randint(&rng, 7)];
            size_t nbytes = numel * ts_dtype_size(dt);
            unsigned char *data = malloc(nbytes + 1);
            for (size_t b = 0; b < nbytes; b++) data[b] = (unsigned char)tu_next(&rng);
            ts_dict_add(&d, name, dt, ndim, shape, data);
            free(data);
        }
        if (tu_randint(&rng, 2)) ts_dict_set_meta(&d, "format", "pt");
        unsigned char *buf;
        size_t len;
        ts_dict back;
        if (!tu_expect_ok(ts_safetensors_serialize(&d, &buf, &len), "serialize a random dictionary")) {
            ts_dict_free(&d);
            continue;
        }
        if (tu_expect_ok(ts_safetensors_parse(buf, len, "random", &back), "parse a random dictionary")) {
            dicts_equal(&d, &back, "random round trip");
            int sorted = 1;
            for (size_t i = 1; i < back.count; i++) {
                const ts_named_tensor *a = &back.items[i - 1], *b = &back.items[i];
                int ra = a->dtype == TS_I64 ? 7 : a->dtype == TS_F64 ? 6 : a->dtype == TS_F32 ? 5
                       : a->dtype == TS_I32 ? 4 : a->dtype == TS_BF16 ? 3 : a->dtype == TS_F16 ? 2 : 1;
                int rb = b->dtype == TS_I64 ? 7 : b->dtype == TS_F64 ? 6 : b->dtype == TS_F32 ? 5
                       : b->dtype == TS_I32 ? 4 : b->dtype == TS_BF16 ? 3 : b->dtype == TS_F16 ? 2 : 1;
                sorted &= ra > rb || (ra == rb && strcmp(a->name, b->name) < 0);
            }
            tu_expect(sorted, "random round trip: file order is dtype descending, then name");
            ts_dict_free(&back);
        }
        free(buf);
        ts_dict_free(&d);
    }
}

/* ---- malformed input ------------------------------------------------------ */

static void test_truncations(void)
{
    static const char *const files[] = {"all_dtypes.safetensors", "no_metadata.safetensors", "empty.safetensors"};
    for (size_t k = 0; k < sizeof files / sizeof *files; k++) {
        char path[1024];
        fixture_path(path, sizeof path, files[k]);
        size_t len;
        unsigned char *orig = slurp(path, &len);
        if (!tu_expect(orig != NULL, "slurp %s", path)) continue;
        size_t bad = len;
        for (size_t n = 0; n < len; n++) {
            /* an exact-size copy, so that ASan sees any read past the end */
            unsigned char *p = malloc(n ? n : 1);
            memcpy(p, orig, n);
            ts_dict d;
            ts_clear_error();
            ts_status st = ts_safetensors_parse(p, n, "cut.safetensors", &d);
            free(p);
            if (st == TS_OK) ts_dict_free(&d);
            if (st != TS_ERR_INVALID_ARG || !strstr(ts_last_error(), "cut.safetensors") || d.count || d.items) {
                bad = n;
                break;
            }
        }
        tu_expect(bad == len, "%s: all %zu truncations refused cleanly (first failure at %zu bytes: %s)", files[k], len,
                  bad, ts_last_error());
        /* a few also through the file reader, which must name the path */
        char cut[1024];
        snprintf(cut, sizeof cut, "%s/cut.safetensors", tmpdir);
        size_t lens[] = {0, 7, 8, 20, len / 2, len - 1};
        for (size_t i = 0; i < sizeof lens / sizeof *lens; i++) {
            if (lens[i] >= len) continue;
            FILE *f = fopen(cut, "wb");
            if (!f) break;
            fwrite(orig, 1, lens[i], f);
            fclose(f);
            ts_dict d;
            char what[128];
            snprintf(what, sizeof what, "%s cut to %zu bytes, read from a file", files[k], lens[i]);
            tu_expect_error(ts_safetensors_read(cut, &d), TS_ERR_INVALID_ARG, what, cut, (const char *)NULL);
        }
        unlink(cut);
        free(orig);
    }
}

static void test_bad_headers(void)
{
    /* lengths */
    {
        size_t len;
        unsigned char *p = make_file("{" T_A "}", 8, &len);
        ts_dict d;
        p[0] += 1; /* header one byte longer than it is: eats a data byte, JSON still ends early */
        ts_status st = ts_safetensors_parse(p, len, "bad.safetensors", &d);
        tu_expect_error(st, TS_ERR_INVALID_ARG, "header length off by one", "bad.safetensors", (const char *)NULL);
        uint64_t big = (uint64_t)len; /* more than what follows */
        for (int i = 0; i < 8; i++) p[i] = (unsigned char)(big >> (8 * i));
        tu_expect_error(ts_safetensors_parse(p, len, "bad.safetensors", &d), TS_ERR_INVALID_ARG,
                        "header length > file", "header length", "truncated", (const char *)NULL);
        uint64_t absurd = UINT64_C(1) << 63;
        for (int i = 0; i < 8; i++) p[i] = (unsigned char)(absurd >> (8 * i));
        tu_expect_error(ts_safetensors_parse(p, len, "bad.safetensors", &d), TS_ERR_INVALID_ARG,
                        "header length 2^63", "9223372036854775808", "limit", (const char *)NULL);
        memset(p, 0xff, 8);
        tu_expect_error(ts_safetensors_parse(p, len, "bad.safetensors", &d), TS_ERR_INVALID_ARG,
                        "header length 2^64-1", "limit", (const char *)NULL);
        uint64_t over = TS_SAFETENSORS_MAX_HEADER + 1ull;
        for (int i = 0; i < 8; i++) p[i] = (unsigned char)(over >> (8 * i));
        tu_expect_error(ts_safetensors_parse(p, len, "bad.safetensors", &d), TS_ERR_INVALID_ARG,
                        "header length 100 MB + 1", "limit", (const char *)NULL);
        tu_expect_error(ts_safetensors_parse(p, 5, "bad.safetensors", &d), TS_ERR_INVALID_ARG, "5-byte file",
                        "shorter than the 8-byte", (const char *)NULL);
        free(p);
    }
    expect_bad("empty header", "", 0, TS_ERR_INVALID_ARG, "not valid JSON", (const char *)NULL);
    expect_bad("invalid JSON", "{\"a\":{\"dtype\":\"F32\",", 0, TS_ERR_INVALID_ARG, "not valid JSON",
               (const char *)NULL);
    expect_bad("invalid JSON (missing colon)", "{\"a\" {}}", 0, TS_ERR_INVALID_ARG, "not valid JSON",
               (const char *)NULL);
    expect_bad("non-object header (array)", "[]", 0, TS_ERR_INVALID_ARG, "JSON array, not an object",
               (const char *)NULL);
    expect_bad("non-object header (string)", "\"x\"", 0, TS_ERR_INVALID_ARG, "JSON string, not an object",
               (const char *)NULL);
    expect_bad("non-object header (null)", "null", 0, TS_ERR_INVALID_ARG, "JSON null", (const char *)NULL);
    expect_bad("non-object header (number)", "5", 0, TS_ERR_INVALID_ARG, "JSON number", (const char *)NULL);
    expect_bad("text after the object", "{" T_A "} x", 8, TS_ERR_INVALID_ARG, "after the JSON object",
               (const char *)NULL);
    expect_bad("two objects", "{}{}", 0, TS_ERR_INVALID_ARG, "after the JSON object", (const char *)NULL);
    expect_bad("duplicate tensor", "{" T_A "," T_A "}", 8, TS_ERR_INVALID_ARG, "\"a\" appears twice",
               (const char *)NULL);
    expect_bad("duplicate __metadata__", "{\"__metadata__\":{},\"__metadata__\":{}}", 0, TS_ERR_INVALID_ARG,
               "\"__metadata__\" appears twice", (const char *)NULL);
    expect_bad("duplicate metadata key", "{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0, TS_ERR_INVALID_ARG,
               "\"k\" appears twice", (const char *)NULL);
    expect_bad("duplicate field", "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
               8, TS_ERR_INVALID_ARG, "\"a\"", "\"dtype\" appears twice", (const char *)NULL);
    expect_bad("unknown field", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", 8,
               TS_ERR_INVALID_ARG, "\"a\"", "unknown field \"x\"", (const char *)NULL);
    expect_bad("missing field", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, TS_ERR_INVALID_ARG,
               "\"a\" has no \"shape\"", (const char *)NULL);
    expect_bad("tensor not an object", "{\"a\":5}", 0, TS_ERR_INVALID_ARG, "\"a\" is a JSON number",
               (const char *)NULL);
    expect_bad("unknown dtype", "{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
               TS_ERR_INVALID_ARG, "\"a\"", "unknown dtype \"F33\"", "F32, F16, BF16, F64, I64, I32, U8",
               (const char *)NULL);
    expect_bad("lower-case dtype", "{\"a\":{\"dtype\":\"f32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
               TS_ERR_INVALID_ARG, "unknown dtype \"f32\"", (const char *)NULL);
    expect_bad("unsupported dtype", "{\"a\":{\"dtype\":\"C64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8,
               TS_ERR_UNSUPPORTED, "\"a\"", "C64 is not supported", "F32, F16, BF16, F64, I64, I32, U8",
               (const char *)NULL);
    expect_bad("dtype not a string", "{\"a\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
               TS_ERR_INVALID_ARG, "dtype is a JSON number", (const char *)NULL);
    expect_bad("shape/offset mismatch", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8,
               TS_ERR_INVALID_ARG, "\"a\"", "hold 8 bytes", "[3] need 12", (const char *)NULL);
    expect_bad("end before begin", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[8,4]}}", 8,
               TS_ERR_INVALID_ARG, "end before", (const char *)NULL);
    expect_bad("one offset", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4]}}", 4, TS_ERR_INVALID_ARG,
               "two non-negative integers", (const char *)NULL);
    expect_bad("three offsets", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4,4]}}", 4,
               TS_ERR_INVALID_ARG, "two non-negative integers", (const char *)NULL);
    expect_bad("shape not an array", "{\"a\":{\"dtype\":\"U8\",\"shape\":4,\"data_offsets\":[0,4]}}", 4,
               TS_ERR_INVALID_ARG, "shape is a JSON number", (const char *)NULL);
    expect_bad("shape entry not a number", "{\"a\":{\"dtype\":\"U8\",\"shape\":[\"4\"],\"data_offsets\":[0,4]}}", 4,
               TS_ERR_INVALID_ARG, "shape entry 0 is a JSON string", (const char *)NULL);
    expect_bad("9 dimensions", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
               TS_ERR_UNSUPPORTED, "at most 8", (const char *)NULL);
    expect_bad("element count overflow",
               "{\"a\":{\"dtype\":\"U8\",\"shape\":[9007199254740992,9007199254740992,0],\"data_offsets\":[0,0]}}", 0,
               TS_ERR_INVALID_ARG, "overflows", (const char *)NULL);
    expect_bad("overlapping offsets",
               "{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[4,12]}}",
               12, TS_ERR_INVALID_ARG, "overlapping", "\"b\"", "\"a\"", (const char *)NULL);
    expect_bad("same offsets twice",
               "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
               "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}",
               4, TS_ERR_INVALID_ARG, "overlapping", (const char *)NULL);
    expect_bad("hole between tensors",
               "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
               "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[8,12]}}",
               12, TS_ERR_INVALID_ARG, "hole", "\"b\" starts at data byte 8", "\"a\" ends at 4", (const char *)NULL);
    expect_bad("first tensor not at 0", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}", 8,
               TS_ERR_INVALID_ARG, "\"a\"", "not 0", (const char *)NULL);
    expect_bad("trailing bytes", "{" T_A "}", 9, TS_ERR_INVALID_ARG, "1 trailing bytes", (const char *)NULL);
    expect_bad("trailing bytes, no tensors", "{}", 3, TS_ERR_INVALID_ARG, "3 trailing bytes", (const char *)NULL);
    expect_bad("data too short", "{" T_A "}", 7, TS_ERR_INVALID_ARG, "\"a\" ends at data byte 8", "truncated",
               (const char *)NULL);
    expect_bad("negative dimension", "{\"a\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,0]}}", 0,
               TS_ERR_INVALID_ARG, "number -1 is not", "(in \"a\")", (const char *)NULL);
    expect_bad("negative zero", "{\"a\":{\"dtype\":\"U8\",\"shape\":[-0],\"data_offsets\":[0,0]}}", 0,
               TS_ERR_INVALID_ARG, "number -0 is not", (const char *)NULL);
    expect_bad("fractional dimension", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1.5],\"data_offsets\":[0,1]}}", 1,
               TS_ERR_INVALID_ARG, "number 1.5 is not", (const char *)NULL);
    expect_bad("integral float", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1.0]}}", 1,
               TS_ERR_INVALID_ARG, "number 1.0 is not", (const char *)NULL);
    expect_bad("exponent", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1e0],\"data_offsets\":[0,1]}}", 1, TS_ERR_INVALID_ARG,
               "number 1e0 is not", (const char *)NULL);
    expect_bad("leading zero", "{\"a\":{\"dtype\":\"U8\",\"shape\":[01],\"data_offsets\":[0,1]}}", 1,
               TS_ERR_INVALID_ARG, "number 01 is not", (const char *)NULL);
    expect_bad("integer above 2^53", "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[9007199254740993,0]}}",
               0, TS_ERR_INVALID_ARG, "number 9007199254740993 is not", (const char *)NULL);
    expect_bad("integer above 2^64",
               "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,184467440737095516160]}}",
               0, TS_ERR_INVALID_ARG, "is not a plain", (const char *)NULL);
    expect_bad("metadata value a number", "{\"__metadata__\":{\"format\":1}}", 0, TS_ERR_INVALID_ARG,
               "\"format\" has a JSON number value", "must be strings", (const char *)NULL);
    expect_bad("metadata value an object", "{\"__metadata__\":{\"format\":{}}}", 0, TS_ERR_INVALID_ARG,
               "must be strings", (const char *)NULL);
    expect_bad("metadata an array", "{\"__metadata__\":[\"pt\"]}", 0, TS_ERR_INVALID_ARG,
               "\"__metadata__\" is a JSON array", (const char *)NULL);
    expect_bad("metadata a string", "{\"__metadata__\":\"pt\"}", 0, TS_ERR_INVALID_ARG,
               "\"__metadata__\" is a JSON string", (const char *)NULL);
    expect_bad("invalid UTF-8", "{\"a\xff\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0,
               TS_ERR_INVALID_ARG, "header byte 3 is not valid UTF-8", (const char *)NULL);
    expect_bad("overlong UTF-8", "{\"a\xc0\x80\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0,
               TS_ERR_INVALID_ARG, "not valid UTF-8", (const char *)NULL);
    expect_bad("UTF-16 surrogate as UTF-8",
               "{\"a\xed\xa0\x80\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
               0, TS_ERR_INVALID_ARG, "not valid UTF-8", (const char *)NULL);
    expect_bad("lone surrogate escape", "{\"a\\ud800\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0,
               TS_ERR_INVALID_ARG, "not valid JSON", (const char *)NULL);
    expect_bad("\\u0000 in a name", "{\"a\\u0000b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0,
               TS_ERR_INVALID_ARG, "\\u0000", (const char *)NULL);
    expect_bad("raw control character in a name",
               "{\"a\x01"
               "b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
               0, TS_ERR_INVALID_ARG, "control character 0x01", (const char *)NULL);
    expect_bad("byte order mark", "\xef\xbb\xbf{}", 0, TS_ERR_INVALID_ARG, "byte 0xef outside a string",
               (const char *)NULL);
    expect_bad("control byte as white space", "{\x01}", 0, TS_ERR_INVALID_ARG, "byte 0x01 outside a string",
               (const char *)NULL);
    {
        /* NUL padding instead of spaces: cJSON alone would take NUL as white space */
        unsigned char p[12] = {4, 0, 0, 0, 0, 0, 0, 0, '{', '}', 0, 0};
        ts_dict d;
        tu_expect_error(ts_safetensors_parse(p, sizeof p, "bad.safetensors", &d), TS_ERR_INVALID_ARG, "NUL padding",
                        "byte 0x00 outside a string", (const char *)NULL);
    }
}

/* Unusual but valid headers (other writers) are accepted. */
static void test_good_headers(void)
{
    ts_dict d;
    expect_good("header padded with white space, not to a multiple of 8", " {" T_A "} \n\t\r ", 8, &d);
    tu_expect(d.count == 1 && d.items[0].nbytes == 8, "padded header: one tensor");
    ts_dict_free(&d);
    expect_good("__metadata__ null", "{\"__metadata__\":null," T_A "}", 8, &d);
    tu_expect(d.count == 1 && d.meta_count == 0, "__metadata__ null: no metadata");
    ts_dict_free(&d);
    expect_good("metadata last, keys in header order", "{" T_A ",\"__metadata__\":{\"z\":\"1\",\"a\":\"\"}}", 8, &d);
    tu_expect(d.meta_count == 2 && strcmp(d.meta[0].key, "z") == 0 && strcmp(d.meta[1].key, "a") == 0 &&
                  strcmp(d.meta[1].value, "") == 0,
              "metadata keeps header order");
    ts_dict_free(&d);
    /* header order b, a, e2, e1; data order a, then the empty ones at 4 (header order), then b */
    expect_good("tensors in another order than their data",
                "{\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]},"
                "\"a\":{\"dtype\":\"I32\",\"shape\":[],\"data_offsets\":[0,4]},"
                "\"e2\":{\"dtype\":\"F64\",\"shape\":[3,0],\"data_offsets\":[4,4]},"
                "\"e1\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
                "\"\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[6,6]}}",
                6, &d);
    static const char *const order[] = {"a", "e2", "e1", "b", ""};
    int ok = d.count == 5;
    for (size_t i = 0; ok && i < 5; i++) ok = strcmp(d.items[i].name, order[i]) == 0;
    tu_expect(ok, "tensors returned in data order, equal offsets in header order");
    const ts_named_tensor *b = ts_dict_find(&d, "b");
    tu_expect(b && b->nbytes == 2 && ((unsigned char *)b->data)[0] == 4 && ((unsigned char *)b->data)[1] == 5,
              "tensor b holds data bytes 4 and 5");
    ts_dict_free(&d);
    expect_good("integer 2^53 accepted",
                "{\"a\":{\"dtype\":\"U8\",\"shape\":[9007199254740992,0],\"data_offsets\":[0,0]}}",
                0, &d);
    tu_expect(d.count == 1 && d.items[0].shape[0] == INT64_C(9007199254740992), "2^53 dimension kept exactly");
    ts_dict_free(&d);
}

/* ---- files and the writer's checks ----------------------------------------- */

static void test_files(void)
{
    ts_dict d;
    char path[1024];
    snprintf(path, sizeof path, "%s/does-not-exist.safetensors", tmpdir);
    tu_expect_error(ts_safetensors_read(path, &d), TS_ERR_IO, "read a missing file", path, (const char *)NULL);
    tu_expect_error(ts_safetensors_read(tmpdir, &d), TS_ERR_IO, "read a directory", tmpdir, "not a regular file",
                    (const char *)NULL);

    ts_dict w;
    ts_dict_init(&w);
    float x[3] = {1, 2, 3};
    tu_expect_ok(ts_dict_add(&w, "w", TS_F32, 1, (int64_t[]){3}, x), "add w");

    /* a missing directory: the message names the path, nothing is created */
    snprintf(path, sizeof path, "%s/no/such/dir/model.safetensors", tmpdir);
    tu_expect_error(ts_safetensors_write(path, &w), TS_ERR_IO, "write into a missing directory", path,
                    "No such file or directory", (const char *)NULL);
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    tu_expect(!file_exists(path) && !file_exists(tmp), "missing directory: no file written");

    /* the rename fails (the target is a directory): the temporary file is removed */
    snprintf(path, sizeof path, "%s/adir", tmpdir);
    mkdir(path, 0700);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    tu_expect_error(ts_safetensors_write(path, &w), TS_ERR_IO, "write over a directory", path, "renaming",
                    (const char *)NULL);
    tu_expect(!file_exists(tmp), "failed rename: temporary file removed");
    rmdir(path);

    /* overwriting replaces the file */
    snprintf(path, sizeof path, "%s/over.safetensors", tmpdir);
    FILE *f = fopen(path, "wb");
    if (f) {
        fputs("old contents, longer than the new file will be........................................", f);
        fclose(f);
    }
    if (tu_expect_ok(ts_safetensors_write(path, &w), "overwrite an existing file") &&
        tu_expect_ok(ts_safetensors_read(path, &d), "read the overwritten file")) {
        dicts_equal(&w, &d, "overwrite");
        ts_dict_free(&d);
    }
    unlink(path);

    /* what the writer refuses */
    tu_expect_ok(ts_dict_add(&w, "__metadata__", TS_U8, 1, (int64_t[]){1}, "x"), "add __metadata__");
    tu_expect_error(ts_safetensors_write(path, &w), TS_ERR_INVALID_ARG, "tensor named __metadata__", path,
                    "__metadata__", (const char *)NULL);
    tu_expect(!file_exists(path), "refused write leaves no file");
    ts_dict_free(&w);

    ts_dict_init(&w);
    tu_expect_ok(ts_dict_add(&w, "bad\xff", TS_U8, 1, (int64_t[]){1}, "x"), "add bad UTF-8 name");
    unsigned char *buf;
    size_t len;
    tu_expect_error(ts_safetensors_serialize(&w, &buf, &len), TS_ERR_INVALID_ARG, "invalid UTF-8 name",
                    "not valid UTF-8", (const char *)NULL);
    ts_dict_free(&w);

    ts_dict_init(&w);
    tu_expect_ok(ts_dict_add(&w, "a", TS_U8, 1, (int64_t[]){1}, "x"), "add a");
    tu_expect_ok(ts_dict_set_meta(&w, "k", "bad\xc3"), "set bad metadata");
    tu_expect_error(ts_safetensors_serialize(&w, &buf, &len), TS_ERR_INVALID_ARG, "invalid UTF-8 metadata",
                    "metadata value of", "not valid UTF-8", (const char *)NULL);
    ts_dict_free(&w);

    /* a dictionary whose public fields were filled inconsistently */
    ts_dict_init(&w);
    tu_expect_ok(ts_dict_add(&w, "a", TS_F32, 1, (int64_t[]){2}, x), "add a");
    tu_expect_ok(ts_dict_add(&w, "b", TS_F32, 1, (int64_t[]){2}, x), "add b");
    w.items[1].nbytes = 4;
    tu_expect_error(ts_safetensors_serialize(&w, &buf, &len), TS_ERR_INVALID_ARG, "byte count mismatch", "\"b\"",
                    "holds 4 bytes", (const char *)NULL);
    w.items[1].nbytes = 8;
    w.items[1].name[0] = 'a';
    tu_expect_error(ts_safetensors_serialize(&w, &buf, &len), TS_ERR_INVALID_ARG, "duplicate names",
                    "\"a\" appears twice", (const char *)NULL);
    ts_dict_free(&w);
}

int main(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/ts_safetensors_XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmpdir)) {
        printf("FAIL cannot create a temporary directory %s: %s\n", tmpdir, strerror(errno));
        return 1;
    }
    test_all_dtypes();
    test_other_fixtures();
    test_round_trip();
    test_random_round_trip();
    test_truncations();
    test_bad_headers();
    test_good_headers();
    test_files();
    rmdir(tmpdir);
    return tu_finish("test_safetensors");
}
