/* The CUDA emulator's device side: force-included (g++ -include) ahead of
 * each .cu file of kernels/cuda when the emulator build
 * (-DTERRASEG_CUDA_EMU=ON, tests/cuda_emu/README.md) compiles it as plain
 * C++ for the host, after tests/cuda_emu/rewrite_launches.pl turned every
 * `kernel<<<grid, block, shmem, stream>>>(args)` into
 * `ts_emu_launch_fn(ts_emu_cfg(grid, block, shmem, stream), "kernel", kernel, args)`.
 *
 * A kernel then runs on the CPU, one block at a time, each CUDA thread a
 * coroutine of its own (tests/cuda_emu/runtime.cpp): __syncthreads switches
 * to the block's next thread, so a block's threads really do stop at each
 * barrier together, and __shared__ variables are one static copy that the
 * block's threads share. What this file provides is what nvcc would: the
 * execution-space keywords (empty here), threadIdx and friends, the
 * round-to-nearest intrinsics (the plain C++ operators, which round to
 * nearest; -std=c++17 keeps g++ from contracting them into FMAs), and the
 * atomics the kernels use (a coroutine never switches inside one, so a plain
 * read-modify-write is atomic here). */
#ifndef TS_CUDA_EMU_DEVICE_H
#define TS_CUDA_EMU_DEVICE_H

/* Defined before the CUDA headers, which then keep them (crt/host_defines.h
 * defines each only if it is not yet defined, outside nvcc). */
#define __host__
#define __device__
#define __global__
#define __shared__ static

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <tuple>
#include <utility>

#include <cuda_runtime_api.h>

#ifndef TS_CUDA_EMU
#error "emu_device.h is for the emulator build (TS_CUDA_EMU)"
#endif

/* The kernel's coordinates, set by the emulator before it runs a thread.
 * Plain globals of a plain type: one host thread at a time runs kernels
 * (runtime.cpp's lock), and a thread_local dim3, having a constructor, would
 * cost a call on every read in a kernel's loop. */
extern uint3 threadIdx, blockIdx, blockDim, gridDim;

/* Stops this thread until every thread of its block reached the barrier
 * (runtime.cpp reports a barrier some threads of a block skip). */
void ts_emu_syncthreads(void);
#define __syncthreads() ts_emu_syncthreads()

static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return sqrt(a); }

template <typename T> static inline T atomicOr(T *p, T v)
{
    T old = *p;
    *p = old | v;
    return old;
}
template <typename T> static inline T atomicMin(T *p, T v)
{
    T old = *p;
    if (v < old) *p = v;
    return old;
}
template <typename T> static inline T atomicAdd(T *p, T v)
{
    T old = *p;
    *p = old + v;
    return old;
}

/* ---- launches ------------------------------------------------------------------ */

struct ts_emu_cfg {
    dim3 grid, block;
    size_t shmem;
    cudaStream_t stream;
    ts_emu_cfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = 0) : grid(g), block(b), shmem(s), stream(st) {}
};

/* The type-erased kernel body runtime.cpp runs for every thread: the
 * kernel and a copy of its arguments as the launch converted them (CUDA
 * copies them too, at the launch; a graph replays that copy). */
struct ts_emu_body {
    virtual ~ts_emu_body() {}
    virtual void run() = 0;
};

/* Queues the kernel on cfg.stream (or records it into the stream's graph):
 * takes ownership of body. Errors go to cudaGetLastError, as a real launch's. */
void ts_emu_enqueue_kernel(const ts_emu_cfg &cfg, ts_emu_body *body, const char *name);

template <typename... P> struct ts_emu_kernel_body : ts_emu_body {
    void (*fn)(P...);
    std::tuple<P...> args;
    template <typename... A> ts_emu_kernel_body(void (*f)(P...), A &&...a) : fn(f), args(std::forward<A>(a)...) {}
    void run() override { std::apply(fn, args); }
};

template <typename... P, typename... A>
static inline void ts_emu_launch_fn(const ts_emu_cfg &cfg, const char *name, void (*fn)(P...), A &&...a)
{
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
    ts_emu_enqueue_kernel(cfg, new ts_emu_kernel_body<P...>(fn, std::forward<A>(a)...), name);
}

#endif
