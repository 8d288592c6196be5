"""Prefetch of streamed FFN data: a bounded ring of staging buffers filled in the order layers run.

Dense paging reads the same units (a layer, or a slice of neurons of a large layer) every token, in
the same order, so the ring simply keeps the next `depth` units in flight, wrapping from the last layer
of one token to the first layer of the next. The layer that needs a unit takes it (waiting only if its
read is not finished), copies it out, and releases the slot, which immediately starts the read of the
unit `depth` places ahead. A call out of the expected order (an unusual forward) resynchronizes.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .io import AlignedBuffer, DirectReader, wait_all
from .layout import ALIGN, aligned


@dataclass(frozen=True)
class Unit:
    """Neurons [start, stop) of one layer's file: the aligned byte span that holds their bundles."""

    layer: int
    start: int
    stop: int
    path: str
    bundle_bytes: int

    @property
    def file_offset(self) -> int:
        return self.start * self.bundle_bytes // ALIGN * ALIGN

    @property
    def read_bytes(self) -> int:
        return aligned(self.stop * self.bundle_bytes) - self.file_offset

    @property
    def skip(self) -> int:  # where the first bundle starts inside the read span
        return self.start * self.bundle_bytes - self.file_offset

    def bundles(self, buf: np.ndarray) -> np.ndarray:
        n = self.stop - self.start
        return buf[self.skip: self.skip + n * self.bundle_bytes].reshape(n, self.bundle_bytes)


def split_layer(layer: int, n_neurons: int, bundle_bytes: int, path: str, max_bytes: int) -> list[Unit]:
    """A layer as units of at most ~max_bytes (whole layer when it is small enough)."""
    per = max(1, max_bytes // bundle_bytes)
    return [Unit(layer, s, min(s + per, n_neurons), path, bundle_bytes) for s in range(0, n_neurons, per)]


class StreamRing:
    """`depth` page-aligned staging buffers cycling over `units` (in forward order)."""

    def __init__(self, reader: DirectReader, units: list[Unit], depth: int):
        self.reader, self.units = reader, units
        self.depth = max(1, min(depth, len(units)))
        size = max(u.read_bytes for u in units)
        self._block = AlignedBuffer(self.depth * size)  # one mapping: its huge pages serve every slot
        self.buffers = self._block.slots(self.depth)
        self.free = list(range(self.depth))
        self.pending: OrderedDict[int, tuple[int, list]] = OrderedDict()
        self.next = 0
        self.wait_seconds = 0.0  # time the compute side spent waiting for a read (the I/O stall)
        self.resyncs = 0
        self.position = {(u.layer, u.start): k for k, u in enumerate(units)}

    @property
    def staging_bytes(self) -> int:
        return sum(b.n_bytes for b in self.buffers)

    def _submit(self) -> None:
        k = self.next % len(self.units)
        u = self.units[k]
        b = self.free.pop()
        self.pending[k] = (b, self.reader.read(u.path, u.file_offset, u.read_bytes, self.buffers[b]))
        self.next += 1

    def fill(self) -> None:
        while self.free and len(self.pending) < len(self.units):
            self._submit()

    def take(self, k: int) -> tuple[np.ndarray, int]:
        """The bundles of unit k, as a view of its staging buffer, and the slot to release."""
        if not self.pending or next(iter(self.pending)) != k:
            self._resync(k)
        b, futures = self.pending.pop(k)
        t0 = time.perf_counter()
        wait_all(futures)
        self.wait_seconds += time.perf_counter() - t0
        return self.units[k].bundles(self.buffers[b].array), b

    def release(self, slot: int) -> None:
        self.free.append(slot)
        self.fill()

    def _resync(self, k: int) -> None:
        self.resyncs += 1
        for b, futures in self.pending.values():
            wait_all(futures)
            self.free.append(b)
        self.pending.clear()
        self.next = k
        self.fill()

    def close(self) -> None:
        for b, futures in self.pending.values():
            for f in futures:
                f.cancel()
            try:
                wait_all([f for f in futures if not f.cancelled()])
            except Exception:
                pass
        self.pending.clear()
        for buf in self.buffers:
            buf.close()
        self._block.close()
