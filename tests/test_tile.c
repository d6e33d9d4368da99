/* io/tile.c: tiles against GDAL's own gdal_translate, and the window filter
 * against a brute-force computation.
 *
 * A 300x270 UInt16 GeoTIFF (3 bands, nodata 0 in a corner block and sparsely
 * per band, EPSG:32633, R/G/B colour interpretations) and a GeoPackage of
 * class polygons are written with the GDAL/OGR C API in a mkdtemp folder.
 *   - Every image tile (all bands, and bands 3,1; strips and tiled sizes)
 *     equals GDALTranslate -srcwin (-b) written to a GeoTIFF: pixels, data
 *     type, nodata, CRS, geotransform, colour interpretation; no temporary
 *     file is left; an internal per-dataset mask travels with the tile.
 *   - Mask tiles equal ts_labels_read for the window (type, nodata = the
 *     ignore id, the image tile's geotransform and CRS).
 *   - ts_tile_windows: skip_empty with and without labels, buffer windows and
 *     only_split, file names, the report.
 *   - Errors name the file, the window or the band: a window outside the
 *     raster, a band that does not exist, an output folder that cannot be
 *     written, colliding names, an id that does not fit the mask type.
 *   - The mask reader reads 3, 1 or 0 bands (per-band nodata, an internal
 *     mask, none) and gives ts_raster_read's valid mask over every band.
 *   - ts_windows_filter_masks (drop background, max nodata) equals a
 *     brute-force pass over the whole image (valid mask from the pixel rule,
 *     labels from GDALRasterize of the whole image), with the same reasons,
 *     for 1 and 2 threads. */
#include <cpl_conv.h>
#include <cpl_string.h>
#include <dirent.h>
#include <ftw.h>
#include <gdal.h>
#include <gdal_utils.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/io.h"
#include "io/labels.h"
#include "io/raster.h"
#include "io/tile.h"
#include "io/windows.h"
#include "tests/testutil.h"

static char tmpdir[256];

static const char *tpath(const char *name)
{
    static char buf[8][600];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmpdir, name);
    return buf[k];
}

/* ---- the scene ---- */
#define IW 300
#define IH 270
static const double IGT[6] = {500003.5, 10.0, 0.0, 4500007.25, 0.0, -10.0};

static int in_block(int x, int y) { return x < 60 && y < 50; }
static uint16_t pix(int b, int x, int y)
{
    if (in_block(x, y) || (y >= 150 && (x + 3 * y + 5 * b) % 23 == 0)) return 0;
    return (uint16_t)((x * 1013 + y * 7919 + b * 3001) % 65000 + 1);
}
/* io/raster.h's rule: valid in every band. */
static int pix_valid(int x, int y) { return pix(1, x, y) && pix(2, x, y) && pix(3, x, y); }

static char *wkt_of_epsg(int epsg)
{
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    char *w = NULL, *out = NULL;
    if (OSRImportFromEPSG(s, epsg) == OGRERR_NONE && OSRExportToWkt(s, &w) == OGRERR_NONE) out = strdup(w);
    CPLFree(w);
    OSRDestroySpatialReference(s);
    return out;
}

/* kind 0: UInt16, nodata 0 (pix); 1: Byte, internal per-dataset mask (the
 * pix_valid pixels); 2: Byte, no nodata or mask. */
static int write_image(const char *path, int kind)
{
    const GDALDataType t = kind == 0 ? GDT_UInt16 : GDT_Byte;
    GDALDatasetH mem = GDALCreate(GDALGetDriverByName("MEM"), "", IW, IH, 3, t, NULL);
    if (!mem) return 0;
    int ok = 1;
    uint16_t *buf = malloc(sizeof(uint16_t) * IW * IH);
    static const GDALColorInterp ci[3] = {GCI_RedBand, GCI_GreenBand, GCI_BlueBand};
    for (int b = 1; ok && b <= 3; b++) {
        for (int y = 0; y < IH; y++)
            for (int x = 0; x < IW; x++) buf[y * IW + x] = kind == 0 ? pix(b, x, y) : (uint16_t)(1 + (x + y + b) % 250);
        GDALRasterBandH h = GDALGetRasterBand(mem, b);
        ok = GDALRasterIO(h, GF_Write, 0, 0, IW, IH, buf, IW, IH, GDT_UInt16, 0, 0) == CE_None;
        ok = ok && GDALSetRasterColorInterpretation(h, ci[b - 1]) == CE_None;
        if (kind == 0) ok = ok && GDALSetRasterNoDataValue(h, 0) == CE_None;
    }
    char *wkt = wkt_of_epsg(32633);
    ok = ok && wkt && GDALSetGeoTransform(mem, (double *)IGT) == CE_None && GDALSetProjection(mem, wkt) == CE_None;
    free(wkt);
    if (ok && kind == 1) {
        ok = GDALCreateDatasetMaskBand(mem, GMF_PER_DATASET) == CE_None;
        uint8_t *m = malloc(IW * IH);
        for (int y = 0; y < IH; y++)
            for (int x = 0; x < IW; x++) m[y * IW + x] = pix_valid(x, y) ? 255 : 0;
        ok = ok && GDALRasterIO(GDALGetMaskBand(GDALGetRasterBand(mem, 1)), GF_Write, 0, 0, IW, IH, m, IW, IH,
                                GDT_Byte, 0, 0) == CE_None;
        free(m);
    }
    free(buf);
    char **co = CSLSetNameValue(NULL, "TILED", "YES");
    co = CSLSetNameValue(co, "BLOCKXSIZE", "64");
    co = CSLSetNameValue(co, "BLOCKYSIZE", "64");
    CPLSetConfigOption("GDAL_TIFF_INTERNAL_MASK", "YES");
    GDALDatasetH out = ok ? GDALCreateCopy(GDALGetDriverByName("GTiff"), path, mem, FALSE, co, NULL, NULL) : NULL;
    CPLSetConfigOption("GDAL_TIFF_INTERNAL_MASK", NULL);
    CSLDestroy(co);
    ok = ok && out;
    if (out) GDALClose(out);
    GDALClose(mem);
    return ok;
}

