/* Class raster -> polygons (`terraseg polygonize`): one polygon per
 * connected region of one class, with class id, name, area, pixel count and
 * optionally the mean confidence, written to GPKG, GeoJSON, Shapefile or
 * FlatGeobuf (chosen by extension) through a temporary name and a rename.
 *
 * The steps, each streamed by rows so memory does not grow with the raster
 * (only with the number of regions, as GDALPolygonize's own does):
 *   1. optional majority (modal) filter, size x size, written by us;
 *   2. optional sieve (GDALSieveFilter): regions under the minimum mapping
 *      unit (pixels) are merged into their largest neighbour;
 *   3. connected-component labelling (4 or 8 neighbours) with per-region
 *      pixel count and confidence sum, into a UInt32 label raster;
 *   4. GDALPolygonize of the label raster: exactly one polygon per region,
 *      identical in shape to GDALPolygonize of the class raster itself, and
 *      the region id in a field joins it to the statistics of step 3;
 *   5. per polygon with GEOS: make-valid (8-connected polygons may touch
 *      themselves at a corner), holes under an area filled, optional
 *      topology-preserving simplification, minimum area; then written.
 * Intermediate rasters live in /vsimem for small rasters and beside the
 * output (removed at the end, also on failure) for large ones.
 *
 * Nodata pixels (the band's nodata value) are never part of a polygon, and
 * neither filter changes or spreads them. The background class is skipped
 * unless keep_background is set (it still takes part in both filters). */
#ifndef TS_IO_POLYGONIZE_H
#define TS_IO_POLYGONIZE_H

#include <gdal.h>
#include <stdint.h>

#include "kernels/status.h"

typedef struct ts_polygonize_params {
    const char *input;  /* class raster (integer band of class ids >= 0) */
    int band;           /* 1-based; 0 means 1 */
    const char *output; /* .gpkg .geojson/.json .shp .fgb */
    const char *layer;  /* layer name; NULL: the output's file name without extension */
    int overwrite;
    int connectivity;   /* 4 or 8 (0 means 4, as gdal_polygonize) */
    int majority;       /* modal filter window (odd, 3..15); 0: none */
    int mmu_px;         /* sieve: regions of fewer pixels are merged into a neighbour; 0: none */
    int background;     /* the class id skipped (default 0) */
    int keep_background;
    double simplify;       /* topology-preserving tolerance in map units; 0: none */
    double min_area;       /* drop polygons under this area in map units^2 (projected CRS only); 0: none */
    int64_t min_area_px;   /* drop polygons of fewer pixels; 0: none */
    double fill_holes;     /* fill holes under this area in map units^2 (projected CRS only); 0: none */
    int64_t fill_holes_px; /* fill holes of fewer pixels' area; 0: none */
    const char *confidence; /* confidence raster on the same grid: its GDAL scale applied when set (terraseg predict: Byte round(254 p), scale 1/254), else Byte = p x 255, float = p; NULL: none */
    int confidence_band;    /* 1-based; 0 means 1 */
    int no_style;           /* do not write the QGIS style (layer_styles table / .qml sidecar) */
    /* Warnings (no georeferencing, degrees, ...) go here; NULL: dropped. */
    void (*warn)(void *ctx, const char *msg);
    void *warn_ctx;
} ts_polygonize_params;

void ts_polygonize_params_init(ts_polygonize_params *p);

typedef struct ts_polygonize_report {
    int64_t width, height;
    int georeferenced;      /* 0: pixel space */
    int geographic;         /* CRS in degrees: area from the pixels on the ellipsoid, in m^2 */
    double pixel_area;      /* |det| of the geotransform, in map units^2 */
    int64_t majority_changed;  /* pixels the majority filter changed */
    int64_t regions;        /* connected regions found (skipped classes excluded) */
    int64_t features;       /* polygons written */
    int64_t dropped_small;  /* under min_area / min_area_px */
    int64_t dropped_empty;  /* nothing left after simplification */
    int64_t holes_filled;
    int64_t made_valid;     /* polygons GEOS had to repair */
    int classes_written;    /* distinct class ids among the features */
    const char *driver;     /* OGR driver name (static) */
    char layer[256];
    int style;              /* 1: layer_styles table, 2: .qml sidecar, 0: none */
} ts_polygonize_report;

/* Runs the whole pipeline; on any failure nothing is left under p->output
 * (an existing output is untouched) and the error names the file or option. */
ts_status ts_polygonize(const ts_polygonize_params *p, ts_polygonize_report *rep);

/* The majority filter of step 1, exposed for tests: each valid pixel of dst
 * gets the most frequent class among the valid pixels of the size x size
 * window around it in src (clipped at the edges; ties keep the centre's
 * class when it is among the most frequent, else the smallest id); nodata
 * pixels stay nodata and do not vote. Streams size rows at a time. src and
 * dst are distinct bands of equal size. *changed (may be NULL) counts the
 * pixels that changed. */
ts_status ts_majority_filter(GDALRasterBandH src, GDALRasterBandH dst, int size, int has_nodata, double nodata,
                             int64_t *changed);

/* Area in m^2 of a band of the ellipsoid (semi-axes a, b in metres) between
 * latitudes lat0 and lat1 (radians) and dlon radians wide: the exact area of
 * a pixel of a north-up geographic grid. */
double ts_ellipsoid_cell_area(double a, double b, double lat0, double lat1, double dlon);

#endif
