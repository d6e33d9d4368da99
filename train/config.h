/* The training configuration of `terraseg train CONFIG.yaml`.
 *
 * ONE SCHEMA TABLE (train/config.c) lists every key: its dotted name
 * ("optimizer.lr"), type, default (as YAML text), range or allowed values,
 * help text and where it lives in ts_train_config. That table alone drives
 *   - parsing the YAML file (libyaml's document API; nothing is executed:
 *     tags, anchors and aliases are refused, sizes are limited),
 *   - the defaults (each default is parsed by the same code as user input),
 *   - `--set key=value` overrides,
 *   - range checks, printing the resolved configuration as YAML
 *     (deterministic: table order, shortest exact numbers), the string a
 *     checkpoint stores and parses back (exact round trip),
 *   - and the key reference in docs/training-config.md, generated from it
 *     (tests/test_config.c fails when the document and the table differ).
 *
 * A YAML file nests sections as mappings (optimizer: {lr: ...}); a dotted key
 * (optimizer.lr: ...) is accepted anywhere too. A list key takes a single
 * scalar as a one-element list. Errors name the file, the line, the key and
 * what to do: an unknown key gets the closest valid one ("did you mean
 * 'optimizer.lr'?"), a wrong type or range says what was expected, a key set
 * twice names both lines, cross-field checks (ratios sum to 1, class ids
 * 0..K-1, decoder_channels length = encoder_depth, ...) name the keys and
 * where each was set.
 *
 * The usual sequence:
 *   ts_train_config c;
 *   ts_train_config_load(path, &c);             (defaults, then the file)
 *   ts_train_config_set(&c, "optimizer.lr=1e-3");  (each --set, in order)
 *   ts_train_config_validate(&c);               (cross-field checks)
 *   ts_train_config_format(&c, &yaml);          (print it; store it in checkpoints)
 *   ...
 *   ts_train_config_free(&c);
 * (ts_train_config_resolve does the first three steps.) Every function
 * leaves the configuration unchanged when it fails, except load and
 * parse_string, which leave a freed-and-reinitialized (default) one. */
#ifndef TS_TRAIN_CONFIG_H
#define TS_TRAIN_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "io/labels.h"
#include "io/loader.h"
#include "io/raster.h"
#include "io/windows.h"
#include "kernels/backend.h"
#include "kernels/status.h"
#include "nn/unet.h"
#include "train/loss.h"
#include "train/optim.h"
#include "train/schedule.h"
#include "weights/card.h"

/* ---- value types ------------------------------------------------------------ */
typedef struct ts_cfg_ints {
    int *v;
    int n;
} ts_cfg_ints;
typedef struct ts_cfg_floats {
    double *v;
    int n;
} ts_cfg_floats;
typedef struct ts_cfg_strings {
    char **v;
    int n;
} ts_cfg_strings;
/* name -> id pairs, in the order given (labels.class_map, labels.color_map). */
typedef struct ts_cfg_idmap {
    char **names;
    int32_t *ids;
    int n;
} ts_cfg_idmap;
typedef struct ts_cfg_class {
    int32_t id;
    char *name;
} ts_cfg_class;
typedef struct ts_cfg_classes {
    ts_cfg_class *v;
    int n;
} ts_cfg_classes;

typedef enum ts_train_device { TS_DEVICE_CPU = 0, TS_DEVICE_CUDA = 1 } ts_train_device;
typedef enum ts_train_init { TS_INIT_SCRATCH = 0, TS_INIT_IMAGENET = 1, TS_INIT_MODEL = 2 } ts_train_init;
typedef enum ts_train_split_method { TS_SPLIT_BLOCKS = 0, TS_SPLIT_FROM_CSV = 1 } ts_train_split_method;
typedef enum ts_train_optimizer { TS_OPTIM_ADAMW = 0 } ts_train_optimizer;

