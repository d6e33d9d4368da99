/* io/predict.c: whole-scene prediction into GeoTIFFs.
 *
 *   - With a per-tile function instead of a model (one-hot of the input's
 *     value): the class map equals the input's classes pixel for pixel,
 *     255 where the input is nodata; CRS and geotransform equal the
 *     scene's; colour table and class names are set; probabilities and
 *     confidence hold round(254 p) with GDAL scale 1/254; a COG has the COG
 *     layout and the same pixels; the quick-look PNG has the asked size.
 *   - With a small real U-Net and a model card (bands 2,1; offset, scale,
 *     clip): a scene of exactly one tile equals the eval forward on the card-
 *     normalized input; a scene smaller than the tile equals the forward on
 *     the input reflect-padded by this test's own code.
 *   - On a backend with its own memory (the separate-memory CPU backend of
 *     tests/fake_device.h), the device copy's results equal the CPU's byte
 *     for byte, with one weight upload and one copy each way per batch.
 *     Without TTA on a device with asynchronous downloads and fences,
 *     predict pipelines (batch b computes while b - 1 is blended): the same
 *     bytes as the synchronous device path and the CPU, one asynchronous
 *     upload from the read slot (pinned too, unchanged until its fence), one
 *     asynchronous download and one fence wait per batch, two pinned logits
 *     buffers and two fences, all freed (also when a fence wait fails
 *     mid-scene); with TTA
 *     the synchronous path runs.
 *   - Reader threads: the model's class map, probabilities and confidence
 *     with 3 GDAL readers (cloned handles) equal one reader's byte for
 *     byte; the report gives the count used (the default min(4, cores), at
 *     most one per batch).
 *   - Test-time augmentation: predicting with transform t equals predicting
 *     the transformed scene and mapping the answer back (every transform);
 *     ts_tta_source agrees with torch.rot90 / flip / transpose on a 2x2.
 *   - Bad input: band-count mismatch (names --bands), an existing output
 *     (names --overwrite), a tile function failing mid-scene leaves no file
 *     at all in the folder, a scene without georeferencing warns and gives
 *     a pixel-space map.
 *   - Memory: the peak resident memory of a run stays flat as the scene
 *     grows from 1024 to 12288 rows (a cheap tile function; VmHWM reset
 *     through /proc/self/clear_refs), while storing the rows would need
 *     hundreds of MB. */
#include <cpl_conv.h>
#include <cpl_string.h>
#include <dirent.h>
#include <gdal.h>
#include <math.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/io.h"
#include "io/predict.h"
#include "nn/unet.h"
#include "tests/fake_device.h"
#include "tests/testutil.h"
#include "weights/card.h"
#include "weights/smp.h"

static const double GT[6] = {600000.0, 2.5, 0.0, 5200000.0, 0.0, -2.5};

static char *wkt_32633(void)
{
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    char *w = NULL, *out = NULL;
    if (OSRImportFromEPSG(s, 32633) == OGRERR_NONE && OSRExportToWkt(s, &w) == OGRERR_NONE) out = strdup(w);
    CPLFree(w);
    OSRDestroySpatialReference(s);
    return out;
}

/* A Float32 GeoTIFF of nb bands from v[b][y][x]; nodata -9999 when has_nodata; georef 0: none. */
static int write_scene(const char *path, int w, int h, int nb, const float *v, int has_nodata, int georef)
{
    char **co = CSLSetNameValue(NULL, "COMPRESS", "DEFLATE");
    co = CSLSetNameValue(co, "TILED", "YES");
    GDALDatasetH ds = GDALCreate(GDALGetDriverByName("GTiff"), path, w, h, nb, GDT_Float32, co);
    CSLDestroy(co);
    if (!ds) return 0;
    if (georef) {
        char *wkt = wkt_32633();
        GDALSetGeoTransform(ds, (double *)GT);
        GDALSetProjection(ds, wkt);
        free(wkt);
    }
    int ok = 1;
    for (int b = 0; b < nb; b++) {
        GDALRasterBandH band = GDALGetRasterBand(ds, b + 1);
        if (has_nodata) GDALSetRasterNoDataValue(band, -9999);
        ok &= GDALRasterIO(band, GF_Write, 0, 0, w, h, (void *)(v + (size_t)b * w * h), w, h, GDT_Float32, 0, 0) ==
              CE_None;
    }
    GDALClose(ds);
    return ok;
}

/* Band b of a Byte raster, malloc'ed (NULL on failure). */
static uint8_t *read_bytes(const char *path, int b, int *w, int *h)
{
    GDALDatasetH ds = GDALOpen(path, GA_ReadOnly);
    if (!ds) return NULL;
    *w = GDALGetRasterXSize(ds);
    *h = GDALGetRasterYSize(ds);
    uint8_t *v = malloc((size_t)*w * *h);
    if (v && GDALRasterIO(GDALGetRasterBand(ds, b), GF_Read, 0, 0, *w, *h, v, *w, *h, GDT_Byte, 0, 0) != CE_None) {
        free(v);
        v = NULL;
    }
    GDALClose(ds);
    return v;
}

static int count_files(void)
{
    DIR *d = opendir(tu_path(""));
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));) n += e->d_name[0] != '.';
    if (d) closedir(d);
    return n;
}

/* Files of the scratch folder whose name holds ".tmp-": what an interrupted
 * or sloppy atomic write leaves behind. */
static int count_temporaries(void)
{
    DIR *d = opendir(tu_path(""));
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));) n += strstr(e->d_name, ".tmp-") != NULL;
    if (d) closedir(d);
    return n;
}

/* ---- per-tile functions ---- */

/* K planes: one-hot of round(in[0]) mod K. */
typedef struct onehot {
    int T, K, calls, fail_at;
} onehot;

