/* terraseg polygonize CLASSES.tif OUT.gpkg
 *
 * Options map one to one onto ts_polygonize_params (io/polygonize.h), which
 * says what each step does. Here: option checks that need no file, the
 * FILE[:BAND] form of --confidence, warnings to stderr, and a summary. */
#include "tools/cmd_polygonize.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/polygonize.h"

static int pz_band = 1;
static int pz_connectivity = 4;
static int pz_majority = 0;
static int pz_mmu = 0;
static int pz_background = 0;
static int pz_keep_background = 0;
static double pz_simplify = 0;
static double pz_min_area = 0;
static int pz_min_area_px = 0;
static double pz_fill_holes = 0;
static int pz_fill_holes_px = 0;
static const char *pz_confidence = NULL;
static const char *pz_layer = NULL;
static int pz_overwrite = 0;
static int pz_no_style = 0;

cli_option polygonize_options[] = {
    {"band", 'b', CLI_INT, &pz_band, "N", "the band of class ids", 1, 65535},
    {"connectivity", 'c', CLI_INT, &pz_connectivity, "4|8",
     "pixels touching by an edge (4) or also by a corner (8) form one polygon", 4, 8},
    {"mmu", 0, CLI_INT, &pz_mmu, "PX",
     "minimum mapping unit: regions of fewer pixels are merged into their largest neighbour (GDAL sieve) before "
     "polygonizing; 0 is off",
     0, 2147483647.0},
    {"majority", 0, CLI_INT, &pz_majority, "SIZE",
     "majority (modal) filter over a SIZE x SIZE window (odd, 3..15) before the sieve; nodata stays nodata; "
     "0 is off",
     0, 15},
    {"background", 0, CLI_INT, &pz_background, "ID", "the class id that gets no polygons", 0, 65535},
    {"keep-background", 0, CLI_FLAG, &pz_keep_background, NULL, "write polygons for the background class too", 0, 0},
    {"simplify", 0, CLI_DOUBLE, &pz_simplify, "TOL",
     "topology-preserving simplification tolerance in map units, per polygon: edges shared by two polygons are "
     "simplified separately and may open small gaps or overlaps; 0 is off",
     0, 1e300},
    {"min-area", 0, CLI_DOUBLE, &pz_min_area, "AREA",
     "drop polygons under AREA map units^2 (projected CRS only; they leave a gap, --mmu merges instead)", 0, 1e300},
    {"min-area-px", 0, CLI_INT, &pz_min_area_px, "PX", "drop polygons of fewer than PX pixels", 0, 2147483647.0},
    {"fill-holes", 0, CLI_DOUBLE, &pz_fill_holes, "AREA",
     "fill holes under AREA map units^2 (projected CRS only; the filled polygon then overlaps what was in the hole)",
     0, 1e300},
    {"fill-holes-px", 0, CLI_INT, &pz_fill_holes_px, "PX", "fill holes smaller than PX pixels' area", 0,
     2147483647.0},
    {"confidence", 0, CLI_STRING, &pz_confidence, "FILE[:BAND]",
     "confidence raster on the same grid (terraseg predict --confidence: a Byte band with its GDAL scale, or "
     "p x 255 without one; or a float band of 0..1): adds the mean confidence (0..1) of each polygon's pixels",
     0, 0},
    {"layer", 'l', CLI_STRING, &pz_layer, "NAME", "output layer name (default: OUT's file name without extension)", 0,
     0},
    {"overwrite", 0, CLI_FLAG, &pz_overwrite, NULL, "replace OUT if it exists", 0, 0},
    {"no-style", 0, CLI_FLAG, &pz_no_style, NULL,
     "write no QGIS style (by default a GPKG gets a layer_styles table, other formats OUT.qml, with the class colours)",
     0, 0},
    {0},
};

static void print_warning(void *ctx, const char *msg)
{
    fprintf(stderr, "%s: warning: %s\n", (const char *)ctx, msg);
}

/* "FILE:BAND" -> FILE and BAND when the part after the last ':' is a number; *file is malloc'ed. */
static int split_band(const char *arg, char **file, int *band)
{
    const char *c = strrchr(arg, ':');
    *band = 1;
    int digits = c && c[1];
    for (const char *q = c ? c + 1 : ""; digits && *q; q++) digits = isdigit((unsigned char)*q);
    const size_t n = digits ? (size_t)(c - arg) : strlen(arg);
    if (digits) *band = atoi(c + 1);
    if (!(*file = malloc(n + 1))) return 0;
    memcpy(*file, arg, n);
    (*file)[n] = '\0';
    return 1;
}

