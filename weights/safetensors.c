/* safetensors reader and writer; the rules are in safetensors.h. The checks
 * follow the reference reader (safetensors/src/tensor.rs, read_metadata and
 * Metadata::validate) and the writer follows its prepare()/serialize. */
#include "safetensors.h"

#include "kernels/outfile.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_JSON_INT (UINT64_C(1) << 53) /* every integer up to here is exact in cJSON's double */

static const char SUPPORTED[] = "F32, F16, BF16, F64, I64, I32, U8";
static const char RECREATE[] = "re-create it with safetensors.torch.save_file or save_pretrained";

/* ---- small helpers ----------------------------------------------------- */

/* Index of the first byte that is not part of valid UTF-8 (as Rust's
 * str::from_utf8 defines it: no overlong forms, surrogates or code points
 * above U+10FFFF), or n if all of s is valid. */
static size_t utf8_invalid_at(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            cp = c & 0x07;
        } else {
            return i;
        }
        if (n - i < len) return i;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return i;
            cp = cp << 6 | (s[i + k] & 0x3Fu);
        }
        if (len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) return i;
        if (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) return i;
        i += len;
    }
    return n;
}

static const char *json_type_name(const cJSON *j)
{
    if (cJSON_IsObject(j)) return "object";
    if (cJSON_IsArray(j)) return "array";
    if (cJSON_IsString(j)) return "string";
    if (cJSON_IsNumber(j)) return "number";
    if (cJSON_IsBool(j)) return "boolean";
    if (cJSON_IsNull(j)) return "null";
    return "value";
}

/* "[2, 3, 4]" into buf (truncated to fit). */
static const char *fmt_shape(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%" PRId64, i ? ", " : "", shape[i]);
    if (used < size) snprintf(buf + used, size - used, "]");
    return buf;
}

