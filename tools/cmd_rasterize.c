/* terraseg rasterize LABELS --like IMAGE OUT.tif
 *
 * Writes the labels exactly as training reads them (io/labels.h): one band of
 * class ids on the image grid (size, geotransform, CRS), Byte when every id
 * fits (ignore id 255 included), else UInt16, else UInt32. The ignore id is
 * the band's nodata value, so the file opened again as a mask gives the same
 * labels (nodata -> ignore), and GIS viewers show unlabelled pixels as empty.
 * The output is a tiled, DEFLATE-compressed GeoTIFF written 512x512 block by
 * block (memory stays bounded whatever the image size) to OUT.tmp, renamed to
 * OUT only when complete. */
#include "tools/cmd_rasterize.h"

#include <cpl_conv.h>
#include <cpl_error.h>
#include <cpl_string.h>
#include <gdal.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/io.h"
#include "io/labels.h"

static const char *rz_like = NULL;
static const char *rz_attribute = NULL;
static const char *rz_burn = NULL;
static const char *rz_layer = NULL;
static const char *rz_class_map = NULL;
static const char *rz_color_map = NULL;
static int rz_all_touched = 0;
static int rz_binary = 0;
static int rz_unknown_ignore = 0;
static const char *rz_assume_crs = NULL;
static int rz_classes = 0;
static int rz_ignore = 255;
static int rz_background = 0;
static int rz_band = 1;

cli_option rasterize_options[] = {
    {"like", 0, CLI_STRING, &rz_like, "IMAGE", "the image whose grid (size, geotransform, CRS) the output takes (required)",
     0, 0},
    {"attribute", 'a', CLI_STRING, &rz_attribute, "NAME",
     "vector: the class attribute (integer, or names with --class-map)", 0, 0},
    {"burn", 0, CLI_STRING, &rz_burn, "ID", "vector: burn this class id into every feature (default 1 without --attribute)",
     0, 0},
    {"class-map", 0, CLI_STRING, &rz_class_map, "MAP", "vector: class names to ids, e.g. building=1,road=2", 0, 0},
    {"layer", 'l', CLI_STRING, &rz_layer, "NAME", "vector: the layer (default: the first)", 0, 0},
    {"all-touched", 0, CLI_FLAG, &rz_all_touched, NULL, "vector: burn every pixel a geometry touches", 0, 0},
    {"color-map", 0, CLI_STRING, &rz_color_map, "MAP",
     "raster: RGB(A) colours to ids, e.g. #ff0000=1,#00ff00=2 (RRGGBBAA to match alpha too)", 0, 0},
    {"unknown-ignore", 0, CLI_FLAG, &rz_unknown_ignore, NULL,
     "raster: a colour not in --color-map becomes the ignore id (default: background)", 0, 0},
    {"band", 'b', CLI_INT, &rz_band, "N", "raster: the band holding class ids", 1, 65535},
    {"binary", 0, CLI_FLAG, &rz_binary, NULL, "every non-zero id other than the ignore id becomes 1", 0, 0},
    {"classes", 'k', CLI_INT, &rz_classes, "K", "check that every id is < K (0: no check)", 0, 2147483647.0},
    {"ignore", 0, CLI_INT, &rz_ignore, "ID", "the ignore id: mask nodata, outside the mask; written as nodata", 0,
     2147483647.0},
    {"background", 0, CLI_INT, &rz_background, "ID", "the id of pixels no feature covers and of unknown colours", 0,
     2147483647.0},
    {"assume-crs", 0, CLI_STRING, &rz_assume_crs, "CRS",
     "labels without a CRS are in this CRS (EPSG:4674, WKT, PROJ), or 'image' for the image's CRS (default: error)",
     0, 0},
    {0},
};

#define RZ_BLOCK 512

static int fail(const char *what)
{
    fprintf(stderr, "terraseg rasterize: %s%s%s\n", what, *ts_last_error() ? ": " : "", ts_last_error());
    return 1;
}

