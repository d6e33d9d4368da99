/* Backend-independent helpers of backend.h: the op context, output sizes, the
 * host half of AdamW, and the argument and shape checks that both backends'
 * ops call, so the CPU and CUDA twins refuse the same inputs with the same
 * messages. */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
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

/* ---- argument checks shared by the backends ----------------------------- */

/* Non-NULL, with data and every dimension >= 1: the tensor rule of every op. */
static int tensor_ok(const ts_tensor *t) { return t && t->data && t->n > 0 && t->c > 0 && t->h > 0 && t->w > 0; }

static int dtype_known(ts_dtype t) { return t == TS_F32 || t == TS_BF16 || t == TS_F16; }

ts_status ts_dtype_check(const char *op, const char *an, const ts_tensor *a, const char *bn, const ts_tensor *b)
{
    if (a && b && a->dtype == b->dtype && dtype_known(a->dtype)) return TS_OK;
    if (!a || !b) return ts_error(TS_ERR_INVALID_ARG, "%s: %s and %s must not be NULL", op, an, bn);
    char sa[TS_SHAPE_STR], sb[TS_SHAPE_STR];
    if (!dtype_known(a->dtype) || !dtype_known(b->dtype))
        return ts_error(TS_ERR_INVALID_ARG, "%s: %s %s or %s %s has an unknown dtype (%d, %d)", op, an,
                        ts_shape_str(a, sa), bn, ts_shape_str(b, sb), (int)a->dtype, (int)b->dtype);
    return ts_error(TS_ERR_INVALID_ARG,
                    "%s: %s %s is %s but %s %s is %s: the tensors of one op share a dtype (cast with convert)", op, an,
                    ts_shape_str(a, sa), ts_dtype_name(a->dtype), bn, ts_shape_str(b, sb), ts_dtype_name(b->dtype));
}

/* Byte ranges [p, p + bytes) that share at least one byte. */
static int overlap(const void *p, size_t pb, const void *q, size_t qb)
{
    const unsigned char *a = p, *b = q;
    return a < b + qb && b < a + pb;
}

ts_status ts_convert_check(const ts_tensor *y, const ts_tensor *x)
{
    if (!tensor_ok(y) || !tensor_ok(x))
        return ts_error(TS_ERR_INVALID_ARG, "convert: y and x must be non-NULL tensors with dimensions >= 1");
    char sy[TS_SHAPE_STR], sx[TS_SHAPE_STR];
    if (!dtype_known(y->dtype) || !dtype_known(x->dtype))
        return ts_error(TS_ERR_INVALID_ARG, "convert: y %s or x %s has an unknown dtype (%d, %d)", ts_shape_str(y, sy),
                        ts_shape_str(x, sx), (int)y->dtype, (int)x->dtype);
    if (!ts_tensor_same_shape(y, x))
        return ts_error(TS_ERR_INVALID_ARG, "convert: y shape %s does not match x shape %s", ts_shape_str(y, sy),
                        ts_shape_str(x, sx));
    /* Element i of x and of y sit at different places when the layouts
     * differ, so any overlap but the exact same tensor would read what was
     * just written. */
    int same = y->data == x->data && y->dtype == x->dtype;
    if (!same && overlap(y->data, ts_tensor_bytes(y), x->data, ts_tensor_bytes(x)))
        return ts_error(TS_ERR_INVALID_ARG, "convert: y %s and x %s overlap in memory", ts_shape_str(y, sy),
                        ts_shape_str(x, sx));
    return TS_OK;
}

/* Parameter and size checks shared by forward and backward, with PyTorch's
 * rules (max_pool2d_with_indices shape checks in Pool.h): kernel and stride
 * positive, 0 <= pad <= kernel / 2, output at least 1x1. Both backends' max-pool
 * ops call it, so they refuse the same inputs with the same messages. */
