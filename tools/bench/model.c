/* terraseg bench model / bench train: the whole U-Net on synthetic tiles, on
 * the CPU or (--device cuda[:N]) the CUDA backend, through the same code the
 * product runs: the inference copy (ts_unet_device_init: BN folded, what
 * predict runs) for the eval forward, and the training copy
 * (ts_unet_device_init_train, what the trainer runs) for training. On CUDA
 * every timed iteration ends with the backend's sync, so a time covers the
 * work and not only its launch. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/threads.h"
#ifdef TERRASEG_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif
#include "nn/unet.h"
#include "tools/bench/bench.h"
#include "train/loss.h"
#include "train/optim.h"

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *t, int n)
{
    qsort(t, (size_t)n, sizeof *t, cmp_double);
    return t[n / 2];
}

/* A synthetic batch in [-0.5, 0.5). */
static ts_status make_input(ts_tensor *x, int n, int c, int size)
{
    ts_status st = ts_tensor_alloc(x, n, c, size, size);
    unsigned s = 12345;
    for (size_t i = 0; st == TS_OK && i < ts_tensor_numel(x); i++) {
        s = s * 1664525u + 1013904223u;
        x->data[i] = (float)(s >> 8) / (float)(1 << 24) - 0.5f;
    }
    return st;
}

/* Everything both benchmarks set up: the backend, a context, a model with
 * SMP's random init. */
typedef struct bench_model {
    const ts_backend *b;
    ts_ctx ctx;
    ts_unet m;
    char graph_error[512]; /* why an eval forward could not be recorded, or "" */
} bench_model;

static int open_model(bench_model *bm, const ts_bench_opts *o, const char *what)
{
    memset(bm, 0, sizeof *bm);
    int rc = ts_bench_backend(o, what, &bm->b);
    if (rc) return rc;
    ts_ctx_init(&bm->ctx, bm->b);
    ts_unet_config cfg = ts_unet_default_config(o->in_channels, o->classes);
    if (ts_unet_init(&bm->m, &cfg) != TS_OK || ts_unet_init_random(&bm->m, 1) != TS_OK) {
        fprintf(stderr, "bench %s: %s\n", what, ts_last_error());
        ts_unet_free(&bm->m);
        return 1;
    }
    char desc[768];
    ts_bench_describe(o, bm->b, desc, sizeof desc);
    printf("%s\n", desc);
    return 0;
}

static void close_model(bench_model *bm)
{
    ts_unet_free(&bm->m);
    ts_ctx_free(&bm->ctx);
}

/* Predict's pipeline on a backend with asynchronous copies (CUDA): two
 * batches in flight from page-locked buffers (ts_unet_device_forward_start),
 * each iteration starting one and waiting for the one before, so a time is
 * the interval between two finished batches: the throughput predict gets
 * when its readers keep up. The first wait finds a fence never recorded,
 * which passes at once. */
static int time_pipelined(bench_model *bm, ts_unet_device *d, const ts_tensor *x, int iters, double *t)
{
    const ts_backend_memory *mem = bm->b->memory;
    const int K = bm->m.cfg.classes;
    const size_t xb = ts_tensor_numel(x) * sizeof(float), lb = (size_t)x->n * K * x->h * x->w * sizeof(float);
    void *xs[2] = {NULL, NULL}, *ls[2] = {NULL, NULL}, *fence[2] = {NULL, NULL};
    int rc = 1;
    for (int s = 0; s < 2; s++) {
        if (mem->host_alloc(&xs[s], xb) != TS_OK || mem->host_alloc(&ls[s], lb) != TS_OK ||
            mem->fence_new(&fence[s]) != TS_OK)
            goto out;
        memcpy(xs[s], x->data, xb);
    }
    double last = now_s();
    for (int it = -2; it < iters; it++) {
        const int s = it & 1, prev = s ^ 1;
        ts_tensor xh = ts_tensor_view(xs[s], x->n, x->c, x->h, x->w), lh = ts_tensor_view(ls[s], x->n, K, x->h, x->w);
        if (ts_unet_device_forward_start(d, &bm->ctx, &xh, &lh, fence[s]) != TS_OK ||
            mem->fence_wait(fence[prev]) != TS_OK)
            goto out;
        double now = now_s();
        if (it >= 0) t[it] = now - last;
        last = now;
    }
    rc = mem->fence_wait(fence[(iters - 1) & 1]) == TS_OK ? 0 : 1;
out:
    /* Nothing may still read or write a buffer that is freed. */
    for (int s = 0; s < 2; s++)
        if (fence[s]) (void)mem->fence_wait(fence[s]);
    for (int s = 0; s < 2; s++) {
        mem->host_free(xs[s]);
        mem->host_free(ls[s]);
        mem->fence_free(fence[s]);
    }
    return rc;
}

