/* Segmentation metrics from one confusion matrix (train/metrics.h says what
 * every score means and which conventions were chosen). */
#include "train/metrics.h"

#include <cJSON.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/outfile.h"

/* Below this many pixel visits a call runs on one thread (the result is the
 * same either way; this only avoids waking the pool for a tiny tile). */
#define METRICS_PAR_MIN 32768

/* ---- shared: which pixels count, and the first bad one ---------------------- */

typedef struct scan_job {
    int K, n, h, w, ignore;
    const int32_t *pred;  /* ids, or NULL with logits */
    const float *logits;  /* [n, K, h, w], or NULL with pred */
    const int32_t *labels;
    const uint8_t *valid; /* may be NULL */
} scan_job;

static inline int counted(const scan_job *j, size_t i)
{
    if (j->valid && !j->valid[i]) return 0;
    return !(j->ignore >= 0 && j->labels[i] == j->ignore);
}

/* torch.argmax over the K channels of pixel (img, y*w + x): ties to the
 * lowest id, the first NaN wins. */
static inline int argmax_px(const float *logits, int K, size_t hw, int img, size_t px)
{
    const float *p = logits + (size_t)img * K * hw + px;
    float best = p[0];
    int arg = 0;
    if (isnan(best)) return 0;
    for (int c = 1; c < K; c++) {
        float v = p[(size_t)c * hw];
        if (isnan(v)) return c;
        if (v > best) {
            best = v;
            arg = c;
        }
    }
    return arg;
}

/* Visits rows [r0, r1) of the batch (row r = image r / h, line r % h). Adds
 * into cnt[K*K] when not NULL. Returns the flat index of the first counted
 * pixel with a label or id outside [0, K), or -1; stops there. */
static int64_t scan_rows(const scan_job *j, int64_t r0, int64_t r1, int64_t *cnt)
{
    const int K = j->K;
    const size_t hw = (size_t)j->h * j->w;
    for (int64_t r = r0; r < r1; r++) {
        int img = (int)(r / j->h);
        size_t base = (size_t)r * j->w;
        size_t px0 = (size_t)(r % j->h) * j->w;
        for (int x = 0; x < j->w; x++) {
            size_t i = base + x;
            if (!counted(j, i)) continue;
            int32_t t = j->labels[i];
            if (t < 0 || t >= K) return (int64_t)i;
            int32_t p = j->pred ? j->pred[i] : argmax_px(j->logits, K, hw, img, px0 + x);
            if (p < 0 || p >= K) return (int64_t)i;
            if (cnt) cnt[(size_t)t * K + p]++;
        }
    }
    return -1;
}

static ts_status bad_pixel_error(const char *op, const scan_job *j, int64_t i)
{
    int64_t hw = (int64_t)j->h * j->w;
    int img = (int)(i / hw), y = (int)(i % hw / j->w), x = (int)(i % j->w);
    int32_t t = j->labels[i];
    if (t < 0 || t >= j->K) {
        if (j->ignore >= 0)
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: label %d at image %d, row %d, column %d is neither a class id in [0, %d) nor the "
                            "ignore id %d; check the class count and the label encoding",
                            op, (int)t, img, y, x, j->K, j->ignore);
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: label %d at image %d, row %d, column %d is not a class id in [0, %d) (no ignore id "
                        "is set); check the class count and the label encoding",
                        op, (int)t, img, y, x, j->K);
    }
    return ts_error(TS_ERR_INVALID_ARG,
                    "%s: predicted id %d at image %d, row %d, column %d is not a class id in [0, %d)", op,
                    (int)j->pred[i], img, y, x, j->K);
}

/* Per-thread count arrays start a cache line apart (no false sharing). */
static size_t pad_counts(size_t n) { return (n + 7) / 8 * 8 + 8; }

/* Thread count for a job of `work` pixel visits over `rows` rows. */
static int pick_threads(int64_t rows, int64_t work)
{
    int nt = omp_get_max_threads();
    if (work < METRICS_PAR_MIN) nt = 1;
    if (nt > rows) nt = (int)rows;
    return nt < 1 ? 1 : nt;
}

/* Scans the whole batch on up to nt threads; adds into cnt[K*K] (when not
 * NULL) only if no pixel is bad. Returns the first bad index or -1, or -2
 * when out of memory. */
static int64_t scan_batch(const scan_job *j, int64_t *cnt)
{
    int64_t rows = (int64_t)j->n * j->h;
    int64_t work = rows * j->w * (j->logits ? j->K : 1);
    int nt = pick_threads(rows, work);
    int64_t first[256];
    if (nt > 256) nt = 256;
    size_t kk = (size_t)j->K * j->K, stride = pad_counts(kk);
    int64_t *local = NULL;
    if (cnt) {
        local = calloc((size_t)nt * stride, sizeof *local);
        if (!local) return -2;
    }
    for (int t = 0; t < nt; t++) first[t] = -1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num(), team = omp_get_num_threads();
        int64_t r0 = rows * t / team, r1 = rows * (t + 1) / team;
        first[t] = scan_rows(j, r0, r1, local ? local + (size_t)t * stride : NULL);
    }
    /* Partitions are contiguous and in thread order: the first thread with a
     * bad pixel holds the globally first one. */
    int64_t bad = -1;
    for (int t = 0; t < nt && bad < 0; t++) bad = first[t];
    if (bad < 0 && cnt)
        for (int t = 0; t < nt; t++)
            for (size_t k = 0; k < kk; k++) cnt[k] += local[(size_t)t * stride + k];
    free(local);
    return bad;
}

