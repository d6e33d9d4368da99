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
    return TS_OK;
}

static int64_t ring_rows(const ts_stitch_params *p) { return p->height < p->tile ? p->height : p->tile; }

ts_status ts_stitch_memory(const ts_stitch_params *p, size_t *bytes)
{
    ts_status st = check_params(p);
    if (st) return st;
    const double K = p->classes, C = p->channels, T = p->tile, W = (double)p->width;
    const double b = (8 * K + 9) * (double)ring_rows(p) * W + 2 * (4 * K + 1) * EMIT_ROWS * W +
                     2 * p->batch * T * T * (4 * (C + K) + 1) + T * T * (8 + 4 * C + 1);
    if (b > (double)SIZE_MAX / 2) return ts_error(TS_ERR_NOMEM, "stitch: a %.0f-pixel-wide scene needs too much memory", W);
    *bytes = (size_t)b;
    return TS_OK;
}

/* ---- a small blocking queue of pointers; NULL is the end-of-stream item ---- */

typedef struct queue {
    void *items[4];
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

typedef struct stitch {
    const ts_stitch_params *p;
    const ts_stitch_fns *f;
    int64_t *ox, *oy; /* tile origins */
    int64_t nx, ny;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* any queue changed or stop was set */
    queue read_free, read_full, write_free, write_full;
    int stop;
    ts_status err;
    char msg[2048];
    read_slot slots[2];
    write_buf bufs[2];
    /* the accumulator ring (calling thread only) */
    int64_t R;
    double *acc;     /* [K][R][W] */
    double *wsum;    /* [R][W] */
    uint8_t *rvalid; /* [R][W] */
    double *weight;  /* [T][T] */
    float *out;      /* [batch][K][T][T] */
    float *scratch;  /* [C][T][T] unpadded read (reader thread) */
    uint8_t *scratch_valid;
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
    q->items[(q->head + q->count) % 4] = item;
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
        q->head = (q->head + 1) % 4;
        q->count--;
    }
    pthread_mutex_unlock(&s->mu);
    return item;
}

/* ---- reader thread --------------------------------------------------------------------------- */

/* Reads window w and writes it reflect-padded to T x T into in/valid. */
static ts_status read_tile(stitch *s, const ts_window *w, float *in, uint8_t *valid)
{
    const int T = s->p->tile, C = s->p->channels;
    if (w->width == T && w->height == T) return s->f->read(s->f->ctx, w, in, valid);
    ts_status st = s->f->read(s->f->ctx, w, s->scratch, s->scratch_valid);
    if (st) return st;
    const size_t plane = (size_t)w->width * w->height;
    for (int y = 0; y < T; y++) {
        const int64_t sy = ts_reflect_index(y, w->height);
        for (int x = 0; x < T; x++) {
            const int64_t sx = ts_reflect_index(x, w->width);
            const size_t src = (size_t)sy * w->width + (size_t)sx;
            for (int c = 0; c < C; c++) in[((size_t)c * T + y) * T + x] = s->scratch[c * plane + src];
            valid[(size_t)y * T + x] = s->scratch_valid[src];
        }
    }
    return TS_OK;
}

