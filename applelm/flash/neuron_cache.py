"""The windowing cache of one FFN layer: a pre-allocated neuron matrix with slot-swap deletion.

Occupied slots are always [0, count): deleting a neuron moves a live neuron from the tail into the freed
slot (the paper's "move the last row into its place"), so the matrix is never reallocated or compacted,
and the compute can use the contiguous prefix `part[:count]` without any gather.

A neuron stays cached while it was active in one of the last `window` tokens; when a token needs more
room than that leaves, the least recently used neurons not needed by this token go first.

The matrix lives in MLX arrays (so the compute uses it without copies) and is written through numpy
views of their memory. That is only safe while no queued MLX computation reads it: the paged module
calls `plan`/`insert` after it has evaluated this layer's selection, which forces every earlier use.
"""

from __future__ import annotations

import numpy as np


class NeuronCache:
    """`capacity` slots of `n_parts` vectors (e.g. up row and down column) of `hidden` values."""

    def __init__(self, n_neurons: int, capacity: int, n_parts: int, hidden: int, dtype, window: int = 4):
        import mlx.core as mx

        if capacity < 1 or window < 1:
            raise ValueError("a neuron cache needs capacity >= 1 and window >= 1")
        self.n_neurons, self.capacity, self.window = n_neurons, min(capacity, n_neurons), window
        self.parts = [mx.zeros((self.capacity, hidden), dtype=dtype) for _ in range(n_parts)]
        mx.eval(self.parts)
        self.rows = None  # no host view: slot writes go through MLX (on the device) instead
        # Writable host views of the MLX buffers where CPU and GPU share memory (the CPU, Apple GPUs).
        # CUDA's managed memory would migrate pages back and forth on every host write.
        if mx.default_device() == mx.cpu or mx.metal.is_available():
            try:
                rows = [np.array(p, copy=False) for p in self.parts]
                if all(r.flags.writeable for r in rows):
                    self.rows = rows
            except (ValueError, TypeError, RuntimeError):
                pass
        self.neuron_at = np.full(self.capacity, -1, np.int64)
        self.slot_of = np.full(n_neurons, -1, np.int64)
        self.last_used = np.zeros(self.capacity, np.int64)
        self.count = 0
        self.step = 0
        self.inserted = 0  # neurons loaded into the cache so far (for statistics)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def cached(self) -> np.ndarray:
        """Neuron ids in slot order (slots [0, count))."""
        return self.neuron_at[: self.count]

    def plan(self, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start a token that needs the (unique) neurons `active`: refresh their recency, evict neurons
        outside the window, make room, and return (to_insert, overflow): the uncached active neurons that
        will get a slot, and those that do not fit (the caller computes them without caching)."""
        self.step += 1
        slots = self.slot_of[active]
        hit = slots >= 0
        self.last_used[slots[hit]] = self.step
        live = self.last_used[: self.count]
        self.delete(np.flatnonzero(live <= self.step - self.window))
        missing = active[~hit]
        free = self.capacity - self.count
        if len(missing) > free:
            # Window larger than the budget allows: drop least recently used neurons this token does not need.
            spare = np.flatnonzero(self.last_used[: self.count] < self.step)
            order = spare[np.argsort(self.last_used[spare], kind="stable")]
            self.delete(order[: len(missing) - free])
            free = self.capacity - self.count
        return missing[:free], missing[free:]

    def insert(self, neurons: np.ndarray, values: list) -> np.ndarray:
        """Put `neurons` (from plan's to_insert) with their part vectors (numpy or MLX arrays) into the
        next free slots."""
        import mlx.core as mx

        m = len(neurons)
        slots = np.arange(self.count, self.count + m)
        for p, v in enumerate(values):
            if self.rows is not None:
                self.rows[p][self.count: self.count + m] = np.asarray(v)
            else:
                v = v if isinstance(v, mx.array) else mx.array(v)
                self.parts[p][self.count: self.count + m] = v.astype(self.parts[p].dtype)
        self.neuron_at[slots] = neurons
        self.slot_of[neurons] = slots
        self.last_used[slots] = self.step
        self.count += m
        self.inserted += m
        return slots

    def delete(self, slots: np.ndarray) -> None:
        """Free `slots`: live neurons from the tail move into the holes, so [0, count) stays dense."""
        k = len(slots)
        if k == 0:
            return
        n = self.count
        new_n = n - k
        dead = np.zeros(n, bool)
        dead[slots] = True
        holes = np.flatnonzero(dead[:new_n])
        movers = new_n + np.flatnonzero(~dead[new_n:])
        self.slot_of[self.neuron_at[slots]] = -1
        if len(holes):
            if self.rows is not None:
                for rows in self.rows:
                    rows[holes] = rows[movers]
            else:
                import mlx.core as mx

                h, mv = mx.array(holes), mx.array(movers)
                for p in range(len(self.parts)):
                    self.parts[p][h] = self.parts[p][mv]
            self.neuron_at[holes] = self.neuron_at[movers]
            self.last_used[holes] = self.last_used[movers]
            self.slot_of[self.neuron_at[holes]] = holes
        self.neuron_at[new_n:n] = -1
        self.count = new_n

    def reset(self) -> None:
        self.slot_of[self.neuron_at[: self.count]] = -1
        self.neuron_at[:] = -1
        self.count = 0
