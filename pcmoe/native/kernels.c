/* Batch-1 decode kernels for pcmoe: matrix-vector products over bf16, int8 and int4 weights,
 * the fused GLU expert, RMSNorm and single-query attention, for x86-64 with AVX-512 (BF16).
 *
 * Why: at batch 1 every projection is a matrix-vector product, bound by memory bandwidth; torch's
 * CPU bf16 path reaches 2-10 GB/s on the small shapes of MoE experts where memory delivers ~40.
 * These kernels read each weight once with 512-bit loads and accumulate in float32.
 *
 * Layouts are those of pcmoe's slot banks (pcmoe/moe.py, pcmoe/quant.py):
 *   bf16   W [out, in] row-major, as uint16 bit patterns
 *   int8   q [out, in] int8 row-major, one scale per output row (w = q * s)
 *   int4   torch's CPU int4pack: q [out/64 blocks][in][32 bytes], byte j of (block, k) holds row
 *          64*block + j (low nibble) and row 64*block + 32 + j (high nibble) at column k; per group
 *          of `group` columns a (scale, zero) pair per row, sz [in/group, out, 2]: w = (q - 8) s + z
 * Scales may be bf16 or float32 (`scale_f32`). Large matrix-vector products are split by rows over
 * a small pool of worker threads (pcmoe_set_threads; the caller works too): pcmoe calls these from
 * the decode loop, where torch's own threads are idle. Workers spin briefly between jobs (a decode
 * step issues one every few microseconds), then sleep.
 *
 * Dimension legend: H hidden, I expert intermediate, D head dim, P cached positions.
 */

#define _GNU_SOURCE
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define EXPORT __attribute__((visibility("default")))

int EXPORT pcmoe_abi_version(void) { return 3; }

int EXPORT pcmoe_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl");
}

/* -- conversions -------------------------------------------------------------------------------- */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static void f32_to_bf16_n(const float *src, uint16_t *dst, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
    for (; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

void EXPORT pcmoe_to_bf16(const float *src, uint16_t *dst, int n) { f32_to_bf16_n(src, dst, n); }

static inline float scale_at(const void *s, int i, int scale_f32) {
    return scale_f32 ? ((const float *)s)[i] : bf16_to_f32(((const uint16_t *)s)[i]);
}


/* -- the worker pool -------------------------------------------------------------------------- */

#define MAX_THREADS 64
typedef void (*range_fn)(void *arg, int begin, int end);

static struct {
    int threads;                      /* including the caller */
    pthread_t ids[MAX_THREADS];
    atomic_int generation;            /* bumped for each job */
    atomic_int remaining;             /* workers still busy with the current job */
    range_fn fn;
    void *arg;
    int total, align;
    atomic_flag busy;                 /* one job at a time; another caller meanwhile runs serially */
} pool = {.threads = 1, .busy = ATOMIC_FLAG_INIT};

static void job_range(int part, int parts, int total, int align, int *begin, int *end) {
    int units = (total + align - 1) / align;
    int b = units * part / parts, e = units * (part + 1) / parts;
    *begin = b * align;
    *end = e * align < total ? e * align : total;
}

static int worker_start_generation[MAX_THREADS];

static void *worker(void *arg) {
    /* the generation at creation, read by the creator: a job posted before this thread runs is not missed */
    int me = (int)(intptr_t)arg, seen = worker_start_generation[me];
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen) {
            if (++spins < 200000) {
                _mm_pause();
            } else {  /* idle: sleep in short naps instead of spinning */
                struct timespec nap = {0, 200000};
                nanosleep(&nap, NULL);
            }
        }
        seen = atomic_load(&pool.generation);
        if (me >= pool.threads) continue;  /* the pool was made smaller: sit this job out */
        int b, e;
        job_range(me, pool.threads, pool.total, pool.align, &b, &e);
        if (b < e) pool.fn(pool.arg, b, e);
        atomic_fetch_sub_explicit(&pool.remaining, 1, memory_order_release);
    }
    return NULL;
}

/* Run fn over [0, total) split into `threads` parts aligned to `align`; the caller takes part 0. */
static void parallel_for(range_fn fn, void *arg, int total, int align, size_t bytes) {
    if (pool.threads <= 1 || bytes < (96u << 10) || total < 2 * align || atomic_flag_test_and_set(&pool.busy)) {
        fn(arg, 0, total);
        return;
    }
    pool.fn = fn; pool.arg = arg; pool.total = total; pool.align = align;
    atomic_store(&pool.remaining, pool.threads - 1);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    int b, e;
    job_range(0, pool.threads, total, align, &b, &e);
    if (b < e) fn(arg, b, e);
    while (atomic_load_explicit(&pool.remaining, memory_order_acquire) > 0) _mm_pause();
    atomic_flag_clear(&pool.busy);
}

/* Threads for the large products (1 = the caller only). Workers are started once, never stopped. */
int EXPORT pcmoe_set_threads(int n) {
    static int started = 1;
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    for (; started < n; started++) {
        worker_start_generation[started] = atomic_load(&pool.generation);
        if (pthread_create(&pool.ids[started], NULL, worker, (void *)(intptr_t)started) != 0) break;
    }
    pool.threads = n < started ? n : started;
    return pool.threads;
}

