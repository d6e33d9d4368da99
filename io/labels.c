/* Labels on the image grid: raster masks through a nearest-neighbour warped
 * VRT, vector labels rasterized per window (see labels.h). */
#include "io/labels.h"

#include <cpl_conv.h>
#include <cpl_error.h>
#include <cpl_string.h>
#include <cpl_vsi.h>
#include <gdal.h>
#include <gdal_alg.h>
#include <gdalwarper.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How a window's features are put back in layer order after a spatial
 * filter (a GPKG R-tree query, for one, returns them in index order). */
enum {
    ORDER_FID,      /* sequential reading gives increasing FIDs: sort by FID */
    ORDER_RANK,     /* FIDs unique but not increasing: sort by the rank of each FID */
    ORDER_NOFILTER, /* FIDs not unique: no spatial filter, sequential reading */
};

typedef struct fid_rank {
    GIntBig fid;
    int64_t rank;
} fid_rank;

/* A geometry of the current window with its class and its place in the layer. */
typedef struct burn_item {
    OGRGeometryH geom;
    double value;
    int64_t order;
    GIntBig fid; /* breaks ties in order (features added since opening all rank last) */
} burn_item;

struct ts_labels {
    char *path;
    int is_vector;
    ts_grid grid;
    ts_label_opts o; /* strings and maps owned below */
    char *o_layer, *o_attribute;
    char *assume_wkt; /* o.assume_crs resolved to WKT (o.assume_crs points here) */
    ts_label_color *o_colors;
    ts_label_class *o_class_map;
    int64_t max_id;

    GDALDatasetH ds;
    /* raster */
    GDALDatasetH vrt;          /* warped VRT, or NULL when the mask is on the image grid */
    GDALRasterBandH bands[4];  /* the bands read (on vrt or ds) */
    int nbands;
    GDALRasterBandH alpha;     /* the VRT's footprint alpha, NULL when reading directly */
    int has_nodata[4];
    double nodata[4];
    int read_double;           /* id band read as float64 (float or wide integer types) */
    void *scratch;
    size_t scratch_bytes;
    /* vector */
    OGRLayerH layer;
    const char *layer_name;
    OGRCoordinateTransformationH to_image, to_layer;
    int field;           /* attribute index, -1 for a burn value */
    OGRFieldType field_type;
    int order_mode;
    fid_rank *ranks; /* ORDER_RANK: sorted by fid */
    int64_t n_ranks;
    GDALDatasetH grid_ds; /* 0-band MEM dataset with the image grid, for the pixel transformer */
    void *grid_tr;        /* GenImgProj transformer geo -> image pixel, as gdal_rasterize builds it */
    burn_item *items;
    size_t n_items, cap_items;
};

void ts_label_opts_init(ts_label_opts *o)
{
    memset(o, 0, sizeof *o);
    o->ignore_id = 255;
    o->background_id = 0;
    o->band = 1;
    o->burn = 1;
}

int ts_labels_is_vector(const ts_labels *l) { return l->is_vector; }
int64_t ts_labels_max_id(const ts_labels *l) { return l->max_id; }

/* ---- parsing helpers for the command line ------------------------------ */

static int parse_id(const char *s, size_t n, int32_t *id)
{
    char buf[32];
    if (n == 0 || n >= sizeof buf) return 0;
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *end = NULL;
    long long v = strtoll(buf, &end, 10);
    if (*end != '\0' || v < 0 || v > INT32_MAX) return 0;
    *id = (int32_t)v;
    return 1;
}

