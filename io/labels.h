/* Labels on the image grid.
 *
 * The image is the reference grid. A label source is opened against it once
 * (ts_labels_open) and then read window by window (ts_labels_read) into int32
 * class ids, one per image pixel of the window, row-major H*W.
 *
 * Raster masks (anything GDAL reads: GeoTIFF, PNG with a world file, VRT...)
 * are aligned through a GDAL warped VRT with the image's size, geotransform
 * and CRS, always nearest neighbour (class ids are never interpolated).
 * When the mask already has exactly the image's grid it is read directly.
 *   - single band of class ids (opts.band, default 1); float bands must hold
 *     whole numbers;
 *   - or RGB(A) colour-coded (opts.colors): each pixel's colour is looked up
 *     in the colour map; a colour not in it becomes background_id, or
 *     ignore_id with opts.unknown_color_ignore;
 *   - the mask's own nodata (on the id band; for colours, on every R, G, B
 *     band that has one, all matching; an alpha band's nodata is not used:
 *     map transparent colours explicitly) becomes ignore_id;
 *   - image pixels whose centre falls outside the mask's footprint become
 *     ignore_id (the warped VRT's alpha band is 0 there): "not labelled" is
 *     not "background";
 *   - a mask without georeferencing is accepted only at the image's pixel
 *     size, and then taken as pixel-aligned.
 *
 * Vector labels (any OGR format: GPKG, Shapefile, GeoJSON, FlatGeobuf...) are
 * rasterized per window exactly as gdal_rasterize does onto the whole image:
 * features are reprojected to the image CRS (traditional GIS axis order on
 * both sides), burned in layer order (later features overwrite earlier
 * ones), with ALL_TOUCHED on request; pixels no feature covers get
 * background_id. The class is an integer attribute, a string attribute
 * through a name -> id map, or a fixed burn value. Every feature's class is
 * checked when the labels are opened, so a bad attribute fails before
 * training starts, naming the file, layer, attribute and feature id. A
 * feature whose geometry cannot be reprojected is skipped (as gdal_rasterize
 * does). Reads use an OGR spatial filter on the window's extent.
 *
 * Labels without a CRS are refused (the message suggests the fix: when a
 * vector layer's coordinates look like degrees over a projected image, the
 * geographic CRS of the image's datum, e.g. --assume-crs EPSG:4674), unless
 * opts.assume_crs names their CRS or opts.assume_image_crs takes the image's.
 *
 * Both kinds: ids must be >= 0. ignore_id (default 255) marks pixels the loss
 * and the metrics skip. opts.binary maps every non-zero id other than
 * ignore_id to 1. With opts.classes > 0, an id >= classes (other than
 * ignore_id) is an error naming the file, band, window and pixel.
 * Window pixels outside the image grid are ignore_id.
 *
 * A ts_labels holds GDAL handles: use one per thread. */
#ifndef TS_LABELS_H
#define TS_LABELS_H

#include <stdint.h>

#include "io/io.h"

/* One colour of a colour-coded mask. match_alpha = 0 matches any alpha (an
 * RGB key); 1 requires the alpha too (a 3-band mask is opaque: alpha 255). */
typedef struct ts_label_color {
    uint8_t r, g, b, a;
    int match_alpha;
    int32_t id;
} ts_label_color;

/* One class name of a string attribute. */
typedef struct ts_label_class {
    const char *name;
    int32_t id;
} ts_label_class;

typedef struct ts_label_opts {
    /* ---- both kinds ---- */
    int32_t ignore_id;     /* default 255; must be >= 0 */
    int32_t background_id; /* default 0: pixels no feature covers; unknown colours */
    int classes;           /* > 0: every id other than ignore_id must be < classes (0: no check) */
    int binary;            /* every non-zero id other than ignore_id becomes 1 */
    /* ---- raster masks ---- */
    int band;                     /* the class-id band, 1-based (default 1) */
    const ts_label_color *colors; /* colour map (NULL: the mask holds ids) */
    int n_colors;
    int unknown_color_ignore; /* a colour not in the map -> ignore_id (default: background_id) */
    double max_error;         /* warp transform approximation in pixels; 0 (default) = exact */
    /* ---- vector labels ---- */
    const char *layer;               /* NULL: the first layer */
    const char *attribute;           /* class attribute; NULL: burn every feature with burn */
    const ts_label_class *class_map; /* name -> id, for a string attribute */
    int n_class_map;
    int32_t burn;         /* fixed class when attribute is NULL (default 1) */
    int all_touched;      /* burn every pixel a geometry touches (GDAL ALL_TOUCHED) */
    int assume_image_crs; /* labels without a CRS are taken to be in the image CRS (default: error) */
    /* ---- both kinds ---- */
    const char *assume_crs; /* labels without a CRS are taken to be in this CRS (anything OSRSetFromUserInput
                               takes: "EPSG:4674", WKT, PROJ); wins over assume_image_crs; a label source
                               that has a CRS keeps its own. NULL: no assumption */
} ts_label_opts;

/* The defaults above. */
void ts_label_opts_init(ts_label_opts *o);

typedef struct ts_labels ts_labels;

/* Opens LABELS (raster or vector, detected by GDAL; a vector dataset, or any
 * dataset when opts->layer is set, is read as vector) against image_grid,
 * which is copied. opts may be NULL (defaults); it is copied, strings and
 * maps included. Calls ts_gdal_init(). */
ts_status ts_labels_open(const char *path, const ts_grid *image_grid, const ts_label_opts *opts, ts_labels **out);
/* Class ids of window w: mask[r * w->width + c], w->width * w->height. */
ts_status ts_labels_read(ts_labels *l, const ts_window *w, int32_t *mask);
void ts_labels_close(ts_labels *l);

/* 1 for vector labels, 0 for a raster mask. */
int ts_labels_is_vector(const ts_labels *l);
/* An upper bound of every id ts_labels_read can return, ignore_id included
 * (from the burn values, the colour map, --classes, or the mask's data
 * type): what `terraseg rasterize` sizes its output type by. */
int64_t ts_labels_max_id(const ts_labels *l);

/* "building=1,road=2" -> a class map (names are copied into the same
 * allocation; free the array with free()). */
ts_status ts_label_parse_class_map(const char *text, ts_label_class **out, int *n);
/* "#ff0000=1,#00ff00=2,#00000000=255" (RRGGBB or RRGGBBAA, '#' optional)
 * -> a colour map (free with free()). */
ts_status ts_label_parse_color_map(const char *text, ts_label_color **out, int *n);

#endif
