/* Segmentation metrics (train/metrics.c):
 *  - hand-computed matrices and scores: a 3-class case, absent classes,
 *    a class only predicted, all pixels ignored or masked, a single class;
 *  - torch.argmax's rule (ties to the lowest id, first NaN wins), the logits
 *    path against arg-max + ids;
 *  - ignore id, valid mask, predictions not read where pixels do not count;
 *  - errors: bad labels and ids named by pixel, matrix unchanged, shapes,
 *    classes, tolerances, merges of different matrices;
 *  - merge and repeated adds = one add of the concatenated batch;
 *  - OA, kappa, fwIoU, per-class scores against a naive double reference
 *    computed from the pixel lists;
 *  - 1 and 2 threads give identical counts and the same first error;
 *  - boundary F1: identical masks, one-pixel shifts at tolerance 0, 1, 2
 *    (hand-computed), diagonal and two-pixel shifts, empty boundaries, ignore
 *    regions and tile edges, tiles summed, and random masks against a
 *    brute-force reference;
 *  - the JSON keys and values after a round trip, and the table. */
#include <cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/threads.h"
#include "tests/testutil.h"
#include "train/metrics.h"

#define IGN 255

static int same_d(double a, double b, double tol)
{
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    return fabs(a - b) <= tol;
}

#define EXPECT_D(got, want, tol, what)                                                                       \
    tu_expect(same_d((got), (want), (tol)), "%s: got %.17g, want %.17g (line %d)", (what), (double)(got),   \
              (double)(want), __LINE__)

static int counts_equal(const ts_confusion *a, const ts_confusion *b)
{
    return a->classes == b->classes &&
           memcmp(a->counts, b->counts, (size_t)a->classes * a->classes * sizeof *a->counts) == 0;
}

static int bcounts_equal(const ts_boundary *a, const ts_boundary *b)
{
    return a->classes == b->classes && memcmp(a->pred_total, b->pred_total, (size_t)a->classes * 4 * 8) == 0;
}

/* ---- hand-computed matrices ---------------------------------------------------- */

static void test_hand_3class(void)
{
    /* truth rows: t0 -> [3,1,0], t1 -> [0,1,1], t2 -> [1,0,3] */
    const int32_t t[10] = {0, 0, 0, 1, 1, 2, 2, 2, 2, 0};
    const int32_t p[10] = {0, 1, 0, 1, 2, 2, 2, 0, 2, 0};
    ts_confusion cm;
    tu_expect_ok(ts_confusion_init(&cm, 3), "init 3");
    tu_expect_ok(ts_confusion_add_ids(&cm, p, t, NULL, 1, 2, 5, IGN), "add ids");
    const int64_t want[9] = {3, 1, 0, 0, 1, 1, 1, 0, 3};
    tu_expect(memcmp(cm.counts, want, sizeof want) == 0, "3-class matrix differs from the hand count");
    tu_expect(ts_confusion_total(&cm) == 10, "total 10");
    ts_metrics m;
    tu_expect_ok(ts_metrics_compute(&m, &cm, NULL), "compute");
    EXPECT_D(m.oa, 0.7, 1e-15, "OA");
    EXPECT_D(m.cls[0].iou, 0.6, 1e-15, "IoU 0");
    EXPECT_D(m.cls[1].iou, 1.0 / 3, 1e-15, "IoU 1");
    EXPECT_D(m.cls[2].iou, 0.6, 1e-15, "IoU 2");
    EXPECT_D(m.cls[0].precision, 0.75, 1e-15, "P 0");
    EXPECT_D(m.cls[1].recall, 0.5, 1e-15, "R 1");
    EXPECT_D(m.cls[2].f1, 0.75, 1e-15, "F1 2");
    tu_expect(m.cls[0].support == 4 && m.cls[1].support == 2 && m.cls[1].predicted == 2 && m.cls[2].fp == 1 &&
                  m.cls[2].fn == 1 && m.cls[2].tp == 3,
              "3-class supports and TP/FP/FN");
    EXPECT_D(m.miou, (0.6 + 1.0 / 3 + 0.6) / 3, 1e-15, "mIoU");
    EXPECT_D(m.miou_all, m.miou, 1e-15, "mIoU all = mIoU when all present");
    EXPECT_D(m.mf1, (0.75 + 0.5 + 0.75) / 3, 1e-15, "mean F1");
    EXPECT_D(m.kappa, (0.7 - 0.36) / 0.64, 1e-15, "kappa");
    EXPECT_D(m.fwiou, (4 * 0.6 + 2.0 / 3 + 4 * 0.6) / 10, 1e-15, "fwIoU");
    tu_expect(m.present == 3 && m.pixels == 10 && m.correct == 7, "present, pixels, correct");
    tu_expect(!m.has_boundary && isnan(m.bf_mf1), "no boundary counts");
    ts_metrics_free(&m);

    /* The same pixels with 5 classes: 3 and 4 absent. */
    ts_confusion c5;
    tu_expect_ok(ts_confusion_init(&c5, 5), "init 5");
    tu_expect_ok(ts_confusion_add_ids(&c5, p, t, NULL, 1, 1, 10, -1), "add ids K=5");
    tu_expect_ok(ts_metrics_compute(&m, &c5, NULL), "compute K=5");
    EXPECT_D(m.miou, (0.6 + 1.0 / 3 + 0.6) / 3, 1e-15, "mIoU over present classes");
    EXPECT_D(m.miou_all, (0.6 + 1.0 / 3 + 0.6) / 5, 1e-15, "mIoU over all, absent as 0");
    EXPECT_D(m.mf1_all, 2.0 / 5, 1e-15, "mean F1 over all");
    tu_expect(m.present == 3 && !m.cls[3].present && isnan(m.cls[3].iou) && isnan(m.cls[4].f1) &&
                  isnan(m.cls[4].precision),
              "absent classes are NaN");
    EXPECT_D(m.kappa, (0.7 - 0.36) / 0.64, 1e-15, "kappa unchanged by absent classes");
    ts_metrics_free(&m);
    ts_confusion_free(&c5);

    /* A class only predicted (2) and one only in the truth (1). */
    const int32_t t2[4] = {0, 0, 1, 1}, p2[4] = {0, 2, 0, 0};
    ts_confusion_reset(&cm);
    tu_expect(ts_confusion_total(&cm) == 0, "reset empties the matrix");
    tu_expect_ok(ts_confusion_add_ids(&cm, p2, t2, NULL, 1, 2, 2, IGN), "add ids");
    tu_expect_ok(ts_metrics_compute(&m, &cm, NULL), "compute");
    tu_expect(m.present == 3, "predicted-only and truth-only classes are present");
    EXPECT_D(m.cls[2].iou, 0, 0, "predicted-only IoU");
    EXPECT_D(m.cls[2].recall, 0, 0, "predicted-only recall (zero division -> 0)");
    EXPECT_D(m.cls[2].precision, 0, 0, "predicted-only precision");
    EXPECT_D(m.cls[1].precision, 0, 0, "never predicted precision (zero division -> 0)");
    EXPECT_D(m.cls[1].f1, 0, 0, "never predicted F1");
    EXPECT_D(m.cls[0].iou, 1.0 / 4, 1e-15, "IoU 0 = 1 / (1 + 2 + 1)");
    EXPECT_D(m.miou, 1.0 / 12, 1e-15, "mIoU");
    ts_metrics_free(&m);
    ts_confusion_free(&cm);
}

