/* Whole-scene evaluation of a class map against a reference raster or vector
 * layer (io/evaluate.h says what is counted and how). */
#include "io/evaluate.h"

#include <cJSON.h>
#include <cpl_conv.h>
#include <cpl_error.h>
#include <cpl_string.h>
#include <gdal.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "io/classes.h"
#include "io/gdal_out.h"
#include "io/io.h"
#include "kernels/outfile.h"

void ts_eval_params_init(ts_eval_params *p)
{
    memset(p, 0, sizeof *p);
    p->pred_band = 1;
    p->tolerance = TS_EVAL_DEFAULT_TOLERANCE;
    p->rows = TS_EVAL_DEFAULT_ROWS;
}

void ts_eval_result_free(ts_eval_result *r)
{
    if (!r) return;
    if (r->class_names)
        for (int k = 0; k < r->metrics.classes; k++) free(r->class_names[k]);
    free(r->class_names);
    free(r->class_rgb);
    free(r->crs_name);
    ts_metrics_free(&r->metrics);
    memset(r, 0, sizeof *r);
}

/* ---- georeferencing --------------------------------------------------------- */

/* SRS from anything OSRSetFromUserInput takes, traditional GIS axis order;
 * NULL for NULL/empty text or on failure. */
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

static OGRSpatialReferenceH srs_clone(OGRSpatialReferenceH s)
{
    if (!s) return NULL;
    OGRSpatialReferenceH c = OSRClone(s);
    if (c) OSRSetAxisMappingStrategy(c, OAMS_TRADITIONAL_GIS_ORDER);
    return c;
}

/* The bounding box of a raster grid's four corners. */
static void grid_extent(const double gt[6], int64_t w, int64_t h, double ext[4])
{
    const double cx[4] = {0, (double)w, 0, (double)w}, cy[4] = {0, 0, (double)h, (double)h};
    for (int i = 0; i < 4; i++) {
        double x = gt[0] + cx[i] * gt[1] + cy[i] * gt[2], y = gt[3] + cx[i] * gt[4] + cy[i] * gt[5];
        if (i == 0 || x < ext[0]) ext[0] = x;
        if (i == 0 || y < ext[1]) ext[1] = y;
        if (i == 0 || x > ext[2]) ext[2] = x;
        if (i == 0 || y > ext[3]) ext[3] = y;
    }
}

static const char *srs_name(OGRSpatialReferenceH s)
{
    const char *n = s ? OSRGetName(s) : NULL;
    return n && *n ? n : s ? "unnamed CRS" : "no CRS";
}

/* The truth's extent and CRS, as far as they can be known: 0 with *has = 0
 * when there is nothing to compare (a mask without a geotransform, which
 * labels.c only accepts pixel-aligned; an empty layer). */
static ts_status truth_extent(const char *path, int is_vector, const char *layer_name, double ext[4], int *has,
                              OGRSpatialReferenceH *srs)
{
    *has = 0;
    *srs = NULL;
    CPLErrorReset();
    GDALDatasetH ds =
        GDALOpenEx(path, (is_vector ? GDAL_OF_VECTOR : GDAL_OF_RASTER) | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!ds) return ts_gdal_error(TS_ERR_IO, "truth '%s': cannot open it again to read its extent", path);
    if (is_vector) {
        OGRLayerH l = layer_name ? GDALDatasetGetLayerByName(ds, layer_name) : GDALDatasetGetLayer(ds, 0);
        OGREnvelope env;
        if (l && OGR_L_GetFeatureCount(l, TRUE) > 0 && OGR_L_GetExtent(l, &env, TRUE) == OGRERR_NONE) {
            ext[0] = env.MinX, ext[1] = env.MinY, ext[2] = env.MaxX, ext[3] = env.MaxY;
            *has = 1;
            *srs = srs_clone(OGR_L_GetSpatialRef(l));
        }
    } else {
        double gt[6];
        if (GDALGetGeoTransform(ds, gt) == CE_None) {
            grid_extent(gt, GDALGetRasterXSize(ds), GDALGetRasterYSize(ds), ext);
            *has = 1;
            *srs = srs_from(GDALGetProjectionRef(ds));
        }
    }
    GDALClose(ds);
    return TS_OK;
}

/* Refuses a truth whose extent, in the prediction's CRS, misses the
 * prediction's. When the extent cannot be brought into the prediction's CRS
 * the check is left to the count of overlapping pixels afterwards. */
