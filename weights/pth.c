/* torch.save ZIP reader/writer with a restricted unpickler: see pth.h and
 * specs/weight-formats.md section 1. Nothing in a file is ever executed: the
 * unpickler builds inert values (ints, strings, tuples, dicts, tags for a
 * fixed allowlist of globals) and interprets REDUCE only for the few
 * allowlisted callables that rebuild tensors and containers. */
#include "pth.h"

#include "kernels/outfile.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---- CRC-32 ------------------------------------------------------------
 * The ZIP/zlib CRC (reflected polynomial 0xEDB88320). A constant table, so
 * there is no lazy initialisation to race on, and no zlib dependency. */
static const uint32_t crc_table[256] = {
    0x00000000u, 0x77073096u, 0xee0e612cu, 0x990951bau, 0x076dc419u, 0x706af48fu,
    0xe963a535u, 0x9e6495a3u, 0x0edb8832u, 0x79dcb8a4u, 0xe0d5e91eu, 0x97d2d988u,
    0x09b64c2bu, 0x7eb17cbdu, 0xe7b82d07u, 0x90bf1d91u, 0x1db71064u, 0x6ab020f2u,
    0xf3b97148u, 0x84be41deu, 0x1adad47du, 0x6ddde4ebu, 0xf4d4b551u, 0x83d385c7u,
    0x136c9856u, 0x646ba8c0u, 0xfd62f97au, 0x8a65c9ecu, 0x14015c4fu, 0x63066cd9u,
    0xfa0f3d63u, 0x8d080df5u, 0x3b6e20c8u, 0x4c69105eu, 0xd56041e4u, 0xa2677172u,
    0x3c03e4d1u, 0x4b04d447u, 0xd20d85fdu, 0xa50ab56bu, 0x35b5a8fau, 0x42b2986cu,
    0xdbbbc9d6u, 0xacbcf940u, 0x32d86ce3u, 0x45df5c75u, 0xdcd60dcfu, 0xabd13d59u,
    0x26d930acu, 0x51de003au, 0xc8d75180u, 0xbfd06116u, 0x21b4f4b5u, 0x56b3c423u,
    0xcfba9599u, 0xb8bda50fu, 0x2802b89eu, 0x5f058808u, 0xc60cd9b2u, 0xb10be924u,
    0x2f6f7c87u, 0x58684c11u, 0xc1611dabu, 0xb6662d3du, 0x76dc4190u, 0x01db7106u,
    0x98d220bcu, 0xefd5102au, 0x71b18589u, 0x06b6b51fu, 0x9fbfe4a5u, 0xe8b8d433u,
    0x7807c9a2u, 0x0f00f934u, 0x9609a88eu, 0xe10e9818u, 0x7f6a0dbbu, 0x086d3d2du,
    0x91646c97u, 0xe6635c01u, 0x6b6b51f4u, 0x1c6c6162u, 0x856530d8u, 0xf262004eu,
    0x6c0695edu, 0x1b01a57bu, 0x8208f4c1u, 0xf50fc457u, 0x65b0d9c6u, 0x12b7e950u,
    0x8bbeb8eau, 0xfcb9887cu, 0x62dd1ddfu, 0x15da2d49u, 0x8cd37cf3u, 0xfbd44c65u,
    0x4db26158u, 0x3ab551ceu, 0xa3bc0074u, 0xd4bb30e2u, 0x4adfa541u, 0x3dd895d7u,
    0xa4d1c46du, 0xd3d6f4fbu, 0x4369e96au, 0x346ed9fcu, 0xad678846u, 0xda60b8d0u,
    0x44042d73u, 0x33031de5u, 0xaa0a4c5fu, 0xdd0d7cc9u, 0x5005713cu, 0x270241aau,
    0xbe0b1010u, 0xc90c2086u, 0x5768b525u, 0x206f85b3u, 0xb966d409u, 0xce61e49fu,
    0x5edef90eu, 0x29d9c998u, 0xb0d09822u, 0xc7d7a8b4u, 0x59b33d17u, 0x2eb40d81u,
    0xb7bd5c3bu, 0xc0ba6cadu, 0xedb88320u, 0x9abfb3b6u, 0x03b6e20cu, 0x74b1d29au,
    0xead54739u, 0x9dd277afu, 0x04db2615u, 0x73dc1683u, 0xe3630b12u, 0x94643b84u,
    0x0d6d6a3eu, 0x7a6a5aa8u, 0xe40ecf0bu, 0x9309ff9du, 0x0a00ae27u, 0x7d079eb1u,
    0xf00f9344u, 0x8708a3d2u, 0x1e01f268u, 0x6906c2feu, 0xf762575du, 0x806567cbu,
    0x196c3671u, 0x6e6b06e7u, 0xfed41b76u, 0x89d32be0u, 0x10da7a5au, 0x67dd4accu,
    0xf9b9df6fu, 0x8ebeeff9u, 0x17b7be43u, 0x60b08ed5u, 0xd6d6a3e8u, 0xa1d1937eu,
    0x38d8c2c4u, 0x4fdff252u, 0xd1bb67f1u, 0xa6bc5767u, 0x3fb506ddu, 0x48b2364bu,
    0xd80d2bdau, 0xaf0a1b4cu, 0x36034af6u, 0x41047a60u, 0xdf60efc3u, 0xa867df55u,
    0x316e8eefu, 0x4669be79u, 0xcb61b38cu, 0xbc66831au, 0x256fd2a0u, 0x5268e236u,
    0xcc0c7795u, 0xbb0b4703u, 0x220216b9u, 0x5505262fu, 0xc5ba3bbeu, 0xb2bd0b28u,
    0x2bb45a92u, 0x5cb36a04u, 0xc2d7ffa7u, 0xb5d0cf31u, 0x2cd99e8bu, 0x5bdeae1du,
    0x9b64c2b0u, 0xec63f226u, 0x756aa39cu, 0x026d930au, 0x9c0906a9u, 0xeb0e363fu,
    0x72076785u, 0x05005713u, 0x95bf4a82u, 0xe2b87a14u, 0x7bb12baeu, 0x0cb61b38u,
    0x92d28e9bu, 0xe5d5be0du, 0x7cdcefb7u, 0x0bdbdf21u, 0x86d3d2d4u, 0xf1d4e242u,
    0x68ddb3f8u, 0x1fda836eu, 0x81be16cdu, 0xf6b9265bu, 0x6fb077e1u, 0x18b74777u,
    0x88085ae6u, 0xff0f6a70u, 0x66063bcau, 0x11010b5cu, 0x8f659effu, 0xf862ae69u,
    0x616bffd3u, 0x166ccf45u, 0xa00ae278u, 0xd70dd2eeu, 0x4e048354u, 0x3903b3c2u,
    0xa7672661u, 0xd06016f7u, 0x4969474du, 0x3e6e77dbu, 0xaed16a4au, 0xd9d65adcu,
    0x40df0b66u, 0x37d83bf0u, 0xa9bcae53u, 0xdebb9ec5u, 0x47b2cf7fu, 0x30b5ffe9u,
    0xbdbdf21cu, 0xcabac28au, 0x53b39330u, 0x24b4a3a6u, 0xbad03605u, 0xcdd70693u,
    0x54de5729u, 0x23d967bfu, 0xb3667a2eu, 0xc4614ab8u, 0x5d681b02u, 0x2a6f2b94u,
    0xb40bbe37u, 0xc30c8ea1u, 0x5a05df1bu, 0x2d02ef8du,
};

