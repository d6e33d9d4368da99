/* io/polygonize.c against GDAL's own GDALPolygonize (what gdal_polygonize
 * runs) and GDALSieveFilter, and against naive references.
 *
 * Synthetic class rasters (Byte, nodata 255, colour table and category
 * names) are written with the GDAL C API in a mkdtemp folder:
 *   - feature counts and per-class areas equal GDALPolygonize on the same
 *     raster, 4- and 8-connected, on north-up and rotated UTM grids with
 *     non-square pixels; every polygon's area = pixels x |pixel area| and its
 *     geometry has that area; per-class pixel sums equal the raster's counts;
 *   - diagonal pixels: one polygon 8-connected, one per pixel 4-connected;
 *   - the sieve (--mmu) equals GDALSieveFilter + GDALPolygonize;
 *   - the majority filter equals a naive modal filter (nodata kept), and
 *     the polygons after it hold its per-class pixel counts;
 *   - mean confidence equals a hand-computed value;
 *   - holes under an area are filled, larger ones kept; min-area-px drops;
 *     simplification keeps valid geometries;
 *   - GPKG, GeoJSON, Shapefile, FlatGeobuf read back by OGR with the same
 *     polygons; the GPKG's layer_styles row and the .qml sidecar hold a
 *     well-formed categorized QML with every class colour and name;
 *   - a geographic CRS refuses --min-area, takes --min-area-px, and its area
 *     is the ellipsoid's; no georeferencing warns and works in pixels;
 *   - an existing output is refused without overwrite (and kept), and no
 *     file is left under the final or a temporary name after a failure. */
#include <cpl_conv.h>
#include <cpl_minixml.h>
#include <cpl_string.h>
#include <dirent.h>
#include <gdal.h>
#include <gdal_alg.h>
#include <math.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/io.h"
#include "io/polygonize.h"
#include "tests/testutil.h"

static const char *tpath(const char *name) { return tu_path(name); }

static int exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

/* No temporary ("*.tmp-*") file in the folder. */
static int no_temporaries(void)
{
    DIR *d = opendir(tu_path(""));
    if (!d) return 0;
    int ok = 1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strstr(e->d_name, ".tmp-")) {
            printf("  left behind: %s\n", e->d_name);
            ok = 0;
        }
    closedir(d);
    return ok;
}

static char warned[2048];
static void collect_warning(void *ctx, const char *msg)
{
    (void)ctx;
    strncat(warned, msg, sizeof warned - strlen(warned) - 2);
    strcat(warned, "\n");
}

/* ---- rasters ---- */
#define NC 8 /* class ids used: 0..NC-1 */
static const char *const class_names[NC] = {"background", "building", "road & rail", "water <deep>",
                                            "forest",     "crop",     "bare",        "wetland"};
static const uint8_t class_rgb[NC][3] = {{10, 10, 10},  {200, 30, 40}, {250, 200, 0}, {0, 90, 250},
                                         {20, 140, 60}, {180, 220, 90}, {150, 120, 90}, {60, 200, 200}};

static char *wkt_of_epsg(int epsg)
{
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    char *w = NULL, *out = NULL;
    if (OSRImportFromEPSG(s, epsg) == OGRERR_NONE && OSRExportToWkt(s, &w) == OGRERR_NONE) out = strdup(w);
    CPLFree(w);
    OSRDestroySpatialReference(s);
    return out;
}

/* A Byte GeoTIFF of v (W x H); nodata 255 when nd; gt NULL: no georeferencing; epsg 0: no CRS;
 * styled: colour table and category names. */
static int write_raster(const char *path, const uint8_t *v, int W, int H, int nd, const double *gt, int epsg,
                        int styled)
{
    GDALDatasetH ds = GDALCreate(GDALGetDriverByName("GTiff"), path, W, H, 1, GDT_Byte, NULL);
    if (!ds) return 0;
    GDALRasterBandH b = GDALGetRasterBand(ds, 1);
    int ok = GDALRasterIO(b, GF_Write, 0, 0, W, H, (void *)v, W, H, GDT_Byte, 0, 0) == CE_None;
    if (nd) ok = ok && GDALSetRasterNoDataValue(b, 255) == CE_None;
    if (gt) ok = ok && GDALSetGeoTransform(ds, (double *)gt) == CE_None;
    if (epsg) {
        char *wkt = wkt_of_epsg(epsg);
        ok = ok && wkt && GDALSetProjection(ds, wkt) == CE_None;
        free(wkt);
    }
    if (styled) {
        GDALColorTableH ct = GDALCreateColorTable(GPI_RGB);
        for (int i = 0; i < 256; i++) {
            GDALColorEntry e = {0, 0, 0, 0};
            if (i < NC) e = (GDALColorEntry){class_rgb[i][0], class_rgb[i][1], class_rgb[i][2], 255};
            GDALSetColorEntry(ct, i, &e);
        }
        ok = ok && GDALSetRasterColorTable(b, ct) == CE_None;
        GDALDestroyColorTable(ct);
        char **names = NULL;
        for (int i = 0; i < NC; i++) names = CSLAddString(names, class_names[i]);
        ok = ok && GDALSetRasterCategoryNames(b, names) == CE_None;
        CSLDestroy(names);
    }
    GDALClose(ds);
    return ok;
}

static uint32_t hash2(int x, int y, uint32_t seed)
{
    uint32_t h = (uint32_t)x * 0x9E3779B1u ^ ((uint32_t)y * 0x85EBCA77u) ^ seed;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 12;
    h *= 0x297A2D39u;
    h ^= h >> 15;
    return h;
}

/* The scene: nodata corner, a disc, a rectangle with a hole holding another
 * class and a background hole, a diagonal road, a checkerboard patch (4 vs 8
 * connectivity), speckles. */