/* Pixel (px, py) of the image grid to UTM. */
static double gx(double px, double py) { return IGT[0] + px * IGT[1] + py * IGT[2]; }
static double gy(double px, double py) { return IGT[3] + px * IGT[4] + py * IGT[5]; }

/* Class polygons in the lower right part of the image; the upper left has none. */
static int write_labels(const char *path)
{
    GDALDatasetH ds = GDALCreate(GDALGetDriverByName("GPKG"), path, 0, 0, 0, GDT_Unknown, NULL);
    if (!ds) return 0;
    OGRSpatialReferenceH srs = OSRNewSpatialReference(NULL);
    OSRImportFromEPSG(srs, 32633);
    OGRLayerH lay = GDALDatasetCreateLayer(ds, "classes", srs, wkbPolygon, NULL);
    int ok = lay != NULL;
    OGRFieldDefnH fd = OGR_Fld_Create("cls", OFTInteger);
    ok = ok && OGR_L_CreateField(lay, fd, TRUE) == OGRERR_NONE;
    OGR_Fld_Destroy(fd);
    /* (x0, y0, x1, y1, class) in pixels, plus a triangle. */
    static const double rects[][5] = {
        {170.3, 150.2, 230.7, 200.9, 1}, {205.5, 185.5, 280.2, 262.4, 2}, {120.1, 230.4, 160.8, 268.6, 3},
        {260.0, 60.5, 299.0, 120.5, 1},
    };
    char wkt[512];
    for (int i = 0; ok && i < 5; i++) {
        if (i < 4) {
            const double *r = rects[i];
            snprintf(wkt, sizeof wkt, "POLYGON ((%.6f %.6f,%.6f %.6f,%.6f %.6f,%.6f %.6f,%.6f %.6f))", gx(r[0], r[1]),
                     gy(r[0], r[1]), gx(r[2], r[1]), gy(r[2], r[1]), gx(r[2], r[3]), gy(r[2], r[3]), gx(r[0], r[3]),
                     gy(r[0], r[3]), gx(r[0], r[1]), gy(r[0], r[1]));
        } else {
            snprintf(wkt, sizeof wkt, "POLYGON ((%.6f %.6f,%.6f %.6f,%.6f %.6f,%.6f %.6f))", gx(100, 120),
                     gy(100, 120), gx(150, 125), gy(150, 125), gx(120, 170), gy(120, 170), gx(100, 120),
                     gy(100, 120));
        }
        OGRFeatureH f = OGR_F_Create(OGR_L_GetLayerDefn(lay));
        OGRGeometryH g = NULL;
        char *w = wkt;
        ok = OGR_G_CreateFromWkt(&w, srs, &g) == OGRERR_NONE;
        if (ok) {
            OGR_F_SetFieldInteger(f, 0, i < 4 ? (int)rects[i][4] : 2);
            OGR_F_SetGeometryDirectly(f, g);
            ok = OGR_L_CreateFeature(lay, f) == OGRERR_NONE;
        }
        OGR_F_Destroy(f);
    }
    GDALClose(ds);
    OSRDestroySpatialReference(srs);
    return ok;
}

/* gdal_rasterize -a cls of the labels onto the whole image grid (background 0). */
static int32_t *reference_labels(const char *path)
{
    GDALDatasetH src = GDALOpenEx(path, GDAL_OF_VECTOR, NULL, NULL, NULL);
    GDALDatasetH dst = GDALCreate(GDALGetDriverByName("MEM"), "", IW, IH, 1, GDT_Int32, NULL);
    char *wkt = wkt_of_epsg(32633);
    GDALSetGeoTransform(dst, (double *)IGT);
    GDALSetProjection(dst, wkt);
    free(wkt);
    char *argv[] = {"-a", "cls", NULL};
    GDALRasterizeOptions *o = GDALRasterizeOptionsNew(argv, NULL);
    int err = 0;
    int32_t *out = NULL;
    if (src && GDALRasterize(NULL, dst, src, o, &err) && !err) {
        out = malloc(sizeof(int32_t) * IW * IH);
        if (GDALRasterIO(GDALGetRasterBand(dst, 1), GF_Read, 0, 0, IW, IH, out, IW, IH, GDT_Int32, 0, 0) != CE_None) {
            free(out);
            out = NULL;
        }
    }
    GDALRasterizeOptionsFree(o);
    GDALClose(dst);
    if (src) GDALClose(src);
    return out;
}

static int32_t *ref_labels; /* whole image */

/* ---- comparing two rasters ---- */
static void *read_band(GDALDatasetH ds, int b, GDALDataType t)
{
    const int w = GDALGetRasterXSize(ds), h = GDALGetRasterYSize(ds);
    void *p = malloc((size_t)w * h * GDALGetDataTypeSizeBytes(t));
    if (p && GDALRasterIO(GDALGetRasterBand(ds, b), GF_Read, 0, 0, w, h, p, w, h, t, 0, 0) != CE_None) {
        free(p);
        p = NULL;
    }
    return p;
}

