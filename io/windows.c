/* Window lists: generators (grid, random, CSV, vector), filters, the CSV
 * writer and the index cache. The spatial split is in io/split.c. */
#include <cpl_error.h>
#include <errno.h>
#include <gdal.h>
#include <limits.h>
#include <math.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "io/windows.h"

/* ---- split tags ------------------------------------------------------------- */
static const char *const split_names[TS_SPLIT_COUNT] = {"none", "train", "val", "test", "buffer"};

const char *ts_split_name(ts_split_tag t)
{
    if ((int)t < 0 || t >= TS_SPLIT_COUNT) return "unknown";
    return split_names[t];
}

int ts_split_parse(const char *s, ts_split_tag *out)
{
    if (!s[0]) {
        *out = TS_SPLIT_NONE;
        return 1;
    }
    for (int i = 0; i < TS_SPLIT_COUNT; i++)
        if (strcmp(s, split_names[i]) == 0) {
            *out = (ts_split_tag)i;
            return 1;
        }
    return 0;
}

/* ---- the list ----------------------------------------------------------------- */
void ts_window_list_init(ts_window_list *l) { memset(l, 0, sizeof *l); }

void ts_window_list_free(ts_window_list *l)
{
    free(l->w);
    free(l->id);
    free(l->split);
    free(l->score);
    memset(l, 0, sizeof *l);
}

void ts_window_list_clear(ts_window_list *l)
{
    l->count = 0;
    l->has_split = l->has_score = 0;
}

ts_status ts_window_list_reserve(ts_window_list *l, size_t cap)
{
    if (cap <= l->cap) return TS_OK;
    if (cap > SIZE_MAX / sizeof(ts_window))
        return ts_error(TS_ERR_NOMEM, "window list: %zu windows do not fit in memory", cap);
    /* Each array is replaced only when its realloc succeeds, so a failure
     * leaves every array valid for the old capacity. */
    ts_window *w = realloc(l->w, cap * sizeof *w);
    if (w) l->w = w;
    int64_t *id = w ? realloc(l->id, cap * sizeof *id) : NULL;
    if (id) l->id = id;
    uint8_t *sp = id ? realloc(l->split, cap * sizeof *sp) : NULL;
    if (sp) l->split = sp;
    double *sc = sp ? realloc(l->score, cap * sizeof *sc) : NULL;
    if (sc) l->score = sc;
    if (!sc) return ts_error(TS_ERR_NOMEM, "window list: out of memory for %zu windows", cap);
    l->cap = cap;
    return TS_OK;
}

static ts_status list_grow(ts_window_list *l, size_t extra)
{
    if (l->count + extra <= l->cap) return TS_OK;
    size_t want = l->cap ? l->cap : 64;
    while (want < l->count + extra) {
        if (want > SIZE_MAX / 2) return ts_error(TS_ERR_NOMEM, "window list: too many windows");
        want *= 2;
    }
    return ts_window_list_reserve(l, want);
}

ts_status ts_window_list_push(ts_window_list *l, ts_window w, int64_t id)
{
    ts_status st = list_grow(l, 1);
    if (st) return st;
    l->w[l->count] = w;
    l->id[l->count] = id;
    l->split[l->count] = TS_SPLIT_NONE;
    l->score[l->count] = 0.0;
    l->count++;
    return TS_OK;
}

ts_status ts_window_list_copy(ts_window_list *dst, const ts_window_list *src)
{
    ts_window_list t;
    ts_window_list_init(&t);
    ts_status st = ts_window_list_reserve(&t, src->count ? src->count : 1);
    if (st) return st;
    if (src->count) {
        memcpy(t.w, src->w, src->count * sizeof *t.w);
        memcpy(t.id, src->id, src->count * sizeof *t.id);
        memcpy(t.split, src->split, src->count * sizeof *t.split);
        memcpy(t.score, src->score, src->count * sizeof *t.score);
    }
    t.count = src->count;
    t.has_split = src->has_split;
    t.has_score = src->has_score;
    ts_window_list_free(dst);
    *dst = t;
    return TS_OK;
}

/* ---- grid ------------------------------------------------------------------------ */
/* One axis: the window size along it and the number of positions. */
static ts_status axis_plan(const char *op, const char *axis, int64_t len, int tile, int stride, int allow_small,
                           int *size, int64_t *n)
{
    if (len <= 0) return ts_error(TS_ERR_INVALID_ARG, "%s: raster %s %lld must be positive", op, axis, (long long)len);
    if (tile <= 0) return ts_error(TS_ERR_INVALID_ARG, "%s: tile %s %d must be positive", op, axis, tile);
    if (stride < 1 || stride > tile)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: stride %d along %s must be in [1, tile %d] (stride = tile - overlap; overlap in [0, "
                        "tile - 1])",
                        op, stride, axis, tile);
    if (len < tile) {
        if (!allow_small)
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: the raster %s %lld is smaller than the tile %d; use a tile of at most %lld, or allow "
                            "small rasters (one window spanning the raster, padded by the reader)",
                            op, axis, (long long)len, tile, (long long)len);
        *size = (int)len;
        *n = 1;
        return TS_OK;
    }
    *size = tile;
    *n = (len - tile + stride - 1) / stride + 1;
    return TS_OK;
}

/* Offset of position i of n along an axis: i * stride, the last one shifted
 * to the edge. */