#define SW 260
#define SH 210
static uint8_t scene_px(int x, int y)
{
    if (x < 20 && y < 15) return 255;
    if (x >= 200 && x < 230 && y >= 150 && y < 180) return (x + y) % 2 ? 5 : 0;
    if (hash2(x, y, 7) % 29 == 0) return (uint8_t)(hash2(x, y, 11) % 6);
    if ((x - 60) * (x - 60) + (y - 50) * (y - 50) < 30 * 30) return 1;
    if (x >= 100 && x < 160 && y >= 20 && y < 80) {
        if (x >= 120 && x < 140 && y >= 40 && y < 60) return 3;
        if (x >= 145 && x < 150 && y >= 30 && y < 33) return 0;
        return 2;
    }
    if (abs(x - y - 60) < 3) return 4;
    if (y > 120 && x < 90) return 6;
    return 0;
}

static uint8_t *make_scene(void)
{
    uint8_t *v = malloc(SW * SH);
    for (int y = 0; y < SH; y++)
        for (int x = 0; x < SW; x++) v[y * SW + x] = scene_px(x, y);
    return v;
}

/* ---- references ---- */
typedef struct cstats {
    int64_t n[NC];       /* features */
    double area[NC];     /* geometry area */
    double attr[NC];     /* the area attribute */
    int64_t pixels[NC];  /* the pixels attribute */
    double conf[NC];     /* sum of the confidence attribute */
    int64_t total;
} cstats;

/* GDALPolygonize of band 1 of path (with its mask) into a memory layer, per class, background 0 skipped. */
static int reference(const char *path, int conn, int mmu, cstats *s)
{
    memset(s, 0, sizeof *s);
    GDALDatasetH in = GDALOpen(path, GA_ReadOnly);
    if (!in) return 0;
    GDALRasterBandH b = GDALGetRasterBand(in, 1);
    GDALDatasetH tmp = NULL;
    if (mmu > 1) {
        /* GDALSieveFilter into a MEM copy, as gdal_sieve does. */
        tmp = GDALCreateCopy(GDALGetDriverByName("MEM"), "", in, FALSE, NULL, NULL, NULL);
        GDALRasterBandH tb = GDALGetRasterBand(tmp, 1);
        if (GDALSieveFilter(tb, GDALGetMaskBand(tb), tb, mmu, conn, NULL, NULL, NULL) != CE_None) return 0;
        b = tb;
    }
    GDALDatasetH mem = GDALCreate(GDALGetDriverByName("Memory"), "ref", 0, 0, 0, GDT_Unknown, NULL);
    OGRLayerH lay = GDALDatasetCreateLayer(mem, "ref", NULL, wkbPolygon, NULL);
    OGRFieldDefnH fd = OGR_Fld_Create("v", OFTInteger);
    OGR_L_CreateField(lay, fd, TRUE);
    OGR_Fld_Destroy(fd);
    char **opt = conn == 8 ? CSLSetNameValue(NULL, "8CONNECTED", "8") : NULL;
    int ok = GDALPolygonize(b, GDALGetMaskBand(b), lay, 0, opt, NULL, NULL) == CE_None;
    CSLDestroy(opt);
    OGRFeatureH f;
    OGR_L_ResetReading(lay);
    while ((f = OGR_L_GetNextFeature(lay)) != NULL) {
        int c = OGR_F_GetFieldAsInteger(f, 0);
        if (c > 0 && c < NC) {
            s->n[c]++;
            s->total++;
            s->area[c] += OGR_G_Area(OGR_F_GetGeometryRef(f));
        }
        OGR_F_Destroy(f);
    }
    GDALClose(mem);
    if (tmp) GDALClose(tmp);
    GDALClose(in);
    return ok;
}

/* Reads an output layer per class; checks every feature's area = pixels x pxarea
 * = geometry area when exact (no simplification or filled holes). */
static int read_output(const char *path, double pxarea, int exact, cstats *s, const char *what)
{
    memset(s, 0, sizeof *s);
    GDALDatasetH ds = GDALOpenEx(path, GDAL_OF_VECTOR | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!tu_expect(ds != NULL, "%s: OGR opens %s", what, path)) return 0;
    OGRLayerH lay = GDALDatasetGetLayer(ds, 0);
    if (strstr(path, ".gpkg")) lay = GDALDatasetGetLayerByName(ds, "polys");
    OGRFeatureDefnH d = lay ? OGR_L_GetLayerDefn(lay) : NULL;
    const int ic = d ? OGR_FD_GetFieldIndex(d, "class_id") : -1, in = d ? OGR_FD_GetFieldIndex(d, "class_name") : -1,
              ia = d ? OGR_FD_GetFieldIndex(d, "area") : -1, ip = d ? OGR_FD_GetFieldIndex(d, "pixels") : -1,
              iconf = d ? OGR_FD_GetFieldIndex(d, "confidence") : -1;
    int ok = tu_expect(ic >= 0 && in >= 0 && ia >= 0 && ip >= 0, "%s: fields class_id class_name area pixels", what);
    int bad = 0;
    OGRFeatureH f;
    while (ok && (f = OGR_L_GetNextFeature(lay)) != NULL) {
        const int c = OGR_F_GetFieldAsInteger(f, ic);
        OGRGeometryH g = OGR_F_GetGeometryRef(f);
        const double ga = g ? OGR_G_Area(g) : -1, at = OGR_F_GetFieldAsDouble(f, ia);
        const int64_t px = OGR_F_GetFieldAsInteger64(f, ip);
        if (c < 0 || c >= NC) {
            bad++;
        } else {
            s->n[c]++;
            s->total++;
            s->area[c] += ga;
            s->attr[c] += at;
            s->pixels[c] += px;
            if (iconf >= 0) s->conf[c] += OGR_F_GetFieldAsDouble(f, iconf);
            if (strcmp(OGR_F_GetFieldAsString(f, in), class_names[c]) != 0) bad++;
            if (exact && (fabs(at - px * pxarea) > 1e-9 * at + 1e-9 || fabs(ga - at) > 1e-9 * at + 1e-6)) {
                if (bad < 3)
                    printf("  %s: class %d: area %.10g, pixels %lld x %g, geometry %.10g\n", what, c, at,
                           (long long)px, pxarea, ga);
                bad++;
            }
        }
        OGR_F_Destroy(f);
    }
    GDALClose(ds);
    return tu_expect(ok && bad == 0, "%s: %d features with a bad class, name or area", what, bad);
}

