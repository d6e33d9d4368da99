/* Losses on the CPU: softmax cross-entropy and the two Dice losses of
 * shared/specs/smp-unet.md section 6, forward and backward.
 *
 * All of them take logits [N,C,H,W] (float) and labels [N,H,W] (int32) and
 * work per pixel over the C channels, which lie H*W floats apart. The softmax
 * and every sum are computed in double: the result is a close (not bit-equal)
 * match of PyTorch's float32 math, and the sums do not drift on large batches.
 *
 * Determinism: the sums are formed over fixed blocks of pixels (independent
 * of the thread count), each block's partial is written to its own slot, and
 * the slots are added serially in block order. The same inputs therefore give
 * bit-identical losses and gradients whatever TERRASEG_THREADS is, which the
 * checkpoint-and-rerun test relies on. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

/* Pixels per block for the reductions: large enough that a block's OpenMP
 * scheduling cost is noise, small enough to split a single 256x256 image over
 * both cores. */
#define LOSS_BLOCK 4096

/* ---- helpers (the argument checks are ts_loss_check & co., ops_common.c) -- */

/* Checks every label in scan order, so the message names the first bad pixel,
 * and returns sum over valid pixels of w[y] (w = 1 without weights). Serial on
 * purpose: ts_error() is thread-local, and a scan of int32 labels is cheap
 * next to the softmax that follows. */
static ts_status scan_labels(const char *op, const ts_tensor *logits, const int32_t *target, int ignore_index,
                             const float *class_weights, double *weight_sum)
{
    const int C = logits->c;
    const size_t hw = (size_t)logits->h * logits->w, npix = (size_t)logits->n * hw;
    double ws = 0;
    *weight_sum = 0; /* on every path: gcc cannot see that an error return is nonzero */
    for (size_t i = 0; i < npix; i++) {
        int32_t y = target[i];
        if (y == ignore_index) continue;
        if (y < 0 || y >= C) return ts_loss_label_error(op, logits, y, i, ignore_index);
        ws += class_weights ? (double)class_weights[y] : 1.0;
    }
    *weight_sum = ws;
    return TS_OK;
}

/* softmax of one pixel's C logits (stride apart) into q[0..C), in double.
 * Max-subtracted, so no exp overflows; exp(z - max) / sum equals
 * exp(log_softmax) up to double rounding. Returns log(sum) for the CE. */
static double pixel_softmax(const float *z, size_t stride, int C, double *q)
{
    double mx = z[0];
    for (int c = 1; c < C; c++)
        if (z[c * stride] > mx) mx = z[c * stride];
    double s = 0;
    for (int c = 0; c < C; c++) {
        q[c] = exp((double)z[c * stride] - mx);
        s += q[c];
    }
    double inv = 1.0 / s;
    for (int c = 0; c < C; c++) q[c] *= inv;
    /* log_softmax(z)[c] = (z[c] - mx) - log(s). */
    return mx + log(s);
}

/* Scratch of C doubles per thread (one malloc per call, so an allocation
 * failure is a plain status instead of a problem inside a parallel region). */
static double *thread_rows(int C, size_t extra, const char *op, ts_status *st)
{
    size_t nt = (size_t)omp_get_max_threads();
    double *buf = malloc((nt * (size_t)C + extra) * sizeof *buf);
    *st = buf ? TS_OK : ts_error(TS_ERR_NOMEM, "%s: out of memory for %zu doubles of scratch", op, nt * C + extra);
    return buf;
}

/* ---- cross-entropy ---------------------------------------------------- */

/* As torch.nn.CrossEntropyLoss(weight, ignore_index, reduction="mean"):
 *   loss = -sum_valid w[y] log softmax(z)[y] / sum_valid w[y].
 * When no pixel is valid (all ignored, or every valid weight is 0) PyTorch
 * returns 0/0 = NaN; we return 0 instead (and the backward adds nothing), so
 * a fully ignored tile does not poison the running loss or the weights. */
