/* The CUDA backend's process-wide state, its table, the error helpers and the
 * memory API of cuda_backend.h. Plain C against the CUDA runtime, cuDNN and
 * cuBLAS C APIs: nothing here launches a kernel.
 *
 * One device, one stream, one handle of each library, for the whole process.
 * Every op queues its work on that one non-blocking stream (cuDNN and cuBLAS
 * are bound to it), so ops run in the order they are called and never need an
 * event between them; the only waits are the synchronous copies, the scalar
 * results the loss ops hand back to the host, and ts_cuda_synchronize. The
 * stream is non-blocking so that nothing anyone queues on the legacy default
 * stream (a library we link, a test's cudaMemset) serializes against it. */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

#define DEFAULT_WORKSPACE_LIMIT ((size_t)256 << 20)
/* Workspace sizes are rounded up to this so that a run of convs asking for
 * slightly more each time grows the buffer once, not once per conv. */
#define WORKSPACE_GRANULE ((size_t)1 << 20)

/* Zero-initialized except the limit, so the setters work before
 * ts_cuda_backend and their values are the ones the first op sees. */
static ts_cuda_state g_state = {.device = -1, .workspace_limit = DEFAULT_WORKSPACE_LIMIT};

ts_cuda_state *ts_cuda_state_get(void) { return &g_state; }

/* ---- error helpers ----------------------------------------------------------- */

/* __FILE__ is an absolute path under CMake; keep the part from "kernels/" on,
 * which is what a reader of the source tree needs. */
static const char *short_file(const char *file)
{
    const char *k = strstr(file, "kernels/");
    return k ? k : file;
}

ts_status ts_cuda_error(cudaError_t e, const char *call, const char *file, int line)
{
    ts_status st = e == cudaErrorMemoryAllocation ? TS_ERR_NOMEM : TS_ERR_BACKEND;
    return ts_error(st, "CUDA: %s failed: %s (%s) at %s:%d", call, cudaGetErrorString(e), cudaGetErrorName(e),
                    short_file(file), line);
}

ts_status ts_cudnn_error(cudnnStatus_t e, const char *call, const char *file, int line)
{
    /* cuDNN 9 splits out-of-memory into host (4003, the old ALLOC_FAILED)
     * and device (4004) allocations: both are memory the user can free up. */
    ts_status st = e == CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED ||
                           e == CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED
                       ? TS_ERR_NOMEM
                       : TS_ERR_BACKEND;
    return ts_error(st, "cuDNN: %s failed: %s (status %d) at %s:%d", call, cudnnGetErrorString(e), (int)e,
                    short_file(file), line);
}

ts_status ts_cublas_error(cublasStatus_t e, const char *call, const char *file, int line)
{
    ts_status st = e == CUBLAS_STATUS_ALLOC_FAILED ? TS_ERR_NOMEM : TS_ERR_BACKEND;
    return ts_error(st, "cuBLAS: %s failed: %s (status %d) at %s:%d", call, cublasGetStatusString(e), (int)e,
                    short_file(file), line);
}

/* ---- the backend table ------------------------------------------------------- */

/* Device memory: the checked calls of the memory API below. */
static const ts_backend_memory cuda_memory = {
    .host = 0,
    .alloc = ts_cuda_malloc,
    .free = ts_cuda_free,
    .upload = ts_cuda_memcpy_h2d,
    .download = ts_cuda_memcpy_d2h,
    .sync = ts_cuda_synchronize,
    .host_alloc = ts_cuda_host_alloc,
    .host_free = ts_cuda_host_free,
    .download_async = ts_cuda_memcpy_d2h_async,
    .upload_async = ts_cuda_memcpy_h2d_async,
    .fence_new = ts_cuda_fence_new,
    .fence_record = ts_cuda_fence_record,
    .fence_wait = ts_cuda_fence_wait,
    .fence_free = ts_cuda_fence_free,
};

