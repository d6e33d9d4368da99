/* The training configuration: one schema table drives parsing (libyaml's
 * document API), defaults, --set overrides, range checks, the resolved YAML,
 * equality and the generated key reference. See train/config.h. */
#include "train/config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

/* ---- limits: a configuration is a few KiB ------------------------------------ */
#define MAX_FILE_BYTES (1 << 20)
#define MAX_STRING 4096
#define MAX_ITEMS 4096
#define MAX_KEY 256
#define INT_MAXD 2147483647.0
#define I53 9007199254740991.0 /* 2^53 - 1: every int64 up to here is exact in the double bounds */

/* ---- choices ------------------------------------------------------------------- */
static const ts_cfg_choice devices[] = {{"cpu", TS_DEVICE_CPU}, {"cuda", TS_DEVICE_CUDA}, {NULL, 0}};
static const ts_cfg_choice precisions[] = {{"fp32", TS_F32}, {"bf16", TS_BF16}, {"fp16", TS_F16}, {NULL, 0}};
static const ts_cfg_choice norm_kinds[] = {{"none", TS_NORM_NONE},
                                           {"scale", TS_NORM_SCALE},
                                           {"meanstd", TS_NORM_MEANSTD},
                                           {"minmax", TS_NORM_MINMAX},
                                           {"meanstd_stats", TS_NORM_MEANSTD_STATS},
                                           {"minmax_stats", TS_NORM_MINMAX_STATS},
                                           {"percentile", TS_NORM_PERCENTILE_STATS},
                                           {NULL, 0}};
static const ts_cfg_choice index_names[] = {{"ndvi", TS_INDEX_NDVI}, {"ndwi", TS_INDEX_NDWI}, {NULL, 0}};
static const ts_cfg_choice resamplings[] = {
    {"near", 0},  {"bilinear", 0}, {"cubic", 0}, {"cubicspline", 0}, {"lanczos", 0}, {"average", 0}, {"rms", 0},
    {"mode", 0},  {"max", 0},      {"min", 0},   {"med", 0},         {"q1", 0},      {"q3", 0},      {"sum", 0},
    {NULL, 0}};
static const ts_cfg_choice split_methods[] = {{"blocks", TS_SPLIT_BLOCKS}, {"csv", TS_SPLIT_FROM_CSV}, {NULL, 0}};
static const ts_cfg_choice inits[] = {
    {"scratch", TS_INIT_SCRATCH}, {"imagenet", TS_INIT_IMAGENET}, {"model", TS_INIT_MODEL}, {NULL, 0}};
static const ts_cfg_choice dice_modes[] = {{"tutorial", TS_DICE_PER_IMAGE}, {"smp", TS_DICE_SMP}, {NULL, 0}};
static const ts_cfg_choice optimizers[] = {{"adamw", TS_OPTIM_ADAMW}, {NULL, 0}};
static const ts_cfg_choice sched_kinds[] = {
    {"cosine", TS_LR_COSINE}, {"constant", TS_LR_CONSTANT}, {"step", TS_LR_STEP}, {NULL, 0}};
static const ts_cfg_choice intervals[] = {{"epoch", TS_LR_PER_EPOCH}, {"step", TS_LR_PER_ITERATION}, {NULL, 0}};

/* ---- THE SCHEMA ------------------------------------------------------------------
 * Print order = table order; a section's keys are contiguous. Defaults are
 * YAML text, parsed like user input (tests check that each one parses). */
#define OFF(f) offsetof(ts_train_config, f)
#define STR(k, f, d, fl, ch, h) {k, TS_CFG_STRING, OFF(f), d, fl, 0, 0, 0, 0, ch, h}
#define INT(k, f, d, lo, hi, h) {k, TS_CFG_INT, OFF(f), d, 0, lo, hi, 0, 0, NULL, h}
#define I64(k, f, d, lo, hi, h) {k, TS_CFG_INT64, OFF(f), d, 0, lo, hi, 0, 0, NULL, h}
#define FLT(k, f, d, fl, lo, hi, h) {k, TS_CFG_FLOAT, OFF(f), d, fl, lo, hi, 0, 0, NULL, h}
#define BOOL(k, f, d, h) {k, TS_CFG_BOOL, OFF(f), d, 0, 0, 1, 0, 0, NULL, h}
#define ENUM(k, f, d, ch, h) {k, TS_CFG_ENUM, OFF(f), d, 0, 0, 0, 0, 0, ch, h}
#define INTS(k, f, d, fl, lo, hi, n0, n1, h) {k, TS_CFG_INTS, OFF(f), d, fl, lo, hi, n0, n1, NULL, h}
#define FLTS(k, f, d, fl, lo, hi, n0, n1, h) {k, TS_CFG_FLOATS, OFF(f), d, fl, lo, hi, n0, n1, NULL, h}
#define STRS(k, f, d, fl, n0, n1, ch, h) {k, TS_CFG_STRINGS, OFF(f), d, fl, 0, 0, n0, n1, ch, h}
#define IDMAP(k, f, d, h) {k, TS_CFG_IDMAP, OFF(f), d, 0, 0, INT_MAXD, 0, 0, NULL, h}
#define CLASSES(k, f, d, fl, h) {k, TS_CFG_CLASSES, OFF(f), d, fl, 0, INT_MAXD, 0, 0, NULL, h}