int run_polygonize(int argc, char **argv)
{
    const char *cmd = "terraseg polygonize";
    if (argc != 2) {
        fprintf(stderr, "%s: expected CLASSES.tif and OUT (.gpkg, .geojson, .shp or .fgb)\n", cmd);
        return 2;
    }
    if (pz_connectivity != 4 && pz_connectivity != 8) {
        fprintf(stderr, "%s: --connectivity must be 4 or 8, got %d\n", cmd, pz_connectivity);
        return 2;
    }
    if (pz_majority && (pz_majority < 3 || pz_majority % 2 == 0)) {
        fprintf(stderr, "%s: --majority must be an odd window size from 3 to 15, got %d\n", cmd, pz_majority);
        return 2;
    }
    if (pz_keep_background && pz_background) {
        fprintf(stderr, "%s: give --background or --keep-background, not both\n", cmd);
        return 2;
    }
    if ((pz_min_area > 0 && pz_min_area_px > 0) || (pz_fill_holes > 0 && pz_fill_holes_px > 0)) {
        fprintf(stderr, "%s: give an area in map units or in pixels, not both (--min-area/--min-area-px, "
                        "--fill-holes/--fill-holes-px)\n", cmd);
        return 2;
    }
    char *conf = NULL;
    int conf_band = 1;
    if (pz_confidence && (!split_band(pz_confidence, &conf, &conf_band) || !*conf || conf_band < 1)) {
        fprintf(stderr, "%s: --confidence expects FILE or FILE:BAND (BAND from 1), got \"%s\"\n", cmd, pz_confidence);
        free(conf);
        return 2;
    }
    ts_polygonize_params p;
    ts_polygonize_params_init(&p);
    p.input = argv[0];
    p.output = argv[1];
    p.band = pz_band;
    p.layer = pz_layer;
    p.overwrite = pz_overwrite;
    p.connectivity = pz_connectivity;
    p.majority = pz_majority;
    p.mmu_px = pz_mmu;
    p.background = pz_background;
    p.keep_background = pz_keep_background;
    p.simplify = pz_simplify;
    p.min_area = pz_min_area;
    p.min_area_px = pz_min_area_px;
    p.fill_holes = pz_fill_holes;
    p.fill_holes_px = pz_fill_holes_px;
    p.confidence = conf;
    p.confidence_band = conf_band;
    p.no_style = pz_no_style;
    p.warn = print_warning;
    p.warn_ctx = (void *)cmd;
    ts_polygonize_report r;
    ts_status st = ts_polygonize(&p, &r);
    free(conf);
    if (st) {
        fprintf(stderr, "%s: %s\n", cmd, ts_last_error());
        return 1;
    }
    const char *space = !r.georeferenced ? "pixel space (no georeferencing)"
                        : r.geographic    ? "geographic CRS (areas in m^2 on the ellipsoid)"
                                          : "areas in map units^2";
    printf("input: %s (%lldx%lld), %s, connectivity %d\n", argv[0], (long long)r.width, (long long)r.height, space,
           pz_connectivity);
    if (pz_majority)
        printf("majority %dx%d: %lld pixels changed\n", pz_majority, pz_majority, (long long)r.majority_changed);
    if (pz_mmu > 1) printf("sieve: regions under %d pixels merged into a neighbour\n", pz_mmu);
    printf("regions: %lld%s\n", (long long)r.regions, pz_keep_background ? "" : " (background skipped)");
    if (r.dropped_small) printf("  dropped %lld under the minimum area\n", (long long)r.dropped_small);
    if (r.dropped_empty) printf("  dropped %lld empty after simplification\n", (long long)r.dropped_empty);
    if (r.made_valid) printf("  repaired %lld invalid polygons (GEOS make-valid)\n", (long long)r.made_valid);
    if (r.holes_filled) printf("  filled %lld holes\n", (long long)r.holes_filled);
    printf("wrote %lld polygon%s of %d class%s to %s (%s, layer %s)%s\n", (long long)r.features,
           r.features == 1 ? "" : "s", r.classes_written, r.classes_written == 1 ? "" : "es", argv[1], r.driver,
           r.layer, r.style == 1 ? ", QGIS style in layer_styles" : (r.style == 2 ? ", QGIS style in .qml" : ""));
    return 0;
}
