/* Segmentation metrics from one confusion matrix over all pixels.
 *
 * Validation during training and `terraseg evaluate` both accumulate ONE
 * K x K confusion matrix of int64 counts over every counted pixel of every
 * tile, and compute every score from it at the end. Scores are therefore over
 * all pixels, never an average of per-tile scores (peers.md: averaging
 * per-tile IoU over-weights small or empty tiles). Boundary F1 is kept the
 * same way, as per-class pixel counts (matched / total) summed over tiles.
 *
 * WHICH PIXELS COUNT. A pixel counts when valid (no mask, or valid[i] != 0)
 * and its label is not ignore_index. A negative ignore_index ignores nothing
 * (labels are >= 0, docs/architecture.md). A counted pixel whose label is
 * outside [0, K), or whose predicted id is outside [0, K), is an error
 * (TS_ERR_INVALID_ARG) naming the first such pixel in (image, row, column)
 * order and its value; predictions on pixels that do not count are not read
 * (a prediction raster may hold nodata there). On any error the accumulator
 * is left unchanged.
 *
 * ARG-MAX. Logits [N, K, H, W] become ids as torch.argmax(logits, dim=1)
 * does: ties go to the lowest class id, and a NaN counts as larger than any
 * number (the first NaN wins).
 *
 * PER-CLASS SCORES (rows = truth, columns = prediction; for class c:
 * TP = M[c][c], FN = row sum - TP, FP = column sum - TP), in double:
 *   IoU       = TP / (TP + FP + FN)
 *   precision = TP / (TP + FP),  recall = TP / (TP + FN)
 *   F1        = 2 TP / (2 TP + FP + FN)   (= Dice; = harmonic mean of P, R)
 *   support   = TP + FN (truth pixels), predicted = TP + FP.
 * A class is PRESENT when TP + FP + FN > 0 (in the truth or the prediction).
 * An absent class has every score NaN (null in JSON, "-" in the table). A
 * present class with a zero denominator (never predicted: precision; never
 * in the truth: recall) scores 0, as torchmetrics' and scikit-learn's
 * zero_division=0 default.
 *
 * MEANS.
 *   miou, mf1, mprecision, mrecall: mean over PRESENT classes. This is
 *     torchmetrics' MulticlassJaccardIndex/F1Score average="macro" (which
 *     gives absent classes weight 0) and mmseg's nanmean. NaN with no pixel.
 *   miou_all, mf1_all: mean over all K classes with an absent class counted
 *     as 0: scikit-learn's jaccard_score / f1_score(labels=range(K),
 *     average="macro"), or the mean of torchmetrics' average="none" vector.
 *     It penalizes a class list larger than what the data holds; it equals
 *     miou when every class is present.
 *   oa     = trace / total (pixel accuracy, torchmetrics "micro" accuracy).
 *   kappa  = (po - pe) / (1 - pe), po = oa, pe = sum_c row_c col_c / total^2
 *            (Cohen 1960, unweighted); NaN when pe = 1 (one class in both
 *            truth and prediction: chance agreement is already perfect) or
 *            without pixels, as scikit-learn's cohen_kappa_score.
 *   fwiou  = sum_c (support_c / total) IoU_c (frequency-weighted IoU, Long
 *            et al. 2015); classes without truth pixels weigh 0.
 *
 * BOUNDARY F1 (Csurka et al. 2013, "What is a good evaluation measure for
 * semantic segmentation?"; the BF score). For each class c and each of the
 * truth and the prediction maps, a pixel is a class-c BOUNDARY pixel when it
 * counts, holds c, and has a 4-neighbour that counts and holds another class.
 * Pixels that do not count are never boundary pixels and never make their
 * neighbours boundary pixels (the edge of an ignore or nodata region, like
 * the tile edge, is not a class boundary). A predicted class-c boundary pixel
 * is MATCHED when a truth class-c boundary pixel lies within the tolerance
 * d pixels in EUCLIDEAN distance (dx^2 + dy^2 <= d^2: a disk, as Csurka's
 * distance-transform threshold and the DAVIS/DeepLab boundary measures);
 * truth boundary pixels are matched symmetrically against the prediction's.
 * Per class, summed over every tile:
 *   BF precision = matched predicted / predicted boundary pixels
 *   BF recall    = matched truth / truth boundary pixels
 *   BF F1        = 2 P R / (P + R)  (0 when P + R = 0)
 * with the same conventions as above: a class with no boundary pixel in
 * either map is absent (NaN), a zero denominator of a present class gives 0.
 * bf_mf1 is the mean of BF F1 over classes with boundary pixels (the
 * headline "boundary F1"); bf_precision/bf_recall/bf_f1 pool the counts of
 * all classes. Matching is per tile: a boundary pixel is never matched across
 * a tile edge (ts_boundary_add_rows makes strips of one scene exact
 * instead). Tolerance 0 means exact positional agreement; at most
 * TS_BOUNDARY_MAX_TOLERANCE pixels.
 *
 * THREADS. The accumulators use OpenMP (the confusion matrix over rows;
 * boundary F1 over whole images when the batch has at least as many images as
 * threads, else over the rows of each image), with per-thread counts merged
 * after the threads finish. Counts are exact integers and the error reported
 * is the first bad pixel in order, so every result is the same for any
 * thread count. Called inside an outer parallel region, they run on the
 * calling thread. */