static const ts_cfg_key schema[] = {
    INT("version", version, "1", 1, 1, "configuration format version (this build reads 1)"),
    STR("output", output, "null", TS_CFG_NULLABLE | TS_CFG_REQUIRED, NULL,
        "output folder: checkpoints, logs and the resolved configuration (created if missing)"),
    I64("seed", seed, "0", 0, I53, "seed of the model initialization, the window order and the augmentation"),
    ENUM("device", device, "cpu", devices, "where training runs: cpu, or cuda (a build with the CUDA backend)"),
    INT("cuda_device", cuda_device, "0", 0, 1023, "with device cuda: the GPU's index, as cuda:N (terraseg version lists them)"),
    ENUM("precision", precision, "fp32", precisions,
         "activations: fp32; or mixed precision bf16 / fp16 (channels-last half activations on tensor cores, float32 "
         "master weights and optimizer, as torch.autocast; fp16 adds dynamic loss scaling as GradScaler). On the CPU "
         "the half types are emulated, slower than fp32: use them there to check, on cuda to train"),
    BOOL("deterministic", deterministic, "false",
         "with device cuda: deterministic cuDNN algorithms only, so that a run repeated on the same GPU gives the "
         "same weights bit for bit and a resumed run continues exactly where the stopped one was "
         "(torch.backends.cudnn.deterministic; may be slower). The CPU always is"),
    BOOL("tf32", tf32, "false",
         "with device cuda and precision fp32: TF32 tensor-core math for the convolutions "
         "(torch.backends.cudnn.allow_tf32): faster, products rounded to 10-bit mantissas"),
    BOOL("cudnn_benchmark", cudnn_benchmark, "false",
         "with device cuda: choose each convolution shape's algorithm by timing cuDNN's candidates on its first "
         "use (torch.backends.cudnn.benchmark); may pick differently from run to run, so off when deterministic"),
    INT("threads", threads, "0", 0, 1024, "CPU threads for the compute kernels (0: TERRASEG_THREADS, else every core)"),
    CLASSES("classes", classes, "[]", TS_CFG_REQUIRED,
            "the classes, ids 0..K-1: a list of names (ids are the positions) or of {id, name}; K >= 2 is the "
            "model's output channels (binary: [background, building])"),
    INT("ignore_id", ignore_id, "255", 0, INT_MAXD,
        "label id of unlabelled pixels (mask nodata, outside the labels): skipped by the loss and the metrics"),

    /* data */
    STRS("data.images", data.images, "[]", TS_CFG_REQUIRED, 0, 0, NULL,
         "input rasters (anything GDAL opens: GeoTIFF, COG, VRT, ...): one path or a list"),
    INTS("data.bands", data.bands, "[]", 0, 1, 65535, 0, 0,
         "image bands, 1-based, in channel order ([]: every band that is not an alpha band)"),
    STRS("data.indices", data.indices, "[]", 0, 0, 2, index_names,
         "index channels after the bands: ndvi = (nir - red) / (nir + red), ndwi = (green - nir) / (green + nir), "
         "on raw values"),
    INT("data.index_bands.red", data.index_bands.red, "0", 0, 65535,
        "the red band of the indices, 1-based (0: the band described or colour-interpreted as red)"),
    INT("data.index_bands.green", data.index_bands.green, "0", 0, 65535,
        "the green band of the indices, 1-based (0: the band described or colour-interpreted as green)"),
    INT("data.index_bands.nir", data.index_bands.nir, "0", 0, 65535,
        "the near-infrared band of the indices, 1-based (0: the band described as nir)"),
    FLT("data.nodata", data.nodata, "null", TS_CFG_NULLABLE, -1e308, 1e308,
        "nodata value replacing every band's own (null: the bands' own nodata, masks and alpha)"),
    BOOL("data.ignore_masks", data.ignore_masks, "false",
         "ignore nodata values, mask and alpha bands: every pixel is valid (NaN stays invalid)"),
    ENUM("data.normalize.kind", data.normalize.kind, "meanstd_stats", norm_kinds,
         "channel normalization: none; scale (x * scale + offset); meanstd ((x - mean) / std, given); minmax "
         "((clamp(x, min, max) - min) / (max - min), given); meanstd_stats, minmax_stats, percentile (the same with "
         "statistics computed once at start; the values used go into the model card)"),
    FLTS("data.normalize.scale", data.normalize.scale, "[]", 0, -1e308, 1e308, 0, 0,
         "kind scale: the factor, one value for every channel or one per channel (1e-4 for reflectance x 10000)"),
    FLTS("data.normalize.offset", data.normalize.offset, "[]", 0, -1e308, 1e308, 0, 0,
         "kind scale: added after scaling, one value or one per channel ([]: 0)"),
    FLTS("data.normalize.mean", data.normalize.mean, "[]", 0, -1e308, 1e308, 0, 0,
         "kind meanstd: the mean, one value or one per channel"),
    FLTS("data.normalize.std", data.normalize.std, "[]", TS_CFG_MIN_OPEN, 0, 1e308, 0, 0,
         "kind meanstd: the standard deviation (> 0), one value or one per channel"),
    FLTS("data.normalize.min", data.normalize.min, "[]", 0, -1e308, 1e308, 0, 0,
         "kind minmax: the value mapped to 0, one value or one per channel"),
    FLTS("data.normalize.max", data.normalize.max, "[]", 0, -1e308, 1e308, 0, 0,
         "kind minmax: the value mapped to 1 (> min), one value or one per channel"),
    FLTS("data.normalize.percentiles", data.normalize.percentiles, "[2, 98]", 0, 0, 100, 2, 2,
         "kind percentile: the low and high percentiles mapped to 0 and 1"),
    I64("data.normalize.sample_pixels", data.normalize.sample_pixels, "0", 0, I53,
        "statistics from about this many pixels in evenly spaced strips (0: every pixel)"),
    STR("data.warp.crs", data.warp.crs, "null", TS_CFG_NULLABLE, NULL,
        "warp the images to this CRS (EPSG:32633, WKT, PROJ) on the fly (null: keep)"),
    FLTS("data.warp.resolution", data.warp.resolution, "[]", TS_CFG_MIN_OPEN, 0, 1e308, 0, 2,
         "warp to this pixel size in CRS units: [r] or [x, y] ([]: keep, or GDAL's choice when warping)"),
    STR("data.warp.resampling", data.warp.resampling, "bilinear", 0, resamplings,
        "resampling of the warped images (labels always use nearest)"),
    BOOL("data.warp.tap", data.warp.tap, "false",
         "align the warped extent to multiples of the resolution (gdalwarp -tap)"),

    /* labels */
    STRS("labels.path", labels.path, "[]", TS_CFG_REQUIRED, 0, 0, NULL,
         "labels on the image grid: a vector layer (any OGR format) or a mask raster (any GDAL raster); one for "
         "every image, or one per image"),
    STR("labels.layer", labels.layer, "null", TS_CFG_NULLABLE, NULL, "vector labels: the layer (null: the first)"),
    STR("labels.attribute", labels.attribute, "null", TS_CFG_NULLABLE, NULL,
        "vector labels: the class attribute, integer ids or names mapped by class_map (null: burn every feature "
        "with burn)"),
    IDMAP("labels.class_map", labels.class_map, "{}",
          "vector labels: attribute values to class ids, e.g. {building: 1, road: 2}"),
    INT("labels.burn", labels.burn, "1", 0, INT_MAXD,
        "vector labels without attribute: the id burned into every feature"),
    BOOL("labels.all_touched", labels.all_touched, "false",
         "vector labels: burn every pixel a geometry touches (GDAL ALL_TOUCHED)"),
    INT("labels.band", labels.band, "1", 1, 65535, "mask raster: the band holding class ids"),
    IDMAP("labels.color_map", labels.color_map, "{}",
          "colour-coded mask raster: colours to ids, e.g. {\"#ff0000\": 1, \"#00000000\": 255} (RRGGBB or "
          "RRGGBBAA; quote the '#')"),
    BOOL("labels.unknown_color_ignore", labels.unknown_color_ignore, "false",
         "colour-coded mask: a colour not in color_map is ignore_id (false: background_id)"),
    BOOL("labels.binary", labels.binary, "false",
         "every non-zero id other than ignore_id becomes 1 (needs exactly 2 classes)"),
    INT("labels.background_id", labels.background_id, "0", 0, INT_MAXD,
        "id of pixels no feature covers, and of unknown colours"),
    STR("labels.assume_crs", labels.assume_crs, "null", TS_CFG_NULLABLE, NULL,
        "labels without a CRS are in this CRS (EPSG:4674, WKT, PROJ), or 'image' for the image's (null: error)"),

    /* windows */
    INT("windows.tile", windows.tile, "256", 8, 65536, "tile size in pixels (square); every sample is tile x tile"),
    INT("windows.overlap", windows.overlap, "0", 0, 65535,
        "grid windows: pixels shared by neighbours (stride = tile - overlap)"),
    STRS("windows.csv", windows.csv, "[]", 0, 0, 0, NULL,
         "windows from CSV files (col_off,row_off[,width,height][,split]), one per image ([]: a regular grid)"),
    BOOL("windows.drop_background", windows.drop_background, "false",
         "drop windows whose valid pixels are all background or ignore"),
    FLT("windows.max_nodata", windows.max_nodata, "1.0", 0, 0, 1,
        "drop windows whose fraction of invalid image pixels exceeds this (1: keep all)"),
    STR("windows.cache", windows.cache, "null", TS_CFG_NULLABLE, NULL,
        "index cache file: reuse the filtered window list while inputs and options are unchanged (null: none)"),

    /* split */
    ENUM("split.method", split.method, "blocks", split_methods,
         "blocks: spatial blocks hashed into train/val/test (docs/architecture.md); csv: the split column of "
         "windows.csv"),
    I64("split.block", split.block, "1024", 1, INT_MAXD, "blocks: block side in pixels"),
    FLTS("split.ratios", split.ratios, "[0.8, 0.1, 0.1]", 0, 0, 1, 2, 3,
         "blocks: train, val[, test] fractions of the windows (sum 1)"),
    I64("split.seed", split.seed, "0", 0, I53, "blocks: seed of the block hash (kept apart from seed on purpose)"),
    INT("split.buffer", split.buffer, "1", 0, 1000,
        "blocks: val/test windows within (buffer - 1) blocks + half a window of another split become 'buffer' "
        "(1: no shared pixel; 0: off)"),

    /* model */
    INT("model.in_channels", model.in_channels, "0", 0, 4096,
        "input channels (0: derived from data.bands and data.indices; when set it must agree)"),
    INT("model.encoder_depth", model.encoder_depth, "5", 3, 5, "ResNet-34 encoder stages used (SMP encoder_depth)"),
    INTS("model.decoder_channels", model.decoder_channels, "[256, 128, 64, 32, 16]", 0, 1, 4096, 1,
         TS_UNET_MAX_DEPTH, "decoder block widths, one per encoder stage"),
    BOOL("model.decoder_batchnorm", model.decoder_batchnorm, "true",
         "decoder convs with BatchNorm (SMP's default); false: convs with bias"),
    ENUM("model.init", model.init, "scratch", inits,
         "scratch: PyTorch's initialization from seed; imagenet: encoder from a resnet34 state_dict (weights); "
         "model: every weight from a model file (weights: .safetensors, .pth, .ckpt or an SMP folder)"),
    STR("model.weights", model.weights, "null", TS_CFG_NULLABLE, NULL,
        "the file model.init imagenet or model reads"),
    BOOL("model.allow_new_head", model.allow_new_head, "false",
         "model.init model: a segmentation head of another class count is re-initialized (fine-tuning to new "
         "classes) instead of an error"),

    /* loss */
    FLT("loss.dice_weight", loss.dice_weight, "0.5", 0, 0, 1, "w in loss = (1 - w) CE + w Dice"),
    ENUM("loss.dice", loss.dice, "tutorial", dice_modes,
         "Dice form: tutorial (per image and class, eps in numerator and denominator, mean over batch x classes) "
         "or smp (smp.losses.DiceLoss multiclass: pooled over the batch, absent classes masked)"),
    FLT("loss.dice_smooth", loss.dice_smooth, "0.0", 0, 0, 1e6, "smp Dice: smooth"),
    FLT("loss.dice_eps", loss.dice_eps, "1e-7", TS_CFG_MIN_OPEN, 0, 1,
        "Dice eps (tutorial: added to numerator and denominator; smp: the denominator's lower bound)"),
    BOOL("loss.dice_log", loss.dice_log, "false", "smp Dice: -log(dice) instead of 1 - dice"),
    FLTS("loss.class_weights", loss.class_weights, "[]", 0, 0, 1e6, 0, 0,
         "per-class weights of CE (and of the smp Dice), one per class ([]: equal)"),

    /* optimizer */
    ENUM("optimizer.name", optimizer.name, "adamw", optimizers, "the optimizer (torch.optim.AdamW)"),
    FLT("optimizer.lr", optimizer.lr, "3e-4", TS_CFG_MIN_OPEN, 0, 10, "learning rate (the peak of the schedule)"),
    FLT("optimizer.weight_decay", optimizer.weight_decay, "1e-4", 0, 0, 10, "decoupled weight decay"),
    FLTS("optimizer.betas", optimizer.betas, "[0.9, 0.999]", TS_CFG_MAX_OPEN, 0, 1, 2, 2, "AdamW beta1, beta2"),
    FLT("optimizer.eps", optimizer.eps, "1e-8", TS_CFG_MIN_OPEN, 0, 1, "AdamW eps"),
    BOOL("optimizer.no_decay_bn_bias", optimizer.no_decay_bn_bias, "false",
         "no weight decay on BatchNorm weights and biases and on conv biases (false: decay on every parameter, "
         "as the tutorial)"),

    /* schedule */
    ENUM("schedule.kind", schedule.kind, "cosine", sched_kinds,
         "cosine (CosineAnnealingLR to eta_min over t_max), constant, or step (StepLR: x gamma every step_size)"),
    ENUM("schedule.interval", schedule.interval, "epoch", intervals,
         "when the schedule steps (after every epoch, or after every optimizer step), and the unit of t_max, "
         "step_size and the warmup"),
    I64("schedule.t_max", schedule.t_max, "0", 0, I53,
        "cosine: T_max, in intervals after the warmup (0: the rest of the run)"),
    FLT("schedule.eta_min", schedule.eta_min, "0.0", 0, 0, 10, "cosine: the final learning rate"),
    I64("schedule.step_size", schedule.step_size, "10", 1, I53, "step: intervals between two decays"),
    FLT("schedule.gamma", schedule.gamma, "0.1", TS_CFG_MIN_OPEN, 0, 1, "step: the decay factor"),
    I64("schedule.warmup_steps", schedule.warmup_steps, "0", 0, I53,
        "linear warmup (LinearLR) over this many optimizer steps (interval step; 0: none)"),
    INT("schedule.warmup_epochs", schedule.warmup_epochs, "0", 0, 1000000,
        "linear warmup over this many epochs (interval step: their optimizer steps; 0: none; not with "
        "warmup_steps)"),
    FLT("schedule.warmup_start_factor", schedule.warmup_start_factor, "0.3333333333333333", TS_CFG_MIN_OPEN, 0, 1,
        "the warmup ramps the learning rate linearly from this fraction of it (LinearLR's start_factor)"),

    /* train */
    INT("train.epochs", train.epochs, "50", 1, 1000000, "epochs (passes over the training windows)"),
    INT("train.batch_size", train.batch_size, "8", 1, 4096, "tiles per batch"),
    INT("train.accumulate", train.accumulate, "1", 1, 1024,
        "gradient accumulation: one optimizer step every N batches (effective batch = batch_size x N)"),
    FLT("train.grad_clip", train.grad_clip, "0.0", 0, 0, 1e12, "clip the global gradient L2 norm to this (0: off)"),
    BOOL("train.drop_last", train.drop_last, "true", "drop the last batch of an epoch when it is smaller"),
    INT("train.val_every", train.val_every, "1", 1, 1000000, "validate every N epochs (and after the last)"),
    I64("train.checkpoint_steps", train.checkpoint_steps, "0", 0, I53,
        "also save the last checkpoint every N optimizer steps (0: at the end of every epoch only)"),
    INT("train.keep_every", train.keep_every, "0", 0, 1000000,
        "keep the checkpoint of every K-th epoch besides last and best (0: last and best only)"),
    INT("train.patience", train.patience, "0", 0, 1000000,
        "early stopping: stop after N validations without a better validation mIoU (0: off)"),

    /* augment */
    BOOL("augment.d4", augment.d4, "true", "a random flip/rotation (one of the 8 symmetries of the square) per tile"),
    FLT("augment.contrast", augment.contrast, "0.0", 0, 0, 1,
        "contrast factor U(1 - c, 1 + c) around each channel's mean (0: off)"),
    FLT("augment.brightness", augment.brightness, "0.0", 0, 0, 1e6,
        "brightness shift U(-b, b), in normalized units (0: off)"),
    FLT("augment.noise_std", augment.noise_std, "0.0", 0, 0, 1e6, "Gaussian noise std, in normalized units (0: off)"),

    /* loader */
    INT("loader.workers", loader.workers, "2", 0, 64,
        "reader threads (0: read in the training thread); batches are the same for any count"),
    INT("loader.prefetch", loader.prefetch, "2", 1, 64, "batches read ahead"),
    BOOL("loader.shuffle", loader.shuffle, "true", "a new (seeded) order of the training windows every epoch"),
};
#define NKEYS ((int)(sizeof schema / sizeof schema[0]))

struct ts_cfg_origins {
    char *file;              /* the last file or text parsed */
    unsigned char kind[NKEYS]; /* 0 default, 1 file, 2 --set */
    int line[NKEYS];
};

const ts_cfg_key *ts_train_config_schema(int *count)
{
    if (count) *count = NKEYS;
    return schema;
}

const char *ts_cfg_type_name(ts_cfg_type t)
{
    switch (t) {
    case TS_CFG_STRING: return "string";
    case TS_CFG_INT: return "int";
    case TS_CFG_INT64: return "int";
    case TS_CFG_FLOAT: return "float";
    case TS_CFG_BOOL: return "bool";
    case TS_CFG_ENUM: return "enum";
    case TS_CFG_INTS: return "list of int";
    case TS_CFG_FLOATS: return "list of float";
    case TS_CFG_STRINGS: return "list of string";
    case TS_CFG_IDMAP: return "map name: id";
    case TS_CFG_CLASSES: return "class list";
    }
    return "?";
}

static void *field(const ts_train_config *c, const ts_cfg_key *k) { return (char *)c + k->offset; }

static int find_key(const char *name)
{
    for (int i = 0; i < NKEYS; i++)
        if (strcmp(schema[i].key, name) == 0) return i;
    return -1;
}

/* "data" and "data.normalize" are sections: proper prefixes of keys at a dot. */
static int is_section(const char *name)
{
    size_t n = strlen(name);
    for (int i = 0; i < NKEYS; i++)
        if (strncmp(schema[i].key, name, n) == 0 && schema[i].key[n] == '.') return 1;
    return 0;
}

