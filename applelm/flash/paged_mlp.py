"""`FlashMLP`: the module the flash loader swaps in for each layer's `mlp` (model files stay unchanged).

It computes the gated FFN the model defines, down(act(gate(x)) * up(x)), from weights held in one of
four ways (the runtime's plan decides per layer):

- pinned:  up, down^T, gate in memory (also how `load(OUT)` without a budget holds every layer); with
           the native CPU kernel under a budget, the layer's bundles as stored instead (2-4x smaller);
           a GGUF-blocks store (blocks.py) always holds its chunks as stored, for the GGUF matmuls
- stream:  whole layer (or neuron slices of it) read each token through the prefetch ring
- naive:   whole layer read synchronously each token, then evaluated (the baseline the paper beats)
- sparse:  neuron-level paging: a selector picks the active neurons (resident gate with calibrated
           magnitude thresholds, or a low-rank predictor), a windowing NeuronCache keeps recently active
           neurons (as stored bundles with the native kernel), and only the bundles of active neurons
           that are not cached are read

Rows are neurons throughout: up and gate are (I, H) like nn.Linear weights, down is stored transposed
(I, H), so a neuron's three vectors are rows of three matrices and a bundle fills one row of each.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..ops.layers import ACTIVATIONS
from .neuron_cache import NeuronCache
from .runtime import FlashRuntime

UP, DOWN, GATE = 0, 1, 2
# Lookahead guesses: the next layer's gate threshold scaled by this, or its predictor's logit cut lowered by
# that (benchmarks/sparse_lookahead.py measures what each reads and covers).
GUESS_THRESHOLD_FACTOR = 0.5
GUESS_LOGIT_MARGIN = 1.0
# Lookahead reads at most this many times the misses the next layer had on the previous token (at least
# AHEAD_MIN_NEURONS), its surest guesses first: a loosened cut alone read 1064 MB a token on the sparse
# ReLU model (many logits sit near its cut), where the misses themselves were 2.6 MB.
AHEAD_MISS_FACTOR = 1.0
AHEAD_MIN_NEURONS = 16


def gated_ffn(x: mx.array, up: mx.array, down_t: mx.array, gate: mx.array, act: Callable) -> mx.array:
    """(act(x gate^T) * (x up^T)) down^T: the same math as the models' MLP modules."""
    return (act(x @ gate.T) * (x @ up.T)) @ down_t


def interleaved_ffn(x: mx.array, w: mx.array, act: Callable) -> mx.array:
    """The same FFN from bundles as read, w = (n, 3, H) rows [up, down, gate] per neuron, with no
    de-interleaving copy: one gemv over all 3n rows gives up and gate (and a wasted third), one gemv of
    the activations against the (n, 3H) rows gives down in its middle third. For a single token this
    beats splitting the parts apart (a strided copy per part); prompts use the split (compute-bound)."""
    n, _, h = w.shape
    z = (x @ w.reshape(3 * n, h).T).reshape(*x.shape[:-1], n, 3)
    a = act(z[..., GATE]) * z[..., UP]
    return (a @ w.reshape(n, 3 * h))[..., h: 2 * h]


