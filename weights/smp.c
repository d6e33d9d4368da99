/* SMP naming and files: see smp.h. */
#include "weights/smp.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/outfile.h"
#include "weights/pth.h"
#include "weights/safetensors.h"

/* ---- dictionary <-> table ------------------------------------------------ */

static const ts_named_tensor *find_key(const ts_dict *d, const char *name, size_t *index)
{
    char prefixed[128];
    snprintf(prefixed, sizeof prefixed, "module.%s", name);
    for (size_t i = 0; i < d->count; i++) {
        if (strcmp(d->items[i].name, name) == 0 || strcmp(d->items[i].name, prefixed) == 0) {
            *index = i;
            return &d->items[i];
        }
    }
    return NULL;
}

static void shape_str(int ndim, const int64_t *shape, char *buf, size_t size)
{
    size_t len = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && len < size; i++)
        len += (size_t)snprintf(buf + len, size - len, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (len < size) snprintf(buf + len, size - len, "]");
}

static int same_shape(const ts_param *p, const ts_named_tensor *t)
{
    if (p->kind == TS_PARAM_COUNTER) return ts_named_numel(t) == 1; /* [] or [1] */
    if (t->ndim != p->ndim) return 0;
    for (int i = 0; i < p->ndim; i++)
        if (t->shape[i] != p->shape[i]) return 0;
    return 1;
}

/* Appends name to a ", "-separated list, keeping the first few only. */
static void list_add(char *list, size_t size, int *count, const char *name)
{
    if (*count < 8) {
        size_t len = strlen(list);
        snprintf(list + len, size - len, "%s%s", *count ? ", " : "", name);
    } else if (*count == 8) {
        size_t len = strlen(list);
        snprintf(list + len, size - len, ", ...");
    }
    (*count)++;
}

ts_status ts_unet_load_dict(ts_unet *m, const ts_dict *d, const ts_load_opts *o, const char *source)
{
    int allow_new_head = o ? o->allow_new_head : 0;
    unsigned char *matched = calloc(d->count ? d->count : 1, 1);
    if (!matched) return ts_error(TS_ERR_NOMEM, "%s: out of memory", source);
    char missing[1024] = "", unexpected[1024] = "";
    int n_missing = 0, n_unexpected = 0;
    ts_status st = TS_OK;

    for (int k = 0; k < m->n_params && st == TS_OK; k++) {
        const ts_param *p = &m->params[k];
        size_t idx = 0;
        const ts_named_tensor *t = find_key(d, p->name, &idx);
        if (!t) {
            /* PyTorch's BatchNorm fills a missing num_batches_tracked with 0. */
            if (p->kind == TS_PARAM_COUNTER)
                m->counters[p->offset] = 0;
            else
                list_add(missing, sizeof missing, &n_missing, p->name);
            continue;
        }
        matched[idx] = 1;
        if (!same_shape(p, t)) {
            if (allow_new_head && strncmp(p->name, "segmentation_head.", 18) == 0) continue;
            char want[96], got[96];
            int64_t pshape[4];
            for (int i = 0; i < p->ndim; i++) pshape[i] = p->shape[i];
            shape_str(p->ndim, pshape, want, sizeof want);
            shape_str(t->ndim, t->shape, got, sizeof got);
            st = ts_error(TS_ERR_INVALID_ARG,
                          "%s: key \"%s\" has shape %s, the model needs %s%s", source, t->name, got, want,
                          strncmp(p->name, "segmentation_head.", 18) == 0
                              ? " (a head for another number of classes: allow a new head to fine-tune)"
                              : "");
            break;
        }
        if (p->kind == TS_PARAM_COUNTER) {
            int64_t v;
            if (t->dtype == TS_I64)
                memcpy(&v, t->data, 8);
            else if (t->dtype == TS_I32) {
                int32_t v32;
                memcpy(&v32, t->data, 4);
                v = v32;
            } else {
                st = ts_error(TS_ERR_INVALID_ARG, "%s: key \"%s\" must be an integer (int64), found %s", source,
                              t->name, ts_dtype_safetensors_name(t->dtype));
                break;
            }
            m->counters[p->offset] = v;
        } else {
            if (t->dtype == TS_I64 || t->dtype == TS_I32 || t->dtype == TS_U8) {
                st = ts_error(TS_ERR_INVALID_ARG, "%s: key \"%s\" must be floating point, found %s", source, t->name,
                              ts_dtype_safetensors_name(t->dtype));
                break;
            }
            st = ts_named_to_f32(t, ts_unet_param_f32(m, p));
            if (st != TS_OK) st = ts_error(st, "%s: %s", source, ts_last_error());
        }
    }
    if (st == TS_OK) {
        for (size_t i = 0; i < d->count; i++)
            if (!matched[i]) list_add(unexpected, sizeof unexpected, &n_unexpected, d->items[i].name);
        if (n_missing && n_unexpected)
            st = ts_error(TS_ERR_INVALID_ARG, "%s: %d key(s) missing (%s) and %d unexpected (%s); is it a %s model?",
                          source, n_missing, missing, n_unexpected, unexpected, "Unet resnet34");
        else if (n_missing)
            st = ts_error(TS_ERR_INVALID_ARG, "%s: %d key(s) missing: %s", source, n_missing, missing);
        else if (n_unexpected)
            st = ts_error(TS_ERR_INVALID_ARG, "%s: %d unexpected key(s): %s", source, n_unexpected, unexpected);
    }
    free(matched);
    return st;
}

