"""Every error status the server answers, each with the OpenAI error body, and never a traceback."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from urllib.parse import urlparse

import openai
import pytest

from applelm.batch_engine import BatchEngine
from conftest import build_tiny
from server_fixtures import FakeTokenizer, GatedModel, live_server, tiny_engine

CHAT = "/v1/chat/completions"
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server():
    with live_server(tiny_engine(context_length=64), max_tokens_limit=32, max_body_bytes=4096) as (url, app):
        yield url, app


def request(url: str, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, parsed JSON body) of one request on a fresh connection."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    is_json = resp.headers["Content-Type"] == "application/json"
    return resp.status, resp.headers, json.loads(payload) if is_json else payload


def assert_error(result, status: int, code: str | None = None, param: str | None = None):
    got, headers, body = result
    assert got == status, body
    assert headers["Content-Type"] == "application/json"
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in err["message"]
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    return err


BAD_BODIES = [
    ({"messages": []}, None),
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({**OK_CHAT, "temperature": "hot"}, "temperature"),
    ({**OK_CHAT, "temperature": 2.5}, "temperature"),
    ({**OK_CHAT, "top_p": -0.1}, "top_p"),
    ({**OK_CHAT, "max_tokens": 0}, "max_tokens"),
    ({**OK_CHAT, "max_tokens": True}, "max_tokens"),
    ({**OK_CHAT, "max_tokens": 1.5}, "max_tokens"),
    ({**OK_CHAT, "max_tokens": 33}, "max_tokens"),  # over --max-tokens-limit
    ({**OK_CHAT, "max_completion_tokens": "3"}, "max_completion_tokens"),
    ({**OK_CHAT, "seed": "7"}, "seed"),
    ({**OK_CHAT, "seed": 2**64}, "seed"),
    ({**OK_CHAT, "stop": 5}, "stop"),
    ({**OK_CHAT, "stop": ["a"] * 17}, "stop"),
    ({**OK_CHAT, "stream": "yes"}, "stream"),
    ({**OK_CHAT, "stream_options": 1}, "stream_options"),
    ({**OK_CHAT, "n": 2}, "n"),
    ({**OK_CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    ({**OK_CHAT, "logit_bias": {"5": 10}}, "logit_bias"),
    ({**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({**OK_CHAT, "logprobs": True}, "logprobs"),
    ({**OK_CHAT, "model": 5}, "model"),
    ({"messages": [{"role": "user", "content": "x" * 80}]}, None),  # prompt over the 64-token context
    ({"messages": [{"role": "user", "content": "x" * 30}], "max_tokens": 30}, "max_tokens"),  # prompt + 30 > 64
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ([1, 2], None),
    ("text", None),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_400_invalid_chat_fields(server, body, param):
    assert_error(request(server[0], "POST", CHAT, body), 400, param=param)


@pytest.mark.parametrize("body", [
    {"prompt": ""}, {}, {"prompt": 5}, {"prompt": [1, 2, 97]}, {"prompt": [-1]}, {"prompt": ["a", "b"]},
    {"prompt": [True]}, {"prompt": "hi", "echo": True}, {"prompt": "hi", "best_of": 3}, {"prompt": "hi", "suffix": "x"},
    {"prompt": "hi", "logprobs": 2}, {"prompt": list(range(3, 70))},
])
def test_400_invalid_completion_fields(server, body):
    assert_error(request(server[0], "POST", "/v1/completions", body), 400)


@pytest.mark.parametrize("raw", [b"{", b"not json", b"\xff\xfe", b'{"messages": NaN}', b"[" * 2000 + b"]" * 2000,
                                 b""])
def test_400_malformed_json(server, raw):
    assert_error(request(server[0], "POST", CHAT, raw=raw), 400, "invalid_json")


def test_404_unknown_model_and_route(server):
    url = server[0]
    assert_error(request(url, "POST", CHAT, {**OK_CHAT, "model": "/etc/passwd"}), 404, "model_not_found", "model")
    assert_error(request(url, "POST", "/v1/completions", {"prompt": "x", "model": "../other.gguf"}), 404,
                 "model_not_found")
    assert_error(request(url, "GET", "/v1/models/other"), 404, "model_not_found")
    assert_error(request(url, "GET", "/v2/nothing"), 404, "not_found")
    assert_error(request(url, "POST", "/v1/embeddings", {"input": "x"}), 404)
    assert_error(request(url, "GET", "/"), 404)


def test_405_wrong_method(server):
    url = server[0]
    status, headers, _ = request(url, "GET", CHAT)
    assert status == 405 and headers["Allow"] == "POST"
    assert_error(request(url, "GET", CHAT), 405, "method_not_allowed")
    assert_error(request(url, "POST", "/v1/models", {}), 405)
    assert_error(request(url, "DELETE", "/v1/models/tiny"), 405)
    assert_error(request(url, "PUT", "/health"), 405)
    assert_error(request(url, "BREW", CHAT), 405)


def test_411_and_413_body_limits(server):
    url = server[0]
    assert_error(request(url, "POST", CHAT, raw=json.dumps({**OK_CHAT, "pad": "x" * 5000}).encode()), 413,
                 "request_too_large")
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port)) as s:  # no Content-Length at all
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).split(b" ")[1] == b"411"
    with socket.create_connection((u.hostname, u.port)) as s:  # a chunked body over the limit
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"2000\r\n" + b"x" * 8192 + b"\r\n0\r\n\r\n")
        assert s.recv(4096).split(b" ")[1] == b"413"


def test_chunked_request_body_is_read(server):
    u = urlparse(server[0])
    body = json.dumps(OK_CHAT).encode()
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert s.recv(65536).split(b" ")[1] == b"200"


def test_keep_alive_survives_errors(server):
    u = urlparse(server[0])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    for body, status in [(b"{", 400), (json.dumps(OK_CHAT).encode(), 200), (json.dumps({"messages": []}).encode(), 400),
                         (json.dumps(OK_CHAT).encode(), 200)]:
        conn.request("POST", CHAT, body=body)
        resp = conn.getresponse()
        assert resp.status == status and json.loads(resp.read())
    conn.close()


def test_401_api_key():
    with live_server(tiny_engine(), api_key="s3cret") as (url, _):
        assert_error(request(url, "POST", CHAT, OK_CHAT), 401, "invalid_api_key")
        status, headers, _ = request(url, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert_error(request(url, "GET", "/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        assert request(url, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert request(url, "GET", "/health")[0] == 200  # health checks need no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", **OK_CHAT).choices[0].message.role == "assistant"


def test_429_queue_full_and_503_loading():
    load_gate = threading.Event()
    holder = {}

    def load():
        load_gate.wait(30)
        holder["model"] = GatedModel(build_tiny("llama")[0])
        return holder["model"], FakeTokenizer()

    engine = BatchEngine(load, max_batch=1, max_queue=1, context_length=64).start()
    with live_server(engine, wait=False) as (url, _):
        err = assert_error(request(url, "POST", CHAT, OK_CHAT), 503, "model_not_ready")
        assert "loading" in err["message"]
        status, headers, body = request(url, "GET", "/health")
        assert status == 503 and headers["Retry-After"] == "1"
        assert request(url, "GET", "/openapi.json")[0] == 200  # the document is there while loading
        load_gate.set()
        assert engine.loaded.wait(30)
        gated = holder["model"]
        results = []
        first = threading.Thread(target=lambda: results.append(request(url, "POST", CHAT, OK_CHAT)))
        first.start()
        assert gated.entered.wait(10)  # the worker is busy with the first request
        second = threading.Thread(target=lambda: results.append(request(url, "POST", CHAT, OK_CHAT)))
        second.start()
        while engine.queued_count < 1:
            pass
        assert_error(request(url, "POST", CHAT, OK_CHAT), 429, "queue_full")
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                model="tiny", **OK_CHAT)
        gated.gate.set()
        first.join(30)
        second.join(30)
        assert [r[0] for r in results] == [200, 200]


def test_503_when_the_model_failed_to_load():
    def load():
        raise FileNotFoundError("weights.gguf")

    engine = BatchEngine(load).start()
    with live_server(engine) as (url, _):
        err = assert_error(request(url, "POST", CHAT, OK_CHAT), 503)
        assert "failed to load" in err["message"]


class Exploding:
    def __init__(self, model):
        self.layers, self.args = model.layers, model.args

    def __call__(self, *a, **k):
        raise RuntimeError("kaboom")


def test_500_generation_failure_is_json():
    engine = BatchEngine(lambda: (Exploding(build_tiny("llama")[0]), FakeTokenizer()), context_length=64).start()
    with live_server(engine) as (url, _):
        err = assert_error(request(url, "POST", CHAT, OK_CHAT), 500, "generation_failed")
        assert "kaboom" in err["message"]
        status, _, _ = request(url, "POST", CHAT, {**OK_CHAT, "stream": True})
        assert status == 200  # the stream had started: the error arrives as an event
        assert request(url, "GET", "/health")[0] == 200  # the worker survived


def test_500_unexpected_handler_error_is_json(monkeypatch, server):
    import applelm.server as srv

    def broken(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(srv, "parse_chat", broken)
    err = assert_error(request(server[0], "POST", CHAT, OK_CHAT), 500, "internal_error")
    assert "surprise" not in err["message"]


def test_stream_error_event(server):
    u = urlparse(server[0])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", CHAT, body=json.dumps({**OK_CHAT, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    lines = [ln for ln in resp.read().decode().split("\n") if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    conn.close()
