"""The flash layout on disk: what `prepare` writes and what the runtime reads, and its validation.

    OUT/
      flash_index.json       format, version, model config, store codec, per-layer files with CRC32s,
                             calibrated thresholds, predictor summary, and a SHA-256 of itself
      config.json            the model config (Hugging Face style), for tools that read folders
      resident.safetensors   everything that is not FFN: embeddings, norms, attention, output head
      tokenizer files        tokenizer.json & co. (from a folder) or tokenizer_gguf.json (GGUF metadata)
      ffn/layer_NNN.bin      one file per layer: bundle i at byte i * bundle_bytes (a bundle is one neuron,
                             or a chunk of neurons in the GGUF-blocks store, blocks.py), the file
                             zero-padded to a multiple of ALIGN so whole-file O_DIRECT reads are legal
      predictors.safetensors (optional) low-rank activity predictors, one per layer

Every check here raises ModelFormatError with one line naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import ModelFormatError
from .blocks import KIND as BLOCKS_KIND, BlockCodec
from .codec import BundleCodec

FORMAT = "applelm-flash"
VERSION = 1
INDEX_FILE = "flash_index.json"
RESIDENT_FILE = "resident.safetensors"
PREDICTOR_FILE = "predictors.safetensors"
GGUF_TOKENIZER_FILE = "tokenizer_gguf.json"
ALIGN = 4096  # direct I/O needs offsets, lengths and buffers aligned to the device block (<= 4096)


def layer_file(i: int) -> str:
    return f"ffn/layer_{i:03d}.bin"


def aligned(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def crc32_file(path: Path, start: int = 0, length: Optional[int] = None, chunk: int = 8 << 20) -> int:
    crc, left = 0, length
    with open(path, "rb") as fh:
        fh.seek(start)
        while left is None or left > 0:
            data = fh.read(chunk if left is None else min(chunk, left))
            if not data:
                break
            crc = zlib.crc32(data, crc)
            if left is not None:
                left -= len(data)
    return crc


def _digest(index: dict) -> str:
    body = {k: v for k, v in index.items() if k != "index_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_index(folder: Path, index: dict) -> None:
    """Write the index with its own checksum (atomically: a crash never leaves half an index)."""
    index = dict(index, index_sha256=_digest(index))
    tmp = folder / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, folder / INDEX_FILE)


def is_flash_layout(path) -> bool:
    """True when `path` is a folder holding a flash index (the runtime's detection rule)."""
    p = Path(path)
    return p.is_dir() and (p / INDEX_FILE).is_file()


@dataclass
class LayerEntry:
    path: Path
    n_bytes: int  # bundle data bytes (n_neurons * bundle_bytes)
    file_bytes: int  # on-disk size, aligned
    crc32: int


@dataclass
class FlashLayout:
    """A validated flash layout: its folder, parsed index and derived geometry."""

    folder: Path
    index: dict[str, Any]
    codec: "BundleCodec | BlockCodec"
    layers: list[LayerEntry]

    @property
    def config(self) -> dict:
        return self.index["config"]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden(self) -> int:
        return self.index["hidden_size"]

    @property
    def intermediate(self) -> int:
        return self.index["intermediate_size"]

    @property
    def blocks(self) -> bool:
        """True for a GGUF-blocks store (whole-layer paging only; see blocks.py)."""
        return isinstance(self.codec, BlockCodec)

    @property
    def n_bundles(self) -> int:
        """Bundles per layer file: neurons, or chunks of neurons in a GGUF-blocks store."""
        return self.codec.n_bundles if self.blocks else self.intermediate

    def bundle_bytes(self, layer: int) -> int:
        return self.codec.bundle_bytes_of(layer) if self.blocks else self.codec.bundle_bytes

    @property
    def resident_path(self) -> Path:
        return self.folder / self.index["resident"]["file"]

    @property
    def ffn_bytes(self) -> int:
        return sum(e.n_bytes for e in self.layers)

    def verify_data(self, layers=None) -> None:
        """Check the CRC32 of each layer's data (reads it all; `read_and_verify` in io.py does it with
        direct I/O at load time, this is the simple buffered version for tools and tests)."""
        for i in layers if layers is not None else range(self.n_layers):
            e = self.layers[i]
            got = crc32_file(e.path, 0, e.n_bytes)
            if got != e.crc32:
                raise ModelFormatError(f"{e.path}: CRC32 mismatch ({got:08x}, index says {e.crc32:08x}); "
                                       "the layer data is corrupt, run prepare again")


def _require(index: dict, key: str, kind, where: str):
    value = index.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ModelFormatError(f"{where}: field '{key}' is missing or malformed")
    return value


def _layer_bytes(codec, intermediate: int, layer: int) -> int:
    if isinstance(codec, BlockCodec):
        return codec.n_bundles * codec.bundle_bytes_of(layer)
    return intermediate * codec.bundle_bytes


def read_layout(folder) -> FlashLayout:
    """Parse and validate OUT/flash_index.json and check that every file it names exists with the size
    it records (cheap; CRCs of the layer data are checked when the data is read)."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{folder}: no {INDEX_FILE}; not a flash layout (run python -m applelm.flash "
                               "prepare)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ModelFormatError(f"{path}: not an {FORMAT} index")
    if index.get("version") != VERSION:
        raise ModelFormatError(f"{path}: flash format version {index.get('version')!r} is not supported "
                               f"(this runtime reads version {VERSION}); run prepare again")
    if index.get("index_sha256") != _digest(index):
        raise ModelFormatError(f"{path}: checksum mismatch; the index was modified or is corrupt")
    _require(index, "config", dict, str(path))
    hidden = _require(index, "hidden_size", int, str(path))
    inter = _require(index, "intermediate_size", int, str(path))
    store = _require(index, "store", dict, str(path))
    try:
        codec = (BlockCodec.from_json(hidden, inter, store) if store.get("kind") == BLOCKS_KIND
                 else BundleCodec.from_json(hidden, store))
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}") from None
    if isinstance(codec, BlockCodec) and len(codec.types) != len(_require(index, "layers", list, str(path))):
        raise ModelFormatError(f"{path}: the store names types for {len(codec.types)} layers, the index lists "
                               f"{len(index['layers'])}")
    entries = []
    for i, e in enumerate(_require(index, "layers", list, str(path))):
        try:
            entry = LayerEntry(folder / e["file"], int(e["n_bytes"]), int(e["file_bytes"]), int(e["crc32"]))
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: layer {i} entry is malformed") from None
        if entry.n_bytes != _layer_bytes(codec, inter, i) or entry.file_bytes != aligned(entry.n_bytes):
            raise ModelFormatError(f"{path}: layer {i} sizes do not match the store geometry")
        if not entry.path.is_file():
            raise ModelFormatError(f"{entry.path}: layer file is missing (layer {i}); the flash layout is "
                                   "incomplete, run prepare again")
        size = entry.path.stat().st_size
        if size != entry.file_bytes:
            raise ModelFormatError(f"{entry.path}: layer file is {size} bytes, the index says {entry.file_bytes} "
                                   "(truncated or wrong file)")
        entries.append(entry)
    if len(entries) != index["config"].get("num_hidden_layers"):
        raise ModelFormatError(f"{path}: {len(entries)} layer files for a model of "
                               f"{index['config'].get('num_hidden_layers')} layers")
    resident = _require(index, "resident", dict, str(path))
    rpath = folder / str(resident.get("file"))
    if not rpath.is_file():
        raise ModelFormatError(f"{rpath}: resident weights file is missing")
    if rpath.stat().st_size != resident.get("n_bytes"):
        raise ModelFormatError(f"{rpath}: is {rpath.stat().st_size} bytes, the index says "
                               f"{resident.get('n_bytes')} (truncated or wrong file)")
    return FlashLayout(folder, index, codec, entries)


def verify_resident(layout: FlashLayout) -> None:
    """CRC32 of resident.safetensors against the index (small next to the FFN; read once at load)."""
    want = layout.index["resident"].get("crc32")
    got = crc32_file(layout.resident_path)
    if got != want:
        raise ModelFormatError(f"{layout.resident_path}: CRC32 mismatch; the resident weights are corrupt")
