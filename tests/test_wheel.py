"""A built wheel installs into a clean venv and imports applelm.models / applelm.ops (never as top-level
`models` / `ops` packages)."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_wheel_imports_in_clean_venv(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("applelm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "applelm/models/llama.py" in names and "applelm/ops/dispatch.py" in names
    assert "applelm/flash/native_ffn.c" in names  # the CPU kernels' sources, compiled on first use
    assert {"applelm/ops/gguf_cpu.c", "applelm/ops/affine_cpu.c", "applelm/ops/cpu_vec.h",
            "applelm/ops/host_call.cpp"} <= set(names)
    assert not any(n.startswith(("models/", "ops/", "tests/", "benchmarks/")) for n in names)

    env_dir = tmp_path / "clean"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # dependencies come from the package index (or pip's cache); nothing from this checkout
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=900)
    code = ("import applelm, applelm.models, applelm.ops, importlib.util as u;"
            "from applelm.models import get_architecture; get_architecture('gemma3');"
            "assert u.find_spec('models') is None and u.find_spec('ops') is None;"
            "from applelm.flash import native; import shutil;"
            "from applelm.ops import cpu_native;"
            "has_cc = shutil.which('cc') or shutil.which('gcc');"
            "assert all(f() is not None for f in (native.load, cpu_native.load, cpu_native.load_affine)) or not has_cc;"
            # the kernels as MLX graph nodes: built against the installed MLX and nanobind, and checked
            "assert cpu_native.graph_ready() or not shutil.which('c++');"
            "print(applelm.models.__file__)")
    env = dict(os.environ, APPLELM_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env=env)
    assert str(env_dir) in out.stdout
