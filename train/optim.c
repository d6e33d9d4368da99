/* AdamW over the parameter table, gradient clipping, and the optimizer's
 * checkpoint state (train/optim.h). */
#include "optim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

ts_optim_config ts_optim_default_config(void)
{
    ts_optim_config c;
    memset(&c, 0, sizeof c);
    c.lr = 1e-3;
    c.beta1 = 0.9;
    c.beta2 = 0.999;
    c.eps = 1e-8;
    c.weight_decay = 1e-2;
    c.no_decay_1d = 0;
    c.clip_grad_norm = 0;
    c.accum_steps = 1;
    return c;
}

ts_status ts_optim_config_check(const ts_optim_config *c)
{
    if (!c) return ts_error(TS_ERR_INVALID_ARG, "optimizer: NULL config");
    if (!(c->lr > 0) || !isfinite(c->lr))
        return ts_error(TS_ERR_INVALID_ARG, "optimizer: lr must be > 0 and finite, got %g", c->lr);
    if (!(c->beta1 >= 0 && c->beta1 < 1) || !(c->beta2 >= 0 && c->beta2 < 1))
        return ts_error(TS_ERR_INVALID_ARG, "optimizer: betas must be in [0, 1), got (%g, %g)", c->beta1, c->beta2);
    if (!(c->eps >= 0) || !isfinite(c->eps))
        return ts_error(TS_ERR_INVALID_ARG, "optimizer: eps must be >= 0 and finite, got %g", c->eps);
    if (!(c->weight_decay >= 0) || !isfinite(c->weight_decay))
        return ts_error(TS_ERR_INVALID_ARG, "optimizer: weight_decay must be >= 0 and finite, got %g", c->weight_decay);
    if (c->no_decay_1d != 0 && c->no_decay_1d != 1)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer: no_decay_1d must be 0 or 1, got %d", c->no_decay_1d);
    if (!(c->clip_grad_norm >= 0) || !isfinite(c->clip_grad_norm))
        return ts_error(TS_ERR_INVALID_ARG, "optimizer: clip_grad_norm must be >= 0 (0 = off) and finite, got %g",
                        c->clip_grad_norm);
    if (c->accum_steps < 1)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer: accum_steps must be >= 1, got %d", c->accum_steps);
    if (c->loss_scaling != 0 && c->loss_scaling != 1)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer: loss_scaling must be 0 or 1, got %d", c->loss_scaling);
    return TS_OK;
}

/* Zeroed state: calloc'd on the host, uploaded for a backend's memory (the
 * memory interface has no memset; this runs once per optimizer). */
ts_status ts_optim_init_on(ts_optim *o, const ts_optim_config *cfg, const ts_unet *m, const ts_backend *b)
{
    if (!o) return ts_error(TS_ERR_INVALID_ARG, "optimizer: NULL optimizer");
    memset(o, 0, sizeof *o);
    ts_status st = ts_optim_config_check(cfg);
    if (st) return st;
    if (!m || !m->params || !m->weights)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer: the model is not initialised (ts_unet_init)");
    if (b && !b->memory) return ts_error(TS_ERR_INVALID_ARG, "optimizer: backend %s has no memory interface", b->name);
    const ts_backend_memory *mem = b && !b->memory->host ? b->memory : NULL;
    size_t bytes = (m->n_weights ? m->n_weights : 1) * sizeof(float);
    if (!mem) {
        o->exp_avg = ts_aligned_alloc(bytes);
        o->exp_avg_sq = ts_aligned_alloc(bytes);
        if (!o->exp_avg || !o->exp_avg_sq) {
            ts_optim_free(o);
            return ts_error(TS_ERR_NOMEM, "optimizer: out of memory for AdamW state (%.1f MiB)",
                            2.0 * (double)bytes / (1 << 20));
        }
        memset(o->exp_avg, 0, bytes);
        memset(o->exp_avg_sq, 0, bytes);
    } else {
        o->mem = mem;
        void *a = NULL, *q = NULL;
        float *zeros = calloc(1, bytes);
        st = zeros ? mem->alloc(&a, bytes) : ts_error(TS_ERR_NOMEM, "optimizer: out of memory");
        o->exp_avg = a;
        if (!st) st = mem->alloc(&q, bytes);
        o->exp_avg_sq = q;
        if (!st && (!a || !q)) st = ts_error(TS_ERR_NOMEM, "backend gave no memory");
        if (!st) st = mem->upload(o->exp_avg, zeros, bytes);
        if (!st) st = mem->upload(o->exp_avg_sq, zeros, bytes);
        free(zeros);
        if (st) {
            char why[512];
            snprintf(why, sizeof why, "%s", ts_last_error());
            ts_optim_free(o);
            return ts_error(st, "optimizer: AdamW state (%.1f MiB) on backend %s: %s", 2.0 * (double)bytes / (1 << 20),
                            b->name, why);
        }
    }
    o->cfg = *cfg;
    o->n = m->n_weights;
    o->step = 0;
    o->loss_scale = cfg->loss_scaling ? TS_LOSS_SCALE_INIT : 1.0;
    return TS_OK;
}