static ts_status onehot_fn(void *vp, int n, const ts_window *wins, const float *in, float *out)
{
    (void)wins;
    onehot *o = vp;
    if (++o->calls == o->fail_at) return ts_error(TS_ERR_IO, "tile function failed on purpose");
    const size_t plane = (size_t)o->T * o->T;
    for (int b = 0; b < n; b++)
        for (size_t i = 0; i < plane; i++) {
            int c = ((int)lrintf(in[(size_t)b * plane + i]) % o->K + o->K) % o->K;
            for (int k = 0; k < o->K; k++) out[((size_t)b * o->K + k) * plane + i] = k == c ? 0.7f : 0.3f / (o->K - 1);
        }
    return TS_OK;
}

static int warnings;
static char last_warning[512];
static void count_warning(void *ctx, const char *msg)
{
    (void)ctx;
    warnings++;
    snprintf(last_warning, sizeof last_warning, "%s", msg);
}

/* ---- the class map from a tile function ---- */

static void test_tile_fn_outputs(void)
{
    const int W = 203, H = 157, K = 3;
    float *v = malloc(sizeof(float) * W * H);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) v[y * W + x] = ((x / 7 + y / 5) % 11 == 0) ? -9999.0f : (float)((x * 3 + y) / 17);
    const char *scene = strdup(tu_path("scene.tif"));
    tu_expect(write_scene(scene, W, H, 1, v, 1, 1), "write the scene");
    onehot oh = {64, K, 0, 0};
    const char *out = strdup(tu_path("classes.tif")), *probs = strdup(tu_path("probs.tif")),
               *conf = strdup(tu_path("conf.tif")), *ql = strdup(tu_path("ql.png"));
    ts_predict_opts o = {.scene = scene, .out = out, .tile = 64, .overlap = 20, .batch = 3,
                         .probabilities = probs, .confidence = conf, .quicklook = ql, .quicklook_size = 100,
                         .tile_fn = onehot_fn, .tile_ctx = &oh, .tile_in_channels = 1, .tile_classes = K,
                         .warn = count_warning};
    ts_predict_report r;
    warnings = 0;
    tu_expect_ok(ts_predict_run(NULL, NULL, &o, &r), "predict with a tile function");
    tu_expect(warnings == 0, "no warning for a georeferenced scene (got %d: %s)", warnings, last_warning);
    tu_expect(r.width == W && r.height == H && r.classes == K && r.tiles == 5 * 4, /* origins 0,44,88,132,139 x 0,44,88,93 */
              "report: %lldx%lld, %d classes, %lld tiles", (long long)r.width, (long long)r.height, r.classes,
              (long long)r.tiles);
    int w, h;
    uint8_t *c = read_bytes(out, 1, &w, &h), *p1 = read_bytes(probs, 2, &w, &h), *cf = read_bytes(conf, 1, &w, &h);
    tu_expect(c && p1 && cf && w == W && h == H, "read the outputs back");
    int bad = 0, badp = 0, nodata = 0;
    for (int i = 0; c && p1 && cf && i < W * H; i++) {
        int want = v[i] == -9999.0f ? 255 : ((int)v[i]) % K;
        nodata += want == 255;
        bad += c[i] != want;
        uint8_t pw = want == 255 ? 255 : want == 1 ? 178 : 38; /* round(254 * 0.7), round(254 * 0.15) */
        badp += p1[i] != pw || cf[i] != (want == 255 ? 255 : 178);
    }
    tu_expect(bad == 0, "class map equals the input's classes (%d pixels differ)", bad);
    tu_expect(badp == 0, "probabilities and confidence bytes (%d pixels differ)", badp);
    tu_expect(r.nodata_pixels == nodata, "report counts %lld nodata pixels, want %d", (long long)r.nodata_pixels,
              nodata);

    GDALDatasetH ds = GDALOpen(out, GA_ReadOnly);
    double gt[6];
    char *wkt = wkt_32633();
    OGRSpatialReferenceH a = OSRNewSpatialReference(wkt), b = OSRNewSpatialReference(GDALGetProjectionRef(ds));
    tu_expect(GDALGetGeoTransform(ds, gt) == CE_None && memcmp(gt, GT, sizeof gt) == 0,
              "the class map's geotransform equals the scene's");
    tu_expect(OSRIsSame(a, b), "the class map's CRS equals the scene's");
    GDALRasterBandH band = GDALGetRasterBand(ds, 1);
    int has = 0;
    double nd = GDALGetRasterNoDataValue(band, &has);
    char **names = GDALGetRasterCategoryNames(band);
    GDALColorTableH ct = GDALGetRasterColorTable(band);
    tu_expect(has && nd == 255, "nodata 255");
    tu_expect(CSLCount(names) == K && strcmp(names[1], "class 1") == 0, "class names set (%d)", CSLCount(names));
    tu_expect(ct && GDALGetColorEntryCount(ct) == 256 && GDALGetColorEntry(ct, 0)->c1 == 64, "colour table set");
    tu_expect(GDALGetRasterDataType(band) == GDT_Byte, "Byte class map");
    int bx, by;
    GDALGetBlockSize(band, &bx, &by);
    tu_expect(bx == 256 && by == 256, "tiled 256x256 (got %dx%d)", bx, by);
    GDALClose(ds);
    OSRDestroySpatialReference(a);
    OSRDestroySpatialReference(b);
    free(wkt);
    ds = GDALOpen(probs, GA_ReadOnly);
    int ok = 0;
    tu_expect(ds && GDALGetRasterCount(ds) == K &&
                  fabs(GDALGetRasterScale(GDALGetRasterBand(ds, 1), &ok) - 1.0 / 254) < 1e-12 && ok,
              "probabilities: K bands with scale 1/254");
    if (ds) GDALClose(ds);
    ds = GDALOpen(ql, GA_ReadOnly);
    tu_expect(ds && GDALGetRasterXSize(ds) == 100 && GDALGetRasterYSize(ds) == 77 && GDALGetRasterCount(ds) == 3,
              "quick-look: 100x77 RGB PNG");
    if (ds) GDALClose(ds);

    /* An existing output is refused, and nothing is touched. */
    int files = count_files();
    tu_expect_error(ts_predict_run(NULL, NULL, &o, &r), TS_ERR_INVALID_ARG, "existing output", out, "--overwrite",
                    NULL);
    tu_expect(count_files() == files, "a refused run writes nothing");

    /* COG: same pixels, COG layout. */
    const char *cog = strdup(tu_path("classes_cog.tif"));
    ts_predict_opts oc = o;
    oc.out = cog;
    oc.probabilities = oc.confidence = oc.quicklook = NULL;
    oc.cog = 1;
    tu_expect_ok(ts_predict_run(NULL, NULL, &oc, &r), "predict to a COG");
    uint8_t *cc = read_bytes(cog, 1, &w, &h);
    tu_expect(cc && c && memcmp(cc, c, (size_t)W * H) == 0, "the COG has the same pixels");
    ds = GDALOpen(cog, GA_ReadOnly);
    const char *layout = ds ? GDALGetMetadataItem(ds, "LAYOUT", "IMAGE_STRUCTURE") : NULL;
    tu_expect(layout && strcmp(layout, "COG") == 0, "LAYOUT=COG (got %s)", layout ? layout : "none");
    if (ds) GDALClose(ds);
    tu_expect(count_temporaries() == 0, "no temporary (staging file or its .aux.xml) is left, found %d",
              count_temporaries());

    /* A failing tile function: no output, no temporary. */
    files = count_files();
    onehot bad_fn = {64, K, 0, 3};
    ts_predict_opts of = o;
    of.out = tu_path("failed.tif");
    of.probabilities = tu_path("failed_p.tif");
    of.confidence = of.quicklook = NULL;
    of.tile_ctx = &bad_fn;
    tu_expect_error(ts_predict_run(NULL, NULL, &of, &r), TS_ERR_IO, "failing tile function", "on purpose", NULL);
    tu_expect(count_files() == files, "a failed run leaves no file (%d before, %d after)", files, count_files());

    /* Overwrite replaces. */
    o.overwrite = 1;
    tu_expect_ok(ts_predict_run(NULL, NULL, &o, &r), "predict with overwrite");
    tu_expect(count_files() == files, "overwriting leaves no extra file");

    /* Without georeferencing: a warning and a pixel-space map. */
    const char *plain = strdup(tu_path("plain.tif"));
    write_scene(plain, W, H, 1, v, 1, 0);
    ts_predict_opts on = o;
    on.scene = plain;
    on.out = tu_path("plain_classes.tif");
    on.probabilities = on.confidence = on.quicklook = NULL;
    warnings = 0;
    tu_expect_ok(ts_predict_run(NULL, NULL, &on, &r), "predict a scene without georeferencing");
    tu_expect(warnings == 1 && strstr(last_warning, "no georeferencing"), "one warning: %s", last_warning);
    ds = GDALOpen(on.out, GA_ReadOnly);
    tu_expect(ds && GDALGetGeoTransform(ds, gt) != CE_None, "pixel-space output has no geotransform");
    if (ds) GDALClose(ds);

    /* Band-count mismatch. */
    ts_predict_opts ob = o;
    ob.out = tu_path("two.tif");
    ob.probabilities = ob.confidence = ob.quicklook = NULL;
    ob.tile_in_channels = 2;
    tu_expect_error(ts_predict_run(NULL, NULL, &ob, &r), TS_ERR_INVALID_ARG, "band mismatch", "takes 2 bands",
                    "--bands", NULL);
    free(c);
    free(p1);
    free(cf);
    free(cc);
    free(v);
    free((void *)scene);
    free((void *)out);
    free((void *)probs);
    free((void *)conf);
    free((void *)ql);
    free((void *)cog);
    free((void *)plain);
}

