"""Per-row sampling of the batch engine (applelm/batch_sample.py): the same filters as make_sampler,
exact frequencies by inverting the distribution, and the wide-nucleus fallback."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from applelm.batch_sample import SamplingParams, sample_row
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
