/* The raster source of the data pipeline: any raster GDAL opens (GeoTIFF,
 * COG, a VRT mosaic of many files, MBTiles, ...) read window by window as
 * float32 C x H x W, with a valid-pixel mask per window.
 *
 * Channels are the selected bands (1-based, in the order given; default:
 * every band that is not an alpha band) followed by the derived index bands
 * (NDVI, NDWI). Each channel can be normalized (a scale, a given mean/std or
 * min/max, or mean/std, min/max or percentiles computed once at open).
 *
 * Valid mask: a pixel is valid when it is valid in every band the channels
 * read (nodata value, GDAL mask band, per-dataset mask or alpha band, and
 * never NaN) and every index band is defined there (a + b != 0). Invalid
 * pixels read as 0 in every channel, after normalization.
 *
 * Reads are windowed RasterIO calls through GDAL's block cache; nothing ever
 * loads the whole scene, statistics included (they stream strip by strip).
 *
 * Optionally the image is warped to a target CRS and/or resolution (or onto
 * an explicit grid) through a warped VRT (GDALWarp -of VRT, lazy: pixels are
 * warped block by block when read), bilinear by default. Windows then refer
 * to the warped grid, which ts_raster_grid() reports.
 *
 * Threads: a ts_raster is NOT thread-safe (GDAL dataset handles must not be
 * read from two threads at once, and the raster keeps scratch buffers). Give
 * each loader thread its own handle with ts_raster_clone(), which reopens the
 * file (and the warp) and copies the resolved normalization, so statistics
 * are not computed again. Different handles may be read concurrently. */
#ifndef TS_IO_RASTER_H
#define TS_IO_RASTER_H

#include <stdint.h>

#include "io/io.h"

/* ---- normalization --------------------------------------------------------
 * Computed kinds (*_STATS) are resolved at open into the given kind with the
 * values used (ts_raster_norm() reports them: a model card stores those and
 * passes them back as given at inference). Statistics are over the valid
 * pixels of the channel's raw values (before normalization). */
typedef enum ts_norm_kind {
    TS_NORM_NONE = 0,         /* raw values as float32 */
    TS_NORM_SCALE,            /* x * scale + offset (scale = 1e-4 for reflectance stored x10000) */
    TS_NORM_MEANSTD,          /* (x - mean) / std, given mean and std > 0 */
    TS_NORM_MINMAX,           /* (clamp(x, min, max) - min) / (max - min) in [0, 1], given min < max */
    TS_NORM_MEANSTD_STATS,    /* MEANSTD with the channel's mean and std (population) */
    TS_NORM_MINMAX_STATS,     /* MINMAX with the channel's min and max */
    TS_NORM_PERCENTILE_STATS, /* MINMAX with min, max = the pct_lo and pct_hi percentiles (e.g. 2, 98) */
} ts_norm_kind;

typedef struct ts_band_norm {
    ts_norm_kind kind;
    double scale, offset;  /* SCALE */
    double mean, std;      /* MEANSTD; filled for MEANSTD_STATS */
    double min, max;       /* MINMAX; filled for MINMAX_STATS and PERCENTILE_STATS */
    double pct_lo, pct_hi; /* PERCENTILE_STATS: 0 <= pct_lo < pct_hi <= 100; kept after resolving */
} ts_band_norm;

/* Statistics of one channel's raw values over its valid pixels. Percentiles
 * come from a 65536-bin histogram between min and max (linear within a bin),
 * so they are exact to (max - min) / 65536. */
typedef struct ts_band_stats {
    int64_t count;              /* valid pixels used */
    double min, max, mean, std; /* std: population (divides by count) */
    double pct_lo, pct_hi;      /* the percentile values, when PERCENTILE_STATS asked for them */
    int approx;                 /* 1: from a sample of strips (stats_sample_pixels), not every pixel */
} ts_band_stats;

/* ---- index bands ------------------------------------------------------------
 * NDVI = (nir - red) / (nir + red); NDWI (McFeeters) = (green - nir) / (green + nir),
 * on the raw band values. Where the denominator is 0 the index is 0 and the
 * pixel is invalid. A band is named by its 1-based number, or (band = 0) by
 * a name matched case-insensitively against the band descriptions, then
 * against GDAL's colour interpretation names ("Red", "Green", "Blue", ...);
 * with neither set the name defaults to "red", "green" or "nir". */
typedef enum ts_index_kind {
    TS_INDEX_NDVI = 1,
    TS_INDEX_NDWI,
} ts_index_kind;

