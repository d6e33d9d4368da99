/* Data QC: label histograms per split, class weights and geometry checks
 * (see qc.h). */
#include "io/qc.h"

#include <cJSON.h>
#include <cpl_conv.h>
#include <cpl_error.h>
#include <gdal.h>
#include <inttypes.h>
#include <math.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <omp.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- counts ---------------------------------------------------------------- */

ts_status ts_qc_counts_init(ts_qc_counts *c, int classes)
{
    memset(c, 0, sizeof *c);
    if (classes < 1) return ts_error(TS_ERR_INVALID_ARG, "qc: the class count must be >= 1, got %d", classes);
    c->classes = classes;
    if (!(c->hist = calloc((size_t)classes, sizeof *c->hist))) return ts_error(TS_ERR_NOMEM, "qc: out of memory");
    return TS_OK;
}

void ts_qc_counts_free(ts_qc_counts *c)
{
    free(c->hist);
    memset(c, 0, sizeof *c);
}

void ts_qc_counts_clear(ts_qc_counts *c)
{
    uint64_t *h = c->hist;
    int k = c->classes;
    memset(c, 0, sizeof *c);
    c->hist = h;
    c->classes = k;
    if (h) memset(h, 0, (size_t)k * sizeof *h);
}

/* Adds `pixels` of id to the list of the smallest distinct out-of-range ids.
 * Keeping the smallest TS_QC_MAX_BAD_IDS per thread and again when merging
 * lists the globally smallest ones with complete counts, whatever the split
 * of the work between threads. */
static void bad_add(ts_qc_counts *c, int64_t id, uint64_t pixels)
{
    int lo = 0, hi = c->n_bad;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (c->bad[mid].id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < c->n_bad && c->bad[lo].id == id) {
        c->bad[lo].pixels += pixels;
        return;
    }
    if (lo == TS_QC_MAX_BAD_IDS) {
        c->bad_truncated = 1;
        return;
    }
    if (c->n_bad == TS_QC_MAX_BAD_IDS) {
        c->bad_truncated = 1; /* the largest one drops out */
        c->n_bad--;
    }
    memmove(&c->bad[lo + 1], &c->bad[lo], (size_t)(c->n_bad - lo) * sizeof c->bad[0]);
    c->bad[lo].id = id;
    c->bad[lo].pixels = pixels;
    c->n_bad++;
}

void ts_qc_counts_add(ts_qc_counts *c, const int32_t *labels, const uint8_t *valid, size_t n, int32_t ignore_id,
                      int32_t background)
{
    const int32_t k = c->classes;
    c->windows++;
    c->pixels += n;
    for (size_t i = 0; i < n; i++) {
        const int ok = !valid || valid[i];
        c->nodata += !ok;
        const int32_t id = labels[i];
        if (id == ignore_id) {
            c->ignore++;
        } else if (id < 0 || id >= k) {
            c->out_of_range++;
            bad_add(c, id, 1);
        } else {
            if (background < 0 || id != background) c->labelled++;
            if (ok)
                c->hist[id]++;
            else
                c->masked++;
        }
    }
}

void ts_qc_counts_merge(ts_qc_counts *dst, const ts_qc_counts *src)
{
    dst->windows += src->windows;
    dst->pixels += src->pixels;
    dst->nodata += src->nodata;
    dst->ignore += src->ignore;
    dst->out_of_range += src->out_of_range;
    dst->masked += src->masked;
    dst->labelled += src->labelled;
    for (int i = 0; i < dst->classes && i < src->classes; i++) dst->hist[i] += src->hist[i];
    for (int i = 0; i < src->n_bad; i++) bad_add(dst, src->bad[i].id, src->bad[i].pixels);
    if (src->bad_truncated) dst->bad_truncated = 1;
}

static uint64_t hist_sum(const ts_qc_counts *c)
{
    uint64_t s = 0;
    for (int i = 0; i < c->classes; i++) s += c->hist[i];
    return s;
}

/* ---- class weights ------------------------------------------------------------ */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int ts_qc_class_weights(const uint64_t *hist, int classes, ts_qc_weighting kind, double *w)
{
    uint64_t total = 0;
    int present = 0;
    for (int c = 0; c < classes; c++) {
        total += hist[c];
        present += hist[c] > 0;
        w[c] = 0.0;
    }
    if (!present) return 0;
    double *f = malloc((size_t)present * sizeof *f);
    if (!f) return 0;
    int k = 0;
    for (int c = 0; c < classes; c++)
        if (hist[c]) f[k++] = (double)hist[c] / (double)total;
    if (kind == TS_QC_WEIGHTS_MEDIAN_FREQUENCY) {
        qsort(f, (size_t)present, sizeof *f, cmp_double);
        double med = present % 2 ? f[present / 2] : 0.5 * (f[present / 2 - 1] + f[present / 2]);
        for (int c = 0; c < classes; c++)
            if (hist[c]) w[c] = med / ((double)hist[c] / (double)total);
    } else {
        double mean_inv = 0.0;
        for (int i = 0; i < present; i++) mean_inv += 1.0 / f[i];
        mean_inv /= present;
        for (int c = 0; c < classes; c++)
            if (hist[c]) w[c] = (1.0 / ((double)hist[c] / (double)total)) / mean_inv;
    }
    free(f);
    return present;
}

/* ---- the report ------------------------------------------------------------------ */

