/* Decode attention on the CPU: one query per row against that row's cached keys and values.
 *
 * MLX's CPU path runs this as small batched products (or its fused call, which repeats the keys of grouped
 * heads): at 16 rows and a few hundred keys that took ~1-3 ms a layer, most of a batched server step
 * (benchmarks/cpu_decode_attention.py). Here each (row, kv head) is one task that reads its keys and values
 * once, for all the query heads sharing them. Keys and values come as strided views (the cache's buffer up
 * to its used columns), so nothing is copied first. Each output is computed by one thread in a fixed order:
 * results do not depend on the thread count. Built at run time by ops/cpu_attention.py.
 */
#include <float.h>
#include <stdlib.h>

#include "cpu_vec.h"

static inline float dot(const float *a, const float *b, int64_t n, int64_t stride) {
    float s = 0.0f;
    if (stride == 1)
        for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    else
        for (int64_t i = 0; i < n; i++) s += a[i] * b[i * stride];
    return s;
}

/* One task: query heads r0..r1-1 of the rep sharing kv head g in row b. scores holds rep * (T + 1) floats.
 * Each key and value is read once for all of the task's heads (t is the outer loop). */
static void task(const float *q, const float *k, const float *v, const uint8_t *mask, int64_t H, int64_t rep,
                 int64_t D, int64_t T, float scale, const int64_t *ks, const int64_t *vs, int64_t b, int64_t g,
                 int64_t r0, int64_t r1, float *scores, float *out) {
    const float *kb = k + b * ks[0] + g * ks[1], *vb = v + b * vs[0] + g * vs[1];
    const int64_t nr = r1 - r0;
    float *inv = scores + nr * T;
    int64_t attended = 0;
    for (int64_t t = 0; t < T; t++)
        attended += !mask || mask[t];
    /* no key to attend: every key weighs the same (scores of 0), as in MLX's softmax of a fully masked row */
    const int uniform = !attended;
    if (uniform) mask = NULL;
    for (int64_t t = 0; t < T; t++) {
        if (mask && !mask[t]) continue;
        const float *kt = kb + t * ks[2];
        for (int64_t r = 0; r < nr; r++)
            scores[r * T + t] = uniform ? 0.0f : scale * dot(q + (b * H + g * rep + r0 + r) * D, kt, D, ks[3]);
    }
    for (int64_t r = 0; r < nr; r++) {
        float *s = scores + r * T, best = -FLT_MAX, total = 0.0f;
        for (int64_t t = 0; t < T; t++)
            if (!mask || mask[t]) best = s[t] > best ? s[t] : best;
        for (int64_t t = 0; t < T; t++) {
            s[t] = !mask || mask[t] ? expf(s[t] - best) : 0.0f;
            total += s[t];
        }
        inv[r] = 1.0f / total;
        float *o = out + (b * H + g * rep + r0 + r) * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
    }
    for (int64_t t = 0; t < T; t++) {
        if (mask && !mask[t]) continue;
        const float *vt = vb + t * vs[2];
        for (int64_t r = 0; r < nr; r++) {
            const float w = scores[r * T + t] * inv[r];
            float *o = out + (b * H + g * rep + r0 + r) * D;
            if (vs[3] == 1)
                for (int64_t d = 0; d < D; d++) o[d] += w * vt[d];
            else
                for (int64_t d = 0; d < D; d++) o[d] += w * vt[d * vs[3]];
        }
    }
}

/* out (B, H, D) = softmax(scale * q . k) v, q (B, H, D) contiguous; k and v (B, Hkv, T, D) at element strides
 * ks and vs; mask NULL or mask_rows (1 or B) rows of T bytes, nonzero = attend. Query head h reads kv head
 * h / (H / Hkv). Returns 0, or -1 for arguments it cannot handle. */
int applelm_decode_attention(const float *q, const float *k, const float *v, const uint8_t *mask, int64_t B,
                             int64_t H, int64_t Hkv, int64_t D, int64_t T, int64_t mask_rows, float scale,
                             const int64_t *ks, const int64_t *vs, int threads, float *out) {
    if (B < 1 || H < 1 || Hkv < 1 || H % Hkv || D < 1 || T < 1 || threads < 1) return -1;
    if (mask && mask_rows != 1 && mask_rows != B) return -1;
    /* A task per (row, kv head); per query head when those are fewer than the threads (one row of Gemma 3's
     * single kv head): each then reads the keys and values again, from the cache the first one warmed. */
    const int64_t rep = H / Hkv, per_head = B * Hkv < threads, tasks = per_head ? B * H : B * Hkv;
    /* ~32K multiply-adds per thread at least: below that waking a worker costs more than it saves */
    int64_t most = B * H * T * D / 32768;
    if (most < 1) most = 1;
    if (threads > most) threads = (int)most;
    if (threads > tasks) threads = (int)tasks;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
        float *scores = malloc(sizeof(float) * rep * (T + 1));
        if (!scores) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t c = 0; c < tasks; c++) {
            const int64_t b = per_head ? c / H : c / Hkv, g = per_head ? c % H / rep : c % Hkv;
            const int64_t r0 = per_head ? c % H % rep : 0, r1 = per_head ? r0 + 1 : rep;
            if (scores)
                task(q, k, v, mask ? mask + (mask_rows == 1 ? 0 : b) * T : NULL, H, rep, D, T, scale, ks, vs,
                     b, g, r0, r1, scores, out);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* Entry point of the MLX primitive (ops/host_call.cpp). a = {B, H, Hkv, D, T, mask_rows, scale as float32
 * bits, threads, then the strides of k and v (4 each, appended by the primitive)}; in = {q, k, v[, mask]};
 * out = {out}. A refusal fills the output with NaN. */
int applelm_decode_attention_entry(const void *const *in, void *const *out, const int64_t *a) {
    float scale;
    const uint32_t bits = (uint32_t)a[6];
    memcpy(&scale, &bits, 4);
    const int rc = applelm_decode_attention((const float *)in[0], (const float *)in[1], (const float *)in[2],
                                            a[5] ? (const uint8_t *)in[3] : NULL, a[0], a[1], a[2], a[3], a[4],
                                            a[5], scale, a + 8, a + 12, (int)a[7], (float *)out[0]);
    if (rc) fill_nan((float *)out[0], a[0] * a[1] * a[3]);
    return rc;
}
