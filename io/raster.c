/* The raster source: windows of selected bands and index bands as float32,
 * normalized, with a valid-pixel mask (io/raster.h says what and why). */
#include <cpl_conv.h>
#include <cpl_error.h>
#include <cpl_string.h>
#include <gdal.h>
#include <gdal_utils.h>
#include <math.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "io/raster.h"

/* How the validity of one band read per window is found. */
enum {
    MASK_NONE = 0,
    MASK_DATASET, /* GDAL's per-dataset mask (internal mask, Byte/UInt16 alpha): read once per window */
    MASK_BAND,    /* the band's own mask band (nodata value, per-band mask) */
    MASK_ALPHA,   /* an alpha band GDAL does not use as a mask (not Byte/UInt16, e.g. the Float32 alpha
                     band gdalwarp -dstalpha adds to a Float32 image): read it ourselves, once */
};

#define HIST_BINS 65536

struct ts_raster {
    /* what to open: kept so that ts_raster_clone() can reopen exactly this */
    char *path;
    char **open_options; /* CSL */
    int warp;
    char *warp_crs;
    double warp_res_x, warp_res_y;
    int warp_tap;
    int has_warp_grid;
    ts_grid warp_grid;
    char *resampling;
    int has_nodata, ignore_masks, pad;
    double nodata;
    int64_t stats_sample;

    GDALDatasetH src; /* the file */
    GDALDatasetH ds;  /* what windows read: src, or the warped VRT on top of it */
    int src_bands;
    int width, height; /* of ds */
    int blk_w, blk_h;  /* block size of ds band 1: the statistics pass walks whole blocks */

    /* channels: nsel bands then the index bands */
    int nch, nsel;
    int *ch_kind; /* 0: a band, else ts_index_kind */
    int *ch_band; /* source band number (band channels), 0 for index channels */
    int *ch_a;    /* slot in need[] of the band (band channel) or of the numerator's first term */
    int *ch_b;    /* index channels: slot of the second term; -1 otherwise */
    char **ch_name;
    int nneed; /* the distinct source bands read per window, in one RasterIO call */
    int *need;
    int *need_mask;       /* MASK_* per need[] entry */
    int alpha_band;       /* of ds, 0: none */
    ts_band_norm *norm;   /* resolved, per channel */
    ts_band_stats *stats; /* per channel, NULL when none were computed */

    /* scratch grown on demand (one reader at a time) */
    float *buf;
    size_t buf_n;
    uint8_t *vbuf, *mbuf;
    size_t vbuf_n, mbuf_n;
};

static char *dup_str(const char *s) { return s ? strdup(s) : NULL; }

/* ---- opening the dataset (and the warp) ---------------------------------------- */

static const char *const resampling_names[] = {"near",    "bilinear", "cubic", "cubicspline", "lanczos",
                                               "average", "rms",      "mode",  "max",         "min",
                                               "med",     "q1",       "q3",    "sum",         NULL};

static ts_status warp_dataset(ts_raster *r)
{
    char num[8][40];
    char **argv = NULL;
    argv = CSLAddString(argv, "-of");
    argv = CSLAddString(argv, "VRT");
    argv = CSLAddString(argv, "-r");
    argv = CSLAddString(argv, r->resampling);
    /* An output alpha band marks the pixels no source pixel covers (outside
     * the footprint after a CRS change), which the valid mask then honours. */
    argv = CSLAddString(argv, "-dstalpha");
    if (r->has_nodata) {
        /* The override nodata must also keep nodata pixels out of the resampling kernel. */
        snprintf(num[0], sizeof num[0], "%.17g", r->nodata);
        argv = CSLAddString(argv, "-srcnodata");
        argv = CSLAddString(argv, num[0]);
        argv = CSLAddString(argv, "-dstnodata");
        argv = CSLAddString(argv, num[0]);
    }
    if (r->has_warp_grid) {
        const ts_grid *g = &r->warp_grid;
        snprintf(num[1], sizeof num[1], "%.17g", g->gt[0]);
        snprintf(num[2], sizeof num[2], "%.17g", g->gt[3] + (double)g->height * g->gt[5]);
        snprintf(num[3], sizeof num[3], "%.17g", g->gt[0] + (double)g->width * g->gt[1]);
        snprintf(num[4], sizeof num[4], "%.17g", g->gt[3]);
        snprintf(num[5], sizeof num[5], "%lld", (long long)g->width);
        snprintf(num[6], sizeof num[6], "%lld", (long long)g->height);
        const char *te[] = {"-te", num[1], num[2], num[3], num[4], "-ts", num[5], num[6]};
        for (size_t i = 0; i < sizeof te / sizeof te[0]; i++) argv = CSLAddString(argv, te[i]);
        if (g->crs_wkt) {
            argv = CSLAddString(argv, "-t_srs");
            argv = CSLAddString(argv, g->crs_wkt);
        }
    } else {
        if (r->warp_crs) {
            argv = CSLAddString(argv, "-t_srs");
            argv = CSLAddString(argv, r->warp_crs);
        }
        if (r->warp_res_x > 0) {
            snprintf(num[1], sizeof num[1], "%.17g", r->warp_res_x);
            snprintf(num[2], sizeof num[2], "%.17g", r->warp_res_y);
            argv = CSLAddString(argv, "-tr");
            argv = CSLAddString(argv, num[1]);
            argv = CSLAddString(argv, num[2]);
            if (r->warp_tap) argv = CSLAddString(argv, "-tap");
        }
    }
    if (!argv) return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory building the warp options", r->path);
    CPLErrorReset();
    GDALWarpAppOptions *wo = GDALWarpAppOptionsNew(argv, NULL);
    CSLDestroy(argv);
    if (!wo) return ts_gdal_error(TS_ERR_INVALID_ARG, "raster '%s': bad warp options", r->path);
    int usage = 0;
    GDALDatasetH src = r->src;
    /* An empty destination name with -of VRT gives an in-memory warped VRT:
     * nothing is written, pixels are warped block by block when read. */
    r->ds = GDALWarp("", NULL, 1, &src, wo, &usage);
    GDALWarpAppOptionsFree(wo);
    if (!r->ds)
        return ts_gdal_error(TS_ERR_BACKEND,
                             "raster '%s': warping to the requested CRS/resolution failed (does the image have a "
                             "CRS and geotransform?)",
                             r->path);
    if (GDALGetRasterCount(r->ds) < r->src_bands) {
        return ts_error(TS_ERR_BACKEND, "raster '%s': the warped image has %d bands, the file %d; report this", r->path,
                        GDALGetRasterCount(r->ds), r->src_bands);
    }
    return TS_OK;
}