/* The dtypes of the safetensors format that terraseg does not read. */
static int is_other_safetensors_dtype(const char *s)
{
    static const char *const other[] = {"BOOL",        "I8",          "I16",  "U16",     "U32",     "U64", "C64",
                                        "F8_E5M2",     "F8_E4M3",     "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                                        "F4",          "F6_E2M3",     "F6_E3M2"};
    for (size_t i = 0; i < sizeof other / sizeof *other; i++)
        if (strcmp(s, other[i]) == 0) return 1;
    return 0;
}

static int cmp_child_names(const void *a, const void *b)
{
    const cJSON *x = *(const cJSON *const *)a, *y = *(const cJSON *const *)b;
    return strcmp(x->string ? x->string : "", y->string ? y->string : "");
}

/* Refuses an object with two equal keys (cJSON keeps both). `where` names the
 * object in the message. O(n log n), so a huge header cannot make it slow. */
static ts_status check_duplicate_keys(const char *file, const cJSON *obj, const char *where)
{
    size_t n = 0;
    for (const cJSON *c = obj->child; c; c = c->next) n++;
    if (n < 2) return TS_OK;
    const cJSON **kids = malloc(n * sizeof *kids);
    if (!kids) return ts_error(TS_ERR_NOMEM, "%s: out of memory checking the header's keys", file);
    size_t i = 0;
    for (const cJSON *c = obj->child; c; c = c->next) kids[i++] = c;
    qsort(kids, n, sizeof *kids, cmp_child_names);
    ts_status st = TS_OK;
    for (i = 1; i < n; i++) {
        if (cmp_child_names(&kids[i - 1], &kids[i]) == 0) {
            st = ts_error(TS_ERR_INVALID_ARG,
                          "%s: %s: key \"%.200s\" appears twice; safetensors headers must not repeat keys (%s)", file,
                          where, kids[i]->string ? kids[i]->string : "", RECREATE);
            break;
        }
    }
    free(kids);
    return st;
}

/* ---- lexical pre-scan ----------------------------------------------------
 * cJSON accepts more than JSON (any byte <= 0x20 as white space, a UTF-8 BOM,
 * "\u0000" inside strings) and keeps no number text, so "1.0", "1e3", "-0"
 * and "007" would all look like integers. This scan sees the raw text first
 * and refuses those; cJSON then checks the grammar. */
static ts_status scan_header(const char *file, const unsigned char *s, size_t n)
{
    int depth = 0, want_key = 0;
    const unsigned char *key = NULL; /* the last top-level key, raw, for messages */
    size_t key_len = 0;
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c == '"') {
            size_t j = i + 1;
            while (j < n && s[j] != '"') {
                if (s[j] == '\\') {
                    if (j + 1 < n && s[j + 1] == 'u' && n - j >= 6 && memcmp(s + j + 2, "0000", 4) == 0)
                        return ts_error(TS_ERR_INVALID_ARG,
                                        "%s: header byte %zu: a string contains \\u0000, which names cannot hold (%s)",
                                        file, j, RECREATE);
                    j += 2;
                    continue;
                }
                if (s[j] < 0x20)
                    return ts_error(TS_ERR_INVALID_ARG,
                                    "%s: header byte %zu: raw control character 0x%02x inside a string (JSON requires "
                                    "it escaped; %s)",
                                    file, j, s[j], RECREATE);
                j++;
            }
            if (want_key) {
                key = s + i + 1;
                key_len = (j < n ? j : n) - (i + 1);
                want_key = 0;
            }
            i = j + 1;
            continue;
        }
        if (c == '-' || (c >= '0' && c <= '9')) {
            size_t j = i;
            int plain = 1;
            while (j < n && (s[j] == '-' || s[j] == '+' || s[j] == '.' || s[j] == 'e' || s[j] == 'E' ||
                             (s[j] >= '0' && s[j] <= '9'))) {
                if (s[j] < '0' || s[j] > '9') plain = 0;
                j++;
            }
            uint64_t v = 0;
            if (plain && !(s[i] == '0' && j - i > 1)) {
                for (size_t k = i; k < j && v <= MAX_JSON_INT; k++) v = v * 10 + (uint64_t)(s[k] - '0');
            }
            if (!plain || (s[i] == '0' && j - i > 1) || v > MAX_JSON_INT) {
                return ts_error(TS_ERR_INVALID_ARG,
                                "%s: header byte %zu%s%.*s%s: number %.*s is not a plain non-negative integer up to "
                                "2^53 (shapes and data_offsets hold only such numbers: no sign, fraction, exponent "
                                "or leading zero; %s)",
                                file, i, key ? " (in \"" : "", key ? (int)(key_len > 200 ? 200 : key_len) : 0,
                                key ? (const char *)key : "", key ? "\")" : "", (int)(j - i > 40 ? 40 : j - i),
                                (const char *)s + i, RECREATE);
            }
            i = j;
            continue;
        }
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            i++;
            continue;
        }
        if (c == '{' || c == '[') {
            depth++;
            want_key = c == '{' && depth == 1;
        } else if (c == '}' || c == ']') {
            depth--;
        } else if (c == ',') {
            want_key = depth == 1;
        } else if (c == ':') {
            /* nothing */
        } else if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))) {
            /* letters are the literals true/false/null; cJSON checks them */
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: header byte %zu: byte 0x%02x outside a string is not valid JSON (the header must be "
                            "a JSON object padded only with spaces; %s)",
                            file, i, c, RECREATE);
        }
        i++;
    }
    return TS_OK;
}

/* ---- header parsing --------------------------------------------------- */

typedef struct st_entry {
    const char *name; /* points into the cJSON tree */
    size_t order;     /* position in the header */
    ts_dtype dtype;
    int ndim;
    int64_t shape[TS_MAX_DIMS];
    uint64_t begin, end;
} st_entry;

typedef struct st_header {
    cJSON *root;
    st_entry *entries; /* sorted by data_offsets */
    size_t count;
} st_header;

static void header_free(st_header *h)
{
    cJSON_Delete(h->root);
    free(h->entries);
    memset(h, 0, sizeof *h);
}

static int cmp_entries(const void *a, const void *b)
{
    const st_entry *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

static ts_status read_metadata(const char *file, const cJSON *meta, ts_dict *out)
{
    if (cJSON_IsNull(meta)) return TS_OK; /* the Rust reader takes null as "no metadata" */
    if (!cJSON_IsObject(meta))
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: \"__metadata__\" is a JSON %s; it must be an object mapping strings to strings (%s)", file,
                        json_type_name(meta), RECREATE);
    ts_status st = check_duplicate_keys(file, meta, "\"__metadata__\"");
    if (st != TS_OK) return st;
    for (const cJSON *c = meta->child; c; c = c->next) {
        if (!cJSON_IsString(c) || !c->valuestring)
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: \"__metadata__\" key \"%.200s\" has a JSON %s value; metadata values must be strings "
                            "(%s)",
                            file, c->string ? c->string : "", json_type_name(c), RECREATE);
        st = ts_dict_set_meta(out, c->string ? c->string : "", c->valuestring);
        if (st != TS_OK) return st;
    }
    return TS_OK;
}

