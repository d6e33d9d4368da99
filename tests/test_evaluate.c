/* io/evaluate.c: `terraseg eval` on GDAL rasters and OGR layers written here.
 *
 * - a 6x4 case whose confusion matrix, IoU, precision, recall, F1, mIoU, OA,
 *   kappa and areas are computed by hand below (prediction nodata and truth
 *   ignore excluded; a fourth, absent class from the category names);
 * - the same truth at 5 m (aligned with nearest: the same matrix) and in
 *   EPSG:4326 (the matrix of GDALWarp -r near -et 0 onto the prediction);
 * - a GPKG truth rasterized onto the prediction grid: pixel-aligned
 *   rectangles (matrix by hand) and a triangle with ALL_TOUCHED (against
 *   GDALRasterize);
 * - strip heights 1, 7, 64 and the whole scene give identical matrices and
 *   boundary counts, equal to ts_boundary_add on the whole scene as one tile;
 * - K from --classes, category names or the largest id; bad ids; no
 *   georeferencing (pixel space, same size only); disjoint inputs refused
 *   naming both files; JSON (parsed with cJSON, keys and values) and PNG
 *   (opened with GDAL, size) outputs, refused when they exist unless
 *   overwrite. */
#include <cJSON.h>
#include <cpl_conv.h>
#include <gdal.h>
#include <gdal_utils.h>
#include <math.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/evaluate.h"
#include "io/io.h"
#include "tests/testutil.h"
#include "train/metrics.h"

/* Files in the test's scratch folder. */
static const char *tmp(const char *name) { return tu_path(name); }

static char *wkt_of_epsg(int epsg)
{
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    char *w = NULL, *out = NULL;
    if (OSRImportFromEPSG(s, epsg) == OGRERR_NONE && OSRExportToWkt(s, &w) == OGRERR_NONE) out = strdup(w);
    CPLFree(w);
    OSRDestroySpatialReference(s);
    return out;
}

/* A one-band GeoTIFF of ids; gt NULL: no georeferencing; epsg 0: no CRS;
 * cats: category names (NULL-terminated) or NULL. */
static int write_ids(const char *path, int w, int h, const double *gt, int epsg, GDALDataType type, const int32_t *v,
                     int has_nd, double nd, const char *const *cats)
{
    GDALDatasetH ds = GDALCreate(GDALGetDriverByName("GTiff"), path, w, h, 1, type, NULL);
    if (!ds) return 0;
    int ok = 1;
    if (gt) ok = GDALSetGeoTransform(ds, (double *)gt) == CE_None;
    if (ok && epsg) {
        char *wkt = wkt_of_epsg(epsg);
        ok = wkt && GDALSetProjection(ds, wkt) == CE_None;
        free(wkt);
    }
    GDALRasterBandH b = GDALGetRasterBand(ds, 1);
    if (ok && has_nd) ok = GDALSetRasterNoDataValue(b, nd) == CE_None;
    if (ok && cats) ok = GDALSetRasterCategoryNames(b, (char **)cats) == CE_None;
    if (ok) ok = GDALRasterIO(b, GF_Write, 0, 0, w, h, (void *)v, w, h, GDT_Int32, 0, 0) == CE_None;
    GDALClose(ds);
    return ok;
}

/* The confusion matrix of ids by direct counting (pred nodata 255, truth ignore 255). */
static void count_matrix(int K, const int32_t *pred, const int32_t *truth, size_t n, int64_t *m)
{
    memset(m, 0, sizeof *m * (size_t)K * K);
    for (size_t i = 0; i < n; i++)
        if (pred[i] != 255 && truth[i] != 255) m[(size_t)truth[i] * K + pred[i]]++;
}

static int same_matrix(const ts_metrics *m, const int64_t *want, int K)
{
    if (m->classes != K) return 0;
    return memcmp(m->confusion, want, sizeof *want * (size_t)K * K) == 0;
}

static void print_matrix(const char *what, const int64_t *v, int K)
{
    fprintf(stderr, "%s:\n", what);
    for (int t = 0; t < K; t++) {
        for (int p = 0; p < K; p++) fprintf(stderr, " %6lld", (long long)v[(size_t)t * K + p]);
        fputc('\n', stderr);
    }
}

static int near(double a, double b) { return fabs(a - b) <= 1e-12 * (1 + fabs(b)); }

/* ---- the hand-computed case ------------------------------------------------------------ */