/* CUDA graphs (stream capture): see the end of this file. */
static ts_status graph_begin(void);
static ts_status graph_end(void **graph);
static ts_status graph_launch(void *graph, int *stale);
static void graph_free(void *graph);
static const ts_backend_graphs cuda_graphs = {
    .begin = graph_begin,
    .end = graph_end,
    .launch = graph_launch,
    .free = graph_free,
};

#define TS_CUDA_ENTRY(op) .op = ts_cuda_##op,
static const ts_backend cuda_backend = {
    .name = "cuda",
    .memory = &cuda_memory,
    .graphs = &cuda_graphs,
    TS_BACKEND_OPS(TS_CUDA_ENTRY)
};
#undef TS_CUDA_ENTRY

static cublasMath_t cublas_math(int tf32) { return tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH; }

/* Says why the CUDA backend cannot be used on this machine, with the versions
 * that explain a driver/runtime mismatch. */
static ts_status no_device_error(const char *why)
{
    int runtime = 0, driver = 0;
    char rt[32] = "unknown", drv[32] = "none";
    if (cudaRuntimeGetVersion(&runtime) == cudaSuccess)
        snprintf(rt, sizeof rt, "%d.%d", runtime / 1000, runtime % 1000 / 10);
    if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0)
        snprintf(drv, sizeof drv, "%d.%d", driver / 1000, driver % 1000 / 10);
    return ts_error(TS_ERR_UNSUPPORTED,
                    "backend \"cuda\": no usable CUDA device: %s (CUDA runtime %s, driver %s); check the NVIDIA "
                    "driver (nvidia-smi) or use --device cpu",
                    why, rt, drv);
}

/* Creates the stream and the handles on the current device. On failure,
 * whatever was created is destroyed again so a later call can retry. */
static ts_status create_handles(ts_cuda_state *s)
{
    ts_status st = TS_OK;
    cudaError_t ce;
    cudnnStatus_t de;
    cublasStatus_t be;
#define FAIL(expr) \
    do {           \
        st = expr; \
        goto fail; \
    } while (0)
    if ((ce = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking)) != cudaSuccess)
        FAIL(ts_cuda_error(ce, "cudaStreamCreateWithFlags(cudaStreamNonBlocking)", __FILE__, __LINE__));
    if ((de = cudnnCreate(&s->cudnn)) != CUDNN_STATUS_SUCCESS)
        FAIL(ts_cudnn_error(de, "cudnnCreate", __FILE__, __LINE__));
    if ((de = cudnnSetStream(s->cudnn, s->stream)) != CUDNN_STATUS_SUCCESS)
        FAIL(ts_cudnn_error(de, "cudnnSetStream", __FILE__, __LINE__));
    if ((be = cublasCreate(&s->cublas)) != CUBLAS_STATUS_SUCCESS)
        FAIL(ts_cublas_error(be, "cublasCreate", __FILE__, __LINE__));
    if ((be = cublasSetStream(s->cublas, s->stream)) != CUBLAS_STATUS_SUCCESS)
        FAIL(ts_cublas_error(be, "cublasSetStream", __FILE__, __LINE__));
    if ((be = cublasSetMathMode(s->cublas, cublas_math(s->tf32))) != CUBLAS_STATUS_SUCCESS)
        FAIL(ts_cublas_error(be, "cublasSetMathMode", __FILE__, __LINE__));
    if ((ce = cudaDeviceGetAttribute(&s->sm_count, cudaDevAttrMultiProcessorCount, s->device)) != cudaSuccess)
        FAIL(ts_cuda_error(ce, "cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)", __FILE__, __LINE__));
    return TS_OK;
#undef FAIL
fail:
    /* Best effort: the error being reported is the one that matters, so the
     * return codes of the destroy calls are not allowed to replace it. */
    if (s->cublas) (void)cublasDestroy(s->cublas);
    if (s->cudnn) (void)cudnnDestroy(s->cudnn);
    if (s->stream) (void)cudaStreamDestroy(s->stream);
    s->cublas = NULL;
    s->cudnn = NULL;
    s->stream = NULL;
    s->sm_count = 0;
    return st;
}

