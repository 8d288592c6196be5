"""Sampling one token for one row of a batch, with the row's own settings and random numbers.

Each row means what `sample.make_sampler` means: keep the top-k tokens, then the top-p nucleus (a token
stays while the probability of the strictly more likely ones is below p), then the tokens at least
min_p times as likely as the best, and draw from what is left at the row's temperature.

Why not `make_sampler` per row, in MLX: on a CPU, MLX's exp runs about 10x slower than numpy's, and
top-p sorts the whole vocabulary; one row then costs a sizeable part of a whole batched decode step.
Here a row's logits are copied out once (B x vocab floats), the filters look at the top `CANDIDATES`
tokens (the whole vocabulary only when the nucleus is wider), and the draw inverts the row's
cumulative distribution at one uniform number from the request's own generator, so a seeded request
draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

CANDIDATES = 1024  # tokens the top-k / top-p filters look at first
BLOCK = 1024  # weights summed together before the draw looks inside one block


@dataclass
class SamplingParams:
    """Per-request sampling; temperature 0 (or top_p 0) is greedy. `seed` makes draws reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # [0, 1)
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0


def _nucleus(z: np.ndarray, lse: float, s: SamplingParams, candidates: int):
    """(token ids, log-probabilities) that top-k and top-p keep, most likely first, from logits `z`
    and their log-sum-exp; None when a wider look is needed (the nucleus may pass the candidates)."""
    V = z.shape[0]
    C = min(V, max(candidates, s.top_k))
    ids = np.argpartition(-z, C - 1)[:C] if C < V else np.arange(V)
    ids = ids[np.argsort(-z[ids], kind="stable")]
    vals = z[ids].astype(np.float64) - lse  # float64: a nucleus edge exactly at p stays exact
    keep = np.ones(C, dtype=bool)
    if s.top_k > 0:
        keep[s.top_k:] = False
    if s.top_p < 1.0:
        probs = np.exp(vals) * keep
        before = np.cumsum(probs) - probs  # probability of the strictly more likely tokens
        keep &= before < s.top_p
        if C < V and keep[-1] and not 0 < s.top_k <= C:
            return None
    return ids[keep], vals[keep]


def sample_row(logits: np.ndarray, s: SamplingParams, u: float, candidates: int = CANDIDATES) -> int:
    """One token id from a row of logits (vocab,), drawn at `u` in [0, 1)."""
    z = np.asarray(logits, dtype=np.float32)
    ids = None
    if s.top_k > 0 or s.top_p < 1.0:  # rank filters need true probabilities: log-softmax first
        peak = float(z.max())
        lse = peak + math.log(np.exp(z - peak).sum(dtype=np.float64))
        ids, z = _nucleus(z, lse, s, candidates) or _nucleus(z, lse, s, z.shape[0])
    # From here on only differences of z matter, so logits and log-probabilities read the same.
    best = float(z.max())
    weights = np.exp((z - best) / s.temperature)  # the best token weighs 1: the total is >= 1
    if s.min_p > 0:
        weights[z < best + math.log(s.min_p)] = 0.0
    j = draw(weights, u)
    return int(ids[j]) if ids is not None else j


def draw(weights: np.ndarray, u: float) -> int:
    """The first index where the running total of `weights` (>= 0, some > 0) passes u times the total.

    The totals are float64 sums of BLOCK weights at a time: only the block holding the draw is summed
    one weight at a time (a float64 running total of the whole vocabulary was half a row's time)."""
    u = min(max(u, 0.0), 1.0 - 1e-9)  # below 1: the target stays below the total
    n = weights.shape[0]
    blocks = np.add.reduceat(weights, np.arange(0, n, BLOCK), dtype=np.float64)
    ends = np.cumsum(blocks)
    target = u * ends[-1]
    b = min(int(np.searchsorted(ends, target, side="right")), len(ends) - 1)
    piece = weights[b * BLOCK: (b + 1) * BLOCK]
    inner = np.cumsum(piece, dtype=np.float64)
    j = int(np.searchsorted(inner, target - (ends[b - 1] if b else 0.0), side="right"))
    if j == len(piece):  # rounding carried the target past the block's total: its last positive weight
        j = int(np.flatnonzero(piece)[-1])
    return b * BLOCK + j
