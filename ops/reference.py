"""Plain-MLX reference path for GGUF block formats: dequantize, matmul and embedding lookup.

Runs on any device (used on CPU and in CI). Packed weights stay as the file's bytes, shaped
(rows, row_bytes) uint8; only the rows being multiplied are turned into floats, a chunk at a time.
Layouts follow ggml's block structs (ggml-common.h); each decoder below says which bytes mean what.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from ..errors import UnsupportedError
from .ggml_types import GGML_TYPES_BY_NAME, GGMLType

SUPPORTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# Float elements of transient weight per chunk (4 Mi floats = 16 MiB): big enough to keep BLAS busy,
# small enough that a 262144x640 output head never exists as floats at once.
CHUNK_ELEMENTS = 1 << 22


def ggml_type_info(ggml_type: str, where: str = "") -> GGMLType:
    """The GGMLType for a supported block format, or UnsupportedError naming the type (and tensor)."""
    if ggml_type not in SUPPORTED:
        place = f" (tensor {where})" if where else ""
        known = "a known GGML type" if ggml_type in GGML_TYPES_BY_NAME else "not a known GGML type"
        raise UnsupportedError(
            f"GGML type {ggml_type}{place} is not supported for quantized weights ({known}); "
            f"supported: {', '.join(SUPPORTED)}"
        )
    return GGML_TYPES_BY_NAME[ggml_type]


def _u(values) -> mx.array:
    return mx.array(values, dtype=mx.uint8)


def _f16(h: mx.array, index: int) -> mx.array:
    """The fp16 field at uint16 position `index` of each block, as float32 with a trailing axis of 1."""
    return h[..., index : index + 1].view(mx.float16).astype(mx.float32)


def _nibbles(qs: mx.array) -> mx.array:
    """(..., n) bytes -> (..., 2, n): low nibbles, then high nibbles."""
    return mx.bitwise_and(mx.right_shift(qs[..., None, :], _u([[0], [4]])), 15)


def _bits(qs: mx.array, shifts: list[int], mask: int) -> mx.array:
    """(..., n) bytes -> (..., len(shifts), n): the field at each shift."""
    return mx.bitwise_and(mx.right_shift(qs[..., None, :], _u([[s] for s in shifts])), mask)


def _q4_0(b, h):  # d:f16 | qs[16]: element j = low nibble of qs[j], j+16 = high nibble
    q = _nibbles(b[..., 2:18]).reshape(*b.shape[:-1], 32).astype(mx.float32)
    return (q - 8) * _f16(h, 0)


def _q4_1(b, h):  # d:f16 m:f16 | qs[16]: value = d*q + m
    q = _nibbles(b[..., 4:20]).reshape(*b.shape[:-1], 32).astype(mx.float32)
    return _f16(h, 0) * q + _f16(h, 1)


def _q5_high(qh: mx.array) -> mx.array:
    """4 bytes of a little-endian uint32 -> 32 bits, bit j for element j, shifted up to bit 4."""
    # (..., 4, 8) = [byte, bit]: bit index byte*8 + bit, no transpose needed.
    bits = mx.bitwise_and(mx.right_shift(qh[..., :, None], _u(list(range(8)))), 1)
    return mx.left_shift(bits.reshape(*qh.shape[:-1], 32), 4)


def _q5_0(b, h):  # d:f16 | qh:u32 | qs[16]: 4 low bits as Q4_0, bit 4 from qh bit j
    lead = b.shape[:-1]
    q = mx.bitwise_or(_nibbles(b[..., 6:22]).reshape(*lead, 32), _q5_high(b[..., 2:6]))
    return (q.astype(mx.float32) - 16) * _f16(h, 0)


def _q5_1(b, h):  # d:f16 m:f16 | qh:u32 | qs[16]: value = d*q + m
    lead = b.shape[:-1]
    q = mx.bitwise_or(_nibbles(b[..., 8:24]).reshape(*lead, 32), _q5_high(b[..., 4:8]))
    return _f16(h, 0) * q.astype(mx.float32) + _f16(h, 1)


def _q8_0(b, h):  # d:f16 | qs[32] int8
    return b[..., 2:34].view(mx.int8).astype(mx.float32) * _f16(h, 0)


def _q2_k(b, h):
    # scales[16] (low nibble scale, high nibble min, per 16 elements) | qs[64] | d:f16 | dmin:f16.
    # Element n*128 + j*32 + l is bits 2j of qs[n*32 + l]; its scale/min index is element // 16.
    lead = b.shape[:-1]
    sc = b[..., 0:16]
    q = _bits(b[..., 16:80].reshape(*lead, 2, 32), [0, 2, 4, 6], 3)
    q = q.reshape(*lead, 16, 16).astype(mx.float32)
    dl = (_f16(h, 40) * mx.bitwise_and(sc, 15).astype(mx.float32))[..., None]
    ml = (_f16(h, 41) * mx.right_shift(sc, 4).astype(mx.float32))[..., None]
    return (dl * q - ml).reshape(*lead, 256)


def _q3_k(b, h):
    # hmask[32] | qs[64] | scales[12] (16 6-bit scales, biased by 32) | d:f16.
    # Low 2 bits as Q2_K; element n*128 + j*32 + l subtracts 4 unless bit (4n+j) of hmask[l] is set.
    lead = b.shape[:-1]
    ql = _bits(b[..., 32:96].reshape(*lead, 2, 32), [0, 2, 4, 6], 3).reshape(*lead, 256)
    hb = _bits(b[..., 0:32], list(range(8)), 1).reshape(*lead, 256)
    q = ql.astype(mx.float32) - 4 + 4 * hb.astype(mx.float32)
    s = b[..., 96:108]
    low = _nibbles(s[..., 0:8]).reshape(*lead, 16)  # scales 0-7: low nibbles, 8-15: high nibbles
    high = _bits(s[..., 8:12], [0, 2, 4, 6], 3).reshape(*lead, 16)  # scale i: bits 2*(i//4) of byte i%4
    sc = mx.bitwise_or(low, mx.left_shift(high, 4)).astype(mx.float32) - 32
    dl = (_f16(h, 54) * sc)[..., None]
    return (dl * q.reshape(*lead, 16, 16)).reshape(*lead, 256)


def _k4_scales(s: mx.array) -> tuple[mx.array, mx.array]:
    """12 bytes -> eight 6-bit scales and eight 6-bit mins (Q4_K/Q5_K packing), as float32."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    hi_d, hi_m = mx.left_shift(mx.right_shift(d, 6), 4), mx.left_shift(mx.right_shift(m, 6), 4)
    sc = mx.concatenate([mx.bitwise_and(d, 63), mx.bitwise_or(mx.bitwise_and(md, 15), hi_d)], axis=-1)
    mn = mx.concatenate([mx.bitwise_and(m, 63), mx.bitwise_or(mx.right_shift(md, 4), hi_m)], axis=-1)
    return sc.astype(mx.float32), mn.astype(mx.float32)


