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
        np.testing.assert_allclose(np.array(q(x)), np.array(want), rtol=1e-6, atol=1e-6)


def test_affine_strict_load_weights_roundtrip():
    src = make_quantized_module(nn.Linear(128, 8), {"mode": "affine", "bits": 4, "group_size": 64})
    dst = make_quantized_module(nn.Linear(128, 8), {"mode": "affine", "bits": 4, "group_size": 64})
    dst.load_weights(tree_flatten(src.parameters()), strict=True)
    x = mx.random.normal((2, 128))
    np.testing.assert_array_equal(np.array(dst(x)), np.array(src(x)))


def test_affine_table_is_empty_without_gpu_figures():
    # Entries may only come from a GPU benchmark run; none exists yet, so MLX's kernel is used everywhere.
    assert dispatch.AFFINE_TABLE == {}
    w, s, b = mx.quantize(mx.random.normal((16, 128)), group_size=64, bits=4)
    x = mx.random.normal((1, 128))
    np.testing.assert_array_equal(np.array(affine_matmul(x, w, s, b, 4, 64)),
                                  np.array(mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4)))


def test_embedding_and_other_modes():
    emb = make_quantized_module(nn.Embedding(32, 128), {"mode": "affine", "bits": 8, "group_size": 32})
    assert isinstance(emb, nn.QuantizedEmbedding)
    other = make_quantized_module(nn.Linear(128, 16), {"mode": "mxfp4"})
    assert isinstance(other, nn.QuantizedLinear) and other.mode == "mxfp4"