void ts_qc_report_init(ts_qc_report *r)
{
    memset(r, 0, sizeof *r);
    r->labels_vector = -1;
    r->weights_basis = "all";
}

void ts_qc_report_free(ts_qc_report *r)
{
    free(r->image);
    free(r->labels);
    free(r->image_crs);
    free(r->labels_crs);
    ts_qc_counts_free(&r->total);
    for (int s = 0; s < TS_SPLIT_COUNT; s++) ts_qc_counts_free(&r->split[s]);
    free(r->weights_median);
    free(r->weights_inverse);
    free(r->findings);
    ts_qc_report_init(r);
}

ts_status ts_qc_add_finding(ts_qc_report *r, ts_qc_level level, const char *code, const char *fmt, ...)
{
    if (r->n_findings == r->cap_findings) {
        int cap = r->cap_findings ? 2 * r->cap_findings : 16;
        ts_qc_finding *f = realloc(r->findings, (size_t)cap * sizeof *f);
        if (!f) return ts_error(TS_ERR_NOMEM, "qc: out of memory");
        r->findings = f;
        r->cap_findings = cap;
    }
    ts_qc_finding *f = &r->findings[r->n_findings++];
    f->level = level;
    snprintf(f->code, sizeof f->code, "%s", code);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->message, sizeof f->message, fmt, ap);
    va_end(ap);
    r->errors += level == TS_QC_ERROR;
    r->warnings += level == TS_QC_WARNING;
    return TS_OK;
}

const ts_qc_finding *ts_qc_find(const ts_qc_report *r, const char *code)
{
    for (int i = 0; i < r->n_findings; i++)
        if (strcmp(r->findings[i].code, code) == 0) return &r->findings[i];
    return NULL;
}

int ts_qc_exit_code(const ts_qc_report *r, int strict) { return r->errors > 0 || (strict && r->warnings > 0) ? 1 : 0; }

/* ---- geometry checks -------------------------------------------------------------- */

static OGRSpatialReferenceH srs_from(const char *text)
{
    if (!text || !*text) return NULL;
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    if (!s) return NULL;
    if (OSRSetFromUserInput(s, text) != OGRERR_NONE) {
        OSRDestroySpatialReference(s);
        return NULL;
    }
    OSRSetAxisMappingStrategy(s, OAMS_TRADITIONAL_GIS_ORDER);
    return s;
}

/* "SIRGAS 2000 / UTM zone 25S (EPSG:31985)". */
static char *srs_describe(OGRSpatialReferenceH s)
{
    char buf[256];
    const char *name = OSRGetName(s);
    const char *auth = OSRGetAuthorityName(s, NULL), *code = OSRGetAuthorityCode(s, NULL);
    if (auth && code)
        snprintf(buf, sizeof buf, "%s (%s:%s)", name ? name : "unnamed", auth, code);
    else
        snprintf(buf, sizeof buf, "%s", name ? name : "unnamed");
    return strdup(buf);
}

/* The UTM zone EPSG code (WGS 84) of a longitude/latitude. */
static int utm_epsg(double lon, double lat)
{
    int zone = (int)floor((lon + 180.0) / 6.0) + 1;
    if (zone < 1) zone = 1;
    if (zone > 60) zone = 60;
    return (lat >= 0 ? 32600 : 32700) + zone;
}

static ts_status check_gt(ts_qc_report *r, const double gt[6], const char *who, const char *code_square,
                          const char *code_rot)
{
    ts_status st = TS_OK;
    const double px = hypot(gt[1], gt[4]), py = hypot(gt[2], gt[5]);
    if (code_square && fabs(px - py) > 1e-6 * fmax(px, py))
        st = ts_qc_add_finding(r, TS_QC_WARNING, code_square,
                               "%s pixels are not square: %.9g x %.9g map units (ratio %.6g); a U-Net sees the ground "
                               "stretched %.3gx along one axis, and tools that assume square pixels misplace labels; "
                               "resample to square pixels (gdalwarp -tr %.9g %.9g)",
                               who, px, py, px / py, fmax(px, py) / fmin(px, py), fmin(px, py), fmin(px, py));
    if (!st && code_rot && (gt[2] != 0.0 || gt[4] != 0.0))
        st = ts_qc_add_finding(r, TS_QC_WARNING, code_rot,
                               "%s geotransform is rotated or sheared (gt[2] = %.9g, gt[4] = %.9g): windows are not "
                               "north-up and outputs written north-up will not line up; make it north-up first "
                               "(gdalwarp resamples to a north-up grid)",
                               who, gt[2], gt[4]);
    return st;
}

