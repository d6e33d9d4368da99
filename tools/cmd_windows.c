/* terraseg windows IMAGE: the window CSV (grid, CSV, vector features or
 * random), and terraseg split WINDOWS.csv: train/val/test by spatial blocks. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/tile.h"
#include "io/windows.h"
#include "kernels/threads.h"
#include "tools/cmd_windows.h"
#include "tools/data_args.h"

/* ---- terraseg windows IMAGE -o windows.csv ---- */
static int win_tile = 256;
static int win_overlap = 0;
static int win_allow_small = 0;
static const char *win_from_csv = NULL;
static const char *win_from_vector = NULL;
static const char *win_layer = NULL;
static int win_random = 0;
static int win_seed = 0;
static const char *win_col_column = NULL;
static const char *win_row_column = NULL;
static const char *win_cache = NULL;
static const char *win_output = NULL;
/* filters */
static label_args win_labels = LABEL_ARGS_DEFAULTS;
static int win_drop_background = 0;
static double win_max_nodata = 1.0;
static const char *win_bands = NULL;
static const char *win_nodata = NULL;
static int win_threads = 0;

cli_option windows_options[] = {
    {"tile", 0, CLI_INT, &win_tile, "PX", "window size in pixels (square)", 1, 1 << 20},
    {"overlap", 0, CLI_INT, &win_overlap, "PX",
     "grid: pixels shared by neighbouring windows (stride = tile - overlap); the last row and column are shifted to "
     "the raster's edge",
     0, 1 << 20},
    {"allow-small", 0, CLI_FLAG, &win_allow_small, NULL,
     "a raster smaller than the tile gets one window spanning it (the reader pads) instead of an error", 0, 0},
    {"from-csv", 0, CLI_STRING, &win_from_csv, "CSV",
     "windows from a CSV with a header (col_off,row_off[,width,height]); checked against the image", 0, 0},
    {"col-off-column", 0, CLI_STRING, &win_col_column, "NAME", "--from-csv: name of the column offset column "
     "(default col_off)", 0, 0},
    {"row-off-column", 0, CLI_STRING, &win_row_column, "NAME", "--from-csv: name of the row offset column "
     "(default row_off)", 0, 0},
    {"from-vector", 0, CLI_STRING, &win_from_vector, "VECTOR",
     "one window per feature: the tile holding its bounding-box centre, clamped to the raster; empty geometries "
     "skipped, duplicates merged",
     0, 0},
    {"layer", 0, CLI_STRING, &win_layer, "NAME", "--from-vector: layer name (default: the first layer)", 0, 0},
    {"random", 0, CLI_INT, &win_random, "N", "N random windows (with replacement) instead of the grid", 0,
     2147483647.0},
    {"seed", 0, CLI_INT, &win_seed, "S", "--random: seed (the same windows on every machine)", 0, 2147483647.0},
    {"cache", 0, CLI_STRING, &win_cache, "FILE",
     "index cache: reuse the window list stored there when the inputs (paths, sizes, mtimes) and options are "
     "unchanged, else compute and store it",
     0, 0},
    {"output", 'o', CLI_STRING, &win_output, "CSV", "output CSV (col_off,row_off,width,height); required", 0, 0},
    {"drop-background", 0, CLI_FLAG, &win_drop_background, NULL,
     "filter: drop windows whose valid pixels are all background or ignore (needs --labels)", 0, 0},
    {"max-nodata", 0, CLI_DOUBLE, &win_max_nodata, "FRACTION",
     "filter: drop windows whose fraction of invalid image pixels (nodata, mask, alpha, NaN) exceeds FRACTION (1: "
     "no test)",
     0, 1},
    {"bands", 0, CLI_STRING, &win_bands, "LIST",
     "filter: the image bands whose validity counts, e.g. 1,2,3 (default: every non-alpha band, as training reads)",
     0, 0},
    {"nodata", 0, CLI_STRING, &win_nodata, "VALUE", "filter: nodata value replacing the bands' own", 0, 0},
    LABEL_ARGS_OPTIONS(win_labels, "labels-layer"),
    {"threads", 't', CLI_INT, &win_threads, "N",
     "filter: reader threads, each with its own image and label handles (0: TERRASEG_THREADS or all cores; the "
     "result does not depend on it)",
     0, 1024},
    {0},
};

