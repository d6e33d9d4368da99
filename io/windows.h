/* Training/prediction windows on the image grid, and spatial splits.
 *
 * A window list is made by one generator (a regular grid, random draws, a
 * CSV, vector features), optionally thinned by filters (a callback per
 * window: the lead plugs in the raster/label readers), optionally stored in
 * an index cache so that a big scene is scanned once, optionally split into
 * train/val/test by spatial blocks (io/split.c), and written as CSV.
 *
 * Conventions: windows are pixel rectangles on the image grid (ts_window,
 * io/io.h), columns = x, rows = y, offsets from the top-left pixel. Every
 * generator appends to the list it is given (clear it first for a fresh
 * list) and leaves the list as it was when it fails. */
#ifndef TS_IO_WINDOWS_H
#define TS_IO_WINDOWS_H

#include <stddef.h>
#include <stdint.h>

#include "io/io.h"

/* ---- split tags ------------------------------------------------------------- */
typedef enum ts_split_tag {
    TS_SPLIT_NONE = 0, /* not assigned */
    TS_SPLIT_TRAIN = 1,
    TS_SPLIT_VAL = 2,
    TS_SPLIT_TEST = 3,
    TS_SPLIT_BUFFER = 4, /* dropped from val/test by the split buffer: use for nothing */
    TS_SPLIT_COUNT
} ts_split_tag;

/* "none", "train", "val", "test", "buffer". */
const char *ts_split_name(ts_split_tag t);
/* Parses those names (case-sensitive; "" reads as none). Returns 0 on an unknown name. */
int ts_split_parse(const char *s, ts_split_tag *out);

/* ---- the window list -----------------------------------------------------------
 * Parallel arrays of `count` entries (capacity `cap`): the windows themselves
 * (w[] is a plain ts_window array the readers can take), a source id per
 * window (grid: row-major index in the grid; random: draw number; CSV: data
 * row number, 0 = first row after the header; vector: OGR feature id), a
 * split tag and a score. has_split / has_score say whether split[] / score[]
 * carry information (the CSV writer then writes those columns). */
typedef struct ts_window_list {
    ts_window *w;
    int64_t *id;
    uint8_t *split; /* ts_split_tag */
    double *score;
    size_t count, cap;
    int has_split, has_score;
} ts_window_list;

void ts_window_list_init(ts_window_list *l);
void ts_window_list_free(ts_window_list *l); /* leaves an empty, initialized list */
void ts_window_list_clear(ts_window_list *l); /* count = 0, flags cleared, memory kept */
ts_status ts_window_list_reserve(ts_window_list *l, size_t cap);
/* Appends one window (split NONE, score 0). */
ts_status ts_window_list_push(ts_window_list *l, ts_window w, int64_t id);
ts_status ts_window_list_copy(ts_window_list *dst, const ts_window_list *src); /* dst initialized or freed */

/* ---- generators ----------------------------------------------------------------
 * A raster smaller than the tile: by default an error (the message gives the
 * sizes and suggests a smaller tile or allow_small), because windows smaller
 * than the tile do not batch. With allow_small = 1 a dimension shorter than
 * the tile gets one window spanning that whole dimension (width or height =
 * the raster's), which the reader must pad. */

/* A regular grid of tile_w x tile_h windows, stride_x/stride_y apart
 * (stride = tile - overlap; 1 <= stride <= tile). Along each axis of length
 * L > tile: offsets 0, s, 2s, ... while offset + tile < L, then one last
 * window at L - tile, shifted back to the edge, so every pixel is covered and
 * no window hangs over the raster: n = ceil((L - tile) / s) + 1 windows
 * (L == tile: one). Windows come row-major (rows of windows top to bottom,
 * left to right in a row); id = that index. */
ts_status ts_windows_grid(ts_window_list *out, int64_t raster_w, int64_t raster_h, int tile_w, int tile_h,
                          int stride_x, int stride_y, int allow_small);

/* count windows of tile_w x tile_h, offsets uniform over [0, L - tile] on
 * each axis (splitmix64 from seed, unbiased), the same on every machine and
 * for every thread count. Drawn with replacement (a window may repeat);
 * id = draw number. */