/* ---- with a real model ---- */

static void make_model(ts_unet *m, int T)
{
    ts_unet_config cfg = ts_unet_default_config(2, 3);
    cfg.encoder_depth = 3;
    cfg.decoder_channels[0] = 16, cfg.decoder_channels[1] = 8, cfg.decoder_channels[2] = 8;
    tu_expect_ok(ts_unet_init(m, &cfg), "unet init");
    tu_expect_ok(ts_unet_init_random(m, 7), "unet random init");
    /* Running statistics away from 0/1 so that folding BN matters. */
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].kind == TS_PARAM_BUFFER) {
            float *b = ts_unet_param_f32(m, &m->params[i]);
            int var = strstr(m->params[i].name, "running_var") != NULL;
            for (size_t j = 0; j < m->params[i].numel; j++) b[j] = var ? 0.5f + (float)(j % 5) * 0.3f : 0.1f * (float)(j % 3);
        }
    ts_model_card card;
    ts_card_init(&card);
    card.bands = calloc(2, sizeof *card.bands);
    card.n_bands = 2;
    card.bands[0] = (ts_card_band){.index = 2, .offset = 100, .scale = 50};
    card.bands[1] = (ts_card_band){.index = 1, .offset = 10, .scale = 20, .has_clip = 1, .clip_lo = 0, .clip_hi = 40};
    card.tile_size = T;
    tu_expect_ok(ts_unet_set_card(m, &card), "set card");
    ts_card_free(&card);
}

/* The scene's value of band b at (x, y). */
static float sv(int b, int x, int y) { return b == 0 ? (float)((x * 7 + y * 3) % 50) : (float)(80 + (x * y) % 60); }