unsigned long ts_crc32(unsigned long crc, const void *p, size_t n)
{
    const unsigned char *b = p;
    uint32_t c = (uint32_t)crc ^ 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) c = crc_table[(c ^ b[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* ---- little-endian helpers --------------------------------------------- */
static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

/* ======================================================================
 * ZIP reading
 * ====================================================================== */

enum {
    SIG_LOCAL = 0x04034b50,
    SIG_CENTRAL = 0x02014b50,
    SIG_EOCD = 0x06054b50,
    SIG_EOCD64 = 0x06064b50,
    SIG_LOCATOR64 = 0x07064b50,
};

typedef struct zentry {
    const char *name; /* into the file buffer, not terminated */
    size_t name_len;
    uint64_t lho, data_off, size;
    uint32_t crc;
    int crc_checked;
} zentry;

typedef struct zip {
    const uint8_t *buf;
    size_t len;
    const char *file; /* for messages */
    zentry *e;        /* sorted by name after zip_open */
    size_t n;
    const char *prefix; /* "<archive>/" (the slash included) */
    size_t prefix_len;
} zip;

static int cmp_bytes(const char *a, size_t an, const char *b, size_t bn)
{
    int c = memcmp(a, b, an < bn ? an : bn);
    if (c) return c;
    return an < bn ? -1 : an > bn;
}

static int cmp_entry_name(const void *a, const void *b)
{
    const zentry *x = a, *y = b;
    return cmp_bytes(x->name, x->name_len, y->name, y->name_len);
}

static int cmp_entry_lho(const void *a, const void *b)
{
    const zentry *x = *(const zentry *const *)a, *y = *(const zentry *const *)b;
    return x->lho < y->lho ? -1 : x->lho > y->lho;
}

/* Names in messages: at most 120 bytes, non-printable bytes as '?'. */
static void printable(char *dst, size_t cap, const char *s, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n && k + 4 < cap; i++) dst[k++] = (s[i] >= 32 && s[i] < 127) ? s[i] : '?';
    if (n > 0 && k + 4 >= cap && k < n) {
        dst[k++] = '.';
        dst[k++] = '.';
        dst[k++] = '.';
    }
    dst[k] = '\0';
}

#define RESAVE_HINT "re-save it in Python with torch.save(model.state_dict(), path)"

/* Reads the central directory into z->e. Every offset and size is checked
 * against the buffer with 64-bit arithmetic before it is used. */
static ts_status zip_open(zip *z)
{
    const uint8_t *b = z->buf;
    size_t len = z->len;
    if (len < 22) return ts_error(TS_ERR_INVALID_ARG, "%s: only %zu bytes, too short for a torch.save file", z->file, len);

    /* End of central directory: scan back over at most a 64 KiB comment. */
    size_t lo = len - 22 > 65535 ? len - 22 - 65535 : 0, eocd = SIZE_MAX;
    for (size_t i = len - 22 + 1; i-- > lo;) {
        if (rd32(b + i) == SIG_EOCD && i + 22 + rd16(b + i + 20) <= len) {
            eocd = i;
            break;
        }
    }
    if (eocd == SIZE_MAX)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: no ZIP end-of-central-directory record; the file is truncated or not a torch.save file",
                        z->file);
    uint64_t count = rd16(b + eocd + 10), cd_size = rd32(b + eocd + 12), cd_off = rd32(b + eocd + 16);
    if (eocd >= 20 && rd32(b + eocd - 20) == SIG_LOCATOR64) {
        /* torch always writes ZIP64 end records; they hold the real values. */
        uint64_t off64 = rd64(b + eocd - 20 + 8);
        if (off64 > eocd - 20 || eocd - 20 - off64 < 56 || rd32(b + off64) != SIG_EOCD64)
            return ts_error(TS_ERR_INVALID_ARG, "%s: broken ZIP64 end-of-central-directory record; the file is damaged",
                            z->file);
        count = rd64(b + off64 + 32);
        cd_size = rd64(b + off64 + 40);
        cd_off = rd64(b + off64 + 48);
    }
    if (cd_off > len || cd_size > len - cd_off)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: the central directory (offset %llu, %llu bytes) lies outside the %zu-byte file; the file is "
                        "truncated or damaged",
                        z->file, (unsigned long long)cd_off, (unsigned long long)cd_size, len);
    if (count == 0) return ts_error(TS_ERR_INVALID_ARG, "%s: the ZIP archive is empty", z->file);
    if (count > cd_size / 46)
        return ts_error(TS_ERR_INVALID_ARG, "%s: %llu entries do not fit a %llu-byte central directory; the file is damaged",
                        z->file, (unsigned long long)count, (unsigned long long)cd_size);
    z->e = calloc((size_t)count, sizeof *z->e);
    if (!z->e) return ts_error(TS_ERR_NOMEM, "%s: out of memory for %llu ZIP entries", z->file, (unsigned long long)count);
    z->n = (size_t)count;

    char nm[128];
    uint64_t p = cd_off, end = cd_off + cd_size;
    for (size_t i = 0; i < z->n; i++) {
        if (end - p < 46 || rd32(b + p) != SIG_CENTRAL)
            return ts_error(TS_ERR_INVALID_ARG, "%s: central directory entry %zu is damaged", z->file, i);
        const uint8_t *c = b + p;
        unsigned flags = rd16(c + 8), method = rd16(c + 10);
        uint32_t crc = rd32(c + 16);
        uint64_t csize = rd32(c + 20), usize = rd32(c + 24), lho = rd32(c + 42);
        size_t nl = rd16(c + 28), xl = rd16(c + 30), cl = rd16(c + 32);
        if (end - p - 46 < (uint64_t)nl + xl + cl)
            return ts_error(TS_ERR_INVALID_ARG, "%s: central directory entry %zu overruns the directory", z->file, i);
        const char *name = (const char *)c + 46;
        printable(nm, sizeof nm, name, nl);
        /* ZIP64 extra field: the 64-bit values of the fields that are 0xFFFFFFFF, in this order. */
        int need_u = usize == 0xFFFFFFFFu, need_c = csize == 0xFFFFFFFFu, need_o = lho == 0xFFFFFFFFu;
        const uint8_t *x = c + 46 + nl, *xe = x + xl;
        while (xe - x >= 4) {
            unsigned id = rd16(x), sz = rd16(x + 2);
            if ((size_t)(xe - x - 4) < sz)
                return ts_error(TS_ERR_INVALID_ARG, "%s: record '%s': extra field overruns its entry", z->file, nm);
            if (id == 1) {
                const uint8_t *q = x + 4, *qe = q + sz;
                if (need_u && qe - q >= 8) usize = rd64(q), q += 8, need_u = 0;
                if (need_c && qe - q >= 8) csize = rd64(q), q += 8, need_c = 0;
                if (need_o && qe - q >= 8) lho = rd64(q), q += 8, need_o = 0;
            }
            x += 4 + sz;
        }
        if (need_u || need_c || need_o)
            return ts_error(TS_ERR_INVALID_ARG, "%s: record '%s': ZIP64 size or offset missing; the file is damaged",
                            z->file, nm);
        if (method != 0)
            return ts_error(TS_ERR_UNSUPPORTED,
                            "%s: record '%s' is compressed (ZIP method %u); torch.save stores records uncompressed, so "
                            "the file was re-packed by another tool; %s",
                            z->file, nm, method, RESAVE_HINT);
        if (flags & 1) return ts_error(TS_ERR_UNSUPPORTED, "%s: record '%s' is encrypted", z->file, nm);
        if (csize != usize)
            return ts_error(TS_ERR_INVALID_ARG, "%s: stored record '%s' has different packed and unpacked sizes",
                            z->file, nm);
        if (nl == 0 || memchr(name, 0, nl))
            return ts_error(TS_ERR_INVALID_ARG, "%s: central directory entry %zu has an empty or invalid name", z->file, i);
        if (i == 0) {
            /* The archive folder is whatever the first entry says (PyTorchStreamReader::init). */
            const char *slash = memchr(name, '/', nl);
            if (!slash)
                return ts_error(TS_ERR_INVALID_ARG,
                                "%s: first record '%s' is not inside an archive folder; not a torch.save file", z->file,
                                nm);
            z->prefix = name;
            z->prefix_len = (size_t)(slash - name) + 1;
        } else if (nl <= z->prefix_len || memcmp(name, z->prefix, z->prefix_len) != 0) {
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: record '%s' lies outside the archive folder '%.*s'; not a torch.save file", z->file, nm,
                            (int)z->prefix_len, z->prefix);
        }
        /* The data starts after the LOCAL header, whose extra field (torch's
         * 64-byte alignment padding) differs from the central one. */
        if (lho > len || len - lho < 30 || rd32(b + lho) != SIG_LOCAL)
            return ts_error(TS_ERR_INVALID_ARG, "%s: record '%s': local header missing at offset %llu; the file is damaged",
                            z->file, nm, (unsigned long long)lho);
        size_t lnl = rd16(b + lho + 26), lxl = rd16(b + lho + 28);
        uint64_t data_off = lho + 30 + lnl + lxl;
        if (lnl != nl || data_off > cd_off || memcmp(b + lho + 30, name, nl) != 0)
            return ts_error(TS_ERR_INVALID_ARG, "%s: record '%s': local header does not match the central directory",
                            z->file, nm);
        if (usize > cd_off - data_off)
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: record '%s' (%llu bytes at offset %llu) runs past the end of the data; the file is "
                            "truncated or damaged",
                            z->file, nm, (unsigned long long)usize, (unsigned long long)data_off);
        z->e[i] = (zentry){.name = name, .name_len = nl, .lho = lho, .data_off = data_off, .size = usize, .crc = crc};
        p += 46 + nl + xl + cl;
    }

    /* No two records may share a name or overlap (zip-bomb style aliasing). */
    const zentry **by_off = malloc(z->n * sizeof *by_off);
    if (!by_off) return ts_error(TS_ERR_NOMEM, "%s: out of memory", z->file);
    qsort(z->e, z->n, sizeof *z->e, cmp_entry_name);
    for (size_t i = 0; i < z->n; i++) by_off[i] = &z->e[i];
    qsort(by_off, z->n, sizeof *by_off, cmp_entry_lho);
    ts_status st = TS_OK;
    for (size_t i = 1; i < z->n && st == TS_OK; i++) {
        if (cmp_entry_name(&z->e[i - 1], &z->e[i]) == 0) {
            printable(nm, sizeof nm, z->e[i].name, z->e[i].name_len);
            st = ts_error(TS_ERR_INVALID_ARG, "%s: record '%s' appears twice", z->file, nm);
        } else if (by_off[i - 1]->data_off + by_off[i - 1]->size > by_off[i]->lho) {
            printable(nm, sizeof nm, by_off[i]->name, by_off[i]->name_len);
            st = ts_error(TS_ERR_INVALID_ARG, "%s: record '%s' overlaps the record before it; the file is damaged",
                          z->file, nm);
        }
    }
    free(by_off);
    return st;
}

/* The entry "<prefix>rel", or NULL. */
static zentry *zip_find(const zip *z, const char *rel)
{
    size_t rl = strlen(rel), lo = 0, hi = z->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const zentry *e = &z->e[mid];
        /* Compare e->name with prefix||rel without building the string. */
        int c;
        size_t pl = z->prefix_len;
        if (e->name_len < pl) {
            c = cmp_bytes(e->name, e->name_len, z->prefix, pl);
        } else {
            c = memcmp(e->name, z->prefix, pl);
            if (c == 0) c = cmp_bytes(e->name + pl, e->name_len - pl, rel, rl);
        }
        if (c == 0) return (zentry *)e;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static int zip_has_folder(const zip *z, const char *folder)
{
    size_t fl = strlen(folder);
    for (size_t i = 0; i < z->n; i++)
        if (z->e[i].name_len > z->prefix_len + fl && memcmp(z->e[i].name + z->prefix_len, folder, fl) == 0) return 1;
    return 0;
}

/* The bytes of an entry, CRC-checked the first time (a zero CRC means the
 * writer turned CRCs off: torch.serialization.set_crc32_options(False)). */
static ts_status zip_data(const zip *z, zentry *e, const uint8_t **data)
{
    *data = z->buf + e->data_off;
    if (!e->crc_checked && e->crc != 0) {
        uint32_t got = (uint32_t)ts_crc32(0, *data, (size_t)e->size);
        if (got != e->crc) {
            char nm[128];
            printable(nm, sizeof nm, e->name, e->name_len);
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: CRC-32 mismatch in record '%s' (stored %08x, computed %08x); the file is damaged",
                            z->file, nm, e->crc, got);
        }
    }
    e->crc_checked = 1;
    return TS_OK;
}

/* ======================================================================
 * The restricted unpickler
 * ====================================================================== */

/* Limits: far above what any real state dict needs (the SMP Unet pickle has
 * ~2300 memo entries and ~300 tensors), low enough that a hostile file cannot
 * make the reader allocate without bound. Objects and stack entries are also
 * bounded by the pickle length, since each opcode creates at most one. */
#define MAX_STACK (1u << 22)
#define MAX_MARKS (1u << 16) /* nesting depth */
#define MAX_MEMO (1u << 24)
#define MAX_OBJS (1u << 26)
#define MAX_GLOBAL_LINE 256

typedef enum okind {
    K_NONE,
    K_BOOL,
    K_INT,
    K_BIGINT, /* LONG1 wider than 64 bits: kept as an inert value */
    K_FLOAT,
    K_STR,
    K_BYTES,
    K_TUPLE,
    K_LIST,
    K_DICT, /* items hold key, value, key, value, ... */
    K_SET,
    K_GLOBAL,  /* an allowlisted name: u.tag indexes `allowed` */
    K_STORAGE, /* u.aux indexes u->storages */
    K_TENSOR,  /* u.aux indexes u->tensors */
    K_OPAQUE,  /* a value we keep but do not model (a torch.device, a set, ...) */
} okind;

static const char *const kind_names[] = {"None",  "bool", "int",  "int", "float", "str",    "bytes",  "tuple",
                                         "list",  "dict", "set",  "global name", "storage", "tensor", "object"};

typedef struct pobj {
    uint8_t kind;
    uint8_t tensorish; /* K_OPAQUE standing for a tensor we cannot represent */
    uint32_t n, cap;   /* container items */
    uint32_t *items;
    union {
        int64_t i;
        double f;
        struct {
            const char *p;
            size_t n;
        } s;
        int tag;
        uint32_t aux;
        const char *why; /* K_OPAQUE: what it is, for messages */
    } u;
} pobj;

typedef struct pstorage {
    int dtype; /* ts_dtype, or -1 when not representable */
    int tag;   /* the storage-type global */
    uint64_t numel;
    zentry *rec;
} pstorage;

typedef struct ptensor {
    uint32_t storage; /* index into storages */
    int ndim;
    uint64_t offset;
    int64_t size[TS_MAX_DIMS], stride[TS_MAX_DIMS];
} ptensor;

typedef struct unpickler {
    zip *z;
    const uint8_t *p;
    size_t len, pos, op_pos;
    pobj *objs;
    size_t nobj, capobj;
    uint32_t *stack;
    size_t sp, capstack;
    size_t *marks;
    size_t nmarks, capmarks;
    uint32_t *memo; /* object index + 1; 0 = never stored */
    size_t capmemo, nmemo; /* nmemo: distinct indices stored (MEMOIZE's next index, as len(memo) in CPython) */
    pstorage *storages;
    size_t nstorages, capstorages;
    ptensor *tensors;
    size_t ntensors, captensors;
} unpickler;

