/* io/stitch.c without GDAL or a model: the stitcher takes any per-tile
 * function, so every check here runs on callbacks.
 *
 *  - tile origins against a naive reference and their coverage properties;
 *  - the reflection index against a naive mirror, the 1-D blend windows
 *    against their formulas;
 *  - identity: a read function that synthesizes hash-based planes (negative
 *    values, exact zeros, a wide exponent range) and a valid pattern, a tile
 *    function that copies in to out, and a write function whose rows must be
 *    the input bit for bit, each row once, top to bottom, through every blend
 *    mode, overlap, batch size and scene shape (1x1, 1xN, Nx1, smaller than
 *    the tile, exact multiples of the stride, odd primes). The tile function
 *    also checks the windows (row-major) and the reflection padding against
 *    an independent mirror, and poisons the padding of its output with NaN
 *    so that padding which leaked into the output would show;
 *  - blending: a tile function whose value depends on the tile, compared
 *    with a naive double reference sum w v / sum w over all covering tiles;
 *  - streaming: on a tall scene, rows go out before the scene is all read;
 *  - several readers: for 1, 2, 3, 5 reader threads (with and without a
 *    context per reader, and a read function that is slow on some tiles so
 *    that batches finish out of order) every tile is read once, each reader
 *    context from one thread of its own, each reader's tiles in order, and
 *    the tile function still sees the windows in row-major order in the
 *    same batches, so the written scene is the single reader's bit for bit
 *    (odd scene sizes, overlaps, a batch that does not divide the tiles);
 *  - errors: a read, tile or write function failing at its k-th call (first,
 *    second, middle, last; fast and slow threads) makes the run return that
 *    status and message, without a hang, and stops the failing function;
 *    with several readers too (a reader failing while others read or wait
 *    for a slot, or the tile or write function failing while readers wait);
 *    bad parameters name the field;
 *  - pipelining (tile_start / tile_finish): for 1, 2, 3, 5 readers and
 *    batches that divide the tiles or leave a partial last batch, and scenes
 *    of a single batch, the written scene equals the synchronous tile
 *    function's bit for bit; every finish is for the oldest started batch,
 *    whose input and windows are unchanged since its start (its read slot
 *    was not handed back early); batch b is started before b - 1 is
 *    finished, never more than two at once; a start or finish failing at
 *    its k-th call returns that status and message, with the calls before
 *    it in that order and none after;
 *  - the read slots' input batches from the caller's alloc_in/free_in (as
 *    predict's pinned ones): N + 1 slots, N + 2 pipelined, every `in` the
 *    tile functions get lies in one, all freed once, on the caller's
 *    thread; alloc_in failing at the first, second or last slot returns its
 *    status with a message naming the slot and keeping the allocator's,
 *    frees what it gave and runs nothing;
 *  - ts_stitch_memory: linear in the width, independent of the height, at
 *    least the buffers the header lists (one more read slot pipelined). */
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "io/stitch.h"
#include "kernels/threads.h"
#include "tests/testutil.h"

#define PI 3.14159265358979323846

/* ---- a watchdog: a hung pipeline fails with a message, not a CTest timeout ---- */
static const char *watch_what = "";

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "FAIL test_stitch: ts_stitch_run hung (60 s) in: ";
    if (write(STDOUT_FILENO, msg, sizeof msg - 1) < 0 || write(STDOUT_FILENO, watch_what, strlen(watch_what)) < 0 ||
        write(STDOUT_FILENO, "\n", 1) < 0)
        _exit(3);
    _exit(2);
}

/* ---- naive references ---------------------------------------------------------------------- */

/* Origins every T - overlap while a tile fits; then one ending on the edge
 * unless the last regular tile already does. One tile at 0 when size <= T. */
static int64_t naive_origins(int64_t size, int tile, int overlap, int64_t *o)
{
    if (size <= tile) {
        o[0] = 0;
        return 1;
    }
    int64_t n = 0;
    for (int64_t k = 0; k * (tile - overlap) + tile <= size; k++) o[n++] = k * (tile - overlap);
    if (o[n - 1] + tile < size) {
        o[n] = size - tile;
        n++;
    }
    return n;
}

/* PyTorch's "reflect", repeated: bounce between 0 and n - 1 until inside. */
static int64_t naive_mirror(int64_t i, int64_t n)
{
    if (n == 1) return 0;
    while (i < 0 || i >= n) i = i < 0 ? -i : 2 * (n - 1) - i;
    return i;
}

/* The 1-D windows, written again from the header's formulas. */
static void naive_window(ts_blend b, int T, double *a)
{
    for (int i = 0; i < T; i++) {
        double u = i + 0.5;
        if (b == TS_BLEND_MEAN)
            a[i] = 1.0;
        else if (b == TS_BLEND_COSINE)
            a[i] = pow(sin(PI * u / T), 2);
        else {
            double s = T / 8.0, g = exp(-(u - T / 2.0) * (u - T / 2.0) / (2 * s * s));
            a[i] = g < 1e-3 ? 1e-3 : g;
        }
    }
}

/* ---- synthetic input: a deterministic function of (plane, row, col) ------------------------ */
static uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Signed, full-mantissa values over 2^-8..2^7 of scale; about 1 in 13 exactly 0. */
static float synth(int c, int64_t row, int64_t col)
{
    uint64_t h = mix64(((uint64_t)c << 50) ^ ((uint64_t)row << 25) ^ (uint64_t)col);
    if (h % 13 == 0) return 0.0f;
    double v = (double)(h >> 40) / 8192.0 - 1024.0; /* [-1024, 1024), 24 bits */
    return (float)ldexp(v, (int)((h >> 8) & 15) - 8);
}

static uint8_t synth_valid(int64_t row, int64_t col) { return (uint8_t)((row * 7 + col * 3) % 11 != 0); }

static int same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* The tile function of the blending test: a per-tile id plus a smooth function
 * of the position inside the tile, per output plane. */
static float blend_value(int k, const ts_window *w, int y, int x)
{
    return (float)((double)(w->col_off * 1000 + w->row_off) + 0.25 * k + sin(0.37 * y + 0.23 * x + k));
}

/* ---- one run with checking callbacks -------------------------------------------------------- */
enum { FN_NONE, FN_READ, FN_TILE, FN_WRITE, FN_START, FN_FINISH };
enum { MODE_IDENTITY, MODE_BLEND };

struct run;

/* A reader's own read context (ts_stitch_fns.read_ctx): the thread that uses
 * it and the last tile it read. */
typedef struct reader_ctx {
    struct run *r;
    int64_t calls, last_tile;
    pthread_t thread;
    int bad_thread, bad_order;
} reader_ctx;

enum { MAX_TEST_READERS = 8 };

typedef struct run {
    ts_stitch_params p;
    int mode;
    int64_t *ox, *oy, nx, ny; /* the expected origins (naive) */
    int fail_fn;
    int64_t fail_at;
    int slow_fn, slow_us; /* sleep in one function to shift the threads' timing */
    int jitter_us;        /* several readers: sleep on some tiles so that batches finish out of order */
    /* reader threads */
    int use_read_ctx; /* give each reader its own context (else ctx for all) */
    reader_ctx rctx[MAX_TEST_READERS];
    pthread_t main_thread;
    pthread_mutex_t read_mu; /* note_read and bad_read with several readers */
    _Atomic int64_t reads, finished;
    _Atomic int64_t *hits;  /* [tiles] reads of each tile */
    int64_t *finish;        /* [tiles] order in which the reads of the tiles ended */
    int64_t bad_read;
    char note_read[256];
    /* calling thread */
    int64_t tile_calls, tiles, bad_wins, bad_pad, bad_batch;
    char note_tile[256];
    /* writer thread */
    int64_t writes, next_row, bad_order, reads_at_first_write;
    char note_write[256];
    float *vals;     /* [K][H][W] as written */
    uint8_t *valid;  /* [H][W] */
    int *row_hits;   /* [H] */
    /* progress (calling thread) */
    int64_t progress_calls, last_done, last_total, bad_progress;
    /* pipelined (tile_start / tile_finish instead of tile): the batches
     * started and not finished, oldest first, with a hash of their input */
    int pipelined;
    struct {
        int n;
        const ts_window *wins;
        const float *in;
        uint64_t hash;
    } inflight[4];
    int n_inflight, max_inflight;
    int64_t starts, finishes, bad_finish;
    char note_pipe[256];
    /* own_in: the read slots' input batches come from cb_alloc_in (as
     * predict's pinned ones), and every `in` given to tile or tile_start
     * must lie in one that is allocated and not freed */
    int own_in;
    struct {
        unsigned char *p;
        size_t n;
        int freed;
    } ins[80];
    int n_ins;
    int64_t in_frees, bad_in, fail_in_at;
    char note_in[256];
} run;

static void note(char *buf, int64_t *count, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void note(char *buf, int64_t *count, const char *fmt, ...)
{
    if ((*count)++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, 256, fmt, ap);
        va_end(ap);
    }
}

static ts_window expected_window(const run *r, int64_t t)
{
    ts_window w = {r->ox[t % r->nx], r->oy[t / r->nx], (int)(r->p.width < r->p.tile ? r->p.width : r->p.tile),
                   (int)(r->p.height < r->p.tile ? r->p.height : r->p.tile)};
    return w;
}

static int same_window(const ts_window *a, const ts_window *b)
{
    return a->col_off == b->col_off && a->row_off == b->row_off && a->width == b->width && a->height == b->height;
}

