/* Status codes and the last-error message.
 *
 * The library never exits: every function that can fail returns a ts_status
 * and leaves a human-readable message (naming the op, file, option or key and
 * what to do) in a thread-local buffer that ts_last_error() returns. Only the
 * command-line tool turns a status into an exit code. */
#ifndef TS_STATUS_H
#define TS_STATUS_H

/* C linkage for the CUDA backend's .cu files, which nvcc compiles as C++. */
#ifdef __cplusplus
extern "C" {
#endif

typedef enum ts_status {
    TS_OK = 0,
    TS_ERR_INVALID_ARG,   /* bad shape, parameter or option: the caller's input */
    TS_ERR_NOMEM,         /* an allocation failed */
    TS_ERR_IO,            /* a file could not be read or written */
    TS_ERR_UNSUPPORTED,   /* valid request this build or backend cannot do */
    TS_ERR_BACKEND,       /* an external library (BLAS, CUDA, GDAL) reported an error */
    TS_STATUS_COUNT
} ts_status;

/* Short stable name of a status, e.g. "invalid argument". */
const char *ts_status_name(ts_status s);

/* Records a printf-style message as the last error and returns s, so that
 * error paths read `return ts_error(TS_ERR_INVALID_ARG, "conv2d: ...");`. */
ts_status ts_error(ts_status s, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* The message of the last ts_error() on this thread ("" if none). */
const char *ts_last_error(void);
void ts_clear_error(void);

#ifdef __cplusplus
}
#endif

#endif