/* ---- the allowlist (torch/_weights_only_unpickler.py, spec 1.9) -------- */
typedef enum role {
    R_ORDEREDDICT, /* REDUCE/NEWOBJ with () -> an empty dict */
    R_REBUILD_V2,  /* torch._utils._rebuild_tensor_v2 -> a tensor */
    R_PARAM,       /* _rebuild_parameter(tensor, ...) -> that tensor */
    R_FROM_TYPE,   /* _rebuild_from_type_v2(func, type, args, state) -> func(*args) */
    R_TENSOR_OPAQUE, /* other _rebuild_* functions: tensors we cannot represent */
    R_SIZE,        /* torch.Size(tuple) -> the tuple */
    R_OBJECT,      /* harmless constructors (torch.device, set, ...) -> an opaque value */
    R_STORAGE,     /* torch.*Storage: only inside persistent ids */
    R_CLASS,       /* torch.Tensor, Parameter: only as _rebuild_from_type_v2's type or NEWOBJ */
    R_CONST,       /* dtypes, layouts, qschemes: inert values */
} role;

typedef struct allowed_global {
    const char *module, *name;
    role role;
    int dtype;     /* R_STORAGE: ts_dtype, -1 when not representable */
    int elsize;    /* R_STORAGE: bytes per element */
    const char *why; /* R_TENSOR_OPAQUE / R_STORAGE with dtype -1 */
} allowed_global;

static const allowed_global allowed[] = {
    {"collections", "OrderedDict", R_ORDEREDDICT, 0, 0, NULL},
    {"collections", "Counter", R_OBJECT, 0, 0, NULL},
    {"torch._utils", "_rebuild_tensor_v2", R_REBUILD_V2, 0, 0, NULL},
    {"torch._utils", "_rebuild_parameter", R_PARAM, 0, 0, NULL},
    {"torch._utils", "_rebuild_parameter_with_state", R_PARAM, 0, 0, NULL},
    {"torch._tensor", "_rebuild_from_type_v2", R_FROM_TYPE, 0, 0, NULL},
    {"torch._utils", "_rebuild_tensor_v3", R_TENSOR_OPAQUE, 0, 0, "a tensor of a new dtype (float8, uint16, ...)"},
    {"torch._utils", "_rebuild_qtensor", R_TENSOR_OPAQUE, 0, 0, "a quantized tensor"},
    {"torch._utils", "_rebuild_sparse_tensor", R_TENSOR_OPAQUE, 0, 0, "a sparse tensor"},
    {"torch._utils", "_rebuild_meta_tensor_no_storage", R_TENSOR_OPAQUE, 0, 0, "a meta tensor without data"},
    {"torch._utils", "_rebuild_wrapper_subclass", R_TENSOR_OPAQUE, 0, 0, "a tensor subclass without data"},
    {"torch._utils", "_rebuild_nested_tensor", R_TENSOR_OPAQUE, 0, 0, "a nested tensor"},
    {"torch._utils", "_rebuild_device_tensor_from_numpy", R_TENSOR_OPAQUE, 0, 0, "a device tensor from numpy"},
    {"torch", "Size", R_SIZE, 0, 0, NULL},
    {"torch", "device", R_OBJECT, 0, 0, NULL},
    {"torch", "Tensor", R_CLASS, 0, 0, NULL},
    {"torch.nn.parameter", "Parameter", R_CLASS, 0, 0, NULL},
    {"_codecs", "encode", R_OBJECT, 0, 0, NULL},
    {"builtins", "set", R_OBJECT, 0, 0, NULL},
    {"builtins", "frozenset", R_OBJECT, 0, 0, NULL},
    {"builtins", "bytearray", R_OBJECT, 0, 0, NULL},
    {"builtins", "complex", R_OBJECT, 0, 0, NULL},
    /* storage types (spec 1.6) */
    {"torch", "FloatStorage", R_STORAGE, TS_F32, 4, NULL},
    {"torch", "DoubleStorage", R_STORAGE, TS_F64, 8, NULL},
    {"torch", "HalfStorage", R_STORAGE, TS_F16, 2, NULL},
    {"torch", "BFloat16Storage", R_STORAGE, TS_BF16, 2, NULL},
    {"torch", "LongStorage", R_STORAGE, TS_I64, 8, NULL},
    {"torch", "IntStorage", R_STORAGE, TS_I32, 4, NULL},
    {"torch", "ByteStorage", R_STORAGE, TS_U8, 1, NULL},
    {"torch", "ShortStorage", R_STORAGE, -1, 2, "an int16 tensor"},
    {"torch", "CharStorage", R_STORAGE, -1, 1, "an int8 tensor"},
    {"torch", "BoolStorage", R_STORAGE, -1, 1, "a bool tensor"},
    {"torch", "ComplexFloatStorage", R_STORAGE, -1, 8, "a complex64 tensor"},
    {"torch", "ComplexDoubleStorage", R_STORAGE, -1, 16, "a complex128 tensor"},
    {"torch", "QInt8Storage", R_STORAGE, -1, 1, "a quantized tensor"},
    {"torch", "QUInt8Storage", R_STORAGE, -1, 1, "a quantized tensor"},
    {"torch", "QInt32Storage", R_STORAGE, -1, 4, "a quantized tensor"},
    {"torch", "UntypedStorage", R_STORAGE, -1, 1, "a tensor of a new dtype"},
    /* dtypes (pickled as `torch float32`), layouts, memory formats, qschemes */
    {"torch", "float32", R_CONST, 0, 0, NULL}, {"torch", "float", R_CONST, 0, 0, NULL},
    {"torch", "float64", R_CONST, 0, 0, NULL}, {"torch", "double", R_CONST, 0, 0, NULL},
    {"torch", "float16", R_CONST, 0, 0, NULL}, {"torch", "half", R_CONST, 0, 0, NULL},
    {"torch", "bfloat16", R_CONST, 0, 0, NULL}, {"torch", "int64", R_CONST, 0, 0, NULL},
    {"torch", "long", R_CONST, 0, 0, NULL}, {"torch", "int32", R_CONST, 0, 0, NULL},
    {"torch", "int", R_CONST, 0, 0, NULL}, {"torch", "int16", R_CONST, 0, 0, NULL},
    {"torch", "short", R_CONST, 0, 0, NULL}, {"torch", "int8", R_CONST, 0, 0, NULL},
    {"torch", "uint8", R_CONST, 0, 0, NULL}, {"torch", "uint16", R_CONST, 0, 0, NULL},
    {"torch", "uint32", R_CONST, 0, 0, NULL}, {"torch", "uint64", R_CONST, 0, 0, NULL},
    {"torch", "bool", R_CONST, 0, 0, NULL}, {"torch", "complex32", R_CONST, 0, 0, NULL},
    {"torch", "complex64", R_CONST, 0, 0, NULL}, {"torch", "complex128", R_CONST, 0, 0, NULL},
    {"torch", "cfloat", R_CONST, 0, 0, NULL}, {"torch", "cdouble", R_CONST, 0, 0, NULL},
    {"torch", "chalf", R_CONST, 0, 0, NULL}, {"torch", "float8_e4m3fn", R_CONST, 0, 0, NULL},
    {"torch", "float8_e5m2", R_CONST, 0, 0, NULL}, {"torch", "float8_e4m3fnuz", R_CONST, 0, 0, NULL},
    {"torch", "float8_e5m2fnuz", R_CONST, 0, 0, NULL}, {"torch", "float8_e8m0fnu", R_CONST, 0, 0, NULL},
    {"torch", "float4_e2m1fn_x2", R_CONST, 0, 0, NULL}, {"torch", "quint8", R_CONST, 0, 0, NULL},
    {"torch", "qint8", R_CONST, 0, 0, NULL}, {"torch", "qint32", R_CONST, 0, 0, NULL},
    {"torch", "quint4x2", R_CONST, 0, 0, NULL}, {"torch", "quint2x4", R_CONST, 0, 0, NULL},
    {"torch", "bits8", R_CONST, 0, 0, NULL}, {"torch", "bits16", R_CONST, 0, 0, NULL},
    {"torch", "strided", R_CONST, 0, 0, NULL}, {"torch", "sparse_coo", R_CONST, 0, 0, NULL},
    {"torch", "sparse_csr", R_CONST, 0, 0, NULL}, {"torch", "sparse_csc", R_CONST, 0, 0, NULL},
    {"torch", "sparse_bsr", R_CONST, 0, 0, NULL}, {"torch", "sparse_bsc", R_CONST, 0, 0, NULL},
    {"torch", "contiguous_format", R_CONST, 0, 0, NULL}, {"torch", "channels_last", R_CONST, 0, 0, NULL},
    {"torch", "preserve_format", R_CONST, 0, 0, NULL}, {"torch", "per_tensor_affine", R_CONST, 0, 0, NULL},
    {"torch", "per_channel_affine", R_CONST, 0, 0, NULL}, {"torch", "per_tensor_symmetric", R_CONST, 0, 0, NULL},
    {"torch", "per_channel_symmetric", R_CONST, 0, 0, NULL},
    {"torch", "per_channel_affine_float_qparams", R_CONST, 0, 0, NULL},
};
#define N_ALLOWED ((int)(sizeof allowed / sizeof allowed[0]))

/* Names of opcodes we refuse, for messages. */
static const char *opcode_name(int op)
{
    switch (op) {
    case 'i': return "INST";
    case 'o': return "OBJ";
    case 'P': return "PERSID";
    case '0': return "POP";
    case '1': return "POP_MARK";
    case '2': return "DUP";
    case 'I': return "INT";
    case 'L': return "LONG";
    case 'F': return "FLOAT";
    case 'S': return "STRING";
    case 'T': return "BINSTRING";
    case 'V': return "UNICODE";
    case 'p': return "PUT";
    case 'g': return "GET";
    case 'd': return "DICT";
    case 'l': return "LIST";
    case 0x82: return "EXT1";
    case 0x83: return "EXT2";
    case 0x84: return "EXT4";
    case 0x8b: return "LONG4";
    case 0x8e: return "BINBYTES8";
    case 0x91: return "FROZENSET";
    case 0x92: return "NEWOBJ_EX";
    case 0x96: return "BYTEARRAY8";
    case 0x97: return "NEXT_BUFFER";
    case 0x98: return "READONLY_BUFFER";
    default: return "unknown";
    }
}

static void up_free(unpickler *u)
{
    for (size_t i = 0; i < u->nobj; i++) free(u->objs[i].items);
    free(u->objs);
    free(u->stack);
    free(u->marks);
    free(u->memo);
    free(u->storages);
    free(u->tensors);
}

/* Grows *arr (elements of `size` bytes) to hold at least `need`. */
static int grow(void **arr, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap) return 1;
    size_t c = *cap ? *cap : 16;
    while (c < need) c *= 2;
    void *p = realloc(*arr, c * size);
    if (!p) return 0;
    *arr = p;
    *cap = c;
    return 1;
}

/* Every unpickler error names the file, "data.pkl", the byte offset and the
 * opcode, so a damaged file can be inspected with pickletools. */
#define PKL_ERR(u, st, fmt, ...)                                                                                      \
    ts_error(st, "%s: data.pkl at byte %zu: " fmt, (u)->z->file, (u)->op_pos, __VA_ARGS__)

static ts_status new_obj(unpickler *u, okind k, uint32_t *idx)
{
    if (u->nobj >= MAX_OBJS) return PKL_ERR(u, TS_ERR_INVALID_ARG, "more than %u objects", MAX_OBJS);
    if (!grow((void **)&u->objs, &u->capobj, u->nobj + 1, sizeof *u->objs))
        return ts_error(TS_ERR_NOMEM, "%s: out of memory unpickling data.pkl", u->z->file);
    memset(&u->objs[u->nobj], 0, sizeof u->objs[0]);
    u->objs[u->nobj].kind = (uint8_t)k;
    *idx = (uint32_t)u->nobj++;
    return TS_OK;
}