/* The tile index of window w (its origins on the naive grid); -1 if none. */
static int64_t tile_index(const run *r, const ts_window *w)
{
    int64_t tx = -1, ty = -1;
    for (int64_t i = 0; i < r->nx; i++)
        if (r->ox[i] == w->col_off) tx = i;
    for (int64_t i = 0; i < r->ny; i++)
        if (r->oy[i] == w->row_off) ty = i;
    if (tx < 0 || ty < 0) return -1;
    ts_window want = expected_window(r, ty * r->nx + tx);
    return same_window(w, &want) ? ty * r->nx + tx : -1;
}

static int n_readers(const run *r) { return r->p.readers > 0 ? r->p.readers : 1; }

/* Reader threads: any of them, at once. */
static ts_status check_read(run *r, const ts_window *w, float *data, uint8_t *valid)
{
    int64_t k = atomic_fetch_add(&r->reads, 1) + 1;
    if (r->slow_fn == FN_READ) usleep((useconds_t)r->slow_us);
    if (r->fail_fn == FN_READ && k == r->fail_at) return ts_error(TS_ERR_IO, "boom read %lld", (long long)k);
    int64_t t = -1;
    if (n_readers(r) == 1) {
        /* One reader: the tiles in row-major order. */
        ts_window want = expected_window(r, k - 1);
        if (k <= r->nx * r->ny && same_window(w, &want)) t = k - 1;
        else
            note(r->note_read, &r->bad_read, "read %lld: window %lld,%lld %dx%d, expected %lld,%lld %dx%d",
                 (long long)k, (long long)w->col_off, (long long)w->row_off, w->width, w->height,
                 (long long)want.col_off, (long long)want.row_off, want.width, want.height);
    } else {
        /* Several: any order, but each tile of the grid once. */
        t = tile_index(r, w);
        const int64_t hits = t >= 0 ? atomic_fetch_add(&r->hits[t], 1) + 1 : 0;
        if (t < 0 || hits > 1) {
            pthread_mutex_lock(&r->read_mu);
            note(r->note_read, &r->bad_read, "read %lld: window %lld,%lld %dx%d is %s", (long long)k,
                 (long long)w->col_off, (long long)w->row_off, w->width, w->height,
                 t < 0 ? "no tile of the grid" : "read twice");
            pthread_mutex_unlock(&r->read_mu);
        }
        /* The first tile sleeps long, so that later batches finish before the first. */
        if (r->jitter_us && t >= 0 && (t == 0 || mix64((uint64_t)t) % 4 == 0))
            usleep((useconds_t)(t == 0 ? 20 * r->jitter_us : r->jitter_us));
    }
    if (t < 0 && k > r->nx * r->ny) return ts_error(TS_ERR_IO, "test: too many reads");
    const size_t plane = (size_t)w->width * w->height;
    for (int y = 0; y < w->height; y++)
        for (int x = 0; x < w->width; x++) {
            for (int c = 0; c < r->p.channels; c++)
                data[c * plane + (size_t)y * w->width + x] = synth(c, w->row_off + y, w->col_off + x);
            valid[(size_t)y * w->width + x] = synth_valid(w->row_off + y, w->col_off + x);
        }
    if (t >= 0) r->finish[t] = atomic_fetch_add(&r->finished, 1);
    return TS_OK;
}

/* read_ctx NULL: ctx (the run) on every reader. */
static ts_status cb_read(void *ctx, const ts_window *w, float *data, uint8_t *valid)
{
    return check_read(ctx, w, data, valid);
}

/* read_ctx[i]: reader i's own context, used by one thread only, tiles in increasing order. */
static ts_status cb_read_own(void *ctx, const ts_window *w, float *data, uint8_t *valid)
{
    reader_ctx *rc = ctx;
    if (rc->calls++ == 0) rc->thread = pthread_self();
    else if (!pthread_equal(rc->thread, pthread_self())) rc->bad_thread++;
    const int64_t t = tile_index(rc->r, w);
    if (t >= 0 && t <= rc->last_tile) rc->bad_order++;
    if (t >= 0) rc->last_tile = t;
    return check_read(rc->r, w, data, valid);
}

/* own_in: `in` (n tiles) lies in an input batch from cb_alloc_in, still allocated. */
static void check_in(run *r, int n, const float *in, const char *fn)
{
    if (!r->own_in) return;
    const unsigned char *c = (const unsigned char *)in;
    const size_t bytes = (size_t)n * r->p.channels * r->p.tile * r->p.tile * sizeof(float);
    for (int i = 0; i < r->n_ins; i++)
        if (!r->ins[i].freed && c >= r->ins[i].p && bytes <= r->ins[i].n && c - r->ins[i].p <= (ptrdiff_t)(r->ins[i].n - bytes))
            return;
    note(r->note_in, &r->bad_in, "%s: input %p is not in an input batch from alloc_in", fn, (const void *)in);
}

static ts_status cb_alloc_in(void *ctx, void **p, size_t bytes)
{
    run *r = ctx;
    *p = NULL;
    if (!pthread_equal(pthread_self(), r->main_thread))
        note(r->note_in, &r->bad_in, "alloc_in called from a thread other than the caller's");
    if (r->fail_in_at > 0 && r->n_ins + 1 == r->fail_in_at)
        return ts_error(TS_ERR_NOMEM, "no pinned memory left (call %d)", r->n_ins + 1);
    if (r->n_ins == (int)(sizeof r->ins / sizeof r->ins[0])) {
        note(r->note_in, &r->bad_in, "more than %d input batches", r->n_ins);
        return ts_error(TS_ERR_NOMEM, "test: too many input batches");
    }
    unsigned char *q = malloc(bytes);
    if (!q) return ts_error(TS_ERR_NOMEM, "test: out of memory");
    r->ins[r->n_ins].p = q;
    r->ins[r->n_ins].n = bytes;
    r->ins[r->n_ins].freed = 0;
    r->n_ins++;
    *p = q;
    return TS_OK;
}

static void cb_free_in(void *ctx, void *p)
{
    run *r = ctx;
    r->in_frees++;
    if (!pthread_equal(pthread_self(), r->main_thread))
        note(r->note_in, &r->bad_in, "free_in called from a thread other than the caller's");
    for (int i = 0; i < r->n_ins; i++)
        if (r->ins[i].p == p && !r->ins[i].freed) {
            r->ins[i].freed = 1;
            free(p);
            return;
        }
    note(r->note_in, &r->bad_in, "free_in(%p): not an input batch from alloc_in, or freed twice", p);
}

/* own_in: every input batch allocated was freed once (call after the run). */
static int check_ins_freed(run *r, const char *what)
{
    int left = 0;
    for (int i = 0; i < r->n_ins; i++) left += !r->ins[i].freed;
    return tu_expect(left == 0 && r->bad_in == 0, "%s: %d of %d input batches not freed, %lld bad: %s", what, left,
                     r->n_ins, (long long)r->bad_in, r->note_in);
}

static ts_status cb_tile(void *ctx, int n, const ts_window *wins, const float *in, float *out)
{
    run *r = ctx;
    check_in(r, n, in, "tile");
    const int T = r->p.tile, C = r->p.channels, K = r->p.classes;
    const int64_t total = r->nx * r->ny;
    const size_t plane = (size_t)T * T;
    r->tile_calls++;
    if (r->slow_fn == FN_TILE) usleep((useconds_t)r->slow_us);
    if (r->fail_fn == FN_TILE && r->tile_calls == r->fail_at)
        return ts_error(TS_ERR_BACKEND, "boom tile %lld", (long long)r->tile_calls);
    /* Every call but the last is a full batch. */
    if (n < 1 || n > r->p.batch || (n < r->p.batch && r->tiles + n != total))
        note(r->note_tile, &r->bad_batch, "tile call %lld: %d tiles (batch %d, %lld of %lld done)",
             (long long)r->tile_calls, n, r->p.batch, (long long)r->tiles, (long long)total);
    for (int i = 0; i < n; i++, r->tiles++) {
        const ts_window *w = &wins[i];
        ts_window want = expected_window(r, r->tiles);
        if (r->tiles >= total || !same_window(w, &want)) {
            note(r->note_tile, &r->bad_wins, "tile %lld: window %lld,%lld %dx%d, expected %lld,%lld %dx%d",
                 (long long)r->tiles, (long long)w->col_off, (long long)w->row_off, w->width, w->height,
                 (long long)want.col_off, (long long)want.row_off, want.width, want.height);
            continue;
        }
        const float *ti = in + (size_t)i * C * plane;
        float *to = out + (size_t)i * K * plane;
        for (int y = 0; y < T; y++)
            for (int x = 0; x < T; x++) {
                const int64_t sy = w->row_off + naive_mirror(y, w->height), sx = w->col_off + naive_mirror(x, w->width);
                for (int c = 0; c < C; c++) {
                    float got = ti[c * plane + (size_t)y * T + x], want_v = synth(c, sy, sx);
                    if (!same_bits(got, want_v))
                        note(r->note_tile, &r->bad_pad,
                             "tile %lld (%lld,%lld %dx%d) plane %d at %d,%d: %.9g, expected %.9g (scene %lld,%lld)",
                             (long long)r->tiles, (long long)w->col_off, (long long)w->row_off, w->width, w->height, c,
                             y, x, (double)got, (double)want_v, (long long)sy, (long long)sx);
                }
                const int inside = y < w->height && x < w->width;
                for (int k = 0; k < K; k++) {
                    float v = NAN; /* padding is context only: it must never reach the output */
                    if (inside && r->mode == MODE_IDENTITY) v = ti[k * plane + (size_t)y * T + x];
                    if (inside && r->mode == MODE_BLEND) v = blend_value(k, w, y, x);
                    to[k * plane + (size_t)y * T + x] = v;
                }
            }
    }
    return TS_OK;
}

