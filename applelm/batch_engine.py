"""The server's worker: one thread that owns the model and runs continuous batching.

HTTP threads `submit` a `Request` (prompt token ids + settings) and read `Event`s from its queue. The
worker loops: admit waiting requests (prefill them together, left-padded, each from the longest prefix
the prompt cache holds, then merge their caches into the running batch), run one decode step for every
active row as a single batched forward pass, hand each row's new text to its queue, and drop rows that
finished or were cancelled. Nothing else touches the model, so MLX is only ever driven from this thread.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import random
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from .batch_cache import filter_caches, make_prefixed_batch_cache, merge_caches
from .batch_sample import SamplingParams, sample_row
from .errors import UserError
from .generation import TextStream, prefill
from .prompt_cache import PromptCache

log = logging.getLogger("applelm.server")

DEFAULT_CONTEXT = 4096  # for models whose config does not say


def _wait_native_exit(thread: threading.Thread, timeout: float = 2.0) -> None:
    """Wait until the OS thread behind a joined thread is gone. MLX keeps a thread-local compile cache
    whose destructor (run after Python's join returns) takes the GIL; if the interpreter is finalizing
    by then, the process aborts ("terminate called without an active exception")."""
    if thread.is_alive() or thread.native_id is None:
        return
    task = f"/proc/self/task/{thread.native_id}"
    if not os.path.isdir("/proc/self/task"):
        time.sleep(0.05)  # no /proc (macOS): a short grace period
        return
    deadline = time.monotonic() + timeout
    while os.path.exists(task) and time.monotonic() < deadline:
        time.sleep(0.001)


class QueueFull(Exception):
    """The wait queue is at its limit (HTTP 429)."""


class EngineUnavailable(Exception):
    """The model is not loaded (yet), failed to load, or the engine is shutting down (HTTP 503)."""


@dataclass
class Event:
    """What a request's queue receives: new text, and at the end a finish reason and token counts.
    finish_reason is None while running, then "stop", "length", "cancelled" or "error" (see `error`).
    cached_tokens: prompt tokens whose keys and values came from the prompt cache instead of a prefill."""

    text: str = ""
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    cached_tokens: int = 0


class Request:
    """One generation job. `events` is filled by the worker; `cancel()` frees its batch slot."""

    def __init__(self, prompt: Sequence[int], max_tokens: int, sampling: Optional[SamplingParams] = None,
                 stop: Sequence[str] = (), ignore_eos: bool = False):
        self.prompt = list(prompt)
        self.max_tokens = max_tokens
        self.sampling = sampling or SamplingParams()
        self.stop = list(stop)
        self.ignore_eos = ignore_eos
        self.events: "queue.Queue[Event]" = queue.Queue()
        self.submitted = time.monotonic()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class _Row:
    """A request inside the running batch: its sampling settings and random generator, text stream and
    counters."""

    def __init__(self, req: Request, tokenizer, limit: int):
        self.req = req
        s = self.sampling = req.sampling
        self.greedy = s.greedy
        # one generator per request: a seeded request draws the same numbers whatever shares the batch
        self.rng = random.Random(s.seed if s.seed is not None else secrets.randbits(64))
        self.text = TextStream(tokenizer.detokenizer(), req.stop)
        self.eos = set() if req.ignore_eos else set(tokenizer.eos_token_ids)
        self.limit = limit  # max_tokens, lowered to what the context window still holds
        self.n = 0
        self.last = 0
        self.cached = 0  # prompt tokens taken from the prompt cache
        self.done = False

    def accept(self, token: int) -> None:
        """Take the row's newly generated token: emit its text, finish on EOS / stop / length."""
        if token in self.eos:
            self.finish("stop", self.text.flush())
            return
        self.n += 1
        self.last = token
        delta = self.text.add(token)
        if self.text.stopped:
            self.finish("stop", self.text.flush())
        elif self.n >= self.limit:
            self.finish("length", delta + self.text.flush())
        elif delta:
            self.req.events.put(Event(delta))

    def finish(self, reason: str, text: str = "", error: Optional[str] = None) -> None:
        if not self.done:
            self.done = True
            self.req.events.put(Event(text, reason, len(self.req.prompt), self.n, error, self.cached))


class BatchEngine:
    """Owns the model in one worker thread; `submit` requests from any thread.

    load: called in the worker thread, returns (model, tokenizer); until it returns, `ready` is False
    (the server answers 503). max_batch: rows decoded together. max_queue: requests waiting to join
    (QueueFull beyond it). prefill_batch_tokens: padded prompt tokens prefilled in one admission round
    (at least one request is always admitted), so a flood of long prompts does not stall decoding.
    prompt_cache_bytes: keys and values of earlier prompts kept for reuse by prompts that begin alike
    (prompt_cache.py); 0 turns prompt reuse off.
    """

    def __init__(self, load: Callable[[], tuple], *, max_batch: int = 16, max_queue: int = 64,
                 prefill_step_size: int = 512, prefill_batch_tokens: int = 4096,
                 context_length: Optional[int] = None, prompt_cache_bytes: int = 256 << 20):
        self._load = load
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_step_size, self.prefill_batch_tokens = prefill_step_size, prefill_batch_tokens
        self.context_length = context_length
        self.prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes else None
        self.model = self.tokenizer = None
        self.load_error: Optional[str] = None
        self.loaded = threading.Event()  # set when loading ended, either way
        self._pending: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.active_count = 0
        self.steps = 0  # batched decode steps run (for tests and stats)
        self.max_active_seen = 0

    # ---- any thread ----
    @property
    def ready(self) -> bool:
        return self.loaded.is_set() and self.load_error is None and not self._stopping

    @property
    def busy(self) -> bool:
        """Whether the worker thread is still running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued_count(self) -> int:
        return len(self._pending)

    def start(self) -> "BatchEngine":
        self._thread = threading.Thread(target=self._run, name="applelm-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, req: Request) -> Request:
        """Queue a request; raises QueueFull or EngineUnavailable."""
        with self._cond:
            if not self.ready:
                raise EngineUnavailable(self.load_error or "the model is still loading")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._pending)} requests are already waiting")
            self._pending.append(req)
            self._cond.notify()
        return req

    def stop(self, timeout: float = 10.0) -> None:
        """Finish: waiting and running requests get an error event; the worker exits."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            _wait_native_exit(self._thread)

    # ---- worker thread ----
    def _run(self) -> None:
        try:
            self.model, self.tokenizer = self._load()
            if self.context_length is None:
                args = getattr(self.model, "args", None)
                self.context_length = getattr(args, "max_position_embeddings", None) or DEFAULT_CONTEXT
        except Exception as e:  # reported by the server (one line, exit status 2)
            self.load_error = str(e) or type(e).__name__
            if not isinstance(e, UserError):
                log.exception("model load failed")
                self.load_error = f"{type(e).__name__}: {self.load_error}"
            self.loaded.set()
            return
        self.loaded.set()
        rows: list[_Row] = []
        cache = None
        while True:
            with self._cond:
                while not rows and not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                new = self._take_pending(len(rows))
            try:
                # Rows leave before the merge: a request done at its first token (or cancelled) then
                # never costs a copy of the whole batch's cache.
                rows, cache = self._drop_done(rows, cache)
                if new:
                    added, new_cache = self._drop_done(*self._admit(new))
                    if added:
                        rows += added
                        cache = merge_caches(cache, new_cache)
                if rows:
                    self._decode(rows, cache)
                    rows, cache = self._drop_done(rows, cache)
            except Exception as e:  # a failed step must not kill the server: fail its requests, go on
                log.exception("batched generation step failed")
                for r in rows:
                    r.finish("error", error=f"generation failed: {type(e).__name__}: {e}")
                rows, cache = [], None
            self.active_count = len(rows)
        for r in rows:
            r.finish("error", error="the server is shutting down")
        with self._cond:
            while self._pending:
                self._pending.popleft().events.put(Event(finish_reason="error", error="the server is shutting down"))

    def _take_pending(self, active: int) -> list[Request]:
        """Requests to admit now (called under the lock): as many as fit the batch and the padded
        prefill budget; cancelled ones are dropped."""
        taken: list[Request] = []
        longest = 0
        while self._pending and active + len(taken) < self.max_batch:
            req = self._pending[0]
            if req.cancelled:
                self._pending.popleft().events.put(Event(finish_reason="cancelled"))
                continue
            width = max(longest, len(req.prompt))
            if taken and width * (len(taken) + 1) > self.prefill_batch_tokens:
                break
            taken.append(self._pending.popleft())
            longest = width
        return taken

    def _admit(self, reqs: list[Request]) -> tuple[list[_Row], Optional[list]]:
        """Prefill new requests together (left-padded), emit their first tokens; returns their rows and
        cache. A request the engine cannot take gets an error event instead."""
        rows = []
        for req in reqs:
            room = self.context_length - len(req.prompt)
            if not req.prompt or room < 1:
                req.events.put(Event(finish_reason="error", prompt_tokens=len(req.prompt),
                                     error=f"the prompt must hold 1 to {self.context_length - 1} tokens"))
                continue
            rows.append(_Row(req, self.tokenizer, min(req.max_tokens, room)))
        if not rows:
            return [], None
        try:
            logits, cache = self._prefill_rows(rows)
            first = self._sample(rows, logits)
        except Exception as e:
            log.exception("prefill failed")
            for r in rows:
                r.finish("error", error=f"prefill failed: {type(e).__name__}: {e}")
            return [], None
        for r, t in zip(rows, first):
            r.accept(t)
        return rows, cache

    def _prefill_rows(self, rows: list[_Row]) -> tuple[mx.array, list]:
        """Prefill new rows together, from the prompt cache where it holds their prompts' beginnings, and
        store their prompts there: (last-position logits (B, vocab), their cache)."""
        tokens, cache = self._prefill_inputs(rows)
        rest = prefill(self.model, tokens, cache, self.prefill_step_size)
        logits = self.model(rest, cache=cache)[:, -1, :]
        self._remember_prompts(rows, cache)
        return logits, cache

    def _prefill_inputs(self, rows: list[_Row]) -> tuple[mx.array, list]:
        """The tokens still to run for new rows and their cache, started from the prompt cache.

        Prompts are right-aligned in W = the longest prompt's columns. Only the last S columns run, S = the
        longest part any row lacks in the prompt cache; a row's earlier positions come from the prompt
        cache (a row may recompute some cached positions: S is shared)."""
        prompts = [r.req.prompt for r in rows]
        reusable = [0] * len(rows)
        entries: list = [None] * len(rows)
        if self.prompt_cache is not None:
            for i, p in enumerate(prompts):
                n, entries[i] = self.prompt_cache.match(p)
                reusable[i] = min(n, len(p) - 1)  # the last prompt token runs: its logits start the row
        width = max(len(p) for p in prompts)
        run = max(len(p) - n for p, n in zip(prompts, reusable))
        tokens, prefixes = [], []
        for i, p in enumerate(prompts):
            start = max(0, len(p) - run)  # positions this row takes from the prompt cache
            rows[i].cached = start
            prefixes.append(self.prompt_cache.layers(entries[i], start) if start else None)
            tokens.append([0] * (run - len(p) + start) + p[start:])
        cache = make_prefixed_batch_cache(self.model, prefixes, [width - len(p) for p in prompts])
        return mx.array(tokens, dtype=mx.int32), cache

    def _remember_prompts(self, rows: list[_Row], cache: list) -> None:
        """Store the new rows' prompts in the prompt cache (their keys and values are the cache's columns
        from each row's first real token on: nothing has been decoded into it yet)."""
        if self.prompt_cache is None:
            return
        pads = cache[0].left_padding.tolist()
        for i, r in enumerate(rows):
            self.prompt_cache.add(r.req.prompt, [(c.state[0][i: i + 1, :, pads[i]:],
                                                  c.state[1][i: i + 1, :, pads[i]:]) for c in cache])

    def _decode(self, rows: list[_Row], cache: list) -> None:
        tokens = mx.array([[r.last] for r in rows], dtype=mx.int32)
        logits = self.model(tokens, cache=cache)[:, -1, :]
        for r, t in zip(rows, self._sample(rows, logits)):
            r.accept(t)
        self.steps += 1
        self.max_active_seen = max(self.max_active_seen, len(rows))

    @staticmethod
    def _sample(rows: list[_Row], logits: mx.array) -> list[int]:
        """One token per row: greedy rows share one argmax (of the logits: the log-softmax would not
        change the order, and its exp over the whole vocabulary is slow on a CPU); the others are drawn
        one by one with their own settings and generators (batch_sample.py)."""
        best = mx.argmax(logits, axis=-1)
        sampled = [i for i, r in enumerate(rows) if not r.greedy]
        if not sampled:
            return best.tolist()
        sub = logits if len(sampled) == len(rows) else logits[mx.array(sampled)]
        sub = sub.astype(mx.float32)
        mx.eval(best, sub)
        ids, table = best.tolist(), np.array(sub, copy=False)
        for j, i in enumerate(sampled):
            ids[i] = sample_row(table[j], rows[i].sampling, rows[i].rng.random())
        return ids

    @staticmethod
    def _drop_done(rows: list[_Row], cache):
        """Cancelled rows finish; finished rows leave the batch (and their cache rows with them)."""
        for r in rows:
            if r.req.cancelled:
                r.finish("cancelled")
        keep = [i for i, r in enumerate(rows) if not r.done]
        if len(keep) == len(rows):
            return rows, cache
        return [rows[i] for i in keep], (filter_caches(cache, keep) if cache is not None else None)
