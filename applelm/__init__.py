"""applelm: an MLX-native runtime for large language models.

    from applelm import load, generate, stream_generate
    model, tokenizer = load()                     # embedded SmolLM2-135M-Instruct
    print(generate(model, tokenizer, "Hello", max_tokens=32))
"""

__version__ = "0.1.0"

from . import _blas

_blas.preload()  # must run before mlx is first imported (Linux CPU only; see _blas.py)

from .generation import GenerationResponse, generate, generate_step, stream_generate  # noqa: E402
from .loader import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "generate_step", "GenerationResponse", "__version__"]
