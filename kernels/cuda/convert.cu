/* The convert op on the GPU, twin of ts_cpu_convert (kernels/cpu/half.c):
 * y = x or y += x between any two of float32 (NCHW), bf16 and fp16 (both
 * NHWC), each element widened to float32 (exact), added to y's widened old
 * value when accumulating, and rounded once to y's type with CUDA's
 * round-to-nearest-even intrinsics (__float2bfloat16_rn, __float2half_rn),
 * which round as kernels/half.h does on the host.
 *
 * Three cases, by layout:
 *  - one dtype, no accumulate: a plain device copy (nothing for y == x);
 *  - one layout otherwise (one dtype accumulating, y == x doubling in place
 *    included, or bf16 <-> fp16): a flat loop, one thread per element, which
 *    reads x[i] and y[i] before it writes y[i];
 *  - float32 NCHW <-> half NHWC: per image, the transpose of a C x HW (or
 *    HW x C) matrix through a 32 x 32 shared-memory tile, so that both the
 *    reads and the writes run along contiguous memory. When C or H*W is 1
 *    the two layouts are one, and the flat loop does it (1x1 conv weights).
 *
 * Each element of y is written by exactly one thread, with one float32 add
 * at most and one rounding, so the result is the CPU's bit for bit (but for
 * the bits of a NaN: CUDA's narrowing gives the canonical NaN 0x7fff) and
 * never depends on the grid. The argument checks are the CPU's
 * (ts_convert_check, kernels/ops_common.c). */
#include <stddef.h>
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_ops.cuh"

/* The new value of one element of y: x's, or the float32 sum with y's old one
 * (y == x in place reads the element once for each, before the write). */
template <typename TY> static __device__ __forceinline__ void cv_put(TY *py, float v, int accumulate)
{
    *py = ts_el_st<TY>(accumulate ? ts_el_ld(*py) + v : v);
}

/* ---- one layout: a flat loop ------------------------------------------------ */

/* No __restrict__: y may be x (an in-place doubling). */
template <typename TY, typename TX>
static __global__ void convert_flat_kernel(TY *y, const TX *x, size_t n, int accumulate)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        cv_put<TY>(y + i, ts_el_ld(x[i]), accumulate);
}

/* ---- NCHW <-> NHWC: a tiled transpose ------------------------------------- */

/* Per image, x is an R x S matrix (rows contiguous) and y its S x R
 * transpose: R = C, S = H*W from NCHW to NHWC, and the other way round.
 * A block of TS_OPS_THREADS threads moves one CV_TILE x CV_TILE tile at a
 * time: it reads the tile with consecutive threads on consecutive s (x's
 * contiguous index), widened into shared memory, then writes it with
 * consecutive threads on consecutive r (y's contiguous index). The padding
 * column keeps the column reads free of bank conflicts. */
#define CV_TILE 32
#define CV_TILE_ROWS (TS_OPS_THREADS / CV_TILE) /* rows of the tile each pass covers */

template <typename TY, typename TX>
static __global__ void convert_transpose_kernel(TY *y, const TX *x, size_t R, size_t S, size_t tiles_r,
                                                size_t tiles_s, size_t tiles, int accumulate)
{
    __shared__ float tile[CV_TILE][CV_TILE + 1];
    const unsigned tx = threadIdx.x % CV_TILE, ty = threadIdx.x / CV_TILE;
    /* The tile loop's bounds depend on the block alone, so every thread of a
     * block reaches each __syncthreads. Tiles of one image are consecutive,
     * s fastest, so neighbouring blocks read neighbouring memory. */
    for (size_t t = blockIdx.x; t < tiles; t += gridDim.x) {
        const size_t ts = t % tiles_s, rest = t / tiles_s, tr = rest % tiles_r, img = rest / tiles_r;
        const size_t r0 = tr * CV_TILE, s0 = ts * CV_TILE;
        const TX *xi = x + img * R * S;
        TY *yi = y + img * R * S;
        for (unsigned j = ty; j < CV_TILE; j += CV_TILE_ROWS) {
            const size_t r = r0 + j, s = s0 + tx;
            if (r < R && s < S) tile[j][tx] = ts_el_ld(xi[r * S + s]);
        }
        __syncthreads();
        for (unsigned j = ty; j < CV_TILE; j += CV_TILE_ROWS) {
            const size_t s = s0 + j, r = r0 + tx;
            if (r < R && s < S) cv_put<TY>(yi + s * R + r, tile[tx][j], accumulate);
        }
        __syncthreads(); /* the tile is read before the next one is written */
    }
}

