"""GGUF and MLX-affine matmuls on the CPU through gguf_cpu.c and affine_cpu.c (compiled on first use, ctypes).

MLX's CPU backend has no fast path for packed GGUF rows: its quantized matmul ran SmolLM2 at ~5 tok/s,
and dequantizing to float32 takes 4-5x the memory. Even on MLX's own affine rows its CPU quantized matmul
reads ~0.5 GB/s at one row (benchmarks/qmatmul_bench.py --cpu-small). These kernels read the packed rows
once per call and decode each block or group in registers. Where ops/host_call.cpp builds (`graph_ready()`),
a call on MLX arrays is a lazy node of MLX's graph, run on the CPU stream (also inside mx.compile). Otherwise,
and for weights in host memory (numpy: flash read buffers, reused as soon as the call returns), a call
evaluates its input and returns a new array: it runs eagerly, and not inside mx.compile (`Tracing` is raised
there; the dispatcher then takes MLX ops). Without a C compiler, or with APPLELM_NATIVE=off, `load()` and
`load_affine()` are None and the MLX paths run.
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..native_build import build, default_threads
from . import host_call
from .ggml_types import GGML_TYPES_BY_NAME

SOURCE = Path(__file__).with_name("gguf_cpu.c")
TYPES = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q5_1": 3, "Q8_0": 4, "Q4_K": 5, "Q6_K": 6}
_VEC, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_ENTRY = [_VEC, _VEC, _VEC]  # the entry points host_call.cpp's primitive calls: inputs, outputs, arguments
SIGNATURES = {"applelm_gguf_matmul": [_VEC, _I64, _I64, _VEC, _I64, _INT, _INT, _VEC],
              "applelm_gguf_matmul_many_entry": _ENTRY, "applelm_gguf_ffn_entry": _ENTRY,
              "applelm_gguf_matmul_many": [_VEC, _I64, _I64, _INT, _VEC, _VEC, _VEC, _INT, _VEC],
              "applelm_gguf_ffn": [_VEC, _I64, _I64, _I64, _VEC, _INT, _VEC, _INT, _VEC, _INT, _INT, _INT, _VEC,
                                   _VEC]}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "relu": 2}  # the gated FFN's activation (ops/cpu_vec.h)
MAX_PRODUCTS = 8  # weights one applelm_gguf_matmul_many call takes
AFFINE_SOURCE = Path(__file__).with_name("affine_cpu.c")
AFFINE_SIGNATURES = {"applelm_affine_matmul": [_VEC, _I64, _I64, _VEC, _VEC, _VEC, _INT, _I64, _INT, _INT, _INT,
                                               _VEC], "applelm_affine_matmul_entry": _ENTRY}
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


def _check_rows(packed, ggml_type: str, k: int, what: str) -> None:
    """packed (numpy, contiguous, or an MLX array, made contiguous by host_call) must be (n, row_bytes) bytes of
    ggml_type rows of k values (the kernel trusts it)."""
    if isinstance(packed, np.ndarray):
        ok = packed.dtype == np.uint8 and packed.flags.c_contiguous
    else:
        ok = packed.dtype == mx.uint8
    if not ok or packed.ndim != 2:
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
    _check_x(x)
    m, k = x.shape
    hidden = _check_ffn(gate, up, down, activation, k)
    out = np.empty((m, k), np.float32)
    scratch = np.empty(2 * m * hidden, np.float32)
    rc = lib.applelm_gguf_ffn(x.ctypes.data, m, k, hidden, gate[0].ctypes.data, TYPES[gate[1]], up[0].ctypes.data,
                              TYPES[up[1]], down[0].ctypes.data, TYPES[down[1]], ACTIVATIONS[activation],
                              threads or default_threads(), scratch.ctypes.data, out.ctypes.data)
    if rc:
        raise ValueError(f"GGUF CPU kernel: cannot compute this FFN for {m} rows of {k}")
    return out


def _check_ffn(gate: tuple, up: tuple, down: tuple, activation: str, k: int) -> int:
    """The hidden size of a gated FFN the kernel can compute from inputs of k values (else ValueError)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"GGUF CPU kernel: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    hidden = gate[0].shape[0] if gate[0].ndim == 2 else -1
    _check_rows(gate[0], gate[1], k, "the gate")
    _check_rows(up[0], up[1], k, "the up projection")
    _check_rows(down[0], down[1], hidden, "the down projection")
    if up[0].shape[0] != hidden or down[0].shape[0] != k:
        raise ValueError(f"GGUF CPU kernel: FFN shapes do not chain: gate {gate[0].shape[0]} rows, up "
                         f"{up[0].shape[0]}, down {down[0].shape[0]} for {k} inputs")
    return hidden


