#include "smp_fill.h"

#include <math.h>
#include <string.h>

uint64_t smp_fill_fnv1a(const char *name)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        h ^= *p;
        h *= 0x100000001b3ull;
    }
    return h;
}

uint64_t smp_fill_u(uint64_t name_hash, size_t i)
{
    uint64_t z = name_hash + ((uint64_t)i + 1) * 0x9E3779B97F4A7C15ull;
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}

int smp_fill_q(uint64_t name_hash, size_t i) { return (int)(smp_fill_u(name_hash, i) % 2001) - 1000; }

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int bit_length(unsigned v)
{
    int n = 0;
    while (v) {
        n++;
        v >>= 1;
    }
    return n;
}

void smp_fill_f32(const char *name, int ndim, const int *shape, float *out, size_t n)
{
    uint64_t h = smp_fill_fnv1a(name);
    float offset = 0.0f;
    int exp2;
    if (ndim == 4) {
        int s = (bit_length((unsigned)(shape[1] * shape[2] * shape[3])) - 1) / 2;
        exp2 = -(10 + s);
    } else if (ends_with(name, ".running_var")) {
        offset = 1.0f;
        exp2 = -11;
    } else if (ends_with(name, ".bias") || ends_with(name, ".running_mean")) {
        exp2 = -13;
    } else { /* a 1-D ".weight": BatchNorm gamma */
        offset = 1.0f;
        exp2 = -12;
    }
    for (size_t i = 0; i < n; i++) out[i] = offset + ldexpf((float)smp_fill_q(h, i), exp2);
}

int64_t smp_fill_counter(const char *name) { return (int64_t)(smp_fill_fnv1a(name) % 1000); }

void smp_fill_input(float *out, size_t n)
{
    uint64_t h = smp_fill_fnv1a("input");
    for (size_t i = 0; i < n; i++) out[i] = ldexpf((float)smp_fill_q(h, i), -10);
}

void smp_fill_target(int32_t *out, size_t n, int classes)
{
    uint64_t h = smp_fill_fnv1a("target");
    for (size_t i = 0; i < n; i++) {
        uint64_t u = smp_fill_u(h, i);
        out[i] = u % 17 == 0 ? 255 : (int32_t)(u % (uint64_t)classes);
    }
}

void smp_fill_model(ts_unet *m)
{
    for (int k = 0; k < m->n_params; k++) {
        const ts_param *p = &m->params[k];
        if (p->kind == TS_PARAM_COUNTER)
            m->counters[p->offset] = smp_fill_counter(p->name);
        else
            smp_fill_f32(p->name, p->ndim, p->shape, ts_unet_param_f32(m, p), p->numel);
    }
}
