/* The CUDA emulator's host side: the parts of the CUDA runtime, cuDNN and
 * cuBLAS that kernels/cuda/ calls, implemented on the CPU, so that the
 * CUDA backend (its kernels, compiled for the host through emu_device.h,
 * and its C files, unchanged) and the GPU tests run on a machine without a
 * GPU. It is a test tool: the product never links it. README.md says what it
 * checks and what only a real GPU can.
 *
 * The signatures come from the real headers (/usr/local/cuda/include), so
 * a mismatch is a compile error. What the emulator models, because a bug
 * in our use of CUDA would hide behind a too-forgiving fake:
 * - Streams are queues: work runs when the host waits for it (a stream or
 *   event synchronize, a blocking call), not when it is queued. A host that
 *   reads a result, or rewrites a page-locked input, before waiting on the
 *   right fence sees stale data, as on a GPU.
 * - Device memory is filled with 0xff bytes (NaN, index -1) on allocation,
 *   copies and memsets are checked against the allocation they touch and
 *   the direction they name, and cudaFree waits for queued work first.
 * - A kernel runs block by block, each thread a coroutine; __syncthreads
 *   switches threads, and the order of threads (and blocks) flips between
 *   barrier phases (and launches), so a missing barrier or a race between
 *   threads shows up as a wrong or varying result. A barrier that some
 *   threads of a block skip aborts with a message (a hang or undefined
 *   behaviour on a GPU).
 * - Stream capture records the queued work into a graph instead of running
 *   it; the calls a capture forbids (synchronize, cudaMalloc, cudaFree,
 *   cudaHostAlloc) fail and invalidate it, as CUDA's do.
 * - cuDNN's convolutions are computed in double (im2col and OpenBLAS);
 *   float32 data is rounded to TF32 first unless the descriptor says FMA
 *   math, scaling follows alpha/beta (beta 0: the output is not read), the
 *   workspace must be as large as the algorithm asked, algorithms marked
 *   non-deterministic perturb their result by one ulp in a varying place,
 *   and the fused conv+bias+ReLU call refuses the data types named in
 *   TERRASEG_EMU_REFUSE_FUSED (NOT_SUPPORTED), so the two-pass fallback
 *   runs too. */
#include "emu_device.h" /* first: it defines __host__ and friends ahead of the CUDA headers */

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>
#if !defined(__x86_64__)
#error "tests/cuda_emu switches between CUDA threads with an x86-64 routine (runtime.cpp); port ts_emu_switch"
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include <cblas.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudnn.h>

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

[[noreturn]] void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cuda-emu: FATAL: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    abort();
}

/* A misuse a real GPU would answer with an error code: say what it was on
 * stderr (the code alone rarely says enough), return the code. */
cudaError_t complain(cudaError_t e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cuda-emu: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return e;
}

int env_int(const char *name, int dflt)
{
    const char *v = getenv(name);
    return v && *v ? atoi(v) : dflt;
}

/* Every API call holds this: the backend is single-threaded, but predict's
 * reader threads and the tests' threads must not race the emulator. */
std::recursive_mutex g_mu;
#define LOCK() std::lock_guard<std::recursive_mutex> lock_(g_mu)

thread_local cudaError_t t_last_error = cudaSuccess;
int g_device = 0;

/* ---- memory ---------------------------------------------------------------------- */

struct alloc_info {
    size_t bytes;
    bool device; /* cudaMalloc; else cudaHostAlloc */
    char *map;   /* the device allocation's mapping (see device_map), or NULL */
    size_t map_bytes, data_bytes;
};
std::map<char *, alloc_info> g_allocs;

/* Device memory is the host's, but the host may not touch it: outside the
 * work a stream runs (kernels, copies, cuDNN), every device allocation is
 * PROT_NONE, so host code that dereferences a device pointer faults here as
 * it would crash on a GPU, and fault_handler names the allocation. Each
 * allocation also ends at a page that is never accessible, so a kernel that
 * runs off its end (by more than the 256-byte rounding) faults too. Under
 * AddressSanitizer device memory is plain malloc instead: its redzones
 * catch the overruns, and it does not follow protected mappings. */
#if defined(__SANITIZE_ADDRESS__)
const bool k_protect = false;
#else
const bool k_protect = true;
#endif
const size_t k_page = 4096;
int g_device_open = 0; /* nesting count of device_scope */

void protect_all(int prot)
{
    for (auto &e : g_allocs)
        if (e.second.map && mprotect(e.second.map, e.second.data_bytes, prot) != 0) die("mprotect failed");
}

/* While one exists, device memory is accessible: the stream work runs. */
struct device_scope {
    device_scope()
    {
        if (k_protect && g_device_open++ == 0) protect_all(PROT_READ | PROT_WRITE);
    }
    ~device_scope()
    {
        if (k_protect && --g_device_open == 0) protect_all(PROT_NONE);
    }
};

void fault_handler(int sig, siginfo_t *si, void *)
{
    const char *a = (const char *)si->si_addr;
    for (const auto &e : g_allocs) {
        const alloc_info &i = e.second;
        if (!i.map || a < i.map || a >= i.map + i.map_bytes) continue;
        if (a >= e.first && a < e.first + i.bytes)
            fprintf(stderr, "cuda-emu: FATAL: the host touched device memory at %p (byte %zu of a %zu-byte cudaMalloc "
                            "allocation at %p) outside the stream's work: on a GPU that is a crash too\n",
                    (const void *)a, (size_t)(a - e.first), i.bytes, (void *)e.first);
        else
            fprintf(stderr, "cuda-emu: FATAL: an access at %p, %zd bytes past the end of the %zu-byte cudaMalloc "
                            "allocation at %p\n",
                    (const void *)a, (ssize_t)(a - (e.first + i.bytes)), i.bytes, (void *)e.first);
        abort();
    }
    signal(sig, SIG_DFL); /* not ours: the default action, when the access repeats */
}

/* A device allocation of `bytes`: at the end of its own pages (rounded to
 * 256 bytes, cudaMalloc's alignment), a never-accessible page after them. */
char *device_map(size_t bytes, alloc_info *info)
{
    static bool handler;
    if (!handler) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = fault_handler;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, nullptr);
        handler = true;
    }
    const size_t rounded = (bytes + 255) / 256 * 256;
    const size_t data = (rounded + k_page - 1) / k_page * k_page;
    void *m = mmap(nullptr, data + k_page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    *info = alloc_info{bytes, true, (char *)m, data + k_page, data};
    /* Filled while accessible, then as closed as the rest. */
    if (mprotect(m, data, PROT_READ | PROT_WRITE) != 0) die("mprotect failed");
    char *p = (char *)m + data - rounded;
    memset(p, 0xff, rounded);
    if (!g_device_open && mprotect(m, data, PROT_NONE) != 0) die("mprotect failed");
    return p;
}

/* The allocation holding [p, p + n), or NULL. */
const alloc_info *find_alloc(const void *p, size_t n, char **base)
{
    char *c = (char *)p;
    auto it = g_allocs.upper_bound(c);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    if (c < it->first || c + n > it->first + it->second.bytes) return nullptr;
    if (base) *base = it->first;
    return &it->second;
}
bool is_device(const void *p)
{
    const alloc_info *a = find_alloc(p, 1, nullptr);
    return a && a->device;
}

/* ---- streams, events, graphs ------------------------------------------------------ */

struct op {
    std::function<void()> fn;
    CUevent_st *event; /* an event record: fn is empty */
};

} // namespace

struct CUstream_st {
    std::deque<op> queue;
    bool capturing = false, invalidated = false;
    std::vector<op> *graph = nullptr; /* the recording, while capturing */
};
struct CUevent_st {
    bool done = true;
    unsigned flags = 0;
};
struct CUgraph_st {
    std::vector<op> ops;
};
struct CUgraphExec_st {
    std::vector<op> ops;
};

