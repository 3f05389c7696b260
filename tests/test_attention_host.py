"""The GPU's paged-attention kernels (ops/kernels/attention_{decode,prefill}.cu) run on the CPU: the real launcher
(ops/cuda/attention.py: grids, the split-KV plan, the combine kernel, shared-memory sizes) over a stand-in for CuPy,
every launch emulated by tests/host_mma.py (the mma.sync, ldmatrix and cp.async semantics) and tests/host_cuda.py,
against the numpy oracle ops/reference.attention with the GPU tests' cases (tests/attention_cases.py). Head sizes
off the powers of two (80, 96, 112) check the kernels' general swizzle; small contexts keep the emulation quick."""
from __future__ import annotations

import types

import numpy as np
import pytest

from tests import attention_cases, host_cuda, host_mma
from tests.attention_cases import check

pytestmark = pytest.mark.skipif(not host_cuda.available(), reason="needs g++ for the CUDA emulator")

SMS = 132  # the stand-in GPU is an H100: few CTAs, so contexts over MIN_CHUNK (128) tokens split


@pytest.fixture(scope="module")
def xp():
    module, restore = host_mma.load_cuda_module("attention", sms=SMS)
    yield types.SimpleNamespace(asarray=host_mma.dev, asnumpy=lambda a: np.array(a.view(np.ndarray)),
                                empty=lambda shape, dtype: host_mma.dev(np.empty(shape, dtype)),
                                attention=module.attention, module=module)
    restore()


def _case(xp, rng, heads, dtype, spans, fp8=False):
    base = attention_cases.Fp8Case if fp8 else attention_cases.Case
    return type("HostCase", (base,), {"xp": xp})(rng, heads, dtype, spans)


DECODE_SPANS = [(1, 1), (1, 17), (1, 300), (1, 0), (1, 129)]  # 300 and 129 split; (1, 0) is a padding row
PREFILL_SPANS = [(1, 1), (17, 17), (5, 40), (3, 0), (70, 150)]
HEADS = [(4, 2, 64), (2, 2, 80), (4, 2, 96), (2, 1, 112), (2, 1, 128), (20, 1, 16)]  # group 20: two slices of 16
FP8_HEADS = [(4, 2, 64), (2, 2, 80), (4, 2, 96), (2, 1, 128)]


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decode(xp, rng, heads, dtype):
    case = _case(xp, rng, heads, dtype, DECODE_SPANS)
    assert xp.module.num_splits(len(DECODE_SPANS), heads[1], heads[0] // heads[1], 300) > 1  # the combine runs
    ref = case.reference()
    check(case.run(), ref, dtype, f"decode {heads} {dtype}")
    check(case.run(max_seq_len=2048), ref, dtype, f"decode {heads} {dtype}, a graph's grid (idle splits)")


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_prefill(xp, rng, heads, dtype):
    """Fresh prompts, a chunk over cached context, one-token rows and an empty row; a grid sized for longer spans."""
    case = _case(xp, rng, heads, dtype, PREFILL_SPANS)
    ref = case.reference()
    check(case.run(), ref, dtype, f"prefill {heads} {dtype}")
    check(case.run(max_query_len=160, max_seq_len=2048), ref, dtype, f"prefill {heads} {dtype}, oversized grid")


@pytest.mark.parametrize("heads", FP8_HEADS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fp8_cache(xp, rng, heads, dtype):
    """E4M3 codes decoded into the swizzled tiles (mma.cuh's e4m3_tile), decode and prefill."""
    for what, spans in (("decode", DECODE_SPANS), ("prefill", PREFILL_SPANS)):
        case = _case(xp, rng, heads, dtype, spans, fp8=True)
        check(case.run(), case.reference(), dtype, f"fp8 cache {what} {heads} {dtype}")


@pytest.mark.parametrize("window", [1, 16, 37])
@pytest.mark.parametrize("heads", [(4, 2, 64), (4, 2, 96)], ids=lambda h: "x".join(map(str, h)))
def test_sliding_window(xp, rng, heads, window):
    """Windows shorter than the contexts, with the blocks before each window gone (table -1, NaN contents)."""
    for what, spans in (("decode", DECODE_SPANS), ("prefill", PREFILL_SPANS)):
        case = _case(xp, rng, heads, "float16", spans)
        case.release_before_window(window)
        check(case.run(window), case.reference(window), "float16", f"{what} window {window} {heads}")
