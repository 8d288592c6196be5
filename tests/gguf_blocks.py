"""Shared test helper: valid GGUF blocks of every supported format, made with numpy (and `gguf` where it can).

Random bytes are valid blocks once their fp16 scale fields are finite and small, so types that the `gguf`
package cannot quantize (the K-quants) get random blocks with those fields overwritten.
"""

from __future__ import annotations

import numpy as np

from applelm.ops.ggml_types import GGML_TYPES_BY_NAME

# fp16 field offsets (bytes) inside each block: the scales and mins that must be finite.
FP16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}
GGUF_QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def random_blocks(ggml_type: str, rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """(rows, row_bytes) uint8 of random but valid blocks: random codes, fp16 scales in +-[0.001, 0.1)."""
    t = GGML_TYPES_BY_NAME[ggml_type]
    rng = np.random.default_rng(seed)
    nb = n_cols // t.block_size
    blocks = rng.integers(0, 256, size=(rows, nb, t.type_size), dtype=np.uint8)
    for off in FP16_FIELDS[ggml_type]:
        scale = (rng.uniform(0.001, 0.1, size=(rows, nb)) * rng.choice([-1, 1], size=(rows, nb)))
        blocks[:, :, off : off + 2] = scale.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return blocks.reshape(rows, nb * t.type_size)


def make_blocks(ggml_type: str, rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """Packed rows: the `gguf` package's quantizer output for a random matrix where it has one, else random blocks."""
    if ggml_type in GGUF_QUANTIZABLE:
        import gguf

        rng = np.random.default_rng(seed)
        w = rng.standard_normal((rows, n_cols)).astype(np.float32) * 0.05
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[ggml_type])
    return random_blocks(ggml_type, rows, n_cols, seed)


def numpy_dequantize(packed: np.ndarray, ggml_type: str) -> np.ndarray:
    """The `gguf` package's numpy dequantization, (rows, n_cols) float32."""
    import gguf

    return gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[ggml_type])