static void test_empty_and_single(void)
{
    /* Every pixel ignored, or masked out. */
    const int32_t t[6] = {IGN, IGN, IGN, 1, 0, 1};
    const int32_t p[6] = {0, 1, 2, 1, 0, 0};
    const uint8_t v[6] = {1, 1, 1, 0, 0, 0};
    ts_confusion cm;
    ts_metrics m;
    tu_expect_ok(ts_confusion_init(&cm, 3), "init");
    tu_expect_ok(ts_confusion_add_ids(&cm, p, t, v, 2, 1, 3, IGN), "all excluded");
    tu_expect(ts_confusion_total(&cm) == 0, "nothing counted when all pixels are ignored or masked");
    tu_expect_ok(ts_metrics_compute(&m, &cm, NULL), "compute empty");
    tu_expect(m.pixels == 0 && m.present == 0 && isnan(m.miou) && isnan(m.miou_all) && isnan(m.oa) &&
                  isnan(m.kappa) && isnan(m.fwiou) && isnan(m.mf1) && isnan(m.cls[0].iou),
              "an empty matrix has NaN scores");
    ts_metrics_free(&m);
    ts_confusion_free(&cm);

    /* One class, everything right: kappa is undefined (pe = 1). */
    const int32_t z[4] = {0, 0, 0, 0};
    tu_expect_ok(ts_confusion_init(&cm, 1), "init 1");
    tu_expect_ok(ts_confusion_add_ids(&cm, z, z, NULL, 1, 2, 2, IGN), "single class");
    tu_expect_ok(ts_metrics_compute(&m, &cm, NULL), "compute single");
    tu_expect(m.present == 1 && m.oa == 1 && m.miou == 1 && m.cls[0].f1 == 1 && m.fwiou == 1 && isnan(m.kappa),
              "single class: OA 1, IoU 1, kappa NaN");
    ts_metrics_free(&m);
    ts_confusion_free(&cm);

    /* Two classes, only class 0 anywhere. */
    tu_expect_ok(ts_confusion_init(&cm, 2), "init 2");
    tu_expect_ok(ts_confusion_add_ids(&cm, z, z, NULL, 1, 1, 4, IGN), "one of two classes");
    tu_expect_ok(ts_metrics_compute(&m, &cm, NULL), "compute");
    tu_expect(m.present == 1 && m.miou == 1 && m.miou_all == 0.5 && isnan(m.kappa) && isnan(m.cls[1].iou),
              "one of two classes: mIoU 1, all-class mIoU 0.5");
    ts_metrics_free(&m);
    ts_confusion_free(&cm);
}

/* ---- arg-max, ignore and valid masks ------------------------------------------- */

static void test_argmax(void)
{
    /* N=1, K=4, 1 x 6 pixels: columns are pixels. */
    const float L[4][6] = {
        {1, 2, 5, 0, NAN, 3},
        {1, 2, 5, 9, 1, NAN},
        {1, 7, 5, 9, NAN, NAN},
        {0, 7, 4, -1, 2, 8},
    };
    float buf[24];
    for (int c = 0; c < 4; c++)
        for (int i = 0; i < 6; i++) buf[c * 6 + i] = L[c][i];
    ts_tensor lt = ts_tensor_view(buf, 1, 4, 1, 6);
    const int32_t want[6] = {0, 2, 0, 1, 0, 1};
    int32_t got[6];
    tu_expect_ok(ts_argmax_classes(got, &lt), "argmax");
    tu_check_equal_i32("argmax", "ties to the lowest id, first NaN wins", got, want, 6);

    const int32_t lab[6] = {0, 2, 1, 1, IGN, 1};
    const uint8_t valid[6] = {1, 1, 1, 1, 1, 0};
    ts_confusion a, b;
    tu_expect_ok(ts_confusion_init(&a, 4), "init");
    tu_expect_ok(ts_confusion_init(&b, 4), "init");
    tu_expect_ok(ts_confusion_add_logits(&a, &lt, lab, valid, IGN), "add logits");
    tu_expect_ok(ts_confusion_add_ids(&b, want, lab, valid, 1, 1, 6, IGN), "add ids");
    tu_expect(counts_equal(&a, &b) && ts_confusion_total(&a) == 4, "logits path = arg-max + ids");
    tu_expect(a.counts[0 * 4 + 0] == 1 && a.counts[2 * 4 + 2] == 1 && a.counts[1 * 4 + 0] == 1 &&
                  a.counts[1 * 4 + 1] == 1,
              "logits matrix entries");
    ts_confusion_free(&a);
    ts_confusion_free(&b);

    /* Random logits with many ties (integers in [0, 3)). */
    tu_rng r;
    tu_rng_seed(&r, 7);
    int N = 2, K = 5, H = 9, W = 11;
    ts_tensor x;
    tu_expect_ok(ts_tensor_alloc(&x, N, K, H, W), "alloc");
    for (size_t i = 0; i < ts_tensor_numel(&x); i++) x.data[i] = (float)tu_randint(&r, 3);
    int32_t *ids = tu_alloc_i32((size_t)N * H * W), *ref = tu_alloc_i32((size_t)N * H * W);
    for (int n = 0; n < N; n++)
        for (int i = 0; i < H * W; i++) {
            int best = 0;
            for (int c = 1; c < K; c++)
                if (x.data[((size_t)n * K + c) * H * W + i] > x.data[((size_t)n * K + best) * H * W + i]) best = c;
            ref[n * H * W + i] = best;
        }
    tu_expect_ok(ts_argmax_classes(ids, &x), "argmax random");
    tu_check_equal_i32("argmax", "random ties", ids, ref, (size_t)N * H * W);
    tu_free(ids, "argmax", "ids");
    tu_free(ref, "argmax", "ref");
    ts_tensor_free(&x);
}

