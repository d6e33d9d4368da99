/* io/qc.c: label QC on synthetic rasters and vectors written with the GDAL C
 * API, so every count is known exactly.
 *
 * A 40x30 image (UTM 33N, 10 m, nodata 0 in its 4 leftmost columns) and a
 * class-id mask on its grid: exact histograms overall and per split, the
 * ignore, nodata, "class id on nodata" and out-of-range counts (with the
 * distinct ids >= K listed), for 1 and 2 threads, in blocks and in windows.
 * The class-weight formulas on known histograms. Every geometry finding
 * appears exactly when it should: geographic CRS, non-square pixels, rotated
 * geotransform, missing CRS (image, labels), labels off the image (vector
 * extent, raster footprint), ids >= K; a clean input has none. */
#include <cJSON.h>
#include <cpl_conv.h>
#include <gdal.h>
#include <math.h>
#include <stdarg.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/qc.h"
#include "tests/testutil.h"

static const char *tmp(const char *name) { return tu_path(name); }

#define W 40
#define H 30
#define K 3
static const double UTM_GT[6] = {500000.0, 10.0, 0.0, 4500000.0, 0.0, -10.0};

static char *wkt_of_epsg(int epsg)
{
    if (!epsg) return NULL;
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    char *w = NULL, *out = NULL;
    if (s && OSRImportFromEPSG(s, epsg) == OGRERR_NONE && OSRExportToWkt(s, &w) == OGRERR_NONE) out = strdup(w);
    CPLFree(w);
    if (s) OSRDestroySpatialReference(s);
    return out;
}

/* Image pixel: nodata (0) in the 4 leftmost columns. */
static int image_valid(int x, int y)
{
    (void)y;
    return x >= 4;
}

/* The mask of the main case: id = (x / 7) % K, row 0 ignore (255), three
 * pixels out of range: 7 at (10, 5), 9 at (30, 20) and (31, 20). */
static int mask_id(int x, int y, int with_bad)
{
    if (y == 0) return 255;
    if (with_bad && x == 10 && y == 5) return 7;
    if (with_bad && (x == 30 || x == 31) && y == 20) return 9;
    return (x / 7) % K;
}

/* The split case: class 2 only in the top-left quarter. */
static int split_id(int x, int y)
{
    if (x < 20) return y < 15 ? 2 : 1;
    return (x / 5) % 2;
}

typedef int (*id_fn)(int x, int y, int arg);
static int id_main(int x, int y, int arg) { return mask_id(x, y, arg); }
static int id_split(int x, int y, int arg)
{
    (void)arg;
    return split_id(x, y);
}
static int id_zero(int x, int y, int arg)
{
    (void)x, (void)y, (void)arg;
    return 0;
}

/* A one-band Byte GeoTIFF of w x h: fn(x, y) values, or the image pattern
 * (100, nodata 0 where !image_valid) when fn is NULL. epsg 0: no CRS. */
static int write_tif(const char *path, int w, int h, const double gt[6], int epsg, id_fn fn, int arg)
{
    GDALDriverH drv = GDALGetDriverByName("GTiff");
    GDALDatasetH ds = drv ? GDALCreate(drv, path, w, h, 1, GDT_Byte, NULL) : NULL;
    if (!ds) return 0;
    int ok = GDALSetGeoTransform(ds, (double *)gt) == CE_None;
    char *wkt = wkt_of_epsg(epsg);
    if (ok && wkt) ok = GDALSetProjection(ds, wkt) == CE_None;
    free(wkt);
    GDALRasterBandH b = GDALGetRasterBand(ds, 1);
    if (ok && !fn) ok = GDALSetRasterNoDataValue(b, 0) == CE_None;
    uint8_t *px = malloc((size_t)w * h);
    if (!px) ok = 0;
    for (int y = 0; ok && y < h; y++)
        for (int x = 0; x < w; x++) px[(size_t)y * w + x] = (uint8_t)(fn ? fn(x, y, arg) : image_valid(x, y) ? 100 : 0);
    if (ok) ok = GDALRasterIO(b, GF_Write, 0, 0, w, h, px, w, h, GDT_Byte, 0, 0) == CE_None;
    free(px);
    GDALClose(ds);
    return ok;
}

