/* 2-D convolution on the CPU: im2col + OpenBLAS sgemm, forward and backward
 * side by side so the three GEMMs of one layer can be read together.
 *
 * Layout. x [N,Cin,H,W], w [Cout,Cin,kh,kw] = a row-major [Cout, K] matrix
 * with K = Cin*kh*kw, y [N,Cout,Ho,Wo] = per image a row-major [Cout, P]
 * matrix with P = Ho*Wo. With col [K, P] the im2col matrix of one image
 * (row r = (c, i, j), column p = (oh, ow), value x[c, oh*sh-ph+i, ow*sw-pw+j]
 * or 0 in the padding):
 *     forward          y_n   = W · col_n
 *     backward data    dx_n += col2im(W^T · dy_n)
 *     backward filter  dW   += dy_n · col_n^T
 *
 * Bounding the column buffer. A whole col_n is K*P floats: 75 MB for one
 * 256x256 image at the widest decoder layers (128*9 x 128^2 and 32*9 x 256^2),
 * times the batch if all images were unrolled at once. Instead we go one image
 * at a time and, within an image, over chunks of output pixels: a chunk is
 * columns [p0, p0+pc) of col_n, built in ctx's scratch buffer (reused across
 * calls, so it is allocated once per run). pc is chosen so that K*pc floats
 * stay under COL_CAP_BYTES (16 MiB), but never below COL_MIN_PIXELS, so the
 * GEMM's N dimension stays wide enough for OpenBLAS even for huge K (only
 * K > 16384 hits that floor, which the model never does). Chunks are
 * balanced (equal sizes up to one pixel), so there is no thin last GEMM.
 * Why 16 MiB: it bounds the buffer for any tile size while keeping N long
 * enough that the per-call packing of W is amortized; at 256^2 the encoder
 * (up to 5 input bands) and decoder blocks 0-1 run as one chunk per image,
 * and decoder blocks 2-4 and the head split into 2-5 chunks. A 4 MiB cap (L2-sized) measured the same
 * within noise on the 2-core dev VM (tools/bench/conv.c). Column chunks are
 * contiguous ranges of flattened output pixels, so sgemm writes straight
 * into y with ldc = P, and a chunk may start or end mid-row.
 *
 * 1x1 stride-1 pad-0 convs need no im2col at all: col_n is x_n itself. (The
 * model's 1x1 convs are stride 2, which go through the general path, where
 * their im2col is a cheap subsampling copy.)
 *
 * Threads: sgemm is called outside any parallel region so OpenBLAS (OpenMP
 * build, same libgomp pool) threads it. im2col runs parallel over the K rows
 * of the chunk (each row is written by one thread). col2im accumulates
 * several rows into the same dx plane, so it runs parallel over input
 * channels: the kh*kw rows of channel c only touch dx[n, c], so there are no
 * write races and col2im's sum order does not depend on the thread count. */
#include <cblas.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "cpu.h"

/* Soft cap on the im2col chunk, in bytes (see the comment at the top). */
#ifndef TS_CONV_COL_CAP_BYTES
#define TS_CONV_COL_CAP_BYTES ((size_t)16 << 20)
#endif
#define COL_CAP_BYTES ((size_t)TS_CONV_COL_CAP_BYTES)
#define COL_MIN_PIXELS 256

/* Below this many floats of work an OpenMP region costs more than it saves. */
#define PAR_MIN_WORK 32768

/* ---- shape checks ---------------------------------------------------------- */

/* The conv geometry shared by all three ops, derived from the checked shapes. */
typedef struct conv_geom {
    int n, cin, h, w;  /* input */
    int cout, kh, kw;  /* weight */
    int ho, wo;        /* output */
    int sh, sw, ph, pw;
    int k;             /* cin*kh*kw: rows of col */
    int p;             /* ho*wo: columns of col */
    int pointwise;     /* 1x1, stride 1, pad 0: col is x itself */
} conv_geom;

