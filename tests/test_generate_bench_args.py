"""benchmarks/generate_bench.py's optional llama.cpp peer: an interpreter that cannot run llama-cpp-python is
refused before the long run, with one line and exit status 1 (no traceback); so is an unknown --skip label."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_bench.py"


@pytest.mark.parametrize("python", ["/nonexistent/python", __file__, sys.executable])
def test_unusable_llama_cpp_interpreter_is_one_line(python, tmp_path):
    if python == sys.executable and importlib.util.find_spec("llama_cpp"):
        pytest.skip("this interpreter has llama_cpp")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--llama-cpp-python", python,
                           "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"--llama-cpp-python {python}: not an interpreter that can import llama_cpp"
    assert not (tmp_path / "r.json").exists()


def test_unknown_skip_label_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--skip", "mlx-lm q5", "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "--skip: no engine labelled 'mlx-lm q5'"
    assert not (tmp_path / "r.json").exists()