def _q4_k(b, h):
    # d:f16 dmin:f16 | scales[12] | qs[128]: 32-byte chunk c holds sub-block 2c (low nibbles), 2c+1 (high).
    lead = b.shape[:-1]
    sc, mn = _k4_scales(b[..., 4:16])
    q = _nibbles(b[..., 16:144].reshape(*lead, 4, 32)).reshape(*lead, 8, 32).astype(mx.float32)
    d = (_f16(h, 0) * sc)[..., None]
    dm = (_f16(h, 1) * mn)[..., None]
    return (d * q - dm).reshape(*lead, 256)


def _q5_k(b, h):
    # d:f16 dmin:f16 | scales[12] | qh[32] | qs[128]: as Q4_K, bit 4 of sub-block j is bit j of qh[l].
    lead = b.shape[:-1]
    sc, mn = _k4_scales(b[..., 4:16])
    low = _nibbles(b[..., 48:176].reshape(*lead, 4, 32)).reshape(*lead, 8, 32)
    high = mx.left_shift(_bits(b[..., 16:48], list(range(8)), 1), 4)
    q = mx.bitwise_or(low, high).astype(mx.float32)
    d = (_f16(h, 0) * sc)[..., None]
    dm = (_f16(h, 1) * mn)[..., None]
    return (d * q - dm).reshape(*lead, 256)


def _q6_k(b, h):
    # ql[128] | qh[64] | scales[16] int8 | d:f16. Half n (128 elements) uses ql[64n:64n+64], qh[32n:32n+32]:
    # element n*128 + 32k + l = nibble (k//2) of ql[l + 32*(k%2)] | bits 2k of qh[l] << 4, minus 32.
    lead = b.shape[:-1]
    low = _nibbles(b[..., 0:128].reshape(*lead, 2, 64)).reshape(*lead, 2, 4, 32)
    high = mx.left_shift(_bits(b[..., 128:192].reshape(*lead, 2, 32), [0, 2, 4, 6], 3), 4)
    q = mx.bitwise_or(low, high).reshape(*lead, 16, 16).astype(mx.float32) - 32
    sc = b[..., 192:208].view(mx.int8).astype(mx.float32)
    dl = (_f16(h, 104) * sc)[..., None]
    return (dl * q).reshape(*lead, 256)