/* Applies the filters to l; prints what went. */
static ts_status filter_windows(const char *image, ts_window_list *l, const int *bands, int nbands, int has_nodata,
                                double nodata, const ts_label_opts *lo, ts_mask_filter_report *rep)
{
    ts_mask_reader_opts ro = {.image = image,
                              .bands = bands,
                              .nbands = nbands,
                              .has_nodata = has_nodata,
                              .nodata = nodata,
                              .labels = win_labels.path,
                              .label_opts = lo};
    ts_mask_filter_params p = {.drop_background = win_drop_background,
                               .background = lo->background_id,
                               .ignore_index = lo->ignore_id,
                               .max_nodata_fraction = win_max_nodata};
    return ts_windows_filter_masks(l, &ro, &p, ts_threads_init(win_threads), rep);
}

int run_windows(int argc, char **argv)
{
    if (argc != 1) {
        fprintf(stderr, "terraseg windows: expected one IMAGE (the raster whose grid the windows are on)\n");
        return 2;
    }
    if (!win_output) {
        fprintf(stderr, "terraseg windows: -o/--output CSV is required\n");
        return 2;
    }
    int sources = (win_from_csv != NULL) + (win_from_vector != NULL) + (win_random > 0);
    if (sources > 1) {
        fprintf(stderr, "terraseg windows: give at most one of --from-csv, --from-vector and --random\n");
        return 2;
    }
    if (win_overlap >= win_tile) {
        fprintf(stderr, "terraseg windows: --overlap %d must be smaller than --tile %d\n", win_overlap, win_tile);
        return 2;
    }
    if (win_drop_background && !win_labels.path) {
        fprintf(stderr, "terraseg windows: --drop-background needs --labels (what is background is in the labels)\n");
        return 2;
    }
    if (win_labels.path && !win_drop_background) {
        fprintf(stderr, "terraseg windows: --labels is used by --drop-background only; add it, or leave out "
                        "--labels\n");
        return 2;
    }
    const int filtering = win_drop_background || win_max_nodata < 1.0;
    if (!filtering && (win_bands || win_nodata)) {
        fprintf(stderr, "terraseg windows: --bands and --nodata only matter with --max-nodata or --drop-background\n");
        return 2;
    }
    ts_label_opts lo;
    ts_label_class *cmap = NULL;
    ts_label_color *colors = NULL;
    int *bands = NULL, nbands = 0, has_nodata = 0;
    double nodata = 0;
    int rc = label_args_resolve("terraseg windows", &win_labels, &lo, &cmap, &colors);
    if (!rc) rc = parse_band_list("terraseg windows", "bands", win_bands, &bands, &nbands);
    if (!rc) rc = parse_optional_double("terraseg windows", "nodata", win_nodata, &has_nodata, &nodata);
    if (rc) {
        free(cmap);
        free(colors);
        free(bands);
        return rc;
    }
    const char *image = argv[0];
    ts_grid grid;
    if (ts_windows_read_grid(image, &grid) != TS_OK) {
        fprintf(stderr, "terraseg windows: %s\n", ts_last_error());
        free(cmap);
        free(colors);
        free(bands);
        return 1;
    }
    const char *mode = win_from_csv ? "csv" : win_from_vector ? "vector" : win_random ? "random" : "grid";
    ts_window_list l;
    ts_window_list_init(&l);
    ts_cache_key key = {0};
    ts_status st = TS_OK;
    int hit = 0;
    if (win_cache) {
        st = ts_cache_key_init(&key, "terraseg windows");
        if (!st) st = ts_cache_key_add_file(&key, image);
        if (!st && win_from_csv) st = ts_cache_key_add_file(&key, win_from_csv);
        if (!st && win_from_vector) st = ts_cache_key_add_file(&key, win_from_vector);
        if (!st)
            st = ts_cache_key_addf(&key, "mode=%s tile=%d overlap=%d allow_small=%d random=%d seed=%d layer=%s "
                                         "col=%s row=%s",
                                   mode, win_tile, win_overlap, win_allow_small, win_random, win_seed,
                                   win_layer ? win_layer : "", win_col_column ? win_col_column : "",
                                   win_row_column ? win_row_column : "");
        /* The filters (the thread count is not part of it: it never changes the result). */
        if (!st)
            st = ts_cache_key_addf(&key, " filter drop_background=%d max_nodata=%.17g bands=%s nodata=%s",
                                   win_drop_background, win_max_nodata, win_bands ? win_bands : "",
                                   win_nodata ? win_nodata : "");
        if (!st) st = label_args_key(&win_labels, &key);
        if (!st) st = ts_windows_cache_load(win_cache, &key, &l, &hit);
    }
    ts_vector_stats vs = {0};
    ts_mask_filter_report rep = {0};
    size_t generated = 0;
    if (!st && !hit) {
        if (win_from_csv) {
            ts_csv_columns cols = {.col_off = win_col_column, .row_off = win_row_column};
            st = ts_windows_read_csv(&l, win_from_csv, &cols, grid.width, grid.height, win_tile, win_tile);
        } else if (win_from_vector) {
            st = ts_windows_from_vector(&l, win_from_vector, win_layer, &grid, win_tile, win_tile, win_allow_small,
                                        &vs);
        } else if (win_random > 0) {
            st = ts_windows_random(&l, grid.width, grid.height, win_tile, win_tile, (size_t)win_random,
                                   (uint64_t)win_seed, win_allow_small);
        } else {
            int stride = win_tile - win_overlap;
            st = ts_windows_grid(&l, grid.width, grid.height, win_tile, win_tile, stride, stride, win_allow_small);
        }
        generated = l.count;
        if (!st && filtering) st = filter_windows(image, &l, bands, nbands, has_nodata, nodata, &lo, &rep);
        if (!st && win_cache) st = ts_windows_cache_save(win_cache, &key, &l);
    }
    if (!st) st = ts_windows_write_csv(&l, win_output);
    if (st) {
        fprintf(stderr, "terraseg windows: %s\n", ts_last_error());
    } else {
        printf("image: %s (%lldx%lld)\n", image, (long long)grid.width, (long long)grid.height);
        if (hit)
            printf("index cache: %s is up to date, windows reused\n", win_cache);
        else if (win_from_vector)
            printf("features: %zu read, %zu empty skipped, %zu outside the raster, %zu sharing a window\n",
                   vs.features, vs.empty, vs.outside, vs.duplicates);
        if (hit && filtering) {
            printf("filters: applied when the cache was made\n");
        } else if (filtering) {
            printf("filters: %zu %s windows checked on %d thread%s, image validity from %d band%s%s\n", generated,
                   mode, rep.threads, rep.threads == 1 ? "" : "s", rep.image_bands, rep.image_bands == 1 ? "" : "s",
                   rep.image_bands == 0 ? " (the image has no nodata or mask: every pixel valid)" : "");
            if (win_max_nodata < 1.0)
                printf("  dropped %zu with more than %g of their pixels invalid (--max-nodata)\n", rep.dropped_nodata,
                       win_max_nodata);
            if (win_drop_background)
                printf("  dropped %zu whose valid pixels are all background (id %d) or ignore (id %d) in %s "
                       "(--drop-background)\n",
                       rep.dropped_background, (int)lo.background_id, (int)lo.ignore_id, win_labels.path);
            printf("  kept %zu\n", l.count);
        }
        printf("wrote %zu %s windows to %s\n", l.count, mode, win_output);
    }
    free(cmap);
    free(colors);
    free(bands);
    ts_cache_key_free(&key);
    ts_window_list_free(&l);
    ts_grid_free(&grid);
    return st ? 1 : 0;
}

