"""Quantized-matmul ops: one kernel source built for Metal and CUDA, with a plain-MLX reference path.

Public API: GGUFLinear, GGUFEmbedding, AffineQuantizedLinear, AffineQuantizedEmbedding, make_quantized_module
(the loader's quantize swap), shared_input / gated_ffn (products the models compute together: one call of the
CPU kernel for packed GGUF rows), gguf_matmul / gguf_embedding / affine_matmul (device dispatch), dequantize
(reference), SUPPORTED.
"""

from .dispatch import affine_matmul, backend, gguf_embedding, gguf_matmul
from .layers import (AffineQuantizedEmbedding, AffineQuantizedLinear, GGUFEmbedding, GGUFLinear, gated_ffn,
                     make_quantized_module, shared_input)
from .reference import SUPPORTED, dequantize

__all__ = [
    "AffineQuantizedEmbedding", "AffineQuantizedLinear", "GGUFEmbedding", "GGUFLinear", "SUPPORTED", "affine_matmul", "backend",
    "dequantize", "gated_ffn", "gguf_embedding", "gguf_matmul", "make_quantized_module", "shared_input",
]