static int64_t axis_offset(int64_t i, int64_t n, int64_t len, int size, int stride)
{
    return i == n - 1 ? len - size : i * stride;
}

ts_status ts_windows_grid(ts_window_list *out, int64_t raster_w, int64_t raster_h, int tile_w, int tile_h,
                          int stride_x, int stride_y, int allow_small)
{
    int sw = 0, sh = 0;
    int64_t nx = 0, ny = 0;
    ts_status st = axis_plan("grid windows", "width", raster_w, tile_w, stride_x, allow_small, &sw, &nx);
    if (!st) st = axis_plan("grid windows", "height", raster_h, tile_h, stride_y, allow_small, &sh, &ny);
    if (st) return st;
    if (nx > (int64_t)(SIZE_MAX / 64) / ny)
        return ts_error(TS_ERR_NOMEM, "grid windows: %lld x %lld windows are too many; use a larger stride",
                        (long long)nx, (long long)ny);
    if ((st = list_grow(out, (size_t)(nx * ny)))) return st;
    for (int64_t y = 0; y < ny; y++)
        for (int64_t x = 0; x < nx; x++) {
            ts_window w = {axis_offset(x, nx, raster_w, sw, stride_x), axis_offset(y, ny, raster_h, sh, stride_y),
                           sw, sh};
            (void)ts_window_list_push(out, w, y * nx + x); /* capacity reserved above */
        }
    return TS_OK;
}

/* ---- random -------------------------------------------------------------------------- */
static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [0, range] without modulo bias. */
static uint64_t uniform_upto(uint64_t *state, uint64_t range)
{
    if (range == UINT64_MAX) return splitmix64(state);
    uint64_t n = range + 1, limit = UINT64_MAX - UINT64_MAX % n;
    for (;;) {
        uint64_t x = splitmix64(state);
        if (x < limit) return x % n;
    }
}

ts_status ts_windows_random(ts_window_list *out, int64_t raster_w, int64_t raster_h, int tile_w, int tile_h,
                            size_t count, uint64_t seed, int allow_small)
{
    int sw = 0, sh = 0;
    int64_t nx = 0, ny = 0;
    ts_status st = axis_plan("random windows", "width", raster_w, tile_w, tile_w, allow_small, &sw, &nx);
    if (!st) st = axis_plan("random windows", "height", raster_h, tile_h, tile_h, allow_small, &sh, &ny);
    if (st) return st;
    if ((st = list_grow(out, count))) return st;
    uint64_t state = seed;
    for (size_t i = 0; i < count; i++) {
        ts_window w;
        w.col_off = (int64_t)uniform_upto(&state, (uint64_t)(raster_w - sw));
        w.row_off = (int64_t)uniform_upto(&state, (uint64_t)(raster_h - sh));
        w.width = sw;
        w.height = sh;
        (void)ts_window_list_push(out, w, (int64_t)i);
    }
    return TS_OK;
}

/* ---- CSV ------------------------------------------------------------------------------ */
/* Splits a line in place into fields: commas separate, a field may be
 * double-quoted ("" inside is one quote), spaces around fields are trimmed.
 * Returns the field count, or -1 for an unterminated quote. */
static int csv_split(char *line, char **fields, int max_fields)
{
    int n = 0;
    char *p = line;
    for (;;) {
        while (*p == ' ' || *p == '\t') p++;
        char *start = p, *end;
        if (*p == '"') {
            char *dst = ++p;
            start = dst;
            for (;;) {
                if (!*p) return -1;
                if (*p == '"') {
                    if (p[1] == '"') {
                        *dst++ = '"';
                        p += 2;
                        continue;
                    }
                    p++;
                    break;
                }
                *dst++ = *p++;
            }
            end = dst;
            while (*p && *p != ',') p++; /* anything after the closing quote is ignored */
        } else {
            while (*p && *p != ',') p++;
            end = p;
            while (end > start && (end[-1] == ' ' || end[-1] == '\t')) end--;
        }
        char sep = *p;
        *end = '\0';
        if (n < max_fields) fields[n] = start;
        n++;
        if (sep != ',') break;
        p++;
    }
    return n;
}

static int parse_i64(const char *s, int64_t *v)
{
    if (!*s) return 0;
    errno = 0;
    char *end;
    long long x = strtoll(s, &end, 10);
    if (errno || *end) return 0;
    *v = x;
    return 1;
}

static void strip_eol(char *s, size_t *len)
{
    while (*len && (s[*len - 1] == '\n' || s[*len - 1] == '\r')) s[--*len] = '\0';
}

static int blank(const char *s)
{
    for (; *s; s++)
        if (*s != ' ' && *s != '\t') return 0;
    return 1;
}

#define CSV_MAX_FIELDS 256

enum { C_COL, C_ROW, C_W, C_H, C_SPLIT, C_SCORE, C_N };