/* Probabilities [K][h][w] of the eval forward on the card-normalized scene
 * (w x h) reflect-padded to T x T by this test's own mirror. */
static float *reference(ts_unet *m, ts_ctx *ctx, int w, int h, int T)
{
    float *x = calloc((size_t)2 * T * T, sizeof *x);
    for (int yy = 0; yy < T; yy++)
        for (int xx = 0; xx < T; xx++) {
            int sy = yy, sx = xx;
            while (sy >= h) sy = 2 * (h - 1) - sy; /* single reflection suffices here */
            while (sx >= w) sx = 2 * (w - 1) - sx;
            float b2 = sv(1, sx, sy), b1 = sv(0, sx, sy);
            x[yy * T + xx] = (b2 - 100) / 50.0f;
            double c = b1 < 0 ? 0 : b1 > 40 ? 40 : b1;
            x[T * T + yy * T + xx] = (float)((c - 10) / 20.0);
        }
    ts_tensor in = ts_tensor_view(x, 1, 2, T, T), logits;
    tu_expect_ok(ts_unet_forward(m, ctx, &in, 0, &logits), "reference forward");
    float *p = malloc(sizeof(float) * 3 * w * h);
    const size_t plane = (size_t)T * T;
    for (int yy = 0; yy < h; yy++)
        for (int xx = 0; xx < w; xx++) {
            double l[3], mx = -1e30, s = 0;
            for (int k = 0; k < 3; k++) mx = fmax(mx, l[k] = logits.data[k * plane + yy * T + xx]);
            for (int k = 0; k < 3; k++) s += exp(l[k] - mx);
            for (int k = 0; k < 3; k++) p[(k * h + yy) * w + xx] = (float)(exp(l[k] - mx) / s);
        }
    free(x);
    return p;
}

static void scene_for_model(const char *path, int w, int h)
{
    float *v = malloc(sizeof(float) * 2 * w * h);
    for (int b = 0; b < 2; b++)
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++) v[(b * h + y) * w + x] = sv(b, x, y);
    tu_expect(write_scene(path, w, h, 2, v, 0, 1), "write %s", path);
    free(v);
}

static void compare_to_reference(ts_unet *m, ts_ctx *ctx, int w, int h, int T, const char *name)
{
    char scene[64], out[64], probs[64];
    snprintf(scene, sizeof scene, "%s_scene.tif", name);
    snprintf(out, sizeof out, "%s_classes.tif", name);
    snprintf(probs, sizeof probs, "%s_probs.tif", name);
    char *sp = strdup(tu_path(scene)), *op = strdup(tu_path(out)), *pp = strdup(tu_path(probs));
    scene_for_model(sp, w, h);
    ts_predict_opts o = {.scene = sp, .out = op, .probabilities = pp, .overlap = 0};
    ts_predict_report r;
    tu_expect_ok(ts_predict_run(m, ctx, &o, &r), name);
    tu_expect(r.tile == T && r.tiles == 1, "%s: one tile of the card's size %d (got %d, %lld tiles)", name, T, r.tile,
              (long long)r.tiles);
    float *ref = reference(m, ctx, w, h, T);
    int ww, hh, bad_c = 0, bad_p = 0, ties = 0;
    uint8_t *c = read_bytes(op, 1, &ww, &hh);
    for (int i = 0; c && i < w * h; i++) {
        int best = 0;
        for (int k = 1; k < 3; k++)
            if (ref[k * w * h + i] > ref[best * w * h + i]) best = k;
        float second = -1;
        for (int k = 0; k < 3; k++)
            if (k != best) second = fmaxf(second, ref[k * w * h + i]);
        if (ref[best * w * h + i] - second < 1e-5f) ties++;
        else bad_c += c[i] != best;
    }
    for (int k = 0; k < 3; k++) {
        uint8_t *p = read_bytes(pp, k + 1, &ww, &hh);
        for (int i = 0; p && i < w * h; i++) bad_p += abs((int)p[i] - (int)lrintf(ref[k * w * h + i] * 254)) > 1;
        free(p);
    }
    tu_expect(c && bad_c == 0, "%s: class map equals the arg-max of the eval forward (%d differ, %d near-ties)", name,
              bad_c, ties);
    tu_expect(bad_p == 0, "%s: probabilities within 1/254 of the forward's softmax (%d differ)", name, bad_p);
    free(c);
    free(ref);
    free(sp);
    free(op);
    free(pp);
}

/* The device path of predict on the separate-memory CPU backend
 * (tests/fake_device.h): several tiles, a last batch smaller than the others,
 * test-time augmentation; the class map and the probabilities equal the CPU
 * run's byte for byte, the weights are uploaded once, every batch is one
 * upload and one download, and nothing is left allocated. */