static ts_status push(unpickler *u, uint32_t idx)
{
    if (u->sp >= MAX_STACK) return PKL_ERR(u, TS_ERR_INVALID_ARG, "stack deeper than %u", MAX_STACK);
    if (!grow((void **)&u->stack, &u->capstack, u->sp + 1, sizeof *u->stack))
        return ts_error(TS_ERR_NOMEM, "%s: out of memory unpickling data.pkl", u->z->file);
    u->stack[u->sp++] = idx;
    return TS_OK;
}

static ts_status push_new(unpickler *u, okind k, uint32_t *idx)
{
    uint32_t i = 0;
    ts_status st = new_obj(u, k, &i);
    if (st == TS_OK) st = push(u, i);
    if (idx) *idx = i;
    return st;
}

/* The stack above the innermost MARK is the only part an opcode may pop, as
 * in CPython's metastack. */
static size_t stack_base(const unpickler *u) { return u->nmarks ? u->marks[u->nmarks - 1] : 0; }

static ts_status pop(unpickler *u, uint32_t *idx, int op)
{
    if (u->sp <= stack_base(u))
        return PKL_ERR(u, TS_ERR_INVALID_ARG, "stack underflow at opcode 0x%02x; the pickle is damaged", op);
    *idx = u->stack[--u->sp];
    return TS_OK;
}

static ts_status top(unpickler *u, uint32_t *idx, int op)
{
    if (u->sp <= stack_base(u))
        return PKL_ERR(u, TS_ERR_INVALID_ARG, "stack underflow at opcode 0x%02x; the pickle is damaged", op);
    *idx = u->stack[u->sp - 1];
    return TS_OK;
}

/* Pops the innermost MARK; the items above it are stack[*start .. sp). */
static ts_status pop_mark(unpickler *u, size_t *start, int op)
{
    if (!u->nmarks) return PKL_ERR(u, TS_ERR_INVALID_ARG, "opcode 0x%02x without a MARK; the pickle is damaged", op);
    *start = u->marks[--u->nmarks];
    return TS_OK;
}

static ts_status append_items(unpickler *u, uint32_t obj, const uint32_t *items, size_t n)
{
    pobj *o = &u->objs[obj];
    if ((size_t)o->n + n > UINT32_MAX / 2) return PKL_ERR(u, TS_ERR_INVALID_ARG, "%s", "container too large");
    size_t cap = o->cap;
    if (!grow((void **)&o->items, &cap, (size_t)o->n + n, sizeof *o->items))
        return ts_error(TS_ERR_NOMEM, "%s: out of memory unpickling data.pkl", u->z->file);
    o->cap = (uint32_t)cap;
    if (n) memcpy(o->items + o->n, items, n * sizeof *items);
    o->n += (uint32_t)n;
    return TS_OK;
}

/* A new tuple of the n items stack[sp-n .. sp), which are popped. */
static ts_status make_tuple(unpickler *u, size_t start)
{
    uint32_t t = 0;
    ts_status st = new_obj(u, K_TUPLE, &t);
    if (st != TS_OK) return st;
    st = append_items(u, t, u->stack + start, u->sp - start);
    if (st != TS_OK) return st;
    u->sp = start;
    return push(u, t);
}

static int str_is(const pobj *o, const char *s)
{
    return o->kind == K_STR && o->u.s.n == strlen(s) && memcmp(o->u.s.p, s, o->u.s.n) == 0;
}

static ts_status need(unpickler *u, size_t n)
{
    if (u->len - u->pos < n)
        return PKL_ERR(u, TS_ERR_INVALID_ARG, "opcode 0x%02x needs %zu bytes but the pickle ends; it is truncated",
                       u->p[u->op_pos], n);
    return TS_OK;
}

static ts_status push_str(unpickler *u, okind k, size_t n)
{
    ts_status st = need(u, n);
    if (st != TS_OK) return st;
    uint32_t i = 0;
    st = push_new(u, k, &i);
    if (st != TS_OK) return st;
    u->objs[i].u.s.p = (const char *)u->p + u->pos;
    u->objs[i].u.s.n = n;
    u->pos += n;
    return TS_OK;
}

static ts_status push_int(unpickler *u, int64_t v)
{
    uint32_t i = 0;
    ts_status st = push_new(u, K_INT, &i);
    if (st == TS_OK) u->objs[i].u.i = v;
    return st;
}

/* GLOBAL: only names in the allowlist; everything else is refused here,
 * before anything could use it. */
static ts_status resolve_global(unpickler *u, const char *mod, size_t ml, const char *name, size_t nl)
{
    for (int i = 0; i < N_ALLOWED; i++) {
        if (strlen(allowed[i].module) == ml && memcmp(allowed[i].module, mod, ml) == 0 &&
            strlen(allowed[i].name) == nl && memcmp(allowed[i].name, name, nl) == 0) {
            uint32_t o = 0;
            ts_status st = push_new(u, K_GLOBAL, &o);
            if (st == TS_OK) u->objs[o].u.tag = i;
            return st;
        }
    }
    char m[100], n[100];
    printable(m, sizeof m, mod, ml);
    printable(n, sizeof n, name, nl);
    if (strstr(m, "segmentation_models_pytorch") || strncmp(m, "torch.nn.modules", 16) == 0)
        return ts_error(TS_ERR_UNSUPPORTED,
                        "%s: the file holds a whole pickled model (class '%s.%s'), not its weights; refused without "
                        "executing anything. In Python, load it and save the weights: torch.save(model.state_dict(), "
                        "path)",
                        u->z->file, m, n);
    return ts_error(TS_ERR_UNSUPPORTED,
                    "%s: data.pkl uses the Python global '%s.%s', which is not on the weights-only allowlist; the file "
                    "was refused and nothing in it was executed (torch.load(weights_only=True) refuses it too). If "
                    "this is a training checkpoint, save just the weights in Python: torch.save(model.state_dict(), "
                    "path)",
                    u->z->file, m, n);
}

static int get_int(const unpickler *u, uint32_t o, int64_t *v)
{
    if (u->objs[o].kind != K_INT && u->objs[o].kind != K_BOOL) return 0;
    *v = u->objs[o].u.i;
    return 1;
}

static ts_status push_opaque(unpickler *u, const char *why, int tensorish)
{
    uint32_t o = 0;
    ts_status st = push_new(u, K_OPAQUE, &o);
    if (st == TS_OK) {
        u->objs[o].u.why = why;
        u->objs[o].tensorish = (uint8_t)tensorish;
    }
    return st;
}

/* _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]):
 * a view of a storage, checked to lie inside it. */
static ts_status rebuild_v2(unpickler *u, uint32_t args)
{
    const pobj *a = &u->objs[args];
    if (a->n < 4)
        return PKL_ERR(u, TS_ERR_INVALID_ARG, "_rebuild_tensor_v2 called with %u arguments; the pickle is damaged", a->n);
    const pobj *so = &u->objs[a->items[0]], *sz = &u->objs[a->items[2]], *sd = &u->objs[a->items[3]];
    int64_t off;
    if (so->kind != K_STORAGE || !get_int(u, a->items[1], &off) || off < 0 || sz->kind != K_TUPLE ||
        sd->kind != K_TUPLE || sz->n != sd->n)
        return PKL_ERR(u, TS_ERR_INVALID_ARG, "%s",
                       "_rebuild_tensor_v2 arguments are not (storage, offset, size, stride); the pickle is damaged");
    const pstorage *s = &u->storages[so->u.aux];
    if (a->n >= 7 && !(u->objs[a->items[6]].kind == K_DICT && u->objs[a->items[6]].n == 0))
        return push_opaque(u, "a tensor with conjugate/negative bits", 1);
    if (s->dtype < 0) return push_opaque(u, allowed[s->tag].why, 1);
    if (sz->n > TS_MAX_DIMS) return push_opaque(u, "a tensor with more than 8 dimensions", 1);
    ptensor t = {.storage = so->u.aux, .ndim = (int)sz->n, .offset = (uint64_t)off};
    uint64_t extent = 1; /* 1 + sum (size-1)*stride, or 0 for an empty tensor */
    int empty = 0;
    for (int i = 0; i < t.ndim; i++) {
        int64_t n, st;
        if (!get_int(u, sz->items[i], &n) || !get_int(u, sd->items[i], &st) || n < 0 || st < 0)
            return PKL_ERR(u, TS_ERR_INVALID_ARG, "tensor on storage '%.*s' has a negative or non-integer size/stride",
                           (int)(s->rec->name_len), s->rec->name);
        t.size[i] = n;
        t.stride[i] = st;
        if (n == 0) empty = 1;
        /* Overflow-checked extent: each term is below 2^63 / 2^63. */
        if (n > 1 && st > 0) {
            if ((uint64_t)(n - 1) > (UINT64_MAX >> 1) / (uint64_t)st)
                return PKL_ERR(u, TS_ERR_INVALID_ARG, "%s", "tensor size x stride overflows");
            uint64_t term = (uint64_t)(n - 1) * (uint64_t)st;
            if (extent > UINT64_MAX / 2 - term) return PKL_ERR(u, TS_ERR_INVALID_ARG, "%s", "tensor extent overflows");
            extent += term;
        }
    }
    if (!empty && (t.offset > s->numel || extent > s->numel - t.offset))
        return PKL_ERR(u, TS_ERR_INVALID_ARG,
                       "a tensor view (offset %llu, extent %llu elements) reaches past the end of storage record "
                       "'%.*s' (%llu elements); the file is damaged",
                       (unsigned long long)t.offset, (unsigned long long)extent, (int)s->rec->name_len, s->rec->name,
                       (unsigned long long)s->numel);
    if (!grow((void **)&u->tensors, &u->captensors, u->ntensors + 1, sizeof *u->tensors))
        return ts_error(TS_ERR_NOMEM, "%s: out of memory", u->z->file);
    u->tensors[u->ntensors] = t;
    uint32_t o = 0;
    ts_status st = push_new(u, K_TENSOR, &o);
    if (st == TS_OK) u->objs[o].u.aux = (uint32_t)u->ntensors++;
    return st;
}

/* REDUCE (and NEWOBJ): call an allowlisted callable. depth guards the one
 * level of indirection _rebuild_from_type_v2 adds. */
static ts_status apply(unpickler *u, uint32_t callable, uint32_t args, int is_newobj, int depth)
{
    const pobj *c = &u->objs[callable];
    if (c->kind != K_GLOBAL)
        return PKL_ERR(u, TS_ERR_UNSUPPORTED, "REDUCE on a %s; only allowlisted functions may be called",
                       kind_names[c->kind]);
    if (u->objs[args].kind != K_TUPLE)
        return PKL_ERR(u, TS_ERR_INVALID_ARG, "REDUCE arguments are a %s, not a tuple", kind_names[u->objs[args].kind]);
    const allowed_global *g = &allowed[c->u.tag];
    const pobj *a = &u->objs[args];
    switch (g->role) {
    case R_ORDEREDDICT:
        if (a->n != 0)
            return PKL_ERR(u, TS_ERR_UNSUPPORTED, "%s", "OrderedDict called with arguments (torch never writes that)");
        return push_new(u, K_DICT, NULL);
    case R_REBUILD_V2:
        if (is_newobj) break;
        return rebuild_v2(u, args);
    case R_PARAM: {
        if (is_newobj) break;
        if (a->n < 1 || (u->objs[a->items[0]].kind != K_TENSOR && !u->objs[a->items[0]].tensorish))
            return PKL_ERR(u, TS_ERR_INVALID_ARG, "%s", "_rebuild_parameter without a tensor argument");
        return push(u, a->items[0]);
    }
    case R_FROM_TYPE: {
        if (is_newobj || depth > 0) break;
        /* (func, new_type, args, state): a tensor subclass; we keep the tensor. */
        if (a->n < 3 || u->objs[a->items[0]].kind != K_GLOBAL || u->objs[a->items[1]].kind != K_GLOBAL ||
            allowed[u->objs[a->items[1]].u.tag].role != R_CLASS)
            return PKL_ERR(u, TS_ERR_INVALID_ARG, "%s", "_rebuild_from_type_v2 arguments are not (function, class, args)");
        return apply(u, a->items[0], a->items[2], 0, depth + 1);
    }
    case R_TENSOR_OPAQUE: return push_opaque(u, g->why, 1);
    case R_SIZE:
        if (a->n != 1 || u->objs[a->items[0]].kind != K_TUPLE)
            return PKL_ERR(u, TS_ERR_INVALID_ARG, "%s", "torch.Size called without a tuple");
        return push(u, a->items[0]);
    case R_OBJECT: return push_opaque(u, "a Python object", 0);
    case R_CLASS:
        if (!is_newobj) break;
        return push_opaque(u, "a Python object", 0);
    case R_STORAGE:
    case R_CONST: break;
    }
    return PKL_ERR(u, TS_ERR_UNSUPPORTED, "calling '%s.%s' is not allowed (refused, not executed)", g->module, g->name);
}

