"""The quantize swap: replace Linear/Embedding modules by their quantized forms before weights load.

A spec per module path says what the checkpoint holds there: {"mode": "affine", "bits": 4, "group_size": 64}
(MLX's formats: affine, mxfp4, ...) or {"mode": "gguf", "ggml_type": "Q4_K"} (GGUF blocks kept as stored).
Model code never sees any of this: it calls its layers, whatever they became.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .errors import UnsupportedError


def make_quantized_module(module: nn.Module, spec: dict) -> nn.Module:
    """The quantized replacement for one Linear or Embedding (the ops package owns every format)."""
    from .ops import make_quantized_module as make

    return make(module, spec)


def swap_quantized(model: nn.Module, specs: dict[str, dict]) -> None:
    """Swap every module whose path appears in `specs`; unknown paths are an error, not silently ignored."""
    if not specs:
        return
    seen = set()

    def swap(path, module):
        spec = specs.get(path)
        if spec is None:
            return module
        seen.add(path)
        return make_quantized_module(module, spec)

    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    unknown = sorted(set(specs) - seen)
    if unknown:
        raise UnsupportedError(f"quantized weights for layers the model does not have: {', '.join(unknown[:5])}")


def specs_from_mlx_config(qconfig: dict, weights: dict[str, mx.array]) -> dict[str, dict]:
    """Per-layer specs for an MLX-quantized checkpoint: each layer with `.scales` gets the global or its own."""
    default = {k: qconfig[k] for k in ("group_size", "bits", "mode") if k in qconfig}
    specs = {}
    for name in weights:
        if not name.endswith(".scales"):
            continue
        path = name[: -len(".scales")]
        own = qconfig.get(path)
        if own is False:
            continue
        specs[path] = {**default, **own} if isinstance(own, dict) else dict(default)
    return specs


def _dense(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.QuantizedLinear):
        w = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits,
                          mode=module.mode)
        dense = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
        dense.weight = w.astype(module.scales.dtype)
        if "bias" in module:
            dense.bias = module.bias
        return dense
    if isinstance(module, nn.QuantizedEmbedding):
        w = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits,
                          mode=module.mode)
        dense = nn.Embedding(w.shape[0], w.shape[1])
        dense.weight = w.astype(module.scales.dtype)
        return dense
    if hasattr(module, "to_dense"):  # the ops package's GGUF block layers
        return module.to_dense()
    return module


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a dense one holding the same values (trades memory for speed on
    backends whose quantized kernels are slow, e.g. MLX's CPU backend)."""
    leaves = tree_map_with_path(lambda _, m: _dense(m), model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    mx.eval(model.parameters())
    return model
