#include "card.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ts_card_init(ts_model_card *c)
{
    memset(c, 0, sizeof *c);
    c->ignore_index = -1;
}

void ts_card_free(ts_model_card *c)
{
    for (int i = 0; i < c->n_classes; i++) free(c->classes[i].name);
    for (int i = 0; i < c->n_bands; i++) free(c->bands[i].name);
    free(c->classes);
    free(c->bands);
    ts_card_init(c);
}

static int is_int(const cJSON *v, double lo, double hi)
{
    return cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble) && v->valuedouble >= lo && v->valuedouble <= hi;
}

/* Rejects keys of obj not in allowed[] (NULL-terminated), and duplicates. */
static ts_status check_keys(const cJSON *obj, const char *const *allowed, const char *where, const char *source)
{
    for (const cJSON *it = obj->child; it; it = it->next) {
        int ok = 0;
        for (int i = 0; allowed[i]; i++) ok |= strcmp(it->string, allowed[i]) == 0;
        if (!ok) return ts_error(TS_ERR_INVALID_ARG, "%s: model card %s: unknown key \"%s\"", source, where, it->string);
        for (const cJSON *j = obj->child; j != it; j = j->next)
            if (strcmp(j->string, it->string) == 0)
                return ts_error(TS_ERR_INVALID_ARG, "%s: model card %s: key \"%s\" appears twice", source, where,
                                it->string);
    }
    return TS_OK;
}

static ts_status parse_classes(const cJSON *arr, const char *source, ts_model_card *c)
{
    static const char *const keys[] = {"id", "name", "color", NULL};
    if (!cJSON_IsArray(arr)) return ts_error(TS_ERR_INVALID_ARG, "%s: model card \"classes\" must be a list", source);
    int n = cJSON_GetArraySize(arr);
    if (n > 4096) return ts_error(TS_ERR_INVALID_ARG, "%s: model card lists %d classes (at most 4096)", source, n);
    c->classes = calloc(n ? (size_t)n : 1, sizeof *c->classes);
    if (!c->classes) return ts_error(TS_ERR_NOMEM, "%s: out of memory", source);
    for (int i = 0; i < n; i++) {
        const cJSON *e = cJSON_GetArrayItem(arr, i);
        if (!cJSON_IsObject(e)) return ts_error(TS_ERR_INVALID_ARG, "%s: model card classes[%d] must be an object", source, i);
        ts_status st = check_keys(e, keys, "class", source);
        if (st != TS_OK) return st;
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id"), *name = cJSON_GetObjectItemCaseSensitive(e, "name");
        if (!is_int(id, 0, 65535) || !cJSON_IsString(name) || !*name->valuestring)
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: model card classes[%d] needs an integer \"id\" in [0, 65535] and a non-empty \"name\"",
                            source, i);
        for (int j = 0; j < c->n_classes; j++)
            if (c->classes[j].id == (int)id->valuedouble || strcmp(c->classes[j].name, name->valuestring) == 0)
                return ts_error(TS_ERR_INVALID_ARG, "%s: model card class %d (\"%s\") repeats an id or a name", source,
                                (int)id->valuedouble, name->valuestring);
        const cJSON *col = cJSON_GetObjectItemCaseSensitive(e, "color");
        if (col) {
            unsigned r, g, b;
            char tail;
            if (!cJSON_IsString(col) || strlen(col->valuestring) != 7 ||
                sscanf(col->valuestring, "#%2x%2x%2x%c", &r, &g, &b, &tail) != 3)
                return ts_error(TS_ERR_INVALID_ARG, "%s: model card classes[%d] \"color\" must be \"#rrggbb\"",
                                source, i);
            c->classes[i].has_color = 1;
            c->classes[i].rgb[0] = (unsigned char)r;
            c->classes[i].rgb[1] = (unsigned char)g;
            c->classes[i].rgb[2] = (unsigned char)b;
        }
        c->classes[i].id = (int)id->valuedouble;
        if (!(c->classes[i].name = strdup(name->valuestring))) return ts_error(TS_ERR_NOMEM, "%s: out of memory", source);
        c->n_classes = i + 1;
    }
    return TS_OK;
}

static ts_status parse_bands(const cJSON *arr, const char *source, ts_model_card *c)
{
    static const char *const keys[] = {"index", "name", "offset", "scale", "clip", NULL};
    if (!cJSON_IsArray(arr)) return ts_error(TS_ERR_INVALID_ARG, "%s: model card \"bands\" must be a list", source);
    int n = cJSON_GetArraySize(arr);
    if (n > 1024) return ts_error(TS_ERR_INVALID_ARG, "%s: model card lists %d bands (at most 1024)", source, n);
    c->bands = calloc(n ? (size_t)n : 1, sizeof *c->bands);
    if (!c->bands) return ts_error(TS_ERR_NOMEM, "%s: out of memory", source);
    for (int i = 0; i < n; i++) {
        const cJSON *e = cJSON_GetArrayItem(arr, i);
        if (!cJSON_IsObject(e)) return ts_error(TS_ERR_INVALID_ARG, "%s: model card bands[%d] must be an object", source, i);
        ts_status st = check_keys(e, keys, "band", source);
        if (st != TS_OK) return st;
        ts_card_band *b = &c->bands[i];
        b->scale = 1.0;
        c->n_bands = i + 1;
        const cJSON *v;
        if ((v = cJSON_GetObjectItemCaseSensitive(e, "index"))) {
            if (!is_int(v, 1, 1 << 20))
                return ts_error(TS_ERR_INVALID_ARG, "%s: model card bands[%d].index must be a 1-based band number",
                                source, i);
            b->index = (int)v->valuedouble;
        }
        if ((v = cJSON_GetObjectItemCaseSensitive(e, "name"))) {
            if (!cJSON_IsString(v)) return ts_error(TS_ERR_INVALID_ARG, "%s: model card bands[%d].name must be a string", source, i);
            if (!(b->name = strdup(v->valuestring))) return ts_error(TS_ERR_NOMEM, "%s: out of memory", source);
        }
        if ((v = cJSON_GetObjectItemCaseSensitive(e, "offset"))) {
            if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
                return ts_error(TS_ERR_INVALID_ARG, "%s: model card bands[%d].offset must be a number", source, i);
            b->offset = v->valuedouble;
        }
        if ((v = cJSON_GetObjectItemCaseSensitive(e, "scale"))) {
            if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble == 0)
                return ts_error(TS_ERR_INVALID_ARG, "%s: model card bands[%d].scale must be a non-zero number", source, i);
            b->scale = v->valuedouble;
        }
        if ((v = cJSON_GetObjectItemCaseSensitive(e, "clip"))) {
            const cJSON *lo = cJSON_GetArrayItem(v, 0), *hi = cJSON_GetArrayItem(v, 1);
            if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != 2 || !cJSON_IsNumber(lo) || !cJSON_IsNumber(hi) ||
                !(lo->valuedouble < hi->valuedouble))
                return ts_error(TS_ERR_INVALID_ARG, "%s: model card bands[%d].clip must be [low, high] with low < high",
                                source, i);
            b->has_clip = 1;
            b->clip_lo = lo->valuedouble;
            b->clip_hi = hi->valuedouble;
        }
    }
    return TS_OK;
}

