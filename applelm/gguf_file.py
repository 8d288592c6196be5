"""Read a GGUF file's header, metadata and tensor table; tensor bytes stay memory-mapped until asked for.

Every length and offset is checked against the file size, so a truncated or corrupt file gives a
ModelFormatError naming what is wrong instead of a crash or a huge allocation.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFormatError, UnsupportedError
from .ops.ggml_types import GGML_TYPES, GGMLType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> (struct format, numpy dtype) for the fixed-size ones.
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass
class GGUFTensorInfo:
    """One tensor's entry: `shape` is row-major (outermost first), the reverse of GGUF's `ne` order."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int  # absolute offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


class _Cursor:
    """Bounds-checked little-endian reader over the mapped file."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise ModelFormatError(
                f"{self.path}: GGUF header is truncated or corrupt (reading {what} at byte {self.pos}, "
                f"needs {n} bytes, file has {self.size})"
            )
        view = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        return bytes(self.take(n, what)).decode("utf-8", errors="replace")

    def _strings(self, count: int, what: str) -> list[str]:
        # One tight loop: vocabularies hold 100k-260k strings, read at every load.
        buf, pos, end, out = self.buf, self.pos, self.size, []
        unpack = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                break
            (n,) = unpack(buf, pos)
            if pos + 8 + n > end:
                break
            out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
            pos += 8 + n
        self.pos = pos
        if len(out) != count:
            self.take(end + 1, what)  # raises the truncation error
        return out

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if count > self.size:  # every element takes at least one byte
                raise ModelFormatError(f"{self.path}: GGUF array {what} claims {count} elements; file is corrupt")
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype][1])
                raw = self.take(count * dtype.itemsize, what)
                return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).copy()
            if etype == _STRING:
                return self._strings(count, what)
            if etype == _ARRAY:
                return [self.value(_ARRAY, what) for _ in range(count)]
            raise ModelFormatError(f"{self.path}: GGUF array {what} has unknown element type {etype}")
        raise ModelFormatError(f"{self.path}: GGUF metadata {what} has unknown value type {vtype}")


class GGUFFile:
    """A parsed GGUF file: `metadata` (dict), `tensors` (name -> GGUFTensorInfo), raw bytes on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise ModelFormatError(f"{self.path}: cannot open: {e.strerror}") from None
        size = os.fstat(self._fh.fileno()).st_size
        if size < 24:
            raise ModelFormatError(f"{self.path}: not a GGUF file (only {size} bytes)")
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.file_size = size
        self._parse()

    def _parse(self) -> None:
        cur = _Cursor(self._map, self.path)
        magic = bytes(cur.take(4, "magic"))
        if magic != GGUF_MAGIC:
            raise ModelFormatError(f"{self.path}: bad magic {magic!r}; not a GGUF file")
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            raise UnsupportedError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        if n_tensors > self.file_size or n_kv > self.file_size:
            raise ModelFormatError(f"{self.path}: GGUF header claims {n_tensors} tensors, {n_kv} keys; corrupt")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.scalar("<I", f"type of {key}")
            self.metadata[key] = cur.value(vtype, key)

        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.scalar("<I", f"dims of {name}")
            if n_dims > 8:
                raise ModelFormatError(f"{self.path}: tensor {name} claims {n_dims} dimensions; corrupt")
            ne = [cur.scalar("<Q", f"shape of {name}") for _ in range(n_dims)]
            type_id = cur.scalar("<I", f"type of {name}")
            offset = cur.scalar("<Q", f"offset of {name}")
            ggml_type = GGML_TYPES.get(type_id)
            if ggml_type is None:
                raise UnsupportedError(f"{self.path}: tensor {name} has unknown GGML type id {type_id}")
            infos.append((name, tuple(reversed(ne)), ggml_type, offset))

        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ModelFormatError(f"{self.path}: general.alignment {alignment} is not a power of two")
        self.data_offset = (cur.pos + alignment - 1) // alignment * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            n_el = int(np.prod(shape)) if shape else 1
            if shape and shape[-1] % ggml_type.block_size:
                raise ModelFormatError(
                    f"{self.path}: tensor {name} row of {shape[-1]} is not a multiple of "
                    f"{ggml_type.name}'s block of {ggml_type.block_size}"
                )
            n_bytes = n_el // ggml_type.block_size * ggml_type.type_size
            start = self.data_offset + offset
            if start + n_bytes > self.file_size:
                raise ModelFormatError(
                    f"{self.path}: tensor {name} data ends at byte {start + n_bytes}, past the end of the "
                    f"file ({self.file_size} bytes); the file is truncated"
                )
            self.tensors[name] = GGUFTensorInfo(name, shape, ggml_type, start, n_bytes)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file, shaped (rows, row_bytes)."""
        info = self.tensors[name]
        flat = np.frombuffer(self._map, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return flat.reshape(rows, -1)

    def array(self, name: str) -> np.ndarray:
        """An unquantized tensor (F32, F16, BF16 as uint16 bits, I8-I64, F64) as a numpy view in its shape."""
        info = self.tensors[name]
        dtypes = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
                  "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}
        if info.ggml_type.name not in dtypes:
            raise UnsupportedError(f"tensor {name} is {info.ggml_type.name}, not a plain array type")
        dtype = np.dtype(dtypes[info.ggml_type.name]).newbyteorder("<")
        flat = np.frombuffer(self._map, dtype=dtype, count=info.n_elements, offset=info.offset)
        return flat.reshape(info.shape)

    def close(self) -> None:
        # Views handed out keep the map alive; closing the file handle alone is always safe.
        self._fh.close()


def gguf_or_folder(path: Path) -> Path:
    """A local model path as the loaders read it: a folder with no config.json holding exactly one .gguf
    becomes that file; a file must be a GGUF (magic checked); other folders are returned as they are."""
    path = Path(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            path = ggufs[0]
    if path.is_file():
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelFormatError(f"{path}: not a GGUF file (bad magic) and not a model folder")
    return path