/* Median of iters timed runs after two warm-ups. mode 0: the inference copy's
 * forward (host batch in, host logits out, as predict: on a backend with
 * asynchronous copies pipelined as predict pipelines it, see time_pipelined).
 * mode 1: the training copy's train forward + backward (dlogits constant, in
 * backend memory).
 * mode 2: the inference copy's forward on a batch already in the backend's
 * memory, logits left there, then a sync (as PyTorch benchmarks time it). */
static int time_model(bench_model *bm, const ts_tensor *x, int mode, const ts_bench_opts *o, double *median_s)
{
    const int iters = o->iters;
    const ts_dtype precision = o->precision;
    const ts_backend *B = bm->b;
    double *t = malloc(sizeof(double) * (size_t)iters);
    ts_unet_device d;
    memset(&d, 0, sizeof d);
    ts_tensor logits = {0}, dl = {0};
    float *dl_dev = NULL;
    int rc = 1;
    if (!t) goto out;
    const int K = bm->m.cfg.classes;
    if (mode == 0 || mode == 2) {
        if (ts_unet_device_init(&d, &bm->m, B) != TS_OK || ts_tensor_alloc(&logits, x->n, K, x->h, x->w) != TS_OK ||
            (precision != TS_F32 && ts_unet_device_set_precision(&d, &bm->ctx, precision) != TS_OK))
            goto out;
        ts_unet_device_set_graphs(&d, !o->no_graphs);
        if (mode == 2) {
            void *p = NULL;
            if (B->memory->alloc(&p, ts_tensor_numel(x) * sizeof(float)) != TS_OK) goto out;
            dl_dev = p; /* here: the resident input */
            if (B->memory->upload(dl_dev, x->data, ts_tensor_numel(x) * sizeof(float)) != TS_OK) goto out;
        }
    } else {
        void *p = NULL;
        if (ts_unet_device_init_train(&d, &bm->m, B) != TS_OK || ts_tensor_alloc(&dl, x->n, K, x->h, x->w) != TS_OK ||
            B->memory->alloc(&p, ts_tensor_numel(&dl) * sizeof(float)) != TS_OK ||
            (precision != TS_F32 && ts_unet_device_set_precision(&d, &bm->ctx, precision) != TS_OK))
            goto out;
        dl_dev = p;
        for (size_t i = 0; i < ts_tensor_numel(&dl); i++) dl.data[i] = 1e-4f;
        if (B->memory->upload(dl_dev, dl.data, ts_tensor_numel(&dl) * sizeof(float)) != TS_OK) goto out;
    }
    if (mode == 0 && ts_backend_memory_async(B->memory)) {
        if (time_pipelined(bm, &d, x, iters, t)) goto out;
        *median_s = median(t, iters);
        rc = 0;
        goto out;
    }
    /* Two untimed runs: the first plans (and on CUDA chooses algorithms and
     * grows the workspace), the second records the eval forward's graph. */
    for (int it = -2; it < iters; it++) {
        double t0 = now_s();
        if (mode == 0) {
            if (ts_unet_device_forward(&d, &bm->ctx, x, &logits) != TS_OK) goto out;
        } else if (mode == 2) {
            ts_tensor xd = ts_tensor_view(dl_dev, x->n, x->c, x->h, x->w), ld;
            if (ts_unet_device_forward_resident(&d, &bm->ctx, &xd, &ld) != TS_OK || B->memory->sync() != TS_OK)
                goto out;
        } else {
            ts_tensor lg, dv = ts_tensor_view(dl_dev, dl.n, dl.c, dl.h, dl.w);
            if (ts_unet_device_run(&d, &bm->ctx, x, 1, &lg) != TS_OK || ts_unet_device_zero_grad(&d, &bm->ctx) != TS_OK ||
                ts_unet_device_backward(&d, &bm->ctx, &dv) != TS_OK || B->memory->sync() != TS_OK)
                goto out;
        }
        if (it >= 0) t[it] = now_s() - t0;
    }
    *median_s = median(t, iters);
    rc = 0;
out:
    if (rc) fprintf(stderr, "bench model: %s\n", ts_last_error());
    const char *graph_error = ts_unet_device_graph_error(&d);
    if (graph_error && !bm->graph_error[0]) snprintf(bm->graph_error, sizeof bm->graph_error, "%s", graph_error);
    B->memory->free(dl_dev);
    ts_unet_device_free(&d);
    ts_tensor_free(&logits);
    ts_tensor_free(&dl);
    free(t);
    return rc;
}

