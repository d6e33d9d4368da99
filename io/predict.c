#include "io/predict.h"

#include <cpl_conv.h>
#include <cpl_string.h>
#include <gdal.h>
#include <math.h>
#include <ogr_srs_api.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "io/classes.h"
#include "io/gdal_out.h"
#include "io/raster.h"
#include "weights/smp.h"

/* ---- test-time augmentation ---------------------------------------------------------------- */

static const char *const tta_names[8] = {"identity", "hflip",  "vflip",     "rot90",
                                         "rot180",   "rot270", "transpose", "antitranspose"};

ts_status ts_tta_parse(const char *s, unsigned *mask)
{
    *mask = 0;
    if (!s || !*s || strcasecmp(s, "none") == 0) {
        *mask = TS_TTA_IDENTITY;
        return TS_OK;
    }
    if (strcasecmp(s, "flips") == 0) {
        *mask = TS_TTA_IDENTITY | TS_TTA_HFLIP | TS_TTA_VFLIP;
        return TS_OK;
    }
    if (strcasecmp(s, "d4") == 0) {
        *mask = TS_TTA_ALL;
        return TS_OK;
    }
    const char *p = s;
    while (*p) {
        size_t n = strcspn(p, ",");
        int found = -1;
        for (int i = 0; i < 8; i++)
            if (strlen(tta_names[i]) == n && strncasecmp(p, tta_names[i], n) == 0) found = i;
        if (found < 0)
            return ts_error(TS_ERR_INVALID_ARG,
                            "--tta: unknown transform \"%.*s\"; use none, flips, d4 or a comma list of identity, "
                            "hflip, vflip, rot90, rot180, rot270, transpose, antitranspose",
                            (int)n, p);
        *mask |= 1u << found;
        p += n;
        if (*p == ',') p++;
    }
    if (!*mask) return ts_error(TS_ERR_INVALID_ARG, "--tta: no transform given");
    return TS_OK;
}

int64_t ts_tta_source(unsigned t, int T, int y, int x)
{
    int sy = y, sx = x;
    switch (t) {
    case TS_TTA_HFLIP: sx = T - 1 - x; break;
    case TS_TTA_VFLIP: sy = T - 1 - y; break;
    case TS_TTA_ROT90: sy = x, sx = T - 1 - y; break; /* torch.rot90(k=1): out[i][j] = in[j][T-1-i] */
    case TS_TTA_ROT180: sy = T - 1 - y, sx = T - 1 - x; break;
    case TS_TTA_ROT270: sy = T - 1 - x, sx = y; break;
    case TS_TTA_TRANSPOSE: sy = x, sx = y; break;
    case TS_TTA_ANTITRANSPOSE: sy = T - 1 - x, sx = T - 1 - y; break;
    default: break;
    }
    return (int64_t)sy * T + sx;
}

/* ---- state shared by the callbacks -------------------------------------------------------- */

typedef struct band_norm {
    double offset, scale;
    int has_clip;
    double lo, hi;
} band_norm;

struct predictor;

/* A stitcher reader thread's context: GDAL handles are not thread-safe, so
 * each reader reads through its own ts_raster (the first is the predictor's
 * own, the others clones of it). */
typedef struct predict_reader {
    const struct predictor *p;
    ts_raster *raster;
} predict_reader;

typedef struct predictor {
    const ts_predict_opts *o;
    ts_unet *m;
    ts_ctx *ctx;
    int C, K, T;    /* model in, classes written (2 for a one-class model), tile */
    int model_k;    /* the model's own class count */
    ts_raster *raster;
    predict_reader *readers; /* [nreaders]; readers[0].raster is raster */
    void **reader_ctx;       /* [nreaders]: &readers[i], for ts_stitch_fns.read_ctx */
    int nreaders;
    band_norm *norm; /* [C] */
    /* tile function scratch */
    float *xt, *prob; /* [batch][C][T][T], [batch][model_k][T][T] */
    int *srcidx;      /* [T*T] per transform */
    /* A backend with its own memory (CUDA) runs a device copy of the model;
     * its logits come back to the host for softmax, TTA and blending. */
    ts_unet_device dev;
    int on_device;
    float *logits; /* [batch][model_k][T][T], device path only */
    /* Pipelined device path (model_tile_start/_finish): batch b's logits
     * arrive in pinned[b % 2], fenced by fence[b % 2]. */
    const ts_backend_memory *mem; /* the device's, when pipelined; else NULL */
    float *pinned[2];             /* [batch][model_k][T][T], host_alloc memory */
    void *fence[2];
    int64_t started, finished;    /* batches */
    /* outputs */
    GDALDatasetH cls, probs, conf;
    uint8_t *row_bytes; /* grows to nrows * W */
    size_t row_cap;
    int64_t width;
    ts_predict_report *rep;
} predictor;

static void warnf(const ts_predict_opts *o, const char *fmt, ...)
{
    if (!o->warn) return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    o->warn(o->cb_ctx, buf);
}

/* ---- reading ------------------------------------------------------------------------------- */

/* Reader threads: vp is that reader's predict_reader. */
static ts_status read_fn(void *vp, const ts_window *w, float *data, uint8_t *valid)
{
    const predict_reader *rd = vp;
    const predictor *p = rd->p;
    ts_status st = ts_raster_read(rd->raster, w, data, valid);
    if (st || !p->norm) return st;
    const size_t plane = (size_t)w->width * w->height;
    for (int c = 0; c < p->C; c++) {
        const band_norm *n = &p->norm[c];
        float *d = data + c * plane;
        for (size_t i = 0; i < plane; i++) {
            if (!valid[i]) continue; /* invalid pixels stay 0, as in training */
            double v = d[i];
            if (n->has_clip) v = v < n->lo ? n->lo : v > n->hi ? n->hi : v;
            d[i] = (float)((v - n->offset) / n->scale);
        }
    }
    return TS_OK;
}

