"""Shared test helper: valid GGUF blocks of every supported format, made with numpy (and `gguf` where it can),
and a gated FFN of such blocks with its float64 reference.

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


# The gated FFN's activations in float64, written so that large gates do not overflow.
FFN_ACTS = {"silu": lambda g: g * np.where(g < 0, np.exp(np.minimum(g, 0)), 1) / (1 + np.exp(-np.abs(g))),
            "gelu_tanh": lambda g: 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))),
            "relu": lambda g: np.maximum(g, 0)}


def ffn_reference(x, gate, up, down, act):
    """float64 (act(x @ G.T) * (x @ U.T)) @ D.T from the gguf package's dequantized weights."""
    g, u, d = (numpy_dequantize(p, t).astype(np.float64) for p, t in (gate, up, down))
    x = x.astype(np.float64)
    return (FFN_ACTS[act](x @ g.T) * (x @ u.T)) @ d.T


def ffn_weights(k, hidden, types, seed=0):
    """((gate, type), (up, type), (down, type)) packed blocks of a gated FFN: k inputs, `hidden` neurons."""
    (tg, tu, td) = types
    return ((make_blocks(tg, hidden, k, seed=seed), tg), (make_blocks(tu, hidden, k, seed=seed + 1), tu),
            (make_blocks(td, k, hidden, seed=seed + 2), td))
