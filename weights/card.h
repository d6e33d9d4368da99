/* The model card: what a model needs besides its weights to be used right on
 * new imagery (issue: classes with ids and names, the input bands and their
 * normalization, the training tile size, the ignore id).
 *
 * It travels as compact JSON: in a terraseg .safetensors file under the
 * metadata key "terraseg.card", in an SMP directory as terraseg_card.json
 * (SMP ignores files it does not know), and not at all in a .pth, which holds
 * weights only (`terraseg convert` says when it drops one).
 *
 *   {"classes": [{"id": 0, "name": "background", "color": "#404040"}, ...],
 *    "bands": [{"index": 4, "name": "red", "offset": 0, "scale": 10000,
 *               "clip": [0, 3000]}, ...],
 *    "tile_size": 256, "ignore_index": 255}
 *
 * Every key is optional. A band's normalization is y = (clip(x) - offset) /
 * scale, which covers a plain scale (/10000), mean/std (offset = mean,
 * scale = std), min-max (offset = min, scale = max - min) and percentile
 * clipping (clip = [p_lo, p_hi] with min-max on them). */
#ifndef TS_CARD_H
#define TS_CARD_H

#include "kernels/status.h"

typedef struct ts_card_class {
    int id;
    char *name;
    int has_color;          /* "color": "#rrggbb", optional: the class map's colour */
    unsigned char rgb[3];
} ts_card_class;

typedef struct ts_card_band {
    int index;        /* 1-based band of the source raster; 0 if unknown */
    char *name;       /* may be NULL */
    double offset;    /* 0 by default */
    double scale;     /* 1 by default; never 0 */
    int has_clip;
    double clip_lo, clip_hi;
} ts_card_band;

typedef struct ts_model_card {
    ts_card_class *classes;
    int n_classes;
    ts_card_band *bands;
    int n_bands;
    int tile_size;    /* 0: not recorded */
    int ignore_index; /* -1: none */
} ts_model_card;

void ts_card_init(ts_model_card *c);
void ts_card_free(ts_model_card *c);
/* Strict: unknown keys, wrong types, duplicate class ids or names, a zero
 * scale or an empty clip range are errors naming the key. */
ts_status ts_card_parse(const char *json, const char *source, ts_model_card *out);
/* Compact JSON with keys in the order shown above; malloc'ed. */
ts_status ts_card_format(const ts_model_card *c, char **json);

#endif
