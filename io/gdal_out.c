#include "io/gdal_out.h"

#include <cpl_vsi.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

/* Sidecars a driver may write next to the main file; for each the temporary
 * and the final name differ only in the stem. ".aux.xml" is appended to the
 * whole name, the others replace the extension. */
static const char *const replace_ext[] = {".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".qml", NULL};

/* Position of the extension's dot in the file name part of path (strlen when none). */
static size_t ext_pos(const char *path)
{
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    const char *dot = strrchr(base, '.');
    return (dot && dot != base) ? (size_t)(dot - path) : strlen(path);
}

static int exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

static char *dupf(const char *stem, size_t stem_len, const char *mid, const char *ext)
{
    size_t n = stem_len + strlen(mid) + strlen(ext) + 1;
    char *s = malloc(n);
    if (s) snprintf(s, n, "%.*s%s%s", (int)stem_len, stem, mid, ext);
    return s;
}

static void remove_tmp(const ts_gdal_out *o);

ts_status ts_gdal_out_begin(ts_gdal_out *o, const char *path, int overwrite, const char *what)
{
    o->path = o->tmp = NULL;
    if (!path || !*path) return ts_error(TS_ERR_INVALID_ARG, "%s: no output file name given", what);
    struct stat sb;
    if (stat(path, &sb) == 0) {
        if (S_ISDIR(sb.st_mode))
            return ts_error(TS_ERR_INVALID_ARG, "%s '%s' is a folder; give a file name", what, path);
        if (!overwrite)
            return ts_error(TS_ERR_INVALID_ARG, "%s '%s' already exists; use --overwrite to replace it", what, path);
    }
    /* The folder must exist: GDAL's own message for a missing folder is vague. */
    const char *slash = strrchr(path, '/');
    if (slash && slash != path) {
        char *dir = dupf(path, (size_t)(slash - path), "", "");
        if (!dir) return ts_error(TS_ERR_NOMEM, "%s '%s': out of memory", what, path);
        int ok = stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode);
        free(dir);
        if (!ok) return ts_error(TS_ERR_IO, "%s '%s': its folder does not exist; create it first", what, path);
    }
    char mid[48];
    snprintf(mid, sizeof mid, ".tmp-%ld", (long)getpid());
    size_t e = ext_pos(path);
    o->path = strdup(path);
    o->tmp = dupf(path, e, mid, path + e);
    if (!o->path || !o->tmp) {
        free(o->path);
        free(o->tmp);
        o->path = o->tmp = NULL;
        return ts_error(TS_ERR_NOMEM, "%s '%s': out of memory", what, path);
    }
    /* A temporary left by a killed run with the same pid would confuse drivers that open-or-create. */
    remove_tmp(o);
    return TS_OK;
}

/* Calls fn(tmp_name, final_name) for every sidecar name pair of o. */
static ts_status each_sidecar(const ts_gdal_out *o, ts_status (*fn)(const char *, const char *, const ts_gdal_out *))
{
    ts_status st = TS_OK;
    size_t pe = ext_pos(o->path), te = ext_pos(o->tmp);
    for (int i = -1; i == -1 || replace_ext[i]; i++) {
        char *t, *p;
        if (i < 0) {
            t = dupf(o->tmp, strlen(o->tmp), "", ".aux.xml");
            p = dupf(o->path, strlen(o->path), "", ".aux.xml");
        } else {
            /* Only the shapefile's and the style's sidecars: a ".prj" beside a GeoTIFF is not ours. */
            const char *ext = o->path + pe;
            if (strcasecmp(ext, ".shp") != 0 && strcmp(replace_ext[i], ".qml") != 0) continue;
            t = dupf(o->tmp, te, "", replace_ext[i]);
            p = dupf(o->path, pe, "", replace_ext[i]);
        }
        if (!t || !p) st = ts_error(TS_ERR_NOMEM, "'%s': out of memory", o->path);
        if (!st) st = fn(t, p, o);
        free(t);
        free(p);
        if (st) return st;
    }
    return TS_OK;
}

static ts_status move_sidecar(const char *tmp, const char *final, const ts_gdal_out *o)
{
    if (exists(tmp)) {
        if (rename(tmp, final) != 0)
            return ts_error(TS_ERR_IO, "'%s': cannot rename '%s' to '%s': %s", o->path, tmp, final, strerror(errno));
    } else if (exists(final) && unlink(final) != 0) {
        /* A stale sidecar of the old output must not describe the new one. */
        return ts_error(TS_ERR_IO, "'%s': cannot remove the stale '%s': %s", o->path, final, strerror(errno));
    }
    return TS_OK;
}

static ts_status remove_sidecar(const char *tmp, const char *final, const ts_gdal_out *o)
{
    (void)final;
    (void)o;
    if (exists(tmp)) unlink(tmp);
    return TS_OK;
}

static void remove_tmp(const ts_gdal_out *o)
{
    each_sidecar(o, remove_sidecar);
    if (exists(o->tmp)) unlink(o->tmp);
}

static void free_out(ts_gdal_out *o)
{
    free(o->path);
    free(o->tmp);
    o->path = o->tmp = NULL;
}

void ts_gdal_out_abort(ts_gdal_out *o)
{
    if (o->tmp && o->path) remove_tmp(o);
    free_out(o);
}

ts_status ts_gdal_out_commit(ts_gdal_out *o)
{
    if (!o->tmp || !exists(o->tmp)) {
        ts_status st = ts_error(TS_ERR_IO, "'%s': the temporary '%s' was not written", o->path ? o->path : "?",
                                o->tmp ? o->tmp : "?");
        ts_gdal_out_abort(o);
        return st;
    }
    /* Sidecars first, so a reader that sees PATH sees its complete set. */
    ts_status st = each_sidecar(o, move_sidecar);
    if (!st && rename(o->tmp, o->path) != 0)
        st = ts_error(TS_ERR_IO, "'%s': cannot rename '%s' to it: %s", o->path, o->tmp, strerror(errno));
    if (st) {
        ts_gdal_out_abort(o);
        return st;
    }
    free_out(o);
    return TS_OK;
}

const char *ts_vector_driver_for(const char *path)
{
    static const struct {
        const char *ext, *driver;
    } map[] = {{".gpkg", "GPKG"},       {".geojson", "GeoJSON"}, {".json", "GeoJSON"},
               {".shp", "ESRI Shapefile"}, {".fgb", "FlatGeobuf"}};
    const char *ext = path + ext_pos(path);
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (strcasecmp(ext, map[i].ext) == 0) return map[i].driver;
    ts_error(TS_ERR_INVALID_ARG,
             "'%s': unknown vector format '%s'; use .gpkg (GeoPackage), .geojson, .shp (Shapefile) or .fgb "
             "(FlatGeobuf)",
             path, *ext ? ext : "(no extension)");
    return NULL;
}
