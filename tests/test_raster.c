/* The raster source (io/raster.h): every file is made here, in a temporary
 * folder, with the GDAL C API (GTiff, COG, a VRT mosaic, MBTiles, MEM), so
 * the expected pixel of every read is known exactly from a formula. */
#include <cpl_conv.h>
#include <cpl_string.h>
#include <ftw.h>
#include <gdal.h>
#include <gdal_utils.h>
#include <math.h>
#include <ogr_srs_api.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/raster.h"
#include "tests/testutil.h"

static char tmpdir[256];

/* A path in the temporary folder (a few rotating buffers, so two can be live). */
static const char *tpath(const char *name)
{
    static char buf[8][512];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 512, "%s/%s", tmpdir, name);
    return p;
}

typedef double (*pix_fn)(int b, int x, int y);

/* A MEM dataset whose band b pixel (x, y) is f(b, x, y). */
static GDALDatasetH make_mem(int w, int h, int nb, GDALDataType t, pix_fn f)
{
    GDALDatasetH ds = GDALCreate(GDALGetDriverByName("MEM"), "", w, h, nb, t, NULL);
    if (!ds) return NULL;
    double *buf = malloc((size_t)w * h * sizeof(double));
    for (int b = 1; b <= nb; b++) {
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++) buf[(size_t)y * w + x] = f(b, x, y);
        if (GDALRasterIO(GDALGetRasterBand(ds, b), GF_Write, 0, 0, w, h, buf, w, h, GDT_Float64, 0, 0) != CE_None) {
            GDALClose(ds);
            ds = NULL;
            break;
        }
    }
    free(buf);
    return ds;
}

static void set_geo(GDALDatasetH ds, double x0, double y0, double rx, double ry, int epsg)
{
    double gt[6] = {x0, rx, 0, y0, 0, -ry};
    OGRSpatialReferenceH srs = OSRNewSpatialReference(NULL);
    char *wkt = NULL;
    int ok = GDALSetGeoTransform(ds, gt) == CE_None && OSRImportFromEPSG(srs, epsg) == OGRERR_NONE &&
             OSRExportToWkt(srs, &wkt) == OGRERR_NONE && GDALSetProjection(ds, wkt) == CE_None;
    tu_expect(ok, "raster: set geotransform/CRS EPSG:%d on a test dataset", epsg);
    CPLFree(wkt);
    OSRDestroySpatialReference(srs);
}

/* Copies src to path with driver (and creation options), closing the copy. */
static int save_as(GDALDatasetH src, const char *driver, const char *path, const char *const *opts)
{
    GDALDatasetH d = GDALCreateCopy(GDALGetDriverByName(driver), path, src, FALSE, (CSLConstList)opts, NULL, NULL);
    tu_expect(d != NULL, "raster: writing %s test file %s (%s)", driver, path, CPLGetLastErrorMsg());
    if (!d) return 0;
    GDALClose(d);
    return 1;
}

static ts_raster *open_ok(const char *path, const ts_raster_opts *o, const char *what)
{
    ts_raster *r = NULL;
    if (!tu_expect_ok(ts_raster_open(path, o, &r), what)) return NULL;
    return r;
}

/* Reads window w and checks every channel against f on the listed bands
 * (exact, or within tol), and that every pixel is valid. */
static void check_read(ts_raster *r, ts_window w, const int *bands, int nb, pix_fn f, double tol, const char *what)
{
    const size_t plane = (size_t)w.width * w.height;
    float *out = malloc(plane * nb * sizeof(float));
    uint8_t *valid = malloc(plane);
    if (tu_expect_ok(ts_raster_read(r, &w, out, valid), what)) {
        double worst = 0;
        size_t bad = 0, nvalid = 0, at = 0;
        for (int c = 0; c < nb; c++)
            for (int y = 0; y < w.height; y++)
                for (int x = 0; x < w.width; x++) {
                    const size_t i = (size_t)c * plane + (size_t)y * w.width + x;
                    const double want = f(bands[c], (int)w.col_off + x, (int)w.row_off + y);
                    const double e = fabs(out[i] - want);
                    if (e > worst) worst = e, at = i;
                    bad += e > tol;
                }
        for (size_t i = 0; i < plane; i++) nvalid += valid[i];
        tu_expect(bad == 0 && nvalid == plane,
                  "%s: window %dx%d at (%lld,%lld): %zu wrong (worst %g at %zu), %zu/%zu valid", what, w.width,
                  w.height, (long long)w.col_off, (long long)w.row_off, bad, worst, at, nvalid, plane);
    }
    free(out);
    free(valid);
}

/* ---- pixel patterns ------------------------------------------------------------ */
static double pat_u8(int b, int x, int y) { return (x * 7 + y * 13 + b * 31) % 256; }
static double pat_u16(int b, int x, int y) { return (x * 1013 + y * 7919 + b * 3001) % 65536; }
static double pat_i16(int b, int x, int y) { return (x * 1013 + y * 7919 + b * 3001) % 65536 - 32768; }
static double pat_f32(int b, int x, int y) { return x * 0.5 - y * 0.25 + b * 100.0 + 0.125; }
static double pat_i32(int b, int x, int y) { return (x - 20) * 100003 + y * 7 - b; }