/* Opens r->src (and r->ds) from r->path and the warp request in r. */
static ts_status open_dataset(ts_raster *r)
{
    CPLErrorReset();
    /* Not shared: every ts_raster (and clone) owns its handle, which is what
     * lets two threads read two handles at once. */
    r->src = GDALOpenEx(r->path, GDAL_OF_RASTER | GDAL_OF_READONLY | GDAL_OF_VERBOSE_ERROR, NULL,
                        (const char *const *)r->open_options, NULL);
    if (!r->src)
        return ts_gdal_error(TS_ERR_IO,
                             "raster '%s': cannot open it (check the path, and that GDAL has a driver for this format)",
                             r->path);
    r->src_bands = GDALGetRasterCount(r->src);
    if (r->src_bands < 1) return ts_error(TS_ERR_IO, "raster '%s': has no raster bands (a vector file?)", r->path);
    if (r->warp) {
        ts_status st = warp_dataset(r);
        if (st) return st;
    } else {
        r->ds = r->src;
    }
    r->width = GDALGetRasterXSize(r->ds);
    r->height = GDALGetRasterYSize(r->ds);
    GDALGetBlockSize(GDALGetRasterBand(r->ds, 1), &r->blk_w, &r->blk_h);
    if (r->blk_w < 1) r->blk_w = 256;
    if (r->blk_h < 1) r->blk_h = 256;
    return TS_OK;
}

/* ---- channels ---------------------------------------------------------------------- */

static ts_status check_band(const ts_raster *r, int band, const char *what)
{
    if (band < 1 || band > r->src_bands)
        return ts_error(TS_ERR_INVALID_ARG,
                        "raster '%s': %s band %d does not exist: the file has %d band%s, numbered from 1", r->path,
                        what, band, r->src_bands, r->src_bands == 1 ? "" : "s");
    return TS_OK;
}

/* Finds a band by name: descriptions first, then colour interpretations. */
static ts_status find_band(const ts_raster *r, const ts_band_ref *ref, const char *def_name, const char *index,
                           int *band)
{
    if (ref->band) {
        char what[64];
        snprintf(what, sizeof what, "%s %s", index, def_name);
        *band = ref->band;
        return check_band(r, ref->band, what);
    }
    const char *name = ref->name ? ref->name : def_name;
    for (int pass = 0; pass < 2; pass++) {
        int found = 0;
        for (int b = 1; b <= r->src_bands; b++) {
            GDALRasterBandH h = GDALGetRasterBand(r->src, b);
            const char *s =
                pass == 0 ? GDALGetDescription(h) : GDALGetColorInterpretationName(GDALGetRasterColorInterpretation(h));
            if (s && strcasecmp(s, name) == 0) {
                if (found)
                    return ts_error(TS_ERR_INVALID_ARG,
                                    "raster '%s': %s band name '%s' matches bands %d and %d; give the band number",
                                    r->path, index, name, found, b);
                found = b;
            }
        }
        if (found) {
            *band = found;
            return TS_OK;
        }
    }
    /* Not found: list what there is, so the user can pick a name or number. */
    char list[512];
    size_t n = 0;
    list[0] = '\0';
    for (int b = 1; b <= r->src_bands && n < sizeof list - 1; b++) {
        GDALRasterBandH h = GDALGetRasterBand(r->src, b);
        int k = snprintf(list + n, sizeof list - n, "%s%d '%s' (%s)", b > 1 ? ", " : "", b, GDALGetDescription(h),
                         GDALGetColorInterpretationName(GDALGetRasterColorInterpretation(h)));
        if (k < 0) break;
        n += (size_t)k;
        if (n >= sizeof list) n = sizeof list - 1;
    }
    return ts_error(TS_ERR_INVALID_ARG,
                    "raster '%s': %s needs a band named '%s', and no band description or colour interpretation "
                    "matches it (bands: %s); give the band number instead",
                    r->path, index, name, list);
}

/* The slot of band b in need[], adding it when new. */
static int need_slot(ts_raster *r, int b)
{
    for (int i = 0; i < r->nneed; i++)
        if (r->need[i] == b) return i;
    r->need[r->nneed] = b;
    return r->nneed++;
}

