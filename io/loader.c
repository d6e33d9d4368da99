/* The batch loader (io/loader.h).
 *
 * Positions and slots. Epoch positions 0 .. npos-1 are handed to workers one
 * at a time, in increasing order, under the mutex; position p belongs to
 * batch p / B and is written to sample p % B of that batch's buffer (slot
 * b % nslots, nslots = prefetch + 1). A worker only takes a position whose
 * batch is fewer than nslots batches ahead of the first batch the caller has
 * not released, so a slot is never refilled while the caller reads it. The
 * caller waits until every sample of its batch is done; batches therefore
 * come out in order whatever order the workers finish in.
 *
 * Randomness. Nothing random is shared: the epoch's permutation comes from a
 * stream seeded by (seed, epoch), and each sample's augmentation from a
 * stream seeded by (seed, epoch, position). Which worker reads a sample, and
 * when, cannot change a bit of it.
 *
 * Errors. A failing callback stops the hand-out of new positions; every
 * position before it was already handed out, so all earlier batches complete
 * normally. The failing batch waits for the samples of it that were handed
 * out and reports the failure at its lowest position, which is the one
 * synchronous mode (reading in order, stopping at the first failure) reports.
 * The worker formats the message in its own thread (ts_last_error is
 * thread-local) and ts_loader_next re-raises it in the caller's. */
#include "io/loader.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOADER_MSG 1024
#define LOADER_MAX_WORKERS 64
#define LOADER_MAX_PREFETCH 64
#define LOADER_MAX_SIDE 32768
#define LOADER_MAX_CHANNELS 4096

/* Domain constants that keep the permutation and augmentation streams apart. */
#define DOMAIN_PERM 0x7065726d75746531ull /* "permute1" */
#define DOMAIN_AUG 0x6175676d656e7431ull  /* "augment1" */

typedef struct slot {
    float *image;
    int32_t *mask;
    uint8_t *valid;
    size_t *indices;
    int *transforms;
    size_t batch; /* the batch it holds or is being filled with; SIZE_MAX: none */
    int done;     /* samples finished, successfully or not */
    ts_status err;
    size_t err_pos;
    char err_msg[LOADER_MSG];
} slot;

typedef struct scratch {
    float *f;
    int32_t *i;
    uint8_t *u;
    char msg[LOADER_MSG];
} scratch;

typedef struct worker_arg {
    struct ts_loader *l;
    int id;
} worker_arg;

struct ts_loader {
    ts_loader_opts o;
    ts_window *windows;
    size_t n;
    ts_sample_read_fn fn;
    void *user;
    size_t hw, chw;
    size_t npos, nbatches;
    size_t *perm;
    int nd4;         /* transforms drawn: 8 on square tiles, 4 otherwise, 1 without d4 */
    uint32_t *d4map; /* [8][hw]: output pixel -> input pixel of each transform */
    int nslots;
    slot *slots;
    scratch *scr; /* one per worker (one in synchronous mode) */
    pthread_t *threads;
    worker_arg *args;
    int nthreads; /* threads actually started */

    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* workers: a position may be available */
    pthread_cond_t done_cv; /* caller: a sample finished */
    pthread_cond_t idle_cv; /* begin_epoch: no callback in progress */
    int shutdown;
    int running; /* an epoch is under way (begin_epoch was called) */
    int stopped; /* a read failed: no new positions are handed out */
    int epoch;
    unsigned gen; /* bumped by begin_epoch: results of an older epoch are dropped */
    int active;   /* callbacks in progress */
    size_t next_pos, released, next_batch;
    int held; /* the caller holds batch next_batch - 1 */
    ts_status fail;
    char fail_msg[LOADER_MSG];
};