/* Counts, per-class areas and pixel sums against the reference. */
static void compare(const char *what, const cstats *got, const cstats *ref, const int64_t *class_pixels, double pxarea)
{
    int bad = 0;
    for (int c = 1; c < NC; c++) {
        if (got->n[c] != ref->n[c] || fabs(got->area[c] - ref->area[c]) > 1e-9 * ref->area[c] + 1e-6) {
            printf("  %s: class %d: %lld features, area %.10g; GDALPolygonize %lld, %.10g\n", what, c,
                   (long long)got->n[c], got->area[c], (long long)ref->n[c], ref->area[c]);
            bad++;
        }
        if (class_pixels && (got->pixels[c] != class_pixels[c] ||
                             fabs(got->attr[c] - class_pixels[c] * pxarea) > 1e-9 * got->attr[c] + 1e-9)) {
            printf("  %s: class %d: %lld pixels, area %.10g; the raster has %lld pixels\n", what, c,
                   (long long)got->pixels[c], got->attr[c], (long long)class_pixels[c]);
            bad++;
        }
    }
    tu_expect(bad == 0, "%s: %lld features vs GDALPolygonize %lld, per-class counts and areas", what,
              (long long)got->total, (long long)ref->total);
}

static void count_classes(const uint8_t *v, size_t n, int64_t *cnt)
{
    memset(cnt, 0, NC * sizeof *cnt);
    for (size_t i = 0; i < n; i++)
        if (v[i] < NC) cnt[v[i]]++;
}

static ts_polygonize_params params(const char *in, const char *out)
{
    ts_polygonize_params p;
    ts_polygonize_params_init(&p);
    p.input = in;
    p.output = out;
    p.layer = "polys";
    p.warn = collect_warning;
    return p;
}

/* ---- tests ---- */
static void test_against_gdal(void)
{
    uint8_t *v = make_scene();
    int64_t cnt[NC];
    count_classes(v, SW * SH, cnt);
    /* north-up with non-square pixels, and a rotated grid */
    static const double gts[2][6] = {{500000.0, 10.0, 0.0, 4600000.0, 0.0, -7.5},
                                     {500000.0, 8.0, 3.0, 4600000.0, 2.0, -9.0}};
    for (int g = 0; g < 2; g++) {
        const char *in = tpath(g ? "rotated.tif" : "northup.tif");
        if (!tu_expect(write_raster(in, v, SW, SH, 1, gts[g], 32633, 1), "write %s", in)) continue;
        const double pxarea = fabs(gts[g][1] * gts[g][5] - gts[g][2] * gts[g][4]);
        for (int conn = 4; conn <= 8; conn += 4) {
            char what[64], out[64];
            snprintf(what, sizeof what, "%s, %d-connected", g ? "rotated" : "north-up", conn);
            snprintf(out, sizeof out, "scene_%d_%d.gpkg", g, conn);
            ts_polygonize_params p = params(in, tpath(out));
            p.connectivity = conn;
            ts_polygonize_report r;
            if (!tu_expect_ok(ts_polygonize(&p, &r), what)) continue;
            cstats got, ref;
            if (!read_output(tpath(out), pxarea, 1, &got, what)) continue;
            if (!tu_expect(reference(in, conn, 0, &ref), "%s: GDALPolygonize", what)) continue;
            compare(what, &got, &ref, cnt, pxarea);
            tu_expect(r.features == ref.total && r.regions == ref.total, "%s: report %lld features, %lld regions",
                      what, (long long)r.features, (long long)r.regions);
            tu_expect(fabs(r.pixel_area - pxarea) < 1e-9, "%s: pixel area %g", what, r.pixel_area);
            printf("  %s: %lld polygons, GDALPolygonize %lld; %lld repaired by make-valid\n", what,
                   (long long)got.total, (long long)ref.total, (long long)r.made_valid);
        }
    }
    /* The sieve around a nodata corner equals GDALSieveFilter with the nodata mask. */
    for (int conn = 4; conn <= 8; conn += 4) {
        ts_polygonize_params p = params(tpath("northup.tif"), tpath(conn == 4 ? "mmu4.gpkg" : "mmu8.gpkg"));
        p.connectivity = conn;
        p.mmu_px = 10;
        cstats got, ref;
        if (tu_expect_ok(ts_polygonize(&p, NULL), "scene --mmu 10") && read_output(p.output, 75.0, 1, &got, "mmu") &&
            tu_expect(reference(tpath("northup.tif"), conn, 10, &ref), "GDALSieveFilter + GDALPolygonize")) {
            compare(conn == 4 ? "scene --mmu 10, 4-connected" : "scene --mmu 10, 8-connected", &got, &ref, NULL, 75.0);
            printf("  scene --mmu 10, %d-connected: %lld polygons, GDALSieveFilter + GDALPolygonize %lld\n", conn,
                   (long long)got.total, (long long)ref.total);
        }
    }
    tu_expect(no_temporaries(), "no temporary files after the runs");
    free(v);
}

