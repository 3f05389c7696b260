"""The mixture-of-experts MLP on the GPU: ops/reference.moe in launches that never wait for the host.

router logits (cuBLASLt) -> moe_route (top-k, counts) -> moe_offsets (rows and GEMM tiles per expert) -> moe_permute
(a row per token and slot, grouped by expert) -> moe_gemm (gate_up, x gathered by token) -> SiLU x up -> moe_gemm
(down) -> moe_combine (weighted sum per token, + Qwen2-MoE's gated shared expert). Every grid is sized from the token
count alone, so a decode step's MoE layers are captured in its CUDA graph like the dense ones. Kernels:
ops/kernels/moe_route.cu (routing, combine) and moe_gemm.cu (the grouped GEMM on tensor cores).
"""
from __future__ import annotations

import cupy as cp
import numpy as np

from ops.cuda import basic as _basic
from ops.cuda.compile import cuda_type, get_kernel
from ops.moe_layout import MAX_EXPERTS, MAX_TOP_K, max_tiles, moe_shape_problem, tile_rows

ROUTE_WARPS, PERMUTE_THREADS, COMBINE_THREADS, OFFSETS_THREADS = 4, 128, 256, 256  # the kernels' launch bounds
GEMM_BN, GEMM_THREADS = 64, 128


def moe(linear, x, router, gate_up, down, top_k: int, normalize: bool, out, shared=None) -> None:
    """out[T, H] = the MoE MLP of x[T, H] (ops/reference.moe's arguments); `linear` is the backend's cuBLASLt GEMM."""
    t, h = x.shape
    e, two_i, _ = gate_up.shape
    inter = two_i // 2
    if e > MAX_EXPERTS or top_k > MAX_TOP_K or top_k > e:
        raise ValueError(f"moe: {e} experts, {top_k} a token; supported up to {MAX_EXPERTS} and {MAX_TOP_K}")
    problem = moe_shape_problem(h, inter)
    if problem:
        raise ValueError(f"moe: {problem}")
    if t == 0:
        return
    pairs, bm = t * top_k, tile_rows(t * top_k, e)
    tiles = max_tiles(pairs, e, bm)
    defines = dict(T=cuda_type(x.dtype), BM=bm, NORMALIZE=int(normalize), SHARED=int(shared is not None))
    route = lambda name: get_kernel("moe_route.cu", name, **defines)  # noqa: E731
    gemm = get_kernel("moe_gemm.cu", "moe_gemm", T=defines["T"], BM=bm)
    i32 = np.int32

    logits = cp.empty((t, e), x.dtype)
    linear(x, router, None, logits)
    ids, weights = cp.empty((t, top_k), cp.int32), cp.empty((t, top_k), cp.float32)
    counts, cursor = cp.zeros(e, cp.int32), cp.empty(e, cp.int32)
    tile_expert, tile_row, num_tiles = cp.empty(tiles, cp.int32), cp.empty(tiles, cp.int32), cp.empty(1, cp.int32)
    src, pos = cp.empty(pairs, cp.int32), cp.empty(pairs, cp.int32)
    route("moe_route")((-(-t // ROUTE_WARPS),), (32 * ROUTE_WARPS,),
                       (logits, i32(t), i32(e), i32(top_k), ids, weights, counts))
    route("moe_offsets")((1,), (OFFSETS_THREADS,), (i32(e), counts, cursor, tile_expert, tile_row, num_tiles))
    route("moe_permute")((-(-pairs // PERMUTE_THREADS),), (PERMUTE_THREADS,),
                         (ids, i32(pairs), i32(top_k), cursor, src, pos))

    def grouped(a, w, result, gather: bool):
        n, k = w.shape[1], w.shape[2]
        gemm((tiles, -(-n // GEMM_BN)), (GEMM_THREADS,),
             (a, w, result, src, tile_expert, tile_row, num_tiles, cursor, i32(n), i32(k), i32(gather)))

    h_rows = cp.empty((pairs, two_i), x.dtype)
    grouped(x, gate_up, h_rows, True)
    act = cp.empty((pairs, inter), x.dtype)
    _basic.silu_and_mul(h_rows, act)
    y = cp.empty((pairs, h), x.dtype)
    grouped(act, down, y, False)

    s_out = s_gate = out  # unread without a shared expert
    if shared is not None:
        s_gate_up, s_down, s_gate_w = shared
        s_h = cp.empty((t, s_gate_up.shape[0]), x.dtype)
        linear(x, s_gate_up, None, s_h)
        s_act = cp.empty((t, s_down.shape[1]), x.dtype)
        _basic.silu_and_mul(s_h, s_act)
        s_out, s_gate = cp.empty((t, h), x.dtype), cp.empty((t, 1), x.dtype)
        linear(s_act, s_down, None, s_out)
        linear(x, s_gate_w, None, s_gate)
    route("moe_combine")((t,), (COMBINE_THREADS,), (y, pos, weights, i32(top_k), i32(h), s_out, s_gate, out))