/* ---- small string helpers ------------------------------------------------------ */
typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_add(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_add(sbuf *b, const char *fmt, ...)
{
    if (b->oom) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->oom = 1;
        return;
    }
    if (b->len + (size_t)n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + (size_t)n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p, b->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static char *xstrndup(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

static int lev(const char *a, const char *b)
{
    size_t n = strlen(a), m = strlen(b);
    if (n > MAX_KEY) n = MAX_KEY;
    if (m > MAX_KEY) m = MAX_KEY;
    int row[MAX_KEY + 1];
    for (size_t j = 0; j <= m; j++) row[j] = (int)j;
    for (size_t i = 1; i <= n; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= m; j++) {
            int up = row[j];
            int best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[m];
}

static const char *last_part(const char *k)
{
    const char *d = strrchr(k, '.');
    return d ? d + 1 : k;
}

/* The closest key or section to an unknown dotted key: edit distance over
 * the whole key, or over the last part (+2) so that a misplaced 'lr' finds
 * 'optimizer.lr'. NULL when nothing is reasonably close. */
static const char *suggest_key(const char *name, char *buf, size_t size)
{
    int best = INT_MAX;
    buf[0] = '\0';
    for (int i = 0; i < NKEYS; i++) {
        const char *k = schema[i].key;
        /* the key itself, then each section prefix */
        for (const char *end = k + strlen(k); end > k;) {
            char cand[MAX_KEY];
            size_t n = (size_t)(end - k);
            if (n >= sizeof cand) break;
            memcpy(cand, k, n);
            cand[n] = '\0';
            int d = lev(name, cand);
            int d2 = lev(last_part(name), last_part(cand)) + 2;
            if (d2 < d) d = d2;
            if (d < best) {
                best = d;
                snprintf(buf, size, "%s", cand);
            }
            while (end > k && *--end != '.') {}
        }
    }
    if (best > 2 + (int)strlen(name) / 3) return NULL;
    return buf;
}

static const char *suggest_choice(const char *word, const ts_cfg_choice *ch)
{
    const char *best = NULL;
    int bd = INT_MAX;
    for (; ch->name; ch++) {
        int d = lev(word, ch->name);
        if (d < bd) bd = d, best = ch->name;
    }
    return bd <= 2 + (int)strlen(word) / 3 ? best : NULL;
}

static void choices_text(const ts_cfg_choice *ch, char *buf, size_t size)
{
    size_t n = 0;
    buf[0] = '\0';
    for (const ts_cfg_choice *c = ch; c->name && n < size; c++)
        n += (size_t)snprintf(buf + n, size - n, "%s%s", c == ch ? "" : ", ", c->name);
}

/* "in [0, 1]", "in (0, 1]", "> 0", ">= 1" */
static void range_text(const ts_cfg_key *k, char *buf, size_t size)
{
    int open_lo = (k->flags & TS_CFG_MIN_OPEN) != 0, open_hi = (k->flags & TS_CFG_MAX_OPEN) != 0;
    int has_lo = k->min > -1e300, has_hi = k->max < INT_MAXD;
    if (has_lo && has_hi && k->min == k->max)
        snprintf(buf, size, "%.12g", k->min);
    else if (has_lo && has_hi)
        snprintf(buf, size, "in %c%.12g, %.12g%c", open_lo ? '(' : '[', k->min, k->max, open_hi ? ')' : ']');
    else if (has_lo)
        snprintf(buf, size, "%s %.12g", open_lo ? ">" : ">=", k->min);
    else
        buf[0] = '\0';
}

/* What a key expects, for messages: "an integer in [1, 4096]". */
static void expect_text(const ts_cfg_key *k, char *buf, size_t size)
{
    char r[96], ch[512];
    range_text(k, r, sizeof r);
    switch (k->type) {
    case TS_CFG_STRING:
        if (k->choices) {
            choices_text(k->choices, ch, sizeof ch);
            snprintf(buf, size, "one of %s", ch);
        } else
            snprintf(buf, size, "a string%s", (k->flags & TS_CFG_NULLABLE) ? " or null" : "");
        break;
    case TS_CFG_INT:
    case TS_CFG_INT64: snprintf(buf, size, "an integer%s%s", *r ? " " : "", r); break;
    case TS_CFG_FLOAT:
        snprintf(buf, size, "a number%s%s%s", *r ? " " : "", r, (k->flags & TS_CFG_NULLABLE) ? " or null" : "");
        break;
    case TS_CFG_BOOL: snprintf(buf, size, "true or false"); break;
    case TS_CFG_ENUM:
        choices_text(k->choices, ch, sizeof ch);
        snprintf(buf, size, "one of %s", ch);
        break;
    case TS_CFG_INTS: snprintf(buf, size, "a list of integers%s%s", *r ? " " : "", r); break;
    case TS_CFG_FLOATS: snprintf(buf, size, "a list of numbers%s%s", *r ? " " : "", r); break;
    case TS_CFG_STRINGS:
        if (k->choices) {
            choices_text(k->choices, ch, sizeof ch);
            snprintf(buf, size, "a list of %s", ch);
        } else
            snprintf(buf, size, "a string or a list of strings");
        break;
    case TS_CFG_IDMAP: snprintf(buf, size, "a mapping of names to ids >= 0, e.g. {building: 1}"); break;
    case TS_CFG_CLASSES:
        snprintf(buf, size, "a list of class names, or of {id: N, name: TEXT}, e.g. [background, building]");
        break;
    }
}

/* ---- values -------------------------------------------------------------------- */
static void free_value(ts_train_config *c, const ts_cfg_key *k)
{
    void *f = field(c, k);
    switch (k->type) {
    case TS_CFG_STRING:
        free(*(char **)f);
        *(char **)f = NULL;
        break;
    case TS_CFG_INTS: {
        ts_cfg_ints *l = f;
        free(l->v);
        l->v = NULL, l->n = 0;
        break;
    }
    case TS_CFG_FLOATS: {
        ts_cfg_floats *l = f;
        free(l->v);
        l->v = NULL, l->n = 0;
        break;
    }
    case TS_CFG_STRINGS: {
        ts_cfg_strings *l = f;
        for (int i = 0; i < l->n; i++) free(l->v[i]);
        free(l->v);
        l->v = NULL, l->n = 0;
        break;
    }
    case TS_CFG_IDMAP: {
        ts_cfg_idmap *m = f;
        for (int i = 0; i < m->n; i++) free(m->names[i]);
        free(m->names);
        free(m->ids);
        m->names = NULL, m->ids = NULL, m->n = 0;
        break;
    }
    case TS_CFG_CLASSES: {
        ts_cfg_classes *l = f;
        for (int i = 0; i < l->n; i++) free(l->v[i].name);
        free(l->v);
        l->v = NULL, l->n = 0;
        break;
    }
    default: break;
    }
}

/* ---- parsing context ----------------------------------------------------------- */
typedef struct src {
    const char *source;   /* file path or name */
    const char *set_text; /* --set: the argument; NULL for files */
    int is_default;
    yaml_document_t *doc;
    unsigned char *visited;
    size_t nnodes;
    int seen[NKEYS]; /* line (or -1 for --set) where a key was set in this document; 0: not */
} src;

static int line_of(const yaml_node_t *n) { return (int)n->start_mark.line + 1; }

/* "train.yaml line 12", "--set 'optimizer.lr=x'" */
static const char *where(const src *s, const yaml_node_t *n, char *buf, size_t size)
{
    if (s->is_default)
        snprintf(buf, size, "the schema default (a bug in train/config.c)");
    else if (s->set_text)
        snprintf(buf, size, "--set '%s'", s->set_text);
    else
        snprintf(buf, size, "%s line %d", s->source, n ? line_of(n) : 1);
    return buf;
}

static ts_status node_error(const src *s, const yaml_node_t *n, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static ts_status node_error(const src *s, const yaml_node_t *n, const char *key, const char *fmt, ...)
{
    char w[600], msg[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ts_error(TS_ERR_INVALID_ARG, "'%s' in %s: %s", key, where(s, n, w, sizeof w), msg);
}

/* A node by id, refusing one reached twice (a YAML alias): aliases could
 * expand exponentially and a configuration never needs them. */
static yaml_node_t *get_node(src *s, int id, const char *key, ts_status *st)
{
    yaml_node_t *n = yaml_document_get_node(s->doc, id);
    if (!n || id < 1 || (size_t)id > s->nnodes) {
        *st = ts_error(TS_ERR_INVALID_ARG, "'%s' in %s: malformed YAML document", key, s->source);
        return NULL;
    }
    if (s->visited[id - 1]) {
        char w[600];
        *st = ts_error(TS_ERR_INVALID_ARG,
                       "'%s' in %s: YAML anchors and aliases are not supported (the node at line %d is used twice); "
                       "write the value out",
                       key, where(s, n, w, sizeof w), line_of(n));
        return NULL;
    }
    s->visited[id - 1] = 1;
    /* Only the default tags: an explicit !!int or !python/... is refused (nothing is ever constructed from a tag). */
    const char *tag = (const char *)n->tag;
    if (tag && strcmp(tag, YAML_STR_TAG) != 0 && strcmp(tag, YAML_SEQ_TAG) != 0 && strcmp(tag, YAML_MAP_TAG) != 0) {
        *st = node_error(s, n, key, "YAML tags (%s) are not supported; remove the tag", tag);
        return NULL;
    }
    *st = TS_OK;
    return n;
}

static int is_null(const yaml_node_t *n)
{
    if (n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return 0;
    const char *v = (const char *)n->data.scalar.value;
    return !*v || !strcmp(v, "~") || !strcmp(v, "null") || !strcmp(v, "Null") || !strcmp(v, "NULL");
}

static int valid_utf8(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!len || i + (size_t)len > n) return 0;
        for (int j = 1; j < len; j++)
            if ((s[i + (size_t)j] & 0xc0) != 0x80) return 0;
        i += (size_t)len;
    }
    return 1;
}

static const char *type_of_node(const yaml_node_t *n)
{
    return n->type == YAML_MAPPING_NODE ? "a mapping" : n->type == YAML_SEQUENCE_NODE ? "a list" : "a scalar";
}

/* The text of a scalar node (no embedded NUL, valid UTF-8, bounded). */
static ts_status scalar_text(const src *s, const yaml_node_t *n, const char *key, const char **text)
{
    if (n->type != YAML_SCALAR_NODE) return node_error(s, n, key, "expected a single value, got %s", type_of_node(n));
    const char *v = (const char *)n->data.scalar.value;
    size_t len = n->data.scalar.length;
    if (strlen(v) != len) return node_error(s, n, key, "the value contains a NUL character");
    if (len > MAX_STRING) return node_error(s, n, key, "the value is longer than %d bytes", MAX_STRING);
    if (!valid_utf8((const unsigned char *)v, len)) return node_error(s, n, key, "the value is not valid UTF-8");
    *text = v;
    return TS_OK;
}

static int parse_i64(const char *t, long long *v)
{
    if (!*t || isspace((unsigned char)*t)) return 0;
    errno = 0;
    char *end = NULL;
    long long x = strtoll(t, &end, 10);
    if (errno || *end) return 0;
    *v = x;
    return 1;
}

static int parse_f64(const char *t, double *v)
{
    if (!*t || isspace((unsigned char)*t) || strpbrk(t, "xXpP")) return 0;
    char *end = NULL;
    double x = strtod(t, &end);
    if (*end || !isfinite(x)) return 0;
    *v = x;
    return 1;
}

static int in_range(const ts_cfg_key *k, double v)
{
    if ((k->flags & TS_CFG_MIN_OPEN) ? !(v > k->min) : !(v >= k->min)) return 0;
    return (k->flags & TS_CFG_MAX_OPEN) ? v < k->max : v <= k->max;
}

/* One number of key k from a scalar (the key itself, or an item of a list). */
static ts_status scalar_number(const src *s, const yaml_node_t *n, const ts_cfg_key *k, int integer, double *out,
                               long long *iout, const char *what)
{
    const char *t;
    char e[700];
    ts_status st = scalar_text(s, n, k->key, &t);
    if (st) return st;
    expect_text(k, e, sizeof e);
    if (integer) {
        long long v;
        if (!parse_i64(t, &v)) return node_error(s, n, k->key, "%s'%s' is not an integer; expected %s", what, t, e);
        if (!in_range(k, (double)v))
            return node_error(s, n, k->key, "%s%s is out of range; expected %s", what, t, e);
        *iout = v;
        *out = (double)v;
    } else {
        double v;
        if (!parse_f64(t, &v)) return node_error(s, n, k->key, "%s'%s' is not a number; expected %s", what, t, e);
        if (!in_range(k, v)) return node_error(s, n, k->key, "%s%s is out of range; expected %s", what, t, e);
        *out = v;
    }
    return TS_OK;
}

static ts_status check_choice(const src *s, const yaml_node_t *n, const ts_cfg_key *k, const char *t, int *value)
{
    for (const ts_cfg_choice *c = k->choices; c->name; c++)
        if (strcmp(c->name, t) == 0) {
            if (value) *value = c->value;
            return TS_OK;
        }
    char ch[512];
    choices_text(k->choices, ch, sizeof ch);
    const char *sug = suggest_choice(t, k->choices);
    if (sug) return node_error(s, n, k->key, "'%s' is not one of %s; did you mean '%s'?", t, ch, sug);
    return node_error(s, n, k->key, "'%s' is not one of %s", t, ch);
}

/* The items of a list node: a sequence, a single scalar (one item) or null (none). */
static ts_status list_items(src *s, yaml_node_t *n, const ts_cfg_key *k, yaml_node_t ***items, int *count)
{
    *items = NULL;
    *count = 0;
    if (is_null(n)) return TS_OK;
    if (n->type == YAML_SCALAR_NODE) {
        *items = malloc(sizeof **items);
        if (!*items) return ts_error(TS_ERR_NOMEM, "config: out of memory");
        (*items)[0] = n;
        *count = 1;
    } else if (n->type == YAML_SEQUENCE_NODE) {
        ptrdiff_t m = n->data.sequence.items.top - n->data.sequence.items.start;
        if (m > MAX_ITEMS) return node_error(s, n, k->key, "more than %d items", MAX_ITEMS);
        *items = malloc((size_t)(m ? m : 1) * sizeof **items);
        if (!*items) return ts_error(TS_ERR_NOMEM, "config: out of memory");
        for (ptrdiff_t i = 0; i < m; i++) {
            ts_status st;
            yaml_node_t *it = get_node(s, n->data.sequence.items.start[i], k->key, &st);
            if (!it) {
                free(*items);
                *items = NULL;
                return st;
            }
            (*items)[i] = it;
        }
        *count = (int)m;
    } else {
        char e[700];
        expect_text(k, e, sizeof e);
        return node_error(s, n, k->key, "expected %s, got a mapping", e);
    }
    int lo = k->min_items, hi = k->max_items ? k->max_items : MAX_ITEMS;
    if (*count < lo || *count > hi) {
        ts_status st = lo == hi ? node_error(s, n, k->key, "expected exactly %d values, got %d", lo, *count)
                                : node_error(s, n, k->key, "expected %d to %d values, got %d", lo, hi, *count);
        free(*items);
        *items = NULL;
        return st;
    }
    return TS_OK;
}

static const char *item_label(char *buf, size_t size, int i, int count)
{
    if (count > 1)
        snprintf(buf, size, "item %d: ", i + 1);
    else
        buf[0] = '\0';
    return buf;
}

static ts_status apply_classes(src *s, yaml_node_t *n, const ts_cfg_key *k, ts_cfg_classes *out)
{
    yaml_node_t **items;
    int m;
    ts_status st = list_items(s, n, k, &items, &m);
    if (st) return st;
    ts_cfg_class *v = calloc((size_t)(m ? m : 1), sizeof *v);
    if (!v) {
        free(items);
        return ts_error(TS_ERR_NOMEM, "config: out of memory");
    }
    int done = 0;
    for (int i = 0; i < m && !st; i++) {
        yaml_node_t *it = items[i];
        const char *name = NULL;
        long long id = i;
        if (it->type == YAML_SCALAR_NODE) {
            if (is_null(it)) st = node_error(s, it, k->key, "class %d: an empty entry", i + 1);
            else st = scalar_text(s, it, k->key, &name);
        } else if (it->type == YAML_MAPPING_NODE) {
            int has_id = 0;
            for (yaml_node_pair_t *p = it->data.mapping.pairs.start; p < it->data.mapping.pairs.top && !st; p++) {
                yaml_node_t *kn = get_node(s, p->key, k->key, &st);
                yaml_node_t *vn = kn ? get_node(s, p->value, k->key, &st) : NULL;
                const char *kt;
                if (!vn || (st = scalar_text(s, kn, k->key, &kt))) break;
                if (!strcmp(kt, "id")) {
                    const char *t;
                    if ((st = scalar_text(s, vn, k->key, &t))) break;
                    if (has_id || !parse_i64(t, &id) || id < 0 || id > INT32_MAX)
                        st = node_error(s, vn, k->key, "class %d: %s", i + 1,
                                        has_id ? "id given twice" : "id must be an integer >= 0");
                    has_id = 1;
                } else if (!strcmp(kt, "name")) {
                    if (name) st = node_error(s, vn, k->key, "class %d: name given twice", i + 1);
                    else st = scalar_text(s, vn, k->key, &name);
                } else {
                    const char *sug = lev(kt, "id") <= lev(kt, "name") ? "id" : "name";
                    st = node_error(s, kn, k->key, "class %d: unknown key '%s'; did you mean '%s'? (a class is {id: N, "
                                                   "name: TEXT})",
                                    i + 1, kt, sug);
                }
            }
            if (!st && (!has_id || !name))
                st = node_error(s, it, k->key, "class %d: needs both id and name, e.g. {id: %d, name: building}", i + 1,
                                i);
        } else {
            st = node_error(s, it, k->key, "class %d: expected a name or {id: N, name: TEXT}, got a list", i + 1);
        }
        if (st) break;
        if (!*name) {
            st = node_error(s, it, k->key, "class %d: the name is empty", i + 1);
            break;
        }
        v[i].id = (int32_t)id;
        v[i].name = strdup(name);
        if (!v[i].name) st = ts_error(TS_ERR_NOMEM, "config: out of memory");
        done = i + 1;
    }
    free(items);
    if (st) {
        for (int i = 0; i < done; i++) free(v[i].name);
        free(v);
        return st;
    }
    out->v = v;
    out->n = m;
    return TS_OK;
}

static ts_status apply_idmap(src *s, yaml_node_t *n, const ts_cfg_key *k, ts_cfg_idmap *out)
{
    char e[700];
    if (is_null(n)) {
        *out = (ts_cfg_idmap){0};
        return TS_OK;
    }
    if (n->type != YAML_MAPPING_NODE) {
        expect_text(k, e, sizeof e);
        return node_error(s, n, k->key, "expected %s, got %s", e, type_of_node(n));
    }
    ptrdiff_t m = n->data.mapping.pairs.top - n->data.mapping.pairs.start;
    if (m > MAX_ITEMS) return node_error(s, n, k->key, "more than %d entries", MAX_ITEMS);
    ts_cfg_idmap r = {calloc((size_t)(m ? m : 1), sizeof(char *)), calloc((size_t)(m ? m : 1), sizeof(int32_t)), 0};
    ts_status st = TS_OK;
    if (!r.names || !r.ids) st = ts_error(TS_ERR_NOMEM, "config: out of memory");
    for (ptrdiff_t i = 0; i < m && !st; i++) {
        yaml_node_pair_t *p = &n->data.mapping.pairs.start[i];
        yaml_node_t *kn = get_node(s, p->key, k->key, &st), *vn = kn ? get_node(s, p->value, k->key, &st) : NULL;
        const char *name, *t;
        long long id;
        if (!vn || (st = scalar_text(s, kn, k->key, &name)) || (st = scalar_text(s, vn, k->key, &t))) break;
        if (!*name) {
            st = node_error(s, kn, k->key, "an empty name");
            break;
        }
        for (int j = 0; j < r.n; j++)
            if (!strcmp(r.names[j], name)) st = node_error(s, kn, k->key, "'%s' is given twice", name);
        if (st) break;
        if (!parse_i64(t, &id) || id < 0 || id > INT32_MAX) {
            st = node_error(s, vn, k->key, "'%s': the id '%s' is not an integer >= 0", name, t);
            break;
        }
        r.names[r.n] = strdup(name);
        if (!r.names[r.n]) st = ts_error(TS_ERR_NOMEM, "config: out of memory");
        r.ids[r.n++] = (int32_t)id;
    }
    if (st) {
        for (int j = 0; j < r.n; j++) free(r.names[j]);
        free(r.names);
        free(r.ids);
        return st;
    }
    *out = r;
    return TS_OK;
}

/* Parses node n as the value of key k and stores it (replacing the old
 * value) only when all of it is valid. */
static ts_status apply(ts_train_config *c, int ki, src *s, yaml_node_t *n)
{
    const ts_cfg_key *k = &schema[ki];
    void *f = field(c, k);
    char e[700], lbl[32];
    ts_status st = TS_OK;
    expect_text(k, e, sizeof e);
    switch (k->type) {
    case TS_CFG_STRING: {
        if (is_null(n)) {
            if (!(k->flags & TS_CFG_NULLABLE)) return node_error(s, n, k->key, "null is not allowed; expected %s", e);
            free_value(c, k);
            return TS_OK;
        }
        const char *t;
        if ((st = scalar_text(s, n, k->key, &t))) return st;
        if (k->choices && (st = check_choice(s, n, k, t, NULL))) return st;
        if (!*t && !k->choices) return node_error(s, n, k->key, "an empty string; use null to unset it");
        char *v = strdup(t);
        if (!v) return ts_error(TS_ERR_NOMEM, "config: out of memory");
        free_value(c, k);
        *(char **)f = v;
        return TS_OK;
    }
    case TS_CFG_INT:
    case TS_CFG_INT64:
    case TS_CFG_FLOAT: {
        if (is_null(n)) {
            if (k->type == TS_CFG_FLOAT && (k->flags & TS_CFG_NULLABLE)) {
                *(double *)f = NAN;
                return TS_OK;
            }
            return node_error(s, n, k->key, "null is not allowed; expected %s", e);
        }
        double d;
        long long i;
        if ((st = scalar_number(s, n, k, k->type != TS_CFG_FLOAT, &d, &i, ""))) return st;
        if (k->type == TS_CFG_INT) *(int *)f = (int)i;
        else if (k->type == TS_CFG_INT64) *(int64_t *)f = (int64_t)i;
        else *(double *)f = d;
        return TS_OK;
    }
    case TS_CFG_BOOL: {
        const char *t;
        if (is_null(n)) return node_error(s, n, k->key, "null is not allowed; expected true or false");
        if ((st = scalar_text(s, n, k->key, &t))) return st;
        if (!strcmp(t, "true") || !strcmp(t, "True") || !strcmp(t, "TRUE")) *(int *)f = 1;
        else if (!strcmp(t, "false") || !strcmp(t, "False") || !strcmp(t, "FALSE")) *(int *)f = 0;
        else return node_error(s, n, k->key, "'%s' is not a boolean; expected true or false", t);
        return TS_OK;
    }
    case TS_CFG_ENUM: {
        const char *t;
        int v;
        if (is_null(n)) return node_error(s, n, k->key, "null is not allowed; expected %s", e);
        if ((st = scalar_text(s, n, k->key, &t)) || (st = check_choice(s, n, k, t, &v))) return st;
        *(int *)f = v;
        return TS_OK;
    }
    case TS_CFG_INTS:
    case TS_CFG_FLOATS: {
        yaml_node_t **items;
        int m;
        if ((st = list_items(s, n, k, &items, &m))) return st;
        int is_int = k->type == TS_CFG_INTS;
        void *v = malloc((size_t)(m ? m : 1) * (is_int ? sizeof(int) : sizeof(double)));
        if (!v) st = ts_error(TS_ERR_NOMEM, "config: out of memory");
        for (int i = 0; i < m && !st; i++) {
            double d;
            long long x;
            st = scalar_number(s, items[i], k, is_int, &d, &x, item_label(lbl, sizeof lbl, i, m));
            if (is_int) ((int *)v)[i] = (int)x;
            else ((double *)v)[i] = d;
        }
        free(items);
        if (st) {
            free(v);
            return st;
        }
        free_value(c, k);
        if (is_int) *(ts_cfg_ints *)f = (ts_cfg_ints){v, m};
        else *(ts_cfg_floats *)f = (ts_cfg_floats){v, m};
        return TS_OK;
    }
    case TS_CFG_STRINGS: {
        yaml_node_t **items;
        int m;
        if ((st = list_items(s, n, k, &items, &m))) return st;
        char **v = calloc((size_t)(m ? m : 1), sizeof *v);
        if (!v) st = ts_error(TS_ERR_NOMEM, "config: out of memory");
        for (int i = 0; i < m && !st; i++) {
            const char *t;
            if ((st = scalar_text(s, items[i], k->key, &t))) break;
            if (!*t || is_null(items[i])) {
                st = node_error(s, items[i], k->key, "%san empty value", item_label(lbl, sizeof lbl, i, m));
                break;
            }
            if (k->choices && (st = check_choice(s, items[i], k, t, NULL))) break;
            for (int j = 0; j < i; j++)
                if (k->choices && !strcmp(v[j], t)) st = node_error(s, items[i], k->key, "'%s' is listed twice", t);
            if (st) break;
            if (!(v[i] = strdup(t))) st = ts_error(TS_ERR_NOMEM, "config: out of memory");
        }
        free(items);
        if (st) {
            for (int i = 0; i < m && v; i++) free(v[i]);
            free(v);
            return st;
        }
        free_value(c, k);
        *(ts_cfg_strings *)f = (ts_cfg_strings){v, m};
        return TS_OK;
    }
    case TS_CFG_IDMAP: {
        ts_cfg_idmap r;
        if ((st = apply_idmap(s, n, k, &r))) return st;
        free_value(c, k);
        *(ts_cfg_idmap *)f = r;
        return TS_OK;
    }
    case TS_CFG_CLASSES: {
        ts_cfg_classes r;
        if ((st = apply_classes(s, n, k, &r))) return st;
        free_value(c, k);
        *(ts_cfg_classes *)f = r;
        return TS_OK;
    }
    }
    return TS_OK;
}

static void set_origin(ts_train_config *c, int ki, const src *s, int line)
{
    if (!c->origins) return;
    c->origins->kind[ki] = s->is_default ? 0 : s->set_text ? 2 : 1;
    c->origins->line[ki] = line;
}

/* ---- walking a document ---------------------------------------------------------- */
static ts_status walk_mapping(ts_train_config *c, src *s, yaml_node_t *map, const char *prefix, int depth)
{
    ts_status st = TS_OK;
    yaml_node_pair_t *start = map->data.mapping.pairs.start, *top = map->data.mapping.pairs.top;
    for (yaml_node_pair_t *p = start; p < top; p++) {
        const char *ctx = *prefix ? prefix : "(top level)";
        yaml_node_t *kn = get_node(s, p->key, ctx, &st);
        if (!kn) return st;
        char w[600];
        if (kn->type != YAML_SCALAR_NODE)
            return ts_error(TS_ERR_INVALID_ARG, "%s: a key that is %s; keys are plain names such as lr",
                            where(s, kn, w, sizeof w), type_of_node(kn));
        const char *name = (const char *)kn->data.scalar.value;
        if (kn->data.scalar.length == 0 || strlen(name) != kn->data.scalar.length ||
            strlen(prefix) + kn->data.scalar.length + 2 > MAX_KEY)
            return ts_error(TS_ERR_INVALID_ARG, "%s: an empty or overlong key", where(s, kn, w, sizeof w));
        char full[MAX_KEY + 2];
        snprintf(full, sizeof full, "%s%s%s", prefix, *prefix ? "." : "", name);
        yaml_node_t *vn = get_node(s, p->value, full, &st);
        if (!vn) return st;
        /* a key repeated in one mapping (YAML forbids it; libyaml keeps both) */
        for (yaml_node_pair_t *q = start; q < p; q++) {
            yaml_node_t *qk = yaml_document_get_node(s->doc, q->key);
            if (qk && qk->type == YAML_SCALAR_NODE && !strcmp((const char *)qk->data.scalar.value, name))
                return ts_error(TS_ERR_INVALID_ARG, "duplicate key '%s' in %s lines %d and %d; keep one", full,
                                s->source, line_of(qk), line_of(kn));
        }
        int ki = find_key(full);
        if (ki >= 0) {
            if (s->seen[ki])
                return ts_error(TS_ERR_INVALID_ARG, "'%s' is set twice in %s: lines %d and %d; keep one", full,
                                s->source, s->seen[ki], line_of(kn));
            if ((st = apply(c, ki, s, vn))) return st;
            s->seen[ki] = line_of(kn);
            set_origin(c, ki, s, line_of(kn));
        } else if (is_section(full)) {
            if (is_null(vn)) continue; /* "augment:" with nothing under it */
            if (vn->type != YAML_MAPPING_NODE) {
                char ex[MAX_KEY];
                for (int i = 0; i < NKEYS; i++)
                    if (!strncmp(schema[i].key, full, strlen(full)) && schema[i].key[strlen(full)] == '.') {
                        snprintf(ex, sizeof ex, "%s", schema[i].key + strlen(full) + 1);
                        break;
                    }
                return ts_error(TS_ERR_INVALID_ARG,
                                "'%s' in %s is a section: expected a mapping of its keys (e.g. %s: ...), got %s", full,
                                where(s, kn, w, sizeof w), ex, type_of_node(vn));
            }
            if (depth > 8) return ts_error(TS_ERR_INVALID_ARG, "%s: nested too deeply", where(s, kn, w, sizeof w));
            if ((st = walk_mapping(c, s, vn, full, depth + 1))) return st;
        } else {
            char sug[MAX_KEY];
            if (suggest_key(full, sug, sizeof sug))
                return ts_error(TS_ERR_INVALID_ARG, "unknown key '%s' in %s; did you mean '%s'?", full,
                                where(s, kn, w, sizeof w), sug);
            return ts_error(TS_ERR_INVALID_ARG,
                            "unknown key '%s' in %s; docs/training-config.md lists every key", full,
                            where(s, kn, w, sizeof w));
        }
    }
    return TS_OK;
}

static ts_status yaml_syntax_error(const yaml_parser_t *p, const char *source, const char *text, size_t len)
{
    const char *hint = text && p->problem_mark.index < len && text[p->problem_mark.index] == '\t'
                           ? "; YAML indents with spaces, not tabs"
                           : "";
    if (p->error == YAML_MEMORY_ERROR) return ts_error(TS_ERR_NOMEM, "%s: out of memory parsing YAML", source);
    if (p->error == YAML_READER_ERROR)
        return ts_error(TS_ERR_INVALID_ARG, "%s: not readable as YAML text at byte %zu: %s", source, p->problem_offset,
                        p->problem ? p->problem : "?");
    char ctx[256] = "";
    if (p->context)
        snprintf(ctx, sizeof ctx, " (%s, line %zu column %zu)", p->context, p->context_mark.line + 1,
                 p->context_mark.column + 1);
    return ts_error(TS_ERR_INVALID_ARG, "%s line %zu column %zu: YAML syntax error: %s%s%s", source,
                    p->problem_mark.line + 1, p->problem_mark.column + 1, p->problem ? p->problem : "?", ctx, hint);
}

/* Applies a YAML text (the whole configuration or part of it) to c. */
static ts_status apply_text(ts_train_config *c, const char *text, size_t len, const char *source)
{
    if (len > MAX_FILE_BYTES)
        return ts_error(TS_ERR_INVALID_ARG, "%s: larger than %d bytes; a training configuration is a few KiB", source,
                        MAX_FILE_BYTES);
    if (memchr(text, '\0', len))
        return ts_error(TS_ERR_INVALID_ARG, "%s: contains a NUL byte; is this a YAML text file?", source);
    yaml_parser_t p;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&p)) return ts_error(TS_ERR_NOMEM, "%s: out of memory", source);
    yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
    if (!yaml_parser_load(&p, &doc)) {
        ts_status st = yaml_syntax_error(&p, source, text, len);
        yaml_parser_delete(&p);
        return st;
    }
    ts_status st = TS_OK;
    yaml_document_t doc2;
    if (!yaml_parser_load(&p, &doc2)) {
        st = yaml_syntax_error(&p, source, text, len);
    } else {
        yaml_node_t *r2 = yaml_document_get_root_node(&doc2);
        if (r2)
            st = ts_error(TS_ERR_INVALID_ARG,
                          "%s line %zu: a second YAML document; a configuration is one document (remove the '---')",
                          source, r2->start_mark.line + 1);
        yaml_document_delete(&doc2);
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    src *s = NULL;
    if (!st && root) {
        s = calloc(1, sizeof *s);
        size_t nn = (size_t)(doc.nodes.top - doc.nodes.start);
        if (s) s->visited = calloc(nn ? nn : 1, 1);
        if (!s || !s->visited) st = ts_error(TS_ERR_NOMEM, "%s: out of memory", source);
        else {
            s->source = source;
            s->doc = &doc;
            s->nnodes = nn;
            yaml_node_t *r = get_node(s, 1, "(top level)", &st);
            if (r && !is_null(r)) {
                if (r->type != YAML_MAPPING_NODE)
                    st = ts_error(TS_ERR_INVALID_ARG,
                                  "%s line %d: the configuration must be a mapping of keys (output: ..., data: ...), "
                                  "not %s",
                                  source, line_of(r), type_of_node(r));
                else
                    st = walk_mapping(c, s, r, "", 0);
            }
        }
    }
    if (s) free(s->visited);
    free(s);
    yaml_document_delete(&doc);
    yaml_parser_delete(&p);
    return st;
}

/* ---- lifecycle ------------------------------------------------------------------- */
void ts_train_config_free(ts_train_config *c)
{
    if (!c) return;
    for (int i = 0; i < NKEYS; i++) free_value(c, &schema[i]);
    if (c->origins) free(c->origins->file);
    free(c->origins);
    memset(c, 0, sizeof *c);
}

/* Applies "value" to key ki as --set does (or as a default, when is_default). */
static ts_status set_value(ts_train_config *c, int ki, const char *value, const char *set_text, int is_default);

ts_status ts_train_config_init(ts_train_config *c)
{
    memset(c, 0, sizeof *c);
    c->origins = calloc(1, sizeof *c->origins);
    if (!c->origins) return ts_error(TS_ERR_NOMEM, "config: out of memory");
    for (int i = 0; i < NKEYS; i++) {
        ts_status st = set_value(c, i, schema[i].def, NULL, 1);
        if (st) {
            ts_train_config_free(c);
            return st;
        }
    }
    return TS_OK;
}

static ts_status remember_file(ts_train_config *c, const char *source)
{
    free(c->origins->file);
    c->origins->file = strdup(source);
    return c->origins->file ? TS_OK : ts_error(TS_ERR_NOMEM, "config: out of memory");
}

ts_status ts_train_config_parse_string(const char *yaml, const char *source, ts_train_config *c)
{
    if (!source) source = "(configuration text)";
    ts_status st = ts_train_config_init(c);
    if (st) return st;
    if ((st = remember_file(c, source)) || (st = apply_text(c, yaml ? yaml : "", yaml ? strlen(yaml) : 0, source))) {
        ts_train_config_free(c);
        ts_train_config_init(c);
    }
    return st;
}

ts_status ts_train_config_load(const char *path, ts_train_config *c)
{
    ts_status st = ts_train_config_init(c);
    if (st) return st;
    FILE *f = fopen(path, "rb");
    if (!f) return ts_error(TS_ERR_IO, "cannot open the configuration '%s': %s", path, strerror(errno));
    char *buf = malloc(MAX_FILE_BYTES + 2);
    if (!buf) {
        fclose(f);
        return ts_error(TS_ERR_NOMEM, "config: out of memory");
    }
    size_t n = fread(buf, 1, MAX_FILE_BYTES + 1, f);
    int err = ferror(f);
    fclose(f);
    if (err) st = ts_error(TS_ERR_IO, "cannot read the configuration '%s'", path);
    else if (n > MAX_FILE_BYTES)
        st = ts_error(TS_ERR_INVALID_ARG, "%s: larger than %d bytes; a training configuration is a few KiB", path,
                      MAX_FILE_BYTES);
    if (!st) st = remember_file(c, path);
    if (!st) st = apply_text(c, buf, n, path);
    free(buf);
    if (st) {
        ts_train_config_free(c);
        ts_train_config_init(c);
    }
    return st;
}

/* ---- --set ------------------------------------------------------------------------- */
static void trim(const char **s, size_t *n)
{
    while (*n && isspace((unsigned char)**s)) (*s)++, (*n)--;
    while (*n && isspace((unsigned char)(*s)[*n - 1])) (*n)--;
}

static ts_status set_value(ts_train_config *c, int ki, const char *value, const char *set_text, int is_default)
{
    const ts_cfg_key *k = &schema[ki];
    const char *what = set_text ? set_text : k->key;
    int is_list = k->type == TS_CFG_INTS || k->type == TS_CFG_FLOATS || k->type == TS_CFG_STRINGS ||
                  k->type == TS_CFG_IDMAP || k->type == TS_CFG_CLASSES;
    yaml_document_t doc;
    int have_doc = 0;
    ts_status st = TS_OK;
    if (is_list && (value[0] == '[' || value[0] == '{')) {
        /* YAML flow syntax: parse it as its own document */
        yaml_parser_t p;
        if (!yaml_parser_initialize(&p)) return ts_error(TS_ERR_NOMEM, "config: out of memory");
        yaml_parser_set_input_string(&p, (const unsigned char *)value, strlen(value));
        if (!yaml_parser_load(&p, &doc)) {
            char src_name[600];
            snprintf(src_name, sizeof src_name, "--set '%s'", what);
            st = yaml_syntax_error(&p, src_name, value, strlen(value));
            yaml_parser_delete(&p);
            return st;
        }
        yaml_parser_delete(&p);
        have_doc = 1;
        if (!yaml_document_get_root_node(&doc)) {
            yaml_document_delete(&doc);
            return ts_error(TS_ERR_INVALID_ARG, "--set '%s': no value", what);
        }
    } else {
        /* Plain text: a scalar as is; lists split at commas; maps "name=id,...". */
        if (!yaml_document_initialize(&doc, NULL, NULL, NULL, 1, 1))
            return ts_error(TS_ERR_NOMEM, "config: out of memory");
        have_doc = 1;
        size_t vlen = strlen(value);
        if (!is_list) {
            if (!yaml_document_add_scalar(&doc, NULL, (yaml_char_t *)value, (int)vlen, YAML_PLAIN_SCALAR_STYLE))
                st = ts_error(TS_ERR_NOMEM, "config: out of memory");
        } else {
            int is_map = k->type == TS_CFG_IDMAP;
            int root = is_map ? yaml_document_add_mapping(&doc, NULL, YAML_FLOW_MAPPING_STYLE)
                              : yaml_document_add_sequence(&doc, NULL, YAML_FLOW_SEQUENCE_STYLE);
            if (!root) st = ts_error(TS_ERR_NOMEM, "config: out of memory");
            const char *p = value;
            while (!st && *p) {
                const char *comma = strchr(p, ',');
                size_t n = comma ? (size_t)(comma - p) : strlen(p);
                const char *item = p;
                size_t in = n;
                trim(&item, &in);
                if (in == 0 && (comma || p != value))
                    st = ts_error(TS_ERR_INVALID_ARG, "'%s' in --set '%s': an empty item in the list", k->key, what);
                else if (in == 0) {
                } else if (is_map) {
                    const char *eq = NULL;
                    for (size_t i = 0; i < in; i++)
                        if (item[i] == '=') eq = item + i;
                    if (!eq)
                        st = ts_error(TS_ERR_INVALID_ARG,
                                      "--set '%s': '%.*s' is not name=id (e.g. %s=building=1,road=2)",
                                      what, (int)in, item, k->key);
                    else {
                        const char *nm = item, *idt = eq + 1;
                        size_t nl = (size_t)(eq - item), il = in - nl - 1;
                        trim(&nm, &nl);
                        trim(&idt, &il);
                        int kid = yaml_document_add_scalar(&doc, NULL, (yaml_char_t *)nm, (int)nl,
                                                           YAML_SINGLE_QUOTED_SCALAR_STYLE);
                        int vid = yaml_document_add_scalar(&doc, NULL, (yaml_char_t *)idt, (int)il,
                                                           YAML_PLAIN_SCALAR_STYLE);
                        if (!kid || !vid || !yaml_document_append_mapping_pair(&doc, root, kid, vid))
                            st = ts_error(TS_ERR_NOMEM, "config: out of memory");
                    }
                } else {
                    int id = yaml_document_add_scalar(&doc, NULL, (yaml_char_t *)item, (int)in,
                                                      YAML_PLAIN_SCALAR_STYLE);
                    if (!id || !yaml_document_append_sequence_item(&doc, root, id))
                        st = ts_error(TS_ERR_NOMEM, "config: out of memory");
                }
                p += n;
                if (*p == ',') p++;
            }
        }
    }
    if (!st) {
        src s = {0};
        s.source = set_text ? "--set" : "default";
        s.set_text = set_text ? set_text : NULL;
        s.is_default = is_default;
        s.doc = &doc;
        s.nnodes = (size_t)(doc.nodes.top - doc.nodes.start);
        s.visited = calloc(s.nnodes ? s.nnodes : 1, 1);
        if (!s.visited) st = ts_error(TS_ERR_NOMEM, "config: out of memory");
        yaml_node_t *root = s.visited ? get_node(&s, 1, k->key, &st) : NULL;
        if (root) st = apply(c, ki, &s, root);
        if (!st) set_origin(c, ki, &s, 0);
        free(s.visited);
    }
    if (have_doc) yaml_document_delete(&doc);
    return st;
}

ts_status ts_train_config_set(ts_train_config *c, const char *key_eq_value)
{
    const char *eq = key_eq_value ? strchr(key_eq_value, '=') : NULL;
    if (!eq)
        return ts_error(TS_ERR_INVALID_ARG, "--set '%s': expected key=value, e.g. --set optimizer.lr=1e-3",
                        key_eq_value ? key_eq_value : "");
    char key[MAX_KEY];
    const char *ks = key_eq_value;
    size_t kl = (size_t)(eq - key_eq_value);
    trim(&ks, &kl);
    if (kl == 0 || kl >= sizeof key)
        return ts_error(TS_ERR_INVALID_ARG, "--set '%s': an empty or overlong key", key_eq_value);
    if (strlen(eq + 1) > MAX_STRING * 4)
        return ts_error(TS_ERR_INVALID_ARG, "--set %.*s: the value is too long", (int)kl, ks);
    memcpy(key, ks, kl);
    key[kl] = '\0';
    int ki = find_key(key);
    if (ki < 0) {
        char sug[MAX_KEY];
        if (is_section(key))
            return ts_error(TS_ERR_INVALID_ARG, "--set '%s': '%s' is a section; set one of its keys (%s.KEY=VALUE)",
                            key_eq_value, key, key);
        if (suggest_key(key, sug, sizeof sug))
            return ts_error(TS_ERR_INVALID_ARG, "unknown key '%s' in --set '%s'; did you mean '%s'?", key,
                            key_eq_value, sug);
        return ts_error(TS_ERR_INVALID_ARG, "unknown key '%s' in --set '%s'; docs/training-config.md lists every key",
                        key, key_eq_value);
    }
    const char *v = eq + 1;
    size_t vl = strlen(v);
    trim(&v, &vl);
    char *value = xstrndup(v, vl);
    if (!value) return ts_error(TS_ERR_NOMEM, "config: out of memory");
    ts_status st = set_value(c, ki, value, key_eq_value, 0);
    free(value);
    return st;
}

/* ---- validation ---------------------------------------------------------------------- */
/* Where key was set, for messages: "train.yaml line 20", "--set", "default". */
static const char *origin(const ts_train_config *c, const char *key)
{
    static _Thread_local char buf[4][640];
    static _Thread_local int k;
    k = (k + 1) % 4;
    int ki = find_key(key);
    if (ki < 0 || !c->origins) return "?";
    switch (c->origins->kind[ki]) {
    case 1:
        snprintf(buf[k], sizeof buf[k], "%s line %d", c->origins->file ? c->origins->file : "?",
                 c->origins->line[ki]);
        break;
    case 2: snprintf(buf[k], sizeof buf[k], "--set"); break;
    default: snprintf(buf[k], sizeof buf[k], "the default"); break;
    }
    return buf[k];
}

#define FAIL(...) return ts_error(TS_ERR_INVALID_ARG, __VA_ARGS__)

static ts_status check_norm_list(const ts_train_config *c, const char *key, const ts_cfg_floats *l, int channels,
                                 int needed, const char *kind)
{
    if (needed && l->n == 0)
        FAIL("data.normalize.kind is %s (%s), which needs '%s': one value for every channel or one per channel",
             kind, origin(c, "data.normalize.kind"), key);
    if (!needed && l->n > 0)
        FAIL("'%s' (%s) is set but data.normalize.kind is %s (%s), which does not use it; remove it or change the kind",
             key, origin(c, key), kind, origin(c, "data.normalize.kind"));
    if (l->n > 1 && channels > 0 && l->n != channels)
        FAIL("'%s' (%s) has %d values but there are %d channels (data.bands + data.indices); give 1 or %d", key,
             origin(c, key), l->n, channels, channels);
    return TS_OK;
}

static const char *norm_name(int kind)
{
    for (const ts_cfg_choice *ch = norm_kinds; ch->name; ch++)
        if (ch->value == kind) return ch->name;
    return "?";
}

ts_status ts_train_config_validate(const ts_train_config *c)
{
    ts_status st;
    /* required keys */
    for (int i = 0; i < NKEYS; i++) {
        const ts_cfg_key *k = &schema[i];
        if (!(k->flags & TS_CFG_REQUIRED)) continue;
        const void *f = field(c, k);
        int missing = k->type == TS_CFG_STRING    ? *(char *const *)f == NULL
                      : k->type == TS_CFG_STRINGS ? ((const ts_cfg_strings *)f)->n == 0
                      : k->type == TS_CFG_CLASSES ? ((const ts_cfg_classes *)f)->n == 0
                                                  : 0;
        if (missing)
            FAIL("missing required key '%s'%s%s: %s", k->key, c->origins && c->origins->file ? " in " : "",
                 c->origins && c->origins->file ? c->origins->file : "", k->help);
    }
    /* classes: ids exactly 0..K-1, names unique */
    int K = c->classes.n;
    if (K < 2)
        FAIL("'classes' (%s) lists %d class; the model needs at least 2 (binary: [background, building])",
             origin(c, "classes"), K);
    for (int i = 0; i < K; i++) {
        const ts_cfg_class *a = &c->classes.v[i];
        if (a->id >= K)
            FAIL("'classes' (%s): class '%s' has id %d, but with %d classes the ids must be 0..%d (the model's "
                 "output channels)",
                 origin(c, "classes"), a->name, a->id, K, K - 1);
        for (int j = 0; j < i; j++) {
            if (c->classes.v[j].id == a->id)
                FAIL("'classes' (%s): id %d is used by both '%s' and '%s'", origin(c, "classes"), a->id,
                     c->classes.v[j].name, a->name);
            if (!strcmp(c->classes.v[j].name, a->name))
                FAIL("'classes' (%s): the name '%s' is used twice", origin(c, "classes"), a->name);
        }
    }
    if (c->ignore_id < K)
        FAIL("'ignore_id' (%s) is %d, which is a class id (0..%d); use an id >= %d, e.g. 255", origin(c, "ignore_id"),
             c->ignore_id, K - 1, K);
    /* The CPU computes in exact float32 and times nothing: a GPU setting there
     * would be silently ignored (deterministic is not: the CPU always is). */
    if (c->device == TS_DEVICE_CPU && (c->tf32 || c->cudnn_benchmark))
        FAIL("'%s' (%s) is for device cuda, but 'device' (%s) is cpu, which computes in exact float32 and does not "
             "time algorithms; drop it or train on cuda",
             c->tf32 ? "tf32" : "cudnn_benchmark", origin(c, c->tf32 ? "tf32" : "cudnn_benchmark"), origin(c, "device"));
    /* data */
    int nimg = c->data.images.n;
    if (c->labels.path.n != 1 && c->labels.path.n != nimg)
        FAIL("'labels.path' (%s) has %d entries for %d images (data.images); give one for every image or one per image",
             origin(c, "labels.path"), c->labels.path.n, nimg);
    if (c->windows.csv.n != 0 && c->windows.csv.n != nimg)
        FAIL("'windows.csv' (%s) has %d entries for %d images (data.images); give one per image, or [] for a grid",
             origin(c, "windows.csv"), c->windows.csv.n, nimg);
    int channels = ts_train_config_channels(c);
    if (c->data.indices.n > 0 && c->data.bands.n == 0)
        FAIL("'data.indices' (%s) needs 'data.bands' listed too, so that the channels are known before the images are "
             "opened (e.g. bands: [1, 2, 3, 4])",
             origin(c, "data.indices"));
    if (c->model.in_channels && channels && c->model.in_channels != channels)
        FAIL("'model.in_channels' (%s) is %d but data.bands and data.indices give %d channels; set it to 0 (derived)",
             origin(c, "model.in_channels"), c->model.in_channels, channels);
    const char *nk = norm_name(c->data.normalize.kind);
    int kind = c->data.normalize.kind;
    const ts_cfg_floats *scale = &c->data.normalize.scale;
    if ((st = check_norm_list(c, "data.normalize.scale", scale, channels, kind == TS_NORM_SCALE, nk))) return st;
    if (kind == TS_NORM_SCALE) {
        for (int i = 0; i < scale->n; i++)
            if (scale->v[i] == 0)
                FAIL("'data.normalize.scale' (%s): a scale of 0 maps everything to the offset",
                     origin(c, "data.normalize.scale"));
        if (c->data.normalize.offset.n > 1 && channels > 0 && c->data.normalize.offset.n != channels)
            FAIL("'data.normalize.offset' (%s) has %d values but there are %d channels; give 1 or %d",
                 origin(c, "data.normalize.offset"), c->data.normalize.offset.n, channels, channels);
    } else if ((st = check_norm_list(c, "data.normalize.offset", &c->data.normalize.offset, channels, 0, nk)))
        return st;
    int ms = kind == TS_NORM_MEANSTD, mm = kind == TS_NORM_MINMAX;
    if ((st = check_norm_list(c, "data.normalize.mean", &c->data.normalize.mean, channels, ms, nk)) ||
        (st = check_norm_list(c, "data.normalize.std", &c->data.normalize.std, channels, ms, nk)) ||
        (st = check_norm_list(c, "data.normalize.min", &c->data.normalize.min, channels, mm, nk)) ||
        (st = check_norm_list(c, "data.normalize.max", &c->data.normalize.max, channels, mm, nk)))
        return st;
    if (kind == TS_NORM_MINMAX) {
        const ts_cfg_floats *lo = &c->data.normalize.min, *hi = &c->data.normalize.max;
        int n = lo->n > hi->n ? lo->n : hi->n;
        for (int i = 0; i < n; i++) {
            double a = lo->v[lo->n == 1 ? 0 : i], b = hi->v[hi->n == 1 ? 0 : i];
            if (!(a < b))
                FAIL("data.normalize: channel %d has min %g >= max %g (%s, %s); min must be below max", i + 1, a, b,
                     origin(c, "data.normalize.min"), origin(c, "data.normalize.max"));
        }
        if (lo->n > 1 && hi->n > 1 && lo->n != hi->n)
            FAIL("data.normalize.min has %d values and max %d; give the same count", lo->n, hi->n);
    }
    if (kind == TS_NORM_MEANSTD && c->data.normalize.mean.n > 1 && c->data.normalize.std.n > 1 &&
        c->data.normalize.mean.n != c->data.normalize.std.n)
        FAIL("data.normalize.mean has %d values and std %d; give the same count", c->data.normalize.mean.n,
             c->data.normalize.std.n);
    if (c->data.normalize.percentiles.v[0] >= c->data.normalize.percentiles.v[1])
        FAIL("'data.normalize.percentiles' (%s): the low percentile %g must be below the high one %g",
             origin(c, "data.normalize.percentiles"), c->data.normalize.percentiles.v[0],
             c->data.normalize.percentiles.v[1]);
    /* labels */
    if (c->labels.class_map.n && !c->labels.attribute)
        FAIL("'labels.class_map' (%s) maps attribute values, but labels.attribute is not set",
             origin(c, "labels.class_map"));
    if (c->labels.binary && K != 2)
        FAIL("'labels.binary' (%s) makes labels 0/1, but 'classes' lists %d classes; list 2 (e.g. [background, "
             "building])",
             origin(c, "labels.binary"), K);
    for (int i = 0; i < c->labels.color_map.n; i++) {
        char item[600];
        ts_label_color *col = NULL;
        int n = 0;
        snprintf(item, sizeof item, "%s=%d", c->labels.color_map.names[i], (int)c->labels.color_map.ids[i]);
        if (ts_label_parse_color_map(item, &col, &n) != TS_OK)
            FAIL("'labels.color_map' (%s): '%s' is not a colour #RRGGBB or #RRGGBBAA (in YAML quote it: "
                 "\"#ff0000\": 1)",
                 origin(c, "labels.color_map"), c->labels.color_map.names[i]);
        free(col);
    }
    const struct {
        const char *key;
        const ts_cfg_idmap *m;
    } maps[] = {{"labels.class_map", &c->labels.class_map}, {"labels.color_map", &c->labels.color_map}};
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < maps[j].m->n; i++)
            if (maps[j].m->ids[i] >= K && maps[j].m->ids[i] != c->ignore_id && !c->labels.binary)
                FAIL("'%s' (%s): '%s' maps to %d, which is neither a class id (0..%d) nor ignore_id %d", maps[j].key,
                     origin(c, maps[j].key), maps[j].m->names[i], (int)maps[j].m->ids[i], K - 1, c->ignore_id);
    if (!c->labels.binary && c->labels.burn >= K && c->labels.burn != c->ignore_id)
        FAIL("'labels.burn' (%s) is %d, which is not a class id (0..%d)", origin(c, "labels.burn"), c->labels.burn,
             K - 1);
    if (c->labels.background_id >= K && c->labels.background_id != c->ignore_id)
        FAIL("'labels.background_id' (%s) is %d, which is neither a class id (0..%d) nor ignore_id",
             origin(c, "labels.background_id"), c->labels.background_id, K - 1);
    /* windows and split */
    if (c->windows.overlap >= c->windows.tile)
        FAIL("'windows.overlap' (%s) is %d but must be below windows.tile %d (stride = tile - overlap)",
             origin(c, "windows.overlap"), c->windows.overlap, c->windows.tile);
    if (c->split.method == TS_SPLIT_FROM_CSV && c->windows.csv.n == 0)
        FAIL("'split.method' (%s) is csv, which reads the split column of windows.csv, but windows.csv is empty",
             origin(c, "split.method"));
    double sum = 0;
    for (int i = 0; i < c->split.ratios.n; i++) sum += c->split.ratios.v[i];
    if (fabs(sum - 1) > 1e-6)
        FAIL("'split.ratios' (%s) sums to %.10g; the train, val[, test] fractions must sum to 1",
             origin(c, "split.ratios"), sum);
    if (c->split.ratios.v[0] <= 0)
        FAIL("'split.ratios' (%s): the train fraction must be > 0", origin(c, "split.ratios"));
    /* model */
    if (c->model.decoder_channels.n != c->model.encoder_depth)
        FAIL("'model.decoder_channels' (%s) has %d entries but model.encoder_depth (%s) is %d; give one width per "
             "stage (e.g. [256, 128, 64, 32, 16] for depth 5)",
             origin(c, "model.decoder_channels"), c->model.decoder_channels.n, origin(c, "model.encoder_depth"),
             c->model.encoder_depth);
    if (c->model.init != TS_INIT_SCRATCH && !c->model.weights)
        FAIL("'model.init' (%s) is %s but model.weights is not set; name the file to read",
             origin(c, "model.init"), c->model.init == TS_INIT_IMAGENET ? "imagenet" : "model");
    if (c->model.init == TS_INIT_SCRATCH && c->model.weights)
        FAIL("'model.weights' (%s) is set but model.init is scratch (%s); set model.init to model or imagenet, or "
             "remove model.weights",
             origin(c, "model.weights"), origin(c, "model.init"));
    if (c->model.allow_new_head && c->model.init != TS_INIT_MODEL)
        FAIL("'model.allow_new_head' (%s) only applies to model.init: model", origin(c, "model.allow_new_head"));
    /* loss */
    if (c->loss.class_weights.n && c->loss.class_weights.n != K)
        FAIL("'loss.class_weights' (%s) has %d values for %d classes; give one per class or []",
             origin(c, "loss.class_weights"), c->loss.class_weights.n, K);
    if (c->loss.class_weights.n) {
        double wsum = 0;
        for (int i = 0; i < c->loss.class_weights.n; i++) wsum += c->loss.class_weights.v[i];
        if (wsum <= 0)
            FAIL("'loss.class_weights' (%s) are all 0; give some class a weight > 0, or [] for equal weights",
                 origin(c, "loss.class_weights"));
    }
    if (c->loss.dice == TS_DICE_PER_IMAGE && (c->loss.dice_smooth != 0 || c->loss.dice_log))
        FAIL("'%s' (%s) only applies to loss.dice: smp (loss.dice is tutorial)",
             c->loss.dice_log ? "loss.dice_log" : "loss.dice_smooth",
             origin(c, c->loss.dice_log ? "loss.dice_log" : "loss.dice_smooth"));
    /* schedule */
    if (c->schedule.warmup_steps > 0 && c->schedule.warmup_epochs > 0)
        FAIL("both schedule.warmup_steps (%s) and schedule.warmup_epochs (%s) are set; use one",
             origin(c, "schedule.warmup_steps"), origin(c, "schedule.warmup_epochs"));
    if (c->schedule.warmup_steps > 0 && c->schedule.interval == TS_LR_PER_EPOCH)
        FAIL("'schedule.warmup_steps' (%s) counts optimizer steps but schedule.interval (%s) is epoch; use "
             "schedule.warmup_epochs, or schedule.interval: step",
             origin(c, "schedule.warmup_steps"), origin(c, "schedule.interval"));
    if (c->schedule.warmup_epochs >= c->train.epochs)
        FAIL("'schedule.warmup_epochs' (%s) is %d but training has %d epochs (train.epochs); the warmup must be "
             "shorter",
             origin(c, "schedule.warmup_epochs"), c->schedule.warmup_epochs, c->train.epochs);
    if (c->schedule.kind == TS_LR_COSINE && c->schedule.eta_min >= c->optimizer.lr)
        FAIL("'schedule.eta_min' (%s) is %g, not below optimizer.lr %g", origin(c, "schedule.eta_min"),
             c->schedule.eta_min, c->optimizer.lr);
    /* train */
    double val = c->split.ratios.n > 1 ? c->split.ratios.v[1] : 0;
    if (c->train.patience > 0 && c->split.method == TS_SPLIT_BLOCKS && val <= 0)
        FAIL("'train.patience' (%s) stops on the validation mIoU, but split.ratios gives no validation windows",
             origin(c, "train.patience"));
    return TS_OK;
}

ts_status ts_train_config_check_steps(const ts_train_config *c, int64_t steps_per_epoch)
{
    if (steps_per_epoch < 1)
        FAIL("training has no optimizer step per epoch (too few training windows for train.batch_size %d x "
             "train.accumulate %d); add windows or lower them",
             c->train.batch_size, c->train.accumulate);
    int64_t total = steps_per_epoch * c->train.epochs;
    int64_t warm = c->schedule.warmup_steps ? c->schedule.warmup_steps
                                            : (int64_t)c->schedule.warmup_epochs * steps_per_epoch;
    if (warm >= total)
        FAIL("the warmup (%lld steps, %s) is not shorter than the run (%lld steps = %d epochs x %lld); shorten it",
             (long long)warm,
             c->schedule.warmup_steps ? origin(c, "schedule.warmup_steps") : origin(c, "schedule.warmup_epochs"),
             (long long)total, c->train.epochs, (long long)steps_per_epoch);
    return TS_OK;
}

ts_status ts_train_config_resolve(const char *path, const char *const *sets, int nsets, ts_train_config *c)
{
    ts_status st = ts_train_config_load(path, c);
    for (int i = 0; !st && i < nsets; i++) st = ts_train_config_set(c, sets[i]);
    if (!st) st = ts_train_config_validate(c);
    return st;
}

/* ---- formatting ------------------------------------------------------------------------ */
static void fmt_double(char *buf, size_t size, double v)
{
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, size, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    /* "1.0", "1.0e-07": a '.' in every float, so that YAML 1.1 readers (PyYAML) see a float too */
    char *e = strpbrk(buf, "eE");
    if (strchr(buf, '.') || strchr(buf, 'n') || strlen(buf) + 3 > size) return;
    if (!e) {
        strcat(buf, ".0");
    } else {
        memmove(e + 2, e, strlen(e) + 1);
        e[0] = '.', e[1] = '0';
    }
}

static int plain_ok(const char *s)
{
    if (!*s || strchr("-@%", *s) || (*s == '.' && s[1] != '/' && s[1] != '.')) return 0;
    for (const char *p = s; *p; p++)
        if (!isalnum((unsigned char)*p) && !strchr("_./+@%-", *p)) return 0;
    static const char *const words[] = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"};
    for (size_t i = 0; i < sizeof words / sizeof *words; i++)
        if (!strcasecmp(s, words[i])) return 0;
    double d;
    long long x;
    if (parse_f64(s, &d) || parse_i64(s, &x)) return 0;
    return 1;
}

static void put_string(sbuf *b, const char *s)
{
    if (!s) {
        sb_add(b, "null");
        return;
    }
    if (plain_ok(s)) {
        sb_add(b, "%s", s);
        return;
    }
    sb_add(b, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') sb_add(b, "\\%c", *p);
        else if (*p == '\n') sb_add(b, "\\n");
        else if (*p == '\t') sb_add(b, "\\t");
        else if (*p < 0x20 || *p == 0x7f) sb_add(b, "\\x%02x", *p);
        else sb_add(b, "%c", *p);
    }
    sb_add(b, "\"");
}

static void put_value(sbuf *b, const ts_train_config *c, const ts_cfg_key *k, int indent)
{
    const void *f = field(c, k);
    char num[64];
    switch (k->type) {
    case TS_CFG_STRING: put_string(b, *(char *const *)f); break;
    case TS_CFG_INT: sb_add(b, "%d", *(const int *)f); break;
    case TS_CFG_INT64: sb_add(b, "%lld", (long long)*(const int64_t *)f); break;
    case TS_CFG_FLOAT:
        if (isnan(*(const double *)f)) sb_add(b, "null");
        else {
            fmt_double(num, sizeof num, *(const double *)f);
            sb_add(b, "%s", num);
        }
        break;
    case TS_CFG_BOOL: sb_add(b, "%s", *(const int *)f ? "true" : "false"); break;
    case TS_CFG_ENUM: {
        const char *name = "?";
        for (const ts_cfg_choice *ch = k->choices; ch->name; ch++)
            if (ch->value == *(const int *)f) name = ch->name;
        sb_add(b, "%s", name);
        break;
    }
    case TS_CFG_INTS: {
        const ts_cfg_ints *l = f;
        sb_add(b, "[");
        for (int i = 0; i < l->n; i++) sb_add(b, "%s%d", i ? ", " : "", l->v[i]);
        sb_add(b, "]");
        break;
    }
    case TS_CFG_FLOATS: {
        const ts_cfg_floats *l = f;
        sb_add(b, "[");
        for (int i = 0; i < l->n; i++) {
            fmt_double(num, sizeof num, l->v[i]);
            sb_add(b, "%s%s", i ? ", " : "", num);
        }
        sb_add(b, "]");
        break;
    }
    case TS_CFG_STRINGS: {
        const ts_cfg_strings *l = f;
        if (!l->n) sb_add(b, "[]");
        for (int i = 0; i < l->n; i++) {
            sb_add(b, "\n%*s- ", indent + 2, "");
            put_string(b, l->v[i]);
        }
        break;
    }
    case TS_CFG_IDMAP: {
        const ts_cfg_idmap *m = f;
        if (!m->n) sb_add(b, "{}");
        for (int i = 0; i < m->n; i++) {
            sb_add(b, "\n%*s", indent + 2, "");
            put_string(b, m->names[i]);
            sb_add(b, ": %d", (int)m->ids[i]);
        }
        break;
    }
    case TS_CFG_CLASSES: {
        const ts_cfg_classes *l = f;
        if (!l->n) sb_add(b, "[]");
        for (int i = 0; i < l->n; i++) {
            sb_add(b, "\n%*s- {id: %d, name: ", indent + 2, "", (int)l->v[i].id);
            put_string(b, l->v[i].name);
            sb_add(b, "}");
        }
        break;
    }
    }
}

/* Number of leading dotted components two keys share. */
static int shared_parts(const char *a, const char *b)
{
    int n = 0;
    for (;;) {
        const char *da = strchr(a, '.'), *db = strchr(b, '.');
        if (!da || !db || da - a != db - b || strncmp(a, b, (size_t)(da - a))) return n;
        n++;
        a = da + 1, b = db + 1;
    }
}

ts_status ts_train_config_format(const ts_train_config *c, char **yaml)
{
    *yaml = NULL;
    sbuf b = {0};
    sb_add(&b, "# terraseg train: the resolved configuration (every key; docs/training-config.md)\n");
    const char *prev = "";
    for (int i = 0; i < NKEYS; i++) {
        const char *k = schema[i].key;
        int keep = shared_parts(prev, k);
        /* open the sections of k below the shared ones */
        const char *p = k;
        for (int d = 0; d < keep; d++) p = strchr(p, '.') + 1;
        int depth = keep;
        for (const char *dot; (dot = strchr(p, '.')); p = dot + 1, depth++)
            sb_add(&b, "%*s%.*s:\n", 2 * depth, "", (int)(dot - p), p);
        sb_add(&b, "%*s%s:", 2 * depth, "", p);
        sbuf v = {0};
        put_value(&v, c, &schema[i], 2 * depth);
        if (v.oom) b.oom = 1;
        else sb_add(&b, "%s%s\n", v.p[0] == '\n' ? "" : " ", v.p);
        free(v.p);
        prev = k;
    }
    if (b.oom) {
        free(b.p);
        return ts_error(TS_ERR_NOMEM, "config: out of memory formatting the configuration");
    }
    *yaml = b.p;
    return TS_OK;
}

int ts_train_config_equal(const ts_train_config *a, const ts_train_config *b)
{
    for (int i = 0; i < NKEYS; i++) {
        const ts_cfg_key *k = &schema[i];
        const void *x = field(a, k), *y = field(b, k);
        switch (k->type) {
        case TS_CFG_STRING: {
            const char *s = *(char *const *)x, *t = *(char *const *)y;
            if ((!s) != (!t) || (s && strcmp(s, t))) return 0;
            break;
        }
        case TS_CFG_INT:
        case TS_CFG_BOOL:
        case TS_CFG_ENUM:
            if (*(const int *)x != *(const int *)y) return 0;
            break;
        case TS_CFG_INT64:
            if (*(const int64_t *)x != *(const int64_t *)y) return 0;
            break;
        case TS_CFG_FLOAT: {
            double s = *(const double *)x, t = *(const double *)y;
            if (!(s == t || (isnan(s) && isnan(t)))) return 0;
            break;
        }
        case TS_CFG_INTS: {
            const ts_cfg_ints *s = x, *t = y;
            if (s->n != t->n || (s->n && memcmp(s->v, t->v, (size_t)s->n * sizeof *s->v))) return 0;
            break;
        }
        case TS_CFG_FLOATS: {
            const ts_cfg_floats *s = x, *t = y;
            if (s->n != t->n) return 0;
            for (int j = 0; j < s->n; j++)
                if (s->v[j] != t->v[j]) return 0;
            break;
        }
        case TS_CFG_STRINGS: {
            const ts_cfg_strings *s = x, *t = y;
            if (s->n != t->n) return 0;
            for (int j = 0; j < s->n; j++)
                if (strcmp(s->v[j], t->v[j])) return 0;
            break;
        }
        case TS_CFG_IDMAP: {
            const ts_cfg_idmap *s = x, *t = y;
            if (s->n != t->n) return 0;
            for (int j = 0; j < s->n; j++)
                if (strcmp(s->names[j], t->names[j]) || s->ids[j] != t->ids[j]) return 0;
            break;
        }
        case TS_CFG_CLASSES: {
            const ts_cfg_classes *s = x, *t = y;
            if (s->n != t->n) return 0;
            for (int j = 0; j < s->n; j++)
                if (s->v[j].id != t->v[j].id || strcmp(s->v[j].name, t->v[j].name)) return 0;
            break;
        }
        }
    }
    return 1;
}

/* ---- the generated key reference ------------------------------------------------------- */
static void md_text(sbuf *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '|') sb_add(b, "\\|");
        else sb_add(b, "%c", *s);
    }
}

ts_status ts_train_config_schema_markdown(char **md)
{
    *md = NULL;
    sbuf b = {0};
    char prev_section[MAX_KEY] = "\x01";
    for (int i = 0; i < NKEYS; i++) {
        const ts_cfg_key *k = &schema[i];
        const char *dot = strchr(k->key, '.');
        char section[MAX_KEY];
        snprintf(section, sizeof section, "%.*s", dot ? (int)(dot - k->key) : 0, k->key);
        if (strcmp(section, prev_section)) {
            if (*section)
                sb_add(&b, "\n### `%s`\n\n", section);
            else
                sb_add(&b, "### Top level\n\n");
            sb_add(&b, "| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n");
            snprintf(prev_section, sizeof prev_section, "%s", section);
        }
        char allowed[700] = "";
        if (k->choices)
            choices_text(k->choices, allowed, sizeof allowed);
        else if (k->type == TS_CFG_INT || k->type == TS_CFG_INT64 || k->type == TS_CFG_FLOAT ||
                 k->type == TS_CFG_INTS || k->type == TS_CFG_FLOATS)
            range_text(k, allowed, sizeof allowed);
        size_t al = strlen(allowed);
        if ((k->type == TS_CFG_INTS || k->type == TS_CFG_FLOATS || k->type == TS_CFG_STRINGS) &&
            (k->min_items || k->max_items)) {
            if (k->min_items == k->max_items)
                snprintf(allowed + al, sizeof allowed - al, "%s%d values", al ? "; " : "", k->min_items);
            else
                snprintf(allowed + al, sizeof allowed - al, "%s%d to %d values", al ? "; " : "", k->min_items,
                         k->max_items);
        }
        if (k->type == TS_CFG_STRING && !k->choices) {
            al = strlen(allowed);
            snprintf(allowed + al, sizeof allowed - al, "%stext", al ? "; " : "");
        }
        if (k->flags & TS_CFG_NULLABLE) {
            al = strlen(allowed);
            snprintf(allowed + al, sizeof allowed - al, "%s or null", al ? "" : "null");
        }
        if (k->flags & TS_CFG_REQUIRED) {
            al = strlen(allowed);
            snprintf(allowed + al, sizeof allowed - al, "%s**required**", al ? "; " : "");
        }
        sb_add(&b, "| `%s` | %s | `", k->key, ts_cfg_type_name(k->type));
        md_text(&b, k->def);
        sb_add(&b, "` | ");
        md_text(&b, allowed);
        sb_add(&b, " | ");
        md_text(&b, k->help);
        sb_add(&b, " |\n");
    }
    if (b.oom) {
        free(b.p);
        return ts_error(TS_ERR_NOMEM, "config: out of memory");
    }
    *md = b.p;
    return TS_OK;
}

/* ---- what the trainer builds ------------------------------------------------------------ */
int ts_train_config_channels(const ts_train_config *c)
{
    return c->data.bands.n ? c->data.bands.n + c->data.indices.n : 0;
}

static char *join_map(const ts_cfg_idmap *m)
{
    sbuf b = {0};
    for (int i = 0; i < m->n; i++) sb_add(&b, "%s%s=%d", i ? "," : "", m->names[i], (int)m->ids[i]);
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p;
}

ts_status ts_train_config_label_opts(const ts_train_config *c, ts_label_opts *o, ts_label_class **cmap,
                                     ts_label_color **colors)
{
    *cmap = NULL;
    *colors = NULL;
    ts_label_opts_init(o);
    o->ignore_id = c->ignore_id;
    o->background_id = c->labels.background_id;
    o->classes = c->labels.binary ? 0 : c->classes.n;
    o->binary = c->labels.binary;
    o->band = c->labels.band;
    o->unknown_color_ignore = c->labels.unknown_color_ignore;
    o->layer = c->labels.layer;
    o->attribute = c->labels.attribute;
    o->burn = c->labels.burn;
    o->all_touched = c->labels.all_touched;
    if (c->labels.assume_crs && !strcmp(c->labels.assume_crs, "image")) o->assume_image_crs = 1;
    else o->assume_crs = c->labels.assume_crs;
    ts_status st = TS_OK;
    int n = 0;
    for (int j = 0; j < 2 && !st; j++) {
        const ts_cfg_idmap *m = j ? &c->labels.color_map : &c->labels.class_map;
        if (!m->n) continue;
        char *text = join_map(m);
        if (!text) return ts_error(TS_ERR_NOMEM, "config: out of memory");
        /* class-map names can hold ',' or '=' (the text form cannot): build that map directly */
        if (j == 0) {
            size_t bytes = (size_t)m->n * sizeof **cmap;
            for (int i = 0; i < m->n; i++) bytes += strlen(m->names[i]) + 1;
            ts_label_class *r = malloc(bytes);
            if (!r) st = ts_error(TS_ERR_NOMEM, "config: out of memory");
            else {
                char *names = (char *)(r + m->n);
                for (int i = 0; i < m->n; i++) {
                    size_t l = strlen(m->names[i]) + 1;
                    memcpy(names, m->names[i], l);
                    r[i].name = names, r[i].id = m->ids[i];
                    names += l;
                }
                *cmap = r;
                o->class_map = r;
                o->n_class_map = m->n;
            }
        } else {
            st = ts_label_parse_color_map(text, colors, &n);
            if (!st) o->colors = *colors, o->n_colors = n;
        }
        free(text);
    }
    if (st) {
        free(*cmap);
        free(*colors);
        *cmap = NULL, *colors = NULL;
    }
    return st;
}

ts_status ts_train_config_raster_opts(const ts_train_config *c, ts_raster_opts *o, ts_band_norm **norm,
                                      ts_index_spec **indices)
{
    memset(o, 0, sizeof *o);
    *norm = NULL;
    *indices = NULL;
    o->bands = c->data.bands.n ? c->data.bands.v : NULL;
    o->nbands = c->data.bands.n;
    if (c->data.indices.n) {
        ts_index_spec *ix = calloc((size_t)c->data.indices.n, sizeof *ix);
        if (!ix) return ts_error(TS_ERR_NOMEM, "config: out of memory");
        for (int i = 0; i < c->data.indices.n; i++) {
            ix[i].kind = !strcmp(c->data.indices.v[i], "ndwi") ? TS_INDEX_NDWI : TS_INDEX_NDVI;
            ix[i].red.band = c->data.index_bands.red;
            ix[i].green.band = c->data.index_bands.green;
            ix[i].nir.band = c->data.index_bands.nir;
        }
        *indices = ix;
        o->indices = ix;
        o->nindices = c->data.indices.n;
    }
    const ts_cfg_floats *lists[] = {&c->data.normalize.scale, &c->data.normalize.offset, &c->data.normalize.mean,
                                    &c->data.normalize.std,   &c->data.normalize.min,    &c->data.normalize.max};
    int nn = 1;
    for (int i = 0; i < 6; i++)
        if (lists[i]->n > nn) nn = lists[i]->n;
    if (c->data.normalize.kind != TS_NORM_NONE) {
        ts_band_norm *bn = calloc((size_t)nn, sizeof *bn);
        if (!bn) {
            free(*indices);
            *indices = NULL;
            return ts_error(TS_ERR_NOMEM, "config: out of memory");
        }
#define PICK(l, d) ((l).n == 0 ? (d) : (l).v[(l).n == 1 ? 0 : i])
        for (int i = 0; i < nn; i++) {
            bn[i].kind = (ts_norm_kind)c->data.normalize.kind;
            bn[i].scale = PICK(c->data.normalize.scale, 1.0);
            bn[i].offset = PICK(c->data.normalize.offset, 0.0);
            bn[i].mean = PICK(c->data.normalize.mean, 0.0);
            bn[i].std = PICK(c->data.normalize.std, 1.0);
            bn[i].min = PICK(c->data.normalize.min, 0.0);
            bn[i].max = PICK(c->data.normalize.max, 1.0);
            bn[i].pct_lo = c->data.normalize.percentiles.v[0];
            bn[i].pct_hi = c->data.normalize.percentiles.v[1];
        }
#undef PICK
        *norm = bn;
        o->norm = bn;
        o->nnorm = nn;
    }
    o->stats_sample_pixels = c->data.normalize.sample_pixels;
    o->has_nodata = !isnan(c->data.nodata);
    o->nodata = o->has_nodata ? c->data.nodata : 0;
    o->ignore_masks = c->data.ignore_masks;
    o->warp_crs = c->data.warp.crs;
    if (c->data.warp.resolution.n) {
        o->warp_res_x = c->data.warp.resolution.v[0];
        o->warp_res_y = c->data.warp.resolution.v[c->data.warp.resolution.n - 1];
    }
    o->warp_tap = c->data.warp.tap;
    o->resampling = c->data.warp.resampling;
    return TS_OK;
}

ts_status ts_train_config_unet(const ts_train_config *c, int in_channels, ts_unet_config *u)
{
    if (c->model.in_channels && c->model.in_channels != in_channels)
        FAIL("'model.in_channels' (%s) is %d but the images give %d channels; set it to 0 (derived)",
             origin(c, "model.in_channels"), c->model.in_channels, in_channels);
    *u = ts_unet_default_config(in_channels, c->classes.n);
    u->encoder_depth = c->model.encoder_depth;
    for (int i = 0; i < TS_UNET_MAX_DEPTH; i++)
        u->decoder_channels[i] = i < c->model.decoder_channels.n ? c->model.decoder_channels.v[i] : 0;
    u->decoder_use_batchnorm = c->model.decoder_batchnorm;
    return ts_unet_config_check(u);
}

void ts_train_config_augment(const ts_train_config *c, ts_augment_opts *a)
{
    a->d4 = c->augment.d4;
    a->contrast = (float)c->augment.contrast;
    a->brightness = (float)c->augment.brightness;
    a->noise_std = (float)c->augment.noise_std;
}

void ts_train_config_loader(const ts_train_config *c, int channels, ts_loader_opts *o)
{
    memset(o, 0, sizeof *o);
    o->channels = channels;
    o->height = o->width = c->windows.tile;
    o->batch_size = c->train.batch_size;
    o->workers = c->loader.workers;
    o->prefetch = c->loader.prefetch;
    o->shuffle = c->loader.shuffle;
    o->seed = (uint64_t)c->seed;
    o->drop_last = c->train.drop_last;
    ts_train_config_augment(c, &o->aug);
}

void ts_train_config_split(const ts_train_config *c, ts_split_params *p)
{
    memset(p, 0, sizeof *p);
    p->block = c->split.block;
    for (int i = 0; i < 3; i++) p->ratios[i] = i < c->split.ratios.n ? c->split.ratios.v[i] : 0;
    p->seed = (uint64_t)c->split.seed;
    p->buffer = c->split.buffer;
}

void ts_train_config_optim(const ts_train_config *c, ts_optim_config *o)
{
    *o = ts_optim_default_config();
    o->lr = c->optimizer.lr;
    o->beta1 = c->optimizer.betas.v[0];
    o->beta2 = c->optimizer.betas.v[1];
    o->eps = c->optimizer.eps;
    o->weight_decay = c->optimizer.weight_decay;
    o->no_decay_1d = c->optimizer.no_decay_bn_bias;
    o->clip_grad_norm = c->train.grad_clip;
    o->accum_steps = c->train.accumulate;
    o->loss_scaling = c->precision == TS_F16; /* bf16 has float32's range: no scaling, as autocast */
}

ts_status ts_train_config_schedule(const ts_train_config *c, int64_t steps_per_epoch, ts_sched_config *s)
{
    ts_status st = ts_train_config_check_steps(c, steps_per_epoch);
    if (st) return st;
    *s = ts_sched_default_config();
    s->kind = (ts_lr_kind)c->schedule.kind;
    s->interval = (ts_lr_interval)c->schedule.interval;
    s->step_size = c->schedule.step_size;
    s->gamma = c->schedule.gamma;
    s->eta_min = c->schedule.eta_min;
    s->warmup_start_factor = c->schedule.warmup_start_factor;
    int per_epoch = c->schedule.interval == TS_LR_PER_EPOCH;
    int64_t total = per_epoch ? c->train.epochs : c->train.epochs * steps_per_epoch;
    s->warmup = per_epoch ? c->schedule.warmup_epochs
                          : (c->schedule.warmup_steps ? c->schedule.warmup_steps
                                                      : (int64_t)c->schedule.warmup_epochs * steps_per_epoch);
    s->t_max = c->schedule.t_max ? c->schedule.t_max : total - s->warmup;
    if (s->kind != TS_LR_COSINE) s->t_max = ts_sched_default_config().t_max;
    return ts_sched_config_check(s);
}

ts_status ts_train_config_loss(const ts_train_config *c, ts_ce_params *ce, ts_dice_params *dice,
                               float **class_weights)
{
    *class_weights = NULL;
    if (c->loss.class_weights.n) {
        *class_weights = malloc((size_t)c->loss.class_weights.n * sizeof **class_weights);
        if (!*class_weights) return ts_error(TS_ERR_NOMEM, "config: out of memory");
        for (int i = 0; i < c->loss.class_weights.n; i++) (*class_weights)[i] = (float)c->loss.class_weights.v[i];
    }
    memset(ce, 0, sizeof *ce);
    memset(dice, 0, sizeof *dice);
    ce->ignore_index = c->ignore_id;
    ce->class_weights = *class_weights;
    dice->mode = (ts_dice_mode)c->loss.dice;
    dice->ignore_index = c->ignore_id;
    dice->smooth = (float)c->loss.dice_smooth;
    dice->eps = (float)c->loss.dice_eps;
    dice->log_loss = c->loss.dice_log;
    dice->class_weights = c->loss.dice == TS_DICE_SMP ? *class_weights : NULL;
    return TS_OK;
}

ts_status ts_train_config_loss_config(const ts_train_config *c, ts_loss_config *l, float **class_weights)
{
    *l = ts_loss_default_config();
    l->dice_weight = c->loss.dice_weight;
    return ts_train_config_loss(c, &l->ce, &l->dice, class_weights);
}

ts_status ts_train_config_card(const ts_train_config *c, ts_model_card *card)
{
    ts_card_init(card);
    card->classes = calloc((size_t)c->classes.n, sizeof *card->classes);
    if (!card->classes) return ts_error(TS_ERR_NOMEM, "config: out of memory");
    for (int i = 0; i < c->classes.n; i++) {
        card->classes[i].id = c->classes.v[i].id;
        card->classes[i].name = strdup(c->classes.v[i].name);
        card->n_classes = i + 1;
        if (!card->classes[i].name) {
            ts_card_free(card);
            return ts_error(TS_ERR_NOMEM, "config: out of memory");
        }
    }
    card->tile_size = c->windows.tile;
    card->ignore_index = c->ignore_id;
    return TS_OK;
}
