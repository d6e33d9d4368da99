/* `terraseg bench conv`: every distinct conv shape of the U-Net ResNet-34
 * (shared/specs/smp-unet.md section 1) on a synthetic tile, timed through
 * the backend's conv2d ops: the CPU backend, or with --device cuda[:N] the
 * CUDA backend (cuDNN) on device buffers.
 *
 * For each shape it prints forward, backward-data and backward-filter
 * GFLOP/s next to two sgemm figures measured on this machine. On the CPU: a
 * square 1024^3 OpenBLAS sgemm (the practical peak) and the sgemm of the
 * layer's own forward GEMM shape (Cout x Ho*Wo x Cin*kh*kw, one image, no
 * im2col), so the cost of im2col/col2im and chunking shows up as a ratio. On
 * CUDA: a square 4096^3 cuBLAS sgemm and the layer's GEMM over the whole
 * batch (Cout x N*Ho*Wo x Cin*kh*kw: what an implicit-GEMM conv computes),
 * both with the same TF32 setting as the convs. The totals weight each shape
 * by how often it occurs in the model.
 *
 * Timing: on the CPU each call is timed on its own and the median is kept
 * (a descheduled thread on a shared machine stalls single calls). On CUDA
 * the calls are queued back to back and timed as one loop between two
 * ts_cuda_synchronize calls (per-call synchronisation would add the launch
 * latency to every call); the figure is the loop's mean. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cblas.h>

#include "bench.h"
#include "kernels/backend.h"
#include "kernels/outfile.h"
#include "kernels/cpu/cpu.h"
#include "kernels/threads.h"
#ifdef TERRASEG_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_backend.h"
#endif

typedef struct conv_shape {
    char name[96];
    int cin, cout, k, stride, pad;
    int in_h, in_w; /* input size */
    int count;      /* occurrences in the model */
    int bias;
    int needs_dx;   /* 0 for encoder.conv1: nothing needs the gradient of the image */
} conv_shape;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Deterministic values in [-1, 1): random enough that no denormals or
 * all-zero shortcuts flatter the timings. */
static void fill(float *p, size_t n, unsigned seed)
{
    unsigned s = seed * 2654435761u + 1u;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        p[i] = (float)(s >> 8) * (2.0f / 16777216.0f) - 1.0f;
    }
}

/* Adds a shape, or merges it into an identical one already listed (the
 * decoder's conv2 of blocks 0-2 match encoder convs exactly). */
static void add_shape(conv_shape *list, int *n, const char *name, int cin, int cout, int k, int stride, int pad,
                      int in_size, int count, int bias, int needs_dx)
{
    for (int i = 0; i < *n; i++) {
        conv_shape *s = &list[i];
        if (s->cin == cin && s->cout == cout && s->k == k && s->stride == stride && s->pad == pad &&
            s->in_h == in_size && s->bias == bias && s->needs_dx == needs_dx) {
            s->count += count;
            size_t len = strlen(s->name);
            snprintf(s->name + len, sizeof s->name - len, ", %s", name);
            return;
        }
    }
    conv_shape *s = &list[(*n)++];
    *s = (conv_shape){.cin = cin, .cout = cout, .k = k, .stride = stride, .pad = pad, .in_h = in_size,
                      .in_w = in_size, .count = count, .bias = bias, .needs_dx = needs_dx};
    snprintf(s->name, sizeof s->name, "%s", name);
}

/* The model's convs for an in_size^2 tile. Sizes come from ts_conv_out_size
 * so any tile size works (SMP >= 0.5 upsamples each decoder block to its
 * skip's size). */
