#include "io/stitch.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Final rows go to the writer in chunks of at most this many rows, so the
 * two write buffers stay small next to the accumulator ring. */
#define EMIT_ROWS 64
/* Reader threads at most (check_params); a queue holds every read slot
 * (N + 2 with a pipelined tile function). */
#define MAX_READERS 64
#define QCAP (MAX_READERS + 2)

int ts_blend_parse(const char *name)
{
    if (!name) return -1;
    if (strcasecmp(name, "gaussian") == 0) return TS_BLEND_GAUSSIAN;
    if (strcasecmp(name, "cosine") == 0 || strcasecmp(name, "hann") == 0) return TS_BLEND_COSINE;
    if (strcasecmp(name, "mean") == 0) return TS_BLEND_MEAN;
    return -1;
}

const char *ts_blend_name(ts_blend b)
{
    switch (b) {
    case TS_BLEND_GAUSSIAN: return "gaussian";
    case TS_BLEND_COSINE: return "cosine";
    case TS_BLEND_MEAN: return "mean";
    }
    return "?";
}

void ts_blend_window(ts_blend b, int tile, double *a)
{
    const double pi = 3.14159265358979323846;
    for (int i = 0; i < tile; i++) {
        double u = i + 0.5;
        switch (b) {
        case TS_BLEND_GAUSSIAN: {
            double sigma = tile / 8.0, d = u - tile / 2.0;
            a[i] = fmax(exp(-d * d / (2 * sigma * sigma)), 1e-3);
            break;
        }
        case TS_BLEND_COSINE: {
            double s = sin(pi * u / tile);
            a[i] = s * s;
            break;
        }
        case TS_BLEND_MEAN: a[i] = 1; break;
        }
    }
}

int64_t ts_reflect_index(int64_t i, int64_t n)
{
    if (n <= 1) return 0;
    const int64_t period = 2 * (n - 1);
    i %= period;
    if (i < 0) i += period;
    return i < n ? i : period - i;
}

int64_t ts_stitch_origins(int64_t size, int tile, int overlap, int64_t *origins, int64_t max_n)
{
    if (size <= tile) {
        if (max_n > 0) origins[0] = 0;
        return 1;
    }
    /* A stride below 1 would never reach the edge (check_params refuses it too). */
    const int64_t stride = tile - overlap > 0 ? tile - overlap : 1;
    /* Regular origins while a tile still ends inside; then one ending on the edge. */
    int64_t n = 0;
    for (int64_t o = 0;; o += stride) {
        if (o + tile >= size) {
            if (n < max_n) origins[n] = size - tile;
            return n + 1;
        }
        if (n < max_n) origins[n] = o;
        n++;
    }
}

static ts_status check_params(const ts_stitch_params *p)
{
    if (p->width < 1 || p->height < 1)
        return ts_error(TS_ERR_INVALID_ARG, "stitch: scene size %lldx%lld", (long long)p->width, (long long)p->height);
    if (p->channels < 1 || p->classes < 1)
        return ts_error(TS_ERR_INVALID_ARG, "stitch: %d input and %d output channels", p->channels, p->classes);
    if (p->tile < 1 || p->tile > 16384) return ts_error(TS_ERR_INVALID_ARG, "stitch: tile size %d (1..16384)", p->tile);
    if (p->overlap < 0 || p->overlap >= p->tile)
        return ts_error(TS_ERR_INVALID_ARG, "stitch: overlap %d must be at least 0 and less than the tile size %d",
                        p->overlap, p->tile);
    if (p->batch < 1 || p->batch > 4096) return ts_error(TS_ERR_INVALID_ARG, "stitch: batch %d (1..4096)", p->batch);
    if (ts_blend_name(p->blend)[0] == '?') return ts_error(TS_ERR_INVALID_ARG, "stitch: unknown blend mode");
    if (p->readers < 0 || p->readers > MAX_READERS)
        return ts_error(TS_ERR_INVALID_ARG, "stitch: readers %d (0..%d; 0 is 1)", p->readers, MAX_READERS);
    return TS_OK;
}

static int64_t ring_rows(const ts_stitch_params *p) { return p->height < p->tile ? p->height : p->tile; }
static int n_readers(const ts_stitch_params *p) { return p->readers > 0 ? p->readers : 1; }
/* One slot per reader being filled and one for the batch compute works on;
 * a pipelined tile function also holds the batch it started before (see
 * PIPELINING in stitch.h). With N + 1 slots it would not deadlock (compute
 * waits only for a batch a reader has claimed with a slot of its own), but
 * while it holds two, one reader would sit idle: with one reader, reading
 * would no longer overlap compute at all. */