/* A shapefile with one polygon per WKT, attribute cls; epsg 0: no .prj. */
static int write_shp(const char *path, int epsg, int n, const char *const *wkts, const int *cls)
{
    GDALDriverH drv = GDALGetDriverByName("ESRI Shapefile");
    GDALDatasetH ds = drv ? GDALCreate(drv, path, 0, 0, 0, GDT_Unknown, NULL) : NULL;
    if (!ds) return 0;
    OGRSpatialReferenceH srs = NULL;
    if (epsg) {
        srs = OSRNewSpatialReference(NULL);
        if (!srs || OSRImportFromEPSG(srs, epsg) != OGRERR_NONE) {
            GDALClose(ds);
            return 0;
        }
    }
    OGRLayerH lyr = GDALDatasetCreateLayer(ds, "l", srs, wkbPolygon, NULL);
    if (srs) OSRDestroySpatialReference(srs);
    int ok = lyr != NULL;
    OGRFieldDefnH fd = OGR_Fld_Create("cls", OFTInteger);
    if (ok) ok = OGR_L_CreateField(lyr, fd, TRUE) == OGRERR_NONE;
    OGR_Fld_Destroy(fd);
    for (int i = 0; ok && i < n; i++) {
        OGRFeatureH f = OGR_F_Create(OGR_L_GetLayerDefn(lyr));
        OGRGeometryH g = NULL;
        char *w = (char *)wkts[i];
        ok = f && OGR_G_CreateFromWkt(&w, NULL, &g) == OGRERR_NONE;
        if (ok) {
            OGR_F_SetFieldInteger(f, 0, cls[i]);
            ok = OGR_F_SetGeometryDirectly(f, g) == OGRERR_NONE && OGR_L_CreateFeature(lyr, f) == OGRERR_NONE;
        } else if (g) {
            OGR_G_DestroyGeometry(g);
        }
        if (f) OGR_F_Destroy(f);
    }
    GDALClose(ds);
    return ok;
}

/* ---- exact counts ---- */

typedef struct expect {
    uint64_t hist[K], windows, pixels, nodata, ignore, bad, masked, labelled;
} expect;

static void expect_add(expect *e, int x0, int y0, int w, int h, id_fn fn, int arg)
{
    e->windows++;
    for (int y = y0; y < y0 + h; y++)
        for (int x = x0; x < x0 + w; x++) {
            int id = fn(x, y, arg), ok = image_valid(x, y);
            e->pixels++;
            e->nodata += !ok;
            if (id == 255)
                e->ignore++;
            else if (id >= K)
                e->bad++;
            else {
                e->labelled++; /* raster mask: any class id */
                if (ok)
                    e->hist[id]++;
                else
                    e->masked++;
            }
        }
}

static void check_counts(const ts_qc_counts *c, const expect *e, const char *what)
{
    tu_expect(c->windows == e->windows, "%s: windows %llu, want %llu", what, (unsigned long long)c->windows,
              (unsigned long long)e->windows);
    tu_expect(c->pixels == e->pixels && c->nodata == e->nodata && c->ignore == e->ignore && c->out_of_range == e->bad &&
                  c->masked == e->masked && c->labelled == e->labelled,
              "%s: pixels/nodata/ignore/bad/masked/labelled %llu/%llu/%llu/%llu/%llu/%llu, want "
              "%llu/%llu/%llu/%llu/%llu/%llu",
              what, (unsigned long long)c->pixels, (unsigned long long)c->nodata, (unsigned long long)c->ignore,
              (unsigned long long)c->out_of_range, (unsigned long long)c->masked, (unsigned long long)c->labelled,
              (unsigned long long)e->pixels, (unsigned long long)e->nodata, (unsigned long long)e->ignore,
              (unsigned long long)e->bad, (unsigned long long)e->masked, (unsigned long long)e->labelled);
    for (int k = 0; k < K; k++)
        tu_expect(c->hist[k] == e->hist[k], "%s: class %d has %llu pixels, want %llu", what, k,
                  (unsigned long long)c->hist[k], (unsigned long long)e->hist[k]);
}

