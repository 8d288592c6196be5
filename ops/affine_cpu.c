/* MLX affine-quantized rows times float32 activations on the CPU: y[r][i] = sum_j x[r][j] * W[i][j], with
 * W[i][j] = scale[i][g] * q[i][j] + bias[i][g] for group g = j / group.
 *
 * W stays packed as MLX stores it (uint32 words, little-endian): 4-bit element 2b is the low nibble of byte b
 * and 2b+1 its high nibble; 8-bit element b is byte b. Scales and biases are float32, float16 or bfloat16.
 * Per group, sum_j (s q_j + b) x_j = s (q . x) + b sum(x over the group): the codes are multiplied as small
 * integers turned float, and each activation row's group sums are computed once per call. For 4-bit, each
 * 16-element run of x is reordered once (even elements, then odd), so the low and high nibbles of 8 bytes
 * meet their activations as two whole vectors. MLX's CPU quantized matmul read ~0.5 GB/s at one row
 * (benchmarks/qmatmul_bench.py --cpu-small); the packed bytes are read once per call here.
 * Threads take the output rows ROW_CHUNK at a time by OpenMP's runtime schedule; each output is computed by
 * one thread in a fixed order, so results do not depend on the thread count. Built at run time by
 * ops/cpu_native.py (cc -O3 -march=native -ffast-math [-fopenmp]).
 */
#include <stdlib.h>

#include "cpu_vec.h"

enum { S_F32 = 0, S_F16 = 1, S_BF16 = 2 };
enum { MAX_ROWS = 16, MAX_GROUP = 128 };

static inline float scalar(const void *a, int64_t i, int fmt) {
    if (fmt == S_F32) return ((const float *)a)[i];
    uint16_t h = ((const uint16_t *)a)[i];
    return fmt == S_BF16 ? bf16_to_float(h) : half_to_float(h);
}

/* Rows [lo, hi) of W against m <= MAX_ROWS activation rows: xs (m, k) in kernel order (4-bit: reordered),
 * sums (m, k / group). Inlined per bit width so the group loops are specialized. */
static inline __attribute__((always_inline)) void rows_range(const float *xs, const float *sums, int64_t m,
                                                             int64_t k, const uint8_t *w, const void *scales,
                                                             const void *biases, int sfmt, int64_t n,
                                                             const int bits, int group, int64_t lo, int64_t hi,
                                                             float *y) {
    const int64_t row_bytes = k * bits / 8, ng = k / group;
    const int vecs = group / 8, gbytes = group * bits / 8;
    v8f q[MAX_GROUP / 8], acc[MAX_ROWS];
    float bacc[MAX_ROWS];
    for (int64_t i = lo; i < hi; i++) {
        const uint8_t *row = w + i * row_bytes;
        for (int64_t r = 0; r < m; r++) {
            acc[r] = splat(0.0f);
            bacc[r] = 0.0f;
        }
        for (int64_t g = 0; g < ng; g++) {
            const uint8_t *p = row + g * gbytes;
            if (bits == 4) {
                for (int c = 0; c < vecs / 2; c++) {
                    v8i b = ints8(p + 8 * c);
                    q[2 * c] = __builtin_convertvector(b & 15, v8f);
                    q[2 * c + 1] = __builtin_convertvector(b >> 4, v8f);
                }
            } else {
                for (int c = 0; c < vecs; c++) q[c] = __builtin_convertvector(ints8(p + 8 * c), v8f);
            }
            const float s = scalar(scales, i * ng + g, sfmt), b = scalar(biases, i * ng + g, sfmt);
            for (int64_t r = 0; r < m; r++) {
                const float *xr = xs + r * k + g * group;
                v8f t = splat(0.0f);
                for (int c = 0; c < vecs; c++) {
                    v8f xv;
                    memcpy(&xv, xr + 8 * c, 32);
                    t += q[c] * xv;
                }
                acc[r] += splat(s) * t;
                bacc[r] += b * sums[r * ng + g];
            }
        }
        for (int64_t r = 0; r < m; r++) {
            float total = bacc[r];
            for (int l = 0; l < 8; l++) total += acc[r][l];
            y[r * n + i] = total;
        }
    }
}

