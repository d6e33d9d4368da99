/* terraseg demo [--out DIR]: the whole pipeline on a built-in synthetic
 * scene, with no data and no network: generate (io/demo_scene.h) -> grid
 * windows and a spatial block split -> train (train/trainer.h, from a YAML
 * config written to DIR so it can be read and rerun) -> predict the full
 * scene -> polygonize -> evaluate on the held-out (test) blocks only. */
#include "tools/cmd_demo.h"

#include <errno.h>
#include <gdal.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "io/demo_scene.h"
#include "io/evaluate.h"
#include "io/gdal_out.h"
#include "io/io.h"
#include "io/polygonize.h"
#include "io/predict.h"
#include "io/windows.h"
#include "kernels/outfile.h"
#include "kernels/threads.h"
#include "train/config.h"
#include "train/trainer.h"
#include "weights/smp.h"

static const char *dm_out = "terraseg-demo";
static int dm_size = 2048, dm_seed = 1, dm_epochs = 5, dm_tile = 128, dm_batch = 8, dm_block = 512;
static int dm_overwrite = 0, dm_threads = 0;
static const char *dm_device = "cpu";

cli_option demo_options[] = {
    {"out", 'o', CLI_STRING, &dm_out, "DIR", "output folder (created; its demo files are replaced with --overwrite)",
     0, 0},
    {"size", 0, CLI_INT, &dm_size, "PX", "side of the synthetic scene (1 m pixels)", 256, 8192},
    {"seed", 0, CLI_INT, &dm_seed, "N", "seed of the scene", 0, 2147483647.0},
    {"epochs", 0, CLI_INT, &dm_epochs, "N", "training epochs", 1, 1000},
    {"tile", 0, CLI_INT, &dm_tile, "PX", "training and prediction tile size", 64, 1024},
    {"batch", 0, CLI_INT, &dm_batch, "N", "training batch size", 1, 256},
    {"block", 0, CLI_INT, &dm_block, "PX", "side of the spatial blocks of the train/val/test split", 64, 8192},
    {"overwrite", 0, CLI_FLAG, &dm_overwrite, NULL, "replace the outputs of an earlier demo in DIR", 0, 0},
    {"threads", 0, CLI_INT, &dm_threads, "N", "threads (default: TERRASEG_THREADS or every core)", 0, 4096},
    {"device", 0, CLI_STRING, &dm_device, "DEV", "where to train and predict: cpu, cuda or cuda:N", 0, 0},
    {0},
};