ts_status ts_cuda_backend(int device, const ts_backend **out)
{
    if (!out) return ts_error(TS_ERR_INVALID_ARG, "ts_cuda_backend: out is NULL");
    *out = NULL;
    ts_cuda_state *s = &g_state;
    if (s->initialized) {
        /* The state (stream, handles, workspace, every op's device pointers)
         * belongs to one device; a second one would need all of it twice. */
        if (device != s->device)
            return ts_error(TS_ERR_UNSUPPORTED,
                            "backend \"cuda:%d\": this process already runs on cuda:%d; terraseg uses one CUDA device "
                            "per process (start another process for another device)",
                            device, s->device);
        *out = &cuda_backend;
        return TS_OK;
    }
    if (device < 0) return ts_error(TS_ERR_INVALID_ARG, "backend \"cuda:%d\": device index must be >= 0", device);
    /* cuDNN keeps its API (and the legacy convolution calls conv.c uses)
     * within a major version only; a different libcudnn found at run time
     * would fail in obscure ways at the first conv instead of here. */
    const size_t cudnn_loaded = cudnnGetVersion();
    if (cudnn_loaded / 10000 != CUDNN_MAJOR)
        return ts_error(TS_ERR_UNSUPPORTED,
                        "backend \"cuda\": terraseg was built against cuDNN %d.%d but loaded cuDNN %zu.%zu; install "
                        "cuDNN %d or rebuild, or use --device cpu",
                        CUDNN_MAJOR, CUDNN_MINOR, cudnn_loaded / 10000, cudnn_loaded % 10000 / 100, CUDNN_MAJOR);
    /* cuDNN 9 ships one build per CUDA major version (cudnn-cuda-12,
     * cudnn-cuda-13); the other one loads but fails at its first call. */
    const size_t cudnn_cudart = cudnnGetCudartVersion();
    if (cudnn_cudart / 1000 != CUDART_VERSION / 1000)
        return ts_error(TS_ERR_UNSUPPORTED,
                        "backend \"cuda\": the loaded cuDNN %zu.%zu was built for CUDA %zu, but terraseg for CUDA %d; "
                        "install the cuDNN %d build for CUDA %d (or put its lib directory first in LD_LIBRARY_PATH), "
                        "or use --device cpu",
                        cudnn_loaded / 10000, cudnn_loaded % 10000 / 100, cudnn_cudart / 1000, CUDART_VERSION / 1000,
                        CUDNN_MAJOR, CUDART_VERSION / 1000);

    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        char why[256];
        snprintf(why, sizeof why, "cudaGetDeviceCount failed: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
        return no_device_error(why);
    }
    if (count < 1) return no_device_error("cudaGetDeviceCount found no device");
    if (device >= count)
        return ts_error(TS_ERR_INVALID_ARG,
                        "backend \"cuda:%d\": device index out of range: this machine has %d CUDA device(s), "
                        "cuda:0 to cuda:%d",
                        device, count, count - 1);
    e = cudaSetDevice(device);
    if (e != cudaSuccess) {
        char call[64];
        snprintf(call, sizeof call, "cudaSetDevice(%d)", device);
        return ts_cuda_error(e, call, __FILE__, __LINE__);
    }
    e = ts_cuda_kernel_image_check();
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        int major = 0, minor = 0;
        (void)cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
        (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
        return ts_error(TS_ERR_UNSUPPORTED,
                        "backend \"cuda:%d\": this build has no kernels the device can run (compute capability "
                        "%d.%d; built for CUDA architectures %s): %s; rebuild with "
                        "-DCMAKE_CUDA_ARCHITECTURES=%d%d, or use --device cpu",
                        device, major, minor, TS_CUDA_ARCHS, cudaGetErrorString(e), major, minor);
    }
    s->device = device;
    ts_status st = create_handles(s);
    if (st != TS_OK) {
        s->device = -1;
        return st;
    }
    /* Every entry is filled at compile time, so this only fails if someone
     * sets one to NULL; it is the same check the CPU table passes. */
    st = ts_backend_check(&cuda_backend);
    if (st != TS_OK) return st;
    s->initialized = 1;
    *out = &cuda_backend;
    return TS_OK;
}

