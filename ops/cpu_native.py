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
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..native_build import build, default_threads
from .ggml_types import GGML_TYPES_BY_NAME

SOURCE = Path(__file__).with_name("gguf_cpu.c")
TYPES = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q5_1": 3, "Q8_0": 4, "Q4_K": 5, "Q6_K": 6}
_VEC, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {"applelm_gguf_matmul": [_VEC, _I64, _I64, _VEC, _I64, _INT, _INT, _VEC],
              "applelm_gguf_matmul_many": [_VEC, _I64, _I64, _INT, _VEC, _VEC, _VEC, _INT, _VEC],
              "applelm_gguf_ffn": [_VEC, _I64, _I64, _I64, _VEC, _INT, _VEC, _INT, _VEC, _INT, _INT, _INT, _VEC,
                                   _VEC]}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "relu": 2}  # the gated FFN's activation (ops/cpu_vec.h)
MAX_PRODUCTS = 8  # weights one applelm_gguf_matmul_many call takes
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


def _loaded(lib: Optional[ctypes.CDLL], what: str) -> ctypes.CDLL:
    if lib is None:
        raise RuntimeError(f"the {what} CPU kernel is unavailable")
    return lib


def _check_x(x: np.ndarray) -> None:
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError("GGUF CPU kernel: x must be a contiguous (m, k) float32 array")


def _check_rows(packed: np.ndarray, ggml_type: str, k: int, what: str) -> None:
    """packed must be contiguous (n, row_bytes) bytes of ggml_type rows of k values (the kernel trusts it)."""
    if packed.dtype != np.uint8 or packed.ndim != 2 or not packed.flags.c_contiguous:
        raise ValueError(f"GGUF CPU kernel: {what} must be contiguous (n, row_bytes) bytes")
    if ggml_type not in TYPES:
        raise ValueError(f"GGUF CPU kernel: {ggml_type} is not one of {', '.join(TYPES)}")
    t = GGML_TYPES_BY_NAME[ggml_type]
    if k % t.block_size or packed.shape[1] != t.row_bytes(k):
        raise ValueError(f"GGUF CPU kernel: cannot multiply {k} values by {what}: {ggml_type} rows of "
                         f"{packed.shape[1]} bytes")


def matmul_numpy(x: np.ndarray, packed: np.ndarray, ggml_type: str, threads: Optional[int] = None) -> np.ndarray:
    """x (m, k) float32 @ W.T for packed rows W (n, row_bytes) uint8 -> (m, n) float32."""
    lib = _loaded(load(), "GGUF")
    _check_x(x)
    _check_rows(packed, ggml_type, x.shape[1], "the weight")
    m, k = x.shape
    out = np.empty((m, packed.shape[0]), np.float32)
    rc = lib.applelm_gguf_matmul(x.ctypes.data, m, k, packed.ctypes.data, packed.shape[0], TYPES[ggml_type],
                                 threads or default_threads(), out.ctypes.data)
    if rc:
        raise ValueError(f"GGUF CPU kernel: cannot multiply {m} rows of {k} by {ggml_type} weights")
    return out


def matmuls_numpy(x: np.ndarray, weights: Sequence[tuple[np.ndarray, str]],
                  threads: Optional[int] = None) -> list[np.ndarray]:
    """[x @ W.T for (W, ggml_type) in weights] in one kernel call (up to MAX_PRODUCTS weights sharing x)."""
    lib = _loaded(load(), "GGUF")
    if not 1 <= len(weights) <= MAX_PRODUCTS:
        raise ValueError(f"GGUF CPU kernel: 1 to {MAX_PRODUCTS} weights per call, got {len(weights)}")
    _check_x(x)
    m, k = x.shape
    for packed, ggml_type in weights:
        _check_rows(packed, ggml_type, k, "each weight")
    outs = [np.empty((m, packed.shape[0]), np.float32) for packed, _ in weights]
    count = len(weights)
    rc = lib.applelm_gguf_matmul_many(
        x.ctypes.data, m, k, count, (ctypes.c_void_p * count)(*[p.ctypes.data for p, _ in weights]),
        (ctypes.c_int64 * count)(*[p.shape[0] for p, _ in weights]),
        (ctypes.c_int * count)(*[TYPES[t] for _, t in weights]), threads or default_threads(),
        (ctypes.c_void_p * count)(*[o.ctypes.data for o in outs]))
    if rc:
        raise ValueError(f"GGUF CPU kernel: cannot multiply {m} rows of {k} by these weights")
    return outs