/* What a started batch must still hold when it is finished: its tiles and windows. */
static uint64_t batch_hash(const run *r, int n, const ts_window *wins, const float *in)
{
    const unsigned char *b[2] = {(const unsigned char *)in, (const unsigned char *)wins};
    const size_t len[2] = {(size_t)n * r->p.channels * r->p.tile * r->p.tile * sizeof(float), (size_t)n * sizeof *wins};
    uint64_t h = 1469598103934665603ULL;
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < len[k]; i++) h = (h ^ b[k][i]) * 1099511628211ULL;
    return h;
}

static ts_status cb_tile_start(void *ctx, int n, const ts_window *wins, const float *in)
{
    run *r = ctx;
    r->starts++;
    check_in(r, n, in, "tile_start");
    if (r->slow_fn == FN_START) usleep((useconds_t)r->slow_us);
    if (r->fail_fn == FN_START && r->starts == r->fail_at)
        return ts_error(TS_ERR_BACKEND, "boom start %lld", (long long)r->starts);
    if (r->n_inflight == 4) {
        note(r->note_pipe, &r->bad_finish, "start %lld: four batches already started", (long long)r->starts);
        return TS_OK;
    }
    r->inflight[r->n_inflight].n = n;
    r->inflight[r->n_inflight].wins = wins;
    r->inflight[r->n_inflight].in = in;
    r->inflight[r->n_inflight].hash = batch_hash(r, n, wins, in);
    if (++r->n_inflight > r->max_inflight) r->max_inflight = r->n_inflight;
    return TS_OK;
}

/* The oldest started batch, through the synchronous tile function. */
static ts_status cb_tile_finish(void *ctx, int n, const ts_window *wins, float *out)
{
    run *r = ctx;
    r->finishes++;
    if (r->fail_fn == FN_FINISH && r->finishes == r->fail_at)
        return ts_error(TS_ERR_BACKEND, "boom finish %lld", (long long)r->finishes);
    if (r->n_inflight == 0) {
        note(r->note_pipe, &r->bad_finish, "finish %lld: no batch started", (long long)r->finishes);
        return TS_OK;
    }
    const int n0 = r->inflight[0].n;
    const ts_window *w0 = r->inflight[0].wins;
    const float *in = r->inflight[0].in;
    if (n != n0 || wins != w0)
        note(r->note_pipe, &r->bad_finish, "finish %lld: %d tiles at %p, the oldest started batch has %d at %p",
             (long long)r->finishes, n, (const void *)wins, n0, (const void *)w0);
    else if (batch_hash(r, n, wins, in) != r->inflight[0].hash)
        note(r->note_pipe, &r->bad_finish, "finish %lld: the batch's input or windows changed since its start",
             (long long)r->finishes);
    r->n_inflight--;
    memmove(&r->inflight[0], &r->inflight[1], (size_t)r->n_inflight * sizeof r->inflight[0]);
    return cb_tile(r, n0, w0, in, out);
}

static ts_status cb_write(void *ctx, int64_t row0, int nrows, const float *values, const uint8_t *valid)
{
    run *r = ctx;
    const int64_t W = r->p.width, H = r->p.height;
    r->writes++;
    if (r->writes == 1) r->reads_at_first_write = atomic_load(&r->reads);
    if (r->slow_fn == FN_WRITE) usleep((useconds_t)r->slow_us);
    if (r->fail_fn == FN_WRITE && r->writes == r->fail_at)
        return ts_error(TS_ERR_IO, "boom write %lld", (long long)r->writes);
    if (row0 != r->next_row || nrows < 1 || nrows > 64 || row0 + nrows > H) {
        note(r->note_write, &r->bad_order,
             "write %lld: rows [%lld, %lld), expected to start at %lld, at most 64 rows (height %lld)",
             (long long)r->writes, (long long)row0, (long long)(row0 + nrows), (long long)r->next_row, (long long)H);
        if (row0 < 0 || nrows < 1 || row0 + nrows > H) return TS_OK;
    }
    r->next_row = row0 + nrows;
    for (int y = 0; y < nrows; y++) {
        r->row_hits[row0 + y]++;
        memcpy(r->valid + (size_t)(row0 + y) * W, valid + (size_t)y * W, (size_t)W);
        for (int k = 0; k < r->p.classes; k++)
            memcpy(r->vals + ((size_t)k * H + row0 + y) * W, values + ((size_t)k * nrows + y) * W,
                   (size_t)W * sizeof(float));
    }
    return TS_OK;
}

static void cb_progress(void *ctx, int64_t done, int64_t total)
{
    run *r = ctx;
    r->progress_calls++;
    if (done <= r->last_done || done > total || total != r->nx * r->ny) r->bad_progress++;
    r->last_done = done;
    r->last_total = total;
}

static void run_init(run *r, const ts_stitch_params *p, int mode)
{
    memset(r, 0, sizeof *r);
    atomic_init(&r->reads, 0);
    atomic_init(&r->finished, 0);
    pthread_mutex_init(&r->read_mu, NULL);
    r->p = *p;
    r->mode = mode;
    r->ox = malloc(((size_t)p->width + 1) * sizeof *r->ox); /* at most one origin a pixel, and one */
    r->oy = malloc(((size_t)p->height + 1) * sizeof *r->oy);
    r->nx = naive_origins(p->width, p->tile, p->overlap, r->ox);
    r->ny = naive_origins(p->height, p->tile, p->overlap, r->oy);
    r->vals = tu_alloc_f((size_t)p->classes * p->width * p->height);
    r->valid = tu_alloc((size_t)p->width * p->height);
    r->row_hits = calloc((size_t)p->height, sizeof *r->row_hits);
    r->hits = calloc((size_t)(r->nx * r->ny), sizeof *r->hits);
    r->finish = calloc((size_t)(r->nx * r->ny), sizeof *r->finish);
    for (int i = 0; i < MAX_TEST_READERS; i++) r->rctx[i] = (reader_ctx){.r = r, .last_tile = -1};
}

static void run_free(run *r, const char *what)
{
    free(r->ox);
    free(r->oy);
    tu_free(r->vals, what, "values");
    tu_free(r->valid, what, "valid");
    free(r->row_hits);
    free((void *)r->hits);
    free(r->finish);
    pthread_mutex_destroy(&r->read_mu);
}

static ts_status run_stitch(run *r, const char *what)
{
    void *rctx[MAX_TEST_READERS];
    for (int i = 0; i < MAX_TEST_READERS; i++) rctx[i] = &r->rctx[i];
    ts_stitch_fns f = {.ctx = r,
                       .read = r->use_read_ctx ? cb_read_own : cb_read,
                       .tile = cb_tile,
                       .write = cb_write,
                       .progress = cb_progress,
                       .read_ctx = r->use_read_ctx ? rctx : NULL};
    if (r->pipelined) {
        f.tile = NULL;
        f.tile_start = cb_tile_start;
        f.tile_finish = cb_tile_finish;
    }
    if (r->own_in) {
        f.alloc_in = cb_alloc_in;
        f.free_in = cb_free_in;
    }
    r->main_thread = pthread_self();
    watch_what = what;
    alarm(60);
    ts_status st = ts_stitch_run(&r->p, &f);
    alarm(0);
    return st;
}

static void describe(char *buf, size_t n, const char *kind, const ts_stitch_params *p)
{
    snprintf(buf, n, "%s %lldx%lld C%d K%d T%d overlap %d batch %d %s readers %d", kind, (long long)p->width,
             (long long)p->height, p->channels, p->classes, p->tile, p->overlap, p->batch, ts_blend_name(p->blend),
             p->readers);
}

/* Several readers: each reader context used by one thread of its own (not
 * the caller's), each reader's tiles in increasing order. */
static int check_reader_ctxs(run *r, const char *what)
{
    int ok = 1, used = 0;
    if (!r->use_read_ctx) return 1;
    for (int i = 0; i < MAX_TEST_READERS; i++) {
        const reader_ctx *a = &r->rctx[i];
        if (a->calls == 0) continue;
        used++;
        ok &= tu_expect(i < n_readers(r), "%s: reader context %d of %d used", what, i, n_readers(r));
        ok &= tu_expect(a->bad_thread == 0 && !pthread_equal(a->thread, r->main_thread),
                        "%s: reader context %d used from %d other threads or the caller's", what, i, a->bad_thread);
        ok &= tu_expect(a->bad_order == 0, "%s: reader %d read tiles out of order %d times", what, i, a->bad_order);
        for (int j = 0; j < i; j++)
            if (r->rctx[j].calls > 0)
                ok &= tu_expect(!pthread_equal(a->thread, r->rctx[j].thread),
                                "%s: reader contexts %d and %d on one thread", what, j, i);
    }
    return ok & tu_expect(used >= 1, "%s: a reader context was used", what);
}

/* Checks everything a clean run must show: windows, padding, row order,
 * coverage, progress. The values themselves are the caller's. */
