"""Give MLX's CPU backend a fast BLAS on Linux.

The Linux `mlx[cpu]` wheel links the reference (netlib) BLAS, about 20x slower than an optimized one for
the matrix products of prefill. Loading OpenBLAS or MKL with RTLD_GLOBAL *before* mlx is imported makes
libmlx's cblas_* calls bind to it. Set APPLELM_BLAS=off to keep the reference BLAS, or to a library path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

loaded: str | None = None  # the library that was preloaded, if any


def _candidates() -> list[str]:
    found = []
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))  # PyPI `mkl` wheel
    name = ctypes.util.find_library("openblas")  # e.g. Debian's libopenblas0-pthread
    if name:
        found.append(name)
    return found


def preload() -> str | None:
    """Preload the first fast BLAS found (Linux only, and only if mlx is not imported yet)."""
    global loaded
    choice = os.environ.get("APPLELM_BLAS", "").strip()
    if loaded or not sys.platform.startswith("linux") or choice.lower() == "off" or "mlx.core" in sys.modules:
        return loaded
    for path in [choice] if choice else _candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = path
        break
    return loaded