static int model_shapes(const ts_bench_opts *o, conv_shape *list)
{
    const int s0 = o->size;
    const int s1 = ts_conv_out_size(s0, 7, 2, 3); /* f1: encoder.conv1 */
    const int s2 = ts_conv_out_size(s1, 3, 2, 1); /* f2: maxpool, layer1 */
    const int s3 = ts_conv_out_size(s2, 3, 2, 1); /* f3: layer2 */
    const int s4 = ts_conv_out_size(s3, 3, 2, 1); /* f4: layer3 */
    int n = 0;
    add_shape(list, &n, "encoder.conv1", o->in_channels, 64, 7, 2, 3, s0, 1, 0, 0);
    add_shape(list, &n, "layer1.*.conv{1,2}", 64, 64, 3, 1, 1, s2, 6, 0, 1);
    add_shape(list, &n, "layer2.0.conv1", 64, 128, 3, 2, 1, s2, 1, 0, 1);
    add_shape(list, &n, "layer2.0.downsample", 64, 128, 1, 2, 0, s2, 1, 0, 1);
    add_shape(list, &n, "layer2.*.conv", 128, 128, 3, 1, 1, s3, 7, 0, 1);
    add_shape(list, &n, "layer3.0.conv1", 128, 256, 3, 2, 1, s3, 1, 0, 1);
    add_shape(list, &n, "layer3.0.downsample", 128, 256, 1, 2, 0, s3, 1, 0, 1);
    add_shape(list, &n, "layer3.*.conv", 256, 256, 3, 1, 1, s4, 11, 0, 1);
    add_shape(list, &n, "layer4.0.conv1", 256, 512, 3, 2, 1, s4, 1, 0, 1);
    add_shape(list, &n, "layer4.0.downsample", 256, 512, 1, 2, 0, s4, 1, 0, 1);
    add_shape(list, &n, "layer4.*.conv", 512, 512, 3, 1, 1, ts_conv_out_size(s4, 3, 2, 1), 5, 0, 1);
    /* Decoder block i: conv1 (in + skip -> out) and conv2 (out -> out) at the skip's size. */
    static const int dec_in[5] = {768, 384, 192, 128, 32}, dec_out[5] = {256, 128, 64, 32, 16};
    const int dec_size[5] = {s4, s3, s2, s1, s0};
    for (int b = 0; b < 5; b++) {
        char nm[32];
        snprintf(nm, sizeof nm, "decoder.%d.conv1", b);
        add_shape(list, &n, nm, dec_in[b], dec_out[b], 3, 1, 1, dec_size[b], 1, 0, 1);
        snprintf(nm, sizeof nm, "decoder.%d.conv2", b);
        add_shape(list, &n, nm, dec_out[b], dec_out[b], 3, 1, 1, dec_size[b], 1, 0, 1);
    }
    add_shape(list, &n, "segmentation_head", 16, o->classes, 3, 1, 1, s0, 1, 1, 1);
    return n;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of t[0..n), which it sorts. Timings use the median of individually
 * timed calls: on a shared 2-core machine one descheduled OpenMP thread can
 * stall a call by a whole scheduler tick, and the median keeps such outliers
 * out of the table. */
static double median(double *t, int n)
{
    qsort(t, (size_t)n, sizeof *t, cmp_double);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

/* Median seconds of iters calls of sgemm (after one warm-up). */
static double time_sgemm(int m, int n, int k, const float *a, const float *b, float *c, int iters)
{
    double t[64];
    if (iters > 64) iters = 64;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k, b, n, 0.0f, c, n);
    for (int i = 0; i < iters; i++) {
        double t0 = now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k, b, n, 0.0f, c, n);
        t[i] = now_s() - t0;
    }
    return median(t, iters);
}

/* GFLOP/s of a square n^3 sgemm: this machine's practical peak. */
static double sgemm_square(int n, int iters)
{
    size_t nn = (size_t)n * n;
    float *a = malloc(nn * sizeof *a), *b = malloc(nn * sizeof *b), *c = malloc(nn * sizeof *c);
    double gf = 0;
    if (a && b && c) {
        fill(a, nn, 1);
        fill(b, nn, 2);
        gf = 2.0 * n * nn / time_sgemm(n, n, n, a, b, c, iters) * 1e-9;
    }
    free(a);
    free(b);
    free(c);
    return gf;
}

/* GFLOP/s of the forward GEMM of one image of this layer, without im2col:
 * [Cout x K] · [K x P]. B is capped at 64 MiB (P trimmed) so huge tiles do
 * not exhaust memory; the GEMM is then still representative. */
static double sgemm_layer(int m, int p, int k, int iters)
{
    size_t cap = ((size_t)64 << 20) / sizeof(float) / (size_t)k;
    if ((size_t)p > cap) p = (int)cap;
    if (p < 1) p = 1;
    float *a = malloc((size_t)m * k * sizeof *a), *b = malloc((size_t)k * p * sizeof *b);
    float *c = malloc((size_t)m * p * sizeof *c);
    double gf = 0;
    if (a && b && c) {
        fill(a, (size_t)m * k, 3);
        fill(b, (size_t)k * p, 4);
        gf = 2.0 * m * (double)p * k / time_sgemm(m, p, k, a, b, c, iters) * 1e-9;
    }
    free(a);
    free(b);
    free(c);
    return gf;
}

