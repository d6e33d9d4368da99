/* terraseg predict MODEL SCENE OUT.tif: a whole scene through the model in
 * sliding windows, blended and stitched into a georeferenced class map in
 * bounded memory (io/predict.h, io/stitch.h). */
#include "tools/cmd_predict.h"

#include <cpl_conv.h>
#include <cpl_error.h>
#include <gdal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "io/io.h"
#include "io/predict.h"
#include "kernels/threads.h"
#include "tools/data_args.h"
#include "weights/smp.h"

static int pr_tile = 0, pr_overlap = -1, pr_batch = 4, pr_cog = 0, pr_overwrite = 0, pr_threads = 0;
static int pr_quicklook_size = 1024, pr_quiet = 0, pr_cache_mb = 256, pr_readers = 0, pr_tf32 = 0, pr_benchmark = 0;
static const char *pr_blend = "gaussian", *pr_tta = "none", *pr_bands = NULL, *pr_nodata = NULL;
static const char *pr_probs = NULL, *pr_conf = NULL, *pr_quicklook = NULL, *pr_device = "cpu";
static const char *pr_precision = "fp32";

cli_option predict_options[] = {
    {"tile", 0, CLI_INT, &pr_tile, "PX", "tile side (default: the model card's tile size, else 256)", 0, 16384},
    {"overlap", 0, CLI_INT, &pr_overlap, "PX", "overlap of neighbouring tiles (default: a quarter of the tile)", -1,
     16383},
    {"batch", 0, CLI_INT, &pr_batch, "N", "tiles per forward pass", 1, 1024},
    {"blend", 0, CLI_STRING, &pr_blend, "MODE",
     "blending of overlaps: gaussian (smooth, no seams), cosine (Hann window) or mean (plain average)", 0, 0},
    {"tta", 0, CLI_STRING, &pr_tta, "SPEC",
     "test-time augmentation: none, flips (identity + both mirrors), d4 (all 8 flips/rotations) or a list such as "
     "identity,hflip,rot90",
     0, 0},
    {"bands", 'b', CLI_STRING, &pr_bands, "LIST",
     "scene bands for the model, e.g. 4,3,2 (default: the model card's; needed when the card has none and the scene "
     "has more bands than the model takes)",
     0, 0},
    {"nodata", 0, CLI_STRING, &pr_nodata, "VALUE", "nodata value of the scene's bands, replacing their own", 0, 0},
    {"cog", 0, CLI_FLAG, &pr_cog, NULL, "write Cloud Optimized GeoTIFFs (with overviews)", 0, 0},
    {"probabilities", 0, CLI_STRING, &pr_probs, "FILE.tif",
     "also write per-class probabilities, one Byte band per class: round(254 p), 255 = nodata, GDAL scale 1/254", 0,
     0},
    {"confidence", 0, CLI_STRING, &pr_conf, "FILE.tif",
     "also write the winning class's probability (same encoding), e.g. for terraseg polygonize --confidence", 0, 0},
    {"quicklook", 0, CLI_STRING, &pr_quicklook, "FILE.png", "also write a PNG of class colours over the image", 0, 0},
    {"quicklook-size", 0, CLI_INT, &pr_quicklook_size, "PX", "long side of the quick-look", 16, 16384},
    {"overwrite", 0, CLI_FLAG, &pr_overwrite, NULL, "replace outputs that already exist", 0, 0},
    {"precision", 0, CLI_STRING, &pr_precision, "P",
     "fp32; or bf16 / fp16: half activations on tensor cores (--device cuda; on the CPU emulated and slower)", 0, 0},
    {"device", 0, CLI_STRING, &pr_device, "DEV",
     "where the model runs: cpu, or cuda / cuda:N (a GPU of a CUDA build; reading, blending and writing stay on the "
     "CPU)",
     0, 0},
    {"tf32", 0, CLI_FLAG, &pr_tf32, NULL,
     "with --device cuda and fp32: TF32 tensor-core math for the convolutions (torch.backends.cudnn.allow_tf32): "
     "faster, products rounded to 10-bit mantissas",
     0, 0},
    {"cudnn-benchmark", 0, CLI_FLAG, &pr_benchmark, NULL,
     "with --device cuda: choose each convolution's algorithm by timing cuDNN's candidates on first use "
     "(torch.backends.cudnn.benchmark)",
     0, 0},
    {"threads", 0, CLI_INT, &pr_threads, "N", "compute threads (default: TERRASEG_THREADS or every core)", 0, 4096},
    {"readers", 0, CLI_INT, &pr_readers, "N",
     "GDAL reader threads, each with its own handle on the scene, reading tiles while the model runs; 0: 1 on "
     "the CPU, min(4, cores) with --device cuda",
     0, 64},
    {"cache-mb", 0, CLI_INT, &pr_cache_mb, "MB",
     "at most this much GDAL block cache when GDAL_CACHEMAX is not set (sized to a band of tile rows of the scene)",
     16, 1 << 20},
    {"quiet", 'q', CLI_FLAG, &pr_quiet, NULL, "no progress bar", 0, 0},
    {0},
};

