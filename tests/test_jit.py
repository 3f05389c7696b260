"""The JIT language on the CPU: each model op written in it (ops/jit_ops.py), run by the interpreter, equals the
plain numpy reference (ops/reference.py) on random shapes with ragged edges; the language's own pieces (masks,
reductions, casts, integer semantics, scalar prefetch) against numpy; clear errors for what it cannot express.
"""
from __future__ import annotations

import numpy as np
import pytest

from ops import jit, jit_ops, reference
from ops.jit import BlockSpec, dtypes

SEED = 20261206


def rounded(rng, shape, dtype):
    """Random values stored as `dtype` (numpy float16 or float32) and the float32 view of what was stored."""
    x = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    return x, x.astype(np.float32)


def tolerance(dtype):
    return 2e-3 if dtype == np.float16 else 2e-6  # one final rounding to fp16, or float32 summation order


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("t,h", [(1, 64), (7, 72), (3, 896), (2, 3584), (2, 20480)])
def test_norms_match_reference(dtype, t, h):
    rng = np.random.default_rng(SEED + h)
    x, x32 = rounded(rng, (t, h), dtype)
    w, w32 = rounded(rng, (h,), dtype)
    res, res32 = rounded(rng, (t, h), dtype)
    want = np.empty((t, h), np.float32)
    reference.rms_norm(x32, w32, 1e-6, want)
    got = np.full((t, h), np.nan, dtype)
    jit_ops.rms_norm(x, w, 1e-6, got)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=tolerance(dtype), atol=tolerance(dtype))
    # add + norm: the residual is rounded to its dtype before the norm, as the reference's residual would be
    want_res = (x32 + res32).astype(dtype).astype(np.float32)
    reference.rms_norm(want_res, w32, 1e-6, want)
    jit_ops.add_rms_norm(x, res, w, 1e-6, got)
    np.testing.assert_array_equal(res.astype(np.float32), want_res)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=tolerance(dtype), atol=tolerance(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("t,inter", [(1, 8), (3, 1000), (4, 3000), (2, 18944)])
def test_silu_and_mul_ragged(dtype, t, inter):
    rng = np.random.default_rng(SEED + inter)
    x, x32 = rounded(rng, (t, 2 * inter), dtype)
    want = np.empty((t, inter), np.float32)
    reference.silu_and_mul(x32, want)
    for config in jit_ops.SILU_CONFIGS:  # every block size the autotuner may pick, ragged edges included
        got = np.full((t, inter), np.nan, dtype)
        jit_ops._silu_launch.__wrapped__(x, got, **config)
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=tolerance(dtype), atol=tolerance(dtype))


