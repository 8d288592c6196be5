/* What the CPU kernels share (ops/gguf_cpu.c, ops/affine_cpu.c, applelm/flash/native_ffn.c): eight-lane vector
 * types, byte widening, float16/bfloat16 -> float32, the gated FFNs' activations and the matmuls' split of
 * output rows among threads. native_build.py compiles every kernel with this folder on the include path and
 * puts this header's bytes into each kernel's build key. */
#ifndef APPLELM_CPU_VEC_H
#define APPLELM_CPU_VEC_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Eight lanes as GCC/clang vector types: AVX2 registers on x86, pairs of NEON registers on arm64. The
 * decoders write whole vectors, and the products keep vector accumulators across blocks. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t v8b __attribute__((vector_size(8)));
typedef int8_t v8s __attribute__((vector_size(8)));

static inline v8f splat(float f) { return (v8f){f, f, f, f, f, f, f, f}; }

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__) /* x86 compilers turn _Float16 conversions into library calls without AVX512-FP16 */
    return _cvtsh_ss(h);
#elif defined(__FLT16_MAX__)
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, mant = h & 1023, u;
    float f;
    if (e == 0) { /* zero or subnormal: mant * 2^-24 */
        f = (float)mant * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    u = sign | (e == 31 ? 0x7f800000u : (e + 112) << 23) | (mant << 13);
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* The matmuls hand out output rows ROW_CHUNK at a time; each output is computed by one thread. */
enum { ROW_CHUNK = 32 };

static inline int64_t row_chunks(int64_t n) { return (n + ROW_CHUNK - 1) / ROW_CHUNK; }

/* The end of the row chunk that starts at lo, in n rows. */
static inline int64_t chunk_end(int64_t lo, int64_t n) { return lo + ROW_CHUNK < n ? lo + ROW_CHUNK : n; }

/* Threads for `rows` output rows: ~64 rows per thread at least (smaller shares cost more in wake-up). */
static inline int threads_for(int64_t rows, int threads) {
    int64_t most = rows / 64 > 0 ? rows / 64 : 1;
    return threads > most ? (int)most : threads;
}

enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_RELU = 2 };

/* Whether `act` is one of the activation codes above (ops/cpu_native.py's ACTIVATIONS). */
static inline int known_activation(int act) { return act >= ACT_SILU && act <= ACT_RELU; }

/* An entry point's refusal (ops/host_call.cpp): outputs of NaN, which cannot pass for a result. */
static inline void fill_nan(float *y, int64_t count) {
    for (int64_t i = 0; i < count; i++) y[i] = NAN;
}

/* The gate's activation: silu, gelu with the tanh approximation (Gemma) or relu (the ReLU family), as MLX's
 * nn.silu / nn.gelu_approx / nn.relu.
 * Written so no intermediate overflows (-ffast-math assumes no infinities: expf(88+) would turn into NaN). */
static inline float activation(float g, int act) {
    if (act == ACT_RELU) return g > 0.0f ? g : 0.0f;
    if (act == ACT_GELU_TANH) {
        const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
        float t = k * (g + 0.044715f * g * g * g);
        t = t > 10.0f ? 10.0f : t < -10.0f ? -10.0f : t; /* tanh(10) rounds to 1 in float32 */
        return 0.5f * g * (1.0f + tanhf(t));
    }
    const float e = expf(g < 0.0f ? g : -g); /* exp(-|g|) <= 1 */
    return g < 0.0f ? g * e / (1.0f + e) : g / (1.0f + e);
}

static inline float bf16_to_float(uint16_t h) { /* bfloat16 is the top half of a float32 */
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* 8 bytes -> 8 int32 lanes, unsigned or signed. GCC scalarizes the generic byte conversion (one
 * vcvtsi2ss per lane, measured 2x slower overall), so AVX2 takes the widening instructions directly. */
static inline v8i ints8(const uint8_t *p) {
#if defined(__AVX2__)
    return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    v8b b;
    memcpy(&b, p, 8);
    return __builtin_convertvector(b, v8i);
#endif
}

static inline v8i sints8(const uint8_t *p) {
#if defined(__AVX2__)
    return (v8i)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    v8s b;
    memcpy(&b, p, 8);
    return __builtin_convertvector(b, v8i);
#endif
}
#endif
