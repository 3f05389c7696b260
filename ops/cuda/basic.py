"""Launchers of the model ops that are neither attention nor GEMM: embedding, RMSNorm, SiLU-and-mul, RoPE + KV write.

Each checks its preconditions (ValueError naming the argument), then runs one kernel generated from its definition
in the JIT language (ops/jit_ops.py) on the current CuPy stream: no host sync and no allocation, so every launch
can be captured in a CUDA graph.
"""
from __future__ import annotations

import cupy as cp
import numpy as np

from ops import jit_ops

ACTIVATION_DTYPES = (np.dtype(np.float16), np.dtype(np.uint16))  # uint16 = bfloat16 bits
INT32 = (np.dtype(np.int32),)
VEC = 16  # bytes per vector load/store; rows must be whole vectors
MAX_ROW_VECTORS = 8 * 512


def _check(name: str, array, ndim: int, dtypes=ACTIVATION_DTYPES, align: int = VEC) -> None:
    if not isinstance(array, cp.ndarray):
        raise ValueError(f"{name} must be a cupy.ndarray, got {type(array).__name__}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    if array.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} has dtype {array.dtype}; allowed: {allowed} (uint16 holds bfloat16)")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (shape {array.shape}, strides {array.strides})")
    if array.data.ptr % align:
        raise ValueError(f"{name} must start on a {align}-byte boundary (vector loads)")


def _same(name: str, array, like_name: str, like, shape=None) -> None:
    if array.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {array.dtype} but {like_name} has {like.dtype}")
    if shape is not None:
        _shape(name, array, shape)


def _shape(name: str, array, shape) -> None:
    if array.shape != tuple(shape):
        raise ValueError(f"{name} has shape {array.shape}, expected {tuple(shape)}")


def _whole_vectors(name: str, array) -> int:
    """Vectors per row of the last axis; rows must be a whole number of 16-byte vectors."""
    row_bytes = array.shape[-1] * array.itemsize
    if row_bytes % VEC:
        raise ValueError(f"{name}: last dimension {array.shape[-1]} x {array.itemsize} bytes is not a multiple of "
                         f"{VEC} bytes")
    return row_bytes // VEC


def _max_row(name: str, n_vec: int) -> None:
    """A row is held in registers, at most 8 vectors a thread of 512: hidden sizes up to 32,768."""
    if n_vec > MAX_ROW_VECTORS:
        raise ValueError(f"{name}: hidden size {n_vec * VEC // 2} is over the supported {MAX_ROW_VECTORS * VEC // 2}")


def embedding(ids, table, out) -> None:
    """out[t] = table[ids[t]]. ids: [T] int32, table: [V, H], out: [T, H]; an id outside [0, V) gives a zero row."""
    _check("ids", ids, 1, INT32, align=4)
    _check("table", table, 2)
    _check("out", out, 2)
    _same("out", out, "table", table, (ids.shape[0], table.shape[1]))
    _whole_vectors("table", table)  # raises where a row is not whole 16-byte vectors
    if ids.shape[0] == 0:
        return
    jit_ops.embedding(ids, table, out)


def rms_norm(x, weight, eps: float, out) -> None:
    """out = x / sqrt(mean(x^2) + eps) * weight per row, fp32 math. x, out: [T, H], weight: [H]."""
    _check("x", x, 2)
    _check("weight", weight, 1)
    _check("out", out, 2)
    _same("weight", weight, "x", x, (x.shape[1],))
    _same("out", out, "x", x, x.shape)
    n_vec = _whole_vectors("x", x)
    if x.shape[0] == 0:
        return
    _max_row("rms_norm", n_vec)
    jit_ops.rms_norm(x, weight, eps, out)


def add_rms_norm(x, residual, weight, eps: float, out) -> None:
    """residual += x (rounded to its dtype, in place); out = rms_norm(residual). x, residual, out: [T, H]."""
    _check("x", x, 2)
    _check("residual", residual, 2)
    _check("weight", weight, 1)
    _check("out", out, 2)
    _same("residual", residual, "x", x, x.shape)
    _same("weight", weight, "x", x, (x.shape[1],))
    _same("out", out, "x", x, x.shape)
    n_vec = _whole_vectors("x", x)
    if x.shape[0] == 0:
        return
    _max_row("add_rms_norm", n_vec)
    jit_ops.add_rms_norm(x, residual, weight, eps, out)