static void test_masks(void)
{
    /* Labels 255 are ignored; 77 on a masked pixel is not read as a label;
     * predictions 99 where pixels do not count are not read. */
    const int32_t t[8] = {0, 1, IGN, 77, 1, 1, 0, IGN};
    const int32_t p[8] = {0, 0, 99, 99, 1, 1, 1, 1};
    const uint8_t v[8] = {1, 1, 1, 0, 1, 1, 1, 1};
    ts_confusion cm;
    tu_expect_ok(ts_confusion_init(&cm, 2), "init");
    tu_expect_ok(ts_confusion_add_ids(&cm, p, t, v, 2, 2, 2, IGN), "ignore + valid");
    const int64_t want[4] = {1, 1, 1, 2};
    tu_expect(memcmp(cm.counts, want, sizeof want) == 0, "ignore and valid mask exclude pixels");

    /* ignore_index < 0 ignores nothing: 255 is then a bad label. */
    ts_status st = ts_confusion_add_ids(&cm, p, t, NULL, 2, 2, 2, -1);
    tu_expect_error(st, TS_ERR_INVALID_ARG, "negative ignore id", "label 255", "image 0, row 1, column 0",
                    "no ignore id", NULL);
    tu_expect(memcmp(cm.counts, want, sizeof want) == 0, "matrix unchanged after an error");
    ts_confusion_free(&cm);
}

/* ---- errors --------------------------------------------------------------------- */

static void test_errors(void)
{
    ts_confusion cm, c3;
    ts_boundary b, b2;
    tu_expect_error(ts_confusion_init(&cm, 0), TS_ERR_INVALID_ARG, "0 classes", "0 classes", NULL);
    tu_expect_error(ts_confusion_init(&cm, TS_METRICS_MAX_CLASSES + 1), TS_ERR_INVALID_ARG, "too many", "1025",
                    NULL);
    tu_expect_ok(ts_confusion_init(&cm, 4), "init");
    tu_expect_ok(ts_confusion_init(&c3, 3), "init 3");
    int32_t t[2 * 3 * 4], p[2 * 3 * 4];
    for (int i = 0; i < 24; i++) t[i] = i % 4, p[i] = (i + 1) % 4;
    tu_expect_ok(ts_confusion_add_ids(&cm, p, t, NULL, 2, 3, 4, IGN), "add");
    int64_t before[16];
    memcpy(before, cm.counts, sizeof before);
    t[1 * 12 + 2 * 4 + 3] = 7; /* image 1, row 2, column 3 */
    tu_expect_error(ts_confusion_add_ids(&cm, p, t, NULL, 2, 3, 4, IGN), TS_ERR_INVALID_ARG, "label >= K",
                    "confusion add", "label 7", "image 1, row 2, column 3", "[0, 4)", "ignore id 255", NULL);
    t[1 * 12 + 2 * 4 + 3] = -3;
    tu_expect_error(ts_confusion_add_ids(&cm, p, t, NULL, 2, 3, 4, IGN), TS_ERR_INVALID_ARG, "label < 0",
                    "label -3", "image 1, row 2, column 3", NULL);
    t[1 * 12 + 2 * 4 + 3] = 3;
    p[0 * 12 + 1 * 4 + 2] = 4; /* image 0, row 1, column 2 */
    tu_expect_error(ts_confusion_add_ids(&cm, p, t, NULL, 2, 3, 4, IGN), TS_ERR_INVALID_ARG, "pred >= K",
                    "predicted id 4", "image 0, row 1, column 2", NULL);
    tu_expect(memcmp(before, cm.counts, sizeof before) == 0, "matrix unchanged after errors");
    p[0 * 12 + 1 * 4 + 2] = 2;
    tu_expect_error(ts_confusion_add_ids(&cm, NULL, t, NULL, 2, 3, 4, IGN), TS_ERR_INVALID_ARG, "NULL pred",
                    "NULL predictions", NULL);
    tu_expect_error(ts_confusion_add_ids(&cm, p, t, NULL, -1, 3, 4, IGN), TS_ERR_INVALID_ARG, "negative n",
                    "negative", NULL);
    tu_expect_ok(ts_confusion_add_ids(&cm, NULL, NULL, NULL, 0, 3, 4, IGN), "an empty batch is a no-op");

    float buf[2 * 3 * 3 * 4] = {0};
    ts_tensor lt = ts_tensor_view(buf, 2, 3, 3, 4);
    char shape[TS_SHAPE_STR];
    tu_expect_error(ts_confusion_add_logits(&cm, &lt, t, NULL, IGN), TS_ERR_INVALID_ARG, "channels != K",
                    ts_shape_str(&lt, shape), "3 channels", "4 classes", NULL);
    tu_expect_error(ts_confusion_merge(&cm, &c3), TS_ERR_INVALID_ARG, "merge K", "3 classes", "4", NULL);
    ts_metrics m;
    tu_expect_ok(ts_boundary_init(&b, 3, 1), "boundary init");
    tu_expect_error(ts_metrics_compute(&m, &cm, &b), TS_ERR_INVALID_ARG, "compute K", "3 classes", "4", NULL);
    tu_expect_error(ts_boundary_init(&b2, 3, -1), TS_ERR_INVALID_ARG, "tolerance < 0", "tolerance -1", NULL);
    tu_expect_error(ts_boundary_init(&b2, 3, 33), TS_ERR_INVALID_ARG, "tolerance > max", "tolerance 33", NULL);
    tu_expect_error(ts_boundary_init(&b2, 3, NAN), TS_ERR_INVALID_ARG, "tolerance NaN", "tolerance", NULL);
    tu_expect_ok(ts_boundary_init(&b2, 3, 2), "boundary init 2");
    tu_expect_error(ts_boundary_merge(&b, &b2), TS_ERR_INVALID_ARG, "merge tolerance", "tolerance 2", NULL);
    int32_t bt[6] = {0, 1, 2, 5, 1, 0}, bp[6] = {0, 1, 2, 1, 1, 0};
    tu_expect_error(ts_boundary_add(&b, bp, bt, NULL, 1, 2, 3, IGN), TS_ERR_INVALID_ARG, "boundary label",
                    "boundary F1 add", "label 5", "image 0, row 1, column 0", NULL);
    tu_expect(b.pred_total[0] + b.true_total[0] + b.pred_total[1] == 0, "boundary counts unchanged after an error");
    ts_boundary_free(&b);
    ts_boundary_free(&b2);
    ts_confusion_free(&cm);
    ts_confusion_free(&c3);
}