ts_status ts_card_parse(const char *json, const char *source, ts_model_card *out)
{
    static const char *const keys[] = {"classes", "bands", "tile_size", "ignore_index", NULL};
    ts_card_init(out);
    cJSON *root = cJSON_Parse(json);
    ts_status st = TS_OK;
    if (!root || !cJSON_IsObject(root))
        st = ts_error(TS_ERR_INVALID_ARG, "%s: the model card is not a JSON object", source);
    if (st == TS_OK) st = check_keys(root, keys, "top level", source);
    const cJSON *v;
    if (st == TS_OK && (v = cJSON_GetObjectItemCaseSensitive(root, "classes"))) st = parse_classes(v, source, out);
    if (st == TS_OK && (v = cJSON_GetObjectItemCaseSensitive(root, "bands"))) st = parse_bands(v, source, out);
    if (st == TS_OK && (v = cJSON_GetObjectItemCaseSensitive(root, "tile_size"))) {
        if (!is_int(v, 1, 1 << 20))
            st = ts_error(TS_ERR_INVALID_ARG, "%s: model card tile_size must be a positive whole number", source);
        else
            out->tile_size = (int)v->valuedouble;
    }
    if (st == TS_OK && (v = cJSON_GetObjectItemCaseSensitive(root, "ignore_index"))) {
        if (!is_int(v, 0, 65535))
            st = ts_error(TS_ERR_INVALID_ARG, "%s: model card ignore_index must be a whole number in [0, 65535]", source);
        else
            out->ignore_index = (int)v->valuedouble;
    }
    cJSON_Delete(root);
    if (st != TS_OK) ts_card_free(out);
    return st;
}

ts_status ts_card_format(const ts_model_card *c, char **json)
{
    *json = NULL;
    cJSON *root = cJSON_CreateObject();
    int ok = root != NULL;
    if (ok && c->n_classes) {
        cJSON *arr = cJSON_AddArrayToObject(root, "classes");
        for (int i = 0; ok && arr && i < c->n_classes; i++) {
            cJSON *e = cJSON_CreateObject();
            ok = e && cJSON_AddNumberToObject(e, "id", c->classes[i].id) &&
                 cJSON_AddStringToObject(e, "name", c->classes[i].name);
            if (ok && c->classes[i].has_color) {
                char hex[8];
                snprintf(hex, sizeof hex, "#%02x%02x%02x", c->classes[i].rgb[0], c->classes[i].rgb[1],
                         c->classes[i].rgb[2]);
                ok = cJSON_AddStringToObject(e, "color", hex) != NULL;
            }
            ok = ok && cJSON_AddItemToArray(arr, e);
        }
        ok = ok && arr;
    }
    if (ok && c->n_bands) {
        cJSON *arr = cJSON_AddArrayToObject(root, "bands");
        for (int i = 0; ok && arr && i < c->n_bands; i++) {
            const ts_card_band *b = &c->bands[i];
            cJSON *e = cJSON_CreateObject();
            ok = e != NULL;
            if (ok && b->index) ok = cJSON_AddNumberToObject(e, "index", b->index) != NULL;
            if (ok && b->name) ok = cJSON_AddStringToObject(e, "name", b->name) != NULL;
            if (ok) ok = cJSON_AddNumberToObject(e, "offset", b->offset + 0.0 /* -0 -> 0 */) && cJSON_AddNumberToObject(e, "scale", b->scale);
            if (ok && b->has_clip) {
                double lohi[2] = {b->clip_lo, b->clip_hi};
                cJSON *clip = cJSON_CreateDoubleArray(lohi, 2);
                ok = clip && cJSON_AddItemToObject(e, "clip", clip);
            }
            ok = ok && cJSON_AddItemToArray(arr, e);
        }
        ok = ok && arr;
    }
    if (ok && c->tile_size) ok = cJSON_AddNumberToObject(root, "tile_size", c->tile_size) != NULL;
    if (ok && c->ignore_index >= 0) ok = cJSON_AddNumberToObject(root, "ignore_index", c->ignore_index) != NULL;
    if (ok) *json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return *json ? TS_OK : ts_error(TS_ERR_NOMEM, "model card: out of memory");
}
