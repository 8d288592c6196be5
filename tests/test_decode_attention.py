"""The CPU's decode attention (the C kernel and the grouped products) against MLX's fused call, and which one
the models use."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from applelm.batch_cache import make_batch_cache
from applelm.cache import make_prompt_cache
from applelm.models import base
from applelm.ops import cpu_attention
from conftest import ARCHS, build_tiny

SHAPES = [(1, 9, 3, 64, 175), (4, 4, 1, 256, 40), (16, 14, 2, 64, 130), (2, 8, 8, 32, 7), (3, 6, 2, 16, 1)]


def qkv(b, heads, kv_heads, dim, keys, dtype=mx.float32, seed=0):
    k0, k1, k2 = mx.random.split(mx.random.key(seed), 3)
    return (mx.random.normal((b, heads, 1, dim), key=k0).astype(dtype),
            mx.random.normal((b, kv_heads, keys, dim), key=k1).astype(dtype),
            mx.random.normal((b, kv_heads, keys, dim), key=k2).astype(dtype))


def masks(b: int, keys: int) -> dict:
    padded = mx.arange(keys)[None] >= mx.array([i % 3 for i in range(b)])[:, None]  # (B, T): row i skips i % 3
    return {"none": None, "causal": "causal", "bool": padded[:, None, None],
            "additive": mx.where(padded, 0.0, -1e9)[:, None, None], "bool 2d": padded[:1]}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["none", "causal", "bool", "additive", "bool 2d"])
def test_grouped_equals_fused(shape, kind):
    q, k, v = qkv(*shape)
    mask = masks(shape[0], shape[-1])[kind]
    scale = shape[3] ** -0.5
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=None if kind == "causal" else mask)
    got = base.grouped_decode_attention(q, k, v, scale=scale, mask=mask)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6, rtol=1e-5)


def test_masked_keys_get_no_weight():
    """A key the mask excludes changes nothing, whatever its values (hand-built: it is made huge)."""
    q, k, v = qkv(2, 4, 2, 8, 6)
    mask = (mx.arange(6) != 2)[None, None, None]
    big = mx.concatenate([k[:, :, :2], k[:, :, 2:3] * 1e4, k[:, :, 3:]], axis=2)
    loud = mx.concatenate([v[:, :, :2], v[:, :, 2:3] * 1e4, v[:, :, 3:]], axis=2)
    a = base.grouped_decode_attention(q, k, v, scale=0.3, mask=mask)
    b = base.grouped_decode_attention(q, big, loud, scale=0.3, mask=mask)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6)


def test_half_precision_close():
    q, k, v = qkv(2, 9, 3, 64, 150, dtype=mx.bfloat16)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=None).astype(mx.float32)
    got = base.grouped_decode_attention(q, k, v, scale=0.125, mask=None)
    assert got.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want), atol=2e-2)


@pytest.fixture
def calls(monkeypatch):
    """The CPU paths the dispatcher takes, by name ("kernel" or "grouped"), in call order."""
    seen = []
    for name, module, attr in [("grouped", base, "grouped_decode_attention"),
                               ("kernel", cpu_attention, "decode_attention")]:
        real = getattr(module, attr)
        monkeypatch.setattr(module, attr,
                            lambda *a, _real=real, _name=name, **kw: seen.append(_name) or _real(*a, **kw))
    return seen


KERNEL = pytest.param(True, id="kernel", marks=pytest.mark.skipif(not cpu_attention.available(),
                                                                  reason="the C kernel does not build here"))


@pytest.mark.parametrize("kernel", [KERNEL, pytest.param(False, id="no kernel")])
@pytest.mark.parametrize("heads, kv_heads, queries, dtype, with_kernel, without", [
    (9, 3, 1, mx.float32, "kernel", "grouped"), (8, 8, 1, mx.float32, "kernel", None),
    (9, 3, 4, mx.float32, None, None), (9, 3, 1, mx.bfloat16, "grouped", "grouped"),
    (4, 1, 1, mx.float32, "grouped", "grouped")])
def test_dispatch(calls, monkeypatch, kernel, heads, kv_heads, queries, dtype, with_kernel, without):
    """One float32 query a row takes the kernel where it runs and the (row, kv head) pairs are at least the
    threads (2 here); else grouped heads take the grouped products; the rest (None) MLX's fused call."""
    monkeypatch.setattr(cpu_attention, "available", lambda: kernel)
    monkeypatch.setenv("APPLELM_NATIVE_THREADS", "2")
    q, k, v = qkv(1, heads, kv_heads, 16, 20, dtype=dtype)
    q = mx.repeat(q, queries, axis=2)
    base.scaled_dot_product_attention(q, k, v, scale=0.25, mask=None if queries == 1 else "causal")
    want = with_kernel if kernel else without
    assert calls == ([want] if want else [])


def test_dispatch_leaves_gpu_to_fused(calls, monkeypatch):
    monkeypatch.setattr(base.mx, "default_device", lambda: mx.Device(mx.gpu))
    q, k, v = qkv(1, 9, 3, 16, 20)
    with mx.stream(mx.cpu):  # the check only reads the default device; compute here stays on the CPU
        base.scaled_dot_product_attention(q, k, v, scale=0.25, mask=None)
    assert not calls


def fused_only(monkeypatch):
    monkeypatch.setattr(base, "grouped_decode_attention",
                        lambda q, k, v, *, scale, mask: mx.fast.scaled_dot_product_attention(
                            q, k, v, scale=scale, mask=None if isinstance(mask, str) else mask))


@pytest.mark.parametrize("arch", ARCHS)
def test_models_decode_alike_every_way(arch, calls, monkeypatch):
    """Every architecture's cached decode (single and batched caches) gives the same logits through the C
    kernel (where it runs), the grouped products and MLX's fused call."""
    monkeypatch.setenv("APPLELM_NATIVE_THREADS", "2")  # the kernel's share of work, whatever the machine
    model, _ = build_tiny(arch)
    x = mx.array(np.random.default_rng(3).integers(0, 100, (2, 9)))

    def decode(cache):
        model(x[:, :6], cache=cache)
        return mx.concatenate([model(x[:, i:i + 1], cache=cache) for i in range(6, 9)], axis=1)

    def both():
        return [decode(make_prompt_cache(model)), decode(make_batch_cache(model, [0, 2]))]

    ways = {}
    if cpu_attention.available():
        ways["kernel"] = both()
        assert set(calls) == {"kernel"}, "the decode steps did not take the kernel"
        calls.clear()
    with monkeypatch.context() as m:
        m.setattr(cpu_attention, "available", lambda: False)
        ways["grouped"] = both()
        assert set(calls) == {"grouped"}, "the decode steps did not take the grouped products"
        fused_only(m)
        ways["fused"] = both()
    for name, got in ways.items():
        for a, b in zip(got, ways["fused"]):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=1e-5, err_msg=name)
