/* GDAL plumbing shared by io/: driver registration, error routing, grids. */
#include <cpl_error.h>
#include <gdal.h>
#include <geos_c.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/io.h"

static pthread_once_t gdal_once = PTHREAD_ONCE_INIT;

/* GDAL reports through CPLError; by default it prints to stderr. We keep
 * the last message per thread (CPLGetLastErrorMsg) and stay quiet: callers
 * turn failures into ts_status with ts_gdal_error(), which quotes it. Debug
 * and warning messages are dropped unless CPL_DEBUG asks for them. */
static void CPL_STDCALL quiet_handler(CPLErr cls, CPLErrorNum num, const char *msg)
{
    (void)num;
    if (cls == CE_Debug) return;
    if (cls == CE_Warning && getenv("TERRASEG_GDAL_WARNINGS")) fprintf(stderr, "GDAL warning: %s\n", msg);
}

static void gdal_setup(void)
{
    GDALAllRegister();
    CPLSetErrorHandler(quiet_handler);
}

void ts_gdal_init(void) { pthread_once(&gdal_once, gdal_setup); }

ts_status ts_gdal_error(ts_status s, const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const char *gdal = CPLGetLastErrorMsg();
    if (gdal && *gdal) return ts_error(s, "%s: %s", msg, gdal);
    return ts_error(s, "%s", msg);
}

void ts_gdal_describe(char *buf, size_t size)
{
    snprintf(buf, size, "GDAL %s, GEOS %s", GDALVersionInfo("RELEASE_NAME"), GEOSversion());
}

void ts_grid_free(ts_grid *g)
{
    free(g->crs_wkt);
    memset(g, 0, sizeof *g);
}

ts_status ts_grid_copy(ts_grid *dst, const ts_grid *src)
{
    *dst = *src;
    dst->crs_wkt = NULL;
    if (src->crs_wkt && !(dst->crs_wkt = strdup(src->crs_wkt))) return ts_error(TS_ERR_NOMEM, "grid: out of memory");
    return TS_OK;
}

void ts_window_gt(const double gt[6], const ts_window *w, double out[6])
{
    const double c = (double)w->col_off, r = (double)w->row_off;
    memmove(out, gt, 6 * sizeof *out);
    out[0] += c * gt[1] + r * gt[2];
    out[3] += c * gt[4] + r * gt[5];
}

void ts_grid_window_gt(const ts_grid *g, const ts_window *w, double gt[6]) { ts_window_gt(g->gt, w, gt); }
