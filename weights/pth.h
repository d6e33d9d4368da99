/* PyTorch torch.save files (.pth / .pt / .ckpt, the ZIP format of PyTorch
 * >= 1.6): a reader that never executes anything and a writer whose output
 * torch.load(path, weights_only=True) accepts.
 *
 * Reading (specs/weight-formats.md section 1):
 *   - ZIP: stored (uncompressed) entries only, sizes and CRC-32 from the
 *     central directory, ZIP64 records and extra fields, the archive prefix
 *     taken from the first entry. Every offset is bounds-checked.
 *   - data.pkl is interpreted by a restricted unpickler modelled on
 *     torch.load(weights_only=True): only an allowlist of globals (OrderedDict,
 *     torch._utils._rebuild_*, torch.*Storage, dtypes, ...) is accepted, and
 *     they become inert tags; REDUCE is interpreted for a handful of them.
 *     Anything else (os.system, a model class, an unknown opcode) refuses the
 *     whole file, naming the global or opcode, before anything is used.
 *   - The tensors come from the top-level state dict, or from a checkpoint
 *     dict's "state_dict", "model_state_dict", "model", "net" or "weights"
 *     entry (first that is a dict of tensors). Other checkpoint entries (epoch,
 *     optimizer state, hyper_parameters) are parsed as inert values and
 *     skipped. When the state dict came from inside a checkpoint and EVERY key
 *     starts with "model." (a Lightning module holding the net as self.model),
 *     the prefix is stripped; if only some keys have it, nothing is stripped.
 *   - float32/float16/bfloat16/float64/int64/int32/uint8 tensors; views
 *     (storage offsets, any strides, shared storages) are copied out into
 *     contiguous row-major data; byteorder "big" files are byte-swapped.
 *   - The legacy (pre-1.6, non-zip) format and TorchScript archives are
 *     refused with a message saying how to re-save the file.
 *
 * Writing: an OrderedDict of tensors (protocol-2 pickle, one data/N record per
 * tensor, byteorder "little", version "3\n"), every record stored and 64-byte
 * aligned as torch writes them, ZIP64 end records always, ZIP64 extra fields
 * when a record or offset passes 4 GiB. The file is written to PATH.tmp and
 * renamed over PATH. */
#ifndef TS_PTH_H
#define TS_PTH_H

#include <stddef.h>

#include "weights/dict.h"

/* What the reader found, for messages ("loaded 278 tensors from the
 * checkpoint's state_dict"). */
typedef struct ts_pth_info {
    char source[32];          /* "" for a top-level state dict, else the checkpoint key used */
    char stripped_prefix[16]; /* "model." when that prefix was removed from every key, else "" */
    int version;              /* the archive's version record */
    int big_endian;           /* 1 when the byteorder record said "big" (values were swapped) */
    size_t tensors;           /* tensors added to the dictionary */
} ts_pth_info;

/* Reads the tensors of a torch.save file into *out (in file order). *out must
 * have been set up with ts_dict_init; tensors are appended, and on failure
 * *out is left as it was. Messages name the file and, where it applies, the
 * key or record and what to do. */
ts_status ts_pth_read(const char *path, ts_dict *out);
ts_status ts_pth_read_ex(const char *path, ts_dict *out, ts_pth_info *info);

/* The same from memory (the fuzzer's entry point); name_for_messages stands
 * for the path in messages. info may be NULL. */
ts_status ts_pth_parse(const void *buf, size_t len, const char *name_for_messages, ts_dict *out);
ts_status ts_pth_parse_ex(const void *buf, size_t len, const char *name_for_messages, ts_dict *out,
                          ts_pth_info *info);

/* Writes d as a torch.save state dict (see above). Names must be non-empty
 * valid UTF-8. */
ts_status ts_pth_write(const char *path, const ts_dict *d);

/* Writer options for tests: force_zip64 gives every entry ZIP64 extra fields
 * (sizes and offsets 0xFFFFFFFF in the fixed fields) as torch does only past
 * 4 GiB, so that the reader's ZIP64 path can be tested with small files. */
typedef struct ts_pth_write_opts {
    int force_zip64;
} ts_pth_write_opts;
ts_status ts_pth_write_ex(const char *path, const ts_dict *d, const ts_pth_write_opts *o);

/* CRC-32 (ZIP / zlib polynomial) of n bytes, continuing from crc (0 to start). */
unsigned long ts_crc32(unsigned long crc, const void *p, size_t n);

#endif