ts_status ts_label_parse_class_map(const char *text, ts_label_class **out, int *n)
{
    *out = NULL;
    *n = 0;
    if (!text || !*text) return ts_error(TS_ERR_INVALID_ARG, "class map: empty; expected name=id,name=id,...");
    int count = 1;
    for (const char *p = text; *p; p++) count += *p == ',';
    size_t len = strlen(text) + 1;
    ts_label_class *m = malloc((size_t)count * sizeof *m + len);
    if (!m) return ts_error(TS_ERR_NOMEM, "class map: out of memory");
    char *names = (char *)(m + count);
    memcpy(names, text, len);
    int k = 0;
    char *save = NULL;
    for (char *tok = strtok_r(names, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strrchr(tok, '=');
        if (!eq || eq == tok || !parse_id(eq + 1, strlen(eq + 1), &m[k].id)) {
            ts_status st = ts_error(TS_ERR_INVALID_ARG,
                                    "class map: \"%s\" is not name=id with a whole id >= 0 (in \"%s\")", tok, text);
            free(m);
            return st;
        }
        *eq = '\0';
        for (int j = 0; j < k; j++)
            if (strcmp(m[j].name, tok) == 0) {
                ts_status st = ts_error(TS_ERR_INVALID_ARG, "class map: name \"%s\" appears twice", tok);
                free(m);
                return st;
            }
        m[k++].name = tok;
    }
    if (k == 0) {
        free(m);
        return ts_error(TS_ERR_INVALID_ARG, "class map: empty; expected name=id,name=id,...");
    }
    *out = m;
    *n = k;
    return TS_OK;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

ts_status ts_label_parse_color_map(const char *text, ts_label_color **out, int *n)
{
    *out = NULL;
    *n = 0;
    if (!text || !*text) return ts_error(TS_ERR_INVALID_ARG, "colour map: empty; expected #RRGGBB=id,...");
    int count = 1;
    for (const char *p = text; *p; p++) count += *p == ',';
    ts_label_color *m = calloc((size_t)count, sizeof *m);
    if (!m) return ts_error(TS_ERR_NOMEM, "colour map: out of memory");
    int k = 0;
    const char *p = text;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *s = p;
        size_t sl = len;
        if (sl && *s == '#') s++, sl--;
        const char *eq = memchr(s, '=', sl);
        size_t hex = eq ? (size_t)(eq - s) : 0;
        int ok = eq && (hex == 6 || hex == 8);
        uint8_t v[4] = {0, 0, 0, 255};
        for (size_t i = 0; ok && i < hex; i += 2) {
            int hi = hexval(s[i]), lo = hexval(s[i + 1]);
            if (hi < 0 || lo < 0) ok = 0;
            else v[i / 2] = (uint8_t)(hi * 16 + lo);
        }
        if (ok) ok = parse_id(eq + 1, sl - hex - 1, &m[k].id);
        if (!ok) {
            free(m);
            return ts_error(TS_ERR_INVALID_ARG,
                            "colour map: \"%.*s\" is not #RRGGBB=id or #RRGGBBAA=id with a whole id >= 0", (int)len, p);
        }
        m[k].r = v[0], m[k].g = v[1], m[k].b = v[2], m[k].a = v[3];
        m[k].match_alpha = hex == 8;
        k++;
        p += len;
        if (*p == ',') p++;
    }
    *out = m;
    *n = k;
    return TS_OK;
}

/* ---- shared ------------------------------------------------------------ */

static ts_status check_id(const ts_labels *l, int64_t id, const char *what)
{
    if (id == l->o.ignore_id) return TS_OK;
    if (id < 0 || id > INT32_MAX)
        return ts_error(TS_ERR_INVALID_ARG, "labels '%s': %s is class id %" PRId64 "; class ids must be >= 0",
                        l->path, what, id);
    if (l->o.classes > 0 && id >= l->o.classes)
        return ts_error(TS_ERR_INVALID_ARG,
                        "labels '%s': %s is class id %" PRId64 " but there are %d classes; ids must be in [0, %d) "
                        "or the ignore id %d: check the labels or the class count",
                        l->path, what, id, l->o.classes, l->o.classes, (int)l->o.ignore_id);
    return TS_OK;
}

static void window_desc(const ts_window *w, char *buf, size_t n)
{
    snprintf(buf, n, "window (col %" PRId64 ", row %" PRId64 ", %dx%d)", w->col_off, w->row_off, w->width, w->height);
}

/* Binary mapping and the class-count check on a window, in place. */
static ts_status finish_window(const ts_labels *l, const ts_window *w, int32_t *mask)
{
    const int32_t ign = l->o.ignore_id;
    const size_t n = (size_t)w->width * (size_t)w->height;
    for (size_t i = 0; i < n; i++) {
        int32_t v = mask[i];
        if (v == ign) continue;
        if (v < 0 || (l->o.classes > 0 && v >= l->o.classes && !l->o.binary)) {
            char wd[96], what[256];
            window_desc(w, wd, sizeof wd);
            if (l->is_vector)
                snprintf(what, sizeof what, "layer '%s', %s, pixel (col %" PRId64 ", row %" PRId64 ")", l->layer_name, wd,
                         w->col_off + (int64_t)(i % (size_t)w->width), w->row_off + (int64_t)(i / (size_t)w->width));
            else
                snprintf(what, sizeof what, "band %d, %s, pixel (col %" PRId64 ", row %" PRId64 ")",
                         l->o.colors ? 1 : l->o.band, wd, w->col_off + (int64_t)(i % (size_t)w->width),
                         w->row_off + (int64_t)(i / (size_t)w->width));
            return check_id(l, v, what);
        }
        if (l->o.binary && v != 0) mask[i] = 1;
    }
    return TS_OK;
}

static void fill_i32(int32_t *p, size_t n, int32_t v)
{
    for (size_t i = 0; i < n; i++) p[i] = v;
}

static ts_status scratch_reserve(ts_labels *l, size_t bytes)
{
    if (bytes <= l->scratch_bytes) return TS_OK;
    void *p = realloc(l->scratch, bytes);
    if (!p) return ts_error(TS_ERR_NOMEM, "labels '%s': out of memory for a %zu-byte window buffer", l->path, bytes);
    l->scratch = p;
    l->scratch_bytes = bytes;
    return TS_OK;
}

/* ---- raster masks ------------------------------------------------------- */

static int same_grid(const ts_grid *g, GDALDatasetH ds, const double gt[6])
{
    if (GDALGetRasterXSize(ds) != g->width || GDALGetRasterYSize(ds) != g->height) return 0;
    const double px = fabs(g->gt[1]) + fabs(g->gt[2]), py = fabs(g->gt[4]) + fabs(g->gt[5]);
    const double tol[6] = {1e-6 * px, 1e-9 * fabs(g->gt[1]), 1e-9 * px, 1e-6 * py, 1e-9 * py, 1e-9 * fabs(g->gt[5])};
    for (int i = 0; i < 6; i++)
        if (fabs(gt[i] - g->gt[i]) > tol[i]) return 0;
    return 1;
}

/* SRS from WKT with traditional GIS axis order; NULL for NULL/empty WKT. */
static OGRSpatialReferenceH srs_from_wkt(const char *wkt)
{
    if (!wkt || !*wkt) return NULL;
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    if (!s) return NULL;
    if (OSRSetFromUserInput(s, wkt) != OGRERR_NONE) {
        OSRDestroySpatialReference(s);
        return NULL;
    }
    OSRSetAxisMappingStrategy(s, OAMS_TRADITIONAL_GIS_ORDER);
    return s;
}

static ts_status open_raster(ts_labels *l)
{
    const ts_label_opts *o = &l->o;
    const int nb = GDALGetRasterCount(l->ds);
    int src_bands[4];
    if (o->colors) {
        if (nb != 3 && nb != 4)
            return ts_error(TS_ERR_INVALID_ARG,
                            "labels '%s': a colour map needs an RGB or RGBA mask (3 or 4 bands), this one has %d band%s",
                            l->path, nb, nb == 1 ? "" : "s");
        l->nbands = nb;
        for (int i = 0; i < nb; i++) {
            src_bands[i] = i + 1;
            GDALRasterBandH b = GDALGetRasterBand(l->ds, i + 1);
            if (GDALGetRasterDataType(b) != GDT_Byte)
                return ts_error(TS_ERR_INVALID_ARG,
                                "labels '%s': band %d is %s; a colour-coded mask must be 8-bit (Byte) RGB(A)", l->path,
                                i + 1, GDALGetDataTypeName(GDALGetRasterDataType(b)));
        }
    } else {
        if (o->band < 1 || o->band > nb)
            return ts_error(TS_ERR_INVALID_ARG, "labels '%s': band %d does not exist (the mask has %d band%s)", l->path,
                            o->band, nb, nb == 1 ? "" : "s");
        l->nbands = 1;
        src_bands[0] = o->band;
        GDALDataType t = GDALGetRasterDataType(GDALGetRasterBand(l->ds, o->band));
        if (GDALDataTypeIsComplex(t))
            return ts_error(TS_ERR_INVALID_ARG, "labels '%s': band %d is complex (%s); class ids must be real numbers",
                            l->path, o->band, GDALGetDataTypeName(t));
        l->read_double = !(t == GDT_Byte || t == GDT_UInt16 || t == GDT_Int16 || t == GDT_Int32);
        /* The largest id this mask can give. */
        int64_t bound = t == GDT_Byte ? 255 : t == GDT_UInt16 ? 65535 : t == GDT_Int16 ? 32767 : INT32_MAX;
        if (o->classes > 0 && o->classes - 1 < bound) bound = o->classes - 1;
        if (o->binary) bound = 1;
        l->max_id = bound;
    }
    for (int i = 0; i < l->nbands; i++) {
        int has = 0;
        double v = GDALGetRasterNoDataValue(GDALGetRasterBand(l->ds, src_bands[i]), &has);
        l->has_nodata[i] = has;
        l->nodata[i] = v;
    }

    /* Where the mask sits: its geotransform and CRS against the image's. */
    double gt[6];
    const int has_gt = GDALGetGeoTransform(l->ds, gt) == CE_None;
    const char *mask_wkt = GDALGetProjectionRef(l->ds);
    if (mask_wkt && !*mask_wkt) mask_wkt = NULL;
    if (!mask_wkt && l->assume_wkt) mask_wkt = l->assume_wkt; /* the CRS the caller says it is in */
    const char *img_wkt = l->grid.crs_wkt && *l->grid.crs_wkt ? l->grid.crs_wkt : NULL;
    if (!has_gt) {
        if (GDALGetRasterXSize(l->ds) == l->grid.width && GDALGetRasterYSize(l->ds) == l->grid.height) {
            for (int i = 0; i < l->nbands; i++) l->bands[i] = GDALGetRasterBand(l->ds, src_bands[i]);
            return TS_OK; /* same pixel size, no georeferencing: pixel-aligned */
        }
        return ts_error(TS_ERR_INVALID_ARG,
                        "labels '%s': the mask has no georeferencing and its size (%dx%d) differs from the image's "
                        "(%" PRId64 "x%" PRId64 "); add a geotransform (a world file or gdal_translate -a_ullr) or "
                        "resample it to the image",
                        l->path, GDALGetRasterXSize(l->ds), GDALGetRasterYSize(l->ds), l->grid.width, l->grid.height);
    }
    if (!mask_wkt && img_wkt && !o->assume_image_crs)
        return ts_error(TS_ERR_INVALID_ARG,
                        "labels '%s': the mask has no CRS but the image has one; set its CRS (gdal_edit.py -a_srs) or "
                        "say which CRS it is in (--assume-crs EPSG:<code>, or --assume-crs image for the image's)",
                        l->path);
    if (mask_wkt && !img_wkt && !o->assume_image_crs)
        return ts_error(TS_ERR_INVALID_ARG,
                        "labels '%s': the mask has a CRS but the image has none, so it cannot be reprojected; set the "
                        "image's CRS or take the mask to be on the image's CRS (--assume-crs image)",
                        l->path);
    const char *src_wkt = mask_wkt && img_wkt ? mask_wkt : img_wkt; /* assumed: the image's */
    int same_crs = 1;
    if (src_wkt && img_wkt && src_wkt != img_wkt) {
        OGRSpatialReferenceH a = srs_from_wkt(src_wkt), b = srs_from_wkt(img_wkt);
        if (!a || !b) {
            if (a) OSRDestroySpatialReference(a);
            if (b) OSRDestroySpatialReference(b);
            return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot parse the CRS of the mask or the image", l->path);
        }
        same_crs = OSRIsSame(a, b);
        OSRDestroySpatialReference(a);
        OSRDestroySpatialReference(b);
    }
    if (same_crs && same_grid(&l->grid, l->ds, gt)) {
        for (int i = 0; i < l->nbands; i++) l->bands[i] = GDALGetRasterBand(l->ds, src_bands[i]);
        return TS_OK;
    }
    if (l->grid.width > INT_MAX || l->grid.height > INT_MAX)
        return ts_error(TS_ERR_UNSUPPORTED, "labels '%s': the image grid (%" PRId64 "x%" PRId64 ") is too large for GDAL",
                        l->path, l->grid.width, l->grid.height);

    /* The warped VRT: the mask's bands, nearest, onto the image grid, with an
     * alpha band that is 0 outside the mask's footprint. Nodata is compared
     * after warping (nearest copies values exactly), so the warper gets none. */
    char **to = NULL;
    if (src_wkt) to = CSLSetNameValue(to, "SRC_SRS", src_wkt);
    if (img_wkt) to = CSLSetNameValue(to, "DST_SRS", img_wkt);
    void *tr = GDALCreateGenImgProjTransformer2(l->ds, NULL, to);
    CSLDestroy(to);
    if (!tr) return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot build the transform from the mask to the image grid", l->path);
    GDALSetGenImgProjTransformerDstGeoTransform(tr, l->grid.gt);

    GDALWarpOptions *wo = GDALCreateWarpOptions();
    if (!wo) {
        GDALDestroyTransformer(tr);
        return ts_error(TS_ERR_NOMEM, "labels '%s': out of memory", l->path);
    }
    wo->hSrcDS = l->ds;
    wo->eResampleAlg = GRA_NearestNeighbour;
    wo->eWorkingDataType = GDALGetRasterDataType(GDALGetRasterBand(l->ds, src_bands[0]));
    wo->nBandCount = l->nbands;
    wo->panSrcBands = CPLMalloc(sizeof(int) * (size_t)l->nbands);
    wo->panDstBands = CPLMalloc(sizeof(int) * (size_t)l->nbands);
    for (int i = 0; i < l->nbands; i++) {
        wo->panSrcBands[i] = src_bands[i];
        wo->panDstBands[i] = i + 1;
    }
    wo->nDstAlphaBand = l->nbands + 1;
    wo->papszWarpOptions = CSLSetNameValue(wo->papszWarpOptions, "INIT_DEST", "0");
    if (o->max_error > 0) {
        void *approx = GDALCreateApproxTransformer(GDALGenImgProjTransform, tr, o->max_error);
        if (!approx) {
            GDALDestroyTransformer(tr);
            GDALDestroyWarpOptions(wo);
            return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot build the approximate transform", l->path);
        }
        GDALApproxTransformerOwnsSubtransformer(approx, TRUE);
        wo->pfnTransformer = GDALApproxTransform;
        wo->pTransformerArg = approx;
    } else {
        wo->pfnTransformer = GDALGenImgProjTransform;
        wo->pTransformerArg = tr;
    }
    /* The VRT takes over the transformer and a reference on the source. */
    l->vrt = GDALCreateWarpedVRT(l->ds, (int)l->grid.width, (int)l->grid.height, l->grid.gt, wo);
    void *tr_arg = wo->pTransformerArg;
    GDALDestroyWarpOptions(wo);
    if (!l->vrt) {
        GDALDestroyTransformer(tr_arg);
        return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot create the warped VRT onto the image grid", l->path);
    }
    if (img_wkt && GDALSetProjection(l->vrt, img_wkt) != CE_None)
        return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot set the image CRS on the warped VRT", l->path);
    for (int i = 0; i < l->nbands; i++) l->bands[i] = GDALGetRasterBand(l->vrt, i + 1);
    l->alpha = GDALGetRasterBand(l->vrt, l->nbands + 1);
    if (!l->alpha || !l->bands[0])
        return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': the warped VRT lacks its bands", l->path);
    return TS_OK;
}

static int is_nodata(double v, int has, double nodata)
{
    if (!has) return 0;
    if (isnan(nodata)) return isnan(v);
    return v == nodata;
}

/* Reads the part of window w that lies on the image: cols [c0, c0+cw),
 * rows [r0, r0+rh) of the image, into mask at (c0 - col_off, r0 - row_off). */
static ts_status read_raster(ts_labels *l, const ts_window *w, int32_t *mask, int c0, int r0, int cw, int rh)
{
    const ts_label_opts *o = &l->o;
    const size_t n = (size_t)cw * (size_t)rh;
    int32_t *dst = mask + (size_t)(r0 - w->row_off) * (size_t)w->width + (size_t)(c0 - w->col_off);
    const GSpacing line = (GSpacing)w->width;
    char wd[96];
    window_desc(w, wd, sizeof wd);
    const size_t nb = l->o.colors ? (size_t)l->nbands : 1;
    ts_status st = scratch_reserve(l, n * (l->read_double ? sizeof(double) : nb) + n);
    if (st) return st;
    uint8_t *alpha = NULL;
    if (l->alpha) {
        alpha = (uint8_t *)l->scratch + n * (l->read_double ? sizeof(double) : nb);
        if (GDALRasterIO(l->alpha, GF_Read, c0, r0, cw, rh, alpha, cw, rh, GDT_Byte, 0, 0) != CE_None)
            return ts_gdal_error(TS_ERR_IO, "labels '%s': reading the footprint of %s", l->path, wd);
    }

    if (o->colors) {
        uint8_t *rgba = l->scratch;
        for (int b = 0; b < l->nbands; b++)
            if (GDALRasterIO(l->bands[b], GF_Read, c0, r0, cw, rh, rgba + (size_t)b * n, cw, rh, GDT_Byte, 0, 0) !=
                CE_None)
                return ts_gdal_error(TS_ERR_IO, "labels '%s': reading band %d of %s", l->path, b + 1, wd);
        /* Nodata: the RGB bands that have one, all matching (GeoTIFF's one
         * nodata value also lands on the alpha band, where it means nothing). */
        int any_nodata = 0;
        for (int b = 0; b < 3; b++) any_nodata |= l->has_nodata[b];
        const int32_t unknown = o->unknown_color_ignore ? o->ignore_id : o->background_id;
        int last = -1;
        for (int y = 0; y < rh; y++)
            for (int x = 0; x < cw; x++) {
                const size_t i = (size_t)y * (size_t)cw + (size_t)x;
                int32_t *out = dst + (size_t)y * (size_t)line + (size_t)x;
                if (alpha && alpha[i] == 0) {
                    *out = o->ignore_id;
                    continue;
                }
                uint8_t px[4] = {rgba[i], rgba[n + i], rgba[2 * n + i], l->nbands == 4 ? rgba[3 * n + i] : 255};
                if (any_nodata) {
                    int nod = 1;
                    for (int b = 0; b < 3; b++)
                        if (l->has_nodata[b] && !is_nodata(px[b], 1, l->nodata[b])) nod = 0;
                    if (nod) {
                        *out = o->ignore_id;
                        continue;
                    }
                }
                int hit = -1;
                if (last >= 0) {
                    const ts_label_color *c = &o->colors[last];
                    if (c->r == px[0] && c->g == px[1] && c->b == px[2] && (!c->match_alpha || c->a == px[3])) hit = last;
                }
                for (int k = 0; hit < 0 && k < o->n_colors; k++) {
                    const ts_label_color *c = &o->colors[k];
                    if (c->r == px[0] && c->g == px[1] && c->b == px[2] && (!c->match_alpha || c->a == px[3])) hit = k;
                }
                if (hit >= 0) last = hit;
                *out = hit >= 0 ? o->colors[hit].id : unknown;
            }
        return TS_OK;
    }

    const int band = o->band;
    if (!l->read_double) {
        if (GDALRasterIOEx(l->bands[0], GF_Read, c0, r0, cw, rh, dst, cw, rh, GDT_Int32, sizeof(int32_t),
                           line * (GSpacing)sizeof(int32_t), NULL) != CE_None)
            return ts_gdal_error(TS_ERR_IO, "labels '%s': reading band %d of %s", l->path, band, wd);
        for (int y = 0; y < rh; y++)
            for (int x = 0; x < cw; x++) {
                int32_t *out = dst + (size_t)y * (size_t)line + (size_t)x;
                if ((alpha && alpha[(size_t)y * (size_t)cw + (size_t)x] == 0) ||
                    is_nodata((double)*out, l->has_nodata[0], l->nodata[0]))
                    *out = o->ignore_id;
            }
        return TS_OK;
    }
    double *v = l->scratch;
    if (GDALRasterIO(l->bands[0], GF_Read, c0, r0, cw, rh, v, cw, rh, GDT_Float64, 0, 0) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "labels '%s': reading band %d of %s", l->path, band, wd);
    for (int y = 0; y < rh; y++)
        for (int x = 0; x < cw; x++) {
            const size_t i = (size_t)y * (size_t)cw + (size_t)x;
            int32_t *out = dst + (size_t)y * (size_t)line + (size_t)x;
            if ((alpha && alpha[i] == 0) || is_nodata(v[i], l->has_nodata[0], l->nodata[0])) {
                *out = o->ignore_id;
                continue;
            }
            if (!(v[i] == floor(v[i])) || v[i] < 0 || v[i] > INT32_MAX)
                return ts_error(TS_ERR_INVALID_ARG,
                                "labels '%s': band %d, %s, pixel (col %d, row %d) holds %g, which is not a class id "
                                "(a whole number >= 0); set the mask's nodata if it marks missing labels",
                                l->path, band, wd, c0 + x, r0 + y, v[i]);
            *out = (int32_t)v[i];
        }
    return TS_OK;
}

/* ---- vector labels ------------------------------------------------------ */

static const char *field_type_name(OGRFieldType t) { return OGR_GetFieldTypeName(t); }

/* The class of one feature, checked. */
static ts_status feature_value(ts_labels *l, OGRFeatureH f, int32_t *id)
{
    const ts_label_opts *o = &l->o;
    const GIntBig fid = OGR_F_GetFID(f);
    char what[512];
    if (l->field < 0) {
        *id = o->burn;
        return TS_OK;
    }
    if (!OGR_F_IsFieldSetAndNotNull(f, l->field))
        return ts_error(TS_ERR_INVALID_ARG,
                        "labels '%s': layer '%s', feature %" PRId64 ": attribute '%s' is empty (null); give every "
                        "feature a class or remove it",
                        l->path, l->layer_name, (int64_t)fid, o->attribute);
    int64_t v = 0;
    switch (l->field_type) {
    case OFTInteger:
    case OFTInteger64: v = OGR_F_GetFieldAsInteger64(f, l->field); break;
    case OFTReal: {
        double d = OGR_F_GetFieldAsDouble(f, l->field);
        if (!(d == floor(d)) || fabs(d) > 2147483647.0)
            return ts_error(TS_ERR_INVALID_ARG,
                            "labels '%s': layer '%s', feature %" PRId64 ": attribute '%s' is %g, not an integer class "
                            "id",
                            l->path, l->layer_name, (int64_t)fid, o->attribute, d);
        v = (int64_t)d;
        break;
    }
    case OFTString: {
        const char *s = OGR_F_GetFieldAsString(f, l->field);
        int k = 0;
        while (k < o->n_class_map && strcmp(o->class_map[k].name, s) != 0) k++;
        if (k == o->n_class_map) {
            char names[256] = "";
            size_t used = 0;
            for (int j = 0; j < o->n_class_map && used + 1 < sizeof names; j++) {
                int wr = snprintf(names + used, sizeof names - used, "%s%s", j ? ", " : "", o->class_map[j].name);
                if (wr < 0) break;
                used += (size_t)wr;
            }
            return ts_error(TS_ERR_INVALID_ARG,
                            "labels '%s': layer '%s', feature %" PRId64 ": attribute '%s' is \"%s\", which the class "
                            "map does not name (it has: %s); add it to the map (name=id)",
                            l->path, l->layer_name, (int64_t)fid, o->attribute, s, names);
        }
        v = o->class_map[k].id;
        break;
    }
    default:
        return ts_error(TS_ERR_INVALID_ARG, "labels '%s': layer '%s': attribute '%s' is %s, not an integer or a name",
                        l->path, l->layer_name, o->attribute, field_type_name(l->field_type));
    }
    snprintf(what, sizeof what, "layer '%s', feature %" PRId64 ", attribute '%s'", l->layer_name, (int64_t)fid,
             o->attribute);
    ts_status st = check_id(l, v, what);
    if (st) return st;
    *id = (int32_t)v;
    return TS_OK;
}

static int cmp_rank(const void *a, const void *b)
{
    const fid_rank *x = a, *y = b;
    return (x->fid > y->fid) - (x->fid < y->fid);
}

/* What to tell a user whose layer has no CRS. Coordinates within +-180 /
 * +-90 over a projected image are almost surely longitude/latitude: the
 * geographic CRS of the image's datum (SIRGAS 2000, EPSG:4674, under SIRGAS
 * 2000 / UTM 25S) is the likely one, so the hint names it. */
static void missing_crs_hint(ts_labels *l, const char *img_wkt, char *buf, size_t size)
{
    OGREnvelope env;
    int degrees = 0;
    if (OGR_L_GetExtent(l->layer, &env, TRUE) == OGRERR_NONE)
        degrees = env.MinX >= -180.0 && env.MaxX <= 360.0 && env.MinY >= -90.0 && env.MaxY <= 90.0;
    char code[64] = "";
    char name[128] = "";
    OGRSpatialReferenceH img = srs_from_wkt(img_wkt);
    if (degrees && img && OSRIsProjected(img)) {
        OGRSpatialReferenceH geog = OSRCloneGeogCS(img);
        if (geog) {
            const char *auth = OSRGetAuthorityName(geog, NULL), *c = OSRGetAuthorityCode(geog, NULL);
            if (!(auth && c) && OSRAutoIdentifyEPSG(geog) == OGRERR_NONE) {
                auth = OSRGetAuthorityName(geog, NULL);
                c = OSRGetAuthorityCode(geog, NULL);
            }
            if (auth && c) snprintf(code, sizeof code, "%s:%s", auth, c);
            const char *nm = OSRGetName(geog);
            if (nm) snprintf(name, sizeof name, "%s", nm);
            OSRDestroySpatialReference(geog);
        }
    }
    if (img) OSRDestroySpatialReference(img);
    if (degrees && *code)
        snprintf(buf, size,
                 "its coordinates (x %.6g..%.6g, y %.6g..%.6g) look like degrees while the image CRS is projected, so "
                 "they are most likely longitude/latitude on the image's datum: pass --assume-crs %s (%s), or give "
                 "the file that CRS (a .prj next to a shapefile; ogr2ogr -a_srs %s)",
                 env.MinX, env.MaxX, env.MinY, env.MaxY, code, name, code);
    else if (degrees)
        snprintf(buf, size,
                 "its coordinates (x %.6g..%.6g, y %.6g..%.6g) look like degrees: pass --assume-crs with the "
                 "geographic CRS they are in (EPSG:4326 for WGS 84), or give the file a CRS (a .prj next to a "
                 "shapefile; ogr2ogr -a_srs)",
                 env.MinX, env.MaxX, env.MinY, env.MaxY);
    else
        snprintf(buf, size,
                 "give the file a CRS (ogr2ogr -a_srs, or a .prj for a shapefile), or say which CRS it is in "
                 "(--assume-crs EPSG:<code>, or --assume-crs image for the image's)");
}

/* opts.assume_crs -> WKT, checked once at open. */
static ts_status resolve_assumed_crs(ts_labels *l, const char *user)
{
    if (!user) return TS_OK;
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    if (!s) return ts_error(TS_ERR_NOMEM, "labels: out of memory");
    char *wkt = NULL;
    ts_status st = TS_OK;
    CPLErrorReset();
    if (OSRSetFromUserInput(s, user) != OGRERR_NONE)
        st = ts_gdal_error(TS_ERR_INVALID_ARG,
                           "labels '%s': the assumed CRS \"%s\" is not one GDAL knows (give EPSG:<code>, WKT or a "
                           "PROJ string)",
                           l->path, user);
    else if (OSRExportToWkt(s, &wkt) != OGRERR_NONE || !wkt)
        st = ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot write the assumed CRS \"%s\" as WKT", l->path, user);
    else if (!(l->assume_wkt = strdup(wkt)))
        st = ts_error(TS_ERR_NOMEM, "labels: out of memory");
    CPLFree(wkt);
    OSRDestroySpatialReference(s);
    if (!st) l->o.assume_crs = l->assume_wkt;
    return st;
}