/* A JSON number the pre-scan accepted: an integer in [0, 2^53]. */
static int json_uint(const cJSON *j, uint64_t *v)
{
    if (!cJSON_IsNumber(j)) return 0;
    double d = j->valuedouble;
    if (!(d >= 0 && d <= (double)MAX_JSON_INT) || d != (double)(uint64_t)d) return 0;
    *v = (uint64_t)d;
    return 1;
}

static ts_status read_entry(const char *file, const cJSON *item, size_t order, st_entry *e)
{
    const char *name = item->string ? item->string : "";
    memset(e, 0, sizeof *e);
    e->name = name;
    e->order = order;
    if (!cJSON_IsObject(item))
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: tensor \"%.200s\" is a JSON %s; expected an object with dtype, shape and "
                        "data_offsets (%s)",
                        file, name, json_type_name(item), RECREATE);
    const cJSON *dtype = NULL, *shape = NULL, *offsets = NULL;
    for (const cJSON *c = item->child; c; c = c->next) {
        const char *k = c->string ? c->string : "";
        const cJSON **slot = strcmp(k, "dtype") == 0          ? &dtype
                             : strcmp(k, "shape") == 0        ? &shape
                             : strcmp(k, "data_offsets") == 0 ? &offsets
                                                              : NULL;
        if (!slot)
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: tensor \"%.200s\": unknown field \"%.100s\" (a tensor has exactly dtype, shape and "
                            "data_offsets; %s)",
                            file, name, k, RECREATE);
        if (*slot)
            return ts_error(TS_ERR_INVALID_ARG, "%s: tensor \"%.200s\": field \"%s\" appears twice (%s)", file, name,
                            k, RECREATE);
        *slot = c;
    }
    if (!dtype || !shape || !offsets)
        return ts_error(TS_ERR_INVALID_ARG, "%s: tensor \"%.200s\" has no \"%s\" field (%s)", file, name,
                        !dtype ? "dtype" : !shape ? "shape" : "data_offsets", RECREATE);

    if (!cJSON_IsString(dtype) || !dtype->valuestring)
        return ts_error(TS_ERR_INVALID_ARG, "%s: tensor \"%.200s\": dtype is a JSON %s, not a string such as \"F32\"",
                        file, name, json_type_name(dtype));
    int dt = ts_dtype_from_safetensors(dtype->valuestring);
    if (dt < 0) {
        if (is_other_safetensors_dtype(dtype->valuestring))
            return ts_error(TS_ERR_UNSUPPORTED,
                            "%s: tensor \"%.200s\": dtype %s is not supported (supported: %s); convert the tensor, "
                            "e.g. with .float(), before saving",
                            file, name, dtype->valuestring, SUPPORTED);
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: tensor \"%.200s\": unknown dtype \"%.40s\" (supported: %s; dtype names are upper case)",
                        file, name, dtype->valuestring, SUPPORTED);
    }
    e->dtype = (ts_dtype)dt;

    if (!cJSON_IsArray(shape))
        return ts_error(TS_ERR_INVALID_ARG, "%s: tensor \"%.200s\": shape is a JSON %s, not an array of integers",
                        file, name, json_type_name(shape));
    int ndim = 0;
    uint64_t numel = 1;
    const uint64_t limit = (uint64_t)SIZE_MAX / 8; /* numel * element size must fit size_t */
    for (const cJSON *c = shape->child; c; c = c->next) {
        if (ndim == TS_MAX_DIMS)
            return ts_error(TS_ERR_UNSUPPORTED, "%s: tensor \"%.200s\": shape has %d dimensions or more; at most %d "
                            "are supported", file, name, TS_MAX_DIMS + 1, TS_MAX_DIMS);
        uint64_t dim;
        if (!json_uint(c, &dim))
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: tensor \"%.200s\": shape entry %d is a JSON %s, not a non-negative integer", file,
                            name, ndim, json_type_name(c));
        if (dim && numel > limit / dim)
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: tensor \"%.200s\": shape has too many elements (the product of its dimensions "
                            "overflows; %s)",
                            file, name, RECREATE);
        numel *= dim;
        e->shape[ndim++] = (int64_t)dim;
    }
    e->ndim = ndim;

    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2 || !json_uint(offsets->child, &e->begin) ||
        !json_uint(offsets->child->next, &e->end))
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: tensor \"%.200s\": data_offsets must be an array of two non-negative integers [begin, "
                        "end] (%s)",
                        file, name, RECREATE);
    if (e->end < e->begin)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: tensor \"%.200s\": data_offsets [%" PRIu64 ", %" PRIu64 "] end before they begin (%s)",
                        file, name, e->begin, e->end, RECREATE);
    uint64_t nbytes = numel * ts_dtype_size(e->dtype);
    if (e->end - e->begin != nbytes) {
        char sh[128];
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: tensor \"%.200s\": data_offsets [%" PRIu64 ", %" PRIu64 "] hold %" PRIu64
                        " bytes, but dtype %s and shape %s need %" PRIu64 " (%s)",
                        file, name, e->begin, e->end, e->end - e->begin, ts_dtype_safetensors_name(e->dtype),
                        fmt_shape(sh, sizeof sh, e->ndim, e->shape), nbytes, RECREATE);
    }
    return TS_OK;
}