/* ---- setters ------------------------------------------------------------------ */

/* These settings (and the benchmark mode below) change which algorithm
 * (and math type) a conv gets, and a recorded forward holds the old choice:
 * a change makes every recording stale (graph_launch then says so and the
 * caller records afresh). */
void ts_cuda_set_deterministic(int on)
{
    if (g_state.deterministic != (on != 0)) g_state.workspace_generation++;
    g_state.deterministic = on != 0;
}

void ts_cuda_set_tf32(int on)
{
    if (g_state.tf32 != (on != 0)) g_state.workspace_generation++;
    g_state.tf32 = on != 0;
    /* cuDNN reads the flag per conv (conv.c keys its algorithm cache on it);
     * cuBLAS keeps a mode in its handle, updated here. The setter has no
     * status to return, and cublasSetMathMode fails only for a bad handle or
     * mode, neither of which can happen once the handle exists; should it fail
     * anyway, the message is left as the last error. */
    if (g_state.initialized) {
        cublasStatus_t be = cublasSetMathMode(g_state.cublas, cublas_math(g_state.tf32));
        if (be != CUBLAS_STATUS_SUCCESS) (void)ts_cublas_error(be, "cublasSetMathMode", __FILE__, __LINE__);
    }
}

void ts_cuda_set_benchmark(int on)
{
    if (g_state.benchmark != (on != 0)) g_state.workspace_generation++;
    g_state.benchmark = on != 0;
}

void ts_cuda_set_workspace_limit(size_t bytes) { g_state.workspace_limit = bytes; }

/* ---- memory ------------------------------------------------------------------- */

/* The memory calls need the state, and the backend's device current on the
 * calling thread (the current device is per host thread: memory allocated
 * from a loader or writer thread must still land on the ops' device). */
static ts_status need_init(const char *fn)
{
    if (!g_state.initialized)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: the CUDA backend is not initialized; call ts_cuda_backend (or ts_backend_get(\"cuda\")) "
                        "first, so that memory lands on the device the ops run on",
                        fn);
    TS_CUDA_USE_DEVICE(g_state.device);
    return TS_OK;
}

/* The error of a call that allocates, copies or waits while ops are being
 * recorded: none of them can be part of a graph, and CUDA would invalidate the
 * whole recording with a less helpful message. */
static ts_status capture_error(const char *fn)
{
    return ts_error(TS_ERR_INVALID_ARG,
                    "%s: called while a CUDA graph is being recorded; allocations, copies and waits cannot be "
                    "recorded (end the recording first)",
                    fn);
}

ts_status ts_cuda_malloc(void **p, size_t bytes)
{
    if (!p) return ts_error(TS_ERR_INVALID_ARG, "ts_cuda_malloc: p is NULL");
    *p = NULL;
    ts_status st = need_init("ts_cuda_malloc");
    if (st != TS_OK) return st;
    /* cudaMalloc on the recording thread would invalidate the recording
     * (and the graph would not hold the allocation anyway). */
    if (g_state.capturing) return capture_error("ts_cuda_malloc");
    if (bytes == 0) return TS_OK;
    /* Plain cudaMalloc: allocations happen once per plan (the arena, the
     * parameter blocks), so the stream-ordered allocator would buy nothing,
     * and cudaFree's implicit device synchronization makes freeing memory that
     * queued kernels still read impossible. */
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
        *p = NULL;
        char call[96];
        snprintf(call, sizeof call, "cudaMalloc(%zu bytes, %.1f MiB)", bytes, (double)bytes / (1 << 20));
        return ts_cuda_error(e, call, __FILE__, __LINE__);
    }
    return TS_OK;
}