typedef struct progress {
    struct timespec t0;
    int last_pct;
    int tty;
} progress;

static double since(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) * 1e-9;
}

static void show_progress(void *ctx, int64_t done, int64_t total)
{
    progress *p = ctx;
    int pct = total > 0 ? (int)(100 * done / total) : 100;
    if (pct == p->last_pct) return;
    p->last_pct = pct;
    double s = since(&p->t0), eta = done > 0 ? s * (double)(total - done) / (double)done : 0;
    char bar[31];
    int fill = pct * 30 / 100;
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = 0;
    fprintf(stderr, "\r\033[Kpredict [%s] %3d%%  %lld/%lld tiles  %.1f tiles/s  ETA %.0f s", bar, pct,
            (long long)done, (long long)total, s > 0 ? (double)done / s : 0.0, eta);
    if (done == total) fputc('\n', stderr);
    fflush(stderr);
}

static void show_warning(void *ctx, const char *msg)
{
    (void)ctx;
    fprintf(stderr, "terraseg predict: warning: %s\n", msg);
}

/* GDAL's default block cache is 5% of RAM, which would be the biggest
 * allocation of a run. What reading and writing need is one band of tile
 * rows of the scene (every band, any type) plus the output blocks being
 * filled: size the cache for that with room to spare, within [32 MB,
 * --cache-mb]. */
static GIntBig cache_bytes(const char *scene, const ts_unet *m)
{
    GIntBig cap = (GIntBig)pr_cache_mb << 20, want = cap;
    ts_gdal_init(); /* the drivers: this runs before predict opens anything */
    /* Quiet: a scene that does not open is predict's error to report, with its own message. */
    CPLPushErrorHandler(CPLQuietErrorHandler);
    GDALDatasetH ds = GDALOpen(scene, GA_ReadOnly);
    CPLPopErrorHandler();
    if (!ds) return cap; /* predict reports the problem */
    double in_bytes = 0;
    for (int b = 1; b <= GDALGetRasterCount(ds); b++)
        in_bytes += GDALGetDataTypeSizeBytes(GDALGetRasterDataType(GDALGetRasterBand(ds, b)));
    int bx = 256, by = 256;
    if (GDALGetRasterCount(ds) > 0) GDALGetBlockSize(GDALGetRasterBand(ds, 1), &bx, &by);
    if (by > 4096) by = 4096;
    ts_model_card card;
    int tile = pr_tile;
    if (!tile && ts_unet_get_card(m, &card) == TS_OK) {
        tile = card.tile_size;
        ts_card_free(&card);
    }
    if (!tile) tile = 256;
    /* A tile row can straddle block rows of the scene; the outputs (class
     * map, confidence, probabilities) fill 256-row blocks. */
    want = (GIntBig)(1.25 * GDALGetRasterXSize(ds) * ((tile + 2.0 * by) * in_bytes + 256.0 * (2 + m->cfg.classes)));
    GDALClose(ds);
    if (want < ((GIntBig)32 << 20)) want = (GIntBig)32 << 20;
    return want < cap ? want : cap;
}

