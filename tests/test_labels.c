/* io/labels.c: labels on the image grid, against GDAL's own utilities.
 *
 * Vector labels (GPKG, Shapefile, GeoJSON, FlatGeobuf) read window by window
 * must equal GDALRasterize() (gdal_rasterize) onto the whole image pixel for
 * pixel: integer attribute, burn value, name map, overlapping features (later
 * wins), with and without ALL_TOUCHED, labels in EPSG:4326 over a UTM image,
 * windows at odd offsets and partly off the image; and under stress, 1000
 * overlapping polygons with shuffled/deleted FIDs or an indexed class
 * attribute, read whole and block by block. Raster masks at another
 * resolution/CRS must equal GDALWarp() -r near -et 0 onto the image grid
 * (outside the footprint and nodata -> ignore); colour maps, binary mode and
 * the errors (missing/non-integer attribute, names without a map, a layer
 * without CRS, unreadable files, ids >= classes) are checked by message. */
#include <cpl_conv.h>
#include <dirent.h>
#include <math.h>
#include <gdal.h>
#include <gdal_utils.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/io.h"
#include "io/labels.h"
#include "tests/testutil.h"

static const char *tmp(const char *name) { return tu_path(name); }

/* ---- the image grid: 97x83 pixels of 10 m in UTM 33N ---- */
#define IW 97
#define IH 83
static const double IGT[6] = {500003.0, 10.0, 0.0, 4500007.0, 0.0, -10.0};

static char *wkt_of_epsg(int epsg)
{
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    char *w = NULL, *out = NULL;
    if (OSRImportFromEPSG(s, epsg) == OGRERR_NONE && OSRExportToWkt(s, &w) == OGRERR_NONE) out = strdup(w);
    CPLFree(w);
    OSRDestroySpatialReference(s);
    return out;
}

static void image_grid(ts_grid *g)
{
    memset(g, 0, sizeof *g);
    g->width = IW;
    g->height = IH;
    memcpy(g->gt, IGT, sizeof IGT);
    g->crs_wkt = wkt_of_epsg(32633);
}

/* A MEM dataset on the image grid: bands of Int32, zero-filled. */
static GDALDatasetH grid_dataset(int bands)
{
    GDALDatasetH ds = GDALCreate(GDALGetDriverByName("MEM"), "", IW, IH, bands, GDT_Int32, NULL);
    char *w = wkt_of_epsg(32633);
    GDALSetGeoTransform(ds, (double *)IGT);
    GDALSetProjection(ds, w);
    free(w);
    return ds;
}

/* ---- vector fixtures ---- */
typedef struct feat {
    char wkt[2048];
    int cls;
    const char *name;
    double frac;
} feat;

#define MAXF 64
static feat feats[MAXF];
static int nfeat;
static int npoly; /* feats[0..npoly) are (multi)polygons: what a shapefile can hold */

static const char *names[] = {"water", "building", "road", "forest"};

/* Pixel (px, py) of the image grid to UTM. */
static double gx(double px, double py) { return IGT[0] + px * IGT[1] + py * IGT[2]; }
static double gy(double px, double py) { return IGT[3] + px * IGT[4] + py * IGT[5]; }

static void add_feat(const char *wkt, int cls)
{
    feat *f = &feats[nfeat++];
    snprintf(f->wkt, sizeof f->wkt, "%s", wkt);
    f->cls = cls;
    f->name = names[cls % 4];
    f->frac = cls;
}

static void make_features(void)
{
    tu_rng r;
    tu_rng_seed(&r, 20240611);
    char wkt[2048];
    nfeat = 0;
    /* Random star polygons, overlapping, at arbitrary (non-aligned) coordinates. */
    for (int k = 0; k < 14; k++) {
        double cx = tu_uniform(&r, -5, IW + 5), cy = tu_uniform(&r, -5, IH + 5), rad = tu_uniform(&r, 3, 22);
        int nv = 5 + tu_randint(&r, 9);
        int len = snprintf(wkt, sizeof wkt, "POLYGON ((");
        double x0 = 0, y0 = 0;
        for (int i = 0; i < nv; i++) {
            double a = 6.283185307179586 * i / nv, rr = rad * tu_uniform(&r, 0.35, 1.0);
            double x = gx(cx + rr * cos(a), cy + rr * sin(a)), y = gy(cx + rr * cos(a), cy + rr * sin(a));
            if (i == 0) x0 = x, y0 = y;
            len += snprintf(wkt + len, sizeof wkt - (size_t)len, "%.6f %.6f,", x, y);
        }
        snprintf(wkt + len, sizeof wkt - (size_t)len, "%.6f %.6f))", x0, y0);
        add_feat(wkt, 1 + k % 4);
    }
    /* Pixel-aligned rectangles (vertices on pixel edges: the all_touched ties). */
    for (int k = 0; k < 6; k++) {
        int c = tu_randint(&r, IW - 10), rw = tu_randint(&r, IH - 10), w = 1 + tu_randint(&r, 15), h = 1 + tu_randint(&r, 12);
        snprintf(wkt, sizeof wkt, "POLYGON ((%.1f %.1f,%.1f %.1f,%.1f %.1f,%.1f %.1f,%.1f %.1f))", gx(c, rw), gy(c, rw),
                 gx(c + w, rw), gy(c + w, rw), gx(c + w, rw + h), gy(c + w, rw + h), gx(c, rw + h), gy(c, rw + h),
                 gx(c, rw), gy(c, rw));
        add_feat(wkt, 5 + k % 2);
    }
    /* A polygon with a hole, and a multipolygon, on top of everything. */
    snprintf(wkt, sizeof wkt,
             "POLYGON ((%.3f %.3f,%.3f %.3f,%.3f %.3f,%.3f %.3f,%.3f %.3f),(%.3f %.3f,%.3f %.3f,%.3f %.3f,%.3f %.3f,%.3f "
             "%.3f))",
             gx(20.3, 20.7), gy(20.3, 20.7), gx(60.2, 20.7), gy(60.2, 20.7), gx(60.2, 50.1), gy(60.2, 50.1),
             gx(20.3, 50.1), gy(20.3, 50.1), gx(20.3, 20.7), gy(20.3, 20.7), gx(30.5, 30.5), gy(30.5, 30.5),
             gx(30.5, 40.5), gy(30.5, 40.5), gx(50.5, 40.5), gy(50.5, 40.5), gx(50.5, 30.5), gy(50.5, 30.5),
             gx(30.5, 30.5), gy(30.5, 30.5));
    add_feat(wkt, 7);
    snprintf(wkt, sizeof wkt,
             "MULTIPOLYGON (((%.3f %.3f,%.3f %.3f,%.3f %.3f,%.3f %.3f)),((%.3f %.3f,%.3f %.3f,%.3f %.3f,%.3f %.3f)))",
             gx(70.2, 5.3), gy(70.2, 5.3), gx(90.7, 9.1), gy(90.7, 9.1), gx(75.4, 25.8), gy(75.4, 25.8), gx(70.2, 5.3),
             gy(70.2, 5.3), gx(5.1, 60.2), gy(5.1, 60.2), gx(15.9, 79.9), gy(15.9, 79.9), gx(2.2, 78.8),
             gy(2.2, 78.8), gx(5.1, 60.2), gy(5.1, 60.2));
    add_feat(wkt, 3);
    npoly = nfeat;
    /* Lines and points (not in the shapefile). */
    snprintf(wkt, sizeof wkt, "LINESTRING (%.3f %.3f,%.3f %.3f,%.3f %.3f)", gx(1.3, 2.2), gy(1.3, 2.2), gx(95.1, 40.6),
             gy(95.1, 40.6), gx(40.2, 81.7), gy(40.2, 81.7));
    add_feat(wkt, 2);
    snprintf(wkt, sizeof wkt, "MULTIPOINT ((%.3f %.3f),(%.3f %.3f),(%.3f %.3f))", gx(10.5, 10.5), gy(10.5, 10.5),
             gx(33.2, 70.9), gy(33.2, 70.9), gx(96.9, 82.9), gy(96.9, 82.9));
    add_feat(wkt, 4);
}

