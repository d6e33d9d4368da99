/* The U-Net's device copy (ts_unet_device) on the CUDA backend against the
 * host model's folded forward on the CPU: two configurations (decoder BN on,
 * 5 levels; off, 3 levels, one class), odd sizes, batch 2, then a second
 * shape on the same copy (replanning in device memory). Logits agree within
 * 1e-4 of the largest |logit| (fp32 cuDNN convolutions against OpenBLAS;
 * TF32 off), and the host model refuses the CUDA table.
 *
 * Mixed precision (ts_unet_device_set_precision), bf16 and fp16, on the same
 * copies and shapes: the CUDA half inference copy against (a) the CPU
 * backend's inference copy at the same precision (kernels/cpu/half.c, the
 * reference every CUDA half op is held to by test_cuda_half.c) and (b) the
 * float32 folded forward, as tests/test_mixed.c holds the CPU half copy;
 * then the same copy set back to float32 meets the float32 bound again.
 *
 * CUDA graphs: the forward recorded and replayed gives the bits of the same
 * forward with every op called directly, in float32 and bf16. The same for
 * ts_unet_device_forward_start (asynchronous downloads into pinned memory,
 * two batches in flight) against the synchronous forward.
 * These shapes use no SMP fixture (random weights and statistics).
 *
 * Device: TERRASEG_TEST_DEVICE (cuda, cuda:N or N; cuda:0 by default). Fails,
 * never skips, without a usable device: it runs only from tools/test_gpu.sh
 * (CTest label "gpu"). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "nn/unet.h"
#include "tests/testutil.h"

#define SUITE "cuda_unet"

static void compare(ts_unet *m, ts_ctx *cpu, ts_ctx *gpu, ts_unet_device *d, int n, int h, int w, const char *name)
{
    tu_rng rng;
    tu_rng_seed(&rng, (uint64_t)(n * 1000 + h * 10 + w));
    ts_tensor x = tu_tensor(n, m->cfg.in_channels, h, w), l = tu_tensor(n, m->cfg.classes, h, w), ref;
    tu_fill(&rng, x.data, ts_tensor_numel(&x), -1, 1);
    if (tu_expect_ok(ts_unet_forward_folded(m, cpu, &x, &ref), "cpu forward_folded") &&
        tu_expect_ok(ts_unet_device_forward(d, gpu, &x, &l), name)) {
        double md = 0, mr = 0;
        for (size_t i = 0; i < ts_tensor_numel(&l); i++) {
            md = fmax(md, fabs((double)l.data[i] - ref.data[i]));
            mr = fmax(mr, fabs(ref.data[i]));
        }
        tu_expect(md <= 1e-4 * mr, "%s [%d,%d,%d]: max |cuda - cpu| %.3e within 1e-4 of max |logit| %.3e", name, n, h,
                  w, md, mr);
    }
    tu_tensor_free(&x, SUITE, "x");
    tu_tensor_free(&l, SUITE, "logits");
}

/* ---- mixed precision ----------------------------------------------------- */

/* max |a - b| / max |b| (NaN propagates), as tests/test_mixed.c measures a
 * half type's error: relative to the tensor's scale. *differ: any bit. */
static double rel_err(const float *a, const float *b, size_t n, int *differ)
{
    double dmax = 0, rmax = 0;
    *differ = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= dmax)) dmax = d;
        rmax = fmax(rmax, fabs((double)b[i]));
        *differ |= a[i] != b[i];
    }
    return rmax > 0 ? dmax / rmax : dmax;
}

