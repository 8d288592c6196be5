"""GGUF files written by the `gguf` package load with the right values: every tensor equals the gguf
package's numpy dequantization (after undoing llama.cpp's Q/K permutation), and logits match a float model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx.utils import tree_flatten

from applelm.gguf_affine import AFFINE_EXACT_TYPES, repack_affine
from applelm.gguf_file import GGUFFile
from applelm.ops import GGUFEmbedding, GGUFLinear
from applelm.loader import load_model
from applelm.models import get_architecture
from gguf_fixtures import Q, write_tiny_llama_gguf


def dequantized_params(model: nn.Module) -> dict[str, np.ndarray]:
    """Every weight of `model` (loaded with dequantize=True) as float32 numpy."""
    return {f"{path}.weight": np.array(m.weight.astype(mx.float32)) for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding, nn.RMSNorm))}


@pytest.mark.parametrize("tied", [False, True])
def test_tensors_match_gguf_reference_dequantization(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_llama_gguf(path, tied=tied)
    model, config, _ = load_model(path, dequantize=True)
    assert config["tie_word_embeddings"] is tied
    got = dequantized_params(model)
    assert set(got) == set(ref["weights"])
    for name, expected in ref["weights"].items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_quantized_tensors_stay_packed_as_the_file_stores_them(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    model, _, gguf = load_model(path)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, GGUFLinear) and layer.self_attn.q_proj.ggml_type == "Q4_0"
    assert isinstance(layer.self_attn.k_proj, GGUFLinear) and layer.self_attn.k_proj.ggml_type == "Q4_1"
    assert isinstance(layer.self_attn.v_proj, GGUFLinear) and layer.self_attn.v_proj.ggml_type == "Q8_0"
    assert isinstance(model.model.embed_tokens, GGUFEmbedding)
    # byte for byte the file's blocks (v is not row-permuted; q is, by whole rows)
    np.testing.assert_array_equal(np.array(layer.self_attn.v_proj.weight), gguf.raw("blk.0.attn_v.weight"))
    packed = sum(v.nbytes for _, v in tree_flatten(model.parameters()) if v.dtype == mx.uint8)
    in_file = sum(t.n_bytes for t in gguf.tensors.values() if t.ggml_type.name.startswith("Q"))
    assert packed == in_file


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_affine_repack_is_lossless(tmp_path, qtype):
    """Q4_0/Q4_1/Q8_0 blocks are exactly MLX affine groups of 32 (used to export GGUF to MLX folders)."""
    import gguf as gguf_pkg

    rng = np.random.default_rng(0)
    data = gguf_pkg.quants.quantize(rng.normal(size=(7, 96)).astype(np.float32), Q[qtype])
    w, s, b = repack_affine(data, qtype, 96)
    got = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), 32, AFFINE_EXACT_TYPES[qtype])
    np.testing.assert_allclose(np.array(got), gguf_pkg.quants.dequantize(data, Q[qtype]), rtol=1e-6, atol=1e-6)


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
    model, _, _ = load_model(path, dequantize=True)
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
    assert not any(isinstance(m, (GGUFLinear, GGUFEmbedding)) for _, m in model.named_modules())
    got = dequantized_params(model)
    for name, expected in ref["weights"].items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