ts_status ts_windows_read_csv(ts_window_list *out, const char *path, const ts_csv_columns *cols, int64_t raster_w,
                              int64_t raster_h, int default_w, int default_h)
{
    static const char *const defaults[C_N] = {"col_off", "row_off", "width", "height", "split", "score"};
    const char *names[C_N];
    for (int c = 0; c < C_N; c++) names[c] = defaults[c];
    if (cols) {
        const char *given[C_N] = {cols->col_off, cols->row_off, cols->width, cols->height, cols->split, cols->score};
        for (int c = 0; c < C_N; c++)
            if (given[c]) names[c] = given[c];
    }
    if (raster_w <= 0 || raster_h <= 0)
        return ts_error(TS_ERR_INVALID_ARG, "window CSV %s: raster size %lldx%lld must be positive", path,
                        (long long)raster_w, (long long)raster_h);
    FILE *f = fopen(path, "r");
    if (!f) return ts_error(TS_ERR_IO, "window CSV %s: cannot open: %s", path, strerror(errno));

    const size_t count0 = out->count;
    const int split0 = out->has_split, score0 = out->has_score;
    ts_status st = TS_OK;
    char *line = NULL;
    size_t line_cap = 0;
    char *fields[CSV_MAX_FIELDS];
    int idx[C_N];
    for (int c = 0; c < C_N; c++) idx[c] = -1;
    long lineno = 0;
    int have_header = 0;
    size_t outside = 0;
    char outside_msg[400] = "";
    size_t outside_len = 0;
    int64_t row_number = 0;

    ssize_t got;
    while ((got = getline(&line, &line_cap, f)) != -1) {
        lineno++;
        size_t len = (size_t)got;
        if (strlen(line) != len) {
            st = ts_error(TS_ERR_INVALID_ARG, "window CSV %s, line %ld: contains a NUL byte; is this a text CSV?",
                          path, lineno);
            goto done;
        }
        strip_eol(line, &len);
        char *text = line;
        if (lineno == 1 && (unsigned char)text[0] == 0xEF && (unsigned char)text[1] == 0xBB &&
            (unsigned char)text[2] == 0xBF)
            text += 3; /* UTF-8 byte order mark */
        if (blank(text)) continue;
        int nf = csv_split(text, fields, CSV_MAX_FIELDS);
        if (nf < 0) {
            st = ts_error(TS_ERR_INVALID_ARG, "window CSV %s, line %ld: unterminated quoted field", path, lineno);
            goto done;
        }
        if (nf > CSV_MAX_FIELDS) nf = CSV_MAX_FIELDS;
        if (!have_header) {
            have_header = 1;
            for (int k = 0; k < nf; k++)
                for (int c = 0; c < C_N; c++)
                    if (idx[c] < 0 && strcmp(fields[k], names[c]) == 0) idx[c] = k;
            for (int c = C_COL; c <= C_ROW; c++)
                if (idx[c] < 0) {
                    st = ts_error(TS_ERR_INVALID_ARG,
                                  "window CSV %s, line %ld (header): no column \"%s\"; the header must name the "
                                  "%s column (or choose its name with the column options)",
                                  path, lineno, names[c], defaults[c]);
                    goto done;
                }
            if ((idx[C_W] < 0 && default_w <= 0) || (idx[C_H] < 0 && default_h <= 0)) {
                const char *which = idx[C_W] < 0 && default_w <= 0 ? names[C_W] : names[C_H];
                st = ts_error(TS_ERR_INVALID_ARG,
                              "window CSV %s, line %ld (header): no column \"%s\" and no default tile size; add "
                              "the column or give a tile size",
                              path, lineno, which);
                goto done;
            }
            if (idx[C_SPLIT] >= 0) out->has_split = 1;
            if (idx[C_SCORE] >= 0) out->has_score = 1;
            continue;
        }
        /* A data row. */
        int64_t v[4] = {0, 0, default_w, default_h};
        for (int c = C_COL; c <= C_H; c++) {
            if (idx[c] < 0) continue;
            if (idx[c] >= nf) {
                st = ts_error(TS_ERR_INVALID_ARG, "window CSV %s, line %ld, column \"%s\": missing (the row has %d "
                              "fields, the header names it as field %d)",
                              path, lineno, names[c], nf, idx[c] + 1);
                goto done;
            }
            if (!parse_i64(fields[idx[c]], &v[c])) {
                st = ts_error(TS_ERR_INVALID_ARG, "window CSV %s, line %ld, column \"%s\": \"%s\" is not an integer",
                              path, lineno, names[c], fields[idx[c]]);
                goto done;
            }
            if (c <= C_ROW ? v[c] < 0 : (v[c] <= 0 || v[c] > INT_MAX)) {
                st = ts_error(TS_ERR_INVALID_ARG, "window CSV %s, line %ld, column \"%s\": %lld is %s", path, lineno,
                              names[c], (long long)v[c], c <= C_ROW ? "negative" : "not a valid window size");
                goto done;
            }
        }
        ts_split_tag tag = TS_SPLIT_NONE;
        if (idx[C_SPLIT] >= 0 && idx[C_SPLIT] < nf && !ts_split_parse(fields[idx[C_SPLIT]], &tag)) {
            st = ts_error(TS_ERR_INVALID_ARG,
                          "window CSV %s, line %ld, column \"%s\": \"%s\" is not a split (train, val, test, buffer, "
                          "none or empty)",
                          path, lineno, names[C_SPLIT], fields[idx[C_SPLIT]]);
            goto done;
        }
        double score = 0.0;
        if (idx[C_SCORE] >= 0 && idx[C_SCORE] < nf && fields[idx[C_SCORE]][0]) {
            char *end;
            score = strtod(fields[idx[C_SCORE]], &end);
            if (*end) {
                st = ts_error(TS_ERR_INVALID_ARG, "window CSV %s, line %ld, column \"%s\": \"%s\" is not a number",
                              path, lineno, names[C_SCORE], fields[idx[C_SCORE]]);
                goto done;
            }
        }
        if (v[C_COL] > raster_w - v[C_W] || v[C_ROW] > raster_h - v[C_H]) {
            if (outside < 3 && outside_len < sizeof outside_msg - 100)
                outside_len += (size_t)snprintf(outside_msg + outside_len, sizeof outside_msg - outside_len,
                                                "%sline %ld (col_off %lld, row_off %lld, %lldx%lld)",
                                                outside ? "; " : "", lineno, (long long)v[C_COL], (long long)v[C_ROW],
                                                (long long)v[C_W], (long long)v[C_H]);
            outside++;
            continue;
        }
        ts_window w = {v[C_COL], v[C_ROW], (int)v[C_W], (int)v[C_H]};
        if ((st = ts_window_list_push(out, w, row_number++))) goto done;
        out->split[out->count - 1] = (uint8_t)tag;
        out->score[out->count - 1] = score;
    }
    if (ferror(f)) {
        st = ts_error(TS_ERR_IO, "window CSV %s: read error after line %ld", path, lineno);
        goto done;
    }
    if (!have_header) {
        st = ts_error(TS_ERR_INVALID_ARG, "window CSV %s: empty file; a header line (%s,%s,...) is required", path,
                      names[C_COL], names[C_ROW]);
        goto done;
    }
    if (outside) {
        st = ts_error(TS_ERR_INVALID_ARG,
                      "window CSV %s: %zu window%s outside the %lldx%lld raster: %s%s; is the CSV for another image, "
                      "or are %s/%s swapped?",
                      path, outside, outside == 1 ? " lies" : "s lie", (long long)raster_w, (long long)raster_h,
                      outside_msg, outside > 3 ? "; ..." : "", names[C_COL], names[C_ROW]);
        goto done;
    }
done:
    free(line);
    fclose(f);
    if (st) {
        out->count = count0;
        out->has_split = split0;
        out->has_score = score0;
    }
    return st;
}