ts_status ts_unet_to_dict(const ts_unet *m, ts_dict *d)
{
    ts_status st = TS_OK;
    for (int k = 0; k < m->n_params && st == TS_OK; k++) {
        const ts_param *p = &m->params[k];
        int64_t shape[4];
        for (int i = 0; i < p->ndim; i++) shape[i] = p->shape[i];
        if (p->kind == TS_PARAM_COUNTER)
            st = ts_dict_add(d, p->name, TS_I64, 0, shape, &m->counters[p->offset]);
        else
            st = ts_dict_add(d, p->name, TS_F32, p->ndim, shape, ts_unet_param_f32(m, p));
    }
    if (st == TS_OK) st = ts_unet_set_model_card(m, d);
    return st;
}

/* ---- architecture from shapes ---------------------------------------------- */

ts_status ts_unet_config_from_dict(const ts_dict *d, ts_unet_config *cfg, const char *source)
{
    size_t idx;
    const ts_named_tensor *conv1 = find_key(d, "encoder.conv1.weight", &idx);
    const ts_named_tensor *head = find_key(d, "segmentation_head.0.weight", &idx);
    if (!conv1 || !head)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: not an SMP Unet state_dict (no \"%s\"); terraseg reads smp.Unet(\"resnet34\") weights",
                        source, conv1 ? "segmentation_head.0.weight" : "encoder.conv1.weight");
    if (conv1->ndim != 4 || conv1->shape[0] != 64 || conv1->shape[2] != 7 || conv1->shape[3] != 7 || head->ndim != 4)
        return ts_error(TS_ERR_INVALID_ARG, "%s: encoder.conv1.weight or the head has an unexpected shape", source);
    *cfg = ts_unet_default_config((int)conv1->shape[1], (int)head->shape[0]);
    int depth = 0;
    for (int i = 0; i < TS_UNET_MAX_DEPTH; i++) {
        char name[64];
        snprintf(name, sizeof name, "decoder.blocks.%d.conv1.0.weight", i);
        const ts_named_tensor *w = find_key(d, name, &idx);
        if (!w) break;
        if (w->ndim != 4) return ts_error(TS_ERR_INVALID_ARG, "%s: %s is not a 4-D conv weight", source, name);
        cfg->decoder_channels[i] = (int)w->shape[0];
        depth++;
    }
    cfg->encoder_depth = depth;
    for (int i = depth; i < TS_UNET_MAX_DEPTH; i++) cfg->decoder_channels[i] = 0;
    cfg->decoder_use_batchnorm = find_key(d, "decoder.blocks.0.conv1.1.weight", &idx) != NULL;
    ts_status st = ts_unet_config_check(cfg);
    if (st != TS_OK) return ts_error(st, "%s: %s", source, ts_last_error());
    return TS_OK;
}

