"""`python -m applelm.server`: an OpenAI-compatible HTTP server (TCP or a Unix domain socket).

HTTP threads (the standard library's ThreadingHTTPServer) only parse, validate and serialize; the one
model-owning worker is `batch_engine.BatchEngine`. Safe by default: loopback only, optional Bearer key,
bounded bodies, prompts, max_tokens and queue, and a request can never name a file to load.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import select
import signal
import socket
import socketserver
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from . import __version__
from .batch_engine import BatchEngine, EngineUnavailable, Event, QueueFull, Request
from .cli_common import (ArgumentParser, add_flash_arguments, add_model_arguments, flash_options, non_negative_int,
                         positive_int, run_main)
from .errors import UserError
from .openai_api import (ApiError, GenerationParams, Limits, chat_chunk, chat_response, completion_chunk,
                         completion_response, model_list, model_object, new_id, parse_chat, parse_completion,
                         usage, usage_chunk)
from .openapi import build_openapi

PROG = "applelm.server"
log = logging.getLogger("applelm.server")

ROUTES = {  # path -> allowed methods; "/v1/models/" + id is matched by prefix
    "/v1/models": ("GET",), "/v1/chat/completions": ("POST",), "/v1/completions": ("POST",),
    "/health": ("GET",), "/openapi.json": ("GET",), "/v1/models/": ("GET",),
}
POLL_S = 0.05  # how often a waiting handler checks whether its client hung up


class ClientGone(Exception):
    """The client closed its connection; its generation is cancelled."""


class App:
    """What every handler thread shares: the engine, the served model id, the limits and the key."""

    def __init__(self, engine: BatchEngine, model_id: str, *, api_key: Optional[str] = None,
                 max_tokens_limit: int = 4096, max_body_bytes: int = 1 << 20):
        self.engine, self.model_id = engine, model_id
        self.model_ids = [model_id, "default"]
        self.api_key = api_key.encode() if api_key else None
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.created = int(time.time())
        self._openapi: Optional[bytes] = None

    def vocab_size(self) -> Optional[int]:
        """Token ids a prompt may hold: those both the tokenizer and the model's embedding know."""
        sizes = [getattr(self.engine.tokenizer, "vocab_size", None),
                 getattr(getattr(self.engine.model, "args", None), "vocab_size", None)]
        sizes = [s for s in sizes if isinstance(s, int) and s > 0]
        return min(sizes) if sizes else None

    def limits(self) -> Limits:
        return Limits(self.max_tokens_limit, self.engine.context_length, self.vocab_size() or (1 << 31))

    def openapi(self) -> bytes:
        if self._openapi is None or not self.engine.ready:
            doc = build_openapi(self.model_ids, self.max_tokens_limit, self.vocab_size(), self.api_key is not None)
            self._openapi = json.dumps(doc).encode()
        return self._openapi