/* BINPERSID: ('storage', <storage type>, key, location, numel) names the
 * record data/<key>, whose size must be numel x element size. */
static ts_status persistent_load(unpickler *u, uint32_t pid)
{
    const pobj *t = &u->objs[pid];
    if (t->kind != K_TUPLE || t->n < 1 || !str_is(&u->objs[t->items[0]], "storage"))
        return PKL_ERR(u, TS_ERR_UNSUPPORTED, "%s", "a persistent id that is not a ('storage', ...) tuple");
    if (t->n != 5)
        return PKL_ERR(u, TS_ERR_INVALID_ARG, "a storage persistent id with %u items (expected 5)", t->n);
    const pobj *ty = &u->objs[t->items[1]], *key = &u->objs[t->items[2]];
    int64_t numel;
    if (ty->kind != K_GLOBAL || allowed[ty->u.tag].role != R_STORAGE || key->kind != K_STR || key->u.s.n == 0 ||
        key->u.s.n > 64 || !get_int(u, t->items[4], &numel) || numel < 0)
        return PKL_ERR(u, TS_ERR_INVALID_ARG, "%s",
                       "storage persistent id is not ('storage', type, key, location, numel); the pickle is damaged");
    char rel[80], kp[80];
    printable(kp, sizeof kp, key->u.s.p, key->u.s.n);
    snprintf(rel, sizeof rel, "data/%.*s", (int)key->u.s.n, key->u.s.p);
    zentry *e = memchr(key->u.s.p, 0, key->u.s.n) ? NULL : zip_find(u->z, rel);
    if (!e)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: data.pkl refers to storage '%s' but the archive has no record '%.*sdata/%s'; the file is "
                        "truncated or damaged",
                        u->z->file, kp, (int)u->z->prefix_len, u->z->prefix, kp);
    const allowed_global *g = &allowed[ty->u.tag];
    if ((uint64_t)numel > UINT64_MAX / 16 || (uint64_t)numel * (uint64_t)g->elsize != e->size)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: storage record '%.*sdata/%s' holds %llu bytes, but data.pkl declares %lld elements of %d "
                        "bytes (torch.%s); the file is damaged",
                        u->z->file, (int)u->z->prefix_len, u->z->prefix, kp, (unsigned long long)e->size,
                        (long long)numel, g->elsize, g->name);
    if (!grow((void **)&u->storages, &u->capstorages, u->nstorages + 1, sizeof *u->storages))
        return ts_error(TS_ERR_NOMEM, "%s: out of memory", u->z->file);
    u->storages[u->nstorages] = (pstorage){.dtype = g->dtype, .tag = ty->u.tag, .numel = (uint64_t)numel, .rec = e};
    uint32_t o = 0;
    ts_status st = push_new(u, K_STORAGE, &o);
    if (st == TS_OK) u->objs[o].u.aux = (uint32_t)u->nstorages++;
    return st;
}

static ts_status memo_put(unpickler *u, uint64_t idx)
{
    uint32_t o = 0;
    ts_status st = top(u, &o, u->p[u->op_pos]);
    if (st != TS_OK) return st;
    if (idx >= MAX_MEMO) return PKL_ERR(u, TS_ERR_INVALID_ARG, "memo index %llu too large", (unsigned long long)idx);
    size_t old = u->capmemo;
    if (!grow((void **)&u->memo, &u->capmemo, (size_t)idx + 1, sizeof *u->memo))
        return ts_error(TS_ERR_NOMEM, "%s: out of memory", u->z->file);
    if (u->capmemo > old) memset(u->memo + old, 0, (u->capmemo - old) * sizeof *u->memo);
    if (!u->memo[idx]) u->nmemo++;
    u->memo[idx] = o + 1;
    return TS_OK;
}

static ts_status memo_get(unpickler *u, uint64_t idx)
{
    if (idx >= u->capmemo || u->memo[idx] == 0)
        return PKL_ERR(u, TS_ERR_INVALID_ARG, "memo index %llu was never stored; the pickle is damaged",
                       (unsigned long long)idx);
    return push(u, u->memo[idx] - 1);
}

/* Reads one '\n'-terminated line of GLOBAL. */
static ts_status global_line(unpickler *u, const char **s, size_t *n)
{
    size_t lim = u->len - u->pos < MAX_GLOBAL_LINE ? u->len - u->pos : MAX_GLOBAL_LINE;
    const uint8_t *nl = memchr(u->p + u->pos, '\n', lim);
    if (!nl) return PKL_ERR(u, TS_ERR_INVALID_ARG, "%s", "GLOBAL name without an end of line; the pickle is damaged");
    *s = (const char *)u->p + u->pos;
    *n = (size_t)(nl - (u->p + u->pos));
    u->pos += *n + 1;
    return TS_OK;
}

/* Runs data.pkl to STOP; *result is the pickled object. */
static ts_status unpickle(unpickler *u, uint32_t *result)
{
    ts_status st = TS_OK;
    while (st == TS_OK) {
        if (u->pos >= u->len)
            return ts_error(TS_ERR_INVALID_ARG, "%s: data.pkl ends without a STOP opcode; the file is damaged",
                            u->z->file);
        u->op_pos = u->pos;
        int op = u->p[u->pos++];
        uint32_t a = 0, b = 0, o = 0;
        size_t start = 0;
        switch (op) {
        case 0x80: /* PROTO: any version; torch writes 2 */
            st = need(u, 1);
            if (st == TS_OK) u->pos++;
            break;
        case 0x95: /* FRAME (protocol 4): the length is only a read-ahead hint */
            st = need(u, 8);
            if (st == TS_OK) u->pos += 8;
            break;
        case '.': /* STOP */
            st = pop(u, result, op);
            return st;
        case '(': /* MARK */
            if (u->nmarks >= MAX_MARKS)
                return PKL_ERR(u, TS_ERR_INVALID_ARG, "more than %u nested MARKs", MAX_MARKS);
            if (!grow((void **)&u->marks, &u->capmarks, u->nmarks + 1, sizeof *u->marks))
                return ts_error(TS_ERR_NOMEM, "%s: out of memory", u->z->file);
            u->marks[u->nmarks++] = u->sp;
            break;
        case '}': st = push_new(u, K_DICT, NULL); break;
        case ']': st = push_new(u, K_LIST, NULL); break;
        case ')': st = push_new(u, K_TUPLE, NULL); break;
        case 0x8f: st = push_new(u, K_SET, NULL); break; /* EMPTY_SET */
        case 'N': st = push_new(u, K_NONE, NULL); break;
        case 0x88:
        case 0x89:
            st = push_new(u, K_BOOL, &o);
            if (st == TS_OK) u->objs[o].u.i = op == 0x88;
            break;
        case 'K':
            if ((st = need(u, 1)) == TS_OK) st = push_int(u, u->p[u->pos]), u->pos += 1;
            break;
        case 'M':
            if ((st = need(u, 2)) == TS_OK) st = push_int(u, rd16(u->p + u->pos)), u->pos += 2;
            break;
        case 'J':
            if ((st = need(u, 4)) == TS_OK) st = push_int(u, (int32_t)rd32(u->p + u->pos)), u->pos += 4;
            break;
        case 0x8a: { /* LONG1: n bytes of two's complement, little-endian */
            if ((st = need(u, 1)) != TS_OK) break;
            size_t n = u->p[u->pos++];
            if ((st = need(u, n)) != TS_OK) break;
            if (n > 8) {
                st = push_new(u, K_BIGINT, NULL);
            } else {
                uint64_t v = 0;
                for (size_t i = 0; i < n; i++) v |= (uint64_t)u->p[u->pos + i] << (8 * i);
                if (n > 0 && n < 8 && (u->p[u->pos + n - 1] & 0x80)) v |= UINT64_MAX << (8 * n);
                st = push_int(u, (int64_t)v);
            }
            u->pos += n;
            break;
        }
        case 'G': { /* BINFLOAT: big-endian double */
            if ((st = need(u, 8)) != TS_OK) break;
            uint64_t bits = 0;
            for (int i = 0; i < 8; i++) bits = bits << 8 | u->p[u->pos + i];
            u->pos += 8;
            if ((st = push_new(u, K_FLOAT, &o)) == TS_OK) memcpy(&u->objs[o].u.f, &bits, 8);
            break;
        }
        case 'X': /* BINUNICODE */
            if ((st = need(u, 4)) == TS_OK) {
                size_t n = rd32(u->p + u->pos);
                u->pos += 4;
                st = push_str(u, K_STR, n);
            }
            break;
        case 0x8d: /* BINUNICODE8 */
            if ((st = need(u, 8)) == TS_OK) {
                uint64_t n = rd64(u->p + u->pos);
                u->pos += 8;
                st = n > u->len ? need(u, u->len + 1) : push_str(u, K_STR, (size_t)n);
            }
            break;
        case 0x8c: /* SHORT_BINUNICODE */
        case 'U':  /* SHORT_BINSTRING: py2-era str, allowed by weights_only */
            if ((st = need(u, 1)) == TS_OK) {
                size_t n = u->p[u->pos++];
                st = push_str(u, K_STR, n);
            }
            break;
        case 'B': /* BINBYTES */
            if ((st = need(u, 4)) == TS_OK) {
                size_t n = rd32(u->p + u->pos);
                u->pos += 4;
                st = push_str(u, K_BYTES, n);
            }
            break;
        case 'C': /* SHORT_BINBYTES */
            if ((st = need(u, 1)) == TS_OK) {
                size_t n = u->p[u->pos++];
                st = push_str(u, K_BYTES, n);
            }
            break;
        case 'c': { /* GLOBAL module\nname\n */
            const char *m = NULL, *n = NULL;
            size_t ml = 0, nl = 0;
            if ((st = global_line(u, &m, &ml)) == TS_OK && (st = global_line(u, &n, &nl)) == TS_OK)
                st = resolve_global(u, m, ml, n, nl);
            break;
        }
        case 0x93: /* STACK_GLOBAL */
            if ((st = pop(u, &b, op)) != TS_OK || (st = pop(u, &a, op)) != TS_OK) break;
            if (u->objs[a].kind != K_STR || u->objs[b].kind != K_STR)
                return PKL_ERR(u, TS_ERR_INVALID_ARG, "%s", "STACK_GLOBAL without two strings");
            st = resolve_global(u, u->objs[a].u.s.p, u->objs[a].u.s.n, u->objs[b].u.s.p, u->objs[b].u.s.n);
            break;
        case 'R':  /* REDUCE */
        case 0x81: /* NEWOBJ */
            if ((st = pop(u, &b, op)) != TS_OK || (st = pop(u, &a, op)) != TS_OK) break;
            st = apply(u, a, b, op == 0x81, 0);
            break;
        case 'b': /* BUILD: the state of an OrderedDict (_metadata) or a tensor is not needed */
            if ((st = pop(u, &b, op)) != TS_OK || (st = top(u, &a, op)) != TS_OK) break;
            if (u->objs[a].kind != K_DICT && u->objs[a].kind != K_TENSOR && u->objs[a].kind != K_OPAQUE)
                return PKL_ERR(u, TS_ERR_UNSUPPORTED, "BUILD on a %s is not allowed", kind_names[u->objs[a].kind]);
            break;
        case 'Q': /* BINPERSID */
            if ((st = pop(u, &a, op)) == TS_OK) st = persistent_load(u, a);
            break;
        case 't': /* TUPLE */
            if ((st = pop_mark(u, &start, op)) == TS_OK) st = make_tuple(u, start);
            break;
        case 0x85: /* TUPLE1..3 */
        case 0x86:
        case 0x87: {
            size_t n = (size_t)(op - 0x84);
            if (u->sp < stack_base(u) + n)
                return PKL_ERR(u, TS_ERR_INVALID_ARG, "stack underflow at opcode 0x%02x; the pickle is damaged", op);
            st = make_tuple(u, u->sp - n);
            break;
        }
        case 'a': /* APPEND */
            if ((st = pop(u, &b, op)) != TS_OK || (st = top(u, &a, op)) != TS_OK) break;
            if (u->objs[a].kind != K_LIST)
                return PKL_ERR(u, TS_ERR_INVALID_ARG, "APPEND to a %s", kind_names[u->objs[a].kind]);
            st = append_items(u, a, &b, 1);
            break;
        case 'e':  /* APPENDS */
        case 'u':  /* SETITEMS */
        case 0x90: /* ADDITEMS */
        {
            if ((st = pop_mark(u, &start, op)) != TS_OK) break;
            size_t n = u->sp - start;
            if (start <= stack_base(u))
                return PKL_ERR(u, TS_ERR_INVALID_ARG, "stack underflow at opcode 0x%02x; the pickle is damaged", op);
            a = u->stack[start - 1];
            okind want = op == 'e' ? K_LIST : op == 'u' ? K_DICT : K_SET;
            if (u->objs[a].kind != want)
                return PKL_ERR(u, TS_ERR_INVALID_ARG, "opcode 0x%02x applied to a %s", op, kind_names[u->objs[a].kind]);
            if (op == 'u' && n % 2)
                return PKL_ERR(u, TS_ERR_INVALID_ARG, "%s", "SETITEMS with an odd number of items");
            if (op != 0x90) st = append_items(u, a, u->stack + start, n); /* set items are not needed */
            u->sp = start;
            break;
        }
        case 's': /* SETITEM */
            if ((st = pop(u, &b, op)) != TS_OK || (st = pop(u, &a, op)) != TS_OK || (st = top(u, &o, op)) != TS_OK)
                break;
            if (u->objs[o].kind != K_DICT)
                return PKL_ERR(u, TS_ERR_INVALID_ARG, "SETITEM on a %s", kind_names[u->objs[o].kind]);
            {
                uint32_t kv[2] = {a, b};
                st = append_items(u, o, kv, 2);
            }
            break;
        case 'q':
            if ((st = need(u, 1)) == TS_OK) st = memo_put(u, u->p[u->pos++]);
            break;
        case 'r':
            if ((st = need(u, 4)) == TS_OK) st = memo_put(u, rd32(u->p + u->pos)), u->pos += 4;
            break;
        case 0x94: /* MEMOIZE: the next free index */
            st = memo_put(u, u->nmemo);
            break;
        case 'h':
            if ((st = need(u, 1)) == TS_OK) st = memo_get(u, u->p[u->pos++]);
            break;
        case 'j':
            if ((st = need(u, 4)) == TS_OK) st = memo_get(u, rd32(u->p + u->pos)), u->pos += 4;
            break;
        default:
            return ts_error(TS_ERR_UNSUPPORTED,
                            "%s: data.pkl at byte %zu uses pickle opcode 0x%02x (%s), which a weights-only file never "
                            "needs; the file was refused and nothing in it was executed. %s",
                            u->z->file, u->op_pos, op, opcode_name(op), "Re-save the weights in Python with "
                                                                         "torch.save(model.state_dict(), path)");
        }
    }
    return st;
}