/* Everything gdal_translate carries that a tile must match. */
static void compare_files(const char *got_path, const char *want_path, const char *what)
{
    GDALDatasetH a = GDALOpen(got_path, GA_ReadOnly), b = GDALOpen(want_path, GA_ReadOnly);
    if (!tu_expect(a && b, "%s: open %s / %s", what, got_path, want_path)) {
        if (a) GDALClose(a);
        if (b) GDALClose(b);
        return;
    }
    const int w = GDALGetRasterXSize(a), h = GDALGetRasterYSize(a), n = GDALGetRasterCount(a);
    tu_expect(w == GDALGetRasterXSize(b) && h == GDALGetRasterYSize(b) && n == GDALGetRasterCount(b),
              "%s: size %dx%dx%d, gdal_translate %dx%dx%d", what, w, h, n, GDALGetRasterXSize(b),
              GDALGetRasterYSize(b), GDALGetRasterCount(b));
    double ga[6] = {0}, gb[6] = {0};
    int ha = GDALGetGeoTransform(a, ga) == CE_None, hb = GDALGetGeoTransform(b, gb) == CE_None;
    tu_expect(ha && hb && memcmp(ga, gb, sizeof ga) == 0,
              "%s: geotransform %.17g %.17g %.17g %.17g %.17g %.17g, "
              "gdal_translate %.17g %.17g %.17g %.17g %.17g %.17g",
              what, ga[0], ga[1], ga[2], ga[3], ga[4], ga[5], gb[0], gb[1], gb[2], gb[3], gb[4], gb[5]);
    tu_expect(strcmp(GDALGetProjectionRef(a), GDALGetProjectionRef(b)) == 0 && *GDALGetProjectionRef(a),
              "%s: CRS differs from gdal_translate's", what);
    for (int i = 1; i <= n && i <= GDALGetRasterCount(b); i++) {
        GDALRasterBandH ba = GDALGetRasterBand(a, i), bb = GDALGetRasterBand(b, i);
        GDALDataType ta = GDALGetRasterDataType(ba), tb = GDALGetRasterDataType(bb);
        tu_expect(ta == tb, "%s band %d: type %s, gdal_translate %s", what, i, GDALGetDataTypeName(ta),
                  GDALGetDataTypeName(tb));
        int na = 0, nb = 0;
        double va = GDALGetRasterNoDataValue(ba, &na), vb = GDALGetRasterNoDataValue(bb, &nb);
        tu_expect(na == nb && (!na || va == vb), "%s band %d: nodata %d/%g, gdal_translate %d/%g", what, i, na, va,
                  nb, vb);
        tu_expect(GDALGetRasterColorInterpretation(ba) == GDALGetRasterColorInterpretation(bb),
                  "%s band %d: colour %s, gdal_translate %s", what, i,
                  GDALGetColorInterpretationName(GDALGetRasterColorInterpretation(ba)),
                  GDALGetColorInterpretationName(GDALGetRasterColorInterpretation(bb)));
        tu_expect(GDALGetMaskFlags(ba) == GDALGetMaskFlags(bb), "%s band %d: mask flags %d, gdal_translate %d", what,
                  i, GDALGetMaskFlags(ba), GDALGetMaskFlags(bb));
        if (ta == tb && w == GDALGetRasterXSize(b) && h == GDALGetRasterYSize(b)) {
            void *pa = read_band(a, i, ta), *pb = read_band(b, i, tb);
            tu_expect(pa && pb && memcmp(pa, pb, (size_t)w * h * GDALGetDataTypeSizeBytes(ta)) == 0,
                      "%s band %d: pixels differ from gdal_translate's", what, i);
            free(pa);
            free(pb);
            if (GDALGetMaskFlags(ba) == GMF_PER_DATASET) {
                uint8_t *ma = malloc((size_t)w * h), *mb = malloc((size_t)w * h);
                int ok = GDALRasterIO(GDALGetMaskBand(ba), GF_Read, 0, 0, w, h, ma, w, h, GDT_Byte, 0, 0) == CE_None &&
                         GDALRasterIO(GDALGetMaskBand(bb), GF_Read, 0, 0, w, h, mb, w, h, GDT_Byte, 0, 0) == CE_None;
                tu_expect(ok && memcmp(ma, mb, (size_t)w * h) == 0, "%s band %d: mask differs", what, i);
                free(ma);
                free(mb);
            }
        }
    }
    GDALClose(a);
    GDALClose(b);
}

/* gdal_translate -srcwin of the window (and -b per band) to want_path. */
static int translate(GDALDatasetH src, const ts_window *w, const int *bands, int nb, const char *want_path)
{
    char s[4][32];
    snprintf(s[0], 32, "%lld", (long long)w->col_off);
    snprintf(s[1], 32, "%lld", (long long)w->row_off);
    snprintf(s[2], 32, "%d", w->width);
    snprintf(s[3], 32, "%d", w->height);
    char bs[8][16];
    char *argv[32];
    int k = 0;
    argv[k++] = "-of", argv[k++] = "GTiff", argv[k++] = "-srcwin";
    for (int i = 0; i < 4; i++) argv[k++] = s[i];
    for (int i = 0; i < nb && i < 8; i++) {
        snprintf(bs[i], 16, "%d", bands[i]);
        argv[k++] = "-b", argv[k++] = bs[i];
    }
    argv[k] = NULL;
    GDALTranslateOptions *o = GDALTranslateOptionsNew(argv, NULL);
    int err = 0;
    GDALDatasetH out = GDALTranslate(want_path, src, o, &err);
    GDALTranslateOptionsFree(o);
    if (out) GDALClose(out);
    return out && !err;
}

