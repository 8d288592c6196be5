"""applelm.convert: tiny models of every architecture, from safetensors folders and GGUF, load back with applelm
and with mlx-lm; mixed recipes' per-layer widths are honoured by both; bad arguments fail in one line."""

from __future__ import annotations

import importlib.util
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from applelm.convert import convert, main
from applelm.errors import UserError
from applelm.generation import generate_step
from applelm.loader import load_model
from conftest import ARCHS, build_tiny
from gguf_fixtures import write_tiny_llama_gguf
from hf_fixtures import WORDS, save_folder, write_word_tokenizer

X = mx.array([[1, 5, 9, 33, 2, 70, 11, 12]])
HAVE_TOKENIZER = importlib.util.find_spec("applelm.tokenizer") is not None
def source(tmp_path, arch, **overrides):
    """A float32 tiny model saved as an HF folder with a tokenizer; returns (model, folder)."""
    model, config = build_tiny(arch, max_position_embeddings=128, **overrides)  # mlx-lm's Qwen3 needs the field
    folder = save_folder(model, config, tmp_path / f"src-{arch}")
    write_word_tokenizer(folder)
    return model, folder


def max_err(model, ref_logits) -> float:
    return float(mx.abs(model(X) - ref_logits).max())


def mlx_lm_model(folder):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    return mlx_lm_load_model(folder)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_each_architecture(tmp_path, arch):
    model, src = source(tmp_path, arch)
    ref = model(X)
    scale = float(mx.abs(ref).max())
    errs = {}
    for bits in (8, 4):
        out = tmp_path / f"q{bits}"
        r = convert(src, out, bits=bits, group_size=32, progress=False)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
        assert cfg["quantization_config"] == cfg["quantization"]
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(r.tokenizer_files)
        ours, _, _ = load_model(out)
        assert isinstance(ours.layers[0].mlp.down_proj, nn.QuantizedLinear)
        errs[bits] = max_err(ours, ref)
        # mlx-lm computes in the file's float16; ours too when asked: then the two agree closely.
        half, _, _ = load_model(out, dtype="float16")
        assert float(mx.abs(mlx_lm_model(out)(X) - half(X)).max()) < 0.02 * scale + 1e-3
    assert errs[8] < errs[4] < 0.5 * scale, errs
    assert errs[8] < 0.05 * scale, errs
    tokens = [t for t, _ in generate_step(mx.array([1, 5, 9]), ours, max_tokens=5)]
    assert len(tokens) == 5 and all(0 <= t < 97 for t in tokens)
    if HAVE_TOKENIZER:  # the user's path: applelm.load reads the copied tokenizer files too
        from applelm import generate, load

        model, tokenizer = load(out)
        text = generate(model, tokenizer, "w5 w6 w7", max_tokens=5)
        assert all(word in WORDS for word in text.split())


