/* The trainer end to end (train/trainer.h) on a synthetic GeoTIFF written in
 * a mkdtemp folder: 3 bands, 160 x 160, bright squares (class 1) on a dark
 * noisy background (class 0), labels as a Byte GeoTIFF on the same grid.
 *   (a) a tiny U-Net (depth 3, decoder [16, 8, 4], tile 32) learns it: val
 *       mIoU far above chance;
 *   (b) resume is bit-exact: an uninterrupted run vs one stopped by the test
 *       hook (and one by a real raise(SIGINT) with 2 loader workers) and
 *       resumed give identical weights, BN statistics and counters;
 *   (c) the outputs exist and load: model.safetensors and smp/ hold the same
 *       weights, the card lists the classes and bands;
 *   (d) clear errors: a label id outside the classes, an empty training
 *       split, a model whose in_channels disagree with the data;
 *   (e) early stopping: a model that predicts background everywhere (head
 *       bias +-1000, tiny lr) has a constant val mIoU, so patience 1 stops
 *       the run after epoch 2 of 4 with best.safetensors from epoch 1;
 *   (e)-(g) train on few.csv (5 train, 2 val windows) to stay cheap;
 *   (f) a NaN written into a weight by the model hook after step 3 makes
 *       step 4's loss non-finite: the error names epoch, batch and step, and
 *       last.safetensors (checkpoint_steps 2) is bit-for-bit the state the
 *       hook saw at step 2, finite;
 *   (g) init imagenet from a torchvision-style resnet34 .pth (ts_pth_write):
 *       before the first step the encoder equals the file (3 bands) or the
 *       SMP first-conv rule of it (4 bands), decoder and head equal the
 *       scratch init of the seed;
 *   (h) the device path: the same run as (b)'s uninterrupted one on the
 *       fake-device backend (tests/fake_device.h: the CPU ops on separate,
 *       checked memory, so weights, gradients, BN statistics, AdamW state,
 *       activations, labels and dlogits all live in "device" memory) gives a
 *       bit-identical model, and so does a stop + resume on it; no op gets a
 *       host pointer and nothing is left allocated.
 * Built again as the GPU test test_cuda_trainer (TEST_TRAIN_CUDA), it runs
 * only (j), test_cuda_resume below: the trainer on the CUDA backend.
 * TEST_TRAIN_KEEP=1 keeps the folder. */
#include <ftw.h>
#include <cpl_conv.h>
#include <gdal.h>
#include <math.h>
#include <ogr_srs_api.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fake_device.h"
#include "smp_fill.h"
#include "testutil.h"
#include "train/config.h"
#include "train/trainer.h"
#include "weights/card.h"
#include "weights/pth.h"
#include "weights/safetensors.h"
#include "weights/smp.h"

#define IW 160
#define IH 160
static const double IGT[6] = {500000, 1, 0, 4000000, 0, -1};
static char tmpdir[512];

static const char *tpath(const char *name)
{
    static char buf[8][1024];
    static int k = 0;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmpdir, name);
    return buf[k];
}

static uint64_t rng_state = 12345;
static double urand(void)
{
    rng_state += 0x9E3779B97F4A7C15ull;
    uint64_t z = rng_state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}

static int write_tif(const char *path, int bands, const uint8_t *data)
{
    GDALDatasetH mem = GDALCreate(GDALGetDriverByName("MEM"), "", IW, IH, bands, GDT_Byte, NULL);
    if (!mem) return 0;
    int ok = 1;
    for (int b = 0; b < bands && ok; b++)
        ok = GDALRasterIO(GDALGetRasterBand(mem, b + 1), GF_Write, 0, 0, IW, IH, (void *)(data + (size_t)b * IW * IH),
                          IW, IH, GDT_Byte, 0, 0) == CE_None;
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    char *wkt = NULL;
    ok = ok && OSRImportFromEPSG(s, 32633) == OGRERR_NONE && OSRExportToWkt(s, &wkt) == OGRERR_NONE;
    ok = ok && GDALSetGeoTransform(mem, (double *)IGT) == CE_None && GDALSetProjection(mem, wkt) == CE_None;
    CPLFree(wkt);
    OSRDestroySpatialReference(s);
    GDALDatasetH out = ok ? GDALCreateCopy(GDALGetDriverByName("GTiff"), path, mem, FALSE, NULL, NULL, NULL) : NULL;
    ok = ok && out;
    if (out) GDALClose(out);
    GDALClose(mem);
    return ok;
}