static void test_diagonal(void)
{
    enum { W = 7, H = 7 };
    uint8_t v[W * H] = {0};
    for (int i = 0; i < 6; i++) v[i * W + i] = 1;
    v[6 * W + 0] = 2;
    v[5 * W + 1] = 2; /* two class-2 pixels touching by a corner */
    const double gt[6] = {300000, 2, 0, 5000000, 0, -2};
    const char *in = tpath("diag.tif");
    tu_expect(write_raster(in, v, W, H, 1, gt, 32633, 1), "write diag.tif");
    for (int conn = 4; conn <= 8; conn += 4) {
        const char *out = tpath(conn == 4 ? "diag4.gpkg" : "diag8.gpkg");
        ts_polygonize_params p = params(in, out);
        p.connectivity = conn;
        ts_polygonize_report r;
        tu_expect_ok(ts_polygonize(&p, &r), "diagonal");
        cstats got, ref;
        if (!read_output(out, 4.0, 1, &got, "diagonal") || !reference(in, conn, 0, &ref)) continue;
        compare("diagonal", &got, &ref, NULL, 4.0);
        tu_expect(got.n[1] == (conn == 4 ? 6 : 1) && got.n[2] == (conn == 4 ? 2 : 1),
                  "diagonal %d-connected: %lld class-1 and %lld class-2 polygons", conn, (long long)got.n[1],
                  (long long)got.n[2]);
        tu_expect(got.pixels[1] == 6 && fabs(got.area[1] - 24.0) < 1e-9, "diagonal: 6 pixels, area 24 (got %lld, %g)",
                  (long long)got.pixels[1], got.area[1]);
    }
}

static void test_sieve(void)
{
    enum { W = 120, H = 90 };
    uint8_t *v = malloc(W * H);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            uint8_t c = x < 60 ? 1 : 2;
            if (y > 60) c = 0;
            const uint32_t h = hash2(x, y, 3);
            if (h % 41 == 0) c = (uint8_t)(3 + h / 41 % 3); /* speckles of 1 pixel */
            if (x >= 10 && x < 13 && y >= 10 && y < 12) c = 4; /* 6 pixels */
            if (x >= 30 && x < 32 && y >= 10 && y < 12) c = 5; /* 4 pixels */
            v[y * W + x] = c;
        }
    const double gt[6] = {400000, 5, 0, 4500000, 0, -5};
    const char *in = tpath("sieve.tif");
    tu_expect(write_raster(in, v, W, H, 1, gt, 32633, 1), "write sieve.tif");
    for (int conn = 4; conn <= 8; conn += 4) {
        ts_polygonize_params p = params(in, tpath(conn == 4 ? "sieve4.fgb" : "sieve8.fgb"));
        p.connectivity = conn;
        p.mmu_px = 5;
        tu_expect_ok(ts_polygonize(&p, NULL), "sieve");
        cstats got, ref, plain;
        if (!read_output(p.output, 25.0, 1, &got, "sieve") || !reference(in, conn, 5, &ref) ||
            !reference(in, conn, 0, &plain))
            continue;
        compare(conn == 4 ? "sieve --mmu 5, 4-connected" : "sieve --mmu 5, 8-connected", &got, &ref, NULL, 25.0);
        tu_expect(got.total < plain.total && got.n[4] >= 1 && got.n[5] == 0,
                  "sieve: %lld polygons after, %lld before; the 6-pixel block stays, the 4-pixel one goes",
                  (long long)got.total, (long long)plain.total);
    }
    free(v);
}

/* The naive modal filter: the same rule as ts_majority_filter, written plainly. */
static uint8_t naive_mode(const uint8_t *v, int W, int H, int x, int y, int size)
{
    if (v[y * W + x] == 255) return 255;
    int cnt[256] = {0};
    const int r = size / 2;
    for (int yy = y - r; yy <= y + r; yy++)
        for (int xx = x - r; xx <= x + r; xx++)
            if (yy >= 0 && yy < H && xx >= 0 && xx < W && v[yy * W + xx] != 255) cnt[v[yy * W + xx]]++;
    int best = 0;
    for (int c = 0; c < 255; c++)
        if (cnt[c] > cnt[best]) best = c;
    const uint8_t centre = v[y * W + x];
    return cnt[centre] == cnt[best] ? centre : (uint8_t)best;
}

static void test_majority(void)
{
    enum { W = 97, H = 83 };
    uint8_t *v = malloc(W * H), *want = malloc(W * H), *got = malloc(W * H);
    tu_rng rng;
    tu_rng_seed(&rng, 5);
    for (int i = 0; i < W * H; i++) {
        const int x = i % W, y = i / W;
        uint8_t c = (uint8_t)((x / 9 + y / 7) % 4);
        if (tu_randint(&rng, 5) == 0) c = (uint8_t)tu_randint(&rng, 5);
        if (tu_randint(&rng, 17) == 0 || (x > 70 && y < 10)) c = 255;
        v[i] = c;
    }
    GDALDriverH mem = GDALGetDriverByName("MEM");
    for (int size = 3; size <= 5; size += 2) {
        GDALDatasetH s = GDALCreate(mem, "", W, H, 1, GDT_Byte, NULL), d = GDALCreate(mem, "", W, H, 1, GDT_Byte, NULL);
        tu_expect(GDALRasterIO(GDALGetRasterBand(s, 1), GF_Write, 0, 0, W, H, v, W, H, GDT_Byte, 0, 0) == CE_None,
                  "write the majority input");
        int64_t changed = -1, want_changed = 0;
        tu_expect_ok(ts_majority_filter(GDALGetRasterBand(s, 1), GDALGetRasterBand(d, 1), size, 1, 255, &changed),
                     "majority filter");
        tu_expect(GDALRasterIO(GDALGetRasterBand(d, 1), GF_Read, 0, 0, W, H, got, W, H, GDT_Byte, 0, 0) == CE_None,
                  "read the majority output");
        int diff = 0;
        for (int i = 0; i < W * H; i++) {
            want[i] = naive_mode(v, W, H, i % W, i / W, size);
            diff += want[i] != got[i];
            want_changed += want[i] != v[i];
        }
        tu_expect(diff == 0 && changed == want_changed,
                  "majority %dx%d: %d pixels differ from the naive filter; %lld changed (want %lld)", size, size, diff,
                  (long long)changed, (long long)want_changed);
        GDALClose(s);
        GDALClose(d);
    }
    /* The whole pipeline: per-class pixels after --majority 3 equal the naive filter's. */
    const double gt[6] = {0, 1, 0, 0, 0, -1};
    const char *in = tpath("majority.tif");
    tu_expect(write_raster(in, v, W, H, 1, gt, 32633, 1), "write majority.tif");
    for (int i = 0; i < W * H; i++) want[i] = naive_mode(v, W, H, i % W, i / W, 3);
    int64_t cnt[NC];
    count_classes(want, W * H, cnt);
    ts_polygonize_params p = params(in, tpath("majority.geojson"));
    p.majority = 3;
    tu_expect_ok(ts_polygonize(&p, NULL), "polygonize --majority 3");
    cstats s;
    if (read_output(p.output, 1.0, 1, &s, "majority")) {
        int bad = 0;
        for (int c = 1; c < NC; c++) bad += s.pixels[c] != cnt[c];
        tu_expect(bad == 0, "--majority 3: per-class pixels of the polygons equal the naive filter's");
    }
    free(v);
    free(want);
    free(got);
}

