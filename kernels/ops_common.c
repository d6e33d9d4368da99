/* Backend-independent helpers of backend.h: the op context, output sizes and
 * the host half of AdamW. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

ts_status ts_ctx_init(ts_ctx *ctx, const ts_backend *backend)
{
    memset(ctx, 0, sizeof *ctx);
    ctx->backend = backend;
    return TS_OK;
}

void ts_ctx_free(ts_ctx *ctx)
{
    ts_aligned_free(ctx->scratch);
    memset(ctx, 0, sizeof *ctx);
}

ts_status ts_ctx_scratch(ts_ctx *ctx, size_t bytes, void **out)
{
    if (bytes > ctx->scratch_bytes) {
        /* Grow only: the conv column buffer is bounded, so this settles after
         * the largest layer's first call. */
        void *p = ts_aligned_alloc(bytes);
        if (!p) return ts_error(TS_ERR_NOMEM, "scratch: out of memory allocating %.1f MiB", (double)bytes / (1 << 20));
        ts_aligned_free(ctx->scratch);
        ctx->scratch = p;
        ctx->scratch_bytes = bytes;
    }
    *out = ctx->scratch;
    return TS_OK;
}

int ts_conv_out_size(int in, int kernel, int stride, int pad)
{
    if (stride < 1 || in + 2 * pad < kernel) return 0;
    return (in + 2 * pad - kernel) / stride + 1;
}

ts_status ts_adamw_prepare(ts_adamw_step *s, const ts_adamw_hparams *h, long t)
{
    if (t < 1) return ts_error(TS_ERR_INVALID_ARG, "adamw: step number must be >= 1, got %ld", t);
    if (!(h->lr >= 0) || !(h->eps >= 0) || !(h->weight_decay >= 0))
        return ts_error(TS_ERR_INVALID_ARG, "adamw: lr (%g), eps (%g) and weight_decay (%g) must be >= 0", h->lr,
                        h->eps, h->weight_decay);
    if (!(h->beta1 >= 0 && h->beta1 < 1) || !(h->beta2 >= 0 && h->beta2 < 1))
        return ts_error(TS_ERR_INVALID_ARG, "adamw: betas must be in [0, 1), got (%g, %g)", h->beta1, h->beta2);
    /* torch/optim/adam.py, single-tensor path: these are Python floats
     * (double); the kernels then apply them in float32. */
    double bc1 = 1.0 - pow(h->beta1, (double)t);
    double bc2 = 1.0 - pow(h->beta2, (double)t);
    s->decay = (float)(1.0 - h->lr * h->weight_decay);
    s->beta1_weight = (float)(1.0 - h->beta1);
    s->beta2 = (float)h->beta2;
    s->one_minus_beta2 = (float)(1.0 - h->beta2);
    s->bc2_sqrt = (float)sqrt(bc2);
    s->eps = (float)h->eps;
    s->neg_step_size = (float)(-(h->lr / bc1));
    return TS_OK;
}
