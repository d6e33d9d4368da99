/* Losses on the GPU, twins of kernels/cpu/loss.c: softmax cross-entropy and
 * the two Dice losses of shared/specs/smp-unet.md section 6, forward and
 * backward, with the CPU's formulas, masking, checks and messages (the checks
 * are the shared ones of kernels/ops_common.c, which both backends call).
 *
 * Logits [N,C,H,W] and labels [N,H,W] (int32) are device memory; the
 * parameter structs and their class_weights stay on the host, and so does the
 * double a forward returns. Every op here waits for the stream before it
 * returns its status, because the status depends on the labels (a label
 * outside [0, C) that is not ignore_index is an error naming the first such
 * pixel, as on the CPU) and the backward's scale on a sum over them: one
 * forward and one backward per training step, so two waits per step.
 *
 * Numbers. The softmax and every sum are in double, as on the CPU. CUDA's exp
 * and log are within 1 ulp (double) where glibc's are correctly rounded in
 * nearly all cases, and the reduction order differs (below), so losses agree
 * with the CPU to ~1e-15 relative, and a gradient, rounded to float from a
 * double that differs in its last bits, equals the CPU's float except in the
 * rare case the double lies next to a float rounding boundary: then 1 ulp of
 * that float. The products that feed the gradients and the CE sum are written
 * with __dmul_rn / __dadd_rn so nvcc does not fuse them where the CPU (ISO C,
 * no contraction) rounds twice.
 *
 * Determinism. Pixels are cut into blocks of LOSS_BLOCK (per image, as on the
 * CPU), one CUDA block each; every thread adds its fixed subset of the block's
 * pixels in order, the block adds its threads in a fixed tree, and a second
 * kernel adds the block partials in a fixed tree (ts_reduce_partials_kernel).
 * The shape of the reduction depends only on N, C, H, W, so the same inputs
 * give the same bits on every run and every GPU. The only atomic is an integer
 * atomicMin (the first bad pixel), whose result does not depend on order. The
 * backward kernels give each pixel's C gradients to one thread: no races. */
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TS_OPS_WANT_REDUCE
#include "cuda_ops.cuh"

/* Pixels per reduction block, as the CPU's LOSS_BLOCK (the partition need not
 * match the CPU's for correctness; it keeps the two comparable), and pixels
 * per thread within it. */
#define LOSS_BLOCK 4096
#define LOSS_PPT (LOSS_BLOCK / TS_OPS_THREADS)

/* Dice sums per (image, class): Sp, St, I, as on the CPU. */

/* ---- the per-call device scratch --------------------------------------- */

/* One buffer per call, laid out as
 *   [0]                       the first bad pixel (unsigned long long; ~0 = none)
 *   [1, 1 + nout)             the reduced sums (double)
 *   [1 + nout, + npart)       the block partials (double)
 *   then ntail doubles        class weights (float) or the Dice gp, gi (double)
 * so the first-bad flag and the sums come back in one copy. */
typedef struct loss_scratch {
    unsigned long long *first_bad;
    double *out, *part, *tail;
} loss_scratch;

static ts_ops_scratch g_scratch;

static ts_status loss_scratch_get(size_t nout, size_t npart, size_t ntail, loss_scratch *s)
{
    void *buf = NULL;
    ts_status st = ts_ops_scratch_get(&g_scratch, (1 + nout + npart + ntail) * sizeof(double), &buf);
    if (st != TS_OK) return st;
    double *d = (double *)buf;
    s->first_bad = (unsigned long long *)buf;
    s->out = d + 1;
    s->part = s->out + nout;
    s->tail = s->part + npart;
    return TS_OK;
}

/* Copies the first-bad flag and the nout sums to host (host[0] is the flag's
 * bits, host[1..] the sums), waiting for the stream; then, if a label was bad,
 * the CPU's error for that pixel (ts_loss_label_error). */
