"""Samplers and logits processors against hand-computed values; generate_step against a plain loop."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from applelm.generation import generate_step
from applelm.sample import (apply_min_p, apply_top_k, apply_top_p, make_repetition_penalty, make_sampler)
from conftest import build_tiny

PROBS = [0.5, 0.3, 0.15, 0.05]
LP = mx.log(mx.array([PROBS]))


def kept(lp: mx.array) -> list[int]:
    return [i for i, v in enumerate(np.array(lp)[0]) if v > -math.inf]


def test_top_k():
    assert kept(apply_top_k(LP, 2)) == [0, 1]
    assert kept(apply_top_k(LP, 0)) == [0, 1, 2, 3]


@pytest.mark.parametrize("p,expected", [(0.5, [0]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_top_p(p, expected):
    # a token stays while the mass of strictly more likely tokens is below p
    assert kept(apply_top_p(LP, p)) == expected


def test_top_p_keeps_original_order():
    lp = mx.log(mx.array([[0.05, 0.15, 0.5, 0.3]]))
    assert kept(apply_top_p(lp, 0.8)) == [2, 3]


@pytest.mark.parametrize("min_p,expected", [(0.2, [0, 1, 2]), (0.7, [0]), (0.0, [0, 1, 2, 3])])
def test_min_p(min_p, expected):
    assert kept(apply_min_p(LP, min_p)) == expected


def test_greedy_and_sampling_frequencies():
    assert int(make_sampler(0.0)(LP)[0]) == 0
    mx.random.seed(0)
    sample = make_sampler(temp=1.0)
    draws = np.array(sample(mx.broadcast_to(LP, (20000, 4))))
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, PROBS, atol=0.015)
    # temperature 0.5 squares the odds: p_i^2 / sum p^2
    draws = np.array(make_sampler(temp=0.5)(mx.broadcast_to(LP, (20000, 4))))
    sq = np.array(PROBS) ** 2
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, sq / sq.sum(), atol=0.015)


def test_filters_compose_in_sampler():
    mx.random.seed(1)
    draws = np.array(make_sampler(temp=1.0, top_k=3, min_p=0.4)(mx.broadcast_to(LP, (5000, 4))))
    assert set(draws.tolist()) <= {0, 1}


def test_invalid_sampler_settings():
    for kwargs in [dict(temp=-1), dict(temp=1, top_p=0), dict(temp=1, top_k=-1), dict(temp=1, min_p=1.0)]:
        with pytest.raises(ValueError):
            make_sampler(**kwargs)


def test_repetition_penalty_hand_computed():
    logits = mx.array([[2.0, -1.0, 0.5, 3.0]])
    out = make_repetition_penalty(2.0)(mx.array([[0, 1, 1]]), logits)
    np.testing.assert_allclose(np.array(out), [[1.0, -2.0, 0.5, 3.0]])


def test_generate_step_greedy_equals_plain_loop():
    model, _ = build_tiny("llama")
    prompt = mx.array([3, 14, 15, 92, 6])
    ours = [t for t, _ in generate_step(prompt, model, max_tokens=8, prefill_step_size=2)]
    seq = prompt.tolist()
    for _ in range(8):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1])))
    assert ours == seq[5:]


def test_generate_step_logprobs_are_normalized():
    model, _ = build_tiny("qwen2")
    for _, lp in generate_step(mx.array([1, 2, 3]), model, max_tokens=2):
        assert abs(float(mx.logsumexp(lp)) ) < 1e-4


def test_seeded_sampling_is_reproducible():
    model, _ = build_tiny("gemma3")
    prompt = mx.array([5, 6, 7])

    def run(seed):
        mx.random.seed(seed)
        return [t for t, _ in generate_step(prompt, model, max_tokens=12, sampler=make_sampler(temp=1.5))]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_repetition_penalty_in_generation_equals_plain_loop():
    model, _ = build_tiny("llama")
    prompt = mx.array([1, 1, 2, 1])
    penalty = make_repetition_penalty(3.0, context_size=5)
    ours = [t for t, _ in generate_step(prompt, model, max_tokens=10, logits_processors=[penalty])]
    seq = prompt.tolist()
    for _ in range(10):
        logits = model(mx.array([seq]))[:, -1]
        seq.append(int(mx.argmax(penalty(mx.array([seq]), logits)[0])))
    assert ours == seq[4:]
    assert ours != [t for t, _ in generate_step(prompt, model, max_tokens=10)]


def test_generate_step_rejects_bad_prompt():
    model, _ = build_tiny("llama")
    with pytest.raises(ValueError):
        next(generate_step(mx.array([], dtype=mx.int32), model))