static void test_confidence(void)
{
    enum { W = 10, H = 8 };
    uint8_t v[W * H] = {0}, conf[W * H];
    for (int i = 0; i < W * H; i++) conf[i] = (uint8_t)(i * 7 % 256);
    /* class 1: a 3x2 block at (2,1); class 2: everything right of column 6 */
    double sum1 = 0, sum2 = 0;
    int n2 = 0;
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            if (x >= 2 && x < 5 && y >= 1 && y < 3) {
                v[y * W + x] = 1;
                sum1 += conf[y * W + x];
            } else if (x > 6) {
                v[y * W + x] = 2;
                if (y == 0) conf[y * W + x] = 0; /* nodata of the confidence raster: not counted */
                else {
                    sum2 += conf[y * W + x];
                    n2++;
                }
            }
        }
    const double gt[6] = {600000, 3, 0, 4000000, 0, -3};
    const char *in = tpath("conf_classes.tif"), *cf = tpath("conf.tif");
    tu_expect(write_raster(in, v, W, H, 1, gt, 32633, 1), "write conf_classes.tif");
    GDALDatasetH ds = GDALCreate(GDALGetDriverByName("GTiff"), cf, W, H, 2, GDT_Byte, NULL);
    GDALSetGeoTransform(ds, (double *)gt);
    tu_expect(GDALRasterIO(GDALGetRasterBand(ds, 2), GF_Write, 0, 0, W, H, conf, W, H, GDT_Byte, 0, 0) == CE_None,
              "write the confidence raster");
    GDALSetRasterNoDataValue(GDALGetRasterBand(ds, 2), 0);
    GDALClose(ds);
    ts_polygonize_params p = params(in, tpath("conf.gpkg"));
    p.confidence = cf;
    p.confidence_band = 2;
    tu_expect_ok(ts_polygonize(&p, NULL), "polygonize --confidence");
    cstats s;
    if (read_output(p.output, 9.0, 1, &s, "confidence")) {
        const double want1 = sum1 / 6 / 255, want2 = sum2 / n2 / 255;
        tu_expect(s.n[1] == 1 && fabs(s.conf[1] - want1) < 1e-12 && s.n[2] == 1 && fabs(s.conf[2] - want2) < 1e-12,
                  "mean confidence %.12g and %.12g, by hand %.12g and %.12g", s.conf[1], s.conf[2], want1, want2);
    }
    /* With a GDAL scale on the band (terraseg predict's 1/254), the scale is used. */
    ds = GDALOpen(cf, GA_Update);
    tu_expect(ds && GDALSetRasterScale(GDALGetRasterBand(ds, 2), 1.0 / 254) == CE_None, "set the confidence scale");
    if (ds) GDALClose(ds);
    p = params(in, tpath("conf_scaled.gpkg"));
    p.confidence = cf;
    p.confidence_band = 2;
    tu_expect_ok(ts_polygonize(&p, NULL), "polygonize --confidence with a scaled band");
    if (read_output(p.output, 9.0, 1, &s, "confidence")) {
        const double want1 = sum1 / 6 / 254, want2 = sum2 / n2 / 254;
        tu_expect(fabs(s.conf[1] - want1) < 1e-12 && fabs(s.conf[2] - want2) < 1e-12,
                  "scaled mean confidence %.12g and %.12g, by hand %.12g and %.12g", s.conf[1], s.conf[2], want1,
                  want2);
    }
    /* A confidence raster on another grid is refused, and nothing is written. */
    const char *small = tpath("conf_small.tif");
    ds = GDALCreate(GDALGetDriverByName("GTiff"), small, W - 1, H, 1, GDT_Byte, NULL);
    GDALClose(ds);
    p = params(in, tpath("conf_bad.gpkg"));
    p.confidence = small;
    tu_expect_error(ts_polygonize(&p, NULL), TS_ERR_INVALID_ARG, "confidence on another grid", "--confidence",
                    "conf_small.tif", "9x8", NULL);
    tu_expect(!exists(p.output) && no_temporaries(), "nothing left after the confidence error");
}

