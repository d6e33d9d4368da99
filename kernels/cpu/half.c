/* Mixed precision on the CPU: the convert op, and the half-precision paths
 * of the activation ops.
 *
 * The CPU has no half-precision arithmetic worth using, so a half op here is
 * the definition in kernels/backend.h taken literally: widen every half
 * tensor to a float32 NCHW copy, run the float32 op on the copies, and round
 * each output element once back into the half tensor (an accumulating op
 * widens its output first, so the add happens in float32 and is rounded
 * once). That makes it slow and obviously right: it is the reference the
 * CUDA backend's tensor-core kernels are compared with, and what lets the
 * whole mixed-precision training path (the graph's casts, loss scaling) run
 * in the CPU test suite. Each op's argument checks run first, on the half
 * tensors, so a caller sees the same messages as on the GPU.
 *
 * Each activation op of the CPU backend starts with one line that sends a
 * call with a half tensor here. */
#include <stdlib.h>
#include <string.h>

#include "../half.h"
#include "cpu.h"

/* Where element (n, c, h, w) of t lives: NCHW for float32, NHWC for half. */
static size_t elem_index(const ts_tensor *t, int n, int c, int h, int w)
{
    if (t->dtype == TS_F32) return (((size_t)n * t->c + c) * t->h + h) * t->w + w;
    return (((size_t)n * t->h + h) * t->w + w) * t->c + c;
}

static float load(const ts_tensor *t, size_t i)
{
    return t->dtype == TS_F32 ? t->data[i] : ts_half_to_f32(t->dtype, t->half[i]);
}

static void store(ts_tensor *t, size_t i, float v)
{
    if (t->dtype == TS_F32)
        t->data[i] = v;
    else
        t->half[i] = ts_f32_to_half(t->dtype, v);
}

/* The element loop of convert, once the arguments are checked: element
 * (n, c, h, w) of each tensor at its own layout's place. y == x (one dtype)
 * reads each element before writing it. */
static void convert_elems(ts_tensor *y, const ts_tensor *x, int accumulate)
{
    const int N = x->n, C = x->c, H = x->h, W = x->w;
    if (y->dtype == x->dtype && !accumulate) {
        if (y->data != x->data) memcpy(y->data, x->data, ts_tensor_bytes(x));
        return;
    }
#pragma omp parallel for collapse(2) schedule(static)
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (int h = 0; h < H; h++)
                for (int w = 0; w < W; w++) {
                    size_t iy = elem_index(y, n, c, h, w);
                    float v = load(x, elem_index(x, n, c, h, w));
                    store(y, iy, accumulate ? load(y, iy) + v : v);
                }
}

ts_status ts_cpu_convert(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, int accumulate)
{
    (void)ctx;
    ts_status st = ts_convert_check(y, x);
    if (st != TS_OK) return st;
    convert_elems(y, x, accumulate ? 1 : 0);
    return TS_OK;
}

/* ---- float32 copies of half tensors ----------------------------------------- */

/* Up to 4 tensors of one call: each half one gets a float32 NCHW twin. */
typedef struct wide {
    ts_tensor f[4];
    int n;
} wide;

static void wide_free(wide *w)
{
    for (int i = 0; i < w->n; i++) ts_tensor_free(&w->f[i]);
    w->n = 0;
}

/* The float32 twin of h, filled from it when `fill` (inputs, and outputs an
 * op accumulates into). h is checked already. */
static ts_status widen(wide *w, const ts_tensor *h, int fill, ts_tensor **out)
{
    ts_tensor *f = &w->f[w->n];
    ts_status st = ts_tensor_alloc(f, h->n, h->c, h->h, h->w);
    if (st != TS_OK) return ts_error(st, "half op on the CPU: %s", ts_last_error());
    w->n++;
    if (fill) convert_elems(f, h, 0);
    *out = f;
    return TS_OK;
}

/* The rounding of an output back into its half tensor. */
static void narrow(ts_tensor *h, const ts_tensor *f) { convert_elems(h, f, 0); }

/* Widen a list of tensors; the macro keeps each wrapper to its op's logic. */
#define WIDEN(w, h, fill, out)                         \
    do {                                               \
        ts_status st_ = widen(&(w), (h), (fill), (out)); \
        if (st_ != TS_OK) {                            \
            wide_free(&(w));                           \
            return st_;                                \
        }                                              \
    } while (0)

/* ---- conv2d ------------------------------------------------------------------- */

/* The bias is float32 in the op table, but a half conv adds it rounded to
 * y's half type (to nearest even) and widened back: torch.autocast casts a
 * conv's bias to the half type like its weight, and cuDNN's half
 * configurations (the CUDA backend's fused conv + bias + ReLU) take it in
 * y's type. The fused add is widened from y's type. The sum, the ReLU and
 * the one rounding of y are the float32 op's, as for every half op. */