/* Checks x/w/y (named xn/wn/yn in messages: "x"/"dx", "w"/"dw", "y"/"dy")
 * against each other and p with the backends' shared ts_conv2d_check, adds
 * the BLAS size limit, and fills g. Every message starts with the op name and
 * lists all three shapes plus stride and padding. */
static ts_status conv_check(const char *op, conv_geom *g, const ts_tensor *x, const char *xn, const ts_tensor *w,
                            const char *wn, const ts_tensor *y, const char *yn, const ts_conv2d_params *p)
{
    ts_status st = ts_conv2d_check(op, x, xn, w, wn, y, yn, p);
    if (st != TS_OK) return st;
    const int ho = y->h, wo = y->w; /* the output size, checked */
    /* cblas takes int dimensions; keep every matrix size within them. */
    if ((size_t)w->c * w->h * w->w > INT_MAX || (size_t)ho * wo > INT_MAX || (size_t)x->h * x->w > INT_MAX)
        return ts_conv2d_error(op, x, xn, w, wn, y, yn, p, "tensor too large for 32-bit BLAS dimensions");

    *g = (conv_geom){.n = x->n, .cin = x->c, .h = x->h, .w = x->w, .cout = w->n, .kh = w->h, .kw = w->w,
                     .ho = ho, .wo = wo, .sh = p->stride_h, .sw = p->stride_w, .ph = p->pad_h, .pw = p->pad_w};
    g->k = g->cin * g->kh * g->kw;
    g->p = ho * wo;
    g->pointwise = g->kh == 1 && g->kw == 1 && g->sh == 1 && g->sw == 1 && g->ph == 0 && g->pw == 0;
    return TS_OK;
}

/* ---- im2col / col2im on a chunk of output pixels ----------------------------- */

/* Pixels per chunk, balanced so all chunks have equal size up to one pixel. */
static int chunk_pixels(const conv_geom *g)
{
    size_t pc = COL_CAP_BYTES / ((size_t)g->k * sizeof(float));
    if (pc < COL_MIN_PIXELS) pc = COL_MIN_PIXELS;
    if (pc >= (size_t)g->p) return g->p;
    size_t chunks = ((size_t)g->p + pc - 1) / pc;
    return (int)(((size_t)g->p + chunks - 1) / chunks);
}

/* The output columns [lo, hi) whose input column ow*sw - pw + j lies inside
 * [0, W); the rest read padding. */
static void valid_cols(const conv_geom *g, int j, int *lo, int *hi)
{
    int a = g->pw - j; /* ow*sw >= a */
    *lo = a <= 0 ? 0 : (a + g->sw - 1) / g->sw;
    int b = g->w - 1 + g->pw - j; /* ow*sw <= b */
    *hi = b < 0 ? 0 : b / g->sw + 1;
    if (*hi > g->wo) *hi = g->wo;
    if (*lo > *hi) *lo = *hi;
}

/* col[r, q] for r in [0, K), q in [0, pc): image xn's values under output
 * pixel p0 + q. */