ts_status ts_pool2d_check(const char *op, const ts_tensor *in, const char *inname, const ts_tensor *out,
                            const char *outname, const ts_pool2d_params *p)
{
    if (!tensor_ok(in) || !tensor_ok(out) || !p)
        return ts_error(TS_ERR_INVALID_ARG, "%s: %s, %s and params must be non-NULL, with dimensions >= 1", op, inname,
                        outname);
    ts_status dst = ts_dtype_check(op, outname, out, inname, in);
    if (dst != TS_OK) return dst;
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

/* ---- conv2d ---------------------------------------------------------------- */

#if defined(__GNUC__)
__attribute__((format(printf, 9, 0)))
#endif
static ts_status conv2d_verror(const char *op, const ts_tensor *x, const char *xn, const ts_tensor *w, const char *wn,
                               const ts_tensor *y, const char *yn, const ts_conv2d_params *p, const char *fmt,
                               va_list ap)
{
    char sx[TS_SHAPE_STR] = "(null)", sw[TS_SHAPE_STR] = "(null)", sy[TS_SHAPE_STR] = "(null)";
    if (x) ts_shape_str(x, sx);
    if (w) ts_shape_str(w, sw);
    if (y) ts_shape_str(y, sy);
    char why[256];
    vsnprintf(why, sizeof why, fmt, ap);
    return ts_error(TS_ERR_INVALID_ARG, "%s: %s %s, %s %s, %s %s, stride (%d,%d), pad (%d,%d): %s", op, xn, sx, wn, sw,
                    yn, sy, p ? p->stride_h : 0, p ? p->stride_w : 0, p ? p->pad_h : 0, p ? p->pad_w : 0, why);
}

ts_status ts_conv2d_error(const char *op, const ts_tensor *x, const char *xn, const ts_tensor *w, const char *wn,
                          const ts_tensor *y, const char *yn, const ts_conv2d_params *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ts_status st = conv2d_verror(op, x, xn, w, wn, y, yn, p, fmt, ap);
    va_end(ap);
    return st;
}

ts_status ts_conv2d_check(const char *op, const ts_tensor *x, const char *xn, const ts_tensor *w, const char *wn,
                          const ts_tensor *y, const char *yn, const ts_conv2d_params *p)
{
#define CONV_FAIL(...) return ts_conv2d_error(op, x, xn, w, wn, y, yn, p, __VA_ARGS__)
    if (!p) CONV_FAIL("params are NULL");
    if (!tensor_ok(x) || !tensor_ok(w) || !tensor_ok(y))
        CONV_FAIL("a tensor is NULL, has no data or has a dimension < 1");
    if (x->dtype != w->dtype || x->dtype != y->dtype || !dtype_known(x->dtype))
        CONV_FAIL("%s is %s, %s %s and %s %s: the three share a dtype (cast the weight with convert)", xn,
                  ts_dtype_name(x->dtype), wn, ts_dtype_name(w->dtype), yn, ts_dtype_name(y->dtype));
    if (p->stride_h < 1 || p->stride_w < 1) CONV_FAIL("strides must be >= 1");
    if (p->pad_h < 0 || p->pad_w < 0) CONV_FAIL("padding must be >= 0");
    if (p->relu && strcmp(op, "conv2d_forward") != 0)
        CONV_FAIL("the fused ReLU is forward-only (inference); train with a separate relu op");
    if (x->c != w->c) CONV_FAIL("%s has %d input channels but %s expects %d", xn, x->c, wn, w->c);
    int ho = ts_conv_out_size(x->h, w->h, p->stride_h, p->pad_h);
    int wo = ts_conv_out_size(x->w, w->w, p->stride_w, p->pad_w);
    if (ho < 1 || wo < 1)
        CONV_FAIL("the %dx%d kernel does not fit the padded %dx%d input", w->h, w->w, x->h + 2 * p->pad_h,
                  x->w + 2 * p->pad_w);
    if (y->n != x->n) CONV_FAIL("batch sizes differ (%d vs %d)", y->n, x->n);
    if (y->c != w->n) CONV_FAIL("%s has %d channels but %s has %d output channels", yn, y->c, wn, w->n);
    if (y->h != ho || y->w != wo) CONV_FAIL("%s must be %dx%d, got %dx%d", yn, ho, wo, y->h, y->w);
    if (p->add) {
        if (strcmp(op, "conv2d_forward") != 0)
            CONV_FAIL("the fused add is forward-only (inference); train with a separate add op");
        char sa[TS_SHAPE_STR], sy[TS_SHAPE_STR];
        if (!tensor_ok(p->add)) CONV_FAIL("the tensor to add has no data or a dimension < 1");
        if (!ts_tensor_same_shape(p->add, y) || p->add->dtype != y->dtype)
            /* A half tensor's shape string names its type already. */
            CONV_FAIL("the tensor to add is %s%s%s, it must have the shape and dtype of %s, %s%s%s",
                      ts_shape_str(p->add, sa), ts_dtype_is_half(p->add->dtype) ? "" : " ",
                      ts_dtype_is_half(p->add->dtype) ? "" : ts_dtype_name(p->add->dtype), yn, ts_shape_str(y, sy),
                      ts_dtype_is_half(y->dtype) ? "" : " ", ts_dtype_is_half(y->dtype) ? "" : ts_dtype_name(y->dtype));
        /* Compared as numbers: the memory may be a device's. */
        const uintptr_t a0 = (uintptr_t)p->add->data, y0 = (uintptr_t)y->data, nb = ts_tensor_bytes(y);
        if (a0 < y0 + nb && y0 < a0 + nb)
            CONV_FAIL("the tensor to add overlaps %s (the convolution overwrites it first)", yn);
    }
#undef CONV_FAIL
    return TS_OK;
}

ts_status ts_conv2d_backward_bias_check(const float *dbias, const ts_tensor *dy)
{
    if (!dbias || !tensor_ok(dy)) {
        char s[TS_SHAPE_STR] = "(null)";
        if (dy) ts_shape_str(dy, s);
        return ts_error(TS_ERR_INVALID_ARG, "conv2d_backward_bias: dbias %s, dy %s: need a dbias array and a dy "
                        "tensor with data and every dimension >= 1", dbias ? "given" : "NULL", s);
    }
    /* dbias is float32 whatever dy is: only dy's dtype can be wrong. */
    if (!dtype_known(dy->dtype)) {
        char s[TS_SHAPE_STR];
        return ts_error(TS_ERR_INVALID_ARG, "conv2d_backward_bias: dy %s has an unknown dtype (%d)", ts_shape_str(dy, s),
                        (int)dy->dtype);
    }
    return TS_OK;
}

/* ---- same-shape pairs (elementwise ops, batch norm) ------------------------ */

ts_status ts_same_shape_check(const char *op, const char *an, const ts_tensor *a, const char *bn, const ts_tensor *b)
{
    if (!tensor_ok(a) || !tensor_ok(b))
        return ts_error(TS_ERR_INVALID_ARG, "%s: %s and %s must be non-NULL tensors with dimensions >= 1", op, an, bn);
    ts_status st = ts_dtype_check(op, an, a, bn, b);
    if (st != TS_OK) return st;
    if (!ts_tensor_same_shape(a, b)) {
        char sa[TS_SHAPE_STR], sb[TS_SHAPE_STR];
        return ts_error(TS_ERR_INVALID_ARG, "%s: %s shape %s does not match %s shape %s", op, an, ts_shape_str(a, sa),
                        bn, ts_shape_str(b, sb));
    }
    return TS_OK;
}

/* ---- batch norm -------------------------------------------------------------- */

/* PyTorch's message for n == 1 (torch/nn/functional.py,
 * _verify_batch_size / the C++ check in batch_norm). */
#define BN_N1_MESSAGE "Expected more than 1 value per channel when training"

ts_status ts_batchnorm_forward_train_check(const ts_tensor *y, const float *save_mean, const float *save_invstd,
                                           const ts_tensor *x, const float *gamma, const float *beta,
                                           const float *running_mean, const float *running_var, const ts_bn_params *p)
{
    static const char op[] = "batchnorm_forward_train";
    ts_status st = ts_same_shape_check(op, "y", y, "x", x);
    if (st != TS_OK) return st;
    if (!save_mean || !save_invstd || !gamma || !beta || !p)
        return ts_error(TS_ERR_INVALID_ARG, "%s: save_mean, save_invstd, gamma, beta and params must not be NULL", op);
    if ((running_mean == NULL) != (running_var == NULL))
        return ts_error(TS_ERR_INVALID_ARG, "%s: running_mean and running_var must be both given or both NULL", op);
    if (!(p->eps >= 0.0f)) return ts_error(TS_ERR_INVALID_ARG, "%s: eps must be >= 0, got %g", op, (double)p->eps);
    if ((size_t)x->n * ((size_t)x->h * x->w) <= 1) { /* values per channel */
        char s[TS_SHAPE_STR];
        return ts_error(TS_ERR_INVALID_ARG, "%s: " BN_N1_MESSAGE ", got input size %s", op, ts_shape_str(x, s));
    }
    return TS_OK;
}

ts_status ts_batchnorm_forward_eval_check(const ts_tensor *y, const ts_tensor *x, const float *gamma, const float *beta,
                                          const float *running_mean, const float *running_var, const ts_bn_params *p)
{
    static const char op[] = "batchnorm_forward_eval";
    ts_status st = ts_same_shape_check(op, "y", y, "x", x);
    if (st != TS_OK) return st;
    if (!gamma || !beta || !running_mean || !running_var || !p)
        return ts_error(TS_ERR_INVALID_ARG, "%s: gamma, beta, running_mean, running_var and params must not be NULL",
                        op);
    if (!(p->eps >= 0.0f)) return ts_error(TS_ERR_INVALID_ARG, "%s: eps must be >= 0, got %g", op, (double)p->eps);
    return TS_OK;
}

ts_status ts_batchnorm_backward_check(const ts_tensor *dx, const float *dgamma, const float *dbeta, const ts_tensor *dy,
                                      const ts_tensor *x, const float *gamma, const float *save_mean,
                                      const float *save_invstd)
{
    static const char op[] = "batchnorm_backward";
    ts_status st = ts_same_shape_check(op, "dy", dy, "x", x);
    if (st != TS_OK) return st;
    st = ts_same_shape_check(op, "dx", dx, "x", x);
    if (st != TS_OK) return st;
    if (!dgamma || !dbeta || !gamma || !save_mean || !save_invstd)
        return ts_error(TS_ERR_INVALID_ARG, "%s: dgamma, dbeta, gamma, save_mean and save_invstd must not be NULL", op);
    if (dx->data == dy->data) return ts_error(TS_ERR_INVALID_ARG, "%s: dx must not alias dy", op);
    return TS_OK;
}

/* ---- elementwise ------------------------------------------------------------- */

ts_status ts_relu_backward_check(const ts_tensor *dx, const ts_tensor *dy, const ts_tensor *y)
{
    ts_status st = ts_same_shape_check("relu_backward", "dy", dy, "y", y);
    if (st != TS_OK) return st;
    st = ts_same_shape_check("relu_backward", "dx", dx, "y", y);
    if (st != TS_OK) return st;
    if (dx->data == dy->data) return ts_error(TS_ERR_INVALID_ARG, "relu_backward: dx must not alias dy");
    return TS_OK;
}

ts_status ts_add_forward_check(const ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    ts_status st = ts_same_shape_check("add_forward", "a", a, "b", b);
    if (st != TS_OK) return st;
    return ts_same_shape_check("add_forward", "y", y, "a", a);
}

ts_status ts_add_backward_check(const ts_tensor *da, const ts_tensor *db, const ts_tensor *dy)
{
    /* Both gradients are required (neither may be NULL). */
    ts_status st = ts_same_shape_check("add_backward", "da", da, "dy", dy);
    if (st != TS_OK) return st;
    st = ts_same_shape_check("add_backward", "db", db, "dy", dy);
    if (st != TS_OK) return st;
    if (da->data == dy->data || db->data == dy->data)
        return ts_error(TS_ERR_INVALID_ARG, "add_backward: da and db must not alias dy");
    return TS_OK;
}

ts_status ts_concat_check(const char *op, const char *yn, const ts_tensor *y, const char *an, const ts_tensor *a,
                          const char *bn, const ts_tensor *b)
{
    if (!tensor_ok(y) || !tensor_ok(a) || !tensor_ok(b))
        return ts_error(TS_ERR_INVALID_ARG, "%s: %s, %s and %s must be non-NULL tensors with dimensions >= 1", op, yn,
                        an, bn);
    ts_status st = ts_dtype_check(op, yn, y, an, a);
    if (st == TS_OK) st = ts_dtype_check(op, yn, y, bn, b);
    if (st != TS_OK) return st;
    /* The backward writes both parts: they must be distinct tensors. */
    if (strcmp(op, "concat_backward") == 0 && a->data == b->data) return ts_error(TS_ERR_INVALID_ARG, "%s: %s and %s must be distinct tensors", op, an, bn);
    if (a->n != b->n || a->h != b->h || a->w != b->w || y->n != a->n || y->h != a->h || y->w != a->w ||
        (long)y->c != (long)a->c + b->c) {
        char sy[TS_SHAPE_STR], sa[TS_SHAPE_STR], sb[TS_SHAPE_STR];
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: %s %s must be %s %s and %s %s joined along channels (same n, h, w; channels add up)", op,
                        yn, ts_shape_str(y, sy), an, ts_shape_str(a, sa), bn, ts_shape_str(b, sb));
    }
    return TS_OK;
}

