/* Spatial train/val/test split by blocks of the image grid. The rule, the
 * buffer and what they guarantee are stated in io/windows.h. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "io/windows.h"

static uint64_t mix64(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The block's hash depends on the seed and its (bx, by) only. */
static uint64_t block_hash(uint64_t seed, int64_t bx, int64_t by)
{
    return mix64(mix64(mix64(seed) ^ (uint64_t)bx) ^ (uint64_t)by);
}

typedef struct blk {
    int64_t bx, by;
    uint64_t hash;
    size_t count;
    int split;
} blk;

typedef struct win_key {
    int64_t bx, by;
    size_t idx;
} win_key;

static int cmp_win_key(const void *a, const void *b)
{
    const win_key *x = a, *y = b;
    if (x->by != y->by) return x->by < y->by ? -1 : 1;
    if (x->bx != y->bx) return x->bx < y->bx ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

typedef struct ord {
    uint64_t hash;
    int64_t by, bx;
    size_t blk;
} ord;

static int cmp_order(const void *a, const void *b)
{
    const ord *x = a, *y = b;
    if (x->hash != y->hash) return x->hash < y->hash ? -1 : 1;
    if (x->by != y->by) return x->by < y->by ? -1 : 1;
    return x->bx < y->bx ? -1 : x->bx > y->bx;
}

/* Blocks are sorted by (by, bx): binary search. */
static const blk *find_block(const blk *b, size_t nb, int64_t bx, int64_t by)
{
    size_t lo = 0, hi = nb;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const blk *m = &b[mid];
        if (m->by < by || (m->by == by && m->bx < bx))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < nb && b[lo].bx == bx && b[lo].by == by ? &b[lo] : NULL;
}

static int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

/* The k in [lo, hi] whose prefix count P[k] is closest to target (the
 * smallest such k on a tie). */
static size_t best_cut(const size_t *P, size_t lo, size_t hi, double target)
{
    size_t best = lo;
    double err = fabs((double)P[lo] - target);
    for (size_t k = lo + 1; k <= hi; k++) {
        double e = fabs((double)P[k] - target);
        if (e < err) best = k, err = e;
    }
    return best;
}

ts_status ts_split_parse_ratios(const char *s, double ratios[3])
{
    double v[3] = {0, 0, 0};
    int n = 0;
    const char *p = s;
    for (;;) {
        if (n == 3)
            return ts_error(TS_ERR_INVALID_ARG, "split ratios \"%s\": at most three values (train,val,test)", s);
        char *end;
        errno = 0;
        v[n] = strtod(p, &end);
        if (end == p || errno || !isfinite(v[n]) || v[n] < 0 || v[n] > 1)
            return ts_error(TS_ERR_INVALID_ARG,
                            "split ratios \"%s\": value %d is not a number in [0, 1]; write e.g. 0.8,0.1,0.1", s,
                            n + 1);
        n++;
        if (*end == '\0') break;
        if (*end != ',')
            return ts_error(TS_ERR_INVALID_ARG, "split ratios \"%s\": values must be separated by commas", s);
        p = end + 1;
    }
    double sum = v[0] + v[1] + v[2];
    if (n == 1) return ts_error(TS_ERR_INVALID_ARG, "split ratios \"%s\": give train,val[,test]", s);
    if (n == 2) {
        if (sum > 1 + 1e-9)
            return ts_error(TS_ERR_INVALID_ARG, "split ratios \"%s\": train + val = %g exceeds 1", s, sum);
        v[2] = sum >= 1 ? 0 : 1 - sum;
    } else if (fabs(sum - 1) > 1e-6) {
        return ts_error(TS_ERR_INVALID_ARG, "split ratios \"%s\": they add up to %g, not 1", s, sum);
    }
    memcpy(ratios, v, sizeof v);
    return TS_OK;
}

ts_status ts_split_assign(ts_window_list *l, int64_t raster_w, int64_t raster_h, const ts_split_params *p,
                          ts_split_report *report)
{
    static const char *op = "spatial split";
    if (report) memset(report, 0, sizeof *report);
    if (p->block <= 0)
        return ts_error(TS_ERR_INVALID_ARG, "%s: block size %lld must be positive", op, (long long)p->block);
    if (p->buffer < 0) return ts_error(TS_ERR_INVALID_ARG, "%s: buffer %d must be >= 0 blocks", op, p->buffer);
    double sum = 0;
    for (int s = 0; s < 3; s++) {
        if (!isfinite(p->ratios[s]) || p->ratios[s] < 0)
            return ts_error(TS_ERR_INVALID_ARG, "%s: ratio %d (%g) must be a number >= 0", op, s + 1, p->ratios[s]);
        sum += p->ratios[s];
    }
    if (!(sum > 0)) return ts_error(TS_ERR_INVALID_ARG, "%s: the ratios add up to 0", op);
    if (raster_w <= 0 || raster_h <= 0 || raster_w > INT64_MAX / 4 || raster_h > INT64_MAX / 4)
        return ts_error(TS_ERR_INVALID_ARG, "%s: raster size %lldx%lld", op, (long long)raster_w,
                        (long long)raster_h);
    const size_t n = l->count;
    if (n == 0) return ts_error(TS_ERR_INVALID_ARG, "%s: no windows to split", op);

    int64_t max_side = 0;
    for (size_t i = 0; i < n; i++) {
        const ts_window *w = &l->w[i];
        if (w->col_off < 0 || w->row_off < 0 || w->width <= 0 || w->height <= 0 || w->col_off > raster_w - w->width ||
            w->row_off > raster_h - w->height)
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: window %zu (col_off %lld, row_off %lld, %dx%d) is not inside the %lldx%lld raster; "
                            "are the windows for another image?",
                            op, i, (long long)w->col_off, (long long)w->row_off, w->width, w->height,
                            (long long)raster_w, (long long)raster_h);
        if (w->width > max_side) max_side = w->width;
        if (w->height > max_side) max_side = w->height;
    }

    win_key *keys = malloc(n * sizeof *keys);
    blk *blocks = malloc(n * sizeof *blocks);
    ord *order = malloc(n * sizeof *order);
    size_t *P = malloc((n + 1) * sizeof *P);
    uint32_t *win_blk = malloc(n * sizeof *win_blk);
    ts_status st = TS_OK;
    if (!keys || !blocks || !order || !P || !win_blk || n > UINT32_MAX) {
        st = ts_error(TS_ERR_NOMEM, "%s: out of memory for %zu windows", op, n);
        goto done;
    }
    /* The block holding each centre: twice the centre is 2*off + size, an
     * integer, so floor(centre / block) is exact. */
    const int64_t B = p->block;
    for (size_t i = 0; i < n; i++) {
        const ts_window *w = &l->w[i];
        keys[i].bx = (2 * w->col_off + w->width) / (2 * B);
        keys[i].by = (2 * w->row_off + w->height) / (2 * B);
        keys[i].idx = i;
    }
    qsort(keys, n, sizeof *keys, cmp_win_key);
    size_t nb = 0;
    for (size_t i = 0; i < n; i++) {
        if (nb == 0 || keys[i].bx != blocks[nb - 1].bx || keys[i].by != blocks[nb - 1].by) {
            blocks[nb].bx = keys[i].bx;
            blocks[nb].by = keys[i].by;
            blocks[nb].hash = block_hash(p->seed, keys[i].bx, keys[i].by);
            blocks[nb].count = 0;
            blocks[nb].split = TS_SPLIT_NONE;
            nb++;
        }
        blocks[nb - 1].count++;
        win_blk[keys[i].idx] = (uint32_t)(nb - 1);
    }

    const int pos[3] = {p->ratios[0] > 0, p->ratios[1] > 0, p->ratios[2] > 0};
    const size_t npos = (size_t)(pos[0] + pos[1] + pos[2]);
    if (nb < npos) {
        st = ts_error(TS_ERR_INVALID_ARG,
                      "%s: the windows fall in %zu block%s of %lld px, too few for %zu splits; use a smaller block",
                      op, nb, nb == 1 ? "" : "s", (long long)B, npos);
        goto done;
    }
    for (size_t j = 0; j < nb; j++) order[j] = (ord){blocks[j].hash, blocks[j].by, blocks[j].bx, j};
    qsort(order, nb, sizeof *order, cmp_order);
    P[0] = 0;
    for (size_t j = 0; j < nb; j++) P[j + 1] = P[j] + blocks[order[j].blk].count;

    /* Cut the hash order into train [0, k1), val [k1, k2), test [k2, nb). */
    const double t1 = p->ratios[0] / sum * (double)n, t2 = (p->ratios[0] + p->ratios[1]) / sum * (double)n;
    size_t k1, k2;
    if (!pos[0])
        k1 = 0;
    else if (!pos[1] && !pos[2])
        k1 = nb;
    else
        k1 = best_cut(P, 1, nb - (size_t)pos[1] - (size_t)pos[2], t1);
    if (!pos[1])
        k2 = k1;
    else if (!pos[2])
        k2 = nb;
    else
        k2 = best_cut(P, k1 + 1, nb - 1, t2);
    for (size_t j = 0; j < nb; j++)
        blocks[order[j].blk].split = j < k1 ? TS_SPLIT_TRAIN : j < k2 ? TS_SPLIT_VAL : TS_SPLIT_TEST;

    size_t before[3] = {0, 0, 0};
    for (size_t i = 0; i < n; i++) {
        int s = blocks[win_blk[i]].split;
        l->split[i] = (uint8_t)s;
        before[s - 1]++;
    }

    /* The buffer: a val/test window whose footprint, grown by g pixels on
     * every side, touches a block of another split is re-tagged buffer. */
    if (p->buffer > 0) {
        const int64_t g = ((int64_t)p->buffer - 1) * B + (max_side + 1) / 2;
        for (size_t i = 0; i < n; i++) {
            const int s = l->split[i];
            if (s == TS_SPLIT_TRAIN) continue;
            const ts_window *w = &l->w[i];
            const int64_t bx0 = floor_div(w->col_off - g, B), bx1 = floor_div(w->col_off + w->width + g - 1, B);
            const int64_t by0 = floor_div(w->row_off - g, B), by1 = floor_div(w->row_off + w->height + g - 1, B);
            int near = 0;
            for (int64_t by = by0 < 0 ? 0 : by0; by <= by1 && !near; by++)
                for (int64_t bx = bx0 < 0 ? 0 : bx0; bx <= bx1 && !near; bx++) {
                    const blk *o = find_block(blocks, nb, bx, by);
                    if (o && o->split != s) near = 1;
                }
            if (near) l->split[i] = TS_SPLIT_BUFFER;
        }
    }
    l->has_split = 1;

    if (report) {
        for (size_t i = 0; i < n; i++) report->windows[l->split[i]]++;
        for (size_t j = 0; j < nb; j++) report->blocks[blocks[j].split]++;
        for (int s = 0; s < 3; s++) report->achieved[s] = (double)before[s] / (double)n;
    }
done:
    free(keys);
    free(blocks);
    free(order);
    free(P);
    free(win_blk);
    return st;
}
