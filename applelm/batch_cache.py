"""A KV cache for a changing batch of sequences: the continuous-batching server's cache.

Rows are right-aligned: every row's newest token sits in the same column, and row b's first
`left_padding[b]` columns are padding that no query attends to. Unlike `cache.KVCache` (whose RoPE
position is the column), each row's RoPE position counts from its own first real token: `offset` is a
per-row array, which `mx.fast.rope` takes. That is what lets rows be merged in with extra padding, or
have padding dropped, without re-rotating the keys already stored: attention only sees positions
relative to a row's own tokens, and those never move.

Operations the server needs: `merge_caches` (append the rows of a freshly prefilled batch), and
`filter_caches` (keep some rows, dropping padding columns no row needs any more).
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from .cache import _window_mask, write_growing


class BatchKVCache:
    """A growing cache for B left-padded rows; the attention protocol of `cache.KVCache`."""

    step = 256

    def __init__(self, left_padding: Sequence[int]):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.left_padding = mx.array(list(left_padding), dtype=mx.int32)
        self._idx = 0  # columns in use
        self.offset = -self.left_padding  # per row: RoPE position of the next token (negative on padding)

    @property
    def batch_size(self) -> int:
        return self.left_padding.shape[0]

    @property
    def columns(self) -> int:
        """Columns in use (the longest row plus its padding)."""
        return self._idx

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev, n = self._idx, keys.shape[2]
        self.keys, self.values = write_growing(self.keys, self.values, prev, keys, values, self.step)
        self._idx += n
        self.offset = self.offset + n
        return self.keys[..., : self._idx, :], self.values[..., : self._idx, :]

    def make_mask(self, n_queries: int, window: Optional[int] = None) -> mx.array:
        """Boolean mask (B, 1, n_queries, T) for the next update: causal, windowed, never on padding.
        Column distances equal position distances within a row, so the window applies to columns."""
        end = self._idx + n_queries
        return _window_mask(mx.arange(self._idx, end), mx.arange(end), window, self.left_padding)

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.keys[..., : self._idx, :], self.values[..., : self._idx, :]

    def is_trimmable(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @classmethod
    def _from(cls, keys: mx.array, values: mx.array, left_padding: mx.array) -> "BatchKVCache":
        cache = cls([])
        cache.keys, cache.values = keys, values
        cache.left_padding = left_padding
        cache._idx = keys.shape[2]
        cache.offset = cache._idx - left_padding
        return cache

    def _right_aligned(self, columns: int) -> tuple[mx.array, mx.array, mx.array]:
        """Keys, values and left padding widened on the left to `columns` columns."""
        k, v = self.state
        return _pad_left(k, columns), _pad_left(v, columns), self.left_padding + (columns - self._idx)


def _pad_left(a: mx.array, columns: int) -> mx.array:
    """Keys or values (B, heads, T, D) widened on the left with zero columns to `columns`."""
    extra = columns - a.shape[2]
    if not extra:
        return a
    return mx.concatenate([mx.zeros((a.shape[0], a.shape[1], extra, a.shape[3]), a.dtype), a], axis=2)


def make_batch_cache(model, left_padding: Sequence[int]) -> list[BatchKVCache]:
    """One BatchKVCache per layer. Sliding-window layers (Gemma 3) keep every position too: their
    window is applied by the mask the model asks for, so one layout serves every architecture."""
    return [BatchKVCache(left_padding) for _ in model.layers]


def make_prefixed_batch_cache(model, prefixes: Sequence[Optional[list]],
                              left_padding: Sequence[int]) -> list[BatchKVCache]:
    """Like `make_batch_cache`, with rows that start from stored keys and values (the prompt cache):
    prefixes[b] is None or, per layer, (keys, values) of shape (1, kv_heads, n_b, head_dim). They sit
    right-aligned in max(n_b) columns; left_padding[b] counts the columns before row b's first real
    token, beyond those columns when the row's first tokens are still to be prefilled."""
    columns = max((p[0][0].shape[2] for p in prefixes if p), default=0)
    if not columns:
        return make_batch_cache(model, left_padding)
    padding = mx.array(list(left_padding), dtype=mx.int32)
    out = []
    for layer in range(len(model.layers)):
        like = next(p[layer] for p in prefixes if p)  # a row without a prefix: all zeros of this shape
        keys, values = ([_pad_left(p[layer][i] if p else like[i][:, :, :0], columns) for p in prefixes]
                        for i in (0, 1))
        out.append(BatchKVCache._from(mx.concatenate(keys), mx.concatenate(values), padding))
    return out


def merge_caches(a: Optional[list[BatchKVCache]], b: list[BatchKVCache]) -> list[BatchKVCache]:
    """The rows of `a` followed by the rows of `b` (per layer), right-aligned; `a` may be None."""
    if a is None:
        return b
    merged = []
    for ca, cb in zip(a, b):
        columns = max(ca.columns, cb.columns)
        ka, va, pa = ca._right_aligned(columns)
        kb, vb, pb = cb._right_aligned(columns)
        merged.append(BatchKVCache._from(mx.concatenate([ka, kb]), mx.concatenate([va, vb]),
                                         mx.concatenate([pa, pb])))
    return merged


def filter_caches(caches: list[BatchKVCache], keep: Sequence[int]) -> Optional[list[BatchKVCache]]:
    """Only the rows `keep` (indices, in order); None when no row is kept. Leading columns that are
    padding in every kept row are dropped, so a long finished request does not keep the batch wide."""
    if not keep:
        return None
    rows = mx.array(list(keep), dtype=mx.int32)
    padding = caches[0].left_padding[rows]
    drop = int(mx.min(padding).item())
    out = []
    for c in caches:
        k, v = c.state
        out.append(BatchKVCache._from(k[rows, :, drop:, :], v[rows, :, drop:, :], padding - drop))
    return out
