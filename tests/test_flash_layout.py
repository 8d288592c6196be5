"""The flash layout: bundle contents, codecs, prepare from GGUF and folders, the CLIs, and clear errors
(exit 2 from the CLI) for corrupt or missing files."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from applelm.errors import ModelFormatError
from applelm.flash.__main__ import main as flash_main
from applelm.flash.codec import BundleCodec
from applelm.flash.layout import ALIGN, INDEX_FILE, read_layout
from applelm.generate import main as generate_main
from applelm.loader import load_model
from flash_fixtures import tiny_flash
from gguf_fixtures import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def gguf_layout(tmp_path_factory):
    """A tiny Llama GGUF (with tokenizer, quantized attention and FFN) prepared through the CLI."""
    root = tmp_path_factory.mktemp("flash_gguf")
    path = root / "tiny.gguf"
    ref = write_tiny_llama_gguf(path)
    out = root / "flash"
    assert flash_main(["prepare", str(path), str(out), "--quiet", "--calibration-tokens", "64"]) == 0
    return path, ref, out


def run_cli(main, capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse rejects a flag before main's error handling runs
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if line]) == 1, err
    for needle in needles:
        assert needle in err, err


def test_bundles_hold_up_row_down_column_gate_row(tmp_path):
    source, config, out = tiny_flash(tmp_path, "llama", bits=32, predictors=False)
    layout = read_layout(out)
    assert layout.codec.bundle_bytes == 3 * 64 * 4
    for i, entry in enumerate(layout.layers):
        data = entry.path.read_bytes()
        assert len(data) % ALIGN == 0 and len(data) == entry.file_bytes
        bundles = np.frombuffer(data[: entry.n_bytes], np.uint8).reshape(96, -1)
        parts = layout.codec.decode_np(bundles, 3)
        mlp = source.layers[i].mlp
        np.testing.assert_array_equal(parts[:, 0], np.array(mlp.up_proj.weight))
        np.testing.assert_array_equal(parts[:, 1], np.array(mlp.down_proj.weight).T)
        np.testing.assert_array_equal(parts[:, 2], np.array(mlp.gate_proj.weight))
    idx = layout.index
    assert idx["format"] == "applelm-flash" and idx["version"] == 1 and idx["config"]["num_hidden_layers"] == 2
    assert len(idx["sparsity"]["thresholds"]) == 2 and all(np.diff(t).min() >= 0 for t in idx["sparsity"]["thresholds"])


@pytest.mark.parametrize("bits,dtype,tol", [(16, "float16", 1e-3), (16, "bfloat16", 8e-3), (8, "affine", 2e-2),
                                            (4, "affine", 0.3)])
def test_codecs_round_trip_and_mlx_matches_numpy(bits, dtype, tol):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (10, 3, 128)).astype(np.float32)
    codec = BundleCodec.for_bits(128, bits, dtype if bits == 16 else "float16")
    raw = codec.encode(w)
    assert raw.shape == (10, codec.bundle_bytes)
    back = codec.decode_np(raw, 3)
    assert np.abs(back - w).max() < tol * (1 if bits != 4 else np.abs(w).max())
    via_mlx = np.stack([np.array(p) for p in codec.decode_mx(mx.array(raw), 3, mx.float32)], axis=1)
    np.testing.assert_allclose(via_mlx, back, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(codec.decode_np(raw[:, : 2 * codec.part_bytes], 2), back[:, :2])


def test_gguf_prepare_and_generate_from_the_layout_alone(gguf_layout, capsys):
    path, ref, out = gguf_layout
    idx = json.loads((out / INDEX_FILE).read_text())
    assert idx["resident"]["quantized"]["model.layers.0.self_attn.q_proj"]["ggml_type"] == "Q4_0"
    assert (out / "tokenizer_gguf.json").is_file()
    # FFN bundles hold the GGUF's dequantized values (float16 of d*q+m).
    layout = read_layout(out)
    e = layout.layers[1]
    parts = layout.codec.decode_np(np.frombuffer(e.path.read_bytes()[: e.n_bytes], np.uint8).reshape(96, -1), 3)
    np.testing.assert_allclose(parts[:, 2], ref["weights"]["model.layers.1.mlp.gate_proj.weight"], atol=2e-3)
    np.testing.assert_allclose(parts[:, 1], ref["weights"]["model.layers.1.mlp.down_proj.weight"].T, atol=2e-3)
    # The flash layout computes what the GGUF computes.
    x = mx.array([[1, 40, 200, 7]])
    direct, _, _ = load_model(path)
    flash, _, _ = load_model(out)
    np.testing.assert_allclose(np.array(flash(x)), np.array(direct(x)), rtol=2e-3, atol=2e-3)
    code, text, err = run_cli(generate_main, capsys, "--model", str(out), "--prompt", "hello", "--max-tokens", "5",
                              "--memory-budget", "1MB", "--ignore-chat-template", "-v")
    assert code == 0, err
    assert "flash:" in err and "MB/token" in err
    code, spread, err = run_cli(generate_main, capsys, "--model", str(out), "--prompt", "hello", "--max-tokens", "5",
                                "--memory-budget", "1MB", "--ignore-chat-template", "--pin-layout", "spread")
    assert code == 0 and spread == text, err
    code, _, err = run_cli(generate_main, capsys, "--model", str(out), "--prompt", "hello", "--memory-budget", "1MB",
                           "--pin-layout", "middle")
    assert code == 2 and "--pin-layout" in err
    code, text, err = run_cli(flash_main, capsys, "verify", str(out))
    assert code == 0 and "verified" in text


def corrupt(src, tmp_path, how):
    out = tmp_path / "bad"
    shutil.copytree(src, out)
    idx_path = out / INDEX_FILE
    layer0 = out / "ffn" / "layer_000.bin"
    if how == "truncated":
        data = layer0.read_bytes()
        layer0.write_bytes(data[: len(data) - ALIGN])
    elif how == "bad-json":
        idx_path.write_text(idx_path.read_text()[:-20])
    elif how == "index-checksum":
        idx = json.loads(idx_path.read_text())
        idx["layers"][0]["crc32"] ^= 1
        idx_path.write_text(json.dumps(idx))
    elif how == "data-crc":
        data = bytearray(layer0.read_bytes())
        data[100] ^= 0xFF
        layer0.write_bytes(bytes(data))
    elif how == "missing-layer":
        (out / "ffn" / "layer_001.bin").unlink()
    elif how == "missing-resident":
        (out / "resident.safetensors").unlink()
    elif how == "resident-crc":
        data = bytearray((out / "resident.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (out / "resident.safetensors").write_bytes(bytes(data))
    return out


CASES = {"truncated": "truncated", "bad-json": "not valid JSON", "index-checksum": "checksum mismatch",
         "data-crc": "CRC32 mismatch", "missing-layer": "missing", "missing-resident": "missing",
         "resident-crc": "CRC32 mismatch"}


@pytest.mark.parametrize("how", list(CASES))
def test_corrupt_or_missing_files_are_clear_errors(gguf_layout, tmp_path, capsys, how):
    out = corrupt(gguf_layout[2], tmp_path, how)
    with pytest.raises(ModelFormatError, match=CASES[how]):
        load_model(out, memory_budget="1MB")
    code, _, err = run_cli(generate_main, capsys, "--model", str(out), "--prompt", "hi", "--max-tokens", "2",
                           "--memory-budget", "1MB")
    assert_clean_error(code, err, CASES[how])


def test_cli_size_and_budget_errors(gguf_layout, capsys):
    out = gguf_layout[2]
    for bad in ("2 G B", "-1GB", "1e9", "0", "lots"):
        code, _, err = run_cli(generate_main, capsys, "--model", str(out), "--memory-budget", bad)
        assert_clean_error(code, err, "--memory-budget")
    code, _, err = run_cli(generate_main, capsys, "--model", str(out), "--memory-budget", "2KB", "--prompt", "hi")
    assert_clean_error(code, err, "below the minimum", "bytes")


def test_prepare_cli_errors(tmp_path, capsys):
    code, _, err = run_cli(flash_main, capsys, "prepare", str(tmp_path / "nope.gguf"), str(tmp_path / "out"))
    assert_clean_error(code, err, "does not exist")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    code, _, err = run_cli(flash_main, capsys, "prepare", str(path), str(tmp_path / "full"))
    assert_clean_error(code, err, "not empty")
    code, _, err = run_cli(flash_main, capsys, "prepare", str(path), str(tmp_path / "o"), "--bits", "3")
    assert code == 2