static int has(const ts_qc_report *r, const char *code, ts_qc_level level)
{
    const ts_qc_finding *f = ts_qc_find(r, code);
    return f && f->level == level;
}

/* Exactly the findings listed (codes, NULL-terminated) of level >= warning. */
static void expect_findings(const ts_qc_report *r, const char *what, ...)
{
    const char *want[32];
    int n = 0;
    va_list ap;
    va_start(ap, what);
    for (const char *c = va_arg(ap, const char *); c && n < 32; c = va_arg(ap, const char *)) want[n++] = c;
    va_end(ap);
    for (int i = 0; i < n; i++)
        tu_expect(ts_qc_find(r, want[i]) != NULL && ts_qc_find(r, want[i])->level >= TS_QC_WARNING,
                  "%s: finding %s is missing", what, want[i]);
    for (int i = 0; i < r->n_findings; i++) {
        if (r->findings[i].level < TS_QC_WARNING) continue;
        int listed = 0;
        for (int j = 0; j < n; j++) listed |= strcmp(want[j], r->findings[i].code) == 0;
        tu_expect(listed, "%s: unexpected %s [%s]: %s", what, r->findings[i].level == TS_QC_ERROR ? "error" : "warning",
                  r->findings[i].code, r->findings[i].message);
    }
}

static int run(ts_qc_report *r, const char *image, const char *labels, const ts_label_opts *lo,
               const ts_window_list *wl, int threads, int block)
{
    ts_qc_params p = {.image = image, .labels = labels, .label_opts = lo, .classes = K, .windows = wl,
                      .threads = threads, .block = block};
    return tu_expect_ok(ts_qc_run(&p, r), "ts_qc_run");
}

static int same_counts(const ts_qc_counts *a, const ts_qc_counts *b)
{
    if (a->windows != b->windows || a->pixels != b->pixels || a->nodata != b->nodata || a->ignore != b->ignore ||
        a->out_of_range != b->out_of_range || a->masked != b->masked || a->labelled != b->labelled ||
        a->n_bad != b->n_bad || a->bad_truncated != b->bad_truncated)
        return 0;
    for (int k = 0; k < a->classes; k++)
        if (a->hist[k] != b->hist[k]) return 0;
    for (int i = 0; i < a->n_bad; i++)
        if (a->bad[i].id != b->bad[i].id || a->bad[i].pixels != b->bad[i].pixels) return 0;
    return 1;
}