static void test_device_path(ts_unet *m, ts_ctx *cpu, int T)
{
    ts_ctx dev;
    if (!tu_expect_ok(ts_ctx_init(&dev, tu_fake_device_backend()), "fake device context")) return;
    char *sp = strdup(tu_path("dev_scene.tif"));
    scene_for_model(sp, 100, 77);
    char *c[2], *pr[2];
    ts_predict_report r[2];
    for (int i = 0; i < 2; i++) {
        char name[32];
        snprintf(name, sizeof name, "dev_classes%d.tif", i);
        c[i] = strdup(tu_path(name));
        snprintf(name, sizeof name, "dev_probs%d.tif", i);
        pr[i] = strdup(tu_path(name));
        ts_predict_opts o = {.scene = sp, .out = c[i], .probabilities = pr[i], .overlap = -1, .batch = 4,
                             .tta = TS_TTA_IDENTITY | TS_TTA_HFLIP | TS_TTA_ROT90};
        tu_fake_reset_counts();
        tu_expect_ok(ts_predict_run(m, i ? &dev : cpu, &o, &r[i]), i ? "predict on the fake device" : "predict on cpu");
    }
    tu_expect(r[0].tiles == 6 && r[1].tiles == 6 && r[0].tile == T, "six tiles of %d px (%lld)", T,
              (long long)r[1].tiles);
    /* 6 tiles in batches of 4 and 2, 3 transforms each: 6 forwards. */
    tu_expect(tu_fake.uploads == 7 && tu_fake.downloads == 6,
              "device predict: weights once, then one upload and one download per forward (%ld, %ld)", tu_fake.uploads,
              tu_fake.downloads);
    tu_expect(tu_fake.async_downloads == 0 && tu_fake.fence_waits == 0 && tu_fake.host_allocs == 0,
              "device predict with TTA runs synchronously (%ld async downloads, %ld fence waits, %ld pinned buffers)",
              tu_fake.async_downloads, tu_fake.fence_waits, tu_fake.host_allocs);
    tu_expect(tu_fake.live == 0 && tu_fake.foreign_ptrs == 0 && tu_fake.bad_memory == 0,
              "device predict releases its memory (%ld live, %ld foreign, %ld bad)", tu_fake.live,
              tu_fake.foreign_ptrs, tu_fake.bad_memory);
    int bad = 0, w, h;
    for (int b = 0; b <= 3; b++) {
        /* band 1 of the class maps, then the three probability bands */
        uint8_t *x = read_bytes(b ? pr[0] : c[0], b ? b : 1, &w, &h);
        uint8_t *y = read_bytes(b ? pr[1] : c[1], b ? b : 1, &w, &h);
        bad += !x || !y || memcmp(x, y, (size_t)w * h) != 0;
        free(x);
        free(y);
    }
    tu_expect(bad == 0, "device predict equals cpu predict byte for byte (%d bands differ)", bad);
    for (int i = 0; i < 2; i++) {
        free(c[i]);
        free(pr[i]);
    }
    free(sp);
    ts_ctx_free(&dev);
}

/* Bands 1 of the class maps and 1..3 of the probabilities of two runs
 * that differ; 0 when every byte is the same. */
static int bands_differ(const char *c0, const char *p0, const char *c1, const char *p1)
{
    int bad = 0, w, h;
    for (int b = 0; b <= 3; b++) {
        uint8_t *x = read_bytes(b ? p0 : c0, b ? b : 1, &w, &h), *y = read_bytes(b ? p1 : c1, b ? b : 1, &w, &h);
        bad += !x || !y || memcmp(x, y, (size_t)w * h) != 0;
        free(x);
        free(y);
    }
    return bad;
}

/* The pipelined device path (no TTA) against the synchronous one (the fake
 * device without asynchronous members) and the CPU's host path: 16 tiles in
 * batches of 5, 5, 5 and 1 (an even count: the last batch's fence is not the
 * first one's), with 1 and 3 readers; then a fence wait failing mid-scene. */
