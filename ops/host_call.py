"""The compiled CPU kernels as nodes of MLX's graph: ops/host_call.cpp's primitive runs a C entry point on MLX's
CPU stream, so a kernel no longer evaluates its input first (one round trip to MLX's thread each, 89 per SmolLM2
token), graph building overlaps with computation (mx.async_eval), and mx.compile can trace through it.

The module is built on first use (applelm.native_build.build_module) and checked on a product it can verify
exactly; without it (no C++ compiler or nanobind, a nanobind that does not match MLX's, or
APPLELM_GRAPH_KERNELS=off) the kernels run eagerly through ctypes as before.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

import mlx.core as mx

from ..native_build import build_module

SOURCE = Path(__file__).with_name("host_call.cpp")


def module() -> Optional[ModuleType]:
    """The built `_host_call` module, or None when unavailable."""
    return build_module(SOURCE, "_host_call", "the CPU kernels run eagerly, each evaluating its input first")


def address(lib: ctypes.CDLL, name: str) -> int:
    """The address of entry point `name` in a kernel library loaded by applelm.native_build.build."""
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def call(fn: int, inputs: Sequence[mx.array], shapes: Sequence[Sequence[int]], args: Sequence[int],
         strided: Sequence[int] = ()) -> list[mx.array]:
    """float32 arrays of `shapes`, computed lazily on the CPU stream by the entry point at address `fn` from
    `inputs` and the integer `args`. Inputs are made row-contiguous, except those at the indices `strided`: the
    entry point gets them as they are, each one's element strides appended to `args` (in order). The caller
    checks every argument: a kernel that refuses them fills its outputs with NaN."""
    mod = module()
    if mod is None:
        raise RuntimeError("the host_call module is unavailable")
    return mod.host_call(fn, list(inputs), [list(s) for s in shapes], [int(a) for a in args],
                         [int(i) for i in strided])
