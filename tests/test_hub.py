"""Repo ids resolve through huggingface-hub's cache; tested offline against a cache the test populates."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from applelm.errors import UserError
from applelm.hub import looks_like_repo_id
from applelm.loader import load_model, resolve_model_path
from conftest import build_tiny
from hf_fixtures import save_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache, repo_id: str, model, config):
    """The layout huggingface-hub writes: models--org--name/{refs/main, snapshots/<commit>/files}."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    save_folder(model, config, repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)


def test_repo_id_resolves_from_local_cache_offline(tmp_path, monkeypatch):
    model, config = build_tiny("qwen3")
    populate_cache(tmp_path / "hub", "tiny-org/Tiny-Qwen3", model, config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = resolve_model_path("tiny-org/Tiny-Qwen3")
    assert path.name == COMMIT
    loaded, _, _ = load_model(path)
    x = mx.array([[4, 8, 15, 16, 23, 42]])
    np.testing.assert_allclose(np.array(loaded(x)), np.array(model(x)), rtol=1e-5, atol=1e-5)


def test_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(UserError, match="not in the Hugging Face cache.*offline"):
        resolve_model_path("mlx-community/Llama-3.2-1B-Instruct-4bit")


@pytest.mark.parametrize("name,ok", [("mlx-community/Llama-3.2-1B-Instruct-4bit", True), ("org/name", True),
                                     ("./rel/path", False), ("/abs/path", False), ("a/b/c", False),
                                     ("just-a-name", False)])
def test_repo_id_shape(name, ok):
    assert looks_like_repo_id(name) is ok


def test_full_load_and_generate_from_a_cached_repo_with_tokenizer(tmp_path, monkeypatch):
    """A complete HF-style repo (config, safetensors, tokenizer.json, tokenizer_config.json with a chat
    template) in the local cache: `load(repo_id)` and the CLI both run offline."""
    import json

    from applelm import generate, load
    from applelm.generate import main
    from applelm.loader import load_model
    from gguf_fixtures import write_tiny_llama_gguf

    from test_stream_generate import CHATML

    gguf_path = tmp_path / "tiny.gguf"
    fixture = write_tiny_llama_gguf(gguf_path, seed=2, chat_template=CHATML)
    dense, config, _ = load_model(gguf_path, dequantize=True)
    _, tokenizer = load(gguf_path)
    repo = tmp_path / "hub" / "models--tiny-org--Tiny-Chat"
    snapshot = repo / "snapshots" / COMMIT
    save_folder(dense, config, snapshot)
    tokenizer.backend.save(str(snapshot / "tokenizer.json"))
    (snapshot / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    model, tok = load("tiny-org/Tiny-Chat")
    assert tok.chat_template == CHATML and fixture["config"]["vocab_size"] == tok.vocab_size
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert generate(model, tok, prompt, max_tokens=5) == generate(dense, tokenizer, prompt, max_tokens=5)
    assert main(["--model", "tiny-org/Tiny-Chat", "--prompt", "hello", "--max-tokens", "3"]) == 0
