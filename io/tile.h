/* Tiles on disk, and the per-window masks that decide which windows are kept.
 *
 * THE MASK READER reads, for one window of the image grid, what the window
 * filters and the tiler decide on: the image's valid mask (exactly as
 * io/raster.h defines it over the given bands: nodata, mask and alpha bands,
 * NaN) and the labels on the image grid (io/labels.h). It is a
 * ts_mask_read_fn. It reads as little of the image as gives the same mask:
 *   - nothing, when no band has a nodata value, mask or alpha band and no
 *     band is floating point (the mask is then all valid);
 *   - one band, when every band shares one per-dataset mask (an internal
 *     mask, an alpha band, NODATA_VALUES) and no band is floating point
 *     (a NaN in another band would make a pixel invalid);
 *   - otherwise every band given (per-band nodata values differ per band).
 * A reader holds GDAL handles: use one per thread.
 *
 * THE WINDOW FILTER ts_windows_filter_masks() opens one reader per OpenMP
 * thread and thins a window list by ts_mask_filter_params (io/windows.h),
 * through ts_windows_filter_ctx: the kept windows, their order and the first
 * error do not depend on the thread count. It reports why windows went.
 *
 * THE TILE WRITERS write one window as a GeoTIFF equal to what
 * `gdal_translate -srcwin col row w h [-b ...]` gives: the same pixels in the
 * source data type (no normalization), nodata value, CRS, the geotransform
 * moved to the window (computed as gdal_translate does, to the last bit),
 * band descriptions, colour interpretations, scale/offset, unit, colour
 * table, and a per-dataset mask (an internal mask, not nodata or alpha) when
 * the source has one. DEFLATE-compressed, TILED (256 x 256) when both sides
 * are >= 256 pixels, else strips. Each file is written to PATH.tmp (with its
 * .aux.xml sidecar, if GDAL needs one, renamed along) and renamed over PATH
 * only when complete; on failure nothing is left and PATH is untouched. */
#ifndef TS_IO_TILE_H
#define TS_IO_TILE_H

#include <gdal.h>
#include <stddef.h>
#include <stdint.h>

#include "io/io.h"
#include "io/labels.h"
#include "io/windows.h"

/* ---- the mask reader ---------------------------------------------------------------- */
typedef struct ts_mask_reader_opts {
    const char *image;             /* required: the raster the windows are on */
    const int *bands;              /* bands whose validity counts (1-based); NULL/0: every non-alpha band, */
    int nbands;                    /*   what training reads by default (io/raster.h) */
    int has_nodata;                /* 1: `nodata` replaces every band's nodata value (ts_raster_opts) */
    double nodata;
    int read_valid;                /* 0: never read the image (valid buffers are left untouched) */
    const char *labels;            /* NULL: no labels */
    const ts_label_opts *label_opts; /* NULL: the defaults */
} ts_mask_reader_opts;

typedef struct ts_mask_reader ts_mask_reader;

ts_status ts_mask_reader_open(const ts_mask_reader_opts *o, ts_mask_reader **out);
void ts_mask_reader_close(ts_mask_reader *r); /* NULL is fine */
/* A ts_mask_read_fn (reader = a ts_mask_reader *): fills labels (when not
 * NULL; the reader must have labels) and valid (when not NULL; 1 = valid,
 * 0 = invalid; left untouched when the image has no mask, see above), both
 * w->width * w->height pixels, row-major. The window must lie inside the
 * image. */
ts_status ts_mask_reader_read(void *reader, const ts_window *w, int32_t *labels, uint8_t *valid);
/* Bands read per window for the valid mask: 0 (none: all valid, or
 * read_valid = 0), 1, or every band given. */
int ts_mask_reader_image_bands(const ts_mask_reader *r);
/* The image grid (size, geotransform, CRS). */
const ts_grid *ts_mask_reader_grid(const ts_mask_reader *r);
/* The opened labels, or NULL. */
ts_labels *ts_mask_reader_labels(ts_mask_reader *r);

