"""The safetensors file format, read through a memory map and written from numpy arrays.

Layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw tensor bytes. BF16 has no numpy dtype: it is read and written as uint16 bit patterns
and widened to float32 by `to_float32`.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

# The dtype table and the bf16 rounding are shared with the backends, which place these bits on a device: they
# live in ops/storage.py, and are handed on here under the names this module has always given them.
from ops.storage import FLOAT_DTYPES, bf16_bits_to_float32, float32_to_bf16_bits  # noqa: F401
from ops.storage import SAFETENSORS_DTYPES as DTYPES

MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read: the message names the file and the tensor."""


@dataclass(slots=True, frozen=True)
class TensorInfo:
    dtype: str  # safetensors name: "F16", "BF16", "F32", ...
    shape: tuple[int, ...]
    begin: int  # byte offset into the data section
    end: int


class SafetensorsFile:
    """One .safetensors file mapped read-only; `get(name)` returns a zero-copy numpy view."""

    def __init__(self, path: str):
        self.path = str(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot open: {e.strerror}") from e
        try:
            size = os.fstat(fd).st_size
            if size < 8:
                raise SafetensorsError(f"{self.path}: file is {size} bytes, too short to hold a safetensors header")
            self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        (header_len,) = struct.unpack("<Q", self._mmap[:8])
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsError(
                f"{self.path}: header length {header_len} does not fit in a file of {size} bytes "
                "(truncated or not a safetensors file)")
        try:
            header = json.loads(bytes(self._mmap[8:8 + header_len]))
        except ValueError as e:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({e}); the file is corrupt") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object; the file is corrupt")
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        for name, entry in header.items():
            if name == "__metadata__":
                self.metadata = dict(entry or {})
                continue
            self.tensors[name] = self._parse_entry(name, entry, data_len)

    def _parse_entry(self, name: str, entry, data_len: int) -> TensorInfo:
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed header entry: {entry!r}") from e
        if dtype not in DTYPES:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(DTYPES)}")
        nbytes = DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
        if end - begin != nbytes or begin < 0:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} of shape {list(shape)} {dtype} needs {nbytes} bytes "
                f"but its offsets span {end - begin}; the file is corrupt")
        if end > data_len:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} ends at byte {end} of the data section but the file "
                f"holds only {data_len}; the file is truncated")
        return TensorInfo(dtype, shape, begin, end)

    def keys(self):
        return self.tensors.keys()

    def get(self, name: str) -> np.ndarray:
        """Zero-copy view of the stored bytes (uint16 for BF16)."""
        info = self.tensors.get(name)
        if info is None:
            raise SafetensorsError(f"{self.path}: no tensor named {name!r}")
        dt = DTYPES[info.dtype]
        count = (info.end - info.begin) // dt.itemsize
        return np.frombuffer(self._mmap, dtype=dt, count=count,
                             offset=self._data_start + info.begin).reshape(info.shape)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Widen a stored tensor to float32; `dtype` is its safetensors name."""
    if dtype == "BF16":
        return bf16_bits_to_float32(array)
    if dtype == "F8_E4M3":
        from ops.jit.dtypes import e4m3_bits_to_float32
        return e4m3_bits_to_float32(array)
    return array.astype(np.float32)


def save_file(tensors: dict[str, np.ndarray], path: str, dtypes: dict[str, str] | None = None,
              metadata: dict[str, str] | None = None) -> None:
    """Write arrays as a safetensors file. `dtypes` overrides the stored name (e.g. "BF16" for uint16 bits)."""
    by_numpy = {v: k for k, v in DTYPES.items() if k not in ("BF16", "F8_E4M3")}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        dtype = (dtypes or {}).get(name) or by_numpy[array.dtype.newbyteorder("<")]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)
