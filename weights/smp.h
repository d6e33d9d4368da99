/* SMP naming: the model's parameter table <-> named-tensor dictionaries, and
 * SMP's save_pretrained directories (config.json + model.safetensors).
 *
 * The table (nn/unet.h) already uses SMP's state_dict names, so a weight file
 * maps onto the model key by key. Loading is strict: a missing, unexpected or
 * mis-shaped key is an error that names it; only num_batches_tracked may be
 * absent (older files, and PyTorch itself tolerates it). */
#ifndef TS_SMP_H
#define TS_SMP_H

#include "nn/unet.h"
#include "weights/card.h"
#include "weights/dict.h"

typedef struct ts_load_opts {
    /* Fine-tuning to new classes: segmentation_head.* entries whose shape
     * differs from the model's are skipped (left as initialised) instead of
     * being an error. */
    int allow_new_head;
} ts_load_opts;

/* Copies every table entry from d into m. `source` names the file in
 * messages. Keys prefixed "module." (DataParallel) are matched without it. */
ts_status ts_unet_load_dict(ts_unet *m, const ts_dict *d, const ts_load_opts *o, const char *source);
/* The model's state_dict in table order: float32 tensors and int64
 * num_batches_tracked scalars, plus the model card as metadata. */
ts_status ts_unet_to_dict(const ts_unet *m, ts_dict *d);

/* The architecture from a dictionary's shapes alone (a .pth carries no
 * config): in_channels from encoder.conv1.weight, classes from the head,
 * depth and decoder channels from decoder.blocks.*, batchnorm from whether
 * decoder.blocks.0.conv1.1.weight exists. */
ts_status ts_unet_config_from_dict(const ts_dict *d, ts_unet_config *cfg, const char *source);

/* config.json as SMP's save_pretrained writes it (json.dumps, sort_keys,
 * indent 2). Parsing accepts SMP 0.3.4 to 0.6 keys and refuses what terraseg
 * does not build (another encoder or architecture, attention, other norms or
 * interpolation, aux_params), naming the key. */
ts_status ts_smp_config_parse(const char *json, const char *source, ts_unet_config *cfg);
/* Writes SMP 0.6's config.json for cfg into a malloc'ed string. */
ts_status ts_smp_config_format(const ts_unet_config *cfg, char **json);

/* safetensors metadata: the config as SMP JSON under "terraseg.config",
 * the model card (if any) under "terraseg.card", and "format": "pt". */
ts_status ts_unet_set_model_card(const ts_unet *m, ts_dict *d);

/* Validates a model card against the model (as many bands as in_channels,
 * as many classes as classes, or two names for a one-class binary model)
 * and stores it in m->card. A card with no entries clears it. */
ts_status ts_unet_set_card(ts_unet *m, const ts_model_card *c);
/* The model's card (an empty one when it has none); free with ts_card_free. */
ts_status ts_unet_get_card(const ts_unet *m, ts_model_card *out);

/* ImageNet encoder weights from a torchvision or timm resnet34 state_dict
 * (conv1.weight, bn1.*, layer1..4.*; fc.* ignored), into encoder.*, with SMP's
 * first-conv rule for in_channels != 3 (smp-unet.md section 3). */
ts_status ts_unet_load_imagenet_encoder(ts_unet *m, const ts_dict *d, const char *source);

/* ---- files ---- */
typedef enum ts_model_format {
    TS_FORMAT_UNKNOWN = 0,
    TS_FORMAT_SAFETENSORS, /* terraseg's native format */
    TS_FORMAT_PTH,         /* torch.save zip (state_dict, checkpoint, Lightning .ckpt) */
    TS_FORMAT_SMP_DIR,     /* save_pretrained directory */
} ts_model_format;

const char *ts_model_format_name(ts_model_format f);
/* From the file itself (magic bytes, or a directory with config.json). */
ts_status ts_model_detect(const char *path, ts_model_format *f);
/* For an output path: ".safetensors", ".pth"/".pt"/".ckpt", anything else
 * (a directory name) is an SMP directory. */
ts_model_format ts_model_format_for_output(const char *path);

/* Reads any supported file into a new model (architecture from config.json,
 * the safetensors model card, or the tensor shapes). */
ts_status ts_model_load(const char *path, ts_unet *m, const ts_load_opts *o);
/* Writes m in the given format; files go through a temporary and a rename. */
ts_status ts_model_save(const char *path, const ts_unet *m, ts_model_format f);

#endif