static ts_status open_vector(ts_labels *l)
{
    const ts_label_opts *o = &l->o;
    if (o->layer) {
        l->layer = GDALDatasetGetLayerByName(l->ds, o->layer);
        if (!l->layer) {
            char names[512] = "";
            size_t used = 0;
            for (int i = 0; i < GDALDatasetGetLayerCount(l->ds) && used + 1 < sizeof names; i++) {
                int wr = snprintf(names + used, sizeof names - used, "%s%s", i ? ", " : "",
                                  OGR_L_GetName(GDALDatasetGetLayer(l->ds, i)));
                if (wr < 0) break;
                used += (size_t)wr;
            }
            return ts_error(TS_ERR_INVALID_ARG, "labels '%s': no layer '%s' (layers: %s)", l->path, o->layer, names);
        }
    } else {
        if (GDALDatasetGetLayerCount(l->ds) < 1)
            return ts_error(TS_ERR_INVALID_ARG, "labels '%s': no raster bands and no vector layers", l->path);
        l->layer = GDALDatasetGetLayer(l->ds, 0);
    }
    l->layer_name = OGR_L_GetName(l->layer);

    /* CRS: reproject to the image's, or refuse. */
    OGRSpatialReferenceH lsrs = OGR_L_GetSpatialRef(l->layer);
    const char *img_wkt = l->grid.crs_wkt && *l->grid.crs_wkt ? l->grid.crs_wkt : NULL;
    OGRSpatialReferenceH assumed = NULL; /* the layer's CRS when the caller named it */
    if (!lsrs && l->assume_wkt) {
        if (!(assumed = srs_from_wkt(l->assume_wkt)))
            return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot use the assumed CRS", l->path);
        lsrs = assumed;
    }
    if (!lsrs && !o->assume_image_crs && img_wkt) {
        char hint[512];
        missing_crs_hint(l, img_wkt, hint, sizeof hint);
        return ts_error(TS_ERR_INVALID_ARG, "labels '%s': layer '%s' has no CRS, so it cannot be placed on the image; %s",
                        l->path, l->layer_name, hint);
    }
    if (lsrs && !img_wkt && !o->assume_image_crs) {
        if (assumed) OSRDestroySpatialReference(assumed);
        return ts_error(TS_ERR_INVALID_ARG,
                        "labels '%s': layer '%s' has a CRS but the image has none, so it cannot be reprojected; set "
                        "the image's CRS (gdal_edit.py -a_srs) or take the labels to be on the image's grid "
                        "(--assume-crs image)",
                        l->path, l->layer_name);
    }
    if (lsrs && img_wkt) {
        OGRSpatialReferenceH a = OSRClone(lsrs), b = srs_from_wkt(img_wkt);
        if (assumed) OSRDestroySpatialReference(assumed);
        assumed = NULL;
        if (!a || !b) {
            if (a) OSRDestroySpatialReference(a);
            if (b) OSRDestroySpatialReference(b);
            return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot read the CRS of layer '%s' or of the image",
                                 l->path, l->layer_name);
        }
        OSRSetAxisMappingStrategy(a, OAMS_TRADITIONAL_GIS_ORDER);
        if (!OSRIsSame(a, b)) {
            l->to_image = OCTNewCoordinateTransformation(a, b);
            l->to_layer = OCTNewCoordinateTransformation(b, a);
        }
        int fail = !OSRIsSame(a, b) && (!l->to_image || !l->to_layer);
        OSRDestroySpatialReference(a);
        OSRDestroySpatialReference(b);
        if (fail)
            return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot reproject layer '%s' to the image CRS", l->path,
                                 l->layer_name);
    }
    if (assumed) OSRDestroySpatialReference(assumed);

    /* The class attribute. */
    OGRFeatureDefnH defn = OGR_L_GetLayerDefn(l->layer);
    l->field = -1;
    if (o->attribute) {
        l->field = OGR_FD_GetFieldIndex(defn, o->attribute);
        if (l->field < 0) {
            char names[512] = "";
            size_t used = 0;
            for (int i = 0; i < OGR_FD_GetFieldCount(defn) && used + 1 < sizeof names; i++) {
                int wr = snprintf(names + used, sizeof names - used, "%s%s", i ? ", " : "",
                                  OGR_Fld_GetNameRef(OGR_FD_GetFieldDefn(defn, i)));
                if (wr < 0) break;
                used += (size_t)wr;
            }
            return ts_error(TS_ERR_INVALID_ARG, "labels '%s': layer '%s' has no attribute '%s' (attributes: %s)",
                            l->path, l->layer_name, o->attribute, used ? names : "none");
        }
        l->field_type = OGR_Fld_GetType(OGR_FD_GetFieldDefn(defn, l->field));
        if (l->field_type == OFTString && !o->class_map)
            return ts_error(TS_ERR_INVALID_ARG,
                            "labels '%s': layer '%s': attribute '%s' holds names (String); give a class map "
                            "(--class-map name=id,...) to turn them into class ids",
                            l->path, l->layer_name, o->attribute);
        if (l->field_type != OFTString && o->class_map)
            return ts_error(TS_ERR_INVALID_ARG,
                            "labels '%s': layer '%s': attribute '%s' is %s; a class map applies to string attributes "
                            "only",
                            l->path, l->layer_name, o->attribute, field_type_name(l->field_type));
        if (l->field_type != OFTString && l->field_type != OFTInteger && l->field_type != OFTInteger64 &&
            l->field_type != OFTReal)
            return ts_error(TS_ERR_INVALID_ARG,
                            "labels '%s': layer '%s': attribute '%s' is %s, not an integer class id", l->path,
                            l->layer_name, o->attribute, field_type_name(l->field_type));
    } else {
        ts_status st = check_id(l, o->burn, "the burn value");
        if (st) return st;
    }
    ts_status st = check_id(l, o->background_id, "the background id");
    if (st) return st;

    /* Window reads skip every other field (set after the pass below). */
    const int nf = OGR_FD_GetFieldCount(defn);
    char **ignored = NULL;
    for (int i = 0; i < nf; i++)
        if (i != l->field) ignored = CSLAddString(ignored, OGR_Fld_GetNameRef(OGR_FD_GetFieldDefn(defn, i)));
    ignored = CSLAddString(ignored, "OGR_STYLE");

    /* One pass over every feature: check each class now, and learn whether
     * FIDs follow the layer order.
     *
     * The layer order is the order gdal_rasterize sees, so this pass reads
     * the layer exactly as it does: every field and the geometry, no
     * ignored fields, no spatial filter. It must not ignore fields: the
     * sequential order is not a property of the layer alone but of the
     * query the driver runs. A GeoPackage reading only the FID and the
     * class attribute is "SELECT fid, cls FROM t", which SQLite answers
     * from any index holding cls (a covering-index scan) in cls order,
     * while gdal_rasterize's "SELECT fid, geom, cls, ... FROM t" scans the
     * table in FID order. With an index on the class attribute, this pass
     * then saw FIDs out of order, ranked features by class, and every
     * overlap was burned in the wrong order (tests/test_labels.c,
     * test_overlap_stress, "indexed class attribute"). */
    OGR_L_SetIgnoredFields(l->layer, NULL);
    int64_t max_id = o->background_id > o->ignore_id ? o->background_id : o->ignore_id;
    int64_t count = 0;
    int monotonic = 1;
    GIntBig prev = 0;
    size_t cap = 0;
    OGR_L_SetSpatialFilter(l->layer, NULL);
    CPLErrorReset();
    OGR_L_ResetReading(l->layer);
    OGRFeatureH f;
    st = TS_OK;
    while (!st && (f = OGR_L_GetNextFeature(l->layer)) != NULL) {
        int32_t id = 0;
        st = feature_value(l, f, &id);
        if (!st && id > max_id) max_id = id;
        const GIntBig fid = OGR_F_GetFID(f);
        OGR_F_Destroy(f);
        if (st) break;
        if (fid == OGRNullFID || (count > 0 && fid <= prev)) monotonic = 0;
        prev = fid;
        if ((size_t)count == cap) {
            size_t nc = cap ? 2 * cap : 1024;
            fid_rank *p = realloc(l->ranks, nc * sizeof *p);
            if (!p) {
                st = ts_error(TS_ERR_NOMEM, "labels '%s': out of memory listing features", l->path);
                break;
            }
            l->ranks = p;
            cap = nc;
        }
        l->ranks[count].fid = fid;
        l->ranks[count].rank = count;
        count++;
    }
    OGR_L_SetIgnoredFields(l->layer, (const char **)ignored);
    CSLDestroy(ignored);
    if (!st && CPLGetLastErrorType() == CE_Failure)
        st = ts_gdal_error(TS_ERR_IO, "labels '%s': reading layer '%s'", l->path, l->layer_name);
    if (st) return st;
    if (!l->o.attribute && l->o.burn > max_id) max_id = l->o.burn;
    l->max_id = o->binary ? (o->ignore_id > 1 ? o->ignore_id : 1) : max_id;
    l->n_ranks = count;
    if (monotonic) {
        l->order_mode = ORDER_FID;
        free(l->ranks);
        l->ranks = NULL;
    } else {
        qsort(l->ranks, (size_t)count, sizeof *l->ranks, cmp_rank);
        l->order_mode = ORDER_RANK;
        for (int64_t i = 1; i < count; i++)
            if (l->ranks[i].fid == l->ranks[i - 1].fid || l->ranks[i].fid == OGRNullFID) l->order_mode = ORDER_NOFILTER;
        if (count && l->ranks[0].fid == OGRNullFID) l->order_mode = ORDER_NOFILTER;
        if (l->order_mode == ORDER_NOFILTER) {
            free(l->ranks);
            l->ranks = NULL;
        }
    }

    /* geo -> image pixel, built as GDALRasterizeGeometries builds it for the
     * whole image, so every window sees exactly the whole-image pixel
     * coordinates shifted by whole numbers. */
    if (l->grid.width > INT_MAX || l->grid.height > INT_MAX)
        return ts_error(TS_ERR_UNSUPPORTED, "labels '%s': the image grid (%" PRId64 "x%" PRId64 ") is too large for GDAL",
                        l->path, l->grid.width, l->grid.height);
    GDALDriverH mem = GDALGetDriverByName("MEM");
    if (!mem) return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': GDAL's MEM driver is missing", l->path);
    l->grid_ds = GDALCreate(mem, "", (int)l->grid.width, (int)l->grid.height, 0, GDT_Byte, NULL);
    if (!l->grid_ds || GDALSetGeoTransform(l->grid_ds, l->grid.gt) != CE_None)
        return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot create the image-grid reference", l->path);
    l->grid_tr = GDALCreateGenImgProjTransformer2(NULL, l->grid_ds, NULL);
    if (!l->grid_tr) return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot build the geo-to-pixel transform", l->path);
    return TS_OK;
}

