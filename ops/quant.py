"""FP8 (E4M3) quantization, the numpy reference: weights per output channel, activations per token, and the
linear layer they make. Its math is the math of an FP8 GEMM with float32 accumulation: both operands rounded to
E4M3 after scaling, products summed in float32, scaled back.

E4M3 (OCP FP8, as Hopper's tensor cores take it): 1 sign, 4 exponent (bias 7), 3 mantissa bits; the largest
finite value is 448, S.1111.111 is NaN, there is no infinity. Rounding is to nearest even, saturating at 448
(ops/jit/dtypes.py holds the bit conversions; the JIT kernels use the same ones).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ops import reference
from ops.jit import dtypes

E4M3_MAX = 448.0
METHODS = ("fp8",)
# Up to this many tokens an FP8 projection takes its input unquantized, in the model dtype, and multiplies it by
# the decoded weight (W8A16: the GPU's GEMV, ops/cuda/gemv.py); beyond, both operands are E4M3 (W8A8, cuBLASLt).
# 1: the GEMV beat the cuBLASLt FP8 path on all four Qwen2.5-7B projections at one token and lost on gate_up and
# down from two (perf/gpu_gemv_fp8.py on an H200, docs/performance.md). 0: always W8A8.
# CUPYLLM_W8A16_MAX_TOKENS sets it for a process (the benchmark compares settings).
W8A16_MAX_TOKENS = int(os.environ.get("CUPYLLM_W8A16_MAX_TOKENS", "1"))


@dataclass(frozen=True)
class Fp8Weight:
    """A linear weight [N, K] as E4M3 codes (uint8) with one float32 scale per output row: w ~= codes * scale."""
    codes: np.ndarray  # uint8 [N, K]
    scale: np.ndarray  # float32 [N]
    input_scale: float | None = None  # a checkpoint's static activation scale; None: per token, dynamic

    @property
    def shape(self) -> tuple:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes


@dataclass(frozen=True)
class Fp8Activation:
    """A GEMM's input quantized per token by the kernel that made it: codes [T, K] uint8 (E4M3) and a float32 scale
    per token [T, 1]; x ~= codes * scale."""
    codes: np.ndarray
    scale: np.ndarray

    @property
    def shape(self) -> tuple:
        return self.codes.shape


@dataclass(frozen=True)
class Fp8Cache:
    """One layer's K or V cache in E4M3: codes [num_blocks, Hkv, block_size, D] uint8 and a float32 scale per KV
    head [Hkv] (a checkpoint's k_scale / v_scale, else 1.0, as vLLM takes them); value ~= code * scale."""
    codes: np.ndarray
    scale: np.ndarray

    @property
    def shape(self) -> tuple:
        return self.codes.shape

    def store(self, blocks: np.ndarray, offsets: np.ndarray, values: np.ndarray) -> None:
        """values [n, Hkv, D] into slots (blocks[i], offsets[i]); beyond 448 x scale they saturate."""
        self.codes[blocks, :, offsets] = dtypes.float32_to_e4m3_bits(values / self.scale[None, :, None])

    def gather(self, blocks: np.ndarray) -> np.ndarray:
        """The blocks' values, float32 [len(blocks), Hkv, block_size, D]."""
        return dtypes.e4m3_bits_to_float32(self.codes[blocks]) * self.scale[None, :, None, None]


def scales(x: np.ndarray) -> np.ndarray:
    """One scale per row: the row's largest magnitude maps to 448. An all-zero row gets 1 (its codes are zero)."""
    amax = np.abs(x).max(axis=-1).astype(np.float32)
    return np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [R, C] float -> (E4M3 codes uint8 [R, C], float32 scale [R]) with x ~= codes * scale[:, None]."""
    x = np.asarray(x, np.float32)
    if not np.isfinite(x).all():
        raise ValueError("fp8 quantization: the tensor holds inf or NaN; E4M3 has no infinity to keep them")
    s = scales(x)
    return dtypes.float32_to_e4m3_bits(x / s[:, None]), s


def dequantize_rows(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return dtypes.e4m3_bits_to_float32(codes) * np.asarray(scale, np.float32)[:, None]


def quantize_weight(w: np.ndarray) -> Fp8Weight:
    """Per output channel (vLLM's fp8 with per-channel weight scales)."""
    codes, s = quantize_rows(w)
    return Fp8Weight(codes, s)


def concatenate(weights: list[Fp8Weight], xp=np) -> Fp8Weight:
    """Merged projections (q/k/v, gate/up): rows stacked with their scales; one static input scale, the largest
    (the merged GEMM reads one x, so it takes the scale no part's activations overflow)."""
    statics = [w.input_scale for w in weights if w.input_scale is not None]
    if statics and len(statics) != len(weights):
        raise ValueError("fp8: merged projections mix static and dynamic activation scales")
    return Fp8Weight(xp.concatenate([w.codes for w in weights]), xp.concatenate([w.scale for w in weights]),
                     max(statics) if statics else None)


def quantize_static(x: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """x [R, C] with one given scale (a checkpoint's input_scale): values beyond 448 * scale saturate."""
    codes = dtypes.float32_to_e4m3_bits(np.asarray(x, np.float32) / np.float32(scale))
    return codes, np.full(x.shape[0], scale, np.float32)


def linear(x, weight, bias: np.ndarray | None, out: np.ndarray) -> None:
    """reference.linear for a float weight; for an Fp8Weight, x is an Fp8Activation (quantized per token by the
    kernel that made it) or a float array quantized here (per token, or with the weight's static input scale),
    and both operands enter the matmul as their E4M3 values."""
    if not isinstance(weight, Fp8Weight):
        reference.linear(x, weight, bias, out)
        return
    if isinstance(x, Fp8Activation):
        xq, xs = x.codes, x.scale.reshape(-1)
    elif x.shape[0] <= W8A16_MAX_TOKENS:  # W8A16: x as it is, the weight decoded
        np.matmul(np.asarray(x, np.float32), dequantize_rows(weight.codes, weight.scale).T, out=out)
        if bias is not None:
            out += bias
        return
    else:
        xq, xs = quantize_rows(x) if weight.input_scale is None else quantize_static(x, weight.input_scale)
    acc = dtypes.e4m3_bits_to_float32(xq) @ dtypes.e4m3_bits_to_float32(weight.codes).T  # [T, N] float32
    np.multiply(acc, xs[:, None] * weight.scale[None, :], out=out)
    if bias is not None:
        out += bias


def activation(xp, tokens: int, width: int) -> Fp8Activation:
    """Uninitialised buffers for a quantized GEMM input of `tokens` rows (numpy or CuPy as `xp`)."""
    return Fp8Activation(xp.empty((tokens, width), np.uint8), xp.empty((tokens, 1), np.float32))


def quantize_activation(x: np.ndarray, out: Fp8Activation) -> None:
    """Rows of x to out's codes and per-token scales (the numpy backend's fused quantizers end in this)."""
    codes, s = quantize_rows(x)
    out.codes[...] = codes
    out.scale[...] = s[:, None]


def then_quantize(op):
    """op(*inputs, out) followed by quantize_activation(out): the numpy backend's rms_norm_fp8, add_rms_norm_fp8
    and silu_and_mul_fp8, whose last argument is an Fp8Activation (the GPU fuses each into one kernel)."""
    def run(*args):
        *inputs, out = args
        value = np.empty(out.codes.shape, np.float32)
        op(*inputs, value)
        quantize_activation(value, out)
    return run
