"""The compiled GGUF CPU kernel (ops/gguf_cpu.c) against the `gguf` package's numpy dequantizers, and the
dispatcher's use of it: every format it handles, activation row counts across its 16-row passes, thread
counts, its argument checks, the mx.compile fallback and the fallback when it is unavailable."""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf_blocks import make_blocks, numpy_dequantize, random_blocks
from kernel_calls import GRAPH_MODES, record_calls
from portable_build import needs_x86_gcc, portable_function

from applelm import native_build
from applelm.ops import GGUFLinear, cpu_native, dispatch, gguf_matmul

if cpu_native.load() is None:
    pytest.skip("no C compiler: the GGUF CPU kernel cannot be built here", allow_module_level=True)

TYPES = list(cpu_native.TYPES)


def cols(ggml_type: str, blocks: int) -> int:
    return (256 if ggml_type.endswith("_K") else 32) * blocks


def expected(x: np.ndarray, packed: np.ndarray, ggml_type: str) -> np.ndarray:
    return x.astype(np.float64) @ numpy_dequantize(packed, ggml_type).astype(np.float64).T


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("maker", [make_blocks, random_blocks])
@pytest.mark.parametrize("out_features", [1, 7, 300])
def test_kernel_equals_numpy_dequantize(ggml_type, maker, out_features):
    n_cols = cols(ggml_type, 3)
    packed = maker(ggml_type, out_features, n_cols, seed=out_features)
    rng = np.random.default_rng(5)
    for rows in (1, 3, 16, 17, 40):  # 17 and 40: more than one 16-row pass over the weights
        x = rng.standard_normal((rows, n_cols)).astype(np.float32)
        want = expected(x, packed, ggml_type)
        got = cpu_native.matmul_numpy(x, packed, ggml_type)
        assert got.shape == (rows, out_features) and got.dtype == np.float32
        # float32 rounding of a sum is bounded relative to the sum of magnitudes, not to the result
        scale = (np.abs(x) @ np.abs(numpy_dequantize(packed, ggml_type)).T).max() + 1e-9
        np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=2e-6)


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0", "Q6_K"])
def test_result_does_not_depend_on_thread_count(ggml_type):
    n_cols = cols(ggml_type, 2)
    packed = make_blocks(ggml_type, 500, n_cols, seed=2)  # 500 rows: several threads get a share
    x = np.random.default_rng(1).standard_normal((3, n_cols)).astype(np.float32)
    one = cpu_native.matmul_numpy(x, packed, ggml_type, threads=1)
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(cpu_native.matmul_numpy(x, packed, ggml_type, threads=threads), one)


def test_import_sets_openmp_defaults_unless_set():
    """`import applelm` sets the libgomp settings the C kernels run under (OMP_WAIT_POLICY=PASSIVE,
    OMP_SCHEDULE=static) before anything loads OpenMP, and keeps values the user set."""
    code = "import os, applelm; print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_SCHEDULE'])"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_SCHEDULE")}

    def imported(**preset):
        return subprocess.run([sys.executable, "-c", code], env={**env, **preset}, capture_output=True, text=True,
                              check=True).stdout.split()

    assert imported() == ["PASSIVE", "static"]
    assert imported(OMP_WAIT_POLICY="ACTIVE", OMP_SCHEDULE="dynamic,1") == ["ACTIVE", "dynamic,1"]


def test_argument_checks():
    packed = make_blocks("Q8_0", 4, 64)
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match="float32"):
        cpu_native.matmul_numpy(x.astype(np.float64), packed, "Q8_0")
    with pytest.raises(ValueError, match="contiguous"):
        cpu_native.matmul_numpy(np.ones((64, 2), np.float32).T, packed, "Q8_0")
    with pytest.raises(ValueError, match="bytes"):
        cpu_native.matmul_numpy(x, packed.astype(np.int16), "Q8_0")
    with pytest.raises(ValueError, match="cannot multiply"):  # 48 columns: not whole Q8_0 blocks
        cpu_native.matmul_numpy(np.ones((1, 48), np.float32), packed, "Q8_0")
    with pytest.raises(ValueError, match="cannot multiply"):  # rows shorter than 96 columns need: never read
        cpu_native.matmul_numpy(np.ones((1, 96), np.float32), packed, "Q8_0")
    with pytest.raises(ValueError, match="not one of"):
        cpu_native.matmul_numpy(x, packed, "Q2_K")


@pytest.mark.parametrize("graph", GRAPH_MODES)
def test_dispatch_takes_the_kernel_on_cpu(monkeypatch, graph):
    calls = record_calls(monkeypatch, graph)
    packed = make_blocks("Q4_1", 64, 128, seed=4)
    x = mx.random.normal((2, 5, 128), key=mx.random.key(0))
    got = gguf_matmul(x, mx.array(packed), "Q4_1", 128)
    assert calls == ["matmul"] and got.shape == (2, 5, 64) and got.dtype == mx.float32
    want = expected(np.array(x).reshape(10, 128), packed, "Q4_1").reshape(2, 5, 64)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)
    assert gguf_matmul(x.astype(mx.bfloat16), mx.array(packed), "Q4_1", 128).dtype == mx.bfloat16
    # A strided float32 view (its rows are not contiguous in memory) is read by value, not by its buffer.
    xt = mx.random.normal((128, 3), key=mx.random.key(1)).T
    want = expected(np.ascontiguousarray(np.array(xt)), packed, "Q4_1")
    np.testing.assert_allclose(np.array(gguf_matmul(xt, mx.array(packed), "Q4_1", 128)), want, rtol=1e-5, atol=1e-5)
    calls.clear()  # prompts longer than the measured crossover dequantize instead
    rows = dispatch.CPU_NATIVE_MAX_ROWS + 1
    gguf_matmul(mx.zeros((rows, 128)), mx.array(packed), "Q4_1", 128)
    assert calls == []


