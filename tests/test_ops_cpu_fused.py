"""The GGUF CPU kernel's fused calls (ops/gguf_cpu.c): several products of one input (q, k, v) and the whole
gated FFN, against the kernel's single products and numpy's float64 FFN, and the model-facing helpers
(shared_input, gated_ffn) that take them on the CPU and fall back everywhere else."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf_blocks import ffn_reference, ffn_weights, make_blocks
from kernel_calls import GRAPH_MODES, record_calls
from portable_build import needs_x86_gcc, portable_function

from applelm.ops import GGUFLinear, cpu_native, dispatch, gated_ffn, shared_input

if cpu_native.load() is None:
    pytest.skip("no C compiler: the GGUF CPU kernel cannot be built here", allow_module_level=True)


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_many_products_equal_single_ones_exactly(rows):
    """Each output row is computed as the single-product call computes it, whatever the mix of formats."""
    k = 512
    weights = [(make_blocks(t, n, k, seed=i), t) for i, (t, n) in enumerate(
        [("Q4_1", 96), ("Q8_0", 33), ("Q4_K", 40), ("Q6_K", 1), ("Q5_0", 300)])]
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
    for threads in (1, 2, 5):
        got = cpu_native.matmuls_numpy(x, weights, threads=threads)
        assert [g.shape for g in got] == [(rows, w.shape[0]) for w, _ in weights]
        for g, (w, t) in zip(got, weights):
            np.testing.assert_array_equal(g, cpu_native.matmul_numpy(x, w, t, threads=1))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("types", [("Q4_1", "Q4_1", "Q4_1"), ("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q5_1", "Q4_0")])
@pytest.mark.parametrize("rows", [1, 5, 20])
def test_ffn_equals_float64_reference(act, types, rows):
    # 768: 24 row chunks, so threads share both phases. The K formats' blocks give gates of +-1000 and more,
    # where a naive exp(-g) overflows.
    k, hidden = 256, 768
    gate, up, down = ffn_weights(k, hidden, types, seed=rows)
    x = np.random.default_rng(7).standard_normal((rows, k)).astype(np.float32)
    want = ffn_reference(x, gate, up, down, act)
    got = cpu_native.ffn_numpy(x, gate, up, down, act)
    assert got.shape == (rows, k) and got.dtype == np.float32
    scale = np.abs(want).max() + 1e-9
    np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=3e-5)
    for threads in (1, 3):  # one thread per output in a fixed order: the same bits at any thread count
        np.testing.assert_array_equal(cpu_native.ffn_numpy(x, gate, up, down, act, threads=threads), got)


def test_ffn_equals_the_three_single_products():
    """The fused FFN is the unfused one: the same kernel products, the same activation, in float32."""
    k, hidden = 64, 192
    gate, up, down = ffn_weights(k, hidden, ("Q4_1", "Q4_1", "Q8_0"), seed=3)
    x = np.random.default_rng(2).standard_normal((2, k)).astype(np.float32)
    g, u = (cpu_native.matmul_numpy(x, *w) for w in (gate, up))
    h = (g / (1 + np.exp(-g)) * u).astype(np.float32)
    np.testing.assert_allclose(cpu_native.ffn_numpy(x, gate, up, down, "silu"), cpu_native.matmul_numpy(h, *down),
                               rtol=2e-5, atol=2e-6)


def test_argument_checks():
    k, hidden = 64, 96
    gate, up, down = ffn_weights(k, hidden, ("Q8_0", "Q8_0", "Q8_0"))
    x = np.ones((1, k), np.float32)
    with pytest.raises(ValueError, match="activation 'relu2'"):
        cpu_native.ffn_numpy(x, gate, up, down, "relu2")
    with pytest.raises(ValueError, match="do not chain"):  # up with fewer rows than gate: never read
        cpu_native.ffn_numpy(x, gate, (up[0][:32], "Q8_0"), down, "silu")
    with pytest.raises(ValueError, match="cannot multiply"):  # down's rows hold 64 values, not hidden
        cpu_native.ffn_numpy(x, gate, up, (make_blocks("Q8_0", k, 64), "Q8_0"), "silu")
    with pytest.raises(ValueError, match="float32"):
        cpu_native.ffn_numpy(x.astype(np.float64), gate, up, down, "silu")
    with pytest.raises(ValueError, match="1 to 8 weights"):
        cpu_native.matmuls_numpy(x, [gate] * 9)
    with pytest.raises(ValueError, match="not one of"):
        cpu_native.matmuls_numpy(x, [gate, (gate[0], "Q2_K")])
    with pytest.raises(ValueError, match="cannot multiply"):
        cpu_native.matmuls_numpy(x, [gate, down])  # down's rows hold 96 values


def gguf_linear(packed, ggml_type, k, bias=None):
    layer = GGUFLinear(k, packed.shape[0], ggml_type, bias=bias is not None)
    layer.weight = mx.array(packed)
    if bias is not None:
        layer.bias = mx.array(bias)
    return layer


@pytest.mark.parametrize("graph", GRAPH_MODES)
def test_helpers_take_one_call_and_match_the_layers(monkeypatch, graph):
    k, hidden = 64, 160
    gate, up, down = ffn_weights(k, hidden, ("Q4_1", "Q4_1", "Q4_1"), seed=9)
    layers = [gguf_linear(p, t, k) for p, t in (gate, up)] + [gguf_linear(down[0], down[1], hidden)]
    bias = np.linspace(-1, 1, hidden).astype(np.float32)
    biased = gguf_linear(up[0], up[1], k, bias)
    x = mx.random.normal((2, 3, k), key=mx.random.key(1))
    calls = record_calls(monkeypatch, graph)

    fused = gated_ffn(x, *layers, "silu")
    assert calls == ["ffn"] and fused.shape == (2, 3, k)
    calls.clear()
    both = shared_input(x, layers[0], biased)
    assert calls == ["matmuls"]
    calls.clear()
    monkeypatch.setenv("APPLELM_FUSE", "off")
    unfused = gated_ffn(x, *layers, "silu")
    assert calls == ["matmul"] * 3
    np.testing.assert_allclose(np.array(fused), np.array(unfused), rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(np.array(both[0]), np.array(layers[0](x)))
    np.testing.assert_array_equal(np.array(both[1]), np.array(biased(x)))
    calls.clear()
    assert len(shared_input(x, layers[0], biased)) == 2 and calls == ["matmul"] * 2


@pytest.mark.parametrize("graph", GRAPH_MODES)
def test_helpers_fall_back_off_the_kernel(monkeypatch, graph):
    """Dense layers, a biased FFN, mx.compile and a missing kernel all compute the plain composition (inside
    mx.compile, eager kernels give way to MLX ops; graph nodes are traced like any op)."""
    k, hidden = 32, 64
    dense = [nn.Linear(k, hidden), nn.Linear(k, hidden), nn.Linear(hidden, k)]
    x = mx.random.normal((1, 2, k), key=mx.random.key(3))
    want = dense[2](nn.gelu_approx(dense[0](x)) * dense[1](x))
    np.testing.assert_allclose(np.array(gated_ffn(x, *dense, "gelu_tanh")), np.array(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unknown FFN activation"):
        gated_ffn(x, *dense, "relu2")
    gate, up, down = ffn_weights(k, hidden, ("Q8_0", "Q8_0", "Q8_0"), seed=4)
    layers = [gguf_linear(gate[0], "Q8_0", k), gguf_linear(up[0], "Q8_0", k, np.ones(hidden, np.float32)),
              gguf_linear(down[0], "Q8_0", hidden)]
    calls = record_calls(monkeypatch, graph)
    with_bias = gated_ffn(x, *layers, "silu")  # an up bias: the three layers, each adding its bias
    want = layers[2](nn.silu(layers[0](x)) * layers[1](x))
    np.testing.assert_array_equal(np.array(with_bias), np.array(want))
    assert "ffn" not in calls
    layers[1] = gguf_linear(up[0], "Q8_0", k)
    calls.clear()
    compiled = mx.compile(lambda v: gated_ffn(v, *layers, "silu"))(x)
    assert calls == (["ffn"] if graph else [])
    np.testing.assert_allclose(np.array(compiled), np.array(gated_ffn(x, *layers, "silu")), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(cpu_native, "load", lambda: None)
    assert dispatch.gguf_ffn_fused(x, *((w, t) for w, t in (gate, up, down)), "silu") is None
    assert len(dispatch.gguf_matmuls(x, [(mx.array(gate[0]), "Q8_0")] * 2, k)) == 2


@needs_x86_gcc
def test_portable_build_of_the_fused_ffn_equals_the_vectorized_one(tmp_path):
    """The fused FFN built without AVX2 (the generic vector code, and the activation as other CPUs compile it)
    gives the AVX2 build's results to float32 rounding, every activation, gates large enough to overflow exp."""
    fn = portable_function(cpu_native.SOURCE, "applelm_gguf_ffn", cpu_native.SIGNATURES["applelm_gguf_ffn"], tmp_path)
    k, hidden, rows = 256, 512, 3
    gate, up, down = ffn_weights(k, hidden, ("Q4_K", "Q4_1", "Q6_K"), seed=11)
    x = np.random.default_rng(4).standard_normal((rows, k)).astype(np.float32)
    for act, code in cpu_native.ACTIVATIONS.items():
        out, scratch = np.empty((rows, k), np.float32), np.empty(2 * rows * hidden, np.float32)
        assert fn(x.ctypes.data, rows, k, hidden, gate[0].ctypes.data, cpu_native.TYPES[gate[1]], up[0].ctypes.data,
                  cpu_native.TYPES[up[1]], down[0].ctypes.data, cpu_native.TYPES[down[1]], code, 1,
                  scratch.ctypes.data, out.ctypes.data) == 0
        want = cpu_native.ffn_numpy(x, gate, up, down, act)
        assert np.isfinite(out).all()
        scale = np.abs(want).max()
        np.testing.assert_allclose(out / scale, want / scale, rtol=0, atol=2e-5)