static int file_exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

/* Files ending in .tmp anywhere under dir. */
static int tmp_count;
static int count_tmp(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    size_t n = strlen(p);
    if (n > 4 && strcmp(p + n - 4, ".tmp") == 0) tmp_count++;
    if (strstr(p, ".tmp.")) tmp_count++;
    return 0;
}
static int tmp_files(const char *dir)
{
    tmp_count = 0;
    nftw(dir, count_tmp, 16, FTW_PHYS);
    return tmp_count;
}

static const ts_window tile_windows[] = {
    {10, 7, 256, 256},        /* tiled output */
    {33, 41, 17, 29},         /* odd offsets, across the nodata block */
    {IW - 20, IH - 13, 20, 13}, /* bottom right corner */
    {0, 0, 40, 30},           /* all nodata */
    {200, 180, 50, 40},       /* labelled */
    {0, 0, IW, IH},           /* the whole image */
};
#define N_TILE_WINDOWS (int)(sizeof tile_windows / sizeof tile_windows[0])

static void test_image_tiles(void)
{
    char image[600];
    snprintf(image, sizeof image, "%s", tpath("image.tif"));
    GDALDatasetH src = GDALOpen(image, GA_ReadOnly);
    if (!tu_expect(src != NULL, "open %s", image)) return;
    static const int sel[2] = {3, 1};
    for (int i = 0; i < N_TILE_WINDOWS; i++) {
        const ts_window *w = &tile_windows[i];
        for (int v = 0; v < 2; v++) {
            char what[128], got[64], want[64];
            snprintf(what, sizeof what, "tile %dx%d at %lld,%lld%s", w->width, w->height, (long long)w->col_off,
                     (long long)w->row_off, v ? " bands 3,1" : "");
            snprintf(got, sizeof got, "got_%d_%d.tif", i, v);
            snprintf(want, sizeof want, "want_%d_%d.tif", i, v);
            const char *gp = tpath(got), *wp = tpath(want);
            if (!tu_expect_ok(ts_tile_write_image(src, w, v ? sel : NULL, v ? 2 : 0, gp), what)) continue;
            if (!tu_expect(translate(src, w, sel, v ? 2 : 0, wp), "%s: gdal_translate", what)) continue;
            compare_files(gp, wp, what);
        }
    }
    tu_expect(tmp_files(tmpdir) == 0, "image tiles: %d temporary files left", tmp_count);

    /* Writing over an existing tile replaces it. */
    const char *gp = tpath("got_1_0.tif");
    tu_expect_ok(ts_tile_write_image(src, &tile_windows[4], NULL, 0, gp), "tile over an existing one");
    compare_files(gp, tpath("want_4_0.tif"), "tile written over another");

    /* Errors: each names the file, window or band, and leaves nothing behind. */
    const ts_window out_w = {IW - 10, 5, 20, 20};
    const char *ep = tpath("err.tif");
    tu_expect_error(ts_tile_write_image(src, &out_w, NULL, 0, ep), TS_ERR_INVALID_ARG, "window outside the raster",
                    "err.tif", "20x20 at col 290, row 5", "not inside", "image.tif", "300x270", NULL);
    const ts_window neg_w = {-1, 0, 5, 5};
    tu_expect_error(ts_tile_write_image(src, &neg_w, NULL, 0, ep), TS_ERR_INVALID_ARG, "negative offset",
                    "col -1", "not inside", NULL);
    static const int bad[2] = {1, 4};
    tu_expect_error(ts_tile_write_image(src, &tile_windows[1], bad, 2, ep), TS_ERR_INVALID_ARG, "missing band",
                    "err.tif", "band 4", "image.tif", "3 bands", NULL);
    tu_expect(!file_exists(ep) && !file_exists(tpath("err.tif.tmp")), "errors leave no file");
    const char *np = tpath("no/such/folder/t.tif");
    tu_expect_error(ts_tile_write_image(src, &tile_windows[1], NULL, 0, np), TS_ERR_IO, "unwritable folder",
                    "no/such/folder/t.tif", "cannot create", NULL);
    GDALClose(src);

    /* An internal per-dataset mask travels with the tile, as with gdal_translate. */
    src = GDALOpen(tpath("masked.tif"), GA_ReadOnly);
    if (tu_expect(src != NULL, "open masked.tif")) {
        tu_expect(GDALGetMaskFlags(GDALGetRasterBand(src, 1)) == GMF_PER_DATASET, "masked.tif has a dataset mask");
        const ts_window *w = &tile_windows[1];
        if (tu_expect_ok(ts_tile_write_image(src, w, NULL, 0, tpath("got_masked.tif")), "masked tile") &&
            tu_expect(translate(src, w, NULL, 0, tpath("want_masked.tif")), "masked: gdal_translate"))
            compare_files(tpath("got_masked.tif"), tpath("want_masked.tif"), "tile with a dataset mask");
        tu_expect(!file_exists(tpath("got_masked.tif.msk")) && !file_exists(tpath("got_masked.tif.tmp.msk")),
                  "the mask is internal");
        GDALClose(src);
    }
}

/* ---- mask tiles and whole jobs ---- */
static void window_labels(const ts_window *w, int32_t *out)
{
    for (int y = 0; y < w->height; y++)
        for (int x = 0; x < w->width; x++)
            out[y * w->width + x] = ref_labels[(w->row_off + y) * IW + (w->col_off + x)];
}