static ts_status check_overlap(const ts_eval_params *p, const ts_label_opts *lo, int is_vector, const ts_grid *g)
{
    double te[4], pe[4];
    int has = 0;
    OGRSpatialReferenceH tsrs = NULL;
    ts_status st = truth_extent(p->truth, is_vector, lo->layer, te, &has, &tsrs);
    if (st || !has) {
        if (tsrs) OSRDestroySpatialReference(tsrs);
        return st;
    }
    grid_extent(g->gt, g->width, g->height, pe);
    OGRSpatialReferenceH psrs = srs_from(g->crs_wkt);
    /* A truth without a CRS is taken in the one labels.c assumed for it. */
    int assumed = 0;
    if (!tsrs) {
        assumed = 1;
        tsrs = lo->assume_crs ? srs_from(lo->assume_crs) : srs_clone(psrs);
    }
    double tp[4] = {te[0], te[1], te[2], te[3]};
    int compared = 1;
    if (tsrs && psrs && !OSRIsSame(tsrs, psrs)) {
        OGRCoordinateTransformationH ct = OCTNewCoordinateTransformation(tsrs, psrs);
        compared = ct && OCTTransformBounds(ct, te[0], te[1], te[2], te[3], &tp[0], &tp[1], &tp[2], &tp[3], 21);
        if (ct) OCTDestroyCoordinateTransformation(ct);
        CPLErrorReset();
    }
    if (compared && (tp[2] <= pe[0] || tp[0] >= pe[2] || tp[3] <= pe[1] || tp[1] >= pe[3])) {
        char same[512] = "";
        if (tsrs && psrs && !OSRIsSame(tsrs, psrs))
            snprintf(same, sizeof same, "; [%.10g, %.10g, %.10g, %.10g] in the prediction's CRS", tp[0], tp[1], tp[2],
                     tp[3]);
        st = ts_error(TS_ERR_INVALID_ARG,
                      "prediction '%s' and truth '%s' do not overlap: the prediction covers [%.10g, %.10g, %.10g, "
                      "%.10g] (xmin, ymin, xmax, ymax) in %s, the truth [%.10g, %.10g, %.10g, %.10g] in %s%s%s; check "
                      "that both cover the same area and that their CRSs are right",
                      p->pred, p->truth, pe[0], pe[1], pe[2], pe[3], srs_name(psrs), te[0], te[1], te[2], te[3],
                      srs_name(tsrs), assumed ? " (assumed)" : "", same);
    }
    if (tsrs) OSRDestroySpatialReference(tsrs);
    if (psrs) OSRDestroySpatialReference(psrs);
    return st;
}

/* Area of one pixel and its unit, from the geotransform and the CRS. */
static void pixel_area_unit(ts_eval_result *r, const double gt[6], const char *wkt)
{
    r->pixel_area = fabs(gt[1] * gt[5] - gt[2] * gt[4]);
    OGRSpatialReferenceH s = srs_from(wkt);
    if (!s) {
        snprintf(r->area_unit, sizeof r->area_unit, "map units^2");
        return;
    }
    const char *name = OSRGetName(s);
    if (name && *name) r->crs_name = strdup(name);
    if (OSRIsGeographic(s)) {
        snprintf(r->area_unit, sizeof r->area_unit, "deg^2");
    } else {
        char *unit = NULL;
        OSRGetLinearUnits(s, &unit);
        if (!unit || !*unit || strcmp(unit, "metre") == 0 || strcmp(unit, "meter") == 0)
            snprintf(r->area_unit, sizeof r->area_unit, "m^2");
        else if (strcmp(unit, "foot") == 0)
            snprintf(r->area_unit, sizeof r->area_unit, "ft^2");
        else
            snprintf(r->area_unit, sizeof r->area_unit, "%.40s^2", unit);
    }
    OSRDestroySpatialReference(s);
}

/* ---- the prediction band -------------------------------------------------- */

typedef struct pred_src {
    const char *path;
    GDALDatasetH ds;
    GDALRasterBandH band;
    int band_no;
    int read_double; /* float or wide types: read as float64 and check whole numbers */
    double nodata;
    int64_t bound; /* the largest id the data type can hold (for the class count cap) */
    double *scratch;
} pred_src;

/* Reads rows [r0, r1) of the prediction into ids and valid (0 on nodata). */
static ts_status pred_read(pred_src *s, int w, int r0, int r1, int32_t *ids, uint8_t *valid)
{
    const size_t n = (size_t)w * (size_t)(r1 - r0);
    if (!s->read_double) {
        if (GDALRasterIO(s->band, GF_Read, 0, r0, w, r1 - r0, ids, w, r1 - r0, GDT_Int32, 0, 0) != CE_None)
            return ts_gdal_error(TS_ERR_IO, "prediction '%s': reading band %d, rows %d to %d", s->path, s->band_no,
                                 r0, r1 - 1);
        const int whole = s->nodata == floor(s->nodata) && fabs(s->nodata) <= INT32_MAX;
        const int32_t nd = whole ? (int32_t)s->nodata : 0;
        for (size_t i = 0; i < n; i++) valid[i] = !(whole && ids[i] == nd);
        return TS_OK;
    }
    if (GDALRasterIO(s->band, GF_Read, 0, r0, w, r1 - r0, s->scratch, w, r1 - r0, GDT_Float64, 0, 0) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "prediction '%s': reading band %d, rows %d to %d", s->path, s->band_no, r0,
                             r1 - 1);
    for (size_t i = 0; i < n; i++) {
        double v = s->scratch[i];
        if (isnan(v) || v == s->nodata) {
            valid[i] = 0;
            ids[i] = 0;
            continue;
        }
        if (v != floor(v) || v < INT32_MIN || v > INT32_MAX)
            return ts_error(TS_ERR_INVALID_ARG,
                            "prediction '%s': band %d, pixel (col %zu, row %zu) holds %g, which is not a class id (a "
                            "whole number); give a class map (terraseg predict writes one) or set the band's nodata",
                            s->path, s->band_no, i % (size_t)w, (size_t)r0 + i / (size_t)w, v);
        valid[i] = 1;
        ids[i] = (int32_t)v;
    }
    return TS_OK;
}