void ts_cuda_free(void *p)
{
    if (!p) return;
    /* cudaFree fails for a pointer that did not come from ts_cuda_malloc (a
     * caller's bug with no status to return it through) or to report an
     * earlier asynchronous kernel error, which is sticky and surfaces again at
     * the next checked call. Either way it must not overwrite the message of
     * the failure a caller is usually cleaning up after, so its return code is
     * deliberately dropped. The backend's device is made current (a loader
     * or writer thread may free), as need_init does for the other calls. */
    if (g_state.initialized) (void)cudaSetDevice(g_state.device);
    (void)cudaFree(p);
}

/* A copy queued on the backend's stream (after the ops before it, before
 * the ops after it), not waited for. For the asynchronous members the host
 * side must be page-locked: from or into pageable memory CUDA stages the
 * copy and waits, which is what those calls exist to avoid. */
static ts_status copy_async(const char *fn, void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind)
{
    ts_status st = need_init(fn);
    if (st != TS_OK) return st;
    if (g_state.capturing) return capture_error(fn);
    if (bytes == 0) return TS_OK;
    if (!dst || !src)
        return ts_error(TS_ERR_INVALID_ARG, "%s: %zu bytes with a NULL %s pointer", fn, bytes,
                        dst ? "source" : "destination");
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, g_state.stream);
    if (e != cudaSuccess) {
        char call[96];
        snprintf(call, sizeof call, "%s: cudaMemcpyAsync(%zu bytes)", fn, bytes);
        return ts_cuda_error(e, call, __FILE__, __LINE__);
    }
    return TS_OK;
}

/* The synchronous copies: the same, then waited for (the API promises the
 * data is there when the call returns). On the backend's stream, so the copy
 * sees everything queued before it (a d2h copy of an op's output waits for
 * that op). */
static ts_status copy(const char *fn, void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind)
{
    ts_status st = copy_async(fn, dst, src, bytes, kind);
    if (st != TS_OK || bytes == 0) return st;
    cudaError_t e = cudaStreamSynchronize(g_state.stream);
    if (e != cudaSuccess) {
        char call[96];
        snprintf(call, sizeof call, "%s: cudaStreamSynchronize after a %zu-byte copy", fn, bytes);
        return ts_cuda_error(e, call, __FILE__, __LINE__);
    }
    return TS_OK;
}

ts_status ts_cuda_memcpy_h2d(void *dst_device, const void *src_host, size_t bytes)
{
    return copy("ts_cuda_memcpy_h2d", dst_device, src_host, bytes, cudaMemcpyHostToDevice);
}

ts_status ts_cuda_memcpy_d2h(void *dst_host, const void *src_device, size_t bytes)
{
    return copy("ts_cuda_memcpy_d2h", dst_host, src_device, bytes, cudaMemcpyDeviceToHost);
}

ts_status ts_cuda_memcpy_d2d(void *dst_device, const void *src_device, size_t bytes)
{
    return copy("ts_cuda_memcpy_d2d", dst_device, src_device, bytes, cudaMemcpyDeviceToDevice);
}

ts_status ts_cuda_synchronize(void)
{
    /* Nothing can have been queued before the state exists. */
    if (!g_state.initialized) return TS_OK;
    if (g_state.capturing) return capture_error("ts_cuda_synchronize");
    TS_CUDA_USE_DEVICE(g_state.device);
    TS_CUDA_CHECK(cudaStreamSynchronize(g_state.stream));
    return TS_OK;
}

/* ---- pinned host memory, asynchronous downloads, fences ------------------------------ */