/* -- bf16 weights ------------------------------------------------------------------------------- */

/* y[r0:r1] = W[r0:r1, :] . x; x in bf16 (pairs feed vdpbf16ps), accumulation in float32. */
static void gemv_bf16_rows(const uint16_t *W, const uint16_t *x, float *y, int r0, int out, int in) {
    int main = in & ~31;
    int r = r0;
    for (; r + 4 <= out; r += 4) {
        const uint16_t *w0 = W + (size_t)r * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < main; k += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + k), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + k), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + k), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + k), xv);
        }
        float s0 = _mm512_reduce_add_ps(a0), s1 = _mm512_reduce_add_ps(a1);
        float s2 = _mm512_reduce_add_ps(a2), s3 = _mm512_reduce_add_ps(a3);
        for (int k = main; k < in; k++) {
            float xk = bf16_to_f32(x[k]);
            s0 += bf16_to_f32(w0[k]) * xk; s1 += bf16_to_f32(w1[k]) * xk;
            s2 += bf16_to_f32(w2[k]) * xk; s3 += bf16_to_f32(w3[k]) * xk;
        }
        y[r] = s0; y[r + 1] = s1; y[r + 2] = s2; y[r + 3] = s3;
    }
    for (; r < out; r++) {
        const uint16_t *w = W + (size_t)r * in;
        __m512 a = _mm512_setzero_ps();
        for (int k = 0; k < main; k += 32)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
        float s = _mm512_reduce_add_ps(a);
        for (int k = main; k < in; k++) s += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
        y[r] = s;
    }
}

typedef struct { const void *w, *s; const void *x; float *y; int in, scale_f32, group, out; } gemv_job;

static void bf16_range(void *a, int b, int e) {
    gemv_job *j = a;
    gemv_bf16_rows(j->w, j->x, j->y, b, e, j->in);
}

/* y[out] = W[out, in] . x[in], rows split over the pool. */
static void gemv_bf16(const uint16_t *W, const uint16_t *x, float *y, int out, int in) {
    gemv_job j = {.w = W, .x = x, .y = y, .in = in};
    parallel_for(bf16_range, &j, out, 4, (size_t)out * in * 2);
}

/* y = W x (+ bias) for `rows` input vectors; y in float32 or bf16 (y_bf16 != 0). */
void EXPORT pcmoe_linear_bf16(const uint16_t *W, const uint16_t *bias, const uint16_t *x, void *y, int rows,
                              int out, int in, int y_bf16, float *scratch) {
    for (int t = 0; t < rows; t++) {
        float *acc = y_bf16 ? scratch : (float *)y + (size_t)t * out;
        gemv_bf16(W, x + (size_t)t * in, acc, out, in);
        if (bias)
            for (int i = 0; i < out; i++) acc[i] += bf16_to_f32(bias[i]);
        if (y_bf16) f32_to_bf16_n(acc, (uint16_t *)y + (size_t)t * out, out);
    }
}

/* -- int8 weights (one scale per output row) -------------------------------------------------- */

static void gemv_int8_rows(const int8_t *q, const void *s, int scale_f32, const float *x, float *y, int r0, int out,
                           int in) {
    int main = in & ~15;
    for (int r = r0; r < out; r++) {
        const int8_t *w = q + (size_t)r * in;
        __m512 a = _mm512_setzero_ps();
        for (int k = 0; k < main; k += 16) {
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
            a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + k), a);
        }
        float acc = _mm512_reduce_add_ps(a);
        for (int k = main; k < in; k++) acc += (float)w[k] * x[k];
        y[r] = acc * scale_at(s, r, scale_f32);
    }
}

static void int8_range(void *a, int b, int e) {
    gemv_job *j = a;
    gemv_int8_rows(j->w, j->s, j->scale_f32, j->x, j->y, b, e, j->in);
}

static void gemv_int8(const int8_t *q, const void *s, int scale_f32, const float *x, float *y, int out, int in) {
    gemv_job j = {.w = q, .s = s, .x = x, .y = y, .in = in, .scale_f32 = scale_f32};
    parallel_for(int8_range, &j, out, 4, (size_t)out * in);
}

/* -- int4 weights (torch's CPU int4pack layout, see the top) ----------------------------------- */

