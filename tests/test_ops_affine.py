"""MLX affine quantization through the swap factory: equals mx.quantized_matmul; other modes pass through."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from applelm.ops import AffineQuantizedLinear, affine_matmul, dispatch, make_quantized_module


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_affine_linear_equals_quantized_matmul(bits, group_size):
    mx.random.seed(0)
    lin = nn.Linear(256, 24, bias=True)
    q = make_quantized_module(lin, {"mode": "affine", "bits": bits, "group_size": group_size})
    assert isinstance(q, AffineQuantizedLinear)
    assert q.bits == bits and q.group_size == group_size
    for rows in (1, 3, 64):
        x = mx.random.normal((rows, 256))
        want = mx.quantized_matmul(x, q.weight, q.scales, q.biases, transpose=True, group_size=group_size,
                                   bits=bits) + q.bias
        # on the CPU the compiled kernel sums in another order: float32 rounding, relative to the magnitudes
        scale = float((mx.abs(x) @ mx.abs(mx.dequantize(q.weight, q.scales, q.biases, group_size, bits)).T).max())
        np.testing.assert_allclose(np.array(q(x)) / scale, np.array(want) / scale, rtol=0, atol=2e-6)


def test_affine_strict_load_weights_roundtrip():
    src = make_quantized_module(nn.Linear(128, 8), {"mode": "affine", "bits": 4, "group_size": 64})
    dst = make_quantized_module(nn.Linear(128, 8), {"mode": "affine", "bits": 4, "group_size": 64})
    dst.load_weights(tree_flatten(src.parameters()), strict=True)
    x = mx.random.normal((2, 128))
    np.testing.assert_array_equal(np.array(dst(x)), np.array(src(x)))


def test_affine_decode_table_has_no_ours_entry(monkeypatch):
    # The H100 run found our matvec no faster than MLX's beyond noise, so GPU decode keeps mx.quantized_matmul
    # (checked here on the CPU with the backend reported as CUDA).
    assert "ours" not in dispatch.AFFINE_TABLE.values()
    monkeypatch.setattr(dispatch, "backend", lambda: "cuda")
    w, s, b = mx.quantize(mx.random.normal((16, 128)), group_size=64, bits=4)
    x = mx.random.normal((1, 128))
    np.testing.assert_array_equal(np.array(affine_matmul(x, w, s, b, 4, 64)),
                                  np.array(mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4)))


def test_gpu_affine_prefill_dequantizes_in_bounded_chunks(monkeypatch):
    # On a GPU, >= GPU_AFFINE_DEQUANT_MIN_ROWS rows take dequantize-then-matmul, a scratch chunk at a time;
    # the arithmetic is plain MLX, so it is checked here on the CPU with the backend reported as CUDA.
    monkeypatch.setattr(dispatch, "backend", lambda: "cuda")
    monkeypatch.setattr(dispatch, "GPU_SCRATCH_ELEMENTS", 10 * 128)  # 10 weight rows per chunk: 4 chunks
    w, s, b = mx.quantize(mx.random.normal((36, 128), key=mx.random.key(3)), group_size=64, bits=4)
    rows = dispatch.GPU_AFFINE_DEQUANT_MIN_ROWS
    x = mx.random.normal((2, rows // 2, 128), key=mx.random.key(4))
    got = affine_matmul(x, w, s, b, 4, 64)
    want = x @ mx.dequantize(w, s, b, 64, 4).T
    assert got.shape == (2, rows // 2, 36)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_embedding_and_other_modes():
    emb = make_quantized_module(nn.Embedding(32, 128), {"mode": "affine", "bits": 8, "group_size": 32})
    assert isinstance(emb, nn.QuantizedEmbedding)  # an AffineQuantizedEmbedding (tests/test_ops_cpu_affine.py)
    other = make_quantized_module(nn.Linear(128, 16), {"mode": "mxfp4"})
    assert isinstance(other, nn.QuantizedLinear) and other.mode == "mxfp4"