ts_status ts_cuda_host_alloc(void **p, size_t bytes)
{
    if (!p) return ts_error(TS_ERR_INVALID_ARG, "ts_cuda_host_alloc: p is NULL");
    *p = NULL;
    ts_status st = need_init("ts_cuda_host_alloc");
    if (st != TS_OK) return st;
    /* cudaHostAlloc is not a stream operation and would invalidate a
     * recording made in thread-local mode from this thread. */
    if (g_state.capturing) return capture_error("ts_cuda_host_alloc");
    if (bytes == 0) return TS_OK;
    cudaError_t e = cudaHostAlloc(p, bytes, cudaHostAllocDefault);
    if (e != cudaSuccess) {
        *p = NULL;
        char call[112];
        snprintf(call, sizeof call, "cudaHostAlloc(%zu bytes, %.1f MiB, page-locked)", bytes,
                 (double)bytes / (1 << 20));
        return ts_cuda_error(e, call, __FILE__, __LINE__);
    }
    return TS_OK;
}

void ts_cuda_host_free(void *p)
{
    if (!p) return;
    /* As ts_cuda_free: the caller has no status to receive the error and is
     * often cleaning up after another failure whose message must stay. */
    if (g_state.initialized) (void)cudaSetDevice(g_state.device);
    (void)cudaFreeHost(p);
}

ts_status ts_cuda_memcpy_d2h_async(void *dst_host, const void *src_device, size_t bytes)
{
    return copy_async("ts_cuda_memcpy_d2h_async", dst_host, src_device, bytes, cudaMemcpyDeviceToHost);
}

ts_status ts_cuda_memcpy_h2d_async(void *dst_device, const void *src_host, size_t bytes)
{
    return copy_async("ts_cuda_memcpy_h2d_async", dst_device, src_host, bytes, cudaMemcpyHostToDevice);
}

/* A fence is a cudaEvent_t: the pointer the caller holds is the event. */
ts_status ts_cuda_fence_new(void **f)
{
    if (!f) return ts_error(TS_ERR_INVALID_ARG, "ts_cuda_fence_new: f is NULL");
    *f = NULL;
    ts_status st = need_init("ts_cuda_fence_new");
    if (st != TS_OK) return st;
    if (g_state.capturing) return capture_error("ts_cuda_fence_new");
    /* No timing: a timed event costs more to record and is not needed to
     * wait. Blocking sync: a wait sleeps instead of spinning a core, which
     * predict's GDAL readers and writer need while the host waits for a
     * batch that takes milliseconds. */
    cudaEvent_t ev = NULL;
    TS_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming | cudaEventBlockingSync));
    *f = ev;
    return TS_OK;
}

ts_status ts_cuda_fence_record(void *f)
{
    if (!f) return ts_error(TS_ERR_INVALID_ARG, "ts_cuda_fence_record: NULL fence (make one with fence_new)");
    ts_status st = need_init("ts_cuda_fence_record");
    if (st != TS_OK) return st;
    /* Recorded inside a capture, the event would become a graph node and
     * mark nothing on the stream the caller later waits for. */
    if (g_state.capturing) return capture_error("ts_cuda_fence_record");
    TS_CUDA_CHECK(cudaEventRecord((cudaEvent_t)f, g_state.stream));
    return TS_OK;
}

ts_status ts_cuda_fence_wait(void *f)
{
    if (!f) return ts_error(TS_ERR_INVALID_ARG, "ts_cuda_fence_wait: NULL fence (make one with fence_new)");
    ts_status st = need_init("ts_cuda_fence_wait");
    if (st != TS_OK) return st;
    if (g_state.capturing) return capture_error("ts_cuda_fence_wait");
    TS_CUDA_CHECK(cudaEventSynchronize((cudaEvent_t)f));
    return TS_OK;
}

void ts_cuda_fence_free(void *f)
{
    if (!f) return;
    /* Destroying an event whose point is still ahead is allowed (CUDA
     * releases it once reached); the only failure is an invalid handle, with
     * no status to return it through (as ts_cuda_free). */
    (void)cudaEventDestroy((cudaEvent_t)f);
}

