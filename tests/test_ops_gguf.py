"""GGUF block formats on the CPU: dequantize vs the `gguf` package, matmul paths, modules, errors."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf_blocks import make_blocks, numpy_dequantize, random_blocks

from applelm.errors import UnsupportedError
from applelm.ops import GGUFEmbedding, GGUFLinear, SUPPORTED, dequantize, gguf_matmul, make_quantized_module
from applelm.ops import cpu_bridge, reference

K_QUANTS = [t for t in SUPPORTED if t.endswith("_K")]


def cols(ggml_type: str, k: int) -> int:
    return (256 if ggml_type in K_QUANTS else 32) * k


@pytest.mark.parametrize("ggml_type", SUPPORTED)
@pytest.mark.parametrize("maker", [make_blocks, random_blocks])
def test_dequantize_equals_gguf_package(ggml_type, maker):
    n_cols = cols(ggml_type, 3)
    packed = maker(ggml_type, 9, n_cols, seed=1)
    want = numpy_dequantize(packed, ggml_type)
    got = np.array(dequantize(mx.array(packed), ggml_type, n_cols))
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # same float32 operations in the same order: bit-exact


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q8_0", "Q3_K"])
def test_compiled_dequantize_matches(ggml_type):
    n_cols = cols(ggml_type, 2)
    packed = mx.array(random_blocks(ggml_type, 5, n_cols, seed=2))
    want = np.array(dequantize(packed, ggml_type, n_cols))
    got = np.array(dequantize(packed, ggml_type, n_cols, compiled=True))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# Tolerance of the float32 matmul paths against float64 numpy: accumulation-order rounding only.
RTOL, ATOL = 2e-5, 2e-5


@pytest.mark.parametrize("ggml_type", SUPPORTED)
@pytest.mark.parametrize("out_features", [1, 7, 300])
def test_matmul_paths_equal_numpy(ggml_type, out_features):
    n_cols = cols(ggml_type, 2 if ggml_type in K_QUANTS else 5)
    packed = make_blocks(ggml_type, out_features, n_cols, seed=out_features)
    w = numpy_dequantize(packed, ggml_type).astype(np.float64)
    rng = np.random.default_rng(3)
    pm = mx.array(packed)
    for rows in (1, 3, 64):
        x = rng.standard_normal((rows, n_cols)).astype(np.float32)
        want = x.astype(np.float64) @ w.T
        scale = np.abs(want).max() + 1e-6
        # small chunks force the chunked loop to run several times
        got = np.array(reference.gguf_matmul(mx.array(x), pm, ggml_type, n_cols, chunk_elements=4 * n_cols))
        np.testing.assert_allclose(got / scale, want / scale, rtol=RTOL, atol=ATOL)
        got = np.array(gguf_matmul(mx.array(x), pm, ggml_type, n_cols))
        np.testing.assert_allclose(got / scale, want / scale, rtol=RTOL, atol=ATOL)
        if ggml_type in cpu_bridge.BRIDGEABLE:
            got = np.array(cpu_bridge.bridge_matmul(mx.array(x), pm, ggml_type, n_cols, chunk_codes=3 * n_cols))
            np.testing.assert_allclose(got / scale, want / scale, rtol=RTOL, atol=ATOL)


def test_matmul_keeps_leading_dims_and_dtype():
    n_cols = 512
    packed = mx.array(random_blocks("Q4_K", 10, n_cols))
    x = mx.random.normal((2, 3, n_cols)).astype(mx.float16)
    y = gguf_matmul(x, packed, "Q4_K", n_cols)
    assert y.shape == (2, 3, 10) and y.dtype == mx.float16


@pytest.mark.parametrize("path", ["reference", "bridge"])
def test_chunking_bounds_transient_memory(path):
    # A 65536x640 Q8_0 head for one token: peak stays well under the 168 MB float weight, and does not grow
    # with the number of rows (chunks are chained so MLX cannot decode them all up front). MLX may keep a
    # few chunks in flight, so the bounds allow that much slack, far below the 8x of unchunked decoding.
    k = 640
    peaks = []
    for n in (8192, 65536):
        packed = mx.array(random_blocks("Q8_0", n, k))
        x = mx.random.normal((1, k))
        mx.eval(packed, x)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        if path == "reference":
            mx.eval(reference.gguf_matmul(x, packed, "Q8_0", k, chunk_elements=1 << 20))
        else:
            mx.eval(cpu_bridge.bridge_matmul(x, packed, "Q8_0", k, chunk_codes=1 << 20))
        peaks.append(mx.get_peak_memory() - base)
    assert peaks[1] < 65536 * k * 4 // 4, peaks
    assert peaks[1] < 3 * peaks[0] + (4 << 20), peaks


def _linear_roundtrip(ggml_type, out_features, n_cols, bias):
    packed = make_blocks(ggml_type, out_features, n_cols, seed=5)
    layer = make_quantized_module(nn.Linear(n_cols, out_features, bias=bias), {"mode": "gguf", "ggml_type": ggml_type})
    assert isinstance(layer, GGUFLinear)
    assert layer.weight.shape == packed.shape and layer.weight.dtype == mx.uint8
    weights = [("weight", mx.array(packed))] + ([("bias", mx.arange(out_features).astype(mx.float32))] if bias else [])
    layer.load_weights(weights, strict=True)
    x = np.random.default_rng(0).standard_normal((4, n_cols)).astype(np.float32)
    want = x.astype(np.float64) @ numpy_dequantize(packed, ggml_type).astype(np.float64).T
    if bias:
        want = want + np.arange(out_features)
    np.testing.assert_allclose(np.array(layer(mx.array(x))), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q5_0", "Q6_K", "Q8_0"])
def test_gguf_linear_from_linear_and_load_weights(ggml_type):
    _linear_roundtrip(ggml_type, 7, cols(ggml_type, 2), bias=ggml_type == "Q5_0")


def test_gguf_linear_strict_load_rejects_wrong_shape():
    layer = GGUFLinear.from_linear(nn.Linear(256, 4), "Q4_K")
    with pytest.raises(ValueError):
        layer.load_weights([("weight", mx.zeros((4, 100), dtype=mx.uint8))], strict=True)


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q6_K"])
def test_gguf_embedding_lookup_and_tied_head(ggml_type):
    num, dims = 50, cols(ggml_type, 1)
    packed = make_blocks(ggml_type, num, dims, seed=7)
    emb = make_quantized_module(nn.Embedding(num, dims), {"mode": "gguf", "ggml_type": ggml_type})
    assert isinstance(emb, GGUFEmbedding)
    emb.load_weights([("weight", mx.array(packed))], strict=True)
    table = numpy_dequantize(packed, ggml_type)
    ids = np.array([[3, 0, 49], [7, 7, 1]])
    np.testing.assert_array_equal(np.array(emb(mx.array(ids))), table[ids])
    x = np.random.default_rng(1).standard_normal((2, dims)).astype(np.float32)
    np.testing.assert_allclose(np.array(emb.as_linear(mx.array(x))), x @ table.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ggml_type", ["IQ2_XXS", "IQ4_NL", "TQ1_0", "Q8_1", "Q8_K", "F16", "NOPE"])
def test_unsupported_types_raise_naming_type_and_tensor(ggml_type):
    spec = {"mode": "gguf", "ggml_type": ggml_type, "name": "blk.3.ffn_down.weight"}
    for module in (nn.Linear(256, 8), nn.Embedding(8, 256)):
        with pytest.raises(UnsupportedError) as e:
            make_quantized_module(module, spec)
        assert ggml_type in str(e.value) and "blk.3.ffn_down.weight" in str(e.value)
    with pytest.raises(UnsupportedError):
        dequantize(mx.zeros((1, 66), dtype=mx.uint8), ggml_type, 256)


def test_columns_not_a_whole_block_raise():
    with pytest.raises(UnsupportedError, match="blk.0.attn_q.weight"):
        make_quantized_module(nn.Linear(640, 8), {"mode": "gguf", "ggml_type": "Q4_K", "name": "blk.0.attn_q.weight"})


def test_gpu_table_choices_follow_the_measured_entries():
    from applelm.ops import dispatch

    big = (4096, 4096)  # a "large" shape class, as measured on the H100
    assert dispatch.gguf_gpu_choice("Q8_0", *big, 1) == "matvec_r4"
    assert dispatch.gguf_gpu_choice("Q4_K", *big, 1) == "matvec_r2"
    assert dispatch.gguf_gpu_choice("Q6_K", *big, 4) == "tiled"
    assert dispatch.gguf_gpu_choice("Q4_0", *big, 512) == "dequant"
    # no entry (format or shape class never measured): defaults
    assert dispatch.gguf_gpu_choice("Q5_1", *big, 3) == "matvec_r2"
    assert dispatch.gguf_gpu_choice("Q8_0", 64, 64, 1) == "matvec_r2"
    assert dispatch.gguf_gpu_choice("Q5_1", 64, 64, 40) == "dequant"


@pytest.mark.parametrize("m,expect", [(1, "matvec"), (12, "tiled"), (40, "dequant")])
def test_gpu_dispatch_runs_the_chosen_variant(monkeypatch, m, expect):
    # The GPU kernels are stood in for by the reference math, to check the routing and the chunked scratch
    # (whose dtype now follows the activations) on this CPU-only machine.
    from applelm.ops import backends, dispatch

    n, k, fmt = 40, 64, "Q8_0"
    packed = mx.array(random_blocks(fmt, n, k, seed=5))
    called = []
    monkeypatch.setattr(dispatch, "backend", lambda: "cuda")
    monkeypatch.setattr(dispatch, "GGUF_GPU_TABLE", {(fmt, "small", "5-16"): "tiled"})
    monkeypatch.setattr(dispatch, "GPU_SCRATCH_ELEMENTS", 16 * k)  # 16 rows per chunk: 3 chunks
    monkeypatch.setattr(backends, "gguf_matvec", lambda be, x2, p, t, kk, rows_per_warp: called.append(
        f"matvec_r{rows_per_warp}") or reference.gguf_matmul(x2, p, t, kk))
    monkeypatch.setattr(backends, "gguf_tiled", lambda be, x2, p, t, kk: called.append("tiled") or
                        reference.gguf_matmul(x2, p, t, kk))
    monkeypatch.setattr(backends, "gguf_dequant", lambda be, p, t, kk, dt: called.append(("dequant", dt)) or
                        reference.dequantize(p, t, kk).astype(dt))
    x = mx.random.normal((m, k), key=mx.random.key(m))
    got = gguf_matmul(x, packed, fmt, k)
    want = np.array(x, dtype=np.float64) @ numpy_dequantize(np.array(packed), fmt).T
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4)
    if expect == "dequant":
        assert called == [("dequant", mx.float32)] * 3
    else:
        assert called == [expect if expect == "tiled" else "matvec_r2"]


@pytest.mark.parametrize("route", ["cpu", "gpu"])
@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q6_K"])
def test_prompt_scratch_bounds_the_dequantized_floats(ggml_type, route, monkeypatch):
    """dispatch.gguf_matmul(scratch_elements=s): a prompt's rows are dequantized s floats at a time (the
    flash GGUF-blocks store budgets for that); the result is the unbounded one's. route "gpu": the GPU's
    dequantize-then-matmul steps, with the kernel stood in for by the reference (MLX ops, so the
    ordering of the steps, which bounds the peak, is the one a GPU gets)."""
    from applelm.ops import backends, dispatch

    if route == "gpu":
        monkeypatch.setattr(dispatch, "backend", lambda: "cuda")
        monkeypatch.setattr(backends, "gguf_dequant", lambda be, p, t, k, dt: reference.dequantize(p, t, k).astype(dt))
    packed = mx.array(random_blocks(ggml_type, 1024, 1024, seed=3))
    x = mx.random.normal((40, 1024), key=mx.random.key(5))  # over the CPU kernel's rows: the dequantizing path
    mx.eval(packed, x)
    peaks, outs = [], []
    for scratch in (None, 1 << 16):
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        y = dispatch.gguf_matmul(x, packed, ggml_type, 1024, scratch_elements=scratch)
        mx.eval(y)
        peaks.append(mx.get_peak_memory() - base - y.nbytes)
        outs.append(np.array(y))
    np.testing.assert_array_equal(outs[1], outs[0])
    assert peaks[0] >= 4 * 1024 * 1024  # the whole matrix as float32 at once
    assert peaks[1] <= 8 * 4 * (1 << 16) < peaks[0] / 2, peaks