def ffn_numpy(x: np.ndarray, gate: tuple[np.ndarray, str], up: tuple[np.ndarray, str], down: tuple[np.ndarray, str],
              activation: str, threads: Optional[int] = None) -> np.ndarray:
    """The gated FFN (act(x @ gate.T) * (x @ up.T)) @ down.T of x (m, k) float32 in one kernel call; each
    weight is (packed rows, ggml_type): gate and up (hidden, ...) of k values, down (k, ...) of hidden."""
    lib = _loaded(load(), "GGUF")
    if activation not in ACTIVATIONS:
        raise ValueError(f"GGUF CPU kernel: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    _check_x(x)
    m, k = x.shape
    hidden = gate[0].shape[0] if gate[0].ndim == 2 else -1
    _check_rows(gate[0], gate[1], k, "the gate")
    _check_rows(up[0], up[1], k, "the up projection")
    _check_rows(down[0], down[1], hidden, "the down projection")
    if up[0].shape[0] != hidden or down[0].shape[0] != k:
        raise ValueError(f"GGUF CPU kernel: FFN shapes do not chain: gate {gate[0].shape[0]} rows, up "
                         f"{up[0].shape[0]}, down {down[0].shape[0]} for {k} inputs")
    out = np.empty((m, k), np.float32)
    scratch = np.empty(2 * m * hidden, np.float32)
    rc = lib.applelm_gguf_ffn(x.ctypes.data, m, k, hidden, gate[0].ctypes.data, TYPES[gate[1]], up[0].ctypes.data,
                              TYPES[up[1]], down[0].ctypes.data, TYPES[down[1]], ACTIVATIONS[activation],
                              threads or default_threads(), scratch.ctypes.data, out.ctypes.data)
    if rc:
        raise ValueError(f"GGUF CPU kernel: cannot compute this FFN for {m} rows of {k}")
    return out


def affine_numpy(x: np.ndarray, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, scale_format: int, bits: int,
                 group_size: int, threads: Optional[int] = None) -> np.ndarray:
    """x (m, k) float32 @ W.T for MLX affine rows: w (n, k * bits / 32) uint32, scales and biases (n, k / group)
    of SCALE_FORMATS[scale_format] (16-bit ones as uint16 or their MLX dtype's numpy view) -> (m, n) float32."""
    lib = _loaded(load_affine(), "affine")
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
    xn = _input_rows(x, x.shape[-1], w, scales, biases)
    fmt = SCALE_FORMATS[scales.dtype]
    return _finish(x, affine_numpy(xn, host(w), _raw(scales), _raw(biases), fmt, bits, group_size))


def _raw(a: mx.array) -> np.ndarray:
    """The bytes of an evaluated CPU array as numpy (16-bit floats as uint16: numpy has no bfloat16)."""
    if a.dtype == mx.bfloat16:
        return host(a.view(mx.uint16))
    return host(a)


def gguf_matmul(x: mx.array, packed: mx.array, ggml_type: str, n_cols: int) -> mx.array:
    """x (..., n_cols) @ W.T through the kernel, in x's dtype (eager: evaluates x first)."""
    return _finish(x, matmul_numpy(_input_rows(x, n_cols, packed), host(packed), ggml_type))


def gguf_matmul_host(x: mx.array, packed: np.ndarray, ggml_type: str, n_cols: int) -> mx.array:
    """gguf_matmul for packed rows held in host memory (a read buffer): the kernel reads them in place."""
    return _finish(x, matmul_numpy(_input_rows(x, n_cols), packed, ggml_type))


def gguf_matmuls(x: mx.array, weights: Sequence[tuple[mx.array, str]], n_cols: int) -> list[mx.array]:
    """[x @ W.T for (W, ggml_type) in weights] through one kernel call, in x's dtype (eager)."""
    outs = matmuls_numpy(_input_rows(x, n_cols, *[w for w, _ in weights]), [(host(w), t) for w, t in weights])
    return [_finish(x, o) for o in outs]


def gguf_ffn(x: mx.array, gate: tuple, up: tuple, down: tuple, activation: str) -> mx.array:
    """The gated FFN of x (..., k) through one kernel call (ffn_numpy), in x's dtype (eager). Each weight is
    (packed rows, ggml_type), the rows an MLX array or host memory (numpy, read in place)."""
    xn = _input_rows(x, x.shape[-1], *[w for w, _ in (gate, up, down) if isinstance(w, mx.array)])
    gate, up, down = ((w if isinstance(w, np.ndarray) else host(w), t) for w, t in (gate, up, down))
    return _finish(x, ffn_numpy(xn, gate, up, down, activation))


def _input_rows(x: mx.array, k: int, *also: mx.array) -> np.ndarray:
    """x evaluated (with `also`) as a contiguous (m, k) float32 numpy array for the kernels."""
    # A float32 x is evaluated as it is and reshaped by numpy: the k and v projections then find the input
    # the q projection evaluated, with no new MLX node to wait for (one round trip to MLX's thread each).
    return np.ascontiguousarray(host(_evaluated_f32(x, *also))).reshape(-1, k)


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
