/* Nearest-neighbour resize on the GPU (F.interpolate(mode="nearest") to a
 * given size), twin of kernels/cpu/upsample.c: forward gather, and a
 * deterministic gather backward.
 *
 * The source index per axis is PyTorch's nearest_idx (shared/specs/smp-unet.md
 * section 8.1), computed on the device with the CPU's float operations:
 * out == in copies; out == 2 in takes dst >> 1; otherwise
 * min(floor(dst * s), in - 1) with s = (float)in / out (formed on the host, as
 * the CPU forms it) and the product rounded to float. A single IEEE multiply
 * and a floor leave nvcc nothing to contract, so every index equals the CPU
 * table's and forward copies the CPU's values bit for bit.
 *
 * Backward: several destinations map to one source (2x2 for the 2x case). A
 * scatter would need float atomics, whose order changes the rounding from run
 * to run. Instead each source element finds its destination rows and columns
 * (a contiguous range per axis, since the index is non-decreasing in dst) and
 * adds their dy in increasing (oh, ow) onto its own dx: exactly the CPU's
 * sequence of float additions for that element, so dx matches the CPU bit for
 * bit, run after run. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda_ops.cuh"

/* One axis of the resize: in -> out, and the CPU's float scale. */
typedef struct up_axis {
    int in, out;
    float s; /* (float)in / (float)out, used only by the general rule */
} up_axis;

static up_axis up_axis_of(int in, int out)
{
    up_axis a;
    a.in = in;
    a.out = out;
    a.s = (float)in / (float)out;
    return a;
}

/* nearest_idx(dst, in, out, no scale), the CPU's nearest_table entry. */
static __device__ __forceinline__ int up_src(int d, up_axis a)
{
    if (a.out == a.in) return d;
    if (a.out == 2 * a.in) return d >> 1;
    int src = (int)floorf(__fmul_rn((float)d, a.s));
    return src < a.in - 1 ? src : a.in - 1;
}

/* The first destination whose source is >= v (out if none): a binary search,
 * valid because up_src is non-decreasing in d (int-to-float, a rounded
 * multiply by s >= 0, floor and min are each monotone). */
static __device__ int up_first_dst(int v, up_axis a)
{
    if (a.out == a.in) return v < a.out ? v : a.out;
    if (a.out == 2 * a.in) return 2 * v < a.out ? 2 * v : a.out;
    int lo = 0, hi = a.out;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (up_src(mid, a) >= v)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* ---- forward ------------------------------------------------------------- */

/* One thread per output element: y[pl, oh, ow] = x[pl, src(oh), src(ow)]. */
static __global__ void upsample_forward_kernel(float *y, const float *x, up_axis ah, up_axis aw, size_t total)
{
    const size_t out_plane = (size_t)ah.out * aw.out, in_plane = (size_t)ah.in * aw.in;
    for (size_t o = (size_t)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += (size_t)gridDim.x * blockDim.x) {
        const size_t pl = o / out_plane, r = o % out_plane;
        const int oh = (int)(r / (size_t)aw.out), ow = (int)(r % (size_t)aw.out);
        y[o] = x[pl * in_plane + (size_t)up_src(oh, ah) * aw.in + up_src(ow, aw)];
    }
}

extern "C" ts_status ts_cuda_upsample_nearest_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    static const char op[] = "upsample_nearest_forward";
    (void)ctx;
    ts_status st = ts_upsample_check(op, y, "y", x, "x"); /* the CPU's checks, shared */
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state(op, &cs)) != TS_OK) return st;
    const size_t total = ts_tensor_numel(y);
    upsample_forward_kernel<<<ts_ops_grid(cs, total), TS_OPS_THREADS, 0, cs->stream>>>(
        y->data, x->data, up_axis_of(x->h, y->h), up_axis_of(x->w, y->w), total);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- backward ------------------------------------------------------------ */

/* One thread per source element (pl, ih, iw): its destinations are rows
 * [first(ih), first(ih + 1)) times columns [first(iw), first(iw + 1)), empty
 * for a source no destination reads (a downscale), which then keeps its dx. */
static __global__ void upsample_backward_kernel(float *dx, const float *dy, up_axis ah, up_axis aw, size_t total)
{
    const size_t out_plane = (size_t)ah.out * aw.out, in_plane = (size_t)ah.in * aw.in;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const size_t pl = e / in_plane, r = e % in_plane;
        const int ih = (int)(r / (size_t)aw.in), iw = (int)(r % (size_t)aw.in);
        const int oh0 = up_first_dst(ih, ah), oh1 = up_first_dst(ih + 1, ah);
        const int ow0 = up_first_dst(iw, aw), ow1 = up_first_dst(iw + 1, aw);
        const float *gp = dy + pl * out_plane;
        /* grad_in[ih, iw] += grad_out[oh, ow], oh then ow increasing, onto the
         * caller's dx (our accumulate rule), as the CPU adds them. */
        float acc = dx[e];
        for (int oh = oh0; oh < oh1; oh++) {
            const float *g = gp + (size_t)oh * aw.out;
            for (int ow = ow0; ow < ow1; ow++) acc += g[ow];
        }
        dx[e] = acc;
    }
}

extern "C" ts_status ts_cuda_upsample_nearest_backward(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy)
{
    static const char op[] = "upsample_nearest_backward";
    (void)ctx;
    ts_status st = ts_upsample_check(op, dy, "dy", dx, "dx");
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state(op, &cs)) != TS_OK) return st;
    const size_t total = ts_tensor_numel(dx);
    upsample_backward_kernel<<<ts_ops_grid(cs, total), TS_OPS_THREADS, 0, cs->stream>>>(
        dx->data, dy->data, up_axis_of(dx->h, dy->h), up_axis_of(dx->w, dy->w), total);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}
