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

static int pool_tensor_ok(const ts_tensor *t) { return t && t->data && t->n > 0 && t->c > 0 && t->h > 0 && t->w > 0; }

/* Parameter and size checks shared by forward and backward, with PyTorch's
 * rules (max_pool2d_with_indices shape checks in Pool.h): kernel and stride
 * positive, 0 <= pad <= kernel / 2, output at least 1x1. in is the pooled
 * input ([N,C,H,W]) and out the pooled output; both must agree on N and C and
 * out must have the computed size. */
static ts_status pool_check(const char *op, const ts_tensor *in, const char *inname, const ts_tensor *out,
                            const char *outname, const ts_pool2d_params *p)
{
    if (!pool_tensor_ok(in) || !pool_tensor_ok(out) || !p)
        return ts_error(TS_ERR_INVALID_ARG, "%s: %s, %s and params must be non-NULL, with dimensions >= 1", op, inname,
                        outname);
    if (p->kernel_h < 1 || p->kernel_w < 1 || p->stride_h < 1 || p->stride_w < 1)
        return ts_error(TS_ERR_INVALID_ARG, "%s: kernel (%d,%d) and stride (%d,%d) must be >= 1", op, p->kernel_h,
                        p->kernel_w, p->stride_h, p->stride_w);
    if (p->pad_h < 0 || p->pad_w < 0 || p->pad_h > p->kernel_h / 2 || p->pad_w > p->kernel_w / 2)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: pad should be at most half of kernel size (PyTorch's rule), but got pad=(%d,%d), "
                        "kernel_size=(%d,%d)",
                        op, p->pad_h, p->pad_w, p->kernel_h, p->kernel_w);
    /* Arg-max indices are int32 within one plane. */
    if ((int64_t)in->h * in->w > INT32_MAX) {
        char s[TS_SHAPE_STR];
        return ts_error(TS_ERR_INVALID_ARG, "%s: %s plane %s is too large for int32 indices", op, inname,
                        ts_shape_str(in, s));
    }
    int oh = ts_conv_out_size(in->h, p->kernel_h, p->stride_h, p->pad_h);
    int ow = ts_conv_out_size(in->w, p->kernel_w, p->stride_w, p->pad_w);
    char si[TS_SHAPE_STR], so[TS_SHAPE_STR];
    if (oh < 1 || ow < 1)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: %s %s is too small for kernel (%d,%d), stride (%d,%d), pad (%d,%d): output size would be "
                        "%dx%d",
                        op, inname, ts_shape_str(in, si), p->kernel_h, p->kernel_w, p->stride_h, p->stride_w, p->pad_h,
                        p->pad_w, oh, ow);
    if (out->n != in->n || out->c != in->c || out->h != oh || out->w != ow)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: %s shape %s does not match %s shape %s pooled with kernel (%d,%d), stride (%d,%d), pad "
                        "(%d,%d): expected [%d,%d,%d,%d]",
                        op, outname, ts_shape_str(out, so), inname, ts_shape_str(in, si), p->kernel_h, p->kernel_w,
                        p->stride_h, p->stride_w, p->pad_h, p->pad_w, in->n, in->c, oh, ow);
    return TS_OK;
}

ts_status ts_cpu_maxpool2d_forward(ts_ctx *ctx, ts_tensor *y, int32_t *index, const ts_tensor *x,
                                   const ts_pool2d_params *p)
{
    static const char op[] = "maxpool2d_forward";
    (void)ctx;
    ts_status st = pool_check(op, x, "x", y, "y", p);
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
    static const char op[] = "maxpool2d_backward";
    (void)ctx;
    ts_status st = pool_check(op, dx, "dx", dy, "dy", p);
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