typedef enum { OP_FWD, OP_BWD_DATA, OP_BWD_FILTER } conv_op;
static const char *const op_names[] = {"conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter"};

typedef struct conv_bufs {
    ts_tensor x, w, y, dx, dw, dy;
    float *bias, *dbias;
} conv_bufs;

static ts_status run_op(ts_ctx *ctx, conv_op op, conv_bufs *b, const ts_conv2d_params *p)
{
    switch (op) {
    case OP_FWD: return ctx->backend->conv2d_forward(ctx, &b->y, &b->x, &b->w, b->bias, p);
    case OP_BWD_DATA: return ctx->backend->conv2d_backward_data(ctx, &b->dx, &b->dy, &b->w, p);
    case OP_BWD_FILTER: {
        ts_status st = ctx->backend->conv2d_backward_filter(ctx, &b->dw, &b->dy, &b->x, p);
        /* The head's bias gradient belongs to the same backward step. */
        if (st == TS_OK && b->dbias) st = ctx->backend->conv2d_backward_bias(ctx, b->dbias, &b->dy);
        return st;
    }
    }
    return ts_error(TS_ERR_INVALID_ARG, "bench conv: unknown op %d", (int)op);
}

/* Median seconds per call: one warm-up, then iters timed calls. < 0 on error. */
static double time_op_cpu(ts_ctx *ctx, conv_op op, conv_bufs *b, const ts_conv2d_params *p, int iters,
                          const char *layer)
{
    double *t = malloc((size_t)iters * sizeof *t);
    if (!t) {
        fprintf(stderr, "bench conv: out of memory\n");
        return -1;
    }
    ts_status st = run_op(ctx, op, b, p);
    for (int i = 0; i < iters && st == TS_OK; i++) {
        double t0 = now_s();
        st = run_op(ctx, op, b, p);
        t[i] = now_s() - t0;
    }
    double med = -1;
    if (st != TS_OK) {
        fprintf(stderr, "bench conv: %s failed on %s: %s\n", op_names[op], layer, ts_last_error());
    } else {
        med = median(t, iters);
    }
    free(t);
    return med;
}

static void free_bufs_cpu(conv_bufs *b)
{
    ts_tensor_free(&b->x);
    ts_tensor_free(&b->w);
    ts_tensor_free(&b->y);
    ts_tensor_free(&b->dx);
    ts_tensor_free(&b->dw);
    ts_tensor_free(&b->dy);
    free(b->bias);
    free(b->dbias);
    memset(b, 0, sizeof *b);
}

/* Host buffers: inputs and weights random, gradients to be accumulated into
 * zero, bias (the head only) random. */
static ts_status alloc_bufs_cpu(conv_bufs *b, const conv_shape *s, int nb, int ho, int wo)
{
    ts_status st = TS_OK;
    if (st == TS_OK) st = ts_tensor_alloc(&b->x, nb, s->cin, s->in_h, s->in_w);
    if (st == TS_OK) st = ts_tensor_alloc(&b->dx, nb, s->cin, s->in_h, s->in_w);
    if (st == TS_OK) st = ts_tensor_alloc(&b->w, s->cout, s->cin, s->k, s->k);
    if (st == TS_OK) st = ts_tensor_alloc(&b->dw, s->cout, s->cin, s->k, s->k);
    if (st == TS_OK) st = ts_tensor_alloc(&b->y, nb, s->cout, ho, wo);
    if (st == TS_OK) st = ts_tensor_alloc(&b->dy, nb, s->cout, ho, wo);
    if (st == TS_OK && s->bias) {
        b->bias = calloc((size_t)s->cout, sizeof(float));
        b->dbias = calloc((size_t)s->cout, sizeof(float));
        if (!b->bias || !b->dbias) st = ts_error(TS_ERR_NOMEM, "bench conv: out of memory for the bias");
    }
    if (st != TS_OK) return st;
    fill(b->x.data, ts_tensor_numel(&b->x), 11);
    fill(b->w.data, ts_tensor_numel(&b->w), 12);
    fill(b->dy.data, ts_tensor_numel(&b->dy), 13);
    if (b->bias) fill(b->bias, (size_t)s->cout, 14);
    return TS_OK;
}