/* ---- data types, band selection, grid -------------------------------------------- */
static void test_dtypes(void)
{
    struct {
        GDALDataType t;
        pix_fn f;
        const char *name;
    } cases[] = {{GDT_Byte, pat_u8, "uint8"},
                 {GDT_UInt16, pat_u16, "uint16"},
                 {GDT_Int16, pat_i16, "int16"},
                 {GDT_Float32, pat_f32, "float32"},
                 {GDT_Int32, pat_i32, "int32"}};
    const char *tiled[] = {"TILED=YES", "BLOCKXSIZE=16", "BLOCKYSIZE=16", NULL};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        GDALDatasetH m = make_mem(37, 29, 3, cases[k].t, cases[k].f);
        set_geo(m, 500000, 6000000, 10, 10, 32633);
        char name[64], what[128];
        snprintf(name, sizeof name, "dtype_%s.tif", cases[k].name);
        const char *path = tpath(name);
        int ok = save_as(m, "GTiff", path, k % 2 ? tiled : NULL);
        GDALClose(m);
        if (!ok) continue;
        snprintf(what, sizeof what, "raster %s: default bands", cases[k].name);
        ts_raster *r = open_ok(path, NULL, what);
        if (!r) continue;
        const int all[] = {1, 2, 3};
        tu_expect(ts_raster_channels(r) == 3, "%s: 3 channels, got %d", what, ts_raster_channels(r));
        check_read(r, (ts_window){5, 3, 17, 11}, all, 3, cases[k].f, 0, what);
        check_read(r, (ts_window){0, 0, 37, 29}, all, 3, cases[k].f, 0, what);
        check_read(r, (ts_window){36, 28, 1, 1}, all, 3, cases[k].f, 0, what);
        ts_raster_close(r);

        const int sel[] = {3, 1};
        snprintf(what, sizeof what, "raster %s: bands 3,1", cases[k].name);
        r = open_ok(path, &(ts_raster_opts){.bands = sel, .nbands = 2}, what);
        if (!r) continue;
        tu_expect(ts_raster_channels(r) == 2 && ts_raster_channel_band(r, 0) == 3 && ts_raster_channel_band(r, 1) == 1,
                  "%s: channels map to bands 3, 1", what);
        check_read(r, (ts_window){7, 1, 13, 27}, sel, 2, cases[k].f, 0, what);
        if (k == 0) {
            ts_grid g;
            if (tu_expect_ok(ts_raster_grid(r, &g), "raster: grid")) {
                tu_expect(g.width == 37 && g.height == 29 && g.gt[0] == 500000 && g.gt[1] == 10 && g.gt[2] == 0 &&
                              g.gt[3] == 6000000 && g.gt[4] == 0 && g.gt[5] == -10,
                          "raster: grid size and geotransform (%lldx%lld, %g %g %g %g %g %g)", (long long)g.width,
                          (long long)g.height, g.gt[0], g.gt[1], g.gt[2], g.gt[3], g.gt[4], g.gt[5]);
                tu_expect(g.crs_wkt && strstr(g.crs_wkt, "UTM zone 33N") && strstr(g.crs_wkt, "32633"),
                          "raster: grid CRS is EPSG:32633 (%s)", g.crs_wkt ? g.crs_wkt : "none");
                ts_grid_free(&g);
            }
            tu_expect(access(tpath("dtype_uint8.tif.aux.xml"), F_OK) != 0, "raster: no .aux.xml written");
        }
        ts_raster_close(r);
    }
}

/* ---- normalization --------------------------------------------------------------- */
static double pat_norm(int b, int x, int y)
{
    (void)b;
    if ((x + 3 * y) % 17 == 0) return 65535; /* nodata */
    return (x * 37 + y * 11) % 1000;
}