/* ---- the model per tile ----------------------------------------------------------------------- */

static void softmax_into(const float *logits, int K, size_t plane, float *prob_acc, const int *src)
{
    /* prob_acc[k][src[i]] += softmax(logits[:, i])[k]; src NULL: identity. */
    for (size_t i = 0; i < plane; i++) {
        const size_t d = src ? (size_t)src[i] : i;
        if (K == 1) {
            prob_acc[d] += (float)(1.0 / (1.0 + exp(-(double)logits[i])));
            continue;
        }
        float mx = logits[i];
        for (int k = 1; k < K; k++) mx = fmaxf(mx, logits[k * plane + i]);
        double sum = 0;
        for (int k = 0; k < K; k++) sum += exp((double)logits[k * plane + i] - mx);
        for (int k = 0; k < K; k++) prob_acc[k * plane + d] += (float)(exp((double)logits[k * plane + i] - mx) / sum);
    }
}

/* p->prob[b] += softmax of batch tile b's logits, mapped back through src. */
static void softmax_batch(predictor *p, int n, const float *logits, const int *src)
{
    const int MK = p->model_k;
    const size_t plane = (size_t)p->T * p->T;
    /* The model saw pixel src[i] at position i: its answer there belongs back at src[i]. */
#pragma omp parallel for schedule(static)
    for (int b = 0; b < n; b++)
        softmax_into(logits + (size_t)b * MK * plane, MK, plane, p->prob + (size_t)b * MK * plane, src);
}

/* The stitcher's output from p->prob, the sum over `count` transforms. */
static void prob_to_out(const predictor *p, int n, int count, float *out)
{
    const int MK = p->model_k;
    const size_t plane = (size_t)p->T * p->T;
    const float inv = 1.0f / (float)count;
    for (int b = 0; b < n; b++) {
        const float *pr = p->prob + (size_t)b * MK * plane;
        float *o = out + (size_t)b * p->K * plane;
        if (MK == 1) {
            for (size_t i = 0; i < plane; i++) {
                o[plane + i] = pr[i] * inv;
                o[i] = 1.0f - o[plane + i];
            }
        } else {
            for (size_t i = 0; i < (size_t)MK * plane; i++) o[i] = pr[i] * inv;
        }
    }
}

static ts_status model_tile_fn(void *vp, int n, const ts_window *wins, const float *in, float *out)
{
    (void)wins;
    predictor *p = vp;
    const int C = p->C, T = p->T, MK = p->model_k;
    const size_t plane = (size_t)T * T;
    unsigned tta = p->o->tta ? p->o->tta : TS_TTA_IDENTITY;
    int count = 0;
    memset(p->prob, 0, (size_t)n * MK * plane * sizeof *p->prob);
    for (unsigned bit = 1; bit <= TS_TTA_ANTITRANSPOSE; bit <<= 1) {
        if (!(tta & bit)) continue;
        const float *x = in;
        const int *src = NULL;
        if (bit != TS_TTA_IDENTITY) {
            for (int y = 0; y < T; y++)
                for (int xx = 0; xx < T; xx++) p->srcidx[y * T + xx] = (int)ts_tta_source(bit, T, y, xx);
            src = p->srcidx;
            const size_t planes = (size_t)n * C;
#pragma omp parallel for schedule(static)
            for (size_t q = 0; q < planes; q++)
                for (size_t i = 0; i < plane; i++) p->xt[q * plane + i] = in[q * plane + (size_t)src[i]];
            x = p->xt;
        }
        ts_tensor xin = ts_tensor_view((float *)x, n, C, T, T), logits;
        ts_status st;
        if (p->on_device) {
            logits = ts_tensor_view(p->logits, n, MK, T, T);
            st = ts_unet_device_forward(&p->dev, p->ctx, &xin, &logits);
        } else {
            st = ts_unet_forward_folded(p->m, p->ctx, &xin, &logits);
        }
        if (st) return st;
        softmax_batch(p, n, logits.data, src);
        count++;
    }
    prob_to_out(p, n, count, out);
    return TS_OK;
}

/* The pipelined device path (ts_stitch_fns.tile_start/tile_finish): the
 * device runs batch b while the host turns batch b - 1's logits into
 * probabilities and the stitcher blends them. The stitcher keeps at most two
 * batches started and unfinished, hence two pinned buffers and fences. */
static ts_status model_tile_start(void *vp, int n, const ts_window *wins, const float *in)
{
    (void)wins;
    predictor *p = vp;
    if (p->started - p->finished >= 2)
        return ts_error(TS_ERR_INVALID_ARG, "predict: internal error: a third batch started before the first finished");
    const int i = (int)(p->started % 2);
    ts_tensor xin = ts_tensor_view((float *)in, n, p->C, p->T, p->T);
    ts_tensor logits = ts_tensor_view(p->pinned[i], n, p->model_k, p->T, p->T);
    ts_status st = ts_unet_device_forward_start(&p->dev, p->ctx, &xin, &logits, p->fence[i]);
    if (st) return st;
    p->started++;
    return TS_OK;
}

