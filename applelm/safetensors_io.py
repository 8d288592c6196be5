"""Safetensors checkpoints: validate each file's header against its size, then load lazily with mx.load.

mx.load maps tensors without reading them; the bytes are read once, when the model is evaluated.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import mlx.core as mx

from .errors import ModelFormatError

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def validate_safetensors(path: Path) -> dict:
    """Check the header of one .safetensors file; returns its tensor table or raises ModelFormatError."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ModelFormatError(
                f"{path}: safetensors header length {header_len} runs past the end of the file ({size} bytes)"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - header_len
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in tensors.items():
        try:
            begin, end = info["data_offsets"]
            n_el = 1
            for d in info["shape"]:
                n_el *= int(d)
            expected = n_el * _ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: tensor {name} has a malformed header entry") from None
        if end > data_size or begin > end:
            raise ModelFormatError(
                f"{path}: tensor {name} data ({begin}..{end}) runs past the end of the file; the file is truncated"
            )
        if end - begin != expected:
            raise ModelFormatError(f"{path}: tensor {name} holds {end - begin} bytes, its shape needs {expected}")
    return tensors


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's shards: those the index names if there is one, else every model*.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelFormatError(f"{index}: not a valid safetensors index") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelFormatError(f"{folder}: shard(s) named in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder}: no *.safetensors weight files found")
    return files


def load_safetensors(folder: Path) -> dict[str, mx.array]:
    """All tensors of a folder's shards, validated and lazily loaded."""
    weights: dict[str, mx.array] = {}
    for f in weight_files(folder):
        validate_safetensors(f)
        try:
            weights.update(mx.load(os.fspath(f)))
        except (RuntimeError, ValueError) as e:
            raise ModelFormatError(f"{f}: cannot be read as safetensors ({e})") from None
    return weights