static void test_counts(void)
{
    const char *img = tmp("img.tif"), *mask = tmp("mask.tif"), *clean = tmp("clean.tif");
    if (!tu_expect(write_tif(img, W, H, UTM_GT, 32633, NULL, 0) && write_tif(mask, W, H, UTM_GT, 32633, id_main, 1) &&
                       write_tif(clean, W, H, UTM_GT, 32633, id_main, 0),
                   "writing the main fixtures"))
        return;
    expect e = {0};
    expect_add(&e, 0, 0, W, H, id_main, 1);
    e.windows = 6; /* blocks of 16: 3 x 2 */

    ts_qc_report r1, r2;
    if (run(&r1, img, mask, NULL, NULL, 1, 16) && run(&r2, img, mask, NULL, NULL, 2, 16)) {
        check_counts(&r1.total, &e, "blocks, 1 thread");
        tu_expect(same_counts(&r1.total, &r2.total), "blocks: 2 threads count differently from 1");
        tu_expect(r1.total.n_bad == 2 && r1.total.bad[0].id == 7 && r1.total.bad[0].pixels == 1 &&
                      r1.total.bad[1].id == 9 && r1.total.bad[1].pixels == 2 && !r1.total.bad_truncated,
                  "out-of-range ids: want 7 (1 px), 9 (2 px); got %d ids", r1.total.n_bad);
        expect_findings(&r1, "ids >= K", "ids_out_of_range", NULL);
        tu_expect(has(&r1, "ids_out_of_range", TS_QC_ERROR) && strstr(ts_qc_find(&r1, "ids_out_of_range")->message, "9 (2 px)"),
                  "ids_out_of_range is an error listing 9 (2 px)");
        tu_expect(ts_qc_exit_code(&r1, 0) == 1, "an id >= K exits 1");
        tu_expect(has(&r1, "image_nodata", TS_QC_INFO), "the nodata fraction is reported");
        tu_expect(!r1.has_windows && !r1.has_split && r1.labels_vector == 0, "blocks, raster mask");
    }
    ts_qc_report_free(&r1);
    ts_qc_report_free(&r2);

    /* A clean mask: no finding above info, exit 0 even with --strict. */
    if (run(&r1, img, clean, NULL, NULL, 2, 0)) {
        expect_findings(&r1, "clean input", NULL);
        tu_expect(ts_qc_exit_code(&r1, 1) == 0 && r1.errors == 0 && r1.warnings == 0, "clean input exits 0 (strict)");
        expect ec = {0};
        expect_add(&ec, 0, 0, W, H, id_main, 0);
        check_counts(&r1.total, &ec, "clean, one block");
    }
    ts_qc_report_free(&r1);

    /* Windows with splits (overlapping: a shared pixel counts once per window). */
    const char *smask = tmp("split.tif");
    if (!tu_expect(write_tif(smask, W, H, UTM_GT, 32633, id_split, 0), "writing %s", smask)) return;
    ts_window_list wl;
    ts_window_list_init(&wl);
    const ts_window ws[5] = {{0, 0, 20, 15}, {20, 0, 20, 15}, {0, 15, 20, 15}, {20, 15, 20, 15}, {10, 5, 20, 15}};
    const uint8_t tags[5] = {TS_SPLIT_TRAIN, TS_SPLIT_TRAIN, TS_SPLIT_VAL, TS_SPLIT_TEST, TS_SPLIT_BUFFER};
    for (int i = 0; i < 5; i++) ts_window_list_push(&wl, ws[i], i);
    for (int i = 0; i < 5; i++) wl.split[i] = tags[i];
    wl.has_split = 1;
    expect es[TS_SPLIT_COUNT] = {0}, et = {0};
    for (int i = 0; i < 5; i++) {
        expect_add(&es[tags[i]], (int)ws[i].col_off, (int)ws[i].row_off, ws[i].width, ws[i].height, id_split, 0);
        expect_add(&et, (int)ws[i].col_off, (int)ws[i].row_off, ws[i].width, ws[i].height, id_split, 0);
    }
    if (run(&r1, img, smask, NULL, &wl, 1, 0) && run(&r2, img, smask, NULL, &wl, 2, 0)) {
        check_counts(&r1.total, &et, "windows, all");
        check_counts(&r1.split[TS_SPLIT_TRAIN], &es[TS_SPLIT_TRAIN], "windows, train");
        check_counts(&r1.split[TS_SPLIT_VAL], &es[TS_SPLIT_VAL], "windows, val");
        check_counts(&r1.split[TS_SPLIT_TEST], &es[TS_SPLIT_TEST], "windows, test");
        check_counts(&r1.split[TS_SPLIT_BUFFER], &es[TS_SPLIT_BUFFER], "windows, buffer");
        int same = same_counts(&r1.total, &r2.total);
        for (int s = 0; s < TS_SPLIT_COUNT; s++) same &= same_counts(&r1.split[s], &r2.split[s]);
        for (int k = 0; k < K; k++)
            same &= r1.weights_median[k] == r2.weights_median[k] && r1.weights_inverse[k] == r2.weights_inverse[k];
        tu_expect(same, "windows: 2 threads give another report than 1");
        /* val holds only class 1, test classes 0 and 1: class 2 is absent from both. */
        expect_findings(&r1, "splits", "class_absent_from_split", NULL);
        int n_absent = 0;
        for (int i = 0; i < r1.n_findings; i++)
            if (strcmp(r1.findings[i].code, "class_absent_from_split") == 0) {
                n_absent++;
                tu_expect(strstr(r1.findings[i].message, "split val") ? strstr(r1.findings[i].message, "classes 0, 2") != NULL
                                                                       : strstr(r1.findings[i].message, "split test") &&
                                                                             strstr(r1.findings[i].message, "class 2"),
                          "absent-class message: %s", r1.findings[i].message);
            }
        tu_expect(n_absent == 2, "class_absent_from_split for val and test, got %d", n_absent);
        tu_expect(ts_qc_exit_code(&r1, 0) == 0 && ts_qc_exit_code(&r1, 1) == 1, "warnings: exit 0, 1 with --strict");
        /* Weights come from train. */
        double w[K];
        ts_qc_class_weights(es[TS_SPLIT_TRAIN].hist, K, TS_QC_WEIGHTS_MEDIAN_FREQUENCY, w);
        tu_expect(strcmp(r1.weights_basis, "train") == 0 && w[0] == r1.weights_median[0] &&
                      w[2] == r1.weights_median[2],
                  "weights from the train split");

        /* The JSON report carries the same figures. */
        char *json = NULL;
        if (tu_expect_ok(ts_qc_report_json(&r1, &json), "ts_qc_report_json")) {
            cJSON *root = cJSON_Parse(json);
            cJSON *cw = cJSON_GetObjectItem(root, "class_weights");
            cJSON *hist = cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(root, "splits"), "val"),
                                              "histogram");
            tu_expect(root && cw && cJSON_IsString(cJSON_GetObjectItem(cw, "default")) &&
                          strcmp(cJSON_GetObjectItem(cw, "default")->valuestring, "median_frequency") == 0,
                      "JSON: class_weights.default = median_frequency");
            tu_expect(hist && cJSON_GetArraySize(hist) == K &&
                          (uint64_t)cJSON_GetArrayItem(hist, 1)->valuedouble == es[TS_SPLIT_VAL].hist[1],
                      "JSON: splits.val.histogram");
            tu_expect(cJSON_GetObjectItem(root, "warnings") &&
                          cJSON_GetObjectItem(root, "warnings")->valueint == r1.warnings,
                      "JSON: warnings");
            cJSON_Delete(root);
        }
        free(json);
    }
    ts_qc_report_free(&r1);
    ts_qc_report_free(&r2);
    ts_window_list_free(&wl);
}