/* The image: open, size, geotransform, CRS. */
static ts_status check_image(ts_qc_report *r, const char *path, OGRSpatialReferenceH *img_srs, int *ok)
{
    *img_srs = NULL;
    *ok = 0;
    CPLErrorReset();
    GDALDatasetH ds = GDALOpenEx(path, GDAL_OF_RASTER | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!ds)
        return ts_qc_add_finding(r, TS_QC_ERROR, "image_unreadable", "image '%s': cannot open it as a raster: %s",
                                 path, *CPLGetLastErrorMsg() ? CPLGetLastErrorMsg() : "not a format GDAL reads");
    *ok = 1;
    r->width = GDALGetRasterXSize(ds);
    r->height = GDALGetRasterYSize(ds);
    r->bands = GDALGetRasterCount(ds);
    ts_status st = TS_OK;
    const int has_gt = GDALGetGeoTransform(ds, r->gt) == CE_None;
    if (!has_gt) {
        const double id[6] = {0, 1, 0, 0, 0, 1};
        memcpy(r->gt, id, sizeof id);
        st = ts_qc_add_finding(r, TS_QC_WARNING, "image_no_geotransform",
                               "image '%s' has no geotransform: it is placed in pixel coordinates, so labels in any "
                               "real CRS will not land on it; georeference it (gdal_translate -a_ullr / -gcp, or a "
                               "world file)",
                               path);
    }
    const char *wkt = GDALGetProjectionRef(ds);
    OGRSpatialReferenceH s = srs_from(wkt);
    if (!s) {
        if (!st)
            st = ts_qc_add_finding(r, TS_QC_WARNING, "image_no_crs",
                                   "image '%s' has no CRS: vector labels cannot be reprojected onto it, and distances, "
                                   "areas and outputs have no real-world meaning; set it (gdal_edit.py -a_srs "
                                   "EPSG:<code>)",
                                   path);
    } else {
        r->image_crs = srs_describe(s);
        if (!st && OSRIsGeographic(s)) {
            double lon = r->gt[0] + r->gt[1] * (double)r->width / 2 + r->gt[2] * (double)r->height / 2;
            double lat = r->gt[3] + r->gt[4] * (double)r->width / 2 + r->gt[5] * (double)r->height / 2;
            int epsg = utm_epsg(lon, lat);
            st = ts_qc_add_finding(r, TS_QC_WARNING, "image_geographic_crs",
                                   "image CRS %s is GEOGRAPHIC: pixels are %.9g x %.9g DEGREES (about %.3g x %.3g m at "
                                   "latitude %.3f, not square on the ground); pixel sizes, buffers and areas in map "
                                   "units mean degrees; warp it to a projected CRS (e.g. gdalwarp -t_srs EPSG:%d, UTM "
                                   "zone %d%c)",
                                   r->image_crs ? r->image_crs : "?", fabs(r->gt[1]), fabs(r->gt[5]),
                                   fabs(r->gt[1]) * 111320.0 * cos(lat * M_PI / 180.0), fabs(r->gt[5]) * 110540.0,
                                   lat, epsg, epsg % 100, lat >= 0 ? 'N' : 'S');
        }
        *img_srs = s;
    }
    if (!st) st = check_gt(r, r->gt, "image", "non_square_pixels", "rotated_geotransform");
    GDALClose(ds);
    return st;
}

/* The image's bounding box in its CRS. */
static void image_bbox(const ts_qc_report *r, double box[4])
{
    const double xs[4] = {0, (double)r->width, 0, (double)r->width};
    const double ys[4] = {0, 0, (double)r->height, (double)r->height};
    box[0] = box[1] = INFINITY;
    box[2] = box[3] = -INFINITY;
    for (int i = 0; i < 4; i++) {
        double x = r->gt[0] + r->gt[1] * xs[i] + r->gt[2] * ys[i];
        double y = r->gt[3] + r->gt[4] * xs[i] + r->gt[5] * ys[i];
        box[0] = fmin(box[0], x);
        box[1] = fmin(box[1], y);
        box[2] = fmax(box[2], x);
        box[3] = fmax(box[3], y);
    }
}

