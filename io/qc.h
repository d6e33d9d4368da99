/* Data QC before training: what the labels hold on the image grid, and
 * whether image and labels are placed where they should be.
 *
 * ts_qc_run() reads every window (or, without windows, the whole image in
 * blocks) through io/raster.h and io/labels.h, counts label pixels, and adds
 * findings (info / warning / error) for what a user should know before
 * training: ids >= K, labels that miss the image, classes absent from a
 * split, and the geometry traps (geographic CRS, non-square pixels, rotated
 * geotransform, missing CRS) that otherwise end as silently empty masks.
 *
 * COUNTING. Every pixel of every window read falls in exactly one label
 * category:
 *   ignore        label == ignore_id;
 *   out of range  label < 0 or >= classes (an error; the distinct ids are listed);
 *   masked        a class id on an image nodata pixel (the loss skips it);
 *   histogram     a class id on a valid image pixel: hist[id].
 * Independently, nodata counts the image's invalid pixels (io/raster.h's
 * valid mask) and labelled the pixels holding a class id other than
 * background (vector labels) or any class id (raster masks, whose pixels
 * outside the mask's footprint read as ignore). With windows, overlapping
 * windows count a shared pixel once per window (what training sees);
 * without, every image pixel is counted once. Counts are per split tag
 * (when the windows carry one) and overall (every window). Sums are exact
 * integers merged after the threads finish, so the report does not depend on
 * the thread count.
 *
 * CLASS WEIGHTS for a weighted cross-entropy, from the frequencies
 * f_c = hist[c] / sum(hist) of the train split when the windows carry a
 * split (and train has labelled pixels), else of all windows. Classes with
 * no pixels get weight 0 and take no part in the statistics below.
 *   median-frequency balancing (the DEFAULT, Eigen & Fergus 2015):
 *       w_c = median_{f_k > 0}(f_k) / f_c
 *   inverse frequency normalized to mean 1:
 *       w_c = (1 / f_c) / mean_{f_k > 0}(1 / f_k)
 * (the median of an even count is the mean of the two middle values).
 *
 * FINDINGS (code: level, when):
 *   image_unreadable        error    the image cannot be opened or read
 *   labels_unreadable       error    the labels cannot be opened or read (the message names the fix)
 *   ids_out_of_range        error    any pixel has an id >= classes (or < 0), ignore_id aside
 *   no_overlap              error    no labelled pixel, or a vector layer whose extent misses the image
 *   image_no_crs            warning  the image has no CRS
 *   image_no_geotransform   warning  the image has no geotransform (pixel coordinates only)
 *   image_geographic_crs    warning  the image CRS is geographic: pixels in degrees
 *   non_square_pixels       warning  pixel width and height differ by more than 1e-6 relative
 *   rotated_geotransform    warning  gt[2] or gt[4] != 0 (image)
 *   labels_no_crs           warning  the labels have no CRS (an assumed one aside)
 *   labels_geographic_crs   warning  a raster mask in a geographic CRS (warped by nearest neighbour);
 *                           info     for a vector layer (reprojected exactly)
 *   labels_rotated_geotransform warning  a raster mask with gt[2] or gt[4] != 0
 *   class_absent            warning  a class < K with no pixel at all (weight 0)
 *   class_absent_from_split warning  a class present overall but absent from train, val or test
 *   image_nodata            info     the image's nodata fraction, when > 0
 * Exit status of `terraseg qc` (ts_qc_exit_code): 1 with any error, 1 with
 * any warning under --strict, else 0. */
#ifndef TS_IO_QC_H
#define TS_IO_QC_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "io/io.h"
#include "io/labels.h"
#include "io/raster.h"
#include "io/windows.h"

#define TS_QC_MAX_BAD_IDS 32

typedef struct ts_qc_bad_id {
    int64_t id;
    uint64_t pixels;
} ts_qc_bad_id;

/* Pixel counts of one set of windows (see COUNTING above). */
typedef struct ts_qc_counts {
    int classes;
    uint64_t *hist; /* [classes] */
    uint64_t windows, pixels;
    uint64_t nodata, ignore, out_of_range, masked, labelled;
    ts_qc_bad_id bad[TS_QC_MAX_BAD_IDS]; /* the smallest distinct out-of-range ids, ascending */
    int n_bad;
    int bad_truncated; /* more distinct out-of-range ids than listed */
} ts_qc_counts;