#ifdef TERRASEG_HAVE_CUDA
/* ---- CUDA: device buffers, loop timing, cuBLAS reference ---------------------- */

/* A device buffer of n floats: fill(seed) copied from the host, or zeros
 * (seed 0). */
static ts_status dev_buffer(float **out, size_t n, unsigned seed)
{
    *out = NULL;
    float *host = calloc(n, sizeof *host);
    if (!host) return ts_error(TS_ERR_NOMEM, "bench conv: out of host memory for %zu floats", n);
    if (seed) fill(host, n, seed);
    void *d = NULL;
    ts_status st = ts_cuda_malloc(&d, n * sizeof(float));
    if (st == TS_OK) st = ts_cuda_memcpy_h2d(d, host, n * sizeof(float));
    free(host);
    if (st != TS_OK) {
        ts_cuda_free(d);
        return st;
    }
    *out = d;
    return TS_OK;
}

static ts_status dev_tensor(ts_tensor *t, int n, int c, int h, int w, unsigned seed)
{
    float *d = NULL;
    ts_status st = dev_buffer(&d, (size_t)n * c * h * w, seed);
    *t = ts_tensor_view(d, n, c, h, w); /* a view: ts_tensor_free must never see a device pointer */
    return st;
}

static void free_bufs_cuda(conv_bufs *b)
{
    ts_cuda_free(b->x.data);
    ts_cuda_free(b->w.data);
    ts_cuda_free(b->y.data);
    ts_cuda_free(b->dx.data);
    ts_cuda_free(b->dw.data);
    ts_cuda_free(b->dy.data);
    ts_cuda_free(b->bias);
    ts_cuda_free(b->dbias);
    memset(b, 0, sizeof *b);
}

/* The same buffers and values as alloc_bufs_cpu, in device memory (the CUDA
 * backend's pointer convention, kernels/cuda/cuda_backend.h). */
static ts_status alloc_bufs_cuda(conv_bufs *b, const conv_shape *s, int nb, int ho, int wo)
{
    ts_status st = TS_OK;
    if (st == TS_OK) st = dev_tensor(&b->x, nb, s->cin, s->in_h, s->in_w, 11);
    if (st == TS_OK) st = dev_tensor(&b->dx, nb, s->cin, s->in_h, s->in_w, 0);
    if (st == TS_OK) st = dev_tensor(&b->w, s->cout, s->cin, s->k, s->k, 12);
    if (st == TS_OK) st = dev_tensor(&b->dw, s->cout, s->cin, s->k, s->k, 0);
    if (st == TS_OK) st = dev_tensor(&b->y, nb, s->cout, ho, wo, 0);
    if (st == TS_OK) st = dev_tensor(&b->dy, nb, s->cout, ho, wo, 13);
    if (st == TS_OK && s->bias) st = dev_buffer(&b->bias, (size_t)s->cout, 14);
    if (st == TS_OK && s->bias) st = dev_buffer(&b->dbias, (size_t)s->cout, 0);
    return st;
}

/* Mean seconds per call over iters calls queued back to back, between two
 * ts_cuda_synchronize calls, after two warm-up calls (the first makes the
 * cuDNN plan and may grow the workspace). < 0 on error. */
static double time_op_cuda(ts_ctx *ctx, conv_op op, conv_bufs *b, const ts_conv2d_params *p, int iters,
                           const char *layer)
{
    ts_status st = run_op(ctx, op, b, p);
    if (st == TS_OK) st = run_op(ctx, op, b, p);
    if (st == TS_OK) st = ts_cuda_synchronize();
    double t0 = now_s();
    for (int i = 0; i < iters && st == TS_OK; i++) st = run_op(ctx, op, b, p);
    if (st == TS_OK) st = ts_cuda_synchronize();
    const double t = now_s() - t0;
    if (st != TS_OK) {
        fprintf(stderr, "bench conv: %s failed on %s (device): %s\n", op_names[op], layer, ts_last_error());
        return -1;
    }
    return t / iters;
}

static const char *cublas_status(cublasStatus_t e)
{
    const char *s = cublasGetStatusString(e);
    return s ? s : "unknown cuBLAS status";
}