/* Writes feats[0..n) to path with driver; srs_epsg 0: no CRS; to_epsg != 32633
 * reprojects the UTM coordinates to that CRS first. real_cls: the class
 * attribute as Real with value frac. */
static int write_vector(const char *path, const char *driver, int srs_epsg, int n, int with_name, double bad_frac)
{
    GDALDriverH drv = GDALGetDriverByName(driver);
    if (!drv) return 0;
    GDALDatasetH ds = GDALCreate(drv, path, 0, 0, 0, GDT_Unknown, NULL);
    if (!ds) return 0;
    OGRSpatialReferenceH srs = NULL, utm = NULL;
    OGRCoordinateTransformationH ct = NULL;
    if (srs_epsg) {
        srs = OSRNewSpatialReference(NULL);
        OSRImportFromEPSG(srs, srs_epsg);
        OSRSetAxisMappingStrategy(srs, OAMS_TRADITIONAL_GIS_ORDER);
        if (srs_epsg != 32633) {
            utm = OSRNewSpatialReference(NULL);
            OSRImportFromEPSG(utm, 32633);
            OSRSetAxisMappingStrategy(utm, OAMS_TRADITIONAL_GIS_ORDER);
            ct = OCTNewCoordinateTransformation(utm, srs);
        }
    }
    OGRLayerH lay = GDALDatasetCreateLayer(ds, "labels", srs, wkbUnknown, NULL);
    int ok = lay != NULL;
    OGRFieldDefnH fd = OGR_Fld_Create("cls", OFTInteger);
    ok = ok && OGR_L_CreateField(lay, fd, TRUE) == OGRERR_NONE;
    OGR_Fld_Destroy(fd);
    fd = OGR_Fld_Create("name", OFTString);
    ok = ok && OGR_L_CreateField(lay, fd, TRUE) == OGRERR_NONE;
    OGR_Fld_Destroy(fd);
    fd = OGR_Fld_Create("frac", OFTReal);
    ok = ok && OGR_L_CreateField(lay, fd, TRUE) == OGRERR_NONE;
    OGR_Fld_Destroy(fd);
    for (int i = 0; ok && i < n; i++) {
        OGRFeatureH f = OGR_F_Create(OGR_L_GetLayerDefn(lay));
        OGRGeometryH g = NULL;
        char *w = feats[i].wkt;
        ok = OGR_G_CreateFromWkt(&w, NULL, &g) == OGRERR_NONE;
        if (ok && ct) ok = OGR_G_Transform(g, ct) == OGRERR_NONE;
        if (ok) {
            OGR_F_SetFieldInteger(f, 0, feats[i].cls);
            if (with_name) OGR_F_SetFieldString(f, 1, feats[i].name);
            OGR_F_SetFieldDouble(f, 2, i == n / 2 ? bad_frac : feats[i].frac);
            OGR_F_SetGeometryDirectly(f, g);
            ok = OGR_L_CreateFeature(lay, f) == OGRERR_NONE;
        } else if (g)
            OGR_G_DestroyGeometry(g);
        OGR_F_Destroy(f);
    }
    GDALClose(ds);
    if (ct) OCTDestroyCoordinateTransformation(ct);
    if (srs) OSRDestroySpatialReference(srs);
    if (utm) OSRDestroySpatialReference(utm);
    return ok;
}

/* gdal_rasterize of path onto the whole image grid. */
static int32_t *reference_rasterize(const char *path, const char *attr, int burn, int all_touched)
{
    GDALDatasetH src = GDALOpenEx(path, GDAL_OF_VECTOR, NULL, NULL, NULL);
    if (!src) return NULL;
    GDALDatasetH dst = grid_dataset(1);
    char burn_s[32];
    snprintf(burn_s, sizeof burn_s, "%d", burn);
    char *argv[8];
    int k = 0;
    if (attr) argv[k++] = "-a", argv[k++] = (char *)attr;
    else argv[k++] = "-burn", argv[k++] = burn_s;
    if (all_touched) argv[k++] = "-at";
    argv[k] = NULL;
    GDALRasterizeOptions *opts = GDALRasterizeOptionsNew(argv, NULL);
    int err = 0;
    GDALDatasetH r = GDALRasterize(NULL, dst, src, opts, &err);
    GDALRasterizeOptionsFree(opts);
    int32_t *out = NULL;
    if (r && !err) {
        out = malloc(sizeof(int32_t) * IW * IH);
        if (GDALRasterIO(GDALGetRasterBand(dst, 1), GF_Read, 0, 0, IW, IH, out, IW, IH, GDT_Int32, 0, 0) != CE_None) {
            free(out);
            out = NULL;
        }
    }
    GDALClose(dst);
    GDALClose(src);
    return out;
}

/* Windows: the whole image, odd offsets, edges, and partly off the image. */
static const ts_window windows[] = {
    {0, 0, IW, IH}, {7, 13, 33, 29}, {0, 0, 1, 1}, {IW - 5, IH - 3, 5, 3}, {41, 2, 17, 71}, {-3, -2, 10, 9},
    {90, 77, 12, 11}, {50, 60, 47, 23},
};
#define NWIN (int)(sizeof windows / sizeof windows[0])

