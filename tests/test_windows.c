/* io/windows.c and io/split.c: grid coverage and edge shifting, random
 * windows, CSV round trips and errors, windows from vector features (another
 * CRS, empty geometries, clamping, duplicates), filters independent of the
 * thread count, the index cache (hit, invalidation), and the spatial split
 * (determinism under shuffling and thread counts, ratios, no shared block,
 * the buffer's no-shared-pixel guarantee). Files go to a temporary folder. */
#include <cpl_conv.h>
#include <fcntl.h>
#include <gdal.h>
#include <math.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/windows.h"
#include "kernels/threads.h"
#include "tests/testutil.h"

static const char *tmp_path(const char *name) { return tu_path(name); }

static int write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    fputs(text, f);
    return fclose(f) == 0;
}

static int same_windows(const ts_window *a, const ts_window *b)
{
    return a->col_off == b->col_off && a->row_off == b->row_off && a->width == b->width && a->height == b->height;
}

static int same_lists(const ts_window_list *a, const ts_window_list *b)
{
    if (a->count != b->count || a->has_split != b->has_split) return 0;
    for (size_t i = 0; i < a->count; i++)
        if (!same_windows(&a->w[i], &b->w[i]) || a->id[i] != b->id[i] || a->split[i] != b->split[i]) return 0;
    return 1;
}

/* ---- grid ------------------------------------------------------------------------ */
static int64_t expected_n(int64_t len, int tile, int stride)
{
    if (len <= tile) return 1;
    return (len - tile + stride - 1) / stride + 1;
}

static void check_grid(int64_t W, int64_t H, int tile, int stride)
{
    ts_window_list l;
    ts_window_list_init(&l);
    if (!tu_expect_ok(ts_windows_grid(&l, W, H, tile, tile, stride, stride, 0), "grid")) return;
    int64_t nx = expected_n(W, tile, stride), ny = expected_n(H, tile, stride);
    tu_expect((int64_t)l.count == nx * ny, "grid %lldx%lld tile %d stride %d: %zu windows, expected %lld", (long long)W,
              (long long)H, tile, stride, l.count, (long long)(nx * ny));
    uint8_t *cov = calloc((size_t)(W * H), 1);
    int inside = 1, edge_right = 0, edge_bottom = 0, steps_ok = 1;
    for (size_t i = 0; i < l.count; i++) {
        const ts_window *w = &l.w[i];
        if (w->col_off < 0 || w->row_off < 0 || w->col_off + w->width > W || w->row_off + w->height > H ||
            w->width != tile || w->height != tile || l.id[i] != (int64_t)i)
            inside = 0;
        if (w->col_off + w->width == W) edge_right++;
        if (w->row_off + w->height == H) edge_bottom++;
        /* Neighbours in a row are stride apart, the last one at most stride. */
        if (i % (size_t)nx) {
            int64_t d = w->col_off - l.w[i - 1].col_off;
            int last = (i % (size_t)nx) == (size_t)nx - 1;
            if (last ? (d < 1 || d > stride) : d != stride) steps_ok = 0;
        }
        for (int64_t y = w->row_off; y < w->row_off + w->height && inside; y++)
            memset(cov + y * W + w->col_off, 1, (size_t)w->width);
    }
    size_t uncovered = 0;
    for (int64_t p = 0; p < W * H; p++) uncovered += cov[p] == 0;
    tu_expect(inside, "grid %lldx%lld tile %d stride %d: every window inside, full-size, ids in order", (long long)W,
              (long long)H, tile, stride);
    tu_expect(uncovered == 0, "grid %lldx%lld tile %d stride %d: %zu pixels not covered", (long long)W, (long long)H,
              tile, stride, uncovered);
    tu_expect(edge_right == ny && edge_bottom == nx,
              "grid %lldx%lld tile %d stride %d: last column/row at the edge (%d, %d windows)", (long long)W,
              (long long)H, tile, stride, edge_right, edge_bottom);
    tu_expect(steps_ok, "grid %lldx%lld tile %d stride %d: offsets stride apart", (long long)W, (long long)H, tile,
              stride);
    free(cov);
    ts_window_list_free(&l);
}

static void test_grid(void)
{
    check_grid(1000, 700, 256, 256);
    check_grid(1000, 700, 256, 224); /* overlap 32 */
    check_grid(257, 256, 256, 256);  /* one pixel over: two columns, the second shifted by 1 */
    check_grid(256, 256, 256, 128);
    check_grid(513, 301, 128, 100);
    check_grid(97, 61, 13, 5);
    check_grid(100, 100, 10, 1);

    ts_window_list l;
    ts_window_list_init(&l);
    tu_expect_ok(ts_windows_grid(&l, 257, 256, 256, 256, 256, 256, 0), "grid 257x256");
    tu_expect(l.count == 2 && l.w[1].col_off == 1 && l.w[1].row_off == 0, "grid 257: second column at offset 1");

    /* A raster smaller than the tile: an error, or one clamped window. */
    ts_window_list_clear(&l);
    tu_expect_error(ts_windows_grid(&l, 200, 300, 256, 256, 256, 256, 0), TS_ERR_INVALID_ARG, "grid: small raster",
                    "width 200", "smaller than the tile 256", NULL);
    tu_expect(l.count == 0, "grid: failure leaves the list alone");
    tu_expect_ok(ts_windows_grid(&l, 200, 300, 256, 256, 256, 256, 1), "grid small, allowed");
    tu_expect(l.count == 2 && l.w[0].width == 200 && l.w[0].height == 256 && l.w[1].row_off == 44,
              "grid small: one column of width 200, rows 0 and 44");
    tu_expect_error(ts_windows_grid(&l, 1000, 1000, 256, 256, 0, 256, 0), TS_ERR_INVALID_ARG, "grid: stride 0",
                    "stride 0", NULL);
    tu_expect_error(ts_windows_grid(&l, 1000, 1000, 256, 256, 300, 256, 0), TS_ERR_INVALID_ARG, "grid: stride > tile",
                    "stride 300", NULL);
    ts_window_list_free(&l);
}

