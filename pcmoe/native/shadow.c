/* Shadow experts (pcmoe/shadow.py): one token through an int1..int3 bit-plane GLU expert, or a
 * vector-quantised one (vq6..vq8, after pcmoe_shadow_glu).
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

/* Vector-quantised weights [out, in]: each run of 4 inputs v is codebook[code[o][v]] * scale[o][g].
 * A row's codes are a little-endian bit stream, 8 codes in `bits` bytes (code j of a run in bits
 * bits*j ..). So, with table[v][k] = dot(codebook[k], x[4v..4v+3]) computed once per input,
 *     y[o] = sum_g scale[o,g] * sum_{v in g} table[v][code[o][v]]
 * cb: the codebook as float32 structure-of-arrays [4][K]; table: [in/4][K] floats of scratch. */
/* Two rows' sums at once: `BITS` a constant, so the shifts and masks are immediates, and 16 independent
 * sums (per shipped-LM expert in a C harness: 40 us with a runtime `bits` and one row, 25 us with the
 * constant, 19.5 us two rows at a time; an AVX-512 gather of a run's 8 codes measured slower, 32 us) */
#define VQ_ROW(BITS)                                                                                       \
    static void vq_rows_##BITS(const uint8_t *row, size_t stride, const uint16_t *scale, int sstride,      \
                               const float *table, int runs, int groups, int runs_per_group, float *y) {  \
        const int K = 1 << BITS;                                                                           \
        float t0 = 0.0f, t1 = 0.0f;                                                                        \
        for (int g = 0; g < groups; g++) {                                                                 \
            float a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};                        \
            for (int c = g * runs_per_group; c < (g + 1) * runs_per_group; c++) {                          \
                uint64_t r0 = 0, r1 = 0;   /* one 8-byte load per run but in a row's last */                \
                const size_t at = (size_t)c * BITS;                                                        \
                if (c + 1 < runs) {                                                                        \
                    memcpy(&r0, row + at, 8);                                                              \
                    memcpy(&r1, row + stride + at, 8);                                                     \
                } else {                                                                                   \
                    memcpy(&r0, row + at, BITS);                                                           \
                    memcpy(&r1, row + stride + at, BITS);                                                  \
                }                                                                                          \
                const float *t = table + (size_t)c * 8 * K;                                                \
                for (int j = 0; j < 8; j++) {                                                              \
                    a[j] += t[j * K + ((r0 >> (BITS * j)) & (K - 1))];                                     \
                    b[j] += t[j * K + ((r1 >> (BITS * j)) & (K - 1))];                                     \
                }                                                                                          \
            }                                                                                              \
            const float s0 = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));          \
            const float s1 = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));          \
            t0 += s0 * bf16_to_float(scale[g]);                                                            \
            t1 += s1 * bf16_to_float(scale[sstride + g]);                                                  \
        }                                                                                                  \
        y[0] = t0; y[1] = t1;                                                                              \
    }
VQ_ROW(6)
VQ_ROW(7)
VQ_ROW(8)
static void gemv_vq(int bits, const uint8_t *codes, const uint16_t *scale, const float *cb, const float *x,
                    float *table, float *y, int out, int in, int group) {
    const int K = 1 << bits, V = in / 4, runs = V / 8, groups = in / group, runs_per_group = group / 32;
    for (int v = 0; v < V; v++) {
        const float x0 = x[4 * v], x1 = x[4 * v + 1], x2 = x[4 * v + 2], x3 = x[4 * v + 3];
        float *t = table + (size_t)v * K;
        for (int k = 0; k < K; k++) t[k] = cb[k] * x0 + cb[K + k] * x1 + cb[2 * K + k] * x2 + cb[3 * K + k] * x3;
    }
    for (int o = 0; o < out; o += 2) {   /* rows in pairs: out is even (shadow.native_fits checks) */
        const uint8_t *row = codes + (size_t)o * runs * bits;
        const uint16_t *sc = scale + (size_t)o * groups;
        const size_t stride = (size_t)runs * bits;
        if (bits == 6) vq_rows_6(row, stride, sc, groups, table, runs, groups, runs_per_group, y + o);
        else if (bits == 7) vq_rows_7(row, stride, sc, groups, table, runs, groups, runs_per_group, y + o);
        else vq_rows_8(row, stride, sc, groups, table, runs, groups, runs_per_group, y + o);   /* 6..8: VQ_BITS */
    }
}

/* One token through a SiLU GLU vq shadow: x [H] float32 -> y [H] float32. codebook: [K][4] bf16,
 * shared by gate_up [2I, H] and down [H, I]; scratch: at least 3I + 4K + max(H, I) / 4 * K floats. */
