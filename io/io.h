/* Shared types of the data pipeline: pixel windows on the image grid and the
 * grid itself, plus the GDAL plumbing every io/ file uses.
 *
 * The image is the reference grid: labels are aligned to it, windows are
 * pixel rectangles on it, tiles carry its CRS and a geotransform shifted to
 * the window. */
#ifndef TS_IO_H
#define TS_IO_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/status.h"

/* A pixel rectangle on the image grid: columns [col_off, col_off + width),
 * rows [row_off, row_off + height). */
typedef struct ts_window {
    int64_t col_off, row_off;
    int width, height;
} ts_window;

/* An image grid: size, GDAL geotransform and CRS (WKT, NULL when the
 * raster has none). */
typedef struct ts_grid {
    int64_t width, height;
    double gt[6];
    char *crs_wkt; /* owned */
} ts_grid;

void ts_grid_free(ts_grid *g);
ts_status ts_grid_copy(ts_grid *dst, const ts_grid *src);
/* The geotransform of a window: the origin moved to its top-left pixel,
 * with gdal_translate -srcwin's arithmetic (gt[0] + (c*gt[1] + r*gt[2])), so
 * a tile's geotransform is bit-identical to gdal_translate's, rotated grids
 * included. */
void ts_window_gt(const double gt[6], const ts_window *w, double out[6]);
void ts_grid_window_gt(const ts_grid *g, const ts_window *w, double gt[6]);

/* Registers GDAL's drivers once and routes GDAL's error messages into
 * terraseg's (thread-safe; call before any GDAL use, idempotent). */
void ts_gdal_init(void);
/* ts_error() with GDAL's last error message appended ("...: <CPL message>"),
 * for failures reported by a GDAL/OGR call. */
ts_status ts_gdal_error(ts_status s, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* "GDAL 3.6.2, GEOS 3.11.1-CAPI-1.17.1" for `terraseg version`. */
void ts_gdal_describe(char *buf, size_t size);

#endif