int run_predict(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "terraseg predict: expects MODEL SCENE OUT.tif (see terraseg predict --help)\n");
        return 2;
    }
    int blend = ts_blend_parse(pr_blend);
    if (blend < 0) {
        fprintf(stderr, "terraseg predict: --blend must be gaussian, cosine or mean, got \"%s\"\n", pr_blend);
        return 2;
    }
    unsigned tta = 0;
    if (ts_tta_parse(pr_tta, &tta)) {
        fprintf(stderr, "terraseg predict: %s\n", ts_last_error());
        return 2;
    }
    int *bands = NULL, nbands = 0, has_nodata = 0;
    double nodata = 0;
    if (parse_band_list("predict", "--bands", pr_bands, &bands, &nbands) ||
        parse_optional_double("predict", "--nodata", pr_nodata, &has_nodata, &nodata)) {
        free(bands);
        return 2;
    }
    if (pr_tile > 0 && pr_overlap >= pr_tile) {
        fprintf(stderr, "terraseg predict: --overlap %d must be less than --tile %d\n", pr_overlap, pr_tile);
        free(bands);
        return 2;
    }
    ts_dtype precision;
    if (strcmp(pr_precision, "fp32") == 0)
        precision = TS_F32;
    else if (strcmp(pr_precision, "bf16") == 0)
        precision = TS_BF16;
    else if (strcmp(pr_precision, "fp16") == 0)
        precision = TS_F16;
    else {
        fprintf(stderr, "terraseg predict: --precision %s: choose fp32, bf16 or fp16\n", pr_precision);
        free(bands);
        return 2;
    }
    /* The device before the model: a name that is wrong is a usage error, and
     * a GPU that is missing should be said before a large model is read. */
    const ts_backend *backend = ts_backend_cpu();
    if (strcmp(pr_device, "cpu") == 0 && (pr_tf32 || pr_benchmark)) {
        fprintf(stderr,
                "terraseg predict: %s is for --device cuda; the CPU computes in exact float32 and times nothing\n",
                pr_tf32 ? "--tf32" : "--cudnn-benchmark");
        free(bands);
        return 2;
    }
    if (strcmp(pr_device, "cpu") != 0) {
        if (strncmp(pr_device, "cuda", 4) != 0 || (pr_device[4] != 0 && pr_device[4] != ':')) {
            fprintf(stderr, "terraseg predict: --device %s: unknown device (cpu, cuda or cuda:N)\n", pr_device);
            free(bands);
            return 2;
        }
        ts_status bs = ts_backend_get(pr_device, &backend);
        /* Process-wide, as torch.backends.cudnn's flags, before the first plan. */
        const ts_device_math dm = {0, pr_tf32, pr_benchmark};
        if (bs == TS_OK) bs = ts_device_math_set(&dm);
        if (bs != TS_OK) {
            fprintf(stderr, "terraseg predict: --device %s: %s\n", pr_device, ts_last_error());
            free(bands);
            return bs == TS_ERR_INVALID_ARG ? 2 : 1;
        }
    }
    ts_threads_init(pr_threads);

    ts_unet m;
    memset(&m, 0, sizeof m);
    ts_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ts_status st = ts_model_load(argv[0], &m, NULL);
    int have_model = st == TS_OK;
    if (have_model && !getenv("GDAL_CACHEMAX") && !CPLGetConfigOption("GDAL_CACHEMAX", NULL))
        GDALSetCacheMax64(cache_bytes(argv[1], &m));
    if (!st) st = ts_ctx_init(&ctx, backend);
    progress pg = {.last_pct = -1, .tty = isatty(fileno(stderr))};
    clock_gettime(CLOCK_MONOTONIC, &pg.t0);
    ts_predict_opts o = {
        .scene = argv[1],
        .out = argv[2],
        .overwrite = pr_overwrite,
        .tile = pr_tile,
        .overlap = pr_overlap,
        .batch = pr_batch,
        .readers = pr_readers,
        .precision = precision,
        .blend = (ts_blend)blend,
        .tta = tta,
        .cog = pr_cog,
        .probabilities = pr_probs,
        .confidence = pr_conf,
        .quicklook = pr_quicklook,
        .quicklook_size = pr_quicklook_size,
        .bands = bands,
        .nbands = nbands,
        .has_nodata = has_nodata,
        .nodata = nodata,
        .progress = (!pr_quiet && pg.tty) ? show_progress : NULL,
        .warn = show_warning,
        .cb_ctx = &pg,
    };
    ts_predict_report r;
    if (!st) st = ts_predict_run(&m, &ctx, &o, &r);
    if (!st) {
        double s = since(&pg.t0);
        printf("predicted %s: %lldx%lld px, %d bands, %d classes; %lld tiles of %d px (overlap %d, %s blend, %d "
               "augmentation%s, %d reader%s) in %.1f s (%.2f Mpx/s)\n",
               argv[1], (long long)r.width, (long long)r.height, r.channels, r.classes, (long long)r.tiles, r.tile,
               r.overlap, ts_blend_name((ts_blend)blend), r.augmentations, r.augmentations == 1 ? "" : "s", r.readers,
               r.readers == 1 ? "" : "s", s, s > 0 ? (double)r.width * (double)r.height / s / 1e6 : 0.0);
        int64_t valid = 0;
        for (int k = 0; k < r.classes; k++) valid += r.class_pixels[k];
        for (int k = 0; k < r.classes; k++)
            printf("  class %3d: %12lld px  %5.1f%%\n", k, (long long)r.class_pixels[k],
                   valid ? 100.0 * (double)r.class_pixels[k] / (double)valid : 0.0);
        printf("  nodata:    %12lld px\n", (long long)r.nodata_pixels);
        if (strcmp(pr_device, "cpu") != 0) printf("  device:    %s\n", pr_device);
        if (precision != TS_F32) printf("  precision: %s (mixed)\n", pr_precision);
        if (pr_tf32 && precision == TS_F32) printf("  math:      TF32\n");
        if (pr_benchmark) printf("  cuDNN:     benchmark (algorithms timed)\n");
        printf("wrote %s%s%s%s%s%s%s\n", argv[2], pr_probs ? ", " : "", pr_probs ? pr_probs : "",
               pr_conf ? ", " : "", pr_conf ? pr_conf : "", pr_quicklook ? ", " : "", pr_quicklook ? pr_quicklook : "");
    } else {
        if (pg.last_pct >= 0 && pg.tty) fputc('\n', stderr);
        fprintf(stderr, "terraseg predict: %s\n", ts_last_error());
    }
    if (have_model) ts_unet_free(&m);
    ts_ctx_free(&ctx);
    free(bands);
    return st ? 1 : 0;
}