/* Checks the 8-byte length against the bytes present. */
static ts_status check_header_len(const char *file, uint64_t total, uint64_t n)
{
    if (n > TS_SAFETENSORS_MAX_HEADER)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: header length %" PRIu64 " exceeds the limit of %u bytes: the file is corrupt or not a "
                        "safetensors file (%s)",
                        file, n, TS_SAFETENSORS_MAX_HEADER, RECREATE);
    if (n > total - 8)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: header length %" PRIu64 " but only %" PRIu64
                        " bytes follow the length field: the file is truncated or not a safetensors file (%s)",
                        file, n, total - 8, RECREATE);
    return TS_OK;
}

/* Parses and validates the n-byte header hdr against a data section of
 * data_len bytes; metadata goes into out. On success h holds the entries
 * sorted by data_offsets, which then cover [0, data_len) exactly. */
static ts_status parse_header(const char *file, const unsigned char *hdr, size_t n, uint64_t data_len, st_header *h,
                              ts_dict *out)
{
    memset(h, 0, sizeof *h);
    size_t bad = utf8_invalid_at(hdr, n);
    if (bad < n)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: header byte %zu is not valid UTF-8 (the header must be UTF-8 JSON; %s)", file, bad,
                        RECREATE);
    ts_status st = scan_header(file, hdr, n);
    if (st != TS_OK) return st;

    /* cJSON reads at most n bytes, but a terminated copy keeps the message's
     * excerpt (and any strtod inside cJSON) within bounds. */
    char *text = malloc(n + 1);
    if (!text) return ts_error(TS_ERR_NOMEM, "%s: out of memory for the %zu-byte header", file, n);
    memcpy(text, hdr, n);
    text[n] = '\0';
    const char *end = NULL;
    h->root = cJSON_ParseWithLengthOpts(text, n, &end, 0);
    if (!h->root) {
        size_t at = end && end >= text && end <= text + n ? (size_t)(end - text) : 0;
        st = ts_error(TS_ERR_INVALID_ARG,
                      "%s: the header is not valid JSON (error at header byte %zu of %zu, near \"%.30s\"): the file "
                      "is corrupt or not a safetensors file (%s)",
                      file, at, n, text + at, RECREATE);
        free(text);
        return st;
    }
    size_t at = end && end >= text && end <= text + n ? (size_t)(end - text) : n;
    for (size_t i = at; i < n; i++) {
        if (text[i] != ' ' && text[i] != '\t' && text[i] != '\n' && text[i] != '\r') {
            st = ts_error(TS_ERR_INVALID_ARG,
                          "%s: header byte %zu: text after the JSON object (only space padding may follow it; %s)",
                          file, i, RECREATE);
            free(text);
            header_free(h);
            return st;
        }
    }
    free(text);
    if (!cJSON_IsObject(h->root)) {
        st = ts_error(TS_ERR_INVALID_ARG, "%s: the header is a JSON %s, not an object of tensors (%s)", file,
                      json_type_name(h->root), RECREATE);
        header_free(h);
        return st;
    }
    st = check_duplicate_keys(file, h->root, "header");
    if (st != TS_OK) {
        header_free(h);
        return st;
    }

    size_t count = 0;
    for (const cJSON *c = h->root->child; c; c = c->next) count++;
    h->entries = malloc((count ? count : 1) * sizeof *h->entries);
    if (!h->entries) {
        header_free(h);
        return ts_error(TS_ERR_NOMEM, "%s: out of memory for %zu header entries", file, count);
    }
    size_t order = 0;
    for (const cJSON *c = h->root->child; c; c = c->next, order++) {
        if (c->string && strcmp(c->string, "__metadata__") == 0) {
            st = read_metadata(file, c, out);
        } else {
            st = read_entry(file, c, order, &h->entries[h->count]);
            if (st == TS_OK) h->count++;
        }
        if (st != TS_OK) {
            header_free(h);
            return st;
        }
    }

    /* Sorted by offsets, the tensors must tile the data section. */
    qsort(h->entries, h->count, sizeof *h->entries, cmp_entries);
    uint64_t pos = 0;
    for (size_t i = 0; i < h->count; i++) {
        const st_entry *e = &h->entries[i];
        if (e->begin != pos) {
            if (i == 0)
                st = ts_error(TS_ERR_INVALID_ARG,
                              "%s: the first tensor, \"%.200s\", starts at data byte %" PRIu64
                              ", not 0: bytes that belong to no tensor (%s)",
                              file, e->name, e->begin, RECREATE);
            else if (e->begin > pos)
                st = ts_error(TS_ERR_INVALID_ARG,
                              "%s: hole in the data: tensor \"%.200s\" starts at data byte %" PRIu64
                              " but the previous tensor \"%.200s\" ends at %" PRIu64 " (%s)",
                              file, e->name, e->begin, h->entries[i - 1].name, pos, RECREATE);
            else
                st = ts_error(TS_ERR_INVALID_ARG,
                              "%s: overlapping data: tensor \"%.200s\" starts at data byte %" PRIu64
                              " inside tensor \"%.200s\", which ends at %" PRIu64 " (%s)",
                              file, e->name, e->begin, h->entries[i - 1].name, pos, RECREATE);
            header_free(h);
            return st;
        }
        if (e->end > data_len) {
            st = ts_error(TS_ERR_INVALID_ARG,
                          "%s: tensor \"%.200s\" ends at data byte %" PRIu64 " but the data section has only %" PRIu64
                          " bytes: the file is truncated (%s)",
                          file, e->name, e->end, data_len, RECREATE);
            header_free(h);
            return st;
        }
        pos = e->end;
    }
    if (pos != data_len) {
        st = ts_error(TS_ERR_INVALID_ARG,
                      "%s: %" PRIu64 " trailing bytes after the last tensor's data (the tensors cover %" PRIu64
                      " of %" PRIu64 " data bytes; safetensors files must end with the last tensor; %s)",
                      file, data_len - pos, pos, data_len, RECREATE);
        header_free(h);
        return st;
    }
    return TS_OK;
}