static int check_clean_run(run *r, const char *what)
{
    int ok = 1;
    const int64_t total = r->nx * r->ny;
    ok &= tu_expect(r->bad_read == 0, "%s: %lld bad reads: %s", what, (long long)r->bad_read, r->note_read);
    ok &= tu_expect(r->bad_wins == 0, "%s: %lld bad tile windows: %s", what, (long long)r->bad_wins, r->note_tile);
    ok &= tu_expect(r->bad_pad == 0, "%s: %lld tile input values not the reflect-padded read: %s", what,
                    (long long)r->bad_pad, r->note_tile);
    ok &= tu_expect(r->bad_batch == 0, "%s: batching: %s", what, r->note_tile);
    ok &= tu_expect(atomic_load(&r->reads) == total && r->tiles == total,
                    "%s: %lld reads and %lld tiles, expected %lld (%lldx%lld)", what,
                    (long long)atomic_load(&r->reads), (long long)r->tiles, (long long)total, (long long)r->nx,
                    (long long)r->ny);
    ok &= tu_expect(r->bad_order == 0, "%s: %lld writes out of order: %s", what, (long long)r->bad_order,
                    r->note_write);
    if (n_readers(r) > 1) {
        int64_t unread = 0;
        for (int64_t t = 0; t < total; t++) unread += atomic_load(&r->hits[t]) != 1;
        ok &= tu_expect(unread == 0, "%s: %lld tiles not read exactly once", what, (long long)unread);
    }
    ok &= check_reader_ctxs(r, what);
    int64_t missing = 0, twice = 0, first_bad = -1;
    for (int64_t y = 0; y < r->p.height; y++) {
        missing += r->row_hits[y] == 0;
        twice += r->row_hits[y] > 1;
        if (r->row_hits[y] != 1 && first_bad < 0) first_bad = y;
    }
    ok &= tu_expect(missing == 0 && twice == 0 && r->next_row == r->p.height,
                    "%s: %lld rows never written, %lld written more than once (first row %lld), last row %lld of %lld",
                    what, (long long)missing, (long long)twice, (long long)first_bad, (long long)r->next_row,
                    (long long)r->p.height);
    ok &= tu_expect(r->bad_progress == 0 && r->last_done == total && r->last_total == total &&
                        r->progress_calls == r->tile_calls,
                    "%s: progress: %lld bad calls, last %lld of %lld, %lld calls for %lld tile calls", what,
                    (long long)r->bad_progress, (long long)r->last_done, (long long)r->last_total,
                    (long long)r->progress_calls, (long long)r->tile_calls);
    ok &= tu_guard_check(r->vals, what, "values") & tu_guard_check(r->valid, what, "valid");
    return ok;
}

static int check_valid(run *r, const char *what)
{
    const int64_t W = r->p.width, H = r->p.height;
    for (int64_t y = 0; y < H; y++)
        for (int64_t x = 0; x < W; x++)
            if (r->valid[y * W + x] != synth_valid(y, x))
                return tu_expect(0, "%s: valid byte at row %lld col %lld is %d, expected %d", what, (long long)y,
                                 (long long)x, r->valid[y * W + x], synth_valid(y, x));
    return tu_expect(1, "%s: valid", what);
}

/* ---- 1. origins --------------------------------------------------------------------------- */
static void test_origins(void)
{
    static const int tiles[] = {1, 2, 3, 5, 8, 16, 17, 64};
    int64_t want[512];
    int64_t bad = 0;
    for (size_t ti = 0; ti < sizeof tiles / sizeof *tiles; ti++) {
        const int T = tiles[ti];
        const int overlaps[] = {0, 1, T / 4, T / 2, T - 1};
        for (int oi = 0; oi < 5; oi++) {
            const int ov = overlaps[oi];
            if (ov >= T || (oi > 0 && ov == overlaps[oi - 1])) continue;
            for (int64_t size = 1; size <= 3 * T + 40; size++) {
                const int64_t n = naive_origins(size, T, ov, want);
                const int64_t count = ts_stitch_origins(size, T, ov, NULL, 0);
                int64_t *got = tu_alloc((size_t)n * sizeof *got);
                const int64_t filled = ts_stitch_origins(size, T, ov, got, n);
                int ok = count == n && filled == n && memcmp(got, want, (size_t)n * sizeof *got) == 0;
                /* Properties, independently of the reference. */
                ok = ok && got[0] == 0;
                for (int64_t i = 1; i < n && ok; i++) ok = got[i] > got[i - 1] && got[i] - got[i - 1] <= T - ov;
                if (ok && size > T) ok = got[n - 1] == size - T;
                if (ok && size <= T) ok = n == 1;
                ok = tu_guard_check(got, "ts_stitch_origins", "origins") && ok;
                if (!ok && bad++ < 5)
                    tu_expect(0, "origins size %lld tile %d overlap %d: count %lld, filled %lld, expected %lld",
                              (long long)size, T, ov, (long long)count, (long long)filled, (long long)n);
                /* A short buffer: filled up to max_n, the full count returned. */
                if (n > 1) {
                    memset(got, 0x5a, (size_t)n * sizeof *got);
                    const int64_t c2 = ts_stitch_origins(size, T, ov, got, n - 1);
                    uint64_t last;
                    memcpy(&last, &got[n - 1], sizeof last);
                    if ((c2 != n || memcmp(got, want, (size_t)(n - 1) * sizeof *got) != 0 ||
                         last != 0x5a5a5a5a5a5a5a5aull) &&
                        bad++ < 5)
                        tu_expect(0, "origins size %lld tile %d overlap %d, max_n %lld: returned %lld or wrote past",
                                  (long long)size, T, ov, (long long)(n - 1), (long long)c2);
                }
                tu_free(got, "ts_stitch_origins", "origins");
            }
        }
    }
    tu_expect(bad == 0, "origins: %lld (size, tile, overlap) cases differ from the naive reference", (long long)bad);
    /* Named cases. */
    int64_t o[8];
    tu_expect(ts_stitch_origins(256, 256, 32, o, 8) == 1 && o[0] == 0, "origins size == tile: one tile at 0");
    tu_expect(ts_stitch_origins(257, 256, 0, o, 8) == 2 && o[0] == 0 && o[1] == 1, "origins size == tile + 1: 0, 1");
    tu_expect(ts_stitch_origins(10, 256, 0, o, 8) == 1 && o[0] == 0, "origins size < tile: one tile at 0");
    tu_expect(ts_stitch_origins(1000, 256, 32, o, 8) == 5 && o[0] == 0 && o[1] == 224 && o[2] == 448 &&
                  o[3] == 672 && o[4] == 744,
              "origins 1000/256/32: 0 224 448 672 744");
    /* A huge axis: counted without a buffer, same as the closed form. */
    const int64_t big = 1000000007;
    tu_expect(ts_stitch_origins(big, 512, 64, NULL, 0) == (big - 512 + 447) / 448 + 1,
              "origins of a 1e9-pixel axis: closed-form count");
}

/* ---- 2. reflection index --------------------------------------------------------------------- */
static void test_reflect(void)
{
    static const int64_t ns[] = {1, 2, 3, 7, 16};
    int64_t bad = 0;
    for (size_t k = 0; k < sizeof ns / sizeof *ns; k++) {
        const int64_t n = ns[k];
        for (int64_t i = -3 * n - 5; i < 4 * n + 5; i++) {
            int64_t got = ts_reflect_index(i, n), want = naive_mirror(i, n);
            if (got != want && bad++ < 5)
                tu_expect(0, "ts_reflect_index(%lld, %lld) = %lld, expected %lld", (long long)i, (long long)n,
                          (long long)got, (long long)want);
        }
    }
    tu_expect(bad == 0, "ts_reflect_index: %lld values differ from the naive mirror", (long long)bad);
    /* PyTorch's reflect of [a b c d] by 2: c b | a b c d | c b. */
    tu_expect(ts_reflect_index(-1, 4) == 1 && ts_reflect_index(-2, 4) == 2 && ts_reflect_index(4, 4) == 2 &&
                  ts_reflect_index(5, 4) == 1 && ts_reflect_index(3, 4) == 3,
              "ts_reflect_index: the edge pixel is not repeated");
    tu_expect(ts_reflect_index(-1000000000000LL, 5) == naive_mirror(-1000000000000LL % 8, 5),
              "ts_reflect_index: far outside");
}

/* ---- 3. blend windows ------------------------------------------------------------------------ */
static void test_windows(void)
{
    static const int tiles[] = {1, 2, 3, 8, 16, 17, 64, 256};
    const ts_blend modes[] = {TS_BLEND_GAUSSIAN, TS_BLEND_COSINE, TS_BLEND_MEAN};
    for (int m = 0; m < 3; m++) {
        const char *name = ts_blend_name(modes[m]);
        tu_expect(ts_blend_parse(name) == (int)modes[m], "ts_blend_parse(ts_blend_name(%d)) round trip", m);
        for (size_t ti = 0; ti < sizeof tiles / sizeof *tiles; ti++) {
            const int T = tiles[ti];
            double *a = tu_alloc((size_t)T * sizeof *a), want[256];
            ts_blend_window(modes[m], T, a);
            naive_window(modes[m], T, want);
            int ok = tu_guard_check(a, "ts_blend_window", name);
            double worst = 0, asym = 0;
            for (int i = 0; i < T; i++) {
                worst = fmax(worst, fabs(a[i] - want[i]));
                asym = fmax(asym, fabs(a[i] - a[T - 1 - i]));
                if (!(a[i] > 0) || a[i] > 1) ok = 0;
                if (modes[m] == TS_BLEND_MEAN && a[i] != 1.0) ok = 0;
                if (modes[m] == TS_BLEND_GAUSSIAN && a[i] < 1e-3) ok = 0;
            }
            /* The centre has the most say. */
            if (T > 2 && modes[m] != TS_BLEND_MEAN && !(a[T / 2] >= a[0] && a[(T - 1) / 2] > a[0])) ok = 0;
            tu_expect(ok && worst <= 1e-14 && asym <= 1e-14,
                      "ts_blend_window %s T=%d: max error %.3g, asymmetry %.3g, positive, <= 1", name, T, worst, asym);
            tu_free(a, "ts_blend_window", name);
        }
    }
    double a[64];
    ts_blend_window(TS_BLEND_GAUSSIAN, 64, a);
    tu_expect(a[0] == 1e-3 && a[63] == 1e-3 && fabs(a[31] - exp(-0.25 / 128)) < 1e-15,
              "gaussian T=64: floored at 1e-3 on the edges (%.6g), %.6g next to the centre", a[0], a[31]);
    ts_blend_window(TS_BLEND_COSINE, 64, a);
    tu_expect(fabs(a[0] - pow(sin(PI / 128), 2)) < 1e-15 && a[0] > 0, "cosine T=64: > 0 on the edge (%.6g)", a[0]);
    tu_expect(ts_blend_parse("nope") == -1 && ts_blend_parse("MEAN") == TS_BLEND_MEAN && ts_blend_parse(NULL) == -1,
              "ts_blend_parse: unknown, case, NULL");
}

