/* GGUF block formats times float32 activations on the CPU: y[r][i] = sum_j x[r][j] * W[i][j].
 *
 * W stays as the file's packed rows (ops/reference.py says which bytes mean what; the decoders below
 * follow ggml's block structs). Each block is decoded once into a small float buffer in L1 and used by
 * every activation row, so a product costs about one read of the packed bytes from memory: the CPU
 * counterpart of the Metal/CUDA matvec in kernel_source.py, for the few rows of decode and speculation.
 * Threads take the output rows ROW_CHUNK at a time by OpenMP's runtime schedule (OMP_SCHEDULE; `import
 * applelm` sets it: benchmarks/omp_schedule.py); each output is computed by one thread in a fixed order, so
 * results do not depend on the thread count. Two fused entry points serve decoding, where each call is small
 * and its fixed costs (waking the workers, the round trip through Python and MLX) rival the product itself:
 * several weights against one input (q, k, v) and a whole gated FFN. Built at run time by ops/cpu_native.py
 * (cc -O3 -march=native -ffast-math [-fopenmp]).
 */
#include "cpu_vec.h"

enum { T_Q4_0 = 0, T_Q4_1 = 1, T_Q5_0 = 2, T_Q5_1 = 3, T_Q8_0 = 4, T_Q4_K = 5, T_Q6_K = 6 };
enum { MAX_ROWS = 16, MAX_BLOCK = 256 };

static const int BLOCK_ELEMS[] = {32, 32, 32, 32, 32, 256, 256};
static const int BLOCK_BYTES[] = {18, 20, 22, 24, 34, 144, 210};

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return half_to_float(h);
}

static inline uint32_t u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static const v8i LANE = {0, 1, 2, 3, 4, 5, 6, 7};

/* Q4_0 d | qs[16]; Q4_1 d m | qs[16]: element j = low nibble of qs[j], j+16 = high nibble. */
static inline void nibbles32(const uint8_t *qs, float d, float m, v8f *v) {
    const v8f vd = splat(d), vm = splat(m);
    for (int h = 0; h < 2; h++) {
        v8i q = ints8(qs + 8 * h);
        v[h] = vd * __builtin_convertvector(q & 15, v8f) + vm;
        v[h + 2] = vd * __builtin_convertvector(q >> 4, v8f) + vm;
    }
}

/* Q5_0 d | qh | qs[16]; Q5_1 d m | qh | qs[16]: bit 4 of element j is bit j of the little-endian qh. */
static inline void fives32(const uint8_t *qs, uint32_t qh, float d, float m, v8f *v) {
    const v8f vd = splat(d), vm = splat(m);
    const v8i bits = {(int32_t)qh, (int32_t)qh, (int32_t)qh, (int32_t)qh,
                      (int32_t)qh, (int32_t)qh, (int32_t)qh, (int32_t)qh};
    for (int h = 0; h < 2; h++) {
        v8i q = ints8(qs + 8 * h);
        v8i lo_hi = ((v8i)((uint32_t __attribute__((vector_size(32))))bits >> (LANE + 8 * h)) & 1) << 4;
        v8i hi_hi = ((v8i)((uint32_t __attribute__((vector_size(32))))bits >> (LANE + 8 * h + 16)) & 1) << 4;
        v[h] = vd * __builtin_convertvector((q & 15) | lo_hi, v8f) + vm;
        v[h + 2] = vd * __builtin_convertvector((q >> 4) | hi_hi, v8f) + vm;
    }
}

/* Q4_K's 12 bytes of six-bit scales and mins for its eight sub-blocks of 32. */
static void k4_scale_min(const uint8_t *s, int j, float *sc, float *mn) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *mn = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
        *mn = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* One block into v (BLOCK_ELEMS[type] / 8 vectors). */
