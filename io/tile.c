/* The window mask reader and filter, and the tile writers (io/tile.h says what and why). */
#include "io/tile.h"

#include <cpl_conv.h>
#include <cpl_error.h>
#include <cpl_string.h>
#include <cpl_vsi.h>
#include <errno.h>
#include <gdal.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "io/raster.h"

/* ---- the mask reader ------------------------------------------------------------------------ */
struct ts_mask_reader {
    char *image;
    ts_grid grid;
    ts_raster *raster; /* NULL: the valid mask is not read */
    int image_bands;
    ts_labels *labels;
    float *buf; /* channel values ts_raster_read needs somewhere to go */
    size_t buf_n;
};

/* How many bands give the whole valid mask (see io/tile.h); the bands go to *one_band when 1. */
static ts_status plan_valid(const ts_mask_reader_opts *o, int *nread, int *one_band)
{
    CPLErrorReset();
    GDALDatasetH ds = GDALOpenEx(o->image, GDAL_OF_RASTER | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!ds) return ts_gdal_error(TS_ERR_IO, "image '%s': cannot open it as a raster", o->image);
    const int nb = GDALGetRasterCount(ds);
    ts_status st = TS_OK;
    int alpha = 0, any_float = 0, all_valid = 1, all_dataset = 1, first = 0, n = 0;
    for (int b = nb; b >= 1 && !alpha; b--)
        if (GDALGetRasterColorInterpretation(GDALGetRasterBand(ds, b)) == GCI_AlphaBand) alpha = b;
    const int count = o->nbands > 0 ? o->nbands : nb;
    for (int i = 0; i < count && !st; i++) {
        const int b = o->nbands > 0 ? o->bands[i] : i + 1;
        if (b < 1 || b > nb) {
            st = ts_error(TS_ERR_INVALID_ARG,
                          "image '%s': band %d does not exist: the file has %d band%s, numbered from 1",
                          o->image, b, nb, nb == 1 ? "" : "s");
            break;
        }
        GDALRasterBandH h = GDALGetRasterBand(ds, b);
        if (o->nbands == 0 && GDALGetRasterColorInterpretation(h) == GCI_AlphaBand) continue;
        if (!first) first = b;
        n++;
        const int flags = GDALGetMaskFlags(h);
        any_float |= GDALDataTypeIsFloating(GDALGetRasterDataType(h));
        all_valid &= flags == GMF_ALL_VALID;
        all_dataset &= (flags & GMF_PER_DATASET) != 0;
    }
    GDALClose(ds);
    if (st) return st;
    if (n == 0) return ts_error(TS_ERR_INVALID_ARG, "image '%s': every band is an alpha band; select bands", o->image);
    *one_band = first;
    if (o->has_nodata || any_float)
        *nread = n; /* values are compared band by band */
    else if (all_valid && !alpha)
        *nread = 0;
    else if (all_dataset || (all_valid && alpha))
        *nread = 1;
    else
        *nread = n;
    return TS_OK;
}

ts_status ts_mask_reader_open(const ts_mask_reader_opts *o, ts_mask_reader **out)
{
    *out = NULL;
    if (!o || !o->image) return ts_error(TS_ERR_INVALID_ARG, "mask reader: no image given");
    if (o->nbands < 0 || (o->nbands > 0 && !o->bands))
        return ts_error(TS_ERR_INVALID_ARG, "mask reader: bad band list (%d bands)", o->nbands);
    ts_gdal_init();
    ts_mask_reader *r = calloc(1, sizeof *r);
    if (!r || !(r->image = strdup(o->image))) {
        free(r);
        return ts_error(TS_ERR_NOMEM, "mask reader: out of memory");
    }
    ts_status st = ts_windows_read_grid(o->image, &r->grid);
    if (!st && o->read_valid) {
        int nread = 0, one = 0;
        st = plan_valid(o, &nread, &one);
        if (!st && nread > 0) {
            ts_raster_opts ro = {0};
            if (nread == 1) {
                ro.bands = &one;
                ro.nbands = 1;
            } else {
                ro.bands = o->bands;
                ro.nbands = o->nbands;
            }
            ro.has_nodata = o->has_nodata;
            ro.nodata = o->nodata;
            st = ts_raster_open(o->image, &ro, &r->raster);
            if (!st) r->image_bands = ts_raster_channels(r->raster);
        }
    }
    if (!st && o->labels) st = ts_labels_open(o->labels, &r->grid, o->label_opts, &r->labels);
    if (st) {
        ts_mask_reader_close(r);
        return st;
    }
    *out = r;
    return TS_OK;
}