/* ---- 4. identity --------------------------------------------------------------------------- */
static int n_identity;

static void identity_case(int64_t W, int64_t H, int T, int overlap, int C, int batch, ts_blend blend, int readers)
{
    ts_stitch_params p = {W, H, C, C, T, overlap, batch, blend, readers};
    char what[200];
    describe(what, sizeof what, "identity", &p);
    run r;
    run_init(&r, &p, MODE_IDENTITY);
    r.use_read_ctx = readers > 1;
    n_identity++;
    if (!tu_expect_ok(run_stitch(&r, what), what)) {
        run_free(&r, what);
        return;
    }
    int ok = check_clean_run(&r, what);
    int64_t bad = 0;
    for (int k = 0; k < C && ok; k++)
        for (int64_t y = 0; y < H; y++)
            for (int64_t x = 0; x < W; x++) {
                float got = r.vals[((size_t)k * H + y) * W + x], want = synth(k, y, x);
                if (!same_bits(got, want) && bad++ == 0)
                    tu_expect(0, "%s: plane %d row %lld col %lld: %.9g, expected %.9g", what, k, (long long)y,
                              (long long)x, (double)got, (double)want);
            }
    if (ok) tu_expect(bad == 0, "%s: %lld values not the input bit for bit", what, (long long)bad);
    if (ok) check_valid(&r, what);
    run_free(&r, what);
}

static void test_identity(void)
{
    typedef struct shape {
        int64_t w, h;
        int tile;
    } shape;
    static const shape shapes[] = {
        {1, 1, 1},    {1, 1, 4},    {1, 1, 16},   {1, 37, 8},   {41, 1, 8},   {2, 2, 5},    {3, 2, 16},
        {5, 40, 16},  {40, 5, 16},  {16, 16, 16}, {17, 16, 16}, {16, 17, 16}, {17, 17, 16}, {64, 48, 16},
        {76, 40, 16}, {33, 20, 8},  {97, 61, 16}, {13, 11, 3},  {9, 9, 2},    {70, 66, 64}, {300, 257, 64},
    };
    static const int batches[] = {1, 3, 8};
    const ts_blend modes[] = {TS_BLEND_GAUSSIAN, TS_BLEND_COSINE, TS_BLEND_MEAN};
    int idx = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        const int T = shapes[s].tile;
        const int overlaps[] = {0, 1, T / 4, T / 2, T - 1};
        for (int oi = 0; oi < 5; oi++) {
            const int ov = overlaps[oi];
            if (ov >= T) continue;
            int dup = 0;
            for (int j = 0; j < oi; j++) dup |= overlaps[j] == ov;
            if (dup) continue;
            /* Keep the big scene's tile count sane: stride 1 on 300x257 is 46k tiles. */
            int64_t tmp[512];
            const int64_t tiles = shapes[s].w <= 511 && shapes[s].h <= 511
                                      ? naive_origins(shapes[s].w, T, ov, tmp) * naive_origins(shapes[s].h, T, ov, tmp)
                                      : 0;
            if (tiles * T * T > 2000000) continue;
            /* Mostly one reader (its reads are checked in row-major order), some several. */
            for (int m = 0; m < 3; m++, idx++)
                identity_case(shapes[s].w, shapes[s].h, T, ov, idx % 2 ? 3 : 1, batches[idx % 3], modes[m],
                              idx % 5 == 4 ? 3 : 1);
        }
    }
    /* Big tiles and many planes: the OpenMP paths of accumulate and emit. */
    identity_case(260, 140, 128, 32, 5, 2, TS_BLEND_GAUSSIAN, 1);
    identity_case(260, 140, 128, 0, 5, 1, TS_BLEND_MEAN, 2);
    tu_expect(n_identity > 150, "identity: %d runs", n_identity);
}

/* ---- 5. blending --------------------------------------------------------------------------- */
static void blend_case(int64_t W, int64_t H, int T, int overlap, int batch, ts_blend blend)
{
    ts_stitch_params p = {W, H, 2, 3, T, overlap, batch, blend, 1};
    char what[200];
    describe(what, sizeof what, "blend", &p);
    run r;
    run_init(&r, &p, MODE_BLEND);
    if (!tu_expect_ok(run_stitch(&r, what), what)) {
        run_free(&r, what);
        return;
    }
    if (check_clean_run(&r, what)) {
        double a[256];
        naive_window(blend, T, a);
        const int K = p.classes, tw = (int)(W < T ? W : T), th = (int)(H < T ? H : T);
        double *want = malloc((size_t)K * W * H * sizeof *want);
        for (int64_t y = 0; y < H; y++)
            for (int64_t x = 0; x < W; x++) {
                double num[3] = {0, 0, 0}, den = 0;
                for (int64_t ty = 0; ty < r.ny && r.oy[ty] <= y; ty++) {
                    if (y >= r.oy[ty] + th) continue;
                    for (int64_t tx = 0; tx < r.nx && r.ox[tx] <= x; tx++) {
                        if (x >= r.ox[tx] + tw) continue;
                        ts_window w = {r.ox[tx], r.oy[ty], tw, th};
                        const int iy = (int)(y - w.row_off), ix = (int)(x - w.col_off);
                        const double wt = a[iy] * a[ix];
                        den += wt;
                        for (int k = 0; k < K; k++) num[k] += wt * blend_value(k, &w, iy, ix);
                    }
                }
                for (int k = 0; k < K; k++) want[((size_t)k * H + y) * W + x] = den > 0 ? num[k] / den : -1e300;
            }
        ts_tensor shape = {.n = 1, .c = K, .h = (int)H, .w = (int)W};
        tu_check_close("stitch blend", what, &shape, r.vals, want, (size_t)K * W * H, 1e-6, 1e-6);
        check_valid(&r, what);
        free(want);
    }
    run_free(&r, what);
}

static void test_blend(void)
{
    const ts_blend modes[] = {TS_BLEND_GAUSSIAN, TS_BLEND_COSINE, TS_BLEND_MEAN};
    for (int m = 0; m < 3; m++) {
        const int ov16[] = {0, 1, 4, 8, 15};
        for (int i = 0; i < 5; i++) {
            blend_case(97, 61, 16, ov16[i], 1 + i % 3, modes[m]);
            blend_case(5, 40, 16, ov16[i], 4, modes[m]);
            blend_case(3, 2, 16, ov16[i], 2, modes[m]);
        }
        const int ov8[] = {0, 1, 2, 4, 7};
        for (int i = 0; i < 5; i++) blend_case(33, 20, 8, ov8[i], 3, modes[m]);
        const int ov64[] = {0, 1, 16, 32};
        for (int i = 0; i < 4; i++) blend_case(300, 257, 64, ov64[i], 8, modes[m]);
        blend_case(70, 66, 64, 63, 5, modes[m]);
    }
}

/* ---- streaming: rows leave while the scene is still being read ---------------------------- */
static void test_streaming(void)
{
    ts_stitch_params p = {40, 3000, 1, 1, 16, 4, 2, TS_BLEND_COSINE, 1};
    const char *what = "streaming 40x3000 T16";
    run r;
    run_init(&r, &p, MODE_IDENTITY);
    if (tu_expect_ok(run_stitch(&r, what), what)) {
        check_clean_run(&r, what);
        const int64_t total = r.nx * r.ny;
        tu_expect(r.reads_at_first_write < total / 4,
                  "%s: the first rows went out after %lld of %lld reads (expected well before the end)", what,
                  (long long)r.reads_at_first_write, (long long)total);
        tu_expect(r.writes >= 3000 / 64, "%s: %lld writes for 3000 rows (chunks of at most 64)", what,
                  (long long)r.writes);
    }
    run_free(&r, what);
}

/* ---- several readers: the same bits as one ------------------------------------------------- */
static int64_t n_reordered; /* multi-reader runs where a later batch was read before an earlier one */

/* Whether some tile of a later batch finished reading before a tile of an
 * earlier batch: the readers really went out of order. */
static int reordered(const run *r)
{
    const int64_t total = r->nx * r->ny, B = r->p.batch;
    int64_t max_before = -1;
    for (int64_t b0 = 0; b0 < total; b0 += B) {
        int64_t lo = INT64_MAX, hi = -1;
        for (int64_t t = b0; t < total && t < b0 + B; t++) {
            lo = r->finish[t] < lo ? r->finish[t] : lo;
            hi = r->finish[t] > hi ? r->finish[t] : hi;
        }
        if (lo < max_before) return 1;
        max_before = hi > max_before ? hi : max_before;
    }
    return 0;
}