/* ======================================================================
 * From the unpickled object to the dictionary
 * ====================================================================== */

static int is_tensor_value(const unpickler *u, uint32_t o)
{
    return u->objs[o].kind == K_TENSOR || u->objs[o].tensorish;
}

/* A dict with string keys and only tensor values (an empty one counts). */
static int is_state_dict(const unpickler *u, uint32_t o)
{
    const pobj *d = &u->objs[o];
    if (d->kind != K_DICT) return 0;
    for (uint32_t i = 0; i + 1 < d->n; i += 2)
        if (u->objs[d->items[i]].kind != K_STR || !is_tensor_value(u, d->items[i + 1])) return 0;
    return 1;
}

/* Where checkpoints keep the weights, in the order we look (spec 1.8). */
static const char *const ckpt_keys[] = {"state_dict", "model_state_dict", "model", "net", "weights"};
#define LIGHTNING_PREFIX "model."

/* Views with more elements than their storage (stride-0 broadcasts,
 * overlapping strides) are legal but rare in weights; their total expansion
 * is capped so that a tiny hostile file cannot demand gigabytes. */
#define MAX_EXPANSION_BYTES ((uint64_t)1 << 28)

static ts_status copy_tensor(unpickler *u, const ptensor *t, int big_endian, const char *key, uint64_t *expansion,
                             uint64_t *total, void **out, size_t *out_bytes)
{
    const pstorage *s = &u->storages[t->storage];
    size_t es = ts_dtype_size((ts_dtype)s->dtype);
    uint64_t numel = 1;
    for (int i = 0; i < t->ndim; i++) {
        if (t->size[i] != 0 && numel > (SIZE_MAX / 2) / es / (uint64_t)t->size[i])
            return ts_error(TS_ERR_INVALID_ARG, "%s: tensor '%s' is too large", u->z->file, key);
        numel *= (uint64_t)t->size[i];
    }
    uint64_t nbytes = numel * es;
    /* Shared storages (views, tied weights) are copied once per tensor; a
     * hostile file could name one big storage a million times, so the total
     * is capped far above what sharing in real files produces. */
    *total += nbytes;
    if (*total > (uint64_t)u->z->len * 8 + MAX_EXPANSION_BYTES)
        return ts_error(TS_ERR_UNSUPPORTED,
                        "%s: at tensor '%s', the tensors add up to %llu bytes, more than 8 times the file size; views "
                        "of shared storages this numerous are not supported",
                        u->z->file, key, (unsigned long long)*total);
    if (nbytes > s->rec->size) {
        *expansion += nbytes - s->rec->size;
        if (*expansion > MAX_EXPANSION_BYTES)
            return ts_error(TS_ERR_UNSUPPORTED,
                            "%s: tensor '%s' is a view with more elements (%llu) than its storage; such expanded views "
                            "add up to more than %llu MiB in this file; save contiguous tensors (t.contiguous())",
                            u->z->file, key, (unsigned long long)numel, (unsigned long long)(MAX_EXPANSION_BYTES >> 20));
    }
    const uint8_t *base;
    ts_status st = zip_data(u->z, s->rec, &base);
    if (st != TS_OK) return st;
    uint8_t *dst = malloc(nbytes ? (size_t)nbytes : 1);
    if (!dst) return ts_error(TS_ERR_NOMEM, "%s: out of memory for tensor '%s' (%llu bytes)", u->z->file, key,
                              (unsigned long long)nbytes);
    if (numel) {
        /* Contiguous (dimensions of size 1 may have any stride): one copy. */
        int contiguous = 1;
        int64_t expect = 1;
        for (int i = t->ndim - 1; i >= 0; i--) {
            if (t->size[i] != 1 && t->stride[i] != expect) contiguous = 0;
            expect *= t->size[i];
        }
        if (contiguous) {
            memcpy(dst, base + t->offset * es, (size_t)nbytes);
        } else {
            /* Gather element by element; rebuild_v2 checked that every index
             * stays inside the storage. */
            int64_t idx[TS_MAX_DIMS] = {0};
            uint64_t src = t->offset;
            for (uint64_t k = 0; k < numel; k++) {
                memcpy(dst + k * es, base + src * es, es);
                for (int i = t->ndim - 1; i >= 0; i--) {
                    if (++idx[i] < t->size[i]) {
                        src += (uint64_t)t->stride[i];
                        break;
                    }
                    src -= (uint64_t)t->stride[i] * (uint64_t)(t->size[i] - 1);
                    idx[i] = 0;
                }
            }
        }
        if (big_endian && es > 1) {
            for (uint64_t k = 0; k < numel; k++) {
                uint8_t *e = dst + k * es;
                for (size_t i = 0; i < es / 2; i++) {
                    uint8_t tmp = e[i];
                    e[i] = e[es - 1 - i];
                    e[es - 1 - i] = tmp;
                }
            }
        }
    }
    *out = dst;
    *out_bytes = (size_t)nbytes;
    return TS_OK;
}

/* Describes the top-level keys of a checkpoint that has no state dict. */
static void describe_keys(const unpickler *u, uint32_t dict, char *buf, size_t cap)
{
    const pobj *d = &u->objs[dict];
    size_t k = 0;
    buf[0] = '\0';
    for (uint32_t i = 0; i + 1 < d->n && k + 40 < cap; i += 2) {
        const pobj *key = &u->objs[d->items[i]], *val = &u->objs[d->items[i + 1]];
        char kp[40];
        if (key->kind == K_STR)
            printable(kp, sizeof kp, key->u.s.p, key->u.s.n);
        else
            snprintf(kp, sizeof kp, "<%s>", kind_names[key->kind]);
        int w = snprintf(buf + k, cap - k, "%s'%s' (%s)", i ? ", " : "", kp, kind_names[val->kind]);
        if (w < 0 || (size_t)w >= cap - k) break;
        k += (size_t)w;
        if (i >= 12) {
            snprintf(buf + k, cap - k, ", ...");
            break;
        }
    }
}

