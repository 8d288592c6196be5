"""Bad input to the CLI: one clear line on stderr, exit status 2, never a traceback."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from applelm.generate import main
from conftest import build_tiny
from gguf_fixtures import write_tiny_llama_gguf
from hf_fixtures import save_folder


def run_cli(capsys, *argv: str):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_clean_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    return path


def test_missing_path(capsys, tmp_path):
    assert_clean_error(*run_cli(capsys, "--model", str(tmp_path / "nope"), "--prompt", "hi"), "does not exist")


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(*run_cli(capsys, "--model", str(tmp_path / "empty")), "no config.json")


def test_unsupported_architecture_is_named_with_the_supported_list(capsys, tmp_path):
    model, config = build_tiny("llama")
    folder = save_folder(model, {**config, "model_type": "gpt_neox"}, tmp_path / "neox")
    code, err = run_cli(capsys, "--model", str(folder))
    assert_clean_error(code, err, "gpt_neox", "llama", "qwen3", "gemma3")


def test_unsupported_gguf_architecture(capsys, tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes().replace(b"llama", b"rwkv7", 1)  # general.architecture value
    bad = tmp_path / "rwkv.gguf"
    bad.write_bytes(data)
    assert_clean_error(*run_cli(capsys, "--model", str(bad)), "rwkv7", "not supported")


def test_safetensors_header_length_past_end(capsys, tmp_path):
    model, config = build_tiny("llama")
    folder = save_folder(model, config, tmp_path / "m")
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    f.write_bytes(bytes(data))
    assert_clean_error(*run_cli(capsys, "--model", str(folder)), "header length", "past the end")


def test_safetensors_data_past_end(capsys, tmp_path):
    model, config = build_tiny("llama")
    folder = save_folder(model, config, tmp_path / "m")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_clean_error(*run_cli(capsys, "--model", str(folder)), "truncated")


def test_safetensors_header_not_json(capsys, tmp_path):
    model, config = build_tiny("llama")
    folder = save_folder(model, config, tmp_path / "m")
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    f.write_bytes(bytes(data))
    assert_clean_error(*run_cli(capsys, "--model", str(folder)), "not valid JSON")


def test_missing_shard(capsys, tmp_path):
    model, config = build_tiny("llama")
    folder = save_folder(model, config, tmp_path / "m", shards=2)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    assert_clean_error(*run_cli(capsys, "--model", str(folder)), "missing")


def test_config_not_json(capsys, tmp_path):
    model, config = build_tiny("llama")
    folder = save_folder(model, config, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    assert_clean_error(*run_cli(capsys, "--model", str(folder)), "config.json", "not valid JSON")


def test_gguf_bad_magic(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 100)
    assert_clean_error(*run_cli(capsys, "--model", str(bad)), "magic")


def test_gguf_truncated_header(capsys, tmp_path, tiny_gguf):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:2000])
    assert_clean_error(*run_cli(capsys, "--model", str(bad)), "truncated")


def test_gguf_tensor_data_past_end(capsys, tmp_path, tiny_gguf):
    bad = tmp_path / "short.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:-64])
    assert_clean_error(*run_cli(capsys, "--model", str(bad)), "past the end", "truncated")


def test_gguf_absurd_counts(capsys, tmp_path, tiny_gguf):
    data = bytearray(tiny_gguf.read_bytes())
    data[8:16] = struct.pack("<Q", 2**62)  # tensor count
    bad = tmp_path / "huge.gguf"
    bad.write_bytes(bytes(data))
    assert_clean_error(*run_cli(capsys, "--model", str(bad)), "corrupt")


def test_not_a_model_file(capsys, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    assert_clean_error(*run_cli(capsys, "--model", str(f)), "not a GGUF file")


@pytest.mark.parametrize("flags,needle", [
    (["--temp", "-1"], "--temp"), (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--max-tokens", "0"], "--max-tokens"), (["--max-tokens", "ten"], "--max-tokens"),
    (["--top-k", "-3"], "--top-k"), (["--min-p", "1"], "--min-p"), (["--max-kv-size", "0"], "--max-kv-size"),
    (["--repetition-penalty", "0"], "--repetition-penalty"), (["--dtype", "int4"], "--dtype"),
    (["--temp", "nan"], "--temp"), (["--bogus"], "unrecognized"),
])
def test_invalid_flags(capsys, flags, needle):
    with pytest.raises(SystemExit) as exc:
        main(flags)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_empty_prompt(capsys, tiny_gguf):
    assert_clean_error(*run_cli(capsys, "--model", str(tiny_gguf), "--prompt", "   "), "empty")


def test_repo_id_offline_and_not_cached(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, err = run_cli(capsys, "--model", "mlx-community/Llama-3.2-1B-Instruct-4bit")
    assert_clean_error(code, err, "not in the Hugging Face cache", "offline")


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    """End to end through the interpreter: the process exits 2 with a single line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "applelm.generate", "--model", str(tmp_path / "missing.gguf")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
