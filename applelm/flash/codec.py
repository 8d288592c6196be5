"""How one neuron's weights are stored in a bundle, and how bundles turn back into floats.

A bundle holds, for FFN neuron i, three vectors of `hidden` values: its up-projection row, its
down-projection column and its gate-projection row, in that order (PARTS). Up and down come first so a
runtime that keeps the gate resident reads one contiguous prefix of the bundle.

Each part is stored either as floats (bits 32: float32, bits 16: float16 or bfloat16) or with a
per-part affine quantization (bits 8 or 4): `group_size` values share a float16 scale and bias,
value = scale * q + bias, codes packed LSB-first (MLX's affine layout, so mx.dequantize reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import ModelFormatError, UserError

PARTS = ("up", "down", "gate")
FLOAT_DTYPES = {32: ("float32",), 16: ("float16", "bfloat16")}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact: a bfloat16 is the top half of a float32)."""
    if out is None:
        out = np.empty(bits.shape, np.float32)
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


@dataclass(frozen=True)
class BundleCodec:
    """Geometry and (de)coding of bundles: `part_bytes` per part, `bundle_bytes` per neuron."""

    hidden: int
    bits: int
    dtype: str  # storage dtype of float parts ("float32", "float16", "bfloat16"); "affine" for bits 8/4
    group_size: Optional[int] = None

    def __post_init__(self):
        if self.bits in FLOAT_DTYPES:
            if self.dtype not in FLOAT_DTYPES[self.bits]:
                raise ModelFormatError(f"flash store: {self.bits}-bit parts cannot have dtype {self.dtype}")
        elif self.bits in (8, 4):
            if self.dtype != "affine" or not self.group_size or self.hidden % self.group_size:
                raise ModelFormatError(
                    f"flash store: {self.bits}-bit parts need an affine group size dividing {self.hidden}")
        else:
            raise ModelFormatError(f"flash store: {self.bits}-bit parts are not supported (32, 16, 8, 4 are)")

    @classmethod
    def for_bits(cls, hidden: int, bits: int, float_dtype: str = "float16") -> "BundleCodec":
        """The codec `prepare --bits` makes: floats for 32/16, affine groups of 64 (or 32) for 8/4."""
        if bits == 32:
            return cls(hidden, 32, "float32")
        if bits == 16:
            return cls(hidden, 16, float_dtype)
        if bits not in (8, 4):
            raise UserError(f"--bits must be one of 32, 16, 8, 4 (got {bits})")
        group = next((g for g in (64, 32) if hidden % g == 0), None)
        if group is None:
            raise UserError(f"hidden size {hidden} is not a multiple of 32; use --bits 16")
        return cls(hidden, bits, "affine", group)

    @property
    def quantized(self) -> bool:
        return self.bits in (8, 4)

    @property
    def code_bytes(self) -> int:
        return self.hidden * self.bits // 8

    @property
    def part_bytes(self) -> int:
        if not self.quantized:
            return self.code_bytes
        return self.code_bytes + 4 * (self.hidden // self.group_size)  # + float16 scale and bias per group

    @property
    def bundle_bytes(self) -> int:
        return len(PARTS) * self.part_bytes

    def to_json(self) -> dict:
        return {"bits": self.bits, "dtype": self.dtype, "group_size": self.group_size, "parts": list(PARTS),
                "part_bytes": self.part_bytes, "bundle_bytes": self.bundle_bytes}

    @classmethod
    def from_json(cls, hidden: int, d: dict) -> "BundleCodec":
        try:
            codec = cls(hidden, int(d["bits"]), str(d["dtype"]), d.get("group_size"))
            ok = list(d["parts"]) == list(PARTS) and d["bundle_bytes"] == codec.bundle_bytes
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError("flash index: malformed 'store' block") from None
        if not ok:
            raise ModelFormatError("flash index: 'store' block does not match its bits/dtype/parts")
        return codec

    # -- encoding (prepare) -------------------------------------------------------------------------------

    def encode(self, parts: np.ndarray) -> np.ndarray:
        """(n, 3, hidden) float32 -> (n, bundle_bytes) uint8."""
        n = parts.shape[0]
        flat = parts.reshape(n * len(PARTS), self.hidden).astype(np.float32)
        if self.bits == 32:
            out = flat.view(np.uint8)
        elif self.dtype == "float16":
            with np.errstate(over="ignore"):
                half = flat.astype(np.float16)
            if not np.isfinite(half).all() and np.isfinite(flat).all():
                raise UserError("a weight does not fit float16's range; prepare with --bits 32")
            out = half.view(np.uint8)
        elif self.dtype == "bfloat16":
            out = _bf16_bits(flat).view(np.uint8)
        else:
            out = self._encode_affine(flat)
        return np.ascontiguousarray(out).reshape(n, self.bundle_bytes)

    def _encode_affine(self, flat: np.ndarray) -> np.ndarray:
        rows, g = flat.shape[0], self.group_size
        groups = flat.reshape(rows, -1, g)
        lo, hi = groups.min(-1), groups.max(-1)
        levels = (1 << self.bits) - 1
        scale = ((hi - lo) / levels).astype(np.float16)
        bias = lo.astype(np.float16)
        # Quantize against the float16-rounded scale and bias the decoder will use.
        s32, b32 = scale.astype(np.float32)[..., None], bias.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s32 > 0, np.rint((groups - b32) / s32), 0)
        q = np.clip(q, 0, levels).astype(np.uint8).reshape(rows, self.hidden)
        if self.bits == 4:
            q = q[:, 0::2] | (q[:, 1::2] << 4)  # element 2k in the low nibble of byte k (LSB first)
        return np.concatenate([q, scale.view(np.uint8), bias.view(np.uint8)], axis=1)

    # -- decoding (runtime), numpy: used for the few bundles a token reads ------------------------------

    def decode_np(self, raw: np.ndarray, n_parts: int) -> np.ndarray:
        """(n, >= n_parts*part_bytes) uint8 -> (n, n_parts, hidden) float32."""
        n = raw.shape[0]
        raw = np.ascontiguousarray(raw[:, : n_parts * self.part_bytes]).reshape(n * n_parts, self.part_bytes)
        if self.bits == 32:
            out = raw.view(np.float32)
        elif self.dtype == "float16":
            out = raw.view(np.float16).astype(np.float32)
        elif self.dtype == "bfloat16":
            out = bf16_to_f32(raw.view(np.uint16))
        else:
            cb, ng = self.code_bytes, self.hidden // self.group_size
            codes = raw[:, :cb]
            if self.bits == 4:
                q = np.empty((codes.shape[0], self.hidden), np.uint8)
                q[:, 0::2], q[:, 1::2] = codes & 15, codes >> 4
            else:
                q = codes
            scale = np.ascontiguousarray(raw[:, cb: cb + 2 * ng]).view(np.float16).astype(np.float32)
            bias = np.ascontiguousarray(raw[:, cb + 2 * ng:]).view(np.float16).astype(np.float32)
            out = (q.reshape(-1, ng, self.group_size) * scale[..., None] + bias[..., None])
        return out.reshape(n, n_parts, self.hidden)

    # -- decoding (runtime), MLX: used inside the lazy graph for whole streamed layers --------------------

    def decode_interleaved_mx(self, raw, dtype):
        """(n, bundle_bytes) float-stored bundles -> one (n, 3, hidden) array of `dtype` in a single
        conversion pass (a token's gemv can then use the interleaved rows directly; see paged_mlp)."""
        import mlx.core as mx

        store = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[self.dtype]
        return raw.view(store).reshape(raw.shape[0], len(PARTS), self.hidden).astype(dtype)

    def decode_mx(self, raw, n_parts: int, dtype):
        """(n, bundle_bytes) uint8 mx.array, or its first n_parts parts (n, n_parts*part_bytes) -> list of
        n_parts (n, hidden) arrays of `dtype` (lazy)."""
        import mlx.core as mx

        n = raw.shape[0]
        if not self.quantized:
            store = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[self.dtype]
            vals = raw.view(store).reshape(n, -1, self.hidden)
            return [vals[:, k, :].astype(dtype) for k in range(n_parts)]
        cb, ng = self.code_bytes, self.hidden // self.group_size
        per_part = raw.reshape(n, -1, self.part_bytes)
        out = []
        for k in range(n_parts):
            p = per_part[:, k, :]
            codes = mx.contiguous(p[:, :cb]).view(mx.uint32)
            scale = mx.contiguous(p[:, cb: cb + 2 * ng]).view(mx.float16).astype(dtype)
            bias = mx.contiguous(p[:, cb + 2 * ng:]).view(mx.float16).astype(dtype)
            out.append(mx.dequantize(codes, scale, bias, group_size=self.group_size, bits=self.bits))
        return out