static ts_status extract(unpickler *u, uint32_t root, int big_endian, ts_dict *d, ts_pth_info *info)
{
    uint32_t sd = UINT32_MAX;
    const pobj *r = &u->objs[root];
    if (r->kind != K_DICT)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: the file holds a %s, not a state dict (a dict of tensors); %s", u->z->file,
                        kind_names[r->kind], RESAVE_HINT);
    if (is_state_dict(u, root)) {
        sd = root;
    } else {
        for (size_t k = 0; k < sizeof ckpt_keys / sizeof ckpt_keys[0] && sd == UINT32_MAX; k++) {
            for (uint32_t i = 0; i + 1 < r->n; i += 2) {
                if (str_is(&u->objs[r->items[i]], ckpt_keys[k]) && is_state_dict(u, r->items[i + 1])) {
                    sd = r->items[i + 1];
                    snprintf(info->source, sizeof info->source, "%s", ckpt_keys[k]);
                    break;
                }
            }
        }
        if (sd == UINT32_MAX) {
            char keys[400];
            describe_keys(u, root, keys, sizeof keys);
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: no state dict found: the file holds a dict with keys %s; expected a dict of tensors, "
                            "or a checkpoint with one under 'state_dict', 'model_state_dict', 'model', 'net' or "
                            "'weights'; %s",
                            u->z->file, keys, RESAVE_HINT);
        }
    }
    const pobj *s = &u->objs[sd];

    /* A Lightning module holding the net as self.model saves every key as
     * "model.<smp key>": strip that, but only when it is on every key of a
     * checkpoint's state dict (a mixed dict is left as it is, so that no two
     * names can collide and nothing is renamed by guesswork). */
    size_t strip = 0;
    if (info->source[0] && s->n > 0) {
        size_t pl = strlen(LIGHTNING_PREFIX);
        strip = pl;
        for (uint32_t i = 0; i + 1 < s->n; i += 2) {
            const pobj *k = &u->objs[s->items[i]];
            if (k->u.s.n <= pl || memcmp(k->u.s.p, LIGHTNING_PREFIX, pl) != 0) strip = 0;
        }
        if (strip) snprintf(info->stripped_prefix, sizeof info->stripped_prefix, "%s", LIGHTNING_PREFIX);
    }

    uint64_t expansion = 0, total = 0;
    for (uint32_t i = 0; i + 1 < s->n; i += 2) {
        const pobj *k = &u->objs[s->items[i]], *v = &u->objs[s->items[i + 1]];
        char *name = malloc(k->u.s.n - strip + 1);
        if (!name) return ts_error(TS_ERR_NOMEM, "%s: out of memory", u->z->file);
        memcpy(name, k->u.s.p + strip, k->u.s.n - strip);
        name[k->u.s.n - strip] = '\0';
        ts_status st = TS_OK;
        if (strlen(name) != k->u.s.n - strip) {
            st = ts_error(TS_ERR_INVALID_ARG, "%s: a tensor name contains a NUL byte", u->z->file);
        } else if (v->kind != K_TENSOR) {
            st = ts_error(TS_ERR_UNSUPPORTED,
                          "%s: tensor '%s' is %s; terraseg reads float32, float16, bfloat16, float64, int64, int32 "
                          "and uint8 tensors",
                          u->z->file, name, v->u.why);
        } else {
            const ptensor *t = &u->tensors[v->u.aux];
            void *data = NULL;
            size_t nbytes = 0;
            st = copy_tensor(u, t, big_endian, name, &expansion, &total, &data, &nbytes);
            if (st == TS_OK) {
                st = ts_dict_add_owned(d, name, (ts_dtype)u->storages[t->storage].dtype, t->ndim, t->size, data);
                if (st != TS_OK) {
                    free(data);
                    char msg[600];
                    snprintf(msg, sizeof msg, "%s", ts_last_error());
                    st = ts_error(st, "%s: %s", u->z->file, msg);
                }
            }
        }
        free(name);
        if (st != TS_OK) return st;
    }
    info->tensors = d->count;
    return TS_OK;
}

static const uint8_t legacy_magic[12] = {0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};

ts_status ts_pth_parse_ex(const void *buf, size_t len, const char *name, ts_dict *out, ts_pth_info *info)
{
    if (!name) name = "<memory>";
    ts_pth_info inf;
    memset(&inf, 0, sizeof inf);
    const uint8_t *b = buf;
    if (!b && len) return ts_error(TS_ERR_INVALID_ARG, "%s: no buffer", name);
    if (len < 4 || memcmp(b, "PK\3\4", 4) != 0) {
        if (len >= 14 && b[0] == 0x80 && memcmp(b + 2, legacy_magic, sizeof legacy_magic) == 0)
            return ts_error(TS_ERR_UNSUPPORTED,
                            "%s: this is the legacy (before PyTorch 1.6) torch.save format, which terraseg does not "
                            "read; re-save it in Python: torch.save(torch.load(path, weights_only=True), 'new.pth')",
                            name);
        if (len >= 262 && memcmp(b + 257, "ustar", 5) == 0)
            return ts_error(TS_ERR_UNSUPPORTED,
                            "%s: this is a 2017-era tar checkpoint, which terraseg does not read; re-save it in Python "
                            "with a current PyTorch: torch.save(torch.load(path), 'new.pth')",
                            name);
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: not a torch.save file (files written by torch.save since PyTorch 1.6 are ZIP archives "
                        "starting with 'PK')",
                        name);
    }
    zip z = {.buf = b, .len = len, .file = name};
    unpickler u;
    memset(&u, 0, sizeof u);
    ts_dict d;
    ts_dict_init(&d);
    ts_status st = zip_open(&z);
    zentry *e = NULL;
    const uint8_t *data = NULL;
    if (st == TS_OK && (zip_find(&z, "constants.pkl") || zip_has_folder(&z, "code/")))
        st = ts_error(TS_ERR_UNSUPPORTED,
                      "%s: this is a TorchScript archive (torch.jit.save), not a torch.save state dict; in Python: "
                      "torch.save(torch.jit.load(path).state_dict(), 'weights.pth')",
                      name);
    if (st == TS_OK) {
        /* version: "3\n" from torch; parsed like stoull, 1..10 accepted as in caffe2/serialize/versions.h */
        e = zip_find(&z, "version");
        if (!e) e = zip_find(&z, ".data/version");
        if (!e)
            st = ts_error(TS_ERR_INVALID_ARG, "%s: no 'version' record; not a complete torch.save file", name);
        else
            st = zip_data(&z, e, &data);
        if (st == TS_OK) {
            uint64_t v = 0;
            size_t i = 0;
            while (i < e->size && i < 8 && data[i] >= '0' && data[i] <= '9') v = v * 10 + (uint64_t)(data[i++] - '0');
            if (i == 0 || v < 1 || v > 10)
                st = ts_error(TS_ERR_UNSUPPORTED,
                              "%s: archive version record is not a number from 1 to 10; the file is damaged or from a "
                              "newer PyTorch",
                              name);
            inf.version = (int)v;
        }
    }
    if (st == TS_OK && (e = zip_find(&z, "byteorder")) != NULL) {
        /* Absent means little-endian (files from PyTorch before 2.1). */
        st = zip_data(&z, e, &data);
        if (st == TS_OK) {
            if (e->size == 3 && memcmp(data, "big", 3) == 0)
                inf.big_endian = 1;
            else if (!(e->size == 6 && memcmp(data, "little", 6) == 0))
                st = ts_error(TS_ERR_INVALID_ARG, "%s: byteorder record is neither 'little' nor 'big'", name);
        }
    }
    if (st == TS_OK) {
        e = zip_find(&z, "data.pkl");
        if (!e)
            st = ts_error(TS_ERR_INVALID_ARG, "%s: no 'data.pkl' record; not a torch.save file", name);
        else
            st = zip_data(&z, e, &data);
    }
    if (st == TS_OK) {
        u.z = &z;
        u.p = data;
        u.len = (size_t)e->size;
        uint32_t root;
        st = unpickle(&u, &root);
        if (st == TS_OK) st = extract(&u, root, inf.big_endian, &d, &inf);
    }
    up_free(&u);
    free(z.e);
    if (st != TS_OK) {
        ts_dict_free(&d);
        return st;
    }
    /* Hand the tensors over: wholesale into an empty dictionary, else appended. */
    if (out->count == 0 && out->meta_count == 0) {
        ts_dict_free(out);
        *out = d;
    } else {
        size_t base = out->count;
        for (size_t i = 0; i < d.count; i++) {
            ts_named_tensor *t = &d.items[i];
            st = ts_dict_add_owned(out, t->name, t->dtype, t->ndim, t->shape, t->data);
            if (st != TS_OK) break;
            t->data = NULL; /* out owns it now */
        }
        if (st != TS_OK) {
            /* Undo the partial append (a duplicate name): out is left as it was. */
            char msg[600];
            snprintf(msg, sizeof msg, "%s", ts_last_error());
            while (out->count > base) {
                ts_named_tensor *t = &out->items[--out->count];
                d.items[out->count - base].data = t->data;
                free(t->name);
            }
            st = ts_error(st, "%s: %s", name, msg);
        }
        ts_dict_free(&d);
        if (st != TS_OK) return st;
    }
    if (info) *info = inf;
    return TS_OK;
}

ts_status ts_pth_parse(const void *buf, size_t len, const char *name, ts_dict *out)
{
    return ts_pth_parse_ex(buf, len, name, out, NULL);
}

ts_status ts_pth_read_ex(const char *path, ts_dict *out, ts_pth_info *info)
{
    FILE *f = fopen(path, "rb");
    if (!f) return ts_error(TS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return ts_error(TS_ERR_IO, "%s: not a regular file", path);
    }
    size_t len = (size_t)sb.st_size;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) {
        fclose(f);
        return ts_error(TS_ERR_NOMEM, "%s: out of memory reading %zu bytes", path, len);
    }
    size_t got = fread(buf, 1, len, f);
    int err = ferror(f);
    fclose(f);
    if (got != len || err) {
        free(buf);
        return ts_error(TS_ERR_IO, "%s: read %zu of %zu bytes", path, got, len);
    }
    ts_status st = ts_pth_parse_ex(buf, len, path, out, info);
    free(buf);
    return st;
}

ts_status ts_pth_read(const char *path, ts_dict *out) { return ts_pth_read_ex(path, out, NULL); }

/* ======================================================================
 * Writing
 * ====================================================================== */

typedef struct wbuf {
    uint8_t *p;
    size_t n, cap;
    int oom;
} wbuf;

