"""The GGUF CPU kernel (ops/gguf_cpu.c) built for arm64 (what a Mac compiles: clang, -mcpu=apple-m1, so
the generic vector code and hardware float16 instead of x86 intrinsics) and run under qemu, against the
`gguf` package's numpy dequantizers, with and without OpenMP. Tools: tests/arm64_tools.py."""

from __future__ import annotations

import numpy as np
import pytest
from arm64_tools import FLAVOURS, build_driver, needs_arm64, run_driver
from gguf_blocks import make_blocks, numpy_dequantize, random_blocks

from applelm.ops.cpu_native import SOURCE, TYPES

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


@pytest.fixture(scope="module", params=FLAVOURS)
def arm64_driver(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"gguf-arm64-{request.param}")
    return build_driver(SOURCE, DRIVER, out, request.param), request.param


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