ts_status ts_float_buffer_check(const char *op, const float *p, size_t n)
{
    if (n > 0 && !p) return ts_error(TS_ERR_INVALID_ARG, "%s: NULL buffer for %zu floats", op, n);
    return TS_OK;
}

ts_status ts_sum_squares_check(double *sumsq, const float *x, size_t n)
{
    if (!sumsq) return ts_error(TS_ERR_INVALID_ARG, "sum_squares: NULL result pointer");
    *sumsq = 0;
    return ts_float_buffer_check("sum_squares", x, n);
}

ts_status ts_sum_squares_multi_check(double *sumsq, const float *const *x, const size_t *n, int count)
{
    if (count < 0) return ts_error(TS_ERR_INVALID_ARG, "sum_squares_multi: count %d < 0", count);
    if (count == 0) return TS_OK;
    if (!sumsq || !x || !n) return ts_error(TS_ERR_INVALID_ARG, "sum_squares_multi: NULL result, tensor or size list");
    for (int i = 0; i < count; i++) sumsq[i] = 0;
    for (int i = 0; i < count; i++)
        if (n[i] > 0 && !x[i])
            return ts_error(TS_ERR_INVALID_ARG, "sum_squares_multi: tensor %d of %d is NULL with %zu floats", i, count,
                            n[i]);
    return TS_OK;
}