static int make_data(void)
{
    uint8_t *img = malloc(3 * IW * IH), *lab = calloc(IW * IH, 1);
    for (int i = 0; i < 60; i++) {
        int sz = 6 + (int)(urand() * 12), x0 = (int)(urand() * (IW - sz)), y0 = (int)(urand() * (IH - sz));
        for (int y = y0; y < y0 + sz; y++)
            for (int x = x0; x < x0 + sz; x++) lab[y * IW + x] = 1;
    }
    for (int b = 0; b < 3; b++)
        for (int i = 0; i < IW * IH; i++) {
            double v = (lab[i] ? 170 + 10 * b : 60 + 5 * b) + (urand() - 0.5) * 60;
            img[(size_t)b * IW * IH + i] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
    int ok = write_tif(tpath("img.tif"), 3, img) && write_tif(tpath("lab.tif"), 1, lab);
    lab[IW * 100 + 100] = 5; /* an id outside the 2 classes */
    ok = ok && write_tif(tpath("lab_bad.tif"), 1, lab);
    free(img);
    free(lab);
    FILE *f = fopen(tpath("allval.csv"), "w");
    if (!f) return 0;
    fprintf(f, "col_off,row_off,split\n0,0,val\n32,0,val\n64,64,val\n");
    fclose(f);
    /* few windows for the cheap runs of (e) to (g): 5 train, 2 val */
    f = fopen(tpath("few.csv"), "w");
    if (!f) return 0;
    fprintf(f, "col_off,row_off,split\n0,0,train\n32,0,train\n64,0,train\n96,0,train\n128,0,train\n"
               "0,64,val\n64,64,val\n");
    fclose(f);
    return ok;
}

/* A config file for output dir `out` with extra YAML lines. */
static int resolve(ts_train_config *c, const char *out, int epochs, int workers, const char *extra)
{
    const char *p = tpath("cfg.yaml");
    FILE *f = fopen(p, "w");
    if (!f) return 0;
    fprintf(f,
            "output: %s\nseed: 7\nthreads: 2\nclasses: [background, square]\n"
            "data:\n  images: %s\n"
            "labels:\n  path: %s\n"
            "windows:\n  tile: 32\n"
            "split:\n  block: 32\n  ratios: [0.75, 0.25]\n  buffer: 0\n"
            "model:\n  encoder_depth: 3\n  decoder_channels: [16, 8, 4]\n"
            "optimizer:\n  lr: 0.003\n"
            "train:\n  epochs: %d\n  batch_size: 4\n"
            "augment:\n  d4: true\n  brightness: 0.05\n"
            "loader:\n  workers: %d\n%s",
            tpath(out), tpath("img.tif"), tpath("lab.tif"), epochs, workers, extra ? extra : "");
    fclose(f);
    ts_status st = ts_train_config_resolve(p, NULL, 0, c);
    if (st) printf("config: %s\n", ts_last_error());
    return st == TS_OK;
}

static ts_train_run_opts quiet_opts(void)
{
    ts_train_run_opts o;
    ts_train_run_opts_init(&o);
    o.progress = getenv("TEST_TRAIN_VERBOSE") ? 0 : 2;
    return o;
}

static int file_exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

/* Weights, buffers and counters of two model files are bit-identical. */
static int same_model(const char *a, const char *b, const char *what)
{
    ts_unet ma, mb;
    memset(&ma, 0, sizeof ma);
    memset(&mb, 0, sizeof mb);
    int ok = tu_expect_ok(ts_model_load(a, &ma, NULL), a) && tu_expect_ok(ts_model_load(b, &mb, NULL), b);
    if (ok) {
        ok = tu_expect(ma.n_weights == mb.n_weights && ma.n_buffers == mb.n_buffers && ma.n_counters == mb.n_counters,
                       "%s: same sizes", what);
        if (ok) {
            size_t diff = 0;
            for (size_t i = 0; i < ma.n_weights; i++) diff += memcmp(&ma.weights[i], &mb.weights[i], 4) != 0;
            size_t bdiff = 0;
            for (size_t i = 0; i < ma.n_buffers; i++) bdiff += memcmp(&ma.buffers[i], &mb.buffers[i], 4) != 0;
            int cdiff = memcmp(ma.counters, mb.counters, ma.n_counters * sizeof(int64_t)) != 0;
            printf("%s: %zu of %zu weights, %zu of %zu buffers differ, counters %s\n", what, diff, ma.n_weights, bdiff,
                   ma.n_buffers, cdiff ? "differ" : "equal");
            ok = tu_expect(diff == 0 && bdiff == 0 && !cdiff, "%s: bit-identical", what);
        }
    }
    ts_unet_free(&ma);
    ts_unet_free(&mb);
    return ok;
}

/* (a) + (c) */
static void test_learns(void)
{
    ts_train_config c;
    if (!tu_expect(resolve(&c, "run_a", 8, 2, "train.keep_every: 4\n"), "config a")) return;
    ts_train_run_opts o = quiet_opts();
    ts_train_result r;
    ts_status st = ts_train_run(&c, &o, &r);
    tu_expect_ok(st, "train run a");
    printf("run a: %zu train / %zu val windows, %d epochs, %lld steps, train loss %.4f, val loss %.4f, val mIoU %.4f, "
           "OA %.4f, best %.4f at epoch %d, %.1f s\n",
           r.train_windows, r.val_windows, r.epochs_done, (long long)r.global_step, r.train_loss, r.val_loss, r.miou,
           r.oa, r.best_miou, r.best_epoch, r.seconds);
    tu_expect(r.interrupted == 0 && r.epochs_done == 8, "run a completes");
    tu_expect(r.best_miou > 0.75, "val mIoU %.4f far above chance (> 0.75)", r.best_miou);
    const char *files[] = {"run_a/model.safetensors", "run_a/best.safetensors", "run_a/last.safetensors",
                           "run_a/epoch-4.safetensors", "run_a/epoch-8.safetensors", "run_a/metrics.csv",
                           "run_a/metrics.json", "run_a/curves.svg", "run_a/smp/config.json"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++)
        tu_expect(file_exists(tpath(files[i])), "output %s exists", files[i]);
    same_model(tpath("run_a/model.safetensors"), tpath("run_a/smp"), "model.safetensors vs smp/");
    ts_unet m;
    memset(&m, 0, sizeof m);
    if (tu_expect_ok(ts_model_load(tpath("run_a/model.safetensors"), &m, NULL), "load model.safetensors")) {
        ts_model_card card;
        if (tu_expect_ok(ts_unet_get_card(&m, &card), "card")) {
            tu_expect(card.n_classes == 2 && card.n_bands == 3 && card.tile_size == 32, "card: %d classes, %d bands",
                      card.n_classes, card.n_bands);
            if (card.n_classes == 2)
                tu_expect(!strcmp(card.classes[1].name, "square"), "card class 1 is square");
            if (card.n_bands == 3)
                tu_expect(card.bands[0].index == 1 && card.bands[0].scale > 1, "card band 1 with its meanstd (%g, %g)",
                          card.bands[0].offset, card.bands[0].scale);
            ts_card_free(&card);
        }
        tu_expect(m.cfg.encoder_depth == 3 && m.cfg.in_channels == 3 && m.cfg.classes == 2, "model config");
    }
    ts_unet_free(&m);
    memset(&m, 0, sizeof m);
    tu_expect_ok(ts_model_load(tpath("run_a/best.safetensors"), &m, NULL), "load best.safetensors");
    ts_unet_free(&m);
    FILE *f = fopen(tpath("run_a/metrics.csv"), "r");
    int lines = 0;
    char line[1024];
    while (f && fgets(line, sizeof line, f)) lines++;
    if (f) fclose(f);
    tu_expect(lines == 9, "metrics.csv: header + 8 epochs (%d lines)", lines);
    ts_train_config_free(&c);
}

static void raise_at_step(void *user, int epoch, int64_t step)
{
    (void)epoch;
    if (step == *(int64_t *)user) raise(SIGINT);
}

/* (b) */
static void test_resume(void)
{
    const char *extra = "train.accumulate: 2\ntrain.checkpoint_steps: 2\nschedule.kind: cosine\nschedule.interval: step\n";
    ts_train_config c;
    ts_train_result r;
    ts_train_run_opts o = quiet_opts();
    /* uninterrupted */
    if (!tu_expect(resolve(&c, "run_full", 3, 0, extra), "config full")) return;
    tu_expect_ok(ts_train_run(&c, &o, &r), "full run");
    int64_t total = r.global_step;
    printf("full run: %lld steps, %.1f s\n", (long long)total, r.seconds);
    ts_train_config_free(&c);

    /* stopped by the hook at step 3 (mid-epoch), resumed */
    if (!tu_expect(resolve(&c, "run_stop", 3, 0, extra), "config stop")) return;
    o.stop_after_steps = 3;
    tu_expect_ok(ts_train_run(&c, &o, &r), "stopped run");
    tu_expect(r.interrupted == SIGINT && r.global_step == 3, "stopped at step 3 (interrupted %d, step %lld)",
              r.interrupted, (long long)r.global_step);
    tu_expect(!file_exists(tpath("run_stop/model.safetensors")), "no final model after a stop");
    o.stop_after_steps = 0;
    o.resume = tpath("run_stop/last.safetensors");
    tu_expect_ok(ts_train_run(&c, &o, &r), "resumed run");
    tu_expect(r.interrupted == 0 && r.global_step == total, "resumed run ends at step %lld", (long long)r.global_step);
    same_model(tpath("run_full/model.safetensors"), tpath("run_stop/model.safetensors"), "hook stop + resume");
    ts_train_config_free(&c);

    /* a real SIGINT from the step hook, 2 loader workers, resumed with 2 workers */
    if (!tu_expect(resolve(&c, "run_sig", 3, 2, extra), "config sig")) return;
    int64_t at = 5;
    o.resume = NULL;
    o.install_signals = 1;
    o.on_step = raise_at_step;
    o.on_step_user = &at;
    tu_expect_ok(ts_train_run(&c, &o, &r), "signalled run");
    tu_expect(r.interrupted == SIGINT && r.global_step == 5, "SIGINT stop at step 5 (interrupted %d, step %lld)",
              r.interrupted, (long long)r.global_step);
    o.on_step = NULL;
    o.resume = tpath("run_sig/last.safetensors");
    tu_expect_ok(ts_train_run(&c, &o, &r), "resumed after SIGINT");
    same_model(tpath("run_full/model.safetensors"), tpath("run_sig/model.safetensors"), "SIGINT + resume, 2 workers");
    ts_train_config_free(&c);
}

/* (d) */
static void test_errors(void)
{
    ts_train_config c;
    ts_train_run_opts o = quiet_opts();
    char extra[2048];
    snprintf(extra, sizeof extra, "labels:\n  path: %s\n", tpath("lab_bad.tif"));
    /* the labels section is given twice: use --set instead */
    if (resolve(&c, "run_err", 1, 0, NULL)) {
        snprintf(extra, sizeof extra, "labels.path=%s", tpath("lab_bad.tif"));
        tu_expect_ok(ts_train_config_set(&c, extra), "set labels.path");
        ts_status st = ts_train_run(&c, &o, NULL);
        printf("bad label id: %s\n", ts_last_error());
        tu_expect(st != TS_OK && strstr(ts_last_error(), "5"), "a label id outside the classes is an error");
        ts_train_config_free(&c);
    }
    if (resolve(&c, "run_err", 1, 0, NULL)) {
        snprintf(extra, sizeof extra, "windows.csv=%s", tpath("allval.csv"));
        tu_expect_ok(ts_train_config_set(&c, extra), "set windows.csv");
        tu_expect_ok(ts_train_config_set(&c, "split.method=csv"), "set split.method");
        ts_status st = ts_train_run(&c, &o, NULL);
        printf("empty split: %s\n", ts_last_error());
        tu_expect_error(st, TS_ERR_INVALID_ARG, "empty training split", "training split is empty", NULL);
        ts_train_config_free(&c);
    }
    /* a 4-band model for 3-band data */
    ts_unet m;
    memset(&m, 0, sizeof m);
    ts_unet_config uc = ts_unet_default_config(4, 2);
    uc.encoder_depth = 3;
    uc.decoder_channels[0] = 16, uc.decoder_channels[1] = 8, uc.decoder_channels[2] = 4;
    if (tu_expect_ok(ts_unet_init(&m, &uc), "4-band model") && tu_expect_ok(ts_unet_init_random(&m, 1), "init") &&
        tu_expect_ok(ts_model_save(tpath("four.safetensors"), &m, TS_FORMAT_SAFETENSORS), "save 4-band model") &&
        resolve(&c, "run_err", 1, 0, NULL)) {
        snprintf(extra, sizeof extra, "model.weights=%s", tpath("four.safetensors"));
        tu_expect_ok(ts_train_config_set(&c, "model.init=model"), "set model.init");
        tu_expect_ok(ts_train_config_set(&c, extra), "set model.weights");
        ts_status st = ts_train_run(&c, &o, NULL);
        printf("in_channels: %s\n", ts_last_error());
        tu_expect_error(st, TS_ERR_INVALID_ARG, "in_channels mismatch", "4 input channels", "gives 3", NULL);
        ts_train_config_free(&c);
    }
    ts_unet_free(&m);
}

static int count_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    int lines = 0;
    char line[1024];
    while (f && fgets(line, sizeof line, f)) lines++;
    if (f) fclose(f);
    return lines;
}

