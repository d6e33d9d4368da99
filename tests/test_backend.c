/* The backend table, and every op working together through it.
 *
 * The per-op tests check each kernel against a double reference and finite
 * differences. This one checks the glue: that the CPU table is complete,
 * that a missing op is reported by name, and that a small network built from
 * the table's ops (conv, BN, ReLU, max-pool, upsample, concat, add, CE +
 * Dice) gets the right parameter gradients when its backward pass relies on
 * the accumulate-into-gradients convention, where one tensor feeds two
 * consumers. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kernels/backend.h"
#include "tests/testutil.h"

static void test_table(void)
{
    const ts_backend *cpu = ts_backend_cpu();
    tu_expect_ok(ts_backend_check(cpu), "ts_backend_check(cpu)");
    const ts_backend *b = NULL;
    tu_expect_ok(ts_backend_get("cpu", &b), "ts_backend_get(cpu)");
    tu_expect(b == cpu, "backend: get(\"cpu\") is the CPU table");
    tu_expect_error(ts_backend_get("tpu", &b), TS_ERR_INVALID_ARG, "ts_backend_get(tpu)", "tpu", "cpu, cuda or cuda:N",
                    (char *)NULL);
    tu_expect_error(ts_backend_get("cuda:x", &b), TS_ERR_INVALID_ARG, "ts_backend_get(cuda:x)", "cuda:x", "cuda:N",
                    (char *)NULL);
    /* CUDA is either a complete table (a CUDA build on a machine with a GPU)
     * or an error that tells the user to use the CPU: never a silent CPU run. */
    ts_status st = ts_backend_get("cuda", &b);
    if (st == TS_OK) {
        tu_expect(b != NULL && b != cpu, "backend: get(\"cuda\") is its own table");
        if (b) tu_expect_ok(ts_backend_check(b), "ts_backend_check(cuda)");
    } else {
        tu_expect_error(st, TS_ERR_UNSUPPORTED, "ts_backend_get(cuda)", "--device cpu", (char *)NULL);
        tu_expect(b == NULL, "backend: no table handed out for cuda");
    }

    ts_backend partial = *cpu;
    partial.name = "partial";
    partial.maxpool2d_backward = NULL;
    partial.adamw_update = NULL;
    tu_expect_error(ts_backend_check(&partial), TS_ERR_UNSUPPORTED, "ts_backend_check(partial)", "partial",
                    "maxpool2d_backward", "adamw_update", "2 op", (char *)NULL);
}

/* ---- a small network through the table ---- */
enum { N = 2, CIN = 3, H = 9, W = 11, C1 = 4, K = 5 };

typedef struct net {
    ts_ctx *ctx;
    const ts_backend *be;
    /* parameters */
    ts_tensor w1;      /* [C1, CIN, 3, 3], stride 2 */
    float g1[C1], b1[C1];
    ts_tensor w2;      /* [K, 2 C1, 3, 3], stride 1, with bias */
    float bias2[K];
    ts_tensor w3;      /* [K, CIN, 1, 1]: the shortcut from the input */
    /* activations */
    ts_tensor x, y1, y2, y3, y4, y5, y6, z, logits;
    float mean1[C1], invstd1[C1];
    int32_t *pool_idx;
    int32_t target[N * H * W];
} net;

#define CONV_P(s, p) {.stride_h = (s), .stride_w = (s), .pad_h = (p), .pad_w = (p)}
static const ts_conv2d_params conv_s2 = CONV_P(2, 1), conv_s1 = CONV_P(1, 1), conv_1x1 = CONV_P(1, 0);
static const ts_pool2d_params pool = {3, 3, 2, 2, 1, 1};
static const ts_bn_params bn = {1e-5f, 0.1f};
static const ts_ce_params ce = {.ignore_index = 255, .class_weights = NULL};
static const ts_dice_params dice = {.mode = TS_DICE_SMP, .ignore_index = 255, .smooth = 0, .eps = 1e-7f};

