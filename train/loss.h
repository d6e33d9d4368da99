/* The training loss: (1 - w) * CE + w * Dice on logits [N, C, H, W] and
 * int32 labels [N, H, W] (shared/specs/smp-unet.md section 6).
 *
 *   CE    torch.nn.CrossEntropyLoss(weight=class_weights,
 *         ignore_index=ignore_index), reduction "mean": divided by the number
 *         of valid pixels, or by the sum of their class weights.
 *   Dice  TS_DICE_PER_IMAGE (the default): the urban-mapping tutorial's
 *         per-image dice, 1 - mean over (b, c) of (2 S(p t) + eps) /
 *         (S(p) + S(t) + eps) with eps 1e-7, sums over one image's pixels,
 *         ignored pixels zeroed in both p and t (as tests/
 *         make_smp_fixtures.py's dice_tutorial writes it in torch);
 *         TS_DICE_SMP: smp.losses.DiceLoss("multiclass", from_logits=True,
 *         ignore_index, smooth, eps, log_loss), with SMP main's
 *         class_weights. Both are the backend's dice ops (ts_dice_params).
 *   w     dice_weight in [0, 1]; 0.5 by default, so 0.5 CE + 0.5 Dice. At
 *         w = 0 the Dice is not computed and at w = 1 the CE is not (their
 *         part is reported as 0).
 *
 * PyTorch equivalent: loss = (1 - w) * ce(logits, y) + w * dice(logits, y).
 * The parts are computed in double by the backend's loss ops, so they match
 * PyTorch's float32 values to about 1e-7 relative, not bit for bit. One
 * difference: a batch whose every pixel is ignored has CE 0 here (the
 * backend's convention) where PyTorch's mean is 0/0 = NaN.
 *
 * Every computation goes through ctx->backend. */
#ifndef TS_TRAIN_LOSS_H
#define TS_TRAIN_LOSS_H

#include <stdint.h>

#include "kernels/backend.h"

typedef struct ts_loss_config {
    double dice_weight;  /* w; 0.5 by default; 0 = CE only, 1 = Dice only */
    ts_ce_params ce;     /* ignore_index (255), class_weights ([classes] or NULL) */
    ts_dice_params dice; /* mode (TS_DICE_PER_IMAGE), ignore_index (255), smooth (0),
                            eps (1e-7), log_loss (0), class_weights (SMP only, NULL) */
} ts_loss_config;

/* dice_weight 0.5; CE with ignore_index 255 and no class weights; the
 * per-image Dice with ignore_index 255, eps 1e-7. (train/config.c's
 * ts_train_config_loss fills the two parameter structs from a config.) */
ts_loss_config ts_loss_default_config(void);

typedef struct ts_loss {
    ts_loss_config cfg;   /* the class weight pointers point at the copies below */
    int classes;
    float *ce_weights;    /* owned copies, or NULL */
    float *dice_weights;
} ts_loss;

/* The parts of one evaluation. total = (1 - w) ce + w dice, in double. */
typedef struct ts_loss_value {
    double total, ce, dice;
} ts_loss_value;

/* Checks the config (w in [0, 1], a known Dice mode, smooth and eps >= 0,
 * class weights finite, >= 0 and not all 0, classes >= 1) and copies the
 * class weights, so the caller's arrays may go away. */
ts_status ts_loss_init(ts_loss *l, const ts_loss_config *cfg, int classes);
void ts_loss_free(ts_loss *l);

/* The loss of logits [N, classes, H, W] against target [N, H, W]. A NaN or
 * infinite result is TS_ERR_INVALID_ARG with a message that gives the value
 * and both parts, e.g. "loss is nan (ce nan, dice 0.41)"; the caller adds
 * the step. out is filled either way. */
ts_status ts_loss_forward(const ts_loss *l, ts_ctx *ctx, const ts_tensor *logits, const int32_t *target,
                          ts_loss_value *out);

/* dlogits += dloss (1 - w) dCE/dlogits + dloss w dDice/dlogits (the backend's
 * loss backward ops accumulate; zero dlogits first for a fresh gradient).
 * Gradient accumulation over k micro-batches passes dloss = 1/k, as PyTorch
 * users write (loss / k).backward() (train/optim.h). */
ts_status ts_loss_backward(const ts_loss *l, ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits,
                           const int32_t *target, float dloss);

#endif