/* Applies --set overrides in order; 0 at the first that fails. */
static int set_all(ts_train_config *c, const char *const *kv, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!tu_expect_ok(ts_train_config_set(c, kv[i]), kv[i])) return 0;
    return 1;
}

/* resolve() on the windows of few.csv with the given batch size. */
static int resolve_few(ts_train_config *c, const char *out, int epochs, int batch, const char *extra)
{
    if (!resolve(c, out, epochs, 0, extra)) return 0;
    char csv[1100], bs[64];
    snprintf(csv, sizeof csv, "windows.csv=%s", tpath("few.csv"));
    snprintf(bs, sizeof bs, "train.batch_size=%d", batch);
    const char *sets[] = {csv, "split.method=csv", bs};
    if (set_all(c, sets, sizeof sets / sizeof *sets)) return 1;
    ts_train_config_free(c);
    return 0;
}

/* The tiny U-Net of resolve() for `bands` input channels, scratch init. */
static int tiny_unet(ts_unet *m, int bands, uint64_t seed)
{
    memset(m, 0, sizeof *m);
    ts_unet_config uc = ts_unet_default_config(bands, 2);
    uc.encoder_depth = 3;
    uc.decoder_channels[0] = 16, uc.decoder_channels[1] = 8, uc.decoder_channels[2] = 4;
    return tu_expect_ok(ts_unet_init(m, &uc), "tiny U-Net") && tu_expect_ok(ts_unet_init_random(m, seed), "init");
}

