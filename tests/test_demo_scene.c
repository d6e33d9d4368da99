/* io/demo_scene.c: the synthetic demo scene.
 *
 *   - Determinism: the same parameters give byte-identical pixels and the
 *     same features (class, name, geometry WKB, in FID order); another seed
 *     gives other pixels.
 *   - The image: 4 UInt16 bands named blue, green, red, nir with colour
 *     interpretations Blue/Green/Red/Undefined, EPSG:32633, the geotransform
 *     of the parameters, 256x256 tiles, DEFLATE.
 *   - The labels: a GPKG layer "labels" with "class" and "class_name";
 *     rasterized with GDALRasterizeLayers (attribute class, layer order,
 *     pixel centres) it equals the generator's class raster on every pixel,
 *     and so do terraseg's own vector labels (io/labels.c) read in windows.
 *   - Class shares: every class >= 1% of the pixels, background <= 70%, and
 *     the report's counts agree with the class raster.
 *   - Spectra: NIR of vegetation > 2x NIR of water, water the darkest class
 *     in NIR, mean NDVI of vegetation > 0.4 > that of roads; and the task is
 *     not trivial: no single band threshold separates buildings from roads
 *     (best balanced accuracy < 0.95), nor perfectly vegetation from the
 *     background meadow (< 0.99: the two are different materials on
 *     purpose, as grass and trees or crops are, and a model must learn that;
 *     shadows, crowns, field edges and weeds keep one threshold from
 *     doing it all).
 *   - Existing outputs are refused without overwrite (and left alone),
 *     replaced with it; bad sizes and a geographic CRS are refused.
 *   - The time for a 1024 x 1024 scene is printed. */
#include <cpl_conv.h>
#include <gdal.h>
#include <gdal_alg.h>
#include <math.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "io/demo_scene.h"
#include "io/io.h"
#include "io/labels.h"
#include "tests/testutil.h"

enum { W = 512, H = 384 };

/* All 4 bands, band-sequential, malloc'ed; NULL on failure. */
static uint16_t *read_image(const char *path)
{
    GDALDatasetH ds = GDALOpen(path, GA_ReadOnly);
    if (!ds) return NULL;
    int w = GDALGetRasterXSize(ds), h = GDALGetRasterYSize(ds);
    uint16_t *v = malloc((size_t)w * h * 4 * sizeof *v);
    if (v && GDALDatasetRasterIO(ds, GF_Read, 0, 0, w, h, v, w, h, GDT_UInt16, 4, NULL, 0, 0, 0) != CE_None) {
        free(v);
        v = NULL;
    }
    GDALClose(ds);
    return v;
}

/* The features as "class|name|hex(wkb)" lines, in FID order. */
static char *dump_features(const char *path, int *count)
{
    *count = 0;
    GDALDatasetH ds = GDALOpenEx(path, GDAL_OF_VECTOR, NULL, NULL, NULL);
    if (!ds) return NULL;
    OGRLayerH lay = GDALDatasetGetLayerByName(ds, "labels");
    size_t cap = 1 << 16, len = 0;
    char *out = malloc(cap);
    out[0] = '\0';
    OGRFeatureH f;
    GIntBig prev = -1;
    OGR_L_ResetReading(lay);
    while (lay && (f = OGR_L_GetNextFeature(lay)) != NULL) {
        OGRGeometryH g = OGR_F_GetGeometryRef(f);
        size_t nw = (size_t)OGR_G_WkbSize(g);
        unsigned char *wkb = malloc(nw);
        OGR_G_ExportToWkb(g, wkbNDR, wkb);
        size_t need = len + 2 * nw + 64;
        if (need > cap) {
            while (cap < need) cap *= 2;
            out = realloc(out, cap);
        }
        if (OGR_F_GetFID(f) <= prev) tu_expect(0, "FIDs not increasing in %s", path);
        prev = OGR_F_GetFID(f);
        len += (size_t)sprintf(out + len, "%d|%s|", OGR_F_GetFieldAsInteger(f, 0), OGR_F_GetFieldAsString(f, 1));
        for (size_t i = 0; i < nw; i++) len += (size_t)sprintf(out + len, "%02x", wkb[i]);
        out[len++] = '\n';
        out[len] = '\0';
        free(wkb);
        OGR_F_Destroy(f);
        (*count)++;
    }
    GDALClose(ds);
    return out;
}