static ts_status model_tile_finish(void *vp, int n, const ts_window *wins, float *out)
{
    (void)wins;
    predictor *p = vp;
    if (p->finished >= p->started)
        return ts_error(TS_ERR_INVALID_ARG, "predict: internal error: finishing a batch that was not started");
    const int i = (int)(p->finished % 2);
    ts_status st = p->mem->fence_wait(p->fence[i]);
    if (st) return st;
    p->finished++;
    memset(p->prob, 0, (size_t)n * p->model_k * p->T * p->T * sizeof *p->prob);
    softmax_batch(p, n, p->pinned[i], NULL);
    prob_to_out(p, n, 1, out);
    return TS_OK;
}

/* The stitcher's read slots on the pipelined path: page-locked, so that
 * forward_start queues their upload (the stitcher keeps a started batch's
 * slot until it is finished, which is what upload_async asks). After an
 * error a started batch's upload may still be queued: wait for it first
 * (the error that stopped the run is the one to report). */
/* Waits for everything queued before cleaning up after the work, keeping
 * the message of the failure being reported (if the wait fails as well, the
 * device's state is that failure's consequence). */
static void quiet_sync(const ts_backend_memory *mem)
{
    char keep[512];
    snprintf(keep, sizeof keep, "%s", ts_last_error());
    if (mem->sync() != TS_OK) ts_error(TS_ERR_BACKEND, "%s", keep);
}

static ts_status pinned_alloc(void *vp, void **q, size_t bytes)
{
    const predictor *p = vp;
    ts_status st = p->mem->host_alloc(q, bytes);
    if (st) return ts_error(st, "predict: a pinned input batch on backend \"%s\": %s", p->ctx->backend->name,
                            ts_last_error());
    return TS_OK;
}

static void pinned_free(void *vp, void *q)
{
    const predictor *p = vp;
    if (!q) return;
    quiet_sync(p->mem);
    p->mem->host_free(q);
}

/* Sets up the pipelined path when it applies: a device copy on a backend
 * with asynchronous downloads and fences, and no test-time augmentation
 * beyond the identity (with TTA every batch runs several forwards that are
 * averaged on the host; it keeps the synchronous model_tile_fn, where the
 * GPU then waits for the host between batches). */
static ts_status pipeline_init(predictor *p, int batch)
{
    const ts_backend_memory *mem = p->ctx->backend->memory;
    const unsigned tta = p->o->tta ? p->o->tta : TS_TTA_IDENTITY;
    if (!p->on_device || tta != TS_TTA_IDENTITY || !ts_backend_memory_async(mem)) return TS_OK;
    p->mem = mem; /* from here on predictor_free releases what there is */
    const size_t bytes = (size_t)batch * p->model_k * p->T * p->T * sizeof(float);
    for (int i = 0; i < 2; i++) {
        void *q = NULL;
        ts_status st = mem->host_alloc(&q, bytes);
        p->pinned[i] = q;
        if (!st) st = mem->fence_new(&p->fence[i]);
        if (st)
            return ts_error(st,
                            "predict: two %.1f MiB pinned host buffers and fences for the logits on backend \"%s\": "
                            "%s",
                            (double)bytes / (1 << 20), p->ctx->backend->name, ts_last_error());
    }
    return TS_OK;
}
static ts_status tile_fn(void *vp, int n, const ts_window *wins, const float *in, float *out)
{
    predictor *p = vp;
    if (p->o->tile_fn) return p->o->tile_fn(p->o->tile_ctx, n, wins, in, out);
    return model_tile_fn(vp, n, wins, in, out);
}

static void progress_fn(void *vp, int64_t done, int64_t total)
{
    predictor *p = vp;
    p->o->progress(p->o->cb_ctx, done, total);
}

/* ---- writing ------------------------------------------------------------------------------------ */

static uint8_t prob_byte(float v)
{
    if (!(v >= 0)) v = 0; /* NaN too */
    if (v > 1) v = 1;
    return (uint8_t)lrintf(v * 254.0f);
}

static ts_status write_band(predictor *p, GDALDatasetH ds, int band, int64_t row0, int nrows, const char *what)
{
    GDALRasterBandH b = GDALGetRasterBand(ds, band);
    CPLErrorReset();
    if (!b || GDALRasterIO(b, GF_Write, 0, (int)row0, (int)p->width, nrows, p->row_bytes, (int)p->width, nrows,
                           GDT_Byte, 0, 0) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "predict: writing rows %lld..%lld of the %s", (long long)row0,
                             (long long)(row0 + nrows - 1), what);
    return TS_OK;
}

static ts_status write_fn(void *vp, int64_t row0, int nrows, const float *values, const uint8_t *valid)
{
    predictor *p = vp;
    const int64_t W = p->width;
    const size_t npx = (size_t)nrows * (size_t)W;
    const int K = p->K;
    if (npx > p->row_cap) {
        uint8_t *nb = realloc(p->row_bytes, npx);
        if (!nb) return ts_error(TS_ERR_NOMEM, "predict: out of memory");
        p->row_bytes = nb;
        p->row_cap = npx;
    }
    uint8_t *cls = p->row_bytes;
    /* Class ids (arg-max, ties to the lowest id; 255 = nodata). */
    for (size_t i = 0; i < npx; i++) {
        if (!valid[i]) {
            cls[i] = 255;
            p->rep->nodata_pixels++;
            continue;
        }
        int best = 0;
        float bv = values[i];
        for (int k = 1; k < K; k++)
            if (values[k * npx + i] > bv) bv = values[k * npx + i], best = k;
        cls[i] = (uint8_t)best;
        p->rep->class_pixels[best]++;
    }
    ts_status st = write_band(p, p->cls, 1, row0, nrows, "class map");
    if (!st && p->conf) {
        /* Recomputed rather than kept: the byte buffer is reused band by band. */
        for (size_t i = 0; i < npx; i++) {
            if (!valid[i]) {
                cls[i] = 255;
                continue;
            }
            float bv = values[i];
            for (int k = 1; k < K; k++) bv = fmaxf(bv, values[k * npx + i]);
            cls[i] = prob_byte(bv);
        }
        st = write_band(p, p->conf, 1, row0, nrows, "confidence");
    }
    for (int k = 0; !st && p->probs && k < K; k++) {
        for (size_t i = 0; i < npx; i++) cls[i] = valid[i] ? prob_byte(values[k * npx + i]) : 255;
        st = write_band(p, p->probs, k + 1, row0, nrows, "probabilities");
    }
    return st;
}

