/* Shadow experts (pcmoe/shadow.py): one token through an int2 / int3 bit-plane GLU expert.
 *
 * Weights [out, in] are b bit-planes [b][out][in/8] (bit j of byte c = weight 8c+j) and per group of
 * `group` input columns a bf16 (scale, minimum): w = code * scale + minimum. So
 *     y[o] = sum_g scale[o,g] * sum_b 2^b * sum_{i in g, bit b of w[o,i]} x[i]  +  minimum[o,g] * sum_{i in g} x[i]
 * The inner sums are masked adds of x (16 weights = 16 bits = one AVX-512 mask): no code is ever
 * unpacked. The eager twin is shadow.ShadowBank.forward_one (dequantise + the ordinary expert). */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* y[out] = W x for bit-plane weights; x [in] float32, xsum [in/group] the sums of x per group. */
static void gemv_planes(int bits, const uint8_t *planes, const uint16_t *scale_min, const float *x,
                        const float *xsum, float *y, int out, int in, int group) {
    const int cols = in / 8, groups = in / group, chunks = group / 16;
    for (int o = 0; o < out; o++) {
        __m512 total = _mm512_setzero_ps();
        float offset = 0.0f;
        for (int g = 0; g < groups; g++) {
            __m512 acc = _mm512_setzero_ps();
            for (int b = 0; b < bits; b++) {
                const uint8_t *row = planes + ((size_t)b * out + o) * cols + (size_t)g * group / 8;
                const float weight = (float)(1 << b);
                __m512 part = _mm512_setzero_ps();
                for (int c = 0; c < chunks; c++) {
                    uint16_t m;
                    memcpy(&m, row + 2 * c, 2);
                    part = _mm512_mask_add_ps(part, (__mmask16)m, part, _mm512_loadu_ps(x + g * group + 16 * c));
                }
                acc = _mm512_fmadd_ps(part, _mm512_set1_ps(weight), acc);
            }
            const uint16_t *sm = scale_min + ((size_t)o * groups + g) * 2;
            total = _mm512_fmadd_ps(acc, _mm512_set1_ps(bf16_to_float(sm[0])), total);
            offset += bf16_to_float(sm[1]) * xsum[g];
        }
        y[o] = _mm512_reduce_add_ps(total) + offset;
    }
}

static void group_sums(const float *x, float *sums, int in, int group) {
    for (int g = 0; g < in / group; g++) {
        float s = 0.0f;
        for (int i = 0; i < group; i++) s += x[g * group + i];
        sums[g] = s;
    }
}

/* One token through a SiLU GLU shadow: x [H] float32 -> y [H] float32.
 * gate_up: [2I, H] planes, down: [H, I] planes; scratch: at least 3I + H/8 + I/8 + 2 floats. */
EXPORT void pcmoe_shadow_glu(int bits, const uint8_t *gu_planes, const uint16_t *gu_sm, int gu_group,
                             const uint8_t *dn_planes, const uint16_t *dn_sm, int dn_group, const float *x,
                             float *y, int hidden, int inter, float *scratch) {
    float *gate_up = scratch;                 /* [2I] */
    float *h = scratch + 2 * inter;           /* [I] */
    float *xsum = h + inter;                  /* [H / gu_group] */
    float *hsum = xsum + hidden / gu_group + 1;
    group_sums(x, xsum, hidden, gu_group);
    gemv_planes(bits, gu_planes, gu_sm, x, xsum, gate_up, 2 * inter, hidden, gu_group);
    for (int i = 0; i < inter; i++) {
        float g = gate_up[i];
        h[i] = g / (1.0f + expf(-g)) * gate_up[inter + i];
    }
    group_sums(h, hsum, inter, dn_group);
    gemv_planes(bits, dn_planes, dn_sm, h, hsum, y, hidden, inter, dn_group);
}

EXPORT int pcmoe_shadow_abi(void) { return 1; }
