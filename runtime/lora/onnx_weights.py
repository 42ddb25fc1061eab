"""Read named initializers of an ONNX file without the onnx package: a minimal protobuf reader over mmap.

Only what locating weights needs: ModelProto.graph (field 7) -> GraphProto.initializer (5) -> TensorProto
dims (1), data_type (2), float_data (4), int32_data (5), name (8), raw_data (9), external_data (13),
data_location (14). Tensor bytes are never copied while scanning; `read` returns a NumPy view or copy of one.
Reference: the protobuf wire format (varints, length-delimited fields) and onnx/onnx.proto.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelFolderError

DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64}   # onnx element types


def _varint(buf, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at pos."""
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited payload) over buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = (pos, pos + size), pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


@dataclass(frozen=True)
class Tensor:
    """Where one initializer's values live: inline bytes of model.onnx, or a range of an external data file."""
    name: str
    dtype: np.dtype
    shape: tuple
    file: Path
    offset: int
    length: int
    encoding: str = "raw"          # raw | float_data | int32_data (fp16 values as varints)


class OnnxWeights:
    """The initializers of one ONNX graph, readable by name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.tensors = {t.name: t for t in self._scan()}
        except (ValueError, IndexError) as e:
            raise ModelFolderError(f"{self.path}: not a readable ONNX file ({e})") from None

    def _scan(self):
        """Every TensorProto under ModelProto.graph.initializer."""
        buf = self._map
        for number, wire, value in _fields(buf, 0, len(buf)):
            if number == 7 and wire == 2:
                for n, w, v in _fields(buf, *value):
                    if n == 5 and w == 2:
                        yield self._tensor(buf, *v)

    def _tensor(self, buf, start: int, end: int) -> Tensor:
        """One TensorProto's location."""
        dims, dtype, name, where, external, location = [], 0, "", None, {}, 0
        for n, w, v in _fields(buf, start, end):
            if n == 1:
                dims += [v] if w == 0 else _packed_varints(buf, *v)
            elif n == 2:
                dtype = v
            elif n == 8:
                name = bytes(buf[v[0]:v[1]]).decode("utf-8")
            elif n in (4, 5, 9) and w == 2:
                where = (v, {4: "float_data", 5: "int32_data", 9: "raw"}[n])
            elif n == 13:
                entry = {k: bytes(buf[a:b]).decode("utf-8") for k, _, (a, b) in _fields(buf, *v)}
                external[entry.get(1, "")] = entry.get(2, "")
            elif n == 14:
                location = v
        np_type = np.dtype(DTYPES.get(dtype, np.uint8))
        if location == 1:
            count = int(np.prod(dims)) if dims else 1
            return Tensor(name, np_type, tuple(dims), self.path.parent / external["location"],
                          int(external.get("offset", 0)), int(external.get("length", count * np_type.itemsize)))
        (a, b), encoding = where if where else ((start, start), "raw")
        return Tensor(name, np_type, tuple(dims), self.path, a, b - a, encoding)

    def read(self, name: str) -> np.ndarray:
        """The values of initializer `name` (read-only, a copy: safe to keep after this reader is closed)."""
        t = self.tensors[name]
        if t.file == self.path:
            data = self._map[t.offset:t.offset + t.length]
        else:
            with open(t.file, "rb") as f:
                f.seek(t.offset)
                data = f.read(t.length)
        if t.encoding == "int32_data":                 # fp16 bit patterns stored as varints
            values = np.array(_packed_varints(data, 0, len(data)), dtype=np.uint16).view(t.dtype)
        else:
            values = np.frombuffer(data, dtype=np.float32 if t.encoding == "float_data" else t.dtype)
        return values.astype(t.dtype, copy=False).reshape(t.shape)

    def close(self) -> None:
        """Release the mapping."""
        self._map.close()


def _packed_varints(buf, start: int, end: int) -> list:
    """The varints of a packed repeated field."""
    out, pos = [], start
    while pos < end:
        v, pos = _varint(buf, pos)
        out.append(v)
    return out