/* ---- upsample ---------------------------------------------------------------- */

ts_status ts_upsample_check(const char *op, const ts_tensor *big, const char *bigname, const ts_tensor *small,
                            const char *smallname)
{
    if (!tensor_ok(big) || !tensor_ok(small))
        return ts_error(TS_ERR_INVALID_ARG, "%s: %s and %s must be non-NULL tensors with dimensions >= 1", op, bigname,
                        smallname);
    ts_status st = ts_dtype_check(op, bigname, big, smallname, small);
    if (st != TS_OK) return st;
    if (big->n != small->n || big->c != small->c) {
        char sb[TS_SHAPE_STR], ss[TS_SHAPE_STR];
        return ts_error(TS_ERR_INVALID_ARG, "%s: %s shape %s and %s shape %s must have the same n and c", op, bigname,
                        ts_shape_str(big, sb), smallname, ts_shape_str(small, ss));
    }
    return TS_OK;
}

/* ---- losses ------------------------------------------------------------------ */

ts_status ts_loss_check(const char *op, const ts_tensor *logits, const int32_t *target, const void *params,
                        const void *out)
{
    if (!logits || !logits->data || !target || !params || !out)
        return ts_error(TS_ERR_INVALID_ARG, "%s: NULL argument (logits, its data, target, params or output)", op);
    if (logits->n < 1 || logits->c < 1 || logits->h < 1 || logits->w < 1) {
        char sh[TS_SHAPE_STR];
        return ts_error(TS_ERR_INVALID_ARG, "%s: logits shape %s must have every dimension >= 1", op,
                        ts_shape_str(logits, sh));
    }
    if (logits->dtype != TS_F32) {
        char sh[TS_SHAPE_STR];
        /* autocast runs the losses in float32 too: the graph casts its half
         * logits before they reach a loss. */
        return ts_error(TS_ERR_INVALID_ARG, "%s: logits %s must be float32 (cast half logits with convert)", op,
                        ts_shape_str(logits, sh));
    }
    return TS_OK;
}