static ts_status pred_open(pred_src *s, const char *path, int band_no)
{
    memset(s, 0, sizeof *s);
    s->path = path;
    s->band_no = band_no;
    CPLErrorReset();
    s->ds = GDALOpenEx(path, GDAL_OF_RASTER | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!s->ds) {
        struct stat sb;
        if (stat(path, &sb) != 0) return ts_error(TS_ERR_IO, "prediction '%s': no such file (check the path)", path);
        return ts_gdal_error(TS_ERR_IO, "prediction '%s': cannot open it as a raster", path);
    }
    const int nb = GDALGetRasterCount(s->ds);
    if (band_no < 1 || band_no > nb)
        return ts_error(TS_ERR_INVALID_ARG, "prediction '%s': band %d does not exist (it has %d band%s)", path, band_no,
                        nb, nb == 1 ? "" : "s");
    s->band = GDALGetRasterBand(s->ds, band_no);
    GDALDataType t = GDALGetRasterDataType(s->band);
    if (GDALDataTypeIsComplex(t))
        return ts_error(TS_ERR_INVALID_ARG, "prediction '%s': band %d is complex (%s); class ids must be real numbers",
                        path, band_no, GDALGetDataTypeName(t));
    s->read_double = !(t == GDT_Byte || t == GDT_UInt16 || t == GDT_Int16 || t == GDT_Int32);
    s->bound = t == GDT_Byte ? 255 : (t == GDT_UInt16 || t == GDT_Int16) ? 65535 : INT32_MAX;
    int has = 0;
    double nd = GDALGetRasterNoDataValue(s->band, &has);
    /* terraseg predict's nodata; a class raster without one keeps 255 free. */
    s->nodata = has ? nd : 255.0;
    return TS_OK;
}

static void pred_close(pred_src *s)
{
    if (s->ds) GDALClose(s->ds);
    free(s->scratch);
    memset(s, 0, sizeof *s);
}

/* Category names up to the last non-empty one. */
static int category_count(GDALRasterBandH b)
{
    char **names = GDALGetRasterCategoryNames(b);
    int n = CSLCount(names);
    while (n > 0 && (!names[n - 1] || !*names[n - 1])) n--;
    return n;
}

/* ---- the run ---------------------------------------------------------------- */

/* The class-count cap while K is still unknown: what both inputs can hold. */
static int class_cap(int64_t pred_bound, int64_t truth_bound)
{
    int64_t b = pred_bound > truth_bound ? pred_bound : truth_bound;
    return b + 1 < TS_METRICS_MAX_CLASSES ? (int)(b + 1) : TS_METRICS_MAX_CLASSES;
}

static ts_status class_table(ts_eval_result *r, const ts_eval_params *p, GDALRasterBandH band, int K)
{
    ts_class_table t = {0};
    ts_status st = ts_class_table_read_band(band, K - 1, &t);
    if (st) return st;
    r->class_names = calloc((size_t)K, sizeof *r->class_names);
    r->class_rgb = calloc((size_t)K, sizeof *r->class_rgb);
    if (!r->class_names || !r->class_rgb) st = ts_error(TS_ERR_NOMEM, "eval: out of memory for %d class names", K);
    for (int k = 0; !st && k < K; k++) {
        const char *name = p->class_names && k < p->n_class_names && p->class_names[k] ? p->class_names[k]
                                                                                       : t.names[k];
        if (!(r->class_names[k] = strdup(name))) st = ts_error(TS_ERR_NOMEM, "eval: out of memory");
        memcpy(r->class_rgb[k], t.rgb[k], 3);
    }
    ts_class_table_free(&t);
    return st;
}