ts_status ts_windows_write_csv(const ts_window_list *l, const char *path)
{
    size_t n = strlen(path);
    char *tmp = malloc(n + 5);
    if (!tmp) return ts_error(TS_ERR_NOMEM, "window CSV %s: out of memory", path);
    memcpy(tmp, path, n);
    memcpy(tmp + n, ".tmp", 5);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        ts_status st = ts_error(TS_ERR_IO, "window CSV %s: cannot create %s: %s", path, tmp, strerror(errno));
        free(tmp);
        return st;
    }
    fprintf(f, "col_off,row_off,width,height%s%s\n", l->has_split ? ",split" : "", l->has_score ? ",score" : "");
    for (size_t i = 0; i < l->count; i++) {
        const ts_window *w = &l->w[i];
        fprintf(f, "%lld,%lld,%d,%d", (long long)w->col_off, (long long)w->row_off, w->width, w->height);
        if (l->has_split) fprintf(f, ",%s", ts_split_name((ts_split_tag)l->split[i]));
        if (l->has_score) fprintf(f, ",%.17g", l->score[i]);
        fputc('\n', f);
    }
    int bad = ferror(f);
    if (fclose(f) != 0) bad = 1;
    if (bad || rename(tmp, path) != 0) {
        ts_status st = ts_error(TS_ERR_IO, "window CSV %s: writing failed (%s); is the disk full or the folder "
                                "read-only?",
                                path, strerror(errno));
        remove(tmp);
        free(tmp);
        return st;
    }
    free(tmp);
    return TS_OK;
}

/* ---- the raster grid ------------------------------------------------------------------- */
ts_status ts_windows_read_grid(const char *path, ts_grid *grid)
{
    ts_gdal_init();
    memset(grid, 0, sizeof *grid);
    CPLErrorReset();
    GDALDatasetH ds = GDALOpenEx(path, GDAL_OF_RASTER | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!ds) return ts_gdal_error(TS_ERR_IO, "raster %s: cannot open", path);
    grid->width = GDALGetRasterXSize(ds);
    grid->height = GDALGetRasterYSize(ds);
    if (GDALGetGeoTransform(ds, grid->gt) != CE_None) {
        const double identity[6] = {0, 1, 0, 0, 0, 1};
        memcpy(grid->gt, identity, sizeof identity);
    }
    const char *wkt = GDALGetProjectionRef(ds);
    ts_status st = TS_OK;
    if (wkt && *wkt && !(grid->crs_wkt = strdup(wkt))) st = ts_error(TS_ERR_NOMEM, "raster %s: out of memory", path);
    GDALClose(ds);
    if (!st && (grid->width <= 0 || grid->height <= 0))
        st = ts_error(TS_ERR_INVALID_ARG, "raster %s: size %lldx%lld has no pixels", path, (long long)grid->width,
                      (long long)grid->height);
    if (st) ts_grid_free(grid);
    return st;
}

/* ---- vector features -------------------------------------------------------------------- */
/* An open-addressing set of uint64 keys (tile indices), for deduplication. */
typedef struct u64set {
    uint64_t *slot; /* key + 1; 0 = empty */
    size_t cap, n;
} u64set;

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Returns 1 if inserted, 0 if present, -1 out of memory. */
static int u64set_insert(u64set *s, uint64_t key)
{
    if (2 * (s->n + 1) > s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 1024;
        uint64_t *slot = calloc(cap, sizeof *slot);
        if (!slot) return -1;
        for (size_t i = 0; i < s->cap; i++)
            if (s->slot[i]) {
                size_t j = mix64(s->slot[i]) & (cap - 1);
                while (slot[j]) j = (j + 1) & (cap - 1);
                slot[j] = s->slot[i];
            }
        free(s->slot);
        s->slot = slot;
        s->cap = cap;
    }
    uint64_t k = key + 1;
    size_t j = mix64(k) & (s->cap - 1);
    while (s->slot[j]) {
        if (s->slot[j] == k) return 0;
        j = (j + 1) & (s->cap - 1);
    }
    s->slot[j] = k;
    s->n++;
    return 1;
}