/* ---- merge, references, threads -------------------------------------------------- */

/* Random labels and predictions that agree most of the time, with ignore
 * labels and a valid mask. */
static void random_batch(tu_rng *r, int K, size_t n, int32_t *t, int32_t *p, uint8_t *v)
{
    for (size_t i = 0; i < n; i++) {
        int c = tu_randint(r, K);
        t[i] = tu_randint(r, 20) == 0 ? IGN : c;
        p[i] = tu_randint(r, 3) == 0 ? tu_randint(r, K) : c;
        if (v) v[i] = tu_randint(r, 10) != 0;
    }
}

static void test_merge_and_reference(tu_rng *r)
{
    const int K = 6, H = 13, W = 17, NA = 3, NB = 2;
    size_t hw = (size_t)H * W, n = (size_t)(NA + NB) * hw;
    int32_t *t = tu_alloc_i32(n), *p = tu_alloc_i32(n);
    uint8_t *v = tu_alloc(n);
    random_batch(r, K, n, t, p, v);
    for (size_t i = 0; i < hw; i++) t[i] = t[i] == 4 ? 0 : t[i], p[i] = p[i] == 4 ? 0 : p[i];
    ts_confusion whole, seq, a, b;
    tu_expect_ok(ts_confusion_init(&whole, K), "init");
    tu_expect_ok(ts_confusion_init(&seq, K), "init");
    tu_expect_ok(ts_confusion_init(&a, K), "init");
    tu_expect_ok(ts_confusion_init(&b, K), "init");
    tu_expect_ok(ts_confusion_add_ids(&whole, p, t, v, NA + NB, H, W, IGN), "whole");
    tu_expect_ok(ts_confusion_add_ids(&seq, p, t, v, NA, H, W, IGN), "first part");
    tu_expect_ok(ts_confusion_add_ids(&seq, p + NA * hw, t + NA * hw, v + NA * hw, NB, H, W, IGN), "second part");
    tu_expect_ok(ts_confusion_add_ids(&a, p, t, v, NA, H, W, IGN), "a");
    tu_expect_ok(ts_confusion_add_ids(&b, p + NA * hw, t + NA * hw, v + NA * hw, NB, H, W, IGN), "b");
    tu_expect_ok(ts_confusion_merge(&a, &b), "merge");
    tu_expect(counts_equal(&whole, &seq), "two adds = one add of the concatenation");
    tu_expect(counts_equal(&whole, &a), "merge = one add of the concatenation");

    /* Naive reference from the pixel lists. */
    double cnt = 0, agree = 0, tc[8] = {0}, pc[8] = {0}, inter[8] = {0};
    for (size_t i = 0; i < n; i++) {
        if (!v[i] || t[i] == IGN) continue;
        cnt++;
        tc[t[i]]++;
        pc[p[i]]++;
        if (t[i] == p[i]) agree++, inter[t[i]]++;
    }
    double po = agree / cnt, pe = 0, fw = 0, miou = 0, mall = 0, mf1 = 0;
    int present = 0;
    for (int c = 0; c < K; c++) {
        pe += (tc[c] / cnt) * (pc[c] / cnt);
        double uni = tc[c] + pc[c] - inter[c];
        if (uni > 0) {
            double iou = inter[c] / uni;
            fw += tc[c] / cnt * iou;
            miou += iou, mall += iou, present++;
            mf1 += 2 * inter[c] / (tc[c] + pc[c]);
        }
    }
    ts_metrics m;
    tu_expect_ok(ts_metrics_compute(&m, &whole, NULL), "compute");
    tu_expect(m.pixels == (int64_t)cnt, "pixel count vs reference");
    EXPECT_D(m.oa, po, 1e-13, "OA vs reference");
    EXPECT_D(m.kappa, (po - pe) / (1 - pe), 1e-13, "kappa vs reference");
    EXPECT_D(m.fwiou, fw, 1e-13, "fwIoU vs reference");
    EXPECT_D(m.miou, miou / present, 1e-13, "mIoU vs reference");
    EXPECT_D(m.miou_all, mall / K, 1e-13, "mIoU all vs reference");
    EXPECT_D(m.mf1, mf1 / present, 1e-13, "mean F1 vs reference");
    tu_expect(present == K && m.present == K, "all classes present in the random batch");
    ts_metrics_free(&m);

    ts_confusion_free(&whole);
    ts_confusion_free(&seq);
    ts_confusion_free(&a);
    ts_confusion_free(&b);
    tu_free(t, "merge", "t");
    tu_free(p, "merge", "p");
    tu_free(v, "merge", "v");
}