/* (e) */
static void test_early_stop(void)
{
    /* background everywhere: logits +-1000 from the head bias dwarf anything
     * lr 1e-6 can change in a few steps, so every validation gives the same
     * confusion matrix and the same mIoU (never strictly better) */
    ts_unet m;
    int ok = tiny_unet(&m, 3, 1);
    if (ok) {
        float *hb = ts_unet_param_f32(&m, ts_unet_find(&m, "segmentation_head.0.bias"));
        hb[0] = 1000, hb[1] = -1000;
        ok = tu_expect_ok(ts_model_save(tpath("background.safetensors"), &m, TS_FORMAT_SAFETENSORS), "save model");
    }
    ts_unet_free(&m);
    ts_train_config c;
    if (!ok || !tu_expect(resolve_few(&c, "run_es", 4, 4, "train.patience: 1\n"), "config es")) return;
    char w[1100];
    snprintf(w, sizeof w, "model.weights=%s", tpath("background.safetensors"));
    const char *sets[] = {"model.init=model", w, "optimizer.lr=1e-6", "optimizer.weight_decay=0"};
    if (set_all(&c, sets, sizeof sets / sizeof *sets)) {
        ts_train_run_opts o = quiet_opts();
        ts_train_result r;
        tu_expect_ok(ts_train_run(&c, &o, &r), "early-stopping run");
        printf("early stop: %d epochs, %lld steps, val mIoU %.4f, best %.4f at epoch %d, early_stopped %d, %.1f s\n",
               r.epochs_done, (long long)r.global_step, r.miou, r.best_miou, r.best_epoch, r.early_stopped, r.seconds);
        tu_expect(r.early_stopped == 1 && r.interrupted == 0 && r.epochs_done == 2,
                  "patience 1: stopped after epoch 2 of 4 (early_stopped %d, %d epochs)", r.early_stopped,
                  r.epochs_done);
        tu_expect(r.best_epoch == 1 && r.miou == r.best_miou, "best mIoU from epoch 1, later ones equal");
        int lines = count_lines(tpath("run_es/metrics.csv"));
        tu_expect(lines == 3, "metrics.csv: header + 2 epochs (%d lines)", lines);
        tu_expect(file_exists(tpath("run_es/model.safetensors")), "final model after early stopping");
        ts_unet b;
        memset(&b, 0, sizeof b);
        tu_expect_ok(ts_model_load(tpath("run_es/best.safetensors"), &b, NULL), "load best.safetensors");
        ts_unet_free(&b);
    }
    ts_train_config_free(&c);
}

/* The model of a checkpoint: ts_model_load reads a training checkpoint as a
 * model file, leaving its optimizer.* and scheduler.* entries out. */
static int load_checkpoint(const char *path, ts_unet *m)
{
    return tu_expect_ok(ts_model_load(path, m, NULL), path);
}