static inline __attribute__((always_inline)) void decode_block(const uint8_t *b, const int type, v8f *v) {
    switch (type) {
    case T_Q4_0: {
        float d = f16(b);
        nibbles32(b + 2, d, -8.0f * d, v);
        break;
    }
    case T_Q4_1:
        nibbles32(b + 4, f16(b), f16(b + 2), v);
        break;
    case T_Q5_0: {
        float d = f16(b);
        fives32(b + 6, u32(b + 2), d, -16.0f * d, v);
        break;
    }
    case T_Q5_1:
        fives32(b + 8, u32(b + 4), f16(b), f16(b + 2), v);
        break;
    case T_Q8_0: {
        const v8f vd = splat(f16(b));
        for (int c = 0; c < 4; c++) v[c] = vd * __builtin_convertvector(sints8(b + 2 + 8 * c), v8f);
        break;
    }
    case T_Q4_K: { /* d dmin | scales[12] | qs[128]: 32-byte chunk c holds sub-blocks 2c (low), 2c+1 (high) */
        float d = f16(b), dmin = f16(b + 2);
        const uint8_t *q = b + 16;
        for (int c = 0; c < 4; c++) {
            float s1, m1, s2, m2;
            k4_scale_min(b + 4, 2 * c, &s1, &m1);
            k4_scale_min(b + 4, 2 * c + 1, &s2, &m2);
            const v8f d1 = splat(d * s1), o1 = splat(dmin * m1), d2 = splat(d * s2), o2 = splat(dmin * m2);
            for (int e = 0; e < 4; e++) {
                v8i qv = ints8(q + 32 * c + 8 * e);
                v[8 * c + e] = d1 * __builtin_convertvector(qv & 15, v8f) - o1;
                v[8 * c + 4 + e] = d2 * __builtin_convertvector(qv >> 4, v8f) - o2;
            }
        }
        break;
    }
    case T_Q6_K: { /* ql[128] | qh[64] | scales[16] int8 | d: two halves of 128 elements */
        float d = f16(b + 208);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
            const int8_t *sc = (const int8_t *)(b + 192 + 8 * h);
            /* quarter c (32 elements): nibble c/2 of ql[l + 32*(c%2)], bits 2c of qh[l]; a scale per 16 */
            for (int c = 0; c < 4; c++) {
                const uint8_t *lo = ql + 32 * (c % 2);
                const int nib = 4 * (c / 2), hb = 2 * c;
                for (int e = 0; e < 4; e++) {
                    v8i q = ((ints8(lo + 8 * e) >> nib) & 15) | (((ints8(qh + 8 * e) >> hb) & 3) << 4);
                    v[16 * h + 4 * c + e] = splat(d * (float)sc[2 * c + e / 2]) * __builtin_convertvector(q - 32, v8f);
                }
            }
        }
        break;
    }
    }
}

/* Inlined once per type (rows_of) so that each decoder is specialized and vectorized in its loop. */
static inline __attribute__((always_inline)) void rows_range(const float *x, int64_t m, int64_t k,
                                                             const uint8_t *w, int64_t n, const int type,
                                                             int64_t lo, int64_t hi, float *y) {
    const int be = BLOCK_ELEMS[type], bb = BLOCK_BYTES[type];
    const int64_t nb = k / be, row_bytes = nb * bb;
    v8f v[MAX_BLOCK / 8], acc[MAX_ROWS];
    for (int64_t i = lo; i < hi; i++) {
        const uint8_t *row = w + i * row_bytes;
        for (int64_t r = 0; r < m; r++) acc[r] = splat(0.0f);
        for (int64_t blk = 0; blk < nb; blk++) {
            decode_block(row + blk * bb, type, v);
            for (int64_t r = 0; r < m; r++) {
                const float *xr = x + r * k + blk * be;
                for (int c = 0; c < be / 8; c++) {
                    v8f xv;
                    memcpy(&xv, xr + 8 * c, 32);
                    acc[r] += v[c] * xv;
                }
            }
        }
        for (int64_t r = 0; r < m; r++) {
            float s = 0.0f;
            for (int l = 0; l < 8; l++) s += acc[r][l];
            y[r * n + i] = s;
        }
    }
}