namespace {

std::vector<CUstream_st *> g_streams;
CUstream_st *g_capturing = nullptr; /* the stream being captured (one at a time here) */

void run_op(op &o)
{
    device_scope open;
    if (o.event)
        o.event->done = true;
    else
        o.fn();
}

void flush(CUstream_st *s)
{
    device_scope open; /* once for the whole queue (run_op's own is then a count) */
    while (!s->queue.empty()) {
        op o = std::move(s->queue.front());
        s->queue.pop_front();
        run_op(o);
    }
}

void flush_all(void)
{
    device_scope open;
    for (CUstream_st *s : g_streams) flush(s);
}

/* Queues o on s; the legacy default stream (NULL) waits for every stream
 * and runs at once, as a blocking stream's work would. */
void enqueue(cudaStream_t s, op o)
{
    if (!s) {
        flush_all();
        run_op(o);
    } else if (s->capturing) {
        s->graph->push_back(std::move(o));
    } else {
        s->queue.push_back(std::move(o));
    }
}

void enqueue_fn(cudaStream_t s, std::function<void()> fn) { enqueue(s, op{std::move(fn), nullptr}); }

/* A call that a stream capture forbids (it waits, or allocates): fails and
 * invalidates the capture, as CUDA does in the thread-local and global
 * modes. */
bool capture_forbids(const char *call)
{
    if (!g_capturing) return false;
    g_capturing->invalidated = true;
    complain(cudaErrorStreamCaptureUnsupported, "%s while a stream is being captured: the capture is invalidated",
             call);
    return true;
}

/* ---- kernels: one block at a time, each thread a coroutine ----------------------- */

/* A CUDA thread's own stack and saved context. Switching is the emulator's
 * hot loop (a reduction's block passes a dozen barriers), so on x86-64 it is
 * ts_emu_switch below: the callee-saved registers, about as costly as a
 * call (swapcontext would also save the signal mask with a system call each
 * time, ten times slower). Under AddressSanitizer every switch is announced
 * to it, so that it knows which stack is live. */
enum fiber_state { FIBER_READY, FIBER_BARRIER, FIBER_DONE };
struct fiber {
    void *sp = nullptr;
    void *asan_fake_stack = nullptr; /* AddressSanitizer's bookkeeping of this stack */
    char *stack = nullptr;
    size_t size = 0; /* of the stack, less a stagger (run_kernel) */
    fiber_state state = FIBER_DONE;
    uint3 tid;
};
const size_t FIBER_STACK = 256 * 1024;
std::vector<fiber> g_fibers;
fiber *g_cur = nullptr;
bool g_direct = false; /* running a barrier-free block's threads as plain calls */
ts_emu_body *g_body = nullptr;
unsigned long g_launches = 0;
const char *g_kernel_name = "";

} // namespace
/* ts_emu_switch(&save, to): pushes the callee-saved registers, stores the
 * stack pointer in *save, loads `to` and pops the same from there (System V
 * x86-64 ABI). The MXCSR and x87 control words are not switched: kernels
 * never change the rounding mode, and loading them costs more than the rest. */
extern "C" void ts_emu_switch(void **save, void *to);
asm(".text\n"
    ".globl ts_emu_switch\n"
    ".type ts_emu_switch,@function\n"
    "ts_emu_switch:\n"
    "    pushq %rbp\n    pushq %rbx\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbx\n    popq %rbp\n"
    "    ret\n"
    ".size ts_emu_switch, .-ts_emu_switch\n");
namespace {
void *g_sched_sp;

#if defined(__SANITIZE_ADDRESS__)
void *g_sched_fake_stack;
const void *g_sched_bottom;
size_t g_sched_size;
/* Around a switch from the scheduler to f, and back in the scheduler. */
void asan_to_fiber(fiber &f) { __sanitizer_start_switch_fiber(&g_sched_fake_stack, f.stack, f.size); }
void asan_in_scheduler(void) { __sanitizer_finish_switch_fiber(g_sched_fake_stack, nullptr, nullptr); }
/* Around a switch from f to the scheduler (f_ends: f will not run again
 * before it is restarted), and back in f. */
void asan_to_scheduler(fiber &f, bool f_ends)
{
    __sanitizer_start_switch_fiber(f_ends ? nullptr : &f.asan_fake_stack, g_sched_bottom, g_sched_size);
}
void asan_in_fiber(fiber &f) { __sanitizer_finish_switch_fiber(f.asan_fake_stack, &g_sched_bottom, &g_sched_size); }
#else
void asan_to_fiber(fiber &) {}
void asan_in_scheduler(void) {}
void asan_to_scheduler(fiber &, bool) {}
void asan_in_fiber(fiber &) {}
#endif

[[noreturn]] void fiber_main(void)
{
    g_cur->asan_fake_stack = nullptr;
    asan_in_fiber(*g_cur);
    g_body->run();
    g_cur->state = FIBER_DONE;
    asan_to_scheduler(*g_cur, true);
    ts_emu_switch(&g_cur->sp, g_sched_sp); /* a finished fiber is never resumed, only restarted */
    die("a finished thread was resumed");
}

/* A fresh stack that ts_emu_switch "returns" into fiber_main from: the six
 * saved registers (zero) and fiber_main's address, 16-byte aligned as after
 * a call. */
void fiber_init(fiber &f)
{
    uint64_t *top = (uint64_t *)(f.stack + f.size);
    *--top = 0; /* fiber_main's return address: never used */
    *--top = (uint64_t)(uintptr_t)fiber_main;
    for (int i = 0; i < 6; i++) *--top = 0; /* rbp rbx r12 r13 r14 r15 */
    f.sp = top;
}
void to_fiber(fiber &f)
{
    asan_to_fiber(f);
    ts_emu_switch(&g_sched_sp, f.sp);
    asan_in_scheduler();
}
void to_scheduler(fiber &f)
{
    asan_to_scheduler(f, false);
    ts_emu_switch(&f.sp, g_sched_sp);
    asan_in_fiber(f);
}

/* Runs f until it returns or reaches a barrier. */
void resume(fiber &f)
{
    g_cur = &f;
    threadIdx = f.tid;
    to_fiber(f);
    g_cur = nullptr;
}

uint3 thread_of(unsigned t)
{
    const uint3 b = blockDim;
    return uint3{t % b.x, t / b.x % b.y, t / (b.x * b.y)};
}

/* Makes f thread t of a block of blockDim, ready to start. */
void start_fiber(fiber &f, unsigned t)
{
    f.tid = thread_of(t);
    f.state = FIBER_READY;
    fiber_init(f);
}

/* One block. Thread 0 runs first, as a coroutine: if it returns without
 * reaching a barrier, the block has none (a barrier must be reached by all
 * of a block's threads or none), and the other threads run as plain calls,
 * in one order or the other. Otherwise every thread gets its coroutine and
 * the block runs phase by phase, from barrier to barrier, the order of the
 * threads flipping between phases. */
void run_block(unsigned nthreads, unsigned long seed)
{
    start_fiber(g_fibers[0], 0);
    resume(g_fibers[0]);
    if (g_fibers[0].state == FIBER_DONE) {
        const bool reverse = (seed & 1) != 0;
        g_direct = true;
        for (unsigned i = 1; i < nthreads; i++) {
            threadIdx = thread_of(reverse ? nthreads - i : i);
            g_body->run();
        }
        g_direct = false;
        return;
    }
    for (unsigned t = 1; t < nthreads; t++) start_fiber(g_fibers[t], t);
    for (unsigned long phase = 0;; phase++) {
        const bool reverse = ((seed + phase) & 1) != 0;
        for (unsigned i = 0; i < nthreads; i++) {
            fiber &f = g_fibers[reverse ? nthreads - 1 - i : i];
            if (f.state == FIBER_READY) resume(f);
        }
        unsigned at_barrier = 0, done = 0;
        for (unsigned i = 0; i < nthreads; i++) {
            if (g_fibers[i].state == FIBER_BARRIER) at_barrier++;
            if (g_fibers[i].state == FIBER_DONE) done++;
        }
        if (done == nthreads) return;
        if (done)
            die("kernel %s, block (%u,%u,%u): %u of %u threads wait at __syncthreads while %u have returned "
                "(a barrier some threads skip: undefined behaviour, a hang, on a GPU)",
                g_kernel_name, blockIdx.x, blockIdx.y, blockIdx.z, at_barrier, nthreads, done);
        for (unsigned i = 0; i < nthreads; i++)
            if (g_fibers[i].state == FIBER_BARRIER) g_fibers[i].state = FIBER_READY;
    }
}

void run_kernel(dim3 grid, dim3 block, ts_emu_body *body, const char *name, unsigned long seed)
{
    const unsigned nthreads = block.x * block.y * block.z;
    while (g_fibers.size() < nthreads) {
        fiber f;
        void *p = mmap(nullptr, FIBER_STACK + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) die("out of memory for a thread's stack");
        /* A guard page below the stack: an overflow faults instead of
         * overwriting the next thread's stack. */
        if (mprotect(p, 4096, PROT_NONE) != 0) die("mprotect failed");
        f.stack = (char *)p + 4096;
        /* The stacks' tops staggered by 80 bytes from one to the next: tops
         * a power of two apart would all fall in one cache set, and the
         * block's threads take turns at them. */
        f.size = FIBER_STACK - g_fibers.size() % 64 * 80;
        g_fibers.push_back(f);
    }
    g_body = body;
    g_kernel_name = name;
    blockDim = uint3{block.x, block.y, block.z};
    gridDim = uint3{grid.x, grid.y, grid.z};
    const unsigned long nblocks = (unsigned long)grid.x * grid.y * grid.z;
    const bool reverse = (seed & 1) != 0;
    for (unsigned long i = 0; i < nblocks; i++) {
        const unsigned long k = reverse ? nblocks - 1 - i : i;
        blockIdx.x = (unsigned)(k % grid.x);
        blockIdx.y = (unsigned)(k / grid.x % grid.y);
        blockIdx.z = (unsigned)(k / ((unsigned long)grid.x * grid.y));
        run_block(nthreads, seed + i);
    }
    g_body = nullptr;
}

} // namespace