static ts_status check_dims(const char *op, const void *pred, const int32_t *labels, int n, int h, int w)
{
    if (n < 0 || h < 0 || w < 0)
        return ts_error(TS_ERR_INVALID_ARG, "%s: negative batch shape [%d,%d,%d]", op, n, h, w);
    if ((size_t)n * h * w > 0 && (!pred || !labels))
        return ts_error(TS_ERR_INVALID_ARG, "%s: NULL %s for a [%d,%d,%d] batch", op,
                        !pred ? "predictions" : "labels", n, h, w);
    return TS_OK;
}

/* ---- the confusion matrix -------------------------------------------------- */

ts_status ts_confusion_init(ts_confusion *cm, int classes)
{
    if (!cm) return ts_error(TS_ERR_INVALID_ARG, "confusion: NULL matrix");
    cm->classes = 0;
    cm->counts = NULL;
    if (classes < 1 || classes > TS_METRICS_MAX_CLASSES)
        return ts_error(TS_ERR_INVALID_ARG, "confusion: %d classes; the count must be in [1, %d]", classes,
                        TS_METRICS_MAX_CLASSES);
    cm->counts = calloc((size_t)classes * classes, sizeof *cm->counts);
    if (!cm->counts) return ts_error(TS_ERR_NOMEM, "confusion: out of memory for %d x %d counts", classes, classes);
    cm->classes = classes;
    return TS_OK;
}

void ts_confusion_free(ts_confusion *cm)
{
    if (!cm) return;
    free(cm->counts);
    cm->counts = NULL;
    cm->classes = 0;
}

void ts_confusion_reset(ts_confusion *cm)
{
    if (cm && cm->counts) memset(cm->counts, 0, (size_t)cm->classes * cm->classes * sizeof *cm->counts);
}

ts_status ts_confusion_merge(ts_confusion *dst, const ts_confusion *src)
{
    if (!dst || !src || !dst->counts || !src->counts)
        return ts_error(TS_ERR_INVALID_ARG, "confusion merge: NULL or uninitialized matrix");
    if (dst->classes != src->classes)
        return ts_error(TS_ERR_INVALID_ARG, "confusion merge: %d classes into a matrix of %d", src->classes,
                        dst->classes);
    size_t kk = (size_t)dst->classes * dst->classes;
    for (size_t k = 0; k < kk; k++) dst->counts[k] += src->counts[k];
    return TS_OK;
}

int64_t ts_confusion_total(const ts_confusion *cm)
{
    int64_t s = 0;
    if (!cm || !cm->counts) return 0;
    for (size_t k = 0; k < (size_t)cm->classes * cm->classes; k++) s += cm->counts[k];
    return s;
}

ts_status ts_confusion_add_ids(ts_confusion *cm, const int32_t *pred, const int32_t *labels, const uint8_t *valid,
                               int n, int h, int w, int ignore_index)
{
    const char *op = "confusion add";
    if (!cm || !cm->counts) return ts_error(TS_ERR_INVALID_ARG, "%s: NULL or uninitialized matrix", op);
    ts_status st = check_dims(op, pred, labels, n, h, w);
    if (st != TS_OK || (size_t)n * h * w == 0) return st;
    scan_job j = {cm->classes, n, h, w, ignore_index, pred, NULL, labels, valid};
    int64_t bad = scan_batch(&j, cm->counts);
    if (bad == -2) return ts_error(TS_ERR_NOMEM, "%s: out of memory for per-thread counts", op);
    if (bad >= 0) return bad_pixel_error(op, &j, bad);
    return TS_OK;
}

static ts_status check_logits(const char *op, const ts_tensor *logits, int K)
{
    char s[TS_SHAPE_STR];
    if (!logits || !logits->data) return ts_error(TS_ERR_INVALID_ARG, "%s: NULL logits", op);
    if (K > 0 && logits->c != K)
        return ts_error(TS_ERR_INVALID_ARG, "%s: logits %s have %d channels, the matrix %d classes", op,
                        ts_shape_str(logits, s), logits->c, K);
    if (logits->n < 1 || logits->c < 1 || logits->h < 1 || logits->w < 1)
        return ts_error(TS_ERR_INVALID_ARG, "%s: logits %s: every dimension must be >= 1", op,
                        ts_shape_str(logits, s));
    return TS_OK;
}

ts_status ts_confusion_add_logits(ts_confusion *cm, const ts_tensor *logits, const int32_t *labels,
                                  const uint8_t *valid, int ignore_index)
{
    const char *op = "confusion add (logits)";
    if (!cm || !cm->counts) return ts_error(TS_ERR_INVALID_ARG, "%s: NULL or uninitialized matrix", op);
    ts_status st = check_logits(op, logits, cm->classes);
    if (st != TS_OK) return st;
    if (!labels) return ts_error(TS_ERR_INVALID_ARG, "%s: NULL labels", op);
    scan_job j = {cm->classes, logits->n, logits->h, logits->w, ignore_index, NULL, logits->data, labels, valid};
    int64_t bad = scan_batch(&j, cm->counts);
    if (bad == -2) return ts_error(TS_ERR_NOMEM, "%s: out of memory for per-thread counts", op);
    if (bad >= 0) return bad_pixel_error(op, &j, bad);
    return TS_OK;
}