ts_status ts_cpu_half_conv2d_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const ts_tensor *w,
                                     const float *bias, const ts_conv2d_params *p)
{
    ts_status st = ts_conv2d_check("conv2d_forward", x, "x", w, "w", y, "y", p);
    if (st != TS_OK) return st;
    float *hbias = NULL;
    if (bias) {
        hbias = malloc((size_t)w->n * sizeof *hbias);
        if (!hbias) return ts_error(TS_ERR_NOMEM, "conv2d_forward: out of memory for the %d-channel half bias", w->n);
        for (int o = 0; o < w->n; o++) hbias[o] = ts_half_to_f32(y->dtype, ts_f32_to_half(y->dtype, bias[o]));
    }
    wide v = {0};
    ts_tensor *fy = NULL, *fx = NULL, *fw = NULL, *fz = NULL;
    ts_conv2d_params fp = *p; /* the fused add, if any, widened as well */
    st = widen(&v, y, 0, &fy);
    if (st == TS_OK) st = widen(&v, x, 1, &fx);
    if (st == TS_OK) st = widen(&v, w, 1, &fw);
    if (st == TS_OK && p->add) st = widen(&v, p->add, 1, &fz);
    fp.add = fz;
    if (st == TS_OK) st = ts_cpu_conv2d_forward(ctx, fy, fx, fw, hbias, &fp);
    if (st == TS_OK) narrow(y, fy);
    wide_free(&v);
    free(hbias);
    return st;
}

