/* terraseg tile IMAGE --windows windows.csv --out DIR
 *
 * For each window of the CSV (as terraseg windows / terraseg split write
 * it): DIR/images/<prefix>_<col>_<row>.tif, the window's pixels of the
 * selected bands in the SOURCE data type, not normalized (what
 * `gdal_translate -srcwin col row w h` gives: same values, type, nodata,
 * CRS, geotransform moved to the window), and with --labels
 * DIR/masks/<same name>.tif, one band of class ids on the image grid (Byte,
 * UInt16 when an id needs it, ignore id as nodata). Each file goes through
 * a temporary name and a rename (io/tile.h). With --skip-empty a window
 * whose valid pixels are all background/ignore (with labels) or whose image
 * is all invalid (without) writes nothing. Windows tagged "buffer" by
 * terraseg split are skipped (they are to be used for nothing); --split
 * keeps one split only. */
#include "tools/cmd_tile.h"

#include <gdal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/io.h"
#include "io/tile.h"
#include "io/windows.h"
#include "tools/data_args.h"

static const char *tl_windows = NULL;
static const char *tl_out = NULL;
static const char *tl_bands = NULL;
static const char *tl_prefix = NULL;
static const char *tl_split = NULL;
static const char *tl_nodata = NULL;
static int tl_tile = 256;
static int tl_skip_empty = 0;
static label_args tl_labels = LABEL_ARGS_DEFAULTS;

cli_option tile_options[] = {
    {"windows", 'w', CLI_STRING, &tl_windows, "CSV",
     "the windows (col_off,row_off[,width,height][,split]), as terraseg windows or split write them; required", 0, 0},
    {"out", 'o', CLI_STRING, &tl_out, "DIR", "output folder: DIR/images/ and, with --labels, DIR/masks/; required",
     0, 0},
    {"bands", 'b', CLI_STRING, &tl_bands, "LIST", "image bands to write, e.g. 1,2,3 (default: every band)", 0, 0},
    LABEL_ARGS_OPTIONS(tl_labels, "layer"),
    {"skip-empty", 0, CLI_FLAG, &tl_skip_empty, NULL,
     "write nothing for a window whose valid pixels are all background or ignore (with --labels) or whose image "
     "pixels are all invalid (without)",
     0, 0},
    {"nodata", 0, CLI_STRING, &tl_nodata, "VALUE",
     "--skip-empty: nodata value replacing the bands' own when telling valid pixels (tiles keep the source's)", 0,
     0},
    {"split", 0, CLI_STRING, &tl_split, "NAME", "only windows of this split (train, val, test; needs a split column)",
     0, 0},
    {"prefix", 0, CLI_STRING, &tl_prefix, "NAME", "file name prefix (default: IMAGE's file name without extension)",
     0, 0},
    {"tile", 0, CLI_INT, &tl_tile, "PX", "window size when the CSV has no width/height columns", 1, 1 << 20},
    {0},
};

/* The image file name without folder and extension. */
static char *default_prefix(const char *image)
{
    const char *b = strrchr(image, '/');
    b = b ? b + 1 : image;
    char *p = strdup(*b ? b : "tile");
    if (!p) return NULL;
    char *dot = strrchr(p, '.');
    if (dot && dot != p) *dot = '\0';
    return p;
}