static void gemv_int4_rows(const uint8_t *q, const void *sz, int scale_f32, const float *x, float *y, int r0, int r1,
                           int out, int in, int group) {
    const __m512i low = _mm512_set1_epi32(0x0f);
    int groups = in / group;
    for (int b = r0 / 64; b < r1 / 64; b++) {
        const uint8_t *blk = q + (size_t)b * 64 * (in / 2);
        __m512 y0 = _mm512_setzero_ps(), y1 = y0, y2 = y0, y3 = y0;     /* rows 0-15, 16-31, 32-47, 48-63 */
        for (int g = 0; g < groups; g++) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0; /* sum over the group of q x */
            float xs = 0.f;
            for (int k = g * group; k < (g + 1) * group; k++) {
                const uint8_t *p = blk + (size_t)k * 32;
                __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));        /* rows j, j+32 */
                __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16)));
                __m512 xk = _mm512_set1_ps(x[k]);
                xs += x[k];
                a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b0, low)), xk, a0);
                a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b1, low)), xk, a1);
                a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)), xk, a2);
                a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4)), xk, a3);
            }
            /* w = (q - 8) s + z:  sum w x = s (sum q x - 8 sum x) + z sum x */
            float sc[64], ze[64];
            for (int j = 0; j < 64; j++) {
                size_t i = ((size_t)g * out + 64 * b + j) * 2;
                sc[j] = scale_at(sz, i, scale_f32);
                ze[j] = scale_at(sz, i + 1, scale_f32);
            }
            __m512 eight_xs = _mm512_set1_ps(8.f * xs), vxs = _mm512_set1_ps(xs);
            y0 = _mm512_add_ps(y0, _mm512_fmadd_ps(_mm512_loadu_ps(ze), vxs,
                                                    _mm512_mul_ps(_mm512_loadu_ps(sc), _mm512_sub_ps(a0, eight_xs))));
            y1 = _mm512_add_ps(y1, _mm512_fmadd_ps(_mm512_loadu_ps(ze + 16), vxs,
                                                    _mm512_mul_ps(_mm512_loadu_ps(sc + 16), _mm512_sub_ps(a1, eight_xs))));
            y2 = _mm512_add_ps(y2, _mm512_fmadd_ps(_mm512_loadu_ps(ze + 32), vxs,
                                                    _mm512_mul_ps(_mm512_loadu_ps(sc + 32), _mm512_sub_ps(a2, eight_xs))));
            y3 = _mm512_add_ps(y3, _mm512_fmadd_ps(_mm512_loadu_ps(ze + 48), vxs,
                                                    _mm512_mul_ps(_mm512_loadu_ps(sc + 48), _mm512_sub_ps(a3, eight_xs))));
        }
        _mm512_storeu_ps(y + 64 * b, y0);
        _mm512_storeu_ps(y + 64 * b + 16, y1);
        _mm512_storeu_ps(y + 64 * b + 32, y2);
        _mm512_storeu_ps(y + 64 * b + 48, y3);
    }
}

static void int4_range(void *a, int b, int e) {
    gemv_job *j = a;
    gemv_int4_rows(j->w, j->s, j->scale_f32, j->x, j->y, b, e, j->out, j->in, j->group);
}

static void gemv_int4(const uint8_t *q, const void *sz, int scale_f32, const float *x, float *y, int out, int in,
                      int group) {
    gemv_job j = {.w = q, .s = sz, .x = x, .y = y, .in = in, .scale_f32 = scale_f32, .group = group, .out = out};
    parallel_for(int4_range, &j, out, 64, (size_t)out * in / 2);
}

/* -- quantised weights with AVX-512 VNNI: int8 activations, integer dot products -------------- */

/* The float32 kernels above convert every weight to float: 3-4 instructions per weight, so they
 * run at a fraction of the bandwidth their bytes would allow. Here the activation is quantised
 * once per product, symmetrically per block of 32 (xq = round(x 127 / max|x|), d = max|x| / 127),
 * and vpdpbusd multiplies 64 weight bytes by 64 activation bytes in one instruction; the block
 * scales are applied once per block. This approximates the product (the activation is rounded
 * to 8 bits, as llama.cpp does for its q8/q4 kernels); pcmoe_quantize_activation exposes the
 * rounding so the tests can check the bound and the exact twin (ops.quantize_activation). */

#define ACT_BLOCK 32
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

int EXPORT pcmoe_vnni_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
}

static int use_vnni = 0;   /* set by pcmoe_use_vnni once the caller has checked the CPU */

int EXPORT pcmoe_use_vnni(int on) {
    use_vnni = on && pcmoe_vnni_supported();
    return use_vnni;
}

/* Activation x[n] -> xq [ceil(n/64)*64] int8 (zero-padded), d [blocks] (block scales) and
 * xs [blocks] (d * sum of the block's xq, for the int4 zero points). */
static void quantize_act(const float *x, int n, int8_t *xq, float *d, float *xs) {
    int blocks = (n + ACT_BLOCK - 1) / ACT_BLOCK, padded = (n + 63) & ~63;
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int b = 0; b < n / ACT_BLOCK; b++) {   /* whole blocks, 16 lanes at a time: the same float ops */
        const float *p = x + b * ACT_BLOCK;
        __m512 v0 = _mm512_loadu_ps(p), v1 = _mm512_loadu_ps(p + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        __m512 vi = _mm512_set1_ps(inv);
        /* round to nearest even (the default rounding mode), as nearbyintf below and torch.round */
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vi)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vi));
        __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
        q0 = _mm512_max_epi32(_mm512_min_epi32(q0, lim), nlim);
        q1 = _mm512_max_epi32(_mm512_min_epi32(q1, lim), nlim);
        _mm_storeu_si128((__m128i *)(xq + b * ACT_BLOCK), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + b * ACT_BLOCK + 16), _mm512_cvtepi32_epi8(q1));
        d[b] = amax / 127.f;
        xs[b] = d[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
    for (int b = n / ACT_BLOCK; b < blocks; b++) {   /* the last, partial block */
        int k0 = b * ACT_BLOCK, k1 = k0 + ACT_BLOCK < n ? k0 + ACT_BLOCK : n;
        float amax = 0.f;
        for (int k = k0; k < k1; k++) amax = fmaxf(amax, fabsf(x[k]));
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int k = k0; k < k1; k++) {
            int q = (int)nearbyintf(x[k] * inv);   /* round half to even, as torch.round */
            q = q > 127 ? 127 : q < -127 ? -127 : q;
            xq[k] = (int8_t)q;
            sum += q;
        }
        d[b] = amax / 127.f;
        xs[b] = d[b] * (float)sum;
    }
    for (int k = n; k < padded; k++) xq[k] = 0;
}

