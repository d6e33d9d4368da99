/* A deterministic synthetic scene for `terraseg demo`: a 4-band (blue,
 * green, red, nir) UInt16 GeoTIFF in a projected CRS and the vector labels
 * it was drawn from, a GeoPackage layer "labels" with an integer "class"
 * and a "class_name".
 *
 * Everything follows from the seed (a splitmix64 stream for the features,
 * hashes of the pixel position for the noise), so the same parameters give
 * the same pixels and the same features on every machine and thread count.
 *
 * The labels are polygons in increasing precedence: soil, vegetation,
 * water, road, building; background (class 0) is where no feature is. A
 * later feature wins where two overlap, which is how both gdal_rasterize and
 * terraseg's vector labels (io/labels.c, burning in layer/FID order, pixel
 * centres) resolve overlaps, so rasterizing the layer with attribute
 * "class" onto the image grid gives exactly the classes the image was
 * rendered from.
 *
 * The image: per-class spectra with per-object variation (roof colours and
 * gable halves, crop types with row texture, forest crowns, asphalt and
 * concrete roads, clear and turbid water, soils), low-frequency
 * illumination and moisture noise, building shadows, a 3x3 sensor blur
 * that mixes pixels at class edges, and per-pixel noise; values are
 * reflectance x 10000 in [1, 10000]. Written tiled (256 x 256), DEFLATE
 * with PREDICTOR=2, in strips of rows, so memory is the feature geometry, a
 * 4-byte object id per pixel and one strip of rendered rows. */
#ifndef TS_IO_DEMO_SCENE_H
#define TS_IO_DEMO_SCENE_H

#include <stdint.h>

#include "kernels/status.h"

enum { DEMO_NCLASSES = 6 };

typedef struct demo_class {
    int id;
    const char *name;
    const char *color; /* "#rrggbb" */
} demo_class;

/* 0 background, 1 building, 2 road, 3 water, 4 vegetation, 5 bare_soil. */
extern const demo_class demo_classes[DEMO_NCLASSES];

typedef struct demo_scene_params {
    int width, height;   /* pixels; 64 .. 32768 each */
    uint64_t seed;
    double pixel_size;   /* metres (0.25 .. 10); feature sizes are in metres */
    int epsg;            /* a projected CRS; 32633 (WGS 84 / UTM 33N) by default */
    double origin_x, origin_y; /* upper-left corner in the CRS */
} demo_scene_params;

/* 2048 x 2048, seed 1, 1 m pixels, EPSG:32633 at (500000, 5800000). */
void demo_scene_defaults(demo_scene_params *p);

typedef struct demo_scene_report {
    int keep_classes;              /* in: 1 to get the class raster below */
    int features[DEMO_NCLASSES];   /* features written per class (background: 0) */
    int64_t pixels[DEMO_NCLASSES]; /* image pixels per class */
    uint8_t *classes;              /* width*height class ids, row-major, when keep_classes; free() it */
} demo_scene_report;

/* Writes the image (a GeoTIFF) and the labels (a GeoPackage) atomically;
 * an existing file is refused unless overwrite. rep may be NULL. */
ts_status demo_scene_write(const demo_scene_params *p, const char *image_path, const char *labels_path, int overwrite,
                           demo_scene_report *rep);

#endif
