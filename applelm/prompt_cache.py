"""Prompt prefix reuse for the server: the keys and values of earlier prompts, looked up by shared prefix.

Requests to one server mostly begin alike: the chat template, a system prompt, the earlier turns of a
conversation. The engine asks for the longest prefix a new prompt shares with a stored one, starts the
row's cache from that prefix's keys and values, and prefills only the rest. Position j's keys and values
depend only on tokens 0..j (causal attention), so any prefix of a stored prompt serves any prompt that
begins with it. Entries are whole prompts of admitted requests, dropped least recently used beyond a
byte budget; the model's weights and the running batch's cache are not counted in it.
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

LayerKV = tuple[mx.array, mx.array]  # keys, values: (1, kv_heads, tokens, head_dim)


class _Entry:
    def __init__(self, tokens: np.ndarray, layers: list[LayerKV]):
        self.tokens = tokens
        self.layers = layers
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in layers)


def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PromptCache:
    """Keys and values of whole prompts, at most `max_bytes` of them, least recently used dropped first.

    `match` finds the stored prompt sharing the longest prefix with a new one; `layers(entry, n)` gives
    its first n positions; `add` stores a prompt that no entry covers yet (entries it extends go)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"prompt cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: "collections.OrderedDict[bytes, _Entry]" = collections.OrderedDict()
        self.nbytes = 0
        self.hits = self.lookups = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt: Sequence[int]) -> tuple[int, Optional[_Entry]]:
        """(n, entry): the stored prompt sharing the longest prefix with `prompt`, and that prefix's length
        (0, None when nothing is shared). The entry becomes the most recently used."""
        tokens = np.asarray(prompt, dtype=np.int32)
        best, best_key = 0, None
        for key, entry in self._entries.items():
            n = shared_prefix(entry.tokens, tokens)
            if n > best:
                best, best_key = n, key
        self.lookups += 1
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        return best, self._entries[best_key]

    def layers(self, entry: _Entry, n: int) -> list[LayerKV]:
        """The first n positions of an entry's keys and values, per layer (counted as reused tokens)."""
        self.reused_tokens += n
        return [(k[:, :, :n], v[:, :, :n]) for k, v in entry.layers]

    def add(self, prompt: Sequence[int], layers: list[LayerKV]) -> bool:
        """Store a prompt's keys and values (per layer, (1, kv_heads, len(prompt), head_dim)), copied out of
        whatever buffer they are views of. Skipped (False) when a stored prompt already begins with this one,
        or when it alone exceeds the budget. Stored prompts that this one extends are dropped."""
        tokens = np.asarray(prompt, dtype=np.int32)
        if not len(tokens) or any(k.shape[2] != len(tokens) for k, _ in layers):
            raise ValueError("prompt cache entry: every layer needs one key and value per prompt token")
        covered = []
        for key, entry in self._entries.items():
            n = shared_prefix(entry.tokens, tokens)
            if n == len(tokens):
                self._entries.move_to_end(key)
                return False
            if n == len(entry.tokens):
                covered.append(key)
        # A copy: a slice would keep the whole batch cache it was cut from alive.
        owned = [(mx.array(k), mx.array(v)) for k, v in layers]
        entry = _Entry(tokens, owned)
        if entry.nbytes > self.max_bytes:
            return False
        mx.eval([a for kv in owned for a in kv])
        for key in covered:
            self.nbytes -= self._entries.pop(key).nbytes
        self._entries[tokens.tobytes()] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes
        return True

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                "lookups": self.lookups, "hits": self.hits, "reused_tokens": self.reused_tokens}