ts_status ts_loss_dlogits_check(const char *op, const ts_tensor *dlogits, const ts_tensor *logits)
{
    if (!dlogits || !dlogits->data) return ts_error(TS_ERR_INVALID_ARG, "%s: dlogits is NULL", op);
    ts_status st = ts_dtype_check(op, "dlogits", dlogits, "logits", logits);
    if (st != TS_OK) return st;
    if (!ts_tensor_same_shape(dlogits, logits)) {
        char a[TS_SHAPE_STR], b[TS_SHAPE_STR];
        return ts_error(TS_ERR_INVALID_ARG, "%s: dlogits shape %s differs from logits shape %s", op,
                        ts_shape_str(dlogits, a), ts_shape_str(logits, b));
    }
    return TS_OK;
}

ts_status ts_loss_label_error(const char *op, const ts_tensor *logits, int32_t label, size_t pixel, int ignore_index)
{
    const size_t hw = (size_t)logits->h * logits->w;
    size_t n = pixel / hw, h = pixel % hw / (size_t)logits->w, w = pixel % (size_t)logits->w;
    return ts_error(TS_ERR_INVALID_ARG,
                    "%s: target label %d at pixel (n=%zu,h=%zu,w=%zu) is outside [0, %d) and is not "
                    "ignore_index (%d)",
                    op, (int)label, n, h, w, logits->c, ignore_index);
}

