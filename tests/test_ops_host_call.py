"""The compiled CPU kernels as MLX graph nodes (ops/host_call.cpp, ops/host_call.py): the same numbers as their
eager ctypes calls for every product, strided inputs, a kernel's refusal visible as NaN, and the fallbacks to
eager calls when the module is missing or does not work with this MLX."""

import mlx.core as mx
import numpy as np
import pytest
from gguf_blocks import ffn_weights, make_blocks

from applelm import native_build
from applelm.ops import cpu_native, host_call

if not cpu_native.graph_ready():
    pytest.skip("ops/host_call.cpp does not build here", allow_module_level=True)


def eager(monkeypatch, fn, *args):
    """fn(*args) with the kernels called eagerly through ctypes."""
    with monkeypatch.context() as m:
        m.setattr(cpu_native, "graph_ready", lambda: False)
        return fn(*args)


@pytest.mark.parametrize("ggml_type", list(cpu_native.TYPES))
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_products_equal_the_eager_calls(monkeypatch, ggml_type, rows):
    k = 512
    packed = mx.array(make_blocks(ggml_type, 40, k, seed=rows))
    other = mx.array(make_blocks("Q8_0", 24, k, seed=rows + 1))
    x = mx.random.normal((rows, k), key=mx.random.key(rows))
    one = cpu_native.gguf_matmul(x, packed, ggml_type, k)
    both = cpu_native.gguf_matmuls(x, [(packed, ggml_type), (other, "Q8_0")], k)
    np.testing.assert_array_equal(np.array(one), np.array(eager(monkeypatch, cpu_native.gguf_matmul, x, packed,
                                                                ggml_type, k)))
    want = eager(monkeypatch, cpu_native.gguf_matmuls, x, [(packed, ggml_type), (other, "Q8_0")], k)
    assert len(both) == len(want) == 2
    for got, w in zip(both, want):
        np.testing.assert_array_equal(np.array(got), np.array(w))


@pytest.mark.parametrize("activation", list(cpu_native.ACTIVATIONS))
def test_ffn_equals_the_eager_call(monkeypatch, activation):
    k, hidden = 256, 512
    weights = [(mx.array(p), t) for p, t in ffn_weights(k, hidden, ("Q4_K", "Q4_1", "Q6_K"), seed=3)]
    x = mx.random.normal((2, 1, k), key=mx.random.key(7)).astype(mx.bfloat16)
    got = cpu_native.gguf_ffn(x, *weights, activation)
    assert got.shape == (2, 1, k) and got.dtype == mx.bfloat16
    want = eager(monkeypatch, cpu_native.gguf_ffn, x, *weights, activation)
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))


@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_affine_equals_the_eager_call(monkeypatch, scale_dtype):
    w = mx.random.normal((48, 256), key=mx.random.key(1))
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    s, b = s.astype(scale_dtype), b.astype(scale_dtype)
    x = mx.random.normal((3, 256), key=mx.random.key(2))
    got = cpu_native.affine_matmul(x, wq, s, b, 4, 64)
    np.testing.assert_array_equal(np.array(got), np.array(eager(monkeypatch, cpu_native.affine_matmul, x, wq, s, b,
                                                                4, 64)))


def test_strided_inputs_are_read_by_value():
    """Transposed activations and every other weight row (views over other buffers) multiply as copies do."""
    packed = mx.array(make_blocks("Q4_0", 64, 128, seed=2))
    x = mx.random.normal((128, 3), key=mx.random.key(3)).T
    got = cpu_native.gguf_matmul(x, packed[::2], "Q4_0", 128)
    want = cpu_native.gguf_matmul(mx.array(np.array(x)), mx.array(np.array(packed[::2])), "Q4_0", 128)
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_a_refused_call_gives_nan():
    """A kernel refusing its arguments (here an unknown format code) fills its output with NaN."""
    fn = cpu_native._entry(cpu_native.load(), "applelm_gguf_matmul_many_entry")
    (y,) = host_call.call(fn, [mx.ones((1, 32)), mx.zeros((2, 34), mx.uint8)], [(1, 2)], [1, 32, 1, 1, 2, 99])
    assert np.isnan(np.array(y)).all()
    with pytest.raises(ValueError, match="no entry point"):
        host_call.call(0, [mx.ones((1, 32))], [(1, 2)], [])
    with pytest.raises(ValueError, match="no such input"):  # a view passed as is must name one of the inputs
        host_call.call(fn, [mx.ones((1, 32))], [(1, 2)], [], strided=(1,))


def test_without_the_module_the_kernels_run_eagerly(monkeypatch):
    monkeypatch.setitem(native_build._modules, host_call.SOURCE, None)  # as after APPLELM_GRAPH_KERNELS=off
    monkeypatch.setattr(cpu_native, "_graph", None)
    assert not cpu_native.graph_ready()
    monkeypatch.delitem(native_build._modules, host_call.SOURCE)
    monkeypatch.setenv("APPLELM_GRAPH_KERNELS", "off")
    monkeypatch.setattr(cpu_native, "_graph", None)
    assert host_call.module() is None and not cpu_native.graph_ready()


def test_a_module_that_fails_its_check_is_not_used(monkeypatch):
    """A nanobind that does not match MLX's makes the module refuse MLX arrays (TypeError): warned, then eager."""
    def refuse(*args):
        raise TypeError("incompatible function arguments")

    monkeypatch.setattr(host_call, "call", refuse)
    monkeypatch.setattr(cpu_native, "_graph", None)
    with pytest.warns(UserWarning, match="run eagerly"):
        assert not cpu_native.graph_ready()
    packed = make_blocks("Q8_0", 8, 64, seed=1)
    x = mx.random.normal((1, 64), key=mx.random.key(4))
    np.testing.assert_array_equal(np.array(cpu_native.gguf_matmul(x, mx.array(packed), "Q8_0", 64)),
                                  cpu_native.matmul_numpy(np.array(x), packed, "Q8_0"))