static char *path_in(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void warn(void *ctx, const char *msg)
{
    fprintf(stderr, "terraseg demo: warning (%s): %s\n", (const char *)ctx, msg);
}

/* The truth for the held-out evaluation: the scene's classes inside test
 * windows, 255 (ignore) elsewhere, on the scene's grid. */
static ts_status write_test_truth(const char *path, const char *scene, const uint8_t *classes, int W, int H,
                                  const ts_window_list *wl, int overwrite, int64_t *test_px)
{
    uint8_t *v = malloc((size_t)W * H);
    if (!v) return ts_error(TS_ERR_NOMEM, "demo: out of memory");
    memset(v, 255, (size_t)W * H);
    for (size_t i = 0; i < wl->count; i++) {
        if (wl->split[i] != TS_SPLIT_TEST) continue;
        const ts_window *w = &wl->w[i];
        for (int y = 0; y < w->height; y++)
            memcpy(v + (size_t)(w->row_off + y) * W + w->col_off, classes + (size_t)(w->row_off + y) * W + w->col_off,
                   (size_t)w->width);
    }
    *test_px = 0;
    for (size_t i = 0; i < (size_t)W * H; i++) *test_px += v[i] != 255;
    ts_gdal_out o;
    ts_status st = ts_gdal_out_begin(&o, path, overwrite, "held-out truth");
    GDALDatasetH src = st ? NULL : GDALOpen(scene, GA_ReadOnly), ds = NULL;
    if (!st && !src) st = ts_gdal_error(TS_ERR_IO, "demo: cannot reopen '%s'", scene);
    double gt[6];
    if (!st) {
        char *co[] = {"COMPRESS=DEFLATE", "TILED=YES", NULL};
        ds = GDALCreate(GDALGetDriverByName("GTiff"), o.tmp, W, H, 1, GDT_Byte, co);
        if (!ds) st = ts_gdal_error(TS_ERR_IO, "demo: cannot create '%s'", path);
    }
    if (!st && (GDALGetGeoTransform(src, gt) != CE_None || GDALSetGeoTransform(ds, gt) != CE_None ||
                GDALSetProjection(ds, GDALGetProjectionRef(src)) != CE_None ||
                GDALSetRasterNoDataValue(GDALGetRasterBand(ds, 1), 255) != CE_None ||
                GDALRasterIO(GDALGetRasterBand(ds, 1), GF_Write, 0, 0, W, H, v, W, H, GDT_Byte, 0, 0) != CE_None))
        st = ts_gdal_error(TS_ERR_IO, "demo: writing '%s'", path);
    if (ds) GDALClose(ds);
    if (src) GDALClose(src);
    free(v);
    if (!st) st = ts_gdal_out_commit(&o);
    else if (o.tmp) ts_gdal_out_abort(&o);
    return st;
}

/* warmup: optimizer steps of linear warmup (the trainer wants it shorter than the run). */
static ts_status write_config(const char *path, const char *dir, int overwrite, long warmup)
{
    struct stat sb;
    if (!overwrite && stat(path, &sb) == 0)
        return ts_error(TS_ERR_INVALID_ARG, "demo: '%s' already exists; use --overwrite to replace it", path);
    char buf[4096];
    int n = snprintf(buf, sizeof buf,
                     "# Written by terraseg demo; rerun with: terraseg train %s/demo.yaml --set output=%s/run2\n"
                     "output: %s/run\n"
                     "classes: [background, building, road, water, vegetation, bare_soil]\n"
                     "data:\n  images: %s/scene.tif\n  bands: [1, 2, 3, 4]\n  indices: [ndvi, ndwi]\n"
                     "  normalize:\n    kind: scale\n    scale: [0.0001, 0.0001, 0.0001, 0.0001, 1, 1]\n"
                     "labels:\n  path: %s/labels.gpkg\n  attribute: class\n"
                     "windows:\n  tile: %d\n  csv: [%s/windows.csv]\n"
                     "split:\n  method: csv\n"
                     "train:\n  epochs: %d\n  batch_size: %d\n"
                     "optimizer:\n  lr: 0.001\n"
                     "schedule:\n  interval: step\n  warmup_steps: %ld\n",
                     dir, dir, dir, dir, dir, dm_tile, dir, dm_epochs, dm_batch, warmup);
    if (n < 0 || (size_t)n >= sizeof buf) return ts_error(TS_ERR_INVALID_ARG, "demo: folder name too long");
    return ts_write_file_atomic(path, buf, (size_t)n);
}

int run_demo(int argc, char **argv)
{
    (void)argv;
    if (argc != 0) {
        fprintf(stderr, "terraseg demo: takes no arguments (see terraseg demo --help)\n");
        return 2;
    }
    /* The device first: a wrong name or a missing GPU costs no scene. */
    const ts_backend *backend = NULL;
    int dev_cuda = 0, dev_index = 0;
    if (ts_device_parse(dm_device, &dev_cuda, &dev_index) != TS_OK) {
        fprintf(stderr, "terraseg demo: --device %s: %s\n", dm_device, ts_last_error());
        return 2;
    }
    if (ts_backend_get(dm_device, &backend) != TS_OK) {
        fprintf(stderr, "terraseg demo: --device %s: %s\n", dm_device, ts_last_error());
        return 1;
    }
    ts_threads_init(dm_threads);
    ts_gdal_init();
    const double t0 = now();
    if (mkdir(dm_out, 0777) != 0 && errno != EEXIST) {
        fprintf(stderr, "terraseg demo: cannot create the folder '%s': %s\n", dm_out, strerror(errno));
        return 1;
    }
    char *scene = path_in(dm_out, "scene.tif"), *labels = path_in(dm_out, "labels.gpkg"),
         *wcsv = path_in(dm_out, "windows.csv"), *cfg_path = path_in(dm_out, "demo.yaml"),
         *classes = path_in(dm_out, "classes.tif"), *conf = path_in(dm_out, "confidence.tif"),
         *look = path_in(dm_out, "quicklook.png"), *polys = path_in(dm_out, "polygons.gpkg"),
         *truth = path_in(dm_out, "truth_test.tif"), *mjson = path_in(dm_out, "metrics_test.json"),
         *cm = path_in(dm_out, "confusion_test.png"), *model = NULL;
    ts_status st = (scene && labels && wcsv && cfg_path && classes && conf && look && polys && truth && mjson && cm)
                       ? TS_OK
                       : ts_error(TS_ERR_NOMEM, "demo: out of memory");
    /* 1. The scene. */
    demo_scene_params sp;
    demo_scene_defaults(&sp);
    sp.width = sp.height = dm_size;
    sp.seed = (uint64_t)dm_seed;
    demo_scene_report rep = {.keep_classes = 1};
    if (!st) {
        printf("[1/6] generating a %dx%d synthetic scene (seed %d): %s, %s\n", dm_size, dm_size, dm_seed, scene,
               labels);
        fflush(stdout);
        st = demo_scene_write(&sp, scene, labels, dm_overwrite, &rep);
    }
    /* 2. Windows and a spatial split. */
    ts_window_list wl;
    ts_window_list_init(&wl);
    ts_split_report sr;
    /* Windows overlap by half a tile: four times the training windows of a
     * plain grid from the same scene (with the D4 augmentation, plenty for a
     * few minutes of training), and test windows that cover more of each
     * test block once the buffer has taken its half-window margin. */
    const int stride = dm_tile / 2;
    if (!st) st = ts_windows_grid(&wl, dm_size, dm_size, dm_tile, dm_tile, stride, stride, 0);
    if (!st) {
        ts_split_params p = {.block = dm_block, .ratios = {0.65, 0.1, 0.25}, .seed = (uint64_t)dm_seed, .buffer = 1};
        st = ts_split_assign(&wl, dm_size, dm_size, &p, &sr);
    }
    struct stat sb;
    if (!st && !dm_overwrite && stat(wcsv, &sb) == 0)
        st = ts_error(TS_ERR_INVALID_ARG, "demo: '%s' already exists; use --overwrite to replace it", wcsv);
    if (!st) st = ts_windows_write_csv(&wl, wcsv);
    if (!st) {
        printf("[2/6] %zu windows of %d px in %d px blocks: %zu train, %zu val, %zu test (%zu buffer): %s\n",
               wl.count, dm_tile, dm_block, sr.windows[TS_SPLIT_TRAIN], sr.windows[TS_SPLIT_VAL],
               sr.windows[TS_SPLIT_TEST], sr.windows[TS_SPLIT_BUFFER], wcsv);
        fflush(stdout);
        /* A short warmup steadies AdamW's first steps from scratch: 20 steps,
         * or a fifth of a short run (drop_last: whole batches only). */
        const long steps = (long)dm_epochs * (long)(sr.windows[TS_SPLIT_TRAIN] / (size_t)dm_batch);
        st = write_config(cfg_path, dm_out, dm_overwrite, steps / 5 < 20 ? steps / 5 : 20);
    }
    /* 3. Training. */
    ts_train_result tr;
    memset(&tr, 0, sizeof tr);
    if (!st) {
        printf("[3/6] training (%s)\n", cfg_path);
        fflush(stdout);
        ts_train_config c;
        const char *sets[3];
        char set_out[600], set_dev[32], set_idx[32];
        int nsets = 0;
        if (dev_cuda) {
            snprintf(set_dev, sizeof set_dev, "device=cuda");
            snprintf(set_idx, sizeof set_idx, "cuda_device=%d", dev_index);
            sets[nsets++] = set_dev;
            sets[nsets++] = set_idx;
        }
        if (dm_overwrite) {
            /* A fresh run folder each time: the trainer refuses to overwrite a run. */
            snprintf(set_out, sizeof set_out, "output=%s/run-%ld", dm_out, (long)time(NULL));
            sets[nsets++] = set_out;
        }
        st = ts_train_config_resolve(cfg_path, sets, nsets, &c);
        if (!st) {
            ts_train_run_opts o;
            ts_train_run_opts_init(&o);
            o.install_signals = 1;
            st = ts_train_run(&c, &o, &tr);
            if (!st && !(model = path_in(c.output, "best.safetensors")))
                st = ts_error(TS_ERR_NOMEM, "demo: out of memory");
            if (!st && stat(model, &sb) != 0) {
                free(model);
                model = path_in(c.output, "model.safetensors");
            }
            ts_train_config_free(&c);
        }
        if (!st && tr.interrupted) st = ts_error(TS_ERR_IO, "demo: training interrupted");
    }
    /* 4. Prediction of the whole scene, with the demo's class colours. */
    ts_unet m;
    memset(&m, 0, sizeof m);
    int have_model = 0;
    if (!st) st = ts_model_load(model, &m, NULL);
    have_model = !st && model;
    if (!st) {
        ts_model_card card;
        st = ts_unet_get_card(&m, &card);
        for (int i = 0; !st && i < card.n_classes; i++)
            for (int k = 0; k < DEMO_NCLASSES; k++)
                if (card.classes[i].id == demo_classes[k].id) {
                    unsigned r, g, b;
                    if (sscanf(demo_classes[k].color, "#%2x%2x%2x", &r, &g, &b) == 3) {
                        card.classes[i].has_color = 1;
                        card.classes[i].rgb[0] = (unsigned char)r;
                        card.classes[i].rgb[1] = (unsigned char)g;
                        card.classes[i].rgb[2] = (unsigned char)b;
                    }
                }
        if (!st) st = ts_unet_set_card(&m, &card);
        ts_card_free(&card);
    }
    ts_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    if (!st) st = ts_ctx_init(&ctx, backend);
    ts_predict_report pr;
    if (!st) {
        printf("[4/6] predicting the whole scene with %s\n", model);
        fflush(stdout);
        ts_predict_opts po = {.scene = scene, .out = classes, .overwrite = dm_overwrite, .tile = dm_tile * 2,
                              .overlap = dm_tile / 2, .confidence = conf, .quicklook = look, .warn = warn,
                              .cb_ctx = "predict"};
        st = ts_predict_run(&m, &ctx, &po, &pr);
    }
    /* 5. Polygons. */
    ts_polygonize_report pgr;
    if (!st) {
        printf("[5/6] polygonizing: %s\n", polys);
        fflush(stdout);
        ts_polygonize_params pp;
        ts_polygonize_params_init(&pp);
        pp.input = classes;
        pp.output = polys;
        pp.overwrite = dm_overwrite;
        pp.mmu_px = 8;
        pp.confidence = conf;
        pp.warn = warn;
        pp.warn_ctx = "polygonize";
        st = ts_polygonize(&pp, &pgr);
    }
    /* 6. Held-out evaluation. */
    int64_t test_px = 0;
    ts_eval_params ep;
    ts_eval_params_init(&ep);
    ts_eval_result er;
    memset(&er, 0, sizeof er);
    if (!st) st = write_test_truth(truth, scene, rep.classes, dm_size, dm_size, &wl, dm_overwrite, &test_px);
    if (!st) {
        printf("[6/6] evaluating on the %lld held-out (test) pixels\n\n", (long long)test_px);
        fflush(stdout);
        ep.pred = classes;
        ep.truth = truth;
        ep.classes = DEMO_NCLASSES;
        st = ts_eval_run(&ep, &er);
    }
    if (!st) {
        ts_eval_format(stdout, &er);
        st = ts_eval_write_json(mjson, &er, &ep, dm_overwrite);
    }
    if (!st) st = ts_eval_write_confusion_png(cm, &er, 0, dm_overwrite, NULL, NULL);
    if (!st) {
        printf("\nheld-out mIoU %.4f (classes present: %d); training %.0f s, %d epochs; demo %.0f s in all\n",
               er.metrics.miou, er.metrics.present, tr.seconds, tr.epochs_done, now() - t0);
        printf("outputs in %s/:\n  class map      %s\n  confidence     %s\n  quick-look     %s\n  polygons       %s\n"
               "  metrics        %s\n  confusion      %s\n  model          %s\n  training config %s (curves.svg, "
               "metrics.csv beside the model)\n",
               dm_out, classes, conf, look, polys, mjson, cm, model, cfg_path);
    } else {
        fprintf(stderr, "terraseg demo: %s\n", ts_last_error());
    }
    ts_eval_result_free(&er);
    ts_ctx_free(&ctx);
    if (have_model) ts_unet_free(&m);
    ts_window_list_free(&wl);
    free(rep.classes);
    free(scene), free(labels), free(wcsv), free(cfg_path), free(classes), free(conf), free(look), free(polys),
        free(truth), free(mjson), free(cm), free(model);
    return st ? 1 : 0;
}