void ts_emu_syncthreads(void)
{
    if (g_direct)
        die("kernel %s, block (%u,%u,%u): thread (%u,%u,%u) reached __syncthreads, but thread 0 of its block "
            "returned without reaching one (a barrier some threads skip: undefined behaviour, a hang, on a GPU)",
            g_kernel_name, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    if (!g_cur) die("__syncthreads outside a kernel");
    fiber *f = g_cur;
    f->state = FIBER_BARRIER;
    to_scheduler(*f);
}

namespace {
/* TERRASEG_EMU_PROFILE=1: per kernel, the launches, blocks, threads and
 * seconds spent emulating it, printed at exit (the emulator's own hot
 * spots; nothing about a GPU's). */
struct kernel_profile {
    unsigned long launches = 0, blocks = 0, threads = 0;
    double seconds = 0;
};
std::map<std::string, kernel_profile> *g_profile;

double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

void print_profile(void)
{
    std::vector<std::pair<std::string, kernel_profile>> v(g_profile->begin(), g_profile->end());
    std::sort(v.begin(), v.end(), [](const auto &a, const auto &b) { return a.second.seconds > b.second.seconds; });
    fprintf(stderr, "cuda-emu profile: %-40s %10s %12s %14s %10s\n", "kernel", "launches", "blocks", "threads",
            "seconds");
    for (const auto &e : v)
        fprintf(stderr, "cuda-emu profile: %-40s %10lu %12lu %14lu %10.3f\n", e.first.c_str(), e.second.launches,
                e.second.blocks, e.second.threads, e.second.seconds);
}

void run_kernel_profiled(dim3 g, dim3 k, ts_emu_body *b, const char *name, unsigned long seed)
{
    if (!g_profile) {
        if (env_int("TERRASEG_EMU_PROFILE", 0) == 0) return run_kernel(g, k, b, name, seed);
        g_profile = new std::map<std::string, kernel_profile>;
        atexit(print_profile);
    }
    const double t0 = now_s();
    run_kernel(g, k, b, name, seed);
    kernel_profile &p = (*g_profile)[name];
    const unsigned long blocks = (unsigned long)g.x * g.y * g.z;
    p.launches++;
    p.blocks += blocks;
    p.threads += blocks * k.x * k.y * k.z;
    p.seconds += now_s() - t0;
}
} // namespace

void ts_emu_enqueue_kernel(const ts_emu_cfg &cfg, ts_emu_body *body, const char *name)
{
    LOCK();
    std::shared_ptr<ts_emu_body> b(body);
    const dim3 g = cfg.grid, k = cfg.block;
    const unsigned long threads = (unsigned long)k.x * k.y * k.z;
    if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535 || threads == 0 || threads > 1024 ||
        k.z > 64 || cfg.shmem > 48 * 1024) {
        t_last_error = complain(cudaErrorInvalidConfiguration,
                                "kernel %s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u) shared %zu",
                                name, g.x, g.y, g.z, k.x, k.y, k.z, cfg.shmem);
        return;
    }
    const unsigned long seed = g_launches++;
    enqueue_fn(cfg.stream, [b, g, k, name, seed]() { run_kernel_profiled(g, k, b.get(), name, seed); });
}

/* ===== the CUDA runtime ============================================================== */

extern "C" {

cudaError_t CUDARTAPI cudaGetLastError(void)
{
    cudaError_t e = t_last_error;
    t_last_error = cudaSuccess;
    return e;
}

cudaError_t CUDARTAPI cudaPeekAtLastError(void) { return t_last_error; }

const char *CUDARTAPI cudaGetErrorName(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    default: return "cudaErrorUnknown";
    }
}

const char *CUDARTAPI cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    default: return "unknown error (cuda-emu)";
    }
}