ts_status ts_windows_from_vector(ts_window_list *out, const char *path, const char *layer, const ts_grid *grid,
                                 int tile_w, int tile_h, int allow_small, ts_vector_stats *stats)
{
    static const char *op = "vector windows";
    ts_vector_stats s = {0};
    if (stats) *stats = s;
    int sw = 0, sh = 0;
    int64_t nx = 0, ny = 0;
    ts_status st = axis_plan(op, "width", grid->width, tile_w, tile_w, allow_small, &sw, &nx);
    if (!st) st = axis_plan(op, "height", grid->height, tile_h, tile_h, allow_small, &sh, &ny);
    if (st) return st;
    if (!grid->crs_wkt || !*grid->crs_wkt)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s from %s: the image has no CRS, so feature coordinates cannot be placed on it; assign one "
                        "(gdal_edit.py -a_srs)",
                        op, path);
    double gt[6], inv[6];
    memcpy(gt, grid->gt, sizeof gt);
    if (!GDALInvGeoTransform(gt, inv))
        return ts_error(TS_ERR_INVALID_ARG, "%s from %s: the image geotransform (%g, %g, %g, %g, %g, %g) cannot be "
                        "inverted",
                        op, path, gt[0], gt[1], gt[2], gt[3], gt[4], gt[5]);

    ts_gdal_init();
    const size_t count0 = out->count;
    GDALDatasetH ds = NULL;
    OGRSpatialReferenceH src = NULL, dst = NULL;
    OGRCoordinateTransformationH ct = NULL;
    u64set seen = {0};

    CPLErrorReset();
    ds = GDALOpenEx(path, GDAL_OF_VECTOR | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!ds) {
        st = ts_gdal_error(TS_ERR_IO, "%s: cannot open %s as a vector source", op, path);
        goto done;
    }
    OGRLayerH lyr = NULL;
    int nlayers = GDALDatasetGetLayerCount(ds);
    if (layer) {
        lyr = GDALDatasetGetLayerByName(ds, layer);
        if (!lyr) {
            char names[300] = "";
            size_t len = 0;
            for (int i = 0; i < nlayers && len < sizeof names - 60; i++) {
                OGRLayerH li = GDALDatasetGetLayer(ds, i);
                if (li) len += (size_t)snprintf(names + len, sizeof names - len, "%s\"%s\"", i ? ", " : "",
                                                OGR_L_GetName(li));
            }
            st = ts_error(TS_ERR_INVALID_ARG, "%s: %s has no layer \"%s\"; its layers: %s", op, path, layer,
                          nlayers ? names : "(none)");
            goto done;
        }
    } else {
        if (nlayers < 1) {
            st = ts_error(TS_ERR_INVALID_ARG, "%s: %s has no vector layer", op, path);
            goto done;
        }
        lyr = GDALDatasetGetLayer(ds, 0);
        if (!lyr) {
            st = ts_gdal_error(TS_ERR_IO, "%s: %s: cannot read its first layer", op, path);
            goto done;
        }
    }
    OGRSpatialReferenceH lsrs = OGR_L_GetSpatialRef(lyr);
    /* GeoPackage reports a layer written without a CRS as "Undefined
     * geographic SRS" (srs_id 0) or "Undefined cartesian SRS" (-1): no CRS. */
    const char *lname = lsrs ? OSRGetName(lsrs) : NULL;
    if (!lsrs || (lname && strncmp(lname, "Undefined", 9) == 0)) {
        st = ts_error(TS_ERR_INVALID_ARG,
                      "%s: layer \"%s\" of %s has no CRS, so its coordinates cannot be placed on the image; assign "
                      "one (ogr2ogr -a_srs) or use a format that stores it",
                      op, OGR_L_GetName(lyr), path);
        goto done;
    }
    if (!(src = OSRClone(lsrs)) || !(dst = OSRNewSpatialReference(NULL))) {
        st = ts_error(TS_ERR_NOMEM, "%s: out of memory", op);
        goto done;
    }
    if (OSRSetFromUserInput(dst, grid->crs_wkt) != OGRERR_NONE) {
        st = ts_gdal_error(TS_ERR_INVALID_ARG, "%s from %s: the image CRS cannot be parsed", op, path);
        goto done;
    }
    OSRSetAxisMappingStrategy(src, OAMS_TRADITIONAL_GIS_ORDER);
    OSRSetAxisMappingStrategy(dst, OAMS_TRADITIONAL_GIS_ORDER);
    if (!(ct = OCTNewCoordinateTransformation(src, dst))) {
        st = ts_gdal_error(TS_ERR_BACKEND, "%s: no transformation from the CRS of layer \"%s\" (%s) to the image's",
                           op, OGR_L_GetName(lyr), path);
        goto done;
    }

    const uint64_t ntx = (uint64_t)((grid->width + sw - 1) / sw);
    OGR_L_ResetReading(lyr);
    for (;;) {
        CPLErrorReset();
        OGRFeatureH feat = OGR_L_GetNextFeature(lyr);
        if (!feat) {
            if (CPLGetLastErrorType() == CE_Failure) {
                st = ts_gdal_error(TS_ERR_IO, "%s: reading features of layer \"%s\" of %s failed after %zu features",
                                   op, OGR_L_GetName(lyr), path, s.features);
                goto done;
            }
            break;
        }
        s.features++;
        OGRGeometryH g = OGR_F_GetGeometryRef(feat);
        if (!g || OGR_G_IsEmpty(g)) {
            s.empty++;
            OGR_F_Destroy(feat);
            continue;
        }
        OGREnvelope env;
        OGR_G_GetEnvelope(g, &env);
        double x = 0.5 * (env.MinX + env.MaxX), y = 0.5 * (env.MinY + env.MaxY);
        int64_t fid = (int64_t)OGR_F_GetFID(feat);
        OGR_F_Destroy(feat);
        if (!OCTTransform(ct, 1, &x, &y, NULL) || !isfinite(x) || !isfinite(y)) {
            s.outside++;
            continue;
        }
        double px = inv[0] + x * inv[1] + y * inv[2], py = inv[3] + x * inv[4] + y * inv[5];
        if (!(px >= 0 && px < (double)grid->width && py >= 0 && py < (double)grid->height)) {
            s.outside++;
            continue;
        }
        int64_t tx = (int64_t)floor(px) / sw, ty = (int64_t)floor(py) / sh;
        int ins = u64set_insert(&seen, (uint64_t)ty * ntx + (uint64_t)tx);
        if (ins < 0) {
            st = ts_error(TS_ERR_NOMEM, "%s: out of memory", op);
            goto done;
        }
        if (ins == 0) {
            s.duplicates++;
            continue;
        }
        ts_window w = {tx * sw, ty * sh, sw, sh};
        if (w.col_off > grid->width - sw) w.col_off = grid->width - sw;
        if (w.row_off > grid->height - sh) w.row_off = grid->height - sh;
        if ((st = ts_window_list_push(out, w, fid))) goto done;
        s.windows++;
    }