/* GFLOP/s of the row-major sgemm C[m x p] = A[m x k] B[k x p] in cuBLAS
 * (column-major: C^T = B^T A^T), on random device data: the mean of iters
 * calls after two warm-ups, between cudaDeviceSynchronize calls. The B
 * operand is capped at 256 MiB (p trimmed). 0 on error, after a message. */
static double cublas_sgemm_gflops(cublasHandle_t h, int m, size_t cols, int k, int iters)
{
    size_t cap = ((size_t)256 << 20) / sizeof(float) / (size_t)k;
    const int p = (int)(cols > cap ? cap : cols < 1 ? 1 : cols);
    float *a = NULL, *bm = NULL, *c = NULL;
    double gf = 0;
    ts_status st = dev_buffer(&a, (size_t)m * k, 3);
    if (st == TS_OK) st = dev_buffer(&bm, (size_t)k * p, 4);
    if (st == TS_OK) st = dev_buffer(&c, (size_t)m * p, 0);
    if (st != TS_OK) {
        fprintf(stderr, "bench conv: cuBLAS reference %dx%dx%d: %s\n", m, p, k, ts_last_error());
    } else {
        const float one = 1.0f, zero = 0.0f;
        cublasStatus_t e = CUBLAS_STATUS_SUCCESS;
        for (int i = 0; i < 2 && e == CUBLAS_STATUS_SUCCESS; i++)
            e = cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, p, m, k, &one, bm, p, a, k, &zero, c, p);
        cudaError_t ce = cudaDeviceSynchronize();
        double t0 = now_s();
        for (int i = 0; i < iters && e == CUBLAS_STATUS_SUCCESS; i++)
            e = cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, p, m, k, &one, bm, p, a, k, &zero, c, p);
        if (ce == cudaSuccess) ce = cudaDeviceSynchronize();
        const double t = (now_s() - t0) / iters;
        if (e != CUBLAS_STATUS_SUCCESS)
            fprintf(stderr, "bench conv: cublasSgemm %dx%dx%d failed: %s\n", m, p, k, cublas_status(e));
        else if (ce != cudaSuccess)
            fprintf(stderr, "bench conv: cudaDeviceSynchronize after cublasSgemm %dx%dx%d failed: %s\n", m, p, k,
                    cudaGetErrorString(ce));
        else
            gf = 2.0 * m * (double)p * k / t * 1e-9;
    }
    ts_cuda_free(a);
    ts_cuda_free(bm);
    ts_cuda_free(c);
    return gf;
}
#endif

/* One benchmark run's device: the op table, how buffers are made and freed,
 * how an op is timed and the GEMM reference measured. */
typedef struct bench_dev {
    int cuda;
    int tf32;
#ifdef TERRASEG_HAVE_CUDA
    cublasHandle_t blas;
#endif
} bench_dev;

static ts_status alloc_bufs(const bench_dev *d, conv_bufs *b, const conv_shape *s, int nb, int ho, int wo)
{
#ifdef TERRASEG_HAVE_CUDA
    if (d->cuda) return alloc_bufs_cuda(b, s, nb, ho, wo);
#endif
    (void)d;
    return alloc_bufs_cpu(b, s, nb, ho, wo);
}

static void free_bufs(const bench_dev *d, conv_bufs *b)
{
#ifdef TERRASEG_HAVE_CUDA
    if (d->cuda) {
        free_bufs_cuda(b);
        return;
    }
#endif
    (void)d;
    free_bufs_cpu(b);
}

static double time_op(const bench_dev *d, ts_ctx *ctx, conv_op op, conv_bufs *b, const ts_conv2d_params *p,
                      int iters, const char *layer)
{
#ifdef TERRASEG_HAVE_CUDA
    if (d->cuda) return time_op_cuda(ctx, op, b, p, iters, layer);
#endif
    (void)d;
    return time_op_cpu(ctx, op, b, p, iters, layer);
}

/* The layer's GEMM reference: one image through OpenBLAS on the CPU, the
 * whole batch through cuBLAS on CUDA. */
static double layer_gemm(const bench_dev *d, int m, int pixels, int batch, int k, int iters)
{
#ifdef TERRASEG_HAVE_CUDA
    if (d->cuda) return cublas_sgemm_gflops(d->blas, m, (size_t)pixels * (size_t)batch, k, iters);
#endif
    (void)d;
    (void)batch;
    return sgemm_layer(m, pixels, k, iters);
}