ts_status ts_cpu_cross_entropy_forward(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                                       const ts_ce_params *p)
{
    (void)ctx;
    const char *op = "cross_entropy_forward";
    ts_status st = ts_loss_check(op, logits, target, p, loss);
    if (st) return st;
    double wsum;
    if ((st = scan_labels(op, logits, target, p->ignore_index, p->class_weights, &wsum))) return st;
    *loss = 0;
    if (wsum == 0) return TS_OK;

    const int N = logits->n, C = logits->c;
    const size_t hw = (size_t)logits->h * logits->w;
    const size_t bpi = (hw + LOSS_BLOCK - 1) / LOSS_BLOCK; /* blocks per image */
    const size_t nblocks = (size_t)N * bpi;
    double *rows = thread_rows(C, nblocks, op, &st);
    if (st) return st;
    double *partial = rows + (size_t)omp_get_max_threads() * C;
    const float *cw = p->class_weights;
    const int ignore = p->ignore_index;

#pragma omp parallel
    {
        double *q = rows + (size_t)omp_get_thread_num() * C;
#pragma omp for schedule(static)
        for (size_t b = 0; b < nblocks; b++) {
            size_t n = b / bpi, i0 = b % bpi * LOSS_BLOCK, i1 = i0 + LOSS_BLOCK < hw ? i0 + LOSS_BLOCK : hw;
            const float *zn = logits->data + n * C * hw;
            const int32_t *yn = target + n * hw;
            double acc = 0;
            for (size_t i = i0; i < i1; i++) {
                int32_t y = yn[i];
                if (y == ignore) continue;
                double lse = pixel_softmax(zn + i, hw, C, q);
                double w = cw ? (double)cw[y] : 1.0;
                acc -= w * ((double)zn[i + (size_t)y * hw] - lse);
            }
            partial[b] = acc;
        }
    }
    double total = 0;
    for (size_t b = 0; b < nblocks; b++) total += partial[b];
    free(rows);
    *loss = total / wsum;
    return TS_OK;
}

/* dlogits += dloss * w[y] (softmax(z) - onehot(y)) / sum_valid w[y]. */
ts_status ts_cpu_cross_entropy_backward(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits,
                                        const int32_t *target, const ts_ce_params *p, float dloss)
{
    (void)ctx;
    const char *op = "cross_entropy_backward";
    ts_status st = ts_loss_check(op, logits, target, p, dlogits);
    if (st || (st = ts_loss_dlogits_check(op, dlogits, logits))) return st;
    double wsum;
    if ((st = scan_labels(op, logits, target, p->ignore_index, p->class_weights, &wsum))) return st;
    if (wsum == 0) return TS_OK; /* no valid pixel: the forward returned the constant 0 */

    const int C = logits->c;
    const size_t hw = (size_t)logits->h * logits->w, npix = (size_t)logits->n * hw;
    double *rows = thread_rows(C, 0, op, &st);
    if (st) return st;
    const double scale = (double)dloss / wsum;
    const float *cw = p->class_weights;
    const int ignore = p->ignore_index;

#pragma omp parallel
    {
        double *q = rows + (size_t)omp_get_thread_num() * C;
        /* Pixels are independent (each writes only its own C gradients), so a
         * plain static split is race-free and deterministic. */
#pragma omp for schedule(static)
        for (size_t pi = 0; pi < npix; pi++) {
            int32_t y = target[pi];
            if (y == ignore) continue;
            size_t n = pi / hw, i = pi % hw;
            const float *z = logits->data + n * C * hw + i;
            float *dz = dlogits->data + n * C * hw + i;
            pixel_softmax(z, hw, C, q);
            double s = scale * (cw ? (double)cw[y] : 1.0);
            for (int c = 0; c < C; c++) dz[c * hw] += (float)(s * (q[c] - (c == y ? 1.0 : 0.0)));
        }
    }
    free(rows);
    return TS_OK;
}

/* ---- Dice ------------------------------------------------------------- */

/* Per image n and class c, over the valid pixels of the image: Sp = sum p,
 * St = sum t, I = sum p t, stored at sums[(n*C + c)*3 + {0,1,2}]. Ignored
 * pixels are left out of all three, which is SMP's "p *= m, t *= m". */

static ts_status dice_sums(const char *op, const ts_tensor *logits, const int32_t *target, int ignore, double *sums)
{
    const int N = logits->n, C = logits->c;
    const size_t hw = (size_t)logits->h * logits->w;
    const size_t bpi = (hw + LOSS_BLOCK - 1) / LOSS_BLOCK;
    const size_t nblocks = (size_t)N * bpi, per = (size_t)C * TS_DICE_SUMS;
    ts_status st;
    double *rows = thread_rows(C, nblocks * per, op, &st);
    if (st) return st;
    double *partial = rows + (size_t)omp_get_max_threads() * C;

#pragma omp parallel
    {
        double *q = rows + (size_t)omp_get_thread_num() * C;
#pragma omp for schedule(static)
        for (size_t b = 0; b < nblocks; b++) {
            size_t n = b / bpi, i0 = b % bpi * LOSS_BLOCK, i1 = i0 + LOSS_BLOCK < hw ? i0 + LOSS_BLOCK : hw;
            const float *zn = logits->data + n * C * hw;
            const int32_t *yn = target + n * hw;
            double *acc = partial + b * per;
            memset(acc, 0, per * sizeof *acc);
            for (size_t i = i0; i < i1; i++) {
                int32_t y = yn[i];
                if (y == ignore) continue;
                pixel_softmax(zn + i, hw, C, q);
                for (int c = 0; c < C; c++) acc[c * TS_DICE_SUMS + TS_DICE_SUM_P] += q[c];
                acc[y * TS_DICE_SUMS + TS_DICE_SUM_T] += 1.0;
                acc[y * TS_DICE_SUMS + TS_DICE_SUM_I] += q[y]; /* p t is p at the true class, 0 elsewhere */
            }
        }
    }
    memset(sums, 0, (size_t)N * per * sizeof *sums);
    for (size_t b = 0; b < nblocks; b++) {
        double *dst = sums + b / bpi * per;
        const double *src = partial + b * per;
        for (size_t k = 0; k < per; k++) dst[k] += src[k];
    }
    free(rows);
    return TS_OK;
}