ts_status ts_argmax_classes(int32_t *pred, const ts_tensor *logits)
{
    const char *op = "argmax classes";
    ts_status st = check_logits(op, logits, 0);
    if (st != TS_OK) return st;
    if (!pred) return ts_error(TS_ERR_INVALID_ARG, "%s: NULL output", op);
    int K = logits->c;
    size_t hw = (size_t)logits->h * logits->w;
    int64_t total = (int64_t)logits->n * (int64_t)hw;
    int nt = pick_threads(total, total * K);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t i = 0; i < total; i++)
        pred[i] = argmax_px(logits->data, K, hw, (int)(i / (int64_t)hw), (size_t)(i % (int64_t)hw));
    return TS_OK;
}

/* ---- boundary F1 --------------------------------------------------------------- */

ts_status ts_boundary_init(ts_boundary *b, int classes, double tolerance)
{
    if (!b) return ts_error(TS_ERR_INVALID_ARG, "boundary F1: NULL counts");
    memset(b, 0, sizeof *b);
    if (classes < 1 || classes > TS_METRICS_MAX_CLASSES)
        return ts_error(TS_ERR_INVALID_ARG, "boundary F1: %d classes; the count must be in [1, %d]", classes,
                        TS_METRICS_MAX_CLASSES);
    if (!(tolerance >= 0 && tolerance <= TS_BOUNDARY_MAX_TOLERANCE))
        return ts_error(TS_ERR_INVALID_ARG, "boundary F1: tolerance %g pixels; it must be in [0, %g]", tolerance,
                        TS_BOUNDARY_MAX_TOLERANCE);
    int64_t *p = calloc((size_t)classes * 4, sizeof *p);
    if (!p) return ts_error(TS_ERR_NOMEM, "boundary F1: out of memory");
    b->classes = classes;
    b->tolerance = tolerance;
    b->pred_total = p;
    b->pred_matched = p + classes;
    b->true_total = p + 2 * (size_t)classes;
    b->true_matched = p + 3 * (size_t)classes;
    return TS_OK;
}

void ts_boundary_free(ts_boundary *b)
{
    if (!b) return;
    free(b->pred_total);
    memset(b, 0, sizeof *b);
}

void ts_boundary_reset(ts_boundary *b)
{
    if (b && b->pred_total) memset(b->pred_total, 0, (size_t)b->classes * 4 * sizeof *b->pred_total);
}

ts_status ts_boundary_merge(ts_boundary *dst, const ts_boundary *src)
{
    if (!dst || !src || !dst->pred_total || !src->pred_total)
        return ts_error(TS_ERR_INVALID_ARG, "boundary F1 merge: NULL or uninitialized counts");
    if (dst->classes != src->classes || dst->tolerance != src->tolerance)
        return ts_error(TS_ERR_INVALID_ARG,
                        "boundary F1 merge: %d classes at tolerance %g into counts of %d classes at tolerance %g",
                        src->classes, src->tolerance, dst->classes, dst->tolerance);
    for (size_t k = 0; k < (size_t)dst->classes * 4; k++) dst->pred_total[k] += src->pred_total[k];
    return TS_OK;
}

typedef struct offset {
    int dy, dx, d2;
} offset;

static int offset_cmp(const void *a, const void *b)
{
    const offset *p = a, *q = b;
    if (p->d2 != q->d2) return p->d2 < q->d2 ? -1 : 1;
    if (p->dy != q->dy) return p->dy < q->dy ? -1 : 1;
    return p->dx < q->dx ? -1 : p->dx > q->dx;
}

/* The disk dx^2 + dy^2 <= d^2, nearest first (a match is usually close). */
static offset *disk_offsets(double d, int *count)
{
    int r = (int)floor(d);
    offset *o = malloc((size_t)(2 * r + 1) * (2 * r + 1) * sizeof *o);
    if (!o) return NULL;
    int k = 0;
    for (int dy = -r; dy <= r; dy++)
        for (int dx = -r; dx <= r; dx++)
            if (dx * dx + dy * dy <= d * d + 1e-9) o[k++] = (offset){dy, dx, dx * dx + dy * dy};
    qsort(o, (size_t)k, sizeof *o, offset_cmp);
    *count = k;
    return o;
}

/* Class-c boundary map of one image: out[p] = map[p] when p counts and a
 * counted 4-neighbour holds another class, else -1. mask[p] = p counts. */
static void boundary_rows(int16_t *out, const int32_t *map, const uint8_t *mask, int h, int w, int y0, int y1)
{
    for (int y = y0; y < y1; y++)
        for (int x = 0; x < w; x++) {
            size_t p = (size_t)y * w + x;
            int16_t v = -1;
            if (mask[p]) {
                int32_t c = map[p];
                if ((x > 0 && mask[p - 1] && map[p - 1] != c) || (x + 1 < w && mask[p + 1] && map[p + 1] != c) ||
                    (y > 0 && mask[p - w] && map[p - w] != c) || (y + 1 < h && mask[p + w] && map[p + w] != c))
                    v = (int16_t)c;
            }
            out[p] = v;
        }
}

