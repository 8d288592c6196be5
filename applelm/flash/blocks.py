"""The GGUF-blocks store: FFN weights kept in the checkpoint's own quantized blocks (`prepare --gguf-blocks`).

The float and affine stores (codec.py) re-encode every neuron's three vectors, which for a quantized GGUF
means dequantizing it: a Q4 checkpoint grows 3x as bfloat16 and every token then reads 3x the bytes. This
store keeps the bytes of the file. A GGUF down projection is quantized along the neuron axis, so a column
cannot be cut out of it, but a block-aligned run of C neurons can: a *chunk* holds neurons [c*C, (c+1)*C)
as their up rows, the down projection's blocks for those neurons (every hidden row, C / block columns) and
their gate rows, each a plain GGUF matrix. Row-column bundling at chunk granularity: dense paging reads
whole chunks and multiplies them with the same GGUF matmuls a resident model uses (so with one chunk per
layer, paged output equals the GGUF model's bit for bit). Neuron-level (sparse) paging needs per-neuron
bundles and is not offered on this store.

Layers may mix types (Gemma 3's Q4_K_M has Q6_K and Q4_K down projections), so chunk sizes vary by layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from typing import Callable, Optional

import numpy as np

from ..errors import ModelFormatError, UserError
from ..ops.ggml_types import GGML_TYPES_BY_NAME

KIND = "gguf_blocks"
PARTS = ("up", "down", "gate")
MAX_CHUNK_BYTES = 8 << 20  # largest chunk prepare writes (a unit of the prefetch ring holds whole chunks)
# A prompt's matmuls dequantize a chunk's rows this many floats at a time, so the floats in memory do not
# grow with the chunk. MLX's peak beyond the output stayed within 6.2x one step's float32 bytes over every
# type (1024x1024, 40 rows, in steps of 64 Ki floats): the reserve is 8x.
PROMPT_SCRATCH_ELEMENTS = 1 << 16
PROMPT_SCRATCH_BYTES = 8 * 4 * PROMPT_SCRATCH_ELEMENTS


def block_types() -> set:
    """GGUF types this store accepts: the quantized types the GGUF matmuls implement."""
    from ..ops import reference

    return set(reference._DECODERS)


@dataclass(frozen=True)
class BlockCodec:
    """Geometry of a GGUF-blocks store: `chunk` neurons per bundle, (up, down, gate) types per layer."""

    hidden: int
    intermediate: int
    chunk: int
    types: tuple  # per layer: (up type, down type, gate type) names

    blocks = True
    quantized = True

    def __post_init__(self):
        known = block_types()
        if self.chunk <= 0 or self.intermediate % self.chunk:
            raise ModelFormatError(f"flash store: chunk of {self.chunk} neurons does not divide {self.intermediate}")
        for i, layer in enumerate(self.types):
            if len(layer) != 3 or any(t not in known for t in layer):
                raise ModelFormatError(f"flash store: layer {i} types {layer} are not GGUF block types")
            up, down, gate = (GGML_TYPES_BY_NAME[t] for t in layer)
            if self.hidden % up.block_size or self.hidden % gate.block_size or self.chunk % down.block_size:
                raise ModelFormatError(f"flash store: layer {i} types {layer} do not fit hidden {self.hidden} "
                                       f"and chunks of {self.chunk} neurons")

    @classmethod
    def for_types(cls, hidden: int, intermediate: int, types: list, max_chunk_bytes: Optional[int] = None):
        """The codec `prepare` writes: the largest chunk (a multiple of every down block size that divides
        the intermediate size) whose bytes stay within max_chunk_bytes (the smallest such chunk otherwise)."""
        for i, layer in enumerate(types):
            bad = [t for t in layer if t not in block_types()]
            if bad:
                raise UserError(f"layer {i}: FFN tensor type {bad[0]} has no GGUF block matmul here; prepare "
                                "with --bits 16 (or 32, 8, 4) instead of --gguf-blocks")
        step = 1
        for layer in types:
            b = GGML_TYPES_BY_NAME[layer[1]].block_size
            step = step * b // gcd(step, b)
        sizes = [c for c in range(step, intermediate + 1, step) if intermediate % c == 0]
        if not sizes:
            raise UserError(f"intermediate size {intermediate} is not a multiple of the down blocks ({step})")
        probe = [cls(hidden, intermediate, c, tuple(map(tuple, types))) for c in sizes]
        fits = [c for c in probe if c.bundle_bytes <= (max_chunk_bytes or MAX_CHUNK_BYTES)]
        return fits[-1] if fits else probe[0]

    @property
    def n_bundles(self) -> int:
        """Bundles (chunks) per layer."""
        return self.intermediate // self.chunk

    def part_sizes(self, layer: int) -> tuple[int, int, int]:
        """Bytes of the up rows, the down blocks and the gate rows of one chunk of `layer`."""
        up, down, gate = (GGML_TYPES_BY_NAME[t] for t in self.types[layer])
        return (self.chunk * up.row_bytes(self.hidden), self.hidden * down.row_bytes(self.chunk),
                self.chunk * gate.row_bytes(self.hidden))

    def bundle_bytes_of(self, layer: int) -> int:
        return sum(self.part_sizes(layer))

    @property
    def bundle_bytes(self) -> int:
        """The largest chunk of any layer (what a buffer for one chunk must hold)."""
        return max(self.bundle_bytes_of(i) for i in range(len(self.types)))

    def to_json(self) -> dict:
        return {"kind": KIND, "chunk_neurons": self.chunk, "parts": list(PARTS),
                "types": [list(t) for t in self.types],
                "bundle_bytes": [self.bundle_bytes_of(i) for i in range(len(self.types))]}

    @classmethod
    def from_json(cls, hidden: int, intermediate: int, d: dict) -> "BlockCodec":
        try:
            codec = cls(hidden, intermediate, int(d["chunk_neurons"]), tuple(tuple(t) for t in d["types"]))
            ok = list(d["parts"]) == list(PARTS) and list(d["bundle_bytes"]) == [
                codec.bundle_bytes_of(i) for i in range(len(codec.types))]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError("flash index: malformed 'store' block") from None
        if not ok:
            raise ModelFormatError("flash index: 'store' block does not match its types and chunk size")
        return codec

    # -- encoding (prepare) -------------------------------------------------------------------------------

    def encode(self, layer: int, up: np.ndarray, down: np.ndarray, gate: np.ndarray) -> np.ndarray:
        """A layer's raw GGUF rows (up (I, row bytes), down (H, row bytes), gate (I, row bytes)) ->
        (n_bundles, bundle_bytes_of(layer)) uint8, chunk c = [up rows | down block columns | gate rows]."""
        n, c = self.n_bundles, self.chunk
        down_t = GGML_TYPES_BY_NAME[self.types[layer][1]]
        cols = down.reshape(self.hidden, n, -1)  # (H, chunks, bytes of one chunk's blocks in a row)
        if cols.shape[2] != down_t.row_bytes(c):
            raise ModelFormatError(f"layer {layer}: down projection rows do not hold {self.intermediate} columns")
        return np.concatenate([up.reshape(n, -1), cols.transpose(1, 0, 2).reshape(n, -1), gate.reshape(n, -1)],
                              axis=1)

    # -- compute (runtime) --------------------------------------------------------------------------------

    def split(self, layer: int, chunk) -> tuple:
        """One chunk's bytes (a 1-D numpy or MLX row of bundle_bytes_of(layer)) -> its (up, down, gate)
        GGUF matrices, as views."""
        su, sd, _ = self.part_sizes(layer)
        return (chunk[:su].reshape(self.chunk, -1), chunk[su: su + sd].reshape(self.hidden, -1),
                chunk[su + sd:].reshape(self.chunk, -1))

    def ffn(self, layer: int, x, chunks, act: Callable, act_name: str = ""):
        """The gated FFN for input x (..., H) over `chunks` ((up, down, gate) triples from split: MLX
        arrays, or numpy views of a read buffer, which the CPU kernel reads in place and which are free
        again on return): the sum over chunks of down_c(act(gate_c x) * up_c x), computed as the models
        compute a GGUF FFN (ops.gated_ffn: one fused kernel call per chunk where the CPU kernel takes it, for
        the activation named act_name; else the GGUF matmuls and act)."""
        from ..ops.dispatch import gguf_ffn_fused, gguf_matmul, gguf_matmul_host

        tu, td, tg = self.types[layer]
        s = PROMPT_SCRATCH_ELEMENTS
        y = None
        for up, down, gate in chunks:
            part = gguf_ffn_fused(x, (gate, tg), (up, tu), (down, td), act_name) if act_name else None
            if part is None:
                matmul = gguf_matmul_host if isinstance(up, np.ndarray) else gguf_matmul
                a = act(matmul(x, gate, tg, self.hidden, s)) * matmul(x, up, tu, self.hidden, s)
                part = matmul(a, down, td, self.chunk, s)
            y = part if y is None else y + part
        return y