/* Expected emptiness: every valid pixel background (0) or ignore (255). */
static int brute_empty(const ts_window *w, int with_labels)
{
    for (int y = 0; y < w->height; y++)
        for (int x = 0; x < w->width; x++) {
            const int px = (int)w->col_off + x, py = (int)w->row_off + y;
            if (!pix_valid(px, py)) continue;
            if (!with_labels) return 0;
            const int32_t c = ref_labels[py * IW + px];
            if (c != 0 && c != 255) return 0;
        }
    return 1;
}

static void check_mask_tile(const char *mask_path, const char *image_path, const ts_window *w, ts_labels *l)
{
    GDALDatasetH m = GDALOpen(mask_path, GA_ReadOnly), im = GDALOpen(image_path, GA_ReadOnly);
    if (!tu_expect(m && im, "open %s and %s", mask_path, image_path)) {
        if (m) GDALClose(m);
        if (im) GDALClose(im);
        return;
    }
    GDALRasterBandH b = GDALGetRasterBand(m, 1);
    tu_expect(GDALGetRasterCount(m) == 1 && GDALGetRasterDataType(b) == GDT_Byte, "%s: one Byte band", mask_path);
    int has = 0;
    double nd = GDALGetRasterNoDataValue(b, &has);
    tu_expect(has && nd == 255, "%s: nodata %d/%g, want 255 (the ignore id)", mask_path, has, nd);
    double ga[6], gb[6];
    tu_expect(GDALGetGeoTransform(m, ga) == CE_None && GDALGetGeoTransform(im, gb) == CE_None &&
                  memcmp(ga, gb, sizeof ga) == 0,
              "%s: geotransform differs from the image tile's", mask_path);
    tu_expect(strcmp(GDALGetProjectionRef(m), GDALGetProjectionRef(im)) == 0, "%s: CRS differs from the image tile's",
              mask_path);
    const size_t n = (size_t)w->width * w->height;
    int32_t *got = malloc(n * sizeof *got), *want = malloc(n * sizeof *want), *ref = malloc(n * sizeof *ref);
    int ok = GDALRasterIO(b, GF_Read, 0, 0, w->width, w->height, got, w->width, w->height, GDT_Int32, 0, 0) ==
             CE_None;
    tu_expect(ok && GDALGetRasterXSize(m) == w->width && GDALGetRasterYSize(m) == w->height, "%s: read", mask_path);
    if (ok && tu_expect_ok(ts_labels_read(l, w, want), "ts_labels_read")) {
        tu_check_equal_i32("mask tile", mask_path, got, want, n);
        window_labels(w, ref);
        tu_check_equal_i32("mask tile vs gdal_rasterize", mask_path, got, ref, n);
    }
    free(got);
    free(want);
    free(ref);
    GDALClose(m);
    GDALClose(im);
}