/* ---- reading ---------------------------------------------------------- */

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

ts_status ts_safetensors_parse(const void *buf, size_t len, const char *name, ts_dict *out)
{
    ts_dict_init(out);
    const char *file = name ? name : "<memory>";
    const unsigned char *b = buf;
    if (len < 8 || !b)
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: %zu bytes, shorter than the 8-byte header length: truncated or not a safetensors file "
                        "(%s)",
                        file, len, RECREATE);
    uint64_t n = le64(b);
    ts_status st = check_header_len(file, len, n);
    if (st != TS_OK) return st;
    st_header h;
    st = parse_header(file, b + 8, (size_t)n, len - 8 - n, &h, out);
    if (st != TS_OK) {
        ts_dict_free(out);
        return st;
    }
    const unsigned char *data = b + 8 + n;
    for (size_t i = 0; i < h.count && st == TS_OK; i++) {
        const st_entry *e = &h.entries[i];
        size_t nbytes = (size_t)(e->end - e->begin);
        void *p = malloc(nbytes ? nbytes : 1);
        if (!p) {
            st = ts_error(TS_ERR_NOMEM, "%s: tensor \"%.200s\": out of memory for %zu bytes", file, e->name, nbytes);
            break;
        }
        if (nbytes) memcpy(p, data + e->begin, nbytes);
        st = ts_dict_add_owned_unique(out, e->name, e->dtype, e->ndim, e->shape, p);
        if (st != TS_OK) free(p);
    }
    header_free(&h);
    if (st != TS_OK) ts_dict_free(out);
    return st;
}