void ts_mask_reader_close(ts_mask_reader *r)
{
    if (!r) return;
    ts_raster_close(r->raster);
    ts_labels_close(r->labels);
    ts_grid_free(&r->grid);
    free(r->buf);
    free(r->image);
    free(r);
}

ts_status ts_mask_reader_read(void *reader, const ts_window *w, int32_t *labels, uint8_t *valid)
{
    ts_mask_reader *r = reader;
    if (!r || !w) return ts_error(TS_ERR_INVALID_ARG, "mask reader: reader and window must not be NULL");
    if (w->width <= 0 || w->height <= 0 || w->col_off < 0 || w->row_off < 0 || w->col_off > r->grid.width - w->width ||
        w->row_off > r->grid.height - w->height)
        return ts_error(TS_ERR_INVALID_ARG,
                        "image '%s': window %dx%d at col %lld, row %lld is not inside the image (%lldx%lld)",
                        r->image, w->width, w->height, (long long)w->col_off, (long long)w->row_off,
                        (long long)r->grid.width, (long long)r->grid.height);
    const size_t npix = (size_t)w->width * (size_t)w->height;
    if (valid && r->raster) {
        const size_t need = (size_t)r->image_bands * npix;
        if (need > r->buf_n) {
            float *b = realloc(r->buf, need * sizeof *b);
            if (!b)
                return ts_error(TS_ERR_NOMEM, "image '%s': out of memory for a %dx%d window", r->image, w->width,
                                w->height);
            r->buf = b;
            r->buf_n = need;
        }
        ts_status st = ts_raster_read(r->raster, w, r->buf, valid);
        if (st) return st;
    }
    if (labels) {
        if (!r->labels)
            return ts_error(TS_ERR_INVALID_ARG, "mask reader for '%s': labels asked for, but none were opened",
                            r->image);
        return ts_labels_read(r->labels, w, labels);
    }
    return TS_OK;
}

int ts_mask_reader_image_bands(const ts_mask_reader *r) { return r ? r->image_bands : 0; }
const ts_grid *ts_mask_reader_grid(const ts_mask_reader *r) { return r ? &r->grid : NULL; }
ts_labels *ts_mask_reader_labels(ts_mask_reader *r) { return r ? r->labels : NULL; }

/* ---- the window filter ------------------------------------------------------------------------ */
typedef struct filter_ctx {
    ts_mask_reader *reader;
    const ts_mask_filter_params *p;
    int want_valid, want_labels;
    int32_t *labels;
    uint8_t *valid;
    size_t cap;
    size_t nodata, background;
} filter_ctx;

static ts_status filter_fn(void *ctx, const ts_window *w, int *keep)
{
    filter_ctx *c = ctx;
    *keep = 1;
    if (w->width <= 0 || w->height <= 0)
        return ts_error(TS_ERR_INVALID_ARG, "mask filter: window size %dx%d", w->width, w->height);
    const size_t npix = (size_t)w->width * (size_t)w->height;
    if (npix > c->cap) {
        int32_t *l = realloc(c->labels, npix * sizeof *l);
        if (l) c->labels = l;
        uint8_t *v = l ? realloc(c->valid, npix) : NULL;
        if (v) c->valid = v;
        if (!l || !v)
            return ts_error(TS_ERR_NOMEM, "mask filter: out of memory for a %dx%d window", w->width, w->height);
        c->cap = npix;
    }
    memset(c->valid, 1, npix);
    ts_status st = ts_mask_reader_read(c->reader, w, c->want_labels ? c->labels : NULL,
                                       c->want_valid ? c->valid : NULL);
    if (st) return st;
    const ts_mask_filter_params *p = c->p;
    if (p->max_nodata_fraction < 1.0 && ts_mask_nodata_fraction(c->valid, npix) > p->max_nodata_fraction) {
        *keep = 0;
        c->nodata++;
    } else if (p->drop_background &&
               ts_mask_all_background(c->labels, c->valid, npix, p->background, p->ignore_index)) {
        *keep = 0;
        c->background++;
    }
    return TS_OK;
}