static void test_pipelined(ts_unet *m, ts_ctx *cpu)
{
    ts_ctx dev;
    if (!tu_expect_ok(ts_ctx_init(&dev, tu_fake_device_backend()), "fake device context")) return;
    char *sp = strdup(tu_path("pipe_scene.tif"));
    scene_for_model(sp, 150, 145);
    enum { CPU, SYNC, PIPE, PIPE3, RUNS };
    static const char *const names[RUNS] = {"cpu", "device, synchronous", "device, pipelined",
                                            "device, pipelined, 3 readers"};
    char *c[RUNS], *pr[RUNS];
    ts_predict_report r[RUNS];
    for (int i = 0; i < RUNS; i++) {
        char name[40];
        snprintf(name, sizeof name, "pipe_classes%d.tif", i);
        c[i] = strdup(tu_path(name));
        snprintf(name, sizeof name, "pipe_probs%d.tif", i);
        pr[i] = strdup(tu_path(name));
        ts_predict_opts o = {.scene = sp, .out = c[i], .probabilities = pr[i], .overlap = 13, .batch = 5,
                             .readers = i == PIPE3 ? 3 : 1, .blend = TS_BLEND_GAUSSIAN};
        tu_fake_device_set_async(i != SYNC);
        tu_fake_reset_counts();
        char what[80];
        snprintf(what, sizeof what, "predict, %s", names[i]);
        tu_expect_ok(ts_predict_run(m, i == CPU ? cpu : &dev, &o, &r[i]), what);
        if (i == SYNC)
            tu_expect(tu_fake.downloads == 4 && tu_fake.async_downloads == 0 && tu_fake.host_allocs == 0,
                      "%s: four synchronous downloads (%ld), no asynchronous ones (%ld) or pinned buffers (%ld)",
                      what, tu_fake.downloads, tu_fake.async_downloads, tu_fake.host_allocs);
        if (i == PIPE || i == PIPE3) {
            tu_expect(tu_fake.async_downloads == 4 && tu_fake.fence_records == 4 && tu_fake.fence_waits == 4 &&
                          tu_fake.downloads == 0,
                      "%s: one asynchronous download, fence and wait per batch of 4 (%ld, %ld, %ld; %ld synchronous)",
                      what, tu_fake.async_downloads, tu_fake.fence_records, tu_fake.fence_waits, tu_fake.downloads);
            /* Each wait for its own batch's copy: not an earlier fence (the
             * logits would not be there), not a later one (the host would
             * wait for the next batch's compute too). */
            tu_expect(tu_fake.fence_waits_idle == 0 && tu_fake.fence_waits_multi == 0,
                      "%s: each fence wait brings exactly its batch's logits (%ld waits brought none, %ld several)",
                      what, tu_fake.fence_waits_idle, tu_fake.fence_waits_multi);
            /* Pinned: two logits buffers and the stitcher's N + 2 read slots. */
            const long pins = 2 + (i == PIPE3 ? 3 : 1) + 2;
            tu_expect(tu_fake.host_allocs == pins && tu_fake.fence_news == 2 && tu_fake.host_live == 0 &&
                          tu_fake.fences_live == 0,
                      "%s: %ld pinned buffers and two fences, all freed (%ld and %ld made, %ld and %ld left)", what,
                      pins, tu_fake.host_allocs, tu_fake.fence_news, tu_fake.host_live, tu_fake.fences_live);
            /* Each batch's input goes up asynchronously from its read slot,
             * which nobody refills before the batch is finished. */
            tu_expect(tu_fake.async_uploads == 4 && tu_fake.uploads == 1 && tu_fake.async_src_changed == 0,
                      "%s: one asynchronous upload per batch, only the weights' synchronous, no source changed "
                      "before its fence (%ld, %ld, %ld)",
                      what, tu_fake.async_uploads, tu_fake.uploads, tu_fake.async_src_changed);
        }
        tu_expect(tu_fake.live == 0 && tu_fake.foreign_ptrs == 0 && tu_fake.bad_memory == 0,
                  "%s: releases its memory (%ld live, %ld foreign, %ld bad)", what, tu_fake.live, tu_fake.foreign_ptrs,
                  tu_fake.bad_memory);
    }
    tu_expect(r[CPU].tiles == 16, "pipelined: 16 tiles (%lld)", (long long)r[CPU].tiles);
    tu_expect(r[PIPE].stitch_bytes > r[SYNC].stitch_bytes,
              "pipelined: the report counts the extra read slot (%zu, synchronous %zu)", r[PIPE].stitch_bytes,
              r[SYNC].stitch_bytes);
    for (int i = SYNC; i < RUNS; i++) {
        const int bad = bands_differ(c[CPU], pr[CPU], c[i], pr[i]);
        tu_expect(bad == 0, "predict, %s equals predict on the cpu byte for byte (%d bands differ)", names[i], bad);
    }

    /* A recording that fails (on CUDA: a library call the capture cannot
     * hold): predict carries on with the ops called directly, gives the
     * same bytes, and warns once with the reason. */
    tu_fake_device_set_async(1);
    tu_fake_reset_counts();
    tu_fake.fail_graph_end_at = 1;
    warnings = 0;
    last_warning[0] = 0;
    char *gc = strdup(tu_path("pipe_nograph.tif")), *gp = strdup(tu_path("pipe_nograph_probs.tif"));
    ts_predict_opts go = {.scene = sp, .out = gc, .probabilities = gp, .overlap = 13, .batch = 5, .readers = 1,
                          .blend = TS_BLEND_GAUSSIAN, .warn = count_warning};
    if (tu_expect_ok(ts_predict_run(m, &dev, &go, NULL), "pipelined predict, the recording fails")) {
        tu_expect(warnings == 1 && strstr(last_warning, "CUDA graph") && strstr(last_warning, "on purpose"),
                  "a failed recording: one warning with the reason (%d: %s)", warnings, last_warning);
        tu_expect(tu_fake.graph_begins == 1 && tu_fake.graph_launches == 0,
                  "a failed recording is not tried again (%ld recordings, %ld launches)", tu_fake.graph_begins,
                  tu_fake.graph_launches);
        const int bad = bands_differ(c[CPU], pr[CPU], gc, gp);
        tu_expect(bad == 0, "a failed recording: the same bytes as predict on the cpu (%d bands differ)", bad);
    }
    free(gc);
    free(gp);

    /* A fence wait failing at the second batch: the error comes back, every
     * pinned buffer, fence and device buffer is freed, no file is left. */
    tu_fake_device_set_async(1);
    tu_fake_reset_counts();
    tu_fake.fail_fence_wait_at = 2;
    char *fc = strdup(tu_path("pipe_fail.tif"));
    ts_predict_opts o = {.scene = sp, .out = fc, .overlap = 13, .batch = 5, .readers = 1};
    tu_expect_error(ts_predict_run(m, &dev, &o, NULL), TS_ERR_BACKEND, "pipelined predict, a fence wait fails",
                    "fence_wait failed on purpose", NULL);
    tu_expect(tu_fake.host_live == 0 && tu_fake.fences_live == 0 && tu_fake.live == 0 && tu_fake.bad_memory == 0,
              "pipelined predict after a failed fence wait frees everything (%ld pinned, %ld fences, %ld device, %ld bad)",
              tu_fake.host_live, tu_fake.fences_live, tu_fake.live, tu_fake.bad_memory);
    tu_expect(access(fc, F_OK) != 0, "pipelined predict after a failed fence wait leaves no class map");
    free(fc);
    for (int i = 0; i < RUNS; i++) {
        free(c[i]);
        free(pr[i]);
    }
    free(sp);
    ts_ctx_free(&dev);
}

/* One reader against three (and the default, and more than the batches):
 * a scene of 4 x 3 tiles in batches of 2 (an odd scene, overlap not a
 * divisor), the same bytes in every output. */
