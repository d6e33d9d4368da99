/* Shared label/band options of terraseg windows and terraseg tile (tools/data_args.h). */
#include "tools/data_args.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int label_args_resolve(const char *cmd, const label_args *a, ts_label_opts *o, ts_label_class **cmap,
                       ts_label_color **colors)
{
    *cmap = NULL;
    *colors = NULL;
    ts_label_opts_init(o);
    if (!a->path) {
        const char *given = a->attribute   ? "--attribute"
                            : a->burn      ? "--burn"
                            : a->class_map ? "--class-map"
                            : a->color_map ? "--color-map"
                            : a->layer     ? "the labels' layer option"
                            : a->all_touched ? "--all-touched"
                            : a->binary    ? "--binary"
                            : a->unknown_ignore ? "--unknown-ignore"
                            : a->assume_crs ? "--assume-crs"
                            : a->classes   ? "--classes"
                            : a->band != 1 ? "--label-band"
                            : a->ignore != 255 ? "--ignore"
                            : a->background ? "--background"
                                            : NULL;
        if (given) {
            fprintf(stderr, "%s: %s is a label option, but no --labels were given\n", cmd, given);
            return 2;
        }
        return 0;
    }
    if (a->attribute && a->burn) {
        fprintf(stderr, "%s: give --attribute or --burn, not both\n", cmd);
        return 2;
    }
    if (a->class_map && !a->attribute) {
        fprintf(stderr, "%s: --class-map needs --attribute (the attribute holding the names)\n", cmd);
        return 2;
    }
    o->ignore_id = a->ignore;
    o->background_id = a->background;
    o->classes = a->classes;
    o->binary = a->binary;
    o->band = a->band;
    o->unknown_color_ignore = a->unknown_ignore;
    o->layer = a->layer;
    o->attribute = a->attribute;
    o->all_touched = a->all_touched;
    if (a->assume_crs && strcmp(a->assume_crs, "image") == 0)
        o->assume_image_crs = 1;
    else
        o->assume_crs = a->assume_crs;
    if (a->burn) {
        char *end = NULL;
        errno = 0;
        long long v = strtoll(a->burn, &end, 10);
        if (!*a->burn || *end || errno || v < 0 || v > 2147483647LL) {
            fprintf(stderr, "%s: --burn expects a whole class id >= 0, got \"%s\"\n", cmd, a->burn);
            return 2;
        }
        o->burn = (int32_t)v;
    }
    if (a->class_map && ts_label_parse_class_map(a->class_map, cmap, &o->n_class_map)) {
        fprintf(stderr, "%s: --class-map: %s\n", cmd, ts_last_error());
        return 2;
    }
    o->class_map = *cmap;
    if (a->color_map && ts_label_parse_color_map(a->color_map, colors, &o->n_colors)) {
        fprintf(stderr, "%s: --color-map: %s\n", cmd, ts_last_error());
        free(*cmap);
        *cmap = NULL;
        return 2;
    }
    o->colors = *colors;
    return 0;
}

static const char *or_empty(const char *s) { return s ? s : ""; }

ts_status label_args_key(const label_args *a, ts_cache_key *k)
{
    if (!a->path) return ts_cache_key_addf(k, " labels=none");
    ts_status st = ts_cache_key_add_file(k, a->path);
    if (!st)
        st = ts_cache_key_addf(k,
                               " labels attribute=%s burn=%s class_map=%s color_map=%s layer=%s all_touched=%d "
                               "binary=%d unknown_ignore=%d assume_crs=%s classes=%d ignore=%d background=%d band=%d",
                               or_empty(a->attribute), or_empty(a->burn), or_empty(a->class_map),
                               or_empty(a->color_map), or_empty(a->layer), a->all_touched, a->binary,
                               a->unknown_ignore, or_empty(a->assume_crs), a->classes, a->ignore, a->background,
                               a->band);
    return st;
}

int parse_band_list(const char *cmd, const char *option, const char *text, int **bands, int *n)
{
    *bands = NULL;
    *n = 0;
    if (!text) return 0;
    int cap = 1;
    for (const char *p = text; *p; p++) cap += *p == ',';
    int *b = malloc((size_t)cap * sizeof *b);
    if (!b) {
        fprintf(stderr, "%s: out of memory\n", cmd);
        return 2;
    }
    const char *p = text;
    int k = 0;
    for (;;) {
        char *end = NULL;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 1 || v > 65535 || (*end != ',' && *end != '\0')) {
            fprintf(stderr, "%s: --%s expects band numbers from 1 separated by commas (e.g. 1,2,3), got \"%s\"\n", cmd,
                    option, text);
            free(b);
            return 2;
        }
        b[k++] = (int)v;
        if (*end == '\0') break;
        p = end + 1;
    }
    *bands = b;
    *n = k;
    return 0;
}

int parse_optional_double(const char *cmd, const char *option, const char *text, int *has, double *v)
{
    *has = 0;
    if (!text) return 0;
    char *end = NULL;
    errno = 0;
    double d = strtod(text, &end);
    if (end == text || *end || errno || isinf(d)) {
        fprintf(stderr, "%s: --%s expects a number, got \"%s\"\n", cmd, option, text);
        return 2;
    }
    *has = 1;
    *v = d;
    return 0;
}
