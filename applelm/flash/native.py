"""The CPU kernel for paged FFN neurons (native_ffn.c), compiled on first use and called with ctypes.

On MLX's CPU backend a streamed unit used to cost a copy into MLX, a 16-bit -> float32 conversion and a
float32 gemv; this kernel reads the bundles where they landed (the staging buffer) and decodes them in
registers. It is optional: without a C compiler, on a GPU, or with APPLELM_NATIVE=off, the MLX path runs.
Building and caching: applelm/native_build.py.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import numpy as np

from ..native_build import build, default_threads
from ..ops.cpu_native import ACTIVATIONS  # the C activation codes, shared with the GGUF kernel (ops/cpu_vec.h)

SOURCE = Path(__file__).with_name("native_ffn.c")
FORMATS = {"float32": 0, "float16": 1, "bfloat16": 2, 8: 3, 4: 4}

_VEC, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {
    "applelm_bundle_ffn": [_VEC, _VEC, _I64, _I64, _I64, _INT, _INT, _INT, _INT, _VEC],
    "applelm_sparse_ffn": [_VEC, _VEC, _VEC, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _VEC, ctypes.c_float,
                           _INT, _VEC],
    "applelm_gate_acts": [_VEC, _VEC, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _INT, _VEC],
}


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel, building it if needed; None when unavailable (reason warned once)."""
    return build(SOURCE, SIGNATURES, "flash paging on the CPU uses the slower MLX path")


def _check_vectors(x: np.ndarray, out: np.ndarray) -> None:
    if x.dtype != np.float32 or out.dtype != np.float32 or not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("native kernel: x and out must be contiguous float32")


class BundleFFN:
    """`ffn(x, bundles, out)`: out += the gated FFN of one token over the given bundles (numpy, in place);
    `ffn.sparse(...)`: the same over selected neurons (sparse paging)."""

    def __init__(self, lib: ctypes.CDLL, codec, act: str, threads: Optional[int] = None):
        if act not in ACTIVATIONS:
            raise ValueError(f"native kernel: unknown activation {act!r}")
        self._fn, self._sparse, self._gates = lib.applelm_bundle_ffn, lib.applelm_sparse_ffn, lib.applelm_gate_acts
        self.hidden, self.part_bytes = codec.hidden, codec.part_bytes
        self.fmt = FORMATS[codec.bits if codec.quantized else codec.dtype]
        self.group = codec.group_size or 0
        self.act = ACTIVATIONS[act]
        self.threads = threads or default_threads()

    def __call__(self, x: np.ndarray, bundles: np.ndarray, out: np.ndarray) -> None:
        _check_vectors(x, out)
        if not bundles.flags.c_contiguous or bundles.shape[-1] != 3 * self.part_bytes:
            raise ValueError("native kernel: bundles must be contiguous (n, bundle_bytes) bytes")
        rc = self._fn(x.ctypes.data, bundles.ctypes.data, bundles.shape[0], self.hidden, self.part_bytes,
                      self.fmt, self.group, self.act, self.threads, out.ctypes.data)
        if rc:
            raise ValueError("native kernel: unsupported store geometry")

    def sparse(self, x: np.ndarray, base: np.ndarray, out: np.ndarray, offsets: Optional[np.ndarray] = None,
               coef: Optional[np.ndarray] = None, threshold: float = -1.0) -> None:
        """out += sum_i a_i (up_i . x) down_i over bundles in `base`: rows of a contiguous (n, stride) byte
        matrix, or, with `offsets` (int64), the bundles starting at those byte offsets of a flat `base`.
        a_i = coef[i] (float32; bundles may then hold only up and down), else act(gate_i . x), counted as 0
        where |a_i| <= threshold (threshold < 0: no mask)."""
        _check_vectors(x, out)
        if not base.flags.c_contiguous or base.dtype != np.uint8:
            raise ValueError("native kernel: bundles must be contiguous bytes")
        parts = 2 if coef is not None else 3
        if offsets is None:
            if base.ndim != 2 or base.shape[1] < parts * self.part_bytes:
                raise ValueError("native kernel: bundles must be (n, stride) bytes holding every part used")
            n, stride, off = base.shape[0], base.shape[1], None
        else:
            if offsets.dtype != np.int64 or not offsets.flags.c_contiguous or (
                    len(offsets) and (offsets.min() < 0 or offsets.max() + parts * self.part_bytes > base.size)):
                raise ValueError("native kernel: offsets must be int64 and inside the buffer")
            n, stride, off = len(offsets), parts * self.part_bytes, offsets.ctypes.data
        if coef is not None and (coef.dtype != np.float32 or not coef.flags.c_contiguous or len(coef) != n):
            raise ValueError("native kernel: coef must be contiguous float32, one per bundle")
        rc = self._sparse(x.ctypes.data, base.ctypes.data, off, n, stride, self.hidden, self.part_bytes, self.fmt,
                          self.group, self.act, None if coef is None else coef.ctypes.data, float(threshold),
                          self.threads, out.ctypes.data)
        if rc:
            raise ValueError("native kernel: unsupported store geometry")

    def gate_acts(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """act(gate_i . x) for each stored gate part in `rows` ((n, >= part_bytes) contiguous bytes): the
        selection of threshold sparsity with the gates held as stored (float32 (n,))."""
        out = np.empty(rows.shape[0] if rows.ndim == 2 else 0, np.float32)
        _check_vectors(x, out)
        if rows.ndim != 2 or rows.dtype != np.uint8 or not rows.flags.c_contiguous or rows.shape[1] < self.part_bytes:
            raise ValueError("native kernel: gate rows must be contiguous (n, >= part_bytes) bytes")
        if x.shape != (self.hidden,):
            raise ValueError(f"native kernel: x must have {self.hidden} values")
        rc = self._gates(x.ctypes.data, rows.ctypes.data, rows.shape[0], rows.shape[1], self.hidden, self.part_bytes,
                         self.fmt, self.group, self.act, self.threads, out.ctypes.data)
        if rc:
            raise ValueError("native kernel: unsupported store geometry")
        return out


def bundle_ffn(codec, act: str) -> Optional[BundleFFN]:
    """The native kernel for this store and activation, or None (no compiler, disabled, or unsupported)."""
    if act not in ACTIVATIONS:
        return None
    lib = load()
    return BundleFFN(lib, codec, act) if lib is not None else None
