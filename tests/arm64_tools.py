"""Shared test helper: build C sources for arm64 (what a Mac compiles) and run them under qemu.

Needs clang, an aarch64 sysroot and qemu-aarch64 (Debian: apt-get install libc6-dev-arm64-cross
libgcc-12-dev-arm64-cross qemu-user); tests using it are skipped without them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from applelm.native_build import SHARED_INCLUDE

CLANG = shutil.which("clang")
QEMU = shutil.which("qemu-aarch64")
SYSROOT = Path("/usr/aarch64-linux-gnu")
needs_arm64 = pytest.mark.skipif(not (CLANG and QEMU and SYSROOT.is_dir()),
                                 reason="needs clang, qemu-aarch64 and an aarch64 sysroot")
FLAVOURS = ["openmp", "no-openmp"]  # Apple's clang has no OpenMP by default: the build without it is usual


def build_driver(source: Path, driver_code: str, out: Path, flavour: str) -> Path:
    """A static aarch64 executable of `source` plus `driver_code`, built with native_build.py's flags
    (-O3 -ffast-math -std=c11, its shared include folder, -mcpu=native on arm64) with an Apple M1 as the
    native CPU."""
    (out / "driver.c").write_text(driver_code)
    cmd = [CLANG, "--target=aarch64-linux-gnu", f"--sysroot={SYSROOT}", "--gcc-toolchain=/usr", "-fuse-ld=lld",
           "-static", "-O3", "-ffast-math", "-std=c11", "-mcpu=apple-m1", f"-I{SHARED_INCLUDE}", str(source),
           str(out / "driver.c"), "-o", str(out / "driver"), "-lm"]
    if flavour == "openmp":
        cmd[1:1] = ["-fopenmp=libgomp"]
        cmd += ["-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "driver"


def driver_fixture(source: Path, driver_code: str, name: str):
    """A module-scoped fixture giving (driver executable, flavour) for each of FLAVOURS, built once per
    flavour into a temporary folder named after `name`."""

    @pytest.fixture(scope="module", params=FLAVOURS)
    def fixture(request, tmp_path_factory):
        out = tmp_path_factory.mktemp(f"{name}-{request.param}")
        return build_driver(source, driver_code, out, request.param), request.param

    return fixture


def run_driver(driver: Path, stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU, str(driver)], input=stdin, capture_output=True)