ts_status ts_qc_counts_init(ts_qc_counts *c, int classes);
void ts_qc_counts_free(ts_qc_counts *c);
void ts_qc_counts_clear(ts_qc_counts *c);
/* Adds one window's n pixels: labels[i], valid[i] (NULL: all valid). background < 0: raster-mask semantics
 * for `labelled` (any class id counts). */
void ts_qc_counts_add(ts_qc_counts *c, const int32_t *labels, const uint8_t *valid, size_t n, int32_t ignore_id,
                      int32_t background);
/* dst += src (same class count). */
void ts_qc_counts_merge(ts_qc_counts *dst, const ts_qc_counts *src);

typedef enum ts_qc_weighting {
    TS_QC_WEIGHTS_MEDIAN_FREQUENCY = 0, /* the default */
    TS_QC_WEIGHTS_INVERSE_FREQUENCY,
} ts_qc_weighting;
/* Weights from a histogram (formulas above); classes with no pixels get 0. Returns the number of
 * classes present (0: every weight is 0). */
int ts_qc_class_weights(const uint64_t *hist, int classes, ts_qc_weighting kind, double *w);

typedef enum ts_qc_level {
    TS_QC_INFO = 0,
    TS_QC_WARNING,
    TS_QC_ERROR,
} ts_qc_level;

typedef struct ts_qc_finding {
    ts_qc_level level;
    char code[40];
    char message[1024];
} ts_qc_finding;

/* What to check. Zero-initialize, then set image, labels, classes. */
typedef struct ts_qc_params {
    const char *image;
    const ts_raster_opts *raster; /* NULL: every non-alpha band, the file's nodata/masks */
    const char *labels;
    const ts_label_opts *label_opts; /* NULL: defaults; its `classes` is ignored (QC counts ids >= K instead) */
    int classes;                     /* K >= 1 */
    const ts_window_list *windows;   /* NULL or empty: the whole image in blocks */
    int block;                       /* block side without windows (0: 512) */
    int threads;                     /* 0: OpenMP's default (TERRASEG_THREADS); never changes the result */
} ts_qc_params;

typedef struct ts_qc_report {
    /* inputs */
    char *image, *labels;
    int classes;
    int32_t ignore_id, background_id;
    int labels_vector;          /* 1 vector, 0 raster mask, -1 unknown (unreadable) */
    int64_t width, height;      /* the image grid */
    int bands;
    double gt[6];
    char *image_crs, *labels_crs; /* CRS names; NULL when none */
    int image_read;             /* 1 when the pixels were counted (image and labels readable) */
    /* counts */
    int has_windows, has_split;
    ts_qc_counts total;
    ts_qc_counts split[TS_SPLIT_COUNT]; /* by ts_split_tag, when has_split */
    /* class weights */
    const char *weights_basis; /* "train" or "all" */
    double *weights_median, *weights_inverse; /* [classes] */
    /* findings, in the order found */
    ts_qc_finding *findings;
    int n_findings, cap_findings;
    int errors, warnings;
} ts_qc_report;

void ts_qc_report_init(ts_qc_report *r);
void ts_qc_report_free(ts_qc_report *r);
/* Appends a finding (printf-style message). */
ts_status ts_qc_add_finding(ts_qc_report *r, ts_qc_level level, const char *code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;
/* The first finding with this code, or NULL. */
const ts_qc_finding *ts_qc_find(const ts_qc_report *r, const char *code);

/* Runs every check into *rep (initialized by the call). Unreadable inputs
 * and bad data are findings, not failures: the return is TS_OK whenever a
 * report was produced; an error status only for bad parameters or memory. */
ts_status ts_qc_run(const ts_qc_params *p, ts_qc_report *rep);

/* 0 clean, 1 with errors, or with warnings when strict. */
int ts_qc_exit_code(const ts_qc_report *r, int strict);
/* The human-readable report (what `terraseg qc` prints). */
void ts_qc_report_print(FILE *f, const ts_qc_report *r);
/* The same report as JSON text (free with free()). */
ts_status ts_qc_report_json(const ts_qc_report *r, char **json);

#endif
