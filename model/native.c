/* Batch-1 decode products for the CPU: y = W x (+ bias) for one float32 input row.
 *
 * Decoding one token reads every weight once, so these run at the speed the weights stream
 * from memory. Each output row is one dot product over its weights, in 16 float lanes with
 * AVX-512, 8 with AVX2 + FMA (whichever the compiler targets: -march=native), else plain C; the
 * rows are split over OpenMP threads (PyTorch's own runtime, so both share one thread pool).
 * Built and loaded by model/native.py, which checks every kernel against F.linear first.
 *
 * Every function: x (k) float32; weights of n rows of k inputs, row-major; scale (n) float32 or
 * NULL; bias (n) float32 or NULL; y (n) float32; threads: how many OpenMP threads
 * (torch.get_num_threads(), as PyTorch's own ops pass theirs).
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
/* LANES bf16 or int8 values as floats */
static inline vec vload_bf16(const uint16_t *p) {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
static inline vec vload_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LANES 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vec vload_bf16(const uint16_t *p) {
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
static inline vec vload_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
#define LANES 0 /* plain C below */
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; /* bf16 is float32's upper half */
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* One dot product per output row j, of k inputs: LOADV(i) gives the weights i..i+LANES-1 as
 * floats, LOADS(i) weight i (the tail); two accumulators, so the loop is bound by memory. */
#if LANES
#define DOT(LOADV, LOADS)                                                                   \
    vec a0 = vzero(), a1 = vzero();                                                         \
    int64_t i = 0;                                                                          \
    for (; i + 2 * LANES <= k; i += 2 * LANES) {                                            \
        a0 = vfma(LOADV(i), vload(x + i), a0);                                              \
        a1 = vfma(LOADV(i + LANES), vload(x + i + LANES), a1);                              \
    }                                                                                       \
    for (; i + LANES <= k; i += LANES) a0 = vfma(LOADV(i), vload(x + i), a0);               \
    float acc = vsum(a0) + vsum(a1);                                                        \
    for (; i < k; i++) acc += LOADS(i) * x[i];
#else
#define DOT(LOADV, LOADS)                                                                   \
    float acc = 0.0f;                                                                       \
    for (int64_t i = 0; i < k; i++) acc += LOADS(i) * x[i];
#endif

/* One kernel per weight type T: the weights' row j read as floats by LOADV / LOADS (see DOT),
 * times scale[j] when a scale is given (int8), plus bias[j] when a bias is given. */
#define GEMV(NAME, T, LOADV, LOADS)                                                         \
    void NAME(const float *restrict x, int64_t k, const T *restrict w,                      \
              const float *restrict scale, int64_t n, const float *restrict bias,           \
              float *restrict y, int threads) {                                             \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                  \
        for (int64_t j = 0; j < n; j++) {                                                   \
            const T *wj = w + j * k;                                                        \
            DOT(LOADV, LOADS)                                                               \
            if (scale) acc *= scale[j];                                                     \
            y[j] = bias ? acc + bias[j] : acc;                                              \
        }                                                                                   \
    }

#define F32_V(i) vload(wj + (i))
#define F32_S(i) wj[i]
#define BF16_V(i) vload_bf16(wj + (i))
#define BF16_S(i) bf16_to_f32(wj[i])
#define INT8_V(i) vload_i8(wj + (i))
#define INT8_S(i) ((float)wj[i])

/* float32 weights */
GEMV(gemv_f32, float, F32_V, F32_S)
/* bf16 weights (their bits as uint16), products and sums in float32 */
GEMV(gemv_bf16, uint16_t, BF16_V, BF16_S)
/* int8 weights with one scale per row (w[j, i] = q[j, i] * scale[j]), float32 inputs: the
 * inputs are not rounded at all (weight-only int8) */
GEMV(gemv_int8, int8_t, INT8_V, INT8_S)

/* The float lanes of the vector code this library was built with (0: plain C, which PyTorch's
 * own kernels beat: not used). */
int native_lanes(void) { return LANES; }