#ifndef TS_TRAIN_METRICS_H
#define TS_TRAIN_METRICS_H

#include <stdint.h>
#include <stdio.h>

#include "kernels/status.h"
#include "kernels/tensor.h"

struct cJSON;

/* K x K int64 counts are kept; a larger K is refused. */
#define TS_METRICS_MAX_CLASSES 1024
#define TS_BOUNDARY_MAX_TOLERANCE 32.0

/* ---- the confusion matrix -------------------------------------------------- */

typedef struct ts_confusion {
    int classes;     /* K */
    int64_t *counts; /* [K * K]: counts[truth * K + pred] */
} ts_confusion;

/* Allocates a zeroed K x K matrix, 1 <= K <= TS_METRICS_MAX_CLASSES. */
ts_status ts_confusion_init(ts_confusion *cm, int classes);
void ts_confusion_free(ts_confusion *cm);
void ts_confusion_reset(ts_confusion *cm);
/* dst += src (same K): per-thread or per-tile matrices. */
ts_status ts_confusion_merge(ts_confusion *dst, const ts_confusion *src);
/* Counted pixels so far (the sum of all counts). */
int64_t ts_confusion_total(const ts_confusion *cm);

/* Adds predicted ids pred[n, h, w] against labels[n, h, w]; valid[n, h, w]
 * may be NULL (every pixel valid). */
ts_status ts_confusion_add_ids(ts_confusion *cm, const int32_t *pred, const int32_t *labels, const uint8_t *valid,
                               int n, int h, int w, int ignore_index);
/* Adds the arg-max of logits [N, K, H, W] (K = cm->classes) against labels
 * [N, H, W] without storing the ids. */
ts_status ts_confusion_add_logits(ts_confusion *cm, const ts_tensor *logits, const int32_t *labels,
                                  const uint8_t *valid, int ignore_index);
/* pred[N, H, W] = arg-max over the channels of logits [N, K, H, W] (the rule
 * above), e.g. to feed both ts_confusion_add_ids and ts_boundary_add. */
ts_status ts_argmax_classes(int32_t *pred, const ts_tensor *logits);

/* ---- boundary F1 counts ------------------------------------------------------ */

typedef struct ts_boundary {
    int classes;
    double tolerance; /* pixels, Euclidean */
    /* [K] each, summed over tiles */
    int64_t *pred_total, *pred_matched, *true_total, *true_matched;
} ts_boundary;

/* 0 <= tolerance <= TS_BOUNDARY_MAX_TOLERANCE. */
ts_status ts_boundary_init(ts_boundary *b, int classes, double tolerance);
void ts_boundary_free(ts_boundary *b);
void ts_boundary_reset(ts_boundary *b);
/* dst += src (same K and tolerance). */
ts_status ts_boundary_merge(ts_boundary *dst, const ts_boundary *src);
/* Adds n tiles of h x w: predicted ids against labels, valid may be NULL. */
ts_status ts_boundary_add(ts_boundary *b, const int32_t *pred, const int32_t *labels, const uint8_t *valid, int n,
                          int h, int w, int ignore_index);
