/* 2-D max pooling on the CPU (torch.nn.MaxPool2d, dilation 1, ceil_mode
 * False), forward with arg-max indices and the scatter backward.
 *
 * The window, tie and NaN rules are those of cpu_max_pool in
 * aten/src/ATen/native/cpu/MaxPoolKernel.cpp (shared/specs/smp-unet.md
 * section 8.2): the window is clipped to the input (padding is never a
 * candidate), the arg-max starts at the clipped window's first element, and
 * a scan over rows then columns replaces it when val > max || isnan(val), so
 * the first of equal values wins and a NaN always wins. Each (n, c) plane is
 * independent, which is the OpenMP split in both directions: in backward
 * every index points into its own plane, so no two threads touch one dx
 * element and each plane accumulates in PyTorch's (oh, ow) order. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "cpu.h"

ts_status ts_cpu_maxpool2d_forward(ts_ctx *ctx, ts_tensor *y, int32_t *index, const ts_tensor *x,
                                   const ts_pool2d_params *p)
{
    TS_CPU_HALF_DISPATCH(x, ts_cpu_half_maxpool2d_forward(ctx, y, index, x, p));
    static const char op[] = "maxpool2d_forward";
    (void)ctx;
    ts_status st = ts_pool2d_check(op, x, "x", y, "y", p);
    if (st != TS_OK) return st;
    if (!index) return ts_error(TS_ERR_INVALID_ARG, "%s: index must not be NULL", op);

    const int H = x->h, W = x->w, OH = y->h, OW = y->w;
    const int kh = p->kernel_h, kw = p->kernel_w, sh = p->stride_h, sw = p->stride_w;
    const int ph = p->pad_h, pw = p->pad_w;
    const size_t in_plane = (size_t)H * W, out_plane = (size_t)OH * OW;
    const ptrdiff_t planes = (ptrdiff_t)x->n * x->c;

#pragma omp parallel for schedule(static)
    for (ptrdiff_t pl = 0; pl < planes; pl++) {
        const float *xp = x->data + (size_t)pl * in_plane;
        float *yp = y->data + (size_t)pl * out_plane;
        int32_t *ip = index + (size_t)pl * out_plane;
        for (int oh = 0; oh < OH; oh++) {
            /* Clip the window to the input: ih1 = min(ih0 + k, H), then
             * ih0 = max(ih0, 0). pad <= k/2 keeps it non-empty. */
            int ih0 = oh * sh - ph;
            int ih1 = ih0 + kh < H ? ih0 + kh : H;
            if (ih0 < 0) ih0 = 0;
            for (int ow = 0; ow < OW; ow++) {
                int iw0 = ow * sw - pw;
                int iw1 = iw0 + kw < W ? iw0 + kw : W;
                if (iw0 < 0) iw0 = 0;
                int32_t maxindex = ih0 * W + iw0;
                float maxval = -INFINITY;
                for (int ih = ih0; ih < ih1; ih++) {
                    for (int iw = iw0; iw < iw1; iw++) {
                        float val = xp[ih * W + iw];
                        if (val > maxval || isnan(val)) {
                            maxval = val;
                            maxindex = ih * W + iw;
                        }
                    }
                }
                yp[oh * OW + ow] = maxval;
                ip[oh * OW + ow] = maxindex;
            }
        }
    }
    return TS_OK;
}

ts_status ts_cpu_maxpool2d_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const int32_t *index,
                                    const ts_pool2d_params *p)
{
    TS_CPU_HALF_DISPATCH(dy, ts_cpu_half_maxpool2d_backward(ctx, dx, dy, index, p));
    static const char op[] = "maxpool2d_backward";
    (void)ctx;
    ts_status st = ts_pool2d_check(op, dx, "dx", dy, "dy", p);
    if (st != TS_OK) return st;
    if (!index) return ts_error(TS_ERR_INVALID_ARG, "%s: index must not be NULL", op);

    const int32_t in_plane = dx->h * dx->w;
    const size_t out_plane = (size_t)dy->h * dy->w;
    const ptrdiff_t planes = (ptrdiff_t)dx->n * dx->c;
    int bad = 0;

#pragma omp parallel for schedule(static)
    for (ptrdiff_t pl = 0; pl < planes; pl++) {
        float *dp = dx->data + (size_t)pl * (size_t)in_plane;
        const float *gp = dy->data + (size_t)pl * out_plane;
        const int32_t *ip = index + (size_t)pl * out_plane;
        /* cpu_max_pool_backward: grad_input[index] += grad_output, in
         * output order; ties were settled in forward, so the whole gradient
         * goes to one element. An index outside the plane would be a write
         * out of bounds: skip it and report. */
        for (size_t o = 0; o < out_plane; o++) {
            int32_t k = ip[o];
            if (k < 0 || k >= in_plane) {
#pragma omp atomic write
                bad = 1;
                continue;
            }
            dp[k] += gp[o];
        }
    }
    if (bad)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: index holds values outside [0, %d), the %dx%d input plane; pass the index written by "
                        "maxpool2d_forward for this input",
                        op, (int)in_plane, dx->h, dx->w);
    return TS_OK;
}
