"""Quantized-matmul ops: one kernel source built for Metal and CUDA, with a plain-MLX reference path.

Public API: GGUFLinear, GGUFEmbedding, AffineQuantizedLinear, AffineQuantizedEmbedding, make_quantized_module
(the loader's quantize swap), gguf_matmul / gguf_embedding / affine_matmul (device dispatch), dequantize
(reference), SUPPORTED.
"""

from .dispatch import affine_matmul, backend, gguf_embedding, gguf_matmul
from .layers import AffineQuantizedEmbedding, AffineQuantizedLinear, GGUFEmbedding, GGUFLinear, make_quantized_module
from .reference import SUPPORTED, dequantize

__all__ = [
    "AffineQuantizedEmbedding", "AffineQuantizedLinear", "GGUFEmbedding", "GGUFLinear", "SUPPORTED", "affine_matmul", "backend",
    "dequantize", "gguf_embedding", "gguf_matmul", "make_quantized_module",
]
