/* The CUDA side of the runtime, compiled only when TERRASEG_CUDA is on.
 *
 * Pointer convention of the CUDA backend: every tensor's data and every
 * per-channel vector, index and label array passed to an op is DEVICE memory
 * (ts_cuda_malloc). Parameter structs and what they point to (class weights
 * in ts_ce_params / ts_dice_params) stay on the HOST, as do the scalar results
 * (the double loss of the loss ops, the double of sum_squares): those ops
 * synchronize before they return. Ops run in order on the backend's one
 * stream; a kernel launch error is reported by the op that launched it. */
#ifndef TS_CUDA_BACKEND_H
#define TS_CUDA_BACKEND_H

#include <stddef.h>

#include "../backend.h"

/* "CUDA runtime X, driver Y, cuDNN Z, cuBLAS W, N device(s): <name>"; reports
 * each library's own version so a mismatch is visible. */
void ts_cuda_describe(char *buf, size_t size);

/* The CUDA backend table for device `device` (0-based), creating the
 * process-wide state (stream, cuDNN and cuBLAS handles, workspace) on first
 * use; or an error saying why it cannot be used (no device, driver too old,
 * device index out of range). Only one device per process. */
ts_status ts_cuda_backend(int device, const ts_backend **out);

/* Device memory and copies on the backend's stream (synchronous: they return
 * when the copy is done). All return an error naming the call and the size. */
ts_status ts_cuda_malloc(void **p, size_t bytes);
void ts_cuda_free(void *p);
ts_status ts_cuda_memcpy_h2d(void *dst_device, const void *src_host, size_t bytes);
ts_status ts_cuda_memcpy_d2h(void *dst_host, const void *src_device, size_t bytes);
ts_status ts_cuda_memcpy_d2d(void *dst_device, const void *src_device, size_t bytes);
/* Waits for every op queued so far; reports an asynchronous kernel error. */
ts_status ts_cuda_synchronize(void);
/* The asynchronous members of the memory interface (kernels/backend.h):
 * page-locked host memory (cudaHostAlloc), a device-to-host copy queued on
 * the backend's stream into it (and from it), and fences (cudaEvent_t without timing,
 * recorded on that stream). None may be called while a graph is recorded. */
ts_status ts_cuda_host_alloc(void **p, size_t bytes);
void ts_cuda_host_free(void *p);
ts_status ts_cuda_memcpy_d2h_async(void *dst_host, const void *src_device, size_t bytes);
ts_status ts_cuda_memcpy_h2d_async(void *dst_device, const void *src_host, size_t bytes);
ts_status ts_cuda_fence_new(void **f);
ts_status ts_cuda_fence_record(void *f);
ts_status ts_cuda_fence_wait(void *f);
void ts_cuda_fence_free(void *f);

/* Determinism (issue 8, bit-exact resume): when on, convolutions use only
 * deterministic cuDNN algorithms and every reduction uses a fixed order (no
 * float atomics). Off by default. */
void ts_cuda_set_deterministic(int on);
/* TF32 tensor-core math for fp32 convolutions and GEMMs (off by default: fp32
 * results then match the CPU backend to float rounding). */
void ts_cuda_set_tf32(int on);
/* cuDNN's benchmark mode (torch.backends.cudnn.benchmark): each conv shape's
 * algorithm is chosen by timing cuDNN's candidates on its first call
 * (cudnnFind*) instead of taking cuDNN's heuristic ranking. Off by default:
 * timings vary, so two runs may pick different algorithms and differ in the
 * last bits. Ignored while determinism is on, whose bit-exact resume needs
 * the same choice in every process. */
void ts_cuda_set_benchmark(int on);
/* Upper bound of the cuDNN workspace in bytes (default 256 MiB): algorithms
 * needing more are not chosen. */
void ts_cuda_set_workspace_limit(size_t bytes);

/* How conv2d_forward calls ran since the process started (for benchmarks and
 * the GPU tests): *fused counts the calls with a bias and the ReLU (and
 * maybe the fused add) that ran as one cudnnConvolutionBiasActivationForward,
 * *unfused the calls with a bias, a ReLU or an add that ran cuDNN's
 * convolution and then the epilogue kernel (a bias without ReLU, a ReLU
 * without bias, an add without both, a shape the fused call does
 * not support, or a half call whose algorithm leaves no room under the
 * workspace limit for the half bias). A forward with neither is in neither count. A call recorded
 * into a CUDA graph counts once, however often the graph is replayed.
 * Either pointer may be NULL. */
void ts_cuda_conv_fusion_stats(long *fused, long *unfused);
/* Why the fused call was first refused in this process (cuDNN's status and
 * the plan), or NULL if it never was: a refused plan runs the two passes. */
const char *ts_cuda_conv_fusion_refusal(void);

#endif