ts_status ts_dice_params_check(const char *op, const ts_dice_params *p, int C)
{
    if (p->mode != TS_DICE_SMP && p->mode != TS_DICE_PER_IMAGE)
        return ts_error(TS_ERR_INVALID_ARG, "%s: unknown dice mode %d (0 = SMP, 1 = per-image)", op, (int)p->mode);
    if (!(p->eps >= 0) || !(p->smooth >= 0))
        return ts_error(TS_ERR_INVALID_ARG, "%s: eps (%g) and smooth (%g) must be >= 0", op, (double)p->eps,
                        (double)p->smooth);
    if (p->mode == TS_DICE_SMP && p->class_weights) {
        double ws = 0;
        for (int c = 0; c < C; c++) ws += p->class_weights[c];
        if (ws == 0)
            return ts_error(TS_ERR_INVALID_ARG, "%s: class_weights sum to 0 over the %d classes, so the weighted mean "
                            "is undefined", op, C);
    }
    return TS_OK;
}

/* ---- AdamW ------------------------------------------------------------------- */

ts_status ts_adamw_update_check(const float *param, const float *grad, const float *exp_avg, const float *exp_avg_sq,
                                size_t n, const ts_adamw_step *s)
{
    if (!s) return ts_error(TS_ERR_INVALID_ARG, "adamw_update: step values are NULL (call ts_adamw_prepare first)");
    if (n == 0) return TS_OK;
    if (!param || !grad || !exp_avg || !exp_avg_sq)
        return ts_error(TS_ERR_INVALID_ARG, "adamw_update: NULL buffer among param %p, grad %p, exp_avg %p, "
                        "exp_avg_sq %p (n = %zu)", (const void *)param, (const void *)grad, (const void *)exp_avg,
                        (const void *)exp_avg_sq, n);
    /* The four buffers are distinct state; sharing one would silently mix
     * them (e.g. a grad slot passed as exp_avg). */
    const void *b[4] = {param, grad, exp_avg, exp_avg_sq};
    for (int i = 0; i < 4; i++)
        for (int j = i + 1; j < 4; j++)
            if (b[i] == b[j])
                return ts_error(TS_ERR_INVALID_ARG, "adamw_update: param, grad, exp_avg and exp_avg_sq must be "
                                "distinct buffers (arguments %d and %d are the same)", i + 1, j + 1);
    return TS_OK;
}

