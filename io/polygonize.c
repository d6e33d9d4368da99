/* Class raster -> polygons (io/polygonize.h says what and why). */
#include "io/polygonize.h"

#include <cpl_conv.h>
#include <cpl_error.h>
#include <cpl_string.h>
#include <cpl_vsi.h>
#include <gdal.h>
#include <gdal_alg.h>
#include <geos_c.h>
#include <math.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/classes.h"
#include "io/gdal_out.h"
#include "io/io.h"

/* Rasters up to this many pixels keep their intermediate rasters in
 * /vsimem (at most 4 bytes a pixel each); larger ones write them beside the
 * output so memory stays bounded. */
#define SMALL_RASTER_PIXELS (16LL << 20)
/* Class ids above this are refused: a class map, not a raster of counts. */
#define MAX_CLASS_ID 65535

void ts_polygonize_params_init(ts_polygonize_params *p)
{
    memset(p, 0, sizeof *p);
    p->band = 1;
    p->connectivity = 4;
    p->confidence_band = 1;
}

double ts_ellipsoid_cell_area(double a, double b, double lat0, double lat1, double dlon)
{
    /* Area from the equator to latitude phi per radian of longitude (the
     * authalic-latitude formula); reduces to a^2 sin(phi) on a sphere. */
    const double e2 = 1.0 - (b * b) / (a * a), e = sqrt(e2 > 0 ? e2 : 0);
    double z[2];
    const double lat[2] = {lat0, lat1};
    for (int i = 0; i < 2; i++) {
        double phi = lat[i] > M_PI / 2 ? M_PI / 2 : (lat[i] < -M_PI / 2 ? -M_PI / 2 : lat[i]);
        const double s = sin(phi);
        if (e < 1e-12)
            z[i] = a * a * s;
        else
            z[i] = b * b * (s / (2.0 * (1.0 - e2 * s * s)) + log((1.0 + e * s) / (1.0 - e * s)) / (4.0 * e));
    }
    return fabs(dlon) * fabs(z[1] - z[0]);
}

/* ---- the job ---------------------------------------------------------------------------------- */
typedef struct job {
    const ts_polygonize_params *p;
    ts_polygonize_report *rep;
    GDALDatasetH in;
    GDALRasterBandH band;
    int W, H;
    int has_gt;
    double gt[6];
    char *wkt; /* NULL: no CRS */
    int has_nodata;
    double nodata;
    double pxarea;
    int geographic, geo_area; /* geo_area: north-up geographic, areas from the ellipsoid */
    double semi_a, semi_b, ang_unit;
    GDALDatasetH conf_ds;
    GDALRasterBandH conf;
    int conf_has_nd;
    double conf_nd, conf_scale;
    ts_gdal_out out;
    char *work_stem;
    char *work[4]; /* intermediate files to remove */
    int nwork;
    int small;
    int max_class;
    /* regions 1..nreg */
    int64_t nreg;
    int32_t *rcls;
    int64_t *rpix, *rconf_n;
    double *rconf, *rgeo;
} job;

