"""Quantized-matmul ops: one kernel source built for Metal and CUDA, with a plain-MLX reference path."""