ts_status ts_eval_run(const ts_eval_params *p, ts_eval_result *r)
{
    if (!r) return ts_error(TS_ERR_INVALID_ARG, "eval: NULL result");
    memset(r, 0, sizeof *r);
    if (!p || !p->pred || !p->truth) return ts_error(TS_ERR_INVALID_ARG, "eval: a prediction and a truth are needed");
    const int band_no = p->pred_band > 0 ? p->pred_band : 1;
    const int rows = p->rows > 0 ? p->rows : TS_EVAL_DEFAULT_ROWS;
    if (p->classes < 0 || p->classes > TS_METRICS_MAX_CLASSES)
        return ts_error(TS_ERR_INVALID_ARG, "eval: --classes %d; the class count must be in [1, %d]", p->classes,
                        TS_METRICS_MAX_CLASSES);
    if (!p->no_boundary && !(p->tolerance >= 0 && p->tolerance <= TS_BOUNDARY_MAX_TOLERANCE))
        return ts_error(TS_ERR_INVALID_ARG, "eval: --tolerance %g pixels; it must be in [0, %g]", p->tolerance,
                        TS_BOUNDARY_MAX_TOLERANCE);
    ts_label_opts lo;
    if (p->label_opts)
        lo = *p->label_opts;
    else
        ts_label_opts_init(&lo);
    ts_gdal_init();

    pred_src ps;
    ts_grid g = {0};
    ts_labels *labels = NULL;
    ts_confusion cm = {0}, cmk = {0};
    ts_boundary bf = {0}, bfk = {0};
    int32_t *pid = NULL, *lab = NULL;
    uint8_t *valid = NULL;
    ts_status st = pred_open(&ps, p->pred, band_no);
    if (st) goto done;
    r->width = g.width = GDALGetRasterXSize(ps.ds);
    r->height = g.height = GDALGetRasterYSize(ps.ds);
    if (g.width > INT_MAX || g.height > INT_MAX) {
        st = ts_error(TS_ERR_UNSUPPORTED, "prediction '%s': %" PRId64 "x%" PRId64 " pixels is too large for GDAL",
                      p->pred, g.width, g.height);
        goto done;
    }
    const int W = (int)g.width, H = (int)g.height;
    r->pred_nodata = ps.nodata;
    r->ignore_id = lo.ignore_id;
    r->rows = rows;
    r->tolerance = p->no_boundary ? NAN : p->tolerance;

    /* The class count, as far as it is known before reading. */
    int K = p->classes;
    r->k_source = "--classes";
    if (K == 0) {
        K = category_count(ps.band);
        r->k_source = "category names";
        if (K > TS_METRICS_MAX_CLASSES) {
            st = ts_error(TS_ERR_UNSUPPORTED, "prediction '%s': %d category names; at most %d classes are supported",
                          p->pred, K, TS_METRICS_MAX_CLASSES);
            goto done;
        }
    }
    if (K == 0) r->k_source = "largest id + 1";

    /* The grid the truth is aligned to. */
    double gt[6];
    r->georeferenced = GDALGetGeoTransform(ps.ds, gt) == CE_None;
    const char *wkt = GDALGetProjectionRef(ps.ds);
    if (r->georeferenced) {
        memcpy(g.gt, gt, sizeof gt);
        if (wkt && *wkt && !(g.crs_wkt = strdup(wkt))) {
            st = ts_error(TS_ERR_NOMEM, "eval: out of memory");
            goto done;
        }
        pixel_area_unit(r, gt, wkt);
    } else {
        /* Pixel space: only a truth raster of exactly this size, read pixel
         * for pixel. Its own grid is handed to labels.c so that it is read
         * directly, never warped. */
        r->pixel_area = 1;
        snprintf(r->area_unit, sizeof r->area_unit, "pixels");
        snprintf(r->warning, sizeof r->warning,
                 "prediction '%s' has no georeferencing: it is compared pixel for pixel with the truth, which must be "
                 "a raster of the same size; areas are in pixels",
                 p->pred);
        CPLErrorReset();
        GDALDatasetH tds = lo.layer ? NULL : GDALOpenEx(p->truth, GDAL_OF_RASTER | GDAL_OF_READONLY, NULL, NULL, NULL);
        if (!tds || GDALGetRasterCount(tds) == 0) {
            if (tds) GDALClose(tds);
            st = ts_error(TS_ERR_INVALID_ARG,
                          "prediction '%s' has no georeferencing, so the truth '%s' must be a raster of the same size "
                          "(%dx%d) to compare pixel for pixel; a vector layer or another grid cannot be placed on it. "
                          "Georeference the prediction (gdal_edit.py -a_ullr/-a_srs, or predict from a georeferenced "
                          "image)",
                          p->pred, p->truth, W, H);
            goto done;
        }
        int tw = GDALGetRasterXSize(tds), th = GDALGetRasterYSize(tds);
        double tgt[6] = {0, 1, 0, 0, 0, 1};
        if (tw == W && th == H) {
            if (GDALGetGeoTransform(tds, tgt) != CE_None) memcpy(tgt, (double[6]){0, 1, 0, 0, 0, 1}, sizeof tgt);
            const char *twkt = GDALGetProjectionRef(tds);
            if (twkt && *twkt && !(g.crs_wkt = strdup(twkt))) st = ts_error(TS_ERR_NOMEM, "eval: out of memory");
            memcpy(g.gt, tgt, sizeof tgt);
        }
        GDALClose(tds);
        if (!st && (tw != W || th != H))
            st = ts_error(TS_ERR_INVALID_ARG,
                          "prediction '%s' has no georeferencing and the truth '%s' is %dx%d, not %dx%d: without "
                          "georeferencing only a truth of exactly the same size can be compared (pixel for pixel)",
                          p->pred, p->truth, tw, th, W, H);
        if (st) goto done;
    }

    st = ts_labels_open(p->truth, &g, &lo, &labels);
    if (st) goto done;
    r->truth_is_vector = ts_labels_is_vector(labels);
    if (r->georeferenced) {
        st = check_overlap(p, &lo, r->truth_is_vector, &g);
        if (st) goto done;
    }

    /* Accumulators: K classes, or the cap of what the inputs can hold while
     * K is found from the data (cut down to the largest id + 1 at the end;
     * counts of the classes kept do not depend on the cap). */
    int64_t tbound = ts_labels_max_id(labels);
    const int cap = K > 0 ? K : class_cap(ps.bound, tbound);
    st = ts_confusion_init(&cm, cap);
    if (!st && !p->no_boundary) st = ts_boundary_init(&bf, cap, p->tolerance);
    if (st) goto done;

    const int halo = p->no_boundary ? 0 : (int)floor(p->tolerance) + 1;
    const int buf_rows = (rows + 2 * halo < H ? rows + 2 * halo : H);
    const size_t nbuf = (size_t)buf_rows * (size_t)W;
    pid = malloc(nbuf * sizeof *pid);
    lab = malloc(nbuf * sizeof *lab);
    valid = malloc(nbuf);
    if (ps.read_double) ps.scratch = malloc(nbuf * sizeof *ps.scratch);
    if (!pid || !lab || !valid || (ps.read_double && !ps.scratch)) {
        st = ts_error(TS_ERR_NOMEM, "eval: out of memory for strips of %d x %d pixels; use a smaller --rows",
                      buf_rows, W);
        goto done;
    }

    const int32_t ign = lo.ignore_id;
    int32_t max_id = -1;
    int scanned = 0; /* rows below this one were checked and counted as excluded or not */
    for (int y0 = 0; y0 < H; y0 += rows) {
        const int y1 = y0 + rows < H ? y0 + rows : H;
        const int c0 = y0 - halo > 0 ? y0 - halo : 0, c1 = y1 + halo < H ? y1 + halo : H;
        st = pred_read(&ps, W, c0, c1, pid, valid);
        if (st) goto done;
        ts_window win = {0, c0, W, c1 - c0};
        st = ts_labels_read(labels, &win, lab);
        if (st) goto done;
        /* Ids are checked here, with the scene's rows and columns in the
         * message, before the metrics see them (context rows included: they
         * feed the boundary maps). */
        for (int y = scanned > c0 ? scanned : c0; y < c1; y++) {
            const size_t row = (size_t)(y - c0) * (size_t)W;
            for (int x = 0; x < W; x++) {
                const size_t i = row + (size_t)x;
                if (!valid[i]) {
                    r->pred_nodata_pixels++;
                    continue;
                }
                if (lab[i] == ign) {
                    r->truth_ignored_pixels++;
                    continue;
                }
                const int32_t pv = pid[i], tv = lab[i];
                if (pv < 0 || pv >= cap) {
                    if (K > 0)
                        st = ts_error(TS_ERR_INVALID_ARG,
                                      "prediction '%s': pixel (col %d, row %d) holds id %d, not a class id in [0, %d) "
                                      "(%d classes from %s); give --classes with the model's class count, or check "
                                      "the prediction's nodata",
                                      p->pred, x, y, (int)pv, K, K, r->k_source);
                    else
                        st = ts_error(TS_ERR_UNSUPPORTED,
                                      "prediction '%s': pixel (col %d, row %d) holds id %d; class ids must be in [0, "
                                      "%d)",
                                      p->pred, x, y, (int)pv, cap);
                    goto done;
                }
                if (tv < 0 || tv >= cap) {
                    if (K > 0)
                        st = ts_error(TS_ERR_INVALID_ARG,
                                      "truth '%s': pixel (col %d, row %d) of the prediction grid holds class id %d, "
                                      "but there are %d classes (from %s); give --classes, mark unlabelled pixels "
                                      "with --ignore-id %d, or map ids with --binary",
                                      p->truth, x, y, (int)tv, K, r->k_source, (int)ign);
                    else
                        st = ts_error(TS_ERR_UNSUPPORTED,
                                      "truth '%s': pixel (col %d, row %d) of the prediction grid holds class id %d; "
                                      "class ids must be in [0, %d)",
                                      p->truth, x, y, (int)tv, cap);
                    goto done;
                }
                if (pv > max_id) max_id = pv;
                if (tv > max_id) max_id = tv;
            }
        }
        if (c1 > scanned) scanned = c1;
        const size_t own = (size_t)(y0 - c0) * (size_t)W;
        st = ts_confusion_add_ids(&cm, pid + own, lab + own, valid + own, 1, y1 - y0, W, ign);
        if (!st && !p->no_boundary)
            st = ts_boundary_add_rows(&bf, pid, lab, valid, c1 - c0, W, ign, y0 - c0, y1 - c0);
        if (st) goto done;
    }

    if (ts_confusion_total(&cm) == 0) {
        st = ts_error(TS_ERR_INVALID_ARG,
                      "prediction '%s' and truth '%s' have no pixel in common to compare: of %" PRId64
                      " pixels, %" PRId64
                      " are prediction nodata (%g) and %" PRId64 " truth ignore (id %d: its nodata, outside its "
                      "footprint, or unlabelled); check that they cover the same area",
                      p->pred, p->truth, g.width * g.height, r->pred_nodata_pixels, ps.nodata,
                      r->truth_ignored_pixels, (int)ign);
        goto done;
    }
    if (K == 0) {
        /* Cut the matrix and the boundary counts down to the ids found. */
        K = max_id + 1;
        st = ts_confusion_init(&cmk, K);
        if (!st && !p->no_boundary) st = ts_boundary_init(&bfk, K, p->tolerance);
        if (st) goto done;
        for (int t = 0; t < K; t++)
            memcpy(cmk.counts + (size_t)t * K, cm.counts + (size_t)t * cap, (size_t)K * sizeof *cm.counts);
        if (!p->no_boundary)
            for (int k = 0; k < K; k++) {
                bfk.pred_total[k] = bf.pred_total[k], bfk.pred_matched[k] = bf.pred_matched[k];
                bfk.true_total[k] = bf.true_total[k], bfk.true_matched[k] = bf.true_matched[k];
            }
        st = ts_metrics_compute(&r->metrics, &cmk, p->no_boundary ? NULL : &bfk);
    } else {
        st = ts_metrics_compute(&r->metrics, &cm, p->no_boundary ? NULL : &bf);
    }
    if (!st) st = class_table(r, p, ps.band, K);

done:
    ts_labels_close(labels);
    pred_close(&ps);
    ts_grid_free(&g);
    ts_confusion_free(&cm);
    ts_confusion_free(&cmk);
    ts_boundary_free(&bf);
    ts_boundary_free(&bfk);
    free(pid);
    free(lab);
    free(valid);
    if (st) {
        /* Keep the message: freeing does not touch it. */
        ts_eval_result_free(r);
    }
    return st;
}