/* The labels: CRS, geotransform, and a vector layer's extent against the image. */
static ts_status check_labels(ts_qc_report *r, const char *path, const ts_label_opts *lo, OGRSpatialReferenceH img_srs,
                              int image_ok)
{
    CPLErrorReset();
    GDALDatasetH ds = GDALOpenEx(path, GDAL_OF_RASTER | GDAL_OF_VECTOR | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!ds) return TS_OK; /* ts_labels_open reports it, with the reason */
    const int vector = lo->layer != NULL || GDALGetRasterCount(ds) == 0;
    r->labels_vector = vector;
    ts_status st = TS_OK;
    OGRSpatialReferenceH s = NULL;
    OGRLayerH layer = NULL;
    if (vector) {
        layer = lo->layer ? GDALDatasetGetLayerByName(ds, lo->layer)
                          : (GDALDatasetGetLayerCount(ds) > 0 ? GDALDatasetGetLayer(ds, 0) : NULL);
        if (!layer) {
            GDALClose(ds);
            return TS_OK; /* ts_labels_open names the layers */
        }
        OGRSpatialReferenceH ls = OGR_L_GetSpatialRef(layer);
        if (ls) {
            s = OSRClone(ls);
            if (s) OSRSetAxisMappingStrategy(s, OAMS_TRADITIONAL_GIS_ORDER);
        }
    } else {
        s = srs_from(GDALGetProjectionRef(ds));
    }
    const char *kind = vector ? "vector layer" : "raster mask";
    int assumed = 0;
    if (!s) {
        if (lo->assume_crs) {
            s = srs_from(lo->assume_crs);
            assumed = s != NULL;
        } else if (lo->assume_image_crs && img_srs) {
            s = OSRClone(img_srs);
            assumed = s != NULL;
        }
        if (assumed)
            st = ts_qc_add_finding(r, TS_QC_INFO, "labels_crs_assumed",
                                   "labels '%s' (%s) have no CRS; taken to be in %s as asked", path, kind,
                                   lo->assume_crs ? lo->assume_crs : "the image's CRS");
        else
            st = ts_qc_add_finding(r, TS_QC_WARNING, "labels_no_crs",
                                   "labels '%s' (%s) have NO CRS: they cannot be placed on the image reliably; give "
                                   "them one (a .prj next to a shapefile, ogr2ogr -a_srs / gdal_edit.py -a_srs) or say "
                                   "which CRS they are in (--assume-crs EPSG:<code>, or --assume-crs image)",
                                   path, kind);
    }
    if (s) {
        if (!r->labels_crs) r->labels_crs = srs_describe(s);
        if (!st && OSRIsGeographic(s))
            st = ts_qc_add_finding(r, vector ? TS_QC_INFO : TS_QC_WARNING, "labels_geographic_crs",
                                   vector ? "labels '%s' are in a geographic CRS (%s, degrees); features are "
                                            "reprojected exactly to the image CRS"
                                          : "labels '%s' are a raster mask in a geographic CRS (%s, degrees): it is "
                                            "warped onto the image grid by nearest neighbour, which shifts class "
                                            "edges by up to half a mask pixel; rasterize the labels on the image grid "
                                            "instead if you can",
                                   path, r->labels_crs);
    }
    if (!st && !vector) {
        double gt[6];
        if (GDALGetGeoTransform(ds, gt) == CE_None)
            st = check_gt(r, gt, "labels mask", NULL, "labels_rotated_geotransform");
    }
    /* A vector layer's extent against the image's. */
    if (!st && vector && image_ok) {
        OGREnvelope env;
        CPLErrorReset();
        if (OGR_L_GetFeatureCount(layer, TRUE) == 0) {
            st = ts_qc_add_finding(r, TS_QC_ERROR, "no_overlap", "labels '%s': layer '%s' has no features", path,
                                   OGR_L_GetName(layer));
        } else if (OGR_L_GetExtent(layer, &env, TRUE) == OGRERR_NONE) {
            double lx0 = env.MinX, ly0 = env.MinY, lx1 = env.MaxX, ly1 = env.MaxY;
            int comparable = 1;
            if (s && img_srs && !OSRIsSame(s, img_srs)) {
                OGRCoordinateTransformationH ct = OCTNewCoordinateTransformation(s, img_srs);
                double a, b, c, d;
                if (ct && OCTTransformBounds(ct, env.MinX, env.MinY, env.MaxX, env.MaxY, &a, &b, &c, &d, 21)) {
                    lx0 = a, ly0 = b, lx1 = c, ly1 = d;
                } else {
                    comparable = 0;
                }
                if (ct) OCTDestroyCoordinateTransformation(ct);
            } else if (!s != !img_srs && !lo->assume_image_crs) {
                comparable = 0;
            }
            double box[4];
            image_bbox(r, box);
            if (comparable && (lx1 < box[0] || lx0 > box[2] || ly1 < box[1] || ly0 > box[3]))
                st = ts_qc_add_finding(r, TS_QC_ERROR, "no_overlap",
                                       "labels '%s': the extent of layer '%s' (x %.10g..%.10g, y %.10g..%.10g in the "
                                       "image CRS) lies OUTSIDE the image (x %.10g..%.10g, y %.10g..%.10g): no label "
                                       "falls on it; check the CRS of both (a wrong or missing .prj is the usual "
                                       "cause) and that they cover the same place",
                                       path, OGR_L_GetName(layer), lx0, lx1, ly0, ly1, box[0], box[2], box[1], box[3]);
        }
    }
    if (s) OSRDestroySpatialReference(s);
    GDALClose(ds);
    return st;
}

/* ---- counting ---------------------------------------------------------------------- */

typedef struct qc_worker {
    ts_raster *raster;
    ts_labels *labels;
    float *img;
    uint8_t *valid;
    int32_t *lab;
    ts_qc_counts c[TS_SPLIT_COUNT];
    size_t fail; /* lowest failing window index, SIZE_MAX for none */
    ts_status st;
    int fail_labels;
    char msg[1024];
} qc_worker;

static void worker_free(qc_worker *w, int own_raster)
{
    if (own_raster) ts_raster_close(w->raster);
    ts_labels_close(w->labels);
    free(w->img);
    free(w->valid);
    free(w->lab);
    for (int s = 0; s < TS_SPLIT_COUNT; s++) ts_qc_counts_free(&w->c[s]);
}

