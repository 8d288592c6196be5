"""Decode attention on the CPU through attention_cpu.c, as a node of MLX's graph (ops/host_call.py).

One query per row against its cached keys and values, each (row, kv head) read once for all the query heads
that share it, the cache's strided views read in place. `models.base.scaled_dot_product_attention` sends
one-query float32 attention here on the CPU when `available()`; otherwise MLX's products run (the reference
this kernel is tested against). APPLELM_CPU_ATTENTION=off turns it off.
"""

from __future__ import annotations

import struct
from pathlib import Path

import mlx.core as mx

from ..native_build import build, default_threads
from ..switches import switched_off
from . import cpu_native, host_call

SOURCE = Path(__file__).with_name("attention_cpu.c")
SIGNATURES = {"applelm_decode_attention_entry": cpu_native._ENTRY}


def _lib():
    return build(SOURCE, SIGNATURES, "decode attention on the CPU uses MLX's products")


def available() -> bool:
    """Whether the kernel runs here: not switched off, built, and the CPU kernels run as graph nodes."""
    return not switched_off("APPLELM_CPU_ATTENTION") and cpu_native.graph_ready() and _lib() is not None


def entry() -> int:
    """The address of the kernel's graph entry point (ops/host_call.py)."""
    return cpu_native._entry(_lib(), "applelm_decode_attention_entry")


def _mask_rows(mask, batch: int, keys: int) -> int:
    """How many rows of keys booleans the mask holds (1 or batch), 0 for no mask; raises ValueError for a mask
    the kernel does not take (an additive one, or one that differs between heads or queries)."""
    if mask is None or (isinstance(mask, str) and mask == "causal"):  # one query sees every key
        return 0
    if not isinstance(mask, mx.array) or mask.dtype != mx.bool_:
        raise ValueError("only boolean masks")
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if len(shape) != 4 or shape[0] not in (1, batch) or shape[1] != 1 or shape[2] != 1 or shape[3] != keys:
        raise ValueError(f"a mask of shape {tuple(mask.shape)}")
    return shape[0]


def takes(q: mx.array, k: mx.array, v: mx.array, mask) -> bool:
    """Whether decode_attention handles these arguments (one query a row, float32, a boolean or no mask)."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[2] != 1 or k.shape != v.shape or k.shape[0] != q.shape[0]:
        return False
    if k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1] or not all(a.dtype == mx.float32 for a in (q, k, v)):
        return False
    try:
        _mask_rows(mask, q.shape[0], k.shape[2])
    except ValueError:
        return False
    return True


def chosen(q: mx.array, k: mx.array, v: mx.array, mask) -> bool:
    """Whether the models' attention takes the kernel: it runs here and takes the arguments, and the (row, kv head)
    pairs are at least the threads. With fewer (one row of Gemma 3's single kv head) each thread takes a query
    head and reads the keys again: slower than MLX's products there (benchmarks/cpu_decode_attention.py)."""
    return available() and takes(q, k, v, mask) and q.shape[0] * k.shape[1] >= default_threads()


def decode_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask) -> mx.array:
    """softmax(scale * q k^T, mask) v for q (B, heads, 1, D) and k, v (B, kv_heads, T, D), float32: the kernel
    as a lazy graph node. Check `available()` and `takes(...)` first."""
    if not takes(q, k, v, mask):
        raise ValueError("decode_attention: one float32 query a row and a boolean or no mask")
    B, heads, _, D = q.shape
    kv_heads, T = k.shape[1], k.shape[2]
    rows = _mask_rows(mask, B, T)
    inputs = [q, k, v] + ([mask.reshape(rows, T)] if rows else [])
    scale_bits = struct.unpack("<I", struct.pack("<f", scale))[0]
    args = [B, heads, kv_heads, D, T, rows, scale_bits, default_threads()]
    (out,) = host_call.call(entry(), inputs, [(B, heads, 1, D)], args, strided=(1, 2))
    return out
