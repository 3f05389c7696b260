"""GPU tests of embedding, RMSNorm, add+RMSNorm, SiLU-and-mul and RoPE + KV-cache write against ops/reference.py.

Fresh random inputs (seed printed), outputs poisoned with NaN first, an explicit error bound per op and dtype.
"""
from __future__ import annotations

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import numpy as np
import pytest

from engine.config import RopeScaling
from ops import reference
from ops.cuda import basic, to_float32, to_storage

# name -> hidden H, q heads Hq, kv heads Hkv, head_dim D, intermediate I, vocab V
MODELS = {
    "qwen2.5-7b": dict(H=3584, Hq=28, Hkv=4, D=128, I=18944, V=152064),
    "llama-3-8b": dict(H=4096, Hq=32, Hkv=8, D=128, I=14336, V=128256),
    "qwen2.5-0.5b": dict(H=896, Hq=14, Hkv=2, D=64, I=4864, V=151936),
    "tiny": dict(H=64, Hq=4, Hkv=2, D=32, I=128, V=1024),  # the test checkpoints of tests/conftest.py
}
BIG = ("qwen2.5-7b", "llama-3-8b")
# norm hidden sizes: the models above, Qwen2.5-14B, Llama-3-70B, -405B, and one past it, so that every
# vectors-per-thread variant (1, 2, 4, 8) and a block of a partial warp count run
NORM_HIDDEN = (3584, 4096, 896, 64, 5120, 8192, 16384, 20480)
TOKENS = (1, 17, 1000)
DTYPES = ("float16", "bfloat16")
EPS = 1e-6

# Bounds on max|got - ref| / max|ref|. The kernels read the same rounded inputs the reference gets and
# compute in fp32, so the error is the final rounding to the storage dtype: at most half an ulp,
# 2^-11 (fp16) or 2^-8 (bf16) of the element, hence of max|ref|. ONE allows twice that; TWO covers
# outputs computed from an already rounded intermediate (add_rms_norm's residual is stored, then
# normed), i.e. two roundings, with the same factor of two.
ONE = {"float16": 1e-3, "bfloat16": 8e-3}
TWO = {"float16": 2e-3, "bfloat16": 1.6e-2}


def upload(rng, shape, dtype: str, scale: float = 1.0, offset: float = 0.0):
    """Random N(offset, scale) values -> (device array in storage dtype, float32 host copy of the rounded values)."""
    values = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale) + np.float32(offset))
    stored = to_storage(values, dtype)
    return cp.asarray(stored), to_float32(stored)


def poisoned(shape, dtype: str):
    """An output buffer full of NaN, so an element the kernel never writes shows up."""
    if dtype == "bfloat16":
        return cp.full(shape, 0x7FC0, dtype=np.uint16)
    return cp.full(shape, np.nan, dtype=np.float16)


def assert_close(got: np.ndarray, ref: np.ndarray, bound: float, what: str) -> float:
    unwritten = int(np.isnan(got).sum())
    assert unwritten == 0, f"{what}: {unwritten} of {got.size} elements still NaN (never written)"
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err <= bound, f"{what}: max abs err / max|ref| = {err:.2e} > bound {bound:.1e}"
    print(f"{what}: rel err {err:.2e} (bound {bound:.1e})")
    return err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", BIG + ("tiny",))
def test_embedding_copies_rows_exactly(model, dtype, rng):
    m = MODELS[model]
    # Any 2-byte pattern, NaN and inf included: the gather is a copy and the bits must come through.
    # Drawn on the GPU (a full 152K-row table is 1 GB), seeded from the printed seed.
    cp.random.seed(int(rng.integers(2**31)))
    bits = cp.random.randint(0, 1 << 16, size=(m["V"], m["H"]), dtype=np.int32).astype(np.uint16)
    table = bits.view(np.float16 if dtype == "float16" else np.uint16)
    table_host = cp.asnumpy(bits)
    for t in TOKENS:
        ids = rng.integers(0, m["V"], t).astype(np.int32)
        ids[0], ids[-1] = m["V"] - 1, 0  # both ends of the table
        out = poisoned((t, m["H"]), dtype)
        basic.embedding(cp.asarray(ids), table, out)
        expected = np.empty((t, m["H"]), np.uint16)
        reference.embedding(ids, table_host, expected)
        assert np.array_equal(cp.asnumpy(out).view(np.uint16), expected), f"{model} T={t}: rows differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h", NORM_HIDDEN)
