"""Model definitions written directly in MLX, one file per architecture.

Each module exports `ModelArgs` (a dataclass with `from_dict`) and `Model` (with `sanitize(weights)`).
"""

import importlib

from ..errors import UnsupportedError

# config.json model_type (or GGUF general.architecture, translated by the loader) -> module name.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}


def get_architecture(model_type: str):
    """The module implementing `model_type`, or a clear error listing what is supported."""
    name = ARCHITECTURES.get(model_type)
    if name is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedError(f"model architecture '{model_type}' is not supported (supported: {supported})")
    return importlib.import_module(f"{__name__}.{name}")