static void test_holes_area_simplify(void)
{
    enum { W = 40, H = 30 };
    uint8_t v[W * H] = {0};
    for (int y = 5; y < 25; y++)
        for (int x = 5; x < 35; x++) v[y * W + x] = 2;
    for (int y = 8; y < 10; y++)
        for (int x = 8; x < 10; x++) v[y * W + x] = 0; /* a 4-pixel hole */
    for (int y = 12; y < 18; y++)
        for (int x = 20; x < 26; x++) v[y * W + x] = 3; /* a 36-pixel hole holding class 3 */
    v[1 * W + 1] = 1;
    v[1 * W + 2] = 1; /* a 2-pixel polygon */
    const double gt[6] = {700000, 2, 0, 4100000, 0, -2};
    const char *in = tpath("holes.tif");
    tu_expect(write_raster(in, v, W, H, 1, gt, 32633, 1), "write holes.tif");
    ts_polygonize_params p = params(in, tpath("holes.gpkg"));
    p.fill_holes_px = 5;
    ts_polygonize_report r;
    tu_expect_ok(ts_polygonize(&p, &r), "--fill-holes-px 5");
    cstats s;
    if (read_output(p.output, 4.0, 0, &s, "holes")) {
        const int64_t px2 = 20 * 30 - 4 - 36;
        tu_expect(r.holes_filled == 1 && s.pixels[2] == px2 && fabs(s.area[2] - (px2 + 4) * 4.0) < 1e-6,
                  "the 4-pixel hole is filled, the 36-pixel one kept: %lld filled, area %g (want %g)",
                  (long long)r.holes_filled, s.area[2], (px2 + 4) * 4.0);
    }
    /* map units: 4 px = 16 m^2 < 20 */
    p = params(in, tpath("holes_m.gpkg"));
    p.fill_holes = 20;
    p.min_area = 10; /* the 2-pixel polygon (8 m^2) goes */
    tu_expect_ok(ts_polygonize(&p, &r), "--fill-holes 20 --min-area 10");
    tu_expect(r.holes_filled == 1 && r.dropped_small == 1 && r.features == 2,
              "--fill-holes 20 --min-area 10: %lld filled, %lld dropped, %lld written", (long long)r.holes_filled,
              (long long)r.dropped_small, (long long)r.features);
    p = params(in, tpath("holes_px.gpkg"));
    p.min_area_px = 3;
    tu_expect_ok(ts_polygonize(&p, &r), "--min-area-px 3");
    tu_expect(r.dropped_small == 1 && r.features == 2, "--min-area-px 3: %lld dropped", (long long)r.dropped_small);
    /* simplification keeps every polygon valid */
    /* FlatGeobuf: strict about the layer's MultiPolygon type */
    p = params(tpath("northup.tif"), tpath("simplified.fgb"));
    p.simplify = 12;
    p.connectivity = 8;
    tu_expect_ok(ts_polygonize(&p, &r), "--simplify 12");
    GDALDatasetH ds = GDALOpenEx(p.output, GDAL_OF_VECTOR, NULL, NULL, NULL);
    OGRLayerH lay = ds ? GDALDatasetGetLayer(ds, 0) : NULL;
    int invalid = 0, n = 0;
    OGRFeatureH f;
    while (lay && (f = OGR_L_GetNextFeature(lay)) != NULL) {
        invalid += !OGR_G_IsValid(OGR_F_GetGeometryRef(f));
        n++;
        OGR_F_Destroy(f);
    }
    if (ds) GDALClose(ds);
    tu_expect(n > 0 && invalid == 0 && n + r.dropped_empty == r.regions,
              "--simplify: %d polygons, %d invalid, %lld regions", n, invalid, (long long)r.regions);
}

/* ---- formats and styles ---- */
static int qml_ok(const char *qml, const char *what)
{
    CPLXMLNode *root = CPLParseXMLString(qml);
    if (!tu_expect(root != NULL, "%s: the QML parses as XML", what)) return 0;
    CPLXMLNode *q = CPLGetXMLNode(root, "=qgis");
    CPLXMLNode *rd = q ? CPLGetXMLNode(q, "renderer-v2") : NULL;
    int ok = tu_expect(rd && strcmp(CPLGetXMLValue(rd, "type", ""), "categorizedSymbol") == 0 &&
                           strcmp(CPLGetXMLValue(rd, "attr", ""), "class_id") == 0,
                       "%s: a categorizedSymbol renderer on class_id", what);
    int ncat = 0, nsym = 0, colours = 0, names = 0;
    for (CPLXMLNode *c = rd ? CPLGetXMLNode(rd, "categories")->psChild : NULL; c; c = c->psNext)
        if (c->eType == CXT_Element && strcmp(c->pszValue, "category") == 0) {
            ncat++;
            const int id = atoi(CPLGetXMLValue(c, "value", "-1"));
            names += id > 0 && id < NC && strcmp(CPLGetXMLValue(c, "label", ""), class_names[id]) == 0;
        }
    for (CPLXMLNode *s = rd ? CPLGetXMLNode(rd, "symbols")->psChild : NULL; s; s = s->psNext)
        if (s->eType == CXT_Element && strcmp(s->pszValue, "symbol") == 0) nsym++;
    for (int c = 1; c < NC - 1; c++) {
        char col[64];
        snprintf(col, sizeof col, "name=\"color\" value=\"%d,%d,%d,255\"", class_rgb[c][0], class_rgb[c][1],
                 class_rgb[c][2]);
        colours += strstr(qml, col) != NULL;
    }
    /* the scene has classes 1..6 (7 is unused) */
    ok &= tu_expect(ncat == 6 && nsym == 6 && names == 6 && colours == 6,
                    "%s: %d categories, %d symbols, %d names and %d colours (want 6)", what, ncat, nsym, names,
                    colours);
    CPLDestroyXMLNode(root);
    return ok;
}

