/* The batch loader (io/loader.h) with a synthetic read callback whose pixels,
 * labels and valid flags are a function of the window index and position:
 * order and contents, drop_last and the last batch, shuffling as a
 * (seed, epoch)-only permutation, bit-identical batches for 0/1/2/4 workers
 * and several prefetch depths with every augmentation on and workers that
 * finish out of order, exact resume from any batch, each D4 transform
 * against a naive reference (image, mask and valid alike; no rotations on
 * non-square tiles), photometric steps on valid pixels only and never on
 * masks, noise statistics, error propagation (the message names the sample
 * and window; the same failure for any worker count), abandoning an epoch,
 * destroying with workers blocked, and the option checks. */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "io/loader.h"
#include "testutil.h"

/* ---- the synthetic data set ---- */
typedef struct synth {
    int C, H, W;
    const size_t *fail; /* window indices whose read fails */
    int nfail;
    int jitter_us;  /* index-dependent delay, so workers finish out of order */
    int slow_us;    /* a fixed delay per read */
    size_t slow_index; /* this window's read takes slow_index_us longer */
    int slow_index_us;
    atomic_uint workers_seen;
    atomic_int calls;
    atomic_int null_mask_calls;
    atomic_int bad_prefill;
} synth;

static void synth_init(synth *s, int C, int H, int W)
{
    memset(s, 0, sizeof *s);
    s->C = C;
    s->H = H;
    s->W = W;
    atomic_init(&s->workers_seen, 0);
    atomic_init(&s->calls, 0);
    atomic_init(&s->null_mask_calls, 0);
    atomic_init(&s->bad_prefill, 0);
}

/* Distinct values per (channel, pixel), exact in float. */
static float synth_pixel(size_t idx, const ts_window *w, int c, int y, int x)
{
    return (float)(c * 1000 + y * 64 + x) + (float)(idx % 64) * 0.5f + (float)(w->col_off % 8) * 0.125f;
}
static int32_t synth_label(size_t idx, int y, int x, int W) { return (int32_t)(idx * 10000 + (size_t)y * W + x); }
static uint8_t synth_valid(size_t idx, int y, int x) { return ((size_t)x + 2 * (size_t)y + idx) % 7 != 0; }

static void synth_raw(const synth *s, size_t idx, const ts_window *w, float *img, int32_t *mask, uint8_t *valid)
{
    for (int c = 0; c < s->C; c++)
        for (int y = 0; y < s->H; y++)
            for (int x = 0; x < s->W; x++) img[((size_t)c * s->H + y) * s->W + x] = synth_pixel(idx, w, c, y, x);
    for (int y = 0; y < s->H; y++)
        for (int x = 0; x < s->W; x++) {
            if (mask) mask[(size_t)y * s->W + x] = synth_label(idx, y, x, s->W);
            valid[(size_t)y * s->W + x] = synth_valid(idx, y, x);
        }
}

