"""Shared test helper: a C kernel built for plain x86-64 (no AVX2), so its generic vector code, the code other
CPUs such as arm64 compile, runs here beside the -march=native build the runtime uses."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from applelm.native_build import SHARED_INCLUDE

needs_x86_gcc = pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("gcc"),
                                   reason="x86-64 with gcc")


def portable_function(source: Path, name: str, argtypes: list, out: Path):
    """Function `name` of `source` compiled with native_build.py's flags but -march=x86-64, returning int."""
    lib_path = out / "generic.so"
    subprocess.run(["gcc", "-O3", "-ffast-math", "-fPIC", "-shared", "-std=c11", "-march=x86-64", "-Wno-psabi",
                    f"-I{SHARED_INCLUDE}", str(source), "-o", str(lib_path), "-lm"], check=True, capture_output=True)
    fn = getattr(ctypes.CDLL(str(lib_path)), name)
    fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return fn