/* For rows [y0, y1): every pixel of `from` with a class c counts into
 * total[c], and into matched[c] when `to` holds c within the disk. */
static void match_rows(int64_t *total, int64_t *matched, const int16_t *from, const int16_t *to, int h, int w,
                       const offset *off, int noff, int y0, int y1)
{
    for (int y = y0; y < y1; y++)
        for (int x = 0; x < w; x++) {
            int16_t c = from[(size_t)y * w + x];
            if (c < 0) continue;
            total[c]++;
            for (int k = 0; k < noff; k++) {
                int yy = y + off[k].dy, xx = x + off[k].dx;
                if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
                if (to[(size_t)yy * w + xx] == c) {
                    matched[c]++;
                    break;
                }
            }
        }
}

typedef struct boundary_job {
    int K, h, w, ignore;
    const offset *off;
    int noff;
} boundary_job;

/* Rows [y0, y1) of one image: phase 0 the counted mask, phase 1 both
 * boundary maps (needs the mask of the neighbouring rows), phase 2 the
 * matching (needs the maps of rows within the tolerance) into l[4K]. */
static void boundary_phase(const boundary_job *j, int phase, int16_t *tb, int16_t *pb, uint8_t *mask,
                           const int32_t *lab, const int32_t *prd, const uint8_t *val, int64_t *l, int y0, int y1)
{
    const int K = j->K, h = j->h, w = j->w;
    if (phase == 0) {
        for (size_t p = (size_t)y0 * w; p < (size_t)y1 * w; p++)
            mask[p] = (uint8_t)((!val || val[p]) && !(j->ignore >= 0 && lab[p] == j->ignore));
    } else if (phase == 1) {
        boundary_rows(tb, lab, mask, h, w, y0, y1);
        boundary_rows(pb, prd, mask, h, w, y0, y1);
    } else {
        match_rows(l, l + K, pb, tb, h, w, j->off, j->noff, y0, y1);
        match_rows(l + 2 * K, l + 3 * K, tb, pb, h, w, j->off, j->noff, y0, y1);
    }
}

ts_status ts_boundary_add(ts_boundary *b, const int32_t *pred, const int32_t *labels, const uint8_t *valid, int n,
                          int h, int w, int ignore_index)
{
    const char *op = "boundary F1 add";
    if (!b || !b->pred_total) return ts_error(TS_ERR_INVALID_ARG, "%s: NULL or uninitialized counts", op);
    ts_status st = check_dims(op, pred, labels, n, h, w);
    if (st != TS_OK || (size_t)n * h * w == 0) return st;
    const int K = b->classes;
    scan_job j = {K, n, h, w, ignore_index, pred, NULL, labels, valid};
    int64_t bad = scan_batch(&j, NULL);
    if (bad == -2) return ts_error(TS_ERR_NOMEM, "%s: out of memory", op);
    if (bad >= 0) return bad_pixel_error(op, &j, bad);

    size_t hw = (size_t)h * w;
    int nt = pick_threads((int64_t)n * h, (int64_t)n * (int64_t)hw * 4);
    /* Whole images per thread when there are enough (no barriers); else the
     * rows of each image are split, with barriers between the phases. */
    int by_image = n >= nt;
    int sets = by_image ? nt : 1;
    if (!by_image && nt > h) nt = h;
    int noff = 0;
    offset *off = disk_offsets(b->tolerance, &noff);
    int16_t *tb = malloc((size_t)sets * hw * sizeof *tb), *pb = malloc((size_t)sets * hw * sizeof *pb);
    uint8_t *mask = malloc((size_t)sets * hw);
    size_t stride = pad_counts((size_t)4 * K);
    int64_t *local = calloc((size_t)nt * stride, sizeof *local);
    if (!off || !tb || !pb || !mask || !local) {
        free(off), free(tb), free(pb), free(mask), free(local);
        return ts_error(TS_ERR_NOMEM, "%s: out of memory for %d %dx%d boundary maps", op, sets, h, w);
    }
    boundary_job bj = {K, h, w, ignore_index, off, noff};
    if (by_image) {
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            int t = omp_get_thread_num(), team = omp_get_num_threads();
            int i0 = (int)((int64_t)n * t / team), i1 = (int)((int64_t)n * (t + 1) / team);
            size_t o = (size_t)t * hw;
            for (int img = i0; img < i1; img++) {
                size_t at = (size_t)img * hw;
                boundary_phase(&bj, 0, tb + o, pb + o, mask + o, labels + at, pred + at, valid ? valid + at : NULL,
                               local + (size_t)t * stride, 0, h);
                boundary_phase(&bj, 1, tb + o, pb + o, mask + o, labels + at, pred + at, valid ? valid + at : NULL,
                               local + (size_t)t * stride, 0, h);
                boundary_phase(&bj, 2, tb + o, pb + o, mask + o, labels + at, pred + at, valid ? valid + at : NULL,
                               local + (size_t)t * stride, 0, h);
            }
        }
    } else {
        for (int img = 0; img < n; img++) {
            size_t at = (size_t)img * hw;
            const int32_t *lab = labels + at, *prd = pred + at;
            const uint8_t *val = valid ? valid + at : NULL;
#pragma omp parallel num_threads(nt) if (nt > 1)
            {
                int t = omp_get_thread_num(), team = omp_get_num_threads();
                int y0 = (int)((int64_t)h * t / team), y1 = (int)((int64_t)h * (t + 1) / team);
                int64_t *l = local + (size_t)t * stride;
                boundary_phase(&bj, 0, tb, pb, mask, lab, prd, val, l, y0, y1);
#pragma omp barrier
                boundary_phase(&bj, 1, tb, pb, mask, lab, prd, val, l, y0, y1);
#pragma omp barrier
                boundary_phase(&bj, 2, tb, pb, mask, lab, prd, val, l, y0, y1);
            }
        }
    }
    /* Laid out as pred_total, pred_matched, true_total, true_matched. */
    for (int t = 0; t < nt; t++)
        for (size_t k = 0; k < (size_t)4 * K; k++) b->pred_total[k] += local[(size_t)t * stride + k];
    free(off), free(tb), free(pb), free(mask), free(local);
    return TS_OK;
}