/* ---- random streams (splitmix64) ---- */
static uint64_t mix64(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t stream_seed(uint64_t seed, uint64_t domain, uint64_t epoch, uint64_t pos)
{
    return mix64(mix64(mix64(seed ^ domain) ^ epoch) ^ pos);
}

static uint64_t rng_next(uint64_t *s)
{
    *s += 0x9E3779B97F4A7C15ull;
    uint64_t z = *s;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1) with 53 bits. */
static double u01(uint64_t v) { return (double)(v >> 11) * 0x1.0p-53; }

/* Uniform in [0, n), without modulo bias. */
static uint64_t rng_below(uint64_t *s, uint64_t n)
{
    uint64_t limit = UINT64_MAX - UINT64_MAX % n, v;
    do v = rng_next(s);
    while (v >= limit);
    return v % n;
}

static void epoch_order(const ts_loader *l, int epoch, size_t *perm)
{
    for (size_t i = 0; i < l->n; i++) perm[i] = i;
    if (!l->o.shuffle) return;
    uint64_t s = stream_seed(l->o.seed, DOMAIN_PERM, (uint64_t)epoch, 0);
    for (size_t i = l->n; i > 1; i--) {
        size_t j = (size_t)rng_below(&s, i);
        size_t t = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = t;
    }
}

/* ---- augmentation ---- */
static void d4_build(uint32_t *map, int t, int H, int W)
{
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            int r = (t & 4) ? x : y, c = (t & 4) ? y : x;
            if (t & 2) r = H - 1 - r;
            if (t & 1) c = W - 1 - c;
            map[(size_t)y * W + x] = (uint32_t)((size_t)r * W + c);
        }
}

static void augment(const ts_loader *l, int epoch, size_t pos, float *img, int32_t *mask, uint8_t *valid,
                    scratch *s, int *transform)
{
    const ts_augment_opts *a = &l->o.aug;
    const size_t hw = l->hw;
    const int C = l->o.channels;
    /* Fixed draws first, so turning one step on or off does not move the others. */
    uint64_t r = stream_seed(l->o.seed, DOMAIN_AUG, (uint64_t)epoch, (uint64_t)pos);
    uint64_t d_t = rng_next(&r), d_c = rng_next(&r), d_b = rng_next(&r);

    int t = l->nd4 > 1 ? (int)(d_t % (uint64_t)l->nd4) : 0;
    *transform = t;
    if (t) {
        const uint32_t *map = l->d4map + (size_t)t * hw;
        for (int c = 0; c < C; c++) {
            float *p = img + (size_t)c * hw;
            for (size_t k = 0; k < hw; k++) s->f[k] = p[map[k]];
            memcpy(p, s->f, hw * sizeof *p);
        }
        if (mask) {
            for (size_t k = 0; k < hw; k++) s->i[k] = mask[map[k]];
            memcpy(mask, s->i, hw * sizeof *mask);
        }
        for (size_t k = 0; k < hw; k++) s->u[k] = valid[map[k]];
        memcpy(valid, s->u, hw);
    }

    if (a->contrast > 0) {
        float f = (float)(1.0 + (double)a->contrast * (2.0 * u01(d_c) - 1.0));
        for (int c = 0; c < C; c++) {
            float *p = img + (size_t)c * hw;
            double sum = 0;
            size_t cnt = 0;
            for (size_t k = 0; k < hw; k++)
                if (valid[k]) {
                    sum += p[k];
                    cnt++;
                }
            if (!cnt) break; /* no valid pixel: nothing to do in any channel */
            float m = (float)(sum / (double)cnt);
            for (size_t k = 0; k < hw; k++)
                if (valid[k]) p[k] = m + f * (p[k] - m);
        }
    }
    if (a->brightness > 0) {
        float b = (float)((double)a->brightness * (2.0 * u01(d_b) - 1.0));
        for (int c = 0; c < C; c++) {
            float *p = img + (size_t)c * hw;
            for (size_t k = 0; k < hw; k++)
                if (valid[k]) p[k] += b;
        }
    }
    if (a->noise_std > 0) {
        /* Marsaglia's polar method, in double, two values per accepted pair, in value order. */
        const double sd = a->noise_std;
        double spare = 0;
        int have = 0;
        for (int c = 0; c < C; c++) {
            float *p = img + (size_t)c * hw;
            for (size_t k = 0; k < hw; k++) {
                if (!valid[k]) continue;
                double z;
                if (have) {
                    z = spare;
                    have = 0;
                } else {
                    double v1, v2, q;
                    do {
                        v1 = 2.0 * u01(rng_next(&r)) - 1.0;
                        v2 = 2.0 * u01(rng_next(&r)) - 1.0;
                        q = v1 * v1 + v2 * v2;
                    } while (q >= 1.0 || q == 0.0);
                    double m = sqrt(-2.0 * log(q) / q);
                    z = v1 * m;
                    spare = v2 * m;
                    have = 1;
                }
                p[k] = (float)((double)p[k] + sd * z);
            }
        }
    }
}