/* ---- the report -------------------------------------------------------------- */

static void fmt_area(char *buf, size_t n, double v)
{
    if (fabs(v) >= 1e15 || (v != 0 && fabs(v) < 1e-3))
        snprintf(buf, n, "%.6g", v);
    else
        snprintf(buf, n, "%.2f", v);
}

void ts_eval_format(FILE *f, const ts_eval_result *r)
{
    if (!f || !r || !r->metrics.cls) return;
    const ts_metrics *m = &r->metrics;
    ts_metrics_format(f, m, (const char *const *)r->class_names);
    const int64_t all = r->width * r->height;
    fprintf(f, "counted %" PRId64 " of %" PRId64 " pixels; excluded: %" PRId64 " prediction nodata (%g), %" PRId64
               " truth ignore (id %d)\n",
            m->pixels, all, r->pred_nodata_pixels, r->pred_nodata, r->truth_ignored_pixels, (int)r->ignore_id);
    fprintf(f, "class count %d (from %s); absent classes (in neither map) show '-' and are left out of the means\n",
            m->classes, r->k_source);
    if (r->georeferenced)
        fprintf(f, "\narea over the counted pixels, in %s (%.6g %s per pixel):\n", r->area_unit, r->pixel_area,
                r->area_unit);
    else
        fprintf(f, "\narea over the counted pixels, in pixels (the prediction has no georeferencing):\n");
    int width = 5;
    for (int k = 0; k < m->classes; k++) {
        int len = (int)strlen(r->class_names[k]);
        if (len > width) width = len;
    }
    if (width > 32) width = 32;
    fprintf(f, "%4s  %-*s %18s %18s %18s %8s\n", "id", width, "class", "predicted", "reference", "difference", "ratio");
    for (int k = 0; k < m->classes; k++) {
        const ts_class_metrics *c = &m->cls[k];
        char a[3][40], ratio[24];
        fmt_area(a[0], sizeof a[0], (double)c->predicted * r->pixel_area);
        fmt_area(a[1], sizeof a[1], (double)c->support * r->pixel_area);
        fmt_area(a[2], sizeof a[2], (double)(c->predicted - c->support) * r->pixel_area);
        if (c->support > 0)
            snprintf(ratio, sizeof ratio, "%.4f", (double)c->predicted / (double)c->support);
        else
            snprintf(ratio, sizeof ratio, "-");
        fprintf(f, "%4d  %-*.*s %18s %18s %18s %8s\n", k, width, width, r->class_names[k], a[0], a[1], a[2], ratio);
    }
}