typedef struct window_tr {
    void *grid_tr;
    double col_off, row_off;
} window_tr;

/* Image pixel coordinates minus the window offset (an exact subtraction). */
static int window_transform(void *arg, int dst_to_src, int n, double *x, double *y, double *z, int *ok)
{
    window_tr *t = arg;
    if (dst_to_src) {
        for (int i = 0; i < n; i++) x[i] += t->col_off, y[i] += t->row_off;
        return GDALGenImgProjTransform(t->grid_tr, TRUE, n, x, y, z, ok);
    }
    int r = GDALGenImgProjTransform(t->grid_tr, FALSE, n, x, y, z, ok);
    for (int i = 0; i < n; i++) x[i] -= t->col_off, y[i] -= t->row_off;
    return r;
}

/* A total order: qsort is not stable, so equal keys would leave the burn
 * order of those features to the sort's internals. order is unique except
 * for features absent when the labels were opened (rank INT64_MAX); those
 * go last by FID (where an appending driver puts them). */
static int cmp_item(const void *a, const void *b)
{
    const burn_item *x = a, *y = b;
    if (x->order != y->order) return (x->order > y->order) - (x->order < y->order);
    return (x->fid > y->fid) - (x->fid < y->fid);
}

static void free_items(ts_labels *l)
{
    for (size_t i = 0; i < l->n_items; i++) OGR_G_DestroyGeometry(l->items[i].geom);
    l->n_items = 0;
}