/* ---- outputs ------------------------------------------------------------------------------------ */

typedef struct scene_info {
    int georef;
    double gt[6];
    char *wkt;
    int nbands;
    int rgb[3]; /* bands for the quick-look, 0 = none */
} scene_info;

static ts_status scene_info_read(const char *path, scene_info *si)
{
    memset(si, 0, sizeof *si);
    CPLErrorReset();
    GDALDatasetH ds = GDALOpenEx(path, GDAL_OF_RASTER | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!ds) return ts_gdal_error(TS_ERR_IO, "predict: cannot open the scene '%s'", path);
    si->georef = GDALGetGeoTransform(ds, si->gt) == CE_None;
    if (!si->georef) {
        const double id[6] = {0, 1, 0, 0, 0, 1};
        memcpy(si->gt, id, sizeof id);
    }
    const char *wkt = GDALGetProjectionRef(ds);
    if (wkt && *wkt) si->wkt = strdup(wkt);
    si->nbands = GDALGetRasterCount(ds);
    for (int b = 1; b <= si->nbands; b++) {
        GDALColorInterp ci = GDALGetRasterColorInterpretation(GDALGetRasterBand(ds, b));
        if (ci == GCI_RedBand && !si->rgb[0]) si->rgb[0] = b;
        if (ci == GCI_GreenBand && !si->rgb[1]) si->rgb[1] = b;
        if (ci == GCI_BlueBand && !si->rgb[2]) si->rgb[2] = b;
    }
    GDALClose(ds);
    return TS_OK;
}

static ts_status create_tif(const char *final, const char *path, int64_t W, int64_t H, int bands, int cog,
                            const scene_info *si, GDALDatasetH *out)
{
    *out = NULL;
    if (W > INT32_MAX || H > INT32_MAX)
        return ts_error(TS_ERR_INVALID_ARG, "predict: '%s': the scene is larger than GDAL's 2^31 pixels a side", final);
    GDALDriverH drv = GDALGetDriverByName("GTiff");
    if (!drv) return ts_error(TS_ERR_UNSUPPORTED, "predict: GDAL has no GTiff driver");
    char **co = NULL;
    co = CSLSetNameValue(co, "TILED", "YES");
    co = CSLSetNameValue(co, "BLOCKXSIZE", "256");
    co = CSLSetNameValue(co, "BLOCKYSIZE", "256");
    /* The COG is copied from this one: a fast, light compression is enough here. */
    co = CSLSetNameValue(co, "COMPRESS", cog ? "LZW" : "DEFLATE");
    co = CSLSetNameValue(co, "BIGTIFF", "IF_SAFER");
    if (bands > 1) co = CSLSetNameValue(co, "INTERLEAVE", "BAND");
    CPLErrorReset();
    *out = GDALCreate(drv, path, (int)W, (int)H, bands, GDT_Byte, co);
    CSLDestroy(co);
    if (!*out) return ts_gdal_error(TS_ERR_IO, "predict: cannot create '%s' (writing '%s')", final, path);
    ts_status st = TS_OK;
    if (si->georef && GDALSetGeoTransform(*out, (double *)si->gt) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "predict: '%s': cannot set the geotransform", final);
    if (!st && si->wkt && GDALSetProjection(*out, si->wkt) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "predict: '%s': cannot set the CRS", final);
    for (int b = 1; !st && b <= bands; b++)
        if (GDALSetRasterNoDataValue(GDALGetRasterBand(*out, b), 255) != CE_None)
            st = ts_gdal_error(TS_ERR_IO, "predict: '%s': cannot set nodata", final);
    if (st) {
        GDALClose(*out);
        *out = NULL;
    }
    return st;
}

static ts_status close_ds(GDALDatasetH *ds, const char *final, ts_status st)
{
    if (!*ds) return st;
    CPLErrorReset();
    GDALClose(*ds);
    *ds = NULL;
    if (!st && CPLGetLastErrorType() == CE_Failure)
        st = ts_gdal_error(TS_ERR_IO, "predict: writing '%s' (is the disk full?)", final);
    return st;
}

/* Copies the tiled GeoTIFF at src into a COG at dst (then removes src). */
static ts_status to_cog(const char *final, const char *src, const char *dst, int categorical)
{
    GDALDriverH drv = GDALGetDriverByName("COG");
    if (!drv) return ts_error(TS_ERR_UNSUPPORTED, "predict: '%s': this GDAL has no COG driver (GDAL >= 3.1)", final);
    GDALDatasetH in = GDALOpen(src, GA_ReadOnly);
    if (!in) return ts_gdal_error(TS_ERR_IO, "predict: '%s': cannot reopen '%s'", final, src);
    char **co = NULL;
    co = CSLSetNameValue(co, "COMPRESS", "DEFLATE");
    co = CSLSetNameValue(co, "BIGTIFF", "IF_SAFER");
    /* Class ids must not be averaged in the overviews. */
    co = CSLSetNameValue(co, "OVERVIEW_RESAMPLING", categorical ? "NEAREST" : "AVERAGE");
    CPLErrorReset();
    GDALDatasetH out = GDALCreateCopy(drv, dst, in, FALSE, co, NULL, NULL);
    CSLDestroy(co);
    ts_status st = TS_OK;
    if (!out) st = ts_gdal_error(TS_ERR_IO, "predict: '%s': cannot write the COG", final);
    else st = close_ds(&out, final, TS_OK);
    GDALClose(in);
    VSIUnlink(src);
    return st;
}

