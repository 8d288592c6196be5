"""Model names users already type: Hugging Face repo ids, resolved through huggingface-hub's cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and not name.startswith((".", "/"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_repo(repo_id: str) -> Path:
    """A local snapshot folder for `repo_id`: from the cache, downloading first where the network allows."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError)
    except ImportError:
        raise UserError(f"'{repo_id}' is not a local path, and huggingface-hub is not installed") from None
    offline = _offline()
    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read per call: huggingface-hub reads it at import
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_PATTERNS, local_files_only=offline,
                                      cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        where = "offline (HF_HUB_OFFLINE=1)" if offline else "not reachable"
        raise UserError(
            f"model '{repo_id}' is not in the Hugging Face cache and the hub is {where}; "
            "download it first or pass a local path"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"model '{repo_id}' was not found on the Hugging Face hub") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"could not fetch model '{repo_id}': {e}") from None