ts_status ts_safetensors_read(const char *path, ts_dict *out)
{
    ts_dict_init(out);
    FILE *f = fopen(path, "rb");
    if (!f)
        return ts_error(TS_ERR_IO, "%s: cannot open: %s (check the path and its permissions)", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0) {
        ts_status st = ts_error(TS_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        fclose(f);
        return st;
    }
    if (!S_ISREG(sb.st_mode)) {
        fclose(f);
        return ts_error(TS_ERR_IO, "%s: not a regular file (give the path of a .safetensors file)", path);
    }
    uint64_t total = (uint64_t)sb.st_size;
    unsigned char lenbuf[8];
    ts_status st;
    if (total < 8 || fread(lenbuf, 1, 8, f) != 8) {
        fclose(f);
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: %" PRIu64 " bytes, shorter than the 8-byte header length: truncated or not a "
                        "safetensors file (%s)",
                        path, total, RECREATE);
    }
    uint64_t n = le64(lenbuf);
    st = check_header_len(path, total, n);
    if (st != TS_OK) {
        fclose(f);
        return st;
    }
    unsigned char *hdr = malloc(n ? (size_t)n : 1);
    if (!hdr) {
        fclose(f);
        return ts_error(TS_ERR_NOMEM, "%s: out of memory for the %" PRIu64 "-byte header", path, n);
    }
    if (fread(hdr, 1, (size_t)n, f) != n) {
        free(hdr);
        fclose(f);
        return ts_error(TS_ERR_IO, "%s: the file ended while reading its header (was it changed while reading?)",
                        path);
    }
    st_header h;
    st = parse_header(path, hdr, (size_t)n, total - 8 - n, &h, out);
    free(hdr);
    if (st != TS_OK) {
        fclose(f);
        ts_dict_free(out);
        return st;
    }
    /* The entries tile the data section in order, so one sequential pass reads it. */
    for (size_t i = 0; i < h.count && st == TS_OK; i++) {
        const st_entry *e = &h.entries[i];
        size_t nbytes = (size_t)(e->end - e->begin);
        void *p = malloc(nbytes ? nbytes : 1);
        if (!p) {
            st = ts_error(TS_ERR_NOMEM, "%s: tensor \"%.200s\": out of memory for %zu bytes", path, e->name, nbytes);
            break;
        }
        if (fread(p, 1, nbytes, f) != nbytes) {
            free(p);
            st = ts_error(TS_ERR_IO,
                          "%s: tensor \"%.200s\": the file ended while reading its data (was it changed while "
                          "reading?)",
                          path, e->name);
            break;
        }
        st = ts_dict_add_owned_unique(out, e->name, e->dtype, e->ndim, e->shape, p);
        if (st != TS_OK) free(p);
    }
    header_free(&h);
    fclose(f);
    if (st != TS_OK) ts_dict_free(out);
    return st;
}

/* ---- writing ---------------------------------------------------------- */

typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (b->oom) return;
    if (n > SIZE_MAX / 2 - b->len) {
        b->oom = 1;
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

/* A JSON string as serde_json writes it: only '"', '\\' and control
 * characters are escaped (\b \t \n \f \r, else \u00xx in lower case); other
 * bytes, '/', DEL and non-ASCII included, are copied. */
static void sb_json_string(sbuf *b, const char *s)
{
    sb_put(b, "\"", 1);
    const char *run = s;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        const char *esc = NULL;
        char u[7];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\b': esc = "\\b"; break;
        case '\t': esc = "\\t"; break;
        case '\n': esc = "\\n"; break;
        case '\f': esc = "\\f"; break;
        case '\r': esc = "\\r"; break;
        default:
            if (c < 0x20) {
                snprintf(u, sizeof u, "\\u%04x", c);
                esc = u;
            }
        }
        if (esc) {
            sb_put(b, run, (size_t)(s - run));
            sb_str(b, esc);
            run = s + 1;
        }
    }
    sb_put(b, run, (size_t)(s - run));
    sb_put(b, "\"", 1);
}

/* Rank of a dtype in safetensors' Dtype enum (declared in increasing
 * alignment order); the writer sorts by it descending. */