/* ---- terraseg split WINDOWS.csv --like IMAGE -o split.csv ---- */
static const char *split_like = NULL;
static int split_block = 2048;
static const char *split_ratios = "0.8,0.1,0.1";
static int split_seed = 1;
static int split_buffer = 0;
static int split_tile = 256;
static const char *split_col_column = NULL;
static const char *split_row_column = NULL;
static const char *split_output = NULL;

cli_option split_options[] = {
    {"like", 0, CLI_STRING, &split_like, "IMAGE", "the raster the windows are on (its size); required", 0, 0},
    {"block", 0, CLI_INT, &split_block, "PX",
     "block side in pixels: a window goes to the split of the block holding its centre", 1, 2147483647.0},
    {"ratios", 0, CLI_STRING, &split_ratios, "T,V[,E]", "train,val,test fractions of the windows (sum 1)", 0, 0},
    {"seed", 0, CLI_INT, &split_seed, "S", "seed of the block hash", 0, 2147483647.0},
    {"buffer", 0, CLI_INT, &split_buffer, "K",
     "tag val/test windows closer than (K - 1) blocks to a window of another split \"buffer\" (K = 1: none shares "
     "a pixel with another split; 0: no buffer)",
     0, 1000},
    {"tile", 0, CLI_INT, &split_tile, "PX", "window size when the CSV has no width/height columns", 1, 1 << 20},
    {"col-off-column", 0, CLI_STRING, &split_col_column, "NAME", "name of the column offset column", 0, 0},
    {"row-off-column", 0, CLI_STRING, &split_row_column, "NAME", "name of the row offset column", 0, 0},
    {"output", 'o', CLI_STRING, &split_output, "CSV", "output CSV (col_off,row_off,width,height,split); required", 0,
     0},
    {0},
};