/* ---- random -------------------------------------------------------------------------- */
static void test_random(void)
{
    ts_window_list a, b, c;
    ts_window_list_init(&a);
    ts_window_list_init(&b);
    ts_window_list_init(&c);
    tu_expect_ok(ts_windows_random(&a, 1000, 600, 64, 32, 500, 42, 0), "random a");
    tu_expect_ok(ts_windows_random(&b, 1000, 600, 64, 32, 500, 42, 0), "random b");
    tu_expect_ok(ts_windows_random(&c, 1000, 600, 64, 32, 500, 43, 0), "random c");
    tu_expect(same_lists(&a, &b), "random: same seed, same windows");
    int differ = 0, inside = 1;
    int64_t maxc = 0, minc = INT64_MAX;
    for (size_t i = 0; i < a.count; i++) {
        differ |= !same_windows(&a.w[i], &c.w[i]);
        const ts_window *w = &a.w[i];
        inside &= w->col_off >= 0 && w->row_off >= 0 && w->col_off + 64 <= 1000 && w->row_off + 32 <= 600 &&
                  w->width == 64 && w->height == 32;
        if (w->col_off > maxc) maxc = w->col_off;
        if (w->col_off < minc) minc = w->col_off;
    }
    tu_expect(a.count == 500 && differ && inside, "random: 500 windows inside, another seed differs");
    tu_expect(minc < 50 && maxc > 936 - 50, "random: offsets spread over the raster (%lld..%lld)", (long long)minc,
              (long long)maxc);
    /* A range of one pixel: both offsets come up. */
    ts_window_list_clear(&b);
    tu_expect_ok(ts_windows_random(&b, 65, 32, 64, 32, 400, 7, 0), "random narrow");
    int seen[2] = {0, 0};
    for (size_t i = 0; i < b.count; i++) seen[b.w[i].col_off]++;
    tu_expect(seen[0] > 150 && seen[1] > 150, "random: both offsets of a 1-pixel range drawn (%d, %d)", seen[0],
              seen[1]);
    /* Pinned values: splitmix64 from the seed, x then y per window, on every machine. */
    ts_window_list_clear(&b);
    tu_expect_ok(ts_windows_random(&b, 5000, 4000, 256, 256, 2, 3, 0), "random pinned");
    tu_expect(b.count == 2 && b.w[0].col_off == 2453 && b.w[0].row_off == 3636 && b.w[1].col_off == 2159 &&
                  b.w[1].row_off == 3262,
              "random: seed 3 gives (2453, 3636), (2159, 3262)");
    ts_window_list_free(&a);
    ts_window_list_free(&b);
    ts_window_list_free(&c);
}

/* ---- CSV ----------------------------------------------------------------------------- */
static void test_csv(void)
{
    ts_window_list a, b;
    ts_window_list_init(&a);
    ts_window_list_init(&b);
    const char *p = tmp_path("grid.csv");
    tu_expect_ok(ts_windows_grid(&a, 1000, 700, 256, 256, 224, 224, 0), "csv: grid");
    tu_expect_ok(ts_windows_write_csv(&a, p), "csv: write");
    tu_expect(access(tmp_path("grid.csv.tmp"), F_OK) != 0, "csv: no .tmp left behind");
    tu_expect_ok(ts_windows_read_csv(&b, p, NULL, 1000, 700, 0, 0), "csv: read");
    tu_expect(same_lists(&a, &b), "csv: round trip (%zu windows)", b.count);

    /* With a split column. */
    for (size_t i = 0; i < a.count; i++) a.split[i] = (uint8_t)(1 + i % 4);
    a.has_split = 1;
    tu_expect_ok(ts_windows_write_csv(&a, p), "csv: write with split");
    ts_window_list_clear(&b);
    tu_expect_ok(ts_windows_read_csv(&b, p, NULL, 1000, 700, 0, 0), "csv: read with split");
    tu_expect(same_lists(&a, &b), "csv: round trip with split");

    /* Other column names, column order, quotes, CRLF, BOM, blank lines, extra columns, default size. */
    const char *q = tmp_path("named.csv");
    write_text(q, "\xEF\xBB\xBFname,\"y\", x ,note\r\n"
                  "a,10,20,hello\r\n"
                  "\r\n"
                  "\"b, c\", 30 ,\"40\",\"say \"\"hi\"\"\"\r\n");
    ts_csv_columns cols = {.col_off = "x", .row_off = "y"};
    ts_window_list_clear(&b);
    if (tu_expect_ok(ts_windows_read_csv(&b, q, &cols, 100, 100, 16, 8), "csv: named columns"))
        tu_expect(b.count == 2 && b.w[0].col_off == 20 && b.w[0].row_off == 10 && b.w[0].width == 16 &&
                      b.w[0].height == 8 && b.w[1].col_off == 40 && b.w[1].row_off == 30 && b.id[1] == 1 &&
                      !b.has_split,
                  "csv: named columns read right");

    /* Errors name the file, the line and the column. */
    struct {
        const char *name, *text, *subs[3];
    } bad[] = {
        {"nocol.csv", "col_off,row,width,height\n0,0,10,10\n", {"nocol.csv", "line 1", "\"row_off\""}},
        {"nonint.csv", "col_off,row_off,width,height\n0,0,10,10\n5,12.5,10,10\n", {"line 3", "\"row_off\"", "12.5"}},
        {"empty.csv", "col_off,row_off,width,height\n0,,10,10\n", {"line 2", "\"row_off\"", "not an integer"}},
        {"short.csv", "col_off,row_off,width,height\n0,0,10\n", {"line 2", "\"height\"", "missing"}},
        {"neg.csv", "col_off,row_off,width,height\n-5,0,10,10\n", {"line 2", "\"col_off\"", "negative"}},
        {"zero.csv", "col_off,row_off,width,height\n0,0,0,10\n", {"line 2", "\"width\"", "size"}},
        {"split.csv", "col_off,row_off,width,height,split\n0,0,10,10,trian\n", {"line 2", "\"split\"", "trian"}},
        {"outside.csv", "col_off,row_off,width,height\n0,0,10,10\n95,0,10,10\n0,0,10,10\n0,91,10,10\n",
         {"2 windows lie outside the 100x100 raster", "line 3 (col_off 95", "line 5"}},
        {"nohead.csv", "", {"nohead.csv", "header", "empty"}},
        {"quote.csv", "col_off,row_off\n\"0,0\n", {"line 2", "unterminated", "quote.csv"}},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        const char *path = tmp_path(bad[k].name);
        write_text(path, bad[k].text);
        ts_window_list_clear(&b);
        tu_expect_error(ts_windows_read_csv(&b, path, NULL, 100, 100, 10, 10), TS_ERR_INVALID_ARG, bad[k].name,
                        bad[k].subs[0], bad[k].subs[1], bad[k].subs[2], NULL);
        tu_expect(b.count == 0 && !b.has_split, "%s: list untouched after the error", bad[k].name);
    }
    write_text(tmp_path("nowidth.csv"), "col_off,row_off\n0,0\n");
    tu_expect_error(ts_windows_read_csv(&b, tmp_path("nowidth.csv"), NULL, 100, 100, 0, 0), TS_ERR_INVALID_ARG,
                    "csv: no width column and no default", "\"width\"", "tile size", NULL);
    tu_expect_error(ts_windows_read_csv(&b, tmp_path("missing.csv"), NULL, 100, 100, 10, 10), TS_ERR_IO,
                    "csv: missing file", "missing.csv", NULL);
    tu_expect_error(ts_windows_write_csv(&a, tmp_path("no/such/dir.csv")), TS_ERR_IO, "csv: unwritable",
                    "dir.csv", NULL);
    ts_window_list_free(&a);
    ts_window_list_free(&b);
}

