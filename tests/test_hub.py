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