ts_status ts_boundary_add_rows(ts_boundary *b, const int32_t *pred, const int32_t *labels, const uint8_t *valid,
                               int h, int w, int ignore_index, int row_begin, int row_end)
{
    const char *op = "boundary F1 add rows";
    if (!b || !b->pred_total) return ts_error(TS_ERR_INVALID_ARG, "%s: NULL or uninitialized counts", op);
    ts_status st = check_dims(op, pred, labels, 1, h, w);
    if (st != TS_OK) return st;
    if (row_begin < 0 || row_end > h || row_begin > row_end)
        return ts_error(TS_ERR_INVALID_ARG, "%s: rows [%d, %d) are not within the %d rows given", op, row_begin,
                        row_end, h);
    if (row_begin == row_end || w == 0) return TS_OK;
    const int K = b->classes;
    /* Every row is checked, context rows included: their ids feed the
     * boundary maps, and an id beyond int16 would alias a class there. */
    scan_job j = {K, 1, h, w, ignore_index, pred, NULL, labels, valid};
    int64_t bad = scan_batch(&j, NULL);
    if (bad == -2) return ts_error(TS_ERR_NOMEM, "%s: out of memory", op);
    if (bad >= 0) return bad_pixel_error(op, &j, bad);

    /* Only rows within the tolerance of the counted rows matter: their
     * boundary maps are matched against, and theirs need one row more of
     * mask on each side. Rows beyond are never looked at. */
    const int reach = (int)floor(b->tolerance);
    const int m0 = row_begin - reach - 1 > 0 ? row_begin - reach - 1 : 0;
    const int m1 = row_end + reach + 1 < h ? row_end + reach + 1 : h;
    const int b0 = row_begin - reach > 0 ? row_begin - reach : 0;
    const int b1 = row_end + reach < h ? row_end + reach : h;
    size_t hw = (size_t)h * w;
    int nt = pick_threads(m1 - m0, (int64_t)(m1 - m0) * w * 4);
    int noff = 0;
    offset *off = disk_offsets(b->tolerance, &noff);
    int16_t *tb = malloc(hw * sizeof *tb), *pb = malloc(hw * sizeof *pb);
    uint8_t *mask = malloc(hw);
    size_t stride = pad_counts((size_t)4 * K);
    int64_t *local = calloc((size_t)nt * stride, sizeof *local);
    if (!off || !tb || !pb || !mask || !local) {
        free(off), free(tb), free(pb), free(mask), free(local);
        return ts_error(TS_ERR_NOMEM, "%s: out of memory for %dx%d boundary maps", op, h, w);
    }
    boundary_job bj = {K, h, w, ignore_index, off, noff};
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num(), team = omp_get_num_threads();
        int64_t *l = local + (size_t)t * stride;
        /* Each phase splits its own row range among the threads. */
        int y0 = m0 + (int)((int64_t)(m1 - m0) * t / team), y1 = m0 + (int)((int64_t)(m1 - m0) * (t + 1) / team);
        boundary_phase(&bj, 0, tb, pb, mask, labels, pred, valid, l, y0, y1);
#pragma omp barrier
        y0 = b0 + (int)((int64_t)(b1 - b0) * t / team), y1 = b0 + (int)((int64_t)(b1 - b0) * (t + 1) / team);
        boundary_phase(&bj, 1, tb, pb, mask, labels, pred, valid, l, y0, y1);
#pragma omp barrier
        y0 = row_begin + (int)((int64_t)(row_end - row_begin) * t / team);
        y1 = row_begin + (int)((int64_t)(row_end - row_begin) * (t + 1) / team);
        boundary_phase(&bj, 2, tb, pb, mask, labels, pred, valid, l, y0, y1);
    }
    for (int t = 0; t < nt; t++)
        for (size_t k = 0; k < (size_t)4 * K; k++) b->pred_total[k] += local[(size_t)t * stride + k];
    free(off), free(tb), free(pb), free(mask), free(local);
    return TS_OK;
}

/* ---- the scores ------------------------------------------------------------------ */

static double ratio0(int64_t num, int64_t den) { return den > 0 ? (double)num / (double)den : 0.0; }

