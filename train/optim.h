/* AdamW over the model's parameter table, with PyTorch's semantics
 * (torch.optim.AdamW, single-tensor path, the CPU default: shared/specs/
 * smp-unet.md 7.1), optional gradient clipping exactly as
 * torch.nn.utils.clip_grad_norm_, and the state hooks for checkpoints.
 *
 * The PyTorch loop this reproduces, per optimizer step:
 *
 *     opt.zero_grad()
 *     for each of the k micro-batches:             # accum_steps = k
 *         loss = criterion(model(x), y) / k        # ts_optim_loss_scale
 *         loss.backward()
 *     clip_grad_norm_(model.parameters(), max_norm) # if clip_grad_norm > 0
 *     opt.step()                                   # ts_optim_step
 *     scheduler.step()                             # train/schedule.h
 *
 * with opt = AdamW([{"params": decay, "weight_decay": wd},
 *                   {"params": no_decay, "weight_decay": 0.0}],
 *                  lr, betas=(beta1, beta2), eps) when no_decay_1d is set
 * (no_decay = every 1-D parameter: BN weights and biases and conv biases;
 * decay = every conv weight), or AdamW(model.parameters(), ...) otherwise.
 *
 * Semantics matched:
 *  - Parameters with used = 0 (the encoder stages a shallow depth never runs)
 *    have grad None in PyTorch: no decay, no moment update, no step count,
 *    and clip_grad_norm_ leaves them out of the norm. Their weights stay
 *    bit-identical.
 *  - One step counter for all used parameters, PyTorch's per-parameter
 *    state["step"] (they all step together). The first ts_optim_step is t = 1.
 *  - exp_avg and exp_avg_sq are two contiguous blocks in m->weights' layout;
 *    entries of unused parameters stay 0 (PyTorch has no state for them).
 *  - The per-step scalars come from ts_adamw_prepare() in double and the
 *    element update is the backend's adamw_update (PyTorch's float32
 *    operation order: decay, lerp, mul + addcmul, sqrt / bc2_sqrt + eps,
 *    addcdiv).
 *  - Gradient accumulation: the optimizer does not divide anything. The
 *    trainer runs backward k times without zeroing, each with the loss scaled
 *    by 1/k (pass ts_optim_loss_scale() as dloss to ts_loss_backward), which
 *    is the usual PyTorch idiom (loss / k).backward(); then one
 *    ts_optim_step. BatchNorm running statistics update once per micro-batch,
 *    as in PyTorch.
 *  - clip_grad_norm_(params, max_norm, norm_type=2): per-tensor 2-norms,
 *    then the 2-norm of those norms; clip_coef = max_norm / (total + 1e-6),
 *    clamped to 1, grads multiplied by it, in float32 as PyTorch:
 *    coef = (1 / (total + 1e-6f)) * (float)max_norm (Tensor.__rtruediv__ is
 *    reciprocal() * other). The norms differ in rounding only: PyTorch sums
 *    squares in float32 SIMD lanes; here each tensor's sum of squares is
 *    formed in double by the backend, its norm rounded to float32 (as
 *    PyTorch stores it), and the norm of norms formed in double and rounded
 *    to float32. Relative differences are ~1e-7.
 *  - Not matched on purpose: a non-finite total norm is an error naming the
 *    value (PyTorch's default error_if_nonfinite=False would scale every
 *    gradient by NaN and poison the weights); nothing is modified then.
 *
 * Every computation on parameters, gradients and state goes through
 * ctx->backend. */
#ifndef TS_TRAIN_OPTIM_H
#define TS_TRAIN_OPTIM_H

#include <stddef.h>

#include "kernels/backend.h"
#include "nn/unet.h"
#include "weights/dict.h"

typedef struct ts_optim_config {
    double lr;             /* base lr (the schedule's base) */
    double beta1, beta2;   /* (0.9, 0.999) */
    double eps;            /* 1e-8 */
    double weight_decay;   /* 1e-2, PyTorch's AdamW default */
    int no_decay_1d;       /* 1: 1-D parameters (BN weight/bias, biases) get weight_decay 0 */
    double clip_grad_norm; /* > 0: clip_grad_norm_(max_norm) before each step; 0: off */
    int accum_steps;       /* k >= 1 micro-batches per optimizer step */
    /* 1: dynamic loss scaling for fp16 training, torch.amp.GradScaler with
     * its defaults (init_scale 2^16, growth_factor 2, backoff_factor 0.5,
     * growth_interval 2000): dloss is multiplied by the scale; a step whose
     * gradients hold an inf or NaN is skipped and halves the scale; 2000
     * good steps in a row double it; a good step unscales the gradients
     * (float32 multiply by 1/scale, exact for these powers of two) before
     * clipping and AdamW, as scaler.unscale_ + scaler.step + scaler.update. */
    int loss_scaling;
} ts_optim_config;

#define TS_LOSS_SCALE_INIT 65536.0
#define TS_LOSS_SCALE_GROWTH_INTERVAL 2000