/* The bounds, relative to max |reference logit|.
 *
 * (b) CUDA half against the float32 folded forward: tests/test_mixed.c's
 * bound for the CPU half copy against float32 (8e-2 bf16, 1.2e-2 fp16; it
 * measured 0.014 and 0.0018 on the depth-5 configuration here, the
 * decoder {32,16,16,8,8} of its small_cfg(5)). A wrong layout, offset, a
 * lost bias or a missing cast is off by O(1).
 *
 * (a) CUDA half against the CPU half copy. Both cast the same float32
 * weights and input to the same half values, and every op takes the same
 * half inputs, sums products that are exact in float32 in float32, and
 * rounds. They differ where the GPU rounds differently, not where the type
 * does:
 *   - float32 summation order (cuDNN, the scatter-adds): ~1e-6 relative,
 *     far below a half ulp (2^-8 bf16, 2^-11 fp16), so it only moves the one
 *     rounding of an element to the neighbouring half value now and then
 *     (test_cuda_half.c: <= 1 ulp per op);
 *   - the biased forward: cuDNN rounds the convolution to the half type and
 *     the bias/ReLU epilogue (conv_epilogue.cu) rounds again, where the CPU
 *     rounds conv + bias once. Every conv of an inference copy has a bias
 *     (the BN folded in), so every conv adds one extra rounding: up to one
 *     ulp per element, about as large as the rounding the half type adds to
 *     each op anyway (<= 1/2 ulp), and it propagates through the same
 *     network.
 * Per op that is up to 2 ulps (test_cuda_half.c's accounting: 1 for the
 * summation order, 1 for the second rounding) against the CPU half copy's
 * <= 1/2 ulp rounding plus its weight and input casts (about 1/2 ulp
 * relative each) against float32: injections per layer of the same order,
 * at most about twice as large, through the same propagation. So the bound
 * is a multiple of the CPU half copy's error against float32 measured in
 * the same call (e_ref below: the scale the type sets on this network and
 * batch), 3 x e_ref (two copies whose roundings were as large as the
 * type's and independent would be about sqrt(2) e_ref apart; 3 leaves a
 * factor 2 for the GPU's extra roundings), plus 1/4 ulp of the largest
 * logit in case e_ref is small by chance. A model of these differences on the host (the CPU
 * backend with the second rounding in the biased forward and in the
 * beta = 1 blends of backward data / filter, and 2 eps sqrt(K) rms noise
 * under every conv's rounding) gave 1.0 to 1.6 x e_ref on these shapes:
 * an estimate, not a GPU measurement. A wrong layout, a lost bias or
 * cast is O(1) off (fails both bounds); convert rounding toward zero
 * instead of to nearest fails (a) only. Smaller per-op losses (a conv
 * summing in a few half-rounded chunks: ~2 x e_ref here) are
 * test_cuda_half.c's to catch, op by op. */
#define HALF_REF_RATIO 3.0
static double half_ulp_rel(ts_dtype t) { return t == TS_BF16 ? 0x1p-8 : 0x1p-11; }
static double half_f32_bound(ts_dtype t) { return t == TS_BF16 ? 8e-2 : 1.2e-2; }

static void compare_half(ts_unet *m, ts_ctx *cpu, ts_ctx *gpu, ts_unet_device *d, ts_unet_device *dc, ts_dtype prec,
                         int n, int h, int w, const char *name)
{
    const char *pn = ts_dtype_name(prec);
    tu_rng rng;
    tu_rng_seed(&rng, (uint64_t)(n * 1000 + h * 10 + w));
    ts_tensor x = tu_tensor(n, m->cfg.in_channels, h, w), l = tu_tensor(n, m->cfg.classes, h, w),
              lc = tu_tensor(n, m->cfg.classes, h, w), ref;
    tu_fill(&rng, x.data, ts_tensor_numel(&x), -1, 1);
    if (tu_expect_ok(ts_unet_forward_folded(m, cpu, &x, &ref), "cpu forward_folded") &&
        tu_expect_ok(ts_unet_device_forward(dc, cpu, &x, &lc), "cpu half forward") &&
        tu_expect_ok(ts_unet_device_forward(d, gpu, &x, &l), name)) {
        const size_t nl = ts_tensor_numel(&l);
        int differ, dref;
        const double e_ref = rel_err(lc.data, ref.data, nl, &dref);
        const double e_cpu = rel_err(l.data, lc.data, nl, &differ);
        const double e_f32 = rel_err(l.data, ref.data, nl, &differ);
        const double b_cpu = HALF_REF_RATIO * e_ref + 0.25 * half_ulp_rel(prec), b_f32 = half_f32_bound(prec);
        printf("  %s [%d,%d,%d]: cuda vs cpu %.3e, cuda vs f32 %.3e, cpu vs f32 %.3e\n", name, n, h, w, e_cpu,
               e_f32, e_ref);
        tu_expect(dref, "%s [%d,%d,%d]: the cpu half copy is not float32 (the half path ran)", name, n, h, w);
        tu_expect(e_cpu <= b_cpu, "%s [%d,%d,%d]: cuda vs cpu at %s %.3e <= %.3e (%.1f x cpu vs f32 %.3e + 1/4 ulp)",
                  name, n, h, w, pn, e_cpu, b_cpu, HALF_REF_RATIO, e_ref);
        tu_expect(e_f32 <= b_f32 && differ, "%s [%d,%d,%d]: cuda vs float32 %.3e <= %g, not equal", name, n, h, w,
                  e_f32, b_f32);
    }
    tu_tensor_free(&x, SUITE, "x");
    tu_tensor_free(&l, SUITE, "logits");
    tu_tensor_free(&lc, SUITE, "cpu logits");
}

