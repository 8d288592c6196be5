"""The native flash kernel built for arm64 (what a Mac compiles) and run under qemu, against the same
float64 reference as tests/test_flash_native.py. No Mac is reachable; this checks that clang builds
native_ffn.c for aarch64 with Apple-M1 features (float16 in hardware, no x86 intrinsics) and that that
build computes every store format correctly, with and without OpenMP (Apple's clang has no OpenMP by
default, so the fallback build without it is the usual one on a Mac). Tools: tests/arm64_tools.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from arm64_tools import driver_fixture, needs_arm64, run_driver

from applelm.flash.codec import BundleCodec
from applelm.flash.native import ACTIVATIONS, FORMATS, SOURCE
from test_flash_native import STORES, reference, sparse_reference

pytestmark = needs_arm64

DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
int applelm_bundle_ffn(const float *x, const uint8_t *bundles, int64_t n, int64_t H, int64_t part_bytes,
                       int fmt, int group, int act, int threads, float *out);
int applelm_sparse_ffn(const float *x, const uint8_t *base, const int64_t *offsets, int64_t n, int64_t stride,
                       int64_t H, int64_t part_bytes, int fmt, int group, int act, const float *coef, float thr,
                       int threads, float *out);
/* stdin, sparse entry (h[0] < 0): -n H part_bytes fmt group act threads has_coef buffer_bytes (int64),
 * thr, x, out, coef if has_coef (float32), offsets (int64), buffer (bytes). */
static int sparse_main(int64_t *h) {
    if (fread(h + 7, 8, 2, stdin) != 2) return 2;
    int64_t n = -h[0];
    size_t H = (size_t)h[1];
    float thr, *x = malloc(H * 4), *out = malloc(H * 4), *coef = h[7] ? malloc((size_t)n * 4 + 4) : NULL;
    int64_t *off = malloc((size_t)n * 8 + 8);
    uint8_t *buf = malloc((size_t)h[8] + 1);
    if (fread(&thr, 4, 1, stdin) != 1 || fread(x, 4, H, stdin) != H || fread(out, 4, H, stdin) != H) return 3;
    if ((coef && fread(coef, 4, (size_t)n, stdin) != (size_t)n) || fread(off, 8, (size_t)n, stdin) != (size_t)n ||
        fread(buf, 1, (size_t)h[8], stdin) != (size_t)h[8]) return 3;
    if (applelm_sparse_ffn(x, buf, off, n, h[2] * (h[7] ? 2 : 3), h[1], h[2], (int)h[3], (int)h[4], (int)h[5], coef, thr, (int)h[6], out))
        return 4;
    fwrite(out, 4, H, stdout);
    return 0;
}
int main(void) { /* stdin: n H part_bytes fmt group act threads (int64), x, out (float32), bundles */
    int64_t h[9];
    if (fread(h, 8, 7, stdin) != 7) return 2;
    if (h[0] < 0) return sparse_main(h);
    size_t H = (size_t)h[1], nb = (size_t)(h[0] * 3 * h[2]);
    float *x = malloc(H * 4), *out = malloc(H * 4);
    uint8_t *b = malloc(nb + 1);
    if (fread(x, 4, H, stdin) != H || fread(out, 4, H, stdin) != H || fread(b, 1, nb, stdin) != nb) return 3;
    if (applelm_bundle_ffn(x, b, h[0], h[1], h[2], (int)h[3], (int)h[4], (int)h[5], (int)h[6], out)) return 4;
    fwrite(out, 4, H, stdout);
    return 0;
}
"""


arm64_driver = driver_fixture(SOURCE, DRIVER, "arm64")


def run_arm64(driver: Path, x, raw, codec, act: str, threads: int, out0) -> np.ndarray:
    fmt = FORMATS[codec.bits if codec.quantized else codec.dtype]
    header = np.array([raw.shape[0], codec.hidden, codec.part_bytes, fmt, codec.group_size or 0, ACTIVATIONS[act],
                       threads], np.int64)
    stdin = header.tobytes() + x.tobytes() + out0.tobytes() + np.ascontiguousarray(raw).tobytes()
    proc = run_driver(driver, stdin)
    assert proc.returncode == 0, f"driver exit {proc.returncode}: {proc.stderr[-500:]!r}"
    return np.frombuffer(proc.stdout, np.float32)