/* ---- config.json ----------------------------------------------------------- */

static ts_status json_int(const cJSON *v, const char *key, const char *source, int lo, int hi, int *out)
{
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < lo || v->valuedouble > hi)
        return ts_error(TS_ERR_INVALID_ARG, "%s: \"%s\" must be a whole number in [%d, %d]", source, key, lo, hi);
    *out = (int)v->valuedouble;
    return TS_OK;
}

ts_status ts_smp_config_parse(const char *json, const char *source, ts_unet_config *cfg)
{
    cJSON *root = cJSON_Parse(json);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return ts_error(TS_ERR_INVALID_ARG, "%s: not a JSON object (an SMP config.json is expected)", source);
    }
    *cfg = ts_unet_default_config(3, 1);
    ts_status st = TS_OK;
    int have_dec = 0, use_bn_set = 0;
    const cJSON *dec = NULL, *use_norm = NULL;
    for (const cJSON *it = root->child; it && st == TS_OK; it = it->next) {
        const char *k = it->string;
        for (const cJSON *j = root->child; j != it; j = j->next)
            if (strcmp(j->string, k) == 0) st = ts_error(TS_ERR_INVALID_ARG, "%s: key \"%s\" appears twice", source, k);
        if (st != TS_OK) break;
        if (strcmp(k, "_model_class") == 0) {
            if (!cJSON_IsString(it) || strcmp(it->valuestring, "Unet") != 0)
                st = ts_error(TS_ERR_UNSUPPORTED, "%s: _model_class is %s; terraseg builds only \"Unet\"", source,
                              cJSON_IsString(it) ? it->valuestring : "not a string");
        } else if (strcmp(k, "encoder_name") == 0) {
            if (!cJSON_IsString(it) || strcmp(it->valuestring, "resnet34") != 0)
                st = ts_error(TS_ERR_UNSUPPORTED, "%s: encoder_name is %s; terraseg builds only \"resnet34\"", source,
                              cJSON_IsString(it) ? it->valuestring : "not a string");
        } else if (strcmp(k, "in_channels") == 0) {
            st = json_int(it, k, source, 1, 1024, &cfg->in_channels);
        } else if (strcmp(k, "classes") == 0) {
            st = json_int(it, k, source, 1, 1024, &cfg->classes);
        } else if (strcmp(k, "encoder_depth") == 0) {
            st = json_int(it, k, source, 3, 5, &cfg->encoder_depth);
        } else if (strcmp(k, "decoder_channels") == 0) {
            dec = it;
            have_dec = 1;
        } else if (strcmp(k, "decoder_use_batchnorm") == 0) {
            /* SMP <= 0.4, and >= 0.5 when the user passed it: it overrides decoder_use_norm. */
            if (cJSON_IsBool(it)) {
                cfg->decoder_use_batchnorm = cJSON_IsTrue(it);
                use_bn_set = 1;
            } else if (cJSON_IsString(it) && strcmp(it->valuestring, "inplace") == 0) {
                st = ts_error(TS_ERR_UNSUPPORTED,
                              "%s: decoder_use_batchnorm \"inplace\" (InPlaceABN) is not supported; use true", source);
            } else if (!cJSON_IsNull(it)) {
                st = ts_error(TS_ERR_INVALID_ARG, "%s: decoder_use_batchnorm must be true or false", source);
            }
        } else if (strcmp(k, "decoder_use_norm") == 0) {
            use_norm = it;
        } else if (strcmp(k, "decoder_interpolation") == 0) {
            if (!cJSON_IsString(it) || strcmp(it->valuestring, "nearest") != 0)
                st = ts_error(TS_ERR_UNSUPPORTED, "%s: decoder_interpolation %s is not supported; terraseg uses \"nearest\"",
                              source, cJSON_IsString(it) ? it->valuestring : "(not a string)");
        } else if (strcmp(k, "decoder_attention_type") == 0) {
            if (!cJSON_IsNull(it))
                st = ts_error(TS_ERR_UNSUPPORTED, "%s: decoder_attention_type must be null (scse attention is not supported)",
                              source);
        } else if (strcmp(k, "aux_params") == 0) {
            if (!cJSON_IsNull(it))
                st = ts_error(TS_ERR_UNSUPPORTED, "%s: aux_params must be null (no classification head)", source);
        } else if (strcmp(k, "activation") == 0 || strcmp(k, "encoder_weights") == 0) {
            /* activation: terraseg's model always outputs logits and the
             * predictor applies softmax/sigmoid itself; encoder_weights: the
             * weights come from the file. Neither changes the parameters. */
            if (!cJSON_IsNull(it) && !cJSON_IsString(it))
                st = ts_error(TS_ERR_INVALID_ARG, "%s: \"%s\" must be a string or null", source, k);
        } else {
            st = ts_error(TS_ERR_UNSUPPORTED,
                          "%s: unknown config key \"%s\" (terraseg knows SMP 0.3.4 to 0.6 Unet keys); remove it if "
                          "it is left at its default",
                          source, k);
        }
    }
    if (st == TS_OK && use_norm && !use_bn_set) {
        if (cJSON_IsBool(use_norm))
            cfg->decoder_use_batchnorm = cJSON_IsTrue(use_norm);
        else if (cJSON_IsString(use_norm) && strcmp(use_norm->valuestring, "batchnorm") == 0)
            cfg->decoder_use_batchnorm = 1;
        else if (cJSON_IsString(use_norm) && strcmp(use_norm->valuestring, "identity") == 0)
            cfg->decoder_use_batchnorm = 0;
        else if (cJSON_IsObject(use_norm)) {
            const cJSON *type = cJSON_GetObjectItemCaseSensitive(use_norm, "type");
            if (cJSON_GetArraySize(use_norm) == 1 && cJSON_IsString(type) && strcmp(type->valuestring, "batchnorm") == 0)
                cfg->decoder_use_batchnorm = 1;
            else
                st = ts_error(TS_ERR_UNSUPPORTED, "%s: decoder_use_norm: only {\"type\": \"batchnorm\"} is supported",
                              source);
        } else
            st = ts_error(TS_ERR_UNSUPPORTED,
                          "%s: decoder_use_norm %s is not supported; terraseg builds \"batchnorm\" or false", source,
                          cJSON_IsString(use_norm) ? use_norm->valuestring : "(this value)");
    }
    if (st == TS_OK && have_dec) {
        int n = cJSON_GetArraySize(dec);
        if (!cJSON_IsArray(dec) || n != cfg->encoder_depth)
            st = ts_error(TS_ERR_INVALID_ARG, "%s: decoder_channels must be a list of encoder_depth (%d) numbers", source,
                          cfg->encoder_depth);
        for (int i = 0; st == TS_OK && i < n; i++)
            st = json_int(cJSON_GetArrayItem(dec, i), "decoder_channels", source, 1, 4096, &cfg->decoder_channels[i]);
        for (int i = n; st == TS_OK && i < TS_UNET_MAX_DEPTH; i++) cfg->decoder_channels[i] = 0;
    } else if (st == TS_OK && cfg->encoder_depth != 5) {
        st = ts_error(TS_ERR_INVALID_ARG, "%s: encoder_depth %d needs decoder_channels with %d entries", source,
                      cfg->encoder_depth, cfg->encoder_depth);
    }
    cJSON_Delete(root);
    if (st == TS_OK) {
        st = ts_unet_config_check(cfg);
        if (st != TS_OK) st = ts_error(st, "%s: %s", source, ts_last_error());
    }
    return st;
}