/* ---- launch ------------------------------------------------------------------ */

template <typename TY, typename TX>
static ts_status convert_launch(const ts_cuda_state *cs, ts_tensor *y, const ts_tensor *x, int accumulate)
{
    const size_t n = ts_tensor_numel(x);
    const size_t C = (size_t)x->c, HW = (size_t)x->h * x->w;
    /* Only the pairs of different layouts instantiate the transpose. */
    if constexpr (ts_el_nhwc<TY>::value != ts_el_nhwc<TX>::value) {
        if (C > 1 && HW > 1) {
            const size_t R = ts_el_nhwc<TX>::value ? HW : C, S = ts_el_nhwc<TX>::value ? C : HW;
            const size_t tiles_r = (R + CV_TILE - 1) / CV_TILE, tiles_s = (S + CV_TILE - 1) / CV_TILE;
            const size_t tiles = (size_t)x->n * tiles_r * tiles_s;
            /* As ts_ops_grid, in tiles: enough blocks to fill every SM, never
             * more than there are tiles. */
            size_t blocks = (size_t)(cs->sm_count > 0 ? cs->sm_count : 1) * TS_OPS_BLOCKS_PER_SM;
            if (blocks > tiles) blocks = tiles;
            convert_transpose_kernel<TY, TX><<<(unsigned)blocks, TS_OPS_THREADS, 0, cs->stream>>>(
                ts_el_ptr<TY>(y), ts_el_ptr<TX>(x), R, S, tiles_r, tiles_s, tiles, accumulate);
            TS_CUDA_LAUNCH_CHECK();
            return TS_OK;
        }
    }
    convert_flat_kernel<TY, TX><<<ts_ops_grid(cs, n), TS_OPS_THREADS, 0, cs->stream>>>(ts_el_ptr<TY>(y), ts_el_ptr<TX>(x), n,
                                                                                      accumulate);
    TS_CUDA_LAUNCH_CHECK();
    return TS_OK;
}

/* x's dtype, once y's is fixed (ts_convert_check has refused unknown ones). */
template <typename TY>
static ts_status convert_from(const ts_cuda_state *cs, ts_tensor *y, const ts_tensor *x, int accumulate)
{
    switch (x->dtype) {
    case TS_BF16:
        return convert_launch<TY, __nv_bfloat16>(cs, y, x, accumulate);
    case TS_F16:
        return convert_launch<TY, __half>(cs, y, x, accumulate);
    default:
        return convert_launch<TY, float>(cs, y, x, accumulate);
    }
}

extern "C" ts_status ts_cuda_convert(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, int accumulate)
{
    (void)ctx;
    ts_status st = ts_convert_check(y, x); /* shapes, dtypes, overlap */
    if (st != TS_OK) return st;
    ts_cuda_state *cs;
    if ((st = ts_ops_state("convert", &cs)) != TS_OK) return st;
    accumulate = accumulate ? 1 : 0;
    if (y->dtype == x->dtype && !accumulate) {
        /* Same dtype, same layout: the bytes themselves (a NaN keeps its bits,
         * as the CPU's memcpy). y == x is the one overlap the check lets by. */
        if (y->data != x->data)
            TS_CUDA_CHECK(
                cudaMemcpyAsync(y->data, x->data, ts_tensor_bytes(x), cudaMemcpyDeviceToDevice, cs->stream));
        return TS_OK;
    }
    switch (y->dtype) {
    case TS_BF16:
        return convert_from<__nv_bfloat16>(cs, y, x, accumulate);
    case TS_F16:
        return convert_from<__half>(cs, y, x, accumulate);
    default:
        return convert_from<float>(cs, y, x, accumulate);
    }
}