void EXPORT pcmoe_quantize_activation(const float *x, int n, int8_t *xq, float *d, float *xs) {
    quantize_act(x, n, xq, d, xs);
}

/* int8 weights [out, in], one scale per row. vpdpbusd takes unsigned x signed bytes: the
 * activation goes in as xq + 128 and the 128 * sum(w) this adds is taken off per block. */
typedef struct { const int8_t *q; const void *s; int scale_f32; const uint8_t *xu; const float *dv; float *y; int in; }
    int8_vnni_job;

VNNI static void int8_vnni_range(void *arg, int r0, int r1) {
    /* One row at a time: a single sequential stream from memory. Interleaving four rows (as the
     * bf16 kernel does) ran at half the bandwidth here, and masked loads that miss the cache
     * stall: only the last, partial chunk is loaded masked. */
    int8_vnni_job *j = arg;
    int in = j->in, full = in / 64;
    __mmask64 tail = ((__mmask64)1 << (in & 63)) - 1;
    const __m512i zero = _mm512_setzero_si512(), c128 = _mm512_set1_epi8((char)0x80);
#define DOT(v, c) _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_dpbusd_epi32(zero, _mm512_loadu_si512(j->xu + 64 * (c)), v), \
                                                      _mm512_dpbusd_epi32(zero, c128, v)))
    for (int r = r0; r < r1; r++) {
        const int8_t *w = j->q + (size_t)r * in;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;   /* two chains: the fma latency is not the limit */
        int c = 0;
        for (; c + 2 <= full; c += 2) {
            __m512i v0 = _mm512_loadu_si512(w + 64 * c), v1 = _mm512_loadu_si512(w + 64 * c + 64);
            a0 = _mm512_fmadd_ps(DOT(v0, c), _mm512_loadu_ps(j->dv + 16 * c), a0);
            a1 = _mm512_fmadd_ps(DOT(v1, c + 1), _mm512_loadu_ps(j->dv + 16 * c + 16), a1);
        }
        if (c < full) {
            __m512i v = _mm512_loadu_si512(w + 64 * c);
            a0 = _mm512_fmadd_ps(DOT(v, c), _mm512_loadu_ps(j->dv + 16 * c), a0);
            c++;
        }
        if (in & 63) {
            __m512i v = _mm512_maskz_loadu_epi8(tail, w + 64 * c);
            a1 = _mm512_fmadd_ps(DOT(v, c), _mm512_loadu_ps(j->dv + 16 * c), a1);
        }
        j->y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale_at(j->s, r, j->scale_f32);
    }
#undef DOT
}

/* int4 weights in torch's int4pack layout (see the top), groups of 32 columns. Four columns of a
 * 64-row block are 128 bytes; two byte permutes gather each row's four nibble pairs into one
 * 32-bit lane, the order vpdpbusd sums in (weights 0..15 unsigned, activation signed). */
typedef struct { const uint8_t *q; const void *sz; int scale_f32; const int8_t *xq; const float *d, *xs; float *y;
                 int out, in; } int4_vnni_job;

