"""Shared pieces of the server tests: a tiny character tokenizer, a tiny model, and a live server.

The fake tokenizer has the API of `applelm.tokenizer.Tokenizer` that the server uses, over the tiny
models' 97-token vocabulary: id 1 is BOS, id 2 is EOS, ids 3..96 are the characters ' '..'}'.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

from applelm.batch_engine import BatchEngine
from conftest import build_tiny

BOS, EOS, FIRST = 1, 2, 3


class CharDetokenizer:
    def __init__(self, tok):
        self.tok = tok

    def add_token(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    def finalize(self) -> str:
        return ""


class FakeTokenizer:
    """Characters ' '..'}' are ids 3..96; other characters become '?'."""

    vocab_size = 97
    bos_token = "<s>"
    eos_token_ids = {EOS}

    def __init__(self, chat_template: str | None = "simple"):
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS] if add_special_tokens else []
        if text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
            ids = [BOS]
        for ch in text:
            code = ord(ch)
            ids.append(code - 32 + FIRST if 32 <= code < 32 + 94 else ord("?") - 32 + FIRST)
        return ids

    def decode(self, ids) -> str:
        return "".join(chr(i - FIRST + 32) for i in ids if i >= FIRST)

    def detokenizer(self):
        return CharDetokenizer(self)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("no chat template")
        text = "<s>" + "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")


def tiny_engine(arch: str = "llama", chat_template: str | None = "simple", **kwargs) -> BatchEngine:
    """A started engine over a tiny random model of `arch` with the fake tokenizer."""
    kwargs.setdefault("context_length", 256)
    # Built in the worker thread, as the server's loader does: MLX streams are per thread, and a lazy
    # array made on another thread (e.g. RoPE frequencies) could not be evaluated there.
    return BatchEngine(lambda: (build_tiny(arch)[0], FakeTokenizer(chat_template)), **kwargs).start()


def collect(req, timeout: float = 30.0):
    """(text, final event) of a finished engine Request."""
    parts = []
    deadline = time.monotonic() + timeout
    while True:
        ev = req.events.get(timeout=max(0.01, deadline - time.monotonic()))
        parts.append(ev.text)
        if ev.finish_reason is not None:
            return "".join(parts), ev


@contextmanager
def running(engine: BatchEngine):
    try:
        assert engine.loaded.wait(30)
        yield engine
    finally:
        engine.stop()


class GatedModel:
    """Wraps a model so each forward pass waits for `gate` (tests hold the worker busy with it)."""

    def __init__(self, model):
        self.model = model
        self.layers = model.layers
        self.args = getattr(model, "args", None)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        self.gate.wait(30)
        return self.model(*args, **kwargs)


@contextmanager
def live_server(engine: BatchEngine, wait: bool = True, **app_kwargs):
    """Serve `engine` over HTTP on a free loopback port in this process; yields (base url, app)."""
    from applelm.server import App, make_server, server_url

    if wait:
        assert engine.loaded.wait(30)
    app_kwargs.setdefault("max_tokens_limit", 256)
    app = App(engine, app_kwargs.pop("model_id", "tiny"), **app_kwargs)
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_url(server), app
    finally:
        server.shutdown()
        server.server_close()
        engine.stop()


class SlowModel:
    """Wraps a model so every forward pass takes at least `delay` seconds (long-running generations)."""

    def __init__(self, model, delay: float = 0.005):
        self.model, self.delay = model, delay
        self.layers = model.layers
        self.args = getattr(model, "args", None)

    def __call__(self, *args, **kwargs):
        import time
        time.sleep(self.delay)
        return self.model(*args, **kwargs)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path, **config_overrides) -> Path:
    """A 2-layer random Llama GGUF with a byte-level BPE vocab and a ChatML template (loads in ~1 s)."""

    from gguf_fixtures import write_tiny_llama_gguf

    path = Path(path)
    write_tiny_llama_gguf(path, chat_template=CHATML, **config_overrides)
    return path


class ServerProcess:
    """`python -m applelm.server ARGS` in a subprocess, waited on until it says it is ready."""

    def __init__(self, args: list[str], timeout: float = 120, env: dict | None = None):
        import os
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-m", "applelm.server", *args], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.url = None
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if ": ready: serving " in line:
                self.url = line.rsplit(" on ", 1)[1].strip()
                break
        if self.url is None:
            self.stop()
            raise AssertionError("server did not start:\n" + "\n".join(self.lines))
        # keep draining stderr so the server never blocks on a full pipe
        threading.Thread(target=lambda: [self.lines.append(x.rstrip("\n")) for x in self.proc.stderr],
                         daemon=True).start()

    def stop(self, sig=None) -> int:
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except Exception:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