static ts_status setup_channels(ts_raster *r, const ts_raster_opts *o)
{
    int nsel = o->nbands;
    if (nsel < 0 || o->nindices < 0)
        return ts_error(TS_ERR_INVALID_ARG, "raster '%s': negative band or index count", r->path);
    if (nsel > 0 && !o->bands)
        return ts_error(TS_ERR_INVALID_ARG, "raster '%s': nbands = %d but bands is NULL", r->path, nsel);
    if (o->nindices > 0 && !o->indices)
        return ts_error(TS_ERR_INVALID_ARG, "raster '%s': nindices = %d but indices is NULL", r->path, o->nindices);
    if (nsel == 0) {
        /* Default: every band but alpha bands, which are masks, not data. */
        for (int b = 1; b <= r->src_bands; b++)
            if (GDALGetRasterColorInterpretation(GDALGetRasterBand(r->src, b)) != GCI_AlphaBand) nsel++;
        if (nsel == 0)
            return ts_error(TS_ERR_INVALID_ARG, "raster '%s': every band is an alpha band; select bands explicitly",
                            r->path);
    }
    r->nsel = nsel;
    r->nch = nsel + o->nindices;
    if (r->nch == 0) return ts_error(TS_ERR_INVALID_ARG, "raster '%s': no channels selected", r->path);
    size_t nc = (size_t)r->nch, nn = (size_t)nsel + 2 * (size_t)o->nindices;
    r->ch_kind = calloc(nc, sizeof(int));
    r->ch_band = calloc(nc, sizeof(int));
    r->ch_a = calloc(nc, sizeof(int));
    r->ch_b = calloc(nc, sizeof(int));
    r->ch_name = calloc(nc, sizeof(char *));
    r->need = calloc(nn, sizeof(int));
    r->need_mask = calloc(nn, sizeof(int));
    r->norm = calloc(nc, sizeof(ts_band_norm));
    if (!r->ch_kind || !r->ch_band || !r->ch_a || !r->ch_b || !r->ch_name || !r->need || !r->need_mask || !r->norm)
        return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", r->path);

    int c = 0;
    if (o->nbands > 0) {
        for (int i = 0; i < o->nbands; i++, c++) {
            ts_status st = check_band(r, o->bands[i], "selected");
            if (st) return st;
            r->ch_band[c] = o->bands[i];
        }
    } else {
        for (int b = 1; b <= r->src_bands; b++)
            if (GDALGetRasterColorInterpretation(GDALGetRasterBand(r->src, b)) != GCI_AlphaBand) r->ch_band[c++] = b;
    }
    for (int i = 0; i < nsel; i++) {
        r->ch_a[i] = need_slot(r, r->ch_band[i]);
        r->ch_b[i] = -1;
    }
    for (int i = 0; i < o->nindices; i++, c++) {
        const ts_index_spec *s = &o->indices[i];
        int a = 0, b = 0;
        ts_status st;
        if (s->kind == TS_INDEX_NDVI) {
            if ((st = find_band(r, &s->nir, "nir", "NDVI", &a)) || (st = find_band(r, &s->red, "red", "NDVI", &b)))
                return st;
        } else if (s->kind == TS_INDEX_NDWI) {
            if ((st = find_band(r, &s->green, "green", "NDWI", &a)) || (st = find_band(r, &s->nir, "nir", "NDWI", &b)))
                return st;
        } else {
            return ts_error(TS_ERR_INVALID_ARG, "raster '%s': index band %d has unknown kind %d (NDVI or NDWI)",
                            r->path, i, (int)s->kind);
        }
        r->ch_kind[c] = s->kind;
        r->ch_a[c] = need_slot(r, a);
        r->ch_b[c] = need_slot(r, b);
    }

    /* The alpha band of what we read, if any (the warp always adds one). */
    for (int b = GDALGetRasterCount(r->ds); b >= 1 && !r->alpha_band; b--)
        if (GDALGetRasterColorInterpretation(GDALGetRasterBand(r->ds, b)) == GCI_AlphaBand) r->alpha_band = b;
    for (int i = 0; i < r->nneed; i++) {
        GDALRasterBandH h = GDALGetRasterBand(r->ds, r->need[i]);
        GDALDataType t = GDALGetRasterDataType(h);
        if (GDALDataTypeIsComplex(t))
            return ts_error(TS_ERR_UNSUPPORTED, "raster '%s': band %d is complex (%s); select real-valued bands",
                            r->path, r->need[i], GDALGetDataTypeName(t));
        int flags = GDALGetMaskFlags(h);
        if (r->ignore_masks)
            r->need_mask[i] = MASK_NONE;
        else if (flags & GMF_NODATA)
            r->need_mask[i] = r->has_nodata ? MASK_NONE : MASK_BAND;
        else if (flags & GMF_PER_DATASET)
            r->need_mask[i] = MASK_DATASET;
        else if (flags & GMF_ALL_VALID)
            r->need_mask[i] = r->alpha_band && r->need[i] != r->alpha_band ? MASK_ALPHA : MASK_NONE;
        else
            r->need_mask[i] = MASK_BAND;
        /* An override nodata also covers bands without one (their mask is "all valid"). */
    }

    for (int i = 0; i < r->nch; i++) {
        char name[160];
        if (r->ch_kind[i]) {
            snprintf(name, sizeof name, "%s", r->ch_kind[i] == TS_INDEX_NDVI ? "NDVI" : "NDWI");
        } else {
            const char *d = GDALGetDescription(GDALGetRasterBand(r->src, r->ch_band[i]));
            if (d && *d)
                snprintf(name, sizeof name, "band %d (%s)", r->ch_band[i], d);
            else
                snprintf(name, sizeof name, "band %d", r->ch_band[i]);
        }
        if (!(r->ch_name[i] = strdup(name))) return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", r->path);
    }
    return TS_OK;
}

/* ---- reading ------------------------------------------------------------------------- */

static ts_status grow(void **p, size_t *cap, size_t bytes, const char *path)
{
    if (*cap >= bytes) return TS_OK;
    void *q = realloc(*p, bytes);
    if (!q) return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory for a %zu-byte window buffer", path, bytes);
    *p = q;
    *cap = bytes;
    return TS_OK;
}

/* ANDs mask band h over the in-raster part of the window into valid. */
static ts_status and_mask(ts_raster *r, GDALRasterBandH h, int band, int ic, int ir, int iw, int ih, size_t off,
                          size_t W, uint8_t *valid)
{
    CPLErrorReset();
    CPLErr e = GDALRasterIOEx(h, GF_Read, ic, ir, iw, ih, r->mbuf + off, iw, ih, GDT_Byte, 1, (GSpacing)W, NULL);
    if (e != CE_None)
        return ts_gdal_error(TS_ERR_IO,
                             "raster '%s': reading the mask of band %d in window %dx%d at col %d, row %d failed",
                             r->path, band, iw, ih, ic, ir);
    for (int y = 0; y < ih; y++) {
        const uint8_t *m = r->mbuf + off + (size_t)y * W;
        uint8_t *v = valid + off + (size_t)y * W;
        for (int x = 0; x < iw; x++) v[x] &= m[x] != 0;
    }
    return TS_OK;
}

/* Raw channel values (no normalization) and validity of window w; invalid
 * pixels are not yet zeroed. */
