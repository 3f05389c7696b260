"""The GPU's MoE routing kernels (ops/kernels/moe_route.cu) run on the CPU by tests/host_cuda.py with T = float, and
the whole launch sequence of ops/cuda/moe.py held to ops/reference.moe, the grouped GEMM's contract (which rows each
tile covers, x gathered by token) played by numpy. The grouped GEMM itself (ops/kernels/moe_gemm.cu, tensor cores)
runs here too, in fp16 and bf16, with tests/host_mma.py's mma.sync, ldmatrix and cp.async, against that contract."""
from __future__ import annotations

import types

import numpy as np
import pytest

from ops import reference
from ops.moe_layout import max_tiles, tile_rows
from tests import host_cuda, host_mma
from tests.attention_cases import to_float32, to_storage

pytestmark = pytest.mark.skipif(not host_cuda.available(), reason="needs g++ for the CUDA emulator")
i32 = np.int32


def _source(bm: int, normalize: bool, shared: bool) -> str:
    defines = dict(T="float", BM=bm, NORMALIZE=int(normalize), SHARED=int(shared))
    return host_mma.emulated_source("moe_route.cu", defines)


def _route(src, logits, k):
    t, e = logits.shape
    ids, w, counts = np.zeros((t, k), i32), np.zeros((t, k), np.float32), np.zeros(e, i32)
    host_cuda.run_source(src, "moe_route", 128, -(-t // 4), [logits, i32(t), i32(e), i32(k), ids, w, counts])
    return ids, w, counts


def _offsets(src, counts, tiles):
    e = counts.size
    cursor, tile_expert, tile_row, num = np.zeros(e, i32), np.zeros(tiles, i32), np.zeros(tiles, i32), np.zeros(1, i32)
    host_cuda.run_source(src, "moe_offsets", 256, 1, [i32(e), counts, cursor, tile_expert, tile_row, num])
    return cursor, tile_expert, tile_row, int(num[0])


@pytest.mark.parametrize("t, e, k", [(1, 4, 2), (37, 8, 3), (5, 60, 8), (19, 128, 8), (3, 256, 16)])
def test_routing_equals_the_reference(rng, t, e, k):
    logits = rng.normal(0, 2, (t, e)).astype(np.float32)
    for normalize in (True, False):
        ids, w, counts = _route(_source(16, normalize, False), logits, k)
        ref_ids, ref_w = reference.moe_route(logits, k, normalize)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=e))


def test_ties_go_to_the_lower_expert():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0] + [0.0] * 58], np.float32)
    ids, _, _ = _route(_source(16, True, False), logits, 4)
    assert ids.tolist() == [[1, 2, 4, 5]]


