#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* One message per thread, so parallel callers do not overwrite each other. */
static _Thread_local char last_error[1024];

static const char *const status_names[TS_STATUS_COUNT] = {
    [TS_OK] = "ok",
    [TS_ERR_INVALID_ARG] = "invalid argument",
    [TS_ERR_NOMEM] = "out of memory",
    [TS_ERR_IO] = "I/O error",
    [TS_ERR_UNSUPPORTED] = "unsupported",
    [TS_ERR_BACKEND] = "backend error",
};

const char *ts_status_name(ts_status s)
{
    if ((int)s < 0 || s >= TS_STATUS_COUNT) return "unknown status";
    return status_names[s];
}

ts_status ts_error(ts_status s, const char *fmt, ...)
{
    /* Formatted aside first: callers wrap the message of the failure they
     * report (ts_error(st, "ctx: %s", ts_last_error())), and vsnprintf's
     * source and destination must not overlap. */
    char buf[sizeof last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    memcpy(last_error, buf, sizeof buf);
    return s;
}

const char *ts_last_error(void) { return last_error; }

void ts_clear_error(void) { last_error[0] = '\0'; }