cudaError_t CUDARTAPI cudaRuntimeGetVersion(int *v)
{
    *v = CUDART_VERSION;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDriverGetVersion(int *v)
{
    *v = CUDART_VERSION;
    return cudaSuccess;
}

/* TERRASEG_EMU_DEVICES=0 plays a machine without a GPU. */
cudaError_t CUDARTAPI cudaGetDeviceCount(int *count)
{
    *count = env_int("TERRASEG_EMU_DEVICES", 1);
    return *count > 0 ? cudaSuccess : cudaErrorNoDevice;
}

cudaError_t CUDARTAPI cudaSetDevice(int d)
{
    LOCK();
    if (d < 0 || d >= env_int("TERRASEG_EMU_DEVICES", 1)) return cudaErrorInvalidDevice;
    g_device = d;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetDevice(int *d)
{
    *d = g_device;
    return cudaSuccess;
}

/* Multiprocessors: few, so that grid-stride loops do go round (and the
 * emulation stays fast). TERRASEG_EMU_SMS changes it. */
static int sm_count(void) { return env_int("TERRASEG_EMU_SMS", 2); }

cudaError_t CUDARTAPI cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device)
{
    if (device < 0 || device >= env_int("TERRASEG_EMU_DEVICES", 1)) return cudaErrorInvalidDevice;
    switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = sm_count(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return complain(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute %d not emulated", (int)attr);
    }
}

cudaError_t CUDARTAPI cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device)
{
    if (device < 0 || device >= env_int("TERRASEG_EMU_DEVICES", 1)) return cudaErrorInvalidDevice;
    memset(prop, 0, sizeof *prop);
    snprintf(prop->name, sizeof prop->name, "terraseg CUDA emulator (host CPU)");
    prop->major = 9;
    prop->minor = 0;
    prop->totalGlobalMem = (size_t)80 << 30;
    prop->multiProcessorCount = sm_count();
    prop->warpSize = 32;
    prop->maxThreadsPerBlock = 1024;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFuncGetAttributes(struct cudaFuncAttributes *attr, const void *func)
{
    if (!func) return cudaErrorInvalidDeviceFunction;
    memset(attr, 0, sizeof *attr);
    attr->maxThreadsPerBlock = 1024;
    attr->binaryVersion = 90;
    attr->ptxVersion = 90;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMalloc(void **p, size_t bytes)
{
    LOCK();
    *p = nullptr;
    if (capture_forbids("cudaMalloc")) return cudaErrorStreamCaptureUnsupported;
    alloc_info info{bytes, true, nullptr, 0, 0};
    char *m;
    if (k_protect) {
        m = device_map(bytes, &info);
    } else {
        /* At least one byte, so every allocation has its own address. */
        m = (char *)malloc(bytes ? bytes : 1);
        if (m) memset(m, 0xff, bytes);
    }
    if (!m) return cudaErrorMemoryAllocation;
    g_allocs[m] = info;
    *p = m;
    return cudaSuccess;
}

static cudaError_t free_common(void *p, bool device, const char *call)
{
    LOCK();
    if (!p) return cudaSuccess;
    if (capture_forbids(call)) return cudaErrorStreamCaptureUnsupported;
    auto it = g_allocs.find((char *)p);
    if (it == g_allocs.end() || it->second.device != device)
        return complain(cudaErrorInvalidValue, "%s(%p): not a pointer from %s", call, p,
                        device ? "cudaMalloc" : "cudaHostAlloc");
    /* cudaFree waits for the device: queued work may still use the memory. */
    flush_all();
    const alloc_info info = it->second;
    g_allocs.erase(it);
    if (info.map)
        munmap(info.map, info.map_bytes);
    else
        free(p);
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFree(void *p) { return free_common(p, true, "cudaFree"); }

cudaError_t CUDARTAPI cudaHostAlloc(void **p, size_t bytes, unsigned int flags)
{
    LOCK();
    (void)flags;
    *p = nullptr;
    if (capture_forbids("cudaHostAlloc")) return cudaErrorStreamCaptureUnsupported;
    char *m = (char *)malloc(bytes ? bytes : 1);
    if (!m) return cudaErrorMemoryAllocation;
    memset(m, 0xff, bytes);
    g_allocs[m] = alloc_info{bytes, false, nullptr, 0, 0};
    *p = m;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFreeHost(void *p) { return free_common(p, false, "cudaFreeHost"); }

cudaError_t CUDARTAPI cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                                      cudaStream_t stream)
{
    LOCK();
    if (count == 0) return cudaSuccess;
    const bool dd = find_alloc(dst, count, nullptr) && is_device(dst);
    const bool sd = find_alloc(src, count, nullptr) && is_device(src);
    bool ok;
    switch (kind) {
    case cudaMemcpyHostToDevice: ok = dd && !is_device(src); break;
    case cudaMemcpyDeviceToHost: ok = sd && !is_device(dst); break;
    case cudaMemcpyDeviceToDevice: ok = dd && sd; break;
    case cudaMemcpyDefault: ok = (dd || !is_device(dst)) && (sd || !is_device(src)); break;
    default: ok = false; break;
    }
    if (!ok)
        return complain(cudaErrorInvalidValue,
                        "cudaMemcpyAsync(dst %p, src %p, %zu bytes, kind %d): a pointer is not in a device allocation "
                        "of that size, or the kind does not match the pointers",
                        dst, src, count, (int)kind);
    enqueue_fn(stream, [dst, src, count]() { memcpy(dst, src, count); });
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemsetAsync(void *p, int value, size_t count, cudaStream_t stream)
{
    LOCK();
    if (count == 0) return cudaSuccess;
    if (!(find_alloc(p, count, nullptr) && is_device(p)))
        return complain(cudaErrorInvalidValue, "cudaMemsetAsync(%p, %zu bytes): not inside one device allocation", p,
                        count);
    enqueue_fn(stream, [p, value, count]() { memset(p, value, count); });
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags)
{
    LOCK();
    (void)flags;
    *s = new CUstream_st;
    g_streams.push_back(*s);
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamDestroy(cudaStream_t s)
{
    LOCK();
    if (!s) return cudaErrorInvalidResourceHandle;
    flush(s); /* queued work still completes, as CUDA's does */
    for (size_t i = 0; i < g_streams.size(); i++)
        if (g_streams[i] == s) g_streams.erase(g_streams.begin() + (long)i);
    delete s;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamSynchronize(cudaStream_t s)
{
    LOCK();
    if (capture_forbids("cudaStreamSynchronize")) return cudaErrorStreamCaptureUnsupported;
    if (s)
        flush(s);
    else
        flush_all();
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceSynchronize(void)
{
    LOCK();
    if (capture_forbids("cudaDeviceSynchronize")) return cudaErrorStreamCaptureUnsupported;
    flush_all();
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventCreateWithFlags(cudaEvent_t *e, unsigned int flags)
{
    *e = new CUevent_st;
    (*e)->flags = flags;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventDestroy(cudaEvent_t e)
{
    LOCK();
    if (!e) return cudaErrorInvalidResourceHandle;
    /* A queued record of it would write freed memory: let it run first. */
    flush_all();
    delete e;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    LOCK();
    if (!e) return cudaErrorInvalidResourceHandle;
    if (!(s && s->capturing)) e->done = false;
    enqueue(s, op{std::function<void()>(), e});
    return cudaSuccess;
}

/* Runs the queued work in order until the event's record has run (not
 * further: work queued after it stays pending, as it may on a GPU). */
cudaError_t CUDARTAPI cudaEventSynchronize(cudaEvent_t e)
{
    LOCK();
    if (!e) return cudaErrorInvalidResourceHandle;
    if (capture_forbids("cudaEventSynchronize")) return cudaErrorStreamCaptureUnsupported;
    for (CUstream_st *s : g_streams) {
        while (!e->done && !s->queue.empty()) {
            bool mine = false;
            for (const op &o : s->queue)
                if (o.event == e) mine = true;
            if (!mine) break;
            op o = std::move(s->queue.front());
            s->queue.pop_front();
            run_op(o);
        }
    }
    if (!e->done) die("cudaEventSynchronize: the event's record is queued nowhere");
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamBeginCapture(cudaStream_t s, enum cudaStreamCaptureMode mode)
{
    LOCK();
    (void)mode;
    if (!s) return complain(cudaErrorStreamCaptureUnsupported, "cudaStreamBeginCapture on the legacy default stream");
    if (g_capturing) return complain(cudaErrorIllegalState, "cudaStreamBeginCapture: a capture is already running");
    s->capturing = true;
    s->invalidated = false;
    s->graph = new std::vector<op>;
    g_capturing = s;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph)
{
    LOCK();
    *graph = nullptr;
    if (!s || !s->capturing)
        return complain(cudaErrorIllegalState, "cudaStreamEndCapture: the stream is not capturing");
    std::unique_ptr<std::vector<op>> ops(s->graph);
    s->graph = nullptr;
    s->capturing = false;
    g_capturing = nullptr;
    if (s->invalidated) {
        s->invalidated = false;
        t_last_error = cudaErrorStreamCaptureInvalidated;
        return cudaErrorStreamCaptureInvalidated;
    }
    for (const op &o : *ops)
        if (o.event)
            return complain(cudaErrorStreamCaptureUnsupported, "an event record inside a capture is not emulated");
    *graph = new CUgraph_st;
    (*graph)->ops = std::move(*ops);
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags)
{
    (void)flags;
    if (!graph) return cudaErrorInvalidValue;
    *exec = new CUgraphExec_st;
    (*exec)->ops = graph->ops;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGraphDestroy(cudaGraph_t graph)
{
    delete graph;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGraphExecDestroy(cudaGraphExec_t exec)
{
    LOCK();
    delete exec; /* a replay still queued holds copies of the ops */
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s)
{
    LOCK();
    if (!exec) return cudaErrorInvalidValue;
    if (s && s->capturing) return complain(cudaErrorStreamCaptureUnsupported, "cudaGraphLaunch inside a capture");
    for (const op &o : exec->ops) enqueue(s, o);
    return cudaSuccess;
}

} // extern "C"

/* ===== cuDNN: the legacy convolution API, computed in double ======================== */

struct cudnnContext {
    cudaStream_t stream = nullptr;
};
struct cudnnTensorStruct {
    bool set = false;
    cudnnDataType_t type;
    int n, c, h, w;
    long sn, sc, sh, sw; /* element strides */
};
struct cudnnFilterStruct {
    bool set = false;
    cudnnDataType_t type;
    cudnnTensorFormat_t format;
    int k, c, h, w;
};
struct cudnnConvolutionStruct {
    bool set = false;
    int ph, pw, sh, sw, dh, dw;
    cudnnConvolutionMode_t mode;
    cudnnDataType_t compute;
    cudnnMathType_t math = CUDNN_DEFAULT_MATH;
};
struct cudnnActivationStruct {
    bool set = false;
    cudnnActivationMode_t mode;
};

namespace {

size_t type_size(cudnnDataType_t t)
{
    switch (t) {
    case CUDNN_DATA_FLOAT: return 4;
    case CUDNN_DATA_DOUBLE: return 8;
    case CUDNN_DATA_HALF:
    case CUDNN_DATA_BFLOAT16: return 2;
    default: return 0;
    }
}

double load(cudnnDataType_t t, const void *p, size_t i)
{
    switch (t) {
    case CUDNN_DATA_FLOAT: return ((const float *)p)[i];
    case CUDNN_DATA_DOUBLE: return ((const double *)p)[i];
    case CUDNN_DATA_HALF: return __half2float(((const __half *)p)[i]);
    case CUDNN_DATA_BFLOAT16: return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    default: die("load: data type %d", (int)t);
    }
}

void store(cudnnDataType_t t, void *p, size_t i, double v)
{
    switch (t) {
    case CUDNN_DATA_FLOAT: ((float *)p)[i] = (float)v; break;
    case CUDNN_DATA_DOUBLE: ((double *)p)[i] = v; break;
    case CUDNN_DATA_HALF: ((__half *)p)[i] = __float2half_rn((float)v); break;
    case CUDNN_DATA_BFLOAT16: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn((float)v); break;
    default: die("store: data type %d", (int)t);
    }
}

/* TF32: float32 with a 10-bit mantissa, rounded to nearest (ties away, as
 * the tensor cores' conversion). */
double tf32(double v)
{
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;
    memcpy(&f, &u, 4);
    return f;
}

size_t t_index(const cudnnTensorStruct *d, int n, int c, int h, int w)
{
    return (size_t)(n * d->sn + c * d->sc + h * d->sh + w * d->sw);
}

size_t f_index(const cudnnFilterStruct *d, int k, int c, int h, int w)
{
    if (d->format == CUDNN_TENSOR_NHWC) return (((size_t)k * d->h + h) * d->w + w) * d->c + c;
    return (((size_t)k * d->c + c) * d->h + h) * d->w + w;
}

size_t t_bytes(const cudnnTensorStruct *d) { return (size_t)d->n * d->c * d->h * d->w * type_size(d->type); }
size_t f_bytes(const cudnnFilterStruct *d) { return (size_t)d->k * d->c * d->h * d->w * type_size(d->type); }

/* The problem a conv call describes, checked like cuDNN checks it. */
struct conv_problem {
    const cudnnTensorStruct *x, *y;
    const cudnnFilterStruct *w;
    const cudnnConvolutionStruct *cv;
    int ho, wo;
};

cudnnStatus_t problem(conv_problem *p, const cudnnTensorStruct *x, const cudnnFilterStruct *w,
                      const cudnnConvolutionStruct *cv, const cudnnTensorStruct *y)
{
    if (!x || !w || !cv || !y || !x->set || !w->set || !cv->set || !y->set) return CUDNN_STATUS_BAD_PARAM;
    if (x->type != w->type || x->type != y->type || x->c != w->c || y->c != w->k || x->n != y->n)
        return CUDNN_STATUS_BAD_PARAM;
    if (cv->mode != CUDNN_CROSS_CORRELATION || cv->compute != CUDNN_DATA_FLOAT) return CUDNN_STATUS_NOT_SUPPORTED;
    const int ho = (x->h + 2 * cv->ph - cv->dh * (w->h - 1) - 1) / cv->sh + 1;
    const int wo = (x->w + 2 * cv->pw - cv->dw * (w->w - 1) - 1) / cv->sw + 1;
    if (ho != y->h || wo != y->w) return CUDNN_STATUS_BAD_PARAM;
    *p = conv_problem{x, y, w, cv, ho, wo};
    return CUDNN_STATUS_SUCCESS;
}

/* Three algorithms per direction, with distinct workspace needs:
 * 0 none, 1 a little, 2 one image's column matrix (a large one, for the
 * workspace limit to refuse). Backward algorithm 0 is non-deterministic,
 * as cuDNN's ALGO_0 (atomics). */
const int N_ALGOS = 3;

size_t algo_workspace(const conv_problem &p, int algo)
{
    switch (algo) {
    case 0: return 0;
    case 1: return (size_t)4096 + (size_t)p.w->k * 16;
    default: return (size_t)p.x->c * p.w->h * p.w->w * p.ho * p.wo * 8;
    }
}

enum conv_dir { DIR_FWD, DIR_BWD_DATA, DIR_BWD_FILTER };

bool algo_deterministic(conv_dir d, int algo) { return d == DIR_FWD || algo != 0; }

/* Inputs as cuDNN's tensor cores see them: float32 rounded to TF32 unless
 * FMA math (half data is used as it is). */
bool uses_tf32(const conv_problem &p) { return p.x->type == CUDNN_DATA_FLOAT && p.cv->math != CUDNN_FMA_MATH; }

/* col[(c * kh + i) * kw + j][oh * wo + ow] of image n. */
void im2col(const conv_problem &p, const void *x, int n, bool round, std::vector<double> &col)
{
    const cudnnTensorStruct *xd = p.x;
    const int C = xd->c, KH = p.w->h, KW = p.w->w, P = p.ho * p.wo;
    col.assign((size_t)C * KH * KW * P, 0.0);
    for (int c = 0; c < C; c++)
        for (int i = 0; i < KH; i++)
            for (int j = 0; j < KW; j++) {
                double *row = &col[((size_t)(c * KH + i) * KW + j) * P];
                for (int oh = 0; oh < p.ho; oh++) {
                    const int ih = oh * p.cv->sh - p.cv->ph + i * p.cv->dh;
                    if (ih < 0 || ih >= xd->h) continue;
                    for (int ow = 0; ow < p.wo; ow++) {
                        const int iw = ow * p.cv->sw - p.cv->pw + j * p.cv->dw;
                        if (iw < 0 || iw >= xd->w) continue;
                        const double v = load(xd->type, x, t_index(xd, n, c, ih, iw));
                        row[oh * p.wo + ow] = round ? tf32(v) : v;
                    }
                }
            }
}

/* w as a K x (C KH KW) matrix. */
void filter_matrix(const conv_problem &p, const void *w, bool round, std::vector<double> &m)
{
    const cudnnFilterStruct *wd = p.w;
    m.resize((size_t)wd->k * wd->c * wd->h * wd->w);
    for (int k = 0; k < wd->k; k++)
        for (int c = 0; c < wd->c; c++)
            for (int i = 0; i < wd->h; i++)
                for (int j = 0; j < wd->w; j++) {
                    const double v = load(wd->type, w, f_index(wd, k, c, i, j));
                    m[(((size_t)k * wd->c + c) * wd->h + i) * wd->w + j] = round ? tf32(v) : v;
                }
}

/* out[n][k][p] = conv(x, w) in double, K x P per image. */
void conv_forward(const conv_problem &p, const void *x, const void *w, std::vector<double> &out)
{
    const bool r = uses_tf32(p);
    std::vector<double> wm, col;
    filter_matrix(p, w, r, wm);
    const int K = p.w->k, P = p.ho * p.wo, CKK = p.w->c * p.w->h * p.w->w;
    out.assign((size_t)p.x->n * K * P, 0.0);
    for (int n = 0; n < p.x->n; n++) {
        im2col(p, x, n, r, col);
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, K, P, CKK, 1.0, wm.data(), CKK, col.data(), P, 0.0,
                    &out[(size_t)n * K * P], P);
    }
}

/* One value of a result nudged by one float ulp, at a place that changes
 * from call to call: what a non-deterministic (atomic) algorithm's varying
 * summation order does to the bits. */
unsigned long g_nondet_calls = 0;
void nondeterministic_nudge(std::vector<double> &v)
{
    if (v.empty()) return;
    const size_t i = (size_t)(g_nondet_calls++ * 2654435761u) % v.size();
    const float f = (float)v[i];
    v[i] = nextafterf(f, f < 0 ? -INFINITY : INFINITY);
}

/* y = alpha * r + beta * y over a tensor (beta 0: y not read). */
void blend_tensor(const cudnnTensorStruct *d, void *y, const std::vector<double> &r, double alpha, double beta)
{
    const int C = d->c, P = d->h * d->w;
    for (int n = 0; n < d->n; n++)
        for (int c = 0; c < C; c++)
            for (int q = 0; q < P; q++) {
                const size_t at = t_index(d, n, c, q / d->w, q % d->w);
                double v = alpha * r[((size_t)n * C + c) * P + q];
                if (beta != 0) v += beta * load(d->type, y, at);
                store(d->type, y, at, v);
            }
}

double scale_of(const void *p) { return *(const float *)p; }

/* The workspace an op was given, checked against what its algorithm asked;
 * then scribbled over (cuDNN uses it as scratch: nothing in it survives). */
cudnnStatus_t check_workspace(const conv_problem &p, int algo, void *ws, size_t bytes, const char *call)
{
    if (algo < 0 || algo >= N_ALGOS) {
        fprintf(stderr, "cuda-emu: %s: algorithm %d not emulated\n", call, algo);
        return CUDNN_STATUS_NOT_SUPPORTED;
    }
    const size_t need = algo_workspace(p, algo);
    if (bytes < need || (need && !ws) || (need && !find_alloc(ws, need, nullptr))) {
        fprintf(stderr, "cuda-emu: %s: algorithm %d needs %zu bytes of device workspace, got %zu at %p\n", call, algo,
                need, bytes, ws);
        return CUDNN_STATUS_BAD_PARAM;
    }
    return CUDNN_STATUS_SUCCESS;
}

bool refuse_fused(cudnnDataType_t t)
{
    const char *v = getenv("TERRASEG_EMU_REFUSE_FUSED");
    if (!v || !*v) return false;
    if (strstr(v, "all")) return true;
    const char *name = t == CUDNN_DATA_FLOAT ? "f32" : t == CUDNN_DATA_HALF ? "f16" : "bf16";
    const size_t n = strlen(name);
    for (const char *p = v; (p = strstr(p, name)) != nullptr; p += n)
        if ((p == v || p[-1] == ',') && (p[n] == 0 || p[n] == ',')) return true;
    return false;
}

bool in_device(const void *p, size_t bytes) { return p && find_alloc(p, bytes, nullptr) && is_device(p); }

template <typename Perf> void fill_perf(const conv_problem &p, conv_dir d, bool measured, int requested, int *got,
                                        Perf *perf)
{
    const int n = requested < N_ALGOS ? requested : N_ALGOS;
    for (int i = 0; i < n; i++) {
        /* The heuristic ranks 1, 0, 2; the "measurement" 2, 1, 0, so the two
         * modes choose differently. */
        static const int heur[N_ALGOS] = {1, 0, 2}, meas[N_ALGOS] = {2, 1, 0};
        const int a = measured ? meas[i] : heur[i];
        memset(&perf[i], 0, sizeof perf[i]);
        perf[i].algo = (decltype(perf[i].algo))a;
        perf[i].status = CUDNN_STATUS_SUCCESS;
        perf[i].time = (float)(i + 1);
        perf[i].memory = algo_workspace(p, a);
        perf[i].determinism = algo_deterministic(d, a) ? CUDNN_DETERMINISTIC : CUDNN_NON_DETERMINISTIC;
        perf[i].mathType = p.x->type == CUDNN_DATA_FLOAT && a == 2 ? CUDNN_FMA_MATH : CUDNN_TENSOR_OP_MATH;
    }
    *got = n;
}

} // namespace

/* The descriptors and the handle: plain structs here. */
template <typename T> cudnnStatus_t create_obj(T **out)
{
    *out = new T;
    return CUDNN_STATUS_SUCCESS;
}
template <typename T> cudnnStatus_t destroy_obj(T *p)
{
    delete p;
    return CUDNN_STATUS_SUCCESS;
}

extern "C" {

size_t CUDNNWINAPI cudnnGetVersion(void) { return CUDNN_VERSION; }
size_t CUDNNWINAPI cudnnGetCudartVersion(void) { return CUDART_VERSION; }

const char *CUDNNWINAPI cudnnGetErrorString(cudnnStatus_t s)
{
    switch (s) {
    case CUDNN_STATUS_SUCCESS: return "CUDNN_STATUS_SUCCESS";
    case CUDNN_STATUS_BAD_PARAM: return "CUDNN_STATUS_BAD_PARAM";
    case CUDNN_STATUS_NOT_SUPPORTED: return "CUDNN_STATUS_NOT_SUPPORTED";
    case CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE: return "CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE";
    default: return "CUDNN_STATUS_(cuda-emu: other)";
    }
}

cudnnStatus_t CUDNNWINAPI cudnnCreate(cudnnHandle_t *h) { return create_obj(h); }
cudnnStatus_t CUDNNWINAPI cudnnDestroy(cudnnHandle_t h) { return destroy_obj(h); }
cudnnStatus_t CUDNNWINAPI cudnnSetStream(cudnnHandle_t h, cudaStream_t s)
{
    h->stream = s;
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnCreateTensorDescriptor(cudnnTensorDescriptor_t *d) { return create_obj(d); }
cudnnStatus_t CUDNNWINAPI cudnnDestroyTensorDescriptor(cudnnTensorDescriptor_t d) { return destroy_obj(d); }
cudnnStatus_t CUDNNWINAPI cudnnSetTensor4dDescriptor(cudnnTensorDescriptor_t d, cudnnTensorFormat_t format,
                                                     cudnnDataType_t type, int n, int c, int h, int w)
{
    if (n <= 0 || c <= 0 || h <= 0 || w <= 0 || !type_size(type)) return CUDNN_STATUS_BAD_PARAM;
    d->type = type;
    d->n = n, d->c = c, d->h = h, d->w = w;
    if (format == CUDNN_TENSOR_NCHW) {
        d->sw = 1, d->sh = w, d->sc = (long)h * w, d->sn = (long)c * h * w;
    } else if (format == CUDNN_TENSOR_NHWC) {
        d->sc = 1, d->sw = c, d->sh = (long)w * c, d->sn = (long)h * w * c;
    } else {
        return CUDNN_STATUS_NOT_SUPPORTED;
    }
    d->set = true;
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnCreateFilterDescriptor(cudnnFilterDescriptor_t *d) { return create_obj(d); }
cudnnStatus_t CUDNNWINAPI cudnnDestroyFilterDescriptor(cudnnFilterDescriptor_t d) { return destroy_obj(d); }
cudnnStatus_t CUDNNWINAPI cudnnSetFilter4dDescriptor(cudnnFilterDescriptor_t d, cudnnDataType_t type,
                                                     cudnnTensorFormat_t format, int k, int c, int h, int w)
{
    if (k <= 0 || c <= 0 || h <= 0 || w <= 0 || !type_size(type)) return CUDNN_STATUS_BAD_PARAM;
    if (format != CUDNN_TENSOR_NCHW && format != CUDNN_TENSOR_NHWC) return CUDNN_STATUS_NOT_SUPPORTED;
    *d = cudnnFilterStruct{true, type, format, k, c, h, w};
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnCreateConvolutionDescriptor(cudnnConvolutionDescriptor_t *d) { return create_obj(d); }
cudnnStatus_t CUDNNWINAPI cudnnDestroyConvolutionDescriptor(cudnnConvolutionDescriptor_t d) { return destroy_obj(d); }
cudnnStatus_t CUDNNWINAPI cudnnSetConvolution2dDescriptor(cudnnConvolutionDescriptor_t d, int ph, int pw, int sh,
                                                          int sw, int dh, int dw, cudnnConvolutionMode_t mode,
                                                          cudnnDataType_t compute)
{
    if (ph < 0 || pw < 0 || sh <= 0 || sw <= 0 || dh <= 0 || dw <= 0) return CUDNN_STATUS_BAD_PARAM;
    const cudnnMathType_t math = d->math;
    *d = cudnnConvolutionStruct{true, ph, pw, sh, sw, dh, dw, mode, compute, math};
    return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t CUDNNWINAPI cudnnSetConvolutionMathType(cudnnConvolutionDescriptor_t d, cudnnMathType_t m)
{
    d->math = m;
    return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t CUDNNWINAPI cudnnGetConvolution2dForwardOutputDim(const cudnnConvolutionDescriptor_t cv,
                                                                const cudnnTensorDescriptor_t x,
                                                                const cudnnFilterDescriptor_t w, int *n, int *c,
                                                                int *h, int *wo)
{
    if (!cv->set || !x->set || !w->set || x->c != w->c) return CUDNN_STATUS_BAD_PARAM;
    *n = x->n;
    *c = w->k;
    *h = (x->h + 2 * cv->ph - cv->dh * (w->h - 1) - 1) / cv->sh + 1;
    *wo = (x->w + 2 * cv->pw - cv->dw * (w->w - 1) - 1) / cv->sw + 1;
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnCreateActivationDescriptor(cudnnActivationDescriptor_t *d) { return create_obj(d); }
cudnnStatus_t CUDNNWINAPI cudnnDestroyActivationDescriptor(cudnnActivationDescriptor_t d) { return destroy_obj(d); }
cudnnStatus_t CUDNNWINAPI cudnnSetActivationDescriptor(cudnnActivationDescriptor_t d, cudnnActivationMode_t mode,
                                                       cudnnNanPropagation_t nan, double coef)
{
    (void)nan;
    (void)coef;
    d->mode = mode;
    d->set = true;
    return CUDNN_STATUS_SUCCESS;
}

/* ---- algorithm choice ---- */

cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionForwardAlgorithmMaxCount(cudnnHandle_t h, int *count)
{
    (void)h;
    *count = N_ALGOS;
    return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionBackwardDataAlgorithmMaxCount(cudnnHandle_t h, int *count)
{
    (void)h;
    *count = N_ALGOS;
    return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(cudnnHandle_t h, int *count)
{
    (void)h;
    *count = N_ALGOS;
    return CUDNN_STATUS_SUCCESS;
}

#define PROBLEM_OR_RETURN(x, w, cv, y)                  \
    conv_problem p;                                     \
    {                                                   \
        cudnnStatus_t s_ = problem(&p, x, w, cv, y);    \
        if (s_ != CUDNN_STATUS_SUCCESS) return s_;      \
    }

} // extern "C"

namespace {
/* The six algorithm lists (heuristic _v7 and measured Find, per direction)
 * and the three workspace queries differ only in their argument order. */
template <typename Perf>
cudnnStatus_t list_algos(const cudnnTensorStruct *x, const cudnnFilterStruct *w, const cudnnConvolutionStruct *cv,
                         const cudnnTensorStruct *y, conv_dir d, const char *find_call, int req, int *got, Perf *perf)
{
    LOCK();
    if (find_call && capture_forbids(find_call)) return CUDNN_STATUS_BAD_PARAM; /* Find runs and waits */
    PROBLEM_OR_RETURN(x, w, cv, y);
    fill_perf(p, d, find_call != nullptr, req, got, perf);
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t workspace_query(const cudnnTensorStruct *x, const cudnnFilterStruct *w, const cudnnConvolutionStruct *cv,
                              const cudnnTensorStruct *y, int algo, size_t *bytes)
{
    PROBLEM_OR_RETURN(x, w, cv, y);
    if (algo < 0 || algo >= N_ALGOS) return CUDNN_STATUS_NOT_SUPPORTED;
    *bytes = algo_workspace(p, algo);
    return CUDNN_STATUS_SUCCESS;
}
} // namespace

extern "C" {

cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionForwardAlgorithm_v7(cudnnHandle_t, const cudnnTensorDescriptor_t x,
                                                                 const cudnnFilterDescriptor_t w,
                                                                 const cudnnConvolutionDescriptor_t cv,
                                                                 const cudnnTensorDescriptor_t y, const int req,
                                                                 int *got, cudnnConvolutionFwdAlgoPerf_t *perf)
{
    return list_algos(x, w, cv, y, DIR_FWD, nullptr, req, got, perf);
}
cudnnStatus_t CUDNNWINAPI cudnnFindConvolutionForwardAlgorithm(cudnnHandle_t, const cudnnTensorDescriptor_t x,
                                                               const cudnnFilterDescriptor_t w,
                                                               const cudnnConvolutionDescriptor_t cv,
                                                               const cudnnTensorDescriptor_t y, const int req,
                                                               int *got, cudnnConvolutionFwdAlgoPerf_t *perf)
{
    return list_algos(x, w, cv, y, DIR_FWD, "cudnnFindConvolutionForwardAlgorithm", req, got, perf);
}
cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionBackwardDataAlgorithm_v7(
    cudnnHandle_t, const cudnnFilterDescriptor_t w, const cudnnTensorDescriptor_t dy,
    const cudnnConvolutionDescriptor_t cv, const cudnnTensorDescriptor_t dx, const int req, int *got,
    cudnnConvolutionBwdDataAlgoPerf_t *perf)
{
    return list_algos(dx, w, cv, dy, DIR_BWD_DATA, nullptr, req, got, perf);
}
cudnnStatus_t CUDNNWINAPI cudnnFindConvolutionBackwardDataAlgorithm(
    cudnnHandle_t, const cudnnFilterDescriptor_t w, const cudnnTensorDescriptor_t dy,
    const cudnnConvolutionDescriptor_t cv, const cudnnTensorDescriptor_t dx, const int req, int *got,
    cudnnConvolutionBwdDataAlgoPerf_t *perf)
{
    return list_algos(dx, w, cv, dy, DIR_BWD_DATA, "cudnnFindConvolutionBackwardDataAlgorithm", req, got, perf);
}
cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionBackwardFilterAlgorithm_v7(
    cudnnHandle_t, const cudnnTensorDescriptor_t x, const cudnnTensorDescriptor_t dy,
    const cudnnConvolutionDescriptor_t cv, const cudnnFilterDescriptor_t dw, const int req, int *got,
    cudnnConvolutionBwdFilterAlgoPerf_t *perf)
{
    return list_algos(x, dw, cv, dy, DIR_BWD_FILTER, nullptr, req, got, perf);
}
cudnnStatus_t CUDNNWINAPI cudnnFindConvolutionBackwardFilterAlgorithm(
    cudnnHandle_t, const cudnnTensorDescriptor_t x, const cudnnTensorDescriptor_t dy,
    const cudnnConvolutionDescriptor_t cv, const cudnnFilterDescriptor_t dw, const int req, int *got,
    cudnnConvolutionBwdFilterAlgoPerf_t *perf)
{
    return list_algos(x, dw, cv, dy, DIR_BWD_FILTER, "cudnnFindConvolutionBackwardFilterAlgorithm", req, got, perf);
}

cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionForwardWorkspaceSize(cudnnHandle_t, const cudnnTensorDescriptor_t x,
                                                                  const cudnnFilterDescriptor_t w,
                                                                  const cudnnConvolutionDescriptor_t cv,
                                                                  const cudnnTensorDescriptor_t y,
                                                                  cudnnConvolutionFwdAlgo_t algo, size_t *bytes)
{
    return workspace_query(x, w, cv, y, (int)algo, bytes);
}
cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionBackwardDataWorkspaceSize(
    cudnnHandle_t, const cudnnFilterDescriptor_t w, const cudnnTensorDescriptor_t dy,
    const cudnnConvolutionDescriptor_t cv, const cudnnTensorDescriptor_t dx, cudnnConvolutionBwdDataAlgo_t algo,
    size_t *bytes)
{
    return workspace_query(dx, w, cv, dy, (int)algo, bytes);
}
cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionBackwardFilterWorkspaceSize(
    cudnnHandle_t, const cudnnTensorDescriptor_t x, const cudnnTensorDescriptor_t dy,
    const cudnnConvolutionDescriptor_t cv, const cudnnFilterDescriptor_t dw, cudnnConvolutionBwdFilterAlgo_t algo,
    size_t *bytes)
{
    return workspace_query(x, dw, cv, dy, (int)algo, bytes);
}

/* ---- the convolutions: checked now, computed when the stream runs them ---- */

cudnnStatus_t CUDNNWINAPI cudnnConvolutionForward(cudnnHandle_t h, const void *alpha,
                                                  const cudnnTensorDescriptor_t xd, const void *x,
                                                  const cudnnFilterDescriptor_t wd, const void *w,
                                                  const cudnnConvolutionDescriptor_t cv,
                                                  cudnnConvolutionFwdAlgo_t algo, void *ws, size_t ws_bytes,
                                                  const void *beta, const cudnnTensorDescriptor_t yd, void *y)
{
    LOCK();
    PROBLEM_OR_RETURN(xd, wd, cv, yd);
    cudnnStatus_t s = check_workspace(p, (int)algo, ws, ws_bytes, "cudnnConvolutionForward");
    if (s != CUDNN_STATUS_SUCCESS) return s;
    if (!in_device(x, t_bytes(xd)) || !in_device(w, f_bytes(wd)) || !in_device(y, t_bytes(yd)))
        return CUDNN_STATUS_BAD_PARAM;
    const double a = scale_of(alpha), b = scale_of(beta);
    enqueue_fn(h->stream, [p, x, w, y, a, b]() {
        std::vector<double> r;
        conv_forward(p, x, w, r);
        blend_tensor(p.y, y, r, a, b);
    });
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnConvolutionBiasActivationForward(
    cudnnHandle_t h, const void *alpha1, const cudnnTensorDescriptor_t xd, const void *x,
    const cudnnFilterDescriptor_t wd, const void *w, const cudnnConvolutionDescriptor_t cv,
    cudnnConvolutionFwdAlgo_t algo, void *ws, size_t ws_bytes, const void *alpha2, const cudnnTensorDescriptor_t zd,
    const void *z, const cudnnTensorDescriptor_t bd, const void *bias, const cudnnActivationDescriptor_t act,
    const cudnnTensorDescriptor_t yd, void *y)
{
    LOCK();
    PROBLEM_OR_RETURN(xd, wd, cv, yd);
    /* Which data types cuDNN's legacy fused call takes is cuDNN's business,
     * not the emulator's: it takes all three, unless
     * TERRASEG_EMU_REFUSE_FUSED names the type ("f32", "f16", "bf16", a list
     * or "all"), so that the refusal path (conv.c falls back to two passes
     * and remembers it) runs too. */
    if (refuse_fused(xd->type)) return CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE;
    if (!act || !act->set || (act->mode != CUDNN_ACTIVATION_RELU && act->mode != CUDNN_ACTIVATION_IDENTITY))
        return CUDNN_STATUS_BAD_PARAM;
    /* cuDNN: IDENTITY only with IMPLICIT_PRECOMP_GEMM. */
    if (act->mode == CUDNN_ACTIVATION_IDENTITY && algo != CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM)
        return CUDNN_STATUS_NOT_SUPPORTED;
    if (!zd || !zd->set || zd->n != yd->n || zd->c != yd->c || zd->h != yd->h || zd->w != yd->w ||
        zd->type != yd->type || zd->sn != yd->sn || zd->sc != yd->sc || zd->sh != yd->sh || zd->sw != yd->sw)
        return CUDNN_STATUS_BAD_PARAM;
    if (!bd || !bd->set || bd->n != 1 || bd->c != yd->c || bd->h != 1 || bd->w != 1) return CUDNN_STATUS_BAD_PARAM;
    cudnnStatus_t s = check_workspace(p, (int)algo, ws, ws_bytes, "cudnnConvolutionBiasActivationForward");
    if (s != CUDNN_STATUS_SUCCESS) return s;
    if (!in_device(x, t_bytes(xd)) || !in_device(w, f_bytes(wd)) || !in_device(y, t_bytes(yd)) ||
        !in_device(z, t_bytes(zd)) || !in_device(bias, t_bytes(bd)))
        return CUDNN_STATUS_BAD_PARAM;
    const double a1 = scale_of(alpha1), a2 = scale_of(alpha2);
    const bool relu = act->mode == CUDNN_ACTIVATION_RELU;
    const cudnnTensorStruct zdesc = *zd, bdesc = *bd;
    enqueue_fn(h->stream, [p, x, w, y, z, bias, a1, a2, relu, zdesc, bdesc]() {
        std::vector<double> r;
        conv_forward(p, x, w, r);
        const cudnnTensorStruct *d = p.y;
        const int C = d->c, P = d->h * d->w;
        for (int n = 0; n < d->n; n++)
            for (int c = 0; c < C; c++) {
                const double bc = load(bdesc.type, bias, t_index(&bdesc, 0, c, 0, 0));
                for (int q = 0; q < P; q++) {
                    const size_t at = t_index(d, n, c, q / d->w, q % d->w);
                    double v = a1 * r[((size_t)n * C + c) * P + q] + bc;
                    /* alpha2 0: z is not read (it may be y, whatever y held). */
                    if (a2 != 0) v += a2 * load(zdesc.type, z, t_index(&zdesc, n, c, q / d->w, q % d->w));
                    if (relu) v = v > 0 ? v : 0;
                    store(d->type, y, at, v);
                }
            }
    });
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnConvolutionBackwardData(cudnnHandle_t h, const void *alpha,
                                                       const cudnnFilterDescriptor_t wd, const void *w,
                                                       const cudnnTensorDescriptor_t dyd, const void *dy,
                                                       const cudnnConvolutionDescriptor_t cv,
                                                       cudnnConvolutionBwdDataAlgo_t algo, void *ws, size_t ws_bytes,
                                                       const void *beta, const cudnnTensorDescriptor_t dxd, void *dx)
{
    LOCK();
    PROBLEM_OR_RETURN(dxd, wd, cv, dyd);
    cudnnStatus_t s = check_workspace(p, (int)algo, ws, ws_bytes, "cudnnConvolutionBackwardData");
    if (s != CUDNN_STATUS_SUCCESS) return s;
    if (!in_device(w, f_bytes(wd)) || !in_device(dy, t_bytes(dyd)) || !in_device(dx, t_bytes(dxd)))
        return CUDNN_STATUS_BAD_PARAM;
    const double a = scale_of(alpha), b = scale_of(beta);
    const bool nondet = !algo_deterministic(DIR_BWD_DATA, (int)algo);
    enqueue_fn(h->stream, [p, w, dy, dx, a, b, nondet]() {
        const bool r = uses_tf32(p);
        std::vector<double> wm, g, dcol, out;
        filter_matrix(p, w, r, wm);
        const int K = p.w->k, P = p.ho * p.wo, C = p.w->c, KH = p.w->h, KW = p.w->w, CKK = C * KH * KW;
        const cudnnTensorStruct *xd = p.x, *yd = p.y;
        out.assign((size_t)xd->n * C * xd->h * xd->w, 0.0);
        g.resize((size_t)K * P);
        dcol.resize((size_t)CKK * P);
        for (int n = 0; n < xd->n; n++) {
            for (int k = 0; k < K; k++)
                for (int q = 0; q < P; q++) {
                    const double v = load(yd->type, dy, t_index(yd, n, k, q / p.wo, q % p.wo));
                    g[(size_t)k * P + q] = r ? tf32(v) : v;
                }
            cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, CKK, P, K, 1.0, wm.data(), CKK, g.data(), P, 0.0,
                        dcol.data(), P);
            for (int c = 0; c < C; c++)
                for (int i = 0; i < KH; i++)
                    for (int j = 0; j < KW; j++) {
                        const double *row = &dcol[((size_t)(c * KH + i) * KW + j) * P];
                        for (int oh = 0; oh < p.ho; oh++) {
                            const int ih = oh * p.cv->sh - p.cv->ph + i * p.cv->dh;
                            if (ih < 0 || ih >= xd->h) continue;
                            for (int ow = 0; ow < p.wo; ow++) {
                                const int iw = ow * p.cv->sw - p.cv->pw + j * p.cv->dw;
                                if (iw < 0 || iw >= xd->w) continue;
                                out[(((size_t)n * C + c) * xd->h + ih) * xd->w + iw] += row[oh * p.wo + ow];
                            }
                        }
                    }
        }
        if (nondet) nondeterministic_nudge(out);
        blend_tensor(xd, dx, out, a, b);
    });
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnConvolutionBackwardFilter(cudnnHandle_t h, const void *alpha,
                                                         const cudnnTensorDescriptor_t xd, const void *x,
                                                         const cudnnTensorDescriptor_t dyd, const void *dy,
                                                         const cudnnConvolutionDescriptor_t cv,
                                                         cudnnConvolutionBwdFilterAlgo_t algo, void *ws,
                                                         size_t ws_bytes, const void *beta,
                                                         const cudnnFilterDescriptor_t dwd, void *dw)
{
    LOCK();
    PROBLEM_OR_RETURN(xd, dwd, cv, dyd);
    cudnnStatus_t s = check_workspace(p, (int)algo, ws, ws_bytes, "cudnnConvolutionBackwardFilter");
    if (s != CUDNN_STATUS_SUCCESS) return s;
    if (!in_device(x, t_bytes(xd)) || !in_device(dy, t_bytes(dyd)) || !in_device(dw, f_bytes(dwd)))
        return CUDNN_STATUS_BAD_PARAM;
    const double a = scale_of(alpha), b = scale_of(beta);
    const bool nondet = !algo_deterministic(DIR_BWD_FILTER, (int)algo);
    enqueue_fn(h->stream, [p, x, dy, dw, a, b, nondet]() {
        const bool r = uses_tf32(p);
        const int K = p.w->k, P = p.ho * p.wo, CKK = p.w->c * p.w->h * p.w->w;
        const cudnnTensorStruct *yd = p.y;
        std::vector<double> col, g((size_t)K * P), acc((size_t)K * CKK, 0.0);
        for (int n = 0; n < p.x->n; n++) {
            im2col(p, x, n, r, col);
            for (int k = 0; k < K; k++)
                for (int q = 0; q < P; q++) {
                    const double v = load(yd->type, dy, t_index(yd, n, k, q / p.wo, q % p.wo));
                    g[(size_t)k * P + q] = r ? tf32(v) : v;
                }
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, K, CKK, P, 1.0, g.data(), P, col.data(), P, 1.0,
                        acc.data(), CKK);
        }
        if (nondet) nondeterministic_nudge(acc);
        const cudnnFilterStruct *wd = p.w;
        for (int k = 0; k < K; k++)
            for (int c = 0; c < wd->c; c++)
                for (int i = 0; i < wd->h; i++)
                    for (int j = 0; j < wd->w; j++) {
                        const size_t at = f_index(wd, k, c, i, j);
                        double v = a * acc[(((size_t)k * wd->c + c) * wd->h + i) * wd->w + j];
                        if (b != 0) v += b * load(wd->type, dw, at);
                        store(wd->type, dw, at, v);
                    }
    });
    return CUDNN_STATUS_SUCCESS;
}

/* ===== cuBLAS: the handle (the backend makes one) and the bench's SGEMM ============ */

struct cublasContext {
    cudaStream_t stream = nullptr;
    cublasMath_t math = CUBLAS_DEFAULT_MATH;
};

cublasStatus_t CUBLASWINAPI cublasCreate_v2(cublasHandle_t *h)
{
    *h = new cublasContext;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t CUBLASWINAPI cublasDestroy_v2(cublasHandle_t h)
{
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t CUBLASWINAPI cublasSetStream_v2(cublasHandle_t h, cudaStream_t s)
{
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t CUBLASWINAPI cublasSetMathMode(cublasHandle_t h, cublasMath_t m)
{
    h->math = m;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t CUBLASWINAPI cublasGetProperty(libraryPropertyType type, int *value)
{
    switch (type) {
    case MAJOR_VERSION: *value = CUBLAS_VER_MAJOR; break;
    case MINOR_VERSION: *value = CUBLAS_VER_MINOR; break;
    default: *value = CUBLAS_VER_PATCH; break;
    }
    return CUBLAS_STATUS_SUCCESS;
}
/* Column-major, as cuBLAS; `terraseg bench conv` times it as the GEMM peak. */
cublasStatus_t CUBLASWINAPI cublasSgemm_v2(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                           int k, const float *alpha, const float *a, int lda, const float *b, int ldb,
                                           const float *beta, float *c, int ldc)
{
    LOCK();
    if (m < 0 || n < 0 || k < 0 || (ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) || (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T))
        return CUBLAS_STATUS_INVALID_VALUE;
    const float al = *alpha, be = *beta;
    enqueue_fn(h->stream, [=]() {
        cblas_sgemm(CblasColMajor, ta == CUBLAS_OP_T ? CblasTrans : CblasNoTrans,
                    tb == CUBLAS_OP_T ? CblasTrans : CblasNoTrans, m, n, k, al, a, lda, b, ldb, be, c, ldc);
    });
    return CUBLAS_STATUS_SUCCESS;
}

const char *CUBLASWINAPI cublasGetStatusString(cublasStatus_t s)
{
    return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_(cuda-emu: other)";
}

} // extern "C"
