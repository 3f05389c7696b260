"""The W8A16 GEMV of FP8 decode (ops/kernels/gemv_fp8.cu) through its launcher (ops/cuda/gemv.py) on the CPU
emulator (tests/host_mma.py), against numpy: out = x @ (codes * scale)^T (+ bias), every token count 1..8 (MAXT
rounds up to a power of two: lanes past `tokens` must stay out), every rows-per-warp variant, a ragged last warp."""
from __future__ import annotations

import numpy as np
import pytest

from ops import quant
from ops.jit import dtypes
from tests import host_cuda, host_mma
from tests.attention_cases import to_float32, to_storage

pytestmark = pytest.mark.skipif(not host_cuda.available(), reason="needs g++ for the CUDA emulator")


@pytest.fixture(scope="module")
def gemv():
    module, restore = host_mma.load_cuda_module("gemv")
    yield module
    restore()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_equals_numpy(gemv, rng, dtype, rows, tokens, bias):
    n, k = 37, 16 * 45  # 37 rows: the last warp is ragged for every rows-per-warp; 45 pieces: lanes stride twice
    weight = quant.quantize_weight(rng.normal(0, 0.05, (n, k)).astype(np.float32))
    x = to_storage(rng.normal(size=(tokens, k)).astype(np.float32), dtype)
    b = to_storage(rng.normal(size=n).astype(np.float32), dtype) if bias else None
    out = host_mma._filled((tokens, n), x.dtype)
    gemv.gemv_fp8(host_mma.dev(x), quant.Fp8Weight(host_mma.dev(weight.codes), host_mma.dev(weight.scale)),
                  None if b is None else host_mma.dev(b), out, rows=rows)
    w = dtypes.e4m3_bits_to_float32(weight.codes) * weight.scale[:, None]
    want = to_float32(x).astype(np.float64) @ w.T + (to_float32(b) if bias else 0)
    tol = 4e-3 if dtype == "float16" else 3e-2  # one rounding of the output to fp16 / bf16
    np.testing.assert_allclose(to_float32(np.asarray(out)), want, rtol=tol, atol=tol)
