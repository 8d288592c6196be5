"""State shared by the paged FFN layers of one model: reader pool, prefetch ring, read buffers, stats.

Pipelining without a per-layer `mx.eval`: a streamed layer's output is queued with `mx.async_eval` as
soon as its graph is built, and the forward pass goes on building the next layers while MLX computes
and the reader threads fetch ahead. Only when more than `max_inflight` streamed units are still queued
does the builder wait, on the oldest one, which bounds the MLX copies of streamed data in memory.
On the CPU with the native kernel (`native`), a streamed layer instead evaluates its input once and
computes its units from the staging slots; the reads stay ahead either way.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .budget import GAP_PAGES, Geometry, Plan
from .cuda_prefetch import CudaPrefetcher
from .io import AlignedBuffer, DirectReader, page_runs, runs_cover, wait_all
from .layout import FlashLayout
from .ring import StreamRing, Unit, split_layer


@dataclass
class FlashStats:
    """Counters since the last `reset_stats` (bytes come from the reader, times from the layers)."""

    tokens: int = 0  # forward positions processed (counted at layer 0)
    io_wait_s: float = 0.0  # time the forward pass waited for reads
    compute_wait_s: float = 0.0  # time it waited for queued compute (the in-flight bound)
    forced_evals: int = 0  # synchronizations the pipeline forced (in-flight bound, sparse selection)
    neurons_read: int = 0
    neurons_used: int = 0
    ahead_read: int = 0  # neurons read ahead for the next layer (sparse lookahead)
    ahead_used: int = 0  # of those, neurons the next layer then needed
    selected: list = field(default_factory=list)


class FlashRuntime:
    """One per loaded flash model; reachable as `model.flash` and from each paged layer."""

    def __init__(self, layout: FlashLayout, plan: Plan, dtype, io_threads: int = 4,
                 max_unit_bytes: int = 16 << 20, read_split: int = 8 << 20, geometry: Optional[Geometry] = None):
        self.layout, self.plan, self.dtype, self.codec = layout, plan, dtype, layout.codec
        # Naive: one synchronous request per unit. Sparse: many small random reads, which need queue depth
        # (32 KiB random reads measured 1.5-3x faster at 8 in flight than at 1 on this machine's disk).
        threads = {"naive": 1, "sparse": max(io_threads, 8)}.get(plan.mode, io_threads)
        self.reader = DirectReader(threads=threads, split=1 << 40 if plan.mode == "naive" else read_split)
        self.units = {i: split_layer(i, layout.n_bundles, layout.bundle_bytes(i), str(layout.layers[i].path),
                                     max_unit_bytes) for i in range(layout.n_layers)}
        self.blocks = layout.codec if layout.blocks else None  # GGUF-blocks store: chunks through GGUF matmuls
        self.unit_neurons = max(u.stop - u.start for us in self.units.values() for u in us)
        self.geometry = geometry  # what the plan was made from
        # Neurons decoded into MLX at a time: the geometry's step (~2 MB of floats with the kernel), else a unit.
        self.decode_neurons = (geometry.decode_neurons if geometry else None) or self.unit_neurons
        self.ring: Optional[StreamRing] = None
        self.set_plan(plan)
        self.scratch: Optional[AlignedBuffer] = None
        if plan.mode == "naive":
            self.scratch = AlignedBuffer(max(u.read_bytes for us in self.units.values() for u in us))
        elif plan.mode == "sparse":  # coalesced neuron reads of one layer never exceed its file
            self.scratch = AlignedBuffer(max(e.file_bytes for e in layout.layers))
        # Sparse lookahead: two buffers that alternate by layer parity; ahead[k] = (layer, neuron ids
        # (sorted), page runs, futures) of the reads queued into ahead_buffers[k].
        self.ahead_buffers: list[AlignedBuffer] = []
        self.ahead: dict = {}
        self.sparse_layers: dict = {}  # layer -> its FlashMLP in sparse mode (lookahead reaches the next one)
        self.inflight: deque = deque()
        self.stats = FlashStats()
        self.thresholds: Optional[np.ndarray] = None  # per layer, sparse modes
        self.recorder = None  # sparsity.Recorder during calibration
        self.native = None  # native.BundleFFN: single-token streamed units on the CPU (set by the loader)
        self.prefetch = CudaPrefetcher()  # streamed bytes copied into MLX move to the GPU in bulk (CUDA only)
        self.layout_probe: Optional[dict] = None  # what --pin-layout auto measured at load (auto_layout.py)
        self.closed = False

    def set_plan(self, plan: Plan) -> None:
        """Follow `plan` (at load, or when the loader moves the pinned layers): a new staging ring streams
        its layers in forward order; the old ring's reads are cancelled and its buffers freed first."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        self.plan = plan
        if plan.mode == "dense" and plan.streamed:
            order = [u for i in plan.streamed for u in self.units[i]]
            self.ring = StreamRing(self.reader, order, plan.ring_depth)

    # -- pipeline -----------------------------------------------------------------------------------------

    def start_token(self, n: int) -> None:
        """Called by layer 0 at each forward pass with its number of positions."""
        self.stats.tokens += n

    def queue(self, y) -> None:
        """Start computing a streamed unit's output now, without waiting for it."""
        import mlx.core as mx

        mx.async_eval(y)
        self.inflight.append(y)

    def to_mlx(self, host):
        """A host array of streamed bytes as an MLX array, already on its way to the GPU under CUDA."""
        import mlx.core as mx

        raw = mx.array(host)
        self.prefetch.to_device(raw)
        return raw

    def bound_inflight(self) -> None:
        """Before another streamed unit enters MLX memory: at most max_inflight may be pending."""
        import mlx.core as mx

        while len(self.inflight) >= max(1, self.plan.max_inflight):
            oldest = self.inflight.popleft()
            t0 = time.perf_counter()
            mx.eval(oldest)  # normally already computed: this is backpressure, not a per-layer stall
            self.stats.compute_wait_s += time.perf_counter() - t0
            self.stats.forced_evals += 1

    def take_unit(self, unit_index: int):
        """(bundles view, slot) of a streamed unit from the ring."""
        t0 = time.perf_counter()
        out = self.ring.take(unit_index)
        self.stats.io_wait_s += time.perf_counter() - t0
        return out

    # -- synchronous reads (naive baseline, prompts in sparse mode, neuron misses) -------------------------

    def read_unit_now(self, unit: Unit) -> np.ndarray:
        t0 = time.perf_counter()
        wait_all(self.reader.read(unit.path, unit.file_offset, unit.read_bytes, self.scratch))
        self.stats.io_wait_s += time.perf_counter() - t0
        return unit.bundles(self.scratch.array)

    def submit_neurons(self, layer: int, neurons: np.ndarray, n_bytes: int, buffer: Optional[AlignedBuffer] = None):
        """Queue reads of the first `n_bytes` of each neuron's bundle (sorted ids) into `buffer` (default:
        the scratch buffer); returns (futures, where)."""
        futures, where, _ = self._submit_runs(layer, neurons, n_bytes, buffer or self.scratch)
        return futures, where

    def _submit_runs(self, layer: int, neurons: np.ndarray, n_bytes: int, buffer: AlignedBuffer):
        """submit_neurons into `buffer`, also returning the page runs read (page_runs' list)."""
        runs, where = page_runs(neurons.astype(np.int64) * self.codec.bundle_bytes, n_bytes, gap_pages=GAP_PAGES)
        return self.reader.read_runs(str(self.layout.layers[layer].path), runs, buffer), where, runs

    def enable_lookahead(self) -> None:
        """Sparse mode: allocate the two lookahead buffers the plan counted (each for plan.ahead_neurons)."""
        self.ahead_buffers = [AlignedBuffer(self.plan.ahead_buffer_bytes) for _ in range(2)]

    def read_ahead(self, layer: int, neurons: np.ndarray, n_bytes: int) -> None:
        """Queue reads of `neurons` of `layer` into its parity's lookahead buffer (replacing what was there)."""
        k = layer % 2
        self.drop_ahead(k)
        if len(neurons):
            futures, _, runs = self._submit_runs(layer, neurons, n_bytes, self.ahead_buffers[k])
            self.ahead[k] = (layer, neurons, np.array(runs, np.int64).reshape(-1, 3), futures)
            self.stats.ahead_read += len(neurons)

    def peek_ahead(self, layer: int):
        """(neuron ids, page runs read, buffer, futures) read ahead for `layer`, or None. The entry stays
        until a later read_ahead into the same buffer replaces it (after waiting for its reads), so the
        buffer is never refilled under a read still in flight; its bytes are the file's, valid as long as
        it stays."""
        entry = self.ahead.get(layer % 2)
        if entry is None or entry[0] != layer:
            return None
        _, ids, runs, futures = entry
        return ids, runs, self.ahead_buffers[layer % 2], futures

    def ahead_cover(self, ahead, neurons: np.ndarray, n_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """Which of `neurons` (their first n_bytes) the page runs of a peek_ahead entry hold, guessed or
        not (neighbours share pages), and where in its buffer: io.runs_cover."""
        return runs_cover(ahead[1], neurons.astype(np.int64) * self.codec.bundle_bytes, n_bytes)

    def drop_ahead(self, k: Optional[int] = None) -> None:
        """Forget lookahead reads (of buffer k, or all), after they finish: their buffer may be reused."""
        for key in [k] if k is not None else list(self.ahead):
            entry = self.ahead.pop(key, None)
            if entry is not None:
                wait_all(entry[3])

    def wait(self, futures) -> None:
        t0 = time.perf_counter()
        wait_all(futures)
        self.stats.io_wait_s += time.perf_counter() - t0

    def gather(self, where: np.ndarray, n_bytes: int, buffer: Optional[AlignedBuffer] = None) -> np.ndarray:
        """(len(where), n_bytes) copy of the bytes at each offset of `buffer` (default: scratch; after
        `wait`). Equal-length slices at arbitrary offsets: a fancy index into a sliding-window view copies
        each once, without building an (m, n_bytes) index array."""
        return np.lib.stride_tricks.sliding_window_view((buffer or self.scratch).array, n_bytes)[where]

    # -- statistics ---------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self.stats = FlashStats()
        self.reader.reset_stats()
        if self.ring is not None:
            self.ring.wait_seconds = 0.0

    def report(self) -> dict:
        """Bytes read, read time and waits since reset_stats (per token where it makes sense)."""
        s, r = self.stats, self.reader
        tokens = max(1, s.tokens)
        busy = r.busy_seconds()
        out = {
            "tokens": s.tokens, "bytes_read": r.bytes_read, "bytes_per_token": r.bytes_read / tokens,
            "reads": r.n_reads, "io_busy_s": busy, "io_wait_s": s.io_wait_s,
            "read_GBps": r.bytes_read / busy / 1e9 if busy else 0.0,
            # Share of the time reads were in flight during which the forward pass was not waiting on them.
            "io_overlap": 1.0 - s.io_wait_s / busy if busy else 0.0,
            "forced_evals": s.forced_evals, "compute_wait_s": s.compute_wait_s, "direct_io": r.direct,
            "pin_layout": self.plan.pin_layout if self.plan.pinned and self.plan.streamed else None,
        }
        if self.layout_probe:
            out["layout_probe"] = self.layout_probe
        if s.neurons_used:
            out["neurons_used_per_token"] = s.neurons_used / tokens
            out["neurons_read_per_token"] = s.neurons_read / tokens
        if s.ahead_read:
            out["ahead_read_per_token"] = s.ahead_read / tokens
            out["ahead_used_share"] = s.ahead_used / s.ahead_read
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ring is not None:
            self.ring.close()
        self.drop_ahead()
        self.reader.close()
        for buf in self.ahead_buffers:
            buf.close()