ts_status ts_optim_init(ts_optim *o, const ts_optim_config *cfg, const ts_unet *m)
{
    return ts_optim_init_on(o, cfg, m, NULL);
}

void ts_optim_free(ts_optim *o)
{
    if (!o) return;
    if (o->mem) {
        o->mem->free(o->exp_avg);
        o->mem->free(o->exp_avg_sq);
    } else {
        ts_aligned_free(o->exp_avg);
        ts_aligned_free(o->exp_avg_sq);
    }
    memset(o, 0, sizeof *o);
}

int ts_optim_decays(const ts_optim *o, const ts_param *p)
{
    if (p->kind != TS_PARAM_WEIGHT) return 0;
    return !(o->cfg.no_decay_1d && p->ndim <= 1);
}

float ts_optim_loss_scale(const ts_optim *o)
{
    double k = o->cfg.accum_steps > 0 ? o->cfg.accum_steps : 1;
    return o->cfg.loss_scaling ? (float)(o->loss_scale / k) : (float)(1.0 / k);
}

/* ---- clip_grad_norm_ ------------------------------------------------------- */

/* The total norm of clip_grad_norm_ into *total_norm, and the coefficient
 * every gradient is multiplied by into *coef (1 when nothing is clipped). */
static ts_status clip_coef(ts_ctx *ctx, float *const *grads, const size_t *numel, int count, double max_norm,
                           double *total_norm, float *coef)
{
    *coef = 1.0f;
    if (total_norm) *total_norm = 0;
    if (!ctx || !ctx->backend) return ts_error(TS_ERR_INVALID_ARG, "clip_grad_norm: no backend in the context");
    if (count < 0 || (count > 0 && (!grads || !numel)))
        return ts_error(TS_ERR_INVALID_ARG, "clip_grad_norm: NULL gradient list for %d tensors", count);
    if (isnan(max_norm)) return ts_error(TS_ERR_INVALID_ARG, "clip_grad_norm: max_norm is %g", max_norm);
    if (count == 0) return TS_OK; /* torch.tensor(0.0), nothing to scale */
    /* torch._foreach_norm: one float32 norm per tensor; then
     * vector_norm(stack(norms)) in float32. */
    double *s = malloc((size_t)count * sizeof *s);
    if (!s) return ts_error(TS_ERR_NOMEM, "clip_grad_norm: out of memory for %d norms", count);
    ts_status st = ctx->backend->sum_squares_multi(ctx, s, (const float *const *)grads, numel, count);
    double ss = 0;
    for (int i = 0; i < count && !st; i++) {
        float ni = (float)sqrt(s[i]);
        ss += (double)ni * ni;
    }
    free(s);
    if (st) return st;
    const float total = (float)sqrt(ss);
    if (total_norm) *total_norm = total;
    if (!isfinite(total))
        return ts_error(TS_ERR_INVALID_ARG,
                        "gradient norm is %g: a gradient is not finite; lower the learning rate or check the inputs",
                        (double)total);
    if (!(max_norm > 0)) return TS_OK;
    /* clip_coef = max_norm / (total_norm + 1e-6), i.e. reciprocal(total +
     * 1e-6) * max_norm in float32; clamp(max=1.0); g.mul_(coef). g * 1.0f is
     * g, bit for bit, so a coefficient of 1 scales nothing. */
    float c = (1.0f / (total + 1e-6f)) * (float)max_norm;
    *coef = c > 1.0f ? 1.0f : c;
    return TS_OK;
}