/* A number as the shortest decimal that reads back the same (see
 * train/metrics.c), or null when not finite. */
static int add_num(cJSON *o, const char *key, double v)
{
    if (!isfinite(v)) return cJSON_AddNullToObject(o, key) != NULL;
    char buf[32];
    for (int digits = 15; digits <= 17; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, v);
        if (strtod(buf, NULL) == v) break;
    }
    return cJSON_AddRawToObject(o, key, buf) != NULL;
}

#define EVAL_ABSENT                                                                                              \
    "a class in neither the truth nor the prediction (over the counted pixels) is absent: its scores are null " \
    "and it is left out of miou, mf1, mprecision and mrecall; miou_all_classes and mf1_all_classes count it as 0"

cJSON *ts_eval_to_cjson(const ts_eval_result *r, const ts_eval_params *p)
{
    if (!r || !r->metrics.cls) {
        ts_error(TS_ERR_INVALID_ARG, "eval JSON: no result");
        return NULL;
    }
    const ts_metrics *m = &r->metrics;
    cJSON *root = ts_metrics_to_cjson(m, (const char *const *)r->class_names);
    if (!root) return NULL;
    int ok = 1;
    cJSON *in = cJSON_AddObjectToObject(root, "inputs");
    ok = in != NULL;
    if (ok) {
        ok = cJSON_AddStringToObject(in, "prediction", p && p->pred ? p->pred : "") &&
             cJSON_AddStringToObject(in, "truth", p && p->truth ? p->truth : "") &&
             cJSON_AddStringToObject(in, "truth_kind", r->truth_is_vector ? "vector" : "raster") &&
             cJSON_AddNumberToObject(in, "band", p && p->pred_band > 0 ? p->pred_band : 1) &&
             cJSON_AddNumberToObject(in, "width", (double)r->width) &&
             cJSON_AddNumberToObject(in, "height", (double)r->height) &&
             (r->crs_name ? cJSON_AddStringToObject(in, "crs", r->crs_name) != NULL
                          : cJSON_AddNullToObject(in, "crs") != NULL) &&
             cJSON_AddBoolToObject(in, "georeferenced", r->georeferenced);
    }
    cJSON *kc = ok ? cJSON_AddObjectToObject(root, "class_count") : NULL;
    ok = ok && kc && cJSON_AddNumberToObject(kc, "value", m->classes) &&
         cJSON_AddStringToObject(kc, "source", r->k_source ? r->k_source : "");
    ok = ok && cJSON_AddNumberToObject(root, "ignore_id", r->ignore_id) &&
         add_num(root, "prediction_nodata", r->pred_nodata);
    cJSON *ex = ok ? cJSON_AddObjectToObject(root, "excluded") : NULL;
    ok = ok && ex && cJSON_AddNumberToObject(ex, "prediction_nodata", (double)r->pred_nodata_pixels) &&
         cJSON_AddNumberToObject(ex, "truth_ignored", (double)r->truth_ignored_pixels) &&
         cJSON_AddNumberToObject(ex, "total_pixels", (double)(r->width * r->height));
    ok = ok && cJSON_AddStringToObject(root, "absent_classes", EVAL_ABSENT) &&
         add_num(root, "tolerance_px", r->tolerance) &&
         cJSON_AddNumberToObject(root, "strip_rows", r->rows);
    cJSON *area = ok ? cJSON_AddObjectToObject(root, "area") : NULL;
    ok = ok && area && cJSON_AddStringToObject(area, "unit", r->area_unit) &&
         add_num(area, "pixel_area", r->pixel_area) &&
         cJSON_AddStringToObject(area, "scope", "counted pixels (prediction has an id and the truth is not ignore)");
    cJSON *pc = ok ? cJSON_AddArrayToObject(area, "per_class") : NULL;
    ok = ok && pc;
    for (int k = 0; ok && k < m->classes; k++) {
        const ts_class_metrics *c = &m->cls[k];
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(pc, o)) {
            cJSON_Delete(o);
            ok = 0;
            break;
        }
        ok = cJSON_AddNumberToObject(o, "id", k) && cJSON_AddStringToObject(o, "name", r->class_names[k]) &&
             cJSON_AddNumberToObject(o, "predicted_pixels", (double)c->predicted) &&
             cJSON_AddNumberToObject(o, "reference_pixels", (double)c->support) &&
             add_num(o, "predicted_area", (double)c->predicted * r->pixel_area) &&
             add_num(o, "reference_area", (double)c->support * r->pixel_area) &&
             add_num(o, "difference", (double)(c->predicted - c->support) * r->pixel_area) &&
             add_num(o, "ratio", c->support > 0 ? (double)c->predicted / (double)c->support : NAN);
    }
    if (ok && r->warning[0]) ok = cJSON_AddStringToObject(root, "warning", r->warning) != NULL;
    if (!ok) {
        cJSON_Delete(root);
        ts_error(TS_ERR_NOMEM, "eval JSON: out of memory");
        return NULL;
    }
    return root;
}