class Handler(BaseHTTPRequestHandler):
    """One connection's requests. Every response, errors included, is JSON (or an SSE stream)."""

    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = f"applelm/{__version__}"
    sys_version = ""
    timeout = 120  # seconds a socket read or write may block (idle keep-alive, stalled clients)
    app: App  # set on the subclass the server makes

    # ---- plumbing ----
    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix-socket"

    def send_error(self, code, message=None, explain=None):
        """The base class's own errors (bad request line, unknown method, ...) as JSON too."""
        if code == 501 and getattr(self, "path", None):  # a method no do_* exists for: 405 or 404
            self.close_connection = True
            return self._dispatch()
        self.close_connection = True
        self._send_json(code, ApiError(code, message or self.responses.get(code, ("error",))[0]).body())

    def send_response(self, code, message=None):
        self._started = True
        super().send_response(code, message)

    def _dispatch(self):
        self._started = self._body_read = False
        try:
            self._handle()
        except ClientGone:
            self.close_connection = True
        except ApiError as e:
            if self._body_unread():
                self.close_connection = True  # its bytes would be read as the next request
            if not self._started:
                self._send_json(e.status, e.body(), extra=self._error_headers(e))
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception:
            log.exception("unexpected error handling %s %s", self.command, self.path)
            self.close_connection = True
            if not self._started:
                self._send_json(500, ApiError(500, "internal server error (logged on the server)",
                                              code="internal_error").body())

    def _body_unread(self) -> bool:
        if self._body_read:
            return False
        chunked = (self.headers.get("Transfer-Encoding") or "").strip().lower() == "chunked"
        return chunked or (self.headers.get("Content-Length") or "0").strip() not in ("", "0")

    def _error_headers(self, e: ApiError) -> dict:
        if e.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if e.status == 405:
            return {"Allow": ", ".join(self._allowed or ())}
        if e.status in (429, 503):
            return {"Retry-After": "1"}
        return {}

    def _send_json(self, status: int, obj, extra: Optional[dict] = None) -> None:
        self._send_bytes(status, json.dumps(obj).encode(), extra)

    def _send_bytes(self, status: int, data: bytes, extra: Optional[dict] = None) -> None:
        """A JSON body already serialized (the OpenAPI document is built once)."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True

    # ---- routing and checks ----
    _allowed: Optional[tuple] = None

    def _route_or_raise(self) -> str:
        path = self.path.split("?", 1)[0]
        key = "/v1/models/" if path.startswith("/v1/models/") else path
        allowed = ROUTES.get(key)
        if allowed is None:
            raise ApiError(404, f"no route {path}", code="not_found")
        self._allowed = allowed
        if self.command not in allowed:
            raise ApiError(405, f"method {self.command} is not allowed on {key} (use {', '.join(allowed)})",
                           code="method_not_allowed")
        return path

    def _check_key(self) -> None:
        key = self.app.api_key
        if key is None:
            return
        scheme, _, token = (self.headers.get("Authorization") or "").strip().partition(" ")
        given = token.strip().encode("utf-8", "surrogateescape")
        # compare_digest takes time independent of where the strings differ
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, key):
            raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _check_ready(self) -> None:
        engine = self.app.engine
        if not engine.ready:
            msg = f"the model failed to load: {engine.load_error}" if engine.load_error else "the model is still loading"
            raise ApiError(503, msg, code="model_not_ready")

    def _read_body(self) -> bytes:
        limit = self.app.max_body_bytes
        self._body_read = True  # from here on, an error closes the connection itself where needed
        if self.headers.get("Transfer-Encoding", "identity").strip().lower() == "chunked":
            return self._read_chunked(limit)
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        if not length.strip().isdigit():
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {length!r}", code="invalid_header")
        n = int(length)
        if n > limit:
            self.close_connection = True  # the body stays unread: this connection cannot be reused
            raise ApiError(413, f"the request body is {n} bytes; the limit is {limit}", code="request_too_large")
        data = self.rfile.read(n)
        if len(data) < n:
            raise ClientGone()
        return data

    def _read_chunked(self, limit: int) -> bytes:
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "malformed chunked request body", code="invalid_body") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                self.close_connection = True
                raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
            parts.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _read_json(self):
        data = self._read_body()
        try:
            return json.loads(data, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    # ---- endpoints ----
    def _handle(self) -> None:
        """Answer one request (raises ApiError for an error response)."""
        path = self._route_or_raise()
        if path == "/health":
            return self._health()
        if path == "/openapi.json":
            return self._send_bytes(200, self.app.openapi())
        self._check_key()
        self._check_ready()
        app = self.app
        if path == "/v1/models":
            self._send_json(200, model_list(app.model_id, app.created))
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name not in app.model_ids:
                raise ApiError(404, f"the model '{name}' does not exist", code="model_not_found", param="model")
            self._send_json(200, model_object(app.model_id, app.created))
        else:
            chat = path == "/v1/chat/completions"
            body = self._read_json()
            parse = parse_chat if chat else parse_completion
            params = parse(body, app.model_ids, app.engine.tokenizer, app.limits())
            self._generate(params, chat)

    def _health(self) -> None:
        engine = self.app.engine
        self._check_ready()
        body = {"status": "ok", "model": self.app.model_id, "active": engine.active_count,
                "queued": engine.queued_count}
        if engine.prompt_cache is not None:
            body["prompt_cache"] = engine.prompt_cache.stats()
        self._send_json(200, body)

    def _generate(self, params: GenerationParams, chat: bool) -> None:
        req = Request(params.prompt, params.max_tokens, params.sampling, params.stop, params.ignore_eos)
        try:
            self.app.engine.submit(req)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        except EngineUnavailable as e:
            raise ApiError(503, str(e), code="model_not_ready") from None
        try:
            if params.stream:
                self._stream(req, params, chat)
            else:
                self._complete(req, params, chat)
        finally:
            req.cancel()  # no-op once finished; frees the slot if we leave early (client gone, error)

    def _events(self, req: Request):
        """The request's events as they come, in batches; raises ClientGone if the client hangs up."""
        checked = time.monotonic()
        while True:
            try:
                first = req.events.get(timeout=POLL_S)
            except queue.Empty:
                first = None
            if first is None or time.monotonic() - checked >= POLL_S:  # also while tokens keep coming
                checked = time.monotonic()
                if self._client_gone():
                    raise ClientGone()
                if first is None:
                    continue
            batch = [first]
            while batch[-1].finish_reason is None:
                try:
                    batch.append(req.events.get_nowait())
                except queue.Empty:
                    break
            yield batch
            if batch[-1].finish_reason is not None:
                return

    def _client_gone(self) -> bool:
        """Whether the peer closed the connection (readable with nothing to read); pipelined bytes don't count."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _complete(self, req: Request, params: GenerationParams, chat: bool) -> None:
        parts: list[str] = []
        last: Event = Event()
        for batch in self._events(req):
            parts += [ev.text for ev in batch]
            last = batch[-1]
        if last.finish_reason == "error":
            raise ApiError(500, last.error or "generation failed", code="generation_failed")
        text, use = "".join(parts), usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        shape = chat_response if chat else completion_response
        self._send_json(200, shape(rid, created, params.model, text, last.finish_reason, use))

    def _stream(self, req: Request, params: GenerationParams, chat: bool) -> None:
        rid, created, model = new_id("chatcmpl" if chat else "cmpl"), int(time.time()), params.model
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(text: str, finish: Optional[str] = None) -> dict:
            if chat:
                return chat_chunk(rid, created, model, {"content": text} if finish is None else {}, finish)
            return completion_chunk(rid, created, model, text, finish)

        if chat:
            self._write_events([chat_chunk(rid, created, model, {"role": "assistant", "content": ""})])
        for batch in self._events(req):
            out = [chunk(ev.text) for ev in batch if ev.text]
            last = batch[-1]
            if last.finish_reason == "error":
                out.append(ApiError(500, last.error or "generation failed", code="generation_failed").body())
            elif last.finish_reason is not None:
                out.append(chunk("", last.finish_reason))
                if params.include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    use = usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
                    out.append(usage_chunk(obj, rid, created, model, use))
            self._write_events(out, done=last.finish_reason is not None)

    def _write_events(self, objs: list, done: bool = False) -> None:
        """Write SSE events as one HTTP chunk (and end the stream when done)."""
        data = b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs)
        if done:
            data += b"data: [DONE]\n\n"
        out = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if done:
            out += b"0\r\n\r\n"
        try:
            if out:
                self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            raise ClientGone() from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# ---- servers ----

class _Quiet:
    """A client that vanishes between requests is normal; anything else is logged, not printed."""

    daemon_threads = True
    request_queue_size = 128  # many clients may connect at once

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.exception("error on a connection")


class TCPServer(_Quiet, ThreadingHTTPServer):
    pass


class UnixServer(_Quiet, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """HTTP over a Unix domain socket, readable and writable by this user only."""

    _bound = False  # only a socket file this server made is removed on close

    def server_bind(self) -> None:
        path = self.server_address
        _clear_stale_socket(path)
        old = os.umask(0o177)  # no window in which the socket is open to others
        try:
            super().server_bind()
        finally:
            os.umask(old)
        self._bound = True
        os.chmod(path, 0o600)

    def server_close(self) -> None:
        super().server_close()
        if self._bound:
            self._bound = False
            try:
                os.unlink(self.server_address)
            except OSError:
                pass


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UserError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise UserError(f"another server is already listening on {path}")


def make_server(app: App, host: str = "127.0.0.1", port: int = 8080, uds: Optional[str] = None):
    """A server bound to host:port, or to the Unix socket `uds`; not yet serving."""
    handler = type("AppHandler", (Handler,), {"app": app})
    if uds:
        try:
            return UnixServer(uds, handler)
        except OSError as e:
            raise UserError(f"cannot listen on {uds}: {e.strerror or e}") from None
    server_cls = TCPServer
    if ":" in host:
        server_cls = type("TCP6Server", (TCPServer,), {"address_family": socket.AF_INET6})
    handler.disable_nagle_algorithm = True  # stream each token without delay
    try:
        return server_cls((host, port), handler)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def server_url(server) -> str:
    if isinstance(server, UnixServer):
        return f"unix:{server.server_address}"
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# ---- command line ----

def model_id_for(model: Optional[str]) -> str:
    """The id clients use for the served model: the file stem, folder name or repo id (never a path)."""
    from .hub import looks_like_repo_id
    from .loader import default_model_path

    if model is None:
        return default_model_path().stem
    path = Path(model).expanduser()
    if path.is_file():
        return path.stem
    if path.is_dir():
        return path.resolve().name
    if looks_like_repo_id(model):
        return model
    raise UserError(f"model path '{model}' does not exist")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Serve a local model over an OpenAI-compatible HTTP API "
                                              "(continuous batching). Default model: SmolLM2-135M-Instruct.")
    add_model_arguments(p, "hold quantized weights as dense floats: more memory, and on CPU batches scale better")
    p.add_argument("--model-id", default=None, help="the id clients use (default: the file stem or folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (0: pick a free one)")
    p.add_argument("--uds", default=None, help="serve on this Unix domain socket instead of TCP (mode 600)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $APPLELM_API_KEY if set)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting to join (429 beyond)")
    p.add_argument("--max-tokens-limit", type=positive_int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="largest request body (413 beyond)")
    p.add_argument("--context-length", type=positive_int, default=None,
                   help="prompt + completion tokens (default: the model's max_position_embeddings)")
    p.add_argument("--prompt-cache-mb", type=non_negative_int, default=256,
                   help="MB of earlier prompts' keys and values kept so that prompts beginning alike (chat "
                        "template, system prompt, earlier turns) skip that part of the prefill; 0: off")
    add_flash_arguments(p)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="info logs every request")
    return p


def _main(argv: Optional[list[str]]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=f"{PROG}: %(levelname)s: %(message)s")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("APPLELM_API_KEY") or None
    model_id = args.model_id or model_id_for(args.model)

    from .loader import load

    global _engine
    engine = _engine = BatchEngine(lambda: load(args.model, dtype=args.dtype, dequantize=args.dequantize,
                                                     **flash_options(args)),
                                   max_batch=args.max_batch, max_queue=args.max_queue,
                                   context_length=args.context_length, prefill_step_size=args.prefill_step_size,
                                   prompt_cache_bytes=args.prompt_cache_mb << 20)
    app = App(engine, model_id, api_key=api_key, max_tokens_limit=args.max_tokens_limit,
              max_body_bytes=args.max_body_bytes)
    server = make_server(app, args.host, args.port, args.uds)
    url = server_url(server)
    if not args.uds and args.host not in ("127.0.0.1", "::1", "localhost") and api_key is None:
        print(f"{PROG}: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    print(f"{PROG}: listening on {url}; loading {model_id} ...", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve_forever, name="applelm-http", daemon=True)
    serving.start()
    engine.start()
    try:
        while not engine.loaded.wait(0.1):
            if stop.is_set():
                return 0
        if engine.load_error:
            raise UserError(f"could not load the model: {engine.load_error}")
        print(f"{PROG}: ready: serving {model_id} on {url}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        print(f"{PROG}: shutting down", file=sys.stderr, flush=True)
        return 0
    finally:
        server.shutdown()
        server.server_close()
        engine.stop(timeout=5)


_engine: Optional[BatchEngine] = None  # the CLI's engine, for the exit below


def main(argv: Optional[list[str]] = None) -> int:
    code = run_main(PROG, lambda: _main(argv))
    if _engine is not None and _engine.busy:
        # The worker is still inside MLX (e.g. a slow model load was interrupted): exiting through the
        # interpreter's shutdown could abort when that thread next wants the GIL, so leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
