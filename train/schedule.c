/* Learning-rate schedules (train/schedule.h): torch/optim/lr_scheduler.py's
 * StepLR, CosineAnnealingLR, LinearLR and SequentialLR, operation for
 * operation in double. Python evaluates a * b / c as (a * b) / c and
 * math.cos is the C library's cos, so the expressions below are written in
 * Python's order. */
#include "schedule.h"

#include <math.h>
#include <string.h>

#ifndef M_PI
#define M_PI 3.14159265358979323846 /* Python's math.pi */
#endif

ts_sched_config ts_sched_default_config(void)
{
    ts_sched_config c;
    memset(&c, 0, sizeof c);
    c.kind = TS_LR_CONSTANT;
    c.interval = TS_LR_PER_EPOCH;
    c.step_size = 1;
    c.gamma = 0.1;
    c.t_max = 1;
    c.eta_min = 0.0;
    c.warmup = 0;
    c.warmup_start_factor = 1.0 / 3;
    return c;
}

ts_status ts_sched_config_check(const ts_sched_config *c)
{
    if (!c) return ts_error(TS_ERR_INVALID_ARG, "schedule: NULL config");
    if (c->kind != TS_LR_CONSTANT && c->kind != TS_LR_STEP && c->kind != TS_LR_COSINE)
        return ts_error(TS_ERR_INVALID_ARG, "schedule: unknown kind %d (constant, step or cosine)", (int)c->kind);
    if (c->interval != TS_LR_PER_EPOCH && c->interval != TS_LR_PER_ITERATION)
        return ts_error(TS_ERR_INVALID_ARG, "schedule: unknown interval %d (epoch or iteration)", (int)c->interval);
    if (c->kind == TS_LR_STEP) {
        if (c->step_size < 1)
            return ts_error(TS_ERR_INVALID_ARG, "schedule: step_size must be >= 1, got %lld", (long long)c->step_size);
        if (!(c->gamma > 0) || !isfinite(c->gamma))
            return ts_error(TS_ERR_INVALID_ARG, "schedule: gamma must be > 0 and finite, got %g", c->gamma);
    }
    if (c->kind == TS_LR_COSINE) {
        if (c->t_max < 1)
            return ts_error(TS_ERR_INVALID_ARG, "schedule: t_max must be >= 1, got %lld", (long long)c->t_max);
        if (!(c->eta_min >= 0) || !isfinite(c->eta_min))
            return ts_error(TS_ERR_INVALID_ARG, "schedule: eta_min must be >= 0 and finite, got %g", c->eta_min);
    }
    if (c->warmup < 0)
        return ts_error(TS_ERR_INVALID_ARG, "schedule: warmup must be >= 0, got %lld", (long long)c->warmup);
    /* LinearLR: "Starting multiplicative factor expected to be greater than 0
     * and less or equal to 1." */
    if (c->warmup > 0 && !(c->warmup_start_factor > 0 && c->warmup_start_factor <= 1))
        return ts_error(TS_ERR_INVALID_ARG, "schedule: warmup_start_factor must be in (0, 1], got %g",
                        c->warmup_start_factor);
    return TS_OK;
}

ts_status ts_sched_init(ts_sched *s, const ts_sched_config *cfg, double base_lr)
{
    if (!s) return ts_error(TS_ERR_INVALID_ARG, "schedule: NULL schedule");
    memset(s, 0, sizeof *s);
    ts_status st = ts_sched_config_check(cfg);
    if (st) return st;
    if (!(base_lr > 0) || !isfinite(base_lr))
        return ts_error(TS_ERR_INVALID_ARG, "schedule: the learning rate must be > 0 and finite, got %g", base_lr);
    s->cfg = *cfg;
    s->base_lr = base_lr;
    s->steps = 0;
    s->main_epoch = 0;
    /* LinearLR's initial step (last_epoch 0): group["lr"] * start_factor.
     * Without warmup, MAIN's initial step leaves the lr at base. */
    s->lr = cfg->warmup > 0 ? base_lr * cfg->warmup_start_factor : base_lr;
    return TS_OK;
}

double ts_sched_lr(const ts_sched *s) { return s->lr; }

/* MAIN's get_lr() after last_epoch += 1 (e >= 1). */
static double main_recursive(const ts_sched *s, int64_t e, double lr)
{
    const ts_sched_config *c = &s->cfg;
    switch (c->kind) {
    case TS_LR_STEP:
        /* StepLR: if last_epoch == 0 or last_epoch % step_size != 0: keep */
        if (e == 0 || e % c->step_size != 0) return lr;
        return lr * c->gamma;
    case TS_LR_COSINE: {
        const double T = (double)c->t_max, eta = c->eta_min, base = s->base_lr;
        int64_t two_t = 2 * c->t_max, r = (e - 1 - c->t_max) % two_t;
        if (r < 0) r += two_t; /* Python's modulo */
        if (r == 0) return lr + (base - eta) * (1 - cos(M_PI / T)) / 2;
        return (1 + cos(M_PI * (double)e / T)) / (1 + cos(M_PI * (double)(e - 1) / T)) * (lr - eta) + eta;
    }
    case TS_LR_CONSTANT:
    default:
        return s->base_lr * 1.0; /* LambdaLR(lambda e: 1.0) */
    }
}