static ts_status loss_fetch(const char *op, const ts_cuda_state *cs, const loss_scratch *s, size_t nout, double *host,
                            const ts_tensor *logits, const int32_t *target, int ignore_index)
{
    TS_CUDA_CHECK(cudaMemcpyAsync(host, s->first_bad, (1 + nout) * sizeof(double), cudaMemcpyDeviceToHost,
                                  cs->stream));
    TS_CUDA_CHECK(cudaStreamSynchronize(cs->stream));
    unsigned long long bad;
    memcpy(&bad, host, sizeof bad);
    if (bad == ULLONG_MAX) return TS_OK;
    int32_t y = 0;
    TS_CUDA_CHECK(cudaMemcpyAsync(&y, target + bad, sizeof y, cudaMemcpyDeviceToHost, cs->stream));
    TS_CUDA_CHECK(cudaStreamSynchronize(cs->stream));
    return ts_loss_label_error(op, logits, y, (size_t)bad, ignore_index);
}

/* Class weights (host) into the scratch tail (device), or NULL without. */
static ts_status loss_weights_to_device(const ts_cuda_state *cs, const float *cw, int C, const loss_scratch *s,
                                        const float **out)
{
    *out = NULL;
    if (!cw) return TS_OK;
    TS_CUDA_CHECK(cudaMemcpyAsync(s->tail, cw, (size_t)C * sizeof(float), cudaMemcpyHostToDevice, cs->stream));
    *out = (const float *)s->tail;
    return TS_OK;
}

/* Doubles of tail space for C float weights. */
static size_t weights_tail(int C) { return ((size_t)C * sizeof(float) + sizeof(double) - 1) / sizeof(double); }

/* ---- device helpers ----------------------------------------------------- */

/* The CPU's pixel_softmax without the stored q: the max, 1 / sum exp(z - max)
 * and (for the CE) log-sum-exp = max + log(sum), in double, over one pixel's
 * C logits hw apart. q_c is then exp((double)z_c - mx) * inv, the CPU's
 * expression, recomputed where needed rather than kept (C is not bounded). */
static __device__ __forceinline__ double pixel_stats(const float *z, size_t hw, int C, double *mx_out,
                                                     double *inv_out)
{
    double mx = z[0];
    for (int c = 1; c < C; c++)
        if (z[(size_t)c * hw] > mx) mx = z[(size_t)c * hw];
    double s = 0;
    for (int c = 0; c < C; c++) s += exp((double)z[(size_t)c * hw] - mx);
    *mx_out = mx;
    *inv_out = 1.0 / s;
    return mx + log(s);
}

/* A label that is neither ignored nor in [0, C): remember the smallest such
 * pixel (scan order n, h, w), as the CPU's serial scan reports the first. */
static __device__ __forceinline__ int label_bad(int32_t y, int C, unsigned long long *first_bad, size_t pixel)
{
    if (y >= 0 && y < C) return 0;
    atomicMin(first_bad, (unsigned long long)pixel);
    return 1;
}

/* Three block sums in one fixed tree (red: 3 x TS_OPS_THREADS doubles);
 * results valid in thread 0. */
static __device__ __forceinline__ void block_sum3(double *a, double *b, double *c, double (*red)[TS_OPS_THREADS])
{
    const unsigned t = threadIdx.x;
    red[0][t] = *a;
    red[1][t] = *b;
    red[2][t] = *c;
    __syncthreads();
    for (unsigned s = TS_OPS_THREADS / 2; s > 0; s >>= 1) {
        if (t < s) {
            red[0][t] += red[0][t + s];
            red[1][t] += red[1][t + s];
            red[2][t] += red[2][t + s];
        }
        __syncthreads();
    }
    *a = red[0][0];
    *b = red[1][0];
    *c = red[2][0];
    __syncthreads();
}

/* ---- label scan (the backward's weight sum) -------------------------------- */

/* One block per LOSS_BLOCK pixels of one image: part[b] = sum over its valid
 * pixels of w[y] (1 without weights), and the first bad pixel. */
static __global__ void label_scan_kernel(double *part, unsigned long long *first_bad, const int32_t *target, int C,
                                         size_t hw, size_t bpi, int ignore, const float *cw)
{
    __shared__ double red[TS_OPS_THREADS];
    const size_t b = blockIdx.x, n = b / bpi, i0 = b % bpi * LOSS_BLOCK;
    double ws = 0;
    for (int k = 0; k < LOSS_PPT; k++) {
        const size_t i = i0 + (size_t)k * TS_OPS_THREADS + threadIdx.x;
        if (i >= hw) break;
        const int32_t y = target[n * hw + i];
        if (y == ignore || label_bad(y, C, first_bad, n * hw + i)) continue;
        ws += cw ? (double)cw[y] : 1.0;
    }
    ws = ts_block_sum(ws, red);
    if (threadIdx.x == 0) part[b] = ws;
}