/* ---- quick-look ------------------------------------------------------------------------------- */

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* 2-98 % stretch of a channel to bytes, over the pixels with ok[i]. */
static ts_status stretch(const float *v, const uint8_t *ok, size_t n, uint8_t *out)
{
    float *s = malloc((n ? n : 1) * sizeof *s);
    if (!s) return ts_error(TS_ERR_NOMEM, "predict: quick-look: out of memory");
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (ok[i] && isfinite(v[i])) s[m++] = v[i];
    double lo = 0, hi = 1;
    if (m > 0) {
        qsort(s, m, sizeof *s, cmp_float);
        lo = s[(size_t)(0.02 * (double)(m - 1))];
        hi = s[(size_t)(0.98 * (double)(m - 1))];
    }
    if (hi <= lo) hi = lo + 1;
    for (size_t i = 0; i < n; i++) {
        double t = (v[i] - lo) / (hi - lo) * 255;
        out[i] = (uint8_t)(!(t > 0) ? 0 : t > 255 ? 255 : t);
    }
    free(s);
    return TS_OK;
}

/* Class colours blended over the image (RGB bands when the scene marks
 * them, else its first band in grey), at most `size` pixels on the long
 * side, read decimated by GDAL: bounded memory whatever the scene size. */
static ts_status write_quicklook(const ts_predict_opts *o, const char *png_tmp, const char *cls_path,
                                 const scene_info *si, int64_t W, int64_t H, const ts_class_table *ct)
{
    const int size = o->quicklook_size > 0 ? o->quicklook_size : 1024;
    int qw, qh;
    if (W >= H) {
        qw = (int)(W < size ? W : size);
        qh = (int)fmax(1, llround((double)H * qw / (double)W));
    } else {
        qh = (int)(H < size ? H : size);
        qw = (int)fmax(1, llround((double)W * qh / (double)H));
    }
    const size_t n = (size_t)qw * qh;
    uint8_t *cls = malloc(n), *rgb = malloc(3 * n), *ok = malloc(n);
    float *img = malloc(n * sizeof *img);
    ts_status st = (cls && rgb && ok && img) ? TS_OK : ts_error(TS_ERR_NOMEM, "predict: quick-look: out of memory");
    GDALDatasetH cds = NULL, sds = NULL, mem = NULL, png = NULL;
    if (!st && !(cds = GDALOpen(cls_path, GA_ReadOnly)))
        st = ts_gdal_error(TS_ERR_IO, "predict: quick-look: cannot reopen '%s'", cls_path);
    if (!st && GDALRasterIO(GDALGetRasterBand(cds, 1), GF_Read, 0, 0, (int)W, (int)H, cls, qw, qh, GDT_Byte, 0, 0) !=
                   CE_None)
        st = ts_gdal_error(TS_ERR_IO, "predict: quick-look: reading '%s'", cls_path);
    if (!st && !(sds = GDALOpen(o->scene, GA_ReadOnly)))
        st = ts_gdal_error(TS_ERR_IO, "predict: quick-look: cannot reopen '%s'", o->scene);
    for (size_t i = 0; !st && i < n; i++) ok[i] = cls[i] != 255;
    const int grey = !(si->rgb[0] && si->rgb[1] && si->rgb[2]);
    for (int c = 0; !st && c < 3; c++) {
        int band = grey ? 1 : si->rgb[c];
        if (GDALRasterIO(GDALGetRasterBand(sds, band), GF_Read, 0, 0, (int)W, (int)H, img, qw, qh, GDT_Float32, 0,
                         0) != CE_None)
            st = ts_gdal_error(TS_ERR_IO, "predict: quick-look: reading band %d of '%s'", band, o->scene);
        if (!st) st = stretch(img, ok, n, rgb + c * n);
    }
    for (size_t i = 0; !st && i < n; i++)
        for (int c = 0; c < 3; c++) {
            uint8_t *v = &rgb[c * n + i];
            /* Half class colour, half image: the classes read at a glance, the scene stays recognisable. */
            *v = ok[i] && cls[i] < ct->n ? (uint8_t)((*v + ct->rgb[cls[i]][c] + 1) / 2) : (uint8_t)(*v / 2);
        }
    if (!st) {
        GDALDriverH md = GDALGetDriverByName("MEM"), pd = GDALGetDriverByName("PNG");
        if (!md || !pd) st = ts_error(TS_ERR_UNSUPPORTED, "predict: GDAL lacks the MEM or PNG driver");
        if (!st && !(mem = GDALCreate(md, "", qw, qh, 3, GDT_Byte, NULL)))
            st = ts_gdal_error(TS_ERR_NOMEM, "predict: quick-look: cannot create an in-memory image");
        if (!st && GDALDatasetRasterIO(mem, GF_Write, 0, 0, qw, qh, rgb, qw, qh, GDT_Byte, 3, NULL, 0, 0, 0) != CE_None)
            st = ts_gdal_error(TS_ERR_IO, "predict: quick-look: filling the image");
        CPLErrorReset();
        if (!st && !(png = GDALCreateCopy(pd, png_tmp, mem, FALSE, NULL, NULL, NULL)))
            st = ts_gdal_error(TS_ERR_IO, "predict: cannot write the quick-look '%s'", o->quicklook);
        if (png) st = close_ds(&png, o->quicklook, st);
    }
    if (mem) GDALClose(mem);
    if (sds) GDALClose(sds);
    if (cds) GDALClose(cds);
    free(cls);
    free(rgb);
    free(ok);
    free(img);
    return st;
}