/* ---- grid from a raster ------------------------------------------------------------ */
static const char *UTM33 = "EPSG:32633";

static char *wkt_of(const char *user)
{
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    char *wkt = NULL, *copy = NULL;
    if (OSRSetFromUserInput(s, user) == OGRERR_NONE && OSRExportToWkt(s, &wkt) == OGRERR_NONE) copy = strdup(wkt);
    CPLFree(wkt);
    OSRDestroySpatialReference(s);
    return copy;
}

static void test_read_grid(void)
{
    const char *p = tmp_path("image.tif");
    GDALDriverH drv = GDALGetDriverByName("GTiff");
    GDALDatasetH ds = drv ? GDALCreate(drv, p, 120, 80, 1, GDT_Byte, NULL) : NULL;
    if (!tu_expect(ds != NULL, "read grid: create a GeoTIFF")) return;
    double gt[6] = {499000, 10, 0, 4600000, 0, -10};
    char *wkt = wkt_of(UTM33);
    tu_expect(GDALSetGeoTransform(ds, gt) == CE_None && wkt && GDALSetProjection(ds, wkt) == CE_None,
              "read grid: georeference the GeoTIFF");
    GDALClose(ds);
    ts_grid g;
    if (tu_expect_ok(ts_windows_read_grid(p, &g), "read grid")) {
        tu_expect(g.width == 120 && g.height == 80 && g.gt[0] == 499000 && g.gt[5] == -10 && g.crs_wkt &&
                      strstr(g.crs_wkt, "32633"),
                  "read grid: size, geotransform, CRS");
        ts_grid_free(&g);
    }
    tu_expect_error(ts_windows_read_grid(tmp_path("nope.tif"), &g), TS_ERR_IO, "read grid: missing", "nope.tif",
                    NULL);
    free(wkt);
}

/* ---- vector features -------------------------------------------------------------- */
/* Image: UTM 33N, 10 m pixels, origin (499000, 4600000), 1000 x 800 px.
 * Easting 500000 (pixel column 100) is the zone's central meridian, 15 E. */
static ts_grid utm_grid(void)
{
    ts_grid g = {1000, 800, {499000, 10, 0, 4600000, 0, -10}, wkt_of(UTM33)};
    return g;
}

typedef struct vfeat {
    int kind; /* 0 point at (px, py), 1 small polygon around it, 2 empty polygon, 3 no geometry */
    double px, py;
} vfeat;

/* Writes a GPKG layer; coordinates go to `srs_user` (NULL: a layer without CRS). */
static int write_layer(GDALDatasetH ds, const char *name, const char *srs_user, const vfeat *f, int n)
{
    OGRSpatialReferenceH srs = NULL;
    OGRCoordinateTransformationH ct = NULL;
    ts_grid g = utm_grid();
    if (srs_user) {
        srs = OSRNewSpatialReference(NULL);
        OGRSpatialReferenceH utm = OSRNewSpatialReference(NULL);
        OSRSetFromUserInput(srs, srs_user);
        OSRSetFromUserInput(utm, UTM33);
        OSRSetAxisMappingStrategy(srs, OAMS_TRADITIONAL_GIS_ORDER);
        OSRSetAxisMappingStrategy(utm, OAMS_TRADITIONAL_GIS_ORDER);
        ct = OCTNewCoordinateTransformation(utm, srs);
        OSRDestroySpatialReference(utm);
    }
    OGRLayerH lyr = GDALDatasetCreateLayer(ds, name, srs, wkbUnknown, NULL);
    int ok = lyr != NULL && (!srs_user || ct);
    for (int i = 0; ok && i < n; i++) {
        OGRFeatureH feat = OGR_F_Create(OGR_L_GetLayerDefn(lyr));
        double x = g.gt[0] + f[i].px * g.gt[1], y = g.gt[3] + f[i].py * g.gt[5];
        if (ct) ok &= OCTTransform(ct, 1, &x, &y, NULL);
        OGRGeometryH geom = NULL;
        if (f[i].kind == 0) {
            geom = OGR_G_CreateGeometry(wkbPoint);
            OGR_G_SetPoint_2D(geom, 0, x, y);
        } else if (f[i].kind == 1) {
            OGRGeometryH ring = OGR_G_CreateGeometry(wkbLinearRing);
            double d = srs_user && strcmp(srs_user, "EPSG:4326") == 0 ? 1e-5 : 1.0;
            OGR_G_AddPoint_2D(ring, x - d, y - d);
            OGR_G_AddPoint_2D(ring, x + d, y - d);
            OGR_G_AddPoint_2D(ring, x + d, y + d);
            OGR_G_AddPoint_2D(ring, x - d, y + d);
            OGR_G_AddPoint_2D(ring, x - d, y - d);
            geom = OGR_G_CreateGeometry(wkbPolygon);
            OGR_G_AddGeometryDirectly(geom, ring);
        } else if (f[i].kind == 2) {
            geom = OGR_G_CreateGeometry(wkbPolygon);
        }
        if (geom) OGR_F_SetGeometryDirectly(feat, geom);
        ok &= OGR_L_CreateFeature(lyr, feat) == OGRERR_NONE;
        OGR_F_Destroy(feat);
    }
    if (ct) OCTDestroyCoordinateTransformation(ct);
    if (srs) OSRDestroySpatialReference(srs);
    ts_grid_free(&g);
    return ok;
}