@pytest.mark.parametrize("bits,dtype,group", STORES, ids=[f"{b}-{d}-{g}" for b, d, g in STORES])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("n,hidden", [(1, 64), (37, 192), (300, 128)])
def test_arm64_kernel_matches_reference(arm64_driver, bits, dtype, group, act, n, hidden):
    driver, flavour = arm64_driver
    rng = np.random.default_rng(n + hidden + bits)
    codec = BundleCodec(hidden, bits, dtype, group)
    raw = codec.encode((rng.standard_normal((n, 3, hidden)) * 0.3).astype(np.float32))
    x = rng.standard_normal(hidden).astype(np.float32)
    want = reference(codec, raw, x, act)
    for threads in (1, 3) if flavour == "openmp" else (1,):
        out0 = np.full(hidden, 0.25, np.float32)  # the kernel accumulates into out
        got = run_arm64(driver, x, raw, codec, act, threads, out0)
        np.testing.assert_allclose(got - 0.25, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_arm64_kernel_refuses_bad_geometry(arm64_driver):
    """An affine group that does not divide the hidden size is refused (rc -1: the caller keeps MLX)."""
    driver, _ = arm64_driver
    header = np.array([1, 96, 96 + 4, FORMATS[8], 64, 0, 1], np.int64)
    stdin = header.tobytes() + np.zeros(96 * 2, np.float32).tobytes() + bytes(3 * 100)
    proc = run_driver(driver, stdin)
    assert proc.returncode == 4


@pytest.mark.parametrize("bits,dtype,group", STORES, ids=[f"{b}-{d}-{g}" for b, d, g in STORES])
@pytest.mark.parametrize("how", ["gate-masked", "coef"])
def test_arm64_sparse_kernel_matches_reference(arm64_driver, bits, dtype, group, how):
    """The sparse entry (bundles at offsets, coefficients or the masked gate) on arm64."""
    driver, flavour = arm64_driver
    rng = np.random.default_rng(bits + len(how))
    hidden, n = 128, 29
    codec = BundleCodec(hidden, bits, dtype, group)
    parts = 2 if how == "coef" else 3
    raw = codec.encode((rng.standard_normal((n, 3, hidden)) * 0.3).astype(np.float32))[:, : parts * codec.part_bytes]
    x = rng.standard_normal(hidden).astype(np.float32)
    coef = np.where(rng.random(n) < 0.3, 0, rng.standard_normal(n)).astype(np.float32) if how == "coef" else None
    thr = -1.0 if coef is not None else 0.05
    want = sparse_reference(codec, raw, x, "silu", coef, thr)
    stride = raw.shape[1] + 13  # bundles at unaligned offsets with gaps, as coalesced reads leave them
    offsets = (np.arange(n) * stride + 5).astype(np.int64)
    buf = np.zeros(n * stride + 5, np.uint8)
    for i in range(n):
        buf[offsets[i]: offsets[i] + raw.shape[1]] = raw[i]
    header = np.array([-n, hidden, codec.part_bytes, FORMATS[codec.bits if codec.quantized else codec.dtype],
                       codec.group_size or 0, ACTIVATIONS["silu"], 2 if flavour == "openmp" else 1,
                       coef is not None, buf.size], np.int64)
    stdin = (header.tobytes() + np.float32(thr).tobytes() + x.tobytes() + np.zeros(hidden, np.float32).tobytes()
             + (coef.tobytes() if coef is not None else b"") + offsets.tobytes() + buf.tobytes())
    proc = run_driver(driver, stdin)
    assert proc.returncode == 0, f"driver exit {proc.returncode}: {proc.stderr[-500:]!r}"
    np.testing.assert_allclose(np.frombuffer(proc.stdout, np.float32), want, rtol=2e-4,
                               atol=2e-4 * np.abs(want).max())