int run_split(int argc, char **argv)
{
    if (argc != 1) {
        fprintf(stderr, "terraseg split: expected one WINDOWS.csv (as terraseg windows writes it)\n");
        return 2;
    }
    if (!split_like || !split_output) {
        fprintf(stderr, "terraseg split: --like IMAGE and -o/--output CSV are required\n");
        return 2;
    }
    ts_split_params p = {.block = split_block, .seed = (uint64_t)split_seed, .buffer = split_buffer};
    if (ts_split_parse_ratios(split_ratios, p.ratios) != TS_OK) {
        fprintf(stderr, "terraseg split: --ratios: %s\n", ts_last_error());
        return 2;
    }
    ts_grid grid;
    if (ts_windows_read_grid(split_like, &grid) != TS_OK) {
        fprintf(stderr, "terraseg split: %s\n", ts_last_error());
        return 1;
    }
    ts_window_list l;
    ts_window_list_init(&l);
    ts_csv_columns cols = {.col_off = split_col_column, .row_off = split_row_column};
    ts_split_report rep;
    ts_status st = ts_windows_read_csv(&l, argv[0], &cols, grid.width, grid.height, split_tile, split_tile);
    if (!st) st = ts_split_assign(&l, grid.width, grid.height, &p, &rep);
    if (!st) st = ts_windows_write_csv(&l, split_output);
    if (st) {
        fprintf(stderr, "terraseg split: %s\n", ts_last_error());
    } else {
        printf("split: %zu windows, blocks of %d px, seed %d, target ratios %.3f/%.3f/%.3f, buffer %d\n", l.count,
               split_block, split_seed, p.ratios[0], p.ratios[1], p.ratios[2], split_buffer);
        static const ts_split_tag tags[3] = {TS_SPLIT_TRAIN, TS_SPLIT_VAL, TS_SPLIT_TEST};
        for (int s = 0; s < 3; s++)
            printf("  %-6s %8zu windows (%.3f of all before the buffer) in %zu blocks\n", ts_split_name(tags[s]),
                   rep.windows[tags[s]], rep.achieved[s], rep.blocks[tags[s]]);
        if (split_buffer > 0)
            printf("  %-6s %8zu val/test windows too close to another split, tagged buffer (use for nothing)\n",
                   "buffer", rep.windows[TS_SPLIT_BUFFER]);
        printf("wrote %s\n", split_output);
    }
    ts_window_list_free(&l);
    ts_grid_free(&grid);
    return st ? 1 : 0;
}