/* ---- weights ---- */

static void test_weights(void)
{
    const uint64_t h1[3] = {100, 300, 600};
    double w[3];
    int present = ts_qc_class_weights(h1, 3, TS_QC_WEIGHTS_MEDIAN_FREQUENCY, w);
    const double want_med[3] = {3.0, 1.0, 0.5}; /* median f = 0.3 */
    tu_expect(present == 3, "3 classes present");
    tu_check_close_d("weights", "median frequency", w, want_med, 3, 1e-12, 1e-12);
    ts_qc_class_weights(h1, 3, TS_QC_WEIGHTS_INVERSE_FREQUENCY, w);
    const double want_inv[3] = {2.0, 2.0 / 3.0, 1.0 / 3.0}; /* 1/f = 10, 10/3, 5/3; mean 5 */
    tu_check_close_d("weights", "inverse frequency", w, want_inv, 3, 1e-12, 1e-12);
    double mean = (w[0] + w[1] + w[2]) / 3;
    tu_expect(fabs(mean - 1.0) < 1e-12, "inverse-frequency weights average 1, got %.17g", mean);

    /* An absent class gets 0 and takes no part: f = (0.25, 0.75), median 0.5. */
    const uint64_t h2[3] = {0, 100, 300};
    present = ts_qc_class_weights(h2, 3, TS_QC_WEIGHTS_MEDIAN_FREQUENCY, w);
    const double want2[3] = {0.0, 2.0, 2.0 / 3.0};
    tu_expect(present == 2, "2 classes present");
    tu_check_close_d("weights", "median frequency, absent class", w, want2, 3, 1e-12, 1e-12);
    ts_qc_class_weights(h2, 3, TS_QC_WEIGHTS_INVERSE_FREQUENCY, w);
    const double want3[3] = {0.0, 1.5, 0.5}; /* 1/f = 4, 4/3; mean 8/3 */
    tu_check_close_d("weights", "inverse frequency, absent class", w, want3, 3, 1e-12, 1e-12);
    const uint64_t h3[3] = {0, 0, 0};
    tu_expect(ts_qc_class_weights(h3, 3, TS_QC_WEIGHTS_MEDIAN_FREQUENCY, w) == 0 && w[0] == 0 && w[2] == 0,
              "no pixels: all weights 0");
}

