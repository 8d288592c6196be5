"""Lossless conversion of GGUF Q4_0, Q4_1 and Q8_0 blocks into MLX's affine layout.

These blocks are exactly MLX affine groups of 32 (scale d with bias -8d, m, or -128d), so an MLX
checkpoint (and mlx-lm) can hold the very same values; used when exporting GGUF weights to MLX folders.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

AFFINE_EXACT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGUF type -> MLX bits (group size 32)


def repack_affine(raw: np.ndarray, type_name: str, n_cols: int):
    """Q4_0/Q4_1/Q8_0 rows of blocks (rows, row_bytes) -> MLX affine (uint32 weight, float16 scales, float16 biases)."""
    rows = raw.shape[0]
    n_blocks = n_cols // 32
    blocks = raw.reshape(rows, n_blocks, -1)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q8_0":
        q = (blocks[:, :, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        packed, bias = q.reshape(rows, -1), -128.0 * d
    else:
        if type_name == "Q4_0":
            qs, bias = blocks[:, :, 2:18], -8.0 * d
        else:
            qs, bias = blocks[:, :, 4:20], blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        # GGUF: low nibbles hold elements 0-15, high nibbles 16-31; MLX: element i at nibble i.
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).reshape(rows, -1)
    weight = np.ascontiguousarray(packed).view(np.uint32)
    return mx.array(weight), mx.array(d.astype(np.float16)), mx.array(bias.astype(np.float16))
