/* Nearest-neighbour resize on the CPU (F.interpolate(mode="nearest") to a
 * given size), forward gather and backward scatter-add.
 *
 * The source index per axis is PyTorch's nearest_idx
 * (aten/src/ATen/native/UpSample.h; shared/specs/smp-unet.md section 8.1),
 * computed once per axis into a table, since it depends only on the output
 * coordinate. (n, c) planes are independent and are the OpenMP split; within
 * a plane backward adds in PyTorch's (oh, ow) order, so float sums match
 * cpu_upsample_nearest_backward. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "cpu.h"

/* nearest_idx(dst, in, out, no scale): out == in copies; out == 2 in takes
 * dst >> 1 (the exact 2x shortcut); otherwise the legacy (not centre-
 * aligned) rule min(floor(dst * s), in - 1) with s = (float)in / out in
 * float32 (compute_scales_value<float>) and the product in float. */
static void nearest_table(int *idx, int in, int out)
{
    if (out == in) {
        for (int d = 0; d < out; d++) idx[d] = d;
    } else if (out == 2 * in) {
        for (int d = 0; d < out; d++) idx[d] = d >> 1;
    } else {
        const float s = (float)in / (float)out;
        for (int d = 0; d < out; d++) {
            int src = (int)floorf((float)d * s);
            idx[d] = src < in - 1 ? src : in - 1;
        }
    }
}

/* small is the tensor at the input resolution, big the one at the output
 * resolution; they must share N and C (ts_upsample_check, shared with the
 * CUDA twin). On success *tables holds the row table (big->h entries)
 * followed by the column table (big->w entries); the caller frees it. */
static ts_status up_prepare(const char *op, const ts_tensor *big, const char *bigname, const ts_tensor *small,
                            const char *smallname, int **tables)
{
    *tables = NULL;
    ts_status st = ts_upsample_check(op, big, bigname, small, smallname);
    if (st != TS_OK) return st;
    int *t = malloc(((size_t)big->h + (size_t)big->w) * sizeof *t);
    if (!t) return ts_error(TS_ERR_NOMEM, "%s: out of memory for the %d + %d index tables", op, big->h, big->w);
    nearest_table(t, small->h, big->h);
    nearest_table(t + big->h, small->w, big->w);
    *tables = t;
    return TS_OK;
}

ts_status ts_cpu_upsample_nearest_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    TS_CPU_HALF_DISPATCH(x, ts_cpu_half_upsample_nearest_forward(ctx, y, x));
    (void)ctx;
    int *tab;
    ts_status st = up_prepare("upsample_nearest_forward", y, "y", x, "x", &tab);
    if (st != TS_OK) return st;
    const int IW = x->w, OH = y->h, OW = y->w;
    const int *ih = tab, *iw = tab + OH;
    const size_t in_plane = (size_t)x->h * IW, out_plane = (size_t)OH * OW;
    const ptrdiff_t planes = (ptrdiff_t)x->n * x->c;

#pragma omp parallel for schedule(static)
    for (ptrdiff_t pl = 0; pl < planes; pl++) {
        const float *xp = x->data + (size_t)pl * in_plane;
        float *yp = y->data + (size_t)pl * out_plane;
        for (int oh = 0; oh < OH; oh++) {
            const float *row = xp + (size_t)ih[oh] * IW;
            float *out = yp + (size_t)oh * OW;
            for (int ow = 0; ow < OW; ow++) out[ow] = row[iw[ow]];
        }
    }
    free(tab);
    return TS_OK;
}

ts_status ts_cpu_upsample_nearest_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy)
{
    TS_CPU_HALF_DISPATCH(dy, ts_cpu_half_upsample_nearest_backward(ctx, dx, dy));
    (void)ctx;
    int *tab;
    ts_status st = up_prepare("upsample_nearest_backward", dy, "dy", dx, "dx", &tab);
    if (st != TS_OK) return st;
    const int IW = dx->w, OH = dy->h, OW = dy->w;
    const int *ih = tab, *iw = tab + OH;
    const size_t in_plane = (size_t)dx->h * IW, out_plane = (size_t)OH * OW;
    const ptrdiff_t planes = (ptrdiff_t)dx->n * dx->c;

#pragma omp parallel for schedule(static)
    for (ptrdiff_t pl = 0; pl < planes; pl++) {
        float *dp = dx->data + (size_t)pl * in_plane;
        const float *gp = dy->data + (size_t)pl * out_plane;
        /* grad_in[ih(oh), iw(ow)] += grad_out[oh, ow], oh then ow
         * increasing; added onto the caller's dx (our accumulate rule)
         * where PyTorch starts from zero. */
        for (int oh = 0; oh < OH; oh++) {
            float *row = dp + (size_t)ih[oh] * IW;
            const float *g = gp + (size_t)oh * OW;
            for (int ow = 0; ow < OW; ow++) row[iw[ow]] += g[ow];
        }
    }
    free(tab);
    return TS_OK;
}