static void test_vector(void)
{
    const char *p = tmp_path("features.gpkg");
    GDALDriverH drv = GDALGetDriverByName("GPKG");
    GDALDatasetH ds = drv ? GDALCreate(drv, p, 0, 0, 0, GDT_Unknown, NULL) : NULL;
    if (!tu_expect(ds != NULL, "vector: create a GeoPackage")) return;
    const vfeat feats[] = {
        {0, 100.5, 50.5},  /* tile (1, 0) of 64 px: window (64, 0) */
        {2, 0, 0},         /* empty geometry: skipped */
        {1, 995.5, 795.5}, /* bottom-right tile, clamped: (936, 736) */
        {0, 120.0, 10.0},  /* the same tile as the first: a duplicate */
        {3, 0, 0},         /* no geometry: skipped */
        {0, 1200, 50},     /* outside the raster */
        {1, 300.5, 400.5}, /* tile (4, 6): (256, 384) */
    };
    const int nf = (int)(sizeof feats / sizeof feats[0]);
    int ok = write_layer(ds, "wgs84", "EPSG:4326", feats, nf) && write_layer(ds, "utm", UTM33, feats, nf) &&
             write_layer(ds, "nocrs", NULL, feats, 2);
    GDALClose(ds);
    if (!tu_expect(ok, "vector: write the layers")) return;

    ts_grid g = utm_grid();
    const ts_window want[] = {{64, 0, 64, 64}, {936, 736, 64, 64}, {256, 384, 64, 64}};
    const char *layers[] = {"wgs84", "utm", NULL};
    for (int k = 0; k < 3; k++) {
        ts_window_list l;
        ts_window_list_init(&l);
        ts_vector_stats s;
        const char *what = layers[k] ? layers[k] : "first layer";
        if (!tu_expect_ok(ts_windows_from_vector(&l, p, layers[k], &g, 64, 64, 0, &s), what)) continue;
        int good = l.count == 3;
        for (size_t i = 0; good && i < 3; i++) good = same_windows(&l.w[i], &want[i]);
        tu_expect(good, "vector %s: windows (64,0), (936,736), (256,384) (got %zu: first %lld,%lld)", what, l.count,
                  l.count ? (long long)l.w[0].col_off : -1LL, l.count ? (long long)l.w[0].row_off : -1LL);
        tu_expect(s.features == 7 && s.empty == 2 && s.duplicates == 1 && s.outside == 1 && s.windows == 3,
                  "vector %s: stats %zu features, %zu empty, %zu duplicates, %zu outside", what, s.features, s.empty,
                  s.duplicates, s.outside);
        tu_expect(l.count == 3 && l.id[0] == 1 && l.id[1] == 3 && l.id[2] == 7, "vector %s: ids are the FIDs", what);
        ts_window_list_free(&l);
    }

    /* The central meridian, independent of any inverse transformation in the test. */
    const char *gj = tmp_path("meridian.geojson");
    char text[512];
    /* Latitude 41.5174 is roughly row 380: only the column is checked exactly. */
    snprintf(text, sizeof text,
             "{\"type\":\"FeatureCollection\",\"features\":[{\"type\":\"Feature\",\"properties\":{},"
             "\"geometry\":{\"type\":\"Point\",\"coordinates\":[15.0,41.5174]}}]}");
    write_text(gj, text);
    ts_window_list l;
    ts_window_list_init(&l);
    if (tu_expect_ok(ts_windows_from_vector(&l, gj, NULL, &g, 10, 10, 0, NULL), "vector: GeoJSON (lon, lat)"))
        tu_expect(l.count == 1 && l.w[0].col_off == 100 && l.w[0].row_off >= 300 && l.w[0].row_off <= 500,
                  "vector: lon 15 E lands in column 100 (got %lld, %lld)", l.count ? (long long)l.w[0].col_off : -1LL,
                  l.count ? (long long)l.w[0].row_off : -1LL);

    /* Errors. */
    ts_window_list_clear(&l);
    tu_expect_error(ts_windows_from_vector(&l, p, "nocrs", &g, 64, 64, 0, NULL), TS_ERR_INVALID_ARG,
                    "vector: layer without CRS", "nocrs", "no CRS", NULL);
    const char *csv = tmp_path("nocrs.csv");
    write_text(csv, "WKT,name\n\"POINT (500000 4599000)\",a\n");
    tu_expect_error(ts_windows_from_vector(&l, csv, NULL, &g, 64, 64, 0, NULL), TS_ERR_INVALID_ARG,
                    "vector: CSV layer without CRS", "nocrs.csv", "no CRS", NULL);
    tu_expect_error(ts_windows_from_vector(&l, p, "roads", &g, 64, 64, 0, NULL), TS_ERR_INVALID_ARG,
                    "vector: unknown layer", "\"roads\"", "\"wgs84\"", NULL);
    tu_expect_error(ts_windows_from_vector(&l, tmp_path("none.gpkg"), NULL, &g, 64, 64, 0, NULL), TS_ERR_IO,
                    "vector: missing file", "none.gpkg", NULL);
    ts_grid nocrs = {1000, 800, {499000, 10, 0, 4600000, 0, -10}, NULL};
    tu_expect_error(ts_windows_from_vector(&l, p, "utm", &nocrs, 64, 64, 0, NULL), TS_ERR_INVALID_ARG,
                    "vector: image without CRS", "image has no CRS", NULL);
    ts_grid small = utm_grid();
    small.width = 50;
    tu_expect_error(ts_windows_from_vector(&l, p, "utm", &small, 64, 64, 0, NULL), TS_ERR_INVALID_ARG,
                    "vector: raster smaller than the tile", "smaller than the tile", NULL);
    tu_expect(l.count == 0, "vector: failures leave the list alone");
    ts_grid_free(&small);
    ts_window_list_free(&l);
    ts_grid_free(&g);
}