/* ---- cross-entropy ---------------------------------------------------- */

/* As torch.nn.CrossEntropyLoss(weight, ignore_index, reduction="mean"):
 *   loss = -sum_valid w[y] log softmax(z)[y] / sum_valid w[y].
 * When no pixel is valid the CPU returns 0 (PyTorch: NaN), and so do we.
 * One block per LOSS_BLOCK pixels: part[2b] = sum of -w[y] log softmax[y],
 * part[2b + 1] = sum of w[y] (the scan's weight sum, in the same pass). */
static __global__ void ce_forward_kernel(double *part, unsigned long long *first_bad, const float *logits,
                                         const int32_t *target, int C, size_t hw, size_t bpi, int ignore,
                                         const float *cw)
{
    __shared__ double red[3][TS_OPS_THREADS];
    const size_t b = blockIdx.x, n = b / bpi, i0 = b % bpi * LOSS_BLOCK;
    const float *zn = logits + n * (size_t)C * hw;
    double acc = 0, ws = 0, unused = 0;
    for (int k = 0; k < LOSS_PPT; k++) {
        const size_t i = i0 + (size_t)k * TS_OPS_THREADS + threadIdx.x;
        if (i >= hw) break;
        const int32_t y = target[n * hw + i];
        if (y == ignore || label_bad(y, C, first_bad, n * hw + i)) continue;
        double mx, inv;
        const double lse = pixel_stats(zn + i, hw, C, &mx, &inv);
        const double w = cw ? (double)cw[y] : 1.0;
        acc = __dsub_rn(acc, __dmul_rn(w, (double)zn[i + (size_t)y * hw] - lse));
        ws += w;
    }
    block_sum3(&acc, &ws, &unused, red);
    if (threadIdx.x == 0) {
        part[2 * b] = acc;
        part[2 * b + 1] = ws;
    }
}

extern "C" ts_status ts_cuda_cross_entropy_forward(ts_ctx *ctx, double *loss, const ts_tensor *logits,
                                                   const int32_t *target, const ts_ce_params *p)
{
    (void)ctx;
    const char *op = "cross_entropy_forward";
    ts_status st = ts_loss_check(op, logits, target, p, loss);
    if (st) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state_host(op, &cs))) return st;
    const int N = logits->n, C = logits->c;
    const size_t hw = (size_t)logits->h * logits->w;
    const size_t bpi = (hw + LOSS_BLOCK - 1) / LOSS_BLOCK, nblocks = (size_t)N * bpi;
    loss_scratch s;
    if ((st = loss_scratch_get(2, 2 * nblocks, weights_tail(C), &s))) return st;
    const float *cw;
    if ((st = loss_weights_to_device(cs, p->class_weights, C, &s, &cw))) return st;
    TS_CUDA_CHECK(cudaMemsetAsync(s.first_bad, 0xff, sizeof *s.first_bad, cs->stream));
    ce_forward_kernel<<<(unsigned)nblocks, TS_OPS_THREADS, 0, cs->stream>>>(s.part, s.first_bad, logits->data, target,
                                                                            C, hw, bpi, p->ignore_index, cw);
    TS_CUDA_LAUNCH_CHECK();
    ts_reduce_partials_kernel<<<2, TS_OPS_THREADS, 0, cs->stream>>>(s.part, s.out, nblocks, 2);
    TS_CUDA_LAUNCH_CHECK();
    double host[3];
    if ((st = loss_fetch(op, cs, &s, 2, host, logits, target, p->ignore_index))) return st;
    const double total = host[1], wsum = host[2];
    *loss = 0;
    if (wsum == 0) return TS_OK;
    *loss = total / wsum;
    return TS_OK;
}

/* dlogits += dloss * w[y] (softmax(z) - onehot(y)) / sum_valid w[y]: one
 * thread per pixel, writing only that pixel's C gradients. */
