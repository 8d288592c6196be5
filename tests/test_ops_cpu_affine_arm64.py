"""The affine CPU kernel (ops/affine_cpu.c) built for arm64 (what a Mac compiles: clang, -mcpu=apple-m1, so
the generic vector code and hardware float16 instead of x86 intrinsics) and run under qemu, against the
dequantized product in float64, with and without OpenMP. Tools: tests/arm64_tools.py."""

from __future__ import annotations

import numpy as np
import pytest
from arm64_tools import driver_fixture, needs_arm64, run_driver
from test_ops_cpu_affine import dense, quantized

import mlx.core as mx
from applelm.ops.cpu_native import AFFINE_SOURCE, SCALE_FORMATS

pytestmark = needs_arm64

DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
int applelm_affine_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, const void *scales,
                          const void *biases, int sfmt, int64_t n, int bits, int group, int threads, float *y);
int main(void) { /* stdin: m k n bits group sfmt threads (int64), x (float32), w, scales, biases; stdout: y */
    int64_t h[7];
    if (fread(h, 8, 7, stdin) != 7) return 2;
    size_t mk = (size_t)(h[0] * h[1]), mn = (size_t)(h[0] * h[2]), wb = (size_t)(h[2] * h[1] * h[3] / 8);
    size_t sb = (size_t)(h[2] * (h[1] / h[4]) * (h[5] == 0 ? 4 : 2));
    float *x = malloc(mk * 4 + 4), *y = malloc(mn * 4 + 4);
    uint8_t *w = malloc(wb + 1), *s = malloc(sb + 1), *b = malloc(sb + 1);
    if (fread(x, 4, mk, stdin) != mk || fread(w, 1, wb, stdin) != wb || fread(s, 1, sb, stdin) != sb ||
        fread(b, 1, sb, stdin) != sb)
        return 3;
    if (applelm_affine_matmul(x, h[0], h[1], w, s, b, (int)h[5], h[2], (int)h[3], (int)h[4], (int)h[6], y)) return 4;
    fwrite(y, 4, mn, stdout);
    return 0;
}
"""


arm64_driver = driver_fixture(AFFINE_SOURCE, DRIVER, "affine-arm64")


def raw(a: mx.array) -> bytes:
    return bytes(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a))


@pytest.mark.parametrize("bits,group_size,scale_dtype", [(4, 32, mx.float16), (4, 128, mx.float32),
                                                         (8, 64, mx.bfloat16)])
def test_arm64_kernel_matches_dequantized_product(arm64_driver, bits, group_size, scale_dtype):
    driver, flavour = arm64_driver
    n, k, m = 150, 256, 3
    wq, s, b = quantized(n, k, bits, group_size, scale_dtype, seed=11)
    w = dense(wq, s, b, bits, group_size)
    x = np.random.default_rng(4).standard_normal((m, k)).astype(np.float32)
    want = x.astype(np.float64) @ w.T
    scale = (np.abs(x) @ np.abs(w).T).max()
    for threads in (1, 2) if flavour == "openmp" else (1,):
        header = np.array([m, k, n, bits, group_size, SCALE_FORMATS[scale_dtype], threads], np.int64)
        proc = run_driver(driver, header.tobytes() + x.tobytes() + raw(wq) + raw(s) + raw(b))
        assert proc.returncode == 0, f"driver exit {proc.returncode}: {proc.stderr[-500:]!r}"
        got = np.frombuffer(proc.stdout, np.float32).reshape(m, n)
        np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=2e-6)
