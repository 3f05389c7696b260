"""The hand-written launchers the JIT kernels replaced (ops/cuda/basic.py now runs ops/jit_ops.py), kept only so that
perf/gpu_kernels.py --impl hand and perf/eager_profile.py can time both on one card; the engine never calls them.
Embedding, RMSNorm, SiLU-and-mul, RoPE + KV write.

Each checks its preconditions (ValueError naming the argument), then launches one kernel of ops/kernels/ on the
current CuPy stream: no host sync and no allocation, so every launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from ops.cuda.basic import INT32, VEC, _check, _same, _whole_vectors, check_rope
from ops.cuda.compile import cuda_type, get_kernel

ROPE_HEAD_DIMS = (32, 64, 128, 256)
ROPE_THREADS = 256
NORM_VPT = (1, 2, 4, 8)  # 16-byte vectors of a row each thread holds in registers (norm.cu's VPT)
NORM_MAX_THREADS = 512  # norm.cu's __launch_bounds__: leaves 128 registers a thread, so VPT 8 does not spill
# the fewest vectors per thread that keeps a block within this many threads: on the H100 448 threads x 1 vector
# beat 224 x 2 by 0.5 us at T=64 and 0.2 us at T=256 (Qwen2.5-7B rows; one block per SM, so shorter per-thread
# instruction chains win) and tie at T=4096
NORM_THREADS = NORM_MAX_THREADS


@functools.cache
def _kernel(filename: str, name: str, defines: tuple[tuple[str, object], ...] = ()) -> cp.RawKernel:
    return get_kernel(filename, name, **dict(defines))


def embedding(ids, table, out) -> None:
    """out[t] = table[ids[t]]. ids: [T] int32, table: [V, H], out: [T, H]; an id outside [0, V) gives a zero row."""
    _check("ids", ids, 1, INT32, align=4)
    _check("table", table, 2)
    _check("out", out, 2)
    _same("out", out, "table", table, (ids.shape[0], table.shape[1]))
    n_vec = _whole_vectors("table", table)
    if ids.shape[0] == 0:
        return
    threads = min(256, -(-n_vec // 32) * 32)
    kernel = _kernel("embedding.cu", "embedding_kernel")
    kernel((ids.shape[0], -(-n_vec // threads)), (threads,), (ids, table, out, np.int32(n_vec),
                                                             np.int32(table.shape[0])))


def norm_launch(num_rows: int, n_vec: int, threads: int = NORM_THREADS):
    """(grid, block, VPT) for one block per row, the row held in registers, at most `threads` a block."""
    vpt = next((v for v in NORM_VPT if n_vec <= v * threads), None)
    if vpt is None:
        raise ValueError(f"rms_norm: hidden size {n_vec * VEC // 2} is over the supported "
                         f"{NORM_VPT[-1] * threads * VEC // 2}")
    used = -(-n_vec // vpt)  # ceil(n_vec / vpt): threads that hold a part of the row
    block = -(-used // 32) * 32  # rounded up to whole warps
    return (num_rows,), (block,), vpt


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
    grid, block, vpt = norm_launch(x.shape[0], n_vec)
    kernel = _kernel("norm.cu", "rms_norm_kernel", (("DTYPE", cuda_type(x.dtype)), ("VPT", vpt)))
    kernel(grid, block, (x, weight, out, np.int32(n_vec), np.float32(eps)))


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
    grid, block, vpt = norm_launch(x.shape[0], n_vec)
    kernel = _kernel("norm.cu", "add_rms_norm_kernel", (("DTYPE", cuda_type(x.dtype)), ("VPT", vpt)))
    kernel(grid, block, (x, residual, weight, out, np.int32(n_vec), np.float32(eps)))


def silu_and_mul(x, out) -> None:
    """out = silu(gate) * up with x = [gate | up]. x: [T, 2*I], out: [T, I]."""
    _check("x", x, 2)
    _check("out", out, 2)
    _same("out", out, "x", x)
    if x.shape != (out.shape[0], 2 * out.shape[1]):
        raise ValueError(f"silu_and_mul: x has shape {x.shape}, expected (T, 2*I) = {(out.shape[0], 2 * out.shape[1])}")
    n_vec = _whole_vectors("out", out)
    total = out.shape[0] * n_vec
    if total >= 2**31:
        raise ValueError(f"silu_and_mul: {out.shape} is over 2^31 vectors; split the batch")
    if total == 0:
        return
    kernel = _kernel("activation.cu", "silu_and_mul_kernel", (("DTYPE", cuda_type(x.dtype)),))
    kernel((-(-total // 256),), (256,), (x, out, np.uint32(n_vec), np.uint32(total)))


def rope_and_cache(qkv, positions, slot_mapping, k_cache, v_cache, cos_sin,
                   q_norm=None, k_norm=None, eps: float = 1e-6) -> None:
    """Rotate q and k in place in qkv (neox layout), after Qwen3's per-head RMSNorm if q_norm/k_norm are
    given, and write the rotated k and v into the paged cache at slot_mapping (slot -1 skipped). One launch.

    qkv: [T, (Hq + 2*Hkv) * D]; positions, slot_mapping: [T] int32; k_cache, v_cache: [num_blocks, Hkv,
    block_size, D]; cos_sin: [max_pos, D] float32 (cos | sin); q_norm, k_norm: [D]. Positions must be in
    [0, max_pos) and slots below num_blocks * block_size: they are not checked (that would need a sync).
    """
    num_tokens, num_q_heads, num_kv_heads, block_size, head_dim = check_rope(
        qkv, positions, slot_mapping, k_cache, v_cache, cos_sin, q_norm, k_norm)
    if head_dim not in ROPE_HEAD_DIMS:
        raise ValueError(f"rope_and_cache: head_dim {head_dim} is not supported; supported: {ROPE_HEAD_DIMS}")
    if num_tokens == 0:
        return
    defines = (("BLOCK_SIZE", block_size), ("DTYPE", cuda_type(qkv.dtype)), ("HEAD_DIM", head_dim),
               ("QK_NORM", int(q_norm is not None)))
    kernel = _kernel("rope_cache.cu", "rope_and_cache_kernel", defines)
    # head_dim / 8 lanes per (token, head), each rotating 4 pairs
    lanes = num_tokens * (num_q_heads + 2 * num_kv_heads) * (head_dim // 8)
    if lanes >= 2**31:
        raise ValueError(f"rope_and_cache: {num_tokens} tokens is too many for one launch; split the batch")
    # without norms the kernel never reads q_norm/k_norm: any device pointer fills the slots
    q_norm = qkv if q_norm is None else q_norm
    k_norm = qkv if k_norm is None else k_norm
    kernel((-(-lanes // ROPE_THREADS),), (ROPE_THREADS,),
           (qkv, positions, slot_mapping, k_cache, v_cache, cos_sin, q_norm, k_norm, np.float32(eps),
            np.int32(num_tokens), np.int32(num_q_heads), np.int32(num_kv_heads)))