static __global__ void ce_backward_kernel(float *dlogits, const float *logits, const int32_t *target, int C,
                                          size_t hw, size_t npix, int ignore, const float *cw, double scale)
{
    for (size_t pi = (size_t)blockIdx.x * blockDim.x + threadIdx.x; pi < npix; pi += (size_t)gridDim.x * blockDim.x) {
        const int32_t y = target[pi];
        if (y == ignore || y < 0 || y >= C) continue; /* bad labels were refused before launch */
        const size_t n = pi / hw, i = pi % hw;
        const float *z = logits + n * (size_t)C * hw + i;
        float *dz = dlogits + n * (size_t)C * hw + i;
        double mx, inv;
        pixel_stats(z, hw, C, &mx, &inv);
        const double sc = __dmul_rn(scale, cw ? (double)cw[y] : 1.0);
        for (int c = 0; c < C; c++) {
            const double q = __dmul_rn(exp((double)z[(size_t)c * hw] - mx), inv);
            dz[(size_t)c * hw] += (float)__dmul_rn(sc, q - (c == y ? 1.0 : 0.0));
        }
    }
}

extern "C" ts_status ts_cuda_cross_entropy_backward(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits,
                                                    const int32_t *target, const ts_ce_params *p, float dloss)
{
    (void)ctx;
    const char *op = "cross_entropy_backward";
    ts_status st = ts_loss_check(op, logits, target, p, dlogits);
    if (st || (st = ts_loss_dlogits_check(op, dlogits, logits))) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state_host(op, &cs))) return st;
    const int N = logits->n, C = logits->c;
    const size_t hw = (size_t)logits->h * logits->w, npix = (size_t)N * hw;
    const size_t bpi = (hw + LOSS_BLOCK - 1) / LOSS_BLOCK, nblocks = (size_t)N * bpi;
    loss_scratch s;
    if ((st = loss_scratch_get(1, nblocks, weights_tail(C), &s))) return st;
    const float *cw;
    if ((st = loss_weights_to_device(cs, p->class_weights, C, &s, &cw))) return st;
    TS_CUDA_CHECK(cudaMemsetAsync(s.first_bad, 0xff, sizeof *s.first_bad, cs->stream));
    label_scan_kernel<<<(unsigned)nblocks, TS_OPS_THREADS, 0, cs->stream>>>(s.part, s.first_bad, target, C, hw, bpi,
                                                                            p->ignore_index, cw);
    TS_CUDA_LAUNCH_CHECK();
    ts_reduce_partials_kernel<<<1, TS_OPS_THREADS, 0, cs->stream>>>(s.part, s.out, nblocks, 1);
    TS_CUDA_LAUNCH_CHECK();
    double host[2];
    if ((st = loss_fetch(op, cs, &s, 1, host, logits, target, p->ignore_index))) return st;
    const double wsum = host[1];
    if (wsum == 0) return TS_OK; /* no valid pixel: the forward returned the constant 0 */
    const double scale = (double)dloss / wsum;
    ce_backward_kernel<<<ts_ops_grid(cs, npix), TS_OPS_THREADS, 0, cs->stream>>>(
        dlogits->data, logits->data, target, C, hw, npix, p->ignore_index, cw, scale);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- Dice ------------------------------------------------------------- */

/* Per image n and class c, over the valid pixels of the image: Sp = sum p,
 * St = sum t, I = sum p t. Ignored pixels are left out of all three (SMP's
 * "p *= m, t *= m"). One block per LOSS_BLOCK pixels of one image; each thread
 * first keeps the softmax max and 1/sum of its LOSS_PPT pixels (registers:
 * the loop is unrolled), then for each class adds its pixels' q_c, and the
 * block's three sums go to part[(b * C + c) * TS_DICE_SUMS + {P, T, I}]. */