typedef struct ts_band_ref {
    int band;         /* 1-based; 0: use name */
    const char *name; /* NULL: the default name of the role */
} ts_band_ref;

typedef struct ts_index_spec {
    ts_index_kind kind;
    ts_band_ref red, green, nir; /* only the roles the index uses are looked at */
} ts_index_spec;

/* ---- options ------------------------------------------------------------------
 * Zero-initialize, then set what you need ({0}: every non-alpha band, raw
 * values, no warp). The raster copies everything it keeps; the caller's
 * arrays and strings may go away after ts_raster_open(). */
typedef struct ts_raster_opts {
    const int *bands; /* 1-based band numbers, in channel order; NULL/0: every non-alpha band */
    int nbands;
    const ts_index_spec *indices; /* derived channels, after the bands */
    int nindices;
    const ts_band_norm *norm; /* nnorm = 0: none; 1: the same for every channel; C: one per channel */
    int nnorm;
    int64_t stats_sample_pixels; /* 0: statistics over every pixel (one streamed pass, two with
                                    percentiles); > 0: about this many pixels, from evenly spaced
                                    full-width strips (approximate, much faster on big scenes) */
    int has_nodata;              /* 1: `nodata` replaces every band's nodata value (compared as float32) */
    double nodata;
    int ignore_masks; /* 1: ignore nodata, mask and alpha bands (NaN stays invalid) */
    int pad;          /* 1: windows may extend past the raster; those pixels read 0, invalid */
    /* warping (any of warp_crs, warp_res_x/y, warp_grid turns it on) */
    const char *warp_crs;            /* anything OSRSetFromUserInput takes ("EPSG:32633", WKT, PROJ); NULL: keep */
    double warp_res_x, warp_res_y;   /* target pixel size in target CRS units (both > 0); 0: GDAL's suggestion */
    int warp_tap;                    /* align the target extent to multiples of the resolution (gdalwarp -tap) */
    const ts_grid *warp_grid;        /* warp exactly onto this north-up grid (size, gt, CRS); overrides the above */
    const char *resampling;          /* gdalwarp -r name: near, bilinear (default), cubic, cubicspline, lanczos,
                                        average, rms, mode, max, min, med, q1, q3, sum */
    const char *const *open_options; /* GDAL open options, "KEY=VALUE", NULL-terminated; may be NULL */
} ts_raster_opts;

typedef struct ts_raster ts_raster;

/* Opens `path` (o may be NULL for the defaults), validates the band list and
 * index bands, computes statistics when a normalization needs them. */
ts_status ts_raster_open(const char *path, const ts_raster_opts *o, ts_raster **out);
/* A second handle on the same raster for another thread (see above). */
ts_status ts_raster_clone(const ts_raster *r, ts_raster **out);
void ts_raster_close(ts_raster *r); /* NULL is fine */

/* The grid windows refer to (the warped one when warping); out is owned by
 * the caller (ts_grid_free). A raster without a geotransform reports GDAL's
 * default (0, 1, 0, 0, 0, 1); without a CRS, crs_wkt = NULL. */
ts_status ts_raster_grid(const ts_raster *r, ts_grid *out);
int ts_raster_width(const ts_raster *r);
int ts_raster_height(const ts_raster *r);
int ts_raster_channels(const ts_raster *r); /* selected bands + index bands */
const char *ts_raster_path(const ts_raster *r);
/* "band 3", "band 4 (nir)" (with its description), "NDVI", "NDWI"; NULL when c is out of range. */
const char *ts_raster_channel_name(const ts_raster *r, int c);
/* The source band of channel c (1-based), or 0 for an index band / bad c. */
int ts_raster_channel_band(const ts_raster *r, int c);
/* The normalization channel c uses, resolved (see ts_norm_kind). */
ts_status ts_raster_norm(const ts_raster *r, int c, ts_band_norm *out);
/* The statistics computed at open for channel c; TS_ERR_INVALID_ARG when
 * none were (no *_STATS normalization was asked for). */
ts_status ts_raster_stats(const ts_raster *r, int c, ts_band_stats *out);

/* Reads window w: out = C planes of w->height x w->width floats (channel-major),
 * valid = w->height x w->width bytes, 1 = valid (may be NULL). A window not
 * wholly inside the raster is an error unless the raster was opened with pad. */
ts_status ts_raster_read(ts_raster *r, const ts_window *w, float *out, uint8_t *valid);

#endif