/* The image's grid; identity georeferencing when it has none. */
static ts_status read_grid(const char *path, ts_grid *g)
{
    memset(g, 0, sizeof *g);
    CPLErrorReset();
    GDALDatasetH ds = GDALOpenEx(path, GDAL_OF_RASTER | GDAL_OF_READONLY, NULL, NULL, NULL);
    if (!ds) return ts_gdal_error(TS_ERR_IO, "--like '%s': cannot open it as a raster", path);
    g->width = GDALGetRasterXSize(ds);
    g->height = GDALGetRasterYSize(ds);
    if (GDALGetGeoTransform(ds, g->gt) != CE_None) {
        const double id[6] = {0, 1, 0, 0, 0, 1};
        memcpy(g->gt, id, sizeof id);
    }
    const char *wkt = GDALGetProjectionRef(ds);
    ts_status st = TS_OK;
    if (wkt && *wkt && !(g->crs_wkt = strdup(wkt))) st = ts_error(TS_ERR_NOMEM, "out of memory");
    GDALClose(ds);
    return st;
}

int run_rasterize(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "terraseg rasterize: expected LABELS and OUT.tif (and --like IMAGE)\n");
        return 2;
    }
    if (!rz_like) {
        fprintf(stderr, "terraseg rasterize: --like IMAGE is required: the output takes that image's grid\n");
        return 2;
    }
    if (rz_attribute && rz_burn) {
        fprintf(stderr, "terraseg rasterize: give --attribute or --burn, not both\n");
        return 2;
    }
    if (rz_class_map && !rz_attribute) {
        fprintf(stderr, "terraseg rasterize: --class-map needs --attribute (the attribute holding the names)\n");
        return 2;
    }
    const char *labels_path = argv[0], *out_path = argv[1];

    ts_label_opts o;
    ts_label_opts_init(&o);
    o.ignore_id = rz_ignore;
    o.background_id = rz_background;
    o.classes = rz_classes;
    o.binary = rz_binary;
    o.band = rz_band;
    o.unknown_color_ignore = rz_unknown_ignore;
    o.layer = rz_layer;
    o.attribute = rz_attribute;
    o.all_touched = rz_all_touched;
    if (rz_assume_crs && strcmp(rz_assume_crs, "image") == 0)
        o.assume_image_crs = 1;
    else
        o.assume_crs = rz_assume_crs;
    if (rz_burn) {
        char *end = NULL;
        long long v = strtoll(rz_burn, &end, 10);
        if (!*rz_burn || *end || v < 0 || v > 2147483647LL) {
            fprintf(stderr, "terraseg rasterize: --burn expects a whole class id >= 0, got \"%s\"\n", rz_burn);
            return 2;
        }
        o.burn = (int32_t)v;
    }
    ts_label_class *cmap = NULL;
    ts_label_color *colors = NULL;
    if (rz_class_map && ts_label_parse_class_map(rz_class_map, &cmap, &o.n_class_map)) {
        fprintf(stderr, "terraseg rasterize: --class-map: %s\n", ts_last_error());
        return 2;
    }
    o.class_map = cmap;
    if (rz_color_map && ts_label_parse_color_map(rz_color_map, &colors, &o.n_colors)) {
        fprintf(stderr, "terraseg rasterize: --color-map: %s\n", ts_last_error());
        free(cmap);
        return 2;
    }
    o.colors = colors;

    ts_gdal_init();
    ts_grid grid;
    ts_labels *l = NULL;
    if (read_grid(rz_like, &grid)) {
        free(cmap);
        free(colors);
        return fail("reading the image grid");
    }
    ts_status st = ts_labels_open(labels_path, &grid, &o, &l);
    free(cmap);
    free(colors);
    if (st) {
        ts_grid_free(&grid);
        return fail("opening the labels");
    }

    const int64_t max_id = ts_labels_max_id(l);
    const GDALDataType type = max_id <= 255 ? GDT_Byte : max_id <= 65535 ? GDT_UInt16 : GDT_UInt32;
    size_t tmp_len = strlen(out_path) + 5;
    char *tmp = malloc(tmp_len);
    int32_t *mask = malloc((size_t)RZ_BLOCK * RZ_BLOCK * sizeof *mask);
    const size_t n_hist = max_id <= 65535 ? (size_t)max_id + 1 : 0;
    uint64_t *hist = n_hist ? calloc(n_hist, sizeof *hist) : NULL;
    if (!tmp || !mask || (n_hist && !hist)) {
        free(tmp);
        free(mask);
        free(hist);
        ts_labels_close(l);
        ts_grid_free(&grid);
        fprintf(stderr, "terraseg rasterize: out of memory\n");
        return 1;
    }
    snprintf(tmp, tmp_len, "%s.tmp", out_path);

    GDALDriverH gtiff = GDALGetDriverByName("GTiff");
    char **co = NULL;
    co = CSLSetNameValue(co, "TILED", "YES");
    co = CSLSetNameValue(co, "BLOCKXSIZE", "512");
    co = CSLSetNameValue(co, "BLOCKYSIZE", "512");
    co = CSLSetNameValue(co, "COMPRESS", "DEFLATE");
    co = CSLSetNameValue(co, "BIGTIFF", "IF_SAFER");
    CPLErrorReset();
    GDALDatasetH out = gtiff ? GDALCreate(gtiff, tmp, (int)grid.width, (int)grid.height, 1, type, co) : NULL;
    CSLDestroy(co);
    GDALRasterBandH band = out ? GDALGetRasterBand(out, 1) : NULL;
    if (!out || !band)
        st = ts_gdal_error(TS_ERR_IO, "cannot create '%s'", tmp);
    if (!st && GDALSetGeoTransform(out, grid.gt) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "'%s': cannot set the geotransform", tmp);
    if (!st && grid.crs_wkt && GDALSetProjection(out, grid.crs_wkt) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "'%s': cannot set the CRS", tmp);
    if (!st && GDALSetRasterNoDataValue(band, (double)o.ignore_id) != CE_None)
        st = ts_gdal_error(TS_ERR_IO, "'%s': cannot set nodata", tmp);

    for (int64_t r = 0; !st && r < grid.height; r += RZ_BLOCK)
        for (int64_t c = 0; !st && c < grid.width; c += RZ_BLOCK) {
            ts_window w = {c, r, (int)(grid.width - c < RZ_BLOCK ? grid.width - c : RZ_BLOCK),
                           (int)(grid.height - r < RZ_BLOCK ? grid.height - r : RZ_BLOCK)};
            st = ts_labels_read(l, &w, mask);
            if (st) break;
            const size_t n = (size_t)w.width * (size_t)w.height;
            if (hist)
                for (size_t i = 0; i < n; i++)
                    if (mask[i] >= 0 && (size_t)mask[i] < n_hist) hist[mask[i]]++;
            if (GDALRasterIO(band, GF_Write, (int)c, (int)r, w.width, w.height, mask, w.width, w.height, GDT_Int32, 0,
                             0) != CE_None)
                st = ts_gdal_error(TS_ERR_IO, "'%s': writing the block at col %" PRId64 ", row %" PRId64, tmp, c, r);
        }
    if (out) {
        if (!st) {
            CPLErrorReset();
            GDALFlushCache(out);
            if (CPLGetLastErrorType() == CE_Failure) st = ts_gdal_error(TS_ERR_IO, "'%s': writing", tmp);
        }
        GDALClose(out);
        if (!st && CPLGetLastErrorType() == CE_Failure) st = ts_gdal_error(TS_ERR_IO, "'%s': closing", tmp);
    }
    if (!st && rename(tmp, out_path) != 0) st = ts_error(TS_ERR_IO, "cannot rename '%s' to '%s'", tmp, out_path);
    if (st && out) VSIUnlink(tmp);

    int rc = 0;
    if (st) {
        rc = fail("rasterize");
    } else {
        printf("wrote %s: %" PRId64 "x%" PRId64 ", %s, nodata %d (the ignore id), labels %s (%s)\n", out_path,
               grid.width, grid.height, GDALGetDataTypeName(type), (int)o.ignore_id, labels_path,
               ts_labels_is_vector(l) ? "vector" : "raster");
        for (size_t k = 0; k < n_hist; k++)
            if (hist[k])
                printf("  id %zu%s: %" PRIu64 " pixels\n", k, (int64_t)k == o.ignore_id ? " (ignore)" : "", hist[k]);
    }
    free(hist);
    free(mask);
    free(tmp);
    ts_labels_close(l);
    ts_grid_free(&grid);
    return rc;
}