ts_status ts_windows_filter_masks(ts_window_list *l, const ts_mask_reader_opts *o, const ts_mask_filter_params *p,
                                  int threads, ts_mask_filter_report *rep)
{
    ts_mask_filter_report rp = {0};
    if (rep) *rep = rp;
    if (!l || !o || !p) return ts_error(TS_ERR_INVALID_ARG, "mask filter: list, reader options and rules are needed");
    if (p->max_nodata_fraction < 0.0 || !(p->max_nodata_fraction == p->max_nodata_fraction))
        return ts_error(TS_ERR_INVALID_ARG, "mask filter: the nodata fraction %g must be in [0, 1]",
                        p->max_nodata_fraction);
    if (p->drop_background && !o->labels)
        return ts_error(TS_ERR_INVALID_ARG, "mask filter: dropping all-background windows needs labels");
    const int want_valid = p->max_nodata_fraction < 1.0 || p->drop_background;
    const int want_labels = p->drop_background;
    rp.windows = l->count;
    if ((!want_valid && !want_labels) || l->count == 0) {
        if (rep) *rep = rp;
        return TS_OK;
    }
    if (threads <= 0) threads = omp_get_max_threads();
    if (threads < 1) threads = 1;
    if ((size_t)threads > l->count) threads = (int)l->count;

    ts_mask_reader_opts ro = *o;
    ro.read_valid = want_valid;
    if (!want_labels) ro.labels = NULL;
    filter_ctx *ctx = calloc((size_t)threads, sizeof *ctx);
    void **ctxs = calloc((size_t)threads, sizeof *ctxs);
    ts_status st = TS_OK;
    if (!ctx || !ctxs) st = ts_error(TS_ERR_NOMEM, "mask filter: out of memory");
    for (int t = 0; !st && t < threads; t++) {
        ctx[t].p = p;
        ctx[t].want_valid = want_valid;
        ctx[t].want_labels = want_labels;
        ctxs[t] = &ctx[t];
        st = ts_mask_reader_open(&ro, &ctx[t].reader);
    }
    size_t dropped = 0;
    if (!st) st = ts_windows_filter_ctx(l, filter_fn, ctxs, threads, &dropped);
    if (!st) {
        rp.image_bands = ts_mask_reader_image_bands(ctx[0].reader);
        rp.threads = threads;
        for (int t = 0; t < threads; t++) {
            rp.dropped_nodata += ctx[t].nodata;
            rp.dropped_background += ctx[t].background;
        }
        if (rep) *rep = rp;
    }
    for (int t = 0; ctx && t < threads; t++) {
        ts_mask_reader_close(ctx[t].reader);
        free(ctx[t].labels);
        free(ctx[t].valid);
    }
    free(ctx);
    free(ctxs);
    return st;
}

/* ---- tile writers ----------------------------------------------------------------------------------- */

/* PATH.tmp, or NULL (error set). */
static char *tmp_name(const char *path)
{
    size_t n = strlen(path) + 5;
    char *t = malloc(n);
    if (!t) {
        ts_error(TS_ERR_NOMEM, "tile '%s': out of memory", path);
        return NULL;
    }
    snprintf(t, n, "%s.tmp", path);
    return t;
}

static int exists(const char *path)
{
    VSIStatBufL sb;
    return VSIStatExL(path, &sb, VSI_STAT_EXISTS_FLAG) == 0;
}

/* Creates the GeoTIFF tmp for a tile of path (w x h, nb bands of type t). */
static ts_status create_tile(const char *path, const char *tmp, int w, int h, int nb, GDALDataType t,
                             GDALDatasetH *out)
{
    *out = NULL;
    GDALDriverH gtiff = GDALGetDriverByName("GTiff");
    if (!gtiff) return ts_error(TS_ERR_UNSUPPORTED, "tile '%s': GDAL has no GTiff driver", path);
    char **co = NULL;
    co = CSLSetNameValue(co, "COMPRESS", "DEFLATE");
    co = CSLSetNameValue(co, "BIGTIFF", "IF_SAFER");
    if (w >= 256 && h >= 256) {
        co = CSLSetNameValue(co, "TILED", "YES");
        co = CSLSetNameValue(co, "BLOCKXSIZE", "256");
        co = CSLSetNameValue(co, "BLOCKYSIZE", "256");
    }
    CPLErrorReset();
    *out = GDALCreate(gtiff, tmp, w, h, nb, t, co);
    CSLDestroy(co);
    if (!*out) return ts_gdal_error(TS_ERR_IO, "tile '%s': cannot create '%s' (is the folder there and writable?)",
                                    path, tmp);
    return TS_OK;
}

/* Closes out (NULL is fine) and, when st is TS_OK, renames tmp (and its
 * .aux.xml) onto path; otherwise removes what was written. */