static void im2col_chunk(const conv_geom *g, const float *xn, int p0, int pc, float *col)
{
    const int rows = g->k;
#pragma omp parallel for schedule(static) if ((size_t)rows * pc >= PAR_MIN_WORK)
    for (int r = 0; r < rows; r++) {
        const int j = r % g->kw, i = (r / g->kw) % g->kh, c = r / (g->kw * g->kh);
        const float *xc = xn + (size_t)c * g->h * g->w;
        float *dst = col + (size_t)r * pc;
        int lo, hi;
        valid_cols(g, j, &lo, &hi);
        /* Walk the chunk one output row segment at a time. */
        for (int q = 0; q < pc;) {
            const int p = p0 + q, oh = p / g->wo, ow0 = p % g->wo;
            int ow1 = ow0 + (pc - q);
            if (ow1 > g->wo) ow1 = g->wo;
            float *d = dst + q - ow0; /* d[ow] is column (oh, ow) */
            const int ih = oh * g->sh - g->ph + i;
            if (ih < 0 || ih >= g->h) {
                memset(d + ow0, 0, (size_t)(ow1 - ow0) * sizeof(float));
            } else {
                const float *xr = xc + (size_t)ih * g->w - g->pw + j; /* xr[ow*sw] is x[c, ih, ow*sw-pw+j] */
                const int a = ow0 > lo ? ow0 : lo, b = ow1 < hi ? ow1 : hi;
                if (a >= b) {
                    memset(d + ow0, 0, (size_t)(ow1 - ow0) * sizeof(float));
                } else {
                    for (int ow = ow0; ow < a; ow++) d[ow] = 0.0f;
                    if (g->sw == 1)
                        memcpy(d + a, xr + a, (size_t)(b - a) * sizeof(float));
                    else
                        for (int ow = a; ow < b; ow++) d[ow] = xr[(size_t)ow * g->sw];
                    for (int ow = b; ow < ow1; ow++) d[ow] = 0.0f;
                }
            }
            q += ow1 - ow0;
        }
    }
}

/* The adjoint of im2col_chunk: dxn[c, ih, iw] += col[r, q] for every (r, q)
 * that im2col read from there; padding entries are dropped. Parallel over
 * input channels, since all kh*kw rows of channel c add into the same plane. */
static void col2im_chunk_add(const conv_geom *g, const float *col, int p0, int pc, float *dxn)
{
    const int kk = g->kh * g->kw;
#pragma omp parallel for schedule(static) if ((size_t)g->k * pc >= PAR_MIN_WORK)
    for (int c = 0; c < g->cin; c++) {
        float *dxc = dxn + (size_t)c * g->h * g->w;
        for (int ij = 0; ij < kk; ij++) {
            const int i = ij / g->kw, j = ij % g->kw;
            const float *src = col + ((size_t)c * kk + ij) * pc;
            int lo, hi;
            valid_cols(g, j, &lo, &hi);
            for (int q = 0; q < pc;) {
                const int p = p0 + q, oh = p / g->wo, ow0 = p % g->wo;
                int ow1 = ow0 + (pc - q);
                if (ow1 > g->wo) ow1 = g->wo;
                const int ih = oh * g->sh - g->ph + i;
                if (ih >= 0 && ih < g->h) {
                    const float *s = src + q - ow0;
                    float *xr = dxc + (size_t)ih * g->w - g->pw + j;
                    const int a = ow0 > lo ? ow0 : lo, b = ow1 < hi ? ow1 : hi;
                    if (g->sw == 1)
                        for (int ow = a; ow < b; ow++) xr[ow] += s[ow];
                    else
                        for (int ow = a; ow < b; ow++) xr[(size_t)ow * g->sw] += s[ow];
                }
                q += ow1 - ow0;
            }
        }
    }
}

/* The scratch buffer for one chunk of pc pixels. */
static ts_status col_buffer(ts_ctx *ctx, const char *op, const conv_geom *g, int pc, float **col)
{
    if (!ctx) return ts_error(TS_ERR_INVALID_ARG, "%s: ctx is NULL (it holds the column buffer)", op);
    void *ptr = NULL;
    ts_status st = ts_ctx_scratch(ctx, (size_t)g->k * pc * sizeof(float), &ptr);
    if (st != TS_OK) return ts_error(st, "%s: column buffer: %s", op, ts_last_error());
    *col = ptr;
    return TS_OK;
}

/* ---- forward --------------------------------------------------------------- */

/* The forward epilogue on a [cout, pc] block of y with row stride ld: add
 * the bias (after the GEMM rather than pre-filling y with beta = 1, so the
 * sgemm always overwrites y whatever it held) and the fused add (z, the same
 * block of another tensor, or NULL), then apply the fused ReLU; in that
 * order, as the separate add and relu ops would. */