static void test_jobs(void)
{
    char image[600], labels[600];
    snprintf(image, sizeof image, "%s", tpath("image.tif"));
    snprintf(labels, sizeof labels, "%s", tpath("labels.gpkg"));
    ts_grid grid;
    if (!tu_expect_ok(ts_windows_read_grid(image, &grid), "grid")) return;
    ts_label_opts lo;
    ts_label_opts_init(&lo);
    lo.attribute = "cls";
    ts_labels *l = NULL;
    if (!tu_expect_ok(ts_labels_open(labels, &grid, &lo, &l), "labels")) {
        ts_grid_free(&grid);
        return;
    }
    ts_window_list wl;
    ts_window_list_init(&wl);
    /* The first five: the whole-image window shares offset 0,0 with window 3 (see the errors below). */
    const int nw = N_TILE_WINDOWS - 1;
    for (int i = 0; i < nw; i++) ts_window_list_push(&wl, tile_windows[i], i);

    for (int skip = 0; skip < 2; skip++)
        for (int with_labels = 0; with_labels < 2; with_labels++) {
            char out[64], what[96];
            snprintf(out, sizeof out, "job_%d_%d", skip, with_labels);
            snprintf(what, sizeof what, "ts_tile_windows skip_empty=%d labels=%d", skip, with_labels);
            const char *dir = tpath(out);
            ts_tile_job job = {.image = image,
                               .windows = &wl,
                               .labels = with_labels ? labels : NULL,
                               .label_opts = &lo,
                               .skip_empty = skip,
                               .out_dir = dir,
                               .prefix = "scene"};
            ts_tile_report rep;
            if (!tu_expect_ok(ts_tile_windows(&job, &rep), what)) continue;
            size_t want_written = 0, want_empty = 0;
            for (int i = 0; i < nw; i++) {
                const ts_window *w = &tile_windows[i];
                char ip[600], mp[600];
                snprintf(ip, sizeof ip, "%s/images/scene_%lld_%lld.tif", dir, (long long)w->col_off,
                         (long long)w->row_off);
                snprintf(mp, sizeof mp, "%s/masks/scene_%lld_%lld.tif", dir, (long long)w->col_off,
                         (long long)w->row_off);
                const int empty = skip && brute_empty(w, with_labels);
                want_empty += empty;
                want_written += !empty;
                tu_expect(file_exists(ip) == !empty, "%s: window %d image tile %s (empty %d)", what, i,
                          empty ? "written" : "missing", empty);
                tu_expect(file_exists(mp) == (!empty && with_labels), "%s: window %d mask tile", what, i);
                if (!empty && with_labels) check_mask_tile(mp, ip, w, l);
            }
            tu_expect(rep.written == want_written && rep.empty == want_empty && rep.buffer == 0 &&
                          rep.mask_type == GDT_Byte && rep.image_bands == 3,
                      "%s: report written %zu empty %zu, want %zu %zu", what, rep.written, rep.empty, want_written,
                      want_empty);
            tu_expect(!skip || want_empty > 0, "%s: the windows include empty ones", what);
            tu_expect(tmp_files(dir) == 0, "%s: %d temporary files left", what, tmp_count);
        }

    /* Splits: buffer windows are skipped, only_split keeps one split. */
    ts_window_list sl;
    ts_window_list_init(&sl);
    ts_window_list_copy(&sl, &wl);
    sl.has_split = 1;
    const uint8_t tags[5] = {TS_SPLIT_TRAIN, TS_SPLIT_VAL, TS_SPLIT_BUFFER, TS_SPLIT_TRAIN, TS_SPLIT_TEST};
    memcpy(sl.split, tags, 5);
    ts_tile_job job = {.image = image, .windows = &sl, .out_dir = tpath("job_split"), .prefix = "s",
                       .only_split = TS_SPLIT_TRAIN};
    ts_tile_report rep;
    if (tu_expect_ok(ts_tile_windows(&job, &rep), "only_split train"))
        tu_expect(rep.written == 2 && rep.buffer == 1 && rep.other_split == 2,
                  "only_split: written %zu buffer %zu other %zu, want 2 1 2", rep.written, rep.buffer,
                  rep.other_split);
    tu_expect(file_exists(tpath("job_split/images/s_10_7.tif")) && file_exists(tpath("job_split/images/s_0_0.tif")) &&
                  !file_exists(tpath("job_split/images/s_280_257.tif")),
              "only_split: the train tiles, not the buffer one");
    job.only_split = TS_SPLIT_NONE;
    job.out_dir = tpath("job_split_all");
    if (tu_expect_ok(ts_tile_windows(&job, &rep), "all splits"))
        tu_expect(rep.written == 4 && rep.buffer == 1, "all splits: written %zu buffer %zu", rep.written, rep.buffer);
    ts_window_list_free(&sl);

    /* Bands: the tiles hold the bands asked for. */
    static const int b2[1] = {2};
    job = (ts_tile_job){.image = image, .windows = &wl, .bands = b2, .nbands = 1, .out_dir = tpath("job_b2"),
                        .prefix = "b"};
    if (tu_expect_ok(ts_tile_windows(&job, &rep), "bands 2")) {
        GDALDatasetH t = GDALOpen(tpath("job_b2/images/b_33_41.tif"), GA_ReadOnly);
        tu_expect(t && GDALGetRasterCount(t) == 1 && rep.image_bands == 1, "bands 2: one band");
        if (t) {
            uint16_t v = 0;
            tu_expect(GDALRasterIO(GDALGetRasterBand(t, 1), GF_Read, 5, 3, 1, 1, &v, 1, 1, GDT_UInt16, 0, 0) ==
                              CE_None &&
                          v == pix(2, 38, 44),
                      "bands 2: pixel %u, want %u", v, pix(2, 38, 44));
            GDALClose(t);
        }
    }

    /* Errors. */
    FILE *f = fopen(tpath("afile"), "w");
    if (f) fclose(f);
    job = (ts_tile_job){.image = image, .windows = &wl, .out_dir = tpath("afile/sub"), .prefix = "x"};
    tu_expect_error(ts_tile_windows(&job, &rep), TS_ERR_IO, "output folder under a file", "afile/sub/images",
                    "cannot create the folder", NULL);
    /* Windows 3 (40x30) and 5 (the whole image) both start at 0,0. */
    ts_window_list_push(&wl, tile_windows[nw], nw);
    job.out_dir = tpath("job_dup");
    tu_expect_error(ts_tile_windows(&job, &rep), TS_ERR_INVALID_ARG, "colliding names", "40x30", "300x270",
                    "col 0, row 0", "same name", NULL);
    tu_expect(!file_exists(tpath("job_dup/images/x_10_7.tif")), "colliding names: nothing written");
    wl.count = (size_t)nw;
    ts_window_list one;
    ts_window_list_init(&one);
    ts_window_list_push(&one, (ts_window){250, 100, 60, 20}, 0);
    job.windows = &one;
    job.out_dir = tpath("job_out");
    tu_expect_error(ts_tile_windows(&job, &rep), TS_ERR_INVALID_ARG, "window outside", "60x20 at col 250, row 100",
                    "image.tif", NULL);
    job.labels = labels;
    job.label_opts = &lo;
    tu_expect_error(ts_tile_windows(&job, &rep), TS_ERR_INVALID_ARG, "window outside, with labels",
                    "60x20 at col 250, row 100", "image.tif", NULL);
    static const int b5[1] = {5};
    job = (ts_tile_job){.image = image, .windows = &wl, .bands = b5, .nbands = 1, .out_dir = tpath("job_b5"),
                        .prefix = "x"};
    tu_expect_error(ts_tile_windows(&job, &rep), TS_ERR_INVALID_ARG, "job with a missing band", "band 5",
                    "image.tif", NULL);
    job = (ts_tile_job){.image = tpath("missing.tif"), .windows = &wl, .out_dir = tpath("job_m"), .prefix = "x"};
    tu_expect_error(ts_tile_windows(&job, &rep), TS_ERR_IO, "missing image", "missing.tif", NULL);
    ts_window_list_free(&one);

    /* Mask ids that do not fit the type. */
    int32_t ids[6] = {0, 1, 2, 300, 4, 5};
    const ts_window w6 = {3, 4, 3, 2};
    tu_expect_error(ts_tile_write_mask(&grid, &w6, ids, GDT_Byte, 255, tpath("m.tif")), TS_ERR_INVALID_ARG,
                    "id 300 as Byte", "m.tif", "300", "col 0, row 1", "Byte", NULL);
    tu_expect_ok(ts_tile_write_mask(&grid, &w6, ids, GDT_UInt16, 65535, tpath("m16.tif")), "id 300 as UInt16");
    tu_expect(ts_tile_mask_type(255) == GDT_Byte && ts_tile_mask_type(256) == GDT_UInt16 &&
                  ts_tile_mask_type(65535) == GDT_UInt16 && ts_tile_mask_type(65536) == GDT_UInt32,
              "ts_tile_mask_type");
    tu_expect(!file_exists(tpath("m.tif")) && !file_exists(tpath("m.tif.tmp")), "mask error leaves nothing");

    ts_window_list_free(&wl);
    ts_labels_close(l);
    ts_grid_free(&grid);
}