static void test_readers(ts_unet *m, ts_ctx *ctx, int T)
{
    char *sp = strdup(tu_path("readers_scene.tif"));
    scene_for_model(sp, 150, 110);
    static const int asked[4] = {1, 3, 0, 50};
    char *c[4], *pr[4], *cf[4];
    ts_predict_report r[4];
    for (int i = 0; i < 4; i++) {
        char name[40];
        snprintf(name, sizeof name, "readers_classes%d.tif", i);
        c[i] = strdup(tu_path(name));
        snprintf(name, sizeof name, "readers_probs%d.tif", i);
        pr[i] = strdup(tu_path(name));
        snprintf(name, sizeof name, "readers_conf%d.tif", i);
        cf[i] = strdup(tu_path(name));
        ts_predict_opts o = {.scene = sp, .out = c[i], .probabilities = pr[i], .confidence = cf[i], .overlap = 13,
                             .batch = 2, .readers = asked[i], .blend = TS_BLEND_GAUSSIAN};
        char what[64];
        snprintf(what, sizeof what, "predict with readers %d", asked[i]);
        tu_expect_ok(ts_predict_run(m, ctx, &o, &r[i]), what);
    }
    /* The default on the CPU backend is one reader (its compute wants the cores). */
    const int want_default = 1;
    tu_expect(r[0].tiles == 12 && r[0].tile == T, "readers: 12 tiles of %d px (%lld of %d)", T, (long long)r[0].tiles,
              r[0].tile);
    tu_expect(r[0].readers == 1 && r[1].readers == 3 && r[2].readers == want_default && r[3].readers == 6,
              "readers used: %d, %d, %d (default, want %d), %d (50 asked, 6 batches)", r[0].readers, r[1].readers,
              r[2].readers, want_default, r[3].readers);
    for (int i = 1; i < 4; i++) {
        int bad = 0, w, h;
        for (int b = 0; b <= 4; b++) {
            /* band 1 of the class map, the three probability bands, the confidence */
            const char *a = b == 0 ? c[0] : b == 4 ? cf[0] : pr[0], *x = b == 0 ? c[i] : b == 4 ? cf[i] : pr[i];
            const int band = b == 0 || b == 4 ? 1 : b;
            uint8_t *u = read_bytes(a, band, &w, &h), *v = read_bytes(x, band, &w, &h);
            bad += !u || !v || memcmp(u, v, (size_t)w * h) != 0;
            free(u);
            free(v);
        }
        tu_expect(bad == 0, "predict with %d readers equals one reader byte for byte (%d bands differ)", r[i].readers,
                  bad);
    }
    for (int i = 0; i < 4; i++) {
        free(c[i]);
        free(pr[i]);
        free(cf[i]);
    }
    free(sp);
}

/* predict(S, tta = t) against predict(t(S)) mapped back. */
static void test_tta(ts_unet *m, ts_ctx *ctx, int T)
{
    char *sp = strdup(tu_path("tta_scene.tif"));
    scene_for_model(sp, T, T);
    for (unsigned t = TS_TTA_HFLIP; t <= TS_TTA_ANTITRANSPOSE; t <<= 1) {
        /* The transformed scene. */
        float *v = malloc(sizeof(float) * 2 * T * T);
        for (int b = 0; b < 2; b++)
            for (int y = 0; y < T; y++)
                for (int x = 0; x < T; x++) {
                    int64_t s = ts_tta_source(t, T, y, x);
                    v[(b * T + y) * T + x] = sv(b, (int)(s % T), (int)(s / T));
                }
        char *tp = strdup(tu_path("tta_t.tif")), *p1 = strdup(tu_path("tta_p1.tif")), *p2 = strdup(tu_path("tta_p2.tif"));
        write_scene(tp, T, T, 2, v, 0, 1);
        ts_predict_opts o = {.scene = sp, .out = tu_path("tta_c1.tif"), .probabilities = p1, .tta = t, .overwrite = 1};
        tu_expect_ok(ts_predict_run(m, ctx, &o, NULL), "predict with tta");
        ts_predict_opts o2 = {.scene = tp, .out = tu_path("tta_c2.tif"), .probabilities = p2, .overwrite = 1};
        tu_expect_ok(ts_predict_run(m, ctx, &o2, NULL), "predict the transformed scene");
        int bad = 0, w, h;
        for (int k = 1; k <= 3; k++) {
            uint8_t *a = read_bytes(p1, k, &w, &h), *b = read_bytes(p2, k, &w, &h);
            for (int i = 0; a && b && i < T * T; i++) bad += a[ts_tta_source(t, T, i / T, i % T)] != b[i];
            free(a);
            free(b);
        }
        tu_expect(bad == 0, "tta transform %u: the prediction maps back exactly (%d bytes differ)", t, bad);
        free(v);
        free(tp);
        free(p1);
        free(p2);
    }
    free(sp);
    /* Several transforms at once average: d4 runs and differs from none somewhere only by averaging. */
    unsigned mask;
    tu_expect_ok(ts_tta_parse("d4", &mask), "parse d4");
    tu_expect(mask == TS_TTA_ALL, "d4 = all 8");
    tu_expect_ok(ts_tta_parse("identity,hflip,rot90", &mask), "parse a list");
    tu_expect(mask == (TS_TTA_IDENTITY | TS_TTA_HFLIP | TS_TTA_ROT90), "list mask");
    tu_expect_error(ts_tta_parse("hflip,spin", &mask), TS_ERR_INVALID_ARG, "bad tta", "spin", NULL);
}

static void test_tta_source(void)
{
    /* torch: x = [[1,2],[3,4]]; rot90(x,1,(-2,-1)) = [[2,4],[1,3]]; rot90 k=2 = [[4,3],[2,1]]; k=3 = [[3,1],[4,2]];
     * flip(-1) = [[2,1],[4,3]]; flip(-2) = [[3,4],[1,2]]; x.T = [[1,3],[2,4]]; anti-transpose = [[4,2],[3,1]]. */
    static const struct {
        unsigned t;
        int want[4];
    } cases[] = {{TS_TTA_IDENTITY, {1, 2, 3, 4}},  {TS_TTA_ROT90, {2, 4, 1, 3}}, {TS_TTA_ROT180, {4, 3, 2, 1}},
                 {TS_TTA_ROT270, {3, 1, 4, 2}},    {TS_TTA_HFLIP, {2, 1, 4, 3}}, {TS_TTA_VFLIP, {3, 4, 1, 2}},
                 {TS_TTA_TRANSPOSE, {1, 3, 2, 4}}, {TS_TTA_ANTITRANSPOSE, {4, 2, 3, 1}}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int got[4];
        for (int i = 0; i < 4; i++) got[i] = 1 + (int)ts_tta_source(cases[c].t, 2, i / 2, i % 2);
        tu_expect(memcmp(got, cases[c].want, sizeof got) == 0, "ts_tta_source %u on a 2x2: %d %d %d %d", cases[c].t,
                  got[0], got[1], got[2], got[3]);
    }
    /* Each is a permutation on an odd size too. */
    for (unsigned t = 1; t <= TS_TTA_ANTITRANSPOSE; t <<= 1) {
        int seen[49] = {0}, ok = 1;
        for (int i = 0; i < 49; i++) seen[ts_tta_source(t, 7, i / 7, i % 7)]++;
        for (int i = 0; i < 49; i++) ok &= seen[i] == 1;
        tu_expect(ok, "transform %u is a permutation of a 7x7 tile", t);
    }
}

