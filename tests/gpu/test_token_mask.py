"""GPU tests of structured outputs' token mask (ops/kernels/token_mask.cu through ops/cuda/sampling.py) against numpy.

Fresh random logits and masks per run (seed printed): rows without a grammar (all ones), rows with one allowed token,
sparse and dense rows. The masked logits equal ops.sampling.apply_token_mask's bit for bit (fp32, fp16, bf16; a
152064 vocab and an odd 1003); the sampled ids are the numpy sampler's on the same SamplingTensors (greedy exactly,
seeded rows up to one near-tie flip, as tests/gpu/test_sampling.py allows) and always allowed; a CUDA graph replayed
after a masked load and then after an unmasked one masks exactly the first time.
"""
from __future__ import annotations

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import numpy as np
import pytest

import ops.sampling as oracle
from engine.sampling_params import SamplingParams
from ops.cuda import sampling as gpu
from ops.cuda import to_float32, to_storage
from ops.sampling_types import SamplingTensors
from tests.test_token_mask_cpu import random_mask  # the row kinds of the emulator's test

VOCABS = (152064, 1003)
DTYPES = ("float32", "float16", "bfloat16")
MAX_FLIPS = 1  # seeded rows: float rounding may flip a near tie (tests/gpu/test_sampling.py's argument)
LOGPROB_ATOL = 1e-4
NEG_INF_BITS = {"float32": 0xff800000, "float16": 0xfc00, "bfloat16": 0xff80}


def allowed(mask: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)


def lm_logits(rng, batch, vocab):
    logits = rng.standard_normal((batch, vocab), dtype=np.float32) * np.float32(1.5)
    for row in logits:
        row[rng.choice(vocab, 40, replace=False)] += rng.uniform(5, 12, 40).astype(np.float32)
    return logits


def stored_logits(rng, batch, vocab, dtype):
    """(storage array, its exact float32 values): numpy samples the widened values."""
    stored = to_storage(lm_logits(rng, batch, vocab), dtype)
    wide = stored.astype(np.float32) if dtype != "bfloat16" else (stored.astype(np.uint32) << 16).view(np.float32)
    return stored, np.ascontiguousarray(wide)


def params_for(kind: str, rng, logprobs=None) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(temperature=0.0, logprobs=logprobs)
    if kind == "temperature":
        return SamplingParams(temperature=1.0, logprobs=logprobs)
    if kind == "top_k":
        return SamplingParams(temperature=1.0, top_k=int(rng.choice([2, 50, 3000])), logprobs=logprobs)
    assert kind == "top_p"
    return SamplingParams(temperature=1.0, top_p=float(rng.choice([0.5, 0.9])), logprobs=logprobs)


def build(rng, batch, vocab, kind, mask, logprobs=None) -> SamplingTensors:
    rows = [(params_for(kind, rng, logprobs), [], [], int(rng.integers(0, 2**63)), []) for _ in range(batch)]
    return SamplingTensors.build(rows, vocab, mask)


def want_masked(stored: np.ndarray, mask: np.ndarray, dtype: str) -> np.ndarray:
    """The storage bits numpy's apply_token_mask gives: -inf (in the storage format) where the mask forbids."""
    out = stored.copy()
    bits = out.view({4: np.uint32, 2: np.uint16}[out.itemsize])
    bits[~allowed(mask, stored.shape[1])] = NEG_INF_BITS[dtype]
    return out


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_logits_equal_numpy(dtype, vocab, rng):
    max_batch, batch = 24, 20  # 4 padding rows past the loaded batch
    buffers = gpu.SamplingBuffers(max_batch, vocab, max_history=8, max_bias=4)
    stored, wide = stored_logits(rng, max_batch, vocab, dtype)
    mask = random_mask(rng, batch, vocab)
    dev = cp.asarray(stored)
    buffers.load(build(rng, batch, vocab, "greedy", mask))
    gpu.apply_token_mask(dev, buffers)
    got = cp.asnumpy(dev)
    np.testing.assert_array_equal(got[:batch].view(np.uint8), want_masked(stored[:batch], mask, dtype).view(np.uint8))
    np.testing.assert_array_equal(got[batch:].view(np.uint8), stored[batch:].view(np.uint8))  # padding: untouched
    check = wide[:batch].copy()
    oracle.apply_token_mask(check, mask)
    np.testing.assert_array_equal(to_float32(dev)[:batch], check)  # the float view of the same claim
    # a load without a mask: the same launch leaves the logits as they are
    dev = cp.asarray(stored)
    buffers.load(build(rng, batch, vocab, "greedy", None))
    gpu.apply_token_mask(dev, buffers)
    np.testing.assert_array_equal(cp.asnumpy(dev).view(np.uint8), stored.view(np.uint8))