/* ---- the mask reader and the filter ---- */
static void test_reader(void)
{
    static const struct {
        const char *file;
        const int *bands;
        int nbands;
        int want_read;
    } cases[] = {
        {"image.tif", NULL, 0, 3}, /* per-band nodata: every band */
        {"masked.tif", NULL, 0, 1}, /* one internal mask: one band */
        {"plain.tif", NULL, 0, 0},  /* nothing to read */
    };
    static const ts_window ws[] = {{0, 0, 64, 64}, {33, 41, 17, 29}, {100, 100, 80, 70}, {IW - 20, IH - 13, 20, 13}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ts_mask_reader_opts o = {.image = tpath(cases[c].file), .read_valid = 1};
        ts_mask_reader *r = NULL;
        ts_raster *full = NULL;
        if (!tu_expect_ok(ts_mask_reader_open(&o, &r), cases[c].file)) continue;
        tu_expect(ts_mask_reader_image_bands(r) == cases[c].want_read, "%s: reads %d bands, want %d", cases[c].file,
                  ts_mask_reader_image_bands(r), cases[c].want_read);
        if (tu_expect_ok(ts_raster_open(tpath(cases[c].file), NULL, &full), "raster")) {
            for (size_t k = 0; k < sizeof ws / sizeof ws[0]; k++) {
                const size_t n = (size_t)ws[k].width * ws[k].height;
                uint8_t *got = malloc(n), *want = malloc(n);
                float *buf = malloc(3 * n * sizeof *buf);
                memset(got, 1, n);
                int ok = tu_expect_ok(ts_mask_reader_read(r, &ws[k], NULL, got), "reader") &&
                         tu_expect_ok(ts_raster_read(full, &ws[k], buf, want), "ts_raster_read");
                size_t diff = 0, brute = 0;
                for (size_t i = 0; ok && i < n; i++) {
                    diff += (got[i] != 0) != (want[i] != 0);
                    const int px = (int)ws[k].col_off + (int)(i % (size_t)ws[k].width);
                    const int py = (int)ws[k].row_off + (int)(i / (size_t)ws[k].width);
                    brute += (got[i] != 0) != (cases[c].want_read ? pix_valid(px, py) : 1);
                }
                tu_expect(ok && diff == 0 && brute == 0, "%s window %zu: %zu pixels differ from ts_raster_read, %zu "
                          "from the rule", cases[c].file, k, diff, brute);
                free(got);
                free(want);
                free(buf);
            }
            ts_raster_close(full);
        }
        ts_mask_reader_close(r);
    }
    /* One band asked for: one band read, and its own validity. */
    static const int b2[1] = {2};
    ts_mask_reader_opts o = {.image = tpath("image.tif"), .read_valid = 1, .bands = b2, .nbands = 1};
    ts_mask_reader *r = NULL;
    if (tu_expect_ok(ts_mask_reader_open(&o, &r), "band 2")) {
        tu_expect(ts_mask_reader_image_bands(r) == 1, "band 2: one band read");
        const ts_window w = {40, 30, 30, 30};
        uint8_t v[900];
        if (tu_expect_ok(ts_mask_reader_read(r, &w, NULL, v), "band 2 read")) {
            int bad = 0;
            for (int i = 0; i < 900; i++) bad += (v[i] != 0) != (pix(2, 40 + i % 30, 30 + i / 30) != 0);
            tu_expect(bad == 0, "band 2: %d pixels differ", bad);
        }
        const ts_window out = {290, 0, 20, 5};
        tu_expect_error(ts_mask_reader_read(r, &out, NULL, v), TS_ERR_INVALID_ARG, "reader window outside",
                        "image.tif", "20x5 at col 290, row 0", NULL);
        tu_expect_error(ts_mask_reader_read(r, &w, (int32_t *)v, NULL), TS_ERR_INVALID_ARG, "labels without labels",
                        "no", NULL);
        ts_mask_reader_close(r);
    }
    static const int b9[1] = {9};
    o.bands = b9;
    tu_expect_error(ts_mask_reader_open(&o, &r), TS_ERR_INVALID_ARG, "reader band 9", "image.tif", "band 9", NULL);
}

