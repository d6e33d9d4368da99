/* terraseg eval PRED TRUTH [--json OUT.json] [--confusion-image OUT.png]
 *
 * Streams the scene in strips of rows and scores the prediction against the
 * truth (a raster in any grid, aligned with nearest neighbour, or a vector
 * layer rasterized onto the prediction's grid; the label options are those
 * of terraseg qc/windows/tile): per-class IoU, precision, recall, F1, mIoU,
 * overall accuracy, kappa, boundary F1 and predicted vs reference area
 * (io/evaluate.h). Prints a table; writes JSON and a confusion-matrix PNG on
 * request. Exit status: 0 done, 1 failure, 2 usage. */
#include "tools/cmd_eval.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "io/evaluate.h"
#include "kernels/threads.h"
#include "tools/data_args.h"
#include "train/metrics.h"

static label_args ev_la = LABEL_ARGS_DEFAULTS;
static double ev_tolerance = TS_EVAL_DEFAULT_TOLERANCE;
static int ev_no_boundary = 0;
static int ev_band = 1;
static int ev_rows = TS_EVAL_DEFAULT_ROWS;
static const char *ev_class_names = NULL;
static const char *ev_json = NULL;
static const char *ev_image = NULL;
static int ev_cell = 0;
static int ev_overwrite = 0;

cli_option eval_options[] = {
    /* The label options of terraseg qc/windows/tile (tools/data_args.h),
     * same names and destinations, with help that says what they mean here. */
    {"classes", 'k', CLI_INT, &ev_la.classes, "K",
     "the class count: ids must be < K (0: the prediction's category names, else the largest id found + 1)", 0,
     TS_METRICS_MAX_CLASSES},
    {"ignore-id", 0, CLI_INT, &ev_la.ignore, "ID",
     "truth pixels with this id are not counted (the truth's nodata and pixels outside it become this id)", 0,
     2147483647.0},
    {"ignore", 0, CLI_INT, &ev_la.ignore, "ID", "the same as --ignore-id", 0, 2147483647.0},
    {"attribute", 'a', CLI_STRING, &ev_la.attribute, "NAME",
     "vector truth: the class attribute (integer, or names with --class-map)", 0, 0},
    {"class-map", 0, CLI_STRING, &ev_la.class_map, "MAP", "vector truth: class names to ids, e.g. building=1,road=2",
     0, 0},
    {"burn", 0, CLI_STRING, &ev_la.burn, "ID",
     "vector truth: burn this id into every feature (default 1 without --attribute)", 0, 0},
    {"all-touched", 0, CLI_FLAG, &ev_la.all_touched, NULL, "vector truth: burn every pixel a geometry touches", 0, 0},
    {"layer", 'l', CLI_STRING, &ev_la.layer, "NAME", "vector truth: the layer (default: the first)", 0, 0},
    {"background", 0, CLI_INT, &ev_la.background, "ID", "vector truth: the id of pixels no feature covers", 0,
     2147483647.0},
    {"color-map", 0, CLI_STRING, &ev_la.color_map, "MAP",
     "raster truth: RGB(A) colours to ids, e.g. #ff0000=1,#00ff00=2", 0, 0},
    {"unknown-ignore", 0, CLI_FLAG, &ev_la.unknown_ignore, NULL,
     "raster truth: a colour not in --color-map is the ignore id (default: background)", 0, 0},
    {"label-band", 0, CLI_INT, &ev_la.band, "N", "raster truth: the band holding class ids", 1, 65535},
    {"binary", 0, CLI_FLAG, &ev_la.binary, NULL, "truth: every non-zero id other than the ignore id becomes 1", 0, 0},
    {"assume-crs", 0, CLI_STRING, &ev_la.assume_crs, "CRS",
     "a truth without a CRS is in this CRS (EPSG:4674, WKT, PROJ), or 'image' for the prediction's (default: error)",
     0, 0},
    {"band", 'b', CLI_INT, &ev_band, "N", "the prediction's band of class ids", 1, 65535},
    {"tolerance", 0, CLI_DOUBLE, &ev_tolerance, "PX",
     "boundary F1: a boundary pixel matches within this Euclidean distance in pixels", 0, 32},
    {"no-boundary", 0, CLI_FLAG, &ev_no_boundary, NULL, "skip boundary F1", 0, 0},
    {"class-names", 0, CLI_STRING, &ev_class_names, "A,B,...",
     "class names for ids 0, 1, ... (default: the prediction's category names)", 0, 0},
    {"rows", 0, CLI_INT, &ev_rows, "N", "rows per strip read (memory: about 9 bytes x width x rows); the result "
     "does not depend on it", 1, 1 << 20},
    {"json", 0, CLI_STRING, &ev_json, "OUT.json", "also write the report as JSON", 0, 0},
    {"confusion-image", 0, CLI_STRING, &ev_image, "OUT.png",
     "also draw the confusion matrix (rows truth, columns prediction, share of the row) as a PNG", 0, 0},
    {"cell", 0, CLI_INT, &ev_cell, "PX", "confusion image: pixels per cell (0: from the class count)", 0, 256},
    {"overwrite", 0, CLI_FLAG, &ev_overwrite, NULL, "replace existing --json / --confusion-image files", 0, 0},
    {0},
};