ts_status ts_cpu_half_conv2d_backward_data(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *w,
                                           const ts_conv2d_params *p)
{
    ts_status st = ts_conv2d_check("conv2d_backward_data", dx, "dx", w, "w", dy, "dy", p);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fdx, *fdy, *fw;
    WIDEN(v, dx, 1, &fdx);
    WIDEN(v, dy, 1, &fdy);
    WIDEN(v, w, 1, &fw);
    st = ts_cpu_conv2d_backward_data(ctx, fdx, fdy, fw, p);
    if (st == TS_OK) narrow(dx, fdx);
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_conv2d_backward_filter(ts_ctx *ctx, ts_tensor *dw, const ts_tensor *dy, const ts_tensor *x,
                                             const ts_conv2d_params *p)
{
    ts_status st = ts_conv2d_check("conv2d_backward_filter", x, "x", dw, "dw", dy, "dy", p);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fdw, *fdy, *fx;
    WIDEN(v, dw, 1, &fdw);
    WIDEN(v, dy, 1, &fdy);
    WIDEN(v, x, 1, &fx);
    st = ts_cpu_conv2d_backward_filter(ctx, fdw, fdy, fx, p);
    if (st == TS_OK) narrow(dw, fdw);
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_conv2d_backward_bias(ts_ctx *ctx, float *dbias, const ts_tensor *dy)
{
    ts_status st = ts_conv2d_backward_bias_check(dbias, dy);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fdy;
    WIDEN(v, dy, 1, &fdy);
    st = ts_cpu_conv2d_backward_bias(ctx, dbias, fdy);
    wide_free(&v);
    return st;
}

/* ---- batch norm ----------------------------------------------------------------- */

ts_status ts_cpu_half_batchnorm_forward_train(ts_ctx *ctx, ts_tensor *y, float *save_mean, float *save_invstd,
                                              const ts_tensor *x, const float *gamma, const float *beta,
                                              float *running_mean, float *running_var, const ts_bn_params *p)
{
    ts_status st = ts_batchnorm_forward_train_check(y, save_mean, save_invstd, x, gamma, beta, running_mean,
                                                    running_var, p);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fy, *fx;
    WIDEN(v, y, 0, &fy);
    WIDEN(v, x, 1, &fx);
    st = ts_cpu_batchnorm_forward_train(ctx, fy, save_mean, save_invstd, fx, gamma, beta, running_mean, running_var,
                                        p);
    if (st == TS_OK) narrow(y, fy);
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_batchnorm_forward_eval(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const float *gamma,
                                             const float *beta, const float *running_mean, const float *running_var,
                                             const ts_bn_params *p)
{
    ts_status st = ts_batchnorm_forward_eval_check(y, x, gamma, beta, running_mean, running_var, p);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fy, *fx;
    WIDEN(v, y, 0, &fy);
    WIDEN(v, x, 1, &fx);
    st = ts_cpu_batchnorm_forward_eval(ctx, fy, fx, gamma, beta, running_mean, running_var, p);
    if (st == TS_OK) narrow(y, fy);
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_batchnorm_backward(ts_ctx *ctx, ts_tensor *dx, float *dgamma, float *dbeta, const ts_tensor *dy,
                                         const ts_tensor *x, const float *gamma, const float *save_mean,
                                         const float *save_invstd)
{
    ts_status st = ts_batchnorm_backward_check(dx, dgamma, dbeta, dy, x, gamma, save_mean, save_invstd);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fdx, *fdy, *fx;
    WIDEN(v, dx, 1, &fdx);
    WIDEN(v, dy, 1, &fdy);
    WIDEN(v, x, 1, &fx);
    st = ts_cpu_batchnorm_backward(ctx, fdx, dgamma, dbeta, fdy, fx, gamma, save_mean, save_invstd);
    if (st == TS_OK) narrow(dx, fdx);
    wide_free(&v);
    return st;
}

/* ---- elementwise ----------------------------------------------------------------- */

ts_status ts_cpu_half_relu_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    ts_status st = ts_same_shape_check("relu_forward", "y", y, "x", x);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fy, *fx;
    WIDEN(v, y, 0, &fy);
    WIDEN(v, x, 1, &fx);
    st = ts_cpu_relu_forward(ctx, fy, fx);
    if (st == TS_OK) narrow(y, fy);
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_relu_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *y)
{
    ts_status st = ts_relu_backward_check(dx, dy, y);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fdx, *fdy, *fy;
    WIDEN(v, dx, 1, &fdx);
    WIDEN(v, dy, 1, &fdy);
    WIDEN(v, y, 1, &fy);
    st = ts_cpu_relu_backward(ctx, fdx, fdy, fy);
    if (st == TS_OK) narrow(dx, fdx);
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_add_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    ts_status st = ts_add_forward_check(y, a, b);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fy, *fa, *fb;
    WIDEN(v, y, 0, &fy);
    WIDEN(v, a, 1, &fa);
    WIDEN(v, b, 1, &fb);
    st = ts_cpu_add_forward(ctx, fy, fa, fb);
    if (st == TS_OK) narrow(y, fy);
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_add_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy)
{
    ts_status st = ts_add_backward_check(da, db, dy);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fda, *fdb, *fdy;
    WIDEN(v, da, 1, &fda);
    WIDEN(v, db, 1, &fdb);
    WIDEN(v, dy, 1, &fdy);
    /* da and db may be one tensor (a residual whose two inputs are the
     * same): then the op adds dy twice into the one float32 copy. */
    int same = da->data == db->data;
    st = ts_cpu_add_backward(ctx, fda, same ? fda : fdb, fdy);
    if (st == TS_OK) {
        narrow(da, fda);
        if (!same) narrow(db, fdb);
    }
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_concat_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b)
{
    ts_status st = ts_concat_check("concat_forward", "y", y, "a", a, "b", b);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fy, *fa, *fb;
    WIDEN(v, y, 0, &fy);
    WIDEN(v, a, 1, &fa);
    WIDEN(v, b, 1, &fb);
    st = ts_cpu_concat_forward(ctx, fy, fa, fb);
    if (st == TS_OK) narrow(y, fy);
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_concat_backward(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy)
{
    ts_status st = ts_concat_check("concat_backward", "dy", dy, "da", da, "db", db);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fda, *fdb, *fdy;
    WIDEN(v, da, 1, &fda);
    WIDEN(v, db, 1, &fdb);
    WIDEN(v, dy, 1, &fdy);
    st = ts_cpu_concat_backward(ctx, fda, fdb, fdy);
    if (st == TS_OK) {
        narrow(da, fda);
        narrow(db, fdb);
    }
    wide_free(&v);
    return st;
}

/* ---- pooling and upsampling ------------------------------------------------------- */

ts_status ts_cpu_half_maxpool2d_forward(ts_ctx *ctx, ts_tensor *y, int32_t *index, const ts_tensor *x,
                                        const ts_pool2d_params *p)
{
    ts_status st = ts_pool2d_check("maxpool2d_forward", x, "x", y, "y", p);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fy, *fx;
    WIDEN(v, y, 0, &fy);
    WIDEN(v, x, 1, &fx);
    /* Widening is exact and monotonic, so the arg-max (ties and NaN
     * included) is the half tensor's own. */
    st = ts_cpu_maxpool2d_forward(ctx, fy, index, fx, p);
    if (st == TS_OK) narrow(y, fy);
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_maxpool2d_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const int32_t *index,
                                         const ts_pool2d_params *p)
{
    ts_status st = ts_pool2d_check("maxpool2d_backward", dx, "dx", dy, "dy", p);
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fdx, *fdy;
    WIDEN(v, dx, 1, &fdx);
    WIDEN(v, dy, 1, &fdy);
    st = ts_cpu_maxpool2d_backward(ctx, fdx, fdy, index, p);
    if (st == TS_OK) narrow(dx, fdx);
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_upsample_nearest_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    ts_status st = ts_upsample_check("upsample_nearest_forward", y, "y", x, "x");
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fy, *fx;
    WIDEN(v, y, 0, &fy);
    WIDEN(v, x, 1, &fx);
    st = ts_cpu_upsample_nearest_forward(ctx, fy, fx);
    if (st == TS_OK) narrow(y, fy);
    wide_free(&v);
    return st;
}

ts_status ts_cpu_half_upsample_nearest_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy)
{
    ts_status st = ts_upsample_check("upsample_nearest_backward", dy, "dy", dx, "dx");
    if (st != TS_OK) return st;
    wide v = {0};
    ts_tensor *fdx, *fdy;
    WIDEN(v, dx, 1, &fdx);
    WIDEN(v, dy, 1, &fdy);
    st = ts_cpu_upsample_nearest_backward(ctx, fdx, fdy);
    if (st == TS_OK) narrow(dx, fdx);
    wide_free(&v);
    return st;
}