class FlashMLP(nn.Module):
    """The paged feed-forward block of layer `layer`. Holds no parameters (the weights live in the flash
    store and in this module's private state), so load_weights(strict=True) of the resident part works."""

    def __init__(self, layer: int, runtime: FlashRuntime, activation: str, mode: str):
        super().__init__()
        self.layer, self.mode = layer, mode
        # by name (ops.layers.ACTIVATIONS): the GGUF-blocks store's fused kernel call takes the name
        self._rt, self._act_name, self._act = runtime, activation, ACTIVATIONS[activation]
        self._pinned: Optional[tuple] = None  # (up, down_t, gate) in the compute dtype
        self._stored = None  # or the layer's bundles as stored (numpy for the native kernel, MLX for GGUF blocks)
        self._gate: Optional[mx.array] = None  # resident gate (threshold sparsity)
        self._gate_stored: Optional[np.ndarray] = None  # or its rows as stored (the native kernel computes it)
        self._predictor_np: Optional[tuple] = None  # float32 numpy copy for lookahead guesses
        self._predictor: Optional[tuple] = None  # (A, B, bias, logit threshold)
        self._cache: Optional[NeuronCache] = None
        self._recent_misses = 0  # uncached neurons the last token selected (bounds lookahead reads)
        self._units: list[int] = []
        self.bind_units()

    def bind_units(self) -> None:
        """A streamed layer's units: their places in the runtime's ring (again after the ring is rebuilt)."""
        rt = self._rt
        self._units = [rt.ring.position[(u.layer, u.start)] for u in rt.units[self.layer]] \
            if self.mode == "stream" else []

    def _extra_repr(self) -> str:
        return f"layer={self.layer}, mode={self.mode}"

    def __call__(self, x: mx.array) -> mx.array:
        rt = self._rt
        if self.layer == 0:
            rt.start_token(x.shape[0] * x.shape[1])
        if self.mode == "pinned":
            if self._stored is not None:
                return self._stored_ffn(x)
            if rt.recorder is not None:
                rt.recorder.record(self.layer, 0, x, self._act(x @ self._pinned[GATE].T))
            return gated_ffn(x, *self._pinned, self._act)
        if self.mode == "stream":
            return self._stream(x)
        if self.mode == "naive":
            return self._naive(x)
        if self._native_ready(x):
            return self._sparse_token_native(x)
        if x.shape[0] * x.shape[1] == 1:
            return self._sparse_token(x)
        return self._sparse_prompt(x)

    # -- dense paging -------------------------------------------------------------------------------------

    def _decode(self, bundles: np.ndarray, n_parts: int = 3) -> list:
        raw = self._rt.to_mlx(bundles)  # one copy out of the staging buffer, which can then be reused
        return self._rt.codec.decode_mx(raw, n_parts, self._rt.dtype)

    def _unit_ffn(self, x: mx.array, bundles: np.ndarray, start: int) -> mx.array:
        """One unit's contribution through MLX (copies the bundles out of the staging buffer first), in
        steps of rt.decode_neurons: each step but the last is evaluated before the next is decoded."""
        rt = self._rt
        if rt.blocks is not None:  # chunks of GGUF blocks, multiplied where they were read
            return rt.blocks.ffn(self.layer, x, [rt.blocks.split(self.layer, c) for c in bundles], self._act,
                                 self._act_name)
        if x.shape[0] * x.shape[1] == 1 and not rt.codec.quantized and rt.recorder is None:
            raw = rt.to_mlx(bundles)  # the one copy out of the staging buffer, which can then be reused
            return interleaved_ffn(x, rt.codec.decode_interleaved_mx(raw, rt.dtype), self._act)
        y, step = None, rt.decode_neurons
        for s in range(0, len(bundles), step):
            up, down_t, gate = rt.codec.decode_mx(rt.to_mlx(bundles[s: s + step]), 3, rt.dtype)
            if rt.recorder is not None:
                rt.recorder.record(self.layer, start + s, x, self._act(x @ gate.T))
            part = gated_ffn(x, up, down_t, gate, self._act)
            y = part if y is None else y + part
            if s + step < len(bundles):
                mx.eval(y)
        return y

    def _native_ready(self, x: mx.array) -> bool:
        return self._rt.native is not None and x.shape[0] * x.shape[1] == 1 and self._rt.recorder is None

    def _native_ffn(self, x: mx.array, units) -> mx.array:
        """One token's FFN from the native kernel over `units` ((bundles, first neuron) pairs). The kernel
        needs x's values: one evaluation."""
        xf = x.reshape(-1).astype(mx.float32)
        mx.eval(xf)
        self._rt.stats.forced_evals += 1
        xn, out = np.array(xf), np.zeros(x.shape[-1], np.float32)
        for bundles, _ in units:
            self._rt.native(xn, bundles, out)
        return mx.array(out).reshape(x.shape).astype(x.dtype)

    def _mlx_ffn(self, x: mx.array, units) -> mx.array:
        """The FFN through MLX over `units` ((bundles, first neuron) pairs): each unit's output is queued,
        not waited for, within the runtime's in-flight bound."""
        rt, y = self._rt, None
        for bundles, start in units:
            rt.bound_inflight()
            part = self._unit_ffn(x, bundles, start)
            y = part if y is None else y + part
            rt.queue(y)  # compute starts now; the forward pass goes on building the next layers
        return y

    def _ring_units(self):
        """This layer's streamed units in their staging slots, as (bundles, first neuron), each slot
        released once the unit has been used (also when the consumer raises)."""
        rt = self._rt
        for k in self._units:
            bundles, slot = rt.take_unit(k)
            try:
                yield bundles, rt.ring.units[k].start
            finally:
                rt.ring.release(slot)

    def _stream(self, x: mx.array) -> mx.array:
        # With the kernel, each unit is read in its staging slot (no copy into MLX) while the ring reads ahead.
        ffn = self._native_ffn if self._native_ready(x) else self._mlx_ffn
        return ffn(x, self._ring_units())

    def _stored_ffn(self, x: mx.array) -> mx.array:
        """A pinned layer held as stored bundles: the kernel for a token; prompts decode it one unit at a
        time through MLX, like a streamed layer (the decoded floats stay within the budgeted buffers)."""
        if self._rt.blocks is not None:  # no in-flight bound: nothing new enters memory
            return self._rt.blocks.ffn(self.layer, x, self._stored, self._act, self._act_name)
        if self._native_ready(x):
            return self._native_ffn(x, ((self._stored, 0),))
        return self._mlx_ffn(x, ((self._stored[u.start: u.stop], u.start) for u in self._rt.units[self.layer]))

    def _naive(self, x: mx.array) -> mx.array:
        rt, y = self._rt, None
        if self._native_ready(x):  # the same compute as paging, so the comparison measures the I/O
            return self._native_ffn(x, ((rt.read_unit_now(u), u.start) for u in rt.units[self.layer]))
        for unit in rt.units[self.layer]:
            part = self._unit_ffn(x, rt.read_unit_now(unit), unit.start)
            y = part if y is None else y + part
            mx.eval(y)  # the naive loader evaluates each layer before reading the next one
        return y

    # -- neuron-level paging ------------------------------------------------------------------------------

    @property
    def _n_parts(self) -> int:  # a resident gate means bundles are read without it
        return 2 if self._gate is not None or self._gate_stored is not None else 3

    def _select(self, xf: mx.array, x32: Optional[mx.array] = None):
        """(selected neuron ids, gate activations as numpy or None) for one token's FFN input xf (1, H).
        x32 (xf as float32, for the native kernel; stored gate rows need it) is evaluated in the same
        synchronization."""
        rt = self._rt
        also = () if x32 is None else (x32,)
        if self._gate_stored is not None:
            mx.eval(x32)
            rt.stats.forced_evals += 1
            gn = rt.native.gate_acts(np.array(x32), self._gate_stored)
            return np.flatnonzero(np.abs(gn) > rt.thresholds[self.layer]), gn
        if self._gate is not None:
            g = self._act(xf @ self._gate.T)
            mx.eval(g, *also)  # the selection needs values: this token's reads depend on them
            rt.stats.forced_evals += 1
            gn = np.array(g, copy=False)[0]
            return np.flatnonzero(np.abs(gn) > rt.thresholds[self.layer]), gn
        a, b, bias, tau = self._predictor
        logits = (xf @ a) @ b + bias
        mx.eval(logits, *also)
        rt.stats.forced_evals += 1
        return np.flatnonzero(np.array(logits, copy=False)[0] > tau), None

    def _masked(self, gn: np.ndarray, neurons: np.ndarray) -> np.ndarray:
        """The resident gate's activations of `neurons`, 0 where below the layer's threshold (float32)."""
        g = gn[neurons]
        return np.where(np.abs(g) > self._rt.thresholds[self.layer], g, 0).astype(np.float32)

    def _plan_reads(self, selected: np.ndarray, ahead=None):
        """Plan this token's cache and queue the reads of its misses, except those that the pages read
        ahead hold (`ahead`: peek_ahead's entry): (to_insert, misses (sorted), bytes read per neuron,
        (futures, buffer offsets) or None when nothing is to be read, the misses that are read, and
        (ids, offsets in the lookahead buffer) of those the pages read ahead hold, or None)."""
        to_insert, overflow = self._cache.plan(selected)
        misses = np.sort(np.concatenate([to_insert, overflow]))
        self._recent_misses = len(misses)
        n_bytes = self._n_parts * self._rt.codec.part_bytes
        to_read, in_ahead = misses, None
        if ahead is not None:
            covered, where = self._rt.ahead_cover(ahead, misses, n_bytes)
            to_read, in_ahead = misses[~covered], (misses[covered], where[covered])
        pending = self._rt.submit_neurons(self.layer, to_read, n_bytes) if len(to_read) else None
        return to_insert, misses, n_bytes, pending, to_read, in_ahead

    def _guess(self, xn: np.ndarray, xf: mx.array) -> tuple[np.ndarray, np.ndarray]:
        """Neurons this layer will likely select, from the previous layer's FFN input (`xn` float32 numpy,
        `xf` the same in MLX): its selector with a looser cut, as (ids, scores: the surer the higher).
        Measured on SmolLM2 (benchmarks/sparse_lookahead.py): the predictor's logit cut lowered by 1
        guesses 94.8% of the needed pages with 1.03x their number; half the threshold 97.1% with 1.30x."""
        rt = self._rt
        cut = GUESS_THRESHOLD_FACTOR * rt.thresholds[self.layer]
        if self._gate_stored is not None:
            score = np.abs(rt.native.gate_acts(xn, self._gate_stored))
        elif self._gate is not None:  # resident gate in MLX (no kernel): computed where the gate lives
            g = self._act(xf @ self._gate.T)
            mx.eval(g)
            rt.stats.forced_evals += 1
            score = np.abs(np.array(g, copy=False)[0])
        elif self._predictor is None:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        else:
            if self._predictor_np is None:
                a, b, bias, tau = self._predictor
                self._predictor_np = (np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)),
                                      np.array(bias.astype(mx.float32)), tau)
            a, b, bias, tau = self._predictor_np
            score, cut = (xn @ a) @ b + bias, tau - GUESS_LOGIT_MARGIN
        ids = np.flatnonzero(score > cut)
        return ids, score[ids]

    def _read_next_ahead(self, xn: np.ndarray, xf: mx.array) -> None:
        """Queue reads of the next layer's guessed neurons that its cache does not hold, at most
        AHEAD_MISS_FACTOR times its misses of the last token and what a lookahead buffer holds (the
        highest scores)."""
        nxt = self._rt.sparse_layers.get(self.layer + 1)
        if nxt is None or not self._rt.ahead_buffers:
            return
        guess, score = nxt._guess(xn, xf)
        uncached = nxt._cache.slot_of[guess] < 0
        guess, score = guess[uncached], score[uncached]
        limit = min(self._rt.plan.ahead_neurons, max(AHEAD_MIN_NEURONS, int(AHEAD_MISS_FACTOR * nxt._recent_misses)))
        if len(guess) > limit:
            guess = np.sort(guess[np.argpartition(-score, limit - 1)[:limit]])
        self._rt.read_ahead(nxt.layer, guess, nxt._n_parts * self._rt.codec.part_bytes)

    def _partial(self, xf: mx.array, up, down_t, gate, neurons: np.ndarray, gn) -> mx.array:
        """Contribution of the given rows, with activations below the layer's threshold dropped."""
        if gn is not None:
            coef = mx.array(self._masked(gn, neurons)).astype(xf.dtype)
        else:
            thr = float(self._rt.thresholds[self.layer])
            g = self._act(xf @ gate.T)
            coef = mx.where(mx.abs(g) > thr, g, 0)
        return ((xf @ up.T) * coef) @ down_t

    def _plan_token(self, selected: np.ndarray, xn: Optional[np.ndarray], xf: mx.array):
        """_plan_reads for one token, around what the previous layer read ahead for this one (returned as
        `ahead`, peek_ahead's entry or None); then, with lookahead on, the reads of the next layer's guessed
        neurons (from `xn`, this layer's input as float32 numpy; None on the MLX path without lookahead)
        go in behind this layer's own."""
        rt = self._rt
        ahead = rt.peek_ahead(self.layer) if rt.ahead_buffers else None
        plan = self._plan_reads(selected, ahead)
        if xn is not None:
            self._read_next_ahead(xn, xf)  # they run while this layer and the next one compute
        return plan, ahead

    def _ahead_sources(self, ahead, in_ahead) -> list:
        """[(ids, offsets, buffer)] of this layer's misses in the pages read ahead (`in_ahead` from
        _plan_reads; none: []), after those reads finish (queued before this layer's own, so normally done
        by now). Besides the guessed neurons, their neighbours on the same pages: reading those again split
        the runs of a layer's own reads and fetched shared pages twice (SmolLM2's 3456-byte bundles: 155.6
        against 122.6 MB a token)."""
        if ahead is None:
            return []
        self._rt.wait(ahead[3])
        got, where = in_ahead
        if not len(got):
            return []
        self._rt.stats.ahead_used += int(np.isin(got, ahead[0], assume_unique=True).sum())
        return [(got, where, ahead[2])]

    def _sparse_token(self, x: mx.array) -> mx.array:
        rt, cache = self._rt, self._cache
        xf = x.reshape(1, -1)
        x32 = xf.reshape(-1).astype(mx.float32) if rt.ahead_buffers else None
        selected, gn = self._select(xf, x32)
        (to_insert, misses, n_bytes, pending, to_read, in_ahead), ahead = self._plan_token(
            selected, None if x32 is None else np.array(x32), xf)
        y, n0 = None, cache.count
        if n0:
            # While the misses are read, compute what the cache already holds.
            y = self._partial(xf, cache.parts[UP][:n0], cache.parts[DOWN][:n0],
                              cache.parts[GATE][:n0] if self._gate is None else None, cache.cached(), gn)
            mx.async_eval(y)
        sources = self._ahead_sources(ahead, in_ahead)
        if pending:
            futures, where = pending
            rt.wait(futures)
            sources.append((to_read, where, rt.scratch))
        step = rt.unit_neurons  # decode in unit-sized chunks: the transient floats stay within the budget
        for ids_all, where_all, buf in sources:
            keep_all = np.isin(ids_all, to_insert, assume_unique=True)
            for s in range(0, len(ids_all), step):
                ids, k = ids_all[s: s + step], keep_all[s: s + step]
                raw = rt.gather(where_all[s: s + step], n_bytes, buf)
                if k.any():
                    cache.insert(ids[k], self._decode_parts(raw[k], cache.rows is None))
                if (~k).any():  # more active neurons than the cache holds: use them once, uncached
                    vals = self._decode_parts(raw[~k], True)
                    part = self._partial(xf, vals[UP], vals[DOWN], vals[GATE] if self._gate is None else None,
                                         ids[~k], gn)
                    mx.eval(part)  # bound the transient before the next chunk
                    y = part if y is None else y + part
        n1 = cache.count
        if n1 > n0:
            part = self._partial(xf, cache.parts[UP][n0:n1], cache.parts[DOWN][n0:n1],
                                 cache.parts[GATE][n0:n1] if self._gate is None else None,
                                 cache.neuron_at[n0:n1], gn)
            y = part if y is None else y + part
        rt.stats.neurons_used += len(selected)
        rt.stats.neurons_read += len(misses)
        if y is None:
            return mx.zeros_like(x)
        return y.reshape(x.shape)

    def _decode_parts(self, raw: np.ndarray, in_mlx: bool) -> list:
        """The parts of gathered bundles: MLX arrays of the compute dtype decoded by MLX (on the device:
        only the stored bytes cross to it), or float32 numpy arrays for writes through host views."""
        rt = self._rt
        if in_mlx:
            return rt.codec.decode_mx(rt.to_mlx(raw), self._n_parts, rt.dtype)
        vals = rt.codec.decode_np(raw, self._n_parts)
        return [vals[:, p] for p in range(self._n_parts)]

    def _sparse_token_native(self, x: mx.array) -> mx.array:
        """One token through the native kernel: the cache holds bundles as stored (no float copies), the
        cached neurons are computed while the misses are read, and the misses straight from the read buffer."""
        rt, cache, kernel = self._rt, self._cache, self._rt.native
        xf = x.reshape(1, -1)
        x32 = xf.reshape(-1).astype(mx.float32)
        selected, gn = self._select(xf, x32)
        xn, out = np.array(x32), np.zeros(x.shape[-1], np.float32)
        thr = float(rt.thresholds[self.layer])
        # The previous layer may have read some of this layer's neurons ahead (guessed from its input).
        (to_insert, misses, n_bytes, pending, to_read, in_ahead), ahead = self._plan_token(selected, xn, xf)

        def coef(ids):  # resident gate: its masked activations; predictor: the kernel computes the gate
            return None if gn is None else self._masked(gn, ids)

        n0 = cache.count
        if n0:  # the reads run on the reader threads meanwhile (ctypes releases the GIL)
            # No host view (native=True forced on a GPU): a host copy of the occupied slots.
            rows = cache.rows[0][:n0] if cache.rows is not None else np.array(cache.parts[0][:n0])
            kernel.sparse(xn, rows, out, coef=coef(cache.cached()), threshold=thr)
        sources = self._ahead_sources(ahead, in_ahead)  # (ids, offsets, buffer) of the misses
        if pending:
            futures, where = pending
            rt.wait(futures)
            sources.append((to_read, where, rt.scratch))
        step = rt.decode_neurons  # transient copies within the budget's decode-step reserve
        for ids, where, buf in sources:
            kernel.sparse(xn, buf.array, out, offsets=where, coef=coef(ids), threshold=thr)
            keep = np.isin(ids, to_insert, assume_unique=True)
            ids, at = ids[keep], where[keep]
            for s in range(0, len(ids), step):
                cache.insert(ids[s: s + step], [rt.gather(at[s: s + step], n_bytes, buf)])
        rt.stats.neurons_used += len(selected)
        rt.stats.neurons_read += len(misses)
        return mx.array(out).reshape(x.shape).astype(x.dtype)

    def _sparse_prompt(self, x: mx.array) -> mx.array:
        """A prompt chunk: every neuron is needed by some position, so read the layer whole and apply
        each position's threshold mask (the same sparsity a token-by-token run would use)."""
        rt, y = self._rt, None
        thr = float(rt.thresholds[self.layer])
        for unit in rt.units[self.layer]:
            bundles = rt.read_unit_now(unit)
            for s in range(0, len(bundles), rt.decode_neurons):  # the budget holds one step's floats
                rt.bound_inflight()
                up, down_t, gate = self._decode(bundles[s: s + rt.decode_neurons])
                g = self._act(x @ gate.T)
                part = (mx.where(mx.abs(g) > thr, g, 0) * (x @ up.T)) @ down_t
                y = part if y is None else y + part
                rt.queue(y)
        return y