/* Every window of l against the whole-image reference ref (ignore off the image). */
static void check_windows(ts_labels *l, const int32_t *ref, int32_t ignore, const char *what)
{
    for (int k = 0; k < NWIN; k++) {
        const ts_window *w = &windows[k];
        size_t n = (size_t)w->width * (size_t)w->height;
        int32_t *got = tu_alloc_i32(n), *want = malloc(n * sizeof *want);
        for (int y = 0; y < w->height; y++)
            for (int x = 0; x < w->width; x++) {
                int64_t c = w->col_off + x, r = w->row_off + y;
                want[(size_t)y * (size_t)w->width + (size_t)x] =
                    c < 0 || r < 0 || c >= IW || r >= IH ? ignore : ref[r * IW + c];
            }
        char name[256];
        snprintf(name, sizeof name, "%s, window (%lld,%lld %dx%d)", what, (long long)w->col_off,
                 (long long)w->row_off, w->width, w->height);
        if (tu_expect_ok(ts_labels_read(l, w, got), name)) tu_check_equal_i32("labels", name, got, want, n);
        tu_free(got, "labels", name);
        free(want);
    }
}

static int count_distinct(const int32_t *p, size_t n)
{
    int seen[256] = {0}, k = 0;
    for (size_t i = 0; i < n; i++)
        if (p[i] >= 0 && p[i] < 256 && !seen[p[i]]++) k++;
    return k;
}

static void test_vector_formats(void)
{
    ts_grid g;
    image_grid(&g);
    struct {
        const char *driver, *file;
        int only_polygons;
    } fmts[] = {{"GPKG", "v.gpkg", 0}, {"ESRI Shapefile", "v.shp", 1}, {"GeoJSON", "v.geojson", 0},
                {"FlatGeobuf", "v.fgb", 0}};
    for (int f = 0; f < 4; f++) {
        const char *path = tmp(fmts[f].file);
        int n = fmts[f].only_polygons ? npoly : nfeat;
        if (!tu_expect(write_vector(path, fmts[f].driver, 32633, n, 1, 0.0), "writing %s: %s", path,
                       CPLGetLastErrorMsg()))
            continue;
        for (int at = 0; at < 2; at++) {
            int32_t *ref = reference_rasterize(path, "cls", 0, at);
            if (!tu_expect(ref != NULL, "gdal_rasterize %s", path)) continue;
            tu_expect(count_distinct(ref, IW * IH) >= 6, "%s: the reference uses most classes", path);
            ts_label_opts o;
            ts_label_opts_init(&o);
            o.attribute = "cls";
            o.all_touched = at;
            ts_labels *l = NULL;
            char what[256];
            snprintf(what, sizeof what, "%s -a cls%s", fmts[f].driver, at ? " -at" : "");
            if (tu_expect_ok(ts_labels_open(path, &g, &o, &l), what)) {
                tu_expect(ts_labels_is_vector(l) && ts_labels_max_id(l) == 255, "%s: vector, max id 255", what);
                check_windows(l, ref, 255, what);
                ts_labels_close(l);
            }
            /* names through a map give the same as the integer attribute */
            ts_label_class map[] = {{"water", 0}, {"building", 1}, {"road", 2}, {"forest", 3}};
            int32_t *ref_names = malloc(sizeof(int32_t) * IW * IH);
            /* name of class c is names[c % 4], mapped to c % 4: the reference is cls % 4 where burned */
            int32_t *cls_ref = reference_rasterize(path, "cls", 0, at);
            int32_t *any = reference_rasterize(path, NULL, 1, at);
            for (int i = 0; cls_ref && any && i < IW * IH; i++) ref_names[i] = any[i] ? cls_ref[i] % 4 : 0;
            o.attribute = "name";
            o.class_map = map;
            o.n_class_map = 4;
            snprintf(what, sizeof what, "%s -a name (mapped)%s", fmts[f].driver, at ? " -at" : "");
            if (cls_ref && any && tu_expect_ok(ts_labels_open(path, &g, &o, &l), what)) {
                check_windows(l, ref_names, 255, what);
                ts_labels_close(l);
            }
            free(cls_ref);
            free(any);
            free(ref_names);
            /* a fixed burn value */
            int32_t *ref_burn = reference_rasterize(path, NULL, 3, at);
            ts_label_opts_init(&o);
            o.burn = 3;
            o.all_touched = at;
            snprintf(what, sizeof what, "%s -burn 3%s", fmts[f].driver, at ? " -at" : "");
            if (ref_burn && tu_expect_ok(ts_labels_open(path, &g, &o, &l), what)) {
                check_windows(l, ref_burn, 255, what);
                ts_labels_close(l);
            }
            free(ref_burn);
            free(ref);
        }
    }
    ts_grid_free(&g);
}

/* Two overlapping squares: the later feature wins, as in gdal_rasterize. */
static void test_overlap_order(void)
{
    ts_grid g;
    image_grid(&g);
    feat saved[2] = {feats[0], feats[1]};
    snprintf(feats[0].wkt, sizeof feats[0].wkt, "POLYGON ((%f %f,%f %f,%f %f,%f %f,%f %f))", gx(10, 10), gy(10, 10),
             gx(40, 10), gy(40, 10), gx(40, 40), gy(40, 40), gx(10, 40), gy(10, 40), gx(10, 10), gy(10, 10));
    feats[0].cls = 1;
    snprintf(feats[1].wkt, sizeof feats[1].wkt, "POLYGON ((%f %f,%f %f,%f %f,%f %f,%f %f))", gx(20, 20), gy(20, 20),
             gx(50, 20), gy(50, 20), gx(50, 50), gy(50, 50), gx(20, 50), gy(20, 50), gx(20, 20), gy(20, 20));
    feats[1].cls = 2;
    const char *path = tmp("overlap.gpkg");
    if (tu_expect(write_vector(path, "GPKG", 32633, 2, 1, 0.0), "writing %s", path)) {
        ts_label_opts o;
        ts_label_opts_init(&o);
        o.attribute = "cls";
        ts_labels *l = NULL;
        int32_t m[4] = {0};
        ts_window w = {25, 25, 2, 2}; /* inside both */
        if (tu_expect_ok(ts_labels_open(path, &g, &o, &l), "overlap")) {
            if (tu_expect_ok(ts_labels_read(l, &w, m), "overlap read"))
                tu_expect(m[0] == 2 && m[3] == 2, "overlap: the later feature wins (got %d)", m[0]);
            ts_labels_close(l);
        }
    }
    feats[0] = saved[0];
    feats[1] = saved[1];
    ts_grid_free(&g);
}

/* ---- burn order under stress: many overlapping polygons ----
 * 1000 polygons with classes 1..250 over a 600x600 grid, so that nearly every
 * pixel is covered several times and the burn order decides most of the
 * mask. Every layer kind that puts features back in layer order differently
 * after the spatial filter: a GeoPackage (R-tree) with sequential FIDs, with
 * shuffled explicit FIDs and deleted features, with an index on the class
 * attribute (the layer order once came from a covering-index scan, i.e.
 * class order), without a spatial index; a Shapefile; a FlatGeobuf (Hilbert
 * order, packed R-tree); a GeoJSON with shuffled ids (FIDs not increasing:
 * the rank path). Each is read whole and in 128x128 blocks (the last ones
 * partial) and odd windows, against GDALRasterize onto the whole grid. */