VNNI static void int4_vnni_range(void *arg, int r0, int r1) {
    int4_vnni_job *j = arg;
    int in = j->in, out = j->out, groups = in / 32;
    uint8_t lo_idx[64], hi_idx[64];
    for (int l = 0; l < 16; l++)
        for (int t = 0; t < 4; t++) {  /* lane l, byte t: column k+t of row l (A: k, k+1; B: k+2, k+3) */
            lo_idx[4 * l + t] = (uint8_t)(32 * t + l);
            hi_idx[4 * l + t] = (uint8_t)(32 * t + 16 + l);
        }
    const __m512i idx0 = _mm512_loadu_si512(lo_idx), idx1 = _mm512_loadu_si512(hi_idx);
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const __m512i pair_lo = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i pair_hi = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int b = r0 / 64; b < r1 / 64; b++) {
        const uint8_t *blk = j->q + (size_t)b * 64 * (in / 2);
        __m512 y[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int g = 0; g < groups; g++) {
            __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                              _mm512_setzero_si512()};   /* rows 0-15, 16-31, 32-47, 48-63 */
            for (int k = 32 * g; k < 32 * g + 32; k += 4) {
                const uint8_t *p = blk + (size_t)k * 32;
                __m512i A = _mm512_loadu_si512(p), B = _mm512_loadu_si512(p + 64);
                __m512i P0 = _mm512_permutex2var_epi8(A, idx0, B), P1 = _mm512_permutex2var_epi8(A, idx1, B);
                int32_t x4;
                memcpy(&x4, j->xq + k, 4);
                __m512i xv = _mm512_set1_epi32(x4);
                acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_and_si512(P0, nib), xv);
                acc[1] = _mm512_dpbusd_epi32(acc[1], _mm512_and_si512(P1, nib), xv);
                /* high nibbles in place (16 q): the factor 16 comes off with the scale, exactly */
                acc[2] = _mm512_dpbusd_epi32(acc[2], _mm512_andnot_si512(nib, P0), xv);
                acc[3] = _mm512_dpbusd_epi32(acc[3], _mm512_andnot_si512(nib, P1), xv);
            }
            /* w = (q - 8) s + z:  sum w x = s d (sum q xq) + (z - 8 s) xs */
            __m512 dg = _mm512_set1_ps(j->d[g]), dg16 = _mm512_set1_ps(j->d[g] * 0.0625f), xsg = _mm512_set1_ps(j->xs[g]);
            for (int i = 0; i < 4; i++) {
                size_t at = ((size_t)g * out + 64 * b + 16 * i) * 2;   /* 16 (scale, zero) pairs */
                __m512 sc, ze;
                if (j->scale_f32) {
                    __m512 p0 = _mm512_loadu_ps((const float *)j->sz + at), p1 = _mm512_loadu_ps((const float *)j->sz + at + 16);
                    sc = _mm512_permutex2var_ps(p0, pair_lo, p1);
                    ze = _mm512_permutex2var_ps(p0, pair_hi, p1);
                } else {
                    __m512i pr = _mm512_loadu_si512((const uint16_t *)j->sz + at);
                    sc = _mm512_castsi512_ps(_mm512_slli_epi32(pr, 16));
                    ze = _mm512_castsi512_ps(_mm512_and_si512(pr, _mm512_set1_epi32((int)0xffff0000)));
                }
                __m512 zoff = _mm512_fnmadd_ps(sc, _mm512_set1_ps(8.f), ze);
                y[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), _mm512_mul_ps(sc, i < 2 ? dg : dg16), y[i]);
                y[i] = _mm512_fmadd_ps(zoff, xsg, y[i]);
            }
        }
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(j->y + 64 * b + 16 * i, y[i]);
    }
}

/* Scratch for one quantised activation of n values (bytes, rounded up; see quantize_act). */
#define ACT_SCRATCH_FLOATS(n) (((n) + 63) / 64 * 64 / 2 + 2 * (((n) + 31) / 32) + 16 * (((n) + 63) / 64) + 32)

/* y[out] = W x with x quantised here; work: ACT_SCRATCH_FLOATS(in) floats. */
static void gemv_q_vnni(int quant, const void *q, const void *s, int scale_f32, const float *x, float *y, int out,
                        int in, float *work) {
    int padded = (in + 63) & ~63, blocks = (in + 31) / 32, chunks = padded / 64;
    int8_t *xq = (int8_t *)work;
    float *d = work + padded / 4, *xs = d + blocks, *dv = xs + blocks;
    quantize_act(x, in, xq, d, xs);
    if (quant == 1) {
        uint8_t *xu = (uint8_t *)xq;  /* in place: xq + 128 (padding becomes 128, against zero weights) */
        for (int k = 0; k < padded; k++) xu[k] = (uint8_t)(xq[k] ^ 0x80);
        for (int c = 0; c < chunks; c++)
            for (int l = 0; l < 16; l++) {
                int blk = 2 * c + l / 8;
                dv[16 * c + l] = blk < blocks ? d[blk] : 0.f;
            }
        int8_vnni_job j = {.q = q, .s = s, .scale_f32 = scale_f32, .xu = xu, .dv = dv, .y = y, .in = in};
        parallel_for(int8_vnni_range, &j, out, 4, (size_t)out * in);
    } else {
        int4_vnni_job j = {.q = q, .sz = s, .scale_f32 = scale_f32, .xq = xq, .d = d, .xs = xs, .y = y, .out = out,
                           .in = in};
        parallel_for(int4_vnni_range, &j, out, 64, (size_t)out * in / 2);
    }
}

/* y = W x for one float32 x: the quantised product alone (micro-benchmarks and tests).
 * quant 1 int8, 2 int4; vnni 0 = the float32 kernels. work: ACT_SCRATCH_FLOATS(in) floats. */
void EXPORT pcmoe_gemv_quant(int quant, int vnni, const void *q, const void *s, int scale_f32, int group,
                             const float *x, float *y, int out, int in, float *work) {
    if (vnni && use_vnni && (quant == 1 || group == 32)) gemv_q_vnni(quant, q, s, scale_f32, x, y, out, in, work);
    else if (quant == 1) gemv_int8(q, s, scale_f32, x, y, out, in);
    else gemv_int4(q, s, scale_f32, x, y, out, in, group);
}

/* y = W x for one bf16 x (micro-benchmarks). */
void EXPORT pcmoe_gemv_bf16(const uint16_t *W, const uint16_t *x, float *y, int out, int in) {
    gemv_bf16(W, x, y, out, in);
}

int EXPORT pcmoe_act_scratch_floats(int n) { return ACT_SCRATCH_FLOATS(n); }

/* Read n bytes (a multiple of 256) with 512-bit loads, rows split over the pool: the memory
 * bandwidth floor the micro-benchmark compares the products against. Returns a checksum. */