/* ---- setting up ------------------------------------------------------------------------------------ */

/* Bands, index bands and normalization from the card (or the options). */
static ts_status input_from_card(predictor *p, const ts_model_card *card, ts_raster_opts *ro, int *bands,
                                 ts_index_spec *idx, int *nidx)
{
    const ts_predict_opts *o = p->o;
    *nidx = 0;
    if (card->n_bands > 0) {
        int nb = 0;
        for (int i = 0; i < card->n_bands; i++) {
            const ts_card_band *b = &card->bands[i];
            if (b->index > 0) {
                if (*nidx > 0)
                    return ts_error(TS_ERR_UNSUPPORTED,
                                    "predict: the model card lists band %d after an index band; terraseg reads bands "
                                    "first, then NDVI/NDWI",
                                    b->index);
                bands[nb++] = b->index;
            } else if (b->name && (strcasecmp(b->name, "NDVI") == 0 || strcasecmp(b->name, "NDWI") == 0)) {
                idx[*nidx] = (ts_index_spec){strcasecmp(b->name, "NDVI") == 0 ? TS_INDEX_NDVI : TS_INDEX_NDWI, {0, NULL},
                                             {0, NULL}, {0, NULL}};
                (*nidx)++;
            } else {
                return ts_error(TS_ERR_INVALID_ARG,
                                "predict: the model card's band %d (%s) has no band index; give the bands with --bands",
                                i + 1, b->name ? b->name : "unnamed");
            }
        }
        if (card->n_bands != p->C)
            return ts_error(TS_ERR_INVALID_ARG, "predict: the model card lists %d bands but the model takes %d",
                            card->n_bands, p->C);
        p->norm = calloc((size_t)p->C, sizeof *p->norm);
        if (!p->norm) return ts_error(TS_ERR_NOMEM, "predict: out of memory");
        for (int i = 0; i < p->C; i++) {
            const ts_card_band *b = &card->bands[i];
            p->norm[i] = (band_norm){b->offset, b->scale, b->has_clip, b->clip_lo, b->clip_hi};
        }
        if (o->nbands > 0) {
            if (o->nbands != nb)
                return ts_error(TS_ERR_INVALID_ARG, "--bands: %d bands given, the model card has %d image bands", o->nbands,
                                nb);
            warnf(o, "--bands overrides the model card's bands (their normalization is kept)");
            memcpy(bands, o->bands, (size_t)nb * sizeof *bands);
        }
        ro->bands = nb ? bands : NULL;
        ro->nbands = nb;
        if (nb == 0 && *nidx == 0) ro->nbands = 0;
    } else {
        if (o->nbands > 0) {
            memcpy(bands, o->bands, (size_t)o->nbands * sizeof *bands);
            ro->bands = bands;
            ro->nbands = o->nbands;
        }
        if (!o->tile_fn)
            warnf(o, "the model has no card with band normalization: band values are given to it unscaled");
    }
    ro->indices = *nidx ? idx : NULL;
    ro->nindices = *nidx;
    return TS_OK;
}

enum { OUT_CLASSES, OUT_PROBS, OUT_CONF, OUT_QUICKLOOK, N_OUT };

static void predictor_free(predictor *p)
{
    if (p->cls) GDALClose(p->cls);
    if (p->probs) GDALClose(p->probs);
    if (p->conf) GDALClose(p->conf);
    for (int i = 1; p->readers && i < p->nreaders; i++) ts_raster_close(p->readers[i].raster);
    free(p->readers);
    free(p->reader_ctx);
    ts_raster_close(p->raster);
    free(p->norm);
    free(p->xt);
    free(p->prob);
    free(p->srcidx);
    free(p->row_bytes);
    if (p->mem) {
        /* After an error the stitcher may leave a batch started: its copy
         * into a pinned buffer must be done before the buffer goes. The
         * error that stopped the run is the one to report. */
        quiet_sync(p->mem);
        for (int i = 0; i < 2; i++) {
            p->mem->host_free(p->pinned[i]);
            p->mem->fence_free(p->fence[i]);
        }
    }
    ts_unet_device_free(&p->dev);
    free(p->logits);
}

/* The reader count: o->readers, else 1 when the model runs on the CPU (its
 * compute threads want every core, and each extra reader decodes shared
 * blocks again), min(4, online CPUs) when it runs on a device (or through
 * tile_fn) and the cores are free for decoding; never more than the
 * stitcher's batches (another reader would only reopen the scene). */
static int reader_count(const ts_predict_opts *o, const ts_ctx *ctx, int64_t batches)
{
    int n = o->readers;
    if (n <= 0 && !o->tile_fn && ctx && ts_backend_is_host(ctx->backend)) n = 1;
    if (n <= 0) {
        const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        n = cpus >= 4 ? 4 : cpus >= 1 ? (int)cpus : 1;
    }
    if (n > batches) n = batches > 0 ? (int)batches : 1;
    return n;
}

/* One reader context per stitcher reader: the first reads through
 * p->raster, the others through clones of it (opened again, normalization
 * copied). */