#define SW 600
#define SH 600
#define SN 1000
static const double SGT[6] = {600000.5, 2.5, 0.0, 5000000.25, 0.0, -2.5};

static int write_stress(const char *path, const char *driver, int fid_mode, int class_index, int spatial_index)
{
    GDALDriverH drv = GDALGetDriverByName(driver);
    GDALDatasetH ds = drv ? GDALCreate(drv, path, 0, 0, 0, GDT_Unknown, NULL) : NULL;
    if (!ds) return 0;
    OGRSpatialReferenceH srs = OSRNewSpatialReference(NULL);
    OSRImportFromEPSG(srs, 32633);
    char *lco[] = {spatial_index ? NULL : "SPATIAL_INDEX=NO", NULL};
    OGRLayerH lay = GDALDatasetCreateLayer(ds, "stress", srs, wkbPolygon, lco);
    OSRDestroySpatialReference(srs);
    int ok = lay != NULL;
    OGRFieldDefnH fd = OGR_Fld_Create("cls", OFTInteger);
    ok = ok && OGR_L_CreateField(lay, fd, TRUE) == OGRERR_NONE;
    OGR_Fld_Destroy(fd);
    tu_rng r;
    tu_rng_seed(&r, 7 + (uint64_t)fid_mode);
    /* fid_mode 1: explicit FIDs, a shuffled permutation of 3k+1+{0,1,2} */
    GIntBig fids[SN];
    for (int i = 0; i < SN; i++) fids[i] = 3 * (GIntBig)i + 1 + tu_randint(&r, 3);
    for (int i = SN - 1; i > 0; i--) {
        int j = tu_randint(&r, i + 1);
        GIntBig t = fids[i];
        fids[i] = fids[j], fids[j] = t;
    }
    const int txn = GDALDatasetTestCapability(ds, ODsCTransactions); /* GPKG: one transaction, fast */
    ok = ok && (!txn || GDALDatasetStartTransaction(ds, FALSE) == OGRERR_NONE);
    for (int i = 0; ok && i < SN; i++) {
        double cx = tu_uniform(&r, -20, SW + 20), cy = tu_uniform(&r, -20, SH + 20), rad = tu_uniform(&r, 4, 70);
        int nv = 4 + tu_randint(&r, 9);
        OGRGeometryH ring = OGR_G_CreateGeometry(wkbLinearRing), poly = OGR_G_CreateGeometry(wkbPolygon);
        for (int k = 0; k < nv; k++) {
            double a = 6.283185307179586 * k / nv, rr = rad * tu_uniform(&r, 0.4, 1.0);
            double px = cx + rr * cos(a), py = cy + rr * sin(a);
            OGR_G_AddPoint_2D(ring, SGT[0] + px * SGT[1], SGT[3] + py * SGT[5]);
        }
        OGR_G_CloseRings(ring);
        OGR_G_AddGeometryDirectly(poly, ring);
        OGRFeatureH f = OGR_F_Create(OGR_L_GetLayerDefn(lay));
        OGR_F_SetFieldInteger(f, 0, 1 + tu_randint(&r, 250));
        OGR_F_SetGeometryDirectly(f, poly);
        if (fid_mode == 1) OGR_F_SetFID(f, fids[i]);
        ok = OGR_L_CreateFeature(lay, f) == OGRERR_NONE;
        OGR_F_Destroy(f);
    }
    ok = ok && (!txn || GDALDatasetCommitTransaction(ds) == OGRERR_NONE);
    if (ok && fid_mode == 1) /* gaps: delete every 7th feature */
        for (int i = 0; ok && i < SN; i += 7) ok = OGR_L_DeleteFeature(lay, fids[i]) == OGRERR_NONE;
    if (ok && class_index) {
        OGRLayerH res = GDALDatasetExecuteSQL(ds, "CREATE INDEX stress_cls ON stress(cls)", NULL, NULL);
        if (res) GDALDatasetReleaseResultSet(ds, res);
        ok = CPLGetLastErrorType() != CE_Failure;
    }
    GDALClose(ds);
    return ok;
}

/* A GeoJSON copy with the features in the same order but ids shuffled. */
static int write_stress_geojson(const char *path)
{
    tu_rng r;
    tu_rng_seed(&r, 99);
    FILE *f = fopen(path, "w");
    if (!f) return 0;
    fprintf(f, "{\"type\":\"FeatureCollection\",\"crs\":{\"type\":\"name\",\"properties\":{\"name\":"
               "\"urn:ogc:def:crs:EPSG::32633\"}},\"features\":[\n");
    int ids[SN];
    for (int i = 0; i < SN; i++) ids[i] = 5 * i + 2;
    for (int i = SN - 1; i > 0; i--) {
        int j = tu_randint(&r, i + 1), t = ids[i];
        ids[i] = ids[j], ids[j] = t;
    }
    for (int i = 0; i < SN; i++) {
        double cx = tu_uniform(&r, -20, SW + 20), cy = tu_uniform(&r, -20, SH + 20), rad = tu_uniform(&r, 4, 70);
        fprintf(f, "%s{\"type\":\"Feature\",\"id\":%d,\"properties\":{\"cls\":%d},\"geometry\":{\"type\":\"Polygon\","
                   "\"coordinates\":[[",
                i ? ",\n" : "", ids[i], 1 + tu_randint(&r, 250));
        const int nv = 4 + tu_randint(&r, 9);
        double x0 = 0, y0 = 0;
        for (int k = 0; k < nv; k++) {
            double a = 6.283185307179586 * k / nv, rr = rad * tu_uniform(&r, 0.4, 1.0);
            double x = SGT[0] + (cx + rr * cos(a)) * SGT[1], y = SGT[3] + (cy + rr * sin(a)) * SGT[5];
            if (k == 0) x0 = x, y0 = y;
            fprintf(f, "[%.4f,%.4f],", x, y);
        }
        fprintf(f, "[%.4f,%.4f]]]}}", x0, y0);
    }
    fprintf(f, "\n]}\n");
    return fclose(f) == 0;
}

