/* Whole-scene prediction: a model and a scene in, a georeferenced class map
 * out, in bounded memory (io/stitch.h streams the tiles).
 *
 * INPUT. The scene's bands and their normalization come from the model card
 * (weights/card.h): channel i reads card band i's 1-based index (or, for a
 * card band named "NDVI"/"NDWI" without an index, that index from the bands
 * named/colour-interpreted red, green and nir), as y = (clip(x) - offset) /
 * scale; invalid pixels (nodata, mask, alpha, NaN) read 0, as in training.
 * Options may give the bands when the card has none; the band count must
 * equal the model's in_channels. Tile size: option, else the card's
 * tile_size, else 256; overlap: option, else a quarter of the tile.
 *
 * PER TILE. The folded-BN eval forward (on ctx's backend), softmax over
 * classes (a one-class model: sigmoid, as [1 - p, p], so its map has classes
 * 0 and 1), averaged over the test-time augmentations asked for (each
 * transform's prediction is transformed back before averaging). The
 * stitcher blends these probabilities; the class of a pixel is their
 * arg-max (ties to the lowest id).
 *
 * OUTPUT. A tiled (256 x 256), DEFLATE-compressed GeoTIFF (or a COG) of one
 * Byte band: class ids, 255 = nodata where the input is invalid, a colour
 * table and the class names (io/classes.h); the scene's CRS and
 * geotransform (a scene without georeferencing: a warning, and pixel-space
 * output). Optional: per-class probabilities (K bands) and the confidence
 * (the winning class's probability), each a Byte GeoTIFF holding
 * round(254 p) with 255 = nodata and GDAL scale 1/254 (so GDAL's unscaled
 * value is p); a PNG quick-look (class colours blended over the image, at
 * most `quicklook_size` pixels on the long side). Every file is written
 * under a temporary name and renamed when complete (io/gdal_out.h); an
 * existing output is refused unless overwrite. */
#ifndef TS_IO_PREDICT_H
#define TS_IO_PREDICT_H

#include <stdint.h>

#include "io/stitch.h"
#include "nn/unet.h"

/* Test-time augmentation: a set of the 8 symmetries of the square. */
enum {
    TS_TTA_IDENTITY = 1 << 0,
    TS_TTA_HFLIP = 1 << 1,     /* mirror left-right */
    TS_TTA_VFLIP = 1 << 2,     /* mirror top-bottom */
    TS_TTA_ROT90 = 1 << 3,     /* torch.rot90(x, 1, (-2, -1)): counter-clockwise */
    TS_TTA_ROT180 = 1 << 4,
    TS_TTA_ROT270 = 1 << 5,
    TS_TTA_TRANSPOSE = 1 << 6, /* swap rows and columns */
    TS_TTA_ANTITRANSPOSE = 1 << 7,
    TS_TTA_ALL = 0xff,
};
/* "none" (identity only), "flips" (identity, hflip, vflip), "d4" (all 8), or
 * a comma list of identity, hflip, vflip, rot90, rot180, rot270, transpose,
 * antitranspose. Errors name the bad item. */
ts_status ts_tta_parse(const char *s, unsigned *mask);
/* out[y][x] = in[src] for a T x T plane under transform bit t (one bit):
 * the index src of the input pixel that lands on (y, x). */
int64_t ts_tta_source(unsigned t, int tile, int y, int x);

typedef struct ts_predict_opts {
    const char *scene;
    const char *out;           /* class map (.tif) */
    int overwrite;
    int tile;                  /* 0: card, else 256 */
    int overlap;               /* < 0: tile / 4 */
    int batch;                 /* tiles per forward; 0: 4 */
    /* GDAL reader threads, each with its own handle on the scene (io/stitch.h
     * THREADS); 0: 1 for a model on the CPU backend, else min(4, online
     * CPUs); at most the number of batches. The
     * output does not depend on it. Each handle has its own block cache, so
     * a block shared by tiles of two readers is decoded twice: N readers
     * spend more CPU on decoding than one (about +30% for 2, +70% for 4 on a
     * DEFLATE scene with 256 px tiles and blocks) but spread it over N cores. */
    int readers;
    /* Activations of the forward: TS_F32 (0, the default), or TS_BF16 /
     * TS_F16 (mixed precision: half activations, float32 logits; on the CPU
     * backend emulated, slower). */
    ts_dtype precision;
    ts_blend blend;
    unsigned tta;              /* 0: identity only */
    int cog;                   /* write a Cloud Optimized GeoTIFF */
    const char *probabilities; /* optional GeoTIFF path */
    const char *confidence;    /* optional GeoTIFF path */
    const char *quicklook;     /* optional PNG path */
    int quicklook_size;        /* 0: 1024 */
    const int *bands;          /* 1-based; only when the card has no bands */
    int nbands;
    int has_nodata;            /* replaces the bands' nodata value */
    double nodata;
    /* Progress and warnings (may be NULL). */
    void (*progress)(void *ctx, int64_t done, int64_t total);
    void (*warn)(void *ctx, const char *msg);
    void *cb_ctx;
    /* Tests and tools: run this instead of the model (model may then be NULL;
     * in_channels/classes give the shapes, class names "class <id>"). */
    ts_status (*tile_fn)(void *ctx, int n, const ts_window *wins, const float *in, float *out);
    void *tile_ctx;
    int tile_in_channels, tile_classes;
} ts_predict_opts;

typedef struct ts_predict_report {
    int64_t width, height, tiles;
    int tile, overlap, channels, classes, augmentations;
    int readers;               /* reader threads used */
    int georeferenced;
    int64_t nodata_pixels;
    int64_t class_pixels[256]; /* per class id, over valid pixels */
    size_t stitch_bytes;       /* the stitcher's peak allocation */
} ts_predict_report;

/* Runs the whole scene with model m (BN folded here; m's weights are left as
 * they were) on ctx's backend. report may be NULL. On a backend whose memory
 * is not host memory (CUDA), the model runs as a device copy
 * (ts_unet_device: the folded weights uploaded once, each batch of tiles
 * uploaded and its logits downloaded), and softmax, test-time augmentation
 * and blending stay on the host; the result is the same computation as on
 * the CPU, up to the backend's own float rounding. */
ts_status ts_predict_run(ts_unet *m, ts_ctx *ctx, const ts_predict_opts *o, ts_predict_report *report);

#endif