static void sleep_us(int us)
{
    if (us <= 0) return;
    struct timespec ts = {us / 1000000, (long)(us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static ts_status synth_read(void *user, int worker, size_t index, const ts_window *w, float *image, int32_t *mask,
                            uint8_t *valid)
{
    synth *s = user;
    atomic_fetch_add(&s->calls, 1);
    atomic_fetch_or(&s->workers_seen, 1u << (worker & 31));
    if (!mask) atomic_fetch_add(&s->null_mask_calls, 1);
    /* The loader hands over image 0, mask 0, valid 1. */
    size_t hw = (size_t)s->H * s->W;
    if (image[0] != 0.0f || image[(size_t)s->C * hw - 1] != 0.0f || valid[0] != 1 || valid[hw - 1] != 1 ||
        (mask && (mask[0] != 0 || mask[hw - 1] != 0)))
        atomic_fetch_add(&s->bad_prefill, 1);
    if (s->slow_index_us && index == s->slow_index) sleep_us(s->slow_index_us);
    sleep_us(s->slow_us + (s->jitter_us ? (int)((index * 7919) % 5) * s->jitter_us / 4 : 0));
    for (int k = 0; k < s->nfail; k++)
        if (s->fail[k] == index)
            return ts_error(TS_ERR_IO, "synthetic read of tile %zu failed on purpose (check the test's fail list)",
                            index);
    synth_raw(s, index, w, image, mask, valid);
    return TS_OK;
}

static ts_window *make_windows(size_t n, int H, int W)
{
    ts_window *w = malloc(n * sizeof *w);
    for (size_t i = 0; i < n; i++) {
        w[i].col_off = (int64_t)(i % 7) * W + 3;
        w[i].row_off = (int64_t)(i / 7) * H + 5;
        w[i].width = W;
        w[i].height = H;
    }
    return w;
}

static ts_loader_opts base_opts(int C, int H, int W, int B, int workers)
{
    ts_loader_opts o;
    memset(&o, 0, sizeof o);
    o.channels = C;
    o.height = H;
    o.width = W;
    o.batch_size = B;
    o.workers = workers;
    o.seed = 1234;
    return o;
}

/* ---- a captured epoch: every batch's contents, concatenated ---- */
typedef struct capture {
    size_t nbatch, nsample;
    int sizes[256];
    size_t batchno[256];
    float *img;
    int32_t *mask;
    uint8_t *valid;
    size_t *idx;
    int *t;
    ts_status st;
    char msg[1024];
    int end_seen;
} capture;

static void capture_alloc(capture *c, size_t maxn, const synth *s)
{
    memset(c, 0, sizeof *c);
    size_t hw = (size_t)s->H * s->W;
    c->img = calloc(maxn * s->C * hw, sizeof(float));
    c->mask = calloc(maxn * hw, sizeof(int32_t));
    c->valid = calloc(maxn * hw, 1);
    c->idx = calloc(maxn, sizeof(size_t));
    c->t = calloc(maxn, sizeof(int));
}

static void capture_free(capture *c)
{
    free(c->img);
    free(c->mask);
    free(c->valid);
    free(c->idx);
    free(c->t);
}

/* Runs epoch `epoch` from start_batch to its end (or its first error). */
static void capture_epoch(ts_loader *l, const synth *s, int epoch, size_t start, capture *c)
{
    size_t hw = (size_t)s->H * s->W, chw = (size_t)s->C * hw;
    c->nbatch = c->nsample = 0;
    c->st = TS_OK;
    c->msg[0] = '\0';
    c->end_seen = 0;
    ts_status st = ts_loader_begin_epoch(l, epoch, start);
    if (st) {
        c->st = st;
        snprintf(c->msg, sizeof c->msg, "%s", ts_last_error());
        return;
    }
    for (;;) {
        ts_batch b;
        int end = 0;
        st = ts_loader_next(l, &b, &end);
        if (st) {
            c->st = st;
            snprintf(c->msg, sizeof c->msg, "%s", ts_last_error());
            return;
        }
        if (end) {
            c->end_seen = 1;
            return;
        }
        if (c->nbatch >= 256) return;
        c->sizes[c->nbatch] = b.size;
        c->batchno[c->nbatch] = b.batch;
        c->nbatch++;
        memcpy(c->img + c->nsample * chw, b.image.data, (size_t)b.size * chw * sizeof(float));
        if (b.mask) memcpy(c->mask + c->nsample * hw, b.mask, (size_t)b.size * hw * sizeof(int32_t));
        memcpy(c->valid + c->nsample * hw, b.valid, (size_t)b.size * hw);
        memcpy(c->idx + c->nsample, b.indices, (size_t)b.size * sizeof(size_t));
        memcpy(c->t + c->nsample, b.transforms, (size_t)b.size * sizeof(int));
        c->nsample += (size_t)b.size;
    }
}

/* Whether b equals a's samples from sample `from` on (bitwise). */
static int capture_tail_equal(const capture *a, size_t from, size_t from_batch, const capture *b, const synth *s)
{
    size_t hw = (size_t)s->H * s->W, chw = (size_t)s->C * hw;
    if (a->nsample - from != b->nsample || a->nbatch - from_batch != b->nbatch) return 0;
    for (size_t k = 0; k < b->nbatch; k++)
        if (a->sizes[from_batch + k] != b->sizes[k] || a->batchno[from_batch + k] != b->batchno[k]) return 0;
    size_t n = b->nsample;
    return !memcmp(a->img + from * chw, b->img, n * chw * sizeof(float)) &&
           !memcmp(a->mask + from * hw, b->mask, n * hw * sizeof(int32_t)) &&
           !memcmp(a->valid + from * hw, b->valid, n * hw) && !memcmp(a->idx + from, b->idx, n * sizeof(size_t)) &&
           !memcmp(a->t + from, b->t, n * sizeof(int));
}

/* ---- naive D4 reference: whole-array flips, then the transpose ---- */
static void ref_d4_plane(double *out, const double *in, int t, int H, int W)
{
    size_t hw = (size_t)H * W;
    double *a = malloc(hw * sizeof *a);
    for (int y = 0; y < H; y++) /* left-right, then up-down */
        for (int x = 0; x < W; x++) {
            int sy = (t & 2) ? H - 1 - y : y, sx = (t & 1) ? W - 1 - x : x;
            a[(size_t)y * W + x] = in[(size_t)sy * W + sx];
        }
    if (t & 4) /* transpose: the result is W x H */
        for (int y = 0; y < W; y++)
            for (int x = 0; x < H; x++) out[(size_t)y * H + x] = a[(size_t)x * W + y];
    else
        memcpy(out, a, hw * sizeof *a);
    free(a);
}

/* Checks sample k of capture c (no photometric steps) against the raw data
 * under its recorded transform. Returns 1 when it matches. */
static int check_d4_sample(const capture *c, size_t k, const synth *s, const ts_window *wins)
{
    size_t hw = (size_t)s->H * s->W, chw = (size_t)s->C * hw;
    size_t idx = c->idx[k];
    int t = c->t[k];
    float *img = malloc(chw * sizeof *img);
    int32_t *mask = malloc(hw * sizeof *mask);
    uint8_t *valid = malloc(hw);
    double *in = malloc(hw * sizeof *in), *out = malloc(hw * sizeof *out);
    synth_raw(s, idx, &wins[idx], img, mask, valid);
    int ok = 1;
    for (int ch = 0; ch < s->C + 2 && ok; ch++) {
        for (size_t q = 0; q < hw; q++)
            in[q] = ch < s->C ? img[(size_t)ch * hw + q] : ch == s->C ? (double)mask[q] : (double)valid[q];
        ref_d4_plane(out, in, t, s->H, s->W);
        for (size_t q = 0; q < hw && ok; q++) {
            double got = ch < s->C ? c->img[k * chw + (size_t)ch * hw + q]
                         : ch == s->C ? (double)c->mask[k * hw + q]
                                      : (double)c->valid[k * hw + q];
            if (got != out[q])
                ok = tu_expect(0, "d4: sample %zu (window %zu, transform %d) plane %d pixel %zu: got %g, want %g", k,
                               idx, t, ch, q, got, out[q]);
        }
    }
    free(img);
    free(mask);
    free(valid);
    free(in);
    free(out);
    return ok;
}

/* ---- tests ---- */
static void test_order_and_contents(void)
{
    const int C = 3, H = 5, W = 7, B = 4;
    const size_t n = 11;
    ts_window *wins = make_windows(n, H, W);
    synth s;
    synth_init(&s, C, H, W);
    s.jitter_us = 200;
    for (int workers = 0; workers <= 2; workers += 2) {
        ts_loader_opts o = base_opts(C, H, W, B, workers);
        ts_loader *l = NULL;
        if (!tu_expect_ok(ts_loader_create(&o, wins, n, synth_read, &s, &l), "create (order)")) continue;
        tu_expect(ts_loader_batches_per_epoch(l) == 3, "order: batches per epoch %zu, want 3",
                  ts_loader_batches_per_epoch(l));
        capture c;
        capture_alloc(&c, n, &s);
        capture_epoch(l, &s, 0, 0, &c);
        tu_expect(c.st == TS_OK && c.end_seen, "order workers %d: epoch ran to its end (%s)", workers, c.msg);
        tu_expect(c.nbatch == 3 && c.sizes[0] == 4 && c.sizes[1] == 4 && c.sizes[2] == 3,
                  "order workers %d: batch sizes %d %d %d, want 4 4 3", workers, c.sizes[0], c.sizes[1], c.sizes[2]);
        size_t hw = (size_t)H * W, chw = (size_t)C * hw;
        float *img = malloc(chw * sizeof *img);
        int32_t *mask = malloc(hw * sizeof *mask);
        uint8_t *valid = malloc(hw);
        int ok = 1;
        for (size_t k = 0; k < c.nsample && ok; k++) {
            synth_raw(&s, k, &wins[k], img, mask, valid);
            ok = c.idx[k] == k && c.t[k] == 0 && !memcmp(img, c.img + k * chw, chw * sizeof *img) &&
                 !memcmp(mask, c.mask + k * hw, hw * sizeof *mask) && !memcmp(valid, c.valid + k * hw, hw);
            if (!ok) tu_expect(0, "order workers %d: sample %zu differs from the callback's data", workers, k);
        }
        tu_expect(ok && c.nsample == n, "order workers %d: %zu samples equal the callback's data in order", workers,
                  c.nsample);
        for (size_t b = 0; b < c.nbatch; b++)
            tu_expect(c.batchno[b] == b, "order: batch number %zu reported as %zu", b, c.batchno[b]);
        /* After the end, next keeps saying so. */
        ts_batch bt;
        int end = 0;
        ts_status st = ts_loader_next(l, &bt, &end);
        tu_expect(st == TS_OK && end && bt.size == 0, "order: next after the end gives end_of_epoch again");
        free(img);
        free(mask);
        free(valid);
        capture_free(&c);
        ts_loader_destroy(l);
    }
    tu_expect(atomic_load(&s.bad_prefill) == 0, "callbacks got image 0, mask 0, valid 1 (%d did not)",
              atomic_load(&s.bad_prefill));
    free(wins);
}

static void test_drop_last_and_skip_mask(void)
{
    const int C = 2, H = 4, W = 4, B = 4;
    const size_t n = 10;
    ts_window *wins = make_windows(n, H, W);
    synth s;
    synth_init(&s, C, H, W);
    ts_loader_opts o = base_opts(C, H, W, B, 2);
    o.drop_last = 1;
    o.skip_mask = 1;
    o.shuffle = 1;
    ts_loader *l = NULL;
    if (tu_expect_ok(ts_loader_create(&o, wins, n, synth_read, &s, &l), "create (drop_last)")) {
        tu_expect(ts_loader_batches_per_epoch(l) == 2, "drop_last: %zu batches, want 2",
                  ts_loader_batches_per_epoch(l));
        ts_status st = ts_loader_begin_epoch(l, 0, 0);
        tu_expect_ok(st, "begin_epoch (drop_last)");
        int nb = 0, full = 1, nullmask = 1, end = 0;
        ts_batch b;
        while ((st = ts_loader_next(l, &b, &end)) == TS_OK && !end) {
            nb++;
            full &= b.size == B;
            nullmask &= b.mask == NULL;
        }
        tu_expect(st == TS_OK && nb == 2 && full, "drop_last: 2 full batches (got %d, status %s)", nb,
                  ts_status_name(st));
        tu_expect(nullmask && atomic_load(&s.null_mask_calls) == atomic_load(&s.calls),
                  "skip_mask: batch.mask and the callback's mask are NULL");
        ts_loader_destroy(l);
    }
    /* Fewer windows than a batch with drop_last: no batch at all, said clearly. */
    tu_expect_error(ts_loader_create(&o, wins, 3, synth_read, &s, &l), TS_ERR_INVALID_ARG, "drop_last with 3 < 4",
                    "drop_last", "batch size 4", NULL);
    free(wins);
}

static void test_shuffle(void)
{
    const int C = 1, H = 2, W = 2;
    const size_t n = 50;
    ts_window *wins = make_windows(n, H, W);
    synth s;
    synth_init(&s, C, H, W);
    ts_loader_opts o = base_opts(C, H, W, 8, 2);
    o.shuffle = 1;
    ts_loader *l = NULL, *l2 = NULL, *l3 = NULL;
    if (!tu_expect_ok(ts_loader_create(&o, wins, n, synth_read, &s, &l), "create (shuffle)")) return;
    ts_loader_opts o2 = o;
    o2.workers = 0;
    o2.batch_size = 3;
    o2.drop_last = 1;
    tu_expect_ok(ts_loader_create(&o2, wins, n, synth_read, &s, &l2), "create (shuffle, other batch/workers)");
    ts_loader_opts o3 = o;
    o3.seed = 99;
    tu_expect_ok(ts_loader_create(&o3, wins, n, synth_read, &s, &l3), "create (shuffle, other seed)");
    size_t p0[50], p1[50], q0[50], q1[50], r0[50];
    ts_loader_epoch_order(l, 0, p0);
    ts_loader_epoch_order(l, 1, p1);
    ts_loader_epoch_order(l2, 0, q0);
    ts_loader_epoch_order(l2, 1, q1);
    ts_loader_epoch_order(l3, 0, r0);
    int seen[50] = {0}, perm_ok = 1, identity = 1;
    for (size_t i = 0; i < n; i++) {
        if (p0[i] >= n || seen[p0[i]]++) perm_ok = 0;
        identity &= p0[i] == i;
    }
    tu_expect(perm_ok && !identity, "shuffle: epoch 0 is a permutation other than the identity");
    tu_expect(memcmp(p0, p1, sizeof p0) != 0, "shuffle: epochs 0 and 1 have different orders");
    tu_expect(!memcmp(p0, q0, sizeof p0) && !memcmp(p1, q1, sizeof p1),
              "shuffle: the order depends only on (seed, epoch), not on batch size, workers or drop_last");
    tu_expect(memcmp(p0, r0, sizeof p0) != 0, "shuffle: another seed gives another order");

    /* The batches follow the order; epoch 3 is the same whether or not 0..2 ran. */
    capture c, d;
    capture_alloc(&c, n, &s);
    capture_alloc(&d, n, &s);
    capture_epoch(l, &s, 0, 0, &c);
    tu_expect(c.st == TS_OK && c.nsample == n && !memcmp(c.idx, p0, sizeof p0),
              "shuffle: epoch 0's batches carry the windows in epoch_order's order");
    capture_epoch(l, &s, 1, 0, &c);
    capture_epoch(l, &s, 2, 0, &c);
    capture_epoch(l, &s, 3, 0, &c);
    capture_epoch(l2, &s, 3, 0, &d);
    tu_expect(d.nsample == 48 && !memcmp(c.idx, d.idx, 48 * sizeof(size_t)),
              "shuffle: epoch 3 after epochs 0-2 equals epoch 3 of a fresh loader");
    capture_free(&c);
    capture_free(&d);
    ts_loader_destroy(l);
    ts_loader_destroy(l2);
    ts_loader_destroy(l3);
    free(wins);
}

/* All augmentations on: workers 0/1/2/4 and prefetch 1..3 give the same
 * bytes; resuming at any batch gives the tail; abandoning an epoch midway
 * does not disturb the next. */
static void test_determinism_and_resume(void)
{
    const int C = 3, H = 6, W = 6, B = 5;
    const size_t n = 37;
    ts_window *wins = make_windows(n, H, W);
    synth s;
    synth_init(&s, C, H, W);
    s.jitter_us = 300;
    const int workers[] = {0, 1, 2, 4};
    const int prefetch[] = {0, 1, 2, 3};
    capture ref[2], c;
    capture_alloc(&ref[0], n, &s);
    capture_alloc(&ref[1], n, &s);
    capture_alloc(&c, n, &s);
    for (int k = 0; k < 4; k++) {
        ts_loader_opts o = base_opts(C, H, W, B, workers[k]);
        o.prefetch = prefetch[k];
        o.shuffle = 1;
        o.seed = 77;
        o.aug.d4 = 1;
        o.aug.contrast = 0.3f;
        o.aug.brightness = 0.5f;
        o.aug.noise_std = 0.25f;
        ts_loader *l = NULL;
        if (!tu_expect_ok(ts_loader_create(&o, wins, n, synth_read, &s, &l), "create (determinism)")) continue;
        for (int e = 0; e < 2; e++) {
            capture *dst = k == 0 ? &ref[e] : &c;
            capture_epoch(l, &s, e, 0, dst);
            tu_expect(dst->st == TS_OK && dst->nsample == n && dst->nbatch == 8,
                      "determinism workers %d epoch %d ran (%s)", workers[k], e, dst->msg);
            if (k > 0)
                tu_expect(capture_tail_equal(&ref[e], 0, 0, &c, &s),
                          "determinism: epoch %d with %d workers (prefetch %d) is bit-identical to synchronous", e,
                          workers[k], prefetch[k]);
        }
        if (k == 0) {
            tu_expect(memcmp(ref[0].img, ref[1].img, n * C * H * W * sizeof(float)) != 0,
                      "determinism: epochs 0 and 1 differ");
            ts_loader_destroy(l);
            continue;
        }
        /* Resume: batch j of epoch 1 onwards equals the full epoch's tail. */
        const size_t starts[] = {1, 3, 7, 8};
        for (int r = 0; r < 4; r++) {
            capture_epoch(l, &s, 1, starts[r], &c);
            size_t from = starts[r] * B < n ? starts[r] * B : n;
            tu_expect(c.st == TS_OK && c.end_seen && capture_tail_equal(&ref[1], from, starts[r], &c, &s),
                      "resume: epoch 1 from batch %zu with %d workers equals the full epoch's tail", starts[r],
                      workers[k]);
        }
        /* Abandon epoch 0 after two batches (workers are mid-flight), then run epoch 1. */
        ts_batch b;
        int end;
        tu_expect_ok(ts_loader_begin_epoch(l, 0, 0), "begin_epoch (abandon)");
        ts_loader_next(l, &b, &end);
        ts_loader_next(l, &b, &end);
        capture_epoch(l, &s, 1, 0, &c);
        tu_expect(capture_tail_equal(&ref[1], 0, 0, &c, &s),
                  "abandon: epoch 1 after abandoning epoch 0 midway is unchanged (%d workers)", workers[k]);
        ts_loader_destroy(l);
    }
    tu_expect(ts_loader_begin_epoch(NULL, 0, 0) == TS_ERR_INVALID_ARG, "begin_epoch(NULL) is an error");
    capture_free(&ref[0]);
    capture_free(&ref[1]);
    capture_free(&c);
    free(wins);
}

static void test_d4(int H, int W)
{
    const int C = 2, B = 6;
    const size_t n = 48;
    ts_window *wins = make_windows(n, H, W);
    synth s;
    synth_init(&s, C, H, W);
    ts_loader_opts o = base_opts(C, H, W, B, 2);
    o.shuffle = 1;
    o.aug.d4 = 1;
    ts_loader *l = NULL;
    if (!tu_expect_ok(ts_loader_create(&o, wins, n, synth_read, &s, &l), "create (d4)")) return;
    capture c;
    capture_alloc(&c, n, &s);
    int count[8] = {0}, ok = 1, in_range = 1;
    for (int e = 0; e < 3; e++) {
        capture_epoch(l, &s, e, 0, &c);
        for (size_t k = 0; k < c.nsample; k++) {
            if (c.t[k] < 0 || c.t[k] > 7) {
                in_range = 0;
                continue;
            }
            count[c.t[k]]++;
            if (ok) ok = check_d4_sample(&c, k, &s, wins);
        }
    }
    int kinds = H == W ? 8 : 4, all = 1;
    for (int t = 0; t < 8; t++) {
        if (t < kinds) all &= count[t] > 0;
        else all &= count[t] == 0;
    }
    tu_expect(in_range && all, "d4 %dx%d: the transforms drawn are exactly 0..%d (counts %d %d %d %d %d %d %d %d)", H,
              W, kinds - 1, count[0], count[1], count[2], count[3], count[4], count[5], count[6], count[7]);
    tu_expect(ok, "d4 %dx%d: image, mask and valid match the naive reference for every transform", H, W);

    if (H == W) {
        /* Name check: 5 is numpy.rot90 (counter-clockwise), 6 clockwise, 3 the half turn. */
        size_t k5 = SIZE_MAX, k6 = SIZE_MAX, k3 = SIZE_MAX;
        for (size_t k = 0; k < c.nsample; k++) {
            if (c.t[k] == 5 && k5 == SIZE_MAX) k5 = k;
            if (c.t[k] == 6 && k6 == SIZE_MAX) k6 = k;
            if (c.t[k] == 3 && k3 == SIZE_MAX) k3 = k;
        }
        int rot_ok = 1;
        for (int which = 0; which < 3; which++) {
            size_t k = which == 0 ? k5 : which == 1 ? k6 : k3;
            if (k == SIZE_MAX) continue;
            int32_t *m = c.mask + k * (size_t)H * W;
            size_t idx = c.idx[k];
            for (int y = 0; y < H; y++)
                for (int x = 0; x < W; x++) {
                    int sy = which == 0 ? x : which == 1 ? H - 1 - x : H - 1 - y;
                    int sx = which == 0 ? W - 1 - y : which == 1 ? y : W - 1 - x;
                    if (m[y * W + x] != synth_label(idx, sy, sx, W)) rot_ok = 0;
                }
        }
        tu_expect(rot_ok && k5 != SIZE_MAX && k6 != SIZE_MAX && k3 != SIZE_MAX,
                  "d4: transform 5 rotates counter-clockwise, 6 clockwise, 3 by 180 degrees");
    }
    capture_free(&c);
    ts_loader_destroy(l);
    free(wins);
}

/* Contrast, brightness and noise: only valid pixels change, masks and valid never. */
static void test_photometric(void)
{
    const int C = 3, H = 16, W = 16, B = 4;
    const size_t n = 24;
    const size_t hw = (size_t)H * W, chw = (size_t)C * hw;
    ts_window *wins = make_windows(n, H, W);
    synth s;
    synth_init(&s, C, H, W);
    float *img = malloc(chw * sizeof *img);
    int32_t *mask = malloc(hw * sizeof *mask);
    uint8_t *valid = malloc(hw);
    capture c;
    capture_alloc(&c, n, &s);
    for (int mode = 0; mode < 3; mode++) { /* contrast, brightness, noise */
        ts_loader_opts o = base_opts(C, H, W, B, 2);
        if (mode == 0) o.aug.contrast = 0.4f;
        if (mode == 1) o.aug.brightness = 3.0f;
        if (mode == 2) o.aug.noise_std = 2.0f;
        const char *name = mode == 0 ? "contrast" : mode == 1 ? "brightness" : "noise";
        ts_loader *l = NULL;
        if (!tu_expect_ok(ts_loader_create(&o, wins, n, synth_read, &s, &l), "create (photometric)")) continue;
        capture_epoch(l, &s, 0, 0, &c);
        int untouched_ok = 1, model_ok = 1, varies = 0;
        double sum = 0, sum2 = 0, within1 = 0, cnt = 0, worst = 0;
        for (size_t k = 0; k < c.nsample; k++) {
            synth_raw(&s, c.idx[k], &wins[c.idx[k]], img, mask, valid);
            const float *got = c.img + k * chw;
            if (memcmp(mask, c.mask + k * hw, hw * sizeof *mask) || memcmp(valid, c.valid + k * hw, hw))
                untouched_ok = 0;
            double shift = NAN, factor = NAN;
            for (int ch = 0; ch < C; ch++) {
                double m = 0, nv = 0;
                for (size_t q = 0; q < hw; q++)
                    if (valid[q]) {
                        m += img[ch * hw + q];
                        nv++;
                    }
                m /= nv;
                for (size_t q = 0; q < hw; q++) {
                    double x = img[ch * hw + q], y = got[ch * hw + q];
                    if (!valid[q]) {
                        if (y != x) untouched_ok = 0;
                        continue;
                    }
                    if (mode == 0) { /* y - m = f (x - m), f in [0.6, 1.4], one f per sample */
                        if (fabs(x - m) < 1) continue;
                        double f = (y - m) / (x - m);
                        if (isnan(factor)) factor = f;
                        double err = fabs(f - factor);
                        if (err > worst) worst = err;
                        if (f < 0.6 - 1e-3 || f > 1.4 + 1e-3 || err > 1e-3) model_ok = 0;
                        if (fabs(f - 1) > 1e-2) varies = 1;
                    } else if (mode == 1) { /* y = x + b, b in [-3, 3], one b per sample */
                        double b = y - x;
                        if (isnan(shift)) shift = b;
                        double err = fabs(b - shift);
                        if (err > worst) worst = err;
                        if (fabs(b) > 3 + 1e-3 || err > 1e-3) model_ok = 0;
                        if (fabs(b) > 1e-2) varies = 1;
                    } else {
                        double r = (y - x) / 2.0;
                        sum += r;
                        sum2 += r * r;
                        within1 += fabs(r) < 1;
                        cnt++;
                    }
                }
            }
        }
        tu_expect(untouched_ok, "%s: invalid pixels, masks and valid flags are untouched", name);
        if (mode < 2)
            tu_expect(model_ok && varies, "%s: valid pixels follow one per-sample %s in range (worst spread %.2e)",
                      name, mode == 0 ? "factor around the channel mean" : "shift", worst);
        else {
            double mean = sum / cnt, sd = sqrt(sum2 / cnt - mean * mean);
            tu_expect(cnt > 10000 && fabs(mean) < 0.03 && fabs(sd - 1) < 0.03 && fabs(within1 / cnt - 0.6827) < 0.02,
                      "noise: standardized residuals over %.0f valid values have mean %.4f, sd %.4f, %.4f within 1 "
                      "sd (want 0, 1, 0.683)",
                      cnt, mean, sd, within1 / cnt);
        }
        ts_loader_destroy(l);
    }
    capture_free(&c);
    free(img);
    free(mask);
    free(valid);
    free(wins);
}

static void test_errors(void)
{
    const int C = 2, H = 4, W = 4, B = 4;
    const size_t n = 30;
    ts_window *wins = make_windows(n, H, W);
    synth s;
    synth_init(&s, C, H, W);
    s.jitter_us = 200;
    /* Two failing windows; the one at the lower epoch position is reported. */
    ts_loader_opts o = base_opts(C, H, W, B, 0);
    o.shuffle = 1;
    size_t perm[30];
    ts_loader *l = NULL;
    if (!tu_expect_ok(ts_loader_create(&o, wins, n, synth_read, &s, &l), "create (errors)")) return;
    ts_loader_epoch_order(l, 0, perm);
    ts_loader_destroy(l);
    /* Positions 13 and 14 (batch 3) fail, and 22 (batch 5). */
    size_t fail[3] = {perm[14], perm[13], perm[22]};
    s.fail = fail;
    s.nfail = 3;
    /* The lower position fails last in time when workers read in parallel. */
    s.slow_index = perm[13];
    s.slow_index_us = 20000;
    char want_idx[64], want_win[96];
    snprintf(want_idx, sizeof want_idx, "sample %zu ", perm[13]);
    snprintf(want_win, sizeof want_win, "col_off %lld, row_off %lld, 4x4", (long long)wins[perm[13]].col_off,
             (long long)wins[perm[13]].row_off);
    const int workers[] = {0, 1, 3};
    for (int k = 0; k < 3; k++) {
        o.workers = workers[k];
        if (!tu_expect_ok(ts_loader_create(&o, wins, n, synth_read, &s, &l), "create (errors)")) continue;
        capture c;
        capture_alloc(&c, n, &s);
        capture_epoch(l, &s, 0, 0, &c);
        tu_expect(c.nbatch == 3, "errors workers %d: the 3 batches before the failing one come out (%zu)", workers[k],
                  c.nbatch);
        ts_error(c.st, "%s", c.msg);
        tu_expect_error(c.st, TS_ERR_IO, "errors: the failure comes back from next", want_idx, want_win,
                        "position 13", "batch 3", "failed on purpose", NULL);
        ts_batch b;
        int end = 0;
        tu_expect_error(ts_loader_next(l, &b, &end), TS_ERR_IO, "errors: next keeps returning the failure", want_idx,
                        NULL);
        /* Resuming after the failing batch works. */
        capture_epoch(l, &s, 0, 4, &c);
        tu_expect(c.st == TS_ERR_IO && c.nbatch == 1 && strstr(c.msg, "position 22"),
                  "errors workers %d: resuming at batch 4 gives batch 4, then the failure at position 22 (%s)",
                  workers[k], c.msg);
        capture_free(&c);
        ts_loader_destroy(l);
    }
    free(wins);
}

static ts_status silent_fail(void *user, int worker, size_t index, const ts_window *w, float *image, int32_t *mask,
                             uint8_t *valid)
{
    (void)user, (void)worker, (void)w, (void)image, (void)mask, (void)valid;
    return index == 2 ? TS_ERR_BACKEND : TS_OK;
}

static void test_options(void)
{
    const int C = 1, H = 4, W = 4;
    ts_window *wins = make_windows(6, H, W);
    synth s;
    synth_init(&s, C, H, W);
    ts_loader *l = NULL;
    ts_loader_opts o = base_opts(C, H, W, 2, 1);

    wins[3].width = 5;
    tu_expect_error(ts_loader_create(&o, wins, 6, synth_read, &s, &l), TS_ERR_INVALID_ARG,
                    "a window of another size", "window 3", "col_off 15", "5x4", "4x4", NULL);
    wins[3].width = W;
    tu_expect(l == NULL, "a failed create leaves *out NULL");
    tu_expect_error(ts_loader_create(&o, wins, 0, synth_read, &s, &l), TS_ERR_INVALID_ARG, "no windows",
                    "no windows", NULL);
    ts_loader_opts bad = o;
    bad.batch_size = 0;
    tu_expect_error(ts_loader_create(&bad, wins, 6, synth_read, &s, &l), TS_ERR_INVALID_ARG, "batch size 0",
                    "batch size 0", NULL);
    bad = o;
    bad.aug.contrast = 1.5f;
    tu_expect_error(ts_loader_create(&bad, wins, 6, synth_read, &s, &l), TS_ERR_INVALID_ARG, "contrast 1.5",
                    "contrast 1.5", NULL);
    bad = o;
    bad.aug.noise_std = -1;
    tu_expect_error(ts_loader_create(&bad, wins, 6, synth_read, &s, &l), TS_ERR_INVALID_ARG, "negative noise",
                    "noise", NULL);
    bad = o;
    bad.workers = -1;
    tu_expect_error(ts_loader_create(&bad, wins, 6, synth_read, &s, &l), TS_ERR_INVALID_ARG, "-1 workers",
                    "workers", NULL);
    tu_expect_error(ts_loader_create(&o, wins, 6, NULL, &s, &l), TS_ERR_INVALID_ARG, "no callback", "callback",
                    NULL);

    if (tu_expect_ok(ts_loader_create(&o, wins, 6, synth_read, &s, &l), "create (options)")) {
        ts_batch b;
        int end;
        tu_expect_error(ts_loader_next(l, &b, &end), TS_ERR_INVALID_ARG, "next before begin_epoch", "begin_epoch",
                        NULL);
        tu_expect_error(ts_loader_begin_epoch(l, 0, 4), TS_ERR_INVALID_ARG, "resume past the end", "batch 4",
                        "3 batches", NULL);
        tu_expect_error(ts_loader_begin_epoch(l, -1, 0), TS_ERR_INVALID_ARG, "negative epoch", "epoch -1", NULL);
        /* start_batch == batches_per_epoch: an empty remainder. */
        tu_expect_ok(ts_loader_begin_epoch(l, 0, 3), "begin_epoch at the end");
        tu_expect(ts_loader_next(l, &b, &end) == TS_OK && end, "starting at the last batch gives end_of_epoch");
        ts_loader_destroy(l);
    }
    for (int workers = 0; workers <= 2; workers += 2) {
        o.workers = workers;
        if (!tu_expect_ok(ts_loader_create(&o, wins, 6, silent_fail, NULL, &l), "create (silent)")) continue;
        capture c;
        capture_alloc(&c, 6, &s);
        capture_epoch(l, &s, 0, 0, &c);
        ts_error(c.st, "%s", c.msg);
        tu_expect_error(c.st, TS_ERR_BACKEND, "a failure without a message", "sample 2 ", "without a message",
                        "backend error", NULL);
        capture_free(&c);
        ts_loader_destroy(l);
    }
    ts_loader_destroy(NULL);
    free(wins);
}

/* Destroy with workers blocked on full slots, mid-callback, before any epoch. */
static void test_destroy(void)
{
    const int C = 2, H = 8, W = 8;
    const size_t n = 64;
    ts_window *wins = make_windows(n, H, W);
    synth s;
    synth_init(&s, C, H, W);
    s.slow_us = 500;
    ts_loader_opts o = base_opts(C, H, W, 4, 4);
    o.prefetch = 2;
    o.aug.d4 = 1;
    o.aug.noise_std = 1;
    ts_loader *l = NULL;
    for (int round = 0; round < 3; round++) {
        if (!tu_expect_ok(ts_loader_create(&o, wins, n, synth_read, &s, &l), "create (destroy)")) continue;
        if (round >= 1) tu_expect_ok(ts_loader_begin_epoch(l, 0, 0), "begin_epoch (destroy)");
        if (round == 2) {
            ts_batch b;
            int end;
            tu_expect_ok(ts_loader_next(l, &b, &end), "next (destroy)");
            sleep_us(20000); /* the workers fill the prefetch slots and block */
        }
        ts_loader_destroy(l);
        tu_expect(1, "destroy round %d returned", round);
    }
    /* The workers stopped at the prefetch depth: 1 held + 2 ahead + at most the 4 in progress. */
    tu_expect(atomic_load(&s.calls) <= (3 + 1) * 4 * 2, "prefetch bounds the read-ahead (%d reads)",
              atomic_load(&s.calls));
    unsigned seen = atomic_load(&s.workers_seen);
    tu_expect(seen != 0 && (seen & ~0xFu) == 0, "worker numbers are 0..3 (mask 0x%x)", seen);
    free(wins);
}

int main(void)
{
    test_order_and_contents();
    test_drop_last_and_skip_mask();
    test_shuffle();
    test_determinism_and_resume();
    test_d4(6, 6);
    test_d4(5, 8);
    test_photometric();
    test_errors();
    test_options();
    test_destroy();
    return tu_finish("loader");
}