def silu_and_mul(x, out) -> None:
    """out = silu(gate) * up with x = [gate | up]. x: [T, 2*I], out: [T, I]."""
    _check("x", x, 2)
    _check("out", out, 2)
    _same("out", out, "x", x)
    if x.shape != (out.shape[0], 2 * out.shape[1]):
        raise ValueError(f"silu_and_mul: x has shape {x.shape}, expected (T, 2*I) = {(out.shape[0], 2 * out.shape[1])}")
    _whole_vectors("out", out)
    if out.size == 0:
        return
    jit_ops.silu_and_mul(x, out)


def rope_and_cache(qkv, positions, slot_mapping, k_cache, v_cache, cos_sin,
                   q_norm=None, k_norm=None, eps: float = 1e-6, kv_scale=None) -> None:
    """Rotate q and k in place in qkv (neox layout), after Qwen3's per-head RMSNorm if q_norm/k_norm are
    given, and write the rotated k and v into the paged cache at slot_mapping (slot -1 skipped). One launch.

    qkv: [T, (Hq + 2*Hkv) * D]; positions, slot_mapping: [T] int32; k_cache, v_cache: [num_blocks, Hkv,
    block_size, D]; cos_sin: [max_pos, D] float32 (cos | sin); q_norm, k_norm: [D]. Positions must be in
    [0, max_pos) and slots below num_blocks * block_size: they are not checked (that would need a sync).
    An FP8 cache: uint8 (E4M3) k_cache and v_cache, kv_scale = (k_scale, v_scale), float32 [Hkv] each.
    """
    num_tokens, _, hkv, _, head_dim = check_rope(qkv, positions, slot_mapping, k_cache, v_cache, cos_sin, q_norm,
                                                 k_norm, kv_scale is not None)
    if kv_scale is not None:
        for name, a in zip(("k_scale", "v_scale"), kv_scale):
            _check(name, a, 1, (np.dtype(np.float32),), align=4)
            _shape(name, a, (hkv,))
    if head_dim % 2 or head_dim // 2 * qkv.itemsize % 4:
        raise ValueError(f"rope_and_cache: head_dim {head_dim} must be even with halves of whole 4-byte words")
    if num_tokens == 0:
        return
    jit_ops.rope_and_cache(qkv, positions, slot_mapping, k_cache, v_cache, cos_sin, q_norm, k_norm, eps, kv_scale)


def check_rope(qkv, positions, slot_mapping, k_cache, v_cache, cos_sin, q_norm, k_norm, fp8=False
               ) -> tuple[int, ...]:
    """rope_and_cache's preconditions (ValueError naming the argument); (T, Hq, Hkv, block_size, D).
    fp8: the caches hold E4M3 codes (uint8)."""
    _check("qkv", qkv, 2)
    _check("positions", positions, 1, INT32, align=4)
    _check("slot_mapping", slot_mapping, 1, INT32, align=4)
    _check("k_cache", k_cache, 4, (np.dtype(np.uint8),) if fp8 else ACTIVATION_DTYPES)
    _check("v_cache", v_cache, 4, (np.dtype(np.uint8),) if fp8 else ACTIVATION_DTYPES)
    _check("cos_sin", cos_sin, 2, (np.dtype(np.float32),))
    if not fp8:
        _same("k_cache", k_cache, "qkv", qkv)
    _same("v_cache", v_cache, "k_cache", k_cache, k_cache.shape)
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    num_tokens, width = qkv.shape
    num_q_heads = width // head_dim - 2 * num_kv_heads
    if width % head_dim or num_q_heads <= 0:
        raise ValueError(f"rope_and_cache: qkv width {width} is not (Hq + 2 * {num_kv_heads}) * {head_dim}")
    _shape("positions", positions, (num_tokens,))
    _shape("slot_mapping", slot_mapping, (num_tokens,))
    _shape("cos_sin", cos_sin, (cos_sin.shape[0], head_dim))
    if (q_norm is None) != (k_norm is None):
        raise ValueError("rope_and_cache: q_norm and k_norm go together (both or neither)")
    if q_norm is not None:
        for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
            _check(name, w, 1)
            _same(name, w, "qkv", qkv, (head_dim,))
    if num_q_heads % num_kv_heads:
        raise ValueError(f"rope_and_cache: {num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return num_tokens, num_q_heads, num_kv_heads, block_size, head_dim
