/* terraseg bench model: the whole U-Net on a synthetic tile. Host memory and
 * the CPU backend only: --device cuda is refused (ts_bench_check_device)
 * until nn/unet.c can keep its tensors on the device, so a CUDA table is
 * never handed host pointers. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "kernels/threads.h"
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

/* Median of iters timed runs after one warm-up; mode 0 eval forward, 1 train
 * forward + backward. */
static int time_model(ts_unet *m, ts_ctx *ctx, const ts_tensor *x, int mode, int iters, double *median_s)
{
    double *t = malloc(sizeof(double) * (size_t)iters);
    if (!t) return 1;
    ts_tensor logits, dlogits = {0};
    for (int it = -1; it < iters; it++) {
        double t0 = now_s();
        if (ts_unet_forward(m, ctx, x, mode, &logits) != TS_OK) goto fail;
        if (mode == 1) {
            if (!dlogits.data && ts_tensor_alloc(&dlogits, logits.n, logits.c, logits.h, logits.w) != TS_OK) goto fail;
            for (size_t i = 0; i < ts_tensor_numel(&dlogits); i++) dlogits.data[i] = 1e-4f;
            if (ts_unet_zero_grad(m, ctx) != TS_OK || ts_unet_backward(m, ctx, &dlogits) != TS_OK) goto fail;
        }
        if (it >= 0) t[it] = now_s() - t0;
    }
    qsort(t, (size_t)iters, sizeof *t, cmp_double);
    *median_s = t[iters / 2];
    free(t);
    ts_tensor_free(&dlogits);
    return 0;
fail:
    fprintf(stderr, "bench model: %s\n", ts_last_error());
    free(t);
    ts_tensor_free(&dlogits);
    return 1;
}

int ts_bench_model(const ts_bench_opts *o)
{
    int check = ts_bench_check_device(o, "model");
    if (check) return check;
    ts_unet_config cfg = ts_unet_default_config(o->in_channels, o->classes);
    ts_unet m;
    ts_ctx ctx;
    ts_ctx_init(&ctx, ts_backend_cpu());
    if (ts_unet_init(&m, &cfg) != TS_OK || ts_unet_init_random(&m, 1) != TS_OK) {
        fprintf(stderr, "bench model: %s\n", ts_last_error());
        return 1;
    }
    char blas[512];
    ts_blas_describe(blas, sizeof blas);
    printf("%s\n", blas);
    printf("smp.Unet(\"resnet34\", in_channels=%d, classes=%d): %zu trainable parameters\n\n", cfg.in_channels,
           cfg.classes, ts_unet_count_trainable(&m));
    printf("%-6s %-10s %14s %14s %18s %14s\n", "batch", "tile", "eval fwd ms", "ms/tile", "train fwd+bwd ms",
           "ms/tile");
    int batches[2] = {o->batch, 4};
    int rc = 0;
    for (int b = 0; b < 2 && rc == 0; b++) {
        if (b == 1 && batches[1] == batches[0]) break;
        ts_tensor x;
        if (ts_tensor_alloc(&x, batches[b], cfg.in_channels, o->size, o->size) != TS_OK) {
            fprintf(stderr, "bench model: %s\n", ts_last_error());
            rc = 1;
            break;
        }
        unsigned s = 12345;
        for (size_t i = 0; i < ts_tensor_numel(&x); i++) {
            s = s * 1664525u + 1013904223u;
            x.data[i] = (float)(s >> 8) / (float)(1 << 24) - 0.5f;
        }
        double fwd = 0, train = 0;
        rc = time_model(&m, &ctx, &x, 0, o->iters, &fwd);
        if (rc == 0) rc = time_model(&m, &ctx, &x, 1, o->iters, &train);
        if (rc == 0) {
            char tile[32];
            snprintf(tile, sizeof tile, "%dx%d", o->size, o->size);
            printf("%-6d %-10s %14.1f %14.1f %18.1f %14.1f\n", batches[b], tile, fwd * 1e3, fwd * 1e3 / batches[b],
                   train * 1e3, train * 1e3 / batches[b]);
        }
        ts_tensor_free(&x);
    }
    ts_unet_free(&m);
    ts_ctx_free(&ctx);
    return rc;
}

/* terraseg bench train: one full training step per batch (train forward,
 * (1-w) CE + w Dice, backward, AdamW with the tutorial's lr 3e-4 and weight
 * decay 1e-4), at o->batch and batch 4: ms per step and tiles/s. */