/* The GPKG rasterized onto the image grid as gdal_rasterize -a class does. */
static uint8_t *rasterize_gpkg(const char *gpkg, const char *tif)
{
    GDALDatasetH img = GDALOpen(tif, GA_ReadOnly);
    GDALDatasetH vec = GDALOpenEx(gpkg, GDAL_OF_VECTOR, NULL, NULL, NULL);
    uint8_t *out = NULL;
    if (img && vec) {
        int w = GDALGetRasterXSize(img), h = GDALGetRasterYSize(img);
        double gt[6];
        GDALGetGeoTransform(img, gt);
        GDALDatasetH mem = GDALCreate(GDALGetDriverByName("MEM"), "", w, h, 1, GDT_Byte, NULL);
        GDALSetGeoTransform(mem, gt);
        GDALSetProjection(mem, GDALGetProjectionRef(img));
        OGRLayerH lay = GDALDatasetGetLayerByName(vec, "labels");
        int band = 1;
        char *opts[] = {"ATTRIBUTE=class", NULL};
        if (lay && GDALRasterizeLayers(mem, 1, &band, 1, &lay, NULL, NULL, NULL, opts, NULL, NULL) == CE_None) {
            out = malloc((size_t)w * h);
            if (GDALRasterIO(GDALGetRasterBand(mem, 1), GF_Read, 0, 0, w, h, out, w, h, GDT_Byte, 0, 0) != CE_None) {
                free(out);
                out = NULL;
            }
        }
        GDALClose(mem);
    }
    if (img) GDALClose(img);
    if (vec) GDALClose(vec);
    return out;
}

/* Best balanced accuracy of one threshold on band b between classes ca and cb. */
static double best_threshold(const uint16_t *px, const uint8_t *cls, int b, int ca, int cb)
{
    static double ha[10002], hb[10002];
    memset(ha, 0, sizeof ha);
    memset(hb, 0, sizeof hb);
    double na = 0, nb = 0;
    const size_t n = (size_t)W * H;
    for (size_t i = 0; i < n; i++) {
        int v = px[(size_t)b * n + i];
        if (cls[i] == ca) ha[v]++, na++;
        if (cls[i] == cb) hb[v]++, nb++;
    }
    double best = 0, ca_below = 0, cb_below = 0;
    for (int t = 0; t <= 10001; t++) { /* threshold between t-1 and t */
        double acc = 0.5 * (ca_below / na + (nb - cb_below) / nb);
        if (acc > best) best = acc;
        if (1 - acc > best) best = 1 - acc;
        if (t <= 10000) ca_below += ha[t], cb_below += hb[t];
    }
    return best;
}

static void check_image_format(const char *tif)
{
    GDALDatasetH ds = GDALOpen(tif, GA_ReadOnly);
    if (!tu_expect(ds != NULL, "cannot open %s", tif)) return;
    tu_expect(GDALGetRasterCount(ds) == 4 && GDALGetRasterXSize(ds) == W && GDALGetRasterYSize(ds) == H,
              "image is %dx%dx%d", GDALGetRasterXSize(ds), GDALGetRasterYSize(ds), GDALGetRasterCount(ds));
    static const char *names[4] = {"blue", "green", "red", "nir"};
    static const GDALColorInterp ci[4] = {GCI_BlueBand, GCI_GreenBand, GCI_RedBand, GCI_Undefined};
    for (int b = 0; b < 4 && b < GDALGetRasterCount(ds); b++) {
        GDALRasterBandH band = GDALGetRasterBand(ds, b + 1);
        int bx = 0, by = 0;
        GDALGetBlockSize(band, &bx, &by);
        tu_expect(GDALGetRasterDataType(band) == GDT_UInt16, "band %d type %s", b + 1,
                  GDALGetDataTypeName(GDALGetRasterDataType(band)));
        tu_expect(strcmp(GDALGetDescription(band), names[b]) == 0, "band %d description '%s'", b + 1,
                  GDALGetDescription(band));
        tu_expect(GDALGetRasterColorInterpretation(band) == ci[b], "band %d colour interpretation", b + 1);
        tu_expect(bx == 256 && by == 256, "band %d blocks %dx%d", b + 1, bx, by);
        int has_nd = 0;
        GDALGetRasterNoDataValue(band, &has_nd);
        tu_expect(!has_nd, "band %d has a nodata value", b + 1);
    }
    const char *comp = GDALGetMetadataItem(ds, "COMPRESSION", "IMAGE_STRUCTURE");
    tu_expect(comp && strcmp(comp, "DEFLATE") == 0, "compression %s", comp ? comp : "none");
    double gt[6];
    tu_expect(GDALGetGeoTransform(ds, gt) == CE_None && gt[0] == 500000 && gt[1] == 1 && gt[2] == 0 &&
                  gt[3] == 5800000 && gt[4] == 0 && gt[5] == -1,
              "geotransform %g %g %g %g %g %g", gt[0], gt[1], gt[2], gt[3], gt[4], gt[5]);
    OGRSpatialReferenceH srs = OSRNewSpatialReference(GDALGetProjectionRef(ds));
    const char *code = OSRGetAuthorityCode(srs, NULL);
    tu_expect(code && strcmp(code, "32633") == 0, "CRS EPSG:%s, want 32633", code ? code : "?");
    OSRDestroySpatialReference(srs);
    GDALClose(ds);
}

