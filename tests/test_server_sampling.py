"""Per-row sampling of the batch engine (applelm/batch_sample.py): the same filters as make_sampler,
exact frequencies by inverting the distribution, and the wide-nucleus fallback."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from applelm.batch_sample import BLOCK, SamplingParams, draw, sample_row
from applelm.sample import apply_min_p, apply_top_k, apply_top_p

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32) + 3.0  # logits: any shift


def frequencies(logits: np.ndarray, s: SamplingParams, n: int = 4000, candidates: int = 1024) -> np.ndarray:
    """Draw at n evenly spread uniforms: the frequencies are the probabilities, up to 1/n."""
    draws = [sample_row(logits, s, (i + 0.5) / n, candidates) for i in range(n)]
    return np.bincount(draws, minlength=logits.shape[0]) / n


def test_temperature_one_and_half():
    np.testing.assert_allclose(frequencies(LOGITS, SamplingParams(1.0)), PROBS, atol=1e-3)
    sq = PROBS**2 / (PROBS**2).sum()  # temperature 0.5 squares the odds
    np.testing.assert_allclose(frequencies(LOGITS, SamplingParams(0.5)), sq, atol=1e-3)


@pytest.mark.parametrize("s,kept", [
    (SamplingParams(1.0, top_p=0.5), [0]), (SamplingParams(1.0, top_p=0.8), [0, 1]),
    (SamplingParams(1.0, top_p=0.81), [0, 1, 2]), (SamplingParams(1.0, top_k=2), [0, 1]),
    (SamplingParams(1.0, min_p=0.2), [0, 1, 2]), (SamplingParams(1.0, min_p=0.7), [0]),
    (SamplingParams(1.0, top_k=3, min_p=0.4), [0, 1]),
])
def test_filters_match_make_sampler(s, kept):
    freq = frequencies(LOGITS, s)
    assert list(np.nonzero(freq)[0]) == kept
    np.testing.assert_allclose(freq[kept], PROBS[kept] / PROBS[kept].sum(), atol=1e-3)


@pytest.mark.parametrize("top_p,top_k,min_p", [(0.9, 0, 0.0), (0.5, 50, 0.0), (1.0, 7, 0.0), (0.95, 0, 0.01)])
def test_support_matches_make_sampler_filters_on_a_wide_vocabulary(top_p, top_k, min_p):
    """A flat-ish 3000-token distribution whose nucleus is wider than the 64 candidates looked at first."""
    logits = np.random.default_rng(0).normal(0, 0.5, 3000).astype(np.float32)
    lp = mx.array(logits)[None] - mx.logsumexp(mx.array(logits)[None], axis=-1, keepdims=True)
    expected = apply_min_p(apply_top_p(apply_top_k(lp, top_k), top_p), min_p)
    expected = set(np.nonzero(np.array(expected)[0] > -math.inf)[0].tolist())
    s = SamplingParams(1.0, top_p, top_k, min_p)
    got = {sample_row(logits, s, u, candidates=64) for u in np.linspace(0, 1, 3000, endpoint=False)}
    assert got <= expected and len(got) >= min(len(expected), 0.5 * len(expected) + 3)


def test_edges_of_u():
    for s in (SamplingParams(1.0), SamplingParams(0.7, top_p=0.8), SamplingParams(2.0, min_p=0.3)):
        assert sample_row(LOGITS, s, 0.0) == 0
        assert sample_row(LOGITS, s, 1.0) in (0, 1, 2, 3)
        assert sample_row(LOGITS, s, 0.999999999) != 3 or s.min_p == 0 and s.top_p == 1


def plain_draw(weights: np.ndarray, u: float) -> int:
    """The inversion `draw` makes, with one float64 running total over the whole vocabulary."""
    cum = np.cumsum(weights, dtype=np.float64)
    return min(int(np.searchsorted(cum, min(max(u, 0.0), 1.0 - 1e-9) * cum[-1], side="right")), len(cum) - 1)


def test_blocked_draw_equals_one_running_total():
    """Over several blocks, with runs of zero weights (min_p) inside and at the ends of blocks, at block
    edges and at u near 0 and 1: the same index as one running total, and never a zero weight."""
    rng = np.random.default_rng(1)
    weights = rng.exponential(1.0, 5 * BLOCK + 123).astype(np.float32)
    weights[rng.random(weights.shape) < 0.5] = 0.0
    weights[BLOCK - 40: BLOCK + 40] = 0.0  # a block ending and the next starting with zero weights
    weights[-300:] = 0.0
    cum = np.cumsum(weights, dtype=np.float64)
    edges = [cum[k * BLOCK - 1] / cum[-1] for k in range(1, 5)]
    us = np.concatenate([np.linspace(0, 1, 20001), edges, np.nextafter(edges, 0), [1e-12, 1 - 1e-12, 1.0]])
    for u in us:
        j = draw(weights, float(u))
        assert j == plain_draw(weights, float(u)) and weights[j] > 0, u
    one = np.zeros(3 * BLOCK, dtype=np.float32)
    one[BLOCK] = 2.0  # a single positive weight, first in its block
    assert {draw(one, u) for u in (0.0, 0.5, 1.0)} == {BLOCK}


def test_blocked_draw_never_lands_on_a_zero_weight_when_sums_round_apart():
    """A block total (summed pairwise) above its running total (summed in order, where each 2^-53 added
    to 1 rounds away): a target between the two falls past the block's running total, and the draw
    takes the block's last positive weight rather than a zero one."""
    weights = np.zeros(2 * BLOCK, dtype=np.float32)
    weights[0], weights[1:600], weights[BLOCK] = 1.0, 2.0**-53, 1.0
    ends = np.cumsum(np.add.reduceat(weights, [0, BLOCK], dtype=np.float64))
    running = np.cumsum(weights[:BLOCK], dtype=np.float64)[-1]
    assert ends[0] > running  # the case this test is about
    j = draw(weights, float((running + ends[0]) / 2 / ends[-1]))
    assert j == 599 and weights[j] > 0
