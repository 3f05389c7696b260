"""The W8A16 GEMV (ops/cuda/gemv.py) against numpy on the same E4M3 codes: fp16 and bf16, 1..8 tokens, every
rows-per-warp variant, ragged row counts, with and without bias."""
from __future__ import annotations

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import numpy as np
import pytest

from ops import jit_ops, quant
from ops.cuda import to_float32
from ops.cuda.gemv import ROWS, gemv_fp8
from tests.gpu.test_jit_gpu import STORAGE, stored


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("n,k,bias", [(4608, 3584, True), (3584, 18944, False), (1000, 48, True), (7, 16, False)])
def test_gemv_fp8_equals_numpy(n, k, bias, dtype):
    rng = np.random.default_rng(n + k)
    w = cp.asarray(stored(rng, (n, k), dtype))
    codes, scale = cp.empty((n, k), cp.uint8), cp.empty((n, 1), cp.float32)
    jit_ops.quantize_fp8(w, codes, scale)
    wq = quant.Fp8Weight(codes, scale.reshape(-1))
    b = cp.asarray(stored(rng, (n,), dtype)) if bias else None
    deq = quant.dequantize_rows(cp.asnumpy(codes), cp.asnumpy(scale).reshape(-1)).astype(np.float64)
    for t in range(1, 9):
        x = cp.asarray(stored(rng, (t, k), dtype))
        want = to_float32(x).astype(np.float64) @ deq.T + (to_float32(b) if bias else 0.0)
        rms = np.sqrt(np.mean(want ** 2))
        half_ulp = 2.0 ** (-11 if dtype == "float16" else -8)
        for rows in ROWS:
            out = cp.full((t, n), np.nan, STORAGE[dtype]) if dtype == "float16" else cp.zeros((t, n), STORAGE[dtype])
            gemv_fp8(x, wq, b, out, rows)
            got = to_float32(out)
            bad = np.abs(got - want) > 2 * half_ulp * np.abs(want) + 1e-5 * rms
            assert not bad.any(), f"T={t} rows={rows}: {bad.sum()} off, max {np.abs(got - want).max():.3e}"


def test_gemv_fp8_refuses_what_it_cannot_run():
    x = cp.zeros((9, 32), cp.float16)
    wq = quant.Fp8Weight(cp.zeros((8, 32), cp.uint8), cp.ones(8, cp.float32))
    with pytest.raises(ValueError, match="1..8 tokens"):
        gemv_fp8(x, wq, None, cp.zeros((9, 8), cp.float16))
    with pytest.raises(ValueError, match="multiple of 16"):
        gemv_fp8(cp.zeros((1, 24), cp.float16), quant.Fp8Weight(cp.zeros((8, 24), cp.uint8), cp.ones(8, cp.float32)),
                 None, cp.zeros((1, 8), cp.float16))