static ts_status read_raw(ts_raster *r, const ts_window *w, float *out, uint8_t *valid)
{
    if (!w || w->width <= 0 || w->height <= 0)
        return ts_error(TS_ERR_INVALID_ARG, "raster '%s': window size %dx%d must be positive", r->path,
                        w ? w->width : 0, w ? w->height : 0);
    /* Offsets far beyond any raster GDAL can hold (2^40) are refused before
     * the end arithmetic below could overflow. */
    const int64_t far = (int64_t)1 << 40;
    if (w->col_off < -far || w->col_off > far || w->row_off < -far || w->row_off > far)
        return ts_error(TS_ERR_INVALID_ARG,
                        "raster '%s': window at col %lld, row %lld is far outside the raster (%dx%d)", r->path,
                        (long long)w->col_off, (long long)w->row_off, r->width, r->height);
    const int64_t c0 = w->col_off, r0 = w->row_off, c1 = c0 + w->width, r1 = r0 + w->height;
    const int inside = c0 >= 0 && r0 >= 0 && c1 <= r->width && r1 <= r->height;
    if (!inside && !r->pad)
        return ts_error(TS_ERR_INVALID_ARG,
                        "raster '%s': window %dx%d at col %lld, row %lld (cols %lld..%lld, rows %lld..%lld) is not "
                        "inside the raster of %dx%d pixels; keep windows inside it or open it with pad",
                        r->path, w->width, w->height, (long long)c0, (long long)r0, (long long)c0, (long long)c1 - 1,
                        (long long)r0, (long long)r1 - 1, r->width, r->height);
    const size_t W = (size_t)w->width, H = (size_t)w->height, plane = W * H;
    ts_status st = grow((void **)&r->buf, &r->buf_n, (size_t)r->nneed * plane * sizeof(float), r->path);
    if (st) return st;
    if (!inside) {
        memset(r->buf, 0, (size_t)r->nneed * plane * sizeof(float));
        memset(valid, 0, plane);
    } else {
        memset(valid, 1, plane);
    }
    const int64_t ic0 = c0 > 0 ? c0 : 0, ir0 = r0 > 0 ? r0 : 0;
    const int64_t ic1 = c1 < r->width ? c1 : r->width, ir1 = r1 < r->height ? r1 : r->height;
    if (ic1 > ic0 && ir1 > ir0) {
        /* The part inside the raster (all of it unless padding). GDAL's
         * offsets are int; the raster size bounds them. */
        const int ic = (int)ic0, ir = (int)ir0, iw = (int)(ic1 - ic0), ih = (int)(ir1 - ir0);
        const size_t off = (size_t)(ir0 - r0) * W + (size_t)(ic0 - c0);
        if (!inside)
            for (int y = 0; y < ih; y++) memset(valid + off + (size_t)y * W, 1, (size_t)iw);
        /* One call for all bands: a pixel-interleaved file reads each block once. */
        CPLErrorReset();
        CPLErr e = GDALDatasetRasterIOEx(r->ds, GF_Read, ic, ir, iw, ih, r->buf + off, iw, ih, GDT_Float32, r->nneed,
                                         r->need, (GSpacing)sizeof(float), (GSpacing)(W * sizeof(float)),
                                         (GSpacing)(plane * sizeof(float)), NULL);
        if (e != CE_None)
            return ts_gdal_error(TS_ERR_IO, "raster '%s': reading window %dx%d at col %d, row %d failed", r->path, iw,
                                 ih, ic, ir);
        int dataset_done = 0, alpha_done = 0;
        for (int i = 0; i < r->nneed; i++) {
            const int mk = r->need_mask[i];
            if (mk == MASK_NONE || (mk == MASK_DATASET && dataset_done) || (mk == MASK_ALPHA && alpha_done)) continue;
            if ((st = grow((void **)&r->mbuf, &r->mbuf_n, plane, r->path))) return st;
            /* Alpha read as Byte: GDAL rounds and clamps, so alpha < 0.5 is transparent. */
            GDALRasterBandH h = mk == MASK_ALPHA ? GDALGetRasterBand(r->ds, r->alpha_band)
                                                 : GDALGetMaskBand(GDALGetRasterBand(r->ds, r->need[i]));
            if (!h) return ts_gdal_error(TS_ERR_BACKEND, "raster '%s': band %d has no mask band", r->path, r->need[i]);
            if ((st = and_mask(r, h, mk == MASK_ALPHA ? r->alpha_band : r->need[i], ic, ir, iw, ih, off, W, valid)))
                return st;
            dataset_done |= mk == MASK_DATASET;
            alpha_done |= mk == MASK_ALPHA;
        }
        /* NaN is never a value the model can use; the override nodata is
         * compared in float32, the type the values arrive in. */
        const float nd = (float)r->nodata;
        for (int i = 0; i < r->nneed; i++) {
            const float *p = r->buf + (size_t)i * plane;
            for (int y = 0; y < ih; y++) {
                const size_t o = off + (size_t)y * W;
                for (int x = 0; x < iw; x++) {
                    const float v = p[o + (size_t)x];
                    if (isnan(v) || (r->has_nodata && v == nd)) valid[o + (size_t)x] = 0;
                }
            }
        }
    }
    for (int c = 0; c < r->nch; c++) {
        float *dst = out + (size_t)c * plane;
        const float *a = r->buf + (size_t)r->ch_a[c] * plane;
        if (!r->ch_kind[c]) {
            memcpy(dst, a, plane * sizeof(float));
            continue;
        }
        /* Both indices are normalized differences (a - b) / (a + b), in double
         * so that large integer bands do not lose the difference. */
        const float *b = r->buf + (size_t)r->ch_b[c] * plane;
        for (size_t i = 0; i < plane; i++) {
            const double s = (double)a[i] + (double)b[i];
            if (s == 0.0) {
                dst[i] = 0.0f;
                valid[i] = 0;
            } else {
                dst[i] = (float)(((double)a[i] - (double)b[i]) / s);
            }
        }
    }
    return TS_OK;
}