static void rows_of(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, int type, int64_t lo,
                    int64_t hi, float *y) {
    if (m == 1) { /* decode: the row loop vanishes */
        switch (type) {
        case T_Q4_0: rows_range(x, 1, k, w, n, T_Q4_0, lo, hi, y); break;
        case T_Q4_1: rows_range(x, 1, k, w, n, T_Q4_1, lo, hi, y); break;
        case T_Q5_0: rows_range(x, 1, k, w, n, T_Q5_0, lo, hi, y); break;
        case T_Q5_1: rows_range(x, 1, k, w, n, T_Q5_1, lo, hi, y); break;
        case T_Q8_0: rows_range(x, 1, k, w, n, T_Q8_0, lo, hi, y); break;
        case T_Q4_K: rows_range(x, 1, k, w, n, T_Q4_K, lo, hi, y); break;
        case T_Q6_K: rows_range(x, 1, k, w, n, T_Q6_K, lo, hi, y); break;
        }
        return;
    }
    switch (type) {
    case T_Q4_0: rows_range(x, m, k, w, n, T_Q4_0, lo, hi, y); break;
    case T_Q4_1: rows_range(x, m, k, w, n, T_Q4_1, lo, hi, y); break;
    case T_Q5_0: rows_range(x, m, k, w, n, T_Q5_0, lo, hi, y); break;
    case T_Q5_1: rows_range(x, m, k, w, n, T_Q5_1, lo, hi, y); break;
    case T_Q8_0: rows_range(x, m, k, w, n, T_Q8_0, lo, hi, y); break;
    case T_Q4_K: rows_range(x, m, k, w, n, T_Q4_K, lo, hi, y); break;
    case T_Q6_K: rows_range(x, m, k, w, n, T_Q6_K, lo, hi, y); break;
    }
}

/* Rows [lo, hi) of W against every activation row, MAX_ROWS activation rows per pass over W. */
static void chunks(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, int type, int64_t lo,
                   int64_t hi, float *y) {
    for (int64_t r0 = 0; r0 < m; r0 += MAX_ROWS)
        rows_of(x + r0 * k, m - r0 < MAX_ROWS ? m - r0 : MAX_ROWS, k, w, n, type, lo, hi, y + r0 * n);
}

/* Whether the kernel multiplies rows of `type` holding k values (whole blocks). */
static int takes(int type, int64_t k) { return type >= T_Q4_0 && type <= T_Q6_K && k % BLOCK_ELEMS[type] == 0; }

/* y[p] (m, n[p]) = x (m, k) @ W[p].T for `count` weights that share x (q, k and v; gate and up): one parallel
 * region, the row chunks of every product handed out together, so the workers wake once instead of once per
 * product. Each output row is computed by one thread, in the same order whatever the grouping or the thread
 * count. Returns 0, or -1 for arguments it cannot handle (the caller then takes the MLX path). */
int applelm_gguf_matmul_many(const float *x, int64_t m, int64_t k, int count, const uint8_t *const *w,
                             const int64_t *n, const int *types, int threads, float *const *y) {
    enum { MAX_PRODUCTS = 8 };
    int64_t first[MAX_PRODUCTS + 1] = {0}, rows = 0; /* first chunk of each product */
    if (count < 1 || count > MAX_PRODUCTS || m < 1 || k <= 0 || threads < 1) return -1;
    for (int p = 0; p < count; p++) {
        if (!takes(types[p], k) || n[p] < 0) return -1;
        first[p + 1] = first[p] + row_chunks(n[p]);
        rows += n[p];
    }
#ifdef _OPENMP
    threads = threads_for(rows, threads);
#else
    threads = 1;
#endif
    if (threads == 1) { /* no parallel region, and each product as one range of rows */
        for (int p = 0; p < count; p++) chunks(x, m, k, w[p], n[p], types[p], 0, n[p], y[p]);
        return 0;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(runtime)
#endif
    for (int64_t c = 0; c < first[count]; c++) {
        int p = 0;
        while (c >= first[p + 1]) p++;
        const int64_t lo = (c - first[p]) * ROW_CHUNK;
        chunks(x, m, k, w[p], n[p], types[p], lo, chunk_end(lo, n[p]), y[p]);
    }
    return 0;
}

/* y (m, n) = x (m, k) @ W.T for n packed rows of `type`: the one-weight case of applelm_gguf_matmul_many. */
int applelm_gguf_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, int type,
                        int threads, float *y) {
    return applelm_gguf_matmul_many(x, m, k, 1, &w, &n, &type, threads, &y);
}