@pytest.mark.parametrize("rows", [1, dispatch.CPU_NATIVE_MAX_ROWS + 1])
def test_host_rows_multiply_in_place_like_mlx_rows(monkeypatch, rows):
    """gguf_matmul_host (packed rows in a numpy read buffer, e.g. a flash chunk) gives gguf_matmul's
    result exactly; the kernel reads the buffer itself for a token, a prompt takes an MLX copy."""
    buffer = make_blocks("Q5_1", 3 * 40, 64, seed=9)[40:80]  # a view inside a larger buffer
    x = mx.random.normal((1, rows, 64), key=mx.random.key(4))
    seen = []
    real = cpu_native.matmul_numpy
    monkeypatch.setattr(cpu_native, "matmul_numpy", lambda xn, w, t, **k: seen.append(w) or real(xn, w, t, **k))
    got = dispatch.gguf_matmul_host(x, buffer, "Q5_1", 64)
    in_place = [w for w in seen if np.shares_memory(w, buffer)]
    assert len(in_place) == (1 if rows == 1 else 0)
    np.testing.assert_array_equal(np.array(got), np.array(gguf_matmul(x, mx.array(buffer), "Q5_1", 64)))
    assert dispatch.gguf_matmul_host(x.astype(mx.bfloat16), buffer, "Q5_1", 64).dtype == mx.bfloat16


@pytest.mark.parametrize("graph", GRAPH_MODES)
def test_inside_mx_compile(monkeypatch, graph):
    """mx.compile traces a graph-node kernel like any op; an eager one gives way to MLX ops there."""
    calls = record_calls(monkeypatch, graph)
    packed = mx.array(make_blocks("Q8_0", 32, 64, seed=6))
    layer = GGUFLinear(64, 32, "Q8_0")
    layer.weight = packed
    x = mx.random.normal((1, 64), key=mx.random.key(1))
    eager = layer(x)
    calls.clear()
    compiled = mx.compile(lambda v: layer(v))(x)
    np.testing.assert_allclose(np.array(compiled), np.array(eager), rtol=1e-5, atol=1e-5)
    assert calls == (["matmul"] if graph else [])


def test_unavailable_kernel_falls_back_to_mlx(monkeypatch):
    monkeypatch.setitem(native_build._built, cpu_native.SOURCE, None)  # as after APPLELM_NATIVE=off
    monkeypatch.setattr(cpu_native, "matmul_numpy", lambda *a, **k: pytest.fail("kernel used"))
    packed = make_blocks("Q4_0", 16, 64, seed=7)
    x = mx.random.normal((1, 64), key=mx.random.key(2))
    got = dispatch.gguf_matmul(x, mx.array(packed), "Q4_0", 64)
    np.testing.assert_allclose(np.array(got), expected(np.array(x), packed, "Q4_0"), rtol=1e-5, atol=1e-5)


def test_model_layers_decode_through_the_kernel(monkeypatch):
    """A quantized Linear inside an nn.Module tree: same output through the kernel and the MLX path."""
    packed = mx.array(make_blocks("Q5_0", 48, 96, seed=8))
    model = nn.Sequential(GGUFLinear(96, 48, "Q5_0"))
    model.layers[0].weight = packed
    x = mx.random.normal((1, 1, 96), key=mx.random.key(3))
    fast = model(x)
    monkeypatch.setitem(native_build._built, cpu_native.SOURCE, None)
    np.testing.assert_allclose(np.array(model(x)), np.array(fast), rtol=1e-5, atol=1e-5)


@needs_x86_gcc
def test_portable_build_equals_the_vectorized_one(tmp_path):
    """The source built without AVX2 (the generic vector code other CPUs, such as arm64, compile) gives
    the results of the AVX2 build to float32 rounding."""
    fn = portable_function(cpu_native.SOURCE, "applelm_gguf_matmul", cpu_native.SIGNATURES["applelm_gguf_matmul"],
                           tmp_path)
    rng = np.random.default_rng(9)
    for ggml_type in TYPES:
        n_cols = cols(ggml_type, 2)
        packed = random_blocks(ggml_type, 70, n_cols, seed=3)
        x = rng.standard_normal((3, n_cols)).astype(np.float32)
        out = np.empty((3, 70), np.float32)
        assert fn(x.ctypes.data, 3, n_cols, packed.ctypes.data, 70, cpu_native.TYPES[ggml_type], 1, out.ctypes.data) == 0
        want = cpu_native.matmul_numpy(x, packed, ggml_type)
        scale = (np.abs(x) @ np.abs(numpy_dequantize(packed, ggml_type)).T).max()
        np.testing.assert_allclose(out / scale, want / scale, rtol=0, atol=2e-6)