done:
    free(seen.slot);
    if (ct) OCTDestroyCoordinateTransformation(ct);
    if (src) OSRDestroySpatialReference(src);
    if (dst) OSRDestroySpatialReference(dst);
    if (ds) GDALClose(ds);
    if (st)
        out->count = count0;
    else if (stats)
        *stats = s;
    return st;
}

/* ---- filters ------------------------------------------------------------------------------ */
ts_status ts_windows_filter_ctx(ts_window_list *l, ts_window_filter_fn fn, void *const *ctxs, int n_ctx,
                                size_t *dropped)
{
    if (dropped) *dropped = 0;
    if (!fn || !ctxs || n_ctx < 1)
        return ts_error(TS_ERR_INVALID_ARG, "window filter: needs a function and at least one context (got %d)",
                        n_ctx);
    const size_t n = l->count;
    if (n == 0) return TS_OK;
    uint8_t *keep = malloc(n);
    if (!keep) return ts_error(TS_ERR_NOMEM, "window filter: out of memory for %zu windows", n);

    /* The failure with the lowest window index wins: a window is skipped only
     * when a window before it already failed, so the lowest failing index is
     * always evaluated, whatever the thread count and schedule. */
    size_t first_err = SIZE_MAX;
    ts_status err_status = TS_OK;
    char err_msg[1024] = "";
    const ptrdiff_t nn = (ptrdiff_t)n;
#pragma omp parallel for schedule(dynamic, 4) num_threads(n_ctx) if (n_ctx > 1)
    for (ptrdiff_t i = 0; i < nn; i++) {
        size_t cur;
#pragma omp atomic read
        cur = first_err;
        keep[i] = 1;
        if ((size_t)i > cur) continue;
        int k = 1;
        int t = omp_get_thread_num();
        ts_status s = fn(ctxs[t < n_ctx ? t : 0], &l->w[i], &k);
        keep[i] = (uint8_t)(k != 0);
        if (s != TS_OK) {
#pragma omp critical(ts_window_filter_error)
            {
                if ((size_t)i < first_err) {
                    err_status = s;
                    snprintf(err_msg, sizeof err_msg, "%s", ts_last_error());
#pragma omp atomic write
                    first_err = (size_t)i;
                }
            }
        }
    }
    if (first_err != SIZE_MAX) {
        const ts_window *w = &l->w[first_err];
        free(keep);
        return ts_error(err_status, "window filter, window %zu (col_off %lld, row_off %lld, %dx%d): %s", first_err,
                        (long long)w->col_off, (long long)w->row_off, w->width, w->height, err_msg);
    }
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        if (!keep[i]) continue;
        l->w[j] = l->w[i];
        l->id[j] = l->id[i];
        l->split[j] = l->split[i];
        l->score[j] = l->score[i];
        j++;
    }
    free(keep);
    if (dropped) *dropped = n - j;
    l->count = j;
    return TS_OK;
}

ts_status ts_windows_filter(ts_window_list *l, ts_window_filter_fn fn, void *ctx, int threads, size_t *dropped)
{
    if (threads <= 0) threads = omp_get_max_threads();
    if (threads < 1) threads = 1;
    void **ctxs = malloc((size_t)threads * sizeof *ctxs);
    if (!ctxs) return ts_error(TS_ERR_NOMEM, "window filter: out of memory");
    for (int t = 0; t < threads; t++) ctxs[t] = ctx;
    ts_status st = ts_windows_filter_ctx(l, fn, ctxs, threads, dropped);
    free(ctxs);
    return st;
}

