"""The C decode-attention kernel (ops/attention_cpu.c as a graph node) against MLX's fused call: shapes, masks,
strided views of a cache buffer, thread counts, what it refuses, and the switch that turns it off."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from applelm.ops import cpu_attention, cpu_native, host_call
from test_decode_attention import SHAPES, masks, qkv

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="the C kernel does not build here")


def fused(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=None if isinstance(mask, str) else mask)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["none", "causal", "bool", "bool 2d"])
def test_kernel_equals_fused(shape, kind):
    q, k, v = qkv(*shape)
    mask = masks(shape[0], shape[-1])[kind]
    scale = shape[3] ** -0.5
    assert cpu_attention.takes(q, k, v, mask)
    got = cpu_attention.decode_attention(q, k, v, scale=scale, mask=mask)
    assert got.shape == q.shape and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(fused(q, k, v, scale, mask)), atol=2e-6, rtol=1e-5)


def test_views_of_a_cache_buffer_read_in_place():
    """Keys and values as the caches hand them out: the used columns of a wider buffer, a transposed layout, and
    every second element of a wider head (a stride in the innermost axis)."""
    q, k, v = qkv(3, 6, 2, 32, 200, seed=1)
    mask = masks(3, 120)["bool"]
    views = {"columns": (k[:, :, :120], v[:, :, :120]),
             "transposed": tuple(mx.array(np.ascontiguousarray(np.array(a[:, :, :120]).transpose(0, 2, 1, 3)))
                                 .transpose(0, 2, 1, 3) for a in (k, v)),
             "inner stride": tuple(mx.repeat(a[:, :, :120], 2, axis=3)[..., ::2] for a in (k, v))}
    want = fused(q, k[:, :, :120], v[:, :, :120], 0.2, mask)
    for name, (kk, vv) in views.items():
        got = cpu_attention.decode_attention(q, kk, vv, scale=0.2, mask=mask)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("shape", [(16, 9, 3, 64, 300), (1, 4, 1, 256, 700)], ids=["by kv head", "by head"])
def test_same_result_whatever_the_thread_count(monkeypatch, shape):
    """Tasks per (row, kv head), or per query head when those are fewer than the threads: the same bits."""
    q, k, v = qkv(*shape, seed=2)
    outs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("APPLELM_NATIVE_THREADS", threads)
        outs.append(np.array(cpu_attention.decode_attention(q, k, v, scale=0.125, mask=None)))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_masked_keys_get_no_weight_and_a_fully_masked_row_weighs_all_alike():
    q, k, v = qkv(2, 4, 2, 8, 6, seed=3)
    mask = mx.array([[True, True, False, True, True, True], [False] * 6])[:, None, None]
    loud = mx.concatenate([v[:, :, :2], v[:, :, 2:3] * 1e4, v[:, :, 3:]], axis=2)
    a = cpu_attention.decode_attention(q, k, v, scale=0.3, mask=mask)
    b = cpu_attention.decode_attention(q, k, loud, scale=0.3, mask=mask)
    np.testing.assert_allclose(np.array(a)[0], np.array(b)[0], atol=1e-6)
    # row 1 attends to nothing: the plain mean of its values, as MLX's masked softmax gives
    mean = np.array(v[1]).mean(axis=1)  # (kv_heads, D)
    np.testing.assert_allclose(np.array(a)[1, :, 0], np.repeat(mean, 2, axis=0), atol=1e-6)
    np.testing.assert_allclose(np.array(a), np.array(fused(q, k, v, 0.3, mask)), atol=1e-6)


@pytest.mark.parametrize("case", ["two queries", "bfloat16", "additive mask", "mask per head", "heads not grouped"])
def test_takes_only_what_it_computes(case):
    q, k, v = qkv(2, 6, 2, 16, 10)
    mask = None
    if case == "two queries":
        q = mx.repeat(q, 2, axis=2)
    elif case == "bfloat16":
        q, k, v = (a.astype(mx.bfloat16) for a in (q, k, v))
    elif case == "additive mask":
        mask = masks(2, 10)["additive"]
    elif case == "mask per head":
        mask = mx.ones((2, 6, 1, 10), dtype=mx.bool_)
    else:
        k, v = qkv(2, 6, 4, 16, 10)[1:]
    assert not cpu_attention.takes(q, k, v, mask)
    with pytest.raises(ValueError):
        cpu_attention.decode_attention(q, k, v, scale=0.25, mask=mask)


def test_refused_arguments_give_nan():
    """A primitive cannot raise: arguments the C code refuses (6 heads over 4 kv heads) fill the output with NaN."""
    q, k, v = qkv(1, 6, 4, 16, 10)
    (out,) = host_call.call(cpu_attention.entry(), [q, k, v], [(1, 6, 1, 16)], [1, 6, 4, 16, 10, 0, 0, 1],
                            strided=(1, 2))
    assert np.isnan(np.array(out)).all()


def test_switched_off_or_without_graph_nodes(monkeypatch):
    monkeypatch.setenv("APPLELM_CPU_ATTENTION", "off")
    assert not cpu_attention.available()
    monkeypatch.delenv("APPLELM_CPU_ATTENTION")
    monkeypatch.setattr(cpu_native, "graph_ready", lambda: False)
    assert not cpu_attention.available()
