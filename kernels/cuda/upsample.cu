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
 * bit, run after run.
 *
 * Mixed precision: x, y, dx, dy may also be bf16 or fp16, stored NHWC. The
 * kernels are templated on the element type, which fixes the layout (float32
 * NCHW, half NHWC); a thread still owns one element of y or dx, walked in
 * memory order (coalesced), and the pixels of its (n, c) plane are C
 * elements apart instead of 1. The index rule is the same. Forward copies
 * the element (what kernels/cpu/half.c's widen, copy, round gives, and a NaN
 * keeps its bits); backward widens dx, adds the same dy elements in the same
 * order in float32, and rounds once. */
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

/* y[n, c, oh, ow] = x[n, c, src(oh), src(ow)], by output rows: a row is
 * (n, c, oh) of out_w elements in NCHW, or (n, oh) of out_w * C elements in
 * NHWC, contiguous in y either way. Block rows take output rows
 * (blockIdx.y, strided), so a row's source row is found once, and threads
 * stride over the row's elements: none of the per-element divisions the
 * flat index would need (three, 64-bit in the worst case, which made this
 * copy bound by integer work), but one 32-bit one in NHWC for (ow, c). The
 * element is copied, not rounded. */
template <typename T>
static __global__ void upsample_forward_kernel(T *y, const T *x, up_axis ah, up_axis aw, int C, size_t rows)
{
    const unsigned cs = ts_el_nhwc<T>::value ? (unsigned)C : 1u; /* elements from one pixel to the next */
    const unsigned len = (unsigned)aw.out * cs;                  /* elements per output row (checked) */
    const size_t in_row = (size_t)aw.in * cs;
    for (size_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const size_t plane = r / (size_t)ah.out; /* (n, c) in NCHW, n in NHWC */
        const int oh = (int)(r - plane * (size_t)ah.out);
        const T *src = x + (plane * (size_t)ah.in + (size_t)up_src(oh, ah)) * in_row;
        T *dst = y + r * (size_t)len;
        for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < len; j += gridDim.x * blockDim.x) {
            const unsigned ow = cs == 1u ? j : j / cs, c = j - ow * cs;
            dst[j] = src[(size_t)up_src((int)ow, aw) * cs + c];
        }
    }
}

extern "C" ts_status ts_cuda_upsample_nearest_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x)
{
    static const char op[] = "upsample_nearest_forward";
    (void)ctx;
    ts_status st = ts_upsample_check(op, y, "y", x, "x"); /* the CPU's checks, shared (one dtype too) */
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state(op, &cs)) != TS_OK) return st;
    const up_axis ah = up_axis_of(x->h, y->h), aw = up_axis_of(x->w, y->w);
    const int nhwc = x->dtype != TS_F32;
    const size_t len = (size_t)y->w * (nhwc ? (size_t)y->c : 1u);
    const size_t rows = (size_t)y->n * (nhwc ? 1u : (size_t)y->c) * (size_t)y->h;
    if (len > UINT_MAX) {
        char s[TS_SHAPE_STR];
        return ts_error(TS_ERR_UNSUPPORTED, "%s: y %s has 2^32 or more elements per row; use a narrower tile", op,
                        ts_shape_str(y, s));
    }
    /* Threads across a row (a warp multiple, no wider than the row), block
     * rows down the rows: about one full wave of resident threads, as
     * ts_ops_grid sizes the flat loops. Any grid gives the same copy. */
    const unsigned threads = len >= TS_OPS_THREADS ? TS_OPS_THREADS : (unsigned)((len + 31) / 32 * 32);
    const size_t cap = ts_ops_resident_blocks(cs) * (size_t)(TS_OPS_THREADS / threads);
    size_t gx = (len + threads - 1) / threads;
    if (gx > cap) gx = cap;
    size_t gy = cap / gx;
    if (gy > rows) gy = rows;
    if (gy > 65535) gy = 65535;
    if (gy < 1) gy = 1;
    const dim3 grid((unsigned)gx, (unsigned)gy);
#define LAUNCH(T)                                                                                                  \
    upsample_forward_kernel<T><<<grid, threads, 0, cs->stream>>>(ts_el_ptr<T>(y), ts_el_ptr<T>(x), ah, aw, x->c, \
                                                                 rows)
    TS_EL_DISPATCH(x->dtype, LAUNCH)
#undef LAUNCH
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* ---- backward ------------------------------------------------------------ */

/* One thread per source element (n, c, ih, iw), in dx's memory order (the
 * plane and pixel step as in forward): its destinations are rows
 * [first(ih), first(ih + 1)) times columns [first(iw), first(iw + 1)), empty
 * for a source no destination reads (a downscale), which then keeps its dx
 * (not even rewritten, so a half NaN keeps its payload). */
template <typename T>
static __global__ void upsample_backward_kernel(T *dx, const T *dy, up_axis ah, up_axis aw, int C, size_t total)
{
    const size_t out_plane = (size_t)ah.out * aw.out, in_plane = (size_t)ah.in * aw.in;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        size_t r, cs;
        const T *gp;
        if constexpr (ts_el_nhwc<T>::value) {
            const size_t c = e % (size_t)C, pix = e / (size_t)C;
            r = pix % in_plane;
            gp = dy + (pix / in_plane) * out_plane * C + c;
            cs = (size_t)C;
        } else {
            r = e % in_plane;
            gp = dy + (e / in_plane) * out_plane;
            cs = 1;
        }
        const int ih = (int)(r / (size_t)aw.in), iw = (int)(r % (size_t)aw.in);
        const int oh0 = up_first_dst(ih, ah), oh1 = up_first_dst(ih + 1, ah);
        const int ow0 = up_first_dst(iw, aw), ow1 = up_first_dst(iw + 1, aw);
        if (oh0 >= oh1 || ow0 >= ow1) continue;
        /* grad_in[ih, iw] += grad_out[oh, ow], oh then ow increasing, onto the
         * caller's dx (our accumulate rule), as the CPU adds them: in float32
         * (on its widened copy for a half type), then one rounding. */
        float acc = ts_el_ld(dx[e]);
        for (int oh = oh0; oh < oh1; oh++) {
            const T *g = gp + (size_t)oh * aw.out * cs;
            for (int ow = ow0; ow < ow1; ow++) acc += ts_el_ld(g[(size_t)ow * cs]);
        }
        dx[e] = ts_el_st<T>(acc);
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
    const up_axis ah = up_axis_of(dx->h, dy->h), aw = up_axis_of(dx->w, dy->w);
#define LAUNCH(T)                                                                           \
    upsample_backward_kernel<T><<<ts_ops_grid(cs, total), TS_OPS_THREADS, 0, cs->stream>>>( \
        ts_el_ptr<T>(dx), ts_el_ptr<T>(dy), ah, aw, dx->c, total)
    TS_EL_DISPATCH(dy->dtype, LAUNCH)
#undef LAUNCH
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}
