/* Whole-scene evaluation of a class map against a reference: what
 * `terraseg eval PRED TRUTH` computes.
 *
 * PRED is a class raster as `terraseg predict` writes it (one band of class
 * ids 0..K-1, nodata 255, a colour table and category names), or any
 * single-band integer raster of ids. TRUTH is either
 *   - a raster in any grid, aligned onto the prediction's grid with nearest
 *     neighbour through io/labels.c (any CRS or resolution; its nodata and
 *     the pixels outside its footprint are the ignore id; colour maps, binary
 *     and band options as everywhere labels are read), or
 *   - a vector layer rasterized onto the prediction's grid exactly as
 *     gdal_rasterize would (class attribute, burn value, ALL_TOUCHED...).
 *
 * STREAMING. The scene is read in strips of full-width rows. One confusion
 * matrix is accumulated over the whole scene (train/metrics.h: every score is
 * over all counted pixels, never a mean of per-strip scores). Boundary F1 is
 * exact across strip edges: each strip is read with floor(tolerance) + 1
 * context rows above and below and only its own rows are counted
 * (ts_boundary_add_rows), so the result equals the whole scene as one tile
 * and does not depend on the strip height.
 *
 * WHICH PIXELS COUNT. A pixel counts when the prediction holds an id there
 * (not its band's nodata value; 255 when the band has none) and the truth is
 * not the ignore id (label_opts->ignore_id, default 255: the truth's nodata,
 * outside its footprint, or labelled so). Excluded pixels are reported apart.
 *
 * THE CLASS COUNT K: params.classes when > 0; else the number of the
 * prediction band's category names (up to the last non-empty one); else the
 * largest id found on a counted pixel, in the prediction or the truth, plus
 * one. A counted id >= K is an error naming the file, row and column.
 *
 * ABSENT CLASSES (in neither the truth nor the prediction over the counted
 * pixels) score null/"-" and are left out of mIoU, mean F1 and mean
 * precision/recall; miou_all/mf1_all count them as 0 (train/metrics.h).
 *
 * AREAS. Per class, the predicted and the reference area over the counted
 * pixels: pixel count x |pixel area| from the geotransform, in the CRS's
 * linear unit squared ("m^2"; "deg^2" for a geographic CRS, which is not an
 * area on the ground); in pixels when the prediction has no georeferencing.
 *
 * GEOREFERENCING. Prediction and truth must overlap: their extents are
 * compared in the prediction's CRS and disjoint inputs are refused, naming
 * both files, their extents and CRSs. A prediction without a geotransform is
 * taken in pixel space (result.warning says so): only a truth raster of
 * exactly its size is accepted, read pixel for pixel.
 *
 * Nothing here prints or exits; outputs go through a temporary name and a
 * rename, and an existing output is refused unless overwrite is set. */
#ifndef TS_IO_EVALUATE_H
#define TS_IO_EVALUATE_H

#include <stdint.h>
#include <stdio.h>

#include "io/labels.h"
#include "kernels/status.h"
#include "train/metrics.h"

struct cJSON;

#define TS_EVAL_DEFAULT_ROWS 256
#define TS_EVAL_DEFAULT_TOLERANCE 2.0

typedef struct ts_eval_params {
    const char *pred;                /* the prediction raster */
    const char *truth;               /* the reference: raster or vector */
    const ts_label_opts *label_opts; /* how the truth is read (NULL: ts_label_opts_init's defaults) */
    int pred_band;                   /* 1-based; 0: 1 */
    int classes;                     /* K; 0: from the category names, else the largest id + 1 */
    double tolerance;                /* boundary F1 tolerance in pixels, in [0, TS_BOUNDARY_MAX_TOLERANCE] */
    int no_boundary;                 /* 1: skip boundary F1 */
    int rows;                        /* strip height; 0: TS_EVAL_DEFAULT_ROWS */
    const char *const *class_names;  /* n_class_names names for ids 0.. (NULL: the prediction's category names) */
    int n_class_names;
} ts_eval_params;

/* Params with the defaults above (tolerance 2, rows 256). */
void ts_eval_params_init(ts_eval_params *p);

typedef struct ts_eval_result {
    ts_metrics metrics;       /* every score; metrics.classes = K */
    char **class_names;       /* [K] never NULL entries ("class <id>" without names) */
    uint8_t (*class_rgb)[3];  /* [K] the prediction's colour table, else the default palette */
    const char *k_source;     /* "--classes", "category names" or "largest id + 1" (static text) */
    int64_t width, height;    /* the prediction grid */
    int georeferenced;        /* the prediction has a geotransform */
    char *crs_name;           /* the prediction's CRS name (NULL: none) */
    double pixel_area;        /* |det| of the geotransform, in area_unit; 1 without georeferencing */
    char area_unit[48];       /* "m^2", "ft^2", "deg^2", "map units^2" or "pixels" */
    int truth_is_vector;
    int32_t ignore_id;        /* of the truth */
    double pred_nodata;       /* the prediction's nodata value */
    int64_t pred_nodata_pixels;    /* prediction nodata (whatever the truth) */
    int64_t truth_ignored_pixels;  /* truth ignore where the prediction has an id */
    double tolerance;         /* boundary F1 tolerance (NaN when skipped) */
    int rows;                 /* strip height used */
    char warning[512];        /* a warning for the user ("" when none) */
} ts_eval_result;

/* Runs the evaluation. On error r is left empty (ts_eval_result_free is
 * still safe). */
ts_status ts_eval_run(const ts_eval_params *p, ts_eval_result *r);
void ts_eval_result_free(ts_eval_result *r);

/* The readable report: ts_metrics_format's table and summary, the excluded
 * pixels, and per-class predicted vs reference area. */
void ts_eval_format(FILE *f, const ts_eval_result *r);

/* ts_metrics_to_cjson plus: inputs {prediction, truth, truth_kind, width,
 * height, crs, georeferenced, band}, class_count {value, source}, ignore_id,
 * prediction_nodata, excluded {prediction_nodata, truth_ignored},
 * absent_classes (how they are treated), tolerance_px, strip_rows, and
 * area {unit, pixel_area, scope, per_class [{id, name, predicted_pixels,
 * reference_pixels, predicted_area, reference_area, difference, ratio}]}.
 * NULL with the error set when out of memory. */
struct cJSON *ts_eval_to_cjson(const ts_eval_result *r, const ts_eval_params *p);
/* The JSON written to path through PATH.tmp and a rename; an existing path
 * is refused unless overwrite. */
ts_status ts_eval_write_json(const char *path, const ts_eval_result *r, const ts_eval_params *p, int overwrite);

/* The confusion matrix as an RGB PNG (GDAL's PNG driver, CreateCopy from a
 * MEM dataset): rows = truth, columns = prediction, one square cell per entry
 * coloured by its share of the row (recall) on a white-to-blue ramp, that
 * share in percent drawn in each cell (a built-in 3x5 digit font, when cells
 * are large enough), class ids and colour swatches on both axes, grey grid
 * lines, and grey cells for classes without reference pixels. cell_px <= 0
 * picks a size from K (48 px for few classes, down to 8). Written through a
 * temporary name and a rename (io/gdal_out.h); an existing path is refused
 * unless overwrite. out_w and out_h (may be NULL) receive the image size. */
ts_status ts_eval_write_confusion_png(const char *path, const ts_eval_result *r, int cell_px, int overwrite,
                                      int *out_w, int *out_h);

#endif