/* gdal_rasterize -a cls of path onto the whole stress grid. */
static int32_t *stress_reference(const char *path, int all_touched)
{
    GDALDatasetH src = GDALOpenEx(path, GDAL_OF_VECTOR, NULL, NULL, NULL);
    if (!src) return NULL;
    GDALDatasetH dst = GDALCreate(GDALGetDriverByName("MEM"), "", SW, SH, 1, GDT_Int32, NULL);
    char *w = wkt_of_epsg(32633);
    GDALSetGeoTransform(dst, (double *)SGT);
    GDALSetProjection(dst, w);
    free(w);
    char *argv[] = {"-a", "cls", all_touched ? "-at" : NULL, NULL};
    GDALRasterizeOptions *opts = GDALRasterizeOptionsNew(argv, NULL);
    int err = 0;
    GDALDatasetH r = GDALRasterize(NULL, dst, src, opts, &err);
    GDALRasterizeOptionsFree(opts);
    int32_t *out = NULL;
    if (r && !err && (out = malloc(sizeof(int32_t) * SW * SH)) &&
        GDALRasterIO(GDALGetRasterBand(dst, 1), GF_Read, 0, 0, SW, SH, out, SW, SH, GDT_Int32, 0, 0) != CE_None) {
        free(out);
        out = NULL;
    }
    GDALClose(dst);
    GDALClose(src);
    return out;
}

/* Window w of l against ref; the number of pixels that differ. */
static size_t stress_window(ts_labels *l, const ts_window *w, const int32_t *ref, int32_t *got)
{
    char name[96];
    snprintf(name, sizeof name, "stress: reading window (%lld,%lld %dx%d)", (long long)w->col_off,
             (long long)w->row_off, w->width, w->height);
    if (!tu_expect_ok(ts_labels_read(l, w, got), name)) return 1;
    size_t bad = 0;
    for (int y = 0; y < w->height; y++)
        for (int x = 0; x < w->width; x++) {
            const int64_t c = w->col_off + x, r = w->row_off + y;
            const int32_t want = c < 0 || r < 0 || c >= SW || r >= SH ? 255 : ref[r * SW + c];
            bad += got[(size_t)y * (size_t)w->width + (size_t)x] != want;
        }
    return bad;
}

static void test_overlap_stress(void)
{
    ts_grid g = {SW, SH, {0}, wkt_of_epsg(32633)};
    memcpy(g.gt, SGT, sizeof SGT);
    struct {
        const char *what, *driver, *file;
        int fid_mode, class_index, spatial_index, all_touched;
    } cases[] = {
        {"GPKG, sequential FIDs", "GPKG", "s_seq.gpkg", 0, 0, 1, 0},
        {"GPKG, shuffled FIDs with gaps", "GPKG", "s_shuf.gpkg", 1, 0, 1, 0},
        {"GPKG, indexed class attribute", "GPKG", "s_idx.gpkg", 0, 1, 1, 0},
        {"GPKG, indexed class attribute, shuffled FIDs, -at", "GPKG", "s_idx_shuf.gpkg", 1, 1, 1, 1},
        {"GPKG, no spatial index", "GPKG", "s_noidx.gpkg", 0, 0, 0, 0},
        {"Shapefile", "ESRI Shapefile", "s.shp", 0, 0, 1, 0},
        {"FlatGeobuf", "FlatGeobuf", "s.fgb", 0, 0, 1, 0},
        {"GeoJSON, shuffled ids", NULL, "s.geojson", 0, 0, 1, 0},
    };
    int32_t *got = malloc(sizeof(int32_t) * SW * SH);
    for (size_t k = 0; got && k < sizeof cases / sizeof cases[0]; k++) {
        const char *path = tmp(cases[k].file), *what = cases[k].what;
        int ok = cases[k].driver ? write_stress(path, cases[k].driver, cases[k].fid_mode, cases[k].class_index,
                                                cases[k].spatial_index)
                                 : write_stress_geojson(path);
        if (!tu_expect(ok, "stress: writing %s: %s", path, CPLGetLastErrorMsg())) continue;
        int32_t *ref = stress_reference(path, cases[k].all_touched);
        if (!tu_expect(ref != NULL, "stress: gdal_rasterize %s", path)) continue;
        /* The case is order-sensitive: most pixels are burned, with many classes. */
        size_t burned = 0;
        for (size_t i = 0; i < (size_t)SW * SH; i++) burned += ref[i] != 0;
        tu_expect(burned > (size_t)SW * SH * 9 / 10 && count_distinct(ref, (size_t)SW * SH) > 200,
                  "stress %s: the reference covers most of the grid with many classes", what);
        ts_label_opts o;
        ts_label_opts_init(&o);
        o.attribute = "cls";
        o.all_touched = cases[k].all_touched;
        ts_labels *l = NULL;
        if (!tu_expect_ok(ts_labels_open(path, &g, &o, &l), what)) {
            free(ref);
            continue;
        }
        /* whole, then 128x128 blocks (partial at the right and bottom), then odd windows */
        size_t bad = 0;
        const ts_window whole = {0, 0, SW, SH};
        bad += stress_window(l, &whole, ref, got);
        for (int r = 0; r < SH; r += 128)
            for (int c = 0; c < SW; c += 128) {
                const ts_window w = {c, r, SW - c < 128 ? SW - c : 128, SH - r < 128 ? SH - r : 128};
                bad += stress_window(l, &w, ref, got);
            }
        const ts_window odd[] = {{-7, -11, 301, 77}, {333, 1, 1, 599}, {17, 555, 600, 90}, {250, 250, 3, 3}};
        for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) bad += stress_window(l, &odd[i], ref, got);
        tu_expect(bad == 0, "stress %s: %zu pixels differ from gdal_rasterize over the windows", what, bad);
        ts_labels_close(l);
        free(ref);
    }
    free(got);
    ts_grid_free(&g);
}

/* Labels in EPSG:4326 over the UTM image: reprojected as gdal_rasterize does. */
static void test_reprojection(void)
{
    ts_grid g;
    image_grid(&g);
    const char *drivers[] = {"GeoJSON", "GPKG"}, *files[] = {"wgs84.geojson", "wgs84.gpkg"};
    for (int d = 0; d < 2; d++) {
        const char *path = tmp(files[d]);
        if (!tu_expect(write_vector(path, drivers[d], 4326, nfeat, 1, 0.0), "writing %s", path)) continue;
        for (int at = 0; at < 2; at++) {
            int32_t *ref = reference_rasterize(path, "cls", 0, at);
            if (!tu_expect(ref != NULL, "gdal_rasterize %s", path)) continue;
            tu_expect(count_distinct(ref, IW * IH) >= 6, "%s: the reference uses most classes", path);
            ts_label_opts o;
            ts_label_opts_init(&o);
            o.attribute = "cls";
            o.all_touched = at;
            ts_labels *l = NULL;
            char what[128];
            snprintf(what, sizeof what, "EPSG:4326 %s over UTM%s", drivers[d], at ? " -at" : "");
            if (tu_expect_ok(ts_labels_open(path, &g, &o, &l), what)) {
                check_windows(l, ref, 255, what);
                ts_labels_close(l);
            }
            free(ref);
        }
    }
    ts_grid_free(&g);
}