static int64_t rank_of(const ts_labels *l, GIntBig fid)
{
    int64_t lo = 0, hi = l->n_ranks - 1;
    while (lo <= hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (l->ranks[mid].fid == fid) return l->ranks[mid].rank;
        if (l->ranks[mid].fid < fid) lo = mid + 1;
        else hi = mid - 1;
    }
    return INT64_MAX; /* a feature added since opening: last */
}

static ts_status read_vector(ts_labels *l, const ts_window *w, int32_t *mask, int c0, int r0, int cw, int rh)
{
    char wd[96];
    window_desc(w, wd, sizeof wd);
    /* The window's extent (padded by a pixel) in the layer's CRS. */
    if (l->order_mode != ORDER_NOFILTER) {
        double xs[4], ys[4];
        const double cc[4] = {c0 - 1.0, c0 + cw + 1.0, c0 - 1.0, c0 + cw + 1.0};
        const double rr[4] = {r0 - 1.0, r0 - 1.0, r0 + rh + 1.0, r0 + rh + 1.0};
        const double *g = l->grid.gt;
        double minx = HUGE_VAL, miny = HUGE_VAL, maxx = -HUGE_VAL, maxy = -HUGE_VAL;
        for (int i = 0; i < 4; i++) {
            xs[i] = g[0] + cc[i] * g[1] + rr[i] * g[2];
            ys[i] = g[3] + cc[i] * g[4] + rr[i] * g[5];
            minx = fmin(minx, xs[i]), maxx = fmax(maxx, xs[i]);
            miny = fmin(miny, ys[i]), maxy = fmax(maxy, ys[i]);
        }
        int filter = 1;
        if (l->to_layer) {
            double a, b, c, d;
            CPLErrorReset();
            if (OCTTransformBounds(l->to_layer, minx, miny, maxx, maxy, &a, &b, &c, &d, 21)) {
                minx = a, miny = b, maxx = c, maxy = d;
            } else {
                filter = 0; /* outside the projection's domain: read everything, let the rasterizer clip */
                CPLErrorReset();
            }
        }
        if (filter && minx <= maxx && miny <= maxy)
            OGR_L_SetSpatialFilterRect(l->layer, minx, miny, maxx, maxy);
        else
            OGR_L_SetSpatialFilter(l->layer, NULL);
    }

    CPLErrorReset();
    OGR_L_ResetReading(l->layer);
    OGRFeatureH f;
    int64_t seq = 0;
    ts_status st = TS_OK;
    while ((f = OGR_L_GetNextFeature(l->layer)) != NULL) {
        OGRGeometryH g = OGR_F_StealGeometry(f);
        int32_t id = 0;
        if (g) st = feature_value(l, f, &id);
        const GIntBig fid = OGR_F_GetFID(f);
        OGR_F_Destroy(f);
        if (st) {
            OGR_G_DestroyGeometry(g);
            break;
        }
        if (!g) continue;
        if (OGR_G_IsEmpty(g) || (l->to_image && OGR_G_Transform(g, l->to_image) != OGRERR_NONE)) {
            OGR_G_DestroyGeometry(g); /* gdal_rasterize skips what it cannot reproject */
            CPLErrorReset();
            continue;
        }
        if (l->n_items == l->cap_items) {
            size_t nc = l->cap_items ? 2 * l->cap_items : 256;
            burn_item *p = realloc(l->items, nc * sizeof *p);
            if (!p) {
                OGR_G_DestroyGeometry(g);
                st = ts_error(TS_ERR_NOMEM, "labels '%s': out of memory collecting the features of %s", l->path, wd);
                break;
            }
            l->items = p;
            l->cap_items = nc;
        }
        burn_item *it = &l->items[l->n_items++];
        it->geom = g;
        it->value = (double)id;
        it->fid = fid;
        it->order = l->order_mode == ORDER_FID ? (int64_t)fid : l->order_mode == ORDER_RANK ? rank_of(l, fid) : seq;
        seq++;
    }
    if (!st && CPLGetLastErrorType() == CE_Failure)
        st = ts_gdal_error(TS_ERR_IO, "labels '%s': reading layer '%s' for %s", l->path, l->layer_name, wd);
    if (st) {
        free_items(l);
        return st;
    }
    if (l->order_mode != ORDER_NOFILTER && l->n_items > 1) qsort(l->items, l->n_items, sizeof *l->items, cmp_item);

    int32_t *dst = mask + (size_t)(r0 - w->row_off) * (size_t)w->width + (size_t)(c0 - w->col_off);
    for (int y = 0; y < rh; y++) fill_i32(dst + (size_t)y * (size_t)w->width, (size_t)cw, l->o.background_id);
    if (l->n_items == 0) return TS_OK;
    if (l->n_items > INT_MAX) {
        free_items(l);
        return ts_error(TS_ERR_UNSUPPORTED, "labels '%s': more than %d features in %s", l->path, INT_MAX, wd);
    }

    /* A MEM dataset over the caller's buffer. */
    GDALDriverH mem = GDALGetDriverByName("MEM");
    GDALDatasetH ds = mem ? GDALCreate(mem, "", cw, rh, 0, GDT_Int32, NULL) : NULL;
    if (!ds) {
        free_items(l);
        return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot create the %s raster", l->path, wd);
    }
    char opt_ptr[64], opt_line[64], opt_pix[32];
    snprintf(opt_ptr, sizeof opt_ptr, "DATAPOINTER=%p", (void *)dst);
    snprintf(opt_pix, sizeof opt_pix, "PIXELOFFSET=%zu", sizeof(int32_t));
    snprintf(opt_line, sizeof opt_line, "LINEOFFSET=%zu", (size_t)w->width * sizeof(int32_t));
    char *band_opts[] = {opt_ptr, opt_pix, opt_line, NULL};
    double wgt[6];
    const ts_window sub = {c0, r0, cw, rh};
    ts_grid_window_gt(&l->grid, &sub, wgt);
    if (GDALAddBand(ds, GDT_Int32, band_opts) != CE_None || GDALSetGeoTransform(ds, wgt) != CE_None) {
        GDALClose(ds);
        free_items(l);
        return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': cannot set up the %s raster", l->path, wd);
    }

    OGRGeometryH *geoms = malloc(l->n_items * sizeof *geoms);
    double *values = malloc(l->n_items * sizeof *values);
    if (!geoms || !values) {
        free(geoms);
        free(values);
        GDALClose(ds);
        free_items(l);
        return ts_error(TS_ERR_NOMEM, "labels '%s': out of memory rasterizing %s", l->path, wd);
    }
    for (size_t i = 0; i < l->n_items; i++) geoms[i] = l->items[i].geom, values[i] = l->items[i].value;
    window_tr tr = {l->grid_tr, (double)c0, (double)r0};
    char *ropts[] = {l->o.all_touched ? "ALL_TOUCHED=TRUE" : "ALL_TOUCHED=FALSE", NULL};
    int band = 1;
    CPLErr e = GDALRasterizeGeometries(ds, 1, &band, (int)l->n_items, geoms, window_transform, &tr, values, ropts,
                                       NULL, NULL);
    free(geoms);
    free(values);
    free_items(l);
    if (e == CE_None) GDALFlushCache(ds);
    GDALClose(ds);
    if (e != CE_None) return ts_gdal_error(TS_ERR_BACKEND, "labels '%s': rasterizing layer '%s' onto %s", l->path, l->layer_name, wd);
    return TS_OK;
}

