"""Memory budgets: strict size parsing and the plan of what stays resident and what streams.

The budget covers every byte the model's weights and paging machinery hold: the resident part
(embeddings, norms, attention, output head), the FFN parts kept in memory (pinned layers, resident
gates or predictors, neuron caches), and the paging buffers (direct-I/O staging ring, the copies of
streamed units MLX is still computing with, and their decoded floats). What it does not cover is the
fixed runtime overhead (Python, MLX and BLAS code and their caches), the KV cache and activations;
docs/flash.md gives the measured size of that overhead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ..errors import UserError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text) -> int:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536_870_912, '1e9'? no: digits, optional decimals, a unit
    (B, KB, MB, GB, TB decimal; KiB, MiB, GiB, TiB binary; case-insensitive). Anything else raises."""
    if isinstance(text, bool):
        raise UserError(f"memory budget must be a size like 2GB or 512MB, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise UserError(f"memory budget {text!r} is not a size; use a number and a unit, e.g. 512MB, 2GB, 1.5GiB")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UserError(f"memory budget must be positive, got {text!r}")
    return value


def format_size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class Plan:
    """What one load keeps in memory and what it streams (all sizes in bytes)."""

    mode: str  # "resident", "dense" (whole layers streamed, the rest pinned), "sparse", "naive"
    budget: Optional[int]
    resident_bytes: int  # non-FFN weights as held in memory
    pinned: list[int] = field(default_factory=list)
    streamed: list[int] = field(default_factory=list)
    unit_bytes: int = 0  # max neuron-slice read per unit (dense streaming) or per sparse read buffer
    ring_depth: int = 0
    max_inflight: int = 0
    fixed_bytes: int = 0  # resident gates or predictors (sparse)
    cache_capacity: int = 0  # neurons per layer (sparse)
    pinned_bytes: int = 0
    pinned_stored: bool = False  # pinned layers held as their stored bundles (native kernel) or as floats
    pin_layout: str = "tail"  # where the pinned layers sit among the streamed ones (pinned_layers)
    buffer_bytes: int = 0  # staging + in-flight copies + decoded floats
    cache_bytes: int = 0
    ahead_neurons: int = 0  # sparse lookahead: neurons each of its two buffers holds (0: no lookahead)
    ahead_buffer_bytes: int = 0  # and each buffer's size (counted in buffer_bytes)

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.pinned_bytes + self.fixed_bytes + self.buffer_bytes + self.cache_bytes

    def describe(self) -> str:
        parts = [f"mode {self.mode}", f"resident {format_size(self.resident_bytes)}"]
        if self.pinned:
            held = " as stored bundles" if self.pinned_stored else ""
            where = f"{self.pin_layout}, " if self.streamed else ""
            parts.append(f"{len(self.pinned)} FFN layers pinned{held} ({where}{format_size(self.pinned_bytes)})")
        if self.streamed:
            parts.append(f"{len(self.streamed)} streamed (ring {self.ring_depth} x {format_size(self.unit_bytes)})")
        if self.fixed_bytes:
            parts.append(f"selectors {format_size(self.fixed_bytes)}")
        if self.cache_capacity:
            parts.append(f"neuron cache {self.cache_capacity}/layer ({format_size(self.cache_bytes)})")
        parts.append(f"buffers {format_size(self.buffer_bytes)}")
        parts.append(f"total {format_size(self.total_bytes)}" + (f" of {format_size(self.budget)}" if self.budget else ""))
        return ", ".join(parts)


def _too_small(budget: int, minimum: int, what: str) -> UserError:
    return UserError(f"memory budget {format_size(budget)} ({budget} bytes) is below the minimum of "
                     f"{format_size(minimum)} ({minimum} bytes) that {what} needs")


@dataclass
class Geometry:
    n_layers: int
    hidden: int
    intermediate: int
    bundle_bytes: int
    part_bytes: int
    compute_itemsize: int
    unit_neurons: int  # neurons per streamed unit
    # One layer's bundles as stored (aligned), when the native kernel computes pinned layers from them:
    # a 16-bit or 8-bit store then pins 2x or ~4x more layers than float32 copies would.
    stored_layer: Optional[int] = None
    # Prompts decode a unit this many neurons at a time (None: whole units). With the kernel, floats are
    # only ever decoded for prompts, so small steps shrink the reserve and leave room to pin more layers.
    decode_neurons: Optional[int] = None
    # Float bytes one bundle decodes to (None: a neuron's three vectors). A GGUF-blocks store's bundle is a
    # chunk of neurons, dequantized only by prompts in bounded steps, and its layers are only ever held as
    # stored (float_layers False).
    bundle_floats: Optional[int] = None
    float_layers: bool = True

    @property
    def layer_mem(self) -> int:  # one pinned layer: up, down, gate in the compute dtype
        return 3 * self.intermediate * self.hidden * self.compute_itemsize

    @property
    def floats_per_bundle(self) -> int:
        return self.bundle_floats if self.bundle_floats is not None else 3 * self.hidden * self.compute_itemsize

    @property
    def pin_bytes(self) -> int:  # one pinned layer under a dense plan
        return self.stored_layer or self.layer_mem

    @property
    def unit_raw(self) -> int:  # one unit's bytes as read (aligned) and as copied into MLX
        return self.unit_neurons * self.bundle_bytes + 8192

    @property
    def unit_decoded(self) -> int:  # one unit's decoded floats while MLX computes with them
        return self.unit_neurons * self.floats_per_bundle

    @property
    def decode_bytes(self) -> int:  # one decode step in MLX: its copy of the bundles and their floats
        n = self.decode_neurons or self.unit_neurons
        return n * (self.bundle_bytes + self.floats_per_bundle) + 8192


# Bytes the ring must hold beyond the unit being computed for reads to keep their speed. SmolLM2 8-bit
# (2.83 MB units, benchmarks/ring_depth.py): one unit ahead read at 1.6 GB/s, two or three at 2.4; bfloat16
# units of 5.32 MB read as fast one ahead (2.38 GB/s) as three (2.14).
MIN_READ_AHEAD = 4 << 20


def ring_depths(g: Geometry) -> list[int]:
    """Ring depths worth trying for this geometry, deepest first: those of 2 to 4 units that keep at least
    MIN_READ_AHEAD bytes queued beyond the unit being computed (just 4 when none does)."""
    return [d for d in (4, 3, 2) if (d - 1) * g.unit_raw >= MIN_READ_AHEAD] or [4]


PIN_LAYOUTS = ("auto", "tail", "spread")


def pinned_layers(n_layers: int, n_pinned: int, layout: str = "tail") -> list[int]:
    """Which of n_layers FFN layers to pin. "tail": the last n_pinned layers; the ring then streams the first
    ones, whose reads for the next token start while the pinned tail of this token computes. "spread": evenly
    among the streamed ones, the last layer pinned (j-th of p at (j + 1) * n / p - 1), so reads go on through
    each pinned layer's compute: faster where reads are the limit, not where they are not
    (benchmarks/pin_layout.py). "auto" starts as the tail; the loader then measures which one the model
    needs (flash/auto_layout.py)."""
    if layout not in PIN_LAYOUTS:
        raise ValueError(f"pin layout must be one of {', '.join(PIN_LAYOUTS)}, got {layout!r}")
    if n_pinned <= 0:
        return []
    if layout in ("tail", "auto"):
        return list(range(n_layers - n_pinned, n_layers))
    return [(j + 1) * n_layers // n_pinned - 1 for j in range(n_pinned)]


def plan_dense(g: Geometry, resident: int, budget: Optional[int], depth: Optional[int] = None, inflight: int = 2,
               naive: bool = False, pin_layout: str = "tail") -> Plan:
    """Pin as many whole FFN layers as the budget allows after the streaming buffers; stream the rest.
    With sparsity off every neuron is used every token, so pinning whole layers is what a cache would
    converge to anyway, and the streamed part is read sequentially (the fastest reads a disk does).
    `depth` None: of `ring_depths(g)`, the one that pins the most layers (a pinned layer is never read
    again, a deeper ring only queues reads), the deeper one on a tie. `pin_layout`: where the pinned layers
    sit among the streamed ones (pinned_layers; benchmarks/pin_layout.py compares the two)."""
    every = list(range(g.n_layers))
    all_pinned = resident + g.n_layers * g.layer_mem
    if naive:
        buffers = g.unit_raw + g.decode_bytes
        if budget is not None and budget < resident + buffers:
            raise _too_small(budget, resident + buffers, "naive streaming (resident part + one layer's buffers)")
        return Plan("naive", budget, resident, [], every, g.unit_raw, 1, 1, buffer_bytes=buffers)
    stored = g.stored_layer is not None
    if g.float_layers and ((budget is None and not stored) or (budget is not None and budget >= all_pinned)):
        return Plan("resident", budget, resident, every, [], pinned_bytes=g.n_layers * g.layer_mem)

    def buffers(d: int, q: int) -> int:
        return d * g.unit_raw + q * g.decode_bytes

    # With the kernel and no budget (native=True asked for it), or a budget that holds them: every layer
    # pinned as stored bundles, nothing streams (prompts still decode one unit at a time).
    if stored and (budget is None or budget >= resident + g.n_layers * g.pin_bytes + buffers(0, 1)):
        return Plan("dense", budget, resident, every, [], g.unit_raw, 0, 1, pinned_bytes=g.n_layers * g.pin_bytes,
                    pinned_stored=True, buffer_bytes=buffers(0, 1))
    minimum = resident + buffers(2, 1)
    if budget < minimum:
        raise _too_small(budget, minimum, "the resident part plus the minimum streaming buffers")

    def at_depth(depth: int) -> Plan:
        q = inflight
        while depth > 2 and resident + buffers(depth, q) > budget:
            depth -= 1
        while q > 1 and resident + buffers(depth, q) > budget:
            q -= 1
        n_pinned = min(g.n_layers - 1, max(0, (budget - resident - buffers(depth, q)) // g.pin_bytes))
        pinned = pinned_layers(g.n_layers, n_pinned, pin_layout)
        held = set(pinned)
        streamed = [i for i in every if i not in held]
        return Plan("dense", budget, resident, pinned, streamed, g.unit_raw, depth, q,
                    pinned_bytes=n_pinned * g.pin_bytes, pinned_stored=stored and n_pinned > 0,
                    buffer_bytes=buffers(depth, q), pin_layout="spread" if pin_layout == "spread" else "tail")

    if depth is not None:
        return at_depth(depth)
    return max((at_depth(d) for d in ring_depths(g)), key=lambda p: (len(p.pinned), p.ring_depth))


# Sparse reads merge runs of neurons separated by at most this many 4 KiB pages. Measured on SmolLM2 at 1/3
# of neurons missing: 0 reads 12% fewer bytes in 74% more requests and was slower on this disk.
GAP_PAGES = 1
# A lookahead buffer holds the reads of 1/AHEAD_SHARE of a layer's neurons. Reads ahead are bounded by the
# last token's misses, so a whole layer file (the size before 766d687) mostly sat empty, in the cache's room.
AHEAD_SHARE = 8


def _layer_file(g: Geometry) -> int:
    """One FFN layer's bundles, rounded up to whole pages: a token's coalesced neuron reads never exceed it."""
    return (g.intermediate * g.bundle_bytes + 4095) // 4096 * 4096


def ahead_buffer(g: Geometry, n_parts: int) -> tuple[int, int]:
    """(neurons, bytes) of one lookahead buffer: at worst a neuron's coalesced read takes its own pages,
    one more where it straddles a page edge, and a merged gap of GAP_PAGES (io.page_runs)."""
    neurons = max(1, g.intermediate // AHEAD_SHARE)
    pages = -(-n_parts * g.part_bytes // 4096) + 1 + GAP_PAGES
    return neurons, min(_layer_file(g), neurons * pages * 4096)


def plan_sparse(g: Geometry, resident: int, budget: Optional[int], selector_bytes: int, n_parts: int,
                lookahead: bool = False) -> Plan:
    """Neuron-level paging: resident selectors (gates or predictors) for every layer, a neuron cache per
    layer sized from what the budget leaves, one read buffer (a layer file: a token's coalesced neuron
    reads never exceed it) plus one decode step of a prompt (prompts read whole layers), plus with
    `lookahead` two buffers (ahead_buffer) for reads of the next layer's guessed neurons. With the native
    kernel (`g.stored_layer` set) the cache holds bundles as stored, not their floats."""
    row = n_parts * (g.part_bytes if g.stored_layer is not None else g.hidden * g.compute_itemsize)
    ahead_neurons, ahead_bytes = ahead_buffer(g, n_parts) if lookahead else (0, 0)
    buffers = _layer_file(g) + 2 * ahead_bytes + g.decode_bytes
    base = resident + selector_bytes + buffers
    if budget is None:
        capacity = g.intermediate
    else:
        minimum = base + g.n_layers * row * max(1, g.intermediate // 64)
        if budget < minimum:
            raise _too_small(budget, minimum, "sparse paging (resident part, selectors, buffers and a neuron "
                                              "cache of 1/64 of each layer)")
        capacity = min(g.intermediate, (budget - base) // (g.n_layers * row))
    return Plan("sparse", budget, resident, [], list(range(g.n_layers)), g.unit_raw, 0, 1,
                fixed_bytes=selector_bytes, cache_capacity=capacity, buffer_bytes=buffers,
                cache_bytes=g.n_layers * capacity * row, ahead_neurons=ahead_neurons, ahead_buffer_bytes=ahead_bytes)
