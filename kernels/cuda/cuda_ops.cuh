/* Shared by the CUDA twins of the CPU's elementwise, pool, upsample, loss and
 * AdamW files (the .cu files of kernels/cuda): the
 * launch sizing, and a small grow-only device scratch buffer.
 *
 * Only .cu files include this; CMake compiles *.c and *.cu, never *.cuh. */
#ifndef TS_CUDA_OPS_CUH
#define TS_CUDA_OPS_CUH

#include <stddef.h>
#include <stdint.h>

#include "cuda_internal.h"

/* Threads per block of every kernel in these files: a multiple of the warp and
 * a power of two (the fixed-order tree reductions halve it). */
#define TS_OPS_THREADS 256
/* Resident blocks per multiprocessor aimed at by grid-stride launches: 8 x 256
 * threads is 2048, the most an H100/H200 SM holds, enough to cover memory
 * latency in these bandwidth-bound loops. */
#define TS_OPS_BLOCKS_PER_SM 8

/* The backend's state, or an error naming the op if ts_cuda_backend() has not
 * set it up (ops are reached through the table it returns, so this only fires
 * when someone calls a ts_cuda_ op directly). Also makes the backend's
 * device current on the calling thread, as the conv and BN ops do: the
 * current device is per host thread, and an op may run on another thread
 * than the one that chose it. */
static inline ts_status ts_ops_state(const char *op, ts_cuda_state **out)
{
    ts_cuda_state *s = ts_cuda_state_get();
    *out = s;
    if (!s || !s->initialized)
        return ts_error(TS_ERR_INVALID_ARG, "%s: the CUDA backend is not initialized (get it from ts_cuda_backend first)",
                        op);
    TS_CUDA_USE_DEVICE(s->device);
    return TS_OK;
}

/* ts_ops_state for the ops that hand a result to the host (the losses,
 * sum_squares) or wait for the device to report bad input (max-pool
 * backward's index check): a CUDA graph cannot hold their copy or wait, so
 * while one is being recorded they refuse at once, before queueing anything,
 * as backend.h promises, instead of failing the recording halfway. */
static inline ts_status ts_ops_state_host(const char *op, ts_cuda_state **out)
{
    ts_status st = ts_ops_state(op, out);
    if (st == TS_OK && (*out)->capturing)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: cannot be recorded in a CUDA graph (it returns a result to the host); call it outside "
                        "the recording",
                        op);
    return st;
}

/* For the half (NHWC) reductions' row loops, whose body is one load and
 * one add: unrolled, each thread has several loads in flight (the adds keep
 * their order, so their bits, but a load no longer waits for the add before
 * it). That matters where a layer's few channels give the reduction few
 * blocks: at most 256 when C <= 32 (decoder blocks 4 and 5, the head). The
 * NCHW loops' wrap-around branches would keep the loads apart anyway. */
#define TS_RED_UNROLL _Pragma("unroll 4")

/* Blocks for a grid-stride loop over n items: enough to fill every SM (the
 * blocks of TS_OPS_THREADS that fit at once), never more than the items
 * need, at least one. Results never depend on it: each item is written by
 * exactly one thread whatever the grid. */
static inline size_t ts_ops_resident_blocks(const ts_cuda_state *s)
{
    return (size_t)(s->sm_count > 0 ? s->sm_count : 1) * TS_OPS_BLOCKS_PER_SM;
}

static inline unsigned ts_ops_grid(const ts_cuda_state *s, size_t n)
{
    size_t cap = ts_ops_resident_blocks(s);
    size_t blocks = (n + TS_OPS_THREADS - 1) / TS_OPS_THREADS;
    if (blocks > cap) blocks = cap;
    return blocks ? (unsigned)blocks : 1u;
}

/* A grow-only device buffer private to one .cu file (each includer gets its
 * own static instance): the per-block partial sums of the reductions, the
 * loss ops' class weights and Dice gradients. It lives only within one op
 * call, and the ops run in order on the one stream, so the next call may
 * reuse it at once; growing waits for the device before freeing the old
 * buffer. Single-threaded, as the backend is. Never freed: it is a few KiB
 * to MiB per process, like the state itself. */
typedef struct ts_ops_scratch {
    void *p;
    size_t bytes;
} ts_ops_scratch;