static ts_status count_pixels(ts_qc_report *r, const ts_qc_params *p, const ts_label_opts *lo)
{
    ts_raster *raster = NULL;
    ts_status st = ts_raster_open(p->image, p->raster, &raster);
    if (st) {
        if (!ts_qc_find(r, "image_unreadable"))
            return ts_qc_add_finding(r, TS_QC_ERROR, "image_unreadable", "%s", ts_last_error());
        return TS_OK;
    }
    ts_grid grid;
    st = ts_raster_grid(raster, &grid);
    if (st) {
        ts_raster_close(raster);
        return ts_qc_add_finding(r, TS_QC_ERROR, "image_unreadable", "%s", ts_last_error());
    }

    /* The windows: given, or blocks covering the image. */
    ts_window_list blocks;
    ts_window_list_init(&blocks);
    const ts_window_list *wl = p->windows;
    if (!wl || wl->count == 0) {
        const int b = p->block > 0 ? p->block : 512;
        for (int64_t y = 0; !st && y < grid.height; y += b)
            for (int64_t x = 0; !st && x < grid.width; x += b) {
                ts_window w = {x, y, (int)(grid.width - x < b ? grid.width - x : b),
                               (int)(grid.height - y < b ? grid.height - y : b)};
                st = ts_window_list_push(&blocks, w, (int64_t)blocks.count);
            }
        wl = &blocks;
    }
    r->has_windows = wl != &blocks;
    r->has_split = r->has_windows && wl->has_split;
    size_t max_area = 0;
    for (size_t i = 0; i < wl->count; i++) {
        size_t a = (size_t)wl->w[i].width * (size_t)wl->w[i].height;
        if (a > max_area) max_area = a;
    }
    int nt = p->threads > 0 ? p->threads : omp_get_max_threads();
    if ((size_t)nt > wl->count) nt = (int)wl->count;
    if (nt < 1) nt = 1;
    qc_worker *wk = calloc((size_t)nt, sizeof *wk);
    if (!st && !wk) st = ts_error(TS_ERR_NOMEM, "qc: out of memory");
    const int channels = ts_raster_channels(raster);

    /* Per-thread handles, opened here, one after the other. */
    int label_fail = 0;
    for (int t = 0; !st && !label_fail && t < nt; t++) {
        qc_worker *w = &wk[t];
        w->fail = SIZE_MAX;
        if (t == 0)
            w->raster = raster;
        else if ((st = ts_raster_clone(raster, &w->raster)) != TS_OK)
            break;
        if (ts_labels_open(p->labels, &grid, lo, &w->labels) != TS_OK) {
            label_fail = 1;
            st = ts_qc_add_finding(r, TS_QC_ERROR, "labels_unreadable", "%s", ts_last_error());
            break;
        }
        if (t == 0) r->labels_vector = ts_labels_is_vector(w->labels);
        w->img = malloc(max_area * (size_t)(channels > 0 ? channels : 1) * sizeof *w->img);
        w->valid = malloc(max_area);
        w->lab = malloc(max_area * sizeof *w->lab);
        if (!w->img || !w->valid || !w->lab) st = ts_error(TS_ERR_NOMEM, "qc: out of memory");
        for (int s = 0; !st && s < TS_SPLIT_COUNT; s++) st = ts_qc_counts_init(&w->c[s], p->classes);
    }
    if (!st && !label_fail && r->labels_vector >= 0) {
        const int32_t bg = r->labels_vector == 1 ? lo->background_id : -1;
        size_t first_fail = SIZE_MAX;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
        for (size_t i = 0; i < wl->count; i++) {
            size_t ff;
#pragma omp atomic read
            ff = first_fail;
            if (i > ff) continue;
            qc_worker *w = &wk[omp_get_thread_num()];
            const ts_window *win = &wl->w[i];
            ts_status s = ts_raster_read(w->raster, win, w->img, w->valid);
            int is_labels = 0;
            if (!s) {
                s = ts_labels_read(w->labels, win, w->lab);
                is_labels = s != TS_OK;
            }
            if (s) {
                if (i < w->fail) {
                    w->fail = i;
                    w->st = s;
                    w->fail_labels = is_labels;
                    snprintf(w->msg, sizeof w->msg, "%s", ts_last_error());
                }
#pragma omp critical(ts_qc_first_fail)
                if (i < first_fail) first_fail = i;
                continue;
            }
            int tag = r->has_split && wl->split[i] < TS_SPLIT_COUNT ? wl->split[i] : TS_SPLIT_NONE;
            ts_qc_counts_add(&w->c[tag], w->lab, w->valid, (size_t)win->width * (size_t)win->height, lo->ignore_id,
                             bg);
        }
        /* The lowest failing window, whatever thread read it. */
        const qc_worker *bad = NULL;
        for (int t = 0; t < nt; t++)
            if (wk[t].fail != SIZE_MAX && (!bad || wk[t].fail < bad->fail)) bad = &wk[t];
        if (bad) {
            const ts_window *win = &wl->w[bad->fail];
            st = ts_qc_add_finding(r, TS_QC_ERROR, bad->fail_labels ? "labels_unreadable" : "image_unreadable",
                                   "reading window %zu (col %" PRId64 ", row %" PRId64 ", %dx%d): %s", bad->fail,
                                   win->col_off, win->row_off, win->width, win->height, bad->msg);
        } else {
            for (int t = 0; t < nt; t++)
                for (int s = 0; s < TS_SPLIT_COUNT; s++) {
                    ts_qc_counts_merge(&r->split[s], &wk[t].c[s]);
                    ts_qc_counts_merge(&r->total, &wk[t].c[s]);
                }
            r->image_read = 1;
        }
    }
    if (wk)
        for (int t = 0; t < nt; t++) worker_free(&wk[t], t > 0);
    free(wk);
    ts_raster_close(raster);
    ts_window_list_free(&blocks);
    ts_grid_free(&grid);
    return st;
}

/* ---- findings from the counts ----------------------------------------------------------- */

static const ts_split_tag used_splits[3] = {TS_SPLIT_TRAIN, TS_SPLIT_VAL, TS_SPLIT_TEST};

