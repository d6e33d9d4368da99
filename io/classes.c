#include "io/classes.h"

#include <cpl_error.h>
#include <cpl_string.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/io.h"

void ts_class_table_free(ts_class_table *t)
{
    if (t->names)
        for (int i = 0; i < t->n; i++) free(t->names[i]);
    free(t->names);
    free(t->rgb);
    memset(t, 0, sizeof *t);
}

void ts_default_class_color(int id, uint8_t rgb[3])
{
    /* Background first, then matplotlib's tab20 (dark/light pairs reordered
     * so neighbouring ids differ strongly). */
    static const uint8_t pal[21][3] = {
        {64, 64, 64},    {31, 119, 180}, {255, 127, 14}, {44, 160, 44},   {214, 39, 40},   {148, 103, 189},
        {140, 86, 75},   {227, 119, 194}, {188, 189, 34}, {23, 190, 207},  {174, 199, 232}, {255, 187, 120},
        {152, 223, 138}, {255, 152, 150}, {197, 176, 213}, {196, 156, 148}, {247, 182, 210}, {219, 219, 141},
        {158, 218, 229}, {127, 127, 127}, {199, 199, 199},
    };
    if (id >= 0 && id < 21) {
        memcpy(rgb, pal[id], 3);
        return;
    }
    /* splitmix64 of the id: stable across runs and machines. */
    uint64_t z = (uint64_t)id * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    for (int c = 0; c < 3; c++) rgb[c] = (uint8_t)(48 + (z >> (8 * c)) % 192);
}

static ts_status alloc_table(ts_class_table *t, int n)
{
    memset(t, 0, sizeof *t);
    t->names = calloc((size_t)(n > 0 ? n : 1), sizeof *t->names);
    t->rgb = calloc((size_t)(n > 0 ? n : 1), sizeof *t->rgb);
    if (!t->names || !t->rgb) {
        ts_class_table_free(t);
        return ts_error(TS_ERR_NOMEM, "class table: out of memory");
    }
    t->n = n;
    return TS_OK;
}

static ts_status set_name(ts_class_table *t, int i, const char *name)
{
    char buf[32];
    if (!name || !*name) {
        snprintf(buf, sizeof buf, "class %d", i);
        name = buf;
    }
    free(t->names[i]);
    if (!(t->names[i] = strdup(name))) return ts_error(TS_ERR_NOMEM, "class table: out of memory");
    return TS_OK;
}

ts_status ts_class_table_from_card(const ts_model_card *c, int k, ts_class_table *t)
{
    if (k < 1) return ts_error(TS_ERR_INVALID_ARG, "class table: %d classes", k);
    ts_status st = alloc_table(t, k);
    for (int i = 0; !st && i < k; i++) {
        const ts_card_class *cc = NULL;
        for (int j = 0; c && j < c->n_classes; j++)
            if (c->classes[j].id == i) cc = &c->classes[j];
        st = set_name(t, i, cc ? cc->name : NULL);
        if (cc && cc->has_color)
            memcpy(t->rgb[i], cc->rgb, 3);
        else
            ts_default_class_color(i, t->rgb[i]);
    }
    if (st) ts_class_table_free(t);
    return st;
}

ts_status ts_class_table_write_band(GDALRasterBandH b, const ts_class_table *t)
{
    if (t->n > 255)
        return ts_error(TS_ERR_INVALID_ARG, "class table: %d classes do not fit a Byte class map (at most 255)", t->n);
    GDALColorTableH ct = GDALCreateColorTable(GPI_RGB);
    if (!ct) return ts_gdal_error(TS_ERR_NOMEM, "class table: cannot create a colour table");
    for (int i = 0; i < 256; i++) {
        GDALColorEntry e = {0, 0, 0, 0};
        if (i < t->n) e = (GDALColorEntry){t->rgb[i][0], t->rgb[i][1], t->rgb[i][2], 255};
        GDALSetColorEntry(ct, i, &e);
    }
    CPLErrorReset();
    CPLErr err = GDALSetRasterColorTable(b, ct);
    GDALDestroyColorTable(ct);
    if (err != CE_None) return ts_gdal_error(TS_ERR_IO, "class table: cannot set the colour table");
    char **names = NULL;
    for (int i = 0; i < t->n; i++) names = CSLAddString(names, t->names[i]);
    err = GDALSetRasterCategoryNames(b, names);
    CSLDestroy(names);
    if (err != CE_None) return ts_gdal_error(TS_ERR_IO, "class table: cannot set the class names");
    if (GDALSetRasterColorInterpretation(b, GCI_PaletteIndex) != CE_None)
        return ts_gdal_error(TS_ERR_IO, "class table: cannot set the colour interpretation");
    return TS_OK;
}

ts_status ts_class_table_read_band(GDALRasterBandH b, int max_id, ts_class_table *t)
{
    if (max_id < 0) max_id = 0;
    ts_status st = alloc_table(t, max_id + 1);
    if (st) return st;
    char **names = GDALGetRasterCategoryNames(b);
    int nn = CSLCount(names);
    GDALColorTableH ct = GDALGetRasterColorTable(b);
    int nc = ct ? GDALGetColorEntryCount(ct) : 0;
    for (int i = 0; !st && i <= max_id; i++) {
        st = set_name(t, i, i < nn ? names[i] : NULL);
        const GDALColorEntry *e = i < nc ? GDALGetColorEntry(ct, i) : NULL;
        if (e) {
            t->rgb[i][0] = (uint8_t)e->c1;
            t->rgb[i][1] = (uint8_t)e->c2;
            t->rgb[i][2] = (uint8_t)e->c3;
        } else {
            ts_default_class_color(i, t->rgb[i]);
        }
    }
    if (st) ts_class_table_free(t);
    return st;
}
