/* Host conversions between float32 and the half types (kernels/tensor.h),
 * with the GPU's rounding: round to nearest, ties to even, as CUDA's
 * __float2bfloat16_rn and __float2half_rn. Widening is exact. The CPU
 * backend's half ops and the tests use them; the CUDA backend uses CUDA's
 * own intrinsics, which round the same way. */
#ifndef TS_HALF_H
#define TS_HALF_H

#include <stdint.h>
#include <string.h>

#include "tensor.h"

static inline uint32_t ts_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float ts_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* bfloat16 is the top half of a float32. */
static inline float ts_bf16_to_f32(uint16_t h) { return ts_bits_f32((uint32_t)h << 16); }

static inline uint16_t ts_f32_to_bf16(float f)
{
    uint32_t u = ts_f32_bits(f);
    /* Every NaN becomes the canonical 0x7fff, as the GPU's cvt.rn.bf16.f32 makes it. */
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    /* Adding 0x7fff plus the lowest kept bit rounds half to even; a carry
     * into the exponent is the right result (up to infinity). */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* IEEE binary16: gcc's _Float16 converts with round-to-nearest-even
 * (subnormals and overflow to infinity included). */
static inline float ts_f16_to_f32(uint16_t h)
{
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

static inline uint16_t ts_f32_to_f16(float f)
{
    if (f != f) return 0x7fffu; /* the GPU's canonical NaN (cvt.rn.f16.f32) */
    _Float16 v = (_Float16)f;
    uint16_t h;
    memcpy(&h, &v, sizeof h);
    return h;
}

static inline float ts_half_to_f32(ts_dtype t, uint16_t h) { return t == TS_BF16 ? ts_bf16_to_f32(h) : ts_f16_to_f32(h); }
static inline uint16_t ts_f32_to_half(ts_dtype t, float f) { return t == TS_BF16 ? ts_f32_to_bf16(f) : ts_f32_to_f16(f); }

#endif