ts_status ts_smp_config_format(const ts_unet_config *cfg, char **json)
{
    /* Exactly json.dumps(config, sort_keys=True, indent=2) of SMP 0.6. */
    char buf[2048];
    size_t len = 0;
    len += (size_t)snprintf(buf + len, sizeof buf - len,
                            "{\n  \"_model_class\": \"Unet\",\n  \"activation\": null,\n  \"aux_params\": null,\n"
                            "  \"classes\": %d,\n  \"decoder_attention_type\": null,\n  \"decoder_channels\": [\n",
                            cfg->classes);
    for (int i = 0; i < cfg->encoder_depth; i++)
        len += (size_t)snprintf(buf + len, sizeof buf - len, "    %d%s\n", cfg->decoder_channels[i],
                                i + 1 < cfg->encoder_depth ? "," : "");
    len += (size_t)snprintf(buf + len, sizeof buf - len,
                            "  ],\n  \"decoder_interpolation\": \"nearest\",\n  \"decoder_use_norm\": %s,\n"
                            "  \"encoder_depth\": %d,\n  \"encoder_name\": \"resnet34\",\n  \"encoder_weights\": null,\n"
                            "  \"in_channels\": %d\n}",
                            cfg->decoder_use_batchnorm ? "\"batchnorm\"" : "false", cfg->encoder_depth,
                            cfg->in_channels);
    *json = strdup(buf);
    return *json ? TS_OK : ts_error(TS_ERR_NOMEM, "config.json: out of memory");
}

