"""How tensors are stored: dtype names -> numpy storage dtypes (bfloat16 as uint16 bits: numpy and CuPy have
no bf16), the rounding of float32 into bfloat16 bits, and the error a checkpoint that cannot be loaded raises.

The one home of these tables for both sides of weight loading: the checkpoint reader (engine/safetensors.py,
engine/loader.py) and the backends that place the bits on a device (ops/cuda/upload.py). No CuPy here.
"""
from __future__ import annotations

import numpy as np

# safetensors dtype name -> numpy storage dtype of its elements (little-endian, as the format stores them)
SAFETENSORS_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "F8_E4M3": np.dtype("u1"),  # E4M3 bit patterns (FP8 checkpoints)
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")  # the stored dtypes a model weight may have (FP8 aside)

# compute dtype name -> numpy storage dtype of an array in it
STORAGE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}
HALF_NAMES = {STORAGE[name]: name for name in ("float16", "bfloat16")}  # a 16-bit array's storage -> its name


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def float32_to_bf16_bits(array, xp=np):
    """Round float32 to bfloat16 (nearest even) and return the uint16 bit patterns; `xp` is numpy or cupy.

    Integer arithmetic on the bits, wrapping mod 2^32: a NaN keeps its sign and top payload bits (or, with the
    top payload bits clear, may become inf). The CUDA upload kernel (ops/cuda/upload.py) rounds the same way;
    the JIT language's stores canonicalise NaN on top of it (ops/jit/dtypes.py)."""
    bits = xp.ascontiguousarray(array, dtype=xp.float32).view(xp.uint32)
    return ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(xp.uint16)


def bf16_bits_to_float32(bits):
    """bfloat16 bits (uint16, numpy) -> float32, exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
