"""The compiled decode path (static caches + mx.compile) gives exactly the plain path's tokens."""

from __future__ import annotations

import mlx.core as mx
import pytest

from applelm.cache import StaticKVCache
from applelm.generation import generate_step
from applelm.sample import make_sampler
from conftest import ARCHS, build_tiny


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt_len", [1, 9])
def test_compiled_equals_plain_greedy(arch, prompt_len):
    model, _ = build_tiny(arch)
    prompt = mx.array([(7 * i + 3) % 90 for i in range(prompt_len)])
    # 16 new tokens: past gemma3's 5-token sliding window, so window masks are exercised too
    plain = [t for t, _ in generate_step(prompt, model, max_tokens=16, compile=False)]
    compiled = [t for t, _ in generate_step(prompt, model, max_tokens=16, compile=True)]
    assert compiled == plain


def test_compiled_equals_plain_sampled_with_seed():
    model, _ = build_tiny("qwen3")
    prompt = mx.array([4, 5, 6])

    def run(compile_):
        mx.random.seed(3)
        return [t for t, _ in generate_step(prompt, model, max_tokens=12, sampler=make_sampler(1.0),
                                            compile=compile_)]

    assert run(True) == run(False)


def test_compiled_logprobs_match_plain():
    model, _ = build_tiny("llama")
    prompt = mx.array([1, 2, 3, 4])
    a = [lp for _, lp in generate_step(prompt, model, max_tokens=6, compile=False)]
    b = [lp for _, lp in generate_step(prompt, model, max_tokens=6, compile=True)]
    for x, y in zip(a, b):
        assert float(mx.abs(x - y).max()) < 1e-4


def test_falls_back_to_plain_when_bounded_cache_requested():
    model, _ = build_tiny("llama")
    prompt = mx.array([1, 2, 3])
    bounded = [t for t, _ in generate_step(prompt, model, max_tokens=8, max_kv_size=4, compile=True)]
    plain = [t for t, _ in generate_step(prompt, model, max_tokens=8, max_kv_size=4, compile=False)]
    assert bounded == plain


def test_static_cache_state_and_trim():
    model, _ = build_tiny("llama")
    cache = [StaticKVCache(10) for _ in model.layers]
    x = mx.array([[1, 2, 3, 4]])
    full = model(x)
    model(x[:, :3], cache=cache)
    assert cache[0].state[0].shape[2] == 3
    assert all(c.trim(1) == 1 for c in cache)
    out = model(x[:, 2:4], cache=cache)
    assert float(mx.abs(out[:, -1] - full[:, -1]).max()) < 1e-4
