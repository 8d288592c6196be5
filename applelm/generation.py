"""Stacked generators: `generate_step` (token ids) -> `stream_generate` (text + stats) -> `generate` (string)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Generator, Iterable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from .cache import StaticKVCache, make_prompt_cache
from .ops import cpu_native
from .sample import LogitsProcessor, Sampler, greedy


@dataclass
class GenerationResponse:
    """One step of `stream_generate`: the new text (may be empty) and running statistics."""

    text: str
    token: Optional[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None  # None while running, then "stop" or "length"


def prefill(model: nn.Module, tokens: mx.array, cache: list, step: int = 512,
            progress: Optional[Callable[[int, int], None]] = None) -> mx.array:
    """Run all but the last token of a (B, L) prompt through the model in chunks of `step`, filling
    `cache`; returns the last token (B, 1), whose logits start generation. Only the cache is evaluated, so
    no output-head work is spent on prompt positions."""
    total = tokens.shape[1] - 1
    done = 0
    while done < total:
        n = min(step, total - done)
        model(tokens[:, done : done + n], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        if progress:
            progress(done, total)
    return tokens[:, total:]


def _last_logits(model: nn.Module, cache: list):
    """tokens (B, L) -> logits of the last position (B, vocab), through `cache`."""

    def forward(tokens: mx.array) -> mx.array:
        return model(tokens, cache=cache)[:, -1, :]

    return forward


def _compiled(forward, cache: list):
    """`forward` as one compiled graph: the first call traces it with mx.compile (the static caches' arrays
    as state) and later calls replay it; where tracing fails, `forward` itself is used from then on."""
    state = [c.arrays for c in cache]
    traced = mx.compile(forward, inputs=state, outputs=state)
    chosen = None

    def step(tokens: mx.array) -> mx.array:
        nonlocal chosen
        if chosen is not None:
            return chosen(tokens)
        saved = [dict(c.arrays) for c in cache]
        try:
            out = traced(tokens)
            chosen = traced
        except Exception as e:  # e.g. an op without a compiled form on this backend: run uncompiled
            for c, arrays in zip(cache, saved):
                c.arrays.clear()
                c.arrays.update(arrays)
            warnings.warn(f"compiled decode step unavailable ({type(e).__name__}: {e}); using the plain path")
            chosen = forward
            out = forward(tokens)
        return out

    return step


def compile_by_default(model: Optional[nn.Module] = None) -> bool:
    """Compile decode steps (fewer, fused kernels and no per-token graph building: 38.2 against 31.2 tok/s
    for SmolLM2 on two CPU cores, benchmarks/generate_bench.py) unless weights stream from disk (flash paging
    reads between layers, which a replayed graph cannot), or the CPU kernels run only eagerly (a trace would
    swap them for MLX's much slower ops; ops/cpu_native.graph_ready)."""
    if getattr(model, "flash", None) is not None:
        return False
    if mx.default_device().type == mx.gpu:
        return True
    return cpu_native.graph_ready() or cpu_native.load() is None


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[Sequence[LogitsProcessor]] = None,
    prompt_cache: Optional[list] = None,
    max_kv_size: Optional[int] = None,
    prefill_step_size: int = 512,
    compile: Optional[bool] = None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token id, log-probabilities) for a 1-D prompt, one generated token at a time.

    The next step is built and queued (mx.async_eval) before the current token is handed out, so graph
    construction overlaps with computation (the first compiled step, which traces, after the first token).
    `compile` (default: compile_by_default) runs decode steps as one compiled graph over pre-allocated caches
    of prompt + max_tokens positions; it needs no prompt_cache and no max_kv_size, and falls back to the plain
    path where those are given or compilation fails.
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("prompt must be a non-empty 1-D array of token ids")
    sampler = sampler or greedy
    processors = list(logits_processors or [])
    compiled = ((compile_by_default(model) if compile is None else compile)
                and prompt_cache is None and max_kv_size is None)
    if compiled:
        cache = [StaticKVCache(prompt.size + max_tokens) for _ in model.layers]
    else:
        cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model, max_kv_size)
    plain = _last_logits(model, cache)
    decode = _compiled(plain, cache) if compiled else plain
    history = prompt[None] if processors else None

    def step(tokens: mx.array, forward):
        nonlocal history
        logits = forward(tokens)
        if processors:
            for process in processors:
                logits = process(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        if processors:
            history = mx.concatenate([history, token[:, None].astype(history.dtype)], axis=1)
        return token, logprobs[0]

    def queued(tokens: mx.array, forward):
        out = step(tokens, forward)
        mx.async_eval(*out)
        return out

    rest = prefill(model, prompt[None], cache, prefill_step_size)
    token, logprobs = queued(rest, plain)  # the caches' buffers exist from here on, so the trace sees them
    for n in range(max_tokens):
        more = n + 1 < max_tokens
        # The first compiled step traces the graph (tens of ms): queue it only after the first token is out.
        late = compiled and n == 0
        if more and not late:
            next_token, next_logprobs = queued(token[:, None], decode)
        yield int(token.item()), logprobs
        if more and late:
            next_token, next_logprobs = queued(token[:, None], decode)
        if more:
            token, logprobs = next_token, next_logprobs


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class TextStream:
    """Generated token ids -> text as `stream_generate` shows it: UTF-8 safe (through a streaming
    detokenizer), cut before the first stop string, and holding back any suffix that could still grow
    into one. The server runs one per request."""

    def __init__(self, detokenizer, stops: Iterable[str] = ()):
        self.detokenizer = detokenizer
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False  # a stop string was found; no more text will come

    def add(self, token: int) -> str:
        """Take one generated token; return the text now safe to show (possibly "")."""
        self.pending += self.detokenizer.add_token(token)
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending, self.stopped = self.pending[: min(hits)], True
            return ""
        cut = len(self.pending) - _held_back(self.pending, self.stops)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The text still held: after a stop string, what preceded it; otherwise every held-back byte."""
        if not self.stopped:  # text after a stop string is dropped
            self.pending += self.detokenizer.finalize()
        out, self.pending = self.pending, ""
        return out


def prompt_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids for prompt text; text that already starts with BOS (e.g. from a chat template) gets no second."""
    add_special = tokenizer.bos_token is None or not text.startswith(tokenizer.bos_token)
    return tokenizer.encode(text, add_special_tokens=add_special)


def encode_prompt(tokenizer, prompt: Union[str, Sequence[int], mx.array]) -> mx.array:
    """Token ids for a prompt (see `prompt_token_ids`), as an array."""
    if isinstance(prompt, str):
        prompt = prompt_token_ids(tokenizer, prompt)
    return prompt if isinstance(prompt, mx.array) else mx.array(list(prompt), dtype=mx.int32)


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    *,
    max_tokens: int = 256,
    stop: Iterable[str] = (),
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Yield text as it is produced, never splitting a UTF-8 character, with running statistics.

    Stops at an end-of-sequence token, at any of the `stop` strings (not included in the text), or after
    `max_tokens`. Extra keyword arguments go to `generate_step` (sampler, logits_processors, ...).
    """
    tokens = encode_prompt(tokenizer, prompt)
    texts = TextStream(tokenizer.detokenizer(), stop)
    eos = tokenizer.eos_token_ids
    mx.reset_peak_memory()
    start = time.perf_counter()
    prompt_tps = gen_start = 0.0
    finish, n = None, 0

    def response(text: str, token: Optional[int], reason: Optional[str]) -> GenerationResponse:
        elapsed = time.perf_counter() - gen_start
        return GenerationResponse(text, token, tokens.size, prompt_tps, n,
                                  n / elapsed if n and elapsed > 0 else 0.0, mx.get_peak_memory() / 1e9, reason)

    for token, _ in generate_step(tokens, model, max_tokens=max_tokens, **kwargs):
        if n == 0:
            gen_start = time.perf_counter()
            prompt_tps = tokens.size / (gen_start - start)
        if token in eos:
            finish = "stop"
            break
        n += 1
        out = texts.add(token)
        if texts.stopped:
            finish = "stop"
            break
        yield response(out, token, None)
    yield response(texts.flush(), None, finish or "length")


def generate(model: nn.Module, tokenizer, prompt, *, verbose: bool = False, **kwargs) -> str:
    """The whole completion as one string (printing it as it streams when verbose)."""
    pieces = []
    for r in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(r.text)
        if verbose:
            print(r.text, end="", flush=True)
    if verbose:
        print()
    return "".join(pieces)