static void test_formats_and_style(void)
{
    const char *in = tpath("northup.tif");
    const double pxarea = 75.0;
    cstats ref;
    if (!tu_expect(reference(in, 4, 0, &ref), "GDALPolygonize")) return;
    static const char *const outs[] = {"fmt.gpkg", "fmt.geojson", "fmt.shp", "fmt.fgb", "fmt2.json"};
    for (int i = 0; i < 5; i++) {
        ts_polygonize_params p = params(in, tpath(outs[i]));
        ts_polygonize_report r;
        if (!tu_expect_ok(ts_polygonize(&p, &r), outs[i])) continue;
        cstats got;
        if (read_output(p.output, pxarea, 1, &got, outs[i])) compare(outs[i], &got, &ref, NULL, pxarea);
        if (i > 0) {
            char qml[600];
            snprintf(qml, sizeof qml, "%s", p.output);
            strcpy(strrchr(qml, '.'), ".qml");
            char *text = NULL;
            VSILFILE *f = VSIFOpenL(qml, "rb");
            if (tu_expect(f != NULL, "%s: the sidecar %s exists", outs[i], qml)) {
                VSIFSeekL(f, 0, SEEK_END);
                size_t n = (size_t)VSIFTellL(f);
                VSIFSeekL(f, 0, SEEK_SET);
                text = calloc(n + 1, 1);
                VSIFReadL(text, 1, n, f);
                VSIFCloseL(f);
                qml_ok(text, qml);
            }
            free(text);
        }
    }
    /* the GeoPackage's layer_styles row, as QGIS reads it */
    GDALDatasetH ds = GDALOpenEx(tpath("fmt.gpkg"), GDAL_OF_VECTOR, NULL, NULL, NULL);
    OGRLayerH ls = ds ? GDALDatasetGetLayerByName(ds, "layer_styles") : NULL;
    OGRLayerH pl = ds ? GDALDatasetGetLayerByName(ds, "polys") : NULL;
    if (tu_expect(ls && pl, "fmt.gpkg holds layer_styles and polys")) {
        OGRFeatureDefnH d = OGR_L_GetLayerDefn(ls);
        static const char *const cols[] = {"f_table_catalog", "f_table_schema", "f_table_name", "f_geometry_column",
                                           "styleName", "styleQML", "styleSLD", "useAsDefault", "description",
                                           "owner", "ui", "update_time"};
        int missing = 0;
        for (int i = 0; i < 12; i++) missing += OGR_FD_GetFieldIndex(d, cols[i]) < 0;
        tu_expect(missing == 0 && strcmp(OGR_L_GetFIDColumn(ls), "id") == 0,
                  "layer_styles has QGIS's columns (%d missing) and FID id (%s)", missing, OGR_L_GetFIDColumn(ls));
        tu_expect(OGR_L_GetFeatureCount(ls, TRUE) == 1, "one style row");
        OGRFeatureH f = OGR_L_GetNextFeature(ls);
        if (f) {
            tu_expect(strcmp(OGR_F_GetFieldAsString(f, OGR_FD_GetFieldIndex(d, "f_table_name")), "polys") == 0 &&
                          strcmp(OGR_F_GetFieldAsString(f, OGR_FD_GetFieldIndex(d, "f_geometry_column")),
                                 OGR_L_GetGeometryColumn(pl)) == 0 &&
                          strcmp(OGR_F_GetFieldAsString(f, OGR_FD_GetFieldIndex(d, "f_table_schema")), "") == 0 &&
                          OGR_F_GetFieldAsInteger(f, OGR_FD_GetFieldIndex(d, "useAsDefault")) == 1,
                      "the style row names the layer and its geometry column and is the default");
            qml_ok(OGR_F_GetFieldAsString(f, OGR_FD_GetFieldIndex(d, "styleQML")), "layer_styles.styleQML");
            OGR_F_Destroy(f);
        }
        OGRSpatialReferenceH srs = OGR_L_GetSpatialRef(pl);
        tu_expect(srs && OSRGetAuthorityCode(srs, NULL) && strcmp(OSRGetAuthorityCode(srs, NULL), "32633") == 0,
                  "the layer's CRS is the raster's (EPSG:32633)");
    }
    if (ds) GDALClose(ds);
    /* the layer is named after the file by default */
    ts_polygonize_params p = params(in, tpath("named.fgb"));
    p.layer = NULL;
    ts_polygonize_report r;
    tu_expect_ok(ts_polygonize(&p, &r), "default layer name");
    tu_expect(strcmp(r.layer, "named") == 0, "default layer name '%s' is the file stem", r.layer);
    tu_expect(no_temporaries(), "no temporary files after the formats");
}

