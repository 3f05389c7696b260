"""W8A16 GEMV for FP8 weights at a few tokens (ops/kernels/gemv_fp8.cu): out = x @ (codes * scale)^T (+ bias).

x stays in the model dtype: at up to MAX_TOKENS rows the weight bytes bound the time, and this path needs neither
an activation quantizer nor a float32 output pass. Measured against the cuBLASLt FP8 path by perf/gpu_gemv_fp8.py.
"""
from __future__ import annotations

import functools

import numpy as np

from ops.cuda.compile import cuda_type, get_kernel
from ops.quant import Fp8Weight

MAX_TOKENS = 8
WARPS = 4
ROWS = (1, 2, 4)  # output rows per warp, compiled variants


def gemv_fp8(x, weight: Fp8Weight, bias, out, rows: int = 2) -> None:
    """x [T, K] fp16/bf16 (T <= MAX_TOKENS, rows 16-byte aligned), weight codes [N, K] uint8 + scale [N] float32,
    bias [N] or None, out [T, N] in x's dtype."""
    t, k = x.shape
    n = weight.codes.shape[0]
    if not 1 <= t <= MAX_TOKENS:
        raise ValueError(f"gemv_fp8 takes 1..{MAX_TOKENS} tokens, got {t}")
    if weight.codes.shape != (n, k) or weight.codes.dtype != np.uint8 or not weight.codes.flags.c_contiguous:
        raise ValueError(f"gemv_fp8: weight codes must be contiguous uint8 [N, {k}], got {weight.codes.dtype} "
                         f"{weight.codes.shape}")
    if k % 16 or x.strides[1] != x.itemsize or x.strides[0] % 16 or x.data.ptr % 16:
        raise ValueError(f"gemv_fp8: K ({k}) must be a multiple of 16 and x's rows contiguous and 16-byte aligned")
    if (out.shape != (t, n) or out.dtype != x.dtype
            or (bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype))):
        raise ValueError(f"gemv_fp8: out must be [{t}, {n}] and bias [{n}] in {x.dtype}, got {out.shape} {out.dtype}"
                         f"{'' if bias is None else f', bias {bias.shape} {bias.dtype}'}")
    if rows not in ROWS:
        raise ValueError(f"gemv_fp8: rows per warp must be one of {ROWS}, got {rows}")
    kernel = _kernel(cuda_type(x.dtype), 1 << (t - 1).bit_length(), rows, bias is not None)
    grid = -(-n // (WARPS * rows))
    kernel((grid,), (WARPS * 32,), (x, np.int32(x.strides[0] // x.itemsize), weight.codes, weight.scale,
                                     bias if bias is not None else out, out, np.int32(out.strides[0] // out.itemsize),
                                     np.int32(n), np.int32(k), np.int32(t)))


@functools.cache
def _kernel(ctype: str, max_tokens: int, rows: int, has_bias: bool):
    return get_kernel("gemv_fp8.cu", "gemv_fp8", T=ctype, MAXT=max_tokens, ROWS=rows, WARPS=WARPS,
                      HAS_BIAS=int(has_bias))
