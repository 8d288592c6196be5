"""Bulk moves of host-written MLX buffers to the GPU, on MLX's CUDA backend.

MLX's CUDA allocator hands out managed memory (cudaMallocManaged). A streamed unit copied into an MLX
array lands in host-resident pages; the first kernel that reads it then pulls the pages over one fault
at a time (measured on an H100: ~6.7 ms for a 16 MiB unit, ~2.5 GB/s, slower than the SSD feeding it).
`cudaMemPrefetchAsync` moves the same range in bulk. It is only a hint: managed memory stays coherent
whether or not the move has finished, so results never depend on it. Elsewhere (CPU, Metal, no CUDA
runtime found, or APPLELM_CUDA_PREFETCH=off) `to_device` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from typing import Optional

from ..switches import switched_off


class _MemLocation(ctypes.Structure):  # cudaMemLocation (CUDA 12.2+): {type, id}
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


_LOCATION_DEVICE = 1  # cudaMemLocationTypeDevice


def _find_cudart() -> Optional[ctypes.CDLL]:
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    found = ctypes.util.find_library("cudart")
    if found:
        names.append(found)
    for base in sys.path:  # pip's nvidia-cuda-runtime wheels (what MLX's CUDA wheel depends on)
        names += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "lib", "libcudart.so*")))
        names += sorted(glob.glob(os.path.join(base, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class CudaPrefetcher:
    """`to_device(array)`: start moving an evaluated MLX array's memory to the current GPU."""

    def __init__(self):
        self.available, self.calls, self.error = False, 0, None
        import mlx.core as mx

        cuda = getattr(mx, "cuda", None)
        if switched_off("APPLELM_CUDA_PREFETCH"):
            self.error = "off (APPLELM_CUDA_PREFETCH)"
            return
        if mx.default_device() != mx.gpu or cuda is None or not cuda.is_available():
            return
        lib = _find_cudart()
        if lib is None:
            self.error = "CUDA runtime library not found"
            return
        self._device = ctypes.c_int(0)
        if lib.cudaGetDevice(ctypes.byref(self._device)) != 0:
            self.error = "cudaGetDevice failed"
            return
        # CUDA 13 (and the _v2 entry of 12.2+) take (ptr, count, cudaMemLocation, flags, stream); older CUDA 12
        # (ptr, count, device, stream).
        v2 = getattr(lib, "cudaMemPrefetchAsync_v2", None)
        fn = v2 or lib.cudaMemPrefetchAsync
        version = ctypes.c_int(0)
        lib.cudaRuntimeGetVersion(ctypes.byref(version))
        self._v2 = version.value >= 13000 or v2 is not None
        if self._v2:
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _MemLocation, ctypes.c_uint, ctypes.c_void_p]
        else:
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        self._fn, self.runtime_version = fn, version.value
        self.available = True

    def to_device(self, array) -> None:
        """`array` must be evaluated (its buffer exists). A failing call turns the prefetcher off."""
        if not self.available:
            return
        import numpy as np

        try:
            host = np.array(array, copy=False)  # managed memory: the same pointer on host and device
        except (ValueError, TypeError, RuntimeError) as e:
            self.available, self.error = False, f"no host view ({e})"
            return
        ptr, n = host.ctypes.data, host.nbytes
        if self._v2:
            rc = self._fn(ptr, n, _MemLocation(_LOCATION_DEVICE, self._device.value), 0, None)
        else:
            rc = self._fn(ptr, n, self._device.value, None)
        if rc != 0:
            self.available, self.error = False, f"cudaMemPrefetchAsync returned {rc}"
            return
        self.calls += 1