typedef struct nan_hook {
    int64_t snap_step, nan_step;
    float *w, *b;
    int64_t *cnt;
    size_t nw, nb, nc;
    int poisoned;
} nan_hook;

static void nan_hook_fn(void *user, struct ts_unet *m, int epoch, int64_t step)
{
    nan_hook *h = user;
    (void)epoch;
    if (step == h->snap_step && !h->w) {
        h->nw = m->n_weights, h->nb = m->n_buffers, h->nc = m->n_counters;
        h->w = malloc(h->nw * sizeof(float) + 1);
        h->b = malloc(h->nb * sizeof(float) + 1);
        h->cnt = malloc(h->nc * sizeof(int64_t) + 1);
        if (h->w) memcpy(h->w, m->weights, h->nw * sizeof(float));
        if (h->b) memcpy(h->b, m->buffers, h->nb * sizeof(float));
        if (h->cnt) memcpy(h->cnt, m->counters, h->nc * sizeof(int64_t));
    }
    if (step == h->nan_step) {
        ts_unet_param_f32(m, ts_unet_find(m, "segmentation_head.0.bias"))[0] = NAN;
        h->poisoned = 1;
    }
}

/* (f) */
static void test_nan(void)
{
    ts_train_config c;
    if (!tu_expect(resolve_few(&c, "run_nan", 1, 1, "train.checkpoint_steps: 2\n"), "config nan")) return;
    nan_hook h = {.snap_step = 2, .nan_step = 3};
    ts_train_run_opts o = quiet_opts();
    o.on_step_model = nan_hook_fn;
    o.on_step_user = &h;
    ts_train_result r;
    ts_status st = ts_train_run(&c, &o, &r);
    printf("NaN weight after step 3 (%.1f s): %s\n", r.seconds, ts_last_error());
    tu_expect(h.poisoned && r.global_step == 3, "poisoned after step 3, stopped at step %lld", (long long)r.global_step);
    tu_expect_error(st, TS_ERR_INVALID_ARG, "non-finite loss", "epoch 1, batch 4 of 5 ", "optimizer step 4",
                    "non-finite", "last.safetensors", NULL);
    tu_expect(!file_exists(tpath("run_nan/model.safetensors")), "no final model after a NaN loss");
    ts_unet m = {0};
    if (tu_expect(h.w && h.b && h.cnt, "snapshot at step 2") && load_checkpoint(tpath("run_nan/last.safetensors"), &m)) {
        int finite = 1;
        for (size_t i = 0; i < m.n_weights; i++) finite &= isfinite(m.weights[i]) != 0;
        for (size_t i = 0; i < m.n_buffers; i++) finite &= isfinite(m.buffers[i]) != 0;
        tu_expect(finite, "last.safetensors: finite weights and buffers");
        tu_expect(m.n_weights == h.nw && m.n_buffers == h.nb && m.n_counters == h.nc &&
                      !memcmp(m.weights, h.w, h.nw * sizeof(float)) && !memcmp(m.buffers, h.b, h.nb * sizeof(float)) &&
                      !memcmp(m.counters, h.cnt, h.nc * sizeof(int64_t)),
                  "last.safetensors is bit-for-bit the model at step 2");
    }
    ts_unet_free(&m);
    free(h.w);
    free(h.b);
    free(h.cnt);
    ts_train_config_free(&c);
}

/* tests/test_smp.c's fill_model / make_torchvision: a torchvision resnet34
 * state_dict (conv1, bn1, layer1..4 from a depth-5 encoder, fc) with the
 * deterministic values of tests/smp_fill.h. */
static int make_torchvision(ts_dict *d)
{
    ts_unet_config cfg = ts_unet_default_config(3, 2);
    ts_unet m;
    memset(&m, 0, sizeof m);
    ts_dict_init(d);
    if (!tu_expect_ok(ts_unet_init(&m, &cfg), "resnet34 model")) return 0;
    smp_fill_model(&m);
    int ok = 1;
    for (int k = 0; k < m.n_params && ok; k++) {
        const ts_param *p = &m.params[k];
        if (strncmp(p->name, "encoder.", 8) != 0) continue;
        int64_t shape[4];
        for (int i = 0; i < p->ndim; i++) shape[i] = p->shape[i];
        if (p->kind == TS_PARAM_COUNTER)
            ok = ts_dict_add(d, p->name + 8, TS_I64, 0, shape, &m.counters[p->offset]) == TS_OK;
        else
            ok = ts_dict_add(d, p->name + 8, TS_F32, p->ndim, shape, ts_unet_param_f32(&m, p)) == TS_OK;
    }
    int64_t fcw[2] = {1000, 512}, fcb = 1000;
    float *fc = calloc(512000, sizeof(float));
    ok = ok && fc;
    for (int i = 0; ok && i < 512000; i++) fc[i] = (float)((i % 7) - 3) * 0.125f;
    ok = ok && ts_dict_add(d, "fc.weight", TS_F32, 2, fcw, fc) == TS_OK;
    ok = ok && ts_dict_add(d, "fc.bias", TS_F32, 1, &fcb, fc) == TS_OK;
    free(fc);
    ts_unet_free(&m);
    return tu_expect(ok, "torchvision state_dict");
}

typedef struct inet_hook {
    const ts_dict *tv;
    const ts_unet *ref; /* scratch init of the same config and seed */
    int calls, n_enc, n_dec, enc_bad, dec_bad, conv1_ok, enc_differs;
} inet_hook;