/* ---- the cuDNN workspace -------------------------------------------------------- */

/* Drops the current buffer. Kernels queued earlier may still use it, so the
 * stream is drained first (cudaFree would wait for the device anyway, but
 * the explicit wait also reports their errors here, with a message saying so). */
static ts_status workspace_release(ts_cuda_state *s)
{
    if (!s->workspace) return TS_OK;
    TS_CUDA_CHECK(cudaStreamSynchronize(s->stream));
    void *old = s->workspace;
    s->workspace = NULL;
    s->workspace_bytes = 0;
    s->workspace_generation++; /* graphs recorded with the old buffer are stale */
    TS_CUDA_CHECK(cudaFree(old));
    return TS_OK;
}

ts_status ts_cuda_workspace(size_t bytes, void **out)
{
    if (!out) return ts_error(TS_ERR_INVALID_ARG, "ts_cuda_workspace: out is NULL");
    *out = NULL;
    ts_cuda_state *s = &g_state;
    ts_status st = need_init("ts_cuda_workspace");
    if (st != TS_OK) return st;
    if (bytes > s->workspace_limit)
        return ts_error(TS_ERR_UNSUPPORTED,
                        "CUDA workspace: %zu bytes (%.1f MiB) requested, above the workspace limit of %zu bytes "
                        "(%.1f MiB); raise it with ts_cuda_set_workspace_limit",
                        bytes, (double)bytes / (1 << 20), s->workspace_limit, (double)s->workspace_limit / (1 << 20));
    /* A limit lowered since the buffer grew is honoured at the next request
     * (not while recording: the release waits for the device). */
    if (!s->capturing && s->workspace_bytes > s->workspace_limit && (st = workspace_release(s)) != TS_OK) return st;
    if (bytes == 0 || bytes <= s->workspace_bytes) {
        *out = s->workspace;
        return TS_OK;
    }
    size_t grow = bytes;
    if (grow <= SIZE_MAX - (WORKSPACE_GRANULE - 1))
        grow = (grow + WORKSPACE_GRANULE - 1) / WORKSPACE_GRANULE * WORKSPACE_GRANULE;
    if (grow > s->workspace_limit) grow = bytes; /* rounding never goes past the limit */
    /* Growing needs a wait and an allocation, neither of which a graph can
     * hold; a forward that is recorded after a direct run of the same
     * shapes never gets here. */
    if (s->capturing)
        return ts_error(TS_ERR_INVALID_ARG,
                        "CUDA workspace: %zu bytes needed while a CUDA graph is being recorded, above the %zu bytes "
                        "allocated; run the ops once without recording first",
                        bytes, s->workspace_bytes);
    if ((st = workspace_release(s)) != TS_OK) return st;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, grow);
    if (e != cudaSuccess) {
        char call[112];
        snprintf(call, sizeof call, "cudaMalloc of the workspace (%zu bytes, %.1f MiB)", grow,
                 (double)grow / (1 << 20));
        return ts_cuda_error(e, call, __FILE__, __LINE__);
    }
    s->workspace = p;
    s->workspace_bytes = grow;
    *out = p;
    return TS_OK;
}

/* ---- CUDA graphs (kernels/backend.h, ts_backend_graphs) ---------------------------
 * Stream capture: between begin and end, everything the ops queue on the
 * backend's stream (cuDNN's kernels, our own, cuBLAS's) is recorded into a
 * cudaGraph_t instead of being run; end instantiates it, and launch replays
 * the whole forward in one cudaGraphLaunch. What a recording holds are the
 * kernels with their arguments, pointers included: the caller keys its
 * recordings on its own buffers, and the one buffer the backend owns and
 * may replace (the conv workspace) is checked here by its generation. */

