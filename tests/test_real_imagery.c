/* The data pipeline end to end on real imagery (tests/data/fetch.sh puts it
 * in $TERRASEG_TESTDATA; CTest's fetch_testdata fixture runs it first):
 *
 *   L7_ETMs.tif  Landsat 7 ETM+, 6 bands, 349x352, 28.5 m, SIRGAS 2000 / UTM 25S
 *   olinda1.shp  470 census tracts, TIPO = URBANO / RURAL, geographic CRS
 *
 * Checks: the image's size, bands and CRS; the shapefile as labels
 * (TIPO -> URBANO=1, RURAL=2, reprojected from degrees) equal to
 * GDALRasterize onto the image grid, whole and in a window; a copy without
 * the .prj fails with a message naming --assume-crs EPSG:4674, and works with
 * it; a 64 px grid with overlap, drop-background filtering (1 and 2
 * threads), a spatial split (blocks of 128, 0.6/0.2/0.2, seed 3); the batch
 * loader with 2 workers and with 0 giving identical batches; mean/std
 * statistics against GDAL's own; the QC histogram (URBANO > RURAL > 0)
 * against GDALRasterize's counts. Missing data is a FAILURE, not a skip. */
#include <cpl_conv.h>
#include <gdal.h>
#include <gdal_utils.h>
#include <math.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "io/labels.h"
#include "io/loader.h"
#include "io/qc.h"
#include "io/raster.h"
#include "io/windows.h"
#include "tests/testutil.h"

#define TILE 64
#define OVERLAP 16
#define NCLS 3

static char image_path[512], shp_path[512];
static char tmpdir[256];
static ts_label_class class_map[2] = {{"URBANO", 1}, {"RURAL", 2}};