typedef struct { const uint8_t *p; _Atomic unsigned long long sum; } read_job;

static void read_range(void *arg, int b, int e) {
    read_job *j = arg;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = (size_t)b * 256; i < (size_t)e * 256; i += 256) {
        a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(j->p + i));
        a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(j->p + i + 64));
        a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(j->p + i + 128));
        a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(j->p + i + 192));
    }
    a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    atomic_fetch_xor(&j->sum, (unsigned long long)_mm512_reduce_add_epi64(a0));
}

unsigned long long EXPORT pcmoe_stream_read(const void *p, long long n) {
    read_job j = {.p = p, .sum = 0};
    parallel_for(read_range, &j, (int)(n / 256), 64, (size_t)n);
    return j.sum;
}

/* -- the GLU expert: act(x Wg^T) * (x Wu^T), then W_down; act = SiLU ------------------------- */

static inline float silu(float v) { return v / (1.f + expf(-v)); }

/* out[H] (float32) = down . (silu(gate) * up), [gate; up] = gate_up . x.
 * quant: 0 bf16, 1 int8, 2 int4; for quantised weights *_s are the scales, else ignored.
 * scratch: 4 * I + ACT_SCRATCH_FLOATS(max(H, I)) floats. */
void EXPORT pcmoe_glu_expert(int quant, const void *gate_up, const void *gate_up_s, const void *down,
                             const void *down_s, int scale_f32, int group, const uint16_t *x, float *out, int H, int I,
                             float *scratch) {
    float *h = scratch;                  /* [2I] */
    float *a = scratch + 2 * I;          /* [I] float32 activations (quantised paths) */
    uint16_t *a16 = (uint16_t *)(scratch + 3 * I);   /* [I] bf16 activations (bf16 path) */
    float *work = scratch + 4 * I;       /* the quantised activation of the VNNI path */
    if (quant == 0) {
        gemv_bf16((const uint16_t *)gate_up, x, h, 2 * I, H);
    } else {
        float xf[H];
        for (int k = 0; k < H; k++) xf[k] = bf16_to_f32(x[k]);
        pcmoe_gemv_quant(quant, 1, gate_up, gate_up_s, scale_f32, group, xf, h, 2 * I, H, work);
    }
    for (int i = 0; i < I; i++) a[i] = silu(h[i]) * h[I + i];
    if (quant == 0) {
        f32_to_bf16_n(a, a16, I);
        gemv_bf16((const uint16_t *)down, a16, out, H, I);
    } else {
        pcmoe_gemv_quant(quant, 1, down, down_s, scale_f32, group, a, out, H, I, work);
    }
}

/* out[H] (bf16) = sum_j w[j] ys[j] over the k choices in order (float32), rounded once. */
void EXPORT pcmoe_combine(const float *ys, const float *w, const int *present, int k, uint16_t *out, int H,
                          float *scratch) {
    for (int i = 0; i < H; i++) scratch[i] = 0.f;
    for (int j = 0; j < k; j++) {
        if (!present[j]) continue;
        __m512 wj = _mm512_set1_ps(w[j]);
        int i = 0;
        for (; i + 16 <= H; i += 16)
            _mm512_storeu_ps(scratch + i, _mm512_fmadd_ps(_mm512_loadu_ps(ys + (size_t)j * H + i), wj,
                                                          _mm512_loadu_ps(scratch + i)));
        for (; i < H; i++) scratch[i] += w[j] * ys[(size_t)j * H + i];
    }
    f32_to_bf16_n(scratch, out, H);
}

/* -- RMSNorm over the last dimension of `rows` vectors (bf16 in and out, float32 inside) -------- */

void EXPORT pcmoe_rmsnorm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int rows, int n, float eps,
                               float *scratch) {
    for (int t = 0; t < rows; t++) {
        const uint16_t *xr = x + (size_t)t * n;
        float ss = 0.f;
        for (int i = 0; i < n; i++) { float v = bf16_to_f32(xr[i]); scratch[i] = v; ss += v * v; }
        float inv = 1.f / sqrtf(ss / n + eps);
        for (int i = 0; i < n; i++) scratch[i] = scratch[i] * inv * bf16_to_f32(w[i]);
        f32_to_bf16_n(scratch, out + (size_t)t * n, n);
    }
}

/* -- attention of one query position over P cached positions (GQA) ------------------------------ */

