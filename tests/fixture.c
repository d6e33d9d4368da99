#include "fixture.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *fx_dir(void)
{
    const char *env = getenv("TERRASEG_FIXTURES");
    if (env && *env) return env;
#ifdef TS_FIXTURE_DIR
    return TS_FIXTURE_DIR;
#else
    return "tests/fixtures";
#endif
}

static int rd(FILE *fp, void *p, size_t n) { return fread(p, 1, n, fp) == n ? 0 : -1; }

static const size_t fx_size[4] = {4, 8, 8, 4};

int fx_load(fx_file *f, const char *relpath)
{
    memset(f, 0, sizeof *f);
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", fx_dir(), relpath);
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        printf("fixture %s: cannot open (set TERRASEG_FIXTURES to the tests/fixtures folder)\n", path);
        return -1;
    }
    char magic[8];
    uint32_t count;
    if (rd(fp, magic, 8) || memcmp(magic, "TSFX0001", 8) || rd(fp, &count, 4) || count > 100000) {
        printf("fixture %s: not a TSFX0001 file\n", path);
        fclose(fp);
        return -1;
    }
    f->records = calloc(count, sizeof *f->records);
    if (!f->records) {
        fclose(fp);
        return -1;
    }
    for (uint32_t r = 0; r < count; r++) {
        fx_record *rec = &f->records[r];
        uint16_t len;
        uint8_t dtype, ndim;
        if (rd(fp, &len, 2)) goto bad;
        rec->name = calloc(len + 1u, 1);
        if (!rec->name || rd(fp, rec->name, len) || rd(fp, &dtype, 1) || rd(fp, &ndim, 1) || dtype > 3 || ndim > 8)
            goto bad;
        f->count = r + 1;
        rec->dtype = dtype;
        rec->ndim = ndim;
        rec->count = 1;
        for (int d = 0; d < ndim; d++) {
            if (rd(fp, &rec->dims[d], 4)) goto bad;
            rec->count *= rec->dims[d];
        }
        rec->data = malloc(rec->count * fx_size[dtype] + 1);
        if (!rec->data || rd(fp, rec->data, rec->count * fx_size[dtype])) goto bad;
    }
    fclose(fp);
    return 0;
bad:
    printf("fixture %s: truncated or malformed at record %zu\n", path, f->count);
    fclose(fp);
    fx_free(f);
    return -1;
}

void fx_free(fx_file *f)
{
    for (size_t i = 0; i < f->count; i++) {
        free(f->records[i].name);
        free(f->records[i].data);
    }
    free(f->records);
    memset(f, 0, sizeof *f);
}

const fx_record *fx_get(const fx_file *f, const char *name, int dtype)
{
    for (size_t i = 0; i < f->count; i++) {
        if (strcmp(f->records[i].name, name) != 0) continue;
        if (f->records[i].dtype != dtype) {
            printf("fixture record %s: dtype %d, expected %d\n", name, f->records[i].dtype, dtype);
            return NULL;
        }
        return &f->records[i];
    }
    printf("fixture record %s: missing\n", name);
    return NULL;
}