/* Reads and augments the sample at position pos into sample i of slot sl.
 * On failure writes the wrapped message into msg. */
static ts_status fill_sample(ts_loader *l, int worker, int epoch, size_t pos, slot *sl, int i, scratch *s)
{
    size_t idx = l->perm[pos];
    const ts_window *w = &l->windows[idx];
    float *img = sl->image + (size_t)i * l->chw;
    int32_t *mask = sl->mask ? sl->mask + (size_t)i * l->hw : NULL;
    uint8_t *valid = sl->valid + (size_t)i * l->hw;
    memset(img, 0, l->chw * sizeof *img);
    if (mask) memset(mask, 0, l->hw * sizeof *mask);
    memset(valid, 1, l->hw);
    sl->transforms[i] = 0;
    ts_clear_error();
    ts_status st = l->fn(l->user, worker, idx, w, img, mask, valid);
    if (st != TS_OK) {
        const char *cause = ts_last_error();
        char why[LOADER_MSG];
        if (!cause[0])
            snprintf(why, sizeof why, "the read callback returned \"%s\" without a message", ts_status_name(st));
        else
            snprintf(why, sizeof why, "%s", cause);
        size_t b = pos / (size_t)l->o.batch_size;
        snprintf(s->msg, sizeof s->msg,
                 "loader: reading sample %zu (window col_off %lld, row_off %lld, %dx%d; epoch %d, position %zu, "
                 "batch %zu) failed: %.700s [fix or exclude that window]",
                 idx, (long long)w->col_off, (long long)w->row_off, w->width, w->height, epoch, pos, b, why);
        return st;
    }
    augment(l, epoch, pos, img, mask, valid, s, &sl->transforms[i]);
    return TS_OK;
}

static void slot_reset(slot *sl, size_t batch)
{
    sl->batch = batch;
    sl->done = 0;
    sl->err = TS_OK;
    sl->err_pos = SIZE_MAX;
    sl->err_msg[0] = '\0';
}

static void slot_record(slot *sl, size_t pos, ts_status st, const char *msg)
{
    sl->done++;
    if (st != TS_OK && pos < sl->err_pos) {
        sl->err = st;
        sl->err_pos = pos;
        snprintf(sl->err_msg, sizeof sl->err_msg, "%s", msg);
    }
}

static size_t batch_len(const ts_loader *l, size_t b)
{
    size_t start = b * (size_t)l->o.batch_size, end = start + (size_t)l->o.batch_size;
    if (end > l->npos) end = l->npos;
    return end - start;
}

/* Samples of batch b that were or will be handed out. */
static size_t batch_expected(const ts_loader *l, size_t b)
{
    size_t start = b * (size_t)l->o.batch_size, len = batch_len(l, b);
    if (!l->stopped) return len;
    if (l->next_pos <= start) return 0;
    return l->next_pos - start < len ? l->next_pos - start : len;
}

static int can_take(const ts_loader *l)
{
    return l->running && !l->stopped && l->next_pos < l->npos &&
           l->next_pos / (size_t)l->o.batch_size < l->released + (size_t)l->nslots;
}

