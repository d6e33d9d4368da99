/* The backend tables and their lookup. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu/cpu.h"
#ifdef TERRASEG_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

/* The CPU backend's memory is the process's own: the interface exists so
 * that code written for a separate-memory backend (ts_unet_device) also runs,
 * and is tested, on the CPU. */
static ts_status cpu_alloc(void **p, size_t bytes)
{
    *p = ts_aligned_alloc(bytes ? bytes : 1);
    if (!*p) return ts_error(TS_ERR_NOMEM, "cpu backend: out of memory allocating %zu bytes", bytes);
    return TS_OK;
}

static void cpu_free(void *p) { ts_aligned_free(p); }

static ts_status cpu_copy(void *dst, const void *src, size_t bytes)
{
    if (bytes) memcpy(dst, src, bytes);
    return TS_OK;
}

static ts_status cpu_sync(void) { return TS_OK; }

static const ts_backend_memory cpu_memory = {
    .host = 1,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
};

#define TS_CPU_ENTRY(op) .op = ts_cpu_##op,
static const ts_backend cpu_backend = {
    .name = "cpu",
    .memory = &cpu_memory,
    TS_BACKEND_OPS(TS_CPU_ENTRY)
};

const ts_backend *ts_backend_cpu(void) { return &cpu_backend; }

ts_status ts_device_parse(const char *name, int *cuda, int *index)
{
    *cuda = 0;
    *index = 0;
    if (name && strcmp(name, "cpu") == 0) return TS_OK;
    if (name && strncmp(name, "cuda", 4) == 0 && (name[4] == 0 || name[4] == ':')) {
        *cuda = 1;
        if (name[4] == 0) return TS_OK;
        char *end = NULL;
        long d = strtol(name + 5, &end, 10);
        if (name[5] < '0' || name[5] > '9' || *end || d > 1023)
            return ts_error(TS_ERR_INVALID_ARG, "backend \"%s\": write cuda or cuda:N with N a device index", name);
        *index = (int)d;
        return TS_OK;
    }
    return ts_error(TS_ERR_INVALID_ARG, "unknown backend \"%s\": choose cpu, cuda or cuda:N", name ? name : "(null)");
}

ts_status ts_backend_get(const char *name, const ts_backend **out)
{
    *out = NULL;
    int cuda, device;
    ts_status st = ts_device_parse(name, &cuda, &device);
    if (st != TS_OK) return st;
    if (!cuda) {
        *out = &cpu_backend;
        return TS_OK;
    }
#ifdef TERRASEG_HAVE_CUDA
    return ts_cuda_backend(device, out);
#else
    (void)device;
    return ts_error(TS_ERR_UNSUPPORTED,
                    "backend \"cuda\": this terraseg was built without CUDA (TERRASEG_CUDA=OFF or no nvcc/cuDNN "
                    "found at configure time); rebuild with -DTERRASEG_CUDA=ON on a machine with the CUDA "
                    "toolkit, or use --device cpu");
#endif
}

ts_status ts_device_math_set(const ts_device_math *m)
{
    if (!m) return ts_error(TS_ERR_INVALID_ARG, "device math settings: NULL");
#ifdef TERRASEG_HAVE_CUDA
    ts_cuda_set_deterministic(m->deterministic);
    ts_cuda_set_tf32(m->tf32);
    ts_cuda_set_benchmark(m->benchmark);
    return TS_OK;
#else
    if (m->deterministic || m->tf32 || m->benchmark)
        return ts_error(TS_ERR_UNSUPPORTED, "deterministic, TF32 and cuDNN benchmark settings are for the CUDA backend, "
                                            "and this terraseg was built without CUDA");
    return TS_OK;
#endif
}

ts_status ts_backend_check(const ts_backend *b)
{
    char missing[1024] = "";
    size_t len = 0;
    int count = 0;
#define TS_CHECK_ENTRY(op)                                                                  \
    if (!b->op) {                                                                           \
        int k = snprintf(missing + len, sizeof missing - len, "%s%s", count ? ", " : "", #op); \
        if (k > 0 && (size_t)k < sizeof missing - len) len += (size_t)k;                    \
        count++;                                                                            \
    }
    TS_BACKEND_OPS(TS_CHECK_ENTRY)
#undef TS_CHECK_ENTRY
    const ts_backend_memory *m = b->memory;
    if (!m || !m->alloc || !m->free || !m->upload || !m->download || !m->sync) {
        int k = snprintf(missing + len, sizeof missing - len, "%s%s", count ? ", " : "", "memory");
        if (k > 0 && (size_t)k < sizeof missing - len) len += (size_t)k;
        count++;
    }
    if (count)
        return ts_error(TS_ERR_UNSUPPORTED, "backend \"%s\" lacks %d op(s): %s", b->name, count, missing);
    return TS_OK;
}

int ts_backend_is_host(const ts_backend *b) { return b && b->memory && b->memory->host; }

int ts_backend_memory_async(const ts_backend_memory *m)
{
    return m && m->host_alloc && m->host_free && m->download_async && m->upload_async && m->fence_new && m->fence_record &&
           m->fence_wait && m->fence_free;
}