static int cmp_d(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void test_norm(void)
{
    const int W = 45, H = 31;
    GDALDatasetH m = make_mem(W, H, 1, GDT_UInt16, pat_norm);
    tu_expect(GDALSetRasterNoDataValue(GDALGetRasterBand(m, 1), 65535) == CE_None, "norm: set nodata");
    const char *path = tpath("norm.tif");
    int ok = save_as(m, "GTiff", path, NULL);
    GDALClose(m);
    if (!ok) return;

    /* Reference statistics over the valid pixels, in double. */
    double *v = malloc(sizeof(double) * W * H), sum = 0, ss = 0;
    int n = 0;
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            if (pat_norm(1, x, y) != 65535) v[n++] = pat_norm(1, x, y), sum += v[n - 1];
    const double mean = sum / n;
    for (int i = 0; i < n; i++) ss += (v[i] - mean) * (v[i] - mean);
    const double sd = sqrt(ss / n);
    qsort(v, (size_t)n, sizeof(double), cmp_d);
    const double p2 = v[(int)(0.02 * n)], p98 = v[(int)(0.98 * n)], vmin = v[0], vmax = v[n - 1];
    free(v);

    const int bands[] = {1, 1, 1, 1, 1, 1, 1};
    const ts_band_norm norms[] = {
        {.kind = TS_NORM_NONE},
        {.kind = TS_NORM_SCALE, .scale = 1e-4, .offset = 0.5},
        {.kind = TS_NORM_MEANSTD, .mean = 100, .std = 50},
        {.kind = TS_NORM_MEANSTD_STATS},
        {.kind = TS_NORM_MINMAX_STATS},
        {.kind = TS_NORM_PERCENTILE_STATS, .pct_lo = 2, .pct_hi = 98},
        {.kind = TS_NORM_MINMAX, .min = 200, .max = 700},
    };
    const int C = 7;
    ts_raster_opts o = {.bands = bands, .nbands = C, .norm = norms, .nnorm = C};
    ts_raster *r = open_ok(path, &o, "norm: open with every mode");
    if (!r) return;
    ts_band_norm got[7];
    ts_band_stats st[7];
    for (int c = 0; c < C; c++) {
        tu_expect_ok(ts_raster_norm(r, c, &got[c]), "norm: ts_raster_norm");
        tu_expect_ok(ts_raster_stats(r, c, &st[c]), "norm: ts_raster_stats");
    }
    tu_expect(st[3].count == n && !st[3].approx, "norm: statistics over %d valid pixels, got %lld (approx %d)", n,
              (long long)st[3].count, st[3].approx);
    tu_expect(got[3].kind == TS_NORM_MEANSTD && fabs(got[3].mean - mean) < 1e-9 && fabs(got[3].std - sd) < 1e-9,
              "norm: computed mean/std %g/%g, want %g/%g", got[3].mean, got[3].std, mean, sd);
    tu_expect(got[4].kind == TS_NORM_MINMAX && got[4].min == vmin && got[4].max == vmax,
              "norm: computed min/max %g/%g, want %g/%g", got[4].min, got[4].max, vmin, vmax);
    tu_expect(got[5].kind == TS_NORM_MINMAX && fabs(got[5].min - p2) <= 1.0 && fabs(got[5].max - p98) <= 1.0 &&
                  got[5].pct_lo == 2 && got[5].pct_hi == 98 && st[5].pct_lo == got[5].min,
              "norm: 2/98 percentiles %g/%g, want %g/%g within 1", got[5].min, got[5].max, p2, p98);
    tu_expect(got[1].kind == TS_NORM_SCALE && got[2].kind == TS_NORM_MEANSTD && got[6].kind == TS_NORM_MINMAX,
              "norm: given kinds kept");

    const ts_window w = {3, 2, 40, 27};
    const size_t plane = (size_t)w.width * w.height;
    float *out = malloc(plane * C * sizeof(float));
    uint8_t *valid = malloc(plane);
    if (tu_expect_ok(ts_raster_read(r, &w, out, valid), "norm: read")) {
        int bad = 0, badv = 0;
        for (int y = 0; y < w.height; y++)
            for (int x = 0; x < w.width; x++) {
                const size_t i = (size_t)y * w.width + x;
                const double raw = pat_norm(1, x + 3, y + 2);
                const int isvalid = raw != 65535;
                badv += valid[i] != isvalid;
                for (int c = 0; c < C; c++) {
                    double want = 0;
                    if (isvalid) {
                        const ts_band_norm *g = &got[c];
                        switch (g->kind) {
                        case TS_NORM_NONE: want = raw; break;
                        case TS_NORM_SCALE: want = raw * g->scale + g->offset; break;
                        case TS_NORM_MEANSTD: want = (raw - g->mean) / g->std; break;
                        default: want = (fmin(fmax(raw, g->min), g->max) - g->min) / (g->max - g->min); break;
                        }
                    }
                    bad += fabs(out[(size_t)c * plane + i] - want) > 1e-5 * (1 + fabs(want));
                }
            }
        tu_expect(badv == 0, "norm: valid mask from nodata 65535 (%d wrong)", badv);
        tu_expect(bad == 0, "norm: normalized values, invalid pixels 0 (%d wrong)", bad);
    }
    free(out);
    free(valid);

    /* A clone reads the same and keeps the resolved values (no new statistics). */
    ts_raster *c2 = NULL;
    if (tu_expect_ok(ts_raster_clone(r, &c2), "norm: clone")) {
        ts_band_norm g2;
        ts_band_stats s2;
        tu_expect(!ts_raster_norm(c2, 5, &g2) && memcmp(&g2, &got[5], sizeof g2) == 0 && !ts_raster_stats(c2, 3, &s2) &&
                      s2.count == st[3].count,
                  "norm: clone keeps normalization and statistics");
        float *a = malloc(plane * C * sizeof(float)), *b = malloc(plane * C * sizeof(float));
        tu_expect(!ts_raster_read(r, &w, a, NULL) && !ts_raster_read(c2, &w, b, NULL) &&
                      memcmp(a, b, plane * C * sizeof(float)) == 0,
                  "norm: clone reads the same floats");
        free(a);
        free(b);
        ts_raster_close(c2);
    }
    ts_raster_close(r);
    /* Statistics are ours, streamed: GDAL never stores them next to the file. */
    tu_expect(access(tpath("norm.tif.aux.xml"), F_OK) != 0, "norm: statistics wrote no .aux.xml");

    /* Errors: count mismatch, bad given values, bad percentiles. */
    tu_expect_error(ts_raster_open(path, &(ts_raster_opts){.bands = bands, .nbands = 2, .norm = norms, .nnorm = 3}, &r),
                    TS_ERR_INVALID_ARG, "norm: 3 norms for 2 channels", "norm.tif", "3 normalizations", "2 channels",
                    (char *)NULL);
    tu_expect_error(
        ts_raster_open(path, &(ts_raster_opts){.norm = &(ts_band_norm){.kind = TS_NORM_MEANSTD}, .nnorm = 1}, &r),
        TS_ERR_INVALID_ARG, "norm: std 0", "norm.tif", "std > 0", (char *)NULL);
    tu_expect_error(
        ts_raster_open(
            path,
            &(ts_raster_opts){.norm = &(ts_band_norm){.kind = TS_NORM_PERCENTILE_STATS, .pct_lo = 50, .pct_hi = 20},
                              .nnorm = 1},
            &r),
        TS_ERR_INVALID_ARG, "norm: percentiles 50/20", "percentiles", (char *)NULL);
    tu_expect_error(ts_raster_open(path, &(ts_raster_opts){.nodata = 0, .stats_sample_pixels = -1}, &r),
                    TS_ERR_INVALID_ARG, "norm: negative sample size", "stats_sample_pixels", (char *)NULL);
}

/* Sampled statistics: evenly spaced strips of whole blocks. */
static double pat_row(int b, int x, int y)
{
    (void)b, (void)x;
    return y;
}

static void test_stats_sample(void)
{
    GDALDatasetH m = make_mem(64, 1024, 1, GDT_UInt16, pat_row);
    const char *path = tpath("tall.tif");
    const char *tiled[] = {"TILED=YES", "BLOCKXSIZE=32", "BLOCKYSIZE=32", NULL};
    int ok = save_as(m, "GTiff", path, tiled);
    GDALClose(m);
    if (!ok) return;
    const ts_band_norm ms = {.kind = TS_NORM_MEANSTD_STATS};
    ts_raster *r = open_ok(path, &(ts_raster_opts){.norm = &ms, .nnorm = 1}, "stats: exact");
    ts_band_stats s;
    if (r && tu_expect_ok(ts_raster_stats(r, 0, &s), "stats: exact"))
        tu_expect(s.count == 64 * 1024 && !s.approx && s.mean == 511.5 && s.min == 0 && s.max == 1023,
                  "stats: exact count %lld mean %g", (long long)s.count, s.mean);
    ts_raster_close(r);
    r = open_ok(path, &(ts_raster_opts){.norm = &ms, .nnorm = 1, .stats_sample_pixels = 4 * 64 * 32}, "stats: sampled");
    if (r && tu_expect_ok(ts_raster_stats(r, 0, &s), "stats: sampled"))
        tu_expect(s.count == 4 * 64 * 32 && s.approx && fabs(s.mean - 511.5) < 30,
                  "stats: 4 sampled strips, count %lld, mean %g (exact 511.5)", (long long)s.count, s.mean);
    ts_raster_close(r);
}

/* ---- index bands ------------------------------------------------------------------- */
static double pat_ms(int b, int x, int y)
{
    /* blue, green, red, nir; at x == y the red and nir are 0 (NDVI undefined). */
    if (x == y && (b == 3 || b == 4)) return 0;
    if (x == 2 * y && (b == 2 || b == 4)) return 0; /* NDWI undefined */
    switch (b) {
    case 1: return 100 + x;
    case 2: return 200 + 3 * x + y;
    case 3: return 300 + x * y % 50;
    default: return 900 + 5 * y - x;
    }
}

static void test_index(void)
{
    const int W = 23, H = 19;
    GDALDatasetH m = make_mem(W, H, 4, GDT_UInt16, pat_ms);
    /* red and green found by colour interpretation, nir by description. */
    int ok = GDALSetRasterColorInterpretation(GDALGetRasterBand(m, 2), GCI_GreenBand) == CE_None &&
             GDALSetRasterColorInterpretation(GDALGetRasterBand(m, 3), GCI_RedBand) == CE_None;
    GDALSetDescription(GDALGetRasterBand(m, 4), "NIR");
    GDALSetDescription(GDALGetRasterBand(m, 1), "coastal");
    tu_expect(ok, "index: set colour interpretations");
    const char *path = tpath("ms.tif");
    ok = save_as(m, "GTiff", path, (const char *const[]){"PHOTOMETRIC=MINISBLACK", NULL});
    GDALClose(m);
    if (!ok) return;
    const int sel[] = {3};
    const ts_index_spec idx[] = {{.kind = TS_INDEX_NDVI},
                                 {.kind = TS_INDEX_NDWI, .green = {2, NULL}, .nir = {4, NULL}}};
    ts_raster *r = open_ok(path, &(ts_raster_opts){.bands = sel, .nbands = 1, .indices = idx, .nindices = 2},
                           "index: open NDVI by name, NDWI by number");
    if (!r) return;
    tu_expect(ts_raster_channels(r) == 3 && strcmp(ts_raster_channel_name(r, 1), "NDVI") == 0 &&
                  strcmp(ts_raster_channel_name(r, 2), "NDWI") == 0 && ts_raster_channel_band(r, 1) == 0,
              "index: channels band 3, NDVI, NDWI");
    const ts_window w = {1, 1, 21, 17};
    const size_t plane = (size_t)w.width * w.height;
    float out[3 * 21 * 17];
    uint8_t valid[21 * 17];
    if (tu_expect_ok(ts_raster_read(r, &w, out, valid), "index: read")) {
        int bad = 0, nbadv = 0, ninv = 0;
        for (int y = 0; y < w.height; y++)
            for (int x = 0; x < w.width; x++) {
                const int X = x + 1, Y = y + 1;
                const size_t i = (size_t)y * w.width + x;
                const double g = pat_ms(2, X, Y), rd = pat_ms(3, X, Y), n = pat_ms(4, X, Y);
                const int v = (n + rd != 0) && (g + n != 0);
                ninv += !v;
                nbadv += valid[i] != v;
                const double want[3] = {v ? rd : 0, v ? (n - rd) / (n + rd) : 0, v ? (g - n) / (g + n) : 0};
                for (int c = 0; c < 3; c++) bad += fabs(out[c * plane + i] - want[c]) > 1e-6;
            }
        tu_expect(bad == 0 && nbadv == 0 && ninv > 0,
                  "index: NDVI/NDWI values (%d wrong), zero denominators invalid "
                  "(%d wrong of %d)",
                  bad, nbadv, ninv);
    }
    ts_raster_close(r);
    /* An index band whose name matches nothing lists the bands there are. */
    const ts_index_spec bad = {.kind = TS_INDEX_NDVI, .nir = {0, "swir"}};
    tu_expect_error(ts_raster_open(path, &(ts_raster_opts){.indices = &bad, .nindices = 1}, &r), TS_ERR_INVALID_ARG,
                    "index: unknown band name", "ms.tif", "NDVI", "'swir'", "NIR", (char *)NULL);
    const ts_index_spec badnum = {.kind = TS_INDEX_NDWI, .green = {7, NULL}};
    tu_expect_error(ts_raster_open(path, &(ts_raster_opts){.indices = &badnum, .nindices = 1}, &r), TS_ERR_INVALID_ARG,
                    "index: band 7 of 4", "ms.tif", "band 7", "4 bands", (char *)NULL);
}

/* ---- nodata, masks, alpha, NaN, padding --------------------------------------------- */
static double pat_nd(int b, int x, int y)
{
    if (b == 2 && (x + y) % 5 == 0) return 0; /* band 2's nodata */
    return 1 + (x * 3 + y * 5 + b) % 200;
}
static double pat_nan(int b, int x, int y) { return (x * y) % 7 == 3 ? NAN : b + x * 0.5 + y; }

/* Counts pixels whose validity differs from want(x, y), and valid pixels
 * whose channel-0 value differs from f(band0, x, y), invalid ones from 0. */
static void check_mask(ts_raster *r, ts_window w, int (*want)(int x, int y), pix_fn f, int band0, const char *what)
{
    const size_t plane = (size_t)w.width * w.height;
    const int C = ts_raster_channels(r);
    float *out = malloc(plane * C * sizeof(float));
    uint8_t *valid = malloc(plane);
    if (tu_expect_ok(ts_raster_read(r, &w, out, valid), what)) {
        int badv = 0, bad = 0, ninv = 0;
        for (int y = 0; y < w.height; y++)
            for (int x = 0; x < w.width; x++) {
                const size_t i = (size_t)y * w.width + x;
                const int X = (int)w.col_off + x, Y = (int)w.row_off + y, v = want(X, Y);
                ninv += !v;
                badv += valid[i] != v;
                bad += out[i] != (v ? (float)f(band0, X, Y) : 0.0f);
                for (int c = 1; c < C; c++) bad += !v && out[c * plane + i] != 0.0f;
            }
        tu_expect(badv == 0 && bad == 0, "%s: %d valid flags wrong, %d values wrong (%d invalid expected)", what, badv,
                  bad, ninv);
    }
    free(out);
    free(valid);
}

static int all_valid(int x, int y) { return (void)x, (void)y, 1; }
static int nd_valid(int x, int y) { return (x + y) % 5 != 0; }
static int rect_valid(int x, int y) { return !(x >= 4 && x < 12 && y >= 6 && y < 9); }
static int nan_valid(int x, int y) { return (x * y) % 7 != 3; }
static int inside_valid(int x, int y) { return x >= 0 && y >= 0 && x < 30 && y < 20; }
static int nd_and_inside(int x, int y) { return nd_valid(x, y) && inside_valid(x, y); }
static double pat_nd_pad(int b, int x, int y) { return inside_valid(x, y) ? pat_nd(b, x, y) : 0; }

static void test_masks(void)
{
    /* Per-band nodata: only bands that are read count. */
    GDALDatasetH m = make_mem(30, 20, 2, GDT_Byte, pat_nd);
    tu_expect(GDALSetRasterNoDataValue(GDALGetRasterBand(m, 2), 0) == CE_None, "mask: set nodata");
    const char *nd = tpath("nodata.tif");
    int ok = save_as(m, "GTiff", nd, NULL);
    GDALClose(m);
    if (ok) {
        ts_raster *r = open_ok(nd, &(ts_raster_opts){.bands = (int[]){1}, .nbands = 1}, "mask: band 1 only");
        if (r) check_mask(r, (ts_window){2, 3, 25, 15}, all_valid, pat_nd, 1, "mask: band 1 has no nodata");
        ts_raster_close(r);
        r = open_ok(nd, NULL, "mask: bands 1, 2");
        if (r)
            check_mask(r, (ts_window){2, 3, 25, 15}, nd_valid, pat_nd, 1, "mask: band 2 nodata invalidates the pixel");
        ts_raster_close(r);
        r = open_ok(nd, &(ts_raster_opts){.ignore_masks = 1}, "mask: ignore_masks");
        if (r) check_mask(r, (ts_window){2, 3, 25, 15}, all_valid, pat_nd, 1, "mask: ignore_masks");
        ts_raster_close(r);
        /* Padding: outside pixels are 0 and invalid, inside ones as usual. */
        r = open_ok(nd, &(ts_raster_opts){.pad = 1}, "mask: pad");
        if (r) {
            check_mask(r, (ts_window){-3, -2, 10, 8}, nd_and_inside, pat_nd_pad, 1, "mask: pad top-left");
            check_mask(r, (ts_window){25, 15, 10, 9}, nd_and_inside, pat_nd_pad, 1, "mask: pad bottom-right");
            check_mask(r, (ts_window){40, 0, 4, 4}, nd_and_inside, pat_nd_pad, 1, "mask: pad wholly outside");
        }
        ts_raster_close(r);
        /* Override nodata: value 7 in band 1 becomes nodata (band 2's own is replaced). */
        r = open_ok(nd, &(ts_raster_opts){.bands = (int[]){1}, .nbands = 1, .has_nodata = 1, .nodata = 7},
                    "mask: override nodata");
        if (r) {
            float out[30 * 20];
            uint8_t valid[30 * 20];
            int bad = 0;
            if (tu_expect_ok(ts_raster_read(r, &(ts_window){0, 0, 30, 20}, out, valid), "mask: override read"))
                for (int i = 0; i < 600; i++) bad += valid[i] != (pat_nd(1, i % 30, i / 30) != 7);
            tu_expect(bad == 0, "mask: override nodata 7 (%d wrong)", bad);
        }
        ts_raster_close(r);
    }

    /* A per-dataset mask (GTiff internal mask). */
    m = GDALCreate(GDALGetDriverByName("GTiff"), tpath("pdmask.tif"), 30, 20, 3, GDT_Byte, NULL);
    ok = m != NULL;
    for (int b = 1; ok && b <= 3; b++) {
        GDALDatasetH s = make_mem(30, 20, 3, GDT_Byte, pat_nd);
        uint8_t buf[600];
        ok = s &&
             GDALRasterIO(GDALGetRasterBand(s, b), GF_Read, 0, 0, 30, 20, buf, 30, 20, GDT_Byte, 0, 0) == CE_None &&
             GDALRasterIO(GDALGetRasterBand(m, b), GF_Write, 0, 0, 30, 20, buf, 30, 20, GDT_Byte, 0, 0) == CE_None;
        if (s) GDALClose(s);
    }
    ok = ok && GDALCreateDatasetMaskBand(m, GMF_PER_DATASET) == CE_None;
    if (ok) {
        uint8_t mask[600];
        for (int i = 0; i < 600; i++) mask[i] = rect_valid(i % 30, i / 30) ? 255 : 0;
        ok = GDALRasterIO(GDALGetMaskBand(GDALGetRasterBand(m, 1)), GF_Write, 0, 0, 30, 20, mask, 30, 20, GDT_Byte, 0,
                          0) == CE_None;
    }
    if (m) GDALClose(m);
    tu_expect(ok, "mask: writing a GTiff with a per-dataset mask (%s)", CPLGetLastErrorMsg());
    if (ok) {
        ts_raster *r = open_ok(tpath("pdmask.tif"), &(ts_raster_opts){.bands = (int[]){3, 1}, .nbands = 2},
                               "mask: per-dataset mask");
        if (r) check_mask(r, (ts_window){1, 1, 28, 18}, rect_valid, pat_nd, 3, "mask: per-dataset mask");
        ts_raster_close(r);
    }

    /* RGBA: the alpha band is the mask and not a default channel. */
    m = make_mem(30, 20, 4, GDT_Byte, pat_u8);
    uint8_t alpha[600];
    for (int i = 0; i < 600; i++) alpha[i] = rect_valid(i % 30, i / 30) ? (i % 2 ? 255 : 1) : 0;
    ok = m && GDALRasterIO(GDALGetRasterBand(m, 4), GF_Write, 0, 0, 30, 20, alpha, 30, 20, GDT_Byte, 0, 0) == CE_None;
    if (ok) ok = save_as(m, "GTiff", tpath("rgba.tif"), (const char *const[]){"PHOTOMETRIC=RGB", "ALPHA=YES", NULL});
    if (m) GDALClose(m);
    if (ok) {
        ts_raster *r = open_ok(tpath("rgba.tif"), NULL, "mask: RGBA");
        if (r) {
            tu_expect(ts_raster_channels(r) == 3, "mask: RGBA has 3 default channels, got %d", ts_raster_channels(r));
            check_mask(r, (ts_window){0, 0, 30, 20}, rect_valid, pat_u8, 1, "mask: alpha band");
        }
        ts_raster_close(r);
    }

    /* NaN is never valid. */
    m = make_mem(30, 20, 2, GDT_Float32, pat_nan);
    ok = m && save_as(m, "GTiff", tpath("nan.tif"), NULL);
    if (m) GDALClose(m);
    if (ok) {
        ts_raster *r = open_ok(tpath("nan.tif"), NULL, "mask: NaN");
        if (r) check_mask(r, (ts_window){3, 2, 20, 17}, nan_valid, pat_nan, 1, "mask: NaN pixels invalid");
        ts_raster_close(r);
    }
}

/* ---- VRT mosaic, COG, MBTiles ------------------------------------------------------------- */
static void test_formats(void)
{
    /* A VRT mosaic of 4 GeoTIFF tiles cut from one 60x50 pattern. */
    const int W = 60, H = 50, TW = 27, TH = 22;
    GDALDatasetH full = make_mem(W, H, 2, GDT_UInt16, pat_u16);
    char *names[4];
    int ok = full != NULL;
    for (int t = 0; ok && t < 4; t++) {
        const int x0 = t % 2 ? TW : 0, y0 = t / 2 ? TH : 0, w = t % 2 ? W - TW : TW, h = t / 2 ? H - TH : TH;
        char n[32];
        snprintf(n, sizeof n, "tile%d.tif", t);
        names[t] = strdup(tpath(n));
        GDALDatasetH s = GDALCreate(GDALGetDriverByName("GTiff"), names[t], w, h, 2, GDT_UInt16, NULL);
        uint16_t *buf = malloc(sizeof(uint16_t) * w * h * 2);
        ok = s &&
             GDALDatasetRasterIO(full, GF_Read, x0, y0, w, h, buf, w, h, GDT_UInt16, 2, NULL, 0, 0, 0) == CE_None &&
             GDALDatasetRasterIO(s, GF_Write, 0, 0, w, h, buf, w, h, GDT_UInt16, 2, NULL, 0, 0, 0) == CE_None;
        if (s) set_geo(s, 300000 + x0 * 2.0, 5000000 - y0 * 2.0, 2, 2, 32631);
        free(buf);
        if (s) GDALClose(s);
    }
    tu_expect(ok, "formats: writing 4 tiles");
    if (ok) {
        int usage = 0;
        const char *vrt = tpath("mosaic.vrt");
        GDALDatasetH v = GDALBuildVRT(vrt, 4, NULL, (const char *const *)names, NULL, &usage);
        tu_expect(v != NULL, "formats: GDALBuildVRT (%s)", CPLGetLastErrorMsg());
        if (v) GDALClose(v);
        FILE *f = fopen(vrt, "rb");
        char before[16384] = {0}, after[16384] = {0};
        size_t nb = f ? fread(before, 1, sizeof before - 1, f) : 0;
        if (f) fclose(f);
        /* Statistics on a VRT must not rewrite it. */
        const ts_band_norm mm = {.kind = TS_NORM_MINMAX_STATS};
        ts_raster *r = open_ok(vrt, &(ts_raster_opts){.norm = &mm, .nnorm = 1}, "formats: VRT with statistics");
        ts_raster_close(r);
        f = fopen(vrt, "rb");
        size_t na = f ? fread(after, 1, sizeof after - 1, f) : 0;
        if (f) fclose(f);
        tu_expect(nb > 0 && nb == na && memcmp(before, after, nb) == 0, "formats: the VRT is unchanged by statistics");
        r = open_ok(vrt, NULL, "formats: VRT");
        if (r) {
            const int all[] = {1, 2};
            check_read(r, (ts_window){20, 15, 25, 20}, all, 2, pat_u16, 0, "formats: VRT across the seams");
            check_read(r, (ts_window){0, 0, W, H}, all, 2, pat_u16, 0, "formats: VRT whole mosaic");
            ts_grid g;
            if (tu_expect_ok(ts_raster_grid(r, &g), "formats: VRT grid")) {
                tu_expect(g.width == W && g.height == H && g.gt[0] == 300000 && g.gt[3] == 5000000 && g.gt[1] == 2,
                          "formats: VRT grid %lldx%lld origin %g %g", (long long)g.width, (long long)g.height, g.gt[0],
                          g.gt[3]);
                ts_grid_free(&g);
            }
        }
        ts_raster_close(r);
    }
    for (int t = 0; t < 4 && full; t++) free(names[t]);

    /* COG (tiled, DEFLATE, with overviews): full-resolution reads equal the source. */
    if (full) {
        set_geo(full, 300000, 5000000, 2, 2, 32631);
        const char *cog = tpath("image_cog.tif");
        if (save_as(full, "COG", cog, (const char *const[]){"BLOCKSIZE=32", "COMPRESS=DEFLATE", NULL})) {
            ts_raster *r = open_ok(cog, &(ts_raster_opts){.bands = (int[]){2, 1}, .nbands = 2}, "formats: COG");
            if (r) check_read(r, (ts_window){13, 9, 41, 33}, (int[]){2, 1}, 2, pat_u16, 0, "formats: COG");
            ts_raster_close(r);
        }
        GDALClose(full);
    }

    /* MBTiles: an EPSG:3857 RGB image on the zoom-10 tile grid (2x2 tiles), PNG tiles. */
    const double res = 2 * M_PI * 6378137.0 / (256.0 * 1024), x0 = -20037508.342789244 + 550 * 256 * res,
                 y0 = 20037508.342789244 - 330 * 256 * res;
    GDALDatasetH rgb = make_mem(512, 512, 3, GDT_Byte, pat_u8);
    if (rgb) {
        set_geo(rgb, x0, y0, res, res, 3857);
        const char *mbt = tpath("image.mbtiles");
        if (save_as(rgb, "MBTiles", mbt, (const char *const[]){"TILE_FORMAT=PNG", NULL})) {
            ts_raster *r = open_ok(mbt, NULL, "formats: MBTiles");
            if (r) {
                tu_expect(ts_raster_channels(r) == 3,
                          "formats: MBTiles has 3 default channels (alpha excluded), got %d", ts_raster_channels(r));
                ts_grid g;
                if (tu_expect_ok(ts_raster_grid(r, &g), "formats: MBTiles grid")) {
                    tu_expect(g.width == 512 && g.height == 512 && fabs(g.gt[0] - x0) < 1e-3 &&
                                  fabs(g.gt[3] - y0) < 1e-3 && fabs(g.gt[1] - res) < 1e-9,
                              "formats: MBTiles grid %lldx%lld origin %.3f %.3f (want %.3f %.3f) res %g",
                              (long long)g.width, (long long)g.height, g.gt[0], g.gt[3], x0, y0, g.gt[1]);
                    ts_grid_free(&g);
                }
                check_read(r, (ts_window){200, 250, 111, 97}, (int[]){1, 2, 3}, 3, pat_u8, 0, "formats: MBTiles");
            }
            ts_raster_close(r);
        }
        GDALClose(rgb);
    }
}

/* ---- warping ------------------------------------------------------------------------------- */
static double pat_ramp(int b, int x, int y) { return (void)b, (void)y, x; }
static double pat_colnd(int b, int x, int y) { return (void)b, x == 6 || y == 13 ? 0 : 10 + x + 20 * y; }

static void test_warp(void)
{
    GDALDatasetH m = make_mem(20, 20, 1, GDT_Float32, pat_ramp);
    set_geo(m, 500000, 6000000, 10, 10, 32633);
    const char *path = tpath("ramp.tif");
    int ok = save_as(m, "GTiff", path, NULL);
    GDALClose(m);
    if (!ok) return;
    /* Halving the pixel size: nearest repeats each pixel, bilinear interpolates
     * the ramp (pixel i's centre is source column i/2 - 0.25). */
    for (int bil = 0; bil < 2; bil++) {
        ts_raster *r =
            open_ok(path, &(ts_raster_opts){.warp_res_x = 5, .warp_res_y = 5, .resampling = bil ? NULL : "near"},
                    bil ? "warp: bilinear (default)" : "warp: nearest");
        if (!r) continue;
        ts_grid g;
        if (tu_expect_ok(ts_raster_grid(r, &g), "warp: grid")) {
            tu_expect(g.width == 40 && g.height == 40 && g.gt[1] == 5 && g.gt[5] == -5 && g.gt[0] == 500000 &&
                          g.gt[3] == 6000000 && g.crs_wkt && strstr(g.crs_wkt, "32633"),
                      "warp: 5 m grid %lldx%lld res %g", (long long)g.width, (long long)g.height, g.gt[1]);
            ts_grid_free(&g);
        }
        float out[40 * 40];
        uint8_t valid[40 * 40];
        if (tu_expect_ok(ts_raster_read(r, &(ts_window){0, 0, 40, 40}, out, valid), "warp: read")) {
            int bad = 0, nvalid = 0;
            for (int y = 2; y < 38; y++)
                for (int x = 2; x < 38; x++) {
                    const double want = bil ? x / 2.0 - 0.25 : floor(x / 2.0 + 0.25);
                    bad += fabs(out[y * 40 + x] - want) > 1e-4;
                }
            for (int i = 0; i < 1600; i++) nvalid += valid[i];
            tu_expect(bad == 0 && nvalid == 1600, "warp: %s ramp (%d wrong, %d/1600 valid, e.g. %g %g %g)",
                      bil ? "bilinear" : "nearest", bad, nvalid, out[40 * 10 + 5], out[40 * 10 + 6], out[40 * 10 + 7]);
        }
        ts_raster_close(r);
    }

    /* Onto an explicit grid equal to the source's: nearest gives the source back. */
    ts_grid same = {20, 20, {500000, 10, 0, 6000000, 0, -10}, NULL};
    OGRSpatialReferenceH srs = OSRNewSpatialReference(NULL);
    if (OSRImportFromEPSG(srs, 32633) == OGRERR_NONE) OSRExportToWkt(srs, &same.crs_wkt);
    OSRDestroySpatialReference(srs);
    ts_raster *r = open_ok(path, &(ts_raster_opts){.warp_grid = &same, .resampling = "near"}, "warp: onto a grid");
    if (r) check_read(r, (ts_window){0, 0, 20, 20}, (int[]){1}, 1, pat_ramp, 0, "warp: same grid, nearest");
    ts_raster_close(r);
    CPLFree(same.crs_wkt);

    /* To EPSG:4326: the CRS changes, and the corners of the new bounding box
     * that no source pixel covers are invalid (the warp's alpha band). */
    m = make_mem(100, 100, 1, GDT_Float32, pat_ramp);
    set_geo(m, 800000, 6000000, 10, 10, 32633);
    ok = save_as(m, "GTiff", tpath("ramp_far.tif"), NULL);
    GDALClose(m);
    r = ok ? open_ok(tpath("ramp_far.tif"), &(ts_raster_opts){.warp_crs = "EPSG:4326"}, "warp: to EPSG:4326") : NULL;
    if (r) {
        ts_grid g;
        if (tu_expect_ok(ts_raster_grid(r, &g), "warp: 4326 grid")) {
            tu_expect(g.crs_wkt && strstr(g.crs_wkt, "GEOGCS[\"WGS 84\"") == g.crs_wkt && g.gt[0] > 19 &&
                          g.gt[0] < 21 && g.gt[3] > 53 && g.gt[3] < 55,
                      "warp: geographic grid, origin %g %g", g.gt[0], g.gt[3]);
            const int w = (int)g.width, h = (int)g.height;
            float *out = malloc(sizeof(float) * w * h);
            uint8_t *valid = malloc((size_t)w * h);
            if (tu_expect_ok(ts_raster_read(r, &(ts_window){0, 0, w, h}, out, valid), "warp: 4326 read")) {
                int ninv = 0;
                for (int i = 0; i < w * h; i++) ninv += !valid[i];
                tu_expect(ninv > 0 && valid[(h / 2) * w + w / 2] && !valid[0] && out[0] == 0,
                          "warp: corner invalid, centre valid (%d of %d invalid)", ninv, w * h);
            }
            free(out);
            free(valid);
            ts_grid_free(&g);
        }
        ts_raster_close(r);
    }
    /* Nodata survives the warp: source nodata pixels stay invalid (and out
     * of the kernel), with the file's nodata and with an override. */
    m = make_mem(20, 20, 1, GDT_UInt16, pat_colnd);
    set_geo(m, 500000, 6000000, 10, 10, 32633);
    ok = GDALSetRasterNoDataValue(GDALGetRasterBand(m, 1), 0) == CE_None &&
         save_as(m, "GTiff", tpath("colnd.tif"), NULL);
    if (ok) GDALSetRasterNoDataValue(GDALGetRasterBand(m, 1), 7), ok = save_as(m, "GTiff", tpath("colnd7.tif"), NULL);
    GDALClose(m);
    for (int k = 0; ok && k < 2; k++) {
        ts_raster_opts o = {.warp_res_x = 5, .warp_res_y = 5, .resampling = "near", .has_nodata = k, .nodata = 0};
        r = open_ok(tpath(k ? "colnd7.tif" : "colnd.tif"), &o, k ? "warp: override nodata" : "warp: nodata");
        float out[40 * 40];
        uint8_t valid[40 * 40];
        if (r && tu_expect_ok(ts_raster_read(r, &(ts_window){0, 0, 40, 40}, out, valid), "warp: nodata read")) {
            int bad = 0;
            for (int i = 0; i < 1600; i++) {
                const double src = pat_colnd(1, (i % 40) / 2, (i / 40) / 2);
                bad += valid[i] != (src != 0) || out[i] != (float)src;
            }
            tu_expect(bad == 0, "warp: %s nodata column invalid after warping (%d wrong)", k ? "override" : "file",
                      bad);
        }
        ts_raster_close(r);
    }
    tu_expect_error(ts_raster_open(path, &(ts_raster_opts){.warp_crs = "EPSG:999999"}, &r), TS_ERR_INVALID_ARG,
                    "warp: unknown CRS", "ramp.tif", "EPSG:999999", (char *)NULL);
    tu_expect_error(ts_raster_open(path, &(ts_raster_opts){.warp_res_x = 5, .resampling = "bicubic"}, &r),
                    TS_ERR_INVALID_ARG, "warp: unknown resampling", "ramp.tif", "'bicubic'", (char *)NULL);
}

/* ---- errors ---------------------------------------------------------------------------------- */
static void test_errors(void)
{
    ts_raster *r = NULL;
    tu_expect_error(ts_raster_open(tpath("missing.tif"), NULL, &r), TS_ERR_IO, "errors: missing file", "missing.tif",
                    (char *)NULL);
    tu_expect(r == NULL, "errors: out is NULL after a failure");
    const char *path = tpath("dtype_uint8.tif");
    tu_expect_error(ts_raster_open(path, &(ts_raster_opts){.bands = (int[]){0}, .nbands = 1}, &r), TS_ERR_INVALID_ARG,
                    "errors: band 0", "dtype_uint8.tif", "band 0", "3 bands", (char *)NULL);
    tu_expect_error(ts_raster_open(path, &(ts_raster_opts){.bands = (int[]){1, 4}, .nbands = 2}, &r),
                    TS_ERR_INVALID_ARG, "errors: band 4 of 3", "dtype_uint8.tif", "band 4", "3 bands", (char *)NULL);
    r = open_ok(path, NULL, "errors: open");
    if (!r) return;
    float out[3 * 100];
    tu_expect_error(ts_raster_read(r, &(ts_window){35, 0, 10, 10}, out, NULL), TS_ERR_INVALID_ARG,
                    "errors: window past the right edge", "dtype_uint8.tif", "window 10x10 at col 35, row 0", "37x29",
                    (char *)NULL);
    tu_expect_error(ts_raster_read(r, &(ts_window){-1, 3, 5, 5}, out, NULL), TS_ERR_INVALID_ARG,
                    "errors: negative offset", "col -1, row 3", (char *)NULL);
    tu_expect_error(ts_raster_read(r, &(ts_window){0, 0, 0, 5}, out, NULL), TS_ERR_INVALID_ARG, "errors: empty window",
                    "0x5", (char *)NULL);
    ts_band_stats s;
    tu_expect_error(ts_raster_stats(r, 0, &s), TS_ERR_INVALID_ARG, "errors: no statistics", "no statistics",
                    (char *)NULL);
    ts_raster_close(r);
}

/* ---- threads: one clone per thread ------------------------------------------------------------- */
typedef struct thread_arg {
    ts_raster *r;
    int fails;
} thread_arg;

static void *reader(void *p)
{
    thread_arg *a = p;
    float out[2 * 19 * 23];
    for (int k = 0; k < 60; k++) {
        ts_window w = {(k * 7) % 40, (k * 5) % 30, 19, 23};
        if (ts_raster_read(a->r, &w, out, NULL)) {
            a->fails++;
            continue;
        }
        for (int c = 0; c < 2; c++)
            for (int i = 0; i < 19 * 23; i++)
                a->fails +=
                    out[c * 19 * 23 + i] != (float)pat_u16(c + 1, (int)w.col_off + i % 19, (int)w.row_off + i / 19);
    }
    return NULL;
}

static void test_threads(void)
{
    ts_raster *r = open_ok(tpath("mosaic.vrt"), NULL, "threads: open");
    if (!r) return;
    thread_arg a[2] = {{NULL, 0}, {NULL, 0}};
    pthread_t th[2];
    int ok = !ts_raster_clone(r, &a[0].r) && !ts_raster_clone(r, &a[1].r);
    for (int t = 0; ok && t < 2; t++) ok = pthread_create(&th[t], NULL, reader, &a[t]) == 0;
    if (ok)
        for (int t = 0; t < 2; t++) pthread_join(th[t], NULL);
    tu_expect(ok && a[0].fails == 0 && a[1].fails == 0, "threads: two clones read concurrently (%d, %d wrong)",
              a[0].fails, a[1].fails);
    ts_raster_close(a[0].r);
    ts_raster_close(a[1].r);
    ts_raster_close(r);
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

int main(void)
{
    snprintf(tmpdir, sizeof tmpdir, "%s/terraseg_raster_XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    ts_gdal_init();
    test_dtypes();
    test_norm();
    test_stats_sample();
    test_index();
    test_masks();
    test_formats();
    test_warp();
    test_errors();
    test_threads();
    if (!getenv("TEST_RASTER_KEEP")) nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    /* GDAL's drivers and PROJ's context are global; freeing them keeps
     * LeakSanitizer's report about us. */
    GDALDestroyDriverManager();
    OSRCleanup();
    return tu_finish("raster");
}