/* ---- open / read / close ------------------------------------------------ */

static char *dup_str(const char *s)
{
    return s ? strdup(s) : NULL;
}

static ts_status copy_opts(ts_labels *l, const ts_label_opts *o)
{
    l->o = *o;
    l->o.layer = l->o.attribute = NULL;
    l->o.assume_crs = NULL; /* resolved to WKT by resolve_assumed_crs */
    l->o.colors = NULL;
    l->o.class_map = NULL;
    if ((o->layer && !(l->o_layer = dup_str(o->layer))) || (o->attribute && !(l->o_attribute = dup_str(o->attribute))))
        return ts_error(TS_ERR_NOMEM, "labels: out of memory");
    l->o.layer = l->o_layer;
    l->o.attribute = l->o_attribute;
    if (o->colors && o->n_colors > 0) {
        if (!(l->o_colors = malloc((size_t)o->n_colors * sizeof *l->o_colors)))
            return ts_error(TS_ERR_NOMEM, "labels: out of memory");
        memcpy(l->o_colors, o->colors, (size_t)o->n_colors * sizeof *l->o_colors);
        l->o.colors = l->o_colors;
    }
    if (o->class_map && o->n_class_map > 0) {
        size_t bytes = (size_t)o->n_class_map * sizeof *l->o_class_map;
        for (int i = 0; i < o->n_class_map; i++) bytes += strlen(o->class_map[i].name ? o->class_map[i].name : "") + 1;
        if (!(l->o_class_map = malloc(bytes))) return ts_error(TS_ERR_NOMEM, "labels: out of memory");
        char *s = (char *)(l->o_class_map + o->n_class_map);
        for (int i = 0; i < o->n_class_map; i++) {
            const char *name = o->class_map[i].name ? o->class_map[i].name : "";
            size_t n = strlen(name) + 1;
            memcpy(s, name, n);
            l->o_class_map[i].name = s;
            l->o_class_map[i].id = o->class_map[i].id;
            s += n;
        }
        l->o.class_map = l->o_class_map;
    }
    return TS_OK;
}