static void test_threads(tu_rng *r)
{
    const int N = 3, K = 5, H = 67, W = 193;
    size_t hw = (size_t)H * W, n = N * hw;
    ts_tensor x;
    tu_expect_ok(ts_tensor_alloc(&x, N, K, H, W), "alloc");
    tu_fill(r, x.data, ts_tensor_numel(&x), -2, 2);
    int32_t *t = tu_alloc_i32(n), *p = tu_alloc_i32(n), *ids = tu_alloc_i32(n);
    uint8_t *v = tu_alloc(n);
    random_batch(r, K, n, t, p, v);
    /* Blocky truth so there are boundaries worth matching. */
    for (size_t i = 0; i < n; i++)
        if (t[i] != IGN) t[i] = (int32_t)((i % W / 16 + i / W / 16) % K);
    ts_confusion c1, c2, d1, d2;
    ts_boundary b1, b2;
    tu_expect_ok(ts_confusion_init(&c1, K), "init");
    tu_expect_ok(ts_confusion_init(&c2, K), "init");
    tu_expect_ok(ts_confusion_init(&d1, K), "init");
    tu_expect_ok(ts_confusion_init(&d2, K), "init");
    tu_expect_ok(ts_boundary_init(&b1, K, 2), "init");
    tu_expect_ok(ts_boundary_init(&b2, K, 2), "init");
    v[hw + 5] = v[2 * hw + 7] = 1;
    char e1[512] = "", e2[512] = "";
    for (int pass = 0; pass < 2; pass++) {
        ts_threads_init(pass == 0 ? 1 : 2);
        ts_confusion *c = pass ? &c2 : &c1, *d = pass ? &d2 : &d1;
        ts_boundary *b = pass ? &b2 : &b1;
        tu_expect_ok(ts_confusion_add_logits(c, &x, t, v, IGN), "logits");
        tu_expect_ok(ts_argmax_classes(ids, &x), "argmax");
        tu_expect_ok(ts_confusion_add_ids(d, ids, t, v, N, H, W, IGN), "ids");
        tu_expect_ok(ts_boundary_add(b, ids, t, v, N, H, W, IGN), "boundary");
        /* One image: its rows are split between the threads. */
        tu_expect_ok(ts_boundary_add(b, ids + hw, t + hw, v + hw, 1, H, W, IGN), "boundary, one image");
        /* Two bad labels, one in each half: the first one is reported. */
        int32_t s0 = t[hw + 5], s1 = t[2 * hw + 7];
        t[hw + 5] = 9, t[2 * hw + 7] = 8;
        ts_status st = ts_confusion_add_logits(c, &x, t, v, IGN);
        tu_expect_error(st, TS_ERR_INVALID_ARG, "first bad label", "label 9", "image 1, row 0, column 5", NULL);
        snprintf(pass ? e2 : e1, 512, "%s", ts_last_error());
        t[hw + 5] = s0, t[2 * hw + 7] = s1;
    }
    ts_threads_init(0);
    tu_expect(counts_equal(&c1, &c2), "logits matrix: 1 thread = 2 threads");
    tu_expect(counts_equal(&d1, &d2) && counts_equal(&c1, &d1), "ids matrix: 1 = 2 threads = logits");
    tu_expect(bcounts_equal(&b1, &b2), "boundary counts: 1 thread = 2 threads");
    tu_expect(strcmp(e1, e2) == 0, "same error with 1 and 2 threads: '%s' vs '%s'", e1, e2);
    tu_expect(b1.pred_total[0] > 0 && b1.true_matched[1] > 0, "the thread test has boundaries");
    ts_confusion_free(&c1);
    ts_confusion_free(&c2);
    ts_confusion_free(&d1);
    ts_confusion_free(&d2);
    ts_boundary_free(&b1);
    ts_boundary_free(&b2);
    tu_free(t, "threads", "t");
    tu_free(p, "threads", "p");
    tu_free(ids, "threads", "ids");
    tu_free(v, "threads", "v");
    ts_tensor_free(&x);
}

/* ---- boundary F1 ------------------------------------------------------------------- */

/* Brute-force reference: boundary maps by the definition, then for every
 * boundary pixel the nearest boundary pixel of the same class in the other
 * map, over all pixels of the tile. */
static void ref_boundary(int K, const int32_t *pred, const int32_t *lab, const uint8_t *valid, int n, int h, int w,
                         int ignore, double tol, int64_t *out /* [4K] */)
{
    memset(out, 0, sizeof(int64_t) * 4 * K);
    int *bm[2];
    bm[0] = malloc(sizeof(int) * h * w);
    bm[1] = malloc(sizeof(int) * h * w);
    for (int img = 0; img < n; img++) {
        const int32_t *L = lab + (size_t)img * h * w, *P = pred + (size_t)img * h * w;
        const uint8_t *V = valid ? valid + (size_t)img * h * w : NULL;
#define CNT(i) ((!V || V[i]) && !(ignore >= 0 && L[i] == ignore))
        for (int s = 0; s < 2; s++) {
            const int32_t *M = s ? L : P;
            for (int y = 0; y < h; y++)
                for (int x = 0; x < w; x++) {
                    int i = y * w + x;
                    bm[s][i] = -1;
                    if (!CNT(i)) continue;
                    static const int d[4][2] = {{0, 1}, {0, -1}, {1, 0}, {-1, 0}};
                    for (int k = 0; k < 4; k++) {
                        int yy = y + d[k][0], xx = x + d[k][1];
                        if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
                        int j = yy * w + xx;
                        if (CNT(j) && M[j] != M[i]) bm[s][i] = M[i];
                    }
                }
        }
#undef CNT
        for (int s = 0; s < 2; s++) /* s = 0: predicted pixels against truth */
            for (int i = 0; i < h * w; i++) {
                int c = bm[s][i];
                if (c < 0) continue;
                out[2 * s * K + c]++;
                double best = INFINITY;
                for (int j = 0; j < h * w; j++)
                    if (bm[1 - s][j] == c) {
                        double dy = i / w - j / w, dx = i % w - j % w;
                        best = fmin(best, sqrt(dx * dx + dy * dy));
                    }
                if (best <= tol + 1e-12) out[(2 * s + 1) * K + c]++;
            }
    }
    free(bm[0]);
    free(bm[1]);
}

/* Truth: a 5x5 square of class 1 at rows 3..7, columns 3..7 of a 12x12 tile
 * of class 0; prediction: the same square moved by (dy, dx). */
static void square(int32_t *m, int dy, int dx)
{
    for (int y = 0; y < 12; y++)
        for (int x = 0; x < 12; x++) m[y * 12 + x] = (y >= 3 + dy && y <= 7 + dy && x >= 3 + dx && x <= 7 + dx);
}

