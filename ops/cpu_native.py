"""GGUF matmuls on the CPU through gguf_cpu.c (compiled on first use, ctypes).

MLX's CPU backend has no fast path for packed GGUF rows: its quantized matmul ran SmolLM2 at ~5 tok/s,
and dequantizing to float32 takes 4-5x the memory. This kernel reads the packed rows once per call and
decodes each block in L1. Each call evaluates its input and returns a new array, so it runs eagerly: only
on the CPU, and not inside mx.compile (`Tracing` is raised there; the dispatcher then takes MLX ops).
Without a C compiler, or with APPLELM_NATIVE=off, `load()` is None and the MLX paths run.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..native_build import build, default_threads
from .ggml_types import GGML_TYPES_BY_NAME

SOURCE = Path(__file__).with_name("gguf_cpu.c")
TYPES = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q5_1": 3, "Q8_0": 4, "Q4_K": 5, "Q6_K": 6}
_VEC, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {"applelm_gguf_matmul": [_VEC, _I64, _I64, _VEC, _I64, _INT, _INT, _VEC]}


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel (built on first use), or None when unavailable."""
    return build(SOURCE, SIGNATURES, "GGUF matmuls on the CPU use the MLX paths")


class Tracing(Exception):
    """Raised instead of running inside a function transformation (mx.compile), which cannot call out."""


def host(a: mx.array) -> np.ndarray:
    """A numpy view of an evaluated CPU array (no copy)."""
    return np.array(a, copy=False)


def matmul_numpy(x: np.ndarray, packed: np.ndarray, ggml_type: str, threads: Optional[int] = None) -> np.ndarray:
    """x (m, k) float32 @ W.T for packed rows W (n, row_bytes) uint8 -> (m, n) float32."""
    lib = load()
    if lib is None:
        raise RuntimeError("the GGUF CPU kernel is unavailable")
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError("GGUF CPU kernel: x must be a contiguous (m, k) float32 array")
    if packed.dtype != np.uint8 or packed.ndim != 2 or not packed.flags.c_contiguous:
        raise ValueError("GGUF CPU kernel: the weight must be contiguous (n, row_bytes) bytes")
    if ggml_type not in TYPES:
        raise ValueError(f"GGUF CPU kernel: {ggml_type} is not one of {', '.join(TYPES)}")
    m, k = x.shape
    t = GGML_TYPES_BY_NAME[ggml_type]
    if k % t.block_size or packed.shape[1] != t.row_bytes(k):  # the kernel trusts the row length
        raise ValueError(f"GGUF CPU kernel: cannot multiply {m} rows of {k} by {ggml_type} rows of "
                         f"{packed.shape[1]} bytes")
    out = np.empty((m, packed.shape[0]), np.float32)
    rc = lib.applelm_gguf_matmul(x.ctypes.data, m, k, packed.ctypes.data, packed.shape[0], TYPES[ggml_type],
                                 threads or default_threads(), out.ctypes.data)
    if rc:
        raise ValueError(f"GGUF CPU kernel: cannot multiply {m} rows of {k} by {ggml_type} weights")
    return out


def gguf_matmul(x: mx.array, packed: mx.array, ggml_type: str, n_cols: int) -> mx.array:
    """x (..., n_cols) @ W.T through the kernel, in x's dtype (eager: evaluates x first)."""
    # A float32 x is evaluated as it is and reshaped by numpy: the k and v projections then find the input
    # the q projection evaluated, with no new MLX node to wait for (one round trip to MLX's thread each).
    xf = _evaluated_f32(x, packed)
    return _finish(x, matmul_numpy(np.ascontiguousarray(host(xf)).reshape(-1, n_cols), host(packed), ggml_type))


def gguf_matmul_host(x: mx.array, packed: np.ndarray, ggml_type: str, n_cols: int) -> mx.array:
    """gguf_matmul for packed rows held in host memory (a read buffer): the kernel reads them in place."""
    xf = _evaluated_f32(x)
    return _finish(x, matmul_numpy(np.ascontiguousarray(host(xf)).reshape(-1, n_cols), packed, ggml_type))


def _evaluated_f32(x: mx.array, *also: mx.array) -> mx.array:
    xf = x if x.dtype == mx.float32 else x.astype(mx.float32)
    try:
        mx.eval(xf, *also)
    except ValueError as e:  # MLX refuses eval while tracing
        raise Tracing(str(e)) from None
    return xf


def _finish(x: mx.array, out: np.ndarray) -> mx.array:
    out = mx.array(out.reshape(*x.shape[:-1], out.shape[-1]))
    return out if x.dtype == mx.float32 else out.astype(x.dtype)