/* TS_DICE_SMP: smp.losses.DiceLoss("multiclass", ignore_index, smooth, eps,
 * log_loss, class_weights), SMP >= 0.4 (spec section 6).
 * TS_DICE_PER_IMAGE: the tutorial's per-image dice. Its ignore_index handling
 * (ignored pixels are left out of sum p and sum t) is our extension: the
 * tutorial has none. An image whose pixels are all ignored has
 * dice = eps / eps = 1 for every class and adds no gradient. */
ts_status ts_cpu_dice_forward(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                              const ts_dice_params *p)
{
    (void)ctx;
    const char *op = "dice_forward";
    ts_status st = ts_loss_check(op, logits, target, p, loss);
    if (st || (st = ts_dice_params_check(op, p, logits->c))) return st;
    double unused;
    if ((st = scan_labels(op, logits, target, p->ignore_index, NULL, &unused))) return st;
    const int N = logits->n, C = logits->c;
    double *sums = malloc((size_t)N * C * TS_DICE_SUMS * sizeof *sums);
    if (!sums) return ts_error(TS_ERR_NOMEM, "%s: out of memory", op);
    if ((st = dice_sums(op, logits, target, p->ignore_index, sums)) == TS_OK)
        *loss = ts_dice_reduce(p, N, C, sums, 0, NULL, NULL);
    free(sums);
    return st;
}

ts_status ts_cpu_dice_backward(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits, const int32_t *target,
                               const ts_dice_params *p, float dloss)
{
    (void)ctx;
    const char *op = "dice_backward";
    ts_status st = ts_loss_check(op, logits, target, p, dlogits);
    if (st || (st = ts_loss_dlogits_check(op, dlogits, logits)) || (st = ts_dice_params_check(op, p, logits->c)))
        return st;
    double unused;
    if ((st = scan_labels(op, logits, target, p->ignore_index, NULL, &unused))) return st;
    const int N = logits->n, C = logits->c;
    const size_t nc = (size_t)N * C;
    double *sums = malloc(nc * (TS_DICE_SUMS + 2) * sizeof *sums);
    if (!sums) return ts_error(TS_ERR_NOMEM, "%s: out of memory", op);
    double *gp = sums + nc * TS_DICE_SUMS, *gi = gp + nc;
    if ((st = dice_sums(op, logits, target, p->ignore_index, sums))) {
        free(sums);
        return st;
    }
    ts_dice_reduce(p, N, C, sums, dloss, gp, gi);

    const size_t hw = (size_t)logits->h * logits->w, npix = (size_t)N * hw;
    /* Two rows per thread: the softmax q and the upstream gradient g. */
    double *rows = thread_rows(2 * C, 0, op, &st);
    if (st) {
        free(sums);
        return st;
    }
    const int ignore = p->ignore_index;
#pragma omp parallel
    {
        double *q = rows + (size_t)omp_get_thread_num() * 2 * C, *g = q + C;
#pragma omp for schedule(static)
        for (size_t pi = 0; pi < npix; pi++) {
            int32_t y = target[pi];
            if (y == ignore) continue; /* p was masked to 0 there: no gradient */
            size_t n = pi / hw, i = pi % hw;
            const float *z = logits->data + n * C * hw + i;
            float *dz = dlogits->data + n * C * hw + i;
            pixel_softmax(z, hw, C, q);
            /* Through the softmax Jacobian: dz_c = p_c (g_c - sum_k p_k g_k). */
            double pg = 0;
            for (int c = 0; c < C; c++) {
                g[c] = gp[n * C + c] + (c == y ? gi[n * C + c] : 0.0);
                pg += q[c] * g[c];
            }
            for (int c = 0; c < C; c++) dz[c * hw] += (float)(q[c] * (g[c] - pg));
        }
    }
    free(rows);
    free(sums);
    return TS_OK;
}