static void bf_metrics(ts_metrics *m, const int32_t *pred, const int32_t *lab, const uint8_t *valid, int K, int n,
                       int h, int w, double tol, ts_boundary *keep)
{
    ts_confusion cm;
    ts_boundary b;
    tu_expect_ok(ts_confusion_init(&cm, K), "init");
    tu_expect_ok(ts_boundary_init(&b, K, tol), "boundary init");
    tu_expect_ok(ts_confusion_add_ids(&cm, pred, lab, valid, n, h, w, IGN), "add");
    tu_expect_ok(ts_boundary_add(&b, pred, lab, valid, n, h, w, IGN), "boundary add");
    int64_t ref[4 * 8];
    ref_boundary(K, pred, lab, valid, n, h, w, IGN, tol, ref);
    tu_expect(memcmp(ref, b.pred_total, sizeof(int64_t) * 4 * K) == 0, "boundary counts vs brute force (tol %g)",
              tol);
    tu_expect_ok(ts_metrics_compute(m, &cm, &b), "compute");
    if (keep) {
        tu_expect_ok(ts_boundary_init(keep, K, tol), "init");
        tu_expect_ok(ts_boundary_merge(keep, &b), "merge");
    }
    ts_boundary_free(&b);
    ts_confusion_free(&cm);
}

static void test_boundary(tu_rng *r)
{
    int32_t t[144], p[144];
    ts_metrics m;
    square(t, 0, 0);

    /* Identical masks: every score 1. */
    bf_metrics(&m, t, t, NULL, 2, 1, 12, 12, 0, NULL);
    tu_expect(m.cls[1].bf_true == 16 && m.cls[0].bf_true == 20, "square ring 16, outer ring 20 (got %lld, %lld)",
              (long long)m.cls[1].bf_true, (long long)m.cls[0].bf_true);
    tu_expect(m.bf_mf1 == 1 && m.bf_precision == 1 && m.bf_recall == 1 && m.cls[0].bf_f1 == 1 && m.bf_present == 2,
              "identical masks: boundary F1 1");
    ts_metrics_free(&m);

    /* One pixel to the right: by hand, 8 of 16 (class 1) and 8 of 20 (class
     * 0) boundary pixels coincide; within 1 or 2 pixels all do. */
    square(p, 0, 1);
    bf_metrics(&m, p, t, NULL, 2, 1, 12, 12, 0, NULL);
    EXPECT_D(m.cls[1].bf_precision, 0.5, 0, "shift 1, tol 0, class 1 precision");
    EXPECT_D(m.cls[1].bf_recall, 0.5, 0, "shift 1, tol 0, class 1 recall");
    EXPECT_D(m.cls[0].bf_f1, 0.4, 1e-15, "shift 1, tol 0, class 0 F1");
    EXPECT_D(m.bf_mf1, 0.45, 1e-15, "shift 1, tol 0, mean");
    EXPECT_D(m.bf_precision, 16.0 / 36, 1e-15, "shift 1, tol 0, pooled precision");
    ts_metrics_free(&m);
    for (int tol = 1; tol <= 2; tol++) {
        bf_metrics(&m, p, t, NULL, 2, 1, 12, 12, tol, NULL);
        tu_expect(m.bf_mf1 == 1 && m.cls[0].bf_pred_matched == 20 && m.cls[1].bf_true_matched == 16,
                  "shift 1, tol %d: all matched", tol);
        ts_metrics_free(&m);
    }
    /* Diagonal shift: corners are sqrt(2) away, so 1 < tol 1.5. */
    square(p, 1, 1);
    bf_metrics(&m, p, t, NULL, 2, 1, 12, 12, 1, NULL);
    tu_expect(m.bf_mf1 < 1 && m.bf_mf1 > 0.5, "diagonal shift, tol 1: %g in (0.5, 1)", m.bf_mf1);
    ts_metrics_free(&m);
    bf_metrics(&m, p, t, NULL, 2, 1, 12, 12, 1.5, NULL);
    tu_expect(m.bf_mf1 == 1, "diagonal shift, tol 1.5: 1");
    ts_metrics_free(&m);
    /* Two pixels: tol 1 misses, tol 2 matches everything. */
    square(p, 0, 2);
    bf_metrics(&m, p, t, NULL, 2, 1, 12, 12, 1, NULL);
    tu_expect(m.bf_mf1 < 1, "shift 2, tol 1 < 1");
    ts_metrics_free(&m);
    bf_metrics(&m, p, t, NULL, 2, 1, 12, 12, 2, NULL);
    tu_expect(m.bf_mf1 == 1, "shift 2, tol 2: 1");
    ts_metrics_free(&m);

    /* Empty boundaries: uniform maps. Then truth with boundaries, prediction
     * without: precision 0 (no predicted boundary), recall 0, F1 0. */
    int32_t z[144] = {0};
    bf_metrics(&m, z, z, NULL, 2, 1, 12, 12, 1, NULL);
    tu_expect(m.has_boundary && m.bf_present == 0 && isnan(m.bf_mf1) && isnan(m.bf_f1) && isnan(m.cls[0].bf_f1),
              "no boundaries anywhere: NaN");
    ts_metrics_free(&m);
    bf_metrics(&m, z, t, NULL, 2, 1, 12, 12, 1, NULL);
    tu_expect(m.bf_present == 2 && m.cls[1].bf_pred == 0 && m.cls[1].bf_precision == 0 && m.cls[1].bf_recall == 0 &&
                  m.cls[1].bf_f1 == 0 && m.bf_mf1 == 0,
              "boundaries only in the truth: 0");
    ts_metrics_free(&m);

    /* An ignore block and a masked block are not boundaries, nor is the tile
     * edge: a uniform class 0 around them scores no boundary at all. */
    int32_t ig[144];
    uint8_t v[144];
    for (int i = 0; i < 144; i++) {
        int y = i / 12, x = i % 12;
        ig[i] = (y >= 2 && y < 5 && x >= 2 && x < 6) ? IGN : 0;
        v[i] = !(y >= 7 && y < 10 && x >= 6 && x < 9);
    }
    bf_metrics(&m, z, ig, v, 2, 1, 12, 12, 0, NULL);
    tu_expect(m.bf_present == 0 && m.pixels == 144 - 12 - 9, "ignore and masked regions make no boundary");
    ts_metrics_free(&m);
    /* ... and a square hidden under an ignore region is not scored. */
    for (int i = 0; i < 144; i++) ig[i] = t[i] ? IGN : 0;
    bf_metrics(&m, t, ig, NULL, 2, 1, 12, 12, 0, NULL);
    tu_expect(m.bf_present == 0, "prediction boundaries inside the ignore region are not scored");
    ts_metrics_free(&m);

    /* Tiles: two tiles added as one batch = two adds (counts summed). */
    int32_t tt[288], pp[288];
    square(tt, 0, 0);
    square(tt + 144, 0, 0);
    square(pp, 0, 0);
    square(pp + 144, 0, 1);
    ts_boundary both, one;
    bf_metrics(&m, pp, tt, NULL, 2, 2, 12, 12, 0, &both);
    ts_metrics_free(&m);
    tu_expect_ok(ts_boundary_init(&one, 2, 0), "init");
    tu_expect_ok(ts_boundary_add(&one, pp, tt, NULL, 1, 12, 12, IGN), "tile 1");
    tu_expect_ok(ts_boundary_add(&one, pp + 144, tt + 144, NULL, 1, 12, 12, IGN), "tile 2");
    tu_expect(bcounts_equal(&both, &one), "boundary counts: batch = tile by tile");
    tu_expect(one.pred_total[1] == 32 && one.pred_matched[1] == 16 + 8, "two tiles pooled: 24 of 32");
    ts_boundary_reset(&one);
    tu_expect(one.pred_total[1] == 0 && one.tolerance == 0, "boundary reset");
    ts_boundary_free(&one);
    ts_boundary_free(&both);

    /* Random blocky masks with ignore and valid, odd sizes, several
     * tolerances, against the brute force (inside bf_metrics). */
    const int N = 2, H = 23, W = 31, K = 4;
    int32_t *rt = tu_alloc_i32(N * H * W), *rp = tu_alloc_i32(N * H * W);
    uint8_t *rv = tu_alloc(N * H * W);
    for (int i = 0; i < N * H * W; i++) {
        int y = i / W % H, x = i % W;
        rt[i] = ((y / 5) * 3 + (x / 7)) % K;
        rp[i] = tu_randint(r, 6) == 0 ? tu_randint(r, K) : ((y + 1) / 5 * 3 + (x / 7)) % K;
        if (tu_randint(r, 25) == 0) rt[i] = IGN;
        rv[i] = tu_randint(r, 30) != 0;
    }
    const double tols[] = {0, 1, 1.5, 2, 3.2};
    for (int k = 0; k < 5; k++) {
        bf_metrics(&m, rp, rt, rv, K, N, H, W, tols[k], NULL);
        ts_metrics_free(&m);
    }
    tu_free(rt, "boundary", "t");
    tu_free(rp, "boundary", "p");
    tu_free(rv, "boundary", "v");
}