static void *reader_main(void *arg)
{
    stitch *s = arg;
    const ts_stitch_params *p = s->p;
    const size_t tin = (size_t)p->channels * p->tile * p->tile, tpx = (size_t)p->tile * p->tile;
    read_slot *slot = NULL;
    int stopped = 0;
    for (int64_t ty = 0; ty < s->ny && !stopped; ty++) {
        for (int64_t tx = 0; tx < s->nx; tx++) {
            if (!slot && !(slot = pop(s, &s->read_free, &stopped))) break;
            ts_window w = {s->ox[tx], s->oy[ty], (int)(p->width < p->tile ? p->width : p->tile),
                           (int)(p->height < p->tile ? p->height : p->tile)};
            ts_status st = read_tile(s, &w, slot->in + slot->n * tin, slot->valid + slot->n * tpx);
            if (st) {
                fail(s, st);
                return NULL;
            }
            slot->wins[slot->n++] = w;
            if (slot->n == p->batch) {
                push(s, &s->read_full, slot);
                slot = NULL;
            }
        }
    }
    if (!stopped) {
        if (slot) push(s, &s->read_full, slot);
        push(s, &s->read_full, NULL);
    }
    return NULL;
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

static ts_status compute(stitch *s)
{
    const ts_stitch_params *p = s->p;
    const size_t tout = (size_t)p->classes * p->tile * p->tile, tpx = (size_t)p->tile * p->tile;
    const int64_t total = s->nx * s->ny;
    int64_t done = 0, emitted = 0;
    for (;;) {
        int stopped = 0;
        read_slot *slot = pop(s, &s->read_full, &stopped);
        if (stopped) return TS_ERR_IO;
        if (!slot) break;
        ts_status st = s->f->tile(s->f->ctx, slot->n, slot->wins, slot->in, s->out);
        if (st) return st;
        for (int i = 0; i < slot->n; i++) {
            /* A tile of a new tile row: every row above it is final. */
            if (slot->wins[i].row_off > emitted && (st = emit(s, emitted, slot->wins[i].row_off))) return st;
            if (slot->wins[i].row_off > emitted) emitted = slot->wins[i].row_off;
            accumulate(s, &slot->wins[i], s->out + i * tout, slot->valid + i * tpx);
        }
        done += slot->n;
        slot->n = 0;
        push(s, &s->read_free, slot);
        if (s->f->progress) s->f->progress(s->f->ctx, done, total);
    }
    return emit(s, emitted, p->height);
}

static void free_stitch(stitch *s)
{
    for (int i = 0; i < 2; i++) {
        free(s->slots[i].in);
        free(s->slots[i].valid);
        free(s->slots[i].wins);
        free(s->bufs[i].values);
        free(s->bufs[i].valid);
    }
    free(s->ox);
    free(s->oy);
    free(s->acc);
    free(s->wsum);
    free(s->rvalid);
    free(s->weight);
    free(s->out);
    free(s->scratch);
    free(s->scratch_valid);
}

static ts_status alloc_stitch(stitch *s)
{
    const ts_stitch_params *p = s->p;
    const size_t T = (size_t)p->tile, C = (size_t)p->channels, K = (size_t)p->classes, W = (size_t)p->width;
    const size_t R = (size_t)s->R, B = (size_t)p->batch;
    s->nx = ts_stitch_origins(p->width, p->tile, p->overlap, NULL, 0);
    s->ny = ts_stitch_origins(p->height, p->tile, p->overlap, NULL, 0);
    s->ox = malloc((size_t)s->nx * sizeof *s->ox);
    s->oy = malloc((size_t)s->ny * sizeof *s->oy);
    s->acc = calloc(K * R * W, sizeof *s->acc);
    s->wsum = calloc(R * W, sizeof *s->wsum);
    s->rvalid = calloc(R * W, 1);
    s->weight = malloc(T * T * sizeof *s->weight);
    s->out = malloc(B * K * T * T * sizeof *s->out);
    s->scratch = malloc(C * T * T * sizeof *s->scratch);
    s->scratch_valid = malloc(T * T);
    int ok = s->ox && s->oy && s->acc && s->wsum && s->rvalid && s->weight && s->out && s->scratch && s->scratch_valid;
    for (int i = 0; i < 2 && ok; i++) {
        s->slots[i].in = malloc(B * C * T * T * sizeof(float));
        s->slots[i].valid = malloc(B * T * T);
        s->slots[i].wins = malloc(B * sizeof(ts_window));
        s->bufs[i].values = malloc(K * EMIT_ROWS * W * sizeof(float));
        s->bufs[i].valid = malloc(EMIT_ROWS * W);
        ok = s->slots[i].in && s->slots[i].valid && s->slots[i].wins && s->bufs[i].values && s->bufs[i].valid;
    }
    if (!ok) {
        size_t bytes = 0;
        ts_stitch_memory(p, &bytes);
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
    if (!f || !f->read || !f->tile || !f->write)
        return ts_error(TS_ERR_INVALID_ARG, "stitch: the read, tile and write functions are required");
    stitch s;
    memset(&s, 0, sizeof s);
    s.p = p;
    s.f = f;
    s.R = ring_rows(p);
    if ((st = alloc_stitch(&s))) {
        free_stitch(&s);
        return st;
    }
    pthread_mutex_init(&s.mu, NULL);
    pthread_cond_init(&s.cv, NULL);
    for (int i = 0; i < 2; i++) {
        push(&s, &s.read_free, &s.slots[i]);
        push(&s, &s.write_free, &s.bufs[i]);
    }
    pthread_t reader, writer;
    int have_reader = pthread_create(&reader, NULL, reader_main, &s) == 0;
    int have_writer = have_reader && pthread_create(&writer, NULL, writer_main, &s) == 0;
    if (!have_reader || !have_writer) {
        st = ts_error(TS_ERR_IO, "stitch: cannot start the reader and writer threads");
        fail(&s, st);
    } else {
        st = compute(&s);
        if (st) fail(&s, st); /* keeps an earlier error of another thread */
        else push(&s, &s.write_full, NULL);
    }
    if (have_reader) pthread_join(reader, NULL);
    if (have_writer) pthread_join(writer, NULL);
    if (s.stop) st = ts_error(s.err ? s.err : TS_ERR_IO, "%s", s.msg);
    pthread_cond_destroy(&s.cv);
    pthread_mutex_destroy(&s.mu);
    free_stitch(&s);
    return st;
}