ts_status ts_metrics_compute(ts_metrics *m, const ts_confusion *cm, const ts_boundary *bf)
{
    if (!m) return ts_error(TS_ERR_INVALID_ARG, "metrics: NULL output");
    memset(m, 0, sizeof *m);
    if (!cm || !cm->counts) return ts_error(TS_ERR_INVALID_ARG, "metrics: NULL or uninitialized confusion matrix");
    const int K = cm->classes;
    if (bf && (!bf->pred_total || bf->classes != K))
        return ts_error(TS_ERR_INVALID_ARG, "metrics: boundary counts of %d classes with a matrix of %d",
                        bf->pred_total ? bf->classes : 0, K);
    m->cls = calloc((size_t)K, sizeof *m->cls);
    m->confusion = malloc((size_t)K * K * sizeof *m->confusion);
    if (!m->cls || !m->confusion) {
        ts_metrics_free(m);
        return ts_error(TS_ERR_NOMEM, "metrics: out of memory for %d classes", K);
    }
    memcpy(m->confusion, cm->counts, (size_t)K * K * sizeof *m->confusion);
    m->classes = K;

    const double nan = NAN;
    int64_t total = 0, trace = 0;
    for (int t = 0; t < K; t++) {
        ts_class_metrics *c = &m->cls[t];
        for (int p = 0; p < K; p++) {
            int64_t v = cm->counts[(size_t)t * K + p];
            total += v;
            c->support += v;
            m->cls[p].predicted += v;
        }
        trace += cm->counts[(size_t)t * K + t];
    }
    m->pixels = total;
    m->correct = trace;

    double s_iou = 0, s_f1 = 0, s_p = 0, s_r = 0, s_fw = 0, s_chance = 0;
    for (int k = 0; k < K; k++) {
        ts_class_metrics *c = &m->cls[k];
        c->tp = cm->counts[(size_t)k * K + k];
        c->fn = c->support - c->tp;
        c->fp = c->predicted - c->tp;
        c->present = c->tp + c->fp + c->fn > 0;
        if (c->present) {
            c->iou = (double)c->tp / (double)(c->tp + c->fp + c->fn);
            c->precision = ratio0(c->tp, c->tp + c->fp);
            c->recall = ratio0(c->tp, c->tp + c->fn);
            c->f1 = 2.0 * (double)c->tp / (double)(2 * c->tp + c->fp + c->fn);
            m->present++;
            s_iou += c->iou, s_f1 += c->f1, s_p += c->precision, s_r += c->recall;
            if (c->support > 0) s_fw += (double)c->support * c->iou;
        } else {
            c->iou = c->precision = c->recall = c->f1 = nan;
        }
        s_chance += (double)c->support * (double)c->predicted;
    }
    if (m->present > 0) {
        m->miou = s_iou / m->present, m->mf1 = s_f1 / m->present;
        m->mprecision = s_p / m->present, m->mrecall = s_r / m->present;
        m->miou_all = s_iou / K, m->mf1_all = s_f1 / K;
    } else {
        m->miou = m->mf1 = m->mprecision = m->mrecall = m->miou_all = m->mf1_all = nan;
    }
    if (total > 0) {
        double n = (double)total;
        m->oa = (double)trace / n;
        m->fwiou = s_fw / n;
        double pe = s_chance / (n * n);
        m->kappa = pe < 1.0 ? (m->oa - pe) / (1.0 - pe) : nan;
    } else {
        m->oa = m->fwiou = m->kappa = nan;
    }

    m->bf_mf1 = m->bf_precision = m->bf_recall = m->bf_f1 = nan;
    m->bf_tolerance = nan;
    for (int k = 0; k < K; k++) {
        ts_class_metrics *c = &m->cls[k];
        c->bf_precision = c->bf_recall = c->bf_f1 = nan;
    }
    if (bf) {
        m->has_boundary = 1;
        m->bf_tolerance = bf->tolerance;
        int64_t pt = 0, pm = 0, tt = 0, tm = 0;
        double s_bf = 0;
        for (int k = 0; k < K; k++) {
            ts_class_metrics *c = &m->cls[k];
            c->bf_pred = bf->pred_total[k], c->bf_pred_matched = bf->pred_matched[k];
            c->bf_true = bf->true_total[k], c->bf_true_matched = bf->true_matched[k];
            pt += c->bf_pred, pm += c->bf_pred_matched, tt += c->bf_true, tm += c->bf_true_matched;
            c->bf_present = c->bf_pred + c->bf_true > 0;
            if (!c->bf_present) continue;
            c->bf_precision = ratio0(c->bf_pred_matched, c->bf_pred);
            c->bf_recall = ratio0(c->bf_true_matched, c->bf_true);
            double s = c->bf_precision + c->bf_recall;
            c->bf_f1 = s > 0 ? 2 * c->bf_precision * c->bf_recall / s : 0.0;
            m->bf_present++;
            s_bf += c->bf_f1;
        }
        if (m->bf_present > 0) {
            m->bf_mf1 = s_bf / m->bf_present;
            m->bf_precision = ratio0(pm, pt);
            m->bf_recall = ratio0(tm, tt);
            double s = m->bf_precision + m->bf_recall;
            m->bf_f1 = s > 0 ? 2 * m->bf_precision * m->bf_recall / s : 0.0;
        }
    }
    return TS_OK;
}

void ts_metrics_free(ts_metrics *m)
{
    if (!m) return;
    free(m->cls);
    free(m->confusion);
    memset(m, 0, sizeof *m);
}