/* MAIN's _get_closed_form_lr() at last_epoch 0: what SequentialLR's
 * _update_lr(0) sets at the milestone. */
static double main_closed_form_0(const ts_sched *s)
{
    const ts_sched_config *c = &s->cfg;
    const double base = s->base_lr;
    switch (c->kind) {
    case TS_LR_STEP:
        return base * pow(c->gamma, 0.0); /* base_lr * gamma ** (0 // step_size) */
    case TS_LR_COSINE: {
        const double eta = c->eta_min;
        return eta + (base - eta) * (1 + cos(M_PI * 0.0 / (double)c->t_max)) / 2;
    }
    case TS_LR_CONSTANT:
    default:
        return base * 1.0;
    }
}

void ts_sched_step(ts_sched *s)
{
    const ts_sched_config *c = &s->cfg;
    const int64_t k = ++s->steps; /* SequentialLR.last_epoch (or MAIN's own without warmup) */
    if (c->kind == TS_LR_CONSTANT && c->warmup == 0) return;
    if (c->warmup == 0) {
        s->main_epoch = k;
        s->lr = main_recursive(s, k, s->lr);
        return;
    }
    const int64_t W = c->warmup;
    if (k < W) {
        /* LinearLR.get_lr with last_epoch = k in 1..W-1 (end_factor 1.0) */
        const double f = c->warmup_start_factor, end = 1.0;
        s->lr = s->lr * (1.0 + (end - f) / ((double)W * f + (double)(k - 1) * (end - f)));
    } else if (k == W) {
        s->main_epoch = 0;
        s->lr = main_closed_form_0(s);
    } else {
        s->main_epoch = k - W;
        s->lr = main_recursive(s, s->main_epoch, s->lr);
    }
}

void ts_sched_after_iteration(ts_sched *s)
{
    if (s->cfg.interval == TS_LR_PER_ITERATION) ts_sched_step(s);
}

void ts_sched_after_epoch(ts_sched *s)
{
    if (s->cfg.interval == TS_LR_PER_EPOCH) ts_sched_step(s);
}

ts_status ts_sched_lr_at(const ts_sched_config *cfg, double base_lr, int64_t steps, double *lr)
{
    if (!lr) return ts_error(TS_ERR_INVALID_ARG, "schedule: NULL output");
    if (steps < 0) return ts_error(TS_ERR_INVALID_ARG, "schedule: step count must be >= 0, got %lld", (long long)steps);
    ts_sched s;
    ts_status st = ts_sched_init(&s, cfg, base_lr);
    if (st) return st;
    for (int64_t i = 0; i < steps; i++) ts_sched_step(&s);
    *lr = s.lr;
    return TS_OK;
}

ts_status ts_sched_save(const ts_sched *s, ts_dict *d)
{
    if (!s || !d) return ts_error(TS_ERR_INVALID_ARG, "schedule save: NULL schedule or dictionary");
    int64_t steps = s->steps;
    double lr = s->lr;
    ts_status st = ts_dict_add(d, "scheduler.steps", TS_I64, 0, NULL, &steps);
    if (!st) st = ts_dict_add(d, "scheduler.lr", TS_F64, 0, NULL, &lr);
    return st;
}

static ts_status scalar_entry(const ts_dict *d, const char *name, ts_dtype dtype, const void **data)
{
    const ts_named_tensor *t = ts_dict_find(d, name);
    if (!t) return ts_error(TS_ERR_INVALID_ARG, "schedule load: the checkpoint has no \"%s\"", name);
    if (t->dtype != dtype || ts_named_numel(t) != 1)
        return ts_error(TS_ERR_INVALID_ARG, "schedule load: \"%s\" must be one %s value", name,
                        ts_dtype_safetensors_name(dtype));
    *data = t->data;
    return TS_OK;
}

ts_status ts_sched_load(ts_sched *s, const ts_dict *d)
{
    if (!s || !d) return ts_error(TS_ERR_INVALID_ARG, "schedule load: NULL schedule or dictionary");
    const void *ps = NULL, *pl = NULL;
    ts_status st = scalar_entry(d, "scheduler.steps", TS_I64, &ps);
    if (!st) st = scalar_entry(d, "scheduler.lr", TS_F64, &pl);
    if (st) return st;
    int64_t steps;
    double lr_saved, lr;
    memcpy(&steps, ps, sizeof steps);
    memcpy(&lr_saved, pl, sizeof lr_saved);
    if (steps < 0) return ts_error(TS_ERR_INVALID_ARG, "schedule load: scheduler.steps is %lld", (long long)steps);
    ts_sched r;
    if ((st = ts_sched_init(&r, &s->cfg, s->base_lr))) return st;
    for (int64_t i = 0; i < steps; i++) ts_sched_step(&r);
    lr = r.lr;
    if (memcmp(&lr, &lr_saved, sizeof lr) != 0)
        return ts_error(TS_ERR_INVALID_ARG,
                        "schedule load: after %lld steps the configured schedule gives lr %.17g but the checkpoint "
                        "saved %.17g; the schedule or the base learning rate differs from the checkpoint's",
                        (long long)steps, lr, lr_saved);
    *s = r;
    return TS_OK;
}