ts_status ts_labels_open(const char *path, const ts_grid *image_grid, const ts_label_opts *opts, ts_labels **out)
{
    *out = NULL;
    ts_label_opts defaults;
    ts_label_opts_init(&defaults);
    const ts_label_opts *o = opts ? opts : &defaults;
    if (!path || !image_grid) return ts_error(TS_ERR_INVALID_ARG, "labels: no path or image grid");
    if (image_grid->width <= 0 || image_grid->height <= 0)
        return ts_error(TS_ERR_INVALID_ARG, "labels '%s': the image grid is empty (%" PRId64 "x%" PRId64 ")", path,
                        image_grid->width, image_grid->height);
    if (o->ignore_id < 0)
        return ts_error(TS_ERR_INVALID_ARG, "labels '%s': the ignore id must be >= 0, got %d", path, (int)o->ignore_id);
    if (o->background_id < 0)
        return ts_error(TS_ERR_INVALID_ARG, "labels '%s': the background id must be >= 0, got %d", path,
                        (int)o->background_id);
    if (o->classes < 0)
        return ts_error(TS_ERR_INVALID_ARG, "labels '%s': the class count must be >= 0, got %d", path, o->classes);
    if ((o->colors != NULL) != (o->n_colors > 0) || (o->class_map != NULL) != (o->n_class_map > 0))
        return ts_error(TS_ERR_INVALID_ARG, "labels '%s': a colour or class map with no entries", path);
    if (o->colors)
        for (int i = 0; i < o->n_colors; i++)
            if (o->colors[i].id < 0)
                return ts_error(TS_ERR_INVALID_ARG, "labels '%s': colour map entry %d has id %d; ids must be >= 0",
                                path, i, (int)o->colors[i].id);

    ts_gdal_init();
    ts_labels *l = calloc(1, sizeof *l);
    if (!l) return ts_error(TS_ERR_NOMEM, "labels '%s': out of memory", path);
    ts_status st = TS_OK;
    if (!(l->path = strdup(path))) st = ts_error(TS_ERR_NOMEM, "labels '%s': out of memory", path);
    if (!st) st = ts_grid_copy(&l->grid, image_grid);
    if (!st) st = copy_opts(l, o);
    if (st) {
        ts_labels_close(l);
        return st;
    }
    st = resolve_assumed_crs(l, o->assume_crs);
    if (st) {
        ts_labels_close(l);
        return st;
    }
    CPLErrorReset();
    l->ds = GDALOpenEx(path, GDAL_OF_RASTER | GDAL_OF_VECTOR | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!l->ds) {
        VSIStatBufL sb;
        if (VSIStatL(path, &sb) != 0)
            st = ts_error(TS_ERR_IO, "labels '%s': no such file (check the path)", path);
        else
            st = ts_gdal_error(TS_ERR_IO,
                               "labels '%s': cannot open it as a raster mask or a vector layer (not a format GDAL "
                               "reads, or damaged)",
                               path);
        ts_labels_close(l);
        return st;
    }
    l->is_vector = o->layer != NULL || GDALGetRasterCount(l->ds) == 0;
    if (l->is_vector) {
        if (o->colors) st = ts_error(TS_ERR_INVALID_ARG, "labels '%s': a colour map applies to raster masks, this is vector data", path);
        if (!st) st = open_vector(l);
    } else {
        if (o->attribute || o->class_map)
            st = ts_error(TS_ERR_INVALID_ARG,
                          "labels '%s': a class attribute or class map applies to vector labels, this is a raster mask",
                          path);
        if (!st) st = check_id(l, o->background_id, "the background id");
        for (int i = 0; !st && o->colors && i < o->n_colors; i++) {
            char what[64];
            snprintf(what, sizeof what, "colour map entry %d", i);
            st = check_id(l, o->colors[i].id, what);
        }
        if (!st) st = open_raster(l);
        if (!st && o->colors) {
            int64_t m = o->ignore_id > o->background_id ? o->ignore_id : o->background_id;
            for (int i = 0; i < o->n_colors; i++)
                if (o->colors[i].id > m) m = o->colors[i].id;
            l->max_id = o->binary ? (o->ignore_id > 1 ? o->ignore_id : 1) : m;
        } else if (!st && o->ignore_id > l->max_id) {
            l->max_id = o->ignore_id;
        }
    }
    if (st) {
        ts_labels_close(l);
        return st;
    }
    *out = l;
    return TS_OK;
}