int ts_bench_model(const ts_bench_opts *o)
{
    bench_model bm;
    int rc = open_model(&bm, o, "model");
    if (rc) return rc;
    const ts_unet_config cfg = bm.m.cfg;
    printf("smp.Unet(\"resnet34\", in_channels=%d, classes=%d): %zu trainable parameters; device %s\n", cfg.in_channels,
           cfg.classes, ts_unet_count_trainable(&bm.m), bm.b->name);
    printf("eval fwd = the inference copy (BN folded, as predict: batch upload, forward, logits download%s); "
           "train = the training copy's forward + backward; resident = the eval forward on a batch already in the "
           "device's memory, logits left there (as PyTorch benchmarks time it)\n",
           ts_backend_memory_async(bm.b->memory)
               ? "; two batches in flight from page-locked memory, timed from one finished batch to the next"
               : "");
    printf("eval forwards: %s\n\n",
           !bm.b->graphs ? "every op called directly (this backend has no graphs)"
           : o->no_graphs ? "every op called directly (--no-graphs)"
                          : "recorded once as a graph per batch shape, then replayed in one launch");
    printf("%-6s %-10s %14s %14s %18s %14s %14s\n", "batch", "tile", "eval fwd ms", "ms/tile", "train fwd+bwd ms",
           "ms/tile", "resident ms");
    int batches[2] = {o->batch, 4};
    for (int bi = 0; bi < 2 && rc == 0; bi++) {
        if (bi == 1 && batches[1] == batches[0]) break;
        ts_tensor x = {0};
        if (make_input(&x, batches[bi], cfg.in_channels, o->size) != TS_OK) {
            fprintf(stderr, "bench model: %s\n", ts_last_error());
            rc = 1;
            break;
        }
        double fwd = 0, train = 0, resident = 0;
        rc = time_model(&bm, &x, 0, o, &fwd);
        if (rc == 0) rc = time_model(&bm, &x, 1, o, &train);
        if (rc == 0) rc = time_model(&bm, &x, 2, o, &resident);
        if (rc == 0) {
            char tile[32];
            snprintf(tile, sizeof tile, "%dx%d", o->size, o->size);
            printf("%-6d %-10s %14.1f %14.1f %18.1f %14.1f %14.3f\n", batches[bi], tile, fwd * 1e3,
                   fwd * 1e3 / batches[bi], train * 1e3, train * 1e3 / batches[bi], resident * 1e3);
        }
        ts_tensor_free(&x);
    }
    if (bm.graph_error[0])
        printf("\nthe eval forward could not be recorded as a graph, so its ops were called one by one: %s\n",
               bm.graph_error);
#ifdef TERRASEG_HAVE_CUDA
    if (rc == 0 && ts_bench_is_cuda(o)) {
        /* Whether cuDNN took the fused conv + bias + ReLU (kernels/cuda/conv.c)
         * for the eval forwards, or some plans run two passes. */
        long fused = 0, unfused = 0;
        ts_cuda_conv_fusion_stats(&fused, &unfused);
        printf("\nconv forwards with a bias or ReLU (direct calls and recordings): %ld as one cuDNN call "
               "(conv + bias + ReLU), %ld as two passes\n",
               fused, unfused);
        const char *why = ts_cuda_conv_fusion_refusal();
        if (why) printf("first refusal of the fused call: %s\n", why);
    }
#endif
    close_model(&bm);
    return rc;
}

/* terraseg bench train: one full training step per batch, as the trainer
 * runs it (labels uploaded, train forward, (1-w) CE + w Dice, backward,
 * AdamW with the tutorial's lr 3e-4 and weight decay 1e-4, all on the
 * training copy), at o->batch and batch 4: ms per step and tiles/s. */
