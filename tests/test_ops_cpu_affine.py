"""The compiled affine CPU kernel (ops/affine_cpu.c) against MLX's dequantization done in float64 by numpy,
and the dispatcher's use of it: bits, group sizes, scale dtypes, activation row counts across its 16-row
passes, thread counts, argument checks, the tied head, the mx.compile fallback and the fallback when off."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_calls import GRAPH_MODES, record_calls
from portable_build import needs_x86_gcc, portable_function

from applelm import native_build
from applelm.ops import AffineQuantizedEmbedding, cpu_native, dispatch, make_quantized_module

if cpu_native.load_affine() is None:
    pytest.skip("no C compiler: the affine CPU kernel cannot be built here", allow_module_level=True)


def quantized(n: int, k: int, bits: int, group_size: int, scale_dtype=mx.float32, seed: int = 0):
    w = mx.random.normal((n, k), key=mx.random.key(seed))
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    return wq, s.astype(scale_dtype), b.astype(scale_dtype)


def dense(wq, s, b, bits, group_size) -> np.ndarray:
    """W in float64, from the codes unpacked by hand (not by MLX): element j of a row is bits-wide field j of
    the little-endian uint32 words."""
    words = np.array(wq).astype(np.uint64)
    per = 32 // bits
    codes = (words[:, :, None] >> (bits * np.arange(per, dtype=np.uint64))) & ((1 << bits) - 1)
    codes = codes.reshape(words.shape[0], -1).astype(np.float64)
    sc = np.repeat(np.array(s.astype(mx.float32), np.float64), group_size, axis=1)
    bi = np.repeat(np.array(b.astype(mx.float32), np.float64), group_size, axis=1)
    return sc * codes + bi


def check(got: np.ndarray, x: np.ndarray, w: np.ndarray, atol: float = 2e-6) -> None:
    # float32 rounding of a sum is bounded relative to the sum of magnitudes, not to the result
    scale = (np.abs(x) @ np.abs(w).T).max() + 1e-9
    np.testing.assert_allclose(got / scale, (x.astype(np.float64) @ w.T) / scale, rtol=0, atol=atol)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_kernel_equals_dequantized_product(bits, group_size, scale_dtype):
    wq, s, b = quantized(70, 384, bits, group_size, scale_dtype, seed=bits + group_size)
    w = dense(wq, s, b, bits, group_size)
    np.testing.assert_allclose(w, np.array(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32),
                                                         group_size, bits)), rtol=1e-6, atol=1e-6)
    for rows in (1, 3, 16, 17, 40):  # 17 and 40: more than one 16-row pass over the weights
        x = mx.random.normal((rows, 384), key=mx.random.key(rows))
        got = cpu_native.affine_matmul(x, wq, s, b, bits, group_size)
        assert got.shape == (rows, 70) and got.dtype == mx.float32
        check(np.array(got), np.array(x), w)


def test_leading_dimensions_and_activation_dtype():
    wq, s, b = quantized(33, 128, 4, 32)
    x = mx.random.normal((2, 3, 128), key=mx.random.key(9)).astype(mx.bfloat16)
    got = cpu_native.affine_matmul(x, wq, s, b, 4, 32)
    assert got.shape == (2, 3, 33) and got.dtype == mx.bfloat16
    want = x.astype(mx.float32).reshape(6, 128)
    # the result is rounded to bfloat16 (8 significant bits)
    check(np.array(got.astype(mx.float32)).reshape(6, 33), np.array(want), dense(wq, s, b, 4, 32), atol=4e-3)


@pytest.mark.parametrize("bits", [4, 8])
def test_result_does_not_depend_on_thread_count(bits):
    wq, s, b = quantized(500, 256, bits, 64, seed=3)  # 500 rows: several threads get a share
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    args = (np.array(wq), np.array(s), np.array(b), 0, bits, 64)
    one = cpu_native.affine_numpy(x, *args, threads=1)
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(cpu_native.affine_numpy(x, *args, threads=threads), one)


def test_argument_checks():
    wq, s, b = (np.array(a) for a in quantized(4, 64, 4, 32))
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match="float32"):
        cpu_native.affine_numpy(x.astype(np.float64), wq, s, b, 0, 4, 32)
    with pytest.raises(ValueError, match="cannot multiply"):
        cpu_native.affine_numpy(np.ones((1, 128), np.float32), wq, s, b, 0, 4, 32)  # k does not match the rows
    with pytest.raises(ValueError, match="cannot multiply"):
        cpu_native.affine_numpy(x, wq, s, b, 0, 4, 64)  # scales hold groups of 32
    with pytest.raises(ValueError, match="cannot multiply"):
        cpu_native.affine_numpy(x, wq, s.astype(np.float16), b, 0, 4, 32)  # declared float32, given 16-bit
    with pytest.raises(ValueError, match="cannot multiply"):
        cpu_native.affine_numpy(x, wq.astype(np.int64), s, b, 0, 4, 32)
    assert not cpu_native.affine_supported(3, 64, mx.array([1.0]))
    assert not cpu_native.affine_supported(4, 16, mx.array([1.0]))


def test_dispatch_takes_the_kernel_up_to_the_measured_rows(monkeypatch):
    wq, s, b = quantized(48, 256, 8, 64, seed=5)
    w = dense(wq, s, b, 8, 64)
    calls = []
    real = cpu_native.affine_matmul
    monkeypatch.setattr(cpu_native, "affine_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    most = dispatch.CPU_AFFINE_NATIVE_MAX_ROWS
    for rows in (1, most, most + 1):
        x = mx.random.normal((rows, 256), key=mx.random.key(rows))
        check(np.array(dispatch.affine_matmul(x, wq, s, b, 8, 64)), np.array(x), w)
    assert calls == [(1, 256), (most, 256)]


def test_quantized_linear_and_tied_head_use_it(monkeypatch):
    lin = make_quantized_module(nn.Linear(256, 24, bias=True), {"mode": "affine", "bits": 4, "group_size": 64})
    emb = make_quantized_module(nn.Embedding(40, 256), {"mode": "affine", "bits": 4, "group_size": 64})
    assert isinstance(emb, AffineQuantizedEmbedding) and isinstance(emb, nn.QuantizedEmbedding)
    calls = []
    real = cpu_native.affine_matmul
    monkeypatch.setattr(cpu_native, "affine_matmul", lambda *a: calls.append(a[1].shape) or real(*a))
    x = mx.random.normal((1, 256), key=mx.random.key(2))
    check(np.array(lin(x) - lin.bias), np.array(x), dense(lin.weight, lin.scales, lin.biases, 4, 64))
    check(np.array(emb.as_linear(x)), np.array(x), dense(emb.weight, emb.scales, emb.biases, 4, 64))
    assert calls == [(24, 32), (40, 32)]
    ids = mx.array([[3, 39]])  # lookups stay MLX's dequantization of the gathered rows
    np.testing.assert_array_equal(np.array(emb(ids)), np.array(mx.dequantize(
        emb.weight[ids], emb.scales[ids], emb.biases[ids], 64, 4)))


@pytest.mark.parametrize("graph", GRAPH_MODES)
def test_inside_compile(monkeypatch, graph):
    """mx.compile traces the kernel as a graph node, or runs MLX's quantized matmul when it is eager."""
    calls = record_calls(monkeypatch, graph)
    wq, s, b = quantized(16, 128, 4, 64)
    x = mx.random.normal((1, 128))
    fn = mx.compile(lambda a: dispatch.affine_matmul(a, wq, s, b, 4, 64))
    want = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    np.testing.assert_allclose(np.array(fn(x)), np.array(want), rtol=1e-5, atol=1e-5)
    assert calls == (["affine"] if graph else [])