static void inet_hook_fn(void *user, struct ts_unet *m, int epoch, int64_t step)
{
    inet_hook *h = user;
    (void)epoch;
    if (step != 0) return;
    h->calls++;
    const int N = m->cfg.in_channels;
    for (int k = 0; k < m->n_params; k++) {
        const ts_param *p = &m->params[k];
        const ts_param *q = ts_unet_find(h->ref, p->name);
        const float *v = p->kind == TS_PARAM_COUNTER ? NULL : ts_unet_param_f32(m, p);
        if (strncmp(p->name, "encoder.", 8) != 0) {
            h->n_dec++;
            h->dec_bad += !q || (p->kind == TS_PARAM_COUNTER
                                     ? m->counters[p->offset] != h->ref->counters[q->offset]
                                     : memcmp(v, ts_unet_param_f32(h->ref, q), p->numel * sizeof(float)) != 0);
            continue;
        }
        h->n_enc++;
        const ts_named_tensor *t = ts_dict_find(h->tv, p->name + 8);
        if (!t) {
            h->enc_bad++;
            continue;
        }
        if (p->kind == TS_PARAM_COUNTER) {
            h->enc_bad += m->counters[p->offset] != *(const int64_t *)t->data;
        } else if (!strcmp(p->name, "encoder.conv1.weight")) {
            /* SMP patch_first_conv, pretrained: channel c from RGB filter c % 3, x 3/N */
            const float *W = t->data, scale = (float)(3.0 / N);
            int ok = (int)p->numel == 64 * N * 49;
            for (int o = 0; ok && o < 64; o++)
                for (int ch = 0; ch < N; ch++)
                    for (int i = 0; i < 49; i++) {
                        float want = N == 3 ? W[(o * 3 + ch) * 49 + i] : W[(o * 3 + ch % 3) * 49 + i] * scale;
                        ok &= v[(o * N + ch) * 49 + i] == want;
                    }
            h->conv1_ok = ok;
            h->enc_differs = q && memcmp(v, ts_unet_param_f32(h->ref, q), p->numel * sizeof(float)) != 0;
        } else {
            h->enc_bad += t->nbytes != p->numel * sizeof(float) || memcmp(v, t->data, t->nbytes) != 0;
        }
    }
}

/* (g) */
static void test_imagenet(void)
{
    ts_dict tv;
    if (!make_torchvision(&tv)) {
        ts_dict_free(&tv);
        return;
    }
    int ok = tu_expect_ok(ts_pth_write(tpath("resnet34.pth"), &tv), "write resnet34.pth");
    /* a 4-band image on the same grid (labels: lab.tif) */
    uint8_t *img4 = malloc(4 * IW * IH);
    ok = ok && img4;
    for (int i = 0; ok && i < 4 * IW * IH; i++) img4[i] = (uint8_t)(urand() * 255);
    ok = ok && tu_expect(write_tif(tpath("img4.tif"), 4, img4), "write img4.tif");
    free(img4);
    for (int bands = 3; ok && bands <= 4; bands++) {
        ts_train_config c;
        char out[32];
        snprintf(out, sizeof out, "run_inet%d", bands);
        if (!tu_expect(resolve_few(&c, out, 1, 1, NULL), "config imagenet")) break;
        char w[1100], im[1100];
        snprintf(w, sizeof w, "model.weights=%s", tpath("resnet34.pth"));
        snprintf(im, sizeof im, "data.images=%s", tpath(bands == 3 ? "img.tif" : "img4.tif"));
        const char *sets[] = {"model.init=imagenet", w, im};
        ts_unet ref;
        memset(&ref, 0, sizeof ref);
        ts_unet_config uc;
        if (set_all(&c, sets, sizeof sets / sizeof *sets) &&
            tu_expect_ok(ts_train_config_unet(&c, bands, &uc), "unet config") &&
            tu_expect_ok(ts_unet_init(&ref, &uc), "reference model") &&
            tu_expect_ok(ts_unet_init_random(&ref, (uint64_t)c.seed), "reference init")) {
            inet_hook h = {.tv = &tv, .ref = &ref};
            ts_train_run_opts o = quiet_opts();
            o.on_step_model = inet_hook_fn;
            o.on_step_user = &h;
            o.stop_after_steps = 1;
            ts_train_result r;
            tu_expect_ok(ts_train_run(&c, &o, &r), "imagenet run");
            printf("imagenet, %d bands (%.1f s): %d encoder entries (%d differ), %d decoder/head entries (%d differ), conv1 %s\n",
                   bands, r.seconds, h.n_enc, h.enc_bad, h.n_dec, h.dec_bad, h.conv1_ok ? "ok" : "WRONG");
            tu_expect(h.calls == 1 && r.global_step == 1, "%d bands: the hook saw the model before step 1", bands);
            tu_expect(h.n_enc > 0 && h.enc_bad == 0 && h.conv1_ok && h.enc_differs,
                      "%d bands: encoder from resnet34.pth (conv1 by the first-conv rule)", bands);
            tu_expect(h.n_dec > 0 && h.dec_bad == 0, "%d bands: decoder and head from the scratch init", bands);
        }
        ts_unet_free(&ref);
        ts_train_config_free(&c);
    }
    ts_dict_free(&tv);
}

