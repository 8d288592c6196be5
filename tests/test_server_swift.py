"""`swift test` for the Swift client (examples/swift) against a live server on a tiny model."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from server_fixtures import ServerProcess, write_tiny_gguf

PACKAGE = Path(__file__).resolve().parent.parent / "examples" / "swift"


@pytest.mark.slow
def test_swift_client_against_live_server(tmp_path):
    swift = shutil.which("swift")
    if swift is None:
        pytest.skip("swift is not on PATH: the Swift client cannot be built here")
    model = write_tiny_gguf(tmp_path / "tiny-chat.gguf")
    # A long context so that the client's cancel test asks for far more tokens than it reads.
    args = ["--model", str(model), "--port", "0", "--api-key", "swift-key", "--context-length", "32768",
            "--max-tokens-limit", "30000"]
    with ServerProcess(args) as server:
        env = {**os.environ, "APPLELM_SERVER_URL": server.url, "APPLELM_API_KEY": "swift-key"}
        result = subprocess.run([swift, "test", "--package-path", str(PACKAGE)], env=env, capture_output=True,
                                text=True, timeout=1200)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-8000:]
    assert "Executed 6 tests, with 0 failures" in out, out[-8000:]
