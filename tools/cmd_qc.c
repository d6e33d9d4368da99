/* terraseg qc IMAGE --labels LABELS --classes K [--windows windows.csv] [--json OUT.json]
 *
 * Reads every window (or the whole image in blocks) and reports the class
 * histogram overall and per split, ids >= K, ignore and nodata pixels, class
 * weights, classes absent from a split, and loud geometry warnings (io/qc.h).
 * Exit status: 0 clean, 1 on errors (or on warnings with --strict), 2 usage. */
#include "tools/cmd_qc.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/qc.h"
#include "kernels/outfile.h"

static const char *qc_labels = NULL;
static const char *qc_attribute = NULL;
static const char *qc_class_map = NULL;
static const char *qc_color_map = NULL;
static const char *qc_burn = NULL;
static const char *qc_layer = NULL;
static const char *qc_assume_crs = NULL;
static int qc_all_touched = 0;
static int qc_binary = 0;
static int qc_band = 1;
static int qc_ignore = 255;
static int qc_background = 0;
static const char *qc_windows = NULL;
static int qc_tile = 256;
static int qc_classes = 0;
static int qc_block = 512;
static int qc_threads = 0;
static const char *qc_json = NULL;
static int qc_strict = 0;
static int qc_quiet = 0;

cli_option qc_options[] = {
    {"labels", 0, CLI_STRING, &qc_labels, "LABELS", "the labels: a vector layer or a mask raster (required)", 0, 0},
    {"classes", 'k', CLI_INT, &qc_classes, "K", "number of classes: ids must be < K (required)", 1, 65536},
    {"attribute", 'a', CLI_STRING, &qc_attribute, "NAME",
     "vector: the class attribute (integer, or names with --class-map)", 0, 0},
    {"class-map", 0, CLI_STRING, &qc_class_map, "MAP", "vector: class names to ids, e.g. URBANO=1,RURAL=2", 0, 0},
    {"burn", 0, CLI_STRING, &qc_burn, "ID", "vector: burn this class id into every feature (default 1 without --attribute)",
     0, 0},
    {"layer", 'l', CLI_STRING, &qc_layer, "NAME", "vector: the layer (default: the first)", 0, 0},
    {"all-touched", 0, CLI_FLAG, &qc_all_touched, NULL, "vector: burn every pixel a geometry touches", 0, 0},
    {"color-map", 0, CLI_STRING, &qc_color_map, "MAP", "raster: RGB(A) colours to ids, e.g. #ff0000=1,#00ff00=2", 0, 0},
    {"band", 'b', CLI_INT, &qc_band, "N", "raster: the band holding class ids", 1, 65535},
    {"binary", 0, CLI_FLAG, &qc_binary, NULL, "every non-zero id other than the ignore id becomes 1", 0, 0},
    {"ignore", 0, CLI_INT, &qc_ignore, "ID", "the ignore id (counted apart, never out of range)", 0, 2147483647.0},
    {"background", 0, CLI_INT, &qc_background, "ID", "the id of pixels no feature covers", 0, 2147483647.0},
    {"assume-crs", 0, CLI_STRING, &qc_assume_crs, "CRS",
     "labels without a CRS are in this CRS (EPSG:4674, WKT, PROJ), or 'image' for the image's", 0, 0},
    {"windows", 0, CLI_STRING, &qc_windows, "CSV",
     "count over these windows (as terraseg windows/split write them; a split column gives per-split counts); "
     "default: the whole image in blocks",
     0, 0},
    {"tile", 0, CLI_INT, &qc_tile, "PX", "--windows: window size when the CSV has no width/height columns", 1, 1 << 20},
    {"block", 0, CLI_INT, &qc_block, "PX", "without --windows: block side for reading the whole image", 16, 1 << 14},
    {"threads", 't', CLI_INT, &qc_threads, "N", "reader threads (0: TERRASEG_THREADS or all cores); the report is the "
     "same for any count", 0, 256},
    {"json", 0, CLI_STRING, &qc_json, "OUT.json", "also write the report as JSON", 0, 0},
    {"strict", 0, CLI_FLAG, &qc_strict, NULL, "exit 1 on warnings too", 0, 0},
    {"quiet", 'q', CLI_FLAG, &qc_quiet, NULL, "print only the summary line (errors and warnings still go to stderr)", 0, 0},
    {0},
};