/* q [Hq, D], k/v caches [Hkv, cap, D] (first P valid), out [Hq, D]; all bf16. scratch: P + D floats. */
void EXPORT pcmoe_attention_bf16(const uint16_t *q, const uint16_t *kc, const uint16_t *vc, uint16_t *out, int Hq,
                                 int Hkv, int D, int P, int cap, float scale, float *scratch) {
    float *s = scratch, *o = scratch + P;
    int group = Hq / Hkv;
    for (int h = 0; h < Hq; h++) {
        const uint16_t *qh = q + (size_t)h * D;
        const uint16_t *kh = kc + (size_t)(h / group) * cap * D, *vh = vc + (size_t)(h / group) * cap * D;
        float m = -INFINITY;
        for (int t = 0; t < P; t++) {
            float dot;
            if ((D & 31) == 0) {
                __m512 a = _mm512_setzero_ps();
                for (int d = 0; d < D; d += 32)
                    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qh + d),
                                         (__m512bh)_mm512_loadu_si512(kh + (size_t)t * D + d));
                dot = _mm512_reduce_add_ps(a);
            } else {
                dot = 0.f;
                for (int d = 0; d < D; d++) dot += bf16_to_f32(qh[d]) * bf16_to_f32(kh[(size_t)t * D + d]);
            }
            s[t] = dot * scale;
            if (s[t] > m) m = s[t];
        }
        float total = 0.f;
        for (int t = 0; t < P; t++) { s[t] = expf(s[t] - m); total += s[t]; }
        for (int d = 0; d < D; d++) o[d] = 0.f;
        for (int t = 0; t < P; t++) {
            float p = s[t] / total;
            const uint16_t *vt = vh + (size_t)t * D;
            int d = 0;
            __m512 pv = _mm512_set1_ps(p);
            for (; d + 16 <= D; d += 16)
                _mm512_storeu_ps(o + d, _mm512_fmadd_ps(load_bf16x16(vt + d), pv, _mm512_loadu_ps(o + d)));
            for (; d < D; d++) o[d] += p * bf16_to_f32(vt[d]);
        }
        f32_to_bf16_n(o, out + (size_t)h * D, D);
    }
}

/* -- one attention block of a llama-style decoder, for one token ------------------------------- */

/* A projection's weights: bf16 [out, in] (quant 0), or int8 / int4 as pcmoe.quant holds them
 * (quant 1 / 2, scales s, bf16 unless scale_f32, int4 groups of `group` columns). */
typedef struct {
    int quant, scale_f32, group;
    const void *w, *s;
} proj_t;

/* y[out] = W x for one bf16 x; quantised weights take x as float32 (xf [in]) and, with VNNI, round
 * it to int8 per block of 32 (work: ACT_SCRATCH_FLOATS(in) floats), as QuantLinear.native does. */
static void project(const proj_t *pr, const uint16_t *x16, float *y, int out, int in, float *xf, float *work) {
    if (pr->quant == 0) {
        gemv_bf16((const uint16_t *)pr->w, x16, y, out, in);
        return;
    }
    for (int i = 0; i < in; i++) xf[i] = bf16_to_f32(x16[i]);
    pcmoe_gemv_quant(pr->quant, 1, pr->w, pr->s, pr->scale_f32, pr->group, xf, y, out, in, work);
}

/* Floats of scratch the attention blocks need at position p. */
int EXPORT pcmoe_attention_scratch_floats(int H, int Hq, int Hkv, int D, int p) {
    int nq = Hq * D, nqkv = nq + 2 * Hkv * D, nin = H > nq ? H : nq;
    return nqkv + H + nqkv + (nqkv > H ? nqkv : H) + nq + nin + ACT_SCRATCH_FLOATS(nin) + p + 1 + D + 64;
}

/* x [H] bf16 (updated in place: x += o_proj(attention)), h_out [H] bf16 = post-attention RMSNorm
 * of the new x. qk_norm: 0 none, 1 per head (weights [D]), 2 over the whole projection (weights
 * [Hq*D], [Hkv*D]). cos/sin [D] bf16 of this position (rotate_half convention). The new key and
 * value go to position p of the caches [Hkv, cap, D]. Rounding to bf16 where the eager path
 * stores bf16: q/k/v, the attention output, x, h_out. scratch: pcmoe_attention_scratch_floats(). */