static void epilogue(float *y, const float *z, int ld, int cout, int pc, const float *bias, int relu)
{
    if (!bias && !relu && !z) return;
#pragma omp parallel for schedule(static) if ((size_t)cout * pc >= PAR_MIN_WORK)
    for (int c = 0; c < cout; c++) {
        float *yp = y + (size_t)c * ld;
        const float *zp = z ? z + (size_t)c * ld : NULL;
        const float b = bias ? bias[c] : 0.0f;
        for (int q = 0; q < pc; q++) {
            float v = yp[q] + b;
            if (zp) v += zp[q];
            yp[q] = relu ? (v > 0.0f ? v : 0.0f) : v;
        }
    }
}

ts_status ts_cpu_conv2d_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const ts_tensor *w, const float *bias,
                                const ts_conv2d_params *p)
{
    TS_CPU_HALF_DISPATCH(x, ts_cpu_half_conv2d_forward(ctx, y, x, w, bias, p));
    static const char op[] = "conv2d_forward";
    conv_geom g;
    ts_status st = conv_check(op, &g, x, "x", w, "w", y, "y", p);
    if (st != TS_OK) return st;
    const size_t x_img = (size_t)g.cin * g.h * g.w, y_img = (size_t)g.cout * g.p;
    const float *z = p->add ? p->add->data : NULL;

    if (g.pointwise) {
        /* y_n[Cout, P] = W[Cout, Cin] · x_n[Cin, P]. */
        for (int n = 0; n < g.n; n++) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, g.cout, g.p, g.cin, 1.0f, w->data, g.k,
                        x->data + n * x_img, g.p, 0.0f, y->data + n * y_img, g.p);
            epilogue(y->data + n * y_img, z ? z + n * y_img : NULL, g.p, g.cout, g.p, bias, p->relu);
        }
    } else {
        const int pc_max = chunk_pixels(&g);
        float *col = NULL;
        if ((st = col_buffer(ctx, op, &g, pc_max, &col)) != TS_OK) return st;
        for (int n = 0; n < g.n; n++) {
            for (int p0 = 0; p0 < g.p; p0 += pc_max) {
                const int pc = g.p - p0 < pc_max ? g.p - p0 : pc_max;
                im2col_chunk(&g, x->data + n * x_img, p0, pc, col);
                /* y_n[:, p0:p0+pc] = W[Cout, K] · col[K, pc], written in place (ldc = P). */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, g.cout, pc, g.k, 1.0f, w->data, g.k, col,
                            pc, 0.0f, y->data + n * y_img + p0, g.p);
                /* Bias and ReLU while the chunk is still in cache. */
                epilogue(y->data + n * y_img + p0, z ? z + n * y_img + p0 : NULL, g.p, g.cout, pc, bias, p->relu);
            }
        }
    }
    return TS_OK;
}

/* ---- backward data: dx += conv_transpose(dy, w) ------------------------------ */

ts_status ts_cpu_conv2d_backward_data(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *w,
                                      const ts_conv2d_params *p)
{
    TS_CPU_HALF_DISPATCH(dy, ts_cpu_half_conv2d_backward_data(ctx, dx, dy, w, p));
    static const char op[] = "conv2d_backward_data";
    conv_geom g;
    ts_status st = conv_check(op, &g, dx, "dx", w, "w", dy, "dy", p);
    if (st != TS_OK) return st;
    const size_t x_img = (size_t)g.cin * g.h * g.w, y_img = (size_t)g.cout * g.p;

    if (g.pointwise) {
        /* dx_n[Cin, P] += W^T[Cin, Cout] · dy_n[Cout, P]; beta = 1 accumulates. */
        for (int n = 0; n < g.n; n++)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, g.cin, g.p, g.cout, 1.0f, w->data, g.k,
                        dy->data + n * y_img, g.p, 1.0f, dx->data + n * x_img, g.p);
        return TS_OK;
    }

    const int pc_max = chunk_pixels(&g);
    float *col = NULL;
    if ((st = col_buffer(ctx, op, &g, pc_max, &col)) != TS_OK) return st;
    for (int n = 0; n < g.n; n++) {
        for (int p0 = 0; p0 < g.p; p0 += pc_max) {
            const int pc = g.p - p0 < pc_max ? g.p - p0 : pc_max;
            /* dcol[K, pc] = W^T[K, Cout] · dy_n[:, p0:p0+pc] (ldb = P), then
             * scattered back onto the input pixels each column came from. */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, g.k, pc, g.cout, 1.0f, w->data, g.k,
                        dy->data + n * y_img + p0, g.p, 0.0f, col, pc);
            col2im_chunk_add(&g, col, p0, pc, dx->data + n * x_img);
        }
    }
    return TS_OK;
}

