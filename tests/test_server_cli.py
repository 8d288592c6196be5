"""`python -m applelm.server` as a process: a tiny GGUF served over TCP and over a Unix socket, clean
shutdown, and one-line errors (exit status 2) for bad flags, paths and ports."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys

import openai
import pytest

from server_fixtures import ServerProcess, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-chat.gguf")


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def test_tcp_round_trip_and_clean_shutdown(tiny_gguf):
    with ServerProcess(["--model", str(tiny_gguf), "--port", "0", "--max-tokens-limit", "64"]) as server:
        assert server.url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        msgs = [{"role": "user", "content": "hello"}]
        r = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
        chunks = list(client.chat.completions.create(model="default", messages=msgs, max_tokens=8, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
        assert server.stop(signal.SIGTERM) == 0
    assert any("shutting down" in line for line in server.lines)


def test_uds_round_trip(tiny_gguf, tmp_path):
    path = str(tmp_path / "applelm.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a socket file left by a dead server
    stale.bind(path)
    stale.close()
    with ServerProcess(["--model", str(tiny_gguf), "--uds", path]) as server:
        assert server.url == f"unix:{path}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        conn = UnixConnection(path)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == "tiny-chat"
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body))  # same connection: keep-alive
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 5
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}))
        resp = conn.getresponse()
        events = [ln for ln in resp.read().decode().split("\n\n") if ln]
        assert events[-1] == "data: [DONE]" and len(events) >= 3
        conn.close()
        # a second server on the same socket is refused, and the live one is left alone
        second = subprocess.run([sys.executable, "-m", "applelm.server", "--model", str(tiny_gguf), "--uds", path],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "already listening" in second.stderr
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert not os.path.exists(path)  # removed on shutdown


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "applelm.server", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    # the error is one line (after the "listening" line when the failure comes from loading)
    assert len(lines) == 1 or (len(lines) == 2 and "listening on" in lines[0]), result.stderr
    assert lines[-1].startswith("applelm.server: error: ")
    for n in needles:
        assert n in lines[-1], lines[-1]


def test_cli_errors(tiny_gguf, tmp_path):
    one_line_error(run_cli("--model", str(tmp_path / "missing.gguf")), "does not exist")
    one_line_error(run_cli("--max-batch", "0"), "--max-batch")
    one_line_error(run_cli("--bogus"), "unrecognized")
    not_a_socket = tmp_path / "file.txt"
    not_a_socket.write_text("keep me")
    one_line_error(run_cli("--model", str(tiny_gguf), "--uds", str(not_a_socket)), "not a socket")
    assert not_a_socket.read_text() == "keep me"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        one_line_error(run_cli("--model", str(tiny_gguf), "--port", str(taken.getsockname()[1])), "cannot listen")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    one_line_error(run_cli("--model", str(junk), "--port", "0"), "could not load the model", "bad magic")


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0 and "--uds" in result.stdout and "--api-key" in result.stdout


def test_memory_budget_serves_a_flash_layout(tmp_path):
    """--memory-budget on the server: too small is one line naming the minimum (exit 2); at the minimum the
    FFN streams from disk and the answers equal those of the same layout fully resident."""
    import re

    from applelm import load

    gguf = write_tiny_gguf(tmp_path / "wide.gguf", intermediate_size=1024, num_hidden_layers=6)
    out = tmp_path / "flash"
    prep = subprocess.run([sys.executable, "-m", "applelm.flash", "prepare", str(gguf), str(out), "--bits", "32",
                           "--no-calibrate", "--quiet"], capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr
    small = subprocess.run([sys.executable, "-m", "applelm.server", "--model", str(out), "--port", "0",
                            "--memory-budget", "1KB"], capture_output=True, text=True, timeout=120)
    assert small.returncode == 2 and "Traceback" not in small.stderr
    minimum = int(re.search(r"minimum of .*?\((\d+) bytes\)", small.stderr).group(1))
    plan = load(str(out), memory_budget=minimum)[0].flash.plan
    assert plan.mode == "dense" and plan.streamed  # at this budget FFN layers stream
    body = dict(model="default", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True})
    answers = []
    for budget in ([], ["--memory-budget", str(minimum)]):
        with ServerProcess(["--model", str(out), "--port", "0", *budget]) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            answers.append(client.chat.completions.create(**body).choices[0].message.content)
            assert server.stop(signal.SIGTERM) == 0
    assert answers[0] == answers[1] and answers[0]