#define HW 6
#define HH 4
/* 10 m pixels in UTM 33N: 100 m^2 each. */
static const double HGT[6] = {500000.0, 10.0, 0.0, 4500000.0, 0.0, -10.0};
static const char *const CATS[] = {"background", "building", "road", "water", NULL};

/* Truth: 255 at (col 4, row 3) is the ignore id. */
static const int32_t HTRUTH[HH * HW] = {
    0, 0, 0, 1, 1,   1, /* row 0 */
    0, 0, 0, 1, 1,   1, /* row 1 */
    2, 2, 0, 1, 1,   1, /* row 2 */
    2, 2, 2, 2, 255, 1, /* row 3 */
};
/* Prediction: 255 at (col 5, row 1) is nodata. */
static const int32_t HPRED[HH * HW] = {
    0, 0, 1, 1, 1, 1,   /* row 0 */
    0, 0, 0, 1, 1, 255, /* row 1 */
    2, 0, 0, 1, 2, 1,   /* row 2 */
    2, 2, 2, 0, 2, 1,   /* row 3 */
};

static ts_status eval(const char *pred, const char *truth, const ts_label_opts *lo, int classes, double tol, int rows,
                      ts_eval_result *r)
{
    ts_eval_params p;
    ts_eval_params_init(&p);
    p.pred = pred;
    p.truth = truth;
    p.label_opts = lo;
    p.classes = classes;
    p.tolerance = tol;
    p.rows = rows;
    return ts_eval_run(&p, r);
}