double ts_mask_nodata_fraction(const uint8_t *valid, size_t npix)
{
    if (!valid || npix == 0) return 0.0;
    size_t bad = 0;
    for (size_t i = 0; i < npix; i++) bad += valid[i] == 0;
    return (double)bad / (double)npix;
}

int ts_mask_all_background(const int32_t *labels, const uint8_t *valid, size_t npix, int32_t background,
                           int32_t ignore_index)
{
    for (size_t i = 0; i < npix; i++) {
        if (valid && !valid[i]) continue;
        int32_t c = labels[i];
        if (c == background || (ignore_index >= 0 && c == ignore_index)) continue;
        return 0;
    }
    return 1;
}

ts_status ts_mask_decide(const ts_mask_filter_params *p, const int32_t *labels, const uint8_t *valid, size_t npix,
                         int *keep)
{
    *keep = 1;
    if (p->max_nodata_fraction < 1.0 && ts_mask_nodata_fraction(valid, npix) > p->max_nodata_fraction) {
        *keep = 0;
        return TS_OK;
    }
    if (p->drop_background) {
        if (!labels)
            return ts_error(TS_ERR_INVALID_ARG, "mask filter: dropping all-background windows needs the label mask");
        if (ts_mask_all_background(labels, valid, npix, p->background, p->ignore_index)) *keep = 0;
    }
    return TS_OK;
}

ts_status ts_mask_filter_fn(void *ctx, const ts_window *w, int *keep)
{
    const ts_mask_filter *mf = ctx;
    const ts_mask_filter_params *p = &mf->params;
    *keep = 1;
    const int want_valid = p->max_nodata_fraction < 1.0, want_labels = p->drop_background;
    if (!want_valid && !want_labels) return TS_OK;
    if (!mf->read) return ts_error(TS_ERR_INVALID_ARG, "mask filter: no reader function given");
    if (w->width <= 0 || w->height <= 0)
        return ts_error(TS_ERR_INVALID_ARG, "mask filter: window size %dx%d", w->width, w->height);
    const size_t npix = (size_t)w->width * (size_t)w->height;
    int32_t *labels = want_labels ? malloc(npix * sizeof *labels) : NULL;
    uint8_t *valid = want_valid ? malloc(npix) : NULL;
    if ((want_labels && !labels) || (want_valid && !valid)) {
        free(labels);
        free(valid);
        return ts_error(TS_ERR_NOMEM, "mask filter: out of memory for a %dx%d window", w->width, w->height);
    }
    if (valid) memset(valid, 255, npix);
    ts_status st = mf->read(mf->reader, w, labels, valid);
    if (!st) st = ts_mask_decide(p, labels, valid, npix, keep);
    free(labels);
    free(valid);
    return st;
}

/* ---- the index cache ---------------------------------------------------------------------- */
static ts_status key_reserve(ts_cache_key *k, size_t extra)
{
    if (k->len + extra + 1 <= k->cap) return TS_OK;
    size_t cap = k->cap ? k->cap : 256;
    while (cap < k->len + extra + 1) cap *= 2;
    char *t = realloc(k->text, cap);
    if (!t) return ts_error(TS_ERR_NOMEM, "index cache: out of memory");
    k->text = t;
    k->cap = cap;
    return TS_OK;
}

static ts_status key_vaddf(ts_cache_key *k, const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0) return ts_error(TS_ERR_INVALID_ARG, "index cache: bad key format");
    ts_status st = key_reserve(k, (size_t)n + 1);
    if (st) return st;
    vsnprintf(k->text + k->len, (size_t)n + 1, fmt, ap);
    k->len += (size_t)n;
    k->text[k->len++] = '\n';
    k->text[k->len] = '\0';
    return TS_OK;
}

ts_status ts_cache_key_addf(ts_cache_key *k, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ts_status st = key_vaddf(k, fmt, ap);
    va_end(ap);
    return st;
}

ts_status ts_cache_key_init(ts_cache_key *k, const char *what)
{
    memset(k, 0, sizeof *k);
    return ts_cache_key_addf(k, "terraseg window index v1: %s", what ? what : "");
}

void ts_cache_key_free(ts_cache_key *k)
{
    free(k->text);
    memset(k, 0, sizeof *k);
}

ts_status ts_cache_key_add_file(ts_cache_key *k, const char *path)
{
    char *abs = realpath(path, NULL);
    if (!abs) return ts_error(TS_ERR_IO, "index cache: cannot resolve %s: %s", path, strerror(errno));
    struct stat sb;
    if (stat(abs, &sb) != 0) {
        ts_status st = ts_error(TS_ERR_IO, "index cache: cannot stat %s: %s", path, strerror(errno));
        free(abs);
        return st;
    }
    ts_status st = ts_cache_key_addf(k, "file %s %lld %lld.%09ld", abs, (long long)sb.st_size,
                                     (long long)sb.st_mtim.tv_sec, (long)sb.st_mtim.tv_nsec);
    free(abs);
    return st;
}

