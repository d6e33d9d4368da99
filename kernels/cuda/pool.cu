/* 2-D max pooling on the GPU (torch.nn.MaxPool2d, dilation 1, ceil_mode
 * False), twin of kernels/cpu/pool.c: forward with arg-max indices, and a
 * deterministic gather backward.
 *
 * Forward is one thread per output with the CPU's window, tie and NaN rules
 * (shared/specs/smp-unet.md section 8.2): the window is clipped to the input
 * (padding is never a candidate, i.e. -inf), the arg-max starts at the
 * clipped window's first element, and a scan over rows then columns replaces
 * it when val > max || isnan(val), so the first of equal values wins and a NaN
 * always wins. Values are copied, so y and index equal the CPU's bit for bit.
 *
 * Backward is dx[index] += dy, where overlapping windows (kernel 3, stride 2)
 * send up to four outputs to one input. A scatter would need float atomics,
 * whose order (and so whose rounding) changes from run to run. Instead each
 * input element gathers: it visits the outputs whose windows can cover it, in
 * increasing (oh, ow), and adds the dy of those whose index names it, onto
 * its own dx. That is exactly the sequence of float additions the CPU makes
 * for that element (it adds in output order), so dx matches the CPU bit for
 * bit, and every run gives the same bits. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda_ops.cuh"

/* Sizes and parameters a kernel needs, passed by value. */
typedef struct pool_dims {
    int H, W, OH, OW;
    int kh, kw, sh, sw, ph, pw;
} pool_dims;

static pool_dims pool_dims_of(const ts_tensor *in, const ts_tensor *out, const ts_pool2d_params *p)
{
    pool_dims d;
    d.H = in->h;
    d.W = in->w;
    d.OH = out->h;
    d.OW = out->w;
    d.kh = p->kernel_h;
    d.kw = p->kernel_w;
    d.sh = p->stride_h;
    d.sw = p->stride_w;
    d.ph = p->pad_h;
    d.pw = p->pad_w;
    return d;
}

/* ---- forward ------------------------------------------------------------- */

/* One thread per output element (plane, oh, ow), the CPU's loop body. */
static __global__ void maxpool_forward_kernel(float *y, int32_t *index, const float *x, pool_dims d, size_t total)
{
    const size_t out_plane = (size_t)d.OH * d.OW, in_plane = (size_t)d.H * d.W;
    for (size_t o = (size_t)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += (size_t)gridDim.x * blockDim.x) {
        const size_t pl = o / out_plane;
        const int r = (int)(o % out_plane), oh = r / d.OW, ow = r % d.OW;
        const float *xp = x + pl * in_plane;
        /* Clip the window to the input: ih1 = min(ih0 + k, H), then
         * ih0 = max(ih0, 0). pad <= k/2 keeps it non-empty. */
        int ih0 = oh * d.sh - d.ph;
        int ih1 = ih0 + d.kh < d.H ? ih0 + d.kh : d.H;
        if (ih0 < 0) ih0 = 0;
        int iw0 = ow * d.sw - d.pw;
        int iw1 = iw0 + d.kw < d.W ? iw0 + d.kw : d.W;
        if (iw0 < 0) iw0 = 0;
        int32_t maxindex = ih0 * d.W + iw0;
        float maxval = -INFINITY;
        for (int ih = ih0; ih < ih1; ih++) {
            for (int iw = iw0; iw < iw1; iw++) {
                float val = xp[ih * d.W + iw];
                if (val > maxval || isnan(val)) {
                    maxval = val;
                    maxindex = ih * d.W + iw;
                }
            }
        }
        y[o] = maxval;
        index[o] = maxindex;
    }
}