/* One scene through 1, 2, 3 and 5 readers (own contexts or a shared one):
 * every run clean, and the written values and valid bytes those of one
 * reader bit for bit. MODE_BLEND: values that differ per tile, summed with
 * overlapping weights, so the order of accumulation would show. */
static void readers_case(int64_t W, int64_t H, int T, int overlap, int batch, ts_blend blend, int mode)
{
    static const int counts[] = {2, 3, 5};
    ts_stitch_params p = {W, H, 2, 3, T, overlap, batch, blend, 1};
    if (mode == MODE_IDENTITY) p.classes = p.channels;
    const char *kind = mode == MODE_BLEND ? "readers (blend)" : "readers (identity)";
    char what[220];
    describe(what, sizeof what, kind, &p);
    run one; /* the reference: one reader */
    run_init(&one, &p, mode);
    if (!tu_expect_ok(run_stitch(&one, what), what) || !check_clean_run(&one, what)) {
        run_free(&one, what);
        return;
    }
    for (int i = 0; i < 3; i++)
        for (int own = 0; own <= 1; own++) {
            p.readers = counts[i];
            describe(what, sizeof what, kind, &p);
            strcat(what, own ? ", own contexts" : ", one shared context");
            run r;
            run_init(&r, &p, mode);
            r.use_read_ctx = own;
            r.jitter_us = 200;
            if (tu_expect_ok(run_stitch(&r, what), what)) {
                if (check_clean_run(&r, what)) n_reordered += reordered(&r);
                const size_t nv = (size_t)p.classes * W * H * sizeof(float), nb = (size_t)W * H;
                tu_expect(memcmp(r.vals, one.vals, nv) == 0 && memcmp(r.valid, one.valid, nb) == 0,
                          "%s: the written scene equals one reader's bit for bit", what);
            }
            run_free(&r, what);
        }
    run_free(&one, "readers: the one-reader run");
}

static void test_readers(void)
{
    const ts_blend modes[] = {TS_BLEND_GAUSSIAN, TS_BLEND_COSINE, TS_BLEND_MEAN};
    /* Odd sizes, overlaps, batches that do not divide the tile count (9x7 = 63 tiles in batches of 2, 4, 5). */
    readers_case(97, 61, 16, 5, 2, modes[0], MODE_BLEND);
    readers_case(97, 61, 16, 5, 4, modes[1], MODE_BLEND);
    readers_case(101, 83, 16, 7, 5, modes[2], MODE_BLEND);
    readers_case(131, 37, 32, 9, 3, modes[0], MODE_BLEND);
    /* One tile per batch; more readers than batches; a scene smaller than the tile (padded by each reader). */
    readers_case(45, 29, 8, 3, 1, modes[1], MODE_BLEND);
    readers_case(40, 33, 16, 4, 7, modes[0], MODE_BLEND);
    readers_case(13, 11, 16, 4, 1, modes[2], MODE_BLEND);
    readers_case(5, 40, 16, 8, 3, modes[0], MODE_IDENTITY);
    readers_case(77, 59, 16, 4, 3, modes[1], MODE_IDENTITY);
    /* Reading out of order is what the readers are for; the slow tiles make it all but certain. */
    tu_expect(n_reordered > 0, "several readers: some batch was read before an earlier one (in %lld runs of 54)",
              (long long)n_reordered);
}

/* ---- 6. errors from the callbacks ---------------------------------------------------------- */
static void error_case(int fn, int64_t k, int slow_fn, const run *clean, int readers)
{
    static const char *names[] = {"", "read", "tile", "write"};
    static const char *slow_names[] = {"", " (slow read)", " (slow tile)", " (slow write)"};
    run r;
    run_init(&r, &clean->p, MODE_IDENTITY);
    r.p.readers = readers;
    r.use_read_ctx = readers > 1;
    r.fail_fn = fn;
    r.fail_at = k;
    r.slow_fn = slow_fn;
    r.slow_us = 300;
    char what[160], msg[64];
    snprintf(what, sizeof what, "%s fails at call %lld%s, %d reader%s", names[fn], (long long)k, slow_names[slow_fn],
             readers, readers == 1 ? "" : "s");
    snprintf(msg, sizeof msg, "boom %s %lld", names[fn], (long long)k);
    ts_status st = run_stitch(&r, what);
    const ts_status want = fn == FN_TILE ? TS_ERR_BACKEND : TS_ERR_IO;
    tu_expect(st == want && strcmp(ts_last_error(), msg) == 0,
              "%s: returned \"%s\" with \"%s\", expected \"%s\" with \"%s\"", what, ts_status_name(st),
              ts_last_error(), ts_status_name(want), msg);
    /* The failing function is not called again, and nothing ran past the
     * failure. Several readers may each have a read under way when one fails:
     * the count of reads is then only bounded by the tiles. */
    const int64_t calls = fn == FN_READ ? atomic_load(&r.reads) : fn == FN_TILE ? r.tile_calls : r.writes;
    if (fn == FN_READ && readers > 1)
        tu_expect(calls >= k && calls <= clean->nx * clean->ny, "%s: the read function was called %lld times", what,
                  (long long)calls);
    else
        tu_expect(calls == k, "%s: the failing function was called %lld times", what, (long long)calls);
    tu_expect(r.bad_read == 0 && r.bad_wins == 0 && r.bad_pad == 0 && r.bad_order == 0 && r.bad_progress == 0,
              "%s: the calls before the failure were sound (%s%s%s)", what, r.note_read, r.note_tile, r.note_write);
    check_reader_ctxs(&r, what);
    tu_expect(r.last_done < clean->nx * clean->ny || fn == FN_WRITE, "%s: progress stopped short (%lld)", what,
              (long long)r.last_done);
    tu_expect(tu_guard_check(r.vals, what, "values") && tu_guard_check(r.valid, what, "valid"), "%s: guards", what);
    run_free(&r, what);
}

static void test_errors(void)
{
    /* A clean run gives the call counts: 8x17 tiles in batches of 3, 200 rows in 4 writes. */
    ts_stitch_params p = {97, 200, 2, 2, 16, 4, 3, TS_BLEND_GAUSSIAN, 1};
    run clean;
    run_init(&clean, &p, MODE_IDENTITY);
    if (!tu_expect_ok(run_stitch(&clean, "errors: the clean run"), "errors: the clean run") ||
        !check_clean_run(&clean, "errors: the clean run")) {
        run_free(&clean, "errors: the clean run");
        return;
    }
    const int64_t counts[4] = {0, atomic_load(&clean.reads), clean.tile_calls, clean.writes};
    tu_expect(counts[FN_READ] == clean.nx * clean.ny && counts[FN_TILE] == (counts[FN_READ] + 2) / 3 &&
                  counts[FN_WRITE] >= 4,
              "errors: the clean run made %lld reads, %lld tile calls, %lld writes", (long long)counts[FN_READ],
              (long long)counts[FN_TILE], (long long)counts[FN_WRITE]);
    for (int fn = FN_READ; fn <= FN_WRITE; fn++) {
        const int64_t n = counts[fn];
        const int64_t ks[] = {1, 2, n / 2, n - 1, n};
        for (int i = 0; i < 5; i++) {
            if (ks[i] < 1 || (i > 0 && ks[i] == ks[i - 1])) continue;
            for (int slow = FN_NONE; slow <= FN_WRITE; slow++)
                if (slow == FN_NONE || i == 0 || i == 4) error_case(fn, ks[i], slow, &clean, 1);
            /* Several readers: while the others read, wait for a slot or are done. */
            if (i == 0 || i == 2 || i == 4)
                for (int rd = 2; rd <= 5; rd += 3) {
                    error_case(fn, ks[i], FN_NONE, &clean, rd);
                    error_case(fn, ks[i], i == 2 ? FN_READ : FN_TILE, &clean, rd);
                }
        }
    }
    run_free(&clean, "errors: the clean run");

    /* A run after failures is a clean run again. */
    identity_case(23, 19, 8, 3, 1, 2, TS_BLEND_MEAN, 1);
    identity_case(23, 19, 8, 3, 1, 2, TS_BLEND_MEAN, 3);
}

/* ---- pipelining: tile_start / tile_finish ---------------------------------------------------- */
static int n_pipelined;

/* The scene through the synchronous tile function (one reader), then
 * pipelined with `readers` readers: the same bits, and the pair used as
 * PIPELINING in stitch.h says. */