static inline ts_status ts_ops_scratch_get(ts_ops_scratch *s, size_t bytes, void **out)
{
    *out = NULL;
    if (bytes > s->bytes) {
        ts_cuda_state *cs = ts_cuda_state_get();
        /* Growing waits and allocates, which a CUDA graph cannot hold. */
        if (cs->capturing)
            return ts_error(TS_ERR_INVALID_ARG,
                            "CUDA op scratch: %zu bytes needed while a CUDA graph is being recorded; run the ops once "
                            "without recording first",
                            bytes);
        /* A kernel of an earlier call may still read the old buffer: wait for
         * the device before freeing it (cudaFree would too, implicitly; this
         * does not rely on it). Growth is rare: the sizes settle at once. A
         * graph recorded with the old buffer is stale from now on. */
        cs->workspace_generation++;
        if (s->p) {
            TS_CUDA_CHECK(cudaDeviceSynchronize());
            TS_CUDA_CHECK(cudaFree(s->p));
        }
        s->p = NULL;
        s->bytes = 0;
        /* Round up to 64 KiB so a slowly growing request does not free and
         * reallocate on every call. */
        size_t want = (bytes + ((size_t)1 << 16) - 1) & ~(((size_t)1 << 16) - 1);
        TS_CUDA_CHECK(cudaMalloc(&s->p, want));
        s->bytes = want;
    }
    *out = s->p;
    return TS_OK;
}

/* Sum of one double per thread over the block, in a fixed tree order (so the
 * bits depend only on the values each thread brings, never on timing). red is
 * TS_OPS_THREADS doubles of shared memory. Every thread must call it; the sum
 * is returned to thread 0 (others get a partial). red is free for reuse on
 * return. */
static __device__ __forceinline__ double ts_block_sum(double v, double *red)
{
    const unsigned t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (unsigned s = TS_OPS_THREADS / 2; s > 0; s >>= 1) {
        if (t < s) red[t] += red[t + s];
        __syncthreads();
    }
    double r = red[0];
    __syncthreads(); /* everyone has read red[0] before the next call writes it */
    return r;
}

#ifdef TS_OPS_WANT_REDUCE /* only the files with reductions, so no unused static kernel elsewhere */
/* out[g * per + k] = sum over b < nb of part[(g * nb + b) * per + k]: one block
 * per output value, each thread adding a fixed strided subset of the b in
 * order, then the tree. The partials are the per-block sums of a reduction
 * kernel (nb blocks per group g), so the whole reduction has a fixed shape
 * for a given problem size: same inputs, same bits, on any GPU. Launch with
 * groups * per blocks of TS_OPS_THREADS threads. */
static __global__ void ts_reduce_partials_kernel(const double *part, double *out, size_t nb, size_t per)
{
    __shared__ double red[TS_OPS_THREADS];
    const size_t g = blockIdx.x / per, k = blockIdx.x % per;
    double acc = 0;
    for (size_t b = threadIdx.x; b < nb; b += TS_OPS_THREADS) acc += part[(g * nb + b) * per + k];
    acc = ts_block_sum(acc, red);
    if (threadIdx.x == 0) out[blockIdx.x] = acc;
}
#endif

/* ---- element types of the half paths (kernels/tensor.h) ------------------- */
#if defined(__CUDACC__) || defined(TS_CUDA_EMU) /* nvcc, or the host build of tests/cuda_emu */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

/* ts_el_ld widens an element to float32 (exact for all three types);
 * ts_el_st<T> rounds a float32 once to T, to nearest even (out of range gives
 * infinity), as kernels/backend.h asks of every half op. For float both are
 * the identity, which keeps the float32 kernels' operations (and bits). */
static __device__ __forceinline__ float ts_el_ld(float v) { return v; }
static __device__ __forceinline__ float ts_el_ld(__nv_bfloat16 v) { return __bfloat162float(v); }
static __device__ __forceinline__ float ts_el_ld(__half v) { return __half2float(v); }

template <typename T> static __device__ __forceinline__ T ts_el_st(float v);
template <> __device__ __forceinline__ float ts_el_st<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 ts_el_st<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half ts_el_st<__half>(float v) { return __float2half_rn(v); }

/* float32 tensors are NCHW, the half types NHWC. */
template <typename T> struct ts_el_nhwc {
    static constexpr bool value = true;
};
template <> struct ts_el_nhwc<float> {
    static constexpr bool value = false;
};

/* A tensor's elements as T (data and half alias one pointer). */
template <typename T> static inline T *ts_el_ptr(const ts_tensor *t) { return reinterpret_cast<T *>(t->data); }

/* Runs LAUNCH(T) with T the C++ type of dtype. The ops' checks have already
 * refused an unknown dtype, so the default is float32. */
#define TS_EL_DISPATCH(dtype, LAUNCH) \
    switch (dtype) {                  \
    case TS_BF16:                     \
        LAUNCH(__nv_bfloat16);        \
        break;                        \
    case TS_F16:                      \
        LAUNCH(__half);               \
        break;                        \
    default:                          \
        LAUNCH(float);                \
        break;                        \
    }
#endif

#endif
