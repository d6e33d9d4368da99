/* Sliding-window inference over a whole scene in bounded memory: tiles are
 * read, run through any per-tile function, blended where they overlap and
 * handed on as final rows, top to bottom, while the scene is still being
 * read. Nothing here knows about models or files: the caller gives three
 * functions (read a window, run a batch of tiles, write final rows), so the
 * stitcher is tested with an identity function and predict plugs in the
 * U-Net.
 *
 * TILES. Square tiles of side T; origins along each axis every T - overlap
 * pixels from 0, the last one moved back to size - T so that it ends on the
 * edge (never padded, never left out: the GridGeoSampler bug of peers.md
 * §3.14). An axis shorter than T has one tile at 0, read at the scene's size
 * and padded to T by reflection (PyTorch's "reflect": the edge pixel is not
 * repeated; repeated reflection when T > 2 size - 1; an axis of one pixel is
 * replicated). The padding is only context: it is never written out.
 *
 * BLENDING. Each output pixel is sum_t w_t f_t / sum_t w_t over the tiles t
 * covering it, with w(y, x) = a(y) a(x) from a 1-D window a over the tile:
 *   MEAN      a = 1 (the tutorial's plain average);
 *   GAUSSIAN  a(i) = exp(-(i + 0.5 - T/2)^2 / (2 sigma^2)), sigma = T/8
 *             (nnU-Net's importance map), floored at 1e-3 so that the
 *             scene's own edges, seen by one tile only, keep a sound weight;
 *   COSINE    a(i) = sin^2(pi (i + 0.5) / T) (a Hann window; > 0 everywhere).
 * The smooth windows give a tile's centre, where the network sees the most
 * context, the most say and remove the seams a plain mean leaves. Sums are
 * kept in double, so an identity tile function gives back its input exactly,
 * bit for bit, in every mode (save the sign of a zero: -0.0 comes back +0.0).
 *
 * MEMORY. Rows are final once no later tile covers them. The accumulator is
 * a ring of R = min(T, height) rows (K double sums + one double weight + one
 * valid byte per pixel), final rows go out in chunks of at most 64 rows
 * through two write buffers, S read slots of `batch` tiles feed the tile
 * function (N = readers; S = N + 1, or N + 2 with a pipelined tile function,
 * which holds a started batch's slot besides the one it is given: see
 * THREADS), each reader has a tile of padding scratch, and the tile function
 * writes into one output batch. Peak memory is therefore about
 *     (8 K + 9) R W + 2 (4 K + 1) 64 W + (S batch + N) T^2 (4 C + 1)
 *       + 4 K batch T^2 + 8 T^2  bytes
 * whatever the scene's height (ts_stitch_memory reports it).
 *
 * THREADS. The read function runs on N reader threads, the tile function on
 * the calling thread, the write function on a writer thread, so reading,
 * compute and writing overlap. Tiles go in batches of `batch` tiles in
 * row-major order; each reader in turn claims the next whole batch and reads
 * its tiles in order into a free slot, so several batches are read at once
 * (a compressed GeoTIFF decodes slowly: one reader can starve the model) and
 * may be finished in any order, but the tile function gets them strictly in
 * order, in the same batches, and the blending sums in the same order: the
 * output is the same bit for bit whatever N. With N = 1 the read function
 * sees the tiles in row-major order. Each reader calls read with its own
 * context (read_ctx[i]) from its own thread, so a read function that is not
 * thread-safe (a GDAL handle) is fine with one handle per reader; the tile,
 * write and progress functions are called from one thread only and in order
 * (rows top to bottom). The first error of any of them stops every thread
 * and is returned with its message.
 *
 * PIPELINING. A tile function that runs on a device can instead be given as
 * a pair: tile_start queues batch b and returns; tile_finish completes the
 * oldest batch started and not yet finished. The stitcher starts batch b,
 * then finishes and blends batch b - 1 while b runs on the device, and
 * finishes the last batch after the loop: at most two batches are started
 * and unfinished. A started batch keeps its read slot (its `in` and `wins`
 * stay valid and unchanged) until it is finished, so the readers get one
 * more slot (N + 2) to keep all N busy meanwhile. The batches, the order of
 * the tile_finish calls and of the blending are those of the synchronous
 * path, so the output is the same bit for bit. After an error the run
 * stops without finishing a batch still started: the caller's cleanup must
 * wait for (or discard) the work it queued. */
#ifndef TS_IO_STITCH_H
#define TS_IO_STITCH_H