int ts_bench_train(const ts_bench_opts *o)
{
    int check = ts_bench_check_device(o, "train");
    if (check) return check;
    ts_unet_config cfg = ts_unet_default_config(o->in_channels, o->classes);
    ts_unet m;
    ts_ctx ctx;
    ts_ctx_init(&ctx, ts_backend_cpu());
    if (ts_unet_init(&m, &cfg) != TS_OK || ts_unet_init_random(&m, 1) != TS_OK) {
        fprintf(stderr, "bench train: %s\n", ts_last_error());
        return 1;
    }
    ts_loss loss;
    ts_optim opt;
    ts_loss_config lc = ts_loss_default_config();
    ts_optim_config oc = ts_optim_default_config();
    oc.lr = 3e-4;
    oc.weight_decay = 1e-4;
    if (ts_loss_init(&loss, &lc, cfg.classes) != TS_OK || ts_optim_init(&opt, &oc, &m) != TS_OK) {
        fprintf(stderr, "bench train: %s\n", ts_last_error());
        ts_unet_free(&m);
        return 1;
    }
    char blas[512];
    ts_blas_describe(blas, sizeof blas);
    printf("%s\n", blas);
    printf("one training step = train forward + loss (0.5 CE + 0.5 Dice) + backward + AdamW\n\n");
    printf("%-6s %-10s %14s %14s %10s\n", "batch", "tile", "ms/step", "ms/tile", "tiles/s");
    int batches[2] = {o->batch, 4};
    int rc = 0;
    for (int b = 0; b < 2 && rc == 0; b++) {
        if (b == 1 && batches[1] == batches[0]) break;
        const int n = batches[b];
        ts_tensor x = {0}, dlogits = {0};
        int32_t *target = malloc(sizeof(int32_t) * (size_t)n * o->size * o->size);
        double *t = malloc(sizeof(double) * (size_t)o->iters);
        if (!target || !t || ts_tensor_alloc(&x, n, cfg.in_channels, o->size, o->size) != TS_OK ||
            ts_tensor_alloc(&dlogits, n, cfg.classes, o->size, o->size) != TS_OK) {
            fprintf(stderr, "bench train: out of memory\n");
            rc = 1;
        }
        unsigned s = 12345;
        for (size_t i = 0; rc == 0 && i < ts_tensor_numel(&x); i++) {
            s = s * 1664525u + 1013904223u;
            x.data[i] = (float)(s >> 8) / (float)(1 << 24) - 0.5f;
        }
        for (size_t i = 0; rc == 0 && i < (size_t)n * o->size * o->size; i++) target[i] = (int32_t)((i / 7) % cfg.classes);
        for (int it = -1; rc == 0 && it < o->iters; it++) {
            double t0 = now_s();
            ts_tensor logits;
            ts_loss_value lv;
            if (ts_unet_forward(&m, &ctx, &x, 1, &logits) != TS_OK || ts_loss_forward(&loss, &ctx, &logits, target, &lv) ||
                ctx.backend->zero(&ctx, dlogits.data, ts_tensor_numel(&dlogits)) ||
                ts_loss_backward(&loss, &ctx, &dlogits, &logits, target, 1.0f) || ts_unet_zero_grad(&m, &ctx) ||
                ts_unet_backward(&m, &ctx, &dlogits) || ts_optim_step(&opt, &ctx, &m, oc.lr, NULL)) {
                fprintf(stderr, "bench train: %s\n", ts_last_error());
                rc = 1;
                break;
            }
            if (it >= 0) t[it] = now_s() - t0;
        }
        if (rc == 0) {
            qsort(t, (size_t)o->iters, sizeof *t, cmp_double);
            double med = t[o->iters / 2];
            char tile[32];
            snprintf(tile, sizeof tile, "%dx%d", o->size, o->size);
            printf("%-6d %-10s %14.1f %14.1f %10.2f\n", n, tile, med * 1e3, med * 1e3 / n, n / med);
        }
        free(target);
        free(t);
        ts_tensor_free(&x);
        ts_tensor_free(&dlogits);
    }
    ts_optim_free(&opt);
    ts_loss_free(&loss);
    ts_unet_free(&m);
    ts_ctx_free(&ctx);
    return rc;
}