/* ---- output ---------------------------------------------------------------------- */

static const char *class_name(const char *const *names, int k, char *buf, size_t size)
{
    if (names && names[k]) return names[k];
    snprintf(buf, size, "class %d", k);
    return buf;
}

static void fmt_score(char *buf, size_t size, double v)
{
    if (isnan(v))
        snprintf(buf, size, "-");
    else
        snprintf(buf, size, "%.4f", v);
}

void ts_metrics_format(FILE *f, const ts_metrics *m, const char *const *class_names)
{
    if (!f || !m) return;
    char nb[32], a[5][16];
    int width = 5;
    for (int k = 0; k < m->classes; k++) {
        int len = (int)strlen(class_name(class_names, k, nb, sizeof nb));
        if (len > width) width = len;
    }
    if (width > 32) width = 32;
    fprintf(f, "%4s  %-*s %8s %8s %9s %8s %13s %13s", "id", width, "class", "IoU", "F1", "precision", "recall",
            "support", "predicted");
    if (m->has_boundary) fprintf(f, " %8s", "BF1");
    fputc('\n', f);
    for (int k = 0; k < m->classes; k++) {
        const ts_class_metrics *c = &m->cls[k];
        fmt_score(a[0], sizeof a[0], c->iou);
        fmt_score(a[1], sizeof a[1], c->f1);
        fmt_score(a[2], sizeof a[2], c->precision);
        fmt_score(a[3], sizeof a[3], c->recall);
        fprintf(f, "%4d  %-*.*s %8s %8s %9s %8s %13lld %13lld", k, width, width, class_name(class_names, k, nb, sizeof nb),
                a[0], a[1], a[2], a[3], (long long)c->support, (long long)c->predicted);
        if (m->has_boundary) {
            fmt_score(a[4], sizeof a[4], c->bf_f1);
            fprintf(f, " %8s", a[4]);
        }
        fputc('\n', f);
    }
    fmt_score(a[0], sizeof a[0], m->miou);
    fmt_score(a[1], sizeof a[1], m->miou_all);
    fmt_score(a[2], sizeof a[2], m->mf1);
    fmt_score(a[3], sizeof a[3], m->mf1_all);
    fprintf(f, "mIoU %s, mean F1 %s over the %d of %d classes present (all classes, absent as 0: mIoU %s, F1 %s)\n",
            a[0], a[2], m->present, m->classes, a[1], a[3]);
    fmt_score(a[0], sizeof a[0], m->oa);
    fmt_score(a[1], sizeof a[1], m->kappa);
    fmt_score(a[2], sizeof a[2], m->fwiou);
    fprintf(f, "overall accuracy %s, kappa %s, frequency-weighted IoU %s, %lld pixels\n", a[0], a[1], a[2],
            (long long)m->pixels);
    if (m->has_boundary) {
        fmt_score(a[0], sizeof a[0], m->bf_mf1);
        fmt_score(a[1], sizeof a[1], m->bf_precision);
        fmt_score(a[2], sizeof a[2], m->bf_recall);
        fprintf(f,
                "boundary F1 %s over the %d classes with boundaries (tolerance %g px, Euclidean; all classes "
                "pooled: precision %s, recall %s)\n",
                a[0], m->bf_present, m->bf_tolerance, a[1], a[2]);
    }
}

/* A score as the shortest decimal that reads back as the same double (cJSON
 * 1.7.15 prints 15 digits when they are only within an epsilon), or null. */
static void add_num(cJSON *o, const char *key, double v)
{
    if (!isfinite(v)) {
        cJSON_AddNullToObject(o, key);
        return;
    }
    char buf[32];
    for (int digits = 15; digits <= 17; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, v);
        if (strtod(buf, NULL) == v) break;
    }
    cJSON_AddRawToObject(o, key, buf);
}

#define METRICS_AVERAGING                                                                                       \
    "one confusion matrix over all counted pixels (rows truth, columns prediction); a class is present when "  \
    "TP+FP+FN > 0 and an absent class scores null; miou/mf1/mprecision/mrecall average present classes "      \
    "(torchmetrics average='macro'); *_all_classes average all classes with absent ones as 0 (scikit-learn "   \
    "labels=range(K), average='macro'); a zero denominator of a present class scores 0; boundary F1 counts "   \
    "4-neighbour boundary pixels matched within the Euclidean tolerance, summed over tiles"

