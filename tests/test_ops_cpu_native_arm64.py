"""The GGUF CPU kernel (ops/gguf_cpu.c) built for arm64 (what a Mac compiles: clang, -mcpu=apple-m1, so
the generic vector code and hardware float16 instead of x86 intrinsics) and run under qemu, against the
`gguf` package's numpy dequantizers, with and without OpenMP. Tools: tests/arm64_tools.py."""

from __future__ import annotations

import numpy as np
import pytest
from arm64_tools import driver_fixture, needs_arm64, run_driver
from gguf_blocks import ffn_reference, ffn_weights, make_blocks, numpy_dequantize, random_blocks

from applelm.ops.cpu_native import ACTIVATIONS, SOURCE, TYPES

pytestmark = needs_arm64

DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
int applelm_gguf_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, int type,
                        int threads, float *y);
int main(void) { /* stdin: m k n type threads w_bytes (int64), x (float32, m*k), w (bytes); stdout: y */
    int64_t h[6];
    if (fread(h, 8, 6, stdin) != 6) return 2;
    size_t mk = (size_t)(h[0] * h[1]), mn = (size_t)(h[0] * h[2]), wb = (size_t)h[5];
    float *x = malloc(mk * 4 + 4), *y = malloc(mn * 4 + 4);
    uint8_t *w = malloc(wb + 1);
    if (fread(x, 4, mk, stdin) != mk || fread(w, 1, wb, stdin) != wb) return 3;
    if (applelm_gguf_matmul(x, h[0], h[1], w, h[2], (int)h[3], (int)h[4], y)) return 4;
    fwrite(y, 4, mn, stdout);
    return 0;
}
"""


arm64_driver = driver_fixture(SOURCE, DRIVER, "gguf-arm64")


@pytest.mark.parametrize("ggml_type", list(TYPES))
@pytest.mark.parametrize("maker", [make_blocks, random_blocks])
def test_arm64_kernel_matches_numpy(arm64_driver, ggml_type, maker):
    driver, flavour = arm64_driver
    k = (256 if ggml_type.endswith("_K") else 32) * 2
    n, m = 150, 3
    packed = maker(ggml_type, n, k, seed=11)
    x = np.random.default_rng(4).standard_normal((m, k)).astype(np.float32)
    w = numpy_dequantize(packed, ggml_type).astype(np.float64)
    want = x.astype(np.float64) @ w.T
    scale = (np.abs(x) @ np.abs(w).T).max()
    for threads in (1, 2) if flavour == "openmp" else (1,):
        header = np.array([m, k, n, TYPES[ggml_type], threads, packed.size], np.int64)
        proc = run_driver(driver, header.tobytes() + x.tobytes() + packed.tobytes())
        assert proc.returncode == 0, f"driver exit {proc.returncode}: {proc.stderr[-500:]!r}"
        got = np.frombuffer(proc.stdout, np.float32).reshape(m, n)
        np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=2e-6)


def test_arm64_kernel_refuses_partial_blocks(arm64_driver):
    driver, _ = arm64_driver
    header = np.array([1, 48, 2, TYPES["Q8_0"], 1, 2 * 34], np.int64)  # 48 columns: not whole blocks
    proc = run_driver(driver, header.tobytes() + bytes(48 * 4 + 2 * 34))
    assert proc.returncode == 4


FFN_DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
int applelm_gguf_ffn(const float *x, int64_t m, int64_t k, int64_t hidden, const uint8_t *gate, int gate_type,
                     const uint8_t *up, int up_type, const uint8_t *down, int down_type, int act, int threads,
                     float *scratch, float *y);
int main(void) { /* stdin: m k hidden gate_type up_type down_type act threads and the three byte counts
                    (int64), x (float32, m*k), gate, up, down (bytes); stdout: y (m*k float32) */
    int64_t h[11];
    if (fread(h, 8, 11, stdin) != 11) return 2;
    size_t mk = (size_t)(h[0] * h[1]);
    float *x = malloc(mk * 4), *y = malloc(mk * 4), *scratch = malloc((size_t)(2 * h[0] * h[2]) * 4);
    uint8_t *w[3];
    for (int p = 0; p < 3; p++) w[p] = malloc((size_t)h[8 + p]);
    if (fread(x, 4, mk, stdin) != mk) return 3;
    for (int p = 0; p < 3; p++)
        if (fread(w[p], 1, (size_t)h[8 + p], stdin) != (size_t)h[8 + p]) return 3;
    if (applelm_gguf_ffn(x, h[0], h[1], h[2], w[0], (int)h[3], w[1], (int)h[4], w[2], (int)h[5], (int)h[6],
                         (int)h[7], scratch, y)) return 4;
    fwrite(y, 4, mk, stdout);
    return 0;
}
"""


arm64_ffn_driver = driver_fixture(SOURCE, FFN_DRIVER, "gguf-ffn-arm64")


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
def test_arm64_fused_ffn_matches_numpy(arm64_ffn_driver, act):
    """The fused FFN (gate and up rows, the activation, down rows) as a Mac compiles it, against float64,
    with the K formats' large gates (where a naive exp would overflow)."""
    driver, flavour = arm64_ffn_driver
    m, k, hidden = 2, 256, 512
    gate, up, down = ffn_weights(k, hidden, ("Q4_K", "Q4_1", "Q6_K"), seed=5)
    x = np.random.default_rng(6).standard_normal((m, k)).astype(np.float32)
    want = ffn_reference(x, gate, up, down, act)
    for threads in (1, 2) if flavour == "openmp" else (1,):
        header = np.array([m, k, hidden, TYPES[gate[1]], TYPES[up[1]], TYPES[down[1]], ACTIVATIONS[act], threads,
                           gate[0].size, up[0].size, down[0].size], np.int64)
        proc = run_driver(driver, header.tobytes() + x.tobytes() + gate[0].tobytes() + up[0].tobytes()
                          + down[0].tobytes())
        assert proc.returncode == 0, f"driver exit {proc.returncode}: {proc.stderr[-500:]!r}"
        got = np.frombuffer(proc.stdout, np.float32).reshape(m, k)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=3e-5)
