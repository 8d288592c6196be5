"""A client that hangs up has its generation cancelled and its batch slot freed at once."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import pytest

from applelm.batch_engine import BatchEngine
from conftest import build_tiny
from server_fixtures import FakeTokenizer, SlowModel, live_server

LONG = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 4000, "ignore_eos": True, "temperature": 0}


def wait_for(predicate, timeout: float = 5.0) -> float:
    """Seconds until predicate() held (fails after timeout)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.002)
    return time.monotonic() - start


@pytest.fixture()
def slow_server():
    # ~5 ms per decode step: a 4000-token request would run for 20 s if it were not cancelled
    engine = BatchEngine(lambda: (SlowModel(build_tiny("llama")[0]), FakeTokenizer()), context_length=8192).start()
    with live_server(engine, max_tokens_limit=4000) as (url, app):
        yield urlparse(url), app.engine


def post(u, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_generation(slow_server, stream):
    u, engine = slow_server
    keep = post(u, LONG)  # a second client that stays: the batch goes on without the one that left
    gone = post(u, {**LONG, "stream": stream})
    wait_for(lambda: engine.active_count == 2)
    if stream:
        assert gone.recv(4096).startswith(b"HTTP/1.1 200")  # tokens are flowing
    steps = engine.steps
    gone.close()
    took = wait_for(lambda: engine.active_count == 1)
    assert took < 1.0 and engine.steps - steps < 400
    keep.close()
    wait_for(lambda: engine.active_count == 0)


def test_disconnect_while_queued(slow_server):
    u, engine = slow_server
    engine.max_batch = 1
    first = post(u, LONG)
    wait_for(lambda: engine.active_count == 1)
    queued = post(u, LONG)
    wait_for(lambda: engine.queued_count == 1)
    queued.close()
    first.close()
    wait_for(lambda: engine.active_count == 0 and engine.queued_count == 0)