static void test_hand(void)
{
    const char *pred = tmp("hand_pred.tif"), *truth = tmp("hand_truth.tif");
    tu_expect(write_ids(pred, HW, HH, HGT, 32633, GDT_Byte, HPRED, 1, 255, CATS), "write pred");
    tu_expect(write_ids(truth, HW, HH, HGT, 32633, GDT_Byte, HTRUTH, 0, 0, NULL), "write truth");
    ts_eval_result r;
    if (!tu_expect_ok(eval(pred, truth, NULL, 0, 1, 0, &r), "eval hand case")) return;
    const ts_metrics *m = &r.metrics;
    /* Counted: 24 pixels - 1 prediction nodata (5,1) - 1 truth ignore (4,3) = 22.
     * Rows truth, columns prediction (class 3 "water" absent):
     *   truth 0: (0..2,0) -> 0 0 1; (0..2,1) -> 0 0 0; (2,2) -> 0      = [6 1 0 0]
     *   truth 1: (3..5,0) -> 1 1 1; (3..4,1) -> 1 1; (3..5,2) -> 1 2 1;
     *            (5,3) -> 1                                          = [0 8 1 0]
     *   truth 2: (0..1,2) -> 2 0; (0..3,3) -> 2 2 2 0                 = [2 0 4 0] */
    const int64_t want[16] = {6, 1, 0, 0, 0, 8, 1, 0, 2, 0, 4, 0, 0, 0, 0, 0};
    tu_expect(same_matrix(m, want, 4), "hand matrix");
    if (!same_matrix(m, want, 4)) print_matrix("got", m->confusion, m->classes);
    tu_expect(m->pixels == 22 && m->correct == 18, "22 pixels counted, 18 correct");
    tu_expect(r.pred_nodata_pixels == 1 && r.truth_ignored_pixels == 1, "1 nodata and 1 ignore excluded");
    tu_expect(strcmp(r.k_source, "category names") == 0 && m->classes == 4, "K = 4 from the category names");
    /* class 0: TP 6, FP 2 (col sum 8 - 6), FN 1 (row sum 7 - 6)
     *   IoU 6/9, precision 6/8, recall 6/7, F1 12/15
     * class 1: TP 8, FP 1, FN 1: IoU 8/10, precision 8/9, recall 8/9, F1 16/18
     * class 2: TP 4, FP 1, FN 2: IoU 4/7, precision 4/5, recall 4/6, F1 8/11 */
    const double iou[3] = {0.6666666666666666, 0.8, 0.5714285714285714};
    const double prec[3] = {0.75, 0.8888888888888888, 0.8};
    const double rec[3] = {0.8571428571428571, 0.8888888888888888, 0.6666666666666666};
    const double f1[3] = {0.8, 0.8888888888888888, 0.7272727272727273};
    for (int k = 0; k < 3; k++)
        tu_expect(near(m->cls[k].iou, iou[k]) && near(m->cls[k].precision, prec[k]) &&
                      near(m->cls[k].recall, rec[k]) && near(m->cls[k].f1, f1[k]),
                  "class %d: IoU %.17g P %.17g R %.17g F1 %.17g", k, m->cls[k].iou, m->cls[k].precision,
                  m->cls[k].recall, m->cls[k].f1);
    tu_expect(!m->cls[3].present && isnan(m->cls[3].iou), "class 3 absent: NaN");
    /* mIoU over the 3 present classes: (6/9 + 8/10 + 4/7) / 3 = 214/315 = 0.679365...
     * over all 4 with the absent one as 0: 214/420 = 0.509523...
     * OA = 18/22 = 0.818181...
     * kappa: pe = (7*8 + 9*9 + 6*5) / 22^2 = 167/484;
     *        (18/22 - 167/484) / (1 - 167/484) = 229/317 = 0.722397... */
    tu_expect(near(m->miou, 0.67936507936507937) && m->present == 3, "mIoU %.17g", m->miou);
    tu_expect(near(m->miou_all, 0.50952380952380949), "mIoU all %.17g", m->miou_all);
    tu_expect(near(m->oa, 0.81818181818181823), "OA %.17g", m->oa);
    tu_expect(near(m->kappa, 0.72239747634069396), "kappa %.17g", m->kappa);
    /* Areas at 100 m^2 a pixel: class 0 predicted 8 px = 800 m^2, reference 7 px = 700 m^2. */
    tu_expect(r.georeferenced && r.pixel_area == 100 && strcmp(r.area_unit, "m^2") == 0, "pixel area 100 m^2 (%g %s)",
              r.pixel_area, r.area_unit);
    tu_expect(m->cls[0].predicted == 8 && m->cls[0].support == 7 && m->cls[2].predicted == 5 && m->cls[2].support == 6,
              "per-class pixel counts");
    tu_expect(strcmp(r.class_names[1], "building") == 0 && strcmp(r.class_names[3], "water") == 0,
              "names from the categories");
    /* Boundary F1 equals ts_boundary_add on the whole scene as one tile. */
    ts_boundary b;
    uint8_t valid[HH * HW];
    for (int i = 0; i < HH * HW; i++) valid[i] = HPRED[i] != 255;
    tu_expect_ok(ts_boundary_init(&b, 4, 1), "boundary init");
    tu_expect_ok(ts_boundary_add(&b, HPRED, HTRUTH, valid, 1, HH, HW, 255), "boundary add");
    int same = 1;
    for (int k = 0; k < 4; k++)
        same &= m->cls[k].bf_pred == b.pred_total[k] && m->cls[k].bf_pred_matched == b.pred_matched[k] &&
                m->cls[k].bf_true == b.true_total[k] && m->cls[k].bf_true_matched == b.true_matched[k];
    tu_expect(same && m->has_boundary && m->bf_tolerance == 1, "boundary counts = whole scene");
    ts_boundary_free(&b);

    /* The readable report. */
    FILE *f = tmpfile();
    if (f) {
        ts_eval_format(f, &r);
        rewind(f);
        char out[8192] = "";
        size_t n = fread(out, 1, sizeof out - 1, f);
        out[n] = 0;
        fclose(f);
        tu_expect(strstr(out, "building") && strstr(out, "mIoU") && strstr(out, "kappa") && strstr(out, "m^2") &&
                      strstr(out, "800.00") && strstr(out, "700.00") && strstr(out, "boundary F1"),
                  "report:\n%s", out);
    }

    /* JSON: parseable, with the metrics' keys and ours. */
    ts_eval_params p;
    ts_eval_params_init(&p);
    p.pred = pred;
    p.truth = truth;
    const char *js = tmp("hand.json");
    tu_expect_ok(ts_eval_write_json(js, &r, &p, 0), "write JSON");
    FILE *jf = fopen(js, "rb");
    char text[65536] = "";
    size_t len = jf ? fread(text, 1, sizeof text - 1, jf) : 0;
    if (jf) fclose(jf);
    text[len] = 0;
    cJSON *root = cJSON_Parse(text);
    tu_expect(root != NULL, "the JSON parses");
    if (root) {
        const char *keys[] = {"classes", "pixels", "overall_accuracy", "kappa", "miou", "miou_all_classes",
                              "averaging", "per_class", "confusion_matrix", "boundary_f1", "inputs", "class_count",
                              "ignore_id", "excluded", "absent_classes", "tolerance_px", "area"};
        for (size_t k = 0; k < sizeof keys / sizeof *keys; k++)
            tu_expect(cJSON_HasObjectItem(root, keys[k]), "JSON key %s", keys[k]);
        const cJSON *miou = cJSON_GetObjectItem(root, "miou"), *kappa = cJSON_GetObjectItem(root, "kappa");
        tu_expect(cJSON_IsNumber(miou) && miou->valuedouble == m->miou && cJSON_IsNumber(kappa) &&
                      kappa->valuedouble == m->kappa,
                  "JSON scores round-trip");
        const cJSON *area = cJSON_GetObjectItem(root, "area");
        const cJSON *a0 = cJSON_GetArrayItem(cJSON_GetObjectItem(area, "per_class"), 0);
        tu_expect(a0 && cJSON_GetObjectItem(a0, "predicted_area")->valuedouble == 800 &&
                      cJSON_GetObjectItem(a0, "reference_area")->valuedouble == 700 &&
                      strcmp(cJSON_GetObjectItem(area, "unit")->valuestring, "m^2") == 0,
                  "JSON areas");
        const cJSON *ex = cJSON_GetObjectItem(root, "excluded");
        tu_expect(cJSON_GetObjectItem(ex, "prediction_nodata")->valueint == 1 &&
                      cJSON_GetObjectItem(ex, "truth_ignored")->valueint == 1,
                  "JSON excluded counts");
        const cJSON *in = cJSON_GetObjectItem(root, "inputs");
        tu_expect(strcmp(cJSON_GetObjectItem(in, "prediction")->valuestring, pred) == 0 &&
                      strcmp(cJSON_GetObjectItem(in, "truth_kind")->valuestring, "raster") == 0,
                  "JSON inputs");
        const cJSON *c3 = cJSON_GetArrayItem(cJSON_GetObjectItem(root, "per_class"), 3);
        tu_expect(cJSON_IsNull(cJSON_GetObjectItem(c3, "iou")),
                  "JSON: absent class iou null");
        cJSON_Delete(root);
    }
    tu_expect_error(ts_eval_write_json(js, &r, &p, 0), TS_ERR_INVALID_ARG, "existing JSON", js, "already exists",
                    "--overwrite", NULL);
    tu_expect_ok(ts_eval_write_json(js, &r, &p, 1), "JSON with overwrite");

    /* The confusion image: a PNG of the announced size, refused when it exists. */
    const char *png = tmp("hand.png");
    int w = 0, h = 0;
    tu_expect_ok(ts_eval_write_confusion_png(png, &r, 0, 0, &w, &h), "write PNG");
    GDALDatasetH ds = GDALOpen(png, GA_ReadOnly);
    tu_expect(ds && strcmp(GDALGetDriverShortName(GDALGetDatasetDriver(ds)), "PNG") == 0 &&
                  GDALGetRasterXSize(ds) == w && GDALGetRasterYSize(ds) == h && GDALGetRasterCount(ds) == 3 &&
                  w >= 4 * 48 && h >= 4 * 48,
              "PNG %dx%d readable", w, h);
    if (ds) {
        /* Cell (truth 1, prediction 1) holds 8/9 of its row: dark blue; (truth 0, prediction 2) nothing: white. */
        uint8_t rgb[3];
        /* The layout for 4 classes: 48 px cells, font scale 3, 12 px swatches. */
        int cell = 48, s = 3, pad = 4, sw = 12, gap = 2;
        int ox = pad + (3 * s) + pad + sw + gap, oy = pad + 5 * s + pad + sw + gap;
        int rd = GDALDatasetRasterIO(ds, GF_Read, ox + 1 + 1 * cell + 2, oy + 1 + 1 * cell + 2, 1, 1, rgb, 1, 1,
                                     GDT_Byte, 3, NULL, 3, 3, 1) == CE_None;
        tu_expect(rd && rgb[2] > rgb[0] && rgb[0] < 100, "diagonal cell is blue (%d,%d,%d)", rgb[0], rgb[1], rgb[2]);
        rd = GDALDatasetRasterIO(ds, GF_Read, ox + 1 + 2 * cell + 2, oy + 1 + 0 * cell + 2, 1, 1, rgb, 1, 1, GDT_Byte,
                                 3, NULL, 3, 3, 1) == CE_None;
        tu_expect(rd && rgb[0] == 255 && rgb[1] == 255 && rgb[2] == 255, "empty cell is white (%d,%d,%d)", rgb[0],
                  rgb[1], rgb[2]);
        GDALClose(ds);
    }
    tu_expect_error(ts_eval_write_confusion_png(png, &r, 0, 0, NULL, NULL), TS_ERR_INVALID_ARG, "existing PNG", png,
                    "already exists", "--overwrite", NULL);
    tu_expect_ok(ts_eval_write_confusion_png(png, &r, 12, 1, &w, &h), "PNG with overwrite, 12 px cells");
    ds = GDALOpen(png, GA_ReadOnly);
    tu_expect(ds && GDALGetRasterXSize(ds) == w && w < 4 * 48, "overwritten PNG %dx%d", w, h);
    if (ds) GDALClose(ds);
    ts_eval_result_free(&r);

    /* --classes 5: one more absent class; 2 refuses the prediction's id 2. */
    tu_expect_ok(eval(pred, truth, NULL, 5, 1, 0, &r), "eval --classes 5");
    tu_expect(r.metrics.classes == 5 && strcmp(r.k_source, "--classes") == 0 && r.metrics.present == 3 &&
                  near(r.metrics.miou, 0.67936507936507937),
              "K = 5 from --classes");
    ts_eval_result_free(&r);
    tu_expect_error(eval(pred, truth, NULL, 2, 1, 0, &r), TS_ERR_INVALID_ARG, "id >= K", pred, "id 2",
                    "col 0, row 2", "--classes", NULL);
    /* A truth id beyond the 4 category names, named with its place on the grid. */
    int32_t bad[HH * HW];
    memcpy(bad, HTRUTH, sizeof bad);
    bad[2 * HW + 3] = 5;
    const char *tbad = tmp("hand_truth_bad.tif");
    tu_expect(write_ids(tbad, HW, HH, HGT, 32633, GDT_Byte, bad, 0, 0, NULL), "write bad truth");
    tu_expect_error(eval(pred, tbad, NULL, 0, 1, 0, &r), TS_ERR_INVALID_ARG, "truth id >= K", tbad, "class id 5",
                    "col 3, row 2", "4 classes (from category names)", NULL);
    /* No category names: K = the largest id found + 1 = 3. */
    const char *plain = tmp("hand_plain.tif");
    tu_expect(write_ids(plain, HW, HH, HGT, 32633, GDT_Byte, HPRED, 1, 255, NULL), "write plain pred");
    tu_expect_ok(eval(plain, truth, NULL, 0, 1, 0, &r), "eval without categories");
    tu_expect(r.metrics.classes == 3 && strcmp(r.k_source, "largest id + 1") == 0 && same_matrix(&r.metrics,
              (const int64_t[9]){6, 1, 0, 0, 8, 1, 2, 0, 4}, 3) && strcmp(r.class_names[2], "class 2") == 0,
              "K = 3 from the largest id");
    ts_eval_result_free(&r);
}