static void test_filter(void)
{
    char image[600], labels[600];
    snprintf(image, sizeof image, "%s", tpath("image.tif"));
    snprintf(labels, sizeof labels, "%s", tpath("labels.gpkg"));
    ts_window_list all;
    ts_window_list_init(&all);
    if (!tu_expect_ok(ts_windows_grid(&all, IW, IH, 32, 32, 29, 29, 0), "grid")) return;
    /* and some odd sizes */
    tu_rng rng;
    tu_rng_seed(&rng, 7);
    for (int i = 0; i < 40; i++) {
        int w = 5 + tu_randint(&rng, 60), h = 5 + tu_randint(&rng, 60);
        ts_window_list_push(&all, (ts_window){tu_randint(&rng, IW - w + 1), tu_randint(&rng, IH - h + 1), w, h},
                            1000 + i);
    }
    ts_label_opts lo;
    ts_label_opts_init(&lo);
    lo.attribute = "cls";
    ts_mask_reader_opts ro = {.image = image, .labels = labels, .label_opts = &lo};
    static const struct {
        int drop_bg;
        double max_nd;
    } rules[] = {{1, 0.3}, {0, 0.0}, {1, 1.0}, {0, 0.05}, {1, 0.0}};
    for (size_t k = 0; k < sizeof rules / sizeof rules[0]; k++) {
        ts_mask_filter_params p = {.drop_background = rules[k].drop_bg,
                                   .background = 0,
                                   .ignore_index = 255,
                                   .max_nodata_fraction = rules[k].max_nd};
        /* brute force */
        ts_window_list want;
        ts_window_list_init(&want);
        size_t want_nd = 0, want_bg = 0;
        for (size_t i = 0; i < all.count; i++) {
            const ts_window *w = &all.w[i];
            size_t bad = 0;
            for (int y = 0; y < w->height; y++)
                for (int x = 0; x < w->width; x++) bad += !pix_valid((int)w->col_off + x, (int)w->row_off + y);
            const double frac = (double)bad / ((double)w->width * w->height);
            if (p.max_nodata_fraction < 1.0 && frac > p.max_nodata_fraction)
                want_nd++;
            else if (p.drop_background && brute_empty(w, 1))
                want_bg++;
            else
                ts_window_list_push(&want, *w, all.id[i]);
        }
        for (int threads = 1; threads <= 2; threads++) {
            ts_window_list got;
            ts_window_list_init(&got);
            ts_window_list_copy(&got, &all);
            ts_mask_filter_report rep;
            char what[96];
            snprintf(what, sizeof what, "filter drop_bg=%d max_nodata=%g threads=%d", p.drop_background,
                     p.max_nodata_fraction, threads);
            if (tu_expect_ok(ts_windows_filter_masks(&got, &ro, &p, threads, &rep), what)) {
                int same = got.count == want.count;
                for (size_t i = 0; same && i < got.count; i++)
                    same = memcmp(&got.w[i], &want.w[i], sizeof got.w[i]) == 0 && got.id[i] == want.id[i];
                tu_expect(same, "%s: kept %zu windows, brute force %zu (or they differ)", what, got.count, want.count);
                tu_expect(rep.dropped_nodata == want_nd && rep.dropped_background == want_bg &&
                              rep.windows == all.count && rep.threads == threads && rep.image_bands == 3,
                          "%s: dropped %zu nodata + %zu background, brute force %zu + %zu", what, rep.dropped_nodata,
                          rep.dropped_background, want_nd, want_bg);
            }
            ts_window_list_free(&got);
        }
        tu_expect(want.count > 0 && want.count < all.count, "rule %zu: the scene keeps some windows and drops some",
                  k);
        ts_window_list_free(&want);
    }
    /* Errors: drop_background without labels; a failing window (outside) is
     * reported with its index, whatever the thread count, and the list stays. */
    ts_mask_filter_params p = {.drop_background = 1, .ignore_index = 255, .max_nodata_fraction = 1.0};
    ts_mask_reader_opts nol = {.image = image};
    tu_expect_error(ts_windows_filter_masks(&all, &nol, &p, 1, NULL), TS_ERR_INVALID_ARG, "no labels", "labels",
                    NULL);
    ts_window_list bad;
    ts_window_list_init(&bad);
    ts_window_list_copy(&bad, &all);
    bad.w[17] = (ts_window){IW - 5, 3, 10, 10};
    bad.w[40] = (ts_window){IW - 2, 3, 10, 10};
    for (int threads = 1; threads <= 2; threads++) {
        tu_expect_error(ts_windows_filter_masks(&bad, &ro, &p, threads, NULL), TS_ERR_INVALID_ARG, "failing window",
                        "window 17", "image.tif", NULL);
        tu_expect(bad.count == all.count, "failing filter leaves the list");
    }
    ts_window_list_free(&bad);
    /* No rule: nothing read, nothing dropped. */
    p = (ts_mask_filter_params){.max_nodata_fraction = 1.0, .ignore_index = 255};
    ts_mask_filter_report rep;
    size_t before = all.count;
    tu_expect(ts_windows_filter_masks(&all, &ro, &p, 2, &rep) == TS_OK && all.count == before &&
                  rep.dropped_nodata + rep.dropped_background == 0,
              "no rule: no change");
    ts_window_list_free(&all);
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

int main(void)
{
    snprintf(tmpdir, sizeof tmpdir, "%s/terraseg_tile_XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    ts_gdal_init();
    int ok = tu_expect(write_image(tpath("image.tif"), 0), "write image.tif") &&
             tu_expect(write_image(tpath("masked.tif"), 1), "write masked.tif") &&
             tu_expect(write_image(tpath("plain.tif"), 2), "write plain.tif") &&
             tu_expect(write_labels(tpath("labels.gpkg")), "write labels.gpkg") &&
             tu_expect((ref_labels = reference_labels(tpath("labels.gpkg"))) != NULL, "gdal_rasterize reference");
    if (ok) {
        test_image_tiles();
        test_jobs();
        test_reader();
        test_filter();
    }
    free(ref_labels);
    if (!getenv("TEST_TILE_KEEP"))
        nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    else
        printf("kept %s\n", tmpdir);
    GDALDestroyDriverManager();
    OSRCleanup();
    return tu_finish("tile");
}