/* ---- the configuration ------------------------------------------------------
 * Plain data: every string and array is malloc'ed and owned by the struct
 * (ts_train_config_free). NULL strings are YAML null (unset). The help text
 * of every field is in the schema table and docs/training-config.md. */
typedef struct ts_train_config {
    int version;       /* config format version (1) */
    char *output;      /* output folder (required) */
    int64_t seed;      /* model init, shuffling, augmentation */
    int device;        /* ts_train_device */
    int cuda_device;   /* with TS_DEVICE_CUDA: the device index N of cuda:N */
    int precision;     /* ts_dtype of the activations: TS_F32, TS_BF16 or TS_F16 (mixed precision) */
    int deterministic; /* with TS_DEVICE_CUDA: deterministic cuDNN algorithms (ts_device_math) */
    int tf32;          /* with TS_DEVICE_CUDA: TF32 math for float32 convolutions */
    int cudnn_benchmark; /* with TS_DEVICE_CUDA: algorithms chosen by timing */
    int threads;       /* 0: TERRASEG_THREADS or every core */
    ts_cfg_classes classes; /* ids 0..K-1 with names (required); K = model classes */
    int ignore_id;     /* label id the loss and the metrics skip */

    struct {
        ts_cfg_strings images;  /* one or several rasters (required) */
        ts_cfg_ints bands;      /* 1-based; empty: every non-alpha band */
        ts_cfg_strings indices; /* "ndvi", "ndwi": channels after the bands */
        struct {
            int red, green, nir; /* 1-based band of each role; 0: by band description / colour interpretation */
        } index_bands;
        double nodata;    /* replaces the bands' nodata value; NaN (null): the bands' own */
        int ignore_masks; /* ignore nodata, mask and alpha bands */
        struct {
            int kind;                            /* ts_norm_kind */
            ts_cfg_floats scale, offset;         /* scale */
            ts_cfg_floats mean, std;             /* meanstd */
            ts_cfg_floats min, max;              /* minmax */
            ts_cfg_floats percentiles;           /* percentile: [lo, hi] */
            int64_t sample_pixels;               /* statistics: 0 = every pixel */
        } normalize;
        struct {
            char *crs;                /* NULL: keep the image's CRS */
            ts_cfg_floats resolution; /* [] keep, [r] or [x, y] */
            char *resampling;
            int tap;
        } warp;
    } data;

    struct {
        ts_cfg_strings path; /* one for every image, or one per image (required) */
        char *layer;
        char *attribute;
        ts_cfg_idmap class_map; /* attribute value -> id */
        int burn;
        int all_touched;
        int band;
        ts_cfg_idmap color_map; /* "#rrggbb[aa]" -> id */
        int unknown_color_ignore;
        int binary;
        int background_id;
        char *assume_crs; /* a CRS, "image", or NULL */
    } labels;

    struct {
        int tile, overlap;
        ts_cfg_strings csv; /* [] grid; else one CSV per image */
        int allow_small;
        int drop_background;
        double max_nodata;
        char *cache;
    } windows;

    struct {
        int method; /* ts_train_split_method */
        int64_t block;
        ts_cfg_floats ratios; /* [train, val] or [train, val, test] */
        int64_t seed;
        int buffer;
    } split;

    struct {
        int in_channels; /* 0: derived from the bands and index bands */
        int encoder_depth;
        ts_cfg_ints decoder_channels;
        int decoder_batchnorm;
        int init;      /* ts_train_init */
        char *weights; /* imagenet: a resnet34 state_dict; model: any model file terraseg reads */
        int allow_new_head;
    } model;

    struct {
        double dice_weight; /* w in (1 - w) CE + w Dice */
        int dice;           /* ts_dice_mode */
        double dice_smooth, dice_eps;
        int dice_log;
        ts_cfg_floats class_weights; /* [] or one per class */
    } loss;

    struct {
        int name; /* ts_train_optimizer */
        double lr, weight_decay;
        ts_cfg_floats betas; /* [beta1, beta2] */
        double eps;
        int no_decay_bn_bias;
    } optimizer;

    struct {
        int kind;      /* ts_lr_kind */
        int interval;  /* ts_lr_interval: when the schedule steps; the unit of t_max, step_size */
        int64_t t_max; /* 0: the rest of the run after the warmup */
        double eta_min;
        int64_t step_size;
        double gamma;
        int64_t warmup_steps;
        int warmup_epochs;
        double warmup_start_factor;
    } schedule;

    struct {
        int epochs, batch_size, accumulate;
        double grad_clip;
        int drop_last;
        int val_every;
        int64_t checkpoint_steps;
        int keep_every;
        int patience;
    } train;

    struct {
        int d4;
        double contrast, brightness, noise_std;
    } augment;

    struct {
        int workers, prefetch, shuffle;
    } loader;

    struct ts_cfg_origins *origins; /* private: where each key was last set (for messages) */
} ts_train_config;