/* An existing output is kept unless overwrite; a folder never is replaced. */
static ts_status check_output(const char *path, int overwrite, const char *what)
{
    if (!path || !*path) return ts_error(TS_ERR_INVALID_ARG, "%s: no file name given", what);
    struct stat sb;
    if (stat(path, &sb) == 0) {
        if (S_ISDIR(sb.st_mode))
            return ts_error(TS_ERR_INVALID_ARG, "%s '%s' is a folder; give a file name", what, path);
        if (!overwrite)
            return ts_error(TS_ERR_INVALID_ARG, "%s '%s' already exists; use --overwrite to replace it", what, path);
    }
    return TS_OK;
}

ts_status ts_eval_write_json(const char *path, const ts_eval_result *r, const ts_eval_params *p, int overwrite)
{
    ts_status st = check_output(path, overwrite, "JSON report");
    if (st) return st;
    cJSON *root = ts_eval_to_cjson(r, p);
    if (!root) return r && r->metrics.cls ? TS_ERR_NOMEM : TS_ERR_INVALID_ARG;
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return ts_error(TS_ERR_NOMEM, "JSON report '%s': out of memory", path);
    size_t len = strlen(text);
    char *buf = malloc(len + 2);
    if (!buf) {
        cJSON_free(text);
        return ts_error(TS_ERR_NOMEM, "JSON report '%s': out of memory", path);
    }
    memcpy(buf, text, len);
    buf[len] = '\n';
    buf[len + 1] = '\0';
    cJSON_free(text);
    st = ts_write_file_atomic(path, buf, len + 1);
    free(buf);
    return st;
}

/* ---- the confusion-matrix image ------------------------------------------------ */

/* 3x5 digits, one row per byte, bit 2 = the left column. */
static const uint8_t digit_font[10][5] = {
    {7, 5, 5, 5, 7}, {2, 6, 2, 2, 7}, {7, 1, 7, 4, 7}, {7, 1, 7, 1, 7}, {5, 5, 7, 1, 1},
    {7, 4, 7, 1, 7}, {7, 4, 7, 5, 7}, {7, 1, 1, 1, 1}, {7, 5, 7, 5, 7}, {7, 5, 7, 1, 7},
};

typedef struct canvas {
    uint8_t *px; /* RGB, row-major */
    int w, h;
} canvas;

static void fill_rect(canvas *c, int x0, int y0, int w, int h, const uint8_t rgb[3])
{
    for (int y = y0 < 0 ? 0 : y0; y < y0 + h && y < c->h; y++)
        for (int x = x0 < 0 ? 0 : x0; x < x0 + w && x < c->w; x++) memcpy(c->px + ((size_t)y * c->w + x) * 3, rgb, 3);
}

/* Width in pixels of a number drawn at scale s. */
static int text_width(int v, int s)
{
    int n = 1;
    while (v >= 10) v /= 10, n++;
    return (4 * n - 1) * s;
}

/* Draws the decimal v (>= 0) centred on (cx, cy). */
static void draw_number(canvas *c, int v, int cx, int cy, int s, const uint8_t rgb[3])
{
    char buf[16];
    snprintf(buf, sizeof buf, "%d", v);
    int x = cx - text_width(v, s) / 2, y = cy - 5 * s / 2;
    for (const char *d = buf; *d; d++, x += 4 * s)
        for (int row = 0; row < 5; row++)
            for (int col = 0; col < 3; col++)
                if (digit_font[*d - '0'][row] & (4 >> col)) fill_rect(c, x + col * s, y + row * s, s, s, rgb);
}

/* White to dark blue through a mid blue (matplotlib's "Blues" end points). */
static void ramp(double v, uint8_t rgb[3])
{
    static const double stops[3][3] = {{255, 255, 255}, {107, 174, 214}, {8, 48, 107}};
    if (!(v >= 0)) v = 0;
    if (v > 1) v = 1;
    int seg = v < 0.5 ? 0 : 1;
    double t = v < 0.5 ? v * 2 : (v - 0.5) * 2;
    for (int i = 0; i < 3; i++) rgb[i] = (uint8_t)lround(stops[seg][i] + t * (stops[seg + 1][i] - stops[seg][i]));
}

static int auto_cell(int K)
{
    return K <= 6 ? 48 : K <= 12 ? 40 : K <= 20 ? 32 : K <= 40 ? 24 : K <= 64 ? 16 : K <= 128 ? 12 : 8;
}