static void label_opts(ts_label_opts *o)
{
    ts_label_opts_init(o);
    o->attribute = "TIPO";
    o->class_map = class_map;
    o->n_class_map = 2;
    o->classes = NCLS;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int file_exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

static int copy_file(const char *from, const char *to)
{
    FILE *a = fopen(from, "rb"), *b = a ? fopen(to, "wb") : NULL;
    int ok = a && b;
    char buf[65536];
    size_t n;
    while (ok && (n = fread(buf, 1, sizeof buf, a)) > 0) ok = fwrite(buf, 1, n, b) == n;
    if (a) ok &= !ferror(a), fclose(a);
    if (b) ok &= fclose(b) == 0;
    return ok;
}

/* GDALRasterize of olinda1 (TIPO mapped through SQLite SQL, layer order
 * kept) onto the image grid: width x height int32, background 0. */
static int32_t *reference_rasterize(const ts_grid *g)
{
    GDALDatasetH src = GDALOpenEx(shp_path, GDAL_OF_VECTOR | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!tu_expect(src != NULL, "GDALOpenEx(%s)", shp_path)) return NULL;
    GDALDriverH mem = GDALGetDriverByName("MEM");
    GDALDatasetH dst = mem ? GDALCreate(mem, "", (int)g->width, (int)g->height, 1, GDT_Int32, NULL) : NULL;
    int ok = dst && GDALSetGeoTransform(dst, (double *)g->gt) == CE_None && GDALSetProjection(dst, g->crs_wkt) == CE_None;
    char *argv[] = {"-a", "cls", "-dialect", "SQLite", "-sql",
                    "SELECT geometry, CASE TIPO WHEN 'URBANO' THEN 1 WHEN 'RURAL' THEN 2 END AS cls FROM olinda1",
                    NULL};
    GDALRasterizeOptions *opts = ok ? GDALRasterizeOptionsNew(argv, NULL) : NULL;
    int err = 0;
    GDALDatasetH r = opts ? GDALRasterize(NULL, dst, src, opts, &err) : NULL;
    if (opts) GDALRasterizeOptionsFree(opts);
    int32_t *out = NULL;
    if (tu_expect(r != NULL && !err, "GDALRasterize(%s): %s", shp_path, CPLGetLastErrorMsg()) &&
        (out = malloc((size_t)g->width * (size_t)g->height * sizeof *out)) != NULL) {
        if (GDALRasterIO(GDALGetRasterBand(dst, 1), GF_Read, 0, 0, (int)g->width, (int)g->height, out, (int)g->width,
                         (int)g->height, GDT_Int32, 0, 0) != CE_None) {
            free(out);
            out = NULL;
        }
    }
    if (dst) GDALClose(dst);
    GDALClose(src);
    tu_expect(out != NULL, "reading the reference rasterization");
    return out;
}

/* ---- per-thread readers: the filter and the loader ---- */

typedef struct reader {
    ts_raster *r;
    ts_labels *l;
    float *scratch; /* C x TILE x TILE */
} reader;

static ts_status filter_read(void *ctx, const ts_window *w, int32_t *labels, uint8_t *valid)
{
    reader *rd = ctx;
    ts_status st = ts_raster_read(rd->r, w, rd->scratch, valid);
    if (!st && labels) st = ts_labels_read(rd->l, w, labels);
    return st;
}

static ts_status sample_read(void *user, int worker, size_t index, const ts_window *w, float *image, int32_t *mask,
                             uint8_t *valid)
{
    (void)index;
    reader *rd = &((reader *)user)[worker];
    ts_status st = ts_raster_read(rd->r, w, image, valid);
    if (!st && mask) st = ts_labels_read(rd->l, w, mask);
    return st;
}

static int open_readers(reader *rd, int n, const ts_raster *base, const ts_grid *g)
{
    ts_label_opts o;
    label_opts(&o);
    for (int i = 0; i < n; i++) {
        memset(&rd[i], 0, sizeof rd[i]);
        if (!tu_expect_ok(ts_raster_clone(base, &rd[i].r), "ts_raster_clone") ||
            !tu_expect_ok(ts_labels_open(shp_path, g, &o, &rd[i].l), "ts_labels_open (reader)"))
            return 0;
        rd[i].scratch = malloc((size_t)ts_raster_channels(base) * TILE * TILE * sizeof(float));
        if (!rd[i].scratch) return 0;
    }
    return 1;
}

static void close_readers(reader *rd, int n)
{
    for (int i = 0; i < n; i++) {
        ts_raster_close(rd[i].r);
        ts_labels_close(rd[i].l);
        free(rd[i].scratch);
    }
}

/* One epoch of a loader into a flat record of everything it handed out. */
typedef struct epoch_record {
    float *img;
    int32_t *mask;
    uint8_t *valid;
    size_t *idx;
    int *tf;
    size_t samples, batches;
} epoch_record;

static int run_epoch(const ts_window_list *wl, reader *rd, int workers, int channels, epoch_record *rec)
{
    ts_loader_opts lo = {.channels = channels, .height = TILE, .width = TILE, .batch_size = 4, .workers = workers,
                         .prefetch = 2, .shuffle = 1, .seed = 42, .aug = {.d4 = 1, .brightness = 0.1f}};
    ts_loader *l = NULL;
    if (!tu_expect_ok(ts_loader_create(&lo, wl->w, wl->count, sample_read, rd, &l), "ts_loader_create")) return 0;
    const size_t px = (size_t)TILE * TILE, n = wl->count;
    memset(rec, 0, sizeof *rec);
    rec->img = malloc(n * channels * px * sizeof(float));
    rec->mask = malloc(n * px * sizeof(int32_t));
    rec->valid = malloc(n * px);
    rec->idx = malloc(n * sizeof(size_t));
    rec->tf = malloc(n * sizeof(int));
    int ok = rec->img && rec->mask && rec->valid && rec->idx && rec->tf;
    ok = ok && tu_expect_ok(ts_loader_begin_epoch(l, 0, 0), "ts_loader_begin_epoch");
    while (ok) {
        ts_batch b;
        int end = 0;
        ok = tu_expect_ok(ts_loader_next(l, &b, &end), "ts_loader_next");
        if (!ok || end) break;
        size_t s0 = rec->samples, bs = (size_t)b.size;
        ok = s0 + bs <= n;
        if (!ok) break;
        memcpy(rec->img + s0 * channels * px, b.image.data, bs * channels * px * sizeof(float));
        memcpy(rec->mask + s0 * px, b.mask, bs * px * sizeof(int32_t));
        memcpy(rec->valid + s0 * px, b.valid, bs * px);
        memcpy(rec->idx + s0, b.indices, bs * sizeof(size_t));
        memcpy(rec->tf + s0, b.transforms, bs * sizeof(int));
        rec->samples += bs;
        rec->batches++;
    }
    ts_loader_destroy(l);
    return ok;
}

static void free_record(epoch_record *r)
{
    free(r->img);
    free(r->mask);
    free(r->valid);
    free(r->idx);
    free(r->tf);
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    ts_gdal_init();
    const double t0 = now();
    const char *dir = getenv("TERRASEG_TESTDATA");
    if (!tu_expect(dir && *dir, "TERRASEG_TESTDATA is not set: run through ctest (the fetch_testdata fixture) or set "
                                "it to the folder tests/data/fetch.sh filled"))
        return tu_finish("real_imagery");
    snprintf(image_path, sizeof image_path, "%s/L7_ETMs.tif", dir);
    snprintf(shp_path, sizeof shp_path, "%s/olinda1.shp", dir);
    if (!tu_expect(file_exists(image_path) && file_exists(shp_path),
                   "test data missing: %s or %s (tests/data/fetch.sh %s)", image_path, shp_path, dir))
        return tu_finish("real_imagery");
    snprintf(tmpdir, sizeof tmpdir, "/tmp/terraseg_real_XXXXXX");
    if (!tu_expect(mkdtemp(tmpdir) != NULL, "mkdtemp")) return tu_finish("real_imagery");

    /* ---- the image ---- */
    ts_band_norm norm = {.kind = TS_NORM_MEANSTD_STATS};
    ts_raster_opts ro = {.norm = &norm, .nnorm = 1};
    ts_raster *img = NULL;
    ts_grid grid = {0};
    if (!tu_expect_ok(ts_raster_open(image_path, &ro, &img), "ts_raster_open(L7_ETMs.tif)") ||
        !tu_expect_ok(ts_raster_grid(img, &grid), "ts_raster_grid"))
        return tu_finish("real_imagery");
    const int C = ts_raster_channels(img);
    tu_expect(grid.width == 349 && grid.height == 352 && C == 6, "L7_ETMs.tif: %lldx%lld, %d bands; want 349x352, 6",
              (long long)grid.width, (long long)grid.height, C);
    {
        OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
        int north = -1, zone = 0;
        int ok = grid.crs_wkt && s && OSRSetFromUserInput(s, grid.crs_wkt) == OGRERR_NONE;
        if (ok) zone = OSRGetUTMZone(s, &north);
        const char *code = ok ? OSRGetAuthorityCode(s, NULL) : NULL;
        tu_expect(ok && OSRIsProjected(s) && zone == 25 && north == 0 && code && strcmp(code, "31985") == 0,
                  "L7_ETMs.tif CRS: want SIRGAS 2000 / UTM 25S (EPSG:31985), got zone %d%s, code %s", zone,
                  north ? "N" : "S", code ? code : "none");
        printf("image: %s, %lldx%lld, %d bands, %s, pixel %.4g m\n", image_path, (long long)grid.width,
               (long long)grid.height, C, OSRGetName(s) ? OSRGetName(s) : "?", grid.gt[1]);
        if (s) OSRDestroySpatialReference(s);
    }
    /* Mean/std normalization statistics, against GDAL's exact statistics. */
    printf("band statistics (mean / std over %lld valid pixels):", (long long)grid.width * grid.height);
    for (int c = 0; c < C; c++) {
        ts_band_stats bs;
        if (!tu_expect_ok(ts_raster_stats(img, c, &bs), "ts_raster_stats")) continue;
        GDALDatasetH ds = GDALOpen(image_path, GA_ReadOnly);
        double mn = 0, mx = 0, mean = 0, sd = 0;
        int gok = ds && GDALComputeRasterStatistics(GDALGetRasterBand(ds, c + 1), FALSE, &mn, &mx, &mean, &sd, NULL,
                                                    NULL) == CE_None;
        if (ds) GDALClose(ds);
        tu_expect(isfinite(bs.mean) && isfinite(bs.std) && bs.std > 0 && bs.min >= 0 && bs.max <= 255 &&
                      bs.count == grid.width * grid.height,
                  "band %d statistics implausible: mean %g std %g min %g max %g count %lld", c + 1, bs.mean, bs.std,
                  bs.min, bs.max, (long long)bs.count);
        tu_expect(gok && fabs(bs.mean - mean) < 1e-6 * fabs(mean) && fabs(bs.std - sd) < 1e-6 * sd,
                  "band %d: mean/std %.9g/%.9g, GDAL says %.9g/%.9g", c + 1, bs.mean, bs.std, mean, sd);
        printf(" %.2f/%.2f", bs.mean, bs.std);
    }
    printf("\n");

    /* ---- the labels: geographic CRS, reprojected; equal to GDALRasterize ---- */
    {
        GDALDatasetH v = GDALOpenEx(shp_path, GDAL_OF_VECTOR | GDAL_OF_READONLY, NULL, NULL, NULL);
        OGRLayerH lyr = v ? GDALDatasetGetLayer(v, 0) : NULL;
        OGRSpatialReferenceH s = lyr ? OGR_L_GetSpatialRef(lyr) : NULL;
        tu_expect(lyr && OGR_L_GetFeatureCount(lyr, TRUE) == 470 && s && OSRIsGeographic(s),
                  "olinda1.shp: want 470 features in a geographic CRS");
        if (v) GDALClose(v);
    }
    ts_label_opts lo;
    label_opts(&lo);
    ts_labels *lab = NULL;
    int32_t *ref = reference_rasterize(&grid);
    const size_t npix = (size_t)grid.width * (size_t)grid.height;
    uint64_t ref_hist[NCLS] = {0};
    if (ref)
        for (size_t i = 0; i < npix; i++)
            if (ref[i] >= 0 && ref[i] < NCLS) ref_hist[ref[i]]++;
    if (tu_expect_ok(ts_labels_open(shp_path, &grid, &lo, &lab), "ts_labels_open(olinda1.shp)") && ref) {
        int32_t *whole = malloc(npix * sizeof *whole), win[TILE * TILE];
        ts_window all = {0, 0, (int)grid.width, (int)grid.height};
        if (whole && tu_expect_ok(ts_labels_read(lab, &all, whole), "ts_labels_read(whole image)"))
            tu_check_equal_i32("labels", "whole image vs GDALRasterize", whole, ref, npix);
        free(whole);
        /* One window of the grid, at an offset that is not a multiple of anything. */
        ts_window w = {144, 96, TILE, TILE};
        int32_t want[TILE * TILE];
        for (int y = 0; y < TILE; y++)
            for (int x = 0; x < TILE; x++) want[y * TILE + x] = ref[(size_t)(w.row_off + y) * grid.width + w.col_off + x];
        if (tu_expect_ok(ts_labels_read(lab, &w, win), "ts_labels_read(window)")) {
            tu_check_equal_i32("labels", "window (144, 96) vs GDALRasterize", win, want, TILE * TILE);
            int fg = 0;
            for (int i = 0; i < TILE * TILE; i++) fg += win[i] > 0;
            printf("window (col 144, row 96, 64x64): %d labelled pixels, equal to GDALRasterize\n", fg);
        }
    }

    /* ---- a copy without .prj: the error names the fix; the fix works ---- */
    {
        char from[600], to[600], noprj[600];
        int ok = 1;
        const char *ext[3] = {"shp", "shx", "dbf"};
        for (int i = 0; i < 3; i++) {
            snprintf(from, sizeof from, "%s/olinda1.%s", dir, ext[i]);
            snprintf(to, sizeof to, "%s/olinda1.%s", tmpdir, ext[i]);
            ok &= copy_file(from, to);
        }
        snprintf(noprj, sizeof noprj, "%s/olinda1.shp", tmpdir);
        ts_labels *l2 = NULL;
        if (tu_expect(ok, "copying the shapefile without its .prj")) {
            ts_status st = ts_labels_open(noprj, &grid, &lo, &l2);
            tu_expect_error(st, TS_ERR_INVALID_ARG, "shapefile without .prj", "no CRS", "--assume-crs EPSG:4674", NULL);
            if (st) printf("without .prj: %s\n", ts_last_error());
            ts_labels_close(st ? NULL : l2);
            ts_label_opts lo2 = lo;
            lo2.assume_crs = "EPSG:4674";
            l2 = NULL;
            int32_t *whole = malloc(npix * sizeof *whole);
            ts_window all = {0, 0, (int)grid.width, (int)grid.height};
            if (tu_expect_ok(ts_labels_open(noprj, &grid, &lo2, &l2), "ts_labels_open(no .prj, --assume-crs EPSG:4674)") &&
                whole && ref && tu_expect_ok(ts_labels_read(l2, &all, whole), "ts_labels_read(no .prj)"))
                tu_check_equal_i32("labels", "no .prj + EPSG:4674 vs GDALRasterize with the .prj", whole, ref, npix);
            free(whole);
            ts_labels_close(l2);
        }
    }

    /* ---- windows: a 64 px grid with overlap, drop-background filtering, a spatial split ---- */
    ts_window_list wl, wl1;
    ts_window_list_init(&wl);
    ts_window_list_init(&wl1);
    reader rd[2];
    memset(rd, 0, sizeof rd);
    int readers_ok = open_readers(rd, 2, img, &grid);
    size_t n_grid = 0, dropped = 0, dropped1 = 0;
    if (tu_expect_ok(ts_windows_grid(&wl, grid.width, grid.height, TILE, TILE, TILE - OVERLAP, TILE - OVERLAP, 0),
                     "ts_windows_grid") &&
        readers_ok) {
        n_grid = wl.count;
        tu_expect(n_grid == 49, "64 px grid with 16 px overlap on 349x352: %zu windows, want 7 x 7 = 49", n_grid);
        ts_window_list_copy(&wl1, &wl);
        ts_mask_filter mf[2];
        void *ctxs[2];
        for (int t = 0; t < 2; t++) {
            mf[t].params = (ts_mask_filter_params){.drop_background = 1, .background = 0, .ignore_index = 255,
                                                   .max_nodata_fraction = 1.0};
            mf[t].read = filter_read;
            mf[t].reader = &rd[t];
            ctxs[t] = &mf[t];
        }
        tu_expect_ok(ts_windows_filter_ctx(&wl, ts_mask_filter_fn, ctxs, 2, &dropped), "filter, 2 threads");
        tu_expect_ok(ts_windows_filter_ctx(&wl1, ts_mask_filter_fn, ctxs, 1, &dropped1), "filter, 1 thread");
        int same = wl.count == wl1.count;
        for (size_t i = 0; same && i < wl.count; i++)
            same = memcmp(&wl.w[i], &wl1.w[i], sizeof wl.w[i]) == 0 && wl.id[i] == wl1.id[i];
        tu_expect(same && dropped == dropped1, "drop-background: 1 and 2 threads keep different windows");
        tu_expect(dropped > 0 && wl.count > 0, "drop-background dropped %zu of %zu (want some, not all)", dropped,
                  n_grid);
        /* Each kept window holds a label; each dropped one none (checked against the reference). */
        for (size_t i = 0; ref && i < wl1.count; i++) {
            const ts_window *w = &wl1.w[i];
            int fg = 0;
            for (int y = 0; y < w->height && !fg; y++)
                for (int x = 0; x < w->width && !fg; x++) fg = ref[(size_t)(w->row_off + y) * grid.width + w->col_off + x] > 0;
            tu_expect(fg, "kept window %zu (col %lld, row %lld) has no label", i, (long long)w->col_off,
                      (long long)w->row_off);
        }
        printf("windows: %zu on the 64 px grid (overlap 16), %zu dropped as all background, %zu kept\n", n_grid,
               dropped, wl.count);
    }
    ts_split_report sr;
    ts_split_params sp = {.block = 128, .ratios = {0.6, 0.2, 0.2}, .seed = 3, .buffer = 0};
    int split_ok = wl.count > 0 && tu_expect_ok(ts_split_assign(&wl, grid.width, grid.height, &sp, &sr), "ts_split_assign");
    if (split_ok) {
        tu_expect(sr.windows[TS_SPLIT_TRAIN] > 0 && sr.windows[TS_SPLIT_VAL] > 0 && sr.windows[TS_SPLIT_TEST] > 0 &&
                      sr.windows[TS_SPLIT_TRAIN] + sr.windows[TS_SPLIT_VAL] + sr.windows[TS_SPLIT_TEST] == wl.count,
                  "split: every split gets windows");
        /* The same split again, from the windows in reverse order. */
        ts_window_list rev;
        ts_window_list_init(&rev);
        for (size_t i = wl.count; i-- > 0;) ts_window_list_push(&rev, wl.w[i], wl.id[i]);
        ts_split_report sr2;
        if (tu_expect_ok(ts_split_assign(&rev, grid.width, grid.height, &sp, &sr2), "ts_split_assign (reversed)")) {
            int same = 1;
            for (size_t i = 0; i < wl.count; i++) same &= rev.split[wl.count - 1 - i] == wl.split[i];
            tu_expect(same, "the split depends on the window order");
        }
        ts_window_list_free(&rev);
        printf("split (blocks of 128 px, 0.6/0.2/0.2, seed 3): train %zu windows in %zu blocks, val %zu in %zu, "
               "test %zu in %zu\n",
               sr.windows[TS_SPLIT_TRAIN], sr.blocks[TS_SPLIT_TRAIN], sr.windows[TS_SPLIT_VAL], sr.blocks[TS_SPLIT_VAL],
               sr.windows[TS_SPLIT_TEST], sr.blocks[TS_SPLIT_TEST]);
    }

    /* ---- the loader: 2 workers and 0 give the same batches ---- */
    if (split_ok && readers_ok) {
        ts_window_list train;
        ts_window_list_init(&train);
        for (size_t i = 0; i < wl.count; i++)
            if (wl.split[i] == TS_SPLIT_TRAIN) ts_window_list_push(&train, wl.w[i], wl.id[i]);
        epoch_record a = {0}, b = {0};
        double tl = now();
        int ok = run_epoch(&train, rd, 2, C, &a);
        double tl2 = now();
        ok = ok && run_epoch(&train, rd, 0, C, &b);
        const size_t px = (size_t)TILE * TILE;
        if (tu_expect(ok && a.samples == train.count && b.samples == train.count && a.batches == b.batches,
                      "loader epochs: %zu and %zu samples of %zu", a.samples, b.samples, train.count)) {
            tu_expect(memcmp(a.img, b.img, a.samples * C * px * sizeof(float)) == 0, "loader: images differ (2 vs 0 workers)");
            tu_expect(memcmp(a.mask, b.mask, a.samples * px * sizeof(int32_t)) == 0, "loader: masks differ");
            tu_expect(memcmp(a.valid, b.valid, a.samples * px) == 0, "loader: valid masks differ");
            tu_expect(memcmp(a.idx, b.idx, a.samples * sizeof(size_t)) == 0 &&
                          memcmp(a.tf, b.tf, a.samples * sizeof(int)) == 0,
                      "loader: indices or transforms differ");
            /* Normalized pixels: finite, roughly centred. */
            double s = 0;
            int finite = 1;
            for (size_t i = 0; i < a.samples * C * px; i++) {
                finite &= isfinite(a.img[i]);
                s += a.img[i];
            }
            double m = s / (double)(a.samples * C * px);
            tu_expect(finite && fabs(m) < 1.5, "loader: normalized pixels finite with a plausible mean (%g)", m);
            printf("loader: %zu train windows, %zu batches of <= 4, identical with 2 workers (%.3f s) and 0 (%.3f s); "
                   "mean normalized value %.3f\n",
                   a.samples, a.batches, tl2 - tl, now() - tl2, m);
        }
        free_record(&a);
        free_record(&b);
        ts_window_list_free(&train);
    }
    close_readers(rd, 2);

    /* ---- QC on the real data: whole image, and over the split windows ---- */
    ts_qc_report qr, qr1;
    ts_qc_params qp = {.image = image_path, .labels = shp_path, .label_opts = &lo, .classes = NCLS, .threads = 2};
    if (tu_expect_ok(ts_qc_run(&qp, &qr), "ts_qc_run (whole image)")) {
        const uint64_t *h = qr.total.hist;
        tu_expect(h[1] > h[2] && h[2] > 0, "qc: URBANO (%llu) > RURAL (%llu) > 0", (unsigned long long)h[1],
                  (unsigned long long)h[2]);
        tu_expect(qr.total.nodata == 0 && h[0] == ref_hist[0] && h[1] == ref_hist[1] && h[2] == ref_hist[2],
                  "qc histogram %llu/%llu/%llu, GDALRasterize %llu/%llu/%llu", (unsigned long long)h[0],
                  (unsigned long long)h[1], (unsigned long long)h[2], (unsigned long long)ref_hist[0],
                  (unsigned long long)ref_hist[1], (unsigned long long)ref_hist[2]);
        tu_expect(qr.errors == 0 && qr.warnings == 0 && ts_qc_find(&qr, "labels_geographic_crs") != NULL, "qc: clean, labels_geographic_crs noted");
        printf("qc histogram (whole image): background %llu, URBANO %llu, RURAL %llu (GDALRasterize: %llu/%llu/%llu)\n",
               (unsigned long long)h[0], (unsigned long long)h[1], (unsigned long long)h[2],
               (unsigned long long)ref_hist[0], (unsigned long long)ref_hist[1], (unsigned long long)ref_hist[2]);
        printf("qc class weights (median frequency): %.4f %.4f %.4f\n", qr.weights_median[0], qr.weights_median[1],
               qr.weights_median[2]);
    }
    ts_qc_report_free(&qr);
    if (split_ok) {
        qp.windows = &wl;
        qp.threads = 2;
        ts_qc_params qp1 = qp;
        qp1.threads = 1;
        if (tu_expect_ok(ts_qc_run(&qp, &qr), "ts_qc_run (windows, 2 threads)") &&
            tu_expect_ok(ts_qc_run(&qp1, &qr1), "ts_qc_run (windows, 1 thread)")) {
            int same = 1;
            for (int s = 0; s < TS_SPLIT_COUNT; s++)
                for (int k = 0; k < NCLS; k++) same &= qr.split[s].hist[k] == qr1.split[s].hist[k];
            tu_expect(same && qr.has_split, "qc per split: 1 and 2 threads differ");
            static const ts_split_tag tags[3] = {TS_SPLIT_TRAIN, TS_SPLIT_VAL, TS_SPLIT_TEST};
            for (int s = 0; s < 3; s++) {
                const ts_qc_counts *c = &qr.split[tags[s]];
                printf("qc %-5s: %3llu windows, class pixels %llu/%llu/%llu\n", ts_split_name(tags[s]),
                       (unsigned long long)c->windows, (unsigned long long)c->hist[0], (unsigned long long)c->hist[1],
                       (unsigned long long)c->hist[2]);
            }
            for (int i = 0; i < qr.n_findings; i++)
                if (qr.findings[i].level >= TS_QC_WARNING) printf("qc finding [%s]: %s\n", qr.findings[i].code, qr.findings[i].message);
        }
        ts_qc_report_free(&qr);
        ts_qc_report_free(&qr1);
    }

    free(ref);
    ts_labels_close(lab);
    ts_window_list_free(&wl);
    ts_window_list_free(&wl1);
    ts_grid_free(&grid);
    ts_raster_close(img);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "note: could not remove %s\n", tmpdir);
    printf("real imagery: %.2f s\n", now() - t0);
    return tu_finish("real_imagery");
}