static int n_slots(const ts_stitch_params *p, int pipelined) { return n_readers(p) + (pipelined ? 2 : 1); }

ts_status ts_stitch_memory(const ts_stitch_params *p, int pipelined, size_t *bytes)
{
    ts_status st = check_params(p);
    if (st) return st;
    const double K = p->classes, C = p->channels, T = p->tile, W = (double)p->width, N = n_readers(p);
    const double S = n_slots(p, pipelined);
    /* ring, write buffers, S read slots and a scratch tile per reader,
     * the tile function's output, the weights (see MEMORY in stitch.h) */
    const double b = (8 * K + 9) * (double)ring_rows(p) * W + 2 * (4 * K + 1) * EMIT_ROWS * W +
                     (S * p->batch + N) * T * T * (4 * C + 1) + 4 * K * p->batch * T * T + 8 * T * T;
    if (b > (double)SIZE_MAX / 2) return ts_error(TS_ERR_NOMEM, "stitch: a %.0f-pixel-wide scene needs too much memory", W);
    *bytes = (size_t)b;
    return TS_OK;
}

/* ---- a small blocking queue of pointers; NULL is the end-of-stream item ---- */

typedef struct queue {
    void *items[QCAP]; /* room for every read slot (N + 2 <= QCAP) or write buffer */
    int head, count;
} queue;

typedef struct read_slot {
    float *in;      /* [batch][C][T][T] */
    uint8_t *valid; /* [batch][T][T] */
    ts_window *wins;
    int n;
} read_slot;

typedef struct write_buf {
    float *values;  /* [K][EMIT_ROWS][W] */
    uint8_t *valid; /* [EMIT_ROWS][W] */
    int64_t row0;
    int nrows;
} write_buf;

struct stitch;

/* One reader thread: its own read context and padding scratch. */
typedef struct reader {
    struct stitch *s;
    void *ctx;              /* read_ctx[i], else ctx */
    float *scratch;         /* [C][T][T] unpadded read of a tile smaller than T */
    uint8_t *scratch_valid; /* [T][T] */
    pthread_t thread;
} reader;

typedef struct stitch {
    const ts_stitch_params *p;
    const ts_stitch_fns *f;
    int64_t *ox, *oy; /* tile origins */
    int64_t nx, ny;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* any queue or ready[] changed, or stop was set */
    queue read_free, write_free, write_full;
    int stop;
    ts_status err;
    char msg[2048];
    /* Reading: tiles go in batches b = 0, 1, ... of `batch` tiles in row-major
     * order. A reader takes a free slot, then claims the next batch (under mu)
     * and reads all of it; the slot goes to ready[b % nslots], where compute
     * waits for batch b itself. Batches in flight (claimed, not yet taken by
     * compute) each hold a slot and are consecutive, so there are at most
     * nslots of them and ready[] never holds two at one index. */
    int nreaders, nslots; /* N, n_slots */
    int pipelined;        /* f has tile_start and tile_finish */
    reader *readers;      /* [N] */
    read_slot *slots;     /* [nslots] */
    read_slot **ready;    /* [nslots] */
    int64_t nbatches, next_batch;
    write_buf bufs[2];
    /* the accumulator ring (calling thread only) */
    int64_t R;
    double *acc;     /* [K][R][W] */
    double *wsum;    /* [R][W] */
    uint8_t *rvalid; /* [R][W] */
    double *weight;  /* [T][T] */
    float *out;      /* [batch][K][T][T] */
} stitch;