/* ---- lifecycle ----------------------------------------------------------------- */
/* Every key at its default. */
ts_status ts_train_config_init(ts_train_config *c);
void ts_train_config_free(ts_train_config *c); /* leaves zeros; NULL and double free are fine */

/* Defaults, then the YAML file (at most 1 MiB). Does not validate. */
ts_status ts_train_config_load(const char *path, ts_train_config *c);
/* Defaults, then YAML text; `source` names it in messages ("checkpoint.safetensors"). */
ts_status ts_train_config_parse_string(const char *yaml, const char *source, ts_train_config *c);
/* Applies "key=value" (the first '=' splits). Scalars take the text as is
 * ("null" clears a nullable key); lists take "a,b,c" or YAML flow
 * "[a, b]"; maps "name=1,other=2" or "{name: 1}"; classes "background,road"
 * (ids = positions) or "[{id: 0, name: background}, ...]". */
ts_status ts_train_config_set(ts_train_config *c, const char *key_eq_value);
/* Cross-field checks (see the top of this file); run after the --set overrides. */
ts_status ts_train_config_validate(const ts_train_config *c);
/* Load, apply sets[0..nsets), validate. */
ts_status ts_train_config_resolve(const char *path, const char *const *sets, int nsets, ts_train_config *c);
/* The checks that need the number of optimizer steps per epoch (known once
 * the windows are counted and split): the warmup against the run. */
ts_status ts_train_config_check_steps(const ts_train_config *c, int64_t steps_per_epoch);

/* The resolved configuration as YAML (malloc'ed): every key, table order,
 * sections nested, numbers in the shortest form that reads back exactly.
 * parse_string(format(c)) gives a configuration equal to c. */
ts_status ts_train_config_format(const ts_train_config *c, char **yaml);
/* 1 when every key has the same value. */
int ts_train_config_equal(const ts_train_config *a, const ts_train_config *b);

/* ---- the schema ------------------------------------------------------------------ */
typedef enum ts_cfg_type {
    TS_CFG_STRING,  /* char* */
    TS_CFG_INT,     /* int */
    TS_CFG_INT64,   /* int64_t */
    TS_CFG_FLOAT,   /* double */
    TS_CFG_BOOL,    /* int, true/false */
    TS_CFG_ENUM,    /* int, one of choices */
    TS_CFG_INTS,    /* ts_cfg_ints */
    TS_CFG_FLOATS,  /* ts_cfg_floats */
    TS_CFG_STRINGS, /* ts_cfg_strings */
    TS_CFG_IDMAP,   /* ts_cfg_idmap */
    TS_CFG_CLASSES, /* ts_cfg_classes */
} ts_cfg_type;

typedef struct ts_cfg_choice {
    const char *name;
    int value;
} ts_cfg_choice;