/* ---- the window filter ------------------------------------------------------------------ */
typedef struct ts_mask_filter_report {
    size_t windows;            /* windows looked at */
    size_t dropped_nodata;     /* invalid fraction > max_nodata_fraction */
    size_t dropped_background; /* not dropped for nodata, and every valid pixel background or ignore */
    int image_bands;           /* ts_mask_reader_image_bands() of the readers */
    int threads;               /* readers opened (one per thread, at most one per window) */
} ts_mask_filter_report;

/* Drops the windows of l that p rejects (ts_mask_decide's rules: the nodata
 * test first, then all-background). The readers are opened from o, with
 * read_valid and the labels switched on only where p needs them (labels:
 * drop_background; p->background and p->ignore_index should be the label
 * options' background and ignore ids). threads <= 0: the OpenMP default.
 * On an error l is unchanged. rep may be NULL. */
ts_status ts_windows_filter_masks(ts_window_list *l, const ts_mask_reader_opts *o, const ts_mask_filter_params *p,
                                  int threads, ts_mask_filter_report *rep);

/* ---- tile writers ------------------------------------------------------------------------------ */
/* Window w of src (wholly inside it), bands[0..nbands) (1-based; NULL/0:
 * every band, as gdal_translate without -b) to the GeoTIFF path. Bands of
 * different data types are written in the smallest type holding them all
 * (GDALDataTypeUnion; GeoTIFF has one type per file). Errors name path, the
 * source, and the window or band at fault. */
ts_status ts_tile_write_image(GDALDatasetH src, const ts_window *w, const int *bands, int nbands, const char *path);

/* The data type a label tile takes: Byte when max_id <= 255, UInt16 when
 * <= 65535, else UInt32 (max_id: ts_labels_max_id(), ignore id included). */
GDALDataType ts_tile_mask_type(int64_t max_id);
/* Class ids ids[w->height * w->width] of window w of grid g as a one-band
 * GeoTIFF of `type` with nodata = ignore_id, g's CRS and the geotransform
 * moved to the window (the same as the image tile's). An id outside the
 * type's range is an error naming the pixel. */
ts_status ts_tile_write_mask(const ts_grid *g, const ts_window *w, const int32_t *ids, GDALDataType type,
                             int32_t ignore_id, const char *path);

/* ---- a whole tiling job (terraseg tile) ---------------------------------------------------------
 * For each window: out_dir/images/<prefix>_<col>_<row>.tif (ts_tile_write_image)
 * and, with labels, out_dir/masks/<same name>.tif (ts_tile_write_mask, type
 * ts_tile_mask_type(ts_labels_max_id())). Folders are created as needed.
 * skip_empty: nothing is written for a window whose valid pixels are all
 * background or ignore (with labels; no valid pixel counts as all
 * background), or whose image pixels are all invalid (without labels); the
 * valid mask is the mask reader's over `bands` (NULL/0: every non-alpha
 * band), with the nodata override if given. Windows tagged
 * TS_SPLIT_BUFFER are skipped (a split's "use for nothing"); only_split !=
 * TS_SPLIT_NONE keeps that split only. Two windows at the same offset but of
 * different sizes (their files would collide) are an error before anything
 * is written, as is a band that does not exist. A failing mask removes its
 * image tile, so images/ and masks/ always pair. */
typedef struct ts_tile_job {
    const char *image;
    const ts_window_list *windows;
    const int *bands; /* NULL/0: every band (written); validity: every non-alpha band */
    int nbands;
    const char *labels; /* NULL: images only */
    const ts_label_opts *label_opts;
    int skip_empty;
    int has_nodata; /* skip_empty's validity only: tiles keep the source's nodata */
    double nodata;
    ts_split_tag only_split;
    const char *out_dir;
    const char *prefix; /* a file name without '/' */
} ts_tile_job;

typedef struct ts_tile_report {
    size_t written;     /* image tiles (and as many masks with labels) */
    size_t empty;       /* skipped by skip_empty */
    size_t buffer;      /* skipped: tagged buffer */
    size_t other_split; /* skipped: another split than only_split */
    GDALDataType mask_type;
    int image_bands; /* bands written per tile */
} ts_tile_report;

ts_status ts_tile_windows(const ts_tile_job *job, ts_tile_report *rep);

#endif
