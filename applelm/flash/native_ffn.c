/* Gated FFN contributions of one token, straight from neuron bundles as they were read (CPU).
 *
 * For each neuron i, its bundle holds parts of H values: up row, down column, and (when it is stored
 * with them) gate row (applelm/flash/codec.py). This computes, in one pass over the bundles,
 *     out += sum_i a_i * (up_i . x) * down_i,   a_i = act(gate_i . x)  or a given coefficient,
 * decoding each part in registers (no float copy of the weights is ever written), so a unit costs about
 * one read of its bytes from memory. Parts are stored as float32, float16, bfloat16 or affine 8/4-bit
 * groups (value = scale * q + bias, float16 scale and bias per group, 4-bit codes packed two per byte,
 * element 2k in the low nibble).
 *
 * Sparse paging (applelm_sparse_ffn) adds: bundles at arbitrary byte offsets (where coalesced reads put
 * them, or cache slots), 2-part bundles with the caller's coefficients (resident gate), and the
 * threshold mask |a_i| > thr; neurons whose coefficient is 0 cost nothing.
 *
 * Neurons go in chunks of NEURON_CHUNK, each summed into its own accumulator; the accumulators are added
 * to out in chunk order, so a result does not depend on the thread count. Threads take chunks by OpenMP's
 * runtime schedule (OMP_SCHEDULE; `import applelm` sets it: benchmarks/omp_schedule.py).
 * Built at run time by applelm/flash/native.py (cc -O3 -march=native -ffast-math [-fopenmp]).
 */
#include <math.h>
#include <stdlib.h>

#include "cpu_vec.h" /* ops/cpu_vec.h: float16/bfloat16 -> float32, activations (native_build.py's include path) */

enum { NEURON_CHUNK = 64 };
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_F16C_AVX2 1 /* float16 -> float32 eight at a time (the compiler does not vectorize it) */
#endif

enum { FMT_F32 = 0, FMT_F16 = 1, FMT_BF16 = 2, FMT_Q8 = 3, FMT_Q4 = 4 };
/* part . x for one stored part; xsum[g] = sum of x over group g (affine formats only). */
static float dot_part(const uint8_t *p, const float *x, const float *xsum, int64_t H, int fmt, int group) {
    float acc = 0.0f;
    if (fmt == FMT_F32) {
        const float *w = (const float *)p;
        for (int64_t j = 0; j < H; j++) acc += w[j] * x[j];
    } else if (fmt == FMT_BF16) {
        const uint16_t *w = (const uint16_t *)p;
        for (int64_t j = 0; j < H; j++) acc += bf16_to_float(w[j]) * x[j];
    } else if (fmt == FMT_F16) {
        const uint16_t *w = (const uint16_t *)p;
        int64_t j = 0;
#ifdef HAVE_F16C_AVX2
        __m256 v = _mm256_setzero_ps();
        for (; j + 8 <= H; j += 8)
            v = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j))), _mm256_loadu_ps(x + j), v);
        float lanes[8];
        _mm256_storeu_ps(lanes, v);
        for (int k = 0; k < 8; k++) acc += lanes[k];
#endif
        for (; j < H; j++) acc += half_to_float(w[j]) * x[j];
    } else {
        int64_t ng = H / group, code_bytes = fmt == FMT_Q8 ? H : H / 2;
        const uint16_t *scale = (const uint16_t *)(p + code_bytes), *bias = scale + ng;
        for (int64_t g = 0; g < ng; g++) {
            const float *xg = x + g * group;
            float s = 0.0f;
            if (fmt == FMT_Q8) {
                const uint8_t *q = p + g * group;
                for (int j = 0; j < group; j++) s += (float)q[j] * xg[j];
            } else {
                const uint8_t *q = p + g * group / 2;
                for (int j = 0; j < group / 2; j++)
                    s += (float)(q[j] & 15) * xg[2 * j] + (float)(q[j] >> 4) * xg[2 * j + 1];
            }
            acc += half_to_float(scale[g]) * s + half_to_float(bias[g]) * xsum[g];
        }
    }
    return acc;
}

/* out += a * part (the down column of one neuron). */
static void axpy_part(float a, const uint8_t *p, float *out, int64_t H, int fmt, int group) {
    if (fmt == FMT_F32) {
        const float *w = (const float *)p;
        for (int64_t j = 0; j < H; j++) out[j] += a * w[j];
    } else if (fmt == FMT_BF16) {
        const uint16_t *w = (const uint16_t *)p;
        for (int64_t j = 0; j < H; j++) out[j] += a * bf16_to_float(w[j]);
    } else if (fmt == FMT_F16) {
        const uint16_t *w = (const uint16_t *)p;
        int64_t j = 0;
#ifdef HAVE_F16C_AVX2
        __m256 va = _mm256_set1_ps(a);
        for (; j + 8 <= H; j += 8) {
            __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j)));
            _mm256_storeu_ps(out + j, _mm256_fmadd_ps(va, wv, _mm256_loadu_ps(out + j)));
        }
#endif
        for (; j < H; j++) out[j] += a * half_to_float(w[j]);
    } else {
        int64_t ng = H / group, code_bytes = fmt == FMT_Q8 ? H : H / 2;
        const uint16_t *scale = (const uint16_t *)(p + code_bytes), *bias = scale + ng;
        for (int64_t g = 0; g < ng; g++) {
            float as = a * half_to_float(scale[g]), ab = a * half_to_float(bias[g]);
            float *og = out + g * group;
            if (fmt == FMT_Q8) {
                const uint8_t *q = p + g * group;
                for (int j = 0; j < group; j++) og[j] += as * (float)q[j] + ab;
            } else {
                const uint8_t *q = p + g * group / 2;
                for (int j = 0; j < group / 2; j++) {
                    og[2 * j] += as * (float)(q[j] & 15) + ab;
                    og[2 * j + 1] += as * (float)(q[j] >> 4) + ab;
                }
            }
        }
    }
}

