/* The U-Net's device copy (ts_unet_device) on the CUDA backend against the
 * host model's folded forward on the CPU: two configurations (decoder BN on,
 * 5 levels; off, 3 levels, one class), odd sizes, batch 2, then a second
 * shape on the same copy (replanning in device memory). Logits agree within
 * 1e-4 of the largest |logit| (fp32 cuDNN convolutions against OpenBLAS;
 * TF32 off), and the host model refuses the CUDA table.
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

static ts_unet_config make_cfg(int in, int k, int depth, const int *dec, int use_bn)
{
    ts_unet_config c = ts_unet_default_config(in, k);
    c.encoder_depth = depth;
    for (int i = 0; i < TS_UNET_MAX_DEPTH; i++) c.decoder_channels[i] = i < depth ? dec[i] : 0;
    c.decoder_use_batchnorm = use_bn;
    return c;
}

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
    }
    ts_unet_device_free(&d);
    ts_unet_free(&m);
}

int main(void)
{
    const char *env = getenv("TERRASEG_TEST_DEVICE");
    char name[64] = "cuda";
    if (env && *env) snprintf(name, sizeof name, "%s%s", env[0] >= '0' && env[0] <= '9' ? "cuda:" : "", env);
    ts_ctx cpu, gpu;
    tu_init(&cpu);
    cpu.backend = ts_backend_cpu();
    const ts_backend *b = NULL;
    if (strncmp(name, "cuda", 4) != 0 || ts_backend_get(name, &b) != TS_OK || !b) {
        tu_expect(0, "ts_backend_get(\"%s\"): %s (the GPU suite needs a visible CUDA device)", name, ts_last_error());
        return tu_finish(SUITE);
    }
    ts_cuda_set_tf32(0);
    ts_ctx_init(&gpu, b);
    static const int d5[5] = {32, 16, 16, 8, 8}, d3[3] = {16, 16, 8};
    ts_unet_config bn = make_cfg(3, 4, 5, d5, 1), nobn = make_cfg(4, 1, 3, d3, 0);
    run_case(&cpu, &gpu, &bn, "depth 5, decoder BN");
    run_case(&cpu, &gpu, &nobn, "depth 3, no decoder BN, 1 class");
    ts_ctx_free(&gpu);
    ts_ctx_free(&cpu);
    return tu_finish(SUITE);
}
