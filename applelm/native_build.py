"""Compile the CPU kernels written in C (ops/gguf_cpu.c, ops/affine_cpu.c, flash/native_ffn.c) on first use
and load them; and the one C++ module, ops/host_call.cpp, that runs them as MLX graph nodes (build_module).
Every kernel is compiled with the ops package's folder on the include path, for the helpers they share
(ops/cpu_vec.h); those headers are part of each build's cache key.

Each is optional: without a C compiler, or with APPLELM_NATIVE=off, callers take their MLX path. The shared
library is cached per source, compiler and CPU under ~/.cache/applelm/native (or $APPLELM_CACHE/native),
built to a temporary name and renamed, so concurrent first uses are safe.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

from .switches import switched_off

# The ops package's folder: ops/ in the repository, applelm/ops/ in an installed wheel (found without importing
# it: applelm.ops imports this module).
SHARED_INCLUDE = Path(importlib.util.find_spec("applelm.ops").submodule_search_locations[0])
_lock = threading.Lock()
_built: dict[Path, Optional[ctypes.CDLL]] = {}
_modules: dict[Path, Optional[ModuleType]] = {}


def disabled() -> bool:
    """True when APPLELM_NATIVE turns the compiled kernels off."""
    return switched_off("APPLELM_NATIVE")


def _cache_dir() -> Path:
    root = os.environ.get("APPLELM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "applelm")
    return Path(root) / "native"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and flags (Linux), else the platform string."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.platform() + platform.processor()


def _compile(compiler: str, source: Path, out: Path) -> None:
    base = [compiler, "-O3", "-ffast-math", "-fPIC", "-shared", "-std=c11", f"-I{SHARED_INCLUDE}"]
    arch = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    attempts = [base + arch + ["-fopenmp"], base + arch, base]  # OpenMP and native tuning are optional
    err = ["failed"]
    for flags in attempts:
        proc = subprocess.run(flags + [str(source), "-o", str(out), "-lm"], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        err = proc.stderr.strip().splitlines()[-1:] or ["failed"]
    raise OSError(f"{compiler}: {err[0]}")


def build(source: Path, signatures: dict[str, list], fallback: str) -> Optional[ctypes.CDLL]:
    """The compiled `source`, building it if needed, with each function in `signatures` (name -> argtypes;
    all return int) typed; None when unavailable (the reason is warned once, followed by `fallback`, which
    says what runs instead). Later calls return the first answer."""
    if source in _built:  # the per-product hot path: no lock once built or refused
        return _built[source]
    with _lock:
        if source in _built:
            return _built[source]
        _built[source] = None
        if disabled():
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not compiler:
            warnings.warn(f"no C compiler found: {fallback}", stacklevel=3)
            return None
        headers = b"".join(h.read_bytes() for h in sorted(SHARED_INCLUDE.glob("*.h")))
        suffix = ".dylib" if sys.platform == "darwin" else ".so"
        try:
            target = _cached_build(source.stem, suffix,
                                   source.read_bytes() + headers + compiler.encode() + _cpu_id().encode(),
                                   lambda out: _compile(compiler, source, out))
            lib = ctypes.CDLL(str(target))
            for name, argtypes in signatures.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = ctypes.c_int, argtypes
        except (OSError, AttributeError) as e:
            warnings.warn(f"could not build {source.name} ({e}): {fallback}", stacklevel=3)
            return None
        _built[source] = lib
        return lib


def _cached_build(name: str, suffix: str, key_parts: bytes, compile_to) -> Path:
    """The cache path for `name` under a hash of key_parts, built there first by compile_to(temporary path)
    when missing; built under a temporary name and renamed, so concurrent first uses are safe."""
    target = _cache_dir() / f"{name}_{hashlib.sha256(key_parts).hexdigest()[:16]}{suffix}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=suffix, dir=target.parent)
        os.close(fd)
        try:
            compile_to(Path(tmp))
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _mlx_module_flags() -> tuple[list[str], list[str], bytes]:
    """Compile and link flags for a nanobind module that shares MLX's array type, and what they depend on."""
    import mlx
    import nanobind
    from importlib.metadata import version

    mlx_dir = Path(mlx.__path__[0])
    nb = Path(nanobind.include_dir()).parent
    flags = ["-O2", "-std=c++20", "-fPIC", "-shared", "-fvisibility=hidden", "-DNDEBUG",
             "-DNB_DOMAIN=mlx",  # MLX's own bindings live in this nanobind domain
             f"-I{mlx_dir / 'include'}", f"-I{nb / 'include'}", f"-I{nb / 'ext' / 'robin_map' / 'include'}",
             f"-I{sysconfig.get_paths()['include']}", str(nb / "src" / "nb_combined.cpp")]
    link = [f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}"]
    if sys.platform == "darwin":
        link.append("-Wl,-undefined,dynamic_lookup")  # Python's symbols come from the running interpreter
    depends = f"{version('mlx')} {version('nanobind')} {sys.version} {mlx_dir}".encode()
    return flags, link, depends


def build_module(source: Path, name: str, fallback: str) -> Optional[ModuleType]:
    """The nanobind module `name` compiled from the C++ `source` against the installed MLX (built on first use,
    cached like the C kernels), or None when that is off (APPLELM_NATIVE or APPLELM_GRAPH_KERNELS), or when
    a C++ compiler, nanobind or the build is missing (warned once, followed by `fallback`)."""
    if source in _modules:
        return _modules[source]
    with _lock:
        if source in _modules:
            return _modules[source]
        _modules[source] = None
        if disabled() or switched_off("APPLELM_GRAPH_KERNELS"):
            return None
        compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        try:
            if not compiler:
                raise OSError("no C++ compiler found")
            flags, link, depends = _mlx_module_flags()
            suffix = sysconfig.get_config_var("EXT_SUFFIX")

            def compile_to(out: Path) -> None:
                proc = subprocess.run([compiler, *flags, str(source), *link, "-o", str(out)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    raise OSError(f"{compiler}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")

            target = _cached_build(name, suffix, source.read_bytes() + compiler.encode() + depends, compile_to)
            spec = importlib.util.spec_from_file_location(name, target,
                                                          loader=importlib.machinery.ExtensionFileLoader(name,
                                                                                                         str(target)))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except (OSError, ImportError) as e:
            warnings.warn(f"could not build {source.name} ({e}): {fallback}", stacklevel=3)
            return None
        _modules[source] = module
        return module


def default_threads() -> int:
    """Threads per call: APPLELM_NATIVE_THREADS, else the CPUs this process may use (at most 8)."""
    env = os.environ.get("APPLELM_NATIVE_THREADS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))