def test_embedding_gathers_and_zeroes_bad_ids():
    rng = np.random.default_rng(SEED)
    table = rng.standard_normal((50, 136)).astype(np.float16)
    ids = np.array([3, 0, 49, -1, 50, 7, 1 << 30], np.int32)
    out = np.full((len(ids), 136), np.nan, np.float16)
    jit_ops.embedding(ids, table, out)
    ok = (ids >= 0) & (ids < 50)
    np.testing.assert_array_equal(out[ok], table[ids[ok]])
    assert (out[~ok] == 0).all()


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (7, 1)])
def test_rope_and_cache_matches_reference(head_dim, qk_norm, hq, hkv):
    rng = np.random.default_rng(SEED + head_dim + hq)
    t, bs, nb = 9, 16, 5
    qkv = rng.standard_normal((t, (hq + 2 * hkv) * head_dim)).astype(np.float32)
    positions = rng.integers(0, 100, t).astype(np.int32)
    slots = rng.permutation(nb * bs)[:t].astype(np.int32)
    slots[[2, 5]] = -1  # padding rows: nothing written to the cache
    cos_sin = reference.rope_cos_sin(head_dim, 128, 1e6)
    norms = [rng.standard_normal(head_dim).astype(np.float32) for _ in range(2)] if qk_norm else [None, None]
    caches = [np.full((nb, hkv, bs, head_dim), 7.0, np.float32) for _ in range(4)]
    want_qkv, got_qkv = qkv.copy(), qkv.copy()
    reference.rope_and_cache(want_qkv, positions, slots, caches[0], caches[1], cos_sin, *norms, 1e-6)
    jit_ops.rope_and_cache(got_qkv, positions, slots, caches[2], caches[3], cos_sin, *norms, 1e-6)
    np.testing.assert_allclose(got_qkv, want_qkv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(caches[2], caches[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(caches[3], caches[1])  # v is copied, untouched


def masked_stats(x_ref, o_ref, stats_ref):
    """A row kernel over 128-column blocks of a ragged row (tests/test_jit_host.py runs it generated, too)."""
    j = jit.program_id(1)
    col = j * 128 + jit.iota(1)
    inside = col < jit.dim(x_ref, 1)
    x = x_ref.load(mask=inside, other=-1e30)
    o_ref.store(jit.where(x > 0, x, 0.5 * x), mask=inside)
    stats_ref[...] = jit.max(x) + jit.min(jit.where(inside, x, 1e30)) + jit.sum(jit.where(inside, 1.0, 0.0))


def test_masks_iota_reductions_where():
    """A row kernel over a ragged last block: masked load with `other`, max/min/sum, where, iota, dim."""
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((3, 300)).astype(np.float32)
    out = np.full((3, 300), np.nan, np.float32)
    stats = np.zeros((3, 3, 1), np.float32)
    jit.pallas_call(masked_stats, grid=(3, 3), in_specs=[BlockSpec((None, 128), lambda i, j: (i, j))],
                    out_specs=[BlockSpec((None, 128), lambda i, j: (i, j)),
                               BlockSpec((None, None, 1), lambda i, j: (i, j, 0))])(x, out, stats)
    np.testing.assert_allclose(out, np.where(x > 0, x, 0.5 * x), rtol=1e-6)
    for j in range(3):
        part = x[:, j * 128:(j + 1) * 128]
        np.testing.assert_allclose(stats[:, j, 0], part.max(1) + part.min(1) + part.shape[1], rtol=1e-6)


def int_casts_prefetch(idx_ref, a_ref, o_ref, h_ref, b_ref, f_ref):
    """Floor division and modulo, float -> int, casts to fp16/bf16/fp8, a prefetch ref (run generated, too)."""
    a = a_ref[...]
    o_ref[...] = a // 3 * 100 + a % 3
    v = a.astype(jit.float32) * 0.37 + idx_ref[jit.program_id(0)].astype(jit.float32)
    h_ref[...] = v.astype(jit.float16)
    b_ref[...] = v.astype(jit.bfloat16)
    f_ref[...] = v.astype(jit.float8_e4m3)


def test_integer_semantics_casts_and_prefetch():
    """floordiv/mod are Python's (floor), float -> int truncates; casts round as a store would; a prefetch ref
    indexes blocks with data."""
    a = np.arange(-20, 20, dtype=np.int32).reshape(5, 8)
    idx = np.array([4, 3, 2, 1, 0], np.int32)
    o = np.zeros_like(a)
    outs = [np.zeros((5, 8), np.float32) for _ in range(3)]
    spec = BlockSpec((None, 8), lambda i, idx: (idx[i], 0))
    jit.pallas_call(int_casts_prefetch, grid=(5,), num_scalar_prefetch=1, in_specs=[spec],
                    out_specs=[spec] * 4)(idx, a, o, *outs)
    np.testing.assert_array_equal(o, a // 3 * 100 + a % 3)
    # program i reads and writes row idx[i] and adds idx[i]: row r gets a[r] * 0.37 + r
    v = a.astype(np.float32) * np.float32(0.37) + np.arange(5, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(outs[0], v.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(outs[1], dtypes.bf16_bits_to_float32(dtypes.float32_to_bf16_bits(v)))
    np.testing.assert_array_equal(outs[2], dtypes.e4m3_bits_to_float32(dtypes.float32_to_e4m3_bits(v)))


def test_e4m3_round_trip_and_rounding():
    codes = np.arange(256, dtype=np.uint8)
    values = dtypes.e4m3_bits_to_float32(codes)
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(dtypes.float32_to_e4m3_bits(values[finite]), codes[finite])
    assert dtypes.e4m3_bits_to_float32(dtypes.float32_to_e4m3_bits(np.array([1e6, -1e6], np.float32))).tolist() == [
        448.0, -448.0]
    # halfway between 1.0 (code 0x38) and 1.125 (0x39) goes to the even code
    assert dtypes.float32_to_e4m3_bits(np.array([1.0625], np.float32))[0] == 0x38


def test_errors_name_the_problem():
    x = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="at most two non-squeezed"):
        jit.pallas_call(lambda r, o: None, grid=(1,), in_specs=[BlockSpec((4, 8, 8), lambda i: (0, 0, 0))],
                        out_specs=[BlockSpec((4, 8, 8), lambda i: (0, 0, 0))])(x, x.copy())
    with pytest.raises(ValueError, match="last dim"):
        jit.pallas_call(lambda r: None, grid=(1,), in_specs=[BlockSpec((None, 8, None), lambda i: (0, 0, 0))])(x)
    with pytest.raises(ValueError, match="gives 2 indices"):
        jit.pallas_call(lambda r: None, grid=(1,), in_specs=[BlockSpec((None, None, 8), lambda i: (0, 0))])(x)
    with pytest.raises(TypeError, match="truth value"):
        def branchy(r, o):
            if r[...] > 0:
                o[...] = r[...]
        spec = BlockSpec((None, None, 8), lambda i: (0, 0, 0))
        jit.pallas_call(branchy, grid=(1,), in_specs=[spec], out_specs=[spec])(x, x.copy())
    with pytest.raises(TypeError, match="jit kernels take arrays"):
        jit.pallas_call(lambda r: None, grid=(1,), in_specs=[BlockSpec((8,), lambda i: (0,))])(np.zeros(8, np.int64))