enum {
    TS_CFG_NULLABLE = 1,  /* STRING: null allowed; FLOAT: null stored as NaN */
    TS_CFG_REQUIRED = 2,  /* validate: must be set (a string, or a non-empty list) */
    TS_CFG_MIN_OPEN = 4,  /* the minimum is exclusive (> min) */
    TS_CFG_MAX_OPEN = 8,  /* the maximum is exclusive (< max) */
};

typedef struct ts_cfg_key {
    const char *key; /* dotted */
    ts_cfg_type type;
    size_t offset;   /* into ts_train_config */
    const char *def; /* default, as YAML text */
    int flags;
    double min, max;          /* numbers, and the items of number lists and id maps */
    int min_items, max_items; /* lists and maps (max 0: the global limit) */
    const ts_cfg_choice *choices; /* ENUM: names -> values; STRING(S): allowed names; NULL-name terminated */
    const char *help;
} ts_cfg_key;

/* The table, in print order. */
const ts_cfg_key *ts_train_config_schema(int *count);
const char *ts_cfg_type_name(ts_cfg_type t);
/* The key reference as Markdown (one table per section), malloc'ed: the
 * generated part of docs/training-config.md. */
ts_status ts_train_config_schema_markdown(char **md);

/* ---- what the trainer builds from it --------------------------------------------
 * Strings in the results point into c: keep c alive while they are used. */

/* Label options (ts_label_opts_init + the labels.* keys, classes, ignore_id).
 * *cmap and *colors are malloc'ed (NULL when unused): free() them after ts_labels_open. */
ts_status ts_train_config_label_opts(const ts_train_config *c, ts_label_opts *o, ts_label_class **cmap,
                                     ts_label_color **colors);
/* Raster options: bands, index bands, normalization, nodata, warp.
 * *norm, *indices are malloc'ed (NULL when unused): free() them after ts_raster_open. */
ts_status ts_train_config_raster_opts(const ts_train_config *c, ts_raster_opts *o, ts_band_norm **norm,
                                      ts_index_spec **indices);
/* The input channels: len(bands) + len(indices), or 0 when the bands are not
 * listed (then the raster decides: every non-alpha band). */
int ts_train_config_channels(const ts_train_config *c);
/* The model for a raster with `in_channels` channels (model.in_channels, when
 * set, must agree), checked by ts_unet_config_check. */
ts_status ts_train_config_unet(const ts_train_config *c, int in_channels, ts_unet_config *u);
void ts_train_config_augment(const ts_train_config *c, ts_augment_opts *a);
/* Loader options for tiles of `channels` channels (training: shuffle, drop_last, augmentation). */
void ts_train_config_loader(const ts_train_config *c, int channels, ts_loader_opts *o);
void ts_train_config_split(const ts_train_config *c, ts_split_params *p);
/* AdamW, clipping and accumulation (train/optim.h). */
void ts_train_config_optim(const ts_train_config *c, ts_optim_config *o);
/* The schedule (train/schedule.h) for a run of `steps_per_epoch` optimizer
 * steps per epoch: the warmup in the schedule's unit (warmup_epochs x
 * steps_per_epoch when it steps per iteration), t_max = 0 resolved to the
 * rest of the run after the warmup. Checked with ts_sched_config_check. */
ts_status ts_train_config_schedule(const ts_train_config *c, int64_t steps_per_epoch, ts_sched_config *s);
/* CE and Dice parameters; *class_weights is malloc'ed (NULL without loss.class_weights)
 * and both structs point to it. */
ts_status ts_train_config_loss(const ts_train_config *c, ts_ce_params *ce, ts_dice_params *dice,
                               float **class_weights);
/* The same as one ts_loss_config (train/loss.h; ts_loss_init copies the
 * weights, so *class_weights may be freed after it). */
ts_status ts_train_config_loss_config(const ts_train_config *c, ts_loss_config *l, float **class_weights);
/* The model card's classes, tile size and ignore id (the bands are added by
 * the trainer once the raster has resolved the normalization). */
ts_status ts_train_config_card(const ts_train_config *c, ts_model_card *card);

#endif