static void normalize(const ts_band_norm *n, float *p, const uint8_t *valid, size_t plane)
{
    double mul = 1, add = 0, lo = -INFINITY, hi = INFINITY, sub = 0;
    switch (n->kind) {
    case TS_NORM_SCALE: mul = n->scale, add = n->offset; break;
    case TS_NORM_MEANSTD: sub = n->mean, mul = 1.0 / n->std; break;
    case TS_NORM_MINMAX:
        lo = n->min, hi = n->max, sub = n->min;
        /* A constant channel (min == max) maps to 0. */
        mul = n->max > n->min ? 1.0 / (n->max - n->min) : 0.0;
        break;
    default: break;
    }
    const int ident = n->kind == TS_NORM_NONE;
    for (size_t i = 0; i < plane; i++) {
        if (!valid[i]) {
            p[i] = 0.0f;
        } else if (!ident) {
            double x = p[i];
            x = x < lo ? lo : x > hi ? hi : x;
            p[i] = (float)((x - sub) * mul + add);
        }
    }
}

ts_status ts_raster_read(ts_raster *r, const ts_window *w, float *out, uint8_t *valid)
{
    if (!r || !out) return ts_error(TS_ERR_INVALID_ARG, "ts_raster_read: raster and output must not be NULL");
    uint8_t *v = valid;
    if (!v && w && w->width > 0 && w->height > 0) {
        ts_status st = grow((void **)&r->vbuf, &r->vbuf_n, (size_t)w->width * (size_t)w->height, r->path);
        if (st) return st;
        v = r->vbuf;
    }
    ts_status st = read_raw(r, w, out, v);
    if (st) return st;
    const size_t plane = (size_t)w->width * (size_t)w->height;
    for (int c = 0; c < r->nch; c++) normalize(&r->norm[c], out + (size_t)c * plane, v, plane);
    return TS_OK;
}

/* ---- statistics: streamed over strips of whole blocks -------------------------- */

typedef struct strip_plan {
    int chunk_w, chunk_h;
    int64_t nrows; /* strips (rows of chunks) in the raster */
    int64_t nused; /* strips visited */
} strip_plan;

static strip_plan plan_strips(const ts_raster *r)
{
    strip_plan p;
    /* Strips of whole block rows, cut into chunks of about 4 Mpixel: each
     * block is decoded once, and memory stays small on any width. Very tall
     * blocks (a one-strip TIFF) are cut too: GDAL's cache keeps the block. */
    p.chunk_h = r->blk_h < 32 ? ((256 + r->blk_h - 1) / r->blk_h) * r->blk_h : r->blk_h > 1024 ? 1024 : r->blk_h;
    if (p.chunk_h > r->height) p.chunk_h = r->height;
    int64_t cw = (int64_t)(4 << 20) / p.chunk_h;
    if (cw >= r->blk_w) cw = cw / r->blk_w * r->blk_w; /* whole blocks unless they are wider than a chunk */
    p.chunk_w = cw > r->width ? r->width : (int)cw;
    p.nrows = (r->height + p.chunk_h - 1) / p.chunk_h;
    p.nused = p.nrows;
    if (r->stats_sample > 0) {
        const int64_t per_strip = (int64_t)r->width * p.chunk_h;
        int64_t want = (r->stats_sample + per_strip - 1) / per_strip;
        if (want < 1) want = 1;
        if (want < p.nrows) p.nused = want;
    }
    return p;
}

/* The strip visited k-th (evenly spaced when sampling). */
static int64_t strip_row(const strip_plan *p, int64_t k)
{
    if (p->nused == p->nrows) return k;
    return (int64_t)(((double)k + 0.5) * (double)p->nrows / (double)p->nused);
}

/* One pass over the visited strips, calling fn on each chunk's raw channels. */
typedef void (*chunk_fn)(ts_raster *r, void *ctx, const float *vals, const uint8_t *valid, size_t plane);

static ts_status stats_pass(ts_raster *r, const strip_plan *p, chunk_fn fn, void *ctx)
{
    const size_t plane = (size_t)p->chunk_w * (size_t)p->chunk_h;
    float *vals = malloc((size_t)r->nch * plane * sizeof(float));
    uint8_t *valid = malloc(plane);
    if (!vals || !valid) {
        free(vals);
        free(valid);
        return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory for the statistics pass", r->path);
    }
    ts_status st = TS_OK;
    const int pad = r->pad;
    r->pad = 0; /* chunks are clipped to the raster below */
    for (int64_t k = 0; k < p->nused && !st; k++) {
        const int64_t row = strip_row(p, k) * p->chunk_h;
        for (int64_t col = 0; col < r->width && !st; col += p->chunk_w) {
            ts_window w = {col, row, (int)(r->width - col < p->chunk_w ? r->width - col : p->chunk_w),
                           (int)(r->height - row < p->chunk_h ? r->height - row : p->chunk_h)};
            st = read_raw(r, &w, vals, valid);
            if (!st) fn(r, ctx, vals, valid, (size_t)w.width * (size_t)w.height);
        }
    }
    r->pad = pad;
    free(vals);
    free(valid);
    return st;
}

typedef struct moments {
    int64_t n;
    double mean, m2, min, max;
} moments;

static void moments_chunk(ts_raster *r, void *ctx, const float *vals, const uint8_t *valid, size_t plane)
{
    moments *m = ctx;
    for (int c = 0; c < r->nch; c++) {
        const float *p = vals + (size_t)c * plane;
        /* Chunk mean and M2 first, then Chan et al.'s merge: stable for
         * billions of pixels where a running sum of squares is not. */
        int64_t n = 0;
        double s = 0, mn = INFINITY, mx = -INFINITY;
        for (size_t i = 0; i < plane; i++)
            if (valid[i]) {
                const double x = p[i];
                n++;
                s += x;
                mn = x < mn ? x : mn;
                mx = x > mx ? x : mx;
            }
        if (!n) continue;
        const double mean = s / (double)n;
        double m2 = 0;
        for (size_t i = 0; i < plane; i++)
            if (valid[i]) m2 += ((double)p[i] - mean) * ((double)p[i] - mean);
        moments *t = &m[c];
        const int64_t tot = t->n + n;
        const double d = mean - t->mean;
        t->m2 += m2 + d * d * (double)t->n * (double)n / (double)tot;
        t->mean += d * (double)n / (double)tot;
        t->n = tot;
        t->min = mn < t->min ? mn : t->min;
        t->max = mx > t->max ? mx : t->max;
    }
}