static void test_vector_errors(void)
{
    ts_grid g;
    image_grid(&g);
    ts_label_opts o;
    ts_labels *l = NULL;
    const char *path = tmp("v.gpkg");

    ts_label_opts_init(&o);
    o.attribute = "klass";
    tu_expect_error(ts_labels_open(path, &g, &o, &l), TS_ERR_INVALID_ARG, "missing attribute", path, "labels", "klass",
                    "cls", NULL);
    o.attribute = "name";
    tu_expect_error(ts_labels_open(path, &g, &o, &l), TS_ERR_INVALID_ARG, "string attribute without map", path, "name",
                    "class map", NULL);
    ts_label_class partial[] = {{"water", 0}, {"building", 1}};
    o.class_map = partial;
    o.n_class_map = 2;
    tu_expect_error(ts_labels_open(path, &g, &o, &l), TS_ERR_INVALID_ARG, "unmapped name", path, "feature", "name",
                    "\"road\"", NULL);
    o.class_map = NULL;
    o.n_class_map = 0;
    o.attribute = "cls";
    o.classes = 5;
    tu_expect_error(ts_labels_open(path, &g, &o, &l), TS_ERR_INVALID_ARG, "class id >= classes", path, "feature",
                    "cls", "5 classes", NULL);
    o.classes = 0;
    o.layer = "nope";
    tu_expect_error(ts_labels_open(path, &g, &o, &l), TS_ERR_INVALID_ARG, "missing layer", path, "nope", "labels",
                    NULL);
    o.layer = NULL;

    /* Real attribute: whole numbers are fine, 2.5 is not. */
    const char *realp = tmp("real.gpkg");
    if (tu_expect(write_vector(realp, "GPKG", 32633, npoly, 1, 2.5), "writing %s", realp)) {
        o.attribute = "frac";
        tu_expect_error(ts_labels_open(realp, &g, &o, &l), TS_ERR_INVALID_ARG, "non-integer attribute", realp,
                        "feature", "frac", "2.5", "not an integer", NULL);
    }
    const char *wholep = tmp("whole.gpkg");
    if (tu_expect(write_vector(wholep, "GPKG", 32633, npoly, 1, 4.0), "writing %s", wholep)) {
        o.attribute = "frac";
        if (tu_expect_ok(ts_labels_open(wholep, &g, &o, &l), "whole-number Real attribute")) ts_labels_close(l);
    }

    /* A layer without CRS: refused, or taken as the image's on request. */
    const char *nocrs = tmp("nocrs.shp");
    if (tu_expect(write_vector(nocrs, "ESRI Shapefile", 0, npoly, 1, 0.0), "writing %s", nocrs)) {
        ts_label_opts_init(&o);
        o.attribute = "cls";
        tu_expect_error(ts_labels_open(nocrs, &g, &o, &l), TS_ERR_INVALID_ARG, "layer without CRS", nocrs, "no CRS",
                        "nocrs", NULL);
        o.assume_image_crs = 1;
        int32_t *ref = reference_rasterize(tmp("v.shp"), "cls", 0, 0);
        if (tu_expect_ok(ts_labels_open(nocrs, &g, &o, &l), "layer without CRS, assumed") && ref) {
            check_windows(l, ref, 255, "no CRS, assumed the image's");
            ts_labels_close(l);
        }
        free(ref);
    }

    /* Unreadable files. */
    ts_label_opts_init(&o);
    const char *missing = tmp("does-not-exist.gpkg");
    tu_expect_error(ts_labels_open(missing, &g, &o, &l), TS_ERR_IO, "missing file", missing, NULL);
    const char *junk = tmp("junk.tif");
    FILE *f = fopen(junk, "wb");
    if (f) {
        fputs("II*\0this is not a tiff", f);
        fclose(f);
    }
    tu_expect_error(ts_labels_open(junk, &g, &o, &l), TS_ERR_IO, "garbage file", junk, NULL);
    tu_expect(l == NULL, "failed open leaves *out NULL");
    ts_grid_free(&g);
}

/* ---- raster masks ---- */

/* A GTiff mask: bands of type t, values from fill(b, x, y). */
typedef int (*pixel_fn)(int b, int x, int y);
static int write_mask(const char *path, int w, int h, int bands, GDALDataType t, const double *gt, int epsg,
                      pixel_fn fill, int has_nodata, double nodata)
{
    GDALDatasetH ds = GDALCreate(GDALGetDriverByName("GTiff"), path, w, h, bands, t, NULL);
    if (!ds) return 0;
    if (gt) GDALSetGeoTransform(ds, (double *)gt);
    if (epsg) {
        char *wkt = wkt_of_epsg(epsg);
        GDALSetProjection(ds, wkt);
        free(wkt);
    }
    int32_t *buf = malloc(sizeof(int32_t) * (size_t)w * (size_t)h);
    int ok = 1;
    for (int b = 0; b < bands && ok; b++) {
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++) buf[(size_t)y * (size_t)w + (size_t)x] = fill(b, x, y);
        GDALRasterBandH band = GDALGetRasterBand(ds, b + 1);
        ok = GDALRasterIO(band, GF_Write, 0, 0, w, h, buf, w, h, GDT_Int32, 0, 0) == CE_None;
        if (has_nodata) GDALSetRasterNoDataValue(band, nodata);
    }
    free(buf);
    GDALClose(ds);
    return ok;
}

static int ids_fill(int b, int x, int y)
{
    (void)b;
    unsigned h = (unsigned)(x * 73856093u) ^ (unsigned)(y * 19349663u);
    return (int)((h >> 7) % 8); /* 0..7; 7 is the nodata below */
}

/* GDALWarp -r near -et 0 -dstalpha onto the image grid; ignore where alpha is 0 or the value is nodata. */
static int32_t *reference_warp(const char *path, int nodata)
{
    GDALDatasetH src = GDALOpen(path, GA_ReadOnly);
    if (!src) return NULL;
    GDALDatasetH dst = grid_dataset(2);
    char *argv[] = {"-r", "near", "-et", "0", "-dstalpha", NULL};
    GDALWarpAppOptions *opts = GDALWarpAppOptionsNew(argv, NULL);
    int err = 0;
    GDALDatasetH r = GDALWarp(NULL, dst, 1, &src, opts, &err);
    GDALWarpAppOptionsFree(opts);
    int32_t *out = NULL;
    if (r && !err) {
        out = malloc(sizeof(int32_t) * IW * IH * 2);
        if (GDALDatasetRasterIO(dst, GF_Read, 0, 0, IW, IH, out, IW, IH, GDT_Int32, 2, NULL, 0, 0, 0) != CE_None) {
            free(out);
            out = NULL;
        } else {
            for (int i = 0; i < IW * IH; i++)
                if (out[IW * IH + i] == 0 || out[i] == nodata) out[i] = 255;
        }
    }
    GDALClose(dst);
    GDALClose(src);
    return out;
}