/* ---- memory stays flat as the scene grows ---- */

/* A sanitizer's allocator keeps freed memory in quarantine: peak RSS then
 * measures the sanitizer, not terraseg. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define UNDER_SANITIZER 1
#else
#define UNDER_SANITIZER 0
#endif

#if !UNDER_SANITIZER

static long vm_hwm_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb;
}

static int reset_hwm(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return 0;
    int ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok;
}

typedef struct cheap {
    int T, K;
} cheap;

static ts_status cheap_fn(void *vp, int n, const ts_window *wins, const float *in, float *out)
{
    (void)wins;
    cheap *c = vp;
    const size_t plane = (size_t)c->T * c->T;
    for (int b = 0; b < n; b++)
        for (int k = 0; k < c->K; k++)
            memcpy(out + ((size_t)b * c->K + k) * plane, in + (size_t)b * plane, plane * sizeof *out);
    return TS_OK;
}

static void test_memory_flat(void)
{
    const int W = 1024, K = 4, heights[3] = {2048, 6144, 24576};
    long peak[3] = {0, 0, 0};
    GIntBig old_cache = GDALGetCacheMax64();
    GDALSetCacheMax64(8 << 20); /* GDAL's block cache fills up to this on any scene bigger than it */
    for (int i = 0; i < 3; i++) {
        const int H = heights[i];
        char *scene = strdup(tu_path("tall.tif")), *out = strdup(tu_path("tall_classes.tif"));
        float *row = malloc(sizeof(float) * W * 64);
        GDALDatasetH ds = GDALCreate(GDALGetDriverByName("GTiff"), scene, W, H, 1, GDT_Byte,
                                     (char *[]){"COMPRESS=DEFLATE", "TILED=YES", NULL});
        for (int y0 = 0; ds && y0 < H; y0 += 64) {
            for (int j = 0; j < W * 64; j++) row[j] = (float)((j + y0) % 4);
            tu_expect(GDALRasterIO(GDALGetRasterBand(ds, 1), GF_Write, 0, y0, W, 64, row, W, 64, GDT_Float32, 0, 0) ==
                          CE_None,
                      "write the tall scene");
        }
        if (ds) GDALClose(ds);
        free(row);
        cheap c = {256, K};
        ts_predict_opts o = {.scene = scene, .out = out, .tile = 256, .overlap = 64, .batch = 4, .overwrite = 1,
                             .tile_fn = cheap_fn, .tile_ctx = &c, .tile_in_channels = 1, .tile_classes = K};
        if (!reset_hwm()) {
            tu_expect(0, "cannot reset the peak memory counter (/proc/self/clear_refs)");
            break;
        }
        ts_predict_report r;
        tu_expect_ok(ts_predict_run(NULL, NULL, &o, &r), "predict a tall scene");
        peak[i] = vm_hwm_kb();
        printf("memory: %dx%d scene: peak resident %ld KiB (stitcher %.1f MiB)\n", W, H, peak[i],
               r.stitch_bytes / 1048576.0);
        remove(scene);
        remove(out);
        free(scene);
        free(out);
    }
    GDALSetCacheMax64(old_cache);
    /* The first run warms up (GDAL's drivers, the threads' malloc arenas);
     * the next two compare, both bigger than GDAL's cache. Keeping the
     * extra rows' sums would take
     * (8K + 9) W (H2 - H1) bytes. */
    const double extra_kib = (8.0 * K + 9) * W * (heights[2] - heights[1]) / 1024;
    tu_expect(peak[1] > 0 && peak[2] - peak[1] < 4 * 1024,
              "peak memory flat as height grows 4x: %ld -> %ld KiB (storing the rows would add %.0f KiB)", peak[1],
              peak[2], extra_kib);
}
#else
static void test_memory_flat(void) { printf("memory test skipped under a sanitizer\n"); }
#endif

int main(void)
{
    ts_ctx ctx0, ctx;
    tu_init(&ctx0);
    ts_ctx_free(&ctx0);
    tu_expect_ok(ts_ctx_init(&ctx, ts_backend_cpu()), "cpu backend");
    ts_gdal_init();
    if (!tu_tmpdir("test_predict")) return 1;
    test_tta_source();
    test_tile_fn_outputs();
    ts_unet m;
    make_model(&m, 48);
    compare_to_reference(&m, &ctx, 48, 48, 48, "one_tile");
    compare_to_reference(&m, &ctx, 40, 29, 48, "padded");
    test_tta(&m, &ctx, 48);
    test_device_path(&m, &ctx, 48);
    test_pipelined(&m, &ctx);
    test_readers(&m, &ctx, 48);
    ts_unet_free(&m);
    test_memory_flat();
    tu_tmpdir_remove();
    ts_ctx_free(&ctx);
    return tu_finish("predict");
}