ts_status ts_windows_random(ts_window_list *out, int64_t raster_w, int64_t raster_h, int tile_w, int tile_h,
                            size_t count, uint64_t seed, int allow_small);

/* Windows from a CSV file. The header line is required; columns are found by
 * name (NULL names take the defaults below), in any order, extra columns are
 * ignored. col_off and row_off are required; width/height columns are used
 * when present (else default_w/default_h: both > 0 then), a "split" column is
 * read when present (train/val/test/buffer/none or empty) and sets has_split,
 * a "score" column likewise sets has_score. Fields may be double-quoted (no
 * embedded quotes); blank lines are skipped; CRLF is accepted.
 * Errors (TS_ERR_INVALID_ARG, naming the file, the line number and the
 * column): no header, a required column missing from it, a missing field,
 * a value that is not an integer (or not a number, for score), a negative
 * offset or non-positive size, a window outside the raster_w x raster_h grid
 * (the message gives the window, the raster size and how many such rows
 * there are). An unreadable file is TS_ERR_IO. */
typedef struct ts_csv_columns {
    const char *col_off; /* default "col_off" */
    const char *row_off; /* default "row_off" */
    const char *width;   /* default "width" (optional column) */
    const char *height;  /* default "height" (optional column) */
    const char *split;   /* default "split" (optional column) */
    const char *score;   /* default "score" (optional column) */
} ts_csv_columns;
ts_status ts_windows_read_csv(ts_window_list *out, const char *path, const ts_csv_columns *cols, int64_t raster_w,
                              int64_t raster_h, int default_w, int default_h);

/* Writes "col_off,row_off,width,height" plus ",split" when has_split and
 * ",score" when has_score (%.17g), one line per window, to path + ".tmp" and
 * renames it over path, so a reader never sees a half-written file. */
ts_status ts_windows_write_csv(const ts_window_list *l, const char *path);

/* Windows from vector features (any OGR source). For each feature, in the
 * layer's order: a NULL or empty geometry is skipped; the centre of its
 * envelope (bounding box) is transformed from the layer's CRS to the image
 * CRS (both in traditional GIS axis order: x = easting/longitude), turned
 * into a pixel position with the inverse geotransform, and the window is the
 * tile_w x tile_h tile of the regular tile grid (origin at pixel 0,0) that
 * holds that pixel, clamped to the raster (shifted left/up at the right and
 * bottom edges). A centre outside the raster skips the feature (counted in
 * outside). A window equal to an earlier one is dropped (counted in
 * duplicates), so each window appears once, in first-feature order;
 * id = the FID of that first feature.
 * layer: a layer name, or NULL for the first layer. Errors: the source or
 * layer cannot be opened, the layer or the grid has no CRS, the CRSs cannot
 * be transformed, the geotransform cannot be inverted. */
typedef struct ts_vector_stats {
    size_t features; /* features read */
    size_t empty;    /* NULL or empty geometries skipped */
    size_t outside;  /* centres outside the raster (or not transformable) skipped */
    size_t duplicates;
    size_t windows; /* windows appended */
} ts_vector_stats;
ts_status ts_windows_from_vector(ts_window_list *out, const char *path, const char *layer, const ts_grid *grid,
                                 int tile_w, int tile_h, int allow_small, ts_vector_stats *stats);

/* Size, geotransform and CRS of a raster (GDALOpen, read-only): what the
 * generators above need. A raster without a geotransform gets GDAL's default
 * (0, 1, 0, 0, 0, 1); crs_wkt is NULL when it has no CRS. */
ts_status ts_windows_read_grid(const char *path, ts_grid *grid);