ts_status ts_unet_set_model_card(const ts_unet *m, ts_dict *d)
{
    char *json = NULL;
    ts_status st = ts_smp_config_format(&m->cfg, &json);
    if (st == TS_OK) st = ts_dict_set_meta(d, "format", "pt");
    if (st == TS_OK) st = ts_dict_set_meta(d, "terraseg.architecture", "Unet/resnet34");
    if (st == TS_OK) st = ts_dict_set_meta(d, "terraseg.config", json);
    if (st == TS_OK && m->card) st = ts_dict_set_meta(d, "terraseg.card", m->card);
    free(json);
    return st;
}

ts_status ts_unet_set_card(ts_unet *m, const ts_model_card *c)
{
    if (c->n_bands && c->n_bands != m->cfg.in_channels)
        return ts_error(TS_ERR_INVALID_ARG, "model card lists %d bands but the model takes %d input channels",
                        c->n_bands, m->cfg.in_channels);
    if (c->n_classes && c->n_classes != m->cfg.classes && !(m->cfg.classes == 1 && c->n_classes == 2))
        return ts_error(TS_ERR_INVALID_ARG, "model card names %d classes but the model has %d outputs", c->n_classes,
                        m->cfg.classes);
    free(m->card);
    m->card = NULL;
    if (!c->n_classes && !c->n_bands && !c->tile_size && c->ignore_index < 0) return TS_OK;
    return ts_card_format(c, &m->card);
}

ts_status ts_unet_get_card(const ts_unet *m, ts_model_card *out)
{
    if (!m->card) {
        ts_card_init(out);
        return TS_OK;
    }
    return ts_card_parse(m->card, "model", out);
}

/* Parses a card found in a file and attaches it to m. */
static ts_status attach_card(ts_unet *m, const char *json, const char *source)
{
    ts_model_card c;
    ts_status st = ts_card_parse(json, source, &c);
    if (st != TS_OK) return st;
    st = ts_unet_set_card(m, &c);
    if (st != TS_OK) st = ts_error(st, "%s: %s", source, ts_last_error());
    ts_card_free(&c);
    return st;
}