typedef struct hist_ctx {
    uint64_t **h; /* per channel, NULL when the channel needs no percentiles */
    const moments *m;
} hist_ctx;

static int hist_bin(double x, double lo, double hi)
{
    if (!(hi > lo)) return 0;
    const double f = (x - lo) / (hi - lo) * HIST_BINS;
    int b = (int)f;
    return b < 0 ? 0 : b >= HIST_BINS ? HIST_BINS - 1 : b;
}

static void hist_chunk(ts_raster *r, void *ctx, const float *vals, const uint8_t *valid, size_t plane)
{
    hist_ctx *hc = ctx;
    for (int c = 0; c < r->nch; c++) {
        if (!hc->h[c]) continue;
        const float *p = vals + (size_t)c * plane;
        for (size_t i = 0; i < plane; i++)
            if (valid[i]) hc->h[c][hist_bin(p[i], hc->m[c].min, hc->m[c].max)]++;
    }
}

/* The value below which pct % of the histogram's pixels lie, linear within a bin. */
static double hist_percentile(const uint64_t *h, int64_t n, double lo, double hi, double pct)
{
    if (!(hi > lo)) return lo;
    const double target = pct / 100.0 * (double)n, width = (hi - lo) / HIST_BINS;
    double cum = 0;
    for (int b = 0; b < HIST_BINS; b++) {
        if (h[b] && cum + (double)h[b] >= target) return lo + ((double)b + (target - cum) / (double)h[b]) * width;
        cum += (double)h[b];
    }
    return hi;
}

static ts_status compute_stats(ts_raster *r)
{
    moments *m = calloc((size_t)r->nch, sizeof *m);
    r->stats = calloc((size_t)r->nch, sizeof *r->stats);
    if (!m || !r->stats) {
        free(m);
        return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", r->path);
    }
    for (int c = 0; c < r->nch; c++) m[c].min = INFINITY, m[c].max = -INFINITY;
    const strip_plan p = plan_strips(r);
    ts_status st = stats_pass(r, &p, moments_chunk, m);
    for (int c = 0; !st && c < r->nch; c++)
        if (m[c].n == 0 && r->norm[c].kind >= TS_NORM_MEANSTD_STATS)
            st = ts_error(TS_ERR_INVALID_ARG,
                          "raster '%s': channel %s has no valid pixel%s to compute statistics from (check its "
                          "nodata/mask, or give the normalization values)",
                          r->path, r->ch_name[c], p.nused < p.nrows ? " in the sampled strips" : "");
    int need_hist = 0;
    for (int c = 0; c < r->nch; c++) need_hist |= r->norm[c].kind == TS_NORM_PERCENTILE_STATS;
    hist_ctx hc = {NULL, m};
    if (!st && need_hist) {
        if (!(hc.h = calloc((size_t)r->nch, sizeof *hc.h)))
            st = ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", r->path);
        for (int c = 0; !st && c < r->nch; c++)
            if (r->norm[c].kind == TS_NORM_PERCENTILE_STATS && !(hc.h[c] = calloc(HIST_BINS, sizeof(uint64_t))))
                st = ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", r->path);
        /* A second pass: the histogram's range is the first pass's min..max. */
        if (!st) st = stats_pass(r, &p, hist_chunk, &hc);
    }
    for (int c = 0; !st && c < r->nch; c++) {
        ts_band_stats *s = &r->stats[c];
        if (m[c].n == 0) continue; /* a channel without *_STATS: reported as count 0 */
        s->count = m[c].n;
        s->min = m[c].min;
        s->max = m[c].max;
        s->mean = m[c].mean;
        s->std = sqrt(m[c].m2 / (double)m[c].n);
        s->approx = p.nused < p.nrows;
        ts_band_norm *n = &r->norm[c];
        if (n->kind == TS_NORM_MEANSTD_STATS) {
            n->kind = TS_NORM_MEANSTD;
            n->mean = s->mean;
            /* A constant channel: divide by 1 so it reads 0, not inf. */
            n->std = s->std > 0 ? s->std : 1.0;
        } else if (n->kind == TS_NORM_MINMAX_STATS) {
            n->kind = TS_NORM_MINMAX;
            n->min = s->min;
            n->max = s->max;
        } else if (n->kind == TS_NORM_PERCENTILE_STATS) {
            s->pct_lo = hist_percentile(hc.h[c], s->count, s->min, s->max, n->pct_lo);
            s->pct_hi = hist_percentile(hc.h[c], s->count, s->min, s->max, n->pct_hi);
            n->kind = TS_NORM_MINMAX;
            n->min = s->pct_lo;
            n->max = s->pct_hi;
        }
    }
    if (hc.h)
        for (int c = 0; c < r->nch; c++) free(hc.h[c]);
    free(hc.h);
    free(m);
    return st;
}