static __global__ void dice_sums_kernel(double *part, unsigned long long *first_bad, const float *logits,
                                        const int32_t *target, int C, size_t hw, size_t bpi, int ignore)
{
    __shared__ double red[3][TS_OPS_THREADS];
    const size_t b = blockIdx.x, n = b / bpi, i0 = b % bpi * LOSS_BLOCK;
    const float *zn = logits + n * (size_t)C * hw;
    double mx[LOSS_PPT], inv[LOSS_PPT];
    int yk[LOSS_PPT]; /* the label, or -1 where the pixel does not count */
#pragma unroll
    for (int k = 0; k < LOSS_PPT; k++) {
        const size_t i = i0 + (size_t)k * TS_OPS_THREADS + threadIdx.x;
        yk[k] = -1;
        mx[k] = 0;
        inv[k] = 0;
        if (i >= hw) continue;
        const int32_t y = target[n * hw + i];
        if (y == ignore || label_bad(y, C, first_bad, n * hw + i)) continue;
        pixel_stats(zn + i, hw, C, &mx[k], &inv[k]);
        yk[k] = y;
    }
    double *acc = part + b * (size_t)C * TS_DICE_SUMS;
    for (int c = 0; c < C; c++) {
        const float *zc = zn + (size_t)c * hw;
        double sp = 0, stt = 0, si = 0;
#pragma unroll
        for (int k = 0; k < LOSS_PPT; k++) {
            if (yk[k] < 0) continue;
            const size_t i = i0 + (size_t)k * TS_OPS_THREADS + threadIdx.x;
            const double q = __dmul_rn(exp((double)zc[i] - mx[k]), inv[k]);
            sp += q;
            if (yk[k] == c) { /* p t is p at the true class, 0 elsewhere */
                stt += 1.0;
                si += q;
            }
        }
        block_sum3(&sp, &stt, &si, red);
        if (threadIdx.x == 0) {
            acc[c * TS_DICE_SUMS + TS_DICE_SUM_P] = sp;
            acc[c * TS_DICE_SUMS + TS_DICE_SUM_T] = stt;
            acc[c * TS_DICE_SUMS + TS_DICE_SUM_I] = si;
        }
    }
}


/* The per-image sums on the device, reduced and copied to host (sums: N*C*TS_DICE_SUMS
 * doubles, the CPU's layout), with the label check. host is 1 + N*C*TS_DICE_SUMS
 * doubles; sums = host + 1. The scratch keeps ntail doubles after the
 * partials for the caller. */
static ts_status dice_sums(const char *op, const ts_cuda_state *cs, const ts_tensor *logits, const int32_t *target,
                           int ignore, size_t ntail, loss_scratch *s, double *host)
{
    const int N = logits->n, C = logits->c;
    const size_t hw = (size_t)logits->h * logits->w;
    const size_t bpi = (hw + LOSS_BLOCK - 1) / LOSS_BLOCK, nblocks = (size_t)N * bpi, per = (size_t)C * TS_DICE_SUMS;
    ts_status st = loss_scratch_get((size_t)N * per, nblocks * per, ntail, s);
    if (st) return st;
    TS_CUDA_CHECK(cudaMemsetAsync(s->first_bad, 0xff, sizeof *s->first_bad, cs->stream));
    dice_sums_kernel<<<(unsigned)nblocks, TS_OPS_THREADS, 0, cs->stream>>>(s->part, s->first_bad, logits->data,
                                                                           target, C, hw, bpi, ignore);
    TS_CUDA_LAUNCH_CHECK();
    ts_reduce_partials_kernel<<<(unsigned)((size_t)N * per), TS_OPS_THREADS, 0, cs->stream>>>(s->part, s->out, bpi,
                                                                                              per);
    TS_CUDA_LAUNCH_CHECK();
    return loss_fetch(op, cs, s, (size_t)N * per, host, logits, target, ignore);
}

/* TS_DICE_SMP: smp.losses.DiceLoss("multiclass", ignore_index, smooth, eps,
 * log_loss, class_weights), SMP >= 0.4 (spec section 6).
 * TS_DICE_PER_IMAGE: the tutorial's per-image dice, with the CPU's
 * ignore_index extension (ignored pixels left out of sum p and sum t). */
extern "C" ts_status ts_cuda_dice_forward(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                                          const ts_dice_params *p)
{
    (void)ctx;
    const char *op = "dice_forward";
    ts_status st = ts_loss_check(op, logits, target, p, loss);
    if (st || (st = ts_dice_params_check(op, p, logits->c))) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state_host(op, &cs))) return st;
    const int N = logits->n, C = logits->c;
    double *host = (double *)malloc((1 + (size_t)N * C * TS_DICE_SUMS) * sizeof *host);
    if (!host) return ts_error(TS_ERR_NOMEM, "%s: out of memory", op);
    loss_scratch s;
    if ((st = dice_sums(op, cs, logits, target, p->ignore_index, 0, &s, host)) == TS_OK)
        *loss = ts_dice_reduce(p, N, C, host + 1, 0, NULL, NULL);
    free(host);
    return st;
}