static ts_status open_readers(predictor *p, int n)
{
    p->readers = calloc((size_t)n, sizeof *p->readers);
    p->reader_ctx = calloc((size_t)n, sizeof *p->reader_ctx);
    if (!p->readers || !p->reader_ctx) return ts_error(TS_ERR_NOMEM, "predict: out of memory");
    p->nreaders = n;
    for (int i = 0; i < n; i++) {
        p->readers[i].p = p;
        p->reader_ctx[i] = &p->readers[i];
        if (i == 0) {
            p->readers[i].raster = p->raster;
        } else {
            ts_status st = ts_raster_clone(p->raster, &p->readers[i].raster);
            if (st) return st;
        }
    }
    return TS_OK;
}

static char *stage_name(const char *tmp)
{
    size_t n = strlen(tmp) + 16;
    char *s = malloc(n);
    if (s) snprintf(s, n, "%s.stage.tif", tmp);
    return s;
}

ts_status ts_predict_run(ts_unet *m, ts_ctx *ctx, const ts_predict_opts *o, ts_predict_report *report)
{
    ts_gdal_init();
    ts_predict_report local;
    if (!report) report = &local;
    memset(report, 0, sizeof *report);
    predictor p;
    memset(&p, 0, sizeof p);
    p.o = o;
    p.m = m;
    p.ctx = ctx;
    p.rep = report;
    if (!o->scene || !o->out) return ts_error(TS_ERR_INVALID_ARG, "predict: a scene and an output file are needed");
    if (o->tile_fn) {
        p.C = o->tile_in_channels;
        p.model_k = o->tile_classes;
    } else {
        if (!m || !ctx) return ts_error(TS_ERR_INVALID_ARG, "predict: no model");
        p.C = m->cfg.in_channels;
        p.model_k = m->cfg.classes;
    }
    p.K = p.model_k == 1 ? 2 : p.model_k;
    if (p.C < 1 || p.model_k < 1) return ts_error(TS_ERR_INVALID_ARG, "predict: %d bands, %d classes", p.C, p.model_k);
    if (p.K > 255)
        return ts_error(TS_ERR_UNSUPPORTED, "predict: %d classes do not fit a Byte class map (at most 255)", p.K);

    ts_model_card card;
    ts_card_init(&card);
    ts_status st = m ? ts_unet_get_card(m, &card) : TS_OK;
    if (st) return st;
    p.T = o->tile > 0 ? o->tile : card.tile_size > 0 ? card.tile_size : 256;
    const int overlap = o->overlap >= 0 ? o->overlap : p.T / 4;
    const int batch = o->batch > 0 ? o->batch : 4;

    /* Refuse existing outputs before any work. */
    const char *paths[N_OUT] = {o->out, o->probabilities, o->confidence, o->quicklook};
    static const char *const whats[N_OUT] = {"class map", "probabilities", "confidence", "quick-look"};
    ts_gdal_out outs[N_OUT];
    memset(outs, 0, sizeof outs);
    char *stages[N_OUT] = {0};
    for (int i = 0; i < N_OUT && !st; i++) {
        if (!paths[i]) continue;
        for (int j = 0; j < i; j++)
            if (paths[j] && strcmp(paths[i], paths[j]) == 0)
                st = ts_error(TS_ERR_INVALID_ARG, "predict: the %s and the %s are both '%s'", whats[j], whats[i],
                              paths[i]);
        if (!st) st = ts_gdal_out_begin(&outs[i], paths[i], o->overwrite, whats[i]);
        if (!st && o->cog && i != OUT_QUICKLOOK && !(stages[i] = stage_name(outs[i].tmp)))
            st = ts_error(TS_ERR_NOMEM, "predict: out of memory");
    }

    scene_info si = {0};
    int bands[256];
    ts_index_spec idx[16];
    int nidx = 0;
    ts_raster_opts ro;
    memset(&ro, 0, sizeof ro);
    if (!st && (card.n_bands > 256 || o->nbands > 256))
        st = ts_error(TS_ERR_UNSUPPORTED, "predict: more than 256 input bands");
    if (!st) st = scene_info_read(o->scene, &si);
    if (!st) st = input_from_card(&p, &card, &ro, bands, idx, &nidx);
    if (!st) {
        ro.has_nodata = o->has_nodata;
        ro.nodata = o->nodata;
        st = ts_raster_open(o->scene, &ro, &p.raster);
    }
    if (!st && ts_raster_channels(p.raster) != p.C)
        st = ts_error(TS_ERR_INVALID_ARG,
                      "predict: the model takes %d bands but %d were selected from '%s' (it has %d bands); give the "
                      "model's bands with --bands",
                      p.C, ts_raster_channels(p.raster), o->scene, si.nbands);
    if (!st && !si.georef)
        warnf(o, "'%s' has no georeferencing: the class map is written in pixel coordinates", o->scene);
    if (!st && !si.wkt && si.georef) warnf(o, "'%s' has no CRS: the class map will have none either", o->scene);
    const int64_t W = p.raster ? ts_raster_width(p.raster) : 0, H = p.raster ? ts_raster_height(p.raster) : 0;
    p.width = W;

    if (!st && !o->tile_fn) {
        const size_t plane = (size_t)p.T * p.T;
        if (ts_backend_is_host(ctx->backend) && o->precision == TS_F32) {
            st = ts_unet_fold_bn(m);
        } else {
            /* Folds and uploads once; m itself is left as it is. Mixed
             * precision runs through a device copy on the CPU too. */
            st = ts_unet_device_init(&p.dev, m, ctx->backend);
            p.on_device = st == TS_OK;
            if (!st && o->precision != TS_F32) st = ts_unet_device_set_precision(&p.dev, ctx, o->precision);
            if (!st) st = pipeline_init(&p, batch);
            /* The synchronous path's logits (the pipelined one has its pinned pair). */
            if (!p.mem) p.logits = malloc((size_t)batch * p.model_k * plane * sizeof *p.logits);
            if (!st && !p.mem && !p.logits) st = ts_error(TS_ERR_NOMEM, "predict: out of memory");
        }
        p.xt = malloc((size_t)batch * p.C * plane * sizeof *p.xt);
        p.prob = malloc((size_t)batch * p.model_k * plane * sizeof *p.prob);
        p.srcidx = malloc(plane * sizeof *p.srcidx);
        if (!st && (!p.xt || !p.prob || !p.srcidx)) st = ts_error(TS_ERR_NOMEM, "predict: out of memory");
    }

    ts_class_table ct = {0};
    if (!st) st = ts_class_table_from_card(&card, p.K, &ct);
    const char *where[N_OUT];
    for (int i = 0; i < N_OUT; i++) where[i] = stages[i] ? stages[i] : outs[i].tmp;
    if (!st) st = create_tif(o->out, where[OUT_CLASSES], W, H, 1, o->cog, &si, &p.cls);
    if (!st) st = ts_class_table_write_band(GDALGetRasterBand(p.cls, 1), &ct);
    if (!st && o->probabilities) st = create_tif(o->probabilities, where[OUT_PROBS], W, H, p.K, o->cog, &si, &p.probs);
    if (!st && o->confidence) st = create_tif(o->confidence, where[OUT_CONF], W, H, 1, o->cog, &si, &p.conf);
    for (int k = 0; !st && p.probs && k < p.K; k++) {
        GDALRasterBandH b = GDALGetRasterBand(p.probs, k + 1);
        GDALSetDescription(b, ct.names[k]);
        if (GDALSetRasterScale(b, 1.0 / 254) != CE_None || GDALSetRasterOffset(b, 0) != CE_None)
            st = ts_gdal_error(TS_ERR_IO, "predict: '%s': cannot set the band scale", o->probabilities);
    }
    if (!st && p.conf) {
        GDALRasterBandH b = GDALGetRasterBand(p.conf, 1);
        GDALSetDescription(b, "confidence");
        if (GDALSetRasterScale(b, 1.0 / 254) != CE_None || GDALSetRasterOffset(b, 0) != CE_None)
            st = ts_gdal_error(TS_ERR_IO, "predict: '%s': cannot set the band scale", o->confidence);
    }

    ts_stitch_params sp = {W, H, p.C, p.K, p.T, overlap, batch, o->blend, 0};
    if (!st) {
        report->width = W;
        report->height = H;
        report->tile = p.T;
        report->overlap = overlap;
        report->channels = p.C;
        report->classes = p.K;
        report->georeferenced = si.georef;
        report->tiles = ts_stitch_origins(W, p.T, overlap, NULL, 0) * ts_stitch_origins(H, p.T, overlap, NULL, 0);
        sp.readers = report->readers = reader_count(o, ctx, (report->tiles + batch - 1) / batch);
        unsigned tta = o->tta ? o->tta : TS_TTA_IDENTITY;
        report->augmentations = o->tile_fn ? 1 : __builtin_popcount(tta);
        st = ts_stitch_memory(&sp, p.mem != NULL, &report->stitch_bytes);
        if (!st) st = open_readers(&p, sp.readers);
    }
    if (!st) {
        ts_stitch_fns fns = {.ctx = &p,
                             .read = read_fn,
                             .tile = tile_fn,
                             .write = write_fn,
                             .progress = o->progress ? progress_fn : NULL,
                             .read_ctx = p.reader_ctx};
        if (p.mem) {
            fns.tile = NULL;
            fns.tile_start = model_tile_start;
            fns.tile_finish = model_tile_finish;
            fns.alloc_in = pinned_alloc;
            fns.free_in = pinned_free;
        }
        st = ts_stitch_run(&sp, &fns);
        const char *graph_error = p.on_device ? ts_unet_device_graph_error(&p.dev) : NULL;
        if (!st && graph_error)
            warnf(o, "the forward could not be recorded as a CUDA graph, so its ops were called one by one "
                     "(the same result, more launch overhead): %s", graph_error);
    }
    st = close_ds(&p.cls, o->out, st);
    st = close_ds(&p.probs, o->probabilities, st);
    st = close_ds(&p.conf, o->confidence, st);
    for (int i = 0; i < N_OUT && !st; i++)
        if (stages[i]) st = to_cog(paths[i], stages[i], outs[i].tmp, i == OUT_CLASSES);
    if (!st && o->quicklook)
        st = write_quicklook(o, outs[OUT_QUICKLOOK].tmp, outs[OUT_CLASSES].tmp, &si, W, H, &ct);
    /* The class map last: when it is there, everything else is too. */
    for (int i = N_OUT - 1; i >= 0; i--) {
        if (!paths[i]) continue;
        if (stages[i]) {
            /* GDAL may have written statistics beside the staging file. */
            VSIUnlink(stages[i]);
            char aux[4200];
            if (snprintf(aux, sizeof aux, "%s.aux.xml", stages[i]) < (int)sizeof aux) VSIUnlink(aux);
        }
        if (!st) st = ts_gdal_out_commit(&outs[i]);
        else ts_gdal_out_abort(&outs[i]);
        free(stages[i]);
    }
    ts_class_table_free(&ct);
    free(si.wkt);
    ts_card_free(&card);
    predictor_free(&p);
    return st;
}