/* The gated FFN of m activation rows in one call: y (m, k) = (act(x @ gate.T) * (x @ up.T)) @ down.T, with
 * gate and up (hidden, k) and down (k, hidden) packed rows of their own types, act 0 = silu, 1 = gelu (tanh),
 * 2 = relu.
 * scratch holds 2 * m * hidden floats. Threads take chunks of gate and up rows (each computing its rows of the
 * gated product), meet at one barrier, then take chunks of down rows: one wake-up per FFN, and no round trip
 * to the caller between the three products. Returns 0, or -1 for arguments it cannot handle. */
int applelm_gguf_ffn(const float *x, int64_t m, int64_t k, int64_t hidden, const uint8_t *gate, int gate_type,
                     const uint8_t *up, int up_type, const uint8_t *down, int down_type, int act, int threads,
                     float *scratch, float *y) {
    if (m < 1 || k <= 0 || hidden <= 0 || threads < 1) return -1;
    if (!known_activation(act)) return -1;
    if (!takes(gate_type, k) || !takes(up_type, k) || !takes(down_type, hidden)) return -1;
    float *h = scratch, *u = scratch + m * hidden;
    const int64_t up_chunks = row_chunks(hidden), down_chunks = row_chunks(k);
    threads = threads_for(hidden, threads);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(runtime)
#endif
        for (int64_t c = 0; c < up_chunks; c++) {
            const int64_t lo = c * ROW_CHUNK, hi = chunk_end(lo, hidden);
            chunks(x, m, k, gate, hidden, gate_type, lo, hi, h);
            chunks(x, m, k, up, hidden, up_type, lo, hi, u);
            for (int64_t r = 0; r < m; r++)
                for (int64_t i = r * hidden + lo; i < r * hidden + hi; i++) h[i] = activation(h[i], act) * u[i];
        }
#ifdef _OPENMP
#pragma omp for schedule(runtime)
#endif
        for (int64_t c = 0; c < down_chunks; c++)
            chunks(h, m, hidden, down, k, down_type, c * ROW_CHUNK, chunk_end(c * ROW_CHUNK, k), y);
    }
    return 0;
}

/* Entry points of the MLX primitive (ops/host_call.cpp), which runs them on MLX's CPU stream inside the graph:
 * in = the inputs' data, out = the outputs', a = the integer arguments. A primitive cannot raise, and the
 * caller checked every argument, so a refusal only fills the outputs with NaN, where it cannot go unseen. */
/* a = {m, k, count, threads, n[count], types[count]}; in = {x, w[count]}; out = {y[count]}. */
int applelm_gguf_matmul_many_entry(const void *const *in, void *const *out, const int64_t *a) {
    enum { MAX_PRODUCTS = 8 };
    const int count = (int)a[2];
    int types[MAX_PRODUCTS];
    if (count < 1 || count > MAX_PRODUCTS) return -1;
    for (int p = 0; p < count; p++) types[p] = (int)a[4 + count + p];
    const int rc = applelm_gguf_matmul_many((const float *)in[0], a[0], a[1], count, (const uint8_t *const *)(in + 1),
                                            a + 4, types, (int)a[3], (float *const *)out);
    if (rc)
        for (int p = 0; p < count; p++) fill_nan((float *)out[p], a[0] * a[4 + p]);
    return rc;
}

/* a = {m, k, hidden, gate_type, up_type, down_type, act, threads}; in = {x, gate, up, down};
 * out = {y (m, k), scratch (2 * m * hidden)}. */
int applelm_gguf_ffn_entry(const void *const *in, void *const *out, const int64_t *a) {
    const int rc = applelm_gguf_ffn((const float *)in[0], a[0], a[1], a[2], (const uint8_t *)in[1], (int)a[3],
                                    (const uint8_t *)in[2], (int)a[4], (const uint8_t *)in[3], (int)a[5], (int)a[6],
                                    (int)a[7], (float *)out[1], (float *)out[0]);
    if (rc) fill_nan((float *)out[0], a[0] * a[1]);
    return rc;
}