static ts_status finish_tile(GDALDatasetH out, const char *tmp, const char *path, ts_status st)
{
    if (out) {
        if (!st) {
            CPLErrorReset();
            GDALFlushCache(out);
            if (CPLGetLastErrorType() == CE_Failure)
                st = ts_gdal_error(TS_ERR_IO, "tile '%s': writing '%s'", path, tmp);
        }
        CPLErrorReset();
        GDALClose(out);
        if (!st && CPLGetLastErrorType() == CE_Failure)
            st = ts_gdal_error(TS_ERR_IO, "tile '%s': closing '%s'", path, tmp);
    }
    const size_t n = strlen(path) + 16;
    char *aux_tmp = malloc(n), *aux = malloc(n);
    if (!aux_tmp || !aux) {
        if (!st) st = ts_error(TS_ERR_NOMEM, "tile '%s': out of memory", path);
    } else {
        snprintf(aux_tmp, n, "%s.aux.xml", tmp);
        snprintf(aux, n, "%s.aux.xml", path);
        if (!st) {
            /* The sidecar first, so a reader that sees PATH sees its metadata;
             * a stale sidecar of an earlier PATH must not describe the new one. */
            if (exists(aux_tmp)) {
                if (rename(aux_tmp, aux) != 0)
                    st = ts_error(TS_ERR_IO, "tile '%s': cannot rename '%s' to '%s': %s", path, aux_tmp, aux,
                                  strerror(errno));
            } else if (exists(aux) && unlink(aux) != 0) {
                st = ts_error(TS_ERR_IO, "tile '%s': cannot remove the stale '%s': %s", path, aux, strerror(errno));
            }
        }
        if (!st && rename(tmp, path) != 0)
            st = ts_error(TS_ERR_IO, "tile '%s': cannot rename '%s' to it: %s", path, tmp, strerror(errno));
        if (st) {
            VSIUnlink(tmp);
            VSIUnlink(aux_tmp);
        }
    }
    free(aux_tmp);
    free(aux);
    return st;
}