/* ---- truth in another grid ---------------------------------------------------------------- */

static void test_other_grid(void)
{
    const char *pred = tmp("hand_pred.tif");
    /* The same truth at 5 m: every prediction pixel is 2x2 truth pixels of one value. */
    int32_t fine[HH * 2 * HW * 2];
    for (int y = 0; y < HH * 2; y++)
        for (int x = 0; x < HW * 2; x++) fine[y * HW * 2 + x] = HTRUTH[(y / 2) * HW + x / 2];
    const double fgt[6] = {500000.0, 5.0, 0.0, 4500000.0, 0.0, -5.0};
    const char *t5 = tmp("truth_5m.tif");
    tu_expect(write_ids(t5, HW * 2, HH * 2, fgt, 32633, GDT_Byte, fine, 1, 255, NULL), "write 5 m truth");
    ts_eval_result r;
    const int64_t want[16] = {6, 1, 0, 0, 0, 8, 1, 0, 2, 0, 4, 0, 0, 0, 0, 0};
    if (tu_expect_ok(eval(pred, t5, NULL, 0, 1, 0, &r), "eval 5 m truth")) {
        tu_expect(same_matrix(&r.metrics, want, 4) && r.truth_ignored_pixels == 1, "5 m truth: the hand matrix");
        ts_eval_result_free(&r);
    }

    /* A 40x30 prediction and a truth in EPSG:4326: the expected matrix is
     * GDALWarp -r near -et 0 of the truth onto the prediction grid, counted. */
    enum { W = 40, H = 30, K = 3 };
    const double pgt[6] = {500000.0, 10.0, 0.0, 4500000.0, 0.0, -10.0};
    int32_t *pv = malloc(sizeof(int32_t) * W * H), *tv = malloc(sizeof(int32_t) * W * H);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            tv[y * W + x] = (x / 9 + y / 7) % K;
            pv[y * W + x] = ((x + 1) / 9 + y / 7) % K;
        }
    pv[5] = 255;
    const char *p40 = tmp("pred40.tif"), *tutm = tmp("truth40_utm.tif"), *tgeo = tmp("truth40_4326.tif");
    tu_expect(write_ids(p40, W, H, pgt, 32633, GDT_Byte, pv, 1, 255, NULL), "write pred40");
    tu_expect(write_ids(tutm, W, H, pgt, 32633, GDT_Byte, tv, 1, 255, NULL), "write truth40");
    {
        GDALDatasetH src = GDALOpen(tutm, GA_ReadOnly);
        char *argv[] = {"-t_srs", "EPSG:4326", "-r", "near", "-of", "GTiff", NULL};
        GDALWarpAppOptions *o = GDALWarpAppOptionsNew(argv, NULL);
        int err = 0;
        GDALDatasetH d = GDALWarp(tgeo, NULL, 1, &src, o, &err);
        GDALWarpAppOptionsFree(o);
        tu_expect(d && !err, "warp the truth to EPSG:4326");
        if (d) GDALClose(d);
        GDALClose(src);
    }
    /* The reference: warped back onto the prediction's grid, outside the footprint = ignore. */
    int32_t *ref = malloc(sizeof(int32_t) * W * H * 2);
    {
        GDALDatasetH dst = GDALCreate(GDALGetDriverByName("MEM"), "", W, H, 2, GDT_Int32, NULL);
        char *w = wkt_of_epsg(32633);
        GDALSetGeoTransform(dst, (double *)pgt);
        GDALSetProjection(dst, w);
        free(w);
        GDALDatasetH src = GDALOpen(tgeo, GA_ReadOnly);
        char *argv[] = {"-r", "near", "-et", "0", "-dstalpha", NULL};
        GDALWarpAppOptions *o = GDALWarpAppOptionsNew(argv, NULL);
        int err = 0;
        GDALDatasetH d = GDALWarp(NULL, dst, 1, &src, o, &err);
        GDALWarpAppOptionsFree(o);
        tu_expect(d && !err && GDALDatasetRasterIO(dst, GF_Read, 0, 0, W, H, ref, W, H, GDT_Int32, 2, NULL, 0, 0, 0) ==
                                   CE_None,
                  "reference warp");
        for (int i = 0; i < W * H; i++)
            if (ref[W * H + i] == 0) ref[i] = 255;
        GDALClose(dst);
        GDALClose(src);
    }
    int64_t wantg[K * K];
    count_matrix(K, pv, ref, (size_t)W * H, wantg);
    if (tu_expect_ok(eval(p40, tgeo, NULL, K, 2, 8, &r), "eval EPSG:4326 truth")) {
        tu_expect(same_matrix(&r.metrics, wantg, K), "EPSG:4326 truth: the GDALWarp matrix");
        if (!same_matrix(&r.metrics, wantg, K)) {
            print_matrix("want", wantg, K);
            print_matrix("got", r.metrics.confusion, r.metrics.classes);
        }
        tu_expect(r.metrics.pixels > W * H / 2, "most pixels counted (%lld)", (long long)r.metrics.pixels);
        ts_eval_result_free(&r);
    }
    free(ref);

    /* Strip-height independence, and boundary F1 across strips equals the
     * whole scene as one tile, on the same-grid truth. */
    uint8_t *valid = malloc((size_t)W * H);
    for (int i = 0; i < W * H; i++) valid[i] = pv[i] != 255;
    const double tols[3] = {0, 1.5, 3};
    for (int k = 0; k < 3; k++) {
        ts_boundary whole;
        tu_expect_ok(ts_boundary_init(&whole, K, tols[k]), "init");
        tu_expect_ok(ts_boundary_add(&whole, pv, tv, valid, 1, H, W, 255), "whole");
        int64_t wantc[K * K];
        count_matrix(K, pv, tv, (size_t)W * H, wantc);
        const int rows[4] = {1, 7, 64, H};
        for (int s = 0; s < 4; s++) {
            if (!tu_expect_ok(eval(p40, tutm, NULL, K, tols[k], rows[s], &r), "eval strips")) continue;
            int same = same_matrix(&r.metrics, wantc, K);
            for (int c = 0; c < K; c++)
                same &= r.metrics.cls[c].bf_pred == whole.pred_total[c] &&
                        r.metrics.cls[c].bf_pred_matched == whole.pred_matched[c] &&
                        r.metrics.cls[c].bf_true == whole.true_total[c] &&
                        r.metrics.cls[c].bf_true_matched == whole.true_matched[c];
            tu_expect(same, "strips of %d rows, tolerance %g: matrix and boundary counts = whole scene", rows[s],
                      tols[k]);
            ts_eval_result_free(&r);
        }
        ts_boundary_free(&whole);
    }
    free(valid);

    /* Disjoint inputs: refused, naming both files and the extents. */
    const double far_gt[6] = {600000.0, 10.0, 0.0, 4600000.0, 0.0, -10.0};
    const char *tfar = tmp("truth_far.tif");
    tu_expect(write_ids(tfar, W, H, far_gt, 32633, GDT_Byte, tv, 1, 255, NULL), "write far truth");
    tu_expect_error(eval(p40, tfar, NULL, K, 2, 0, &r), TS_ERR_INVALID_ARG, "disjoint rasters", p40, tfar,
                    "do not overlap", "500000", "600000", "UTM zone 33N", NULL);

    /* A prediction without georeferencing: pixel space, a truth of the same size only. */
    const char *pnog = tmp("pred_nogeo.tif");
    tu_expect(write_ids(pnog, W, H, NULL, 0, GDT_Byte, pv, 1, 255, NULL), "write ungeoreferenced pred");
    if (tu_expect_ok(eval(pnog, tutm, NULL, K, 2, 0, &r), "ungeoreferenced prediction, same-size truth")) {
        int64_t wantc[K * K];
        count_matrix(K, pv, tv, (size_t)W * H, wantc);
        tu_expect(same_matrix(&r.metrics, wantc, K) && !r.georeferenced && strstr(r.warning, "no georeferencing") &&
                      strcmp(r.area_unit, "pixels") == 0 && r.pixel_area == 1,
                  "pixel space: same matrix, a warning, areas in pixels");
        ts_eval_result_free(&r);
    }
    tu_expect_error(eval(pnog, t5, NULL, 0, 2, 0, &r), TS_ERR_INVALID_ARG, "ungeoreferenced, other size", pnog, t5,
                    "no georeferencing", "12x8", NULL);
    free(pv);
    free(tv);
}

