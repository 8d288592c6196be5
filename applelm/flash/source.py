"""What `prepare` reads: a GGUF file or a safetensors folder, one layer's FFN at a time.

FFN matrices come out as float32 numpy (dequantized when the checkpoint is quantized), so `prepare`
never holds more than one layer of them. Everything else (the resident part) keeps the checkpoint's
own storage (GGUF blocks stay packed, MLX-quantized layers stay quantized) with its quantize specs.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import ModelFormatError, UnsupportedError, UserError
from ..gguf_file import GGUFFile, gguf_or_folder
from ..gguf_loader import gguf_config, load_gguf
from ..mlx_folder import copy_tokenizer_files
from ..models import get_architecture
from .codec import bf16_to_f32
from .layout import GGUF_TOKENIZER_FILE

FFN_NAME = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|scales|biases|bias)$")


def is_ffn(name: str) -> bool:
    return FFN_NAME.match(name) is not None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


class Source:
    """A model checkpoint opened for `prepare` (use `open_source`)."""

    kind: str
    config: dict
    float_dtype: str  # the checkpoint's FFN float storage ("bfloat16" when that is what it holds)

    def ffn(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gate (I, H), up (I, H), down (H, I)) of one layer as float32."""
        raise NotImplementedError

    def ffn_blocks(self, layer: int) -> tuple[tuple[str, str, str], np.ndarray, np.ndarray, np.ndarray]:
        """((up, down, gate) type names, up, down, gate as the file's raw rows): GGUF files only."""
        raise UserError(f"{self.path}: --gguf-blocks keeps a GGUF file's own blocks; this is a {self.kind} "
                        "checkpoint (prepare it with --bits 16, 8 or 4)")

    def resident(self) -> tuple[dict[str, mx.array], dict[str, dict]]:
        """(non-FFN tensors under our names, as stored; quantize specs for the quantized ones)."""
        raise NotImplementedError

    def write_tokenizer(self, out: Path) -> None:
        raise NotImplementedError


class GGUFSource(Source):
    kind = "gguf"

    def __init__(self, path: Path):
        self.path = path
        self.gguf = GGUFFile(path)
        self.config = gguf_config(self.gguf)
        self.float_dtype = "float16"

    def _matrix(self, name: str) -> np.ndarray:
        from ..ops import dequantize

        info = self.gguf.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: tensor {name} is missing")
        t = info.ggml_type.name
        if t in ("F32", "F16"):
            return self.gguf.array(name).astype(np.float32)
        if t == "BF16":
            return bf16_to_f32(self.gguf.array(name))
        out = dequantize(mx.array(np.ascontiguousarray(self.gguf.raw(name))), t, info.shape[-1])
        return np.array(out)

    def ffn_biases(self, layer: int) -> None:
        for kind in ("gate", "up", "down"):
            if f"blk.{layer}.ffn_{kind}.bias" in self.gguf.tensors:
                raise UnsupportedError("flash paging does not support FFN biases")

    def ffn(self, layer: int):
        self.ffn_biases(layer)
        return tuple(self._matrix(f"blk.{layer}.ffn_{k}.weight") for k in ("gate", "up", "down"))

    def ffn_blocks(self, layer: int):
        self.ffn_biases(layer)
        names = [f"blk.{layer}.ffn_{k}.weight" for k in ("up", "down", "gate")]
        missing = [n for n in names if n not in self.gguf.tensors]
        if missing:
            raise ModelFormatError(f"{self.path}: tensor {missing[0]} is missing")
        types = tuple(self.gguf.tensors[n].ggml_type.name for n in names)
        return (types, *(self.gguf.raw(n) for n in names))

    def resident(self):
        weights, specs = load_gguf(self.gguf, self.config, include=lambda name: not is_ffn(name))
        return weights, specs

    def write_tokenizer(self, out: Path) -> None:
        meta = {k: _jsonable(v) for k, v in self.gguf.metadata.items()
                if k.startswith("tokenizer.") or k == "general.architecture"}
        if "tokenizer.ggml.model" not in meta:
            raise ModelFormatError(f"{self.path}: the GGUF file carries no tokenizer")
        (out / GGUF_TOKENIZER_FILE).write_text(json.dumps(meta))


class FolderSource(Source):
    kind = "safetensors"

    def __init__(self, folder: Path):
        from ..loader import _read_folder

        self.path = folder
        self.config, weights, specs = _read_folder(folder)
        arch = get_architecture(self.config["model_type"])
        model = arch.Model(arch.ModelArgs.from_dict(self.config))
        self.weights = model.sanitize(weights)
        self.specs = specs
        ffn_dtypes = {v.dtype for k, v in self.weights.items() if is_ffn(k) and mx.issubdtype(v.dtype, mx.floating)}
        self.float_dtype = "bfloat16" if ffn_dtypes == {mx.bfloat16} else "float16"

    def _matrix(self, path: str) -> np.ndarray:
        w = self.weights.get(f"{path}.weight")
        if w is None:
            raise ModelFormatError(f"{self.path}: tensor {path}.weight is missing")
        spec = self.specs.get(path)
        if spec is not None:
            w = mx.dequantize(w, self.weights[f"{path}.scales"], self.weights.get(f"{path}.biases"),
                              group_size=spec.get("group_size"), bits=spec.get("bits"),
                              mode=spec.get("mode", "affine"))
        return np.array(w.astype(mx.float32))

    def ffn(self, layer: int):
        base = f"model.layers.{layer}.mlp"
        if any(f"{base}.{k}_proj.bias" in self.weights for k in ("gate", "up", "down")):
            raise UnsupportedError("flash paging does not support FFN biases (mlp_bias)")
        return tuple(self._matrix(f"{base}.{k}_proj") for k in ("gate", "up", "down"))

    def resident(self):
        weights = {k: v for k, v in self.weights.items() if not is_ffn(k)}
        specs = {p: s for p, s in self.specs.items() if f"{p}.weight" in weights}
        return weights, specs

    def write_tokenizer(self, out: Path) -> None:
        if "tokenizer.json" not in copy_tokenizer_files(self.path, out):  # still usable through load_model (token ids in, logits out), not through load()
            warnings.warn(f"{self.path} has no tokenizer.json; the flash layout will have no tokenizer")


def open_source(path) -> Source:
    """A GGUF file (or a folder holding exactly one) or a Hugging Face / MLX safetensors folder."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: does not exist")
    path = gguf_or_folder(path)
    if path.is_file():
        return GGUFSource(path)
    return FolderSource(path)
