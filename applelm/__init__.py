"""applelm: an MLX-native runtime for large language models.

    from applelm import load, generate, stream_generate
    model, tokenizer = load()                     # embedded SmolLM2-135M-Instruct
    print(generate(model, tokenizer, "Hello", max_tokens=32))
"""

__version__ = "0.1.0"

import os as _os

# OpenMP workers (MKL's and the C kernels') spin after each call, on the core MLX's own CPU thread needs
# next: sleeping at once decoded 1.05-1.31x faster on 2 cores (benchmarks/omp_wait.py). Read when OpenMP loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The C kernels hand out fixed chunks by the runtime schedule (libgomp's default: dynamic). Dynamic was not
# consistently faster on 2 cores (0.88-1.09x, benchmarks/omp_schedule.py); static keeps the earlier split.
_os.environ.setdefault("OMP_SCHEDULE", "static")

from . import _blas  # noqa: E402

_blas.preload()  # must run before mlx is first imported (Linux CPU only; see _blas.py)

from .generation import GenerationResponse, generate, generate_step, stream_generate  # noqa: E402
from .loader import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "generate_step", "GenerationResponse", "__version__"]