/* ---- --csv ---------------------------------------------------------------- */

/* One header line; every row of csv_row() has these columns in this order.
 * Times are milliseconds per call (batch images at once): the median of the
 * calls on the CPU, the mean of a synchronized loop on CUDA; gflop_fwd is
 * one forward call's GFLOP (backward data and filter have the same count).
 * needs_dx is 0 where training skips the data gradient (encoder.conv1), bias
 * 1 where the conv has a bias (its gradient is timed with bwd_filter).
 * gemm_gflops: the layer's forward GEMM without im2col (see layer_gemm: one
 * image in OpenBLAS on the CPU, the whole batch in cuBLAS on CUDA);
 * sgemm_peak_gflops: the square sgemm (1024^3 OpenBLAS, 4096^3 cuBLAS), the
 * same on every row. device: cpu, or the CUDA device with "+tf32" when TF32
 * was on (threads is then only the host's thread count). */
static const char csv_header[] =
    "name,cin,cout,kernel,stride,pad,in_h,in_w,out_h,out_w,batch,count,needs_dx,bias,threads,"
    "gflop_fwd,ms_fwd,ms_bwd_data,ms_bwd_filter,gemm_gflops,sgemm_peak_gflops,device\n";

/* The CSV goes through FILE.tmp and a rename (kernels/outfile.h); f is
 * NULL when no CSV was asked for. */
typedef struct csv_out {
    FILE *f;
    ts_outfile out;
} csv_out;

/* Opens the CSV and writes the header. 0 on success; on error prints to
 * stderr and returns 1. */
static int csv_open(csv_out *c, const char *path)
{
    memset(c, 0, sizeof *c);
    if (ts_outfile_open(&c->out, path) != TS_OK) {
        fprintf(stderr, "bench conv: %s\n", ts_last_error());
        return 1;
    }
    c->f = c->out.fp;
    fputs(csv_header, c->f);
    return 0;
}

/* Writes s as an RFC 4180 field: quoted, since merged names contain commas. */
static void csv_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"') fputc('"', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

static void csv_row(csv_out *c, const conv_shape *s, int ho, int wo, int batch, int threads, double flop, double tf,
                    double td, double tw, double gemm, double peak, const char *device)
{
    if (!c->f) return;
    csv_string(c->f, s->name);
    fprintf(c->f, ",%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%.6f,%.6f,%.6f,%.6f,%.3f,%.3f,", s->cin, s->cout, s->k,
            s->stride, s->pad, s->in_h, s->in_w, ho, wo, batch, s->count, s->needs_dx, s->bias, threads, flop * 1e-9,
            tf * 1e3, td * 1e3, tw * 1e3, gemm, peak);
    csv_string(c->f, device);
    fputc('\n', c->f);
}

/* Renames the finished CSV into place, or (!ok: the caller has reported the
 * error) removes it. Returns 0 on success, 1 after an error. */
static int csv_close(csv_out *c, int ok)
{
    if (!c->f) return ok ? 0 : 1;
    c->f = NULL;
    if (!ok) {
        ts_outfile_abort(&c->out);
        return 1;
    }
    if (ts_outfile_commit(&c->out) != TS_OK) {
        fprintf(stderr, "bench conv: %s\n", ts_last_error());
        return 1;
    }
    return 0;
}

/* Sets up the device of o->device: nothing for the CPU; for CUDA the
 * backend (TF32 as asked) and a cuBLAS handle for the GEMM references.
 * Returns 0, or the exit status after printing why not (2: this build has no
 * CUDA or the name is wrong; 1: the device cannot be used). */
