/* Reader for the test fixtures written by tests/make_smp_fixtures.py (and
 * other fixture scripts): a deliberately tiny format, independent of the
 * product's weight readers so that those can be tested against it.
 *
 *   "TSFX0001"                       8-byte magic
 *   u32 count                        number of records
 *   count times:
 *     u16 name_len, name bytes       (no terminator)
 *     u8 dtype                       0 f32, 1 f64, 2 i64, 3 i32
 *     u8 ndim, u32 dims[ndim]
 *     data                           little-endian, row-major
 */
#ifndef TS_FIXTURE_H
#define TS_FIXTURE_H

#include <stddef.h>
#include <stdint.h>

enum { FX_F32 = 0, FX_F64 = 1, FX_I64 = 2, FX_I32 = 3 };

typedef struct fx_record {
    char *name;
    int dtype, ndim;
    uint32_t dims[8];
    size_t count; /* elements */
    void *data;
} fx_record;

typedef struct fx_file {
    fx_record *records;
    size_t count;
} fx_file;

/* Loads tests/fixtures/<relpath> (TS_FIXTURE_DIR, or $TERRASEG_FIXTURES).
 * Returns 0 on success, else prints why and returns -1. */
int fx_load(fx_file *f, const char *relpath);
void fx_free(fx_file *f);
/* The record NAME, or NULL (and a message) if absent or of another dtype. */
const fx_record *fx_get(const fx_file *f, const char *name, int dtype);
/* The directory fixtures are read from. */
const char *fx_dir(void);

#endif