/* Through the softmax Jacobian, per pixel: dz_c += p_c (g_c - sum_k p_k g_k)
 * with g_c = gp[n, c] + [c == y] gi[n, c]. One thread per pixel; the C q_c are
 * recomputed in the second pass (the same expression, so the same value). */
static __global__ void dice_backward_kernel(float *dlogits, const float *logits, const int32_t *target, int C,
                                            size_t hw, size_t npix, int ignore, const double *gp, const double *gi)
{
    for (size_t pi = (size_t)blockIdx.x * blockDim.x + threadIdx.x; pi < npix; pi += (size_t)gridDim.x * blockDim.x) {
        const int32_t y = target[pi];
        if (y == ignore || y < 0 || y >= C) continue; /* p was masked to 0 there: no gradient */
        const size_t n = pi / hw, i = pi % hw;
        const float *z = logits + n * (size_t)C * hw + i;
        float *dz = dlogits + n * (size_t)C * hw + i;
        const double *gpn = gp + n * (size_t)C, *gin = gi + n * (size_t)C;
        double mx, inv;
        pixel_stats(z, hw, C, &mx, &inv);
        double pg = 0;
        for (int c = 0; c < C; c++) {
            const double q = __dmul_rn(exp((double)z[(size_t)c * hw] - mx), inv);
            const double g = gpn[c] + (c == y ? gin[c] : 0.0);
            pg = __dadd_rn(pg, __dmul_rn(q, g));
        }
        for (int c = 0; c < C; c++) {
            const double q = __dmul_rn(exp((double)z[(size_t)c * hw] - mx), inv);
            const double g = gpn[c] + (c == y ? gin[c] : 0.0);
            dz[(size_t)c * hw] += (float)__dmul_rn(q, g - pg);
        }
    }
}

extern "C" ts_status ts_cuda_dice_backward(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits,
                                           const int32_t *target, const ts_dice_params *p, float dloss)
{
    (void)ctx;
    const char *op = "dice_backward";
    ts_status st = ts_loss_check(op, logits, target, p, dlogits);
    if (st || (st = ts_loss_dlogits_check(op, dlogits, logits)) || (st = ts_dice_params_check(op, p, logits->c)))
        return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state_host(op, &cs))) return st;
    const int N = logits->n, C = logits->c;
    const size_t nc = (size_t)N * C;
    /* host: the flag and the sums, then gp and gi (the CPU's layout). */
    double *host = (double *)malloc((1 + nc * (TS_DICE_SUMS + 2)) * sizeof *host);
    if (!host) return ts_error(TS_ERR_NOMEM, "%s: out of memory", op);
    double *sums = host + 1, *gp = sums + nc * TS_DICE_SUMS, *gi = gp + nc;
    loss_scratch s;
    if ((st = dice_sums(op, cs, logits, target, p->ignore_index, 2 * nc, &s, host))) {
        free(host);
        return st;
    }
    ts_dice_reduce(p, N, C, sums, dloss, gp, gi);
    /* gp and gi (2 N C doubles, adjacent on the host) into the scratch tail.
     * The stream is idle (dice_sums waited), so waiting for this small copy
     * before freeing its pageable source costs only the copy. */
    double *gp_dev = s.tail, *gi_dev = s.tail + nc;
    cudaError_t e = cudaMemcpyAsync(gp_dev, gp, 2 * nc * sizeof(double), cudaMemcpyHostToDevice, cs->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(cs->stream);
    free(host);
    if (e != cudaSuccess)
        return ts_cuda_error(e, "cudaMemcpyAsync(Dice gradients to device) + cudaStreamSynchronize", __FILE__,
                             __LINE__);
    const size_t hw = (size_t)logits->h * logits->w, npix = (size_t)N * hw;
    dice_backward_kernel<<<ts_ops_grid(cs, npix), TS_OPS_THREADS, 0, cs->stream>>>(
        dlogits->data, logits->data, target, C, hw, npix, p->ignore_index, gp_dev, gi_dev);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}