static void wb_put(wbuf *w, const void *src, size_t n)
{
    if (w->oom) return;
    if (!grow((void **)&w->p, &w->cap, w->n + n, 1)) {
        w->oom = 1;
        return;
    }
    memcpy(w->p + w->n, src, n);
    w->n += n;
}
static void wb_u8(wbuf *w, unsigned v)
{
    uint8_t b = (uint8_t)v;
    wb_put(w, &b, 1);
}
static void wb_u16(wbuf *w, unsigned v)
{
    uint8_t b[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
    wb_put(w, b, 2);
}
static void wb_u32(wbuf *w, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    wb_put(w, b, 4);
}
static void wb_u64(wbuf *w, uint64_t v)
{
    wb_u32(w, (uint32_t)v);
    wb_u32(w, (uint32_t)(v >> 32));
}
static void wb_str(wbuf *w, const char *s) { wb_put(w, s, strlen(s)); }

/* Pickle integers as Python's pickler does: BININT1, BININT2, BININT, LONG1. */
static void pk_int(wbuf *w, int64_t v)
{
    if (v >= 0 && v <= 0xFF) {
        wb_u8(w, 'K');
        wb_u8(w, (unsigned)v);
    } else if (v >= 0 && v <= 0xFFFF) {
        wb_u8(w, 'M');
        wb_u16(w, (unsigned)v);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
        wb_u8(w, 'J');
        wb_u32(w, (uint32_t)(int32_t)v);
    } else {
        /* Shortest two's complement that keeps the sign. */
        uint8_t b[8];
        int n = 0;
        uint64_t x = (uint64_t)v;
        for (int i = 0; i < 8; i++) b[i] = (uint8_t)(x >> (8 * i));
        n = 8;
        while (n > 1 && ((b[n - 1] == 0 && !(b[n - 2] & 0x80)) || (b[n - 1] == 0xFF && (b[n - 2] & 0x80)))) n--;
        wb_u8(w, 0x8a);
        wb_u8(w, (unsigned)n);
        wb_put(w, b, (size_t)n);
    }
}

static void pk_str(wbuf *w, const char *s)
{
    wb_u8(w, 'X');
    wb_u32(w, (uint32_t)strlen(s));
    wb_str(w, s);
}

static void pk_tuple(wbuf *w, const int64_t *v, int n)
{
    if (n == 0) {
        wb_u8(w, ')');
        return;
    }
    if (n > 3) wb_u8(w, '(');
    for (int i = 0; i < n; i++) pk_int(w, v[i]);
    wb_u8(w, n == 1 ? 0x85 : n == 2 ? 0x86 : n == 3 ? 0x87 : 't');
}

static const char *const storage_names[TS_DTYPE_COUNT] = {
    [TS_F32] = "FloatStorage", [TS_F16] = "HalfStorage", [TS_BF16] = "BFloat16Storage", [TS_F64] = "DoubleStorage",
    [TS_I64] = "LongStorage",  [TS_I32] = "IntStorage",  [TS_U8] = "ByteStorage",
};

/* data.pkl for an OrderedDict of contiguous tensors (spec 1.10): storage i
 * is record data/i. No memo opcodes: re-emitting a GLOBAL is valid and
 * keeps the writer trivially correct. */
static void build_pickle(wbuf *w, const ts_dict *d)
{
    wb_u8(w, 0x80);
    wb_u8(w, 2);
    wb_str(w, "ccollections\nOrderedDict\n)R");
    if (d->count) wb_u8(w, '(');
    for (size_t i = 0; i < d->count; i++) {
        const ts_named_tensor *t = &d->items[i];
        int64_t stride[TS_MAX_DIMS];
        int64_t s = 1;
        /* torch's contiguous strides treat a 0 dimension as 1 */
        for (int k = t->ndim - 1; k >= 0; k--) {
            stride[k] = s;
            s *= t->shape[k] > 1 ? t->shape[k] : 1;
        }
        char key[32];
        snprintf(key, sizeof key, "%zu", i);
        pk_str(w, t->name);
        wb_str(w, "ctorch._utils\n_rebuild_tensor_v2\n((");
        pk_str(w, "storage");
        wb_str(w, "ctorch\n");
        wb_str(w, storage_names[t->dtype]);
        wb_u8(w, '\n');
        pk_str(w, key);
        pk_str(w, "cpu");
        pk_int(w, (int64_t)ts_named_numel(t));
        wb_str(w, "tQ");
        pk_int(w, 0);
        pk_tuple(w, t->shape, t->ndim);
        pk_tuple(w, stride, t->ndim);
        wb_u8(w, 0x89); /* requires_grad=False */
        wb_str(w, "ccollections\nOrderedDict\n)RtR");
    }
    if (d->count) wb_u8(w, 'u');
    wb_u8(w, '.');
}

static int valid_utf8(const char *s)
{
    const uint8_t *p = (const uint8_t *)s;
    while (*p) {
        int n = *p < 0x80 ? 0 : (*p & 0xE0) == 0xC0 ? 1 : (*p & 0xF0) == 0xE0 ? 2 : (*p & 0xF8) == 0xF0 ? 3 : -1;
        if (n < 0 || (n == 1 && *p < 0xC2)) return 0;
        p++;
        for (int i = 0; i < n; i++, p++)
            if ((*p & 0xC0) != 0x80) return 0;
    }
    return 1;
}

typedef struct zwriter {
    FILE *f;
    uint64_t off;
    int err, errnum; /* errnum: errno of the first failed write */
    int force64;
    wbuf cd; /* central directory, built as records are written */
    size_t count;
} zwriter;

static void zw_raw(zwriter *z, const void *p, size_t n)
{
    if (z->err || n == 0) return;
    if (fwrite(p, 1, n, z->f) != n) {
        z->errnum = z->err ? z->errnum : errno;
        z->err = 1;
    }
    z->off += n;
}

/* One stored record, its data 64-byte aligned by an 'FB' extra field as
 * caffe2's getPadding does; ZIP64 extra fields when a size or the offset
 * passes 4 GiB (or always, for tests). */
static void zw_record(zwriter *z, const char *name, const void *data, size_t size)
{
    uint64_t lho = z->off;
    uint32_t crc = (uint32_t)ts_crc32(0, data, size);
    int big_size = z->force64 || size >= 0xFFFFFFFFu, big_off = z->force64 || lho >= 0xFFFFFFFFu;
    size_t nl = strlen(name);
    size_t local64 = big_size || big_off ? 20 : 0; /* the local ZIP64 field carries both sizes */
    uint64_t start = lho + 30 + nl + local64 + 4;
    size_t pad = (size_t)((64 - start % 64) % 64);

    wbuf h = {0};
    wb_u32(&h, SIG_LOCAL);
    wb_u16(&h, local64 ? 45 : 20);
    wb_u16(&h, 0);    /* flags: sizes and CRC are known, no data descriptor */
    wb_u16(&h, 0);    /* stored */
    wb_u16(&h, 0);    /* time */
    wb_u16(&h, 0x21); /* date: 1980-01-01 */
    wb_u32(&h, crc);
    wb_u32(&h, local64 ? 0xFFFFFFFFu : (uint32_t)size);
    wb_u32(&h, local64 ? 0xFFFFFFFFu : (uint32_t)size);
    wb_u16(&h, (unsigned)nl);
    wb_u16(&h, (unsigned)(local64 + 4 + pad));
    wb_str(&h, name);
    if (local64) {
        wb_u16(&h, 1);
        wb_u16(&h, 16);
        wb_u64(&h, size);
        wb_u64(&h, size);
    }
    wb_str(&h, "FB");
    wb_u16(&h, (unsigned)pad);
    for (size_t i = 0; i < pad; i++) wb_u8(&h, 'Z');
    if (h.oom) z->err = 1;
    zw_raw(z, h.p, h.n);
    free(h.p);
    zw_raw(z, data, size);

    /* Central entry: only the values that overflow go to its ZIP64 field. */
    wbuf *c = &z->cd;
    size_t cx = (big_size ? 16 : 0) + (big_off ? 8 : 0);
    wb_u32(c, SIG_CENTRAL);
    wb_u16(c, cx ? 0x032D : 0x0314); /* made by: Unix, spec 4.5 / 2.0 */
    wb_u16(c, cx ? 45 : 20);
    wb_u16(c, 0);
    wb_u16(c, 0);
    wb_u16(c, 0);
    wb_u16(c, 0x21);
    wb_u32(c, crc);
    wb_u32(c, big_size ? 0xFFFFFFFFu : (uint32_t)size);
    wb_u32(c, big_size ? 0xFFFFFFFFu : (uint32_t)size);
    wb_u16(c, (unsigned)nl);
    wb_u16(c, (unsigned)(cx ? cx + 4 : 0));
    wb_u16(c, 0); /* comment */
    wb_u16(c, 0); /* disk */
    wb_u16(c, 0); /* internal attributes */
    wb_u32(c, 0); /* external attributes */
    wb_u32(c, big_off ? 0xFFFFFFFFu : (uint32_t)lho);
    wb_str(c, name);
    if (cx) {
        wb_u16(c, 1);
        wb_u16(c, (unsigned)cx);
        if (big_size) {
            wb_u64(c, size);
            wb_u64(c, size);
        }
        if (big_off) wb_u64(c, lho);
    }
    z->count++;
}

/* Central directory, then the ZIP64 end record and locator (torch always
 * writes them), then the classic end record. */
static void zw_finish(zwriter *z)
{
    if (z->cd.oom) z->err = 1;
    uint64_t cd_off = z->off, cd_size = z->cd.n;
    zw_raw(z, z->cd.p, z->cd.n);
    uint64_t off64 = z->off;
    wbuf e = {0};
    wb_u32(&e, SIG_EOCD64);
    wb_u64(&e, 44); /* size of the rest of this record */
    wb_u16(&e, 0x032D);
    wb_u16(&e, 45);
    wb_u32(&e, 0);
    wb_u32(&e, 0);
    wb_u64(&e, z->count);
    wb_u64(&e, z->count);
    wb_u64(&e, cd_size);
    wb_u64(&e, cd_off);
    wb_u32(&e, SIG_LOCATOR64);
    wb_u32(&e, 0);
    wb_u64(&e, off64);
    wb_u32(&e, 1);
    wb_u32(&e, SIG_EOCD);
    wb_u16(&e, 0);
    wb_u16(&e, 0);
    wb_u16(&e, z->count >= 0xFFFF ? 0xFFFF : (unsigned)z->count);
    wb_u16(&e, z->count >= 0xFFFF ? 0xFFFF : (unsigned)z->count);
    wb_u32(&e, cd_size >= 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)cd_size);
    wb_u32(&e, cd_off >= 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)cd_off);
    wb_u16(&e, 0);
    if (e.oom) z->err = 1;
    zw_raw(z, e.p, e.n);
    free(e.p);
}

/* The archive folder torch would use: the file's stem for a plain ASCII name
 * (unet.pth -> unet/), "archive" otherwise. Readers take it from the file. */
static void archive_name(const char *path, char *out, size_t cap)
{
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    const char *dot = strrchr(base, '.');
    size_t n = dot && dot != base ? (size_t)(dot - base) : strlen(base);
    int ok = n > 0 && n < cap && n <= 100;
    for (size_t i = 0; ok && i < n; i++) {
        char ch = base[i];
        ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
             ch == '-' || ch == '.';
    }
    if (ok)
        snprintf(out, cap, "%.*s", (int)n, base);
    else
        snprintf(out, cap, "archive");
}

ts_status ts_pth_write_ex(const char *path, const ts_dict *d, const ts_pth_write_opts *o)
{
    for (size_t i = 0; i < d->count; i++) {
        const ts_named_tensor *t = &d->items[i];
        if (!t->name[0] || !valid_utf8(t->name))
            return ts_error(TS_ERR_INVALID_ARG, "%s: tensor %zu has an empty or non-UTF-8 name", path, i);
        if ((int)t->dtype < 0 || t->dtype >= TS_DTYPE_COUNT || !storage_names[t->dtype])
            return ts_error(TS_ERR_INVALID_ARG, "%s: tensor '%s' has an unknown dtype", path, t->name);
        if (t->nbytes != ts_named_numel(t) * ts_dtype_size(t->dtype) || (t->nbytes && !t->data))
            return ts_error(TS_ERR_INVALID_ARG, "%s: tensor '%s' has %zu bytes of data, not numel x element size",
                            path, t->name, t->nbytes);
    }
    wbuf pkl = {0};
    build_pickle(&pkl, d);
    if (pkl.oom) {
        free(pkl.p);
        return ts_error(TS_ERR_NOMEM, "%s: out of memory building data.pkl", path);
    }
    /* Through PATH.tmp and a rename (kernels/outfile.h). */
    ts_outfile out;
    ts_status st = ts_outfile_open(&out, path);
    if (st != TS_OK) {
        free(pkl.p);
        return st;
    }
    zwriter z = {.force64 = o && o->force_zip64, .f = out.fp};
    char arch[128], rec[192];
    archive_name(path, arch, sizeof arch);
    snprintf(rec, sizeof rec, "%s/data.pkl", arch);
    zw_record(&z, rec, pkl.p, pkl.n);
    snprintf(rec, sizeof rec, "%s/byteorder", arch);
    zw_record(&z, rec, "little", 6);
    for (size_t i = 0; i < d->count && !z.err; i++) {
        snprintf(rec, sizeof rec, "%s/data/%zu", arch, i);
        zw_record(&z, rec, d->items[i].data, d->items[i].nbytes);
    }
    snprintf(rec, sizeof rec, "%s/version", arch);
    zw_record(&z, rec, "3\n", 2);
    zw_finish(&z);
    free(pkl.p);
    free(z.cd.p);
    if (z.err) out.err = z.errnum ? z.errnum : ENOMEM; /* a failed write, else a failed buffer allocation */
    return ts_outfile_commit(&out);
}

ts_status ts_pth_write(const char *path, const ts_dict *d) { return ts_pth_write_ex(path, d, NULL); }
