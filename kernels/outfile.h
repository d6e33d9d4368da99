/* Writing an output file so that nothing already there is lost: data goes
 * to PATH.tmp, and only a complete, flushed and fsync'ed file is renamed over
 * PATH. On any failure the temporary is removed and PATH is untouched; the
 * error names PATH, the step that failed and the likely cause. */
#ifndef TS_OUTFILE_H
#define TS_OUTFILE_H

#include <stddef.h>
#include <stdio.h>

#include "status.h"

typedef struct ts_outfile {
    FILE *fp;   /* write through ts_outfile_write, or directly (then check ferror) */
    char *path;
    char *tmp;
    int err;    /* errno of the first failed write, 0 if none */
} ts_outfile;

ts_status ts_outfile_open(ts_outfile *o, const char *path);
/* Writes n bytes; after a failure further writes do nothing and commit fails. */
void ts_outfile_write(ts_outfile *o, const void *data, size_t n);
/* Flushes, fsyncs, closes and renames onto the path (then fsyncs the folder,
 * best effort); on failure removes the temporary. Frees o either way. */
ts_status ts_outfile_commit(ts_outfile *o);
/* Closes and removes the temporary; frees o. */
void ts_outfile_abort(ts_outfile *o);
/* The whole file from one buffer. */
ts_status ts_write_file_atomic(const char *path, const void *data, size_t len);

#endif