/* ---- filters -------------------------------------------------------------------------- */
/* A synthetic label image: class 2 inside a disc, 0 elsewhere; nodata left of column 100. */
typedef struct synth {
    int64_t cx, cy, r;
} synth;

static ts_status synth_read(void *reader, const ts_window *w, int32_t *labels, uint8_t *valid)
{
    const synth *s = reader;
    for (int y = 0; y < w->height; y++)
        for (int x = 0; x < w->width; x++) {
            int64_t gx = w->col_off + x, gy = w->row_off + y;
            size_t i = (size_t)y * (size_t)w->width + (size_t)x;
            if (labels) labels[i] = (gx - s->cx) * (gx - s->cx) + (gy - s->cy) * (gy - s->cy) <= s->r * s->r ? 2 : 0;
            if (valid) valid[i] = gx < 100 ? 0 : 255;
        }
    return TS_OK;
}

typedef struct failing {
    int64_t from, every;
} failing;

static ts_status fail_fn(void *ctx, const ts_window *w, int *keep)
{
    const failing *f = ctx;
    int64_t k = (w->row_off / 8) * 1000 + w->col_off / 8; /* a unique number per grid window */
    *keep = (k % 3) != 0;
    if (w->row_off / 8 * 125 + w->col_off / 8 >= f->from && (w->row_off / 8 * 125 + w->col_off / 8) % f->every == 0)
        return ts_error(TS_ERR_IO, "reader: cannot read block %lld", (long long)k);
    return TS_OK;
}

static ts_status count_fn(void *ctx, const ts_window *w, int *keep)
{
    (void)w;
    (*(size_t *)ctx)++;
    *keep = 1;
    return TS_OK;
}

static void test_filters(void)
{
    /* The ready-made decisions. */
    int32_t lab[8] = {0, 0, 0, 0, 0, 0, 255, 0};
    uint8_t val[8] = {255, 255, 255, 255, 0, 0, 255, 255};
    ts_mask_filter_params p = {.drop_background = 1, .background = 0, .ignore_index = 255, .max_nodata_fraction = 1};
    int keep = -1;
    tu_expect(ts_mask_decide(&p, lab, val, 8, &keep) == TS_OK && keep == 0, "mask: all background (ignore too)");
    lab[4] = 3; /* a class, but on nodata */
    tu_expect(ts_mask_decide(&p, lab, val, 8, &keep) == TS_OK && keep == 0, "mask: a class on nodata is not counted");
    lab[0] = 1;
    tu_expect(ts_mask_decide(&p, lab, val, 8, &keep) == TS_OK && keep == 1, "mask: one class pixel keeps");
    tu_expect(fabs(ts_mask_nodata_fraction(val, 8) - 0.25) < 1e-12, "mask: nodata fraction 0.25");
    p.max_nodata_fraction = 0.25;
    tu_expect(ts_mask_decide(&p, lab, val, 8, &keep) == TS_OK && keep == 1, "mask: fraction == max keeps");
    p.max_nodata_fraction = 0.2;
    tu_expect(ts_mask_decide(&p, lab, val, 8, &keep) == TS_OK && keep == 0, "mask: fraction > max drops");
    tu_expect(ts_mask_all_background(lab, NULL, 0, 0, -1) == 1, "mask: no pixels is all background");
    p.max_nodata_fraction = 1;
    tu_expect_error(ts_mask_decide(&p, NULL, val, 8, &keep), TS_ERR_INVALID_ARG, "mask: background needs labels",
                    "label", NULL);

    /* The adapter on a synthetic scene, with 1 and 2 threads. */
    synth sc = {400, 300, 120};
    ts_mask_filter mf = {{.drop_background = 1, .background = 0, .ignore_index = -1, .max_nodata_fraction = 0.5},
                         synth_read, &sc};
    ts_window_list base, one, two;
    ts_window_list_init(&base);
    ts_window_list_init(&one);
    ts_window_list_init(&two);
    tu_expect_ok(ts_windows_grid(&base, 800, 600, 32, 32, 24, 24, 0), "filter: grid");
    ts_window_list_copy(&one, &base);
    ts_window_list_copy(&two, &base);
    size_t d1 = 0, d2 = 0;
    tu_expect_ok(ts_windows_filter(&one, ts_mask_filter_fn, &mf, 1, &d1), "filter: 1 thread");
    tu_expect_ok(ts_windows_filter(&two, ts_mask_filter_fn, &mf, 2, &d2), "filter: 2 threads");
    tu_expect(same_lists(&one, &two) && d1 == d2 && d1 + one.count == base.count,
              "filter: same windows, same order for 1 and 2 threads (%zu kept, %zu dropped)", one.count, d1);
    /* Brute force: kept = intersects the disc and at most half nodata. */
    size_t j = 0;
    int exact = 1;
    for (size_t i = 0; i < base.count; i++) {
        const ts_window *w = &base.w[i];
        int64_t nx = w->col_off < 100 ? (w->col_off + w->width <= 100 ? w->width : 100 - w->col_off) : 0;
        double nod = (double)nx / w->width;
        /* the window pixel nearest the disc's centre */
        int64_t qx = sc.cx < w->col_off ? w->col_off : sc.cx >= w->col_off + w->width ? w->col_off + w->width - 1
                                                                                         : sc.cx;
        int64_t qy = sc.cy < w->row_off ? w->row_off : sc.cy >= w->row_off + w->height ? w->row_off + w->height - 1
                                                                                          : sc.cy;
        int fg = (qx - sc.cx) * (qx - sc.cx) + (qy - sc.cy) * (qy - sc.cy) <= sc.r * sc.r && qx >= 100;
        int k = fg && nod <= 0.5;
        if (k) {
            if (j >= one.count || one.id[j] != base.id[i]) exact = 0;
            j++;
        }
    }
    tu_expect(exact && j == one.count && one.count > 50, "filter: kept exactly the windows over the disc (%zu)", j);

    /* Errors: the lowest failing window is reported, whatever the thread count; the list is unchanged. */
    ts_window_list_clear(&base);
    tu_expect_ok(ts_windows_grid(&base, 1000, 1000, 8, 8, 8, 8, 0), "filter: grid of 125x125");
    failing fl = {5000, 7};
    for (int threads = 1; threads <= 2; threads++) {
        ts_window_list_copy(&one, &base);
        tu_expect_error(ts_windows_filter(&one, fail_fn, &fl, threads, NULL), TS_ERR_IO, "filter: error",
                        "window 5005 ", "cannot read block 40005", NULL);
        tu_expect(same_lists(&one, &base), "filter: list unchanged after an error (%d threads)", threads);
    }
    fl.from = 1 << 30;
    ts_window_list_copy(&one, &base);
    ts_window_list_copy(&two, &base);
    tu_expect_ok(ts_windows_filter(&one, fail_fn, &fl, 1, NULL), "filter: modulo, 1 thread");
    tu_expect_ok(ts_windows_filter(&two, fail_fn, &fl, 2, NULL), "filter: modulo, 2 threads");
    tu_expect(same_lists(&one, &two) && one.count < base.count && one.count > base.count / 2,
              "filter: 1 and 2 threads agree (%zu of %zu)", one.count, base.count);

    /* Per-thread contexts: every window seen once in total. */
    size_t counts[2] = {0, 0};
    void *ctxs[2] = {&counts[0], &counts[1]};
    ts_window_list_copy(&one, &base);
    tu_expect_ok(ts_windows_filter_ctx(&one, count_fn, ctxs, 2, NULL), "filter: per-thread contexts");
    tu_expect(counts[0] + counts[1] == base.count && one.count == base.count,
              "filter: per-thread counts add up (%zu + %zu)", counts[0], counts[1]);

    ts_window_list_free(&base);
    ts_window_list_free(&one);
    ts_window_list_free(&two);
}