/* The CUDA copy d at precision prec, and a CPU inference copy of the same
 * folded model at the same precision, on the float32 shapes (the last one
 * again: replanning at half sizes). */
static void half_case(ts_unet *m, ts_ctx *cpu, ts_ctx *gpu, ts_unet_device *d, ts_dtype prec, const char *name)
{
    char what[96];
    snprintf(what, sizeof what, "%s, %s", name, ts_dtype_name(prec));
    ts_unet_device dc;
    memset(&dc, 0, sizeof dc);
    if (tu_expect_ok(ts_unet_device_set_precision(d, gpu, prec), "cuda set_precision") &&
        tu_expect(ts_unet_device_precision(d) == prec, "%s: the copy reports its precision", what) &&
        tu_expect_ok(ts_unet_device_init(&dc, m, cpu->backend), "cpu inference copy") &&
        tu_expect_ok(ts_unet_device_set_precision(&dc, cpu, prec), "cpu set_precision")) {
        compare_half(m, cpu, gpu, d, &dc, prec, 2, 45, 37, what);
        compare_half(m, cpu, gpu, d, &dc, prec, 1, 33, 65, what);
        compare_half(m, cpu, gpu, d, &dc, prec, 2, 45, 37, what);
    }
    ts_unet_device_free(&dc);
}

/* ---- CUDA graphs ------------------------------------------------------------ */

/* The forward replayed from a CUDA graph against the same forward with every
 * op called directly (ts_unet_device_set_graphs), at the copy's precision:
 * the same kernels on the same data, so the same bits (deterministic
 * algorithms, so both pick the same ones). Direct first, then recorded and
 * launched, then launched on new data in the same input buffer; and the
 * copy reports one recording and three launches. A TF32 change then makes
 * the recording stale. */
static void graph_case(ts_unet *m, ts_ctx *gpu, ts_unet_device *d, const char *name)
{
    char what[128];
    snprintf(what, sizeof what, "%s, %s, CUDA graph", name, ts_dtype_name(ts_unet_device_precision(d)));
    const int n = 2, h = 45, w = 37, K = m->cfg.classes;
    tu_rng rng;
    tu_rng_seed(&rng, 77);
    ts_tensor x[2] = {tu_tensor(n, m->cfg.in_channels, h, w), tu_tensor(n, m->cfg.in_channels, h, w)};
    ts_tensor ref[2] = {tu_tensor(n, K, h, w), tu_tensor(n, K, h, w)}, l = tu_tensor(n, K, h, w);
    const size_t nl = ts_tensor_numel(&l);
    for (int i = 0; i < 2; i++) tu_fill(&rng, x[i].data, ts_tensor_numel(&x[i]), -1, 1);
    const long records = d->graph_records, launches = d->graph_launches;
    ts_cuda_set_deterministic(1);
    ts_unet_device_set_graphs(d, 0);
    int ok = tu_expect_ok(ts_unet_device_forward(d, gpu, &x[0], &ref[0]), "direct forward 1") &&
             tu_expect_ok(ts_unet_device_forward(d, gpu, &x[1], &ref[1]), "direct forward 2");
    ts_unet_device_set_graphs(d, 1);
    static const int order[4] = {0, 0, 1, 0}; /* direct, recorded, replayed twice */
    for (int i = 0; ok && i < 4; i++) {
        const int k = order[i];
        if (!tu_expect_ok(ts_unet_device_forward(d, gpu, &x[k], &l), what)) break;
        size_t bad = 0;
        for (size_t j = 0; j < nl; j++) bad += memcmp(&l.data[j], &ref[k].data[j], sizeof(float)) != 0;
        tu_expect(bad == 0, "%s: call %d (%s) equals the direct forward bit for bit (%zu of %zu differ)", what, i + 1,
                  i == 0 ? "direct" : i == 1 ? "recorded" : "replayed", bad, nl);
    }
    const char *graph_error = ts_unet_device_graph_error(d);
    tu_expect(d->graph_records - records == 1 && d->graph_launches - launches == 3,
              "%s: 1 recording and 3 launches (%ld, %ld; recording failed: %s)", what, d->graph_records - records,
              d->graph_launches - launches, graph_error ? graph_error : "no");
    /* A setting that changes the convs' algorithms (TF32) makes the
     * recording stale: the next forward runs directly, the one after is
     * recorded afresh (else the old algorithms would keep replaying). */
    const long records2 = d->graph_records, launches2 = d->graph_launches;
    ts_cuda_set_tf32(1);
    for (int i = 0; ok && i < 2; i++) tu_expect_ok(ts_unet_device_forward(d, gpu, &x[0], &l), "after a TF32 change");
    ts_cuda_set_tf32(0);
    tu_expect(d->graph_records - records2 == 1 && d->graph_launches - launches2 == 1,
              "%s: a TF32 change: the old recording is not replayed, a new one is made (%ld recordings, %ld launches)",
              what, d->graph_records - records2, d->graph_launches - launches2);
    ts_cuda_set_deterministic(0);
    for (int i = 0; i < 2; i++) {
        tu_tensor_free(&x[i], SUITE, "x");
        tu_tensor_free(&ref[i], SUITE, "ref");
    }
    tu_tensor_free(&l, SUITE, "l");
}

