"""Samplers and logits processors: plain callables.

A sampler maps log-probabilities (B, vocab) to token ids (B,). A logits processor maps
(tokens so far (B, T), logits (B, vocab)) to new logits.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., -k][..., None]
    return mx.where(logprobs >= kth, logprobs, -math.inf)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.exp(sorted_lp)
    before = mx.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    kept_sorted = mx.where(before < p, sorted_lp, -math.inf)
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(kept_sorted, inverse, axis=-1)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens at least min_p times as likely as the most likely one."""
    if min_p <= 0.0:
        return logprobs
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logprobs, -math.inf)


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Sampler:
    """Greedy at temp 0; otherwise filter (top-k, then top-p, then min-p) and sample at `temp`."""
    if temp < 0 or not 0 < top_p <= 1 or top_k < 0 or not 0 <= min_p < 1:
        raise ValueError("need temp >= 0, 0 < top_p <= 1, top_k >= 0, 0 <= min_p < 1")
    if temp == 0:
        return greedy

    def sample(logprobs: mx.array) -> mx.array:
        lp = apply_min_p(apply_top_p(apply_top_k(logprobs, top_k), top_p), min_p)
        return mx.random.categorical(lp * (1.0 / temp), axis=-1)

    return sample


def make_repetition_penalty(penalty: float, context_size: int = 64) -> LogitsProcessor:
    """Divide positive logits (multiply negative ones) of tokens seen in the last `context_size` tokens."""
    if penalty <= 0:
        raise ValueError("repetition penalty must be positive")

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.shape[-1] == 0:
            return logits
        recent = tokens[..., -context_size:]
        picked = mx.take_along_axis(logits, recent, axis=-1)
        picked = mx.where(picked > 0, picked / penalty, picked * penalty)
        rows = mx.arange(logits.shape[0])[:, None]
        logits[rows, recent] = picked
        return logits

    return process


def make_logits_processors(repetition_penalty: Optional[float] = None,
                           repetition_context_size: int = 64) -> list[LogitsProcessor]:
    processors = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    return processors