ts_status ts_clip_grad_norm(ts_ctx *ctx, float *const *grads, const size_t *numel, int count, double max_norm,
                            double *total_norm)
{
    float coef;
    ts_status st = clip_coef(ctx, grads, numel, count, max_norm, total_norm, &coef);
    for (int i = 0; i < count && !st && coef != 1.0f; i++) st = ctx->backend->scale(ctx, grads[i], numel[i], coef);
    return st;
}

/* The used trainable entries' gradient pointers and sizes. */
static ts_status used_grads(const ts_unet_trainable *t, float ***g, size_t **n, int *count)
{
    int c = 0;
    for (int i = 0; i < t->n_params; i++) c += t->params[i].kind == TS_PARAM_WEIGHT && t->params[i].used;
    *g = malloc((size_t)(c ? c : 1) * sizeof **g);
    *n = malloc((size_t)(c ? c : 1) * sizeof **n);
    if (!*g || !*n) {
        free(*g);
        free(*n);
        return ts_error(TS_ERR_NOMEM, "clip_grad_norm: out of memory for %d tensor entries", c);
    }
    c = 0;
    for (int i = 0; i < t->n_params; i++) {
        const ts_param *p = &t->params[i];
        if (p->kind != TS_PARAM_WEIGHT || !p->used) continue;
        (*g)[c] = t->grads + p->offset;
        (*n)[c] = p->numel;
        c++;
    }
    *count = c;
    return TS_OK;
}

/* *finite = 0 if any used gradient holds an inf or NaN (its sum of squares,
 * formed in double, is then not finite; finite floats cannot overflow it):
 * GradScaler's found_inf. */
static ts_status grads_finite(ts_ctx *ctx, const ts_unet_trainable *t, int *finite)
{
    *finite = 1;
    float **g = NULL;
    size_t *n = NULL;
    int count = 0;
    ts_status st = used_grads(t, &g, &n, &count);
    double *s = st ? NULL : malloc((size_t)(count ? count : 1) * sizeof *s);
    if (!st && !s) st = ts_error(TS_ERR_NOMEM, "loss scaling: out of memory for %d sums", count);
    if (!st) st = ctx->backend->sum_squares_multi(ctx, s, (const float *const *)g, n, count);
    for (int i = 0; i < count && !st; i++)
        if (!isfinite(s[i])) *finite = 0;
    free(s);
    free(g);
    free(n);
    return st;
}

static ts_status clip_trainable(ts_ctx *ctx, const ts_unet_trainable *t, double max_norm, double *total_norm)
{
    float **g = NULL;
    size_t *n = NULL;
    int count = 0;
    ts_status st = used_grads(t, &g, &n, &count);
    if (st) return st;
    float coef;
    st = clip_coef(ctx, g, n, count, max_norm, total_norm, &coef);
    free(g);
    free(n);
    /* The whole gradient block in one call rather than a call per tensor (on
     * a GPU, one launch instead of 140): the entries of unused parameters are
     * 0 and stay 0, as in scaler.unscale_ below. */
    if (!st && coef != 1.0f) st = ctx->backend->scale(ctx, t->grads, t->n_weights, coef);
    return st;
}

ts_status ts_optim_clip_model(ts_ctx *ctx, ts_unet *m, double max_norm, double *total_norm)
{
    if (!m || !m->params || !m->grads) return ts_error(TS_ERR_INVALID_ARG, "clip_grad_norm: model not initialised");
    ts_unet_trainable t = ts_unet_host_trainable(m);
    return clip_trainable(ctx, &t, max_norm, total_norm);
}

/* ---- the step ---------------------------------------------------------------- */

