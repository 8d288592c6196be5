"""Drop-in quantized modules for the loader's quantize swap; model files never branch on formats.

`make_quantized_module(module, spec)` turns an nn.Linear / nn.Embedding into the module for its
quantization; the real bytes then arrive through `model.load_weights(..., strict=True)`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..errors import UnsupportedError
from . import dispatch
from .reference import dequantize, ggml_type_info


def _row_bytes(ggml_type: str, n_cols: int, where: str) -> int:
    t = ggml_type_info(ggml_type, where)
    if n_cols % t.block_size:
        raise UnsupportedError(
            f"{where or 'tensor'}: {n_cols} columns are not a whole number of {ggml_type} blocks of {t.block_size}"
        )
    return t.row_bytes(n_cols)


class GGUFLinear(nn.Module):
    """y = x @ W.T (+ bias) with W kept as the GGUF file's packed bytes.

    Parameters: `weight` uint8 (out_features, row_bytes), optional `bias` (float, out_features).
    """

    def __init__(self, in_features: int, out_features: int, ggml_type: str, bias: bool = False,
                 name: str = ""):
        super().__init__()
        self.ggml_type, self.in_features, self.out_features = ggml_type, in_features, out_features
        self.weight = mx.zeros((out_features, _row_bytes(ggml_type, in_features, name)), dtype=mx.uint8)
        if bias:
            self.bias = mx.zeros((out_features,))
        self.freeze()  # packed bytes are not trainable

    def __call__(self, x: mx.array) -> mx.array:
        y = dispatch.gguf_matmul(x, self["weight"], self.ggml_type, self.in_features)
        if "bias" in self:
            y = y + self["bias"].astype(y.dtype)
        return y

    @classmethod
    def from_linear(cls, linear: nn.Linear, ggml_type: str, name: str = "") -> "GGUFLinear":
        """A GGUFLinear shaped like `linear`, zero-filled; load the file's bytes with load_weights."""
        out_features, in_features = linear.weight.shape
        layer = cls(in_features, out_features, ggml_type, bias="bias" in linear, name=name)
        if "bias" in linear:
            layer.bias = linear.bias
        return layer

    def to_dense(self, dtype: mx.Dtype = mx.float32) -> nn.Linear:
        """An nn.Linear holding the dequantized weight (for backends where dense is faster)."""
        dense = nn.Linear(self.in_features, self.out_features, bias="bias" in self)
        dense.weight = dequantize(self["weight"], self.ggml_type, self.in_features).astype(dtype)
        if "bias" in self:
            dense.bias = self["bias"]
        return dense

    def _extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, ggml_type={self.ggml_type}, bias={'bias' in self}"


class GGUFEmbedding(nn.Module):
    """Embedding table kept as packed GGUF rows; lookups dequantize only the gathered rows.

    Parameter: `weight` uint8 (num_embeddings, row_bytes). `dtype` is the dtype of looked-up rows.
    """

    def __init__(self, num_embeddings: int, dims: int, ggml_type: str, dtype: mx.Dtype = mx.float32,
                 name: str = ""):
        super().__init__()
        self.ggml_type, self.num_embeddings, self.dims, self.dtype = ggml_type, num_embeddings, dims, dtype
        self.weight = mx.zeros((num_embeddings, _row_bytes(ggml_type, dims, name)), dtype=mx.uint8)
        self.freeze()

    def __call__(self, ids: mx.array) -> mx.array:
        return dispatch.gguf_embedding(ids, self["weight"], self.ggml_type, self.dims, self.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        """x @ table.T: the tied output head, through the same quantized matmul as GGUFLinear."""
        return dispatch.gguf_matmul(x, self["weight"], self.ggml_type, self.dims)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, ggml_type: str, name: str = "") -> "GGUFEmbedding":
        num, dims = embedding.weight.shape
        return cls(num, dims, ggml_type, name=name)

    def to_dense(self) -> nn.Embedding:
        """An nn.Embedding holding the dequantized table, in this layer's output dtype."""
        dense = nn.Embedding(self.num_embeddings, self.dims)
        dense.weight = dequantize(self["weight"], self.ggml_type, self.dims).astype(self.dtype)
        return dense

    def _extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dims}, ggml_type={self.ggml_type}"


class AffineQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear (same parameters: weight, scales, biases, bias) whose matmul goes through
    dispatch.affine_matmul: our decode kernel where the benchmark table chose it, else MLX's."""

    def __call__(self, x: mx.array) -> mx.array:
        y = dispatch.affine_matmul(x, self["weight"], self["scales"], self["biases"], self.bits, self.group_size)
        if "bias" in self:
            y = y + self["bias"]
        return y


class AffineQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied-head product (as_linear) goes through dispatch.affine_matmul, as
    AffineQuantizedLinear's does; lookups stay MLX's (they decode only the gathered rows)."""

    def as_linear(self, x: mx.array) -> mx.array:
        if self.mode != "affine" or self.get("biases") is None:
            return super().as_linear(x)
        return dispatch.affine_matmul(x, self["weight"], self["scales"], self["biases"], self.bits, self.group_size)


# The gated FFNs' activations by name: the fused CPU kernel computes the same function in C. "relu" is the
# ReLU family's gated FFN (ReluLLaMA-style checkpoints): exact zeros, which neuron-level flash paging skips.
ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": nn.gelu_approx, "relu": nn.relu}


def shared_input(x: mx.array, *layers: nn.Module) -> list[mx.array]:
    """[layer(x) for layer in layers] (q, k and v of one input, say): one kernel call where the layers are all
    packed GGUF rows that the device's kernel takes, else each layer as usual."""
    if len(layers) > 1 and all(type(layer) is GGUFLinear for layer in layers) and len(
            {layer.in_features for layer in layers}) == 1:
        outs = dispatch.gguf_matmuls(x, [(layer["weight"], layer.ggml_type) for layer in layers],
                                     layers[0].in_features)
        return [y + layer["bias"].astype(y.dtype) if "bias" in layer else y for y, layer in zip(outs, layers)]
    return [layer(x) for layer in layers]


def gated_ffn(x: mx.array, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
              activation: str) -> mx.array:
    """down_proj(act(gate_proj(x)) * up_proj(x)), act one of ACTIVATIONS: one kernel call where all three are
    packed GGUF rows the CPU kernel takes, else the three layers and MLX's activation."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown FFN activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    if all(type(p) is GGUFLinear and "bias" not in p for p in (gate_proj, up_proj, down_proj)):
        y = dispatch.gguf_ffn_fused(x, *((p["weight"], p.ggml_type) for p in (gate_proj, up_proj, down_proj)),
                                    activation)
        if y is not None:
            return y
    return down_proj(ACTIVATIONS[activation](gate_proj(x)) * up_proj(x))


def make_quantized_module(module: nn.Module, spec: dict) -> nn.Module:
    """The quantized replacement for `module` (nn.Linear or nn.Embedding) described by `spec`.

    spec: {"mode": "gguf", "ggml_type": "Q4_K"} -> GGUFLinear / GGUFEmbedding;
          {"mode": "affine", "bits": b, "group_size": g} -> AffineQuantizedLinear / AffineQuantizedEmbedding;
          {"mode": "mxfp4" | other MLX mode, ...} -> module.to_quantized(...).
    An optional "name" (tensor or layer name) is used in error messages. Unsupported GGML types raise
    applelm.errors.UnsupportedError naming the type and the tensor.
    """
    mode = spec.get("mode", "affine")
    name = spec.get("name", "")
    is_linear, is_embedding = isinstance(module, nn.Linear), isinstance(module, nn.Embedding)
    if not (is_linear or is_embedding):
        raise UnsupportedError(f"{name or type(module).__name__}: cannot quantize a {type(module).__name__}")
    if mode == "gguf":
        ggml_type = spec["ggml_type"]
        ggml_type_info(ggml_type, name)
        if is_linear:
            return GGUFLinear.from_linear(module, ggml_type, name=name)
        return GGUFEmbedding.from_embedding(module, ggml_type, name=name)
    group_size, bits = spec.get("group_size"), spec.get("bits")
    if mode == "affine":
        if is_linear:
            return AffineQuantizedLinear.from_linear(module, group_size, bits)
        return AffineQuantizedEmbedding.from_embedding(module, group_size, bits)
    try:
        return module.to_quantized(group_size=group_size, bits=bits, mode=mode)
    except ValueError as e:
        raise UnsupportedError(f"{name or type(module).__name__}: quantization mode {mode!r}: {e}") from None
