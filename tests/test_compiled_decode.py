"""The compiled decode path (static caches + mx.compile) gives exactly the plain path's tokens."""

from __future__ import annotations

import mlx.core as mx
import pytest
from gguf import GGMLQuantizationType as Q

from gguf_fixtures import write_tiny_llama_gguf
from kernel_calls import GRAPH_MODES, record_calls

from applelm.cache import StaticKVCache
from applelm.generation import compile_by_default, generate_step
from applelm.loader import load
from applelm.ops import cpu_native
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


@pytest.mark.parametrize("graph", GRAPH_MODES)
def test_gguf_model_compiled_equals_plain(tmp_path, monkeypatch, graph):
    """Packed GGUF layers through the CPU kernels: the compiled step (which traces graph-node kernels, and
    swaps eager ones for MLX ops) gives the plain path's tokens, and traces the kernels in graph mode."""
    write_tiny_llama_gguf(tmp_path / "tiny.gguf", {"attn_output": Q.Q8_0, "ffn_down": Q.Q5_1}, seed=5)
    model, _ = load(tmp_path / "tiny.gguf")
    calls = record_calls(monkeypatch, graph)
    prompt = mx.array([5, 9, 14, 3])
    plain = [t for t, _ in generate_step(prompt, model, max_tokens=12, compile=False)]
    assert "matmuls" in calls and "ffn" in calls  # q, k, v in one call; the whole FFN in another
    calls.clear()
    list(generate_step(prompt, model, max_tokens=1, compile=False))
    prefill_and_first = calls.count("ffn")
    calls.clear()
    compiled = [t for t, _ in generate_step(prompt, model, max_tokens=12, compile=True)]
    assert compiled == plain
    # The plain prefill and first step, then, in graph mode, once more for the trace of both layers.
    assert calls.count("ffn") == prefill_and_first + (2 if graph else 0)


def test_compile_by_default(monkeypatch):
    """On the CPU: where the kernels are graph nodes or absent, not where they run only eagerly; never for a
    flash model (its paging reads between layers)."""
    model, _ = build_tiny("llama")
    monkeypatch.setattr(cpu_native, "graph_ready", lambda: True)
    assert compile_by_default(model)
    monkeypatch.setattr(cpu_native, "graph_ready", lambda: False)
    assert compile_by_default(model) == (cpu_native.load() is None)
    monkeypatch.setattr(cpu_native, "load", lambda: None)
    assert compile_by_default(model)
    model.flash = object()
    assert not compile_by_default(model)