static ts_status count_findings(ts_qc_report *r)
{
    ts_status st = TS_OK;
    const ts_qc_counts *t = &r->total;
    if (t->out_of_range) {
        char ids[512] = "";
        size_t used = 0;
        for (int i = 0; i < t->n_bad && used + 1 < sizeof ids; i++) {
            int wr = snprintf(ids + used, sizeof ids - used, "%s%" PRId64 " (%" PRIu64 " px)", i ? ", " : "",
                              t->bad[i].id, t->bad[i].pixels);
            if (wr < 0) break;
            used += (size_t)wr;
        }
        st = ts_qc_add_finding(r, TS_QC_ERROR, "ids_out_of_range",
                               "%" PRIu64 " label pixels hold ids outside 0..%d (--classes %d; the ignore id %d "
                               "aside): %s%s; raise --classes, fix the class map or the mask, or map those ids to the "
                               "ignore id",
                               t->out_of_range, r->classes - 1, r->classes, (int)r->ignore_id, ids,
                               t->bad_truncated ? ", and more" : "");
    }
    if (!st && t->labelled == 0 && t->out_of_range == 0 && !ts_qc_find(r, "no_overlap"))
        st = ts_qc_add_finding(r, TS_QC_ERROR, "no_overlap",
                               r->labels_vector == 1
                                   ? "no label falls on the image: every pixel is background (%d) or ignore; the "
                                     "labels do not overlap the image (check both CRSs and extents, the attribute and "
                                     "the class map)"
                                   : "no label falls on the image: every pixel is ignore (%d: outside the mask's "
                                     "footprint or its nodata); the mask does not overlap the image (check both CRSs "
                                     "and extents)",
                               r->labels_vector == 1 ? (int)r->background_id : (int)r->ignore_id);
    for (int c = 0; !st && c < r->classes; c++)
        if (t->hist[c] == 0)
            st = ts_qc_add_finding(r, TS_QC_WARNING, "class_absent",
                                   "class %d has no pixel in any window (its weight is 0); check --classes, the class "
                                   "map or the attribute",
                                   c);
    if (r->has_split)
        for (int k = 0; !st && k < 3; k++) {
            const ts_qc_counts *s = &r->split[used_splits[k]];
            if (s->windows == 0) continue;
            char list[256] = "";
            size_t used = 0;
            int n = 0;
            for (int c = 0; c < r->classes && used + 1 < sizeof list; c++)
                if (t->hist[c] > 0 && s->hist[c] == 0) {
                    int wr = snprintf(list + used, sizeof list - used, "%s%d", n ? ", " : "", c);
                    if (wr < 0) break;
                    used += (size_t)wr;
                    n++;
                }
            if (n)
                st = ts_qc_add_finding(r, TS_QC_WARNING, "class_absent_from_split",
                                       "split %s (%" PRIu64 " windows) has no pixel of class%s %s, present elsewhere; %s",
                                       ts_split_name(used_splits[k]), s->windows, n > 1 ? "es" : "", list,
                                       used_splits[k] == TS_SPLIT_TRAIN
                                           ? "the model never learns it: change the split seed, block size or ratios"
                                           : "its metrics for that class are undefined: change the split seed, block "
                                             "size or ratios");
        }
    if (!st && t->nodata > 0)
        st = ts_qc_add_finding(r, TS_QC_INFO, "image_nodata",
                               "%.4f of the pixels read are image nodata (%" PRIu64 " of %" PRIu64 ")",
                               (double)t->nodata / (double)t->pixels, t->nodata, t->pixels);
    return st;
}

ts_status ts_qc_run(const ts_qc_params *p, ts_qc_report *rep)
{
    ts_qc_report_init(rep);
    if (!p || !p->image || !p->labels) return ts_error(TS_ERR_INVALID_ARG, "qc: an image and labels are required");
    if (p->classes < 1) return ts_error(TS_ERR_INVALID_ARG, "qc: --classes must be >= 1, got %d", p->classes);
    ts_gdal_init();
    ts_label_opts lo;
    if (p->label_opts)
        lo = *p->label_opts;
    else
        ts_label_opts_init(&lo);
    lo.classes = 0; /* ids >= K are counted, not refused */
    rep->classes = p->classes;
    rep->ignore_id = lo.ignore_id;
    rep->background_id = lo.background_id;
    ts_status st = TS_OK;
    if (!(rep->image = strdup(p->image)) || !(rep->labels = strdup(p->labels)))
        st = ts_error(TS_ERR_NOMEM, "qc: out of memory");
    if (!st) st = ts_qc_counts_init(&rep->total, p->classes);
    for (int s = 0; !st && s < TS_SPLIT_COUNT; s++) st = ts_qc_counts_init(&rep->split[s], p->classes);
    if (!st && (!(rep->weights_median = calloc((size_t)p->classes, sizeof(double))) ||
                !(rep->weights_inverse = calloc((size_t)p->classes, sizeof(double)))))
        st = ts_error(TS_ERR_NOMEM, "qc: out of memory");
    OGRSpatialReferenceH img_srs = NULL;
    int image_ok = 0;
    if (!st) st = check_image(rep, p->image, &img_srs, &image_ok);
    if (!st) st = check_labels(rep, p->labels, &lo, img_srs, image_ok);
    if (img_srs) OSRDestroySpatialReference(img_srs);
    if (!st && image_ok) st = count_pixels(rep, p, &lo);
    if (!st && rep->image_read) {
        st = count_findings(rep);
        const ts_qc_counts *basis = &rep->total;
        if (rep->has_split && hist_sum(&rep->split[TS_SPLIT_TRAIN]) > 0) {
            basis = &rep->split[TS_SPLIT_TRAIN];
            rep->weights_basis = "train";
        }
        ts_qc_class_weights(basis->hist, rep->classes, TS_QC_WEIGHTS_MEDIAN_FREQUENCY, rep->weights_median);
        ts_qc_class_weights(basis->hist, rep->classes, TS_QC_WEIGHTS_INVERSE_FREQUENCY, rep->weights_inverse);
    }
    return st;
}

