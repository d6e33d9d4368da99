/* Learning-rate schedules with PyTorch's exact scalar arithmetic (double, the
 * same operations in the same order as torch/optim/lr_scheduler.py, so the
 * learning rates are bit-identical to PyTorch's on the same libm).
 *
 * A schedule is a counter of step() calls and the current lr, like a
 * PyTorch scheduler with its optimizer's param_group["lr"]. ts_sched_lr() is
 * the lr to use for the next optimizer step; ts_sched_step() is
 * scheduler.step(), called after optimizer.step(), once per epoch or once
 * per iteration (cfg.interval says which; the trainer calls
 * ts_sched_after_iteration() and ts_sched_after_epoch() and the schedule
 * steps on the one it was configured for). T_max, step_size and warmup
 * count in that unit.
 *
 * The PyTorch equivalents (opt = the optimizer, base = its lr):
 *   TS_LR_CONSTANT  no scheduler: lr = base.
 *   TS_LR_STEP      StepLR(opt, step_size, gamma): PyTorch's recursive
 *                      form, lr *= gamma whenever last_epoch is a non-zero
 *                      multiple of step_size (so base * gamma * gamma, not
 *                      base * gamma**2).
 *   TS_LR_COSINE    CosineAnnealingLR(opt, T_max, eta_min): the recursive
 *                      update of smp-unet.md 7.2 (not the closed form); past
 *                      T_max the lr rises again with period 2 T_max, as in
 *                      PyTorch.
 *   warmup W > 0       SequentialLR(opt, [LinearLR(opt, start_factor=f,
 *                      end_factor=1.0, total_iters=W), MAIN], milestones=[W])
 *                      where MAIN is the scheduler above (for CONSTANT:
 *                      LambdaLR(opt, lambda e: 1.0)). Exactly as PyTorch
 *                      runs it: steps 0..W-1 use LinearLR's recursive factors
 *                      from f * base (so W-1 warmup steps are below base,
 *                      the last at base (f + (1 - f)(W - 1)/W)); at step W
 *                      SequentialLR restarts MAIN with its closed form at
 *                      epoch 0 (eta_min + (base - eta_min) * 2 / 2 for the
 *                      cosine), then MAIN recurses from there with its own
 *                      epoch counter k - W. So T_max counts the steps after
 *                      the warmup, and the cosine reaches eta_min at step
 *                      W + T_max. */
#ifndef TS_TRAIN_SCHEDULE_H
#define TS_TRAIN_SCHEDULE_H

#include <stdint.h>

#include "kernels/status.h"
#include "weights/dict.h"

typedef enum ts_lr_kind {
    TS_LR_CONSTANT = 0,
    TS_LR_STEP,
    TS_LR_COSINE,
} ts_lr_kind;

typedef enum ts_lr_interval {
    TS_LR_PER_EPOCH = 0, /* scheduler.step() after every epoch (PyTorch's usual loop) */
    TS_LR_PER_ITERATION, /* scheduler.step() after every optimizer step */
} ts_lr_interval;

typedef struct ts_sched_config {
    ts_lr_kind kind;
    ts_lr_interval interval;
    int64_t step_size;   /* STEP: >= 1 */
    double gamma;        /* STEP: > 0 (PyTorch's default 0.1) */
    int64_t t_max;       /* COSINE: >= 1 */
    double eta_min;      /* COSINE: >= 0 (default 0) */
    int64_t warmup;      /* steps of linear warmup, 0 = none */
    double warmup_start_factor; /* LinearLR's start_factor, in (0, 1] (PyTorch's default 1/3) */
} ts_sched_config;

/* CONSTANT, per epoch, gamma 0.1, step_size 1, t_max 1, eta_min 0, no
 * warmup, warmup_start_factor 1/3. */
ts_sched_config ts_sched_default_config(void);
/* Checks the ranges above; the message names the field. */
ts_status ts_sched_config_check(const ts_sched_config *cfg);

typedef struct ts_sched {
    ts_sched_config cfg;
    double base_lr;
    double lr;          /* param_group["lr"] now: the lr of the next optimizer step */
    int64_t steps;      /* step() calls so far (SequentialLR's last_epoch) */
    int64_t main_epoch; /* MAIN's last_epoch (valid once steps >= warmup) */
} ts_sched;

/* Constructs the scheduler(s) as PyTorch does, which sets the lr for step 0
 * (base, or warmup_start_factor * base with warmup). base_lr > 0, finite. */
ts_status ts_sched_init(ts_sched *s, const ts_sched_config *cfg, double base_lr);
double ts_sched_lr(const ts_sched *s);
/* scheduler.step(). */
void ts_sched_step(ts_sched *s);
/* Step if the interval is PER_ITERATION / PER_EPOCH (else nothing). */
void ts_sched_after_iteration(ts_sched *s);
void ts_sched_after_epoch(ts_sched *s);
/* The lr after `steps` step() calls from a fresh init (replays the
 * recursion, so it is bit-identical to stepping). */
ts_status ts_sched_lr_at(const ts_sched_config *cfg, double base_lr, int64_t steps, double *lr);

/* Checkpoint hooks: "scheduler.steps" (I64 scalar) and "scheduler.lr" (F64
 * scalar). Load replays the recursion to that many steps (bit-exact) and
 * refuses the state if the replayed lr differs from the saved one, which
 * means the configured schedule or base lr is not the checkpoint's. */
ts_status ts_sched_save(const ts_sched *s, ts_dict *d);
ts_status ts_sched_load(ts_sched *s, const ts_dict *d);

#endif