ts_status ts_eval_write_confusion_png(const char *path, const ts_eval_result *r, int cell_px, int overwrite,
                                      int *out_w, int *out_h)
{
    if (!r || !r->metrics.confusion) return ts_error(TS_ERR_INVALID_ARG, "confusion image: no result");
    const ts_metrics *m = &r->metrics;
    const int K = m->classes;
    const int cell = cell_px > 0 ? cell_px : auto_cell(K);
    if (cell < 4 || cell > 256 || (int64_t)K * cell > 16384)
        return ts_error(TS_ERR_INVALID_ARG, "confusion image: %d classes at %d px per cell; cells must be 4 to 256 px "
                        "and the matrix at most 16384 px wide", K, cell);
    /* Text only where it fits: "100" is 11 font units wide. */
    const int s = cell / 16, text = s >= 1;
    const int pad = 4, sw = cell / 4 > 4 ? cell / 4 : 4, gap = 2;
    const int idw = text ? text_width(K - 1, s) : 0, idh = text ? 5 * s : 0;
    const int ox = pad + (text ? idw + pad : 0) + sw + gap, oy = pad + (text ? idh + pad : 0) + sw + gap;
    canvas c = {NULL, ox + K * cell + 1 + pad, oy + K * cell + 1 + pad};
    c.px = malloc((size_t)c.w * c.h * 3);
    if (!c.px) return ts_error(TS_ERR_NOMEM, "confusion image '%s': out of memory", path);
    const uint8_t white[3] = {255, 255, 255}, grid[3] = {200, 200, 200}, frame[3] = {60, 60, 60},
                  empty[3] = {232, 232, 232}, dark[3] = {20, 20, 20};
    fill_rect(&c, 0, 0, c.w, c.h, white);
    /* The frame is the separator between the axes and the matrix; grid lines
     * between cells. */
    fill_rect(&c, ox - 1, oy - 1, K * cell + 3, K * cell + 3, frame);
    fill_rect(&c, ox, oy, K * cell + 1, K * cell + 1, grid);
    for (int t = 0; t < K; t++) {
        int64_t row = m->cls[t].support;
        for (int p = 0; p < K; p++) {
            int64_t v = m->confusion[(size_t)t * K + p];
            uint8_t rgb[3];
            double share = row > 0 ? (double)v / (double)row : NAN;
            if (row > 0)
                ramp(share, rgb);
            else
                memcpy(rgb, empty, 3);
            int x = ox + 1 + p * cell, y = oy + 1 + t * cell;
            fill_rect(&c, x, y, cell - 1, cell - 1, rgb);
            if (text && row > 0 && v > 0) {
                int pct = (int)lround(100.0 * share);
                draw_number(&c, pct, x + (cell - 1) / 2, y + (cell - 1) / 2, s, share > 0.5 ? white : dark);
            }
        }
        /* Colour swatches and ids: rows (truth) on the left, columns
         * (prediction) on top. */
        const uint8_t *col = r->class_rgb ? r->class_rgb[t] : grid;
        fill_rect(&c, ox - gap - sw, oy + 1 + t * cell, sw, cell - 1, col);
        fill_rect(&c, ox + 1 + t * cell, oy - gap - sw, cell - 1, sw, col);
        if (text) {
            /* Right-aligned against the swatches. */
            const int tw = text_width(t, s);
            draw_number(&c, t, pad + idw - tw + tw / 2, oy + 1 + t * cell + (cell - 1) / 2, s, dark);
            draw_number(&c, t, ox + 1 + t * cell + (cell - 1) / 2, pad + idh / 2, s, dark);
        }
    }

    ts_gdal_init();
    ts_gdal_out o;
    ts_status st = ts_gdal_out_begin(&o, path, overwrite, "confusion image");
    if (st) {
        free(c.px);
        return st;
    }
    GDALDriverH mem = GDALGetDriverByName("MEM"), png = GDALGetDriverByName("PNG");
    if (!mem || !png) {
        free(c.px);
        ts_gdal_out_abort(&o);
        return ts_error(TS_ERR_UNSUPPORTED, "confusion image '%s': GDAL's %s driver is not available", path,
                        mem ? "PNG" : "MEM");
    }
    CPLErrorReset();
    GDALDatasetH ds = GDALCreate(mem, "", c.w, c.h, 3, GDT_Byte, NULL);
    if (!ds) st = ts_gdal_error(TS_ERR_BACKEND, "confusion image '%s': cannot create the in-memory image", path);
    if (!st && GDALDatasetRasterIO(ds, GF_Write, 0, 0, c.w, c.h, c.px, c.w, c.h, GDT_Byte, 3, NULL, 3,
                                   (GSpacing)c.w * 3, 1) != CE_None)
        st = ts_gdal_error(TS_ERR_BACKEND, "confusion image '%s': cannot fill the in-memory image", path);
    for (int b = 1; !st && b <= 3; b++)
        GDALSetRasterColorInterpretation(GDALGetRasterBand(ds, b), (GDALColorInterp)(GCI_RedBand + b - 1));
    if (!st) {
        GDALDatasetH out = GDALCreateCopy(png, o.tmp, ds, FALSE, NULL, NULL, NULL);
        if (!out)
            st = ts_gdal_error(TS_ERR_IO, "confusion image '%s': writing the PNG", path);
        else {
            GDALClose(out);
            if (CPLGetLastErrorType() >= CE_Failure)
                st = ts_gdal_error(TS_ERR_IO, "confusion image '%s': closing the PNG", path);
        }
    }
    if (ds) GDALClose(ds);
    free(c.px);
    if (st) {
        ts_gdal_out_abort(&o);
        return st;
    }
    st = ts_gdal_out_commit(&o);
    if (!st) {
        if (out_w) *out_w = c.w;
        if (out_h) *out_h = c.h;
    }
    return st;
}
