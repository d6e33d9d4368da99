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
 * bit, and every run gives the same bits.
 *
 * Mixed precision: x, y, dx, dy may also be bf16 or fp16, stored NHWC. The
 * kernels are templated on the element type, which fixes the layout (float32
 * NCHW, half NHWC): a thread still owns one element of y (forward) or dx
 * (backward), walked in memory order so loads and stores are coalesced, and
 * a pixel (ih, iw) of its (n, c) plane sits C elements after the previous
 * one instead of 1. index keeps its meaning and its layout in every dtype:
 * int32 [N, C, OH, OW] in logical (NCHW) order, each entry ih * W + iw in
 * the plane, as kernels/cpu/half.c produces it (the float32 op on widened
 * copies). Widening to float32 is exact and monotonic, so the compares, the
 * tie rule and NaN pick the same arg-max as the float32 op; y gets the
 * chosen element itself (a NaN keeps its bits). Backward widens dx, adds the
 * chosen dy in float32 in the same output order, and rounds once (an
 * element no output chose is not written). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_ops.cuh"


/* Sizes and parameters a kernel needs, passed by value. */
typedef struct pool_dims {
    int C, H, W, OH, OW;
    int kh, kw, sh, sw, ph, pw;
} pool_dims;

static pool_dims pool_dims_of(const ts_tensor *in, const ts_tensor *out, const ts_pool2d_params *p)
{
    pool_dims d;
    d.C = in->c;
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

/* One thread per output element o, in y's memory order, the CPU's loop body.
 * For o's (n, c) plane, xp points at the input pixel (0, 0) and cs is the
 * step from one pixel to the next (1 in NCHW, C in NHWC); io is o's entry
 * of index, which is in NCHW order in every dtype (o itself for float32). */
template <typename T>
static __global__ void maxpool_forward_kernel(T *y, int32_t *index, const T *x, pool_dims d, size_t total)
{
    const size_t out_plane = (size_t)d.OH * d.OW, in_plane = (size_t)d.H * d.W;
    for (size_t o = (size_t)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += (size_t)gridDim.x * blockDim.x) {
        const T *xp;
        size_t cs, io;
        int r;
        if constexpr (ts_el_nhwc<T>::value) {
            const size_t c = o % (size_t)d.C, pix = o / (size_t)d.C, img = pix / out_plane;
            r = (int)(pix % out_plane);
            xp = x + img * in_plane * d.C + c;
            cs = (size_t)d.C;
            io = (img * d.C + c) * out_plane + (size_t)r;
        } else {
            r = (int)(o % out_plane);
            xp = x + (o / out_plane) * in_plane;
            cs = 1;
            io = o;
        }
        const int oh = r / d.OW, ow = r % d.OW;
        /* Clip the window to the input: ih1 = min(ih0 + k, H), then
         * ih0 = max(ih0, 0). pad <= k/2 keeps it non-empty. */
        int ih0 = oh * d.sh - d.ph;
        int ih1 = ih0 + d.kh < d.H ? ih0 + d.kh : d.H;
        if (ih0 < 0) ih0 = 0;
        int iw0 = ow * d.sw - d.pw;
        int iw1 = iw0 + d.kw < d.W ? iw0 + d.kw : d.W;
        if (iw0 < 0) iw0 = 0;
        int32_t maxindex = ih0 * d.W + iw0;
        /* Compared widened (exact and monotonic, so the half types pick the
         * float32 op's arg-max); the chosen element itself is stored. */
        float maxval = -INFINITY;
        T maxelem = ts_el_st<T>(-INFINITY);
        for (int ih = ih0; ih < ih1; ih++) {
            for (int iw = iw0; iw < iw1; iw++) {
                const T e = xp[(size_t)(ih * d.W + iw) * cs];
                const float val = ts_el_ld(e);
                if (val > maxval || isnan(val)) {
                    maxval = val;
                    maxelem = e;
                    maxindex = ih * d.W + iw;
                }
            }
        }
        y[o] = maxelem;
        index[io] = maxindex;
    }
}

extern "C" ts_status ts_cuda_maxpool2d_forward(ts_ctx *ctx, ts_tensor *y, int32_t *index, const ts_tensor *x,
                                               const ts_pool2d_params *p)
{
    static const char op[] = "maxpool2d_forward";
    (void)ctx;
    ts_status st = ts_pool2d_check(op, x, "x", y, "y", p); /* shapes, and one dtype */
    if (st != TS_OK) return st;
    if (!index) return ts_error(TS_ERR_INVALID_ARG, "%s: index must not be NULL", op);
    ts_cuda_state *cs;
    if ((st = ts_ops_state(op, &cs)) != TS_OK) return st;
    const size_t total = ts_tensor_numel(y);
    const pool_dims d = pool_dims_of(x, y, p);
#define LAUNCH(T)                                                                                              \
    maxpool_forward_kernel<T><<<ts_ops_grid(cs, total), TS_OPS_THREADS, 0, cs->stream>>>(ts_el_ptr<T>(y), index, \
                                                                                         ts_el_ptr<T>(x), d, total)
    TS_EL_DISPATCH(x->dtype, LAUNCH)
#undef LAUNCH
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- backward ------------------------------------------------------------ */

/* The index check, one thread per output (index is NCHW in every dtype, so
 * this is dtype-blind). The CPU skips (and reports) an
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

/* One thread per input element e (plane, ih, iw), in dx's memory order. The
 * outputs whose window rows [oh*sh - ph, oh*sh - ph + kh) hold ih are oh in
 * [ceil((ih + ph - kh + 1) / sh), floor((ih + ph) / sh)], cut to [0, OH);
 * likewise for columns. Clipping the window to the input never removes a
 * valid ih, so this is the clipped window's membership too. gp and ip point
 * at the plane's dy and index; cs is dy's step from one pixel to the next
 * (1 in NCHW, C in NHWC; index is NCHW in every dtype). */
template <typename T>
static __global__ void maxpool_backward_kernel(T *dx, const T *dy, const int32_t *index, pool_dims d, size_t total)
{
    const size_t out_plane = (size_t)d.OH * d.OW, in_plane = (size_t)d.H * d.W;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const T *gp;
        const int32_t *ip;
        size_t cs;
        int k;
        if constexpr (ts_el_nhwc<T>::value) {
            const size_t c = e % (size_t)d.C, pix = e / (size_t)d.C, img = pix / in_plane;
            k = (int)(pix % in_plane);
            gp = dy + img * out_plane * d.C + c;
            ip = index + (img * d.C + c) * out_plane;
            cs = (size_t)d.C;
        } else {
            const size_t pl = e / in_plane;
            k = (int)(e % in_plane);
            gp = dy + pl * out_plane;
            ip = index + pl * out_plane;
            cs = 1;
        }
        const int ih = k / d.W, iw = k % d.W;
        const int th = ih + d.ph - d.kh + 1, tw = iw + d.pw - d.kw + 1;
        const int oh0 = th <= 0 ? 0 : (th + d.sh - 1) / d.sh;
        const int ow0 = tw <= 0 ? 0 : (tw + d.sw - 1) / d.sw;
        int oh1 = (ih + d.ph) / d.sh, ow1 = (iw + d.pw) / d.sw; /* inclusive */
        if (oh1 > d.OH - 1) oh1 = d.OH - 1;
        if (ow1 > d.OW - 1) ow1 = d.OW - 1;
        /* Start from dx and add in output order, in float32: the CPU's
         * additions to this element, one by one (on its widened copy for a
         * half type), then one rounding. An element no output chose is not
         * written, so it keeps its bits (even -0.0 or a NaN's payload), as
         * on the CPU. */
        float acc = ts_el_ld(dx[e]);
        bool hit = false;
        for (int oh = oh0; oh <= oh1; oh++)
            for (int ow = ow0; ow <= ow1; ow++) {
                const int o = oh * d.OW + ow;
                if (ip[o] == k) {
                    acc += ts_el_ld(gp[(size_t)o * cs]);
                    hit = true;
                }
            }
        if (hit) dx[e] = ts_el_st<T>(acc);
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
    if ((st = ts_ops_state_host(op, &cs)) != TS_OK) return st;
    void *buf = NULL;
    if ((st = ts_ops_scratch_get(&scratch, sizeof(unsigned), &buf)) != TS_OK) return st;
    unsigned *bad_dev = (unsigned *)buf;
    const pool_dims d = pool_dims_of(dx, dy, p);
    const size_t nout = ts_tensor_numel(dy), nin = ts_tensor_numel(dx);

    TS_CUDA_CHECK(cudaMemsetAsync(bad_dev, 0, sizeof(unsigned), cs->stream));
    maxpool_index_check_kernel<<<ts_ops_grid(cs, nout), TS_OPS_THREADS, 0, cs->stream>>>(bad_dev, index, d, nout);
    TS_CUDA_LAUNCH_CHECK();
    /* As the CPU, the valid entries are applied even when some are bad. */
#define LAUNCH(T)                                                                        \
    maxpool_backward_kernel<T><<<ts_ops_grid(cs, nin), TS_OPS_THREADS, 0, cs->stream>>>( \
        ts_el_ptr<T>(dx), ts_el_ptr<T>(dy), index, d, nin)
    TS_EL_DISPATCH(dy->dtype, LAUNCH)
#undef LAUNCH
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