/* ---- output ---------------------------------------------------------------------------- */

static double jnum(const cJSON *o, const char *key)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsNumber(it)) return it->valuedouble;
    return cJSON_IsNull(it) ? NAN : -12345;
}

static void test_output(void)
{
    const int32_t t[12] = {0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 0, 1};
    const int32_t p[12] = {0, 1, 0, 1, 2, 2, 2, 0, 2, 0, 0, 1};
    ts_confusion cm;
    ts_boundary b;
    ts_metrics m;
    tu_expect_ok(ts_confusion_init(&cm, 4), "init");
    tu_expect_ok(ts_boundary_init(&b, 4, 1), "init");
    tu_expect_ok(ts_confusion_add_ids(&cm, p, t, NULL, 1, 3, 4, IGN), "add");
    tu_expect_ok(ts_boundary_add(&b, p, t, NULL, 1, 3, 4, IGN), "add");
    tu_expect_ok(ts_metrics_compute(&m, &cm, &b), "compute");
    const char *names[4] = {"background", "building", NULL, "water"};
    char *js = NULL;
    tu_expect_ok(ts_metrics_json(&m, names, &js), "json");
    cJSON *root = js ? cJSON_Parse(js) : NULL;
    tu_expect(root != NULL, "the JSON parses");
    if (root) {
        const char *keys[] = {"classes",  "pixels",     "correct",          "present_classes", "overall_accuracy",
                              "kappa",    "fwiou",      "miou",             "mf1",             "mprecision",
                              "mrecall",  "miou_all_classes", "mf1_all_classes", "averaging",    "per_class",
                              "confusion_matrix", "boundary_f1"};
        for (size_t k = 0; k < sizeof keys / sizeof *keys; k++)
            tu_expect(cJSON_HasObjectItem(root, keys[k]), "JSON key %s", keys[k]);
        tu_expect(jnum(root, "miou") == m.miou && jnum(root, "kappa") == m.kappa && jnum(root, "fwiou") == m.fwiou &&
                      jnum(root, "overall_accuracy") == m.oa && jnum(root, "miou_all_classes") == m.miou_all &&
                      jnum(root, "pixels") == 12 && jnum(root, "classes") == 4,
                  "JSON values round-trip exactly");
        const cJSON *pc = cJSON_GetObjectItemCaseSensitive(root, "per_class");
        tu_expect(cJSON_GetArraySize(pc) == 4, "per_class has 4 entries");
        const cJSON *c1 = cJSON_GetArrayItem(pc, 1), *c2 = cJSON_GetArrayItem(pc, 2), *c3 = cJSON_GetArrayItem(pc, 3);
        tu_expect(c1 && strcmp(cJSON_GetObjectItem(c1, "name")->valuestring, "building") == 0 &&
                      jnum(c1, "iou") == m.cls[1].iou && jnum(c1, "support") == 3 && jnum(c1, "bf_f1") == m.cls[1].bf_f1 &&
                      cJSON_HasObjectItem(c1, "bf_true_matched"),
                  "per-class entry 1");
        tu_expect(c2 && strcmp(cJSON_GetObjectItem(c2, "name")->valuestring, "class 2") == 0, "unnamed class");
        tu_expect(c3 && cJSON_IsFalse(cJSON_GetObjectItem(c3, "present")) && cJSON_IsNull(cJSON_GetObjectItem(c3, "iou")),
                  "absent class: present false, iou null");
        const cJSON *cmx = cJSON_GetObjectItemCaseSensitive(root, "confusion_matrix");
        tu_expect(cJSON_GetArraySize(cmx) == 4 && cJSON_GetArrayItem(cJSON_GetArrayItem(cmx, 0), 1)->valueint == 1 &&
                      cJSON_GetArrayItem(cJSON_GetArrayItem(cmx, 1), 1)->valueint == 2,
                  "confusion matrix rows are truth");
        const cJSON *bf = cJSON_GetObjectItemCaseSensitive(root, "boundary_f1");
        tu_expect(jnum(bf, "tolerance_px") == 1 && jnum(bf, "mean_f1") == m.bf_mf1 &&
                      strcmp(cJSON_GetObjectItem(bf, "distance")->valuestring, "euclidean") == 0,
                  "boundary_f1 object");
        cJSON_Delete(root);
    }
    free(js);

    /* The file writer; then no boundary counts gives boundary_f1 null. */
    char path[] = "/tmp/test_metrics_XXXXXX";
    int fd = mkstemp(path);
    if (fd >= 0) close(fd);
    tu_expect_ok(ts_metrics_write_json(path, &m, NULL), "write json");
    FILE *f = fopen(path, "rb");
    char text[16384] = "";
    size_t len = f ? fread(text, 1, sizeof text - 1, f) : 0;
    if (f) fclose(f);
    text[len] = 0;
    cJSON *fr = cJSON_Parse(text);
    tu_expect(fr && jnum(fr, "miou") == m.miou && len > 0 && text[len - 1] == '\n', "JSON file round trip");
    cJSON_Delete(fr);
    remove(path);

    FILE *tf = tmpfile();
    if (tf) {
        ts_metrics_format(tf, &m, names);
        rewind(tf);
        char out[8192] = "";
        size_t n = fread(out, 1, sizeof out - 1, tf);
        out[n] = 0;
        fclose(tf);
        tu_expect(strstr(out, "background") && strstr(out, "water") && strstr(out, "class 2") && strstr(out, "mIoU") &&
                      strstr(out, "kappa") && strstr(out, "boundary F1") && strstr(out, "BF1"),
                  "the table names classes and scores:\n%s", out);
    }
    ts_metrics_free(&m);
    tu_expect_ok(ts_metrics_compute(&m, &cm, NULL), "compute without boundary");
    tu_expect_ok(ts_metrics_json(&m, NULL, &js), "json");
    root = cJSON_Parse(js);
    tu_expect(root && cJSON_IsNull(cJSON_GetObjectItem(root, "boundary_f1")) &&
                  !cJSON_HasObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(root, "per_class"), 0), "bf_f1"),
              "no boundary counts: boundary_f1 null");
    cJSON_Delete(root);
    free(js);
    ts_metrics_free(&m);
    ts_boundary_free(&b);
    ts_confusion_free(&cm);
}