/* ---- filters ---------------------------------------------------------------------
 * A filter decides per window: *keep = 1 keeps it, 0 drops it. It returns
 * TS_OK, or an error (with ts_error()) that stops the filtering.
 *
 * ts_windows_filter() calls fn for every window on `threads` OpenMP threads
 * (<= 0: the current OpenMP default, 1: this thread only); fn must then be
 * safe to call concurrently with the same ctx. ts_windows_filter_ctx() gives
 * thread t its own context ctxs[t] (n_ctx contexts = n_ctx threads), for
 * readers that hold per-thread GDAL handles. Either way the kept windows stay
 * in their original order and the result does not depend on the thread
 * count. On an error the list is unchanged and the error reported is the one
 * of the lowest-index failing window (whatever the thread count), with its
 * message carried over to the calling thread. */
typedef ts_status (*ts_window_filter_fn)(void *ctx, const ts_window *w, int *keep);
ts_status ts_windows_filter(ts_window_list *l, ts_window_filter_fn fn, void *ctx, int threads, size_t *dropped);
ts_status ts_windows_filter_ctx(ts_window_list *l, ts_window_filter_fn fn, void *const *ctxs, int n_ctx,
                                size_t *dropped);

/* Ready-made decisions from a window's masks, given as arrays of npix
 * pixels (row-major, the window's height x width):
 *   labels: class per pixel (int32, as the loss takes them), or NULL;
 *   valid:  nonzero where the image has data (a GDAL mask band: 0/255), or NULL
 *           (all valid).
 * A pixel is "nodata" where valid[i] == 0. drop_background drops a window in
 * which every valid pixel is background or ignore (a window with no valid
 * pixel counts as all background). max_nodata_fraction drops a window whose
 * nodata fraction is strictly greater (1 or more: never). */
typedef struct ts_mask_filter_params {
    int drop_background;        /* drop windows whose labels are all background */
    int32_t background;         /* the background class id (usually 0) */
    int32_t ignore_index;       /* label counted as neither (negative: none) */
    double max_nodata_fraction; /* in [0, 1]; >= 1 disables the nodata test */
} ts_mask_filter_params;
/* Fraction of pixels with valid[i] == 0 (0 when valid is NULL or npix is 0). */
double ts_mask_nodata_fraction(const uint8_t *valid, size_t npix);
/* 1 when no valid pixel has a label other than background/ignore. */
int ts_mask_all_background(const int32_t *labels, const uint8_t *valid, size_t npix, int32_t background,
                           int32_t ignore_index);
/* *keep from both rules. labels may be NULL only when !drop_background. */
ts_status ts_mask_decide(const ts_mask_filter_params *p, const int32_t *labels, const uint8_t *valid, size_t npix,
                         int *keep);

/* An adapter from the decisions above to a ts_window_filter_fn: the reader
 * fills the window's labels (when labels != NULL) and valid mask (when valid
 * != NULL; leave it untouched, i.e. all valid, if the image has no nodata);
 * both buffers hold w->width * w->height pixels. Pass a ts_mask_filter* as
 * the ctx of ts_windows_filter with ts_mask_filter_fn. */
typedef ts_status (*ts_mask_read_fn)(void *reader, const ts_window *w, int32_t *labels, uint8_t *valid);
typedef struct ts_mask_filter {
    ts_mask_filter_params params;
    ts_mask_read_fn read;
    void *reader;
} ts_mask_filter;
ts_status ts_mask_filter_fn(void *ctx, const ts_window *w, int *keep);

/* ---- the index cache ------------------------------------------------------------------
 * A small binary file holding a (filtered) window list under a key: the
 * identity of the inputs (absolute path, size and modification time in
 * nanoseconds of each file) and the generator and filter options as text.
 * Load gives a hit only when the stored key equals the key built now, so a
 * changed input file or option invalidates it. A missing, truncated, corrupt
 * (checksum) or other-version cache is a miss, never an error: the caller
 * regenerates and saves. The usual pattern:
 *
 *   ts_cache_key k; ts_cache_key_init(&k, "windows v1");
 *   ts_cache_key_add_file(&k, image); ts_cache_key_add_file(&k, labels);
 *   ts_cache_key_addf(&k, "grid tile=%d stride=%d bg=%d nodata<=%g", ...);
 *   ts_windows_cache_load(cache, &k, &list, &hit);
 *   if (!hit) { generate; filter; ts_windows_cache_save(cache, &k, &list); }
 *   ts_cache_key_free(&k); */