/* torch.optim.AdamW's defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8,
 * weight_decay 1e-2), every parameter decayed, no clipping, k = 1. */
ts_optim_config ts_optim_default_config(void);
ts_status ts_optim_config_check(const ts_optim_config *cfg);

typedef struct ts_optim {
    ts_optim_config cfg;
    float *exp_avg;    /* n floats, m->weights' layout */
    float *exp_avg_sq; /* n floats, m->weights' layout */
    size_t n;          /* = m->n_weights */
    long step;         /* state["step"] of every used parameter: optimizer steps taken */
    const ts_backend_memory *mem; /* where the state lives: NULL for host memory */
    /* cfg.loss_scaling: GradScaler's state (scale is float32 there too, a
     * power of two) and what the last step did. */
    double loss_scale;      /* 1 without loss scaling */
    long growth_tracker;    /* good steps since the scale last changed */
    long skipped_steps;     /* steps skipped for non-finite gradients (this run) */
    int last_skipped;       /* the last ts_optim_step_on skipped its update */
} ts_optim;

/* Allocates zeroed state for model m (step 0) in host memory. */
ts_status ts_optim_init(ts_optim *o, const ts_optim_config *cfg, const ts_unet *m);
/* The same with the state in backend b's memory, next to a training copy's
 * weights (ts_unet_device_init_train): every step then runs on b without a
 * copy. b NULL or a host backend gives host state. */
ts_status ts_optim_init_on(ts_optim *o, const ts_optim_config *cfg, const ts_unet *m, const ts_backend *b);
void ts_optim_free(ts_optim *o);

/* 1 if p is updated with the configured weight decay, 0 if it is in the
 * no-decay group (or is not trainable). */
int ts_optim_decays(const ts_optim *o, const ts_param *p);

/* dloss for each micro-batch's ts_loss_backward: (float)(loss_scale /
 * accum_steps), 1/k without loss scaling. Read it for every micro-batch:
 * the scale changes between steps. */
float ts_optim_loss_scale(const ts_optim *o);

/* clip_grad_norm_ over `count` gradient tensors grads[i][0..numel[i]):
 * *total_norm (may be NULL) gets the float32 total norm before clipping, as
 * the value PyTorch returns. max_norm <= 0 computes the norm only. A
 * non-finite norm is an error and no gradient is changed. */
ts_status ts_clip_grad_norm(ts_ctx *ctx, float *const *grads, const size_t *numel, int count, double max_norm,
                            double *total_norm);
/* The same over the used trainable entries of m (m->grads). */
ts_status ts_optim_clip_model(ts_ctx *ctx, ts_unet *m, double max_norm, double *total_norm);

/* One optimizer step at learning rate lr (the schedule's current lr):
 * clip (when cfg.clip_grad_norm > 0), then AdamW on every used trainable
 * entry. *grad_norm (may be NULL) gets the pre-clip total norm when
 * clipping, or when grad_norm is not NULL (then it is computed without
 * clipping); NAN if neither. Whenever the norm is computed, a non-finite
 * norm is an error ("gradient norm is nan") and nothing is updated. The
 * gradients are left as they are (clipped); zero them before the next
 * accumulation (ts_unet_zero_grad). */
ts_status ts_optim_step(ts_optim *o, ts_ctx *ctx, ts_unet *m, double lr, double *grad_norm);
/* The same on any trainable block (a training copy's: ts_unet_device_trainable),
 * whose memory must be the optimizer's. Runs of parameters that lie back to
 * back in the block and share a weight decay are updated by one
 * adamw_update call (the update is elementwise, so the bits are the same).
 * With cfg.loss_scaling, a non-finite gradient is not an error: the step is
 * skipped (o->last_skipped, *grad_norm NAN, step count unchanged, nothing
 * written but the scale) and TS_OK returned. */
ts_status ts_optim_step_on(ts_optim *o, ts_ctx *ctx, const ts_unet_trainable *t, double lr, double *grad_norm);

/* Checkpoint hooks. With loss scaling, save also adds
 * "optimizer.loss_scale" (F64 scalar) and "optimizer.loss_scale_growth"
 * (I64); load takes them when present (a checkpoint from an fp32 or bf16
 * run resumes with the initial scale) and ignores them without loss
 * scaling. Save adds "optimizer.step" (I64 scalar) and, for every
 * used trainable entry NAME, "optimizer.exp_avg.NAME" and
 * "optimizer.exp_avg_sq.NAME" (F32, NAME's shape). Load takes exactly those
 * entries (every other "optimizer." key is an error naming it; keys outside
 * that prefix are ignored) and checks dtypes and shapes. State in a
 * backend's memory is downloaded (save) or uploaded (load) through it. */
ts_status ts_optim_save(const ts_optim *o, const ts_unet *m, ts_dict *d);
ts_status ts_optim_load(ts_optim *o, const ts_unet *m, const ts_dict *d);

#endif