/* ---- geometry ---- */

static void geometry_case(const char *name, const double gt[6], int epsg, const char *const *want_codes)
{
    char ipath[64], mpath[64];
    snprintf(ipath, sizeof ipath, "%s_img.tif", name);
    snprintf(mpath, sizeof mpath, "%s_mask.tif", name);
    const char *img = tmp(ipath), *mask = tmp(mpath);
    if (!tu_expect(write_tif(img, W, H, gt, epsg, NULL, 0) && write_tif(mask, W, H, gt, epsg, id_main, 0),
                   "writing the %s fixtures", name))
        return;
    ts_qc_report r;
    if (run(&r, img, mask, NULL, NULL, 2, 0)) {
        for (int i = 0; want_codes[i]; i++)
            tu_expect(ts_qc_find(&r, want_codes[i]) && ts_qc_find(&r, want_codes[i])->level == TS_QC_WARNING,
                      "%s: warning %s is missing", name, want_codes[i]);
        for (int i = 0; i < r.n_findings; i++) {
            if (r.findings[i].level < TS_QC_WARNING) continue;
            int listed = 0;
            for (int j = 0; want_codes[j]; j++) listed |= strcmp(want_codes[j], r.findings[i].code) == 0;
            tu_expect(listed, "%s: unexpected [%s] %s", name, r.findings[i].code, r.findings[i].message);
        }
        tu_expect(r.errors == 0 && ts_qc_exit_code(&r, 0) == 0 && ts_qc_exit_code(&r, 1) == (want_codes[0] != NULL),
                  "%s: exit 0 with warnings, 1 under --strict", name);
        expect e = {0};
        expect_add(&e, 0, 0, W, H, id_main, 0);
        check_counts(&r.total, &e, name);
        printf("  %s:", name);
        for (int i = 0; i < r.n_findings; i++)
            if (r.findings[i].level >= TS_QC_WARNING) printf(" [%s]", r.findings[i].code);
        printf("\n");
    }
    ts_qc_report_free(&r);
}

static void test_geometry(void)
{
    static const char *const none[] = {NULL};
    static const char *const geo[] = {"image_geographic_crs", "labels_geographic_crs", NULL};
    static const char *const nonsq[] = {"non_square_pixels", NULL};
    static const char *const rot[] = {"rotated_geotransform", "labels_rotated_geotransform", NULL};
    static const char *const nocrs[] = {"image_no_crs", "labels_no_crs", NULL};
    const double geo_gt[6] = {10.0, 0.0001, 0.0, 50.0, 0.0, -0.0001};
    const double nonsq_gt[6] = {500000.0, 10.0, 0.0, 4500000.0, 0.0, -20.0};
    const double rot_gt[6] = {500000.0, 10.0, 1.0, 4500000.0, 1.0, -10.0};
    geometry_case("utm", UTM_GT, 32633, none);
    geometry_case("geographic", geo_gt, 4326, geo);
    geometry_case("nonsquare", nonsq_gt, 32633, nonsq);
    geometry_case("rotated", rot_gt, 32633, rot);
    geometry_case("nocrs", UTM_GT, 0, nocrs);
    /* The geographic warning suggests the UTM zone (10.002 E, 50 N: zone 32N, EPSG:32632). */
    ts_qc_report r;
    if (run(&r, tmp("geographic_img.tif"), tmp("geographic_mask.tif"), NULL, NULL, 1, 0)) {
        const ts_qc_finding *f = ts_qc_find(&r, "image_geographic_crs");
        tu_expect(f && strstr(f->message, "EPSG:32632") && strstr(f->message, "DEGREES"), "geographic: %s",
                  f ? f->message : "(none)");
    }
    ts_qc_report_free(&r);
}

