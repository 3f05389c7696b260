"""The JIT language's element types: how each is stored (numpy dtype of the array), named in CUDA C, and
converted to and from the float32 registers every computation runs in (bf16 and fp8 travel as raw bits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ops import storage


@dataclass(frozen=True)
class DType:
    name: str
    storage: np.dtype     # the numpy dtype of an array holding this type (bf16: uint16 bits, fp8: uint8 bits)
    c_storage: str        # the C type of one stored element
    c_register: str       # the C type it is computed in
    is_float: bool

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    def __repr__(self) -> str:
        return self.name


float32 = DType("float32", storage.STORAGE["float32"], "float", "float", True)
float16 = DType("float16", storage.STORAGE["float16"], "unsigned short", "float", True)
bfloat16 = DType("bfloat16", storage.STORAGE["bfloat16"], "unsigned short", "float", True)
float8_e4m3 = DType("float8_e4m3", np.dtype(np.uint8), "unsigned char", "float", True)
int32 = DType("int32", np.dtype(np.int32), "int", "int", False)
bool_ = DType("bool", np.dtype(np.bool_), "bool", "bool", False)
ALL = (float32, float16, bfloat16, float8_e4m3, int32, bool_)
_BY_NAME = {d.name: d for d in ALL}
# numpy storage dtype -> language type, for arrays handed to a kernel; uint16 is taken as bfloat16 (CuPy has
# no bf16 dtype, so the engine keeps bf16 as uint16 bits) and uint8 as fp8 E4M3
_BY_STORAGE = {np.dtype(np.float32): float32, np.dtype(np.float16): float16, np.dtype(np.uint16): bfloat16,
               np.dtype(np.uint8): float8_e4m3, np.dtype(np.int32): int32, np.dtype(np.bool_): bool_}


def of_array(array) -> DType:
    """The language type of an array (numpy or cupy) by its storage dtype."""
    try:
        return _BY_STORAGE[np.dtype(array.dtype)]
    except KeyError:
        allowed = ", ".join(str(k) for k in _BY_STORAGE)
        raise TypeError(f"jit kernels take arrays of {allowed} (uint16 = bfloat16 bits, uint8 = fp8 e4m3 bits); "
                        f"got {array.dtype}") from None


def get(name_or_dtype) -> DType:
    if isinstance(name_or_dtype, DType):
        return name_or_dtype
    if isinstance(name_or_dtype, str) and name_or_dtype in _BY_NAME:
        return _BY_NAME[name_or_dtype]
    raise TypeError(f"unknown jit dtype {name_or_dtype!r}; known: {', '.join(_BY_NAME)}")


def promote(a: DType, b: DType) -> DType:
    """Result type of a binary op: any float wins over int (computed in float32 registers); bool is the lowest."""
    if a == b:
        return a
    order = (bool_, int32)
    if a in order and b in order:
        return int32
    return float32


# host conversions: the interpreter's loads and stores, bit for bit as the generated CUDA does them

bf16_bits_to_float32 = storage.bf16_bits_to_float32


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even (cvt.rn.bf16.f32); NaN becomes the canonical quiet NaN, as the instruction gives it."""
    return np.where(np.isnan(x), np.uint16(0x7FC0), storage.float32_to_bf16_bits(x))


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp.astype(np.float64) - 7))
    value = np.where((exp == 0xF) & (man == 0x7), np.nan, value)  # E4M3 has NaN at S.1111.111 and no infinity
    return (sign * value).astype(np.float32)


E4M3_VALUES = _e4m3_table()  # code -> float32
E4M3_MAX = 448.0


def e4m3_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return E4M3_VALUES[bits.astype(np.intp)]


def float32_to_e4m3_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even with saturation to +-448 (cvt.rn.satfinite.e4m3x2.f32); NaN -> 0x7F."""
    x = np.asarray(x, np.float32)
    positive = E4M3_VALUES[:0x7F]  # codes 0..126: 0 .. 448, increasing
    mag = np.minimum(np.abs(np.nan_to_num(x, nan=0.0)), E4M3_MAX)
    hi = np.clip(np.searchsorted(positive, mag, side="left"), 0, 0x7E)
    lo = np.maximum(hi - 1, 0)
    d_hi, d_lo = positive[hi] - mag, mag - positive[lo]
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))  # ties to the even code
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    code = np.where(np.signbit(x), code | 0x80, code)  # the sign survives rounding to zero, as in hardware
    return np.where(np.isnan(x), np.uint8(0x7F), code).astype(np.uint8)


def to_float32(values: np.ndarray, dtype: DType) -> np.ndarray:
    """Stored values -> the float32 (or int32/bool) registers a load gives."""
    if dtype is bfloat16:
        return bf16_bits_to_float32(values)
    if dtype is float8_e4m3:
        return e4m3_bits_to_float32(values)
    if dtype.is_float:
        return values.astype(np.float32)
    return values.astype(dtype.storage)


def from_float32(values: np.ndarray, dtype: DType) -> np.ndarray:
    """Registers -> stored values, rounded as a store rounds (nearest even)."""
    if dtype is bfloat16:
        return float32_to_bf16_bits(values)
    if dtype is float8_e4m3:
        return float32_to_e4m3_bits(values)
    if dtype is int32:
        return values.astype(np.int32)  # truncation, as a C float -> int conversion
    return np.asarray(values).astype(dtype.storage)