static void test_raster_warp(void)
{
    ts_grid g;
    image_grid(&g);
    /* A mask in EPSG:4326 covering most of the image, at ~7 m; one in UTM at 4 m, shifted; one at 25 m. */
    struct {
        const char *file;
        int epsg, w, h;
        double gt[6];
    } masks[] = {
        {"m4326.tif", 4326, 150, 110, {14.99, 0.00008, 0, 40.6505, 0, -0.00006}},
        {"mutm4.tif", 32633, 200, 180, {500041.3, 4.1, 0, 4499991.1, 0, -4.1}},
        {"mutm25.tif", 32633, 30, 30, {499950.0, 25.0, 0, 4500100.0, 0, -25.0}},
    };
    for (int m = 0; m < 3; m++) {
        const char *path = tmp(masks[m].file);
        if (!tu_expect(write_mask(path, masks[m].w, masks[m].h, 1, GDT_Byte, masks[m].gt, masks[m].epsg, ids_fill, 1, 7),
                       "writing %s", path))
            continue;
        int32_t *ref = reference_warp(path, 7);
        if (!tu_expect(ref != NULL, "GDALWarp %s: %s", path, CPLGetLastErrorMsg())) continue;
        int ign = 0, lab = 0;
        for (int i = 0; i < IW * IH; i++) ref[i] == 255 ? ign++ : lab++;
        tu_expect(lab > 0 && (m == 2 || ign > 0), "%s: the reference has labels (%d) and ignored pixels (%d)", path, lab,
                  ign);
        ts_labels *l = NULL;
        if (tu_expect_ok(ts_labels_open(path, &g, NULL, &l), path)) {
            tu_expect(!ts_labels_is_vector(l), "%s is a raster mask", path);
            check_windows(l, ref, 255, path);
            ts_labels_close(l);
        }
        /* binary: non-zero -> 1, ignore stays */
        ts_label_opts o;
        ts_label_opts_init(&o);
        o.binary = 1;
        for (int i = 0; i < IW * IH; i++)
            if (ref[i] != 255 && ref[i] != 0) ref[i] = 1;
        if (tu_expect_ok(ts_labels_open(path, &g, &o, &l), "binary")) {
            tu_expect(ts_labels_max_id(l) == 255, "binary max id is the ignore id");
            check_windows(l, ref, 255, "binary");
            ts_labels_close(l);
        }
        free(ref);
    }
    ts_grid_free(&g);
}

static int direct_fill(int b, int x, int y)
{
    (void)b;
    return (x + 2 * y) % 9; /* 0..8 */
}

static void test_raster_direct_and_errors(void)
{
    ts_grid g;
    image_grid(&g);
    ts_label_opts o;
    ts_labels *l = NULL;
    /* The image grid itself: read directly; nodata 4 -> ignore. */
    const char *path = tmp("direct.tif");
    int32_t *ref = malloc(sizeof(int32_t) * IW * IH);
    for (int y = 0; y < IH; y++)
        for (int x = 0; x < IW; x++) ref[y * IW + x] = direct_fill(0, x, y) == 4 ? 255 : direct_fill(0, x, y);
    if (tu_expect(write_mask(path, IW, IH, 1, GDT_UInt16, IGT, 32633, direct_fill, 1, 4), "writing %s", path)) {
        if (tu_expect_ok(ts_labels_open(path, &g, NULL, &l), "direct mask")) {
            tu_expect(ts_labels_max_id(l) == 65535, "UInt16 mask: max id 65535, got %lld", (long long)ts_labels_max_id(l));
            check_windows(l, ref, 255, "direct mask, nodata -> ignore");
            ts_labels_close(l);
        }
        /* ids >= classes: an error that names the file, band, window and pixel */
        ts_label_opts_init(&o);
        o.classes = 8;
        if (tu_expect_ok(ts_labels_open(path, &g, &o, &l), "classes 8")) {
            int32_t m[64];
            ts_window w = {0, 0, 8, 8}; /* (x + 2y) % 9 == 8 at (8-2y...): (6,1) -> 8 */
            tu_expect_error(ts_labels_read(l, &w, m), TS_ERR_INVALID_ARG, "id >= classes", path, "band 1",
                            "window (col 0, row 0, 8x8)", "8 classes", NULL);
            ts_window ok_w = {0, 0, 4, 1};
            tu_expect_ok(ts_labels_read(l, &ok_w, m), "ids < classes");
            ts_labels_close(l);
        }
        ts_label_opts_init(&o);
        o.band = 2;
        tu_expect_error(ts_labels_open(path, &g, &o, &l), TS_ERR_INVALID_ARG, "missing band", path, "band 2", NULL);
    }
    /* Float mask: whole numbers are ids, 2.5 is an error. */
    const char *fpath = tmp("float.tif");
    if (tu_expect(write_mask(fpath, IW, IH, 1, GDT_Float32, IGT, 32633, direct_fill, 0, 0), "writing %s", fpath)) {
        GDALDatasetH ds = GDALOpen(fpath, GA_Update);
        float v = 2.5f;
        if (ds) {
            tu_expect(GDALRasterIO(GDALGetRasterBand(ds, 1), GF_Write, 30, 40, 1, 1, &v, 1, 1, GDT_Float32, 0, 0) ==
                          CE_None,
                      "writing 2.5");
            GDALClose(ds);
        }
        for (int y = 0; y < IH; y++)
            for (int x = 0; x < IW; x++) ref[y * IW + x] = direct_fill(0, x, y);
        if (tu_expect_ok(ts_labels_open(fpath, &g, NULL, &l), "float mask")) {
            int32_t m[100];
            ts_window w = {0, 0, 10, 10};
            if (tu_expect_ok(ts_labels_read(l, &w, m), "float mask, whole numbers"))
                tu_expect(m[13] == direct_fill(0, 3, 1), "float mask value");
            int32_t m2[16];
            ts_window bad = {28, 38, 4, 4};
            tu_expect_error(ts_labels_read(l, &bad, m2), TS_ERR_INVALID_ARG, "fractional id", fpath, "band 1",
                            "pixel (col 30, row 40)", "2.5", NULL);
            ts_labels_close(l);
        }
    }
    /* No georeferencing: same size is pixel-aligned, another size is an error. */
    const char *plain = tmp("plain.tif");
    if (tu_expect(write_mask(plain, IW, IH, 1, GDT_Byte, NULL, 0, direct_fill, 0, 0), "writing %s", plain)) {
        for (int y = 0; y < IH; y++)
            for (int x = 0; x < IW; x++) ref[y * IW + x] = direct_fill(0, x, y);
        if (tu_expect_ok(ts_labels_open(plain, &g, NULL, &l), "mask without georeferencing")) {
            check_windows(l, ref, 255, "no georeferencing, same size");
            ts_labels_close(l);
        }
    }
    const char *small = tmp("small.tif");
    if (tu_expect(write_mask(small, 20, 20, 1, GDT_Byte, NULL, 0, direct_fill, 0, 0), "writing %s", small))
        tu_expect_error(ts_labels_open(small, &g, NULL, &l), TS_ERR_INVALID_ARG, "no georeferencing, other size", small,
                        "no georeferencing", NULL);
    /* A georeferenced mask without CRS over an image with one. */
    const char *nocrs = tmp("nocrs.tif");
    if (tu_expect(write_mask(nocrs, IW, IH, 1, GDT_Byte, IGT, 0, direct_fill, 0, 0), "writing %s", nocrs)) {
        tu_expect_error(ts_labels_open(nocrs, &g, NULL, &l), TS_ERR_INVALID_ARG, "mask without CRS", nocrs, "no CRS",
                        NULL);
        ts_label_opts_init(&o);
        o.assume_image_crs = 1;
        if (tu_expect_ok(ts_labels_open(nocrs, &g, &o, &l), "mask without CRS, assumed")) {
            check_windows(l, ref, 255, "mask without CRS, assumed the image's");
            ts_labels_close(l);
        }
    }
    free(ref);
    ts_grid_free(&g);
}