/* ---- ImageNet encoder ------------------------------------------------------- */

ts_status ts_unet_load_imagenet_encoder(ts_unet *m, const ts_dict *d, const char *source)
{
    ts_dict enc;
    ts_dict_init(&enc);
    ts_status st = TS_OK;
    int N = m->cfg.in_channels;
    for (size_t i = 0; i < d->count && st == TS_OK; i++) {
        const ts_named_tensor *t = &d->items[i];
        if (strncmp(t->name, "fc.", 3) == 0) continue; /* SMP pops the classifier */
        char name[160];
        snprintf(name, sizeof name, "encoder.%s", t->name);
        if (strcmp(t->name, "conv1.weight") == 0 && N != 3) {
            /* SMP's patch_first_conv (pretrained branch): N == 1 sums the RGB
             * filters; N >= 2 repeats them cyclically and scales by 3/N, in
             * float32 with the double 3/N rounded to float. */
            if (t->ndim != 4 || t->shape[0] != 64 || t->shape[1] != 3 || t->shape[2] != 7 || t->shape[3] != 7) {
                st = ts_error(TS_ERR_INVALID_ARG, "%s: conv1.weight must be [64, 3, 7, 7] for an ImageNet resnet34",
                              source);
                break;
            }
            float *w = malloc(64 * 3 * 49 * sizeof(float)), *out = malloc((size_t)64 * N * 49 * sizeof(float));
            if (!w || !out) {
                free(w);
                free(out);
                st = ts_error(TS_ERR_NOMEM, "%s: out of memory", source);
                break;
            }
            st = ts_named_to_f32(t, w);
            const float scale = (float)(3.0 / N);
            for (int o = 0; st == TS_OK && o < 64; o++)
                for (int c = 0; c < N; c++)
                    for (int k = 0; k < 49; k++) {
                        const float *src = w + (size_t)o * 3 * 49;
                        float v = N == 1 ? (src[k] + src[49 + k]) + src[98 + k] : src[(size_t)(c % 3) * 49 + k] * scale;
                        out[((size_t)o * N + c) * 49 + k] = v;
                    }
            int64_t shape[4] = {64, N, 7, 7};
            if (st == TS_OK) st = ts_dict_add_owned(&enc, name, TS_F32, 4, shape, out);
            else free(out);
            free(w);
        } else {
            st = ts_dict_add(&enc, name, t->dtype, t->ndim, t->shape, t->data);
        }
    }
    /* Strict on the encoder only: copy the decoder and head from the model
     * itself so the table check covers exactly encoder.* keys. */
    for (int k = 0; k < m->n_params && st == TS_OK; k++) {
        const ts_param *p = &m->params[k];
        if (strncmp(p->name, "encoder.", 8) == 0) continue;
        int64_t shape[4];
        for (int i = 0; i < p->ndim; i++) shape[i] = p->shape[i];
        if (p->kind == TS_PARAM_COUNTER)
            st = ts_dict_add(&enc, p->name, TS_I64, 0, shape, &m->counters[p->offset]);
        else
            st = ts_dict_add(&enc, p->name, TS_F32, p->ndim, shape, ts_unet_param_f32(m, p));
    }
    if (st == TS_OK) st = ts_unet_load_dict(m, &enc, NULL, source);
    ts_dict_free(&enc);
    return st;
}

/* ---- files ------------------------------------------------------------------ */

const char *ts_model_format_name(ts_model_format f)
{
    switch (f) {
    case TS_FORMAT_SAFETENSORS: return "safetensors";
    case TS_FORMAT_PTH: return "torch.save (.pth)";
    case TS_FORMAT_SMP_DIR: return "SMP save_pretrained directory";
    default: return "unknown";
    }
}