/* File layout, little-endian:
 *   "TSWINIDX" | u32 version 1 | u64 key length | key bytes | u64 count |
 *   u32 flags (1 has_split, 2 has_score) |
 *   count x (i64 col_off, i64 row_off, i32 width, i32 height, i64 id, u8 split, f64 score) |
 *   u64 FNV-1a of everything before it */
#define CACHE_MAGIC "TSWINIDX"
#define CACHE_VERSION 1u
#define CACHE_REC 41

static uint64_t fnv1a(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}
static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}

ts_status ts_windows_cache_save(const char *path, const ts_cache_key *k, const ts_window_list *l)
{
    if (l->count > (SIZE_MAX - 64 - k->len) / CACHE_REC) return ts_error(TS_ERR_NOMEM, "index cache: too large");
    size_t size = 8 + 4 + 8 + k->len + 8 + 4 + l->count * CACHE_REC + 8;
    unsigned char *b = malloc(size);
    if (!b) return ts_error(TS_ERR_NOMEM, "index cache %s: out of memory (%zu bytes)", path, size);
    unsigned char *p = b;
    memcpy(p, CACHE_MAGIC, 8), p += 8;
    put_u32(p, CACHE_VERSION), p += 4;
    put_u64(p, k->len), p += 8;
    if (k->len) memcpy(p, k->text, k->len), p += k->len;
    put_u64(p, l->count), p += 8;
    put_u32(p, (uint32_t)((l->has_split ? 1 : 0) | (l->has_score ? 2 : 0))), p += 4;
    for (size_t i = 0; i < l->count; i++) {
        uint64_t sc;
        memcpy(&sc, &l->score[i], 8);
        put_u64(p, (uint64_t)l->w[i].col_off), p += 8;
        put_u64(p, (uint64_t)l->w[i].row_off), p += 8;
        put_u32(p, (uint32_t)l->w[i].width), p += 4;
        put_u32(p, (uint32_t)l->w[i].height), p += 4;
        put_u64(p, (uint64_t)l->id[i]), p += 8;
        *p++ = l->split[i];
        put_u64(p, sc), p += 8;
    }
    put_u64(p, fnv1a(b, (size_t)(p - b)));

    size_t n = strlen(path);
    char *tmp = malloc(n + 5);
    if (!tmp) {
        free(b);
        return ts_error(TS_ERR_NOMEM, "index cache %s: out of memory", path);
    }
    memcpy(tmp, path, n);
    memcpy(tmp + n, ".tmp", 5);
    ts_status st = TS_OK;
    FILE *f = fopen(tmp, "wb");
    if (!f)
        st = ts_error(TS_ERR_IO, "index cache %s: cannot create %s: %s", path, tmp, strerror(errno));
    else {
        int bad = fwrite(b, 1, size, f) != size;
        if (fclose(f) != 0) bad = 1;
        if (bad || rename(tmp, path) != 0) {
            st = ts_error(TS_ERR_IO, "index cache %s: writing failed (%s)", path, strerror(errno));
            remove(tmp);
        }
    }
    free(tmp);
    free(b);
    return st;
}

ts_status ts_windows_cache_load(const char *path, const ts_cache_key *k, ts_window_list *out, int *hit)
{
    *hit = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return TS_OK; /* no cache yet */
    unsigned char *b = NULL;
    ts_status st = TS_OK;
    long sz = -1;
    if (fseek(f, 0, SEEK_END) == 0) sz = ftell(f);
    if (sz < 8 + 4 + 8 + 8 + 4 + 8 || fseek(f, 0, SEEK_SET) != 0) goto miss;
    size_t size = (size_t)sz;
    if (!(b = malloc(size))) {
        st = ts_error(TS_ERR_NOMEM, "index cache %s: out of memory (%zu bytes)", path, size);
        goto miss;
    }
    if (fread(b, 1, size, f) != size) goto miss;
    if (memcmp(b, CACHE_MAGIC, 8) != 0 || get_u32(b + 8) != CACHE_VERSION) goto miss;
    if (get_u64(b + size - 8) != fnv1a(b, size - 8)) goto miss;
    uint64_t klen = get_u64(b + 12);
    if (klen != k->len || klen > size - 40 || memcmp(b + 20, k->text, k->len) != 0) goto miss;
    const unsigned char *p = b + 20 + klen;
    uint64_t count = get_u64(p);
    uint32_t flags = get_u32(p + 8);
    p += 12;
    if (count > (size - 40 - klen) / CACHE_REC || 20 + klen + 12 + count * CACHE_REC + 8 != size) goto miss;
    ts_window_list t;
    ts_window_list_init(&t);
    if ((st = ts_window_list_reserve(&t, count ? (size_t)count : 1))) {
        ts_window_list_free(&t);
        goto miss;
    }
    for (size_t i = 0; i < count; i++) {
        t.w[i].col_off = (int64_t)get_u64(p);
        t.w[i].row_off = (int64_t)get_u64(p + 8);
        t.w[i].width = (int32_t)get_u32(p + 16);
        t.w[i].height = (int32_t)get_u32(p + 20);
        t.id[i] = (int64_t)get_u64(p + 24);
        t.split[i] = p[32];
        uint64_t sc = get_u64(p + 33);
        memcpy(&t.score[i], &sc, 8);
        p += CACHE_REC;
    }
    t.count = (size_t)count;
    t.has_split = (flags & 1) != 0;
    t.has_score = (flags & 2) != 0;
    ts_window_list_free(out);
    *out = t;
    *hit = 1;
miss:
    free(b);
    fclose(f);
    return st;
}