/* (h); after test_resume, whose run_full it compares with. */
static void test_device(void)
{
    const char *extra = "train.accumulate: 2\ntrain.checkpoint_steps: 2\nschedule.kind: cosine\nschedule.interval: step\n";
    ts_train_config c;
    ts_train_result r;
    ts_train_run_opts o = quiet_opts();
    o.backend = tu_fake_device_backend();
    tu_fake_reset_counts();
    const long live0 = tu_fake.live;
    if (!tu_expect(resolve(&c, "run_dev", 3, 0, extra), "config dev")) return;
    tu_expect_ok(ts_train_run(&c, &o, &r), "run on the fake device");
    printf("fake device run: %lld steps, %.1f s; %ld uploads (%.1f MiB), %ld downloads (%.1f MiB)\n",
           (long long)r.global_step, r.seconds, tu_fake.uploads, tu_fake.upload_bytes / 1048576.0, tu_fake.downloads,
           tu_fake.download_bytes / 1048576.0);
    same_model(tpath("run_full/model.safetensors"), tpath("run_dev/model.safetensors"), "fake device vs cpu");
    ts_train_config_free(&c);
    if (!tu_expect(resolve(&c, "run_dev_stop", 3, 0, extra), "config dev stop")) return;
    o.stop_after_steps = 3;
    tu_expect_ok(ts_train_run(&c, &o, &r), "stopped run on the fake device");
    tu_expect(r.interrupted == SIGINT && r.global_step == 3, "fake device: stopped at step 3");
    o.stop_after_steps = 0;
    o.resume = tpath("run_dev_stop/last.safetensors");
    tu_expect_ok(ts_train_run(&c, &o, &r), "resumed run on the fake device");
    same_model(tpath("run_full/model.safetensors"), tpath("run_dev_stop/model.safetensors"),
               "fake device stop + resume vs cpu");
    ts_train_config_free(&c);
    tu_expect(tu_fake.foreign_ptrs == 0 && tu_fake.bad_memory == 0,
              "fake device: every op pointer in device memory (%ld foreign, %ld bad copies)", tu_fake.foreign_ptrs,
              tu_fake.bad_memory);
    tu_expect(tu_fake.live == live0, "fake device: everything freed (%ld live)", tu_fake.live);
    /* An allocation failing inside the run is an error, and frees everything. */
    if (!tu_expect(resolve(&c, "run_dev_fail", 1, 0, extra), "config dev fail")) return;
    o.resume = NULL;
    tu_fake.fail_alloc_at = 3;
    tu_expect_error(ts_train_run(&c, &o, &r), TS_ERR_NOMEM, "fake device alloc 3 fails", "fake-device", NULL);
    tu_fake.fail_alloc_at = 0;
    tu_expect(tu_fake.live == live0, "fake device failure: everything freed (%ld live)", tu_fake.live);
    ts_train_config_free(&c);
}

/* (i) mixed precision through the whole trainer, on the fake device: an
 * fp16 run (loss scaling on) stopped and resumed ends bit-identical to the
 * uninterrupted one (the scaler's state is in the checkpoint), differs from
 * the float32 run (the half path ran), and, like a bf16 run, still learns. */
static void test_precision(void)
{
    const char *extra = "train.accumulate: 2\ntrain.checkpoint_steps: 2\nschedule.kind: cosine\nschedule.interval: step\n";
    char ex[512];
    ts_train_config c;
    ts_train_result r;
    ts_train_run_opts o = quiet_opts();
    o.backend = tu_fake_device_backend();
    snprintf(ex, sizeof ex, "%sprecision: fp16\n", extra);
    if (!tu_expect(resolve(&c, "run_f16", 3, 0, ex), "config fp16")) return;
    tu_expect(c.precision == TS_F16, "the config reads precision: fp16");
    tu_expect_ok(ts_train_run(&c, &o, &r), "fp16 run");
    printf("fp16 run: %lld steps (%lld skipped by loss scaling), train loss %.4f, val mIoU %.4f, %.1f s\n",
           (long long)r.global_step, (long long)r.skipped_steps, r.train_loss, r.miou, r.seconds);
    tu_expect(r.skipped_steps < r.global_step, "fp16: not every update skipped (%lld of %lld)",
              (long long)r.skipped_steps, (long long)r.global_step);
    tu_expect(r.best_miou > 0.6, "fp16: val mIoU %.4f above chance (> 0.6)", r.best_miou);
    ts_train_config_free(&c);
    if (!tu_expect(resolve(&c, "run_f16_stop", 3, 0, ex), "config fp16 stop")) return;
    o.stop_after_steps = 3;
    tu_expect_ok(ts_train_run(&c, &o, &r), "stopped fp16 run");
    o.stop_after_steps = 0;
    o.resume = tpath("run_f16_stop/last.safetensors");
    tu_expect_ok(ts_train_run(&c, &o, &r), "resumed fp16 run");
    same_model(tpath("run_f16/model.safetensors"), tpath("run_f16_stop/model.safetensors"), "fp16 stop + resume");
    ts_train_config_free(&c);
    /* The float32 run of the same configuration (test_resume's run_full) differs. */
    ts_unet ma, mb;
    memset(&ma, 0, sizeof ma);
    memset(&mb, 0, sizeof mb);
    if (tu_expect_ok(ts_model_load(tpath("run_full/model.safetensors"), &ma, NULL), "fp32 model") &&
        tu_expect_ok(ts_model_load(tpath("run_f16/model.safetensors"), &mb, NULL), "fp16 model"))
        tu_expect(ma.n_weights == mb.n_weights && memcmp(ma.weights, mb.weights, ma.n_weights * sizeof(float)) != 0,
                  "the fp16 run's weights differ from the float32 run's");
    ts_unet_free(&ma);
    ts_unet_free(&mb);
    o.resume = NULL;
    snprintf(ex, sizeof ex, "%sprecision: bf16\n", extra);
    if (!tu_expect(resolve(&c, "run_bf16", 3, 0, ex), "config bf16")) return;
    tu_expect_ok(ts_train_run(&c, &o, &r), "bf16 run");
    printf("bf16 run: %lld steps, train loss %.4f, val mIoU %.4f, %.1f s\n", (long long)r.global_step, r.train_loss,
           r.miou, r.seconds);
    tu_expect(r.best_miou > 0.6, "bf16: val mIoU %.4f above chance (> 0.6)", r.best_miou);
    ts_train_config_free(&c);
    tu_expect(tu_fake.foreign_ptrs == 0 && tu_fake.bad_memory == 0,
              "mixed precision on the fake device: every op pointer in device memory (%ld foreign)",
              tu_fake.foreign_ptrs);
}

