/* Deterministic parameter values shared with tests/make_smp_fixtures.py.
 *
 * The SMP parity fixtures do not ship weights: Python and C both fill every
 * parameter and buffer from the same integer hash, bit for bit, so only
 * inputs and results are committed. For a tensor called NAME, element i:
 *
 *   h    = FNV-1a 64 of NAME's bytes
 *   u    = splitmix64_mix(h + (i + 1) * 0x9E3779B97F4A7C15)   (all mod 2^64)
 *   q    = (int)(u % 2001) - 1000                             in [-1000, 1000]
 *
 * splitmix64_mix(z): z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
 *                    z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31.
 *
 * Values (every one exact in float32: q has 11 bits, scales are powers of 2):
 *   4-D conv weight [o, c, kh, kw]:  q * 2^-(10 + s), s = (bit_length(c*kh*kw) - 1) / 2
 *   BN weight (1-D ".weight"):       1 + q * 2^-12
 *   any ".bias", ".running_mean":    q * 2^-13
 *   ".running_var":                  1 + q * 2^-11
 *   ".num_batches_tracked":          h % 1000   (int64)
 *   the input batch "input":         q * 2^-10
 *   the labels "target":             u % 17 == 0 ? 255 (ignored) : u % classes */
#ifndef TS_SMP_FILL_H
#define TS_SMP_FILL_H

#include <stddef.h>
#include <stdint.h>

#include "nn/unet.h"

uint64_t smp_fill_fnv1a(const char *name);
/* u for element i of NAME (before the modulo). */
uint64_t smp_fill_u(uint64_t name_hash, size_t i);
/* q in [-1000, 1000] for element i of NAME. */
int smp_fill_q(uint64_t name_hash, size_t i);

/* Fills a float tensor by NAME with the rule above; ndim/shape tell a 4-D
 * conv weight from a 1-D vector. */
void smp_fill_f32(const char *name, int ndim, const int *shape, float *out, size_t n);
int64_t smp_fill_counter(const char *name);
void smp_fill_input(float *out, size_t n);
void smp_fill_target(int32_t *out, size_t n, int classes);
/* Every entry of the model's parameter table, by its SMP name. */
void smp_fill_model(ts_unet *m);

#endif
