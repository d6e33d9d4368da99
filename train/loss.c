/* The training loss (train/loss.h): (1 - w) CE + w Dice through the
 * backend's loss ops. */
#include "loss.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

ts_loss_config ts_loss_default_config(void)
{
    ts_loss_config c;
    memset(&c, 0, sizeof c);
    c.dice_weight = 0.5;
    c.ce.ignore_index = 255;
    c.ce.class_weights = NULL;
    c.dice.mode = TS_DICE_PER_IMAGE;
    c.dice.ignore_index = 255;
    c.dice.smooth = 0.0f;
    c.dice.eps = 1e-7f;
    c.dice.log_loss = 0;
    c.dice.class_weights = NULL;
    return c;
}

/* A checked copy of `classes` weights (NULL stays NULL). */
static ts_status copy_weights(const char *which, const float *w, int classes, float **out)
{
    *out = NULL;
    if (!w) return TS_OK;
    double sum = 0;
    for (int c = 0; c < classes; c++) {
        if (!isfinite(w[c]) || w[c] < 0)
            return ts_error(TS_ERR_INVALID_ARG, "loss: %s class weight %d is %g; class weights must be finite and >= 0",
                            which, c, (double)w[c]);
        sum += w[c];
    }
    if (sum == 0)
        return ts_error(TS_ERR_INVALID_ARG, "loss: all %d %s class weights are 0, so the weighted mean is undefined",
                        classes, which);
    *out = malloc((size_t)classes * sizeof(float));
    if (!*out) return ts_error(TS_ERR_NOMEM, "loss: no memory for %d class weights", classes);
    memcpy(*out, w, (size_t)classes * sizeof(float));
    return TS_OK;
}

ts_status ts_loss_init(ts_loss *l, const ts_loss_config *cfg, int classes)
{
    if (!l || !cfg) return ts_error(TS_ERR_INVALID_ARG, "loss: NULL loss or config");
    memset(l, 0, sizeof *l);
    if (classes < 1) return ts_error(TS_ERR_INVALID_ARG, "loss: classes must be >= 1, got %d", classes);
    if (!(cfg->dice_weight >= 0 && cfg->dice_weight <= 1))
        return ts_error(TS_ERR_INVALID_ARG, "loss: dice_weight must be in [0, 1] (loss = (1 - w) CE + w Dice), got %g",
                        cfg->dice_weight);
    const ts_dice_params *d = &cfg->dice;
    if (d->mode != TS_DICE_PER_IMAGE && d->mode != TS_DICE_SMP)
        return ts_error(TS_ERR_INVALID_ARG, "loss: unknown dice mode %d (per-image or smp)", (int)d->mode);
    if (!(d->smooth >= 0) || !isfinite(d->smooth) || !(d->eps >= 0) || !isfinite(d->eps))
        return ts_error(TS_ERR_INVALID_ARG, "loss: dice smooth (%g) and eps (%g) must be finite and >= 0",
                        (double)d->smooth, (double)d->eps);
    if (d->log_loss != 0 && d->log_loss != 1)
        return ts_error(TS_ERR_INVALID_ARG, "loss: dice log_loss must be 0 or 1, got %d", d->log_loss);
    ts_status st = copy_weights("CE", cfg->ce.class_weights, classes, &l->ce_weights);
    if (!st) st = copy_weights("Dice", d->class_weights, classes, &l->dice_weights);
    if (st) {
        ts_loss_free(l);
        return st;
    }
    l->cfg = *cfg;
    l->cfg.ce.class_weights = l->ce_weights;
    l->cfg.dice.class_weights = l->dice_weights;
    l->classes = classes;
    return TS_OK;
}

void ts_loss_free(ts_loss *l)
{
    if (!l) return;
    free(l->ce_weights);
    free(l->dice_weights);
    memset(l, 0, sizeof *l);
}

static ts_status check_call(const char *op, const ts_loss *l, const ts_ctx *ctx, const ts_tensor *logits)
{
    if (!l || !ctx || !logits) return ts_error(TS_ERR_INVALID_ARG, "%s: NULL loss, context or logits", op);
    if (l->classes < 1) return ts_error(TS_ERR_INVALID_ARG, "%s: the loss is not initialised (ts_loss_init)", op);
    if (!ctx->backend) return ts_error(TS_ERR_INVALID_ARG, "%s: the context has no backend", op);
    if (logits->c != l->classes)
        return ts_error(TS_ERR_INVALID_ARG, "%s: logits have %d channels but the loss was set up for %d classes", op,
                        logits->c, l->classes);
    return TS_OK;
}

ts_status ts_loss_forward(const ts_loss *l, ts_ctx *ctx, const ts_tensor *logits, const int32_t *target,
                          ts_loss_value *out)
{
    ts_status st = check_call("loss", l, ctx, logits);
    if (st) return st;
    if (!out) return ts_error(TS_ERR_INVALID_ARG, "loss: NULL output");
    const ts_backend *B = ctx->backend;
    const double w = l->cfg.dice_weight;
    out->total = out->ce = out->dice = 0;
    if (w < 1 && (st = B->cross_entropy_forward(ctx, &out->ce, logits, target, &l->cfg.ce))) return st;
    if (w > 0 && (st = B->dice_forward(ctx, &out->dice, logits, target, &l->cfg.dice))) return st;
    /* A part with weight 0 is not computed, so it cannot make the total NaN
     * (PyTorch's 0 * nan would). */
    out->total = (w < 1 ? (1 - w) * out->ce : 0) + (w > 0 ? w * out->dice : 0);
    if (!isfinite(out->total))
        return ts_error(TS_ERR_INVALID_ARG,
                        "loss is %g (ce %g, dice %g, dice weight %g): the model or the data produced a non-finite "
                        "value; lower the learning rate, enable gradient clipping, or check the inputs for NaN",
                        out->total, out->ce, out->dice, w);
    return TS_OK;
}

ts_status ts_loss_backward(const ts_loss *l, ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits,
                           const int32_t *target, float dloss)
{
    ts_status st = check_call("loss backward", l, ctx, logits);
    if (st) return st;
    if (!isfinite(dloss)) return ts_error(TS_ERR_INVALID_ARG, "loss backward: dloss is %g", (double)dloss);
    const ts_backend *B = ctx->backend;
    const double w = l->cfg.dice_weight;
    /* PyTorch: the gradient reaching ce is float(1 - w) * dloss, in float32. */
    if (w < 1 && (st = B->cross_entropy_backward(ctx, dlogits, logits, target, &l->cfg.ce, (float)(1 - w) * dloss)))
        return st;
    if (w > 0 && (st = B->dice_backward(ctx, dlogits, logits, target, &l->cfg.dice, (float)w * dloss))) return st;
    return TS_OK;
}
