"""The GPU sampler (ops/kernels/sampling.cu: bias and penalties, greedy, temperature, top-k, top-p, min-p, the seeded
race, logprobs and the raw top-N) on the CPU: ops/cuda/sampling.py's SamplingBuffers and sample() over the CuPy
stand-in of tests/host_mma.py, the kernel emulated (1024 threads a row, warp votes, shared bitmaps), held to the
numpy oracle ops.sampling.sample with the GPU tests' cases and bars (tests/sampling_cases.py). Vocabularies are
smaller than a model's where the path taken does not depend on it, to keep the emulation quick."""
from __future__ import annotations

import numpy as np
import pytest

from tests import host_cuda, host_mma, sampling_cases
from tests.attention_cases import to_storage
from tests.sampling_cases import MAX_FLIPS, build, check, flat_logits, lm_logits

pytestmark = pytest.mark.skipif(not host_cuda.available(), reason="needs g++ for the CUDA emulator")


@pytest.fixture(scope="module")
def gpu():
    module, restore = host_mma.load_cuda_module("sampling")
    yield module
    restore()


def _run(gpu, stored, t, ids_dtype=np.int64):
    return sampling_cases.run(gpu, gpu.cp, stored, t, ids_dtype)


def test_greedy_ties_and_logprobs(gpu, rng):
    logits = lm_logits(rng, 6, 5000)
    logits[0, [7, 11]] = logits[0].max() + 1  # a tie for the top: the lowest id wins
    t = build(rng, logits, "greedy", logprobs=20)
    assert (check(logits, t, _run(gpu, logits, t), 0) == 0).all()


@pytest.mark.parametrize("kind", ["temperature", "top_k", "top_p", "min_p", "mixed"])
@pytest.mark.parametrize("shape", ["lm", "flat"])
def test_seeded_sampling_matches_numpy(gpu, rng, kind, shape):
    logits = (lm_logits if shape == "lm" else flat_logits)(rng, 8, 6000)
    t = build(rng, logits, kind, logprobs=int(rng.integers(0, 6)) if kind != "mixed" else 3)
    check(logits, t, _run(gpu, logits, t), MAX_FLIPS)


def test_every_path_is_taken_and_matches(gpu, rng):
    logits, t, want = sampling_cases.every_path_case(rng)
    np.testing.assert_array_equal(check(logits, t, _run(gpu, logits, t), MAX_FLIPS), want)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_logits_and_int32_ids(gpu, rng, dtype):
    stored = to_storage(lm_logits(rng, 8, 4000), dtype)
    logits = stored.astype(np.float32) if dtype == "float16" else (stored.astype(np.uint32) << 16).view(np.float32)
    for kind in ("greedy", "mixed", "top_k"):
        t = build(rng, logits, kind, logprobs=4)
        check(logits, t, _run(gpu, stored, t, ids_dtype=np.int32), MAX_FLIPS)


def test_constant_rows_and_odd_vocab(gpu, rng):
    for vocab in (1001, 4096):
        logits, t = sampling_cases.constant_rows_case(rng, vocab)
        got = _run(gpu, logits, t)
        check(logits, t, got, MAX_FLIPS)
        assert got[0][0] == 0  # greedy over a constant row: the lowest id