ts_status ts_optim_step_on(ts_optim *o, ts_ctx *ctx, const ts_unet_trainable *tr, double lr, double *grad_norm)
{
    if (grad_norm) *grad_norm = NAN;
    if (!o || !o->exp_avg) return ts_error(TS_ERR_INVALID_ARG, "optimizer step: the optimizer is not initialised");
    if (!tr || !tr->params || !tr->weights || !tr->grads || tr->n_weights != o->n)
        return ts_error(TS_ERR_INVALID_ARG,
                        "optimizer step: the model is not the one the optimizer was made for "
                        "(%zu trainable values, the state has %zu)",
                        tr ? tr->n_weights : 0, o->n);
    const ts_backend_memory *tmem = tr->mem && !tr->mem->host ? tr->mem : NULL;
    if (tmem != o->mem)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer step: the weights and the optimizer state live in different "
                                            "memories (make the optimizer with ts_optim_init_on the weights' backend)");
    if (!ctx || !ctx->backend) return ts_error(TS_ERR_INVALID_ARG, "optimizer step: no backend in the context");
    if (ctx->backend->memory && !ctx->backend->memory->host != (o->mem != NULL))
        return ts_error(TS_ERR_INVALID_ARG, "optimizer step: backend %s does not work on the memory the state lives in",
                        ctx->backend->name);
    if (!(lr >= 0) || !isfinite(lr)) return ts_error(TS_ERR_INVALID_ARG, "optimizer step: learning rate is %g", lr);
    ts_status st;
    o->last_skipped = 0;
    if (o->cfg.loss_scaling) {
        int finite;
        if ((st = grads_finite(ctx, tr, &finite))) return st;
        if (!finite) {
            /* scaler.step skips optimizer.step; scaler.update backs off. */
            o->loss_scale *= 0.5;
            o->growth_tracker = 0;
            o->skipped_steps++;
            o->last_skipped = 1;
            return TS_OK;
        }
        /* scaler.unscale_: grad *= (float)(1 / scale), the whole block at
         * once (entries of unused parameters are 0 and stay 0). */
        if ((st = ctx->backend->scale(ctx, tr->grads, tr->n_weights, (float)(1.0 / o->loss_scale)))) return st;
    }
    if (o->cfg.clip_grad_norm > 0 || grad_norm) {
        double norm = NAN;
        st = clip_trainable(ctx, tr, o->cfg.clip_grad_norm, &norm);
        if (grad_norm) *grad_norm = norm;
        if (st) return st;
    }
    const long t = o->step + 1; /* state["step"] += 1 before the update */
    ts_adamw_hparams hd = {lr, o->cfg.beta1, o->cfg.beta2, o->cfg.eps, o->cfg.weight_decay};
    ts_adamw_hparams h0 = hd;
    h0.weight_decay = 0; /* the no-decay group */
    ts_adamw_step sd, s0;
    if ((st = ts_adamw_prepare(&sd, &hd, t)) || (st = ts_adamw_prepare(&s0, &h0, t))) return st;
    const ts_backend *B = ctx->backend;
    /* Runs of used parameters that are back to back in the block and in the
     * same group: one call each (a whole model without no_decay_1d is one). */
    for (int i = 0; i < tr->n_params;) {
        const ts_param *p = &tr->params[i];
        if (p->kind != TS_PARAM_WEIGHT || !p->used) { /* grad None: skipped entirely */
            i++;
            continue;
        }
        const int decays = ts_optim_decays(o, p);
        size_t off = p->offset, n = p->numel;
        int j = i + 1;
        for (; j < tr->n_params; j++) {
            const ts_param *q = &tr->params[j];
            if (q->kind == TS_PARAM_BUFFER || q->kind == TS_PARAM_COUNTER) continue; /* not in the weight block */
            if (!q->used || ts_optim_decays(o, q) != decays || q->offset != off + n) break;
            n += q->numel;
        }
        st = B->adamw_update(ctx, tr->weights + off, tr->grads + off, o->exp_avg + off, o->exp_avg_sq + off, n,
                             decays ? &sd : &s0);
        if (st) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", ts_last_error());
            return ts_error(st, "optimizer step %ld, %s%s: %s", t, p->name, j > i + 1 ? " and the parameters after it" : "",
                            msg);
        }
        i = j;
    }
    o->step = t;
    if (o->cfg.loss_scaling && ++o->growth_tracker == TS_LOSS_SCALE_GROWTH_INTERVAL) {
        o->loss_scale *= 2.0;
        o->growth_tracker = 0;
    }
    return TS_OK;
}

ts_status ts_optim_step(ts_optim *o, ts_ctx *ctx, ts_unet *m, double lr, double *grad_norm)
{
    if (grad_norm) *grad_norm = NAN;
    if (!m || !m->params)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer step: the model is not initialised (ts_unet_init)");
    ts_unet_trainable t = ts_unet_host_trainable(m);
    return ts_optim_step_on(o, ctx, &t, lr, grad_norm);
}

