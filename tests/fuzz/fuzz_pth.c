/* libFuzzer target for the torch.save reader (weights/pth.c): any input must
 * be either read or refused with a message, never crash, leak or read out of
 * bounds. Most seeds have their CRC-32 fields zeroed (what
 * torch.serialization.set_crc32_options(False) writes), so that mutations of
 * data.pkl reach the unpickler instead of stopping at the CRC check.
 *
 * Seeds: tests/fuzz/corpus/fuzz_pth/ (small torch.save files from
 * tests/fixtures/make_pth_fixtures.py and files written by ts_pth_write). */
// fuzz-sources: weights/pth.c weights/dict.c kernels/status.c kernels/tensor.c kernels/outfile.c
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "weights/pth.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ts_dict d;
    ts_dict_init(&d);
    if (ts_pth_parse(data, size, "fuzz", &d) == TS_OK) {
        /* Touch every byte handed out, so that a wrong nbytes shows up under ASan. */
        volatile unsigned char sink = 0;
        for (size_t i = 0; i < d.count; i++) {
            const unsigned char *p = d.items[i].data;
            if (d.items[i].nbytes != ts_named_numel(&d.items[i]) * ts_dtype_size(d.items[i].dtype)) __builtin_trap();
            for (size_t k = 0; k < d.items[i].nbytes; k++) sink ^= p[k];
        }
        (void)sink;
    } else if (ts_last_error()[0] == '\0') {
        __builtin_trap(); /* a refusal must say why */
    }
    ts_dict_free(&d);
    ts_clear_error();
    return 0;
}