static void rows_of(const float *xs, const float *sums, int64_t m, int64_t k, const uint8_t *w, const void *scales,
                    const void *biases, int sfmt, int64_t n, int bits, int group, int64_t lo, int64_t hi, float *y) {
    for (int64_t r0 = 0; r0 < m; r0 += MAX_ROWS) {
        int64_t mr = m - r0 < MAX_ROWS ? m - r0 : MAX_ROWS;
        const float *xr = xs + r0 * k, *sr = sums + r0 * (k / group);
        if (bits == 4 && mr == 1) /* decode: the activation-row loop vanishes */
            rows_range(xr, sr, 1, k, w, scales, biases, sfmt, n, 4, group, lo, hi, y + r0 * n);
        else if (bits == 4)
            rows_range(xr, sr, mr, k, w, scales, biases, sfmt, n, 4, group, lo, hi, y + r0 * n);
        else if (mr == 1)
            rows_range(xr, sr, 1, k, w, scales, biases, sfmt, n, 8, group, lo, hi, y + r0 * n);
        else
            rows_range(xr, sr, mr, k, w, scales, biases, sfmt, n, 8, group, lo, hi, y + r0 * n);
    }
}

/* y (m, n) = x (m, k) @ W.T for n affine rows of `bits` (4 or 8) in groups of `group` (32, 64 or 128), scales
 * and biases (n, k / group) in `sfmt`. Returns 0, or -1 for arguments it cannot handle (the caller then takes
 * the MLX path). */
int applelm_affine_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, const void *scales,
                          const void *biases, int sfmt, int64_t n, int bits, int group, int threads, float *y) {
    if ((bits != 4 && bits != 8) || (group != 32 && group != 64 && group != 128) || sfmt < S_F32 ||
        sfmt > S_BF16 || m < 1 || k <= 0 || k % group || n < 0 || threads < 1)
        return -1;
    const int64_t ng = k / group;
    float *xs = malloc(sizeof(float) * (size_t)(m * k)), *sums = malloc(sizeof(float) * (size_t)(m * ng));
    if (!xs || !sums) {
        free(xs);
        free(sums);
        return -1;
    }
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        float *o = xs + r * k;
        if (bits == 4) { /* per 16 elements: the even ones, then the odd ones (low, high nibbles) */
            for (int64_t j = 0; j < k; j += 16)
                for (int l = 0; l < 8; l++) {
                    o[j + l] = xr[j + 2 * l];
                    o[j + 8 + l] = xr[j + 2 * l + 1];
                }
        } else {
            memcpy(o, xr, sizeof(float) * (size_t)k);
        }
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.0f;
            for (int j = 0; j < group; j++) s += xr[g * group + j];
            sums[r * ng + g] = s;
        }
    }
    const int64_t nc = row_chunks(n);
    threads = threads_for(n, threads);
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(runtime) if (threads > 1)
#endif
    for (int64_t c = 0; c < nc; c++)
        rows_of(xs, sums, m, k, w, scales, biases, sfmt, n, bits, group, c * ROW_CHUNK, chunk_end(c * ROW_CHUNK, n), y);
    free(xs);
    free(sums);
    return 0;
}

/* Entry point of the MLX primitive (ops/host_call.cpp; see gguf_cpu.c): a = {m, k, n, sfmt, bits, group,
 * threads}; in = {x, w, scales, biases}; out = {y}. */
int applelm_affine_matmul_entry(const void *const *in, void *const *out, const int64_t *a) {
    const int rc = applelm_affine_matmul((const float *)in[0], a[0], a[1], (const uint8_t *)in[1], in[2], in[3],
                                         (int)a[3], a[2], (int)a[4], (int)a[5], (int)a[6], (float *)out[0]);
    if (rc) fill_nan((float *)out[0], a[0] * a[2]);
    return rc;
}