/* ts_unet_device_forward_start (predict's pipelined path): two batches
 * started before either is waited for, into page-locked buffers behind two
 * fences, the inputs uploaded asynchronously from page-locked buffers too
 * (cudaHostAlloc, cudaMemcpyAsync, events), direct, recorded and
 * replayed; after each wait the logits are the bits of the synchronous
 * forward (deterministic algorithms). The buffers start as NaN, so a copy
 * that has not landed shows. */
static void start_case(ts_unet *m, ts_ctx *gpu, ts_unet_device *d, const char *name)
{
    char what[128];
    snprintf(what, sizeof what, "%s, %s, forward_start", name, ts_dtype_name(ts_unet_device_precision(d)));
    const ts_backend_memory *M = gpu->backend->memory;
    const int n = 2, h = 41, w = 35, K = m->cfg.classes;
    tu_rng rng;
    tu_rng_seed(&rng, 78);
    ts_tensor x[2] = {tu_tensor(n, m->cfg.in_channels, h, w), tu_tensor(n, m->cfg.in_channels, h, w)};
    ts_tensor ref[2] = {tu_tensor(n, K, h, w), tu_tensor(n, K, h, w)};
    const size_t nl = ts_tensor_numel(&ref[0]);
    for (int i = 0; i < 2; i++) tu_fill(&rng, x[i].data, ts_tensor_numel(&x[i]), -1, 1);
    void *pin[2] = {NULL, NULL}, *fence[2] = {NULL, NULL}, *pin_x[2] = {NULL, NULL};
    ts_tensor xp[2];
    tu_expect(ts_backend_memory_async(M), "%s: the CUDA memory offers pinned buffers, async downloads, fences", what);
    ts_cuda_set_deterministic(1);
    int ok = ts_backend_memory_async(M) && tu_expect_ok(ts_unet_device_forward(d, gpu, &x[0], &ref[0]), "forward 1") &&
             tu_expect_ok(ts_unet_device_forward(d, gpu, &x[1], &ref[1]), "forward 2");
    for (int i = 0; ok && i < 2; i++)
        ok = tu_expect_ok(M->host_alloc(&pin[i], nl * sizeof(float)), "host_alloc") &&
             tu_expect_ok(M->fence_new(&fence[i]), "fence_new") &&
             tu_expect_ok(M->host_alloc(&pin_x[i], ts_tensor_numel(&x[i]) * sizeof(float)), "host_alloc");
    for (int i = 0; ok && i < 2; i++) {
        memcpy(pin_x[i], x[i].data, ts_tensor_numel(&x[i]) * sizeof(float));
        xp[i] = ts_tensor_view(pin_x[i], n, m->cfg.in_channels, h, w);
    }
    for (int round = 0; ok && round < 3; round++) {
        ts_tensor l[2];
        for (int i = 0; ok && i < 2; i++) {
            for (size_t j = 0; j < nl; j++) ((float *)pin[i])[j] = NAN;
            l[i] = ts_tensor_view(pin[i], n, K, h, w);
            ok = tu_expect_ok(ts_unet_device_forward_start(d, gpu, &xp[i], &l[i], fence[i]), what);
        }
        for (int i = 0; ok && i < 2; i++) {
            if (!(ok = tu_expect_ok(M->fence_wait(fence[i]), "fence_wait"))) break;
            size_t bad = 0;
            for (size_t j = 0; j < nl; j++) bad += memcmp(&l[i].data[j], &ref[i].data[j], sizeof(float)) != 0;
            tu_expect(bad == 0, "%s: round %d batch %d equals the synchronous forward bit for bit (%zu of %zu differ)",
                      what, round, i, bad, nl);
        }
    }
    ts_cuda_set_deterministic(0);
    for (int i = 0; i < 2; i++) {
        if (ts_backend_memory_async(M)) {
            M->host_free(pin[i]);
            M->host_free(pin_x[i]);
            M->fence_free(fence[i]);
        }
        tu_tensor_free(&x[i], SUITE, "x");
        tu_tensor_free(&ref[i], SUITE, "ref");
    }
}