/* ts_boundary_add_rows: a scene cut into strips, each read with floor(tol) + 1
 * context rows above and below (clipped at the scene edges), gives exactly
 * the counts of the whole scene as one tile, for any strip height. */
static void test_boundary_rows(tu_rng *r)
{
    const int H = 57, W = 41, K = 4;
    int32_t *t = tu_alloc_i32((size_t)H * W), *p = tu_alloc_i32((size_t)H * W);
    uint8_t *v = tu_alloc((size_t)H * W);
    for (int i = 0; i < H * W; i++) {
        int y = i / W, x = i % W;
        t[i] = ((y / 6) * 3 + (x + y / 3) / 7) % K;
        p[i] = tu_randint(r, 8) == 0 ? tu_randint(r, K) : (((y + 1) / 6) * 3 + (x + 1 + y / 3) / 7) % K;
        if (tu_randint(r, 30) == 0) t[i] = IGN;
        v[i] = tu_randint(r, 40) != 0;
    }
    const double tols[] = {0, 1, 1.5, 2, 3.2};
    const int strips[] = {1, 2, 5, 7, 16, 57};
    for (int k = 0; k < 5; k++) {
        ts_boundary whole, parts;
        tu_expect_ok(ts_boundary_init(&whole, K, tols[k]), "init");
        tu_expect_ok(ts_boundary_init(&parts, K, tols[k]), "init");
        tu_expect_ok(ts_boundary_add(&whole, p, t, v, 1, H, W, IGN), "whole scene");
        for (int s = 0; s < 6; s++) {
            ts_boundary_reset(&parts);
            int halo = (int)floor(tols[k]) + 1;
            for (int y0 = 0; y0 < H; y0 += strips[s]) {
                int y1 = y0 + strips[s] < H ? y0 + strips[s] : H;
                int c0 = y0 - halo > 0 ? y0 - halo : 0, c1 = y1 + halo < H ? y1 + halo : H;
                size_t at = (size_t)c0 * W;
                tu_expect_ok(ts_boundary_add_rows(&parts, p + at, t + at, v + at, c1 - c0, W, IGN, y0 - c0, y1 - c0),
                             "strip");
            }
            tu_expect(bcounts_equal(&whole, &parts), "boundary counts: strips of %d rows = whole scene (tol %g)",
                      strips[s], tols[k]);
        }
        /* Without the context rows, matches across strip edges are lost. */
        if (tols[k] >= 1) {
            ts_boundary_reset(&parts);
            for (int y0 = 0; y0 < H; y0 += 5) {
                int y1 = y0 + 5 < H ? y0 + 5 : H;
                size_t at = (size_t)y0 * W;
                tu_expect_ok(ts_boundary_add_rows(&parts, p + at, t + at, v + at, y1 - y0, W, IGN, 0, y1 - y0),
                             "strip");
            }
            tu_expect(!bcounts_equal(&whole, &parts), "strips without context rows differ (tol %g)", tols[k]);
        }
        ts_boundary_free(&whole);
        ts_boundary_free(&parts);
    }
    ts_boundary b;
    tu_expect_ok(ts_boundary_init(&b, K, 1), "init");
    tu_expect_error(ts_boundary_add_rows(&b, p, t, v, 5, W, IGN, 3, 6), TS_ERR_INVALID_ARG, "rows past h",
                    "rows [3, 6)", "5 rows", NULL);
    tu_expect_ok(ts_boundary_add_rows(&b, p, t, v, 5, W, IGN, 2, 2), "empty row range");
    tu_expect(b.pred_total[0] + b.true_total[0] == 0, "empty row range adds nothing");
    ts_boundary_free(&b);
    tu_free(t, "boundary rows", "t");
    tu_free(p, "boundary rows", "p");
    tu_free(v, "boundary rows", "v");
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    tu_rng rng;
    tu_rng_seed(&rng, 20240701);
    test_hand_3class();
    test_empty_and_single();
    test_argmax();
    test_masks();
    test_errors();
    test_merge_and_reference(&rng);
    test_threads(&rng);
    test_boundary(&rng);
    test_boundary_rows(&rng);
    test_output();
    ts_ctx_free(&ctx);
    return tu_finish("test_metrics");
}
