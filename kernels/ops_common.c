/* Backend-independent helpers of backend.h: the op context, output sizes and
 * the host half of AdamW. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

ts_status ts_ctx_init(ts_ctx *ctx, const ts_backend *backend)
{
    memset(ctx, 0, sizeof *ctx);
    ctx->backend = backend;
    return TS_OK;
}

void ts_ctx_free(ts_ctx *ctx)
{
    ts_aligned_free(ctx->scratch);
    memset(ctx, 0, sizeof *ctx);
}

ts_status ts_ctx_scratch(ts_ctx *ctx, size_t bytes, void **out)
{
    if (bytes > ctx->scratch_bytes) {
        /* Grow only: the conv column buffer is bounded, so this settles after
         * the largest layer's first call. */
        void *p = ts_aligned_alloc(bytes);
        if (!p) return ts_error(TS_ERR_NOMEM, "scratch: out of memory allocating %.1f MiB", (double)bytes / (1 << 20));
        ts_aligned_free(ctx->scratch);
        ctx->scratch = p;
        ctx->scratch_bytes = bytes;
    }
    *out = ctx->scratch;
    return TS_OK;
}

int ts_conv_out_size(int in, int kernel, int stride, int pad)
{
    if (stride < 1 || in + 2 * pad < kernel) return 0;
    return (in + 2 * pad - kernel) / stride + 1;
}

ts_status ts_adamw_prepare(ts_adamw_step *s, const ts_adamw_hparams *h, long t)
{
    if (t < 1) return ts_error(TS_ERR_INVALID_ARG, "adamw: step number must be >= 1, got %ld", t);
    if (!(h->lr >= 0) || !(h->eps >= 0) || !(h->weight_decay >= 0))
        return ts_error(TS_ERR_INVALID_ARG, "adamw: lr (%g), eps (%g) and weight_decay (%g) must be >= 0", h->lr,
                        h->eps, h->weight_decay);
    if (!(h->beta1 >= 0 && h->beta1 < 1) || !(h->beta2 >= 0 && h->beta2 < 1))
        return ts_error(TS_ERR_INVALID_ARG, "adamw: betas must be in [0, 1), got (%g, %g)", h->beta1, h->beta2);
    /* torch/optim/adam.py, single-tensor path: these are Python floats
     * (double); the kernels then apply them in float32. */
    double bc1 = 1.0 - pow(h->beta1, (double)t);
    double bc2 = 1.0 - pow(h->beta2, (double)t);
    s->decay = (float)(1.0 - h->lr * h->weight_decay);
    s->beta1_weight = (float)(1.0 - h->beta1);
    s->beta2 = (float)h->beta2;
    s->one_minus_beta2 = (float)(1.0 - h->beta2);
    s->bc2_sqrt = (float)sqrt(bc2);
    s->eps = (float)h->eps;
    s->neg_step_size = (float)(-(h->lr / bc1));
    return TS_OK;
}

static int pool_tensor_ok(const ts_tensor *t) { return t && t->data && t->n > 0 && t->c > 0 && t->h > 0 && t->w > 0; }

/* Parameter and size checks shared by forward and backward, with PyTorch's
 * rules (max_pool2d_with_indices shape checks in Pool.h): kernel and stride
 * positive, 0 <= pad <= kernel / 2, output at least 1x1. Both backends' max-pool
 * ops call it, so they refuse the same inputs with the same messages. */
ts_status ts_pool2d_check(const char *op, const ts_tensor *in, const char *inname, const ts_tensor *out,
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