/* (j) built as test_cuda_trainer (TEST_TRAIN_CUDA; a GPU test): the trainer
 * on the real CUDA backend, as `terraseg train --device cuda` runs it, with
 * deterministic: true. A stop at step 3 and a resume end bit-identical to the
 * uninterrupted run, in fp32 and in fp16 (the loss scaler's state through the
 * checkpoint); the fp32 run learns; and tf32: true reaches the backend (the
 * same run with it gives other weights: TF32 rounds the conv products). */
static void test_cuda_resume(void)
{
    const char *extra = "train.accumulate: 2\ntrain.checkpoint_steps: 2\nschedule.kind: cosine\n"
                        "schedule.interval: step\ndevice: cuda\ndeterministic: true\n";
    const char *prec[] = {"fp32", "fp16"};
    for (int p = 0; p < 2; p++) {
        char ex[512], full[64], stop[64], what[128];
        snprintf(ex, sizeof ex, "%sprecision: %s\n", extra, prec[p]);
        snprintf(full, sizeof full, "run_cuda_%s", prec[p]);
        snprintf(stop, sizeof stop, "run_cuda_%s_stop", prec[p]);
        ts_train_config c;
        ts_train_result r;
        ts_train_run_opts o = quiet_opts();
        if (!tu_expect(resolve(&c, full, 3, 0, ex), "config %s", full)) return;
        if (!tu_expect_ok(ts_train_run(&c, &o, &r), full)) {
            ts_train_config_free(&c);
            return;
        }
        const int64_t total = r.global_step;
        printf("cuda %s run: %lld steps, train loss %.4f, val mIoU %.4f, %.1f s\n", prec[p], (long long)total,
               r.train_loss, r.miou, r.seconds);
        tu_expect(r.best_miou > 0.6, "cuda %s: val mIoU %.4f above chance (> 0.6)", prec[p], r.best_miou);
        ts_train_config_free(&c);
        if (!tu_expect(resolve(&c, stop, 3, 0, ex), "config %s", stop)) return;
        o.stop_after_steps = 3;
        tu_expect_ok(ts_train_run(&c, &o, &r), stop);
        tu_expect(r.interrupted == SIGINT && r.global_step == 3, "cuda %s: stopped at step 3", prec[p]);
        o.stop_after_steps = 0;
        o.resume = tpath(strcat(strcpy(what, stop), "/last.safetensors"));
        tu_expect_ok(ts_train_run(&c, &o, &r), "resumed cuda run");
        tu_expect(r.interrupted == 0 && r.global_step == total, "cuda %s: resumed run ends at step %lld", prec[p],
                  (long long)r.global_step);
        char a[600], b[600];
        snprintf(a, sizeof a, "%s/model.safetensors", tpath(full));
        snprintf(b, sizeof b, "%s/model.safetensors", tpath(stop));
        snprintf(what, sizeof what, "cuda %s deterministic: stop + resume vs uninterrupted", prec[p]);
        same_model(a, b, what);
        ts_train_config_free(&c);
    }
    /* tf32: true, otherwise run_cuda_fp32's configuration. */
    char ex[512];
    snprintf(ex, sizeof ex, "%sprecision: fp32\ntf32: true\n", extra);
    ts_train_config c;
    ts_train_result r;
    ts_train_run_opts o = quiet_opts();
    if (!tu_expect(resolve(&c, "run_cuda_tf32", 3, 0, ex), "config tf32")) return;
    if (tu_expect_ok(ts_train_run(&c, &o, &r), "cuda tf32 run")) {
        ts_unet ma, mb;
        memset(&ma, 0, sizeof ma);
        memset(&mb, 0, sizeof mb);
        if (tu_expect_ok(ts_model_load(tpath("run_cuda_fp32/model.safetensors"), &ma, NULL), "fp32 model") &&
            tu_expect_ok(ts_model_load(tpath("run_cuda_tf32/model.safetensors"), &mb, NULL), "tf32 model")) {
            size_t diff = 0;
            for (size_t i = 0; i < ma.n_weights && i < mb.n_weights; i++)
                diff += memcmp(&ma.weights[i], &mb.weights[i], 4) != 0;
            tu_expect(diff > 0, "tf32: true changes the weights (%zu of %zu differ from the fp32 run)", diff,
                      ma.n_weights);
        }
        ts_unet_free(&ma);
        ts_unet_free(&mb);
    }
    ts_train_config_free(&c);
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

int main(void)
{
    snprintf(tmpdir, sizeof tmpdir, "%s/terraseg_train_XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    ts_gdal_init();
#ifdef TEST_TRAIN_CUDA
    const int cuda_only = 1;
#else
    const int cuda_only = 0;
#endif
    if (tu_expect(make_data(), "write the synthetic data") && cuda_only) {
        test_cuda_resume();
    } else if (!cuda_only) {
        test_learns();
        test_resume();
        test_device();
        test_precision();
        test_errors();
        test_early_stop();
        test_nan();
        test_imagenet();
    }
    if (!getenv("TEST_TRAIN_KEEP"))
        nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    else
        printf("kept %s\n", tmpdir);
    GDALDestroyDriverManager();
    OSRCleanup();
    return tu_finish("train");
}