static ts_status forward(net *m, double *loss)
{
    const ts_backend *be = m->be;
    ts_status st;
    double ce_loss, dice_loss;
    if ((st = be->conv2d_forward(m->ctx, &m->y1, &m->x, &m->w1, NULL, &conv_s2))) return st;
    if ((st = be->batchnorm_forward_train(m->ctx, &m->y2, m->mean1, m->invstd1, &m->y1, m->g1, m->b1, NULL, NULL,
                                          &bn)))
        return st;
    if ((st = be->relu_forward(m->ctx, &m->y2, &m->y2))) return st; /* in place */
    if ((st = be->maxpool2d_forward(m->ctx, &m->y3, m->pool_idx, &m->y2, &pool))) return st;
    if ((st = be->upsample_nearest_forward(m->ctx, &m->y4, &m->y3))) return st;
    if ((st = be->concat_forward(m->ctx, &m->y5, &m->y4, &m->y2))) return st; /* y2 has two consumers */
    if ((st = be->conv2d_forward(m->ctx, &m->y6, &m->y5, &m->w2, m->bias2, &conv_s1))) return st;
    if ((st = be->upsample_nearest_forward(m->ctx, &m->logits, &m->y6))) return st;
    if ((st = be->conv2d_forward(m->ctx, &m->z, &m->x, &m->w3, NULL, &conv_1x1))) return st;
    if ((st = be->add_forward(m->ctx, &m->logits, &m->logits, &m->z))) return st;
    if ((st = be->cross_entropy_forward(m->ctx, &ce_loss, &m->logits, m->target, &ce))) return st;
    if ((st = be->dice_forward(m->ctx, &dice_loss, &m->logits, m->target, &dice))) return st;
    *loss = ce_loss + dice_loss;
    return TS_OK;
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    test_table();

    tu_rng r;
    tu_rng_seed(&r, 7);
    net m = {.ctx = &ctx, .be = ts_backend_cpu()};
    int h1 = ts_conv_out_size(H, 3, 2, 1), w1 = ts_conv_out_size(W, 3, 2, 1);
    int h3 = ts_conv_out_size(h1, 3, 2, 1), w3 = ts_conv_out_size(w1, 3, 2, 1);
    m.w1 = tu_tensor(C1, CIN, 3, 3);
    m.w2 = tu_tensor(K, 2 * C1, 3, 3);
    m.w3 = tu_tensor(K, CIN, 1, 1);
    m.x = tu_tensor(N, CIN, H, W);
    m.y1 = tu_tensor(N, C1, h1, w1);
    m.y2 = tu_tensor(N, C1, h1, w1);
    m.y3 = tu_tensor(N, C1, h3, w3);
    m.y4 = tu_tensor(N, C1, h1, w1);
    m.y5 = tu_tensor(N, 2 * C1, h1, w1);
    m.y6 = tu_tensor(N, K, h1, w1);
    m.z = tu_tensor(N, K, H, W);
    m.logits = tu_tensor(N, K, H, W);
    m.pool_idx = tu_alloc_i32(ts_tensor_numel(&m.y3));
    tu_fill(&r, m.w1.data, ts_tensor_numel(&m.w1), -0.5, 0.5);
    tu_fill(&r, m.w2.data, ts_tensor_numel(&m.w2), -0.3, 0.3);
    tu_fill(&r, m.w3.data, ts_tensor_numel(&m.w3), -0.5, 0.5);
    tu_fill(&r, m.x.data, ts_tensor_numel(&m.x), -1, 1);
    tu_fill(&r, m.g1, C1, 0.5, 1.5);
    tu_fill(&r, m.b1, C1, -0.2, 0.2);
    tu_fill(&r, m.bias2, K, -0.2, 0.2);
    for (int i = 0; i < N * H * W; i++) m.target[i] = tu_randint(&r, 9) == 0 ? 255 : tu_randint(&r, K - 1);

    double loss;
    tu_expect_ok(forward(&m, &loss), "network forward");
    tu_expect(isfinite(loss) && loss > 0, "network: finite positive loss %g", loss);

    /* Backward through the table, mirroring forward in reverse. Every
     * gradient buffer starts at zero and collects contributions. */
    const ts_backend *be = m.be;
    ts_tensor dlogits = tu_tensor(N, K, H, W), dz = tu_tensor(N, K, H, W), dy6 = tu_tensor(N, K, h1, w1);
    ts_tensor dy5 = tu_tensor(N, 2 * C1, h1, w1), dy4 = tu_tensor(N, C1, h1, w1), dy3 = tu_tensor(N, C1, h3, w3);
    ts_tensor dy2 = tu_tensor(N, C1, h1, w1), dy1 = tu_tensor(N, C1, h1, w1), dx = tu_tensor(N, CIN, H, W);
    ts_tensor dw1 = tu_tensor(C1, CIN, 3, 3), dw2 = tu_tensor(K, 2 * C1, 3, 3), dw3 = tu_tensor(K, CIN, 1, 1);
    float dg1[C1] = {0}, db1[C1] = {0}, dbias2[K] = {0};
    ts_tensor dlog_ce = tu_tensor(N, K, H, W);
    int ok = 1;
    ok &= tu_expect_ok(be->cross_entropy_backward(&ctx, &dlogits, &m.logits, m.target, &ce, 1.0f), "ce backward");
    ok &= tu_expect_ok(be->dice_backward(&ctx, &dlogits, &m.logits, m.target, &dice, 1.0f), "dice backward");
    ok &= tu_expect_ok(be->add_backward(&ctx, &dlog_ce, &dz, &dlogits), "add backward");
    ok &= tu_expect_ok(be->conv2d_backward_filter(&ctx, &dw3, &dz, &m.x, &conv_1x1), "conv 1x1 backward filter");
    ok &= tu_expect_ok(be->conv2d_backward_data(&ctx, &dx, &dz, &m.w3, &conv_1x1), "conv 1x1 backward data");
    ok &= tu_expect_ok(be->upsample_nearest_backward(&ctx, &dy6, &dlog_ce), "upsample backward");
    ok &= tu_expect_ok(be->conv2d_backward_bias(&ctx, dbias2, &dy6), "conv backward bias");
    ok &= tu_expect_ok(be->conv2d_backward_filter(&ctx, &dw2, &dy6, &m.y5, &conv_s1), "conv2 backward filter");
    ok &= tu_expect_ok(be->conv2d_backward_data(&ctx, &dy5, &dy6, &m.w2, &conv_s1), "conv2 backward data");
    ok &= tu_expect_ok(be->concat_backward(&ctx, &dy4, &dy2, &dy5), "concat backward");
    ok &= tu_expect_ok(be->upsample_nearest_backward(&ctx, &dy3, &dy4), "upsample backward 2");
    ok &= tu_expect_ok(be->maxpool2d_backward(&ctx, &dy2, &dy3, m.pool_idx, &pool), "maxpool backward");
    ok &= tu_expect_ok(be->relu_backward(&ctx, &dy1, &dy2, &m.y2), "relu backward");
    /* relu wrote into dy1; BN's input gradient goes to a fresh buffer. */
    ts_tensor dbn_in = tu_tensor(N, C1, h1, w1);
    ok &= tu_expect_ok(be->batchnorm_backward(&ctx, &dbn_in, dg1, db1, &dy1, &m.y1, m.g1, m.mean1, m.invstd1),
                       "bn backward");
    ok &= tu_expect_ok(be->conv2d_backward_filter(&ctx, &dw1, &dbn_in, &m.x, &conv_s2), "conv1 backward filter");

    /* Central differences of the float network in float: loose tolerance,
     * parameters picked at random; the exact per-op checks live elsewhere. */
    struct {
        const char *name;
        float *p;
        const float *g;
        int count;
    } params[] = {
        {"w1", m.w1.data, dw1.data, (int)ts_tensor_numel(&m.w1)}, {"gamma1", m.g1, dg1, C1},
        {"beta1", m.b1, db1, C1},                                   {"w2", m.w2.data, dw2.data, (int)ts_tensor_numel(&m.w2)},
        {"bias2", m.bias2, dbias2, K},                              {"w3", m.w3.data, dw3.data, (int)ts_tensor_numel(&m.w3)},
    };
    const float hstep = 1e-2f;
    for (size_t pi = 0; ok && pi < sizeof params / sizeof params[0]; pi++) {
        for (int t = 0; t < 4; t++) {
            int i = tu_randint(&r, params[pi].count);
            float saved = params[pi].p[i];
            double lp, lm;
            params[pi].p[i] = saved + hstep;
            forward(&m, &lp);
            params[pi].p[i] = saved - hstep;
            forward(&m, &lm);
            params[pi].p[i] = saved;
            double fd = (lp - lm) / (2.0 * hstep);
            double got = params[pi].g[i];
            tu_expect(fabs(got - fd) <= 2e-3 + 5e-2 * fabs(fd), "network gradient %s[%d]: backward %.6g, finite difference %.6g",
                      params[pi].name, i, got, fd);
        }
    }
    forward(&m, &loss); /* restore activations */

    /* One AdamW step through the table moves every parameter against its gradient. */
    ts_adamw_hparams hp = {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0};
    ts_adamw_step step;
    tu_expect_ok(ts_adamw_prepare(&step, &hp, 1), "adamw prepare");
    size_t nw2 = ts_tensor_numel(&m.w2);
    float *mom = tu_alloc_f(nw2), *var = tu_alloc_f(nw2), *before = tu_alloc_f(nw2);
    memcpy(before, m.w2.data, nw2 * sizeof(float));
    tu_expect_ok(be->adamw_update(&ctx, m.w2.data, dw2.data, mom, var, nw2, &step), "adamw update");
    int moved = 1;
    for (size_t i = 0; i < nw2; i++)
        if (dw2.data[i] != 0) moved &= (m.w2.data[i] - before[i]) * dw2.data[i] < 0;
    tu_expect(moved, "adamw: every w2 entry with a gradient moved against it");
    tu_expect_ok(be->zero(&ctx, dw2.data, nw2), "zero");
    int zero = 1;
    for (size_t i = 0; i < nw2; i++) zero &= dw2.data[i] == 0;
    tu_expect(zero, "zero: gradient cleared");

    tu_free(mom, "adamw", "exp_avg");
    tu_free(var, "adamw", "exp_avg_sq");
    tu_free(before, "adamw", "copy");
    ts_tensor *all[] = {&m.w1, &m.w2, &m.w3, &m.x, &m.y1, &m.y2, &m.y3, &m.y4, &m.y5, &m.y6, &m.z, &m.logits,
                        &dlogits, &dz, &dy6, &dy5, &dy4, &dy3, &dy2, &dy1, &dx, &dw1, &dw2, &dw3, &dlog_ce, &dbn_in};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) tu_tensor_free(all[i], "network", "tensor");
    tu_free(m.pool_idx, "maxpool", "index");
    ts_ctx_free(&ctx);
    return tu_finish("test_backend");
}