static void warnf(const job *j, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void warnf(const job *j, const char *fmt, ...)
{
    if (!j->p->warn) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    j->p->warn(j->p->warn_ctx, msg);
}

static ts_status check_params(const ts_polygonize_params *p)
{
    if (!p->input || !*p->input) return ts_error(TS_ERR_INVALID_ARG, "polygonize: no class raster given");
    if (!p->output || !*p->output) return ts_error(TS_ERR_INVALID_ARG, "polygonize: no output file given");
    if (p->connectivity != 0 && p->connectivity != 4 && p->connectivity != 8)
        return ts_error(TS_ERR_INVALID_ARG, "polygonize: --connectivity must be 4 or 8, got %d", p->connectivity);
    if (p->majority != 0 && (p->majority < 3 || p->majority > 15 || p->majority % 2 == 0))
        return ts_error(TS_ERR_INVALID_ARG, "polygonize: --majority must be an odd window size from 3 to 15, got %d",
                        p->majority);
    if (p->mmu_px < 0) return ts_error(TS_ERR_INVALID_ARG, "polygonize: --mmu must be >= 0, got %d", p->mmu_px);
    if (!(p->simplify >= 0) || !(p->min_area >= 0) || !(p->fill_holes >= 0) || p->min_area_px < 0 ||
        p->fill_holes_px < 0)
        return ts_error(TS_ERR_INVALID_ARG,
                        "polygonize: --simplify, --min-area(-px) and --fill-holes(-px) must be >= 0");
    if (p->band < 0 || p->confidence_band < 0)
        return ts_error(TS_ERR_INVALID_ARG, "polygonize: band numbers start at 1");
    if (p->layer && !*p->layer) return ts_error(TS_ERR_INVALID_ARG, "polygonize: --layer must not be empty");
    if (!ts_vector_driver_for(p->output)) return TS_ERR_INVALID_ARG;
    return TS_OK;
}

static ts_status read_row(GDALRasterBandH b, int y, int w, void *buf, GDALDataType t, const char *what)
{
    CPLErrorReset();
    if (GDALRasterIO(b, GF_Read, 0, y, w, 1, buf, w, 1, t, 0, 0) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "polygonize: reading row %d of %s", y, what);
    return TS_OK;
}

static ts_status write_row(GDALRasterBandH b, int y, int w, void *buf, GDALDataType t, const char *what)
{
    CPLErrorReset();
    if (GDALRasterIO(b, GF_Write, 0, y, w, 1, buf, w, 1, t, 0, 0) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "polygonize: writing row %d of %s", y, what);
    return TS_OK;
}

/* ---- the majority filter ---------------------------------------------------------------------- */
static void sort_small(int32_t *v, int n)
{
    for (int i = 1; i < n; i++) {
        int32_t x = v[i];
        int k = i - 1;
        while (k >= 0 && v[k] > x) {
            v[k + 1] = v[k];
            k--;
        }
        v[k + 1] = x;
    }
}

/* The modal class of the sorted votes; ties keep the centre c, else the smallest. */
static int32_t mode_of(const int32_t *v, int n, int32_t c)
{
    int32_t best = c;
    int bestn = 0;
    for (int i = 0; i < n;) {
        int k = i;
        while (k < n && v[k] == v[i]) k++;
        const int cnt = k - i;
        if (cnt > bestn || (cnt == bestn && v[i] == c)) {
            best = v[i];
            bestn = cnt;
        }
        i = k;
    }
    return best;
}

ts_status ts_majority_filter(GDALRasterBandH src, GDALRasterBandH dst, int size, int has_nodata, double nodata,
                             int64_t *changed)
{
    if (changed) *changed = 0;
    if (!src || !dst || src == dst) return ts_error(TS_ERR_INVALID_ARG, "majority filter: two distinct bands needed");
    if (size < 3 || size > 15 || size % 2 == 0)
        return ts_error(TS_ERR_INVALID_ARG, "majority filter: the window must be odd, 3 to 15, got %d", size);
    const int W = GDALGetRasterBandXSize(src), H = GDALGetRasterBandYSize(src), r = size / 2;
    if (GDALGetRasterBandXSize(dst) != W || GDALGetRasterBandYSize(dst) != H)
        return ts_error(TS_ERR_INVALID_ARG, "majority filter: source %dx%d and destination %dx%d differ", W, H,
                        GDALGetRasterBandXSize(dst), GDALGetRasterBandYSize(dst));
    /* A nodata value no int32 equals matches no pixel. */
    const int nd_on = has_nodata && nodata == floor(nodata) && nodata >= INT32_MIN && nodata <= INT32_MAX;
    const int32_t nd = nd_on ? (int32_t)nodata : 0;
    int32_t *ring = malloc((size_t)size * (size_t)W * sizeof *ring);
    int32_t *out = malloc((size_t)W * sizeof *out);
    int32_t votes[15 * 15];
    ts_status st = (ring && out) ? TS_OK : ts_error(TS_ERR_NOMEM, "majority filter: out of memory for %d rows", size);
    int loaded = 0;
    int64_t nchanged = 0;
    for (int y = 0; !st && y < H; y++) {
        while (!st && loaded <= (y + r < H ? y + r : H - 1)) {
            st = read_row(src, loaded, W, ring + (size_t)(loaded % size) * W, GDT_Int32, "the majority filter input");
            loaded++;
        }
        const int y0 = y - r < 0 ? 0 : y - r, y1 = y + r < H ? y + r : H - 1;
        const int32_t *cur = ring + (size_t)(y % size) * W;
        for (int x = 0; !st && x < W; x++) {
            const int32_t c = cur[x];
            if (nd_on && c == nd) {
                out[x] = c;
                continue;
            }
            int n = 0;
            const int x0 = x - r < 0 ? 0 : x - r, x1 = x + r < W ? x + r : W - 1;
            for (int yy = y0; yy <= y1; yy++) {
                const int32_t *row = ring + (size_t)(yy % size) * W;
                for (int xx = x0; xx <= x1; xx++)
                    if (!nd_on || row[xx] != nd) votes[n++] = row[xx];
            }
            sort_small(votes, n);
            out[x] = mode_of(votes, n, c);
            nchanged += out[x] != c;
        }
        if (!st) st = write_row(dst, y, W, out, GDT_Int32, "the majority filter output");
    }
    free(ring);
    free(out);
    if (!st && changed) *changed = nchanged;
    return st;
}

/* ---- input, confidence, work files ------------------------------------------------------------ */
static ts_status open_input(job *j)
{
    const ts_polygonize_params *p = j->p;
    CPLErrorReset();
    j->in = GDALOpenEx(p->input, GDAL_OF_RASTER | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!j->in) return ts_gdal_error(TS_ERR_IO, "class raster '%s': cannot open it as a raster", p->input);
    const int nb = GDALGetRasterCount(j->in), b = p->band ? p->band : 1;
    if (b < 1 || b > nb)
        return ts_error(TS_ERR_INVALID_ARG, "class raster '%s': --band %d does not exist (it has %d band%s)", p->input,
                        b, nb, nb == 1 ? "" : "s");
    j->band = GDALGetRasterBand(j->in, b);
    const GDALDataType t = GDALGetRasterDataType(j->band);
    if (GDALDataTypeIsFloating(t) || GDALDataTypeIsComplex(t) || GDALGetDataTypeSizeBits(t) > 32 ||
        t == GDT_UInt32)
        return ts_error(TS_ERR_INVALID_ARG,
                        "class raster '%s': band %d is %s; class ids must be an integer band (Byte, UInt16, Int16, "
                        "Int32), as terraseg predict writes",
                        p->input, b, GDALGetDataTypeName(t));
    j->W = GDALGetRasterXSize(j->in);
    j->H = GDALGetRasterYSize(j->in);
    j->nodata = GDALGetRasterNoDataValue(j->band, &j->has_nodata);
    const int mflags = GDALGetMaskFlags(j->band);
    if (!(mflags & GMF_NODATA) && mflags != GMF_ALL_VALID)
        warnf(j, "'%s' has a mask or alpha band; only the nodata value marks pixels to skip", p->input);
    j->has_gt = GDALGetGeoTransform(j->in, j->gt) == CE_None;
    if (!j->has_gt) {
        const double id[6] = {0, 1, 0, 0, 0, 1};
        memcpy(j->gt, id, sizeof id);
        warnf(j, "'%s' has no georeferencing: polygons are in pixel coordinates and areas in pixels", p->input);
    }
    j->pxarea = fabs(j->gt[1] * j->gt[5] - j->gt[2] * j->gt[4]);
    if (!(j->pxarea > 0))
        return ts_error(TS_ERR_INVALID_ARG, "class raster '%s': its geotransform has zero pixel area", p->input);
    const char *wkt = GDALGetProjectionRef(j->in);
    if (wkt && *wkt && !(j->wkt = strdup(wkt))) return ts_error(TS_ERR_NOMEM, "polygonize: out of memory");
    if (!j->wkt && j->has_gt) warnf(j, "'%s' has a geotransform but no CRS; the output has no CRS", p->input);
    return TS_OK;
}

/* Geographic CRS: map-unit areas are refused, the area attribute comes from the ellipsoid. */
static ts_status check_crs(job *j)
{
    const ts_polygonize_params *p = j->p;
    if (!j->wkt) return TS_OK;
    OGRSpatialReferenceH s = OSRNewSpatialReference(NULL);
    if (!s) return ts_error(TS_ERR_NOMEM, "polygonize: out of memory");
    ts_status st = TS_OK;
    if (OSRImportFromWkt(s, &(char *){j->wkt}) != OGRERR_NONE) {
        warnf(j, "'%s': GDAL cannot read its CRS; areas are in map units", p->input);
    } else if (OSRIsGeographic(s)) {
        j->geographic = 1;
        OGRErr e1 = OGRERR_NONE, e2 = OGRERR_NONE;
        j->semi_a = OSRGetSemiMajor(s, &e1);
        j->semi_b = OSRGetSemiMinor(s, &e2);
        j->ang_unit = OSRGetAngularUnits(s, NULL);
        j->geo_area = e1 == OGRERR_NONE && e2 == OGRERR_NONE && j->gt[2] == 0 && j->gt[4] == 0 && j->ang_unit > 0;
        if (p->min_area > 0)
            st = ts_error(TS_ERR_INVALID_ARG,
                          "--min-area %g is in map units, but '%s' is in a geographic CRS (degrees): use "
                          "--min-area-px, or reproject the raster (gdalwarp -t_srs)",
                          p->min_area, p->input);
        else if (p->fill_holes > 0)
            st = ts_error(TS_ERR_INVALID_ARG,
                          "--fill-holes %g is in map units, but '%s' is in a geographic CRS (degrees): use "
                          "--fill-holes-px, or reproject the raster (gdalwarp -t_srs)",
                          p->fill_holes, p->input);
        else if (!j->geo_area)
            warnf(j, "'%s' is in a geographic CRS with a rotated grid: the area attribute is left empty", p->input);
        else
            warnf(j, "'%s' is in a geographic CRS: area is the pixels' area on the ellipsoid in m^2", p->input);
        if (!st && p->simplify > 0)
            warnf(j, "--simplify %g is in degrees ('%s' is in a geographic CRS)", p->simplify, p->input);
    }
    OSRDestroySpatialReference(s);
    return st;
}

static int same_gt(const double a[6], const double b[6])
{
    for (int i = 0; i < 6; i++)
        if (fabs(a[i] - b[i]) > 1e-9 * (fabs(a[i]) + fabs(b[i]) + 1e-9)) return 0;
    return 1;
}

static ts_status open_confidence(job *j)
{
    const ts_polygonize_params *p = j->p;
    if (!p->confidence) return TS_OK;
    CPLErrorReset();
    j->conf_ds = GDALOpenEx(p->confidence, GDAL_OF_RASTER | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!j->conf_ds)
        return ts_gdal_error(TS_ERR_IO, "--confidence '%s': cannot open it as a raster", p->confidence);
    const int nb = GDALGetRasterCount(j->conf_ds), b = p->confidence_band ? p->confidence_band : 1;
    if (b < 1 || b > nb)
        return ts_error(TS_ERR_INVALID_ARG, "--confidence '%s': band %d does not exist (it has %d band%s)",
                        p->confidence, b, nb, nb == 1 ? "" : "s");
    if (GDALGetRasterXSize(j->conf_ds) != j->W || GDALGetRasterYSize(j->conf_ds) != j->H)
        return ts_error(TS_ERR_INVALID_ARG,
                        "--confidence '%s' is %dx%d pixels but the class raster '%s' is %dx%d; they must be on one "
                        "grid (terraseg predict writes both)",
                        p->confidence, GDALGetRasterXSize(j->conf_ds), GDALGetRasterYSize(j->conf_ds), p->input, j->W,
                        j->H);
    double gt[6];
    const int has = GDALGetGeoTransform(j->conf_ds, gt) == CE_None;
    if (has != j->has_gt || (has && !same_gt(gt, j->gt)))
        return ts_error(TS_ERR_INVALID_ARG,
                        "--confidence '%s' and the class raster '%s' have different geotransforms; they must be on "
                        "one grid (terraseg predict writes both)",
                        p->confidence, p->input);
    j->conf = GDALGetRasterBand(j->conf_ds, b);
    const GDALDataType t = GDALGetRasterDataType(j->conf);
    if (t != GDT_Byte && !GDALDataTypeIsFloating(t))
        return ts_error(TS_ERR_INVALID_ARG,
                        "--confidence '%s': band %d is %s; expected Byte (terraseg predict's: round(254 p) with GDAL "
                        "scale 1/254) or a float band of 0..1",
                        p->confidence, b, GDALGetDataTypeName(t));
    /* The band's own GDAL scale when it has one (terraseg predict sets 1/254);
     * else a Byte band is taken as p x 255 and a float band as p. */
    int has_scale = 0;
    const double scale = GDALGetRasterScale(j->conf, &has_scale);
    j->conf_scale = has_scale ? scale : t == GDT_Byte ? 1.0 / 255.0 : 1.0;
    j->conf_nd = GDALGetRasterNoDataValue(j->conf, &j->conf_has_nd);
    return TS_OK;
}

/* "<output without extension>.tmp-<pid>" (from the temporary output name). */
static ts_status make_work_stem(job *j)
{
    const char *t = j->out.tmp, *slash = strrchr(t, '/'), *dot = strrchr(slash ? slash + 1 : t, '.');
    const size_t n = dot ? (size_t)(dot - t) : strlen(t);
    if (!(j->work_stem = malloc(n + 1))) return ts_error(TS_ERR_NOMEM, "polygonize: out of memory");
    memcpy(j->work_stem, t, n);
    j->work_stem[n] = '\0';
    return TS_OK;
}

/* A name for an intermediate file, remembered for removal. */
static ts_status work_name(job *j, const char *kind, const char *ext, char **out)
{
    char buf[1200];
    if (j->small)
        snprintf(buf, sizeof buf, "/vsimem/terraseg_polygonize_%ld_%p_%s%s", (long)getpid(), (void *)j, kind, ext);
    else
        snprintf(buf, sizeof buf, "%s.%s%s", j->work_stem, kind, ext);
    if (j->nwork >= (int)(sizeof j->work / sizeof j->work[0]) || !(j->work[j->nwork] = strdup(buf)))
        return ts_error(TS_ERR_NOMEM, "polygonize: out of memory");
    *out = j->work[j->nwork++];
    return TS_OK;
}

static void remove_work(job *j)
{
    for (int i = 0; i < j->nwork; i++) {
        VSIUnlink(j->work[i]);
        VSIUnlink(CPLSPrintf("%s.aux.xml", j->work[i]));
        free(j->work[i]);
    }
    j->nwork = 0;
}

/* A single-band GeoTIFF on the input's grid. */
static ts_status create_work_raster(job *j, const char *kind, GDALDataType t, int set_nd, double nd, GDALDatasetH *out)
{
    char *path = NULL;
    ts_status st = work_name(j, kind, ".tif", &path);
    if (st) return st;
    GDALDriverH gtiff = GDALGetDriverByName("GTiff");
    if (!gtiff) return ts_error(TS_ERR_UNSUPPORTED, "polygonize: GDAL has no GTiff driver");
    char **co = CSLSetNameValue(NULL, "BIGTIFF", "IF_SAFER");
    if (!j->small) {
        co = CSLSetNameValue(co, "COMPRESS", "DEFLATE");
        co = CSLSetNameValue(co, "ZLEVEL", "1");
    }
    CPLErrorReset();
    *out = GDALCreate(gtiff, path, j->W, j->H, 1, t, co);
    CSLDestroy(co);
    if (!*out)
        return ts_gdal_error(TS_ERR_IO, "polygonize: cannot create the intermediate raster '%s' (is the output "
                                        "folder writable, with room for it?)",
                             path);
    if (j->has_gt && GDALSetGeoTransform(*out, j->gt) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "polygonize: cannot set the geotransform of '%s'", path);
    if (set_nd && GDALSetRasterNoDataValue(GDALGetRasterBand(*out, 1), nd) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "polygonize: cannot set the nodata value of '%s'", path);
    return TS_OK;
}

/* ---- filters ---------------------------------------------------------------------------------- */
/* Runs the majority filter and the sieve; *cls is the band to label (the
 * input's when neither runs), *ds the dataset owning it (or NULL). */
static ts_status run_filters(job *j, GDALDatasetH *ds, GDALRasterBandH *cls)
{
    const ts_polygonize_params *p = j->p;
    *ds = NULL;
    *cls = j->band;
    /* --mmu 1 merges nothing. */
    const int sieve = p->mmu_px > 1;
    if (!p->majority && !sieve) return TS_OK;
    ts_status st = create_work_raster(j, "filtered", GDALGetRasterDataType(j->band), j->has_nodata, j->nodata, ds);
    if (st) return st;
    GDALRasterBandH f = GDALGetRasterBand(*ds, 1);
    if (p->majority)
        st = ts_majority_filter(j->band, f, p->majority, j->has_nodata, j->nodata, &j->rep->majority_changed);
    if (!st && sieve) {
        /* After the majority filter the sieve works in place; alone it reads the input. */
        GDALRasterBandH src = p->majority ? f : j->band;
        GDALRasterBandH mask = j->has_nodata ? GDALGetMaskBand(src) : NULL;
        CPLErrorReset();
        if (GDALSieveFilter(src, mask, f, p->mmu_px, p->connectivity == 8 ? 8 : 4, NULL, NULL, NULL) != CE_None)
            st = ts_gdal_error(TS_ERR_BACKEND, "polygonize: --mmu %d: the sieve filter failed on '%s'", p->mmu_px,
                               p->input);
    }
    if (!st) *cls = f;
    return st;
}

/* ---- connected components --------------------------------------------------------------------- */
typedef struct uf {
    uint32_t *parent;
    int32_t *cls;
    size_t n, cap;
} uf;

static uint32_t uf_find(uf *u, uint32_t x)
{
    while (u->parent[x] != x) {
        u->parent[x] = u->parent[u->parent[x]];
        x = u->parent[x];
    }
    return x;
}

/* The smaller root becomes the parent, so every parent index is below its
 * child's: compaction then resolves labels in one increasing pass. */
static uint32_t uf_union(uf *u, uint32_t a, uint32_t b)
{
    a = uf_find(u, a);
    b = uf_find(u, b);
    if (a == b) return a;
    if (a < b) {
        u->parent[b] = a;
        return a;
    }
    u->parent[a] = b;
    return b;
}

static ts_status uf_new(uf *u, int32_t cls, uint32_t *label)
{
    if (u->n >= (size_t)INT32_MAX)
        return ts_error(TS_ERR_UNSUPPORTED, "polygonize: more than %d provisional regions; split the raster",
                        INT32_MAX);
    if (u->n == u->cap) {
        size_t cap = u->cap ? u->cap * 2 : 4096;
        uint32_t *p = realloc(u->parent, cap * sizeof *p);
        if (p) u->parent = p;
        int32_t *c = p ? realloc(u->cls, cap * sizeof *c) : NULL;
        if (c) u->cls = c;
        if (!p || !c) return ts_error(TS_ERR_NOMEM, "polygonize: out of memory for %zu regions", cap);
        u->cap = cap;
    }
    *label = (uint32_t)u->n;
    u->parent[u->n] = (uint32_t)u->n;
    u->cls[u->n] = cls;
    u->n++;
    return TS_OK;
}

/* Pixels skipped: nodata, and the background unless kept. */
static int is_skipped(const job *j, int32_t v)
{
    if (j->has_nodata && (double)v == j->nodata) return 1;
    return !j->p->keep_background && v == j->p->background;
}

/* Pass 1: provisional labels per row (raster prov), equivalences in u. */
static ts_status label_pass1(job *j, GDALRasterBandH cls, GDALRasterBandH prov, uf *u)
{
    const int W = j->W, eight = j->p->connectivity == 8;
    int32_t *val[2] = {calloc((size_t)W, sizeof(int32_t)), calloc((size_t)W, sizeof(int32_t))};
    uint32_t *lab[2] = {calloc((size_t)W, sizeof(uint32_t)), calloc((size_t)W, sizeof(uint32_t))};
    ts_status st = val[0] && val[1] && lab[0] && lab[1] ? TS_OK : ts_error(TS_ERR_NOMEM, "polygonize: out of memory");
    uint32_t zero = 0;
    if (!st) st = uf_new(u, -1, &zero); /* label 0: no region */
    for (int y = 0; !st && y < j->H; y++) {
        int32_t *cv = val[y & 1], *pv = val[(y + 1) & 1];
        uint32_t *cl = lab[y & 1], *pl = lab[(y + 1) & 1];
        st = read_row(cls, y, W, cv, GDT_Int32, "the class raster");
        for (int x = 0; !st && x < W; x++) {
            const int32_t v = cv[x];
            cl[x] = 0;
            if (j->has_nodata && (double)v == j->nodata) continue;
            if (v < 0 || v > MAX_CLASS_ID) {
                st = ts_error(TS_ERR_INVALID_ARG,
                              "class raster '%s': pixel (col %d, row %d) holds %d; class ids must be 0..%d (set the "
                              "band's nodata value if it marks no data)",
                              j->p->input, x, y, (int)v, MAX_CLASS_ID);
                break;
            }
            if (v > j->max_class) j->max_class = v;
            if (is_skipped(j, v)) continue;
            uint32_t l = 0;
            /* left, up, and for 8-connectivity up-left and up-right */
            const int nx[4] = {x - 1, x, x - 1, x + 1};
            for (int k = 0; k < (eight ? 4 : 2); k++) {
                const int xx = nx[k];
                if (xx < 0 || xx >= W || (k > 0 && y == 0)) continue;
                const uint32_t nl = k == 0 ? cl[xx] : pl[xx];
                const int32_t nv = k == 0 ? cv[xx] : pv[xx];
                if (!nl || nv != v) continue;
                l = l ? uf_union(u, l, nl) : uf_find(u, nl);
            }
            if (!l) st = uf_new(u, v, &l);
            cl[x] = l;
        }
        if (!st) st = write_row(prov, y, W, cl, GDT_UInt32, "the provisional label raster");
    }
    for (int i = 0; i < 2; i++) {
        free(val[i]);
        free(lab[i]);
    }
    return st;
}

/* Compacts the labels: afterwards u->parent[l] is the final region id of
 * provisional label l (1..nreg), and j->rcls the class of each region. */
static ts_status compact_labels(job *j, uf *u)
{
    int64_t k = 0;
    for (size_t i = 1; i < u->n; i++) k += u->parent[i] == i;
    j->nreg = k;
    const size_t n = (size_t)k + 1;
    j->rcls = calloc(n, sizeof *j->rcls);
    j->rpix = calloc(n, sizeof *j->rpix);
    if (j->conf) {
        j->rconf = calloc(n, sizeof *j->rconf);
        j->rconf_n = calloc(n, sizeof *j->rconf_n);
    }
    if (j->geo_area) j->rgeo = calloc(n, sizeof *j->rgeo);
    if (!j->rcls || !j->rpix || (j->conf && (!j->rconf || !j->rconf_n)) || (j->geo_area && !j->rgeo))
        return ts_error(TS_ERR_NOMEM, "polygonize: out of memory for %lld regions", (long long)k);
    uint32_t id = 0;
    u->parent[0] = 0;
    for (size_t i = 1; i < u->n; i++) {
        if (u->parent[i] == i) {
            u->parent[i] = ++id;
            j->rcls[id] = u->cls[i];
        } else {
            u->parent[i] = u->parent[u->parent[i]];
        }
    }
    free(u->cls);
    u->cls = NULL;
    return TS_OK;
}

/* Pass 2: final labels (raster lab) and per-region statistics. */
static ts_status label_pass2(job *j, GDALRasterBandH prov, GDALRasterBandH lab, const uf *u)
{
    const int W = j->W;
    uint32_t *row = malloc((size_t)W * sizeof *row);
    double *conf = j->conf ? malloc((size_t)W * sizeof *conf) : NULL;
    ts_status st = row && (!j->conf || conf) ? TS_OK : ts_error(TS_ERR_NOMEM, "polygonize: out of memory");
    for (int y = 0; !st && y < j->H; y++) {
        st = read_row(prov, y, W, row, GDT_UInt32, "the provisional label raster");
        if (!st && conf) st = read_row(j->conf, y, W, conf, GDT_Float64, "the --confidence raster");
        if (st) break;
        double cell = 0;
        if (j->geo_area) {
            const double lat0 = (j->gt[3] + y * j->gt[5]) * j->ang_unit, lat1 = lat0 + j->gt[5] * j->ang_unit;
            cell = ts_ellipsoid_cell_area(j->semi_a, j->semi_b, lat0, lat1, j->gt[1] * j->ang_unit);
        }
        for (int x = 0; x < W; x++) {
            const uint32_t r = u->parent[row[x]];
            row[x] = r;
            if (!r) continue;
            j->rpix[r]++;
            if (j->rgeo) j->rgeo[r] += cell;
            if (conf && !(j->conf_has_nd && conf[x] == j->conf_nd) && !isnan(conf[x])) {
                j->rconf[r] += conf[x];
                j->rconf_n[r]++;
            }
        }
        st = write_row(lab, y, W, row, GDT_UInt32, "the label raster");
    }
    free(row);
    free(conf);
    return st;
}

static ts_status label_regions(job *j, GDALRasterBandH cls, GDALDatasetH *lab_ds)
{
    GDALDatasetH prov_ds = NULL;
    uf u = {0};
    ts_status st = create_work_raster(j, "provisional", GDT_UInt32, 0, 0, &prov_ds);
    if (!st) st = label_pass1(j, cls, GDALGetRasterBand(prov_ds, 1), &u);
    if (!st) st = compact_labels(j, &u);
    if (!st) st = create_work_raster(j, "labels", GDT_UInt32, 1, 0, lab_ds);
    if (!st) st = label_pass2(j, GDALGetRasterBand(prov_ds, 1), GDALGetRasterBand(*lab_ds, 1), &u);
    if (!st) {
        CPLErrorReset();
        GDALFlushCache(*lab_ds);
        if (CPLGetLastErrorType() == CE_Failure) st = ts_gdal_error(TS_ERR_IO, "polygonize: writing the label raster");
    }
    if (prov_ds) GDALClose(prov_ds);
    free(u.parent);
    free(u.cls);
    j->rep->regions = j->nreg;
    return st;
}

/* GDALPolygonize of the labels into a FlatGeobuf work layer (field 0: region id). */
static ts_status polygonize_labels(job *j, GDALDatasetH lab_ds, char **fgb)
{
    ts_status st = work_name(j, "polygons", ".fgb", fgb);
    if (st) return st;
    GDALDriverH drv = GDALGetDriverByName("FlatGeobuf");
    if (!drv) return ts_error(TS_ERR_UNSUPPORTED, "polygonize: GDAL has no FlatGeobuf driver");
    CPLErrorReset();
    GDALDatasetH ds = GDALCreate(drv, *fgb, 0, 0, 0, GDT_Unknown, NULL);
    if (!ds) return ts_gdal_error(TS_ERR_IO, "polygonize: cannot create the work layer '%s'", *fgb);
    char **lco = CSLSetNameValue(NULL, "SPATIAL_INDEX", "NO");
    OGRLayerH lay = GDALDatasetCreateLayer(ds, "regions", NULL, wkbPolygon, lco);
    CSLDestroy(lco);
    OGRFieldDefnH fd = OGR_Fld_Create("region", OFTInteger);
    if (!lay || OGR_L_CreateField(lay, fd, TRUE) != OGRERR_NONE)
        st = ts_gdal_error(TS_ERR_IO, "polygonize: cannot create the work layer '%s'", *fgb);
    OGR_Fld_Destroy(fd);
    char **opt = j->p->connectivity == 8 ? CSLSetNameValue(NULL, "8CONNECTED", "8") : NULL;
    GDALRasterBandH b = GDALGetRasterBand(lab_ds, 1);
    CPLErrorReset();
    if (!st && GDALPolygonize(b, GDALGetMaskBand(b), lay, 0, opt, NULL, NULL) != CE_None)
        st = ts_gdal_error(TS_ERR_BACKEND, "polygonize: GDALPolygonize failed on '%s'", j->p->input);
    CSLDestroy(opt);
    CPLErrorReset();
    GDALClose(ds);
    if (!st && CPLGetLastErrorType() == CE_Failure)
        st = ts_gdal_error(TS_ERR_IO, "polygonize: writing the work layer '%s'", *fgb);
    return st;
}

/* ---- geometry with GEOS ----------------------------------------------------------------------- */
typedef struct geos {
    GEOSContextHandle_t h;
    GEOSWKBReader *rd;
    GEOSWKBWriter *wr;
    GEOSMakeValidParams *mv;
    char msg[512];
} geos;

static void geos_error(const char *m, void *ud)
{
    geos *g = ud;
    snprintf(g->msg, sizeof g->msg, "%s", m);
}

static ts_status geos_open(geos *g)
{
    memset(g, 0, sizeof *g);
    if (!(g->h = GEOS_init_r())) return ts_error(TS_ERR_NOMEM, "polygonize: cannot start GEOS");
    GEOSContext_setErrorMessageHandler_r(g->h, geos_error, g);
    g->rd = GEOSWKBReader_create_r(g->h);
    g->wr = GEOSWKBWriter_create_r(g->h);
    g->mv = GEOSMakeValidParams_create_r(g->h);
    if (!g->rd || !g->wr || !g->mv) return ts_error(TS_ERR_NOMEM, "polygonize: GEOS: %s", g->msg);
    /* STRUCTURE keeps areas and drops collapsed parts: polygons in, polygons out. */
    if (!GEOSMakeValidParams_setMethod_r(g->h, g->mv, GEOS_MAKE_VALID_STRUCTURE) ||
        !GEOSMakeValidParams_setKeepCollapsed_r(g->h, g->mv, 0))
        return ts_error(TS_ERR_BACKEND, "polygonize: GEOS make-valid parameters: %s", g->msg);
    return TS_OK;
}

static void geos_close(geos *g)
{
    if (!g->h) return;
    if (g->rd) GEOSWKBReader_destroy_r(g->h, g->rd);
    if (g->wr) GEOSWKBWriter_destroy_r(g->h, g->wr);
    if (g->mv) GEOSMakeValidParams_destroy_r(g->h, g->mv);
    GEOS_finish_r(g->h);
    g->h = NULL;
}

/* Shoelace area of a ring. */
static double ring_area(geos *g, const GEOSGeometry *ring)
{
    const GEOSCoordSequence *cs = GEOSGeom_getCoordSeq_r(g->h, ring);
    unsigned int n = 0;
    if (!cs || !GEOSCoordSeq_getSize_r(g->h, cs, &n) || n < 3) return 0;
    double s = 0, x0 = 0, y0 = 0, px = 0, py = 0;
    for (unsigned int i = 0; i < n; i++) {
        double x, y;
        if (!GEOSCoordSeq_getXY_r(g->h, cs, i, &x, &y)) return 0;
        if (i == 0) {
            x0 = x;
            y0 = y;
        } else {
            s += (px - x0) * (y - y0) - (x - x0) * (py - y0);
        }
        px = x;
        py = y;
    }
    return fabs(s) / 2;
}

/* A copy of polygon poly without the holes under min_hole (map units^2). */
static GEOSGeometry *fill_polygon(geos *g, const GEOSGeometry *poly, double min_hole, int64_t *filled)
{
    const int nh = GEOSGetNumInteriorRings_r(g->h, poly);
    const GEOSGeometry *ext = GEOSGetExteriorRing_r(g->h, poly);
    if (nh < 0 || !ext) return NULL;
    GEOSGeometry **holes = malloc((size_t)(nh > 0 ? nh : 1) * sizeof *holes);
    GEOSGeometry *shell = GEOSGeom_clone_r(g->h, ext);
    int k = 0, ok = holes && shell;
    for (int i = 0; ok && i < nh; i++) {
        const GEOSGeometry *r = GEOSGetInteriorRingN_r(g->h, poly, i);
        if (!r) {
            ok = 0;
        } else if (ring_area(g, r) < min_hole) {
            (*filled)++;
        } else if (!(holes[k++] = GEOSGeom_clone_r(g->h, r))) {
            ok = 0;
            k--;
        }
    }
    GEOSGeometry *out = ok ? GEOSGeom_createPolygon_r(g->h, shell, holes, (unsigned int)k) : NULL;
    if (!out) {
        for (int i = 0; i < k; i++) GEOSGeom_destroy_r(g->h, holes[i]);
        if (shell) GEOSGeom_destroy_r(g->h, shell);
    }
    free(holes);
    return out;
}

/* The polygons of g0 (a polygon, multipolygon or collection), holes under
 * min_hole filled, as one MultiPolygon; NULL on a GEOS error. */
static GEOSGeometry *to_multipolygon(geos *g, const GEOSGeometry *g0, double min_hole, int64_t *filled)
{
    const int t = GEOSGeomTypeId_r(g->h, g0);
    if (t == GEOS_POLYGON) {
        if (GEOSisEmpty_r(g->h, g0)) return GEOSGeom_createEmptyCollection_r(g->h, GEOS_MULTIPOLYGON);
        GEOSGeometry *p = fill_polygon(g, g0, min_hole, filled);
        if (!p) return NULL;
        return GEOSGeom_createCollection_r(g->h, GEOS_MULTIPOLYGON, &p, 1);
    }
    if (t != GEOS_MULTIPOLYGON && t != GEOS_GEOMETRYCOLLECTION)
        return GEOSGeom_createEmptyCollection_r(g->h, GEOS_MULTIPOLYGON); /* lines, points: no area */
    const int n = GEOSGetNumGeometries_r(g->h, g0);
    if (n < 0) return NULL;
    GEOSGeometry **parts = malloc((size_t)(n > 0 ? n : 1) * sizeof *parts);
    if (!parts) return NULL;
    int k = 0, ok = 1;
    for (int i = 0; ok && i < n; i++) {
        const GEOSGeometry *s = GEOSGetGeometryN_r(g->h, g0, i);
        if (!s) {
            ok = 0;
        } else if (GEOSGeomTypeId_r(g->h, s) == GEOS_POLYGON && !GEOSisEmpty_r(g->h, s)) {
            if (!(parts[k] = fill_polygon(g, s, min_hole, filled)))
                ok = 0;
            else
                k++;
        }
    }
    GEOSGeometry *out = ok ? GEOSGeom_createCollection_r(g->h, GEOS_MULTIPOLYGON, parts, (unsigned int)k) : NULL;
    if (!out)
        for (int i = 0; i < k; i++) GEOSGeom_destroy_r(g->h, parts[i]);
    free(parts);
    return out;
}

/* A valid version of polygon a. GDALPolygonize's rings follow pixel edges
 * and only touch themselves at corners (8-connected regions), never cross:
 * buffer(0) mends that and is several times faster than make-valid on
 * polygons with thousands of corner-touching holes. Accepted only when it
 * keeps the area; otherwise GEOS make-valid (STRUCTURE) does it. */
static GEOSGeometry *repair(geos *g, const GEOSGeometry *a)
{
    double a0 = 0, a1 = -1;
    GEOSGeometry *b = GEOSBuffer_r(g->h, a, 0, 8);
    if (b && GEOSArea_r(g->h, a, &a0) && GEOSArea_r(g->h, b, &a1) && fabs(a1 - a0) <= 1e-9 * fabs(a0)) return b;
    if (b) GEOSGeom_destroy_r(g->h, b);
    return GEOSMakeValidWithParams_r(g->h, a, g->mv);
}

/* Repairs, fills and simplifies one polygon; *out NULL when nothing is left. */
static ts_status process_geometry(job *j, geos *g, const unsigned char *wkb, size_t n, double min_hole,
                                  GEOSGeometry **out)
{
    *out = NULL;
    GEOSGeometry *a = GEOSWKBReader_read_r(g->h, g->rd, wkb, n), *b = NULL;
    if (!a) return ts_error(TS_ERR_BACKEND, "polygonize: GEOS cannot read a polygon: %s", g->msg);
    const char valid = GEOSisValid_r(g->h, a);
    if (valid == 2) {
        GEOSGeom_destroy_r(g->h, a);
        return ts_error(TS_ERR_BACKEND, "polygonize: GEOS validity check: %s", g->msg);
    }
    if (!valid) {
        b = repair(g, a);
        GEOSGeom_destroy_r(g->h, a);
        if (!b) return ts_error(TS_ERR_BACKEND, "polygonize: GEOS make-valid: %s", g->msg);
        a = b;
        j->rep->made_valid++;
    }
    b = to_multipolygon(g, a, min_hole, &j->rep->holes_filled);
    GEOSGeom_destroy_r(g->h, a);
    if (!b) return ts_error(TS_ERR_BACKEND, "polygonize: GEOS: %s", g->msg);
    if (j->p->simplify > 0 && !GEOSisEmpty_r(g->h, b)) {
        a = GEOSTopologyPreserveSimplify_r(g->h, b, j->p->simplify);
        GEOSGeom_destroy_r(g->h, b);
        if (!a) return ts_error(TS_ERR_BACKEND, "polygonize: --simplify %g: GEOS: %s", j->p->simplify, g->msg);
        b = a;
    }
    if (GEOSisEmpty_r(g->h, b)) {
        GEOSGeom_destroy_r(g->h, b);
        return TS_OK;
    }
    *out = b;
    return TS_OK;
}

/* ---- the output ------------------------------------------------------------------------------- */
static const char *class_name(const ts_class_table *ct, int id, char *buf, size_t n)
{
    if (id >= 0 && id < ct->n) return ct->names[id];
    snprintf(buf, n, "class %d", id);
    return buf;
}

static void class_rgb(const ts_class_table *ct, int id, uint8_t rgb[3])
{
    if (id >= 0 && id < ct->n)
        memcpy(rgb, ct->rgb[id], 3);
    else
        ts_default_class_color(id, rgb);
}

enum { F_CLASS, F_NAME, F_AREA, F_PIXELS, F_CONF, F_COUNT };

static ts_status create_output_layer(job *j, GDALDatasetH ds, const char *name, OGRLayerH *out)
{
    OGRSpatialReferenceH srs = NULL;
    if (j->wkt) {
        srs = OSRNewSpatialReference(j->wkt);
        if (srs) OSRSetAxisMappingStrategy(srs, OAMS_TRADITIONAL_GIS_ORDER);
    }
    CPLErrorReset();
    *out = GDALDatasetCreateLayer(ds, name, srs, wkbMultiPolygon, NULL);
    if (srs) OSRDestroySpatialReference(srs);
    if (!*out) return ts_gdal_error(TS_ERR_IO, "'%s': cannot create the layer '%s'", j->p->output, name);
    static const struct {
        const char *name;
        OGRFieldType t;
    } fields[F_COUNT] = {{"class_id", OFTInteger},
                         {"class_name", OFTString},
                         {"area", OFTReal},
                         {"pixels", OFTInteger64},
                         {"confidence", OFTReal}};
    for (int i = 0; i < F_COUNT; i++) {
        if (i == F_CONF && !j->conf) break;
        OGRFieldDefnH fd = OGR_Fld_Create(fields[i].name, fields[i].t);
        if (i == F_NAME) OGR_Fld_SetWidth(fd, 80);
        const OGRErr e = OGR_L_CreateField(*out, fd, TRUE);
        OGR_Fld_Destroy(fd);
        if (e != OGRERR_NONE)
            return ts_gdal_error(TS_ERR_IO, "'%s': cannot create the field '%s'", j->p->output, fields[i].name);
    }
    return TS_OK;
}

typedef struct writer {
    job *j;
    geos g;
    OGRLayerH dst;
    OGRFeatureDefnH defn;
    int idx[F_COUNT];
    const ts_class_table *ct;
    uint8_t *present; /* [max_class + 1] */
    unsigned char *wkb;
    size_t wkb_cap;
    double min_hole;
} writer;

static ts_status write_one(writer *w, OGRFeatureH src)
{
    job *j = w->j;
    const ts_polygonize_params *p = j->p;
    const int r = OGR_F_GetFieldAsInteger(src, 0);
    if (r < 1 || r > j->nreg)
        return ts_error(TS_ERR_BACKEND, "polygonize: the work layer holds region %d, outside 1..%lld", r,
                        (long long)j->nreg);
    const int64_t px = j->rpix[r];
    if ((p->min_area_px && px < p->min_area_px) || (p->min_area > 0 && (double)px * j->pxarea < p->min_area)) {
        j->rep->dropped_small++;
        return TS_OK;
    }
    OGRGeometryH og = OGR_F_GetGeometryRef(src);
    if (!og) return TS_OK;
    const size_t n = (size_t)OGR_G_WkbSize(og);
    if (n > w->wkb_cap) {
        unsigned char *b = realloc(w->wkb, n);
        if (!b) return ts_error(TS_ERR_NOMEM, "polygonize: out of memory for a polygon of %zu bytes", n);
        w->wkb = b;
        w->wkb_cap = n;
    }
    if (OGR_G_ExportToWkb(og, wkbNDR, w->wkb) != OGRERR_NONE)
        return ts_gdal_error(TS_ERR_BACKEND, "polygonize: cannot export region %d's polygon", r);
    GEOSGeometry *gg = NULL;
    ts_status st = process_geometry(j, &w->g, w->wkb, n, w->min_hole, &gg);
    if (st) return st;
    if (!gg) {
        j->rep->dropped_empty++;
        return TS_OK;
    }
    const double area = j->geo_area ? j->rgeo[r] : 0;
    double garea = 0;
    if (!j->geographic && !GEOSArea_r(w->g.h, gg, &garea)) st = ts_error(TS_ERR_BACKEND, "polygonize: GEOS area");
    size_t on = 0;
    unsigned char *ob = st ? NULL : GEOSWKBWriter_write_r(w->g.h, w->g.wr, gg, &on);
    GEOSGeom_destroy_r(w->g.h, gg);
    if (!st && !ob) st = ts_error(TS_ERR_BACKEND, "polygonize: GEOS cannot write a polygon: %s", w->g.msg);
    OGRGeometryH out = NULL;
    if (!st && OGR_G_CreateFromWkb(ob, NULL, &out, (int)on) != OGRERR_NONE)
        st = ts_gdal_error(TS_ERR_BACKEND, "polygonize: OGR cannot read GEOS's polygon");
    if (ob) GEOSFree_r(w->g.h, ob);
    /* Simplification may give back a Polygon; strict formats (FlatGeobuf) want the layer's type. */
    if (!st && !(out = OGR_G_ForceToMultiPolygon(out)))
        st = ts_error(TS_ERR_BACKEND, "polygonize: region %d: cannot make a MultiPolygon", r);
    if (!st && wkbFlatten(OGR_G_GetGeometryType(out)) != wkbMultiPolygon) {
        OGR_G_DestroyGeometry(out);
        j->rep->dropped_empty++;
        return TS_OK;
    }
    if (st) return st;
    OGRFeatureH f = OGR_F_Create(w->defn);
    const int cls = j->rcls[r];
    char nb[32];
    OGR_F_SetFieldInteger(f, w->idx[F_CLASS], cls);
    OGR_F_SetFieldString(f, w->idx[F_NAME], class_name(w->ct, cls, nb, sizeof nb));
    if (!j->geographic)
        OGR_F_SetFieldDouble(f, w->idx[F_AREA], garea);
    else if (j->geo_area)
        OGR_F_SetFieldDouble(f, w->idx[F_AREA], area);
    else
        OGR_F_SetFieldNull(f, w->idx[F_AREA]);
    OGR_F_SetFieldInteger64(f, w->idx[F_PIXELS], px);
    if (j->conf) {
        if (j->rconf_n[r] > 0)
            OGR_F_SetFieldDouble(f, w->idx[F_CONF], j->rconf[r] / (double)j->rconf_n[r] * j->conf_scale);
        else
            OGR_F_SetFieldNull(f, w->idx[F_CONF]);
    }
    OGR_F_SetGeometryDirectly(f, out);
    CPLErrorReset();
    if (OGR_L_CreateFeature(w->dst, f) != OGRERR_NONE)
        st = ts_gdal_error(TS_ERR_IO, "'%s': cannot write a polygon of class %d", j->p->output, cls);
    OGR_F_Destroy(f);
    if (!st) {
        j->rep->features++;
        if (!w->present[cls]) j->rep->classes_written++;
        w->present[cls] = 1;
    }
    return st;
}

static ts_status copy_features(writer *w, const char *fgb)
{
    CPLErrorReset();
    GDALDatasetH src = GDALOpenEx(fgb, GDAL_OF_VECTOR | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!src) return ts_gdal_error(TS_ERR_IO, "polygonize: cannot reopen the work layer '%s'", fgb);
    OGRLayerH lay = GDALDatasetGetLayer(src, 0);
    ts_status st = lay ? TS_OK : ts_gdal_error(TS_ERR_IO, "polygonize: the work layer '%s' has no layer", fgb);
    while (!st) {
        CPLErrorReset();
        OGRFeatureH f = OGR_L_GetNextFeature(lay);
        if (!f) {
            if (CPLGetLastErrorType() == CE_Failure)
                st = ts_gdal_error(TS_ERR_IO, "polygonize: reading the work layer '%s'", fgb);
            break;
        }
        st = write_one(w, f);
        OGR_F_Destroy(f);
    }
    GDALClose(src);
    return st;
}

/* ---- the QGIS style --------------------------------------------------------------------------- */
typedef struct sbuf {
    char *s;
    size_t n, cap;
    int oom;
} sbuf;

static void sb_add(sbuf *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void sb_add(sbuf *b, const char *fmt, ...)
{
    if (b->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        const int k = vsnprintf(b->s ? b->s + b->n : NULL, b->s ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (k < 0) {
            b->oom = 1;
            return;
        }
        if (b->s && b->n + (size_t)k < b->cap) {
            b->n += (size_t)k;
            return;
        }
        size_t cap = (b->cap ? b->cap : 4096);
        while (cap <= b->n + (size_t)k) cap *= 2;
        char *s = realloc(b->s, cap);
        if (!s) {
            b->oom = 1;
            return;
        }
        b->s = s;
        b->cap = cap;
    }
}

static void sb_xml(sbuf *b, const char *s)
{
    for (; *s; s++) switch (*s) {
        case '&': sb_add(b, "&amp;"); break;
        case '<': sb_add(b, "&lt;"); break;
        case '>': sb_add(b, "&gt;"); break;
        case '"': sb_add(b, "&quot;"); break;
        case '\'': sb_add(b, "&apos;"); break;
        default: sb_add(b, "%c", *s);
        }
}

/* QGIS's fill symbol: Option map (QGIS >= 3.26) and the older prop list. */
static void qml_symbol(sbuf *b, int k, const uint8_t c[3])
{
    char fill[32], line[32];
    snprintf(fill, sizeof fill, "%d,%d,%d,255", c[0], c[1], c[2]);
    snprintf(line, sizeof line, "%d,%d,%d,255", c[0] * 3 / 5, c[1] * 3 / 5, c[2] * 3 / 5);
    static const char *const keys[] = {"color", "outline_color", "outline_style", "outline_width",
                                       "outline_width_unit", "style", "joinstyle"};
    const char *vals[] = {fill, line, "solid", "0.26", "MM", "solid", "bevel"};
    const int nk = (int)(sizeof keys / sizeof keys[0]);
    sb_add(b, "      <symbol type=\"fill\" name=\"%d\" alpha=\"1\" clip_to_extent=\"1\" force_rhr=\"0\">\n", k);
    sb_add(b, "        <layer class=\"SimpleFill\" enabled=\"1\" pass=\"0\" locked=\"0\">\n");
    sb_add(b, "          <Option type=\"Map\">\n");
    for (int i = 0; i < nk; i++)
        sb_add(b, "            <Option type=\"QString\" name=\"%s\" value=\"%s\"/>\n", keys[i], vals[i]);
    sb_add(b, "          </Option>\n");
    for (int i = 0; i < nk; i++) sb_add(b, "          <prop k=\"%s\" v=\"%s\"/>\n", keys[i], vals[i]);
    sb_add(b, "        </layer>\n      </symbol>\n");
}

/* A categorized renderer on class_id, one category per class written. */
static char *make_qml(const writer *w)
{
    const job *j = w->j;
    sbuf b = {0};
    char nb[32];
    sb_add(&b, "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
               "<qgis version=\"3.28.0\" styleCategories=\"Symbology\">\n"
               "  <renderer-v2 type=\"categorizedSymbol\" attr=\"class_id\" forceraster=\"0\" symbollevels=\"0\" "
               "enableorderby=\"0\" referencescale=\"-1\">\n    <categories>\n");
    int k = 0;
    for (int c = 0; c <= j->max_class; c++) {
        if (!w->present[c]) continue;
        sb_add(&b, "      <category value=\"%d\" label=\"", c);
        sb_xml(&b, class_name(w->ct, c, nb, sizeof nb));
        sb_add(&b, "\" symbol=\"%d\" render=\"true\"/>\n", k++);
    }
    sb_add(&b, "    </categories>\n    <symbols>\n");
    k = 0;
    for (int c = 0; c <= j->max_class; c++) {
        if (!w->present[c]) continue;
        uint8_t rgb[3];
        class_rgb(w->ct, c, rgb);
        qml_symbol(&b, k++, rgb);
    }
    sb_add(&b, "    </symbols>\n  </renderer-v2>\n  <layerGeometryType>2</layerGeometryType>\n</qgis>\n");
    if (b.oom) {
        free(b.s);
        return NULL;
    }
    return b.s;
}

/* The table QGIS reads a GeoPackage layer's default style from, created the
 * way QGIS's OGR provider creates it (FID "id", the same fields). */
static ts_status write_layer_styles(job *j, GDALDatasetH ds, OGRLayerH lay, const char *qml)
{
    const char *out = j->p->output;
    char **lco = CSLSetNameValue(NULL, "FID", "id");
    CPLErrorReset();
    OGRLayerH st_lay = GDALDatasetCreateLayer(ds, "layer_styles", NULL, wkbNone, lco);
    CSLDestroy(lco);
    if (!st_lay) return ts_gdal_error(TS_ERR_IO, "'%s': cannot create the layer_styles table", out);
    static const struct {
        const char *name;
        OGRFieldType t;
        int width;
    } f[] = {{"f_table_catalog", OFTString, 256}, {"f_table_schema", OFTString, 256},
             {"f_table_name", OFTString, 256},    {"f_geometry_column", OFTString, 256},
             {"styleName", OFTString, 30},        {"styleQML", OFTString, 0},
             {"styleSLD", OFTString, 0},          {"useAsDefault", OFTInteger, -1},
             {"description", OFTString, 0},       {"owner", OFTString, 30},
             {"ui", OFTString, 30},               {"update_time", OFTDateTime, -2}};
    const int nf = (int)(sizeof f / sizeof f[0]);
    for (int i = 0; i < nf; i++) {
        OGRFieldDefnH fd = OGR_Fld_Create(f[i].name, f[i].t);
        if (f[i].width > 0) OGR_Fld_SetWidth(fd, f[i].width);
        if (f[i].width == -1) OGR_Fld_SetSubType(fd, OFSTBoolean);
        if (f[i].width == -2) OGR_Fld_SetDefault(fd, "CURRENT_TIMESTAMP");
        const OGRErr e = OGR_L_CreateField(st_lay, fd, TRUE);
        OGR_Fld_Destroy(fd);
        if (e != OGRERR_NONE)
            return ts_gdal_error(TS_ERR_IO, "'%s': cannot create the field %s of layer_styles", out, f[i].name);
    }
    OGRFeatureH ft = OGR_F_Create(OGR_L_GetLayerDefn(st_lay));
    const char *lname = OGR_L_GetName(lay), *gcol = OGR_L_GetGeometryColumn(lay);
    OGR_F_SetFieldString(ft, 0, "");
    OGR_F_SetFieldString(ft, 1, "");
    OGR_F_SetFieldString(ft, 2, lname);
    OGR_F_SetFieldString(ft, 3, gcol ? gcol : "geom");
    OGR_F_SetFieldString(ft, 4, lname);
    OGR_F_SetFieldString(ft, 5, qml);
    OGR_F_SetFieldString(ft, 6, "");
    OGR_F_SetFieldInteger(ft, 7, 1);
    OGR_F_SetFieldString(ft, 8, "class colours (terraseg polygonize)");
    OGR_F_SetFieldString(ft, 9, "");
    CPLErrorReset();
    const OGRErr e = OGR_L_CreateFeature(st_lay, ft);
    OGR_F_Destroy(ft);
    if (e != OGRERR_NONE) return ts_gdal_error(TS_ERR_IO, "'%s': cannot write the layer style", out);
    return TS_OK;
}

/* OUT.qml beside a non-GeoPackage output (QGIS loads it with the layer);
 * written under the temporary stem, ts_gdal_out_commit renames it. */
static ts_status write_qml_sidecar(job *j, const char *qml)
{
    const char *path = CPLSPrintf("%s.qml", j->work_stem);
    char *p = strdup(path);
    if (!p) return ts_error(TS_ERR_NOMEM, "polygonize: out of memory");
    VSILFILE *f = VSIFOpenL(p, "wb");
    ts_status st = TS_OK;
    const size_t n = strlen(qml);
    if (!f || VSIFWriteL(qml, 1, n, f) != n)
        st = ts_error(TS_ERR_IO, "'%s': cannot write the style file '%s'", j->p->output, p);
    if (f && VSIFCloseL(f) != 0 && !st)
        st = ts_error(TS_ERR_IO, "'%s': cannot write the style file '%s'", j->p->output, p);
    free(p);
    return st;
}

/* The output's layer name: --layer, or the output file name without extension. */
static ts_status layer_name(const job *j, char *buf, size_t n)
{
    if (j->p->layer) {
        snprintf(buf, n, "%s", j->p->layer);
        return TS_OK;
    }
    const char *o = j->p->output, *s = strrchr(o, '/');
    s = s ? s + 1 : o;
    const char *dot = strrchr(s, '.');
    const size_t len = dot && dot != s ? (size_t)(dot - s) : strlen(s);
    snprintf(buf, n, "%.*s", (int)len, s);
    return *buf ? TS_OK : ts_error(TS_ERR_INVALID_ARG, "'%s': give a layer name with --layer", o);
}

static ts_status write_output(job *j, const char *fgb)
{
    const ts_polygonize_params *p = j->p;
    const char *drv_name = ts_vector_driver_for(p->output);
    GDALDriverH drv = drv_name ? GDALGetDriverByName(drv_name) : NULL;
    if (!drv) return ts_error(TS_ERR_UNSUPPORTED, "'%s': this GDAL has no %s driver", p->output, drv_name);
    j->rep->driver = drv_name;
    ts_status st = layer_name(j, j->rep->layer, sizeof j->rep->layer);
    if (st) return st;
    ts_class_table ct = {0};
    st = ts_class_table_read_band(j->band, j->max_class, &ct);
    if (st) return st;
    writer w = {.j = j, .ct = &ct};
    w.min_hole = p->fill_holes > 0 ? p->fill_holes : (double)p->fill_holes_px * j->pxarea;
    w.present = calloc((size_t)j->max_class + 1, 1);
    if (!w.present) st = ts_error(TS_ERR_NOMEM, "polygonize: out of memory");
    if (!st) st = geos_open(&w.g);
    GDALDatasetH ds = NULL;
    if (!st) {
        CPLErrorReset();
        ds = GDALCreate(drv, j->out.tmp, 0, 0, 0, GDT_Unknown, NULL);
        if (!ds) st = ts_gdal_error(TS_ERR_IO, "'%s': cannot create '%s'", p->output, j->out.tmp);
    }
    if (!st) st = create_output_layer(j, ds, j->rep->layer, &w.dst);
    int in_tr = 0;
    if (!st) {
        w.defn = OGR_L_GetLayerDefn(w.dst);
        static const char *const names[F_COUNT] = {"class_id", "class_name", "area", "pixels", "confidence"};
        for (int i = 0; i < F_COUNT; i++) w.idx[i] = OGR_FD_GetFieldIndex(w.defn, names[i]);
        /* One transaction: a GeoPackage otherwise commits (and syncs) each polygon. */
        in_tr = GDALDatasetTestCapability(ds, ODsCTransactions) &&
                GDALDatasetStartTransaction(ds, FALSE) == OGRERR_NONE;
        if (fgb) st = copy_features(&w, fgb);
    }
    if (!st && in_tr && GDALDatasetCommitTransaction(ds) != OGRERR_NONE)
        st = ts_gdal_error(TS_ERR_IO, "'%s': cannot commit the polygons", p->output);
    if (!st && !p->no_style) {
        char *qml = make_qml(&w);
        if (!qml) st = ts_error(TS_ERR_NOMEM, "polygonize: out of memory for the style");
        else if (strcmp(drv_name, "GPKG") == 0) {
            st = write_layer_styles(j, ds, w.dst, qml);
            j->rep->style = 1;
        } else {
            st = write_qml_sidecar(j, qml);
            j->rep->style = 2;
        }
        free(qml);
    }
    if (ds) {
        CPLErrorReset();
        GDALClose(ds);
        if (!st && CPLGetLastErrorType() == CE_Failure)
            st = ts_gdal_error(TS_ERR_IO, "'%s': finishing '%s'", p->output, j->out.tmp);
    }
    geos_close(&w.g);
    free(w.wkb);
    free(w.present);
    ts_class_table_free(&ct);
    return st;
}

/* ts_gdal_out_commit/abort move or remove OUT.qml with the output; this
 * finishes the job if the temporary style is still there (it is harmless
 * when they did), so the style never lags behind or outlives its output. */
static ts_status finish_qml(job *j, ts_status st)
{
    char *tmp = strdup(CPLSPrintf("%s.qml", j->work_stem));
    const char *o = j->p->output, *slash = strrchr(o, '/'), *dot = strrchr(slash ? slash + 1 : o, '.');
    const int stem = dot ? (int)(dot - o) : (int)strlen(o);
    char *fin = strdup(CPLSPrintf("%.*s.qml", stem, o));
    VSIStatBufL sb;
    if (!tmp || !fin) {
        if (!st) st = ts_error(TS_ERR_NOMEM, "polygonize: out of memory");
    } else if (VSIStatL(tmp, &sb) == 0) {
        if (st)
            VSIUnlink(tmp);
        else if (VSIRename(tmp, fin) != 0)
            st = ts_error(TS_ERR_IO, "'%s': cannot rename the style '%s' to '%s'", o, tmp, fin);
    }
    free(tmp);
    free(fin);
    return st;
}

/* ---- the pipeline ----------------------------------------------------------------------------- */
static void job_free(job *j)
{
    remove_work(j);
    if (j->conf_ds) GDALClose(j->conf_ds);
    if (j->in) GDALClose(j->in);
    free(j->wkt);
    free(j->work_stem);
    free(j->rcls);
    free(j->rpix);
    free(j->rconf);
    free(j->rconf_n);
    free(j->rgeo);
}

ts_status ts_polygonize(const ts_polygonize_params *p, ts_polygonize_report *rep)
{
    ts_polygonize_report dummy;
    if (!rep) rep = &dummy;
    memset(rep, 0, sizeof *rep);
    if (!p) return ts_error(TS_ERR_INVALID_ARG, "polygonize: no parameters");
    ts_status st = check_params(p);
    if (st) return st;
    ts_gdal_init();
    job j = {.p = p, .rep = rep, .max_class = -1};
    st = ts_gdal_out_begin(&j.out, p->output, p->overwrite, "polygons");
    if (st) return st;
    if (!st) st = open_input(&j);
    if (!st) st = check_crs(&j);
    if (!st) st = open_confidence(&j);
    if (!st) st = make_work_stem(&j);
    GDALDatasetH filt = NULL, lab = NULL;
    GDALRasterBandH cls = NULL;
    char *fgb = NULL;
    if (!st) {
        rep->width = j.W;
        rep->height = j.H;
        rep->georeferenced = j.has_gt;
        rep->geographic = j.geographic;
        rep->pixel_area = j.pxarea;
        j.small = (int64_t)j.W * j.H <= SMALL_RASTER_PIXELS;
        st = run_filters(&j, &filt, &cls);
    }
    if (!st) st = label_regions(&j, cls, &lab);
    if (filt) GDALClose(filt);
    /* No region: an empty layer (an empty FlatGeobuf work layer cannot be reopened). */
    if (!st && j.nreg == 0)
        warnf(&j, "'%s' has no pixels of any class but the skipped background; the output has no polygons", p->input);
    else if (!st)
        st = polygonize_labels(&j, lab, &fgb);
    if (lab) GDALClose(lab);
    if (!st && j.max_class < 0) j.max_class = 0;
    if (!st) st = write_output(&j, fgb);
    if (!st)
        st = ts_gdal_out_commit(&j.out);
    else
        ts_gdal_out_abort(&j.out);
    if (j.work_stem) st = finish_qml(&j, st);
    job_free(&j);
    return st;
}