static int is_dir(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

ts_status ts_model_detect(const char *path, ts_model_format *f)
{
    *f = TS_FORMAT_UNKNOWN;
    if (is_dir(path)) {
        char cfg[4096];
        snprintf(cfg, sizeof cfg, "%s/config.json", path);
        if (access(cfg, R_OK) != 0)
            return ts_error(TS_ERR_IO, "%s: a directory without config.json (an SMP save_pretrained directory has "
                                       "config.json and model.safetensors)",
                            path);
        *f = TS_FORMAT_SMP_DIR;
        return TS_OK;
    }
    FILE *fp = fopen(path, "rb");
    if (!fp) return ts_error(TS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    unsigned char head[9] = {0};
    size_t n = fread(head, 1, sizeof head, fp);
    fclose(fp);
    if (n >= 4 && memcmp(head, "PK\3\4", 4) == 0)
        *f = TS_FORMAT_PTH;
    else if (n >= 2 && head[0] == 0x80 && head[1] == 0x02)
        *f = TS_FORMAT_PTH; /* legacy torch.save: pth.c explains how to re-save it */
    else if (n == 9 && head[8] == '{')
        *f = TS_FORMAT_SAFETENSORS;
    else
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: not a weight file terraseg reads (expected safetensors, a torch.save .pth/.ckpt, or an SMP "
                        "save_pretrained directory)",
                        path);
    return TS_OK;
}

ts_model_format ts_model_format_for_output(const char *path)
{
    const char *dot = strrchr(path, '.');
    const char *slash = strrchr(path, '/');
    if (dot && (!slash || dot > slash)) {
        if (strcmp(dot, ".safetensors") == 0) return TS_FORMAT_SAFETENSORS;
        if (strcmp(dot, ".pth") == 0 || strcmp(dot, ".pt") == 0 || strcmp(dot, ".ckpt") == 0) return TS_FORMAT_PTH;
    }
    return TS_FORMAT_SMP_DIR;
}

static ts_status read_text(const char *path, char **out)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) return ts_error(TS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            cap = cap ? 2 * cap : 8192;
            if (cap > (1 << 20)) { /* a config.json is a few hundred bytes */
                free(buf);
                fclose(fp);
                return ts_error(TS_ERR_INVALID_ARG, "%s: larger than 1 MiB, not a config.json", path);
            }
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(fp);
                return ts_error(TS_ERR_NOMEM, "%s: out of memory", path);
            }
            buf = nb;
        }
        size_t n = fread(buf + len, 1, 4096, fp);
        len += n;
        if (n < 4096) break;
    }
    int err = ferror(fp);
    fclose(fp);
    if (err) {
        free(buf);
        return ts_error(TS_ERR_IO, "%s: read error", path);
    }
    buf[len] = '\0';
    *out = buf;
    return TS_OK;
}

/* Removes the optimizer.* and scheduler.* entries of a training checkpoint. */
static void drop_training_state(ts_dict *d)
{
    size_t kept = 0;
    for (size_t i = 0; i < d->count; i++) {
        ts_named_tensor *t = &d->items[i];
        if (strncmp(t->name, "optimizer.", 10) == 0 || strncmp(t->name, "scheduler.", 10) == 0) {
            free(t->name);
            free(t->data);
        } else {
            d->items[kept++] = *t;
        }
    }
    d->count = kept;
}

