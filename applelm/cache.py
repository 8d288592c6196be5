"""KV caches. Attention code sees one protocol: `update_and_fetch(k, v)`, `offset`, `trim(n)`, `state`,
and `make_mask(n_queries, window)`, which builds the mask for the keys the next update will return.

Keys and values are (batch, kv_heads, time, head_dim). A batch whose prompts differ in length is
left-padded; `left_padding[b]` says how many leading positions of row b are padding and never attended.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


def _window_mask(q_pos: mx.array, k_pos: mx.array, window: Optional[int], left_padding: Optional[mx.array]):
    """Boolean mask (B or 1, 1, L, T): causal, within `window` keys, and not on left padding."""
    allowed = q_pos[:, None] >= k_pos[None, :]
    if window is not None:
        allowed = allowed & (q_pos[:, None] < k_pos[None, :] + window)
    if left_padding is not None:
        valid = k_pos[None, :] >= left_padding[:, None]  # (B, T)
        return (allowed[None] & valid[:, None, :])[:, None]
    return allowed[None, None]


def write_growing(k_buf: Optional[mx.array], v_buf: Optional[mx.array], prev: int, keys: mx.array,
                  values: mx.array, step: int) -> tuple[mx.array, mx.array]:
    """Write keys/values at column `prev` of (B, H, columns, D) buffers, growing them in steps of `step`
    columns (so shapes change every `step` tokens, not every token); returns the buffers."""
    n = keys.shape[2]
    if k_buf is None or prev + n > k_buf.shape[2]:
        B, H, _, D = keys.shape
        grow = (n + step - 1) // step * step
        new_k = mx.zeros((B, H, grow, D), keys.dtype)
        new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
        if k_buf is not None:
            new_k = mx.concatenate([k_buf[..., :prev, :], new_k], axis=2)
            new_v = mx.concatenate([v_buf[..., :prev, :], new_v], axis=2)
        k_buf, v_buf = new_k, new_v
    k_buf[..., prev : prev + n, :] = keys
    v_buf[..., prev : prev + n, :] = values
    return k_buf, v_buf


class KVCache:
    """A cache that grows in steps of `step` tokens and keeps every position."""

    step = 256

    def __init__(self, left_padding: Optional[list[int]] = None):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self.left_padding = mx.array(left_padding) if left_padding is not None else None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev, n = self.offset, keys.shape[2]
        self.keys, self.values = write_growing(self.keys, self.values, prev, keys, values, self.step)
        self.offset += n
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def make_mask(self, n_queries: int, window: Optional[int] = None):
        """Mask for the next update of n_queries tokens: None, "causal", or a boolean array."""
        end = self.offset + n_queries
        if self.left_padding is None and (window is None or end <= window):
            return "causal" if n_queries > 1 else None
        q_pos = mx.arange(self.offset, end)
        return _window_mask(q_pos, mx.arange(end), window, self.left_padding)

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, kv: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = kv
        self.offset = self.keys.shape[2]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last n positions (e.g. rejected draft tokens); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class RotatingKVCache:
    """A cache holding at most `max_size` positions: a sliding window of the most recent tokens.

    Single-token decode writes into a ring buffer once it is full; the order of keys does not matter to
    attention then, since every kept key is in the window. A multi-token update restores time order first.
    """

    step = 256

    def __init__(self, max_size: int):
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0  # tokens seen so far
        self._len = 0  # valid positions held (<= max_size)
        self._write = 0  # next ring slot once full
        self.left_padding = None

    def _valid(self) -> tuple[mx.array, mx.array]:
        """Held keys/values in time order."""
        k, v = self.keys[..., : self._len, :], self.values[..., : self._len, :]
        if self._len < self.max_size or self._write == 0:
            return k, v
        order = lambda a: mx.concatenate([a[..., self._write :, :], a[..., : self._write, :]], axis=2)
        return order(k), order(v)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        self.offset += n
        if n == 1 and self.keys is not None:
            if self._len == self.max_size:
                self.keys[..., self._write : self._write + 1, :] = keys
                self.values[..., self._write : self._write + 1, :] = values
                self._write = (self._write + 1) % self.max_size
                return self.keys, self.values
            if self._len == self.keys.shape[2]:  # grow in steps, never past max_size
                grow = min(self.step, self.max_size - self._len)
                pad = lambda a: mx.zeros((*a.shape[:2], grow, a.shape[3]), a.dtype)
                self.keys = mx.concatenate([self.keys, pad(self.keys)], axis=2)
                self.values = mx.concatenate([self.values, pad(self.values)], axis=2)
            self.keys[..., self._len : self._len + 1, :] = keys
            self.values[..., self._len : self._len + 1, :] = values
            self._len += 1
            return self.keys[..., : self._len, :], self.values[..., : self._len, :]
        if self.keys is None:
            all_k, all_v = keys, values
        else:
            old_k, old_v = self._valid()
            # The first new query still needs the max_size - 1 keys before it.
            keep = min(self._len, self.max_size - 1)
            all_k = mx.concatenate([old_k[..., self._len - keep :, :], keys], axis=2)
            all_v = mx.concatenate([old_v[..., self._len - keep :, :], values], axis=2)
        self.keys, self.values = all_k[..., -self.max_size :, :], all_v[..., -self.max_size :, :]
        self._len, self._write = self.keys.shape[2], 0
        return all_k, all_v

    def make_mask(self, n_queries: int, window: Optional[int] = None):
        window = self.max_size if window is None else min(window, self.max_size)
        if n_queries == 1:
            return None  # every held key is within the window
        keep = min(self._len, self.max_size - 1)
        end = self.offset + n_queries
        if keep == 0 and end <= window:
            return "causal"
        return _window_mask(mx.arange(self.offset, end), mx.arange(self.offset - keep, end), window, None)

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self._valid()

    @state.setter
    def state(self, kv: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = kv
        self._len = self.offset = self.keys.shape[2]
        self._write = 0

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size

    def trim(self, n: int) -> int:
        if not self.is_trimmable():
            return 0
        n = min(self.offset, n)
        self.offset -= n
        self._len -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class StaticKVCache:
    """A cache pre-allocated to `capacity` positions whose shapes never change, so a decode step can be
    compiled once (mx.compile) and replayed: writes go to a position held in an array, attention sees the
    whole buffer and a mask hides positions not yet written. The caller keeps within `capacity`.

    `arrays` is a mutable dict so mx.compile can treat it as state (inputs and outputs of the step); the
    position lives only there, since compiled replays never run this Python code.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.arrays: dict[str, mx.array] = {"offset": mx.array(0, dtype=mx.int32)}
        self.left_padding = None

    @property
    def offset(self) -> mx.array:
        return self.arrays["offset"]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if "keys" not in self.arrays:
            B, H, _, D = keys.shape
            self.arrays["keys"] = mx.zeros((B, H, self.capacity, D), keys.dtype)
            self.arrays["values"] = mx.zeros((B, H, self.capacity, values.shape[3]), values.dtype)
        start = self.arrays["offset"][None]
        self.arrays["keys"] = mx.slice_update(self.arrays["keys"], keys, start, axes=(2,))
        self.arrays["values"] = mx.slice_update(self.arrays["values"], values, start, axes=(2,))
        self.arrays["offset"] = self.arrays["offset"] + keys.shape[2]
        return self.arrays["keys"], self.arrays["values"]

    def make_mask(self, n_queries: int, window: Optional[int] = None) -> mx.array:
        q_pos = self.arrays["offset"] + mx.arange(n_queries)
        return _window_mask(q_pos, mx.arange(self.capacity), window, None)

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        n = int(self.arrays["offset"])  # a sync; only off the hot path
        return self.arrays["keys"][..., :n, :], self.arrays["values"][..., :n, :]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(int(self.arrays["offset"]), n)
        self.arrays["offset"] = self.arrays["offset"] - n
        return n

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for k, a in self.arrays.items() if k != "offset")


def make_prompt_cache(model, max_kv_size: Optional[int] = None, left_padding: Optional[list[int]] = None):
    """One cache per layer: the model's own layout if it has one (e.g. sliding-window layers), else KVCache."""
    if hasattr(model, "make_cache"):
        return model.make_cache(max_kv_size=max_kv_size, left_padding=left_padding)
    if max_kv_size is not None:
        if left_padding is not None:
            raise ValueError("a bounded (rotating) cache cannot hold a left-padded batch")
        return [RotatingKVCache(max_kv_size) for _ in model.layers]
    return [KVCache(left_padding) for _ in model.layers]