#include <stddef.h>
#include <stdint.h>

#include "io/io.h"

typedef enum ts_blend {
    TS_BLEND_GAUSSIAN = 0, /* the default */
    TS_BLEND_COSINE,
    TS_BLEND_MEAN,
} ts_blend;

/* "gaussian", "cosine", "mean" -> the mode; -1 when unknown. */
int ts_blend_parse(const char *name);
const char *ts_blend_name(ts_blend b);

typedef struct ts_stitch_params {
    int64_t width, height; /* the scene, >= 1 */
    int channels;          /* C: planes the read function gives per pixel */
    int classes;           /* K: planes the tile function returns per pixel */
    int tile;              /* T >= 1 */
    int overlap;           /* 0 <= overlap < T */
    int batch;             /* tiles per tile-function call, >= 1 */
    ts_blend blend;
    int readers;           /* N: reader threads, 1..64; 0 means 1 (see THREADS) */
} ts_stitch_params;

typedef struct ts_stitch_fns {
    void *ctx; /* passed to every function (to read too unless read_ctx) */
    /* Window w (inside the scene; w->width, w->height <= T): C planes of
     * w->height x w->width floats and a valid byte per pixel (1 = valid).
     * Reader threads: ctx is read_ctx[i] on reader i. */
    ts_status (*read)(void *ctx, const ts_window *w, float *data, uint8_t *valid);
    /* n tiles in[n][C][T][T] -> out[n][K][T][T]; wins[i] is tile i's
     * window on the scene (before padding). Calling thread. NULL when the
     * pipelined pair below is given (then tile is never called). */
    ts_status (*tile)(void *ctx, int n, const ts_window *wins, const float *in, float *out);
    /* Final rows [row0, row0 + nrows): K planes of nrows x width blended
     * values, and nrows x width valid bytes. Writer thread. */
    ts_status (*write)(void *ctx, int64_t row0, int nrows, const float *values, const uint8_t *valid);
    /* Optional, calling thread, after each batch: tiles done of total. */
    void (*progress)(void *ctx, int64_t done, int64_t total);
    /* Optional: read_ctx[i] (i < N) is reader i's ctx for read, e.g. its own
     * file handle. NULL: every reader passes ctx, and with N > 1 read must
     * then be safe to call from several threads at once. */
    void *const *read_ctx;
    /* Optional, both or neither (see PIPELINING), calling thread: tile in
     * two halves. tile_start queues n tiles in[n][C][T][T] (in and wins
     * stay valid until the batch is finished); tile_finish writes the
     * OLDEST started, unfinished batch into out[n][K][T][T] (n and wins
     * are that batch's). When set, tile is not used. */
    ts_status (*tile_start)(void *ctx, int n, const ts_window *wins, const float *in);
    ts_status (*tile_finish)(void *ctx, int n, const ts_window *wins, float *out);
    /* Optional, both or neither, calling thread: how the read slots' input
     * batches (the `in` of tile and tile_start) are allocated and freed,
     * e.g. in a device's page-locked memory, so that tile_start can queue
     * their upload instead of copying them at once. Every slot's batch is
     * allocated before any thread starts and freed when the run ends, after
     * an error too, when a started batch may still be in the device's
     * queue: free_in must then wait for what reads it (it is never given
     * NULL). NULL: malloc/free. */
    ts_status (*alloc_in)(void *ctx, void **p, size_t bytes);
    void (*free_in)(void *ctx, void *p);
} ts_stitch_fns;

/* Tile origins along an axis of `size` pixels (see TILES): fills up to
 * max_n origins and returns how many the axis has (call with max_n = 0 to
 * count). The tile at origin o covers [o, min(o + T, size)). */
int64_t ts_stitch_origins(int64_t size, int tile, int overlap, int64_t *origins, int64_t max_n);
/* Checks p (names the bad field) and gives the peak bytes the stitcher
 * allocates for it (the MEMORY formula); pipelined = 1 for a run with
 * tile_start and tile_finish (one more read slot). */
ts_status ts_stitch_memory(const ts_stitch_params *p, int pipelined, size_t *bytes);
/* Runs the whole scene. */
ts_status ts_stitch_run(const ts_stitch_params *p, const ts_stitch_fns *f);

/* The 1-D blending window a[0..T) of the mode (see BLENDING). */
void ts_blend_window(ts_blend b, int tile, double *a);
/* Reflection index into [0, n) for any integer i (see TILES). */
int64_t ts_reflect_index(int64_t i, int64_t n);

#endif
