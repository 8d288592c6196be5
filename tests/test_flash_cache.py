"""The windowing neuron cache: slot-swap deletion keeps the cached set exact and dense, never reallocates."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from applelm.flash.neuron_cache import NeuronCache

N, H = 200, 8


def values(neurons: np.ndarray) -> list[np.ndarray]:
    """Part vectors that identify their neuron: part p of neuron n is filled with n + 1000 p."""
    return [np.repeat((neurons + 1000.0 * p)[:, None], H, axis=1).astype(np.float32) for p in range(2)]


def check(cache: NeuronCache) -> None:
    n = cache.count
    ids = cache.neuron_at[:n]
    assert len(set(ids.tolist())) == n and (ids >= 0).all() and (cache.neuron_at[n:] == -1).all()
    np.testing.assert_array_equal(cache.slot_of[ids], np.arange(n))
    assert (cache.slot_of >= 0).sum() == n
    for p, part in enumerate(cache.parts):  # the MLX arrays see what the numpy views wrote
        np.testing.assert_array_equal(np.array(part[:n])[:, 0], ids + 1000.0 * p)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_window_keeps_exactly_the_recent_neurons(window):
    rng = np.random.default_rng(window)
    cache = NeuronCache(N, capacity=N, n_parts=2, hidden=H, dtype=mx.float32, window=window)
    pointers = [r.ctypes.data for r in cache.rows]
    history = []
    for step in range(60):
        active = np.unique(rng.choice(N, size=rng.integers(1, 40), replace=False))
        history.append(set(active.tolist()))
        to_insert, overflow = cache.plan(active)
        assert len(overflow) == 0
        cache.insert(to_insert, values(to_insert))
        check(cache)
        assert set(cache.cached().tolist()) == set().union(*history[-window:])
    assert [r.ctypes.data for r in cache.rows] == pointers  # the neuron matrix was never reallocated
    assert all(p.shape == (N, H) for p in cache.parts)


def test_capacity_evicts_least_recently_used_and_overflows():
    cache = NeuronCache(N, capacity=30, n_parts=2, hidden=H, dtype=mx.float32, window=10)
    first = np.arange(20)
    cache.insert(*(lambda t: (t[0], values(t[0])))(cache.plan(first)))
    second = np.arange(100, 120)
    to_insert, overflow = cache.plan(second)
    assert len(to_insert) == 20 and len(overflow) == 0
    cache.insert(to_insert, values(to_insert))
    check(cache)
    assert set(cache.cached().tolist()) == set(range(10, 20)) | set(range(100, 120))  # 0..9 were oldest
    big = np.arange(150, 190)  # more than the capacity: the rest is used once, uncached
    to_insert, overflow = cache.plan(big)
    assert len(to_insert) == 30 and len(overflow) == 10
    cache.insert(to_insert, values(to_insert))
    check(cache)


def test_delete_moves_tail_into_holes():
    cache = NeuronCache(N, capacity=10, n_parts=2, hidden=H, dtype=mx.float32, window=100)
    ids = np.arange(50, 60)
    cache.insert(*(lambda t: (t[0], values(t[0])))(cache.plan(ids)))
    cache.delete(np.array([2]))
    assert cache.neuron_at[2] == 59 and cache.count == 9  # the last slot moved into the hole
    cache.delete(np.array([0, 8, 3]))
    check(cache)
    assert set(cache.cached().tolist()) == {51, 54, 55, 56, 57, 59}  # slots 0, 8, 3 held 50, 58, 53
