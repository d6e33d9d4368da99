/* Options shared by the commands that read labels and image bands
 * (terraseg windows, terraseg tile): one struct of destinations, a macro
 * that expands to their option-table entries, and the checks that turn
 * them into ts_label_opts, a band list and cache-key text. */
#ifndef TS_DATA_ARGS_H
#define TS_DATA_ARGS_H

#include "io/labels.h"
#include "io/windows.h"
#include "tools/cli.h"

typedef struct label_args {
    const char *path; /* --labels */
    const char *attribute, *burn, *class_map, *color_map, *layer;
    const char *assume_crs; /* a CRS, or "image" */
    int all_touched, binary, unknown_ignore;
    int classes, ignore, background, band;
} label_args;

#define LABEL_ARGS_DEFAULTS {.ignore = 255, .band = 1}

/* The label options; layer_name is the option naming the labels' layer
 * ("layer", or "labels-layer" where --layer means something else). */
#define LABEL_ARGS_OPTIONS(a, layer_name)                                                                            \
    {"labels", 0, CLI_STRING, &(a).path, "LABELS",                                                                   \
     "labels on the image grid: a vector layer (any OGR format) or a mask raster (any GDAL raster, any CRS)", 0, 0}, \
    {"attribute", 0, CLI_STRING, &(a).attribute, "NAME",                                                             \
     "vector labels: the class attribute (integer, or names with --class-map)", 0, 0},                               \
    {"class-map", 0, CLI_STRING, &(a).class_map, "MAP",                                                              \
     "vector labels: class names to ids, e.g. building=1,road=2", 0, 0},                                             \
    {"burn", 0, CLI_STRING, &(a).burn, "ID", "vector labels: burn this id into every feature (default 1 without "    \
     "--attribute)", 0, 0},                                                                                          \
    {"all-touched", 0, CLI_FLAG, &(a).all_touched, NULL, "vector labels: burn every pixel a geometry touches", 0,    \
     0},                                                                                                             \
    {layer_name, 0, CLI_STRING, &(a).layer, "NAME", "vector labels: the layer (default: the first)", 0, 0},          \
    {"color-map", 0, CLI_STRING, &(a).color_map, "MAP",                                                              \
     "mask raster: RGB(A) colours to ids, e.g. #ff0000=1,#00ff00=2", 0, 0},                                          \
    {"unknown-ignore", 0, CLI_FLAG, &(a).unknown_ignore, NULL,                                                       \
     "mask raster: a colour not in --color-map is the ignore id (default: background)", 0, 0},                       \
    {"label-band", 0, CLI_INT, &(a).band, "N", "mask raster: the band holding class ids", 1, 65535},                 \
    {"binary", 0, CLI_FLAG, &(a).binary, NULL, "every non-zero id other than the ignore id becomes 1", 0, 0},        \
    {"classes", 0, CLI_INT, &(a).classes, "K", "check that every label id is < K (0: no check)", 0, 2147483647.0},   \
    {"ignore", 0, CLI_INT, &(a).ignore, "ID", "the ignore id: unlabelled pixels (mask nodata, outside the mask)", 0, \
     2147483647.0},                                                                                                  \
    {"background", 0, CLI_INT, &(a).background, "ID", "the background id: pixels no feature covers", 0,              \
     2147483647.0},                                                                                                  \
    {"assume-crs", 0, CLI_STRING, &(a).assume_crs, "CRS",                                                            \
     "labels without a CRS are in this CRS (EPSG:4674, WKT, PROJ), or 'image' for the image's CRS (default: error)", \
     0, 0}

/* Checks the label options of command cmd ("terraseg windows") and fills o
 * (ts_label_opts_init first); *cmap and *colors are allocated for o to
 * point into (free() them after ts_labels_open). A label option given
 * without --labels is an error. Prints the message and returns 2 on a usage
 * error, else 0. */
int label_args_resolve(const char *cmd, const label_args *a, ts_label_opts *o, ts_label_class **cmap,
                       ts_label_color **colors);
/* Adds the labels file (identity) and every label option to a cache key. */
ts_status label_args_key(const label_args *a, ts_cache_key *k);

/* "1,2,3" -> a band list (malloc'ed; free()); NULL text -> NULL, 0. Prints
 * the message naming option and returns 2 on a malformed list, else 0. */
int parse_band_list(const char *cmd, const char *option, const char *text, int **bands, int *n);
/* An optional number given as text (an option whose absence matters):
 * NULL -> *has = 0. Prints and returns 2 when malformed, else 0. */
int parse_optional_double(const char *cmd, const char *option, const char *text, int *has, double *v);

#endif