static ts_status setup_norm(ts_raster *r, const ts_raster_opts *o)
{
    if (o->nnorm != 0 && o->nnorm != 1 && o->nnorm != r->nch)
        return ts_error(TS_ERR_INVALID_ARG,
                        "raster '%s': %d normalizations given for %d channels; give 0, 1 (for all) or one per channel",
                        r->path, o->nnorm, r->nch);
    if (o->nnorm > 0 && !o->norm)
        return ts_error(TS_ERR_INVALID_ARG, "raster '%s': nnorm = %d but norm is NULL", r->path, o->nnorm);
    int need_stats = 0;
    for (int c = 0; c < r->nch; c++) {
        ts_band_norm *n = &r->norm[c];
        if (o->nnorm) *n = o->norm[o->nnorm == 1 ? 0 : c];
        const char *ch = r->ch_name[c];
        switch (n->kind) {
        case TS_NORM_NONE: break;
        case TS_NORM_SCALE:
            if (!isfinite(n->scale) || !isfinite(n->offset))
                return ts_error(TS_ERR_INVALID_ARG, "raster '%s': channel %s: scale and offset must be finite", r->path,
                                ch);
            break;
        case TS_NORM_MEANSTD:
            if (!isfinite(n->mean) || !(n->std > 0) || !isfinite(n->std))
                return ts_error(TS_ERR_INVALID_ARG,
                                "raster '%s': channel %s: mean/std normalization needs std > 0 (got %g)", r->path, ch,
                                n->std);
            break;
        case TS_NORM_MINMAX:
            if (!isfinite(n->min) || !isfinite(n->max) || !(n->max > n->min))
                return ts_error(TS_ERR_INVALID_ARG,
                                "raster '%s': channel %s: min-max normalization needs min < max (got %g, %g)", r->path,
                                ch, n->min, n->max);
            break;
        case TS_NORM_PERCENTILE_STATS:
            if (!(n->pct_lo >= 0 && n->pct_lo < n->pct_hi && n->pct_hi <= 100))
                return ts_error(TS_ERR_INVALID_ARG,
                                "raster '%s': channel %s: percentiles must satisfy 0 <= lo < hi <= 100 (got %g, %g)",
                                r->path, ch, n->pct_lo, n->pct_hi);
            need_stats = 1;
            break;
        case TS_NORM_MEANSTD_STATS:
        case TS_NORM_MINMAX_STATS: need_stats = 1; break;
        default:
            return ts_error(TS_ERR_INVALID_ARG, "raster '%s': channel %s: unknown normalization kind %d", r->path, ch,
                            (int)n->kind);
        }
    }
    return need_stats ? compute_stats(r) : TS_OK;
}

/* ---- public API ------------------------------------------------------------------------- */

static ts_status copy_request(ts_raster *r, const char *path, const ts_raster_opts *o)
{
    if (!(r->path = strdup(path))) return ts_error(TS_ERR_NOMEM, "raster: out of memory");
    if (o->open_options && !(r->open_options = CSLDuplicate((CSLConstList)o->open_options)))
        return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", path);
    r->has_nodata = o->has_nodata != 0;
    r->nodata = o->nodata;
    r->ignore_masks = o->ignore_masks != 0;
    r->pad = o->pad != 0;
    r->stats_sample = o->stats_sample_pixels;
    if (o->stats_sample_pixels < 0)
        return ts_error(TS_ERR_INVALID_ARG, "raster '%s': stats_sample_pixels must be >= 0 (0: every pixel)", path);
    const char *rs = o->resampling ? o->resampling : "bilinear";
    int known = 0;
    for (int i = 0; resampling_names[i]; i++) known |= strcmp(rs, resampling_names[i]) == 0;
    if (!known)
        return ts_error(TS_ERR_INVALID_ARG,
                        "raster '%s': unknown resampling '%s' (near, bilinear, cubic, cubicspline, lanczos, average, "
                        "rms, mode, max, min, med, q1, q3, sum)",
                        path, rs);
    if (!(r->resampling = strdup(rs))) return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", path);
    if (o->warp_grid) {
        const ts_grid *g = o->warp_grid;
        if (g->width < 1 || g->height < 1 || g->width > INT32_MAX || g->height > INT32_MAX || g->gt[2] != 0 ||
            g->gt[4] != 0 || !(g->gt[1] > 0) || !(g->gt[5] < 0))
            return ts_error(TS_ERR_INVALID_ARG,
                            "raster '%s': the warp grid must be north-up (gt[2] = gt[4] = 0, gt[1] > 0 > gt[5]) with a "
                            "positive size",
                            path);
        ts_status st = ts_grid_copy(&r->warp_grid, g);
        if (st) return st;
        r->has_warp_grid = 1;
        r->warp = 1;
    }
    if (o->warp_res_x != 0 || o->warp_res_y != 0) {
        if (!(o->warp_res_x > 0) || !(o->warp_res_y > 0))
            return ts_error(TS_ERR_INVALID_ARG, "raster '%s': warp resolution %g x %g: both must be > 0", path,
                            o->warp_res_x, o->warp_res_y);
        r->warp_res_x = o->warp_res_x;
        r->warp_res_y = o->warp_res_y;
        r->warp = 1;
    }
    r->warp_tap = o->warp_tap != 0;
    if (o->warp_crs) {
        /* Checked here so that a typo names itself, not a generic warp failure. */
        OGRSpatialReferenceH srs = OSRNewSpatialReference(NULL);
        if (!srs) return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", path);
        CPLErrorReset();
        OGRErr e = OSRSetFromUserInput(srs, o->warp_crs);
        OSRDestroySpatialReference(srs);
        if (e != OGRERR_NONE)
            return ts_gdal_error(TS_ERR_INVALID_ARG, "raster '%s': warp CRS '%s' is not a CRS GDAL knows", path,
                                 o->warp_crs);
        if (!(r->warp_crs = strdup(o->warp_crs))) return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", path);
        r->warp = 1;
    }
    return TS_OK;
}

ts_status ts_raster_open(const char *path, const ts_raster_opts *o, ts_raster **out)
{
    if (!out) return ts_error(TS_ERR_INVALID_ARG, "ts_raster_open: out must not be NULL");
    *out = NULL;
    if (!path || !*path) return ts_error(TS_ERR_INVALID_ARG, "ts_raster_open: empty path");
    static const ts_raster_opts defaults = {0};
    if (!o) o = &defaults;
    ts_gdal_init();
    ts_raster *r = calloc(1, sizeof *r);
    if (!r) return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", path);
    ts_status st = copy_request(r, path, o);
    if (!st) st = open_dataset(r);
    if (!st) st = setup_channels(r, o);
    if (!st) st = setup_norm(r, o);
    if (st) {
        ts_raster_close(r);
        return st;
    }
    *out = r;
    return TS_OK;
}

static int *dup_ints(const int *p, size_t n)
{
    int *q = malloc(n * sizeof(int));
    if (q) memcpy(q, p, n * sizeof(int));
    return q;
}