@pytest.mark.parametrize("t", TOKENS)
def test_rms_norm(h, dtype, t, rng):
    x, x32 = upload(rng, (t, h), dtype, scale=3.0)
    weight, w32 = upload(rng, (h,), dtype, scale=0.2, offset=1.0)
    out = poisoned((t, h), dtype)
    basic.rms_norm(x, weight, EPS, out)
    ref = np.empty((t, h), np.float32)
    reference.rms_norm(x32, w32, EPS, ref)
    assert_close(to_float32(out), ref, ONE[dtype], f"rms_norm H={h} T={t} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h", NORM_HIDDEN)
@pytest.mark.parametrize("t", TOKENS)
def test_add_rms_norm(h, dtype, t, rng):
    x, x32 = upload(rng, (t, h), dtype)
    residual, r32 = upload(rng, (t, h), dtype, scale=4.0)
    weight, w32 = upload(rng, (h,), dtype, scale=0.2, offset=1.0)
    out = poisoned((t, h), dtype)
    basic.add_rms_norm(x, residual, weight, EPS, out)
    ref = np.empty((t, h), np.float32)
    reference.add_rms_norm(x32, r32, w32, EPS, ref)  # r32 becomes the float32 sum
    assert_close(to_float32(residual), r32, ONE[dtype], f"add_rms_norm residual H={h} T={t} {dtype}")
    assert_close(to_float32(out), ref, TWO[dtype], f"add_rms_norm out H={h} T={t} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("t", TOKENS)
def test_silu_and_mul(model, dtype, t, rng):
    inter = MODELS[model]["I"]
    x, x32 = upload(rng, (t, 2 * inter), dtype, scale=3.0)
    out = poisoned((t, inter), dtype)
    basic.silu_and_mul(x, out)
    ref = np.empty((t, inter), np.float32)
    reference.silu_and_mul(x32, ref)
    assert_close(to_float32(out), ref, ONE[dtype], f"silu_and_mul {model} T={t} {dtype}")


def test_silu_saturates_without_nan():
    # exp(-g) overflows for g < -88: the kernel must give silu's limit (0), not inf/inf
    x = cp.asarray(np.array([[-1e4, -100.0, 100.0, 60000.0, 0.0, -0.5, 0.5, 3.0, 1, 1, 1, 1, 1, 1, 1, 1]],
                            np.float16))
    out = poisoned((1, 8), "float16")
    basic.silu_and_mul(x, out)
    ref = np.empty((1, 8), np.float32)
    with np.errstate(over="ignore"):
        reference.silu_and_mul(cp.asnumpy(x).astype(np.float32), ref)
    assert np.allclose(cp.asnumpy(out).astype(np.float32), ref, rtol=1e-3, atol=1e-6)


# rope cases: (model shape, cos_sin flavour, Qwen3 q/k norms)
ROPE_CASES = {
    "qwen2.5-7b": ("qwen2.5-7b", "plain", False),
    "llama-3-8b-llama3-scaled": ("llama-3-8b", "llama3", False),
    "qwen3-8b-shape-norms": ("llama-3-8b", "plain", True),  # Qwen3-8B: Hq 32, Hkv 8, D 128
    "qwen2.5-0.5b-linear-norms": ("qwen2.5-0.5b", "linear", True),
    "tiny-d32-norms": ("tiny", "plain", True),
}
MAX_POS = 4096
BLOCK = 16


def cos_sin_table(d: int, flavour: str) -> np.ndarray:
    if flavour == "llama3":
        return reference.rope_cos_sin(d, MAX_POS, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    if flavour == "linear":
        return reference.rope_cos_sin(d, MAX_POS, 1000000.0, RopeScaling("linear", 2.0))
    return reference.rope_cos_sin(d, MAX_POS, 1000000.0)


def slots_for(rng, t: int, num_slots: int) -> np.ndarray:
    """Distinct cache slots with some padding (-1); T=17 runs contiguously across a block boundary."""
    if t == 17:
        slots = np.arange(7, 7 + t, dtype=np.int32)
    else:
        slots = rng.permutation(num_slots)[:t].astype(np.int32)
    if t > 1:
        slots[rng.random(t) < 0.15] = -1
        slots[t // 2] = -1
    return slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("t", TOKENS)
def test_rope_and_cache(case, dtype, t, rng):
    model, flavour, norms = ROPE_CASES[case]
    m = MODELS[model]
    hq, hkv, d = m["Hq"], m["Hkv"], m["D"]
    num_blocks = -(-t // BLOCK) + 3
    qkv, qkv32 = upload(rng, (t, (hq + 2 * hkv) * d), dtype, scale=2.0)
    qkv_before = cp.asnumpy(qkv).view(np.uint16).reshape(t, hq + 2 * hkv, d)
    positions = rng.integers(0, 4001, t).astype(np.int32)
    positions[0] = 4000
    slots = slots_for(rng, t, num_blocks * BLOCK)
    cos_sin = cos_sin_table(d, flavour)
    k_cache, v_cache = poisoned((num_blocks, hkv, BLOCK, d), dtype), poisoned((num_blocks, hkv, BLOCK, d), dtype)
    q_norm = k_norm = qn32 = kn32 = None
    if norms:
        q_norm, qn32 = upload(rng, (d,), dtype, scale=0.2, offset=1.0)
        k_norm, kn32 = upload(rng, (d,), dtype, scale=0.2, offset=1.0)

    basic.rope_and_cache(qkv, cp.asarray(positions), cp.asarray(slots), k_cache, v_cache, cp.asarray(cos_sin),
                         q_norm, k_norm, EPS)
    kc32 = np.full((num_blocks, hkv, BLOCK, d), np.nan, np.float32)
    vc32 = kc32.copy()
    reference.rope_and_cache(qkv32, positions, slots, kc32, vc32, cos_sin, qn32, kn32, EPS)

    what = f"rope_and_cache {case} T={t} {dtype}"
    got = to_float32(qkv).reshape(t, hq + 2 * hkv, d)
    ref = qkv32.reshape(t, hq + 2 * hkv, d)
    assert_close(got[:, :hq], ref[:, :hq], ONE[dtype], what + " q")
    assert_close(got[:, hq:hq + hkv], ref[:, hq:hq + hkv], ONE[dtype], what + " k")
    after = cp.asnumpy(qkv).view(np.uint16).reshape(t, hq + 2 * hkv, d)
    assert np.array_equal(after[:, hq + hkv:], qkv_before[:, hq + hkv:]), what + ": v in qkv was modified"

    k_got, v_got = to_float32(k_cache), to_float32(v_cache)
    # slots of padding tokens and slots no token maps to must still hold the poison
    assert np.array_equal(np.isnan(k_got), np.isnan(kc32)), what + ": k_cache written outside slot_mapping"
    assert np.array_equal(np.isnan(v_got), np.isnan(vc32)), what + ": v_cache written outside slot_mapping"
    written = ~np.isnan(kc32)
    if written.any():
        assert_close(k_got[written], kc32[written], ONE[dtype], what + " k_cache")
        assert np.array_equal(v_got[written], vc32[written]), what + ": v_cache is not an exact copy of v"


def test_preconditions_raise_clear_errors():
    x = cp.zeros((4, 64), np.float16)
    w = cp.ones(64, np.float16)
    with pytest.raises(ValueError, match="dtype"):
        basic.rms_norm(x.astype(np.float32), w, EPS, cp.empty((4, 64), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        basic.rms_norm(cp.zeros((4, 128), np.float16)[:, ::2], w, EPS, cp.empty((4, 64), np.float16))
    with pytest.raises(ValueError, match="shape"):
        basic.rms_norm(x, cp.ones(32, np.float16), EPS, cp.empty((4, 64), np.float16))
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        basic.rms_norm(cp.zeros((4, 60), np.float16), cp.ones(60, np.float16), EPS, cp.empty((4, 60), np.float16))
    with pytest.raises(ValueError, match="head_dim 6"):
        cache = cp.zeros((2, 1, 16, 6), np.float16)
        basic.rope_and_cache(cp.zeros((1, 3 * 6), np.float16), cp.zeros(1, np.int32), cp.zeros(1, np.int32),
                             cache, cache, cp.zeros((8, 6), np.float32))
    with pytest.raises(ValueError, match="int32"):
        basic.embedding(cp.zeros(3, np.int64), cp.zeros((8, 64), np.float16), cp.empty((3, 64), np.float16))