EXPORT void pcmoe_shadow_vq_glu(int bits, const uint16_t *codebook, const uint8_t *gu_codes, const uint16_t *gu_scale,
                                int gu_group, const uint8_t *dn_codes, const uint16_t *dn_scale, int dn_group,
                                const float *x, float *y, int hidden, int inter, float *scratch) {
    const int K = 1 << bits;
    float *gate_up = scratch;                 /* [2I] */
    float *h = scratch + 2 * inter;           /* [I] */
    float *cb = h + inter;                    /* [4][K] */
    float *table = cb + 4 * K;                /* [max(H, I) / 4][K] */
    for (int k = 0; k < K; k++)
        for (int d = 0; d < 4; d++) cb[d * K + k] = bf16_to_float(codebook[4 * k + d]);
    gemv_vq(bits, gu_codes, gu_scale, cb, x, table, gate_up, 2 * inter, hidden, gu_group);
    for (int i = 0; i < inter; i++) {
        float g = gate_up[i];
        h[i] = g / (1.0f + expf(-g)) * gate_up[inter + i];
    }
    gemv_vq(bits, dn_codes, dn_scale, cb, h, table, y, hidden, inter, dn_group);
}

/* Many tokens through one shadow: its weights dequantised once to bf16 rows (then an ordinary
 * GEMM), the twins of shadow.dequantize / dequantize_vq: the same float32 products and sums, each
 * rounded once to bf16 (round to nearest even, as torch's conversion). */

/* rows [r0, r1) of bit-plane weights [out, in] -> dst [r1 - r0][in] bf16; 16 weights at a time: each
 * plane's 16 bits are a mask adding 2^b to the codes, then code * scale + minimum */
EXPORT void pcmoe_shadow_dequant_planes(int bits, const uint8_t *planes, const uint16_t *scale_min, int out, int in,
                                        int group, int r0, int r1, uint16_t *dst) {
    const int cols = in / 8, groups = in / group;
    for (int o = r0; o < r1; o++) {
        uint16_t *row = dst + (size_t)(o - r0) * in;
        for (int g = 0; g < groups; g++) {
            const __m512 scale = _mm512_set1_ps(bf16_to_float(scale_min[((size_t)o * groups + g) * 2]));
            const __m512 minimum = _mm512_set1_ps(bf16_to_float(scale_min[((size_t)o * groups + g) * 2 + 1]));
            for (int i = g * group; i < (g + 1) * group; i += 16) {
                __m512 code = _mm512_setzero_ps();
                for (int b = 0; b < bits; b++) {
                    uint16_t m;
                    memcpy(&m, planes + ((size_t)b * out + o) * cols + i / 8, 2);
                    code = _mm512_mask_add_ps(code, (__mmask16)m, code, _mm512_set1_ps((float)(1 << b)));
                }
                const __m512 w = _mm512_add_ps(_mm512_mul_ps(code, scale), minimum);
                _mm256_storeu_si256((__m256i *)(row + i), (__m256i)_mm512_cvtneps_pbh(w));
            }
        }
    }
}

/* rows [r0, r1) of vq weights [out, in] (codes a bit stream per row; cb: the codebook as float32
 * [K][4]) -> dst bf16; a run of 8 codes is 32 weights, two vectors of 4 codebook rows each */
EXPORT void pcmoe_shadow_dequant_vq(int bits, const uint8_t *codes, const uint16_t *scale, const float *cb, int in,
                                    int group, int r0, int r1, uint16_t *dst) {
    const int runs = in / 32, groups = in / group;
    const uint64_t mask = ((uint64_t)1 << bits) - 1;
    for (int o = r0; o < r1; o++) {
        const uint8_t *row = codes + (size_t)o * runs * bits;
        uint16_t *out = dst + (size_t)(o - r0) * in;
        for (int c = 0; c < runs; c++) {
            uint64_t run = 0;
            memcpy(&run, row + (size_t)c * bits, (size_t)bits);
            const __m512 s = _mm512_set1_ps(bf16_to_float(scale[(size_t)o * groups + 32 * c / group]));
            __m512 half[2];
            for (int h = 0; h < 2; h++) {
                __m512 v = _mm512_setzero_ps();
                v = _mm512_insertf32x4(v, _mm_loadu_ps(cb + 4 * ((run >> (bits * (4 * h + 0))) & mask)), 0);
                v = _mm512_insertf32x4(v, _mm_loadu_ps(cb + 4 * ((run >> (bits * (4 * h + 1))) & mask)), 1);
                v = _mm512_insertf32x4(v, _mm_loadu_ps(cb + 4 * ((run >> (bits * (4 * h + 2))) & mask)), 2);
                v = _mm512_insertf32x4(v, _mm_loadu_ps(cb + 4 * ((run >> (bits * (4 * h + 3))) & mask)), 3);
                half[h] = _mm512_mul_ps(v, s);
            }
            _mm256_storeu_si256((__m256i *)(out + 32 * c), (__m256i)_mm512_cvtneps_pbh(half[0]));
            _mm256_storeu_si256((__m256i *)(out + 32 * c + 16), (__m256i)_mm512_cvtneps_pbh(half[1]));
        }
    }
}

EXPORT int pcmoe_shadow_abi(void) { return 4; }
