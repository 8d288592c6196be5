"""Every architecture on tiny random weights: cache paths agree with a full forward, and with mlx-lm."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from applelm.cache import KVCache, RotatingKVCache, make_prompt_cache
from applelm.generation import prefill
from conftest import ARCHS, TINY_CONFIGS, build_tiny

TOL = dict(atol=2e-4, rtol=2e-4)


def tokens(n: int, seed: int = 1, batch: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, TINY_CONFIGS["llama"]["vocab_size"], (batch, n)))


def close(a: mx.array, b: mx.array, **tol) -> None:
    np.testing.assert_allclose(np.array(a), np.array(b), **(tol or TOL))


def test_cache_matches_full_forward(tiny):
    _, model, _ = tiny
    x = tokens(12)
    full = model(x)
    cache = make_prompt_cache(model)
    parts = [model(x[:, :5], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(5, 12)]
    close(mx.concatenate(parts, axis=1), full)


def test_chunked_prefill_equals_one_shot(tiny):
    _, model, _ = tiny
    x = tokens(17, seed=2)
    one_cache = make_prompt_cache(model)
    one = model(x, cache=one_cache)[:, -1]
    chunk_cache = make_prompt_cache(model)
    rest = prefill(model, x, chunk_cache, step=4)
    chunked = model(rest, cache=chunk_cache)[:, -1]
    close(chunked, one)
    nxt = mx.array([[3]])
    close(model(nxt, cache=chunk_cache), model(nxt, cache=one_cache))


def test_batch_of_two_equals_two_singles(tiny):
    _, model, _ = tiny
    a, b = tokens(9, seed=3)[0], tokens(6, seed=4)[0]
    pad = a.size - b.size
    batch = mx.stack([a, mx.concatenate([mx.zeros((pad,), a.dtype), b])])
    cache = make_prompt_cache(model, left_padding=[0, pad])
    logits = model(batch, cache=cache)
    single_a = model(a[None], cache=(ca := make_prompt_cache(model)))
    single_b = model(b[None], cache=(cb := make_prompt_cache(model)))
    close(logits[0], single_a[0])
    close(logits[1, pad:], single_b[0])
    # and a decode step on top of the batched cache
    step = model(mx.array([[5], [7]]), cache=cache)
    close(step[0], model(mx.array([[5]]), cache=ca)[0])
    close(step[1], model(mx.array([[7]]), cache=cb)[0])


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_max_kv_size_is_a_sliding_window(arch):
    """A cache bounded to 6 positions computes what a 6-token sliding-window attention model computes."""
    model, _ = build_tiny(arch)
    windowed, _ = build_tiny(arch, sliding_window=6)  # same seed: same weights, windowed mask
    x = mx.concatenate([tokens(14, seed=5), tokens(3, seed=6)], axis=1)
    reference = windowed(x)
    cache = make_prompt_cache(model, max_kv_size=6)
    assert all(isinstance(c, RotatingKVCache) for c in cache)
    out = [model(x[:, :4], cache=cache)]
    out += [model(x[:, i : i + 1], cache=cache) for i in range(4, 14)]
    # a multi-token update on a wrapped ring must restore time order first
    out.append(model(x[:, 14:], cache=cache))
    close(mx.concatenate(out, axis=1), reference)


def test_gemma3_uses_rotating_cache_for_sliding_layers():
    model, config = build_tiny("gemma3")
    kinds = [type(c) for c in make_prompt_cache(model)]
    assert kinds == [RotatingKVCache, KVCache, RotatingKVCache]


def test_cache_trim():
    model, _ = build_tiny("llama")
    x = tokens(8, seed=7)
    cache = make_prompt_cache(model)
    model(x, cache=cache)
    assert all(c.trim(3) == 3 for c in cache)
    after = model(x[:, 5:6], cache=cache)
    close(after[:, -1], model(x[:, :6])[:, -1])


MLX_LM_MODULES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_mlx_lm_on_same_weights(arch):
    """mlx-lm's implementation of the same architecture, given our random weights, gives the same logits."""
    model, config = build_tiny(arch)
    ref_module = importlib.import_module(f"mlx_lm.models.{MLX_LM_MODULES[arch]}")
    ref = ref_module.Model(ref_module.ModelArgs.from_dict({"max_position_embeddings": 128, **config}))
    # mlx-lm decides some layout (e.g. Gemma's tied head) in its sanitize
    ref.load_weights(list(ref.sanitize(dict(tree_flatten(model.parameters()))).items()), strict=True)
    x = tokens(11, seed=8)
    close(model(x), ref(x), atol=1e-4, rtol=1e-4)


def test_relu_llama_matches_mlx_lm_with_relu_ffn(monkeypatch):
    """`hidden_act: relu` (ReLU-family checkpoints) computes down(relu(gate x) * up x): mlx-lm's Llama, which
    always applies SwiGLU, with its activation replaced by the same, gives the same logits; SwiGLU does not."""
    import mlx.nn as nn
    import mlx_lm.models.llama as ref_module

    model, config = build_tiny("llama", hidden_act="relu")
    ref = ref_module.Model(ref_module.ModelArgs.from_dict({"max_position_embeddings": 128, **config}))
    ref.load_weights(list(ref.sanitize(dict(tree_flatten(model.parameters()))).items()), strict=True)
    x = tokens(11, seed=8)
    silu_logits = ref(x)
    monkeypatch.setattr(ref_module, "swiglu", lambda gate, up: nn.relu(gate) * up)
    close(model(x), ref(x), atol=1e-4, rtol=1e-4)
    assert float(mx.abs(model(x) - silu_logits).max()) > 1e-2
    assert all(block.mlp.activation == "relu" for block in model.model.layers)


def test_unknown_hidden_act_is_rejected():
    from applelm.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="hidden_act"):
        build_tiny("llama", hidden_act="gelu")
