/* safetensors reader and writer (huggingface/safetensors format;
 * shared/specs/weight-formats.md section 3).
 *
 *   file = u64 LE header length N ‖ N bytes of UTF-8 JSON ‖ raw data
 *
 * Reading is strict, like the reference Rust reader and stricter where that
 * is cheap:
 *   - N <= 100,000,000 (TS_SAFETENSORS_MAX_HEADER) and 8 + N <= file size;
 *   - the header is valid UTF-8 and one JSON object (trailing spaces, tabs
 *     and newlines allowed: writers pad with spaces); no duplicate keys at
 *     any level; no "\u0000" in strings;
 *   - every number is a plain non-negative integer <= 2^53 (no sign,
 *     fraction, exponent or leading zero);
 *   - "__metadata__" is optional (null = absent) and maps strings to strings;
 *   - every other key is a tensor: an object with exactly "dtype", "shape"
 *     and "data_offsets" (other keys are refused); dtype one of F32 F16 BF16
 *     F64 I64 I32 U8 (other safetensors dtypes are reported as unsupported);
 *     shape at most TS_MAX_DIMS non-negative dimensions ([] = scalar); the
 *     byte count is overflow-checked and must equal end - begin;
 *   - sorted by data_offsets, the tensors cover the data section exactly: the
 *     first begins at 0, each begins where the previous ends (no holes, no
 *     overlaps) and the last ends at the end of the file (no trailing bytes).
 * Nothing is allocated from a size that has not been checked against the
 * bytes actually present.
 *
 * Tensors come back in data order (sorted by data_offsets; tensors with equal
 * offsets, i.e. empty ones, in header order), which for files from
 * safetensors' writer is the order of the header. Metadata keeps header order.
 *
 * Writing produces exactly what safetensors.torch.save_file writes for the
 * same tensors and metadata: tensors sorted by dtype in descending order
 * (I64, F64, F32, I32, BF16, F16, U8), then by name (byte order); compact
 * JSON with "__metadata__" first (omitted when the dictionary has none; its
 * keys in dictionary order), string escapes as serde_json writes them, the
 * header padded with spaces to a multiple of 8. Reading a file that
 * save_file wrote and writing it back gives the identical bytes (one
 * exception: save_file(metadata={}) writes an empty "__metadata__" object,
 * which a dictionary cannot tell from no metadata).
 *
 * Thread safety: calls on different dictionaries may run in parallel, except
 * that cJSON records its parse-error position in a global. */
#ifndef TS_SAFETENSORS_H
#define TS_SAFETENSORS_H

#include <stddef.h>

#include "kernels/status.h"
#include "weights/dict.h"

#define TS_SAFETENSORS_MAX_HEADER 100000000u

/* Parses a whole safetensors file held in memory. `name` is used only in
 * error messages (a path, or "<memory>"). *out is initialized here (it must
 * not hold anything that needs freeing); on success the caller frees it with
 * ts_dict_free, on error it is left empty. */
ts_status ts_safetensors_parse(const void *buf, size_t len, const char *name, ts_dict *out);

/* Reads the file at path. Same rules and ownership as ts_safetensors_parse;
 * tensor data is read straight into the dictionary (the file is not held in
 * memory twice). */
ts_status ts_safetensors_read(const char *path, ts_dict *out);

/* Serializes d into a malloc'ed buffer (*buf, *len): the bytes that
 * ts_safetensors_write would put in the file. The caller frees *buf. */
ts_status ts_safetensors_serialize(const ts_dict *d, unsigned char **buf, size_t *len);

/* Writes d to path atomically: the bytes go to "<path>.tmp", which is
 * fsync'ed and renamed over path; on any error the temporary file is removed
 * and path is left as it was. Tensor names and metadata must be valid UTF-8
 * without NUL; a tensor may not be called "__metadata__". */
ts_status ts_safetensors_write(const char *path, const ts_dict *d);

#endif