/* RGB(A) colour-coded masks. */
static const uint8_t palette[6][4] = {{255, 0, 0, 255}, {0, 255, 0, 255}, {0, 0, 255, 255},
                                      {255, 255, 0, 255}, {9, 9, 9, 255}, {0, 0, 0, 0}};
static int color_fill(int b, int x, int y) { return palette[(x * 7 + y * 3) % 6][b]; }

static void test_colors(void)
{
    ts_grid g;
    image_grid(&g);
    ts_labels *l = NULL;
    ts_label_opts o;
    /* Red 1, green 2, blue 3, yellow 4 (RGB keys); (9,9,9) unknown; transparent black 255 only with alpha 0. */
    ts_label_color map[] = {{255, 0, 0, 255, 0, 1}, {0, 255, 0, 255, 0, 2}, {0, 0, 255, 255, 0, 3},
                            {255, 255, 0, 255, 0, 4}, {0, 0, 0, 0, 1, 255}};
    int32_t *ref = malloc(sizeof(int32_t) * IW * IH);
    for (int bands = 3; bands <= 4; bands++) {
        const char *path = tmp(bands == 3 ? "rgb.tif" : "rgba.tif");
        if (!tu_expect(write_mask(path, IW, IH, bands, GDT_Byte, IGT, 32633, color_fill, 0, 0), "writing %s", path))
            continue;
        for (int unknown_ignore = 0; unknown_ignore < 2; unknown_ignore++) {
            for (int y = 0; y < IH; y++)
                for (int x = 0; x < IW; x++) {
                    int k = (x * 7 + y * 3) % 6;
                    int32_t v = k < 4 ? k + 1 : unknown_ignore ? 255 : 0;
                    /* palette 5 is (0,0,0,0): transparent black matches the RGBA entry; in RGB it is opaque black */
                    if (k == 5 && bands == 4) v = 255;
                    ref[y * IW + x] = v;
                }
            ts_label_opts_init(&o);
            o.colors = map;
            o.n_colors = 5;
            o.unknown_color_ignore = unknown_ignore;
            char what[128];
            snprintf(what, sizeof what, "%d-band colours, unknown -> %s", bands, unknown_ignore ? "ignore" : "background");
            if (tu_expect_ok(ts_labels_open(path, &g, &o, &l), what)) {
                check_windows(l, ref, 255, what);
                ts_labels_close(l);
            }
        }
        /* nodata 9 (GeoTIFF: on every band, alpha too): (9,9,9) -> ignore */
        GDALDatasetH ds = GDALOpen(path, GA_Update);
        for (int b = 1; ds && b <= bands; b++) GDALSetRasterNoDataValue(GDALGetRasterBand(ds, b), 9);
        if (ds) GDALClose(ds);
        ts_label_opts_init(&o);
        o.colors = map;
        o.n_colors = 5;
        for (int y = 0; y < IH; y++)
            for (int x = 0; x < IW; x++) {
                int k = (x * 7 + y * 3) % 6;
                ref[y * IW + x] = k < 4 ? k + 1 : k == 4 ? 255 : bands == 4 ? 255 : 0;
            }
        if (tu_expect_ok(ts_labels_open(path, &g, &o, &l), "colours with nodata")) {
            check_windows(l, ref, 255, "colours with nodata -> ignore");
            ts_labels_close(l);
        }
    }
    /* A colour map on a single-band mask is refused. */
    ts_label_opts_init(&o);
    o.colors = map;
    o.n_colors = 5;
    tu_expect_error(ts_labels_open(tmp("direct.tif"), &g, &o, &l), TS_ERR_INVALID_ARG, "colour map on 1 band",
                    "direct.tif", "RGB", NULL);
    free(ref);
    ts_grid_free(&g);
}

static void test_parsers(void)
{
    ts_label_class *m = NULL;
    int n = 0;
    if (tu_expect_ok(ts_label_parse_class_map("building=1,road=2,water=0", &m, &n), "class map"))
        tu_expect(n == 3 && strcmp(m[1].name, "road") == 0 && m[1].id == 2 && m[2].id == 0, "class map parsed");
    free(m);
    tu_expect_error(ts_label_parse_class_map("building=x", &m, &n), TS_ERR_INVALID_ARG, "bad class map", "building=x",
                    NULL);
    tu_expect_error(ts_label_parse_class_map("a=1,a=2", &m, &n), TS_ERR_INVALID_ARG, "duplicate name", "twice", NULL);
    ts_label_color *c = NULL;
    if (tu_expect_ok(ts_label_parse_color_map("#ff0000=1,00ff0080=2", &c, &n), "colour map"))
        tu_expect(n == 2 && c[0].r == 255 && c[0].g == 0 && !c[0].match_alpha && c[0].id == 1 && c[1].g == 255 &&
                      c[1].a == 128 && c[1].match_alpha && c[1].id == 2,
                  "colour map parsed");
    free(c);
    tu_expect_error(ts_label_parse_color_map("#ff00=1", &c, &n), TS_ERR_INVALID_ARG, "bad colour", "#ff00=1", NULL);
}

int main(void)
{
    if (!tu_tmpdir("test_labels")) return 1;
    ts_gdal_init();
    make_features();
    test_parsers();
    test_vector_formats();
    test_overlap_order();
    test_overlap_stress();
    test_reprojection();
    test_vector_errors();
    test_raster_warp();
    test_raster_direct_and_errors();
    test_colors();
    if (!getenv("TERRASEG_LABELS_KEEP")) tu_tmpdir_remove();
    else printf("kept %s\n", tu_path(""));
    GDALDestroyDriverManager();
    OSRCleanup();
    return tu_finish("test_labels");
}