/* ---- backward filter: dw += dy (*) x ----------------------------------------- */

ts_status ts_cpu_conv2d_backward_filter(ts_ctx *ctx, ts_tensor *dw, const ts_tensor *dy, const ts_tensor *x,
                                        const ts_conv2d_params *p)
{
    TS_CPU_HALF_DISPATCH(dy, ts_cpu_half_conv2d_backward_filter(ctx, dw, dy, x, p));
    static const char op[] = "conv2d_backward_filter";
    conv_geom g;
    ts_status st = conv_check(op, &g, x, "x", dw, "dw", dy, "dy", p);
    if (st != TS_OK) return st;
    const size_t x_img = (size_t)g.cin * g.h * g.w, y_img = (size_t)g.cout * g.p;

    if (g.pointwise) {
        /* dW[Cout, Cin] += dy_n[Cout, P] · x_n[Cin, P]^T. */
        for (int n = 0; n < g.n; n++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, g.cout, g.cin, g.p, 1.0f, dy->data + n * y_img,
                        g.p, x->data + n * x_img, g.p, 1.0f, dw->data, g.k);
        return TS_OK;
    }

    const int pc_max = chunk_pixels(&g);
    float *col = NULL;
    if ((st = col_buffer(ctx, op, &g, pc_max, &col)) != TS_OK) return st;
    for (int n = 0; n < g.n; n++) {
        for (int p0 = 0; p0 < g.p; p0 += pc_max) {
            const int pc = g.p - p0 < pc_max ? g.p - p0 : pc_max;
            im2col_chunk(&g, x->data + n * x_img, p0, pc, col);
            /* dW[Cout, K] += dy_n[:, p0:p0+pc] (lda = P) · col[K, pc]^T: the
             * reduction over pixels is split across chunks and images, each
             * adding into dW with beta = 1. */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, g.cout, g.k, pc, 1.0f, dy->data + n * y_img + p0,
                        g.p, col, pc, 1.0f, dw->data, g.k);
        }
    }
    return TS_OK;
}

/* ---- backward bias: dbias[c] += sum over n, h, w of dy[n, c] ------------------ */

ts_status ts_cpu_conv2d_backward_bias(ts_ctx *ctx, float *dbias, const ts_tensor *dy)
{
    TS_CPU_HALF_DISPATCH(dy, ts_cpu_half_conv2d_backward_bias(ctx, dbias, dy));
    (void)ctx;
    ts_status st = ts_conv2d_backward_bias_check(dbias, dy);
    if (st != TS_OK) return st;
    const int nb = dy->n, cout = dy->c;
    const size_t plane = (size_t)dy->h * dy->w;
    /* Summed in double: a 256x256x8 plane is 5e5 terms, where a float running
     * sum would lose ~3 digits. One channel per iteration, fixed order. */
#pragma omp parallel for schedule(static) if ((size_t)nb * cout * plane >= PAR_MIN_WORK)
    for (int c = 0; c < cout; c++) {
        double s = 0.0;
        for (int n = 0; n < nb; n++) {
            const float *d = dy->data + ((size_t)n * cout + c) * plane;
            for (size_t q = 0; q < plane; q++) s += d[q];
        }
        dbias[c] += (float)s;
    }
    return TS_OK;
}