ts_status ts_raster_clone(const ts_raster *r, ts_raster **out)
{
    if (!r || !out) return ts_error(TS_ERR_INVALID_ARG, "ts_raster_clone: NULL argument");
    *out = NULL;
    ts_raster *c = calloc(1, sizeof *c);
    if (!c) return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", r->path);
    ts_status st = TS_OK;
    const size_t nc = (size_t)r->nch, nn = (size_t)(r->nneed ? r->nneed : 1);
    c->warp = r->warp;
    c->warp_res_x = r->warp_res_x;
    c->warp_res_y = r->warp_res_y;
    c->warp_tap = r->warp_tap;
    c->has_nodata = r->has_nodata;
    c->nodata = r->nodata;
    c->ignore_masks = r->ignore_masks;
    c->pad = r->pad;
    c->stats_sample = r->stats_sample;
    c->nch = r->nch;
    c->nsel = r->nsel;
    c->nneed = r->nneed;
    c->alpha_band = r->alpha_band;
    c->path = dup_str(r->path);
    c->resampling = dup_str(r->resampling);
    c->warp_crs = dup_str(r->warp_crs);
    c->open_options = CSLDuplicate(r->open_options);
    c->ch_kind = dup_ints(r->ch_kind, nc);
    c->ch_band = dup_ints(r->ch_band, nc);
    c->ch_a = dup_ints(r->ch_a, nc);
    c->ch_b = dup_ints(r->ch_b, nc);
    c->need = dup_ints(r->need, nn);
    c->need_mask = dup_ints(r->need_mask, nn);
    c->ch_name = calloc(nc, sizeof(char *));
    c->norm = malloc(nc * sizeof *c->norm);
    if (!c->path || !c->resampling || (r->warp_crs && !c->warp_crs) || (r->open_options && !c->open_options) ||
        !c->ch_kind || !c->ch_band || !c->ch_a || !c->ch_b || !c->need || !c->need_mask || !c->ch_name || !c->norm)
        st = ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", r->path);
    for (size_t i = 0; !st && i < nc; i++)
        if (!(c->ch_name[i] = strdup(r->ch_name[i])))
            st = ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", r->path);
    if (!st) memcpy(c->norm, r->norm, nc * sizeof *c->norm);
    if (!st && r->stats) {
        if (!(c->stats = malloc(nc * sizeof *c->stats)))
            st = ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", r->path);
        else
            memcpy(c->stats, r->stats, nc * sizeof *c->stats);
    }
    if (!st && r->has_warp_grid) {
        st = ts_grid_copy(&c->warp_grid, &r->warp_grid);
        c->has_warp_grid = 1;
    }
    if (!st) st = open_dataset(c);
    if (!st && (c->width != r->width || c->height != r->height || c->src_bands != r->src_bands))
        st = ts_error(TS_ERR_IO, "raster '%s': changed on disk since it was opened (now %dx%d, %d bands)", r->path,
                      c->width, c->height, c->src_bands);
    if (st) {
        ts_raster_close(c);
        return st;
    }
    *out = c;
    return TS_OK;
}

void ts_raster_close(ts_raster *r)
{
    if (!r) return;
    /* The warped VRT holds a reference on the source: close it first. */
    if (r->ds && r->ds != r->src) GDALClose(r->ds);
    if (r->src) GDALClose(r->src);
    if (r->ch_name)
        for (int i = 0; i < r->nch; i++) free(r->ch_name[i]);
    free(r->ch_name);
    free(r->ch_kind);
    free(r->ch_band);
    free(r->ch_a);
    free(r->ch_b);
    free(r->need);
    free(r->need_mask);
    free(r->norm);
    free(r->stats);
    free(r->buf);
    free(r->vbuf);
    free(r->mbuf);
    free(r->path);
    free(r->warp_crs);
    free(r->resampling);
    CSLDestroy(r->open_options);
    ts_grid_free(&r->warp_grid);
    free(r);
}

ts_status ts_raster_grid(const ts_raster *r, ts_grid *out)
{
    if (!r || !out) return ts_error(TS_ERR_INVALID_ARG, "ts_raster_grid: NULL argument");
    memset(out, 0, sizeof *out);
    out->width = r->width;
    out->height = r->height;
    /* On failure GDAL leaves its default (0, 1, 0, 0, 0, 1): pixel coordinates. */
    if (GDALGetGeoTransform(r->ds, out->gt) != CE_None) {
        const double id[6] = {0, 1, 0, 0, 0, 1};
        memcpy(out->gt, id, sizeof id);
    }
    const char *wkt = GDALGetProjectionRef(r->ds);
    if (wkt && *wkt && !(out->crs_wkt = strdup(wkt)))
        return ts_error(TS_ERR_NOMEM, "raster '%s': out of memory", r->path);
    return TS_OK;
}

int ts_raster_width(const ts_raster *r) { return r ? r->width : 0; }
int ts_raster_height(const ts_raster *r) { return r ? r->height : 0; }
int ts_raster_channels(const ts_raster *r) { return r ? r->nch : 0; }
const char *ts_raster_path(const ts_raster *r) { return r ? r->path : NULL; }

const char *ts_raster_channel_name(const ts_raster *r, int c)
{
    return r && c >= 0 && c < r->nch ? r->ch_name[c] : NULL;
}

int ts_raster_channel_band(const ts_raster *r, int c)
{
    return r && c >= 0 && c < r->nch && !r->ch_kind[c] ? r->ch_band[c] : 0;
}

ts_status ts_raster_norm(const ts_raster *r, int c, ts_band_norm *out)
{
    if (!r || !out || c < 0 || c >= r->nch)
        return ts_error(TS_ERR_INVALID_ARG, "ts_raster_norm: channel %d out of range (%d channels)", c, r ? r->nch : 0);
    *out = r->norm[c];
    return TS_OK;
}

ts_status ts_raster_stats(const ts_raster *r, int c, ts_band_stats *out)
{
    if (!r || !out || c < 0 || c >= r->nch)
        return ts_error(TS_ERR_INVALID_ARG, "ts_raster_stats: channel %d out of range (%d channels)", c,
                        r ? r->nch : 0);
    if (!r->stats)
        return ts_error(TS_ERR_INVALID_ARG,
                        "raster '%s': no statistics were computed (open it with a *_STATS normalization)", r->path);
    *out = r->stats[c];
    return TS_OK;
}
