"""GGUF and MLX-affine matmuls on the CPU through gguf_cpu.c and affine_cpu.c (compiled on first use, ctypes).

MLX's CPU backend has no fast path for packed GGUF rows: its quantized matmul ran SmolLM2 at ~5 tok/s,
and dequantizing to float32 takes 4-5x the memory. Even on MLX's own affine rows its CPU quantized matmul
reads ~0.5 GB/s at one row (benchmarks/qmatmul_bench.py --cpu-small). These kernels read the packed rows
once per call and decode each block or group in registers. Each call evaluates its input and returns a new
array, so it runs eagerly: only on the CPU, and not inside mx.compile (`Tracing` is raised there; the
dispatcher then takes MLX ops). Without a C compiler, or with APPLELM_NATIVE=off, `load()` and
`load_affine()` are None and the MLX paths run.
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
AFFINE_SOURCE = Path(__file__).with_name("affine_cpu.c")
AFFINE_SIGNATURES = {"applelm_affine_matmul": [_VEC, _I64, _I64, _VEC, _VEC, _VEC, _INT, _I64, _INT, _INT, _INT,
                                               _VEC]}
AFFINE_BITS, AFFINE_GROUPS = (4, 8), (32, 64, 128)
SCALE_FORMATS = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel (built on first use), or None when unavailable."""
    return build(SOURCE, SIGNATURES, "GGUF matmuls on the CPU use the MLX paths")


def load_affine() -> Optional[ctypes.CDLL]:
    """The compiled affine kernel (built on first use), or None when unavailable."""
    return build(AFFINE_SOURCE, AFFINE_SIGNATURES, "MLX-quantized matmuls on the CPU use MLX's kernel")


def affine_supported(bits: int, group_size: int, scales: mx.array) -> bool:
    """Whether the affine kernel handles this format (and builds here)."""
    return (bits in AFFINE_BITS and group_size in AFFINE_GROUPS and scales.dtype in SCALE_FORMATS
            and load_affine() is not None)


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


def affine_numpy(x: np.ndarray, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, scale_format: int, bits: int,
                 group_size: int, threads: Optional[int] = None) -> np.ndarray:
    """x (m, k) float32 @ W.T for MLX affine rows: w (n, k * bits / 32) uint32, scales and biases (n, k / group)
    of SCALE_FORMATS[scale_format] (16-bit ones as uint16 or their MLX dtype's numpy view) -> (m, n) float32."""
    lib = load_affine()
    if lib is None:
        raise RuntimeError("the affine CPU kernel is unavailable")
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError("affine CPU kernel: x must be a contiguous (m, k) float32 array")
    m, k = x.shape
    n = w.shape[0] if w.ndim == 2 else -1
    itemsize = 4 if scale_format == 0 else 2
    ok = (w.dtype == np.uint32 and w.ndim == 2 and w.shape[1] * 32 == k * bits and bits in AFFINE_BITS
          and group_size in AFFINE_GROUPS and k % group_size == 0 and scale_format in (0, 1, 2)
          and all(a.shape == (n, k // group_size) and a.itemsize == itemsize for a in (scales, biases))
          and all(a.flags.c_contiguous for a in (w, scales, biases)))
    if not ok:
        raise ValueError(f"affine CPU kernel: cannot multiply {m} rows of {k} by {bits}-bit rows of shape "
                         f"{w.shape} in groups of {group_size}")
    out = np.empty((m, n), np.float32)
    rc = lib.applelm_affine_matmul(x.ctypes.data, m, k, w.ctypes.data, scales.ctypes.data, biases.ctypes.data,
                                   scale_format, n, bits, group_size, threads or default_threads(), out.ctypes.data)
    if rc:
        raise ValueError(f"affine CPU kernel: cannot multiply {m} rows of {k} by {bits}-bit weights")
    return out


def affine_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int,
                  group_size: int) -> mx.array:
    """x (..., k) @ W.T for MLX affine-quantized W through the kernel, in x's dtype (eager: evaluates x)."""
    k = x.shape[-1]
    xf = _evaluated_f32(x, w, scales, biases)
    fmt = SCALE_FORMATS[scales.dtype]
    return _finish(x, affine_numpy(np.ascontiguousarray(host(xf)).reshape(-1, k), host(w), _raw(scales),
                                   _raw(biases), fmt, bits, group_size))


def _raw(a: mx.array) -> np.ndarray:
    """The bytes of an evaluated CPU array as numpy (16-bit floats as uint16: numpy has no bfloat16)."""
    if a.dtype == mx.bfloat16:
        return host(a.view(mx.uint16))
    return host(a)


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
