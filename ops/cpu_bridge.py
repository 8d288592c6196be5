"""CPU fast path: turn a chunk of GGUF blocks into MLX's affine layout on the fly and call mx.quantized_matmul.

Formats whose scale groups are 32 elements and whose values are affine in an unsigned code (w = s*q + b)
map onto MLX's affine quantization without any float weight: only a transient byte array per chunk
(1 byte per element, or the original nibbles for Q4_0/Q4_1) is made. Measured on the 2-core CPU
(benchmarks/qmatmul_bench.py --cpu-small) this beats dequantize-then-matmul for few activation rows;
Q2_K/Q3_K/Q6_K (16-element scales, which MLX's group sizes 32/64/128 cannot express) stay on the
reference path. The packed weight itself is never changed or kept in another form.
"""

from __future__ import annotations

import mlx.core as mx

from .ggml_types import GGML_TYPES_BY_NAME
from .reference import _k4_scales, _nibbles, _q5_high, chain_chunks

# Bytes of transient codes per chunk (16 MiB): bounded however large the matrix is.
CHUNK_CODES = 1 << 24


def _half(h: mx.array, index: int) -> mx.array:
    return h[..., index].view(mx.float16).astype(mx.float32)


def _codes_q8_0(b, h):  # int8 -> unsigned by flipping the sign bit: w = d*(u - 128)
    d = _half(h, 0)
    return mx.bitwise_xor(b[..., 2:34], mx.array(128, mx.uint8)), d, -128 * d


def _codes_q5_0(b, h):
    q = mx.bitwise_or(_nibbles(b[..., 6:22]).reshape(*b.shape[:-1], 32), _q5_high(b[..., 2:6]))
    d = _half(h, 0)
    return q, d, -16 * d


def _codes_q5_1(b, h):
    q = mx.bitwise_or(_nibbles(b[..., 8:24]).reshape(*b.shape[:-1], 32), _q5_high(b[..., 4:8]))
    return q, _half(h, 0), _half(h, 1)


def _codes_q4_k(b, h):
    lead = b.shape[:-1]
    sc, mn = _k4_scales(b[..., 4:16])
    q = _nibbles(b[..., 16:144].reshape(*lead, 4, 32)).reshape(*lead, 8, 32)
    return q, _half(h, 0)[..., None] * sc, -(_half(h, 1)[..., None] * mn)


def _codes_q5_k(b, h):
    lead = b.shape[:-1]
    sc, mn = _k4_scales(b[..., 4:16])
    low = _nibbles(b[..., 48:176].reshape(*lead, 4, 32)).reshape(*lead, 8, 32)
    q = mx.bitwise_or(low, mx.left_shift(_bits8(b[..., 16:48]), 4))
    return q, _half(h, 0)[..., None] * sc, -(_half(h, 1)[..., None] * mn)


def _bits8(qh: mx.array) -> mx.array:
    return mx.bitwise_and(mx.right_shift(qh[..., None, :], mx.array([[i] for i in range(8)], mx.uint8)), 1)


# 8-bit code makers: (blocks, halves) -> (codes (..., block elements) uint8, scales, biases per 32 elements)
_CODES8 = {"Q8_0": _codes_q8_0, "Q5_0": _codes_q5_0, "Q5_1": _codes_q5_1, "Q4_K": _codes_q4_k, "Q5_K": _codes_q5_k}
# 4-bit formats keep their nibbles; the activations are permuted instead (see _mm4).
_NIBBLE = {"Q4_0": 2, "Q4_1": 4}  # byte offset of qs in the block
BRIDGEABLE = tuple(_CODES8) + tuple(_NIBBLE)


def _mm8(xf, packed, ggml_type, n_cols):
    t = GGML_TYPES_BY_NAME[ggml_type]
    rows = packed.shape[0]
    b = packed.reshape(rows, -1, t.type_size)
    h = packed.view(mx.uint16).reshape(rows, -1, t.type_size // 2)
    q, s, bias = _CODES8[ggml_type](b, h)
    q = q.reshape(rows, n_cols).view(mx.uint32)
    s, bias = s.reshape(rows, -1), bias.reshape(rows, -1)
    return mx.quantized_matmul(xf, q, s, bias, transpose=True, group_size=32, bits=8)


def _mm4(xp, packed, ggml_type, n_cols):
    # Q4_0/Q4_1 byte j holds elements j (low nibble) and j+16 (high); MLX reads a byte as elements 2j, 2j+1.
    # xp is x already permuted to that order, so the nibbles are used in place.
    t = GGML_TYPES_BY_NAME[ggml_type]
    rows = packed.shape[0]
    off = _NIBBLE[ggml_type]
    b = packed.reshape(rows, -1, t.type_size)
    h = packed.view(mx.uint16).reshape(rows, -1, t.type_size // 2)
    q = b[..., off : off + 16].reshape(rows, n_cols // 2).view(mx.uint32)
    d = _half(h, 0)
    bias = -8 * d if ggml_type == "Q4_0" else _half(h, 1)
    return mx.quantized_matmul(xp, q, d, bias, transpose=True, group_size=32, bits=4)


def bridge_matmul(x: mx.array, packed: mx.array, ggml_type: str, n_cols: int,
                  chunk_codes: int = CHUNK_CODES) -> mx.array:
    """x (..., n_cols) @ W.T for a BRIDGEABLE format via mx.quantized_matmul, in float32; result in x's dtype."""
    lead = x.shape[:-1]
    xf = x.reshape(-1, n_cols).astype(mx.float32)
    if ggml_type in _NIBBLE:
        m = xf.shape[0]
        xf = mx.swapaxes(xf.reshape(m, -1, 2, 16), -1, -2).reshape(m, n_cols)
        mm = _mm4
    else:
        mm = _mm8
    rows = packed.shape[0]
    step = max(1, chunk_codes // n_cols)
    out = mx.concatenate(chain_chunks(lambda p: mm(xf, p, ggml_type, n_cols), packed, step), axis=-1)
    return out.reshape(*lead, rows).astype(x.dtype)