/* ---- output ----------------------------------------------------------------------------- */

static const char *level_name(ts_qc_level l)
{
    return l == TS_QC_ERROR ? "error" : l == TS_QC_WARNING ? "warning" : "info";
}

static const char *const WEIGHT_FORMULA_MEDIAN = "w_c = median_{f_k>0}(f_k) / f_c (median-frequency balancing)";
static const char *const WEIGHT_FORMULA_INVERSE = "w_c = (1/f_c) / mean_{f_k>0}(1/f_k) (inverse frequency, mean 1)";

static void print_counts(FILE *f, const ts_qc_report *r, const char *title, const ts_qc_counts *c)
{
    const uint64_t sum = hist_sum(c);
    fprintf(f, "%s: %" PRIu64 " windows, %" PRIu64 " pixels; nodata %.4f, ignore %" PRIu64 ", out of range %" PRIu64
               ", class ids on nodata %" PRIu64 "\n",
            title, c->windows, c->pixels, c->pixels ? (double)c->nodata / (double)c->pixels : 0.0, c->ignore,
            c->out_of_range, c->masked);
    for (int k = 0; k < r->classes; k++)
        fprintf(f, "  class %3d %14" PRIu64 " px  %.6f\n", k, c->hist[k], sum ? (double)c->hist[k] / (double)sum : 0.0);
}

void ts_qc_report_print(FILE *f, const ts_qc_report *r)
{
    fprintf(f, "image:  %s (%" PRId64 "x%" PRId64 ", %d bands, CRS %s, pixel %.9g x %.9g)\n", r->image, r->width,
            r->height, r->bands, r->image_crs ? r->image_crs : "NONE", fabs(r->gt[1]), fabs(r->gt[5]));
    fprintf(f, "labels: %s (%s, CRS %s)\n", r->labels,
            r->labels_vector == 1 ? "vector" : r->labels_vector == 0 ? "raster mask" : "unreadable",
            r->labels_crs ? r->labels_crs : "NONE");
    fprintf(f, "classes: %d (ignore id %d, background id %d)\n", r->classes, (int)r->ignore_id, (int)r->background_id);
    if (r->image_read) {
        print_counts(f, r, r->has_windows ? "all windows" : "whole image (blocks)", &r->total);
        if (r->has_split)
            for (int s = 1; s < TS_SPLIT_COUNT; s++)
                if (r->split[s].windows) print_counts(f, r, ts_split_name((ts_split_tag)s), &r->split[s]);
        if (r->total.out_of_range) {
            fprintf(f, "ids out of range:");
            for (int i = 0; i < r->total.n_bad; i++)
                fprintf(f, " %" PRId64 " (%" PRIu64 " px)", r->total.bad[i].id, r->total.bad[i].pixels);
            fprintf(f, "%s\n", r->total.bad_truncated ? " ..." : "");
        }
        fprintf(f, "class weights (from %s; f_c = class frequency; absent classes 0):\n", r->weights_basis);
        fprintf(f, "  median-frequency (default): %s\n   ", WEIGHT_FORMULA_MEDIAN);
        for (int k = 0; k < r->classes; k++) fprintf(f, " %.6g", r->weights_median[k]);
        fprintf(f, "\n  inverse-frequency:          %s\n   ", WEIGHT_FORMULA_INVERSE);
        for (int k = 0; k < r->classes; k++) fprintf(f, " %.6g", r->weights_inverse[k]);
        fprintf(f, "\n");
    }
    for (int lv = TS_QC_ERROR; lv >= TS_QC_INFO; lv--)
        for (int i = 0; i < r->n_findings; i++) {
            const ts_qc_finding *x = &r->findings[i];
            if ((int)x->level != lv) continue;
            fprintf(f, "%s [%s]: %s\n", lv == TS_QC_ERROR ? "ERROR" : lv == TS_QC_WARNING ? "WARNING" : "info",
                    x->code, x->message);
        }
    fprintf(f, "qc: %d error%s, %d warning%s\n", r->errors, r->errors == 1 ? "" : "s", r->warnings,
            r->warnings == 1 ? "" : "s");
}