/* ---- checkpoint state ---------------------------------------------------------- */

#define OPT_PREFIX "optimizer."
#define OPT_AVG "optimizer.exp_avg."
#define OPT_AVG_SQ "optimizer.exp_avg_sq."
#define OPT_STEP "optimizer.step"
#define OPT_SCALE "optimizer.loss_scale"
#define OPT_GROWTH "optimizer.loss_scale_growth"

static ts_status key_of(char *buf, size_t cap, const char *prefix, const char *name)
{
    int k = snprintf(buf, cap, "%s%s", prefix, name);
    if (k < 0 || (size_t)k >= cap)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer state: key %s%s too long", prefix, name);
    return TS_OK;
}

ts_status ts_optim_save(const ts_optim *o, const ts_unet *m, ts_dict *d)
{
    if (!o || !o->exp_avg || !m || !d || m->n_weights != o->n)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer save: optimizer, model or dictionary missing or mismatched");
    /* State in a backend's memory is read through host copies of both blocks. */
    const float *avg = o->exp_avg, *avg_sq = o->exp_avg_sq;
    float *h_avg = NULL, *h_avg_sq = NULL;
    ts_status st = TS_OK;
    if (o->mem) {
        size_t bytes = (o->n ? o->n : 1) * sizeof(float);
        h_avg = malloc(bytes);
        h_avg_sq = malloc(bytes);
        if (!h_avg || !h_avg_sq) st = ts_error(TS_ERR_NOMEM, "optimizer save: out of memory");
        if (!st) st = o->mem->download(h_avg, o->exp_avg, o->n * sizeof(float));
        if (!st) st = o->mem->download(h_avg_sq, o->exp_avg_sq, o->n * sizeof(float));
        avg = h_avg;
        avg_sq = h_avg_sq;
    }
    int64_t step = o->step;
    if (!st) st = ts_dict_add(d, OPT_STEP, TS_I64, 0, NULL, &step);
    if (!st && o->cfg.loss_scaling) {
        double scale = o->loss_scale;
        int64_t growth = o->growth_tracker;
        st = ts_dict_add(d, OPT_SCALE, TS_F64, 0, NULL, &scale);
        if (!st) st = ts_dict_add(d, OPT_GROWTH, TS_I64, 0, NULL, &growth);
    }
    char key[160];
    for (int i = 0; i < m->n_params && !st; i++) {
        const ts_param *p = &m->params[i];
        if (p->kind != TS_PARAM_WEIGHT || !p->used) continue;
        int64_t shape[4];
        for (int k = 0; k < p->ndim; k++) shape[k] = p->shape[k];
        if ((st = key_of(key, sizeof key, OPT_AVG, p->name)) ||
            (st = ts_dict_add(d, key, TS_F32, p->ndim, shape, avg + p->offset)) ||
            (st = key_of(key, sizeof key, OPT_AVG_SQ, p->name)) ||
            (st = ts_dict_add(d, key, TS_F32, p->ndim, shape, avg_sq + p->offset)))
            break;
    }
    free(h_avg);
    free(h_avg_sq);
    return st;
}

static ts_status load_entry(const ts_dict *d, const char *key, const ts_param *p, const ts_named_tensor **out)
{
    const ts_named_tensor *t = ts_dict_find(d, key);
    if (!t) return ts_error(TS_ERR_INVALID_ARG, "optimizer load: the checkpoint has no \"%s\"", key);
    int ok = t->dtype == TS_F32 && t->ndim == p->ndim;
    for (int k = 0; ok && k < p->ndim; k++) ok = t->shape[k] == p->shape[k];
    if (!ok)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer load: \"%s\" must be F32 with the shape of %s (%zu values)", key,
                        p->name, p->numel);
    *out = t;
    return TS_OK;
}

