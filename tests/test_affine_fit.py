"""The least-squares affine fit: MLX's packed layout, exact on weights already on a grid, never worse than
mx.quantize, and loadable as an ordinary nn.QuantizedLinear."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from applelm.affine_fit import fit_affine, pack


def rms(a, b) -> float:
    return float(mx.sqrt(mx.mean(mx.square(a.astype(mx.float32) - b.astype(mx.float32)))))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_layout(bits):
    codes = mx.array(np.random.default_rng(bits).integers(0, 2**bits, (3, 128)))
    packed = pack(codes, bits)
    assert packed.shape == mx.quantize(mx.zeros((3, 128)), group_size=32, bits=bits)[0].shape
    back = mx.dequantize(packed, mx.ones((3, 4)), mx.zeros((3, 4)), group_size=32, bits=bits)
    assert mx.array_equal(back, codes.astype(mx.float32))


def test_weights_on_a_grid_come_back_exactly():
    """A Q4_1-like matrix (each group of 32 = min + d * codes 0..15) is reproduced exactly; mx.quantize is not."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (64, 256))
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans its whole range, as Q4_1's quantizer makes it
    d = rng.uniform(0.01, 0.02, (64, 8, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.2, -0.1, (64, 8, 1)).astype(np.float16).astype(np.float32)
    w = mx.array((codes.reshape(64, 8, 32) * d + m).reshape(64, 256)).astype(mx.float16)
    ours = mx.dequantize(*fit_affine(w, 4, 32), group_size=32, bits=4)
    theirs = mx.dequantize(*mx.quantize(w, group_size=32, bits=4), group_size=32, bits=4)
    assert rms(ours, w) < 1e-4 < rms(theirs, w)


@pytest.mark.parametrize("bits,group_size", [(2, 64), (3, 64), (4, 32), (4, 128), (6, 64), (8, 64)])
def test_no_worse_than_mx_quantize(bits, group_size):
    w = (mx.random.normal((96, 256), key=mx.random.key(bits)) * 0.05).astype(mx.float16)
    packed, scales, biases = fit_affine(w, bits, group_size, chunk_elements=4096)  # several row chunks
    assert scales.dtype == biases.dtype == mx.float16 and scales.shape == (96, 256 // group_size)
    ours = rms(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits), w)
    theirs = rms(mx.dequantize(*mx.quantize(w, group_size=group_size, bits=bits), group_size=group_size, bits=bits), w)
    assert ours <= theirs * 1.001


def test_constant_group_and_quantized_linear():
    w = mx.concatenate([mx.full((4, 32), 0.25), mx.random.normal((4, 32), key=mx.random.key(1))], axis=1)
    packed, scales, biases = fit_affine(w, 4, 32, dtype=mx.float32)
    layer = nn.QuantizedLinear(64, 4, bias=False, group_size=32, bits=4)
    layer.weight, layer.scales, layer.biases = packed, scales, biases
    x = mx.random.normal((2, 64), key=mx.random.key(2))
    dense = mx.dequantize(packed, scales, biases, group_size=32, bits=4)
    assert mx.allclose(dense[:, :32], mx.full((4, 32), 0.25))
    assert mx.allclose(layer(x), x @ dense.T, atol=1e-5)