typedef struct cuda_graph {
    cudaGraphExec_t exec;
    unsigned long workspace_generation; /* g_state's when recorded */
} cuda_graph;

static ts_status graph_begin(void)
{
    ts_status st = need_init("CUDA graph begin");
    if (st != TS_OK) return st;
    if (g_state.capturing)
        return ts_error(TS_ERR_INVALID_ARG, "CUDA graph begin: a recording is already under way; end it first");
    /* Thread-local mode: a call that cannot be part of a capture made from
     * this thread (an allocation, a synchronous copy) fails instead of
     * quietly running; other threads (GDAL readers, the writer) are free to
     * use the runtime meanwhile. */
    TS_CUDA_CHECK(cudaStreamBeginCapture(g_state.stream, cudaStreamCaptureModeThreadLocal));
    g_state.capturing = 1;
    return TS_OK;
}

static ts_status graph_end(void **out)
{
    if (!out) return ts_error(TS_ERR_INVALID_ARG, "CUDA graph end: out is NULL");
    *out = NULL;
    if (!g_state.capturing) return ts_error(TS_ERR_INVALID_ARG, "CUDA graph end: no recording is under way");
    g_state.capturing = 0;
    /* Ending is needed even after a failed op, or the stream stays in
     * capture mode; a capture that CUDA invalidated (an illegal call while
     * recording) fails here. */
    cudaGraph_t graph = NULL;
    cudaError_t ce = cudaStreamEndCapture(g_state.stream, &graph);
    if (ce != cudaSuccess) {
        /* Not sticky, but left in the runtime's last-error slot, where the
         * next kernel launch's check (cudaGetLastError) would blame itself. */
        (void)cudaGetLastError();
        if (graph) (void)cudaGraphDestroy(graph);
        return ts_cuda_error(ce, "cudaStreamEndCapture", __FILE__, __LINE__);
    }
    cuda_graph *g = calloc(1, sizeof *g);
    if (!g) {
        (void)cudaGraphDestroy(graph); /* the out-of-memory error is the one to report */
        return ts_error(TS_ERR_NOMEM, "CUDA graph end: out of memory");
    }
    cudaError_t e = cudaGraphInstantiate(&g->exec, graph, 0);
    /* The executable graph is independent of the template it was made from. */
    cudaError_t d = cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
        free(g);
        return ts_cuda_error(e, "cudaGraphInstantiate", __FILE__, __LINE__);
    }
    if (d != cudaSuccess) {
        (void)cudaGraphExecDestroy(g->exec);
        free(g);
        return ts_cuda_error(d, "cudaGraphDestroy", __FILE__, __LINE__);
    }
    /* Growing the workspace is refused while recording, so the generation
     * now is the one the recorded convolutions used. */
    g->workspace_generation = g_state.workspace_generation;
    *out = g;
    return TS_OK;
}

static ts_status graph_launch(void *graph, int *stale)
{
    if (!graph || !stale) return ts_error(TS_ERR_INVALID_ARG, "CUDA graph launch: graph or stale is NULL");
    *stale = 0;
    ts_status st = need_init("CUDA graph launch");
    if (st != TS_OK) return st;
    if (g_state.capturing)
        return ts_error(TS_ERR_INVALID_ARG, "CUDA graph launch: called while another graph is being recorded");
    const cuda_graph *g = graph;
    if (g->workspace_generation != g_state.workspace_generation) {
        *stale = 1;
        return TS_OK;
    }
    TS_CUDA_CHECK(cudaGraphLaunch(g->exec, g_state.stream));
    return TS_OK;
}

static void graph_free(void *graph)
{
    if (!graph) return;
    cuda_graph *g = graph;
    /* A launch still in flight completes first (CUDA frees the executable
     * graph when it is done). The call fails only for an invalid handle;
     * there is no status to return it through, and the caller is usually
     * cleaning up after another error whose message must stay. */
    (void)cudaGraphExecDestroy(g->exec);
    free(g);
}