/* Copies band metadata gdal_translate copies (statistics excepted: they describe the whole band). */
static ts_status copy_band_info(GDALRasterBandH s, GDALRasterBandH d, GDALDataType t, const char *path, int band)
{
    int has = 0;
#if GDAL_VERSION_NUM >= 3050000
    if (t == GDT_Int64) {
        int64_t v = GDALGetRasterNoDataValueAsInt64(s, &has);
        if (has && GDALSetRasterNoDataValueAsInt64(d, v) != CE_None)
            return ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the nodata value of band %d", path, band);
        has = -1;
    } else if (t == GDT_UInt64) {
        uint64_t v = GDALGetRasterNoDataValueAsUInt64(s, &has);
        if (has && GDALSetRasterNoDataValueAsUInt64(d, v) != CE_None)
            return ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the nodata value of band %d", path, band);
        has = -1;
    }
#endif
    if (has != -1) {
        double nd = GDALGetRasterNoDataValue(s, &has);
        if (has && GDALSetRasterNoDataValue(d, nd) != CE_None)
            return ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the nodata value %.17g of band %d", path, nd, band);
    }
    const char *desc = GDALGetDescription(s);
    if (desc && *desc) GDALSetDescription(d, desc);
    GDALColorInterp ci = GDALGetRasterColorInterpretation(s);
    if (ci != GCI_Undefined && GDALSetRasterColorInterpretation(d, ci) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the colour interpretation of band %d", path, band);
    int has_off = 0, has_scale = 0;
    double off = GDALGetRasterOffset(s, &has_off), scale = GDALGetRasterScale(s, &has_scale);
    if (has_off && off != 0.0 && GDALSetRasterOffset(d, off) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the offset of band %d", path, band);
    if (has_scale && scale != 1.0 && GDALSetRasterScale(d, scale) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the scale of band %d", path, band);
    const char *unit = GDALGetRasterUnitType(s);
    if (unit && *unit && GDALSetRasterUnitType(d, unit) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the unit of band %d", path, band);
    GDALColorTableH ct = GDALGetRasterColorTable(s);
    if (ct && (t == GDT_Byte || t == GDT_UInt16) && GDALSetRasterColorTable(d, ct) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the colour table of band %d", path, band);
    char **md = GDALGetMetadata(s, NULL), **keep = NULL;
    for (int i = 0; md && md[i]; i++)
        if (strncmp(md[i], "STATISTICS_", 11) != 0) keep = CSLAddString(keep, md[i]);
    CPLErr e = keep ? GDALSetMetadata(d, keep, NULL) : CE_None;
    CSLDestroy(keep);
    if (e != CE_None) return ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the metadata of band %d", path, band);
    return TS_OK;
}

ts_status ts_tile_write_image(GDALDatasetH src, const ts_window *w, const int *bands, int nbands, const char *path)
{
    if (!src || !w || !path) return ts_error(TS_ERR_INVALID_ARG, "tile: source, window and path must not be NULL");
    const char *name = GDALGetDescription(src);
    const int W = GDALGetRasterXSize(src), H = GDALGetRasterYSize(src), nb = GDALGetRasterCount(src);
    if (w->width <= 0 || w->height <= 0 || w->col_off < 0 || w->row_off < 0 || w->col_off > (int64_t)W - w->width ||
        w->row_off > (int64_t)H - w->height)
        return ts_error(TS_ERR_INVALID_ARG,
                        "tile '%s': window %dx%d at col %lld, row %lld is not inside the raster '%s' (%dx%d pixels)",
                        path, w->width, w->height, (long long)w->col_off, (long long)w->row_off, name, W, H);
    if (nbands < 0 || (nbands > 0 && !bands))
        return ts_error(TS_ERR_INVALID_ARG, "tile '%s': bad band list (%d bands)", path, nbands);
    const int n = nbands > 0 ? nbands : nb;
    if (n < 1) return ts_error(TS_ERR_INVALID_ARG, "tile '%s': the raster '%s' has no bands", path, name);
    int *map = malloc((size_t)n * sizeof *map);
    if (!map) return ts_error(TS_ERR_NOMEM, "tile '%s': out of memory", path);
    GDALDataType t = GDT_Unknown;
    for (int i = 0; i < n; i++) {
        map[i] = nbands > 0 ? bands[i] : i + 1;
        if (map[i] < 1 || map[i] > nb) {
            int b = map[i];
            free(map);
            return ts_error(TS_ERR_INVALID_ARG, "tile '%s': band %d does not exist in '%s' (it has %d band%s)", path,
                            b, name, nb, nb == 1 ? "" : "s");
        }
        GDALDataType bt = GDALGetRasterDataType(GDALGetRasterBand(src, map[i]));
        t = i == 0 ? bt : GDALDataTypeUnion(t, bt);
    }
    const size_t px = (size_t)w->width * (size_t)w->height, tsize = (size_t)GDALGetDataTypeSizeBytes(t);
    if (tsize == 0 || px > SIZE_MAX / tsize / (size_t)n) {
        free(map);
        return ts_error(TS_ERR_INVALID_ARG, "tile '%s': a %dx%d window of %d bands is too large", path, w->width,
                        w->height, n);
    }
    void *buf = malloc(px * tsize * (size_t)n);
    char *tmp = tmp_name(path);
    if (!buf || !tmp) {
        free(map);
        free(buf);
        free(tmp);
        return ts_error(TS_ERR_NOMEM, "tile '%s': out of memory for a %dx%d window of %d bands", path, w->width,
                        w->height, n);
    }
    const int c = (int)w->col_off, r = (int)w->row_off;
    ts_status st = TS_OK;
    CPLErrorReset();
    if (GDALDatasetRasterIO(src, GF_Read, c, r, w->width, w->height, buf, w->width, w->height, t, n, map, 0, 0, 0) !=
        CE_None)
        st = ts_gdal_error(TS_ERR_IO, "tile '%s': reading window %dx%d at col %d, row %d of '%s'", path, w->width,
                           w->height, c, r, name);
    /* A per-dataset mask that is neither nodata nor alpha (an internal mask)
     * travels with the tile, as gdal_translate copies it. */
    GDALRasterBandH b0 = GDALGetRasterBand(src, map[0]);
    const int mflags = GDALGetMaskFlags(b0);
    const int copy_mask = mflags == GMF_PER_DATASET;
    GDALDatasetH out = NULL;
    char *old_mask_opt = NULL;
    int set_mask_opt = 0;
    if (!st) {
        /* An internal mask (GDAL < 3.9 writes PATH.tmp.msk beside the file otherwise). */
        const char *o = CPLGetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", NULL);
        old_mask_opt = o ? CPLStrdup(o) : NULL;
        CPLSetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", "YES");
        set_mask_opt = 1;
        st = create_tile(path, tmp, w->width, w->height, n, t, &out);
    }
    double gt[6];
    if (!st && GDALGetGeoTransform(src, gt) == CE_None) {
        double wgt[6];
        ts_window_gt(gt, w, wgt);
        if (GDALSetGeoTransform(out, wgt) != CE_None)
            st = ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the geotransform", path);
    }
    const char *wkt = st ? NULL : GDALGetProjectionRef(src);
    if (!st && wkt && *wkt && GDALSetProjection(out, wkt) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the CRS", path);
    char **md = st ? NULL : GDALGetMetadata(src, NULL);
    if (!st && md && GDALSetMetadata(out, md, NULL) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "tile '%s': cannot set the metadata", path);
    for (int i = 0; !st && i < n; i++)
        st = copy_band_info(GDALGetRasterBand(src, map[i]), GDALGetRasterBand(out, i + 1), t, path, i + 1);
    if (!st && GDALDatasetRasterIO(out, GF_Write, 0, 0, w->width, w->height, buf, w->width, w->height, t, n, NULL, 0,
                                   0, 0) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "tile '%s': writing the pixels", path);
    if (!st && copy_mask) {
        uint8_t *m = (uint8_t *)buf; /* px bytes fit: the data buffer holds at least px bytes */
        CPLErrorReset();
        if (GDALRasterIO(GDALGetMaskBand(b0), GF_Read, c, r, w->width, w->height, m, w->width, w->height, GDT_Byte,
                         0, 0) != CE_None)
            st = ts_gdal_error(TS_ERR_IO, "tile '%s': reading the mask of window %dx%d at col %d, row %d of '%s'",
                               path, w->width, w->height, c, r, name);
        else if (GDALCreateDatasetMaskBand(out, GMF_PER_DATASET) != CE_None)
            st = ts_gdal_error(TS_ERR_IO, "tile '%s': cannot create the mask band", path);
        else if (GDALRasterIO(GDALGetMaskBand(GDALGetRasterBand(out, 1)), GF_Write, 0, 0, w->width, w->height, m,
                              w->width, w->height, GDT_Byte, 0, 0) != CE_None)
            st = ts_gdal_error(TS_ERR_IO, "tile '%s': writing the mask band", path);
    }
    st = finish_tile(out, tmp, path, st);
    if (set_mask_opt) CPLSetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", old_mask_opt);
    CPLFree(old_mask_opt);
    free(map);
    free(buf);
    free(tmp);
    return st;
}

GDALDataType ts_tile_mask_type(int64_t max_id)
{
    return max_id <= 255 ? GDT_Byte : max_id <= 65535 ? GDT_UInt16 : GDT_UInt32;
}

ts_status ts_tile_write_mask(const ts_grid *g, const ts_window *w, const int32_t *ids, GDALDataType type,
                             int32_t ignore_id, const char *path)
{
    if (!g || !w || !ids || !path) return ts_error(TS_ERR_INVALID_ARG, "mask tile: arguments must not be NULL");
    if (w->width <= 0 || w->height <= 0)
        return ts_error(TS_ERR_INVALID_ARG, "mask tile '%s': window size %dx%d", path, w->width, w->height);
    const int64_t maxv = type == GDT_Byte ? 255 : type == GDT_UInt16 ? 65535 : type == GDT_UInt32 ? 4294967295LL : -1;
    if (maxv < 0)
        return ts_error(TS_ERR_INVALID_ARG, "mask tile '%s': type %s (Byte, UInt16 or UInt32)", path,
                        GDALGetDataTypeName(type));
    if (ignore_id < 0 || ignore_id > maxv)
        return ts_error(TS_ERR_INVALID_ARG, "mask tile '%s': the ignore id %d does not fit %s", path, (int)ignore_id,
                        GDALGetDataTypeName(type));
    const size_t npix = (size_t)w->width * (size_t)w->height;
    for (size_t i = 0; i < npix; i++)
        if (ids[i] < 0 || ids[i] > maxv)
            return ts_error(TS_ERR_INVALID_ARG,
                            "mask tile '%s': class id %d at window pixel (col %zu, row %zu) does not fit %s", path,
                            (int)ids[i], i % (size_t)w->width, i / (size_t)w->width, GDALGetDataTypeName(type));
    char *tmp = tmp_name(path);
    if (!tmp) return TS_ERR_NOMEM;
    GDALDatasetH out = NULL;
    ts_status st = create_tile(path, tmp, w->width, w->height, 1, type, &out);
    double gt[6];
    ts_window_gt(g->gt, w, gt);
    if (!st && GDALSetGeoTransform(out, gt) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "mask tile '%s': cannot set the geotransform", path);
    if (!st && g->crs_wkt && *g->crs_wkt && GDALSetProjection(out, g->crs_wkt) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "mask tile '%s': cannot set the CRS", path);
    GDALRasterBandH b = st ? NULL : GDALGetRasterBand(out, 1);
    if (!st && GDALSetRasterNoDataValue(b, (double)ignore_id) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "mask tile '%s': cannot set nodata", path);
    if (!st && GDALRasterIO(b, GF_Write, 0, 0, w->width, w->height, (void *)ids, w->width, w->height, GDT_Int32, 0,
                            0) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "mask tile '%s': writing the ids", path);
    st = finish_tile(out, tmp, path, st);
    free(tmp);
    return st;
}

/* ---- a whole tiling job ------------------------------------------------------------------------------ */
static ts_status mkdir_p(const char *dir)
{
    char *p = strdup(dir);
    if (!p) return ts_error(TS_ERR_NOMEM, "out of memory");
    int err = 0;
    for (char *s = p + 1;; s++) {
        if (*s != '/' && *s != '\0') continue;
        const char c = *s;
        *s = '\0';
        if (mkdir(p, 0777) != 0 && errno != EEXIST) err = errno;
        *s = c;
        if (err || c == '\0') break;
    }
    struct stat sb;
    if (!err && (stat(p, &sb) != 0 || !S_ISDIR(sb.st_mode))) err = ENOTDIR;
    free(p);
    if (err) return ts_error(TS_ERR_IO, "tiles: cannot create the folder '%s': %s", dir, strerror(err));
    return TS_OK;
}

static int cmp_win(const void *a, const void *b)
{
    const ts_window *x = *(const ts_window *const *)a, *y = *(const ts_window *const *)b;
    if (x->col_off != y->col_off) return x->col_off < y->col_off ? -1 : 1;
    if (x->row_off != y->row_off) return x->row_off < y->row_off ? -1 : 1;
    if (x->width != y->width) return x->width < y->width ? -1 : 1;
    return (x->height > y->height) - (x->height < y->height);
}

/* Two windows at the same offset but of different sizes would write the same file. */
static ts_status check_names(const ts_window_list *l)
{
    if (l->count < 2) return TS_OK;
    const ts_window **p = malloc(l->count * sizeof *p);
    if (!p) return ts_error(TS_ERR_NOMEM, "tiles: out of memory");
    for (size_t i = 0; i < l->count; i++) p[i] = &l->w[i];
    qsort(p, l->count, sizeof *p, cmp_win);
    ts_status st = TS_OK;
    for (size_t i = 1; i < l->count && !st; i++)
        if (p[i]->col_off == p[i - 1]->col_off && p[i]->row_off == p[i - 1]->row_off &&
            (p[i]->width != p[i - 1]->width || p[i]->height != p[i - 1]->height))
            st = ts_error(TS_ERR_INVALID_ARG,
                          "tiles: windows %dx%d and %dx%d both start at col %lld, row %lld, so their tiles would "
                          "have the same name",
                          p[i - 1]->width, p[i - 1]->height, p[i]->width, p[i]->height, (long long)p[i]->col_off,
                          (long long)p[i]->row_off);
    free(p);
    return st;
}

ts_status ts_tile_windows(const ts_tile_job *job, ts_tile_report *rep)
{
    ts_tile_report rp = {.mask_type = GDT_Byte};
    if (rep) *rep = rp;
    if (!job || !job->image || !job->windows || !job->out_dir || !job->prefix)
        return ts_error(TS_ERR_INVALID_ARG, "tiles: image, windows, output folder and prefix are needed");
    if (!*job->prefix || strchr(job->prefix, '/'))
        return ts_error(TS_ERR_INVALID_ARG, "tiles: the prefix \"%s\" must be a file name without '/'", job->prefix);
    if (job->nbands < 0 || (job->nbands > 0 && !job->bands))
        return ts_error(TS_ERR_INVALID_ARG, "tiles: bad band list (%d bands)", job->nbands);
    ts_gdal_init();
    const ts_window_list *l = job->windows;
    ts_status st = check_names(l);
    if (st) return st;
    CPLErrorReset();
    GDALDatasetH src = GDALOpenEx(job->image, GDAL_OF_RASTER | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!src) return ts_gdal_error(TS_ERR_IO, "image '%s': cannot open it as a raster", job->image);
    const int nb = GDALGetRasterCount(src);
    rp.image_bands = job->nbands ? job->nbands : nb;
    for (int i = 0; !st && i < job->nbands; i++)
        if (job->bands[i] < 1 || job->bands[i] > nb)
            st = ts_error(TS_ERR_INVALID_ARG, "tiles: band %d does not exist in '%s' (it has %d band%s)",
                          job->bands[i], job->image, nb, nb == 1 ? "" : "s");
    ts_mask_reader *reader = NULL;
    if (!st && (job->labels || job->skip_empty)) {
        ts_mask_reader_opts ro = {.image = job->image,
                                  .bands = job->bands,
                                  .nbands = job->nbands,
                                  .has_nodata = job->has_nodata,
                                  .nodata = job->nodata,
                                  .read_valid = job->skip_empty,
                                  .labels = job->labels,
                                  .label_opts = job->label_opts};
        st = ts_mask_reader_open(&ro, &reader);
    }
    ts_label_opts lo;
    if (job->label_opts)
        lo = *job->label_opts;
    else
        ts_label_opts_init(&lo);
    if (!st && job->labels) rp.mask_type = ts_tile_mask_type(ts_labels_max_id(ts_mask_reader_labels(reader)));
    const size_t plen = strlen(job->out_dir) + strlen(job->prefix) + 64;
    char *path = malloc(plen), *mpath = malloc(plen);
    if (!st && (!path || !mpath)) st = ts_error(TS_ERR_NOMEM, "tiles: out of memory");
    if (!st) {
        snprintf(path, plen, "%s/images", job->out_dir);
        st = mkdir_p(path);
    }
    if (!st && job->labels) {
        snprintf(path, plen, "%s/masks", job->out_dir);
        st = mkdir_p(path);
    }
    int32_t *ids = NULL;
    uint8_t *valid = NULL;
    size_t cap = 0;
    const ts_grid *grid = reader ? ts_mask_reader_grid(reader) : NULL;
    for (size_t i = 0; !st && i < l->count; i++) {
        const ts_window *w = &l->w[i];
        if (l->has_split && l->split[i] == TS_SPLIT_BUFFER) {
            rp.buffer++;
            continue;
        }
        if (job->only_split != TS_SPLIT_NONE && (!l->has_split || l->split[i] != job->only_split)) {
            rp.other_split++;
            continue;
        }
        if (w->width <= 0 || w->height <= 0) {
            st = ts_error(TS_ERR_INVALID_ARG, "tiles: window %zu has size %dx%d", i, w->width, w->height);
            break;
        }
        const size_t npix = (size_t)w->width * (size_t)w->height;
        if (reader) {
            if (npix > cap) {
                int32_t *ni = realloc(ids, npix * sizeof *ids);
                if (ni) ids = ni;
                uint8_t *nv = ni ? realloc(valid, npix) : NULL;
                if (nv) valid = nv;
                if (!ni || !nv) {
                    st = ts_error(TS_ERR_NOMEM, "tiles: out of memory for a %dx%d window", w->width, w->height);
                    break;
                }
                cap = npix;
            }
            memset(valid, 1, npix);
            st = ts_mask_reader_read(reader, w, job->labels ? ids : NULL, job->skip_empty ? valid : NULL);
            if (st) break;
            if (job->skip_empty &&
                (job->labels ? ts_mask_all_background(ids, valid, npix, lo.background_id, lo.ignore_id)
                             : ts_mask_nodata_fraction(valid, npix) == 1.0)) {
                rp.empty++;
                continue;
            }
        }
        snprintf(path, plen, "%s/images/%s_%lld_%lld.tif", job->out_dir, job->prefix, (long long)w->col_off,
                 (long long)w->row_off);
        st = ts_tile_write_image(src, w, job->bands, job->nbands, path);
        if (!st && job->labels) {
            snprintf(mpath, plen, "%s/masks/%s_%lld_%lld.tif", job->out_dir, job->prefix, (long long)w->col_off,
                     (long long)w->row_off);
            st = ts_tile_write_mask(grid, w, ids, rp.mask_type, lo.ignore_id, mpath);
            if (st) remove(path); /* no image without its mask */
        }
        if (!st) rp.written++;
    }
    free(ids);
    free(valid);
    free(path);
    free(mpath);
    ts_mask_reader_close(reader);
    GDALClose(src);
    if (rep) *rep = rp;
    return st;
}