/* ---- cache ------------------------------------------------------------------------------ */
static ts_status make_key(ts_cache_key *k, const char *image, const char *opts)
{
    ts_status st = ts_cache_key_init(k, "test");
    if (!st) st = ts_cache_key_add_file(k, image);
    if (!st) st = ts_cache_key_addf(k, "%s", opts);
    return st;
}

static void test_cache(void)
{
    const char *image = tmp_path("scene.bin"), *cache = tmp_path("scene.idx");
    write_text(image, "pretend this is a big scene");
    ts_window_list l, got;
    ts_window_list_init(&l);
    ts_window_list_init(&got);
    tu_expect_ok(ts_windows_grid(&l, 3000, 2000, 256, 256, 200, 200, 0), "cache: grid");
    for (size_t i = 0; i < l.count; i++) l.score[i] = (double)i / 7.0;
    l.has_score = 1;
    ts_cache_key k;
    int hit = -1;
    tu_expect_ok(make_key(&k, image, "tile=256 stride=200"), "cache: key");
    tu_expect(ts_windows_cache_load(cache, &k, &got, &hit) == TS_OK && hit == 0, "cache: no file is a miss");
    tu_expect_ok(ts_windows_cache_save(cache, &k, &l), "cache: save");
    tu_expect(ts_windows_cache_load(cache, &k, &got, &hit) == TS_OK && hit == 1 && same_lists(&got, &l) &&
                  got.has_score && got.score[9] == 9.0 / 7.0,
              "cache: hit returns the stored list");
    ts_cache_key_free(&k);

    /* Other options: miss. */
    make_key(&k, image, "tile=256 stride=128");
    tu_expect(ts_windows_cache_load(cache, &k, &got, &hit) == TS_OK && hit == 0, "cache: other options miss");
    ts_cache_key_free(&k);

    /* The same content but a new mtime: miss. */
    struct timespec ts[2] = {{0, UTIME_OMIT}, {1000000000, 123456789}};
    utimensat(AT_FDCWD, image, ts, 0);
    make_key(&k, image, "tile=256 stride=200");
    tu_expect(ts_windows_cache_load(cache, &k, &got, &hit) == TS_OK && hit == 0, "cache: touched input misses");
    tu_expect_ok(ts_windows_cache_save(cache, &k, &l), "cache: save again");
    tu_expect(ts_windows_cache_load(cache, &k, &got, &hit) == TS_OK && hit == 1, "cache: hit after re-save");
    ts_cache_key_free(&k);

    /* A changed input (size, and mtime forced back): miss. */
    write_text(image, "pretend this is a big scene, edited");
    utimensat(AT_FDCWD, image, ts, 0);
    make_key(&k, image, "tile=256 stride=200");
    tu_expect(ts_windows_cache_load(cache, &k, &got, &hit) == TS_OK && hit == 0, "cache: changed input misses");
    tu_expect_ok(ts_windows_cache_save(cache, &k, &l), "cache: save for the corruption checks");

    /* Corrupt or truncated: a miss, not an error. */
    FILE *f = fopen(cache, "r+b");
    fseek(f, -20, SEEK_END);
    fputc('X', f);
    fclose(f);
    tu_expect(ts_windows_cache_load(cache, &k, &got, &hit) == TS_OK && hit == 0, "cache: corrupt file misses");
    tu_expect(truncate(cache, 30) == 0, "cache: truncate");
    tu_expect(ts_windows_cache_load(cache, &k, &got, &hit) == TS_OK && hit == 0, "cache: truncated file misses");
    tu_expect(same_lists(&got, &l), "cache: a miss leaves the output list alone");
    ts_cache_key_free(&k);
    tu_expect_error(make_key(&k, tmp_path("gone.bin"), ""), TS_ERR_IO, "cache: key of a missing file", "gone.bin",
                    NULL);
    ts_cache_key_free(&k);

    /* An empty list round-trips too. */
    ts_window_list empty;
    ts_window_list_init(&empty);
    make_key(&k, image, "empty");
    tu_expect_ok(ts_windows_cache_save(cache, &k, &empty), "cache: save empty");
    tu_expect(ts_windows_cache_load(cache, &k, &got, &hit) == TS_OK && hit == 1 && got.count == 0,
              "cache: empty list hit");
    ts_cache_key_free(&k);
    ts_window_list_free(&l);
    ts_window_list_free(&got);
}