@pytest.mark.parametrize("bm", [16, 64])
def test_offsets_and_permutation_group_every_pair_by_expert(rng, bm):
    t, e, k = 45, 60, 6
    src_text = _source(bm, True, False)
    ids, _, counts = _route(src_text, rng.normal(0, 3, (t, e)).astype(np.float32), k)
    pairs = t * k
    tiles = max_tiles(pairs, e, bm)
    cursor, tile_expert, tile_row, num = _offsets(src_text, counts.copy(), tiles)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    np.testing.assert_array_equal(cursor, starts)
    want = [(x, int(starts[x]) + j * bm) for x in range(e) for j in range(-(-int(counts[x]) // bm))]
    assert num == len(want) <= tiles
    assert list(zip(tile_expert[:num].tolist(), tile_row[:num].tolist())) == want
    src, pos = np.zeros(pairs, i32), np.zeros(pairs, i32)
    host_cuda.run_source(src_text, "moe_permute", 128, -(-pairs // 128),
                         [ids.ravel().copy(), i32(pairs), i32(k), cursor, src, pos])
    np.testing.assert_array_equal(cursor, starts + counts)  # each expert's end, where its last tile stops
    assert sorted(pos.tolist()) == list(range(pairs))
    flat = ids.ravel()
    np.testing.assert_array_equal(src[pos], np.arange(pairs) // k)  # the row holds its own token
    assert ((pos >= starts[flat]) & (pos < starts[flat] + counts[flat])).all()  # inside its expert's rows


def _grouped_gemm(a, w, src, tile_expert, tile_row, num, cursor, bm, gather):
    """moe_gemm's contract in numpy: each tile's rows, up to its expert's end, times that expert's weight."""
    out = np.full((src.size, w.shape[1]), np.nan, np.float32)  # rows no tile writes stay NaN and would show
    for tile in range(num):
        x, r0 = tile_expert[tile], tile_row[tile]
        rows = np.arange(r0, min(r0 + bm, cursor[x]))
        out[rows] = (a[src[rows]] if gather else a[rows]) @ w[x].T
    return out


@pytest.mark.parametrize("with_shared", [False, True])
def test_the_launch_sequence_computes_the_reference_moe(rng, with_shared):
    t, h, e, inter, k = 23, 32, 8, 16, 3
    x = rng.normal(size=(t, h)).astype(np.float32)
    router = rng.normal(size=(e, h)).astype(np.float32)
    gate_up = rng.normal(0, .3, (e, 2 * inter, h)).astype(np.float32)
    down = rng.normal(0, .3, (e, h, inter)).astype(np.float32)
    shared = (rng.normal(0, .3, (24, h)).astype(np.float32), rng.normal(0, .3, (h, 12)).astype(np.float32),
              rng.normal(size=(1, h)).astype(np.float32)) if with_shared else None
    pairs, normalize = t * k, not with_shared
    bm = tile_rows(pairs, e)
    text = _source(bm, normalize, with_shared)
    ids, w, counts = _route(text, x @ router.T, k)
    cursor, tile_expert, tile_row, num = _offsets(text, counts, max_tiles(pairs, e, bm))
    src, pos = np.zeros(pairs, i32), np.zeros(pairs, i32)
    host_cuda.run_source(text, "moe_permute", 128, -(-pairs // 128), [ids.ravel().copy(), i32(pairs), i32(k), cursor,
                                                                      src, pos])
    hs = _grouped_gemm(x, gate_up, src, tile_expert, tile_row, num, cursor, bm, True)
    act = np.empty((pairs, inter), np.float32)
    reference.silu_and_mul(hs, act)
    y = _grouped_gemm(act, down, src, tile_expert, tile_row, num, cursor, bm, False)
    s_out = s_gate = np.zeros((t, h), np.float32)
    if shared is not None:
        s_h = x @ shared[0].T
        s_act = np.empty((t, 12), np.float32)
        reference.silu_and_mul(s_h, s_act)
        s_out, s_gate = s_act @ shared[1].T, np.ascontiguousarray(x @ shared[2].T)
    out = np.zeros((t, h), np.float32)
    host_cuda.run_source(text, "moe_combine", 256, t, [y, pos, w, i32(k), i32(h), s_out, s_gate, out])
    ref = np.empty_like(out)
    reference.moe(x, router, gate_up, down, k, normalize, ref, shared)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("t, e, k, n, kdim", [(3, 8, 2, 64, 32), (45, 6, 3, 136, 72), (20, 4, 2, 40, 200)])
def test_grouped_gemm_kernel_equals_its_contract(rng, dtype, t, e, k, n, kdim):
    """moe_gemm.cu: each expert's rows (gathered by token, and not) times its weight, N and K not multiples of the
    64 x 32 tile, BM 16 (a few rows an expert) or 64 as tile_rows picks it; rows past an expert's end untouched."""
    pairs = t * k
    bm = tile_rows(pairs, e)
    route = _source(bm, True, False)
    ids, _, counts = _route(route, rng.normal(0, 2, (t, e)).astype(np.float32), k)
    cursor, tile_expert, tile_row, num = _offsets(route, counts, max_tiles(pairs, e, bm))
    src, pos = np.zeros(pairs, i32), np.zeros(pairs, i32)
    host_cuda.run_source(route, "moe_permute", 128, -(-pairs // 128), [ids.ravel().copy(), i32(pairs), i32(k), cursor,
                                                                       src, pos])
    ctype = {"float16": "half", "bfloat16": "__nv_bfloat16"}[dtype]
    gemm = host_mma.emulated_source("moe_gemm.cu", {"T": ctype, "BM": bm})
    for gather, rows in ((True, t), (False, pairs)):
        a = to_storage(rng.normal(size=(rows, kdim)).astype(np.float32), dtype)
        w = to_storage(rng.normal(0, .3, (e, n, kdim)).astype(np.float32), dtype)
        out = np.full((pairs, n), 0x7e00 if dtype == "float16" else 0x7fc0, np.uint16).view(a.dtype)  # NaN
        host_cuda.run_source(gemm, "moe_gemm", 128, (max_tiles(pairs, e, bm), -(-n // 64)),
                             [a, w, out, src, tile_expert, tile_row, np.array([num], i32), cursor, i32(n), i32(kdim),
                              i32(gather)])
        want = _grouped_gemm(to_float32(a), to_float32(w), src, tile_expert, tile_row, num, cursor, bm, gather)
        tol = 1e-2 if dtype == "float16" else 5e-2  # the output rounded once to fp16 / bf16, |values| up to ~8
        np.testing.assert_allclose(to_float32(out), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("with_shared", [False, True])
def test_the_gpu_launcher_computes_the_reference_moe(rng, dtype, with_shared):
    """ops/cuda/moe.moe itself (never yet run on a GPU): its five launches (route, offsets, permute, the two grouped
    GEMMs, combine) with their grids and arguments, all emulated in fp16 / bf16, through the CuPy stand-in of
    tests/host_mma.py. The dense pieces it borrows are numpy here: `linear` (cuBLASLt on a GPU) rounds its output
    to the storage type as cuBLASLt does, silu_and_mul (the JIT kernel, held to numpy in tests/test_jit_host.py)
    too. Against ops/reference.moe's routing and experts in float32 on the same rounded inputs."""
    t, h, e, inter, k = 21, 64, 8, 24, 3
    rnd = lambda a: to_float32(to_storage(a.astype(np.float32), dtype))  # noqa: E731
    x = rnd(rng.normal(size=(t, h)))
    router = rnd(rng.normal(0, .5, (e, h)))
    gate_up, down = rnd(rng.normal(0, .3, (e, 2 * inter, h))), rnd(rng.normal(0, .3, (e, h, inter)))
    shared = (rnd(rng.normal(0, .3, (32, h))), rnd(rng.normal(0, .3, (h, 16))), rnd(rng.normal(0, .3, (1, h)))) \
        if with_shared else None
    store = lambda a: host_mma.dev(to_storage(a, dtype))  # noqa: E731

    def linear(a, w, bias, out):
        out[...] = to_storage(to_float32(np.asarray(a)) @ to_float32(np.asarray(w)).T, dtype)

    def silu_and_mul(a, out):
        f = np.empty((a.shape[0], a.shape[1] // 2), np.float32)
        reference.silu_and_mul(to_float32(np.asarray(a)), f)
        out[...] = to_storage(f, dtype)
    basic = types.SimpleNamespace(silu_and_mul=silu_and_mul)
    module, restore = host_mma.load_cuda_module("moe", stubs={"basic": basic})
    try:
        out = store(np.zeros((t, h), np.float32))
        module.moe(linear, store(x), store(router), store(gate_up), store(down), k, not with_shared, out,
                   tuple(store(s) for s in shared) if shared else None)
    finally:
        restore()
    ref = np.empty((t, h), np.float32)
    # routed on the router's logits as `linear` rounded them: a near-tie between two experts goes the same way
    ids, w = reference.moe_route(rnd(x @ router.T), k, not with_shared)
    reference.moe_experts(x, ids, w, gate_up, down, ref, shared)
    # the hidden rows and the expert outputs are rounded to fp16 / bf16 once each on the way, as on the GPU
    tol = 2e-2 if dtype == "float16" else 1e-1
    np.testing.assert_allclose(to_float32(np.asarray(out)), ref, rtol=tol, atol=tol)