int run_qc(int argc, char **argv)
{
    if (argc != 1) {
        fprintf(stderr, "terraseg qc: expected one IMAGE (and --labels LABELS --classes K)\n");
        return 2;
    }
    if (!qc_labels || qc_classes < 1) {
        fprintf(stderr, "terraseg qc: --labels LABELS and --classes K are required\n");
        return 2;
    }
    if (qc_attribute && qc_burn) {
        fprintf(stderr, "terraseg qc: give --attribute or --burn, not both\n");
        return 2;
    }
    if (qc_class_map && !qc_attribute) {
        fprintf(stderr, "terraseg qc: --class-map needs --attribute (the attribute holding the names)\n");
        return 2;
    }
    ts_label_opts o;
    ts_label_opts_init(&o);
    o.ignore_id = qc_ignore;
    o.background_id = qc_background;
    o.binary = qc_binary;
    o.band = qc_band;
    o.layer = qc_layer;
    o.attribute = qc_attribute;
    o.all_touched = qc_all_touched;
    if (qc_assume_crs && strcmp(qc_assume_crs, "image") == 0)
        o.assume_image_crs = 1;
    else
        o.assume_crs = qc_assume_crs;
    if (qc_burn) {
        char *end = NULL;
        long long v = strtoll(qc_burn, &end, 10);
        if (!*qc_burn || *end || v < 0 || v > 2147483647LL) {
            fprintf(stderr, "terraseg qc: --burn expects a whole class id >= 0, got \"%s\"\n", qc_burn);
            return 2;
        }
        o.burn = (int32_t)v;
    }
    ts_label_class *cmap = NULL;
    ts_label_color *colors = NULL;
    if (qc_class_map && ts_label_parse_class_map(qc_class_map, &cmap, &o.n_class_map)) {
        fprintf(stderr, "terraseg qc: --class-map: %s\n", ts_last_error());
        return 2;
    }
    o.class_map = cmap;
    if (qc_color_map && ts_label_parse_color_map(qc_color_map, &colors, &o.n_colors)) {
        fprintf(stderr, "terraseg qc: --color-map: %s\n", ts_last_error());
        free(cmap);
        return 2;
    }
    o.colors = colors;

    const char *image = argv[0];
    ts_window_list wl;
    ts_window_list_init(&wl);
    ts_status st = TS_OK;
    if (qc_windows) {
        ts_grid grid;
        st = ts_windows_read_grid(image, &grid);
        if (!st) {
            st = ts_windows_read_csv(&wl, qc_windows, NULL, grid.width, grid.height, qc_tile, qc_tile);
            ts_grid_free(&grid);
        }
        if (st) {
            fprintf(stderr, "terraseg qc: %s\n", ts_last_error());
            ts_window_list_free(&wl);
            free(cmap);
            free(colors);
            return 1;
        }
    }
    ts_qc_params p = {.image = image,
                      .labels = qc_labels,
                      .label_opts = &o,
                      .classes = qc_classes,
                      .windows = qc_windows ? &wl : NULL,
                      .block = qc_block,
                      .threads = qc_threads};
    ts_qc_report rep;
    st = ts_qc_run(&p, &rep);
    free(cmap);
    free(colors);
    ts_window_list_free(&wl);
    if (st) {
        fprintf(stderr, "terraseg qc: %s\n", ts_last_error());
        ts_qc_report_free(&rep);
        return 1;
    }
    /* Errors and warnings are loud: on stderr as well, unless stdout is that same terminal. */
    const int echo = qc_quiet || !isatty(fileno(stdout));
    if (qc_quiet)
        printf("qc: %d error%s, %d warning%s\n", rep.errors, rep.errors == 1 ? "" : "s", rep.warnings,
               rep.warnings == 1 ? "" : "s");
    else
        ts_qc_report_print(stdout, &rep);
    fflush(stdout);
    for (int i = 0; echo && i < rep.n_findings; i++)
        if (rep.findings[i].level != TS_QC_INFO)
            fprintf(stderr, "terraseg qc: %s [%s]: %s\n", rep.findings[i].level == TS_QC_ERROR ? "ERROR" : "WARNING",
                    rep.findings[i].code, rep.findings[i].message);
    int rc = ts_qc_exit_code(&rep, qc_strict);
    if (qc_json) {
        char *json = NULL;
        st = ts_qc_report_json(&rep, &json);
        if (!st) {
            size_t n = strlen(json);
            json[n] = '\n'; /* the terminator becomes a final newline */
            st = ts_write_file_atomic(qc_json, json, n + 1);
            json[n] = '\0';
        }
        free(json);
        if (st) {
            fprintf(stderr, "terraseg qc: --json: %s\n", ts_last_error());
            rc = 1;
        } else if (!qc_quiet) {
            printf("wrote %s\n", qc_json);
        }
    }
    ts_qc_report_free(&rep);
    return rc;
}