static void *worker_main(void *arg)
{
    worker_arg *wa = arg;
    ts_loader *l = wa->l;
    scratch *s = &l->scr[wa->id];
    pthread_mutex_lock(&l->mu);
    for (;;) {
        while (!l->shutdown && !can_take(l)) pthread_cond_wait(&l->work_cv, &l->mu);
        if (l->shutdown) break;
        size_t pos = l->next_pos++;
        size_t b = pos / (size_t)l->o.batch_size;
        int i = (int)(pos % (size_t)l->o.batch_size);
        slot *sl = &l->slots[b % (size_t)l->nslots];
        if (i == 0) slot_reset(sl, b);
        sl->indices[i] = l->perm[pos];
        unsigned gen = l->gen;
        int epoch = l->epoch;
        l->active++;
        pthread_mutex_unlock(&l->mu);

        ts_status st = fill_sample(l, wa->id, epoch, pos, sl, i, s);

        pthread_mutex_lock(&l->mu);
        l->active--;
        if (gen == l->gen) {
            if (st != TS_OK) l->stopped = 1;
            slot_record(sl, pos, st, s->msg);
            pthread_cond_broadcast(&l->done_cv);
        }
        if (l->active == 0) pthread_cond_broadcast(&l->idle_cv);
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

/* ---- public API ---- */
static void loader_free(ts_loader *l)
{
    if (l->slots)
        for (int s = 0; s < l->nslots; s++) {
            ts_aligned_free(l->slots[s].image);
            ts_aligned_free(l->slots[s].mask);
            ts_aligned_free(l->slots[s].valid);
            free(l->slots[s].indices);
            free(l->slots[s].transforms);
        }
    if (l->scr)
        for (int w = 0; w < (l->o.workers > 0 ? l->o.workers : 1); w++) {
            ts_aligned_free(l->scr[w].f);
            ts_aligned_free(l->scr[w].i);
            ts_aligned_free(l->scr[w].u);
        }
    free(l->slots);
    free(l->scr);
    free(l->threads);
    free(l->args);
    ts_aligned_free(l->d4map);
    free(l->perm);
    free(l->windows);
    pthread_cond_destroy(&l->work_cv);
    pthread_cond_destroy(&l->done_cv);
    pthread_cond_destroy(&l->idle_cv);
    pthread_mutex_destroy(&l->mu);
    free(l);
}

static ts_status check_opts(const ts_loader_opts *o)
{
    if (o->channels < 1 || o->channels > LOADER_MAX_CHANNELS || o->height < 1 || o->height > LOADER_MAX_SIDE ||
        o->width < 1 || o->width > LOADER_MAX_SIDE)
        return ts_error(TS_ERR_INVALID_ARG,
                        "loader: tile shape channels %d, height %d, width %d is out of range (channels 1..%d, "
                        "height and width 1..%d)",
                        o->channels, o->height, o->width, LOADER_MAX_CHANNELS, LOADER_MAX_SIDE);
    if (o->batch_size < 1)
        return ts_error(TS_ERR_INVALID_ARG, "loader: batch size %d must be at least 1", o->batch_size);
    if (o->workers < 0 || o->workers > LOADER_MAX_WORKERS)
        return ts_error(TS_ERR_INVALID_ARG,
                        "loader: %d workers is out of range (0 = read in the caller's thread, up to %d)",
                        o->workers, LOADER_MAX_WORKERS);
    if (o->prefetch < 0 || o->prefetch > LOADER_MAX_PREFETCH)
        return ts_error(TS_ERR_INVALID_ARG, "loader: prefetch %d is out of range (1..%d batches, 0 = the default 2)",
                        o->prefetch, LOADER_MAX_PREFETCH);
    const ts_augment_opts *a = &o->aug;
    if (!(a->contrast >= 0 && a->contrast <= 1))
        return ts_error(TS_ERR_INVALID_ARG, "loader: contrast %g must be in [0, 1] (factors are drawn from [1-c, 1+c])",
                        (double)a->contrast);
    if (!(a->brightness >= 0 && isfinite(a->brightness)))
        return ts_error(TS_ERR_INVALID_ARG,
                        "loader: brightness %g must be finite and >= 0 (shifts are drawn from [-b, b])",
                        (double)a->brightness);
    if (!(a->noise_std >= 0 && isfinite(a->noise_std)))
        return ts_error(TS_ERR_INVALID_ARG, "loader: noise standard deviation %g must be finite and >= 0",
                        (double)a->noise_std);
    /* One batch buffer must be addressable: B * C * H * W floats. */
    double bytes = (double)o->batch_size * ((double)o->channels * 4 + 5) * o->height * o->width;
    if (bytes > (double)SIZE_MAX / 4 || (double)o->batch_size * o->channels * o->height * o->width > 2147483647.0)
        return ts_error(TS_ERR_INVALID_ARG,
                        "loader: a batch of %d x %d x %d x %d is too large; use a smaller batch size or tile",
                        o->batch_size, o->channels, o->height, o->width);
    return TS_OK;
}

ts_status ts_loader_create(const ts_loader_opts *opts, const ts_window *windows, size_t n, ts_sample_read_fn fn,
                           void *user, ts_loader **out)
{
    if (!out) return ts_error(TS_ERR_INVALID_ARG, "loader: out is NULL");
    *out = NULL;
    if (!opts || !fn) return ts_error(TS_ERR_INVALID_ARG, "loader: options and a read callback are required");
    ts_status st = check_opts(opts);
    if (st) return st;
    if (n == 0 || !windows)
        return ts_error(TS_ERR_INVALID_ARG,
                        "loader: no windows to load (were they all filtered out, e.g. as nodata?); give at least one");
    for (size_t i = 0; i < n; i++)
        if (windows[i].width != opts->width || windows[i].height != opts->height)
            return ts_error(TS_ERR_INVALID_ARG,
                            "loader: window %zu (col_off %lld, row_off %lld) is %dx%d (width x height) but the tiles "
                            "are %dx%d; every window must have the tile size (make the windows with this tile size, "
                            "or drop or pad the edge windows)",
                            i, (long long)windows[i].col_off, (long long)windows[i].row_off, windows[i].width,
                            windows[i].height, opts->width, opts->height);
    size_t B = (size_t)opts->batch_size;
    if (opts->drop_last && n < B)
        return ts_error(TS_ERR_INVALID_ARG,
                        "loader: %zu windows are fewer than the batch size %d, so drop_last leaves no batch; lower "
                        "the batch size or turn drop_last off",
                        n, opts->batch_size);

    ts_loader *l = calloc(1, sizeof *l);
    if (!l) return ts_error(TS_ERR_NOMEM, "loader: out of memory");
    l->o = *opts;
    if (l->o.prefetch == 0) l->o.prefetch = 2;
    l->n = n;
    l->fn = fn;
    l->user = user;
    l->hw = (size_t)opts->height * (size_t)opts->width;
    l->chw = (size_t)opts->channels * l->hw;
    l->npos = opts->drop_last ? n / B * B : n;
    l->nbatches = (l->npos + B - 1) / B;
    l->nslots = opts->workers > 0 ? l->o.prefetch + 1 : 1;
    l->nd4 = !opts->aug.d4 ? 1 : opts->height == opts->width ? 8 : 4;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->work_cv, NULL);
    pthread_cond_init(&l->done_cv, NULL);
    pthread_cond_init(&l->idle_cv, NULL);

    int nscr = opts->workers > 0 ? opts->workers : 1;
    l->windows = malloc(n * sizeof *l->windows);
    l->perm = malloc(n * sizeof *l->perm);
    l->slots = calloc((size_t)l->nslots, sizeof *l->slots);
    l->scr = calloc((size_t)nscr, sizeof *l->scr);
    int ok = l->windows && l->perm && l->slots && l->scr;
    if (ok && l->nd4 > 1) {
        l->d4map = ts_aligned_alloc((size_t)l->nd4 * l->hw * sizeof *l->d4map);
        ok = l->d4map != NULL;
        for (int t = 0; ok && t < l->nd4; t++) d4_build(l->d4map + (size_t)t * l->hw, t, opts->height, opts->width);
    }
    for (int s = 0; ok && s < l->nslots; s++) {
        slot *sl = &l->slots[s];
        sl->image = ts_aligned_alloc(B * l->chw * sizeof(float));
        sl->mask = opts->skip_mask ? NULL : ts_aligned_alloc(B * l->hw * sizeof(int32_t));
        sl->valid = ts_aligned_alloc(B * l->hw);
        sl->indices = malloc(B * sizeof *sl->indices);
        sl->transforms = malloc(B * sizeof *sl->transforms);
        ok = sl->image && (sl->mask || opts->skip_mask) && sl->valid && sl->indices && sl->transforms;
        slot_reset(sl, SIZE_MAX);
    }
    for (int w = 0; ok && w < nscr; w++) {
        if (l->nd4 <= 1) break; /* scratch only serves the D4 gather */
        l->scr[w].f = ts_aligned_alloc(l->hw * sizeof(float));
        l->scr[w].i = ts_aligned_alloc(l->hw * sizeof(int32_t));
        l->scr[w].u = ts_aligned_alloc(l->hw);
        ok = l->scr[w].f && l->scr[w].i && l->scr[w].u;
    }
    if (!ok) {
        loader_free(l);
        return ts_error(TS_ERR_NOMEM,
                        "loader: out of memory for %d batch buffers of %d x %d x %d x %d; lower the batch size, the "
                        "prefetch depth or the tile size",
                        opts->workers > 0 ? opts->prefetch + 1 : 1, opts->batch_size, opts->channels, opts->height,
                        opts->width);
    }
    memcpy(l->windows, windows, n * sizeof *l->windows);
    epoch_order(l, 0, l->perm);

    if (opts->workers > 0) {
        l->threads = calloc((size_t)opts->workers, sizeof *l->threads);
        l->args = calloc((size_t)opts->workers, sizeof *l->args);
        if (!l->threads || !l->args) {
            loader_free(l);
            return ts_error(TS_ERR_NOMEM, "loader: out of memory");
        }
        for (int w = 0; w < opts->workers; w++) {
            l->args[w].l = l;
            l->args[w].id = w;
            int rc = pthread_create(&l->threads[w], NULL, worker_main, &l->args[w]);
            if (rc) {
                ts_loader_destroy(l);
                return ts_error(TS_ERR_BACKEND,
                                "loader: could not start worker thread %d of %d (%s); use fewer workers, or 0 to read "
                                "in the caller's thread",
                                w + 1, opts->workers, strerror(rc));
            }
            l->nthreads++;
        }
    }
    *out = l;
    return TS_OK;
}

size_t ts_loader_batches_per_epoch(const ts_loader *l) { return l ? l->nbatches : 0; }

ts_status ts_loader_epoch_order(const ts_loader *l, int epoch, size_t *perm)
{
    if (!l || !perm) return ts_error(TS_ERR_INVALID_ARG, "loader: epoch_order needs a loader and an output array");
    if (epoch < 0) return ts_error(TS_ERR_INVALID_ARG, "loader: epoch %d must be >= 0", epoch);
    epoch_order(l, epoch, perm);
    return TS_OK;
}

ts_status ts_loader_begin_epoch(ts_loader *l, int epoch, size_t start_batch)
{
    if (!l) return ts_error(TS_ERR_INVALID_ARG, "loader: begin_epoch on a NULL loader");
    if (epoch < 0) return ts_error(TS_ERR_INVALID_ARG, "loader: epoch %d must be >= 0", epoch);
    if (start_batch > l->nbatches)
        return ts_error(TS_ERR_INVALID_ARG,
                        "loader: cannot start epoch %d at batch %zu: an epoch has %zu batches (%zu windows, batch size "
                        "%d%s); was the checkpoint written with another window list or batch size?",
                        epoch, start_batch, l->nbatches, l->n, l->o.batch_size, l->o.drop_last ? ", drop_last" : "");
    pthread_mutex_lock(&l->mu);
    /* Abandon the current epoch: no new positions, wait for the callbacks in
     * progress (they write into the slots), drop their results. */
    l->running = 0;
    l->gen++;
    while (l->active > 0) pthread_cond_wait(&l->idle_cv, &l->mu);
    epoch_order(l, epoch, l->perm);
    for (int s = 0; s < l->nslots; s++) slot_reset(&l->slots[s], SIZE_MAX);
    l->epoch = epoch;
    l->next_pos = start_batch * (size_t)l->o.batch_size;
    l->released = l->next_batch = start_batch;
    l->held = 0;
    l->stopped = 0;
    l->fail = TS_OK;
    l->fail_msg[0] = '\0';
    l->running = 1;
    pthread_cond_broadcast(&l->work_cv);
    pthread_mutex_unlock(&l->mu);
    return TS_OK;
}

static void deliver(ts_loader *l, const slot *sl, size_t b, ts_batch *out)
{
    int len = (int)batch_len(l, b);
    out->image = ts_tensor_view(sl->image, len, l->o.channels, l->o.height, l->o.width);
    out->mask = sl->mask;
    out->valid = sl->valid;
    out->indices = sl->indices;
    out->transforms = sl->transforms;
    out->size = len;
    out->epoch = l->epoch;
    out->batch = b;
}

ts_status ts_loader_next(ts_loader *l, ts_batch *out, int *end_of_epoch)
{
    if (!l || !out || !end_of_epoch)
        return ts_error(TS_ERR_INVALID_ARG, "loader: next needs a loader, a batch and an end flag");
    memset(out, 0, sizeof *out);
    *end_of_epoch = 0;
    pthread_mutex_lock(&l->mu);
    if (l->held) { /* the caller is done with the previous batch */
        l->held = 0;
        l->released = l->next_batch;
        pthread_cond_broadcast(&l->work_cv);
    }
    if (!l->running) {
        pthread_mutex_unlock(&l->mu);
        return ts_error(TS_ERR_INVALID_ARG, "loader: no epoch under way; call ts_loader_begin_epoch first");
    }
    if (l->fail != TS_OK) {
        pthread_mutex_unlock(&l->mu);
        return ts_error(l->fail, "%s", l->fail_msg);
    }
    out->epoch = l->epoch;
    if (l->next_batch >= l->nbatches) {
        out->batch = l->next_batch;
        *end_of_epoch = 1;
        pthread_mutex_unlock(&l->mu);
        return TS_OK;
    }
    size_t b = l->next_batch;
    slot *sl = &l->slots[b % (size_t)l->nslots];

    if (l->nthreads == 0) {
        /* Synchronous: read the batch here, in order, stopping at the first failure. */
        pthread_mutex_unlock(&l->mu);
        slot_reset(sl, b);
        size_t start = b * (size_t)l->o.batch_size, len = batch_len(l, b);
        for (size_t i = 0; i < len; i++) {
            sl->indices[i] = l->perm[start + i];
            ts_status st = fill_sample(l, 0, l->epoch, start + i, sl, (int)i, &l->scr[0]);
            slot_record(sl, start + i, st, l->scr[0].msg);
            if (st != TS_OK) break;
        }
        pthread_mutex_lock(&l->mu);
    } else {
        for (;;) {
            size_t want = batch_expected(l, b);
            if (want == 0) { /* cannot happen: a stop leaves the failing batch handed out */
                pthread_mutex_unlock(&l->mu);
                return ts_error(TS_ERR_BACKEND, "loader: internal error: batch %zu of epoch %d was never read", b,
                                l->epoch);
            }
            if (sl->batch == b && (size_t)sl->done == want) break;
            pthread_cond_wait(&l->done_cv, &l->mu);
        }
    }
    if (sl->err != TS_OK) {
        l->fail = sl->err;
        snprintf(l->fail_msg, sizeof l->fail_msg, "%s", sl->err_msg);
        pthread_mutex_unlock(&l->mu);
        return ts_error(l->fail, "%s", l->fail_msg);
    }
    deliver(l, sl, b, out);
    l->next_batch++;
    l->held = 1;
    pthread_mutex_unlock(&l->mu);
    return TS_OK;
}

void ts_loader_destroy(ts_loader *l)
{
    if (!l) return;
    pthread_mutex_lock(&l->mu);
    l->shutdown = 1;
    l->running = 0;
    pthread_cond_broadcast(&l->work_cv);
    pthread_mutex_unlock(&l->mu);
    for (int w = 0; w < l->nthreads; w++) pthread_join(l->threads[w], NULL);
    loader_free(l);
}