static void pipelined_case(int64_t W, int64_t H, int T, int overlap, int batch, ts_blend blend, int readers, int mode)
{
    ts_stitch_params p = {W, H, 2, mode == MODE_IDENTITY ? 2 : 3, T, overlap, batch, blend, 1};
    char what[220];
    describe(what, sizeof what, "pipelined: synchronous reference", &p);
    run one;
    run_init(&one, &p, mode);
    one.own_in = batch % 2; /* the synchronous path with the caller's input batches too */
    if (!tu_expect_ok(run_stitch(&one, what), what) || !check_clean_run(&one, what) || !check_ins_freed(&one, what)) {
        run_free(&one, what);
        return;
    }
    tu_expect(one.n_ins == (one.own_in ? 2 : 0), "%s: %d input batches from alloc_in, expected %d (N + 1)", what,
              one.n_ins, one.own_in ? 2 : 0);
    p.readers = readers;
    describe(what, sizeof what, mode == MODE_BLEND ? "pipelined (blend)" : "pipelined (identity)", &p);
    run r;
    run_init(&r, &p, mode);
    r.pipelined = 1;
    r.own_in = 1; /* as predict: the slots' batches in pinned memory */
    r.use_read_ctx = readers > 1 && readers <= MAX_TEST_READERS;
    r.jitter_us = readers > 1 ? 100 : 0;
    n_pipelined++;
    if (tu_expect_ok(run_stitch(&r, what), what) && check_clean_run(&r, what)) {
        const int64_t batches = (r.nx * r.ny + batch - 1) / batch;
        const size_t nv = (size_t)p.classes * W * H * sizeof(float), nb = (size_t)W * H;
        tu_expect(memcmp(r.vals, one.vals, nv) == 0 && memcmp(r.valid, one.valid, nb) == 0,
                  "%s: the written scene equals the synchronous one's bit for bit", what);
        tu_expect(r.bad_finish == 0, "%s: %lld bad finishes: %s", what, (long long)r.bad_finish, r.note_pipe);
        tu_expect(r.starts == batches && r.finishes == batches && r.tile_calls == batches && r.n_inflight == 0,
                  "%s: %lld starts, %lld finishes for %lld batches (%d left started)", what, (long long)r.starts,
                  (long long)r.finishes, (long long)batches, r.n_inflight);
        tu_expect(r.n_ins == readers + 2, "%s: %d input batches from alloc_in, expected %d (N + 2)", what, r.n_ins,
                  readers + 2);
        check_ins_freed(&r, what);
        /* Batch b starts before b - 1 finishes: two at once, never more. */
        tu_expect(r.max_inflight == (batches > 1 ? 2 : 1), "%s: at most %d batches started at once, expected %d",
                  what, r.max_inflight, batches > 1 ? 2 : 1);
    }
    run_free(&r, what);
    run_free(&one, "pipelined: the synchronous run");
}

/* A start or finish failing at its k-th call: that status and message, the
 * calls before it in pipelined order, none after. */
static void pipelined_error_case(int fn, int64_t k, int readers, int64_t batches, const ts_stitch_params *p0)
{
    run r;
    run_init(&r, p0, MODE_IDENTITY);
    r.p.readers = readers;
    r.use_read_ctx = readers > 1;
    r.pipelined = 1;
    r.fail_fn = fn;
    r.fail_at = k;
    char what[160], msg[64];
    const char *name = fn == FN_START ? "start" : "finish";
    snprintf(what, sizeof what, "pipelined: tile_%s fails at call %lld of %lld, %d reader%s", name, (long long)k,
             (long long)batches, readers, readers == 1 ? "" : "s");
    snprintf(msg, sizeof msg, "boom %s %lld", name, (long long)k);
    ts_status st = run_stitch(&r, what);
    tu_expect(st == TS_ERR_BACKEND && strcmp(ts_last_error(), msg) == 0,
              "%s: returned \"%s\" with \"%s\", expected \"%s\"", what, ts_status_name(st), ts_last_error(), msg);
    /* Start b, finish b - 1: a failed start k leaves k - 2 finished; a
     * failed finish k came after start k + 1 (or after the last start). */
    const int64_t want_starts = fn == FN_START ? k : (k < batches ? k + 1 : k);
    const int64_t want_finishes = fn == FN_START ? (k >= 2 ? k - 2 : 0) : k;
    tu_expect(r.starts == want_starts && r.finishes == want_finishes,
              "%s: %lld starts and %lld finishes, expected %lld and %lld", what, (long long)r.starts,
              (long long)r.finishes, (long long)want_starts, (long long)want_finishes);
    tu_expect(r.bad_finish == 0 && r.bad_read == 0 && r.bad_wins == 0 && r.bad_pad == 0 && r.bad_order == 0,
              "%s: the calls before the failure were sound (%s%s%s)", what, r.note_pipe, r.note_read, r.note_tile);
    tu_expect(tu_guard_check(r.vals, what, "values") && tu_guard_check(r.valid, what, "valid"), "%s: guards", what);
    run_free(&r, what);
}

/* alloc_in failing at its k-th call: its status, and a message that names
 * the slot and keeps the allocator's; every batch it gave is freed, and no
 * thread ran a function. */
static void alloc_in_error_case(int64_t k, int readers, int pipelined)
{
    const ts_stitch_params p = {40, 30, 2, 2, 16, 4, 2, TS_BLEND_MEAN, readers};
    run r;
    run_init(&r, &p, MODE_IDENTITY);
    r.pipelined = pipelined;
    r.own_in = 1;
    r.fail_in_at = k;
    char what[160], slot[64], cause[64];
    snprintf(what, sizeof what, "alloc_in fails at call %lld, %d readers, %s", (long long)k, readers,
             pipelined ? "pipelined" : "synchronous");
    snprintf(slot, sizeof slot, "read slot %lld of %d", (long long)k, readers + (pipelined ? 2 : 1));
    snprintf(cause, sizeof cause, "no pinned memory left (call %lld)", (long long)k);
    tu_expect_error(run_stitch(&r, what), TS_ERR_NOMEM, what, "stitch", slot, cause, NULL);
    tu_expect(r.n_ins == k - 1 && atomic_load(&r.reads) == 0 && r.tile_calls == 0 && r.starts == 0 && r.writes == 0,
              "%s: %d batches allocated, then nothing ran (%lld reads, %lld tiles, %lld starts, %lld writes)", what,
              r.n_ins, (long long)atomic_load(&r.reads), (long long)r.tile_calls, (long long)r.starts,
              (long long)r.writes);
    check_ins_freed(&r, what);
    run_free(&r, what);
}

static void test_pipelined(void)
{
    static const int readers[] = {1, 2, 3, 5};
    /* 9x6 = 54 tiles: batches of 1, 3 (divide) and 8 (a last batch of 6). */
    static const int batches[] = {1, 3, 8};
    for (int i = 0; i < 4; i++)
        for (int b = 0; b < 3; b++)
            pipelined_case(97, 61, 16, 5, batches[b], (ts_blend)((i + b) % 3), readers[i], MODE_BLEND);
    pipelined_case(77, 59, 16, 4, 5, TS_BLEND_GAUSSIAN, 3, MODE_IDENTITY);
    /* A single batch: 2x2 tiles in a batch of 8, one tile, a scene smaller than the tile. */
    for (int i = 0; i < 4; i++) {
        pipelined_case(20, 20, 16, 4, 8, TS_BLEND_COSINE, readers[i], MODE_BLEND);
        pipelined_case(16, 16, 16, 0, 1, TS_BLEND_MEAN, readers[i], MODE_IDENTITY);
        pipelined_case(13, 11, 16, 4, 2, TS_BLEND_GAUSSIAN, readers[i], MODE_BLEND);
    }
    /* Two batches, the second partial. */
    pipelined_case(40, 20, 16, 4, 3, TS_BLEND_GAUSSIAN, 2, MODE_BLEND);
    /* The most readers: 66 read slots, every one in the free queue at the
     * start, and 136 batches, so that each is used more than once. */
    pipelined_case(97, 200, 16, 4, 1, TS_BLEND_COSINE, 64, MODE_BLEND);

    /* Errors: 8x17 tiles in batches of 3, 46 batches. */
    const ts_stitch_params p = {97, 200, 2, 2, 16, 4, 3, TS_BLEND_GAUSSIAN, 1};
    const int64_t nb = (8 * 17 + 2) / 3;
    const int64_t ks[] = {1, 2, 3, nb / 2, nb - 1, nb};
    for (int fn = FN_START; fn <= FN_FINISH; fn++)
        for (int i = 0; i < 6; i++)
            for (int rd = 1; rd <= 4; rd += 3) pipelined_error_case(fn, ks[i], rd, nb, &p);
    for (int pl = 0; pl <= 1; pl++)
        for (int rd = 1; rd <= 3; rd += 2) {
            alloc_in_error_case(1, rd, pl);
            alloc_in_error_case(2, rd, pl);
            alloc_in_error_case(rd + 1 + pl, rd, pl); /* the last slot */
        }
    /* A run after failures is a clean run again. */
    pipelined_case(23, 19, 8, 3, 2, TS_BLEND_MEAN, 3, MODE_BLEND);
}

/* ---- 7. bad parameters --------------------------------------------------------------------- */
static ts_status ok_read(void *ctx, const ts_window *w, float *data, uint8_t *valid)
{
    (void)ctx, (void)w, (void)data, (void)valid;
    return TS_OK;
}
static ts_status ok_tile(void *ctx, int n, const ts_window *wins, const float *in, float *out)
{
    (void)ctx, (void)n, (void)wins, (void)in, (void)out;
    return TS_OK;
}
static ts_status ok_write(void *ctx, int64_t row0, int nrows, const float *values, const uint8_t *valid)
{
    (void)ctx, (void)row0, (void)nrows, (void)values, (void)valid;
    return TS_OK;
}
static ts_status ok_start(void *ctx, int n, const ts_window *wins, const float *in)
{
    (void)ctx, (void)n, (void)wins, (void)in;
    return TS_OK;
}
static ts_status ok_finish(void *ctx, int n, const ts_window *wins, float *out)
{
    (void)ctx, (void)n, (void)wins, (void)out;
    return TS_OK;
}
static ts_status ok_alloc_in(void *ctx, void **p, size_t bytes)
{
    (void)ctx;
    *p = malloc(bytes);
    return *p ? TS_OK : TS_ERR_NOMEM;
}
static void ok_free_in(void *ctx, void *p)
{
    (void)ctx;
    free(p);
}