static void run_case(ts_ctx *cpu, ts_ctx *gpu, const ts_unet_config *cfg, const char *name)
{
    ts_unet m;
    if (!tu_expect_ok(ts_unet_init(&m, cfg), "unet init")) return;
    ts_unet_init_random(&m, 21);
    tu_rng rng;
    tu_rng_seed(&rng, 22);
    for (int i = 0; i < m.n_params; i++) {
        const ts_param *p = &m.params[i];
        if (p->kind != TS_PARAM_BUFFER) continue;
        int var = strstr(p->name, "running_var") != NULL;
        float *v = ts_unet_param_f32(&m, p);
        for (size_t k = 0; k < p->numel; k++)
            v[k] = (float)(var ? tu_uniform(&rng, 0.5, 2) : tu_uniform(&rng, -.3, .3));
    }
    tu_expect_ok(ts_unet_fold_bn(&m), "fold_bn");
    ts_tensor x = tu_tensor(1, cfg->in_channels, 8, 8), l;
    tu_expect_error(ts_unet_forward_folded(&m, gpu, &x, &l), TS_ERR_INVALID_ARG, "host model on cuda", "cuda",
                    "ts_unet_device_init", NULL);
    tu_tensor_free(&x, SUITE, "x8");
    ts_unet_device d;
    if (tu_expect_ok(ts_unet_device_init(&d, &m, gpu->backend), name)) {
        compare(&m, cpu, gpu, &d, 2, 45, 37, name);
        compare(&m, cpu, gpu, &d, 1, 33, 65, name);
        compare(&m, cpu, gpu, &d, 2, 45, 37, name);
        graph_case(&m, gpu, &d, name);
        start_case(&m, gpu, &d, name);
        half_case(&m, cpu, gpu, &d, TS_BF16, name);
        graph_case(&m, gpu, &d, name);
        start_case(&m, gpu, &d, name);
        half_case(&m, cpu, gpu, &d, TS_F16, name);
        /* The plan and the half weights are dropped: float32 bits again. */
        if (tu_expect_ok(ts_unet_device_set_precision(&d, gpu, TS_F32), "set_precision f32"))
            compare(&m, cpu, gpu, &d, 1, 33, 65, "back to f32");
    }
    ts_unet_device_free(&d);
    ts_unet_free(&m);
}

int main(void)
{
    char name[64];
    tu_gpu_device_name(name, sizeof name);
    ts_ctx cpu, gpu;
    tu_init(&cpu);
    cpu.backend = ts_backend_cpu();
    const ts_backend *b = NULL;
    if (!tu_gpu_backend(name, &b)) return tu_finish(SUITE);
    ts_cuda_set_tf32(0);
    ts_ctx_init(&gpu, b);
    static const int d5[5] = {32, 16, 16, 8, 8}, d3[3] = {16, 16, 8};
    ts_unet_config bn = tu_unet_config(3, 4, 5, d5, 1), nobn = tu_unet_config(4, 1, 3, d3, 0);
    run_case(&cpu, &gpu, &bn, "depth 5, decoder BN");
    run_case(&cpu, &gpu, &nobn, "depth 3, no decoder BN, 1 class");
    ts_ctx_free(&gpu);
    ts_ctx_free(&cpu);
    return tu_finish(SUITE);
}
