"""schemathesis fuzzes the server through its own OpenAPI document (all checks: no 5xx, documented
statuses, content types and schemas, invalid input rejected, valid input accepted, auth enforced).
benchmarks/fuzz_openapi.py runs the same with more examples; its report is benchmarks/results/schemathesis.txt."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_schemathesis_finds_no_failures(tmp_path):
    if importlib.util.find_spec("schemathesis") is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    spec = importlib.util.spec_from_file_location("fuzz_openapi", ROOT / "benchmarks" / "fuzz_openapi.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    code, report = fuzz.fuzz(max_examples=25, out=tmp_path / "report.txt", seed=1)
    assert code == 0 and "No issues found" in report, report[-6000:]
    assert "server log had a traceback" not in report