cJSON *ts_metrics_to_cjson(const ts_metrics *m, const char *const *class_names)
{
    if (!m || !m->cls) {
        ts_error(TS_ERR_INVALID_ARG, "metrics JSON: NULL or empty metrics");
        return NULL;
    }
    const int K = m->classes;
    char nb[32];
    cJSON *root = cJSON_CreateObject();
    int ok = root != NULL;
    if (ok) {
        cJSON_AddNumberToObject(root, "classes", K);
        cJSON_AddNumberToObject(root, "pixels", (double)m->pixels);
        cJSON_AddNumberToObject(root, "correct", (double)m->correct);
        cJSON_AddNumberToObject(root, "present_classes", m->present);
        add_num(root, "overall_accuracy", m->oa);
        add_num(root, "kappa", m->kappa);
        add_num(root, "fwiou", m->fwiou);
        add_num(root, "miou", m->miou);
        add_num(root, "mf1", m->mf1);
        add_num(root, "mprecision", m->mprecision);
        add_num(root, "mrecall", m->mrecall);
        add_num(root, "miou_all_classes", m->miou_all);
        add_num(root, "mf1_all_classes", m->mf1_all);
        ok = cJSON_AddStringToObject(root, "averaging", METRICS_AVERAGING) != NULL;
        cJSON *pc = cJSON_AddArrayToObject(root, "per_class");
        ok = ok && pc;
        for (int k = 0; ok && k < K; k++) {
            const ts_class_metrics *c = &m->cls[k];
            cJSON *o = cJSON_CreateObject();
            if (!o || !cJSON_AddItemToArray(pc, o)) {
                cJSON_Delete(o);
                ok = 0;
                break;
            }
            cJSON_AddNumberToObject(o, "id", k);
            cJSON_AddStringToObject(o, "name", class_name(class_names, k, nb, sizeof nb));
            cJSON_AddBoolToObject(o, "present", c->present);
            cJSON_AddNumberToObject(o, "support", (double)c->support);
            cJSON_AddNumberToObject(o, "predicted", (double)c->predicted);
            cJSON_AddNumberToObject(o, "tp", (double)c->tp);
            cJSON_AddNumberToObject(o, "fp", (double)c->fp);
            cJSON_AddNumberToObject(o, "fn", (double)c->fn);
            add_num(o, "iou", c->iou);
            add_num(o, "precision", c->precision);
            add_num(o, "recall", c->recall);
            add_num(o, "f1", c->f1);
            if (m->has_boundary) {
                add_num(o, "bf_precision", c->bf_precision);
                add_num(o, "bf_recall", c->bf_recall);
                add_num(o, "bf_f1", c->bf_f1);
                cJSON_AddNumberToObject(o, "bf_pred", (double)c->bf_pred);
                cJSON_AddNumberToObject(o, "bf_pred_matched", (double)c->bf_pred_matched);
                cJSON_AddNumberToObject(o, "bf_true", (double)c->bf_true);
                if (!cJSON_AddNumberToObject(o, "bf_true_matched", (double)c->bf_true_matched)) ok = 0;
            }
        }
        cJSON *cmx = ok ? cJSON_AddArrayToObject(root, "confusion_matrix") : NULL;
        ok = ok && cmx;
        for (int t = 0; ok && t < K; t++) {
            cJSON *row = cJSON_CreateArray();
            if (!row || !cJSON_AddItemToArray(cmx, row)) {
                cJSON_Delete(row);
                ok = 0;
                break;
            }
            for (int p = 0; p < K; p++) {
                cJSON *v = cJSON_CreateNumber((double)m->confusion[(size_t)t * K + p]);
                if (!v || !cJSON_AddItemToArray(row, v)) {
                    cJSON_Delete(v);
                    ok = 0;
                    break;
                }
            }
        }
        if (ok && m->has_boundary) {
            cJSON *b = cJSON_AddObjectToObject(root, "boundary_f1");
            ok = b != NULL;
            if (ok) {
                cJSON_AddNumberToObject(b, "tolerance_px", m->bf_tolerance);
                cJSON_AddStringToObject(b, "distance", "euclidean");
                add_num(b, "mean_f1", m->bf_mf1);
                add_num(b, "precision", m->bf_precision);
                add_num(b, "recall", m->bf_recall);
                add_num(b, "f1", m->bf_f1);
                ok = cJSON_AddNumberToObject(b, "classes_with_boundaries", m->bf_present) != NULL;
            }
        } else if (ok) {
            ok = cJSON_AddNullToObject(root, "boundary_f1") != NULL;
        }
    }
    if (!ok) {
        cJSON_Delete(root);
        ts_error(TS_ERR_NOMEM, "metrics JSON: out of memory");
        return NULL;
    }
    return root;
}

ts_status ts_metrics_json(const ts_metrics *m, const char *const *class_names, char **json)
{
    if (!json) return ts_error(TS_ERR_INVALID_ARG, "metrics JSON: NULL output");
    *json = NULL;
    cJSON *root = ts_metrics_to_cjson(m, class_names);
    if (!root) return m && m->cls ? TS_ERR_NOMEM : TS_ERR_INVALID_ARG;
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    char *copy = text ? strdup(text) : NULL;
    cJSON_free(text);
    if (!copy) return ts_error(TS_ERR_NOMEM, "metrics JSON: out of memory printing the report");
    *json = copy;
    return TS_OK;
}

ts_status ts_metrics_write_json(const char *path, const ts_metrics *m, const char *const *class_names)
{
    if (!path) return ts_error(TS_ERR_INVALID_ARG, "metrics JSON: NULL path");
    char *text = NULL;
    ts_status st = ts_metrics_json(m, class_names, &text);
    if (st != TS_OK) return st;
    size_t len = strlen(text);
    char *withnl = realloc(text, len + 2);
    if (!withnl) {
        free(text);
        return ts_error(TS_ERR_NOMEM, "metrics JSON: out of memory writing %s", path);
    }
    withnl[len] = '\n';
    withnl[len + 1] = '\0';
    st = ts_write_file_atomic(path, withnl, len + 1);
    free(withnl);
    return st;
}