/* Adds the rows [row_begin, row_end) of ONE h x w image: only boundary
 * pixels in those rows are counted (in both maps), while every row given is
 * context: it decides whether a counted row's pixel is a boundary pixel and
 * may hold its match. So a scene cut into strips, each read with
 * floor(tolerance) + 1 extra rows above and below (fewer at the scene's top
 * and bottom, where the scene ends), counts exactly what ts_boundary_add
 * counts on the whole scene as one tile: matching is then exact across strip
 * edges. Every row given is checked for bad ids as ts_boundary_add does. */
ts_status ts_boundary_add_rows(ts_boundary *b, const int32_t *pred, const int32_t *labels, const uint8_t *valid,
                               int h, int w, int ignore_index, int row_begin, int row_end);

/* ---- the scores ------------------------------------------------------------------ */

typedef struct ts_class_metrics {
    int64_t tp, fp, fn;
    int64_t support;   /* truth pixels: TP + FN */
    int64_t predicted; /* predicted pixels: TP + FP */
    int present;       /* TP + FP + FN > 0 */
    double iou, precision, recall, f1; /* NaN when absent */
    /* boundary F1 (all NaN / 0 without boundary counts) */
    int64_t bf_pred, bf_pred_matched, bf_true, bf_true_matched;
    int bf_present; /* bf_pred + bf_true > 0 */
    double bf_precision, bf_recall, bf_f1;
} ts_class_metrics;

typedef struct ts_metrics {
    int classes;
    ts_class_metrics *cls; /* [classes] */
    int64_t *confusion;    /* [classes * classes], a copy of the matrix */
    int64_t pixels;        /* counted pixels */
    int64_t correct;       /* trace */
    int present;           /* classes present */
    double miou, mf1, mprecision, mrecall; /* over present classes */
    double miou_all, mf1_all;              /* over all K, absent = 0 */
    double oa, kappa, fwiou;
    int has_boundary; /* boundary counts were given */
    double bf_tolerance;
    int bf_present;                         /* classes with boundary pixels */
    double bf_mf1;                          /* mean BF F1 over those classes */
    double bf_precision, bf_recall, bf_f1;  /* counts of all classes pooled */
} ts_metrics;

/* Computes every score from the matrix and, when bf is not NULL, the boundary
 * counts (same K). Free with ts_metrics_free. */
ts_status ts_metrics_compute(ts_metrics *m, const ts_confusion *cm, const ts_boundary *bf);
void ts_metrics_free(ts_metrics *m);

/* A per-class table and the summary lines, for people. class_names may be
 * NULL, and any entry NULL: the class id is shown instead. */
void ts_metrics_format(FILE *f, const ts_metrics *m, const char *const *class_names);

/* The metrics as a cJSON object (the caller deletes it; NULL with the error
 * set when out of memory). NaN scores are null. Keys: classes, pixels,
 * correct, present_classes, overall_accuracy, kappa, fwiou, miou, mf1,
 * mprecision, mrecall, miou_all_classes, mf1_all_classes, averaging (a
 * sentence stating the conventions), per_class [{id, name, present, support,
 * predicted, tp, fp, fn, iou, precision, recall, f1, and with boundary counts
 * bf_precision, bf_recall, bf_f1, bf_pred, bf_pred_matched, bf_true,
 * bf_true_matched}], confusion_matrix [[...]] (rows = truth), and
 * boundary_f1 {tolerance_px, distance, mean_f1, precision, recall, f1,
 * classes_with_boundaries} or null. */
struct cJSON *ts_metrics_to_cjson(const ts_metrics *m, const char *const *class_names);
/* The same as text (free with free()). */
ts_status ts_metrics_json(const ts_metrics *m, const char *const *class_names, char **json);
/* The same written to path (through PATH.tmp and a rename). */
ts_status ts_metrics_write_json(const char *path, const ts_metrics *m, const char *const *class_names);

#endif