static int dev_open(bench_dev *d, const ts_bench_opts *o, const ts_backend **backend)
{
    memset(d, 0, sizeof *d);
    *backend = ts_backend_cpu();
    if (!ts_bench_is_cuda(o)) {
        if (o->device && strcmp(o->device, "cpu") != 0) {
            fprintf(stderr, "bench conv: --device %s: unknown device (cpu, cuda or cuda:N)\n", o->device);
            return 2;
        }
        if (o->tf32) {
            fprintf(stderr, "bench conv: --tf32 applies to --device cuda only\n");
            return 2;
        }
        return 0;
    }
#ifdef TERRASEG_HAVE_CUDA
    d->cuda = 1;
    d->tf32 = o->tf32;
    ts_cuda_set_tf32(o->tf32); /* before the backend exists: its first plans already see it */
    ts_cuda_set_benchmark(o->cudnn_benchmark);
    if (ts_backend_get(o->device, backend) != TS_OK) {
        fprintf(stderr, "bench conv: %s\n", ts_last_error());
        return 1;
    }
    cublasStatus_t e = cublasCreate(&d->blas);
    if (e == CUBLAS_STATUS_SUCCESS)
        e = cublasSetMathMode(d->blas, o->tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH);
    if (e != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "bench conv: cuBLAS handle for the sgemm reference: %s\n", cublas_status(e));
        if (d->blas) cublasDestroy(d->blas);
        d->blas = NULL;
        return 1;
    }
    return 0;
#else
    /* ts_backend_get says that and how this build lacks CUDA. */
    if (ts_backend_get(o->device, backend) != TS_OK) fprintf(stderr, "bench conv: %s\n", ts_last_error());
    *backend = NULL;
    return 2;
#endif
}

static void dev_close(bench_dev *d)
{
#ifdef TERRASEG_HAVE_CUDA
    if (d->blas) cublasDestroy(d->blas);
#endif
    memset(d, 0, sizeof *d);
}