/* Vector labels: off the image, without CRS, and over it. */
static void test_vector(void)
{
    const char *img = tmp("img.tif");
    /* Image covers x 500000..500400, y 4499700..4500000. */
    const char *const inside[2] = {"POLYGON ((500050 4499950,500250 4499950,500250 4499800,500050 4499800,500050 4499950))",
                                   "POLYGON ((500300 4499900,500380 4499900,500380 4499720,500300 4499720,500300 4499900))"};
    const char *const far[1] = {"POLYGON ((600000 4400000,600100 4400000,600100 4399900,600000 4399900,600000 4400000))"};
    const int cls[2] = {1, 2};
    const char *vin = tmp("in.shp"), *vfar = tmp("far.shp"), *vnocrs = tmp("nocrs.shp");
    if (!tu_expect(write_shp(vin, 32633, 2, inside, cls) && write_shp(vfar, 32633, 1, far, cls) &&
                       write_shp(vnocrs, 0, 2, inside, cls),
                   "writing the shapefiles"))
        return;
    ts_label_opts lo;
    ts_label_opts_init(&lo);
    lo.attribute = "cls";
    ts_qc_report r;
    if (run(&r, img, vin, &lo, NULL, 2, 0)) {
        expect_findings(&r, "vector inside", NULL);
        /* 20 x 15 px of class 1 and 8 x 18 of class 2 (whole pixels, centres inside); the rest background;
         * the nodata columns 0..3 are outside both. */
        tu_expect(r.total.hist[1] == 20 * 15 && r.total.hist[2] == 8 * 18 &&
                      r.total.hist[0] == (uint64_t)(W - 4) * H - 20 * 15 - 8 * 18 && r.total.labelled == 20 * 15 + 8 * 18,
                  "vector histogram %llu/%llu/%llu", (unsigned long long)r.total.hist[0],
                  (unsigned long long)r.total.hist[1], (unsigned long long)r.total.hist[2]);
        tu_expect(r.labels_vector == 1 && ts_qc_exit_code(&r, 1) == 0, "vector inside: clean");
    }
    ts_qc_report_free(&r);
    if (run(&r, img, vfar, &lo, NULL, 2, 0)) {
        expect_findings(&r, "vector off the image", "no_overlap", "class_absent", NULL);
        const ts_qc_finding *f = ts_qc_find(&r, "no_overlap");
        tu_expect(f && f->level == TS_QC_ERROR && strstr(f->message, "OUTSIDE"), "no_overlap names the extents: %s",
                  f ? f->message : "(none)");
        int n = 0;
        for (int i = 0; i < r.n_findings; i++) n += strcmp(r.findings[i].code, "no_overlap") == 0;
        tu_expect(n == 1 && r.total.labelled == 0 && ts_qc_exit_code(&r, 0) == 1, "one no_overlap error, exit 1");
    }
    ts_qc_report_free(&r);
    if (run(&r, img, vnocrs, &lo, NULL, 2, 0)) {
        expect_findings(&r, "vector without CRS", "labels_no_crs", "labels_unreadable", NULL);
        const ts_qc_finding *f = ts_qc_find(&r, "labels_unreadable");
        tu_expect(f && strstr(f->message, "no CRS") && strstr(f->message, "--assume-crs"),
                  "the error names the fix: %s", f ? f->message : "(none)");
        tu_expect(!r.image_read && ts_qc_exit_code(&r, 0) == 1, "unreadable labels: not counted, exit 1");
    }
    ts_qc_report_free(&r);
    lo.assume_image_crs = 1;
    if (run(&r, img, vnocrs, &lo, NULL, 1, 0)) {
        expect_findings(&r, "vector without CRS, assumed", NULL);
        tu_expect(has(&r, "labels_crs_assumed", TS_QC_INFO) && r.total.hist[1] == 20 * 15, "assumed the image CRS");
    }
    ts_qc_report_free(&r);
    lo.assume_image_crs = 0;
    lo.assume_crs = "EPSG:32633";
    if (run(&r, img, vnocrs, &lo, NULL, 1, 0)) {
        expect_findings(&r, "vector without CRS, EPSG:32633 assumed", NULL);
        tu_expect(r.total.hist[2] == 8 * 18, "assumed EPSG:32633");
    }
    ts_qc_report_free(&r);

    /* A raster mask whose footprint misses the image: every pixel ignore. */
    const double far_gt[6] = {700000.0, 10.0, 0.0, 4500000.0, 0.0, -10.0};
    const char *mfar = tmp("farmask.tif");
    if (tu_expect(write_tif(mfar, W, H, far_gt, 32633, id_zero, 0), "writing %s", mfar) &&
        run(&r, img, mfar, NULL, NULL, 2, 0)) {
        expect_findings(&r, "raster mask off the image", "no_overlap", "class_absent", NULL);
        tu_expect(r.total.ignore == (uint64_t)W * H && ts_qc_exit_code(&r, 0) == 1, "all ignore, exit 1");
    }
    ts_qc_report_free(&r);

    /* Unreadable inputs. */
    if (run(&r, tmp("missing.tif"), vin, &lo, NULL, 1, 0))
        tu_expect(has(&r, "image_unreadable", TS_QC_ERROR) && ts_qc_exit_code(&r, 0) == 1, "missing image: error");
    ts_qc_report_free(&r);
    if (run(&r, img, tmp("missing.gpkg"), &lo, NULL, 1, 0))
        tu_expect(has(&r, "labels_unreadable", TS_QC_ERROR) && ts_qc_exit_code(&r, 0) == 1, "missing labels: error");
    ts_qc_report_free(&r);
}