ts_status ts_model_load(const char *path, ts_unet *m, const ts_load_opts *o)
{
    memset(m, 0, sizeof *m);
    ts_model_format f;
    ts_status st = ts_model_detect(path, &f);
    if (st != TS_OK) return st;
    ts_dict d;
    ts_dict_init(&d);
    ts_unet_config cfg;
    char file[4096];
    if (f == TS_FORMAT_SMP_DIR) {
        char *json = NULL;
        snprintf(file, sizeof file, "%s/config.json", path);
        st = read_text(file, &json);
        if (st == TS_OK) st = ts_smp_config_parse(json, file, &cfg);
        free(json);
        snprintf(file, sizeof file, "%s/model.safetensors", path);
        if (st == TS_OK) st = ts_safetensors_read(file, &d);
    } else {
        snprintf(file, sizeof file, "%s", path);
        st = f == TS_FORMAT_PTH ? ts_pth_read(path, &d) : ts_safetensors_read(path, &d);
        const char *card = st == TS_OK ? ts_dict_get_meta(&d, "terraseg.config") : NULL;
        if (st == TS_OK && card)
            st = ts_smp_config_parse(card, file, &cfg);
        else if (st == TS_OK)
            st = ts_unet_config_from_dict(&d, &cfg, file);
    }
    /* A training checkpoint (train/trainer.c) is a model file plus the
     * optimizer and scheduler state: read as a model, those are dropped. */
    if (st == TS_OK && ts_dict_get_meta(&d, "terraseg.checkpoint")) drop_training_state(&d);
    if (st == TS_OK) st = ts_unet_init(m, &cfg);
    if (st == TS_OK) st = ts_unet_load_dict(m, &d, o, file);
    /* The model card: in safetensors metadata, or beside an SMP directory's
     * config.json (SMP ignores files it does not know). */
    const char *card = st == TS_OK ? ts_dict_get_meta(&d, "terraseg.card") : NULL;
    if (card) st = attach_card(m, card, file);
    if (st == TS_OK && f == TS_FORMAT_SMP_DIR) {
        char cardfile[4200];
        snprintf(cardfile, sizeof cardfile, "%s/terraseg_card.json", path);
        if (access(cardfile, F_OK) == 0) {
            char *json = NULL;
            st = read_text(cardfile, &json);
            if (st == TS_OK) st = attach_card(m, json, cardfile);
            free(json);
        }
    }
    if (st != TS_OK) ts_unet_free(m);
    ts_dict_free(&d);
    return st;
}

/* Text files (config.json, the card) through a temporary and a rename. */
static ts_status write_text_atomic(const char *path, const char *text)
{
    return ts_write_file_atomic(path, text, strlen(text));
}

ts_status ts_model_save(const char *path, const ts_unet *m, ts_model_format f)
{
    ts_dict d;
    ts_dict_init(&d);
    ts_status st = ts_unet_to_dict(m, &d);
    if (st == TS_OK) {
        if (f == TS_FORMAT_SAFETENSORS) {
            st = ts_safetensors_write(path, &d);
        } else if (f == TS_FORMAT_PTH) {
            st = ts_pth_write(path, &d);
        } else if (f == TS_FORMAT_SMP_DIR) {
            if (mkdir(path, 0777) != 0 && errno != EEXIST)
                st = ts_error(TS_ERR_IO, "%s: cannot create the directory: %s", path, strerror(errno));
            else if (!is_dir(path))
                st = ts_error(TS_ERR_IO, "%s: exists and is not a directory", path);
            char file[4096], *json = NULL;
            if (st == TS_OK) st = ts_smp_config_format(&m->cfg, &json);
            snprintf(file, sizeof file, "%s/config.json", path);
            if (st == TS_OK) st = write_text_atomic(file, json);
            free(json);
            snprintf(file, sizeof file, "%s/terraseg_card.json", path);
            if (st == TS_OK && m->card) st = write_text_atomic(file, m->card);
            snprintf(file, sizeof file, "%s/model.safetensors", path);
            /* SMP's save_pretrained writes no __metadata__ (config.json is the
             * card there), so the file matches what SMP itself would write. */
            for (size_t i = 0; i < d.meta_count; i++) {
                free(d.meta[i].key);
                free(d.meta[i].value);
            }
            d.meta_count = 0;
            if (st == TS_OK) st = ts_safetensors_write(file, &d);
        } else {
            st = ts_error(TS_ERR_INVALID_ARG, "%s: unknown output format", path);
        }
    }
    ts_dict_free(&d);
    return st;
}
