#include "outfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void outfile_release(ts_outfile *o)
{
    free(o->path);
    free(o->tmp);
    memset(o, 0, sizeof *o);
}

ts_status ts_outfile_open(ts_outfile *o, const char *path)
{
    memset(o, 0, sizeof *o);
    size_t n = strlen(path);
    o->path = strdup(path);
    o->tmp = malloc(n + 5);
    if (!o->path || !o->tmp) {
        outfile_release(o);
        return ts_error(TS_ERR_NOMEM, "%s: out of memory", path);
    }
    memcpy(o->tmp, path, n);
    memcpy(o->tmp + n, ".tmp", 5);
    o->fp = fopen(o->tmp, "wb");
    if (!o->fp) {
        ts_status st = ts_error(TS_ERR_IO, "%s: cannot create the temporary file %s: %s (check that the folder exists "
                                           "and is writable)",
                                path, o->tmp, strerror(errno));
        outfile_release(o);
        return st;
    }
    return TS_OK;
}

void ts_outfile_write(ts_outfile *o, const void *data, size_t n)
{
    if (o->err || n == 0) return;
    if (fwrite(data, 1, n, o->fp) != n) o->err = errno ? errno : EIO;
}

ts_status ts_outfile_commit(ts_outfile *o)
{
    const char *failed = NULL;
    int err = o->err;
    if (err || ferror(o->fp)) failed = "writing", err = err ? err : EIO;
    if (!failed && fflush(o->fp) != 0) failed = "writing", err = errno;
    if (!failed && fsync(fileno(o->fp)) != 0) failed = "syncing", err = errno;
    if (fclose(o->fp) != 0 && !failed) failed = "closing", err = errno;
    o->fp = NULL;
    if (!failed && rename(o->tmp, o->path) != 0) failed = "renaming", err = errno;
    if (failed) {
        unlink(o->tmp);
        ts_status st = ts_error(TS_ERR_IO, "%s: %s the temporary file %s failed: %s (%s)", o->path, failed, o->tmp,
                                strerror(err),
                                strcmp(failed, "renaming") == 0 ? "is the target a directory or on another file system?"
                                                                : "is the disk full or read-only?");
        outfile_release(o);
        return st;
    }
    /* Make the rename itself durable (best effort: some file systems refuse). */
    const char *slash = strrchr(o->path, '/');
    char *dir = slash ? strndup(o->path, slash == o->path ? 1 : (size_t)(slash - o->path)) : strdup(".");
    if (dir) {
        int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0) {
            (void)fsync(fd);
            close(fd);
        }
        free(dir);
    }
    outfile_release(o);
    return TS_OK;
}

void ts_outfile_abort(ts_outfile *o)
{
    if (o->fp) fclose(o->fp);
    if (o->tmp) unlink(o->tmp);
    outfile_release(o);
}

ts_status ts_write_file_atomic(const char *path, const void *data, size_t len)
{
    ts_outfile o;
    ts_status st = ts_outfile_open(&o, path);
    if (st != TS_OK) return st;
    ts_outfile_write(&o, data, len);
    return ts_outfile_commit(&o);
}