/* More distinct bad ids than listed: the smallest are kept, with complete counts, for any thread count. */
static void test_many_bad_ids(void)
{
    ts_qc_counts a, b, m;
    ts_qc_counts_init(&a, 2);
    ts_qc_counts_init(&b, 2);
    ts_qc_counts_init(&m, 2);
    int32_t la[100], lb[100];
    for (int i = 0; i < 100; i++) {
        la[i] = 2 + (i * 37) % 100; /* ids 2..101, shuffled */
        lb[i] = 2 + i % 50;         /* ids 2..51 */
    }
    ts_qc_counts_add(&a, la, NULL, 100, 255, 0);
    ts_qc_counts_add(&b, lb, NULL, 100, 255, 0);
    ts_qc_counts_merge(&m, &b);
    ts_qc_counts_merge(&m, &a);
    int ok = m.n_bad == TS_QC_MAX_BAD_IDS && m.bad_truncated && m.out_of_range == 200;
    for (int i = 0; ok && i < m.n_bad; i++) ok = m.bad[i].id == 2 + i && m.bad[i].pixels == 3;
    tu_expect(ok, "bad ids: the %d smallest, 3 px each, truncated", TS_QC_MAX_BAD_IDS);
    ts_qc_counts_free(&a);
    ts_qc_counts_free(&b);
    ts_qc_counts_free(&m);
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    ts_gdal_init();
    if (!tu_tmpdir("test_qc")) return 1;
    test_weights();
    test_many_bad_ids();
    test_counts();
    test_geometry();
    test_vector();
    tu_tmpdir_remove();
    return tu_finish("qc");
}