/* ---- vector truth ------------------------------------------------------------------------- */

static int write_gpkg(const char *path, const char *const *wkts, const int *cls, int n)
{
    GDALDatasetH ds = GDALCreate(GDALGetDriverByName("GPKG"), path, 0, 0, 0, GDT_Unknown, NULL);
    if (!ds) return 0;
    OGRSpatialReferenceH srs = OSRNewSpatialReference(NULL);
    OSRImportFromEPSG(srs, 32633);
    OGRLayerH lay = GDALDatasetCreateLayer(ds, "truth", srs, wkbPolygon, NULL);
    OSRDestroySpatialReference(srs);
    int ok = lay != NULL;
    OGRFieldDefnH fd = OGR_Fld_Create("class", OFTInteger);
    ok = ok && OGR_L_CreateField(lay, fd, TRUE) == OGRERR_NONE;
    OGR_Fld_Destroy(fd);
    for (int i = 0; ok && i < n; i++) {
        OGRFeatureH f = OGR_F_Create(OGR_L_GetLayerDefn(lay));
        OGRGeometryH g = NULL;
        char *w = (char *)wkts[i];
        ok = OGR_G_CreateFromWkt(&w, NULL, &g) == OGRERR_NONE;
        if (ok) {
            OGR_F_SetFieldInteger(f, 0, cls[i]);
            OGR_F_SetGeometryDirectly(f, g);
            ok = OGR_L_CreateFeature(lay, f) == OGRERR_NONE;
        }
        OGR_F_Destroy(f);
    }
    GDALClose(ds);
    return ok;
}

