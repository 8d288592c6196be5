"""GGUF files written by the `gguf` package load with the right values: every tensor equals the gguf
package's numpy dequantization (after undoing llama.cpp's Q/K permutation), and logits match a float model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from applelm.gguf_file import GGUFFile
from applelm.loader import load_model
from applelm.models import get_architecture
from gguf_fixtures import Q, write_tiny_llama_gguf


def dequantized_params(model: nn.Module) -> dict[str, np.ndarray]:
    """Every weight of `model` as float32 numpy, quantized layers dequantized."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            out[f"{path}.weight"] = np.array(w.astype(mx.float32))
        elif isinstance(m, (nn.Linear, nn.Embedding, nn.RMSNorm)):
            out[f"{path}.weight"] = np.array(m.weight.astype(mx.float32))
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_tensors_match_gguf_reference_dequantization(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_llama_gguf(path, tied=tied)
    model, config, _ = load_model(path)
    assert config["tie_word_embeddings"] is tied
    got = dequantized_params(model)
    assert set(got) == set(ref["weights"])
    for name, expected in ref["weights"].items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
    # Quantized tensors stay quantized: 4-bit where the file is Q4_*, 8-bit for Q8_0.
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == 4
    assert isinstance(layer.self_attn.v_proj, nn.QuantizedLinear) and layer.self_attn.v_proj.bits == 8
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)


def test_logits_match_float_model_built_from_reference(tmp_path):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_llama_gguf(path, seed=3)
    model, config, _ = load_model(path)
    arch = get_architecture("llama")
    float_model = arch.Model(arch.ModelArgs.from_dict({**config}))
    float_model.load_weights([(k, mx.array(v)) for k, v in ref["weights"].items()], strict=True)
    x = mx.array([[5, 17, 200, 3, 99, 42, 7]])
    np.testing.assert_allclose(np.array(model(x)), np.array(float_model(x)), rtol=1e-4, atol=1e-4)


def test_all_float_types(tmp_path):
    path = tmp_path / "f.gguf"
    ref = write_tiny_llama_gguf(path, types={k: Q.F32 for k in ("attn_q", "attn_k", "token_embd")} |
                                {k: Q.F16 for k in ("attn_v", "ffn_gate", "ffn_up", "output")})
    model, _, _ = load_model(path)
    got = dequantized_params(model)
    for name, expected in ref["weights"].items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_reader_matches_gguf_package(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    assert ours.metadata["general.architecture"] == "llama"
    assert ours.metadata["llama.block_count"] == 2
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.offset == t.data_offset and info.n_bytes == t.n_bytes
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert info.ggml_type.name == t.tensor_type.name


def test_dequantize_option_gives_dense_layers_with_same_values(tmp_path):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_llama_gguf(path, seed=5)
    model, _, _ = load_model(path, dequantize=True)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    got = dequantized_params(model)
    for name, expected in ref["weights"].items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