int ts_bench_conv(const ts_bench_opts *o)
{
    if (o->batch < 1 || o->size < 32 || o->in_channels < 1 || o->classes < 1 || o->iters < 1) {
        fprintf(stderr, "bench conv: need batch >= 1, size >= 32, in_channels >= 1, classes >= 1, iters >= 1 "
                        "(got %d, %d, %d, %d, %d)\n", o->batch, o->size, o->in_channels, o->classes, o->iters);
        return 1;
    }
    const int threads = ts_threads_count(); /* also sets threads up if the caller did not */
    bench_dev dev;
    const ts_backend *backend = NULL;
    int rc = dev_open(&dev, o, &backend);
    if (rc) return rc;
    char devname[48];
    snprintf(devname, sizeof devname, "%s%s", dev.cuda ? o->device : "cpu", dev.tf32 ? "+tf32" : "");
    csv_out csv = {0};
    if (o->csv && csv_open(&csv, o->csv)) {
        dev_close(&dev);
        return 1;
    }
    double peak = 0;
    if (!dev.cuda) {
        char blas[256];
        ts_blas_describe(blas, sizeof blas);
        printf("%s\n", blas);
        peak = sgemm_square(1024, o->iters < 3 ? 3 : o->iters);
        printf("sgemm 1024x1024x1024: %.1f GFLOP/s (reference peak for the columns below)\n\n", peak);
    } else {
#ifdef TERRASEG_HAVE_CUDA
        char desc[512];
        ts_cuda_describe(desc, sizeof desc);
        printf("device %s; %s\n", o->device, desc);
        printf("fp32 convs through cuDNN (heuristic algorithm choice, no timed search), TF32 %s, determinism off; "
               "device buffers, times = mean of %d back-to-back calls between two synchronizations, after 2 "
               "warm-ups\n",
               dev.tf32 ? "on" : "off", o->iters);
        peak = cublas_sgemm_gflops(dev.blas, 4096, 4096, 4096, o->iters < 5 ? 5 : o->iters);
        if (peak <= 0) {
            csv_close(&csv, 0);
            dev_close(&dev);
            return 1;
        }
        printf("cuBLAS sgemm 4096x4096x4096 (TF32 %s): %.1f GFLOP/s (reference peak for the columns below)\n\n",
               dev.tf32 ? "on" : "off", peak);
#endif
    }

    conv_shape shapes[32];
    const int nshapes = model_shapes(o, shapes);

    ts_ctx ctx;
    ts_ctx_init(&ctx, backend);
    printf("%-40s %-10s %-4s %-9s %5s %7s | %7s %7s %7s %7s | %8s %8s\n", "layer", "Cin->Cout", "k/s", "out HxW",
           "count", "GFLOP", "fwd", "bwd-dat", "bwd-flt", "gemm", "fwd ms", "f+b ms");
    printf("%-40s %-10s %-4s %-9s %5s %7s | %31s | %17s\n", "", "", "", "", "", "(1 fwd)",
           dev.cuda ? "GFLOP/s (gemm: batch, cuBLAS)" : "GFLOP/s (gemm: same shape)", "per call");

    double total_fwd = 0, total_fb = 0, total_flop = 0, total_flop_fb = 0;
    const int ms_digits = dev.cuda ? 4 : 2; /* a GPU conv takes microseconds */
    for (int i = 0; i < nshapes && rc == 0; i++) {
        const conv_shape *s = &shapes[i];
        const ts_conv2d_params p = {.stride_h = s->stride, .stride_w = s->stride, .pad_h = s->pad, .pad_w = s->pad};
        const int ho = ts_conv_out_size(s->in_h, s->k, s->stride, s->pad);
        const int wo = ts_conv_out_size(s->in_w, s->k, s->stride, s->pad);
        const int nb = o->batch;
        conv_bufs b = {0};
        if (alloc_bufs(&dev, &b, s, nb, ho, wo) != TS_OK) {
            fprintf(stderr, "bench conv: %s: %s\n", s->name, ts_last_error());
            free_bufs(&dev, &b);
            rc = 1;
            break;
        }

        const double flop = 2.0 * nb * s->cout * (double)ho * wo * s->cin * s->k * s->k;
        const double tf = time_op(&dev, &ctx, OP_FWD, &b, &p, o->iters, s->name);
        const double td = tf < 0 ? -1 : time_op(&dev, &ctx, OP_BWD_DATA, &b, &p, o->iters, s->name);
        const double tw = td < 0 ? -1 : time_op(&dev, &ctx, OP_BWD_FILTER, &b, &p, o->iters, s->name);
        free_bufs(&dev, &b);
        if (tw < 0) {
            rc = 1;
            break;
        }
        const double gemm = layer_gemm(&dev, s->cout, ho * wo, nb, s->cin * s->k * s->k, o->iters);
        /* encoder.conv1's input is the image: training skips its data gradient. */
        const double tfb = tf + (s->needs_dx ? td : 0) + tw;
        total_fwd += s->count * tf;
        total_fb += s->count * tfb;
        total_flop += s->count * flop;
        total_flop_fb += s->count * flop * (s->needs_dx ? 3 : 2);

        char chan[24], ks[16], out[24];
        snprintf(chan, sizeof chan, "%d->%d", s->cin, s->cout);
        snprintf(ks, sizeof ks, "%d/%d", s->k, s->stride);
        snprintf(out, sizeof out, "%dx%d", ho, wo);
        printf("%-40.40s %-10s %-4s %-9s %5d %7.2f | %7.1f %7.1f %7.1f %7.1f | %8.*f %8.*f\n", s->name, chan, ks,
               out, s->count, flop * 1e-9, flop / tf * 1e-9, flop / td * 1e-9, flop / tw * 1e-9, gemm, ms_digits,
               tf * 1e3, ms_digits, tfb * 1e3);
        fflush(stdout);
        csv_row(&csv, s, ho, wo, nb, threads, flop, tf, td, tw, gemm, peak, devname);
    }
    const int on_cuda = dev.cuda;
    ts_ctx_free(&ctx);
    dev_close(&dev);
    if (csv_close(&csv, rc == 0)) return 1;

    printf("\nall convs, count-weighted, batch %d at %dx%d%s%s:\n", o->batch, o->size, o->size,
           on_cuda ? " on " : "", on_cuda ? devname : "");
    printf("  forward:            %9.*f ms  (%.*f ms/image, %.1f GFLOP, %.1f GFLOP/s = %.0f%% of sgemm peak)\n",
           ms_digits - 1, total_fwd * 1e3, ms_digits - 1, total_fwd * 1e3 / o->batch, total_flop * 1e-9,
           total_flop / total_fwd * 1e-9, 100.0 * total_flop / total_fwd * 1e-9 / peak);
    printf("  forward + backward: %9.*f ms  (%.*f ms/image, %.1f GFLOP, %.1f GFLOP/s = %.0f%% of sgemm peak)\n",
           ms_digits - 1, total_fb * 1e3, ms_digits - 1, total_fb * 1e3 / o->batch, total_flop_fb * 1e-9,
           total_flop_fb / total_fb * 1e-9, 100.0 * total_flop_fb / total_fb * 1e-9 / peak);
    printf("  (backward = data + filter gradients; encoder.conv1 needs no data gradient; convs only, no BN/ReLU/"
           "pool/loss)\n");
    return 0;
}