/* ---- split ---------------------------------------------------------------------------- */
/* Gap between two windows: the larger of the free pixels between them along
 * x and along y (negative when they overlap). */
static int64_t gap(const ts_window *a, const ts_window *b)
{
    int64_t gx = b->col_off - (a->col_off + a->width), gx2 = a->col_off - (b->col_off + b->width);
    int64_t gy = b->row_off - (a->row_off + a->height), gy2 = a->row_off - (b->row_off + b->height);
    if (gx2 > gx) gx = gx2;
    if (gy2 > gy) gy = gy2;
    return gx > gy ? gx : gy;
}

/* The number of val/test windows closer than min_gap pixels to a window of
 * another (used) split; min_gap 0: sharing a pixel. */
static size_t leaks(const ts_window_list *l, int64_t min_gap)
{
    size_t n = 0;
    for (size_t i = 0; i < l->count; i++) {
        int s = l->split[i];
        if (s != TS_SPLIT_VAL && s != TS_SPLIT_TEST) continue;
        for (size_t j = 0; j < l->count; j++) {
            int t = l->split[j];
            if (t == s || t == TS_SPLIT_BUFFER) continue;
            if (gap(&l->w[i], &l->w[j]) < min_gap) {
                n++;
                break;
            }
        }
    }
    return n;
}