/* Where the bundles are and how to weigh them (one call of applelm_sparse_ffn). */
typedef struct {
    const uint8_t *base;
    const int64_t *offsets; /* bundle i at base + offsets[i], or at base + i * stride when NULL */
    int64_t stride, H, part_bytes;
    int fmt, group, act;
    const float *coef; /* a_i given (2-part bundles: up, down), or NULL: computed from the gate part */
    float thr;         /* a_i with |a_i| <= thr counts as 0 (thr < 0: no mask) */
} Bundles;

static void neuron_range(const Bundles *B, const float *x, const float *xsum, int64_t lo, int64_t hi, float *acc) {
    for (int64_t i = lo; i < hi; i++) {
        const uint8_t *b = B->base + (B->offsets ? B->offsets[i] : i * B->stride);
        float a;
        if (B->coef) {
            a = B->coef[i];
        } else {
            a = activation(dot_part(b + 2 * B->part_bytes, x, xsum, B->H, B->fmt, B->group), B->act);
            if (!(fabsf(a) > B->thr)) a = 0.0f;
        }
        if (a == 0.0f) continue;
        a *= dot_part(b, x, xsum, B->H, B->fmt, B->group);
        axpy_part(a, b + B->part_bytes, acc, B->H, B->fmt, B->group);
    }
}

/* Checks the geometry; for affine formats sets *xsum to a new array of x's sums per group (the caller
 * frees it). Returns 0, or -1 for an argument the kernel cannot handle. */
static int prepare_x(const float *x, int64_t n, int64_t H, int fmt, int group, int threads, float **xsum) {
    *xsum = NULL;
    if (n < 0 || H <= 0 || fmt < FMT_F32 || fmt > FMT_Q4 || threads < 1) return -1;
    if (fmt != FMT_Q8 && fmt != FMT_Q4) return 0;
    if (group <= 0 || group % 2 || H % group) return -1;
    *xsum = (float *)malloc(sizeof(float) * (size_t)(H / group));
    if (!*xsum) return -1;
    for (int64_t g = 0; g < H / group; g++) {
        float s = 0.0f;
        for (int j = 0; j < group; j++) s += x[g * group + j];
        (*xsum)[g] = s;
    }
    return 0;
}

static int run(const Bundles *B, const float *x, int64_t n, int threads, float *out) {
    int64_t H = B->H;
    float *xsum;
    if (prepare_x(x, n, H, B->fmt, B->group, threads, &xsum)) return -1;
    int64_t nc = (n + NEURON_CHUNK - 1) / NEURON_CHUNK;
    float *acc = (float *)calloc((size_t)(nc > 0 ? nc : 1) * (size_t)H, sizeof(float));
    if (!acc) {
        free(xsum);
        return -1;
    }
    if (threads > nc) threads = nc > 0 ? (int)nc : 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(runtime) if (threads > 1)
#endif
    for (int64_t c = 0; c < nc; c++) {
        int64_t hi = (c + 1) * NEURON_CHUNK < n ? (c + 1) * NEURON_CHUNK : n;
        neuron_range(B, x, xsum, c * NEURON_CHUNK, hi, acc + c * H);
    }
    for (int64_t c = 0; c < nc; c++)
        for (int64_t j = 0; j < H; j++) out[j] += acc[c * H + j];
    free(acc);
    free(xsum);
    return 0;
}

/* Every neuron of n contiguous 3-part bundles (dense paging). Returns 0, or -1 for an argument it
 * cannot handle (the caller then uses the MLX path). */
int applelm_bundle_ffn(const float *x, const uint8_t *bundles, int64_t n, int64_t H, int64_t part_bytes,
                       int fmt, int group, int act, int threads, float *out) {
    Bundles B = {bundles, NULL, 3 * part_bytes, H, part_bytes, fmt, group, act, NULL, -1.0f};
    return run(&B, x, n, threads, out);
}

/* Selected neurons (sparse paging): bundles at base + offsets[i] (or i * stride), weighed by coef[i]
 * when given, else by their gate's activation masked at thr. Returns 0, or -1 as above. */
int applelm_sparse_ffn(const float *x, const uint8_t *base, const int64_t *offsets, int64_t n, int64_t stride,
                       int64_t H, int64_t part_bytes, int fmt, int group, int act, const float *coef, float thr,
                       int threads, float *out) {
    if (!offsets && stride < (coef ? 2 : 3) * part_bytes) return -1; /* rows must hold every part used */
    Bundles B = {base, offsets, stride, H, part_bytes, fmt, group, act, coef, thr};
    return run(&B, x, n, threads, out);
}

/* out[i] = act(gate_i . x) for n stored gate parts at rows + i * stride (threshold sparsity: the resident
 * gates stay in the store's format). Returns 0, or -1 as above. */
int applelm_gate_acts(const float *x, const uint8_t *rows, int64_t n, int64_t stride, int64_t H, int64_t part_bytes,
                      int fmt, int group, int act, int threads, float *out) {
    float *xsum;
    if (stride < part_bytes || prepare_x(x, n, H, fmt, group, threads, &xsum)) return -1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= 64 * threads)
#endif
    for (int64_t i = 0; i < n; i++) out[i] = activation(dot_part(rows + i * stride, x, xsum, H, fmt, group), act);
    free(xsum);
    return 0;
}