static void test_crs_cases(void)
{
    enum { W = 30, H = 20 };
    uint8_t v[W * H] = {0};
    for (int y = 2; y < 12; y++)
        for (int x = 3; x < 13; x++) v[y * W + x] = 1;
    v[15 * W + 20] = 2;
    const double gt[6] = {10.0, 0.01, 0, 45.0, 0, -0.01};
    const char *in = tpath("geo.tif");
    tu_expect(write_raster(in, v, W, H, 1, gt, 4326, 1), "write geo.tif");
    ts_polygonize_params p = params(in, tpath("geo.gpkg"));
    p.min_area = 100;
    tu_expect_error(ts_polygonize(&p, NULL), TS_ERR_INVALID_ARG, "--min-area in degrees", "--min-area",
                    "--min-area-px", "geographic", NULL);
    tu_expect(!exists(p.output) && no_temporaries(), "nothing written after the --min-area refusal");
    p.min_area = 0;
    p.fill_holes = 5;
    tu_expect_error(ts_polygonize(&p, NULL), TS_ERR_INVALID_ARG, "--fill-holes in degrees", "--fill-holes-px", NULL);
    p.fill_holes = 0;
    p.min_area_px = 2;
    warned[0] = '\0';
    ts_polygonize_report r;
    tu_expect_ok(ts_polygonize(&p, &r), "geographic with --min-area-px");
    tu_expect(r.geographic && r.features == 1 && r.dropped_small == 1 && strstr(warned, "geographic"),
              "geographic: %lld written, %lld dropped, warned '%s'", (long long)r.features,
              (long long)r.dropped_small, warned);
    /* the area attribute: 10x10 pixels of 0.01 degrees at 44.88..44.98 N on WGS84 */
    double want = 0;
    for (int y = 2; y < 12; y++) {
        const double d2r = M_PI / 180, lat0 = (45.0 - 0.01 * y) * d2r, lat1 = (45.0 - 0.01 * (y + 1)) * d2r;
        want += 10 * ts_ellipsoid_cell_area(6378137.0, 6356752.314245179, lat0, lat1, 0.01 * d2r);
    }
    cstats s;
    if (read_output(p.output, 0, 0, &s, "geographic"))
        tu_expect(fabs(s.attr[1] - want) < 1e-6 * want && want > 8.7e7 && want < 8.8e7,
                  "geographic area %.3f m^2, want %.3f (about 0.1 deg lon x 0.1 deg lat at 45 N)", s.attr[1], want);
    /* the formula: the whole WGS84 ellipsoid, and a 1x1 degree cell at the equator */
    const double a = 6378137.0, b = 6356752.314245179;
    const double earth = ts_ellipsoid_cell_area(a, b, -M_PI / 2, M_PI / 2, 2 * M_PI);
    const double cell = ts_ellipsoid_cell_area(a, b, 0, M_PI / 180, M_PI / 180);
    tu_expect(fabs(earth - 510065621.7e6) < 1e-6 * earth && fabs(cell - 12308.778e6) < 1e-4 * cell,
              "ellipsoid areas: earth %.1f km^2 (510065621.7), 1x1 degree at the equator %.3f km^2 (12308.778)",
              earth / 1e6, cell / 1e6);
    /* no georeferencing: pixel space, with a warning */
    const char *in2 = tpath("nogeo.tif");
    tu_expect(write_raster(in2, v, W, H, 0, NULL, 0, 1), "write nogeo.tif");
    p = params(in2, tpath("nogeo.geojson"));
    warned[0] = '\0';
    tu_expect_ok(ts_polygonize(&p, &r), "no georeferencing");
    tu_expect(!r.georeferenced && strstr(warned, "no georeferencing") && r.features == 2,
              "no georeferencing: warned '%s', %lld features", warned, (long long)r.features);
    if (read_output(p.output, 1.0, 1, &s, "pixel space"))
        tu_expect(s.attr[1] == 100 && s.pixels[1] == 100,
                  "pixel space: area %g = 100 pixels", s.attr[1]);
}

static void test_errors(void)
{
    const char *in = tpath("diag.tif"), *out = tpath("exists.gpkg");
    FILE *f = fopen(out, "w");
    fputs("keep me", f);
    fclose(f);
    ts_polygonize_params p = params(in, out);
    tu_expect_error(ts_polygonize(&p, NULL), TS_ERR_INVALID_ARG, "existing output", "exists.gpkg", "--overwrite",
                    NULL);
    char buf[16] = {0};
    f = fopen(out, "r");
    tu_expect(f && fread(buf, 1, 7, f) == 7 && strcmp(buf, "keep me") == 0, "the existing output is untouched");
    if (f) fclose(f);
    p.overwrite = 1;
    tu_expect_ok(ts_polygonize(&p, NULL), "--overwrite");
    GDALDatasetH ds = GDALOpenEx(out, GDAL_OF_VECTOR, NULL, NULL, NULL);
    tu_expect(ds != NULL, "the overwritten output is a GeoPackage");
    if (ds) GDALClose(ds);
    /* bad options and inputs: nothing under the final name, no temporaries */
    struct {
        const char *out;
        int conn, majority;
        const char *in;
        const char *want;
    } bad[] = {
        {"bad1.gpkg", 6, 0, NULL, "--connectivity"},
        {"bad2.gpkg", 4, 4, NULL, "--majority"},
        {"bad3.xyz", 4, 0, NULL, ".gpkg"},
        {"bad4.gpkg", 4, 0, "no_such.tif", "no_such.tif"},
        {"bad5.gpkg", 4, 0, "conf.gpkg", "conf.gpkg"},
    };
    for (int i = 0; i < 5; i++) {
        p = params(bad[i].in ? tpath(bad[i].in) : in, tpath(bad[i].out));
        p.connectivity = bad[i].conn;
        p.majority = bad[i].majority;
        ts_status st = ts_polygonize(&p, NULL);
        tu_expect(st != TS_OK && strstr(ts_last_error(), bad[i].want), "%s: fails naming %s (%s)", bad[i].out,
                  bad[i].want, ts_last_error());
        tu_expect(!exists(p.output), "%s: nothing under the final name", bad[i].out);
    }
    /* a float raster is not a class map */
    const char *fl = tpath("float.tif");
    ds = GDALCreate(GDALGetDriverByName("GTiff"), fl, 4, 4, 1, GDT_Float32, NULL);
    GDALClose(ds);
    p = params(fl, tpath("float.gpkg"));
    tu_expect_error(ts_polygonize(&p, NULL), TS_ERR_INVALID_ARG, "float class raster", "float.tif", "Float32", NULL);
    tu_expect(!exists(p.output) && no_temporaries(), "nothing left after the errors");
    /* all background: an empty layer and a warning */
    uint8_t zero[16] = {0};
    const double gt[6] = {0, 1, 0, 4, 0, -1};
    tu_expect(write_raster(tpath("zero.tif"), zero, 4, 4, 1, gt, 32633, 0), "write zero.tif");
    p = params(tpath("zero.tif"), tpath("zero.fgb"));
    warned[0] = '\0';
    ts_polygonize_report r;
    tu_expect_ok(ts_polygonize(&p, &r), "all background");
    ds = GDALOpenEx(p.output, GDAL_OF_VECTOR, NULL, NULL, NULL);
    tu_expect(ds && r.features == 0 && strstr(warned, "no polygons"), "all background: an empty layer, warned '%s'",
              warned);
    if (ds) GDALClose(ds);
}

int main(void)
{
    ts_gdal_init();
    if (!tu_tmpdir("test_polygonize")) return 1;
    test_against_gdal();
    test_diagonal();
    test_sieve();
    test_majority();
    test_confidence();
    test_holes_area_simplify();
    test_formats_and_style();
    test_crs_cases();
    test_errors();
    tu_tmpdir_remove();
    return tu_finish("polygonize");
}