static void test_split(void)
{
    const int64_t W = 4000, H = 3000;
    ts_window_list base;
    ts_window_list_init(&base);
    tu_expect_ok(ts_windows_grid(&base, W, H, 128, 128, 64, 64, 0), "split: grid");
    ts_split_params p = {.block = 512, .ratios = {0.7, 0.15, 0.15}, .seed = 7, .buffer = 0};
    ts_split_report rep;

    ts_window_list a;
    ts_window_list_init(&a);
    ts_window_list_copy(&a, &base);
    if (!tu_expect_ok(ts_split_assign(&a, W, H, &p, &rep), "split: assign")) return;
    tu_expect(a.has_split, "split: has_split set");

    /* Ratios within the share of the largest block. */
    size_t maxblk = 0;
    {
        /* count windows per block by brute force */
        int64_t nbx = (W + 511) / 512, nby = (H + 511) / 512;
        size_t *cnt = calloc((size_t)(nbx * nby), sizeof *cnt);
        int *sp = calloc((size_t)(nbx * nby), sizeof *sp);
        int shared = 0;
        for (size_t i = 0; i < a.count; i++) {
            const ts_window *w = &a.w[i];
            int64_t b = ((2 * w->row_off + w->height) / 1024) * nbx + (2 * w->col_off + w->width) / 1024;
            cnt[b]++;
            if (sp[b] && sp[b] != a.split[i]) shared = 1;
            sp[b] = a.split[i];
        }
        for (int64_t b = 0; b < nbx * nby; b++)
            if (cnt[b] > maxblk) maxblk = cnt[b];
        tu_expect(!shared, "split: no block shared between splits");
        free(cnt);
        free(sp);
    }
    double tol = (double)maxblk / (double)a.count;
    size_t total = 0;
    for (int s = 0; s < 3; s++) {
        size_t c = rep.windows[s + 1];
        total += c;
        tu_expect(fabs((double)c / (double)a.count - p.ratios[s]) <= tol + 1e-12 &&
                      fabs(rep.achieved[s] - (double)c / (double)a.count) < 1e-12 && rep.blocks[s + 1] > 0,
                  "split: %s has %zu windows (%.3f, target %.2f, tolerance %.3f) in %zu blocks",
                  ts_split_name((ts_split_tag)(s + 1)), c, (double)c / (double)a.count, p.ratios[s], tol,
                  rep.blocks[s + 1]);
    }
    tu_expect(total == a.count && rep.windows[TS_SPLIT_BUFFER] == 0, "split: every window tagged, no buffer");
    tu_expect(leaks(&a, 0) > 0, "split: without a buffer, val/test windows do share pixels with train (%zu)",
              leaks(&a, 0));

    /* Shuffled order and thread counts: the same tag per window. */
    for (int threads = 1; threads <= 2; threads++) {
        omp_set_num_threads(threads);
        ts_window_list b;
        ts_window_list_init(&b);
        ts_window_list_copy(&b, &base);
        tu_rng r;
        tu_rng_seed(&r, 99 + (uint64_t)threads);
        for (size_t i = b.count - 1; i > 0; i--) {
            size_t j = (size_t)tu_randint(&r, (int)(i + 1));
            ts_window tw = b.w[i];
            b.w[i] = b.w[j];
            b.w[j] = tw;
            int64_t ti = b.id[i];
            b.id[i] = b.id[j];
            b.id[j] = ti;
        }
        ts_split_report rb;
        tu_expect_ok(ts_split_assign(&b, W, H, &p, &rb), "split: shuffled");
        int same = 1;
        for (size_t i = 0; i < b.count; i++)
            if (b.split[i] != a.split[b.id[i]]) same = 0;
        tu_expect(same && memcmp(rb.windows, rep.windows, sizeof rep.windows) == 0,
                  "split: shuffled order, %d thread(s): identical tags", threads);
        ts_window_list_free(&b);
    }
    ts_threads_init(0);

    /* Another seed gives another split. */
    ts_window_list c;
    ts_window_list_init(&c);
    ts_window_list_copy(&c, &base);
    ts_split_params p2 = p;
    p2.seed = 8;
    tu_expect_ok(ts_split_assign(&c, W, H, &p2, NULL), "split: seed 8");
    size_t diff = 0;
    for (size_t i = 0; i < c.count; i++) diff += c.split[i] != a.split[i];
    tu_expect(diff > c.count / 10, "split: another seed moves windows (%zu)", diff);

    /* The buffer: no val/test window shares a pixel with another split; train untouched. */
    size_t dropped[3] = {0, 0, 0};
    for (int k = 1; k <= 2; k++) {
        ts_window_list_copy(&c, &base);
        p2 = p;
        p2.buffer = k;
        ts_split_report rb;
        tu_expect_ok(ts_split_assign(&c, W, H, &p2, &rb), "split: buffer");
        int consistent = rb.windows[TS_SPLIT_TRAIN] == rep.windows[TS_SPLIT_TRAIN];
        for (size_t i = 0; i < c.count; i++)
            if (c.split[i] != a.split[i] &&
                !(c.split[i] == TS_SPLIT_BUFFER && (a.split[i] == TS_SPLIT_VAL || a.split[i] == TS_SPLIT_TEST)))
                consistent = 0;
        dropped[k] = rb.windows[TS_SPLIT_BUFFER];
        size_t left = rb.windows[TS_SPLIT_VAL] + rb.windows[TS_SPLIT_TEST];
        /* With 15% val/test blocks scattered at random, a 2-block buffer leaves
         * almost nothing; the guarantee is checked with leftovers below. */
        tu_expect(consistent && leaks(&c, (k - 1) * p.block) == 0 && dropped[k] > 0 && (left > 0 || k > 1),
                  "split: buffer %d drops %zu val/test windows, the %zu left are >= %lld px from other splits", k,
                  dropped[k], left, (long long)((k - 1) * p.block));
    }
    tu_expect(dropped[2] > dropped[1], "split: a wider buffer drops more (%zu > %zu)", dropped[2], dropped[1]);
    /* Mostly val: large val regions, so windows survive a 2-block buffer. */
    ts_window_list_copy(&c, &base);
    p2 = p;
    p2.ratios[0] = 0.15, p2.ratios[1] = 0.85, p2.ratios[2] = 0;
    p2.buffer = 2;
    if (tu_expect_ok(ts_split_assign(&c, W, H, &p2, &rep), "split: 0.15/0.85, buffer 2"))
        tu_expect(rep.windows[TS_SPLIT_VAL] > 0 && rep.windows[TS_SPLIT_BUFFER] > 0 && leaks(&c, p.block) == 0,
                  "split: buffer 2 keeps %zu val windows, all >= %lld px from train", rep.windows[TS_SPLIT_VAL],
                  (long long)p.block);

    /* Windows larger than a block: the guarantee holds. */
    ts_window_list_copy(&c, &base);
    p2 = p;
    p2.block = 50;
    p2.buffer = 1;
    if (tu_expect_ok(ts_split_assign(&c, W, H, &p2, &rep), "split: block 50, tile 128"))
        tu_expect(leaks(&c, 0) == 0 && rep.windows[TS_SPLIT_TRAIN] > 0,
                  "split: block smaller than the windows, buffer 1: no shared pixels (%zu val, %zu test left)",
                  rep.windows[TS_SPLIT_VAL], rep.windows[TS_SPLIT_TEST]);

    /* A zero ratio: no windows there. */
    ts_window_list_copy(&c, &base);
    p2 = p;
    p2.ratios[0] = 0.8, p2.ratios[1] = 0.2, p2.ratios[2] = 0;
    tu_expect(ts_split_assign(&c, W, H, &p2, &rep) == TS_OK && rep.windows[TS_SPLIT_TEST] == 0 &&
                  rep.windows[TS_SPLIT_VAL] > 0,
              "split: test ratio 0 gives no test windows");

    /* Errors. */
    p2 = p;
    p2.block = 0;
    tu_expect_error(ts_split_assign(&c, W, H, &p2, NULL), TS_ERR_INVALID_ARG, "split: block 0", "block size 0", NULL);
    p2 = p;
    p2.ratios[1] = -0.1;
    tu_expect_error(ts_split_assign(&c, W, H, &p2, NULL), TS_ERR_INVALID_ARG, "split: negative ratio", "ratio 2",
                    NULL);
    p2 = p;
    p2.block = 8192;
    tu_expect_error(ts_split_assign(&c, W, H, &p2, NULL), TS_ERR_INVALID_ARG, "split: one block for three splits",
                    "1 block", "smaller block", NULL);
    tu_expect_error(ts_split_assign(&c, 1000, 1000, &p, NULL), TS_ERR_INVALID_ARG, "split: windows outside",
                    "not inside the 1000x1000 raster", NULL);
    ts_window_list empty;
    ts_window_list_init(&empty);
    tu_expect_error(ts_split_assign(&empty, W, H, &p, NULL), TS_ERR_INVALID_ARG, "split: no windows", "no windows",
                    NULL);

    /* Ratio strings. */
    double r[3];
    tu_expect(ts_split_parse_ratios("0.8,0.1,0.1", r) == TS_OK && r[0] == 0.8 && r[2] == 0.1, "ratios: three");
    tu_expect(ts_split_parse_ratios("0.7,0.2", r) == TS_OK && fabs(r[2] - 0.1) < 1e-12, "ratios: two, test = rest");
    tu_expect_error(ts_split_parse_ratios("0.8,0.1,0.2", r), TS_ERR_INVALID_ARG, "ratios: sum 1.1", "not 1", NULL);
    tu_expect_error(ts_split_parse_ratios("0.6,0.6", r), TS_ERR_INVALID_ARG, "ratios: two over 1", "exceeds", NULL);
    tu_expect_error(ts_split_parse_ratios("a,b", r), TS_ERR_INVALID_ARG, "ratios: words", "value 1", NULL);
    tu_expect_error(ts_split_parse_ratios("0.8;0.2", r), TS_ERR_INVALID_ARG, "ratios: semicolon", "commas", NULL);

    ts_window_list_free(&a);
    ts_window_list_free(&c);
    ts_window_list_free(&base);
}

int main(void)
{
    ts_threads_init(0);
    ts_gdal_init();
    if (!tu_tmpdir("test_windows")) return 1;
    test_grid();
    test_random();
    test_csv();
    test_read_grid();
    test_vector();
    test_filters();
    test_cache();
    test_split();
    tu_tmpdir_remove();
    GDALDestroyDriverManager();
    OSRCleanup();
    return tu_finish("test_windows");
}