static void test_vector(void)
{
    const char *pred = tmp("hand_pred.tif"), *gpkg = tmp("truth.gpkg");
    /* Rectangles on pixel edges: class 1 over columns 3-5, all rows; class 2
     * over columns 0-1, rows 2-3; background 0 elsewhere:
     *   row 0: 0 0 0 1 1 1      row 2: 2 2 0 1 1 1
     *   row 1: 0 0 0 1 1 1      row 3: 2 2 0 1 1 1 */
    const char *wkts[2] = {
        "POLYGON ((500030 4500000,500060 4500000,500060 4499960,500030 4499960,500030 4500000))",
        "POLYGON ((500000 4499980,500020 4499980,500020 4499960,500000 4499960,500000 4499980))",
    };
    const int cls[2] = {1, 2};
    tu_expect(write_gpkg(gpkg, wkts, cls, 2), "write GPKG");
    ts_label_opts lo;
    ts_label_opts_init(&lo);
    lo.attribute = "class";
    ts_eval_result r;
    if (tu_expect_ok(eval(pred, gpkg, &lo, 0, 2, 3, &r), "eval vector truth")) {
        /* Against HPRED (nodata at (5,1)), 23 pixels:
         *   truth 0: (0..2,0) -> 0 0 1; (0..2,1) -> 0 0 0; (2,2) -> 0; (2,3) -> 2      = [6 1 1]
         *   truth 1: (3..5,0) -> 1 1 1; (3..4,1) -> 1 1; (3..5,2) -> 1 2 1;
         *            (3..5,3) -> 0 2 1                                                = [1 8 2]
         *   truth 2: (0..1,2) -> 2 0; (0..1,3) -> 2 2                                  = [1 0 3] */
        const int64_t want[16] = {6, 1, 1, 0, 1, 8, 2, 0, 1, 0, 3, 0, 0, 0, 0, 0};
        tu_expect(same_matrix(&r.metrics, want, 4) && r.truth_is_vector && r.metrics.pixels == 23,
                  "vector truth: the hand matrix");
        if (!same_matrix(&r.metrics, want, 4)) print_matrix("got", r.metrics.confusion, r.metrics.classes);
        /* OA = (6 + 8 + 3) / 23 */
        tu_expect(near(r.metrics.oa, 17.0 / 23.0), "vector OA 17/23");
        ts_eval_result_free(&r);
    }

    /* A triangle at arbitrary coordinates with ALL_TOUCHED: the matrix of GDALRasterize -at. */
    const char *tri = tmp("tri.gpkg");
    const char *twkt[1] = {"POLYGON ((500003.3 4499996.1,500051.7 4499988.4,500018.2 4499963.9,500003.3 4499996.1))"};
    const int tcls[1] = {2};
    tu_expect(write_gpkg(tri, twkt, tcls, 1), "write triangle");
    int32_t ref[HW * HH];
    {
        GDALDatasetH dst = GDALCreate(GDALGetDriverByName("MEM"), "", HW, HH, 1, GDT_Int32, NULL);
        char *w = wkt_of_epsg(32633);
        GDALSetGeoTransform(dst, (double *)HGT);
        GDALSetProjection(dst, w);
        free(w);
        GDALDatasetH src = GDALOpenEx(tri, GDAL_OF_VECTOR, NULL, NULL, NULL);
        char *argv[] = {"-a", "class", "-at", NULL};
        GDALRasterizeOptions *o = GDALRasterizeOptionsNew(argv, NULL);
        int err = 0;
        GDALDatasetH d = GDALRasterize(NULL, dst, src, o, &err);
        GDALRasterizeOptionsFree(o);
        tu_expect(d && !err &&
                      GDALRasterIO(GDALGetRasterBand(dst, 1), GF_Read, 0, 0, HW, HH, ref, HW, HH, GDT_Int32, 0, 0) ==
                          CE_None,
                  "reference rasterize");
        GDALClose(dst);
        GDALClose(src);
    }
    int64_t want[16];
    count_matrix(4, HPRED, ref, HW * HH, want);
    lo.all_touched = 1;
    if (tu_expect_ok(eval(pred, tri, &lo, 0, 2, 1, &r), "eval triangle, all touched")) {
        tu_expect(same_matrix(&r.metrics, want, 4), "triangle: the GDALRasterize -at matrix");
        ts_eval_result_free(&r);
    }

    /* A layer far from the prediction: refused, naming both. */
    const char *far = tmp("far.gpkg");
    const char *fwkt[1] = {"POLYGON ((700000 4000000,700100 4000000,700100 3999900,700000 4000000))"};
    tu_expect(write_gpkg(far, fwkt, tcls, 1), "write far layer");
    lo.all_touched = 0;
    tu_expect_error(eval(pred, far, &lo, 0, 2, 0, &r), TS_ERR_INVALID_ARG, "disjoint vector", pred, far,
                    "do not overlap", NULL);
    /* Without georeferencing a vector truth cannot be placed. */
    const char *pnog = tmp("pred_nogeo.tif");
    tu_expect_error(eval(pnog, gpkg, &lo, 0, 2, 0, &r), TS_ERR_INVALID_ARG, "ungeoreferenced, vector", pnog,
                    "no georeferencing", NULL);
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    ts_gdal_init();
    if (!tu_tmpdir("test_evaluate")) return 1;
    test_hand();
    test_other_grid();
    test_vector();
    tu_tmpdir_remove();
    ts_ctx_free(&ctx);
    return tu_finish("test_evaluate");
}