int run_tile(int argc, char **argv)
{
    const char *cmd = "terraseg tile";
    if (argc != 1) {
        fprintf(stderr, "%s: expected one IMAGE (the raster the windows are on)\n", cmd);
        return 2;
    }
    if (!tl_windows || !tl_out) {
        fprintf(stderr, "%s: --windows CSV and --out DIR are required\n", cmd);
        return 2;
    }
    if (tl_nodata && !tl_skip_empty) {
        fprintf(stderr, "%s: --nodata only matters with --skip-empty (tiles keep the source's nodata)\n", cmd);
        return 2;
    }
    ts_split_tag only = TS_SPLIT_NONE;
    if (tl_split && (!ts_split_parse(tl_split, &only) || only == TS_SPLIT_NONE || only == TS_SPLIT_BUFFER)) {
        fprintf(stderr, "%s: --split expects train, val or test, got \"%s\"\n", cmd, tl_split);
        return 2;
    }
    const char *image = argv[0];
    ts_label_opts lo;
    ts_label_class *cmap = NULL;
    ts_label_color *colors = NULL;
    int *bands = NULL, nbands = 0, has_nodata = 0;
    double nodata = 0;
    char *prefix = NULL;
    int rc = label_args_resolve(cmd, &tl_labels, &lo, &cmap, &colors);
    if (!rc) rc = parse_band_list(cmd, "bands", tl_bands, &bands, &nbands);
    if (!rc) rc = parse_optional_double(cmd, "nodata", tl_nodata, &has_nodata, &nodata);
    if (!rc && !(prefix = tl_prefix ? strdup(tl_prefix) : default_prefix(image))) {
        fprintf(stderr, "%s: out of memory\n", cmd);
        rc = 1;
    }
    if (!rc && (!*prefix || strchr(prefix, '/'))) {
        fprintf(stderr, "%s: --prefix \"%s\" must be a non-empty file name without '/'\n", cmd, prefix);
        rc = 2;
    }
    if (rc) {
        free(cmap);
        free(colors);
        free(bands);
        free(prefix);
        return rc;
    }

    ts_gdal_init();
    ts_window_list l;
    ts_window_list_init(&l);
    ts_grid grid = {0};
    ts_tile_report rep = {0};
    ts_status st = ts_windows_read_grid(image, &grid);
    if (!st) st = ts_windows_read_csv(&l, tl_windows, NULL, grid.width, grid.height, tl_tile, tl_tile);
    if (!st && tl_split && !l.has_split)
        st = ts_error(TS_ERR_INVALID_ARG, "--split %s: '%s' has no split column (terraseg split writes one)", tl_split,
                      tl_windows);
    if (!st) {
        ts_tile_job job = {.image = image,
                           .windows = &l,
                           .bands = bands,
                           .nbands = nbands,
                           .labels = tl_labels.path,
                           .label_opts = &lo,
                           .skip_empty = tl_skip_empty,
                           .has_nodata = has_nodata,
                           .nodata = nodata,
                           .only_split = only,
                           .out_dir = tl_out,
                           .prefix = prefix};
        st = ts_tile_windows(&job, &rep);
    }
    if (st) {
        fprintf(stderr, "%s: %s\n", cmd, ts_last_error());
        if (rep.written) fprintf(stderr, "%s: %zu tiles were written before the error\n", cmd, rep.written);
        rc = 1;
    } else {
        printf("image: %s (%lldx%lld), %d band%s per tile\n", image, (long long)grid.width, (long long)grid.height,
               rep.image_bands, rep.image_bands == 1 ? "" : "s");
        printf("windows: %zu from %s\n", l.count, tl_windows);
        if (rep.buffer) printf("  skipped %zu tagged buffer (to be used for nothing)\n", rep.buffer);
        if (rep.other_split) printf("  skipped %zu of other splits than %s\n", rep.other_split, tl_split);
        if (tl_skip_empty)
            printf("  skipped %zu empty (%s)\n", rep.empty,
                   tl_labels.path ? "valid pixels all background or ignore" : "every image pixel invalid");
        printf("wrote %zu tile%s to %s/images/%s\n", rep.written, rep.written == 1 ? "" : "s", tl_out,
               tl_labels.path ? " and their masks to masks/" : "");
        if (tl_labels.path)
            printf("masks: %s, nodata %d (the ignore id), labels %s\n", GDALGetDataTypeName(rep.mask_type),
                   (int)lo.ignore_id, tl_labels.path);
    }
    ts_grid_free(&grid);
    ts_window_list_free(&l);
    free(cmap);
    free(colors);
    free(bands);
    free(prefix);
    return rc;
}