extern "C" ts_status ts_cuda_maxpool2d_forward(ts_ctx *ctx, ts_tensor *y, int32_t *index, const ts_tensor *x,
                                               const ts_pool2d_params *p)
{
    static const char op[] = "maxpool2d_forward";
    (void)ctx;
    ts_status st = ts_pool2d_check(op, x, "x", y, "y", p);
    if (st != TS_OK) return st;
    if (!index) return ts_error(TS_ERR_INVALID_ARG, "%s: index must not be NULL", op);
    ts_cuda_state *cs;
    if ((st = ts_ops_state(op, &cs)) != TS_OK) return st;
    const size_t total = ts_tensor_numel(y);
    maxpool_forward_kernel<<<ts_ops_grid(cs, total), TS_OPS_THREADS, 0, cs->stream>>>(y->data, index, x->data,
                                                                                       pool_dims_of(x, y, p), total);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- backward ------------------------------------------------------------ */

/* The index check, one thread per output. The CPU skips (and reports) an
 * index outside the plane, where its scatter would write out of bounds. The
 * gather below only looks for an index inside its own window, so one that is
 * in the plane but outside its window (impossible from forward) would be
 * dropped where the CPU adds it: that is reported too. Integer atomicOr: the
 * flag's final value does not depend on the order. */
enum { BAD_OUTSIDE_PLANE = 1, BAD_OUTSIDE_WINDOW = 2 };

static __global__ void maxpool_index_check_kernel(unsigned *bad, const int32_t *index, pool_dims d, size_t total)
{
    const size_t out_plane = (size_t)d.OH * d.OW;
    const int32_t in_plane = d.H * d.W;
    for (size_t o = (size_t)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += (size_t)gridDim.x * blockDim.x) {
        const int32_t k = index[o];
        if (k < 0 || k >= in_plane) {
            atomicOr(bad, (unsigned)BAD_OUTSIDE_PLANE);
            continue;
        }
        const int r = (int)(o % out_plane), oh = r / d.OW, ow = r % d.OW;
        const int ih = k / d.W, iw = k % d.W;
        const int ih0 = oh * d.sh - d.ph, iw0 = ow * d.sw - d.pw;
        if (ih < ih0 || ih >= ih0 + d.kh || iw < iw0 || iw >= iw0 + d.kw) atomicOr(bad, (unsigned)BAD_OUTSIDE_WINDOW);
    }
}

/* One thread per input element (plane, ih, iw). The outputs whose window
 * rows [oh*sh - ph, oh*sh - ph + kh) hold ih are oh in
 * [ceil((ih + ph - kh + 1) / sh), floor((ih + ph) / sh)], cut to [0, OH);
 * likewise for columns. Clipping the window to the input never removes a
 * valid ih, so this is the clipped window's membership too. */
static __global__ void maxpool_backward_kernel(float *dx, const float *dy, const int32_t *index, pool_dims d,
                                               size_t total)
{
    const size_t out_plane = (size_t)d.OH * d.OW, in_plane = (size_t)d.H * d.W;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const size_t pl = e / in_plane;
        const int k = (int)(e % in_plane), ih = k / d.W, iw = k % d.W;
        const int th = ih + d.ph - d.kh + 1, tw = iw + d.pw - d.kw + 1;
        const int oh0 = th <= 0 ? 0 : (th + d.sh - 1) / d.sh;
        const int ow0 = tw <= 0 ? 0 : (tw + d.sw - 1) / d.sw;
        int oh1 = (ih + d.ph) / d.sh, ow1 = (iw + d.pw) / d.sw; /* inclusive */
        if (oh1 > d.OH - 1) oh1 = d.OH - 1;
        if (ow1 > d.OW - 1) ow1 = d.OW - 1;
        const float *gp = dy + pl * out_plane;
        const int32_t *ip = index + pl * out_plane;
        /* Start from dx and add in output order: the CPU's additions to this
         * element, one by one. An element no output chose keeps its bits
         * (even -0.0), as on the CPU. */
        float acc = dx[e];
        for (int oh = oh0; oh <= oh1; oh++)
            for (int ow = ow0; ow <= ow1; ow++) {
                const int o = oh * d.OW + ow;
                if (ip[o] == k) acc += gp[o];
            }
        dx[e] = acc;
    }
}

extern "C" ts_status ts_cuda_maxpool2d_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy,
                                                const int32_t *index, const ts_pool2d_params *p)
{
    static const char op[] = "maxpool2d_backward";
    static ts_ops_scratch scratch; /* the bad-index flag */
    (void)ctx;
    ts_status st = ts_pool2d_check(op, dx, "dx", dy, "dy", p);
    if (st != TS_OK) return st;
    if (!index) return ts_error(TS_ERR_INVALID_ARG, "%s: index must not be NULL", op);
    ts_cuda_state *cs;
    if ((st = ts_ops_state(op, &cs)) != TS_OK) return st;
    void *buf = NULL;
    if ((st = ts_ops_scratch_get(&scratch, sizeof(unsigned), &buf)) != TS_OK) return st;
    unsigned *bad_dev = (unsigned *)buf;
    const pool_dims d = pool_dims_of(dx, dy, p);
    const size_t nout = ts_tensor_numel(dy), nin = ts_tensor_numel(dx);

    TS_CUDA_CHECK(cudaMemsetAsync(bad_dev, 0, sizeof(unsigned), cs->stream));
    maxpool_index_check_kernel<<<ts_ops_grid(cs, nout), TS_OPS_THREADS, 0, cs->stream>>>(bad_dev, index, d, nout);
    TS_CUDA_LAUNCH_CHECK();
    /* As the CPU, the valid entries are applied even when some are bad. */
    maxpool_backward_kernel<<<ts_ops_grid(cs, nin), TS_OPS_THREADS, 0, cs->stream>>>(dx->data, dy->data, index, d, nin);
    TS_CUDA_LAUNCH_CHECK();
    /* The status must say whether the index was valid, so this op waits for
     * the stream: one small sync per training step (one max-pool in the
     * network), the price of reporting a bad index as the CPU does. */
    unsigned bad = 0;
    TS_CUDA_CHECK(cudaMemcpyAsync(&bad, bad_dev, sizeof bad, cudaMemcpyDeviceToHost, cs->stream));
    TS_CUDA_CHECK(cudaStreamSynchronize(cs->stream));
    const int in_plane = dx->h * dx->w;
    if (bad & BAD_OUTSIDE_PLANE)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: index holds values outside [0, %d), the %dx%d input plane; pass the index written by "
                        "maxpool2d_forward for this input",
                        op, in_plane, dx->h, dx->w);
    if (bad & BAD_OUTSIDE_WINDOW)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: index holds values outside their output's pooling window (kernel (%d,%d), stride (%d,%d), "
                        "pad (%d,%d)); pass the index written by maxpool2d_forward for this input",
                        op, p->kernel_h, p->kernel_w, p->stride_h, p->stride_w, p->pad_h, p->pad_w);
    return TS_OK;
}