static void bad_param(ts_stitch_params p, const char *what, const char *field)
{
    ts_stitch_fns f = {.read = ok_read, .tile = ok_tile, .write = ok_write};
    size_t bytes = 12345;
    watch_what = what; /* a parameter let through may loop (a zero stride) */
    alarm(60);
    tu_expect_error(ts_stitch_run(&p, &f), TS_ERR_INVALID_ARG, what, "stitch", field, NULL);
    tu_expect_error(ts_stitch_memory(&p, 0, &bytes), TS_ERR_INVALID_ARG, what, "stitch", field, NULL);
    alarm(0);
}

static void test_bad_params(void)
{
    const ts_stitch_params good = {50, 40, 3, 2, 16, 4, 2, TS_BLEND_GAUSSIAN, 2};
    ts_stitch_params p;
    p = good, p.width = 0;
    bad_param(p, "width 0", "scene size");
    p = good, p.height = -3;
    bad_param(p, "height -3", "scene size");
    p = good, p.channels = 0;
    bad_param(p, "channels 0", "input");
    p = good, p.classes = 0;
    bad_param(p, "classes 0", "output");
    p = good, p.tile = 0;
    bad_param(p, "tile 0", "tile");
    p = good, p.overlap = 16;
    bad_param(p, "overlap == tile", "overlap 16");
    p = good, p.overlap = 99;
    bad_param(p, "overlap > tile", "overlap 99");
    p = good, p.overlap = -1;
    bad_param(p, "overlap -1", "overlap -1");
    p = good, p.batch = 0;
    bad_param(p, "batch 0", "batch");
    p = good, p.blend = (ts_blend)7;
    bad_param(p, "blend 7", "blend");
    p = good, p.readers = -1;
    bad_param(p, "readers -1", "readers -1");
    p = good, p.readers = 65;
    bad_param(p, "readers 65", "readers 65");

    ts_stitch_fns f = {.read = ok_read, .tile = ok_tile, .write = ok_write};
    ts_stitch_fns g = f;
    g.read = NULL;
    tu_expect_error(ts_stitch_run(&good, &g), TS_ERR_INVALID_ARG, "no read function", "read", NULL);
    g = f, g.tile = NULL;
    tu_expect_error(ts_stitch_run(&good, &g), TS_ERR_INVALID_ARG, "no tile function", "tile", NULL);
    g = f, g.write = NULL;
    tu_expect_error(ts_stitch_run(&good, &g), TS_ERR_INVALID_ARG, "no write function", "write", NULL);
    tu_expect_error(ts_stitch_run(&good, NULL), TS_ERR_INVALID_ARG, "no functions", "read", NULL);
    g = f, g.tile_start = ok_start;
    tu_expect_error(ts_stitch_run(&good, &g), TS_ERR_INVALID_ARG, "tile_start without tile_finish", "tile_finish",
                    NULL);
    g = f, g.tile = NULL, g.tile_finish = ok_finish;
    tu_expect_error(ts_stitch_run(&good, &g), TS_ERR_INVALID_ARG, "tile_finish alone", "tile", NULL);
    g = f, g.alloc_in = ok_alloc_in;
    tu_expect_error(ts_stitch_run(&good, &g), TS_ERR_INVALID_ARG, "alloc_in without free_in", "free_in", NULL);
    g = f, g.free_in = ok_free_in;
    tu_expect_error(ts_stitch_run(&good, &g), TS_ERR_INVALID_ARG, "free_in alone", "alloc_in", NULL);
    watch_what = "do-nothing functions";
    alarm(60);
    tu_expect_ok(ts_stitch_run(&good, &f), "good parameters with do-nothing functions");
    p = good, p.readers = 0;
    tu_expect_ok(ts_stitch_run(&p, &f), "readers 0 (one reader)");
    p = good, p.readers = 64;
    tu_expect_ok(ts_stitch_run(&p, &f), "readers 64, more than the batches");
    g = f, g.tile = NULL, g.tile_start = ok_start, g.tile_finish = ok_finish;
    tu_expect_ok(ts_stitch_run(&p, &g), "readers 64 pipelined (66 read slots)");
    alarm(0);
}

/* ---- 8. memory ----------------------------------------------------------------------------- */
/* The MEMORY formula of stitch.h. */
static double listed_bytes(const ts_stitch_params *p, int pipelined)
{
    const double K = p->classes, C = p->channels, T = p->tile, W = (double)p->width;
    const double R = (double)(p->height < p->tile ? p->height : p->tile), N = p->readers > 0 ? p->readers : 1;
    const double S = N + (pipelined ? 2 : 1);
    return (8 * K + 9) * R * W + 2 * (4 * K + 1) * 64 * W + (S * p->batch + N) * T * T * (4 * C + 1) +
           4 * K * p->batch * T * T + 8 * T * T;
}

static void test_memory(void)
{
    ts_stitch_params p = {1000, 5000, 4, 6, 256, 32, 8, TS_BLEND_GAUSSIAN, 1};
    size_t b[5];
    for (int i = 0; i < 5; i++) {
        p.width = 1000 * (i + 1);
        tu_expect_ok(ts_stitch_memory(&p, 0, &b[i]), "ts_stitch_memory");
    }
    tu_expect(b[1] > b[0] && b[1] - b[0] == b[2] - b[1] && b[2] - b[1] == b[4] - b[3],
              "ts_stitch_memory linear in the width: %zu %zu %zu %zu %zu", b[0], b[1], b[2], b[3], b[4]);
    p.width = 3000;
    static const int64_t heights[] = {256, 257, 1000, 1000000, 4000000000LL};
    int same = 1;
    for (int i = 0; i < 5; i++) {
        size_t bh = 0;
        p.height = heights[i];
        tu_expect_ok(ts_stitch_memory(&p, 0, &bh), "ts_stitch_memory");
        same &= bh == b[2];
    }
    tu_expect(same, "ts_stitch_memory does not depend on the height (>= tile)");
    static const ts_stitch_params cases[] = {
        {3000, 5000, 4, 6, 256, 32, 8, TS_BLEND_GAUSSIAN, 1}, {100, 10, 3, 2, 64, 0, 1, TS_BLEND_MEAN, 3},
        {1, 1, 1, 1, 1, 0, 1, TS_BLEND_COSINE, 0},            {50000, 50000, 3, 10, 512, 64, 16, TS_BLEND_GAUSSIAN, 4},
        {3000, 5000, 4, 6, 256, 32, 8, TS_BLEND_GAUSSIAN, 64},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        for (int pl = 0; pl <= 1; pl++) {
            size_t bytes = 0;
            tu_expect_ok(ts_stitch_memory(&cases[i], pl, &bytes), "ts_stitch_memory");
            const double want = listed_bytes(&cases[i], pl);
            tu_expect((double)bytes >= want && (double)bytes <= want + 1e6,
                      "ts_stitch_memory %lldx%lld T%d pipelined %d: %zu bytes, the listed buffers are %.0f",
                      (long long)cases[i].width, (long long)cases[i].height, cases[i].tile, pl, bytes, want);
        }
    }
    /* A shorter scene than the tile needs a shorter ring; more batch, more memory. */
    size_t lo = 0, hi = 0;
    p = (ts_stitch_params){3000, 100, 4, 6, 256, 32, 8, TS_BLEND_GAUSSIAN, 1};
    ts_stitch_memory(&p, 0, &lo);
    p.height = 256;
    ts_stitch_memory(&p, 0, &hi);
    tu_expect(lo < hi, "ts_stitch_memory: a 100-row scene (%zu) needs less than a 256-row one (%zu)", lo, hi);
    p.batch = 16;
    ts_stitch_memory(&p, 0, &lo);
    tu_expect(lo > hi, "ts_stitch_memory grows with the batch");
    /* Readers: 0 is 1; each more adds a read slot of the batch and a scratch tile. */
    size_t r0 = 0, r1 = 0, r4 = 0;
    p.readers = 0;
    ts_stitch_memory(&p, 0, &r0);
    p.readers = 1;
    ts_stitch_memory(&p, 0, &r1);
    p.readers = 4;
    ts_stitch_memory(&p, 0, &r4);
    tu_expect(r0 == r1 && (double)(r4 - r1) == 3.0 * (p.batch + 1) * 256 * 256 * (4 * 4 + 1),
              "ts_stitch_memory: readers 0 (%zu) = 1 (%zu); 4 readers add 3 slots and scratch tiles (%zu)", r0, r1, r4);
    /* Pipelined: one more read slot of the batch. */
    size_t p4 = 0;
    ts_stitch_memory(&p, 1, &p4);
    tu_expect((double)(p4 - r4) == 1.0 * p.batch * 256 * 256 * (4 * 4 + 1),
              "ts_stitch_memory: pipelined (%zu) adds one read slot to %zu", p4, r4);
}

int main(void)
{
    ts_threads_init(0);
    signal(SIGALRM, on_alarm);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    test_origins();
    test_reflect();
    test_windows();
    test_bad_params();
    test_memory();
    test_identity();
    test_blend();
    test_streaming();
    test_readers();
    test_errors();
    test_pipelined();
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("test_stitch: %d identity runs, %lld of 54 several-reader runs read out of order, %d pipelined runs, "
           "%.2f s\n",
           n_identity, (long long)n_reordered, n_pipelined,
           (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    return tu_finish("test_stitch");
}