static void attention_block(uint16_t *x, uint16_t *h_out, const uint16_t *in_norm, float in_eps, const proj_t *qkv_w,
                            const uint16_t *qkv_b, int qk_norm, const uint16_t *q_norm, const uint16_t *k_norm,
                            float qk_eps, float clip, const uint16_t *cos, const uint16_t *sin, uint16_t *kc,
                            uint16_t *vc, int p, int cap, const proj_t *o_w, const uint16_t *o_b,
                            const uint16_t *post_norm, float post_eps, int H, int Hq, int Hkv, int D, float scale,
                            float *scratch) {
    int nq = Hq * D, nk = Hkv * D, nqkv = nq + 2 * nk, nin = H > nq ? H : nq;
    float *f = scratch;                                  /* [nqkv] projection, float32 */
    uint16_t *h16 = (uint16_t *)(f + nqkv);              /* [H] normed input */
    uint16_t *qkv16 = (uint16_t *)(f + nqkv + H);        /* [nqkv] bf16 */
    float *f2 = f + nqkv + H + nqkv;                     /* [max(nqkv, H)] work */
    uint16_t *att16 = (uint16_t *)(f2 + (nqkv > H ? nqkv : H));  /* [nq] */
    float *xf = f2 + (nqkv > H ? nqkv : H) + nq;         /* [max(H, nq)] a projection's float32 input */
    float *qwork = xf + nin;                             /* [ACT_SCRATCH_FLOATS(max(H, nq))] */
    float *att_scratch = qwork + ACT_SCRATCH_FLOATS(nin);        /* [p + 1 + D] */

    pcmoe_rmsnorm_bf16(x, in_norm, h16, 1, H, in_eps, f2);
    project(qkv_w, h16, f, nqkv, H, xf, qwork);
    if (qkv_b)
        for (int i = 0; i < nqkv; i++) f[i] += bf16_to_f32(qkv_b[i]);
    f32_to_bf16_n(f, qkv16, nqkv);
    uint16_t *q = qkv16, *k = qkv16 + nq, *v = qkv16 + nq + nk;
    if (qk_norm == 2) {
        pcmoe_rmsnorm_bf16(q, q_norm, q, 1, nq, qk_eps, f2);
        pcmoe_rmsnorm_bf16(k, k_norm, k, 1, nk, qk_eps, f2);
    }
    if (clip > 0)
        for (int i = 0; i < nqkv; i++) {
            float c = bf16_to_f32(qkv16[i]);
            qkv16[i] = f32_to_bf16(c > clip ? clip : c < -clip ? -clip : c);
        }
    if (qk_norm == 1) {
        pcmoe_rmsnorm_bf16(q, q_norm, q, Hq, D, qk_eps, f2);
        pcmoe_rmsnorm_bf16(k, k_norm, k, Hkv, D, qk_eps, f2);
    }
    /* rotary: out = t*cos + rotate_half(t)*sin, rotate_half(t) = cat(-t2, t1) */
    int half = D / 2;
    for (int hd = 0; hd < Hq + Hkv; hd++) {
        uint16_t *t = hd < Hq ? q + hd * D : k + (hd - Hq) * D;
        for (int d = 0; d < D; d++) f2[d] = bf16_to_f32(t[d]);
        for (int d = 0; d < D; d++) {
            float rot = d < half ? -f2[d + half] : f2[d - half];
            t[d] = f32_to_bf16(f2[d] * bf16_to_f32(cos[d]) + rot * bf16_to_f32(sin[d]));
        }
    }
    for (int hk = 0; hk < Hkv; hk++) {
        memcpy(kc + ((size_t)hk * cap + p) * D, k + hk * D, D * sizeof(uint16_t));
        memcpy(vc + ((size_t)hk * cap + p) * D, v + hk * D, D * sizeof(uint16_t));
    }
    pcmoe_attention_bf16(q, kc, vc, att16, Hq, Hkv, D, p + 1, cap, scale, att_scratch);
    project(o_w, att16, f2, H, nq, xf, qwork);
    for (int i = 0; i < H; i++) {
        float o = bf16_to_f32(f32_to_bf16(o_b ? f2[i] + bf16_to_f32(o_b[i]) : f2[i]));  /* o_proj output, bf16 */
        x[i] = f32_to_bf16(bf16_to_f32(x[i]) + o);
    }
    pcmoe_rmsnorm_bf16(x, post_norm, h_out, 1, H, post_eps, f2);
}

/* bf16 weights (fused q/k/v [Hq*D + 2*Hkv*D, H], o_proj [H, Hq*D]). */
void EXPORT pcmoe_attention_block(uint16_t *x, uint16_t *h_out, const uint16_t *in_norm, float in_eps,
                                  const uint16_t *qkv_w, const uint16_t *qkv_b, int qk_norm, const uint16_t *q_norm,
                                  const uint16_t *k_norm, float qk_eps, float clip, const uint16_t *cos,
                                  const uint16_t *sin, uint16_t *kc, uint16_t *vc, int p, int cap,
                                  const uint16_t *o_w, const uint16_t *o_b, const uint16_t *post_norm,
                                  float post_eps, int H, int Hq, int Hkv, int D, float scale, float *scratch) {
    proj_t qkv = {0, 0, 0, qkv_w, 0}, o = {0, 0, 0, o_w, 0};
    attention_block(x, h_out, in_norm, in_eps, &qkv, qkv_b, qk_norm, q_norm, k_norm, qk_eps, clip, cos, sin, kc, vc,
                    p, cap, &o, o_b, post_norm, post_eps, H, Hq, Hkv, D, scale, scratch);
}

/* The same with the fused q/k/v and o_proj held quantised (quant 1 int8, 2 int4; pcmoe.nonexpert):
 * what LeanCausalLM._forward_one_quantized does op by op, in one call. */
void EXPORT pcmoe_attention_block_quant(int quant, int scale_f32, int group, uint16_t *x, uint16_t *h_out,
                                        const uint16_t *in_norm, float in_eps, const void *qkv_q, const void *qkv_s,
                                        const uint16_t *qkv_b, int qk_norm, const uint16_t *q_norm,
                                        const uint16_t *k_norm, float qk_eps, float clip, const uint16_t *cos,
                                        const uint16_t *sin, uint16_t *kc, uint16_t *vc, int p, int cap,
                                        const void *o_q, const void *o_s, const uint16_t *o_b,
                                        const uint16_t *post_norm, float post_eps, int H, int Hq, int Hkv, int D,
                                        float scale, float *scratch) {
    proj_t qkv = {quant, scale_f32, group, qkv_q, qkv_s}, o = {quant, scale_f32, group, o_q, o_s};
    attention_block(x, h_out, in_norm, in_eps, &qkv, qkv_b, qk_norm, q_norm, k_norm, qk_eps, clip, cos, sin, kc, vc,
                    p, cap, &o, o_b, post_norm, post_eps, H, Hq, Hkv, D, scale, scratch);
}