ts_status ts_labels_read(ts_labels *l, const ts_window *w, int32_t *mask)
{
    if (!l || !w || !mask) return ts_error(TS_ERR_INVALID_ARG, "labels: read needs labels, a window and a buffer");
    if (w->width <= 0 || w->height <= 0)
        return ts_error(TS_ERR_INVALID_ARG, "labels '%s': window %dx%d is empty", l->path, w->width, w->height);
    /* The part of the window on the image; the rest is ignore. */
    const int64_t c0 = w->col_off > 0 ? w->col_off : 0, r0 = w->row_off > 0 ? w->row_off : 0;
    int64_t c1 = w->col_off + w->width, r1 = w->row_off + w->height;
    if (c1 > l->grid.width) c1 = l->grid.width;
    if (r1 > l->grid.height) r1 = l->grid.height;
    const size_t n = (size_t)w->width * (size_t)w->height;
    if (c1 <= c0 || r1 <= r0) {
        fill_i32(mask, n, l->o.ignore_id);
        return TS_OK;
    }
    if (c0 != w->col_off || r0 != w->row_off || c1 - c0 != w->width || r1 - r0 != w->height)
        fill_i32(mask, n, l->o.ignore_id);
    CPLErrorReset();
    ts_status st = l->is_vector ? read_vector(l, w, mask, (int)c0, (int)r0, (int)(c1 - c0), (int)(r1 - r0))
                                : read_raster(l, w, mask, (int)c0, (int)r0, (int)(c1 - c0), (int)(r1 - r0));
    if (st) return st;
    return finish_window(l, w, mask);
}

void ts_labels_close(ts_labels *l)
{
    if (!l) return;
    free_items(l);
    free(l->items);
    if (l->grid_tr) GDALDestroyGenImgProjTransformer(l->grid_tr);
    if (l->grid_ds) GDALClose(l->grid_ds);
    if (l->to_image) OCTDestroyCoordinateTransformation(l->to_image);
    if (l->to_layer) OCTDestroyCoordinateTransformation(l->to_layer);
    if (l->vrt) GDALClose(l->vrt); /* before the source it references */
    if (l->ds) GDALClose(l->ds);
    free(l->ranks);
    free(l->scratch);
    free(l->o_layer);
    free(l->o_attribute);
    free(l->assume_wkt);
    free(l->o_colors);
    free(l->o_class_map);
    ts_grid_free(&l->grid);
    free(l->path);
    free(l);
}
