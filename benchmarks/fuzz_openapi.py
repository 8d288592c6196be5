"""Fuzz the server through its own OpenAPI document with schemathesis.

A tiny random GGUF (tests/gguf_fixtures.py) is served on a free loopback port with an API key, and
schemathesis runs every operation with all of its checks (no 5xx, status codes, content types and
response schemas as documented, schema-violating requests rejected, auth enforced, ...).

    .venv/bin/python benchmarks/fuzz_openapi.py [--max-examples 200] [--out benchmarks/results/schemathesis.txt]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

KEY = "fuzz-key"
# A context window no generated prompt can fill: JSON Schema cannot say "at most N tokens", so with a small
# window schemathesis' positive_data_acceptance check would (rightly) flag every long prompt's 400.
SERVER_ARGS = ["--port", "0", "--max-tokens-limit", "16", "--context-length", "1000000", "--max-body-bytes", "65536",
               "--api-key", KEY]


def fuzz(max_examples: int = 100, out: Path | None = None, seed: int | None = None) -> tuple[int, str]:
    """Run schemathesis against a fresh server; returns (exit status, report text)."""
    from server_fixtures import ServerProcess, write_tiny_gguf

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_gguf(Path(tmp) / "tiny-chat.gguf")
        with ServerProcess(["--model", str(model), *SERVER_ARGS]) as server:
            cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
                   "--checks", "all", "--max-examples", str(max_examples), "--workers", "1", "--no-color",
                   "--generation-database", "none", "--request-timeout", "30", "-H", f"Authorization: Bearer {KEY}"]
            if seed is not None:
                cmd += ["--seed", str(seed)]
            start = time.time()
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=1800)
            took = time.time() - start
            server_log = "\n".join(server.lines)
    shown = " ".join(c if c != f"Authorization: Bearer {KEY}" else "'Authorization: Bearer ...'" for c in cmd[1:])
    report = (f"# schemathesis fuzz of the applelm server's OpenAPI document\n"
              f"# date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
              f"# machine: {platform.machine()} {platform.system()} {platform.release()}, "
              f"python {platform.python_version()}\n"
              f"# server: python -m applelm.server --model tiny-chat.gguf {' '.join(SERVER_ARGS[:-1])} ...\n"
              f"# command: schemathesis {shown}\n"
              f"# exit status: {run.returncode}; {took:.0f} s\n\n{run.stdout}{run.stderr}")
    if "Traceback" in server_log:
        report += "\n# server log had a traceback:\n" + server_log
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return run.returncode, report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-examples", type=int, default=200)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "schemathesis.txt")
    args = p.parse_args()
    code, report = fuzz(args.max_examples, args.out, args.seed)
    print(report[-2500:])
    return code


if __name__ == "__main__":
    sys.exit(main())
