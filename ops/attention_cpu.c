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

/* One task: the rep query heads of kv head g in row b. scores holds rep * T floats. */
static void task(const float *q, const float *k, const float *v, const uint8_t *mask, int64_t H, int64_t rep,
                 int64_t D, int64_t T, float scale, const int64_t *ks, const int64_t *vs, int64_t b, int64_t g,
                 float *scores, float *out) {
    const float *kb = k + b * ks[0] + g * ks[1], *vb = v + b * vs[0] + g * vs[1];
    int64_t attended = 0;
    for (int64_t t = 0; t < T; t++)
        attended += !mask || mask[t];
    for (int64_t r = 0; r < rep; r++) {
        const int64_t h = g * rep + r;
        const float *qh = q + (b * H + h) * D;
        float *s = scores + r * T, best = -FLT_MAX, total = 0.0f;
        if (!attended) { /* no key to attend: all weigh the same, as in MLX's softmax of a fully masked row */
            for (int64_t t = 0; t < T; t++) s[t] = 1.0f;
            total = (float)T;
        } else {
            for (int64_t t = 0; t < T; t++)
                if (!mask || mask[t]) {
                    s[t] = scale * dot(qh, kb + t * ks[2], D, ks[3]);
                    best = s[t] > best ? s[t] : best;
                }
            for (int64_t t = 0; t < T; t++) {
                s[t] = !mask || mask[t] ? expf(s[t] - best) : 0.0f;
                total += s[t];
            }
        }
        const float inv = 1.0f / total;
        float *o = out + (b * H + h) * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            const float w = s[t] * inv;
            const float *vt = vb + t * vs[2];
            if (w == 0.0f) continue;
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
    const int64_t rep = H / Hkv, tasks = B * Hkv;
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
        float *scores = malloc(sizeof(float) * rep * T);
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
            const int64_t b = c / Hkv, g = c % Hkv;
            if (scores)
                task(q, k, v, mask ? mask + (mask_rows == 1 ? 0 : b) * T : NULL, H, rep, D, T, scale, ks, vs,
                     b, g, scores, out);
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