/* The loss from the per-image class sums, and, when gp is not NULL, the
 * gradient of dloss * loss with respect to each image's p sums: per pixel of
 * image n, dL/dp_c = gp[n*C + c] + t_c gi[n*C + c].
 *
 * SMP (>= 0.4): the sums are pooled over the batch. The denominator is
 * I + fp/2 + fn/2 + smooth with fp = Sp - I, fn = St - I, which equals
 * (Sp + St)/2 + smooth; we write it as SMP does, so the forward rounds the same
 * way, and differentiate the simplified form (dden/dI = 0). SMP obtains I from
 * an L1 norm, whose abs'() is 0 where p == t exactly; that only happens where a
 * probability is exactly 0 or 1, where the softmax Jacobian zeroes the
 * gradient anyway, so sum p t is used here. clamp_min passes the gradient
 * where its input is >= the bound (PyTorch's rule) and stops it otherwise. */
double ts_dice_reduce(const ts_dice_params *p, int N, int C, const double *sums, double dloss, double *gp,
                          double *gi)
{
    const double eps = p->eps;
    if (p->mode == TS_DICE_PER_IMAGE) {
        /* dice_nc = (2 I + eps) / (Sp + St + eps); loss = 1 - mean over N*C. */
        double acc = 0, a = 1.0 / ((double)N * C);
        for (int k = 0; k < N * C; k++) {
            const double *s = sums + (size_t)k * TS_DICE_SUMS;
            double num = 2 * s[TS_DICE_SUM_I] + eps, den = s[TS_DICE_SUM_P] + s[TS_DICE_SUM_T] + eps;
            acc += num / den;
            if (gp) {
                gi[k] = -dloss * a * 2 / den;
                gp[k] = dloss * a * num / (den * den);
            }
        }
        return 1.0 - acc * a;
    }

    const double smooth = p->smooth;
    double wsum = 0;
    for (int c = 0; c < C; c++) wsum += p->class_weights ? (double)p->class_weights[c] : 1.0;
    double total = 0;
    for (int c = 0; c < C; c++) {
        double Sp = 0, St = 0, I = 0;
        for (int n = 0; n < N; n++) {
            const double *s = sums + ((size_t)n * C + c) * TS_DICE_SUMS;
            Sp += s[TS_DICE_SUM_P];
            St += s[TS_DICE_SUM_T];
            I += s[TS_DICE_SUM_I];
        }
        double num = I + smooth;
        double den_raw = I + 0.5 * (Sp - I) + 0.5 * (St - I) + smooth;
        int clamped = !(den_raw >= eps);
        double den = clamped ? eps : den_raw;
        double dice = num / den;
        double lc, dl_ddice;
        if (p->log_loss) {
            lc = -log(dice >= eps ? dice : eps);
            dl_ddice = dice >= eps ? -1.0 / dice : 0.0;
        } else {
            lc = 1.0 - dice;
            dl_ddice = -1.0;
        }
        /* SMP's absent-class mask: no true pixel of c anywhere in the batch. */
        double mask = St > 0 ? 1.0 : 0.0;
        double a = (p->class_weights ? (double)p->class_weights[c] : 1.0) / wsum;
        total += a * mask * lc;
        if (gp) {
            double g = dloss * a * mask * dl_ddice;
            double g_i = g / den;                               /* d dice / dI = 1/den */
            double g_p = clamped ? 0.0 : g * (-num / (den * den)) * 0.5; /* d den / dSp = 1/2 */
            for (int n = 0; n < N; n++) {
                gi[(size_t)n * C + c] = g_i;
                gp[(size_t)n * C + c] = g_p;
            }
        }
    }
    return total;
}