def test_unavailable_kernel_falls_back_to_mlx(monkeypatch):
    monkeypatch.setattr(native_build, "_built", {cpu_native.AFFINE_SOURCE: None})
    assert not cpu_native.affine_supported(4, 64, mx.array([1.0]))
    wq, s, b = quantized(16, 128, 4, 64)
    x = mx.random.normal((1, 128))
    np.testing.assert_array_equal(np.array(dispatch.affine_matmul(x, wq, s, b, 4, 64)), np.array(
        mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)))


@needs_x86_gcc
def test_portable_build_equals_the_vectorized_one(tmp_path):
    """The source built without AVX2 (cpu_vec.h's generic vector code, which other CPUs compile) gives the
    results of the AVX2 build to float32 rounding, over bits, groups, scale formats and 16-row passes."""
    fn = portable_function(cpu_native.AFFINE_SOURCE, "applelm_affine_matmul",
                           cpu_native.AFFINE_SIGNATURES["applelm_affine_matmul"], tmp_path)
    rng = np.random.default_rng(4)
    for bits, group_size, scale_dtype in [(4, 32, mx.float32), (4, 64, mx.bfloat16), (4, 128, mx.float16),
                                          (8, 32, mx.float16), (8, 64, mx.float32), (8, 128, mx.bfloat16)]:
        wq, s, b = quantized(70, 256, bits, group_size, scale_dtype, seed=bits * group_size)
        w, raw_s, raw_b = np.array(wq), cpu_native._raw(s), cpu_native._raw(b)
        fmt = cpu_native.SCALE_FORMATS[scale_dtype]
        for rows in (1, 17):
            x = rng.standard_normal((rows, 256)).astype(np.float32)
            out = np.empty((rows, 70), np.float32)
            assert fn(x.ctypes.data, rows, 256, w.ctypes.data, raw_s.ctypes.data, raw_b.ctypes.data, fmt, 70,
                      bits, group_size, 1, out.ctypes.data) == 0
            vectorized = cpu_native.affine_numpy(x, w, raw_s, raw_b, fmt, bits, group_size)
            check(out, x, dense(wq, s, b, bits, group_size))
            np.testing.assert_allclose(out, vectorized, rtol=1e-5, atol=1e-5 * np.abs(vectorized).max())