def test_same_files_as_mlx_lm_convert(tmp_path):
    """mlx-lm's own converter, same source and settings: the same quantization block and the same tensors."""
    from mlx_lm.convert import convert as mlx_lm_convert

    _, src = source(tmp_path, "qwen2")
    mlx_lm_convert(str(src), mlx_path=str(tmp_path / "theirs"), quantize=True, q_bits=4, q_group_size=32,
                   dtype="float16")
    convert(src, tmp_path / "ours", bits=4, group_size=32, fit="mlx", progress=False)
    theirs_cfg = json.loads((tmp_path / "theirs" / "config.json").read_text())
    ours_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        assert ours_cfg[key] == theirs_cfg[key]
    theirs = mx.load(str(tmp_path / "theirs" / "model.safetensors"))
    ours = mx.load(str(tmp_path / "ours" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and mx.array_equal(ours[name], theirs[name]), name


def test_mixed_recipe_per_layer_bits_honoured_by_both(tmp_path):
    model, src = source(tmp_path, "llama", num_hidden_layers=8)
    out = tmp_path / "mixed"
    r = convert(src, out, recipe="mixed_3_6", group_size=32, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (3, 32, "affine")
    # High width: embeddings, head, whole first/last block, v/down_proj of llama.cpp's sensitive layers (n=8:
    # layers 0 and 7, then every third from 1: 3, 6).
    assert q["model.embed_tokens"]["bits"] == q["lm_head"]["bits"] == 6
    assert q["model.layers.0.self_attn.q_proj"]["bits"] == q["model.layers.7.mlp.up_proj"]["bits"] == 6
    assert q["model.layers.3.self_attn.v_proj"]["bits"] == q["model.layers.6.mlp.down_proj"]["bits"] == 6
    assert q["model.layers.2.self_attn.v_proj"]["bits"] == q["model.layers.3.self_attn.q_proj"]["bits"] == 3
    assert 3 < r.bits_per_weight < 7
    ours, _, _ = load_model(out)
    theirs = mlx_lm_model(out)
    for path, module in ours.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            assert module.bits == q[path]["bits"], path
            assert dict(theirs.named_modules())[path].bits == q[path]["bits"], path
    low, _, _ = load_model(convert(src, tmp_path / "q3", bits=3, group_size=32, progress=False).out)
    assert max_err(ours, model(X)) < max_err(low, model(X))


def test_mxfp4_and_dequantize(tmp_path):
    model, src = source(tmp_path, "qwen2")
    convert(src, tmp_path / "fp4", mode="mxfp4", progress=False)
    q = json.loads((tmp_path / "fp4" / "config.json").read_text())["quantization"]
    assert q == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    ours, _, _ = load_model(tmp_path / "fp4")
    assert ours.layers[0].self_attn.q_proj.mode == "mxfp4"
    np.testing.assert_allclose(np.array(mlx_lm_model(tmp_path / "fp4")(X)), np.array(ours(X)), atol=0.05)

    r = convert(tmp_path / "fp4", tmp_path / "f16", dequantize=True, progress=False)
    cfg = json.loads((tmp_path / "f16" / "config.json").read_text())
    assert "quantization" not in cfg and cfg["torch_dtype"] == "float16" and r.bits_per_weight == 16
    dense, _, _ = load_model(tmp_path / "f16")
    assert isinstance(dense.layers[0].self_attn.q_proj, nn.Linear)
    np.testing.assert_allclose(np.array(dense(X)), np.array(ours(X)), atol=0.02)


def test_quantized_source_is_dequantized_first_and_shards(tmp_path):
    model, src = source(tmp_path, "llama")
    convert(src, tmp_path / "q8", bits=8, group_size=64, progress=False)
    out = tmp_path / "q4"
    convert(tmp_path / "q8", out, bits=4, group_size=32, max_shard_bytes=20_000, progress=False)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    ours, _, _ = load_model(out)
    assert ours.layers[0].self_attn.q_proj.group_size == 32
    assert max_err(ours, model(X)) < 0.5 * float(mx.abs(model(X)).max())
    half, _, _ = load_model(out, dtype="float16")
    np.testing.assert_allclose(np.array(mlx_lm_model(out)(X)), np.array(half(X)), atol=0.05)


def test_gguf_source(tmp_path):
    info = write_tiny_llama_gguf(tmp_path / "tiny.gguf", chat_template="{{ messages[0]['content'] }}")
    src_model, _, _ = load_model(tmp_path / "tiny.gguf")
    ids = mx.array([[3, 70, 100, 200, 5, 9]])
    ref = src_model(ids)
    out = tmp_path / "from-gguf"
    convert(tmp_path / "tiny.gguf", out, bits=8, group_size=32, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["quantization"]["bits"] == 8
    ours, _, _ = load_model(out)
    assert float(mx.abs(ours(ids) - ref).max()) < 0.05 * float(mx.abs(ref).max())
    half, _, _ = load_model(out, dtype="float16")
    np.testing.assert_allclose(np.array(mlx_lm_model(out)(ids)), np.array(half(ids)), atol=0.05)
    assert info["config"]["vocab_size"] == cfg["vocab_size"]
    if HAVE_TOKENIZER:  # the GGUF's tokenizer is saved as tokenizer.json + tokenizer_config.json
        import mlx_lm

        from applelm import load

        tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
        assert tok_cfg["chat_template"] == "{{ messages[0]['content'] }}"
        _, ours_tok = load(out)
        _, gguf_tok = load(tmp_path / "tiny.gguf")
        _, theirs_tok = mlx_lm.load(str(out))
        text = "hello world, the world"
        assert ours_tok.encode(text) == gguf_tok.encode(text) == theirs_tok.encode(text)
        assert ours_tok.eos_token_ids == gguf_tok.eos_token_ids


def test_load_and_generate_with_applelm_and_mlx_lm(tmp_path):
    """The whole path a user takes: convert, then `applelm.load` and `mlx_lm.load` with the tokenizer."""
    pytest.importorskip("applelm.tokenizer")
    import mlx_lm

    from applelm import generate, load

    _, src = source(tmp_path, "qwen3")
    out = tmp_path / "q4"
    assert main([str(src), str(out), "--bits", "4", "--group-size", "32", "--quiet"]) == 0
    model, tokenizer = load(out)
    ours = generate(model, tokenizer, "w5 w6 w7", max_tokens=6)
    m, t = mlx_lm.load(str(out))
    theirs = mlx_lm.generate(m, t, "w5 w6 w7", max_tokens=6)
    assert ours.split()[:3] == theirs.split()[:3] and len(ours.split()) >= 3


def run_cli(argv) -> int:
    """main()'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("flags,message", [
    (["--bits", "7"], "invalid choice"),
    (["--mode", "nf4"], "invalid choice"),
    (["--recipe", "mixed_9_9"], "invalid choice"),
    (["--group-size", "48"], "invalid choice"),
    (["--recipe", "mixed_3_6", "--bits", "4"], "drop --bits"),
    (["--mode", "mxfp4", "--bits", "8"], "mxfp4 is 4 bits"),
    (["--dequantize", "--bits", "4"], "--dequantize"),
    (["--max-shard-size", "lots"], "not a size"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, flags, message):
    _, src = source(tmp_path, "llama")
    code = run_cli([str(src), str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_missing_source_and_non_empty_output(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
    _, src = source(tmp_path, "llama")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(src), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--force" in err and len(err.splitlines()) == 1
    assert main([str(src), str(src), "--quiet", "--force"]) == 2  # never over the source itself
    assert "source folder" in capsys.readouterr().err
    assert main([str(src), str(out), "--quiet", "--force"]) == 0
    assert (out / "notes.txt").exists() and (out / "model.safetensors").exists()


def _random_k_blocks(quantize):
    """gguf's writer cannot quantize to K-quants: random blocks with small scales stand in (any bytes decode)."""
    from gguf_fixtures import Q

    layout = {Q.Q6_K: (210, [208]), Q.Q4_K: (144, [0, 2])}  # block bytes, offsets of its float16 scales

    def fake(arr, qtype):
        if qtype not in layout:
            return quantize(arr, qtype)
        size, scale_at = layout[qtype]
        rows, n_blocks = arr.shape[0], arr.shape[1] // 256
        raw = np.random.default_rng(1).integers(0, 256, (rows, n_blocks, size), dtype=np.uint8)
        for at in scale_at:
            raw[:, :, at:at + 2] = np.array([1e-4], dtype=np.float16).view(np.uint8)
        return raw.reshape(rows, n_blocks * size)

    return fake


def test_gguf_k_quant_source(tmp_path, monkeypatch):
    """K-quant blocks are dequantized through the ops package; a build without it says so in one line."""
    import gguf_fixtures
    from gguf_fixtures import Q

    wide = dict(gguf_fixtures.tiny_llama_config(0), hidden_size=256, intermediate_size=256, head_dim=64)
    # K-quant blocks hold 256 weights: rows must be at least that wide.
    monkeypatch.setattr(gguf_fixtures, "tiny_llama_config", lambda vocab: dict(wide, vocab_size=vocab))
    monkeypatch.setattr(gguf_fixtures.gguf.quants, "quantize", _random_k_blocks(gguf_fixtures.gguf.quants.quantize))
    write_tiny_llama_gguf(tmp_path / "k.gguf", types={"ffn_down": Q.Q6_K, "ffn_gate": Q.Q4_K}, chat_template="x")
    out = tmp_path / "out"
    try:
        src_model, _, _ = load_model(tmp_path / "k.gguf")
    except UserError as e:
        assert "Q6_K" in str(e) or "Q4_K" in str(e)
        with pytest.raises(UserError, match="Q[46]_K"):
            convert(tmp_path / "k.gguf", out, bits=8, group_size=32, progress=False)
        assert not out.exists()  # a source that fails to load leaves nothing behind
        return
    convert(tmp_path / "k.gguf", out, bits=8, group_size=32, progress=False)
    ids = mx.array([[3, 70, 100, 200, 5, 9]])
    ours, _, _ = load_model(out)
    ref = src_model(ids)
    assert float(mx.abs(ours(ids) - ref).max()) < 0.05 * float(mx.abs(ref).max())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_float_dtype_of_the_output(tmp_path, dtype):
    model, src = source(tmp_path, "llama")
    out = tmp_path / dtype
    convert(src, out, bits=4, group_size=64, dtype=dtype, progress=False)
    stored = mx.load(str(out / "model.safetensors"))
    assert stored["model.layers.0.self_attn.q_proj.scales"].dtype == getattr(mx, dtype)
    assert stored["model.norm.weight"].dtype == getattr(mx, dtype)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    theirs = mlx_lm_model(out)
    ours, _, _ = load_model(out, dtype=dtype)
    assert float(mx.abs(theirs(X) - ours(X)).max()) < 0.05 * float(mx.abs(model(X)).max())