/* terraseg's own vector labels, read in 4 windows, against the class raster. */
static void check_ts_labels(const char *gpkg, const char *tif, const uint8_t *classes)
{
    ts_grid grid = {W, H, {500000, 1, 0, 5800000, 0, -1}, NULL};
    GDALDatasetH ds = GDALOpen(tif, GA_ReadOnly);
    grid.crs_wkt = ds ? strdup(GDALGetProjectionRef(ds)) : NULL;
    if (ds) GDALClose(ds);
    ts_label_opts o;
    ts_label_opts_init(&o);
    o.attribute = "class";
    o.classes = DEMO_NCLASSES;
    ts_labels *l = NULL;
    if (tu_expect_ok(ts_labels_open(gpkg, &grid, &o, &l), "ts_labels_open demo labels")) {
        int32_t *m = malloc((size_t)(W / 2) * (H / 2) * sizeof *m);
        int64_t bad = 0;
        for (int k = 0; k < 4; k++) {
            ts_window w = {(k % 2) * (W / 2), (k / 2) * (H / 2), W / 2, H / 2};
            if (!tu_expect_ok(ts_labels_read(l, &w, m), "ts_labels_read")) break;
            for (int y = 0; y < H / 2; y++)
                for (int x = 0; x < W / 2; x++)
                    bad += m[y * (W / 2) + x] != classes[(size_t)(w.row_off + y) * W + (size_t)(w.col_off + x)];
        }
        tu_expect(bad == 0, "terraseg's labels differ from the class raster on %lld pixels", (long long)bad);
        free(m);
        ts_labels_close(l);
    }
    ts_grid_free(&grid);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static long long file_mtime_size(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0 ? (long long)sb.st_size * 1000003LL + (long long)sb.st_mtim.tv_nsec + sb.st_mtim.tv_sec : -1;
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    ts_gdal_init();
    if (!tu_tmpdir("test_demo_scene")) return 1;
    char a_tif[512], a_gpkg[512], b_tif[512], b_gpkg[512], c_tif[512], c_gpkg[512];
    snprintf(a_tif, sizeof a_tif, "%s", tu_path("a.tif"));
    snprintf(a_gpkg, sizeof a_gpkg, "%s", tu_path("a.gpkg"));
    snprintf(b_tif, sizeof b_tif, "%s", tu_path("b.tif"));
    snprintf(b_gpkg, sizeof b_gpkg, "%s", tu_path("b.gpkg"));
    snprintf(c_tif, sizeof c_tif, "%s", tu_path("c.tif"));
    snprintf(c_gpkg, sizeof c_gpkg, "%s", tu_path("c.gpkg"));

    demo_scene_params p;
    demo_scene_defaults(&p);
    tu_expect(p.width == 2048 && p.height == 2048 && p.epsg == 32633 && p.pixel_size == 1.0, "defaults");
    p.width = W;
    p.height = H;
    p.seed = 7;
    demo_scene_report ra = {0}, rb = {0}, rc = {0};
    ra.keep_classes = 1;
    tu_expect_ok(demo_scene_write(&p, a_tif, a_gpkg, 0, &ra), "demo_scene_write a");
    tu_expect_ok(demo_scene_write(&p, b_tif, b_gpkg, 0, &rb), "demo_scene_write b (same seed)");
    p.seed = 8;
    tu_expect_ok(demo_scene_write(&p, c_tif, c_gpkg, 0, &rc), "demo_scene_write c (seed 8)");
    p.seed = 7;
    tu_expect(rb.classes == NULL, "classes returned without keep_classes");

    /* Determinism. */
    uint16_t *pa = read_image(a_tif), *pb = read_image(b_tif), *pc = read_image(c_tif);
    const size_t n = (size_t)W * H;
    if (tu_expect(pa && pb && pc && ra.classes, "reading the images back")) {
        tu_expect(memcmp(pa, pb, n * 4 * sizeof *pa) == 0, "same seed, different pixels");
        size_t diff = 0;
        for (size_t i = 0; i < 4 * n; i++) diff += pa[i] != pc[i];
        tu_expect(diff > n, "seeds 7 and 8 differ on only %zu values", diff);
    }
    int na = 0, nb = 0, nc = 0;
    char *fa = dump_features(a_gpkg, &na), *fb = dump_features(b_gpkg, &nb), *fc = dump_features(c_gpkg, &nc);
    tu_expect(fa && fb && fc && na > 0 && na == nb && strcmp(fa, fb) == 0, "same seed, different features (%d, %d)", na, nb);
    tu_expect(fa && fc && strcmp(fa, fc) != 0, "seeds 7 and 8 give the same features");
    int sum = 0;
    for (int c = 0; c < DEMO_NCLASSES; c++) sum += ra.features[c];
    tu_expect(sum == na && ra.features[0] == 0, "report counts %d features, the layer has %d", sum, na);
    /* Layer order is burn order: classes in soil, vegetation, water, road, building order. */
    if (fa) {
        static const int rank[DEMO_NCLASSES] = {-1, 4, 3, 2, 1, 0};
        int last = -1, ok = 1;
        for (const char *l = fa; *l; l = strchr(l, '\n') + 1) {
            int c = atoi(l);
            if (c < 1 || c >= DEMO_NCLASSES || rank[c] < last) ok = 0;
            else {
                last = rank[c];
                const char *bar = strchr(l, '|');
                ok &= strncmp(bar + 1, demo_classes[c].name, strlen(demo_classes[c].name)) == 0;
            }
        }
        tu_expect(ok, "features not in burn order or with wrong class names");
    }
    free(fa);
    free(fb);
    free(fc);

    check_image_format(a_tif);

    /* The class table. */
    for (int c = 0; c < DEMO_NCLASSES; c++)
        tu_expect(demo_classes[c].id == c && strlen(demo_classes[c].color) == 7 && demo_classes[c].color[0] == '#',
                  "class table entry %d", c);

    /* The labels rasterized equal the class raster; shares. */
    uint8_t *rast = rasterize_gpkg(a_gpkg, a_tif);
    if (tu_expect(rast && ra.classes, "rasterizing the labels")) {
        size_t bad = 0, first = n;
        int64_t cnt[DEMO_NCLASSES] = {0};
        for (size_t i = 0; i < n; i++) {
            if (rast[i] != ra.classes[i] && bad++ == 0) first = i;
            if (ra.classes[i] < DEMO_NCLASSES) cnt[ra.classes[i]]++;
        }
        tu_expect(bad == 0, "rasterized labels differ from the class raster on %zu pixels (first at %zu: %d vs %d)", bad,
                  first, first < n ? rast[first] : -1, first < n ? ra.classes[first] : -1);
        printf("class shares %dx%d seed 7:", W, H);
        for (int c = 0; c < DEMO_NCLASSES; c++) {
            const double share = (double)cnt[c] / (double)n;
            printf(" %s %.1f%% (%d features)", demo_classes[c].name, 100 * share, ra.features[c]);
            tu_expect(cnt[c] == ra.pixels[c], "report: %lld %s pixels, the raster has %lld", (long long)ra.pixels[c],
                      demo_classes[c].name, (long long)cnt[c]);
            tu_expect(share >= 0.01, "%s covers only %.2f%%", demo_classes[c].name, 100 * share);
        }
        printf("\n");
        tu_expect((double)cnt[0] / (double)n <= 0.70, "background covers %.1f%%", 100.0 * (double)cnt[0] / (double)n);
        int64_t cs = 0;
        for (int c = 0; c < DEMO_NCLASSES; c++) cs += rc.pixels[c];
        tu_expect(cs == (int64_t)n && rc.pixels[0] < (int64_t)n * 7 / 10, "seed 8 shares");
        for (int c = 1; c < DEMO_NCLASSES; c++)
            tu_expect(rc.pixels[c] >= (int64_t)n / 100, "seed 8: %s covers %lld pixels", demo_classes[c].name,
                      (long long)rc.pixels[c]);
        check_ts_labels(a_gpkg, a_tif, ra.classes);
    }

    /* Spectra, over the rasterized labels. */
    if (rast && pa) {
        double mean[DEMO_NCLASSES][4] = {{0}}, ndvi[DEMO_NCLASSES] = {0};
        int64_t cnt[DEMO_NCLASSES] = {0};
        for (size_t i = 0; i < n; i++) {
            const int c = rast[i];
            cnt[c]++;
            for (int b = 0; b < 4; b++) mean[c][b] += pa[(size_t)b * n + i];
            ndvi[c] += ((double)pa[3 * n + i] - pa[2 * n + i]) / ((double)pa[3 * n + i] + pa[2 * n + i]);
        }
        printf("mean B G R NIR, NDVI:\n");
        for (int c = 0; c < DEMO_NCLASSES; c++) {
            const double k = cnt[c] ? 1.0 / (double)cnt[c] : 0;
            for (int b = 0; b < 4; b++) mean[c][b] *= k;
            ndvi[c] *= k;
            printf("  %-10s %6.0f %6.0f %6.0f %6.0f  %.2f\n", demo_classes[c].name, mean[c][0], mean[c][1], mean[c][2],
                   mean[c][3], ndvi[c]);
        }
        tu_expect(mean[4][3] > 2 * mean[3][3], "NIR: vegetation %.0f, water %.0f", mean[4][3], mean[3][3]);
        for (int c = 0; c < DEMO_NCLASSES; c++)
            if (c != 3) tu_expect(mean[3][3] < mean[c][3], "water is not darker in NIR than %s", demo_classes[c].name);
        tu_expect(ndvi[4] > 0.4 && ndvi[2] < 0.4, "NDVI vegetation %.2f, road %.2f", ndvi[4], ndvi[2]);
        tu_expect(mean[5][2] > mean[5][1] && mean[5][1] > mean[5][0], "soil is not R > G > B");
        printf("best single-band threshold, balanced accuracy (building/road, vegetation/background):");
        for (int b = 0; b < 4; b++) {
            const double br = best_threshold(pa, rast, b, 1, 2), vb = best_threshold(pa, rast, b, 4, 0);
            printf(" %.3f/%.3f", br, vb);
            tu_expect(br < 0.95, "band %d separates buildings from roads (%.3f)", b + 1, br);
            tu_expect(vb < 0.99, "band %d separates vegetation from background (%.3f)", b + 1, vb);
        }
        printf("\n");
    }
    free(rast);

    /* Existing outputs. */
    const long long before = file_mtime_size(a_tif), before_l = file_mtime_size(a_gpkg);
    tu_expect_error(demo_scene_write(&p, a_tif, c_gpkg, 0, NULL), TS_ERR_INVALID_ARG, "existing image", "already exists",
                    "overwrite", NULL);
    tu_expect_error(demo_scene_write(&p, tu_path("new.tif"), a_gpkg, 0, NULL), TS_ERR_INVALID_ARG, "existing labels",
                    "already exists", NULL);
    struct stat sb;
    tu_expect(stat(tu_path("new.tif"), &sb) != 0, "a refused run left new.tif behind");
    tu_expect(file_mtime_size(a_tif) == before && file_mtime_size(a_gpkg) == before_l, "a refused run touched a.*");
    p.seed = 8;
    if (tu_expect_ok(demo_scene_write(&p, a_tif, a_gpkg, 1, NULL), "overwrite")) {
        uint16_t *pa2 = read_image(a_tif);
        tu_expect(pa2 && pc && memcmp(pa2, pc, n * 4 * sizeof *pc) == 0, "overwritten image is not seed 8's");
        free(pa2);
    }
    p.seed = 7;

    /* Bad parameters. */
    demo_scene_params q = p;
    q.width = 10;
    tu_expect_error(demo_scene_write(&q, tu_path("x.tif"), tu_path("x.gpkg"), 0, NULL), TS_ERR_INVALID_ARG, "tiny size",
                    "size", NULL);
    q = p;
    q.epsg = 4326;
    tu_expect_error(demo_scene_write(&q, tu_path("x.tif"), tu_path("x.gpkg"), 0, NULL), TS_ERR_INVALID_ARG,
                    "geographic CRS", "4326", NULL);
    tu_expect(stat(tu_path("x.tif"), &sb) != 0 && stat(tu_path("x.gpkg"), &sb) != 0, "a refused run left x.*");

    /* Timing. */
    q = p;
    q.width = q.height = 1024;
    const double t0 = now();
    demo_scene_report rt = {0};
    if (tu_expect_ok(demo_scene_write(&q, tu_path("t.tif"), tu_path("t.gpkg"), 0, &rt), "1024x1024")) {
        printf("1024x1024 scene: %.2f s;", now() - t0);
        for (int c = 0; c < DEMO_NCLASSES; c++)
            printf(" %s %.1f%%", demo_classes[c].name, 100.0 * (double)rt.pixels[c] / (1024.0 * 1024.0));
        printf("\n");
    }

    free(pa);
    free(pb);
    free(pc);
    free(ra.classes);
    tu_tmpdir_remove();
    return tu_finish("demo_scene");
}
