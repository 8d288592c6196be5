"""The GGUF CPU kernel (ops/gguf_cpu.c) built for arm64 (what a Mac compiles: clang, -mcpu=apple-m1, so
the generic vector code and hardware float16 instead of x86 intrinsics) and run under qemu, against the
`gguf` package's numpy dequantizers, with and without OpenMP (Apple's clang has none by default).

Needs clang, an aarch64 sysroot and qemu-aarch64 (Debian: apt-get install libc6-dev-arm64-cross
libgcc-12-dev-arm64-cross qemu-user); skipped without them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf_blocks import make_blocks, numpy_dequantize, random_blocks

from applelm.ops.cpu_native import SOURCE, TYPES

CLANG = shutil.which("clang")
QEMU = shutil.which("qemu-aarch64")
SYSROOT = Path("/usr/aarch64-linux-gnu")
pytestmark = pytest.mark.skipif(not (CLANG and QEMU and SYSROOT.is_dir()),
                                reason="needs clang, qemu-aarch64 and an aarch64 sysroot")

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


@pytest.fixture(scope="module", params=["openmp", "no-openmp"])
def arm64_driver(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"gguf-arm64-{request.param}")
    (out / "driver.c").write_text(DRIVER)
    # native_build.py's flags (-O3 -ffast-math -std=c11, -mcpu=native on arm64) with an M1 as the native CPU.
    cmd = [CLANG, "--target=aarch64-linux-gnu", f"--sysroot={SYSROOT}", "--gcc-toolchain=/usr", "-fuse-ld=lld",
           "-static", "-O3", "-ffast-math", "-std=c11", "-mcpu=apple-m1", str(SOURCE), str(out / "driver.c"),
           "-o", str(out / "driver"), "-lm"]
    if request.param == "openmp":
        cmd[1:1] = ["-fopenmp=libgomp"]
        cmd += ["-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "driver", request.param


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
        proc = subprocess.run([QEMU, str(driver)], input=header.tobytes() + x.tobytes() + packed.tobytes(),
                              capture_output=True)
        assert proc.returncode == 0, f"driver exit {proc.returncode}: {proc.stderr[-500:]!r}"
        got = np.frombuffer(proc.stdout, np.float32).reshape(m, n)
        np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=2e-6)


def test_arm64_kernel_refuses_partial_blocks(arm64_driver):
    driver, _ = arm64_driver
    header = np.array([1, 48, 2, TYPES["Q8_0"], 1, 2 * 34], np.int64)  # 48 columns: not whole blocks
    proc = subprocess.run([QEMU, str(driver)], input=header.tobytes() + bytes(48 * 4 + 2 * 34), capture_output=True)
    assert proc.returncode == 4