@pytest.mark.parametrize("kind", ["greedy", "temperature", "top_k", "top_p"])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_ids_equal_numpy_and_are_allowed(dtype, vocab, kind, rng):
    batch = 20
    stored, wide = stored_logits(rng, batch, vocab, dtype)
    mask = random_mask(rng, batch, vocab)
    logprobs = 0 if kind in ("greedy", "temperature") else None  # the sampled token's logprob, of the masked logits
    t = build(rng, batch, vocab, kind, mask, logprobs)
    want = oracle.sample(wide.copy(), t)
    ok = allowed(mask, vocab)
    assert ok[np.arange(batch), want.token_ids].all()
    # graph form (the buffers), then the eager form (SamplingTensors), which the engine's eager steps use
    buffers = gpu.SamplingBuffers(batch, vocab, max_history=8, max_bias=4)
    buffers.load(t)
    dev = cp.asarray(stored)
    ids = cp.full(batch, -7, np.int64)
    lp = cp.full(batch, np.nan, np.float32) if logprobs is not None else None
    gpu.sample(dev, buffers, ids, lp)
    eager = gpu.sample(cp.asarray(stored), t)
    for got_ids, got_lp in ((cp.asnumpy(ids), None if lp is None else cp.asnumpy(lp)),
                            (eager.token_ids, eager.logprobs)):
        assert ((got_ids >= 0) & (got_ids < vocab)).all(), got_ids
        assert ok[np.arange(batch), got_ids].all(), "a sampled id the mask forbids"
        single = np.flatnonzero(ok.sum(axis=1) == 1)
        np.testing.assert_array_equal(got_ids[single], ok[single].argmax(axis=1))
        flips = np.flatnonzero(got_ids != want.token_ids)
        assert len(flips) <= (0 if kind == "greedy" else MAX_FLIPS), \
            f"rows {flips} differ: gpu {got_ids[flips]} numpy {want.token_ids[flips]}"
        if got_lp is not None:
            same = got_ids == want.token_ids
            assert np.isfinite(got_lp).all()
            np.testing.assert_allclose(got_lp[same], want.logprobs[same], rtol=0, atol=LOGPROB_ATOL)
    # the mask stays applied, as numpy's sample leaves it
    np.testing.assert_array_equal(cp.asnumpy(dev).view(np.uint8), want_masked(stored, mask, dtype).view(np.uint8))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_graph_replay_masks_only_after_a_masked_load(dtype, rng):
    """One capture (mask kernel + sampler) at 8 rows; loads then alternate masked and unmasked, the live batch
    shrinks, and clear_mask turns a loaded mask off: each replay must follow."""
    vocab, max_batch = 152064, 8
    buffers = gpu.SamplingBuffers(max_batch, vocab, max_history=16, max_bias=4)
    dev = cp.empty((max_batch, vocab), np.dtype(np.float32) if dtype == "float32" else np.float16)
    ids = cp.empty(max_batch, np.int32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stored, _ = stored_logits(rng, max_batch, vocab, dtype)
        dev.set(stored)
        buffers.load(build(rng, max_batch, vocab, "greedy", random_mask(rng, max_batch, vocab)))
        gpu.sample(dev, buffers, ids)  # eager first: modules load outside the capture
        stream.synchronize()
        stream.begin_capture()
        gpu.sample(dev, buffers, ids)
        graph = stream.end_capture()
        for live, masked, kind, clear in ((8, True, "greedy", False), (8, False, "greedy", False),
                                          (5, True, "temperature", False), (5, False, "temperature", False),
                                          (6, True, "greedy", True), (3, True, "greedy", False)):
            stored, wide = stored_logits(rng, max_batch, vocab, dtype)
            mask = random_mask(rng, live, vocab) if masked else None
            t = build(rng, live, vocab, kind, mask)
            dev.set(stored)
            ids.fill(-7)
            buffers.load(t)
            if clear:
                buffers.clear_mask()
            graph.launch(stream)
            stream.synchronize()
            got = cp.asnumpy(dev)
            applied = masked and not clear
            want = want_masked(stored[:live], mask, dtype) if applied else stored[:live]
            np.testing.assert_array_equal(got[:live].view(np.uint8), want.view(np.uint8))
            np.testing.assert_array_equal(got[live:].view(np.uint8), stored[live:].view(np.uint8))
            if clear:
                t.token_mask = None  # what the replay sampled from: the logits unmasked
            expect = oracle.sample(wide[:live].copy(), t).token_ids
            host_ids = cp.asnumpy(ids)
            flips = np.flatnonzero(host_ids[:live] != expect)
            assert len(flips) <= (0 if kind == "greedy" else MAX_FLIPS), (live, masked, kind, flips)
            if applied:
                assert allowed(mask, vocab)[np.arange(live), host_ids[:live]].all()
            assert not host_ids[live:].any()  # padding rows: zeros


def test_mask_cost_in_a_graph(rng):
    """Print-only: GPU microseconds of the captured mask launch at 256 rows of a 152064 vocab (fp16), after an
    unmasked load (the cost every unconstrained decode step pays) and after a masked one."""
    vocab, rows = 152064, 256
    buffers = gpu.SamplingBuffers(rows, vocab, max_history=0, max_bias=0)
    dev = cp.asarray(to_storage(rng.standard_normal((rows, vocab), dtype=np.float32), "float16"))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        buffers.load(build(rng, rows, vocab, "greedy", None))
        gpu.apply_token_mask(dev, buffers)
        stream.synchronize()
        stream.begin_capture()
        gpu.apply_token_mask(dev, buffers)
        graph = stream.end_capture()
        for label, mask in (("unmasked", None), ("all rows masked", random_mask(rng, rows, vocab)),
                            ("no grammar (all ones)", np.full((rows, -(-vocab // 32)), -1, np.int32))):
            buffers.load(build(rng, rows, vocab, "greedy", mask))
            start, end = cp.cuda.Event(), cp.cuda.Event()
            graph.launch(stream)
            start.record(stream)
            for _ in range(50):
                graph.launch(stream)
            end.record(stream)
            end.synchronize()
            us = cp.cuda.get_elapsed_time(start, end) / 50 * 1e3
            print(f"token mask, {rows} x {vocab} fp16, {label}: {us:.1f} us")


def test_bad_mask_shape_raises(rng):
    vocab = 1003
    buffers = gpu.SamplingBuffers(4, vocab, max_history=0, max_bias=0)
    with pytest.raises(ValueError, match=r"must be \[2, 32\]"):
        buffers.load(build(rng, 2, vocab, "greedy", np.zeros((2, 31), np.int32)))