static int fail(const char *what)
{
    fprintf(stderr, "terraseg eval: %s%s%s\n", what, *ts_last_error() ? ": " : "", ts_last_error());
    return 1;
}

/* Refused before the scene is read: finding out after minutes is unkind. */
static int output_taken(const char *path, const char *option)
{
    struct stat sb;
    if (!path || stat(path, &sb) != 0) return 0;
    if (S_ISDIR(sb.st_mode))
        fprintf(stderr, "terraseg eval: %s '%s' is a folder; give a file name\n", option, path);
    else if (!ev_overwrite)
        fprintf(stderr, "terraseg eval: %s '%s' already exists; use --overwrite to replace it\n", option, path);
    else
        return 0;
    return 1;
}

/* "a,b,,d" -> names (empty ones NULL); one allocation for the strings. */
static int split_names(const char *text, char ***names, int *n, char **store)
{
    *names = NULL;
    *n = 0;
    *store = NULL;
    if (!text) return 0;
    int count = 1;
    for (const char *p = text; *p; p++) count += *p == ',';
    char *s = strdup(text);
    char **v = calloc((size_t)count, sizeof *v);
    if (!s || !v) {
        free(s);
        free(v);
        return 1;
    }
    char *p = s;
    for (int k = 0; k < count; k++) {
        char *comma = strchr(p, ',');
        if (comma) *comma = '\0';
        v[k] = *p ? p : NULL;
        p = comma ? comma + 1 : p + strlen(p);
    }
    *names = v;
    *n = count;
    *store = s;
    return 0;
}

int run_eval(int argc, char **argv)
{
    const char *cmd = "terraseg eval";
    if (argc != 2) {
        fprintf(stderr, "%s: expected PRED TRUTH (the prediction raster and the reference raster or vector layer)\n",
                cmd);
        return 2;
    }
    ev_la.path = argv[1];
    if (ev_json && ev_image && strcmp(ev_json, ev_image) == 0) {
        fprintf(stderr, "%s: --json and --confusion-image name the same file '%s'\n", cmd, ev_json);
        return 2;
    }
    ts_label_opts lo;
    ts_label_class *cmap = NULL;
    ts_label_color *colors = NULL;
    int rc = label_args_resolve(cmd, &ev_la, &lo, &cmap, &colors);
    if (rc) return rc;
    if (output_taken(ev_json, "--json") || output_taken(ev_image, "--confusion-image")) {
        free(cmap);
        free(colors);
        return 1;
    }
    char **names = NULL, *store = NULL;
    int n_names = 0;
    if (split_names(ev_class_names, &names, &n_names, &store)) {
        free(cmap);
        free(colors);
        fprintf(stderr, "%s: out of memory\n", cmd);
        return 1;
    }
    ts_threads_init(0);

    ts_eval_params p;
    ts_eval_params_init(&p);
    p.pred = argv[0];
    p.truth = ev_la.path;
    p.label_opts = &lo;
    p.pred_band = ev_band;
    p.classes = ev_la.classes;
    p.tolerance = ev_tolerance;
    p.no_boundary = ev_no_boundary;
    p.rows = ev_rows;
    p.class_names = (const char *const *)names;
    p.n_class_names = n_names;
    ts_eval_result r;
    ts_status st = ts_eval_run(&p, &r);
    if (st) {
        rc = fail("evaluation failed");
    } else {
        if (r.warning[0]) fprintf(stderr, "%s: warning: %s\n", cmd, r.warning);
        ts_eval_format(stdout, &r);
        fflush(stdout);
        if (ev_json) {
            if (ts_eval_write_json(ev_json, &r, &p, ev_overwrite))
                rc = fail("--json");
            else
                printf("wrote %s\n", ev_json);
        }
        if (ev_image) {
            int w = 0, h = 0;
            if (ts_eval_write_confusion_png(ev_image, &r, ev_cell, ev_overwrite, &w, &h))
                rc = fail("--confusion-image");
            else
                printf("wrote %s (%dx%d: rows truth, columns prediction, colour and %% = share of the row)\n", ev_image,
                       w, h);
        }
    }
    ts_eval_result_free(&r);
    free(names);
    free(store);
    free(cmap);
    free(colors);
    return rc;
}
