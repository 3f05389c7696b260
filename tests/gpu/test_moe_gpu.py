"""The GPU's mixture-of-experts MLP (ops/cuda/moe.py: routing, grouped tensor-core GEMMs, combine) against
ops/reference, fp16 and bf16, decode and prefill token counts (both tile heights), with and without Qwen2-MoE's shared
expert, eager and inside a CUDA graph. Model-level parity (Mixtral, Qwen2-MoE, Qwen3-MoE tiny checkpoints against
transformers) is test_engine_gpu.py's, whose ARCHS hold them."""
from __future__ import annotations

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import numpy as np
import pytest

from ops import reference
from ops.cuda import moe as cuda_moe
from ops.cuda import to_float32, to_storage
from ops.cuda.linear import Linear
from ops.moe_layout import tile_rows

# Bound on max|got - ref| / max|ref| for tokens routed alike: the GPU rounds the gate/up rows, the activation and
# each expert's output to the storage dtype before the float32 sum (three roundings of up to half an ulp, x2).
BOUND = {"float16": 6e-3, "bfloat16": 5e-2}


def _up(rng, shape, dtype, scale=1.0):
    stored = to_storage((rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)), dtype)
    return cp.asarray(stored), to_float32(stored)


def _reference(x, router, gate_up, down, k, normalize, shared, dtype):
    """ops/reference.moe with the router's logits rounded as the GPU stores them; (out, ids)."""
    logits = to_float32(to_storage(x @ router.T, dtype))
    ids, w = reference.moe_route(logits, k, normalize)
    out = np.empty_like(x)
    reference.moe_experts(x, ids, w, gate_up, down, out, shared)
    return out, ids


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("t, h, e, inter, k, with_shared", [
    (1, 2048, 128, 768, 8, False),    # Qwen3-30B-A3B's expert shapes at decode
    (16, 2048, 128, 768, 8, False),
    (300, 2048, 128, 768, 8, False),  # 2,400 rows: 64-row tiles
    (7, 256, 4, 512, 2, False),       # Mixtral-like: few big experts
    (33, 512, 60, 176, 4, True),      # Qwen2-MoE-like with its shared expert; 176: K not a multiple of 32
])
def test_moe_matches_the_reference(rng, dtype, t, h, e, inter, k, with_shared):
    x, xf = _up(rng, (t, h), dtype)
    router, rf = _up(rng, (e, h), dtype, 2 / h ** 0.5)
    gate_up, gf = _up(rng, (e, 2 * inter, h), dtype, 1 / h ** 0.5)
    down, df = _up(rng, (e, h, inter), dtype, 1 / inter ** 0.5)
    shared = shared_f = None
    if with_shared:
        sizes = (((2 * 96, h), h ** -0.5), ((h, 96), 96 ** -0.5), ((1, h), h ** -0.5))
        parts = [_up(rng, shape, dtype, scale) for shape, scale in sizes]
        shared, shared_f = tuple(p[0] for p in parts), tuple(p[1] for p in parts)
    normalize = not with_shared
    out = cp.full((t, h), 0x7FC0 if dtype == "bfloat16" else np.nan,
                  dtype=np.uint16 if dtype == "bfloat16" else np.float16)
    linear = Linear(use_autotune=False)
    cuda_moe.moe(linear, x, router, gate_up, down, k, normalize, out, shared)
    got = to_float32(cp.asnumpy(out))
    ref, ids = _reference(xf, rf, gf, df, k, normalize, shared_f, dtype)
    print(f"{dtype} T={t} E={e} k={k} tiles of {tile_rows(t * k, e)} rows")
    assert np.isfinite(got).all(), "a row the kernels never wrote"
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < BOUND[dtype], f"max relative error {err:.2e}"


def test_moe_in_a_cuda_graph_replays_new_inputs(rng):
    t, h, e, inter, k = 8, 512, 16, 128, 4
    x, _ = _up(rng, (t, h), "float16")
    router, rf = _up(rng, (e, h), "float16", 0.2)
    gate_up, gf = _up(rng, (e, 2 * inter, h), "float16", h ** -0.5)
    down, df = _up(rng, (e, h, inter), "float16", inter ** -0.5)
    out = cp.empty((t, h), cp.float16)
    linear = Linear(use_autotune=False)
    stream, pool = cp.cuda.Stream(non_blocking=True), cp.cuda.MemoryPool()  # as graphs/manager.py captures
    with stream, cp.cuda.using_allocator(pool.malloc):
        cuda_moe.moe(linear, x, router, gate_up, down, k, True, out)  # compile, plan and pool blocks first
        stream.begin_capture()
        cuda_moe.moe(linear, x, router, gate_up, down, k, True, out)
        graph = stream.end_capture()
    for _ in range(3):  # new tokens each replay: other experts, other counts, same graph
        fresh = to_storage(rng.standard_normal((t, h), dtype=np.float32), "float16")
        x.set(fresh)
        graph.launch(stream)
        stream.synchronize()
        ref, _ = _reference(to_float32(fresh), rf, gf, df, k, True, None, "float16")
        got = to_float32(cp.asnumpy(out))
        assert np.abs(got - ref).max() / np.abs(ref).max() < BOUND["float16"]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_tensor_parallel_shards_sum_to_the_whole(rng, world):
    """Tensor parallelism's MoE shards (engine/parallel.py) through the GPU's kernels: each rank's gate/up rows and
    down columns of every expert (I / world: 352, 176, 88: K not a multiple of 32 at 88), its slice of the shared
    expert, the router and shared gate whole. Every rank routes alike; the float32 sum of the ranks' outputs is
    the whole MLP's, as the all-reduce after the MLP makes it."""
    t, h, e, inter, k, s = 33, 512, 60, 704, 4, 768
    x, xf = _up(rng, (t, h), "float16")
    router, rf = _up(rng, (e, h), "float16", 2 / h ** 0.5)
    gate_up, gf = _up(rng, (e, 2 * inter, h), "float16", 1 / h ** 0.5)
    down, df = _up(rng, (e, h, inter), "float16", 1 / inter ** 0.5)
    parts = [_up(rng, shape, "float16", scale) for shape, scale in
             (((2 * s, h), h ** -0.5), ((h, s), s ** -0.5), ((1, h), h ** -0.5))]
    (s_gate_up, _), (s_down, _), (s_gate, _) = parts
    ref, _ = _reference(xf, rf, gf, df, k, False, tuple(p[1] for p in parts), "float16")
    linear, total = Linear(use_autotune=False), np.zeros((t, h), np.float32)
    for r in range(world):
        lo, hi, slo, shi = r * inter // world, (r + 1) * inter // world, r * s // world, (r + 1) * s // world
        rank_gate_up = cp.ascontiguousarray(cp.concatenate([gate_up[:, lo:hi], gate_up[:, inter + lo:inter + hi]], 1))
        rank_down = cp.ascontiguousarray(down[:, :, lo:hi])
        shared = (cp.ascontiguousarray(cp.concatenate([s_gate_up[slo:shi], s_gate_up[s + slo:s + shi]])),
                  cp.ascontiguousarray(s_down[:, slo:shi]), s_gate)
        out = cp.full((t, h), np.nan, np.float16)
        cuda_moe.moe(linear, x, router, rank_gate_up, rank_down, k, False, out, shared)
        got = to_float32(cp.asnumpy(out))
        assert np.isfinite(got).all(), f"rank {r}: a row the kernels never wrote"
        total += got
    err = np.abs(total - ref).max() / np.abs(ref).max()
    assert err < BOUND["float16"], f"{world} ranks: max relative error {err:.2e}"