static int dtype_rank(ts_dtype t)
{
    switch (t) {
    case TS_U8: return 4;
    case TS_F16: return 13;
    case TS_BF16: return 14;
    case TS_I32: return 15;
    case TS_F32: return 17;
    case TS_F64: return 19;
    case TS_I64: return 20;
    default: return -1;
    }
}

static int cmp_by_name(const void *a, const void *b)
{
    const ts_named_tensor *x = *(const ts_named_tensor *const *)a, *y = *(const ts_named_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int cmp_write_order(const void *a, const void *b)
{
    const ts_named_tensor *x = *(const ts_named_tensor *const *)a, *y = *(const ts_named_tensor *const *)b;
    int rx = dtype_rank(x->dtype), ry = dtype_rank(y->dtype);
    if (rx != ry) return rx > ry ? -1 : 1;
    return strcmp(x->name, y->name);
}

static ts_status check_text(const char *what, const char *name, const char *s, const char *target)
{
    if (!s) return ts_error(TS_ERR_INVALID_ARG, "%s: %s is NULL", target, what);
    size_t n = strlen(s);
    if (utf8_invalid_at((const unsigned char *)s, n) < n)
        return ts_error(TS_ERR_INVALID_ARG, "%s: %s \"%.200s\" is not valid UTF-8 (safetensors headers are UTF-8)",
                        target, what, name ? name : s);
    return TS_OK;
}

typedef struct prepared {
    const ts_named_tensor **order; /* tensors in file order */
    size_t count;
    sbuf header; /* padded JSON */
    uint64_t data_len;
} prepared;

static void prepared_free(prepared *p)
{
    free(p->order);
    free(p->header.p);
    memset(p, 0, sizeof *p);
}

static ts_status prepare(const ts_dict *d, const char *target, prepared *p)
{
    memset(p, 0, sizeof *p);
    for (size_t i = 0; i < d->meta_count; i++) {
        ts_status st = check_text("metadata key", NULL, d->meta[i].key, target);
        if (st == TS_OK) st = check_text("metadata value of", d->meta[i].key, d->meta[i].value, target);
        if (st != TS_OK) return st;
    }
    p->count = d->count;
    p->order = malloc((d->count ? d->count : 1) * sizeof *p->order);
    if (!p->order) return ts_error(TS_ERR_NOMEM, "%s: out of memory", target);
    for (size_t i = 0; i < d->count; i++) {
        const ts_named_tensor *t = &d->items[i];
        ts_status st = check_text("tensor name", NULL, t->name, target);
        if (st != TS_OK) {
            prepared_free(p);
            return st;
        }
        if (strcmp(t->name, "__metadata__") == 0) {
            prepared_free(p);
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: a tensor is called \"__metadata__\", the name safetensors reserves for metadata; "
                            "rename it",
                            target);
        }
        if (dtype_rank(t->dtype) < 0 || t->ndim < 0 || t->ndim > TS_MAX_DIMS) {
            prepared_free(p);
            return ts_error(TS_ERR_INVALID_ARG, "%s: tensor \"%.200s\": invalid dtype %d or %d dimensions", target,
                            t->name, (int)t->dtype, t->ndim);
        }
        uint64_t numel = 1;
        for (int k = 0; k < t->ndim; k++) {
            if (t->shape[k] < 0 || (t->shape[k] && numel > (uint64_t)SIZE_MAX / 8 / (uint64_t)t->shape[k])) {
                prepared_free(p);
                return ts_error(TS_ERR_INVALID_ARG, "%s: tensor \"%.200s\": invalid shape", target, t->name);
            }
            numel *= (uint64_t)t->shape[k];
        }
        if (numel * ts_dtype_size(t->dtype) != t->nbytes || (t->nbytes && !t->data)) {
            prepared_free(p);
            return ts_error(TS_ERR_INVALID_ARG,
                            "%s: tensor \"%.200s\": holds %zu bytes, but its dtype and shape need %" PRIu64, target,
                            t->name, t->nbytes, numel * ts_dtype_size(t->dtype));
        }
        if (t->nbytes > UINT64_MAX / 2 - p->data_len) {
            prepared_free(p);
            return ts_error(TS_ERR_INVALID_ARG, "%s: the tensors' total size overflows", target);
        }
        p->data_len += t->nbytes;
        p->order[i] = t;
    }
    qsort(p->order, p->count, sizeof *p->order, cmp_by_name);
    for (size_t i = 1; i < p->count; i++) {
        if (strcmp(p->order[i - 1]->name, p->order[i]->name) == 0) {
            ts_status st = ts_error(TS_ERR_INVALID_ARG, "%s: tensor \"%.200s\" appears twice in the dictionary",
                                    target, p->order[i]->name);
            prepared_free(p);
            return st;
        }
    }
    qsort(p->order, p->count, sizeof *p->order, cmp_write_order);

    sbuf *b = &p->header;
    char num[96];
    sb_str(b, "{");
    if (d->meta_count) {
        sb_str(b, "\"__metadata__\":{");
        for (size_t i = 0; i < d->meta_count; i++) {
            if (i) sb_str(b, ",");
            sb_json_string(b, d->meta[i].key);
            sb_str(b, ":");
            sb_json_string(b, d->meta[i].value);
        }
        sb_str(b, "}");
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < p->count; i++) {
        const ts_named_tensor *t = p->order[i];
        if (i || d->meta_count) sb_str(b, ",");
        sb_json_string(b, t->name);
        sb_str(b, ":{\"dtype\":\"");
        sb_str(b, ts_dtype_safetensors_name(t->dtype));
        sb_str(b, "\",\"shape\":[");
        for (int k = 0; k < t->ndim; k++) {
            snprintf(num, sizeof num, "%s%" PRId64, k ? "," : "", t->shape[k]);
            sb_str(b, num);
        }
        snprintf(num, sizeof num, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", offset, offset + t->nbytes);
        sb_str(b, num);
        offset += t->nbytes;
    }
    sb_str(b, "}");
    while (!b->oom && b->len % 8) sb_put(b, " ", 1);
    if (b->oom) {
        prepared_free(p);
        return ts_error(TS_ERR_NOMEM, "%s: out of memory building the header", target);
    }
    if (b->len > TS_SAFETENSORS_MAX_HEADER) {
        size_t len = b->len;
        prepared_free(p);
        return ts_error(TS_ERR_INVALID_ARG,
                        "%s: the header would be %zu bytes, over the %u-byte limit readers accept (too many or too "
                        "long names)",
                        target, len, TS_SAFETENSORS_MAX_HEADER);
    }
    return TS_OK;
}

static void put_le64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

ts_status ts_safetensors_serialize(const ts_dict *d, unsigned char **buf, size_t *len)
{
    *buf = NULL;
    *len = 0;
    prepared p;
    ts_status st = prepare(d, "<memory>", &p);
    if (st != TS_OK) return st;
    if (p.data_len > SIZE_MAX - 8 - p.header.len) {
        prepared_free(&p);
        return ts_error(TS_ERR_NOMEM, "safetensors: the file would not fit in memory");
    }
    size_t total = 8 + p.header.len + (size_t)p.data_len;
    unsigned char *out = malloc(total);
    if (!out) {
        prepared_free(&p);
        return ts_error(TS_ERR_NOMEM, "safetensors: out of memory for %zu bytes", total);
    }
    put_le64(out, p.header.len);
    memcpy(out + 8, p.header.p, p.header.len);
    size_t pos = 8 + p.header.len;
    for (size_t i = 0; i < p.count; i++) {
        if (p.order[i]->nbytes) memcpy(out + pos, p.order[i]->data, p.order[i]->nbytes);
        pos += p.order[i]->nbytes;
    }
    prepared_free(&p);
    *buf = out;
    *len = total;
    return TS_OK;
}

ts_status ts_safetensors_write(const char *path, const ts_dict *d)
{
    prepared p;
    ts_status st = prepare(d, path, &p);
    if (st != TS_OK) return st;
    /* Streamed from the tensors (no second copy of the model in memory),
     * through PATH.tmp and a rename (kernels/outfile.h). */
    ts_outfile o;
    st = ts_outfile_open(&o, path);
    if (st == TS_OK) {
        unsigned char lenbuf[8];
        put_le64(lenbuf, p.header.len);
        ts_outfile_write(&o, lenbuf, 8);
        ts_outfile_write(&o, p.header.p, p.header.len);
        for (size_t i = 0; i < p.count; i++) ts_outfile_write(&o, p.order[i]->data, p.order[i]->nbytes);
        st = ts_outfile_commit(&o);
    }
    prepared_free(&p);
    return st;
}