ts_status ts_optim_load(ts_optim *o, const ts_unet *m, const ts_dict *d)
{
    if (!o || !o->exp_avg || !m || !d || m->n_weights != o->n)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer load: optimizer, model or dictionary missing or mismatched");
    const ts_named_tensor *ts = ts_dict_find(d, OPT_STEP);
    if (!ts) return ts_error(TS_ERR_INVALID_ARG, "optimizer load: the checkpoint has no \"" OPT_STEP "\"");
    if (ts->dtype != TS_I64 || ts_named_numel(ts) != 1)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer load: \"" OPT_STEP "\" must be one I64 value");
    int64_t step;
    memcpy(&step, ts->data, sizeof step);
    if (step < 0) return ts_error(TS_ERR_INVALID_ARG, "optimizer load: " OPT_STEP " is %lld", (long long)step);
    /* Every optimizer key must be one this model expects. */
    size_t expected = 1, found = 0;
    for (int i = 0; i < m->n_params; i++) expected += 2 * (m->params[i].kind == TS_PARAM_WEIGHT && m->params[i].used);
    for (size_t j = 0; j < d->count; j++) {
        const char *name = d->items[j].name;
        if (strncmp(name, OPT_PREFIX, strlen(OPT_PREFIX)) != 0) continue;
        found++;
        const char *pn = NULL;
        if (strncmp(name, OPT_AVG, strlen(OPT_AVG)) == 0)
            pn = name + strlen(OPT_AVG);
        else if (strncmp(name, OPT_AVG_SQ, strlen(OPT_AVG_SQ)) == 0)
            pn = name + strlen(OPT_AVG_SQ);
        else if (strcmp(name, OPT_STEP) == 0 || strcmp(name, OPT_SCALE) == 0 || strcmp(name, OPT_GROWTH) == 0) {
            /* the scaler's entries are optional: not counted */
            if (strcmp(name, OPT_STEP) != 0) found--;
            continue;
        }
        const ts_param *p = pn ? ts_unet_find(m, pn) : NULL;
        if (!p || p->kind != TS_PARAM_WEIGHT || !p->used)
            return ts_error(TS_ERR_INVALID_ARG,
                            "optimizer load: unexpected key \"%s\" (not the state of a trained parameter of this "
                            "model)",
                            name);
    }
    if (found != expected)
        return ts_error(TS_ERR_INVALID_ARG, "optimizer load: %zu optimizer entries, this model needs %zu", found,
                        expected);
    double new_scale = o->loss_scale;
    long new_growth = o->growth_tracker;
    if (o->cfg.loss_scaling) {
        const ts_named_tensor *sc = ts_dict_find(d, OPT_SCALE), *gr = ts_dict_find(d, OPT_GROWTH);
        double scale = TS_LOSS_SCALE_INIT;
        int64_t growth = 0;
        if (sc && gr && sc->dtype == TS_F64 && ts_named_numel(sc) == 1 && gr->dtype == TS_I64 &&
            ts_named_numel(gr) == 1) {
            memcpy(&scale, sc->data, sizeof scale);
            memcpy(&growth, gr->data, sizeof growth);
        } else if (sc || gr) {
            return ts_error(TS_ERR_INVALID_ARG, "optimizer load: \"" OPT_SCALE "\" (one F64) and \"" OPT_GROWTH
                                                "\" (one I64) must be given together");
        }
        if (!(scale > 0) || !isfinite(scale) || growth < 0)
            return ts_error(TS_ERR_INVALID_ARG, "optimizer load: loss scale %g, growth %lld", scale, (long long)growth);
        new_scale = scale;
        new_growth = (long)growth;
    }
    char key[160];
    ts_status st;
    /* Check everything before writing anything. */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < m->n_params; i++) {
            const ts_param *p = &m->params[i];
            if (p->kind != TS_PARAM_WEIGHT || !p->used) continue;
            const ts_named_tensor *ta, *tq;
            if ((st = key_of(key, sizeof key, OPT_AVG, p->name)) || (st = load_entry(d, key, p, &ta)) ||
                (st = key_of(key, sizeof key, OPT_AVG_SQ, p->name)) || (st = load_entry(d, key, p, &tq)))
                return st;
            if (pass == 1 && o->mem) {
                if ((st = o->mem->upload(o->exp_avg + p->offset, ta->data, p->numel * sizeof(float))) ||
                    (st = o->mem->upload(o->exp_avg_sq + p->offset, tq->data, p->numel * sizeof(float))))
                    return st;
            } else if (pass == 1) {
                memcpy(o->exp_avg + p->offset, ta->data, p->numel * sizeof(float));
                memcpy(o->exp_avg_sq + p->offset, tq->data, p->numel * sizeof(float));
            }
        }
    }
    o->step = (long)step;
    o->loss_scale = new_scale;
    o->growth_tracker = new_growth;
    return TS_OK;
}
