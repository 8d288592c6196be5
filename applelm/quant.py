"""The quantize swap: replace Linear/Embedding modules by their quantized forms before weights load.

A spec per module path says what the checkpoint holds there: {"mode": "affine", "bits": 4, "group_size": 64}
(MLX's formats: affine, mxfp4, ...) or {"mode": "gguf", "ggml_type": "Q4_K"} (GGUF blocks kept as stored).
Model code never sees any of this: it calls its layers, whatever they became.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .affine_fit import fit_affine
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


def _float_dtype(module: nn.Module) -> mx.Dtype:
    """The dtype a dequantized layer keeps: its scales' for affine; float32 where scales are integer exponents
    (mxfp4's uint8), which would otherwise make the dense weights uint8."""
    scales = module.scales.dtype
    return scales if mx.issubdtype(scales, mx.floating) else mx.float32


def _dense(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.QuantizedLinear):
        w = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits,
                          mode=module.mode, dtype=_float_dtype(module))
        dense = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
        dense.weight = w
        if "bias" in module:
            dense.bias = module.bias
        return dense
    if isinstance(module, nn.QuantizedEmbedding):
        w = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits,
                          mode=module.mode, dtype=_float_dtype(module))
        dense = nn.Embedding(w.shape[0], w.shape[1])
        dense.weight = w
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


def quantizable(module: nn.Module) -> bool:
    """A layer `quantize_model` considers (a Linear or Embedding with a weight)."""
    return hasattr(module, "to_quantized") and hasattr(module, "weight")


def quantize_model(model: nn.Module, bits: int, group_size: int, mode: str = "affine",
                   predicate: Optional[Callable[[str, nn.Module], Union[bool, dict]]] = None,
                   on_layer: Optional[Callable[[str], None]] = None, fit: str = "mlx") -> dict:
    """Quantize a dense model's Linear/Embedding layers in place; returns config.json's `quantization` block
    exactly as mlx-lm writes it: the global {group_size, bits, mode} plus an entry for each layer for which
    `predicate(path, module)` returned a dict of its own settings (False keeps a layer dense). A layer whose
    input width its group size does not divide stays dense, as in mlx-lm. `on_layer(path)` reports progress.

    fit: "mlx" rounds as mx.quantize (and so mlx-lm) does; "mse" picks each affine group's scale and bias to
    minimise the squared error (applelm.affine_fit: same format, lower error, slower)."""
    if fit not in ("mlx", "mse"):
        raise ValueError(f"fit must be 'mlx' or 'mse', got {fit!r}")
    block = {"group_size": group_size, "bits": bits, "mode": mode}
    specs = {}
    dense = {}
    for path, module in model.named_modules():
        if not quantizable(module):
            continue
        choice = True if predicate is None else predicate(path, module)
        spec = dict(choice) if isinstance(choice, dict) else dict(block)
        if choice is False or module.weight.shape[-1] % spec["group_size"] != 0:
            continue
        if isinstance(choice, dict):
            block[path] = spec
        specs[path] = spec
        dense[path] = module.weight
    swap_quantized(model, specs)
    # Evaluate layer by layer: bounded peak memory, and progress that means something (quantizing is lazy).
    for path, module in model.named_modules():
        if path in specs:
            spec = specs[path]
            if fit == "mse" and spec.get("mode", "affine") == "affine":  # replaces mx.quantize's (never computed)
                w = dense[path]
                module.weight, module.scales, module.biases = fit_affine(w, spec["bits"], spec["group_size"], w.dtype)
            mx.eval(module.parameters())
            if on_layer:
                on_layer(path)
    return block