_DECODERS = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def _dequantize_eager(packed: mx.array, ggml_type: str) -> mx.array:
    t = GGML_TYPES_BY_NAME[ggml_type]
    rows = packed.shape[0]
    blocks = packed.reshape(rows, -1, t.type_size)
    halves = packed.view(mx.uint16).reshape(rows, -1, t.type_size // 2)
    return _DECODERS[ggml_type](blocks, halves).reshape(rows, -1)


@lru_cache(maxsize=None)
def _compiled(ggml_type: str):
    # Offered for measurement only: on MLX 0.32.4's CPU backend the fused kernel was 1.5-5x slower than
    # the eager ops (strided slices become generic index loops), see benchmarks/qmatmul_bench.py.
    return mx.compile(lambda packed: _dequantize_eager(packed, ggml_type))


def _check(packed: mx.array, t: GGMLType, n_cols: int) -> None:
    if packed.dtype != mx.uint8 or packed.ndim != 2:
        raise ValueError(f"packed {t.name} weight must be 2-D uint8, got {packed.dtype} {packed.shape}")
    if n_cols % t.block_size or packed.shape[1] != t.row_bytes(n_cols):
        raise ValueError(
            f"packed {t.name} row of {packed.shape[1]} bytes does not hold {n_cols} columns "
            f"({t.row_bytes(n_cols) if n_cols % t.block_size == 0 else 'not a whole number of'} bytes)"
        )


def dequantize(packed: mx.array, ggml_type: str, n_cols: int, compiled: bool = False) -> mx.array:
    """Packed GGUF rows (rows, row_bytes) uint8 -> float32 (rows, n_cols), using only MLX array ops."""
    t = ggml_type_info(ggml_type)
    _check(packed, t, n_cols)
    if packed.shape[0] == 0:
        return mx.zeros((0, n_cols), dtype=mx.float32)
    return _compiled(ggml_type)(packed) if compiled else _dequantize_eager(packed, ggml_type)


def chunk_rows(n_cols: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Rows of weight dequantized at once so that a chunk holds about `chunk_elements` floats."""
    return max(1, chunk_elements // max(1, n_cols))


def chain_chunks(fn, packed: mx.array, step: int, *also: mx.array) -> list[mx.array]:
    """fn applied to successive row chunks of `packed` (and of the row-aligned arrays `also`, passed after
    it, e.g. scales and biases), each chunk ordered after the previous result.

    Without the mx.depends chain MLX may schedule every chunk's dequantization before the matmuls, and the
    transient floats grow with the matrix (measured: 87 MB for a 65536x640 Q8_0 head vs 26 MB chained).
    """
    outs: list[mx.array] = []
    for r in range(0, packed.shape[0], step):
        chunk = packed[r : r + step]
        outs.append(fn(mx.depends(chunk, outs[-1]) if outs else chunk, *(a[r : r + step] for a in also)))
    return outs


def gguf_matmul(x: mx.array, packed: mx.array, ggml_type: str, n_cols: int,
                chunk_elements: int = CHUNK_ELEMENTS) -> mx.array:
    """x (..., n_cols) @ dequantize(packed).T -> (..., rows), in float32, a bounded chunk of rows at a time.

    The result has x's dtype. Each chunk of weight rows becomes floats only while it is multiplied.
    """
    t = ggml_type_info(ggml_type)
    _check(packed, t, n_cols)
    lead = x.shape[:-1]
    xf = x.reshape(-1, n_cols).astype(mx.float32)
    step = chunk_rows(n_cols, chunk_elements)
    rows = packed.shape[0]
    out = mx.concatenate(chain_chunks(lambda p: xf @ dequantize(p, ggml_type, n_cols).T, packed, step), axis=-1)
    return out.reshape(*lead, rows).astype(x.dtype)


def gguf_embedding(ids: mx.array, packed: mx.array, ggml_type: str, n_cols: int,
                   dtype: mx.Dtype = mx.float32) -> mx.array:
    """Rows `ids` of a packed embedding table, dequantized (only the gathered rows are decoded)."""
    t = ggml_type_info(ggml_type)
    _check(packed, t, n_cols)
    flat = ids.reshape(-1)
    rows = dequantize(mx.take(packed, flat, axis=0), ggml_type, n_cols)
    return rows.reshape(*ids.shape, n_cols).astype(dtype)