static cJSON *counts_json(const ts_qc_report *r, const ts_qc_counts *c)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    const uint64_t sum = hist_sum(c);
    cJSON_AddNumberToObject(o, "windows", (double)c->windows);
    cJSON_AddNumberToObject(o, "pixels", (double)c->pixels);
    cJSON_AddNumberToObject(o, "nodata_pixels", (double)c->nodata);
    cJSON_AddNumberToObject(o, "nodata_fraction", c->pixels ? (double)c->nodata / (double)c->pixels : 0.0);
    cJSON_AddNumberToObject(o, "ignore_pixels", (double)c->ignore);
    cJSON_AddNumberToObject(o, "out_of_range_pixels", (double)c->out_of_range);
    cJSON_AddNumberToObject(o, "class_on_nodata_pixels", (double)c->masked);
    cJSON_AddNumberToObject(o, "labelled_pixels", (double)c->labelled);
    cJSON *h = cJSON_AddArrayToObject(o, "histogram");
    cJSON *fr = cJSON_AddArrayToObject(o, "frequencies");
    for (int k = 0; h && fr && k < r->classes; k++) {
        cJSON_AddItemToArray(h, cJSON_CreateNumber((double)c->hist[k]));
        cJSON_AddItemToArray(fr, cJSON_CreateNumber(sum ? (double)c->hist[k] / (double)sum : 0.0));
    }
    cJSON *bad = cJSON_AddArrayToObject(o, "out_of_range_ids");
    for (int i = 0; bad && i < c->n_bad; i++) {
        cJSON *b = cJSON_CreateObject();
        if (!b) break;
        cJSON_AddNumberToObject(b, "id", (double)c->bad[i].id);
        cJSON_AddNumberToObject(b, "pixels", (double)c->bad[i].pixels);
        cJSON_AddItemToArray(bad, b);
    }
    cJSON_AddBoolToObject(o, "out_of_range_ids_truncated", c->bad_truncated);
    return o;
}

static cJSON *weights_json(const double *w, int n, const char *formula)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON_AddStringToObject(o, "formula", formula);
    cJSON *a = cJSON_AddArrayToObject(o, "weights");
    for (int k = 0; a && k < n; k++) cJSON_AddItemToArray(a, cJSON_CreateNumber(w[k]));
    return o;
}

ts_status ts_qc_report_json(const ts_qc_report *r, char **json)
{
    *json = NULL;
    cJSON *root = cJSON_CreateObject();
    if (!root) return ts_error(TS_ERR_NOMEM, "qc: out of memory");
    cJSON *img = cJSON_AddObjectToObject(root, "image");
    if (img) {
        cJSON_AddStringToObject(img, "path", r->image ? r->image : "");
        cJSON_AddNumberToObject(img, "width", (double)r->width);
        cJSON_AddNumberToObject(img, "height", (double)r->height);
        cJSON_AddNumberToObject(img, "bands", r->bands);
        if (r->image_crs)
            cJSON_AddStringToObject(img, "crs", r->image_crs);
        else
            cJSON_AddNullToObject(img, "crs");
        cJSON *gt = cJSON_AddArrayToObject(img, "geotransform");
        for (int i = 0; gt && i < 6; i++) cJSON_AddItemToArray(gt, cJSON_CreateNumber(r->gt[i]));
    }
    cJSON *lab = cJSON_AddObjectToObject(root, "labels");
    if (lab) {
        cJSON_AddStringToObject(lab, "path", r->labels ? r->labels : "");
        cJSON_AddStringToObject(lab, "kind",
                                r->labels_vector == 1 ? "vector" : r->labels_vector == 0 ? "raster" : "unknown");
        if (r->labels_crs)
            cJSON_AddStringToObject(lab, "crs", r->labels_crs);
        else
            cJSON_AddNullToObject(lab, "crs");
    }
    cJSON_AddNumberToObject(root, "classes", r->classes);
    cJSON_AddNumberToObject(root, "ignore_id", r->ignore_id);
    cJSON_AddNumberToObject(root, "background_id", r->background_id);
    cJSON_AddStringToObject(root, "source", r->has_windows ? "windows" : "blocks");
    cJSON_AddBoolToObject(root, "counted", r->image_read);
    if (r->image_read) {
        cJSON_AddItemToObject(root, "overall", counts_json(r, &r->total));
        if (r->has_split) {
            cJSON *sp = cJSON_AddObjectToObject(root, "splits");
            for (int s = 1; sp && s < TS_SPLIT_COUNT; s++)
                if (r->split[s].windows)
                    cJSON_AddItemToObject(sp, ts_split_name((ts_split_tag)s), counts_json(r, &r->split[s]));
        }
        cJSON *cw = cJSON_AddObjectToObject(root, "class_weights");
        if (cw) {
            cJSON_AddStringToObject(cw, "default", "median_frequency");
            cJSON_AddStringToObject(cw, "basis", r->weights_basis);
            cJSON_AddItemToObject(cw, "median_frequency",
                                  weights_json(r->weights_median, r->classes, WEIGHT_FORMULA_MEDIAN));
            cJSON_AddItemToObject(cw, "inverse_frequency",
                                  weights_json(r->weights_inverse, r->classes, WEIGHT_FORMULA_INVERSE));
        }
    }
    cJSON *fs = cJSON_AddArrayToObject(root, "findings");
    for (int i = 0; fs && i < r->n_findings; i++) {
        cJSON *f = cJSON_CreateObject();
        if (!f) break;
        cJSON_AddStringToObject(f, "level", level_name(r->findings[i].level));
        cJSON_AddStringToObject(f, "code", r->findings[i].code);
        cJSON_AddStringToObject(f, "message", r->findings[i].message);
        cJSON_AddItemToArray(fs, f);
    }
    cJSON_AddNumberToObject(root, "errors", r->errors);
    cJSON_AddNumberToObject(root, "warnings", r->warnings);
    cJSON_AddStringToObject(root, "status", r->errors ? "errors" : r->warnings ? "warnings" : "ok");
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    char *copy = text ? strdup(text) : NULL;
    cJSON_free(text);
    if (!copy) return ts_error(TS_ERR_NOMEM, "qc: out of memory writing the JSON report");
    *json = copy;
    return TS_OK;
}