int ts_bench_train(const ts_bench_opts *o)
{
    bench_model bm;
    int rc = open_model(&bm, o, "train");
    if (rc) return rc;
    const ts_backend *B = bm.b;
    const ts_unet_config cfg = bm.m.cfg;
    ts_loss loss;
    ts_optim opt;
    memset(&loss, 0, sizeof loss);
    memset(&opt, 0, sizeof opt);
    ts_unet_device d;
    memset(&d, 0, sizeof d);
    ts_loss_config lc = ts_loss_default_config();
    ts_optim_config oc = ts_optim_default_config();
    oc.lr = 3e-4;
    oc.weight_decay = 1e-4;
    oc.loss_scaling = o->precision == TS_F16;
    if (ts_loss_init(&loss, &lc, cfg.classes) != TS_OK || ts_optim_init_on(&opt, &oc, &bm.m, B) != TS_OK ||
        ts_unet_device_init_train(&d, &bm.m, B) != TS_OK ||
        (o->precision != TS_F32 && ts_unet_device_set_precision(&d, &bm.ctx, o->precision) != TS_OK)) {
        fprintf(stderr, "bench train: %s\n", ts_last_error());
        rc = 1;
    }
    const ts_unet_trainable tr = ts_unet_device_trainable(&d);
    if (rc == 0) {
        printf("one training step = labels upload + train forward + loss (0.5 CE + 0.5 Dice) + backward + AdamW; "
               "device %s\n\n", B->name);
        printf("%-6s %-10s %14s %14s %10s\n", "batch", "tile", "ms/step", "ms/tile", "tiles/s");
    }
    int batches[2] = {o->batch, 4};
    for (int bi = 0; bi < 2 && rc == 0; bi++) {
        if (bi == 1 && batches[1] == batches[0]) break;
        const int n = batches[bi];
        const size_t npix = (size_t)n * o->size * o->size;
        ts_tensor x = {0};
        int32_t *target = malloc(sizeof(int32_t) * npix);
        double *t = malloc(sizeof(double) * (size_t)o->iters);
        void *yd = NULL, *dld = NULL;
        const int host = ts_backend_is_host(B);
        if (!target || !t || make_input(&x, n, cfg.in_channels, o->size) != TS_OK ||
            B->memory->alloc(&dld, npix * (size_t)cfg.classes * sizeof(float)) != TS_OK ||
            (!host && B->memory->alloc(&yd, npix * sizeof(int32_t)) != TS_OK)) {
            fprintf(stderr, "bench train: %s\n", ts_last_error());
            rc = 1;
        }
        for (size_t i = 0; rc == 0 && i < npix; i++) target[i] = (int32_t)((i / 7) % cfg.classes);
        const int32_t *labels = host ? target : yd;
        for (int it = -1; rc == 0 && it < o->iters; it++) {
            double t0 = now_s();
            ts_tensor logits, dv = ts_tensor_view(dld, n, cfg.classes, o->size, o->size);
            ts_loss_value lv;
            if ((!host && B->memory->upload(yd, target, npix * sizeof(int32_t)) != TS_OK) ||
                ts_unet_device_zero_grad(&d, &bm.ctx) || ts_unet_device_run(&d, &bm.ctx, &x, 1, &logits) ||
                ts_loss_forward(&loss, &bm.ctx, &logits, labels, &lv) || B->zero(&bm.ctx, dv.data, ts_tensor_numel(&dv)) ||
                ts_loss_backward(&loss, &bm.ctx, &dv, &logits, labels, ts_optim_loss_scale(&opt)) ||
                ts_unet_device_backward(&d, &bm.ctx, &dv) || ts_optim_step_on(&opt, &bm.ctx, &tr, oc.lr, NULL) ||
                B->memory->sync()) {
                fprintf(stderr, "bench train: %s\n", ts_last_error());
                rc = 1;
                break;
            }
            if (it >= 0) t[it] = now_s() - t0;
        }
        if (rc == 0) {
            double med = median(t, o->iters);
            char tile[32];
            snprintf(tile, sizeof tile, "%dx%d", o->size, o->size);
            printf("%-6d %-10s %14.1f %14.1f %10.2f\n", n, tile, med * 1e3, med * 1e3 / n, n / med);
        }
        B->memory->free(yd);
        B->memory->free(dld);
        free(target);
        free(t);
        ts_tensor_free(&x);
    }
    ts_unet_device_free(&d);
    ts_optim_free(&opt);
    ts_loss_free(&loss);
    close_model(&bm);
    return rc;
}