/* Records the first error (with this thread's message) and wakes everyone. */
static void fail(stitch *s, ts_status st)
{
    pthread_mutex_lock(&s->mu);
    if (!s->stop) {
        s->stop = 1;
        s->err = st;
        snprintf(s->msg, sizeof s->msg, "%s", ts_last_error());
    }
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static void push(stitch *s, queue *q, void *item)
{
    pthread_mutex_lock(&s->mu);
    q->items[(q->head + q->count) % QCAP] = item;
    q->count++;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* Waits for an item; *stopped = 1 (and NULL) when another thread failed. */
static void *pop(stitch *s, queue *q, int *stopped)
{
    pthread_mutex_lock(&s->mu);
    while (!s->stop && q->count == 0) pthread_cond_wait(&s->cv, &s->mu);
    void *item = NULL;
    *stopped = s->stop;
    if (!s->stop) {
        item = q->items[q->head];
        q->head = (q->head + 1) % QCAP;
        q->count--;
    }
    pthread_mutex_unlock(&s->mu);
    return item;
}

/* ---- reader threads -------------------------------------------------------------------------- */

static int stopped_now(stitch *s)
{
    pthread_mutex_lock(&s->mu);
    int stop = s->stop;
    pthread_mutex_unlock(&s->mu);
    return stop;
}

/* Reads window w and writes it reflect-padded to T x T into in/valid. */
static ts_status read_tile(reader *rd, const ts_window *w, float *in, uint8_t *valid)
{
    const stitch *s = rd->s;
    const int T = s->p->tile, C = s->p->channels;
    if (w->width == T && w->height == T) return s->f->read(rd->ctx, w, in, valid);
    ts_status st = s->f->read(rd->ctx, w, rd->scratch, rd->scratch_valid);
    if (st) return st;
    const size_t plane = (size_t)w->width * w->height;
    for (int y = 0; y < T; y++) {
        const int64_t sy = ts_reflect_index(y, w->height);
        for (int x = 0; x < T; x++) {
            const int64_t sx = ts_reflect_index(x, w->width);
            const size_t src = (size_t)sy * w->width + (size_t)sx;
            for (int c = 0; c < C; c++) in[((size_t)c * T + y) * T + x] = rd->scratch[c * plane + src];
            valid[(size_t)y * T + x] = rd->scratch_valid[src];
        }
    }
    return TS_OK;
}

static void *reader_main(void *arg)
{
    reader *rd = arg;
    stitch *s = rd->s;
    const ts_stitch_params *p = s->p;
    const size_t tin = (size_t)p->channels * p->tile * p->tile, tpx = (size_t)p->tile * p->tile;
    const int64_t total = s->nx * s->ny;
    const int tw = (int)(p->width < p->tile ? p->width : p->tile);
    const int th = (int)(p->height < p->tile ? p->height : p->tile);
    for (;;) {
        /* A slot first, then a batch: a claimed batch always has a slot to be
         * read into, so the batch compute waits for is never stuck behind
         * later ones holding every slot. */
        int stopped = 0;
        read_slot *slot = pop(s, &s->read_free, &stopped);
        if (!slot) return NULL; /* another thread failed */
        pthread_mutex_lock(&s->mu);
        const int64_t b = s->next_batch < s->nbatches ? s->next_batch++ : -1;
        pthread_mutex_unlock(&s->mu);
        if (b < 0) {
            /* All claimed: hand the slot on so that a reader still waiting for one wakes and ends too. */
            push(s, &s->read_free, slot);
            return NULL;
        }
        const int64_t t0 = b * p->batch, t1 = t0 + p->batch < total ? t0 + p->batch : total;
        for (int64_t t = t0; t < t1; t++) {
            if (stopped_now(s)) return NULL; /* no need to finish a batch nobody will use */
            const int i = (int)(t - t0);
            ts_window w = {s->ox[t % s->nx], s->oy[t / s->nx], tw, th};
            ts_status st = read_tile(rd, &w, slot->in + i * tin, slot->valid + i * tpx);
            if (st) {
                fail(s, st);
                return NULL;
            }
            slot->wins[i] = w;
        }
        slot->n = (int)(t1 - t0);
        pthread_mutex_lock(&s->mu);
        s->ready[b % s->nslots] = slot;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
}

/* ---- writer thread --------------------------------------------------------------------------- */

static void *writer_main(void *arg)
{
    stitch *s = arg;
    int stopped = 0;
    for (;;) {
        write_buf *b = pop(s, &s->write_full, &stopped);
        if (!b) return NULL; /* the end, or stopped */
        ts_status st = s->f->write(s->f->ctx, b->row0, b->nrows, b->values, b->valid);
        if (st) {
            fail(s, st);
            return NULL;
        }
        push(s, &s->write_free, b);
    }
}

/* ---- the calling thread: tiles into the ring, final rows out --------------------------------- */

static void accumulate(stitch *s, const ts_window *w, const float *out, const uint8_t *valid)
{
    const ts_stitch_params *p = s->p;
    const int T = p->tile, K = p->classes;
    const int64_t W = p->width, R = s->R;
    const size_t plane = (size_t)T * T;
#pragma omp parallel for schedule(static) if ((int64_t)w->height * w->width * K > 65536)
    for (int y = 0; y < w->height; y++) {
        const int64_t slot = (w->row_off + y) % R;
        double *ws = s->wsum + slot * W + w->col_off;
        uint8_t *rv = s->rvalid + slot * W + w->col_off;
        const double *wt = s->weight + (size_t)y * T;
        for (int x = 0; x < w->width; x++) {
            ws[x] += wt[x];
            rv[x] = valid[(size_t)y * T + x];
        }
        for (int k = 0; k < K; k++) {
            double *a = s->acc + ((size_t)k * R + slot) * W + w->col_off;
            const float *o = out + k * plane + (size_t)y * T;
            for (int x = 0; x < w->width; x++) a[x] += wt[x] * o[x];
        }
    }
}

/* Hands rows [from, to) to the writer in chunks and clears their ring slots. */
static ts_status emit(stitch *s, int64_t from, int64_t to)
{
    const ts_stitch_params *p = s->p;
    const int64_t W = p->width, R = s->R;
    const int K = p->classes;
    while (from < to) {
        int stopped = 0;
        write_buf *b = pop(s, &s->write_free, &stopped);
        if (!b) return TS_ERR_IO; /* another thread failed; its error wins */
        b->row0 = from;
        b->nrows = (int)(to - from < EMIT_ROWS ? to - from : EMIT_ROWS);
        const int n = b->nrows;
#pragma omp parallel for schedule(static) if (n * W * K > 65536)
        for (int r = 0; r < n; r++) {
            const int64_t slot = (from + r) % R;
            double *ws = s->wsum + slot * W;
            for (int k = 0; k < K; k++) {
                double *a = s->acc + ((size_t)k * R + slot) * W;
                float *v = b->values + ((size_t)k * n + r) * W;
                for (int64_t x = 0; x < W; x++) v[x] = ws[x] > 0 ? (float)(a[x] / ws[x]) : NAN;
                memset(a, 0, (size_t)W * sizeof *a);
            }
            memcpy(b->valid + (size_t)r * W, s->rvalid + slot * W, (size_t)W);
            memset(ws, 0, (size_t)W * sizeof *ws);
            memset(s->rvalid + slot * W, 0, (size_t)W);
        }
        push(s, &s->write_full, b);
        from += n;
    }
    return TS_OK;
}

/* Waits until batch b is read (whichever reader had it); NULL when another thread failed. */
static read_slot *take_batch(stitch *s, int64_t b)
{
    pthread_mutex_lock(&s->mu);
    read_slot **r = &s->ready[b % s->nslots];
    while (!s->stop && !*r) pthread_cond_wait(&s->cv, &s->mu);
    read_slot *slot = s->stop ? NULL : *r;
    *r = NULL;
    pthread_mutex_unlock(&s->mu);
    return slot;
}

/* Blends a batch whose tile output is in s->out into the ring (emitting
 * the rows it makes final), then gives its slot back to the readers. */
static ts_status blend_batch(stitch *s, read_slot *slot, int64_t *emitted, int64_t *done)
{
    const ts_stitch_params *p = s->p;
    const size_t tout = (size_t)p->classes * p->tile * p->tile, tpx = (size_t)p->tile * p->tile;
    ts_status st;
    for (int i = 0; i < slot->n; i++) {
        /* A tile of a new tile row: every row above it is final. */
        if (slot->wins[i].row_off > *emitted && (st = emit(s, *emitted, slot->wins[i].row_off))) return st;
        if (slot->wins[i].row_off > *emitted) *emitted = slot->wins[i].row_off;
        accumulate(s, &slot->wins[i], s->out + i * tout, slot->valid + i * tpx);
    }
    *done += slot->n;
    slot->n = 0;
    push(s, &s->read_free, slot);
    if (s->f->progress) s->f->progress(s->f->ctx, *done, s->nx * s->ny);
    return TS_OK;
}

/* A pipelined batch: the tile output of the oldest started one, blended. */
static ts_status finish_batch(stitch *s, read_slot *slot, int64_t *emitted, int64_t *done)
{
    ts_status st = s->f->tile_finish(s->f->ctx, slot->n, slot->wins, s->out);
    return st ? st : blend_batch(s, slot, emitted, done);
}

static ts_status compute(stitch *s)
{
    int64_t done = 0, emitted = 0;
    read_slot *started = NULL; /* pipelined: the batch started and not yet finished */
    /* Batches strictly in order, whatever order the readers finish them in:
     * the tile function's batches and the accumulation order, hence every
     * output bit, do not depend on the number of readers, nor on pipelining
     * (batch b - 1 is finished and blended after b is started, before b). */
    for (int64_t b = 0; b < s->nbatches; b++) {
        read_slot *slot = take_batch(s, b);
        if (!slot) return TS_ERR_IO; /* another thread failed; its error wins */
        ts_status st;
        if (!s->pipelined) {
            st = s->f->tile(s->f->ctx, slot->n, slot->wins, slot->in, s->out);
            if (!st) st = blend_batch(s, slot, &emitted, &done);
        } else {
            st = s->f->tile_start(s->f->ctx, slot->n, slot->wins, slot->in);
            if (!st && started) st = finish_batch(s, started, &emitted, &done);
            started = slot;
        }
        if (st) return st;
    }
    ts_status st = started ? finish_batch(s, started, &emitted, &done) : TS_OK;
    return st ? st : emit(s, emitted, s->p->height);
}

static void free_stitch(stitch *s)
{
    for (int i = 0; s->slots && i < s->nslots; i++) {
        if (!s->f->free_in)
            free(s->slots[i].in);
        else if (s->slots[i].in) /* a slot not reached by a failed allocation has none */
            s->f->free_in(s->f->ctx, s->slots[i].in);
        free(s->slots[i].valid);
        free(s->slots[i].wins);
    }
    for (int i = 0; s->readers && i < s->nreaders; i++) {
        free(s->readers[i].scratch);
        free(s->readers[i].scratch_valid);
    }
    for (int i = 0; i < 2; i++) {
        free(s->bufs[i].values);
        free(s->bufs[i].valid);
    }
    free(s->slots);
    free(s->ready);
    free(s->readers);
    free(s->ox);
    free(s->oy);
    free(s->acc);
    free(s->wsum);
    free(s->rvalid);
    free(s->weight);
    free(s->out);
}

static ts_status alloc_stitch(stitch *s)
{
    const ts_stitch_params *p = s->p;
    const size_t T = (size_t)p->tile, C = (size_t)p->channels, K = (size_t)p->classes, W = (size_t)p->width;
    const size_t R = (size_t)s->R, B = (size_t)p->batch;
    s->nx = ts_stitch_origins(p->width, p->tile, p->overlap, NULL, 0);
    s->ny = ts_stitch_origins(p->height, p->tile, p->overlap, NULL, 0);
    s->nbatches = (s->nx * s->ny + p->batch - 1) / p->batch;
    s->ox = malloc((size_t)s->nx * sizeof *s->ox);
    s->oy = malloc((size_t)s->ny * sizeof *s->oy);
    s->acc = calloc(K * R * W, sizeof *s->acc);
    s->wsum = calloc(R * W, sizeof *s->wsum);
    s->rvalid = calloc(R * W, 1);
    s->weight = malloc(T * T * sizeof *s->weight);
    s->out = malloc(B * K * T * T * sizeof *s->out);
    s->slots = calloc((size_t)s->nslots, sizeof *s->slots);
    s->ready = calloc((size_t)s->nslots, sizeof *s->ready);
    s->readers = calloc((size_t)s->nreaders, sizeof *s->readers);
    int ok = s->ox && s->oy && s->acc && s->wsum && s->rvalid && s->weight && s->out && s->slots && s->ready &&
             s->readers;
    for (int i = 0; i < s->nslots && ok; i++) {
        const size_t in_bytes = B * C * T * T * sizeof(float);
        if (s->f->alloc_in) {
            void *q = NULL;
            ts_status st = s->f->alloc_in(s->f->ctx, &q, in_bytes);
            s->slots[i].in = q;
            /* The caller's allocator has its own message (a device's, say). */
            if (st) return ts_error(st, "stitch: read slot %d of %d (%.1f MiB): %s", i + 1, s->nslots,
                                    (double)in_bytes / 1048576.0, ts_last_error());
            if (!q) return ts_error(TS_ERR_NOMEM, "stitch: alloc_in gave no memory for read slot %d (%zu bytes)",
                                    i + 1, in_bytes);
        } else {
            s->slots[i].in = malloc(in_bytes);
        }
        s->slots[i].valid = malloc(B * T * T);
        s->slots[i].wins = malloc(B * sizeof(ts_window));
        ok = s->slots[i].in && s->slots[i].valid && s->slots[i].wins;
    }
    for (int i = 0; i < s->nreaders && ok; i++) {
        reader *rd = &s->readers[i];
        rd->s = s;
        rd->ctx = s->f->read_ctx ? s->f->read_ctx[i] : s->f->ctx;
        rd->scratch = malloc(C * T * T * sizeof *rd->scratch);
        rd->scratch_valid = malloc(T * T);
        ok = rd->scratch && rd->scratch_valid;
    }
    for (int i = 0; i < 2 && ok; i++) {
        s->bufs[i].values = malloc(K * EMIT_ROWS * W * sizeof(float));
        s->bufs[i].valid = malloc(EMIT_ROWS * W);
        ok = s->bufs[i].values && s->bufs[i].valid;
    }
    if (!ok) {
        size_t bytes = 0;
        ts_stitch_memory(p, s->pipelined, &bytes);
        return ts_error(TS_ERR_NOMEM, "stitch: out of memory (a %lld-pixel-wide scene with %d classes and %d px tiles "
                        "needs about %.0f MiB)", (long long)p->width, p->classes, p->tile, bytes / 1048576.0);
    }
    ts_stitch_origins(p->width, p->tile, p->overlap, s->ox, s->nx);
    ts_stitch_origins(p->height, p->tile, p->overlap, s->oy, s->ny);
    double *a = malloc(T * sizeof *a);
    if (!a) return ts_error(TS_ERR_NOMEM, "stitch: out of memory");
    ts_blend_window(p->blend, p->tile, a);
    for (size_t y = 0; y < T; y++)
        for (size_t x = 0; x < T; x++) s->weight[y * T + x] = a[y] * a[x];
    free(a);
    return TS_OK;
}

ts_status ts_stitch_run(const ts_stitch_params *p, const ts_stitch_fns *f)
{
    ts_status st = check_params(p);
    if (st) return st;
    if (!f || !f->read || !f->write || (!f->tile && !(f->tile_start && f->tile_finish)))
        return ts_error(TS_ERR_INVALID_ARG,
                        "stitch: the read, tile (or tile_start and tile_finish) and write functions are required");
    if (!f->tile_start != !f->tile_finish)
        return ts_error(TS_ERR_INVALID_ARG, "stitch: tile_start and tile_finish go together (%s is NULL)",
                        f->tile_start ? "tile_finish" : "tile_start");
    if (!f->alloc_in != !f->free_in)
        return ts_error(TS_ERR_INVALID_ARG, "stitch: alloc_in and free_in go together (%s is NULL)",
                        f->alloc_in ? "free_in" : "alloc_in");
    stitch s;
    memset(&s, 0, sizeof s);
    s.p = p;
    s.f = f;
    s.R = ring_rows(p);
    s.nreaders = n_readers(p);
    s.pipelined = f->tile_start != NULL;
    s.nslots = n_slots(p, s.pipelined);
    if ((st = alloc_stitch(&s))) {
        free_stitch(&s);
        return st;
    }
    pthread_mutex_init(&s.mu, NULL);
    pthread_cond_init(&s.cv, NULL);
    for (int i = 0; i < s.nslots; i++) push(&s, &s.read_free, &s.slots[i]);
    for (int i = 0; i < 2; i++) push(&s, &s.write_free, &s.bufs[i]);
    int started = 0;
    while (started < s.nreaders &&
           pthread_create(&s.readers[started].thread, NULL, reader_main, &s.readers[started]) == 0)
        started++;
    pthread_t writer;
    int have_writer = started == s.nreaders && pthread_create(&writer, NULL, writer_main, &s) == 0;
    if (!have_writer) {
        st = ts_error(TS_ERR_IO, "stitch: cannot start the reader and writer threads");
        fail(&s, st); /* the readers already started see stop and end */
    } else {
        st = compute(&s);
        if (st) fail(&s, st); /* keeps an earlier error of another thread */
        else push(&s, &s.write_full, NULL);
    }
    for (int i = 0; i < started; i++) pthread_join(s.readers[i].thread, NULL);
    if (have_writer) pthread_join(writer, NULL);
    if (s.stop) st = ts_error(s.err ? s.err : TS_ERR_IO, "%s", s.msg);
    pthread_cond_destroy(&s.cv);
    pthread_mutex_destroy(&s.mu);
    free_stitch(&s);
    return st;
}