typedef struct ts_cache_key {
    char *text;
    size_t len, cap;
} ts_cache_key;
ts_status ts_cache_key_init(ts_cache_key *k, const char *what);
/* Adds "file <absolute path> <size> <mtime s>.<ns>"; a file that cannot be stat'ed is TS_ERR_IO. */
ts_status ts_cache_key_add_file(ts_cache_key *k, const char *path);
ts_status ts_cache_key_addf(ts_cache_key *k, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void ts_cache_key_free(ts_cache_key *k);
/* On a hit, replaces *out (initialized) with the stored list and sets *hit = 1. */
ts_status ts_windows_cache_load(const char *path, const ts_cache_key *k, ts_window_list *out, int *hit);
/* Writes to path + ".tmp" and renames. */
ts_status ts_windows_cache_save(const char *path, const ts_cache_key *k, const ts_window_list *l);

/* ---- spatial split (io/split.c) ---------------------------------------------------------
 * THE RULE. The image grid is cut into blocks of block x block pixels, block
 * (bx, by) covering columns [bx*block, (bx+1)*block) and rows likewise. A
 * window belongs to the block holding its centre (col_off + width/2,
 * row_off + height/2, computed exactly; a centre on a block edge belongs to
 * the block right/below it). Only blocks holding at least one window take
 * part. Each such block gets a hash of (seed, bx, by) (splitmix64); blocks
 * are sorted by (hash, by, bx) and cut into three runs, train then val then
 * test, at the places where the cumulative window counts come closest to
 * ratios[0] and ratios[0] + ratios[1] of all windows, with every split whose
 * ratio is > 0 getting at least one block (fewer occupied blocks than such
 * splits is an error). Every window takes its block's split, so no block is
 * shared between splits. The result depends only on the set of windows, the
 * block size, the ratios and the seed: not on the window order, the raster
 * size or the thread count (the split is sequential), and a block keeps its
 * hash when the raster grows.
 *
 * Windows are assigned by centre, so a window near a block edge reaches
 * into the neighbouring block, which may belong to another split, and a
 * window centred there reaches back: that is where train and val/test share
 * pixels. THE BUFFER (buffer = k >= 1): let m = ceil(max window side / 2),
 * the farthest any window reaches from its centre. A val or test window is
 * re-tagged TS_SPLIT_BUFFER when its footprint, grown by (k - 1) * block + m
 * pixels on every side, touches a block (holding windows) of another split.
 * Guarantee: every val/test window left is at least (k - 1) * block pixels
 * away, along x or y, from every window of another split; k = 1: they share
 * no pixel. Train windows are never dropped; buffer windows stay in the
 * list (and the CSV) tagged "buffer", to be used for nothing. k = 0: no
 * buffer, windows may straddle block edges and share pixels across splits. */
typedef struct ts_split_params {
    int64_t block;     /* block side in pixels (> 0) */
    double ratios[3];  /* train, val, test: >= 0, sum > 0 (normalized to 1) */
    uint64_t seed;
    int buffer;        /* blocks, >= 0 */
} ts_split_params;

typedef struct ts_split_report {
    size_t windows[TS_SPLIT_COUNT]; /* per tag, after the buffer */
    size_t blocks[TS_SPLIT_COUNT];  /* occupied blocks per split (train/val/test) */
    double achieved[3];             /* window fractions before the buffer */
} ts_split_report;

/* Tags every window of l (sets has_split). raster_w/raster_h: the image grid;
 * windows must lie inside it (error naming the first that does not).
 * Errors: TS_ERR_INVALID_ARG for bad parameters (naming them), an empty list,
 * or too few occupied blocks for the splits asked for. */
ts_status ts_split_assign(ts_window_list *l, int64_t raster_w, int64_t raster_h, const ts_split_params *p,
                          ts_split_report *report);
/* Parses "0.8,0.1,0.1" (two values: test = 0). */
ts_status ts_split_parse_ratios(const char *s, double ratios[3]);

#endif