def _check_affine(m: int, k: int, w, scales, biases, itemsize: int, bits: int, group_size: int) -> None:
    """w (n, k * bits / 32) uint32 words, scales and biases (n, k / group_size) of `itemsize` bytes (else
    ValueError)."""
    n = w.shape[0] if w.ndim == 2 else -1
    ok = (w.dtype in (np.uint32, mx.uint32) and w.ndim == 2 and w.shape[1] * 32 == k * bits and bits in AFFINE_BITS
          and group_size in AFFINE_GROUPS and k % group_size == 0
          and all(tuple(a.shape) == (n, k // group_size) and a.itemsize == itemsize for a in (scales, biases)))
    if not ok:
        raise ValueError(f"affine CPU kernel: cannot multiply {m} rows of {k} by {bits}-bit rows of shape "
                         f"{tuple(w.shape)} in groups of {group_size}")


def affine_numpy(x: np.ndarray, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, scale_format: int, bits: int,
                 group_size: int, threads: Optional[int] = None) -> np.ndarray:
    """x (m, k) float32 @ W.T for MLX affine rows: w (n, k * bits / 32) uint32, scales and biases (n, k / group)
    of SCALE_FORMATS[scale_format] (16-bit ones as uint16 or their MLX dtype's numpy view) -> (m, n) float32."""
    lib = _loaded(load_affine(), "affine")
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError("affine CPU kernel: x must be a contiguous (m, k) float32 array")
    m, k = x.shape
    if scale_format not in (0, 1, 2) or not all(a.flags.c_contiguous for a in (w, scales, biases)):
        raise ValueError(f"affine CPU kernel: contiguous weights and a scale format of 0, 1 or 2 needed, got "
                         f"{scale_format}")
    _check_affine(m, k, w, scales, biases, 4 if scale_format == 0 else 2, bits, group_size)
    n = w.shape[0]
    out = np.empty((m, n), np.float32)
    rc = lib.applelm_affine_matmul(x.ctypes.data, m, k, w.ctypes.data, scales.ctypes.data, biases.ctypes.data,
                                   scale_format, n, bits, group_size, threads or default_threads(), out.ctypes.data)
    if rc:
        raise ValueError(f"affine CPU kernel: cannot multiply {m} rows of {k} by {bits}-bit weights")
    return out


def affine_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int,
                  group_size: int) -> mx.array:
    """x (..., k) @ W.T for MLX affine-quantized W through the kernel, in x's dtype (a graph node where
    graph_ready(), else eager: evaluates x)."""
    fmt = SCALE_FORMATS[scales.dtype]
    if graph_ready():
        k = x.shape[-1]
        xf = _graph_rows(x, k)
        _check_affine(xf.shape[0], k, w, scales, biases, scales.itemsize, bits, group_size)
        args = [xf.shape[0], k, w.shape[0], fmt, bits, group_size, default_threads()]
        (out,) = host_call.call(_entry(load_affine(), "applelm_affine_matmul_entry"), [xf, w, scales, biases],
                                [(xf.shape[0], w.shape[0])], args)
        return _graph_finish(x, out)
    xn = _input_rows(x, x.shape[-1], w, scales, biases)
    return _finish(x, affine_numpy(xn, host(w), _raw(scales), _raw(biases), fmt, bits, group_size))


def _raw(a: mx.array) -> np.ndarray:
    """The bytes of an evaluated CPU array as numpy (16-bit floats as uint16: numpy has no bfloat16)."""
    if a.dtype == mx.bfloat16:
        return host(a.view(mx.uint16))
    return host(a)


def gguf_matmul(x: mx.array, packed: mx.array, ggml_type: str, n_cols: int) -> mx.array:
    """x (..., n_cols) @ W.T through the kernel, in x's dtype (a graph node where graph_ready(), else eager:
    evaluates x first)."""
    if graph_ready():
        return _graph_matmuls(x, [(packed, ggml_type)], n_cols)[0]
    return _finish(x, matmul_numpy(_input_rows(x, n_cols, packed), host(packed), ggml_type))


def gguf_matmul_host(x: mx.array, packed: np.ndarray, ggml_type: str, n_cols: int) -> mx.array:
    """gguf_matmul for packed rows held in host memory (a read buffer): the kernel reads them in place, so the
    call is eager (the buffer is reused once it returns)."""
    return _finish(x, matmul_numpy(_input_rows(x, n_cols), packed, ggml_type))


def gguf_matmuls(x: mx.array, weights: Sequence[tuple[mx.array, str]], n_cols: int) -> list[mx.array]:
    """[x @ W.T for (W, ggml_type) in weights] through one kernel call, in x's dtype (a graph node where
    graph_ready(), else eager)."""
    if graph_ready():
        return _graph_matmuls(x, weights, n_cols)
    outs = matmuls_numpy(_input_rows(x, n_cols, *[w for w, _ in weights]), [(host(w), t) for w, t in weights])
    return [_finish(x, o) for o in outs]


def gguf_ffn(x: mx.array, gate: tuple, up: tuple, down: tuple, activation: str) -> mx.array:
    """The gated FFN of x (..., k) through one kernel call (ffn_numpy), in x's dtype. Each weight is (packed
    rows, ggml_type), the rows an MLX array (then a graph node where graph_ready()) or host memory (numpy, read
    in place: eager)."""
    if graph_ready() and all(isinstance(w, mx.array) for w, _ in (gate, up, down)):
        k = x.shape[-1]
        xf = _graph_rows(x, k)
        m, hidden = xf.shape[0], _check_ffn(gate, up, down, activation, k)
        args = [m, k, hidden, TYPES[gate[1]], TYPES[up[1]], TYPES[down[1]], ACTIVATIONS[activation],
                default_threads()]
        out, _ = host_call.call(_entry(load(), "applelm_gguf_ffn_entry"), [xf, gate[0], up[0], down[0]],
                                [(m, k), (2 * m * hidden,)], args)
        return _graph_finish(x, out)
    xn = _input_rows(x, x.shape[-1], *[w for w, _ in (gate, up, down) if isinstance(w, mx.array)])
    gate, up, down = ((w if isinstance(w, np.ndarray) else host(w), t) for w, t in (gate, up, down))
    return _finish(x, ffn_numpy(xn, gate, up, down, activation))


_graph: Optional[bool] = None
_entries: dict[str, int] = {}


def graph_ready() -> bool:
    """Whether the kernels run as MLX graph nodes (ops/host_call.py): the module built, and a Q8_0 product
    through it gave the exact answer (so a nanobind that does not match MLX's falls back, warned once)."""
    global _graph
    if _graph is None:
        _graph = False
        if load() is not None and host_call.module() is not None:
            try:
                row = np.concatenate([np.array([1.0], np.float16).view(np.uint8), np.arange(1, 33, dtype=np.uint8)])
                (y,) = host_call.call(_entry(load(), "applelm_gguf_matmul_many_entry"),
                                      [mx.ones((1, 32)), mx.array(row[None])], [(1, 1)],
                                      [1, 32, 1, 1, 1, TYPES["Q8_0"]])
                _graph = y.item() == 528.0
            except (TypeError, RuntimeError) as e:
                warnings.warn(f"host_call is unusable here ({e}): the CPU kernels run eagerly", stacklevel=2)
    return _graph


def _entry(lib: Optional[ctypes.CDLL], name: str) -> int:
    if name not in _entries:
        _entries[name] = host_call.address(_loaded(lib, name), name)
    return _entries[name]


def _graph_matmuls(x: mx.array, weights: Sequence[tuple[mx.array, str]], n_cols: int) -> list[mx.array]:
    if not 1 <= len(weights) <= MAX_PRODUCTS:
        raise ValueError(f"GGUF CPU kernel: 1 to {MAX_PRODUCTS} weights per call, got {len(weights)}")
    xf = _graph_rows(x, n_cols)
    for packed, ggml_type in weights:
        _check_rows(packed, ggml_type, n_cols, "each weight")
    m = xf.shape[0]
    args = [m, n_cols, len(weights), default_threads(), *[w.shape[0] for w, _ in weights],
            *[TYPES[t] for _, t in weights]]
    outs = host_call.call(_entry(load(), "applelm_gguf_matmul_many_entry"), [xf, *[w for w, _ in weights]],
                          [(m, w.shape[0]) for w, _ in weights], args)
    return [_graph_finish(x, o) for o in outs]


def _graph_rows(x: mx.array, k: int) -> mx.array:
    """x as (m, k) float32, lazily."""
    return x.reshape(-1, k).astype(mx.float32)


def _graph_finish(x: mx.array, out: mx.array) -> mx.array:
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if x.dtype == mx.float32 else out.astype(x.dtype)


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
